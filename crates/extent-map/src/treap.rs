//! A persistent (copy-on-write) treap keyed by a map's `start`: the ordered index of one
//! extent-map tree version.
//!
//! Nodes are shared between versions through `Arc`. A writer works on its own root and changes
//! it with `Arc::make_mut`, which copies a node only while an older version (one that readers
//! may hold) still shares it; once copied, the node belongs to the writer's working version and
//! later changes in the same version are done in place. Readers only ever see a version that was
//! complete when it was published (see `extent_map.rs`), so they need neither locks nor
//! reference counts: they borrow the version for the duration of an epoch guard.
//!
//! Heap order uses a priority derived from the key (a splitmix64 hash of `start`), so the shape
//! of a tree is a function of its key set only (deterministic across runs), and a slot can be
//! replaced in place by another map with the same start (merges, head pieces) without
//! restructuring. Expected depth is O(log n); every recursion here is bounded by the depth.

use std::sync::Arc;

use crate::extent_map::Slot;

/// A link to a subtree.
pub(crate) type Link = Option<Arc<TNode>>;

/// One treap node: the map's value and identity, and two children.
#[derive(Clone)]
pub(crate) struct TNode {
    pub(crate) slot: Slot,
    left: Link,
    right: Link,
}

impl TNode {
    fn key(&self) -> u64 {
        self.slot.em.start
    }
    fn prio(&self) -> u32 {
        prio(self.key())
    }
}

/// Treap priority of a key.
fn prio(key: u64) -> u32 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// The slot with exactly this key.
pub(crate) fn get(mut t: &Link, key: u64) -> Option<&Slot> {
    while let Some(n) = t {
        if key < n.key() {
            t = &n.left;
        } else if key > n.key() {
            t = &n.right;
        } else {
            return Some(&n.slot);
        }
    }
    None
}

/// The slot with the greatest key `<= key`.
pub(crate) fn floor(mut t: &Link, key: u64) -> Option<&Slot> {
    let mut best = None;
    while let Some(n) = t {
        if n.key() <= key {
            best = Some(&n.slot);
            t = &n.right;
        } else {
            t = &n.left;
        }
    }
    best
}

/// The slot with the smallest key `> key`.
pub(crate) fn next_after(mut t: &Link, key: u64) -> Option<&Slot> {
    let mut best = None;
    while let Some(n) = t {
        if n.key() > key {
            best = Some(&n.slot);
            t = &n.left;
        } else {
            t = &n.right;
        }
    }
    best
}

/// The slot with the greatest key `< key`.
pub(crate) fn prev_before(mut t: &Link, key: u64) -> Option<&Slot> {
    let mut best = None;
    while let Some(n) = t {
        if n.key() < key {
            best = Some(&n.slot);
            t = &n.right;
        } else {
            t = &n.left;
        }
    }
    best
}

/// The slot with the smallest key.
pub(crate) fn first(mut t: &Link) -> Option<&Slot> {
    let mut best = None;
    while let Some(n) = t {
        best = Some(&n.slot);
        t = &n.left;
    }
    best
}

/// Mutable access to the slot with exactly this key (copies the path if shared). The caller
/// must not change `slot.em.start` (that would break the search and heap order); replacing the
/// whole slot by one with the same start is fine.
pub(crate) fn get_mut(mut t: &mut Link, key: u64) -> Option<&mut Slot> {
    loop {
        let n = Arc::make_mut(t.as_mut()?);
        if key < n.key() {
            t = &mut n.left;
        } else if key > n.key() {
            t = &mut n.right;
        } else {
            return Some(&mut n.slot);
        }
    }
}

/// Splits `t` into keys `< key` and keys `>= key`.
fn split(t: Link, key: u64) -> (Link, Link) {
    match t {
        None => (None, None),
        Some(mut a) => {
            let n = Arc::make_mut(&mut a);
            if n.key() < key {
                let (l, r) = split(n.right.take(), key);
                n.right = l;
                (Some(a), r)
            } else {
                let (l, r) = split(n.left.take(), key);
                n.left = r;
                (l, Some(a))
            }
        }
    }
}

/// Joins two treaps where every key of `l` is below every key of `r`.
fn join(l: Link, r: Link) -> Link {
    match (l, r) {
        (None, r) => r,
        (l, None) => l,
        (Some(mut a), Some(mut b)) => {
            if a.prio() > b.prio() {
                let n = Arc::make_mut(&mut a);
                n.right = join(n.right.take(), Some(b));
                Some(a)
            } else {
                let n = Arc::make_mut(&mut b);
                n.left = join(Some(a), n.left.take());
                Some(b)
            }
        }
    }
}

/// Inserts `slot`; its key must not be present (the caller checked for overlap).
pub(crate) fn insert(t: &mut Link, slot: Slot) {
    match t {
        Some(a) if a.prio() >= prio(slot.em.start) => {
            let n = Arc::make_mut(a);
            if slot.em.start < n.key() {
                insert(&mut n.left, slot);
            } else {
                insert(&mut n.right, slot);
            }
        }
        _ => {
            let (left, right) = split(t.take(), slot.em.start);
            *t = Some(Arc::new(TNode { slot, left, right }));
        }
    }
}

/// Removes the slot with exactly this key and returns it.
pub(crate) fn remove(t: &mut Link, key: u64) -> Option<Slot> {
    let n = t.as_ref()?;
    if key == n.key() {
        let taken = t.take()?;
        let (slot, left, right) = match Arc::try_unwrap(taken) {
            Ok(n) => (n.slot, n.left, n.right),
            Err(shared) => (
                shared.slot.clone(),
                shared.left.clone(),
                shared.right.clone(),
            ),
        };
        *t = join(left, right);
        return Some(slot);
    }
    // Only descend (and copy) when the key can be below.
    let n = Arc::make_mut(t.as_mut()?);
    if key < n.key() {
        remove(&mut n.left, key)
    } else {
        remove(&mut n.right, key)
    }
}

/// In-order iterator over the slots with key `>= from`.
pub(crate) struct Iter<'a> {
    stack: Vec<&'a TNode>,
}

impl<'a> Iter<'a> {
    pub(crate) fn new(t: &'a Link, from: u64) -> Self {
        let mut stack = Vec::new();
        let mut cur = t;
        while let Some(n) = cur {
            if n.key() >= from {
                stack.push(&**n);
                cur = &n.left;
            } else {
                cur = &n.right;
            }
        }
        Iter { stack }
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Slot;

    fn next(&mut self) -> Option<&'a Slot> {
        let n = self.stack.pop()?;
        let mut cur = &n.right;
        while let Some(c) = cur {
            self.stack.push(&**c);
            cur = &c.left;
        }
        Some(&n.slot)
    }
}

/// Depth of the treap (tests and debug checks).
#[cfg(test)]
pub(crate) fn depth(t: &Link) -> usize {
    match t {
        None => 0,
        Some(n) => 1 + depth(&n.left).max(depth(&n.right)),
    }
}

/// Checks search order and heap order (tests and debug checks).
#[cfg(test)]
pub(crate) fn check(t: &Link) -> bool {
    fn rec(t: &Link, lo: Option<u64>, hi: Option<u64>, max_prio: u32) -> bool {
        match t {
            None => true,
            Some(n) => {
                lo.is_none_or(|l| n.key() > l)
                    && hi.is_none_or(|h| n.key() < h)
                    && n.prio() <= max_prio
                    && rec(&n.left, lo, Some(n.key()), n.prio())
                    && rec(&n.right, Some(n.key()), hi, n.prio())
            }
        }
    }
    rec(t, None, None, u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent_map::EmNode;
    use crate::ExtentMap;

    fn slot(key: u64) -> Slot {
        Slot {
            em: ExtentMap::regular(key, 1, key, 1),
            node: EmNode::new(),
        }
    }

    fn keys(t: &Link) -> Vec<u64> {
        Iter::new(t, 0).map(|s| s.em.start).collect()
    }

    #[test]
    fn persistent_treap_ops() {
        // Test scenario: 5000 inserts in pseudo-random order, removal of every third key, the
        // neighbour searches, and an old version left untouched by later changes.
        let mut x = 12345u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut t: Link = None;
        let mut want = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let k = rnd() % 100_000 * 2;
            if want.insert(k) {
                insert(&mut t, slot(k));
            }
        }
        assert!(check(&t));
        assert!(depth(&t) < 64, "depth {}", depth(&t));
        let old = t.clone();
        let old_keys = keys(&old);
        let all: Vec<u64> = want.iter().copied().collect();
        for k in all.iter().step_by(3) {
            assert!(remove(&mut t, *k).is_some());
            want.remove(k);
        }
        assert!(check(&t));
        assert_eq!(keys(&t), want.iter().copied().collect::<Vec<_>>());
        assert_eq!(keys(&old), old_keys, "old version unchanged");
        for probe in [0u64, 1, 777, 150_001, 199_998, 250_000] {
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
        }
        assert_eq!(first(&t).map(|s| s.em.start), want.first().copied());
        let k = *want.iter().nth(10).unwrap();
        get_mut(&mut t, k).unwrap().em.generation = 99;
        assert_eq!(get(&t, k).unwrap().em.generation, 99);
        assert_eq!(get(&old, k).unwrap().em.generation, 1);
        assert!(remove(&mut t, 1).is_none());
    }
}
