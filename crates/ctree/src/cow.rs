//! The write half of the kernel's ctree.c: copy-on-write B-tree modification.
//!
//! # Definitions
//! - A block is *dirty* when the running transaction created it (its generation is the
//!   transid); dirty blocks live in the [`BlockReader`] dirty overlay until commit writes them.
//! - *COW*: before a clean block is changed it is copied to a newly allocated address with the
//!   running transid, the parent pointer is switched to the copy, and the old block is handed to
//!   [`TreeAlloc::free_tree_block`] (the extent tree drops its reference at commit; the space is
//!   pinned until the commit is durable). A dirty block is changed in place.
//!
//! # Invariants (kept by every operation, checked by the tree-checker on write)
//! - Leaf items are in strictly ascending key order, their data packed from the end of the
//!   block without gaps; node pointers ascending; every parent key equals its child's first key
//!   and every parent pointer's generation equals the child's generation.
//! - No block other than a root is empty; a root node has at least two pointers (a root node
//!   left with one child is replaced by that child, as `balance_level` does).
//! - Only blocks on the path of a modification are COWed, each once per transaction.
//!
//! # Operations
//! [`TreeWriter::insert_item`], [`TreeWriter::delete_item`], [`TreeWriter::update_item`]
//! (same or different size), [`TreeWriter::create_root`]. Each searches with COW
//! (`btrfs_search_slot` with `cow = 1`), changes the leaf, splits on overflow (`split_leaf`,
//! `split_node`, growing the root), and on deletion frees empty blocks, merges underfull leaves
//! and nodes into a neighbour (`push_leaf_left/right`, `balance_level`) and fixes parent keys
//! (`fixup_low_keys`).

use crate::ctree::RootPtr;
use crate::disk_io::{BlockExpect, BlockReader};
use crate::error::{Error, Result};
use std::sync::Arc;
use ubtrfs_format::bytes::{put_u32, put_u64};
use ubtrfs_format::key::Key;
use ubtrfs_format::tree_block::{
    Header, TreeBlock, BACKREF_REV_SHIFT, HEADER_FLAG_WRITTEN, HEADER_SIZE, ITEM_SIZE,
    KEY_PTR_SIZE, MIXED_BACKREF_REV,
};

/// Where new tree blocks come from and where freed ones go (the extent allocator).
pub trait TreeAlloc {
    /// Reserve a tree block for tree `owner` at `level`; returns its logical address.
    fn alloc_tree_block(&mut self, owner: u64, level: u8) -> Result<u64>;
    /// Tree `owner` no longer references the block at `bytenr`.
    fn free_tree_block(&mut self, bytenr: u64, owner: u64, level: u8);
}

/// What every new block header carries.
#[derive(Clone, Copy, Debug)]
pub struct BlockTemplate {
    pub nodesize: u32,
    pub fsid: [u8; 16],
    pub chunk_tree_uuid: [u8; 16],
}

/// Modifies trees within one transaction.
pub struct TreeWriter<'a, A: TreeAlloc> {
    pub reader: &'a BlockReader,
    pub alloc: &'a mut A,
    pub transid: u64,
    pub template: BlockTemplate,
}

/// A write path: (bytenr, slot) per level, leaf first. All blocks on it are dirty.
#[derive(Clone, Debug)]
struct WPath {
    nodes: Vec<(u64, usize)>,
}

// ---------------------------------------------------------------------------------------
// Raw block edits. They keep `header` and `data` consistent.

fn data_size(b: &TreeBlock) -> usize {
    b.data.len() - HEADER_SIZE
}

fn set_nritems(b: &mut TreeBlock, n: usize) {
    b.header.nritems = n as u32;
    put_u32(&mut b.data, 96, n as u32);
}

fn item_off(slot: usize) -> usize {
    HEADER_SIZE + slot * ITEM_SIZE
}

fn set_item(b: &mut TreeBlock, slot: usize, key: &Key, offset: u32, size: u32) {
    let o = item_off(slot);
    key.encode(&mut b.data, o);
    put_u32(&mut b.data, o + 17, offset);
    put_u32(&mut b.data, o + 21, size);
}

fn raw_item(b: &TreeBlock, slot: usize) -> (Key, u32, u32) {
    // Writers only call this on blocks they validated or built: slot < nritems.
    let it = b.item(slot).expect("slot inside a validated leaf");
    (it.key, it.offset, it.size)
}

/// Offset (from the end of the header) where the lowest item data starts.
fn leaf_data_start(b: &TreeBlock) -> usize {
    let n = b.nritems();
    if n == 0 {
        data_size(b)
    } else {
        raw_item(b, n - 1).1 as usize
    }
}

/// `btrfs_leaf_free_space`.
pub fn leaf_free_space(b: &TreeBlock) -> usize {
    leaf_data_start(b).saturating_sub(b.nritems() * ITEM_SIZE)
}

fn leaf_used(b: &TreeBlock) -> usize {
    data_size(b) - leaf_free_space(b)
}

/// Insert an item (header + data) at `slot`; the caller checked the space.
fn leaf_insert(b: &mut TreeBlock, slot: usize, key: &Key, data: &[u8]) {
    let n = b.nritems();
    let size = data.len();
    let end = if slot == 0 {
        data_size(b)
    } else {
        raw_item(b, slot - 1).1 as usize
    };
    let low = leaf_data_start(b);
    // Move the data of items slot..n down by `size`.
    if slot < n {
        b.data.copy_within(
            HEADER_SIZE + low..HEADER_SIZE + end,
            HEADER_SIZE + low - size,
        );
        for i in slot..n {
            let (k, off, sz) = raw_item(b, i);
            set_item(b, i, &k, off - size as u32, sz);
        }
        // Shift item headers right by one.
        b.data
            .copy_within(item_off(slot)..item_off(n), item_off(slot + 1));
    }
    let off = end - size;
    b.data[HEADER_SIZE + off..HEADER_SIZE + end].copy_from_slice(data);
    set_item(b, slot, key, off as u32, size as u32);
    set_nritems(b, n + 1);
}

/// Remove item `slot` from a leaf.
fn leaf_remove(b: &mut TreeBlock, slot: usize) {
    let n = b.nritems();
    let (_, off, size) = raw_item(b, slot);
    let (off, size) = (off as usize, size as usize);
    let low = leaf_data_start(b);
    if slot + 1 < n {
        // Data of items slot+1..n sits in [low, off): move it up by `size`.
        b.data.copy_within(
            HEADER_SIZE + low..HEADER_SIZE + off,
            HEADER_SIZE + low + size,
        );
        for i in slot + 1..n {
            let (k, o, sz) = raw_item(b, i);
            set_item(b, i, &k, o + size as u32, sz);
        }
        b.data
            .copy_within(item_off(slot + 1)..item_off(n), item_off(slot));
    }
    // Clear the freed header slot for tidiness (not required by the format).
    let last = item_off(n - 1);
    b.data[last..last + ITEM_SIZE].fill(0);
    set_nritems(b, n - 1);
}

fn ptr_off(slot: usize) -> usize {
    HEADER_SIZE + slot * KEY_PTR_SIZE
}

fn set_ptr(b: &mut TreeBlock, slot: usize, key: &Key, blockptr: u64, gen: u64) {
    let o = ptr_off(slot);
    key.encode(&mut b.data, o);
    put_u64(&mut b.data, o + 17, blockptr);
    put_u64(&mut b.data, o + 25, gen);
}

fn node_insert(b: &mut TreeBlock, slot: usize, key: &Key, blockptr: u64, gen: u64) {
    let n = b.nritems();
    if slot < n {
        b.data
            .copy_within(ptr_off(slot)..ptr_off(n), ptr_off(slot + 1));
    }
    set_ptr(b, slot, key, blockptr, gen);
    set_nritems(b, n + 1);
}

fn node_remove(b: &mut TreeBlock, slot: usize) {
    let n = b.nritems();
    if slot + 1 < n {
        b.data
            .copy_within(ptr_off(slot + 1)..ptr_off(n), ptr_off(slot));
    }
    let last = ptr_off(n - 1);
    b.data[last..last + KEY_PTR_SIZE].fill(0);
    set_nritems(b, n - 1);
}

fn node_key(b: &TreeBlock, slot: usize) -> Key {
    b.key_ptr(slot).expect("slot inside a validated node").key
}

fn node_child(b: &TreeBlock, slot: usize) -> (u64, u64) {
    let p = b.key_ptr(slot).expect("slot inside a validated node");
    (p.blockptr, p.generation)
}

fn first_key(b: &TreeBlock) -> Key {
    if b.is_leaf() {
        raw_item(b, 0).0
    } else {
        node_key(b, 0)
    }
}

/// In a node: the last pointer whose key is <= `key` (or 0).
fn node_search(b: &TreeBlock, key: &Key) -> usize {
    let (mut lo, mut hi) = (0, b.nritems());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if node_key(b, mid) <= *key {
            lo = mid + 1
        } else {
            hi = mid
        }
    }
    lo.saturating_sub(1)
}

fn max_ptrs(b: &TreeBlock) -> usize {
    data_size(b) / KEY_PTR_SIZE
}

/// Copy items [from..n) of `src` into the empty leaf `dst` (re-packed from the end).
fn leaf_move_tail(src: &mut TreeBlock, dst: &mut TreeBlock, from: usize) {
    let n = src.nritems();
    for i in from..n {
        let (k, off, sz) = raw_item(src, i);
        let d = src.data[HEADER_SIZE + off as usize..HEADER_SIZE + (off + sz) as usize].to_vec();
        let at = dst.nritems();
        leaf_insert(dst, at, &k, &d);
    }
    for i in (from..n).rev() {
        leaf_remove(src, i);
    }
}

impl<'a, A: TreeAlloc> TreeWriter<'a, A> {
    pub fn new(
        reader: &'a BlockReader,
        alloc: &'a mut A,
        transid: u64,
        template: BlockTemplate,
    ) -> Self {
        TreeWriter {
            reader,
            alloc,
            transid,
            template,
        }
    }

    fn read(&self, bytenr: u64) -> Result<Arc<TreeBlock>> {
        self.reader.read_tree_block(bytenr, BlockExpect::default())
    }

    fn get(&self, bytenr: u64) -> Arc<TreeBlock> {
        self.reader
            .dirty_get(bytenr)
            .expect("blocks on a write path are dirty")
    }

    fn modify<R>(&self, bytenr: u64, f: impl FnOnce(&mut TreeBlock) -> R) -> R {
        self.reader
            .dirty_modify(bytenr, f)
            .expect("blocks on a write path are dirty")
    }

    fn new_header(&self, bytenr: u64, owner: u64, level: u8) -> Header {
        Header {
            csum: [0; 32],
            fsid: self.template.fsid,
            bytenr,
            flags: HEADER_FLAG_WRITTEN | (MIXED_BACKREF_REV << BACKREF_REV_SHIFT),
            chunk_tree_uuid: self.template.chunk_tree_uuid,
            generation: self.transid,
            owner,
            nritems: 0,
            level,
        }
    }

    /// A new, empty, dirty block.
    fn alloc_block(&mut self, owner: u64, level: u8) -> Result<u64> {
        let bytenr = self.alloc.alloc_tree_block(owner, level)?;
        let mut data = vec![0u8; self.template.nodesize as usize];
        let h = self.new_header(bytenr, owner, level);
        h.encode(&mut data);
        let b = TreeBlock::new(data).map_err(|e| Error::format("new block", e))?;
        self.reader.dirty_put(Arc::new(b));
        Ok(bytenr)
    }

    fn free_block(&mut self, bytenr: u64, owner: u64, level: u8) {
        self.reader.dirty_remove(bytenr);
        self.reader.cache_forget(bytenr);
        self.alloc.free_tree_block(bytenr, owner, level);
    }

    /// Create a new tree with one empty leaf (`btrfs_create_tree`).
    pub fn create_root(&mut self, owner: u64) -> Result<RootPtr> {
        let bytenr = self.alloc_block(owner, 0)?;
        Ok(RootPtr {
            bytenr,
            level: 0,
            generation: self.transid,
            owner,
        })
    }

    /// Whether the dirty block `bytenr` is a node with no room for the two pointers a split
    /// below it can add (so it is split on the way down an insert).
    fn node_is_full(&self, bytenr: u64) -> bool {
        let b = self.get(bytenr);
        !b.is_leaf() && b.nritems() + 2 >= max_ptrs(&b)
    }

    /// COW `bytenr` if it is not dirty yet; returns the (possibly new) address.
    fn cow(&mut self, bytenr: u64, owner: u64) -> Result<u64> {
        if let Some(b) = self.reader.dirty_get(bytenr) {
            if b.header.generation == self.transid {
                return Ok(bytenr);
            }
        }
        // A block of this generation that is no longer dirty was written by a log sync: the
        // on-disk log may depend on it, so it is copied like any clean block (the kernel's
        // should_cow_block tests the WRITTEN flag for the same reason).
        let old = self.read(bytenr)?;
        let level = old.level();
        let new = self.alloc.alloc_tree_block(owner, level)?;
        let mut b = (*old).clone();
        b.header.bytenr = new;
        b.header.generation = self.transid;
        b.header.owner = owner;
        b.header.flags = HEADER_FLAG_WRITTEN | (MIXED_BACKREF_REV << BACKREF_REV_SHIFT);
        b.header.fsid = self.template.fsid;
        b.header.chunk_tree_uuid = self.template.chunk_tree_uuid;
        let h = b.header;
        h.encode(&mut b.data);
        self.reader.dirty_put(Arc::new(b));
        self.free_block(bytenr, owner, level);
        Ok(new)
    }

    /// `btrfs_search_slot` with COW: every block on the path to `key` is made dirty. With
    /// `for_insert`, full nodes are split on the way down (as the kernel does for `ins_len > 0`),
    /// so that the leaf's parent always has room for the two pointers a leaf split can add.
    /// Returns the path and whether `key` exists (the leaf slot is the insert position).
    fn search_cow(
        &mut self,
        root: &mut RootPtr,
        key: &Key,
        for_insert: bool,
    ) -> Result<(WPath, bool)> {
        let owner = root.owner;
        let new_root = self.cow(root.bytenr, owner)?;
        root.bytenr = new_root;
        root.generation = self.transid;
        // No `Arc<TreeBlock>` of a dirty block may be held across `modify` of that block:
        // `Arc::make_mut` would copy the whole block (16 KiB) instead of changing it in place.
        if for_insert && self.node_is_full(new_root) {
            self.grow_root(root)?;
        }
        let mut rev: Vec<(u64, usize)> = Vec::new();
        let mut cur = root.bytenr;
        loop {
            let b = self.get(cur);
            if b.is_leaf() {
                let (mut lo, mut hi) = (0, b.nritems());
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if raw_item(&b, mid).0 < *key {
                        lo = mid + 1
                    } else {
                        hi = mid
                    }
                }
                let found = lo < b.nritems() && raw_item(&b, lo).0 == *key;
                rev.push((cur, lo));
                rev.reverse();
                return Ok((WPath { nodes: rev }, found));
            }
            let slot = node_search(&b, key);
            let (child, child_gen) = node_child(&b, slot);
            drop(b);
            let mut new_child = self.cow(child, owner)?;
            let gen = self.transid;
            // A child already COWed in this transaction keeps its pointer: rewriting the same
            // bytes would only dirty the cache line (and copy the node if a reader held it).
            if (new_child, gen) != (child, child_gen) {
                self.modify(cur, |nb| {
                    let k = node_key(nb, slot);
                    set_ptr(nb, slot, &k, new_child, gen)
                });
            }
            let mut slot = slot;
            if for_insert && self.node_is_full(new_child) {
                // split_node: the upper half goes to a new node right of it (the parent has
                // room: it was split on the way down if it was full).
                let right = self.split_node(owner, cur, slot, new_child)?;
                let rfirst = node_key(&self.get(right), 0);
                if *key >= rfirst {
                    new_child = right;
                    slot += 1;
                }
            }
            rev.push((cur, slot));
            cur = new_child;
        }
    }

    /// Put a new root node above the current root (`insert_new_root`).
    fn grow_root(&mut self, root: &mut RootPtr) -> Result<()> {
        let old = root.bytenr;
        let level = root.level + 1;
        let first = first_key(&self.get(old));
        let new_root = self.alloc_block(root.owner, level)?;
        let gen = self.transid;
        self.modify(new_root, |b| node_insert(b, 0, &first, old, gen));
        root.bytenr = new_root;
        root.level = level;
        root.generation = gen;
        Ok(())
    }

    /// Split node `child` (pointer `slot` of `parent`): its upper half moves to a new node that
    /// is inserted at `slot + 1` of `parent`. Returns the new node.
    fn split_node(&mut self, owner: u64, parent: u64, slot: usize, child: u64) -> Result<u64> {
        let level = self.get(child).level();
        let right = self.alloc_block(owner, level)?;
        let moved: Vec<(Key, u64, u64)> = {
            let b = self.get(child);
            let mid = b.nritems() / 2;
            (mid..b.nritems())
                .map(|i| {
                    let (bp, g) = node_child(&b, i);
                    (node_key(&b, i), bp, g)
                })
                .collect()
        };
        let keep = self.get(child).nritems() - moved.len();
        self.modify(right, |r| {
            for (i, (k, bp, g)) in moved.iter().enumerate() {
                node_insert(r, i, k, *bp, *g);
            }
        });
        self.modify(child, |b| {
            for i in (keep..b.nritems()).rev() {
                node_remove(b, i);
            }
        });
        let gen = self.transid;
        self.modify(parent, |p| {
            node_insert(p, slot + 1, &moved[0].0, right, gen)
        });
        Ok(right)
    }

    /// `fixup_low_keys`: the first key at `level` of the path changed; update parents.
    fn fixup_low_keys(&mut self, path: &WPath, level: usize, key: &Key) {
        for l in level + 1..path.nodes.len() {
            let (nb, slot) = path.nodes[l];
            self.modify(nb, |b| {
                let (bp, g) = node_child(b, slot);
                set_ptr(b, slot, key, bp, g)
            });
            if slot != 0 {
                break;
            }
        }
    }

    /// Insert a pointer into the leaf's parent at `at` (the parent has room, see
    /// [`Self::search_cow`]). A root leaf first gets a parent.
    fn leaf_parent(&mut self, root: &mut RootPtr, path: &mut WPath) -> Result<()> {
        if path.nodes.len() == 1 {
            self.grow_root(root)?;
            path.nodes.push((root.bytenr, 0));
        }
        Ok(())
    }

    /// Make room for an item of `need` bytes (item header included) at the path's slot by one
    /// split. Returns true if the item was inserted as part of the split (a leaf of its own).
    fn make_room(
        &mut self,
        root: &mut RootPtr,
        path: &mut WPath,
        key: &Key,
        data: &[u8],
    ) -> Result<bool> {
        self.leaf_parent(root, path)?;
        let (leaf, slot) = path.nodes[0];
        let (parent, pslot) = path.nodes[1];
        let need = data.len() + ITEM_SIZE;
        let b = self.get(leaf);
        let n = b.nritems();
        let gen = self.transid;
        if slot == n || (slot == 0 && n == 1) {
            // The item gets a leaf of its own, after (append) or before (first item) this one.
            let nl = self.alloc_block(root.owner, 0)?;
            self.modify(nl, |l| leaf_insert(l, 0, key, data));
            let at = if slot == n { pslot + 1 } else { pslot };
            self.modify(parent, |p| node_insert(p, at, key, nl, gen));
            if at == 0 {
                self.fixup_low_keys(path, 1, key);
            }
            return Ok(true);
        }
        // Split point: balanced by bytes if the side receiving the item then has room, else
        // exactly at the insertion slot (or after the first item when inserting in front).
        let total = leaf_used(&b);
        let cap = data_size(&b);
        let used = |from: usize, to: usize| -> usize {
            (from..to)
                .map(|i| raw_item(&b, i).2 as usize + ITEM_SIZE)
                .sum()
        };
        let mut acc = 0;
        let mut mid = 1;
        for i in 0..n {
            acc += raw_item(&b, i).2 as usize + ITEM_SIZE;
            if acc * 2 >= total {
                mid = (i + 1).clamp(1, n - 1);
                break;
            }
        }
        let fits = if slot < mid {
            used(0, mid) + need <= cap
        } else {
            used(mid, n) + need <= cap
        };
        if !fits {
            mid = if slot == 0 { 1 } else { slot };
        }
        drop(b);
        let right = self.alloc_block(root.owner, 0)?;
        let r = self.get(right);
        let mut r = (*r).clone();
        self.modify(leaf, |l| leaf_move_tail(l, &mut r, mid));
        let rk = raw_item(&r, 0).0;
        self.reader.dirty_put(Arc::new(r));
        self.modify(parent, |p| node_insert(p, pslot + 1, &rk, right, gen));
        Ok(false)
    }

    /// `btrfs_insert_item`: insert `key` with `data`; [`Error::Exists`] if the key exists.
    pub fn insert_item(&mut self, root: &mut RootPtr, key: Key, data: &[u8]) -> Result<()> {
        let max = self.template.nodesize as usize - HEADER_SIZE - ITEM_SIZE;
        if data.len() > max {
            return Err(Error::corrupt(format!(
                "item {key:?} of {} bytes exceeds a leaf",
                data.len()
            )));
        }
        let need = data.len() + ITEM_SIZE;
        // Each round either inserts or splits once; a split halves the leaf, so a few rounds
        // always suffice (the bound guards against a logic error looping forever).
        for _ in 0..8 {
            let (mut path, found) = self.search_cow(root, &key, true)?;
            if found {
                return Err(Error::Exists(format!("{key:?} in tree {}", root.owner)));
            }
            let (leaf, slot) = path.nodes[0];
            if leaf_free_space(&self.get(leaf)) >= need {
                self.modify(leaf, |b| leaf_insert(b, slot, &key, data));
                if slot == 0 {
                    self.fixup_low_keys(&path, 0, &key);
                }
                return Ok(());
            }
            if self.make_room(root, &mut path, &key, data)? {
                return Ok(());
            }
        }
        Err(Error::corrupt(format!(
            "could not make room for {key:?} in tree {}",
            root.owner
        )))
    }

    /// Replace the data of an existing item (`btrfs_extend_item` / `btrfs_truncate_item` or a
    /// plain overwrite when the size is unchanged).
    pub fn update_item(&mut self, root: &mut RootPtr, key: &Key, data: &[u8]) -> Result<()> {
        let (path, found) = self.search_cow(root, key, false)?;
        if !found {
            return Err(Error::NotFound(format!("{key:?} in tree {}", root.owner)));
        }
        let (leaf, slot) = path.nodes[0];
        let (_, off, size) = raw_item(&self.get(leaf), slot);
        if size as usize == data.len() {
            self.modify(leaf, |b| {
                let o = HEADER_SIZE + off as usize;
                b.data[o..o + data.len()].copy_from_slice(data);
            });
            return Ok(());
        }
        // Size changes: remove and re-insert (the kernel shifts in place; the result is the same
        // leaf content when it fits).
        let fits = leaf_free_space(&self.get(leaf)) + size as usize >= data.len();
        if fits {
            self.modify(leaf, |b| {
                leaf_remove(b, slot);
                leaf_insert(b, slot, key, data);
            });
            return Ok(());
        }
        self.delete_item(root, key)?;
        self.insert_item(root, *key, data)
    }

    /// `btrfs_del_item`: delete `key`. NotFound if absent.
    pub fn delete_item(&mut self, root: &mut RootPtr, key: &Key) -> Result<()> {
        let (path, found) = self.search_cow(root, key, false)?;
        if !found {
            return Err(Error::NotFound(format!("{key:?} in tree {}", root.owner)));
        }
        let (leaf, slot) = path.nodes[0];
        self.modify(leaf, |b| leaf_remove(b, slot));
        let n = self.get(leaf).nritems();
        if path.nodes.len() == 1 {
            return Ok(()); // a root leaf may be empty
        }
        if n == 0 {
            self.free_block(leaf, root.owner, 0);
            return self.del_ptr(root, &path, 1);
        }
        if slot == 0 {
            let k = raw_item(&self.get(leaf), 0).0;
            self.fixup_low_keys(&path, 0, &k);
        }
        let b = self.get(leaf);
        let underfull = leaf_used(&b) < data_size(&b) / 3;
        drop(b); // merge_leaf may modify it
        if underfull {
            self.merge_leaf(root, &path)?;
        }
        Ok(())
    }

    /// Merge an underfull leaf into its left or right neighbour when everything fits.
    fn merge_leaf(&mut self, root: &mut RootPtr, path: &WPath) -> Result<()> {
        let (leaf, _) = path.nodes[0];
        let (parent, pslot) = path.nodes[1];
        let pn = self.get(parent).nritems();
        let used = leaf_used(&self.get(leaf));
        if pslot > 0 {
            let (left, _) = node_child(&self.get(parent), pslot - 1);
            let left = self.cow(left, root.owner)?;
            let gen = self.transid;
            self.modify(parent, |b| {
                let k = node_key(b, pslot - 1);
                set_ptr(b, pslot - 1, &k, left, gen)
            });
            if leaf_free_space(&self.get(left)) >= used {
                let src = self.get(leaf);
                let mut src = (*src).clone();
                self.modify(left, |l| leaf_move_tail(&mut src, l, 0));
                self.free_block(leaf, root.owner, 0);
                return self.del_ptr(root, path, 1);
            }
        }
        if pslot + 1 < pn {
            let (right, _) = node_child(&self.get(parent), pslot + 1);
            let right = self.cow(right, root.owner)?;
            let gen = self.transid;
            self.modify(parent, |b| {
                let k = node_key(b, pslot + 1);
                set_ptr(b, pslot + 1, &k, right, gen)
            });
            let rused = leaf_used(&self.get(right));
            if leaf_free_space(&self.get(leaf)) >= rused {
                let src = self.get(right);
                let mut src = (*src).clone();
                self.modify(leaf, |l| leaf_move_tail(&mut src, l, 0));
                self.free_block(right, root.owner, 0);
                let mut p2 = path.clone();
                p2.nodes[1].1 = pslot + 1;
                return self.del_ptr(root, &p2, 1);
            }
        }
        Ok(())
    }

    /// Remove pointer `path.nodes[level].1` from the node at `level` (`del_ptr`), freeing and
    /// collapsing as needed.
    fn del_ptr(&mut self, root: &mut RootPtr, path: &WPath, level: usize) -> Result<()> {
        let (nb, slot) = path.nodes[level];
        self.modify(nb, |b| node_remove(b, slot));
        let n = self.get(nb).nritems();
        let is_root = level + 1 == path.nodes.len();
        if is_root {
            if n == 1 {
                // A root node with one child: the child becomes the root.
                let (child, _) = node_child(&self.get(nb), 0);
                let child_level = (level - 1) as u8;
                self.free_block(nb, root.owner, level as u8);
                root.bytenr = child;
                root.level = child_level;
                root.generation = self.read(child)?.header.generation;
            } else if n == 0 {
                return Err(Error::corrupt(format!(
                    "root node {nb} of tree {} became empty",
                    root.owner
                )));
            }
            return Ok(());
        }
        if n == 0 {
            self.free_block(nb, root.owner, level as u8);
            return self.del_ptr(root, path, level + 1);
        }
        if slot == 0 {
            let k = node_key(&self.get(nb), 0);
            self.fixup_low_keys(path, level, &k);
        }
        let b = self.get(nb);
        let underfull = b.nritems() < max_ptrs(&b) / 4;
        drop(b); // merge_node may modify it
        if underfull {
            self.merge_node(root, path, level)?;
        }
        Ok(())
    }

    /// Merge an underfull node into a neighbour when both fit in one node.
    fn merge_node(&mut self, root: &mut RootPtr, path: &WPath, level: usize) -> Result<()> {
        let (nb, _) = path.nodes[level];
        let (parent, pslot) = path.nodes[level + 1];
        let pn = self.get(parent).nritems();
        let n = self.get(nb).nritems();
        let gen = self.transid;
        let cap = max_ptrs(&self.get(nb));
        let take_all = |w: &Self, from: u64| -> Vec<(Key, u64, u64)> {
            let b = w.get(from);
            (0..b.nritems())
                .map(|i| {
                    let (bp, g) = node_child(&b, i);
                    (node_key(&b, i), bp, g)
                })
                .collect()
        };
        if pslot > 0 {
            let (left, _) = node_child(&self.get(parent), pslot - 1);
            let left = self.cow(left, root.owner)?;
            self.modify(parent, |b| {
                let k = node_key(b, pslot - 1);
                set_ptr(b, pslot - 1, &k, left, gen)
            });
            if self.get(left).nritems() + n <= cap {
                let moved = take_all(self, nb);
                self.modify(left, |l| {
                    for (k, bp, g) in &moved {
                        let at = l.nritems();
                        node_insert(l, at, k, *bp, *g);
                    }
                });
                self.free_block(nb, root.owner, level as u8);
                return self.del_ptr(root, path, level + 1);
            }
        }
        if pslot + 1 < pn {
            let (right, _) = node_child(&self.get(parent), pslot + 1);
            let right = self.cow(right, root.owner)?;
            self.modify(parent, |b| {
                let k = node_key(b, pslot + 1);
                set_ptr(b, pslot + 1, &k, right, gen)
            });
            if self.get(right).nritems() + n <= cap {
                let moved = take_all(self, right);
                self.modify(nb, |l| {
                    for (k, bp, g) in &moved {
                        let at = l.nritems();
                        node_insert(l, at, k, *bp, *g);
                    }
                });
                self.free_block(right, root.owner, level as u8);
                let mut p2 = path.clone();
                p2.nodes[level + 1].1 = pslot + 1;
                return self.del_ptr(root, &p2, level + 1);
            }
        }
        Ok(())
    }
}

/// Walk a tree and check the invariants of this module: structure of every block, parent keys
/// equal to child first keys, pointer generations equal to child generations, levels, no empty
/// non-root block. Returns every (key, data) in order. For tests and debug checks.
pub fn check_tree(reader: &BlockReader, root: &RootPtr) -> Result<Vec<(Key, Vec<u8>)>> {
    fn walk(
        reader: &BlockReader,
        bytenr: u64,
        level: u8,
        gen: u64,
        first: Option<Key>,
        is_root: bool,
        out: &mut Vec<(Key, Vec<u8>)>,
    ) -> Result<()> {
        let b = reader.read_tree_block(
            bytenr,
            BlockExpect {
                generation: Some(gen),
                level: Some(level),
                first_key: first,
                owner: None,
            },
        )?;
        b.check_structure()
            .map_err(|e| Error::format(format!("block {bytenr}"), e))?;
        if b.nritems() == 0 && !is_root {
            return Err(Error::corrupt(format!("empty non-root block {bytenr}")));
        }
        if b.is_leaf() {
            for i in 0..b.nritems() {
                let k = b.item_key(i).map_err(|e| Error::format("leaf", e))?;
                out.push((
                    k,
                    b.item_data(i)
                        .map_err(|e| Error::format("leaf", e))?
                        .to_vec(),
                ));
            }
            return Ok(());
        }
        if is_root && b.nritems() < 2 {
            return Err(Error::corrupt(format!(
                "root node {bytenr} with {} pointers",
                b.nritems()
            )));
        }
        for i in 0..b.nritems() {
            let p = b.key_ptr(i).map_err(|e| Error::format("node", e))?;
            walk(
                reader,
                p.blockptr,
                level - 1,
                p.generation,
                Some(p.key),
                false,
                out,
            )?;
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(
        reader,
        root.bytenr,
        root.level,
        root.generation,
        None,
        true,
        &mut out,
    )?;
    for w in out.windows(2) {
        if w[0].0 >= w[1].0 {
            return Err(Error::corrupt(format!(
                "keys out of order across leaves: {:?} {:?}",
                w[0].0, w[1].0
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};
    use ubtrfs_format::csum::CsumType;

    /// Hands out addresses and remembers which are live.
    #[derive(Default)]
    struct BumpAlloc {
        next: u64,
        live: HashSet<u64>,
    }

    impl TreeAlloc for BumpAlloc {
        fn alloc_tree_block(&mut self, _owner: u64, _level: u8) -> Result<u64> {
            self.next += 4096;
            self.live.insert(self.next);
            Ok(self.next)
        }
        fn free_tree_block(&mut self, bytenr: u64, _owner: u64, _level: u8) {
            assert!(self.live.remove(&bytenr), "double free of {bytenr}");
        }
    }

    fn reader() -> BlockReader {
        BlockReader::with_geometry(
            Vec::new(),
            4096,
            4096,
            CsumType::Crc32c,
            [7; 16],
            u64::MAX,
            1 << 20,
        )
    }

    fn template() -> BlockTemplate {
        BlockTemplate {
            nodesize: 4096,
            fsid: [7; 16],
            chunk_tree_uuid: [9; 16],
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16, usize),
        Delete(u16),
        Update(u16, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..600, 0usize..700).prop_map(|(k, n)| Op::Insert(k, n)),
            3 => (0u16..600).prop_map(Op::Delete),
            1 => (0u16..600, 0usize..1500).prop_map(|(k, n)| Op::Update(k, n)),
        ]
    }

    fn key(k: u16) -> Key {
        Key::new(256 + u64::from(k / 7), 1 + (k % 7) as u8 * 10, u64::from(k))
    }

    fn value(k: u16, n: usize, salt: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ (k as u8) ^ salt)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        // Test scenario: random inserts, deletes and resizing updates on 4 KiB blocks (many
        // splits and merges) keep the tree equal to a BTreeMap model and structurally valid,
        // and every block the allocator still counts as live is reachable (no leaks).
        #[test]
        fn cow_tree_matches_model(ops in proptest::collection::vec(op(), 1..400)) {
            let r = reader();
            let mut alloc = BumpAlloc::default();
            let mut model: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
            let mut root;
            {
                let mut w = TreeWriter::new(&r, &mut alloc, 1, template());
                root = w.create_root(5).unwrap();
                for (i, o) in ops.iter().enumerate() {
                    match *o {
                        Op::Insert(k, n) => {
                            let v = value(k, n, i as u8);
                            let res = w.insert_item(&mut root, key(k), &v);
                            if let std::collections::btree_map::Entry::Vacant(e) = model.entry(key(k)) {
                                res.unwrap();
                                e.insert(v);
                            } else {
                                prop_assert!(matches!(res, Err(Error::Exists(_))));
                            }
                        }
                        Op::Delete(k) => {
                            let res = w.delete_item(&mut root, &key(k));
                            if model.remove(&key(k)).is_some() {
                                res.unwrap();
                            } else {
                                prop_assert!(matches!(res, Err(Error::NotFound(_))));
                            }
                        }
                        Op::Update(k, n) => {
                            let v = value(k, n, i as u8 ^ 0x55);
                            let res = w.update_item(&mut root, &key(k), &v);
                            if let Some(slot) = model.get_mut(&key(k)) {
                                res.unwrap();
                                *slot = v;
                            } else {
                                prop_assert!(res.is_err());
                            }
                        }
                    }
                }
            }
            let content = check_tree(&r, &root).unwrap();
            let want: Vec<(Key, Vec<u8>)> = model.into_iter().collect();
            prop_assert_eq!(content.len(), want.len());
            prop_assert!(content == want);
            // Every live block is in the dirty set and reachable; nothing else is.
            prop_assert_eq!(alloc.live.len(), r.dirty_count());
        }
    }

    // Test scenario: thousands of sequential inserts grow the tree to several levels; deleting
    // everything shrinks it back to one empty root leaf with every block freed but the root.
    #[test]
    fn grow_and_shrink() {
        let r = reader();
        let mut alloc = BumpAlloc::default();
        let mut root = {
            let mut w = TreeWriter::new(&r, &mut alloc, 1, template());
            let mut root = w.create_root(5).unwrap();
            for i in 0..20000u64 {
                w.insert_item(&mut root, Key::new(i, 1, 0), &[i as u8; 100])
                    .unwrap();
            }
            root
        };
        assert!(root.level >= 2, "level {}", root.level);
        assert_eq!(check_tree(&r, &root).unwrap().len(), 20000);
        {
            let mut w = TreeWriter::new(&r, &mut alloc, 1, template());
            for i in (0..20000u64).step_by(2).chain((1..20000u64).step_by(2)) {
                w.delete_item(&mut root, &Key::new(i, 1, 0)).unwrap();
            }
        }
        assert_eq!(root.level, 0);
        assert!(check_tree(&r, &root).unwrap().is_empty());
        assert_eq!(alloc.live.len(), 1);
    }

    // Test scenario: in one transaction, once a path is dirty, more inserts into the same
    // leaf change every block of the path in place: no node or leaf is copied again (a copy
    // of each node per insert cost file creation a 16 KiB memcpy per tree level).
    #[test]
    fn inserts_into_a_dirty_path_copy_no_block() {
        let r = reader();
        let mut alloc = BumpAlloc::default();
        let mut w = TreeWriter::new(&r, &mut alloc, 1, template());
        let mut root = w.create_root(5).unwrap();
        for i in 0..20000u64 {
            w.insert_item(&mut root, Key::new(i * 10, 1, 0), &[1; 100])
                .unwrap();
        }
        assert!(root.level >= 2, "level {}", root.level);
        // Where each block of the path to `k` lives in memory.
        let path_of = |root: &RootPtr, k: u64| -> Vec<(u64, *const TreeBlock)> {
            let mut out = Vec::new();
            let mut cur = root.bytenr;
            loop {
                let b = r.dirty_get(cur).expect("dirty");
                out.push((cur, Arc::as_ptr(&b)));
                if b.is_leaf() {
                    return out;
                }
                cur = node_child(&b, node_search(&b, &Key::new(k, 1, 0))).0;
            }
        };
        // Keys 300001..300005 go into the last leaf (a split would change the path).
        w.insert_item(&mut root, Key::new(300001, 1, 0), &[2; 10])
            .unwrap();
        let before = path_of(&root, 300001);
        for j in 2..6u64 {
            w.insert_item(&mut root, Key::new(300000 + j, 1, 0), &[2; 10])
                .unwrap();
        }
        let after = path_of(&root, 300001);
        assert_eq!(after, before, "a block of the path was copied");
        assert_eq!(check_tree(&r, &root).unwrap().len(), 20005);
    }

    // Test scenario: a tree built and written in transaction 1 is changed in transaction 2:
    // only the blocks on modified paths are copied, each old copy is freed exactly once, and
    // the transaction-1 root still reads back the old content from disk (crash safety).
    #[test]
    fn cow_across_transactions_keeps_old_version() {
        use crate::volumes::Device;
        use ubtrfs_format::items::{bg_flags, ChunkItem, Stripe};
        let dir = std::env::temp_dir().join(format!("ubtrfs-cow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev");
        let dev = Arc::new(Device::scratch_file(1, &path, 64 << 20));
        let r = BlockReader::with_geometry(
            vec![dev],
            4096,
            4096,
            CsumType::Crc32c,
            [7; 16],
            u64::MAX,
            1 << 20,
        );
        let chunk = ChunkItem {
            length: 64 << 20,
            owner: 2,
            stripe_len: 65536,
            chunk_type: bg_flags::METADATA,
            io_align: 4096,
            io_width: 4096,
            sector_size: 4096,
            num_stripes: 1,
            sub_stripes: 0,
            stripes: vec![Stripe {
                devid: 1,
                offset: 0,
                dev_uuid: [0; 16],
            }],
        };
        r.chunks_mut().insert(0, chunk, 4096).unwrap();
        let write_out = |r: &BlockReader| {
            for b in r.take_dirty() {
                let mut b = (*b).clone();
                b.update_csum(CsumType::Crc32c);
                r.write_logical(b.header.bytenr, &b.data).unwrap();
            }
        };
        let mut alloc = BumpAlloc::default();
        let mut root = {
            let mut w = TreeWriter::new(&r, &mut alloc, 1, template());
            let mut root = w.create_root(5).unwrap();
            for i in 0..3000u64 {
                w.insert_item(&mut root, Key::new(i, 250, 0), &i.to_le_bytes())
                    .unwrap();
            }
            root
        };
        write_out(&r);
        let old_root = root;
        let live_before = alloc.live.len();
        {
            let mut w = TreeWriter::new(&r, &mut alloc, 2, template());
            w.update_item(&mut root, &Key::new(7, 250, 0), &[0xAA; 8])
                .unwrap();
        }
        // One leaf and its ancestors were copied; the old copies were freed.
        assert_eq!(alloc.live.len(), live_before);
        assert_eq!(r.dirty_count(), usize::from(root.level) + 1);
        assert_ne!(root.bytenr, old_root.bytenr);
        let new = check_tree(&r, &root).unwrap();
        assert_eq!(new[7].1, vec![0xAA; 8]);
        // The old version is still intact on disk (nothing overwrote it).
        r.take_dirty();
        let old = check_tree(&r, &old_root).unwrap();
        assert_eq!(old.len(), 3000);
        assert_eq!(old[7].1, 7u64.to_le_bytes().to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
