//! `open_ctree`: open the device, read and check the superblock, bootstrap the chunk map, read
//! the chunk tree and the root tree, and find the subvolume to serve.
//!
//! Refusals follow the kernel: an unknown incompat bit fails the mount naming the bit; an
//! unknown compat_ro bit allows only a read-only mount; features ubtrfs cannot read (zoned,
//! extent-tree-v2, raid-stripe-tree, remap-tree), multi-device filesystems and superblocks in
//! the middle of an fsid/csum change are refused with a message that says so.

use crate::error::{FsError, Result};
use parking_lot::Mutex;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use ubtrfs_ctree::block_group::SpaceInfo;
use ubtrfs_ctree::cow::BlockTemplate;
use ubtrfs_ctree::ctree::{lookup_item, RootPtr, TreeIter};
use ubtrfs_ctree::disk_io::{read_super, BlockReader};
use ubtrfs_ctree::transaction::Transaction;
use ubtrfs_ctree::Device;
use ubtrfs_extent_map::{FsExtentMaps, Policy};
use ubtrfs_format::csum::name_hash;
use ubtrfs_format::items::{ChunkItem, DirItem, RootItem};
use ubtrfs_format::key::{item, objectid, Key};
use ubtrfs_format::super_block::{compat_ro, flag_names, incompat, sb_flags, SuperBlock};

/// Incompat features ubtrfs reads.
const SUPPORTED_INCOMPAT: u64 = incompat::MIXED_BACKREF
    | incompat::DEFAULT_SUBVOL
    | incompat::MIXED_GROUPS
    | incompat::COMPRESS_LZO
    | incompat::COMPRESS_ZSTD
    | incompat::BIG_METADATA
    | incompat::EXTENDED_IREF
    | incompat::RAID56
    | incompat::SKINNY_METADATA
    | incompat::NO_HOLES
    | incompat::METADATA_UUID
    | incompat::RAID1C34
    | incompat::SIMPLE_QUOTA;

/// Compat-ro features ubtrfs knows (reading is always safe for these).
const KNOWN_COMPAT_RO: u64 = compat_ro::FREE_SPACE_TREE
    | compat_ro::FREE_SPACE_TREE_VALID
    | compat_ro::VERITY
    | compat_ro::BLOCK_GROUP_TREE;

/// How long a mount waits for another ubtrfs daemon to release the image.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Default byte budget of the tree-block cache.
pub const DEFAULT_BLOCK_CACHE_BYTES: u64 = 256 << 20;

/// Options that change how a filesystem is opened and served.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub readonly: bool,
    /// `subvolid=`: serve this subvolume instead of the default one.
    pub subvolid: Option<u64>,
    /// `subvol=`: serve the subvolume at this path (relative to the top level).
    pub subvol: Option<String>,
    /// `rescue=nologreplay`.
    pub nologreplay: bool,
    /// `commit=`: seconds between periodic commits (kernel default 30).
    pub commit_interval: u64,
    /// Extent-map policy (`shrinker=`).
    pub policy: Policy,
    pub block_cache_bytes: u64,
    /// `log_rename_unlink` (ubtrfs only): when a directory fsync logs a file renamed into it
    /// from another directory (a new dentry with `last_unlink_trans` set), also log the
    /// removal of its old names, so that replay shows the rename done. Off by default: the
    /// kernel logs the new name only, and its replay keeps both names (link count 2).
    pub log_rename_unlink: bool,
    /// `nodatasum`: new regular files get NODATASUM.
    pub nodatasum: bool,
    /// `nodatacow` (implies `nodatasum`): new regular files get NODATACOW and NODATASUM.
    pub nodatacow: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            readonly: true,
            subvolid: None,
            subvol: None,
            nologreplay: false,
            commit_interval: 30,
            policy: Policy::FixedSplit,
            block_cache_bytes: DEFAULT_BLOCK_CACHE_BYTES,
            log_rename_unlink: false,
            nodatasum: false,
            nodatacow: false,
        }
    }
}

/// A subvolume (fs tree) root.
#[derive(Clone, Debug)]
pub struct FsRoot {
    pub id: u64,
    pub ptr: RootPtr,
    pub item: RootItem,
}

/// Counters of the filesystem layer.
#[derive(Default, Debug)]
pub struct FsCounters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub data_csum_errors: AtomicU64,
    pub decompressed_extents: AtomicU64,
    /// Transactions committed and the time they took (ns, total and the last one).
    pub commits: AtomicU64,
    pub commit_ns_total: AtomicU64,
    pub commit_ns_last: AtomicU64,
    pub commit_blocks_written: AtomicU64,
    /// fsync calls that fell back to a full transaction commit.
    pub fsync_full_commit: AtomicU64,
    /// fsync calls that logged through the fast path (modified extent maps).
    pub fsync_fast: AtomicU64,
    /// fsync calls that logged through the full path (NEEDS_FULL_SYNC).
    pub fsync_full: AtomicU64,
    /// fsync calls with nothing to log.
    pub fsync_skipped: AtomicU64,
    /// Of `fsync_skipped`, those that found the inode already in the log of the running
    /// transaction with nothing changed since (`btrfs_inode_in_log`).
    pub fsync_skipped_in_log: AtomicU64,
    /// fsync calls made by O_DSYNC/O_SYNC direct writes, which hold the inode lock (the
    /// `skip_ilock` variant: only the mmap lock taken); also counted by outcome above.
    pub fsync_dio: AtomicU64,
    /// Direct writes (`btrfs_direct_write`) that went direct, and those that fell back to a
    /// buffered write plus writeback (checksummed inode, unaligned range).
    pub direct_writes: AtomicU64,
    pub direct_write_fallbacks: AtomicU64,
    /// Log syncs (superblock writes pointing at the log).
    pub log_syncs: AtomicU64,
    /// Logged fsyncs that found their log transid already synced by another fsync's log sync
    /// (the kernel's log_batch joining): they wrote nothing themselves.
    pub fsync_batched: AtomicU64,
    /// What the log replay at mount did.
    pub replay: Mutex<Option<crate::tree_log::ReplayStats>>,
    /// Full-commit fallbacks by reason.
    pub full_commit_reasons: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Commits made to unpin space before answering ENOSPC (`COMMIT_TRANS` flushes).
    pub enospc_commits: AtomicU64,
    /// Bytes written back in place into regular extents of NODATACOW files (NOCOW ordered
    /// extents).
    pub nocow_bytes: AtomicU64,
    /// Bytes written back in place into preallocated extents (PREALLOC ordered extents).
    pub prealloc_written_bytes: AtomicU64,
}

/// The mounted filesystem (`struct btrfs_fs_info`).
pub struct FsInfo {
    pub reader: BlockReader,
    pub sb: SuperBlock,
    tree_root: RwLock<RootPtr>,
    csum_root: RwLock<Option<RootPtr>>,
    /// The subvolume served at the mount root.
    pub mount_root: u64,
    pub options: MountOptions,
    pub ems: Arc<FsExtentMaps>,
    pub counters: FsCounters,
    pub path: PathBuf,
    roots: RwLock<HashMap<u64, Arc<FsRoot>>>,
    /// Kept open for the lifetime of the mount: holds the image lock.
    _lock_file: Arc<Device>,
    pub(crate) extent_cache: crate::file::DecompressedCache,
    space: StatSpace,
    /// Serialises tree modification against tree searches: searches hold it shared (recursive),
    /// a write operation holds it exclusive from its first tree change until the roots are
    /// published. Outermost lock of every tree access.
    pub(crate) tree_lock: RwLock<()>,
    /// The running transaction of a read-write mount.
    pub trans: Option<Mutex<Transaction>>,
    /// Serialises log syncs (the per-root `log_mutex` held across `btrfs_sync_log`); taken
    /// before `tree_lock`. An fsync waiting here while another syncs finds its log transid
    /// committed when it gets the mutex.
    pub(crate) log_sync_mutex: Mutex<()>,
    /// Set when a transaction aborted: the mount is read-only from then on (BTRFS_FS_STATE_ERROR).
    pub aborted: std::sync::atomic::AtomicBool,
    /// Data written and not yet in extents, per (subvolume, inode).
    pub(crate) dirty: crate::file_write::DirtyMap,
    /// Data bytes reserved and not yet allocated (the data space_info's `bytes_may_use`; see
    /// space_info.rs).
    pub data_may_use: Arc<AtomicU64>,
    /// The global block reserve's size (`fs_info->global_block_rsv.size`).
    global_rsv: AtomicU64,
    /// Free data and metadata bytes as the last write operation or commit left them, for the
    /// lock-free reservation check (space_info.rs).
    pub(crate) data_free_snap: Arc<AtomicU64>,
    pub(crate) meta_free_snap: AtomicU64,
    /// Open file handles per (subvolume, inode): an unlinked inode is evicted at its last close.
    pub(crate) open_files: Mutex<HashMap<(u64, u64), u32>>,
    /// Next free inode number per subvolume (`btrfs_init_root_free_objectid`, then counted).
    pub(crate) next_ino: Mutex<HashMap<u64, u64>>,
    /// Next directory index per (subvolume, directory) (`btrfs_set_inode_index_count`).
    pub(crate) next_index: Mutex<HashMap<(u64, u64), u64>>,
    /// The superblock as the last commit wrote it (read-write mounts update it).
    pub sb_live: Mutex<SuperBlock>,
    /// When the filesystem was opened: the times of the kernel's fake (placeholder) inodes.
    pub mount_time: ubtrfs_format::items::Timespec,
    /// Unit tests: run once by the next log sync, after its log blocks are written and the
    /// tree lock dropped ([`SyncLogPoint::BlocksWritten`]), then after its superblock write
    /// ([`SyncLogPoint::SuperWritten`]), both with `log_sync_mutex` held.
    #[cfg(test)]
    pub(crate) sync_log_hook: Mutex<Option<SyncLogHook>>,
}

/// See [`FsInfo::sync_log_hook`].
#[cfg(test)]
pub(crate) type SyncLogHook = Box<dyn FnMut(SyncLogPoint) + Send>;

/// Where a log sync runs [`FsInfo::sync_log_hook`].
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncLogPoint {
    BlocksWritten,
    SuperWritten,
}

thread_local! {
    /// Set while this thread runs a write operation (holding `tree_lock` exclusively).
    static IN_WRITE_OP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Copies of the data a block group profile stores (`btrfs_bg_type_to_factor`).
fn profile_copies(flags: u64) -> u64 {
    use ubtrfs_format::items::bg_flags;
    match flags & bg_flags::PROFILE_MASK {
        bg_flags::DUP | bg_flags::RAID1 | bg_flags::RAID10 => 2,
        bg_flags::RAID1C3 => 3,
        bg_flags::RAID1C4 => 4,
        _ => 1,
    }
}

pub(crate) fn now_timespec() -> ubtrfs_format::items::Timespec {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ubtrfs_format::items::Timespec {
        sec: d.as_secs(),
        nsec: d.subsec_nanos(),
    }
}

fn open_device(path: &Path, readonly: bool) -> Result<Device> {
    let meta =
        std::fs::metadata(path).map_err(|e| FsError::Mount(format!("{}: {e}", path.display())))?;
    let is_blk = meta.file_type().is_block_device();
    if !is_blk && !meta.is_file() {
        return Err(FsError::Mount(format!(
            "{}: not a regular file or block device",
            path.display()
        )));
    }
    let exclusive = is_blk && !readonly;
    let mut oo = OpenOptions::new();
    oo.read(true).write(!readonly);
    if exclusive {
        use std::os::unix::fs::OpenOptionsExt;
        oo.custom_flags(libc::O_EXCL);
    }
    // One image, one writer. A daemon that was just unmounted may still be writing its last
    // commit and closing the image (umount returns before a FUSE daemon finishes), so every
    // sign of another user below is waited out, all within one bound, before giving up:
    // - a block device still claimed (O_EXCL) by its previous daemon: the open fails EBUSY;
    // - the lock on the image: shared for read-only mounts, exclusive for read-write;
    // - a loop device of the kernel over the image being detached (losetup -d is asynchronous).
    // What cannot be a departing daemon (a mount by the kernel) is refused at once.
    let wait = device_wait();
    let deadline = std::time::Instant::now() + wait;
    let mut warned = false;
    let mut wait_a_little = |what: &str| {
        if !warned {
            tracing::warn!(
                "{}: {what}; waiting up to {} for it to be released",
                path.display(),
                show_wait(wait)
            );
            warned = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut file: File = loop {
        match oo.open(path) {
            Ok(f) => break f,
            Err(e) if exclusive && e.raw_os_error() == Some(libc::EBUSY) => {
                if let Some(mnt) = kernel_mount_of(&meta) {
                    return Err(FsError::Mount(format!(
                        "{}: in use: mounted by the kernel at {mnt}",
                        path.display()
                    )));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(FsError::Mount(format!(
                        "{}: in use: opened exclusively by another program (a mount, \
                         another ubtrfs daemon, ...) and still busy after {}",
                        path.display(),
                        show_wait(wait)
                    )));
                }
                wait_a_little("busy (opened exclusively by another program)");
            }
            Err(e) => return Err(FsError::Mount(format!("{}: {e}", path.display()))),
        }
    };
    let try_lock = |f: &File| {
        if readonly {
            f.try_lock_shared()
        } else {
            f.try_lock()
        }
    };
    while try_lock(&file).is_err() {
        if std::time::Instant::now() >= deadline {
            return Err(FsError::Mount(format!(
                "{}: in use by another ubtrfs mount (lock held for {})",
                path.display(),
                show_wait(wait)
            )));
        }
        wait_a_little("locked by another ubtrfs daemon");
    }
    while let Some(loopdev) = kernel_loop_holder(path) {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .map(|m| {
                m.lines()
                    .any(|l| l.split_whitespace().next() == Some(loopdev.as_str()))
            })
            .unwrap_or(true);
        if mounted || std::time::Instant::now() >= deadline {
            return Err(FsError::Mount(format!(
                "{}: in use by the kernel through {loopdev}",
                path.display()
            )));
        }
        wait_a_little(&format!("attached to {loopdev}"));
    }
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| FsError::Mount(format!("{}: {e}", path.display())))?;
    let dev = Device::from_file(0, file, size, path.to_path_buf());
    Ok(if readonly {
        dev
    } else {
        dev.with_direct_data_writes()
    })
}

/// The bound on [`open_device`]'s wait: [`LOCK_WAIT`], or `UBTRFS_DEVICE_WAIT_MS` when set
/// (tests use a short one to see the refusal without waiting half a minute).
fn device_wait() -> std::time::Duration {
    std::env::var("UBTRFS_DEVICE_WAIT_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
        .unwrap_or(LOCK_WAIT)
}

fn show_wait(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Where the kernel has the block device `dev` mounted, if it has (in this mount namespace).
/// FUSE mounts (not fuseblk, which the kernel holds) are skipped: their source is only a name
/// (a ubtrfs daemon names its device there), and a ubtrfs daemon is waited for.
fn kernel_mount_of(dev: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
        let Some((head, tail)) = line.split_once(" - ") else {
            continue;
        };
        let mut t = tail.split(' ');
        let (Some(fstype), Some(source)) = (t.next(), t.next()) else {
            continue;
        };
        if fstype == "fuse" || fstype.starts_with("fuse.") {
            continue;
        }
        let source = unescape_mountinfo(source);
        if !source.starts_with('/') {
            continue;
        }
        let Ok(m) = std::fs::metadata(&source) else {
            continue;
        };
        if m.file_type().is_block_device() && m.rdev() == dev.rdev() {
            let mountpoint = head.split(' ').nth(4).unwrap_or("?");
            return Some(unescape_mountinfo(mountpoint));
        }
    }
    None
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(c) = octal {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The loop device backed by `path`, if the kernel has one attached (it may be mounted).
fn kernel_loop_holder(path: &Path) -> Option<String> {
    let canon = std::fs::canonicalize(path).ok()?;
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()) == canon {
                return Some(format!("/dev/{name}"));
            }
        }
    }
    None
}

fn check_features(sb: &SuperBlock, readonly: bool) -> Result<()> {
    let (_, unknown) = flag_names(sb.incompat_flags, incompat::NAMES);
    if unknown != 0 {
        return Err(FsError::Mount(format!(
            "cannot mount: unknown incompat features {unknown:#x}"
        )));
    }
    let unsupported = sb.incompat_flags & !SUPPORTED_INCOMPAT;
    if unsupported != 0 {
        let (names, _) = flag_names(unsupported, incompat::NAMES);
        return Err(FsError::Mount(format!(
            "cannot mount: unsupported incompat features: {}",
            names.join(", ")
        )));
    }
    let unknown_ro = sb.compat_ro_flags & !KNOWN_COMPAT_RO;
    if unknown_ro != 0 && !readonly {
        return Err(FsError::Mount(format!(
            "cannot mount read-write: unknown compat_ro features {unknown_ro:#x} (mount with -o ro)"
        )));
    }
    let changing = sb_flags::CHANGING_FSID
        | sb_flags::CHANGING_FSID_V2
        | sb_flags::CHANGING_BG_TREE
        | sb_flags::CHANGING_DATA_CSUM
        | sb_flags::CHANGING_META_CSUM;
    if sb.flags & changing != 0 {
        return Err(FsError::Mount(format!(
            "cannot mount: an interrupted btrfstune operation is in progress (super flags {:#x})",
            sb.flags & changing
        )));
    }
    if sb.num_devices != 1 {
        return Err(FsError::Mount(format!(
            "cannot mount: multi-device filesystems are not supported ({} devices)",
            sb.num_devices
        )));
    }
    Ok(())
}

impl FsInfo {
    /// `open_ctree`.
    pub fn open(path: &Path, options: MountOptions) -> Result<Arc<FsInfo>> {
        let dev = open_device(path, options.readonly)?;
        Self::open_on(dev, options)
    }

    /// `open_ctree` on a pluggable device backend (tests record every write and flush through
    /// one to build power-cut states). `label` names the device in messages. No image lock is
    /// taken: the caller owns the backend.
    pub fn open_backend(
        backend: Arc<dyn ubtrfs_ctree::BlockDevice>,
        size: u64,
        label: &Path,
        options: MountOptions,
    ) -> Result<Arc<FsInfo>> {
        let dev = Device::from_backend(0, backend, size, label.to_path_buf());
        Self::open_on(dev, options)
    }

    fn open_on(mut dev: Device, options: MountOptions) -> Result<Arc<FsInfo>> {
        let path = dev.path.clone();
        let path = path.as_path();
        let sb = read_super(&dev).map_err(|e| {
            FsError::Mount(format!(
                "{}: not a usable btrfs filesystem: {e}",
                path.display()
            ))
        })?;
        check_features(&sb, options.readonly)?;
        dev.devid = sb.dev_item.devid;
        let dev = Arc::new(dev);
        let reader = BlockReader::new(vec![dev.clone()], &sb, options.block_cache_bytes)?;

        // Bootstrap the chunk map from the superblock's system chunks (btrfs_read_sys_array).
        let sys = sb
            .sys_chunks()
            .map_err(|e| FsError::Mount(format!("sys_chunk_array: {e}")))?;
        if sys.is_empty() {
            return Err(FsError::Mount(
                "sys_chunk_array holds no system chunk".into(),
            ));
        }
        for (key, bytes) in sys {
            let chunk = ChunkItem::parse(&bytes)
                .map_err(|e| FsError::Mount(format!("sys_chunk_array: {e}")))?;
            reader
                .chunks_mut()
                .insert(key.offset, chunk, sb.sectorsize)
                .map_err(|e| FsError::Mount(format!("sys_chunk_array: {e}")))?;
        }
        // The chunk tree (btrfs_read_chunk_tree).
        let chunk_root = RootPtr {
            bytenr: sb.chunk_root,
            level: sb.chunk_root_level,
            generation: sb.chunk_root_generation,
            owner: objectid::CHUNK_TREE,
        };
        let mut chunks = Vec::new();
        for r in TreeIter::new(&reader, chunk_root, Key::new(0, 0, 0)) {
            let (key, block, slot) =
                r.map_err(|e| FsError::Mount(format!("reading the chunk tree: {e}")))?;
            if key.item_type == item::CHUNK_ITEM {
                let data = block
                    .item_data(slot)
                    .map_err(|e| FsError::Mount(format!("chunk tree: {e}")))?;
                let c = ChunkItem::parse(data)
                    .map_err(|e| FsError::Mount(format!("chunk item {key}: {e}")))?;
                chunks.push((key.offset, c));
            }
        }
        for (logical, c) in chunks {
            reader
                .chunks_mut()
                .insert(logical, c, sb.sectorsize)
                .map_err(|e| FsError::Mount(format!("chunk tree: {e}")))?;
        }

        let tree_root = RootPtr {
            bytenr: sb.root,
            level: sb.root_level,
            generation: sb.generation,
            owner: objectid::ROOT_TREE,
        };
        let ems = FsExtentMaps::new(options.policy);
        ems.set_generation(sb.generation);
        let sb_live = Mutex::new(sb.clone());
        let mut fs = FsInfo {
            reader,
            sb,
            tree_root: RwLock::new(tree_root),
            csum_root: RwLock::new(None),
            mount_root: objectid::FS_TREE,
            options,
            ems,
            counters: FsCounters::default(),
            #[cfg(test)]
            sync_log_hook: Mutex::new(None),
            path: path.to_path_buf(),
            roots: RwLock::new(HashMap::new()),
            _lock_file: dev,
            extent_cache: crate::file::DecompressedCache::default(),
            space: StatSpace::default(),
            tree_lock: RwLock::new(()),
            trans: None,
            log_sync_mutex: Mutex::new(()),
            aborted: std::sync::atomic::AtomicBool::new(false),
            dirty: Mutex::new(HashMap::new()),
            data_may_use: Arc::new(AtomicU64::new(0)),
            global_rsv: AtomicU64::new(0),
            data_free_snap: Arc::new(AtomicU64::new(0)),
            meta_free_snap: AtomicU64::new(0),
            next_ino: Mutex::new(HashMap::new()),
            open_files: Mutex::new(HashMap::new()),
            next_index: Mutex::new(HashMap::new()),
            sb_live,
            mount_time: now_timespec(),
        };
        *fs.csum_root.get_mut() = fs
            .read_root_item(objectid::CSUM_TREE)
            .map_err(|e| FsError::Mount(format!("reading the csum tree root: {e}")))?
            .map(|(ptr, _)| ptr);
        // The top-level subvolume must exist.
        fs.root(objectid::FS_TREE)
            .map_err(|e| FsError::Mount(format!("reading the FS tree root: {e}")))?;
        fs.mount_root = fs
            .choose_mount_root()
            .map_err(|e| FsError::Mount(format!("choosing the subvolume: {e}")))?;
        // btrfs_fill_super reads the root directory inode: a mount whose root cannot be read fails.
        let root_dir = fs.root(fs.mount_root).map(|r| r.item.root_dirid)?;
        crate::inode::read_inode(&fs, fs.mount_root, root_dir).map_err(|e| {
            FsError::Mount(format!(
                "reading the root directory of subvolume {}: {e}",
                fs.mount_root
            ))
        })?;
        match fs.load_space() {
            Ok(sp) => fs.space = sp,
            Err(e) => tracing::warn!("{}: reading block groups for statfs: {e}", path.display()),
        }
        if !fs.options.readonly {
            let t = fs.start_rw().map_err(|e| match e {
                FsError::Mount(m) => FsError::ReadWriteRefused(m),
                other => FsError::ReadWriteRefused(other.to_string()),
            })?;
            fs.publish_space(&t);
            fs.trans = Some(Mutex::new(t));
        }
        if fs.sb.log_root != 0 {
            if fs.options.nologreplay {
                tracing::warn!(
                    "{}: a log tree is pending; rescue=nologreplay shows the last committed state \
                     (generation {})",
                    path.display(),
                    fs.sb.generation
                );
            } else {
                fs.replay_log().map_err(|e| {
                    FsError::Mount(format!(
                        "replaying the log tree: {e} (mount with -o ro,rescue=nologreplay to see \
                         the last committed state)"
                    ))
                })?;
            }
        }
        if !fs.is_readonly() {
            // btrfs_orphan_cleanup: inodes unlinked while open when the last mount ended.
            let n = crate::inode::orphan_cleanup(&fs)
                .map_err(|e| FsError::Mount(format!("orphan cleanup: {e}")))?;
            if n > 0 {
                tracing::info!("{}: cleaned up {n} orphan inodes", path.display());
                fs.commit()?;
            }
        }
        Ok(Arc::new(fs))
    }

    /// The ROOT_ITEM of tree `id` (any key offset, as snapshots carry their otransid there).
    pub fn read_root_item(&self, id: u64) -> Result<Option<(RootPtr, RootItem)>> {
        let _g = self.read_guard();
        let mut it = TreeIter::new(
            &self.reader,
            self.tree_root(),
            Key::new(id, item::ROOT_ITEM, 0),
        );
        let Some(r) = it.next() else { return Ok(None) };
        let (key, block, slot) = r?;
        if key.objectid != id || key.item_type != item::ROOT_ITEM {
            return Ok(None);
        }
        let data = block
            .item_data(slot)
            .map_err(|e| FsError::corrupt(format!("root item {key}: {e}")))?;
        let ri =
            RootItem::parse(data).map_err(|e| FsError::corrupt(format!("root item {key}: {e}")))?;
        let ptr = RootPtr {
            bytenr: ri.bytenr,
            level: ri.level,
            generation: ri.generation,
            owner: id,
        };
        Ok(Some((ptr, ri)))
    }

    /// The subvolume root `id` (cached). NotFound for missing or deleted subvolumes.
    pub fn root(&self, id: u64) -> Result<Arc<FsRoot>> {
        if let Some(r) = self.roots.read().get(&id) {
            return Ok(r.clone());
        }
        if !ubtrfs_format::key::is_fstree(id) {
            return Err(FsError::NotFound);
        }
        let (ptr, item) = self.read_root_item(id)?.ok_or(FsError::NotFound)?;
        if item.refs == 0 {
            return Err(FsError::NotFound);
        }
        let r = Arc::new(FsRoot { id, ptr, item });
        self.roots.write().insert(id, r.clone());
        Ok(r)
    }

    /// The default subvolume: the "default" entry of the root tree directory (set by
    /// `btrfs subvolume set-default`), or the top level; overridden by subvolid=/subvol=.
    fn choose_mount_root(&self) -> Result<u64> {
        if let Some(id) = self.options.subvolid {
            self.root(id)?;
            return Ok(id);
        }
        let mut id = objectid::FS_TREE;
        if self.options.subvol.is_none() {
            let key = Key::new(
                objectid::ROOT_TREE_DIR,
                item::DIR_ITEM,
                name_hash(b"default"),
            );
            if let Some(data) = lookup_item(&self.reader, &self.tree_root(), &key)? {
                let items = DirItem::parse_all(&data)
                    .map_err(|e| FsError::corrupt(format!("default dir item: {e}")))?;
                if let Some(d) = items.iter().find(|d| d.name == b"default") {
                    id = d.location.objectid;
                }
            }
            self.root(id)?;
            return Ok(id);
        }
        // subvol=PATH: walk from the top level.
        let path = self.options.subvol.clone().unwrap_or_default();
        let (mut root, mut dir) = (
            objectid::FS_TREE,
            self.root(objectid::FS_TREE)?.item.root_dirid,
        );
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            match crate::dir_item::lookup(self, root, dir, comp.as_bytes())? {
                crate::dir_item::Target::Inode { root: r, ino } => {
                    root = r;
                    dir = ino;
                }
                crate::dir_item::Target::EmptySubvolPlaceholder { .. } => {
                    return Err(FsError::NotFound)
                }
            }
        }
        if dir != self.root(root)?.item.root_dirid {
            return Err(FsError::Invalid(format!(
                "subvol={path} is not a subvolume"
            )));
        }
        Ok(root)
    }

    /// The root tree's current root.
    pub fn tree_root(&self) -> RootPtr {
        *self.tree_root.read()
    }

    /// The csum tree's current root.
    pub fn csum_root(&self) -> Option<RootPtr> {
        *self.csum_root.read()
    }

    pub fn is_readonly(&self) -> bool {
        self.trans.is_none() || self.aborted.load(Ordering::Relaxed)
    }

    /// Refuse-or-handle list of ONDISK-NOTES.md B.13, then the running transaction.
    fn start_rw(&self) -> Result<Transaction> {
        use ubtrfs_format::super_block::incompat as inc;
        let sb = &self.sb;
        let refuse = |why: String| Err(FsError::Mount(why));
        if sb.flags & sb_flags::ERROR != 0 {
            return refuse("the superblock carries the ERROR flag (run btrfs check)".into());
        }
        if sb.incompat_flags & inc::SKINNY_METADATA == 0 {
            return refuse("only skinny-metadata filesystems are written".into());
        }
        if sb.incompat_flags & (inc::MIXED_GROUPS | inc::RAID56 | inc::SIMPLE_QUOTA) != 0 {
            return refuse("mixed block groups, raid56 and simple quotas are not written".into());
        }
        if sb.compat_ro_flags & compat_ro::FREE_SPACE_TREE == 0
            || sb.compat_ro_flags & compat_ro::FREE_SPACE_TREE_VALID == 0
        {
            return refuse(
                "the free space tree is missing or not valid (v1 space cache is not maintained)"
                    .into(),
            );
        }
        if sb.compat_ro_flags & !KNOWN_COMPAT_RO != 0 {
            return refuse(format!(
                "unknown compat_ro features {:#x}",
                sb.compat_ro_flags & !KNOWN_COMPAT_RO
            ));
        }
        let g = self.read_guard();
        let mut roots = std::collections::BTreeMap::new();
        for r in TreeIter::new(&self.reader, self.tree_root(), Key::new(0, 0, 0)) {
            let (key, block, slot) = r?;
            match (key.objectid, key.item_type) {
                (objectid::BALANCE, _) => return refuse("a balance is paused or pending".into()),
                (objectid::TREE_RELOC, _) => return refuse("relocation trees are present".into()),
                (objectid::ORPHAN, item::ORPHAN_ITEM) => {
                    return refuse("a deleted subvolume is still being cleaned up".into())
                }
                (objectid::FREE_SPACE, _) => {
                    return refuse("a v1 free space cache is present".into())
                }
                (id, item::ROOT_ITEM) => {
                    let data = block
                        .item_data(slot)
                        .map_err(|e| FsError::corrupt(format!("root item {key}: {e}")))?;
                    let ri = RootItem::parse(data)
                        .map_err(|e| FsError::corrupt(format!("root item {key}: {e}")))?;
                    if ubtrfs_format::key::is_fstree(id)
                        && (ri.last_snapshot != 0 || ri.parent_uuid != [0; 16])
                    {
                        return refuse(format!(
                            "subvolume {id} takes part in a snapshot: shared tree blocks are not written yet"
                        ));
                    }
                    if ri.refs == 0 {
                        return refuse(format!("subvolume {id} is being deleted"));
                    }
                    roots.insert(
                        id,
                        RootPtr {
                            bytenr: ri.bytenr,
                            level: ri.level,
                            generation: ri.generation,
                            owner: id,
                        },
                    );
                }
                _ => {}
            }
        }
        roots.insert(objectid::ROOT_TREE, self.tree_root());
        let chunk_root = RootPtr {
            bytenr: sb.chunk_root,
            level: sb.chunk_root_level,
            generation: sb.chunk_root_generation,
            owner: objectid::CHUNK_TREE,
        };
        roots.insert(objectid::CHUNK_TREE, chunk_root);
        let bg_tree = if sb.compat_ro_flags & compat_ro::BLOCK_GROUP_TREE != 0 {
            objectid::BLOCK_GROUP_TREE
        } else {
            objectid::EXTENT_TREE
        };
        let bg_root = *roots
            .get(&bg_tree)
            .ok_or_else(|| FsError::Mount("no block group tree".into()))?;
        let fst_root = *roots
            .get(&objectid::FREE_SPACE_TREE)
            .ok_or_else(|| FsError::Mount("no free space tree".into()))?;
        let space = SpaceInfo::load(&self.reader, &bg_root, &fst_root)?;
        let chunk_block = self
            .reader
            .read_tree_block(chunk_root.bytenr, Default::default())?;
        drop(g);
        let template = BlockTemplate {
            nodesize: sb.nodesize,
            fsid: sb.metadata_fsid(),
            chunk_tree_uuid: chunk_block.header.chunk_tree_uuid,
        };
        Ok(Transaction::new(
            sb.generation + 1,
            space,
            roots,
            template,
            bg_tree,
        ))
    }

    /// Shared tree lock for a search, unless this thread runs a write operation (which holds
    /// the lock exclusively and searches its own transaction's roots).
    pub(crate) fn read_guard(&self) -> Option<parking_lot::RwLockReadGuard<'_, ()>> {
        if IN_WRITE_OP.with(|c| c.get()) {
            None
        } else {
            Some(self.tree_lock.read_recursive())
        }
    }

    /// Run one write operation with the default metadata reservation
    /// ([`MetaRsv::DEFAULT`](crate::space_info::MetaRsv::DEFAULT)).
    pub fn write_op<R>(
        &self,
        f: impl FnOnce(&mut crate::transaction::WriteCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        self.write_op_rsv(crate::space_info::MetaRsv::DEFAULT, f)
    }

    /// Run one write operation (`btrfs_start_transaction(root, items)` … `btrfs_end_transaction`):
    /// exclusive tree lock, the metadata reservation (ENOSPC before anything changes; see
    /// space_info.rs), the running transaction, then publish the new tree roots to readers.
    /// An error after the operation changed the transaction aborts it
    /// ([`FsInfo::abort_transaction`]).
    pub fn write_op_rsv<R>(
        &self,
        rsv: crate::space_info::MetaRsv,
        f: impl FnOnce(&mut crate::transaction::WriteCtx<'_>) -> Result<R>,
    ) -> Result<R> {
        use crate::space_info::Shortage;
        let trans = self.trans.as_ref().ok_or(FsError::ReadOnly)?;
        let mut committed = false;
        let (_g, mut t) = loop {
            if self.aborted.load(Ordering::Relaxed) {
                return Err(FsError::ReadOnly);
            }
            let g = self.tree_lock.write();
            let mut t = trans.lock();
            // Keep metadata and system space ahead of need (the kernel's reservation path).
            let before = t.change_mark();
            let r = {
                let mut sb = self.sb_live.lock();
                t.maybe_alloc_meta_chunks(&self.reader, &mut sb)
                    .map_err(FsError::from)
            }
            .and_then(|_| crate::space_info::reserve_metadata_locked(self, &mut t, rsv, committed));
            match r {
                Ok(Ok(())) => break (g, t),
                Ok(Err(Shortage::Commit)) if !committed => {
                    drop(t);
                    drop(g);
                    committed = true;
                    self.commit_for_space()?;
                }
                Ok(Err(_)) => return Err(FsError::NoSpace),
                Err(e) => {
                    if t.change_mark() != before {
                        self.abort_transaction(&t, &e);
                    }
                    return Err(e);
                }
            }
        };
        let before = t.change_mark();
        IN_WRITE_OP.with(|c| c.set(true));
        let r = {
            let mut ctx = crate::transaction::WriteCtx {
                fs: self,
                t: &mut t,
            };
            f(&mut ctx)
        };
        IN_WRITE_OP.with(|c| c.set(false));
        if let Err(e) = &r {
            if t.change_mark() != before {
                self.abort_transaction(&t, e);
            }
        }
        self.publish_roots(&t);
        r
    }

    /// `btrfs_abort_transaction`: the running transaction holds a change that cannot be
    /// completed or undone. Nothing more is committed (the last commit stays the on-disk state)
    /// and every later write fails with EROFS (`BTRFS_FS_STATE_ERROR`).
    pub fn abort_transaction(&self, t: &Transaction, e: &FsError) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            tracing::error!(
                "{}: Transaction aborted (error: {e}) in transaction {}; forced read-only",
                self.path.display(),
                t.transid
            );
        }
    }

    /// The global reserve's size computed at mount (0 if the block groups could not be read).
    pub(crate) fn global_rsv_bytes(&self) -> u64 {
        self.global_rsv.load(Ordering::Relaxed)
    }

    /// Make the transaction's roots the ones readers search, and its free space the one the
    /// lock-free reservation check sees.
    fn publish_roots(&self, t: &Transaction) {
        self.publish_space(t);
        if let Some(r) = t.root(objectid::ROOT_TREE) {
            *self.tree_root.write() = r;
        }
        *self.csum_root.write() = t.root(objectid::CSUM_TREE);
        let mut roots = self.roots.write();
        for (id, cached) in roots.iter_mut() {
            if let Some(p) = t.root(*id) {
                if p != cached.ptr {
                    let mut n = (**cached).clone();
                    n.ptr = p;
                    *cached = Arc::new(n);
                }
            }
        }
    }

    /// A file handle was opened on (root, ino).
    pub fn note_open(&self, root: u64, ino: u64) {
        *self.open_files.lock().entry((root, ino)).or_insert(0) += 1;
    }

    /// A file handle was released; true if it was the last one.
    pub fn note_release(&self, root: u64, ino: u64) -> bool {
        let mut m = self.open_files.lock();
        match m.get_mut(&(root, ino)) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                m.remove(&(root, ino));
                true
            }
            None => true,
        }
    }

    /// Open handles of (root, ino).
    pub fn open_count(&self, root: u64, ino: u64) -> u32 {
        self.open_files
            .lock()
            .get(&(root, ino))
            .copied()
            .unwrap_or(0)
    }

    /// `btrfs_recover_log_trees` at mount: a read-write mount replays into its transaction and
    /// commits; a read-only mount replays into an in-memory transaction that is never
    /// committed, so the replayed state is served while nothing is written to the image.
    fn replay_log(&mut self) -> Result<()> {
        let rw = self.trans.is_some();
        let mut t = match self.trans.take() {
            Some(t) => t.into_inner(),
            None => self.start_rw().map_err(|e| {
                FsError::Mount(format!("the log cannot be replayed on this image: {e}"))
            })?,
        };
        IN_WRITE_OP.with(|c| c.set(true));
        let r = {
            let mut c = crate::transaction::WriteCtx {
                fs: self,
                t: &mut t,
            };
            crate::tree_log::btrfs_recover_log_trees(&mut c)
        };
        IN_WRITE_OP.with(|c| c.set(false));
        let st = r?;
        self.publish_roots(&t);
        tracing::info!("{}: replayed the log: {st:?}", self.path.display());
        self.counters.replay.lock().replace(st);
        if rw {
            self.trans = Some(Mutex::new(t));
            self.commit()?;
        }
        Ok(())
    }

    /// Count a full-commit fallback of fsync.
    pub fn note_full_commit_reason(&self, reason: &'static str) {
        *self
            .counters
            .full_commit_reasons
            .lock()
            .entry(reason)
            .or_insert(0) += 1;
    }

    /// `btrfs_set_log_full_commit`: fsync in this transaction must commit (a rename, unlink or
    /// link made the log unable to express the namespace).
    pub fn btrfs_set_log_full_commit(&self, reason: &'static str) {
        if let Some(trans) = &self.trans {
            trans.lock().log.full_commit.get_or_insert(reason);
        }
    }

    /// `btrfs_sync_log` for an fsync that logged into log transid `log_transid` of transaction
    /// `transid`: write the running transaction's logs and point the primary superblock at
    /// them. Returns true when nothing was left to write for it because a log sync that ran
    /// while it waited for the log sync mutex made its log transid durable (batched). A
    /// transaction commit meanwhile also leaves nothing to write (false).
    ///
    /// # Why one log transid in write-out and one open suffice without the kernel's parity
    /// The kernel's `btrfs_sync_log` for log transid N writes N's dirty log blocks (marked
    /// LOG1 or LOG2 by N's parity), then bumps `root->log_transid` and drops
    /// `root->log_mutex` before it waits for that writeback, flushes and writes the
    /// superblock. Writers of N+1 then change the log tree while N's blocks are in flight:
    /// the parity marks keep N's wait to N's blocks, and `log_ctxs[N % 2]` keeps N's waiters
    /// apart from N+1's. Here the same overlap exists, with no interleaving to sort out:
    /// - Every change of a log tree (logging in `btrfs_sync_file`, the namespace hooks
    ///   `btrfs_log_new_name`, `btrfs_del_dir_entries_in_log`, ..., and freeing the log at
    ///   commit) runs in a write operation, holding `tree_lock` exclusively.
    /// - `sync_log_prepare` runs under `log_sync_mutex` and `tree_lock` (exclusive): it
    ///   updates the log root tree, takes every dirty TREE_LOG block out of the dirty set and
    ///   writes it to the device, builds the superblock bytes pointing at the log root tree
    ///   and bumps the log transid. So N's write-out is exactly what was logged before it,
    ///   complete, and issued before any writer of N+1 runs; an fsync that logs after it
    ///   reads the bumped log transid and waits for a later sync.
    /// - After `tree_lock` is dropped, writers of N+1 change only blocks that are dirty again:
    ///   a TREE_LOG block that is no longer dirty is COWed (`TreeWriter::cow`, the kernel's
    ///   WRITTEN test in `should_cow_block`), and a log block freed while N+1 is open is
    ///   handed out again only once N+1 is durable (`LogAlloc`, `LogState::mark_synced`), so
    ///   nothing N wrote is overwritten while N's log can still be the durable one. N's flush
    ///   and superblock write (`sync_log_finish`) use only the prepared bytes and the device,
    ///   no tree.
    /// - N+1's blocks are written only by N+1's own `sync_log_prepare`, which needs
    ///   `log_sync_mutex`, held by N until its superblock is written: on disk the order is
    ///   always N's blocks, flush, N's superblock, flush, then N+1's. A commit takes
    ///   `log_sync_mutex` too, so it neither frees the log under a sync nor lets a sync's
    ///   superblock land after its own.
    ///
    /// `tree_log::tests::next_log_transid_logs_during_a_sync_write_out` checks this: a writer
    /// of N+1 logs between N's block write and N's superblock, issues no device write, and a
    /// copy of the image taken right after N's superblock replays N without N+1.
    pub fn sync_log(&self, transid: u64, log_transid: u64) -> Result<bool> {
        let Some(trans) = self.trans.as_ref() else {
            return Ok(false);
        };
        let sync = self.log_sync_mutex.lock();
        let prepared = {
            let _g = self.tree_lock.write();
            let mut t = trans.lock();
            if t.transid != transid {
                return Ok(false); // committed meanwhile: durable, nobody's log sync did it
            }
            if t.log.synced_upto > log_transid {
                return Ok(true);
            }
            if let Some(reason) = t.log.full_commit {
                // Something after this fsync logged marked the log untrustworthy (a failed
                // log update or log sync): only a commit is safe.
                Err(reason)
            } else {
                let sb = self.sb_live.lock();
                match t.sync_log_prepare(&self.reader, &sb) {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        tracing::error!("log sync failed: {e}; committing instead");
                        t.log.full_commit = Some("log sync error");
                        Err("log sync error")
                    }
                }
            }
        };
        let p = match prepared {
            Ok(p) => p,
            Err(reason) => {
                drop(sync);
                self.note_full_commit_reason(reason);
                self.commit()?;
                return Ok(false);
            }
        };
        #[cfg(test)]
        let mut hook = self.sync_log_hook.lock().take();
        #[cfg(test)]
        if let Some(h) = hook.as_mut() {
            h(SyncLogPoint::BlocksWritten);
        }
        let finished = Transaction::sync_log_finish(&self.reader, &p);
        #[cfg(test)]
        if let (Some(h), Ok(())) = (hook.as_mut(), &finished) {
            h(SyncLogPoint::SuperWritten);
        }
        match finished {
            Ok(()) => {
                let mut t = trans.lock();
                t.log.mark_synced(p.log_transid);
                t.log.syncs += 1;
                self.counters.log_syncs.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => {
                // A failed log sync: the superblock may or may not point at a partial log; a
                // full commit (which frees the log and clears log_root) is the only safe state.
                trans.lock().log.full_commit = Some("log sync error");
                drop(sync);
                tracing::error!("log sync failed: {e}; committing instead");
                self.note_full_commit_reason("log sync error");
                self.commit()?;
                Ok(false)
            }
        }
    }

    /// `sync_filesystem`: write back every dirty inode, then commit.
    pub fn sync(&self) -> Result<()> {
        if self.is_readonly() {
            return Ok(());
        }
        let inodes: Vec<(u64, u64)> = self.dirty.lock().keys().copied().collect();
        // One inode whose writeback fails (a data write error) must not keep the others, and
        // the commit, from reaching the disk; the first error is reported.
        let mut first_err = None;
        for (root, ino) in inodes {
            if let Err(e) = crate::file_write::btrfs_writeback(self, root, ino) {
                tracing::error!("root {root} ino {ino}: writeback failed: {e}");
                first_err.get_or_insert(e);
                if self.is_readonly() {
                    break;
                }
            }
        }
        let committed = self.commit();
        match first_err {
            Some(e) => Err(e),
            None => committed.map(|_| ()),
        }
    }

    /// Commit the running transaction (`btrfs_commit_transaction`); a no-op when nothing
    /// changed. An error aborts: the mount turns read-only, the committed state stays intact.
    pub fn commit(&self) -> Result<Option<ubtrfs_ctree::transaction::CommitStats>> {
        let Some(trans) = self.trans.as_ref() else {
            return Ok(None);
        };
        if self.aborted.load(Ordering::Relaxed) {
            return Err(FsError::ReadOnly);
        }
        // A log sync in flight writes the superblock outside the tree lock: wait for it (the
        // kernel's commit waits for log commits), so this commit's superblock comes last.
        let _log_sync = self.log_sync_mutex.lock();
        let _g = self.tree_lock.write();
        let mut t = trans.lock();
        if t.changes == 0 && t.refs.is_empty() {
            return Ok(None);
        }
        let mut sb = self.sb_live.lock();
        let started = std::time::Instant::now();
        let r = t.commit(&self.reader, &mut sb);
        self.publish_roots(&t);
        match r {
            Ok(st) => {
                let ns = started.elapsed().as_nanos() as u64;
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .commit_ns_total
                    .fetch_add(ns, Ordering::Relaxed);
                self.counters.commit_ns_last.store(ns, Ordering::Relaxed);
                self.counters
                    .commit_blocks_written
                    .fetch_add(st.blocks_written as u64, Ordering::Relaxed);
                tracing::debug!(
                    target: "btrfs_transaction_commit",
                    transid = st.transid,
                    blocks = st.blocks_written,
                    passes = st.passes,
                    ns
                );
                self.ems.set_generation(st.transid);
                self.btrfs_update_global_block_rsv();
                Ok(Some(st))
            }
            Err(e) => {
                let e = FsError::from(e);
                self.abort_transaction(&t, &e);
                Err(e)
            }
        }
    }

    pub fn sectorsize(&self) -> u32 {
        self.sb.sectorsize
    }

    /// statfs figures as `btrfs_statfs` computes them: blocks from the device size; free from
    /// the bytes every block group uses (weighted by its profile's copies) and the global block
    /// reserve; available from the free space inside data block groups (not counted on a
    /// read-only mount, as measured on the kernel) plus unallocated device space past the
    /// first MiB, rounded to 64 KiB (`btrfs_calc_avail_data_space`). Read-write mounts use the
    /// running transaction's block groups.
    pub fn statfs(&self) -> StatFs {
        // Data extents waiting for their last reference to drop (an rm of a big file) are
        // space the kernel shows free once its delayed refs run, which it does soon after the
        // unlink; run them now rather than report them used until the next commit.
        if let Some(trans) = &self.trans {
            if !self.is_readonly() && trans.lock().refs.data_drops() > 0 {
                let r = self.write_op_rsv(crate::space_info::MetaRsv::UNLINK, |c| {
                    Ok(c.t.run_delayed_refs_now(&c.fs.reader)?)
                });
                if let Err(e) = r {
                    tracing::debug!("statfs: running delayed refs: {e}");
                }
            }
        }
        let bsize = u64::from(self.sb.sectorsize);
        let mut s = self.space;
        if let Some(trans) = &self.trans {
            let t = trans.lock();
            let mut used_disk = 0u64;
            let mut data_free = 0u64;
            for g in t.space.groups.values() {
                let f = profile_copies(g.flags);
                used_disk += g.used * f;
                if g.is_data() {
                    s.data_factor = f;
                    data_free += g.length - g.used;
                }
            }
            s.total_used_disk = used_disk;
            s.data_free = data_free;
            let dev_used = self.sb_live.lock().dev_item.bytes_used;
            s.unallocated = self.sb.dev_item.total_bytes.saturating_sub(dev_used);
        }
        let factor = s.data_factor.max(1);
        let blocks = self.sb.total_bytes / factor / bsize;
        let used_blocks = s.total_used_disk / factor / bsize + self.global_rsv_bytes() / bsize;
        let unalloc = (s.unallocated / (64 << 10) * (64 << 10)).saturating_sub(1 << 20);
        let data_free = if self.is_readonly() {
            0
        } else {
            s.data_free / factor
        };
        StatFs {
            bsize,
            blocks,
            bfree: blocks.saturating_sub(used_blocks),
            bavail: (data_free + unalloc / factor) / bsize,
            namelen: 255,
        }
    }

    /// Block-group space figures for statfs (read once at mount; the mount is read-only).
    fn load_space(&self) -> Result<StatSpace> {
        use ubtrfs_format::items::{bg_flags, BlockGroupItem};
        let bg_root = if self.sb.compat_ro_flags & compat_ro::BLOCK_GROUP_TREE != 0 {
            self.read_root_item(objectid::BLOCK_GROUP_TREE)?
                .map(|(p, _)| p)
        } else {
            self.read_root_item(objectid::EXTENT_TREE)?.map(|(p, _)| p)
        };
        let Some(bg_root) = bg_root else {
            return Ok(StatSpace::default());
        };
        let mut sp = StatSpace::default();
        let chunks: Vec<_> = self.reader.chunks().iter().cloned().collect();
        for c in &chunks {
            let key = Key::new(c.logical, item::BLOCK_GROUP_ITEM, c.item.length);
            let _g = self.read_guard();
            let Some(data) = lookup_item(&self.reader, &bg_root, &key)? else {
                continue;
            };
            let bg = BlockGroupItem::parse(&data)
                .map_err(|e| FsError::corrupt(format!("block group {key}: {e}")))?;
            let f = profile_copies(bg.flags);
            sp.total_used_disk = sp.total_used_disk.saturating_add(bg.used.saturating_mul(f));
            if bg.flags & bg_flags::DATA != 0 {
                sp.data_factor = f;
                sp.data_free = sp
                    .data_free
                    .saturating_add(c.item.length.saturating_sub(bg.used));
            }
        }
        sp.unallocated = self
            .sb
            .dev_item
            .total_bytes
            .saturating_sub(self.sb.dev_item.bytes_used);
        let _g = self.read_guard();
        self.btrfs_update_global_block_rsv();
        Ok(sp)
    }

    /// `btrfs_update_global_block_rsv`: the bytes of the extent, csum, free space (and block
    /// group) trees as their ROOT_ITEMs say, at least enough for an unlink's items and delayed
    /// refs, at most 512 MiB. At mount and after every commit; the caller holds the tree lock
    /// (shared or exclusive).
    pub(crate) fn btrfs_update_global_block_rsv(&self) {
        let mut min_items = 1u64 + crate::space_info::BTRFS_UNLINK_METADATA_UNITS;
        let mut num_bytes = 0u64;
        let mut trees = vec![
            objectid::EXTENT_TREE,
            objectid::CSUM_TREE,
            objectid::FREE_SPACE_TREE,
        ];
        if self.sb.compat_ro_flags & compat_ro::BLOCK_GROUP_TREE != 0 {
            trees.push(objectid::BLOCK_GROUP_TREE);
        }
        for id in trees {
            let key = Key::new(id, item::ROOT_ITEM, 0);
            let Ok(Some(data)) = lookup_item(&self.reader, &self.tree_root(), &key) else {
                continue;
            };
            if let Ok(ri) = RootItem::parse(&data) {
                num_bytes = num_bytes.saturating_add(ri.bytes_used);
                min_items += 1;
            }
        }
        let per_item = crate::space_info::btrfs_calc_insert_metadata_size(self.sb.nodesize, 1);
        let mut refs = per_item * crate::space_info::BTRFS_UNLINK_METADATA_UNITS;
        if self.sb.compat_ro_flags & compat_ro::FREE_SPACE_TREE != 0 {
            refs *= 2;
        }
        let size = num_bytes.max(per_item * min_items + refs).min(512 << 20);
        self.global_rsv.store(size, Ordering::Relaxed);
    }

    pub fn note_bytes_read(&self, n: u64) {
        self.counters.bytes_read.fetch_add(n, Ordering::Relaxed);
    }
}

/// Space figures of the block groups.
#[derive(Clone, Copy, Debug, Default)]
struct StatSpace {
    total_used_disk: u64,
    data_free: u64,
    data_factor: u64,
    unallocated: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub bsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub namelen: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/x\\011y\\134z"), "/x\ty\\z");
        // Not an escape: too short, not octal, or above a byte; kept as written.
        assert_eq!(unescape_mountinfo("/a\\04"), "/a\\04");
        assert_eq!(unescape_mountinfo("/a\\09x"), "/a\\09x");
        assert_eq!(unescape_mountinfo("/a\\777"), "/a\\777");
    }

    #[test]
    fn wait_is_shown_in_its_unit() {
        assert_eq!(show_wait(std::time::Duration::from_secs(30)), "30 s");
        assert_eq!(show_wait(std::time::Duration::from_millis(1500)), "1500 ms");
    }
}
