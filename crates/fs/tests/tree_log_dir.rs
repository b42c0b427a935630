//! The namespace half of the tree-log (issue 7): directory logging, new ancestors, unlink,
//! rename, link and symlink around fsync, checked in both directions by the oracles.
//!
//! Every case is a committed setup, then operations ending in fsyncs, then a crash (the FsInfo
//! is dropped without a commit; for the kernel, the backing file is copied while mounted with
//! a long commit interval). Both directions run on the same operations:
//! - ubtrfs writes the log: `btrfs check --readonly` is clean with the pending log; ubtrfs
//!   replays one copy and the kernel another; both show the same tree, the case's checks hold,
//!   and check is clean after each replay.
//! - the kernel writes the log: the kernel replays one copy and ubtrfs another; both show the
//!   same tree and the case's checks hold.
//!
//! The trees compared hold every name with its type, mode, link count, size, content (file
//! data, symlink target) and user xattrs.

mod common;

use common::oracle::{btrfs_check, mkfs_btrfs, pattern, KernelMount};
use common::TestDir;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use ubtrfs_fs::dir_item::Target;
use ubtrfs_fs::inode::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use ubtrfs_fs::tree_log::SyncOutcome;
use ubtrfs_fs::{FsInfo, MountOptions};

/// One operation, run on ubtrfs (library calls) and on a kernel mount (syscalls).
#[derive(Clone, Debug)]
enum Op {
    Mkdir(&'static str),
    /// Create a file with this content (no fsync).
    Create(&'static str, Vec<u8>),
    /// Write into an existing file at an offset (no fsync).
    Write(&'static str, u64, Vec<u8>),
    Unlink(&'static str),
    Rmdir(&'static str),
    Rename(&'static str, &'static str),
    /// renameat2(RENAME_EXCHANGE).
    Exchange(&'static str, &'static str),
    Link(&'static str, &'static str),
    Symlink(&'static str, &'static str),
    SetXattr(&'static str, &'static str, &'static [u8]),
    /// fsync (a file, symlink or directory); ubtrfs must log, not commit.
    Fsync(&'static str),
    /// fsync where the kernel falls back to a full commit, and so must ubtrfs.
    FsyncCommits(&'static str),
    /// fsync, whatever it does (random workloads).
    FsyncAny(&'static str),
    /// A transaction commit (`sync -f` on the kernel side).
    Commit,
}

/// What one name shows after replay.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    kind: char,
    mode: u32,
    nlink: u64,
    size: u64,
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

type Tree = BTreeMap<String, Node>;

/// A check on the replayed tree.
enum Check {
    File(&'static str, Vec<u8>),
    /// Exists (any content).
    Exists(&'static str),
    Absent(&'static str),
    Nlink(&'static str, u64),
    Symlink(&'static str, &'static str),
    Xattr(&'static str, &'static str, &'static [u8]),
}

struct Case {
    name: &'static str,
    setup: Vec<Op>,
    ops: Vec<Op>,
    checks: Vec<Check>,
    /// The kernel's own log differs from ubtrfs's here (see the case): its replay is held
    /// to the checks other than Absent and Nlink, and not compared with the replay of
    /// ubtrfs's log.
    kernel_keeps_less: bool,
    /// ubtrfs logs with the `log_rename_unlink` option.
    log_rename_unlink: bool,
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        commit_interval: 3600,
        ..MountOptions::default()
    }
}

/// The superblock's log_root, as btrfs-progs reads it.
fn log_root(img: &Path) -> u64 {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-super"])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("log_root\t") || l.starts_with("log_root "))
        .unwrap_or_else(|| panic!("no log_root in:\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Resolve a path (relative to the top directory) to an inode.
fn resolve(fs: &FsInfo, root: u64, path: &str) -> u64 {
    let mut ino = fs.root(root).unwrap().item.root_dirid;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = match ubtrfs_fs::dir_item::lookup(fs, root, ino, part.as_bytes())
            .unwrap_or_else(|e| panic!("lookup {path}: {e}"))
        {
            Target::Inode { ino, .. } => ino,
            t => panic!("{path}: {t:?}"),
        };
    }
    ino
}

fn ubtrfs_op(fs: &FsInfo, op: &Op) {
    let root = fs.mount_root;
    let parent = |p: &str| {
        let (d, n) = split(p);
        (resolve(fs, root, d), n.as_bytes().to_vec())
    };
    match op {
        Op::Mkdir(p) => {
            let (d, n) = parent(p);
            ubtrfs_fs::inode::btrfs_new_inode(fs, root, d, &n, S_IFDIR | 0o755, 0, 0, 0).unwrap();
        }
        Op::Create(p, data) => {
            let (d, n) = parent(p);
            let (ino, _) =
                ubtrfs_fs::inode::btrfs_new_inode(fs, root, d, &n, S_IFREG | 0o644, 0, 0, 0)
                    .unwrap();
            ubtrfs_fs::file_write::btrfs_buffered_write(fs, root, ino, 0, data).unwrap();
        }
        Op::Write(p, off, data) => {
            let ino = resolve(fs, root, p);
            ubtrfs_fs::file_write::btrfs_buffered_write(fs, root, ino, *off, data).unwrap();
        }
        Op::Unlink(p) => {
            let (d, n) = parent(p);
            ubtrfs_fs::inode::btrfs_unlink(fs, root, d, &n).unwrap();
        }
        Op::Rmdir(p) => {
            let (d, n) = parent(p);
            ubtrfs_fs::inode::btrfs_rmdir(fs, root, d, &n).unwrap();
        }
        Op::Rename(a, b) => {
            let (da, na) = parent(a);
            let (db, nb) = parent(b);
            ubtrfs_fs::inode::btrfs_rename(fs, root, da, &na, db, &nb, 0).unwrap();
        }
        Op::Exchange(a, b) => {
            let (da, na) = parent(a);
            let (db, nb) = parent(b);
            ubtrfs_fs::inode::btrfs_rename(
                fs,
                root,
                da,
                &na,
                db,
                &nb,
                ubtrfs_fs::inode::RENAME_EXCHANGE,
            )
            .unwrap();
        }
        Op::Link(a, b) => {
            let ino = resolve(fs, root, a);
            let (db, nb) = parent(b);
            ubtrfs_fs::inode::btrfs_link(fs, root, ino, db, &nb).unwrap();
        }
        Op::Symlink(target, p) => {
            let (d, n) = parent(p);
            ubtrfs_fs::inode::btrfs_symlink(fs, root, d, &n, target.as_bytes(), 0, 0).unwrap();
        }
        Op::SetXattr(p, name, value) => {
            let ino = resolve(fs, root, p);
            ubtrfs_fs::xattr::btrfs_setxattr(fs, root, ino, name.as_bytes(), value, 0).unwrap();
        }
        Op::FsyncAny(p) => {
            let ino = resolve(fs, root, p);
            ubtrfs_fs::tree_log::btrfs_sync_file(fs, root, ino).unwrap();
        }
        Op::Commit => {
            fs.commit().unwrap();
        }
        Op::Fsync(p) | Op::FsyncCommits(p) => {
            let ino = resolve(fs, root, p);
            let got = ubtrfs_fs::tree_log::btrfs_sync_file(fs, root, ino).unwrap();
            match op {
                Op::Fsync(_) => assert_eq!(got, SyncOutcome::Logged, "fsync {p}"),
                _ => assert!(
                    matches!(got, SyncOutcome::FullCommit(_)),
                    "fsync {p}: the kernel commits here, ubtrfs {got:?}"
                ),
            }
        }
    }
}

fn kernel_op(mnt: &Path, op: &Op) {
    use std::os::unix::fs::DirBuilderExt;
    let p = |s: &str| mnt.join(s);
    match op {
        Op::Mkdir(d) => std::fs::DirBuilder::new().mode(0o755).create(p(d)).unwrap(),
        Op::Create(f, data) => std::fs::write(p(f), data).unwrap(),
        Op::Write(f, off, data) => {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(p(f)).unwrap();
            file.write_all_at(data, *off).unwrap();
        }
        Op::Unlink(f) => std::fs::remove_file(p(f)).unwrap(),
        Op::Rmdir(d) => std::fs::remove_dir(p(d)).unwrap(),
        Op::Rename(a, b) => std::fs::rename(p(a), p(b)).unwrap(),
        Op::Exchange(a, b) => {
            use std::os::unix::ffi::OsStrExt;
            let a = std::ffi::CString::new(p(a).as_os_str().as_bytes()).unwrap();
            let b = std::ffi::CString::new(p(b).as_os_str().as_bytes()).unwrap();
            // SAFETY: both paths are NUL-terminated strings that outlive the call; AT_FDCWD
            // is ignored for absolute paths.
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
        }
        Op::Link(a, b) => std::fs::hard_link(p(a), p(b)).unwrap(),
        Op::Symlink(t, l) => std::os::unix::fs::symlink(t, p(l)).unwrap(),
        Op::SetXattr(f, name, value) => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            let st = Command::new("setfattr")
                .args(["-h", "-n", name, "-v", &format!("0x{hex}")])
                .arg(p(f))
                .status()
                .expect("setfattr must be installed (package attr)");
            assert!(st.success());
        }
        Op::Commit => {
            assert!(Command::new("sync")
                .arg("-f")
                .arg(mnt)
                .status()
                .unwrap()
                .success());
        }
        Op::Fsync(f) | Op::FsyncCommits(f) | Op::FsyncAny(f) => {
            let md = std::fs::symlink_metadata(p(f)).unwrap();
            if md.file_type().is_symlink() {
                // fsync of a symlink itself: open it with O_PATH is not enough for fsync; the
                // kernel logs a symlink when its parent is logged, so fsync the parent.
                let (d, _) = split(f);
                std::fs::File::open(p(d)).unwrap().sync_all().unwrap();
            } else {
                std::fs::File::open(p(f)).unwrap().sync_all().unwrap();
            }
        }
    }
}

/// User xattrs of every path under `top`, through getfattr (hex values).
fn kernel_xattrs(top: &Path) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let out = Command::new("getfattr")
        .args([
            "-R",
            "-h",
            "-d",
            "-e",
            "hex",
            "-m",
            "^user\\.",
            "--absolute-names",
        ])
        .arg(top)
        .output()
        .expect("getfattr must be installed (package attr)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut all = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("# file: ") {
            let rel = Path::new(f)
                .strip_prefix(top)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            cur = Some(rel);
        } else if let Some((k, v)) = line.split_once('=') {
            let v = v.strip_prefix("0x").unwrap_or(v);
            let bytes = (0..v.len() / 2)
                .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            all.entry(cur.clone().unwrap())
                .or_insert_with(BTreeMap::new)
                .insert(k.to_string(), bytes);
        }
    }
    all
}

fn kernel_tree(top: &Path) -> Tree {
    use std::os::unix::fs::MetadataExt;
    let xattrs = kernel_xattrs(top);
    let mut out = Tree::new();
    let mut work = vec![top.to_path_buf()];
    while let Some(d) = work.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(top)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let (kind, data) = if md.file_type().is_dir() {
                work.push(path.clone());
                ('d', Vec::new())
            } else if md.file_type().is_symlink() {
                use std::os::unix::ffi::OsStrExt;
                (
                    'l',
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else {
                ('f', std::fs::read(&path).unwrap())
            };
            out.insert(
                rel.clone(),
                Node {
                    kind,
                    mode: md.mode() & 0o7777,
                    nlink: md.nlink(),
                    size: md.size(),
                    data,
                    xattrs: xattrs.get(&rel).cloned().unwrap_or_default(),
                },
            );
        }
    }
    out
}

fn ubtrfs_tree(fs: &FsInfo) -> Tree {
    let root = fs.mount_root;
    let top = fs.root(root).unwrap().item.root_dirid;
    let mut out = Tree::new();
    let mut work = vec![(top, String::new())];
    while let Some((dir, prefix)) = work.pop() {
        for e in ubtrfs_fs::dir_item::readdir(fs, root, dir, 0, usize::MAX).unwrap() {
            let Target::Inode { ino, .. } = e.target else {
                panic!("subvolume entry")
            };
            let rel = format!("{prefix}{}", String::from_utf8_lossy(&e.name));
            let ii = ubtrfs_fs::inode::read_inode(fs, root, ino).unwrap();
            let (kind, data) = match ii.mode & S_IFMT {
                S_IFDIR => {
                    work.push((ino, format!("{rel}/")));
                    ('d', Vec::new())
                }
                S_IFLNK => ('l', ubtrfs_fs::file::readlink(fs, root, ino, &ii).unwrap()),
                _ => {
                    let emi = fs.ems.inode(root, ino);
                    (
                        'f',
                        ubtrfs_fs::file::read(fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap(),
                    )
                }
            };
            let mut xattrs = BTreeMap::new();
            for n in ubtrfs_fs::xattr::list(fs, root, ino).unwrap() {
                if n.starts_with(b"user.") {
                    let v = ubtrfs_fs::xattr::get(fs, root, ino, &n).unwrap();
                    xattrs.insert(String::from_utf8_lossy(&n).into_owned(), v);
                }
            }
            out.insert(
                rel,
                Node {
                    kind,
                    mode: ii.mode & 0o7777,
                    nlink: u64::from(ii.nlink),
                    size: ii.size,
                    data,
                    xattrs,
                },
            );
        }
    }
    out
}

fn run_checks(who: &str, tree: &Tree, checks: &[Check]) {
    run_checks_ref(who, tree, &checks.iter().collect::<Vec<_>>());
}

fn run_checks_ref(who: &str, tree: &Tree, checks: &[&Check]) {
    let get = |p: &str| {
        tree.get(p)
            .unwrap_or_else(|| panic!("{who}: {p} missing from {:#?}", tree.keys()))
    };
    for c in checks {
        match c {
            Check::File(p, data) => {
                let n = get(p);
                assert!(
                    n.kind == 'f' && n.data == *data,
                    "{who}: {p} has {} bytes, want {}",
                    n.data.len(),
                    data.len()
                );
            }
            Check::Exists(p) => {
                get(p);
            }
            Check::Absent(p) => assert!(!tree.contains_key(*p), "{who}: {p} must be gone"),
            Check::Nlink(p, n) => assert_eq!(get(p).nlink, *n, "{who}: nlink of {p}"),
            Check::Symlink(p, t) => {
                let n = get(p);
                assert!(
                    n.kind == 'l' && n.data == t.as_bytes(),
                    "{who}: symlink {p}"
                );
            }
            Check::Xattr(p, name, v) => {
                assert_eq!(
                    get(p).xattrs.get(*name).map(|x| x.as_slice()),
                    Some(*v),
                    "{who}: xattr {name} of {p}"
                );
            }
        }
    }
}

fn diff(a: &Tree, b: &Tree) -> String {
    let mut s = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => s += &format!("only in first: {k} {v:?}\n"),
            Some(w) if w != v => {
                s += &format!(
                    "{k}: first {:?} mode {:o} nlink {} size {} ({} bytes) xattrs {:?}\n\
                     {k}: second {:?} mode {:o} nlink {} size {} ({} bytes) xattrs {:?}\n",
                    v.kind,
                    v.mode,
                    v.nlink,
                    v.size,
                    v.data.len(),
                    v.xattrs,
                    w.kind,
                    w.mode,
                    w.nlink,
                    w.size,
                    w.data.len(),
                    w.xattrs
                )
            }
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            s += &format!("only in second: {k}\n");
        }
    }
    s
}

/// ubtrfs writes the log; ubtrfs and the kernel replay it.
fn ubtrfs_logs(case: &Case, td: &TestDir) -> Tree {
    let img = td.join("u.img");
    mkfs_btrfs(&img, 512 << 20, &[]);
    let logs = case.ops.iter().any(|o| matches!(o, Op::Fsync(_)));
    {
        let opts = MountOptions {
            log_rename_unlink: case.log_rename_unlink,
            ..rw()
        };
        let fs = FsInfo::open(&img, opts).unwrap();
        for op in &case.setup {
            ubtrfs_op(&fs, op);
        }
        fs.sync().unwrap();
        for op in &case.ops {
            ubtrfs_op(&fs, op);
        }
        // Crash: no commit.
    }
    if logs {
        assert_ne!(log_root(&img), 0, "{}: no pending log", case.name);
    }
    btrfs_check(&img);
    let kimg = td.join("u-kernel.img");
    std::fs::copy(&img, &kimg).unwrap();
    let ours = {
        let fs = FsInfo::open(&img, rw()).unwrap();
        ubtrfs_tree(&fs)
    };
    btrfs_check(&img);
    assert_eq!(log_root(&img), 0, "the replay commit must clear log_root");
    let theirs = {
        let m = KernelMount::new(&kimg, &td.join("mnt-u"), "rw");
        kernel_tree(&m.dir)
    };
    btrfs_check(&kimg);
    assert!(
        ours == theirs,
        "{}: ubtrfs log, ubtrfs replay (first) vs kernel replay (second):\n{}",
        case.name,
        diff(&ours, &theirs)
    );
    run_checks(&format!("{}: ubtrfs log", case.name), &ours, &case.checks);
    ours
}

/// The kernel writes the log; the kernel and ubtrfs replay it.
fn kernel_logs(case: &Case, td: &TestDir) -> Tree {
    let img = td.join("k.img");
    mkfs_btrfs(&img, 512 << 20, &[]);
    let crash = td.join("k-crash.img");
    {
        let m = KernelMount::new(&img, &td.join("mnt-k"), "commit=300");
        for op in &case.setup {
            kernel_op(&m.dir, op);
        }
        assert!(Command::new("sync")
            .arg("-f")
            .arg(&m.dir)
            .status()
            .unwrap()
            .success());
        for op in &case.ops {
            kernel_op(&m.dir, op);
        }
        std::fs::copy(&img, &crash).unwrap();
    }
    let oracle = td.join("k-oracle.img");
    std::fs::copy(&crash, &oracle).unwrap();
    let theirs = {
        let m = KernelMount::new(&oracle, &td.join("mnt-k2"), "rw");
        kernel_tree(&m.dir)
    };
    let ours = {
        let fs = FsInfo::open(&crash, rw()).unwrap();
        ubtrfs_tree(&fs)
    };
    btrfs_check(&crash);
    assert!(
        ours == theirs,
        "{}: kernel log, ubtrfs replay (first) vs kernel replay (second):\n{}",
        case.name,
        diff(&ours, &theirs)
    );
    let checks: Vec<&Check> = case
        .checks
        .iter()
        .filter(|c| !(case.kernel_keeps_less && matches!(c, Check::Absent(_) | Check::Nlink(..))))
        .collect();
    run_checks_ref(&format!("{}: kernel log", case.name), &theirs, &checks);
    theirs
}

fn run(case: Case) {
    let td = TestDir::new(case.name);
    let u = ubtrfs_logs(&case, &td);
    let k = kernel_logs(&case, &td);
    if case.kernel_keeps_less {
        return;
    }
    // The same operations logged by ubtrfs and by the kernel replay to the same names, types,
    // link counts, sizes, contents and xattrs (modes depend on the umask of the kernel side).
    let strip = |t: &Tree| -> Tree {
        t.iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.mode = 0;
                (k.clone(), v)
            })
            .collect()
    };
    assert!(
        strip(&u) == strip(&k),
        "{}: replay of ubtrfs's log (first) vs replay of the kernel's log (second):\n{}",
        case.name,
        diff(&strip(&u), &strip(&k))
    );
}

// Test scenario: mkdir d; create d/f with data; fsync d/f. The new parent is logged
// LOG_INODE_EXISTS (log_all_new_ancestors), so no full commit is needed and d/f replays.
#[test]
fn new_file_in_new_dir() {
    let data = pattern(1, 20_000);
    run(Case {
        name: "new-file-new-dir",
        setup: vec![],
        ops: vec![
            Op::Mkdir("d"),
            Op::Mkdir("d/e"),
            Op::Create("d/e/f", data.clone()),
            Op::Fsync("d/e/f"),
        ],
        checks: vec![Check::File("d/e/f", data), Check::Nlink("d/e/f", 1)],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a committed directory gets two files and a subdirectory (with a file), then
// the directory is fsynced: its new entries and their inodes are logged (log_new_dir_dentries).
#[test]
fn fsync_dir_after_creating_files() {
    run(Case {
        name: "fsync-dir-creates",
        setup: vec![Op::Mkdir("d"), Op::Create("d/old", b"old".to_vec())],
        ops: vec![
            Op::Create("d/a", pattern(2, 5000)),
            Op::Create("d/b", Vec::new()),
            Op::Mkdir("d/sub"),
            Op::Create("d/sub/c", b"c".to_vec()),
            Op::Fsync("d"),
        ],
        checks: vec![
            Check::Exists("d/a"),
            Check::Exists("d/b"),
            Check::Exists("d/sub"),
            Check::Exists("d/sub/c"),
            Check::File("d/old", b"old".to_vec()),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: unlink a committed file, fsync its directory: the DIR_LOG_INDEX range makes
// replay delete the name; the sibling stays.
#[test]
fn unlink_then_fsync_dir() {
    run(Case {
        name: "unlink-fsync-dir",
        setup: vec![
            Op::Mkdir("d"),
            Op::Create("d/a", b"a".to_vec()),
            Op::Create("d/b", b"b".to_vec()),
            Op::Create("d/c", b"c".to_vec()),
        ],
        ops: vec![Op::Unlink("d/b"), Op::Fsync("d")],
        checks: vec![
            Check::Absent("d/b"),
            Check::File("d/a", b"a".to_vec()),
            Check::File("d/c", b"c".to_vec()),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario (the kernel's btrfs_log_inode_parent example 1): a file with two names is
// committed, one name is unlinked and the file fsynced: its parent is logged in full
// (last_unlink_trans), so the removed name does not come back and the link count is 1.
#[test]
fn unlink_link_then_fsync_file() {
    run(Case {
        name: "unlink-link-fsync-file",
        setup: vec![
            Op::Mkdir("d"),
            Op::Create("d/foo", b"foo".to_vec()),
            Op::Link("d/foo", "d/bar"),
        ],
        ops: vec![Op::Unlink("d/bar"), Op::Fsync("d/foo")],
        checks: vec![Check::Absent("d/bar"), Check::Nlink("d/foo", 1)],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: rename a committed file in its directory and fsync it: the old name is gone
// after replay, the new one holds the content.
#[test]
fn rename_then_fsync_file() {
    let data = pattern(3, 9000);
    run(Case {
        name: "rename-fsync",
        setup: vec![Op::Create("a", data.clone())],
        ops: vec![Op::Rename("a", "b"), Op::Fsync("b")],
        checks: vec![
            Check::Absent("a"),
            Check::File("b", data),
            Check::Nlink("b", 1),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a file fsynced in d1 (so it is in the log), renamed to d2 and fsynced again:
// the log moves the name (btrfs_log_new_name, old parent logged in full).
#[test]
fn rename_across_dirs_after_fsync() {
    let data = pattern(4, 7000);
    run(Case {
        name: "rename-across-logged",
        setup: vec![
            Op::Mkdir("d1"),
            Op::Mkdir("d2"),
            Op::Create("d1/f", data.clone()),
        ],
        ops: vec![
            Op::SetXattr("d1/f", "user.x", b"1"),
            Op::Fsync("d1/f"),
            Op::Rename("d1/f", "d2/g"),
            Op::Fsync("d2/g"),
        ],
        checks: vec![
            Check::Absent("d1/f"),
            Check::File("d2/g", data),
            Check::Nlink("d2/g", 1),
            Check::Xattr("d2/g", "user.x", b"1"),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a committed file renamed to another directory and fsynced, never logged
// before: the kernel cannot log the old directory (the entry went elsewhere) and commits;
// ubtrfs does the same and counts it.
#[test]
fn rename_across_dirs_commits() {
    run(Case {
        name: "rename-across-commit",
        setup: vec![
            Op::Mkdir("d1"),
            Op::Mkdir("d2"),
            Op::Create("d1/f", b"f".to_vec()),
        ],
        ops: vec![Op::Rename("d1/f", "d2/f"), Op::FsyncCommits("d2/f")],
        checks: vec![Check::Absent("d1/f"), Check::File("d2/f", b"f".to_vec())],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: link a committed file into another directory, fsync the file: both names
// and a link count of 2 replay.
#[test]
fn link_then_fsync() {
    run(Case {
        name: "link-fsync",
        setup: vec![Op::Mkdir("d"), Op::Create("f", b"linked".to_vec())],
        ops: vec![Op::Link("f", "d/g"), Op::Fsync("f")],
        checks: vec![
            Check::File("f", b"linked".to_vec()),
            Check::File("d/g", b"linked".to_vec()),
            Check::Nlink("f", 2),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: rename a file over an existing committed name and fsync it: the replaced
// inode's entry goes, the name leads to the renamed file, the old name is gone.
#[test]
fn rename_over_existing() {
    run(Case {
        name: "rename-over",
        setup: vec![
            Op::Create("a", b"AAAA".to_vec()),
            Op::Create("b", b"BB".to_vec()),
        ],
        ops: vec![Op::Rename("a", "b"), Op::Fsync("b")],
        checks: vec![
            Check::Absent("a"),
            Check::File("b", b"AAAA".to_vec()),
            Check::Nlink("b", 1),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a new file created and renamed over an existing committed name, fsynced:
// the new inode's name belongs to another inode in the commit root (a conflicting inode,
// btrfs_check_ref_name_override), which is dealt with in the log.
#[test]
fn new_file_renamed_over_existing() {
    run(Case {
        name: "new-over",
        setup: vec![Op::Mkdir("d"), Op::Create("d/b", b"old".to_vec())],
        ops: vec![
            Op::Create("d/tmp", b"new contents".to_vec()),
            Op::Rename("d/tmp", "d/b"),
            Op::Fsync("d/b"),
        ],
        checks: vec![
            Check::Absent("d/tmp"),
            Check::File("d/b", b"new contents".to_vec()),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a symlink is created in a committed directory and the directory fsynced: the
// symlink is logged in full (its target is an inline extent).
#[test]
fn symlink_fsync() {
    run(Case {
        name: "symlink",
        setup: vec![Op::Mkdir("d")],
        ops: vec![Op::Symlink("../some/target", "d/l"), Op::Fsync("d/l")],
        checks: vec![Check::Symlink("d/l", "../some/target")],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: mkdir of a nested pair with an xattr on the new directory, fsyncdir of the
// outer one: both directories and the xattr replay.
#[test]
fn mkdir_fsyncdir() {
    run(Case {
        name: "mkdir-fsyncdir",
        setup: vec![],
        ops: vec![
            Op::Mkdir("d"),
            Op::Mkdir("d/e"),
            Op::SetXattr("d", "user.dir", b"xyz"),
            Op::Fsync("d"),
        ],
        checks: vec![
            Check::Exists("d"),
            Check::Exists("d/e"),
            Check::Xattr("d", "user.dir", b"xyz"),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: rmdir of a committed empty directory, then fsync of its parent: the entry is
// gone after replay.
#[test]
fn rmdir_then_fsync_parent() {
    run(Case {
        name: "rmdir-fsync",
        setup: vec![
            Op::Mkdir("p"),
            Op::Mkdir("p/d"),
            Op::Create("p/keep", b"k".to_vec()),
        ],
        ops: vec![Op::Rmdir("p/d"), Op::Fsync("p")],
        checks: vec![Check::Absent("p/d"), Check::File("p/keep", b"k".to_vec())],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a committed file renamed to another directory, then the new parent fsynced.
// The kernel logs the file as a new dentry (LOG_INODE_EXISTS) with its new name only and
// never logs its old parent (log_new_dir_dentries), so replay shows the file under both names
// with a link count of 2, a state that never existed (seen on 6.18 too). That is ubtrfs's
// default: its log and the kernel's replay alike.
#[test]
fn rename_across_dirs_fsync_new_parent() {
    run(Case {
        name: "rename-across-fsync-parent",
        setup: vec![
            Op::Mkdir("A"),
            Op::Mkdir("B"),
            Op::Create("A/foo", b"f".to_vec()),
        ],
        ops: vec![Op::Rename("A/foo", "B/bar"), Op::Fsync("B")],
        checks: vec![
            Check::File("B/bar", b"f".to_vec()),
            Check::File("A/foo", b"f".to_vec()),
            Check::Nlink("B/bar", 2),
            Check::Nlink("A/foo", 2),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: the same rename and fsync with `log_rename_unlink`: ubtrfs also logs the
// removal of the old name (a one-index DIR_LOG_INDEX range in the old directory, with its
// inode item), so ubtrfs's and the kernel's replay of that log show the rename done; the
// kernel's own log keeps both names (checked on the new name only).
#[test]
fn rename_across_dirs_fsync_new_parent_log_rename_unlink() {
    run(Case {
        name: "rename-across-fsync-parent-unlink",
        setup: vec![
            Op::Mkdir("A"),
            Op::Mkdir("B"),
            Op::Create("A/foo", b"f".to_vec()),
        ],
        ops: vec![Op::Rename("A/foo", "B/bar"), Op::Fsync("B")],
        checks: vec![
            Check::File("B/bar", b"f".to_vec()),
            Check::Absent("A/foo"),
            Check::Nlink("B/bar", 1),
        ],
        kernel_keeps_less: true,
        log_rename_unlink: true,
    });
}

// Test scenario: a committed directory with a file; the file is unlinked and the directory
// removed in the same transaction, then the parent fsynced: the directory is gone after
// replay, and so is its committed file (the directory left without a name loses its entries).
#[test]
fn rmdir_with_removed_contents_then_fsync_parent() {
    run(Case {
        name: "rmdir-contents-fsync",
        setup: vec![
            Op::Mkdir("p"),
            Op::Mkdir("p/d"),
            Op::Create("p/d/f", b"f".to_vec()),
            Op::Create("p/keep", b"k".to_vec()),
        ],
        ops: vec![Op::Unlink("p/d/f"), Op::Rmdir("p/d"), Op::Fsync("p")],
        checks: vec![Check::Absent("p/d"), Check::File("p/keep", b"k".to_vec())],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: a committed directory renamed within its parent, then fsynced: the new name
// replays and the old one is gone.
#[test]
fn rename_dir_then_fsync_it() {
    run(Case {
        name: "rename-dir-fsync",
        setup: vec![
            Op::Mkdir("p"),
            Op::Mkdir("p/d"),
            Op::Create("p/d/f", b"f".to_vec()),
        ],
        ops: vec![Op::Rename("p/d", "p/e"), Op::Fsync("p/e")],
        checks: vec![Check::Absent("p/d"), Check::File("p/e/f", b"f".to_vec())],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

// Test scenario: two files fsynced (so in the log), then exchanged across directories with
// RENAME_EXCHANGE and one of them fsynced again: both names swap after replay.
#[test]
fn exchange_logged_files() {
    run(Case {
        name: "exchange",
        setup: vec![
            Op::Mkdir("d1"),
            Op::Mkdir("d2"),
            Op::Create("d1/a", b"AAA".to_vec()),
            Op::Create("d2/b", b"B".to_vec()),
        ],
        ops: vec![
            Op::SetXattr("d1/a", "user.a", b"1"),
            Op::SetXattr("d2/b", "user.b", b"2"),
            Op::Fsync("d1/a"),
            Op::Fsync("d2/b"),
            Op::Exchange("d1/a", "d2/b"),
            Op::Fsync("d1/a"),
        ],
        checks: vec![
            Check::File("d1/a", b"B".to_vec()),
            Check::File("d2/b", b"AAA".to_vec()),
            Check::Nlink("d1/a", 1),
            Check::Nlink("d2/b", 1),
        ],
        kernel_keeps_less: false,
        log_rename_unlink: false,
    });
}

/// One random operation valid on `tree` (the current namespace): namespace changes, writes,
/// xattrs, fsyncs of files, symlinks and directories, commits.
fn random_op(tree: &Tree, rng: &mut common::Rng, n: u64) -> Option<Op> {
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(
            tree.iter()
                .filter(|(_, v)| v.kind == 'd')
                .map(|(k, _)| k.clone()),
        )
        .collect();
    let files: Vec<String> = tree
        .iter()
        .filter(|(_, v)| v.kind == 'f')
        .map(|(k, _)| k.clone())
        .collect();
    let any: Vec<String> = tree.keys().cloned().collect();
    let join = |d: &str, name: String| {
        if d.is_empty() {
            name
        } else {
            format!("{d}/{name}")
        }
    };
    let pick = |rng: &mut common::Rng, v: &[String]| v[rng.index(v.len())].clone();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    Some(match rng.below(17) {
        15 | 16 if !files.is_empty() => {
            let f = pick(rng, &files);
            let size = tree[&f].size;
            Op::Write(
                leak(f),
                rng.below(size + 8192),
                pattern(n + 1000, 1 + rng.below(20_000) as usize),
            )
        }
        0 | 1 => {
            let d = pick(rng, &dirs);
            Op::Create(
                leak(join(&d, format!("f{n}"))),
                pattern(n, rng.below(9000) as usize),
            )
        }
        2 => Op::Mkdir(leak(join(&pick(rng, &dirs), format!("d{n}")))),
        3 if !files.is_empty() => Op::Unlink(leak(pick(rng, &files))),
        4 => {
            let empty: Vec<String> = dirs
                .iter()
                .filter(|d| !d.is_empty() && !tree.keys().any(|k| k.starts_with(&format!("{d}/"))))
                .cloned()
                .collect();
            if empty.is_empty() {
                return None;
            }
            Op::Rmdir(leak(pick(rng, &empty)))
        }
        5 | 6 if !files.is_empty() => {
            let f = pick(rng, &files);
            // Over an existing file sometimes, else to a new name.
            let to = if rng.chance(1, 3) {
                pick(rng, &files)
            } else {
                join(&pick(rng, &dirs), format!("r{n}"))
            };
            if to == f {
                return None;
            }
            Op::Rename(leak(f), leak(to))
        }
        7 if dirs.len() > 1 => {
            // A directory renamed within its parent.
            let d = pick(rng, &dirs[1..]);
            let (p, _) = split(&d);
            Op::Rename(leak(d.clone()), leak(join(p, format!("m{n}"))))
        }
        8 if !files.is_empty() => Op::Link(
            leak(pick(rng, &files)),
            leak(join(&pick(rng, &dirs), format!("l{n}"))),
        ),
        9 => Op::Symlink(
            "some/target",
            leak(join(&pick(rng, &dirs), format!("s{n}"))),
        ),
        // Not on symlinks: the VFS allows user xattrs only on files and directories.
        10 if !files.is_empty() => Op::SetXattr(leak(pick(rng, &files)), "user.r", b"v"),
        12 if dirs.len() > 1 => Op::SetXattr(leak(pick(rng, &dirs[1..])), "user.d", b"w"),
        11 => Op::Commit,
        _ if !any.is_empty() || rng.chance(1, 2) => {
            let p = if rng.chance(1, 3) || any.is_empty() {
                pick(rng, &dirs)
            } else {
                pick(rng, &any)
            };
            Op::FsyncAny(leak(p))
        }
        _ => return None,
    })
}

fn describe(op: &Op) -> String {
    match op {
        Op::Create(p, data) => format!("Create({p:?}, {} bytes)", data.len()),
        Op::Write(p, off, data) => format!("Write({p:?}, at {off}, {} bytes)", data.len()),
        op => format!("{op:?}"),
    }
}

/// UBTRFS_LOG_SEEDS, default 4.
fn seeds() -> u64 {
    std::env::var("UBTRFS_LOG_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

/// Operations per random workload: UBTRFS_LOG_OPS, default 40.
fn random_ops() -> u64 {
    std::env::var("UBTRFS_LOG_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

// Test scenario: random namespace operations, writes, xattrs, fsyncs (of files, symlinks and
// directories) and commits on ubtrfs, then a crash with the log pending: btrfs check is clean,
// and ubtrfs's replay and the kernel's replay of the same log show the same tree, check clean
// after each. UBTRFS_LOG_SEEDS sets the number of seeds (default 4), UBTRFS_LOG_OPS the
// operations per seed (default 40).
#[test]
fn random_namespace_ops_replay_alike() {
    for seed in 0..seeds() {
        let td = TestDir::new(&format!("random-{seed}"));
        let img = td.join("img");
        mkfs_btrfs(&img, 512 << 20, &[]);
        let mut rng = common::Rng::new(common::case_seed(0x7e1d, seed));
        let mut history = Vec::new();
        {
            let fs = FsInfo::open(&img, rw()).unwrap();
            for n in 0..random_ops() {
                let Some(op) = random_op(&ubtrfs_tree(&fs), &mut rng, n) else {
                    continue;
                };
                history.push(describe(&op));
                ubtrfs_op(&fs, &op);
            }
            // End with a directory fsync of the top so that a log is pending.
            let top = fs.root(fs.mount_root).unwrap().item.root_dirid;
            let got = ubtrfs_fs::tree_log::btrfs_sync_file(&fs, fs.mount_root, top).unwrap();
            history.push(format!("fsync top: {got:?}"));
        }
        let ctx = format!("seed {seed}: {history:#?}");
        let out = Command::new("btrfs")
            .args(["check", "--readonly"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{ctx}\ncheck before replay failed");
        let kimg = td.join("kimg");
        std::fs::copy(&img, &kimg).unwrap();
        let ours = {
            let fs = FsInfo::open(&img, rw()).unwrap_or_else(|e| panic!("{ctx}\nreplay: {e}"));
            ubtrfs_tree(&fs)
        };
        let out = Command::new("btrfs")
            .args(["check", "--readonly"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{ctx}\ncheck after ubtrfs replay failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = {
            let m = KernelMount::new(&kimg, &td.join("mnt"), "rw");
            kernel_tree(&m.dir)
        };
        btrfs_check(&kimg);
        assert!(
            ours == theirs,
            "{ctx}\nubtrfs replay (first) vs kernel replay (second):\n{}",
            diff(&ours, &theirs)
        );
    }
}

// Test scenario: the same random workloads on a kernel mount (commit=300), the image copied
// while mounted (a pending kernel log): ubtrfs's replay of one copy shows what the kernel's
// replay of another shows, and btrfs check is clean after ubtrfs's replay.
#[test]
fn random_kernel_logs_replay_alike() {
    for seed in 0..seeds() {
        let td = TestDir::new(&format!("krandom-{seed}"));
        let img = td.join("img");
        mkfs_btrfs(&img, 512 << 20, &[]);
        let mut rng = common::Rng::new(common::case_seed(0x7e1e, seed));
        let mut history = Vec::new();
        let crash = td.join("crash");
        {
            let m = KernelMount::new(&img, &td.join("mnt"), "commit=300");
            for n in 0..random_ops() {
                let Some(op) = random_op(&kernel_tree(&m.dir), &mut rng, n) else {
                    continue;
                };
                history.push(describe(&op));
                kernel_op(&m.dir, &op);
            }
            std::fs::File::open(&m.dir).unwrap().sync_all().unwrap();
            std::fs::copy(&img, &crash).unwrap();
        }
        let ctx = format!("seed {seed}: {history:#?}");
        let oracle = td.join("oracle");
        std::fs::copy(&crash, &oracle).unwrap();
        let theirs = {
            let m = KernelMount::new(&oracle, &td.join("mnt2"), "rw");
            kernel_tree(&m.dir)
        };
        let ours = {
            let fs = FsInfo::open(&crash, rw()).unwrap_or_else(|e| panic!("{ctx}\nreplay: {e}"));
            ubtrfs_tree(&fs)
        };
        let out = Command::new("btrfs")
            .args(["check", "--readonly"])
            .arg(&crash)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{ctx}\ncheck after ubtrfs replay failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            ours == theirs,
            "{ctx}\nubtrfs replay (first) vs kernel replay (second):\n{}",
            diff(&ours, &theirs)
        );
    }
}
