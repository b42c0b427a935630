//! Damaged images never make the read path panic or hang (ARCHITECTURE.md contract 3: "Bad input
//! gets a clear error, never a panic").
//!
//! - A seeded corruption loop over a small `mkfs.btrfs --rootdir` image with nodesize 4096 (and
//!   three extents turned into zstd, zlib and lzo extents by hand, as mkfs.btrfs 6.2 cannot
//!   compress): each case flips, zeroes or rewrites bytes or whole fields inside tree blocks, or
//!   grafts a node's key pointer onto another block (mostly recomputing the block checksum
//!   afterwards, so that the damage gets past checksum verification and reaches the
//!   tree-checker, the item parsers and their readers), inside the superblock (with its checksum
//!   recomputed), in data, or anywhere; then `FsInfo::open` and a full walk (see
//!   `common/walk.rs`). Any `Result` is fine; a panic or a case that does not finish within
//!   [`CASE_TIMEOUT`] fails the test with the case seed and the list of mutations. Case seeds
//!   replay on the machine that printed them (the image layout follows the source directory's
//!   readdir order).
//!   Environment: `UBTRFS_FUZZ_ITERS` (cases, default 500), `UBTRFS_FUZZ_SEED` (base seed,
//!   default fixed), `UBTRFS_FUZZ_SECONDS` (stop starting cases after this long),
//!   `UBTRFS_FUZZ_CASE` (run only the case with this seed, as printed by a failure).
//! - The same loop over an image with a pending log tree (ubtrfs fsyncs, then "crashes"), half
//!   of the tree-block damage in the log trees: every read-only open replays the log in memory.
//! - The damaged images of btrfs-progs' fuzz tests (shared testdata): each is refused at open
//!   with a message or served with errors, never a panic or a hang.
//! - Regression tests: the smallest reproducer of every bug this suite found.

mod common;

use common::walk::{walk, walk_keep_contents, WalkLimits, WalkReport};
use common::{case_seed, image, require_tool, Rng, TestDir};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use ubtrfs_ctree::ctree::TreeIter;
use ubtrfs_ctree::disk_io::BlockExpect;
use ubtrfs_format::csum::{CsumType, CSUM_FIELD_SIZE};
use ubtrfs_format::items::{bg_flags, RootItem};
use ubtrfs_format::key::{item, Key};
use ubtrfs_format::super_block::{SUPER_INFO_OFFSET, SUPER_INFO_SIZE};
use ubtrfs_format::tree_block::{TreeBlock, HEADER_SIZE, ITEM_SIZE};
use ubtrfs_fs::{FsInfo, MountOptions};

/// A case (open + walk) that takes longer than this is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);
const NODESIZE: u32 = 4096;
const IMAGE_SIZE: u64 = 256 << 20;
const TREE_SEED: u64 = 0x7562_7472_6673;
const DEFAULT_FUZZ_SEED: u64 = 0x5eed_0000_0001;
/// Failing cases collected before the loop stops and reports.
const MAX_FAILURES: usize = 5;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        v.parse()
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

/// What one open + walk did.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    Served(WalkReport),
}

/// Why a case failed.
#[derive(Debug)]
enum Failure {
    Panic(String),
    Hang,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Panic(m) => write!(f, "panicked: {m}"),
            Failure::Hang => write!(f, "did not finish within {CASE_TIMEOUT:?} (hang)"),
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// `FsInfo::open` + walk of `img` on a thread, under `catch_unwind`, within `limit`.
fn open_and_walk(img: &Path, limit: Duration) -> Result<Outcome, Failure> {
    let (tx, rx) = mpsc::channel();
    let img = img.to_path_buf();
    std::thread::Builder::new()
        .name("open-and-walk".into())
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| {
                match FsInfo::open(&img, MountOptions::default()) {
                    Err(e) => Outcome::Refused(e.to_string()),
                    Ok(fs) => Outcome::Served(walk(&fs, &WalkLimits::default())),
                }
            }));
            let _ = tx.send(r.map_err(|p| panic_message(&*p)));
        })
        .expect("spawning the walk thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(msg)) => Err(Failure::Panic(msg)),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::Hang),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(Failure::Panic("walk thread died without a result".into()))
        }
    }
}

/// The clean test image and where its metadata lives.
struct Fixture {
    _dir: TestDir,
    src: PathBuf,
    img: PathBuf,
    csum_type: CsumType,
    nodesize: usize,
    /// Every tree block reachable from the superblock: logical bytenr, physical offsets of its
    /// copies (DUP metadata has two), and its undamaged content (mutations are placed by the
    /// clean layout, so that several mutations of one block in a case stay inside it).
    blocks: Vec<(u64, Vec<u64>, TreeBlock)>,
    /// Physical ranges of data chunks (first copy).
    data_ranges: Vec<(u64, u64)>,
    /// Indices into `blocks` that half of the tree-block mutations pick (the log tree blocks of
    /// the log fixture); empty means uniform.
    hot: Vec<usize>,
    image_len: u64,
}

fn build_fixture(name: &str) -> Fixture {
    let dir = TestDir::new(name);
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    image::generate_tree(&src, TREE_SEED);
    let img = dir.join("image.raw");
    image::mkfs_rootdir(&src, &img, IMAGE_SIZE, NODESIZE);
    let mut fx = collect_fixture(dir, src, img);
    // mkfs.btrfs 6.2 cannot compress; make compressed extents by hand so that the compressed
    // read path (and the extent fields it trusts) meets the damage too.
    let mut p = Patcher::new(&fx.img);
    compress_file(&fx, &mut p, "file-70000", 3);
    compress_file(&fx, &mut p, "a/b/leaf", 1);
    compress_file(&fx, &mut p, "a/b/c/leaf", 2);
    drop(p);
    for (_, mirrors, block) in &mut fx.blocks {
        let mut b = vec![0u8; fx.nodesize];
        File::open(&fx.img)
            .unwrap()
            .read_exact_at(&mut b, mirrors[0])
            .unwrap();
        *block = TreeBlock::new(b).unwrap();
    }
    fx
}

/// The test image with a pending log tree: after mkfs, ubtrfs mounts it read-write, writes and
/// fsyncs (a new file, an append, an inline file), then "crashes" (drops the FsInfo without a
/// commit). Every read-only open replays the log in memory, so damage to the log trees reaches
/// log replay; the log tree blocks are the hot blocks.
fn build_log_fixture(name: &str) -> Fixture {
    let dir = TestDir::new(name);
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    image::generate_tree(&src, TREE_SEED);
    let img = dir.join("image.raw");
    image::mkfs_rootdir(&src, &img, IMAGE_SIZE, NODESIZE);
    {
        use ubtrfs_fs::{file_write, inode, tree_log};
        let rw = MountOptions {
            readonly: false,
            commit_interval: 3600,
            ..MountOptions::default()
        };
        let fs = FsInfo::open(&img, rw).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let mut rng = Rng::new(TREE_SEED);
        let mut data = vec![0u8; 70_000];
        rng.fill(&mut data);
        let (new, _) =
            inode::btrfs_new_inode(&fs, root, dir, b"logged", 0o100644, 0, 0, 0).unwrap();
        file_write::btrfs_buffered_write(&fs, root, new, 0, &data).unwrap();
        tree_log::btrfs_sync_file(&fs, root, new).unwrap();
        let old = ino_of(&fs, "file-4096");
        file_write::btrfs_buffered_write(&fs, root, old, 4096, &data[..10_000]).unwrap();
        tree_log::btrfs_sync_file(&fs, root, old).unwrap();
        let (small, _) =
            inode::btrfs_new_inode(&fs, root, dir, b"inline", 0o100600, 0, 0, 0).unwrap();
        file_write::btrfs_buffered_write(&fs, root, small, 0, b"fsynced inline").unwrap();
        tree_log::btrfs_sync_file(&fs, root, small).unwrap();
        // Crash: no commit.
    }
    let mut fx = collect_fixture(dir, src, img);
    assert!(!fx.hot.is_empty(), "the log fixture has no log tree");
    // The source tree is not what the image holds any more; nothing compares with it.
    fx.src = PathBuf::new();
    fx
}

/// Open the image (without log replay, so that the trees are the ones on disk) and list every
/// tree block reachable from the superblock, the log trees included.
fn collect_fixture(dir: TestDir, src: PathBuf, img: PathBuf) -> Fixture {
    let opts = MountOptions {
        nologreplay: true,
        ..MountOptions::default()
    };
    let fs = FsInfo::open(&img, opts).unwrap_or_else(|e| panic!("opening the clean image: {e}"));
    let reader = &fs.reader;
    // Roots: chunk tree, root tree, and every tree the root tree names; the log root tree and
    // every log tree it names.
    let mut todo = vec![fs.sb.chunk_root, fs.sb.root];
    for r in TreeIter::new(reader, fs.tree_root(), Key::MIN) {
        let (key, block, slot) = r.expect("iterating the clean root tree");
        if key.item_type == item::ROOT_ITEM {
            let ri = RootItem::parse(block.item_data(slot).unwrap()).unwrap();
            todo.push(ri.bytenr);
        }
    }
    // Blocks below the log root tree, and below every log tree its ROOT_ITEMs name, are log
    // blocks.
    let mut log_blocks = BTreeSet::new();
    let mut log_todo = Vec::new();
    if fs.sb.log_root != 0 {
        log_todo.push(fs.sb.log_root);
    }
    while let Some(b) = log_todo.pop() {
        if !log_blocks.insert(b) {
            continue;
        }
        todo.push(b);
        let blk = reader.read_tree_block(b, BlockExpect::default()).unwrap();
        if !blk.is_leaf() {
            for s in 0..blk.nritems() {
                log_todo.push(blk.key_ptr(s).unwrap().blockptr);
            }
        } else if blk.header.owner == ubtrfs_format::key::objectid::TREE_LOG {
            for s in 0..blk.nritems() {
                if blk.item_key(s).unwrap().item_type == item::ROOT_ITEM {
                    let ri = RootItem::parse(blk.item_data(s).unwrap()).unwrap();
                    log_todo.push(ri.bytenr);
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    while let Some(bytenr) = todo.pop() {
        if !seen.insert(bytenr) {
            continue;
        }
        let b = reader
            .read_tree_block(bytenr, BlockExpect::default())
            .unwrap_or_else(|e| panic!("clean image: tree block {bytenr}: {e}"));
        if !b.is_leaf() {
            for s in 0..b.nritems() {
                todo.push(b.key_ptr(s).unwrap().blockptr);
            }
        }
    }
    let chunks = reader.chunks();
    let blocks = seen
        .iter()
        .map(|&bytenr| {
            let pieces = chunks.map(bytenr, u64::from(NODESIZE)).unwrap();
            assert_eq!(pieces.len(), 1, "tree block {bytenr} crosses a stripe");
            let block = reader
                .read_tree_block(bytenr, BlockExpect::default())
                .unwrap();
            (
                bytenr,
                pieces[0].mirrors.iter().map(|m| m.1).collect(),
                (*block).clone(),
            )
        })
        .collect::<Vec<_>>();
    let data_ranges = chunks
        .iter()
        .filter(|c| c.item.chunk_type & bg_flags::DATA != 0)
        .map(|c| (c.item.stripes[0].offset, c.item.length))
        .collect();
    drop(chunks);
    let csum_type = reader.csum_type;
    drop(fs);
    let image_len = std::fs::metadata(&img).unwrap().len();
    let hot = blocks
        .iter()
        .enumerate()
        .filter(|(_, (b, _, _))| log_blocks.contains(b))
        .map(|(i, _)| i)
        .collect();
    Fixture {
        _dir: dir,
        src,
        img,
        csum_type,
        nodesize: NODESIZE as usize,
        blocks,
        data_ranges,
        hot,
        image_len,
    }
}

/// Compressible content: words and numbers.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let words: [&[u8]; 6] = [b"btrfs ", b"extent ", b"leaf ", b"node ", b"csum ", b"\n"];
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(words[rng.index(words.len())]);
    }
    v.truncate(len);
    v
}

/// Compress `data` the way btrfs stores it: zlib (1) and zstd (3) as one stream, lzo (2) in
/// btrfs's segmented format (total length, then per-sector segments whose headers never cross
/// a sector boundary).
fn btrfs_compress(kind: u8, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match kind {
        1 => {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(3));
            z.write_all(data).unwrap();
            z.finish().unwrap()
        }
        2 => {
            let mut out = vec![0u8; 4];
            for chunk in data.chunks(4096) {
                let left = 4096 - out.len() % 4096;
                if left < 4 {
                    out.resize(out.len() + left, 0);
                }
                let c = lzokay::compress::compress(chunk).unwrap();
                out.extend_from_slice(&(c.len() as u32).to_le_bytes());
                out.extend_from_slice(&c);
            }
            let total = out.len() as u32;
            out[..4].copy_from_slice(&total.to_le_bytes());
            out
        }
        _ => zstd::bulk::compress(data, 3).unwrap(),
    }
}

/// Inode number of `path` (relative to the top level) in an opened image.
fn ino_of(fs: &FsInfo, path: &str) -> u64 {
    let root = fs.mount_root;
    let mut ino = fs.root(root).unwrap().item.root_dirid;
    for c in path.split('/') {
        match ubtrfs_fs::dir_item::lookup(fs, root, ino, c.as_bytes()).unwrap() {
            ubtrfs_fs::dir_item::Target::Inode { ino: i, .. } => ino = i,
            t => panic!("{path}: {t:?}"),
        }
    }
    ino
}

/// Turn the single regular extent of `path` into a compressed extent (1 zlib, 2 lzo, 3 zstd)
/// of new compressible content, which also replaces the file in the source tree: the
/// compressed bytes go to the extent's first sector, the extent item says compressed with one
/// sector on disk, and that sector's data checksum is updated.
fn compress_file(fx: &Fixture, p: &mut Patcher, path: &str, kind: u8) {
    let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
    let ino = ino_of(&fs, path);
    let size = ubtrfs_fs::inode::read_inode(&fs, fs.mount_root, ino)
        .unwrap()
        .size;
    let (idx, slot, key) = find_item(fx, |k| *k == Key::new(ino, item::EXTENT_DATA, 0));
    let fe = ubtrfs_format::items::FileExtentItem::parse(fx.blocks[idx].2.item_data(slot).unwrap())
        .unwrap();
    assert!(
        fe.extent_type == 1 && fe.num_bytes >= size && fe.num_bytes <= 128 << 10,
        "{path}: {key} is not one small regular extent: {fe:?}"
    );
    let content = text(size as usize, ino);
    let mut disk = btrfs_compress(kind, &content);
    let disk_num_bytes = (disk.len() as u64).next_multiple_of(4096);
    assert!(
        disk_num_bytes < fe.disk_num_bytes,
        "{path}: compressed to {} bytes",
        disk.len()
    );
    disk.resize(disk_num_bytes as usize, 0);
    // One chunk stripe holds the whole extent (data chunks are single on one device).
    let phys = fs
        .reader
        .chunks()
        .map(fe.disk_bytenr, disk_num_bytes)
        .unwrap()[0]
        .mirrors[0]
        .1;
    drop(fs);
    p.write(phys, &disk);
    patch_item(fx, p, idx, slot, FE_COMPRESSION, &[kind]);
    patch_item(
        fx,
        p,
        idx,
        slot,
        FE_DISK_NUM_BYTES,
        &disk_num_bytes.to_le_bytes(),
    );
    patch_item(fx, p, idx, slot, FE_RAM_BYTES, &fe.num_bytes.to_le_bytes());
    // Compressed extents are summed over their on-disk sectors.
    let csize = fx.csum_type.size();
    for (i, sector) in disk.chunks(4096).enumerate() {
        let logical = fe.disk_bytenr + i as u64 * 4096;
        let covers = |b: &TreeBlock, slot: usize| {
            let it = b.item(slot).unwrap();
            let end = it.key.offset + u64::from(it.size) / csize as u64 * 4096;
            it.key.item_type == item::EXTENT_CSUM && (it.key.offset..end).contains(&logical)
        };
        let (cidx, cslot) = fx
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, (_, _, b))| b.is_leaf() && b.header.owner == 7)
            .flat_map(|(i, (_, _, b))| (0..b.nritems()).map(move |s| (i, s, b)))
            .find(|&(_, s, b)| covers(b, s))
            .map(|(i, s, _)| (i, s))
            .unwrap_or_else(|| panic!("no csum item covers {path} at {logical}"));
        let ckey = fx.blocks[cidx].2.item_key(cslot).unwrap();
        let at = ((logical - ckey.offset) / 4096) as usize * csize;
        let c = fx.csum_type.compute(sector);
        patch_item(fx, p, cidx, cslot, at, &c[..csize]);
    }
    std::fs::write(fx.src.join(path), &content).unwrap();
}

/// Byte writes to the image that can be undone.
struct Patcher {
    file: File,
    undo: Vec<(u64, Vec<u8>)>,
}

impl Patcher {
    fn new(img: &Path) -> Patcher {
        let file = OpenOptions::new().read(true).write(true).open(img).unwrap();
        Patcher {
            file,
            undo: Vec::new(),
        }
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.file.read_exact_at(&mut b, off).unwrap();
        b
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let old = self.read(off, data.len());
        self.undo.push((off, old));
        self.file.write_all_at(data, off).unwrap();
    }

    fn restore(&mut self) {
        while let Some((off, old)) = self.undo.pop() {
            self.file.write_all_at(&old, off).unwrap();
        }
    }
}

/// Values that tend to break arithmetic when written over a field.
fn interesting(rng: &mut Rng, nodesize: usize) -> u64 {
    const V: &[u64] = &[
        0,
        1,
        2,
        0x7f,
        0x80,
        0xff,
        0x100,
        0xfff,
        0x1000,
        0x7fff,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0000,
        1 << 40,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 4095,
        u64::MAX - 1,
        u64::MAX,
    ];
    match rng.below(4) {
        0 => rng.next_u64(),
        1 => (nodesize as u64).wrapping_add(rng.below(5)).wrapping_sub(2),
        _ => V[rng.index(V.len())],
    }
}

/// Damage `buf[lo..hi]` (non-empty) in one of several ways; returns a description.
fn mutate_range(rng: &mut Rng, buf: &mut [u8], lo: usize, hi: usize, nodesize: usize) -> String {
    let off = lo + rng.index(hi - lo);
    match rng.below(7) {
        0 => {
            let bit = rng.below(8);
            buf[off] ^= 1 << bit;
            format!("flip bit {bit} at {off}")
        }
        1 => {
            let v = rng.below(256) as u8;
            buf[off] = v;
            format!("byte {v:#x} at {off}")
        }
        2 => {
            let n = (1 + rng.index(16)).min(buf.len() - off);
            buf[off..off + n].fill(0);
            format!("zero {n} bytes at {off}")
        }
        3 => {
            let n = (1 + rng.index(32)).min(buf.len() - off);
            rng.fill(&mut buf[off..off + n]);
            format!("random {n} bytes at {off}")
        }
        4 => {
            // Copy a run from elsewhere in the block (a plausible-looking value).
            let n = (1 + rng.index(25)).min(buf.len() - off);
            let from = rng.index(buf.len() - n + 1);
            buf.copy_within(from..from + n, off);
            format!("copy {n} bytes from {from} to {off}")
        }
        _ => {
            let width = [1usize, 2, 4, 8][rng.index(4)];
            let v = interesting(rng, nodesize);
            let n = width.min(buf.len() - off);
            buf[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
            format!("{n}-byte value {v:#x} at {off}")
        }
    }
}

/// Damage one tree block: a region (header, item table or one item's data), a mutation, then
/// usually a recomputed checksum; written to every copy or only the first.
fn mutate_tree_block(rng: &mut Rng, fx: &Fixture, p: &mut Patcher) -> String {
    let pick = if !fx.hot.is_empty() && rng.chance(1, 2) {
        fx.hot[rng.index(fx.hot.len())]
    } else {
        rng.index(fx.blocks.len())
    };
    let (bytenr, mirrors, block) = &fx.blocks[pick];
    let ns = fx.nodesize;
    let mut buf = p.read(mirrors[0], ns);
    let n = block.nritems();
    let table_end = if block.is_leaf() {
        HEADER_SIZE + n * ITEM_SIZE
    } else {
        HEADER_SIZE + n * 33
    };
    if !block.is_leaf() && rng.chance(1, 4) {
        if let Some(d) = graft(rng, fx, block, &mut buf) {
            return finish_tree_block(rng, fx, p, *bytenr, mirrors, block, buf, vec![d]);
        }
    }
    if rng.chance(2, 5) {
        if let Some(d) = mutate_field(rng, block, &mut buf, ns) {
            return finish_tree_block(rng, fx, p, *bytenr, mirrors, block, buf, vec![d]);
        }
    }
    let (what, lo, hi) = match rng.below(10) {
        0..=2 => ("header", CSUM_FIELD_SIZE, HEADER_SIZE),
        3..=5 if n > 0 => ("item table", HEADER_SIZE, table_end),
        6..=8 if block.is_leaf() && n > 0 => {
            let slot = rng.index(n);
            let it = block.item(slot).unwrap();
            let lo = HEADER_SIZE + it.offset as usize;
            let hi = lo + it.size as usize;
            if hi > lo {
                ("item data", lo, hi)
            } else {
                ("item table", HEADER_SIZE, table_end)
            }
        }
        _ => ("block", CSUM_FIELD_SIZE, ns),
    };
    let mut descs = vec![format!(
        "{what}: {}",
        mutate_range(rng, &mut buf, lo, hi, ns)
    )];
    while rng.chance(1, 4) {
        descs.push(mutate_range(rng, &mut buf, lo, hi, ns));
    }
    finish_tree_block(rng, fx, p, *bytenr, mirrors, block, buf, descs)
}

/// Point a key pointer of node `block` at another block of the right level (anywhere: another
/// slot, another tree), with that block's first key and generation, so that the parent checks
/// pass and the tree becomes a DAG, shares a subtree with another tree or repeats one.
fn graft(rng: &mut Rng, fx: &Fixture, block: &TreeBlock, buf: &mut [u8]) -> Option<String> {
    let n = block.nritems();
    let cands: Vec<_> = fx
        .blocks
        .iter()
        .filter(|(_, _, b)| b.level() + 1 == block.level() && b.nritems() > 0)
        .collect();
    if n == 0 || cands.is_empty() {
        return None;
    }
    let slot = rng.index(n);
    let (target, _, tb) = cands[rng.index(cands.len())];
    let off = HEADER_SIZE + slot * 33;
    let key = if rng.chance(1, 2) {
        tb.first_key().ok()??
    } else {
        // Keep the slot's key: the child check then fails unless the keys happen to agree.
        block.key_ptr(slot).ok()?.key
    };
    key.encode(buf, off);
    buf[off + 17..off + 25].copy_from_slice(&target.to_le_bytes());
    buf[off + 25..off + 33].copy_from_slice(&tb.header.generation.to_le_bytes());
    Some(format!(
        "key ptr {slot} grafted onto block {target} (owner {}) with key {key:?}",
        tb.header.owner
    ))
}

/// Offsets and widths of the fields of an item body of type `t` (`btrfs_tree.h`).
fn item_fields(t: u8) -> &'static [(usize, usize)] {
    match t {
        // generation, transid, size, nbytes, block_group, nlink, uid, gid, mode, rdev, flags.
        item::INODE_ITEM => &[
            (0, 8),
            (8, 8),
            (16, 8),
            (24, 8),
            (32, 8),
            (40, 4),
            (52, 4),
            (56, 8),
            (64, 8),
        ],
        // index, name_len.
        item::INODE_REF => &[(0, 8), (8, 2)],
        // parent, index, name_len.
        item::INODE_EXTREF => &[(0, 8), (8, 8), (16, 2)],
        // location key (objectid, type, offset), transid, data_len, name_len, type.
        item::DIR_ITEM | item::DIR_INDEX | item::XATTR_ITEM => {
            &[(0, 8), (8, 1), (9, 8), (17, 8), (25, 2), (27, 2), (29, 1)]
        }
        // generation, ram_bytes, compression, encryption, other_encoding, type, disk_bytenr,
        // disk_num_bytes, offset, num_bytes.
        item::EXTENT_DATA => &[
            (0, 8),
            (8, 8),
            (16, 1),
            (17, 1),
            (18, 2),
            (20, 1),
            (21, 8),
            (29, 8),
            (37, 8),
            (45, 8),
        ],
        // inode (size, mode), generation, root_dirid, bytenr, byte_limit, bytes_used,
        // last_snapshot, flags, refs, drop key, drop_level, level.
        item::ROOT_ITEM => &[
            (16, 8),
            (52, 4),
            (160, 8),
            (168, 8),
            (176, 8),
            (184, 8),
            (192, 8),
            (200, 8),
            (208, 8),
            (216, 4),
            (220, 8),
            (237, 1),
            (238, 1),
        ],
        // dirid, sequence, name_len.
        item::ROOT_REF | item::ROOT_BACKREF => &[(0, 8), (8, 8), (16, 2)],
        // length, owner, stripe_len, type, sector_size, num_stripes, sub_stripes, stripe 0.
        item::CHUNK_ITEM => &[
            (0, 8),
            (8, 8),
            (16, 8),
            (24, 8),
            (40, 4),
            (44, 2),
            (46, 2),
            (48, 8),
            (56, 8),
        ],
        // used, chunk_objectid, flags.
        item::BLOCK_GROUP_ITEM => &[(0, 8), (8, 8), (16, 8)],
        // devid, total_bytes, bytes_used, sector_size.
        item::DEV_ITEM => &[(0, 8), (8, 8), (16, 8), (32, 4)],
        // EXTENT_CSUM and others: the first checksum.
        _ => &[(0, 4)],
    }
}

/// Overwrite one whole field (header, key, item table entry, key pointer or a field of an item
/// body) with an interesting value. None when the block offers no such field.
fn mutate_field(rng: &mut Rng, block: &TreeBlock, buf: &mut [u8], ns: usize) -> Option<String> {
    let n = block.nritems();
    let (what, off, width) = match rng.below(6) {
        0 => {
            // bytenr, flags, generation, owner, nritems, level.
            const H: &[(usize, usize)] = &[(48, 8), (56, 8), (80, 8), (88, 8), (96, 4), (100, 1)];
            let (o, w) = H[rng.index(H.len())];
            ("header field".to_string(), o, w)
        }
        1 | 2 if n > 0 && !block.is_leaf() => {
            // key objectid, type, offset; blockptr; generation.
            const P: &[(usize, usize)] = &[(0, 8), (8, 1), (9, 8), (17, 8), (25, 8)];
            let slot = rng.index(n);
            let (o, w) = P[rng.index(P.len())];
            (format!("key ptr {slot}"), HEADER_SIZE + slot * 33 + o, w)
        }
        1 if n > 0 => {
            // key objectid, type, offset; data offset; data size.
            const I: &[(usize, usize)] = &[(0, 8), (8, 1), (9, 8), (17, 4), (21, 4)];
            let slot = rng.index(n);
            let (o, w) = I[rng.index(I.len())];
            (
                format!("item {slot} header"),
                HEADER_SIZE + slot * ITEM_SIZE + o,
                w,
            )
        }
        _ if n > 0 && block.is_leaf() => {
            let slot = rng.index(n);
            let it = block.item(slot).ok()?;
            let fields = item_fields(it.key.item_type);
            let (o, w) = fields[rng.index(fields.len())];
            if o + w > it.size as usize {
                return None;
            }
            (
                format!("item {slot} {:?} body field {o}", it.key),
                HEADER_SIZE + it.offset as usize + o,
                w,
            )
        }
        _ => return None,
    };
    let v = match rng.below(3) {
        // Nudge the current value: off-by-one errors and small overflows.
        0 => {
            let mut cur = [0u8; 8];
            cur[..width].copy_from_slice(&buf[off..off + width]);
            let delta = [1u64, u64::MAX, 4096, 0u64.wrapping_sub(4096)][rng.index(4)];
            u64::from_le_bytes(cur).wrapping_add(delta)
        }
        _ => interesting(rng, ns),
    };
    buf[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
    Some(format!("{what}: {width}-byte value {v:#x} at {off}"))
}

#[allow(clippy::too_many_arguments)]
fn finish_tree_block(
    rng: &mut Rng,
    fx: &Fixture,
    p: &mut Patcher,
    bytenr: u64,
    mirrors: &[u64],
    block: &TreeBlock,
    mut buf: Vec<u8>,
    descs: Vec<String>,
) -> String {
    let recsum = rng.chance(17, 20);
    if recsum {
        let c = fx.csum_type.compute(&buf[CSUM_FIELD_SIZE..]);
        buf[..CSUM_FIELD_SIZE].copy_from_slice(&c);
    }
    let all = rng.chance(17, 20);
    for (i, &m) in mirrors.iter().enumerate() {
        if i == 0 || all {
            p.write(m, &buf);
        }
    }
    format!(
        "tree block {bytenr} ({} level {} owner {}) {}{}{}",
        if block.is_leaf() { "leaf" } else { "node" },
        block.level(),
        block.header.owner,
        descs.join(", "),
        if recsum { ", csum recomputed" } else { "" },
        if all { ", all copies" } else { ", first copy" },
    )
}

/// Damage the primary superblock, usually recomputing its checksum.
fn mutate_super(rng: &mut Rng, fx: &Fixture, p: &mut Patcher) -> String {
    let mut buf = p.read(SUPER_INFO_OFFSET, SUPER_INFO_SIZE);
    // Mostly the fields up to the end of sys_chunk_array's usual content.
    let d = if rng.chance(1, 2) {
        // generation, root, chunk_root, log_root, total_bytes, bytes_used, root_dir_objectid,
        // num_devices, sectorsize, nodesize, stripesize, sys_chunk_array_size,
        // chunk_root_generation, compat_ro, incompat, csum_type, the three levels, dev_item
        // devid / total_bytes / bytes_used, and the first sys chunk: key offset, length,
        // stripe_len, type, num_stripes, sub_stripes, stripe devid and offset.
        const F: &[(usize, usize)] = &[
            (72, 8),
            (80, 8),
            (88, 8),
            (96, 8),
            (112, 8),
            (120, 8),
            (128, 8),
            (136, 8),
            (144, 4),
            (148, 4),
            (156, 4),
            (160, 4),
            (164, 8),
            (180, 8),
            (188, 8),
            (196, 2),
            (198, 1),
            (199, 1),
            (200, 1),
            (201, 8),
            (209, 8),
            (217, 8),
            (820, 8),
            (828, 8),
            (844, 8),
            (852, 8),
            (872, 2),
            (874, 2),
            (876, 8),
            (884, 8),
        ];
        let (off, width) = F[rng.index(F.len())];
        let v = interesting(rng, fx.nodesize);
        buf[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
        format!("field: {width}-byte value {v:#x} at {off}")
    } else {
        let hi = if rng.chance(3, 4) {
            811 + 400
        } else {
            SUPER_INFO_SIZE
        };
        mutate_range(rng, &mut buf, CSUM_FIELD_SIZE, hi, fx.nodesize)
    };
    let recsum = rng.chance(4, 5);
    if recsum {
        let c = fx.csum_type.compute(&buf[CSUM_FIELD_SIZE..]);
        buf[..CSUM_FIELD_SIZE].copy_from_slice(&c);
    }
    p.write(SUPER_INFO_OFFSET, &buf);
    format!(
        "superblock: {d}{}",
        if recsum { ", csum recomputed" } else { "" }
    )
}

/// Damage a few bytes of file data.
fn mutate_data(rng: &mut Rng, fx: &Fixture, p: &mut Patcher) -> String {
    let (start, len) = fx.data_ranges[rng.index(fx.data_ranges.len())];
    // The generated files live near the start of the data chunk.
    let span = len
        .min(4 << 20)
        .min(fx.image_len.saturating_sub(start))
        .max(1);
    let off = start + rng.below(span);
    let n = 1 + rng.index(64);
    let mut b = vec![0u8; n];
    rng.fill(&mut b);
    p.write(off, &b);
    format!("data: random {n} bytes at physical {off}")
}

/// Damage bytes anywhere in the image.
fn mutate_anywhere(rng: &mut Rng, fx: &Fixture, p: &mut Patcher) -> String {
    let off = rng.below(fx.image_len - 8);
    let mut b = p.read(off, 8);
    let d = mutate_range(rng, &mut b, 0, 8, fx.nodesize);
    p.write(off, &b);
    format!("anywhere at physical {off}: {d}")
}

/// Apply the mutations of case `seed`; returns their descriptions.
fn apply_case(seed: u64, fx: &Fixture, p: &mut Patcher) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let count = 1 + usize::from(rng.chance(1, 3)) + usize::from(rng.chance(1, 6));
    (0..count)
        .map(|_| match rng.below(20) {
            0..=13 => mutate_tree_block(&mut rng, fx, p),
            14..=15 => mutate_super(&mut rng, fx, p),
            16..=17 => mutate_data(&mut rng, fx, p),
            _ => mutate_anywhere(&mut rng, fx, p),
        })
        .collect()
}

/// The restored image must open: otherwise every case would be "refused" and the loop would
/// test nothing (say the image was removed under the test, or a restore went wrong).
fn clean_image_still_opens(fx: &Fixture) {
    if let Err(e) = FsInfo::open(&fx.img, MountOptions::default()) {
        panic!("the restored test image no longer opens, the loop tests nothing: {e}");
    }
}

// Test scenario: the walker reads the undamaged image completely and exactly: every file's
// content (compressed extents included), every symlink target and every xattr equal the source
// tree, with no error.
#[test]
fn walk_of_clean_image_matches_source() {
    let fx = build_fixture("clean-walk");
    let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
    let r = walk_keep_contents(&fs, &WalkLimits::default());
    assert!(
        r.errors.is_empty(),
        "errors on a clean image: {:#?}",
        r.errors
    );
    assert!(!r.truncated && r.cycles == 0);
    // The hand-made zstd, zlib and lzo extents were read through decompression.
    let decompressed = fs
        .counters
        .decompressed_extents
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(decompressed >= 3, "{decompressed} extents decompressed");
    let mut files = 0;
    for (path, content) in &r.contents {
        let want = std::fs::read(fx.src.join(path.trim_start_matches('/'))).unwrap();
        assert!(*content == want, "content of {path} differs");
        files += 1;
    }
    // Top-level files, sparse, big dir, one leaf per deep level, the hard link.
    assert_eq!(
        files,
        image::FILE_SIZES.len() + 1 + image::BIG_DIR_ENTRIES + 6 + 1
    );
    for (path, target) in &r.links {
        let want = std::fs::read_link(fx.src.join(path.trim_start_matches('/'))).unwrap();
        assert_eq!(target.as_slice(), want.as_os_str().as_encoded_bytes());
    }
    assert_eq!(r.links.len(), 2);
    assert_eq!(r.xattr_values.len(), 22);
    for (path, name, value) in &r.xattr_values {
        if name == b"user.small" {
            assert_eq!(path, "/file-100");
            assert_eq!(value, b"value");
        }
    }
    assert!(
        fx.blocks.len() > 20,
        "only {} tree blocks: the image should have many at nodesize 4096",
        fx.blocks.len()
    );
}

/// Run the seeded corruption loop over `fx` (see the module doc for the environment).
fn fuzz_loop(fx: &Fixture, what: &str, default_iters: u64) {
    let base = env_u64("UBTRFS_FUZZ_SEED").unwrap_or(DEFAULT_FUZZ_SEED);
    let iters = env_u64("UBTRFS_FUZZ_ITERS").unwrap_or(default_iters);
    let deadline = env_u64("UBTRFS_FUZZ_SECONDS").map(|s| Instant::now() + Duration::from_secs(s));
    let only = env_u64("UBTRFS_FUZZ_CASE");
    eprintln!(
        "{what}: base seed {base:#x}, {iters} cases, {} tree blocks ({} hot) \
         (replay: UBTRFS_FUZZ_SEED={base:#x}; one case: UBTRFS_FUZZ_CASE=<case seed>)",
        fx.blocks.len(),
        fx.hot.len()
    );
    let mut p = Patcher::new(&fx.img);
    let mut stats: HashMap<&str, u64> = HashMap::new();
    let mut failures = Vec::new();
    let mut ran = 0u64;
    for i in 0..iters {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let seed = only.unwrap_or_else(|| case_seed(base, i));
        let muts = apply_case(seed, fx, &mut p);
        let result = open_and_walk(&fx.img, CASE_TIMEOUT);
        ran += 1;
        match &result {
            Ok(Outcome::Refused(_)) => *stats.entry("refused at open").or_default() += 1,
            Ok(Outcome::Served(r)) if r.errors.is_empty() => {
                *stats.entry("served without error").or_default() += 1
            }
            Ok(Outcome::Served(_)) => *stats.entry("served with errors").or_default() += 1,
            Err(f) => {
                let msg = format!(
                    "{what} case {i} seed {seed:#x}: {f}\n  mutations:\n    {}",
                    muts.join("\n    ")
                );
                eprintln!("FAILED {msg}");
                failures.push(msg);
            }
        }
        if matches!(result, Err(Failure::Hang)) {
            // The hung thread still reads the image; stop here rather than change it under it.
            break;
        }
        p.restore();
        if i % 256 == 255 {
            clean_image_still_opens(fx);
        }
        if failures.len() >= MAX_FAILURES || only.is_some() {
            break;
        }
    }
    p.restore();
    clean_image_still_opens(fx);
    let mut s: Vec<_> = stats.into_iter().collect();
    s.sort();
    eprintln!("{what}: {ran} cases run: {s:?}");
    assert!(
        failures.is_empty(),
        "{} failing case(s) (base seed {base:#x}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// Test scenario: seeded random corruption of tree blocks (mostly with a recomputed checksum so
// the damage reaches the tree-checker and item parsers), of the superblock, of data and of
// arbitrary bytes; each case is opened and walked. No case may panic or hang.
#[test]
fn random_corruption_never_panics() {
    let fx = build_fixture("fuzz");
    fuzz_loop(&fx, "corruption fuzz", 500);
}

// Test scenario: the same seeded corruption on an image with a pending log tree (written by
// ubtrfs's fsync, then a crash), half of the tree-block damage in the log trees: every open
// replays the damaged log in memory. No case may panic or hang.
#[test]
fn random_log_corruption_never_panics() {
    let fx = build_log_fixture("log-fuzz");
    fuzz_loop(&fx, "log corruption fuzz", 300);
}

fn testdata_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UBTRFS_TESTDATA") {
        return PathBuf::from(d);
    }
    // shared/ lies beside the repository (in CI as on developer machines).
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata")
}

// Test scenario: every damaged image from btrfs-progs' fuzz tests is refused at open with a
// message or served with errors; none panics, none takes longer than 30 s.
#[test]
fn btrfs_progs_fuzz_images_never_panic() {
    require_tool("xz");
    let src = testdata_dir().join("btrfs-progs-fuzz-images");
    let mut images: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{src:?}: {e} (set UBTRFS_TESTDATA to shared/testdata)"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xz"))
        .collect();
    images.sort();
    assert!(
        images.len() >= 40,
        "only {} images in {src:?}",
        images.len()
    );
    let dir = TestDir::new("progs-fuzz");
    let mut failures = Vec::new();
    for xz in &images {
        let name = xz.file_stem().unwrap().to_string_lossy().into_owned();
        let raw = dir.join(&name);
        // xz writes sparse output when stdout is a regular file.
        let out = File::create(&raw).unwrap();
        let st = std::process::Command::new("xz")
            .arg("-dc")
            .arg(xz)
            .stdout(out)
            .status()
            .expect("running xz");
        assert!(st.success(), "xz -dc {xz:?}: {st}");
        match open_and_walk(&raw, CASE_TIMEOUT) {
            Ok(Outcome::Refused(msg)) => eprintln!("{name}: refused at open: {msg}"),
            Ok(Outcome::Served(r)) => eprintln!(
                "{name}: served: {} dirs, {} files, {} symlinks, {} bytes, {} errors{}{}",
                r.dirs,
                r.files,
                r.symlinks,
                r.bytes_read,
                r.errors.len(),
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}; first: {} at {}: {})",
                        r.error_summary(),
                        r.errors[0].op,
                        r.errors[0].at,
                        r.errors[0].msg
                    )
                },
                if r.truncated { ", walk truncated" } else { "" }
            ),
            Err(f) => {
                eprintln!("{name}: FAILED: {f}");
                failures.push(format!("{name}: {f}"));
                if matches!(f, Failure::Hang) {
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&raw);
    }
    assert!(
        failures.is_empty(),
        "failing images:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Regression tests: the smallest reproducer of each bug the suite found.
// ---------------------------------------------------------------------------------------------

/// The fixture's block index and slot of the first item whose key satisfies `pred`.
fn find_item(fx: &Fixture, pred: impl Fn(&Key) -> bool) -> (usize, usize, Key) {
    for (i, (_, _, b)) in fx.blocks.iter().enumerate() {
        if !b.is_leaf() {
            continue;
        }
        for slot in 0..b.nritems() {
            let k = b.item_key(slot).unwrap();
            if pred(&k) {
                return (i, slot, k);
            }
        }
    }
    panic!("no such item in the test image");
}

/// Overwrite `bytes` at `off` inside the data of item `slot` of fixture block `idx`, on every
/// copy, with the block checksum recomputed (so the damage reaches the tree-checker).
fn patch_item(fx: &Fixture, p: &mut Patcher, idx: usize, slot: usize, off: usize, bytes: &[u8]) {
    let it = fx.blocks[idx].2.item(slot).unwrap();
    assert!(
        off + bytes.len() <= it.size as usize,
        "patch outside the item"
    );
    patch_block(fx, p, idx, HEADER_SIZE + it.offset as usize + off, bytes);
}

/// Overwrite `bytes` at byte `at` of fixture block `idx`, on every copy, with the block
/// checksum recomputed.
fn patch_block(fx: &Fixture, p: &mut Patcher, idx: usize, at: usize, bytes: &[u8]) {
    let (_, mirrors, _) = &fx.blocks[idx];
    let mut buf = p.read(mirrors[0], fx.nodesize);
    buf[at..at + bytes.len()].copy_from_slice(bytes);
    let c = fx.csum_type.compute(&buf[CSUM_FIELD_SIZE..]);
    buf[..CSUM_FIELD_SIZE].copy_from_slice(&c);
    for &m in mirrors {
        p.write(m, &buf);
    }
}

/// Overwrite `bytes` at `off` of the primary superblock and recompute its checksum.
fn patch_super(fx: &Fixture, p: &mut Patcher, off: usize, bytes: &[u8]) {
    let mut buf = p.read(SUPER_INFO_OFFSET, SUPER_INFO_SIZE);
    buf[off..off + bytes.len()].copy_from_slice(bytes);
    let c = fx.csum_type.compute(&buf[CSUM_FIELD_SIZE..]);
    buf[..CSUM_FIELD_SIZE].copy_from_slice(&c);
    p.write(SUPER_INFO_OFFSET, &buf);
}

/// Open and walk the patched fixture; fail on a panic or hang, return what happened.
fn must_not_panic(fx: &Fixture) -> Outcome {
    match open_and_walk(&fx.img, CASE_TIMEOUT) {
        Ok(o) => o,
        Err(f) => panic!("{f}"),
    }
}

/// Inode number of `name` in the top-level directory of the clean fixture.
fn top_level_ino(fx: &Fixture, name: &str) -> u64 {
    let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
    let dir = fs.root(fs.mount_root).unwrap().item.root_dirid;
    match ubtrfs_fs::dir_item::lookup(&fs, fs.mount_root, dir, name.as_bytes()).unwrap() {
        ubtrfs_fs::dir_item::Target::Inode { ino, .. } => ino,
        t => panic!("{name}: {t:?}"),
    }
}

/// Read `len` bytes at `off` of top-level file `ino` of the patched fixture.
fn read_file_at(fx: &Fixture, ino: u64, off: u64, len: u32) -> ubtrfs_fs::Result<Vec<u8>> {
    let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
    let root = fs.mount_root;
    let ii = ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap();
    let emi = fs.ems.inode(root, ino);
    ubtrfs_fs::file::read(&fs, root, ino, &ii, &emi, off, len)
}

/// EXTENT_DATA item body offsets.
const FE_COMPRESSION: usize = 16;
const FE_RAM_BYTES: usize = 8;
const FE_DISK_BYTENR: usize = 21;
const FE_DISK_NUM_BYTES: usize = 29;
const FE_OFFSET: usize = 37;

// Test scenario: (found by random_corruption_never_panics, case seed 0x37cd864027e5bcc5) the
// sys_chunk_array's stripe offset is u64::MAX with the superblock checksum recomputed: mapping
// the first tree block overflowed in ChunkMap::map. Now the chunk is refused at open.
#[test]
fn regression_sys_chunk_stripe_offset_overflow() {
    let fx = build_fixture("reg-stripe-offset");
    let mut p = Patcher::new(&fx.img);
    patch_super(&fx, &mut p, 884, &u64::MAX.to_le_bytes());
    match must_not_panic(&fx) {
        Outcome::Refused(msg) => assert!(msg.contains("overflows"), "{msg}"),
        Outcome::Served(_) => panic!("served an image whose system chunk cannot be mapped"),
    }
}

// Test scenario: a file extent item turned into a zlib extent claiming 2^63 bytes on disk: the
// read allocated disk_num_bytes before checking it against BTRFS_MAX_COMPRESSED (a capacity
// overflow panic, or an abort on a failed huge allocation). Now the read fails as corrupt,
// naming the inode.
#[test]
fn regression_compressed_disk_num_bytes_huge() {
    let fx = build_fixture("reg-compressed-size");
    let mut p = Patcher::new(&fx.img);
    let ino = top_level_ino(&fx, "file-12288");
    let (idx, slot, _) = find_item(&fx, |k| *k == Key::new(ino, item::EXTENT_DATA, 0));
    patch_item(&fx, &mut p, idx, slot, FE_COMPRESSION, &[1]);
    patch_item(
        &fx,
        &mut p,
        idx,
        slot,
        FE_DISK_NUM_BYTES,
        &(1u64 << 63).to_le_bytes(),
    );
    let e = read_file_at(&fx, ino, 0, 4096).unwrap_err();
    assert!(e.to_string().contains("compressed extent"), "{e}");
    must_not_panic(&fx);
}

// Test scenario: a regular extent whose disk_bytenr is u64::MAX - 4095 (sector aligned, so the
// tree-checker lets it through): a read that starts inside the extent computed
// disk_bytenr + offset-in-extent with an overflowing `+`. Now the read fails as corrupt.
#[test]
fn regression_regular_extent_logical_overflow() {
    let fx = build_fixture("reg-disk-bytenr");
    let mut p = Patcher::new(&fx.img);
    let ino = top_level_ino(&fx, "file-12288");
    let (idx, slot, _) = find_item(&fx, |k| *k == Key::new(ino, item::EXTENT_DATA, 0));
    patch_item(
        &fx,
        &mut p,
        idx,
        slot,
        FE_DISK_BYTENR,
        &(u64::MAX - 4095).to_le_bytes(),
    );
    assert!(read_file_at(&fx, ino, 0, 4096).is_err());
    assert!(read_file_at(&fx, ino, 4096 + 100, 4096).is_err());
    must_not_panic(&fx);
}

// Test scenario: a valid zlib extent (NODATASUM inode, 12288 bytes compressed into one sector)
// whose extent offset is u64::MAX - 4095: a read that starts inside the extent computed
// offset + offset-in-extent with an overflowing `+`. Now it reads past the decompressed data,
// which is zeros (as copy_padded already did for offsets beyond the data).
#[test]
fn regression_compressed_extent_offset_overflow() {
    use std::io::Write;
    let fx = build_fixture("reg-compressed-offset");
    let mut p = Patcher::new(&fx.img);
    let ino = top_level_ino(&fx, "file-12288");
    let (idx, slot, key) = find_item(&fx, |k| *k == Key::new(ino, item::EXTENT_DATA, 0));
    // Where the extent's data is: its first sector becomes a zlib stream of 12288 bytes.
    let fe = ubtrfs_format::items::FileExtentItem::parse(fx.blocks[idx].2.item_data(slot).unwrap())
        .unwrap();
    assert_eq!((fe.disk_num_bytes, fe.num_bytes), (12288, 12288), "{key}");
    let content: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(3));
    z.write_all(&content).unwrap();
    let mut sector = z.finish().unwrap();
    assert!(sector.len() <= 4096);
    sector.resize(4096, 0);
    let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
    let phys = fs.reader.chunks().map(fe.disk_bytenr, 4096).unwrap()[0].mirrors[0].1;
    drop(fs);
    p.write(phys, &sector);
    patch_item(&fx, &mut p, idx, slot, FE_COMPRESSION, &[1]);
    patch_item(
        &fx,
        &mut p,
        idx,
        slot,
        FE_DISK_NUM_BYTES,
        &4096u64.to_le_bytes(),
    );
    patch_item(
        &fx,
        &mut p,
        idx,
        slot,
        FE_RAM_BYTES,
        &12288u64.to_le_bytes(),
    );
    // The inode: NODATASUM, so the rewritten sector is not checked against the csum tree.
    let (iidx, islot, _) = find_item(&fx, |k| *k == Key::new(ino, item::INODE_ITEM, 0));
    let flags = ubtrfs_format::items::inode_flags::NODATASUM;
    patch_item(&fx, &mut p, iidx, islot, 64, &flags.to_le_bytes());
    // Sanity: with offset 0 the extent reads back as the content.
    assert_eq!(read_file_at(&fx, ino, 0, 12288).unwrap(), content);
    patch_item(
        &fx,
        &mut p,
        idx,
        slot,
        FE_OFFSET,
        &(u64::MAX - 4095).to_le_bytes(),
    );
    let got = read_file_at(&fx, ino, 4096 + 100, 4096).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    must_not_panic(&fx);
}

// Test scenario: the extent and csum trees' ROOT_ITEMs claim u64::MAX and 1 bytes used (root
// checksum recomputed): the global block reserve estimate for statfs, computed at open, summed
// them with an overflowing `+`. Now the sum saturates (the reserve is capped at 512 MiB anyway).
#[test]
fn regression_root_item_bytes_used_overflow() {
    let fx = build_fixture("reg-bytes-used");
    let mut p = Patcher::new(&fx.img);
    for (tree, v) in [(2u64, u64::MAX), (7, 1)] {
        let (idx, slot, _) = find_item(&fx, |k| {
            k.objectid == tree && k.item_type == item::ROOT_ITEM
        });
        patch_item(&fx, &mut p, idx, slot, 192, &v.to_le_bytes());
    }
    match must_not_panic(&fx) {
        Outcome::Served(r) => assert!(r.errors.is_empty(), "{:?}", r.errors),
        Outcome::Refused(msg) => panic!("refused: {msg}"),
    }
}

// Test scenario: the last EXTENT_CSUM item of the csum tree is re-keyed to logical 2^64 - 8192
// (sector aligned, key order kept, block checksum recomputed) while it holds more than two
// sectors' checksums, and lookup_csums is asked for ranges up there: the item's end and the
// range's end were computed with overflowing `+`. Now both are corrupt errors.
#[test]
fn regression_csum_item_end_overflow() {
    let fx = build_fixture("reg-csum-end");
    let mut p = Patcher::new(&fx.img);
    let csum = 7u64;
    let (idx, _, _) = find_item(&fx, |k| k.item_type == item::EXTENT_CSUM);
    let leaf = &fx.blocks[idx].2;
    assert_eq!(leaf.header.owner, csum);
    let slot = leaf.nritems() - 1;
    // No parent key to keep in step: the item is not its leaf's first, or the leaf is the root.
    let (ridx, rslot, _) = find_item(&fx, |k| {
        k.objectid == csum && k.item_type == item::ROOT_ITEM
    });
    let root = RootItem::parse(fx.blocks[ridx].2.item_data(rslot).unwrap()).unwrap();
    assert!(slot > 0 || root.bytenr == fx.blocks[idx].0);
    assert!(leaf.item(slot).unwrap().size >= 3 * 4);
    let top = 0u64.wrapping_sub(8192);
    patch_block(
        &fx,
        &mut p,
        idx,
        HEADER_SIZE + slot * ITEM_SIZE + 9,
        &top.to_le_bytes(),
    );
    let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
    let e = ubtrfs_fs::file_item::lookup_csums(&fs, top, 1).unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
    let e = ubtrfs_fs::file_item::lookup_csums(&fs, top + 4096, 2).unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
    drop(fs);
    must_not_panic(&fx);
}

/// The hot (log tree) block index and slot of the last log item whose key and data satisfy
/// `pred`.
fn find_log_item(fx: &Fixture, pred: impl Fn(&Key, &[u8]) -> bool) -> (usize, usize, Key) {
    let mut found = None;
    for &i in &fx.hot {
        let b = &fx.blocks[i].2;
        if !b.is_leaf() || b.header.owner != ubtrfs_format::key::objectid::TREE_LOG {
            continue;
        }
        for slot in 0..b.nritems() {
            let k = b.item_key(slot).unwrap();
            if pred(&k, b.item_data(slot).unwrap()) {
                found = Some((i, slot, k));
            }
        }
    }
    found.expect("no such item in the log trees")
}

/// Damage the log fixture with `patch`, then open (replaying the log in memory) and walk: a
/// corrupt error is fine, a panic is not. Returns the outcome.
fn log_case(name: &str, patch: impl Fn(&Fixture, &mut Patcher)) -> Outcome {
    let fx = build_log_fixture(name);
    let mut p = Patcher::new(&fx.img);
    patch(&fx, &mut p);
    must_not_panic(&fx)
}

// Test scenario: (found by random_log_corruption_never_panics, case seed 0x644d59b79518031) a
// logged regular file's INODE_ITEM in the log tree claims u64::MAX bytes: log replay rounded the
// size up to a sector with an overflowing multiply. Now the replay fails as corrupt and the
// mount says so.
#[test]
fn regression_log_inode_size_overflow() {
    let o = log_case("reg-log-isize", |fx, p| {
        // A regular file: S_IFREG (0o100000) in the mode at bytes 52..56.
        let (idx, slot, _) = find_log_item(fx, |k, d| {
            k.item_type == item::INODE_ITEM && d[53] & 0xf0 == 0x80
        });
        patch_item(fx, p, idx, slot, 16, &u64::MAX.to_le_bytes());
    });
    match o {
        Outcome::Refused(msg) => assert!(msg.contains("overflows"), "{msg}"),
        Outcome::Served(_) => {}
    }
}

// Test scenario: (found by random_log_corruption_never_panics, case seed 0xceaa30f9251ab810) a
// logged regular extent's disk_bytenr is 2^64 - 4096: replay asked the block groups for
// [disk_bytenr, +len) and the end overflowed. Now it is a corrupt error.
#[test]
fn regression_log_extent_bytenr_overflow() {
    log_case("reg-log-bytenr", |fx, p| {
        let (idx, slot, _) =
            find_log_item(fx, |k, d| k.item_type == item::EXTENT_DATA && d[20] == 1);
        patch_item(
            fx,
            p,
            idx,
            slot,
            FE_DISK_BYTENR,
            &0u64.wrapping_sub(4096).to_le_bytes(),
        );
    });
}

// Test scenario: a logged EXTENT_CSUM item re-keyed to 2^64 - 4096 (sector aligned, the last
// checksum item of the log leaf so key order holds): replay deleted the range it covers from the
// csum tree with an overflowing end. Now the item is refused as corrupt before that.
#[test]
fn regression_log_csum_range_overflow() {
    let o = log_case("reg-log-csum", |fx, p| {
        let (idx, slot, _) = find_log_item(fx, |k, _| k.item_type == item::EXTENT_CSUM);
        let at = HEADER_SIZE + slot * ITEM_SIZE + 9;
        patch_block(fx, p, idx, at, &0u64.wrapping_sub(4096).to_le_bytes());
    });
    match o {
        Outcome::Refused(msg) => assert!(msg.contains("valid range"), "{msg}"),
        Outcome::Served(_) => panic!("replayed a csum item past the address space"),
    }
}

// Test scenario: the logged inline extent claims to be zlib-compressed with u64::MAX bytes of
// decompressed data (compressed, so the tree-checker does not compare it with the item size):
// replay computed the extent's end with overflowing arithmetic. Now it is a corrupt error.
#[test]
fn regression_log_inline_ram_bytes_overflow() {
    log_case("reg-log-inline", |fx, p| {
        let (idx, slot, _) =
            find_log_item(fx, |k, d| k.item_type == item::EXTENT_DATA && d[20] == 0);
        patch_item(fx, p, idx, slot, FE_COMPRESSION, &[1]);
        patch_item(fx, p, idx, slot, FE_RAM_BYTES, &u64::MAX.to_le_bytes());
    });
}

// Test scenario: (found by random_log_corruption_never_panics, case seed 0x58672d712f214c44) a
// FREE_SPACE_EXTENT key of the free space tree gets offset (length) 2^64 - 2, key order kept:
// loading the block groups for log replay checked objectid + offset against the group's end
// with an overflowing `+`. Now the item is refused as corrupt.
#[test]
fn regression_free_space_extent_length_overflow() {
    log_case("reg-fst-extent", |fx, p| {
        let mut target = None;
        for (i, (_, _, b)) in fx.blocks.iter().enumerate() {
            if !b.is_leaf() || b.header.owner != 10 {
                continue;
            }
            for s in 0..b.nritems() {
                let k = b.item_key(s).unwrap();
                let next_is_later =
                    s + 1 == b.nritems() || b.item_key(s + 1).unwrap().objectid > k.objectid;
                if k.item_type == item::FREE_SPACE_EXTENT && s > 0 && next_is_later {
                    target = Some((i, s));
                }
            }
        }
        let (idx, slot) = target.expect("a free space extent item to damage");
        let at = HEADER_SIZE + slot * ITEM_SIZE + 9;
        patch_block(fx, p, idx, at, &0u64.wrapping_sub(2).to_le_bytes());
    });
}

// Test scenario: (found by ci/fuzz.sh, log corruption case seed 0x3ae038ac282ee9c) the
// subvolume's INODE_ITEM of a file whose extents the log replays claims nbytes 2^64 - 4096:
// replay added the logged extent's bytes with an overflowing `+`. Now the count saturates.
#[test]
fn regression_log_replay_nbytes_overflow() {
    let o = log_case("reg-log-nbytes", |fx, p| {
        let fs = FsInfo::open(&fx.img, MountOptions::default()).unwrap();
        let ino = ino_of(&fs, "file-4096");
        drop(fs);
        let (idx, slot) = fx
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, (_, _, b))| b.is_leaf() && b.header.owner == 5)
            .find_map(|(i, (_, _, b))| {
                (0..b.nritems())
                    .find(|&s| b.item_key(s).unwrap() == Key::new(ino, item::INODE_ITEM, 0))
                    .map(|s| (i, s))
            })
            .expect("the inode item of file-4096 in the subvolume tree");
        patch_item(fx, p, idx, slot, 24, &0u64.wrapping_sub(4096).to_le_bytes());
    });
    assert!(matches!(o, Outcome::Served(_)), "{o:?}");
}
