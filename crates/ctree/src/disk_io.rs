//! Superblock and tree-block reads (the read side of the kernel's disk_io.c).
//!
//! Every tree block is verified before use (`btrfs_validate_extent_buffer` +
//! `btrfs_verify_level_key` + the tree-checker): checksum, bytenr, fsid, level, generation
//! against the parent pointer, first key against the parent pointer, structural layout.
//! When a copy fails verification the next mirror is read and the failure is logged, as the
//! kernel's read-repair path does (without rewriting the bad copy on a read-only mount).
//!
//! The block cache holds verified blocks only, bounded by bytes; eviction is second-chance FIFO.

use crate::error::{Error, Result};
use crate::tree_checker;
use crate::volumes::{ChunkMap, Device};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use ubtrfs_format::csum::CsumType;
use ubtrfs_format::key::Key;
use ubtrfs_format::super_block::{sb_offset, SuperBlock, SUPER_INFO_SIZE};
use ubtrfs_format::tree_block::TreeBlock;

/// What the parent (or the superblock / root item) says about a block we are about to read.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockExpect {
    pub generation: Option<u64>,
    pub level: Option<u8>,
    pub first_key: Option<Key>,
    /// Owner tree; checked only for trees whose blocks are never shared (not fs trees).
    pub owner: Option<u64>,
}

/// Counters of the tree-block cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    pub bytes: u64,
    pub blocks: u64,
    pub hits: u64,
    pub misses: u64,
    pub csum_errors: u64,
    pub bad_copies: u64,
}

struct CacheEntry {
    block: Arc<TreeBlock>,
    referenced: AtomicBool,
}

#[derive(Default)]
struct BlockCache {
    map: HashMap<u64, CacheEntry>,
    order: VecDeque<u64>,
    bytes: u64,
}

/// Read superblock copy `mirror` of a device and check magic, checksum and validity.
pub fn read_super_mirror(dev: &Device, mirror: usize) -> Result<SuperBlock> {
    let off = sb_offset(mirror);
    if off + SUPER_INFO_SIZE as u64 > dev.size {
        return Err(Error::NotFound(format!(
            "superblock mirror {mirror} lies beyond the device end"
        )));
    }
    let mut buf = vec![0u8; SUPER_INFO_SIZE];
    dev.read_exact_at(&mut buf, off)?;
    let sb = SuperBlock::parse(&buf)
        .map_err(|e| Error::format(format!("superblock copy {mirror}"), e))?;
    sb.verify_csum()
        .map_err(|e| Error::format(format!("superblock copy {mirror}"), e))?;
    if sb.bytenr != off {
        return Err(Error::corrupt(format!(
            "superblock copy {mirror}: bytenr {} should be {off}",
            sb.bytenr
        )));
    }
    sb.validate()
        .map_err(|e| Error::format(format!("superblock copy {mirror}"), e))?;
    Ok(sb)
}

/// Read the superblock the way ubtrfs mounts: the primary copy; a mirror only when the primary is
/// unreadable, with a warning (an older mirror can roll back acknowledged data).
pub fn read_super(dev: &Device) -> Result<SuperBlock> {
    let primary_err = match read_super_mirror(dev, 0) {
        Ok(sb) => return Ok(sb),
        Err(e) => e,
    };
    let mut best: Option<SuperBlock> = None;
    for m in 1..ubtrfs_format::super_block::SUPER_MIRROR_MAX {
        if let Ok(sb) = read_super_mirror(dev, m) {
            if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                best = Some(sb);
            }
        }
    }
    match best {
        Some(sb) => {
            tracing::warn!(
                "primary superblock unusable ({primary_err}); using mirror with generation {}: \
                 committed data newer than that generation may be missing",
                sb.generation
            );
            Ok(sb)
        }
        None => Err(primary_err),
    }
}

/// Verified tree-block reads through the chunk map, with a bounded cache.
pub struct BlockReader {
    devices: HashMap<u64, Arc<Device>>,
    chunks: RwLock<ChunkMap>,
    pub nodesize: u32,
    pub sectorsize: u32,
    pub csum_type: CsumType,
    pub metadata_fsid: [u8; 16],
    /// Highest generation any block may carry (super generation + 1, for log trees).
    max_generation: AtomicU64,
    cache: Mutex<BlockCache>,
    cache_budget: u64,
    /// Blocks created or changed by the running transaction, not yet written. Looked up before
    /// the device: they are ours and were validated when built.
    dirty: RwLock<HashMap<u64, Arc<TreeBlock>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    csum_errors: AtomicU64,
    bad_copies: AtomicU64,
}

impl BlockReader {
    pub fn new(devices: Vec<Arc<Device>>, sb: &SuperBlock, cache_budget: u64) -> Result<Self> {
        let csum_type = sb.csum_type().map_err(|e| Error::format("superblock", e))?;
        Ok(Self::with_geometry(
            devices,
            sb.nodesize,
            sb.sectorsize,
            csum_type,
            sb.metadata_fsid(),
            sb.generation.saturating_add(1),
            cache_budget,
        ))
    }

    /// A reader for the given geometry (tools and tests that build filesystems).
    pub fn with_geometry(
        devices: Vec<Arc<Device>>,
        nodesize: u32,
        sectorsize: u32,
        csum_type: CsumType,
        metadata_fsid: [u8; 16],
        max_generation: u64,
        cache_budget: u64,
    ) -> Self {
        BlockReader {
            devices: devices.into_iter().map(|d| (d.devid, d)).collect(),
            chunks: RwLock::new(ChunkMap::new()),
            nodesize,
            sectorsize,
            csum_type,
            metadata_fsid,
            max_generation: AtomicU64::new(max_generation),
            cache: Mutex::new(BlockCache::default()),
            cache_budget,
            dirty: RwLock::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            csum_errors: AtomicU64::new(0),
            bad_copies: AtomicU64::new(0),
        }
    }

    /// Highest generation a block read from disk may carry.
    pub fn max_generation(&self) -> u64 {
        self.max_generation.load(Ordering::Relaxed)
    }

    /// After a commit: blocks of the new generation (and log blocks one above) are valid.
    pub fn set_max_generation(&self, g: u64) {
        self.max_generation.store(g, Ordering::Relaxed);
    }

    pub fn chunks(&self) -> parking_lot::RwLockReadGuard<'_, ChunkMap> {
        self.chunks.read()
    }
    pub fn chunks_mut(&self) -> parking_lot::RwLockWriteGuard<'_, ChunkMap> {
        self.chunks.write()
    }

    pub fn device(&self, devid: u64) -> Option<&Arc<Device>> {
        self.devices.get(&devid)
    }

    pub fn cache_stats(&self) -> CacheStats {
        let c = self.cache.lock();
        CacheStats {
            bytes: c.bytes,
            blocks: c.map.len() as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            csum_errors: self.csum_errors.load(Ordering::Relaxed),
            bad_copies: self.bad_copies.load(Ordering::Relaxed),
        }
    }

    pub fn note_csum_error(&self) {
        self.csum_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of copies of the data at `logical` (`btrfs_num_copies`).
    pub fn num_copies(&self, logical: u64) -> usize {
        self.chunks
            .read()
            .map(logical, 1)
            .map(|p| p[0].mirrors.len())
            .unwrap_or(0)
    }

    /// Read `buf.len()` bytes at `logical` from copy `mirror` (0-based), splitting at stripes.
    pub fn read_logical(&self, logical: u64, buf: &mut [u8], mirror: usize) -> Result<()> {
        let pieces = self.chunks.read().map(logical, buf.len() as u64)?;
        let mut done = 0usize;
        for p in pieces {
            let (devid, phys) =
                *p.mirrors.get(mirror).or(p.mirrors.first()).ok_or_else(|| {
                    Error::corrupt(format!("logical {} has no stripes", p.logical))
                })?;
            let dev = self.devices.get(&devid).ok_or_else(|| {
                Error::Unsupported(format!(
                    "device {devid} holding logical {} is missing",
                    p.logical
                ))
            })?;
            let n = p.len as usize;
            dev.read_exact_at(&mut buf[done..done + n], phys)?;
            done += n;
        }
        Ok(())
    }

    /// Read and verify one tree block. Each mirror is tried in turn; the first that passes every
    /// check is cached and returned.
    pub fn read_tree_block(&self, bytenr: u64, expect: BlockExpect) -> Result<Arc<TreeBlock>> {
        if let Some(b) = self.dirty.read().get(&bytenr) {
            let b = b.clone();
            self.check_expect(&b, bytenr, &expect)?;
            return Ok(b);
        }
        if let Some(b) = self.cache_get(bytenr) {
            // A cached block was verified on read; re-check what the new parent expects.
            self.check_expect(&b, bytenr, &expect)?;
            return Ok(b);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if bytenr == 0 || !bytenr.is_multiple_of(u64::from(self.sectorsize)) {
            return Err(Error::corrupt(format!(
                "tree block bytenr {bytenr} is not sector aligned"
            )));
        }
        let copies = self.num_copies(bytenr).max(1);
        let mut last_err = None;
        for mirror in 0..copies {
            match self.read_one_copy(bytenr, mirror, &expect) {
                Ok(b) => {
                    if mirror > 0 {
                        tracing::warn!(
                            "tree block {bytenr}: read from mirror {} after bad copies",
                            mirror + 1
                        );
                    }
                    let b = Arc::new(b);
                    self.cache_put(bytenr, b.clone());
                    return Ok(b);
                }
                Err(e) => {
                    self.bad_copies.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("tree block {bytenr} mirror {}: {e}", mirror + 1);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::corrupt(format!("tree block {bytenr}: no copy"))))
    }

    fn read_one_copy(&self, bytenr: u64, mirror: usize, expect: &BlockExpect) -> Result<TreeBlock> {
        let mut data = vec![0u8; self.nodesize as usize];
        self.read_logical(bytenr, &mut data, mirror)?;
        let block =
            TreeBlock::new(data).map_err(|e| Error::format(format!("tree block {bytenr}"), e))?;
        if !block.verify_csum(self.csum_type) {
            self.csum_errors.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Checksum(format!(
                "tree block {bytenr} ({} csum)",
                self.csum_type.name()
            )));
        }
        let h = &block.header;
        if h.bytenr != bytenr {
            return Err(Error::corrupt(format!(
                "tree block {bytenr}: header bytenr is {}",
                h.bytenr
            )));
        }
        if h.fsid != self.metadata_fsid {
            return Err(Error::corrupt(format!(
                "tree block {bytenr}: fsid does not match the filesystem"
            )));
        }
        self.check_expect(&block, bytenr, expect)?;
        tree_checker::check_block(&block, self.sectorsize, self.max_generation())
            .map_err(|e| Error::corrupt(format!("tree block {bytenr} (owner {}): {e}", h.owner)))?;
        Ok(block)
    }

    fn check_expect(&self, b: &TreeBlock, bytenr: u64, expect: &BlockExpect) -> Result<()> {
        let h = &b.header;
        if let Some(g) = expect.generation {
            if h.generation != g {
                return Err(Error::corrupt(format!(
                    "parent transid verify failed on {bytenr}: wanted {g} found {}",
                    h.generation
                )));
            }
        }
        if let Some(l) = expect.level {
            if h.level != l {
                return Err(Error::corrupt(format!(
                    "tree block {bytenr}: level {} expected {l}",
                    h.level
                )));
            }
        }
        if let Some(o) = expect.owner {
            if h.owner != o {
                return Err(Error::corrupt(format!(
                    "tree block {bytenr}: owner {} expected {o}",
                    h.owner
                )));
            }
        }
        if let Some(k) = expect.first_key {
            let first = b
                .first_key()
                .map_err(|e| Error::format(format!("tree block {bytenr}"), e))?;
            if first != Some(k) {
                return Err(Error::corrupt(format!(
                    "tree block {bytenr}: first key {first:?} does not match parent key {k:?}"
                )));
            }
        }
        Ok(())
    }

    fn cache_get(&self, bytenr: u64) -> Option<Arc<TreeBlock>> {
        let c = self.cache.lock();
        let e = c.map.get(&bytenr)?;
        e.referenced.store(true, Ordering::Relaxed);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(e.block.clone())
    }

    fn cache_put(&self, bytenr: u64, block: Arc<TreeBlock>) {
        let size = block.data.len() as u64;
        let mut c = self.cache.lock();
        if c.map.contains_key(&bytenr) {
            return;
        }
        c.map.insert(
            bytenr,
            CacheEntry {
                block,
                referenced: AtomicBool::new(false),
            },
        );
        c.order.push_back(bytenr);
        c.bytes += size;
        // Second-chance eviction; bounded by two passes over the queue.
        let mut budget = c.order.len() * 2;
        while c.bytes > self.cache_budget && budget > 0 {
            budget -= 1;
            let Some(victim) = c.order.pop_front() else {
                break;
            };
            let Some(e) = c.map.get(&victim) else {
                continue;
            };
            if e.referenced.swap(false, Ordering::Relaxed) {
                c.order.push_back(victim);
                continue;
            }
            if let Some(e) = c.map.remove(&victim) {
                c.bytes -= e.block.data.len() as u64;
            }
        }
    }

    /// A dirty block of the running transaction, if `bytenr` is one.
    pub fn dirty_get(&self, bytenr: u64) -> Option<Arc<TreeBlock>> {
        self.dirty.read().get(&bytenr).cloned()
    }

    /// Publish a new version of a dirty block.
    pub fn dirty_put(&self, block: Arc<TreeBlock>) {
        let bytenr = block.header.bytenr;
        self.cache_forget(bytenr);
        self.dirty.write().insert(bytenr, block);
    }

    /// Change a dirty block in place (cloning it only if a reader still holds this version).
    pub fn dirty_modify<R>(&self, bytenr: u64, f: impl FnOnce(&mut TreeBlock) -> R) -> Option<R> {
        let mut d = self.dirty.write();
        let arc = d.get_mut(&bytenr)?;
        Some(f(Arc::make_mut(arc)))
    }

    /// Forget a dirty block that was freed before being written.
    pub fn dirty_remove(&self, bytenr: u64) -> Option<Arc<TreeBlock>> {
        self.dirty.write().remove(&bytenr)
    }

    /// Take the dirty blocks `pick` selects (a log sync writes only log blocks).
    pub fn take_dirty_where(&self, pick: impl Fn(&TreeBlock) -> bool) -> Vec<Arc<TreeBlock>> {
        let mut d = self.dirty.write();
        let keys: Vec<u64> = d.iter().filter(|(_, b)| pick(b)).map(|(k, _)| *k).collect();
        let blocks: Vec<_> = keys.into_iter().filter_map(|k| d.remove(&k)).collect();
        drop(d);
        for b in &blocks {
            self.cache_put(b.header.bytenr, b.clone());
        }
        blocks
    }

    /// Number of dirty blocks.
    pub fn dirty_count(&self) -> usize {
        self.dirty.read().len()
    }

    /// Take every dirty block for write-out, moving them into the clean cache.
    pub fn take_dirty(&self) -> Vec<Arc<TreeBlock>> {
        let blocks: Vec<_> = self.dirty.write().drain().map(|(_, b)| b).collect();
        for b in &blocks {
            self.cache_put(b.header.bytenr, b.clone());
        }
        blocks
    }

    /// Write `buf` at `logical` to every copy (every stripe of mirrored profiles).
    pub fn write_logical(&self, logical: u64, buf: &[u8]) -> Result<()> {
        let pieces = self.chunks.read().map(logical, buf.len() as u64)?;
        let mut done = 0usize;
        for p in pieces {
            let n = p.len as usize;
            for &(devid, phys) in &p.mirrors {
                let dev = self.devices.get(&devid).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "device {devid} holding logical {} is missing",
                        p.logical
                    ))
                })?;
                dev.write_all_at(&buf[done..done + n], phys)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Write file data, `bufs` one after the other from `logical` on, to every copy
    /// ([`Device::write_data_at`]: O_DIRECT where the device allows it).
    pub fn write_logical_data(&self, logical: u64, bufs: &[&[u8]]) -> Result<()> {
        self.write_logical_with(logical, bufs, |dev, slices, phys| {
            dev.write_data_at(slices, phys)
        })
    }

    /// Write tree blocks, each `(logical, bytes)`, to every copy: sorted by address, one
    /// vectored write per run of adjacent blocks and per copy ([`Device::write_vectored_at`])
    /// instead of one write per block and copy. A log sync writes the log tree leaf and the
    /// log root tree leaf it COWed, usually adjacent, twice each on DUP metadata: two calls
    /// instead of four. Nothing orders writes between two flushes, so sorting them is free.
    pub fn write_tree_blocks(&self, blocks: &mut [(u64, &[u8])]) -> Result<()> {
        blocks.sort_unstable_by_key(|b| b.0);
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i].0;
            let mut end = start;
            let mut j = i;
            while j < blocks.len() && blocks[j].0 == end {
                end = end.checked_add(blocks[j].1.len() as u64).ok_or_else(|| {
                    Error::corrupt(format!("tree block at {} ends past 2^64", blocks[j].0))
                })?;
                j += 1;
            }
            if j == i {
                // Two blocks at one address: a caller bug, written one after the other so
                // the last one wins as with separate writes.
                j = i + 1;
            }
            let run: Vec<&[u8]> = blocks[i..j].iter().map(|b| b.1).collect();
            self.write_logical_with(start, &run, |dev, slices, phys| {
                dev.write_vectored_at(slices, phys)
            })?;
            i = j;
        }
        Ok(())
    }

    /// `bufs` one after the other from `logical` on, cut along the chunk map, and `write`
    /// called once per mapped piece and copy with the slices of `bufs` that fall in it.
    fn write_logical_with(
        &self,
        logical: u64,
        bufs: &[&[u8]],
        write: impl Fn(&Device, &[&[u8]], u64) -> Result<()>,
    ) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let pieces = self.chunks.read().map(logical, total as u64)?;
        // (buffer index, offset in it) where the next piece starts.
        let (mut bi, mut bo) = (0usize, 0usize);
        for p in pieces {
            let mut want = p.len as usize;
            let mut slices: Vec<&[u8]> = Vec::new();
            while want > 0 {
                let b = bufs.get(bi).ok_or_else(|| {
                    Error::corrupt(format!("data for logical {} ends early", p.logical))
                })?;
                let take = (b.len() - bo).min(want);
                slices.push(&b[bo..bo + take]);
                want -= take;
                bo += take;
                if bo == b.len() {
                    bi += 1;
                    bo = 0;
                }
            }
            for &(devid, phys) in &p.mirrors {
                let dev = self.devices.get(&devid).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "device {devid} holding logical {} is missing",
                        p.logical
                    ))
                })?;
                write(dev, &slices, phys)?;
            }
        }
        Ok(())
    }

    /// Flush every device (the barrier between data/metadata and the superblock).
    pub fn flush_devices(&self) -> Result<()> {
        for d in self.devices.values() {
            d.flush()?;
        }
        Ok(())
    }

    /// All devices.
    pub fn devices(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.devices.values()
    }

    /// Drop a block from the cache (its address was freed or rewritten).
    pub fn cache_forget(&self, bytenr: u64) {
        let mut c = self.cache.lock();
        if let Some(e) = c.map.remove(&bytenr) {
            c.bytes -= e.block.data.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volumes::BlockDevice;
    use std::os::unix::fs::FileExt;
    use ubtrfs_format::items::{bg_flags, ChunkItem};

    const NODE: usize = 16384;

    /// An in-memory device that counts its writes.
    #[derive(Debug)]
    struct Mem {
        bytes: Mutex<Vec<u8>>,
        writes: AtomicU64,
    }

    impl BlockDevice for Mem {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let b = self.bytes.lock();
            buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.lock()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn chunk(ty: u64, stripes: &[(u64, u64)]) -> ChunkItem {
        crate::volumes::tests::chunk_of_len(1 << 20, ty, stripes, 0)
    }

    fn block(tag: u8) -> Vec<u8> {
        (0..NODE).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    fn reader(devices: Vec<Arc<Device>>) -> BlockReader {
        BlockReader::with_geometry(
            devices,
            NODE as u32,
            4096,
            CsumType::Crc32c,
            [1; 16],
            1,
            1 << 20,
        )
    }

    // Test scenario: blocks handed over out of order, some adjacent, land where the chunk map
    // puts each of them, on every copy: DUP on an image file (one pwritev per run and copy),
    // and RAID0 over two backends with a run that crosses a stripe boundary (a backend still
    // gets one write per block).
    #[test]
    fn write_tree_blocks_puts_every_block_where_the_chunk_map_says() {
        let path = std::env::temp_dir().join(format!("ubtrfs-wtb-{}.img", std::process::id()));
        let dev1 = Arc::new(Device::scratch_file(1, &path, 8 << 20));
        let mems: Vec<Arc<Mem>> = (0..2)
            .map(|_| {
                Arc::new(Mem {
                    bytes: Mutex::new(vec![0; 1 << 20]),
                    writes: AtomicU64::new(0),
                })
            })
            .collect();
        let dev2 = Arc::new(Device::from_backend(
            2,
            mems[0].clone(),
            1 << 20,
            "mem2".into(),
        ));
        let dev3 = Arc::new(Device::from_backend(
            3,
            mems[1].clone(),
            1 << 20,
            "mem3".into(),
        ));
        let r = reader(vec![dev1, dev2, dev3]);
        let dup = 1u64 << 30;
        let raid0 = 2u64 << 30;
        r.chunks_mut()
            .insert(
                dup,
                chunk(
                    bg_flags::METADATA | bg_flags::DUP,
                    &[(1, 1 << 20), (1, 4 << 20)],
                ),
                4096,
            )
            .unwrap();
        r.chunks_mut()
            .insert(
                raid0,
                chunk(bg_flags::METADATA | bg_flags::RAID0, &[(2, 0), (3, 0)]),
                4096,
            )
            .unwrap();
        let n = NODE as u64;
        let addrs = [
            dup + 5 * n,
            dup + n,
            raid0 + 5 * n,
            dup,
            raid0 + 2 * n,
            dup + 2 * n,
            raid0 + 4 * n,
            raid0 + 3 * n,
        ];
        let datas: Vec<Vec<u8>> = (0..addrs.len())
            .map(|i| block((i as u8).wrapping_mul(37).wrapping_add(1)))
            .collect();
        let mut blocks: Vec<(u64, &[u8])> = addrs
            .iter()
            .zip(&datas)
            .map(|(a, d)| (*a, &d[..]))
            .collect();
        r.write_tree_blocks(&mut blocks).unwrap();
        for (a, d) in addrs.iter().zip(&datas) {
            let pieces = r.chunks().map(*a, n).unwrap();
            assert_eq!(pieces.len(), 1, "a 16 KiB block inside one stripe");
            assert!(!pieces[0].mirrors.is_empty());
            for &(devid, phys) in &pieces[0].mirrors {
                let mut got = vec![0u8; NODE];
                match devid {
                    1 => r.devices[&1]
                        .file()
                        .unwrap()
                        .read_exact_at(&mut got, phys)
                        .unwrap(),
                    d => mems[(d - 2) as usize].read_at(&mut got, phys).unwrap(),
                }
                assert!(got == *d, "block {a} on device {devid} at {phys}");
            }
        }
        // RAID0: blocks 2..=5 of the chunk, stripes of 64 KiB: 2 and 3 on the first device,
        // 4 and 5 on the second; one backend write per block.
        let backend_writes: u64 = mems.iter().map(|m| m.writes.load(Ordering::Relaxed)).sum();
        assert_eq!(backend_writes, 4);
        let _ = std::fs::remove_file(&path);
    }
}
