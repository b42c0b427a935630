//! Per-inode extent-map trees and their operations (extent_map.c).
//!
//! # Definitions
//! - A *map* is one `struct extent_map`: a value ([`ExtentMap`]) plus an identity ([`EmNode`])
//!   carrying what the kernel keeps in the struct besides the value: the reference count
//!   (`refs`), whether it is in a tree (`rb_node` not cleared), which list its `list` head is
//!   linked on (the tree's modified list or an fsync's private logging list) and whether the
//!   kernel would have freed it (refs reached zero).
//! - A *version* is an immutable snapshot of one inode's tree: a persistent B+tree of
//!   [`Slot`]s (value + identity index, `Copy`) keyed by `start`. The tree publishes one version
//!   at the end of every write-locked critical section that changed it.
//! - The *writer state* ([`TreeW`]) is what the kernel protects with the tree's write lock: the
//!   working version, the modified list, the private logging lists and the identity arena
//!   ([`Ids`]: every map's [`EmNode`], indexed by the [`EmId`] its slot and list entries carry).
//!
//! # Invariants
//! 1. Maps of one version never overlap; keys are their starts.
//! 2. A map is in at most one tree and on at most one list; listed maps never merge, so a
//!    listed map's start and length never change while listed.
//! 3. The tree owns one kernel reference of every map in it; lookups in this crate return copies
//!    and take no reference (so they never block a merge, unlike the kernel's `refs > 2` rule
//!    for concurrent users; fsync's logging does take one, as in the kernel).
//! 4. A list entry holds a map's identity and start; the map's value is its tree slot's while it
//!    is in the tree, else the value kept when it left the tree (`TreeW::detached`).
//! 5. Memory: versions are retired through crossbeam-epoch. Identities live in the writer
//!    state, never in versions: readers read only slot values, and an identity is resolved only
//!    under the tree lock. An identity is reused only once nothing holds it (the working tree,
//!    a list entry, a logging pass between two critical sections; copies made inside one
//!    critical section are covered because freeing happens when the section ends), so an id a
//!    holder keeps always names the same map; ids left in retired versions are never resolved.
//!    The kernel reference count is a ledger only: reaching zero marks the map FREED and checks
//!    the kernel's WARN_ONs; the identity stays until its holders let go.
//! 6. Between two critical sections of a logging pass the working tree may hold the pass's
//!    unfinished work: the run of slots its merges took out ([`Gap`]) and the LOGGING flags it
//!    only recorded ([`VirtualLogging`]). Every other critical section settles both as it
//!    begins ([`TreeW::settle`]; the shrinker once it holds the mmap lock, [`TryLocked`]), and
//!    nothing is published unsettled, so every other section and every reader sees the tree
//!    the kernel would have.
//!
//! # Operations
//! Named after the kernel functions they mirror: `btrfs_lookup_extent_mapping`,
//! `btrfs_search_extent_mapping`, `btrfs_add_extent_mapping`, `btrfs_drop_extent_map_range`,
//! `btrfs_replace_extent_map_range`, `btrfs_split_extent_map`, `btrfs_unpin_extent_cache`,
//! plus the internal `add_extent_mapping`, `try_merge_map`, `remove_extent_mapping`,
//! `replace_extent_mapping`, `merge_extent_mapping`, `drop_all_extent_maps_fast`,
//! `btrfs_clear_em_logging` and `btrfs_free_extent_map`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crossbeam_epoch::{self as epoch, Atomic, Owned};
use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::btree::{self, Link};
use crate::em::{flags, EmError, ExtentMap, EXTENT_MAP_INLINE, EXTENT_MAP_LAST_BYTE};
use crate::fs::FsCore;
use crate::stats::{Counters, Invariant};

const IN_TREE: u32 = 1 << 0;
const ON_MODIFIED: u32 = 1 << 1;
const ON_LOGGING: u32 = 1 << 2;
const FREED: u32 = 1 << 3;
const LISTED: u32 = ON_MODIFIED | ON_LOGGING;
/// The identity is on its arena's free list.
const ARENA_FREE: u32 = 1 << 4;

/// Identities an empty arena keeps room for (24 bytes each, plus 4 on the free list).
const ARENA_KEEP: usize = 1024;

/// Maps dropped by `drop_all_extent_maps_fast` between two lock breaks.
const DROP_ALL_BATCH: usize = 1024;

/// Index of a map's identity in its tree's identity arena ([`Ids`]).
pub(crate) type EmId = u32;

/// Identity and kernel bookkeeping of one map (the non-value part of `struct extent_map`),
/// stored in the writer state of its tree ([`Ids`]) and changed only under the tree lock.
/// Readers never see it: a published version's slots carry the id, which only writers resolve.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmNode {
    /// Kernel reference count (a ledger: reaching zero marks the map FREED).
    refs: u32,
    state: u32,
    /// Holders that keep the id from being reused: the working tree (one while the map is in
    /// it), the list entry that links it (modified list or a private logging list) and a
    /// logging pass handing it out between two critical sections. Section-local copies of
    /// the id are not counted: ids whose count drops to zero are freed only when the critical
    /// section ends ([`Ids::end_section`]).
    holders: u32,
    list_seq: u64,
}

/// The identity arena of one tree: identities indexed by [`EmId`], with a free list.
///
/// An id is on the free list only when nothing holds it (see [`EmNode::holders`]), so an id
/// that a tree slot, a list entry or a logging pass holds always names the same map; ids left
/// in retired versions are never resolved (readers read only values).
#[derive(Default)]
pub(crate) struct Ids {
    nodes: Vec<EmNode>,
    free: Vec<EmId>,
    /// Ids allocated or left without holder in the current critical section.
    pending: Vec<EmId>,
}

impl Ids {
    /// A fresh identity with the creator's kernel reference; freed at the end of the critical
    /// section unless something holds it by then.
    fn alloc(&mut self) -> EmId {
        let node = EmNode {
            refs: 1,
            ..EmNode::default()
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                // At most 2^32 identities per tree: a tree of 4 billion maps would need over
                // 300 GiB of memory first.
                EmId::try_from(self.nodes.len() - 1).expect("identity arena full")
            }
        };
        self.pending.push(id);
        id
    }

    /// Puts `id` on the free list whatever holds it (tests: a corrupted arena).
    #[cfg(test)]
    pub(crate) fn push_free_for_test(&mut self, id: EmId) {
        self.free.push(id);
    }

    fn get(&self, id: EmId) -> &EmNode {
        &self.nodes[id as usize]
    }

    fn get_mut(&mut self, id: EmId) -> &mut EmNode {
        &mut self.nodes[id as usize]
    }

    fn hold(&mut self, id: EmId) {
        let n = self.get_mut(id);
        n.holders += 1;
    }

    fn release(&mut self, id: EmId) {
        let n = self.get_mut(id);
        debug_assert!(n.holders > 0, "identity {id} released without holder");
        n.holders = n.holders.saturating_sub(1);
        if n.holders == 0 {
            self.pending.push(id);
        }
    }

    /// Frees `id` at once if nothing holds it: for a caller that provably keeps no copy of it
    /// for the rest of the critical section (the section-local copies that
    /// [`Ids::end_section`] protects).
    fn free_if_unheld(&mut self, id: EmId, detached: &mut HashMap<EmId, ExtentMap>) {
        let n = &mut self.nodes[id as usize];
        if n.holders == 0 && n.state & ARENA_FREE == 0 {
            n.state = ARENA_FREE;
            self.free.push(id);
            if !detached.is_empty() {
                detached.remove(&id);
            }
        }
    }

    /// End of a critical section: ids still without holder go to the free list (all of them
    /// at once, with their memory, when nothing is held any more).
    fn end_section(&mut self, detached: &mut HashMap<EmId, ExtentMap>) {
        // Taken out (and put back, keeping its allocation) so that each id can go through
        // `free_if_unheld`, which borrows all of `self`.
        let mut pending = std::mem::take(&mut self.pending);
        for id in pending.drain(..) {
            self.free_if_unheld(id, detached);
        }
        self.pending = pending;
        if self.free.len() == self.nodes.len() && !self.nodes.is_empty() {
            // Nothing is held: every identity is forgotten. A small arena keeps its memory
            // (a file whose maps are all dropped and then cached again, as around every fsync
            // of a rewritten file, would otherwise grow both vectors from nothing each time,
            // reallocating in the middle of the next logging pass); a large one gives it back.
            if self.nodes.capacity() <= ARENA_KEEP {
                self.nodes.clear();
                self.free.clear();
            } else {
                self.nodes = Vec::new();
                self.free = Vec::new();
            }
        }
    }
}

/// One entry of a tree version: the map's value and its identity (an index that only the
/// tree's writers resolve). `Copy`: a leaf copy is a plain memory copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) em: ExtentMap,
    pub(crate) id: EmId,
}

/// An entry of the modified list or of a private logging list: the map's identity and its
/// start, which never changes while the map is listed (listed maps never merge). The map's
/// value is its tree slot's, or, once it left the tree while still listed, the snapshot
/// taken then (`TreeW::detached`). 16 bytes: the collection moves and sorts these, not values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ListEntry {
    pub(crate) start: u64,
    pub(crate) id: EmId,
}

/// The modified list: entries in link order (sequence numbers increase; the head, the newest
/// entry, is the last one). An unlinked entry leaves a hole, found by binary search on the
/// sequence number; holes are compacted away once they are the majority, so unlinking is
/// amortised O(log n) and taking the whole list (fsync) is a vector move.
#[derive(Default)]
pub(crate) struct ModifiedList {
    entries: Vec<(u64, Option<ListEntry>)>,
    live: usize,
}

impl ModifiedList {
    /// Links `e` at the head; `seq` must be greater than every sequence number linked so far.
    fn push(&mut self, seq: u64, e: ListEntry) {
        debug_assert!(self.entries.last().is_none_or(|(s, _)| *s < seq));
        self.entries.push((seq, Some(e)));
        self.live += 1;
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Option<ListEntry>> {
        let i = self.entries.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(&mut self.entries[i].1)
    }

    fn remove(&mut self, seq: u64) -> Option<ListEntry> {
        let e = self.entry(seq)?.take()?;
        self.live -= 1;
        if self.entries.len() >= 64 && self.live < self.entries.len() / 2 {
            self.entries.retain(|(_, e)| e.is_some());
        }
        Some(e)
    }

    /// Unlinks everything; returns the entries in link order (tail first), with holes.
    fn take(&mut self) -> Vec<(u64, Option<ListEntry>)> {
        self.live = 0;
        std::mem::take(&mut self.entries)
    }
}

/// The private logging lists of the running logging passes (normally at most one: fsync holds
/// the inode lock). A pass links its maps with consecutive sequence numbers, so its list is a
/// vector indexed by sequence number minus the first one; an unlinked entry leaves a hole.
#[derive(Default)]
pub(crate) struct LoggingLists {
    /// (pass id, first sequence number, entries).
    passes: Vec<(u64, u64, Vec<Option<ListEntry>>)>,
}

impl LoggingLists {
    fn entry(&mut self, seq: u64) -> Option<&mut Option<ListEntry>> {
        self.passes.iter_mut().find_map(|(_, first, v)| {
            let i = usize::try_from(seq.checked_sub(*first)?).ok()?;
            v.get_mut(i)
        })
    }

    /// Identity of the map linked with sequence number `seq`.
    pub(crate) fn peek_id(&mut self, seq: u64) -> Option<EmId> {
        Some(self.entry(seq)?.as_ref()?.id)
    }

    /// Unlinks the entry linked with sequence number `seq`.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<ListEntry> {
        self.entry(seq)?.take()
    }

    /// Forgets the list of a finished pass (all its entries were unlinked).
    pub(crate) fn end_pass(&mut self, pass: u64) {
        self.passes.retain(|(p, _, _)| *p != pass);
    }
}

/// A published, immutable tree version.
pub(crate) struct Version {
    root: Link,
}

/// Writer-side state, protected by the tree lock.
pub(crate) struct TreeW {
    root: Link,
    nr: u64,
    dirty: bool,
    /// `modified_extents`: keyed by link sequence; the head (newest) is the last key.
    modified: ModifiedList,
    /// All private logging lists of running logging passes.
    pub(crate) logging: LoggingLists,
    /// Identities of the maps in the working tree, on the lists or held by a logging pass.
    pub(crate) ids: Ids,
    /// Values of the listed maps that left the tree (LOGGING maps removed while on a list),
    /// forgotten when their identity is freed.
    detached: HashMap<EmId, ExtentMap>,
    next_seq: u64,
    next_pass: u64,
    /// Critical sections begun on this tree (by anyone): a logging pass's [`LogCursor`] is
    /// used only if no other section ran since the pass's previous one.
    sections: u64,
    /// Slots a logging pass's merges took out of the tree and that are still in their leaf
    /// (see [`Gap`]).
    gap: Option<Gap>,
    /// The logging pass whose maps' LOGGING flags are not written in their slots yet (see
    /// [`VirtualLogging`]).
    virtual_logging: Option<VirtualLogging>,
}

/// What a logging pass's merges left undone in the working tree between two of its critical
/// sections: the slots of the maps merged away that are still in their leaf (the *run*), and
/// where the map that absorbed them is (the *head*).
///
/// When the map the pass clears merges into the map before it (`try_merge_map`: the map takes
/// its previous map's place), the merged value is written to the head's slot and the map's
/// own slot is left in place, counted in the run, instead of being removed with a shift of
/// the rest of the leaf. The next map merges into the same head, so a run of merges costs one
/// write per map. A run is in one leaf: when the pass moves on to the next leaf, the run is
/// removed (a run that filled a leaf other than the head's takes the whole leaf out of the
/// tree, without copying it) and a new one starts there, with the same head.
///
/// Nobody but that pass ever sees the run: the gap is kept only together with the pass's
/// [`LogCursor`] (whose section check proves nobody else ran), every other critical section
/// settles it as it begins (the lock constructors, [`TreeW::settle`]), the pass settles it as
/// soon as it does anything but continue the run, and `publish` settles before publishing.
/// Keys stay strictly increasing through a run (its slots keep their keys, between the head's
/// and the next map's), so a search for a live key is not misled either.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gap {
    /// Path to the head's leaf, the head's index in it and its key.
    head_path: btree::Path,
    head_at: u32,
    head: u64,
    /// Path to the run's leaf, the run's first index, the key there, and its length.
    run_path: btree::Path,
    run_from: u32,
    run_key: u64,
    len: u32,
}

impl Gap {
    /// Index of the slot right after the run.
    fn run_end(&self) -> usize {
        (self.run_from + self.len) as usize
    }
}

/// A logging pass's maps whose LOGGING flag is only recorded, not written in their slots: the
/// collection leaves the leaves alone (writing a flag into a leaf that the published version
/// shares copies the leaf, and the pass's own merges would then copy most of them again), and
/// the flags are written only if another critical section begins before the pass clears them
/// ([`TreeW::settle`]). The pass itself needs no flag to see: its remaining maps are on its
/// private list (listed maps never merge) and the map it hands out carries the flag in the copy
/// it returns. Only one pass at a time (the inode lock); a second pass collects the usual way.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VirtualLogging {
    pass: u64,
    /// The map the pass handed out last and has not cleared yet.
    current: Option<ListEntry>,
}

impl TreeW {
    /// Makes the working tree what the kernel's tree is between two critical sections: removes
    /// a logging pass's run of merged-away slots and writes the LOGGING flags it only
    /// recorded. Every critical section but the pass's own begins with this.
    fn settle(&mut self) {
        self.close_gap();
        if let Some(v) = self.virtual_logging.take() {
            let mut items: Vec<ListEntry> = v.current.into_iter().collect();
            if let Some((_, _, entries)) = self.logging.passes.iter().find(|p| p.0 == v.pass) {
                items.extend(entries.iter().flatten());
            }
            // The private list is in start order, and its current map precedes its rest.
            items.sort_by_key(|e| e.start);
            let ids = &self.ids;
            btree::for_each_mut_sorted(
                &mut self.root,
                &mut items,
                |e| e.start,
                |e, slot| {
                    if let Some(s) = slot {
                        if s.id == e.id && ids.get(e.id).state & IN_TREE != 0 {
                            s.em.flags |= flags::LOGGING;
                        }
                    }
                },
            );
        }
    }

    /// Removes a logging pass's run of merged-away slots, if any (see [`Gap`]), and rebalances
    /// its leaf if that left it small; a run that is its whole leaf takes the leaf out.
    fn close_gap(&mut self) {
        self.close_run(true);
    }

    /// [`TreeW::close_gap`]; `rebalance` false leaves a leaf the run made small as it is (the
    /// logging pass moving on to the next leaf: merging the two would copy the next leaf, which
    /// the published version shares, when the pass is about to take it out whole).
    fn close_run(&mut self, rebalance: bool) {
        let Some(g) = self.gap.take() else {
            return;
        };
        if g.len == 0 {
            return;
        }
        let len = g.len as usize;
        let whole = match btree::leaf(&self.root, g.run_key) {
            Some((s, i)) => {
                debug_assert!(i == g.run_from as usize && i + len <= s.len(), "gap {g:?}");
                i == 0 && len == s.len()
            }
            None => {
                debug_assert!(false, "gap {g:?} without its run");
                return;
            }
        };
        if whole {
            btree::remove_leaf(&mut self.root, g.run_key);
            return;
        }
        let Some((mut leaf, i)) = btree::leaf_mut(&mut self.root, g.run_key) else {
            return;
        };
        leaf.remove_range(i..(i + len).min(leaf.slots().len()));
        if rebalance && btree::leaf_is_small(leaf.slots().len()) {
            let key = leaf.slots()[0].em.start;
            btree::rebalance(&mut self.root, key);
        }
    }
}

/// Where a logging pass's next map sits in the working tree (path and slot index), as left by
/// the pass's previous critical section, so that the next `btrfs_clear_em_logging` finds the
/// leaf without a search. Valid only in the section right after section `section` of the
/// same tree; even then the slot found is checked (key and identity) before use.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogCursor {
    section: u64,
    path: btree::Path,
    at: usize,
}

/// `struct extent_map_tree`: published version for readers, writer state behind the lock.
pub(crate) struct ExtentMapTree {
    published: Atomic<Version>,
    writer: Mutex<TreeW>,
    waiters: AtomicU32,
    /// Retired versions whose grace period has ended, waiting to be freed by this tree's next
    /// writer (or the shrinker): the epoch collector, which may run on any thread (a reader, an
    /// unrelated inode's fsync), only moves them here, so the cost of freeing a version stays
    /// with the threads that change this tree.
    reclaim: Arc<Reclaim>,
}

/// Reclaim queue of one tree and its length, read without the lock by every writer (a
/// stale zero only delays the freeing to the next writer).
#[derive(Default)]
struct Reclaim {
    queue: Mutex<Vec<Version>>,
    len: AtomicU32,
}

impl ExtentMapTree {
    fn new() -> Self {
        ExtentMapTree {
            published: Atomic::new(Version { root: None }),
            writer: Mutex::new(TreeW {
                root: None,
                nr: 0,
                dirty: false,
                modified: ModifiedList::default(),
                logging: LoggingLists::default(),
                ids: Ids::default(),
                detached: HashMap::new(),
                next_seq: 1,
                next_pass: 1,
                sections: 0,
                gap: None,
                virtual_logging: None,
            }),
            waiters: AtomicU32::new(0),
            reclaim: Arc::new(Reclaim::default()),
        }
    }

    /// Frees the retired versions whose grace period has ended (see `publish`). Called by the
    /// tree's writers before they take the tree lock, and by the shrinker after it scanned the
    /// tree.
    fn reclaim(&self) {
        if self.reclaim.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        // One version at a time, outside the queue's lock; the queue keeps its capacity.
        loop {
            let v = match self.reclaim.queue.try_lock() {
                Some(mut q) => {
                    let v = q.pop();
                    self.reclaim.len.store(q.len() as u32, Ordering::Relaxed);
                    v
                }
                None => return,
            };
            match v {
                Some(v) => drop(v),
                None => return,
            }
        }
    }

    /// Versions waiting in the reclaim queue (tests).
    #[cfg(test)]
    pub(crate) fn reclaimable(&self) -> usize {
        self.reclaim.queue.lock().len()
    }

    /// Queues an empty version as if its grace period had ended (tests).
    #[cfg(test)]
    pub(crate) fn queue_reclaimable(&self) {
        let mut q = self.reclaim.queue.lock();
        q.push(Version { root: None });
        self.reclaim.len.store(q.len() as u32, Ordering::Relaxed);
    }

    /// Runs `f` on the current version under an epoch guard (the read side: no lock).
    fn read<R>(&self, f: impl FnOnce(&Link) -> R) -> R {
        let guard = epoch::pin();
        let shared = self.published.load(Ordering::Acquire, &guard);
        // SAFETY: `published` is never null (set at construction, only ever swapped for a
        // non-null `Owned`). A version is destroyed only through `defer_destroy` after it was
        // swapped out, and `guard` pins the current epoch, so the version loaded here stays
        // alive until `guard` is dropped at the end of this function; `f` cannot leak the
        // borrow because it is tied to `shared`'s guard lifetime through `&Link`.
        match unsafe { shared.as_ref() } {
            Some(v) => f(&v.root),
            None => f(&None),
        }
    }

    fn publish(&self, w: &mut TreeW) {
        // Readers never see a logging pass's unfinished work.
        w.settle();
        let new = Owned::new(Version {
            root: w.root.clone(),
        });
        let guard = epoch::pin();
        let old = self.published.swap(new, Ordering::AcqRel, &guard);
        w.dirty = false;
        if !old.is_null() {
            let ptr = old.as_raw() as usize;
            let queue = self.reclaim.clone();
            guard.defer(move || {
                // SAFETY: `ptr` is the version just unlinked from `published` (the only place a
                // version is reachable from) by a swap done under the tree lock, so it is retired
                // exactly once, here. crossbeam-epoch runs this closure only after every thread
                // that was pinned when it was deferred (every reader that could have loaded the
                // pointer) has unpinned, so nobody can still reach it: taking ownership is sound.
                let owned = unsafe { Owned::<Version>::from_raw(ptr as *mut Version) };
                let mut q = queue.queue.lock();
                q.push(*owned.into_box());
                queue.len.store(q.len() as u32, Ordering::Relaxed);
            });
        }
    }
}

impl Drop for ExtentMapTree {
    fn drop(&mut self) {
        let old = std::mem::replace(&mut self.published, Atomic::null());
        // SAFETY: `&mut self` proves that no other thread can reach `published` any more:
        // readers and writers borrow the tree (`&self`) for as long as they use it. With no
        // concurrent access, the unprotected guard is sound.
        let guard = unsafe { epoch::unprotected() };
        let shared = old.load(Ordering::Relaxed, guard);
        if !shared.is_null() {
            // SAFETY: the current version was made by `Owned::new` (in `new` or `publish`) and
            // was never retired (a version is retired only after being swapped out), so this
            // tree is its only owner and nobody else can reach it (see above).
            drop(unsafe { shared.into_owned() });
        }
    }
}

/// Per-inode runtime flags (`BTRFS_INODE_*` bits of `runtime_flags`).
pub mod runtime_flags {
    /// The next fsync must copy everything from the subvolume tree (`NEEDS_FULL_SYNC`).
    pub const NEEDS_FULL_SYNC: u32 = 1 << 0;
    /// Log the inode's items in full (`COPY_EVERYTHING`).
    pub const COPY_EVERYTHING: u32 = 1 << 1;
    /// The inode has no xattrs (`NO_XATTRS`).
    pub const NO_XATTRS: u32 = 1 << 2;
    /// A COW write failed (`COW_WRITE_ERROR`).
    pub const COW_WRITE_ERROR: u32 = 1 << 3;
}

/// Per-inode state: the extent-map tree, the modified list, the inode lock (i_rwsem), the mmap
/// lock (i_mmap_lock) and the runtime flags. See the lock order in the crate documentation.
pub struct BtrfsInode {
    root: u64,
    ino: u64,
    pub(crate) core: Arc<FsCore>,
    inode_lock: RwLock<()>,
    mmap_lock: RwLock<()>,
    runtime_flags: AtomicU32,
    pub(crate) tree: ExtentMapTree,
}

impl std::fmt::Debug for BtrfsInode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BtrfsInode")
            .field("root", &self.root)
            .field("ino", &self.ino)
            .finish_non_exhaustive()
    }
}

/// Debug view of one map: value and kernel bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    /// The map's value.
    pub em: ExtentMap,
    /// Kernel reference count (the tree's reference included).
    pub refs: u32,
    /// Linked on the inode's modified list.
    pub on_modified_list: bool,
    /// Linked on a private fsync logging list.
    pub on_logging_list: bool,
}

/// `[start, start+len)` search in one version (`__lookup_extent_mapping`).
fn search_link(root: &Link, start: u64, len: u64, strict: bool) -> Option<&Slot> {
    let cand = match btree::floor(root, start) {
        Some(s) if s.em.end() > start => s,
        prev => match btree::next_after(root, start) {
            Some(next) => next,
            None => prev?,
        },
    };
    if strict && !cand.em.intersects(start, len) {
        return None;
    }
    Some(cand)
}

/// `can_merge_extent_map`.
#[inline(always)]
fn can_merge(ids: &Ids, s: &Slot) -> bool {
    !s.em.has(flags::PINNED)
        && !s.em.is_compressed()
        && !s.em.has(flags::LOGGING)
        && ids.get(s.id).state & LISTED == 0
}

/// `mergeable_maps`.
#[inline(always)]
fn mergeable_maps(prev: &ExtentMap, next: &ExtentMap) -> bool {
    if prev.end() != next.start {
        return false;
    }
    if (prev.flags & !flags::MERGED) != (next.flags & !flags::MERGED) {
        return false;
    }
    if next.disk_bytenr < EXTENT_MAP_LAST_BYTE - 1 {
        return next.block_start() == prev.block_end();
    }
    next.disk_bytenr == prev.disk_bytenr
}

/// `merge_ondisk_extents`: on-disk fields of the merge of `prev` and `next`, written to `out`.
#[inline(always)]
fn merge_ondisk_extents(prev: &ExtentMap, next: &ExtentMap, out: &mut ExtentMap) {
    let disk_bytenr = prev.disk_bytenr.min(next.disk_bytenr);
    let disk_num_bytes = prev
        .disk_bytenr
        .wrapping_add(prev.disk_num_bytes)
        .max(next.disk_bytenr.wrapping_add(next.disk_num_bytes))
        .wrapping_sub(disk_bytenr);
    let offset = prev
        .disk_bytenr
        .wrapping_add(prev.offset)
        .wrapping_sub(disk_bytenr);
    out.disk_bytenr = disk_bytenr;
    out.disk_num_bytes = disk_num_bytes;
    out.ram_bytes = disk_num_bytes;
    out.offset = offset;
}

/// `try_merge_map`'s merge of `em` into its previous map `prev` (the result takes prev's start).
#[inline(always)]
fn merged_with_prev(prev: &ExtentMap, em: ExtentMap) -> ExtentMap {
    let mut out = em;
    out.start = prev.start;
    out.len = em.len.wrapping_add(prev.len);
    out.generation = em.generation.max(prev.generation);
    if out.disk_bytenr < EXTENT_MAP_LAST_BYTE {
        merge_ondisk_extents(prev, &em, &mut out);
    }
    out.flags |= flags::MERGED;
    out
}

/// `try_merge_map`'s merge of the next map `next` into `em`.
#[inline(always)]
fn merged_with_next(em: ExtentMap, next: &ExtentMap) -> ExtentMap {
    let mut out = em;
    out.len = em.len.wrapping_add(next.len);
    if out.disk_bytenr < EXTENT_MAP_LAST_BYTE {
        merge_ondisk_extents(&em, next, &mut out);
    }
    out.generation = em.generation.max(next.generation);
    out.flags |= flags::MERGED;
    out
}

/// What `try_merge_map` does to the map in slot `i` of a leaf.
struct MergePlan {
    /// Absorb the previous map (slot `i - 1`).
    prev: bool,
    /// Absorb the next map (slot `i + 1`).
    next: bool,
    /// The map's value afterwards.
    em: ExtentMap,
}

/// `try_merge_map`'s decisions for slot `i` of a leaf, or `None` if a neighbour it needs is in
/// another leaf (then see [`plan_merge`]).
fn plan_merge_in_leaf(ids: &Ids, slots: &[Slot], i: usize) -> Option<MergePlan> {
    let prev = i.checked_sub(1).map(|p| Some(&slots[p]));
    let next = (i + 1 < slots.len()).then(|| Some(&slots[i + 1]));
    plan_merge(ids, &slots[i], prev, next)
}

/// `try_merge_map`'s decisions for the map in `cur` given its neighbours: `Some(n)` is a known
/// neighbour (`Some(None)`: there is none), `None` one not looked up (in another leaf). Returns
/// `None` if the decision needs a neighbour that was not looked up.
#[inline(always)]
fn plan_merge(
    ids: &Ids,
    cur: &Slot,
    prev: Option<Option<&Slot>>,
    next: Option<Option<&Slot>>,
) -> Option<MergePlan> {
    let (merge_prev, merge_next) = merge_decisions(ids, cur, prev, next)?;
    let mut em = cur.em;
    if let (true, Some(Some(p))) = (merge_prev, prev) {
        em = merged_with_prev(&p.em, em);
    }
    if let (true, Some(Some(n))) = (merge_next, next) {
        em = merged_with_next(em, &n.em);
    }
    Some(MergePlan {
        prev: merge_prev,
        next: merge_next,
        em,
    })
}

/// The decisions of [`plan_merge`] alone, (absorb the previous map, absorb the next map),
/// without building the merged value unless the second decision needs it: `try_merge_map`
/// examines the next map against the map as the merge with the previous one left it.
#[inline(always)]
fn merge_decisions(
    ids: &Ids,
    cur: &Slot,
    prev: Option<Option<&Slot>>,
    next: Option<Option<&Slot>>,
) -> Option<(bool, bool)> {
    if ids.get(cur.id).refs > 2 || !can_merge(ids, cur) {
        return Some((false, false));
    }
    let prev = if cur.em.start == 0 { None } else { prev? };
    let prev = prev.filter(|p| can_merge(ids, p) && mergeable_maps(&p.em, &cur.em));
    let merge_next = match next? {
        Some(n) if can_merge(ids, n) => match prev {
            Some(p) => mergeable_maps(&merged_with_prev(&p.em, cur.em), &n.em),
            None => mergeable_maps(&cur.em, &n.em),
        },
        _ => false,
    };
    Some((prev.is_some(), merge_next))
}

/// Applies a [`MergePlan`] to slot `i` of the leaf; returns the slots of the maps merged away
/// (previous, next).
fn apply_merge_in_leaf(
    leaf: &mut btree::LeafMut<'_>,
    i: usize,
    plan: &MergePlan,
) -> [Option<Slot>; 2] {
    let mut at = i;
    let mut gone_prev = None;
    if plan.prev {
        // em takes prev's place: the map's node (never the leaf's first slot when it has a
        // previous slot) moves into prev's slot, whose key the merged map keeps.
        if let Some(cur) = leaf.remove(i) {
            at = i - 1;
            gone_prev = leaf
                .replace(
                    at,
                    Slot {
                        em: plan.em,
                        id: cur.id,
                    },
                )
                .ok();
        }
    }
    let gone_next = if plan.next { leaf.remove(at + 1) } else { None };
    leaf.set_value(at, plan.em);
    [gone_prev, gone_next]
}

/// `is_fstree`: maps of these roots are counted as evictable.
pub(crate) fn is_fstree(root: u64) -> bool {
    root == 5 || ((root as i64) >= 256 && (root >> 48) == 0)
}

/// The tree write lock held on one inode: all modifications go through this. Publishes the
/// working version when dropped (the end of the kernel's write-locked critical section),
/// unless the critical section only made mapping-preserving changes and asked to defer.
pub(crate) struct Locked<'a> {
    pub(crate) inode: &'a BtrfsInode,
    pub(crate) w: MutexGuard<'a, TreeW>,
    /// Set by the logging pass: its changes (LOGGING set or cleared, merges of adjacent,
    /// physically contiguous maps) never change what any file byte maps to, so readers may
    /// keep seeing the previous version until the pass ends or any other writer publishes.
    /// Unpublished, the working version's nodes stay unshared and are changed in place instead
    /// of being copied once per logged map.
    pub(crate) defer_publish: bool,
    /// Change of the evictable count made in this critical section, added to the shared
    /// counter once, at unlock (the kernel's counter is per-CPU for the same reason: writers
    /// and the shrinker on other CPUs would otherwise bounce its cache line per map).
    pub(crate) evictable_delta: i64,
}

/// The tree lock taken with `write_trylock` by the shrinker, before it knows whether it will
/// look at the maps: it first checks that the tree is not empty and takes the inode's mmap lock
/// (`btrfs_scan_inode`), which fsync holds for its whole logging pass. Until [`TryLocked::settle`]
/// the section is not counted in `TreeW::sections` and a logging pass's unfinished work is left
/// alone: a shrinker that finds the inode busy changes nothing, so it neither does that work
/// nor costs the pass its cursor.
pub(crate) struct TryLocked<'a> {
    inode: &'a BtrfsInode,
    w: MutexGuard<'a, TreeW>,
}

impl<'a> TryLocked<'a> {
    /// `RB_EMPTY_ROOT(&tree->root)`: the same answer settled or not (a logging pass's
    /// unfinished work never empties the tree: the map that absorbed the others stays).
    pub(crate) fn is_empty(&self) -> bool {
        self.w.root.is_none()
    }

    /// The critical section proper, on the settled tree ([`TreeW::settle`]).
    pub(crate) fn settle(self) -> Locked<'a> {
        let mut l = Locked::begin(self.inode, self.w);
        l.w.settle();
        l
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if self.evictable_delta != 0 {
            self.inode
                .core
                .evictable
                .fetch_add(self.evictable_delta, Ordering::Relaxed);
        }
        if !self.w.ids.pending.is_empty() {
            let w = &mut *self.w;
            w.ids.end_section(&mut w.detached);
        }
        if self.w.dirty && !self.defer_publish {
            self.inode.tree.publish(&mut self.w);
        }
    }
}

impl<'a> Locked<'a> {
    /// A critical section begins (the tree lock is held): counted in `TreeW::sections`.
    fn begin(inode: &'a BtrfsInode, mut w: MutexGuard<'a, TreeW>) -> Self {
        w.sections += 1;
        Locked {
            inode,
            w,
            defer_publish: false,
            evictable_delta: 0,
        }
    }

    /// Removes the logging pass's run of merged-away slots, if any (see [`Gap`]).
    pub(crate) fn close_gap(&mut self) {
        self.w.close_gap();
    }

    fn counters(&self) -> &Counters {
        &self.inode.core.counters
    }

    pub(crate) fn violation(&self, inv: Invariant, em: &ExtentMap) {
        self.violation_range(inv, em.start, em.len);
    }

    #[cold]
    fn violation_range(&self, inv: Invariant, start: u64, len: u64) {
        self.counters()
            .violation(inv, self.inode.root, self.inode.ino, start, len);
    }

    pub(crate) fn slot(&self, key: u64) -> Option<&Slot> {
        btree::get(&self.w.root, key)
    }

    pub(crate) fn first_key(&self) -> Option<u64> {
        btree::first(&self.w.root).map(|s| s.em.start)
    }

    pub(crate) fn next_key(&self, key: u64) -> Option<u64> {
        btree::next_after(&self.w.root, key).map(|s| s.em.start)
    }

    /// Changes the value of the map at `key` in place (start must stay `key`).
    pub(crate) fn update(&mut self, key: u64, f: impl FnOnce(&mut ExtentMap)) {
        if let Some(s) = btree::get_mut(&mut self.w.root, key) {
            f(&mut s.em);
            debug_assert_eq!(s.em.start, key);
            self.w.dirty = true;
        }
    }

    /// A new map identity with the creator's reference (`btrfs_alloc_extent_map`). Valid until
    /// the end of this critical section unless a tree or a list takes it.
    pub(crate) fn new_node(&mut self) -> EmId {
        self.w.ids.alloc()
    }

    fn st(&self, id: EmId) -> u32 {
        self.w.ids.get(id).state
    }

    fn set_bits(&mut self, id: EmId, bits: u32) {
        self.w.ids.get_mut(id).state |= bits;
    }

    fn clear_bits(&mut self, id: EmId, bits: u32) {
        self.w.ids.get_mut(id).state &= !bits;
    }

    /// Takes a kernel reference (`refcount_inc`).
    pub(crate) fn get_ref(&mut self, id: EmId) {
        let n = self.w.ids.get_mut(id);
        n.refs = n.refs.wrapping_add(1);
    }

    /// Kernel reference count of a map.
    pub(crate) fn refs(&self, id: EmId) -> u32 {
        self.w.ids.get(id).refs
    }

    /// `btrfs_free_extent_map`: drops one kernel reference; the final one checks the WARN_ONs
    /// and marks the map FREED (the identity itself is reused only once nothing holds it).
    #[inline(always)]
    pub(crate) fn put(&mut self, id: EmId, em: &ExtentMap) {
        self.put_range(id, em.start, em.len);
    }

    /// [`Locked::put`] of the map covering `[start, start + len)` (what a violation reports).
    #[inline(always)]
    pub(crate) fn put_range(&mut self, id: EmId, start: u64, len: u64) {
        let n = self.w.ids.get_mut(id);
        let prev = n.refs;
        if prev == 0 {
            // A put of a map the kernel already freed: counted as a use after free.
            self.violation_range(Invariant::UseAfterFree, start, len);
            return;
        }
        n.refs = prev - 1;
        if prev == 1 {
            let st = n.state;
            n.state |= FREED;
            if st & (IN_TREE | LISTED) != 0 {
                self.violation_range(Invariant::FreedWhileInUse, start, len);
            }
        }
    }

    /// A logging pass keeps `id` across critical sections (its `current` map).
    pub(crate) fn hold(&mut self, id: EmId) {
        self.w.ids.hold(id);
    }

    /// The logging pass lets go of `id` (see [`Locked::hold`]).
    pub(crate) fn release(&mut self, id: EmId) {
        self.w.ids.release(id);
    }

    fn evictable_add(&mut self, delta: i64) {
        if is_fstree(self.inode.root) {
            self.evictable_delta += delta;
        }
    }

    /// `list_add(&em->list, &modified_extents)`.
    pub(crate) fn list_add_modified(&mut self, id: EmId, em: ExtentMap) {
        if self.st(id) & LISTED != 0 {
            self.violation(Invariant::DoubleMembership, &em);
            return;
        }
        let w = &mut *self.w;
        let seq = w.next_seq;
        w.next_seq += 1;
        let n = w.ids.get_mut(id);
        n.list_seq = seq;
        n.state |= ON_MODIFIED;
        n.holders += 1;
        w.modified.push(
            seq,
            ListEntry {
                start: em.start,
                id,
            },
        );
    }

    /// Links maps, in order, onto logging pass `pass`'s private list; returns their link
    /// sequence numbers (consecutive).
    pub(crate) fn list_add_logging(
        &mut self,
        entries: Vec<Option<ListEntry>>,
        pass: u64,
    ) -> std::ops::Range<u64> {
        let w = &mut *self.w;
        let first = w.next_seq;
        for (e, seq) in entries.iter().zip(first..) {
            if let Some(e) = e {
                let n = w.ids.get_mut(e.id);
                n.list_seq = seq;
                n.state |= ON_LOGGING;
                n.holders += 1;
            }
        }
        let seqs = first..first + entries.len() as u64;
        w.next_seq = seqs.end;
        if !entries.is_empty() {
            w.logging.passes.push((pass, first, entries));
        }
        seqs
    }

    /// Unlinks the entry linked with sequence number `seq` from a private logging list (the
    /// pass's own `list_del_init`): the map's list holder is handed back.
    pub(crate) fn logging_remove(&mut self, seq: u64) -> Option<ListEntry> {
        let e = self.w.logging.remove(seq)?;
        let n = self.w.ids.get_mut(e.id);
        n.state &= !ON_LOGGING;
        self.w.ids.release(e.id);
        Some(e)
    }

    /// `list_del_init(&em->list)`: unlinks the map from whichever list it is on. `by_logger` is
    /// false for every caller except the logging pass owning the private list.
    pub(crate) fn list_del_init(&mut self, id: EmId, em: &ExtentMap, by_logger: bool) {
        let n = *self.w.ids.get(id);
        if n.state & ON_MODIFIED != 0 {
            self.clear_bits(id, ON_MODIFIED);
            if self.w.modified.remove(n.list_seq).is_some() {
                self.w.ids.release(id);
            }
        }
        if n.state & ON_LOGGING != 0 {
            self.clear_bits(id, ON_LOGGING);
            if self.w.logging.remove(n.list_seq).is_some() {
                self.w.ids.release(id);
            }
            if !by_logger {
                self.violation(Invariant::LoggingMapStolen, em);
            }
        }
    }

    /// Keeps the value of a listed map that leaves the tree (its list entry holds only its
    /// identity and start).
    fn keep_detached_value(&mut self, id: EmId, em: ExtentMap) {
        if self.st(id) & LISTED != 0 {
            self.w.detached.insert(id, em);
        }
    }

    /// `tree_insert`: -EEXIST if the new range overlaps any map.
    pub(crate) fn tree_insert(&mut self, slot: Slot) -> Result<(), EmError> {
        let em = slot.em;
        let end = em.end();
        let overlap_prev =
            btree::floor(&self.w.root, em.start).is_some_and(|p| p.em.end() > em.start);
        let overlap_next =
            btree::next_after(&self.w.root, em.start).is_some_and(|n| n.em.start < end);
        if overlap_prev || overlap_next {
            return Err(EmError::Exists {
                start: em.start,
                end,
            });
        }
        if self.st(slot.id) & IN_TREE != 0 {
            self.violation(Invariant::DoubleMembership, &em);
            return Err(EmError::Invalid("map already in a tree"));
        }
        self.enter_tree(slot.id);
        btree::insert(&mut self.w.root, slot);
        self.w.nr += 1;
        self.w.dirty = true;
        Ok(())
    }

    /// The working tree takes a map: IN_TREE and the tree's holder.
    fn enter_tree(&mut self, id: EmId) {
        let n = self.w.ids.get_mut(id);
        n.state |= IN_TREE;
        n.holders += 1;
    }

    /// A map left the working tree: IN_TREE cleared and the tree's holder handed back.
    fn leave_tree(&mut self, id: EmId) {
        self.clear_bits(id, IN_TREE);
        self.w.ids.release(id);
    }

    /// `setup_extent_mapping`: the tree's reference, then the modified list or a merge.
    /// Returns the key of the map afterwards (a merge with the previous map moves it).
    fn setup_extent_mapping(&mut self, key: u64, modified: bool) -> u64 {
        let Some(s) = self.slot(key).copied() else {
            return key;
        };
        self.get_ref(s.id);
        if self.st(s.id) & LISTED != 0 {
            self.violation(Invariant::DoubleMembership, &s.em);
        }
        if s.em.has(flags::LOGGING) {
            // Only fsync's collection sets LOGGING, and never on a map being inserted.
            self.violation(Invariant::StaleLogging, &s.em);
        }
        if modified {
            self.list_add_modified(s.id, s.em);
            key
        } else {
            self.try_merge_map(key)
        }
    }

    /// `add_extent_mapping`: insert (EEXIST on overlap) and set up. Returns the map's key.
    pub(crate) fn add_extent_mapping(
        &mut self,
        em: ExtentMap,
        id: EmId,
        modified: bool,
    ) -> Result<u64, EmError> {
        self.tree_insert(Slot { em, id })?;
        let key = self.setup_extent_mapping(em.start, modified);
        self.evictable_add(1);
        Ok(key)
    }

    /// `try_merge_map`: absorb the previous and then the next map if both sides allow it.
    /// Returns the key of the map afterwards.
    pub(crate) fn try_merge_map(&mut self, key: u64) -> u64 {
        if let Some(k) = self.try_merge_map_in_leaf(key) {
            return k;
        }
        let ids = &self.w.ids;
        let mut em = match btree::get(&self.w.root, key) {
            Some(s) if ids.get(s.id).refs <= 2 && can_merge(ids, s) => s.em,
            _ => return key,
        };
        if em.start != 0 {
            let ids = &self.w.ids;
            let prev = btree::prev_before(&self.w.root, key)
                .filter(|p| can_merge(ids, p) && mergeable_maps(&p.em, &em))
                .map(|p| p.em);
            if let Some(prev) = prev {
                em = merged_with_prev(&prev, em);
                // em takes prev's place (same key: an in-place slot update).
                let taken = btree::remove(&mut self.w.root, key).and_then(|cur| {
                    let slot = btree::get_mut(&mut self.w.root, prev.start)?;
                    Some(std::mem::replace(slot, Slot { em, id: cur.id }))
                });
                if let Some(prev) = taken {
                    self.merged_away(&[Some(prev), None], false);
                }
            }
        }
        let ids = &self.w.ids;
        let next = btree::next_after(&self.w.root, em.start)
            .filter(|n| can_merge(ids, n) && mergeable_maps(&em, &n.em))
            .map(|n| n.em);
        if let Some(next) = next {
            em = merged_with_next(em, &next);
            if let Some(next) = btree::remove(&mut self.w.root, next.start) {
                self.update(em.start, |v| *v = em);
                self.merged_away(&[Some(next), None], false);
            }
        }
        em.start
    }

    /// `try_merge_map` when the map's neighbours are in the same B+tree leaf (the common case):
    /// the same decisions as the general path, made on one leaf found by one read-only descent,
    /// and applied through one more. `None` (nothing changed) when a neighbour the decision
    /// needs may be in another leaf.
    fn try_merge_map_in_leaf(&mut self, key: u64) -> Option<u64> {
        let root = &self.w.root;
        let ids = &self.w.ids;
        let (slots, i) = btree::leaf(root, key)?;
        let plan = match plan_merge_in_leaf(ids, slots, i) {
            Some(plan) => plan,
            None => {
                // A neighbour is in another leaf: look it up; the merge stays in this leaf
                // unless it is with that neighbour.
                let prev = match i {
                    0 => btree::prev_before(root, key),
                    _ => Some(&slots[i - 1]),
                };
                let next = slots.get(i + 1).or_else(|| btree::next_after(root, key));
                let plan = plan_merge(ids, &slots[i], Some(prev), Some(next))?;
                if (plan.prev && i == 0) || (plan.next && i + 1 == slots.len()) {
                    return None;
                }
                plan
            }
        };
        if !plan.prev && !plan.next {
            return Some(key);
        }
        let (mut leaf, i) = btree::leaf_mut(&mut self.w.root, key)?;
        let gone = apply_merge_in_leaf(&mut leaf, i, &plan);
        if btree::leaf_is_small(leaf.slots().len()) {
            btree::rebalance(&mut self.w.root, plan.em.start);
        }
        self.merged_away(&gone, false);
        Some(plan.em.start)
    }

    /// Bookkeeping of the maps a merge took out of the tree: each hands back the tree's
    /// holder and its reference.
    ///
    /// `free_now`: the caller keeps no copy of these ids for the rest of the critical section
    /// (see [`Ids::free_if_unheld`]).
    #[inline(always)]
    fn merged_away(&mut self, gone: &[Option<Slot>; 2], free_now: bool) {
        // By reference: moving the 160-byte array into an iterator cost a `memcpy` call.
        for gone in gone.iter().flatten() {
            self.merged_away_one(gone, free_now);
        }
    }

    /// [`Locked::merged_away`] for one map.
    #[inline(always)]
    fn merged_away_one(&mut self, gone: &Slot, free_now: bool) {
        self.w.nr = self.w.nr.saturating_sub(1);
        self.w.dirty = true;
        if free_now {
            let n = self.w.ids.get_mut(gone.id);
            n.state &= !IN_TREE;
            debug_assert!(n.holders > 0, "identity {} left the tree twice", gone.id);
            n.holders = n.holders.saturating_sub(1);
            self.put(gone.id, &gone.em);
            let w = &mut *self.w;
            w.ids.free_if_unheld(gone.id, &mut w.detached);
        } else {
            self.leave_tree(gone.id);
            self.put(gone.id, &gone.em);
        }
        self.evictable_add(-1);
    }

    /// `btrfs_remove_extent_mapping`: out of the tree; unlinked from its list unless LOGGING.
    /// Drops no reference. Returns the removed slot (its id valid until the end of this
    /// critical section unless a list still holds it).
    pub(crate) fn remove_extent_mapping(&mut self, key: u64) -> Option<Slot> {
        let slot = btree::remove(&mut self.w.root, key)?;
        self.after_tree_removal(&slot);
        self.w.nr = self.w.nr.saturating_sub(1);
        self.w.dirty = true;
        self.evictable_add(-1);
        Some(slot)
    }

    /// The list side of removal/replacement (shared by remove and replace), then the tree's
    /// holder handed back.
    fn after_tree_removal(&mut self, slot: &Slot) {
        let em = slot.em;
        if em.has(flags::PINNED) {
            self.violation(Invariant::PinnedRemoved, &em);
        }
        if !em.has(flags::LOGGING) {
            self.list_del_init(slot.id, &em, false);
        } else {
            if self.st(slot.id) & ON_MODIFIED != 0 {
                self.violation(Invariant::RemovedStillListed, &em);
            }
            self.keep_detached_value(slot.id, em);
        }
        self.leave_tree(slot.id);
    }

    /// `replace_extent_mapping`: `new` takes `cur`'s place (counter unchanged), then setup.
    fn replace_extent_mapping(
        &mut self,
        cur_key: u64,
        new: ExtentMap,
        id: EmId,
        modified: bool,
    ) -> u64 {
        let slot = Slot { em: new, id };
        let cur = if new.start == cur_key {
            // rb_replace_node: same position, in place.
            btree::get_mut(&mut self.w.root, cur_key).map(|s| std::mem::replace(s, slot))
        } else {
            btree::remove(&mut self.w.root, cur_key)
        };
        if let Some(cur) = &cur {
            self.after_tree_removal(cur);
        }
        if self.st(id) & IN_TREE != 0 {
            self.violation(Invariant::DoubleMembership, &new);
        }
        self.enter_tree(id);
        if new.start != cur_key || cur.is_none() {
            btree::insert(&mut self.w.root, slot);
        }
        self.w.dirty = true;
        self.setup_extent_mapping(new.start, modified)
    }

    /// `btrfs_clear_em_logging`: clear LOGGING; merge if still in the tree.
    /// Returns the start and length of the map afterwards if it is in the tree.
    pub(crate) fn clear_em_logging(&mut self, id: EmId, start: u64) -> Option<(u64, u64)> {
        self.clear_em_logging_peek(id, start, None, &mut None, &mut None)
    }

    /// [`Locked::clear_em_logging`], also setting `next_value` to the current value of map
    /// `next` if it is the map right after this one (in the same leaf or first in the next):
    /// what [`Locked::current_value`] would return for it, without another search. fsync's
    /// next map is usually that one.
    ///
    /// `cursor`: in, where the previous section of the same logging pass left this map (used
    /// only if no other critical section ran on the tree since, and if the slot there is
    /// this map); out, where map `next` is when its value was set.
    ///
    /// A merge into the previous map, when the cursor to `next` is kept, leaves the merged-away
    /// slot in place (a [`Gap`]); otherwise the gap is removed before this returns. Same merge
    /// decisions and bookkeeping either way.
    pub(crate) fn clear_em_logging_peek(
        &mut self,
        id: EmId,
        start: u64,
        next: Option<EmId>,
        cursor: &mut Option<LogCursor>,
        next_value: &mut Option<ExtentMap>,
    ) -> Option<(u64, u64)> {
        let section = self.w.sections;
        // The cursor, and the gap left with it, are used only if no other critical section
        // ran since this pass's previous one (any other would have settled the gap).
        if let Some(c) = cursor.take().filter(|c| c.section + 1 == section) {
            if let Some(done) = self.clear_em_logging_cursor(id, start, next, c, cursor, next_value)
            {
                return done;
            }
        }
        self.clear_em_logging_search(id, start, next, cursor, next_value)
    }

    /// [`Locked::clear_em_logging_peek`] from the pass's cursor: `None` (nothing changed) if
    /// the case is not one it handles.
    fn clear_em_logging_cursor(
        &mut self,
        id: EmId,
        start: u64,
        next: Option<EmId>,
        c: LogCursor,
        cursor: &mut Option<LogCursor>,
        next_value: &mut Option<ExtentMap>,
    ) -> Option<Option<(u64, u64)>> {
        let section = self.w.sections;
        let w = &mut *self.w;
        let gap = w.gap;
        if gap.is_some_and(|g| g.run_path != c.path || g.run_end() != c.at) {
            return None;
        }
        if w.ids.get(id).state & IN_TREE == 0 {
            return None;
        }
        // What the decision needs from the map's own leaf, read without copying the leaf (the
        // published version may share it).
        let at = c.at;
        let (mut this, next_slot, leaf_len, prev_here) = {
            let r = btree::leaf_at(&w.root, &c.path)?;
            let this = *r.get(at).filter(|s| s.em.start == start && s.id == id)?;
            let next_slot = match r.get(at + 1) {
                Some(n) => Some(*n),
                None => btree::next_after(&w.root, start).copied(),
            };
            // Without a gap, the previous map is the slot before, in this leaf.
            let prev = match gap {
                Some(_) => None,
                None => Some(*r.get(at.checked_sub(1)?)?),
            };
            (this, next_slot, r.len(), prev)
        };
        let had_logging = this.em.has(flags::LOGGING);
        this.em.flags &= !flags::LOGGING;
        let (head_path, head_at) = match gap {
            Some(g) => (g.head_path, g.head_at as usize),
            None => (c.path, at.wrapping_sub(1)),
        };
        // The merge into the previous map (the head), decided and written through one access
        // to the head's leaf when there is a gap (that leaf is then the working version's own:
        // the run's first merge wrote it). The map's own slot joins the run.
        let absorbed = match (gap, prev_here) {
            (Some(g), _) => {
                let mut a = btree::leaf_mut_at(&mut w.root, &g.head_path)?;
                let prev = a.slots().get(head_at).filter(|p| p.em.start == g.head)?;
                match merge_decisions(&w.ids, &this, Some(Some(prev)), Some(next_slot.as_ref()))? {
                    (true, false) => {
                        let merged = merged_with_prev(&prev.em, this.em);
                        Some((a.replace(head_at, Slot { em: merged, id }).ok()?, merged))
                    }
                    _ => return None,
                }
            }
            (None, Some(prev)) => {
                match merge_decisions(&w.ids, &this, Some(Some(&prev)), Some(next_slot.as_ref()))? {
                    (true, false) => {
                        // The head's leaf is copied if the published version shares it (once
                        // per run).
                        let merged = merged_with_prev(&prev.em, this.em);
                        let gone = btree::leaf_mut_at(&mut w.root, &head_path)?
                            .replace(head_at, Slot { em: merged, id })
                            .ok()?;
                        Some((gone, merged))
                    }
                    (false, false) => None,
                    _ => return None,
                }
            }
            (None, None) => return None,
        };
        let next_slot = next_slot.filter(|n| Some(n.id) == next);
        let Some((gone, merged)) = absorbed else {
            // Nothing merges. The flag is cleared in the slot only if it was written there;
            // the map stays, and is the previous map of the next one.
            if had_logging {
                btree::leaf_mut_at(&mut w.root, &c.path)?.clear_flags(at, flags::LOGGING);
                w.dirty = true;
            }
            if let Some(n) = next_slot {
                let to = if at + 1 < leaf_len {
                    Some((c.path, at + 1))
                } else {
                    btree::leaf_path(&w.root, n.em.start)
                };
                if let Some((path, at)) = to {
                    *cursor = Some(LogCursor { section, path, at });
                }
                *next_value = Some(n.em);
            }
            return Some(Some((start, this.em.len)));
        };
        let (run_from, run_key, len) = match gap {
            Some(g) => (g.run_from, g.run_key, g.len + 1),
            None => (at as u32, start, 1),
        };
        let mut g = Gap {
            head_path,
            head_at: head_at as u32,
            head: merged.start,
            run_path: c.path,
            run_from,
            run_key,
            len,
        };
        w.dirty = true;
        match next_slot {
            Some(n) if at + 1 < leaf_len => {
                w.gap = Some(g);
                *cursor = Some(LogCursor {
                    section,
                    path: c.path,
                    at: at + 1,
                });
                *next_value = Some(n.em);
            }
            Some(n) => {
                // The run reaches the end of its leaf and the pass moves on to the next leaf:
                // the run goes (the head's leaf loses its tail, any other leaf goes whole),
                // and a new one starts there with the same head.
                w.gap = Some(g);
                w.close_run(false);
                match (
                    btree::leaf_path(&w.root, g.head),
                    btree::leaf_path(&w.root, n.em.start),
                ) {
                    (Some((hp, hi)), Some((np, ni))) => {
                        g.head_path = hp;
                        g.head_at = hi as u32;
                        g.run_path = np;
                        g.run_from = ni as u32;
                        g.run_key = n.em.start;
                        g.len = 0;
                        w.gap = Some(g);
                        *cursor = Some(LogCursor {
                            section,
                            path: np,
                            at: ni,
                        });
                        *next_value = Some(n.em);
                    }
                    _ => *next_value = Some(n.em),
                }
            }
            None => {
                w.gap = Some(g);
                w.close_gap();
            }
        }
        // No copy of a merged-away map's id outlives this call: the caller's own map absorbed
        // it and map `next` is listed (listed maps never merge), so an id nothing else holds
        // is freed now rather than at the end of the section.
        self.merged_away_one(&gone, true);
        Some(Some((merged.start, merged.len)))
    }

    /// [`Locked::clear_em_logging_peek`] without a usable cursor (or a case the cursor path
    /// leaves): the gap goes, the map is found by a search, and merges are applied to the tree
    /// at once.
    fn clear_em_logging_search(
        &mut self,
        id: EmId,
        start: u64,
        next: Option<EmId>,
        cursor: &mut Option<LogCursor>,
        next_value: &mut Option<ExtentMap>,
    ) -> Option<(u64, u64)> {
        let section = self.w.sections;
        let w = &mut *self.w;
        w.close_gap();
        if w.ids.get(id).state & IN_TREE == 0 {
            return None;
        }
        let mut path = None;
        let (mut leaf, at) = btree::leaf_mut_path(&mut w.root, start, &mut path)?;
        if leaf.slots().get(at).is_none_or(|s| s.id != id) {
            return None;
        }
        w.dirty = true;
        leaf.clear_flags(at, flags::LOGGING);
        let Some(plan) = plan_merge_in_leaf(&w.ids, leaf.slots(), at) else {
            // A neighbour in another leaf: the general path.
            let key = self.try_merge_map(start);
            return self.slot(key).map(|s| (s.em.start, s.em.len));
        };
        let gone = apply_merge_in_leaf(&mut leaf, at, &plan);
        let at = if plan.prev { at - 1 } else { at };
        let small = btree::leaf_is_small(leaf.slots().len());
        if let (Some(s), Some(path)) = (leaf.slots().get(at + 1), path) {
            if Some(s.id) == next {
                *next_value = Some(s.em);
                if !small {
                    *cursor = Some(LogCursor {
                        section,
                        path,
                        at: at + 1,
                    });
                }
            }
        }
        if small {
            btree::rebalance(&mut w.root, plan.em.start);
        }
        self.merged_away(&gone, true);
        Some((plan.em.start, plan.em.len))
    }

    /// fsync's collection step for one map: if `take` accepts the map's current value (see
    /// [`Locked::current_value`]), sets LOGGING on it and returns the new value. One descent
    /// when the map is in the tree. A listed map that is no longer in the tree (the kernel
    /// policy's stale pieces, removed while listed) gets the flag on its own value only, as
    /// the kernel sets `em->flags` on the listed struct: the map that now sits at its offset
    /// is a different map and is left alone (a listed map never changes its start in the
    /// tree: `can_merge_extent_map` refuses listed maps).
    pub(crate) fn set_logging_if(
        &mut self,
        e: ListEntry,
        take: impl FnOnce(&ExtentMap) -> bool,
    ) -> Option<ExtentMap> {
        let id = e.id;
        if self.st(id) & IN_TREE != 0 {
            // (A map that is not taken costs a path copy if the path was shared: once per leaf
            // and pass at most, cheaper than a second descent for every taken map.)
            if let Some(s) = btree::get_mut(&mut self.w.root, e.start) {
                if s.id == id {
                    if !take(&s.em) {
                        return None;
                    }
                    s.em.flags |= flags::LOGGING;
                    let v = s.em;
                    self.w.dirty = true;
                    return Some(v);
                }
            }
        }
        let v = self.w.detached.get_mut(&id)?;
        if !take(v) {
            return None;
        }
        v.flags |= flags::LOGGING;
        Some(*v)
    }

    /// [`Locked::set_logging_if`] for many maps at once, `entries` sorted by start, with one
    /// descent per B+tree leaf instead of one per map: each map `take` accepts gets LOGGING and
    /// a reference; the entry of each other map is dropped (set to `None`).
    pub(crate) fn set_logging_sorted(
        &mut self,
        entries: &mut [Option<ListEntry>],
        take: impl Fn(&ExtentMap) -> bool,
    ) {
        let w = &mut *self.w;
        let ids = &mut w.ids;
        let detached = &mut w.detached;
        let mut dirty = false;
        let start = |e: &Option<ListEntry>| e.as_ref().map_or(0, |e| e.start);
        btree::for_each_mut_sorted(&mut w.root, entries, start, |entry, slot| {
            let Some(e) = entry else {
                return;
            };
            let n = ids.get_mut(e.id);
            let v = match slot {
                Some(s) if n.state & IN_TREE != 0 && s.id == e.id => take(&s.em).then(|| {
                    s.em.flags |= flags::LOGGING;
                    dirty = true;
                    s.em
                }),
                // Not in the tree (or another map sits at its start): its own value.
                _ => detached.get_mut(&e.id).and_then(|v| {
                    take(v).then(|| {
                        v.flags |= flags::LOGGING;
                        *v
                    })
                }),
            };
            match v {
                Some(_) => n.refs = n.refs.wrapping_add(1),
                None => *entry = None,
            }
        });
        w.dirty |= dirty;
    }

    /// [`Locked::set_logging_sorted`] for logging pass `pass` with the flags of the maps in the
    /// tree only recorded ([`VirtualLogging`]): the tree is read, not changed (maps out of the
    /// tree get the flag on their kept value, as before). Returns false, doing nothing, if
    /// another pass has recorded flags (the caller then sets them).
    pub(crate) fn record_logging_sorted(
        &mut self,
        entries: &mut [Option<ListEntry>],
        take: impl Fn(&ExtentMap) -> bool,
        pass: u64,
    ) -> bool {
        let w = &mut *self.w;
        if w.virtual_logging.is_some() {
            return false;
        }
        let ids = &mut w.ids;
        let detached = &mut w.detached;
        let start = |e: &Option<ListEntry>| e.as_ref().map_or(0, |e| e.start);
        btree::for_each_sorted(&w.root, entries, start, |entry, slot| {
            let Some(e) = entry else {
                return;
            };
            let n = ids.get_mut(e.id);
            let taken = match slot {
                Some(s) if n.state & IN_TREE != 0 && s.id == e.id => take(&s.em),
                // Not in the tree (or another map sits at its start): its own value.
                _ => detached.get_mut(&e.id).is_some_and(|v| {
                    take(v) && {
                        v.flags |= flags::LOGGING;
                        true
                    }
                }),
            };
            match taken {
                true => n.refs = n.refs.wrapping_add(1),
                false => *entry = None,
            }
        });
        w.virtual_logging = Some(VirtualLogging {
            pass,
            current: None,
        });
        true
    }

    /// The map logging pass `pass` hands out (`e`, value `v`): if its flags are only recorded,
    /// it is the pass's current map and the copy handed out gets LOGGING.
    pub(crate) fn hand_out(&mut self, pass: u64, e: ListEntry, v: &mut ExtentMap) {
        if let Some(vl) = self.w.virtual_logging.as_mut().filter(|vl| vl.pass == pass) {
            vl.current = Some(e);
            v.flags |= flags::LOGGING;
        }
    }

    /// Logging pass `pass` is about to clear its current map, or is done.
    pub(crate) fn clear_current(&mut self, pass: u64, done: bool) {
        if let Some(vl) = self.w.virtual_logging.as_mut().filter(|vl| vl.pass == pass) {
            vl.current = None;
            if done {
                self.w.virtual_logging = None;
            }
        }
    }

    /// Current value of a map: the tree's slot if it is in the tree, else the value it had
    /// when it left the tree (kept for listed maps; `fallback` for others).
    pub(crate) fn current_value(&self, id: EmId, fallback: ExtentMap) -> ExtentMap {
        if self.st(id) & IN_TREE != 0 {
            if let Some(s) = self.slot(fallback.start) {
                if s.id == id {
                    return s.em;
                }
            }
        }
        self.w.detached.get(&id).copied().unwrap_or(fallback)
    }

    /// Current value of a listed map (see [`Locked::current_value`]). A listed map is in the
    /// tree or has its value kept; the fallback (an empty map at its start) is unreachable.
    pub(crate) fn listed_value(&self, e: ListEntry) -> ExtentMap {
        let v = self.current_value(e.id, ExtentMap::hole(e.start, 0, 0));
        debug_assert!(v.len > 0, "listed map {e:?} neither in the tree nor kept");
        v
    }

    pub(crate) fn is_listed(&self, id: EmId) -> bool {
        self.st(id) & LISTED != 0
    }

    pub(crate) fn is_freed(&self, id: EmId) -> bool {
        self.st(id) & FREED != 0
    }

    pub(crate) fn next_pass_id(&mut self) -> u64 {
        let p = self.w.next_pass;
        self.w.next_pass += 1;
        p
    }

    /// Takes every entry off the modified list, head (newest) first; each entry's list holder
    /// is handed back (its id stays valid until the end of this critical section).
    pub(crate) fn take_modified(&mut self) -> impl Iterator<Item = ListEntry> {
        let list = self.w.modified.take();
        let ids = &mut self.w.ids;
        for e in list.iter().filter_map(|(_, e)| e.as_ref()) {
            ids.get_mut(e.id).state &= !ON_MODIFIED;
            ids.release(e.id);
        }
        list.into_iter().rev().filter_map(|(_, e)| e)
    }

    /// Number of maps on the modified list.
    pub(crate) fn modified_len(&self) -> usize {
        self.w.modified.live
    }

    /// Marks a map taken off the modified list as still linked (to a ring detached from the
    /// list head), as the kernel leaves the rest of the list after -EFBIG. No list holds it
    /// any more: once out of the tree it is unreachable and its id is reused.
    pub(crate) fn relink_detached(&mut self, id: EmId) {
        self.set_bits(id, ON_MODIFIED);
    }

    /// `search_extent_mapping` / `lookup_extent_mapping` in the working version.
    pub(crate) fn search(&self, start: u64, len: u64, strict: bool) -> Option<Slot> {
        search_link(&self.w.root, start, len, strict).copied()
    }

    /// Checks the identity arena against the working tree and the lists: every held id is
    /// counted once per tree slot and list entry holding it plus `passes` logging passes'
    /// current maps in all; no id on the free list is held or reachable; outside a critical
    /// section's end no id is left without holder off the free list. Returns the first
    /// discrepancy.
    pub(crate) fn check_ids(&self) -> Result<(), String> {
        let w = &*self.w;
        let ids = &w.ids;
        let mut held = vec![0u32; ids.nodes.len()];
        let mut count = |id: EmId, what: &str| -> Result<(), String> {
            let h = held
                .get_mut(id as usize)
                .ok_or_else(|| format!("{what} holds id {id} outside the arena"))?;
            *h += 1;
            Ok(())
        };
        for s in btree::Iter::new(&w.root, 0) {
            count(s.id, "tree")?;
            if ids.get(s.id).state & IN_TREE == 0 {
                return Err(format!("id {} in the tree without IN_TREE", s.id));
            }
        }
        for e in w.modified.entries.iter().filter_map(|(_, e)| e.as_ref()) {
            count(e.id, "modified list")?;
        }
        for (_, _, v) in &w.logging.passes {
            for e in v.iter().flatten() {
                count(e.id, "logging list")?;
            }
        }
        let mut free = vec![false; ids.nodes.len()];
        for &id in &ids.free {
            let n = ids.get(id);
            if std::mem::replace(&mut free[id as usize], true) {
                return Err(format!("id {id} twice on the free list"));
            }
            if n.holders != 0 || held[id as usize] != 0 || n.state != ARENA_FREE {
                return Err(format!(
                    "id {id} on the free list but held ({} recorded, {} found, state {:#x})",
                    n.holders, held[id as usize], n.state
                ));
            }
        }
        let mut extra = 0u32;
        for (id, n) in ids.nodes.iter().enumerate() {
            if free[id] {
                continue;
            }
            if n.holders < held[id] {
                return Err(format!(
                    "id {id}: {} holders recorded, {} found",
                    n.holders, held[id]
                ));
            }
            if n.holders == 0 && !ids.pending.contains(&(id as EmId)) {
                return Err(format!("id {id} without holder and not freed"));
            }
            extra += n.holders - held[id];
        }
        let running = w.logging.passes.len() as u32;
        if extra > running {
            return Err(format!(
                "{extra} holders not found in the tree or lists ({running} logging passes)"
            ));
        }
        Ok(())
    }
}

impl BtrfsInode {
    pub(crate) fn new(core: Arc<FsCore>, root: u64, ino: u64) -> Self {
        BtrfsInode {
            root,
            ino,
            core,
            inode_lock: RwLock::new(()),
            mmap_lock: RwLock::new(()),
            runtime_flags: AtomicU32::new(0),
            tree: ExtentMapTree::new(),
        }
    }

    /// Root (subvolume) id.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Inode number.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// The inode lock (the kernel's `i_rwsem`). Lock order: see the crate documentation.
    pub fn inode_lock(&self) -> &RwLock<()> {
        &self.inode_lock
    }

    /// The mmap lock (the kernel's `i_mmap_lock`): fsync takes it exclusive, the shrinker only
    /// tries it shared.
    pub fn mmap_lock(&self) -> &RwLock<()> {
        &self.mmap_lock
    }

    /// Sets runtime flag bits ([`runtime_flags`]).
    pub fn set_runtime_flags(&self, bits: u32) {
        self.runtime_flags.fetch_or(bits, Ordering::SeqCst);
    }

    /// Clears runtime flag bits.
    pub fn clear_runtime_flags(&self, bits: u32) {
        self.runtime_flags.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Current runtime flags.
    pub fn runtime_flags(&self) -> u32 {
        self.runtime_flags.load(Ordering::SeqCst)
    }

    /// `btrfs_set_inode_full_sync`.
    pub fn btrfs_set_inode_full_sync(&self) {
        self.set_runtime_flags(runtime_flags::NEEDS_FULL_SYNC);
    }

    /// NEEDS_FULL_SYNC is set.
    pub fn needs_full_sync(&self) -> bool {
        self.runtime_flags() & runtime_flags::NEEDS_FULL_SYNC != 0
    }

    /// Takes the tree write lock, counting waiters so that the shrinker can notice contention
    /// (`rwlock_needbreak`).
    pub(crate) fn lock_tree(&self) -> Locked<'_> {
        self.tree.reclaim();
        self.lock_tree_no_reclaim()
    }

    /// [`BtrfsInode::lock_tree`] without freeing the tree's reclaimable versions first: for
    /// fsync's logging pass, so that an fsync never pays for the garbage of the writes before
    /// it (the versions those writes retired become reclaimable at a time set by the epoch
    /// collector, which in a busy process runs on other threads, i.e. in the middle of the
    /// pass). The queue stays bounded: a pass retires at most one version, and the writes that
    /// gave it maps to log, the inode's next writer and the shrinker's visits all reclaim.
    pub(crate) fn lock_tree_no_reclaim(&self) -> Locked<'_> {
        let mut l = self.lock_tree_keep_gap();
        l.w.settle();
        l
    }

    /// [`BtrfsInode::lock_tree_no_reclaim`] that does not settle a logging pass's unfinished
    /// work ([`TreeW::settle`]): for that pass's own critical sections only.
    pub(crate) fn lock_tree_keep_gap(&self) -> Locked<'_> {
        let w = match self.tree.writer.try_lock() {
            Some(w) => w,
            None => {
                self.tree.waiters.fetch_add(1, Ordering::Relaxed);
                let w = self.tree.writer.lock();
                self.tree.waiters.fetch_sub(1, Ordering::Relaxed);
                w
            }
        };
        Locked::begin(self, w)
    }

    /// `write_trylock` of the tree lock, as the shrinker takes it (see [`TryLocked`]).
    pub(crate) fn try_lock_tree(&self) -> Option<TryLocked<'_>> {
        self.tree
            .writer
            .try_lock()
            .map(|w| TryLocked { inode: self, w })
    }

    /// Frees the tree's retired versions whose grace period has ended: for the shrinker,
    /// after it scanned the inode and let go of its locks (not when it only found the inode
    /// busy: an fsync holding the mmap lock would otherwise find its allocator's memory freed
    /// under it by the shrinker's thread, and its next allocation pay for consolidating it).
    pub(crate) fn reclaim_retired(&self) {
        self.tree.reclaim();
    }

    /// Somebody waits for the tree lock.
    pub(crate) fn tree_contended(&self) -> bool {
        self.tree.waiters.load(Ordering::Relaxed) > 0
    }

    #[inline(always)]
    pub(crate) fn sched(&self, _p: crate::sched::SchedPoint) {
        #[cfg(feature = "sched-points")]
        self.core.sched(_p);
    }

    /// `btrfs_lookup_extent_mapping`: the first map intersecting `[start, start+len)` (end
    /// saturating), as a copy. Lock-free: reads the latest published version under an epoch
    /// guard and never waits for writers or the shrinker.
    pub fn btrfs_lookup_extent_mapping(&self, start: u64, len: u64) -> Option<ExtentMap> {
        self.tree
            .read(|root| search_link(root, start, len, true).map(|s| s.em))
    }

    /// `btrfs_search_extent_mapping`: like the lookup, but returns a nearby map (the next one,
    /// else the last one before `start`) when none intersects.
    pub fn btrfs_search_extent_mapping(&self, start: u64, len: u64) -> Option<ExtentMap> {
        self.tree
            .read(|root| search_link(root, start, len, false).map(|s| s.em))
    }

    /// All maps of the current version, in file order (a snapshot).
    pub fn extent_maps(&self) -> Vec<ExtentMap> {
        self.tree
            .read(|root| btree::Iter::new(root, 0).map(|s| s.em).collect())
    }

    /// All maps of the working version, in file order (tests: what the next critical section
    /// sees, including what a logging pass has not published yet).
    #[cfg(test)]
    pub(crate) fn working_extent_maps(&self) -> Vec<ExtentMap> {
        let l = self.lock_tree();
        btree::Iter::new(&l.w.root, 0).map(|s| s.em).collect()
    }

    /// Number of maps in the current version.
    pub fn nr_extent_maps(&self) -> u64 {
        self.lock_tree().w.nr
    }

    /// Values of the maps on the modified list, head first (as the kernel walks it).
    pub fn modified_extents(&self) -> Vec<ExtentMap> {
        let l = self.lock_tree();
        l.w.modified
            .entries
            .iter()
            .rev()
            .filter_map(|(_, e)| e.as_ref())
            .map(|e| l.listed_value(*e))
            .collect()
    }

    /// Checks the tree's identity arena (test support): every identity held by the working
    /// tree, a list or a logging pass is recorded as held, and none of them is on the free
    /// list. Returns the first discrepancy found.
    #[doc(hidden)]
    pub fn check_identities(&self) -> Result<(), String> {
        self.lock_tree().check_ids()
    }

    /// Debug view of the map starting exactly at `start`.
    pub fn map_info(&self, start: u64) -> Option<MapInfo> {
        let l = self.lock_tree();
        let s = l.slot(start)?;
        let st = l.st(s.id);
        Some(MapInfo {
            em: s.em,
            refs: l.refs(s.id),
            on_modified_list: st & ON_MODIFIED != 0,
            on_logging_list: st & ON_LOGGING != 0,
        })
    }

    /// `btrfs_add_extent_mapping` as used by `btrfs_get_extent`: insert `em` (not modified);
    /// on overlap, return the existing map if it serves `start`, else trim `em` to the gap
    /// around it (`merge_extent_mapping`) and insert that. Returns a copy of the map that now
    /// serves `start` (after any merge).
    pub fn btrfs_add_extent_mapping(
        &self,
        em: ExtentMap,
        start: u64,
        len: u64,
    ) -> Result<ExtentMap, EmError> {
        if em.len == 0 {
            return Err(EmError::Invalid("zero-length extent map"));
        }
        if em.disk_bytenr == EXTENT_MAP_INLINE && em.start != 0 {
            return Err(EmError::Invalid("inline extent map not at offset 0"));
        }
        self.sched(crate::sched::SchedPoint::AddBegin);
        let result = {
            let mut l = self.lock_tree();
            let node = l.new_node();
            match l.add_extent_mapping(em, node, false) {
                Ok(key) => {
                    let out = l.slot(key).map(|s| s.em).unwrap_or(em);
                    // The caller's (btrfs_get_extent's) reference.
                    l.put(node, &em);
                    Ok(out)
                }
                Err(EmError::Exists { .. }) => l.handle_em_exist(em, node, start, len),
                Err(e) => {
                    l.put(node, &em);
                    Err(e)
                }
            }
        };
        self.core.check_budget();
        result
    }

    /// `btrfs_drop_extent_map_range`: drop every map intersecting `[start, end]` (inclusive),
    /// splitting maps that stick out; PINNED maps are left alone if `skip_pinned`.
    pub fn btrfs_drop_extent_map_range(&self, start: u64, end: u64, skip_pinned: bool) {
        if end < start {
            tracing::warn!(
                root = self.root,
                ino = self.ino,
                start,
                end,
                "btrfs_drop_extent_map_range: end before start"
            );
            return;
        }
        let (len, end_excl) = if end == u64::MAX {
            if start == 0 && !skip_pinned {
                self.drop_all_extent_maps_fast();
                return;
            }
            (u64::MAX, u64::MAX)
        } else {
            (end - start + 1, end + 1)
        };
        let mut split = self.core.alloc_spare();
        let mut split2 = self.core.alloc_spare();
        self.sched(crate::sched::SchedPoint::DropRangeBegin);
        let mut l = self.lock_tree();
        l.drop_range_locked(start, len, end_excl, skip_pinned, &mut split, &mut split2);
    }

    /// `drop_all_extent_maps_fast`: remove every map, clearing PINNED and LOGGING first, with
    /// lock breaks.
    pub fn drop_all_extent_maps_fast(&self) {
        let mut l = self.lock_tree();
        let mut batch = 0usize;
        while let Some(key) = l.first_key() {
            l.update(key, |em| em.flags &= !(flags::PINNED | flags::LOGGING));
            if let Some(s) = l.remove_extent_mapping(key) {
                l.put(s.id, &s.em);
            }
            batch += 1;
            if batch >= DROP_ALL_BATCH || self.tree_contended() {
                batch = 0;
                drop(l);
                self.sched(crate::sched::SchedPoint::DropAllLockBreak);
                l = self.lock_tree();
            }
        }
    }

    /// `btrfs_replace_extent_map_range`: drop `[em.start, em.end)` and insert `em`, retrying
    /// while a concurrent task re-inserts an overlapping map (-EEXIST).
    pub fn btrfs_replace_extent_map_range(
        &self,
        em: ExtentMap,
        modified: bool,
    ) -> Result<(), EmError> {
        if em.len == 0 {
            return Err(EmError::Invalid("zero-length extent map"));
        }
        let end = em.start.saturating_add(em.len - 1);
        // The kernel allocates the map once and retries its insert; here each try allocates
        // an identity in its critical section (an identity lives in the tree's writer state),
        // and a failed try lets it go without a reference drop: to the kernel's ledger it is
        // the same map, still held by its creator.
        // The kernel loops until the insert succeeds; bound it so a livelock is reported.
        const MAX_TRIES: u32 = 1 << 20;
        let mut tries = 0;
        let result = loop {
            self.btrfs_drop_extent_map_range(em.start, end, false);
            self.sched(crate::sched::SchedPoint::ReplaceBetweenDropAndInsert);
            let mut l = self.lock_tree();
            let node = l.new_node();
            match l.add_extent_mapping(em, node, modified) {
                Ok(_) => {
                    // The caller's reference (create_io_em's, dropped when it is done).
                    l.put(node, &em);
                    break Ok(());
                }
                Err(EmError::Exists { .. }) if tries < MAX_TRIES => tries += 1,
                Err(e) => {
                    l.put(node, &em);
                    tracing::error!(
                        root = self.root,
                        ino = self.ino,
                        start = em.start,
                        len = em.len,
                        "btrfs_replace_extent_map_range gave up: {e}"
                    );
                    break Err(e);
                }
            }
        };
        self.core.check_budget();
        result
    }

    /// `btrfs_split_extent_map`: split the PINNED, modified, regular map `[start, start+len)`
    /// of a direct-IO ordered extent into `[start, start+pre)` at `new_logical` and the rest.
    pub fn btrfs_split_extent_map(
        &self,
        start: u64,
        len: u64,
        pre: u64,
        new_logical: u64,
    ) -> Result<(), EmError> {
        if pre == 0 || pre >= len {
            return Err(EmError::Invalid("split: pre must be in (0, len)"));
        }
        if !self.core.alloc_spare() || !self.core.alloc_spare() {
            return Err(EmError::NoMem);
        }
        self.sched(crate::sched::SchedPoint::SplitBegin);
        let mut l = self.lock_tree();
        let Some(em) = l.search(start, len, true) else {
            return Err(EmError::Io {
                start,
                end: start.saturating_add(len),
            });
        };
        let v = em.em;
        if v.len != len
            || v.is_compressed()
            || !v.is_regular()
            || !v.has(flags::PINNED)
            || v.has(flags::LOGGING)
            || l.st(em.id) & ON_MODIFIED == 0
        {
            return Err(EmError::Invalid(
                "split: map must be exactly the range, pinned, regular, uncompressed, modified, not logging",
            ));
        }
        l.get_ref(em.id); // lookup reference
        let saved = v.flags;
        l.update(v.start, |e| e.flags &= !flags::PINNED);
        let cur = l.slot(v.start).map(|s| s.em).unwrap_or(v);
        let pre_em = ExtentMap {
            start: v.start,
            len: pre,
            disk_bytenr: new_logical,
            disk_num_bytes: pre,
            offset: 0,
            ram_bytes: pre,
            generation: v.generation,
            flags: saved,
        };
        let pre_node = l.new_node();
        l.replace_extent_mapping(v.start, pre_em, pre_node, true);
        let mid_len = v.len - pre;
        let mid = ExtentMap {
            start: v.start.saturating_add(pre),
            len: mid_len,
            disk_bytenr: cur.block_start().wrapping_add(pre),
            disk_num_bytes: mid_len,
            offset: 0,
            ram_bytes: mid_len,
            generation: v.generation,
            flags: saved,
        };
        let mid_node = l.new_node();
        if let Err(e) = l.add_extent_mapping(mid, mid_node, true) {
            tracing::warn!(
                root = self.root,
                ino = self.ino,
                start,
                len,
                "btrfs_split_extent_map: insert of the second part failed: {e}"
            );
        }
        l.put(em.id, &cur); // once for us
        l.put(em.id, &cur); // once for the tree
        l.put(mid_node, &mid);
        l.put(pre_node, &pre_em);
        drop(l);
        self.core.check_budget();
        Ok(())
    }

    /// `btrfs_unpin_extent_cache`: at ordered-extent completion, set the generation, clear
    /// PINNED and try to merge.
    pub fn btrfs_unpin_extent_cache(&self, start: u64, len: u64, gen: u64) -> Result<(), EmError> {
        self.sched(crate::sched::SchedPoint::UnpinBegin);
        let mut l = self.lock_tree();
        let Some(em) = l.search(start, len, true) else {
            tracing::warn!(
                root = self.root,
                ino = self.ino,
                start,
                len,
                gen,
                "no extent map found for inode {} (root {}) when unpinning extent range [{start}, {}), generation {gen}",
                self.ino,
                self.root,
                start.saturating_add(len)
            );
            return Err(EmError::NotFound {
                start,
                end: start.saturating_add(len),
            });
        };
        l.get_ref(em.id);
        if em.em.start != start {
            tracing::warn!(
                root = self.root,
                ino = self.ino,
                found = em.em.start,
                start,
                "found extent map for inode {} (root {}) with unexpected start offset {} when unpinning extent range [{start}, {}), generation {gen}",
                self.ino,
                self.root,
                em.em.start,
                start.saturating_add(len)
            );
            l.put(em.id, &em.em);
            return Err(EmError::Unclean {
                expected: start,
                found: em.em.start,
            });
        }
        l.update(start, |e| {
            e.generation = gen;
            e.flags &= !flags::PINNED;
        });
        let key = l.try_merge_map(start);
        let cur = l.slot(key).map(|s| s.em).unwrap_or(em.em);
        l.put(em.id, &cur);
        Ok(())
    }

    /// Empties the modified list, as full (NEEDS_FULL_SYNC) LOG_INODE_ALL logging does in
    /// `btrfs_log_inode`.
    pub fn btrfs_log_inode_clear_modified_extents(&self) {
        self.sched(crate::sched::SchedPoint::ClearModifiedBegin);
        let mut l = self.lock_tree();
        for e in l.take_modified() {
            if l.is_freed(e.id) {
                let v = l.listed_value(e);
                l.violation(Invariant::UseAfterFree, &v);
            }
        }
    }

    /// `try_release_extent_mapping`'s extent-map part (folio release) for `[start, end]`
    /// (inclusive): stop at a PINNED map or one not starting where expected; remove maps that
    /// are unlisted or LOGGING, or listed with a generation older than the fs generation.
    /// (The io_tree EXTENT_LOCKED test is the caller's business: see
    /// [`BtrfsInode::try_release_extent_mapping_unless_locked`].)
    pub fn try_release_extent_mapping(&self, start: u64, end: u64) {
        self.try_release_extent_mapping_unless_locked(start, end, |_, _| false);
    }

    /// [`BtrfsInode::try_release_extent_mapping`] with the kernel's io_tree test: a map whose
    /// range `[map start, map end]` (inclusive) has EXTENT_LOCKED bits (`locked` returns true)
    /// is left in place and the walk goes on after it. `locked` runs with the tree lock held.
    pub fn try_release_extent_mapping_unless_locked(
        &self,
        mut start: u64,
        end: u64,
        locked: impl Fn(u64, u64) -> bool,
    ) {
        while start <= end {
            let cur_gen = self.core.generation();
            let len = (end - start).saturating_add(1);
            let mut l = self.lock_tree();
            let Some(s) = l.search(start, len, true) else {
                break;
            };
            l.get_ref(s.id);
            if s.em.has(flags::PINNED) || s.em.start != start {
                l.put(s.id, &s.em);
                break;
            }
            let listed = l.is_listed(s.id);
            if locked(s.em.start, s.em.end().saturating_sub(1)) {
                // EXTENT_LOCKED somewhere in the map's range: keep it (`goto next`).
            } else if !listed || s.em.has(flags::LOGGING) || s.em.generation < cur_gen {
                if let Some(r) = l.remove_extent_mapping(s.em.start) {
                    l.put(r.id, &r.em);
                }
            }
            l.put(s.id, &s.em);
            drop(l);
            match s.em.end() {
                e if e > start && e != u64::MAX => start = e,
                _ => break,
            }
        }
    }
}

impl Locked<'_> {
    /// The EEXIST branch of `btrfs_add_extent_mapping`.
    fn handle_em_exist(
        &mut self,
        em: ExtentMap,
        node: EmId,
        start: u64,
        len: u64,
    ) -> Result<ExtentMap, EmError> {
        let Some(existing) = self.search(start, len, false) else {
            self.put(node, &em);
            return Err(EmError::Exists {
                start: em.start,
                end: em.end(),
            });
        };
        self.get_ref(existing.id);
        tracing::trace!(
            target: "btrfs_handle_em_exist",
            existing_start = existing.em.start,
            existing_len = existing.em.len,
            map_start = em.start,
            map_len = em.len,
            start,
            len
        );
        let result = if start >= existing.em.start && start < existing.em.end() {
            self.put(node, &em);
            Ok(existing.em)
        } else {
            match self.merge_extent_mapping(&existing, em, node, start) {
                Ok((key, inserted)) => {
                    let out = self.slot(key).map(|s| s.em).unwrap_or(inserted);
                    self.put(node, &inserted);
                    Ok(out)
                }
                Err(e) => {
                    tracing::warn!(
                        root = self.inode.root,
                        ino = self.inode.ino,
                        "extent map merge error existing [{}, {}) with em [{}, {}) start {start}",
                        existing.em.start,
                        existing.em.end(),
                        em.start,
                        em.end()
                    );
                    self.put(node, &em);
                    Err(e)
                }
            }
        };
        self.put(existing.id, &existing.em);
        result
    }

    /// `merge_extent_mapping`: trim `em` to the gap around `existing` and insert it.
    fn merge_extent_mapping(
        &mut self,
        existing: &Slot,
        mut em: ExtentMap,
        node: EmId,
        map_start: u64,
    ) -> Result<(u64, ExtentMap), EmError> {
        if map_start < em.start || map_start >= em.end() {
            return Err(EmError::Invalid(
                "merge_extent_mapping: start outside the map",
            ));
        }
        let (prev, next) = if existing.em.start > map_start {
            (
                btree::prev_before(&self.w.root, existing.em.start).map(|s| s.em),
                Some(existing.em),
            )
        } else {
            (
                Some(existing.em),
                btree::next_after(&self.w.root, existing.em.start).map(|s| s.em),
            )
        };
        let start = prev.map_or(em.start, |p| p.end()).max(em.start);
        let end = next.map_or(em.end(), |n| n.start).min(em.end());
        let start_diff = start.wrapping_sub(em.start);
        em.start = start;
        em.len = end.wrapping_sub(start);
        if em.disk_bytenr < EXTENT_MAP_LAST_BYTE {
            em.offset = em.offset.wrapping_add(start_diff);
        }
        if em.len == 0 {
            return Err(EmError::Exists {
                start: em.start,
                end: em.end(),
            });
        }
        let key = self.add_extent_mapping(em, node, false)?;
        Ok((key, em))
    }

    /// The locked loop of `btrfs_drop_extent_map_range`. `split`/`split2` say whether the two
    /// spare maps could be allocated.
    fn drop_range_locked(
        &mut self,
        mut start: u64,
        len: u64,
        end: u64,
        skip_pinned: bool,
        split: &mut bool,
        split2: &mut bool,
    ) {
        let policy = self.inode.core.policy();
        let mut cur = self.search(start, len, true);
        if let Some(s) = &cur {
            self.get_ref(s.id);
        }
        while let Some(s) = cur.take() {
            let em = self.current_value(s.id, s.em);
            let em_end = em.end();
            let mut next = None;
            if em_end < end {
                if let Some(n) = btree::next_after(&self.w.root, em.start).copied() {
                    if n.em.start < end {
                        self.get_ref(n.id);
                        next = Some(n);
                    }
                }
            }
            if skip_pinned && em.has(flags::PINNED) {
                start = em_end;
                self.put(s.id, &em);
                cur = next;
                continue;
            }
            // The flags the pieces inherit, and what the original loses (section 5, part 1).
            let (piece_flags, clear) = if policy.split_fixed() {
                (em.flags & !flags::LOGGING, flags::PINNED)
            } else {
                (em.flags, flags::PINNED | flags::LOGGING)
            };
            self.update(em.start, |e| e.flags &= !clear);
            let em = self.current_value(s.id, em);
            let modified = self.is_listed(s.id);
            let inside = em.start >= start && em_end <= end;
            if !inside {
                let gen = em.generation;
                let mut replaced_key = Some(em.start);
                if em.start < start {
                    if take_spare(split, split2) {
                        let head_len = start - em.start;
                        let head = if em.disk_bytenr < EXTENT_MAP_LAST_BYTE {
                            ExtentMap {
                                start: em.start,
                                len: head_len,
                                disk_bytenr: em.disk_bytenr,
                                disk_num_bytes: em.disk_num_bytes,
                                offset: em.offset,
                                ram_bytes: em.ram_bytes,
                                generation: gen,
                                flags: piece_flags,
                            }
                        } else {
                            ExtentMap {
                                start: em.start,
                                len: head_len,
                                disk_bytenr: em.disk_bytenr,
                                disk_num_bytes: 0,
                                offset: 0,
                                ram_bytes: head_len,
                                generation: gen,
                                flags: piece_flags,
                            }
                        };
                        let n = self.new_node();
                        self.replace_extent_mapping(em.start, head, n, modified);
                        self.put(n, &head);
                        replaced_key = None;
                    } else {
                        self.remove_em(&s, em, start, end, modified);
                        self.put(s.id, &em);
                        self.put(s.id, &em);
                        cur = next;
                        continue;
                    }
                }
                if em_end > end {
                    if take_spare(split, split2) {
                        let tail_len = em_end - end;
                        let tail = if em.disk_bytenr < EXTENT_MAP_LAST_BYTE {
                            ExtentMap {
                                start: end,
                                len: tail_len,
                                disk_bytenr: em.disk_bytenr,
                                disk_num_bytes: em.disk_num_bytes,
                                offset: em.offset.wrapping_add(end - em.start),
                                ram_bytes: em.ram_bytes,
                                generation: gen,
                                flags: piece_flags,
                            }
                        } else {
                            ExtentMap {
                                start: end,
                                len: tail_len,
                                disk_bytenr: em.disk_bytenr,
                                disk_num_bytes: 0,
                                offset: 0,
                                ram_bytes: tail_len,
                                generation: gen,
                                flags: piece_flags,
                            }
                        };
                        let n = self.new_node();
                        if let Some(k) = replaced_key {
                            self.replace_extent_mapping(k, tail, n, modified);
                        } else if let Err(e) = self.add_extent_mapping(tail, n, modified) {
                            tracing::warn!(
                                root = self.inode.root,
                                ino = self.inode.ino,
                                start = tail.start,
                                len = tail.len,
                                "btrfs_drop_extent_map_range: insert of the tail piece failed: {e}"
                            );
                            if modified {
                                self.inode.btrfs_set_inode_full_sync();
                            }
                        }
                        self.put(n, &tail);
                    } else {
                        self.remove_em(&s, em, start, end, modified);
                    }
                }
            } else {
                self.remove_em(&s, em, start, end, modified);
            }
            // Once for the tree reference (replaced or removed), once for our lookup.
            self.put(s.id, &em);
            self.put(s.id, &em);
            cur = next;
        }
    }

    /// The `remove_em:` label of `btrfs_drop_extent_map_range`.
    fn remove_em(&mut self, s: &Slot, em: ExtentMap, start: u64, end: u64, modified: bool) {
        let in_tree = self.st(s.id) & IN_TREE != 0;
        if !in_tree {
            return;
        }
        if (em.start < start || em.end() > end) && modified {
            self.inode.btrfs_set_inode_full_sync();
        }
        self.remove_extent_mapping(em.start);
    }
}

/// Takes one spare map (`split = split2` dance of the kernel); false if none is left.
fn take_spare(split: &mut bool, split2: &mut bool) -> bool {
    if *split {
        *split = false;
        true
    } else if *split2 {
        *split2 = false;
        true
    } else {
        false
    }
}
