//! Subvolumes and snapshots written by the kernel: the top level, a subvolume with a generated
//! tree, a nested subvolume, a writable snapshot changed afterwards (files overwritten, removed,
//! added), and a read-only snapshot of the top level (which holds empty placeholder directories
//! where the subvolumes were). ubtrfs must show what the kernel shows. Inode numbers are not
//! compared: ubtrfs maps those of subvolumes other than the mounted one above 2^48, where the
//! kernel gives each subvolume its own st_dev instead; the placeholder directories' times are
//! the time of the lookup (kernel) or of the mount (ubtrfs), so they are not compared either.

mod common;

use common::compare::{diff, snapshot, CompareOptions, Kind};
use common::mount::{LoopMount, Mount};
use common::tree::{generate_tree, make_file, Content, GenOptions};
use common::{mkfs_image, require_fuse_env, sh, snapshot_guarded, Mkfs, Problems, TestDir};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

/// BTRFS_EMPTY_SUBVOL_DIR_OBJECTID: the inode number of a snapshot's placeholder directory.
const EMPTY_SUBVOL_DIR_INO: u64 = 2;

// Test scenario: a kernel-written image with subvolumes, a nested subvolume, a writable snapshot
// changed after the snapshot and a read-only snapshot reads through ubtrfs exactly as through
// the kernel (content, types, modes, owners, sizes, link counts, blocks, times, xattrs).
#[test]
fn kernel_written_subvolumes_and_snapshots() {
    require_fuse_env();
    let t = TestDir::new("subvolumes");
    let img = t.join("image");
    mkfs_image(&img, &Mkfs::default());
    let mnt = t.mkdir("mnt");
    let small = GenOptions {
        seed: 7,
        large_file_size: 3 << 20,
        many_entries: 300,
        depth: 6,
    };
    {
        let w = LoopMount::new(&img, &mnt, "compress=zstd");
        let root = w.path().to_path_buf();
        let r = |p: &str| root.join(p).to_str().unwrap().to_string();
        make_file(&root.join("top-file"), 1, 10_000, Content::Mixed);
        sh("btrfs", &["subvolume", "create", &r("sub")]);
        generate_tree(&root.join("sub"), &small);
        sh("btrfs", &["subvolume", "create", &r("sub/nested")]);
        make_file(&root.join("sub/nested/inside"), 2, 5000, Content::Text);
        sh("btrfs", &["subvolume", "snapshot", &r("sub"), &r("snap")]);
        // Change the writable snapshot: shared extents get split between the two trees.
        make_file(
            &root.join("snap/sizes/mixed-65536"),
            3,
            70_000,
            Content::Mixed,
        );
        fs::remove_file(root.join("snap/sizes/text-4096")).unwrap();
        make_file(&root.join("snap/new-in-snapshot"), 4, 3000, Content::Text);
        sh(
            "btrfs",
            &["subvolume", "snapshot", "-r", &r(""), &r("ro-snap")],
        );
        sh("sync", &[]);
    }

    let mut m = Mount::new(&img, &mnt);
    let got = snapshot_guarded(&mut m, Duration::from_secs(600));
    let exit = m.unmount();
    let k = LoopMount::new(&img, &mnt, "ro");
    let kernel = snapshot(k.path());
    drop(k);

    let placeholders: Vec<PathBuf> = kernel
        .entries
        .iter()
        .filter_map(|(p, e)| match e {
            Ok(e) if e.kind == Kind::Dir && e.ino == EMPTY_SUBVOL_DIR_INO => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert!(
        placeholders.len() >= 2,
        "the read-only snapshot should hold placeholder directories: {placeholders:?}"
    );
    let o = CompareOptions {
        inode_numbers: false,
        ..CompareOptions::same_image()
    };
    let differences: Vec<String> = diff(&kernel, &got, &o)
        .into_iter()
        .filter(|l| {
            !placeholders
                .iter()
                .any(|p| l.starts_with(&format!("/{}: ", p.display())) && l.contains("time:"))
        })
        .collect();
    let mut p = Problems::default();
    p.add(
        "ubtrfs mount vs kernel mount of the same image",
        differences,
    );
    if !(exit.is_clean_exit() && exit.status.and_then(|s| s.code()) == Some(0)) {
        p.add_one("daemon exit after unmount", exit.describe());
    }
    p.check(&format!("subvolumes: image {img:?}"));
}
