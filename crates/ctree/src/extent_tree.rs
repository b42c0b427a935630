//! Extent-tree back references (the kernel's delayed-ref.c and the reference half of
//! extent-tree.c: `run_delayed_refs`, `__btrfs_inc_extent_ref`, `__btrfs_free_extent`).
//!
//! # Definitions
//! - A *delayed ref* records that a tree block or data extent gained or lost one reference
//!   during the running transaction. They are applied to the extent tree at commit, net of each
//!   other (an allocation and a free of the same block in one transaction cancel out).
//! - Tree blocks carry skinny METADATA_ITEMs (key: bytenr, METADATA_ITEM, level) with one inline
//!   TREE_BLOCK_REF naming the owner tree. Data extents carry EXTENT_ITEMs (key: bytenr,
//!   EXTENT_ITEM, length) with EXTENT_DATA_REFs (root, inode, file offset - extent offset, count),
//!   inline while the item stays under `BTRFS_MAX_EXTENT_ITEM_SIZE`, keyed beyond that.
//!
//! # Invariants (what `btrfs check` verifies)
//! - `refs` of an extent item equals the sum of its inline and keyed reference counts.
//! - Inline refs are ordered by type ascending, then by sequence descending (the data-ref
//!   hash for EXTENT_DATA_REF) — `sort_inline_refs`.
//! - An extent whose last reference goes away loses its item and, for data, its checksums, and
//!   its space is pinned; its block group's `used` shrinks by its length.
//! - Shared (snapshot) tree blocks are refused, never half-updated: a tree block with more than
//!   one reference or a FULL_BACKREF flag makes the operation fail with `Unsupported`.

use crate::block_group::SpaceInfo;
use crate::cow::{TreeAlloc, TreeWriter};
use crate::ctree::{lookup_item, RootPtr};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use ubtrfs_format::extent_items::{
    extent_flags, sort_inline_refs, ExtentDataRef, ExtentItem, ExtentRecord, InlineRef,
};
use ubtrfs_format::key::{item, objectid, Key};
use ubtrfs_format::tree_block::HEADER_SIZE;

/// What a reference points from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefKind {
    /// A tree block of tree `root` at `level`.
    Tree { root: u64, level: u8 },
    /// File data of (root, inode, offset - extent offset).
    Data { root: u64, ino: u64, offset: u64 },
}

/// Pending reference changes of the running transaction.
#[derive(Debug, Default)]
pub struct DelayedRefs {
    /// (bytenr, kind) -> (num_bytes, net delta)
    refs: BTreeMap<(u64, RefKind), (u64, i64)>,
    /// Reference changes recorded since the transaction started (never decreases; lets a
    /// write operation tell whether it changed anything before failing).
    adds: u64,
}

impl DelayedRefs {
    /// Record a reference change. Entries that net out to zero are kept: a data extent
    /// allocated and wholly dropped in the same transaction has no extent item to update, but
    /// its space and checksums must still be released at commit.
    pub fn add(&mut self, bytenr: u64, num_bytes: u64, kind: RefKind, delta: i64) {
        let e = self.refs.entry((bytenr, kind)).or_insert((num_bytes, 0));
        e.1 += delta;
        self.adds += 1;
    }

    /// Reference changes recorded so far (see `adds`).
    pub fn adds(&self) -> u64 {
        self.adds
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Bytes of data extents losing references (an upper bound of the data space that running
    /// the refs may free).
    pub fn data_drops(&self) -> u64 {
        self.refs
            .iter()
            .filter(|((_, k), (_, d))| matches!(k, RefKind::Data { .. }) && *d < 0)
            .map(|(_, (n, _))| *n)
            .sum()
    }

    /// The pending changes of extent `bytenr` that do not net out to zero (the kernel merges
    /// an add and a drop of the same reference into nothing: `insert_delayed_ref` drops a
    /// node whose `ref_mod` reaches zero).
    pub fn pending_of(&self, bytenr: u64) -> impl Iterator<Item = (RefKind, i64)> + '_ {
        self.refs
            .range((bytenr, RefKind::Tree { root: 0, level: 0 })..)
            .take_while(move |((b, _), _)| *b == bytenr)
            .filter(|(_, (_, d))| *d != 0)
            .map(|((_, k), (_, d))| (*k, *d))
    }

    fn take(&mut self) -> BTreeMap<(u64, RefKind), (u64, i64)> {
        std::mem::take(&mut self.refs)
    }
}

/// The allocator the tree writer uses inside a transaction: metadata space from the block
/// groups, a delayed ref for every block allocated or freed.
pub struct TransAlloc<'a> {
    pub space: &'a mut SpaceInfo,
    pub refs: &'a mut DelayedRefs,
    pub nodesize: u32,
    /// Net bytes of tree blocks added per tree (`root_add_used_bytes` / `root_sub_used_bytes`:
    /// a COW adds one block and frees one, a split adds one, a merge frees one).
    pub used: &'a mut BTreeMap<u64, i64>,
}

impl TreeAlloc for TransAlloc<'_> {
    fn alloc_tree_block(&mut self, owner: u64, level: u8) -> Result<u64> {
        let kind = if owner == objectid::CHUNK_TREE {
            crate::block_group::AllocKind::System
        } else {
            crate::block_group::AllocKind::Metadata
        };
        let n = u64::from(self.nodesize);
        let bytenr = self
            .space
            .alloc(kind, n)
            .ok_or_else(|| Error::NoSpace(format!("tree block for tree {owner}")))?;
        self.refs
            .add(bytenr, n, RefKind::Tree { root: owner, level }, 1);
        *self.used.entry(owner).or_insert(0) += i64::from(self.nodesize);
        Ok(bytenr)
    }

    fn free_tree_block(&mut self, bytenr: u64, owner: u64, level: u8) {
        *self.used.entry(owner).or_insert(0) -= i64::from(self.nodesize);
        self.refs.add(
            bytenr,
            u64::from(self.nodesize),
            RefKind::Tree { root: owner, level },
            -1,
        );
    }
}

/// `BTRFS_MAX_EXTENT_ITEM_SIZE`: inline refs are used while the item stays within this.
pub fn max_extent_item_size(nodesize: u32) -> usize {
    (nodesize as usize - HEADER_SIZE) / 16 - 25
}

/// Apply every pending delayed ref to the extent tree. Changing the extent tree allocates and
/// frees tree blocks, which queue more refs; the caller loops until none are left.
/// `csum_root` loses the checksums of data extents that are freed.
pub fn run_delayed_refs<A: TreeAlloc>(
    w: &mut TreeWriter<'_, A>,
    pending: &mut DelayedRefs,
    extent_root: &mut RootPtr,
    csum_root: &mut RootPtr,
    freed: &mut Vec<(u64, u64)>,
) -> Result<bool> {
    let batch = pending.take();
    if batch.is_empty() {
        return Ok(false);
    }
    let transid = w.transid;
    let nodesize = w.template.nodesize;
    // Group by extent.
    let mut by_extent: BTreeMap<u64, Vec<(RefKind, u64, i64)>> = BTreeMap::new();
    for ((bytenr, kind), (num_bytes, delta)) in batch {
        by_extent
            .entry(bytenr)
            .or_default()
            .push((kind, num_bytes, delta));
    }
    for (bytenr, mut changes) in by_extent {
        // Data extents whose every reference change nets to zero: if no extent item exists,
        // the extent was allocated in this transaction and dropped again before commit (a
        // file written and deleted, or rewritten, in one transaction). Nothing references it:
        // free the space and the checksums written for it.
        let all_data_zero = changes
            .iter()
            .all(|(k, _, d)| *d == 0 && matches!(k, RefKind::Data { .. }));
        if all_data_zero {
            let num_bytes = changes[0].1;
            let key = Key::new(bytenr, item::EXTENT_ITEM, num_bytes);
            if lookup_item(w.reader, extent_root, &key)?.is_none() {
                delete_csums(w, csum_root, bytenr, num_bytes)?;
                freed.push((bytenr, num_bytes));
            }
            continue;
        }
        // Additions before drops, so that an extent changing owners within the transaction
        // never looks unreferenced in between.
        changes.sort_by_key(|(_, _, d)| std::cmp::Reverse(*d));
        for (kind, num_bytes, delta) in changes {
            match kind {
                RefKind::Tree { root, level } => {
                    run_tree_ref(w, extent_root, bytenr, root, level, delta, transid, freed)?;
                }
                RefKind::Data { root, ino, offset } => {
                    if delta != 0 {
                        run_data_ref(
                            w,
                            extent_root,
                            csum_root,
                            bytenr,
                            num_bytes,
                            root,
                            ino,
                            offset,
                            delta,
                            transid,
                            nodesize,
                            freed,
                        )?;
                    }
                }
            }
        }
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn run_tree_ref<A: TreeAlloc>(
    w: &mut TreeWriter<'_, A>,
    extent_root: &mut RootPtr,
    bytenr: u64,
    root: u64,
    level: u8,
    delta: i64,
    transid: u64,
    freed: &mut Vec<(u64, u64)>,
) -> Result<()> {
    let n = u64::from(w.template.nodesize);
    let key = Key::new(bytenr, item::METADATA_ITEM, u64::from(level));
    match delta {
        0 => {
            // Allocated and freed within this transaction: no item ever existed.
            freed.push((bytenr, n));
            Ok(())
        }
        1 => {
            let rec = ExtentRecord::skinny_tree_block(root, transid);
            w.insert_item(extent_root, key, &rec.to_bytes())
        }
        -1 => {
            let data = lookup_item(w.reader, extent_root, &key)?.ok_or_else(|| {
                Error::corrupt(format!(
                    "freeing tree block {bytenr} (tree {root} level {level}): no METADATA_ITEM"
                ))
            })?;
            let rec = ExtentRecord::parse(&data, item::METADATA_ITEM)
                .map_err(|e| Error::format(format!("extent item of tree block {bytenr}"), e))?;
            if rec.item.refs != 1
                || rec.item.flags & extent_flags::FULL_BACKREF != 0
                || rec.inline_refs != vec![InlineRef::TreeBlock { root }]
            {
                return Err(Error::Unsupported(format!(
                    "tree block {bytenr} is shared (refs {}, flags {:#x}): snapshots are not supported for writing",
                    rec.item.refs, rec.item.flags
                )));
            }
            w.delete_item(extent_root, &key)?;
            freed.push((bytenr, n));
            Ok(())
        }
        d => Err(Error::corrupt(format!(
            "tree block {bytenr}: net reference change {d} in one transaction"
        ))),
    }
}

/// Find the keyed EXTENT_DATA_REF item of `r` (hash collisions probe the next offsets).
fn find_keyed_data_ref<A: TreeAlloc>(
    w: &TreeWriter<'_, A>,
    extent_root: &RootPtr,
    bytenr: u64,
    r: &ExtentDataRef,
) -> Result<Option<(Key, ExtentDataRef)>> {
    let mut off = r.hash();
    for _ in 0..64 {
        let key = Key::new(bytenr, item::EXTENT_DATA_REF, off);
        match lookup_item(w.reader, extent_root, &key)? {
            None => return Ok(None),
            Some(d) => {
                let k = ExtentDataRef::parse(&d, 0)
                    .map_err(|e| Error::format(format!("{key:?}"), e))?;
                if k.root == r.root && k.objectid == r.objectid && k.offset == r.offset {
                    return Ok(Some((key, k)));
                }
                off = off.wrapping_add(1);
            }
        }
    }
    Err(Error::corrupt(format!(
        "extent {bytenr}: too many data ref hash collisions"
    )))
}

#[allow(clippy::too_many_arguments)]
fn run_data_ref<A: TreeAlloc>(
    w: &mut TreeWriter<'_, A>,
    extent_root: &mut RootPtr,
    csum_root: &mut RootPtr,
    bytenr: u64,
    num_bytes: u64,
    root: u64,
    ino: u64,
    offset: u64,
    delta: i64,
    transid: u64,
    nodesize: u32,
    freed: &mut Vec<(u64, u64)>,
) -> Result<()> {
    let key = Key::new(bytenr, item::EXTENT_ITEM, num_bytes);
    let probe = ExtentDataRef {
        root,
        objectid: ino,
        offset,
        count: 0,
    };
    let existing = lookup_item(w.reader, extent_root, &key)?;
    let mut rec = match existing {
        Some(d) => ExtentRecord::parse(&d, item::EXTENT_ITEM)
            .map_err(|e| Error::format(format!("{key:?}"), e))?,
        None => {
            if delta < 0 {
                return Err(Error::corrupt(format!(
                    "dropping a reference of data extent {bytenr}+{num_bytes}: no extent item"
                )));
            }
            ExtentRecord {
                item: ExtentItem {
                    refs: 0,
                    generation: transid,
                    flags: extent_flags::DATA,
                },
                tree_block_info: None,
                inline_refs: Vec::new(),
            }
        }
    };
    let is_new = rec.item.refs == 0;
    let new_refs = rec.item.refs as i64 + delta;
    if new_refs < 0 {
        return Err(Error::corrupt(format!(
            "data extent {bytenr}: refs would go below zero"
        )));
    }
    // Inline ref of this (root, ino, offset)?
    let pos = rec.inline_refs.iter().position(|r| {
        matches!(r, InlineRef::ExtentData(d) if d.root == root && d.objectid == ino && d.offset == offset)
    });
    let mut keyed_change: Option<i64> = None;
    match pos {
        Some(i) => {
            let InlineRef::ExtentData(d) = &mut rec.inline_refs[i] else {
                unreachable!("matched above")
            };
            let c = i64::from(d.count) + delta;
            if c < 0 {
                return Err(Error::corrupt(format!(
                    "data extent {bytenr}: inline ref count below zero"
                )));
            }
            if c == 0 {
                rec.inline_refs.remove(i);
            } else {
                d.count = c as u32;
            }
        }
        None => {
            let inline = InlineRef::ExtentData(ExtentDataRef {
                count: delta.max(0) as u32,
                ..probe
            });
            if delta > 0
                && rec.size() + inline.size() <= max_extent_item_size(nodesize)
                && find_keyed_data_ref(w, extent_root, bytenr, &probe)?.is_none()
            {
                rec.inline_refs.push(inline);
                sort_inline_refs(&mut rec.inline_refs);
            } else {
                keyed_change = Some(delta);
            }
        }
    }
    if let Some(d) = keyed_change {
        match find_keyed_data_ref(w, extent_root, bytenr, &probe)? {
            Some((k, mut r)) => {
                let c = i64::from(r.count) + d;
                if c < 0 {
                    return Err(Error::corrupt(format!(
                        "data extent {bytenr}: keyed ref count below zero"
                    )));
                }
                if c == 0 {
                    w.delete_item(extent_root, &k)?;
                } else {
                    r.count = c as u32;
                    w.update_item(extent_root, &k, &r.to_bytes())?;
                }
            }
            None => {
                if d < 0 {
                    return Err(Error::corrupt(format!(
                        "data extent {bytenr}: dropping a reference it does not have"
                    )));
                }
                // Free key offset at or after the hash.
                let mut off = probe.hash();
                loop {
                    let k = Key::new(bytenr, item::EXTENT_DATA_REF, off);
                    if lookup_item(w.reader, extent_root, &k)?.is_none() {
                        let r = ExtentDataRef {
                            count: d as u32,
                            ..probe
                        };
                        w.insert_item(extent_root, k, &r.to_bytes())?;
                        break;
                    }
                    off = off.wrapping_add(1);
                }
            }
        }
    }
    rec.item.refs = new_refs as u64;
    if new_refs == 0 {
        if !is_new {
            w.delete_item(extent_root, &key)?;
        }
        delete_csums(w, csum_root, bytenr, num_bytes)?;
        freed.push((bytenr, num_bytes));
        return Ok(());
    }
    if is_new {
        w.insert_item(extent_root, key, &rec.to_bytes())
    } else {
        w.update_item(extent_root, &key, &rec.to_bytes())
    }
}

/// `btrfs_cross_ref_exist`: whether data extent `bytenr` may be referenced by anything but
/// (root, ino, offset) (`offset` = file offset - extent offset), so that a NOCOW write into it
/// must COW instead. Two halves, as in the kernel:
/// - `check_committed_ref` on the extent tree as the running transaction sees it: shared
///   unless the EXTENT_ITEM has exactly one inline reference (after a simple-quota owner ref),
///   an EXTENT_DATA_REF of (root, ino, offset) holding every one of the item's `refs`, and,
///   unless `strict`, a generation after the root's `last_snapshot`. No item at all (an extent
///   of the running transaction whose refs are still delayed) is not an answer by itself.
/// - `check_delayed_ref`: shared if a pending (delayed) reference change of the extent is
///   anything but a data ref of (root, ino, offset).
///
/// A SHARED_DATA_REF (full backref) always counts as shared.
#[allow(clippy::too_many_arguments)]
pub fn btrfs_cross_ref_exist(
    reader: &crate::disk_io::BlockReader,
    extent_root: &RootPtr,
    pending: &DelayedRefs,
    root: u64,
    ino: u64,
    offset: u64,
    bytenr: u64,
    strict: bool,
    last_snapshot: u64,
) -> Result<bool> {
    let found = crate::ctree::lookup_le(
        reader,
        extent_root,
        &Key::new(bytenr, item::EXTENT_ITEM, u64::MAX),
    )?;
    if let Some((key, data)) = found {
        if key.objectid == bytenr && key.item_type == item::EXTENT_ITEM {
            let rec = ExtentRecord::parse(&data, item::EXTENT_ITEM)
                .map_err(|e| Error::format(format!("extent item {key:?}"), e))?;
            let mut refs = rec.inline_refs.as_slice();
            if let [InlineRef::Owner { .. }, rest @ ..] = refs {
                refs = rest;
            }
            let [only] = refs else {
                return Ok(true);
            };
            if !strict && rec.item.generation <= last_snapshot {
                return Ok(true);
            }
            let InlineRef::ExtentData(d) = only else {
                return Ok(true);
            };
            if rec.item.refs != u64::from(d.count)
                || d.root != root
                || d.objectid != ino
                || d.offset != offset
            {
                return Ok(true);
            }
        }
    }
    for (kind, _) in pending.pending_of(bytenr) {
        match kind {
            RefKind::Data {
                root: r,
                ino: i,
                offset: o,
            } if r == root && i == ino && o == offset => {}
            _ => return Ok(true),
        }
    }
    Ok(false)
}

/// `btrfs_del_csums`: remove the checksums of `[bytenr, bytenr+len)`, splitting items at the
/// edges.
pub fn delete_csums<A: TreeAlloc>(
    w: &mut TreeWriter<'_, A>,
    csum_root: &mut RootPtr,
    bytenr: u64,
    len: u64,
) -> Result<()> {
    let ss = u64::from(w.reader.sectorsize);
    let csize = w.reader.csum_type.size() as u64;
    let end = bytenr + len;
    loop {
        // The last csum item starting before `end`.
        let probe = Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, end - 1);
        let Some((k, d)) = crate::ctree::lookup_le(w.reader, csum_root, &probe)? else {
            return Ok(());
        };
        if k.objectid != objectid::EXTENT_CSUM || k.item_type != item::EXTENT_CSUM {
            return Ok(());
        }
        let item_end = k.offset + d.len() as u64 / csize * ss;
        if item_end <= bytenr {
            return Ok(());
        }
        // Overlap [lo, hi).
        let lo = k.offset.max(bytenr);
        let hi = item_end.min(end);
        w.delete_item(csum_root, &k)?;
        if k.offset < lo {
            let n = ((lo - k.offset) / ss * csize) as usize;
            w.insert_item(csum_root, k, &d[..n])?;
        }
        if hi < item_end {
            let from = ((hi - k.offset) / ss * csize) as usize;
            w.insert_item(
                csum_root,
                Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, hi),
                &d[from..],
            )?;
        }
        if k.offset <= bytenr {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: a data extent referenced and dropped within one transaction keeps its
    // (net zero) delayed ref, so that commit can release the space and checksums; before the fix
    // the entry vanished and the allocation leaked (block group `used` and csum items stayed).
    #[test]
    fn net_zero_data_ref_is_kept() {
        let mut refs = DelayedRefs::default();
        let kind = RefKind::Data {
            root: 5,
            ino: 257,
            offset: 0,
        };
        refs.add(1 << 20, 4096, kind, 1);
        refs.add(1 << 20, 4096, kind, -1);
        assert!(!refs.is_empty());
        let batch = refs.take();
        assert_eq!(batch.get(&(1 << 20, kind)), Some(&(4096, 0)));
    }

    // Test scenario: what check_delayed_ref sees of an extent: only its own pending changes,
    // tree and data alike, and none that net out to zero (the kernel drops such a node).
    #[test]
    fn pending_of_one_extent() {
        let mut refs = DelayedRefs::default();
        let mine = RefKind::Data {
            root: 5,
            ino: 257,
            offset: 0,
        };
        let other = RefKind::Data {
            root: 5,
            ino: 258,
            offset: 0,
        };
        refs.add(1 << 20, 4096, mine, 1);
        refs.add(1 << 20, 4096, other, 1);
        refs.add(1 << 20, 4096, other, -1);
        refs.add(2 << 20, 4096, other, 1);
        refs.add(
            (1 << 20) - 4096,
            4096,
            RefKind::Tree { root: 5, level: 0 },
            1,
        );
        let got: Vec<_> = refs.pending_of(1 << 20).collect();
        assert_eq!(got, vec![(mine, 1)]);
        assert_eq!(refs.pending_of(2 << 20).count(), 1);
        assert_eq!(refs.pending_of(3 << 20).count(), 0);
    }
}
