//! Large files and a full filesystem through a FUSE read-write mount (issue 4, "Tests"):
//! written, read back live, then checked by `btrfs check --readonly` and by the kernel's mount
//! of the image. Sizes are lean for CI (200 MiB dense, an 8 GiB sparse file);
//! `UBTRFS_LARGE_DENSE_MIB` and `UBTRFS_LARGE_SPARSE_GIB` make them larger.

mod common;

use common::mount::{LoopMount, Mount};
use common::{check_image, errno_of, mkfs_image, require_fuse_env, Mkfs, TestDir};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The bytes of a test file at `off`: a function of the position and a seed, so that any
/// piece can be checked without keeping the file in memory (and a misplaced block shows).
fn fill(seed: u64, off: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let p = (off + i as u64 * 8) / 8;
        let mut x = (p ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn write_pattern(f: &fs::File, seed: u64, off: u64, len: u64) {
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = off;
    while pos < off + len {
        let n = MIB.min(off + len - pos) as usize;
        fill(seed, pos, &mut buf[..n]);
        f.write_all_at(&buf[..n], pos).unwrap();
        pos += n as u64;
    }
}

/// Compare `[off, off+len)` of `path` with the pattern (`None` seed: zeros).
fn verify(path: &Path, seed: Option<u64>, off: u64, len: u64) {
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut got = vec![0u8; MIB as usize];
    let mut want = vec![0u8; MIB as usize];
    let mut pos = off;
    while pos < off + len {
        let n = MIB.min(off + len - pos) as usize;
        f.read_exact(&mut got[..n]).unwrap();
        match seed {
            Some(s) => fill(s, pos, &mut want[..n]),
            None => want[..n].fill(0),
        }
        if got[..n] != want[..n] {
            let i = (0..n).find(|&i| got[i] != want[i]).unwrap();
            panic!(
                "{}: first difference at byte {}",
                path.display(),
                pos + i as u64
            );
        }
        pos += n as u64;
    }
}

/// The sparse file's written pieces: (offset, length); everything else reads as zeros.
fn sparse_pieces(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, MIB),
        // Across the 4 GiB boundary (32-bit offset truncation shows here).
        (4 * GIB - 64 * 1024, 128 * 1024),
        (size / 2 + MIB + 12345, 3 * 4096 + 17),
        (size - MIB, MIB),
    ]
}

fn verify_all(root: &Path, dense: u64, sparse: u64) {
    verify(&root.join("dense"), Some(1), 0, dense);
    let sp = root.join("sparse");
    assert_eq!(fs::metadata(&sp).unwrap().len(), sparse);
    let mut pos = 0;
    for (off, len) in sparse_pieces(sparse) {
        // Zeros before the piece: check the edges, not gigabytes of holes.
        let gap = off - pos;
        if gap > 0 {
            verify(&sp, None, pos, gap.min(MIB));
            verify(&sp, None, off - gap.min(MIB), gap.min(MIB));
        }
        verify(&sp, Some(2), off, len);
        pos = off + len;
    }
    let md = fs::metadata(&sp).unwrap();
    assert!(
        md.blocks() * 512 < 16 * MIB,
        "the sparse file occupies {} bytes",
        md.blocks() * 512
    );
}

// Test scenario: a 200 MiB file written sequentially in 1 MiB writes and an 8 GiB sparse file
// with pieces at the start, across 4 GiB, unaligned in the middle and at the end are read back
// live and after fsync; after unmount btrfs check is clean, the kernel reads the same bytes
// (holes as zeros, the sparse file's blocks a few MiB), and a second ubtrfs mount too.
#[test]
fn large_dense_and_sparse_files() {
    require_fuse_env();
    let dense = env_u64("UBTRFS_LARGE_DENSE_MIB", 200) * MIB;
    let sparse = env_u64("UBTRFS_LARGE_SPARSE_GIB", 8) * GIB;
    let t = TestDir::new("large-files");
    let img = t.join("image");
    mkfs_image(
        &img,
        &Mkfs {
            size: (dense + GIB).max(GIB),
            ..Default::default()
        },
    );
    let mnt = t.mkdir("mnt");
    {
        let m = Mount::with_options(&img, &mnt, "rw");
        let f = fs::File::create(mnt.join("dense")).unwrap();
        write_pattern(&f, 1, 0, dense);
        let s = fs::File::create(mnt.join("sparse")).unwrap();
        s.set_len(sparse).unwrap();
        for (off, len) in sparse_pieces(sparse) {
            write_pattern(&s, 2, off, len);
        }
        verify_all(&mnt, dense, sparse);
        f.sync_all().unwrap();
        s.sync_all().unwrap();
        drop((f, s));
        verify_all(&mnt, dense, sparse);
        let exit = m.unmount();
        assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
    }
    check_image(&img);
    {
        let k = LoopMount::new(&img, &mnt, "ro");
        verify_all(&mnt, dense, sparse);
        k.unmount();
    }
    let m = Mount::with_options(&img, &mnt, "ro");
    verify_all(&mnt, dense, sparse);
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
}

// Test scenario: a 256 MiB image is filled through FUSE with 8 MiB files until a write fails
// with ENOSPC; fsync of what was accepted succeeds; unlink and truncate work on the full
// filesystem and a new file can then be written. After unmount btrfs check is clean and the
// kernel sees the same names and sizes.
#[test]
fn full_filesystem_through_fuse() {
    require_fuse_env();
    let t = TestDir::new("full-fuse");
    let img = t.join("image");
    mkfs_image(
        &img,
        &Mkfs {
            size: 256 * MIB,
            ..Default::default()
        },
    );
    let mnt = t.mkdir("mnt");
    let mut sizes: Vec<(String, u64)> = Vec::new();
    {
        let m = Mount::with_options(&img, &mnt, "rw");
        let buf = vec![0x5au8; MIB as usize];
        let mut full = false;
        'files: for i in 0..64 {
            let name = format!("f{i:02}");
            let mut f = fs::File::create(mnt.join(&name)).unwrap();
            let mut n = 0u64;
            for _ in 0..8 {
                match f.write_all(&buf) {
                    Ok(()) => n += MIB,
                    Err(e) => {
                        assert_eq!(errno_of(&e), libc::ENOSPC, "write error {e}");
                        // A write may be accepted in part before ENOSPC.
                        n = f.metadata().unwrap().len();
                        f.sync_all().unwrap();
                        sizes.push((name, n));
                        full = true;
                        break 'files;
                    }
                }
            }
            f.sync_all().unwrap();
            sizes.push((name, n));
        }
        assert!(full, "256 MiB never filled up");
        // Give space back on the full filesystem.
        fs::remove_file(mnt.join(&sizes[0].0)).unwrap();
        sizes.remove(0);
        let cut = 3 * MIB + 5;
        fs::OpenOptions::new()
            .write(true)
            .open(mnt.join(&sizes[0].0))
            .unwrap()
            .set_len(cut)
            .unwrap();
        sizes[0].1 = cut;
        let mut f = fs::File::create(mnt.join("after")).unwrap();
        for _ in 0..4 {
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        sizes.push(("after".into(), 4 * MIB));
        let exit = m.unmount();
        assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
    }
    check_image(&img);
    let k = LoopMount::new(&img, &mnt, "ro");
    let mut names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = sizes.iter().map(|s| s.0.clone()).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, size) in &sizes {
        assert_eq!(
            fs::metadata(mnt.join(name)).unwrap().len(),
            *size,
            "kernel: size of {name}"
        );
    }
    k.unmount();
}
