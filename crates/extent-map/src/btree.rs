//! A persistent (copy-on-write) B+tree keyed by a map's `start`: the ordered index of one
//! extent-map tree version.
//!
//! # Definitions
//! - Leaves hold up to [`MAX`] slots sorted by key; inner nodes hold up to [`MAX`] children and
//!   one separator key between each two neighbours.
//! - Nodes are shared between versions through `Arc`. A writer changes its working version with
//!   [`cow`] (`Arc::make_mut` without its atomic read-modify-write), which copies a node only
//!   while an older version (one readers may hold) still shares it; later changes to the same
//!   node in the same version happen in place.
//!
//! # Invariants
//! 1. In an inner node, every key of `children[i]` is `< keys[i]` and every key of
//!    `children[i + 1]` is `>= keys[i]` (separators may be stale lower bounds after removals).
//! 2. Only the root may be a leaf with no slot; no other node is empty; an inner root has at
//!    least two children (a one-child root is collapsed).
//! 3. All leaves are at the same depth; depth grows only by a root split, so it is at most
//!    log_{MAX/2}(largest size ever) + 1. Every recursion here is bounded by the depth.
//!
//! Why a B+tree rather than a binary tree: a path copy costs one allocation per level, and a
//! lookup one cache miss per level; 32-way nodes cut both by a factor of about 5 compared with
//! a balanced binary tree.
//!
//! Why 32 and not 16: slots are `Copy` (a value and an identity index), so copying a leaf is
//! one allocation and a memory copy whatever its size, and a larger leaf means fewer copies,
//! fewer levels and fewer rebalances. Measured against 16 (RESULTS-extent-map.md, fifth
//! session): fewer instructions per lookup, add with merge, range drop and logging pass, and
//! faster in all four `extent_map` benchmarks and `fsync_vs_shrinker`. (With one `Arc` per
//! slot, a leaf copy cost one atomic increment per slot, and 16 was kept.)

use std::sync::Arc;

use crate::extent_map::Slot;

/// Maximum slots per leaf and children per inner node.
pub(crate) const MAX: usize = 32;
/// A node below this size tries to merge with a neighbour after a removal.
const MIN: usize = MAX / 4;

/// A tree (its root). `None` is the empty tree.
pub(crate) type Link = Option<Arc<Node>>;

pub(crate) enum Node {
    Leaf(Vec<Slot>),
    Inner {
        keys: Vec<u64>,
        children: Vec<Arc<Node>>,
    },
}

/// A copy made by [`cow`] (through `Arc::make_mut`) is about to be changed, most often by one
/// insertion (a writer's new map, or a child's split): it gets room for one more entry, so
/// that the insertion does not reallocate (and copy) the node a second time.
impl Clone for Node {
    fn clone(&self) -> Self {
        fn with_room<T: Clone>(v: &[T]) -> Vec<T> {
            let mut c = Vec::with_capacity(v.len() + 1);
            c.extend_from_slice(v);
            c
        }
        match self {
            Node::Leaf(s) => Node::Leaf(with_room(s)),
            Node::Inner { keys, children } => Node::Inner {
                keys: with_room(keys),
                children: with_room(children),
            },
        }
    }
}

impl Node {
    fn len(&self) -> usize {
        match self {
            Node::Leaf(s) => s.len(),
            Node::Inner { children, .. } => children.len(),
        }
    }
}

/// `Arc::make_mut` for tree nodes: a mutable reference to the node, copied first if another
/// handle shares it. Same condition as `Arc::make_mut` (no other strong handle, no weak one),
/// but checked with two loads and a fence instead of a compare-and-swap, which matters because
/// every write descends through one call per level.
fn cow(a: &mut Arc<Node>) -> &mut Node {
    // No `Weak<Node>` is ever created (this module and extent_map.rs never call
    // `Arc::downgrade` on a node), so `weak_count` is always 0; it is checked anyway so that a
    // future `Weak` cannot silently break the proof below.
    if Arc::strong_count(a) == 1 && Arc::weak_count(a) == 0 {
        // Pairs with the `Release` decrement of the thread that dropped the last other handle
        // (`Arc`'s drop), so that its reads of the node happen before our writes.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: `a` is borrowed mutably, so no one else uses this handle. The strong count
        // was 1 and no `Weak` exists, so no other handle to the allocation exists, and none can
        // appear while we hold the borrow: a new handle can only be made by cloning or
        // upgrading an existing one, and the only one is ours (this is exactly the condition
        // `Arc::get_mut` establishes; its compare-and-swap only guards against a concurrent
        // `Weak::upgrade`, impossible without a `Weak`). Readers reach a node only through a
        // handle held by a published version (a parent node or a version's root), so none can
        // be reading it: the node is exclusively ours for the lifetime of the borrow of `a`.
        // The pointer comes from `Arc::as_ptr`, valid for the allocation's lifetime, which
        // outlives the borrow of `a`.
        return unsafe { &mut *(Arc::as_ptr(a) as *mut Node) };
    }
    Arc::make_mut(a)
}

/// Index of the child of an inner node that may hold `key`.
fn child_idx(keys: &[u64], key: u64) -> usize {
    keys.partition_point(|s| *s <= key)
}

/// The slot with exactly this key.
pub(crate) fn get(t: &Link, key: u64) -> Option<&Slot> {
    let mut n = t.as_deref()?;
    loop {
        match n {
            Node::Inner { keys, children } => n = &children[child_idx(keys, key)],
            Node::Leaf(s) => {
                return s
                    .binary_search_by_key(&key, |x| x.em.start)
                    .ok()
                    .map(|i| &s[i])
            }
        }
    }
}

fn last_of(mut n: &Node) -> Option<&Slot> {
    loop {
        match n {
            Node::Inner { children, .. } => n = children.last()?,
            Node::Leaf(s) => return s.last(),
        }
    }
}

fn first_of(mut n: &Node) -> Option<&Slot> {
    loop {
        match n {
            Node::Inner { children, .. } => n = children.first()?,
            Node::Leaf(s) => return s.first(),
        }
    }
}

fn floor_in(n: &Node, key: u64) -> Option<&Slot> {
    match n {
        Node::Leaf(s) => {
            let i = s.partition_point(|x| x.em.start <= key);
            i.checked_sub(1).map(|i| &s[i])
        }
        Node::Inner { keys, children } => {
            let i = child_idx(keys, key);
            floor_in(&children[i], key).or_else(|| {
                // Stale separator: everything in children[i] is above key.
                children[..i].iter().rev().find_map(|c| last_of(c))
            })
        }
    }
}

fn next_in(n: &Node, key: u64) -> Option<&Slot> {
    match n {
        Node::Leaf(s) => s.get(s.partition_point(|x| x.em.start <= key)),
        Node::Inner { keys, children } => {
            let i = child_idx(keys, key);
            next_in(&children[i], key)
                .or_else(|| children[i + 1..].iter().find_map(|c| first_of(c)))
        }
    }
}

/// The slot with the greatest key `<= key`.
pub(crate) fn floor(t: &Link, key: u64) -> Option<&Slot> {
    floor_in(t.as_deref()?, key)
}

/// The slot with the smallest key `> key`.
pub(crate) fn next_after(t: &Link, key: u64) -> Option<&Slot> {
    next_in(t.as_deref()?, key)
}

/// The slot with the greatest key `< key`.
pub(crate) fn prev_before(t: &Link, key: u64) -> Option<&Slot> {
    floor(t, key.checked_sub(1)?)
}

/// The slot with the smallest key.
pub(crate) fn first(t: &Link) -> Option<&Slot> {
    first_of(t.as_deref()?)
}

/// Mutable access to the slot with exactly this key (copies the path if shared). The caller
/// must not change `slot.em.start`; replacing the whole slot by one with the same start is
/// fine.
pub(crate) fn get_mut(t: &mut Link, key: u64) -> Option<&mut Slot> {
    let mut n = cow(t.as_mut()?);
    loop {
        match n {
            Node::Inner { keys, children } => {
                let i = child_idx(keys, key);
                n = cow(&mut children[i]);
            }
            Node::Leaf(s) => {
                let i = s.binary_search_by_key(&key, |x| x.em.start).ok()?;
                return Some(&mut s[i]);
            }
        }
    }
}

/// Calls `f(item, slot)` for every item, with the slot whose key is `key(item)` (`None` if
/// there is none); `items` must be sorted by `key`. Paths are copied if shared, as by
/// [`get_mut`], but one descent serves all the items whose keys fall in one leaf. `f` must not
/// change `slot.em.start`.
pub(crate) fn for_each_mut_sorted<T>(
    t: &mut Link,
    items: &mut [T],
    key: impl Fn(&T) -> u64,
    mut f: impl FnMut(&mut T, Option<&mut Slot>),
) {
    let mut i = 0;
    while i < items.len() {
        let Some(root) = t.as_mut() else {
            items[i..].iter_mut().for_each(|x| f(x, None));
            return;
        };
        let first = key(&items[i]);
        let mut node = cow(root);
        let slots = loop {
            match node {
                Node::Inner { keys, children } => {
                    let c = child_idx(keys, first);
                    node = cow(&mut children[c]);
                }
                Node::Leaf(s) => break s,
            }
        };
        // Leaves partition the keys in order: every key from `first` up to this leaf's last
        // key belongs to this leaf. Items and slots are both sorted: one forward walk finds
        // them all (items mostly name consecutive slots).
        let last = slots.last().map(|x| x.em.start);
        let mut j = 0;
        loop {
            let k = key(&items[i]);
            while j < slots.len() && slots[j].em.start < k {
                j += 1;
            }
            let slot = match slots.get_mut(j) {
                Some(s) if s.em.start == k => Some(s),
                _ => None,
            };
            f(&mut items[i], slot);
            i += 1;
            if i == items.len() || last.is_none_or(|l| key(&items[i]) > l) {
                break;
            }
        }
    }
}

/// The leaf holding the slot with exactly this key, and the slot's index in it.
pub(crate) fn leaf(t: &Link, key: u64) -> Option<(&[Slot], usize)> {
    let mut n = t.as_deref()?;
    loop {
        match n {
            Node::Inner { keys, children } => n = &children[child_idx(keys, key)],
            Node::Leaf(s) => {
                let i = s.binary_search_by_key(&key, |x| x.em.start).ok()?;
                return Some((s, i));
            }
        }
    }
}

/// Mutable access to one leaf that keeps invariants 1-3: a slot may get a new value with the
/// same key, and any slot but the first may be removed (so the leaf stays non-empty and its
/// smallest key, which the separators above bound, does not change).
pub(crate) struct LeafMut<'a> {
    slots: &'a mut Vec<Slot>,
}

impl LeafMut<'_> {
    /// The leaf's slots.
    pub(crate) fn slots(&self) -> &[Slot] {
        self.slots
    }

    /// Replaces slot `i` by `slot`, which must have the same key; returns the old slot, or
    /// gives `slot` back if the keys differ or `i` is out of range.
    pub(crate) fn replace(&mut self, i: usize, slot: Slot) -> Result<Slot, Slot> {
        match self.slots.get_mut(i) {
            Some(old) if old.em.start == slot.em.start => Ok(std::mem::replace(old, slot)),
            _ => Err(slot),
        }
    }

    /// Sets the value of slot `i` if it has the same key; false otherwise.
    pub(crate) fn set_value(&mut self, i: usize, em: crate::ExtentMap) -> bool {
        match self.slots.get_mut(i) {
            Some(s) if s.em.start == em.start => {
                s.em = em;
                true
            }
            _ => false,
        }
    }

    /// Removes slot `i` unless it is the first one (or out of range).
    pub(crate) fn remove(&mut self, i: usize) -> Option<Slot> {
        (i > 0 && i < self.slots.len()).then(|| self.slots.remove(i))
    }

    /// Clears `bits` in the flags of slot `i` (if in range).
    pub(crate) fn clear_flags(&mut self, i: usize, bits: u32) {
        if let Some(s) = self.slots.get_mut(i) {
            s.em.flags &= !bits;
        }
    }

    /// Removes the slots in `r` (one shift of the slots after them) unless that would empty
    /// the leaf or the range goes past the end; false otherwise. (Removing the first slots
    /// raises the leaf's smallest key: the separators above stay lower bounds, invariant 1.)
    pub(crate) fn remove_range(&mut self, r: std::ops::Range<usize>) -> bool {
        if r.start > r.end || r.end > self.slots.len() || r.end - r.start == self.slots.len() {
            return false;
        }
        self.slots.drain(r);
        true
    }
}

/// The leaf holding the slot with exactly this key (its path copied if shared), and the slot's
/// index in it.
pub(crate) fn leaf_mut(t: &mut Link, key: u64) -> Option<(LeafMut<'_>, usize)> {
    let mut n = cow(t.as_mut()?);
    loop {
        match n {
            Node::Inner { keys, children } => {
                let i = child_idx(keys, key);
                n = cow(&mut children[i]);
            }
            Node::Leaf(s) => {
                let i = s.binary_search_by_key(&key, |x| x.em.start).ok()?;
                return Some((LeafMut { slots: s }, i));
            }
        }
    }
}

/// Child indices from the root to a leaf, one per inner level (a B+tree cursor without
/// borrows, so that it can outlive the tree lock; only valid while the tree's shape does not
/// change, and checked by its user against the key found at the end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Path {
    idx: [u8; PATH_MAX],
    len: u8,
}

/// Inner levels a [`Path`] records: more than any tree of 32-way nodes that fits in memory
/// has (16^12 maps); a deeper path is simply not recorded.
const PATH_MAX: usize = 12;

/// [`leaf_mut`], also recording the path to the leaf in `path` (`None` if too deep).
pub(crate) fn leaf_mut_path<'a>(
    t: &'a mut Link,
    key: u64,
    path: &mut Option<Path>,
) -> Option<(LeafMut<'a>, usize)> {
    let mut p = Path::default();
    let mut deep = false;
    let mut n = cow(t.as_mut()?);
    loop {
        match n {
            Node::Inner { keys, children } => {
                let i = child_idx(keys, key);
                match p.idx.get_mut(usize::from(p.len)) {
                    // MAX children fit in a u8.
                    Some(d) => {
                        *d = i as u8;
                        p.len += 1;
                    }
                    None => deep = true,
                }
                n = cow(&mut children[i]);
            }
            Node::Leaf(s) => {
                let i = s.binary_search_by_key(&key, |x| x.em.start).ok()?;
                *path = (!deep).then_some(p);
                return Some((LeafMut { slots: s }, i));
            }
        }
    }
}

/// The leaf at the end of `path` (its path copied if shared), if following it from the root
/// reaches a leaf; `None` if the tree's shape no longer has that path.
pub(crate) fn leaf_mut_at<'a>(t: &'a mut Link, path: &Path) -> Option<LeafMut<'a>> {
    let mut n = cow(t.as_mut()?);
    for &i in &path.idx[..usize::from(path.len)] {
        match n {
            Node::Inner { children, .. } => n = cow(children.get_mut(usize::from(i))?),
            Node::Leaf(_) => return None,
        }
    }
    match n {
        Node::Leaf(s) => Some(LeafMut { slots: s }),
        Node::Inner { .. } => None,
    }
}

/// The leaf at the end of `path`, read-only (nothing is copied).
pub(crate) fn leaf_at<'a>(t: &'a Link, path: &Path) -> Option<&'a [Slot]> {
    let mut n = t.as_deref()?;
    for &i in &path.idx[..usize::from(path.len)] {
        match n {
            Node::Inner { children, .. } => n = children.get(usize::from(i))?,
            Node::Leaf(_) => return None,
        }
    }
    match n {
        Node::Leaf(s) => Some(s),
        Node::Inner { .. } => None,
    }
}

/// The path to the leaf holding the slot with exactly this key, and the slot's index, found
/// read-only; `None` if there is no such slot or the tree is deeper than a [`Path`] records.
pub(crate) fn leaf_path(t: &Link, key: u64) -> Option<(Path, usize)> {
    let mut p = Path::default();
    let mut n = t.as_deref()?;
    loop {
        match n {
            Node::Inner { keys, children } => {
                let i = child_idx(keys, key);
                *p.idx.get_mut(usize::from(p.len))? = i as u8;
                p.len += 1;
                n = &children[i];
            }
            Node::Leaf(s) => {
                let i = s.binary_search_by_key(&key, |x| x.em.start).ok()?;
                return Some((p, i));
            }
        }
    }
}

/// [`for_each_mut_sorted`] read-only: `f(item, slot)` for every item, with the slot whose key
/// is `key(item)`; one descent per leaf, nothing copied.
pub(crate) fn for_each_sorted<T>(
    t: &Link,
    items: &mut [T],
    key: impl Fn(&T) -> u64,
    mut f: impl FnMut(&mut T, Option<&Slot>),
) {
    let mut i = 0;
    while i < items.len() {
        let Some(mut node) = t.as_deref() else {
            items[i..].iter_mut().for_each(|x| f(x, None));
            return;
        };
        let first = key(&items[i]);
        let slots = loop {
            match node {
                Node::Inner { keys, children } => node = &children[child_idx(keys, first)],
                Node::Leaf(s) => break s,
            }
        };
        let last = slots.last().map(|x| x.em.start);
        let mut j = 0;
        loop {
            let k = key(&items[i]);
            while j < slots.len() && slots[j].em.start < k {
                j += 1;
            }
            f(&mut items[i], slots.get(j).filter(|s| s.em.start == k));
            i += 1;
            if i == items.len() || last.is_none_or(|l| key(&items[i]) > l) {
                break;
            }
        }
    }
}

/// Removes the whole leaf holding `key` (its slots with it) without copying it: the path above
/// it is copied if shared, the leaf is dropped from its parent with the separator before it
/// (or after it, for a first child), inner nodes left empty go too, and a one-child root is
/// collapsed. Unlike [`remove`], no neighbour is merged. False if the tree is empty.
pub(crate) fn remove_leaf(t: &mut Link, key: u64) -> bool {
    /// True if `n` is left without children.
    fn rec(n: &mut Node, key: u64) -> bool {
        let Node::Inner { keys, children } = n else {
            return true;
        };
        let i = child_idx(keys, key);
        let gone = match &*children[i] {
            Node::Leaf(_) => true,
            Node::Inner { .. } => rec(cow(&mut children[i]), key),
        };
        if gone {
            children.remove(i);
            if !keys.is_empty() {
                keys.remove(i.saturating_sub(1).min(keys.len() - 1));
            }
        }
        children.is_empty()
    }
    let Some(root) = t.as_mut() else {
        return false;
    };
    if matches!(&**root, Node::Leaf(_)) {
        *t = None;
        return true;
    }
    if rec(cow(root), key) {
        *t = None;
    }
    collapse_root(t);
    true
}

/// Inserts into `n`; returns the right half and its first key if `n` split.
fn insert_in(n: &mut Node, slot: Slot) -> Option<(u64, Arc<Node>)> {
    match n {
        Node::Leaf(s) => {
            let i = s.partition_point(|x| x.em.start < slot.em.start);
            s.insert(i, slot);
            if s.len() > MAX {
                let right = s.split_off(s.len() / 2);
                let sep = right[0].em.start;
                return Some((sep, Arc::new(Node::Leaf(right))));
            }
            None
        }
        Node::Inner { keys, children } => {
            let i = child_idx(keys, slot.em.start);
            let (sep, right) = insert_in(cow(&mut children[i]), slot)?;
            keys.insert(i, sep);
            children.insert(i + 1, right);
            if children.len() > MAX {
                let mid = children.len() / 2;
                let rchildren = children.split_off(mid);
                // keys: [.. mid-1 ..] stay, keys[mid-1] moves up, the rest go right.
                let mut rkeys = keys.split_off(mid - 1);
                let up = rkeys.remove(0);
                return Some((
                    up,
                    Arc::new(Node::Inner {
                        keys: rkeys,
                        children: rchildren,
                    }),
                ));
            }
            None
        }
    }
}

/// Inserts `slot`; its key must not be present (the caller checked for overlap).
pub(crate) fn insert(t: &mut Link, slot: Slot) {
    let Some(root) = t.as_mut() else {
        *t = Some(Arc::new(Node::Leaf(vec![slot])));
        return;
    };
    if let Some((sep, right)) = insert_in(cow(root), slot) {
        if let Some(left) = t.take() {
            *t = Some(Arc::new(Node::Inner {
                keys: vec![sep],
                children: vec![left, right],
            }));
        }
    }
}

/// After a removal from `children[i]`: drops it if it got empty; merges it with a neighbour if
/// it got small, or with its left neighbour if that one is small, when both fit in one node.
/// (The second case keeps a run of removals at the start of a node, as fsync's merges of
/// consecutive maps into the map before them do, from leaving a near-empty node on the left
/// whose last map every following merge must reach across a node boundary.)
fn fix_child(keys: &mut Vec<u64>, children: &mut Vec<Arc<Node>>, i: usize) {
    let len = children[i].len();
    if len == 0 {
        children.remove(i);
        if !keys.is_empty() {
            keys.remove(i.saturating_sub(1).min(keys.len() - 1));
        }
        return;
    }
    if children.len() < 2 {
        return;
    }
    let l = if len < MIN {
        if i + 1 < children.len() {
            i
        } else {
            i - 1
        }
    } else if i > 0 && children[i - 1].len() < MIN {
        i - 1
    } else {
        return;
    };
    if children[l].len() + children[l + 1].len() > MAX {
        return;
    }
    let right = children.remove(l + 1);
    let sep = keys.remove(l);
    let right = Arc::try_unwrap(right).unwrap_or_else(|shared| (*shared).clone());
    match (cow(&mut children[l]), right) {
        (Node::Leaf(a), Node::Leaf(b)) => a.extend(b),
        (
            Node::Inner {
                keys: ak,
                children: ac,
            },
            Node::Inner {
                keys: bk,
                children: bc,
            },
        ) => {
            ak.push(sep);
            ak.extend(bk);
            ac.extend(bc);
        }
        // Siblings are always at the same depth (invariant 3).
        _ => debug_assert!(false, "siblings of different kinds"),
    }
}

fn remove_in(n: &mut Node, key: u64) -> Option<Slot> {
    match n {
        Node::Leaf(s) => {
            let i = s.binary_search_by_key(&key, |x| x.em.start).ok()?;
            Some(s.remove(i))
        }
        Node::Inner { keys, children } => {
            let i = child_idx(keys, key);
            let r = remove_in(cow(&mut children[i]), key)?;
            fix_child(keys, children, i);
            Some(r)
        }
    }
}

/// Removes the slot with exactly this key and returns it.
pub(crate) fn remove(t: &mut Link, key: u64) -> Option<Slot> {
    // Only copy the path when the key is there.
    get(t, key)?;
    let root = cow(t.as_mut()?);
    let r = remove_in(root, key);
    collapse_root(t);
    r
}

/// Collapses a one-child inner root; an empty root becomes the empty tree.
fn collapse_root(t: &mut Link) {
    loop {
        let next = match t.as_deref() {
            Some(Node::Inner { children, .. }) if children.len() == 1 => children[0].clone(),
            Some(n) if n.len() == 0 => {
                *t = None;
                break;
            }
            _ => break,
        };
        *t = Some(next);
    }
}

/// A leaf of `len` slots left by [`LeafMut::remove`] should go through [`rebalance`].
pub(crate) fn leaf_is_small(len: usize) -> bool {
    len < MIN
}

/// After [`LeafMut::remove`] made the leaf holding `key` small: gives every node on its path
/// the treatment a removal through [`remove`] gives it (`fix_child`: merge with a neighbour
/// when both fit in one node). Without it, a run of in-leaf merges into a map (fsync's merges
/// into the map before the logged one) leaves that map alone in its leaf, and the merge of
/// every following map crosses a leaf boundary.
pub(crate) fn rebalance(t: &mut Link, key: u64) {
    fn rec(n: &mut Node, key: u64) {
        if let Node::Inner { keys, children } = n {
            let i = child_idx(keys, key);
            rec(cow(&mut children[i]), key);
            fix_child(keys, children, i);
        }
    }
    let Some(root) = t.as_mut() else {
        return;
    };
    rec(cow(root), key);
    collapse_root(t);
}

/// An inner node on an iterator's path: separators, children, index of the visited child.
type PathEntry<'a> = (&'a [u64], &'a [Arc<Node>], usize);

/// In-order iterator over the slots with key `>= from`.
pub(crate) struct Iter<'a> {
    /// Inner nodes on the path and the index of the child being visited.
    stack: Vec<PathEntry<'a>>,
    leaf: &'a [Slot],
    pos: usize,
}

impl<'a> Iter<'a> {
    pub(crate) fn new(t: &'a Link, from: u64) -> Self {
        let mut it = Iter {
            stack: Vec::new(),
            leaf: &[],
            pos: 0,
        };
        let mut n = match t.as_deref() {
            Some(n) => n,
            None => return it,
        };
        loop {
            match n {
                Node::Inner { keys, children } => {
                    let i = child_idx(keys, from);
                    it.stack.push((keys, children, i));
                    n = &children[i];
                }
                Node::Leaf(s) => {
                    it.leaf = s;
                    it.pos = s.partition_point(|x| x.em.start < from);
                    return it;
                }
            }
        }
    }

    /// Moves to the first leaf after the current one.
    fn next_leaf(&mut self) -> bool {
        while let Some((keys, children, i)) = self.stack.pop() {
            if i + 1 < children.len() {
                self.stack.push((keys, children, i + 1));
                let mut n: &Node = &children[i + 1];
                loop {
                    match n {
                        Node::Inner { keys, children } => {
                            self.stack.push((keys, children, 0));
                            n = &children[0];
                        }
                        Node::Leaf(s) => {
                            self.leaf = s;
                            self.pos = 0;
                            return true;
                        }
                    }
                }
            }
        }
        false
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Slot;

    fn next(&mut self) -> Option<&'a Slot> {
        loop {
            if let Some(s) = self.leaf.get(self.pos) {
                self.pos += 1;
                return Some(s);
            }
            if !self.next_leaf() {
                return None;
            }
        }
    }
}

/// Depth of the tree (tests).
#[cfg(test)]
pub(crate) fn depth(t: &Link) -> usize {
    let mut d = 0;
    let mut n = t.as_deref();
    while let Some(x) = n {
        d += 1;
        n = match x {
            Node::Inner { children, .. } => children.first().map(|c| &**c),
            Node::Leaf(_) => None,
        };
    }
    d
}

/// Checks invariants 1-3 (tests).
#[cfg(test)]
pub(crate) fn check(t: &Link) -> bool {
    fn rec(
        n: &Node,
        lo: Option<u64>,
        hi: Option<u64>,
        root: bool,
        depth: usize,
        leaf_depth: &mut Option<usize>,
    ) -> bool {
        let in_range = |k: u64| lo.is_none_or(|l| k >= l) && hi.is_none_or(|h| k < h);
        match n {
            Node::Leaf(s) => {
                let d = *leaf_depth.get_or_insert(depth);
                d == depth
                    && (root || !s.is_empty())
                    && s.len() <= MAX
                    && s.windows(2).all(|w| w[0].em.start < w[1].em.start)
                    && s.iter().all(|x| in_range(x.em.start))
            }
            Node::Inner { keys, children } => {
                children.len() == keys.len() + 1
                    && children.len() <= MAX
                    && (!root || children.len() >= 2)
                    && keys.windows(2).all(|w| w[0] < w[1])
                    && children.iter().enumerate().all(|(i, c)| {
                        let clo = if i == 0 { lo } else { Some(keys[i - 1]) };
                        let chi = if i == keys.len() { hi } else { Some(keys[i]) };
                        rec(c, clo, chi, false, depth + 1, leaf_depth)
                    })
            }
        }
    }
    match t.as_deref() {
        None => true,
        Some(n) => rec(n, None, None, true, 0, &mut None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExtentMap;

    fn slot(key: u64) -> Slot {
        Slot {
            em: ExtentMap::regular(key, 1, key, 1),
            id: key as u32,
        }
    }

    fn keys(t: &Link) -> Vec<u64> {
        Iter::new(t, 0).map(|s| s.em.start).collect()
    }

    #[test]
    fn persistent_btree_ops() {
        // Test scenario: 20000 inserts in pseudo-random order, removal of two thirds of the
        // keys, the neighbour searches, iteration, and an old version left untouched by later
        // changes.
        let mut x = 12345u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut t: Link = None;
        let mut want = std::collections::BTreeSet::new();
        for _ in 0..20_000 {
            let k = rnd() % 1_000_000 * 2;
            if want.insert(k) {
                insert(&mut t, slot(k));
            }
        }
        assert!(check(&t));
        assert!(depth(&t) <= 6, "depth {}", depth(&t));
        let old = t.clone();
        let old_keys = keys(&old);
        assert_eq!(old_keys, want.iter().copied().collect::<Vec<_>>());
        let all: Vec<u64> = want.iter().copied().collect();
        for (i, k) in all.iter().enumerate() {
            if i % 3 != 0 {
                assert!(remove(&mut t, *k).is_some());
                want.remove(k);
                if i % 997 == 0 {
                    assert!(check(&t));
                }
            }
        }
        assert!(check(&t));
        assert_eq!(keys(&t), want.iter().copied().collect::<Vec<_>>());
        assert_eq!(keys(&old), old_keys, "old version unchanged");
        for probe in [
            0u64,
            1,
            777,
            150_001,
            1_999_998,
            2_500_000,
            all[5],
            all[5] + 1,
        ] {
            assert_eq!(
                floor(&t, probe).map(|s| s.em.start),
                want.range(..=probe).next_back().copied()
            );
            assert_eq!(
                next_after(&t, probe).map(|s| s.em.start),
                want.range(probe + 1..).next().copied()
            );
            assert_eq!(
                prev_before(&t, probe).map(|s| s.em.start),
                want.range(..probe).next_back().copied()
            );
            assert_eq!(
                Iter::new(&t, probe).next().map(|s| s.em.start),
                want.range(probe..).next().copied()
            );
            assert_eq!(Iter::new(&t, probe).count(), want.range(probe..).count());
        }
        assert_eq!(first(&t).map(|s| s.em.start), want.first().copied());
        let k = *want.iter().nth(10).unwrap();
        get_mut(&mut t, k).unwrap().em.generation = 99;
        assert_eq!(get(&t, k).unwrap().em.generation, 99);
        assert_eq!(get(&old, k).unwrap().em.generation, 1);
        assert!(remove(&mut t, 1).is_none());
        // Remove everything: back to the empty tree.
        for k in want.iter() {
            assert!(remove(&mut t, *k).is_some());
        }
        assert!(t.is_none());
        assert!(check(&old));
    }

    #[test]
    fn for_each_mut_sorted_finds_every_key() {
        // Test scenario: a sorted list of present keys, absent keys (between leaves, below and
        // above every key) and duplicates: each gets the slot with its key or `None`, changes
        // land in the working version only, and the tree stays valid.
        let mut t: Link = None;
        for k in 0..500u64 {
            insert(&mut t, slot(k * 4));
        }
        let old = t.clone();
        let mut items: Vec<(u64, Option<u64>)> = (0..2100u64)
            .filter(|k| k % 3 != 0)
            .map(|k| (k, None))
            .collect();
        items.push((7 * 4, None));
        items.sort_by_key(|x| x.0);
        for_each_mut_sorted(
            &mut t,
            &mut items,
            |x| x.0,
            |x, s| {
                x.1 = s.map(|s| {
                    s.em.generation += 1;
                    s.em.start
                });
            },
        );
        for (k, found) in &items {
            let want = (k % 4 == 0 && *k < 2000).then_some(*k);
            assert_eq!(*found, want, "key {k}");
        }
        assert!(check(&t));
        // Key 28 was listed twice: updated twice.
        assert_eq!(get(&t, 28).unwrap().em.generation, 3);
        assert_eq!(get(&t, 8).unwrap().em.generation, 2);
        assert_eq!(
            get(&t, 12).unwrap().em.generation,
            1,
            "12 is a multiple of 3"
        );
        assert!(Iter::new(&old, 0).all(|s| s.em.generation == 1));
        let mut none: Link = None;
        let mut one = [(5u64, Some(5u64))];
        for_each_mut_sorted(
            &mut none,
            &mut one,
            |x| x.0,
            |x, s| x.1 = s.map(|s| s.em.start),
        );
        assert_eq!(one[0].1, None);
    }

    #[test]
    fn in_leaf_removals_with_rebalance() {
        // Test scenario: fsync's merges: the map at key 0 absorbs its successors one by one
        // through in-leaf removals (never the leaf's first slot); `rebalance` keeps its leaf
        // from running empty of successors, so every successor but the tree's last ones is
        // found in the same leaf as key 0, and the tree stays valid with the same keys as a
        // model.
        let mut t: Link = None;
        let n = 300u64;
        for k in 0..n {
            insert(&mut t, slot(k));
        }
        let mut want: Vec<u64> = (0..n).collect();
        let mut rebalanced = 0;
        while want.len() > 1 {
            let (mut leaf, i) = leaf_mut(&mut t, 0).unwrap();
            assert_eq!(i, 0);
            let len = leaf.slots().len();
            if want.len() > MAX {
                assert!(
                    len > 1,
                    "key 0 alone in its leaf with {} keys left",
                    want.len()
                );
            }
            if len == 1 {
                // The last successors are in the next leaf: a plain removal.
                assert!(remove(&mut t, want[1]).is_some());
            } else {
                assert_eq!(leaf.remove(1).map(|s| s.em.start), Some(want[1]));
                if leaf_is_small(leaf.slots().len()) {
                    rebalance(&mut t, 0);
                    rebalanced += 1;
                }
            }
            want.remove(1);
            assert!(check(&t));
            assert_eq!(keys(&t), want);
        }
        assert!(rebalanced > 0);
        assert_eq!(depth(&t), 1);
    }

    #[test]
    fn whole_leaves_removed_and_read_only_paths() {
        // Test scenario: the logging pass's tools on a three-level tree: a read-only path to a
        // key's leaf leads to the slot the key names (`leaf_path`, `leaf_at`); the read-only
        // sorted walk finds exactly the keys present; whole leaves are removed in scattered
        // order (`remove_leaf`), emptying inner nodes and finally the tree, leaving a valid
        // tree with every other key and the version taken before untouched.
        let mut t: Link = None;
        let n = 20_000u64;
        for k in 0..n {
            insert(&mut t, slot(k * 2));
        }
        assert!(depth(&t) >= 3);
        let old = t.clone();
        for k in (0..n).step_by(97) {
            let (p, i) = leaf_path(&t, k * 2).expect("present");
            assert_eq!(leaf_at(&t, &p).expect("a leaf")[i].em.start, k * 2);
            assert!(leaf_path(&t, k * 2 + 1).is_none());
        }
        let mut items: Vec<(u64, bool)> = (0..3 * n).step_by(3).map(|k| (k, false)).collect();
        for_each_sorted(
            &t,
            &mut items,
            |x| x.0,
            |x, s| x.1 = s.is_some_and(|s| s.em.start == x.0),
        );
        assert!(items
            .iter()
            .all(|&(k, found)| found == (k % 2 == 0 && k < 2 * n)));
        let mut want: Vec<u64> = (0..n).map(|k| k * 2).collect();
        let mut x = 7u64;
        while let Some(&k) = want.get((x as usize) % want.len().max(1)) {
            let (p, _) = leaf_path(&t, k).expect("present");
            let gone: Vec<u64> = leaf_at(&t, &p)
                .unwrap()
                .iter()
                .map(|s| s.em.start)
                .collect();
            assert!(remove_leaf(&mut t, k));
            want.retain(|w| !gone.contains(w));
            assert!(check(&t));
            assert_eq!(keys(&t), want);
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                >> 11;
        }
        assert!(t.is_none());
        assert!(!remove_leaf(&mut t, 0));
        assert_eq!(keys(&old), (0..n).map(|k| k * 2).collect::<Vec<_>>());
    }

    #[test]
    fn sequential_inserts_and_removals() {
        // Test scenario: ascending inserts (append-heavy, as reads of a file build maps), then
        // removal from the front (as the shrinker does): the tree stays valid at every step.
        let mut t: Link = None;
        for k in 0..2000u64 {
            insert(&mut t, slot(k * 4096));
        }
        assert!(check(&t));
        for k in 0..2000u64 {
            assert_eq!(first(&t).map(|s| s.em.start), Some(k * 4096));
            assert!(remove(&mut t, k * 4096).is_some());
            if k % 101 == 0 {
                assert!(check(&t));
            }
        }
        assert!(t.is_none());
    }
}
