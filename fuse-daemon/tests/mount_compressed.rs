//! Read-only mounts of kernel-written compressed images. The kernel writes the generated tree
//! (cp -a: data, then owners, modes, xattrs and nanosecond times) into a fresh image mounted with
//! compress-force=zlib / lzo / zstd, so regular and inline extents are compressed exactly as the
//! kernel compresses them. ubtrfs must show the source tree (nanosecond mtimes) and exactly what
//! a kernel mount of the same image shows. The kernel also makes `kernel-extras/` (partially
//! overwritten compressed extents, prealloc, punched holes, reflinks, truncation inside an
//! extent, NOCOW files, grown inline files, fragmentation), judged against the kernel's view.

mod common;

use common::compare::{diff, snapshot, CompareOptions};
use common::mount::{LoopMount, Mount};
use common::tree::{generate_tree, kernel_extras, set_times, GenOptions};
use common::{
    mkfs_image, require_fuse_env, require_tool, seed_of, sh, snapshot_guarded, Mkfs, Problems,
    TestDir,
};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

const WALK_LIMIT: Duration = Duration::from_secs(600);

fn compressed_case(alg: &str, type_code: u8) {
    compressed_case_with("compress-force", alg, type_code, None);
}

/// `mount_opt`: compress or compress-force; `features`: mkfs -O list.
fn compressed_case_with(mount_opt: &str, alg: &str, type_code: u8, features: Option<&str>) {
    require_fuse_env();
    require_tool("cp");
    let name = format!(
        "{mount_opt}-{alg}{}",
        if features.is_some() { "-features" } else { "" }
    );
    let t = TestDir::new(&name);
    let src = t.mkdir("src");
    generate_tree(
        &src,
        &GenOptions {
            seed: seed_of(&name),
            ..Default::default()
        },
    );
    let img = t.join("image");
    mkfs_image(
        &img,
        &Mkfs {
            features,
            ..Default::default()
        },
    );
    let mnt = t.mkdir("mnt");
    {
        let w = LoopMount::new(&img, &mnt, &format!("{mount_opt}={alg}"));
        sh(
            "cp",
            &[
                "-a",
                &format!("{}/.", src.display()),
                &w.path().display().to_string(),
            ],
        );
        // Extents only the kernel makes (partial overwrites, prealloc, reflinks, NOCOW, ...),
        // compared with the kernel's view only; the root's times are put back afterwards.
        kernel_extras(&w.path().join("kernel-extras"), seed_of(&name));
        let md = fs::metadata(&src).unwrap();
        set_times(
            w.path(),
            (md.atime(), md.atime_nsec()),
            (md.mtime(), md.mtime_nsec()),
        );
        sh("sync", &[]);
    }
    // The test is only worth something if the kernel really compressed, inline and regular.
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
    let marker = format!("compression {type_code} ({alg})");
    let compressed = dump.matches(&marker).count();
    assert!(
        compressed > 100,
        "only {compressed} extents with {marker:?} in the image"
    );
    assert!(
        dump.contains("inline extent data size") && dump.contains(&marker),
        "no inline extents in the image"
    );

    let expected = snapshot(&src);
    let mut m = Mount::new(&img, &mnt);
    let got = snapshot_guarded(&mut m, WALK_LIMIT);
    let exit = m.unmount();

    // The oracle: the kernel's read-only mount of the same image.
    let k = LoopMount::new(&img, &mnt, "ro");
    let kernel = snapshot(k.path());
    drop(k);

    let mut p = Problems::default();
    p.add(
        "kernel mount vs source tree (harness sanity)",
        diff(&expected, &kernel, &CompareOptions::kernel_copy_vs_source())
            .into_iter()
            .filter(|l| !l.starts_with("/kernel-extras"))
            .collect(),
    );
    let not_extra = |l: &String| !l.starts_with("/kernel-extras");
    p.add(
        "ubtrfs mount vs source tree",
        diff(&expected, &got, &CompareOptions::kernel_copy_vs_source())
            .into_iter()
            .filter(not_extra)
            .collect(),
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

// Test scenario: the kernel writes the tree with compress-force=zlib (regular and inline zlib
// extents); ubtrfs reads the same bytes, times and metadata the kernel reads.
#[test]
fn kernel_written_zlib() {
    compressed_case("zlib", 1);
}

// Test scenario: as the zlib case with compress-force=lzo (btrfs's segmented LZO format, with
// segment headers padded at sector ends).
#[test]
fn kernel_written_lzo() {
    compressed_case("lzo", 2);
}

// Test scenario: as the zlib case with compress-force=zstd.
#[test]
fn kernel_written_zstd() {
    compressed_case("zstd", 3);
}

// Test scenario: mkfs with -O ^no-holes (holes are explicit file extent items) and a mount with
// compress=zlib, not forced: incompressible data is stored raw and marks its inode NOCOMPRESS,
// so compressed and plain extents, explicit holes and prealloc mix in one image.
#[test]
fn kernel_written_zlib_not_forced_without_no_holes() {
    compressed_case_with("compress", "zlib", 1, Some("^no-holes"));
}
