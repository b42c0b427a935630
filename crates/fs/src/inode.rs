//! Inode items (the read side of the kernel's inode.c `btrfs_read_locked_inode`).

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_ctree::ctree::lookup_item;
use ubtrfs_format::items::{InodeExtref, InodeItem, InodeRef};
use ubtrfs_format::key::{item, Key};

/// `BTRFS_EMPTY_SUBVOL_DIR_OBJECTID`: the inode number of the empty directory the kernel shows
/// where a snapshot contains the entry of a nested subvolume that the snapshot does not own.
pub const EMPTY_SUBVOL_DIR_OBJECTID: u64 = 2;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;

/// Read the INODE_ITEM of `ino` in subvolume `root`.
pub fn read_inode(fs: &FsInfo, root: u64, ino: u64) -> Result<InodeItem> {
    if ino == EMPTY_SUBVOL_DIR_OBJECTID {
        return Ok(empty_subvol_dir(fs));
    }
    let r = fs.root(root)?;
    let data = lookup_item(&fs.reader, &r.ptr, &Key::new(ino, item::INODE_ITEM, 0))?
        .ok_or(FsError::NotFound)?;
    let ii = InodeItem::parse(&data)
        .map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: inode item: {e}")))?;
    Ok(ii)
}

/// The kernel's `new_fake_inode`: an empty, read-only-looking directory.
/// Its times are the mount time (the kernel uses the time the inode is made).
fn empty_subvol_dir(fs: &FsInfo) -> InodeItem {
    let t = fs.mount_time;
    InodeItem {
        generation: 0,
        nlink: 1,
        mode: S_IFDIR | 0o755,
        atime: t,
        ctime: t,
        mtime: t,
        otime: t,
        ..Default::default()
    }
}

/// The names of an inode: (parent dir, index, name) from INODE_REF and INODE_EXTREF items.
pub fn inode_refs(fs: &FsInfo, root: u64, ino: u64) -> Result<Vec<(u64, u64, Vec<u8>)>> {
    let r = fs.root(root)?;
    let mut out = Vec::new();
    for it in ubtrfs_ctree::TreeIter::new(&fs.reader, r.ptr, Key::new(ino, item::INODE_REF, 0)) {
        let (key, block, slot) = it?;
        if key.objectid != ino || key.item_type > item::INODE_EXTREF {
            break;
        }
        let data = block
            .item_data(slot)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        if key.item_type == item::INODE_REF {
            for r in InodeRef::parse_all(data)
                .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?
            {
                out.push((key.offset, r.index, r.name));
            }
        } else {
            for r in InodeExtref::parse_all(data)
                .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?
            {
                out.push((r.parent, r.index, r.name));
            }
        }
    }
    Ok(out)
}
