//! Unit tests for every rule of extent_map.c / tree-log.c / the shrinker, as in the kernel's
//! fs/btrfs/tests/extent-map-tests.c. Every test opens with its scenario.

use std::sync::Arc;

use crate::*;

const K: u64 = 4096;
const ROOT: u64 = 5;

fn fs(policy: Policy) -> (Arc<FsExtentMaps>, Arc<BtrfsInode>) {
    let fs = FsExtentMaps::new(policy);
    let inode = fs.inode(ROOT, 257);
    (fs, inode)
}

/// A regular map of `[start, start+len)` at `disk`, generation 1.
fn reg(start: u64, len: u64, disk: u64) -> ExtentMap {
    ExtentMap::regular(start, len, disk, 1)
}

fn ranges(inode: &BtrfsInode) -> Vec<(u64, u64)> {
    inode
        .extent_maps()
        .iter()
        .map(|e| (e.start, e.len))
        .collect()
}

#[test]
fn sizes() {
    // Test scenario: the value type is no larger than the kernel's struct extent_map (104).
    let (v, t, n) = type_sizes();
    assert_eq!(v, 64);
    assert!(t <= 104, "treap node {t}");
    assert!(n <= 32, "identity node {n}");
}

#[test]
fn helpers() {
    // Test scenario: end saturates; block start/len for regular, compressed and special maps.
    let mut e = reg(0, 8 * K, 1 << 20);
    e.offset = K;
    e.disk_num_bytes = 16 * K;
    e.ram_bytes = 16 * K;
    assert_eq!(e.end(), 8 * K);
    assert_eq!(e.block_start(), (1 << 20) + K);
    assert_eq!(e.block_len(), 8 * K);
    let c = e.with_flags(flags::COMPRESS_ZSTD);
    assert!(c.is_compressed());
    assert_eq!(c.block_start(), 1 << 20);
    assert_eq!(c.block_len(), 16 * K);
    let h = ExtentMap::hole(u64::MAX - K, 2 * K, 1);
    assert_eq!(h.end(), u64::MAX);
    assert_eq!(h.block_start(), EXTENT_MAP_HOLE);
    assert_eq!(EXTENT_MAP_LAST_BYTE, u64::MAX - 3);
}

#[test]
fn policy_names_parse() {
    // Test scenario: policies round-trip through their names; unknown names are refused.
    for p in Policy::ALL {
        assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
    }
    assert_eq!("fixed-split".parse::<Policy>(), Ok(Policy::FixedSplit));
    assert!("fixed".parse::<Policy>().is_err());
    assert_eq!(Policy::default(), Policy::Kernel);
}

#[test]
fn lookup_strict_and_search_nearby() {
    // Test scenario: maps [0,4K) and [8K,12K); strict lookup misses the gap, search returns
    // the next map, or the last one before the offset past the end.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(8 * K, K * 4, 4 << 20), 8 * K, K)
        .unwrap();
    assert_eq!(inode.btrfs_lookup_extent_mapping(0, 1).unwrap().start, 0);
    assert!(inode.btrfs_lookup_extent_mapping(K, 4 * K).is_none());
    assert_eq!(
        inode.btrfs_lookup_extent_mapping(K, 8 * K).unwrap().start,
        8 * K
    );
    assert_eq!(
        inode.btrfs_search_extent_mapping(2 * K, K).unwrap().start,
        8 * K
    );
    assert_eq!(
        inode.btrfs_search_extent_mapping(100 * K, K).unwrap().start,
        8 * K
    );
    // Saturating end: a huge length intersects everything after start.
    assert_eq!(
        inode
            .btrfs_lookup_extent_mapping(4 * K, u64::MAX)
            .unwrap()
            .start,
        8 * K
    );
}

#[test]
fn evict_and_stats() {
    // Test scenario: maps of an fs-tree inode are counted; eviction drops them all, including
    // PINNED ones, and the counter returns to zero.
    let (fs, inode) = fs(Policy::Kernel);
    for i in 0..10 {
        inode
            .btrfs_add_extent_mapping(reg(i * 2 * K, K, (i + 1) << 20), i * 2 * K, K)
            .unwrap();
    }
    inode
        .btrfs_replace_extent_map_range(reg(100 * K, K, 99 << 20).with_flags(flags::PINNED), true)
        .unwrap();
    assert_eq!(fs.stats().cached_maps, 11);
    assert_eq!(fs.stats().cached_bytes, 11 * MAP_FOOTPRINT_BYTES);
    fs.evict_inode(ROOT, 257);
    assert_eq!(fs.stats().cached_maps, 0);
    assert!(inode.extent_maps().is_empty());
    assert!(inode.modified_extents().is_empty());
    assert_eq!(fs.stats().total_violations(), 0);
    // A non-fs-tree root is not counted.
    let other = fs.inode(1, 300);
    other
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    assert_eq!(fs.stats().cached_maps, 0);
}
