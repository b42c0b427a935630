//! The tree-checker (kernel tree-checker.c): validation of a tree block's content before use.
//!
//! Runs on every block read (and, once the write path exists, before every block write).
//! Structural rules come from [`TreeBlock::check_structure`]; this module adds the header
//! generation bound and per-item-type checks of sizes, alignment and hashes, so that readers of
//! items never meet a malformed one.

use ubtrfs_format::csum::name_hash;
use ubtrfs_format::items::{
    DirItem, FileExtentItem, InodeExtref, InodeItem, InodeRef, RootItem, FILE_EXTENT_INLINE,
};
use ubtrfs_format::key::{item, Key};
use ubtrfs_format::tree_block::TreeBlock;

/// Validate `b`. Returns a message naming the slot and the rule on failure.
pub fn check_block(b: &TreeBlock, sectorsize: u32, max_generation: u64) -> Result<(), String> {
    b.check_structure().map_err(|e| e.to_string())?;
    if b.header.generation > max_generation {
        return Err(format!(
            "block generation {} is newer than the filesystem's {}",
            b.header.generation, max_generation
        ));
    }
    if b.is_leaf() {
        for slot in 0..b.nritems() {
            let key = b.item_key(slot).map_err(|e| e.to_string())?;
            let data = b.item_data(slot).map_err(|e| e.to_string())?;
            check_item(&key, data, sectorsize)
                .map_err(|e| format!("slot {slot} key {key}: {e}"))?;
        }
    }
    Ok(())
}

fn check_item(key: &Key, data: &[u8], sectorsize: u32) -> Result<(), String> {
    let ss = u64::from(sectorsize);
    match key.item_type {
        item::INODE_ITEM if data.len() != InodeItem::SIZE => {
            return Err(format!("inode item size {}", data.len()));
        }
        item::ROOT_ITEM => {
            if data.len() != RootItem::SIZE && data.len() != RootItem::SIZE_V1 {
                return Err(format!("root item size {}", data.len()));
            }
            let r = RootItem::parse(data).map_err(|e| e.to_string())?;
            if r.level >= 8 {
                return Err(format!("root level {}", r.level));
            }
            if r.bytenr % ss != 0 {
                return Err(format!("root bytenr {} unaligned", r.bytenr));
            }
        }
        item::DIR_ITEM | item::DIR_INDEX | item::XATTR_ITEM => {
            let items = DirItem::parse_all(data).map_err(|e| e.to_string())?;
            if key.item_type == item::DIR_INDEX && items.len() != 1 {
                return Err(format!("dir index holds {} entries", items.len()));
            }
            for d in &items {
                let is_xattr = key.item_type == item::XATTR_ITEM;
                if is_xattr != (d.file_type == ubtrfs_format::items::ft::XATTR) {
                    return Err(format!(
                        "entry type {} in item type {}",
                        d.file_type, key.item_type
                    ));
                }
                if !is_xattr && !d.data.is_empty() {
                    return Err("dir entry carries data".into());
                }
                if d.name.len() > 255 && !is_xattr {
                    return Err(format!("name length {}", d.name.len()));
                }
                if key.item_type != item::DIR_INDEX && name_hash(&d.name) != key.offset {
                    return Err("name hash mismatch".into());
                }
            }
        }
        item::INODE_REF => {
            InodeRef::parse_all(data).map_err(|e| e.to_string())?;
        }
        item::INODE_EXTREF => {
            InodeExtref::parse_all(data).map_err(|e| e.to_string())?;
        }
        item::EXTENT_DATA => {
            if !key.offset.is_multiple_of(ss) {
                return Err("unaligned file offset".into());
            }
            let fe = FileExtentItem::parse(data).map_err(|e| e.to_string())?;
            if fe.compression > 3 {
                return Err(format!("compression type {}", fe.compression));
            }
            if fe.extent_type == FILE_EXTENT_INLINE {
                if key.offset != 0 {
                    return Err("inline extent not at offset 0".into());
                }
                if fe.compression == 0 && fe.inline_data.len() as u64 != fe.ram_bytes {
                    return Err(format!(
                        "inline ram_bytes {} but {} bytes of data",
                        fe.ram_bytes,
                        fe.inline_data.len()
                    ));
                }
            } else {
                for (what, v) in [
                    ("disk_bytenr", fe.disk_bytenr),
                    ("disk_num_bytes", fe.disk_num_bytes),
                    ("offset", fe.offset),
                    ("num_bytes", fe.num_bytes),
                ] {
                    if v % ss != 0 {
                        return Err(format!("{what} {v} unaligned"));
                    }
                }
                if fe.num_bytes == 0 {
                    return Err("num_bytes 0".into());
                }
                if key.offset.checked_add(fe.num_bytes).is_none() {
                    return Err("file extent end overflows".into());
                }
                if fe.disk_bytenr != 0
                    && fe
                        .offset
                        .checked_add(fe.num_bytes)
                        .is_none_or(|e| e > fe.ram_bytes.max(fe.disk_num_bytes))
                    && fe.compression == 0
                {
                    return Err("offset + num_bytes beyond the extent".into());
                }
            }
        }
        item::BLOCK_GROUP_ITEM if data.len() != ubtrfs_format::items::BlockGroupItem::SIZE => {
            return Err(format!("block group item size {}", data.len()));
        }
        item::CHUNK_ITEM => {
            ubtrfs_format::items::ChunkItem::parse(data).map_err(|e| e.to_string())?;
        }
        _ => {}
    }
    Ok(())
}
