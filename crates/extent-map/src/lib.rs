//! ubtrfs-extent-map: the kernel's per-inode extent-map trees (fs/btrfs/extent_map.c), the
//! extent-map side of fast fsync (tree-log.c `btrfs_log_changed_extents`) and the extent-map
//! shrinker, with epoch-based reclamation instead of the kernel's lock interlock.
//! KERNEL-SEMANTICS.md sections 1, 2, 3 and 5 are the specification; names follow the kernel.
//!
//! # Definitions
//! - [`ExtentMap`]: the value of a map (start, len, disk_bytenr, disk_num_bytes, offset,
//!   ram_bytes, generation, flags). 64 bytes, `Copy`. Lookups return copies.
//! - A *map*: a value plus an identity (`EmNode`: kernel refcount, in-tree bit, list link),
//!   kept in its tree's writer-side identity arena and named by a `u32` index.
//! - [`BtrfsInode`]: per-inode state: the tree, its modified list, the inode lock (`i_rwsem`),
//!   the mmap lock (`i_mmap_lock`), runtime flags (NEEDS_FULL_SYNC, ...).
//! - [`FsExtentMaps`]: per-filesystem state: inode registry keyed by (root, ino), evictable
//!   count, fs generation, policy, shrinker, counters and invariant counters ([`Stats`]).
//! - [`Policy`]: `kernel` (faithful, default), `fixed-split`, `fixed-shrinker`, `fixed-both`
//!   (KERNEL-SEMANTICS.md section 5).
//!
//! # Reclamation design (why a persistent B+tree behind `crossbeam_epoch::Atomic`)
//! Each tree is a persistent (copy-on-write) 32-way B+tree whose current version is published
//! through a `crossbeam_epoch::Atomic<Version>`. Readers (`btrfs_lookup_extent_mapping`,
//! `btrfs_search_extent_mapping`) pin an epoch, load the version and search it: no lock, no
//! reference count, no write to shared memory, so a reader never waits for a writer or for a
//! shrinker scan, and it sees the state at the end of some write-locked critical section (as a
//! kernel reader holding the read lock would). Writers serialise on the tree lock (a mutex: the
//! write side of the kernel's rwlock), change a private working version copy-on-write (a node
//! is copied only while a published version still shares it, changed in place otherwise; the
//! sharing test is `Arc::make_mut`'s, done with plain loads: `btree::cow`), and publish once
//! when they unlock. The replaced version is retired with `Guard::defer`: once
//! every thread pinned at that time has unpinned, the collector moves it to the tree's reclaim
//! queue, and the tree's next writer (or the shrinker's next visit) frees it outside the tree
//! lock, so the cost of freeing stays with the threads that change that tree instead of landing
//! on whichever thread happens to run the collector (measured: an fsync paying for the
//! shrinker's garbage). fsync's logging pass is the one writer that frees nothing: in a busy
//! process the collector runs on other threads and queues the versions the writes before the
//! fsync retired while the pass runs, so every relock of the pass would pay for them (measured:
//! the whole tail of `fsync_vs_shrinker/busy`); the queue stays bounded because the pass retires
//! at most one version and every other writer and the shrinker still free it. Map values live
//! in the versions' leaf slots (`Copy`: a leaf copy is a memory copy, no reference count per
//! map); map identities live in the tree's writer state, indexed by a `u32` the slots carry,
//! and are reused only once no tree slot, list entry or logging pass holds them. Readers never
//! resolve an identity, so ids left in retired versions are harmless.
//!
//! One deliberate refinement: a fast fsync's logging pass (setting and clearing LOGGING and the
//! merges that follow) never changes what any file byte maps to (merged maps are adjacent and
//! physically contiguous), so it publishes once, when its private list is exhausted, instead of
//! at every unlock; readers meanwhile see the previous, mapping-equivalent version. Any other
//! writer's unlock publishes everything pending. The pass also adds its merges' change of the
//! evictable count to the shared counter once, at its end (the kernel's counter is per-CPU and
//! approximate for the same reason). Between its own critical sections the pass may leave two
//! things undone in the working tree, which every other critical section (and every
//! publication) settles first, so that all of them see the kernel's tree: the slots its merges
//! took out of the tree, still in their leaf (one removal per leaf instead of one shift per
//! map), and the LOGGING flags of its maps, recorded but not written into the leaves (writing
//! them copies every leaf the published version shares). The shrinker settles an inode only
//! once it also holds the inode's mmap lock, which fsync holds for the whole pass, so meeting
//! an fsyncing inode costs it and the pass nothing.
//!
//! Costs that shaped the write side (fsync_vs_shrinker, benches/RESULTS-extent-map.md): map
//! bookkeeping that only changes under the tree lock uses plain loads and stores, not atomic
//! read-modify-writes; `try_merge_map` and `btrfs_clear_em_logging` decide and merge inside one
//! B+tree leaf when the neighbours are there (one descent instead of six), and a leaf such an
//! in-leaf merge leaves small is merged with a neighbour as a B+tree removal would (else the
//! map absorbing its successors ends alone in its leaf and every later merge crosses a leaf
//! boundary), except by the logging pass, whose runs of merges cross leaf boundaries on their
//! own and take the leaves they empty out whole; fsync's collection examines its maps in start
//! order, one descent per leaf, whenever the list is too short for -EFBIG (then the order of
//! the walk changes nothing); the modified
//! list and fsync's private lists are vectors in link order rather than ordered maps, of
//! 16-byte entries (identity, start) rather than value copies; map identities in a per-tree
//! arena rather than one `Arc` allocation per map (no atomic reference count per leaf slot
//! copied or per map merged away, and the pass's D1 misses halved: see RESULTS).
//!
//! Alternatives considered: an epoch-protected concurrent skip list (readers could observe the
//! intermediate states of compound operations such as a merge or a split, which the kernel's
//! read lock hides) and an RwLock (readers would wait for the shrinker and for writers). The
//! kernel's reference count is kept as a ledger on each map: its final drop checks the kernel's
//! WARN_ONs and marks the map "freed in the kernel", so the kernel's use-after-free (a map
//! freed while still linked on the modified list) is detected and counted
//! ([`Invariant::FreedWhileInUse`], [`Invariant::UseAfterFree`]) while the memory stays valid.
//!
//! # Invariants (checked always, counted in [`Stats`], reported once through `tracing`)
//! See [`Invariant`]: the shrinker meets a LOGGING map; a LOGGING map exists outside any fsync
//! logging; a removed map stays on the modified list; a map in two trees or on two lists; the
//! final release of a map still in a tree or on a list; a walk meeting a map the kernel freed;
//! a map stolen from fsync's private list; a PINNED map removed. Structural invariants (no
//! overlap, one tree reference per map in a tree, listed maps never merge) are upheld by
//! construction and tested.
//!
//! # Operations
//! [`BtrfsInode`]: `btrfs_lookup_extent_mapping`, `btrfs_search_extent_mapping`,
//! `btrfs_add_extent_mapping`, `btrfs_drop_extent_map_range`, `drop_all_extent_maps_fast`,
//! `btrfs_replace_extent_map_range`, `btrfs_split_extent_map`, `btrfs_unpin_extent_cache`,
//! `btrfs_log_changed_extents` / `btrfs_log_changed_extents_begin` ([`LoggingPass`]),
//! `btrfs_log_inode_clear_modified_extents`, `try_release_extent_mapping`.
//! [`FsExtentMaps`]: `inode`, `evict_inode`, `set_generation`, `btrfs_free_extent_maps`
//! (shrinker), `btrfs_nr_cached_objects`, `btrfs_free_cached_objects`, `memory_pressure`,
//! `set_budget`, `stats`.
//!
//! # Lock order (the one place it is written down)
//! 1. `BtrfsInode::inode_lock` (i_rwsem)
//! 2. `BtrfsInode::mmap_lock` (i_mmap_lock; fsync takes it exclusive)
//! 3. (io_tree range locks of the caller, not in this crate)
//! 4. the extent-map tree lock (internal; taken and released inside each operation, never held
//!    when an operation returns, never held across a [`SchedPoint`] or the caller's
//!    `log_one_extent`)
//! 5. the inode registry lock (internal; `xa_lock` / `fs_roots_radix_lock`), never held while
//!    taking any other lock except by try-lock
//! 6. the shrinker cursor lock and each tree's reclaim-queue lock (internal; leaves: nothing is
//!    taken while holding them, and the reclaim queue is only try-locked by writers)
//!
//! The shrinker is the only code going against this order, and only with try-locks, as the
//! kernel: it try-locks the tree lock while walking the registry and then try-locks the mmap
//! lock shared while holding the tree lock. A budget-triggered scan runs after the tree lock
//! was released. Readers take no lock at all. Atomics: counters are `Relaxed`; the published
//! version pointer is `Acquire`/`AcqRel`.
//!
//! # Race explorer hooks
//! Cargo feature `sched-points`: [`SchedPoint`]s are reported to a per-filesystem hook
//! (`FsExtentMaps::set_sched_hook`) at every point where the kernel can be preempted or drops a
//! lock; without the feature they compile to nothing.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod btree;
mod em;
mod extent_map;
mod fs;
pub mod sched;
mod stats;
mod tree_log;

pub use em::{
    flags, EmError, ExtentMap, Policy, UnknownPolicy, EXTENT_MAP_HOLE, EXTENT_MAP_INLINE,
    EXTENT_MAP_LAST_BYTE,
};
pub use extent_map::{runtime_flags, BtrfsInode, MapInfo};
pub use fs::{FsExtentMaps, MAP_FOOTPRINT_BYTES, SHRINK_BATCH};
pub use sched::SchedPoint;
pub use stats::{Invariant, Stats};
pub use tree_log::{LogError, LoggingPass, MAX_LOGGED_UNITS};

/// Sizes of the types behind one cached map, for the benchmarks' report: (value, B+tree leaf
/// slot, identity in the arena). The kernel's `struct extent_map` is 104 bytes.
pub fn type_sizes() -> (usize, usize, usize) {
    (
        std::mem::size_of::<ExtentMap>(),
        std::mem::size_of::<extent_map::Slot>(),
        std::mem::size_of::<extent_map::EmNode>(),
    )
}

#[cfg(test)]
mod tests;
