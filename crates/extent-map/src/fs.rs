//! Filesystem-wide state: the inode registry keyed by (root id, inode number), the evictable
//! map counter, the policy, the fs generation, counters, budget and the shrinker (extent_map.c
//! `btrfs_free_extent_maps`, `btrfs_extent_map_shrinker_worker`, `btrfs_scan_root`,
//! `find_first_inode_to_shrink`, `btrfs_scan_inode`; super.c `btrfs_nr_cached_objects`,
//! `btrfs_free_cached_objects`).
//!
//! # Shrinker
//! - `btrfs_free_extent_maps(nr)` sets the pending request from 0 to `nr` (a request while one is
//!   pending or running is dropped, as the kernel's cmpxchg) and runs the worker on the calling
//!   thread (the kernel queues it on a workqueue; here the daemon decides which thread calls).
//! - The worker resumes at the cursor (last root, last inode + 1), walks fs-tree roots in id
//!   order and wraps once to root 0 if it did not start there; it stops when `nr_to_scan` maps
//!   were visited or the filesystem is closing.
//! - Per inode (`find_first_inode_to_shrink`): try-lock the tree (busy: skip), skip empty trees,
//!   then `btrfs_scan_inode`: try-lock the mmap lock shared (busy: skip the inode, counted),
//!   visit maps from the first, skip PINNED (and LOGGING under the fixed-shrinker policies),
//!   set NEEDS_FULL_SYNC when removing a listed map of the running generation, remove, drop the
//!   tree's reference; stop on `nr_to_scan`, tree lock contention or unmount.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use crate::em::{flags, Policy};
use crate::extent_map::{is_fstree, BtrfsInode, TryLocked};
#[cfg(feature = "sched-points")]
use crate::sched::SchedHook;
use crate::sched::SchedPoint;
use crate::stats::{Counters, Invariant, Stats};

/// Approximate memory of one cached map, as counted in [`Stats::cached_bytes`]: its slot in a
/// B+tree leaf, its identity in the tree's arena, and its share of the tree's nodes
/// (about one eighth of a leaf's header and of the inner levels).
pub const MAP_FOOTPRINT_BYTES: u64 = (std::mem::size_of::<crate::extent_map::Slot>()
    + std::mem::size_of::<crate::extent_map::EmNode>()
    + 3 * std::mem::size_of::<usize>()) as u64;

/// Keeps a hot atomic on its own cache line.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// State shared by the filesystem and every inode.
pub(crate) struct FsCore {
    policy: AtomicU8,
    generation: AtomicU64,
    /// `evictable_extent_maps` (a percpu counter in the kernel): on its own cache line.
    pub(crate) evictable: Padded<AtomicI64>,
    closing: AtomicBool,
    pub(crate) counters: Counters,
    spare_alloc_failures: AtomicU32,
    budget_maps: AtomicU64,
    budget_bytes: AtomicU64,
    owner: Weak<FsExtentMaps>,
    #[cfg(feature = "sched-points")]
    hook: RwLock<Option<SchedHook>>,
    /// A hook is installed: lets `sched` skip the lock when none is (the feature can be on in
    /// a mounting binary that also links the race explorer).
    #[cfg(feature = "sched-points")]
    has_hook: AtomicBool,
}

impl FsCore {
    pub(crate) fn policy(&self) -> Policy {
        match self.policy.load(Ordering::Relaxed) {
            1 => Policy::FixedSplit,
            2 => Policy::FixedShrinker,
            3 => Policy::FixedBoth,
            _ => Policy::Kernel,
        }
    }

    /// `btrfs_get_fs_generation`.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Allocation of a spare map (`btrfs_alloc_extent_map`); fails while injected failures
    /// remain.
    pub(crate) fn alloc_spare(&self) -> bool {
        self.spare_alloc_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    pub(crate) fn cached_maps(&self) -> u64 {
        self.evictable.load(Ordering::Relaxed).max(0) as u64
    }

    /// Budget trigger: runs a scan for the excess (plus a batch) when over budget. Called
    /// after the tree lock is released.
    pub(crate) fn check_budget(&self) {
        let max_maps = self.budget_maps.load(Ordering::Relaxed);
        let max_bytes = self.budget_bytes.load(Ordering::Relaxed);
        if max_maps == 0 && max_bytes == 0 {
            return;
        }
        let maps = self.cached_maps();
        let mut excess = 0;
        if max_maps != 0 && maps > max_maps {
            excess = maps - max_maps;
        }
        let bytes = maps.saturating_mul(MAP_FOOTPRINT_BYTES);
        if max_bytes != 0 && bytes > max_bytes {
            excess = excess.max((bytes - max_bytes).div_ceil(MAP_FOOTPRINT_BYTES));
        }
        if excess == 0 {
            return;
        }
        if let Some(fs) = self.owner.upgrade() {
            fs.btrfs_free_extent_maps(excess.saturating_add(SHRINK_BATCH));
        }
    }

    #[cfg(feature = "sched-points")]
    pub(crate) fn sched(&self, p: SchedPoint) {
        if !self.has_hook.load(Ordering::Acquire) {
            return;
        }
        let hook = *self.hook.read();
        if let Some(h) = hook {
            h(p);
        }
    }
}

/// Extra maps scanned past a budget overrun (the VFS shrinker batch).
pub const SHRINK_BATCH: u64 = 128;

/// Filesystem-wide state: inode registry keyed by (root id, inode number), evictable count,
/// shrinker, counters, invariant counters.
pub struct FsExtentMaps {
    core: Arc<FsCore>,
    roots: RwLock<BTreeMap<u64, BTreeMap<u64, Arc<BtrfsInode>>>>,
    /// `em_shrinker_nr_to_scan`.
    nr_to_scan: AtomicU64,
    /// `em_shrinker_last_root`, `em_shrinker_last_ino` (under `em_shrinker_lock`).
    cursor: Mutex<(u64, u64)>,
}

impl std::fmt::Debug for FsExtentMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsExtentMaps")
            .field("policy", &self.core.policy())
            .finish_non_exhaustive()
    }
}

/// The shrinker's per-run context (`struct btrfs_em_shrink_ctx`).
struct ShrinkCtx {
    nr_to_scan: u64,
    scanned: u64,
    last_ino: u64,
    last_root: u64,
}

impl FsExtentMaps {
    /// A filesystem with no inodes, running `policy`.
    pub fn new(policy: Policy) -> Arc<Self> {
        Arc::new_cyclic(|owner| FsExtentMaps {
            core: Arc::new(FsCore {
                policy: AtomicU8::new(policy as u8),
                generation: AtomicU64::new(0),
                evictable: Padded(AtomicI64::new(0)),
                closing: AtomicBool::new(false),
                counters: Counters::default(),
                spare_alloc_failures: AtomicU32::new(0),
                budget_maps: AtomicU64::new(0),
                budget_bytes: AtomicU64::new(0),
                owner: owner.clone(),
                #[cfg(feature = "sched-points")]
                hook: RwLock::new(None),
                #[cfg(feature = "sched-points")]
                has_hook: AtomicBool::new(false),
            }),
            roots: RwLock::new(BTreeMap::new()),
            nr_to_scan: AtomicU64::new(0),
            cursor: Mutex::new((0, 0)),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.core.policy()
    }

    /// Switches the policy (tests; a mount sets it once).
    pub fn set_policy(&self, policy: Policy) {
        self.core.policy.store(policy as u8, Ordering::Relaxed);
    }

    /// Gets or creates the per-inode state. Maps of fs-tree roots (5 and 256..2^48) are counted
    /// as evictable and visited by the shrinker.
    pub fn inode(&self, root: u64, ino: u64) -> Arc<BtrfsInode> {
        if let Some(i) = self.roots.read().get(&root).and_then(|r| r.get(&ino)) {
            return i.clone();
        }
        self.roots
            .write()
            .entry(root)
            .or_default()
            .entry(ino)
            .or_insert_with(|| Arc::new(BtrfsInode::new(self.core.clone(), root, ino)))
            .clone()
    }

    /// The per-inode state if it exists.
    pub fn lookup_inode(&self, root: u64, ino: u64) -> Option<Arc<BtrfsInode>> {
        self.roots.read().get(&root)?.get(&ino).cloned()
    }

    /// Inode eviction: removes the inode from the registry and drops all its maps, clearing
    /// PINNED and LOGGING (`drop_all_extent_maps_fast`).
    pub fn evict_inode(&self, root: u64, ino: u64) {
        let inode = {
            let mut roots = self.roots.write();
            let Some(r) = roots.get_mut(&root) else {
                return;
            };
            let i = r.remove(&ino);
            if r.is_empty() {
                roots.remove(&root);
            }
            i
        };
        if let Some(inode) = inode {
            inode.drop_all_extent_maps_fast();
        }
    }

    /// Sets the fs generation (last committed transid) the shrinker compares against
    /// (`btrfs_get_fs_generation`).
    pub fn set_generation(&self, gen: u64) {
        self.core.generation.store(gen, Ordering::Release);
    }

    /// The fs generation.
    pub fn generation(&self) -> u64 {
        self.core.generation()
    }

    /// Marks the filesystem as closing (unmount): running scans stop at their next check.
    pub fn set_closing(&self, closing: bool) {
        self.core.closing.store(closing, Ordering::Release);
    }

    /// Budget of cached maps: a scan runs when the count exceeds `max_maps` or the bytes
    /// exceed `max_bytes` (0 = no limit).
    pub fn set_budget(&self, max_maps: u64, max_bytes: u64) {
        self.core.budget_maps.store(max_maps, Ordering::Relaxed);
        self.core.budget_bytes.store(max_bytes, Ordering::Relaxed);
    }

    /// Makes the next `n` spare-map allocations fail (drop-range split spares, split maps).
    pub fn inject_spare_alloc_failures(&self, n: u32) {
        self.core.spare_alloc_failures.store(n, Ordering::Relaxed);
    }

    /// Injected spare-allocation failures not consumed yet.
    pub fn pending_spare_alloc_failures(&self) -> u32 {
        self.core.spare_alloc_failures.load(Ordering::Relaxed)
    }

    /// Installs (or removes) the scheduling hook ([`crate::sched`]).
    #[cfg(feature = "sched-points")]
    pub fn set_sched_hook(&self, hook: Option<SchedHook>) {
        let mut h = self.core.hook.write();
        *h = hook;
        self.core.has_hook.store(h.is_some(), Ordering::Release);
    }

    /// Counter snapshot.
    pub fn stats(&self) -> Stats {
        self.core
            .counters
            .snapshot(self.core.cached_maps(), MAP_FOOTPRINT_BYTES)
    }

    /// Violations counted so far of one invariant.
    pub fn violations(&self, inv: Invariant) -> u64 {
        self.stats().violations(inv)
    }

    /// `btrfs_nr_cached_objects`: the evictable map count.
    pub fn btrfs_nr_cached_objects(&self) -> u64 {
        self.core.cached_maps()
    }

    /// `btrfs_free_cached_objects`: the superblock shrinker's scan request.
    pub fn btrfs_free_cached_objects(&self, nr_to_scan: u64) {
        self.btrfs_free_extent_maps(nr_to_scan.min(i64::MAX as u64));
    }

    /// Hook for process memory pressure (cgroup limit, PSI): scan `permille`/1000 of the cached
    /// maps. Returns whether a scan ran.
    pub fn memory_pressure(&self, permille: u32) -> bool {
        let nr = (self.core.cached_maps() as u128 * permille.min(1000) as u128 / 1000) as u64;
        nr > 0 && self.btrfs_free_extent_maps(nr)
    }

    /// `btrfs_free_extent_maps`: request a scan of `nr_to_scan` maps. Returns false (and does
    /// nothing) if a scan is already pending or running, or `nr_to_scan` is 0. The scan runs
    /// synchronously on the caller's thread.
    pub fn btrfs_free_extent_maps(&self, nr_to_scan: u64) -> bool {
        if nr_to_scan == 0 {
            return false;
        }
        if self
            .nr_to_scan
            .compare_exchange(0, nr_to_scan, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            Counters::inc(&self.core.counters.shrinker_requests_dropped);
            return false;
        }
        self.btrfs_extent_map_shrinker_worker();
        true
    }

    /// `btrfs_extent_map_shrinker_worker`.
    fn btrfs_extent_map_shrinker_worker(&self) {
        let mut ctx = {
            let mut c = self.cursor.lock();
            let ctx = ShrinkCtx {
                nr_to_scan: self.nr_to_scan.load(Ordering::Acquire),
                scanned: 0,
                last_ino: c.1,
                last_root: c.0,
            };
            c.1 = c.1.wrapping_add(1);
            ctx
        };
        let start_root_id = ctx.last_root;
        let mut next_root_id = ctx.last_root;
        let mut cycled = false;
        let mut nr_dropped = 0u64;
        tracing::trace!(
            target: "btrfs_extent_map_shrinker_scan_enter",
            nr_to_scan = ctx.nr_to_scan,
            nr = self.core.cached_maps(),
            last_root = ctx.last_root,
            last_ino = ctx.last_ino
        );
        while ctx.scanned < ctx.nr_to_scan && !self.core.closing() {
            self.sched(SchedPoint::ShrinkerNextRoot);
            let root = self
                .roots
                .read()
                .range(next_root_id..)
                .next()
                .map(|(r, _)| *r);
            let Some(root) = root else {
                if start_root_id > 0 && !cycled {
                    next_root_id = 0;
                    ctx.last_root = 0;
                    ctx.last_ino = 0;
                    cycled = true;
                    continue;
                }
                break;
            };
            let Some(n) = root.checked_add(1) else {
                if is_fstree(root) {
                    nr_dropped += self.btrfs_scan_root(root, &mut ctx);
                }
                break;
            };
            next_root_id = n;
            if is_fstree(root) {
                nr_dropped += self.btrfs_scan_root(root, &mut ctx);
            }
        }
        {
            let mut c = self.cursor.lock();
            *c = (ctx.last_root, ctx.last_ino);
        }
        tracing::trace!(
            target: "btrfs_extent_map_shrinker_scan_exit",
            nr_dropped,
            nr = self.core.cached_maps(),
            last_root = ctx.last_root,
            last_ino = ctx.last_ino
        );
        Counters::inc(&self.core.counters.shrinker_runs);
        self.nr_to_scan.store(0, Ordering::Release);
    }

    /// `btrfs_scan_root`.
    fn btrfs_scan_root(&self, root: u64, ctx: &mut ShrinkCtx) -> u64 {
        let mut nr_dropped = 0;
        let mut min_ino = ctx.last_ino.saturating_add(1);
        let mut stopped_at_inode = false;
        loop {
            let mut dropped = 0;
            let found = self.find_first_inode_to_shrink(root, min_ino, |inode, locked| {
                dropped = self.btrfs_scan_inode(inode, locked, ctx);
            });
            let Some(ino) = found else {
                break;
            };
            nr_dropped += dropped;
            min_ino = ino.saturating_add(1);
            ctx.last_ino = ino;
            if ctx.scanned >= ctx.nr_to_scan || self.core.closing() {
                stopped_at_inode = true;
                break;
            }
            self.sched(SchedPoint::ShrinkerNextInode);
        }
        if stopped_at_inode {
            ctx.last_root = root;
        } else {
            ctx.last_ino = 0;
            ctx.last_root = root.saturating_add(1);
        }
        nr_dropped
    }

    /// `find_first_inode_to_shrink`: the first inode `>= min_ino` of `root` whose tree lock can
    /// be taken and whose tree is not empty; `scan` runs with that lock held. Returns the inode
    /// number, or `None` when the root has no more such inodes.
    fn find_first_inode_to_shrink(
        &self,
        root: u64,
        min_ino: u64,
        scan: impl FnOnce(&BtrfsInode, TryLocked<'_>),
    ) -> Option<u64> {
        let mut from = min_ino;
        loop {
            let inode = {
                let roots = self.roots.read();
                roots
                    .get(&root)?
                    .range(from..)
                    .next()
                    .map(|(_, i)| i.clone())?
            };
            let ino = inode.ino();
            if let Some(locked) = inode.try_lock_tree() {
                if !locked.is_empty() {
                    scan(&inode, locked);
                    return Some(ino);
                }
            }
            from = ino.checked_add(1)?;
        }
    }

    /// `btrfs_scan_inode` (tree lock held). Returns the number of maps dropped.
    fn btrfs_scan_inode(&self, inode: &BtrfsInode, t: TryLocked<'_>, ctx: &mut ShrinkCtx) -> u64 {
        let counters = &self.core.counters;
        let cur_fs_gen = self.core.generation();
        let skip_logging = self.core.policy().shrinker_fixed();
        let Some(mmap) = inode.mmap_lock().try_read() else {
            Counters::inc(&counters.shrinker_skipped_inode_busy);
            return 0;
        };
        // The maps will be looked at: the critical section proper begins.
        let mut locked = t.settle();
        let l = &mut locked;
        // Counted locally and published once per inode (keeps the shared counters' cache
        // lines quiet while scanning).
        let (mut scanned, mut pinned, mut logging, mut full_sync) = (0u64, 0u64, 0u64, 0u64);
        let mut nr_dropped = 0;
        let mut key = l.first_key();
        while let Some(k) = key {
            let next = l.next_key(k);
            ctx.scanned += 1;
            scanned += 1;
            if let Some(s) = l.slot(k).copied() {
                if s.em.has(flags::PINNED) {
                    pinned += 1;
                } else if s.em.has(flags::LOGGING) && skip_logging {
                    l.violation(Invariant::ShrinkerMetLogging, &s.em);
                    logging += 1;
                } else {
                    if s.em.has(flags::LOGGING) {
                        l.violation(Invariant::ShrinkerMetLogging, &s.em);
                    }
                    if l.is_listed(s.id) && s.em.generation >= cur_fs_gen {
                        inode.btrfs_set_inode_full_sync();
                        full_sync += 1;
                    }
                    if let Some(r) = l.remove_extent_mapping(k) {
                        tracing::trace!(
                            target: "btrfs_extent_map_shrinker_remove_em",
                            ino = inode.ino(),
                            root = inode.root(),
                            start = r.em.start,
                            len = r.em.len,
                            flags = r.em.flags
                        );
                        l.put(r.id, &r.em);
                        nr_dropped += 1;
                    }
                }
            }
            if ctx.scanned >= ctx.nr_to_scan {
                break;
            }
            if inode.tree_contended() || self.core.closing() {
                break;
            }
            key = next;
        }
        let add = |c: &AtomicU64, n: u64| {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&counters.shrinker_scanned, scanned);
        add(&counters.shrinker_skipped_pinned, pinned);
        add(&counters.shrinker_skipped_logging, logging);
        add(&counters.shrinker_full_sync_set, full_sync);
        add(&counters.shrinker_dropped, nr_dropped);
        // The kernel's order: up_read(i_mmap_lock) here, write_unlock(tree) by the caller.
        drop(mmap);
        drop(locked);
        inode.reclaim_retired();
        nr_dropped
    }

    #[inline(always)]
    fn sched(&self, _p: SchedPoint) {
        #[cfg(feature = "sched-points")]
        self.core.sched(_p);
    }

    /// Every inode of the registry (tests and the stats command).
    pub fn inodes(&self) -> Vec<Arc<BtrfsInode>> {
        self.roots
            .read()
            .values()
            .flat_map(|r| r.values().cloned())
            .collect()
    }
}
