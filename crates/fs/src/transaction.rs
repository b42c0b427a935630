//! The filesystem side of transactions: [`WriteCtx`], the handle a write operation gets from
//! [`FsInfo::write_op`](crate::FsInfo::write_op) (the kernel's `btrfs_trans_handle`), with
//! item-level access to the trees of the running transaction.
//!
//! Searches made through a `WriteCtx` see the transaction's own (dirty) roots; searches made
//! through the read API see the roots published after the last write operation.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_ctree::ctree::{lookup_item, lookup_le, RootPtr, TreeIter};
use ubtrfs_ctree::transaction::Transaction;
use ubtrfs_format::items::InodeItem;
use ubtrfs_format::key::{item, Key};

/// Which tree an item operation addresses: a subvolume (or any tree by id), or the log tree
/// of a subvolume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeSel {
    Fs(u64),
    Log(u64),
}

/// A write operation's handle on the running transaction.
pub struct WriteCtx<'a> {
    pub fs: &'a FsInfo,
    pub t: &'a mut Transaction,
}

impl WriteCtx<'_> {
    pub fn transid(&self) -> u64 {
        self.t.transid
    }

    pub fn root_ptr(&self, id: u64) -> Result<RootPtr> {
        self.t.root(id).ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, id: u64, key: &Key) -> Result<Option<Vec<u8>>> {
        Ok(lookup_item(&self.fs.reader, &self.root_ptr(id)?, key)?)
    }

    /// The last item with key <= `key`.
    pub fn lookup_le(&self, id: u64, key: &Key) -> Result<Option<(Key, Vec<u8>)>> {
        Ok(lookup_le(&self.fs.reader, &self.root_ptr(id)?, key)?)
    }

    /// Items from `start` while `keep(key)` holds (bounded by `max` items).
    pub fn items(
        &self,
        id: u64,
        start: Key,
        max: usize,
        keep: impl Fn(&Key) -> bool,
    ) -> Result<Vec<(Key, Vec<u8>)>> {
        let mut out = Vec::new();
        for r in TreeIter::new(&self.fs.reader, self.root_ptr(id)?, start) {
            let (k, b, s) = r?;
            if !keep(&k) || out.len() >= max {
                break;
            }
            out.push((
                k,
                b.item_data(s)
                    .map_err(|e| FsError::corrupt(format!("{k}: {e}")))?
                    .to_vec(),
            ));
        }
        Ok(out)
    }

    pub fn insert(&mut self, id: u64, key: Key, data: &[u8]) -> Result<()> {
        let reader = &self.fs.reader;
        Ok(self
            .t
            .modify_tree(reader, id, |w, r| w.insert_item(r, key, data))?)
    }

    pub fn update(&mut self, id: u64, key: &Key, data: &[u8]) -> Result<()> {
        let reader = &self.fs.reader;
        Ok(self
            .t
            .modify_tree(reader, id, |w, r| w.update_item(r, key, data))?)
    }

    pub fn delete(&mut self, id: u64, key: &Key) -> Result<()> {
        let reader = &self.fs.reader;
        Ok(self
            .t
            .modify_tree(reader, id, |w, r| w.delete_item(r, key))?)
    }

    /// The root of `sel` (None for a log tree not created yet).
    pub fn sel_root(&self, sel: TreeSel) -> Option<RootPtr> {
        match sel {
            TreeSel::Fs(id) => self.t.root(id),
            TreeSel::Log(id) => self.t.log.roots.get(&id).copied(),
        }
    }

    pub fn sel_lookup(&self, sel: TreeSel, key: &Key) -> Result<Option<Vec<u8>>> {
        let Some(r) = self.sel_root(sel) else {
            return Ok(None);
        };
        Ok(lookup_item(&self.fs.reader, &r, key)?)
    }

    pub fn sel_lookup_le(&self, sel: TreeSel, key: &Key) -> Result<Option<(Key, Vec<u8>)>> {
        let Some(r) = self.sel_root(sel) else {
            return Ok(None);
        };
        Ok(lookup_le(&self.fs.reader, &r, key)?)
    }

    pub fn sel_items(
        &self,
        sel: TreeSel,
        start: Key,
        max: usize,
        keep: impl Fn(&Key) -> bool,
    ) -> Result<Vec<(Key, Vec<u8>)>> {
        let Some(r) = self.sel_root(sel) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for it in TreeIter::new(&self.fs.reader, r, start) {
            let (k, b, s) = it?;
            if !keep(&k) || out.len() >= max {
                break;
            }
            out.push((
                k,
                b.item_data(s)
                    .map_err(|e| FsError::corrupt(format!("{k}: {e}")))?
                    .to_vec(),
            ));
        }
        Ok(out)
    }

    pub fn sel_insert(&mut self, sel: TreeSel, key: Key, data: &[u8]) -> Result<()> {
        match sel {
            TreeSel::Fs(id) => self.insert(id, key, data),
            TreeSel::Log(id) => {
                let reader = &self.fs.reader;
                Ok(self
                    .t
                    .modify_log_tree(reader, id, |w, r| w.insert_item(r, key, data))?)
            }
        }
    }

    pub fn sel_update(&mut self, sel: TreeSel, key: &Key, data: &[u8]) -> Result<()> {
        match sel {
            TreeSel::Fs(id) => self.update(id, key, data),
            TreeSel::Log(id) => {
                let reader = &self.fs.reader;
                Ok(self
                    .t
                    .modify_log_tree(reader, id, |w, r| w.update_item(r, key, data))?)
            }
        }
    }

    pub fn sel_delete(&mut self, sel: TreeSel, key: &Key) -> Result<()> {
        match sel {
            TreeSel::Fs(id) => self.delete(id, key),
            TreeSel::Log(id) => {
                let reader = &self.fs.reader;
                Ok(self
                    .t
                    .modify_log_tree(reader, id, |w, r| w.delete_item(r, key))?)
            }
        }
    }

    /// Add a data chunk (the data space is full). False when the device has no room.
    pub fn alloc_data_chunk(&mut self) -> Result<bool> {
        let mut sb = self.fs.sb_live.lock();
        Ok(self.t.try_alloc_chunk(
            &self.fs.reader,
            &mut sb,
            ubtrfs_ctree::block_group::AllocKind::Data,
        )?)
    }

    /// The inode item of `ino` as this transaction sees it.
    pub fn read_inode(&self, root: u64, ino: u64) -> Result<InodeItem> {
        let d = self
            .lookup(root, &Key::new(ino, item::INODE_ITEM, 0))?
            .ok_or(FsError::NotFound)?;
        InodeItem::parse(&d).map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: {e}")))
    }

    /// `btrfs_update_inode`, which also does `btrfs_set_inode_last_trans`.
    pub fn write_inode(&mut self, root: u64, ino: u64, ii: &InodeItem) -> Result<()> {
        self.update(root, &Key::new(ino, item::INODE_ITEM, 0), &ii.to_bytes())?;
        self.t.log.set_inode_last_trans(root, ino);
        Ok(())
    }
}
