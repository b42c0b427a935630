//! `ubtrfs mkfs`: make a new single-device btrfs filesystem with the default features of
//! mkfs.btrfs 6.2 (`mkfs/main.c`, `mkfs/common.c`), written in one go at generation 1.
//!
//! # What is written
//!
//! Features: incompat MIXED_BACKREF | EXTENDED_IREF | SKINNY_METADATA | NO_HOLES, compat_ro
//! FREE_SPACE_TREE | FREE_SPACE_TREE_VALID (plus BLOCK_GROUP_TREE with
//! [`MkfsOptions::block_group_tree`]). Sector size 4 KiB; node size 4..64 KiB (default 16 KiB).
//!
//! Chunks, placed where mkfs.btrfs 6.2 leaves them. mkfs.btrfs first writes a temporary 4 MiB
//! SINGLE system chunk at 1 MiB, opens the filesystem, allocates a temporary 8 MiB SINGLE
//! metadata chunk and the 8 MiB SINGLE data chunk, then the real DUP system and DUP metadata
//! chunks, moves every tree block into them and deletes the two temporary chunks. We do not
//! write the temporary chunks, but [`plan_chunks`] runs the same allocation sequence
//! (`btrfs_alloc_chunk`'s sizing: `init_alloc_chunk_ctl_policy_regular`,
//! `decide_stripe_size_regular`, the 10%-of-the-filesystem cap, the fallback to the largest
//! hole) so the surviving chunks get mkfs.btrfs's sizes and addresses:
//! DATA SINGLE 8 MiB at 13 MiB, SYSTEM DUP 8 MiB at 21 MiB, METADATA DUP at 29 MiB
//! (32 MiB .. 256 MiB per copy, 1 GiB above 50 GiB), device bytes 1..13 MiB left free.
//!
//! Trees (all blocks generation 1, header flags WRITTEN + MIXED_BACKREF_REV, owner = tree id):
//! - chunk tree (in the SYSTEM chunk): DEV_ITEM, one CHUNK_ITEM per chunk; the SYSTEM chunk
//!   also goes into the superblock's sys_chunk_array;
//! - root tree: a ROOT_ITEM for every tree but the root and chunk trees; ROOT_TREE_DIR (6)
//!   with its inode, ".." INODE_REF and the "default" DIR_ITEM naming FS_TREE, and the
//!   (5, INODE_REF, 6) "default" back reference, as `make_root_dir` writes them;
//! - extent tree: a METADATA_ITEM with one inline TREE_BLOCK_REF per tree block, and the
//!   BLOCK_GROUP_ITEMs (unless the block-group tree holds them);
//! - dev tree: one DEV_EXTENT per chunk stripe (mkfs.btrfs 6.2 writes no DEV_STATS item; the
//!   kernel adds it at its first commit);
//! - FS tree and data reloc tree: root directory inode 256 with its ".." INODE_REF;
//! - csum tree: an empty leaf;
//! - uuid tree: the FS tree's subvolume uuid;
//! - free space tree: per block group a FREE_SPACE_INFO and its FREE_SPACE_EXTENTs.
//!
//! # Invariants checked before anything is written
//! - Every block group's `used` is the sum of the tree blocks inside it; the superblock's
//!   `bytes_used` is the sum over block groups; the DEV_ITEM's `bytes_used` (and the copy in
//!   the superblock) is the sum of the dev extents.
//! - The free space of a block group is its range minus its tree blocks minus the 64 KiB
//!   ranges the kernel excludes around superblock copies (`exclude_super_stripes`); tree
//!   blocks never overlap those ranges; FREE_SPACE_INFO.extent_count counts the extents.
//! - Every tree block passes the structural tree-checker ([`TreeBlock::check_structure`]) and
//!   is checksummed with the chosen algorithm; every ROOT_ITEM points at its tree's top block
//!   with the right level.
//!
//! # Differences from mkfs.btrfs 6.2's output (all accepted by `btrfs check` and the kernel)
//! - Everything is generation 1 (mkfs.btrfs's six internal commits end at generation 6, with
//!   items of generations 1..6); there is one backup root (slot 0, where a generation-1 commit
//!   puts it) instead of four.
//! - Tree blocks are packed from the start of their block group (mkfs.btrfs leaves holes
//!   where its re-COWed blocks were).
//! - No FREE_SPACE_INFO items for the deleted temporary block groups (mkfs.btrfs 6.2 leaves
//!   two stale ones behind).
//! - `uuid_tree_generation` is 1, meaning the uuid tree is consistent as of this generation
//!   (mkfs.btrfs 6.2 leaves 0, which makes the kernel rescan the uuid tree at first mount).
//! - Free space extents leave out the superblock copy ranges (mkfs.btrfs and the kernel keep
//!   them inside a free extent and exclude them when loading; check accepts both).

use crate::error::{FsError, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use ubtrfs_format::csum::{name_hash, CsumType, CSUM_FIELD_SIZE};
use ubtrfs_format::extent_items::ExtentRecord;
use ubtrfs_format::items::{
    bg_flags, ft, uuid_item_to_bytes, uuid_key, BlockGroupItem, ChunkItem, DevExtent, DevItem,
    DirItem, FreeSpaceInfo, InodeItem, InodeRef, RootItem, Stripe, Timespec,
};
use ubtrfs_format::key::{item, objectid, Key};
use ubtrfs_format::super_block::{
    compat_ro, incompat, sb_offset, RootBackup, SuperBlock, LABEL_SIZE, SUPER_INFO_OFFSET,
    SUPER_INFO_SIZE, SUPER_MIRROR_MAX,
};
use ubtrfs_format::tree_block::{
    header_flags_written_mixed, leaf_data_size, Header, KeyPtr, TreeBlock, ITEM_SIZE, KEY_PTR_SIZE,
};

const SZ_1M: u64 = 1 << 20;
const SZ_8M: u64 = 8 << 20;
const SZ_32M: u64 = 32 << 20;
const SZ_64M: u64 = 64 << 20;
const SZ_256M: u64 = 256 << 20;
const SZ_1G: u64 = 1 << 30;
/// `BTRFS_STRIPE_LEN`.
const STRIPE_LEN: u64 = 64 * 1024;
/// `BTRFS_MKFS_SYSTEM_GROUP_SIZE`: the temporary system chunk of `make_btrfs`.
const MKFS_SYSTEM_GROUP_SIZE: u64 = 4 << 20;
/// `BTRFS_BLOCK_RESERVED_1M_FOR_SUPER`: no chunk below this device offset.
const RESERVED_1M: u64 = SZ_1M;
/// mkfs.btrfs zeroes this much at the start and the end of the device (`ZERO_DEV_BYTES`).
const ZERO_DEV_BYTES: u64 = 2 << 20;
/// The only device.
const DEVID: u64 = 1;
/// The transaction id everything is written with.
const GENERATION: u64 = 1;
pub const SECTORSIZE: u32 = 4096;
pub const DEFAULT_NODESIZE: u32 = 16384;
/// Size of an image file created when neither it nor `--size` exists.
pub const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

/// What to make.
#[derive(Clone, Debug)]
pub struct MkfsOptions {
    /// Filesystem size in bytes (rounded down to the sector size). `None`: the size of the
    /// existing file or device, or [`DEFAULT_IMAGE_SIZE`] for a file that does not exist.
    pub size: Option<u64>,
    pub csum: CsumType,
    pub nodesize: u32,
    /// At most 255 bytes.
    pub label: String,
    /// Put block group items in a block-group tree (compat_ro BLOCK_GROUP_TREE), the default
    /// of btrfs-progs 6.19 and later; off by default as in 6.2.
    pub block_group_tree: bool,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            size: None,
            csum: CsumType::Crc32c,
            nodesize: DEFAULT_NODESIZE,
            label: String::new(),
            block_group_tree: false,
        }
    }
}

/// One chunk of the new filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLayout {
    pub logical: u64,
    /// Logical length (= the size of one stripe for SINGLE and DUP).
    pub length: u64,
    /// Block group type and profile bits.
    pub flags: u64,
    /// Device offset of each stripe.
    pub stripes: Vec<u64>,
}

impl ChunkLayout {
    fn contains(&self, logical: u64) -> bool {
        logical >= self.logical && logical - self.logical < self.length
    }
}

/// What was made.
#[derive(Clone, Debug)]
pub struct MkfsReport {
    pub path: PathBuf,
    pub fsid: [u8; 16],
    pub dev_uuid: [u8; 16],
    pub chunk_tree_uuid: [u8; 16],
    pub fs_tree_uuid: [u8; 16],
    pub label: String,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub nodesize: u32,
    pub sectorsize: u32,
    pub csum: CsumType,
    pub chunks: Vec<ChunkLayout>,
    pub incompat_flags: u64,
    pub compat_ro_flags: u64,
}

/// `uuid_unparse`: the canonical 8-4-4-4-12 form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The checksum names mkfs.btrfs accepts (`parse_csum_type`, case-insensitive).
pub fn parse_csum_type(s: &str) -> Option<CsumType> {
    match s.to_ascii_lowercase().as_str() {
        "crc32c" => Some(CsumType::Crc32c),
        "xxhash" | "xxhash64" => Some(CsumType::Xxhash64),
        "sha256" => Some(CsumType::Sha256),
        "blake2" | "blake2b" => Some(CsumType::Blake2b),
        _ => None,
    }
}

/// A size as mkfs.btrfs parses it (`parse_size_from_string`): a number with an optional
/// binary suffix k/m/g/t/p/e (case-insensitive, an optional trailing "iB"/"B" is accepted).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return Err(format!("invalid size '{s}': no number"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|e| format!("invalid size '{s}': {e}"))?;
    let suffix = t[digits..].to_ascii_lowercase();
    let unit = suffix.trim_end_matches("ib").trim_end_matches('b');
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(format!("invalid size '{s}': unknown suffix '{suffix}'")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// `btrfs_min_dev_size` for metadata DUP and data SINGLE: the 1 MiB reserve, the three
/// temporary chunks, system + metadata DUP at their minimum stripe sizes, the data chunk.
pub fn min_dev_size() -> u64 {
    RESERVED_1M + MKFS_SYSTEM_GROUP_SIZE + 2 * SZ_8M + 2 * (SZ_8M + SZ_32M) + SZ_8M
}

/// Chunk allocation as `btrfs_alloc_chunk` does it for one device whose free space is one
/// hole from `*phys_next` to `total_bytes` (true during mkfs: chunks are allocated back to
/// back). Returns the stripe size and number of stripes, or `None` for ENOSPC.
fn alloc_chunk_size(flags: u64, total_bytes: u64, phys_next: u64) -> Option<(u64, u64)> {
    let dup = flags & bg_flags::DUP != 0;
    let num_stripes: u64 = if dup { 2 } else { 1 };
    // init_alloc_chunk_ctl + init_alloc_chunk_ctl_policy_regular
    let mut stripe_size = SZ_8M;
    let mut min_stripe_size = SZ_1M;
    let mut max_chunk_size = 4 * stripe_size;
    if flags & bg_flags::PROFILE_MASK != 0 {
        if flags & bg_flags::SYSTEM != 0 {
            stripe_size = SZ_8M;
            max_chunk_size = stripe_size * 2;
            min_stripe_size = SZ_1M;
        } else if flags & bg_flags::DATA != 0 {
            stripe_size = SZ_1G;
            max_chunk_size = 10 * stripe_size;
            min_stripe_size = SZ_64M;
        } else if flags & bg_flags::METADATA != 0 {
            max_chunk_size = if total_bytes > 50 * SZ_1G {
                SZ_1G
            } else {
                SZ_256M
            };
            stripe_size = max_chunk_size;
            min_stripe_size = SZ_32M;
        }
    }
    // "We don't want a chunk larger than 10% of the FS" (div_factor(total, 1)).
    max_chunk_size = max_chunk_size.min(total_bytes / 10);

    let avail = total_bytes.saturating_sub(phys_next);
    let mut looped = false;
    loop {
        // decide_stripe_size_regular
        let chunk_bytes = if dup {
            stripe_size
        } else {
            stripe_size * num_stripes
        };
        if chunk_bytes > max_chunk_size {
            stripe_size = max_chunk_size / num_stripes;
            stripe_size -= stripe_size % STRIPE_LEN;
        }
        stripe_size = stripe_size.max(min_stripe_size);
        stripe_size -= stripe_size % STRIPE_LEN;

        let min_free = stripe_size * num_stripes;
        if avail >= min_free {
            return Some((stripe_size, num_stripes));
        }
        if looped || avail == 0 {
            return None;
        }
        looped = true;
        stripe_size = if dup { avail / 2 } else { avail };
    }
}

/// The chunks mkfs.btrfs 6.2 ends up with on a device of `total_bytes` (see the module doc):
/// the allocation sequence is replayed, then the temporary system and metadata chunks are
/// dropped.
pub fn plan_chunks(total_bytes: u64) -> Result<Vec<ChunkLayout>> {
    if total_bytes < min_dev_size() {
        return Err(FsError::Invalid(format!(
            "device is too small to make filesystem, must be at least {} bytes",
            min_dev_size()
        )));
    }
    // make_btrfs: the temporary system chunk at 1 MiB, logical == physical.
    let mut phys_next = RESERVED_1M + MKFS_SYSTEM_GROUP_SIZE;
    let mut logical_next = RESERVED_1M + MKFS_SYSTEM_GROUP_SIZE;
    let mut chunks = Vec::new();
    // create_metadata_block_groups (temporary SINGLE metadata), create_data_block_groups
    // (SINGLE data, kept), create_raid_groups (SYSTEM DUP, METADATA DUP).
    let sequence = [
        (bg_flags::METADATA, false),
        (bg_flags::DATA, true),
        (bg_flags::SYSTEM | bg_flags::DUP, true),
        (bg_flags::METADATA | bg_flags::DUP, true),
    ];
    for (flags, keep) in sequence {
        let (stripe_size, num_stripes) = alloc_chunk_size(flags, total_bytes, phys_next)
            .ok_or_else(|| {
                FsError::Invalid(format!(
                    "not enough free space to allocate a {} chunk on a {total_bytes}-byte device",
                    bg_type_name(flags)
                ))
            })?;
        let stripes: Vec<u64> = (0..num_stripes)
            .map(|i| phys_next + i * stripe_size)
            .collect();
        phys_next += stripe_size * num_stripes;
        let layout = ChunkLayout {
            logical: logical_next,
            length: stripe_size,
            flags,
            stripes,
        };
        logical_next += stripe_size;
        if keep {
            chunks.push(layout);
        }
    }
    chunks.sort_by_key(|c| c.logical);
    Ok(chunks)
}

fn bg_type_name(flags: u64) -> String {
    let t = if flags & bg_flags::SYSTEM != 0 {
        "SYSTEM"
    } else if flags & bg_flags::METADATA != 0 {
        "METADATA"
    } else {
        "DATA"
    };
    let p = if flags & bg_flags::DUP != 0 {
        "DUP"
    } else {
        "single"
    };
    format!("{t}|{p}")
}

/// Logical ranges the kernel never allocates in a block group because a superblock copy
/// lies under them (`exclude_super_stripes` with `btrfs_rmap_block`): for SINGLE and DUP the
/// 64 KiB stripe unit that holds the copy. Sorted, clipped to the chunk.
fn super_excluded_ranges(chunk: &ChunkLayout, device_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for mirror in 0..SUPER_MIRROR_MAX {
        let bytenr = sb_offset(mirror);
        if bytenr >= device_size {
            continue;
        }
        for &phys in &chunk.stripes {
            if bytenr < phys || bytenr - phys >= chunk.length {
                continue;
            }
            let stripe_nr = (bytenr - phys) / STRIPE_LEN;
            let start = chunk.logical + stripe_nr * STRIPE_LEN;
            let end = (start + STRIPE_LEN).min(chunk.logical + chunk.length);
            if !out.contains(&(start, end)) {
                out.push((start, end));
            }
        }
    }
    out.sort_unstable();
    out
}

/// The trees of a new filesystem, in the order their blocks are allocated in the metadata
/// chunk (the chunk tree lives alone in the system chunk).
const META_TREES: [u64; 9] = [
    objectid::ROOT_TREE,
    objectid::EXTENT_TREE,
    objectid::DEV_TREE,
    objectid::FS_TREE,
    objectid::CSUM_TREE,
    objectid::UUID_TREE,
    objectid::FREE_SPACE_TREE,
    objectid::BLOCK_GROUP_TREE,
    objectid::DATA_RELOC_TREE,
];

/// Where the blocks of one tree go: `leaves` then (if more than one leaf) one node.
#[derive(Clone, Debug, Default)]
struct TreePlacement {
    /// Block addresses: leaves first, then the node (when `leaves > 1`).
    addrs: Vec<u64>,
    leaves: usize,
}

impl TreePlacement {
    fn top(&self) -> u64 {
        *self.addrs.last().expect("every tree has a block")
    }
    fn level(&self) -> u8 {
        u8::from(self.leaves > 1)
    }
    fn blocks(&self) -> usize {
        self.addrs.len()
    }
}

/// Everything that is decided before blocks are built.
struct Plan {
    opts: MkfsOptions,
    total_bytes: u64,
    device_size: u64,
    fsid: [u8; 16],
    dev_uuid: [u8; 16],
    chunk_tree_uuid: [u8; 16],
    fs_tree_uuid: [u8; 16],
    now: Timespec,
    chunks: Vec<ChunkLayout>,
    trees: Vec<u64>,
}

impl Plan {
    fn nodesize(&self) -> u64 {
        u64::from(self.opts.nodesize)
    }

    fn chunk_of_type(&self, t: u64) -> &ChunkLayout {
        self.chunks
            .iter()
            .find(|c| c.flags & bg_flags::TYPE_MASK == t)
            .expect("plan_chunks makes one chunk of each type")
    }

    /// Assign block addresses: `counts[tree]` blocks per tree, packed from the start of the
    /// system chunk (chunk tree) or the metadata chunk (the others), stepping over the
    /// superblock ranges.
    fn place(&self, counts: &[(u64, usize)]) -> Result<Vec<(u64, TreePlacement)>> {
        let ns = self.nodesize();
        let mut cursors = [
            (
                bg_flags::SYSTEM,
                self.chunk_of_type(bg_flags::SYSTEM).logical,
            ),
            (
                bg_flags::METADATA,
                self.chunk_of_type(bg_flags::METADATA).logical,
            ),
        ];
        let mut out = Vec::new();
        for &(tree, blocks) in counts {
            let t = if tree == objectid::CHUNK_TREE {
                bg_flags::SYSTEM
            } else {
                bg_flags::METADATA
            };
            let chunk = self.chunk_of_type(t).clone();
            let excluded = super_excluded_ranges(&chunk, self.device_size);
            let cursor = &mut cursors
                .iter_mut()
                .find(|(ct, _)| *ct == t)
                .expect("two cursors")
                .1;
            let mut addrs = Vec::with_capacity(blocks);
            for _ in 0..blocks {
                while let Some(&(_, e)) = excluded
                    .iter()
                    .find(|&&(s, e)| *cursor < e && *cursor + ns > s)
                {
                    *cursor = e.next_multiple_of(ns);
                }
                if *cursor + ns > chunk.logical + chunk.length {
                    return Err(FsError::Invalid(format!(
                        "the {} chunk is too small for the initial tree blocks",
                        bg_type_name(chunk.flags)
                    )));
                }
                addrs.push(*cursor);
                *cursor += ns;
            }
            let leaves = if blocks > 1 { blocks - 1 } else { 1 };
            out.push((tree, TreePlacement { addrs, leaves }));
        }
        Ok(out)
    }
}

/// The items of one tree, sorted by key: (key, item body).
type Items = Vec<(Key, Vec<u8>)>;

/// Split items into leaves greedily; returns the index ranges of each leaf.
fn split_leaves(items: &[(Key, Vec<u8>)], nodesize: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let cap = leaf_data_size(nodesize);
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, (key, body)) in items.iter().enumerate() {
        let need = ITEM_SIZE + body.len();
        if need > cap {
            return Err(FsError::Invalid(format!(
                "item {key} of {} bytes does not fit a {nodesize}-byte leaf",
                body.len()
            )));
        }
        if used + need > cap {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += need;
    }
    out.push(start..items.len());
    if out.len() > 1 && out.len() > leaf_data_size(nodesize) / KEY_PTR_SIZE {
        return Err(FsError::Invalid(
            "initial tree needs more than two levels".into(),
        ));
    }
    Ok(out)
}

/// Number of blocks a tree with these items needs (leaves, plus one node when > 1 leaf).
fn blocks_needed(items: &[(Key, Vec<u8>)], nodesize: usize) -> Result<usize> {
    let leaves = split_leaves(items, nodesize)?.len();
    Ok(if leaves > 1 { leaves + 1 } else { 1 })
}

fn root_dir_inode(now: Timespec, nbytes: u64, otime: Timespec) -> InodeItem {
    InodeItem {
        generation: GENERATION,
        transid: 0,
        size: 0,
        nbytes,
        nlink: 1,
        mode: 0o040755,
        atime: now,
        ctime: now,
        mtime: now,
        otime,
        ..Default::default()
    }
}

fn dotdot_ref() -> Vec<u8> {
    InodeRef {
        index: 0,
        name: b"..".to_vec(),
    }
    .to_bytes()
}

/// The items of every tree for a given placement.
fn build_items(plan: &Plan, placed: &[(u64, TreePlacement)]) -> Result<Vec<(u64, Items)>> {
    let ns = plan.nodesize();
    let p = |tree: u64| -> &TreePlacement {
        &placed
            .iter()
            .find(|(t, _)| *t == tree)
            .expect("every planned tree is placed")
            .1
    };
    let bgt = plan.opts.block_group_tree;

    // Chunk tree.
    let dev_bytes_used: u64 = plan
        .chunks
        .iter()
        .map(|c| c.length * c.stripes.len() as u64)
        .sum();
    let dev_item = dev_item(plan, dev_bytes_used);
    let mut chunk_items = vec![(
        Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, DEVID),
        dev_item.to_bytes(),
    )];
    for c in &plan.chunks {
        chunk_items.push((
            Key::new(objectid::FIRST_CHUNK_TREE, item::CHUNK_ITEM, c.logical),
            chunk_item(plan, c).to_bytes(),
        ));
    }

    // Dev tree.
    let mut dev_extents: Vec<(Key, Vec<u8>)> = Vec::new();
    for c in &plan.chunks {
        for &phys in &c.stripes {
            dev_extents.push((
                Key::new(DEVID, item::DEV_EXTENT, phys),
                DevExtent {
                    chunk_tree: objectid::CHUNK_TREE,
                    chunk_objectid: objectid::FIRST_CHUNK_TREE,
                    chunk_offset: c.logical,
                    length: c.length,
                    chunk_tree_uuid: plan.chunk_tree_uuid,
                }
                .to_bytes(),
            ));
        }
    }
    dev_extents.sort_by_key(|(k, _)| *k);

    // Block groups, extent tree, free space tree.
    let all_blocks: Vec<(u64, u64, u8)> = placed
        .iter()
        .flat_map(|(tree, pl)| {
            pl.addrs.iter().enumerate().map(move |(i, &a)| {
                let level = u8::from(i >= pl.leaves);
                (a, *tree, level)
            })
        })
        .collect();
    let mut bg_items = Vec::new();
    let mut fst_items = Vec::new();
    for c in &plan.chunks {
        let mut blocks: Vec<u64> = all_blocks
            .iter()
            .filter(|(a, _, _)| c.contains(*a))
            .map(|(a, _, _)| *a)
            .collect();
        blocks.sort_unstable();
        let used = blocks.len() as u64 * ns;
        bg_items.push((
            Key::new(c.logical, item::BLOCK_GROUP_ITEM, c.length),
            BlockGroupItem {
                used,
                chunk_objectid: objectid::FIRST_CHUNK_TREE,
                flags: c.flags,
            }
            .to_bytes(),
        ));
        // Free = chunk range minus blocks minus superblock ranges.
        let mut taken: Vec<(u64, u64)> = blocks.iter().map(|&a| (a, a + ns)).collect();
        taken.extend(super_excluded_ranges(c, plan.device_size));
        taken.sort_unstable();
        let mut free = Vec::new();
        let mut pos = c.logical;
        for (s, e) in taken {
            if s > pos {
                free.push((pos, s - pos));
            }
            pos = pos.max(e);
        }
        let end = c.logical + c.length;
        if pos < end {
            free.push((pos, end - pos));
        }
        fst_items.push((
            Key::new(c.logical, item::FREE_SPACE_INFO, c.length),
            FreeSpaceInfo {
                extent_count: free.len() as u32,
                flags: 0,
            }
            .to_bytes(),
        ));
        for (s, l) in free {
            fst_items.push((Key::new(s, item::FREE_SPACE_EXTENT, l), Vec::new()));
        }
    }
    let mut extent_items: Vec<(Key, Vec<u8>)> = all_blocks
        .iter()
        .map(|&(a, tree, level)| {
            (
                Key::new(a, item::METADATA_ITEM, u64::from(level)),
                ExtentRecord::skinny_tree_block(tree, GENERATION).to_bytes(),
            )
        })
        .collect();
    if !bgt {
        extent_items.extend(bg_items.iter().cloned());
    }
    extent_items.sort_by_key(|(k, _)| *k);

    // Root tree.
    let mut root_items: Vec<(Key, Vec<u8>)> = Vec::new();
    for &tree in &plan.trees {
        if tree == objectid::ROOT_TREE || tree == objectid::CHUNK_TREE {
            continue;
        }
        let pl = p(tree);
        root_items.push((
            Key::new(tree, item::ROOT_ITEM, 0),
            root_item(plan, tree, pl).to_bytes(),
        ));
    }
    let default_location = Key::new(objectid::FS_TREE, item::ROOT_ITEM, u64::MAX);
    root_items.push((
        Key::new(objectid::FS_TREE, item::INODE_REF, objectid::ROOT_TREE_DIR),
        InodeRef {
            index: 0,
            name: b"default".to_vec(),
        }
        .to_bytes(),
    ));
    root_items.push((
        Key::new(objectid::ROOT_TREE_DIR, item::INODE_ITEM, 0),
        root_dir_inode(plan.now, ns, plan.now).to_bytes(),
    ));
    root_items.push((
        Key::new(
            objectid::ROOT_TREE_DIR,
            item::INODE_REF,
            objectid::ROOT_TREE_DIR,
        ),
        dotdot_ref(),
    ));
    root_items.push((
        Key::new(
            objectid::ROOT_TREE_DIR,
            item::DIR_ITEM,
            name_hash(b"default"),
        ),
        DirItem {
            location: default_location,
            transid: 0,
            file_type: ft::DIR,
            name: b"default".to_vec(),
            data: Vec::new(),
        }
        .to_bytes(),
    ));
    root_items.sort_by_key(|(k, _)| *k);

    // Subvolume-type trees.
    let root_dir_key = |t| Key::new(objectid::FIRST_FREE, t, 0);
    let fs_items = vec![
        (
            root_dir_key(item::INODE_ITEM),
            root_dir_inode(plan.now, ns, plan.now).to_bytes(),
        ),
        (
            Key::new(objectid::FIRST_FREE, item::INODE_REF, objectid::FIRST_FREE),
            dotdot_ref(),
        ),
    ];
    let reloc_items = vec![
        (
            root_dir_key(item::INODE_ITEM),
            root_dir_inode(plan.now, 0, Timespec::default()).to_bytes(),
        ),
        (
            Key::new(objectid::FIRST_FREE, item::INODE_REF, objectid::FIRST_FREE),
            dotdot_ref(),
        ),
    ];
    let uuid_items = vec![(
        uuid_key(&plan.fs_tree_uuid, item::UUID_SUBVOL),
        uuid_item_to_bytes(&[objectid::FS_TREE]),
    )];

    let mut out = Vec::new();
    for &tree in &plan.trees {
        let items = match tree {
            objectid::ROOT_TREE => root_items.clone(),
            objectid::EXTENT_TREE => extent_items.clone(),
            objectid::CHUNK_TREE => chunk_items.clone(),
            objectid::DEV_TREE => dev_extents.clone(),
            objectid::FS_TREE => fs_items.clone(),
            objectid::CSUM_TREE => Vec::new(),
            objectid::UUID_TREE => uuid_items.clone(),
            objectid::FREE_SPACE_TREE => fst_items.clone(),
            objectid::BLOCK_GROUP_TREE => bg_items.clone(),
            objectid::DATA_RELOC_TREE => reloc_items.clone(),
            other => unreachable!("no items planned for tree {other}"),
        };
        out.push((tree, items));
    }
    Ok(out)
}

fn dev_item(plan: &Plan, bytes_used: u64) -> DevItem {
    DevItem {
        devid: DEVID,
        total_bytes: plan.total_bytes,
        bytes_used,
        io_align: SECTORSIZE,
        io_width: SECTORSIZE,
        sector_size: SECTORSIZE,
        dev_type: 0,
        generation: 0,
        start_offset: 0,
        dev_group: 0,
        seek_speed: 0,
        bandwidth: 0,
        uuid: plan.dev_uuid,
        fsid: plan.fsid,
    }
}

fn chunk_item(plan: &Plan, c: &ChunkLayout) -> ChunkItem {
    ChunkItem {
        length: c.length,
        owner: objectid::EXTENT_TREE,
        stripe_len: STRIPE_LEN,
        chunk_type: c.flags,
        io_align: STRIPE_LEN as u32,
        io_width: STRIPE_LEN as u32,
        sector_size: SECTORSIZE,
        num_stripes: c.stripes.len() as u16,
        sub_stripes: 1,
        stripes: c
            .stripes
            .iter()
            .map(|&offset| Stripe {
                devid: DEVID,
                offset,
                dev_uuid: plan.dev_uuid,
            })
            .collect(),
    }
}

/// ROOT_ITEM of `tree` as mkfs.btrfs 6.2 leaves it: trees made by `make_btrfs` carry the
/// dummy directory inode (generation 1, size 3, nlink 1, nbytes = nodesize, 040755); the
/// uuid and data reloc trees, made later by `btrfs_create_tree`, a zeroed one. Only the FS
/// tree has a uuid and times.
fn root_item(plan: &Plan, tree: u64, pl: &TreePlacement) -> RootItem {
    let made_by_make_btrfs = !matches!(tree, objectid::UUID_TREE | objectid::DATA_RELOC_TREE);
    let inode = if made_by_make_btrfs {
        InodeItem {
            generation: 1,
            size: 3,
            nlink: 1,
            nbytes: plan.nodesize(),
            mode: 0o040755,
            ..Default::default()
        }
    } else {
        InodeItem::default()
    };
    let mut r = RootItem {
        inode,
        generation: GENERATION,
        root_dirid: 0,
        bytenr: pl.top(),
        bytes_used: pl.blocks() as u64 * plan.nodesize(),
        refs: 1,
        level: pl.level(),
        generation_v2: GENERATION,
        ..Default::default()
    };
    if tree == objectid::FS_TREE || tree == objectid::DATA_RELOC_TREE {
        r.root_dirid = objectid::FIRST_FREE;
    }
    if tree == objectid::FS_TREE {
        r.uuid = plan.fs_tree_uuid;
        r.ctime = plan.now;
        r.otime = plan.now;
    }
    r
}

/// Build the blocks of one tree at its placement.
fn build_blocks(
    plan: &Plan,
    tree: u64,
    items: &[(Key, Vec<u8>)],
    pl: &TreePlacement,
) -> Result<Vec<(u64, TreeBlock)>> {
    let ns = plan.opts.nodesize as usize;
    let ranges = split_leaves(items, ns)?;
    if ranges.len() != pl.leaves {
        return Err(FsError::Invalid(format!(
            "tree {tree}: planned {} leaves, items need {}",
            pl.leaves,
            ranges.len()
        )));
    }
    let header = |bytenr| Header {
        csum: [0; CSUM_FIELD_SIZE],
        fsid: plan.fsid,
        bytenr,
        flags: header_flags_written_mixed(),
        chunk_tree_uuid: plan.chunk_tree_uuid,
        generation: GENERATION,
        owner: tree,
        nritems: 0,
        level: 0,
    };
    let corrupt = |e| FsError::Invalid(format!("tree {tree}: building a block: {e}"));
    let mut out = Vec::new();
    let mut ptrs = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let addr = pl.addrs[i];
        let leaf = TreeBlock::new_leaf(ns, header(addr), &items[r.clone()]).map_err(corrupt)?;
        if let Some(key) = items.get(r.start).map(|(k, _)| *k) {
            ptrs.push(KeyPtr {
                key,
                blockptr: addr,
                generation: GENERATION,
            });
        }
        out.push((addr, leaf));
    }
    if pl.leaves > 1 {
        let addr = pl.top();
        let node = TreeBlock::new_node(ns, header(addr), 1, &ptrs).map_err(corrupt)?;
        out.push((addr, node));
    }
    for (_, b) in &mut out {
        b.update_csum(plan.opts.csum);
    }
    Ok(out)
}

fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|e| FsError::Mount(format!("reading /dev/urandom: {e}")))?;
    // RFC 4122 version 4, variant 1 (what uuid_generate_random makes).
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

fn now() -> Timespec {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // mkfs.btrfs uses time(NULL): whole seconds.
    Timespec {
        sec: d.as_secs(),
        nsec: 0,
    }
}

/// The loop device the kernel has attached to `path`, if any.
fn loop_holder(path: &Path) -> Option<String> {
    let canon = std::fs::canonicalize(path).ok()?;
    for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()) == canon {
                return Some(format!("/dev/{name}"));
            }
        }
    }
    None
}

/// Open (or create) the target and decide the filesystem size.
fn open_target(path: &Path, opts: &MkfsOptions) -> Result<(File, u64, u64, bool)> {
    let io =
        |what: &str, e: std::io::Error| FsError::Mount(format!("{}: {what}: {e}", path.display()));
    let existed = path.exists();
    let is_blk = existed
        && std::fs::metadata(path)
            .map_err(|e| io("stat", e))?
            .file_type()
            .is_block_device();
    if existed && !is_blk && !path.is_file() {
        return Err(FsError::Invalid(format!(
            "{}: not a regular file or block device",
            path.display()
        )));
    }
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if is_blk {
        // Fails with EBUSY while the device is mounted or otherwise held exclusively.
        oo.custom_flags(libc::O_EXCL);
    } else {
        oo.create(true);
    }
    let mut file = oo.open(path).map_err(|e| io("open", e))?;
    if !is_blk {
        if file.try_lock().is_err() {
            return Err(FsError::Mount(format!(
                "{}: in use by a ubtrfs mount (lock held)",
                path.display()
            )));
        }
        if let Some(dev) = loop_holder(path) {
            return Err(FsError::Mount(format!(
                "{}: in use by the kernel through {dev}",
                path.display()
            )));
        }
    }
    let mut device_size = file.seek(SeekFrom::End(0)).map_err(|e| io("size", e))?;
    let size = match opts.size {
        Some(s) => s,
        None if existed => device_size,
        None => DEFAULT_IMAGE_SIZE,
    };
    if size > device_size {
        if is_blk {
            return Err(FsError::Invalid(format!(
                "{} is smaller than requested size, expected {size}, found {device_size}",
                path.display()
            )));
        }
        file.set_len(size).map_err(|e| io("sizing", e))?;
        device_size = size;
    }
    let total_bytes = size - size % u64::from(SECTORSIZE);
    Ok((file, total_bytes, device_size, existed))
}

fn validate_options(opts: &MkfsOptions) -> Result<()> {
    let ns = opts.nodesize;
    if !ns.is_power_of_two() || !(SECTORSIZE..=65536).contains(&ns) {
        return Err(FsError::Invalid(format!(
            "invalid nodesize {ns}: must be a power of two between {SECTORSIZE} and 65536"
        )));
    }
    if opts.label.len() >= LABEL_SIZE {
        return Err(FsError::Invalid(format!(
            "label is too long: {} bytes, at most {} allowed",
            opts.label.len(),
            LABEL_SIZE - 1
        )));
    }
    if opts.label.as_bytes().contains(&0) {
        return Err(FsError::Invalid("label contains a NUL byte".into()));
    }
    Ok(())
}

/// Make the filesystem: plan, build every block in memory, check, then write tree blocks
/// (every stripe), flush, superblocks (every copy inside the device), flush.
pub fn mkfs(path: &Path, opts: &MkfsOptions) -> Result<MkfsReport> {
    validate_options(opts)?;
    if let Some(s) = opts.size {
        if s < min_dev_size() {
            return Err(FsError::Invalid(format!(
                "size {s} is too small to make filesystem, must be at least {} bytes",
                min_dev_size()
            )));
        }
    }
    let (file, total_bytes, device_size, existed) = open_target(path, opts)?;
    let created = !existed;
    let result = mkfs_on(&file, path, opts, total_bytes, device_size, created);
    if result.is_err() && created {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn mkfs_on(
    file: &File,
    path: &Path,
    opts: &MkfsOptions,
    total_bytes: u64,
    device_size: u64,
    fresh_file: bool,
) -> Result<MkfsReport> {
    let chunks = plan_chunks(total_bytes)?;
    let mut trees = vec![objectid::CHUNK_TREE];
    trees.extend(
        META_TREES
            .iter()
            .copied()
            .filter(|&t| t != objectid::BLOCK_GROUP_TREE || opts.block_group_tree),
    );
    let fsid = random_uuid()?;
    let plan = Plan {
        opts: opts.clone(),
        total_bytes,
        device_size,
        fsid,
        dev_uuid: random_uuid()?,
        chunk_tree_uuid: random_uuid()?,
        fs_tree_uuid: random_uuid()?,
        now: now(),
        chunks,
        trees: trees.clone(),
    };
    let ns = opts.nodesize as usize;

    // Block counts depend on item sizes only, but the extent tree's size depends on the
    // number of blocks: iterate to the fixed point (two rounds in practice).
    let mut counts: Vec<(u64, usize)> = trees.iter().map(|&t| (t, 1)).collect();
    let (placed, items) = {
        let mut round = 0;
        loop {
            let placed = plan.place(&counts)?;
            let items = build_items(&plan, &placed)?;
            let needed: Vec<(u64, usize)> = items
                .iter()
                .map(|(t, it)| Ok((*t, blocks_needed(it, ns)?)))
                .collect::<Result<_>>()?;
            if needed == counts {
                break (placed, items);
            }
            counts = needed;
            round += 1;
            if round > 8 {
                return Err(FsError::Invalid(
                    "tree block placement did not converge".into(),
                ));
            }
        }
    };

    let mut blocks: Vec<(u64, TreeBlock)> = Vec::new();
    for ((tree, its), (_, pl)) in items.iter().zip(placed.iter()) {
        blocks.extend(build_blocks(&plan, *tree, its, pl)?);
    }

    let sb = super_block(&plan, &placed, &blocks)?;
    check_plan(&plan, &placed, &blocks, &sb)?;

    // Write: zero the areas mkfs.btrfs zeroes (stale signatures), tree blocks on every
    // stripe, flush, then the superblock copies, flush.
    let io = |what: String, e: std::io::Error| {
        FsError::Mount(format!("{}: {what}: {e}", path.display()))
    };
    if !fresh_file {
        let zero = vec![0u8; ZERO_DEV_BYTES as usize];
        let head = ZERO_DEV_BYTES.min(total_bytes);
        file.write_all_at(&zero[..head as usize], 0)
            .map_err(|e| io("zeroing the start".into(), e))?;
        let tail_start = total_bytes.saturating_sub(ZERO_DEV_BYTES);
        file.write_all_at(&zero[..(total_bytes - tail_start) as usize], tail_start)
            .map_err(|e| io("zeroing the end".into(), e))?;
        for mirror in 0..SUPER_MIRROR_MAX {
            let off = sb_offset(mirror);
            if off + SUPER_INFO_SIZE as u64 <= device_size {
                file.write_all_at(&zero[..SUPER_INFO_SIZE], off)
                    .map_err(|e| io(format!("wiping superblock copy at {off}"), e))?;
            }
        }
    }
    for (addr, block) in &blocks {
        let chunk = plan
            .chunks
            .iter()
            .find(|c| c.contains(*addr))
            .expect("checked: every block is inside a chunk");
        for &phys in &chunk.stripes {
            let off = phys + (addr - chunk.logical);
            file.write_all_at(&block.data, off).map_err(|e| {
                io(
                    format!("writing tree block {addr} at device offset {off}"),
                    e,
                )
            })?;
        }
    }
    file.sync_all().map_err(|e| io("flush".into(), e))?;
    for mirror in 0..SUPER_MIRROR_MAX {
        let off = sb_offset(mirror);
        // write_all_supers: only copies that end before the device's end.
        if off + SUPER_INFO_SIZE as u64 >= total_bytes {
            break;
        }
        let bytes = sb
            .to_bytes_for_mirror(mirror)
            .map_err(|e| FsError::Invalid(format!("encoding the superblock: {e}")))?;
        file.write_all_at(&bytes, off)
            .map_err(|e| io(format!("writing superblock copy at {off}"), e))?;
    }
    file.sync_all().map_err(|e| io("flush".into(), e))?;

    Ok(MkfsReport {
        path: path.to_path_buf(),
        fsid: plan.fsid,
        dev_uuid: plan.dev_uuid,
        chunk_tree_uuid: plan.chunk_tree_uuid,
        fs_tree_uuid: plan.fs_tree_uuid,
        label: opts.label.clone(),
        total_bytes,
        bytes_used: sb.bytes_used,
        nodesize: opts.nodesize,
        sectorsize: SECTORSIZE,
        csum: opts.csum,
        chunks: plan.chunks.clone(),
        incompat_flags: sb.incompat_flags,
        compat_ro_flags: sb.compat_ro_flags,
    })
}

fn super_block(
    plan: &Plan,
    placed: &[(u64, TreePlacement)],
    blocks: &[(u64, TreeBlock)],
) -> Result<SuperBlock> {
    let p = |tree: u64| {
        &placed
            .iter()
            .find(|(t, _)| *t == tree)
            .expect("planned tree")
            .1
    };
    let ns = plan.nodesize();
    let dev_bytes_used: u64 = plan
        .chunks
        .iter()
        .map(|c| c.length * c.stripes.len() as u64)
        .sum();
    let bytes_used = blocks.len() as u64 * ns;
    let mut sb = SuperBlock::blank();
    sb.fsid = plan.fsid;
    sb.bytenr = SUPER_INFO_OFFSET;
    // write_all_supers sets the WRITTEN header flag in the superblock's flags too.
    sb.flags = ubtrfs_format::tree_block::HEADER_FLAG_WRITTEN;
    sb.generation = GENERATION;
    sb.root = p(objectid::ROOT_TREE).top();
    sb.root_level = p(objectid::ROOT_TREE).level();
    sb.chunk_root = p(objectid::CHUNK_TREE).top();
    sb.chunk_root_level = p(objectid::CHUNK_TREE).level();
    sb.chunk_root_generation = GENERATION;
    sb.total_bytes = plan.total_bytes;
    sb.bytes_used = bytes_used;
    sb.root_dir_objectid = objectid::ROOT_TREE_DIR;
    sb.num_devices = 1;
    sb.sectorsize = SECTORSIZE;
    sb.nodesize = plan.opts.nodesize;
    sb.stripesize = SECTORSIZE;
    sb.compat_ro_flags = compat_ro::FREE_SPACE_TREE | compat_ro::FREE_SPACE_TREE_VALID;
    if plan.opts.block_group_tree {
        sb.compat_ro_flags |= compat_ro::BLOCK_GROUP_TREE;
    }
    sb.incompat_flags = incompat::MIXED_BACKREF
        | incompat::EXTENDED_IREF
        | incompat::SKINNY_METADATA
        | incompat::NO_HOLES;
    sb.csum_type_raw = plan.opts.csum.to_disk();
    sb.dev_item = dev_item(plan, dev_bytes_used);
    sb.label = plan.opts.label.clone();
    sb.cache_generation = 0;
    sb.uuid_tree_generation = GENERATION;
    let sys = plan.chunk_of_type(bg_flags::SYSTEM);
    sb.add_sys_chunk(
        Key::new(objectid::FIRST_CHUNK_TREE, item::CHUNK_ITEM, sys.logical),
        &chunk_item(plan, sys).to_bytes(),
    )
    .map_err(|e| FsError::Invalid(format!("sys_chunk_array: {e}")))?;
    let root_of = |t| (p(t).top(), p(t).level());
    let (tree_root, tree_root_level) = root_of(objectid::ROOT_TREE);
    let (chunk_root, chunk_root_level) = root_of(objectid::CHUNK_TREE);
    let (extent_root, extent_root_level) = root_of(objectid::EXTENT_TREE);
    let (fs_root, fs_root_level) = root_of(objectid::FS_TREE);
    let (dev_root, dev_root_level) = root_of(objectid::DEV_TREE);
    let (csum_root, csum_root_level) = root_of(objectid::CSUM_TREE);
    // backup_super_roots: a generation-1 commit fills slot 0.
    sb.backups[0] = RootBackup {
        tree_root,
        tree_root_gen: GENERATION,
        chunk_root,
        chunk_root_gen: GENERATION,
        extent_root,
        extent_root_gen: GENERATION,
        fs_root,
        fs_root_gen: GENERATION,
        dev_root,
        dev_root_gen: GENERATION,
        csum_root,
        csum_root_gen: GENERATION,
        total_bytes: plan.total_bytes,
        bytes_used,
        num_devices: 1,
        tree_root_level,
        chunk_root_level,
        extent_root_level,
        fs_root_level,
        dev_root_level,
        csum_root_level,
    };
    Ok(sb)
}

/// Cross-check the built filesystem before writing it (module doc, "Invariants").
fn check_plan(
    plan: &Plan,
    placed: &[(u64, TreePlacement)],
    blocks: &[(u64, TreeBlock)],
    sb: &SuperBlock,
) -> Result<()> {
    let bad = |m: String| Err(FsError::Invalid(format!("mkfs self-check: {m}")));
    let ns = plan.nodesize();
    let mut addrs: Vec<u64> = blocks.iter().map(|(a, _)| *a).collect();
    addrs.sort_unstable();
    for w in addrs.windows(2) {
        if w[0] + ns > w[1] {
            return bad(format!("tree blocks {} and {} overlap", w[0], w[1]));
        }
    }
    for (addr, block) in blocks {
        let Some(chunk) = plan.chunks.iter().find(|c| c.contains(*addr)) else {
            return bad(format!("tree block {addr} is outside every chunk"));
        };
        if addr + ns > chunk.logical + chunk.length {
            return bad(format!("tree block {addr} crosses the end of its chunk"));
        }
        let t = chunk.flags & bg_flags::TYPE_MASK;
        let want = if block.header.owner == objectid::CHUNK_TREE {
            bg_flags::SYSTEM
        } else {
            bg_flags::METADATA
        };
        if t != want {
            return bad(format!(
                "tree block {addr} of tree {} in a {} chunk",
                block.header.owner,
                bg_type_name(chunk.flags)
            ));
        }
        // Sector aligned, and inside one 64 KiB stripe unit (btrfs check reports tree blocks
        // that cross one).
        let crosses_stripe = addr / STRIPE_LEN != (addr + ns - 1) / STRIPE_LEN;
        if addr % u64::from(SECTORSIZE) != 0 || crosses_stripe {
            return bad(format!(
                "tree block {addr} is unaligned or crosses a stripe"
            ));
        }
        for (s, e) in super_excluded_ranges(chunk, plan.device_size) {
            if *addr < e && addr + ns > s {
                return bad(format!("tree block {addr} overlaps a superblock copy"));
            }
        }
        if block.header.bytenr != *addr || !block.verify_csum(plan.opts.csum) {
            return bad(format!(
                "tree block {addr}: header bytenr or checksum wrong"
            ));
        }
        block
            .check_structure()
            .or_else(|e| bad(format!("tree block {addr}: {e}")))?;
    }
    let sum_used: u64 = plan
        .chunks
        .iter()
        .map(|c| addrs.iter().filter(|&&a| c.contains(a)).count() as u64 * ns)
        .sum();
    if sum_used != sb.bytes_used {
        return bad(format!(
            "bytes_used {} != sum of block group used {sum_used}",
            sb.bytes_used
        ));
    }
    let dev_used: u64 = plan
        .chunks
        .iter()
        .map(|c| c.length * c.stripes.len() as u64)
        .sum();
    if sb.dev_item.bytes_used != dev_used || sb.dev_item.total_bytes != sb.total_bytes {
        return bad("dev item bytes_used/total_bytes".into());
    }
    let mut phys: Vec<(u64, u64)> = plan
        .chunks
        .iter()
        .flat_map(|c| c.stripes.iter().map(move |&s| (s, s + c.length)))
        .collect();
    phys.sort_unstable();
    if phys.first().is_some_and(|&(s, _)| s < RESERVED_1M)
        || phys.windows(2).any(|w| w[0].1 > w[1].0)
        || phys.last().is_some_and(|&(_, e)| e > plan.total_bytes)
    {
        return bad(format!("dev extents overlap or leave the device: {phys:?}"));
    }
    for (tree, pl) in placed {
        if pl.addrs.is_empty() {
            return bad(format!("tree {tree} has no block"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(n: u64) -> u64 {
        n << 20
    }

    // Test scenario: the chunk plan reproduces what mkfs.btrfs 6.2 made on 128 MiB, 300 MiB,
    // 1 GiB, 8 GiB and 64 GiB images (dump-tree -t chunk of each): DATA single 8 MiB at
    // 13 MiB, SYSTEM DUP 8 MiB at 21 MiB (stripes 21 and 29 MiB), METADATA DUP at 29 MiB
    // sized 32 MiB, 32 MiB, 53673984, 256 MiB, 1 GiB; DEV_ITEM bytes_used as mkfs reported.
    #[test]
    fn chunk_plan_matches_mkfs_btrfs() {
        for (size, meta, dev_used) in [
            (mib(128), mib(32), 92_274_688u64),
            (mib(300), mib(32), 92_274_688),
            (1u64 << 30, 53_673_984, 132_513_792),
            (8u64 << 30, mib(256), 562_036_736),
            (64u64 << 30, 1 << 30, 2_172_649_472),
        ] {
            let c = plan_chunks(size).unwrap();
            assert_eq!(c.len(), 3);
            assert_eq!(
                c[0],
                ChunkLayout {
                    logical: mib(13),
                    length: mib(8),
                    flags: bg_flags::DATA,
                    stripes: vec![mib(13)],
                }
            );
            assert_eq!(
                c[1],
                ChunkLayout {
                    logical: mib(21),
                    length: mib(8),
                    flags: bg_flags::SYSTEM | bg_flags::DUP,
                    stripes: vec![mib(21), mib(29)],
                }
            );
            assert_eq!(c[2].logical, mib(29));
            assert_eq!(c[2].length, meta, "size {size}");
            assert_eq!(c[2].stripes, vec![mib(37), mib(37) + meta]);
            let used: u64 = c.iter().map(|x| x.length * x.stripes.len() as u64).sum();
            assert_eq!(used, dev_used, "size {size}");
        }
        assert!(plan_chunks(min_dev_size() - 4096).is_err());
        assert!(plan_chunks(min_dev_size()).is_ok());
    }

    // Test scenario: the 64 MiB superblock copy falls in the first metadata stripe and is
    // excluded as the 64 KiB stripe unit holding it; nothing is excluded elsewhere.
    #[test]
    fn super_exclusion() {
        let c = plan_chunks(1 << 30).unwrap();
        assert!(super_excluded_ranges(&c[0], 1 << 30).is_empty());
        assert!(super_excluded_ranges(&c[1], 1 << 30).is_empty());
        let l = mib(29) + (mib(64) - mib(37));
        assert_eq!(
            super_excluded_ranges(&c[2], 1 << 30),
            vec![(l, l + STRIPE_LEN)]
        );
    }

    // Test scenario: option parsing accepts mkfs.btrfs's spellings and refuses the rest.
    #[test]
    fn option_parsing() {
        assert_eq!(parse_csum_type("XXHASH"), Some(CsumType::Xxhash64));
        assert_eq!(parse_csum_type("blake2"), Some(CsumType::Blake2b));
        assert_eq!(parse_csum_type("crc32"), None);
        assert_eq!(parse_size("128M").unwrap(), mib(128));
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1q").is_err());
        assert!(parse_size("99999999999E").is_err());
        let mut o = MkfsOptions {
            nodesize: 8192,
            ..Default::default()
        };
        assert!(validate_options(&o).is_ok());
        o.nodesize = 12288;
        assert!(validate_options(&o).is_err());
        o.nodesize = 131072;
        assert!(validate_options(&o).is_err());
        o.nodesize = 4096;
        o.label = "x".repeat(256);
        assert!(validate_options(&o).is_err());
        assert_eq!(
            format_uuid(&[
                0x9a, 0x56, 0x78, 0x82, 0xfb, 0x30, 0x48, 0xba, 0xb0, 0x47, 0xc9, 0x93, 0x5b, 0x2e,
                0x09, 0x10
            ]),
            "9a567882-fb30-48ba-b047-c9935b2e0910"
        );
    }
}
