//! Reads racing writeback, fsync, commits and the extent-map shrinker (library level, no FUSE).
//!
//! One thread overwrites 4 KiB blocks of a fragmented file and fsyncs (writeback of the block:
//! extent reserved with a pinned map, data written with no lock held, ordered completion;
//! then the log), committing now and then so that overwritten extents are freed and their
//! space and checksums go; another thread reads pieces of the file and drops every cached
//! extent map after each read, so that reads look extents up in the trees. Every block holds
//! a self-describing pattern (its index and the version written), so a read must return, for
//! each block, some version that was written to that block: never an error (a checksum
//! failure is a bug here: nothing corrupts the image) and never another block's bytes or
//! bytes of a freed and reused extent.

mod common;

use common::TestDir;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use ubtrfs_fs::{FsInfo, MountOptions};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 512;

fn block_bytes(block: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    let mut x =
        block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    while v.len() < BLOCK as usize - 16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&block.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v
}

/// The block index and version a block claims, if its bytes are exactly that pattern.
fn check_block(data: &[u8]) -> Option<(u64, u64)> {
    let n = data.len();
    let block = u64::from_le_bytes(data[n - 16..n - 8].try_into().unwrap());
    let version = u64::from_le_bytes(data[n - 8..].try_into().unwrap());
    (block_bytes(block, version) == data).then_some((block, version))
}

#[test]
fn reads_during_writeback_fsync_commit_and_shrinker_see_written_data() {
    let t = TestDir::new("read-race");
    let img = t.join("img");
    ubtrfs_fs::mkfs::mkfs(
        &img,
        &ubtrfs_fs::mkfs::MkfsOptions {
            size: Some(512 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let fs = FsInfo::open(
        &img,
        MountOptions {
            readonly: false,
            commit_interval: 3600,
            ..MountOptions::default()
        },
    )
    .unwrap();
    let root = fs.mount_root;
    let dir = fs.root(root).unwrap().item.root_dirid;
    let (ino, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"f", 0o100644, 0, 0, 0).unwrap();
    // Version 0 of every block, written back one block at a time in a scattered order: one
    // extent per block.
    for i in 0..BLOCKS {
        let b = (i * 37) % BLOCKS;
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, ino, b * BLOCK, &block_bytes(b, 0))
            .unwrap();
        ubtrfs_fs::file_write::btrfs_writeback(&fs, root, ino).unwrap();
    }
    fs.commit().unwrap();

    let rounds: u64 = std::env::var("UBTRFS_READ_RACE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(800);
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            let emi = fs.ems.inode(root, ino);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (n * 61 % (BLOCKS - 32)) * BLOCK;
                let ii = ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap();
                match ubtrfs_fs::file::read(&fs, root, ino, &ii, &emi, off, 32 * BLOCK as u32) {
                    Ok(data) => {
                        for (k, chunk) in data.chunks(BLOCK as usize).enumerate() {
                            let want = off / BLOCK + k as u64;
                            match check_block(chunk) {
                                Some((b, _)) if b == want => {}
                                other => failures.lock().unwrap().push(format!(
                                    "block {want}: read {other:?} (not a version of this block)"
                                )),
                            }
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(format!("read at {off}: {e}")),
                }
                fs.ems.btrfs_free_cached_objects(u64::MAX);
                reads.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        });
        for r in 1..=rounds {
            let b = (r * 7919) % BLOCKS;
            ubtrfs_fs::file_write::btrfs_buffered_write(
                &fs,
                root,
                ino,
                b * BLOCK,
                &block_bytes(b, r),
            )
            .unwrap();
            ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, ino).unwrap();
            if r % 16 == 0 {
                fs.commit().unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{rounds} overwrite+fsync rounds, {} concurrent reads, {} bad",
        reads.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} bad reads, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // And the final content, from the trees.
    fs.sync().unwrap();
    let ii = ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap();
    let emi = fs.ems.inode(root, ino);
    let data =
        ubtrfs_fs::file::read(&fs, root, ino, &ii, &emi, 0, (BLOCKS * BLOCK) as u32).unwrap();
    for (k, chunk) in data.chunks(BLOCK as usize).enumerate() {
        assert_eq!(check_block(chunk).map(|(b, _)| b), Some(k as u64));
    }
}
