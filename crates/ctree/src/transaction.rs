//! Transactions and commit (the kernel's transaction.c `btrfs_commit_transaction` and
//! disk-io.c `write_all_supers`).
//!
//! # Definitions
//! - The *running transaction* has id `transid = superblock generation + 1`. Every tree block
//!   it creates carries that generation; changes accumulate as dirty blocks, delayed refs and
//!   dirty block groups until commit.
//!
//! # Commit order (ONDISK-NOTES.md B.11), each step to a fixed point
//! 1. Run delayed refs (extent tree), update block group items and the free space tree of
//!    changed groups, update the ROOT_ITEM of every tree whose root moved. Each of these changes
//!    trees, which allocates and frees blocks, which queues refs and dirties groups: repeat
//!    until a pass changes nothing.
//! 2. Run the tree-checker on every dirty block, checksum it, write it to every copy.
//! 3. Flush the devices.
//! 4. Write the superblock (generation, root tree, chunk tree, bytes_used, device bytes used,
//!    a rotated backup root slot) to every copy that fits the device, then flush.
//! 5. Unpin the space freed by the transaction.
//!
//! A crash before step 4 completes leaves the previous superblock, whose trees were never
//! overwritten (COW + pinning), so the committed state is intact.

use crate::block_group::{BlockGroup, SpaceInfo, FREE_SPACE_USING_BITMAPS};
use crate::cow::{BlockTemplate, TreeWriter};
use crate::ctree::{lookup_item, RootPtr, TreeIter};
use crate::disk_io::BlockReader;
use crate::error::{Error, Result};
use crate::extent_tree::{run_delayed_refs, DelayedRefs, TransAlloc};
use std::collections::{BTreeMap, BTreeSet};
use ubtrfs_format::bytes::{put_u64, u64_at};
use ubtrfs_format::csum::CsumType;
use ubtrfs_format::items::BlockGroupItem;
use ubtrfs_format::key::{item, objectid, Key};
use ubtrfs_format::super_block::{
    sb_offset, RootBackup, SuperBlock, SUPER_INFO_SIZE, SUPER_MIRROR_MAX,
};

/// Bound on commit fixed-point passes; more means a bug (something changes on every pass).
const MAX_COMMIT_PASSES: usize = 64;

/// State of the running transaction.
#[derive(Debug)]
pub struct Transaction {
    pub transid: u64,
    pub space: SpaceInfo,
    pub refs: DelayedRefs,
    /// Every tree root by tree id, including the root tree (1) and the chunk tree (3).
    pub roots: BTreeMap<u64, RootPtr>,
    dirty_roots: BTreeSet<u64>,
    pub template: BlockTemplate,
    /// Where block group items live: the extent tree or the block group tree.
    pub bg_tree: u64,
    /// Number of metadata changes made in this transaction (0 = nothing to commit).
    pub changes: u64,
    /// The tree-log of this transaction (KERNEL-SEMANTICS.md section 4, ONDISK-NOTES B.12).
    pub log: LogState,
    /// Net change of each tree's size in bytes (its blocks × nodesize) not yet written to its
    /// ROOT_ITEM's `bytes_used` (which the kernel keeps exact and sizes the global block
    /// reserve from).
    used_delta: BTreeMap<u64, i64>,
}

/// Log trees of the running transaction. Their blocks are owned by TREE_LOG, carry the running
/// transid, get no extent items and no delayed refs; they are reserved from metadata space and
/// released (pinned) when the transaction commits, which also clears the superblock's log_root.
/// Before that, a block a log tree dropped is reused by the log once no durable log can point
/// at it ([`LogAlloc`]).
#[derive(Debug, Default)]
pub struct LogState {
    /// The log root tree (one ROOT_ITEM per logged subvolume).
    pub root_tree: Option<RootPtr>,
    /// Per-subvolume log tree roots.
    pub roots: BTreeMap<u64, RootPtr>,
    /// Every log block reserved in this transaction (released at commit).
    pub blocks: Vec<u64>,
    /// Log blocks freed (COWed away or dropped from a log tree) while log transid `.0` was
    /// open: the last durable log may still point at them until `.0` is synced.
    pub freed: Vec<(u64, u64)>,
    /// Log blocks of [`Self::blocks`] that no log tree and no durable superblock points at any
    /// more: freed while a log transid was open that has been synced since. The log allocator
    /// takes these before reserving new space ([`LogAlloc`]).
    pub reusable: Vec<u64>,
    /// Log syncs done in this transaction.
    pub syncs: u64,
    /// `root->log_transid`: the log transid new log writes belong to. A log sync takes it
    /// (and opens the next) when it starts writing.
    pub log_transid: u64,
    /// Log transids below this one are durable (`last_log_commit` + 1): an fsync that logged
    /// into one of them has nothing left to sync.
    pub synced_upto: u64,
    /// Set when this transaction must not use the log (`btrfs_set_log_full_commit`: a logging
    /// error, a failed log sync): fsync falls back to a full commit, with this reason.
    pub full_commit: Option<&'static str>,
    /// Inodes logged in this transaction, by (subvolume, inode): the kernel's
    /// `logged_trans == transid`. Kept with the transaction rather than the in-memory inode so
    /// that eviction cannot lose it; it dies with the log at commit.
    pub inodes: BTreeMap<(u64, u64), LoggedInode>,
    /// Inodes with `last_unlink_trans == transid` (a name of theirs was removed or renamed in
    /// this transaction, or, for a directory, an entry was renamed away from it), by
    /// (subvolume, inode).
    pub last_unlink: BTreeSet<(u64, u64)>,
    /// The kernel's `last_sub_trans` of the inodes changed in this transaction, by (subvolume,
    /// inode): the log transid that was open when the inode item last changed or data was last
    /// written (`btrfs_set_inode_last_trans`, `btrfs_set_inode_last_sub_trans`).
    pub last_sub_trans: BTreeMap<(u64, u64), u64>,
    /// Inodes whose in-memory state (extent maps, modified list) was evicted after they changed
    /// in this transaction. The kernel's `btrfs_read_locked_inode` marks an inode re-read with
    /// `last_trans` equal to the fs generation NEEDS_FULL_SYNC, as the extents it changed are
    /// no longer on any modified list; here the mark is taken by the next fsync of the inode
    /// in this transaction (`btrfs_sync_file` reads the flag only there).
    pub full_sync_on_load: BTreeSet<(u64, u64)>,
}

/// What the log of the running transaction holds of one inode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoggedInode {
    /// Logged with LOG_INODE_ALL at least once (else only LOG_INODE_EXISTS).
    pub all: bool,
    /// The kernel's `last_log_commit` of the inode: its `last_sub_trans` when it was last
    /// logged in full (LOG_INODE_ALL, not for a new name); None when a change since
    /// (`btrfs_set_inode_last_trans` sets it to `last_sub_trans - 1`) or never.
    pub last_log_commit: Option<u64>,
}

impl LogState {
    /// Log transid `log_transid` is durable: its superblock is written and flushed. Blocks
    /// freed while it (or an earlier log transid) was open become reusable: log transid
    /// `log_transid`'s trees were written without them, and its superblock replaced every
    /// earlier one (see [`LogAlloc`] for the whole argument).
    pub fn mark_synced(&mut self, log_transid: u64) {
        self.synced_upto = self.synced_upto.max(log_transid + 1);
        let upto = self.synced_upto;
        let reusable = &mut self.reusable;
        self.freed.retain(|&(t, b)| {
            if t < upto {
                reusable.push(b);
                false
            } else {
                true
            }
        });
        // Highest address first: the allocator pops from the end, so the blocks of one COW
        // path (allocated one after the other) come out adjacent where they can, and a log
        // sync writes them in fewer runs.
        self.reusable.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// `btrfs_set_inode_last_trans`: the inode item changed; until it is logged in full
    /// again, the inode is not in the log.
    pub fn set_inode_last_trans(&mut self, root: u64, ino: u64) {
        self.last_sub_trans.insert((root, ino), self.log_transid);
        if let Some(l) = self.inodes.get_mut(&(root, ino)) {
            l.last_log_commit = None;
        }
    }

    /// `btrfs_set_inode_last_sub_trans`: data was written (`btrfs_do_write_iter`).
    pub fn set_inode_last_sub_trans(&mut self, root: u64, ino: u64) {
        self.last_sub_trans.insert((root, ino), self.log_transid);
    }

    /// `btrfs_inode_in_log` for the running transaction: the inode was logged in it
    /// (`logged_trans == generation`), in full since its last change (`last_sub_trans <=
    /// last_log_commit`), and the log transid of that change is synced (`last_sub_trans <=
    /// root->last_log_commit`).
    pub fn inode_in_log(&self, root: u64, ino: u64) -> bool {
        let Some(llc) = self
            .inodes
            .get(&(root, ino))
            .and_then(|l| l.last_log_commit)
        else {
            return false;
        };
        let sub = self.last_sub_trans.get(&(root, ino)).copied().unwrap_or(0);
        sub <= llc && sub < self.synced_upto
    }
}

/// Tree allocator of log trees: reserved metadata space, no refs (`btrfs_alloc_tree_block` for
/// TREE_LOG_OBJECTID).
///
/// # Reusing log blocks within a transaction
/// Every log sync COWs the log blocks it changes (a block the previous sync wrote is never
/// rewritten in place), so an fsync-heavy transaction frees a few log blocks per sync. The
/// kernel keeps them pinned until the transaction commits (`btrfs_free_tree_block` pins a
/// WRITTEN block). Here a freed log block is reused as soon as no durable state can point at
/// it, which keeps the log in a handful of blocks instead of fresh metadata space at every
/// sync: on an image file, fresh space is a hole the host must allocate at the next flush,
/// and that allocation was a quarter of an fsync (`benches/fsync-floor.sh`).
///
/// Definitions: a block is *freed in T* when it leaves a log tree (COW, merge, deletion) while
/// log transid T is open, i.e. before `sync_log_prepare` takes T. The on-disk log is the one
/// the durable primary superblock points at.
///
/// Invariant: a block freed in T is handed out again only after T is durable
/// ([`LogState::mark_synced`], called once T's superblock is written and flushed).
///
/// Why that is safe: T's log trees, as `sync_log_prepare` wrote them, no longer contain the
/// block (it left them before prepare), and once T's superblock is durable it is the only
/// superblock a crash can find pointing at a log (earlier log transids were overwritten in the
/// same slot; mirrors are written only by commits, with no log). Log transids after T are
/// written after T's superblock (`log_sync_mutex`), so from then on the old contents of the
/// block are garbage for every state a crash can leave: rewriting them loses nothing. A block
/// reused and freed again starts over with its new T. A log sync that fails turns the
/// transaction into a full commit, which frees the whole log, so no `mark_synced` runs for it.
/// The space stays reserved in [`LogState::blocks`] until the commit either way, and the
/// extent tree never sees log blocks.
pub struct LogAlloc<'a> {
    pub space: &'a mut SpaceInfo,
    pub blocks: &'a mut Vec<u64>,
    pub freed: &'a mut Vec<(u64, u64)>,
    pub reusable: &'a mut Vec<u64>,
    /// The open log transid (the tag of blocks freed now).
    pub log_transid: u64,
    pub nodesize: u32,
}

impl<'a> LogAlloc<'a> {
    fn new(space: &'a mut SpaceInfo, log: &'a mut LogState, nodesize: u32) -> LogAlloc<'a> {
        LogAlloc {
            space,
            blocks: &mut log.blocks,
            freed: &mut log.freed,
            reusable: &mut log.reusable,
            log_transid: log.log_transid,
            nodesize,
        }
    }
}

impl crate::cow::TreeAlloc for LogAlloc<'_> {
    fn alloc_tree_block(&mut self, _owner: u64, _level: u8) -> Result<u64> {
        if let Some(b) = self.reusable.pop() {
            return Ok(b);
        }
        let n = u64::from(self.nodesize);
        let b = self
            .space
            .alloc_reserved(crate::block_group::AllocKind::Metadata, n)
            .ok_or_else(|| Error::NoSpace("log tree block".into()))?;
        self.blocks.push(b);
        Ok(b)
    }

    fn free_tree_block(&mut self, bytenr: u64, _owner: u64, _level: u8) {
        // Reserved until the commit; reusable once the log transid open now is durable (the
        // last synced log may still point at it until then).
        self.freed.push((self.log_transid, bytenr));
    }
}

/// A log sync whose blocks are written and whose superblock is built
/// ([`Transaction::sync_log_prepare`]).
#[derive(Debug)]
pub struct PreparedLogSync {
    raw: Vec<u8>,
    /// Log blocks written.
    pub blocks: usize,
    /// The log transid this sync makes durable.
    pub log_transid: u64,
}

/// What a commit did, for counters and logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitStats {
    pub transid: u64,
    pub blocks_written: usize,
    pub passes: usize,
}

impl Transaction {
    pub fn new(
        transid: u64,
        space: SpaceInfo,
        roots: BTreeMap<u64, RootPtr>,
        template: BlockTemplate,
        bg_tree: u64,
    ) -> Self {
        Transaction {
            transid,
            space,
            refs: DelayedRefs::default(),
            roots,
            dirty_roots: BTreeSet::new(),
            template,
            bg_tree,
            changes: 0,
            log: LogState::default(),
            used_delta: BTreeMap::new(),
        }
    }

    pub fn root(&self, id: u64) -> Option<RootPtr> {
        self.roots.get(&id).copied()
    }

    /// A mark that moves whenever the transaction's trees, delayed refs or space accounting
    /// change. A write operation that fails after the mark moved left a half-done change in
    /// the transaction and must abort it (`btrfs_abort_transaction`); one that fails before
    /// changed nothing and just returns its error.
    pub fn change_mark(&self) -> (u64, u64, u64) {
        (self.changes, self.refs.adds(), self.space.bytes_used())
    }

    /// Run `f` with a tree writer on tree `id`; records the root change.
    pub fn modify_tree<R>(
        &mut self,
        reader: &BlockReader,
        id: u64,
        f: impl FnOnce(&mut TreeWriter<'_, TransAlloc<'_>>, &mut RootPtr) -> Result<R>,
    ) -> Result<R> {
        let mut root = self
            .roots
            .get(&id)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("tree {id}")))?;
        let nodesize = self.template.nodesize;
        let mut alloc = TransAlloc {
            space: &mut self.space,
            refs: &mut self.refs,
            nodesize,
            used: &mut self.used_delta,
        };
        let mut w = TreeWriter::new(reader, &mut alloc, self.transid, self.template);
        let r = f(&mut w, &mut root);
        if self.roots.get(&id) != Some(&root) {
            self.roots.insert(id, root);
            self.dirty_roots.insert(id);
        }
        self.changes += 1;
        r
    }

    /// Register a tree created in this transaction (its ROOT_ITEM is written by the caller).
    pub fn add_root(&mut self, id: u64, root: RootPtr) {
        self.roots.insert(id, root);
        self.dirty_roots.insert(id);
    }

    fn tree2(
        &mut self,
        reader: &BlockReader,
        a: u64,
        b: u64,
        f: impl FnOnce(&mut TreeWriter<'_, TransAlloc<'_>>, &mut RootPtr, &mut RootPtr) -> Result<bool>,
    ) -> Result<bool> {
        let mut ra = self
            .roots
            .get(&a)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("tree {a}")))?;
        let mut rb = self
            .roots
            .get(&b)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("tree {b}")))?;
        let nodesize = self.template.nodesize;
        let mut alloc = TransAlloc {
            space: &mut self.space,
            refs: &mut self.refs,
            nodesize,
            used: &mut self.used_delta,
        };
        let mut w = TreeWriter::new(reader, &mut alloc, self.transid, self.template);
        let r = f(&mut w, &mut ra, &mut rb)?;
        for (id, root) in [(a, ra), (b, rb)] {
            if self.roots.get(&id) != Some(&root) {
                self.roots.insert(id, root);
                self.dirty_roots.insert(id);
            }
        }
        Ok(r)
    }

    /// Run the delayed refs queued so far, before the commit (`btrfs_run_delayed_refs` from
    /// the transaction's throttling): the extents they free become pinned and the block
    /// groups' `used` drops, which statfs shows (the refs these runs queue wait for the next).
    pub fn run_delayed_refs_now(&mut self, reader: &BlockReader) -> Result<bool> {
        self.pass_delayed_refs(reader)
    }

    /// One pass of delayed refs. True if anything was applied.
    fn pass_delayed_refs(&mut self, reader: &BlockReader) -> Result<bool> {
        if self.refs.is_empty() {
            return Ok(false);
        }
        let mut batch = std::mem::take(&mut self.refs);
        let mut freed = Vec::new();
        let csum_tree = if self.roots.contains_key(&objectid::CSUM_TREE) {
            objectid::CSUM_TREE
        } else {
            objectid::EXTENT_TREE
        };
        self.tree2(
            reader,
            objectid::EXTENT_TREE,
            csum_tree,
            |w, extent_root, csum_root| {
                run_delayed_refs(w, &mut batch, extent_root, csum_root, &mut freed)
            },
        )?;
        for (s, l) in freed {
            self.space.free_extent(s, l)?;
        }
        Ok(true)
    }

    /// Rewrite block group items whose `used` changed. True if anything was written.
    fn pass_block_groups(&mut self, reader: &BlockReader) -> Result<bool> {
        let dirty: Vec<BlockGroup> = self
            .space
            .groups
            .values()
            .filter(|g| g.dirty)
            .cloned()
            .collect();
        let mut changed = false;
        for g in dirty {
            let key = Key::new(g.start, item::BLOCK_GROUP_ITEM, g.length);
            let root = self.roots[&self.bg_tree];
            let cur = lookup_item(reader, &root, &key)?
                .ok_or_else(|| Error::corrupt(format!("block group item {key:?} missing")))?;
            let mut want = cur.clone();
            put_u64(&mut want, 0, g.used);
            if want != cur {
                self.modify_tree(reader, self.bg_tree, |w, r| w.update_item(r, &key, &want))?;
                changed = true;
            }
            let _ =
                BlockGroupItem::parse(&want).map_err(|e| Error::format("block group item", e))?;
        }
        Ok(changed)
    }

    /// Bring the free space tree of every dirty group in line with `free ∪ pinned`.
    fn pass_free_space_tree(&mut self, reader: &BlockReader) -> Result<bool> {
        let Some(fst) = self.root(objectid::FREE_SPACE_TREE) else {
            return Ok(false);
        };
        let _ = fst;
        let ss = self.space.sectorsize;
        let starts: Vec<u64> = self
            .space
            .groups
            .values()
            .filter(|g| g.dirty)
            .map(|g| g.start)
            .collect();
        let mut changed = false;
        for start in starts {
            let g = self.space.groups[&start].clone();
            let free = g.committed_free();
            let (high, low) = g.bitmap_thresholds(ss);
            let count = free.len() as u64;
            let bitmaps = if g.fst_bitmaps {
                count >= low
            } else {
                count > high
            };
            let mut want: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
            let mut info = Vec::with_capacity(8);
            info.extend_from_slice(&(count as u32).to_le_bytes());
            info.extend_from_slice(
                &(if bitmaps { FREE_SPACE_USING_BITMAPS } else { 0 }).to_le_bytes(),
            );
            want.insert(Key::new(g.start, item::FREE_SPACE_INFO, g.length), info);
            if bitmaps {
                let range = u64::from(ss) * crate::block_group::FREE_SPACE_BITMAP_BITS;
                let mut s = g.start;
                while s < g.start + g.length {
                    let len = range.min(g.start + g.length - s);
                    let bits = len / u64::from(ss);
                    let mut bm = vec![0u8; bits.div_ceil(8) as usize];
                    for (&fs, &fl) in free.range(..s + len) {
                        let lo = fs.max(s);
                        let hi = (fs + fl).min(s + len);
                        let mut p = lo;
                        while p < hi {
                            let i = (p - s) / u64::from(ss);
                            bm[(i / 8) as usize] |= 1 << (i % 8);
                            p += u64::from(ss);
                        }
                    }
                    want.insert(Key::new(s, item::FREE_SPACE_BITMAP, len), bm);
                    s += len;
                }
            } else {
                for (&fs, &fl) in &free {
                    want.insert(Key::new(fs, item::FREE_SPACE_EXTENT, fl), Vec::new());
                }
            }
            // What the tree holds now for this group.
            let root = self.roots[&objectid::FREE_SPACE_TREE];
            let mut have: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
            for r in TreeIter::new(reader, root, Key::new(g.start, 0, 0)) {
                let (k, b, slot) = r?;
                if k.objectid >= g.start + g.length {
                    break;
                }
                have.insert(
                    k,
                    b.item_data(slot)
                        .map_err(|e| Error::format("free space tree", e))?
                        .to_vec(),
                );
            }
            if have == want {
                continue;
            }
            changed = true;
            self.modify_tree(reader, objectid::FREE_SPACE_TREE, |w, r| {
                for (k, v) in &have {
                    match want.get(k) {
                        Some(wv) if wv == v => {}
                        Some(wv) => w.update_item(r, k, wv)?,
                        None => w.delete_item(r, k)?,
                    }
                }
                for (k, v) in &want {
                    if !have.contains_key(k) {
                        w.insert_item(r, *k, v)?;
                    }
                }
                Ok(())
            })?;
            if let Some(gm) = self.space.groups.get_mut(&start) {
                gm.fst_bitmaps = bitmaps;
            }
        }
        Ok(changed)
    }

    /// Update the ROOT_ITEM of every tree whose root moved (not the root and chunk trees,
    /// which the superblock points to).
    fn pass_root_items(&mut self, reader: &BlockReader) -> Result<bool> {
        let ids: BTreeSet<u64> = self
            .dirty_roots
            .iter()
            .chain(self.used_delta.keys())
            .copied()
            .filter(|&id| id != objectid::ROOT_TREE && id != objectid::CHUNK_TREE)
            .filter(|id| self.roots.contains_key(id))
            .collect();
        let mut changed = false;
        for id in ids {
            let ptr = self.roots[&id];
            let root_tree = self.roots[&objectid::ROOT_TREE];
            let mut it = TreeIter::new(reader, root_tree, Key::new(id, item::ROOT_ITEM, 0));
            let (key, data) = match it.next() {
                Some(r) => {
                    let (k, b, s) = r?;
                    (
                        k,
                        b.item_data(s)
                            .map_err(|e| Error::format("root item", e))?
                            .to_vec(),
                    )
                }
                None => return Err(Error::corrupt(format!("tree {id} has no ROOT_ITEM"))),
            };
            drop(it);
            if key.objectid != id || key.item_type != item::ROOT_ITEM {
                return Err(Error::corrupt(format!("tree {id} has no ROOT_ITEM")));
            }
            let mut want = data.clone();
            put_u64(&mut want, 160, ptr.generation);
            put_u64(&mut want, 176, ptr.bytenr);
            if let Some(delta) = self.used_delta.remove(&id) {
                let cur = u64_at(&data, 192, "root bytes_used")
                    .map_err(|e| Error::format("root item", e))?;
                put_u64(&mut want, 192, cur.saturating_add_signed(delta));
            }
            want[238] = ptr.level;
            if want.len() >= 247 {
                put_u64(&mut want, 239, ptr.generation);
            }
            if want != data {
                self.modify_tree(reader, objectid::ROOT_TREE, |w, r| {
                    w.update_item(r, &key, &want)
                })?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Commit: see the module documentation for the order. `sb` is updated in place.
    pub fn commit(&mut self, reader: &BlockReader, sb: &mut SuperBlock) -> Result<CommitStats> {
        // btrfs_free_log / btrfs_free_log_root_tree: the log dies with the transaction it
        // logged; its blocks are pinned until this commit is durable (a crash before the
        // superblock lands still replays it).
        self.free_log(reader)?;
        let mut passes = 0;
        loop {
            passes += 1;
            if passes > MAX_COMMIT_PASSES {
                return Err(Error::corrupt(format!(
                    "transaction {}: commit did not converge",
                    self.transid
                )));
            }
            let mut changed = self.pass_delayed_refs(reader)?;
            changed |= self.pass_block_groups(reader)?;
            changed |= self.pass_free_space_tree(reader)?;
            changed |= self.pass_root_items(reader)?;
            if !changed && self.refs.is_empty() {
                break;
            }
        }
        // Write every dirty block, verified and checksummed.
        let blocks = reader.take_dirty();
        let nblocks = blocks.len();
        write_checked_blocks(reader, blocks, self.transid)?;
        reader.flush_devices()?;
        self.write_supers(reader, sb)?;
        reader.flush_devices()?;
        self.space.unpin_all();
        for g in self.space.groups.values_mut() {
            g.dirty = false;
        }
        self.dirty_roots.clear();
        self.used_delta.clear();
        self.log = LogState::default();
        reader.set_max_generation(self.transid + 1);
        let stats = CommitStats {
            transid: self.transid,
            blocks_written: nblocks,
            passes,
        };
        self.transid += 1;
        self.changes = 0;
        Ok(stats)
    }

    fn free_log(&mut self, reader: &BlockReader) -> Result<()> {
        for b in reader.take_dirty_where(|b| b.header.owner == objectid::TREE_LOG) {
            reader.cache_forget(b.header.bytenr);
        }
        let n = u64::from(self.template.nodesize);
        for b in std::mem::take(&mut self.log.blocks) {
            reader.cache_forget(b);
            self.space.release_reserved(b, n)?;
        }
        self.log.root_tree = None;
        self.log.roots.clear();
        Ok(())
    }

    /// Run `f` on the log tree of subvolume `subvol`, creating it on first use.
    pub fn modify_log_tree<R>(
        &mut self,
        reader: &BlockReader,
        subvol: u64,
        f: impl FnOnce(&mut TreeWriter<'_, LogAlloc<'_>>, &mut RootPtr) -> Result<R>,
    ) -> Result<R> {
        let nodesize = self.template.nodesize;
        let existing = self.log.roots.get(&subvol).copied();
        let mut alloc = LogAlloc::new(&mut self.space, &mut self.log, nodesize);
        let mut w = TreeWriter::new(reader, &mut alloc, self.transid, self.template);
        let mut root = match existing {
            Some(r) => r,
            None => w.create_root(objectid::TREE_LOG)?,
        };
        let r = f(&mut w, &mut root);
        self.log.roots.insert(subvol, root);
        r
    }

    /// `btrfs_sync_log`: [`Self::sync_log_prepare`] then [`Self::sync_log_finish`], for callers
    /// that hold the locks throughout. Returns the number of log blocks written.
    pub fn sync_log(&mut self, reader: &BlockReader, sb: &SuperBlock) -> Result<usize> {
        let p = self.sync_log_prepare(reader, sb)?;
        Self::sync_log_finish(reader, &p)?;
        self.log.mark_synced(p.log_transid);
        self.log.syncs += 1;
        Ok(p.blocks)
    }

    /// The first half of `btrfs_sync_log`, under the tree lock: record every log tree in the
    /// log root tree, write the dirty log blocks (not flushed yet) and build the superblock
    /// that points at the log root tree. Takes the current log transid and opens the next:
    /// log writes from now on belong to it, and COW the blocks just written (they are no
    /// longer dirty), so the blocks of this sync stay as written.
    pub fn sync_log_prepare(
        &mut self,
        reader: &BlockReader,
        sb: &SuperBlock,
    ) -> Result<PreparedLogSync> {
        use ubtrfs_format::items::RootItem;
        let nodesize = self.template.nodesize;
        let transid = self.transid;
        let logs: Vec<(u64, RootPtr)> = self.log.roots.iter().map(|(k, v)| (*k, *v)).collect();
        {
            let root_tree = self.log.root_tree;
            let mut alloc = LogAlloc::new(&mut self.space, &mut self.log, nodesize);
            let mut w = TreeWriter::new(reader, &mut alloc, transid, self.template);
            let mut lrt = match root_tree {
                Some(r) => r,
                None => w.create_root(objectid::TREE_LOG)?,
            };
            for (subvol, ptr) in logs {
                let item = RootItem {
                    generation: transid,
                    bytenr: ptr.bytenr,
                    level: ptr.level,
                    generation_v2: transid,
                    ..Default::default()
                };
                let key = Key::new(objectid::TREE_LOG, item::ROOT_ITEM, subvol);
                let bytes = item.to_bytes();
                match w.update_item(&mut lrt, &key, &bytes) {
                    Err(Error::NotFound(_)) => w.insert_item(&mut lrt, key, &bytes)?,
                    other => other?,
                }
            }
            self.log.root_tree = Some(lrt);
        }
        let blocks = reader.take_dirty_where(|b| b.header.owner == objectid::TREE_LOG);
        let nblocks = blocks.len();
        write_checked_blocks(reader, blocks, transid)?;
        let lrt = self.log.root_tree.expect("set above");
        let mut raw = sb.raw.clone();
        put_u64(&mut raw, 96, lrt.bytenr);
        raw[200] = lrt.level;
        put_u64(&mut raw, 48, sb_offset(0));
        let csum_type: CsumType = sb.csum_type().map_err(|e| Error::format("superblock", e))?;
        SuperBlock::update_csum_in_raw(&mut raw, csum_type);
        let log_transid = self.log.log_transid;
        self.log.log_transid += 1;
        Ok(PreparedLogSync {
            raw,
            blocks: nblocks,
            log_transid,
        })
    }

    /// The second half of `btrfs_sync_log`, which needs no tree lock (the caller keeps
    /// transaction commits and other log syncs out): flush the log blocks, write the primary
    /// superblock pointing at them, flush. On success the prepared log transid is durable.
    pub fn sync_log_finish(reader: &BlockReader, p: &PreparedLogSync) -> Result<()> {
        reader.flush_devices()?;
        // Only the primary copy, as write_all_supers(fs_info, 1) in btrfs_sync_log.
        let dev = reader
            .devices()
            .next()
            .ok_or_else(|| Error::corrupt("no device"))?;
        dev.write_all_at(&p.raw, sb_offset(0))?;
        reader.flush_devices()?;
        Ok(())
    }

    fn write_supers(&self, reader: &BlockReader, sb: &mut SuperBlock) -> Result<()> {
        let raw = &mut sb.raw;
        let root = self.roots[&objectid::ROOT_TREE];
        put_u64(raw, 72, self.transid);
        put_u64(raw, 80, root.bytenr);
        raw[198] = root.level;
        put_u64(raw, 96, 0); // log_root
        raw[200] = 0;
        if let Some(c) = self.roots.get(&objectid::CHUNK_TREE) {
            put_u64(raw, 88, c.bytenr);
            raw[199] = c.level;
            put_u64(raw, 164, c.generation);
        }
        put_u64(raw, 120, self.space.bytes_used());
        // uuid_tree_generation follows the generation while the UUID tree is maintained.
        if u64_at(raw, 563, "uuid_tree_generation").unwrap_or(0) + 1 == self.transid {
            put_u64(raw, 563, self.transid);
        }
        // Rotate one backup root slot (the one after the newest).
        let newest = sb
            .backups
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| b.tree_root_gen)
            .map(|(i, _)| i)
            .unwrap_or(3);
        let slot = (newest + 1) % 4;
        let get = |id: u64| {
            self.roots.get(&id).copied().unwrap_or(RootPtr {
                bytenr: 0,
                level: 0,
                generation: 0,
                owner: id,
            })
        };
        let (ext, fs5, dev, csum, chunk) = (get(2), get(5), get(4), get(7), get(3));
        let bk = RootBackup {
            tree_root: root.bytenr,
            tree_root_gen: self.transid,
            chunk_root: chunk.bytenr,
            chunk_root_gen: chunk.generation,
            extent_root: ext.bytenr,
            extent_root_gen: ext.generation,
            fs_root: fs5.bytenr,
            fs_root_gen: fs5.generation,
            dev_root: dev.bytenr,
            dev_root_gen: dev.generation,
            csum_root: csum.bytenr,
            csum_root_gen: csum.generation,
            total_bytes: u64_at(raw, 112, "total_bytes").unwrap_or(0),
            bytes_used: self.space.bytes_used(),
            num_devices: u64_at(raw, 136, "num_devices").unwrap_or(1),
            tree_root_level: root.level,
            chunk_root_level: chunk.level,
            extent_root_level: ext.level,
            fs_root_level: fs5.level,
            dev_root_level: dev.level,
            csum_root_level: csum.level,
        };
        let o = 2859 + slot * RootBackup::SIZE;
        for (i, v) in [
            bk.tree_root,
            bk.tree_root_gen,
            bk.chunk_root,
            bk.chunk_root_gen,
            bk.extent_root,
            bk.extent_root_gen,
            bk.fs_root,
            bk.fs_root_gen,
            bk.dev_root,
            bk.dev_root_gen,
            bk.csum_root,
            bk.csum_root_gen,
            bk.total_bytes,
            bk.bytes_used,
            bk.num_devices,
        ]
        .into_iter()
        .enumerate()
        {
            put_u64(raw, o + i * 8, v);
        }
        for (i, l) in [
            bk.tree_root_level,
            bk.chunk_root_level,
            bk.extent_root_level,
            bk.fs_root_level,
            bk.dev_root_level,
            bk.csum_root_level,
        ]
        .into_iter()
        .enumerate()
        {
            raw[o + 152 + i] = l;
        }
        sb.backups[slot] = bk;
        let csum_type: CsumType = sb.csum_type().map_err(|e| Error::format("superblock", e))?;
        for dev in reader.devices() {
            for m in 0..SUPER_MIRROR_MAX {
                let off = sb_offset(m);
                if off + SUPER_INFO_SIZE as u64 > dev.size {
                    break;
                }
                let mut copy = sb.raw.clone();
                put_u64(&mut copy, 48, off);
                SuperBlock::update_csum_in_raw(&mut copy, csum_type);
                dev.write_all_at(&copy, off)?;
            }
        }
        // Keep the parsed view in sync with the bytes.
        let mut primary = sb.raw.clone();
        put_u64(&mut primary, 48, sb_offset(0));
        SuperBlock::update_csum_in_raw(&mut primary, csum_type);
        *sb =
            SuperBlock::parse(&primary).map_err(|e| Error::format("superblock after commit", e))?;
        Ok(())
    }
}

/// Data chunks are at most this large (`BTRFS_MAX_DATA_CHUNK_SIZE` caps the kernel at 10 GiB
/// with 1 GiB stripes; a single device gets 1 GiB).
const MAX_DATA_STRIPE: u64 = 1 << 30;
const MAX_META_STRIPE: u64 = 256 << 20;
const SYSTEM_STRIPE: u64 = 32 << 20;
/// `BTRFS_DEVICE_RANGE_RESERVED`: the first MiB of every device is never allocated.
const DEVICE_RANGE_RESERVED: u64 = 1 << 20;
const STRIPE_LEN: u64 = 64 << 10;

impl Transaction {
    /// Free metadata (or system) bytes across groups of that kind.
    pub fn free_of_kind(&self, kind: crate::block_group::AllocKind) -> (u64, u64) {
        use crate::block_group::AllocKind;
        let mut free = 0;
        let mut total = 0;
        for g in self.space.groups.values() {
            let ok = match kind {
                AllocKind::Data => g.is_data(),
                AllocKind::Metadata => g.is_metadata(),
                AllocKind::System => g.is_system(),
            };
            if ok {
                free += g.free_bytes();
                total += g.length;
            }
        }
        (free, total)
    }

    /// Allocate metadata or system chunks ahead of need (`btrfs_chunk_alloc` from the
    /// reservation path): when free metadata falls under a fifth of its groups or 8 MiB, and
    /// system under 1 MiB. Returns whether a chunk was added. ENOSPC on the device is not an
    /// error here (the allocation that needs the space reports it).
    pub fn maybe_alloc_meta_chunks(
        &mut self,
        reader: &BlockReader,
        sb: &mut SuperBlock,
    ) -> Result<bool> {
        use crate::block_group::AllocKind;
        let mut added = false;
        let (sfree, _) = self.free_of_kind(AllocKind::System);
        if sfree < (1 << 20) {
            added |= self.try_alloc_chunk(reader, sb, AllocKind::System)?;
        }
        let (mfree, mtotal) = self.free_of_kind(AllocKind::Metadata);
        if mfree < (8 << 20).min(mtotal / 2) || mfree * 5 < mtotal {
            added |= self.try_alloc_chunk(reader, sb, AllocKind::Metadata)?;
        }
        Ok(added)
    }

    /// `btrfs_create_chunk` + `btrfs_make_block_group`, tolerating a full device (Ok(false)).
    pub fn try_alloc_chunk(
        &mut self,
        reader: &BlockReader,
        sb: &mut SuperBlock,
        kind: crate::block_group::AllocKind,
    ) -> Result<bool> {
        match self.alloc_chunk(reader, sb, kind) {
            Ok(_) => Ok(true),
            Err(Error::NoSpace(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Allocate a new chunk of `kind` on the (single) device: chunk item, device extents,
    /// device item bytes_used, block group item, free space (the next commit writes its free
    /// space tree entries) and, for system chunks, the superblock's sys_chunk_array.
    pub fn alloc_chunk(
        &mut self,
        reader: &BlockReader,
        sb: &mut SuperBlock,
        kind: crate::block_group::AllocKind,
    ) -> Result<u64> {
        use crate::block_group::{AllocKind, BlockGroup};
        use ubtrfs_format::items::{bg_flags, ChunkItem, DevExtent, DevItem, Stripe};
        let flags = self
            .space
            .groups
            .values()
            .find(|g| match kind {
                AllocKind::Data => g.is_data(),
                AllocKind::Metadata => g.is_metadata(),
                AllocKind::System => g.is_system(),
            })
            .map(|g| g.flags)
            .unwrap_or(match kind {
                AllocKind::Data => bg_flags::DATA,
                AllocKind::Metadata => bg_flags::METADATA | bg_flags::DUP,
                AllocKind::System => bg_flags::SYSTEM | bg_flags::DUP,
            });
        let profile = flags & bg_flags::PROFILE_MASK;
        let num_stripes: u64 = match profile {
            0 => 1,
            bg_flags::DUP => 2,
            _ => {
                return Err(Error::Unsupported(format!(
                    "allocating chunks of profile {profile:#x} on one device"
                )))
            }
        };
        // The device and its current extents.
        let dev_key = Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, sb.dev_item.devid);
        let chunk_root = self.roots[&objectid::CHUNK_TREE];
        let dev_data = lookup_item(reader, &chunk_root, &dev_key)?
            .ok_or_else(|| Error::corrupt("no DEV_ITEM in the chunk tree"))?;
        let mut dev = DevItem::parse(&dev_data).map_err(|e| Error::format("dev item", e))?;
        let dev_root = self.roots[&objectid::DEV_TREE];
        let mut used: Vec<(u64, u64)> = Vec::new();
        for r in TreeIter::new(reader, dev_root, Key::new(dev.devid, item::DEV_EXTENT, 0)) {
            let (k, b, s) = r?;
            if k.objectid != dev.devid || k.item_type != item::DEV_EXTENT {
                break;
            }
            let de = b.item_data(s).map_err(|e| Error::format("dev extent", e))?;
            let len =
                u64_at(de, 24, "dev extent length").map_err(|e| Error::format("dev extent", e))?;
            used.push((k.offset, len));
        }
        let mut holes = Vec::new();
        let mut pos = DEVICE_RANGE_RESERVED;
        for &(s, l) in &used {
            if s > pos {
                holes.push((pos, s - pos));
            }
            pos = pos.max(s + l);
        }
        if dev.total_bytes > pos {
            holes.push((pos, dev.total_bytes - pos));
        }
        let total = sb.total_bytes;
        let want_stripe = match kind {
            AllocKind::Data => MAX_DATA_STRIPE.min((total / 10).max(16 << 20)),
            AllocKind::Metadata => MAX_META_STRIPE.min((total / 10).max(16 << 20)),
            AllocKind::System => SYSTEM_STRIPE.min((total / 10).max(8 << 20)),
        };
        let want_stripe = want_stripe / STRIPE_LEN * STRIPE_LEN;
        // First hole that fits every stripe; otherwise the largest hole, shrunk.
        let (phys, stripe) = match holes.iter().find(|&&(_, l)| l >= want_stripe * num_stripes) {
            Some(&(s, _)) => (s, want_stripe),
            None => {
                let &(s, l) = holes
                    .iter()
                    .max_by_key(|&&(_, l)| l)
                    .ok_or_else(|| Error::NoSpace("no unallocated device space".into()))?;
                let st = l / num_stripes / STRIPE_LEN * STRIPE_LEN;
                if st < (1 << 20) {
                    return Err(Error::NoSpace("no unallocated device space".into()));
                }
                (s, st)
            }
        };
        let logical = reader
            .chunks()
            .iter()
            .map(|c| c.logical + c.item.length)
            .max()
            .unwrap_or(0)
            .max(1 << 20);
        let stripes: Vec<Stripe> = (0..num_stripes)
            .map(|i| Stripe {
                devid: dev.devid,
                offset: phys + i * stripe,
                dev_uuid: dev.uuid,
            })
            .collect();
        let chunk = ChunkItem {
            length: stripe,
            owner: objectid::EXTENT_TREE,
            stripe_len: STRIPE_LEN,
            chunk_type: flags,
            io_align: reader.sectorsize,
            io_width: reader.sectorsize,
            sector_size: reader.sectorsize,
            num_stripes: num_stripes as u16,
            sub_stripes: 1,
            stripes: stripes.clone(),
        };
        reader
            .chunks_mut()
            .insert(logical, chunk.clone(), reader.sectorsize)?;
        // Free space of the new group: all of it but the superblock copies it holds.
        let mut free = BTreeMap::new();
        free.insert(logical, stripe);
        let mut group = BlockGroup {
            start: logical,
            length: stripe,
            flags,
            used: 0,
            free,
            pinned: BTreeMap::new(),
            reserved: BTreeMap::new(),
            fst_bitmaps: false,
            dirty: true,
        };
        for (l, len) in crate::block_group::super_stripes(logical, &chunk) {
            group.exclude(l, len);
        }
        self.space.groups.insert(logical, group);
        // Items.
        let chunk_key = Key::new(objectid::FIRST_CHUNK_TREE, item::CHUNK_ITEM, logical);
        let chunk_bytes = chunk.to_bytes();
        self.modify_tree(reader, objectid::CHUNK_TREE, |w, r| {
            w.insert_item(r, chunk_key, &chunk_bytes)
        })?;
        for st in &stripes {
            let de = DevExtent {
                chunk_tree: objectid::CHUNK_TREE,
                chunk_objectid: objectid::FIRST_CHUNK_TREE,
                chunk_offset: logical,
                length: stripe,
                chunk_tree_uuid: self.template.chunk_tree_uuid,
            };
            let k = Key::new(dev.devid, item::DEV_EXTENT, st.offset);
            let b = de.to_bytes();
            self.modify_tree(reader, objectid::DEV_TREE, |w, r| w.insert_item(r, k, &b))?;
        }
        dev.bytes_used += stripe * num_stripes;
        let dev_bytes = dev.to_bytes();
        self.modify_tree(reader, objectid::CHUNK_TREE, |w, r| {
            w.update_item(r, &dev_key, &dev_bytes)
        })?;
        let bgi = BlockGroupItem {
            used: 0,
            chunk_objectid: objectid::FIRST_CHUNK_TREE,
            flags,
        }
        .to_bytes();
        let bg_key = Key::new(logical, item::BLOCK_GROUP_ITEM, stripe);
        let bg_tree = self.bg_tree;
        self.modify_tree(reader, bg_tree, |w, r| w.insert_item(r, bg_key, &bgi))?;
        // The superblock's copy of the device item, and the system chunk array.
        put_u64(&mut sb.raw, 201 + 16, dev.bytes_used);
        sb.dev_item.bytes_used = dev.bytes_used;
        if kind == AllocKind::System {
            let at = 811 + sb.sys_chunk_array_size as usize;
            let need = ubtrfs_format::key::Key::SIZE + chunk_bytes.len();
            if at + need > 811 + ubtrfs_format::super_block::SYSTEM_CHUNK_ARRAY_SIZE {
                return Err(Error::NoSpace("sys_chunk_array is full".into()));
            }
            chunk_key.encode(&mut sb.raw, at);
            sb.raw[at + 17..at + need].copy_from_slice(&chunk_bytes);
            sb.sys_chunk_array_size += need as u32;
            ubtrfs_format::bytes::put_u32(&mut sb.raw, 160, sb.sys_chunk_array_size);
            sb.sys_chunk_array =
                sb.raw[811..811 + ubtrfs_format::super_block::SYSTEM_CHUNK_ARRAY_SIZE].to_vec();
        }
        tracing::info!("allocated {kind:?} chunk at logical {logical}, {stripe} bytes x{num_stripes} at physical {phys}");
        self.changes += 1;
        // btrfs_make_block_group: a log written in this transaction could point into the new
        // block group, whose chunk and block group items only the commit makes durable; log
        // replay would then find extents in no block group. fsync must commit instead.
        self.log.full_commit.get_or_insert("new block group");
        Ok(logical)
    }
}

/// Write dirty tree blocks of transaction `transid` (not flushed): each checked by the
/// tree-checker and checksummed on a copy, then written in address order, one vectored write
/// per run of adjacent blocks and per copy ([`BlockReader::write_tree_blocks`]). At most
/// `BATCH` copies are held at a time, so a large commit does not hold a second copy of all
/// it writes.
fn write_checked_blocks(
    reader: &BlockReader,
    mut blocks: Vec<std::sync::Arc<ubtrfs_format::tree_block::TreeBlock>>,
    transid: u64,
) -> Result<()> {
    const BATCH: usize = 256;
    blocks.sort_unstable_by_key(|b| b.header.bytenr);
    for batch in blocks.chunks(BATCH) {
        let mut out = Vec::with_capacity(batch.len());
        for b in batch {
            let mut b = (**b).clone();
            crate::tree_checker::check_block(&b, reader.sectorsize, transid).map_err(|e| {
                Error::corrupt(format!(
                    "tree-checker refused writing block {} (owner {}): {e}",
                    b.header.bytenr, b.header.owner
                ))
            })?;
            b.update_csum(reader.csum_type);
            out.push(b);
        }
        let mut runs: Vec<(u64, &[u8])> =
            out.iter().map(|b| (b.header.bytenr, &b.data[..])).collect();
        reader.write_tree_blocks(&mut runs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: log transid N is being synced while writers of N+1 already free log
    // blocks (the overlap `FsInfo::sync_log` allows). N's sync completing releases only what
    // was freed while N (or earlier) was open; what N+1 freed is still pointed at by N's log,
    // which N's superblock made the durable one, and waits for N+1's sync.
    //
    //   log transid N open        frees 100
    //   sync N prepares           (log transid N+1 opens)
    //                             writer of N+1 frees 200 (N's tree holds it)
    //   sync N durable            100 reusable, 200 not
    //   sync N+1 durable          200 reusable
    #[test]
    fn mark_synced_releases_only_blocks_freed_before_the_synced_log_transid() {
        let mut log = LogState {
            log_transid: 5,
            ..LogState::default()
        };
        log.freed.push((5, 100));
        log.log_transid = 6; // sync 5 prepared
        log.freed.push((6, 200));
        log.mark_synced(5);
        assert_eq!(log.synced_upto, 6);
        assert_eq!(log.reusable, vec![100]);
        assert_eq!(log.freed, vec![(6, 200)]);
        log.mark_synced(6);
        assert_eq!(log.synced_upto, 7);
        assert_eq!(
            log.reusable,
            vec![200, 100],
            "lowest address handed out first"
        );
        assert!(log.freed.is_empty());
    }
}
