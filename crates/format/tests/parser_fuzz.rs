//! Property tests: every parser of ubtrfs-format returns `Ok` or `Err` on any input, never
//! panics (STYLE.md habit 2: disk data is untrusted).
//!
//! Two kinds of input: arbitrary bytes, and valid structures built by hand (a superblock with a
//! system chunk, leaves holding one item of each kind the read path parses, an extent tree leaf,
//! a node) with arbitrary byte mutations and truncations applied. The second kind gets past the
//! magic and the first length checks, so the deeper parsing paths are exercised too.

use proptest::prelude::*;
use ubtrfs_format::bytes::{put_u16, put_u32, put_u64};
use ubtrfs_format::csum::{CsumType, CSUM_FIELD_SIZE};
use ubtrfs_format::extent_items::{
    shared_data_ref_parse, ExtentDataRef, ExtentItem, ExtentRecord, InlineRef, TreeBlockInfo,
};
use ubtrfs_format::items::{
    uuid_item_parse, BlockGroupItem, ChunkItem, DevExtent, DevItem, DirItem, FileExtentItem,
    FreeSpaceInfo, InodeExtref, InodeItem, InodeRef, RootItem, RootRef, Timespec,
};
use ubtrfs_format::key::{item, objectid, Key};
use ubtrfs_format::super_block::{SuperBlock, MAGIC, SUPER_INFO_OFFSET, SUPER_INFO_SIZE};
use ubtrfs_format::tree_block::{TreeBlock, HEADER_SIZE, ITEM_SIZE, KEY_PTR_SIZE};

const NODESIZE: usize = 4096;

/// Run every item parser on `b`; results are ignored, only panics matter.
fn parse_every_item(b: &[u8]) {
    let _ = Key::parse(b, 0);
    let _ = Timespec::parse(b, 0);
    let _ = InodeItem::parse(b);
    let _ = RootItem::parse(b);
    let _ = RootRef::parse(b);
    let _ = DirItem::parse_all(b);
    let _ = InodeRef::parse_all(b);
    let _ = InodeExtref::parse_all(b);
    let _ = FileExtentItem::parse(b);
    let _ = ChunkItem::parse(b);
    let _ = DevItem::parse(b);
    let _ = BlockGroupItem::parse(b);
    let _ = DevExtent::parse(b);
    let _ = FreeSpaceInfo::parse(b);
    let _ = uuid_item_parse(b);
    let _ = ExtentItem::parse(b);
    let _ = TreeBlockInfo::parse(b, 0);
    let _ = ExtentDataRef::parse(b, 0);
    let _ = shared_data_ref_parse(b);
    let _ = InlineRef::parse(b, 0);
    let _ = ExtentRecord::parse(b, item::EXTENT_ITEM);
    let _ = ExtentRecord::parse(b, item::METADATA_ITEM);
}

/// Everything a reader does with a tree block: structure check, every accessor on every slot
/// (and a few past the end), and the item parsers on every item's data.
fn exercise_block(data: Vec<u8>) {
    let Ok(b) = TreeBlock::new(data) else { return };
    let _ = b.check_structure();
    let _ = b.verify_csum(CsumType::Crc32c);
    let _ = b.first_key();
    let _ = b.max_node_ptrs();
    // nritems is on-disk data: bound the slots tried, not by nritems alone.
    let slots = b.nritems().min(NODESIZE / ITEM_SIZE + 4);
    for slot in 0..slots + 2 {
        let _ = b.key_at(slot);
        let _ = b.key_ptr(slot);
        let _ = b.item_key(slot);
        if let Ok(d) = b.item_data(slot) {
            parse_every_item(d);
        }
    }
    for slot in [usize::MAX, usize::MAX / ITEM_SIZE, u32::MAX as usize] {
        let _ = b.item(slot);
        let _ = b.key_ptr(slot);
        let _ = b.item_data(slot);
    }
}

/// Everything mount does with a superblock.
fn exercise_super(data: &[u8]) {
    let Ok(sb) = SuperBlock::parse(data) else {
        return;
    };
    let _ = sb.verify_csum();
    let _ = sb.csum_type();
    let _ = sb.metadata_fsid();
    if sb.validate().is_ok() {
        // A writer re-encodes the superblock it mounted.
        let _ = sb.to_bytes();
    }
    if let Ok(chunks) = sb.sys_chunks() {
        for (_, c) in chunks {
            let _ = ChunkItem::parse(&c);
        }
    }
}

fn chunk_bytes(length: u64, ty: u64, stripes: &[(u64, u64)]) -> Vec<u8> {
    let mut c = vec![0u8; ChunkItem::size_for(stripes.len())];
    put_u64(&mut c, 0, length);
    put_u64(&mut c, 8, objectid::EXTENT_TREE);
    put_u64(&mut c, 16, 65536);
    put_u64(&mut c, 24, ty);
    put_u32(&mut c, 32, 65536);
    put_u32(&mut c, 36, 65536);
    put_u32(&mut c, 40, 4096);
    put_u16(&mut c, 44, stripes.len() as u16);
    put_u16(&mut c, 46, 1);
    for (i, &(devid, off)) in stripes.iter().enumerate() {
        let o = ChunkItem::HEADER_SIZE + i * ChunkItem::STRIPE_SIZE;
        put_u64(&mut c, o, devid);
        put_u64(&mut c, o + 8, off);
    }
    c
}

/// A valid superblock as mkfs.btrfs writes it: one device, one DUP system chunk in
/// sys_chunk_array, crc32c checksum.
fn valid_super() -> Vec<u8> {
    let mut b = vec![0u8; SUPER_INFO_SIZE];
    b[32..48].copy_from_slice(&[7u8; 16]);
    put_u64(&mut b, 48, SUPER_INFO_OFFSET);
    b[64..72].copy_from_slice(&MAGIC);
    put_u64(&mut b, 72, 9); // generation
    put_u64(&mut b, 80, 30_425_088); // root
    put_u64(&mut b, 88, 22_036_480); // chunk_root
    put_u64(&mut b, 112, 256 << 20); // total_bytes
    put_u64(&mut b, 120, 1 << 20); // bytes_used
    put_u64(&mut b, 128, 6); // root_dir_objectid
    put_u64(&mut b, 136, 1); // num_devices
    put_u32(&mut b, 144, 4096); // sectorsize
    put_u32(&mut b, 148, NODESIZE as u32); // nodesize
    put_u32(&mut b, 156, 4096); // stripesize
    put_u64(&mut b, 164, 6); // chunk_root_generation
    put_u64(&mut b, 188, 0x341); // incompat: mixed_backref, extended_iref, skinny, no_holes
    put_u64(&mut b, 201, 1); // dev_item.devid
    put_u64(&mut b, 209, 256 << 20); // dev_item.total_bytes
    let chunk = chunk_bytes(8 << 20, 0x22, &[(1, 22_020_096), (1, 30_408_704)]);
    let key = Key::new(objectid::FIRST_CHUNK_TREE, item::CHUNK_ITEM, 22_020_096);
    let mut arr = vec![0u8; Key::SIZE];
    key.encode(&mut arr, 0);
    arr.extend_from_slice(&chunk);
    b[811..811 + arr.len()].copy_from_slice(&arr);
    put_u32(&mut b, 160, arr.len() as u32);
    SuperBlock::update_csum_in_raw(&mut b, CsumType::Crc32c);
    b
}

/// A leaf holding `items`, encoded as the unit test in tree_block.rs does it.
fn leaf_with(items: &[(Key, Vec<u8>)]) -> Vec<u8> {
    let mut d = vec![0u8; NODESIZE];
    let mut end = NODESIZE - HEADER_SIZE;
    for (i, (k, v)) in items.iter().enumerate() {
        let off = HEADER_SIZE + i * ITEM_SIZE;
        k.encode(&mut d, off);
        end -= v.len();
        put_u32(&mut d, off + 17, end as u32);
        put_u32(&mut d, off + 21, v.len() as u32);
        d[HEADER_SIZE + end..HEADER_SIZE + end + v.len()].copy_from_slice(v);
    }
    put_u64(&mut d, 48, 30_425_088);
    put_u64(&mut d, 80, 9);
    put_u64(&mut d, 88, objectid::FS_TREE);
    put_u32(&mut d, 96, items.len() as u32);
    d
}

fn dir_item(location: Key, name: &[u8], data: &[u8], ty: u8) -> Vec<u8> {
    let mut h = vec![0u8; DirItem::HEADER_SIZE];
    location.encode(&mut h, 0);
    put_u64(&mut h, 17, 9);
    put_u16(&mut h, 25, data.len() as u16);
    put_u16(&mut h, 27, name.len() as u16);
    h[29] = ty;
    h.extend_from_slice(name);
    h.extend_from_slice(data);
    h
}

/// A leaf of a subvolume tree: inode item, inode ref, extref, dir item, dir index, xattr,
/// inline and regular file extents.
fn valid_fs_leaf() -> Vec<u8> {
    let mut inode = vec![0u8; InodeItem::SIZE];
    put_u64(&mut inode, 16, 5000);
    put_u32(&mut inode, 40, 1);
    put_u32(&mut inode, 52, 0o100644);
    let mut iref = vec![0u8; 10];
    put_u64(&mut iref, 0, 2);
    put_u16(&mut iref, 8, 4);
    iref.extend_from_slice(b"file");
    let mut extref = vec![0u8; 18];
    put_u64(&mut extref, 0, 256);
    put_u64(&mut extref, 8, 3);
    put_u16(&mut extref, 16, 4);
    extref.extend_from_slice(b"link");
    let target = Key::new(258, item::INODE_ITEM, 0);
    let mut inline = vec![0u8; FileExtentItem::INLINE_HEADER_SIZE];
    put_u64(&mut inline, 8, 5);
    inline.extend_from_slice(b"hello");
    let mut reg = vec![0u8; FileExtentItem::SIZE];
    reg[20] = 1;
    put_u64(&mut reg, 8, 8192);
    put_u64(&mut reg, 21, 13 << 20);
    put_u64(&mut reg, 29, 8192);
    put_u64(&mut reg, 45, 8192);
    leaf_with(&[
        (Key::new(256, item::INODE_ITEM, 0), inode),
        (Key::new(256, item::INODE_REF, 256), iref),
        (Key::new(256, item::INODE_EXTREF, 12345), extref),
        (
            Key::new(256, item::XATTR_ITEM, 99),
            dir_item(Key::MIN, b"user.a", b"value", 8),
        ),
        (
            Key::new(256, item::DIR_ITEM, 100),
            dir_item(target, b"child", b"", 1),
        ),
        (
            Key::new(256, item::DIR_INDEX, 2),
            dir_item(target, b"child", b"", 1),
        ),
        (Key::new(258, item::EXTENT_DATA, 0), inline),
        (Key::new(259, item::EXTENT_DATA, 0), reg),
    ])
}

/// A leaf of the root and chunk trees: root item, root ref, chunk item, dev item, block group.
fn valid_root_leaf() -> Vec<u8> {
    let mut root = vec![0u8; RootItem::SIZE];
    put_u64(&mut root, 160, 9);
    put_u64(&mut root, 168, 256);
    put_u64(&mut root, 176, 30_441_472);
    put_u32(&mut root, 216, 1);
    let mut rref = vec![0u8; 18];
    put_u64(&mut rref, 0, 256);
    put_u16(&mut rref, 16, 3);
    rref.extend_from_slice(b"sub");
    let mut dev = vec![0u8; DevItem::SIZE];
    put_u64(&mut dev, 0, 1);
    put_u64(&mut dev, 8, 256 << 20);
    let mut bg = vec![0u8; BlockGroupItem::SIZE];
    put_u64(&mut bg, 0, 1 << 20);
    put_u64(&mut bg, 16, 1);
    leaf_with(&[
        (Key::new(1, item::DEV_ITEM, 1), dev),
        (Key::new(5, item::ROOT_ITEM, 0), root.clone()),
        (Key::new(5, item::ROOT_REF, 256), rref),
        (
            Key::new(256, item::ROOT_ITEM, 0),
            root[..RootItem::SIZE_V1].to_vec(),
        ),
        (
            Key::new(objectid::FIRST_CHUNK_TREE, item::CHUNK_ITEM, 22_020_096),
            chunk_bytes(8 << 20, 0x22, &[(1, 22_020_096), (1, 30_408_704)]),
        ),
        (Key::new(13 << 20, item::BLOCK_GROUP_ITEM, 8 << 20), bg),
    ])
}

/// A leaf of the extent tree: a skinny tree block ref, a non-skinny tree block extent with its
/// tree block info, and a data extent with an inline data ref and a shared data ref.
fn valid_extent_leaf() -> Vec<u8> {
    use ubtrfs_format::extent_items::extent_flags;
    let skinny = ExtentRecord::skinny_tree_block(5, 9).to_bytes();
    let fat = ExtentRecord {
        item: ExtentItem {
            refs: 1,
            generation: 9,
            flags: extent_flags::TREE_BLOCK,
        },
        tree_block_info: Some(TreeBlockInfo {
            key: Key::new(256, item::INODE_ITEM, 0),
            level: 0,
        }),
        inline_refs: vec![InlineRef::TreeBlock { root: 5 }],
    }
    .to_bytes();
    let data = ExtentRecord {
        item: ExtentItem {
            refs: 2,
            generation: 9,
            flags: extent_flags::DATA,
        },
        tree_block_info: None,
        inline_refs: vec![
            InlineRef::ExtentData(ExtentDataRef {
                root: 5,
                objectid: 259,
                offset: 0,
                count: 1,
            }),
            InlineRef::SharedData {
                parent: 30_441_472,
                count: 1,
            },
        ],
    }
    .to_bytes();
    leaf_with(&[
        (Key::new(13 << 20, item::EXTENT_ITEM, 8192), data),
        (Key::new(30_425_088, item::METADATA_ITEM, 0), skinny),
        (Key::new(30_441_472, item::EXTENT_ITEM, 4096), fat),
    ])
}

/// A level-1 node with a few key pointers.
fn valid_node() -> Vec<u8> {
    let mut d = vec![0u8; NODESIZE];
    let n = 5;
    for i in 0..n {
        let off = HEADER_SIZE + i * KEY_PTR_SIZE;
        Key::new(256 + i as u64 * 10, item::INODE_ITEM, 0).encode(&mut d, off);
        put_u64(&mut d, off + 17, 30_441_472 + i as u64 * 4096);
        put_u64(&mut d, off + 25, 9);
    }
    put_u64(&mut d, 48, 30_425_088);
    put_u64(&mut d, 80, 9);
    put_u64(&mut d, 88, objectid::FS_TREE);
    put_u32(&mut d, 96, n as u32);
    d[100] = 1;
    d
}

/// Byte mutations: (position, kind, value). Kinds: set a byte, xor a bit, write a u16/u32/u64
/// at the position (values skewed towards 0, small and all-ones).
fn mutations() -> impl Strategy<Value = Vec<(usize, u8, u64)>> {
    let value = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(u16::MAX as u64),
        0u64..64,
        any::<u64>(),
    ];
    prop::collection::vec((any::<usize>(), 0u8..5, value), 1..8)
}

fn apply(mut b: Vec<u8>, muts: &[(usize, u8, u64)], keep_csum_field: bool) -> Vec<u8> {
    let lo = if keep_csum_field { CSUM_FIELD_SIZE } else { 0 };
    if b.len() <= lo {
        return b;
    }
    for &(pos, kind, v) in muts {
        let off = lo + pos % (b.len() - lo);
        let width = match kind {
            0 => {
                b[off] = v as u8;
                continue;
            }
            1 => {
                b[off] ^= 1 << (v % 8);
                continue;
            }
            2 => 2,
            3 => 4,
            _ => 8,
        };
        let n = width.min(b.len() - off);
        b[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
    b
}

// Test scenario: the hand-built superblock, leaves and node the mutation tests start from pass
// every check, and every item of the leaves parses with its own parser (otherwise the mutation
// tests would only reach error paths).
#[test]
fn seeds_are_valid() {
    let sb = SuperBlock::parse(&valid_super()).unwrap();
    sb.verify_csum().unwrap();
    sb.validate().unwrap();
    let sys = sb.sys_chunks().unwrap();
    assert_eq!(sys.len(), 1);
    assert_eq!(ChunkItem::parse(&sys[0].1).unwrap().num_stripes, 2);
    for leaf in [valid_fs_leaf(), valid_root_leaf(), valid_extent_leaf()] {
        let b = TreeBlock::new(leaf).unwrap();
        b.check_structure().unwrap();
        for slot in 0..b.nritems() {
            let k = b.item_key(slot).unwrap();
            let d = b.item_data(slot).unwrap();
            match k.item_type {
                item::INODE_ITEM => drop(InodeItem::parse(d).unwrap()),
                item::INODE_REF => assert_eq!(InodeRef::parse_all(d).unwrap().len(), 1),
                item::INODE_EXTREF => assert_eq!(InodeExtref::parse_all(d).unwrap().len(), 1),
                item::DIR_ITEM | item::DIR_INDEX | item::XATTR_ITEM => {
                    assert_eq!(DirItem::parse_all(d).unwrap().len(), 1)
                }
                item::EXTENT_DATA => drop(FileExtentItem::parse(d).unwrap()),
                item::ROOT_ITEM => drop(RootItem::parse(d).unwrap()),
                item::ROOT_REF => drop(RootRef::parse(d).unwrap()),
                item::CHUNK_ITEM => drop(ChunkItem::parse(d).unwrap()),
                item::DEV_ITEM => drop(DevItem::parse(d).unwrap()),
                item::BLOCK_GROUP_ITEM => drop(BlockGroupItem::parse(d).unwrap()),
                item::EXTENT_ITEM | item::METADATA_ITEM => {
                    assert!(!ExtentRecord::parse(d, k.item_type)
                        .unwrap()
                        .inline_refs
                        .is_empty())
                }
                t => panic!("seed leaf has an item of type {t} the test does not parse"),
            }
        }
    }
    let n = TreeBlock::new(valid_node()).unwrap();
    n.check_structure().unwrap();
    assert_eq!(n.key_ptr(4).unwrap().blockptr, 30_441_472 + 4 * 4096);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    // Test scenario: arbitrary bytes of any length into every item parser.
    #[test]
    fn items_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..600)) {
        parse_every_item(&b);
    }

    // Test scenario: arbitrary bytes as a tree block (short, exact and long buffers).
    #[test]
    fn tree_block_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..(NODESIZE + 64))) {
        exercise_block(b);
    }

    // Test scenario: arbitrary bytes as a superblock, with the magic in place half of the time
    // so that parsing goes past the magic check.
    #[test]
    fn super_arbitrary_bytes(
        mut b in prop::collection::vec(any::<u8>(), 0..(SUPER_INFO_SIZE + 64)),
        magic in any::<bool>(),
    ) {
        if magic && b.len() >= 72 {
            b[64..72].copy_from_slice(&MAGIC);
        }
        exercise_super(&b);
    }

    // Test scenario: a valid superblock with byte mutations (checksum recomputed or not) and
    // truncation: parse, verify, validate and sys_chunks return errors, never panic.
    #[test]
    fn super_mutated(muts in mutations(), recsum in any::<bool>(), cut in 0usize..64) {
        let mut b = apply(valid_super(), &muts, true);
        if recsum {
            SuperBlock::update_csum_in_raw(&mut b, CsumType::Crc32c);
        }
        exercise_super(&b);
        b.truncate(b.len() - cut);
        exercise_super(&b);
    }

    // Test scenario: sys_chunk_array_size and the first chunk's num_stripes set to arbitrary
    // values on an otherwise valid superblock.
    #[test]
    fn super_sys_array_sizes(size in any::<u32>(), stripes in any::<u16>()) {
        let mut b = valid_super();
        put_u32(&mut b, 160, size);
        put_u16(&mut b, 811 + Key::SIZE + 44, stripes);
        SuperBlock::update_csum_in_raw(&mut b, CsumType::Crc32c);
        exercise_super(&b);
    }

    // Test scenario: valid leaves and a node with byte mutations (checksum field untouched,
    // so the structure check and item parsers see the damage) and truncation.
    #[test]
    fn tree_block_mutated(which in 0usize..4, muts in mutations(), cut in 0usize..200) {
        let seed = match which {
            0 => valid_fs_leaf(),
            1 => valid_root_leaf(),
            2 => valid_extent_leaf(),
            _ => valid_node(),
        };
        let b = apply(seed, &muts, true);
        exercise_block(b.clone());
        let keep = b.len().saturating_sub(cut);
        exercise_block(b[..keep].to_vec());
    }

    // Test scenario: every item of the valid leaves, mutated and truncated, into every parser.
    #[test]
    fn items_mutated(slot in 0usize..16, muts in mutations(), cut in 0usize..40) {
        for leaf in [valid_fs_leaf(), valid_root_leaf(), valid_extent_leaf()] {
            let b = TreeBlock::new(leaf).unwrap();
            let d = b.item_data(slot % b.nritems()).unwrap().to_vec();
            let m = apply(d, &muts, false);
            parse_every_item(&m);
            parse_every_item(&m[..m.len().saturating_sub(cut)]);
        }
    }

    // Test scenario: an item table entry of a valid leaf with arbitrary data offset and size.
    #[test]
    fn leaf_item_offsets(slot in 0usize..8, offset in any::<u32>(), size in any::<u32>()) {
        let mut d = valid_fs_leaf();
        let o = HEADER_SIZE + slot * ITEM_SIZE;
        put_u32(&mut d, o + 17, offset);
        put_u32(&mut d, o + 21, size);
        exercise_block(d);
    }

    // Test scenario: nritems and level of valid blocks set to arbitrary values.
    #[test]
    fn header_counts(which in 0usize..4, nritems in any::<u32>(), level in any::<u8>()) {
        let mut d = match which {
            0 => valid_fs_leaf(),
            1 => valid_root_leaf(),
            2 => valid_extent_leaf(),
            _ => valid_node(),
        };
        put_u32(&mut d, 96, nritems);
        d[100] = level;
        exercise_block(d);
    }
}
