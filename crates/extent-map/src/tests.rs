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
    assert!(t <= 104, "leaf slot {t}");
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

fn info(inode: &BtrfsInode, start: u64) -> MapInfo {
    inode.map_info(start).expect("map present")
}

// ---------------------------------------------------------------------------------------------
// Merging (try_merge_map)

#[test]
fn merge_contiguous_regular() {
    // Test scenario: [0,4K)@1M gen 3 then [4K,8K)@1M+4K gen 7 (physically contiguous, different
    // extents) merge into one MERGED map with generation 7 and recomputed on-disk fields.
    let (fs, inode) = fs(Policy::Kernel);
    let mut a = reg(0, K, 1 << 20);
    a.generation = 3;
    let mut b = reg(K, K, (1 << 20) + K);
    b.generation = 7;
    inode.btrfs_add_extent_mapping(a, 0, K).unwrap();
    let got = inode.btrfs_add_extent_mapping(b, K, K).unwrap();
    assert_eq!(got.start, 0);
    assert_eq!(got.len, 2 * K);
    assert_eq!(got.generation, 7);
    assert!(got.has(flags::MERGED));
    assert_eq!(got.disk_bytenr, 1 << 20);
    assert_eq!(got.disk_num_bytes, 2 * K);
    assert_eq!(got.ram_bytes, 2 * K);
    assert_eq!(got.offset, 0);
    assert_eq!(ranges(&inode), vec![(0, 2 * K)]);
    assert_eq!(fs.stats().cached_maps, 1);
    assert_eq!(info(&inode, 0).refs, 1);
}

#[test]
fn merge_same_extent_keeps_offset() {
    // Test scenario: two maps into the same 16K extent (offsets 4K and 8K) merge; the merged
    // map keeps the extent and offset 4K.
    let (_fs, inode) = fs(Policy::Kernel);
    let mk = |start, off| ExtentMap {
        start,
        len: K,
        disk_bytenr: 1 << 20,
        disk_num_bytes: 4 * K,
        offset: off,
        ram_bytes: 4 * K,
        generation: 1,
        flags: 0,
    };
    inode.btrfs_add_extent_mapping(mk(0, K), 0, K).unwrap();
    let m = inode.btrfs_add_extent_mapping(mk(K, 2 * K), K, K).unwrap();
    assert_eq!((m.start, m.len, m.offset), (0, 2 * K, K));
    assert_eq!((m.disk_bytenr, m.disk_num_bytes), (1 << 20, 4 * K));
    assert_eq!(m.block_start(), (1 << 20) + K);
}

#[test]
fn merge_with_both_neighbours() {
    // Test scenario: [0,4K) and [8K,12K) cached, [4K,8K) fills the gap: absorbs prev then next.
    let (fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(2 * K, K, (1 << 20) + 2 * K), 2 * K, K)
        .unwrap();
    let m = inode
        .btrfs_add_extent_mapping(reg(K, K, (1 << 20) + K), K, K)
        .unwrap();
    assert_eq!((m.start, m.len), (0, 3 * K));
    assert_eq!(ranges(&inode), vec![(0, 3 * K)]);
    assert_eq!(fs.stats().cached_maps, 1);
}

#[test]
fn no_merge_when_not_contiguous_on_disk() {
    // Test scenario: file-adjacent maps whose disk blocks are not adjacent never merge.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(K, K, 2 << 20), K, K)
        .unwrap();
    assert_eq!(ranges(&inode), vec![(0, K), (K, K)]);
}

#[test]
fn no_merge_when_not_adjacent_in_file() {
    // Test scenario: a file gap between two maps prevents merging even if disk-adjacent.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(2 * K, K, (1 << 20) + K), 2 * K, K)
        .unwrap();
    assert_eq!(ranges(&inode), vec![(0, K), (2 * K, K)]);
}

#[test]
fn merge_rules_per_flag() {
    // Test scenario: for each flag, two contiguous maps carrying it (or only one carrying it)
    // merge or not: PINNED and compression never merge; PREALLOC merges with PREALLOC only;
    // MERGED is ignored in the comparison.
    let cases: [(u32, u32, bool); 8] = [
        (0, 0, true),
        (flags::PINNED, flags::PINNED, false),
        (flags::COMPRESS_ZLIB, flags::COMPRESS_ZLIB, false),
        (flags::COMPRESS_LZO, flags::COMPRESS_LZO, false),
        (flags::COMPRESS_ZSTD, flags::COMPRESS_ZSTD, false),
        (flags::PREALLOC, flags::PREALLOC, true),
        (flags::PREALLOC, 0, false),
        (flags::MERGED, 0, true),
    ];
    for (fa, fb, merges) in cases {
        let (_fs, inode) = fs(Policy::Kernel);
        inode
            .btrfs_add_extent_mapping(reg(0, K, 1 << 20).with_flags(fa), 0, K)
            .unwrap();
        inode
            .btrfs_add_extent_mapping(reg(K, K, (1 << 20) + K).with_flags(fb), K, K)
            .unwrap();
        let n = inode.extent_maps().len();
        assert_eq!(n == 1, merges, "flags {fa:#x} + {fb:#x}");
    }
}

#[test]
fn merge_holes_and_inline() {
    // Test scenario: adjacent holes merge (same special address); a hole next to an inline map
    // or a regular map does not.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(ExtentMap::hole(K, K, 1), K, K)
        .unwrap();
    let m = inode
        .btrfs_add_extent_mapping(ExtentMap::hole(2 * K, K, 2), 2 * K, K)
        .unwrap();
    assert_eq!((m.start, m.len, m.generation), (K, 2 * K, 2));
    assert_eq!(m.disk_bytenr, EXTENT_MAP_HOLE);
    assert_eq!(m.ram_bytes, K, "special maps keep their on-disk fields");
    let inline = ExtentMap {
        start: 0,
        len: K,
        disk_bytenr: EXTENT_MAP_INLINE,
        disk_num_bytes: 0,
        offset: 0,
        ram_bytes: 100,
        generation: 1,
        flags: 0,
    };
    inode.btrfs_add_extent_mapping(inline, 0, K).unwrap();
    inode
        .btrfs_add_extent_mapping(reg(3 * K, K, 1 << 20), 3 * K, K)
        .unwrap();
    assert_eq!(ranges(&inode), vec![(0, K), (K, 2 * K), (3 * K, K)]);
    // Inline maps must start at 0.
    let bad = ExtentMap { start: K, ..inline };
    assert!(matches!(
        inode.btrfs_add_extent_mapping(bad, K, K),
        Err(EmError::Invalid(_))
    ));
}

#[test]
fn no_merge_with_listed_map() {
    // Test scenario: a modified (listed) map never merges, neither as the new map nor as a
    // neighbour; after fsync logs it, unlisted, adding a neighbour merges.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_replace_extent_map_range(reg(0, K, 1 << 20), true)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(K, K, (1 << 20) + K), K, K)
        .unwrap();
    assert_eq!(ranges(&inode), vec![(0, K), (K, K)]);
    assert!(info(&inode, 0).on_modified_list);
    inode
        .btrfs_log_changed_extents::<()>(1, u64::MAX, |_| Ok(()))
        .unwrap();
    // clear_em_logging merged the logged map with its unlisted neighbour.
    assert_eq!(ranges(&inode), vec![(0, 2 * K)]);
    assert!(inode.modified_extents().is_empty());
}

#[test]
fn no_merge_when_refs_above_two() {
    // Test scenario: fsync holds a reference on a PINNED map it is logging; ordered completion
    // unpins it meanwhile (refs = tree + fsync + lookup = 3): no merge. When fsync clears
    // LOGGING (refs 2) the merge happens.
    //
    //   fsync                          ordered completion
    //   collect [4K,8K) (LOGGING)
    //   log [4K,8K) ...
    //                                  unpin [4K,8K): no merge (refs 3, LOGGING)
    //   clear LOGGING -> merge
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(K, K, (1 << 20) + K).with_flags(flags::PINNED), true)
        .unwrap();
    let mut pass = inode.btrfs_log_changed_extents_begin(1, u64::MAX);
    let em = pass.next_extent().unwrap();
    assert_eq!(em.start, K);
    assert!(em.has(flags::LOGGING | flags::PINNED));
    assert_eq!(info(&inode, K).refs, 2);
    inode.btrfs_unpin_extent_cache(K, K, 1).unwrap();
    assert_eq!(ranges(&inode), vec![(0, K), (K, K)]);
    assert!(pass.next_extent().is_none());
    pass.finish().unwrap();
    assert_eq!(ranges(&inode), vec![(0, 2 * K)]);
}

#[test]
fn merge_only_one_step_each_side() {
    // Test scenario: merging absorbs at most one previous and one next map (no cascade): the
    // neighbours' own mergeable neighbours stay separate when they were blocked before.
    let (_fs, inode) = fs(Policy::Kernel);
    // Three pinned, contiguous maps; unpinning the middle one merges with nothing (neighbours
    // pinned), then unpinning the outer ones merges step by step.
    for i in 0..3 {
        inode
            .btrfs_replace_extent_map_range(
                reg(i * K, K, (1 << 20) + i * K).with_flags(flags::PINNED),
                false,
            )
            .unwrap();
    }
    inode.btrfs_unpin_extent_cache(K, K, 2).unwrap();
    assert_eq!(ranges(&inode), vec![(0, K), (K, K), (2 * K, K)]);
    inode.btrfs_unpin_extent_cache(0, K, 2).unwrap();
    assert_eq!(ranges(&inode), vec![(0, 2 * K), (2 * K, K)]);
    inode.btrfs_unpin_extent_cache(2 * K, K, 2).unwrap();
    assert_eq!(ranges(&inode), vec![(0, 3 * K)]);
}

// ---------------------------------------------------------------------------------------------
// btrfs_add_extent_mapping EEXIST resolution

#[test]
fn add_eexist_start_inside_existing() {
    // Test scenario: a reader builds [0,16K) while [4K,8K) is cached and asks for 4K: the
    // existing map serves 4K and is returned; nothing is inserted.
    let (fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(K, K, 5 << 20), K, K)
        .unwrap();
    let got = inode
        .btrfs_add_extent_mapping(reg(0, 4 * K, 1 << 20), K, K)
        .unwrap();
    assert_eq!(got, reg(K, K, 5 << 20));
    assert_eq!(ranges(&inode), vec![(K, K)]);
    assert_eq!(fs.stats().cached_maps, 1);
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn add_eexist_trims_to_gap() {
    // Test scenario: [4K,8K) and [12K,16K) cached; a reader builds [0,16K)@1M and asks for 8K:
    // the new map is trimmed to the gap [8K,12K) and its offset advanced by 8K.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(K, K, 5 << 20), K, K)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(3 * K, K, 7 << 20), 3 * K, K)
        .unwrap();
    let mut em = reg(0, 4 * K, 1 << 20);
    em.disk_num_bytes = 4 * K;
    em.ram_bytes = 4 * K;
    let got = inode.btrfs_add_extent_mapping(em, 2 * K, K).unwrap();
    assert_eq!((got.start, got.len, got.offset), (2 * K, K, 2 * K));
    assert_eq!(got.disk_bytenr, 1 << 20);
    assert_eq!(ranges(&inode), vec![(K, K), (2 * K, K), (3 * K, K)]);
}

#[test]
fn add_eexist_existing_after_start() {
    // Test scenario: [8K,12K) cached; a reader builds [0,16K) and asks for [0,4K): the search
    // returns the next map (existing starts after start), so the map is trimmed to [0,8K).
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(2 * K, K, 5 << 20), 2 * K, K)
        .unwrap();
    let got = inode
        .btrfs_add_extent_mapping(ExtentMap::hole(0, 4 * K, 1), 0, K)
        .unwrap();
    assert_eq!((got.start, got.len, got.offset), (0, 2 * K, 0));
    assert_eq!(ranges(&inode), vec![(0, 2 * K), (2 * K, K)]);
}

#[test]
fn add_invalid() {
    // Test scenario: zero-length maps are refused with EINVAL, nothing changes.
    let (_fs, inode) = fs(Policy::Kernel);
    assert!(matches!(
        inode.btrfs_add_extent_mapping(reg(0, 0, 1 << 20), 0, K),
        Err(EmError::Invalid(_))
    ));
    assert!(inode.extent_maps().is_empty());
}

// ---------------------------------------------------------------------------------------------
// btrfs_drop_extent_map_range

/// One unlisted 16K map at [0,16K) into a 16K extent at 1M, and one modified (listed) 16K map
/// at [32K,48K) at 2M.
fn two_maps(policy: Policy) -> (Arc<FsExtentMaps>, Arc<BtrfsInode>) {
    let (fs, inode) = fs(policy);
    inode
        .btrfs_add_extent_mapping(reg(0, 4 * K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(8 * K, 4 * K, 2 << 20), true)
        .unwrap();
    (fs, inode)
}

#[test]
fn drop_range_whole() {
    // Test scenario: dropping exactly a map removes it and unlinks it from the modified list.
    let (fs, inode) = two_maps(Policy::Kernel);
    inode.btrfs_drop_extent_map_range(8 * K, 12 * K - 1, false);
    assert_eq!(ranges(&inode), vec![(0, 4 * K)]);
    assert!(inode.modified_extents().is_empty());
    inode.btrfs_drop_extent_map_range(0, 4 * K - 1, false);
    assert!(inode.extent_maps().is_empty());
    assert_eq!(fs.stats().cached_maps, 0);
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn drop_range_head_piece() {
    // Test scenario: dropping [8K,16K) of [0,16K) leaves the head [0,8K) with the same extent
    // and offset.
    let (_fs, inode) = two_maps(Policy::Kernel);
    inode.btrfs_drop_extent_map_range(2 * K, 4 * K - 1, false);
    let m = inode.btrfs_lookup_extent_mapping(0, K).unwrap();
    assert_eq!((m.start, m.len, m.offset), (0, 2 * K, 0));
    assert_eq!(
        (m.disk_bytenr, m.disk_num_bytes, m.ram_bytes),
        (1 << 20, 4 * K, 4 * K)
    );
    assert!(inode.btrfs_lookup_extent_mapping(2 * K, 2 * K).is_none());
    assert!(!info(&inode, 0).on_modified_list);
}

#[test]
fn drop_range_tail_piece() {
    // Test scenario: dropping [32K,40K) of the modified map [32K,48K) leaves the tail
    // [40K,48K), offset 8K, still on the modified list (inherits membership).
    let (_fs, inode) = two_maps(Policy::Kernel);
    inode.btrfs_drop_extent_map_range(8 * K, 10 * K - 1, false);
    let m = inode.btrfs_lookup_extent_mapping(10 * K, K).unwrap();
    assert_eq!(
        (m.start, m.len, m.offset, m.disk_bytenr),
        (10 * K, 2 * K, 2 * K, 2 << 20)
    );
    assert_eq!(m.block_start(), (2 << 20) + 2 * K);
    assert!(info(&inode, 10 * K).on_modified_list);
    assert_eq!(inode.modified_extents().len(), 1);
}

#[test]
fn drop_range_both_pieces() {
    // Test scenario: dropping the middle [4K,8K) of [0,16K) leaves head [0,4K) and tail
    // [8K,16K) (offset 8K); hole maps split the same way with ram_bytes = piece length.
    let (fs0, inode) = two_maps(Policy::Kernel);
    inode.btrfs_drop_extent_map_range(K, 2 * K - 1, false);
    assert_eq!(ranges(&inode), vec![(0, K), (2 * K, 2 * K), (8 * K, 4 * K)]);
    assert_eq!(
        inode.btrfs_lookup_extent_mapping(2 * K, 1).unwrap().offset,
        2 * K
    );
    assert_eq!(fs0.stats().cached_maps, 3);

    let (_fs, h) = fs(Policy::Kernel);
    h.btrfs_add_extent_mapping(ExtentMap::hole(0, 4 * K, 1), 0, K)
        .unwrap();
    h.btrfs_drop_extent_map_range(K, 2 * K - 1, false);
    let maps = h.extent_maps();
    assert_eq!(maps.len(), 2);
    assert_eq!((maps[0].len, maps[0].ram_bytes, maps[0].offset), (K, K, 0));
    assert_eq!(
        (maps[1].start, maps[1].ram_bytes, maps[1].disk_num_bytes),
        (2 * K, 2 * K, 0)
    );
    assert_eq!(maps[1].disk_bytenr, EXTENT_MAP_HOLE);
}

#[test]
fn drop_range_modified_pieces_stay_listed() {
    // Test scenario: splitting a modified map in the middle puts both pieces on the modified
    // list and takes the original off.
    let (_fs, inode) = two_maps(Policy::Kernel);
    inode.btrfs_drop_extent_map_range(9 * K, 10 * K - 1, false);
    let mods = inode.modified_extents();
    let mut starts: Vec<u64> = mods.iter().map(|m| m.start).collect();
    starts.sort();
    assert_eq!(starts, vec![8 * K, 10 * K]);
    assert!(info(&inode, 8 * K).on_modified_list);
    assert!(info(&inode, 10 * K).on_modified_list);
    assert_eq!(info(&inode, 8 * K).refs, 1);
}

#[test]
fn drop_range_across_maps_and_to_eof() {
    // Test scenario: [6K, EOF) with skip_pinned=false splits the first map and removes the
    // second (the end == u64::MAX path that is not drop-all).
    let (fs, inode) = two_maps(Policy::Kernel);
    inode.btrfs_drop_extent_map_range(2 * K, u64::MAX, false);
    assert_eq!(ranges(&inode), vec![(0, 2 * K)]);
    assert!(inode.modified_extents().is_empty());
    assert_eq!(fs.stats().cached_maps, 1);
    // [0, EOF) without skip_pinned drops everything (drop_all_extent_maps_fast).
    inode
        .btrfs_replace_extent_map_range(reg(4 * K, K, 9 << 20).with_flags(flags::PINNED), true)
        .unwrap();
    inode.btrfs_drop_extent_map_range(0, u64::MAX, false);
    assert!(inode.extent_maps().is_empty());
    assert_eq!(fs.stats().cached_maps, 0);
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn drop_range_skip_pinned() {
    // Test scenario: with skip_pinned, a PINNED map in the range is left intact while unpinned
    // maps around it are dropped; without it, the pinned map loses PINNED and is split.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(K, 2 * K, 3 << 20).with_flags(flags::PINNED), true)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(3 * K, K, 5 << 20), 3 * K, K)
        .unwrap();
    inode.btrfs_drop_extent_map_range(0, 4 * K - 1, true);
    assert_eq!(ranges(&inode), vec![(K, 2 * K)]);
    assert!(info(&inode, K).em.has(flags::PINNED));

    inode.btrfs_drop_extent_map_range(2 * K, 3 * K - 1, false);
    let head = info(&inode, K);
    assert_eq!(head.em.len, K);
    // The kernel (every policy) saves the flags before clearing PINNED: the piece is pinned.
    assert!(head.em.has(flags::PINNED));
    assert!(head.on_modified_list);
}

#[test]
fn drop_range_spare_alloc_failure() {
    // Test scenario: when the two spare maps cannot be allocated, a map sticking out of the
    // range is removed whole; if it was modified, the inode is marked NEEDS_FULL_SYNC.
    let (fs, inode) = two_maps(Policy::Kernel);
    fs.inject_spare_alloc_failures(2);
    inode.btrfs_drop_extent_map_range(K, 2 * K - 1, false);
    assert_eq!(ranges(&inode), vec![(8 * K, 4 * K)]);
    assert!(!inode.needs_full_sync(), "unlisted map: no full sync");
    fs.inject_spare_alloc_failures(2);
    inode.btrfs_drop_extent_map_range(9 * K, 10 * K - 1, false);
    assert!(inode.extent_maps().is_empty());
    assert!(inode.needs_full_sync());
    assert!(inode.modified_extents().is_empty());
    assert_eq!(fs.stats().cached_maps, 0);
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn drop_range_one_spare_only() {
    // Test scenario: with only one spare map, a middle drop keeps the head piece and then
    // finds no spare for the tail: the original is already out of the tree (replaced by the
    // head), so the tail range is simply lost, with no full-sync flag (as the kernel).
    let (fs, inode) = two_maps(Policy::Kernel);
    fs.inject_spare_alloc_failures(1);
    inode.btrfs_drop_extent_map_range(9 * K, 10 * K - 1, false);
    assert_eq!(ranges(&inode), vec![(0, 4 * K), (8 * K, K)]);
    assert!(!inode.needs_full_sync());
    assert_eq!(fs.stats().total_violations(), 0);
}

// ---------------------------------------------------------------------------------------------
// replace, split, unpin

#[test]
fn replace_range_modified_and_not() {
    // Test scenario: replacing a range drops what overlaps (splitting) and inserts the new map,
    // on the modified list only when asked.
    let (fs, inode) = two_maps(Policy::Kernel);
    inode
        .btrfs_replace_extent_map_range(reg(2 * K, 8 * K, 9 << 20), true)
        .unwrap();
    assert_eq!(
        ranges(&inode),
        vec![(0, 2 * K), (2 * K, 8 * K), (10 * K, 2 * K)]
    );
    let mods: Vec<u64> = inode.modified_extents().iter().map(|m| m.start).collect();
    assert_eq!(mods, vec![2 * K, 10 * K], "head of the list is the newest");
    inode
        .btrfs_replace_extent_map_range(reg(20 * K, K, 20 << 20), false)
        .unwrap();
    assert!(!info(&inode, 20 * K).on_modified_list);
    assert_eq!(fs.stats().cached_maps, 4);
    assert_eq!(info(&inode, 2 * K).refs, 1);
}

#[test]
fn split_extent_map_for_ordered_extent() {
    // Test scenario: a pinned, modified 16K map at 1M is split at 4K for a DIO ordered-extent
    // split: [0,4K) at the new logical address and [4K,16K) at 1M+4K, both pinned, modified,
    // offset 0.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_replace_extent_map_range(reg(0, 4 * K, 1 << 20).with_flags(flags::PINNED), true)
        .unwrap();
    inode.btrfs_split_extent_map(0, 4 * K, K, 7 << 20).unwrap();
    let a = info(&inode, 0);
    let b = info(&inode, K);
    assert_eq!(
        (a.em.len, a.em.disk_bytenr, a.em.disk_num_bytes, a.em.offset),
        (K, 7 << 20, K, 0)
    );
    assert_eq!(
        (b.em.len, b.em.disk_bytenr, b.em.ram_bytes),
        (3 * K, (1 << 20) + K, 3 * K)
    );
    assert!(a.em.has(flags::PINNED) && b.em.has(flags::PINNED));
    assert!(a.on_modified_list && b.on_modified_list);
    assert_eq!(inode.modified_extents().len(), 2);
    // Preconditions.
    assert!(matches!(
        inode.btrfs_split_extent_map(0, K, 0, 1),
        Err(EmError::Invalid(_))
    ));
    assert!(matches!(
        inode.btrfs_split_extent_map(100 * K, 2 * K, K, 1),
        Err(EmError::Io { .. })
    ));
}

#[test]
fn unpin_errors_and_merge() {
    // Test scenario: unpin of a missing range is ENOENT, of a map starting elsewhere EUCLEAN;
    // a successful unpin sets the generation and clears PINNED, merging only when unlisted.
    let (fs, inode) = fs(Policy::Kernel);
    assert!(matches!(
        inode.btrfs_unpin_extent_cache(0, K, 5),
        Err(EmError::NotFound { .. })
    ));
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(
            reg(K, 2 * K, (1 << 20) + K).with_flags(flags::PINNED),
            true,
        )
        .unwrap();
    assert!(matches!(
        inode.btrfs_unpin_extent_cache(2 * K, K, 5),
        Err(EmError::Unclean { .. })
    ));
    inode.btrfs_unpin_extent_cache(K, 2 * K, 5).unwrap();
    let m = info(&inode, K);
    assert_eq!(m.em.generation, 5);
    assert!(!m.em.has(flags::PINNED));
    assert_eq!(inode.extent_maps().len(), 2, "listed: no merge");
    // Not listed: unpin merges.
    inode.btrfs_log_inode_clear_modified_extents();
    inode
        .btrfs_replace_extent_map_range(
            reg(3 * K, K, (1 << 20) + 3 * K).with_flags(flags::PINNED),
            false,
        )
        .unwrap();
    inode.btrfs_unpin_extent_cache(3 * K, K, 6).unwrap();
    let m = inode.btrfs_lookup_extent_mapping(3 * K, 1).unwrap();
    assert_eq!((m.start, m.len, m.generation), (K, 3 * K, 6));
    assert_eq!(fs.stats().total_violations(), 0);
}

// ---------------------------------------------------------------------------------------------
// Modified list membership

#[test]
fn modified_list_membership() {
    // Test scenario: who puts a map on the modified list (replace with modified, split pieces
    // of a listed map, split_extent_map) and who takes it off (remove, replace, fast fsync,
    // full-sync clearing, shrinker, eviction).
    let (fs, inode) = fs(Policy::Kernel);
    // Reads never list.
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    assert!(inode.modified_extents().is_empty());
    // Writes list.
    inode
        .btrfs_replace_extent_map_range(reg(4 * K, 2 * K, 2 << 20), true)
        .unwrap();
    assert_eq!(inode.modified_extents().len(), 1);
    // Replacing a listed map takes it off; the new one is listed.
    inode
        .btrfs_replace_extent_map_range(reg(4 * K, 2 * K, 3 << 20), true)
        .unwrap();
    let mods = inode.modified_extents();
    assert_eq!(mods.len(), 1);
    assert_eq!(mods[0].disk_bytenr, 3 << 20);
    // Full-sync logging empties the list.
    inode.btrfs_log_inode_clear_modified_extents();
    assert!(inode.modified_extents().is_empty());
    assert!(!info(&inode, 4 * K).on_modified_list);
    // Fast fsync takes everything off, logged or skipped (older generation).
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(8 * K, K, 4 << 20, 1), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(10 * K, K, 5 << 20, 9), true)
        .unwrap();
    let mut logged = vec![];
    inode
        .btrfs_log_changed_extents::<()>(5, u64::MAX, |e| {
            logged.push(e.start);
            Ok(())
        })
        .unwrap();
    assert_eq!(logged, vec![10 * K]);
    assert!(inode.modified_extents().is_empty());
    // The shrinker takes listed maps off (and marks full sync for the running generation).
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(12 * K, K, 6 << 20, 9), true)
        .unwrap();
    fs.set_generation(9);
    assert!(fs.btrfs_free_extent_maps(1000));
    assert!(inode.extent_maps().is_empty());
    assert!(inode.modified_extents().is_empty());
    assert!(inode.needs_full_sync());
    // Eviction too.
    let i2 = fs.inode(ROOT, 300);
    i2.btrfs_replace_extent_map_range(reg(0, K, 1 << 20), true)
        .unwrap();
    fs.evict_inode(ROOT, 300);
    assert!(i2.modified_extents().is_empty());
    assert_eq!(fs.stats().total_violations(), 0);
}

// ---------------------------------------------------------------------------------------------
// Fast fsync logging (btrfs_log_changed_extents)

#[test]
fn logging_order_flags_and_skips() {
    // Test scenario: modified maps are handed out sorted by start, with LOGGING set while
    // being logged and cleared afterwards; older generations and PREALLOC maps at/after i_size
    // are skipped; each logged map holds fsync's reference while handed out.
    let (fs, inode) = fs(Policy::Kernel);
    let w = |s, gen| ExtentMap::regular(s, K, (1 << 20) + s, gen);
    inode
        .btrfs_replace_extent_map_range(w(8 * K, 5), true)
        .unwrap();
    inode.btrfs_replace_extent_map_range(w(0, 5), true).unwrap();
    inode
        .btrfs_replace_extent_map_range(w(4 * K, 4), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(w(16 * K, 5).with_flags(flags::PREALLOC), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(w(12 * K, 5).with_flags(flags::PREALLOC), true)
        .unwrap();
    let mut pass = inode.btrfs_log_changed_extents_begin(5, 16 * K);
    // Everything collected is LOGGING right away.
    assert!(info(&inode, 0).em.has(flags::LOGGING));
    assert!(info(&inode, 0).on_logging_list);
    assert!(
        !info(&inode, 4 * K).em.has(flags::LOGGING),
        "older generation skipped"
    );
    assert!(
        !info(&inode, 16 * K).em.has(flags::LOGGING),
        "prealloc past EOF skipped"
    );
    let mut got = vec![];
    while let Some(e) = pass.next_extent() {
        assert!(e.has(flags::LOGGING));
        assert_eq!(info(&inode, e.start).refs, 2, "tree + fsync");
        assert!(
            !info(&inode, e.start).on_logging_list,
            "unlinked before logging"
        );
        got.push(e.start);
    }
    pass.finish().unwrap();
    assert_eq!(got, vec![0, 8 * K, 12 * K]);
    for s in [0, 8 * K, 12 * K] {
        let i = info(&inode, s);
        assert!(!i.em.has(flags::LOGGING));
        assert_eq!(i.refs, 1);
    }
    assert!(inode.modified_extents().is_empty());
    assert_eq!(fs.stats().maps_logged, 3);
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn logging_clear_merges() {
    // Test scenario: after logging, clearing LOGGING merges the map with unlisted neighbours
    // (btrfs_clear_em_logging's try_merge_map).
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(K, K, (1 << 20) + K), true)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(2 * K, K, (1 << 20) + 2 * K), 2 * K, K)
        .unwrap();
    assert_eq!(inode.extent_maps().len(), 3);
    inode
        .btrfs_log_changed_extents::<()>(1, u64::MAX, |_| Ok(()))
        .unwrap();
    assert_eq!(ranges(&inode), vec![(0, 3 * K)]);
}

#[test]
fn logging_error_path() {
    // Test scenario: log_one_extent fails on the first map: it and every remaining map are
    // cleared and released without being handed out.
    let (fs, inode) = fs(Policy::Kernel);
    for i in 0..4 {
        inode
            .btrfs_replace_extent_map_range(reg(i * 2 * K, K, (i + 1) << 20), true)
            .unwrap();
    }
    let mut calls = 0;
    let r = inode.btrfs_log_changed_extents(1, u64::MAX, |_| {
        calls += 1;
        Err("EIO")
    });
    assert_eq!(r, Err(LogError::LogOneExtent("EIO")));
    assert_eq!(calls, 1);
    for i in 0..4 {
        let m = info(&inode, i * 2 * K);
        assert!(!m.em.has(flags::LOGGING));
        assert_eq!(m.refs, 1);
        assert!(!m.on_logging_list && !m.on_modified_list);
    }
    assert_eq!(fs.stats().total_violations(), 0);
    // Dropping a pass early behaves the same.
    inode
        .btrfs_replace_extent_map_range(reg(20 * K, K, 20 << 20), true)
        .unwrap();
    drop(inode.btrfs_log_changed_extents_begin(1, u64::MAX));
    assert!(!info(&inode, 20 * K).em.has(flags::LOGGING));
    assert_eq!(info(&inode, 20 * K).refs, 1);
}

/// An inode with 8 modified maps and 100 retired versions waiting to be freed.
fn with_reclaimable_versions() -> (Arc<FsExtentMaps>, Arc<BtrfsInode>) {
    let (fs, inode) = fs(Policy::FixedSplit);
    for i in 0..8 {
        inode
            .btrfs_replace_extent_map_range(reg(i * K, K, (1 << 20) + i * K), true)
            .unwrap();
    }
    for _ in 0..100 {
        inode.tree.queue_reclaimable();
    }
    (fs, inode)
}

#[test]
fn logging_pass_leaves_reclaim_to_writers() {
    // Test scenario: versions retired by earlier writes are waiting to be freed when an fsync
    // starts: its logging pass (collection, every relock, the end) frees none of them; the
    // inode's next writer frees them all. (The epoch collector may queue a few more versions of
    // this inode's earlier writes at any pin, hence the inequalities.)
    let (_fs, inode) = with_reclaimable_versions();
    let mut n = 0;
    inode
        .btrfs_log_changed_extents::<()>(1, u64::MAX, |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 8);
    assert_eq!(ranges(&inode), vec![(0, 8 * K)]);
    assert!(inode.tree.reclaimable() >= 100);
    inode
        .btrfs_replace_extent_map_range(reg(16 * K, K, 1 << 30), true)
        .unwrap();
    assert!(inode.tree.reclaimable() < 50);
}

#[test]
fn shrinker_reclaims_only_inodes_it_scans() {
    // Test scenario: versions retired by an inode's writes wait to be freed. A shrinker that
    // finds the inode busy (an fsync holds its mmap lock) frees none of them: that memory is
    // left to the inode's own threads. Once the inode is free, the shrinker scans it and frees
    // them after letting go of its locks.
    let (fs, inode) = with_reclaimable_versions();
    {
        let _mmap = inode.mmap_lock().write();
        fs.btrfs_free_extent_maps(1 << 20);
        assert_eq!(fs.stats().shrinker_skipped_inode_busy, 1);
        assert!(inode.tree.reclaimable() >= 100);
        assert_eq!(inode.nr_extent_maps(), 8);
    }
    fs.btrfs_free_extent_maps(1 << 20);
    assert_eq!(inode.nr_extent_maps(), 0);
    assert!(inode.tree.reclaimable() < 50);
}

#[test]
fn logging_efbig() {
    // Test scenario: more than 32768 units on the modified list: -EFBIG (full commit); the
    // collected maps are cleared and released, the rest stays detached (listed, unmergeable).
    let (fs, inode) = fs(Policy::Kernel);
    let n = MAX_LOGGED_UNITS as u64 / 2 + 10;
    for i in 0..n {
        inode
            .btrfs_replace_extent_map_range(reg(i * K, K, (1 << 30) + i * 2 * K), true)
            .unwrap();
    }
    let r = inode.btrfs_log_changed_extents::<()>(1, u64::MAX, |_| panic!("nothing logged"));
    assert_eq!(r, Err(LogError::TooManyModified));
    assert!(inode.modified_extents().is_empty());
    let maps = inode.extent_maps();
    assert!(maps.iter().all(|m| !m.has(flags::LOGGING)));
    // Newest entries were walked first and collected; the oldest ones are left detached.
    let detached = (0..n)
        .filter(|i| info(&inode, i * K).on_modified_list)
        .count();
    assert!(detached > 0);
    assert_eq!(fs.stats().total_violations(), 0);
}

// ---------------------------------------------------------------------------------------------
// Shrinker

#[test]
fn shrinker_skips_pinned_counts_and_sets_full_sync() {
    // Test scenario: the shrinker visits every map (counted as scanned), skips PINNED ones,
    // removes the rest, and sets NEEDS_FULL_SYNC only for listed maps of the running
    // generation.
    let (fs, inode) = fs(Policy::Kernel);
    fs.set_generation(10);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(2 * K, K, 2 << 20).with_flags(flags::PINNED), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(4 * K, K, 3 << 20, 9), true)
        .unwrap();
    assert!(fs.btrfs_free_extent_maps(100));
    let s = fs.stats();
    assert_eq!(s.shrinker_scanned, 3);
    assert_eq!(s.shrinker_dropped, 2);
    assert_eq!(s.shrinker_skipped_pinned, 1);
    assert_eq!(
        s.shrinker_full_sync_set, 0,
        "generation 9 < fs generation 10"
    );
    assert!(!inode.needs_full_sync());
    assert_eq!(ranges(&inode), vec![(2 * K, K)]);
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(6 * K, K, 4 << 20, 10), true)
        .unwrap();
    assert!(fs.btrfs_free_extent_maps(100));
    assert!(inode.needs_full_sync());
    assert_eq!(fs.stats().shrinker_full_sync_set, 1);
    assert_eq!(fs.stats().shrinker_runs, 2);
    assert_eq!(fs.stats().cached_maps, 1);
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn shrinker_cursor_resumes_and_wraps() {
    // Test scenario: three inodes in roots 5 and 256 with 4 maps each, scans of 4 maps:
    // each run resumes after the last inode it visited, moves to the next root when a root is
    // exhausted, and wraps once to root 0.
    let fs = FsExtentMaps::new(Policy::Kernel);
    let inodes = [fs.inode(5, 257), fs.inode(5, 258), fs.inode(256, 257)];
    let fill = |i: &BtrfsInode| {
        for j in 0..4 {
            i.btrfs_add_extent_mapping(reg(j * 2 * K, K, (j + 1) << 20), j * 2 * K, K)
                .unwrap();
        }
    };
    for i in &inodes {
        fill(i);
    }
    // A non-fs-tree root is never scanned.
    let meta = fs.inode(1, 5);
    fill(&meta);
    assert_eq!(fs.btrfs_nr_cached_objects(), 12);
    let counts = |fs: &FsExtentMaps| -> Vec<usize> {
        let _ = fs;
        inodes.iter().map(|i| i.extent_maps().len()).collect()
    };
    assert!(fs.btrfs_free_extent_maps(4));
    assert_eq!(counts(&fs), vec![0, 4, 4]);
    assert!(fs.btrfs_free_extent_maps(4));
    assert_eq!(counts(&fs), vec![0, 0, 4]);
    assert!(fs.btrfs_free_extent_maps(4));
    assert_eq!(counts(&fs), vec![0, 0, 0]);
    // Refill the first inode: the cursor is past it and wraps once to find it.
    fill(&inodes[0]);
    assert!(fs.btrfs_free_extent_maps(100));
    assert_eq!(counts(&fs), vec![0, 0, 0]);
    assert_eq!(meta.extent_maps().len(), 4);
    assert_eq!(fs.stats().shrinker_scanned, 16);
    assert!(!fs.btrfs_free_extent_maps(0));
}

#[test]
fn shrinker_stops_on_nr_to_scan_inside_inode() {
    // Test scenario: nr_to_scan smaller than an inode's maps stops inside the inode; the next
    // run starts at the next inode (the cursor moved past it), as the kernel.
    let fs = FsExtentMaps::new(Policy::Kernel);
    let a = fs.inode(5, 257);
    let b = fs.inode(5, 258);
    for i in [&a, &b] {
        for j in 0..4 {
            i.btrfs_add_extent_mapping(reg(j * 2 * K, K, (j + 1) << 20), j * 2 * K, K)
                .unwrap();
        }
    }
    assert!(fs.btrfs_free_extent_maps(2));
    assert_eq!((a.extent_maps().len(), b.extent_maps().len()), (2, 4));
    assert!(fs.btrfs_free_extent_maps(2));
    assert_eq!((a.extent_maps().len(), b.extent_maps().len()), (2, 2));
}

#[test]
fn shrinker_skips_busy_inode() {
    // Test scenario: an inode whose mmap lock is held exclusively (fsync) is skipped and
    // counted; its maps survive; the other inode is shrunk.
    let fs = FsExtentMaps::new(Policy::Kernel);
    let a = fs.inode(5, 257);
    let b = fs.inode(5, 258);
    a.btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    b.btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    let guard = a.mmap_lock().write();
    assert!(fs.btrfs_free_extent_maps(10));
    drop(guard);
    assert_eq!(a.extent_maps().len(), 1);
    assert!(b.extent_maps().is_empty());
    assert_eq!(fs.stats().shrinker_skipped_inode_busy, 1);
    // A shared holder (e.g. a page fault) does not block the shrinker's shared try-lock.
    let g = a.mmap_lock().read();
    assert!(fs.btrfs_free_extent_maps(10));
    drop(g);
    assert!(a.extent_maps().is_empty());
}

#[test]
fn shrinker_budget_and_pressure_triggers() {
    // Test scenario: a budget of 8 maps triggers scans from the insert path; the memory
    // pressure hook scans a share of the cache; closing stops scans.
    let fs = FsExtentMaps::new(Policy::Kernel);
    let a = fs.inode(5, 257);
    fs.set_budget(8, 0);
    for j in 0..20 {
        a.btrfs_add_extent_mapping(reg(j * 2 * K, K, (j + 1) << 20), j * 2 * K, K)
            .unwrap();
        assert!(fs.stats().cached_maps <= 8);
    }
    assert!(fs.stats().shrinker_runs > 0);
    fs.set_budget(0, 0);
    for j in 100..120 {
        a.btrfs_add_extent_mapping(reg(j * 2 * K, K, (j + 1) << 20), j * 2 * K, K)
            .unwrap();
    }
    let before = fs.stats().cached_maps;
    assert!(fs.memory_pressure(500));
    assert!(fs.stats().cached_maps < before);
    fs.set_closing(true);
    let before = fs.stats().cached_maps;
    assert!(fs.btrfs_free_extent_maps(1000));
    assert_eq!(fs.stats().cached_maps, before);
    // Byte budget.
    fs.set_closing(false);
    fs.set_budget(0, 4 * MAP_FOOTPRINT_BYTES);
    a.btrfs_add_extent_mapping(reg(1000 * K, K, 1 << 40), 1000 * K, K)
        .unwrap();
    assert!(fs.stats().cached_bytes <= 4 * MAP_FOOTPRINT_BYTES);
}

// ---------------------------------------------------------------------------------------------
// Policies: the section 5 scenario, one step at a time.
//
// Two modified maps A=[0,4K) and B=[16K,32K). A fast fsync collects both; while it logs A
// (tree lock released), a range drop (nosec direct write, relocation) splits B in the middle.
//
//   fsync                                 range drop [20K,24K)
//   collect A, B (LOGGING, refs 2)
//   unlink A, unlock, log A
//                                         lock; split B:
//                                           kernel: pieces get LOGGING, B loses it and
//                                           is unlinked from fsync's list
//                                           fixed:  pieces plain, B keeps LOGGING + list
//                                         unlock
//   lock; clear A; next: B?
//   ...
//   (later) shrinker scans the inode      (later) another fsync walks the modified list

struct Outcome {
    logged: Vec<u64>,
    stats: Stats,
    pieces_logging: bool,
}

fn section5(policy: Policy) -> Outcome {
    let (fs, inode) = fs(policy);
    fs.set_generation(1);
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(0, K, 1 << 20, 2), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(4 * K, 4 * K, 2 << 20, 2), true)
        .unwrap();
    let mut logged = vec![];
    {
        let _il = inode.inode_lock().write();
        let _ml = inode.mmap_lock().write();
        let mut pass = inode.btrfs_log_changed_extents_begin(2, u64::MAX);
        let a = pass.next_extent().unwrap();
        logged.push(a.start);
        // The range drop runs without the inode lock (the nosec / relocation path).
        inode.btrfs_drop_extent_map_range(5 * K, 6 * K - 1, false);
        while let Some(e) = pass.next_extent() {
            logged.push(e.start);
        }
        pass.finish().unwrap();
    }
    let pieces_logging = inode.extent_maps().iter().any(|m| m.has(flags::LOGGING));
    // Later: the shrinker, then another fast fsync in the same transaction.
    fs.btrfs_free_extent_maps(100);
    let _ = inode.btrfs_log_changed_extents::<()>(2, u64::MAX, |_| Ok(()));
    Outcome {
        logged,
        stats: fs.stats(),
        pieces_logging,
    }
}

#[test]
fn policy_kernel_split_bug_and_free_while_listed() {
    // Test scenario: kernel policy: B is stolen from fsync's list (never logged, ref leaked),
    // its pieces carry stale LOGGING onto the modified list, the shrinker meets them and
    // removes them without unlinking (freed while listed), and the next fsync walks into
    // the freed maps (use-after-free in the kernel; detected and counted here).
    let o = section5(Policy::Kernel);
    assert_eq!(o.logged, vec![0], "B never logged");
    assert!(o.pieces_logging);
    let s = &o.stats;
    assert_eq!(s.violations(Invariant::LoggingMapStolen), 1);
    assert_eq!(s.violations(Invariant::StaleLogging), 2);
    assert_eq!(s.logging_maps_lost, 1);
    assert_eq!(s.leaked_refs, 1);
    assert_eq!(s.violations(Invariant::ShrinkerMetLogging), 2);
    assert_eq!(s.violations(Invariant::RemovedStillListed), 2);
    assert_eq!(s.violations(Invariant::FreedWhileInUse), 2);
    assert_eq!(s.violations(Invariant::UseAfterFree), 2);
    assert_eq!(s.violations(Invariant::DoubleMembership), 0);
}

#[test]
fn policy_fixed_split() {
    // Test scenario: fixed-split: B keeps LOGGING and its place on fsync's list and is logged
    // (as it was collected); the pieces are plain modified maps; no violation at all.
    let o = section5(Policy::FixedSplit);
    assert_eq!(o.logged, vec![0, 4 * K]);
    assert!(!o.pieces_logging);
    assert_eq!(o.stats.total_violations(), 0);
    assert_eq!(o.stats.leaked_refs, 0);
}

#[test]
fn policy_fixed_shrinker() {
    // Test scenario: fixed-shrinker: the split bug remains (B lost, pieces stale LOGGING), but
    // the shrinker skips LOGGING maps, so nothing is freed while listed; the next fsync logs
    // the pieces and clears their flag.
    let o = section5(Policy::FixedShrinker);
    assert_eq!(o.logged, vec![0]);
    let s = &o.stats;
    assert_eq!(s.violations(Invariant::LoggingMapStolen), 1);
    assert_eq!(s.violations(Invariant::StaleLogging), 2);
    assert_eq!(s.violations(Invariant::ShrinkerMetLogging), 2);
    assert_eq!(s.shrinker_skipped_logging, 2);
    assert_eq!(s.violations(Invariant::RemovedStillListed), 0);
    assert_eq!(s.violations(Invariant::FreedWhileInUse), 0);
    assert_eq!(s.violations(Invariant::UseAfterFree), 0);
}

#[test]
fn policy_fixed_both() {
    // Test scenario: fixed-both behaves like fixed-split here: no violation.
    let o = section5(Policy::FixedBoth);
    assert_eq!(o.logged, vec![0, 4 * K]);
    assert_eq!(o.stats.total_violations(), 0);
}

#[test]
fn kernel_shrinker_removes_logging_map_on_fsync_list() {
    // Test scenario: a LOGGING map still on fsync's private list (fsync holds a reference) is
    // met by the kernel-policy shrinker (the mmap lock is not held in this test): it is
    // removed from the tree but stays on fsync's list; fsync still logs it and the final put
    // is clean. Under fixed-shrinker it is skipped instead.
    for policy in [Policy::Kernel, Policy::FixedShrinker] {
        let (fs, inode) = fs(policy);
        inode
            .btrfs_replace_extent_map_range(reg(0, K, 1 << 20), true)
            .unwrap();
        inode
            .btrfs_replace_extent_map_range(reg(2 * K, K, 2 << 20), true)
            .unwrap();
        let mut pass = inode.btrfs_log_changed_extents_begin(1, u64::MAX);
        assert_eq!(pass.next_extent().unwrap().start, 0);
        fs.btrfs_free_extent_maps(100);
        let second = pass.next_extent();
        assert_eq!(second.map(|e| e.start), Some(2 * K));
        pass.finish().unwrap();
        let s = fs.stats();
        assert_eq!(s.violations(Invariant::ShrinkerMetLogging), 2, "{policy}");
        assert_eq!(s.violations(Invariant::FreedWhileInUse), 0, "{policy}");
        assert_eq!(s.violations(Invariant::RemovedStillListed), 0, "{policy}");
        let left = inode.extent_maps().len();
        assert_eq!(
            left,
            if policy == Policy::Kernel { 0 } else { 2 },
            "{policy}"
        );
    }
}

#[test]
fn folio_release_rules() {
    // Test scenario: try_release_extent_mapping over a range removes unlisted maps, keeps
    // listed maps of the running generation, removes listed maps of older generations, and
    // stops at a PINNED map.
    let (fs, inode) = fs(Policy::Kernel);
    fs.set_generation(5);
    inode
        .btrfs_add_extent_mapping(reg(0, K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(K, K, 2 << 20, 5), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(2 * K, K, 3 << 20, 4), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(3 * K, K, 4 << 20).with_flags(flags::PINNED), true)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(4 * K, K, 5 << 20), 4 * K, K)
        .unwrap();
    inode.try_release_extent_mapping(0, 5 * K - 1);
    assert_eq!(ranges(&inode), vec![(K, K), (3 * K, K), (4 * K, K)]);
    assert!(
        !inode.needs_full_sync(),
        "folio release never sets full sync"
    );
    assert_eq!(fs.stats().total_violations(), 0);
}

#[test]
fn folio_release_of_stale_logging_piece() {
    // Test scenario: kernel policy: a split piece carrying stale LOGGING sits on the modified
    // list; folio release treats LOGGING maps as removable and removes it without unlinking
    // it: freed while listed (detected, counted); the next fsync walks into it.
    //
    //   fsync                        range drop            folio release
    //   collect A, B; log A
    //                                split B (pieces LOGGING, on modified list)
    //   finish (B lost)
    //                                                      remove piece: still listed, freed
    //   fsync: walk modified list -> use after free (kernel), counted here
    let (fs0, inode) = fs(Policy::Kernel);
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(0, K, 1 << 20, 2), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(4 * K, 4 * K, 2 << 20, 2), true)
        .unwrap();
    let mut pass = inode.btrfs_log_changed_extents_begin(2, u64::MAX);
    pass.next_extent().unwrap();
    inode.btrfs_drop_extent_map_range(5 * K, 6 * K - 1, false);
    pass.finish().unwrap();
    inode.try_release_extent_mapping(4 * K, 5 * K - 1);
    let s = fs0.stats();
    assert_eq!(s.violations(Invariant::RemovedStillListed), 1);
    assert_eq!(s.violations(Invariant::FreedWhileInUse), 1);
    let _ = inode.btrfs_log_changed_extents::<()>(2, u64::MAX, |_| Ok(()));
    assert_eq!(fs0.stats().violations(Invariant::UseAfterFree), 1);
    // With the split fixed there is no stale piece to release.
    let (fs2, i2) = fs(Policy::FixedSplit);
    i2.btrfs_replace_extent_map_range(ExtentMap::regular(4 * K, 4 * K, 2 << 20, 2), true)
        .unwrap();
    let mut pass = i2.btrfs_log_changed_extents_begin(2, u64::MAX);
    i2.btrfs_drop_extent_map_range(5 * K, 6 * K - 1, false);
    while pass.next_extent().is_some() {}
    pass.finish().unwrap();
    i2.try_release_extent_mapping(4 * K, 5 * K - 1);
    assert_eq!(fs2.stats().total_violations(), 0);
}

#[test]
fn folio_release_skips_io_locked_maps() {
    // Test scenario: try_release_extent_mapping_unless_locked keeps a removable map whose range
    // has EXTENT_LOCKED bits (the caller's io_tree test, run per map over the map's whole
    // range) and goes on with the next one.
    let (_fs, inode) = fs(Policy::Kernel);
    inode
        .btrfs_add_extent_mapping(reg(0, 2 * K, 1 << 20), 0, K)
        .unwrap();
    inode
        .btrfs_add_extent_mapping(reg(2 * K, K, 3 << 20), 2 * K, K)
        .unwrap();
    // The first map's range [0, 2K-1] overlaps the locked [K, K]: kept.
    let locked = |s: u64, e: u64| s <= K && e >= K;
    inode.try_release_extent_mapping_unless_locked(0, 3 * K - 1, locked);
    assert_eq!(ranges(&inode), vec![(0, 2 * K)]);
    inode.try_release_extent_mapping_unless_locked(0, 3 * K - 1, |_, _| false);
    assert!(ranges(&inode).is_empty());
}

#[test]
fn fsync_marks_only_the_listed_map_not_its_successor_at_the_offset() {
    // Test scenario: kernel policy: a stale LOGGING piece P is removed from the tree while
    // still on the modified list, and a reader still holds a reference to it (as
    // btrfs_get_extent's caller does during I/O), so it is not freed. A read then caches a
    // new map N at P's offset. The next fsync walks the modified list and sets LOGGING on P
    // (the listed struct), as `em->flags |= EXTENT_FLAG_LOGGING` does in the kernel; N is a
    // different map and must not get the flag (it would keep a stale LOGGING forever).
    let (fs0, inode) = fs(Policy::Kernel);
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(0, K, 1 << 20, 2), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(ExtentMap::regular(4 * K, 4 * K, 2 << 20, 2), true)
        .unwrap();
    let mut pass = inode.btrfs_log_changed_extents_begin(2, u64::MAX);
    pass.next_extent().unwrap();
    inode.btrfs_drop_extent_map_range(5 * K, 6 * K - 1, false);
    pass.finish().unwrap();
    // The piece [4K, 5K) carries stale LOGGING and sits on the modified list; a reader holds it.
    let held = {
        let mut l = inode.lock_tree();
        let s = l.search(4 * K, 1, true).expect("stale piece in the tree");
        assert!(s.em.has(flags::LOGGING));
        l.get_ref(s.id);
        // The reader keeps the identity across critical sections.
        l.hold(s.id);
        s
    };
    inode.try_release_extent_mapping(4 * K, 5 * K - 1);
    assert!(inode.btrfs_lookup_extent_mapping(4 * K, 1).is_none());
    assert_eq!(fs0.stats().violations(Invariant::RemovedStillListed), 1);
    // A read caches the range again: a new, unlisted map at the same offset.
    inode
        .btrfs_add_extent_mapping(ExtentMap::regular(4 * K, K, 2 << 20, 2), 4 * K, K)
        .unwrap();
    let mut logged = vec![];
    inode
        .btrfs_log_changed_extents::<()>(2, u64::MAX, |e| {
            logged.push((e.start, e.len));
            Ok(())
        })
        .unwrap();
    assert!(
        logged.contains(&(4 * K, K)),
        "the listed piece is logged: {logged:?}"
    );
    let n = inode.btrfs_lookup_extent_mapping(4 * K, 1).unwrap();
    assert!(
        !n.has(flags::LOGGING),
        "the new map at the offset was marked LOGGING"
    );
    assert_eq!(fs0.stats().violations(Invariant::UseAfterFree), 0);
    let mut l = inode.lock_tree();
    l.put(held.id, &held.em);
    l.release(held.id);
    drop(l);
    assert_eq!(inode.check_identities(), Ok(()));
}

#[test]
fn identity_arena_and_identity_checks_fire() {
    // Test scenario: with identities in a per-tree arena, the arena check and the kernel
    // WARN_ON equivalents that depend on a map's identity each still detect their violation
    // when it is forced through the internal API: (1) a held identity on the free list; (2) a
    // map inserted into the tree a second time, and linked on the modified list a second time
    // (DoubleMembership); (3) a LOGGING map removed while on the modified list
    // (RemovedStillListed), its value kept for the list; (4) the final reference dropped while
    // the map is in the tree, and while it is listed out of the tree (FreedWhileInUse), and a
    // reference dropped after the final one (UseAfterFree). Finally an identity is reused only
    // after nothing holds it any more.
    use crate::extent_map::Slot;
    let (fs0, inode) = fs(Policy::Kernel);
    let v = |inv| fs0.stats().violations(inv);
    inode
        .btrfs_replace_extent_map_range(reg(0, K, 1 << 20), true)
        .unwrap();
    inode
        .btrfs_replace_extent_map_range(reg(4 * K, K, 2 << 20), false)
        .unwrap();
    assert_eq!(inode.check_identities(), Ok(()));

    // (1) On another inode, so that this one stays consistent.
    let other = fs0.inode(ROOT, 999);
    other
        .btrfs_replace_extent_map_range(reg(0, K, 1 << 20), false)
        .unwrap();
    {
        let mut l = other.lock_tree();
        let id = l.search(0, 1, true).unwrap().id;
        l.w.ids.push_free_for_test(id);
        let err = l.check_ids().unwrap_err();
        assert!(err.contains("free list"), "{err}");
    }

    // (2)
    let (listed, plain) = {
        let l = inode.lock_tree();
        (
            l.search(0, 1, true).unwrap(),
            l.search(4 * K, 1, true).unwrap(),
        )
    };
    {
        let mut l = inode.lock_tree();
        let r = l.tree_insert(Slot {
            em: reg(8 * K, K, 3 << 20),
            id: plain.id,
        });
        assert_eq!(r, Err(EmError::Invalid("map already in a tree")));
    }
    assert_eq!(v(Invariant::DoubleMembership), 1);
    inode.lock_tree().list_add_modified(listed.id, listed.em);
    assert_eq!(v(Invariant::DoubleMembership), 2);
    assert_eq!(inode.modified_extents(), vec![listed.em], "linked once");
    assert_eq!(inode.check_identities(), Ok(()));

    // (3)
    {
        let mut l = inode.lock_tree();
        l.update(0, |e| e.flags |= flags::LOGGING);
        assert!(l.remove_extent_mapping(0).is_some());
    }
    assert_eq!(v(Invariant::RemovedStillListed), 1);
    assert_eq!(
        inode.modified_extents(),
        vec![listed.em.with_flags(flags::LOGGING)],
        "the list keeps the removed map's value"
    );
    assert_eq!(inode.check_identities(), Ok(()));

    // (4) The map at 4K holds one reference (the tree's); the removed listed map one too.
    assert_eq!(info(&inode, 4 * K).refs, 1);
    {
        let mut l = inode.lock_tree();
        l.put(plain.id, &plain.em);
        l.put(listed.id, &listed.em);
    }
    assert_eq!(v(Invariant::FreedWhileInUse), 2);
    assert_eq!(v(Invariant::UseAfterFree), 0);
    inode.lock_tree().put(plain.id, &plain.em);
    assert_eq!(v(Invariant::UseAfterFree), 1);
    assert_eq!(inode.check_identities(), Ok(()));

    // Reuse: the freed listed map is held by the list until the list lets it go.
    inode.btrfs_log_inode_clear_modified_extents();
    assert_eq!(v(Invariant::UseAfterFree), 2, "the walk met the freed map");
    assert_eq!(inode.check_identities(), Ok(()));
    let reused = inode.lock_tree().new_node();
    assert_eq!(reused, listed.id, "a free identity is reused");
    assert_eq!(inode.check_identities(), Ok(()));
}

/// 60 unmodified maps at even 4 KiB slots below `base` (never mergeable: disk far apart), then
/// `n` modified 4 KiB maps from `base` on, map `i` at disk address `disk(i)`.
fn fillers_and_modified(
    policy: Policy,
    base: u64,
    n: u64,
    disk: impl Fn(u64) -> u64,
) -> (Arc<FsExtentMaps>, Arc<BtrfsInode>) {
    let (fs, inode) = fs(policy);
    for j in 0..60 {
        let s = 2 * j * K;
        inode
            .btrfs_add_extent_mapping(reg(s, K, (1 << 40) + (j << 24)), s, K)
            .unwrap();
    }
    for i in 0..n {
        inode
            .btrfs_replace_extent_map_range(reg(base + i * K, K, disk(i)), true)
            .unwrap();
    }
    (fs, inode)
}

#[test]
fn logging_pass_cursor_sees_changes_between_maps() {
    // Test scenario: between two maps of one logging pass, a writer inserts or drops maps in
    // the same and earlier B+tree leaves (shifting the next map's slot index and the leaves'
    // places under the root), or the shrinker drops maps. The pass keeps where its next map
    // was between critical sections; whatever changed, every map is still handed out once,
    // in order, cleared and merged, and the identities stay consistent.
    const N: u64 = 100;
    const BASE: u64 = 300 * K;
    for policy in Policy::ALL {
        for mode in ["insert", "drop", "shrink", "none"] {
            // Modified maps contiguous on disk: each logged one merges into the one before.
            let (fs, inode) = fillers_and_modified(policy, BASE, N, |i| (1 << 30) + i * K);
            let mut pass = inode.btrfs_log_changed_extents_begin(1, u64::MAX);
            let mut got = vec![];
            let mut j = 0;
            while let Some(e) = pass.next_extent() {
                assert!(e.has(flags::LOGGING));
                got.push(e.start);
                match mode {
                    "insert" => {
                        // Odd slots, first next to the modified maps (same leaf), then lower.
                        let s = (2 * (59 - j % 60) + 1) * K;
                        inode
                            .btrfs_add_extent_mapping(reg(s, K, (1 << 41) + (j << 24)), s, K)
                            .unwrap();
                    }
                    "drop" => {
                        let s = 2 * (59 - j % 60) * K;
                        inode.btrfs_drop_extent_map_range(s, s + K - 1, false);
                    }
                    "shrink" => {
                        fs.btrfs_free_extent_maps(8);
                    }
                    _ => {}
                }
                j += 1;
                assert_eq!(inode.check_identities(), Ok(()), "{policy:?} {mode}");
            }
            pass.finish().unwrap();
            let want: Vec<u64> = (0..N).map(|i| BASE + i * K).collect();
            assert_eq!(got, want, "{policy:?} {mode}");
            let maps = inode.extent_maps();
            assert!(
                maps.iter().all(|m| !m.has(flags::LOGGING)),
                "{policy:?} {mode}"
            );
            assert!(
                maps.windows(2).all(|w| w[0].end() <= w[1].start),
                "{policy:?} {mode}"
            );
            let logged: Vec<(u64, u64)> = maps
                .iter()
                .filter(|m| m.start >= BASE)
                .map(|m| (m.start, m.len))
                .collect();
            if mode == "shrink" {
                // Whatever the shrinker left of the logged range is merged as far as it could.
                assert!(logged.len() <= 1, "{policy:?} {mode}: {logged:?}");
            } else {
                assert_eq!(logged, vec![(BASE, N * K)], "{policy:?} {mode}");
                let fillers = maps.iter().filter(|m| m.start < BASE).count();
                let expect = match mode {
                    "insert" => 60 + N.min(60) as usize,
                    "drop" => 0,
                    _ => 60,
                };
                assert_eq!(fillers, expect, "{policy:?} {mode}");
            }
            assert!(inode.modified_extents().is_empty());
            assert_eq!(inode.check_identities(), Ok(()));
            let v = fs.stats().invariant_violations;
            let shrinker_skips_logging =
                matches!(policy, Policy::FixedShrinker | Policy::FixedBoth);
            if mode != "shrink" {
                assert_eq!(v.iter().sum::<u64>(), 0, "{policy:?} {mode} {v:?}");
            } else if shrinker_skips_logging {
                // Only the shrinker meeting (and skipping) the LOGGING maps is counted; with
                // the other policies it drops them, which the kernel policy counts too.
                let met = Invariant::ShrinkerMetLogging as usize;
                assert!(v[met] > 0, "{policy:?} {mode} {v:?}");
                let others: u64 = (0..v.len()).filter(|&i| i != met).map(|i| v[i]).sum();
                assert_eq!(others, 0, "{policy:?} {mode} {v:?}");
            }
        }
    }
}

#[test]
fn logging_pass_gap_kept_between_sections_is_invisible() {
    // Test scenario: a logging pass over 100 modified, physically contiguous maps merges each
    // cleared map into the one before it. Between its critical sections the pass leaves work
    // undone in the tree: the merged-away slots stay in their leaf (a gap) and the LOGGING
    // flags of its maps are only recorded. Every k-th map something else looks at the tree
    // between two sections: a locked observer (which must find exactly the tree the kernel
    // leaves after each section: the maps cleared so far merged into one, the handed-out map
    // and the rest LOGGING), lock-free readers (of the version a writer on an unrelated range
    // publishes meanwhile), the shrinker, or the shrinker while the pass holds the mmap lock
    // as fsync does (it must find the inode busy and change nothing). With k larger than the
    // pass, the gap crosses whole leaves and only the pass itself settles it. The maps are
    // contiguous on disk in runs of `run` maps, so a run of merges also ends in the middle of
    // a leaf (with a gap open) when the next map does not merge.
    const N: u64 = 100;
    const BASE: u64 = 300 * K;
    const DISK: u64 = 1 << 30;
    let disk = |i: u64, run: u64| DISK + i * K + (i / run) * (1 << 20);
    for policy in Policy::ALL {
        for (k, what, run) in [1u64, 2, 3, 7, 16, 1000]
            .into_iter()
            .flat_map(|k| ["observe", "read", "shrink", "shrink-busy"].map(|w| (k, w)))
            .flat_map(|(k, w)| [N, 5, 1].map(|r| (k, w, r)))
        {
            let ctx = format!("{policy:?} every {k} {what} runs of {run}");
            let (fs, inode) = fillers_and_modified(policy, BASE, N, |i| disk(i, run));
            // As fsync does, the mmap lock held for the whole pass: a shrinker that meets
            // the inode then only finds it busy (and must leave the pass's work alone).
            let mmap = (what == "shrink-busy").then(|| inode.mmap_lock().write());
            let mut pass = inode.btrfs_log_changed_extents_begin(1, u64::MAX);
            let mut j = 0u64;
            while let Some(e) = pass.next_extent() {
                assert_eq!((e.start, e.len), (BASE + j * K, K), "{ctx}");
                assert_eq!(e.disk_bytenr, disk(j, run), "{ctx}");
                j += 1;
                if !j.is_multiple_of(k) {
                    continue;
                }
                match what {
                    "observe" => {
                        // Maps 0..j-1 are cleared and merged, map j-1 is handed out
                        // (still LOGGING, not merged yet), the rest are LOGGING.
                        let logged: Vec<(u64, u64, bool)> = inode
                            .working_extent_maps()
                            .iter()
                            .filter(|m| m.start >= BASE)
                            .map(|m| (m.start, m.len, m.has(flags::LOGGING)))
                            .collect();
                        let mut want = vec![];
                        let cleared = j - 1;
                        for r in (0..cleared).step_by(run as usize) {
                            let n = run.min(cleared - r);
                            want.push((BASE + r * K, n * K, false));
                        }
                        want.extend((j - 1..N).map(|i| (BASE + i * K, K, true)));
                        assert_eq!(logged, want, "{ctx} after {j}");
                        assert_eq!(inode.check_identities(), Ok(()), "{ctx} after {j}");
                    }
                    "read" => {
                        // An unrelated writer publishes the working version.
                        let s = (121 + 2 * j) * K;
                        inode
                            .btrfs_add_extent_mapping(reg(s, K, (1 << 42) + (j << 24)), s, K)
                            .unwrap();
                        for i in 0..N {
                            let off = BASE + i * K;
                            let m = inode.btrfs_lookup_extent_mapping(off, 1).unwrap();
                            assert!(m.start <= off && m.end() > off, "{ctx} {i}");
                            assert_eq!(
                                m.block_start() + (off - m.start),
                                disk(i, run),
                                "{ctx} {i}"
                            );
                        }
                    }
                    "shrink" => {
                        fs.btrfs_free_extent_maps(4);
                    }
                    _ => {
                        let busy = fs.stats().shrinker_skipped_inode_busy;
                        fs.btrfs_free_extent_maps(1 << 20);
                        assert_eq!(fs.stats().shrinker_skipped_inode_busy, busy + 1, "{ctx}");
                    }
                }
            }
            assert_eq!(j, N, "{ctx}");
            pass.finish().unwrap();
            drop(mmap);
            let maps = inode.extent_maps();
            assert!(maps.iter().all(|m| !m.has(flags::LOGGING)), "{ctx}");
            assert!(maps.windows(2).all(|w| w[0].end() <= w[1].start), "{ctx}");
            let logged: Vec<(u64, u64)> = maps
                .iter()
                .filter(|m| m.start >= BASE)
                .map(|m| (m.start, m.len))
                .collect();
            let want: Vec<(u64, u64)> = (0..N)
                .step_by(run as usize)
                .map(|r| (BASE + r * K, run.min(N - r) * K))
                .collect();
            if what == "shrink" {
                // Whatever the shrinker left is merged as far as it could be.
                assert!(logged.len() <= want.len(), "{ctx}: {logged:?}");
            } else {
                assert_eq!(logged, want, "{ctx}");
                // Readers see the end of the pass too (published when it ends).
                let m = inode.btrfs_lookup_extent_mapping(BASE + 3 * K, 1).unwrap();
                assert_eq!((m.start, m.len), want[(3 / run) as usize], "{ctx}");
                assert_eq!(m.block_start(), disk(3 / run * run, run), "{ctx}");
            }
            assert_eq!(inode.check_identities(), Ok(()), "{ctx}");
            let v = fs.stats().invariant_violations;
            if what != "shrink" {
                assert_eq!(v.iter().sum::<u64>(), 0, "{ctx} {v:?}");
            }
        }
    }
}
