//! Extended attributes (XATTR_ITEM, in DIR_ITEM layout keyed by name hash).

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_ctree::ctree::lookup_item;
use ubtrfs_ctree::TreeIter;
use ubtrfs_format::csum::name_hash;
use ubtrfs_format::items::DirItem;
use ubtrfs_format::key::{item, Key};

/// `btrfs_getxattr`: the value of `name`.
pub fn get(fs: &FsInfo, root: u64, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
    if ino == crate::inode::EMPTY_SUBVOL_DIR_OBJECTID {
        return Err(FsError::NoXattr);
    }
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    let key = Key::new(ino, item::XATTR_ITEM, name_hash(name));
    let data = lookup_item(&fs.reader, &r.ptr, &key)?.ok_or(FsError::NoXattr)?;
    let items = DirItem::parse_all(&data)
        .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
    items
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| d.data)
        .ok_or(FsError::NoXattr)
}

/// `btrfs_listxattr`: all names, in key (hash) order as the kernel lists them.
pub fn list(fs: &FsInfo, root: u64, ino: u64) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    if ino == crate::inode::EMPTY_SUBVOL_DIR_OBJECTID {
        return Ok(out);
    }
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    for it in TreeIter::new(&fs.reader, r.ptr, Key::new(ino, item::XATTR_ITEM, 0)) {
        let (key, block, slot) = it?;
        if key.objectid != ino || key.item_type != item::XATTR_ITEM {
            break;
        }
        let data = block
            .item_data(slot)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        for d in DirItem::parse_all(data)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?
        {
            out.push(d.name);
        }
    }
    Ok(out)
}
