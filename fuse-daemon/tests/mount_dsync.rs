//! O_DIRECT and O_DSYNC writes through a live mount: the daemon routes FUSE_WRITE by the open
//! flags it carries (direct_io.rs), an O_DIRECT|O_DSYNC write to a NOCOW file fsyncs under
//! its inode lock, and what such writes made durable survives SIGKILL of the daemon (the
//! kernel replays the log).

mod common;

use common::mount::{LoopMount, Mount};
use common::{
    check_image, mkfs_image, require_fuse_env, require_tool, run_with_timeout, Mkfs, TestDir,
    UBTRFS,
};
use serde_json::Value;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn stats(mnt: &Path) -> Value {
    let out = run_with_timeout(
        Command::new(UBTRFS).args(["stats", &mnt.display().to_string(), "--json"]),
        Duration::from_secs(60),
    )
    .expect("ubtrfs stats did not finish within 60 s");
    assert!(out.status.success(), "ubtrfs stats failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("stats --json is JSON")
}

fn u(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats {group}.{key}: {}", v[group][key]))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// Test scenario: on a live mount, O_DIRECT|O_DSYNC writes go to a NOCOW file (stays direct: its
// fsync runs under the write's inode lock, then the client's FUSE_FSYNC; an fsync after that
// finds the inode in the log) and to a checksummed file (falls back to buffered + writeback, then FUSE_FSYNC); an
// O_DSYNC buffered write and a plain O_DIRECT write (not synced) follow. The daemon is then
// killed with SIGKILL: no commit ran (commit=3600), so the kernel's loop mount replays the log
// and must show the three synced writes; btrfs check is clean before and after.
#[test]
fn dsync_and_direct_writes_survive_sigkill() {
    require_fuse_env();
    require_tool("chattr");
    let t = TestDir::new("dsync");
    let img = t.join("img");
    mkfs_image(
        &img,
        &Mkfs {
            size: 1 << 30,
            ..Mkfs::default()
        },
    );
    let mnt = t.mkdir("mnt");
    let mut m = Mount::with_options(&img, &mnt, "rw,commit=3600");
    std::fs::create_dir(mnt.join("nocow")).unwrap();
    let st = Command::new("chattr")
        .arg("+C")
        .arg(mnt.join("nocow"))
        .status()
        .unwrap();
    assert!(st.success(), "chattr +C");
    let before = stats(&mnt);
    let open = |p: &str, extra: i32| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(extra)
            .open(mnt.join(p))
            .unwrap_or_else(|e| panic!("open {p}: {e}"))
    };
    let a = pattern(1, 64 << 10);
    let b = pattern(2, 40 << 10);
    let c = pattern(3, 5000);
    let lost = pattern(4, 8192);
    let fa = open("nocow/a", libc::O_DIRECT | libc::O_DSYNC);
    fa.write_all_at(&a, 0).unwrap();
    // Nothing changed since the write's syncs: this fsync finds the inode in the log.
    fa.sync_all().unwrap();
    open("b", libc::O_DIRECT | libc::O_DSYNC)
        .write_all_at(&b, 0)
        .unwrap();
    open("c", libc::O_DSYNC).write_all_at(&c, 0).unwrap();
    open("nocow/lost", libc::O_DIRECT)
        .write_all_at(&lost, 0)
        .unwrap();
    let after = stats(&mnt);
    let d = |g: &str, k: &str| u(&after, g, k) - u(&before, g, k);
    assert!(d("io", "direct_writes") >= 2, "{after}");
    assert!(d("io", "direct_write_fallbacks") >= 1, "{after}");
    assert!(
        d("fsync", "dio") >= 1,
        "no fsync under a direct write's lock: {after}"
    );
    assert!(
        d("fsync", "skipped_in_log") >= 1,
        "an fsync with nothing changed since the last one relogged: {after}"
    );
    assert_eq!(
        u(&after, "transactions", "committed"),
        u(&before, "transactions", "committed")
    );
    // Power cut, as far as the image is concerned.
    m.kill();
    check_image(&img);
    {
        let k = LoopMount::new(&img, &t.mkdir("kmnt"), "rw");
        for (p, want) in [("nocow/a", &a), ("b", &b), ("c", &c)] {
            let got = std::fs::read(k.path().join(p)).unwrap();
            assert!(got == **want, "{p}: the kernel's replay differs");
        }
        k.unmount();
    }
    check_image(&img);
}

// Test scenario: a file larger than the per-inode dirty limit (64 MiB) is written into a
// committed inode, so part of it is written back while the write runs (its extent maps go on
// the inode's modified list); the file is closed and `drop_caches` makes the kernel forget the
// inode (FUSE FORGET: ubtrfs drops its extent maps); it is then opened again and fsynced, and
// the daemon killed. The fsync must log every extent written in the transaction (the kernel
// marks such a re-read inode NEEDS_FULL_SYNC), so the kernel's replay shows the whole file, and
// so does ubtrfs's, whose `ubtrfs stats` then reports what the replay did per stage.
#[test]
fn fsync_after_the_kernel_forgot_the_inode_survives_sigkill() {
    require_fuse_env();
    let t = TestDir::new("forget-fsync");
    let img = t.join("img");
    mkfs_image(
        &img,
        &Mkfs {
            size: 1 << 30,
            ..Mkfs::default()
        },
    );
    let mnt = t.mkdir("mnt");
    {
        let m = Mount::with_options(&img, &mnt, "rw");
        std::fs::write(mnt.join("f"), b"committed").unwrap();
        // Data chunks for what follows: an fsync right after a chunk allocation commits.
        std::fs::write(mnt.join("filler"), pattern(1, 160 << 20)).unwrap();
        std::fs::remove_file(mnt.join("filler")).unwrap();
        m.unmount();
    }
    let mut m = Mount::with_options(&img, &mnt, "rw,commit=3600");
    let data = pattern(7, 72 << 20);
    std::fs::write(mnt.join("f"), &data).unwrap();
    let before = stats(&mnt);
    assert!(
        u(&before, "extent_maps", "cached") > 0,
        "the write did not write back past the dirty limit: {before}"
    );
    // The kernel forgets unused inodes; wait until ubtrfs has dropped the file's maps.
    let mut forgotten = false;
    for _ in 0..50 {
        std::fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if u(&stats(&mnt), "extent_maps", "cached") == 0 {
            forgotten = true;
            break;
        }
    }
    assert!(forgotten, "the kernel never sent FORGET for the file");
    OpenOptions::new()
        .write(true)
        .open(mnt.join("f"))
        .unwrap()
        .sync_all()
        .unwrap();
    let after = stats(&mnt);
    assert_eq!(
        u(&after, "transactions", "committed"),
        u(&before, "transactions", "committed"),
        "a commit made the test meaningless"
    );
    assert!(
        after["log_replay"].is_null(),
        "no log was pending at mount: {after}"
    );
    m.kill();
    check_image(&img);
    let copy = t.join("copy");
    std::fs::copy(&img, &copy).unwrap();
    let k = LoopMount::new(&img, &t.mkdir("kmnt"), "rw");
    let got = std::fs::read(k.path().join("f")).unwrap();
    assert!(
        got == data,
        "the kernel's replay differs ({} of {} bytes)",
        got.len(),
        data.len()
    );
    k.unmount();
    // ubtrfs's own replay of the same crash image (read-only: in memory), and its counters.
    let umnt = t.mkdir("umnt");
    let um = Mount::with_options(&copy, &umnt, "ro");
    assert!(
        std::fs::read(umnt.join("f")).unwrap() == data,
        "ubtrfs's replay differs"
    );
    let r = stats(&umnt);
    assert!(u(&r, "log_replay", "log_trees") >= 1, "{r}");
    assert!(u(&r, "log_replay", "inodes") >= 1, "{r}");
    assert!(u(&r, "log_replay", "extents") >= 1, "{r}");
    um.unmount();
}
