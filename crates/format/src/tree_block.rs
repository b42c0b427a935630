//! Tree blocks: the header shared by leaves and nodes, item and key-pointer tables.
//!
//! A [`TreeBlock`] owns the raw bytes of one block (nodesize bytes). Accessors are bounds
//! checked; [`TreeBlock::check_structure`] performs the structural part of the kernel's
//! tree-checker (`btrfs_check_leaf` / `btrfs_check_node`): item table inside the block, item data
//! packed from the end with no gap and no overlap, strictly ascending keys, sane pointer counts.
//! Per-item-type content checks live with the readers of those items.

use crate::bytes::{array_at, put_u32, put_u64, slice, u32_at, u64_at, u8_at};
use crate::csum::{CsumType, CSUM_FIELD_SIZE};
use crate::error::{CorruptKind, Result};
use crate::key::Key;

pub const HEADER_SIZE: usize = 101;
pub const ITEM_SIZE: usize = 25;
pub const KEY_PTR_SIZE: usize = 33;
pub const MAX_LEVEL: u8 = 8;

/// Header flag bits.
pub const HEADER_FLAG_WRITTEN: u64 = 1 << 0;
pub const HEADER_FLAG_RELOC: u64 = 1 << 1;
/// Backref revision lives in the top byte of `flags`.
pub const BACKREF_REV_SHIFT: u32 = 56;
pub const MIXED_BACKREF_REV: u64 = 1;

/// `struct btrfs_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub csum: [u8; CSUM_FIELD_SIZE],
    pub fsid: [u8; 16],
    pub bytenr: u64,
    pub flags: u64,
    pub chunk_tree_uuid: [u8; 16],
    pub generation: u64,
    pub owner: u64,
    pub nritems: u32,
    pub level: u8,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Self> {
        Ok(Header {
            csum: array_at(b, 0, "header csum")?,
            fsid: array_at(b, 32, "header fsid")?,
            bytenr: u64_at(b, 48, "header bytenr")?,
            flags: u64_at(b, 56, "header flags")?,
            chunk_tree_uuid: array_at(b, 64, "header chunk_tree_uuid")?,
            generation: u64_at(b, 80, "header generation")?,
            owner: u64_at(b, 88, "header owner")?,
            nritems: u32_at(b, 96, "header nritems")?,
            level: u8_at(b, 100, "header level")?,
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        use crate::bytes::{put_u32, put_u64};
        b[..32].copy_from_slice(&self.csum);
        b[32..48].copy_from_slice(&self.fsid);
        put_u64(b, 48, self.bytenr);
        put_u64(b, 56, self.flags);
        b[64..80].copy_from_slice(&self.chunk_tree_uuid);
        put_u64(b, 80, self.generation);
        put_u64(b, 88, self.owner);
        put_u32(b, 96, self.nritems);
        b[100] = self.level;
    }
}

/// Bytes available for the item table and item data of a leaf (`BTRFS_LEAF_DATA_SIZE`).
pub fn leaf_data_size(nodesize: usize) -> usize {
    nodesize.saturating_sub(HEADER_SIZE)
}

/// Leaf bytes taken by items with these body sizes (table entries plus data).
pub fn leaf_space_needed(body_sizes: impl IntoIterator<Item = usize>) -> usize {
    body_sizes.into_iter().map(|n| ITEM_SIZE + n).sum()
}

/// The `flags` word every writer puts in a header: WRITTEN, backref revision MIXED.
pub const fn header_flags_written_mixed() -> u64 {
    HEADER_FLAG_WRITTEN | (MIXED_BACKREF_REV << BACKREF_REV_SHIFT)
}

/// One entry of a leaf's item table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemHeader {
    pub key: Key,
    /// Offset of the data relative to the end of the header.
    pub offset: u32,
    pub size: u32,
}

/// One entry of a node's pointer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPtr {
    pub key: Key,
    pub blockptr: u64,
    pub generation: u64,
}

/// The bytes of one tree block with its parsed header.
#[derive(Clone, Debug)]
pub struct TreeBlock {
    pub header: Header,
    pub data: Vec<u8>,
}

impl TreeBlock {
    /// Wrap raw block bytes. Parses the header only.
    pub fn new(data: Vec<u8>) -> Result<Self> {
        let header = Header::parse(&data)?;
        Ok(TreeBlock { header, data })
    }

    pub fn level(&self) -> u8 {
        self.header.level
    }
    pub fn is_leaf(&self) -> bool {
        self.header.level == 0
    }
    pub fn nritems(&self) -> usize {
        self.header.nritems as usize
    }

    /// Verify the checksum over bytes 32..end.
    pub fn verify_csum(&self, t: CsumType) -> bool {
        self.data.len() > CSUM_FIELD_SIZE
            && t.verify(&self.data[CSUM_FIELD_SIZE..], &self.header.csum)
    }

    /// Recompute and store the checksum (writers).
    pub fn update_csum(&mut self, t: CsumType) {
        let c = t.compute(&self.data[CSUM_FIELD_SIZE..]);
        self.data[..CSUM_FIELD_SIZE].copy_from_slice(&c);
        self.header.csum = c;
    }

    /// Size of the leaf data area (`BTRFS_LEAF_DATA_SIZE`).
    pub fn leaf_data_size(&self) -> usize {
        self.data.len().saturating_sub(HEADER_SIZE)
    }

    /// Maximum key pointers of a node of this size (`BTRFS_NODEPTRS_PER_BLOCK`).
    pub fn max_node_ptrs(&self) -> usize {
        self.leaf_data_size() / KEY_PTR_SIZE
    }

    pub fn item(&self, slot: usize) -> Result<ItemHeader> {
        if slot >= self.nritems() {
            return Err(CorruptKind::ItemLayout { slot }.into());
        }
        let off = HEADER_SIZE
            + slot
                .checked_mul(ITEM_SIZE)
                .ok_or(CorruptKind::ItemLayout { slot })?;
        Ok(ItemHeader {
            key: Key::parse(&self.data, off)?,
            offset: u32_at(&self.data, off + 17, "item offset")?,
            size: u32_at(&self.data, off + 21, "item size")?,
        })
    }

    pub fn item_key(&self, slot: usize) -> Result<Key> {
        Ok(self.item(slot)?.key)
    }

    /// The data bytes of item `slot`.
    pub fn item_data(&self, slot: usize) -> Result<&[u8]> {
        let it = self.item(slot)?;
        slice(
            &self.data,
            HEADER_SIZE + it.offset as usize,
            it.size as usize,
            "item data",
        )
    }

    pub fn key_ptr(&self, slot: usize) -> Result<KeyPtr> {
        if slot >= self.nritems() {
            return Err(CorruptKind::ItemLayout { slot }.into());
        }
        let off = HEADER_SIZE
            + slot
                .checked_mul(KEY_PTR_SIZE)
                .ok_or(CorruptKind::ItemLayout { slot })?;
        Ok(KeyPtr {
            key: Key::parse(&self.data, off)?,
            blockptr: u64_at(&self.data, off + 17, "key ptr blockptr")?,
            generation: u64_at(&self.data, off + 25, "key ptr generation")?,
        })
    }

    /// First key of the block (leaf item 0 or node pointer 0).
    pub fn first_key(&self) -> Result<Option<Key>> {
        if self.nritems() == 0 {
            return Ok(None);
        }
        Ok(Some(if self.is_leaf() {
            self.item_key(0)?
        } else {
            self.key_ptr(0)?.key
        }))
    }

    /// Key at `slot` for either kind of block.
    pub fn key_at(&self, slot: usize) -> Result<Key> {
        if self.is_leaf() {
            self.item_key(slot)
        } else {
            Ok(self.key_ptr(slot)?.key)
        }
    }

    /// Build a leaf (`btrfs_insert_empty_items` layout): the item table after the header and
    /// the item data packed from the end of the block downward, slot 0 last, with no gaps.
    /// `header.nritems` and `header.level` are set from the arguments; the checksum is left
    /// zero for [`TreeBlock::update_csum`]. Keys must be strictly ascending. An item set that
    /// does not fit is an error naming the space needed and available.
    pub fn new_leaf(nodesize: usize, header: Header, items: &[(Key, Vec<u8>)]) -> Result<Self> {
        let data_size = leaf_data_size(nodesize);
        let needed = leaf_space_needed(items.iter().map(|(_, d)| d.len()));
        if needed > data_size {
            return Err(CorruptKind::OutOfBounds {
                what: "leaf items",
                offset: 0,
                len: needed,
                available: data_size,
            }
            .into());
        }
        let mut data = vec![0u8; nodesize];
        let mut end = data_size;
        for (slot, (key, body)) in items.iter().enumerate() {
            let off = HEADER_SIZE + slot * ITEM_SIZE;
            end -= body.len();
            key.encode(&mut data, off);
            put_u32(&mut data, off + 17, end as u32);
            put_u32(&mut data, off + 21, body.len() as u32);
            data[HEADER_SIZE + end..HEADER_SIZE + end + body.len()].copy_from_slice(body);
        }
        let mut header = header;
        header.nritems = items.len() as u32;
        header.level = 0;
        header.encode(&mut data);
        let block = TreeBlock { header, data };
        block.check_structure()?;
        Ok(block)
    }

    /// Build a node of `level` (>= 1) from its key pointers. As for [`TreeBlock::new_leaf`],
    /// nritems and level are set here and the checksum is left for the caller.
    pub fn new_node(nodesize: usize, header: Header, level: u8, ptrs: &[KeyPtr]) -> Result<Self> {
        let max = leaf_data_size(nodesize) / KEY_PTR_SIZE;
        if level == 0 || ptrs.is_empty() || ptrs.len() > max {
            return Err(CorruptKind::BadField {
                what: "node pointer count",
                value: ptrs.len() as u64,
            }
            .into());
        }
        let mut data = vec![0u8; nodesize];
        for (slot, p) in ptrs.iter().enumerate() {
            let off = HEADER_SIZE + slot * KEY_PTR_SIZE;
            p.key.encode(&mut data, off);
            put_u64(&mut data, off + 17, p.blockptr);
            put_u64(&mut data, off + 25, p.generation);
        }
        let mut header = header;
        header.nritems = ptrs.len() as u32;
        header.level = level;
        header.encode(&mut data);
        let block = TreeBlock { header, data };
        block.check_structure()?;
        Ok(block)
    }

    /// Structural checks of the kernel's tree-checker, valid for any owner.
    pub fn check_structure(&self) -> Result<()> {
        let h = &self.header;
        if h.level >= MAX_LEVEL {
            return Err(CorruptKind::BadField {
                what: "level",
                value: h.level.into(),
            }
            .into());
        }
        let n = self.nritems();
        if self.is_leaf() {
            let data_size = self.leaf_data_size();
            if n.checked_mul(ITEM_SIZE).is_none_or(|t| t > data_size) {
                return Err(CorruptKind::BadField {
                    what: "leaf nritems",
                    value: n as u64,
                }
                .into());
            }
            let mut prev_key: Option<Key> = None;
            let mut expected_end = data_size as u64;
            for slot in 0..n {
                let it = self.item(slot)?;
                if let Some(p) = prev_key {
                    if p >= it.key {
                        return Err(CorruptKind::KeyOrder { slot }.into());
                    }
                }
                prev_key = Some(it.key);
                let end = u64::from(it.offset) + u64::from(it.size);
                if end != expected_end {
                    return Err(CorruptKind::ItemLayout { slot }.into());
                }
                // Item data must not overlap the item table.
                let table_end = ((slot + 1) * ITEM_SIZE) as u64;
                if u64::from(it.offset) < table_end.max((n * ITEM_SIZE) as u64) {
                    return Err(CorruptKind::ItemLayout { slot }.into());
                }
                expected_end = u64::from(it.offset);
            }
        } else {
            if n == 0 || n > self.max_node_ptrs() {
                return Err(CorruptKind::BadField {
                    what: "node nritems",
                    value: n as u64,
                }
                .into());
            }
            let mut prev_key: Option<Key> = None;
            for slot in 0..n {
                let p = self.key_ptr(slot)?;
                if let Some(pk) = prev_key {
                    if pk >= p.key {
                        return Err(CorruptKind::KeyOrder { slot }.into());
                    }
                }
                prev_key = Some(p.key);
                if p.blockptr == 0 || p.blockptr % 4096 != 0 {
                    return Err(CorruptKind::BadField {
                        what: "node blockptr",
                        value: p.blockptr,
                    }
                    .into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_with(items: &[(Key, &[u8])], nodesize: usize) -> TreeBlock {
        let mut d = vec![0u8; nodesize];
        let mut end = nodesize - HEADER_SIZE;
        for (i, (k, v)) in items.iter().enumerate() {
            let off = HEADER_SIZE + i * ITEM_SIZE;
            k.encode(&mut d, off);
            end -= v.len();
            put_u32(&mut d, off + 17, end as u32);
            put_u32(&mut d, off + 21, v.len() as u32);
            d[HEADER_SIZE + end..HEADER_SIZE + end + v.len()].copy_from_slice(v);
        }
        put_u32(&mut d, 96, items.len() as u32);
        put_u64(&mut d, 48, 4096);
        TreeBlock::new(d).unwrap()
    }

    fn header(owner: u64) -> Header {
        Header {
            csum: [0; CSUM_FIELD_SIZE],
            fsid: [7; 16],
            bytenr: 1 << 20,
            flags: header_flags_written_mixed(),
            chunk_tree_uuid: [8; 16],
            generation: 1,
            owner,
            nritems: 0,
            level: 0,
        }
    }

    // Test scenario: the builder packs item data from the end exactly like the kernel (slot 0
    // ends at the leaf data size, each next item ends where the previous began), and the
    // result parses back with the same keys, bodies and header; the checksum verifies after
    // update_csum for every csum type.
    #[test]
    fn new_leaf_layout_and_roundtrip() {
        let items = vec![
            (Key::new(256, 1, 0), vec![1u8; 160]),
            (Key::new(256, 12, 256), vec![2u8; 12]),
            (Key::new(257, 1, 0), Vec::new()),
        ];
        for t in [
            CsumType::Crc32c,
            CsumType::Xxhash64,
            CsumType::Sha256,
            CsumType::Blake2b,
        ] {
            let mut leaf = TreeBlock::new_leaf(4096, header(5), &items).unwrap();
            leaf.update_csum(t);
            let parsed = TreeBlock::new(leaf.data.clone()).unwrap();
            assert!(parsed.verify_csum(t));
            assert_eq!(parsed.header, leaf.header);
            assert_eq!(parsed.nritems(), 3);
            assert_eq!(parsed.header.flags >> BACKREF_REV_SHIFT, MIXED_BACKREF_REV);
            parsed.check_structure().unwrap();
            let ds = leaf_data_size(4096) as u32;
            assert_eq!(parsed.item(0).unwrap().offset, ds - 160);
            assert_eq!(parsed.item(1).unwrap().offset, ds - 172);
            assert_eq!(parsed.item(2).unwrap().offset, ds - 172);
            for (slot, (k, d)) in items.iter().enumerate() {
                assert_eq!(parsed.item_key(slot).unwrap(), *k);
                assert_eq!(parsed.item_data(slot).unwrap(), &d[..]);
            }
        }
        // An empty leaf is valid (csum tree of a new filesystem).
        let empty = TreeBlock::new_leaf(16384, header(7), &[]).unwrap();
        assert_eq!(empty.nritems(), 0);
    }

    // Test scenario: too many bytes for the leaf and keys out of order are refused.
    #[test]
    fn new_leaf_refuses_bad_input() {
        let big = vec![(Key::new(1, 1, 0), vec![0u8; 4096])];
        assert!(TreeBlock::new_leaf(4096, header(1), &big).is_err());
        let exact = vec![(
            Key::new(1, 1, 0),
            vec![0u8; leaf_data_size(4096) - ITEM_SIZE],
        )];
        assert!(TreeBlock::new_leaf(4096, header(1), &exact).is_ok());
        let unordered = vec![(Key::new(2, 1, 0), vec![]), (Key::new(1, 1, 0), vec![])];
        assert!(TreeBlock::new_leaf(4096, header(1), &unordered).is_err());
    }

    // Test scenario: a node round-trips its key pointers and level; zero pointers, level 0 and
    // unaligned block pointers are refused.
    #[test]
    fn new_node_roundtrip() {
        let ptrs = vec![
            KeyPtr {
                key: Key::new(1, 132, 0),
                blockptr: 1 << 20,
                generation: 3,
            },
            KeyPtr {
                key: Key::new(7, 132, 0),
                blockptr: 2 << 20,
                generation: 4,
            },
        ];
        let node = TreeBlock::new_node(4096, header(1), 1, &ptrs).unwrap();
        let parsed = TreeBlock::new(node.data.clone()).unwrap();
        assert_eq!(parsed.level(), 1);
        assert_eq!(parsed.key_ptr(0).unwrap(), ptrs[0]);
        assert_eq!(parsed.key_ptr(1).unwrap(), ptrs[1]);
        assert_eq!(parsed.first_key().unwrap(), Some(ptrs[0].key));
        assert!(TreeBlock::new_node(4096, header(1), 1, &[]).is_err());
        assert!(TreeBlock::new_node(4096, header(1), 0, &ptrs).is_err());
        let mut bad = ptrs.clone();
        bad[1].blockptr = 12345;
        assert!(TreeBlock::new_node(4096, header(1), 1, &bad).is_err());
    }

    // Test scenario: a well-formed leaf passes; swapped keys and overlapping data are refused.
    #[test]
    fn leaf_structure() {
        let a = Key::new(256, 1, 0);
        let b = Key::new(256, 12, 256);
        let leaf = leaf_with(&[(a, b"aaaa"), (b, b"bb")], 4096);
        leaf.check_structure().unwrap();
        assert_eq!(leaf.item_data(1).unwrap(), b"bb");
        let bad = leaf_with(&[(b, b"aaaa"), (a, b"bb")], 4096);
        assert!(bad.check_structure().is_err());
        let mut overlap = leaf.clone();
        put_u32(&mut overlap.data, HEADER_SIZE + ITEM_SIZE + 17, 0);
        overlap = TreeBlock::new(overlap.data).unwrap();
        assert!(overlap.check_structure().is_err());
        assert!(leaf.item_data(5).is_err());
    }
}
