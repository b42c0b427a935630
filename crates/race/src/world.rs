//! The part of the filesystem the actors need besides the extent maps, reduced to what decides
//! who touches which map when: per-inode size, dirty and writeback ranges (the page cache),
//! the subvolume tree's file extent items (what `btrfs_get_extent` reads and relocation's leaf
//! boundaries come from), ordered extents and the io_tree's EXTENT_LOCKED ranges.
//!
//! # Invariants
//! - File extent items of one inode never overlap (no-holes: a gap is a hole).
//! - Dirty ranges and writeback ranges of one inode never overlap each other or themselves.
//! - An ordered extent goes Running -> IoDone -> Complete, never back.
//! - Locked io ranges of one inode never overlap (the lock is taken only when free).
//!
//! The world is only touched by the running actor (one at a time) and by the scheduler between
//! steps; the mutex around it is never contended and never held across a scheduling point.

use std::collections::BTreeMap;

use ubtrfs_extent_map::{flags, ExtentMap};

/// Page and sector size of the modelled filesystem.
pub const PAGE: u64 = 4096;

/// Generation of the transaction that is running while the actors run (`fs_info->generation`).
pub const TRANSID: u64 = 10;
/// Generation of everything committed before the scenario starts.
pub const OLD_GEN: u64 = 5;
/// Generation of a map created by `btrfs_create_io_em` until its ordered extent completes.
pub const PINNED_GEN: u64 = u64::MAX;

/// Kind of a file extent item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// BTRFS_FILE_EXTENT_REG.
    Reg,
    /// BTRFS_FILE_EXTENT_PREALLOC.
    Prealloc,
}

/// A file extent item of the subvolume tree (only what maps need).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileExtentItem {
    /// Key offset.
    pub start: u64,
    /// num_bytes.
    pub len: u64,
    /// disk_bytenr of the whole on-disk extent.
    pub disk_bytenr: u64,
    /// disk_num_bytes.
    pub disk_num_bytes: u64,
    /// offset into the on-disk extent.
    pub offset: u64,
    /// REG or PREALLOC.
    pub kind: ItemKind,
    /// Transaction that wrote the item.
    pub generation: u64,
}

impl FileExtentItem {
    /// Exclusive end.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// `btrfs_extent_item_to_extent_map`.
    pub fn to_map(&self) -> ExtentMap {
        ExtentMap {
            start: self.start,
            len: self.len,
            disk_bytenr: self.disk_bytenr,
            disk_num_bytes: self.disk_num_bytes,
            offset: self.offset,
            ram_bytes: self.disk_num_bytes,
            generation: self.generation,
            flags: if self.kind == ItemKind::Prealloc {
                flags::PREALLOC
            } else {
                0
            },
        }
    }

    /// The part `[s, e)` of this item (same on-disk extent, offset advanced).
    pub fn slice(&self, s: u64, e: u64) -> Self {
        debug_assert!(s >= self.start && e <= self.end() && s < e);
        FileExtentItem {
            start: s,
            len: e - s,
            offset: self.offset + (s - self.start),
            ..*self
        }
    }
}

/// The file extent items of one inode, keyed by start.
#[derive(Clone, Debug, Default)]
pub struct Items(pub BTreeMap<u64, FileExtentItem>);

impl Items {
    /// The item containing `pos`.
    pub fn covering(&self, pos: u64) -> Option<FileExtentItem> {
        self.0
            .range(..=pos)
            .next_back()
            .map(|(_, i)| *i)
            .filter(|i| i.end() > pos)
    }

    /// Start of the first item starting after `pos`.
    pub fn next_start_after(&self, pos: u64) -> Option<u64> {
        self.0.range(pos + 1..).next().map(|(s, _)| *s)
    }

    /// `btrfs_drop_extents` on the items: removes `[s, e)`, trimming items that stick out.
    pub fn punch(&mut self, s: u64, e: u64) {
        let hit: Vec<FileExtentItem> = self
            .0
            .values()
            .filter(|i| i.start < e && i.end() > s)
            .copied()
            .collect();
        for i in hit {
            self.0.remove(&i.start);
            if i.start < s {
                let head = i.slice(i.start, s);
                self.0.insert(head.start, head);
            }
            if i.end() > e {
                let tail = i.slice(e, i.end());
                self.0.insert(tail.start, tail);
            }
        }
    }

    /// Inserts `item`, replacing whatever it overlaps.
    pub fn insert(&mut self, item: FileExtentItem) {
        self.punch(item.start, item.end());
        self.0.insert(item.start, item);
    }

    /// `btrfs_mark_extent_written`: the PREALLOC items inside `[s, e)` become REG.
    pub fn mark_written(&mut self, s: u64, e: u64, gen: u64) {
        let hit: Vec<FileExtentItem> = self
            .0
            .values()
            .filter(|i| i.start < e && i.end() > s && i.kind == ItemKind::Prealloc)
            .copied()
            .collect();
        for i in hit {
            let (a, b) = (i.start.max(s), i.end().min(e));
            let mut w = i.slice(a, b);
            w.kind = ItemKind::Reg;
            w.generation = gen;
            self.insert(w);
        }
    }

    /// Items in file order.
    pub fn all(&self) -> Vec<FileExtentItem> {
        self.0.values().copied().collect()
    }
}

/// Kind of an ordered extent (`BTRFS_ORDERED_*` type bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OeKind {
    /// COW into a new extent: created with a PINNED map.
    Cow,
    /// NOCOW into a preallocated extent: created with a PINNED map.
    Prealloc,
    /// NOCOW overwrite of a regular extent: no map.
    Nocow,
}

/// Where an ordered extent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OeState {
    /// IO submitted, not finished.
    Running,
    /// IO finished (`btrfs_finish_ordered_extent`), completion queued.
    IoDone,
    /// A worker is running `btrfs_finish_one_ordered` for it.
    Completing,
    /// `btrfs_finish_one_ordered` ran.
    Complete,
}

/// An ordered extent.
#[derive(Clone, Copy, Debug)]
pub struct OrderedExtent {
    /// Id, in creation order.
    pub id: u64,
    /// Inode.
    pub ino: u64,
    /// File offset.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Type.
    pub kind: OeKind,
    /// The item its completion inserts (COW) or the written range's extent (PREALLOC, NOCOW).
    pub item: FileExtentItem,
    /// Progress.
    pub state: OeState,
    /// The IO failed (BTRFS_ORDERED_IOERR).
    pub ioerr: bool,
}

impl OrderedExtent {
    /// Exclusive end.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A dirty (delalloc) range of the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyRange {
    /// Start.
    pub start: u64,
    /// Exclusive end.
    pub end: u64,
    /// Its writeback will fail with an IO error.
    pub ioerr: bool,
}

/// Per-inode state besides the extent maps.
#[derive(Clone, Debug)]
pub struct InodeModel {
    /// Inode number.
    pub ino: u64,
    /// i_size.
    pub i_size: u64,
    /// NODATACOW (and NODATASUM).
    pub nodatacow: bool,
    /// The subvolume tree's file extent items.
    pub items: Items,
    /// Dirty ranges, sorted.
    pub dirty: Vec<DirtyRange>,
    /// Ranges under writeback: (start, end, folios still locked). Folios stay locked while
    /// `run_delalloc_range` creates the ordered extents, then only the writeback bit is set
    /// until the bio ends.
    pub writeback: Vec<(u64, u64, bool)>,
    /// Something changed since the inode was last logged (`last_trans` / `logged_trans`).
    pub needs_log: bool,
    /// A buffered writeback failed and nobody has checked yet (AS_EIO, set by
    /// `mapping_set_error` in `end_bbio_data_write`, cleared by `filemap_check_errors`).
    pub wb_err: bool,
    /// The inode was evicted.
    pub evicted: bool,
}

/// A locked io_tree range (EXTENT_LOCKED).
#[derive(Clone, Copy, Debug)]
pub struct RangeLock {
    /// Inode.
    pub ino: u64,
    /// Start.
    pub start: u64,
    /// Exclusive end.
    pub end: u64,
    /// Actor holding it.
    pub owner: usize,
}

/// One extent an fsync logged.
#[derive(Clone, Copy, Debug)]
pub struct Logged {
    /// The fsync actor.
    pub actor: usize,
    /// Inode.
    pub ino: u64,
    /// The map as `log_one_extent` saw it (fast path) or the item copied (full path).
    pub em: ExtentMap,
}

/// An error an actor hit that the kernel would report (WARN, transaction abort).
#[derive(Clone, Debug)]
pub struct ActorError {
    /// Actor.
    pub actor: usize,
    /// Which check it is.
    pub check: crate::Check,
    /// What happened.
    pub detail: String,
}

/// The shared model state.
#[derive(Debug, Default)]
pub struct World {
    /// Inodes by number.
    pub inodes: BTreeMap<u64, InodeModel>,
    /// Ordered extents, by id (completed ones are kept).
    pub oes: Vec<OrderedExtent>,
    /// Locked io ranges.
    pub range_locks: Vec<RangeLock>,
    /// Inodes whose fast fsync is in its logging pass, and the actor running it.
    pub logging: BTreeMap<u64, usize>,
    /// Next free disk address.
    pub next_disk: u64,
    /// What fsyncs logged.
    pub log: Vec<Logged>,
    /// Errors reported by actors, drained by the checker after each step.
    pub errors: Vec<ActorError>,
    /// Actors that may still create ordered extents.
    pub producers_alive: usize,
    /// Live actors per inode (eviction waits for them).
    pub users: BTreeMap<u64, usize>,
}

impl World {
    /// The inode model (panics on an inode the scenario does not have: a scenario bug).
    pub fn inode(&mut self, ino: u64) -> &mut InodeModel {
        self.inodes
            .get_mut(&ino)
            .unwrap_or_else(|| panic!("scenario has no inode {ino}"))
    }

    /// Allocates `len` bytes of disk.
    pub fn alloc_disk(&mut self, len: u64) -> u64 {
        let a = self.next_disk;
        self.next_disk += len.div_ceil(PAGE) * PAGE + PAGE;
        a
    }

    /// `[start, end)` of `ino` overlaps a locked range held by someone other than `me`.
    pub fn range_locked(&self, ino: u64, start: u64, end: u64) -> bool {
        self.range_locks
            .iter()
            .any(|l| l.ino == ino && l.start < end && l.end > start)
    }

    /// Ordered extents of `ino` overlapping `[start, end)` that are not complete.
    pub fn pending_oes(&self, ino: u64, start: u64, end: u64) -> Vec<u64> {
        self.oes
            .iter()
            .filter(|o| {
                o.ino == ino && o.state != OeState::Complete && o.start < end && o.end() > start
            })
            .map(|o| o.id)
            .collect()
    }

    /// The ordered extent with id `id`.
    pub fn oe(&mut self, id: u64) -> &mut OrderedExtent {
        let i = self
            .oes
            .iter()
            .position(|o| o.id == id)
            .expect("ordered extent id");
        &mut self.oes[i]
    }

    /// Creates an ordered extent (Running) and returns its id.
    pub fn add_oe(&mut self, ino: u64, kind: OeKind, item: FileExtentItem) -> u64 {
        let id = self.oes.len() as u64 + 1;
        self.oes.push(OrderedExtent {
            id,
            ino,
            start: item.start,
            len: item.len,
            kind,
            item,
            state: OeState::Running,
            ioerr: false,
        });
        id
    }

    /// The first ordered extent whose completion is queued.
    pub fn first_queued_oe(&self) -> Option<u64> {
        self.oes
            .iter()
            .find(|o| o.state == OeState::IoDone)
            .map(|o| o.id)
    }
}

impl InodeModel {
    /// Marks `[start, end)` dirty (merging with neighbours of the same kind).
    pub fn add_dirty(&mut self, start: u64, end: u64, ioerr: bool) {
        let mut s = start;
        let mut e = end;
        let mut keep = Vec::with_capacity(self.dirty.len() + 1);
        for d in self.dirty.drain(..) {
            if d.end < s || d.start > e || (d.ioerr != ioerr && (d.end == s || d.start == e)) {
                keep.push(d);
            } else if d.ioerr == ioerr || d.start >= s && d.end <= e {
                s = s.min(d.start);
                e = e.max(d.end);
            } else {
                // An overlapping range of the other kind keeps its parts outside [s, e).
                if d.start < s {
                    keep.push(DirtyRange {
                        start: d.start,
                        end: s,
                        ioerr: d.ioerr,
                    });
                }
                if d.end > e {
                    keep.push(DirtyRange {
                        start: e,
                        end: d.end,
                        ioerr: d.ioerr,
                    });
                }
            }
        }
        keep.push(DirtyRange {
            start: s,
            end: e,
            ioerr,
        });
        keep.sort_by_key(|d| d.start);
        self.dirty = keep;
    }

    /// Takes the first dirty range overlapping `[start, end)` (clipped to it), if any.
    pub fn take_dirty(&mut self, start: u64, end: u64) -> Option<DirtyRange> {
        let i = self
            .dirty
            .iter()
            .position(|d| d.start < end && d.end > start)?;
        let d = self.dirty.remove(i);
        let (s, e) = (d.start.max(start), d.end.min(end));
        if d.start < s {
            self.dirty.push(DirtyRange {
                start: d.start,
                end: s,
                ioerr: d.ioerr,
            });
        }
        if d.end > e {
            self.dirty.push(DirtyRange {
                start: e,
                end: d.end,
                ioerr: d.ioerr,
            });
        }
        self.dirty.sort_by_key(|d| d.start);
        Some(DirtyRange {
            start: s,
            end: e,
            ioerr: d.ioerr,
        })
    }

    /// `[start, end)` has dirty or writeback pages.
    pub fn busy_pages(&self, start: u64, end: u64) -> bool {
        self.dirty.iter().any(|d| d.start < end && d.end > start)
            || self.writeback.iter().any(|w| w.0 < end && w.1 > start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_punch_insert_mark_written() {
        // Test scenario: item bookkeeping: punching the middle of a prealloc item leaves head
        // and tail with advanced offsets; marking part written turns it REG.
        let mut it = Items::default();
        it.insert(FileExtentItem {
            start: 0,
            len: 16 * PAGE,
            disk_bytenr: 1 << 20,
            disk_num_bytes: 16 * PAGE,
            offset: 0,
            kind: ItemKind::Prealloc,
            generation: TRANSID,
        });
        it.mark_written(4 * PAGE, 8 * PAGE, TRANSID);
        let all = it.all();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].kind, ItemKind::Reg);
        assert_eq!(all[1].offset, 4 * PAGE);
        assert_eq!(all[2].offset, 8 * PAGE);
        it.punch(2 * PAGE, 10 * PAGE);
        let all = it.all();
        assert_eq!(
            all.iter().map(|i| (i.start, i.len)).collect::<Vec<_>>(),
            vec![(0, 2 * PAGE), (10 * PAGE, 6 * PAGE)]
        );
        assert_eq!(it.covering(11 * PAGE).unwrap().offset, 10 * PAGE);
        assert!(it.covering(5 * PAGE).is_none());
        assert_eq!(it.next_start_after(5 * PAGE), Some(10 * PAGE));
    }

    #[test]
    fn dirty_ranges_merge_and_take() {
        // Test scenario: dirty ranges merge when adjacent and of the same kind, stay apart
        // otherwise, and taking a range clips it.
        let mut m = InodeModel {
            ino: 257,
            i_size: 0,
            nodatacow: false,
            items: Items::default(),
            dirty: vec![],
            writeback: vec![],
            needs_log: false,
            wb_err: false,
            evicted: false,
        };
        m.add_dirty(0, PAGE, false);
        m.add_dirty(PAGE, 2 * PAGE, false);
        m.add_dirty(2 * PAGE, 3 * PAGE, true);
        assert_eq!(m.dirty.len(), 2);
        let d = m.take_dirty(PAGE, 3 * PAGE).unwrap();
        assert_eq!((d.start, d.end, d.ioerr), (PAGE, 2 * PAGE, false));
        assert_eq!(m.dirty.len(), 2);
        assert!(m.busy_pages(0, PAGE));
        assert!(!m.busy_pages(PAGE, 2 * PAGE));
    }
}
