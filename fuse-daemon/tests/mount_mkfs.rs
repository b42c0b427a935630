//! Read-only mounts of mkfs.btrfs --rootdir images: default checksum (crc32c), xxhash, sha256,
//! blake2 and 64 KiB nodes. Each test compares the ubtrfs mount with the source tree (the mkfs
//! rules: see harness_selftest.rs for what mkfs 6.2 does not preserve) and with a kernel mount
//! of the same image (every field: inode numbers, link counts, blocks, all times).

mod common;

use common::compare::{diff, snapshot, CompareOptions};
use common::mount::{LoopMount, Mount};
use common::tree::{generate_tree, GenOptions};
use common::{mkfs_image, require_fuse_env, seed_of, snapshot_guarded, Mkfs, Problems, TestDir};
use std::time::Duration;

const WALK_LIMIT: Duration = Duration::from_secs(600);

fn mkfs_case(name: &str, csum: Option<&str>, nodesize: Option<u32>) {
    require_fuse_env();
    let t = TestDir::new(name);
    let src = t.mkdir("src");
    let n = generate_tree(
        &src,
        &GenOptions {
            seed: seed_of(name),
            ..Default::default()
        },
    );
    assert!(n > 3000, "generator made only {n} entries");
    let img = t.join("image");
    mkfs_image(
        &img,
        &Mkfs {
            rootdir: Some(&src),
            csum,
            nodesize,
            ..Default::default()
        },
    );
    let expected = snapshot(&src);
    let mnt = t.mkdir("mnt");

    let mut m = Mount::new(&img, &mnt);
    let got = snapshot_guarded(&mut m, WALK_LIMIT);
    let exit = m.unmount();

    let k = LoopMount::new(&img, &mnt, "ro");
    let kernel = snapshot(k.path());
    drop(k);

    let mut p = Problems::default();
    p.add(
        "ubtrfs mount vs source tree",
        diff(&expected, &got, &CompareOptions::mkfs_vs_source()),
    );
    p.add(
        "ubtrfs mount vs kernel mount of the same image",
        diff(&kernel, &got, &CompareOptions::same_image()),
    );
    if !(exit.is_clean_exit() && exit.status.and_then(|s| s.code()) == Some(0)) {
        p.add_one("daemon exit after unmount", exit.describe());
    }
    p.check(&format!("{name}: image {img:?}"));
}

// Test scenario: mkfs.btrfs --rootdir with default options (crc32c, 16 KiB nodes); the ubtrfs
// mount shows the source tree and matches the kernel's view of the image.
#[test]
fn mkfs_default_crc32c() {
    mkfs_case("mkfs-crc32c", None, None);
}

// Test scenario: as the default case with --csum xxhash (xxhash64 tree-block and data checksums).
#[test]
fn mkfs_csum_xxhash() {
    mkfs_case("mkfs-xxhash", Some("xxhash"), None);
}

// Test scenario: as the default case with --csum sha256.
#[test]
fn mkfs_csum_sha256() {
    mkfs_case("mkfs-sha256", Some("sha256"), None);
}

// Test scenario: as the default case with --csum blake2 (blake2b-256).
#[test]
fn mkfs_csum_blake2() {
    mkfs_case("mkfs-blake2", Some("blake2"), None);
}

// Test scenario: as the default case with --nodesize 65536 (bigger leaves: more items per leaf,
// a larger inline limit, fewer tree levels).
#[test]
fn mkfs_nodesize_64k() {
    mkfs_case("mkfs-nodesize64k", None, Some(65536));
}
