//! Self-tests of the test harness against the kernel alone (no ubtrfs involved): they prove
//! that the tree generator, the snapshot comparer and the mount guards agree with what
//! mkfs.btrfs and the kernel actually store. Ignored by default (they duplicate the kernel
//! side of the real tests); run with
//! `cargo test -p ubtrfs --test harness_selftest -- --ignored`.
//!
//! What mkfs.btrfs --rootdir (btrfs-progs 6.2, the version on the CI machine) does NOT preserve,
//! found with these tests, and therefore not compared for mkfs images:
//! - nanoseconds of all timestamps (stored as whole seconds);
//! - the root directory's own mode, owner and times (the image root is 0755 root:root with the
//!   time of mkfs);
//! - holes: sparse files are written out as zero-filled data extents (content is the same);
//! - ctime (set by mkfs) and atime of anything the walk reads.
//!
//! It does preserve: file types (fifos included), permission bits including setuid/setgid/sticky
//! and 000, owners, sizes, contents, symlink targets up to 4095 bytes, hard links across
//! directories, user.* xattrs on files and directories, names (255 bytes, non-UTF-8), mtime
//! seconds (also before 1970 and after 2038).

mod common;

use common::compare::{assert_same, diff, snapshot, CompareOptions};
use common::mount::LoopMount;
use common::tree::{generate_tree, set_xattr, GenOptions};
use common::{mkfs_image, require_root, require_tool, sh, Mkfs, TestDir};
use std::fs;
use std::os::unix::fs::PermissionsExt;

// Test scenario: a mkfs.btrfs --rootdir image of the generated tree, mounted by the kernel,
// compares equal to the source with the mkfs comparison rules.
#[test]
#[ignore]
fn harness_mkfs_image_matches_source_through_kernel() {
    require_root();
    let t = TestDir::new("selftest-mkfs");
    let src = t.mkdir("src");
    generate_tree(&src, &GenOptions::default());
    let img = t.join("image");
    mkfs_image(
        &img,
        &Mkfs {
            rootdir: Some(&src),
            ..Default::default()
        },
    );
    let expected = snapshot(&src);
    let mnt = t.mkdir("mnt");
    let k = LoopMount::new(&img, &mnt, "ro");
    let got = snapshot(k.path());
    let again = snapshot(k.path());
    drop(k);
    assert_same(
        "kernel mount of mkfs image vs source",
        &expected,
        &got,
        &CompareOptions::mkfs_vs_source(),
    );
    // Two walks of the same read-only mount see exactly the same thing (atime included).
    assert_same(
        "kernel mount walked twice",
        &got,
        &again,
        &CompareOptions::same_image(),
    );
}

// Test scenario: a tree copied with cp -a into a kernel mount with compress-force=zstd, mounted
// again read-only by the kernel, compares equal to the source with nanosecond mtimes, and two
// separate read-only kernel mounts of it compare equal in every field (the FUSE-vs-kernel rules).
#[test]
#[ignore]
fn harness_kernel_written_image_matches_source() {
    require_root();
    require_tool("cp");
    let t = TestDir::new("selftest-kernel");
    let src = t.mkdir("src");
    generate_tree(
        &src,
        &GenOptions {
            seed: 2,
            ..Default::default()
        },
    );
    let img = t.join("image");
    mkfs_image(&img, &Mkfs::default());
    let mnt = t.mkdir("mnt");
    {
        let w = LoopMount::new(&img, &mnt, "compress-force=zstd");
        sh(
            "cp",
            &[
                "-a",
                &format!("{}/.", src.display()),
                &w.path().display().to_string(),
            ],
        );
        sh("sync", &[]);
    }
    let dump = sh(
        "btrfs",
        &[
            "inspect-internal",
            "dump-tree",
            "-t",
            "5",
            img.to_str().unwrap(),
        ],
    );
    assert!(
        dump.contains("compression 3"),
        "no zstd-compressed extent in the image"
    );
    let expected = snapshot(&src);
    let k = LoopMount::new(&img, &mnt, "ro");
    let first = snapshot(k.path());
    drop(k);
    let k = LoopMount::new(&img, &mnt, "ro");
    let second = snapshot(k.path());
    drop(k);
    assert_same(
        "kernel-written image vs source",
        &expected,
        &first,
        &CompareOptions::kernel_copy_vs_source(),
    );
    assert_same(
        "two kernel mounts of one image",
        &first,
        &second,
        &CompareOptions::same_image(),
    );
}

// Test scenario: the comparer is not vacuous: each kind of damage made to a copy of the tree
// (content, size, mode, owner, mtime nanoseconds, symlink target, xattr value and presence,
// a broken hard link, a missing and an extra entry, a changed type) is reported.
#[test]
#[ignore]
fn harness_comparer_reports_every_kind_of_difference() {
    require_root();
    let t = TestDir::new("selftest-compare");
    let src = t.mkdir("src");
    generate_tree(
        &src,
        &GenOptions {
            seed: 3,
            large_file_size: 1 << 20,
            many_entries: 50,
            depth: 5,
        },
    );
    let copy = t.join("copy");
    sh("cp", &["-a", src.to_str().unwrap(), copy.to_str().unwrap()]);
    let o = CompareOptions::kernel_copy_vs_source();
    assert_same("copy vs source", &snapshot(&src), &snapshot(&copy), &o);

    // Damage, one of each kind.
    let f = copy.join("sizes/random-4096");
    let mut data = fs::read(&f).unwrap();
    data[100] ^= 1;
    fs::write(&f, &data).unwrap();
    let f = copy.join("sizes/text-8192");
    fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .set_len(8000)
        .unwrap();
    fs::set_permissions(
        copy.join("sizes/text-100"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    common::tree::set_owner(&copy.join("sizes/text-2"), 1, 2);
    common::tree::set_times(&copy.join("sizes/text-1"), (1, 1), (1_000_000_000, 1));
    fs::remove_file(copy.join("links/short")).unwrap();
    std::os::unix::fs::symlink("other", copy.join("links/short")).unwrap();
    set_xattr(&copy.join("xattrs/file"), "user.small", b"w");
    set_xattr(&copy.join("xattrs/file"), "user.extra", b"x");
    let hl = copy.join("hardlinks/group2-b");
    fs::remove_file(&hl).unwrap();
    fs::copy(copy.join("hardlinks/group2-a"), &hl).unwrap();
    fs::remove_file(copy.join("sizes/mixed-0")).unwrap();
    fs::write(copy.join("sizes/new-file"), b"new").unwrap();
    fs::remove_file(copy.join("special/fifo")).unwrap();
    fs::write(copy.join("special/fifo"), b"").unwrap();

    let d = diff(&snapshot(&src), &snapshot(&copy), &o).join("\n");
    for needle in [
        "/sizes/random-4096: content differs",
        "first difference at byte 100",
        "/sizes/text-8192: size",
        "/sizes/text-100: mode",
        "/sizes/text-2: owner",
        "/sizes/text-1: mtime",
        "/links/short: symlink target",
        "/xattrs/file: xattr \"user.small\"",
        "/xattrs/file: unexpected xattr \"user.extra\"",
        "hard links",
        "/sizes/mixed-0: missing",
        "/sizes/new-file: unexpected entry",
        "/special/fifo: type",
    ] {
        assert!(d.contains(needle), "{needle:?} not reported in:\n{d}");
    }
}
