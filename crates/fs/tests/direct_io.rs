//! Direct writes and O_DSYNC writes (direct_io.rs): the lock protocol of `btrfs_sync_file`'s
//! direct-write variant, the fallback to buffered writes, and what a crash right after an
//! O_DSYNC direct write leaves (replayed by the kernel).

mod common;

use common::oracle::{btrfs_check, mkfs_btrfs, pattern, KernelMount};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;
use ubtrfs_fs::direct_io::{btrfs_direct_write, btrfs_do_write_iter, WriteFlags, WritePath};
use ubtrfs_fs::fileattr::{btrfs_fileattr_set, FileAttrSet};
use ubtrfs_fs::tree_log::{btrfs_sync_file, SyncOutcome};
use ubtrfs_fs::{FsInfo, MountOptions};

/// Generous bound for an operation that must finish (a deadlock fails the test instead of
/// hanging it); never a speed target.
const MUST_FINISH: Duration = Duration::from_secs(120);
/// How long an operation that must be blocked is watched before it is released.
const BLOCKED_FOR: Duration = Duration::from_millis(300);

fn tmpdir(name: &str) -> PathBuf {
    let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("dio-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        commit_interval: 3600,
        ..MountOptions::default()
    }
}

/// FS_NOCOW_FL (chattr +C): NODATACOW and NODATASUM, so direct writes stay direct.
const FS_NOCOW_FL: u32 = 0x0080_0000;

/// A committed filesystem with an empty NOCOW file "nocow" and a checksummed file "csum".
fn setup(fs: &FsInfo) -> (u64, u64, u64) {
    let root = fs.mount_root;
    let dir = fs.root(root).unwrap().item.root_dirid;
    let (nocow, _) =
        ubtrfs_fs::inode::btrfs_new_inode(fs, root, dir, b"nocow", 0o100644, 0, 0, 0).unwrap();
    btrfs_fileattr_set(fs, root, nocow, FileAttrSet::Flags(FS_NOCOW_FL)).unwrap();
    let (csum, _) =
        ubtrfs_fs::inode::btrfs_new_inode(fs, root, dir, b"csum", 0o100644, 0, 0, 0).unwrap();
    fs.sync().unwrap();
    (root, nocow, csum)
}

fn read_all(fs: &FsInfo, root: u64, ino: u64) -> Vec<u8> {
    let ii = ubtrfs_fs::inode::read_inode(fs, root, ino).unwrap();
    let emi = fs.ems.inode(root, ino);
    ubtrfs_fs::file::read(fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap()
}

/// Wait (bounded) until `cond` holds.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + MUST_FINISH;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// Test scenario: the lock protocol of btrfs_sync_file (file.c `skip_ilock`).
// (a) An ordinary fsync takes the inode lock:
//       test thread                     fsync thread
//       inode_lock shared (a writer)
//                                       btrfs_sync_file → blocks on the inode lock
//       (still blocked after a while)
//       unlock                          logs, syncs the log → Logged
// (b) An O_DSYNC direct write holds the inode lock exclusively and runs its fsync under it:
//     if that fsync took the inode lock again it would deadlock (the lock is not recursive).
// (c) That fsync does take the mmap lock:
//       test thread                     writer thread
//       mmap_lock shared (the shrinker)
//                                       btrfs_direct_write(dsync): inode lock, data written,
//                                       btrfs_sync_file_dio → blocks on the mmap lock
//       (inode lock held exclusively by the writer, write not done)
//       unlock                          logs, syncs, unlocks the inode → Direct + Logged
#[test]
fn dsync_direct_write_syncs_under_its_inode_lock() {
    let d = tmpdir("locks");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let fs = FsInfo::open(&img, rw()).unwrap();
    let (root, nocow, csum) = setup(&fs);
    let data1 = pattern(1, 64 << 10);
    let data2 = pattern(2, 16 << 10);
    // Threads are not scoped: a deadlocked one must not keep a failing test from ending.
    // (a)
    ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, csum, 0, &pattern(3, 10_000)).unwrap();
    let emi = fs.ems.inode(root, csum);
    let held = emi.inode_lock().read();
    let (tx, rx) = mpsc::channel();
    let f = fs.clone();
    std::thread::spawn(move || tx.send(btrfs_sync_file(&f, root, csum).unwrap()));
    std::thread::sleep(BLOCKED_FOR);
    assert!(
        rx.try_recv().is_err(),
        "an ordinary fsync finished while another holder had the inode lock"
    );
    drop(held);
    assert_eq!(rx.recv_timeout(MUST_FINISH).unwrap(), SyncOutcome::Logged);

    // (b)
    let dio_before = fs.counters.fsync_dio.load(Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let (f, buf) = (fs.clone(), data1.clone());
    std::thread::spawn(move || {
        tx.send(btrfs_direct_write(&f, root, nocow, 0, &buf, true, || Ok(())).unwrap())
    });
    let o = rx
        .recv_timeout(MUST_FINISH)
        .expect("the O_DSYNC direct write deadlocked: its fsync took the inode lock");
    assert_eq!(o.path, WritePath::Direct);
    assert_eq!(o.dio_sync, Some(SyncOutcome::Logged));
    assert_eq!(
        fs.counters.fsync_dio.load(Ordering::Relaxed),
        dio_before + 1
    );

    // (c)
    let emi = fs.ems.inode(root, nocow);
    let mmap = emi.mmap_lock().read();
    let (tx, rx) = mpsc::channel();
    let (f, buf) = (fs.clone(), data2.clone());
    std::thread::spawn(move || {
        tx.send(btrfs_direct_write(&f, root, nocow, 64 << 10, &buf, true, || Ok(())).unwrap())
    });
    // The write reached its fsync (counted on entry), which now waits for the mmap lock.
    wait_for("the direct write's fsync", || {
        fs.counters.fsync_dio.load(Ordering::Relaxed) == dio_before + 2
    });
    std::thread::sleep(BLOCKED_FOR);
    assert!(
        rx.try_recv().is_err(),
        "the direct write's fsync finished while the mmap lock was held shared"
    );
    assert!(
        emi.inode_lock().is_locked_exclusive(),
        "the direct write holds the inode lock exclusively during its fsync"
    );
    drop(mmap);
    let o = rx.recv_timeout(MUST_FINISH).unwrap();
    assert_eq!(
        (o.path, o.dio_sync),
        (WritePath::Direct, Some(SyncOutcome::Logged))
    );
    assert!(!emi.inode_lock().is_locked());
    let mut expect = data1.clone();
    expect.extend_from_slice(&data2);
    assert!(read_all(&fs, root, nocow) == expect);
    // Crash right after the write returned: no commit, the log holds it.
    drop(fs);
    btrfs_check(&img);
    {
        let m = KernelMount::new(&img, &d.join("mnt"), "rw");
        let got = std::fs::read(m.dir.join("nocow")).unwrap();
        assert!(got == expect, "kernel replay of the direct writes differs");
    }
    btrfs_check(&img);
    let _ = std::fs::remove_dir_all(&d);
}

// Test scenario: btrfs_direct_write's choices. A checksummed inode or an unaligned range falls
// back to a buffered write that is written back before returning (no dirty data left) and
// runs no fsync of its own; the generic_write_sync of btrfs_do_write_iter then runs an
// ordinary fsync. An aligned write to a NOCOW inode stays direct.
#[test]
fn direct_write_falls_back_where_the_kernel_does() {
    let d = tmpdir("fallback");
    let img = d.join("img");
    mkfs_btrfs(&img, 1 << 30, &[]);
    let fs = FsInfo::open(&img, rw()).unwrap();
    let (root, nocow, csum) = setup(&fs);
    let direct_dsync = WriteFlags {
        direct: true,
        dsync: true,
    };
    let cases: [(u64, u64, usize, WritePath); 3] = [
        (csum, 0, 8192, WritePath::DirectFallback),
        (nocow, 100, 8192, WritePath::DirectFallback),
        (nocow, 8192, 8192, WritePath::Direct),
    ];
    for (i, (ino, off, len, path)) in cases.into_iter().enumerate() {
        let data = pattern(10 + i as u64, len);
        let o = btrfs_do_write_iter(&fs, root, ino, off, &data, direct_dsync, || Ok(())).unwrap();
        assert_eq!(o.path, path, "case {i}");
        assert_eq!(o.written, len);
        assert!(
            ubtrfs_fs::file_write::dirty_inode(&fs, root, ino)
                .is_none_or(|s| s.lock().sectors.is_empty()),
            "case {i}: data left unwritten after a direct write"
        );
        assert_eq!(o.dio_sync.is_some(), path == WritePath::Direct, "case {i}");
        assert!(o.write_sync.is_some(), "case {i}: generic_write_sync");
        let got = read_all(&fs, root, ino);
        assert!(
            got[off as usize..off as usize + len] == data[..],
            "case {i}"
        );
    }
    assert_eq!(fs.counters.direct_writes.load(Ordering::Relaxed), 1);
    assert_eq!(
        fs.counters.direct_write_fallbacks.load(Ordering::Relaxed),
        2
    );
    let _ = std::fs::remove_dir_all(&d);
}
