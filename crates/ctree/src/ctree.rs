//! B-tree search and iteration (the read side of the kernel's ctree.c).
//!
//! A [`Path`] holds, for each level from the leaf up to the root, the block and the slot the
//! search went through (the kernel's `path->nodes[]` / `path->slots[]`). Children are read with
//! the parent's expectations (generation, level, first key), so a misplaced or stale block is
//! refused instead of silently followed.

use crate::disk_io::{BlockExpect, BlockReader};
use crate::error::{Error, Result};
use std::sync::Arc;
use ubtrfs_format::key::Key;
use ubtrfs_format::tree_block::{TreeBlock, MAX_LEVEL};

/// Where a tree starts: from the superblock or a ROOT_ITEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPtr {
    pub bytenr: u64,
    pub level: u8,
    pub generation: u64,
    /// Tree id, for messages and owner checks of unshared trees.
    pub owner: u64,
}

/// A position in a tree: blocks and slots from the leaf (index 0) up to the root.
#[derive(Clone, Debug)]
pub struct Path {
    nodes: Vec<(Arc<TreeBlock>, usize)>,
}

fn fmt_err(block: &TreeBlock, e: ubtrfs_format::FormatError) -> Error {
    Error::format(
        format!(
            "tree block {} (owner {})",
            block.header.bytenr, block.header.owner
        ),
        e,
    )
}

fn read_root(reader: &BlockReader, root: &RootPtr) -> Result<Arc<TreeBlock>> {
    if root.level >= MAX_LEVEL {
        return Err(Error::corrupt(format!(
            "tree {} root level {}",
            root.owner, root.level
        )));
    }
    let owner_checked = !ubtrfs_format::key::is_fstree(root.owner)
        && root.owner != ubtrfs_format::key::objectid::TREE_RELOC;
    reader.read_tree_block(
        root.bytenr,
        BlockExpect {
            generation: Some(root.generation),
            level: Some(root.level),
            first_key: None,
            owner: owner_checked.then_some(root.owner),
        },
    )
}

/// In a node: the slot whose subtree may contain `key` (last pointer with key <= `key`, or 0).
fn node_slot(block: &TreeBlock, key: &Key) -> Result<usize> {
    let (mut lo, mut hi) = (0usize, block.nritems());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if block.key_at(mid).map_err(|e| fmt_err(block, e))? <= *key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo.saturating_sub(1))
}

/// In a leaf: the first slot with key >= `key` (may be nritems), and whether it is equal.
fn leaf_slot(block: &TreeBlock, key: &Key) -> Result<(usize, bool)> {
    let (mut lo, mut hi) = (0usize, block.nritems());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if block.key_at(mid).map_err(|e| fmt_err(block, e))? < *key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let found = lo < block.nritems() && block.key_at(lo).map_err(|e| fmt_err(block, e))? == *key;
    Ok((lo, found))
}

fn read_child(reader: &BlockReader, parent: &TreeBlock, slot: usize) -> Result<Arc<TreeBlock>> {
    let p = parent.key_ptr(slot).map_err(|e| fmt_err(parent, e))?;
    let level = parent
        .level()
        .checked_sub(1)
        .ok_or_else(|| Error::corrupt("child of a leaf"))?;
    let owner_checked = !ubtrfs_format::key::is_fstree(parent.header.owner)
        && parent.header.owner != ubtrfs_format::key::objectid::TREE_RELOC;
    reader.read_tree_block(
        p.blockptr,
        BlockExpect {
            generation: Some(p.generation),
            level: Some(level),
            first_key: Some(p.key),
            owner: owner_checked.then_some(parent.header.owner),
        },
    )
}

impl Path {
    /// `btrfs_search_slot` without modification: position at the first item >= `key`.
    /// Returns the path and whether the item at the position equals `key`.
    pub fn search(reader: &BlockReader, root: &RootPtr, key: &Key) -> Result<(Path, bool)> {
        let mut block = read_root(reader, root)?;
        let mut rev = Vec::with_capacity(usize::from(root.level) + 1);
        loop {
            if block.is_leaf() {
                let (slot, found) = leaf_slot(&block, key)?;
                rev.push((block, slot));
                rev.reverse();
                return Ok((Path { nodes: rev }, found));
            }
            let slot = node_slot(&block, key)?;
            let child = read_child(reader, &block, slot)?;
            rev.push((block, slot));
            block = child;
        }
    }

    /// Leaf block and slot of the current position.
    pub fn leaf(&self) -> (&Arc<TreeBlock>, usize) {
        let (b, s) = &self.nodes[0];
        (b, *s)
    }

    /// The item at the current position, if the slot is inside the leaf.
    pub fn item(&self) -> Result<Option<(Key, &[u8])>> {
        let (b, s) = self.leaf();
        if s >= b.nritems() {
            return Ok(None);
        }
        let key = b.item_key(s).map_err(|e| fmt_err(b, e))?;
        let data = b.item_data(s).map_err(|e| fmt_err(b, e))?;
        Ok(Some((key, data)))
    }

    /// Move to the first slot of the next leaf (`btrfs_next_leaf`). False at the end of the tree.
    pub fn next_leaf(&mut self, reader: &BlockReader) -> Result<bool> {
        let mut level = 1;
        while level < self.nodes.len() {
            let (b, s) = &self.nodes[level];
            if s + 1 < b.nritems() {
                break;
            }
            level += 1;
        }
        if level >= self.nodes.len() {
            let (b, _) = &self.nodes[0];
            self.nodes[0].1 = b.nritems();
            return Ok(false);
        }
        self.nodes[level].1 += 1;
        while level > 0 {
            let (b, s) = &self.nodes[level];
            let child = read_child(reader, b, *s)?;
            level -= 1;
            self.nodes[level] = (child, 0);
        }
        Ok(true)
    }

    /// Move to the last slot of the previous leaf. False at the start of the tree.
    pub fn prev_leaf(&mut self, reader: &BlockReader) -> Result<bool> {
        let mut level = 1;
        while level < self.nodes.len() && self.nodes[level].1 == 0 {
            level += 1;
        }
        if level >= self.nodes.len() {
            return Ok(false);
        }
        self.nodes[level].1 -= 1;
        while level > 0 {
            let (b, s) = &self.nodes[level];
            let child = read_child(reader, b, *s)?;
            let last = child.nritems().saturating_sub(1);
            level -= 1;
            self.nodes[level] = (child, last);
        }
        Ok(true)
    }

    /// Advance to the next item, crossing leaves (`btrfs_next_item`). False at the end.
    pub fn next_item(&mut self, reader: &BlockReader) -> Result<bool> {
        let (b, s) = self.leaf();
        if s + 1 < b.nritems() {
            self.nodes[0].1 += 1;
            return Ok(true);
        }
        while self.next_leaf(reader)? {
            if self.leaf().0.nritems() > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Make the position point at an item: if it is past the end of its leaf, move to the next
    /// leaf. False when there is no item at or after the position.
    pub fn normalize(&mut self, reader: &BlockReader) -> Result<bool> {
        loop {
            let (b, s) = self.leaf();
            if s < b.nritems() {
                return Ok(true);
            }
            if !self.next_leaf(reader)? {
                return Ok(false);
            }
        }
    }

    /// Step back one item, crossing leaves (`btrfs_previous_item` without type filter).
    pub fn prev_item(&mut self, reader: &BlockReader) -> Result<bool> {
        if self.nodes[0].1 > 0 {
            self.nodes[0].1 -= 1;
            return Ok(true);
        }
        while self.prev_leaf(reader)? {
            if self.leaf().0.nritems() > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Exact item lookup: a copy of the data of `key`, or None.
pub fn lookup_item(reader: &BlockReader, root: &RootPtr, key: &Key) -> Result<Option<Vec<u8>>> {
    let (path, found) = Path::search(reader, root, key)?;
    if !found {
        return Ok(None);
    }
    Ok(path.item()?.map(|(_, d)| d.to_vec()))
}

/// The last item with key <= `key`, as (key, data copy).
pub fn lookup_le(
    reader: &BlockReader,
    root: &RootPtr,
    key: &Key,
) -> Result<Option<(Key, Vec<u8>)>> {
    let (mut path, found) = Path::search(reader, root, key)?;
    if !found && !path.prev_item(reader)? {
        return Ok(None);
    }
    Ok(path.item()?.map(|(k, d)| (k, d.to_vec())))
}

/// Forward iteration over items with key >= start, yielding (key, block, slot).
pub struct TreeIter<'a> {
    reader: &'a BlockReader,
    path: Option<Path>,
    started: bool,
    root: RootPtr,
    start: Key,
    done: bool,
}

impl<'a> TreeIter<'a> {
    pub fn new(reader: &'a BlockReader, root: RootPtr, start: Key) -> Self {
        TreeIter {
            reader,
            path: None,
            started: false,
            root,
            start,
            done: false,
        }
    }

    fn advance(&mut self) -> Result<Option<(Key, Arc<TreeBlock>, usize)>> {
        if !self.started {
            self.started = true;
            let (p, _) = Path::search(self.reader, &self.root, &self.start)?;
            self.path = Some(p);
            let p = self.path.as_mut().expect("set above");
            if !p.normalize(self.reader)? {
                return Ok(None);
            }
        } else {
            let p = self.path.as_mut().expect("started implies a path");
            if !p.next_item(self.reader)? {
                return Ok(None);
            }
        }
        let p = self.path.as_ref().expect("path exists");
        let (b, s) = p.leaf();
        let key = b.item_key(s).map_err(|e| fmt_err(b, e))?;
        Ok(Some((key, b.clone(), s)))
    }
}

impl Iterator for TreeIter<'_> {
    type Item = Result<(Key, Arc<TreeBlock>, usize)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
