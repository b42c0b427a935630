//! Item bodies (`btrfs_tree.h`): parse from the item's data bytes, encode for writers.

use crate::bytes::{array_at, put_u16, put_u32, put_u64, slice, u16_at, u32_at, u64_at, u8_at};
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

    /// Write the 12 on-disk bytes at `off` (the caller sized `b`).
    pub fn encode(&self, b: &mut [u8], off: usize) {
        put_u64(b, off, self.sec);
        put_u32(b, off + 8, self.nsec);
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

    /// Write the 160 on-disk bytes at the start of `b` (at least [`InodeItem::SIZE`] long).
    /// The reserved words (bytes 80..112) are written as zero.
    pub fn encode(&self, b: &mut [u8]) {
        b[..Self::SIZE].fill(0);
        put_u64(b, 0, self.generation);
        put_u64(b, 8, self.transid);
        put_u64(b, 16, self.size);
        put_u64(b, 24, self.nbytes);
        put_u64(b, 32, self.block_group);
        put_u32(b, 40, self.nlink);
        put_u32(b, 44, self.uid);
        put_u32(b, 48, self.gid);
        put_u32(b, 52, self.mode);
        put_u64(b, 56, self.rdev);
        put_u64(b, 64, self.flags);
        put_u64(b, 72, self.sequence);
        self.atime.encode(b, 112);
        self.ctime.encode(b, 124);
        self.mtime.encode(b, 136);
        self.otime.encode(b, 148);
    }

    /// The item body as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::SIZE];
        self.encode(&mut b);
        b
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
    /// Send/receive fields (`stransid`, `rtransid`, `stime`, `rtime`); zero unless the
    /// subvolume was received.
    pub stransid: u64,
    pub rtransid: u64,
    pub stime: Timespec,
    pub rtime: Timespec,
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
            r.stransid = u64_at(b, 311, "root stransid")?;
            r.rtransid = u64_at(b, 319, "root rtransid")?;
            r.stime = Timespec::parse(b, 351)?;
            r.rtime = Timespec::parse(b, 363)?;
        }
        Ok(r)
    }

    /// The full 439-byte (v2) item body; the reserved tail is zero.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::SIZE];
        self.inode.encode(&mut b);
        put_u64(&mut b, 160, self.generation);
        put_u64(&mut b, 168, self.root_dirid);
        put_u64(&mut b, 176, self.bytenr);
        put_u64(&mut b, 184, self.byte_limit);
        put_u64(&mut b, 192, self.bytes_used);
        put_u64(&mut b, 200, self.last_snapshot);
        put_u64(&mut b, 208, self.flags);
        put_u32(&mut b, 216, self.refs);
        self.drop_progress.encode(&mut b, 220);
        b[237] = self.drop_level;
        b[238] = self.level;
        put_u64(&mut b, 239, self.generation_v2);
        b[247..263].copy_from_slice(&self.uuid);
        b[263..279].copy_from_slice(&self.parent_uuid);
        b[279..295].copy_from_slice(&self.received_uuid);
        put_u64(&mut b, 295, self.ctransid);
        put_u64(&mut b, 303, self.otransid);
        put_u64(&mut b, 311, self.stransid);
        put_u64(&mut b, 319, self.rtransid);
        self.ctime.encode(&mut b, 327);
        self.otime.encode(&mut b, 339);
        self.stime.encode(&mut b, 351);
        self.rtime.encode(&mut b, 363);
        b
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

    /// The item body (ROOT_REF and ROOT_BACKREF share it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 18 + self.name.len()];
        put_u64(&mut b, 0, self.dirid);
        put_u64(&mut b, 8, self.sequence);
        put_u16(&mut b, 16, len_u16(&self.name));
        b[18..].copy_from_slice(&self.name);
        b
    }
}

/// On-disk name and data lengths are u16; longer ones are a caller bug (btrfs names are at
/// most 255 bytes, xattr values at most a leaf), never disk data.
fn len_u16(field: &[u8]) -> u16 {
    u16::try_from(field.len()).expect("item name or data longer than u16::MAX bytes")
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

    /// Append this entry's on-disk bytes to `out` (several entries of one DIR_ITEM or
    /// XATTR_ITEM with colliding hashes are simply concatenated).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; Self::HEADER_SIZE];
        self.location.encode(&mut h, 0);
        put_u64(&mut h, 17, self.transid);
        put_u16(&mut h, 25, len_u16(&self.data));
        put_u16(&mut h, 27, len_u16(&self.name));
        h[29] = self.file_type;
        out.extend_from_slice(&h);
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.data);
    }

    /// The item body holding this one entry.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::HEADER_SIZE + self.name.len() + self.data.len());
        self.encode_into(&mut b);
        b
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

    /// Append this entry's on-disk bytes to `out` (an INODE_REF item is a list of entries).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; 10];
        put_u64(&mut h, 0, self.index);
        put_u16(&mut h, 8, len_u16(&self.name));
        out.extend_from_slice(&h);
        out.extend_from_slice(&self.name);
    }

    /// The item body holding this one entry.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(10 + self.name.len());
        self.encode_into(&mut b);
        b
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

    /// Append this entry's on-disk bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; 18];
        put_u64(&mut h, 0, self.parent);
        put_u64(&mut h, 8, self.index);
        put_u16(&mut h, 16, len_u16(&self.name));
        out.extend_from_slice(&h);
        out.extend_from_slice(&self.name);
    }

    /// The item body holding this one entry.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(18 + self.name.len());
        self.encode_into(&mut b);
        b
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

    /// The item body: header plus inline data for inline extents, the fixed 53 bytes
    /// otherwise.
    pub fn to_bytes(&self) -> Vec<u8> {
        let inline = self.extent_type == FILE_EXTENT_INLINE;
        let len = if inline {
            Self::INLINE_HEADER_SIZE + self.inline_data.len()
        } else {
            Self::SIZE
        };
        let mut b = vec![0u8; len];
        put_u64(&mut b, 0, self.generation);
        put_u64(&mut b, 8, self.ram_bytes);
        b[16] = self.compression;
        b[17] = self.encryption;
        put_u16(&mut b, 18, self.other_encoding);
        b[20] = self.extent_type;
        if inline {
            b[Self::INLINE_HEADER_SIZE..].copy_from_slice(&self.inline_data);
        } else {
            put_u64(&mut b, 21, self.disk_bytenr);
            put_u64(&mut b, 29, self.disk_num_bytes);
            put_u64(&mut b, 37, self.offset);
            put_u64(&mut b, 45, self.num_bytes);
        }
        b
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

    /// The item body (also the form stored in the superblock's sys_chunk_array). The stripe
    /// count written is `stripes.len()`; `num_stripes` must agree.
    pub fn to_bytes(&self) -> Vec<u8> {
        debug_assert_eq!(usize::from(self.num_stripes), self.stripes.len());
        let mut b = vec![0u8; Self::size_for(self.stripes.len())];
        put_u64(&mut b, 0, self.length);
        put_u64(&mut b, 8, self.owner);
        put_u64(&mut b, 16, self.stripe_len);
        put_u64(&mut b, 24, self.chunk_type);
        put_u32(&mut b, 32, self.io_align);
        put_u32(&mut b, 36, self.io_width);
        put_u32(&mut b, 40, self.sector_size);
        put_u16(&mut b, 44, self.num_stripes);
        put_u16(&mut b, 46, self.sub_stripes);
        for (i, s) in self.stripes.iter().enumerate() {
            let o = Self::HEADER_SIZE + i * Self::STRIPE_SIZE;
            put_u64(&mut b, o, s.devid);
            put_u64(&mut b, o + 8, s.offset);
            b[o + 16..o + 32].copy_from_slice(&s.dev_uuid);
        }
        b
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

    /// Write the 98 on-disk bytes at the start of `b` (the chunk tree item and the copy
    /// embedded in the superblock share this layout).
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.devid);
        put_u64(b, 8, self.total_bytes);
        put_u64(b, 16, self.bytes_used);
        put_u32(b, 24, self.io_align);
        put_u32(b, 28, self.io_width);
        put_u32(b, 32, self.sector_size);
        put_u64(b, 36, self.dev_type);
        put_u64(b, 44, self.generation);
        put_u64(b, 52, self.start_offset);
        put_u32(b, 60, self.dev_group);
        b[64] = self.seek_speed;
        b[65] = self.bandwidth;
        b[66..82].copy_from_slice(&self.uuid);
        b[82..98].copy_from_slice(&self.fsid);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::SIZE];
        self.encode(&mut b);
        b
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

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::SIZE];
        put_u64(&mut b, 0, self.used);
        put_u64(&mut b, 8, self.chunk_objectid);
        put_u64(&mut b, 16, self.flags);
        b
    }
}

/// `struct btrfs_dev_extent` (48 bytes), keyed (devid, DEV_EXTENT, physical offset): which
/// chunk owns this stretch of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevExtent {
    /// Always the chunk tree (3).
    pub chunk_tree: u64,
    /// Always FIRST_CHUNK_TREE (256).
    pub chunk_objectid: u64,
    /// Logical start of the chunk (the CHUNK_ITEM key offset).
    pub chunk_offset: u64,
    pub length: u64,
    pub chunk_tree_uuid: [u8; 16],
}

impl DevExtent {
    pub const SIZE: usize = 48;

    pub fn parse(b: &[u8]) -> Result<Self> {
        Ok(DevExtent {
            chunk_tree: u64_at(b, 0, "dev extent chunk_tree")?,
            chunk_objectid: u64_at(b, 8, "dev extent chunk_objectid")?,
            chunk_offset: u64_at(b, 16, "dev extent chunk_offset")?,
            length: u64_at(b, 24, "dev extent length")?,
            chunk_tree_uuid: array_at(b, 32, "dev extent chunk_tree_uuid")?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::SIZE];
        put_u64(&mut b, 0, self.chunk_tree);
        put_u64(&mut b, 8, self.chunk_objectid);
        put_u64(&mut b, 16, self.chunk_offset);
        put_u64(&mut b, 24, self.length);
        b[32..48].copy_from_slice(&self.chunk_tree_uuid);
        b
    }
}

/// `FREE_SPACE_INFO` flag: the group's free space is stored as FREE_SPACE_BITMAP items.
pub const FREE_SPACE_USING_BITMAPS: u32 = 1 << 0;

/// `struct btrfs_free_space_info` (8 bytes), keyed (block group start, FREE_SPACE_INFO,
/// block group length) in the free space tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeSpaceInfo {
    /// Number of FREE_SPACE_EXTENT items (or free extents described by the bitmaps).
    pub extent_count: u32,
    pub flags: u32,
}

impl FreeSpaceInfo {
    pub const SIZE: usize = 8;

    pub fn parse(b: &[u8]) -> Result<Self> {
        Ok(FreeSpaceInfo {
            extent_count: u32_at(b, 0, "free space info extent_count")?,
            flags: u32_at(b, 4, "free space info flags")?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::SIZE];
        put_u32(&mut b, 0, self.extent_count);
        put_u32(&mut b, 4, self.flags);
        b
    }
}

/// Key of a UUID tree item (`btrfs_uuid_to_key`): the first eight bytes of the uuid, read as
/// little endian, are the objectid and the last eight the offset. `item_type` is
/// `UUID_SUBVOL` or `UUID_RECEIVED_SUBVOL`.
pub fn uuid_key(uuid: &[u8; 16], item_type: u8) -> Key {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&uuid[..8]);
    hi.copy_from_slice(&uuid[8..]);
    Key::new(u64::from_le_bytes(lo), item_type, u64::from_le_bytes(hi))
}

/// Body of a UUID tree item: the ids of the subvolumes carrying that uuid, as le64s.
pub fn uuid_item_to_bytes(subvol_ids: &[u64]) -> Vec<u8> {
    subvol_ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// Parse a UUID tree item body into its subvolume ids.
pub fn uuid_item_parse(b: &[u8]) -> Result<Vec<u64>> {
    if !b.len().is_multiple_of(8) {
        return Err(CorruptKind::BadField {
            what: "uuid item size",
            value: b.len() as u64,
        }
        .into());
    }
    (0..b.len() / 8)
        .map(|i| u64_at(b, i * 8, "uuid item subvol id"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::item as item_key_type;

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

    fn ts(sec: u64, nsec: u32) -> Timespec {
        Timespec { sec, nsec }
    }

    fn sample_inode() -> InodeItem {
        InodeItem {
            generation: 7,
            transid: 9,
            size: 4096,
            nbytes: 8192,
            block_group: 0,
            nlink: 2,
            uid: 1000,
            gid: 100,
            mode: 0o100644,
            rdev: 0x0102,
            flags: inode_flags::NODATASUM | inode_flags::NOATIME,
            sequence: 3,
            atime: ts(1, 2),
            ctime: ts(3, 4),
            mtime: ts(5, 6),
            otime: ts(7, 999_999_999),
        }
    }

    // Test scenario: every field of an inode item survives encode -> parse, and the reserved
    // words are zero.
    #[test]
    fn inode_item_roundtrip() {
        let i = sample_inode();
        let b = i.to_bytes();
        assert_eq!(b.len(), InodeItem::SIZE);
        assert!(b[80..112].iter().all(|&x| x == 0));
        assert_eq!(InodeItem::parse(&b).unwrap(), i);
    }

    // Test scenario: a full v2 root item round-trips with every field set, including the
    // send/receive ones, and is 439 bytes with a zero reserved tail.
    #[test]
    fn root_item_roundtrip() {
        let r = RootItem {
            inode: sample_inode(),
            generation: 11,
            root_dirid: 256,
            bytenr: 30_408_704,
            byte_limit: 1,
            bytes_used: 16384,
            last_snapshot: 4,
            flags: ROOT_SUBVOL_RDONLY,
            refs: 1,
            drop_progress: Key::new(257, 1, 0),
            drop_level: 1,
            level: 2,
            generation_v2: 11,
            uuid: [1; 16],
            parent_uuid: [2; 16],
            received_uuid: [3; 16],
            ctransid: 5,
            otransid: 6,
            ctime: ts(10, 11),
            otime: ts(12, 13),
            stransid: 7,
            rtransid: 8,
            stime: ts(14, 15),
            rtime: ts(16, 17),
        };
        let b = r.to_bytes();
        assert_eq!(b.len(), RootItem::SIZE);
        assert!(b[375..].iter().all(|&x| x == 0));
        assert_eq!(RootItem::parse(&b).unwrap(), r);
        // The legacy short form parses with the v2 fields zero.
        let short = RootItem::parse(&b[..RootItem::SIZE_V1]).unwrap();
        assert_eq!(short.generation_v2, 0);
        assert_eq!(short.bytenr, r.bytenr);
    }

    // Test scenario: dir items, inode refs, extrefs and root refs round-trip, including
    // several entries packed in one item.
    #[test]
    fn name_items_roundtrip() {
        let d1 = DirItem {
            location: Key::new(257, item_key_type::INODE_ITEM, 0),
            transid: 5,
            file_type: ft::REG_FILE,
            name: b"file".to_vec(),
            data: Vec::new(),
        };
        let d2 = DirItem {
            location: Key::new(0, 0, 0),
            transid: 6,
            file_type: ft::XATTR,
            name: b"user.x".to_vec(),
            data: b"value".to_vec(),
        };
        let mut b = d1.to_bytes();
        d2.encode_into(&mut b);
        assert_eq!(DirItem::parse_all(&b).unwrap(), vec![d1, d2]);

        let r1 = InodeRef {
            index: 2,
            name: b"a".to_vec(),
        };
        let r2 = InodeRef {
            index: 3,
            name: b"longer name".to_vec(),
        };
        let mut b = r1.to_bytes();
        r2.encode_into(&mut b);
        assert_eq!(InodeRef::parse_all(&b).unwrap(), vec![r1, r2]);

        let e = InodeExtref {
            parent: 300,
            index: 9,
            name: b"x".to_vec(),
        };
        assert_eq!(InodeExtref::parse_all(&e.to_bytes()).unwrap(), vec![e]);

        let rr = RootRef {
            dirid: 256,
            sequence: 2,
            name: b"subvol".to_vec(),
        };
        assert_eq!(RootRef::parse(&rr.to_bytes()).unwrap(), rr);
    }

    // Test scenario: regular and inline file extent items round-trip.
    #[test]
    fn file_extent_roundtrip() {
        let reg = FileExtentItem {
            generation: 3,
            ram_bytes: 8192,
            compression: 3,
            encryption: 0,
            other_encoding: 0,
            extent_type: FILE_EXTENT_REG,
            disk_bytenr: 13_631_488,
            disk_num_bytes: 4096,
            offset: 0,
            num_bytes: 8192,
            inline_data: Vec::new(),
        };
        assert_eq!(FileExtentItem::parse(&reg.to_bytes()).unwrap(), reg);
        let inl = FileExtentItem {
            extent_type: FILE_EXTENT_INLINE,
            disk_bytenr: 0,
            disk_num_bytes: 0,
            num_bytes: 0,
            ram_bytes: 5,
            compression: 0,
            inline_data: b"hello".to_vec(),
            ..reg
        };
        assert_eq!(FileExtentItem::parse(&inl.to_bytes()).unwrap(), inl);
    }

    // Test scenario: chunk (DUP, two stripes), dev item, block group, dev extent and free
    // space info round-trip; the chunk's size matches size_for.
    #[test]
    fn volume_items_roundtrip() {
        let c = ChunkItem {
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
                    offset: 22 << 20,
                    dev_uuid: [9; 16],
                },
                Stripe {
                    devid: 1,
                    offset: 30 << 20,
                    dev_uuid: [9; 16],
                },
            ],
        };
        let b = c.to_bytes();
        assert_eq!(b.len(), ChunkItem::size_for(2));
        assert_eq!(ChunkItem::parse(&b).unwrap(), c);

        let d = DevItem {
            devid: 1,
            total_bytes: 1 << 30,
            bytes_used: 1 << 20,
            io_align: 4096,
            io_width: 4096,
            sector_size: 4096,
            dev_type: 0,
            generation: 0,
            start_offset: 0,
            dev_group: 0,
            seek_speed: 0,
            bandwidth: 0,
            uuid: [4; 16],
            fsid: [5; 16],
        };
        let b = d.to_bytes();
        assert_eq!(b.len(), DevItem::SIZE);
        assert_eq!(DevItem::parse(&b).unwrap(), d);

        let bg = BlockGroupItem {
            used: 16384,
            chunk_objectid: 256,
            flags: bg_flags::METADATA | bg_flags::DUP,
        };
        assert_eq!(BlockGroupItem::parse(&bg.to_bytes()).unwrap(), bg);

        let de = DevExtent {
            chunk_tree: 3,
            chunk_objectid: 256,
            chunk_offset: 22 << 20,
            length: 8 << 20,
            chunk_tree_uuid: [6; 16],
        };
        let b = de.to_bytes();
        assert_eq!(b.len(), DevExtent::SIZE);
        assert_eq!(DevExtent::parse(&b).unwrap(), de);
        assert!(DevExtent::parse(&b[..47]).is_err());

        let fsi = FreeSpaceInfo {
            extent_count: 3,
            flags: FREE_SPACE_USING_BITMAPS,
        };
        assert_eq!(FreeSpaceInfo::parse(&fsi.to_bytes()).unwrap(), fsi);
    }

    // Test scenario: the uuid tree key of a subvolume uuid matches what dump-tree prints for
    // an mkfs.btrfs image (uuid af51ea75-37d1-4ec2-9fe4-9ebdca834b64 ->
    // key (0xc24ed13775ea51af UUID_KEY_SUBVOL 0x644b83cabd9ee49f)), and the body round-trips.
    #[test]
    fn uuid_items() {
        let u = [
            0xaf, 0x51, 0xea, 0x75, 0x37, 0xd1, 0x4e, 0xc2, 0x9f, 0xe4, 0x9e, 0xbd, 0xca, 0x83,
            0x4b, 0x64,
        ];
        let k = uuid_key(&u, item_key_type::UUID_SUBVOL);
        assert_eq!(k.objectid, 0xc24e_d137_75ea_51af);
        assert_eq!(k.offset, 0x644b_83ca_bd9e_e49f);
        assert_eq!(
            uuid_item_parse(&uuid_item_to_bytes(&[5, 260])).unwrap(),
            vec![5, 260]
        );
        assert!(uuid_item_parse(&[0u8; 7]).is_err());
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
