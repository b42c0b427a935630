//! The extent-map side of fast fsync: `btrfs_log_changed_extents` (tree-log.c).
//!
//! # Operation (the kernel's order)
//! 1. Under the tree lock, take every entry off the modified list (head first). Each entry
//!    counts one unit; past 32768 units the rest of the list is detached (it stays a ring of
//!    its own: those maps remain "listed" though unreachable) and the pass fails with
//!    [`EmError::TooManyModified`] (the fsync falls back to a full commit). Maps older than
//!    `transid` and PREALLOC maps at or beyond `i_size` are skipped (just unlinked). Every other
//!    map gets a reference, LOGGING, and goes on this pass's private list (one more unit).
//!    (While this is the only pass, the flag of the maps in the tree is recorded rather than
//!    written into the tree's leaves, and written only if another critical section begins
//!    before the pass clears it: see `VirtualLogging` in extent_map.rs.)
//! 2. The private list is sorted by start.
//! 3. For each map: unlink it from the private list, release the tree lock, let the caller log
//!    it ([`LoggingPass::next_extent`] returns a copy), retake the lock, `btrfs_clear_em_logging`
//!    (clears LOGGING, merges if still in the tree), drop the reference. After an error the
//!    remaining maps are only cleared and released.
//!
//! A map another task unlinks from the private list in the meantime (the kernel-policy split,
//! KERNEL-SEMANTICS.md section 5) is simply not there any more when its turn comes: it is never
//! logged and this pass's reference to it is leaked, counted in [`crate::Stats::leaked_refs`]
//! and [`crate::Stats::logging_maps_lost`].

use std::sync::atomic::Ordering;

use crate::em::{flags, EmError, ExtentMap};
use crate::extent_map::{BtrfsInode, EmId, LogCursor};
use crate::sched::SchedPoint;
use crate::stats::{Counters, Invariant};

/// Units of the modified list one fast fsync may process (`++num > 32768`).
pub const MAX_LOGGED_UNITS: usize = 32768;

/// One running `btrfs_log_changed_extents` pass over an inode's modified maps.
///
/// The caller holds the inode lock and the mmap lock exclusively (as `btrfs_sync_file` does);
/// the tree lock is held only inside this type's methods, never while the caller logs a map.
/// Dropping the pass without finishing it treats the remaining maps like the error path.
pub struct LoggingPass<'a> {
    inode: &'a BtrfsInode,
    pass: u64,
    /// Private list, sorted by start: link sequence numbers.
    order: std::ops::Range<u64>,
    /// The map handed out last (identity, start, length), to clear and release before handing
    /// out the next. The pass holds its identity (the id is not reused) until then.
    current: Option<(EmId, u64, u64)>,
    /// Where `current` was left in the tree at the end of the previous critical section.
    cursor: Option<LogCursor>,
    err: bool,
    efbig: bool,
    /// Maps handed out and not yet added to [`crate::Stats::maps_logged`] (added once, when
    /// the pass ends, to keep the shared counters' cache line quiet).
    logged: u64,
    /// Change of the evictable count by this pass's merges, added to the shared counter when
    /// the pass ends (as the kernel's per-CPU counter batches it; the count read meanwhile is
    /// off by at most the number of maps this pass merged away).
    evictable_delta: i64,
}

/// Why `btrfs_log_changed_extents` failed.
#[derive(Debug, PartialEq, Eq)]
pub enum LogError<E> {
    /// -EFBIG: too many modified maps; fall back to a full transaction commit.
    TooManyModified,
    /// The caller's per-map logging failed.
    LogOneExtent(E),
}

impl BtrfsInode {
    /// Starts `btrfs_log_changed_extents` for transaction `transid` with the inode's current
    /// `i_size`: collects, marks LOGGING and sorts (steps 1 and 2).
    pub fn btrfs_log_changed_extents_begin(&self, transid: u64, i_size: u64) -> LoggingPass<'_> {
        self.sched(SchedPoint::LogCollect);
        let mut l = self.lock_tree_no_reclaim();
        // Setting LOGGING changes no mapping: publish at the end of the pass.
        l.defer_publish = true;
        let pass = l.next_pass_id();
        let mut collected = Vec::with_capacity(l.modified_len().min(MAX_LOGGED_UNITS));
        let take = |v: &ExtentMap| {
            v.generation >= transid && !(v.has(flags::PREALLOC) && v.start >= i_size)
        };
        if l.modified_len().saturating_mul(2) <= MAX_LOGGED_UNITS {
            // Each map counts at most two units, so -EFBIG cannot happen, and in which order
            // the maps are examined changes nothing (all under this lock): examine them in
            // start order, one descent per B+tree leaf. The stable sort of the list in walk
            // order gives the private list the order the general path gives it below.
            for e in l.take_modified() {
                if l.is_freed(e.id) {
                    let v = l.listed_value(e);
                    l.violation(Invariant::UseAfterFree, &v);
                    continue;
                }
                collected.push(Some(e));
            }
            collected.sort_by_key(|e| e.as_ref().map(|e| e.start));
            // The flags of the maps in the tree are only recorded (`VirtualLogging`) unless
            // another pass's are.
            if !l.record_logging_sorted(&mut collected, take, pass) {
                l.set_logging_sorted(&mut collected, take);
            }
            collected.retain(Option::is_some);
            let order = l.list_add_logging(collected, pass);
            drop(l);
            return LoggingPass {
                inode: self,
                pass,
                order,
                current: None,
                cursor: None,
                err: false,
                efbig: false,
                logged: 0,
                evictable_delta: 0,
            };
        }
        let mut rest = l.take_modified();
        let mut num = 0usize;
        let mut efbig = false;
        for e in rest.by_ref() {
            if l.is_freed(e.id) {
                // The kernel would walk through freed memory here (list corruption).
                let v = l.listed_value(e);
                l.violation(Invariant::UseAfterFree, &v);
                continue;
            }
            num += 1;
            if num > MAX_LOGGED_UNITS {
                efbig = true;
                break;
            }
            if l.set_logging_if(e, take).is_none() {
                continue;
            }
            l.get_ref(e.id);
            collected.push(Some(e));
            num += 1;
        }
        // After -EFBIG the rest of the list is detached from the head but still linked to
        // itself: those maps stay "listed" (never merged) though no walk reaches them.
        for e in rest {
            l.relink_detached(e.id);
        }
        if !efbig {
            collected.sort_by_key(|e| e.as_ref().map(|e| e.start));
        }
        let order = l.list_add_logging(collected, pass);
        drop(l);
        LoggingPass {
            inode: self,
            pass,
            order,
            current: None,
            cursor: None,
            err: efbig,
            efbig,
            logged: 0,
            evictable_delta: 0,
        }
    }

    /// `btrfs_log_changed_extents` (extent-map side): `log_one_extent` is called for each
    /// collected map in start order, without the tree lock held.
    pub fn btrfs_log_changed_extents<E>(
        &self,
        transid: u64,
        i_size: u64,
        mut log_one_extent: impl FnMut(&ExtentMap) -> Result<(), E>,
    ) -> Result<(), LogError<E>> {
        let mut pass = self.btrfs_log_changed_extents_begin(transid, i_size);
        let mut first_err = None;
        while let Some(em) = pass.next_extent() {
            if let Err(e) = log_one_extent(&em) {
                pass.set_error();
                first_err.get_or_insert(e);
            }
        }
        let res = pass.finish();
        match (res, first_err) {
            (Err(_), _) => Err(LogError::TooManyModified),
            (Ok(()), Some(e)) => Err(LogError::LogOneExtent(e)),
            (Ok(()), None) => Ok(()),
        }
    }
}

impl LoggingPass<'_> {
    /// This pass's id (for tests and tracing).
    pub fn id(&self) -> u64 {
        self.pass
    }

    /// Finishes the map handed out last (clear LOGGING, merge, release) and hands out the next
    /// one, or returns `None` when the private list is empty. The returned copy is what
    /// `log_one_extent` reads; the tree lock is not held when this returns.
    pub fn next_extent(&mut self) -> Option<ExtentMap> {
        if self.current.is_some() {
            self.inode.sched(SchedPoint::LogRelock);
        }
        // This pass's own section: a gap its previous section left is continued or removed
        // by `clear_em_logging_peek` (see `Gap`).
        let mut l = self.inode.lock_tree_keep_gap();
        // Clearing LOGGING and the merges it allows change no mapping; the version is
        // published when the private list is exhausted (below) or by any other writer.
        l.defer_publish = true;
        if self.current.is_none() {
            // Nothing of this pass to continue.
            l.close_gap();
        }
        let mut next_value = None;
        if let Some((id, start, len)) = self.current.take() {
            l.clear_current(self.pass, false);
            // The next map's value comes for free when it is the neighbour in the same leaf.
            let next = (!self.err)
                .then(|| l.w.logging.peek_id(self.order.start))
                .flatten();
            let (s, n) = l
                .clear_em_logging_peek(id, start, next, &mut self.cursor, &mut next_value)
                .unwrap_or((start, len));
            l.put_range(id, s, n);
            l.release(id);
        }
        loop {
            let Some(seq) = self.order.next() else {
                l.close_gap();
                l.clear_current(self.pass, true);
                l.defer_publish = false;
                l.w.logging.end_pass(self.pass);
                l.evictable_delta += std::mem::take(&mut self.evictable_delta);
                if self.logged > 0 {
                    let c = &self.inode.core.counters.maps_logged;
                    c.fetch_add(std::mem::take(&mut self.logged), Ordering::Relaxed);
                }
                return None;
            };
            let Some(entry) = l.logging_remove(seq) else {
                // Unlinked by another task: never logged, our reference leaked.
                Counters::inc(&self.inode.core.counters.logging_maps_lost);
                Counters::inc(&self.inode.core.counters.leaked_refs);
                continue;
            };
            let mut v = match next_value.take() {
                Some(v) => v,
                None => l.listed_value(entry),
            };
            if self.err {
                let (s, n) = l
                    .clear_em_logging(entry.id, v.start)
                    .unwrap_or((v.start, v.len));
                l.put_range(entry.id, s, n);
                continue;
            }
            self.logged += 1;
            l.hand_out(self.pass, entry, &mut v);
            l.hold(entry.id);
            self.current = Some((entry.id, v.start, v.len));
            self.evictable_delta += std::mem::take(&mut l.evictable_delta);
            drop(l);
            self.inode.sched(SchedPoint::LogOneExtent);
            return Some(v);
        }
    }

    /// The caller's `log_one_extent` failed: the map handed out last and all remaining ones are
    /// only cleared and released.
    pub fn set_error(&mut self) {
        self.err = true;
    }

    /// Clears and releases whatever is left; `Err(TooManyModified)` if the modified list was
    /// over the limit.
    pub fn finish(mut self) -> Result<(), EmError> {
        self.drain();
        if self.efbig {
            Err(EmError::TooManyModified)
        } else {
            Ok(())
        }
    }

    fn drain(&mut self) {
        if self.current.is_none() && self.order.is_empty() {
            return;
        }
        self.err = true;
        while self.next_extent().is_some() {}
    }
}

impl Drop for LoggingPass<'_> {
    fn drop(&mut self) {
        self.drain();
    }
}
