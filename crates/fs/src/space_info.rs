//! Space reservation (the kernel's space-info.c, block-rsv.c and the data half of
//! delalloc-space.c): an operation finds out that the filesystem is full *before* it changes
//! anything, so a full filesystem answers ENOSPC and stays consistent.
//!
//! # Definitions
//! - *Metadata reservation*: a write operation ([`FsInfo::write_op_rsv`]) declares how many
//!   items it changes; it may start only if the metadata block groups have
//!   `btrfs_calc_insert_metadata_size(items)` = nodesize × `BTRFS_MAX_LEVEL` × 2 bytes per item
//!   free, plus the global reserve unless it may steal from it. The check happens under the
//!   tree lock, so between operations nothing else consumes the space it saw; operations run
//!   one at a time, so the bytes are not held after the operation ends (the kernel holds them
//!   in a block reserve because its operations run concurrently).
//! - *Global reserve* (`fs_info->global_block_rsv`, sized by `btrfs_update_global_block_rsv`):
//!   metadata that ordinary operations must leave free. Unlink, rmdir, the eviction of an
//!   unlinked inode and a shrinking truncate may use it ([`Flush::Steal`], the kernel's
//!   `BTRFS_RESERVE_FLUSH_ALL_STEAL` / `FLUSH_EVICT`), so space can always be given back, and
//!   the commit that follows always finds room for the extent, free space and root trees.
//! - *Data reservation* (`btrfs_check_data_free_space`, the data space_info's `bytes_may_use`):
//!   bytes promised to buffered writes that are not yet written back, and to a fallocate in
//!   progress. [`FsInfo::data_may_use`] is their sum. A reservation succeeds only while
//!   free data space (not pinned) ≥ `bytes_may_use` + the request; data chunks are allocated
//!   at reservation time, so what a reservation promised exists in a data block group and
//!   metadata chunks cannot take it afterwards. The common case takes no lock: it compares
//!   the free space published by the last write operation or commit (`publish_space`) with
//!   `bytes_may_use` and adds itself with a compare-and-swap; whoever allocates reserved
//!   bytes lowers the published free space before releasing the reservation, so the check
//!   is never optimistic. A request that all unallocated device space could not satisfy
//!   fails without allocating chunks.
//! - *NORESERVE sectors*: when a buffered write finds no data space, the part of it that can
//!   be written in place (a preallocated extent, an unshared extent of a NODATACOW file:
//!   `btrfs_check_nocow_lock`) is accepted with its metadata reserved and no data; if its
//!   writeback has to copy-on-write after all, those bytes join `bytes_may_use` unchecked
//!   ([`InodeRsv::add_unreserved`], as `fallback_to_cow` does) and the allocation may fail.
//! - *Reserved extents*: writeback allocates a run's extents, writes the data without locks
//!   and only then adds the extent items (file_write.rs `write_run`); meanwhile the extents are
//!   neither free nor used, and listed free by any commit's free space tree.
//!
//! # Invariants
//! - Between operations, `data_may_use` ≤ free bytes of the data block groups: writeback and
//!   fallocate never run out of data space for reserved bytes (except by the few sectors
//!   [`InodeRsv::settle`] may overcommit for sectors rewritten during their own writeback, and
//!   NORESERVE sectors that must be copied on write after all).
//! - Unlink, rmdir and eviction (in bounded steps, each leaving an orphan item and a
//!   consistent inode) succeed on a full filesystem.
//! - A write operation that fails after it changed the transaction aborts it: the mount turns
//!   read-only (`BTRFS_FS_STATE_ERROR`), nothing more is committed, the last commit is intact.
//!
//! # Before saying ENOSPC (`flush_space`, reduced to the steps that exist here)
//! 1. Allocate a chunk of the kind that is short while the device has unallocated space
//!    (`ALLOC_CHUNK`).
//! 2. If the kind has pinned bytes (freed in the running transaction), or the transaction has
//!    delayed refs (which may free extents when they run), commit, which runs them and unpins
//!    what was freed (`COMMIT_TRANS`), and check again once.
//! 3. ENOSPC.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use ubtrfs_ctree::block_group::AllocKind;
use ubtrfs_ctree::transaction::Transaction;
use ubtrfs_format::super_block::SuperBlock;

/// `BTRFS_MAX_LEVEL`.
const BTRFS_MAX_LEVEL: u64 = 8;
/// `BTRFS_UNLINK_METADATA_UNITS`.
pub const BTRFS_UNLINK_METADATA_UNITS: u64 = 6;

/// Whether a reservation may dip into the global reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// `BTRFS_RESERVE_FLUSH_ALL`: leave the global reserve free.
    All,
    /// `BTRFS_RESERVE_FLUSH_ALL_STEAL` / `FLUSH_EVICT`: operations that give space back.
    Steal,
}

/// What a write operation reserves: items it changes and whether it may steal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaRsv {
    pub items: u64,
    pub flush: Flush,
}

impl MetaRsv {
    /// The reservation of an operation that does not say: a create's worth (inode item, inode
    /// ref, two dir entries, the parent's inode item, one more for an xattr or extent item),
    /// more than most single operations change.
    pub const DEFAULT: MetaRsv = MetaRsv {
        items: 6,
        flush: Flush::All,
    };

    /// `btrfs_start_transaction_fallback_global_rsv` for unlink and rmdir
    /// (`BTRFS_UNLINK_METADATA_UNITS` items), also used by eviction and shrinking truncate.
    pub const UNLINK: MetaRsv = MetaRsv {
        items: BTRFS_UNLINK_METADATA_UNITS,
        flush: Flush::Steal,
    };

    /// An operation that changes no item: a search of the running transaction's trees (the
    /// decisions of `run_delalloc_nocow`).
    pub const NONE: MetaRsv = MetaRsv {
        items: 0,
        flush: Flush::Steal,
    };

    /// Ordered-extent completion of writeback: its metadata was reserved when the data was
    /// written (`btrfs_delalloc_reserve_metadata`), so it cannot fail for want of space.
    pub const WRITEBACK: MetaRsv = MetaRsv {
        items: 4,
        flush: Flush::Steal,
    };
}

/// `btrfs_calc_insert_metadata_size`: the worst case of inserting `items` items (a COWed
/// path at every level, and a split at every level).
pub fn btrfs_calc_insert_metadata_size(nodesize: u32, items: u64) -> u64 {
    u64::from(nodesize) * BTRFS_MAX_LEVEL * 2 * items
}

/// The global reserve's size as `btrfs_update_global_block_rsv` last set it (at mount and
/// after every commit, from the ROOT_ITEMs' `bytes_used`, which commits keep exact); never
/// under the minimum for an unlink with its delayed refs.
pub fn global_rsv_size(fs: &FsInfo) -> u64 {
    let min_trees = 1 + 3; // root tree, extent, csum, free space
    let per = btrfs_calc_insert_metadata_size(fs.sb.nodesize, 1);
    // btrfs_calc_delayed_ref_bytes doubles with the free space tree.
    let min =
        per * (min_trees + BTRFS_UNLINK_METADATA_UNITS) + per * BTRFS_UNLINK_METADATA_UNITS * 2;
    fs.global_rsv_bytes().max(min).min(512 << 20)
}

/// Outcome of a reservation attempt under the locks.
pub(crate) enum Shortage {
    /// Pinned space of the kind would help: commit and try again.
    Commit,
    /// Nothing helps: ENOSPC.
    NoSpace,
}

/// Allocate chunks of `kind` while `enough` says the groups are short and the device has room.
fn grow(
    fs: &FsInfo,
    t: &mut Transaction,
    sb: &mut SuperBlock,
    kind: AllocKind,
    enough: impl Fn(&Transaction) -> bool,
) -> Result<bool> {
    // Bounded: every successful allocation takes unallocated device space.
    for _ in 0..64 {
        if enough(t) {
            return Ok(true);
        }
        if !t.try_alloc_chunk(&fs.reader, sb, kind)? {
            break;
        }
    }
    Ok(enough(t))
}

/// The metadata check of `btrfs_reserve_metadata_bytes` (with `ALLOC_CHUNK` as the only
/// flush step that does not need the locks dropped). Runs under the tree lock.
pub(crate) fn reserve_metadata_locked(
    fs: &FsInfo,
    t: &mut Transaction,
    rsv: MetaRsv,
    after_commit: bool,
) -> Result<std::result::Result<(), Shortage>> {
    let mut need = btrfs_calc_insert_metadata_size(fs.sb.nodesize, rsv.items);
    if rsv.flush == Flush::All {
        need += global_rsv_size(fs);
    }
    let enough = |t: &Transaction| t.space.free_pinned(AllocKind::Metadata).0 >= need;
    let mut sb = fs.sb_live.lock();
    if grow(fs, t, &mut sb, AllocKind::Metadata, enough)? {
        return Ok(Ok(()));
    }
    let (free, pinned) = t.space.free_pinned(AllocKind::Metadata);
    let can_commit = pinned > 0 || !t.refs.is_empty();
    if rsv.flush == Flush::Steal
        && (after_commit || !can_commit)
        && free >= btrfs_calc_insert_metadata_size(fs.sb.nodesize, 1)
    {
        // Stealing, once a commit has given back what it could: the operation frees more
        // than it takes, and one item's worst case is enough for one step of it.
        return Ok(Ok(()));
    }
    Ok(Err(if can_commit && !after_commit {
        Shortage::Commit
    } else {
        Shortage::NoSpace
    }))
}

/// A data reservation held by an operation (fallocate) or moved into an inode's dirty state
/// (buffered write). Dropping it gives back what was not consumed.
#[derive(Debug)]
pub struct DataRsv {
    pool: Arc<AtomicU64>,
    snap: Arc<AtomicU64>,
    left: u64,
}

impl DataRsv {
    /// Bytes still reserved.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// `n` reserved bytes became an allocated extent (under the tree lock, in the write
    /// operation that allocated them).
    pub fn consume(&mut self, n: u64) {
        let n = n.min(self.left);
        self.left -= n;
        // The published free space first, so that the lock-free check never sees the bytes
        // both free and no longer reserved.
        sub_saturating(&self.snap, n);
        sub_saturating(&self.pool, n);
    }

    /// Hand `n` reserved bytes to an inode's dirty state, which releases them as its sectors
    /// are written back or dropped.
    pub fn transfer(&mut self, n: u64, to: &InodeRsv) {
        let n = n.min(self.left);
        self.left -= n;
        to.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for DataRsv {
    fn drop(&mut self) {
        sub_saturating(&self.pool, self.left);
    }
}

/// Add `bytes` to `may_use` if `free()` covers it and the other reservations (a CAS loop, as
/// reservations are also made without the transaction lock).
fn try_add_may_use(may_use: &AtomicU64, bytes: u64, free: impl Fn() -> u64) -> bool {
    // Bounded by the number of concurrent reservers that can win the race each time.
    for _ in 0..1024 {
        let cur = may_use.load(Ordering::SeqCst);
        if free() < cur.saturating_add(bytes) {
            return false;
        }
        if may_use
            .compare_exchange(cur, cur + bytes, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return true;
        }
    }
    false
}

fn sub_saturating(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The data bytes reserved for one inode's dirty sectors (part of [`FsInfo::data_may_use`]).
#[derive(Debug, Default)]
pub struct InodeRsv {
    pool: Arc<AtomicU64>,
    snap: Arc<AtomicU64>,
    bytes: AtomicU64,
}

impl InodeRsv {
    pub fn new(fs: &FsInfo) -> Arc<InodeRsv> {
        Arc::new(InodeRsv {
            pool: fs.data_may_use.clone(),
            snap: fs.data_free_snap.clone(),
            bytes: AtomicU64::new(0),
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Give back up to `n` bytes: their sectors were dropped.
    pub fn release(&self, n: u64) {
        let taken = self.take(n);
        sub_saturating(&self.pool, taken);
    }

    /// Up to `n` bytes are being allocated as extents (under the transaction lock, in the
    /// write operation that allocates them): the published free space goes down with them.
    pub fn release_allocated(&self, n: u64) {
        let taken = self.take(n);
        sub_saturating(&self.snap, taken);
        sub_saturating(&self.pool, taken);
    }

    fn take(&self, n: u64) -> u64 {
        let mut taken = 0;
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                taken = v.min(n);
                Some(v - taken)
            });
        taken
    }

    /// `n` bytes that were accepted without a reservation (NORESERVE) must be written
    /// copy-on-write after all (`fallback_to_cow`): they join `bytes_may_use` unchecked, as
    /// the kernel's `btrfs_space_info_update_bytes_may_use` does, and the allocation that
    /// follows consumes them or fails with ENOSPC.
    pub fn add_unreserved(&self, n: u64) {
        if n > 0 {
            self.bytes.fetch_add(n, Ordering::Relaxed);
            self.pool.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Make the held bytes equal `want` (the inode's dirty bytes). Normally this releases;
    /// it adds (overcommitting by at most the sectors concerned) only for sectors written again
    /// while their writeback had already consumed their reservation.
    pub fn settle(&self, want: u64) {
        let have = self.bytes();
        if have > want {
            self.release(have - want);
        } else if have < want {
            self.bytes.fetch_add(want - have, Ordering::Relaxed);
            self.pool.fetch_add(want - have, Ordering::Relaxed);
        }
    }
}

impl Drop for InodeRsv {
    fn drop(&mut self) {
        sub_saturating(&self.pool, *self.bytes.get_mut());
    }
}

impl FsInfo {
    /// `btrfs_check_data_free_space` (+ the metadata of `btrfs_delalloc_reserve_metadata` when
    /// `meta_items` > 0): reserve `bytes` of data space, allocating data chunks, committing
    /// once to unpin freed space, or failing with ENOSPC. Must not be called inside a write
    /// operation.
    pub fn btrfs_reserve_data(&self, bytes: u64, meta_items: u64) -> Result<DataRsv> {
        self.reserve_data_meta(bytes, meta_items, false)
    }

    /// `btrfs_delalloc_reserve_metadata` alone: the metadata check of a buffered write that
    /// needs no data space (it goes in place, `btrfs_check_nocow_lock`).
    pub fn btrfs_delalloc_reserve_metadata(&self, meta_items: u64) -> Result<DataRsv> {
        self.reserve_data_meta(0, meta_items, true)
    }

    fn reserve_data_meta(&self, bytes: u64, meta_items: u64, meta_only: bool) -> Result<DataRsv> {
        let trans = self.trans.as_ref().ok_or(FsError::ReadOnly)?;
        let rsv = |left| DataRsv {
            pool: self.data_may_use.clone(),
            snap: self.data_free_snap.clone(),
            left,
        };
        if bytes == 0 && !meta_only {
            return Ok(rsv(0));
        }
        let meta_need = if meta_items > 0 {
            btrfs_calc_insert_metadata_size(self.sb.nodesize, meta_items) + global_rsv_size(self)
        } else {
            0
        };
        if self.is_readonly() {
            return Err(FsError::ReadOnly);
        }
        // Fast path, without locks (a buffered write must not wait for a commit): the free
        // space published by the last write operation or commit, which allocations of reserved
        // bytes lower before they release the reservation.
        if self.meta_free_snap.load(Ordering::Relaxed) >= meta_need {
            let free = || self.data_free_snap.load(Ordering::SeqCst);
            if meta_only || try_add_may_use(&self.data_may_use, bytes, free) {
                return Ok(rsv(bytes));
            }
        }
        let mut committed = false;
        loop {
            if self.is_readonly() {
                return Err(FsError::ReadOnly);
            }
            let shortage = {
                let _g = self.tree_lock.write();
                let mut t = trans.lock();
                let may_use = self.data_may_use.load(Ordering::Relaxed);
                let enough_data = |t: &Transaction| {
                    meta_only
                        || t.space.free_pinned(AllocKind::Data).0 >= may_use.saturating_add(bytes)
                };
                let enough_meta =
                    |t: &Transaction| t.space.free_pinned(AllocKind::Metadata).0 >= meta_need;
                let mut sb = self.sb_live.lock();
                // A request that even all unallocated device space could not satisfy does not
                // turn the whole device into empty data chunks (which metadata would then lack:
                // ubtrfs has no cleaner to delete unused block groups).
                let unallocated = sb
                    .dev_item
                    .total_bytes
                    .saturating_sub(sb.dev_item.bytes_used);
                let (dfree, dpinned) = t.space.free_pinned(AllocKind::Data);
                let possible = dfree.saturating_add(dpinned).saturating_add(unallocated)
                    >= may_use.saturating_add(bytes);
                let before = t.change_mark();
                let r = (|| -> Result<(bool, bool)> {
                    let m = grow(self, &mut t, &mut sb, AllocKind::Metadata, enough_meta)?;
                    let d = if possible {
                        grow(self, &mut t, &mut sb, AllocKind::Data, enough_data)?
                    } else {
                        enough_data(&t)
                    };
                    Ok((m, d))
                })();
                drop(sb);
                let (meta_ok, data_ok) = match r {
                    Ok(v) => v,
                    Err(e) => {
                        if t.change_mark() != before {
                            self.abort_transaction(&t, &e);
                        }
                        return Err(e);
                    }
                };
                self.publish_space(&t);
                let free = || t.space.free_pinned(AllocKind::Data).0;
                if meta_ok
                    && data_ok
                    && (meta_only || try_add_may_use(&self.data_may_use, bytes, free))
                {
                    return Ok(rsv(bytes));
                }
                let (_, dpinned) = t.space.free_pinned(AllocKind::Data);
                let (_, mpinned) = t.space.free_pinned(AllocKind::Metadata);
                if (!data_ok && dpinned > 0) || (!meta_ok && mpinned > 0) || !t.refs.is_empty() {
                    Shortage::Commit
                } else {
                    Shortage::NoSpace
                }
            };
            match shortage {
                Shortage::Commit if !committed => {
                    committed = true;
                    self.commit_for_space()?;
                }
                _ => return Err(FsError::NoSpace),
            }
        }
    }

    /// Publish the free data and metadata bytes for the lock-free reservation check (after
    /// every write operation and commit, under the transaction lock).
    pub(crate) fn publish_space(&self, t: &Transaction) {
        self.data_free_snap
            .store(t.space.free_pinned(AllocKind::Data).0, Ordering::SeqCst);
        self.meta_free_snap
            .store(t.space.free_pinned(AllocKind::Metadata).0, Ordering::SeqCst);
    }

    /// `btrfs_commit_transaction` from the flush machinery (`COMMIT_TRANS`): unpins the space
    /// the running transaction freed.
    pub(crate) fn commit_for_space(&self) -> Result<()> {
        self.counters.enospc_commits.fetch_add(1, Ordering::Relaxed);
        self.commit()?;
        Ok(())
    }
}
