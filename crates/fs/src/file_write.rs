//! Buffered writes and their writeback (the kernel's file.c `btrfs_buffered_write`,
//! `btrfs_drop_extents`, inode.c `cow_file_range` / `cow_file_range_inline` /
//! `btrfs_finish_one_ordered`, file-item.c `btrfs_csum_file_blocks`).
//!
//! # Definitions
//! - *Dirty data* (delalloc): sectors written through FUSE and not yet in an extent. They live
//!   in a per-inode [`DirtyInode`] (the page cache counterpart): readers see them, `i_size` and
//!   `mtime` there are the in-memory values.
//! - *Writeback* turns runs of contiguous dirty sectors into extents: one data extent per run
//!   (up to `BTRFS_MAX_EXTENT_SIZE`, split only where free space is fragmented), so sequential
//!   small writes become large extents. A whole-file run at offset 0 that fits the inline limit
//!   becomes an inline extent, as `cow_file_range_inline` decides. Runs of NODATACOW or
//!   PREALLOC-flagged inodes go through `run_delalloc_nocow` instead: parts over preallocated
//!   extents, or over unshared extents of a NODATACOW file, are written in place (see the
//!   NOCOW section below), the rest as new extents, never inline.
//!
//! # Invariants
//! - A dirty sector leaves the buffer only after the extent holding its data is in the running
//!   transaction and published (readers see the dirty copy or the extent, never neither), and
//!   only if it was not written again meanwhile (per-sector sequence number).
//! - Data is written to disk before the commit that references it (commit flushes the device
//!   after writeback wrote the data), so a committed file extent never points at stale bytes.
//!   The one exception is the kernel's: an in-place (NOCOW) write into a regular extent of a
//!   NODATACOW file changes committed bytes, and a crash may leave either version (or, for a
//!   write larger than one device write, a mix).
//! - Every written non-NODATASUM sector has its checksum in the csum tree in the same
//!   transaction as its file extent item; the data ref (root, ino, file offset - extent
//!   offset) is queued as a delayed ref.
//! - `nbytes` changes by the bytes of new extents minus the bytes `btrfs_drop_extents` dropped
//!   (inline extents count their unaligned length).
//!
//! - Writeback reserves a run's extents in one write operation, computes the checksums and
//!   writes the data with no lock held (O_DIRECT where the image allows it,
//!   `Device::write_data_at`), and inserts the file extent items and checksums in a second one
//!   (`write_run`); in between the extents are *reserved*: neither free nor used, and listed
//!   free by any commit's free space tree, since nothing on disk refers to them yet.
//!
//! Lock order: the inode's `inode_lock` (writers, truncate) before the inode's writeback lock
//! (`DirtyInode::wb`) before the dirty-inode mutex before `FsInfo::tree_lock`; the dirty mutex
//! is never held while taking the inode lock.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use crate::transaction::{TreeSel, WriteCtx};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use ubtrfs_ctree::extent_tree::RefKind;
use ubtrfs_extent_map::{ExtentMap, EXTENT_MAP_INLINE};
use ubtrfs_format::items::{
    inode_flags, FileExtentItem, InodeItem, FILE_EXTENT_INLINE, FILE_EXTENT_PREALLOC,
    FILE_EXTENT_REG,
};
use ubtrfs_format::key::{item, objectid, Key};

/// `BTRFS_MAX_EXTENT_SIZE`.
pub const MAX_EXTENT_SIZE: u64 = 128 << 20;
/// `BTRFS_DEFAULT_MAX_INLINE`.
pub const DEFAULT_MAX_INLINE: u64 = 2048;
/// Dirty bytes of one inode that start its writeback.
pub const INODE_DIRTY_LIMIT: u64 = 64 << 20;

/// In-memory state of an inode with unwritten data.
#[derive(Debug, Default)]
pub struct DirtyInode {
    /// Sector index -> (write sequence, sector bytes).
    pub sectors: BTreeMap<u64, (u64, Box<[u8]>)>,
    /// In-memory i_size.
    pub size: u64,
    pub mtime: Option<ubtrfs_format::items::Timespec>,
    seq: u64,
    /// Data space reserved for the dirty sectors (one sector each; space_info.rs).
    pub rsv: Arc<crate::space_info::InodeRsv>,
    /// Dirty sectors accepted without a data reservation because they could be written in
    /// place when data space ran out (`EXTENT_NORESERVE`, set by `btrfs_check_nocow_lock`'s
    /// path of the buffered write). Always a subset of `sectors`' keys.
    pub noreserve: std::collections::BTreeSet<u64>,
    /// Held for a whole writeback of the inode: its data I/O runs without the tree lock, and a
    /// second writeback (fsync's, say) must wait for the extents in flight
    /// (`btrfs_wait_ordered_range`).
    pub wb: Arc<Mutex<()>>,
    /// Set (under this mutex) when the state leaves the inode's slot in `FsInfo::dirty`: a
    /// holder that found it before must look the inode's state up again (a newer one may hold
    /// data whose writeback is in flight).
    pub retired: bool,
    /// Dirty sectors that were holes when they were dirtied (`EXTENT_DELALLOC_NEW`): sectors
    /// past i_size of an inode without the PREALLOC flag, or over a hole map.
    pub new_sectors: BTreeSet<u64>,
    /// `new_delalloc_bytes`: the bytes of `new_sectors` plus those of sectors taken from it by a
    /// writeback whose file extent items are not in yet. It grows and shrinks with
    /// `new_sectors` under this mutex; the writeback's last write operation subtracts its
    /// sectors while it adds their bytes to the inode's `nbytes`, under the exclusive tree lock,
    /// so a reader holding the tree lock never counts them twice or not at all. What stat adds
    /// to `nbytes` (`btrfs_getattr`): [`new_delalloc_bytes`].
    pub new_delalloc: Arc<AtomicU64>,
}

impl DirtyInode {
    pub fn dirty_bytes(&self, ss: u64) -> u64 {
        self.sectors.len() as u64 * ss
    }

    /// Bring the data reservation in line with the dirty sectors that hold one (all but the
    /// NORESERVE ones), forgetting NORESERVE marks of sectors no longer dirty.
    fn settle_rsv(&mut self, ss: u64) {
        let sectors = &self.sectors;
        self.noreserve.retain(|i| sectors.contains_key(i));
        let n = (self.sectors.len() - self.noreserve.len()) as u64;
        self.rsv.settle(n * ss);
    }

    /// Forget the new-delalloc accounting of the dirty sectors `keep` rejects (they left the
    /// buffer without a writeback: truncated, or beyond EOF).
    fn drop_new_sectors(&mut self, ss: u64, keep: impl Fn(u64) -> bool) {
        let gone: Vec<u64> = self
            .new_sectors
            .iter()
            .copied()
            .filter(|&i| !keep(i))
            .collect();
        for i in &gone {
            self.new_sectors.remove(i);
        }
        self.new_delalloc
            .fetch_sub(gone.len() as u64 * ss, Ordering::SeqCst);
    }
}

/// The bytes of an inode's data written but not yet written back over holes (the kernel's
/// `new_delalloc_bytes`), which `stat` counts in `st_blocks` on top of `nbytes` as
/// `btrfs_getattr` does: without them a file just written reports no blocks until writeback.
/// Read apart from `nbytes` (the kernel reads both under the inode's spinlock), a writeback
/// finishing in between can make the sum short or over by that writeback's new bytes.
pub fn new_delalloc_bytes(fs: &FsInfo, root: u64, ino: u64) -> u64 {
    match dirty_inode(fs, root, ino) {
        Some(d) => d.lock().new_delalloc.load(Ordering::SeqCst),
        None => 0,
    }
}

pub type DirtyMap = Mutex<std::collections::HashMap<(u64, u64), Arc<Mutex<DirtyInode>>>>;

/// The dirty state of an inode, if it has one.
pub fn dirty_inode(fs: &FsInfo, root: u64, ino: u64) -> Option<Arc<Mutex<DirtyInode>>> {
    fs.dirty.lock().get(&(root, ino)).cloned()
}

/// The dirty state of an inode, made (empty, with the inode's current size) when it has none,
/// with that size when this call made it: a reader that must not race a writeback starting
/// under it holds this while it reads, so that new data waits for it (the role of the folio
/// lock in the kernel's read path).
pub fn dirty_inode_or_new(
    fs: &FsInfo,
    root: u64,
    ino: u64,
) -> Result<(Arc<Mutex<DirtyInode>>, Option<u64>)> {
    let mut map = fs.dirty.lock();
    if let Some(d) = map.get(&(root, ino)) {
        return Ok((d.clone(), None));
    }
    // The size is read under the map lock: a writeback that updated it and then dropped its
    // state did so before we got the lock (the tree lock, taken inside, is never held by
    // anyone waiting for the map lock).
    let size = crate::inode::read_inode(fs, root, ino)?.size;
    let d = Arc::new(Mutex::new(DirtyInode {
        size,
        rsv: crate::space_info::InodeRsv::new(fs),
        ..Default::default()
    }));
    map.insert((root, ino), d.clone());
    Ok((d, Some(size)))
}

/// Drops the dirty state [`dirty_inode_or_new`] made, if it is still the inode's and nothing
/// changed it since (no sector, no mtime, the size it was made with).
pub fn forget_if_clean(fs: &FsInfo, root: u64, ino: u64, d: &Arc<Mutex<DirtyInode>>, size: u64) {
    let mut map = fs.dirty.lock();
    if let Some(cur) = map.get(&(root, ino)) {
        if !Arc::ptr_eq(cur, d) {
            return;
        }
        let mut g = d.lock();
        if g.sectors.is_empty() && g.mtime.is_none() && g.size == size {
            g.retired = true;
            drop(g);
            map.remove(&(root, ino));
        }
    }
}

/// Overlay dirty sectors on `buf`, which holds file bytes starting at `offset`.
pub fn overlay_dirty(d: &DirtyInode, ss: u64, offset: u64, buf: &mut [u8]) {
    if d.sectors.is_empty() || buf.is_empty() {
        return;
    }
    let end = offset + buf.len() as u64;
    for (&idx, (_, data)) in d.sectors.range(offset / ss..end.div_ceil(ss)) {
        let s = idx * ss;
        let lo = s.max(offset);
        let hi = (s + ss).min(end);
        if lo < hi {
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&data[(lo - s) as usize..(hi - s) as usize]);
        }
    }
}

/// Read one sector of committed/transaction file content (no dirty overlay).
fn read_sector_from_disk(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    ii: &InodeItem,
    idx: u64,
) -> Result<Vec<u8>> {
    let ss = u64::from(fs.sectorsize());
    let emi = fs.ems.inode(root, ino);
    let mut v = crate::file::read_disk(fs, root, ino, ii, &emi, idx * ss, ss as u32)?;
    v.resize(ss as usize, 0);
    Ok(v)
}

/// `btrfs_buffered_write`: copy `data` at `offset` into the inode's dirty buffer.
/// Returns the bytes written. The caller holds the inode lock.
pub fn btrfs_buffered_write(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    data: &[u8],
) -> Result<usize> {
    buffered_write(fs, root, ino, offset, data, 1, false)
}

/// `btrfs_check_nocow_lock`: with data space short, how many bytes of a write of `len` at
/// `pos` can go in place into an extent the file has (so need no data reservation); None if
/// none can. Only NODATACOW or PREALLOC-flagged inodes qualify. [`FsError::Again`] (EAGAIN,
/// as the kernel answers the write) when the range is preallocated in a file without
/// NODATACOW and already holds dirty data.
fn btrfs_check_nocow_lock(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    flags: u64,
    pos: u64,
    len: u64,
) -> Result<Option<u64>> {
    if !should_nocow(flags) {
        return Ok(None);
    }
    let ss = u64::from(fs.sectorsize());
    let lockstart = pos - pos % ss;
    let lockend = (pos + len).div_ceil(ss) * ss;
    let Some((ext, _)) = can_nocow_extent(fs, root, ino, lockstart, lockend - lockstart, false)?
    else {
        return Ok(None);
    };
    Ok(Some(len.min(ext.num_bytes.saturating_sub(pos - lockstart))).filter(|n| *n > 0))
}

/// [`btrfs_buffered_write`], reserving metadata for `meta_items` items besides the data (0:
/// the data only, for the sector a truncate zeroes, which must work on a full filesystem).
fn buffered_write(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    data: &[u8],
    meta_items: u64,
    noreserve: bool,
) -> Result<usize> {
    if fs.is_readonly() {
        return Err(FsError::ReadOnly);
    }
    if data.is_empty() {
        return Ok(0);
    }
    let end = offset
        .checked_add(data.len() as u64)
        .filter(|e| *e <= i64::MAX as u64)
        .ok_or(FsError::Invalid(
            "write beyond the maximum file size".into(),
        ))?;
    let ss = u64::from(fs.sectorsize());
    let ii = crate::inode::read_inode(fs, root, ino)?;
    if ii.mode & crate::inode::S_IFMT != crate::inode::S_IFREG {
        return Err(FsError::Invalid("write to a non-regular file".into()));
    }
    let (dirty, _) = dirty_inode_or_new(fs, root, ino)?;
    // btrfs_check_data_free_space + btrfs_delalloc_reserve_metadata: every sector that is not
    // dirty yet needs a new extent's worth of space (COW), plus possibly the inline sector 0
    // and the old EOF sector zeroed below. ENOSPC here, before the data is accepted.
    let first = offset / ss;
    let last = end.div_ceil(ss);
    let missing = {
        let d = dirty.lock();
        (last - first) - d.sectors.range(first..last).count() as u64
    };
    let reserved = if noreserve {
        fs.btrfs_delalloc_reserve_metadata(meta_items)
    } else {
        fs.btrfs_reserve_data((missing + 2) * ss, meta_items)
    };
    let mut rsv = match reserved {
        Ok(r) => r,
        Err(FsError::NoSpace) if !noreserve => {
            // Out of space: what can be written in place needs no data space (short write),
            // only metadata, checked again on its own.
            let Some(n) =
                btrfs_check_nocow_lock(fs, root, ino, ii.flags, offset, data.len() as u64)?
            else {
                return Err(FsError::NoSpace);
            };
            return buffered_write(fs, root, ino, offset, &data[..n as usize], meta_items, true);
        }
        Err(e) => return Err(e),
    };
    let mut d = dirty.lock();
    if d.retired {
        // Its writeback ended and dropped it after we found it: data put here would never be
        // written. Start again with the inode's current state.
        drop(d);
        drop(rsv);
        return buffered_write(fs, root, ino, offset, data, meta_items, noreserve);
    }
    let before_keys: Option<std::collections::BTreeSet<u64>> =
        noreserve.then(|| d.sectors.keys().copied().collect());
    // Sectors that are not dirty are read up to the in-memory i_size (the on-disk size may
    // lag behind a writeback or a truncate).
    let disk_ii = InodeItem { size: d.size, ..ii };
    let before = d.sectors.len() as u64;
    // A file whose first extent is inline gets its first sector rewritten along with any
    // write: an inline extent cannot be partially replaced (btrfs_drop_extents).
    if !d.sectors.contains_key(&0) && d.size > 0 && has_inline_extent(fs, root, ino)? {
        let s0 = read_sector_from_disk(fs, root, ino, &disk_ii, 0)?;
        d.seq += 1;
        let seq = d.seq;
        d.sectors.insert(0, (seq, s0.into_boxed_slice()));
    }
    // btrfs_cont_expand → btrfs_truncate_block: a write that starts in a sector after the one
    // holding EOF first zeroes the rest of that sector, whose bytes after EOF may be stale on
    // disk (a kernel truncate to an unaligned size leaves them there); the extension would
    // expose them otherwise.
    let eof = d.size;
    if offset > eof && eof % ss != 0 && offset / ss > eof / ss {
        let idx = eof / ss;
        let z = (eof % ss) as usize;
        d.seq += 1;
        let seq = d.seq;
        match d.sectors.get_mut(&idx) {
            Some((sq, buf)) => {
                buf[z..].fill(0);
                *sq = seq;
            }
            None => {
                let mut buf = read_sector_from_disk(fs, root, ino, &disk_ii, idx)?;
                buf[z..].fill(0);
                if sector_is_hole(fs, root, ino, idx, ss, &mut None)? {
                    d.new_sectors.insert(idx);
                    d.new_delalloc.fetch_add(ss, Ordering::SeqCst);
                }
                d.sectors.insert(idx, (seq, buf.into_boxed_slice()));
            }
        }
    }
    // btrfs_set_extent_delalloc: which of the sectors dirtied now are new (EXTENT_DELALLOC_NEW).
    let all_new_from = if ii.flags & inode_flags::PREALLOC == 0 {
        d.size.div_ceil(ss)
    } else {
        u64::MAX
    };
    let mut em_cache: Option<ExtentMap> = None;
    let mut pos = offset;
    while pos < end {
        let idx = pos / ss;
        let s = idx * ss;
        let lo = (pos - s) as usize;
        let hi = ((end - s).min(ss)) as usize;
        d.seq += 1;
        let seq = d.seq;
        let src = &data[(pos - offset) as usize..(pos - offset) as usize + (hi - lo)];
        match d.sectors.get_mut(&idx) {
            Some((sq, buf)) => {
                buf[lo..hi].copy_from_slice(src);
                *sq = seq;
            }
            None => {
                let mut buf = if lo == 0 && hi == ss as usize || s >= d.size {
                    vec![0u8; ss as usize]
                } else {
                    read_sector_from_disk(fs, root, ino, &disk_ii, idx)?
                };
                // Bytes beyond the in-memory size are zero (they may hold stale data on disk
                // only if a truncate left them; the kernel zeroes them in btrfs_truncate_block).
                if s < d.size && d.size < s + ss {
                    let z = (d.size - s) as usize;
                    if z < lo {
                        buf[z..lo].fill(0);
                    }
                }
                buf[lo..hi].copy_from_slice(src);
                if idx >= all_new_from || sector_is_hole(fs, root, ino, idx, ss, &mut em_cache)? {
                    d.new_sectors.insert(idx);
                    d.new_delalloc.fetch_add(ss, Ordering::SeqCst);
                }
                d.sectors.insert(idx, (seq, buf.into_boxed_slice()));
            }
        }
        pos = s + hi as u64;
    }
    let added = (d.sectors.len() as u64).saturating_sub(before);
    if let Some(old) = before_keys {
        // Sectors this write made dirty hold no data reservation (EXTENT_NORESERVE).
        let new: Vec<u64> = d
            .sectors
            .keys()
            .filter(|i| !old.contains(i))
            .copied()
            .collect();
        d.noreserve.extend(new);
    } else {
        rsv.transfer(added * ss, &d.rsv);
    }
    drop(rsv);
    d.settle_rsv(ss);
    d.size = d.size.max(end);
    d.mtime = Some(crate::disk_io::now_timespec());
    fs.counters
        .bytes_written
        .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let over = d.dirty_bytes(ss) >= INODE_DIRTY_LIMIT;
    drop(d);
    if over {
        btrfs_writeback(fs, root, ino)?;
    }
    Ok(data.len())
}

/// `btrfs_find_new_delalloc_bytes` for one sector: whether the extent map at it is a hole.
/// `cache` keeps the last map, which usually covers the next sectors too.
fn sector_is_hole(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    idx: u64,
    ss: u64,
    cache: &mut Option<ExtentMap>,
) -> Result<bool> {
    let pos = idx * ss;
    let em = match cache {
        Some(em) if em.start <= pos && pos < em.end() => *em,
        _ => {
            let emi = fs.ems.inode(root, ino);
            let em = crate::file::btrfs_get_extent(fs, root, ino, &emi, pos, ss)?;
            *cache = Some(em);
            em
        }
    };
    Ok(em.disk_bytenr == ubtrfs_extent_map::EXTENT_MAP_HOLE)
}

fn has_inline_extent(fs: &FsInfo, root: u64, ino: u64) -> Result<bool> {
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    let key = Key::new(ino, item::EXTENT_DATA, 0);
    Ok(
        match ubtrfs_ctree::ctree::lookup_item(&fs.reader, &r.ptr, &key)? {
            Some(d) => FileExtentItem::parse(&d)
                .map(|fe| fe.extent_type == FILE_EXTENT_INLINE)
                .unwrap_or(false),
            None => false,
        },
    )
}

/// Set the in-memory size of an inode with dirty data to `new_size`, dropping dirty sectors
/// beyond it and zeroing the tail of the last partial one. No-op without dirty data.
/// (Truncate first writes back, so this only matters for data written meanwhile.)
pub fn truncate_dirty(fs: &FsInfo, root: u64, ino: u64, new_size: u64) {
    let Some(dirty) = dirty_inode(fs, root, ino) else {
        return;
    };
    let ss = u64::from(fs.sectorsize());
    let mut d = dirty.lock();
    d.sectors.retain(|&idx, _| idx * ss < new_size);
    d.drop_new_sectors(ss, |idx| idx * ss < new_size);
    d.settle_rsv(ss);
    if !new_size.is_multiple_of(ss) {
        if let Some((_, buf)) = d.sectors.get_mut(&(new_size / ss)) {
            buf[(new_size % ss) as usize..].fill(0);
        }
    }
    d.size = new_size;
}

/// The in-memory size and mtime of an inode with dirty data (what getattr reports).
pub fn live_attrs(fs: &FsInfo, root: u64, ino: u64, ii: &mut InodeItem) {
    if let Some(dirty) = dirty_inode(fs, root, ino) {
        let d = dirty.lock();
        ii.size = d.size;
        if let Some(m) = d.mtime {
            ii.mtime = m;
            ii.ctime = m;
        }
    }
}

/// Bytes `btrfs_drop_extents` removed from the file's allocation (for nbytes).
#[derive(Debug, Default, Clone, Copy)]
pub struct DropResult {
    pub bytes_found: u64,
}

/// `btrfs_drop_extents`: remove the file extent items of `[start, end)` of `ino`, splitting
/// items that straddle the edges and dropping references of extents no longer used.
pub fn btrfs_drop_extents(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    start: u64,
    end: u64,
) -> Result<DropResult> {
    btrfs_drop_extents_in(c, TreeSel::Fs(root), ino, start, end)
}

/// `btrfs_drop_extents` on a subvolume tree or a log tree. Log trees hold no references, so
/// splitting or dropping their items queues no ref changes.
pub fn btrfs_drop_extents_in(
    c: &mut WriteCtx<'_>,
    sel: TreeSel,
    ino: u64,
    start: u64,
    end: u64,
) -> Result<DropResult> {
    let (root, refs) = match sel {
        TreeSel::Fs(r) => (r, true),
        TreeSel::Log(r) => (r, false),
    };
    let ss = u64::from(c.fs.sectorsize());
    let mut res = DropResult::default();
    // Items that may overlap: the last one starting at or before `start`, then the following.
    let mut cursor = match c.sel_lookup_le(sel, &Key::new(ino, item::EXTENT_DATA, start))? {
        Some((k, _)) if k.objectid == ino && k.item_type == item::EXTENT_DATA => k.offset,
        _ => start,
    };
    loop {
        let items = c.sel_items(sel, Key::new(ino, item::EXTENT_DATA, cursor), 1, |k| {
            k.objectid == ino && k.item_type == item::EXTENT_DATA
        })?;
        let Some((key, data)) = items.into_iter().next() else {
            break;
        };
        if key.offset >= end {
            break;
        }
        let fe = FileExtentItem::parse(&data)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        let ks = key.offset;
        let ke = if fe.extent_type == FILE_EXTENT_INLINE {
            (ks + fe.ram_bytes).div_ceil(ss) * ss
        } else {
            ks + fe.num_bytes
        };
        cursor = ks + 1;
        if ke <= start {
            continue;
        }
        let counts = fe.extent_type != FILE_EXTENT_INLINE && fe.disk_bytenr != 0;
        let data_ref = |fe: &FileExtentItem| RefKind::Data {
            root,
            ino,
            offset: ks.wrapping_sub(fe.offset),
        };
        if fe.extent_type == FILE_EXTENT_INLINE {
            // Inline extents are dropped whole (callers rewrite sector 0 entirely).
            c.sel_delete(sel, &key)?;
            res.bytes_found += fe.ram_bytes;
            continue;
        }
        if ks < start && ke > end {
            // Split: [ks, start) stays, [end, ke) becomes a new item of the same extent.
            let mut front = fe.clone();
            front.num_bytes = start - ks;
            c.sel_update(sel, &key, &front.to_bytes())?;
            let mut tail = fe.clone();
            tail.offset += end - ks;
            tail.num_bytes = ke - end;
            c.sel_insert(sel, Key::new(ino, item::EXTENT_DATA, end), &tail.to_bytes())?;
            if counts && refs {
                c.t.refs
                    .add(fe.disk_bytenr, fe.disk_num_bytes, data_ref(&fe), 1);
                res.bytes_found += end - start;
            }
            break;
        }
        if ks < start {
            // Keep the front.
            let mut front = fe.clone();
            front.num_bytes = start - ks;
            c.sel_update(sel, &key, &front.to_bytes())?;
            if counts {
                res.bytes_found += ke - start;
            }
            continue;
        }
        if ke > end {
            // Keep the tail, re-keyed at `end`.
            c.sel_delete(sel, &key)?;
            let mut tail = fe.clone();
            tail.offset += end - ks;
            tail.num_bytes = ke - end;
            c.sel_insert(sel, Key::new(ino, item::EXTENT_DATA, end), &tail.to_bytes())?;
            if counts {
                res.bytes_found += end - ks;
            }
            break;
        }
        // Fully inside: gone.
        c.sel_delete(sel, &key)?;
        if counts && refs {
            c.t.refs
                .add(fe.disk_bytenr, fe.disk_num_bytes, data_ref(&fe), -1);
            res.bytes_found += fe.num_bytes;
        }
    }
    Ok(res)
}

/// The checksums of `data`'s sectors, concatenated (what the kernel computes when it submits
/// the data, `btrfs_csum_one_bio`, before any tree lock).
pub fn btrfs_csum_data(fs: &FsInfo, data: &RunData) -> Vec<u8> {
    btrfs_csum_sectors(fs, &data.slices(0, data.len()))
}

/// The checksums of the sectors of `pieces` (each a whole number of sectors), concatenated.
pub fn btrfs_csum_sectors(fs: &FsInfo, pieces: &[&[u8]]) -> Vec<u8> {
    let ss = fs.sectorsize() as usize;
    let t = fs.reader.csum_type;
    let csize = t.size();
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let mut sums = Vec::with_capacity(total / ss * csize);
    for piece in pieces {
        for s in piece.chunks(ss) {
            sums.extend_from_slice(&t.compute(s)[..csize]);
        }
    }
    sums
}

/// `btrfs_csum_file_blocks`: the checksums `sums` (one per sector, from [`btrfs_csum_data`])
/// of data written at `bytenr`, as EXTENT_CSUM items.
pub fn btrfs_csum_file_blocks(c: &mut WriteCtx<'_>, bytenr: u64, sums: &[u8]) -> Result<()> {
    let ss = c.fs.sectorsize() as usize;
    let csize = c.fs.reader.csum_type.size();
    // Items of at most a quarter leaf, so that they always fit.
    let per_item = ((c.fs.sb.nodesize as usize / 4) / csize).max(1);
    for (i, body) in sums.chunks(per_item * csize).enumerate() {
        let key = Key::new(
            objectid::EXTENT_CSUM,
            item::EXTENT_CSUM,
            bytenr + (i * per_item * ss) as u64,
        );
        c.insert(objectid::CSUM_TREE, key, body)?;
    }
    Ok(())
}

/// Bytes of one [`RunData`] chunk.
const RUN_CHUNK: usize = 1 << 20;

/// The bytes of a run, copied out of the dirty buffer for its writeback: chunks of at most
/// [`RUN_CHUNK`] whole sectors, each starting at an address aligned for O_DIRECT
/// (`Device::write_data_at`). Chunks rather than one buffer: allocations of this size come
/// from the heap, where the memory of the last writeback is reused, where a buffer of a
/// whole run (up to 128 MiB) would be a fresh mapping each time.
#[derive(Debug, Default)]
pub struct RunData {
    /// (buffer, where the data starts in it, data length).
    chunks: Vec<(Vec<u8>, usize, usize)>,
    len: usize,
}

impl RunData {
    /// Append one sector (`data` is a whole sector, never more than [`RUN_CHUNK`]).
    pub fn push_sector(&mut self, data: &[u8]) {
        let full = self
            .chunks
            .last()
            .is_none_or(|(_, _, l)| l + data.len() > RUN_CHUNK);
        if full {
            let a = ubtrfs_ctree::volumes::DIRECT_IO_ALIGN;
            let mut buf: Vec<u8> = Vec::with_capacity(RUN_CHUNK + a);
            let start = buf.as_ptr().align_offset(a).min(a);
            buf.resize(start, 0);
            self.chunks.push((buf, start, 0));
        }
        let (buf, _, l) = self.chunks.last_mut().expect("pushed above");
        // Within the capacity reserved above: the buffer never moves.
        buf.extend_from_slice(data);
        *l += data.len();
        self.len += data.len();
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `off..off + len`, as slices of the chunks.
    pub fn slices(&self, off: usize, len: usize) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let (mut skip, mut want) = (off, len);
        for (buf, start, l) in &self.chunks {
            if want == 0 {
                break;
            }
            if skip >= *l {
                skip -= l;
                continue;
            }
            let take = (l - skip).min(want);
            out.push(&buf[start + skip..start + skip + take]);
            skip = 0;
            want -= take;
        }
        out
    }

    /// A copy of the bytes `off..off + len` (whole sectors of `ss` bytes) as a run of its own.
    pub fn sub(&self, off: usize, len: usize, ss: usize) -> RunData {
        let mut r = RunData::default();
        for piece in self.slices(off, len) {
            for sector in piece.chunks(ss) {
                r.push_sector(sector);
            }
        }
        r
    }

    /// The bytes `off..off + len` in one buffer.
    pub fn to_vec(&self, off: usize, len: usize) -> Vec<u8> {
        self.slices(off, len).concat()
    }
}

/// A run of contiguous dirty sectors: first sector index, (index, write sequence) of each,
/// and their bytes.
type Run = (u64, Vec<(u64, u64)>, RunData);

/// Write back every dirty sector of an inode (`btrfs_fdatawrite_range` + ordered completion).
pub fn btrfs_writeback(fs: &FsInfo, root: u64, ino: u64) -> Result<()> {
    let Some(dirty) = dirty_inode(fs, root, ino) else {
        return Ok(());
    };
    let wb = dirty.lock().wb.clone();
    let _wb = wb.lock();
    let ss = u64::from(fs.sectorsize());
    // Snapshot the runs to write.
    let (runs, size, mtime, rsv, new_delalloc, noreserve) = {
        let d = dirty.lock();
        let mut runs: Vec<Run> = Vec::new();
        for (&idx, (seq, data)) in &d.sectors {
            let extend = match runs.last() {
                Some((s, v, _)) => {
                    s + v.len() as u64 == idx && (v.len() as u64 + 1) * ss <= MAX_EXTENT_SIZE
                }
                None => false,
            };
            if !extend {
                runs.push((idx, Vec::new(), RunData::default()));
            }
            let r = runs.last_mut().expect("pushed above");
            r.1.push((idx, *seq));
            r.2.push_sector(data);
        }
        (
            runs,
            d.size,
            d.mtime,
            d.rsv.clone(),
            d.new_delalloc.clone(),
            d.noreserve.clone(),
        )
    };
    let emi = fs.ems.inode(root, ino);
    for (first, seqs, data) in &runs {
        let start = first * ss;
        let mut len = data.len() as u64;
        // Sectors wholly beyond i_size (after a truncate) are not written.
        if start >= size.div_ceil(ss) * ss {
            continue;
        }
        len = len.min(size.div_ceil(ss) * ss - start);
        // The run's new sectors stay in `new_delalloc` until its file extent items are in
        // (btrfs_finish_one_ordered clears EXTENT_DELALLOC_NEW as it adds the inode bytes).
        let mut taken: Vec<u64> = {
            let mut d = dirty.lock();
            let t: Vec<u64> = d
                .new_sectors
                .range(*first..(start + len).div_ceil(ss))
                .copied()
                .collect();
            for i in &t {
                d.new_sectors.remove(i);
            }
            t
        };
        if let Err(e) = btrfs_run_delalloc_range(
            fs,
            root,
            ino,
            &emi,
            start,
            data,
            len,
            size,
            mtime,
            &rsv,
            (&mut taken, &new_delalloc),
            &noreserve,
        ) {
            // The sectors still dirty and not written stay new (pieces that completed took
            // theirs out of `taken`); a truncate may have dropped some meanwhile.
            let mut d = dirty.lock();
            for i in taken {
                if d.sectors.contains_key(&i) {
                    d.new_sectors.insert(i);
                } else {
                    d.new_delalloc.fetch_sub(ss, Ordering::SeqCst);
                }
            }
            return Err(e);
        }
        // The data is in the transaction: drop the dirty copies that were not rewritten.
        let mut d = dirty.lock();
        for &(idx, seq) in seqs {
            if idx * ss < start + len && d.sectors.get(&idx).map(|(s, _)| *s) == Some(seq) {
                d.sectors.remove(&idx);
            }
        }
        d.settle_rsv(ss);
    }
    // Sectors beyond EOF left over and the size/mtime update when nothing else is dirty.
    let mut d = dirty.lock();
    let eof = d.size.div_ceil(ss);
    d.sectors.retain(|&idx, _| idx < eof);
    d.drop_new_sectors(ss, |idx| idx < eof);
    d.settle_rsv(ss);
    if d.sectors.is_empty() {
        let (size, mtime) = (d.size, d.mtime);
        drop(d);
        fs.write_op_rsv(crate::space_info::MetaRsv::WRITEBACK, |c| {
            let mut ii = c.read_inode(root, ino)?;
            if ii.size != size || mtime.is_some() {
                ii.size = size;
                if let Some(m) = mtime {
                    ii.mtime = m;
                    ii.ctime = m;
                }
                ii.transid = c.transid();
                c.write_inode(root, ino, &ii)?;
            }
            Ok(())
        })?;
        let mut map = fs.dirty.lock();
        if let Some(cur) = map.get(&(root, ino)) {
            if Arc::ptr_eq(cur, &dirty) {
                let mut g = dirty.lock();
                if g.sectors.is_empty() {
                    g.retired = true;
                    drop(g);
                    map.remove(&(root, ino));
                }
            }
        }
    }
    Ok(())
}

/// `btrfs_run_delalloc_range` for one run of dirty data starting at `start`: through
/// `run_delalloc_nocow` for a NODATACOW or PREALLOC-flagged inode (in-place pieces, and COW
/// pieces that are never inline), else one `write_run`. The pieces are decided together, on
/// the items as they are before any of them completes, then written and completed in file
/// order; the caller's writeback lock keeps the inode's items as decided meanwhile.
#[allow(clippy::too_many_arguments)]
fn btrfs_run_delalloc_range(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    emi: &ubtrfs_extent_map::BtrfsInode,
    start: u64,
    data: &RunData,
    total: u64,
    size: u64,
    mtime: Option<ubtrfs_format::items::Timespec>,
    rsv: &crate::space_info::InodeRsv,
    (taken, new_delalloc): (&mut Vec<u64>, &AtomicU64),
    noreserve: &std::collections::BTreeSet<u64>,
) -> Result<()> {
    let ss = u64::from(fs.sectorsize());
    let end = start + total;
    // The new (EXTENT_DELALLOC_NEW) sectors of [s, s + len), taken out of `taken`: their
    // bytes leave `new_delalloc` when the piece's items are in.
    let take_new = |taken: &mut Vec<u64>, s: u64, len: u64| -> u64 {
        let (lo, hi) = (s / ss, (s + len).div_ceil(ss));
        let before = taken.len();
        taken.retain(|&i| i < lo || i >= hi);
        (before - taken.len()) as u64 * ss
    };
    // Bytes of NORESERVE sectors in [s, s + len).
    let unreserved =
        |s: u64, len: u64| noreserve.range(s / ss..(s + len).div_ceil(ss)).count() as u64 * ss;
    // The common case decides on the published inode (no exclusive tree lock); the flags
    // cannot change under a writeback (chattr +C needs an empty file, fallocate writes back
    // first), and the decisions themselves are made on the running transaction.
    let plan = if should_nocow(crate::inode::read_inode(fs, root, ino)?.flags) {
        fs.write_op_rsv(crate::space_info::MetaRsv::NONE, |c| {
            let flags = c.read_inode(root, ino)?.flags;
            if !should_nocow(flags) {
                return Ok(None);
            }
            run_delalloc_nocow(c, root, ino, flags, start, end).map(Some)
        })?
    } else {
        None
    };
    let Some(plan) = plan else {
        rsv.add_unreserved(unreserved(start, total));
        let new = (taken.len() as u64 * ss, new_delalloc);
        write_run(
            fs, root, ino, emi, start, data, total, size, mtime, rsv, new, false,
        )?;
        taken.clear();
        return Ok(());
    };
    for piece in plan {
        match piece {
            DelallocPiece::Cow { start: s, len } => {
                let d = data.sub((s - start) as usize, len as usize, ss as usize);
                let mut left = taken.clone();
                let new = (take_new(&mut left, s, len), new_delalloc);
                // fallback_to_cow: NORESERVE sectors take data space now (bytes_may_use), which
                // the allocation below consumes, or fails with ENOSPC.
                rsv.add_unreserved(unreserved(s, len));
                write_run(fs, root, ino, emi, s, &d, len, size, mtime, rsv, new, true)?;
                *taken = left;
            }
            DelallocPiece::Nocow {
                start: s,
                ext,
                prealloc,
            } => {
                let d = data.to_vec((s - start) as usize, ext.num_bytes as usize);
                let reserved = ext.num_bytes - unreserved(s, ext.num_bytes);
                write_nocow_piece(
                    fs, root, ino, emi, s, &ext, prealloc, &d, reserved, size, mtime, rsv,
                )?;
                // Sectors over an extent are never new; none to account, unless the file
                // changed between the write and its writeback.
                let n = take_new(taken, s, ext.num_bytes);
                new_delalloc.fetch_sub(n, Ordering::SeqCst);
            }
        }
    }
    Ok(())
}

/// Write one run of file data starting at `start` as a new extent (or inline extent), in the
/// kernel's three steps so that no lock is held during the data I/O:
/// 1. `cow_file_range`: reserve extents for the run (reserved space: not free, no extent
///    item yet, still free in the free space tree of any commit meanwhile) and insert their
///    pinned extent maps. The run's data reservation (in `rsv`) is released in this same
///    write operation, so free space and `data_may_use` never count it twice.
/// 2. Write the data, with no lock held (the extents belong to this writeback only; readers
///    still get these sectors from the dirty buffer).
/// 3. `btrfs_finish_ordered_io`: checksums, file extent items replacing what was there, data
///    refs, inode size and nbytes, and the maps unpinned.
///
/// A failed data write gives the reserved extents back and leaves the sectors dirty; nothing
/// referenced them, so the transaction is not aborted (the kernel sets a mapping error for
/// fsync instead). The caller serializes writebacks of one inode.
#[allow(clippy::too_many_arguments)]
fn write_run(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    emi: &ubtrfs_extent_map::BtrfsInode,
    start: u64,
    data: &RunData,
    total: u64,
    size: u64,
    mtime: Option<ubtrfs_format::items::Timespec>,
    rsv: &crate::space_info::InodeRsv,
    (new_bytes, new_delalloc): (u64, &AtomicU64),
    no_inline: bool,
) -> Result<()> {
    use crate::space_info::MetaRsv;
    use ubtrfs_ctree::block_group::AllocKind;
    let ss = u64::from(fs.sectorsize());
    let max_inline = DEFAULT_MAX_INLINE.min(ss);
    // cow_file_range_inline: whole file, at 0, within one sector and max_inline.
    if !no_inline
        && start == 0
        && size <= ss
        && size <= max_inline
        && size > 0
        && total >= size.min(ss)
    {
        return fs.write_op_rsv(MetaRsv::WRITEBACK, |c| {
            rsv.release(total);
            let transid = c.transid();
            let mut ii = c.read_inode(root, ino)?;
            let drop = btrfs_drop_extents(c, root, ino, 0, ss)?;
            let fe = FileExtentItem {
                generation: transid,
                ram_bytes: size,
                compression: 0,
                encryption: 0,
                other_encoding: 0,
                extent_type: FILE_EXTENT_INLINE,
                disk_bytenr: 0,
                disk_num_bytes: 0,
                offset: 0,
                num_bytes: 0,
                inline_data: data.to_vec(0, size as usize),
            };
            c.insert(root, Key::new(ino, item::EXTENT_DATA, 0), &fe.to_bytes())?;
            ii.nbytes = ii.nbytes.saturating_sub(drop.bytes_found) + size;
            finish_inode(c, root, ino, &mut ii, size, mtime)?;
            emi.btrfs_drop_extent_map_range(0, u64::MAX, false);
            emi.btrfs_set_inode_full_sync();
            let em = ExtentMap {
                start: 0,
                len: ss,
                disk_bytenr: EXTENT_MAP_INLINE,
                disk_num_bytes: 0,
                offset: 0,
                ram_bytes: size,
                generation: transid,
                flags: 0,
            };
            let _ = emi.btrfs_add_extent_mapping(em, 0, ss);
            new_delalloc.fetch_sub(new_bytes, Ordering::SeqCst);
            Ok(())
        });
    }
    // Step 1: reserve the extents: (file offset, bytenr, length).
    let mut pieces: Vec<(u64, u64, u64)> = Vec::new();
    let mut datasum = true;
    let reserved = fs.write_op_rsv(MetaRsv::WRITEBACK, |c| {
        // Checksummed or not is decided when the data is submitted, as in the kernel.
        datasum = c.read_inode(root, ino)?.flags & inode_flags::NODATASUM == 0;
        rsv.release_allocated(total);
        let mut pos = 0u64;
        while pos < total {
            let want = total - pos;
            // find_free_extent: the whole run in one extent if any group (or a new chunk) has
            // room; only then fragments of what is left.
            let whole = c.t.space.alloc(AllocKind::Data, want);
            let (bytenr, got) = match whole {
                Some(b) => (b, want),
                None => {
                    let grown = c.alloc_data_chunk()?;
                    match grown
                        .then(|| c.t.space.alloc(AllocKind::Data, want))
                        .flatten()
                    {
                        Some(b) => (b, want),
                        None => {
                            c.t.space
                                .alloc_data_upto(ss, want)
                                .ok_or(FsError::NoSpace)?
                        }
                    }
                }
            };
            c.t.space.to_reserved(bytenr, got)?;
            let fstart = start + pos;
            pieces.push((fstart, bytenr, got));
            // The pinned, modified map of the new extent (btrfs_create_io_em).
            let em = ExtentMap {
                start: fstart,
                len: got,
                disk_bytenr: bytenr,
                disk_num_bytes: got,
                offset: 0,
                ram_bytes: got,
                generation: u64::MAX,
                flags: ubtrfs_extent_map::flags::PINNED,
            };
            emi.btrfs_replace_extent_map_range(em, true).map_err(|e| {
                FsError::corrupt(format!("root {root} ino {ino}: extent map: {e:?}"))
            })?;
            pos += got;
        }
        Ok(())
    });
    let give_back = |pieces: &[(u64, u64, u64)]| {
        emi.btrfs_drop_extent_map_range(start, start + total, false);
        if pieces.is_empty() {
            return;
        }
        let r = fs.write_op_rsv(MetaRsv::WRITEBACK, |c| {
            for &(_, bytenr, got) in pieces {
                c.t.space.free_reserved(bytenr, got)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!("root {root} ino {ino}: giving reserved extents back: {e}");
        }
    };
    if let Err(e) = reserved {
        give_back(&pieces);
        return Err(e);
    }
    // Step 2: the checksums and the data I/O, no lock held.
    let sums = if datasum {
        btrfs_csum_data(fs, data)
    } else {
        Vec::new()
    };
    for &(fstart, bytenr, got) in &pieces {
        let off = (fstart - start) as usize;
        if let Err(e) = fs
            .reader
            .write_logical_data(bytenr, &data.slices(off, got as usize))
        {
            tracing::error!(
                "root {root} ino {ino}: writing data at file offset {fstart} (logical {bytenr}, \
                 {got} bytes) failed: {e}"
            );
            give_back(&pieces);
            return Err(e.into());
        }
    }
    // Step 3: btrfs_finish_ordered_io.
    let done = fs.write_op_rsv(MetaRsv::WRITEBACK, |c| {
        let transid = c.transid();
        let mut ii = c.read_inode(root, ino)?;
        let csize = fs.reader.csum_type.size();
        for &(fstart, bytenr, got) in &pieces {
            let first = ((fstart - start) / ss) as usize * csize;
            c.t.space.use_reserved(bytenr, got)?;
            if datasum {
                let n = (got / ss) as usize * csize;
                btrfs_csum_file_blocks(c, bytenr, &sums[first..first + n])?;
            }
            let drop = btrfs_drop_extents(c, root, ino, fstart, fstart + got)?;
            let fe = FileExtentItem {
                generation: transid,
                ram_bytes: got,
                compression: 0,
                encryption: 0,
                other_encoding: 0,
                extent_type: FILE_EXTENT_REG,
                disk_bytenr: bytenr,
                disk_num_bytes: got,
                offset: 0,
                num_bytes: got,
                inline_data: Vec::new(),
            };
            c.insert(
                root,
                Key::new(ino, item::EXTENT_DATA, fstart),
                &fe.to_bytes(),
            )?;
            c.t.refs.add(
                bytenr,
                got,
                RefKind::Data {
                    root,
                    ino,
                    offset: fstart,
                },
                1,
            );
            ii.nbytes = ii.nbytes.saturating_sub(drop.bytes_found) + got;
            // Ordered extent completion: the map gets its generation and is unpinned.
            emi.btrfs_unpin_extent_cache(fstart, got, transid)
                .map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: unpin: {e:?}")))?;
        }
        finish_inode(c, root, ino, &mut ii, size, mtime)?;
        new_delalloc.fetch_sub(new_bytes, Ordering::SeqCst);
        Ok(())
    });
    // Failed before changing anything (the inode was evicted meanwhile): nothing refers to
    // the extents. After a change, the transaction was aborted instead.
    if done.is_err() && !fs.is_readonly() {
        give_back(&pieces);
    }
    done
}

fn finish_inode(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    ii: &mut InodeItem,
    size: u64,
    mtime: Option<ubtrfs_format::items::Timespec>,
) -> Result<()> {
    ii.size = size;
    ii.transid = c.transid();
    if let Some(m) = mtime {
        ii.mtime = m;
        ii.ctime = m;
    }
    ii.sequence += 1;
    c.write_inode(root, ino, ii)
}

// ---------------------------------------------------------------------------------------------
// NOCOW writeback: in-place writes into preallocated extents and into the regular extents of a
// NODATACOW file (the kernel's inode.c `should_nocow`, `run_delalloc_nocow`,
// `can_nocow_file_extent`, `can_nocow_extent`, `nocow_one_range`, `fallback_to_cow`, the
// NOCOW/PREALLOC branches of `btrfs_finish_one_ordered`; file.c `btrfs_mark_extent_written`;
// extent-tree.c `btrfs_cross_ref_exist`).
//
// # Definitions
// - A *NOCOW piece* of a writeback run is a range written into an extent the file already
//   has: a PREALLOC extent (ordered type `BTRFS_ORDERED_PREALLOC`) or, in a NODATACOW file,
//   a regular one (`BTRFS_ORDERED_NOCOW`). Everything else in the run is a *COW piece*,
//   written by `write_run` as a new extent, never inline (`fallback_to_cow`).
// - `can_nocow_file_extent` allows a NOCOW piece only for an uncompressed, unencrypted,
//   non-hole extent that is PREALLOC or belongs to a NODATACOW file, created after the
//   subvolume's `last_snapshot` (unless `strict`), referenced by this (root, inode, offset)
//   alone (`btrfs_cross_ref_exist`: extent item and pending delayed refs), and without
//   checksums over the written part. Its block group must accept NOCOW writers
//   (`btrfs_inc_nocow_writers`: not read-only; ubtrfs never turns a block group read-only,
//   having no scrub or balance, so only a missing group refuses).
//
// # Invariants
// - A NOCOW piece allocates nothing and consumes no data space: its data reservation is
//   released when its write starts (`nocow_one_range`: `EXTENT_CLEAR_DATA_RESV`), nbytes does
//   not change.
// - PREALLOC piece: a PINNED extent map of the written part (not PREALLOC, same disk_bytenr,
//   offset into the extent) replaces the PREALLOC map (`btrfs_create_io_em`) and goes on the
//   modified list; at completion `btrfs_mark_extent_written` splits the prealloc item into
//   written (REG) and still preallocated parts, each split taking one more data ref of
//   (root, inode, file offset - extent offset); the checksums of the written part are added
//   (unless NODATASUM); the map is unpinned with the transid.
// - Regular NOCOW piece: no extent map is created, no item changes, no checksums; completion
//   only updates the inode item (`btrfs_update_inode_fallback`).
// - Data of a NOCOW piece reaches the disk before its completion changes anything; a failed
//   data write leaves the items as they were, drops the piece's extent maps (NOCOW too, as
//   the kernel's `btrfs_finish_one_ordered` error path does) and keeps the sectors dirty.
// ---------------------------------------------------------------------------------------------

/// `struct btrfs_file_extent`: the extent a NOCOW write goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NocowExtent {
    pub disk_bytenr: u64,
    pub disk_num_bytes: u64,
    pub ram_bytes: u64,
    /// Offset into the extent of the first byte written.
    pub offset: u64,
    /// Bytes writable in place from the start of the request.
    pub num_bytes: u64,
}

impl NocowExtent {
    /// Logical address of the first byte written.
    pub fn io_start(&self) -> u64 {
        self.disk_bytenr + self.offset
    }
}

/// One piece of a writeback run as `run_delalloc_nocow` cuts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelallocPiece {
    /// `fallback_to_cow`: a new extent for `[start, start+len)`.
    Cow { start: u64, len: u64 },
    /// `nocow_one_range`: in place into `ext` from `start` (`ext.num_bytes` bytes);
    /// `prealloc` tells a PREALLOC ordered extent from a NOCOW one.
    Nocow {
        start: u64,
        ext: NocowExtent,
        prealloc: bool,
    },
}

/// `should_nocow`: writeback of a NODATACOW or PREALLOC-flagged inode goes through
/// `run_delalloc_nocow`. (Its defrag exception cannot arise: ubtrfs has no defrag.)
pub fn should_nocow(inode_flags_: u64) -> bool {
    inode_flags_ & (inode_flags::NODATACOW | inode_flags::PREALLOC) != 0
}

/// `btrfs_file_extent_end`.
fn fe_end(key: &Key, fe: &FileExtentItem, ss: u64) -> Result<u64> {
    let end = if fe.extent_type == FILE_EXTENT_INLINE {
        key.offset
            .checked_add(fe.ram_bytes)
            .map(|e| e.div_ceil(ss).saturating_mul(ss))
    } else {
        key.offset.checked_add(fe.num_bytes)
    };
    end.ok_or_else(|| FsError::corrupt(format!("{key}: file extent ends past 2^64")))
}

/// Whether the csum tree of the running transaction has a checksum in `[start, start+len)`
/// (`btrfs_lookup_csums_list` as `can_nocow_file_extent` uses it: any checksum forces COW).
fn csum_exist_in_range(c: &WriteCtx<'_>, start: u64, len: u64) -> Result<bool> {
    if c.t.root(objectid::CSUM_TREE).is_none() {
        return Ok(false);
    }
    let ss = u64::from(c.fs.sectorsize());
    let csize = c.fs.reader.csum_type.size() as u64;
    let is_csum = |k: &Key| k.objectid == objectid::EXTENT_CSUM && k.item_type == item::EXTENT_CSUM;
    let key = Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, start);
    if let Some((k, d)) = c.lookup_le(objectid::CSUM_TREE, &key)? {
        let covered = (d.len() as u64 / csize).saturating_mul(ss);
        if is_csum(&k) && k.offset.saturating_add(covered) > start {
            return Ok(true);
        }
    }
    let next = c.items(objectid::CSUM_TREE, key, 1, is_csum)?;
    Ok(next
        .first()
        .is_some_and(|(k, _)| k.offset < start.saturating_add(len)))
}

/// `can_nocow_file_extent`: whether `[start, end)` of `ino` can be written in place into the
/// extent of item (`key`, `fe`), which covers `start`; the extent (clamped to `end`) if so.
/// `strict` skips the `last_snapshot` heuristic (the kernel's direct-I/O and nocow-lock
/// callers pass false, as writeback does).
#[allow(clippy::too_many_arguments)]
pub fn can_nocow_file_extent(
    c: &WriteCtx<'_>,
    root: u64,
    ino: u64,
    inode_flags_: u64,
    key: &Key,
    fe: &FileExtentItem,
    start: u64,
    end: u64,
    strict: bool,
) -> Result<Option<NocowExtent>> {
    let ss = u64::from(c.fs.sectorsize());
    if fe.extent_type == FILE_EXTENT_INLINE {
        return Ok(None);
    }
    if inode_flags_ & inode_flags::NODATACOW == 0 && fe.extent_type == FILE_EXTENT_REG {
        return Ok(None);
    }
    let last_snapshot = c.fs.root(root)?.item.last_snapshot;
    if !strict && fe.generation <= last_snapshot {
        return Ok(None);
    }
    if fe.disk_bytenr == 0 {
        return Ok(None);
    }
    if fe.compression != 0 || fe.encryption != 0 || fe.other_encoding != 0 {
        return Ok(None);
    }
    let extent_end = fe_end(key, fe, ss)?;
    let ref_offset = key.offset.wrapping_sub(fe.offset);
    let extent_root = c.root_ptr(objectid::EXTENT_TREE)?;
    if ubtrfs_ctree::extent_tree::btrfs_cross_ref_exist(
        &c.fs.reader,
        &extent_root,
        &c.t.refs,
        root,
        ino,
        ref_offset,
        fe.disk_bytenr,
        strict,
        last_snapshot,
    )? {
        return Ok(None);
    }
    // (`snapshot_force_cow`: ubtrfs creates no snapshots, so none is ever pending.)
    let num_bytes = end.min(extent_end).checked_sub(start).ok_or_else(|| {
        FsError::corrupt(format!(
            "root {root} {key}: item does not cover offset {start}"
        ))
    })?;
    let offset = fe.offset + (start - key.offset);
    let ext = NocowExtent {
        disk_bytenr: fe.disk_bytenr,
        disk_num_bytes: fe.disk_num_bytes,
        ram_bytes: fe.ram_bytes,
        offset,
        num_bytes,
    };
    if offset
        .checked_add(num_bytes)
        .is_none_or(|e| e > fe.disk_num_bytes)
    {
        return Err(FsError::corrupt(format!(
            "root {root} {key}: offset {} + {} bytes past the extent's {} bytes",
            fe.offset, fe.num_bytes, fe.disk_num_bytes
        )));
    }
    if csum_exist_in_range(c, ext.io_start(), num_bytes)? {
        return Ok(None);
    }
    Ok(Some(ext))
}

/// `btrfs_inc_nocow_writers`: the data block group holding `bytenr` takes NOCOW writers
/// unless it is read-only. ubtrfs never makes a block group read-only (no scrub, balance or
/// relocation), so only a missing group (corruption) refuses; with no read-only transition
/// there is nobody to wait for the writers either, so they are not counted.
fn btrfs_inc_nocow_writers(c: &WriteCtx<'_>, bytenr: u64) -> bool {
    c.t.space
        .groups
        .range(..=bytenr)
        .next_back()
        .is_some_and(|(_, bg)| bg.is_data() && bytenr < bg.start + bg.length)
}

/// The decisions of `run_delalloc_nocow` for the dirty range `[start, end)` (sector aligned)
/// of `ino`, on the items of the running transaction: NOCOW pieces where
/// `can_nocow_file_extent` and `btrfs_inc_nocow_writers` allow, COW pieces for the rest
/// (holes, items it refuses, and the range past the last item).
pub fn run_delalloc_nocow(
    c: &WriteCtx<'_>,
    root: u64,
    ino: u64,
    inode_flags_: u64,
    start: u64,
    end: u64,
) -> Result<Vec<DelallocPiece>> {
    let ss = u64::from(c.fs.sectorsize());
    let mut out = Vec::new();
    let mut cur = start;
    let mut cow_start: Option<u64> = None;
    let ours = |k: &Key| k.objectid == ino && k.item_type == item::EXTENT_DATA;
    // The item holding `start` may begin before it (the kernel's check_prev).
    let mut next_key = match c.lookup_le(root, &Key::new(ino, item::EXTENT_DATA, start))? {
        Some((k, _)) if ours(&k) => k.offset,
        _ => start,
    };
    while cur < end {
        let found = c.items(root, Key::new(ino, item::EXTENT_DATA, next_key), 1, ours)?;
        let Some((key, data)) = found.into_iter().next() else {
            break;
        };
        if key.offset >= end {
            break;
        }
        if key.offset > cur {
            cow_start.get_or_insert(cur);
            cur = key.offset;
        }
        let fe = FileExtentItem::parse(&data)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        if fe.extent_type > FILE_EXTENT_PREALLOC {
            return Err(FsError::corrupt(format!(
                "root {root} {key}: file extent type {}",
                fe.extent_type
            )));
        }
        let extent_end = fe_end(&key, &fe, ss)?;
        match key.offset.checked_add(1) {
            Some(n) => next_key = n,
            None => break,
        }
        if extent_end <= cur {
            continue;
        }
        let nocow =
            match can_nocow_file_extent(c, root, ino, inode_flags_, &key, &fe, cur, end, false)? {
                Some(ext) if btrfs_inc_nocow_writers(c, ext.io_start()) => Some(ext),
                _ => None,
            };
        match nocow {
            Some(ext) => {
                if let Some(cs) = cow_start.take() {
                    out.push(DelallocPiece::Cow {
                        start: cs,
                        len: cur - cs,
                    });
                }
                out.push(DelallocPiece::Nocow {
                    start: cur,
                    ext,
                    prealloc: fe.extent_type == FILE_EXTENT_PREALLOC,
                });
            }
            None => {
                cow_start.get_or_insert(cur);
            }
        }
        cur = extent_end;
    }
    if cur < end && cow_start.is_none() {
        cow_start = Some(cur);
    }
    if let Some(cs) = cow_start {
        out.push(DelallocPiece::Cow {
            start: cs,
            len: end - cs,
        });
    }
    Ok(out)
}

/// `can_nocow_extent`: whether a write at `offset` of up to `len` bytes can go in place (the
/// check of the buffered write's `btrfs_check_nocow_lock` when data space is short, and of
/// direct I/O): the extent and whether it is preallocated, with `num_bytes` the writable
/// length. Errors of the search count as "no" (as in the kernel). Dirty data over a
/// preallocated range of a file without NODATACOW gives [`FsError::Again`] (the kernel's
/// -EAGAIN: the write must not overtake the buffered data); a direct-I/O caller takes that
/// as "no", as `btrfs_get_blocks_direct_write` does.
pub fn can_nocow_extent(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    len: u64,
    strict: bool,
) -> Result<Option<(NocowExtent, bool)>> {
    let ss = u64::from(fs.sectorsize());
    let found = fs.write_op_rsv(crate::space_info::MetaRsv::NONE, |c| {
        let ii = c.read_inode(root, ino)?;
        let Some((key, data)) = c.lookup_le(root, &Key::new(ino, item::EXTENT_DATA, offset))?
        else {
            return Ok(None);
        };
        if key.objectid != ino || key.item_type != item::EXTENT_DATA || key.offset > offset {
            return Ok(None);
        }
        let fe = FileExtentItem::parse(&data)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        if fe_end(&key, &fe, ss)? <= offset {
            return Ok(None);
        }
        let end = offset.saturating_add(len);
        Ok(
            can_nocow_file_extent(c, root, ino, ii.flags, &key, &fe, offset, end, strict)?
                .filter(|e| btrfs_inc_nocow_writers(c, e.io_start()))
                .map(|e| (e, fe.extent_type == FILE_EXTENT_PREALLOC, ii.flags)),
        )
    });
    let Ok(Some((ext, prealloc, iflags))) = found else {
        return Ok(None);
    };
    if iflags & inode_flags::NODATACOW == 0 && prealloc {
        if let Some(d) = dirty_inode(fs, root, ino) {
            let first = offset / ss;
            let last = (offset + ext.num_bytes).div_ceil(ss);
            if d.lock().sectors.range(first..last).next().is_some() {
                return Err(FsError::Again);
            }
        }
    }
    Ok(Some((ext, prealloc)))
}

/// The file extent items of `ino` next to `key` in the same leaf (`extent_mergeable` looks
/// no further).
fn leaf_neighbours(
    c: &WriteCtx<'_>,
    root: u64,
    ino: u64,
    key: &Key,
) -> Result<[Option<(Key, FileExtentItem)>; 2]> {
    let r = c.root_ptr(root)?;
    let (path, found) = ubtrfs_ctree::Path::search(&c.fs.reader, &r, key)?;
    if !found {
        return Err(FsError::corrupt(format!(
            "root {root} {key}: file extent item vanished"
        )));
    }
    let (leaf, slot) = path.leaf();
    let get = |s: usize| -> Result<Option<(Key, FileExtentItem)>> {
        let k = leaf.item_key(s).map_err(|e| {
            FsError::corrupt(format!("root {root} leaf {}: {e}", leaf.header.bytenr))
        })?;
        if k.objectid != ino || k.item_type != item::EXTENT_DATA {
            return Ok(None);
        }
        let d = leaf
            .item_data(s)
            .map_err(|e| FsError::corrupt(format!("root {root} {k}: {e}")))?;
        let fe = FileExtentItem::parse(d)
            .map_err(|e| FsError::corrupt(format!("root {root} {k}: {e}")))?;
        Ok(Some((k, fe)))
    };
    let prev = if slot > 0 { get(slot - 1)? } else { None };
    let next = if slot + 1 < leaf.nritems() {
        get(slot + 1)?
    } else {
        None
    };
    Ok([prev, next])
}

/// `btrfs_mark_extent_written`: `[start, end)` of the PREALLOC item holding `start` was
/// written: that part becomes REG. The item is split into two or three (written, still
/// preallocated), each new item taking one more data ref of (root, ino, file offset - extent
/// offset); a written part next to a REG item of the same extent (same leaf, contiguous,
/// consistent offset) merges into it instead, giving a ref back. Every item touched gets the
/// transid as generation, the still-preallocated parts included.
pub fn btrfs_mark_extent_written(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    start: u64,
    end: u64,
) -> Result<()> {
    let transid = c.transid();
    let bad = |what: String| FsError::corrupt(format!("root {root} ino {ino}: {what}"));
    let (key, mut fe) = match c.lookup_le(root, &Key::new(ino, item::EXTENT_DATA, start))? {
        Some((k, d)) if k.objectid == ino && k.item_type == item::EXTENT_DATA => {
            let fe = FileExtentItem::parse(&d).map_err(|e| bad(format!("{k}: {e}")))?;
            (k, fe)
        }
        _ => {
            return Err(bad(format!(
                "no file extent item at {start} to mark written"
            )))
        }
    };
    if fe.extent_type != FILE_EXTENT_PREALLOC {
        return Err(bad(format!(
            "{key}: marking [{start}, {end}) written in a {} extent",
            extent_type_name(fe.extent_type)
        )));
    }
    let mut extent_end = key
        .offset
        .checked_add(fe.num_bytes)
        .ok_or_else(|| bad(format!("{key}: extent end overflows")))?;
    if key.offset > start || extent_end < end || start >= end {
        return Err(bad(format!(
            "{key}: [{start}, {end}) is not inside the prealloc extent ending at {extent_end}"
        )));
    }
    let bytenr = fe.disk_bytenr;
    let num_bytes = fe.disk_num_bytes;
    let orig_offset = key
        .offset
        .checked_sub(fe.offset)
        .ok_or_else(|| bad(format!("{key}: extent offset {} before 0", fe.offset)))?;
    let data_ref = RefKind::Data {
        root,
        ino,
        offset: orig_offset,
    };
    let mergeable = |k: &Key, f: &FileExtentItem| {
        f.extent_type == FILE_EXTENT_REG
            && f.disk_bytenr == bytenr
            && k.offset.checked_sub(orig_offset) == Some(f.offset)
            && f.compression == 0
            && f.encryption == 0
            && f.other_encoding == 0
    };
    let fe_key = |off: u64| Key::new(ino, item::EXTENT_DATA, off);
    let [prev, next] = leaf_neighbours(c, root, ino, &key)?;
    // Written at the front, next to a written part before it: that one grows over it.
    if start == key.offset && end < extent_end {
        if let Some((pk, mut pf)) = prev.filter(|(pk, pf)| {
            mergeable(pk, pf) && pk.offset.checked_add(pf.num_bytes) == Some(start)
        }) {
            pf.generation = transid;
            pf.num_bytes = end - pk.offset;
            c.update(root, &pk, &pf.to_bytes())?;
            c.delete(root, &key)?;
            fe.generation = transid;
            fe.num_bytes = extent_end - end;
            fe.offset = end - orig_offset;
            c.insert(root, fe_key(end), &fe.to_bytes())?;
            return Ok(());
        }
    }
    // Written at the back, next to a written part after it: that one grows over it.
    if start > key.offset && end == extent_end {
        if let Some((nk, mut nf)) = next.filter(|(nk, nf)| mergeable(nk, nf) && nk.offset == end) {
            let next_end = nk
                .offset
                .checked_add(nf.num_bytes)
                .ok_or_else(|| bad(format!("{nk}: extent end overflows")))?;
            fe.num_bytes = start - key.offset;
            fe.generation = transid;
            c.update(root, &key, &fe.to_bytes())?;
            c.delete(root, &nk)?;
            nf.generation = transid;
            nf.num_bytes = next_end - start;
            nf.offset = start - orig_offset;
            c.insert(root, fe_key(start), &nf.to_bytes())?;
            return Ok(());
        }
    }
    // Split off what stays preallocated (btrfs_duplicate_item), one data ref per new item.
    let mut cur = key.offset;
    while start > cur || end < extent_end {
        let split = if cur == start { end } else { start };
        let mut left = fe.clone();
        left.generation = transid;
        left.num_bytes = split - cur;
        left.offset = cur - orig_offset;
        let mut right = fe.clone();
        right.generation = transid;
        right.offset = split - orig_offset;
        right.num_bytes = extent_end - split;
        c.update(root, &fe_key(cur), &left.to_bytes())?;
        c.insert(root, fe_key(split), &right.to_bytes())?;
        c.t.refs.add(bytenr, num_bytes, data_ref, 1);
        if split == start {
            cur = start;
            fe = right;
        } else {
            extent_end = end;
            fe = left;
        }
    }
    // The written item is [start, end) now; merge it with written neighbours of the extent.
    let [prev, next] = leaf_neighbours(c, root, ino, &fe_key(start))?;
    let next = next.filter(|(nk, nf)| mergeable(nk, nf) && nk.offset == end);
    let prev = prev
        .filter(|(pk, pf)| mergeable(pk, pf) && pk.offset.checked_add(pf.num_bytes) == Some(start));
    if let Some((nk, nf)) = &next {
        extent_end = nk
            .offset
            .checked_add(nf.num_bytes)
            .ok_or_else(|| bad(format!("{nk}: extent end overflows")))?;
        c.delete(root, nk)?;
        c.t.refs.add(bytenr, num_bytes, data_ref, -1);
    }
    match prev {
        Some((pk, mut pf)) => {
            c.delete(root, &fe_key(start))?;
            c.t.refs.add(bytenr, num_bytes, data_ref, -1);
            pf.extent_type = FILE_EXTENT_REG;
            pf.generation = transid;
            pf.num_bytes = extent_end - pk.offset;
            c.update(root, &pk, &pf.to_bytes())?;
        }
        None => {
            fe.extent_type = FILE_EXTENT_REG;
            fe.generation = transid;
            fe.num_bytes = extent_end - start;
            c.update(root, &fe_key(start), &fe.to_bytes())?;
        }
    }
    Ok(())
}

/// Write one NOCOW piece of a writeback run (`nocow_one_range`, the bio, and
/// `btrfs_finish_one_ordered` for a NOCOW or PREALLOC ordered extent). `data` is the piece's
/// bytes (`ext.num_bytes` of them), `reserved` how many of them hold a data reservation (not
/// NORESERVE), released here. The caller serializes writebacks of the inode.
#[allow(clippy::too_many_arguments)]
fn write_nocow_piece(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    emi: &ubtrfs_extent_map::BtrfsInode,
    start: u64,
    ext: &NocowExtent,
    prealloc: bool,
    data: &[u8],
    reserved: u64,
    size: u64,
    mtime: Option<ubtrfs_format::items::Timespec>,
    rsv: &crate::space_info::InodeRsv,
) -> Result<()> {
    use crate::space_info::MetaRsv;
    let len = ext.num_bytes;
    debug_assert_eq!(data.len() as u64, len);
    // nocow_one_range: the data reservation released (nothing is allocated, so no tree lock
    // is needed: the published free space does not change), the io extent map of a PREALLOC
    // write put in place (readers still get these sectors from the dirty buffer).
    rsv.release(reserved);
    if prealloc {
        let em = ExtentMap {
            start,
            len,
            disk_bytenr: ext.disk_bytenr,
            disk_num_bytes: ext.disk_num_bytes,
            offset: ext.offset,
            ram_bytes: ext.ram_bytes,
            generation: u64::MAX,
            flags: ubtrfs_extent_map::flags::PINNED,
        };
        emi.btrfs_replace_extent_map_range(em, true)
            .map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: extent map: {e:?}")))?;
    }
    // The data, in place, no lock held.
    if let Err(e) = fs.reader.write_logical(ext.io_start(), data) {
        tracing::error!(
            "root {root} ino {ino}: NOCOW write at file offset {start} (logical {}, {len} bytes) \
             failed: {e}",
            ext.io_start()
        );
        emi.btrfs_drop_extent_map_range(start, start + len - 1, false);
        return Err(e.into());
    }
    // btrfs_finish_one_ordered.
    let done = fs.write_op_rsv(MetaRsv::WRITEBACK, |c| {
        let transid = c.transid();
        let mut ii = c.read_inode(root, ino)?;
        if prealloc {
            btrfs_mark_extent_written(c, root, ino, start, start + len)?;
            emi.btrfs_unpin_extent_cache(start, len, transid)
                .map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: unpin: {e:?}")))?;
            if ii.flags & inode_flags::NODATASUM == 0 {
                btrfs_csum_file_blocks(c, ext.io_start(), &btrfs_csum_sectors(fs, &[data]))?;
            }
        }
        finish_inode(c, root, ino, &mut ii, size, mtime)
    });
    match &done {
        Ok(()) => {
            let ctr = if prealloc {
                &fs.counters.prealloc_written_bytes
            } else {
                &fs.counters.nocow_bytes
            };
            ctr.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        }
        Err(_) => emi.btrfs_drop_extent_map_range(start, start + len - 1, false),
    }
    done
}

/// Extent type names for messages.
pub fn extent_type_name(t: u8) -> &'static str {
    match t {
        FILE_EXTENT_INLINE => "inline",
        FILE_EXTENT_REG => "regular",
        FILE_EXTENT_PREALLOC => "prealloc",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// fallocate, hole punching, range zeroing, SEEK_DATA/SEEK_HOLE and copy_file_range (the
// kernel's file.c `btrfs_fallocate`, `btrfs_punch_hole`, `btrfs_zero_range`,
// `find_desired_extent`, inode.c `btrfs_truncate_block`, `btrfs_cont_expand`,
// `__btrfs_prealloc_file_range`).
//
// # Invariants
// - A PREALLOC item references a whole fresh extent (offset 0, num_bytes = disk_num_bytes =
//   ram_bytes), has no checksums, counts in nbytes and holds one data ref (root, ino, file
//   offset); its extent map carries PREALLOC and the transid and goes on the modified list.
// - Partial sectors are never zeroed directly on disk: the sector is rewritten through the
//   buffered write path, as `btrfs_truncate_block` dirties the page (its writeback then
//   decides COW or NOCOW like any other).
// - Every operation starts by writing back the inode's dirty data and leaves the inode clean
//   (dirty sectors it creates are written back before it returns), so that the in-memory size
//   and the inode item never disagree.
// ---------------------------------------------------------------------------------------------

/// `fallocate(2)` modes.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
/// `lseek(2)` whence values handled by [`btrfs_llseek_data_hole`].
pub const SEEK_DATA: u32 = 3;
pub const SEEK_HOLE: u32 = 4;
/// Preallocated extents are reserved in pieces of at most this (`__btrfs_prealloc_file_range`).
const MAX_PREALLOC_EXTENT: u64 = 256 << 20;

fn no_holes(fs: &FsInfo) -> bool {
    fs.sb.incompat_flags & ubtrfs_format::super_block::incompat::NO_HOLES != 0
}

/// The in-memory i_size of `ino` (dirty data included).
fn current_size(fs: &FsInfo, root: u64, ino: u64) -> Result<(InodeItem, u64)> {
    let ii = crate::inode::read_inode(fs, root, ino)?;
    let size = dirty_inode(fs, root, ino)
        .map(|d| d.lock().size)
        .unwrap_or(ii.size);
    Ok((ii, size))
}

/// `btrfs_truncate_block`: zero part of the sector holding `from` — from `from` to the end of
/// the sector (`len` 0), `len` bytes from `from`, or with `front` the bytes before `from` — by
/// rewriting the sector's bytes up to EOF through [`btrfs_buffered_write`]. Bytes of the sector
/// after EOF become zeros too. Returns whether a sector was dirtied (no-op when aligned or
/// beyond EOF). The inode's in-memory mtime is left as it was. The caller holds the inode lock.
pub fn btrfs_truncate_block(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    from: u64,
    len: u64,
    front: bool,
) -> Result<bool> {
    let ss = u64::from(fs.sectorsize());
    let off = from % ss;
    if off == 0 && (len == 0 || len.is_multiple_of(ss)) {
        return Ok(false);
    }
    let s = from - off;
    let (ii, size) = current_size(fs, root, ino)?;
    if s >= size {
        return Ok(false);
    }
    let n = (size - s).min(ss) as usize;
    let emi = fs.ems.inode(root, ino);
    let mut buf = crate::file::read(fs, root, ino, &ii, &emi, s, n as u32)?;
    buf.resize(n, 0);
    let off = off as usize;
    if front {
        buf[..off.min(n)].fill(0);
    } else {
        let end = if len == 0 {
            ss as usize
        } else {
            (off as u64 + len).min(ss) as usize
        };
        if off < n {
            buf[off..end.min(n)].fill(0);
        }
    }
    let prev_mtime = dirty_inode(fs, root, ino).and_then(|d| d.lock().mtime);
    buffered_write(fs, root, ino, s, &buf, 0, false)?;
    if let Some(d) = dirty_inode(fs, root, ino) {
        d.lock().mtime = prev_mtime;
    }
    Ok(true)
}

/// Whether the sector holding `size` (unaligned) has non-zero bytes after `size` on disk, in
/// a regular extent (stale data a later extension would expose).
pub fn tail_is_stale(fs: &FsInfo, root: u64, ino: u64, size: u64) -> Result<bool> {
    let ss = u64::from(fs.sectorsize());
    let s = size - size % ss;
    let ii = crate::inode::read_inode(fs, root, ino)?;
    let emi = fs.ems.inode(root, ino);
    let em = crate::file::btrfs_get_extent(fs, root, ino, &emi, s, ss)?;
    if !em.is_regular() || em.flags & ubtrfs_extent_map::flags::PREALLOC != 0 {
        return Ok(false);
    }
    let raw_view = InodeItem { size: s + ss, ..ii };
    let raw = crate::file::read_disk(fs, root, ino, &raw_view, &emi, s, ss as u32)?;
    Ok(raw
        .get((size - s) as usize..)
        .is_some_and(|t| t.iter().any(|&b| b != 0)))
}

/// Write back, then zero the partial sector at `from` like `btrfs_truncate_block` and write
/// that back too, keeping the inode's times (the caller sets them).
fn truncate_block_clean(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    from: u64,
    len: u64,
    front: bool,
) -> Result<bool> {
    let done = btrfs_truncate_block(fs, root, ino, from, len, front)?;
    if done {
        crate::inode::forget_dirty_mtime(fs, root, ino);
        btrfs_writeback(fs, root, ino)?;
    }
    Ok(done)
}

/// A file extent item describing a hole (`btrfs_insert_hole_extent`), for filesystems
/// without NO_HOLES.
fn insert_hole_item(c: &mut WriteCtx<'_>, root: u64, ino: u64, start: u64, len: u64) -> Result<()> {
    let fe = FileExtentItem {
        generation: c.transid(),
        ram_bytes: len,
        compression: 0,
        encryption: 0,
        other_encoding: 0,
        extent_type: FILE_EXTENT_REG,
        disk_bytenr: 0,
        disk_num_bytes: 0,
        offset: 0,
        num_bytes: len,
        inline_data: Vec::new(),
    };
    c.insert(
        root,
        Key::new(ino, item::EXTENT_DATA, start),
        &fe.to_bytes(),
    )
}

/// The true holes (not prealloc, not data) of `[start, end)` by extent map, merged.
fn hole_ranges(fs: &FsInfo, root: u64, ino: u64, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    let emi = fs.ems.inode(root, ino);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut cur = start;
    while cur < end {
        let em = crate::file::btrfs_get_extent(fs, root, ino, &emi, cur, end - cur)?;
        let piece_end = em.end().min(end);
        if piece_end <= cur {
            return Err(FsError::corrupt(format!(
                "root {root} ino {ino}: extent map does not cover {cur}"
            )));
        }
        if em.disk_bytenr == ubtrfs_extent_map::EXTENT_MAP_HOLE {
            match out.last_mut() {
                Some((s, l)) if *s + *l == cur => *l += piece_end - cur,
                _ => out.push((cur, piece_end - cur)),
            }
        }
        cur = piece_end;
    }
    Ok(out)
}

/// `btrfs_cont_expand` from `old_size`: zero the tail of the old last sector; the holes up to
/// `new_size` (sector-rounded) get hole items when the filesystem lacks NO_HOLES (in the
/// write operation `finish` runs in, which usually sets the new size) and hole extent maps on
/// the modified list.
fn btrfs_cont_expand(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    old_size: u64,
    new_size: u64,
    finish: impl FnOnce(&mut WriteCtx<'_>) -> Result<()>,
) -> Result<()> {
    let ss = u64::from(fs.sectorsize());
    truncate_block_clean(fs, root, ino, old_size, 0, false)?;
    let hole_start = old_size.div_ceil(ss) * ss;
    let block_end = new_size.div_ceil(ss) * ss;
    let holes = if block_end > hole_start {
        hole_ranges(fs, root, ino, hole_start, block_end)?
    } else {
        Vec::new()
    };
    fs.write_op(|c| {
        if !no_holes(c.fs) {
            for &(s, l) in &holes {
                let drop = btrfs_drop_extents(c, root, ino, s, s + l)?;
                insert_hole_item(c, root, ino, s, l)?;
                if drop.bytes_found > 0 {
                    let mut ii = c.read_inode(root, ino)?;
                    ii.nbytes = ii.nbytes.saturating_sub(drop.bytes_found);
                    c.write_inode(root, ino, &ii)?;
                }
            }
        }
        finish(c)
    })?;
    let emi = fs.ems.inode(root, ino);
    let gen = fs.ems.generation();
    for (s, l) in holes {
        let _ = emi.btrfs_replace_extent_map_range(ExtentMap::hole(s, l, gen), true);
    }
    Ok(())
}

/// `btrfs_cont_expand` + the size update of an expanding truncate: the file grows from its
/// current size to `new_size` (mtime and ctime set to now).
pub fn btrfs_expand_to(fs: &FsInfo, root: u64, ino: u64, new_size: u64) -> Result<()> {
    btrfs_writeback(fs, root, ino)?;
    let ii = crate::inode::read_inode(fs, root, ino)?;
    let old = ii.size;
    btrfs_cont_expand(fs, root, ino, old, new_size, |c| {
        let mut ii = c.read_inode(root, ino)?;
        let now = crate::disk_io::now_timespec();
        ii.size = new_size;
        ii.mtime = now;
        ii.ctime = now;
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })?;
    truncate_dirty(fs, root, ino, new_size);
    Ok(())
}

/// `find_free_extent` for data as `write_run` does it: the whole length if any group (or a
/// new data chunk) has room, else the largest free piece of at least a sector.
fn alloc_data_extent(c: &mut WriteCtx<'_>, want: u64) -> Result<(u64, u64)> {
    use ubtrfs_ctree::block_group::AllocKind;
    let ss = u64::from(c.fs.sectorsize());
    if let Some(b) = c.t.space.alloc(AllocKind::Data, want) {
        return Ok((b, want));
    }
    if c.alloc_data_chunk()? {
        if let Some(b) = c.t.space.alloc(AllocKind::Data, want) {
            return Ok((b, want));
        }
    }
    c.t.space.alloc_data_upto(ss, want).ok_or(FsError::NoSpace)
}

/// `__btrfs_prealloc_file_range`: PREALLOC extents over `[start, start+num_bytes)` (sector
/// aligned), replacing whatever items the range had. Without KEEP_SIZE the size grows with
/// each piece up to `actual_len`. Sets the inode's PREALLOC flag and ctime. The data space
/// comes out of `rsv`, reserved by the caller for the whole range.
#[allow(clippy::too_many_arguments)]
fn btrfs_prealloc_file_range(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    mode: u32,
    start: u64,
    num_bytes: u64,
    actual_len: u64,
    rsv: &mut crate::space_info::DataRsv,
) -> Result<()> {
    let emi = fs.ems.inode(root, ino);
    let mut cur = start;
    let mut left = num_bytes;
    let mut last_alloc = u64::MAX;
    while left > 0 {
        let want = left.min(MAX_PREALLOC_EXTENT).min(last_alloc);
        let (bytenr, got, transid) = fs.write_op(|c| {
            let (bytenr, got) = alloc_data_extent(c, want)?;
            rsv.consume(got);
            let transid = c.transid();
            let drop = btrfs_drop_extents(c, root, ino, cur, cur + got)?;
            let fe = FileExtentItem {
                generation: transid,
                ram_bytes: got,
                compression: 0,
                encryption: 0,
                other_encoding: 0,
                extent_type: FILE_EXTENT_PREALLOC,
                disk_bytenr: bytenr,
                disk_num_bytes: got,
                offset: 0,
                num_bytes: got,
                inline_data: Vec::new(),
            };
            c.insert(root, Key::new(ino, item::EXTENT_DATA, cur), &fe.to_bytes())?;
            c.t.refs.add(
                bytenr,
                got,
                RefKind::Data {
                    root,
                    ino,
                    offset: cur,
                },
                1,
            );
            let mut ii = c.read_inode(root, ino)?;
            ii.nbytes = ii.nbytes.saturating_sub(drop.bytes_found) + got;
            ii.flags |= inode_flags::PREALLOC;
            ii.ctime = crate::disk_io::now_timespec();
            if mode & FALLOC_FL_KEEP_SIZE == 0 && actual_len > ii.size && cur + got > ii.size {
                ii.size = (cur + got).min(actual_len);
            }
            ii.transid = transid;
            ii.sequence += 1;
            c.write_inode(root, ino, &ii)?;
            Ok((bytenr, got, transid))
        })?;
        let em = ExtentMap {
            start: cur,
            len: got,
            disk_bytenr: bytenr,
            disk_num_bytes: got,
            offset: 0,
            ram_bytes: got,
            generation: transid,
            flags: ubtrfs_extent_map::flags::PREALLOC,
        };
        emi.btrfs_replace_extent_map_range(em, true)
            .map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: extent map: {e:?}")))?;
        cur += got;
        left -= got;
        last_alloc = got;
    }
    Ok(())
}

/// `btrfs_fallocate_update_isize`: without KEEP_SIZE, a size below `end` grows to it (ctime).
fn fallocate_update_isize(fs: &FsInfo, root: u64, ino: u64, end: u64, mode: u32) -> Result<()> {
    if mode & FALLOC_FL_KEEP_SIZE != 0 {
        return Ok(());
    }
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        if end <= ii.size {
            return Ok(());
        }
        ii.size = end;
        ii.ctime = crate::disk_io::now_timespec();
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })
}

/// `file_modified`: mtime and ctime to now.
fn file_modified(fs: &FsInfo, root: u64, ino: u64) -> Result<()> {
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        let now = crate::disk_io::now_timespec();
        ii.mtime = now;
        ii.ctime = now;
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })
}

/// `find_first_non_hole`: if `[start, start+len)` begins in a true hole, skip it: returns the
/// new (start, len) and true; else unchanged and false.
fn find_first_non_hole(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    start: u64,
    len: u64,
) -> Result<(u64, u64, bool)> {
    let ss = u64::from(fs.sectorsize());
    let emi = fs.ems.inode(root, ino);
    let em = crate::file::btrfs_get_extent(
        fs,
        root,
        ino,
        &emi,
        start - start % ss,
        len.div_ceil(ss) * ss,
    )?;
    if em.disk_bytenr != ubtrfs_extent_map::EXTENT_MAP_HOLE {
        return Ok((start, len, false));
    }
    let em_end = em.end();
    let new_len = (start + len).saturating_sub(em_end);
    Ok((em_end, new_len, true))
}

/// `btrfs_punch_hole` (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): partial sectors at the
/// edges are zeroed through the buffered write path, whole sectors lose their extents (hole
/// items only without NO_HOLES); nbytes shrinks by what was dropped; mtime and ctime change
/// unless the whole range already was a hole.
fn btrfs_punch_hole(fs: &FsInfo, root: u64, ino: u64, offset: u64, len: u64) -> Result<()> {
    let ss = u64::from(fs.sectorsize());
    let ii = crate::inode::read_inode(fs, root, ino)?;
    let ino_size = ii.size.div_ceil(ss) * ss;
    let orig_start = offset;
    let (mut offset, mut len, hole) = find_first_non_hole(fs, root, ino, offset, len)?;
    if hole && len == 0 {
        return Ok(());
    }
    let mut truncated = false;
    let mut lockstart = offset.div_ceil(ss) * ss;
    let lockend = (offset + len) - (offset + len) % ss; // exclusive
    let same_block = offset / ss == (offset + len - 1) / ss;
    if same_block && len < ss {
        if offset < ino_size {
            truncated |= truncate_block_clean(fs, root, ino, offset, len, false)?;
        }
        if truncated {
            file_modified(fs, root, ino)?;
        }
        return Ok(());
    }
    if offset < ino_size {
        truncated |= truncate_block_clean(fs, root, ino, offset, 0, false)?;
    }
    if offset == orig_start {
        // After zeroing the first partial sector, skip a hole that follows it.
        len = offset + len - lockstart;
        offset = lockstart;
        let (o, l, hole) = find_first_non_hole(fs, root, ino, offset, len)?;
        offset = o;
        len = l;
        if hole && len == 0 {
            if truncated {
                file_modified(fs, root, ino)?;
            }
            return Ok(());
        }
        lockstart = offset;
    }
    let tail_start = lockend;
    let tail_len = (offset + len).saturating_sub(tail_start);
    if tail_len > 0 {
        let (ts, tl, hole) = find_first_non_hole(fs, root, ino, tail_start, tail_len)?;
        if !hole && ts + tl < ino_size {
            truncated |= truncate_block_clean(fs, root, ino, ts + tl, 0, true)?;
        }
    }
    if lockend <= lockstart {
        if truncated {
            file_modified(fs, root, ino)?;
        }
        return Ok(());
    }
    // btrfs_replace_file_extents with no new extent: drop, then a hole item if needed.
    let transid = fs.write_op(|c| {
        let drop = btrfs_drop_extents(c, root, ino, lockstart, lockend)?;
        if !no_holes(c.fs) {
            insert_hole_item(c, root, ino, lockstart, lockend - lockstart)?;
        }
        let mut ii = c.read_inode(root, ino)?;
        let now = crate::disk_io::now_timespec();
        ii.nbytes = ii.nbytes.saturating_sub(drop.bytes_found);
        ii.mtime = now;
        ii.ctime = now;
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)?;
        Ok(c.transid())
    })?;
    let emi = fs.ems.inode(root, ino);
    let hole = ExtentMap::hole(lockstart, lockend - lockstart, transid);
    if emi.btrfs_replace_extent_map_range(hole, true).is_err() {
        emi.btrfs_drop_extent_map_range(lockstart, lockend - 1, false);
        emi.btrfs_set_inode_full_sync();
    }
    Ok(())
}

/// What the sector at `offset` holds (`btrfs_zero_range_check_range_boundary`).
#[derive(PartialEq, Eq)]
enum RangeBoundary {
    Written,
    Prealloc,
    Hole,
}

fn range_boundary(fs: &FsInfo, root: u64, ino: u64, offset: u64) -> Result<RangeBoundary> {
    let ss = u64::from(fs.sectorsize());
    let emi = fs.ems.inode(root, ino);
    let em = crate::file::btrfs_get_extent(fs, root, ino, &emi, offset - offset % ss, ss)?;
    Ok(if em.disk_bytenr == ubtrfs_extent_map::EXTENT_MAP_HOLE {
        RangeBoundary::Hole
    } else if em.flags & ubtrfs_extent_map::flags::PREALLOC != 0 {
        RangeBoundary::Prealloc
    } else {
        RangeBoundary::Written
    })
}

/// `btrfs_zero_range` (FALLOC_FL_ZERO_RANGE): the range reads as zeros afterwards and stays
/// allocated: whole sectors become PREALLOC extents (replacing what was there), partial
/// sectors of written extents are zeroed through the buffered write path; already
/// preallocated parts are left alone.
fn btrfs_zero_range(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    len: u64,
    mode: u32,
) -> Result<()> {
    let ss = u64::from(fs.sectorsize());
    let emi = fs.ems.inode(root, ino);
    let (mut offset, mut len) = (offset, len);
    let mut alloc_start = offset - offset % ss;
    let mut alloc_end = (offset + len).div_ceil(ss) * ss;
    let em =
        crate::file::btrfs_get_extent(fs, root, ino, &emi, alloc_start, alloc_end - alloc_start)?;
    if em.start <= alloc_start && em.flags & ubtrfs_extent_map::flags::PREALLOC != 0 {
        let em_end = em.end();
        if em_end >= offset + len {
            return fallocate_update_isize(fs, root, ino, offset + len, mode);
        }
        alloc_start = em_end;
        len = offset + len - alloc_start;
        offset = alloc_start;
    }
    if offset / ss == (offset + len - 1) / ss {
        let em = crate::file::btrfs_get_extent(fs, root, ino, &emi, offset - offset % ss, ss)?;
        if em.flags & ubtrfs_extent_map::flags::PREALLOC != 0 {
            return fallocate_update_isize(fs, root, ino, offset + len, mode);
        }
        if len < ss && em.disk_bytenr != ubtrfs_extent_map::EXTENT_MAP_HOLE {
            truncate_block_clean(fs, root, ino, offset, len, false)?;
            return fallocate_update_isize(fs, root, ino, offset + len, mode);
        }
        alloc_start = offset - offset % ss;
        alloc_end = alloc_start + ss;
    } else {
        alloc_start = offset.div_ceil(ss) * ss;
        alloc_end = (offset + len) - (offset + len) % ss;
        if offset % ss != 0 {
            match range_boundary(fs, root, ino, offset)? {
                RangeBoundary::Hole => alloc_start = offset - offset % ss,
                RangeBoundary::Written => {
                    truncate_block_clean(fs, root, ino, offset, 0, false)?;
                }
                RangeBoundary::Prealloc => {}
            }
        }
        if (offset + len) % ss != 0 {
            match range_boundary(fs, root, ino, offset + len)? {
                RangeBoundary::Hole => alloc_end = (offset + len).div_ceil(ss) * ss,
                RangeBoundary::Written => {
                    truncate_block_clean(fs, root, ino, offset + len, 0, true)?;
                }
                RangeBoundary::Prealloc => {}
            }
        }
    }
    if alloc_start < alloc_end {
        let mut rsv = fs.btrfs_reserve_data(alloc_end - alloc_start, 1)?;
        btrfs_prealloc_file_range(
            fs,
            root,
            ino,
            mode,
            alloc_start,
            alloc_end - alloc_start,
            offset + len,
            &mut rsv,
        )?;
    }
    fallocate_update_isize(fs, root, ino, offset + len, mode)
}

/// `btrfs_fallocate`: the default mode preallocates the holes of the range (PREALLOC extents,
/// nbytes grows, size grows to `offset + len` unless `FALLOC_FL_KEEP_SIZE`);
/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` deallocates; `FALLOC_FL_ZERO_RANGE` zeroes.
/// Other modes are refused as the kernel refuses them (EOPNOTSUPP). The caller holds the inode
/// lock.
pub fn btrfs_fallocate(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    mode: u32,
    offset: u64,
    len: u64,
) -> Result<()> {
    if fs.is_readonly() {
        return Err(FsError::ReadOnly);
    }
    if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
        return Err(FsError::Unsupported(format!("fallocate mode {mode:#x}")));
    }
    if mode & FALLOC_FL_PUNCH_HOLE != 0
        && (mode & FALLOC_FL_KEEP_SIZE == 0 || mode & FALLOC_FL_ZERO_RANGE != 0)
    {
        return Err(FsError::Unsupported(
            "punch hole needs KEEP_SIZE and excludes ZERO_RANGE".into(),
        ));
    }
    if len == 0 {
        return Err(FsError::Invalid("fallocate of zero bytes".into()));
    }
    let end = offset
        .checked_add(len)
        .filter(|e| *e <= i64::MAX as u64)
        .ok_or(FsError::FileTooBig)?;
    let ii = crate::inode::read_inode(fs, root, ino)?;
    match ii.mode & crate::inode::S_IFMT {
        crate::inode::S_IFREG => {}
        crate::inode::S_IFDIR => return Err(FsError::IsDir),
        _ => return Err(FsError::Unsupported("fallocate of a special file".into())),
    }
    let ss = u64::from(fs.sectorsize());
    // btrfs_wait_ordered_range: no dirty data in the way.
    btrfs_writeback(fs, root, ino)?;
    if mode & FALLOC_FL_PUNCH_HOLE != 0 {
        return btrfs_punch_hole(fs, root, ino, offset, len);
    }
    file_modified(fs, root, ino)?;
    let size = crate::inode::read_inode(fs, root, ino)?.size;
    let alloc_start = offset - offset % ss;
    let alloc_end = end.div_ceil(ss) * ss;
    if alloc_start > size {
        btrfs_cont_expand(fs, root, ino, size, alloc_start, |_| Ok(()))?;
    } else if end > size {
        truncate_block_clean(fs, root, ino, size, 0, false)?;
    }
    if mode & FALLOC_FL_ZERO_RANGE != 0 {
        return btrfs_zero_range(fs, root, ino, offset, len, mode);
    }
    // Ranges to preallocate: holes, and anything but prealloc beyond EOF.
    let emi = fs.ems.inode(root, ino);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut cur = alloc_start;
    while cur < alloc_end {
        let em = crate::file::btrfs_get_extent(fs, root, ino, &emi, cur, alloc_end - cur)?;
        let last = em.end().min(alloc_end).div_ceil(ss) * ss;
        if last <= cur {
            return Err(FsError::corrupt(format!(
                "root {root} ino {ino}: extent map does not cover {cur}"
            )));
        }
        if em.disk_bytenr == ubtrfs_extent_map::EXTENT_MAP_HOLE
            || (cur >= size && em.flags & ubtrfs_extent_map::flags::PREALLOC == 0)
        {
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == cur => *l += last - cur,
                _ => ranges.push((cur, last - cur)),
            }
        }
        cur = last;
    }
    // btrfs_check_data_free_space for every range before the first is allocated: ENOSPC
    // leaves the file as it was.
    let mut rsv = fs.btrfs_reserve_data(ranges.iter().map(|r| r.1).sum(), 1)?;
    for (s, l) in ranges {
        btrfs_prealloc_file_range(fs, root, ino, mode, s, l, end, &mut rsv)?;
    }
    fallocate_update_isize(fs, root, ino, end, mode)
}

/// `find_desired_extent` (lseek SEEK_DATA / SEEK_HOLE): data is any sector of a regular or
/// inline extent, or dirty (written, not yet written back); holes and prealloc extents are
/// holes. An offset at or past EOF gives ENXIO; SEEK_HOLE finds the implicit hole at EOF.
pub fn btrfs_llseek_data_hole(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: i64,
    whence: u32,
) -> Result<u64> {
    if whence != SEEK_DATA && whence != SEEK_HOLE {
        return Err(FsError::Invalid(format!("whence {whence}")));
    }
    let ss = u64::from(fs.sectorsize());
    let (_, size) = current_size(fs, root, ino)?;
    let offset = offset.max(0) as u64;
    if size == 0 || offset >= size {
        return Err(FsError::NoSuchOffset);
    }
    // Data ranges from the file extent items that reach past `offset`.
    let mut data: Vec<(u64, u64)> = Vec::new();
    {
        let _g = fs.read_guard();
        let r = fs.root(root)?;
        let first = offset - offset % ss;
        let start = match ubtrfs_ctree::ctree::lookup_le(
            &fs.reader,
            &r.ptr,
            &Key::new(ino, item::EXTENT_DATA, first),
        )? {
            Some((k, _)) if k.objectid == ino && k.item_type == item::EXTENT_DATA => k.offset,
            _ => first,
        };
        for it in
            ubtrfs_ctree::TreeIter::new(&fs.reader, r.ptr, Key::new(ino, item::EXTENT_DATA, start))
        {
            let (key, block, slot) = it?;
            if key.objectid != ino || key.item_type != item::EXTENT_DATA || key.offset >= size {
                break;
            }
            let raw = block
                .item_data(slot)
                .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
            let fe = FileExtentItem::parse(raw)
                .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
            let (is_data, end) = match fe.extent_type {
                FILE_EXTENT_INLINE => (true, (key.offset + fe.ram_bytes).div_ceil(ss) * ss),
                FILE_EXTENT_REG => (fe.disk_bytenr != 0, key.offset + fe.num_bytes),
                _ => (false, key.offset + fe.num_bytes),
            };
            if is_data && end > offset {
                data.push((key.offset, end));
            }
        }
    }
    if let Some(d) = dirty_inode(fs, root, ino) {
        let d = d.lock();
        for &idx in d.sectors.keys() {
            data.push((idx * ss, idx * ss + ss));
        }
    }
    data.sort_unstable();
    // Merge and clamp to EOF.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in data {
        let e = e.min(size);
        if s >= e {
            continue;
        }
        match merged.last_mut() {
            Some((_, me)) if s <= *me => *me = (*me).max(e),
            _ => merged.push((s, e)),
        }
    }
    if whence == SEEK_DATA {
        for &(s, e) in &merged {
            if e > offset {
                return Ok(s.max(offset));
            }
        }
        return Err(FsError::NoSuchOffset);
    }
    let mut pos = offset;
    for &(s, e) in &merged {
        if e <= pos {
            continue;
        }
        if s > pos {
            break;
        }
        pos = e;
    }
    Ok(pos.min(size))
}

/// `copy_file_range` by read and buffered write (FUSE cannot reflink): up to `len` bytes from
/// `off_in` of (root_in, ino_in) to `off_out` of (root_out, ino_out), short at the source's
/// EOF. Overlapping ranges of one file are refused (EINVAL), as the VFS does. Returns the
/// bytes copied. The caller holds the destination's inode lock.
#[allow(clippy::too_many_arguments)]
pub fn copy_file_range(
    fs: &FsInfo,
    root_in: u64,
    ino_in: u64,
    off_in: u64,
    root_out: u64,
    ino_out: u64,
    off_out: u64,
    len: u64,
) -> Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let check = |root, ino| -> Result<()> {
        let ii = crate::inode::read_inode(fs, root, ino)?;
        match ii.mode & crate::inode::S_IFMT {
            crate::inode::S_IFREG => Ok(()),
            crate::inode::S_IFDIR => Err(FsError::IsDir),
            _ => Err(FsError::Invalid("copy_file_range of a special file".into())),
        }
    };
    check(root_in, ino_in)?;
    check(root_out, ino_out)?;
    if off_out.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
        return Err(FsError::FileTooBig);
    }
    if (root_in, ino_in) == (root_out, ino_out)
        && off_in < off_out.saturating_add(len)
        && off_out < off_in.saturating_add(len)
    {
        return Err(FsError::Invalid(
            "overlapping copy_file_range in one file".into(),
        ));
    }
    let emi = fs.ems.inode(root_in, ino_in);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK);
        let ii = crate::inode::read_inode(fs, root_in, ino_in)?;
        let buf = crate::file::read(fs, root_in, ino_in, &ii, &emi, off_in + done, n as u32)?;
        if buf.is_empty() {
            break;
        }
        btrfs_buffered_write(fs, root_out, ino_out, off_out + done, &buf)?;
        done += buf.len() as u64;
        if (buf.len() as u64) < n {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_data_chunks_are_aligned_and_slices_cover_any_range() {
        let mut r = RunData::default();
        let ss = 4096;
        // 300 sectors: more than one RUN_CHUNK.
        let sectors = 300usize;
        for i in 0..sectors {
            r.push_sector(&vec![(i % 256) as u8; ss]);
        }
        assert_eq!(r.len(), sectors * ss);
        assert!(r.chunks.len() > 1);
        let want: Vec<u8> = (0..sectors)
            .flat_map(|i| vec![(i % 256) as u8; ss])
            .collect();
        for (buf, start, len) in &r.chunks {
            assert_eq!(
                buf[*start..].as_ptr() as usize % ubtrfs_ctree::volumes::DIRECT_IO_ALIGN,
                0
            );
            assert!(*len <= RUN_CHUNK && len % ss == 0);
        }
        for (off, len) in [
            (0, r.len()),
            (ss * 255, ss * 3),
            (RUN_CHUNK - 5, 10),
            (17, 0),
        ] {
            let got: Vec<u8> = r.slices(off, len).concat();
            assert_eq!(got, want[off..off + len], "range {off}+{len}");
            assert_eq!(r.to_vec(off, len), got);
        }
    }
}
