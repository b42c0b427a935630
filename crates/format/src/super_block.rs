//! The superblock (`struct btrfs_super_block`, 4096 bytes) and its feature flags.

use crate::bytes::{array_at, put_u16, put_u32, put_u64, slice, u16_at, u32_at, u64_at, u8_at};
use crate::csum::{CsumType, CSUM_FIELD_SIZE};
use crate::error::{CorruptKind, Result};
use crate::items::DevItem;
use crate::key::Key;

pub const SUPER_INFO_SIZE: usize = 4096;
pub const MAGIC: [u8; 8] = *b"_BHRfS_M";
/// Byte offset of the primary copy on every device.
pub const SUPER_INFO_OFFSET: u64 = 64 * 1024;
pub const SUPER_MIRROR_MAX: usize = 3;
pub const SYSTEM_CHUNK_ARRAY_SIZE: usize = 2048;
pub const LABEL_SIZE: usize = 256;
pub const NUM_BACKUP_ROOTS: usize = 4;

/// `btrfs_sb_offset`: device offset of superblock copy `mirror` (0 = primary).
pub fn sb_offset(mirror: usize) -> u64 {
    if mirror == 0 {
        SUPER_INFO_OFFSET
    } else {
        (16 * 1024u64) << (12 * mirror as u32)
    }
}

/// Incompat feature bits (`BTRFS_FEATURE_INCOMPAT_*`).
pub mod incompat {
    pub const MIXED_BACKREF: u64 = 1 << 0;
    pub const DEFAULT_SUBVOL: u64 = 1 << 1;
    pub const MIXED_GROUPS: u64 = 1 << 2;
    pub const COMPRESS_LZO: u64 = 1 << 3;
    pub const COMPRESS_ZSTD: u64 = 1 << 4;
    pub const BIG_METADATA: u64 = 1 << 5;
    pub const EXTENDED_IREF: u64 = 1 << 6;
    pub const RAID56: u64 = 1 << 7;
    pub const SKINNY_METADATA: u64 = 1 << 8;
    pub const NO_HOLES: u64 = 1 << 9;
    pub const METADATA_UUID: u64 = 1 << 10;
    pub const RAID1C34: u64 = 1 << 11;
    pub const ZONED: u64 = 1 << 12;
    pub const EXTENT_TREE_V2: u64 = 1 << 13;
    pub const RAID_STRIPE_TREE: u64 = 1 << 14;
    pub const SIMPLE_QUOTA: u64 = 1 << 16;
    pub const REMAP_TREE: u64 = 1 << 17;

    pub const NAMES: &[(u64, &str)] = &[
        (MIXED_BACKREF, "mixed_backref"),
        (DEFAULT_SUBVOL, "default_subvol"),
        (MIXED_GROUPS, "mixed_groups"),
        (COMPRESS_LZO, "compress_lzo"),
        (COMPRESS_ZSTD, "compress_zstd"),
        (BIG_METADATA, "big_metadata"),
        (EXTENDED_IREF, "extended_iref"),
        (RAID56, "raid56"),
        (SKINNY_METADATA, "skinny_metadata"),
        (NO_HOLES, "no_holes"),
        (METADATA_UUID, "metadata_uuid"),
        (RAID1C34, "raid1c34"),
        (ZONED, "zoned"),
        (EXTENT_TREE_V2, "extent_tree_v2"),
        (RAID_STRIPE_TREE, "raid_stripe_tree"),
        (SIMPLE_QUOTA, "simple_quota"),
        (REMAP_TREE, "remap_tree"),
    ];
}

/// Compat-ro feature bits (`BTRFS_FEATURE_COMPAT_RO_*`).
pub mod compat_ro {
    pub const FREE_SPACE_TREE: u64 = 1 << 0;
    pub const FREE_SPACE_TREE_VALID: u64 = 1 << 1;
    pub const VERITY: u64 = 1 << 2;
    pub const BLOCK_GROUP_TREE: u64 = 1 << 3;

    pub const NAMES: &[(u64, &str)] = &[
        (FREE_SPACE_TREE, "free_space_tree"),
        (FREE_SPACE_TREE_VALID, "free_space_tree_valid"),
        (VERITY, "verity"),
        (BLOCK_GROUP_TREE, "block_group_tree"),
    ];
}

/// Superblock flags (`BTRFS_SUPER_FLAG_*`, plus the header flag bits).
pub mod sb_flags {
    pub const ERROR: u64 = 1 << 2;
    pub const SEEDING: u64 = 1 << 32;
    pub const METADUMP: u64 = 1 << 33;
    pub const METADUMP_V2: u64 = 1 << 34;
    pub const CHANGING_FSID: u64 = 1 << 35;
    pub const CHANGING_FSID_V2: u64 = 1 << 36;
    pub const CHANGING_BG_TREE: u64 = 1 << 38;
    pub const CHANGING_DATA_CSUM: u64 = 1 << 39;
    pub const CHANGING_META_CSUM: u64 = 1 << 40;
}

/// Names of the bits set in `value` that `table` knows, and the unknown remainder.
pub fn flag_names(value: u64, table: &'static [(u64, &'static str)]) -> (Vec<&'static str>, u64) {
    let mut names = Vec::new();
    let mut rest = value;
    for &(bit, name) in table {
        if value & bit != 0 {
            names.push(name);
            rest &= !bit;
        }
    }
    (names, rest)
}

/// `struct btrfs_root_backup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootBackup {
    pub tree_root: u64,
    pub tree_root_gen: u64,
    pub chunk_root: u64,
    pub chunk_root_gen: u64,
    pub extent_root: u64,
    pub extent_root_gen: u64,
    pub fs_root: u64,
    pub fs_root_gen: u64,
    pub dev_root: u64,
    pub dev_root_gen: u64,
    pub csum_root: u64,
    pub csum_root_gen: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub num_devices: u64,
    pub tree_root_level: u8,
    pub chunk_root_level: u8,
    pub extent_root_level: u8,
    pub fs_root_level: u8,
    pub dev_root_level: u8,
    pub csum_root_level: u8,
}

impl RootBackup {
    pub const SIZE: usize = 168;

    fn parse(b: &[u8], o: usize) -> Result<Self> {
        let q = |i: usize| u64_at(b, o + i * 8, "root backup");
        let l = |i: usize| u8_at(b, o + 152 + i, "root backup level");
        Ok(RootBackup {
            tree_root: q(0)?,
            tree_root_gen: q(1)?,
            chunk_root: q(2)?,
            chunk_root_gen: q(3)?,
            extent_root: q(4)?,
            extent_root_gen: q(5)?,
            fs_root: q(6)?,
            fs_root_gen: q(7)?,
            dev_root: q(8)?,
            dev_root_gen: q(9)?,
            csum_root: q(10)?,
            csum_root_gen: q(11)?,
            total_bytes: q(12)?,
            bytes_used: q(13)?,
            num_devices: q(14)?,
            tree_root_level: l(0)?,
            chunk_root_level: l(1)?,
            extent_root_level: l(2)?,
            fs_root_level: l(3)?,
            dev_root_level: l(4)?,
            csum_root_level: l(5)?,
        })
    }

    /// Write the 168 on-disk bytes at `o` (the unused tail is zeroed).
    pub fn encode(&self, b: &mut [u8], o: usize) {
        let q = [
            self.tree_root,
            self.tree_root_gen,
            self.chunk_root,
            self.chunk_root_gen,
            self.extent_root,
            self.extent_root_gen,
            self.fs_root,
            self.fs_root_gen,
            self.dev_root,
            self.dev_root_gen,
            self.csum_root,
            self.csum_root_gen,
            self.total_bytes,
            self.bytes_used,
            self.num_devices,
        ];
        b[o..o + Self::SIZE].fill(0);
        for (i, v) in q.iter().enumerate() {
            put_u64(b, o + i * 8, *v);
        }
        let levels = [
            self.tree_root_level,
            self.chunk_root_level,
            self.extent_root_level,
            self.fs_root_level,
            self.dev_root_level,
            self.csum_root_level,
        ];
        b[o + 152..o + 158].copy_from_slice(&levels);
    }
}

/// Parsed superblock. `raw` keeps the exact bytes so that a writer can rewrite it field by field.
#[derive(Clone, Debug)]
pub struct SuperBlock {
    pub csum: [u8; CSUM_FIELD_SIZE],
    pub fsid: [u8; 16],
    pub bytenr: u64,
    pub flags: u64,
    pub generation: u64,
    pub root: u64,
    pub chunk_root: u64,
    pub log_root: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub root_dir_objectid: u64,
    pub num_devices: u64,
    pub sectorsize: u32,
    pub nodesize: u32,
    pub stripesize: u32,
    pub sys_chunk_array_size: u32,
    pub chunk_root_generation: u64,
    pub compat_flags: u64,
    pub compat_ro_flags: u64,
    pub incompat_flags: u64,
    pub csum_type_raw: u16,
    pub root_level: u8,
    pub chunk_root_level: u8,
    pub log_root_level: u8,
    pub dev_item: DevItem,
    pub label: String,
    pub cache_generation: u64,
    pub uuid_tree_generation: u64,
    pub metadata_uuid: [u8; 16],
    pub sys_chunk_array: Vec<u8>,
    pub backups: [RootBackup; NUM_BACKUP_ROOTS],
    pub raw: Vec<u8>,
}

impl SuperBlock {
    /// Parse a 4096-byte superblock. Checks the magic only; call [`SuperBlock::verify_csum`] and
    /// [`SuperBlock::validate`] for the rest (split so that tools can look at broken copies).
    pub fn parse(b: &[u8]) -> Result<Self> {
        let b = slice(b, 0, SUPER_INFO_SIZE, "superblock")?;
        if b[64..72] != MAGIC {
            return Err(CorruptKind::BadMagic.into());
        }
        let label_raw = slice(b, 299, LABEL_SIZE, "label")?;
        let label_end = label_raw.iter().position(|&c| c == 0).unwrap_or(LABEL_SIZE);
        let sys_chunk_array_size = u32_at(b, 160, "sys_chunk_array_size")?;
        let mut backups = [RootBackup::default(); NUM_BACKUP_ROOTS];
        for (i, bk) in backups.iter_mut().enumerate() {
            *bk = RootBackup::parse(b, 2859 + i * RootBackup::SIZE)?;
        }
        Ok(SuperBlock {
            csum: array_at(b, 0, "csum")?,
            fsid: array_at(b, 32, "fsid")?,
            bytenr: u64_at(b, 48, "bytenr")?,
            flags: u64_at(b, 56, "flags")?,
            generation: u64_at(b, 72, "generation")?,
            root: u64_at(b, 80, "root")?,
            chunk_root: u64_at(b, 88, "chunk_root")?,
            log_root: u64_at(b, 96, "log_root")?,
            total_bytes: u64_at(b, 112, "total_bytes")?,
            bytes_used: u64_at(b, 120, "bytes_used")?,
            root_dir_objectid: u64_at(b, 128, "root_dir_objectid")?,
            num_devices: u64_at(b, 136, "num_devices")?,
            sectorsize: u32_at(b, 144, "sectorsize")?,
            nodesize: u32_at(b, 148, "nodesize")?,
            stripesize: u32_at(b, 156, "stripesize")?,
            sys_chunk_array_size,
            chunk_root_generation: u64_at(b, 164, "chunk_root_generation")?,
            compat_flags: u64_at(b, 172, "compat_flags")?,
            compat_ro_flags: u64_at(b, 180, "compat_ro_flags")?,
            incompat_flags: u64_at(b, 188, "incompat_flags")?,
            csum_type_raw: u16_at(b, 196, "csum_type")?,
            root_level: u8_at(b, 198, "root_level")?,
            chunk_root_level: u8_at(b, 199, "chunk_root_level")?,
            log_root_level: u8_at(b, 200, "log_root_level")?,
            dev_item: DevItem::parse(slice(b, 201, DevItem::SIZE, "dev_item")?)?,
            label: String::from_utf8_lossy(&label_raw[..label_end]).into_owned(),
            cache_generation: u64_at(b, 555, "cache_generation")?,
            uuid_tree_generation: u64_at(b, 563, "uuid_tree_generation")?,
            metadata_uuid: array_at(b, 571, "metadata_uuid")?,
            sys_chunk_array: slice(b, 811, SYSTEM_CHUNK_ARRAY_SIZE, "sys_chunk_array")?.to_vec(),
            backups,
            raw: b.to_vec(),
        })
    }

    pub fn csum_type(&self) -> Result<CsumType> {
        CsumType::from_disk(self.csum_type_raw)
    }

    /// Whether the stored checksum covers bytes 32..4096 correctly.
    pub fn verify_csum(&self) -> Result<()> {
        let t = self.csum_type()?;
        if t.verify(&self.raw[CSUM_FIELD_SIZE..], &self.csum) {
            Ok(())
        } else {
            Err(CorruptKind::ChecksumMismatch.into())
        }
    }

    /// The uuid written into tree block headers (`metadata_uuid` when that feature is on).
    pub fn metadata_fsid(&self) -> [u8; 16] {
        if self.incompat_flags & incompat::METADATA_UUID != 0 {
            self.metadata_uuid
        } else {
            self.fsid
        }
    }

    /// Sanity checks of `btrfs_validate_super` that do not need the devices.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &'static str, value: u64| Err(CorruptKind::BadField { what, value }.into());
        self.csum_type()?;
        let ss = self.sectorsize;
        if !ss.is_power_of_two() || !(4096..=65536).contains(&ss) {
            return bad("sectorsize", ss.into());
        }
        let ns = self.nodesize;
        if !ns.is_power_of_two() || ns < ss || ns > 65536 {
            return bad("nodesize", ns.into());
        }
        if self.stripesize != ss && self.stripesize != 4096 {
            // The kernel requires stripesize == sectorsize; old mkfs wrote 4096.
            return bad("stripesize", self.stripesize.into());
        }
        for (what, level) in [
            ("root_level", self.root_level),
            ("chunk_root_level", self.chunk_root_level),
            ("log_root_level", self.log_root_level),
        ] {
            if level >= 8 {
                return bad(what, level.into());
            }
        }
        for (what, addr) in [
            ("root", self.root),
            ("chunk_root", self.chunk_root),
            ("log_root", self.log_root),
        ] {
            if addr % u64::from(ss) != 0 {
                return bad(what, addr);
            }
        }
        if self.root == 0 {
            return bad("root", 0);
        }
        if self.chunk_root == 0 {
            return bad("chunk_root", 0);
        }
        if self.sys_chunk_array_size as usize > SYSTEM_CHUNK_ARRAY_SIZE {
            return bad("sys_chunk_array_size", self.sys_chunk_array_size.into());
        }
        if self.num_devices == 0 {
            return bad("num_devices", 0);
        }
        if self.generation == 0 {
            return bad("generation", 0);
        }
        Ok(())
    }

    /// Iterate the (key, chunk item bytes) pairs of `sys_chunk_array`.
    pub fn sys_chunks(&self) -> Result<Vec<(Key, Vec<u8>)>> {
        let arr = slice(
            &self.sys_chunk_array,
            0,
            self.sys_chunk_array_size as usize,
            "sys_chunk_array",
        )?;
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < arr.len() {
            let key = Key::parse(arr, off)?;
            off += Key::SIZE;
            if key.item_type != crate::key::item::CHUNK_ITEM {
                return Err(CorruptKind::BadField {
                    what: "sys_chunk_array key type",
                    value: key.item_type.into(),
                }
                .into());
            }
            let num_stripes = u16_at(arr, off + 44, "sys chunk num_stripes")? as usize;
            if num_stripes == 0 {
                return Err(CorruptKind::BadField {
                    what: "sys chunk num_stripes",
                    value: 0,
                }
                .into());
            }
            let len = crate::items::ChunkItem::size_for(num_stripes);
            out.push((key, slice(arr, off, len, "sys chunk")?.to_vec()));
            off += len;
        }
        Ok(out)
    }

    /// A superblock with every field zero (and a zeroed `raw`), for writers that fill it in
    /// field by field (mkfs).
    pub fn blank() -> Self {
        SuperBlock {
            csum: [0; CSUM_FIELD_SIZE],
            fsid: [0; 16],
            bytenr: 0,
            flags: 0,
            generation: 0,
            root: 0,
            chunk_root: 0,
            log_root: 0,
            total_bytes: 0,
            bytes_used: 0,
            root_dir_objectid: 0,
            num_devices: 0,
            sectorsize: 0,
            nodesize: 0,
            stripesize: 0,
            sys_chunk_array_size: 0,
            chunk_root_generation: 0,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
            csum_type_raw: 0,
            root_level: 0,
            chunk_root_level: 0,
            log_root_level: 0,
            dev_item: DevItem::default(),
            label: String::new(),
            cache_generation: 0,
            uuid_tree_generation: 0,
            metadata_uuid: [0; 16],
            sys_chunk_array: vec![0; SYSTEM_CHUNK_ARRAY_SIZE],
            backups: [RootBackup::default(); NUM_BACKUP_ROOTS],
            raw: vec![0; SUPER_INFO_SIZE],
        }
    }

    /// Append one system chunk to `sys_chunk_array` (`btrfs_add_system_chunk`): the key
    /// followed by the chunk item bytes. Refused when the array would overflow its 2048 bytes.
    pub fn add_sys_chunk(&mut self, key: Key, chunk: &[u8]) -> Result<()> {
        let start = self.sys_chunk_array_size as usize;
        let end = start + Key::SIZE + chunk.len();
        if end > SYSTEM_CHUNK_ARRAY_SIZE {
            return Err(CorruptKind::OutOfBounds {
                what: "sys_chunk_array",
                offset: start,
                len: Key::SIZE + chunk.len(),
                available: SYSTEM_CHUNK_ARRAY_SIZE,
            }
            .into());
        }
        self.sys_chunk_array.resize(SYSTEM_CHUNK_ARRAY_SIZE, 0);
        key.encode(&mut self.sys_chunk_array, start);
        self.sys_chunk_array[start + Key::SIZE..end].copy_from_slice(chunk);
        self.sys_chunk_array_size = end as u32;
        Ok(())
    }

    /// Serialize every parsed field over a copy of `raw` (so fields this struct does not model,
    /// such as `nr_global_roots` and the reserved words, keep their bytes), set the magic and
    /// the deprecated leafsize (= nodesize, as every writer does) and store the checksum.
    /// The label must be at most 255 bytes and the csum type known.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let t = self.csum_type()?;
        let label = self.label.as_bytes();
        if label.len() >= LABEL_SIZE {
            return Err(CorruptKind::BadField {
                what: "label length",
                value: label.len() as u64,
            }
            .into());
        }
        let mut b = if self.raw.len() == SUPER_INFO_SIZE {
            self.raw.clone()
        } else {
            vec![0u8; SUPER_INFO_SIZE]
        };
        b[32..48].copy_from_slice(&self.fsid);
        put_u64(&mut b, 48, self.bytenr);
        put_u64(&mut b, 56, self.flags);
        b[64..72].copy_from_slice(&MAGIC);
        put_u64(&mut b, 72, self.generation);
        put_u64(&mut b, 80, self.root);
        put_u64(&mut b, 88, self.chunk_root);
        put_u64(&mut b, 96, self.log_root);
        put_u64(&mut b, 112, self.total_bytes);
        put_u64(&mut b, 120, self.bytes_used);
        put_u64(&mut b, 128, self.root_dir_objectid);
        put_u64(&mut b, 136, self.num_devices);
        put_u32(&mut b, 144, self.sectorsize);
        put_u32(&mut b, 148, self.nodesize);
        put_u32(&mut b, 152, self.nodesize);
        put_u32(&mut b, 156, self.stripesize);
        put_u32(&mut b, 160, self.sys_chunk_array_size);
        put_u64(&mut b, 164, self.chunk_root_generation);
        put_u64(&mut b, 172, self.compat_flags);
        put_u64(&mut b, 180, self.compat_ro_flags);
        put_u64(&mut b, 188, self.incompat_flags);
        put_u16(&mut b, 196, self.csum_type_raw);
        b[198] = self.root_level;
        b[199] = self.chunk_root_level;
        b[200] = self.log_root_level;
        self.dev_item.encode(&mut b[201..201 + DevItem::SIZE]);
        b[299..299 + LABEL_SIZE].fill(0);
        b[299..299 + label.len()].copy_from_slice(label);
        put_u64(&mut b, 555, self.cache_generation);
        put_u64(&mut b, 563, self.uuid_tree_generation);
        b[571..587].copy_from_slice(&self.metadata_uuid);
        let arr = &mut b[811..811 + SYSTEM_CHUNK_ARRAY_SIZE];
        arr.fill(0);
        let n = self.sys_chunk_array.len().min(SYSTEM_CHUNK_ARRAY_SIZE);
        arr[..n].copy_from_slice(&self.sys_chunk_array[..n]);
        for (i, bk) in self.backups.iter().enumerate() {
            bk.encode(&mut b, 2859 + i * RootBackup::SIZE);
        }
        Self::update_csum_in_raw(&mut b, t);
        Ok(b)
    }

    /// The bytes of superblock copy `mirror` (`write_dev_supers`): as [`SuperBlock::to_bytes`]
    /// with `bytenr` set to that copy's own offset, checksummed.
    pub fn to_bytes_for_mirror(&self, mirror: usize) -> Result<Vec<u8>> {
        let mut copy = self.clone();
        copy.bytenr = sb_offset(mirror);
        copy.to_bytes()
    }

    /// Recompute the checksum into `raw` after fields in `raw` were changed.
    pub fn update_csum_in_raw(raw: &mut [u8], t: CsumType) {
        let c = t.compute(&raw[CSUM_FIELD_SIZE..SUPER_INFO_SIZE]);
        raw[..CSUM_FIELD_SIZE].copy_from_slice(&c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: mirror offsets are 64 KiB, 64 MiB and 256 GiB.
    #[test]
    fn mirror_offsets() {
        assert_eq!(sb_offset(0), 65536);
        assert_eq!(sb_offset(1), 64 << 20);
        assert_eq!(sb_offset(2), 256 << 30);
    }

    // Test scenario: a zeroed or truncated buffer is refused with an error, never a panic.
    #[test]
    fn garbage_is_refused() {
        assert!(SuperBlock::parse(&[0u8; 4096]).is_err());
        assert!(SuperBlock::parse(&[0u8; 100]).is_err());
        let mut b = vec![0u8; 4096];
        b[64..72].copy_from_slice(&MAGIC);
        let sb = SuperBlock::parse(&b).unwrap();
        assert!(sb.verify_csum().is_err());
        assert!(sb.validate().is_err());
    }

    // Test scenario: a superblock built field by field serializes, parses back with every
    // field equal (sys chunk, backups, dev item, label), verifies its checksum for each csum
    // type, and each mirror copy carries its own bytenr.
    #[test]
    fn encode_roundtrip() {
        use crate::items::{bg_flags, ChunkItem, Stripe};
        for t in [
            CsumType::Crc32c,
            CsumType::Xxhash64,
            CsumType::Sha256,
            CsumType::Blake2b,
        ] {
            let mut sb = SuperBlock::blank();
            sb.fsid = [1; 16];
            sb.metadata_uuid = [1; 16];
            sb.bytenr = SUPER_INFO_OFFSET;
            sb.flags = 1;
            sb.generation = 1;
            sb.root = 30 << 20;
            sb.chunk_root = 21 << 20;
            sb.chunk_root_generation = 1;
            sb.total_bytes = 1 << 30;
            sb.bytes_used = 9 * 16384;
            sb.root_dir_objectid = 6;
            sb.num_devices = 1;
            sb.sectorsize = 4096;
            sb.nodesize = 16384;
            sb.stripesize = 4096;
            sb.compat_ro_flags = compat_ro::FREE_SPACE_TREE | compat_ro::FREE_SPACE_TREE_VALID;
            sb.incompat_flags = incompat::MIXED_BACKREF | incompat::NO_HOLES;
            sb.csum_type_raw = t.to_disk();
            sb.uuid_tree_generation = 1;
            sb.label = "a label".into();
            sb.dev_item.devid = 1;
            sb.dev_item.uuid = [2; 16];
            sb.dev_item.fsid = [1; 16];
            sb.backups[0] = RootBackup {
                tree_root: 30 << 20,
                tree_root_gen: 1,
                total_bytes: 1 << 30,
                num_devices: 1,
                csum_root_level: 2,
                ..Default::default()
            };
            let chunk = ChunkItem {
                length: 8 << 20,
                owner: 2,
                stripe_len: 65536,
                chunk_type: bg_flags::SYSTEM | bg_flags::DUP,
                io_align: 65536,
                io_width: 65536,
                sector_size: 4096,
                num_stripes: 2,
                sub_stripes: 1,
                stripes: vec![
                    Stripe {
                        devid: 1,
                        offset: 21 << 20,
                        dev_uuid: [2; 16],
                    };
                    2
                ],
            };
            let key = Key::new(256, crate::key::item::CHUNK_ITEM, 21 << 20);
            sb.add_sys_chunk(key, &chunk.to_bytes()).unwrap();
            assert_eq!(sb.sys_chunk_array_size, 129);

            let b = sb.to_bytes().unwrap();
            let p = SuperBlock::parse(&b).unwrap();
            p.verify_csum().unwrap();
            p.validate().unwrap();
            assert_eq!(p.fsid, sb.fsid);
            assert_eq!(p.generation, 1);
            assert_eq!(p.nodesize, 16384);
            assert_eq!(u32_at(&b, 152, "leafsize").unwrap(), 16384);
            assert_eq!(p.label, "a label");
            assert_eq!(p.dev_item, sb.dev_item);
            assert_eq!(p.backups, sb.backups);
            assert_eq!(p.uuid_tree_generation, 1);
            assert_eq!(p.csum_type().unwrap(), t);
            let chunks = p.sys_chunks().unwrap();
            assert_eq!(chunks.len(), 1);
            assert_eq!(chunks[0].0, key);
            assert_eq!(ChunkItem::parse(&chunks[0].1).unwrap(), chunk);
            // Re-encoding the parsed copy is byte-identical.
            assert_eq!(p.to_bytes().unwrap(), b);

            let m1 = SuperBlock::parse(&sb.to_bytes_for_mirror(1).unwrap()).unwrap();
            m1.verify_csum().unwrap();
            assert_eq!(m1.bytenr, 64 << 20);
        }
    }

    // Test scenario: an over-long label and an overflowing sys_chunk_array are refused.
    #[test]
    fn encode_refusals() {
        let mut sb = SuperBlock::blank();
        sb.label = "x".repeat(256);
        assert!(sb.to_bytes().is_err());
        sb.label = "x".repeat(255);
        assert!(sb.to_bytes().is_ok());
        let big = vec![0u8; SYSTEM_CHUNK_ARRAY_SIZE];
        assert!(sb.add_sys_chunk(Key::new(256, 228, 0), &big).is_err());
    }

    // Test scenario: unknown feature bits are reported as a remainder.
    #[test]
    fn feature_names() {
        let (names, rest) = flag_names(incompat::NO_HOLES | (1 << 40), incompat::NAMES);
        assert_eq!(names, vec!["no_holes"]);
        assert_eq!(rest, 1 << 40);
    }
}
