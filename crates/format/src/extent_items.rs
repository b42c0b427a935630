//! Extent tree items (`btrfs_tree.h`): EXTENT_ITEM / METADATA_ITEM bodies with their inline back
//! references, and the bodies of keyed back references.
//!
//! Layouts:
//! - `struct btrfs_extent_item` (24 bytes): refs, generation, flags.
//! - EXTENT_ITEM of a tree block without skinny-metadata: the extent item, then
//!   `struct btrfs_tree_block_info` (first key, level; 18 bytes), then the inline refs.
//!   METADATA_ITEM (skinny): the level is the key offset and there is no tree_block_info.
//! - Inline ref (`struct btrfs_extent_inline_ref`): a type byte, then for TREE_BLOCK_REF,
//!   SHARED_BLOCK_REF and EXTENT_OWNER_REF an le64 (root, parent, root); for SHARED_DATA_REF the
//!   parent le64 and an le32 count; for EXTENT_DATA_REF the 28-byte `btrfs_extent_data_ref`
//!   stands where the le64 would be.
//!
//! Ordering rule of the kernel tree-checker (`check_extent_item`): inline refs sorted by type
//! ascending; within a type, by [`InlineRef::sequence`] descending. [`sort_inline_refs`] puts a
//! list in that order.

use crate::bytes::{put_u32, put_u64, u32_at, u64_at, u8_at};
use crate::csum::extent_data_ref_hash;
use crate::error::{CorruptKind, Result};
use crate::key::{item, Key};

/// Extent item flags (`BTRFS_EXTENT_FLAG_*`, `BTRFS_BLOCK_FLAG_FULL_BACKREF`).
pub mod extent_flags {
    pub const DATA: u64 = 1 << 0;
    pub const TREE_BLOCK: u64 = 1 << 1;
    pub const FULL_BACKREF: u64 = 1 << 8;
}

/// `struct btrfs_extent_item`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtentItem {
    pub refs: u64,
    pub generation: u64,
    pub flags: u64,
}

impl ExtentItem {
    pub const SIZE: usize = 24;

    pub fn parse(b: &[u8]) -> Result<Self> {
        Ok(ExtentItem {
            refs: u64_at(b, 0, "extent refs")?,
            generation: u64_at(b, 8, "extent generation")?,
            flags: u64_at(b, 16, "extent flags")?,
        })
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; Self::SIZE];
        put_u64(&mut b, 0, self.refs);
        put_u64(&mut b, 8, self.generation);
        put_u64(&mut b, 16, self.flags);
        out.extend_from_slice(&b);
    }
}

/// `struct btrfs_tree_block_info`: present in non-skinny tree block EXTENT_ITEMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeBlockInfo {
    pub key: Key,
    pub level: u8,
}

impl TreeBlockInfo {
    pub const SIZE: usize = 18;

    pub fn parse(b: &[u8], off: usize) -> Result<Self> {
        Ok(TreeBlockInfo {
            key: Key::parse(b, off)?,
            level: u8_at(b, off + Key::SIZE, "tree block info level")?,
        })
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; Self::SIZE];
        self.key.encode(&mut b, 0);
        b[Key::SIZE] = self.level;
        out.extend_from_slice(&b);
    }
}

/// `struct btrfs_extent_data_ref` (28 bytes): the body of a keyed EXTENT_DATA_REF item and
/// the payload of an inline one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtentDataRef {
    pub root: u64,
    /// Inode number.
    pub objectid: u64,
    /// File offset minus the extent offset (the file offset the extent would start at).
    pub offset: u64,
    pub count: u32,
}

impl ExtentDataRef {
    pub const SIZE: usize = 28;

    pub fn parse(b: &[u8], off: usize) -> Result<Self> {
        Ok(ExtentDataRef {
            root: u64_at(b, off, "extent data ref root")?,
            objectid: u64_at(b, off + 8, "extent data ref objectid")?,
            offset: u64_at(b, off + 16, "extent data ref offset")?,
            count: u32_at(b, off + 24, "extent data ref count")?,
        })
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; Self::SIZE];
        put_u64(&mut b, 0, self.root);
        put_u64(&mut b, 8, self.objectid);
        put_u64(&mut b, 16, self.offset);
        put_u32(&mut b, 24, self.count);
        out.extend_from_slice(&b);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        self.encode_into(&mut b);
        b
    }

    /// Key offset of the keyed form (`hash_extent_data_ref`).
    pub fn hash(&self) -> u64 {
        extent_data_ref_hash(self.root, self.objectid, self.offset)
    }
}

/// Body of a keyed SHARED_DATA_REF item (`struct btrfs_shared_data_ref`): the count.
pub fn shared_data_ref_to_bytes(count: u32) -> Vec<u8> {
    count.to_le_bytes().to_vec()
}

/// Parse the body of a keyed SHARED_DATA_REF item.
pub fn shared_data_ref_parse(b: &[u8]) -> Result<u32> {
    u32_at(b, 0, "shared data ref count")
}

/// One inline back reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InlineRef {
    /// TREE_BLOCK_REF: the block belongs to tree `root`.
    TreeBlock { root: u64 },
    /// SHARED_BLOCK_REF: the block is referenced by the tree block at `parent`.
    SharedBlock { parent: u64 },
    /// EXTENT_DATA_REF: file data referenced by (root, inode, offset), `count` times.
    ExtentData(ExtentDataRef),
    /// SHARED_DATA_REF: file data referenced from the leaf at `parent`, `count` times.
    SharedData { parent: u64, count: u32 },
    /// EXTENT_OWNER_REF (simple quotas): the subvolume that owns the extent.
    Owner { root: u64 },
}

impl InlineRef {
    /// The inline ref type byte (the keyed item type of the same kind).
    pub fn ref_type(&self) -> u8 {
        match self {
            InlineRef::TreeBlock { .. } => item::TREE_BLOCK_REF,
            InlineRef::SharedBlock { .. } => item::SHARED_BLOCK_REF,
            InlineRef::ExtentData(_) => item::EXTENT_DATA_REF,
            InlineRef::SharedData { .. } => item::SHARED_DATA_REF,
            InlineRef::Owner { .. } => item::EXTENT_OWNER_REF,
        }
    }

    /// The value the tree-checker orders refs of one type by (descending): the data ref
    /// hash for EXTENT_DATA_REF, the stored offset (root or parent) otherwise.
    pub fn sequence(&self) -> u64 {
        match self {
            InlineRef::TreeBlock { root } | InlineRef::Owner { root } => *root,
            InlineRef::SharedBlock { parent } | InlineRef::SharedData { parent, .. } => *parent,
            InlineRef::ExtentData(d) => d.hash(),
        }
    }

    /// References this inline ref accounts for (`refs` of the extent item sums them).
    pub fn count(&self) -> u64 {
        match self {
            InlineRef::TreeBlock { .. } | InlineRef::SharedBlock { .. } => 1,
            InlineRef::ExtentData(d) => u64::from(d.count),
            InlineRef::SharedData { count, .. } => u64::from(*count),
            InlineRef::Owner { .. } => 0,
        }
    }

    /// On-disk size of the inline ref (`btrfs_extent_inline_ref_size`).
    pub fn size(&self) -> usize {
        match self {
            InlineRef::TreeBlock { .. }
            | InlineRef::SharedBlock { .. }
            | InlineRef::Owner { .. } => 9,
            InlineRef::ExtentData(_) => 1 + ExtentDataRef::SIZE,
            InlineRef::SharedData { .. } => 13,
        }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.ref_type());
        match self {
            InlineRef::TreeBlock { root } | InlineRef::Owner { root } => {
                out.extend_from_slice(&root.to_le_bytes())
            }
            InlineRef::SharedBlock { parent } => out.extend_from_slice(&parent.to_le_bytes()),
            InlineRef::ExtentData(d) => d.encode_into(out),
            InlineRef::SharedData { parent, count } => {
                out.extend_from_slice(&parent.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
    }

    /// Parse the inline ref at `off`; returns it and its size.
    pub fn parse(b: &[u8], off: usize) -> Result<(Self, usize)> {
        let t = u8_at(b, off, "inline ref type")?;
        let r = match t {
            item::TREE_BLOCK_REF => InlineRef::TreeBlock {
                root: u64_at(b, off + 1, "inline tree block ref")?,
            },
            item::SHARED_BLOCK_REF => InlineRef::SharedBlock {
                parent: u64_at(b, off + 1, "inline shared block ref")?,
            },
            item::EXTENT_DATA_REF => InlineRef::ExtentData(ExtentDataRef::parse(b, off + 1)?),
            item::SHARED_DATA_REF => InlineRef::SharedData {
                parent: u64_at(b, off + 1, "inline shared data ref parent")?,
                count: u32_at(b, off + 9, "inline shared data ref count")?,
            },
            item::EXTENT_OWNER_REF => InlineRef::Owner {
                root: u64_at(b, off + 1, "inline owner ref")?,
            },
            other => {
                return Err(CorruptKind::BadField {
                    what: "inline ref type",
                    value: other.into(),
                }
                .into())
            }
        };
        let size = r.size();
        Ok((r, size))
    }
}

/// Put inline refs in the order the tree-checker requires: type ascending, then sequence
/// descending.
pub fn sort_inline_refs(refs: &mut [InlineRef]) {
    refs.sort_by(|a, b| {
        a.ref_type()
            .cmp(&b.ref_type())
            .then(b.sequence().cmp(&a.sequence()))
    });
}

/// A whole EXTENT_ITEM or METADATA_ITEM body: header, optional tree block info, inline refs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentRecord {
    pub item: ExtentItem,
    /// Present exactly for non-skinny tree block EXTENT_ITEMs.
    pub tree_block_info: Option<TreeBlockInfo>,
    pub inline_refs: Vec<InlineRef>,
}

impl ExtentRecord {
    /// The METADATA_ITEM body of a tree block owned by `root` with one inline TREE_BLOCK_REF,
    /// as the kernel writes it for a newly allocated block (key: bytenr, METADATA_ITEM, level).
    pub fn skinny_tree_block(root: u64, generation: u64) -> Self {
        ExtentRecord {
            item: ExtentItem {
                refs: 1,
                generation,
                flags: extent_flags::TREE_BLOCK,
            },
            tree_block_info: None,
            inline_refs: vec![InlineRef::TreeBlock { root }],
        }
    }

    /// Parse an item body; `key_type` is EXTENT_ITEM or METADATA_ITEM.
    pub fn parse(b: &[u8], key_type: u8) -> Result<Self> {
        let item = ExtentItem::parse(b)?;
        let mut off = ExtentItem::SIZE;
        let tree_block_info =
            if key_type == item::EXTENT_ITEM && item.flags & extent_flags::TREE_BLOCK != 0 {
                let info = TreeBlockInfo::parse(b, off)?;
                off += TreeBlockInfo::SIZE;
                Some(info)
            } else {
                None
            };
        let mut inline_refs = Vec::new();
        while off < b.len() {
            let (r, size) = InlineRef::parse(b, off)?;
            inline_refs.push(r);
            off += size;
        }
        if off != b.len() {
            return Err(CorruptKind::BadField {
                what: "extent item size",
                value: b.len() as u64,
            }
            .into());
        }
        Ok(ExtentRecord {
            item,
            tree_block_info,
            inline_refs,
        })
    }

    pub fn size(&self) -> usize {
        ExtentItem::SIZE
            + self.tree_block_info.map_or(0, |_| TreeBlockInfo::SIZE)
            + self.inline_refs.iter().map(InlineRef::size).sum::<usize>()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.size());
        self.item.encode_into(&mut b);
        if let Some(info) = &self.tree_block_info {
            info.encode_into(&mut b);
        }
        for r in &self.inline_refs {
            r.encode_into(&mut b);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: the skinny METADATA_ITEM of an mkfs tree block is 33 bytes (as dump-tree
    // shows "itemsize 33") and round-trips.
    #[test]
    fn skinny_tree_block_roundtrip() {
        let r = ExtentRecord::skinny_tree_block(2, 1);
        let b = r.to_bytes();
        assert_eq!(b.len(), 33);
        assert_eq!(b[24], item::TREE_BLOCK_REF);
        assert_eq!(ExtentRecord::parse(&b, item::METADATA_ITEM).unwrap(), r);
    }

    // Test scenario: a non-skinny tree block item with tree_block_info and a data extent with
    // every data ref kind round-trip; refs sum the inline counts.
    #[test]
    fn full_records_roundtrip() {
        let tb = ExtentRecord {
            item: ExtentItem {
                refs: 2,
                generation: 9,
                flags: extent_flags::TREE_BLOCK | extent_flags::FULL_BACKREF,
            },
            tree_block_info: Some(TreeBlockInfo {
                key: Key::new(256, item::INODE_ITEM, 0),
                level: 1,
            }),
            inline_refs: vec![
                InlineRef::TreeBlock { root: 5 },
                InlineRef::SharedBlock { parent: 1 << 20 },
            ],
        };
        let b = tb.to_bytes();
        assert_eq!(b.len(), tb.size());
        assert_eq!(ExtentRecord::parse(&b, item::EXTENT_ITEM).unwrap(), tb);

        let mut refs = vec![
            InlineRef::SharedData {
                parent: 4096,
                count: 1,
            },
            InlineRef::ExtentData(ExtentDataRef {
                root: 5,
                objectid: 257,
                offset: 0,
                count: 2,
            }),
            InlineRef::ExtentData(ExtentDataRef {
                root: 5,
                objectid: 258,
                offset: 4096,
                count: 1,
            }),
        ];
        sort_inline_refs(&mut refs);
        assert_eq!(refs[2].ref_type(), item::SHARED_DATA_REF);
        assert!(refs[0].sequence() >= refs[1].sequence());
        let data = ExtentRecord {
            item: ExtentItem {
                refs: refs.iter().map(InlineRef::count).sum(),
                generation: 4,
                flags: extent_flags::DATA,
            },
            tree_block_info: None,
            inline_refs: refs,
        };
        assert_eq!(data.item.refs, 4);
        let b = data.to_bytes();
        assert_eq!(ExtentRecord::parse(&b, item::EXTENT_ITEM).unwrap(), data);
        // A truncated ref is an error, not a panic.
        assert!(ExtentRecord::parse(&b[..b.len() - 1], item::EXTENT_ITEM).is_err());
        // An unknown inline type is refused.
        let mut bad = b.clone();
        bad[ExtentItem::SIZE] = 1;
        assert!(ExtentRecord::parse(&bad, item::EXTENT_ITEM).is_err());
    }

    // Test scenario: keyed data ref bodies round-trip and the keyed EXTENT_DATA_REF offset is
    // the kernel's hash.
    #[test]
    fn keyed_bodies() {
        let d = ExtentDataRef {
            root: 5,
            objectid: 257,
            offset: 0,
            count: 1,
        };
        assert_eq!(ExtentDataRef::parse(&d.to_bytes(), 0).unwrap(), d);
        assert_eq!(d.hash(), extent_data_ref_hash(5, 257, 0));
        assert_eq!(
            shared_data_ref_parse(&shared_data_ref_to_bytes(7)).unwrap(),
            7
        );
    }
}
