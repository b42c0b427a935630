//! Power-cut tests (issue 7): every write and flush a workload issues is recorded through a
//! pluggable device ([`ubtrfs_ctree::BlockDevice`]); crash states are rebuilt from the record and
//! each is checked by the oracles.
//!
//! # Definitions
//! - The *record* is the ordered list of writes and flushes the filesystem issued after the
//!   workload's setup was committed (the *base image*).
//! - *Flush point k*: the base image plus every write before the k-th flush (k = 0: the base).
//! - *Epoch k*: the writes between flush k and flush k+1 (or the end of the record). They may
//!   reach the disk in any order and any of them may be lost, as with a volatile disk cache.
//! - A *crash state* (k, S) is flush point k plus a subset S of epoch k, applied in issue order.
//!   Every flush point is checked; subsets are all of them for small epochs, else the empty and
//!   full ones plus seeded random ones (`UBTRFS_CRASH_SUBSETS`, default 4 per epoch).
//! - A *checkpoint* is taken when a sync call (fsync of a file or directory, commit) returns: the
//!   record position, what the call promised, and a snapshot of the namespace. The crash of
//!   state (k, S) happens at the latest moment epoch k allows (just before flush k+1), so every
//!   checkpoint taken at a position before flush k+1 was promised. A sync that returned without
//!   flushing its writes is therefore caught.
//!
//! # What is checked in every state
//! - `btrfs check --readonly` is clean on the crash image (it checks the pending log too).
//! - ubtrfs opens it read-write in a scratch overlay (replaying the log, committing), and the
//!   namespace it shows obeys the promises: for each path, with j the last promised checkpoint
//!   that covered it (the base covers everything), the path's state equals its state in one of
//!   the checkpoints from j on. A file fsync covers every name of the inode in full (content,
//!   size, mode, nlink, xattrs, inode number) and its ancestors' names; a directory fsync covers
//!   the names (and which inode they lead to) of the directory's entries; a commit covers
//!   everything. Nothing committed is lost and nothing appears from nowhere. One allowance,
//!   the kernel's semantics (without `log_rename_unlink`): an entry renamed into a fsynced
//!   directory from another one may also show under its old name, its link count counting
//!   both.
//! - A read-only open of the crash state (replay in memory) shows the same namespace and writes
//!   nothing.
//! - NODATACOW files, by the kernel's semantics: an overwrite goes in place, before the
//!   metadata that goes with it is durable, so such a file may show the metadata of a
//!   permitted state with each data sector from any permitted state.
//! - Reopened read-only after the replay, ubtrfs shows the same namespace (the replay committed),
//!   and `btrfs check` is clean on the image ubtrfs's replay produced.
//! - A sample of states (two per workload; `UBTRFS_CRASH_KERNEL=all` for every state) is also
//!   replayed by a kernel loop mount: same promise checks, the same namespace as ubtrfs's
//!   replay, and `btrfs check` clean afterwards.
//!
//! Knobs: `UBTRFS_CRASH_SUBSETS` (random subsets per large epoch, default 4),
//! `UBTRFS_CRASH_KERNEL=all`, `UBTRFS_CRASH_ONLY=<workload name part>`, `UBTRFS_CRASH_ROUNDS`
//! (fsyncs per thread of the concurrent workload, default 4), `UBTRFS_CRASH_NO_SHRINKER` (to
//! tell a shrinker-dependent failure from others). A failing state's image is kept under
//! `$TMPDIR/ubtrfs-crash-failed/`.
//!
//! The checks do not depend on whether an fsync used the log or fell back to a full commit.
//! Direct I/O and O_DSYNC go through `direct_io::btrfs_do_write_iter` as the FUSE daemon's
//! writes do: a direct write to a checksummed file falls back to buffered + writeback; one to
//! a NOCOW file stays direct and, with O_DSYNC, fsyncs under its inode lock (a checkpoint is
//! taken right after that inner fsync, before the ordinary one of `generic_write_sync`).

mod common;

use common::oracle::{mkfs_btrfs, pattern};
use common::{Rng, TestDir};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use ubtrfs_ctree::BlockDevice;
use ubtrfs_fs::dir_item::Target;
use ubtrfs_fs::inode::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use ubtrfs_fs::{FsInfo, MountOptions};

/// Whether a directory fsync goes through `btrfs_sync_file` (the kernel's fsyncdir, where
/// directory logging lands) or, as the daemon's fsyncdir does until then, a full commit.
const DIR_FSYNC_LOGS: bool = true;

const IMAGE_SIZE: u64 = 256 << 20;
const SECTOR: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Devices

#[derive(Debug)]
enum Op {
    Write { off: u64, data: Vec<u8> },
    Flush,
}

/// Writes through to an image file and records every write and flush in issue order.
#[derive(Debug)]
struct Recorder {
    file: File,
    ops: Mutex<Vec<Op>>,
}

impl BlockDevice for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        // The lock orders the record as the writes completed.
        let mut ops = self.ops.lock();
        self.file.write_all_at(buf, offset)?;
        ops.push(Op::Write {
            off: offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.ops.lock().push(Op::Flush);
        Ok(())
    }
}

impl Recorder {
    fn pos(&self) -> usize {
        self.ops.lock().len()
    }
}

/// A scratch copy-on-write view of an image: reads fall through to the file, writes stay in
/// memory (ubtrfs's read-write replay of a crash state must not change the state).
#[derive(Debug)]
struct Overlay {
    base: File,
    sectors: Mutex<HashMap<u64, Vec<u8>>>,
}

impl Overlay {
    fn new(img: &Path) -> Arc<Overlay> {
        Arc::new(Overlay {
            base: File::open(img).unwrap(),
            sectors: Mutex::new(HashMap::new()),
        })
    }

    /// Write the overlay's changes into `img` (a copy of the base).
    fn materialize(&self, img: &Path) {
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        for (s, data) in self.sectors.lock().iter() {
            f.write_all_at(data, s * SECTOR).unwrap();
        }
    }
}

impl BlockDevice for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let map = self.sectors.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (s, within) = (pos / SECTOR, (pos % SECTOR) as usize);
            let n = (SECTOR as usize - within).min(buf.len() - done);
            match map.get(&s) {
                Some(d) => buf[done..done + n].copy_from_slice(&d[within..within + n]),
                None => self.base.read_exact_at(&mut buf[done..done + n], pos)?,
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut map = self.sectors.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (s, within) = (pos / SECTOR, (pos % SECTOR) as usize);
            let n = (SECTOR as usize - within).min(buf.len() - done);
            let d = match map.entry(s) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let mut d = vec![0u8; SECTOR as usize];
                    self.base.read_exact_at(&mut d, s * SECTOR)?;
                    e.insert(d)
                }
            };
            d[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Namespace snapshots

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    ino: u64,
    /// S_IFMT bits.
    kind: u32,
    perm: u32,
    nlink: u32,
    /// File size (0 for directories: their i_size is btrfs check's business).
    size: u64,
    /// File content or symlink target.
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// A regular file with NODATACOW (`lsattr` C): its overwrites may go in place.
    nocow: bool,
}

impl Node {
    fn name_level(&self) -> (u64, u32) {
        (self.ino, self.kind)
    }
    fn describe(n: Option<&Node>) -> String {
        match n {
            None => "absent".into(),
            Some(n) => format!(
                "ino {} kind {:o} perm {:o} nlink {} size {} data#{:016x}{} xattrs {:?}",
                n.ino,
                n.kind,
                n.perm,
                n.nlink,
                n.size,
                hash(&n.data),
                if n.nocow { " nocow" } else { "" },
                n.xattrs
                    .iter()
                    .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), v.len()))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

fn hash(d: &[u8]) -> u64 {
    d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

type Snap = BTreeMap<String, Node>;

/// Everything below the mount root of `fs`, through the library.
fn snapshot_ubtrfs(fs: &FsInfo) -> Result<Snap, String> {
    let root = fs.mount_root;
    let dirid = fs.root(root).map_err(|e| e.to_string())?.item.root_dirid;
    let mut out = Snap::new();
    let mut stack = vec![(dirid, String::new(), 0usize)];
    while let Some((dir, path, depth)) = stack.pop() {
        if depth > 16 {
            return Err(format!("{path}: too deep"));
        }
        let mut start = 0;
        loop {
            let ents = ubtrfs_fs::dir_item::readdir(fs, root, dir, start, 64)
                .map_err(|e| format!("readdir {path:?}: {e}"))?;
            if ents.is_empty() {
                break;
            }
            for e in &ents {
                start = e.index + 1;
                let name = String::from_utf8_lossy(&e.name).into_owned();
                let p = if path.is_empty() {
                    name
                } else {
                    format!("{path}/{name}")
                };
                let Target::Inode { ino, .. } = e.target else {
                    return Err(format!("{p}: subvolume entry"));
                };
                let node = node_ubtrfs(fs, root, ino).map_err(|e| format!("{p}: {e}"))?;
                if node.kind == S_IFDIR {
                    stack.push((ino, p.clone(), depth + 1));
                }
                out.insert(p, node);
            }
        }
    }
    Ok(out)
}

fn node_ubtrfs(fs: &FsInfo, root: u64, ino: u64) -> ubtrfs_fs::Result<Node> {
    let mut ii = ubtrfs_fs::inode::read_inode(fs, root, ino)?;
    ubtrfs_fs::file_write::live_attrs(fs, root, ino, &mut ii);
    let kind = ii.mode & S_IFMT;
    let data = match kind {
        S_IFREG => {
            let emi = fs.ems.inode(root, ino);
            let mut v = Vec::new();
            while (v.len() as u64) < ii.size {
                let chunk =
                    ubtrfs_fs::file::read(fs, root, ino, &ii, &emi, v.len() as u64, 1 << 20)?;
                if chunk.is_empty() {
                    break;
                }
                v.extend_from_slice(&chunk);
            }
            v
        }
        S_IFLNK => ubtrfs_fs::file::readlink(fs, root, ino, &ii)?,
        _ => Vec::new(),
    };
    let mut xattrs = BTreeMap::new();
    for n in ubtrfs_fs::xattr::list(fs, root, ino)? {
        let v = ubtrfs_fs::xattr::get(fs, root, ino, &n)?;
        xattrs.insert(n, v);
    }
    Ok(Node {
        ino,
        kind,
        perm: ii.mode & 0o7777,
        nlink: ii.nlink,
        size: if kind == S_IFDIR { 0 } else { ii.size },
        data,
        xattrs,
        nocow: kind == S_IFREG && ii.flags & ubtrfs_format::items::inode_flags::NODATACOW != 0,
    })
}

/// Everything below a kernel mount point, through the VFS.
fn snapshot_kernel(dir: &Path) -> Result<Snap, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Snap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, path)) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("readdir {path:?}: {e}"))? {
            let e = e.map_err(|e| e.to_string())?;
            let name = e.file_name().to_string_lossy().into_owned();
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            let fp = e.path();
            let md = std::fs::symlink_metadata(&fp).map_err(|e| format!("{p}: {e}"))?;
            let kind = md.mode() & S_IFMT;
            let data = match kind {
                S_IFREG => std::fs::read(&fp).map_err(|e| format!("{p}: {e}"))?,
                S_IFLNK => {
                    use std::os::unix::ffi::OsStrExt;
                    std::fs::read_link(&fp)
                        .map_err(|e| format!("{p}: {e}"))?
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }
                _ => Vec::new(),
            };
            if kind == S_IFDIR {
                stack.push((fp.clone(), p.clone()));
            }
            out.insert(
                p,
                Node {
                    ino: md.ino(),
                    kind,
                    perm: md.mode() & 0o7777,
                    nlink: md.nlink() as u32,
                    size: if kind == S_IFDIR { 0 } else { md.size() },
                    data,
                    xattrs: kernel_xattrs(&fp)?,
                    nocow: kind == S_IFREG && kernel_nocow(&fp)?,
                },
            );
        }
    }
    Ok(out)
}

/// Whether the regular file `p` has NODATACOW, with `lsattr` (the C attribute).
fn kernel_nocow(p: &Path) -> Result<bool, String> {
    let out = Command::new("lsattr")
        .arg(p)
        .output()
        .map_err(|e| format!("lsattr: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "lsattr {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text
        .split_whitespace()
        .next()
        .is_some_and(|attrs| attrs.contains('C')))
}

/// Whether `got`, a NODATACOW file, is one of the permitted states `fulls` as in-place writes
/// leave them: the metadata (size included) of one of them, and each sector of its data that
/// of one of them (an overwrite reaches the disk before the metadata that goes with it, and
/// sector by sector).
fn nocow_mix_of(got: &Node, fulls: &[Option<&Node>]) -> bool {
    const SECTOR: usize = 4096;
    let same_meta = |m: &Node| {
        Node {
            data: got.data.clone(),
            ..m.clone()
        } == *got
    };
    got.nocow
        && fulls.iter().flatten().any(|m| same_meta(m))
        && (0..got.data.len()).step_by(SECTOR).all(|s| {
            let e = (s + SECTOR).min(got.data.len());
            fulls
                .iter()
                .flatten()
                .any(|f| f.data.get(s..e) == Some(&got.data[s..e]))
        })
}

/// The xattrs of `p` (not following symlinks), with `getfattr`.
fn kernel_xattrs(p: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let out = Command::new("getfattr")
        .args(["--absolute-names", "-h", "-d", "-m", "-", "-e", "hex"])
        .arg(p)
        .output()
        .map_err(|e| format!("getfattr: {e}"))?;
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let hex = v.trim_start_matches("0x");
        let bytes = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| format!("getfattr value {v}: {e}"))?;
        m.insert(k.as_bytes().to_vec(), bytes);
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Workloads and checkpoints

#[derive(Clone, Debug, Default)]
struct Promise {
    all: bool,
    /// Paths promised in full.
    full: BTreeSet<String>,
    /// Paths promised by name (which inode, if any, the name leads to).
    names: BTreeSet<String>,
    /// Old names the kernel's log may bring back, with the inode they led to: a directory
    /// fsync logs an entry renamed into it from another directory with its new name only
    /// (LOG_INODE_EXISTS, old parents not logged), so replay may show the inode under its
    /// old name too, and its link count counting both (the default, without
    /// `log_rename_unlink`).
    stale: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Checkpoint {
    pos: usize,
    label: String,
    promise: Promise,
    snap: Snap,
    /// The snapshot holds only some paths (concurrent workloads): the others are unknown here,
    /// not absent.
    partial: bool,
}

/// A workload running on a recorded filesystem.
struct Work {
    fs: Arc<FsInfo>,
    /// None while the setup runs (not recorded).
    rec: Option<Arc<Recorder>>,
    root: u64,
    cps: Vec<Checkpoint>,
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        commit_interval: 3600,
        ..MountOptions::default()
    }
}

fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path),
    }
}

fn ancestors(path: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut p = path;
    while let Some((d, _)) = p.rsplit_once('/') {
        v.push(d.to_string());
        p = d;
    }
    v
}

impl Work {
    fn ino(&self, path: &str) -> u64 {
        let mut ino = self.fs.root(self.root).unwrap().item.root_dirid;
        if path.is_empty() {
            return ino;
        }
        for c in path.split('/') {
            match ubtrfs_fs::dir_item::lookup(&self.fs, self.root, ino, c.as_bytes())
                .unwrap_or_else(|e| panic!("lookup {path}: {e}"))
            {
                Target::Inode { ino: i, .. } => ino = i,
                t => panic!("{path}: {t:?}"),
            }
        }
        ino
    }

    fn create(&self, path: &str, content: &[u8]) -> u64 {
        let (d, n) = split(path);
        let (ino, _) = ubtrfs_fs::inode::btrfs_new_inode(
            &self.fs,
            self.root,
            self.ino(d),
            n.as_bytes(),
            S_IFREG | 0o644,
            0,
            0,
            0,
        )
        .unwrap();
        if !content.is_empty() {
            self.write(path, 0, content);
        }
        ino
    }

    fn mkdir(&self, path: &str) {
        let (d, n) = split(path);
        ubtrfs_fs::inode::btrfs_new_inode(
            &self.fs,
            self.root,
            self.ino(d),
            n.as_bytes(),
            S_IFDIR | 0o755,
            0,
            0,
            0,
        )
        .unwrap();
    }

    fn write(&self, path: &str, off: u64, data: &[u8]) {
        ubtrfs_fs::file_write::btrfs_buffered_write(&self.fs, self.root, self.ino(path), off, data)
            .unwrap();
    }

    fn nocow_bytes(&self) -> u64 {
        self.fs
            .counters
            .nocow_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn prealloc_written_bytes(&self) -> u64 {
        self.fs
            .counters
            .prealloc_written_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn writeback(&self, path: &str) {
        ubtrfs_fs::file_write::btrfs_writeback(&self.fs, self.root, self.ino(path)).unwrap();
    }

    fn truncate(&self, path: &str, size: u64) {
        let attrs = ubtrfs_fs::inode::SetAttr {
            size: Some(size),
            ..Default::default()
        };
        ubtrfs_fs::inode::btrfs_setattr(&self.fs, self.root, self.ino(path), &attrs).unwrap();
    }

    fn fallocate(&self, path: &str, mode: u32, off: u64, len: u64) {
        ubtrfs_fs::file_write::btrfs_fallocate(&self.fs, self.root, self.ino(path), mode, off, len)
            .unwrap();
    }

    fn link(&self, from: &str, to: &str) {
        let (d, n) = split(to);
        ubtrfs_fs::inode::btrfs_link(
            &self.fs,
            self.root,
            self.ino(from),
            self.ino(d),
            n.as_bytes(),
        )
        .unwrap();
    }

    fn unlink(&self, path: &str) {
        let (d, n) = split(path);
        ubtrfs_fs::inode::btrfs_unlink(&self.fs, self.root, self.ino(d), n.as_bytes()).unwrap();
    }

    fn rename(&self, from: &str, to: &str) {
        let (fd, fname) = split(from);
        let (td, tname) = split(to);
        ubtrfs_fs::inode::btrfs_rename(
            &self.fs,
            self.root,
            self.ino(fd),
            fname.as_bytes(),
            self.ino(td),
            tname.as_bytes(),
            0,
        )
        .unwrap();
    }

    fn symlink(&self, path: &str, target: &str) {
        let (d, n) = split(path);
        ubtrfs_fs::inode::btrfs_symlink(
            &self.fs,
            self.root,
            self.ino(d),
            n.as_bytes(),
            target.as_bytes(),
            0,
            0,
        )
        .unwrap();
    }

    fn setxattr(&self, path: &str, name: &str, value: &[u8]) {
        ubtrfs_fs::xattr::btrfs_setxattr(
            &self.fs,
            self.root,
            self.ino(path),
            name.as_bytes(),
            value,
            0,
        )
        .unwrap();
    }

    fn removexattr(&self, path: &str, name: &str) {
        ubtrfs_fs::xattr::btrfs_removexattr(&self.fs, self.root, self.ino(path), name.as_bytes())
            .unwrap();
    }

    /// A transaction commit (`sync`): everything is promised.
    fn commit(&mut self) {
        self.fs.sync().unwrap();
        self.checkpoint(
            "sync".into(),
            Promise {
                all: true,
                ..Promise::default()
            },
        );
    }

    fn rename_exchange(&self, a: &str, b: &str) {
        let (ad, an) = split(a);
        let (bd, bn) = split(b);
        ubtrfs_fs::inode::btrfs_rename(
            &self.fs,
            self.root,
            self.ino(ad),
            an.as_bytes(),
            self.ino(bd),
            bn.as_bytes(),
            ubtrfs_fs::inode::RENAME_EXCHANGE,
        )
        .unwrap();
    }

    fn checkpoint(&mut self, label: String, promise: Promise) {
        let pos = self.rec.as_ref().expect("recorded workload").pos();
        let snap = snapshot_ubtrfs(&self.fs).unwrap();
        self.cps.push(Checkpoint {
            pos,
            label,
            promise,
            snap,
            partial: false,
        });
    }

    /// fsync of a file (`btrfs_sync_file`): the inode in full under every name it has, the
    /// names it had before (they must be gone), and its ancestors' names.
    fn fsync(&mut self, path: &str) {
        let ino = self.ino(path);
        self.synced(path, "fsync", |fs, root| {
            ubtrfs_fs::tree_log::btrfs_sync_file(fs, root, ino).unwrap()
        });
    }

    /// A write through `btrfs_do_write_iter` with O_DIRECT and/or O_DSYNC. An O_DSYNC write
    /// promises the file as an fsync does, once after the direct write's own fsync (run under
    /// its inode lock) and again after the ordinary one of `generic_write_sync`.
    fn write_flags(&mut self, path: &str, off: u64, data: &[u8], direct: bool, dsync: bool) {
        let ino = self.ino(path);
        let flags = ubtrfs_fs::direct_io::WriteFlags { direct, dsync };
        let o = ubtrfs_fs::direct_io::btrfs_file_write(
            &self.fs,
            self.root,
            ino,
            off,
            data,
            flags,
            || Ok(()),
        )
        .unwrap();
        assert_eq!(o.written, data.len());
        if let Some(out) = o.dio_sync {
            self.synced(path, &format!("{:?} write's fsync", o.path), |_, _| out);
        }
        if dsync {
            self.synced(path, "generic_write_sync", |fs, root| {
                ubtrfs_fs::tree_log::btrfs_sync_file(fs, root, ino).unwrap()
            });
        }
    }

    /// Run `sync`, which makes the file at `path` durable as fsync does, and take the
    /// checkpoint of that promise.
    fn synced(
        &mut self,
        path: &str,
        what: &str,
        sync: impl FnOnce(&FsInfo, u64) -> ubtrfs_fs::tree_log::SyncOutcome,
    ) {
        let ino = self.ino(path);
        let full = || {
            self.fs
                .counters
                .fsync_full
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let full_before = full();
        let out = sync(&self.fs, self.root);
        let how = if full() > full_before {
            ", full path"
        } else {
            ""
        };
        let now = snapshot_ubtrfs(&self.fs).unwrap();
        // Directories as the last full commit left them (inode -> path).
        let committed: HashMap<u64, &str> = self
            .cps
            .iter()
            .rev()
            .find(|c| c.promise.all)
            .expect("the base is a commit")
            .snap
            .iter()
            .filter(|(_, n)| n.kind == S_IFDIR)
            .map(|(q, n)| (n.ino, q.as_str()))
            .collect();
        // A file fsync logs the file's names and its new ancestors (log_all_new_ancestors), not
        // the rename of an ancestor that existed at the last commit (the kernel does not either:
        // its inode is unchanged). Paths through such a moved ancestor promise nothing.
        let moved = |snap: &Snap, q: &str| {
            ancestors(q).iter().any(|a| {
                let Some(n) = snap.get(a) else { return true };
                let now_path = now.iter().find(|(_, m)| m.ino == n.ino).map(|(p, _)| p);
                committed.get(&n.ino).is_some_and(|c| *c != a.as_str())
                    || now_path.is_some_and(|p| p != a)
            })
        };
        let mut p = Promise::default();
        for (q, n) in &now {
            if n.ino == ino && !moved(&now, q) {
                p.full.insert(q.clone());
                p.names.extend(ancestors(q));
            }
        }
        for cp in &self.cps {
            for (q, n) in &cp.snap {
                if n.ino == ino && !p.full.contains(q) && !moved(&cp.snap, q) {
                    p.names.insert(q.clone());
                }
            }
        }
        self.checkpoint(format!("{what} {path} ({out:?}{how})"), p);
    }

    /// fsync of a directory: the names of its entries, present and removed.
    fn fsync_dir(&mut self, path: &str) {
        let ino = self.ino(path);
        let out = if DIR_FSYNC_LOGS {
            format!(
                "{:?}",
                ubtrfs_fs::tree_log::btrfs_sync_file(&self.fs, self.root, ino).unwrap()
            )
        } else {
            self.fs.commit().unwrap();
            "commit".to_string()
        };
        let now = snapshot_ubtrfs(&self.fs).unwrap();
        let mut p = Promise::default();
        let child = |q: &str| split(q).0 == path;
        p.names.extend(now.keys().filter(|q| child(q)).cloned());
        for cp in &self.cps {
            p.names.extend(cp.snap.keys().filter(|q| child(q)).cloned());
        }
        p.names.extend(ancestors(&format!("{path}/x")));
        p.names.remove("");
        // Entries renamed into the directory from another one: their old names may come back.
        for n in now.iter().filter(|(q, _)| child(q)).map(|(_, n)| n) {
            for cp in &self.cps {
                for (q, m) in &cp.snap {
                    if m.ino == n.ino && !child(q) && now.get(q).is_none_or(|x| x.ino != n.ino) {
                        p.stale.insert(q.clone(), n.ino);
                    }
                }
            }
        }
        self.checkpoint(format!("fsync dir {path:?} ({out})"), p);
    }
}

// ---------------------------------------------------------------------------------------------
// Crash states

/// The record of one workload, ready for enumeration.
struct Recorded {
    name: String,
    dir: TestDir,
    base: PathBuf,
    ops: Vec<Op>,
    cps: Vec<Checkpoint>,
    /// Keep the image of a failing state (not for the harness's self-test).
    keep_failed: bool,
}

/// Make a base image with the common setup committed, run `work` on it through the recorder.
fn record(name: &str, work: impl FnOnce(&mut Work)) -> Recorded {
    record_with(name, setup, work)
}

/// [`record`] with another committed starting point.
fn record_with(name: &str, setup: fn(&Work), work: impl FnOnce(&mut Work)) -> Recorded {
    let dir = TestDir::new(&format!("crash-{name}"));
    let base = dir.join("base.img");
    mkfs_btrfs(&base, IMAGE_SIZE, &[]);
    {
        let fs = FsInfo::open(&base, rw()).unwrap();
        let w = Work {
            root: fs.mount_root,
            fs,
            rec: None,
            cps: Vec::new(),
        };
        setup(&w);
        w.fs.sync().unwrap();
    }
    let live = dir.join("live.img");
    cp_sparse(&base, &live);
    let rec = Arc::new(Recorder {
        file: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&live)
            .unwrap(),
        ops: Mutex::new(Vec::new()),
    });
    let fs = FsInfo::open_backend(rec.clone(), IMAGE_SIZE, &live, rw()).unwrap();
    let mut w = Work {
        root: fs.mount_root,
        fs,
        rec: Some(rec.clone()),
        cps: Vec::new(),
    };
    // The base: committed, everything promised.
    w.checkpoint(
        "base".into(),
        Promise {
            all: true,
            ..Promise::default()
        },
    );
    work(&mut w);
    // Power cut: the filesystem is dropped without unmounting.
    let cps = std::mem::take(&mut w.cps);
    drop(w);
    let ops = std::mem::take(&mut *rec.ops.lock());
    Recorded {
        name: name.to_string(),
        dir,
        base,
        ops,
        cps,
        keep_failed: true,
    }
}

/// The committed starting point of every workload.
fn setup(w: &Work) {
    w.mkdir("A");
    w.mkdir("B");
    w.create("A/foo", &pattern(1, 64 << 10));
    w.create("A/bar", &pattern(2, 3000));
    w.create("big", &pattern(3, 300_000));
    w.setxattr("big", "user.k", b"v1");
    // chattr +C on the empty file: NODATACOW and NODATASUM, so direct writes stay direct.
    let nocow = w.create("A/nocow", b"");
    ubtrfs_fs::fileattr::btrfs_fileattr_set(
        &w.fs,
        w.root,
        nocow,
        ubtrfs_fs::fileattr::FileAttrSet::Flags(0x0080_0000),
    )
    .unwrap();
    w.write("A/nocow", 0, &pattern(4, 64 << 10));
}

fn cp_sparse(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

fn apply(img: &File, ops: &[Op], which: impl Iterator<Item = usize>) {
    for i in which {
        if let Op::Write { off, data } = &ops[i] {
            img.write_all_at(data, *off).unwrap();
        }
    }
}

/// `btrfs check --readonly`: Ok, or its output.
fn check_image(img: &Path) -> Result<(), String> {
    let out = Command::new("btrfs")
        .args(["check", "--readonly"])
        .arg(img)
        .output()
        .map_err(|e| format!("running btrfs check: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("ERROR") && text.contains("no error found") {
        Ok(())
    } else {
        Err(format!("btrfs check failed:\n{text}"))
    }
}

/// Check a recovered namespace against the checkpoints promised by a crash at position `t`
/// (every checkpoint with pos <= t).
fn check_promises(cps: &[Checkpoint], t: usize, got: &Snap) -> Result<(), String> {
    let durable: Vec<usize> = (0..cps.len()).filter(|&i| cps[i].pos <= t).collect();
    // Inodes that may show an old name back (Promise::stale), and those names: allowed by
    // any sync, returned or in flight (its log may be durable before it returns).
    let stale: BTreeMap<&String, u64> = cps
        .iter()
        .flat_map(|c| c.promise.stale.iter())
        .map(|(p, &i)| (p, i))
        .collect();
    let stale_inos: BTreeSet<u64> = stale.values().copied().collect();
    // Compared without the link count for those inodes (it counts the old name).
    let same = |a: Option<&Node>, b: Option<&Node>| match (a, b) {
        (Some(a), Some(b)) if stale_inos.contains(&a.ino) => {
            Node {
                nlink: 0,
                ..a.clone()
            } == Node {
                nlink: 0,
                ..b.clone()
            }
        }
        _ => a == b,
    };
    let mut paths: BTreeSet<&String> = got.keys().collect();
    for cp in cps {
        paths.extend(cp.snap.keys());
    }
    let mut errs = Vec::new();
    for p in paths {
        let known = |i: usize| !cps[i].partial || cps[i].snap.contains_key(p);
        let covers_full =
            |i: usize| known(i) && (cps[i].promise.all || cps[i].promise.full.contains(p));
        let covers_name = |i: usize| covers_full(i) || cps[i].promise.names.contains(p);
        let j_full = *durable
            .iter()
            .rev()
            .find(|&&i| covers_full(i))
            .expect("base");
        let j_name = *durable
            .iter()
            .rev()
            .find(|&&i| covers_name(i))
            .expect("base");
        let g = got.get(p);
        if g.is_some_and(|g| stale.get(p) == Some(&g.ino)) {
            continue; // an old name of a renamed inode, back as the kernel's log allows
        }
        let names: Vec<Option<(u64, u32)>> = (j_name..cps.len())
            .filter(|&i| known(i))
            .map(|i| cps[i].snap.get(p).map(Node::name_level))
            .collect();
        if !names.contains(&g.map(Node::name_level)) {
            errs.push(format!(
                "{p}: is {} but since checkpoint {j_name} ({}) it was only {:?}",
                Node::describe(g),
                cps[j_name].label,
                names
            ));
            continue;
        }
        // Content is promised unless a later name-only promise (a directory fsync, which logs
        // the inode as existing only) covered the path after its content changed.
        let full_at_j = cps[j_full].snap.get(p);
        let name_only_later = (j_full + 1..cps.len())
            .any(|m| !covers_full(m) && covers_name(m) && !same(cps[m].snap.get(p), full_at_j));
        if name_only_later {
            continue;
        }
        let fulls: Vec<Option<&Node>> = (j_full..cps.len())
            .filter(|&i| known(i))
            .map(|i| cps[i].snap.get(p))
            .collect();
        if !fulls.iter().any(|f| same(*f, g)) && !g.is_some_and(|n| nocow_mix_of(n, &fulls)) {
            errs.push(format!(
                "{p}: is {} but since checkpoint {j_full} ({}) it was only [{}]",
                Node::describe(g),
                cps[j_full].label,
                fulls
                    .iter()
                    .map(|n| Node::describe(*n))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// How many random subsets per epoch beyond the exhaustive ones.
fn subsets_per_epoch() -> usize {
    std::env::var("UBTRFS_CRASH_SUBSETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// Epochs up to this many writes are enumerated exhaustively.
const EXHAUSTIVE_WRITES: usize = 4;

#[derive(Default, Debug)]
struct Tally {
    states: usize,
    kernel: usize,
}

/// Enumerate and check the crash states of a recorded workload; the failures, if any.
fn check_states(r: &Recorded, seed: u64) -> (Tally, Option<String>) {
    let mut tally = Tally::default();
    let flushes: Vec<usize> = (0..r.ops.len())
        .filter(|&i| matches!(r.ops[i], Op::Flush))
        .collect();
    let prefix = r.dir.join("prefix.img");
    cp_sparse(&r.base, &prefix);
    let prefix_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&prefix)
        .unwrap();
    let kernel_all = std::env::var("UBTRFS_CRASH_KERNEL").as_deref() == Ok("all");
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let nflush = flushes.len();
    // Which states the kernel replays: the last flush point, and one random other.
    let kernel_pick = (nflush, rng.index(nflush + 1));
    for k in 0..=nflush {
        let start = if k == 0 { 0 } else { flushes[k - 1] + 1 };
        let end = flushes.get(k).copied().unwrap_or(r.ops.len());
        // The crash happens just before flush k+1: everything returned before it was promised.
        let t = end;
        let writes: Vec<usize> = (start..end).collect();
        let mut subsets: Vec<Vec<usize>> = Vec::new();
        if writes.len() <= EXHAUSTIVE_WRITES {
            for mask in 0u32..(1 << writes.len()) {
                subsets.push(
                    (0..writes.len())
                        .filter(|b| mask & (1 << b) != 0)
                        .map(|b| writes[b])
                        .collect(),
                );
            }
        } else {
            subsets.push(Vec::new());
            subsets.push(writes.clone());
            for _ in 0..subsets_per_epoch() {
                let s: Vec<usize> = writes
                    .iter()
                    .copied()
                    .filter(|_| rng.chance(1, 2))
                    .collect();
                if !subsets.contains(&s) {
                    subsets.push(s);
                }
            }
        }
        for (si, s) in subsets.iter().enumerate() {
            let id = format!(
                "{}: flush point {k}/{nflush} + {} of {} writes {:?}",
                r.name,
                s.len(),
                writes.len(),
                s
            );
            let img = r.dir.join("state.img");
            let _ = std::fs::remove_file(&img);
            cp_sparse(&prefix, &img);
            {
                let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
                apply(&f, &r.ops, s.iter().copied());
            }
            let with_kernel = kernel_all || (si == 0 && (k == kernel_pick.0 || k == kernel_pick.1));
            if let Err(e) = check_one(r, &img, t, with_kernel) {
                if r.keep_failed {
                    // Keep the crash image for a post-mortem (TestDir removes the rest).
                    let keep = std::env::temp_dir()
                        .join("ubtrfs-crash-failed")
                        .join(format!(
                            "{}-{}-{}.img",
                            r.name,
                            std::process::id(),
                            tally.states
                        ));
                    let _ = std::fs::create_dir_all(keep.parent().expect("has a parent"));
                    cp_sparse(&img, &keep);
                    failures.push(format!("{id} (image kept: {})\n{e}", keep.display()));
                } else {
                    failures.push(format!("{id}\n{e}"));
                }
            }
            tally.states += 1;
            tally.kernel += usize::from(with_kernel);
        }
        // Advance to flush point k+1.
        apply(&prefix_file, &r.ops, start..end);
    }
    if failures.is_empty() {
        return (tally, None);
    }
    let msg = format!(
        "{} of {} crash states failed (checkpoints: {}):\n{}",
        failures.len(),
        tally.states,
        r.cps
            .iter()
            .enumerate()
            .map(|(i, c)| format!("#{i} {} @{}", c.label, c.pos))
            .collect::<Vec<_>>()
            .join(", "),
        failures.join("\n\n")
    );
    (tally, Some(msg))
}

/// A kernel loop mount, unmounted and detached on drop even when the test fails. The unmount
/// is retried: under load a plain umount sometimes fails with EBUSY right after the walk, and
/// the mount and its loop device would outlive the test. Retries for up to 10 s, then detaches
/// lazily.
struct KMount {
    dir: PathBuf,
    dev: String,
}

impl KMount {
    fn new(img: &Path, dir: &Path) -> Result<KMount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(img)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let m = KMount {
            dir: dir.to_path_buf(),
            dev,
        };
        let out = Command::new("mount")
            .args(["-o", "rw", &m.dev])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "kernel mount of {} failed: {}",
                img.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(m)
    }

    fn mounted(&self) -> bool {
        let dir = self.dir.to_string_lossy();
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(&*dir)))
            .unwrap_or(false)
    }
}

impl Drop for KMount {
    fn drop(&mut self) {
        for i in 0..100 {
            if !self.mounted() {
                break;
            }
            if let Ok(o) = Command::new("umount").arg(&self.dir).output() {
                if !o.status.success() && i == 0 {
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "umount {}: {} (retrying)",
                        self.dir.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
            }
            if self.mounted() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        if self.mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// Wait (bounded) until no loop device holds `img`: `losetup -d` detaches asynchronously, and
/// btrfs check refuses an image a loop device still holds.
fn wait_loop_detached(img: &Path) -> Result<(), String> {
    for _ in 0..200 {
        let out = Command::new("losetup")
            .arg("-j")
            .arg(img)
            .output()
            .map_err(|e| format!("losetup -j: {e}"))?;
        if out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(format!(
        "{}: loop device still attached after 10 s",
        img.display()
    ))
}

/// Check one crash image.
fn check_one(r: &Recorded, img: &Path, t: usize, with_kernel: bool) -> Result<(), String> {
    check_image(img).map_err(|e| format!("crash image: {e}"))?;
    // ubtrfs: read-write replay into a scratch overlay.
    let ov = Overlay::new(img);
    let got = {
        let fs = FsInfo::open_backend(ov.clone(), IMAGE_SIZE, img, rw())
            .map_err(|e| format!("ubtrfs open: {e}"))?;
        let got = snapshot_ubtrfs(&fs).map_err(|e| format!("ubtrfs walk: {e}"))?;
        check_promises(&r.cps, t, &got).map_err(|e| format!("ubtrfs replay:\n{e}"))?;
        got
    };
    // A read-only mount replays in memory: the same namespace, and nothing written.
    {
        let ro = Overlay::new(img);
        let fs = FsInfo::open_backend(ro.clone(), IMAGE_SIZE, img, MountOptions::default())
            .map_err(|e| format!("ubtrfs read-only open: {e}"))?;
        let ro_snap = snapshot_ubtrfs(&fs).map_err(|e| format!("ubtrfs ro walk: {e}"))?;
        if ro_snap != got {
            return Err("ubtrfs read-only replay differs from the read-write one".into());
        }
        let written = ro.sectors.lock().len();
        if written != 0 {
            return Err(format!("ubtrfs read-only mount wrote {written} sectors"));
        }
    }
    // The replay committed: a read-only reopen shows the same.
    {
        let fs = FsInfo::open_backend(ov.clone(), IMAGE_SIZE, img, MountOptions::default())
            .map_err(|e| format!("ubtrfs reopen: {e}"))?;
        if fs.sb.log_root != 0 {
            return Err("ubtrfs replay left a log_root behind".into());
        }
        let again = snapshot_ubtrfs(&fs).map_err(|e| format!("ubtrfs reopen walk: {e}"))?;
        if again != got {
            return Err("ubtrfs reopen after replay differs from the replayed state".into());
        }
    }
    // What ubtrfs's replay committed is a valid filesystem.
    let replayed = r.dir.join("ubtrfs-replayed.img");
    let _ = std::fs::remove_file(&replayed);
    cp_sparse(img, &replayed);
    ov.materialize(&replayed);
    check_image(&replayed).map_err(|e| format!("after ubtrfs replay: {e}"))?;
    if with_kernel {
        let kimg = r.dir.join("kernel.img");
        let _ = std::fs::remove_file(&kimg);
        cp_sparse(img, &kimg);
        let ksnap = {
            let m = KMount::new(&kimg, &r.dir.join("mnt"))?;
            snapshot_kernel(&m.dir).map_err(|e| format!("kernel walk: {e}"))?
        };
        wait_loop_detached(&kimg)?;
        check_promises(&r.cps, t, &ksnap).map_err(|e| format!("kernel replay:\n{e}"))?;
        if ksnap != got {
            let diff: Vec<String> = ksnap
                .keys()
                .chain(got.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|p| ksnap.get(*p) != got.get(*p))
                .map(|p| {
                    format!(
                        "{p}: kernel {} / ubtrfs {}",
                        Node::describe(ksnap.get(p)),
                        Node::describe(got.get(p))
                    )
                })
                .collect();
            return Err(format!(
                "kernel and ubtrfs replays differ:\n{}",
                diff.join("\n")
            ));
        }
        check_image(&kimg).map_err(|e| format!("after kernel replay: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The workloads

type Workload = (&'static str, fn(&mut Work));

/// CrashMonkey/ACE seq-1: one operation, then fsync of the file or of its parent directory.
fn seq1() -> Vec<Workload> {
    vec![
        ("creat-fsync", |w| {
            w.create("A/new", b"");
            w.fsync("A/new");
        }),
        ("creat-fsync-parent", |w| {
            w.create("A/new", b"");
            w.fsync_dir("A");
        }),
        ("creat-write-fsync", |w| {
            w.create("A/new", &pattern(10, 10_000));
            w.fsync("A/new");
        }),
        ("mkdir-fsync", |w| {
            w.mkdir("A/sub");
            w.fsync_dir("A/sub");
        }),
        ("mkdir-fsync-parent", |w| {
            w.mkdir("A/sub");
            w.fsync_dir("A");
        }),
        ("write-buffered", |w| {
            w.write("big", 400_000, &pattern(11, 8192));
            w.fsync("big");
        }),
        ("write-direct", |w| {
            // A checksummed file: btrfs_direct_write falls back to buffered + writeback.
            w.write_flags("A/foo", 128 << 10, &pattern(12, 16384), true, false);
            w.fsync("A/foo");
        }),
        ("write-direct-nocow", |w| {
            // Stays direct (NODATASUM, aligned); fsync afterwards.
            w.write_flags("A/nocow", 32 << 10, &pattern(18, 16384), true, false);
            w.fsync("A/nocow");
        }),
        ("write-direct-dsync", |w| {
            // O_DIRECT|O_DSYNC on a NOCOW file, extending it: the fsync under the write's
            // inode lock, then generic_write_sync's.
            w.write_flags("A/nocow", 48 << 10, &pattern(19, 32768), true, true);
        }),
        ("write-direct-dsync-fallback", |w| {
            // O_DIRECT|O_DSYNC on a checksummed file: buffered, then generic_write_sync.
            w.write_flags("big", 8192, &pattern(38, 8192), true, true);
        }),
        ("write-dsync", |w| {
            // O_DSYNC buffered: the write, then generic_write_sync's fsync of the whole file
            // (btrfs_sync_file ignores datasync).
            w.write_flags("A/bar", 3000, &pattern(13, 1000), false, true);
        }),
        ("overwrite", |w| {
            w.write("big", 16384, &pattern(14, 4096));
            w.fsync("big");
        }),
        ("overwrite-unaligned", |w| {
            w.write("A/foo", 1000, &pattern(15, 7000));
            w.fsync("A/foo");
        }),
        ("append", |w| {
            w.write("A/foo", 64 << 10, &pattern(16, 5000));
            w.fsync("A/foo");
        }),
        ("truncate-down", |w| {
            w.truncate("big", 100_001);
            w.fsync("big");
        }),
        ("truncate-up", |w| {
            w.truncate("A/bar", 200_000);
            w.fsync("A/bar");
        }),
        ("falloc-keep-size", |w| {
            w.fallocate(
                "big",
                ubtrfs_fs::file_write::FALLOC_FL_KEEP_SIZE,
                0,
                512 << 10,
            );
            w.fsync("big");
        }),
        ("falloc-extend", |w| {
            w.fallocate("A/foo", 0, 64 << 10, 64 << 10);
            w.fsync("A/foo");
        }),
        ("punch-hole", |w| {
            w.fallocate(
                "big",
                ubtrfs_fs::file_write::FALLOC_FL_PUNCH_HOLE
                    | ubtrfs_fs::file_write::FALLOC_FL_KEEP_SIZE,
                65536,
                65536,
            );
            w.fsync("big");
        }),
        ("link-fsync", |w| {
            w.link("A/foo", "B/foo2");
            w.fsync("A/foo");
        }),
        ("link-fsync-parent", |w| {
            w.link("A/foo", "B/foo2");
            w.fsync_dir("B");
        }),
        ("unlink-fsync-parent", |w| {
            w.unlink("A/bar");
            w.fsync_dir("A");
        }),
        ("rename-file", |w| {
            w.rename("A/foo", "B/foo");
            w.fsync("B/foo");
        }),
        ("rename-file-fsync-parent", |w| {
            w.rename("A/foo", "B/foo");
            w.fsync_dir("B");
        }),
        ("rename-dir", |w| {
            w.rename("A", "B/A2");
            w.fsync_dir("B");
        }),
        ("rename-over-existing", |w| {
            w.rename("A/bar", "big");
            w.fsync("big");
        }),
        ("symlink", |w| {
            w.symlink("A/ln", "../big");
            w.fsync_dir("A");
        }),
        ("setxattr", |w| {
            w.setxattr("big", "user.new", &pattern(17, 300));
            w.fsync("big");
        }),
        ("removexattr", |w| {
            w.removexattr("big", "user.k");
            w.fsync("big");
        }),
    ]
}

/// Two operations around fsync (rename, link, unlink).
fn seq2() -> Vec<Workload> {
    vec![
        ("rename-then-link", |w| {
            w.rename("A/foo", "A/foo2");
            w.link("A/foo2", "B/l");
            w.fsync("A/foo2");
        }),
        ("link-then-unlink-old", |w| {
            w.link("A/foo", "B/l");
            w.unlink("A/foo");
            w.fsync("B/l");
        }),
        ("unlink-recreate", |w| {
            w.unlink("A/bar");
            w.create("A/bar", &pattern(20, 5000));
            w.fsync("A/bar");
        }),
        ("fsync-then-rename", |w| {
            w.write("A/foo", 0, &pattern(21, 4096));
            w.fsync("A/foo");
            w.rename("A/foo", "B/foo");
            w.fsync_dir("B");
        }),
        ("rename-fsync-unlink", |w| {
            w.rename("A/foo", "A/x");
            w.fsync("A/x");
            w.unlink("A/x");
            w.fsync_dir("A");
        }),
        ("create-fsync-rename-fsync", |w| {
            w.create("A/n", &pattern(22, 20_000));
            w.fsync("A/n");
            w.rename("A/n", "B/n");
            w.fsync("B/n");
        }),
        ("overwrite-fsync-twice", |w| {
            w.write("big", 8192, &pattern(23, 8192));
            w.fsync("big");
            w.write("big", 8192, &pattern(24, 8192));
            w.fsync("big");
        }),
        ("overwrite-fsync-twice-interleaved", |w| {
            // Another file allocates between the two overwrites, so the second extent of
            // "big" does not reuse the first one's place: the first's checksums are stale in
            // the log.
            w.write("big", 8192, &pattern(28, 8192));
            w.fsync("big");
            w.write("A/foo", 0, &pattern(29, 16384));
            w.writeback("A/foo");
            w.write("big", 8192, &pattern(30, 8192));
            w.fsync("big");
        }),
        ("create-fsync-overwrite-fsync", |w| {
            w.create("A/t", &pattern(25, 40_000));
            w.fsync("A/t");
            w.write("A/t", 30_000, &pattern(26, 15_000));
            w.fsync("A/t");
            w.write("A/t", 100_000, &pattern(27, 9000));
            w.fsync("A/t");
        }),
        ("mkdir-creat-fsync-file", |w| {
            w.mkdir("A/d");
            w.create("A/d/f", &pattern(31, 6000));
            w.fsync("A/d/f");
        }),
        ("rename-over-fsync-parent", |w| {
            w.rename("A/bar", "big");
            w.fsync_dir("");
        }),
        ("unlink-one-of-two-links", |w| {
            w.link("A/foo", "B/l");
            w.commit();
            w.unlink("A/foo");
            w.fsync("B/l");
        }),
        ("rename-exchange", |w| {
            w.rename_exchange("A/foo", "A/bar");
            w.fsync("A/foo");
        }),
        ("rename-dir-fsync-inner-file", |w| {
            // The file is unchanged: fsync skips it and the directory rename is not durable;
            // the kernel does the same (checked on a 6.18 loop mount).
            w.rename("A", "B/A2");
            w.fsync("B/A2/foo");
        }),
        ("setxattr-dir", |w| {
            w.setxattr("A", "user.d", b"dir value");
            w.fsync_dir("A");
        }),
        ("truncate-down-then-append", |w| {
            w.truncate("big", 1000);
            w.write("big", 1000, &pattern(32, 5000));
            w.fsync("big");
        }),
        ("punch-then-write", |w| {
            w.fallocate(
                "big",
                ubtrfs_fs::file_write::FALLOC_FL_PUNCH_HOLE
                    | ubtrfs_fs::file_write::FALLOC_FL_KEEP_SIZE,
                65536,
                65536,
            );
            w.write("big", 70_000, &pattern(33, 4096));
            w.fsync("big");
        }),
        ("create-fsync-unlink-fsync-parent", |w| {
            w.create("A/tmp", &pattern(34, 100));
            w.fsync("A/tmp");
            w.unlink("A/tmp");
            w.fsync_dir("A");
        }),
        ("write-shrink-fsync", |w| {
            // The shrinker drops the maps in between: fsync takes the full path.
            w.write("big", 200_000, &pattern(35, 12_000));
            w.writeback("big");
            w.fs.ems.btrfs_free_cached_objects(u64::MAX);
            w.fsync("big");
        }),
        ("write-fsync-shrink-write-fsync", |w| {
            w.write("A/foo", 4096, &pattern(36, 8192));
            w.fsync("A/foo");
            w.fs.ems.btrfs_free_cached_objects(u64::MAX);
            w.write("A/foo", 40_000, &pattern(37, 30_000));
            w.writeback("A/foo");
            w.fs.ems.btrfs_free_cached_objects(u64::MAX);
            w.fsync("A/foo");
        }),
        ("link-fsync-unlink-fsync", |w| {
            w.link("big", "A/big2");
            w.fsync("big");
            w.unlink("big");
            w.fsync("A/big2");
        }),
    ]
}

/// Several threads write and fsync their own files while the extent-map shrinker runs hard.
fn concurrent(w: &mut Work) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const THREADS: usize = 4;
    let rounds: u64 = std::env::var("UBTRFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let cps = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let scans = AtomicU64::new(0);
    let start = std::sync::Barrier::new(THREADS);
    let wr = &*w;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if std::env::var_os("UBTRFS_CRASH_NO_SHRINKER").is_none() {
                    wr.fs.ems.btrfs_free_cached_objects(u64::MAX);
                }
                scans.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
        });
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cps, start) = (&cps, &start);
                sc.spawn(move || {
                    let path = format!("A/t{t}");
                    wr.create(&path, &pattern(100 + t as u64, 40_000));
                    start.wait();
                    let mut rng = Rng::new(t as u64);
                    for r in 0..rounds {
                        let off = rng.below(200_000);
                        let len = 1 + rng.below(20_000) as usize;
                        wr.write(&path, off, &pattern(1000 + t as u64 * 100 + r, len));
                        let ino = wr.ino(&path);
                        let out =
                            ubtrfs_fs::tree_log::btrfs_sync_file(&wr.fs, wr.root, ino).unwrap();
                        // Taken after the fsync returned: never earlier than its promise.
                        let pos = wr.rec.as_ref().expect("recorded").pos();
                        let node = node_ubtrfs(&wr.fs, wr.root, ino).unwrap();
                        cps.lock().push(Checkpoint {
                            pos,
                            label: format!("fsync {path} #{r} ({out:?})"),
                            promise: Promise {
                                full: [path.clone()].into(),
                                ..Promise::default()
                            },
                            snap: [(path.clone(), node)].into(),
                            partial: true,
                        });
                    }
                })
            })
            .collect();
        for h in writers {
            h.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(scans.load(Ordering::Relaxed) > 0, "the shrinker never ran");
    let mut v = cps.into_inner();
    v.sort_by_key(|c| c.pos);
    w.cps.extend(v);
}

fn run_set(set: &str, workloads: Vec<Workload>, only: Option<&str>) {
    run_set_with(set, setup, workloads, only)
}

fn run_set_with(set: &str, setup: fn(&Work), workloads: Vec<Workload>, only: Option<&str>) {
    let mut total = Tally::default();
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for (i, (name, f)) in workloads.into_iter().enumerate() {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let r = record_with(name, setup, f);
        let (t, failed) = check_states(&r, 0x5eed ^ (i as u64) << 8);
        if let Some(f) = failed {
            failures.push(format!("{name}: {f}"));
        }
        lines.push(format!(
            "  {name}: {} ops, {} flushes, {} crash states ({} also replayed by the kernel); {}",
            r.ops.len(),
            r.ops.iter().filter(|o| matches!(o, Op::Flush)).count(),
            t.states,
            t.kernel,
            r.cps
                .iter()
                .skip(1)
                .map(|c| c.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        total.states += t.states;
        total.kernel += t.kernel;
    }
    // Written to the process's stderr directly (print! is captured for passing tests): the
    // count shows in every CI log.
    let _ = writeln!(
        std::io::stderr().lock(),
        "crash states checked ({set}): {} ({} by the kernel too)\n{}",
        total.states,
        total.kernel,
        lines.join("\n")
    );
    assert!(total.states > 0);
    assert!(
        failures.is_empty(),
        "{} workloads failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The starting point of the in-place (NOCOW) workloads: `pre` 1 MiB preallocated (size
/// 1 MiB, checksummed), `nc` NODATACOW with 256 KiB written (one extent), `ncp` NODATACOW
/// with 256 KiB preallocated, `keep` 256 KiB preallocated past its size (KEEP_SIZE).
fn setup_nocow(w: &Work) {
    use ubtrfs_fs::fileattr::{btrfs_fileattr_set, fs_fl, FileAttrSet};
    w.create("pre", b"");
    w.fallocate("pre", 0, 0, 1 << 20);
    for name in ["nc", "ncp"] {
        let ino = w.create(name, b"");
        btrfs_fileattr_set(&w.fs, w.root, ino, FileAttrSet::Flags(fs_fl::NOCOW)).unwrap();
    }
    w.write("nc", 0, &pattern(60, 256 << 10));
    w.fallocate("ncp", 0, 0, 256 << 10);
    w.create("keep", &pattern(61, 4096));
    w.fallocate(
        "keep",
        ubtrfs_fs::file_write::FALLOC_FL_KEEP_SIZE,
        4096,
        256 << 10,
    );
}

/// Writes into preallocated extents and over a NODATACOW file's extent, each written back in
/// one piece and fsynced (the database / VM-image pattern): a crash before the fsync's log
/// reaches the disk leaves the preallocated range reading zeros or, for a NOCOW overwrite, the
/// old or the new bytes (one write each, never torn within these workloads).
fn nocow_set() -> Vec<Workload> {
    vec![
        ("prealloc-write-fsync", |w| {
            w.write("pre", 64 << 10, &pattern(62, 16384));
            w.fsync("pre");
            w.write("pre", 0, &pattern(63, 4096));
            w.fsync("pre");
            // Right after the written part at 0: merges into it.
            w.write("pre", 4096, &pattern(64, 4096));
            w.fsync("pre");
            assert_eq!(w.prealloc_written_bytes(), 24 << 10, "not written in place");
        }),
        ("prealloc-direct-dsync", |w| {
            for (i, off) in [0u64, 8192, 4096, 200 << 10].into_iter().enumerate() {
                w.write("ncp", off, &pattern(65 + i as u64, 4096));
                w.writeback("ncp");
                w.fsync("ncp");
            }
            assert_eq!(w.prealloc_written_bytes(), 16 << 10, "not written in place");
        }),
        ("nocow-overwrite-fsync", |w| {
            w.write("nc", 4096, &pattern(70, 8192));
            w.fsync("nc");
            w.write("nc", 4096, &pattern(71, 8192));
            w.fsync("nc");
            w.write("nc", 100 << 10, &pattern(72, 3000));
            w.fsync("nc");
            assert_eq!(w.nocow_bytes(), (8 + 8 + 4) << 10, "not written in place");
        }),
        ("nocow-overwrite-extend-fsync", |w| {
            // In place up to the end of the extent, a new extent after it (the file grows): a
            // crash before the fsync's log is durable may show the new bytes at the old size.
            w.write("nc", 240 << 10, &pattern(77, 32768));
            w.fsync("nc");
            assert_eq!(w.nocow_bytes(), 16 << 10, "not written in place");
        }),
        ("nocow-overwrite-commit-overwrite", |w| {
            w.write("nc", 0, &pattern(73, 65536));
            w.writeback("nc");
            w.commit();
            w.write("nc", 32768, &pattern(74, 4096));
            w.fsync("nc");
        }),
        ("prealloc-past-eof-fsync", |w| {
            w.write("keep", 8192, &pattern(75, 8192));
            w.fsync("keep");
        }),
        ("prealloc-and-hole-fsync", |w| {
            // From the end of the preallocation into the hole after EOF: NOCOW + COW pieces.
            w.write("pre", (1 << 20) - 4096, &pattern(76, 12288));
            w.fsync("pre");
        }),
    ]
}

fn only() -> Option<String> {
    std::env::var("UBTRFS_CRASH_ONLY").ok()
}

// Test scenario: each single operation of the seq-1 set on a committed tree, then fsync of the
// file or of its parent; every crash state of the record obeys what the fsync promised.
#[test]
fn crash_seq1() {
    run_set("seq-1", seq1(), only().as_deref());
}

// Test scenario: in-place writes into preallocated extents and over NODATACOW extents, each
// fsynced; every crash state obeys the promises (the kernel replays a sample too).
#[test]
fn crash_nocow() {
    run_set_with("nocow", setup_nocow, nocow_set(), only().as_deref());
}

// Test scenario: rename/link/unlink pairs around fsync; every crash state obeys the promises
// of each fsync that returned before the crash.
#[test]
fn crash_seq2() {
    run_set("seq-2", seq2(), only().as_deref());
}

// Test scenario: four threads each create a file and overwrite + fsync it a few times while a
// fifth runs the extent-map shrinker in a loop; every crash state keeps each file at (or after)
// the version of its last fsync that returned before the crash.
#[test]
fn crash_concurrent_fsync_with_shrinker() {
    run_set("concurrent", vec![("concurrent", concurrent)], None);
}

// Test scenario: the harness has teeth. The record of a logged overwrite is falsified twice:
// (a) without its flushes, so that the superblock may land before the log blocks it points to;
// (b) with the log sync's superblock write turned into a no-op, as a disk that acknowledged a
// flush and lost the write. Both must be reported as failures.
#[test]
fn crash_harness_detects_broken_ordering() {
    let w: fn(&mut Work) = |w| {
        w.write("big", 16384, &pattern(14, 4096));
        w.fsync("big");
    };
    let mut r = record("selftest", w);
    r.keep_failed = false;
    let flushes: Vec<usize> = (0..r.ops.len())
        .filter(|&i| matches!(r.ops[i], Op::Flush))
        .collect();
    assert!(flushes.len() >= 2, "a log sync or commit flushes twice");
    // (b) The last write before the last flush is the superblock: make it write what was there.
    let last = flushes[flushes.len() - 1];
    let Op::Write { off, data } = &mut r.ops[last - 1] else {
        panic!("no write before the last flush");
    };
    assert_eq!(
        *off, 65536,
        "the last write of a sync is the primary superblock"
    );
    File::open(&r.base)
        .unwrap()
        .read_exact_at(data, *off)
        .unwrap();
    let (_, failed) = check_states(&r, 1);
    let msg = failed.expect("a lost superblock write must be caught");
    assert!(msg.contains("big: is"), "{msg}");
    // (a) No flushes at all: one epoch, random subsets (seeded) of every write.
    let mut r = record("selftest-noflush", w);
    r.keep_failed = false;
    r.ops.retain(|o| !matches!(o, Op::Flush));
    // The fsync returned at the end of the record; a crash at its end promises it.
    let n = r.ops.len();
    for c in r.cps.iter_mut().skip(1) {
        c.pos = n;
    }
    let mut caught = false;
    for seed in 0..8 {
        if check_states(&r, seed).1.is_some() {
            caught = true;
            break;
        }
    }
    assert!(
        caught,
        "writes reordered across a missing flush must be caught"
    );
}

// Test scenario: one transaction, two files overwritten and fsynced in turn eight times each,
// so that every log sync COWs log blocks an earlier sync wrote and later syncs take freed ones
// again (`LogAlloc`: a block freed while log transid T was open is reused once T is durable).
// The record must show a log block address rewritten in a later flush epoch (the reuse
// happened), and every crash state, in particular those where a reused block's new contents
// landed and the next superblock did not, must obey every fsync that returned before it.
#[test]
fn crash_log_block_reuse() {
    let w: fn(&mut Work) = |w| {
        for i in 0..8u64 {
            w.write("big", i * 8192, &pattern(40 + i, 4096));
            w.fsync("big");
            w.write("A/foo", i * 4096, &pattern(60 + i, 2000));
            w.fsync("A/foo");
        }
    };
    let r = record("log-block-reuse", w);
    // Epoch of each write (number of flushes before it), per offset, superblock excluded.
    let mut epochs: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    let mut epoch = 0usize;
    for op in &r.ops {
        match op {
            Op::Flush => epoch += 1,
            Op::Write { off, .. } if *off != 65536 => {
                epochs.entry(*off).or_default().insert(epoch);
            }
            Op::Write { .. } => {}
        }
    }
    let rewritten = epochs.values().filter(|e| e.len() > 1).count();
    assert!(
        rewritten > 0,
        "no block was written in two flush epochs: log blocks were not reused"
    );
    let (t, failed) = check_states(&r, 0x10b);
    assert!(t.states > 0);
    if let Some(f) = failed {
        panic!("log-block-reuse: {f}");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "log-block-reuse: {} ops, {} addresses rewritten in a later epoch, {} crash states",
        r.ops.len(),
        rewritten,
        t.states
    );
}
