//! File data reads: `btrfs_get_extent` builds extent maps from file extent items on a miss and
//! inserts them into the inode's extent-map tree (ubtrfs-extent-map); the read then follows the
//! map: holes and prealloc read as zeros, inline data comes from the item, regular extents are
//! read through the chunk map and verified against the csum tree, compressed extents are read
//! whole, verified over their on-disk bytes and decompressed.

use crate::compression::{btrfs_decompress, btrfs_decompress_inline, CompressionType};
use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use crate::file_item::lookup_csums;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use ubtrfs_ctree::ctree::{lookup_item, Path};
use ubtrfs_extent_map::{
    flags as em_flags, BtrfsInode, ExtentMap, EXTENT_MAP_HOLE, EXTENT_MAP_INLINE,
};
use ubtrfs_format::items::{
    inode_flags, FileExtentItem, InodeItem, FILE_EXTENT_INLINE, FILE_EXTENT_PREALLOC,
};
use ubtrfs_format::key::{item, Key};

/// A few recently decompressed extents, so that sequential reads of a compressed file do not
/// decompress each 128 KiB extent once per FUSE read.
#[derive(Default)]
pub struct DecompressedCache {
    entries: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

const DECOMPRESSED_CACHE_ENTRIES: usize = 16;

impl DecompressedCache {
    fn get(&self, disk_bytenr: u64) -> Option<Arc<Vec<u8>>> {
        self.entries
            .lock()
            .iter()
            .find(|(b, _)| *b == disk_bytenr)
            .map(|(_, d)| d.clone())
    }
    fn put(&self, disk_bytenr: u64, data: Arc<Vec<u8>>) {
        let mut e = self.entries.lock();
        if e.len() >= DECOMPRESSED_CACHE_ENTRIES {
            e.pop_front();
        }
        e.push_back((disk_bytenr, data));
    }
}

fn compression_flag(c: u8) -> u32 {
    match c {
        1 => em_flags::COMPRESS_ZLIB,
        2 => em_flags::COMPRESS_LZO,
        3 => em_flags::COMPRESS_ZSTD,
        _ => 0,
    }
}

fn map_compression(em: &ExtentMap) -> CompressionType {
    if em.flags & em_flags::COMPRESS_ZLIB != 0 {
        CompressionType::Zlib
    } else if em.flags & em_flags::COMPRESS_LZO != 0 {
        CompressionType::Lzo
    } else if em.flags & em_flags::COMPRESS_ZSTD != 0 {
        CompressionType::Zstd
    } else {
        CompressionType::None
    }
}

/// End of the file range a file extent item covers (`btrfs_file_extent_end`).
fn file_extent_end(key: &Key, fe: &FileExtentItem, sectorsize: u64) -> u64 {
    if fe.extent_type == FILE_EXTENT_INLINE {
        key.offset
            .saturating_add(fe.ram_bytes)
            .div_ceil(sectorsize)
            .saturating_mul(sectorsize)
    } else {
        key.offset.saturating_add(fe.num_bytes)
    }
}

/// `btrfs_extent_item_to_extent_map`.
fn item_to_extent_map(key: &Key, fe: &FileExtentItem, sectorsize: u64) -> ExtentMap {
    let mut em = ExtentMap {
        start: key.offset,
        len: 0,
        disk_bytenr: 0,
        disk_num_bytes: 0,
        offset: 0,
        ram_bytes: fe.ram_bytes,
        generation: fe.generation,
        flags: 0,
    };
    if fe.extent_type == FILE_EXTENT_INLINE {
        em.start = 0;
        em.len = sectorsize;
        em.disk_bytenr = EXTENT_MAP_INLINE;
        em.flags |= compression_flag(fe.compression);
        return em;
    }
    em.len = file_extent_end(key, fe, sectorsize) - key.offset;
    if fe.disk_bytenr == 0 {
        em.disk_bytenr = EXTENT_MAP_HOLE;
        return em;
    }
    em.disk_bytenr = fe.disk_bytenr;
    em.disk_num_bytes = fe.disk_num_bytes;
    em.offset = fe.offset;
    if fe.compression != 0 {
        em.flags |= compression_flag(fe.compression);
    } else {
        // Older kernels wrote ram_bytes smaller than disk_num_bytes; always use the latter.
        em.ram_bytes = em.disk_num_bytes;
        if fe.extent_type == FILE_EXTENT_PREALLOC {
            em.flags |= em_flags::PREALLOC;
        }
    }
    em
}

fn parse_fe(root: u64, key: &Key, data: &[u8]) -> Result<FileExtentItem> {
    FileExtentItem::parse(data).map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))
}

/// `btrfs_get_extent`: the extent map covering `start` (searching the subvolume tree and
/// inserting a new map on a miss). `len` bounds the hole map made when nothing follows.
pub fn btrfs_get_extent(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    emi: &BtrfsInode,
    start: u64,
    len: u64,
) -> Result<ExtentMap> {
    if let Some(em) = emi.btrfs_lookup_extent_mapping(start, len) {
        if em.start <= start && em.end() > start {
            return Ok(em);
        }
    }
    let ss = u64::from(fs.sectorsize());
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    let (mut path, found) =
        Path::search(&fs.reader, &r.ptr, &Key::new(ino, item::EXTENT_DATA, start))?;
    let mut em: Option<ExtentMap> = None;
    let mut extent_end = start;
    let mut have_item = found;
    if !found {
        have_item = path.leaf().1 > 0 && path.prev_item(&fs.reader)?;
    }
    if have_item {
        let (key, data) = path
            .item()?
            .ok_or_else(|| FsError::corrupt("extent item vanished"))?;
        if key.objectid == ino && key.item_type == item::EXTENT_DATA {
            let fe = parse_fe(root, &key, data)?;
            extent_end = file_extent_end(&key, &fe, ss);
            if start < extent_end {
                em = Some(item_to_extent_map(&key, &fe, ss));
            }
        }
        // The `next:` loop of the kernel: look at following items for one overlapping the
        // range; an item starting before `start` is skipped (extent_end is not advanced).
        while em.is_none() && start >= extent_end {
            if !path.next_item(&fs.reader)? {
                break;
            }
            let (key, _) = path
                .item()?
                .ok_or_else(|| FsError::corrupt("extent item vanished"))?;
            if key.objectid != ino
                || key.item_type != item::EXTENT_DATA
                || start.saturating_add(len) <= key.offset
            {
                break;
            }
            if start > key.offset {
                continue;
            }
            em = Some(ExtentMap {
                start,
                len: key.offset - start,
                disk_bytenr: EXTENT_MAP_HOLE,
                disk_num_bytes: 0,
                offset: 0,
                ram_bytes: key.offset - start,
                generation: 0,
                flags: 0,
            });
        }
    }
    let em = match em {
        Some(em) => em,
        None => ExtentMap {
            start,
            len,
            disk_bytenr: EXTENT_MAP_HOLE,
            disk_num_bytes: 0,
            offset: 0,
            ram_bytes: len,
            generation: 0,
            flags: 0,
        },
    };
    if em.start > start || em.end() <= start {
        return Err(FsError::corrupt(format!(
            "root {root} ino {ino}: bad extent! em: [{} {}] passed [{start} {len}]",
            em.start, em.len
        )));
    }
    emi.btrfs_add_extent_mapping(em, start, len).map_err(|e| {
        FsError::corrupt(format!(
            "root {root} ino {ino}: adding extent map at {start}: {e:?}"
        ))
    })
    .inspect(|em| tracing::debug!(target: "btrfs_get_extent", root, ino, start = em.start, len = em.len, flags = em.flags))
}

/// Read and verify `len` bytes of data at `logical`, which file offset `file_pos` maps to.
/// Sectors that fail verification are retried on the other copies.
fn read_data(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    datasum: bool,
    logical: u64,
    len: u64,
    file_pos: u64,
) -> Result<Vec<u8>> {
    let ss = u64::from(fs.sectorsize());
    let a_start = logical - logical % ss;
    let prefix = logical - a_start;
    let a_len = (prefix + len).div_ceil(ss) * ss;
    let mut buf = vec![0u8; a_len as usize];
    fs.reader.read_logical(a_start, &mut buf, 0)?;
    if datasum {
        verify_sectors(
            fs,
            root,
            ino,
            a_start,
            &mut buf,
            file_pos.saturating_sub(prefix),
        )?;
    }
    Ok(buf[prefix as usize..(prefix + len) as usize].to_vec())
}

/// Verify every sector of `buf` (data at `a_start`) against the csum tree, repairing from other
/// mirrors in memory where possible. `file_start` is the file offset of the first sector (for
/// messages; the kernel prints the file offset).
fn verify_sectors(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    a_start: u64,
    buf: &mut [u8],
    file_start: u64,
) -> Result<()> {
    let ss = fs.sectorsize() as usize;
    let nr = buf.len() / ss;
    let csums = lookup_csums(fs, a_start, nr)?;
    let t = fs.reader.csum_type;
    for (i, want) in csums.iter().enumerate() {
        let sector = &mut buf[i * ss..(i + 1) * ss];
        let logical = a_start + (i * ss) as u64;
        let file_off = file_start + (i * ss) as u64;
        let Some(want) = want else {
            fs.counters.data_csum_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("csum missing root {root} ino {ino} off {file_off} logical {logical}");
            return Err(FsError::DataChecksum {
                root,
                ino,
                offset: file_off,
            });
        };
        if t.verify(sector, want) {
            continue;
        }
        let got = t.compute(sector);
        tracing::error!(
            "csum failed root {root} ino {ino} off {file_off} logical {logical} csum 0x{} expected csum 0x{} mirror 1",
            hex(&got[..t.size()]),
            hex(want)
        );
        let copies = fs.reader.num_copies(logical);
        let mut repaired = false;
        for mirror in 1..copies {
            let mut alt = vec![0u8; ss];
            if fs.reader.read_logical(logical, &mut alt, mirror).is_ok() && t.verify(&alt, want) {
                tracing::warn!(
                    "read good copy of root {root} ino {ino} off {file_off} from mirror {}",
                    mirror + 1
                );
                sector.copy_from_slice(&alt);
                repaired = true;
                break;
            }
        }
        if !repaired {
            fs.counters.data_csum_errors.fetch_add(1, Ordering::Relaxed);
            fs.reader.note_csum_error();
            return Err(FsError::DataChecksum {
                root,
                ino,
                offset: file_off,
            });
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The decompressed content of a compressed regular extent (cached).
fn compressed_extent(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    datasum: bool,
    em: &ExtentMap,
) -> Result<Arc<Vec<u8>>> {
    if let Some(d) = fs.extent_cache.get(em.disk_bytenr) {
        return Ok(d);
    }
    // Check the on-disk size before allocating for it: it comes from the disk.
    if em.disk_num_bytes > crate::compression::BTRFS_MAX_COMPRESSED as u64 {
        return Err(FsError::corrupt(format!(
            "root {root} ino {ino} off {}: compressed extent of {} bytes on disk",
            em.start, em.disk_num_bytes
        )));
    }
    let mut raw = vec![0u8; em.disk_num_bytes as usize];
    fs.reader.read_logical(em.disk_bytenr, &mut raw, 0)?;
    if datasum {
        // Compressed extents are summed over their on-disk bytes.
        verify_sectors(fs, root, ino, em.disk_bytenr, &mut raw, em.start)?;
    }
    let out = btrfs_decompress(
        map_compression(em),
        &raw,
        em.ram_bytes as usize,
        fs.sectorsize(),
    )
    .map_err(|source| FsError::Decompress {
        root,
        ino,
        offset: em.start,
        source,
    })?;
    fs.counters
        .decompressed_extents
        .fetch_add(1, Ordering::Relaxed);
    let out = Arc::new(out);
    fs.extent_cache.put(em.disk_bytenr, out.clone());
    Ok(out)
}

/// The content of an inline extent (`read_inline_extent`), zero-padded to a sector.
pub fn read_inline(fs: &FsInfo, root: u64, ino: u64) -> Result<Vec<u8>> {
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    let key = Key::new(ino, item::EXTENT_DATA, 0);
    let data = lookup_item(&fs.reader, &r.ptr, &key)?.ok_or_else(|| {
        FsError::corrupt(format!(
            "root {root} ino {ino}: inline extent map without an item"
        ))
    })?;
    let fe = parse_fe(root, &key, &data)?;
    if fe.extent_type != FILE_EXTENT_INLINE {
        return Err(FsError::corrupt(format!(
            "root {root} ino {ino}: extent at 0 is not inline"
        )));
    }
    let kind = CompressionType::from_disk(fe.compression).ok_or_else(|| {
        FsError::corrupt(format!(
            "root {root} ino {ino}: compression {}",
            fe.compression
        ))
    })?;
    let out = if kind == CompressionType::None {
        let n = fe.inline_data.len().min(fe.ram_bytes as usize);
        fe.inline_data[..n].to_vec()
    } else {
        btrfs_decompress_inline(
            kind,
            &fe.inline_data,
            fe.ram_bytes as usize,
            fs.sectorsize(),
        )
        .map_err(|source| FsError::Decompress {
            root,
            ino,
            offset: 0,
            source,
        })?
    };
    Ok(out)
}

/// Read up to `size` bytes at `offset` of a regular file (short at end of file), including
/// data written but not yet written back.
pub fn read(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    ii: &InodeItem,
    emi: &BtrfsInode,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>> {
    let mut first = true;
    loop {
        let (dirty, made) = match crate::file_write::dirty_inode(fs, root, ino) {
            Some(d) => (d, None),
            None if first => {
                // Nothing dirty: read the trees. A writeback that starts meanwhile shows as a
                // pinned map of an extent whose data may not be written yet; then read again
                // under the dirty buffer, which holds that data.
                first = false;
                match read_disk_under(fs, root, ino, ii, emi, offset, size, None, true)? {
                    Some(out) => return Ok(out),
                    None => continue,
                }
            }
            None => crate::file_write::dirty_inode_or_new(fs, root, ino)?,
        };
        let out = read_locked(fs, root, ino, ii, emi, offset, size, &dirty);
        if let Some(size) = made {
            crate::file_write::forget_if_clean(fs, root, ino, &dirty, size);
        }
        // None: the dirty state was retired under us (its writeback ended); look again.
        if let Some(out) = out.transpose() {
            return out;
        }
    }
}

/// [`read`] under the inode's dirty buffer: its sectors come from the buffer, the rest from
/// the trees. None when the buffer was retired before it was locked.
#[allow(clippy::too_many_arguments)]
fn read_locked(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    ii: &InodeItem,
    emi: &BtrfsInode,
    offset: u64,
    size: u32,
    dirty: &parking_lot::Mutex<crate::file_write::DirtyInode>,
) -> Result<Option<Vec<u8>>> {
    let d = dirty.lock();
    if d.retired {
        return Ok(None);
    }
    let live = InodeItem {
        size: d.size,
        ..*ii
    };
    let mut out = read_disk_under(fs, root, ino, &live, emi, offset, size, Some(&d), false)?
        .ok_or_else(|| FsError::corrupt("read under the dirty buffer asked for a retry"))?;
    crate::file_write::overlay_dirty(&d, u64::from(fs.sectorsize()), offset, &mut out);
    Ok(Some(out))
}

/// Read file content from the trees only (no dirty data), up to `ii.size`.
pub fn read_disk(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    ii: &InodeItem,
    emi: &BtrfsInode,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>> {
    read_disk_under(fs, root, ino, ii, emi, offset, size, None, false)?
        .ok_or_else(|| FsError::corrupt("read without retry asked for a retry"))
}

/// [`read_disk`], skipping (as zeros, for the caller to overlay) the sectors that are in
/// `dirty`, the inode's dirty buffer, which the caller holds locked.
///
/// What keeps a read consistent with writeback, commits and space reuse (the kernel's folio
/// and extent range locks):
/// - The tree lock is held shared from the lookup of each extent to the verification of the
///   data read from it: the extent map found (cached maps change only under the exclusive
///   tree lock), its data and its checksums belong to one state of the trees. A write
///   operation (writeback's extent reservation and ordered-extent completion, truncate, punch
///   hole) and a commit (which frees dropped extents with their checksums and makes their
///   space reusable) wait for that piece to be read, so an extent a read has found cannot be
///   freed, reused or lose its checksums under it. Between pieces they may run: like a
///   buffered read in the kernel, a read is not atomic against writes.
/// - Sectors in the dirty buffer are never read from disk, as pages in the page cache are not:
///   writeback inserts the pinned map of a new extent before it writes the data (the data I/O
///   runs with no lock), and only removes the sectors from the dirty buffer (under its lock)
///   once the extent is complete. Reading them from the new extent meanwhile would read data
///   not yet written (a checksum failure, or stale bytes where checksums are off). Those pinned
///   maps only ever cover sectors of the dirty buffer while it is locked; a reader that holds
///   no dirty buffer (`dirty` is None) and meets one returns `Ok(None)` when
///   `retry_on_pinned` is set, to read again under the buffer.
#[allow(clippy::too_many_arguments)]
fn read_disk_under(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    ii: &InodeItem,
    emi: &BtrfsInode,
    offset: u64,
    size: u32,
    dirty: Option<&crate::file_write::DirtyInode>,
    retry_on_pinned: bool,
) -> Result<Option<Vec<u8>>> {
    if offset >= ii.size {
        return Ok(Some(Vec::new()));
    }
    let end = ii.size.min(offset.saturating_add(u64::from(size)));
    let ss = u64::from(fs.sectorsize());
    let datasum = ii.flags & inode_flags::NODATASUM == 0;
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut pos = offset;
    while pos < end {
        let a_start = pos - pos % ss;
        // The next dirty sector at or after `pos`: a run of dirty sectors is left to the
        // overlay, and a piece read from disk stops at the next one.
        let mut next_dirty = u64::MAX;
        if let Some(d) = dirty {
            let mut idx = a_start / ss;
            while idx.saturating_mul(ss) < end && d.sectors.contains_key(&idx) {
                idx += 1;
            }
            let run_end = end.min(idx.saturating_mul(ss));
            if run_end > pos {
                out.resize(out.len() + (run_end - pos) as usize, 0);
                pos = run_end;
                continue;
            }
            if let Some((&n, _)) = d.sectors.range(idx + 1..).next() {
                next_dirty = n.saturating_mul(ss);
            }
        }
        let req_len = end.div_ceil(ss) * ss - a_start;
        let _g = fs.read_guard();
        let em = btrfs_get_extent(fs, root, ino, emi, a_start, req_len)?;
        let piece_end = end.min(em.end()).min(next_dirty);
        if piece_end <= pos {
            return Err(FsError::corrupt(format!(
                "root {root} ino {ino}: extent map [{} {}] does not cover offset {pos}",
                em.start, em.len
            )));
        }
        if retry_on_pinned && em.flags & em_flags::PINNED != 0 {
            return Ok(None);
        }
        let n = (piece_end - pos) as usize;
        if em.disk_bytenr == EXTENT_MAP_HOLE || em.flags & em_flags::PREALLOC != 0 {
            out.resize(out.len() + n, 0);
        } else if em.disk_bytenr == EXTENT_MAP_INLINE {
            let data = read_inline(fs, root, ino)?;
            copy_padded(&mut out, &data, pos, n);
        } else if em.is_compressed() {
            let data = compressed_extent(fs, root, ino, datasum, &em)?;
            // Past the decompressed data (a corrupt extent offset) reads as zeros.
            let from = em.offset.saturating_add(pos - em.start);
            copy_padded(&mut out, &data, from, n);
        } else {
            let logical = em
                .block_start()
                .checked_add(pos - em.start)
                .ok_or_else(|| {
                    FsError::corrupt(format!(
                        "root {root} ino {ino} off {pos}: extent at disk_bytenr {} offset {} \
                     overflows the address space",
                        em.disk_bytenr, em.offset
                    ))
                })?;
            out.extend_from_slice(&read_data(fs, root, ino, datasum, logical, n as u64, pos)?);
        }
        pos = piece_end;
    }
    fs.note_bytes_read(out.len() as u64);
    Ok(Some(out))
}

/// Append `n` bytes of `data` from `from`, zero-filled past its end.
fn copy_padded(out: &mut Vec<u8>, data: &[u8], from: u64, n: usize) {
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(data.len());
    let k = n.min(data.len() - from);
    out.extend_from_slice(&data[from..from + k]);
    out.resize(out.len() + (n - k), 0);
}

/// `btrfs_readlink` counterpart (the kernel uses page_get_link on the inline extent).
pub fn readlink(fs: &FsInfo, root: u64, ino: u64, ii: &InodeItem) -> Result<Vec<u8>> {
    let mut data = read_inline(fs, root, ino)?;
    data.truncate(ii.size as usize);
    Ok(data)
}
