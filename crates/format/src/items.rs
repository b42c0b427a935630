//! Item bodies (`btrfs_tree.h`): parse from the item's data bytes, encode for writers.

use crate::bytes::{array_at, slice, u16_at, u32_at, u64_at, u8_at};
use crate::error::{CorruptKind, Result};
use crate::key::Key;

/// `struct btrfs_timespec`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timespec {
    pub sec: u64,
    pub nsec: u32,
}

impl Timespec {
    pub const SIZE: usize = 12;
    pub fn parse(b: &[u8], off: usize) -> Result<Self> {
        Ok(Timespec {
            sec: u64_at(b, off, "timespec sec")?,
            nsec: u32_at(b, off + 8, "timespec nsec")?,
        })
    }
}

/// Inode flags (`BTRFS_INODE_*`).
pub mod inode_flags {
    pub const NODATASUM: u64 = 1 << 0;
    pub const NODATACOW: u64 = 1 << 1;
    pub const READONLY: u64 = 1 << 2;
    pub const NOCOMPRESS: u64 = 1 << 3;
    pub const PREALLOC: u64 = 1 << 4;
    pub const SYNC: u64 = 1 << 5;
    pub const IMMUTABLE: u64 = 1 << 6;
    pub const APPEND: u64 = 1 << 7;
    pub const NODUMP: u64 = 1 << 8;
    pub const NOATIME: u64 = 1 << 9;
    pub const DIRSYNC: u64 = 1 << 10;
    pub const COMPRESS: u64 = 1 << 11;
    pub const ROOT_ITEM_INIT: u64 = 1 << 31;
}

/// `struct btrfs_inode_item` (160 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeItem {
    pub generation: u64,
    pub transid: u64,
    pub size: u64,
    pub nbytes: u64,
    pub block_group: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u64,
    pub flags: u64,
    pub sequence: u64,
    pub atime: Timespec,
    pub ctime: Timespec,
    pub mtime: Timespec,
    pub otime: Timespec,
}

impl InodeItem {
    pub const SIZE: usize = 160;
    pub fn parse(b: &[u8]) -> Result<Self> {
        slice(b, 0, Self::SIZE, "inode item")?;
        Ok(InodeItem {
            generation: u64_at(b, 0, "inode generation")?,
            transid: u64_at(b, 8, "inode transid")?,
            size: u64_at(b, 16, "inode size")?,
            nbytes: u64_at(b, 24, "inode nbytes")?,
            block_group: u64_at(b, 32, "inode block_group")?,
            nlink: u32_at(b, 40, "inode nlink")?,
            uid: u32_at(b, 44, "inode uid")?,
            gid: u32_at(b, 48, "inode gid")?,
            mode: u32_at(b, 52, "inode mode")?,
            rdev: u64_at(b, 56, "inode rdev")?,
            flags: u64_at(b, 64, "inode flags")?,
            sequence: u64_at(b, 72, "inode sequence")?,
            atime: Timespec::parse(b, 112)?,
            ctime: Timespec::parse(b, 124)?,
            mtime: Timespec::parse(b, 136)?,
            otime: Timespec::parse(b, 148)?,
        })
    }
}

/// Root item flags.
pub const ROOT_SUBVOL_RDONLY: u64 = 1 << 0;
pub const ROOT_SUBVOL_DEAD: u64 = 1 << 48;

/// `struct btrfs_root_item`. Old images may carry the short (pre-v2) form; the v2 fields
/// are then zero, as the kernel treats them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootItem {
    pub inode: InodeItem,
    pub generation: u64,
    pub root_dirid: u64,
    pub bytenr: u64,
    pub byte_limit: u64,
    pub bytes_used: u64,
    pub last_snapshot: u64,
    pub flags: u64,
    pub refs: u32,
    pub drop_progress: Key,
    pub drop_level: u8,
    pub level: u8,
    pub generation_v2: u64,
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    pub received_uuid: [u8; 16],
    pub ctransid: u64,
    pub otransid: u64,
    pub ctime: Timespec,
    pub otime: Timespec,
}

impl RootItem {
    pub const SIZE: usize = 439;
    /// Size of the legacy root item without the v2 fields.
    pub const SIZE_V1: usize = 239;

    pub fn parse(b: &[u8]) -> Result<Self> {
        slice(b, 0, Self::SIZE_V1, "root item")?;
        let mut r = RootItem {
            inode: InodeItem::parse(b)?,
            generation: u64_at(b, 160, "root generation")?,
            root_dirid: u64_at(b, 168, "root_dirid")?,
            bytenr: u64_at(b, 176, "root bytenr")?,
            byte_limit: u64_at(b, 184, "root byte_limit")?,
            bytes_used: u64_at(b, 192, "root bytes_used")?,
            last_snapshot: u64_at(b, 200, "root last_snapshot")?,
            flags: u64_at(b, 208, "root flags")?,
            refs: u32_at(b, 216, "root refs")?,
            drop_progress: Key::parse(b, 220)?,
            drop_level: u8_at(b, 237, "root drop_level")?,
            level: u8_at(b, 238, "root level")?,
            ..Default::default()
        };
        if b.len() >= Self::SIZE {
            r.generation_v2 = u64_at(b, 239, "root generation_v2")?;
            r.uuid = array_at(b, 247, "root uuid")?;
            r.parent_uuid = array_at(b, 263, "root parent_uuid")?;
            r.received_uuid = array_at(b, 279, "root received_uuid")?;
            r.ctransid = u64_at(b, 295, "root ctransid")?;
            r.otransid = u64_at(b, 303, "root otransid")?;
            r.ctime = Timespec::parse(b, 327)?;
            r.otime = Timespec::parse(b, 339)?;
        }
        Ok(r)
    }
}

/// `struct btrfs_root_ref` / root backref (same layout), with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootRef {
    pub dirid: u64,
    pub sequence: u64,
    pub name: Vec<u8>,
}

impl RootRef {
    pub fn parse(b: &[u8]) -> Result<Self> {
        let name_len = u16_at(b, 16, "root ref name_len")? as usize;
        Ok(RootRef {
            dirid: u64_at(b, 0, "root ref dirid")?,
            sequence: u64_at(b, 8, "root ref sequence")?,
            name: slice(b, 18, name_len, "root ref name")?.to_vec(),
        })
    }
}

/// Directory entry file types (`BTRFS_FT_*`).
pub mod ft {
    pub const UNKNOWN: u8 = 0;
    pub const REG_FILE: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHRDEV: u8 = 3;
    pub const BLKDEV: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const SYMLINK: u8 = 7;
    pub const XATTR: u8 = 8;
    pub const MAX: u8 = 9;
    /// Bit set by fscrypt for encrypted names.
    pub const ENCRYPTED: u8 = 0x80;
}

/// One `struct btrfs_dir_item` with its name and data (DIR_ITEM, DIR_INDEX, XATTR_ITEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirItem {
    pub location: Key,
    pub transid: u64,
    pub file_type: u8,
    pub name: Vec<u8>,
    pub data: Vec<u8>,
}

impl DirItem {
    pub const HEADER_SIZE: usize = 30;

    /// All entries packed in one item (DIR_ITEM and XATTR_ITEM may hold hash collisions).
    pub fn parse_all(b: &[u8]) -> Result<Vec<DirItem>> {
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < b.len() {
            let location = Key::parse(b, off)?;
            let transid = u64_at(b, off + 17, "dir item transid")?;
            let data_len = u16_at(b, off + 25, "dir item data_len")? as usize;
            let name_len = u16_at(b, off + 27, "dir item name_len")? as usize;
            let file_type = u8_at(b, off + 29, "dir item type")?;
            let name = slice(b, off + Self::HEADER_SIZE, name_len, "dir item name")?.to_vec();
            let data = slice(
                b,
                off + Self::HEADER_SIZE + name_len,
                data_len,
                "dir item data",
            )?
            .to_vec();
            if name_len == 0 {
                return Err(CorruptKind::BadField {
                    what: "dir item name_len",
                    value: 0,
                }
                .into());
            }
            out.push(DirItem {
                location,
                transid,
                file_type,
                name,
                data,
            });
            off += Self::HEADER_SIZE + name_len + data_len;
        }
        Ok(out)
    }
}

/// One (index, name) entry of an INODE_REF item (key offset = parent dir).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRef {
    pub index: u64,
    pub name: Vec<u8>,
}

impl InodeRef {
    pub fn parse_all(b: &[u8]) -> Result<Vec<InodeRef>> {
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < b.len() {
            let index = u64_at(b, off, "inode ref index")?;
            let name_len = u16_at(b, off + 8, "inode ref name_len")? as usize;
            let name = slice(b, off + 10, name_len, "inode ref name")?.to_vec();
            out.push(InodeRef { index, name });
            off += 10 + name_len;
        }
        Ok(out)
    }
}

/// One entry of an INODE_EXTREF item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeExtref {
    pub parent: u64,
    pub index: u64,
    pub name: Vec<u8>,
}

impl InodeExtref {
    pub fn parse_all(b: &[u8]) -> Result<Vec<InodeExtref>> {
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < b.len() {
            let parent = u64_at(b, off, "extref parent")?;
            let index = u64_at(b, off + 8, "extref index")?;
            let name_len = u16_at(b, off + 16, "extref name_len")? as usize;
            let name = slice(b, off + 18, name_len, "extref name")?.to_vec();
            out.push(InodeExtref {
                parent,
                index,
                name,
            });
            off += 18 + name_len;
        }
        Ok(out)
    }
}

/// File extent types.
pub const FILE_EXTENT_INLINE: u8 = 0;
pub const FILE_EXTENT_REG: u8 = 1;
pub const FILE_EXTENT_PREALLOC: u8 = 2;

/// `struct btrfs_file_extent_item`. For inline extents the data follows the 21-byte header;
/// `inline_data` holds it and the disk fields are zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileExtentItem {
    pub generation: u64,
    pub ram_bytes: u64,
    pub compression: u8,
    pub encryption: u8,
    pub other_encoding: u16,
    pub extent_type: u8,
    pub disk_bytenr: u64,
    pub disk_num_bytes: u64,
    pub offset: u64,
    pub num_bytes: u64,
    pub inline_data: Vec<u8>,
}

impl FileExtentItem {
    pub const INLINE_HEADER_SIZE: usize = 21;
    pub const SIZE: usize = 53;

    pub fn parse(b: &[u8]) -> Result<Self> {
        let extent_type = u8_at(b, 20, "file extent type")?;
        let mut fe = FileExtentItem {
            generation: u64_at(b, 0, "file extent generation")?,
            ram_bytes: u64_at(b, 8, "file extent ram_bytes")?,
            compression: u8_at(b, 16, "file extent compression")?,
            encryption: u8_at(b, 17, "file extent encryption")?,
            other_encoding: u16_at(b, 18, "file extent other_encoding")?,
            extent_type,
            disk_bytenr: 0,
            disk_num_bytes: 0,
            offset: 0,
            num_bytes: 0,
            inline_data: Vec::new(),
        };
        match extent_type {
            FILE_EXTENT_INLINE => fe.inline_data = b[Self::INLINE_HEADER_SIZE..].to_vec(),
            FILE_EXTENT_REG | FILE_EXTENT_PREALLOC => {
                if b.len() != Self::SIZE {
                    return Err(CorruptKind::BadField {
                        what: "file extent item size",
                        value: b.len() as u64,
                    }
                    .into());
                }
                fe.disk_bytenr = u64_at(b, 21, "file extent disk_bytenr")?;
                fe.disk_num_bytes = u64_at(b, 29, "file extent disk_num_bytes")?;
                fe.offset = u64_at(b, 37, "file extent offset")?;
                fe.num_bytes = u64_at(b, 45, "file extent num_bytes")?;
            }
            other => {
                return Err(CorruptKind::BadField {
                    what: "file extent type",
                    value: other.into(),
                }
                .into())
            }
        }
        Ok(fe)
    }
}

/// Block group / chunk type and profile bits (`BTRFS_BLOCK_GROUP_*`).
pub mod bg_flags {
    pub const DATA: u64 = 1 << 0;
    pub const SYSTEM: u64 = 1 << 1;
    pub const METADATA: u64 = 1 << 2;
    pub const RAID0: u64 = 1 << 3;
    pub const RAID1: u64 = 1 << 4;
    pub const DUP: u64 = 1 << 5;
    pub const RAID10: u64 = 1 << 6;
    pub const RAID5: u64 = 1 << 7;
    pub const RAID6: u64 = 1 << 8;
    pub const RAID1C3: u64 = 1 << 9;
    pub const RAID1C4: u64 = 1 << 10;
    pub const TYPE_MASK: u64 = DATA | SYSTEM | METADATA;
    pub const PROFILE_MASK: u64 = RAID0 | RAID1 | DUP | RAID10 | RAID5 | RAID6 | RAID1C3 | RAID1C4;
}

/// One stripe of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripe {
    pub devid: u64,
    pub offset: u64,
    pub dev_uuid: [u8; 16],
}

/// `struct btrfs_chunk` with its stripes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkItem {
    pub length: u64,
    pub owner: u64,
    pub stripe_len: u64,
    pub chunk_type: u64,
    pub io_align: u32,
    pub io_width: u32,
    pub sector_size: u32,
    pub num_stripes: u16,
    pub sub_stripes: u16,
    pub stripes: Vec<Stripe>,
}

impl ChunkItem {
    pub const HEADER_SIZE: usize = 48;
    pub const STRIPE_SIZE: usize = 32;

    pub fn size_for(num_stripes: usize) -> usize {
        Self::HEADER_SIZE + num_stripes * Self::STRIPE_SIZE
    }

    pub fn parse(b: &[u8]) -> Result<Self> {
        let num_stripes = u16_at(b, 44, "chunk num_stripes")?;
        if num_stripes == 0 {
            return Err(CorruptKind::BadField {
                what: "chunk num_stripes",
                value: 0,
            }
            .into());
        }
        let mut stripes = Vec::with_capacity(num_stripes as usize);
        for i in 0..num_stripes as usize {
            let o = Self::HEADER_SIZE + i * Self::STRIPE_SIZE;
            stripes.push(Stripe {
                devid: u64_at(b, o, "stripe devid")?,
                offset: u64_at(b, o + 8, "stripe offset")?,
                dev_uuid: array_at(b, o + 16, "stripe dev_uuid")?,
            });
        }
        Ok(ChunkItem {
            length: u64_at(b, 0, "chunk length")?,
            owner: u64_at(b, 8, "chunk owner")?,
            stripe_len: u64_at(b, 16, "chunk stripe_len")?,
            chunk_type: u64_at(b, 24, "chunk type")?,
            io_align: u32_at(b, 32, "chunk io_align")?,
            io_width: u32_at(b, 36, "chunk io_width")?,
            sector_size: u32_at(b, 40, "chunk sector_size")?,
            num_stripes,
            sub_stripes: u16_at(b, 46, "chunk sub_stripes")?,
            stripes,
        })
    }
}

/// `struct btrfs_dev_item` (98 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevItem {
    pub devid: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub io_align: u32,
    pub io_width: u32,
    pub sector_size: u32,
    pub dev_type: u64,
    pub generation: u64,
    pub start_offset: u64,
    pub dev_group: u32,
    pub seek_speed: u8,
    pub bandwidth: u8,
    pub uuid: [u8; 16],
    pub fsid: [u8; 16],
}

impl DevItem {
    pub const SIZE: usize = 98;
    pub fn parse(b: &[u8]) -> Result<Self> {
        Ok(DevItem {
            devid: u64_at(b, 0, "dev devid")?,
            total_bytes: u64_at(b, 8, "dev total_bytes")?,
            bytes_used: u64_at(b, 16, "dev bytes_used")?,
            io_align: u32_at(b, 24, "dev io_align")?,
            io_width: u32_at(b, 28, "dev io_width")?,
            sector_size: u32_at(b, 32, "dev sector_size")?,
            dev_type: u64_at(b, 36, "dev type")?,
            generation: u64_at(b, 44, "dev generation")?,
            start_offset: u64_at(b, 52, "dev start_offset")?,
            dev_group: u32_at(b, 60, "dev group")?,
            seek_speed: u8_at(b, 64, "dev seek_speed")?,
            bandwidth: u8_at(b, 65, "dev bandwidth")?,
            uuid: array_at(b, 66, "dev uuid")?,
            fsid: array_at(b, 82, "dev fsid")?,
        })
    }
}

/// `struct btrfs_block_group_item`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockGroupItem {
    pub used: u64,
    pub chunk_objectid: u64,
    pub flags: u64,
}

impl BlockGroupItem {
    pub const SIZE: usize = 24;
    pub fn parse(b: &[u8]) -> Result<Self> {
        Ok(BlockGroupItem {
            used: u64_at(b, 0, "block group used")?,
            chunk_objectid: u64_at(b, 8, "block group chunk_objectid")?,
            flags: u64_at(b, 16, "block group flags")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: a dir item holding two colliding names parses both; a name running past
    // the item is an error.
    #[test]
    fn dir_item_collisions() {
        let mut b = Vec::new();
        for name in [&b"a"[..], b"bc"] {
            let mut h = [0u8; 30];
            Key::new(257, 1, 0).encode(&mut h, 0);
            h[27..29].copy_from_slice(&(name.len() as u16).to_le_bytes());
            h[29] = ft::REG_FILE;
            b.extend_from_slice(&h);
            b.extend_from_slice(name);
        }
        let items = DirItem::parse_all(&b).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].name, b"bc");
        assert!(DirItem::parse_all(&b[..b.len() - 1]).is_err());
    }

    // Test scenario: a REG file extent item of the wrong size and unknown types are refused.
    #[test]
    fn file_extent_sizes() {
        let mut b = vec![0u8; 53];
        b[20] = FILE_EXTENT_REG;
        assert!(FileExtentItem::parse(&b).is_ok());
        assert!(FileExtentItem::parse(&b[..52]).is_err());
        b[20] = 7;
        assert!(FileExtentItem::parse(&b).is_err());
        let mut inl = vec![0u8; 21];
        inl.extend_from_slice(b"hello");
        assert_eq!(FileExtentItem::parse(&inl).unwrap().inline_data, b"hello");
    }
}
