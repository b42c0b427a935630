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

// ---------------------------------------------------------------------------------------------
// The write side (`btrfs_setxattr`, `btrfs_setxattr_trans`): an XATTR_ITEM keyed by the name
// hash holds one entry per name (several when names collide), in DIR_ITEM layout with a zero
// location key, file type FT_XATTR, the transid of the change, and the value as data. Setting
// or removing an attribute updates the inode's ctime, transid and sequence.
// ---------------------------------------------------------------------------------------------

/// `XATTR_CREATE`: fail with EEXIST if the attribute exists.
pub const XATTR_CREATE: u32 = 1;
/// `XATTR_REPLACE`: fail with ENODATA unless the attribute exists.
pub const XATTR_REPLACE: u32 = 2;
/// `XATTR_NAME_MAX`.
pub const XATTR_NAME_MAX: usize = 255;
/// `XATTR_SIZE_MAX`: the VFS refuses larger values.
pub const XATTR_SIZE_MAX: usize = 65536;

/// The name spaces the kernel's btrfs xattr handlers accept (ACLs are stored as raw values).
/// `btrfs.` properties need property handling (inode flags) and are refused for now.
fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    let ok = [
        &b"user."[..],
        b"trusted.",
        b"security.",
        b"system.posix_acl_access",
        b"system.posix_acl_default",
    ]
    .iter()
    .any(|p| {
        if p.ends_with(b".") {
            name.len() > p.len() && name.starts_with(p)
        } else {
            name == *p
        }
    });
    if !ok {
        return Err(FsError::Unsupported(format!(
            "xattr name space of {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

/// `BTRFS_MAX_XATTR_SIZE`: name plus value must fit one leaf item with its dir item header.
pub fn max_xattr_size(fs: &FsInfo) -> usize {
    crate::inode::max_item_size(fs) - DirItem::HEADER_SIZE
}

/// `btrfs_setxattr_trans` with a value: create or replace the attribute `name` of `ino`.
/// `XATTR_CREATE` → EEXIST if it exists, `XATTR_REPLACE` → ENODATA if it does not. Values the
/// VFS refuses give E2BIG; a name and value that do not fit a leaf item give ENOSPC, as in the
/// kernel (also when the collision item they would join grows too large).
pub fn btrfs_setxattr(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    name: &[u8],
    value: &[u8],
    flags: u32,
) -> Result<()> {
    if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
        return Err(FsError::Invalid(format!("xattr flags {flags:#x}")));
    }
    check_xattr_name(name)?;
    if value.len() > XATTR_SIZE_MAX {
        return Err(FsError::TooBig);
    }
    if name.len() + value.len() > max_xattr_size(fs) {
        return Err(FsError::NoSpace);
    }
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        set_item_in(c, root, ino, name, value, flags)?;
        crate::inode::fold_dirty_mtime(c, root, ino, &mut ii);
        ii.ctime = crate::disk_io::now_timespec();
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })
}

/// The item side of a setxattr inside a running write operation: insert or replace the entry
/// `name` of `ino` (XATTR_CREATE / XATTR_REPLACE as in [`btrfs_setxattr`]); the caller updates
/// the inode item.
pub(crate) fn set_item_in(
    c: &mut crate::transaction::WriteCtx<'_>,
    root: u64,
    ino: u64,
    name: &[u8],
    value: &[u8],
    flags: u32,
) -> Result<()> {
    let key = Key::new(ino, item::XATTR_ITEM, name_hash(name));
    let entry = DirItem {
        location: Key::new(0, 0, 0),
        transid: c.transid(),
        file_type: ubtrfs_format::items::ft::XATTR,
        name: name.to_vec(),
        data: value.to_vec(),
    };
    let existing = match c.lookup(root, &key)? {
        Some(d) => Some(
            DirItem::parse_all(&d)
                .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?,
        ),
        None => None,
    };
    let found = existing
        .as_ref()
        .is_some_and(|v| v.iter().any(|d| d.name == name));
    if flags & XATTR_REPLACE != 0 && !found {
        return Err(FsError::NoXattr);
    }
    if flags & XATTR_CREATE != 0 && found {
        return Err(FsError::Exists);
    }
    match existing {
        None => c.insert(root, key, &entry.to_bytes())?,
        Some(items) => {
            // The other entries keep their order; the new value goes at the end.
            let mut out = Vec::new();
            for d in items.iter().filter(|d| d.name != name) {
                d.encode_into(&mut out);
            }
            entry.encode_into(&mut out);
            if out.len() > crate::inode::max_item_size(c.fs) {
                return Err(FsError::NoSpace);
            }
            c.update(root, &key, &out)?;
        }
    }
    Ok(())
}

/// `btrfs_setxattr_trans` without a value (removexattr, which the VFS issues with
/// `XATTR_REPLACE`): ENODATA if the attribute does not exist.
pub fn btrfs_removexattr(fs: &FsInfo, root: u64, ino: u64, name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        let key = Key::new(ino, item::XATTR_ITEM, name_hash(name));
        if !crate::inode::delete_one_dir_name(c, root, &key, name)? {
            return Err(FsError::NoXattr);
        }
        crate::inode::fold_dirty_mtime(c, root, ino, &mut ii);
        ii.ctime = crate::disk_io::now_timespec();
        ii.transid = c.transid();
        ii.sequence += 1;
        c.write_inode(root, ino, &ii)
    })
}
