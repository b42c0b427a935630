//! The fuser::Filesystem adapter: maps requests to ubtrfs-fs calls and errors to errno.
//! No filesystem logic lives here.
//!
//! Node identity (ARCHITECTURE.md "FUSE specifics"): a node is (root id, inode number). The
//! mounted subvolume keeps its inode numbers (its root directory is FUSE node 1 and reports
//! st_ino 256 as on a kernel mount); every other subvolume gets a slot and its inodes appear as
//! `(slot << 48) | ino`, because a FUSE mount has one st_dev where the kernel gives each
//! subvolume its own anonymous device. That is the one place where `stat` differs from a kernel
//! mount: st_ino of files inside nested subvolumes and snapshots, and st_dev everywhere.

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use ubtrfs_ctree::Error as TreeError;
use ubtrfs_extent_map::BtrfsInode;
use ubtrfs_format::items::InodeItem;
use ubtrfs_fs::dir_item::Target;
use ubtrfs_fs::fileattr;
use ubtrfs_fs::inode::{EMPTY_SUBVOL_DIR_OBJECTID, S_IFMT};
use ubtrfs_fs::{FsError, FsInfo};

const FUSE_ROOT_ID: u64 = 1;
const SLOT_SHIFT: u32 = 48;
/// Attribute and entry cache time of a read-only mount: nothing changes under the kernel.
const TTL_RO: Duration = Duration::from_secs(3600);
/// Attribute and entry cache time of a read-write mount (we are the only writer, but writes
/// change mtime and size behind the kernel's cached attributes).
const TTL_RW: Duration = Duration::from_secs(1);
const READDIR_BATCH: usize = 256;

// ioctl numbers (x86_64/aarch64 encodings; FUSE passes the command as the caller gave it).
const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_GETFLAGS: u32 = 0x8004_6601;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
const FITRIM: u32 = 0xc018_5879;
const FS_IOC_GETFSLABEL: u32 = 0x8100_9431;
const FS_IOC_SETFSLABEL: u32 = 0x4100_9432;

/// The ioctls ubtrfs answers (an error of one of them is its own errno, not ENOTTY).
fn known_ioctl(cmd: u32) -> bool {
    matches!(
        cmd,
        FS_IOC_GETFLAGS
            | FS_IOC_SETFLAGS
            | FS_IOC32_GETFLAGS
            | FS_IOC32_SETFLAGS
            | FS_IOC_FSGETXATTR
            | FS_IOC_FSSETXATTR
            | FITRIM
            | FS_IOC_GETFSLABEL
            | FS_IOC_SETFSLABEL
    )
}

/// Discard `len` bytes at `off` of a device: BLKDISCARD on a block device, a punched hole in
/// an image file (what a loop device does with a discard). A pluggable backend has nothing
/// to discard.
fn discard(dev: &ubtrfs_ctree::Device, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let ubtrfs_ctree::DeviceIo::File(f) = &dev.io else {
        return Ok(());
    };
    let r = if f.metadata()?.file_type().is_block_device() {
        const BLKDISCARD: libc::c_ulong = 0x1277;
        let range = [off, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) through the pointer, which points
        // to `range`; the fd stays open for the call.
        unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, range.as_ptr()) }
    } else {
        // SAFETY: plain fallocate on an open fd; no pointers.
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        }
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Map an error to the errno the kernel would return, logging what deserves a log line.
pub fn errno_of(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::CrossDevice => Errno::EXDEV,
        FsError::TooManyLinks => Errno::EMLINK,
        FsError::NotPermitted => Errno::EPERM,
        FsError::Unsupported(_) => Errno::EOPNOTSUPP,
        FsError::Range => Errno::ERANGE,
        FsError::TooBig => Errno::E2BIG,
        FsError::FileTooBig => Errno::EFBIG,
        FsError::NoSuchOffset => Errno::ENXIO,
        FsError::Again => Errno::EAGAIN,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NoXattr => Errno::NO_XATTR,
        FsError::Invalid(_) => Errno::EINVAL,
        FsError::ReadOnly => Errno::EROFS,
        FsError::Overflow(_) => Errno::EOVERFLOW,
        FsError::DataChecksum { .. } => Errno::EIO,
        FsError::Decompress { source, .. } => {
            if source.kernel_returns_euclean() {
                Errno::from_i32(libc::EUCLEAN)
            } else {
                Errno::EIO
            }
        }
        FsError::Tree(t) => match t {
            TreeError::Io { .. } | TreeError::Checksum(_) => Errno::EIO,
            TreeError::Corrupt(_) => Errno::from_i32(libc::EUCLEAN),
            TreeError::Unsupported(_) => Errno::EOPNOTSUPP,
            TreeError::NotFound(_) => Errno::ENOENT,
            _ => Errno::EIO,
        },
        FsError::Mount(_) => Errno::EIO,
        _ => Errno::EIO,
    }
}

fn log_error(op: &str, e: &FsError) {
    match e {
        // What applications provoke in normal use is not worth a log line.
        FsError::NotFound
        | FsError::NoXattr
        | FsError::NotDir
        | FsError::IsDir
        | FsError::ReadOnly
        | FsError::Exists
        | FsError::NameTooLong
        | FsError::NotEmpty
        | FsError::Invalid(_)
        | FsError::CrossDevice
        | FsError::TooManyLinks
        | FsError::NotPermitted
        | FsError::Range
        | FsError::TooBig
        | FsError::FileTooBig
        | FsError::NoSuchOffset
        | FsError::NoSpace => {}
        other => tracing::error!("{op}: {other}"),
    }
}

fn timespec_of(t: SystemTime) -> ubtrfs_format::items::Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => ubtrfs_format::items::Timespec {
            sec: d.as_secs(),
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            // Before 1970. fuser 0.18 builds the SystemTime of a kernel time (sec < 0, nsec)
            // as the epoch minus (-sec s + nsec ns) (system_time_from_time), not plus nsec:
            // reading the distance back as (-seconds, nanoseconds) recovers the kernel's
            // timespec exactly. -2^63 s, the earliest time btrfs and the VFS hold, has a
            // magnitude no i64 holds, but its wrapping negation is exact.
            let d = e.duration();
            let sec = if d.as_secs() > 1 << 63 {
                i64::MIN
            } else {
                (d.as_secs() as i64).wrapping_neg()
            };
            let nsec = d.subsec_nanos();
            ubtrfs_format::items::Timespec {
                sec: sec as u64,
                nsec,
            }
        }
    }
}

fn time_set(t: fuser::TimeOrNow) -> ubtrfs_fs::inode::TimeSet {
    match t {
        fuser::TimeOrNow::Now => ubtrfs_fs::inode::TimeSet::Now,
        fuser::TimeOrNow::SpecificTime(st) => ubtrfs_fs::inode::TimeSet::At(timespec_of(st)),
    }
}

/// Reply to an empty-result request.
fn reply_empty(r: Result<(), FsError>, op: &str, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => {
            log_error(op, &e);
            reply.error(errno_of(&e))
        }
    }
}

/// A node the kernel holds references to.
struct Node {
    root: u64,
    ino: u64,
    inode: InodeItem,
    nlookup: u64,
    em: Option<Arc<BtrfsInode>>,
}

pub struct UbtrfsFuse {
    fs: Arc<FsInfo>,
    ttl: Duration,
    rw: bool,
    /// root id -> slot (the mounted root has slot 0), and slot -> root id.
    slots: RwLock<(HashMap<u64, u64>, Vec<u64>)>,
    nodes: Mutex<HashMap<u64, Node>>,
    /// The session's notifier, set once the session exists ([`UbtrfsFuse::notifier_slot`]).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Open directories: file handle -> the last DIR_INDEX at opendir or rewind
    /// (`btrfs_file_private::last_index`).
    dir_handles: Mutex<HashMap<u64, u64>>,
    next_dir_fh: std::sync::atomic::AtomicU64,
    /// The mount's atime options: FUSE inodes are S_NOATIME in the kernel, which leaves
    /// atime updates to the daemon.
    atime: fileattr::AtimePolicy,
}

fn time(t: &ubtrfs_format::items::Timespec) -> SystemTime {
    let secs = t.sec as i64;
    let nsec = t.nsec.min(999_999_999);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nsec))
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & S_IFMT {
        0o040000 => FileType::Directory,
        0o120000 => FileType::Symlink,
        0o020000 => FileType::CharDevice,
        0o060000 => FileType::BlockDevice,
        0o010000 => FileType::NamedPipe,
        0o140000 => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// The generation a reply gives the kernel for `node`: the inode item's, except for the mount
/// root, which the kernel made itself with generation 0 (`fuse_get_root_inode`); another value
/// would make it declare its root inode stale (`fuse_stale_inode`), as a ".." lookup for a
/// file handle can ask for the root.
fn generation(node: u64, ii: &InodeItem) -> Generation {
    Generation(if node == FUSE_ROOT_ID {
        0
    } else {
        ii.generation
    })
}

/// `in_group_or_capable` for the caller of `req` and group `gid`: root, the caller's group,
/// or one of its supplementary groups (FUSE passes only the fsgid, so they are read from
/// /proc; a caller that is gone counts as outside the group).
fn caller_in_group(req: &Request, gid: u32) -> bool {
    if req.uid() == 0 || req.gid() == gid {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{}/status", req.pid()))
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
        })
        .unwrap_or(false)
}

/// Kernel-internal dev_t (major << 20 | minor) as stored by btrfs, to the FUSE/new_encode_dev form.
fn fuse_rdev(rdev: u64) -> u32 {
    let major = ((rdev >> 20) & 0xfff) as u32;
    let minor = (rdev & 0xfffff) as u32;
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl UbtrfsFuse {
    pub fn new(fs: Arc<FsInfo>) -> Self {
        let mut map = HashMap::new();
        map.insert(fs.mount_root, 0);
        let rw = !fs.is_readonly();
        UbtrfsFuse {
            ttl: if rw { TTL_RW } else { TTL_RO },
            rw,
            slots: RwLock::new((map, vec![fs.mount_root])),
            fs,
            nodes: Mutex::new(HashMap::new()),
            notifier: Arc::default(),
            dir_handles: Mutex::new(HashMap::new()),
            next_dir_fh: std::sync::atomic::AtomicU64::new(1),
            atime: fileattr::AtimePolicy::default(),
        }
    }

    /// The mount's atime policy (noatime, strictatime, nodiratime; relatime by default).
    pub fn with_atime(mut self, atime: fileattr::AtimePolicy) -> Self {
        self.atime = atime;
        self
    }

    /// `touch_atime` after an access of `node` (read, readdir); errors are only logged, as
    /// the kernel ignores a failed atime update.
    fn accessed(&self, node: u64, root: u64, ino: u64) {
        if !self.rw {
            return;
        }
        match fileattr::touch_atime(&self.fs, root, ino, self.atime) {
            Ok(true) => self.invalidate_attrs(node),
            Ok(false) => {}
            Err(e) => log_error("atime", &e),
        }
    }

    /// Where the caller puts the session's notifier once the session is made (the adapter
    /// moves into the session, so it cannot ask for it itself).
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Drop the kernel's cached attributes of `node` (not its page cache): for changes the
    /// kernel does not expect from the request it sent, such as ctime after an ioctl.
    fn invalidate_attrs(&self, node: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(node), -1, 0) {
                tracing::debug!("inval_inode {node}: {e}");
            }
        }
    }

    fn mount_root_dir(&self) -> u64 {
        self.fs
            .root(self.fs.mount_root)
            .map(|r| r.item.root_dirid)
            .unwrap_or(256)
    }

    /// (root, ino) -> FUSE node id.
    fn node_id(&self, root: u64, ino: u64) -> Result<u64, FsError> {
        if ino >> SLOT_SHIFT != 0 {
            return Err(FsError::Overflow(ino));
        }
        if root == self.fs.mount_root {
            return Ok(if ino == self.mount_root_dir() {
                FUSE_ROOT_ID
            } else {
                ino
            });
        }
        if let Some(s) = self.slots.read().0.get(&root) {
            return Ok((s << SLOT_SHIFT) | ino);
        }
        let mut w = self.slots.write();
        let slot = match w.0.get(&root) {
            Some(s) => *s,
            None => {
                let s = w.1.len() as u64;
                if s >= 1 << (64 - SLOT_SHIFT) {
                    return Err(FsError::Overflow(root));
                }
                w.0.insert(root, s);
                w.1.push(root);
                s
            }
        };
        Ok((slot << SLOT_SHIFT) | ino)
    }

    /// FUSE node id -> (root, ino).
    fn resolve(&self, node: u64) -> Result<(u64, u64), FsError> {
        if node == FUSE_ROOT_ID {
            return Ok((self.fs.mount_root, self.mount_root_dir()));
        }
        let slot = node >> SLOT_SHIFT;
        let ino = node & ((1 << SLOT_SHIFT) - 1);
        let root = *self
            .slots
            .read()
            .1
            .get(slot as usize)
            .ok_or(FsError::NotFound)?;
        Ok((root, ino))
    }

    fn attr(&self, node: u64, ii: &InodeItem) -> FileAttr {
        let ss = u64::from(self.fs.sectorsize());
        let st_ino = if node == FUSE_ROOT_ID {
            self.mount_root_dir()
        } else {
            node
        };
        // btrfs_getattr: the allocated bytes plus the new delalloc bytes (data written over
        // holes and not yet written back), each rounded up to a sector.
        let new_delalloc = match self.resolve(node) {
            Ok((root, ino)) if self.rw && ii.mode & S_IFMT == ubtrfs_fs::inode::S_IFREG => {
                ubtrfs_fs::file_write::new_delalloc_bytes(&self.fs, root, ino)
            }
            _ => 0,
        };
        FileAttr {
            ino: INodeNo(st_ino),
            size: ii.size,
            blocks: (ii.nbytes.div_ceil(ss) + new_delalloc.div_ceil(ss)) * ss / 512,
            atime: time(&ii.atime),
            mtime: time(&ii.mtime),
            ctime: time(&ii.ctime),
            crtime: time(&ii.otime),
            kind: file_type(ii.mode),
            perm: (ii.mode & 0o7777) as u16,
            nlink: ii.nlink,
            uid: ii.uid,
            gid: ii.gid,
            rdev: fuse_rdev(ii.rdev),
            blksize: ss as u32,
            flags: 0,
        }
    }

    /// The inode item of a node (cached while the kernel holds the node).
    fn inode_of(&self, node: u64) -> Result<(u64, u64, InodeItem), FsError> {
        if !self.rw {
            if let Some(n) = self.nodes.lock().get(&node) {
                return Ok((n.root, n.ino, n.inode));
            }
        }
        let (root, ino) = self.resolve(node)?;
        let mut ii = ubtrfs_fs::inode::read_inode(&self.fs, root, ino)?;
        if self.rw {
            ubtrfs_fs::file_write::live_attrs(&self.fs, root, ino, &mut ii);
        }
        Ok((root, ino, ii))
    }

    /// Owner of a new inode (`inode_init_owner`): the caller, with the group of a setgid
    /// directory, which new subdirectories inherit.
    fn new_owner(&self, req: &Request, parent_ii: &InodeItem, mut mode: u32) -> (u32, u32, u32) {
        let mut gid = req.gid();
        if parent_ii.mode & 0o2000 != 0 {
            gid = parent_ii.gid;
            if mode & S_IFMT == ubtrfs_fs::inode::S_IFDIR {
                mode |= 0o2000;
            }
        }
        (req.uid(), gid, mode)
    }

    /// Create an inode of `mode` named `name` in node `parent`; returns (node, item).
    fn do_create(
        &self,
        req: &Request,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u64,
    ) -> Result<(u64, u64, u64, InodeItem), FsError> {
        let (root, dir, pii) = self.inode_of(parent)?;
        if pii.mode & S_IFMT != ubtrfs_fs::inode::S_IFDIR {
            return Err(FsError::NotDir);
        }
        fileattr::may_create(&pii)?;
        // FUSE_DONT_MASK: the umask applies only without a default ACL (`posix_acl_create`).
        let (uid, gid, mode) = self.new_owner(req, &pii, mode);
        let (ino, ii) = ubtrfs_fs::acl::btrfs_new_inode_acl(
            &self.fs, root, dir, name, mode, umask, rdev, uid, gid,
        )?;
        let node = self.remember(root, ino, ii)?;
        Ok((node, root, ino, ii))
    }

    fn reply_entry(
        &self,
        r: Result<(u64, u64, u64, InodeItem), FsError>,
        op: &str,
        reply: ReplyEntry,
    ) {
        match r {
            Ok((node, _, _, ii)) => {
                reply.entry(&self.ttl, &self.attr(node, &ii), generation(node, &ii))
            }
            Err(e) => {
                log_error(op, &e);
                reply.error(errno_of(&e))
            }
        }
    }

    /// Account one kernel lookup of (root, ino) and return its node id and attributes.
    fn remember(&self, root: u64, ino: u64, ii: InodeItem) -> Result<u64, FsError> {
        let node = self.node_id(root, ino)?;
        let mut nodes = self.nodes.lock();
        let n = nodes.entry(node).or_insert(Node {
            root,
            ino,
            inode: ii,
            nlookup: 0,
            em: None,
        });
        n.nlookup += 1;
        Ok(node)
    }

    fn target_inode(&self, t: Target) -> Result<(u64, u64, InodeItem), FsError> {
        let (root, ino) = match t {
            Target::Inode { root, ino } => (root, ino),
            Target::EmptySubvolPlaceholder { root } => (root, EMPTY_SUBVOL_DIR_OBJECTID),
        };
        let mut ii = ubtrfs_fs::inode::read_inode(&self.fs, root, ino)?;
        if self.rw {
            ubtrfs_fs::file_write::live_attrs(&self.fs, root, ino, &mut ii);
        }
        Ok((root, ino, ii))
    }

    fn do_lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, InodeItem), FsError> {
        let (root, dir, pii) = self.inode_of(parent)?;
        // File handles (FUSE_EXPORT_SUPPORT): to open a handle whose inode it has forgotten,
        // the kernel looks up "." in the handle's node id (of any file type), and ".." to
        // reconnect a directory to its parent. The generation in the reply lets it refuse a
        // handle of a deleted inode whose number came back.
        if name == b"." {
            let node = self.remember(root, dir, pii)?;
            return Ok((node, pii));
        }
        if name == b".." {
            if pii.mode & S_IFMT != ubtrfs_fs::inode::S_IFDIR {
                return Err(FsError::NotDir);
            }
            let p = self.parent_node(parent, root, dir);
            if p == parent && parent != FUSE_ROOT_ID {
                // A subvolume's root directory: its parent is in another tree (ROOT_BACKREF),
                // which this lookup does not follow; the handle cannot be reconnected.
                return Err(FsError::NotFound);
            }
            let (r, i, ii) = self.inode_of(p)?;
            let node = self.remember(r, i, ii)?;
            return Ok((node, ii));
        }
        if pii.mode & S_IFMT != ubtrfs_fs::inode::S_IFDIR {
            return Err(FsError::NotDir);
        }
        let t = ubtrfs_fs::dir_item::lookup(&self.fs, root, dir, name)?;
        let (r, i, ii) = self.target_inode(t)?;
        let node = self.remember(r, i, ii)?;
        Ok((node, ii))
    }

    /// The entries of directory `dir` of `root` after the cookies "." and ".." (from cookie
    /// `offset` on, up to DIR_INDEX `limit`), read in batches and handed to `emit` in order
    /// until it reports the reply buffer full (`Ok(true)`) or fails: the walk readdir and
    /// readdirplus share.
    fn walk_dir_entries(
        &self,
        op: &str,
        root: u64,
        dir: u64,
        offset: u64,
        limit: u64,
        mut emit: impl FnMut(&ubtrfs_fs::dir_item::DirEntry) -> Result<bool, Errno>,
    ) -> Result<(), Errno> {
        let mut next = offset.max(2);
        loop {
            let batch = ubtrfs_fs::dir_item::readdir(&self.fs, root, dir, next, READDIR_BATCH)
                .map_err(|e| {
                    log_error(op, &e);
                    errno_of(&e)
                })?;
            for d in &batch {
                if d.index > limit || emit(d)? {
                    return Ok(());
                }
                next = d.index + 1;
            }
            if batch.len() < READDIR_BATCH {
                return Ok(());
            }
        }
    }

    /// The highest DIR_INDEX readdir on handle `fh` lists: the one the directory had at
    /// opendir, renewed when the listing starts again from the beginning (rewinddir; the
    /// kernel renews it at every llseek, which FUSE does not forward).
    fn readdir_limit(&self, fh: u64, root: u64, dir: u64, offset: u64) -> Result<u64, FsError> {
        if offset == 0 {
            let last = ubtrfs_fs::dir_item::last_dir_index(&self.fs, root, dir)?;
            if let Some(l) = self.dir_handles.lock().get_mut(&fh) {
                *l = last;
            }
            return Ok(last);
        }
        Ok(self
            .dir_handles
            .lock()
            .get(&fh)
            .copied()
            .unwrap_or(u64::MAX))
    }

    /// `file_remove_privs` before a write or fallocate: a caller without CAP_FSETID (here:
    /// not root) clears setuid, and setgid when the file is group-executable or the caller
    /// is outside its group (`setattr_should_drop_sgid`). The FUSE kernel client does this
    /// itself only for group-executable setgid files (fuse_setattr without handle_killpriv),
    /// so the rest falls to the daemon.
    fn file_remove_privs(
        &self,
        req: &Request,
        root: u64,
        ino: u64,
        ii: &InodeItem,
    ) -> Result<(), FsError> {
        const S_ISUID: u32 = 0o4000;
        const S_ISGID: u32 = 0o2000;
        if ii.mode & (S_ISUID | S_ISGID) == 0
            || ii.mode & S_IFMT != ubtrfs_fs::inode::S_IFREG
            || req.uid() == 0
        {
            return Ok(());
        }
        let mut mode = ii.mode & !S_ISUID;
        if ii.mode & S_ISGID != 0 && (ii.mode & 0o010 != 0 || !caller_in_group(req, ii.gid)) {
            mode &= !S_ISGID;
        }
        if mode == ii.mode {
            return Ok(());
        }
        let attrs = ubtrfs_fs::inode::SetAttr {
            mode: Some(mode & 0o7777),
            ..Default::default()
        };
        ubtrfs_fs::inode::btrfs_setattr(&self.fs, root, ino, &attrs)?;
        ubtrfs_fs::acl::btrfs_acl_chmod(&self.fs, root, ino, mode)?;
        self.invalidate_attrs(self.node_id(root, ino)?);
        Ok(())
    }

    /// One open of `node` ends (release, releasedir).
    fn release_inode(&self, node: u64) {
        if !self.rw {
            return;
        }
        if let Ok((root, i)) = self.resolve(node) {
            if self.fs.note_release(root, i) {
                // The last close of an unlinked inode evicts it (and its orphan item).
                match ubtrfs_fs::inode::read_inode(&self.fs, root, i) {
                    Ok(ii) if ii.nlink == 0 => {
                        if let Err(e) = ubtrfs_fs::inode::btrfs_evict_inode(&self.fs, root, i) {
                            log_error("evict", &e);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// FS_IOC_SETFLAGS / FS_IOC_FSSETXATTR under the inode lock (i_rwsem, as `vfs_fileattr_set`).
    fn set_fileattr(
        &self,
        node: u64,
        root: u64,
        ino: u64,
        set: fileattr::FileAttrSet,
    ) -> Result<(), FsError> {
        let em = self.extent_maps(node, root, ino);
        let _l = em.inode_lock().write();
        fileattr::btrfs_fileattr_set(&self.fs, root, ino, set)?;
        // FUSE does not refresh attributes after an ioctl: the new ctime would stay unseen
        // for the attribute timeout.
        self.invalidate_attrs(node);
        Ok(())
    }

    /// The inode item `name` in `dir` names, for the VFS checks before a name goes away.
    fn named_inode(&self, root: u64, dir: u64, name: &[u8]) -> Result<InodeItem, FsError> {
        let t = ubtrfs_fs::dir_item::lookup(&self.fs, root, dir, name)?;
        Ok(self.target_inode(t)?.2)
    }

    /// `may_delete` of `name` in `dir` (whose item is `dii`).
    fn may_delete(&self, root: u64, dir: u64, dii: &InodeItem, name: &[u8]) -> Result<(), FsError> {
        match self.named_inode(root, dir, name) {
            Ok(v) => fileattr::may_delete(dii, &v),
            // The operation itself reports a missing name.
            Err(FsError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn extent_maps(&self, node: u64, root: u64, ino: u64) -> Arc<BtrfsInode> {
        let mut nodes = self.nodes.lock();
        if let Some(n) = nodes.get_mut(&node) {
            return n
                .em
                .get_or_insert_with(|| self.fs.ems.inode(root, ino))
                .clone();
        }
        drop(nodes);
        self.fs.ems.inode(root, ino)
    }

    /// The `..` entry's inode: the parent from the INODE_REF (the mount root is its own parent).
    fn parent_node(&self, node: u64, root: u64, ino: u64) -> u64 {
        if node == FUSE_ROOT_ID {
            return FUSE_ROOT_ID;
        }
        ubtrfs_fs::inode::inode_refs(&self.fs, root, ino)
            .ok()
            .and_then(|refs| refs.first().map(|r| r.0))
            .and_then(|p| self.node_id(root, p).ok())
            .unwrap_or(node)
    }

    fn entry_kind(&self, t: &Target, file_type: u8) -> FileType {
        match t {
            Target::EmptySubvolPlaceholder { .. } => FileType::Directory,
            Target::Inode { .. } => match file_type {
                2 => FileType::Directory,
                3 => FileType::CharDevice,
                4 => FileType::BlockDevice,
                5 => FileType::NamedPipe,
                6 => FileType::Socket,
                7 => FileType::Symlink,
                _ => FileType::RegularFile,
            },
        }
    }
}

impl Filesystem for UbtrfsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_EXPORT_SUPPORT
            // The kernel enforces POSIX ACLs (it reads them with getxattr) and leaves the
            // umask to us, to apply only where no default ACL is inherited.
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK;
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent.0, name.as_bytes()) {
            Ok((node, ii)) if node == FUSE_ROOT_ID => {
                // ".." of a directory in the mount root, for a file handle. fuser sends the
                // attributes' ino as the node id, so the reply must say ino 1; the kernel
                // copies it to i_ino, so the attributes get no cache time and the next stat
                // asks getattr, which says 256 again.
                let mut attr = self.attr(node, &ii);
                attr.ino = INodeNo(FUSE_ROOT_ID);
                reply.entry_with_ttls(&Duration::ZERO, &self.ttl, &attr, generation(node, &ii))
            }
            Ok((node, ii)) => reply.entry(&self.ttl, &self.attr(node, &ii), generation(node, &ii)),
            Err(e) => {
                log_error("lookup", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut nodes = self.nodes.lock();
        if let Some(n) = nodes.get_mut(&ino.0) {
            n.nlookup = n.nlookup.saturating_sub(nlookup);
            if n.nlookup == 0 {
                let n = nodes.remove(&ino.0).expect("present");
                drop(nodes);
                if n.em.is_some() {
                    // Inode eviction drops its extent maps, as the kernel's evict does.
                    ubtrfs_fs::inode::btrfs_forget_cached_inode(&self.fs, n.root, n.ino);
                }
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode_of(ino.0) {
            Ok((_, _, ii)) => reply.attr(&self.ttl, &self.attr(ino.0, &ii)),
            Err(e) => {
                log_error("getattr", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.inode_of(ino.0).and_then(|(root, i, ii)| {
            if ii.mode & S_IFMT != ubtrfs_fs::inode::S_IFLNK {
                return Err(FsError::Invalid("not a symlink".into()));
            }
            ubtrfs_fs::file::readlink(&self.fs, root, i, &ii)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => {
                log_error("readlink", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if writing && !self.rw {
            return reply.error(Errno::EROFS);
        }
        match self.inode_of(ino.0) {
            Ok((_, _, ii)) if ii.mode & S_IFMT == ubtrfs_fs::inode::S_IFDIR => {
                reply.error(Errno::EISDIR)
            }
            Ok((_, _, ii))
                if fileattr::may_open(
                    &ii,
                    flags.acc_mode() != OpenAccMode::O_RDONLY,
                    flags.0 & libc::O_APPEND != 0,
                    flags.0 & libc::O_TRUNC != 0,
                )
                .is_err() =>
            {
                reply.error(Errno::EPERM)
            }
            Ok((root, i, _)) => {
                if self.rw {
                    self.fs.note_open(root, i);
                    reply.opened(FileHandle(0), FopenFlags::empty())
                } else {
                    reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
                }
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_inode(ino.0);
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.inode_of(parent.0).and_then(|(root, dir, dii)| {
            self.may_delete(root, dir, &dii, name.as_bytes())?;
            ubtrfs_fs::inode::btrfs_unlink(&self.fs, root, dir, name.as_bytes())?;
            Ok(())
        });
        reply_empty(r, "unlink", reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.inode_of(parent.0).and_then(|(root, dir, dii)| {
            self.may_delete(root, dir, &dii, name.as_bytes())?;
            ubtrfs_fs::inode::btrfs_rmdir(&self.fs, root, dir, name.as_bytes())?;
            Ok(())
        });
        reply_empty(r, "rmdir", reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let r = self.inode_of(parent.0).and_then(|(root, dir, pii)| {
            fileattr::may_create(&pii)?;
            let (uid, gid, _) = self.new_owner(req, &pii, 0o120777);
            let (ino, ii) = ubtrfs_fs::inode::btrfs_symlink(
                &self.fs,
                root,
                dir,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                uid,
                gid,
            )?;
            let node = self.remember(root, ino, ii)?;
            Ok((node, root, ino, ii))
        });
        self.reply_entry(r, "symlink", reply)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let (root, i, ii) = self.inode_of(ino.0)?;
            let (nroot, ndir, ndii) = self.inode_of(newparent.0)?;
            if nroot != root {
                return Err(FsError::CrossDevice);
            }
            fileattr::may_create(&ndii)?;
            fileattr::may_link(&ii)?;
            let mut ii = ubtrfs_fs::inode::btrfs_link(&self.fs, root, i, ndir, newname.as_bytes())?;
            // The kernel refreshes its cached attributes from this reply: report the in-memory
            // size of data not yet written back.
            ubtrfs_fs::file_write::live_attrs(&self.fs, root, i, &mut ii);
            let node = self.remember(root, i, ii)?;
            Ok((node, root, i, ii))
        })();
        self.reply_entry(r, "link", reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let (root, dir, dii) = self.inode_of(parent.0)?;
            let (nroot, ndir, ndii) = self.inode_of(newparent.0)?;
            if nroot != root {
                return Err(FsError::CrossDevice);
            }
            self.may_delete(root, dir, &dii, name.as_bytes())?;
            fileattr::may_create(&ndii)?;
            self.may_delete(root, ndir, &ndii, newname.as_bytes())?;
            if flags.bits() & ubtrfs_fs::inode::RENAME_EXCHANGE != 0 {
                fileattr::may_create(&dii)?;
            }
            // The whiteout's owner, as `inode_init_owner` gives it in the old directory.
            let (uid, gid, _) = self.new_owner(req, &dii, ubtrfs_fs::inode::S_IFCHR);
            ubtrfs_fs::inode::btrfs_rename_as(
                &self.fs,
                root,
                dir,
                name.as_bytes(),
                ndir,
                newname.as_bytes(),
                flags.bits(),
                (uid, gid),
            )?;
            Ok(())
        })();
        reply_empty(r, "rename", reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if !self.rw {
            return reply.error(Errno::EROFS);
        }
        let r = (|| {
            let (root, i) = self.resolve(ino.0)?;
            let attrs = ubtrfs_fs::inode::SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
                ctime: ctime.map(timespec_of),
            };
            let em = self.extent_maps(ino.0, root, i);
            let _l = em.inode_lock().write();
            fileattr::may_setattr(&ubtrfs_fs::inode::read_inode(&self.fs, root, i)?, &attrs)?;
            let mut ii = ubtrfs_fs::inode::btrfs_setattr(&self.fs, root, i, &attrs)?;
            if attrs.mode.is_some() {
                ubtrfs_fs::acl::btrfs_acl_chmod(&self.fs, root, i, ii.mode)?;
            }
            ubtrfs_fs::file_write::live_attrs(&self.fs, root, i, &mut ii);
            Ok(ii)
        })();
        match r {
            Ok(ii) => reply.attr(&self.ttl, &self.attr(ino.0, &ii)),
            Err(e) => {
                log_error("setattr", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.rw {
            return reply.error(Errno::EROFS);
        }
        let r = self.inode_of(ino.0).and_then(|(root, i, ii)| {
            fileattr::may_set_xattr(&ii)?;
            ubtrfs_fs::acl::btrfs_set_acl(
                &self.fs,
                root,
                i,
                name.as_bytes(),
                value,
                flags as u32,
                |ii| caller_in_group(req, ii.gid),
            )
        });
        reply_empty(r, "setxattr", reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.rw {
            return reply.error(Errno::EROFS);
        }
        let r = self.inode_of(ino.0).and_then(|(root, i, ii)| {
            fileattr::may_set_xattr(&ii)?;
            ubtrfs_fs::xattr::btrfs_removexattr(&self.fs, root, i, name.as_bytes())
        });
        reply_empty(r, "removexattr", reply)
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.rw {
            return reply.error(Errno::EROFS);
        }
        let r = self.resolve(ino.0).and_then(|(root, i)| {
            let em = self.extent_maps(ino.0, root, i);
            let _l = em.inode_lock().write();
            let ii = ubtrfs_fs::inode::read_inode(&self.fs, root, i)?;
            fileattr::may_fallocate(&ii, mode)?;
            self.file_remove_privs(req, root, i, &ii)?;
            ubtrfs_fs::file_write::btrfs_fallocate(&self.fs, root, i, mode as u32, offset, length)
        });
        reply_empty(r, "fallocate", reply)
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let r = self.resolve(ino.0).and_then(|(root, i)| {
            ubtrfs_fs::file_write::btrfs_llseek_data_hole(&self.fs, root, i, offset, whence as u32)
        });
        match r {
            Ok(o) => reply.offset(o as i64),
            Err(e) => {
                log_error("lseek", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: fuser::ReplyWrite,
    ) {
        if !self.rw {
            return reply.error(Errno::EROFS);
        }
        let r = (|| {
            let (rin, iin) = self.resolve(ino_in.0)?;
            let (rout, iout) = self.resolve(ino_out.0)?;
            let em = self.extent_maps(ino_out.0, rout, iout);
            let _l = em.inode_lock().write();
            let (_, _, oii) = self.inode_of(ino_out.0)?;
            fileattr::may_write(&oii, offset_out, oii.size)?;
            ubtrfs_fs::file_write::copy_file_range(
                &self.fs, rin, iin, offset_in, rout, iout, offset_out, len,
            )
        })();
        match r {
            Ok(n) => reply.written(n.min(u64::from(u32::MAX)) as u32),
            Err(e) => {
                log_error("copy_file_range", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        match self.do_create(req, parent.0, name.as_bytes(), mode, umask, 0) {
            Ok((node, root, ino, ii)) => {
                self.fs.note_open(root, ino);
                reply.created(
                    &self.ttl,
                    &self.attr(node, &ii),
                    Generation(ii.generation),
                    FileHandle(0),
                    FopenFlags::empty(),
                )
            }
            Err(e) => {
                log_error("create", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        // FUSE passes the new_encode_dev form; btrfs stores the kernel's internal dev_t.
        let major = u64::from((rdev & 0xfff00) >> 8);
        let minor = u64::from((rdev & 0xff) | ((rdev >> 12) & 0xfff00));
        let kdev = (major << 20) | minor;
        let r = self.do_create(req, parent.0, name.as_bytes(), mode, umask, kdev);
        self.reply_entry(r, "mknod", reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.do_create(
            req,
            parent.0,
            name.as_bytes(),
            mode | ubtrfs_fs::inode::S_IFDIR,
            umask,
            0,
        );
        self.reply_entry(r, "mkdir", reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        // FUSE_WRITE carries the file's open flags plus O_DSYNC/O_SYNC for a dsync write
        // (fuse_write_flags): O_DIRECT takes btrfs_direct_write, whose O_DSYNC sync runs
        // under its inode lock; the client sends the closing generic_write_sync as FUSE_FSYNC.
        let wf = ubtrfs_fs::direct_io::WriteFlags::from_open_flags(flags.0);
        tracing::debug!(target: "fuse_write", ino = ino.0, offset, len = data.len(),
            open_flags = format_args!("{:#x}", flags.0), write_flags = format_args!("{:#x}", write_flags.bits()), direct = wf.direct, dsync = wf.dsync);
        let r = self.resolve(ino.0).and_then(|(root, i)| {
            // The inode lock (i_rwsem) is taken inside: writers of one inode are serialised,
            // as in the kernel; the checks run under it.
            ubtrfs_fs::direct_io::btrfs_file_write(&self.fs, root, i, offset, data, wf, || {
                let (_, _, ii) = self.inode_of(ino.0)?;
                fileattr::may_write(&ii, offset, ii.size)?;
                self.file_remove_privs(req, root, i, &ii)
            })
        });
        match r {
            Ok(o) => reply.written(o.written as u32),
            Err(e) => {
                log_error("write", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.inode_of(ino.0).and_then(|(root, i, ii)| {
            if ii.mode & S_IFMT == ubtrfs_fs::inode::S_IFDIR {
                return Err(FsError::IsDir);
            }
            let em = self.extent_maps(ino.0, root, i);
            let d = ubtrfs_fs::file::read(&self.fs, root, i, &ii, &em, offset, size)?;
            Ok((root, i, d))
        });
        match r {
            Ok((root, i, d)) => {
                // Before the reply: a stat right after read() must see the new atime.
                self.accessed(ino.0, root, i);
                reply.data(&d);
            }
            Err(e) => {
                log_error("read", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inode_of(ino.0) {
            Ok((_, _, ii)) if ii.mode & S_IFMT != ubtrfs_fs::inode::S_IFDIR => {
                reply.error(Errno::ENOTDIR)
            }
            Ok((root, i, _)) => {
                let last = match ubtrfs_fs::dir_item::last_dir_index(&self.fs, root, i) {
                    Ok(l) => l,
                    Err(e) => return reply.error(errno_of(&e)),
                };
                let fh = self
                    .next_dir_fh
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.dir_handles.lock().insert(fh, last);
                // An open directory outlives its last name, as an open file does (rmdir or
                // rename over it leaves it with an orphan item until releasedir).
                if self.rw {
                    self.fs.note_open(root, i);
                }
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                )
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dir_handles.lock().remove(&fh.0);
        self.release_inode(ino.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (root, dir, _) = match self.inode_of(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let limit = match self.readdir_limit(fh.0, root, dir, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(errno_of(&e)),
        };
        // iterate_dir's file_accessed.
        self.accessed(ino.0, root, dir);
        // Cookies: "." is 0 -> 1, ".." is 1 -> 2, entries carry DIR_INDEX + 1 (kernel readdir).
        if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset <= 1 {
            let p = self.parent_node(ino.0, root, dir);
            if reply.add(INodeNo(p), 2, FileType::Directory, "..") {
                return reply.ok();
            }
        }
        let walked = self.walk_dir_entries("readdir", root, dir, offset, limit, |d| {
            let (r, i) = match d.target {
                Target::Inode { root, ino } => (root, ino),
                Target::EmptySubvolPlaceholder { root } => (root, EMPTY_SUBVOL_DIR_OBJECTID),
            };
            let node = self.node_id(r, i).map_err(|e| errno_of(&e))?;
            let kind = self.entry_kind(&d.target, d.file_type);
            Ok(reply.add(INodeNo(node), d.index + 1, kind, OsStr::from_bytes(&d.name)))
        });
        match walked {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (root, dir, dii) = match self.inode_of(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let limit = match self.readdir_limit(fh.0, root, dir, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(errno_of(&e)),
        };
        // iterate_dir's file_accessed.
        self.accessed(ino.0, root, dir);
        if offset == 0
            && reply.add(
                ino,
                1,
                ".",
                &self.ttl,
                &self.attr(ino.0, &dii),
                Generation(dii.generation),
            )
        {
            return reply.ok();
        }
        if offset <= 1 {
            let p = self.parent_node(ino.0, root, dir);
            let pattr = match self.inode_of(p) {
                Ok((_, _, pii)) => self.attr(p, &pii),
                Err(_) => self.attr(ino.0, &dii),
            };
            if reply.add(INodeNo(p), 2, "..", &self.ttl, &pattr, Generation(0)) {
                return reply.ok();
            }
        }
        let walked = self.walk_dir_entries("readdirplus", root, dir, offset, limit, |d| {
            let (r, i, ii) = self.target_inode(d.target).map_err(|e| {
                log_error("readdirplus", &e);
                errno_of(&e)
            })?;
            let node = self.node_id(r, i).map_err(|e| errno_of(&e))?;
            let attr = self.attr(node, &ii);
            if reply.add(
                INodeNo(node),
                d.index + 1,
                OsStr::from_bytes(&d.name),
                &self.ttl,
                &attr,
                Generation(ii.generation),
            ) {
                return Ok(true);
            }
            // The entry was sent: the kernel now holds a lookup reference to it.
            if let Err(e) = self.remember(r, i, ii) {
                log_error("readdirplus", &e);
            }
            Ok(false)
        });
        match walked {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Nothing to do at close: written data is in the daemon already, and POSIX locks stay in
    /// the kernel (FUSE_POSIX_LOCKS is not asked for). ENOSYS makes the kernel stop sending
    /// FLUSH for the rest of the mount (`fc->no_flush`), which saves a round trip per close;
    /// it still writes back its own dirty pages at close first when it caches writes.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if !self.rw {
            return reply.ok();
        }
        // btrfs_sync_file: log the inode and sync the log, or fall back to a full commit.
        let r = self.resolve(ino.0).and_then(|(root, i)| {
            ubtrfs_fs::tree_log::btrfs_sync_file(&self.fs, root, i).map(|_| ())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_error("fsync", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if !self.rw {
            return reply.ok();
        }
        // btrfs_sync_file on a directory: log it (LOG_INODE_ALL: new entries, index ranges so
        // removals replay, the inodes of new entries), or commit where the kernel does.
        let r = self.resolve(ino.0).and_then(|(root, i)| {
            ubtrfs_fs::tree_log::btrfs_sync_file(&self.fs, root, i).map(|_| ())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_error("fsyncdir", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn destroy(&mut self) {
        // Unmount: everything written reaches the disk before the daemon exits.
        if let Err(e) = self.fs.sync() {
            tracing::error!("final commit at unmount failed: {e}");
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks,
            s.bfree,
            s.bavail,
            0,
            0,
            s.bsize as u32,
            s.namelen,
            s.bsize as u32,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self
            .inode_of(ino.0)
            .and_then(|(root, i, _)| ubtrfs_fs::xattr::get(&self.fs, root, i, name.as_bytes()));
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => {
                log_error("getxattr", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self
            .inode_of(ino.0)
            .and_then(|(root, i, _)| ubtrfs_fs::xattr::list(&self.fs, root, i));
        match r {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() > size as usize {
                    reply.error(Errno::ERANGE)
                } else {
                    reply.data(&buf)
                }
            }
            Err(e) => {
                log_error("listxattr", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    /// The ioctls FUSE forwards: the inode flags (`chattr`/`lsattr`; the kernel turns
    /// FS_IOC_GETFLAGS/SETFLAGS and FS_IOC_FSGETXATTR/FSSETXATTR on a FUSE file into these
    /// requests after its own owner and CAP_LINUX_IMMUTABLE checks). Anything else is ENOTTY,
    /// as from a filesystem without the ioctl.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let setting = matches!(
            cmd,
            FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS | FS_IOC_FSSETXATTR | FS_IOC_SETFSLABEL
        );
        if setting && !self.rw {
            return reply.error(Errno::EROFS);
        }
        let r: Result<Vec<u8>, FsError> = (|| {
            let (root, i) = self.resolve(ino.0)?;
            match cmd {
                FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS => {
                    Ok(fileattr::btrfs_fileattr_get(&self.fs, root, i)?
                        .to_ne_bytes()
                        .to_vec())
                }
                FS_IOC_FSGETXATTR => Ok(fileattr::btrfs_fsxattr_get(&self.fs, root, i)?
                    .to_bytes()
                    .to_vec()),
                FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS => {
                    let b: [u8; 4] = in_data
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| FsError::Invalid("short SETFLAGS argument".into()))?;
                    let set = fileattr::FileAttrSet::Flags(u32::from_ne_bytes(b));
                    self.set_fileattr(ino.0, root, i, set)?;
                    Ok(Vec::new())
                }
                FS_IOC_FSSETXATTR => {
                    let x = fileattr::FsXattr::parse(in_data)
                        .ok_or_else(|| FsError::Invalid("short FSSETXATTR argument".into()))?;
                    self.set_fileattr(ino.0, root, i, fileattr::FileAttrSet::Fsx(x))?;
                    Ok(Vec::new())
                }
                FITRIM => {
                    // CAP_SYS_ADMIN; FUSE passes no capabilities, so: root.
                    if req.uid() != 0 {
                        return Err(FsError::NotPermitted);
                    }
                    let range = ubtrfs_fs::trim::FstrimRange::parse(in_data)
                        .ok_or_else(|| FsError::Invalid("short FITRIM argument".into()))?;
                    let out = ubtrfs_fs::trim::btrfs_trim_fs(&self.fs, range, discard)?;
                    Ok(out.to_bytes().to_vec())
                }
                FS_IOC_GETFSLABEL => {
                    let mut out = vec![0u8; ubtrfs_format::super_block::LABEL_SIZE];
                    let l = fileattr::btrfs_get_fslabel(&self.fs);
                    let n = l.len().min(out.len() - 1);
                    out[..n].copy_from_slice(&l.as_bytes()[..n]);
                    Ok(out)
                }
                FS_IOC_SETFSLABEL => {
                    if req.uid() != 0 {
                        return Err(FsError::NotPermitted);
                    }
                    fileattr::btrfs_set_fslabel(&self.fs, in_data)?;
                    Ok(Vec::new())
                }
                _ => Err(FsError::Unsupported(format!("ioctl {cmd:#x}"))),
            }
        })();
        match r {
            Ok(out) => reply.ioctl(0, &out),
            Err(FsError::Unsupported(_)) if !known_ioctl(cmd) => reply.error(Errno::ENOTTY),
            // What btrfs refuses (flags it has no place for: fsstress asks for project ids)
            // is the caller's business, not worth a log line.
            Err(e @ FsError::Unsupported(_)) => reply.error(errno_of(&e)),
            Err(e) => {
                log_error("ioctl", &e);
                reply.error(errno_of(&e))
            }
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let ii = match self.inode_of(ino.0) {
            Ok((_, _, ii)) => ii,
            Err(e) => return reply.error(errno_of(&e)),
        };
        if mask.contains(AccessFlags::W_OK) && !self.rw {
            return reply.error(Errno::EROFS);
        }
        let uid = req.uid();
        if uid == 0 {
            // Root may read anything; execute needs one x bit (or a directory).
            if mask.contains(AccessFlags::X_OK)
                && ii.mode & 0o111 == 0
                && ii.mode & S_IFMT != ubtrfs_fs::inode::S_IFDIR
            {
                return reply.error(Errno::EACCES);
            }
            return reply.ok();
        }
        let shift = if uid == ii.uid {
            6
        } else if req.gid() == ii.gid {
            3
        } else {
            0
        };
        let bits = (ii.mode >> shift) & 7;
        let need = (if mask.contains(AccessFlags::R_OK) {
            4
        } else {
            0
        }) | (if mask.contains(AccessFlags::X_OK) {
            1
        } else {
            0
        });
        if bits & need == need {
            reply.ok()
        } else {
            reply.error(Errno::EACCES)
        }
    }
}
