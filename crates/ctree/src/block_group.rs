//! Block groups and the extent allocator (the kernel's block-group.c, the allocation half of
//! extent-tree.c, and the in-memory free space that free-space-cache.c keeps).
//!
//! # Definitions
//! - A *block group* covers one chunk's logical range; `used` is the sum of the lengths of the
//!   extents (data) and tree blocks (metadata) inside it that the extent tree records.
//! - *Free* space: neither used by an extent nor pinned nor a superblock copy. Loaded from the
//!   free space tree at mount.
//! - *Pinned* space: freed in the running transaction. The committed trees may still point at
//!   it, so it is not reused until the commit that freed it is durable (`btrfs_finish_extent_commit`
//!   unpins it).
//!
//! # Invariants
//! - Free ranges of a group lie inside the group, never overlap, and are coalesced.
//! - `used + free + pinned + superblock copies == length` for every group, at every moment
//!   between operations (checked by `check_accounting` in tests).
//! - In the committed state the free space tree of a group lists exactly `free ∪ pinned` of that
//!   group (pinned ranges are free on disk once the commit lands), in extent or bitmap form
//!   chosen by the kernel's thresholds (`set_free_space_tree_thresholds`) with its hysteresis.

use crate::ctree::{RootPtr, TreeIter};
use crate::disk_io::BlockReader;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use ubtrfs_format::bytes::u32_at;
use ubtrfs_format::items::{bg_flags, BlockGroupItem};
use ubtrfs_format::key::{item, Key};

/// `BTRFS_FREE_SPACE_USING_BITMAPS`.
pub const FREE_SPACE_USING_BITMAPS: u32 = 1;
/// `BTRFS_FREE_SPACE_BITMAP_BITS`: sectors covered by one bitmap item.
pub const FREE_SPACE_BITMAP_BITS: u64 = 256 * 8;

/// The logical ranges of a chunk that hold superblock copies (`btrfs_rmap_block` for every
/// mirror offset, one 64 KiB stripe each, clipped to the chunk).
pub fn super_stripes(logical: u64, chunk: &ubtrfs_format::items::ChunkItem) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let profile = chunk.chunk_type & bg_flags::PROFILE_MASK;
    let per_stripe = match profile {
        bg_flags::RAID0 | bg_flags::RAID10 | bg_flags::RAID5 | bg_flags::RAID6 => return out, // not written
        _ => chunk.length,
    };
    for m in 0..ubtrfs_format::super_block::SUPER_MIRROR_MAX {
        let off = ubtrfs_format::super_block::sb_offset(m);
        for st in &chunk.stripes {
            if off >= st.offset && off < st.offset + per_stripe {
                let l = logical + (off - st.offset);
                let len = chunk.stripe_len.min(logical + chunk.length - l);
                if !out.contains(&(l, len)) {
                    out.push((l, len));
                }
            }
        }
    }
    out
}

/// One block group.
#[derive(Clone, Debug)]
pub struct BlockGroup {
    pub start: u64,
    pub length: u64,
    pub flags: u64,
    pub used: u64,
    /// start -> length, coalesced.
    pub free: BTreeMap<u64, u64>,
    /// Ranges freed in the running transaction.
    pub pinned: BTreeMap<u64, u64>,
    /// Data extents reserved for a writeback whose data I/O is in flight: not free, not yet
    /// used (no extent item); the free space tree still lists them free, as the kernel's does
    /// until the ref is added (`btrfs_add_reserved_bytes`).
    pub reserved: BTreeMap<u64, u64>,
    /// The free space tree currently stores this group as bitmaps.
    pub fst_bitmaps: bool,
    /// Changed in the running transaction (item and free space tree need rewriting).
    pub dirty: bool,
}

fn range_insert(map: &mut BTreeMap<u64, u64>, start: u64, len: u64) {
    let mut s = start;
    let mut e = start + len;
    if let Some((&ps, &pl)) = map.range(..=s).next_back() {
        if ps + pl >= s {
            s = ps;
            e = e.max(ps + pl);
            map.remove(&ps);
        }
    }
    while let Some((&ns, &nl)) = map.range(s..).next() {
        if ns > e {
            break;
        }
        e = e.max(ns + nl);
        map.remove(&ns);
    }
    map.insert(s, e - s);
}

/// Remove `[start, start+len)` from `map`, which must contain it entirely.
fn range_remove(map: &mut BTreeMap<u64, u64>, start: u64, len: u64) -> bool {
    let Some((&fs, &fl)) = map.range(..=start).next_back() else {
        return false;
    };
    if fs + fl < start + len {
        return false;
    }
    map.remove(&fs);
    if fs < start {
        map.insert(fs, start - fs);
    }
    if start + len < fs + fl {
        map.insert(start + len, fs + fl - (start + len));
    }
    true
}

impl BlockGroup {
    pub fn is_data(&self) -> bool {
        self.flags & bg_flags::DATA != 0
    }
    pub fn is_metadata(&self) -> bool {
        self.flags & bg_flags::METADATA != 0
    }
    pub fn is_system(&self) -> bool {
        self.flags & bg_flags::SYSTEM != 0
    }

    /// Remove a superblock copy's range from the free space of a new group
    /// (`exclude_super_stripes`).
    pub fn exclude(&mut self, start: u64, len: u64) {
        let mut carve = Vec::new();
        for (&s, &l) in &self.free {
            let lo = s.max(start);
            let hi = (s + l).min(start + len);
            if lo < hi {
                carve.push((lo, hi - lo));
            }
        }
        for (s, l) in carve {
            range_remove(&mut self.free, s, l);
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// `set_free_space_tree_thresholds`: (high, low) extent counts for the bitmap conversion.
    pub fn bitmap_thresholds(&self, sectorsize: u32) -> (u64, u64) {
        let range = u64::from(sectorsize) * FREE_SPACE_BITMAP_BITS;
        let num_bitmaps = self.length.div_ceil(range);
        let bitmap_size = 25 + 256u64;
        let high = num_bitmaps * bitmap_size / 25;
        let low = high.saturating_sub(100);
        (high, if high > 100 { low } else { 0 })
    }

    /// What the free space tree must list for this group after commit: free ∪ pinned ∪
    /// reserved (extents of in-flight writeback have no extent item yet).
    pub fn committed_free(&self) -> BTreeMap<u64, u64> {
        let mut m = self.free.clone();
        for (&s, &l) in self.pinned.iter().chain(&self.reserved) {
            range_insert(&mut m, s, l);
        }
        m
    }

    /// First fit of `len` bytes aligned to `align` at or after `hint`, wrapping once.
    fn find_free(&self, len: u64, align: u64, hint: u64) -> Option<u64> {
        let fit = |s: u64, l: u64| -> Option<u64> {
            let a = s.div_ceil(align) * align;
            (a + len <= s + l).then_some(a)
        };
        for (&s, &l) in self.free.range(..) {
            if s + l <= hint {
                continue;
            }
            let s2 = s.max(hint);
            if let Some(a) = fit(s2, s + l - s2) {
                return Some(a);
            }
        }
        for (&s, &l) in &self.free {
            if s >= hint {
                break;
            }
            if let Some(a) = fit(s, l) {
                return Some(a);
            }
        }
        None
    }

    /// The largest free run (for allocations that may be split).
    fn largest_free(&self, align: u64) -> Option<(u64, u64)> {
        self.free
            .iter()
            .map(|(&s, &l)| {
                let a = s.div_ceil(align) * align;
                (a, (s + l).saturating_sub(a) / align * align)
            })
            .max_by_key(|&(_, l)| l)
    }
}

/// All block groups and the allocation cursors.
#[derive(Debug, Default)]
pub struct SpaceInfo {
    pub groups: BTreeMap<u64, BlockGroup>,
    pub sectorsize: u32,
    pub nodesize: u32,
    meta_hint: u64,
    data_hint: u64,
    /// Data extents claimed during a log replay (so that several logged items of one extent
    /// claim it once).
    claimed: std::collections::BTreeSet<(u64, u64)>,
}

/// Which block group type an allocation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Data,
    Metadata,
    System,
}

impl SpaceInfo {
    /// Load block groups (block-group tree or extent tree) and their free space (free space
    /// tree). Every chunk must have its block group item.
    pub fn load(reader: &BlockReader, bg_root: &RootPtr, fst_root: &RootPtr) -> Result<SpaceInfo> {
        let mut sp = SpaceInfo {
            sectorsize: reader.sectorsize,
            nodesize: reader.nodesize,
            ..Default::default()
        };
        let chunks: Vec<_> = reader.chunks().iter().cloned().collect();
        for c in &chunks {
            let key = Key::new(c.logical, item::BLOCK_GROUP_ITEM, c.item.length);
            let data = crate::ctree::lookup_item(reader, bg_root, &key)?.ok_or_else(|| {
                Error::corrupt(format!("chunk {} has no block group item", c.logical))
            })?;
            let bg = BlockGroupItem::parse(&data)
                .map_err(|e| Error::format(format!("block group {key:?}"), e))?;
            if bg.flags != c.item.chunk_type || bg.used > c.item.length {
                return Err(Error::corrupt(format!(
                    "block group {}: flags {:#x} used {} do not match chunk type {:#x} length {}",
                    c.logical, bg.flags, bg.used, c.item.chunk_type, c.item.length
                )));
            }
            sp.groups.insert(
                c.logical,
                BlockGroup {
                    start: c.logical,
                    length: c.item.length,
                    flags: bg.flags,
                    used: bg.used,
                    free: BTreeMap::new(),
                    pinned: BTreeMap::new(),
                    reserved: BTreeMap::new(),
                    fst_bitmaps: false,
                    dirty: false,
                },
            );
        }
        sp.load_free_space_tree(reader, fst_root)?;
        // The superblock copies are never free space, whatever the free space tree says
        // (mkfs.btrfs and the kernel list them inside free extents and skip them on load:
        // `exclude_super_stripes`).
        for c in &chunks {
            if let Some(g) = sp.groups.get_mut(&c.logical) {
                for (l, len) in super_stripes(c.logical, &c.item) {
                    g.exclude(l, len);
                }
            }
        }
        Ok(sp)
    }

    fn load_free_space_tree(&mut self, reader: &BlockReader, fst_root: &RootPtr) -> Result<()> {
        let ss = u64::from(self.sectorsize);
        for r in TreeIter::new(reader, *fst_root, Key::new(0, 0, 0)) {
            let (key, block, slot) = r?;
            let data = block
                .item_data(slot)
                .map_err(|e| Error::format("free space tree", e))?;
            let bad = |why: &str| Error::corrupt(format!("free space tree item {key:?}: {why}"));
            // Entries of block groups that no longer exist (mkfs.btrfs before 6.3 leaves the
            // ones of its temporary chunks behind) are ignored, as the kernel ignores them.
            let Some((_, bg)) = self.groups.range_mut(..=key.objectid).next_back() else {
                tracing::debug!("free space tree item {key:?} outside every block group: ignored");
                continue;
            };
            let end = bg.start + bg.length;
            if key.objectid >= end {
                tracing::debug!("free space tree item {key:?} outside every block group: ignored");
                continue;
            }
            match key.item_type {
                item::FREE_SPACE_INFO => {
                    if key.objectid != bg.start || key.offset != bg.length {
                        return Err(bad("does not match its block group"));
                    }
                    let flags = u32_at(data, 4, "free space info flags")
                        .map_err(|e| Error::format("fst", e))?;
                    bg.fst_bitmaps = flags & FREE_SPACE_USING_BITMAPS != 0;
                }
                item::FREE_SPACE_EXTENT => {
                    // Key offsets are disk data: the sum must not wrap.
                    if key.objectid.checked_add(key.offset).is_none_or(|e| e > end)
                        || key.offset == 0
                    {
                        return Err(bad("extent beyond its block group"));
                    }
                    range_insert(&mut bg.free, key.objectid, key.offset);
                }
                item::FREE_SPACE_BITMAP => {
                    if key.objectid.checked_add(key.offset).is_none_or(|e| e > end)
                        || key.offset % ss != 0
                    {
                        return Err(bad("bitmap beyond its block group"));
                    }
                    let bits = key.offset / ss;
                    if (data.len() as u64) < bits.div_ceil(8) {
                        return Err(bad("bitmap too short"));
                    }
                    let mut run: Option<u64> = None;
                    for i in 0..=bits {
                        let set = i < bits && data[(i / 8) as usize] & (1 << (i % 8)) != 0;
                        match (set, run) {
                            (true, None) => run = Some(i),
                            (false, Some(s)) => {
                                range_insert(&mut bg.free, key.objectid + s * ss, (i - s) * ss);
                                run = None;
                            }
                            _ => {}
                        }
                    }
                }
                _ => return Err(bad("unexpected item type")),
            }
        }
        Ok(())
    }

    fn kind_matches(bg: &BlockGroup, kind: AllocKind) -> bool {
        match kind {
            AllocKind::Data => bg.is_data(),
            AllocKind::Metadata => bg.is_metadata(),
            AllocKind::System => bg.is_system(),
        }
    }

    /// Allocate exactly `len` bytes (`find_free_extent`). None when no group has room.
    pub fn alloc(&mut self, kind: AllocKind, len: u64) -> Option<u64> {
        let align = u64::from(self.sectorsize);
        let hint = if kind == AllocKind::Data {
            self.data_hint
        } else {
            self.meta_hint
        };
        let order: Vec<u64> = self
            .groups
            .values()
            .filter(|g| Self::kind_matches(g, kind))
            .map(|g| g.start)
            .collect();
        for start in order {
            let bg = self.groups.get_mut(&start).expect("listed above");
            let h = if hint >= bg.start && hint < bg.start + bg.length {
                hint
            } else {
                bg.start
            };
            if let Some(a) = bg.find_free(len, align, h) {
                range_remove(&mut bg.free, a, len);
                bg.used += len;
                bg.dirty = true;
                if kind == AllocKind::Data {
                    self.data_hint = a + len;
                } else {
                    self.meta_hint = a + len;
                }
                return Some(a);
            }
        }
        None
    }

    /// Allocate up to `max` bytes (at least `min`) of data, for writes that may be split into
    /// several extents when free space is fragmented.
    pub fn alloc_data_upto(&mut self, min: u64, max: u64) -> Option<(u64, u64)> {
        if let Some(a) = self.alloc(AllocKind::Data, max) {
            return Some((a, max));
        }
        let align = u64::from(self.sectorsize);
        let best = self
            .groups
            .values()
            .filter(|g| g.is_data())
            .filter_map(|g| g.largest_free(align).map(|(s, l)| (g.start, s, l)))
            .max_by_key(|&(_, _, l)| l)?;
        let (gstart, s, l) = best;
        if l < min {
            return None;
        }
        let bg = self.groups.get_mut(&gstart).expect("found above");
        range_remove(&mut bg.free, s, l);
        bg.used += l;
        bg.dirty = true;
        self.data_hint = s + l;
        Some((s, l))
    }

    fn group_of(&mut self, start: u64, len: u64) -> Result<&mut BlockGroup> {
        let (_, bg) = self.groups.range_mut(..=start).next_back().ok_or_else(|| {
            Error::corrupt(format!("extent {start}+{len} outside every block group"))
        })?;
        // start and len can come from a damaged log tree's file extent items.
        if start
            .checked_add(len)
            .is_none_or(|end| end > bg.start + bg.length)
        {
            return Err(Error::corrupt(format!(
                "extent {start}+{len} crosses block group {}",
                bg.start
            )));
        }
        Ok(bg)
    }

    /// Reserve `len` bytes without accounting them as used (log tree blocks: they never get
    /// extent items; the free space tree keeps listing them as free).
    pub fn alloc_reserved(&mut self, kind: AllocKind, len: u64) -> Option<u64> {
        let a = self.alloc(kind, len)?;
        let bg = self.group_of(a, len).ok()?;
        bg.used -= len;
        Some(a)
    }

    /// Reserve exactly `[start, start+len)` without accounting it as used (the blocks of a log
    /// being replayed must not be handed out before the replay commits).
    pub fn claim_reserved(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        if !range_remove(&mut bg.free, start, len) {
            return Err(Error::corrupt(format!(
                "log block {start}+{len} is not free space"
            )));
        }
        Ok(())
    }

    /// A reserved range (log block) is released: pinned until the commit is durable, without
    /// touching `used`.
    pub fn release_reserved(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        range_insert(&mut bg.pinned, start, len);
        Ok(())
    }

    /// An extent the extent tree no longer references: pinned until commit.
    pub fn free_extent(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        bg.used = bg.used.checked_sub(len).ok_or_else(|| {
            Error::corrupt(format!(
                "block group {} used underflows freeing {start}+{len}",
                bg.start
            ))
        })?;
        range_insert(&mut bg.pinned, start, len);
        bg.dirty = true;
        Ok(())
    }

    /// Mark `[start, start+len)` used although it was not handed out by `alloc` (log replay of
    /// extents the log references, or an extent whose allocation is being recorded). Fails if
    /// any part is not free.
    pub fn claim(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        if !range_remove(&mut bg.free, start, len) {
            return Err(Error::corrupt(format!("claiming {start}+{len}: not free")));
        }
        bg.used += len;
        bg.dirty = true;
        Ok(())
    }

    pub fn is_claimed(&self, start: u64, len: u64) -> bool {
        self.claimed.contains(&(start, len))
    }
    pub fn mark_claimed(&mut self, start: u64, len: u64) {
        self.claimed.insert((start, len));
    }
    pub fn clear_claimed(&mut self) {
        self.claimed.clear();
    }

    /// Move `[start, start+len)`, just allocated by [`SpaceInfo::alloc`] or
    /// [`SpaceInfo::alloc_data_upto`], from used to reserved (`btrfs_reserve_extent` for a
    /// writeback: the extent item comes when the data is on disk).
    pub fn to_reserved(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        bg.used = bg
            .used
            .checked_sub(len)
            .ok_or_else(|| Error::corrupt(format!("reserving {start}+{len}: not allocated")))?;
        range_insert(&mut bg.reserved, start, len);
        Ok(())
    }

    /// A reserved extent gets its extent item: it becomes used
    /// (`btrfs_alloc_reserved_file_extent`).
    pub fn use_reserved(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        if !range_remove(&mut bg.reserved, start, len) {
            return Err(Error::corrupt(format!(
                "extent {start}+{len} is not reserved"
            )));
        }
        bg.used += len;
        bg.dirty = true;
        Ok(())
    }

    /// A reserved extent is not used after all (its data write failed): free again
    /// (`btrfs_free_reserved_extent`).
    pub fn free_reserved(&mut self, start: u64, len: u64) -> Result<()> {
        let bg = self.group_of(start, len)?;
        if !range_remove(&mut bg.reserved, start, len) {
            return Err(Error::corrupt(format!(
                "extent {start}+{len} is not reserved"
            )));
        }
        range_insert(&mut bg.free, start, len);
        bg.dirty = true;
        Ok(())
    }

    /// After a durable commit: pinned space becomes free (`btrfs_finish_extent_commit`).
    pub fn unpin_all(&mut self) {
        for bg in self.groups.values_mut() {
            let pinned = std::mem::take(&mut bg.pinned);
            for (s, l) in pinned {
                range_insert(&mut bg.free, s, l);
            }
        }
    }

    /// Free (allocatable now) and pinned bytes over the groups of `kind`.
    pub fn free_pinned(&self, kind: AllocKind) -> (u64, u64) {
        let mut free = 0;
        let mut pinned = 0;
        for g in self.groups.values().filter(|g| Self::kind_matches(g, kind)) {
            free += g.free_bytes();
            pinned += g.pinned.values().sum::<u64>();
        }
        (free, pinned)
    }

    /// Sum of `used` over every group (the superblock's bytes_used).
    pub fn bytes_used(&self) -> u64 {
        self.groups.values().map(|g| g.used).sum()
    }

    /// Test helper: the accounting invariant of every group, given the bytes of superblock
    /// copies inside each group.
    pub fn check_accounting(&self, sb_bytes: impl Fn(&BlockGroup) -> u64) -> Result<()> {
        for g in self.groups.values() {
            let pinned: u64 = g.pinned.values().sum::<u64>() + g.reserved.values().sum::<u64>();
            let total = g.used + g.free_bytes() + pinned + sb_bytes(g);
            if total != g.length {
                return Err(Error::corrupt(format!(
                    "block group {}: used {} + free {} + pinned {pinned} + sb != length {}",
                    g.start,
                    g.used,
                    g.free_bytes(),
                    g.length
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(len: u64) -> BlockGroup {
        let mut free = BTreeMap::new();
        free.insert(1 << 20, len);
        BlockGroup {
            start: 1 << 20,
            length: len,
            flags: bg_flags::DATA,
            used: 0,
            free,
            pinned: BTreeMap::new(),
            reserved: BTreeMap::new(),
            fst_bitmaps: false,
            dirty: false,
        }
    }

    // Test scenario: ranges coalesce on insert and split on remove.
    #[test]
    fn ranges() {
        let mut m = BTreeMap::new();
        range_insert(&mut m, 0, 10);
        range_insert(&mut m, 20, 10);
        range_insert(&mut m, 10, 10);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(0, 30)]);
        let mut m = BTreeMap::new();
        range_insert(&mut m, 0, 100);
        assert!(range_remove(&mut m, 40, 20));
        assert_eq!(
            m.clone().into_iter().collect::<Vec<_>>(),
            vec![(0, 40), (60, 40)]
        );
        assert!(!range_remove(&mut m, 30, 20));
    }

    // Test scenario: allocations come from free space, frees are pinned until unpin, and the
    // accounting invariant holds throughout.
    #[test]
    fn alloc_free_pin() {
        let mut sp = SpaceInfo {
            sectorsize: 4096,
            nodesize: 16384,
            ..Default::default()
        };
        sp.groups.insert(1 << 20, group(8 << 20));
        let a = sp.alloc(AllocKind::Data, 1 << 20).unwrap();
        let b = sp.alloc(AllocKind::Data, 4096).unwrap();
        assert_ne!(a, b);
        sp.check_accounting(|_| 0).unwrap();
        sp.free_extent(a, 1 << 20).unwrap();
        sp.check_accounting(|_| 0).unwrap();
        // Pinned space is not reused before commit.
        let c = sp.alloc(AllocKind::Data, 6 << 20);
        assert!(c.is_none() || c.unwrap() >= a + (1 << 20));
        sp.unpin_all();
        sp.check_accounting(|_| 0).unwrap();
        assert!(sp.alloc(AllocKind::Metadata, 4096).is_none());
        assert!(sp.free_extent(0, 4096).is_err());
    }

    // Test scenario: the bitmap thresholds of an 8 MiB, 1 GiB and 10 GiB group match the
    // kernel's formula (one bitmap item per 8 MiB with 4 KiB sectors).
    #[test]
    fn thresholds() {
        let mut g = group(1 << 30);
        assert_eq!(
            g.bitmap_thresholds(4096),
            (128 * 281 / 25, 128 * 281 / 25 - 100)
        );
        g.length = 8 << 20;
        assert_eq!(g.bitmap_thresholds(4096), (11, 0));
    }
}
