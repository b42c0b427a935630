//! Scheduling points for a deterministic race explorer (cargo feature `sched-points`).
//!
//! A [`SchedPoint`] marks a place where the kernel's code can be preempted or drops a lock
//! (between logged maps, inside the shrinker's loops, between the two halves of a range
//! replacement, at lock breaks). With the feature on, the per-filesystem hook set by
//! `FsExtentMaps::set_sched_hook` is called there. With the feature off the calls
//! compile to nothing.
//!
//! Contract for hook authors: the hook is never called while the extent-map tree lock or the
//! inode registry lock is held, so a cooperative scheduler can park the calling thread and run
//! another one without deadlocking on those locks. The inode lock and mmap lock (sleeping locks
//! in the kernel) may be held by the caller, exactly as in the kernel.

/// A place where the kernel can be preempted or drops a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SchedPoint {
    /// Before `btrfs_add_extent_mapping` takes the tree lock.
    AddBegin,
    /// `btrfs_drop_extent_map_range`: spares allocated, tree lock not yet taken.
    DropRangeBegin,
    /// `btrfs_replace_extent_map_range`: range dropped, tree lock released, insert not yet done.
    ReplaceBetweenDropAndInsert,
    /// `drop_all_extent_maps_fast`: lock break (`cond_resched_rwlock_write`).
    DropAllLockBreak,
    /// Before `btrfs_split_extent_map` takes the tree lock.
    SplitBegin,
    /// Before `btrfs_unpin_extent_cache` takes the tree lock.
    UnpinBegin,
    /// `btrfs_log_changed_extents`: before the tree lock is taken to collect the modified list.
    LogCollect,
    /// `btrfs_log_changed_extents`: tree lock dropped, the caller is about to log this map.
    LogOneExtent,
    /// `btrfs_log_changed_extents`: the map was logged, the tree lock is about to be retaken.
    LogRelock,
    /// Shrinker worker: `cond_resched` before looking up the next root.
    ShrinkerNextRoot,
    /// `btrfs_scan_root`: `cond_resched` between two inodes.
    ShrinkerNextInode,
    /// Before the modified list is emptied by full logging.
    ClearModifiedBegin,
}

/// The hook type: a plain function, so that it can be stored and copied freely.
pub type SchedHook = fn(SchedPoint);
