//! fsync through the tree-log, checked by the oracles: a "crash" (the FsInfo is dropped without
//! a commit, so the superblock's log_root points at the log) is replayed by the kernel and by
//! ubtrfs, and `btrfs check --readonly` (which checks the log tree) is clean before and after.

mod common;

use common::oracle::{btrfs_check, mkfs_btrfs, pattern, KernelMount};
use std::path::{Path, PathBuf};
use std::process::Command;
use ubtrfs_fs::dir_item::Target;
use ubtrfs_fs::tree_log::SyncOutcome;
use ubtrfs_fs::{FsInfo, MountOptions};

fn tmpdir(name: &str) -> PathBuf {
    let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        commit_interval: 3600,
        ..MountOptions::default()
    }
}

fn ino_of(fs: &FsInfo, root: u64, dir: u64, name: &str) -> u64 {
    match ubtrfs_fs::dir_item::lookup(fs, root, dir, name.as_bytes()).unwrap() {
        Target::Inode { ino, .. } => ino,
        _ => panic!("{name} is not an inode"),
    }
}

fn read_all(fs: &FsInfo, root: u64, ino: u64) -> Vec<u8> {
    let ii = ubtrfs_fs::inode::read_inode(fs, root, ino).unwrap();
    let emi = fs.ems.inode(root, ino);
    ubtrfs_fs::file::read(fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap()
}

/// The workload: a committed file, then in a new transaction a new file, an append to the
/// committed one, an overwrite in its middle, each fsynced; then more writes that are NOT
/// fsynced, then a crash. Returns the fsynced state (name, content).
fn workload(img: &Path) -> Vec<(String, Vec<u8>)> {
    let fs = FsInfo::open(img, rw()).unwrap();
    let root = fs.mount_root;
    let dir = fs.root(root).unwrap().item.root_dirid;
    let base = pattern(1, 300_000);
    let (old, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"old", 0o100644, 0, 0, 0).unwrap();
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, old, 0, &base).unwrap();
    fs.sync().unwrap();
    // Transaction 2: fsynced changes.
    let mut expect_old = base.clone();
    let more = pattern(2, 70_000);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, old, base.len() as u64, &more).unwrap();
    expect_old.extend_from_slice(&more);
    let patch = pattern(3, 20_000);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, old, 100_000, &patch).unwrap();
    expect_old[100_000..120_000].copy_from_slice(&patch);
    assert_eq!(
        ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, old).unwrap(),
        SyncOutcome::Logged
    );
    let (new, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"new", 0o100600, 0, 1000, 1000).unwrap();
    let newc = pattern(4, 123_457);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, new, 0, &newc).unwrap();
    assert_eq!(
        ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, new).unwrap(),
        SyncOutcome::Logged
    );
    let (small, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"small", 0o100644, 0, 0, 0).unwrap();
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, small, 0, b"inline data, fsynced")
        .unwrap();
    assert_eq!(
        ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, small).unwrap(),
        SyncOutcome::Logged
    );
    // A second fsync of "old" in the same transaction re-logs its changed range.
    let patch2 = pattern(5, 5000);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, old, 4096, &patch2).unwrap();
    expect_old[4096..4096 + 5000].copy_from_slice(&patch2);
    assert_eq!(
        ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, old).unwrap(),
        SyncOutcome::Logged
    );
    // Not fsynced: lost in the crash.
    let (lost, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"not-fsynced", 0o100644, 0, 0, 0)
            .unwrap();
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, lost, 0, b"gone").unwrap();
    ubtrfs_fs::file_write::btrfs_writeback(&fs, root, lost).unwrap();
    assert_eq!(
        fs.counters
            .log_syncs
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    // Crash: no commit.
    drop(fs);
    vec![
        ("old".into(), expect_old),
        ("new".into(), newc),
        ("small".into(), b"inline data, fsynced".to_vec()),
    ]
}

// Test scenario: ubtrfs fsyncs through the log and "crashes"; btrfs check accepts the image with
// its pending log; the kernel replays the log and shows exactly the fsynced state.
#[test]
fn kernel_replays_ubtrfs_log() {
    let d = tmpdir("kernel");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let expect = workload(&img);
    assert_ne!(log_root(&img), 0, "the crash image must have a pending log");
    btrfs_check(&img);
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "rw");
        for (name, content) in &expect {
            let got = std::fs::read(m.dir.join(name)).unwrap();
            assert!(
                got == *content,
                "kernel replay: {name} differs ({} vs {} bytes)",
                got.len(),
                content.len()
            );
        }
        assert!(!m.dir.join("not-fsynced").exists());
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(m.dir.join("new")).unwrap();
        assert_eq!((md.uid(), md.mode() & 0o7777), (1000, 0o600));
    }
    btrfs_check(&img);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: the same crash image is mounted by ubtrfs: read-only replays in memory and
// writes nothing; read-write replays and commits; both show the fsynced state; btrfs check is
// clean afterwards and the kernel sees the same files.
#[test]
fn ubtrfs_replays_its_own_log() {
    let d = tmpdir("own");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let expect = workload(&img);
    let before = std::fs::read(&img).unwrap();
    {
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for (name, content) in &expect {
            assert!(
                read_all(&fs, root, ino_of(&fs, root, dir, name)) == *content,
                "ro replay: {name}"
            );
        }
        assert!(ubtrfs_fs::dir_item::lookup(&fs, root, dir, b"not-fsynced").is_err());
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only mount wrote to the image"
    );
    {
        let fs = FsInfo::open(
            &img,
            MountOptions {
                nologreplay: true,
                ..MountOptions::default()
            },
        )
        .unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        assert!(
            ubtrfs_fs::dir_item::lookup(&fs, root, dir, b"new").is_err(),
            "nologreplay shows the committed state"
        );
    }
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for (name, content) in &expect {
            assert!(
                read_all(&fs, root, ino_of(&fs, root, dir, name)) == *content,
                "rw replay: {name}"
            );
        }
    }
    btrfs_check(&img);
    assert_eq!(log_root(&img), 0, "the replay commit must clear log_root");
    let m = KernelMount::new(&img, &d.join("mnt"), "ro");
    for (name, content) in &expect {
        assert!(
            std::fs::read(m.dir.join(name)).unwrap() == *content,
            "kernel after ubtrfs replay: {name}"
        );
    }
    drop(m);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: the kernel fsyncs (a new file, an append to a committed file) with a long
// commit interval and the image is copied while mounted (a crash image with a pending log);
// ubtrfs's replay shows what the kernel's own replay of a second copy shows.
#[test]
fn ubtrfs_replays_kernel_log() {
    let d = tmpdir("klog");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let crash = d.join("crash");
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "commit=300");
        std::fs::create_dir(m.dir.join("dir")).unwrap();
        std::fs::write(m.dir.join("dir/committed"), pattern(7, 50_000)).unwrap();
        assert!(Command::new("sync").status().unwrap().success());
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(m.dir.join("dir/newfile"))
            .unwrap();
        f.write_all(&pattern(8, 200_000)).unwrap();
        f.sync_all().unwrap();
        let mut g = std::fs::OpenOptions::new()
            .append(true)
            .open(m.dir.join("dir/committed"))
            .unwrap();
        g.write_all(&pattern(9, 10_000)).unwrap();
        g.sync_all().unwrap();
        std::fs::copy(&img, &crash).unwrap();
    }
    assert_ne!(
        log_root(&crash),
        0,
        "no pending log in the kernel's crash image"
    );
    let oracle = d.join("oracle");
    std::fs::copy(&crash, &oracle).unwrap();
    let (kernel_new, kernel_committed) = {
        let m = KernelMount::new(&oracle, &d.join("mnt2"), "rw");
        (
            std::fs::read(m.dir.join("dir/newfile")).unwrap(),
            std::fs::read(m.dir.join("dir/committed")).unwrap(),
        )
    };
    assert_eq!(kernel_new.len(), 200_000);
    assert_eq!(kernel_committed.len(), 60_000);
    let fs = FsInfo::open(&crash, rw()).unwrap();
    let root = fs.mount_root;
    let top = fs.root(root).unwrap().item.root_dirid;
    let dir = ino_of(&fs, root, top, "dir");
    assert!(read_all(&fs, root, ino_of(&fs, root, dir, "newfile")) == kernel_new);
    assert!(read_all(&fs, root, ino_of(&fs, root, dir, "committed")) == kernel_committed);
    drop(fs);
    btrfs_check(&crash);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: a block-group-tree filesystem (ubtrfs mkfs -O block-group-tree, the default of
// newer mkfs.btrfs) written by the kernel is read by ubtrfs, then written by ubtrfs (block
// group items live in tree 11), fsynced through the log, replayed by the kernel; btrfs check is
// clean at every step.
#[test]
fn block_group_tree_images() {
    let d = tmpdir("bgt");
    let img = d.join("img");
    let opts = ubtrfs_fs::mkfs::MkfsOptions {
        size: Some(1 << 30),
        block_group_tree: true,
        ..Default::default()
    };
    ubtrfs_fs::mkfs::mkfs(&img, &opts).unwrap();
    let kernel_data = pattern(11, 3_000_000);
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "rw");
        std::fs::write(m.dir.join("from-kernel"), &kernel_data).unwrap();
    }
    btrfs_check(&img);
    let ours = pattern(12, 1_500_000);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        assert!(read_all(&fs, root, ino_of(&fs, root, dir, "from-kernel")) == kernel_data);
        let (ino, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"from-ubtrfs", 0o100644, 0, 0, 0)
                .unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, 0, &ours).unwrap();
        fs.sync().unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, 0, b"fsynced head").unwrap();
        assert_eq!(
            ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, ino).unwrap(),
            SyncOutcome::Logged
        );
        // crash
    }
    btrfs_check(&img);
    let mut expect = ours.clone();
    expect[..12].copy_from_slice(b"fsynced head");
    let m = KernelMount::new(&img, &d.join("mnt2"), "rw");
    assert!(std::fs::read(m.dir.join("from-ubtrfs")).unwrap() == expect);
    assert!(std::fs::read(m.dir.join("from-kernel")).unwrap() == kernel_data);
    drop(m);
    btrfs_check(&img);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: a committed file with xattrs a and b; in the next transaction a is removed and
// c added, the file is fsynced, then a crash. Replay (ubtrfs and the kernel) shows b and c
// only: xattrs absent from the log of a logged inode are deleted (replay_xattr_deletes).
#[test]
fn replay_deletes_removed_xattrs() {
    let d = tmpdir("xattr");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let (ino, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"x", 0o100644, 0, 0, 0).unwrap();
        ubtrfs_fs::xattr::btrfs_setxattr(&fs, root, ino, b"user.a", b"1", 0).unwrap();
        ubtrfs_fs::xattr::btrfs_setxattr(&fs, root, ino, b"user.b", b"2", 0).unwrap();
        fs.sync().unwrap();
        ubtrfs_fs::xattr::btrfs_removexattr(&fs, root, ino, b"user.a").unwrap();
        ubtrfs_fs::xattr::btrfs_setxattr(&fs, root, ino, b"user.c", b"3", 0).unwrap();
        assert_eq!(
            ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, ino).unwrap(),
            SyncOutcome::Logged
        );
    }
    let copy = d.join("copy");
    std::fs::copy(&img, &copy).unwrap();
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let ino = ino_of(&fs, root, dir, "x");
        let mut names = ubtrfs_fs::xattr::list(&fs, root, ino).unwrap();
        names.sort();
        assert_eq!(names, vec![b"user.b".to_vec(), b"user.c".to_vec()]);
    }
    btrfs_check(&img);
    let m = KernelMount::new(&copy, &d.join("mnt"), "rw");
    let out = Command::new("getfattr")
        .args(["-d", "--absolute-names"])
        .arg(m.dir.join("x"))
        .output()
        .expect("getfattr must be installed (package attr)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("user.a") && text.contains("user.b") && text.contains("user.c"),
        "kernel replay: {text}"
    );
    drop(m);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: a file written into a data chunk allocated in the running transaction (a
// fresh mkfs.btrfs image has an 8 MiB data chunk; 64 MiB need more) is fsynced, then the
// daemon "crashes". The log must not point into a block group that only the commit makes
// durable: fsync commits instead ("new block group", as btrfs_make_block_group sets
// btrfs_set_log_full_commit), and the kernel and ubtrfs both mount the crash image with the
// whole file. (Before, both refused the image: the replayed extents were in no block group.)
#[test]
fn fsync_after_a_new_data_chunk_commits() {
    let d = tmpdir("newchunk");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let content = pattern(9, 64 << 20);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let (ino, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"big", 0o100644, 0, 0, 0).unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, 0, &content).unwrap();
        assert_eq!(
            ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, ino).unwrap(),
            SyncOutcome::FullCommit("new block group")
        );
        // Crash: no commit after the fsync.
        drop(fs);
    }
    btrfs_check(&img);
    let copy = d.join("copy");
    std::fs::copy(&img, &copy).unwrap();
    {
        let m = KernelMount::new(&copy, &d.join("mnt"), "rw");
        assert!(std::fs::read(m.dir.join("big")).unwrap() == content);
    }
    let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
    let root = fs.mount_root;
    let dir = fs.root(root).unwrap().item.root_dirid;
    assert!(read_all(&fs, root, ino_of(&fs, root, dir, "big")) == content);
    drop(fs);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: btrfs_inode_in_log, the first rule of skip_inode_logging. In one transaction:
// a file is written and fsynced (logged, log synced); an fsync with nothing changed since
// skips (counted as skipped and as already in the log, no log sync); a data write, then an
// inode-only change (chmod) each make the next fsync log again; an fsync of its directory
// logs the file LOG_INODE_EXISTS only (its new dentry), which leaves last_log_commit alone,
// so the file's own fsync after a change still logs. After a commit nothing is in the log.
// The crash at the end replays, in the kernel, the state of the last logged fsync.
#[test]
fn fsync_skips_an_inode_already_in_the_log() {
    use std::sync::atomic::Ordering::Relaxed;
    let d = tmpdir("in-log");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let fs = FsInfo::open(&img, rw()).unwrap();
    let root = fs.mount_root;
    let top = fs.root(root).unwrap().item.root_dirid;
    let (dir, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, top, b"d", 0o40755, 0, 0, 0).unwrap();
    fs.sync().unwrap();
    let sync = |ino| ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, ino).unwrap();
    let counts = || {
        (
            fs.counters.fsync_skipped_in_log.load(Relaxed),
            fs.counters.log_syncs.load(Relaxed),
        )
    };
    let (f, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"f", 0o100644, 0, 0, 0).unwrap();
    let mut content = pattern(1, 20_000);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, f, 0, &content).unwrap();
    assert_eq!(sync(f), SyncOutcome::Logged);
    let (skips, syncs) = counts();
    // Nothing changed: in the log.
    assert_eq!(sync(f), SyncOutcome::Skipped);
    assert_eq!(counts(), (skips + 1, syncs), "skipped without a log sync");
    // A data write.
    let more = pattern(2, 5000);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, f, 20_000, &more).unwrap();
    content.extend_from_slice(&more);
    assert_eq!(sync(f), SyncOutcome::Logged);
    assert_eq!(sync(f), SyncOutcome::Skipped);
    // An inode item change only.
    let chmod = ubtrfs_fs::inode::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    ubtrfs_fs::inode::btrfs_setattr(&fs, root, f, &chmod).unwrap();
    assert_eq!(sync(f), SyncOutcome::Logged);
    assert_eq!(counts().0, skips + 2);
    // A new file logged as a new dentry of its directory (LOG_INODE_EXISTS): not in the log.
    let (g, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"g", 0o100644, 0, 0, 0).unwrap();
    let gc = pattern(3, 9000);
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, g, 0, &gc).unwrap();
    ubtrfs_fs::file_write::btrfs_writeback(&fs, root, g).unwrap();
    assert_eq!(sync(dir), SyncOutcome::Logged);
    assert_eq!(
        sync(g),
        SyncOutcome::Logged,
        "logged as existing is not in the log"
    );
    assert_eq!(sync(g), SyncOutcome::Skipped);
    assert_eq!(counts().0, skips + 3);
    assert_eq!(fs.counters.fsync_skipped.load(Relaxed), counts().0);
    // Crash: the kernel replays the last logged state of both files.
    drop(fs);
    btrfs_check(&img);
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "rw");
        assert!(std::fs::read(m.dir.join("d/f")).unwrap() == content);
        assert!(std::fs::read(m.dir.join("d/g")).unwrap() == gc);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(m.dir.join("d/f")).unwrap().mode() & 0o7777,
            0o600
        );
    }
    // A new transaction: nothing is in its log.
    let fs = FsInfo::open(&img, rw()).unwrap();
    let f = ino_of(&fs, root, ino_of(&fs, root, top, "d"), "f");
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, f, 0, b"x").unwrap();
    assert_eq!(
        ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, f).unwrap(),
        SyncOutcome::Logged
    );
    drop(fs);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: a file's in-memory state is evicted after its new data was written back in the
// running transaction (FUSE FORGET of a clean inode drops its extent maps and modified list),
// then it is looked up again and fsynced. The kernel's btrfs_read_locked_inode marks an inode
// whose last change is in the running transaction NEEDS_FULL_SYNC, because the modified list
// that the fast path logs from is gone; without that the log holds the new size but not the new
// extents. Both replays must show the fsynced data.
#[test]
fn fsync_of_an_inode_reloaded_in_its_transaction_logs_everything() {
    let d = tmpdir("reload");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let base = pattern(1, 300_000);
    let mut expect = base.clone();
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let (f, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"f", 0o100644, 0, 0, 0).unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, f, 0, &base).unwrap();
        fs.sync().unwrap();
        // Running transaction: an overwrite and an append, written back, then eviction.
        let patch = pattern(2, 20_000);
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, f, 100_000, &patch).unwrap();
        expect[100_000..120_000].copy_from_slice(&patch);
        let more = pattern(3, 50_000);
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, f, base.len() as u64, &more)
            .unwrap();
        expect.extend_from_slice(&more);
        ubtrfs_fs::file_write::btrfs_writeback(&fs, root, f).unwrap();
        ubtrfs_fs::inode::btrfs_forget_cached_inode(&fs, root, f);
        assert_eq!(
            ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, f).unwrap(),
            SyncOutcome::Logged
        );
        // Crash: no commit.
    }
    assert_ne!(log_root(&img), 0);
    btrfs_check(&img);
    let copy = d.join("copy");
    std::fs::copy(&img, &copy).unwrap();
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "rw");
        assert!(
            std::fs::read(m.dir.join("f")).unwrap() == expect,
            "kernel replay lost fsynced data"
        );
    }
    {
        let fs = FsInfo::open(&copy, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        assert!(
            read_all(&fs, root, ino_of(&fs, root, dir, "f")) == expect,
            "ubtrfs replay lost fsynced data"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
