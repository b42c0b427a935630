//! Tree snapshots and their comparison.
//!
//! A [`Snapshot`] records, for every path below a root (without following symlinks): type,
//! permission bits, owner, size, link count, inode number, blocks, times with nanoseconds,
//! a SHA-256 of the content, the symlink target, the user.* xattrs, or the errno that stopped
//! any of these. [`diff`] compares two snapshots field by field as [`CompareOptions`] says and
//! returns every difference as a readable line; [`assert_same`] panics with all of them.
//!
//! Snapshots (instead of walking both trees at once) let a test compare a FUSE mount and a
//! kernel mount of the same image, which cannot be mounted at the same time.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    Unknown,
}

/// Everything recorded about one path.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (st_mode & 0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub ino: u64,
    /// st_dev: the kernel gives each subvolume its own, a FUSE mount has one.
    pub dev: u64,
    pub blocks: u64,
    pub rdev: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    /// Regular files: SHA-256 of the content, or the error that stopped reading.
    pub content: Option<Result<[u8; 32], String>>,
    /// Symlinks: the target.
    pub target: Option<Result<OsString, String>>,
    /// user.* xattrs (name -> value), or the error listing/reading them.
    pub xattrs: Result<BTreeMap<OsString, Vec<u8>>, String>,
}

/// A recorded tree: relative path ("" is the root) -> entry, or the error lstat returned.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub root: PathBuf,
    pub entries: BTreeMap<PathBuf, Result<Entry, String>>,
    /// Directories that could not be listed.
    pub dir_errors: BTreeMap<PathBuf, String>,
}

fn io_err(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => super::errno_name(n),
        None => e.to_string(),
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// The names of all xattrs of `path` (not following symlinks).
pub fn list_xattrs(path: &Path) -> Result<Vec<OsString>, std::io::Error> {
    let p = cpath(path);
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: p is a valid C string, buf is writable for buf.len() bytes.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| OsStr::from_bytes(s).to_os_string())
                .collect());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 24) {
            let new_len = buf.len() * 4;
            buf.resize(new_len, 0);
            continue;
        }
        return Err(e);
    }
}

/// The value of one xattr (not following symlinks).
pub fn get_xattr(path: &Path, name: &OsStr) -> Result<Vec<u8>, std::io::Error> {
    let p = cpath(path);
    let n = CString::new(name.as_bytes()).expect("xattr name without NUL");
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: p and n are valid C strings, buf is writable for buf.len() bytes.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 24) {
            let new_len = buf.len() * 4;
            buf.resize(new_len, 0);
            continue;
        }
        return Err(e);
    }
}

fn user_xattrs(path: &Path) -> Result<BTreeMap<OsString, Vec<u8>>, String> {
    let names = list_xattrs(path).map_err(|e| format!("listxattr: {}", io_err(&e)))?;
    let mut m = BTreeMap::new();
    for n in names {
        if !n.as_bytes().starts_with(b"user.") {
            continue;
        }
        let v = get_xattr(path, &n)
            .map_err(|e| format!("getxattr {}: {}", n.to_string_lossy(), io_err(&e)))?;
        m.insert(n, v);
    }
    Ok(m)
}

/// SHA-256 of a file's content.
pub fn hash_file(path: &Path) -> Result<[u8; 32], std::io::Error> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn kind_of(ft: fs::FileType) -> Kind {
    if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else {
        Kind::Unknown
    }
}

/// Record the tree below `root`.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut s = Snapshot {
        root: root.to_path_buf(),
        ..Default::default()
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = match fs::symlink_metadata(&full) {
            Ok(md) => md,
            Err(e) => {
                s.entries.insert(rel, Err(format!("lstat: {}", io_err(&e))));
                continue;
            }
        };
        let kind = kind_of(md.file_type());
        let content = (kind == Kind::File).then(|| hash_file(&full).map_err(|e| io_err(&e)));
        let target = (kind == Kind::Symlink).then(|| {
            fs::read_link(&full)
                .map(PathBuf::into_os_string)
                .map_err(|e| io_err(&e))
        });
        let entry = Entry {
            kind,
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            nlink: md.nlink(),
            ino: md.ino(),
            dev: md.dev(),
            blocks: md.blocks(),
            rdev: md.rdev(),
            atime: (md.atime(), md.atime_nsec()),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            content,
            target,
            xattrs: user_xattrs(&full),
        };
        s.entries.insert(rel.clone(), Ok(entry));
        if kind == Kind::Dir {
            match fs::read_dir(&full) {
                Ok(rd) => {
                    let mut names = Vec::new();
                    for de in rd {
                        match de {
                            Ok(de) => names.push(de.file_name()),
                            Err(e) => {
                                s.dir_errors
                                    .insert(rel.clone(), format!("readdir: {}", io_err(&e)));
                                break;
                            }
                        }
                    }
                    names.sort();
                    for n in names.into_iter().rev() {
                        stack.push(rel.join(n));
                    }
                }
                Err(e) => {
                    s.dir_errors
                        .insert(rel.clone(), format!("opendir: {}", io_err(&e)));
                }
            }
        }
    }
    s
}

/// How precisely times are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimePrecision {
    /// Only the seconds (mkfs.btrfs --rootdir of btrfs-progs 6.2 drops nanoseconds).
    Seconds,
    /// Seconds and nanoseconds.
    Nanos,
}

/// Which fields to compare.
#[derive(Clone, Copy, Debug)]
pub struct CompareOptions {
    /// mtime precision (mtime is always compared).
    pub mtime: Option<TimePrecision>,
    /// Also compare atime and ctime (both sides read the same image: FUSE vs kernel).
    pub atime_ctime: bool,
    /// Compare the root directory's own attributes (mkfs --rootdir does not copy them).
    pub root_attrs: bool,
    /// Compare link counts, st_blocks and directory sizes: only meaningful when both sides are
    /// the same btrfs image.
    pub same_image: bool,
    /// Compare inode numbers (with `same_image`; ubtrfs maps the inode numbers of subvolumes
    /// other than the mounted one, so trees with subvolumes turn this off).
    pub inode_numbers: bool,
    /// Compare hard-link groups (paths sharing an inode).
    pub hardlinks: bool,
    /// Compare user.* xattrs.
    pub xattrs: bool,
    /// Compare owners.
    pub owners: bool,
}

impl CompareOptions {
    /// A mkfs.btrfs --rootdir image (btrfs-progs 6.2) against its source tree: mtime to the
    /// second, root attributes not copied, everything else preserved.
    pub fn mkfs_vs_source() -> Self {
        CompareOptions {
            mtime: Some(TimePrecision::Seconds),
            atime_ctime: false,
            root_attrs: false,
            same_image: false,
            inode_numbers: false,
            hardlinks: true,
            xattrs: true,
            owners: true,
        }
    }

    /// A kernel-written image (cp -a into a loop mount) against its source tree.
    pub fn kernel_copy_vs_source() -> Self {
        CompareOptions {
            mtime: Some(TimePrecision::Nanos),
            root_attrs: true,
            ..Self::mkfs_vs_source()
        }
    }

    /// Two views of the same image (ubtrfs vs the kernel): everything.
    pub fn same_image() -> Self {
        CompareOptions {
            mtime: Some(TimePrecision::Nanos),
            atime_ctime: true,
            root_attrs: true,
            same_image: true,
            inode_numbers: true,
            hardlinks: true,
            xattrs: true,
            owners: true,
        }
    }
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/".to_string()
    } else {
        format!("/{}", p.display()).escape_debug().to_string()
    }
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn fmt_time(t: (i64, i64)) -> String {
    format!("{}.{:09}", t.0, t.1)
}

/// Hard-link groups: for every non-directory path, the set of paths sharing its inode.
fn link_groups(s: &Snapshot) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut by_ino: BTreeMap<(u64, u64), BTreeSet<PathBuf>> = BTreeMap::new();
    for (p, e) in &s.entries {
        if let Ok(e) = e {
            if e.kind != Kind::Dir {
                by_ino.entry((e.dev, e.ino)).or_default().insert(p.clone());
            }
        }
    }
    let mut m = BTreeMap::new();
    for group in by_ino.values() {
        for p in group {
            m.insert(p.clone(), group.clone());
        }
    }
    m
}

/// Every difference between `expected` and `actual`, one line each.
pub fn diff(expected: &Snapshot, actual: &Snapshot, o: &CompareOptions) -> Vec<String> {
    let mut d = Vec::new();
    for (p, err) in &actual.dir_errors {
        d.push(format!("{}: {err} (in {:?})", show(p), actual.root));
    }
    for (p, err) in &expected.dir_errors {
        d.push(format!("{}: {err} (in {:?})", show(p), expected.root));
    }
    let exp_groups = link_groups(expected);
    let act_groups = link_groups(actual);
    let mut reported_groups = BTreeSet::new();
    for (p, e) in &expected.entries {
        let Some(a) = actual.entries.get(p) else {
            d.push(format!("{}: missing", show(p)));
            continue;
        };
        let (e, a) = match (e, a) {
            (Ok(e), Ok(a)) => (e, a),
            (Err(x), Err(y)) if x == y => continue,
            (Err(x), _) => {
                d.push(format!("{}: expected side failed: {x}", show(p)));
                continue;
            }
            (_, Err(y)) => {
                d.push(format!("{}: {y}", show(p)));
                continue;
            }
        };
        let mut f = |what: &str, x: String, y: String| {
            if x != y {
                d.push(format!("{}: {what}: expected {x}, got {y}", show(p)));
            }
        };
        f("type", format!("{:?}", e.kind), format!("{:?}", a.kind));
        if e.kind != a.kind {
            continue;
        }
        let is_root = p.as_os_str().is_empty();
        let attrs = !is_root || o.root_attrs;
        if attrs {
            f("mode", format!("{:04o}", e.perm), format!("{:04o}", a.perm));
            if o.owners {
                f(
                    "owner",
                    format!("{}:{}", e.uid, e.gid),
                    format!("{}:{}", a.uid, a.gid),
                );
            }
            if let Some(prec) = o.mtime {
                let (x, y) = match prec {
                    TimePrecision::Seconds => (e.mtime.0.to_string(), a.mtime.0.to_string()),
                    TimePrecision::Nanos => (fmt_time(e.mtime), fmt_time(a.mtime)),
                };
                f("mtime", x, y);
            }
            if o.atime_ctime {
                f("atime", fmt_time(e.atime), fmt_time(a.atime));
                f("ctime", fmt_time(e.ctime), fmt_time(a.ctime));
            }
        }
        if e.kind != Kind::Dir || o.same_image {
            f("size", e.size.to_string(), a.size.to_string());
        }
        if o.same_image {
            if o.inode_numbers {
                f("inode", e.ino.to_string(), a.ino.to_string());
            }
            f("nlink", e.nlink.to_string(), a.nlink.to_string());
            f("blocks", e.blocks.to_string(), a.blocks.to_string());
            f("rdev", e.rdev.to_string(), a.rdev.to_string());
        } else if e.kind != Kind::Dir {
            f("nlink", e.nlink.to_string(), a.nlink.to_string());
        }
        match (&e.content, &a.content) {
            (Some(Ok(x)), Some(Ok(y))) if x != y => {
                let detail = first_difference(&expected.root.join(p), &actual.root.join(p))
                    .map(|off| format!(", first difference at byte {off}"))
                    .unwrap_or_default();
                d.push(format!(
                    "{}: content differs (sha256 {}.. vs {}..{detail})",
                    show(p),
                    hex(x),
                    hex(y)
                ));
            }
            (Some(Ok(_)), Some(Err(err))) => d.push(format!("{}: read: {err}", show(p))),
            (Some(Err(err)), Some(Ok(_))) => {
                d.push(format!("{}: expected side read failed: {err}", show(p)))
            }
            (Some(Err(x)), Some(Err(y))) if x != y => {
                d.push(format!("{}: read: expected error {x}, got {y}", show(p)))
            }
            _ => {}
        }
        if let (Some(x), Some(y)) = (&e.target, &a.target) {
            match (x, y) {
                (Ok(x), Ok(y)) if x != y => d.push(format!(
                    "{}: symlink target: expected {:?} ({} bytes), got {:?} ({} bytes)",
                    show(p),
                    shorten(x),
                    x.len(),
                    shorten(y),
                    y.len()
                )),
                (Ok(_), Err(err)) => d.push(format!("{}: readlink: {err}", show(p))),
                _ => {}
            }
        }
        if o.xattrs {
            match (&e.xattrs, &a.xattrs) {
                (Ok(x), Ok(y)) => {
                    for (n, v) in x {
                        match y.get(n) {
                            None => d.push(format!("{}: xattr {n:?} missing", show(p))),
                            Some(w) if w != v => d.push(format!(
                                "{}: xattr {n:?}: expected {} bytes {:?}.., got {} bytes {:?}..",
                                show(p),
                                v.len(),
                                &v[..v.len().min(16)],
                                w.len(),
                                &w[..w.len().min(16)]
                            )),
                            _ => {}
                        }
                    }
                    for n in y.keys() {
                        if !x.contains_key(n) {
                            d.push(format!("{}: unexpected xattr {n:?}", show(p)));
                        }
                    }
                }
                (Ok(x), Err(err)) => d.push(format!(
                    "{}: {err} (expected {} user xattrs)",
                    show(p),
                    x.len()
                )),
                (Err(err), _) => d.push(format!("{}: expected side: {err}", show(p))),
            }
        }
        if o.hardlinks && e.kind != Kind::Dir {
            let eg = exp_groups.get(p);
            let ag = act_groups.get(p);
            if eg != ag && reported_groups.insert(eg.cloned()) {
                d.push(format!(
                    "{}: hard links: expected {:?}, got {:?}",
                    show(p),
                    eg.map(|g| g.iter().map(|x| show(x)).collect::<Vec<_>>()),
                    ag.map(|g| g.iter().map(|x| show(x)).collect::<Vec<_>>())
                ));
            }
        }
    }
    for p in actual.entries.keys() {
        if !expected.entries.contains_key(p) {
            d.push(format!("{}: unexpected entry", show(p)));
        }
    }
    d
}

fn shorten(s: &OsStr) -> String {
    let t = s.to_string_lossy();
    if t.len() > 60 {
        let cut = (0..=60).rev().find(|&i| t.is_char_boundary(i)).unwrap_or(0);
        format!("{}...", &t[..cut])
    } else {
        t.into_owned()
    }
}

/// The first byte offset where two files differ (None when either cannot be read).
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = fs::File::open(a).ok()?;
    let mut fb = fs::File::open(b).ok()?;
    let mut ba = vec![0u8; 1 << 16];
    let mut bb = vec![0u8; 1 << 16];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).ok()?;
        let nb = read_full(&mut fb, &mut bb).ok()?;
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Some(off + i as u64);
        }
        if na != nb {
            return Some(off + n as u64);
        }
        if na == 0 {
            return None;
        }
        off += na as u64;
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Panic with every difference (at most 300 lines) when the snapshots differ.
pub fn assert_same(what: &str, expected: &Snapshot, actual: &Snapshot, o: &CompareOptions) {
    let d = diff(expected, actual, o);
    if d.is_empty() {
        return;
    }
    let n = d.len();
    let mut msg = format!(
        "{what}: {n} difference(s) between {:?} (expected) and {:?}:\n",
        expected.root, actual.root
    );
    for line in d.iter().take(300) {
        msg.push_str("  ");
        msg.push_str(line);
        msg.push('\n');
    }
    if n > 300 {
        msg.push_str(&format!("  ... and {} more\n", n - 300));
    }
    panic!("{msg}");
}
