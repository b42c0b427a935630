//! Namespace and attribute operations of the read-write mount (unlink, rmdir, link, symlink,
//! rename, setattr, xattrs, fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range, orphans), each
//! checked by the oracles: `btrfs check --readonly`, a read-only reopen by ubtrfs and a kernel
//! loop mount, on images made by mkfs.btrfs and by ubtrfs's own mkfs. A seeded random test
//! applies the same operations to ubtrfs and to a directory of the host and compares.

mod common;

use common::{require_tool, Rng, TestDir};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use ubtrfs_fs::dir_item::Target;
use ubtrfs_fs::file_write::{
    btrfs_buffered_write, btrfs_fallocate, btrfs_llseek_data_hole, btrfs_writeback,
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, SEEK_DATA, SEEK_HOLE,
};
use ubtrfs_fs::inode::{
    btrfs_link, btrfs_new_inode, btrfs_rename, btrfs_rmdir, btrfs_setattr, btrfs_symlink,
    btrfs_unlink, SetAttr, TimeSet, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, S_IFDIR,
    S_IFLNK, S_IFMT, S_IFREG,
};
use ubtrfs_fs::xattr::{btrfs_removexattr, btrfs_setxattr, XATTR_CREATE, XATTR_REPLACE};
use ubtrfs_fs::{FsError, FsInfo, MountOptions};

// ------------------------------------------------------------------------------------------
// Images and oracles
// ------------------------------------------------------------------------------------------

/// Who made the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mkfs {
    Progs,
    Ubtrfs,
}

const BOTH: [Mkfs; 2] = [Mkfs::Progs, Mkfs::Ubtrfs];

fn make_image(dir: &TestDir, kind: Mkfs, size: u64, extra: &[&str]) -> PathBuf {
    let img = dir.join(format!("img-{kind:?}"));
    let _ = std::fs::remove_file(&img);
    match kind {
        Mkfs::Progs => {
            require_tool("mkfs.btrfs");
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(size).unwrap();
            drop(f);
            let out = Command::new("mkfs.btrfs")
                .arg("-q")
                .arg("-f")
                .args(extra)
                .arg(&img)
                .output()
                .expect("mkfs.btrfs must be installed");
            assert!(
                out.status.success(),
                "mkfs.btrfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Mkfs::Ubtrfs => {
            assert!(extra.is_empty(), "ubtrfs mkfs takes no feature options");
            let opts = ubtrfs_fs::mkfs::MkfsOptions {
                size: Some(size),
                ..Default::default()
            };
            ubtrfs_fs::mkfs::mkfs(&img, &opts).unwrap();
        }
    }
    img
}

/// `btrfs check --readonly` must exit 0 and report no error.
fn btrfs_check(img: &Path) {
    require_tool("btrfs");
    let out = Command::new("btrfs")
        .args(["check", "--readonly"])
        .arg(img)
        .output()
        .expect("btrfs-progs must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("ERROR") && text.contains("no error found"),
        "btrfs check failed on {}:\n{text}",
        img.display()
    );
}

/// The fs tree as `btrfs inspect-internal dump-tree -t 5` prints it.
fn dump_fs_tree(img: &Path) -> String {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-tree", "-t", "5"])
        .arg(img)
        .output()
        .expect("btrfs-progs must be installed");
    assert!(out.status.success(), "dump-tree failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        ..MountOptions::default()
    }
}

/// A kernel loop mount (read-only unless told), unmounted and detached on drop, even on panic
/// (common::oracle's guard, which retries a busy umount so that no mount outlives the test).
struct KernelMount(common::oracle::KernelMount);

impl std::ops::Deref for KernelMount {
    type Target = common::oracle::KernelMount;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl KernelMount {
    fn new(img: &Path, dir: &Path) -> Self {
        Self::with_options(img, dir, "ro")
    }

    fn with_options(img: &Path, dir: &Path, opts: &str) -> Self {
        require_tool("losetup");
        KernelMount(common::oracle::KernelMount::new(img, dir, opts))
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Snapshots: what a tree looks like, read through ubtrfs, the kernel or the host
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    /// File type bits (S_IFMT).
    kind: u32,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u32,
    ino: u64,
    /// Bytes allocated, rounded to sectors (st_blocks * 512 on the kernel side).
    alloc: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
    /// File content or symlink target.
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

type Snapshot = BTreeMap<String, Node>;

fn kind_name(k: u32) -> &'static str {
    match k {
        S_IFDIR => "dir",
        S_IFREG => "file",
        S_IFLNK => "symlink",
        _ => "special",
    }
}

/// Every object under the mount root of a (read-only) ubtrfs open, by path ("." = root).
fn ubtrfs_snapshot(fs: &FsInfo) -> Snapshot {
    let root = fs.mount_root;
    let dir = fs.root(root).unwrap().item.root_dirid;
    let mut out = Snapshot::new();
    ubtrfs_walk(fs, root, dir, ".", &mut out);
    out
}

fn ubtrfs_node(fs: &FsInfo, root: u64, ino: u64) -> Node {
    let mut ii = ubtrfs_fs::inode::read_inode(fs, root, ino).unwrap();
    // The in-memory size and mtime of data not yet written back (a live read-write mount).
    ubtrfs_fs::file_write::live_attrs(fs, root, ino, &mut ii);
    let kind = ii.mode & S_IFMT;
    let data = match kind {
        S_IFREG => {
            let emi = fs.ems.inode(root, ino);
            ubtrfs_fs::file::read(fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap()
        }
        S_IFLNK => ubtrfs_fs::file::readlink(fs, root, ino, &ii).unwrap(),
        _ => Vec::new(),
    };
    let mut xattrs = BTreeMap::new();
    for n in ubtrfs_fs::xattr::list(fs, root, ino).unwrap() {
        let v = ubtrfs_fs::xattr::get(fs, root, ino, &n).unwrap();
        xattrs.insert(n, v);
    }
    Node {
        kind,
        perm: ii.mode & 0o7777,
        uid: ii.uid,
        gid: ii.gid,
        size: ii.size,
        nlink: ii.nlink,
        ino,
        alloc: ii.nbytes.div_ceil(4096) * 4096,
        mtime: (ii.mtime.sec as i64, ii.mtime.nsec),
        ctime: (ii.ctime.sec as i64, ii.ctime.nsec),
        data,
        xattrs,
    }
}

fn ubtrfs_walk(fs: &FsInfo, root: u64, dir: u64, path: &str, out: &mut Snapshot) {
    out.insert(path.to_string(), ubtrfs_node(fs, root, dir));
    for e in ubtrfs_fs::dir_item::readdir(fs, root, dir, 0, usize::MAX).unwrap() {
        let Target::Inode { root: r, ino } = e.target else {
            panic!("unexpected subvolume placeholder")
        };
        let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
        let node = ubtrfs_node(fs, r, ino);
        assert_eq!(
            u32::from(e.file_type),
            u32::from(ubtrfs_fs::inode::file_type_of(node.kind)),
            "{p}: dir entry type"
        );
        if node.kind == S_IFDIR {
            ubtrfs_walk(fs, r, ino, &p, out);
        } else {
            out.insert(p, node);
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The xattrs of `p` (not following symlinks) through the host's system calls.
fn host_xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = cstr(p);
    let mut names = vec![0u8; 65536];
    // SAFETY: `c` is NUL-terminated and outlives the call; `names` is a writable buffer of
    // the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {p:?}: {}",
        std::io::Error::last_os_error()
    );
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: both strings are NUL-terminated and live across the call; `v` is writable
        // for the length passed.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(
            len >= 0,
            "lgetxattr {p:?}: {}",
            std::io::Error::last_os_error()
        );
        v.truncate(len as usize);
        out.insert(name.to_vec(), v);
    }
    out
}

fn host_node(p: &Path) -> Node {
    let md = std::fs::symlink_metadata(p).unwrap();
    let kind = md.mode() & S_IFMT;
    let data = match kind {
        S_IFREG => std::fs::read(p).unwrap(),
        S_IFLNK => std::fs::read_link(p)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec(),
        _ => Vec::new(),
    };
    Node {
        kind,
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: md.size(),
        nlink: md.nlink() as u32,
        ino: md.ino(),
        alloc: md.blocks() * 512,
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        ctime: (md.ctime(), md.ctime_nsec() as u32),
        data,
        xattrs: host_xattrs(p),
    }
}

/// Every object under `dir` (a kernel mount or a host directory), by path ("." = `dir`).
fn host_snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    fn walk(base: &Path, rel: &str, out: &mut Snapshot) {
        let p = if rel == "." {
            base.to_path_buf()
        } else {
            base.join(&rel[2..])
        };
        let node = host_node(&p);
        let is_dir = node.kind == S_IFDIR;
        out.insert(rel.to_string(), node);
        if is_dir {
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(base, &format!("{rel}/{}", n.to_string_lossy()), out);
            }
        }
    }
    walk(dir, ".", &mut out);
    out
}

/// ubtrfs and the kernel must agree on everything the disk says.
fn assert_same_as_kernel(ub: &Snapshot, k: &Snapshot) {
    let a: BTreeSet<_> = ub.keys().collect();
    let b: BTreeSet<_> = k.keys().collect();
    assert_eq!(a, b, "names differ between ubtrfs and the kernel");
    for (p, u) in ub {
        let kn = &k[p];
        assert_eq!(u.kind, kn.kind, "{p}: type");
        assert_eq!(u.perm, kn.perm, "{p}: permissions");
        assert_eq!((u.uid, u.gid), (kn.uid, kn.gid), "{p}: owner");
        assert_eq!(u.size, kn.size, "{p}: size");
        assert_eq!(u.nlink, kn.nlink, "{p}: nlink");
        assert_eq!(u.ino, kn.ino, "{p}: inode number");
        assert_eq!(u.mtime, kn.mtime, "{p}: mtime");
        assert_eq!(u.ctime, kn.ctime, "{p}: ctime");
        assert!(u.data == kn.data, "{p}: content differs");
        assert_eq!(u.xattrs, kn.xattrs, "{p}: xattrs");
        if u.kind == S_IFREG {
            assert_eq!(u.alloc, kn.alloc, "{p}: allocated bytes (nbytes)");
        }
    }
}

/// Sync, close, `btrfs check`, reopen read-only and compare with the kernel's view; return
/// the snapshot for scenario-specific assertions.
fn verify_image(img: &Path, dir: &TestDir) -> Snapshot {
    btrfs_check(img);
    let ub = {
        let fs = FsInfo::open(img, MountOptions::default()).unwrap();
        ubtrfs_snapshot(&fs)
    };
    let m = KernelMount::new(img, &dir.join("mnt"));
    let k = host_snapshot(&m.dir);
    drop(m);
    assert_same_as_kernel(&ub, &k);
    ub
}

// ------------------------------------------------------------------------------------------
// Small helpers on an open filesystem
// ------------------------------------------------------------------------------------------

struct Fs {
    fs: std::sync::Arc<FsInfo>,
    root: u64,
    top: u64,
}

impl Fs {
    fn open(img: &Path) -> Fs {
        let fs = FsInfo::open(img, rw()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        Fs { fs, root, top }
    }

    /// Resolve a path relative to the mount root ("" = root).
    fn ino(&self, path: &str) -> u64 {
        self.try_ino(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn try_ino(&self, path: &str) -> Result<u64, FsError> {
        let mut cur = self.top;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            let ii = ubtrfs_fs::inode::read_inode(&self.fs, self.root, cur)?;
            match ii.mode & S_IFMT {
                S_IFDIR => {}
                // The random test's symlinks all dangle: following one finds nothing.
                S_IFLNK => return Err(FsError::NotFound),
                _ => return Err(FsError::NotDir),
            }
            match ubtrfs_fs::dir_item::lookup(&self.fs, self.root, cur, c.as_bytes())? {
                Target::Inode { ino, .. } => cur = ino,
                Target::EmptySubvolPlaceholder { .. } => return Err(FsError::NotFound),
            }
        }
        Ok(cur)
    }

    /// (parent dir inode, last name) of a path.
    fn parent(&self, path: &str) -> Result<(u64, Vec<u8>), FsError> {
        let (dir, name) = match path.rfind('/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("", path),
        };
        let d = self.try_ino(dir)?;
        let ii = ubtrfs_fs::inode::read_inode(&self.fs, self.root, d)?;
        match ii.mode & S_IFMT {
            S_IFDIR => {}
            S_IFLNK => return Err(FsError::NotFound),
            _ => return Err(FsError::NotDir),
        }
        Ok((d, name.as_bytes().to_vec()))
    }

    fn create(&self, path: &str, mode: u32) -> Result<u64, FsError> {
        let (d, n) = self.parent(path)?;
        btrfs_new_inode(&self.fs, self.root, d, &n, mode, 0, 0, 0).map(|(i, _)| i)
    }

    fn file(&self, path: &str, content: &[u8]) -> u64 {
        let ino = self.create(path, S_IFREG | 0o644).unwrap();
        if !content.is_empty() {
            btrfs_buffered_write(&self.fs, self.root, ino, 0, content).unwrap();
        }
        ino
    }

    fn mkdir(&self, path: &str) -> u64 {
        self.create(path, S_IFDIR | 0o755).unwrap()
    }

    fn unlink(&self, path: &str) -> Result<(), FsError> {
        let (d, n) = self.parent(path)?;
        btrfs_unlink(&self.fs, self.root, d, &n)
    }

    fn rmdir(&self, path: &str) -> Result<(), FsError> {
        let (d, n) = self.parent(path)?;
        btrfs_rmdir(&self.fs, self.root, d, &n)
    }

    fn link(&self, old: &str, new: &str) -> Result<(), FsError> {
        let ino = self.try_ino(old)?;
        let (d, n) = self.parent(new)?;
        btrfs_link(&self.fs, self.root, ino, d, &n).map(|_| ())
    }

    fn rename(&self, old: &str, new: &str, flags: u32) -> Result<(), FsError> {
        let (od, on) = self.parent(old)?;
        let (nd, nn) = self.parent(new)?;
        btrfs_rename(&self.fs, self.root, od, &on, nd, &nn, flags)
    }

    fn read(&self, ino: u64) -> Vec<u8> {
        let ii = ubtrfs_fs::inode::read_inode(&self.fs, self.root, ino).unwrap();
        let mut ii2 = ii;
        ubtrfs_fs::file_write::live_attrs(&self.fs, self.root, ino, &mut ii2);
        let emi = self.fs.ems.inode(self.root, ino);
        ubtrfs_fs::file::read(&self.fs, self.root, ino, &ii, &emi, 0, u32::MAX).unwrap()
    }

    fn write(&self, ino: u64, off: u64, data: &[u8]) {
        btrfs_buffered_write(&self.fs, self.root, ino, off, data).unwrap();
    }

    fn truncate(&self, ino: u64, size: u64) {
        btrfs_setattr(
            &self.fs,
            self.root,
            ino,
            &SetAttr {
                size: Some(size),
                ..Default::default()
            },
        )
        .unwrap();
    }

    fn fallocate(&self, ino: u64, mode: u32, off: u64, len: u64) {
        btrfs_fallocate(&self.fs, self.root, ino, mode, off, len).unwrap();
    }

    fn sync(&self) {
        self.fs.sync().unwrap();
    }
}

fn nlink_of(s: &Snapshot, p: &str) -> u32 {
    s.get(p).unwrap_or_else(|| panic!("{p} missing")).nlink
}

// ------------------------------------------------------------------------------------------
// Scenarios
// ------------------------------------------------------------------------------------------

// Test scenario: a file with three names (two in one directory, one in another) loses them
// one by one; after each unlink the image is checked and the kernel sees the remaining names
// with the right nlink; the last unlink frees the data (no extent left, bytes_used back).
#[test]
fn unlink_hard_links_one_by_one() {
    for kind in BOTH {
        let d = TestDir::new(&format!("unlink3-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let content = pattern(3, 300_000);
        {
            let f = Fs::open(&img);
            f.mkdir("sub");
            f.file("a", &content);
            f.link("a", "b").unwrap();
            f.link("a", "sub/c").unwrap();
            assert!(matches!(f.link("a", "b"), Err(FsError::Exists)));
            assert!(matches!(f.link("sub", "d"), Err(FsError::NotPermitted)));
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(nlink_of(&s, "./a"), 3);
        assert_eq!(s["./sub/c"].data, content);
        assert_eq!(s["./a"].ino, s["./sub/c"].ino);
        for (gone, left) in [("a", 2), ("sub/c", 1), ("b", 0)] {
            {
                let f = Fs::open(&img);
                f.unlink(gone).unwrap();
                assert!(matches!(f.unlink(gone), Err(FsError::NotFound)));
                f.sync();
            }
            let s = verify_image(&img, &d);
            assert!(!s.contains_key(&format!("./{gone}")));
            for p in ["./a", "./b", "./sub/c"] {
                if let Some(n) = s.get(p) {
                    assert_eq!(n.nlink, left, "{p}");
                    assert_eq!(n.data, content, "{p}");
                }
            }
            assert_eq!(
                s["./sub"].size,
                if gone == "sub/c" || left == 0 { 0 } else { 2 }
            );
        }
        let dump = dump_fs_tree(&img);
        assert!(!dump.contains("EXTENT_DATA"), "extents left:\n{dump}");
        assert!(!dump.contains("ORPHAN"), "orphan left:\n{dump}");
    }
}

// Test scenario: 200 names for one inode in one directory (names of 100 bytes): the
// INODE_REF item fills up and further names go to INODE_EXTREF items, as the kernel does;
// hard links across directories too; then names are removed from both kinds of items. On a
// filesystem without the extref feature the link that would need one fails with EMLINK.
#[test]
fn many_links_spill_into_extrefs() {
    for kind in BOTH {
        let d = TestDir::new(&format!("extref-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let name = |i: usize| format!("{i:03}-{}", "n".repeat(96));
        {
            let f = Fs::open(&img);
            f.mkdir("other");
            f.file(&name(0), b"shared content");
            for i in 1..200 {
                f.link(&name(0), &name(i)).unwrap();
            }
            f.link(&name(0), "other/x").unwrap();
            f.sync();
        }
        let dump = dump_fs_tree(&img);
        assert!(dump.contains("INODE_EXTREF"), "no INODE_EXTREF item");
        let s = verify_image(&img, &d);
        assert_eq!(nlink_of(&s, "./other/x"), 201);
        // Remove names held in the INODE_REF item and in extrefs, and the cross-dir one.
        {
            let f = Fs::open(&img);
            for i in (0..200).step_by(3) {
                f.unlink(&name(i)).unwrap();
            }
            f.unlink("other/x").unwrap();
            f.sync();
        }
        let s = verify_image(&img, &d);
        let left = (0..200).filter(|i| i % 3 != 0).count() as u32;
        assert_eq!(nlink_of(&s, &format!("./{}", name(1))), left);
        assert_eq!(s["./other"].size, 0);
    }
    // Without extended irefs the INODE_REF item is the limit.
    let d = TestDir::new("extref-off");
    let img = make_image(&d, Mkfs::Progs, 512 << 20, &["-O", "^extref"]);
    {
        let f = Fs::open(&img);
        f.file("a", b"x");
        let long = |i: usize| format!("{i:03}-{}", "m".repeat(250));
        let mut failed = None;
        for i in 0..200 {
            if let Err(e) = f.link("a", &long(i)) {
                failed = Some((i, e));
                break;
            }
        }
        let (i, e) = failed.expect("some link must fail");
        assert!(matches!(e, FsError::TooManyLinks), "{e}");
        assert!(i > 10);
        f.sync();
    }
    verify_image(&img, &d);
}

// Test scenario: rename in all its forms: plain, over an existing file (whose data is
// freed), over an empty directory, a directory moved across directories (its INODE_REF now
// names the new parent), RENAME_EXCHANGE of a file and a directory in different
// directories, RENAME_NOREPLACE failing, and the refusals the VFS makes (into itself,
// non-empty target, file over directory, whiteout with exchange).
#[test]
fn rename_forms() {
    for kind in BOTH {
        let d = TestDir::new(&format!("rename-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let (moved_dir, victim_content) = {
            let f = Fs::open(&img);
            f.mkdir("d1");
            f.mkdir("d2");
            f.mkdir("d1/inner");
            f.mkdir("d1/inner/deep");
            f.file("d1/inner/deep/f", b"deep file");
            f.mkdir("empty");
            f.file("plain", b"plain");
            f.file("over-src", b"the new content");
            f.file("over-dst", &pattern(5, 200_000));
            f.file("xfile", b"file side");
            f.mkdir("d2/ydir");
            f.file("d2/ydir/inside", b"inside ydir");
            f.file("keep", b"keep");
            f.sync();
            // Plain rename and rename over a file in one transaction.
            f.rename("plain", "plain2", 0).unwrap();
            f.rename("over-src", "over-dst", 0).unwrap();
            // Over an empty directory.
            f.mkdir("dsrc");
            f.file("dsrc/child", b"child");
            f.rename("dsrc", "empty", 0).unwrap();
            // A directory across directories.
            let moved = f.ino("d1/inner");
            f.rename("d1/inner", "d2/inner-moved", 0).unwrap();
            // Exchange a file and a directory in different directories.
            f.rename("xfile", "d2/ydir", RENAME_EXCHANGE).unwrap();
            // Refusals.
            assert!(matches!(
                f.rename("keep", "plain2", RENAME_NOREPLACE),
                Err(FsError::Exists)
            ));
            assert!(matches!(
                f.rename("d2", "d2/inner-moved/x", 0),
                Err(FsError::Invalid(_))
            ));
            assert!(matches!(f.rename("keep", "d2", 0), Err(FsError::IsDir)));
            assert!(matches!(f.rename("d2", "keep", 0), Err(FsError::NotDir)));
            f.mkdir("nonempty");
            f.file("nonempty/f", b"");
            assert!(matches!(
                f.rename("d1", "nonempty", 0),
                Err(FsError::NotEmpty)
            ));
            // (A whiteout is made since RENAME_WHITEOUT is supported, and compared with the
            // kernel in fuse-daemon's mount_vfs_semantics; with EXCHANGE it is refused.)
            assert!(matches!(
                f.rename("keep", "k2", RENAME_WHITEOUT | RENAME_EXCHANGE),
                Err(FsError::Invalid(_))
            ));
            assert!(matches!(
                f.rename("missing", "k2", RENAME_EXCHANGE),
                Err(FsError::NotFound)
            ));
            assert!(matches!(
                f.rename("keep", "absent", RENAME_EXCHANGE),
                Err(FsError::NotFound)
            ));
            // Two names of one inode: nothing happens.
            f.link("keep", "keep2").unwrap();
            f.rename("keep", "keep2", 0).unwrap();
            f.sync();
            (moved, b"the new content".to_vec())
        };
        let s = verify_image(&img, &d);
        assert!(!s.contains_key("./plain") && s["./plain2"].data == b"plain");
        assert_eq!(s["./over-dst"].data, victim_content);
        assert!(!s.contains_key("./over-src"));
        assert_eq!(s["./empty/child"].data, b"child");
        assert!(!s.contains_key("./dsrc"));
        assert_eq!(s["./d2/inner-moved"].ino, moved_dir);
        assert_eq!(s["./d2/inner-moved/deep/f"].data, b"deep file");
        assert_eq!(s["./d2/ydir"].data, b"file side");
        assert_eq!(s["./xfile/inside"].data, b"inside ydir");
        assert_eq!(s["./d1"].size, 0);
        assert_eq!(nlink_of(&s, "./keep"), 2);
        // The moved directory's back reference names its new parent.
        let dump = dump_fs_tree(&img);
        let d2 = s["./d2"].ino;
        assert!(
            dump.contains(&format!("key ({moved_dir} INODE_REF {d2})")),
            "INODE_REF of the moved directory does not name d2"
        );
        // The replaced file's 200 KB extent is gone: one regular extent is left at most
        // for the new content (inline here).
        assert!(!dump.contains("extent data disk byte") || s["./over-dst"].alloc < 200_000);
    }
}

// Test scenario: a file is unlinked while open (orphan item, nlink 0, data still readable
// and writable through the handle); the filesystem is closed without the last release (a
// crash): btrfs check accepts the orphan, the kernel does not show the name; a read-write
// reopen runs orphan cleanup, which frees everything. A second file goes through the normal
// path: last release evicts it.
#[test]
fn unlink_open_file_then_orphan_cleanup() {
    for kind in BOTH {
        let d = TestDir::new(&format!("orphan-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let used_before = {
            let f = Fs::open(&img);
            f.file("keep", b"keep");
            f.sync();
            let used = f.fs.sb_live.lock().bytes_used;
            used
        };
        let (orphan_ino, released_ino) = {
            let f = Fs::open(&img);
            let a = f.file("open-a", &pattern(1, 1 << 20));
            let b = f.file("open-b", &pattern(2, 100_000));
            f.sync();
            f.fs.note_open(f.root, a);
            f.fs.note_open(f.root, b);
            f.unlink("open-a").unwrap();
            f.unlink("open-b").unwrap();
            // Still readable and writable through the handle.
            f.write(a, 10, b"written after unlink");
            let mut want = pattern(1, 1 << 20);
            want[10..30].copy_from_slice(b"written after unlink");
            assert!(f.read(a) == want);
            f.sync();
            // b: last release evicts.
            assert!(f.fs.note_release(f.root, b));
            assert!(ubtrfs_fs::inode::btrfs_evict_inode(&f.fs, f.root, b).unwrap());
            f.sync();
            (a, b)
        };
        let dump = dump_fs_tree(&img);
        assert!(
            dump.contains(&format!("ORPHAN ORPHAN_ITEM {orphan_ino}")),
            "{dump}"
        );
        assert!(!dump.contains(&format!("key ({released_ino} INODE_ITEM")));
        let s = verify_image(&img, &d);
        assert!(!s.contains_key("./open-a"));
        // The kernel cleans up the same orphan at a read-write mount of a copy.
        {
            let copy = d.join("kernel-copy");
            std::fs::copy(&img, &copy).unwrap();
            drop(KernelMount::with_options(&copy, &d.join("kmnt"), "rw"));
            btrfs_check(&copy);
            let dump = dump_fs_tree(&copy);
            assert!(!dump.contains("ORPHAN"), "kernel left the orphan:\n{dump}");
            assert!(!dump.contains(&format!("key ({orphan_ino} ")), "{dump}");
        }
        {
            // A read-write open runs orphan cleanup (FsInfo::open calls it); running it again
            // finds nothing left.
            let f = Fs::open(&img);
            assert_eq!(ubtrfs_fs::inode::orphan_cleanup(&f.fs).unwrap(), 0);
            f.sync();
            let used = f.fs.sb_live.lock().bytes_used;
            assert_eq!(used, used_before);
        }
        let dump = dump_fs_tree(&img);
        assert!(!dump.contains("ORPHAN"), "{dump}");
        assert!(!dump.contains(&format!("key ({orphan_ino} ")), "{dump}");
        verify_image(&img, &d);
    }
}

// Test scenario: rmdir of empty and non-empty directories, of a file, and of a directory
// whose last entry went away in the same transaction; the parent's size and times follow.
#[test]
fn rmdir_rules() {
    for kind in BOTH {
        let d = TestDir::new(&format!("rmdir-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        {
            let f = Fs::open(&img);
            f.mkdir("a");
            f.mkdir("a/b");
            f.file("a/b/f", b"x");
            f.file("g", b"y");
            assert!(matches!(f.rmdir("a"), Err(FsError::NotEmpty)));
            assert!(matches!(f.rmdir("g"), Err(FsError::NotDir)));
            assert!(matches!(f.unlink("a"), Err(FsError::IsDir)));
            assert!(matches!(f.rmdir("zz"), Err(FsError::NotFound)));
            f.unlink("a/b/f").unwrap();
            f.rmdir("a/b").unwrap();
            f.mkdir("c");
            f.sync();
            f.rmdir("c").unwrap();
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(s["./a"].size, 0);
        assert!(!s.contains_key("./c"));
        assert_eq!(s["."].size, 2 * ("a".len() + "g".len()) as u64);
    }
}

// Test scenario: truncate a multi-extent file down to 0 and to unaligned sizes, up
// (sparse), then write past EOF; an inline file shrinks in place and grows; stale bytes
// after EOF never reappear; nbytes follows (checked by btrfs check and the kernel's
// st_blocks).
#[test]
fn truncate_down_up_and_write_past() {
    for kind in BOTH {
        let d = TestDir::new(&format!("trunc-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let mut want: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        {
            let f = Fs::open(&img);
            let big = pattern(7, 3 << 20);
            let z = f.file("to-zero", &big);
            let u = f.file("unaligned", &big);
            let s = f.file("sparse", &pattern(8, 10_000));
            let i = f.file("inline", &pattern(9, 1000));
            f.sync();
            f.truncate(z, 0);
            want.insert("to-zero", Vec::new());
            f.truncate(u, 5000);
            let mut w = big[..5000].to_vec();
            // Grow again: the old bytes after 5000 must read as zeros.
            f.truncate(u, 12_000);
            w.resize(12_000, 0);
            f.write(u, 20_000, b"tail");
            w.resize(20_000, 0);
            w.extend_from_slice(b"tail");
            want.insert("unaligned", w);
            f.truncate(s, 1 << 20);
            let mut w = pattern(8, 10_000);
            w.resize(1 << 20, 0);
            f.write(s, (2 << 20) + 3, b"past eof");
            w.resize((2 << 20) + 3, 0);
            w.extend_from_slice(b"past eof");
            want.insert("sparse", w);
            f.truncate(i, 500);
            f.truncate(i, 1500);
            let mut w = pattern(9, 500);
            w.resize(1500, 0);
            want.insert("inline", w);
            // Dirty data and truncate in one go.
            let m = f.file("dirty-trunc", &pattern(10, 50_000));
            f.truncate(m, 7777);
            want.insert("dirty-trunc", pattern(10, 7777));
            for (name, w) in &want {
                let ino = f.ino(name);
                assert!(f.read(ino) == *w, "{name} before sync");
            }
            f.sync();
        }
        let s = verify_image(&img, &d);
        for (name, w) in &want {
            let n = &s[&format!("./{name}")];
            assert!(n.data == *w, "{name}: content");
            assert_eq!(n.size, w.len() as u64, "{name}: size");
        }
        assert_eq!(s["./to-zero"].alloc, 0);
        assert_eq!(s["./inline"].alloc, 4096);
    }
}

// Test scenario: fallocate on a large written file: a hole punched in the middle with
// unaligned edges (zeroed through the write path, nbytes drops), KEEP_SIZE preallocation
// beyond EOF (size unchanged, nbytes grows, reads stay short), default preallocation that
// extends the file, ZERO_RANGE over written data and a hole, and a truncate to the same
// size dropping the preallocation past EOF; SEEK_DATA/SEEK_HOLE answers match the kernel's.
#[test]
fn fallocate_punch_prealloc_zero() {
    for kind in BOTH {
        let d = TestDir::new(&format!("falloc-{kind:?}"));
        let img = make_image(&d, kind, 1 << 30, &[]);
        let mut want: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        let seeks: Vec<(String, i64, u32, Result<u64, ()>)>;
        {
            let f = Fs::open(&img);
            let big = pattern(11, 8 << 20);
            let p = f.file("punched", &big);
            let k = f.file("keep-size", &pattern(12, 10_000));
            let e = f.file("extended", &pattern(13, 3000));
            let z = f.file("zeroed", &big);
            let t = f.file("trunc-same", &pattern(14, 9000));
            f.sync();
            f.fallocate(
                p,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                (1 << 20) + 100,
                (2 << 20) + 100,
            );
            let mut w = big.clone();
            w[(1 << 20) + 100..(3 << 20) + 200].fill(0);
            want.insert("punched", w);
            f.fallocate(k, FALLOC_FL_KEEP_SIZE, 8192, 1 << 20);
            want.insert("keep-size", pattern(12, 10_000));
            f.fallocate(e, 0, 0, 100_000);
            let mut w = pattern(13, 3000);
            w.resize(100_000, 0);
            want.insert("extended", w);
            f.fallocate(z, FALLOC_FL_ZERO_RANGE, 5000, 3 << 20);
            let mut w = big.clone();
            w[5000..5000 + (3 << 20)].fill(0);
            want.insert("zeroed", w);
            f.fallocate(t, FALLOC_FL_KEEP_SIZE, 0, 1 << 20);
            f.truncate(t, 9000);
            want.insert("trunc-same", pattern(14, 9000));
            // Refused modes.
            assert!(matches!(
                btrfs_fallocate(&f.fs, f.root, p, FALLOC_FL_PUNCH_HOLE, 0, 4096),
                Err(FsError::Unsupported(_))
            ));
            assert!(matches!(
                btrfs_fallocate(&f.fs, f.root, p, 0x08, 0, 4096),
                Err(FsError::Unsupported(_))
            ));
            for (name, w) in &want {
                assert!(f.read(f.ino(name)) == *w, "{name} before sync");
            }
            f.sync();
            let mut v = Vec::new();
            for (name, ino) in [
                ("punched", p),
                ("keep-size", k),
                ("extended", e),
                ("zeroed", z),
            ] {
                for off in [
                    0i64,
                    4096,
                    5000,
                    (1 << 20) + 50,
                    (2 << 20) + 7,
                    9000,
                    99_999,
                ] {
                    for wh in [SEEK_DATA, SEEK_HOLE] {
                        let r = btrfs_llseek_data_hole(&f.fs, f.root, ino, off, wh).map_err(|e| {
                            assert!(matches!(e, FsError::NoSuchOffset), "{e}");
                        });
                        v.push((name.to_string(), off, wh, r));
                    }
                }
            }
            seeks = v;
        }
        btrfs_check(&img);
        let s = verify_image(&img, &d);
        for (name, w) in &want {
            let n = &s[&format!("./{name}")];
            assert!(n.data == *w, "{name}: content");
        }
        // Whole sectors of the hole are deallocated; the two edge sectors were rewritten.
        assert_eq!(s["./punched"].alloc, (8 << 20) - ((2 << 20) - 4096));
        assert!(s["./keep-size"].alloc >= (1 << 20) + 8192);
        assert_eq!(s["./trunc-same"].alloc, 12288);
        // SEEK_DATA / SEEK_HOLE as the kernel answers them on the same image.
        let m = KernelMount::new(&img, &d.join("mnt"));
        for (name, off, wh, r) in seeks {
            let c = cstr(&m.dir.join(&name));
            // SAFETY: `c` is a NUL-terminated path that lives across the calls; the fd is
            // closed before the loop continues.
            let got = unsafe {
                let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
                assert!(fd >= 0);
                let whence = if wh == SEEK_DATA {
                    libc::SEEK_DATA
                } else {
                    libc::SEEK_HOLE
                };
                let r = libc::lseek(fd, off, whence);
                libc::close(fd);
                r
            };
            let kernel = if got < 0 { Err(()) } else { Ok(got as u64) };
            assert_eq!(r, kernel, "{name}: lseek({off}, {wh})");
        }
    }
}

// Test scenario: xattrs: create, create again (EEXIST), replace a missing one (ENODATA),
// replace, remove, remove again (ENODATA), a value as large as a leaf allows, one byte too
// large (ENOSPC, as the kernel), one larger than the VFS allows (E2BIG), bad names; ctime
// follows; the kernel reads the same values.
#[test]
fn xattr_set_replace_remove() {
    for kind in BOTH {
        let d = TestDir::new(&format!("xattr-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let big_len;
        {
            let f = Fs::open(&img);
            let ino = f.file("f", b"data");
            let dir = f.mkdir("dir");
            let set =
                |i, n: &str, v: &[u8], fl| btrfs_setxattr(&f.fs, f.root, i, n.as_bytes(), v, fl);
            set(ino, "user.a", b"1", XATTR_CREATE).unwrap();
            assert!(matches!(
                set(ino, "user.a", b"2", XATTR_CREATE),
                Err(FsError::Exists)
            ));
            assert!(matches!(
                set(ino, "user.b", b"2", XATTR_REPLACE),
                Err(FsError::NoXattr)
            ));
            set(ino, "user.a", b"replaced", XATTR_REPLACE).unwrap();
            set(ino, "user.gone", b"x", 0).unwrap();
            btrfs_removexattr(&f.fs, f.root, ino, b"user.gone").unwrap();
            assert!(matches!(
                btrfs_removexattr(&f.fs, f.root, ino, b"user.gone"),
                Err(FsError::NoXattr)
            ));
            let max = ubtrfs_fs::xattr::max_xattr_size(&f.fs) - "user.big".len();
            big_len = max;
            set(ino, "user.big", &pattern(1, max), 0).unwrap();
            assert!(matches!(
                set(ino, "user.big2", &pattern(1, max), 0),
                Err(FsError::NoSpace)
            ));
            assert!(matches!(
                set(ino, "user.huge", &vec![1u8; 70_000], 0),
                Err(FsError::TooBig)
            ));
            assert!(matches!(set(ino, "", b"x", 0), Err(FsError::Range)));
            assert!(matches!(
                set(ino, "bogus.x", b"x", 0),
                Err(FsError::Unsupported(_))
            ));
            set(dir, "user.on-dir", b"dir value", 0).unwrap();
            set(dir, "trusted.t", b"", 0).unwrap();
            for i in 0..50 {
                set(dir, &format!("user.many{i}"), format!("v{i}").as_bytes(), 0).unwrap();
            }
            for i in (0..50).step_by(2) {
                btrfs_removexattr(&f.fs, f.root, dir, format!("user.many{i}").as_bytes()).unwrap();
            }
            f.sync();
        }
        let s = verify_image(&img, &d);
        let x = &s["./f"].xattrs;
        assert_eq!(
            x.get(&b"user.a"[..]).map(|v| v.as_slice()),
            Some(&b"replaced"[..])
        );
        assert_eq!(x.get(&b"user.big"[..]).map(|v| v.len()), Some(big_len));
        assert!(!x.contains_key(&b"user.gone"[..]));
        assert_eq!(s["./dir"].xattrs.len(), 2 + 25);
    }
}

// Test scenario: symlinks: short, long (4095 bytes: inline beyond max_inline, as the kernel
// stores them), too long (ENAMETOOLONG), empty (ENOENT); the kernel reads the targets and
// btrfs check accepts size = nbytes = target length.
#[test]
fn symlinks() {
    for kind in BOTH {
        let d = TestDir::new(&format!("symlink-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let long: Vec<u8> = std::iter::repeat_n(b"abc/".iter().copied(), 1024)
            .flatten()
            .take(4095)
            .collect();
        {
            let f = Fs::open(&img);
            let top = f.top;
            btrfs_symlink(&f.fs, f.root, top, b"short", b"target", 1000, 1000).unwrap();
            btrfs_symlink(&f.fs, f.root, top, b"long", &long, 0, 0).unwrap();
            assert!(matches!(
                btrfs_symlink(&f.fs, f.root, top, b"too-long", &[b'x'; 4096], 0, 0),
                Err(FsError::NameTooLong)
            ));
            assert!(matches!(
                btrfs_symlink(&f.fs, f.root, top, b"empty", b"", 0, 0),
                Err(FsError::NotFound)
            ));
            assert!(matches!(
                btrfs_symlink(&f.fs, f.root, top, b"short", b"t", 0, 0),
                Err(FsError::Exists)
            ));
            f.sync();
            f.unlink("short").unwrap();
            btrfs_symlink(&f.fs, f.root, top, b"short", b"again", 0, 0).unwrap();
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(s["./short"].data, b"again");
        assert_eq!(s["./long"].data, long);
        assert_eq!(s["./long"].perm, 0o777);
    }
}

// Test scenario: chmod, chown, utimes (explicit and "now") through setattr; ctime moves on
// every change unless given; explicit mtime survives a later writeback of dirty data.
#[test]
fn setattr_mode_owner_times() {
    use ubtrfs_format::items::Timespec;
    for kind in BOTH {
        let d = TestDir::new(&format!("setattr-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        let t1 = Timespec {
            sec: 1_000_000_000,
            nsec: 123_456_789,
        };
        let t2 = Timespec {
            sec: 1_500_000_000,
            nsec: 42,
        };
        {
            let f = Fs::open(&img);
            let a = f.file("a", b"abc");
            let dir = f.mkdir("dir");
            let before = ubtrfs_fs::inode::read_inode(&f.fs, f.root, a).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let got = btrfs_setattr(
                &f.fs,
                f.root,
                a,
                &SetAttr {
                    mode: Some(0o4750),
                    uid: Some(1234),
                    gid: Some(5678),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(got.mode, S_IFREG | 0o4750);
            assert!(got.ctime != before.ctime);
            // Dirty data, then explicit times: writeback must not override them.
            f.write(a, 3, b"def");
            btrfs_setattr(
                &f.fs,
                f.root,
                a,
                &SetAttr {
                    atime: Some(TimeSet::At(t1)),
                    mtime: Some(TimeSet::At(t2)),
                    ctime: Some(t1),
                    ..Default::default()
                },
            )
            .unwrap();
            btrfs_setattr(
                &f.fs,
                f.root,
                dir,
                &SetAttr {
                    mode: Some(0o700),
                    mtime: Some(TimeSet::Now),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(matches!(
                btrfs_setattr(
                    &f.fs,
                    f.root,
                    dir,
                    &SetAttr {
                        size: Some(0),
                        ..Default::default()
                    }
                ),
                Err(FsError::IsDir)
            ));
            f.sync();
        }
        let s = verify_image(&img, &d);
        let a = &s["./a"];
        assert_eq!(a.data, b"abcdef");
        assert_eq!((a.perm, a.uid, a.gid), (0o4750, 1234, 5678));
        assert_eq!(a.mtime, (t2.sec as i64, t2.nsec));
        assert_eq!(a.ctime, (t1.sec as i64, t1.nsec));
        assert_eq!(s["./dir"].perm, 0o700);
    }
}

// Test scenario (regression for the delayed-ref fix in ubtrfs-ctree): data extents that are
// allocated and dropped again inside one transaction — a file written back and unlinked, a
// range rewritten twice, a truncate after writeback — leave no space, extent item or
// checksum behind: btrfs check compares block group usage with the extent tree.
#[test]
fn extents_born_and_dropped_in_one_transaction() {
    for kind in BOTH {
        let d = TestDir::new(&format!("netzero-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        {
            let f = Fs::open(&img);
            let a = f.file("a", &pattern(1, 1 << 20));
            btrfs_writeback(&f.fs, f.root, a).unwrap();
            f.unlink("a").unwrap();
            let b = f.file("b", &pattern(2, 256 << 10));
            btrfs_writeback(&f.fs, f.root, b).unwrap();
            f.write(b, 0, &pattern(3, 256 << 10));
            btrfs_writeback(&f.fs, f.root, b).unwrap();
            let c = f.file("c", &pattern(4, 300_000));
            btrfs_writeback(&f.fs, f.root, c).unwrap();
            f.truncate(c, 0);
            let p = f.file("p", b"");
            f.fallocate(p, 0, 0, 1 << 20);
            f.fallocate(p, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 20);
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(s["./b"].data, pattern(3, 256 << 10));
        assert_eq!(s["./c"].size, 0);
    }
}

// Test scenario: copy_file_range by read and write: whole file, a middle range into another
// file past its EOF, a short copy at the source's EOF, and the refusal of overlapping
// ranges in one file.
#[test]
fn copy_file_range_by_read_and_write() {
    let d = TestDir::new("copy");
    let img = make_image(&d, Mkfs::Ubtrfs, 512 << 20, &[]);
    {
        let f = Fs::open(&img);
        let src = f.file("src", &pattern(1, 500_000));
        f.sync();
        let dst = f.file("dst", b"head");
        let r = f.root;
        let n =
            ubtrfs_fs::file_write::copy_file_range(&f.fs, r, src, 0, r, dst, 0, 1 << 20).unwrap();
        assert_eq!(n, 500_000);
        let n = ubtrfs_fs::file_write::copy_file_range(&f.fs, r, src, 1000, r, dst, 600_000, 5000)
            .unwrap();
        assert_eq!(n, 5000);
        assert!(matches!(
            ubtrfs_fs::file_write::copy_file_range(&f.fs, r, src, 0, r, src, 100, 1000),
            Err(FsError::Invalid(_))
        ));
        f.sync();
    }
    let s = verify_image(&img, &d);
    let mut want = pattern(1, 500_000);
    want.resize(600_000, 0);
    want.extend_from_slice(&pattern(1, 6000)[1000..]);
    assert!(s["./dst"].data == want);
}

// ------------------------------------------------------------------------------------------
// Randomized operations against a host directory
// ------------------------------------------------------------------------------------------

/// errno of a filesystem error, as the FUSE adapter maps it.
fn errno_of(e: &FsError) -> i32 {
    match e {
        FsError::NotFound => libc::ENOENT,
        FsError::Exists => libc::EEXIST,
        FsError::NotDir => libc::ENOTDIR,
        FsError::IsDir => libc::EISDIR,
        FsError::NotEmpty => libc::ENOTEMPTY,
        FsError::Invalid(_) => libc::EINVAL,
        FsError::NameTooLong => libc::ENAMETOOLONG,
        FsError::TooManyLinks => libc::EMLINK,
        FsError::NotPermitted => libc::EPERM,
        FsError::NoXattr => libc::ENODATA,
        FsError::NoSpace => libc::ENOSPC,
        FsError::Range => libc::ERANGE,
        FsError::TooBig => libc::E2BIG,
        FsError::FileTooBig => libc::EFBIG,
        FsError::Unsupported(_) => libc::EOPNOTSUPP,
        FsError::NoSuchOffset => libc::ENXIO,
        FsError::CrossDevice => libc::EXDEV,
        other => panic!("unexpected error {other}"),
    }
}

fn host_err(r: std::io::Result<()>) -> Result<(), i32> {
    r.map_err(|e| e.raw_os_error().expect("an OS error"))
}

fn host_rc(rc: libc::c_int) -> Result<(), i32> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// One randomly chosen operation, applied to the host directory and to ubtrfs.
#[derive(Clone, Debug)]
enum Op {
    Create(String),
    Mkdir(String),
    Write(String, u64, Vec<u8>),
    Truncate(String, u64),
    Unlink(String),
    Rmdir(String),
    Link(String, String),
    Symlink(Vec<u8>, String),
    Rename(String, String, u32),
    SetXattr(String, String, Vec<u8>, u32),
    RemoveXattr(String, String),
    Fallocate(String, u32, u64, u64),
    Chmod(String, u32),
    Copy(String, String, u64, u64, u64),
    Open(String),
    Close(usize),
    WriteHandle(usize, u64, Vec<u8>),
    Sync,
    Remount,
}

struct Model {
    host: PathBuf,
    handles: Vec<(std::fs::File, u64)>,
}

impl Model {
    fn p(&self, rel: &str) -> PathBuf {
        self.host.join(rel)
    }

    /// (relative path, kind) of everything under the host root.
    fn listing(&self) -> Vec<(String, u32)> {
        host_snapshot(&self.host)
            .into_iter()
            .filter(|(p, _)| p != ".")
            .map(|(p, n)| (p[2..].to_string(), n.kind))
            .collect()
    }
}

const NAMES: [&str; 6] = ["a", "b", "c", "dd", "e", "f"];

fn random_op(rng: &mut Rng, m: &Model) -> Op {
    let all = m.listing();
    let pick = |rng: &mut Rng, want: Option<u32>| -> Option<String> {
        let v: Vec<&(String, u32)> = all
            .iter()
            .filter(|(_, k)| want.is_none_or(|w| *k == w))
            .collect();
        if v.is_empty() {
            None
        } else {
            Some(v[rng.below(v.len() as u64) as usize].0.clone())
        }
    };
    // A path that may or may not exist: an existing directory (or a missing/odd one, rarely)
    // plus a name from a small pool, so that collisions are frequent.
    let new_path = |rng: &mut Rng| -> String {
        let dir = match rng.below(10) {
            0..=3 => String::new(),
            4 if !all.is_empty() => pick(rng, None).unwrap(),
            5 => "missing".to_string(),
            _ => pick(rng, Some(S_IFDIR)).unwrap_or_default(),
        };
        let name = if rng.below(60) == 0 {
            "L".repeat(256)
        } else {
            NAMES[rng.below(NAMES.len() as u64) as usize].to_string()
        };
        if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        }
    };
    let any_path = |rng: &mut Rng| -> String {
        if rng.below(5) == 0 {
            new_path(rng)
        } else {
            pick(rng, None).unwrap_or_else(|| new_path(rng))
        }
    };
    let file = |rng: &mut Rng| pick(rng, Some(S_IFREG));
    let data = |rng: &mut Rng| -> Vec<u8> {
        let len = match rng.below(4) {
            0 => rng.below(100) + 1,
            1 => rng.below(5000) + 1,
            2 => rng.below(70_000) + 1,
            _ => 4096 * (rng.below(8) + 1),
        };
        pattern(rng.next_u64(), len as usize)
    };
    let offset = |rng: &mut Rng| -> u64 {
        match rng.below(4) {
            0 => 0,
            1 => rng.below(10_000),
            2 => 4096 * rng.below(64),
            _ => rng.below(600_000),
        }
    };
    loop {
        let op = match rng.below(100) {
            0..=9 => Op::Create(new_path(rng)),
            10..=14 => Op::Mkdir(new_path(rng)),
            15..=29 => match file(rng) {
                Some(f) => Op::Write(f, offset(rng), data(rng)),
                None => continue,
            },
            30..=35 => match file(rng) {
                Some(f) => Op::Truncate(f, offset(rng)),
                None => continue,
            },
            36..=42 => Op::Unlink(any_path(rng)),
            43..=46 => Op::Rmdir(any_path(rng)),
            47..=52 => Op::Link(any_path(rng), new_path(rng)),
            53..=55 => Op::Symlink(
                format!("/nonexistent-ubtrfs-target/{}", rng.below(1000)).into_bytes(),
                new_path(rng),
            ),
            56..=65 => {
                let flags = match rng.below(6) {
                    0 => RENAME_NOREPLACE,
                    1 => RENAME_EXCHANGE,
                    _ => 0,
                };
                let to = if rng.below(2) == 0 {
                    any_path(rng)
                } else {
                    new_path(rng)
                };
                Op::Rename(any_path(rng), to, flags)
            }
            66..=70 => {
                let want = if rng.below(3) == 0 { S_IFDIR } else { S_IFREG };
                let Some(t) = pick(rng, Some(want)) else {
                    continue;
                };
                let name = format!("user.x{}", rng.below(4));
                let flags = [0, XATTR_CREATE, XATTR_REPLACE][rng.below(3) as usize];
                let v = pattern(rng.next_u64(), rng.below(300) as usize);
                Op::SetXattr(t, name, v, flags)
            }
            71..=72 => {
                let Some(t) = pick(rng, Some(S_IFREG)) else {
                    continue;
                };
                Op::RemoveXattr(t, format!("user.x{}", rng.below(4)))
            }
            73..=80 => match file(rng) {
                Some(f) => {
                    let mode = [
                        0,
                        FALLOC_FL_KEEP_SIZE,
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        FALLOC_FL_ZERO_RANGE,
                        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                    ][rng.below(5) as usize];
                    Op::Fallocate(f, mode, offset(rng), rng.below(300_000) + 1)
                }
                None => continue,
            },
            81..=83 => {
                let want = if rng.below(2) == 0 { S_IFREG } else { S_IFDIR };
                match pick(rng, Some(want)) {
                    Some(t) => Op::Chmod(t, 0o700 | rng.below(0o100) as u32),
                    None => continue,
                }
            }
            84..=86 => match (file(rng), file(rng)) {
                (Some(a), Some(b)) => {
                    Op::Copy(a, b, offset(rng), offset(rng), rng.below(200_000) + 1)
                }
                _ => continue,
            },
            87..=89 => match file(rng) {
                Some(f) if m.handles.len() < 3 => Op::Open(f),
                _ => continue,
            },
            90..=91 if !m.handles.is_empty() => {
                Op::Close(rng.below(m.handles.len() as u64) as usize)
            }
            92..=95 if !m.handles.is_empty() => Op::WriteHandle(
                rng.below(m.handles.len() as u64) as usize,
                offset(rng),
                data(rng),
            ),
            96..=98 => Op::Sync,
            99 => Op::Remount,
            _ => continue,
        };
        return op;
    }
}

/// Apply `op` to the host directory; the errno on failure.
fn host_apply(m: &mut Model, op: &Op) -> Result<(), i32> {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    match op {
        Op::Create(p) => host_err(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.p(p))
                .map(|_| ()),
        ),
        Op::Mkdir(p) => host_err(std::fs::create_dir(m.p(p))),
        Op::Write(p, off, d) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m.p(p))
                .unwrap();
            f.write_all_at(d, *off).unwrap();
            Ok(())
        }
        Op::Truncate(p, size) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m.p(p))
                .unwrap();
            host_err(f.set_len(*size))
        }
        Op::Unlink(p) => host_err(std::fs::remove_file(m.p(p))),
        Op::Rmdir(p) => host_err(std::fs::remove_dir(m.p(p))),
        Op::Link(a, b) => host_err(std::fs::hard_link(m.p(a), m.p(b))),
        Op::Symlink(t, p) => host_err(std::os::unix::fs::symlink(
            std::ffi::OsStr::from_bytes(t),
            m.p(p),
        )),
        Op::Rename(a, b, flags) => {
            let (ca, cb) = (cstr(&m.p(a)), cstr(&m.p(b)));
            // SAFETY: both paths are NUL-terminated and live across the call.
            host_rc(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    ca.as_ptr(),
                    libc::AT_FDCWD,
                    cb.as_ptr(),
                    *flags,
                )
            })
        }
        Op::SetXattr(p, n, v, flags) => {
            let (c, cn) = (cstr(&m.p(p)), CString::new(n.as_str()).unwrap());
            // SAFETY: NUL-terminated strings and a value slice with its exact length.
            host_rc(unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    cn.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    *flags as i32,
                )
            })
        }
        Op::RemoveXattr(p, n) => {
            let (c, cn) = (cstr(&m.p(p)), CString::new(n.as_str()).unwrap());
            // SAFETY: NUL-terminated strings that live across the call.
            host_rc(unsafe { libc::lremovexattr(c.as_ptr(), cn.as_ptr()) })
        }
        Op::Fallocate(p, mode, off, len) => {
            use std::os::fd::AsRawFd;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m.p(p))
                .unwrap();
            // SAFETY: a valid open file descriptor; plain integer arguments.
            host_rc(unsafe {
                libc::fallocate(f.as_raw_fd(), *mode as i32, *off as i64, *len as i64)
            })
        }
        Op::Chmod(p, mode) => host_err(std::fs::set_permissions(
            m.p(p),
            std::fs::Permissions::from_mode(*mode),
        )),
        Op::Copy(a, b, oi, oo, len) => {
            let same = std::fs::metadata(m.p(a)).unwrap().ino()
                == std::fs::metadata(m.p(b)).unwrap().ino();
            if same && *oi < oo + len && *oo < oi + len {
                return Err(libc::EINVAL);
            }
            let src = std::fs::read(m.p(a)).unwrap();
            let dst = std::fs::OpenOptions::new()
                .write(true)
                .open(m.p(b))
                .unwrap();
            let from = (*oi as usize).min(src.len());
            let to = (oi + len).min(src.len() as u64) as usize;
            if from < to {
                dst.write_all_at(&src[from..to], *oo).unwrap();
            }
            Ok(())
        }
        Op::Open(p) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.p(p))
                .unwrap();
            let ino = f.metadata().unwrap().ino();
            m.handles.push((f, ino));
            Ok(())
        }
        Op::Close(i) => {
            m.handles.remove(*i);
            Ok(())
        }
        Op::WriteHandle(i, off, d) => {
            m.handles[*i].0.write_all_at(d, *off).unwrap();
            Ok(())
        }
        Op::Sync | Op::Remount => Ok(()),
    }
}

/// Apply `op` to ubtrfs. `handles` holds the inode of each open handle (parallel to the
/// model's).
fn ubtrfs_apply(f: &Fs, handles: &mut Vec<u64>, op: &Op) -> Result<(), FsError> {
    let (fs, root) = (f.fs.clone(), f.root);
    match op {
        Op::Create(p) => f.create(p, S_IFREG | 0o644).map(|_| ()),
        Op::Mkdir(p) => f.create(p, S_IFDIR | 0o755).map(|_| ()),
        Op::Write(p, off, d) => btrfs_buffered_write(&fs, root, f.try_ino(p)?, *off, d).map(|_| ()),
        Op::Truncate(p, size) => btrfs_setattr(
            &fs,
            root,
            f.try_ino(p)?,
            &SetAttr {
                size: Some(*size),
                mtime: Some(TimeSet::Now),
                ..Default::default()
            },
        )
        .map(|_| ()),
        Op::Unlink(p) => f.unlink(p),
        Op::Rmdir(p) => f.rmdir(p),
        Op::Link(a, b) => f.link(a, b),
        Op::Symlink(t, p) => {
            let (d, n) = f.parent(p)?;
            btrfs_symlink(&fs, root, d, &n, t, 0, 0).map(|_| ())
        }
        Op::Rename(a, b, flags) => f.rename(a, b, *flags),
        Op::SetXattr(p, n, v, flags) => {
            btrfs_setxattr(&fs, root, f.try_ino(p)?, n.as_bytes(), v, *flags)
        }
        Op::RemoveXattr(p, n) => btrfs_removexattr(&fs, root, f.try_ino(p)?, n.as_bytes()),
        Op::Fallocate(p, mode, off, len) => {
            btrfs_fallocate(&fs, root, f.try_ino(p)?, *mode, *off, *len)
        }
        Op::Chmod(p, mode) => btrfs_setattr(
            &fs,
            root,
            f.try_ino(p)?,
            &SetAttr {
                mode: Some(*mode),
                ..Default::default()
            },
        )
        .map(|_| ()),
        Op::Copy(a, b, oi, oo, len) => {
            let (ia, ib) = (f.try_ino(a)?, f.try_ino(b)?);
            ubtrfs_fs::file_write::copy_file_range(&fs, root, ia, *oi, root, ib, *oo, *len)
                .map(|_| ())
        }
        Op::Open(p) => {
            let ino = f.try_ino(p)?;
            fs.note_open(root, ino);
            handles.push(ino);
            Ok(())
        }
        Op::Close(i) => {
            let ino = handles.remove(*i);
            if fs.note_release(root, ino) {
                ubtrfs_fs::inode::btrfs_evict_inode(&fs, root, ino)?;
            }
            Ok(())
        }
        Op::WriteHandle(i, off, d) => {
            btrfs_buffered_write(&fs, root, handles[*i], *off, d).map(|_| ())
        }
        Op::Sync => fs.sync(),
        Op::Remount => unreachable!("run_random remounts"),
    }
}

/// The host tree and ubtrfs's must agree on names, types, sizes, content, permissions,
/// symlink targets, xattrs, link counts of non-directories and which names share an inode.
fn assert_same_as_host(ub: &Snapshot, host: &Snapshot, ctx: &str) {
    let a: BTreeSet<_> = ub.keys().collect();
    let b: BTreeSet<_> = host.keys().collect();
    assert_eq!(a, b, "{ctx}: names differ between ubtrfs and the host");
    let mut groups_u: BTreeMap<u64, BTreeSet<&String>> = BTreeMap::new();
    let mut groups_h: BTreeMap<u64, BTreeSet<&String>> = BTreeMap::new();
    for (p, u) in ub {
        let h = &host[p];
        assert_eq!(kind_name(u.kind), kind_name(h.kind), "{ctx}: {p}: type");
        if u.kind == S_IFLNK {
            assert_eq!(u.data, h.data, "{ctx}: {p}: symlink target");
            continue;
        }
        if p != "." {
            assert_eq!(u.perm, h.perm, "{ctx}: {p}: permissions");
        }
        assert_eq!(u.xattrs, h.xattrs, "{ctx}: {p}: xattrs");
        if u.kind == S_IFREG {
            assert_eq!(u.size, h.size, "{ctx}: {p}: size");
            assert!(u.data == h.data, "{ctx}: {p}: content differs");
            assert_eq!(u.nlink, h.nlink, "{ctx}: {p}: nlink");
            groups_u.entry(u.ino).or_default().insert(p);
            groups_h.entry(h.ino).or_default().insert(p);
        }
    }
    let gu: BTreeSet<_> = groups_u.into_values().collect();
    let gh: BTreeSet<_> = groups_h.into_values().collect();
    assert_eq!(gu, gh, "{ctx}: hard link groups");
}

/// The times of one object, with its identity: `(root, ino)` in ubtrfs, `(dev, ino)` on the
/// host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Times {
    id: (u64, u64),
    mtime: (i64, u32),
    ctime: (i64, u32),
}

/// The times of every object, by path.
type TimeMap = BTreeMap<String, Times>;

/// (mtime, ctime) of every object by path, without reading content: ubtrfs side.
fn ubtrfs_times(fs: &FsInfo) -> TimeMap {
    fn walk(fs: &FsInfo, root: u64, dir: u64, path: &str, out: &mut TimeMap) {
        let mut ii = ubtrfs_fs::inode::read_inode(fs, root, dir).unwrap();
        ubtrfs_fs::file_write::live_attrs(fs, root, dir, &mut ii);
        out.insert(
            path.to_string(),
            Times {
                id: (root, dir),
                mtime: (ii.mtime.sec as i64, ii.mtime.nsec),
                ctime: (ii.ctime.sec as i64, ii.ctime.nsec),
            },
        );
        if ii.mode & S_IFMT != S_IFDIR {
            return;
        }
        for e in ubtrfs_fs::dir_item::readdir(fs, root, dir, 0, usize::MAX).unwrap() {
            let Target::Inode { root: r, ino } = e.target else {
                continue;
            };
            walk(
                fs,
                r,
                ino,
                &format!("{path}/{}", String::from_utf8_lossy(&e.name)),
                out,
            );
        }
    }
    let root = fs.mount_root;
    let dir = fs.root(root).unwrap().item.root_dirid;
    let mut out = BTreeMap::new();
    walk(fs, root, dir, ".", &mut out);
    out
}

/// (mtime, ctime) of every object by path: host side.
fn host_times(dir: &Path) -> TimeMap {
    let mut out = BTreeMap::new();
    fn walk(p: &Path, rel: &str, out: &mut TimeMap) {
        let md = std::fs::symlink_metadata(p).unwrap();
        out.insert(
            rel.to_string(),
            Times {
                id: (md.dev(), md.ino()),
                mtime: (md.mtime(), md.mtime_nsec() as u32),
                ctime: (md.ctime(), md.ctime_nsec() as u32),
            },
        );
        if md.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                let e = e.unwrap();
                walk(
                    &e.path(),
                    &format!("{rel}/{}", e.file_name().to_string_lossy()),
                    out,
                );
            }
        }
    }
    walk(dir, ".", &mut out);
    out
}

/// The paths (after the operation) of the objects whose mtime / ctime the operation changed:
/// each object is compared with itself, found by identity wherever the operation moved it;
/// objects the operation created are left out. Comparing by path would compare two different
/// objects where the operation put one in place of another (a rename over an existing name,
/// RENAME_EXCHANGE), and whether their times are equal is then a matter of clock ticks: the
/// host stamps objects changed by different operations with the same coarse time when the
/// coarse clock stalls across them, and the two parents of one rename with different times
/// when a tick falls between the two stamps, where ubtrfs takes one fine-grained time per
/// operation.
fn changed_times(before: &TimeMap, after: &TimeMap) -> (BTreeSet<String>, BTreeSet<String>) {
    let by_id: BTreeMap<(u64, u64), &Times> = before.values().map(|t| (t.id, t)).collect();
    let mut m = BTreeSet::new();
    let mut c = BTreeSet::new();
    for (p, a) in after {
        if let Some(b) = by_id.get(&a.id) {
            if a.mtime != b.mtime {
                m.insert(p.clone());
            }
            if a.ctime != b.ctime {
                c.insert(p.clone());
            }
        }
    }
    (m, c)
}

/// Waits until the coarse realtime clock is past every time in `maps`, so that every time the
/// next operation sets, on either side, differs from the one it replaces. The host takes its
/// timestamps from that clock (a multigrain filesystem takes a fine-grained time instead only
/// for an inode whose times were read since its last change, and never one behind the coarse
/// clock); ubtrfs takes them from the fine-grained realtime clock, which is never behind the
/// coarse one. A sleep of one tick (4 ms at HZ=250) is not enough: when the CPU that keeps
/// time is held up (a VM whose vCPU is not running), the coarse clock stands still for up to
/// a few ticks before another CPU updates it (measured here under load: up to 17 ms). The
/// wait is bounded (1 s): only a clock stepped back, after which new times differ from the
/// old ones anyway, or a time in the future could hold it up longer, and neither is a reason
/// to hang the test.
fn wait_for_clock_past(maps: &[&TimeMap]) {
    let Some(max) = maps
        .iter()
        .flat_map(|m| m.values())
        .flat_map(|t| [t.mtime, t.ctime])
        .max()
    else {
        return;
    };
    let start = std::time::Instant::now();
    loop {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_REALTIME_COARSE)");
        if (ts.tv_sec, ts.tv_nsec as u32) > max || start.elapsed().as_secs() >= 1 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

/// SEEK_DATA / SEEK_HOLE of every regular file, at a few offsets, by ubtrfs and the kernel.
fn compare_seeks(fs: &FsInfo, ub: &Snapshot, mnt: &Path) {
    for (p, n) in ub.iter().filter(|(_, n)| n.kind == S_IFREG) {
        let c = cstr(&mnt.join(&p[2..]));
        // SAFETY: `c` is a NUL-terminated path living across the call.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
        assert!(fd >= 0);
        for off in [
            0,
            1,
            4095,
            4096,
            n.size / 3,
            n.size / 2,
            n.size.saturating_sub(1),
            n.size,
        ] {
            for wh in [SEEK_DATA, SEEK_HOLE] {
                let ours = btrfs_llseek_data_hole(fs, fs.mount_root, n.ino, off as i64, wh)
                    .map_err(|e| errno_of(&e));
                let w = if wh == SEEK_DATA {
                    libc::SEEK_DATA
                } else {
                    libc::SEEK_HOLE
                };
                // SAFETY: `fd` is open; plain integer arguments.
                let k = unsafe { libc::lseek(fd, off as i64, w) };
                let kernel = if k < 0 {
                    Err(std::io::Error::last_os_error().raw_os_error().unwrap())
                } else {
                    Ok(k as u64)
                };
                assert_eq!(ours, kernel, "{p}: lseek({off}, {wh}), size {}", n.size);
            }
        }
        // SAFETY: `fd` was opened above.
        unsafe { libc::close(fd) };
    }
}

fn run_random(seed: u64, kind: Mkfs, extra: &[&str], steps: usize) {
    let d = TestDir::new(&format!("random-{kind:?}-{seed}"));
    let img = make_image(&d, kind, 1 << 30, extra);
    let host = d.join("host");
    std::fs::create_dir(&host).unwrap();
    let mut model = Model {
        host: host.clone(),
        handles: Vec::new(),
    };
    let mut rng = Rng::new(seed);
    let mut f = Fs::open(&img);
    let mut handles: Vec<u64> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let mut stats: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for step in 0..steps {
        let op = random_op(&mut rng, &model);
        log.push(format!("{step}: {op:?}").chars().take(200).collect());
        let ctx = || {
            format!(
                "seed {seed} {kind:?} step {step}: {op:?}\nlast ops:\n{}",
                log[log.len().saturating_sub(15)..].join("\n")
            )
        };
        if let Op::Remount = op {
            model.handles.clear();
        }
        let (hb, ub) = (host_times(&host), ubtrfs_times(&f.fs));
        // Let the clock move so that every time update is visible.
        wait_for_clock_past(&[&hb, &ub]);
        let h = host_apply(&mut model, &op);
        let u = if let Op::Remount = op {
            // A crash with files open: their orphans are cleaned up at the next mount.
            f.sync();
            drop(f);
            handles.clear();
            // The crashed state (orphans of open files included) is consistent.
            btrfs_check(&img);
            f = Fs::open(&img);
            ubtrfs_fs::inode::orphan_cleanup(&f.fs).unwrap();
            Ok(())
        } else {
            ubtrfs_apply(&f, &mut handles, &op).map_err(|e| errno_of(&e))
        };
        assert_eq!(u, h, "{}", ctx());
        // btrfs leaves the times alone when a punched range is all hole already (ext4 does
        // not), and a remount reopens another view of the same state.
        let punch = matches!(op, Op::Fallocate(_, m, _, _) if m & FALLOC_FL_PUNCH_HOLE != 0);
        if !matches!(op, Op::Remount) && !punch {
            let (hm, hc) = changed_times(&hb, &host_times(&host));
            let (um, uc) = changed_times(&ub, &ubtrfs_times(&f.fs));
            assert_eq!(um, hm, "mtime changes: {}", ctx());
            assert_eq!(uc, hc, "ctime changes: {}", ctx());
        }
        let name = format!("{op:?}");
        let name = name.split('(').next().unwrap_or("").to_string();
        let e = stats.entry(name).or_insert((0, 0));
        if u.is_ok() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        if step % 50 == 49 {
            let ub = ubtrfs_snapshot(&f.fs);
            assert_same_as_host(&ub, &host_snapshot(&host), &ctx());
        }
    }
    eprintln!("seed {seed} {kind:?}: (ok, failed) per operation: {stats:?}");
    // Last releases, then the final comparison.
    while !model.handles.is_empty() {
        host_apply(&mut model, &Op::Close(0)).unwrap();
        ubtrfs_apply(&f, &mut handles, &Op::Close(0)).unwrap();
    }
    f.sync();
    let live = ubtrfs_snapshot(&f.fs);
    assert_same_as_host(
        &live,
        &host_snapshot(&host),
        &format!("seed {seed} {kind:?} end"),
    );
    drop(f);
    let ub = verify_image(&img, &d);
    assert_same_as_host(
        &ub,
        &host_snapshot(&host),
        &format!("seed {seed} {kind:?} reopened"),
    );
    let dump = dump_fs_tree(&img);
    assert!(
        !dump.contains("ORPHAN"),
        "orphan item left after all releases"
    );
    let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
    let m = KernelMount::new(&img, &d.join("mnt"));
    compare_seeks(&fs, &ub, &m.dir);
    drop(m);
    drop(fs);
    kernel_removes_everything(&img, &d);
}

/// The kernel, mounted read-write on what ubtrfs wrote, deletes every file and directory
/// (freeing every extent through the references ubtrfs recorded) without complaint; btrfs
/// check is clean afterwards.
fn kernel_removes_everything(img: &Path, d: &TestDir) {
    {
        let m = KernelMount::with_options(img, &d.join("kmnt"), "rw");
        for e in std::fs::read_dir(&m.dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                std::fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("kernel rm -r {p:?}: {e}"));
            } else {
                std::fs::remove_file(&p).unwrap_or_else(|e| panic!("kernel rm {p:?}: {e}"));
            }
        }
        assert!(Command::new("sync").status().unwrap().success());
        assert_eq!(std::fs::read_dir(&m.dir).unwrap().count(), 0);
    }
    btrfs_check(img);
    let dump = dump_fs_tree(img);
    assert!(
        !dump.contains("EXTENT_DATA"),
        "extents left after the kernel's rm:\n{dump}"
    );
}

// Test scenario: a thousand seeded random namespace, data and attribute operations per run
// (create, mkdir, write, truncate, unlink, rmdir, link, symlink, rename with flags, xattrs,
// fallocate modes, chmod, copy_file_range, open handles across unlink, sync, crash-remount
// with orphan cleanup) applied to ubtrfs and to a host directory; every result (errno
// included) must match, the trees must match along the way and at the end, btrfs check must
// be clean, the kernel must see what ubtrfs sees, and SEEK_DATA/SEEK_HOLE must agree with
// the kernel's. Seeds that once failed are kept in the list.
#[test]
fn random_ops_match_host_model() {
    let steps = std::env::var("UBTRFS_RANDOM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let seeds: Vec<u64> = match std::env::var("UBTRFS_RANDOM_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => vec![1, 2],
    };
    for seed in seeds {
        for kind in BOTH {
            run_random(seed, kind, &[], steps);
        }
        // 4 KiB nodes: many more leaves, splits and merges for the same operations.
        run_random(seed, Mkfs::Progs, &["-n", "4096"], steps);
    }
}

// Test scenario (regression for btrfs_buffered_write): the kernel truncates a file to an
// unaligned size, which leaves the old bytes after EOF in the last sector on disk (it zeroes
// them only in the page cache); ubtrfs then writes beyond EOF. Those bytes must read as zeros
// — the kernel zeroes them at every extension (`btrfs_cont_expand`) — through ubtrfs, after a
// reopen and through the kernel. The same through an expanding truncate and a fallocate.
#[test]
fn write_past_kernel_truncated_eof_reads_zeros() {
    let d = TestDir::new("stale-tail");
    let img = make_image(&d, Mkfs::Progs, 512 << 20, &[]);
    {
        let m = KernelMount::with_options(&img, &d.join("mnt"), "rw");
        for name in ["w", "t", "f"] {
            std::fs::write(m.dir.join(name), pattern(1, 8192)).unwrap();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m.dir.join(name))
                .unwrap();
            f.sync_all().unwrap();
            f.set_len(5000).unwrap();
        }
        assert!(Command::new("sync").status().unwrap().success());
    }
    let mut want = pattern(1, 5000);
    want.resize(12_000, 0);
    {
        let f = Fs::open(&img);
        let w = f.ino("w");
        f.write(w, 11_999, &[0]);
        assert!(f.read(w) == want, "write past EOF exposes stale bytes");
        let t = f.ino("t");
        f.truncate(t, 12_000);
        let ff = f.ino("f");
        f.fallocate(ff, 0, 10_000, 2000);
        for ino in [w, t, ff] {
            assert!(f.read(ino) == want, "ino {ino} before sync");
        }
        f.sync();
    }
    let s = verify_image(&img, &d);
    for name in ["w", "t", "f"] {
        assert!(s[&format!("./{name}")].data == want, "{name}");
    }
}

// Test scenario: on a filesystem without NO_HOLES every gap up to i_size needs a hole item:
// an expanding truncate, a punched hole, a fallocate past EOF and a shrinking truncate keep
// the file extent items contiguous (btrfs check's "file extent discount").
#[test]
fn holes_without_no_holes_feature() {
    let d = TestDir::new("holes");
    let img = make_image(&d, Mkfs::Progs, 512 << 20, &["-O", "^no-holes"]);
    let mut want: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    {
        let f = Fs::open(&img);
        let a = f.file("grown", &pattern(1, 100_000));
        let p = f.file("punched", &pattern(2, 1 << 20));
        let k = f.file("falloc-past", &pattern(3, 10_000));
        let t = f.file("shrunk", &pattern(4, 300_000));
        f.sync();
        f.truncate(a, 3 << 20);
        let mut w = pattern(1, 100_000);
        w.resize(3 << 20, 0);
        want.insert("grown", w);
        f.fallocate(
            p,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            100_000,
            500_000,
        );
        let mut w = pattern(2, 1 << 20);
        w[100_000..600_000].fill(0);
        want.insert("punched", w);
        f.fallocate(k, 0, 1 << 20, 100_000);
        let mut w = pattern(3, 10_000);
        w.resize((1 << 20) + 100_000, 0);
        want.insert("falloc-past", w);
        f.truncate(t, 2 << 20);
        f.truncate(t, 150_000);
        want.insert("shrunk", pattern(4, 150_000));
        f.sync();
    }
    let s = verify_image(&img, &d);
    for (name, w) in &want {
        assert!(s[&format!("./{name}")].data == *w, "{name}");
    }
}

/// Two different names with the same btrfs name hash: `{prefix}1371838` and
/// `{prefix}2000402` collide for any prefix (found by a birthday search; crc32c is linear, so
/// for two names that differ only in their tails the common prefix drops out).
fn colliding_names(prefix: &str) -> (String, String) {
    let (a, b) = (format!("{prefix}1371838"), format!("{prefix}2000402"));
    assert_eq!(
        ubtrfs_format::csum::name_hash(a.as_bytes()),
        ubtrfs_format::csum::name_hash(b.as_bytes()),
        "{a} and {b} must collide"
    );
    (a, b)
}

// Test scenario: names whose hashes collide share one DIR_ITEM (and xattr names one
// XATTR_ITEM): creating, renaming away, replacing and removing one of them must keep the
// other entry intact in the same item, as the kernel's btrfs_delete_one_dir_name does.
#[test]
fn hash_collision_items() {
    let (a, b) = colliding_names("c");
    let (xa, xb) = colliding_names("user.x");
    for kind in BOTH {
        let d = TestDir::new(&format!("collide-{kind:?}"));
        let img = make_image(&d, kind, 512 << 20, &[]);
        {
            let f = Fs::open(&img);
            f.mkdir("dir");
            let ia = f.file(&format!("dir/{a}"), b"first");
            f.file(&format!("dir/{b}"), b"second");
            let set =
                |n: &str, v: &[u8], fl| btrfs_setxattr(&f.fs, f.root, ia, n.as_bytes(), v, fl);
            set(&xa, b"one", XATTR_CREATE).unwrap();
            set(&xb, b"two", XATTR_CREATE).unwrap();
            assert!(matches!(set(&xb, b"2", XATTR_CREATE), Err(FsError::Exists)));
            f.sync();
            let dump = dump_fs_tree(&img);
            assert!(dump.contains(&format!("name: {a}")) && dump.contains(&format!("name: {b}")));
            set(&xa, b"one, replaced and longer", XATTR_REPLACE).unwrap();
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(s[&format!("./dir/{a}")].data, b"first");
        assert_eq!(s[&format!("./dir/{b}")].data, b"second");
        let x = &s[&format!("./dir/{a}")].xattrs;
        assert_eq!(x[xa.as_bytes()], b"one, replaced and longer");
        assert_eq!(x[xb.as_bytes()], b"two");
        {
            let f = Fs::open(&img);
            let ia = f.ino(&format!("dir/{a}"));
            btrfs_removexattr(&f.fs, f.root, ia, xa.as_bytes()).unwrap();
            f.rename(&format!("dir/{a}"), "moved", 0).unwrap();
            f.link(&format!("dir/{b}"), &format!("dir/{a}")).unwrap();
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(s["./moved"].data, b"first");
        assert_eq!(s["./moved"].xattrs.len(), 1);
        assert_eq!(s[&format!("./dir/{a}")].data, b"second");
        assert_eq!(nlink_of(&s, &format!("./dir/{b}")), 2);
        {
            let f = Fs::open(&img);
            f.unlink(&format!("dir/{b}")).unwrap();
            f.sync();
        }
        let s = verify_image(&img, &d);
        assert_eq!(s[&format!("./dir/{a}")].data, b"second");
        assert!(!s.contains_key(&format!("./dir/{b}")));
    }
}
