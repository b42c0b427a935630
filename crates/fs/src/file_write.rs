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
//!   becomes an inline extent, as `cow_file_range_inline` decides.
//!
//! # Invariants
//! - A dirty sector leaves the buffer only after the extent holding its data is in the running
//!   transaction and published (readers see the dirty copy or the extent, never neither), and
//!   only if it was not written again meanwhile (per-sector sequence number).
//! - Data is written to disk before the commit that references it (commit flushes the device
//!   after writeback wrote the data), so a committed file extent never points at stale bytes.
//! - Every written non-NODATASUM sector has its checksum in the csum tree in the same
//!   transaction as its file extent item; the data ref (root, ino, file offset - extent
//!   offset) is queued as a delayed ref.
//! - `nbytes` changes by the bytes of new extents minus the bytes `btrfs_drop_extents` dropped
//!   (inline extents count their unaligned length).
//!
//! Lock order: the inode's `inode_lock` (writers, truncate) before the dirty-inode mutex before
//! `FsInfo::tree_lock`; the dirty mutex is never held while taking the inode lock.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use crate::transaction::{TreeSel, WriteCtx};
use parking_lot::Mutex;
use std::collections::BTreeMap;
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
}

impl DirtyInode {
    pub fn dirty_bytes(&self, ss: u64) -> u64 {
        self.sectors.len() as u64 * ss
    }
}

pub type DirtyMap = Mutex<std::collections::HashMap<(u64, u64), Arc<Mutex<DirtyInode>>>>;

/// The dirty state of an inode, if it has one.
pub fn dirty_inode(fs: &FsInfo, root: u64, ino: u64) -> Option<Arc<Mutex<DirtyInode>>> {
    fs.dirty.lock().get(&(root, ino)).cloned()
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
    let dirty = {
        let mut map = fs.dirty.lock();
        map.entry((root, ino))
            .or_insert_with(|| {
                Arc::new(Mutex::new(DirtyInode {
                    size: ii.size,
                    ..Default::default()
                }))
            })
            .clone()
    };
    let disk_ii = InodeItem {
        size: ii.size,
        ..ii
    };
    let mut d = dirty.lock();
    // A file whose first extent is inline gets its first sector rewritten along with any
    // write: an inline extent cannot be partially replaced (btrfs_drop_extents).
    if !d.sectors.contains_key(&0) && ii.size > 0 && has_inline_extent(fs, root, ino)? {
        let s0 = read_sector_from_disk(fs, root, ino, &disk_ii, 0)?;
        d.seq += 1;
        let seq = d.seq;
        d.sectors.insert(0, (seq, s0.into_boxed_slice()));
    }
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
                let mut buf = if lo == 0 && hi == ss as usize || s >= d.size.max(ii.size) {
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
                d.sectors.insert(idx, (seq, buf.into_boxed_slice()));
            }
        }
        pos = s + hi as u64;
    }
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

/// `btrfs_csum_file_blocks`: checksums of `data` written at `bytenr`, as EXTENT_CSUM items.
pub fn btrfs_csum_file_blocks(c: &mut WriteCtx<'_>, bytenr: u64, data: &[u8]) -> Result<()> {
    let ss = c.fs.sectorsize() as usize;
    let t = c.fs.reader.csum_type;
    let csize = t.size();
    // Items of at most a quarter leaf, so that they always fit.
    let per_item = ((c.fs.sb.nodesize as usize / 4) / csize).max(1);
    let sectors: Vec<&[u8]> = data.chunks(ss).collect();
    for (i, chunk) in sectors.chunks(per_item).enumerate() {
        let mut body = Vec::with_capacity(chunk.len() * csize);
        for s in chunk {
            body.extend_from_slice(&t.compute(s)[..csize]);
        }
        let key = Key::new(
            objectid::EXTENT_CSUM,
            item::EXTENT_CSUM,
            bytenr + (i * per_item * ss) as u64,
        );
        c.insert(objectid::CSUM_TREE, key, &body)?;
    }
    Ok(())
}

/// A run of contiguous dirty sectors: first sector index, (index, write sequence) of each,
/// and their bytes.
type Run = (u64, Vec<(u64, u64)>, Vec<u8>);

/// Write back every dirty sector of an inode (`btrfs_fdatawrite_range` + ordered completion).
pub fn btrfs_writeback(fs: &FsInfo, root: u64, ino: u64) -> Result<()> {
    let Some(dirty) = dirty_inode(fs, root, ino) else {
        return Ok(());
    };
    let ss = u64::from(fs.sectorsize());
    // Snapshot the runs to write.
    let (runs, size, mtime) = {
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
                runs.push((idx, Vec::new(), Vec::new()));
            }
            let r = runs.last_mut().expect("pushed above");
            r.1.push((idx, *seq));
            r.2.extend_from_slice(data);
        }
        (runs, d.size, d.mtime)
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
        write_run(
            fs,
            root,
            ino,
            &emi,
            start,
            &data[..len as usize],
            size,
            mtime,
        )?;
        // The data is in the transaction: drop the dirty copies that were not rewritten.
        let mut d = dirty.lock();
        for &(idx, seq) in seqs {
            if idx * ss < start + len && d.sectors.get(&idx).map(|(s, _)| *s) == Some(seq) {
                d.sectors.remove(&idx);
            }
        }
    }
    // Sectors beyond EOF left over and the size/mtime update when nothing else is dirty.
    let mut d = dirty.lock();
    let eof = d.size.div_ceil(ss);
    d.sectors.retain(|&idx, _| idx < eof);
    if d.sectors.is_empty() {
        let (size, mtime) = (d.size, d.mtime);
        drop(d);
        fs.write_op(|c| {
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
            if Arc::ptr_eq(cur, &dirty) && dirty.lock().sectors.is_empty() {
                map.remove(&(root, ino));
            }
        }
    }
    Ok(())
}

/// Write one run of file data starting at `start` as a new extent (or inline extent).
#[allow(clippy::too_many_arguments)]
fn write_run(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    emi: &ubtrfs_extent_map::BtrfsInode,
    start: u64,
    data: &[u8],
    size: u64,
    mtime: Option<ubtrfs_format::items::Timespec>,
) -> Result<()> {
    let ss = u64::from(fs.sectorsize());
    fs.write_op(|c| {
        let transid = c.transid();
        let mut ii = c.read_inode(root, ino)?;
        let datasum = ii.flags & inode_flags::NODATASUM == 0;
        let max_inline = DEFAULT_MAX_INLINE.min(ss);
        // cow_file_range_inline: whole file, at 0, within one sector and max_inline.
        if start == 0
            && size <= ss
            && size <= max_inline
            && size > 0
            && data.len() as u64 >= size.min(ss)
        {
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
                inline_data: data[..size as usize].to_vec(),
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
            return Ok(());
        }
        let mut pos = 0u64;
        let total = data.len() as u64;
        while pos < total {
            let want = total - pos;
            // find_free_extent: the whole run in one extent if any group (or a new chunk) has
            // room; only then fragments of what is left.
            let whole =
                c.t.space
                    .alloc(ubtrfs_ctree::block_group::AllocKind::Data, want);
            let (bytenr, got) = match whole {
                Some(b) => (b, want),
                None => {
                    let grown = c.alloc_data_chunk()?;
                    match grown
                        .then(|| {
                            c.t.space
                                .alloc(ubtrfs_ctree::block_group::AllocKind::Data, want)
                        })
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
            let piece = &data[pos as usize..(pos + got) as usize];
            let fstart = start + pos;
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
            c.fs.reader.write_logical(bytenr, piece)?;
            if datasum {
                btrfs_csum_file_blocks(c, bytenr, piece)?;
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
            pos += got;
        }
        finish_inode(c, root, ino, &mut ii, size, mtime)
    })
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

/// Extent type names for messages.
pub fn extent_type_name(t: u8) -> &'static str {
    match t {
        FILE_EXTENT_INLINE => "inline",
        FILE_EXTENT_REG => "regular",
        FILE_EXTENT_PREALLOC => "prealloc",
        _ => "unknown",
    }
}
