//! Model-based property tests: random sequences of reads (btrfs_add_extent_mapping), writes
//! (btrfs_replace_extent_map_range), ordered-extent completion (unpin), ordered-extent splits,
//! cache drops, fast fsyncs, full-sync list clearing, shrinker runs and spare-allocation
//! failures against a reference model of the file: the on-disk truth per block, the file
//! extent items, which blocks have in-flight (pinned) writes and which were written since the
//! last fsync.
//!
//! Properties after every step:
//! - maps never overlap and everything a lookup returns maps each block to its on-disk truth
//!   (the shrinker may drop maps, so absence is allowed except for pinned blocks);
//! - a block with an in-flight write is covered by a PINNED map, and only those are;
//! - a fast fsync logs every block written since the previous one unless NEEDS_FULL_SYNC is set;
//! - the kernel bookkeeping is clean: one reference per map, no LOGGING outside a pass, the
//!   evictable count equals the number of maps, no invariant violation (single-threaded, every
//!   policy).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use ubtrfs_extent_map::*;

const K: u64 = 4096;
const BLOCKS: u64 = 48;
const GEN: u64 = 1;

#[derive(Clone, Debug)]
enum Op {
    Write {
        start: u64,
        len: u64,
        pinned: bool,
    },
    Read {
        block: u64,
    },
    Unpin {
        pick: usize,
    },
    Split {
        pick: usize,
        pre: u64,
    },
    Drop {
        start: u64,
        len: u64,
        skip_pinned: bool,
    },
    DropAll,
    Log {
        fail_at: Option<usize>,
    },
    ClearModified,
    Shrink {
        n: u64,
    },
    SpareFail {
        n: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..BLOCKS, 1..12u64, any::<bool>()).prop_map(|(start, len, pinned)| Op::Write { start, len, pinned }),
        4 => (0..BLOCKS + 4).prop_map(|block| Op::Read { block }),
        2 => any::<usize>().prop_map(|pick| Op::Unpin { pick }),
        1 => (any::<usize>(), 1..8u64).prop_map(|(pick, pre)| Op::Split { pick, pre }),
        2 => (0..BLOCKS, 1..16u64, any::<bool>()).prop_map(|(start, len, skip_pinned)| Op::Drop { start, len, skip_pinned }),
        1 => Just(Op::DropAll),
        2 => prop::option::weighted(0.2, 0..4usize).prop_map(|fail_at| Op::Log { fail_at }),
        1 => Just(Op::ClearModified),
        2 => (1..40u64).prop_map(|n| Op::Shrink { n }),
        1 => (1..3u32).prop_map(|n| Op::SpareFail { n }),
    ]
}

/// A file extent item (in blocks): file start, length, disk start of the whole extent, disk
/// length, offset into it.
#[derive(Clone, Copy, Debug)]
struct Item {
    len: u64,
    disk: u64,
    disk_len: u64,
    offset: u64,
}

struct Model {
    fs: Arc<FsExtentMaps>,
    inode: Arc<BtrfsInode>,
    items: BTreeMap<u64, Item>,
    pinned: Vec<bool>,
    dirty: BTreeSet<u64>,
    next_disk: u64,
    /// A spare-map allocation failed since the last fsync: a drop may have removed a map
    /// sticking out of its range whole (pinned parts outside included), or lost the tail of a
    /// split modified map, as the kernel does.
    spare_failed: bool,
    /// A spare-map allocation failed during the current step.
    spare_failed_now: bool,
}

impl Model {
    fn new(policy: Policy) -> Self {
        let fs = FsExtentMaps::new(policy);
        fs.set_generation(GEN);
        let inode = fs.inode(5, 257);
        Model {
            fs,
            inode,
            items: BTreeMap::new(),
            pinned: vec![false; BLOCKS as usize + 16],
            dirty: BTreeSet::new(),
            next_disk: 1 << 10,
            spare_failed: false,
            spare_failed_now: false,
        }
    }

    /// Truth of one block: Some(disk block) or None for a hole.
    fn truth(&self, b: u64) -> Option<u64> {
        let (s, it) = self.items.range(..=b).next_back()?;
        (b < s + it.len).then(|| it.disk + it.offset + (b - s))
    }

    /// Replaces the items overlapping `[start, start+len)`, keeping the parts outside.
    fn punch_items(&mut self, start: u64, len: u64) {
        let end = start + len;
        let overlapping: Vec<(u64, Item)> = self
            .items
            .range(..end)
            .filter(|(s, it)| **s + it.len > start)
            .map(|(s, it)| (*s, *it))
            .collect();
        for (s, it) in overlapping {
            self.items.remove(&s);
            if s < start {
                self.items.insert(
                    s,
                    Item {
                        len: start - s,
                        ..it
                    },
                );
            }
            if s + it.len > end {
                self.items.insert(
                    end,
                    Item {
                        len: s + it.len - end,
                        offset: it.offset + (end - s),
                        ..it
                    },
                );
            }
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let d = self.next_disk;
        // Leave a gap so that separate writes are never physically contiguous by chance
        // half of the time.
        self.next_disk += len + (d / 7) % 2;
        d
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.fs.pending_spare_alloc_failures();
        self.step(op)?;
        self.spare_failed_now = self.fs.pending_spare_alloc_failures() < before;
        self.spare_failed |= self.spare_failed_now;
        self.check()
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let inode = self.inode.clone();
        match *op {
            Op::Write { start, len, pinned } => {
                let disk = self.alloc(len);
                self.punch_items(start, len);
                self.items.insert(
                    start,
                    Item {
                        len,
                        disk,
                        disk_len: len,
                        offset: 0,
                    },
                );
                let mut em = ExtentMap::regular(start * K, len * K, disk * K, GEN);
                if pinned {
                    em = em.with_flags(flags::PINNED);
                }
                prop_assert!(inode.btrfs_replace_extent_map_range(em, true).is_ok());
                for b in start..start + len {
                    self.pinned[b as usize] = pinned;
                    self.dirty.insert(b);
                }
            }
            Op::Read { block } => {
                if inode.btrfs_lookup_extent_mapping(block * K, K).is_some() {
                    return Ok(());
                }
                let em = match self.items.range(..=block).next_back() {
                    Some((s, it)) if block < s + it.len => ExtentMap {
                        start: s * K,
                        len: it.len * K,
                        disk_bytenr: it.disk * K,
                        disk_num_bytes: it.disk_len * K,
                        offset: it.offset * K,
                        ram_bytes: it.disk_len * K,
                        generation: GEN,
                        flags: 0,
                    },
                    prev => {
                        let hs = prev.map_or(0, |(s, it)| s + it.len);
                        let he = self
                            .items
                            .range(block..)
                            .next()
                            .map_or(BLOCKS + 16, |(s, _)| *s);
                        ExtentMap::hole(hs * K, (he - hs) * K, GEN)
                    }
                };
                let got = inode.btrfs_add_extent_mapping(em, block * K, K);
                let got = got.map_err(|e| TestCaseError::fail(format!("add failed: {e}")))?;
                prop_assert!(
                    got.start <= block * K && block * K < got.end(),
                    "{got:?} serves {block}"
                );
            }
            Op::Unpin { pick } => {
                let pinned: Vec<ExtentMap> = inode
                    .extent_maps()
                    .into_iter()
                    .filter(|m| m.has(flags::PINNED))
                    .collect();
                if pinned.is_empty() {
                    return Ok(());
                }
                let m = pinned[pick % pinned.len()];
                prop_assert!(inode.btrfs_unpin_extent_cache(m.start, m.len, GEN).is_ok());
                for b in m.start / K..m.end() / K {
                    self.pinned[b as usize] = false;
                }
            }
            Op::Split { pick, pre } => {
                let cands: Vec<ExtentMap> = inode
                    .extent_maps()
                    .into_iter()
                    .filter(|m| {
                        m.has(flags::PINNED)
                            && m.len > K
                            && inode.map_info(m.start).is_some_and(|i| i.on_modified_list)
                    })
                    .collect();
                if cands.is_empty() {
                    return Ok(());
                }
                let m = cands[pick % cands.len()];
                let pre = 1 + (pre - 1) % (m.len / K - 1);
                let new = self.alloc(pre);
                let r = inode.btrfs_split_extent_map(m.start, m.len, pre * K, new * K);
                if r == Err(EmError::NoMem) {
                    return Ok(());
                }
                prop_assert!(r.is_ok(), "{r:?}");
                let s = m.start / K;
                self.punch_items(s, pre);
                self.items.insert(
                    s,
                    Item {
                        len: pre,
                        disk: new,
                        disk_len: pre,
                        offset: 0,
                    },
                );
            }
            Op::Drop {
                start,
                len,
                skip_pinned,
            } => {
                let before = inode.extent_maps();
                inode.btrfs_drop_extent_map_range(start * K, (start + len) * K - 1, skip_pinned);
                for b in start..start + len {
                    let pinned_kept = skip_pinned
                        && before
                            .iter()
                            .any(|m| m.has(flags::PINNED) && m.start <= b * K && b * K < m.end());
                    if !pinned_kept {
                        self.pinned[b as usize] = false;
                        self.dirty.remove(&b);
                    }
                }
            }
            Op::DropAll => {
                inode.btrfs_drop_extent_map_range(0, u64::MAX, false);
                self.pinned.iter_mut().for_each(|p| *p = false);
                self.dirty.clear();
            }
            Op::Log { fail_at } => {
                let mut logged = BTreeSet::new();
                let mut i = 0;
                let mut problems = Vec::new();
                let r = inode.btrfs_log_changed_extents(GEN, u64::MAX, |em| {
                    if fail_at == Some(i) {
                        return Err(());
                    }
                    i += 1;
                    if !em.has(flags::LOGGING) {
                        problems.push(format!("handed out without LOGGING: {em:?}"));
                    }
                    // Mid-pass: the pass holds the identity it handed out.
                    if let Err(e) = inode.check_identities() {
                        problems.push(format!("identity arena mid-pass: {e}"));
                    }
                    for b in em.start / K..em.end() / K {
                        if let Some(p) = self.map_block(em, b) {
                            if Some(p) != self.truth(b) {
                                problems.push(format!("logged {em:?} maps {b} wrongly"));
                            }
                        }
                        logged.insert(b);
                    }
                    Ok(())
                });
                prop_assert!(problems.is_empty(), "{problems:?}");
                // With a spare-map allocation failure, the kernel can lose the tail of a split
                // modified map without setting NEEDS_FULL_SYNC (head piece took the only
                // spare, original already replaced): see drop_range_one_spare_only.
                if r.is_ok() && !inode.needs_full_sync() && !self.spare_failed {
                    let missing: Vec<_> = self.dirty.difference(&logged).collect();
                    prop_assert!(missing.is_empty(), "fast fsync missed blocks {missing:?}");
                }
                // Either the fast fsync logged everything, or the fsync falls back to a full
                // sync / commit which also clears the flag.
                inode.clear_runtime_flags(runtime_flags::NEEDS_FULL_SYNC);
                self.dirty.clear();
                self.spare_failed = false;
            }
            Op::ClearModified => {
                inode.btrfs_log_inode_clear_modified_extents();
                inode.clear_runtime_flags(runtime_flags::NEEDS_FULL_SYNC);
                self.dirty.clear();
            }
            Op::Shrink { n } => {
                prop_assert!(self.fs.btrfs_free_extent_maps(n));
            }
            Op::SpareFail { n } => self.fs.inject_spare_alloc_failures(n),
        }
        Ok(())
    }

    /// The disk block a map says file block `b` is at (None for holes).
    fn map_block(&self, m: &ExtentMap, b: u64) -> Option<u64> {
        m.is_regular()
            .then(|| m.block_start() / K + (b - m.start / K))
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.inode.check_identities(), Ok(()));
        let maps = self.inode.extent_maps();
        let mut prev_end = 0;
        for m in &maps {
            prop_assert!(m.start >= prev_end, "overlap at {m:?}");
            prop_assert!(m.len > 0);
            prev_end = m.end();
            prop_assert!(!m.has(flags::LOGGING), "stale LOGGING {m:?}");
            let info = self.inode.map_info(m.start).expect("listed map in tree");
            prop_assert_eq!(info.refs, 1, "refs of {:?}", m);
            prop_assert!(!info.on_logging_list);
            for b in m.start / K..m.end() / K {
                prop_assert_eq!(
                    self.map_block(m, b),
                    self.truth(b),
                    "map {:?} block {} disagrees with disk",
                    m,
                    b
                );
                prop_assert_eq!(
                    m.has(flags::PINNED),
                    self.pinned.get(b as usize).copied().unwrap_or(false),
                    "pin state of block {} in {:?}",
                    b,
                    m
                );
            }
            // Lookups agree with the full listing.
            let l = self.inode.btrfs_lookup_extent_mapping(m.start, 1);
            prop_assert_eq!(l, Some(*m));
        }
        for (b, p) in self.pinned.iter_mut().enumerate() {
            if *p {
                let b = b as u64 * K;
                let covered = maps.iter().any(|m| m.start <= b && b < m.end());
                if !covered && self.spare_failed_now {
                    *p = false;
                    continue;
                }
                prop_assert!(covered, "pinned block {} has no map", b / K);
            }
        }
        let mods = self.inode.modified_extents();
        for m in &mods {
            prop_assert!(maps.contains(m), "listed map {m:?} not in the tree");
        }
        let s = self.fs.stats();
        prop_assert_eq!(s.cached_maps, maps.len() as u64);
        prop_assert_eq!(s.total_violations(), 0, "{:?}", s);
        prop_assert_eq!(s.leaked_refs, 0);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn model_kernel(ops in prop::collection::vec(op(), 1..80)) {
        // Test scenario: random single-threaded operation sequences under the kernel policy.
        let mut m = Model::new(Policy::Kernel);
        for o in &ops {
            m.apply(o)?;
        }
    }

    #[test]
    fn model_fixed_both(ops in prop::collection::vec(op(), 1..80)) {
        // Test scenario: the same under fixed-both (single-threaded, the policies agree).
        let mut m = Model::new(Policy::FixedBoth);
        for o in &ops {
            m.apply(o)?;
        }
    }
}

fn wild_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        Just(EXTENT_MAP_LAST_BYTE),
        Just(EXTENT_MAP_HOLE),
        Just(EXTENT_MAP_INLINE),
        (0..64u64).prop_map(|b| b * K),
        (0..4u64).prop_map(|b| u64::MAX - b * K),
    ]
}

fn wild_map() -> impl Strategy<Value = ExtentMap> {
    (
        wild_u64(),
        wild_u64(),
        wild_u64(),
        wild_u64(),
        wild_u64(),
        wild_u64(),
        wild_u64(),
        any::<u32>(),
    )
        .prop_map(
            |(start, len, disk_bytenr, disk_num_bytes, offset, ram_bytes, generation, flags)| {
                ExtentMap {
                    start,
                    len,
                    disk_bytenr,
                    disk_num_bytes,
                    offset,
                    ram_bytes,
                    generation,
                    flags,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_panic_on_wild_input(
        ops in prop::collection::vec((0..8u8, wild_map(), wild_u64(), wild_u64(), any::<bool>()), 1..40)
    ) {
        // Test scenario: arbitrary field values (overflowing ends, special addresses, any
        // flags) through every public operation: errors are fine, panics are not, and the
        // tree never holds overlapping maps.
        let fs = FsExtentMaps::new(Policy::Kernel);
        let inode = fs.inode(5, 257);
        for (kind, em, a, b, flag) in ops {
            match kind {
                0 => { let _ = inode.btrfs_add_extent_mapping(em, a, b); }
                1 => { let _ = inode.btrfs_replace_extent_map_range(em, flag); }
                2 => inode.btrfs_drop_extent_map_range(a.min(b), a.max(b), flag),
                3 => { let _ = inode.btrfs_split_extent_map(a, b, em.len, em.disk_bytenr); }
                4 => { let _ = inode.btrfs_unpin_extent_cache(a, b, em.generation); }
                5 => { let _ = inode.btrfs_log_changed_extents::<()>(a, b, |_| Ok(())); }
                6 => { fs.btrfs_free_extent_maps(a % 1000); }
                _ => inode.try_release_extent_mapping(a.min(b), a.max(b)),
            }
            let _ = inode.btrfs_lookup_extent_mapping(a, b);
            let _ = inode.btrfs_search_extent_mapping(b, a);
            let maps = inode.extent_maps();
            for w in maps.windows(2) {
                prop_assert!(w[0].end() <= w[1].start, "overlap {:?} {:?}", w[0], w[1]);
            }
            prop_assert_eq!(inode.check_identities(), Ok(()));
        }
        fs.evict_inode(5, 257);
        prop_assert_eq!(fs.stats().cached_maps, 0);
    }
}
