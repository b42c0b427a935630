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
    let _g = fs.read_guard();
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
    let _g = fs.read_guard();
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

/// Directory entry file type of a mode (`btrfs_inode_type`).
pub fn file_type_of(mode: u32) -> u8 {
    use ubtrfs_format::items::ft;
    match mode & S_IFMT {
        0o100000 => ft::REG_FILE,
        0o040000 => ft::DIR,
        0o020000 => ft::CHRDEV,
        0o060000 => ft::BLKDEV,
        0o010000 => ft::FIFO,
        0o140000 => ft::SOCK,
        0o120000 => ft::SYMLINK,
        _ => ft::UNKNOWN,
    }
}

/// `btrfs_get_free_objectid`: the next inode number of subvolume `root`.
fn next_objectid(c: &crate::transaction::WriteCtx<'_>, root: u64) -> Result<u64> {
    use ubtrfs_format::key::objectid;
    let mut cache = c.fs.next_ino.lock();
    let next = match cache.get(&root) {
        Some(n) => *n,
        None => {
            let probe = Key::new(objectid::LAST_FREE, u8::MAX, u64::MAX);
            let highest = c
                .lookup_le(root, &probe)?
                .map(|(k, _)| k.objectid)
                .unwrap_or(0);
            highest.max(objectid::FIRST_FREE - 1) + 1
        }
    };
    if next > objectid::LAST_FREE {
        return Err(FsError::Invalid(format!(
            "subvolume {root} has no free inode numbers"
        )));
    }
    cache.insert(root, next + 1);
    Ok(next)
}

/// The next DIR_INDEX of `dir` (`btrfs_set_inode_index`): highest existing + 1, from 2.
pub(crate) fn next_dir_index(
    c: &crate::transaction::WriteCtx<'_>,
    root: u64,
    dir: u64,
) -> Result<u64> {
    let mut cache = c.fs.next_index.lock();
    let next = match cache.get(&(root, dir)) {
        Some(n) => *n,
        None => match c.lookup_le(root, &Key::new(dir, item::DIR_INDEX, u64::MAX))? {
            Some((k, _)) if k.objectid == dir && k.item_type == item::DIR_INDEX => k.offset + 1,
            _ => 2,
        },
    };
    cache.insert((root, dir), next + 1);
    Ok(next)
}

/// Check a new name the way the VFS and btrfs do.
pub fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name.contains(&b'/')
        || name.contains(&0)
        || name == b"."
        || name == b".."
    {
        return Err(FsError::Invalid("invalid name".into()));
    }
    Ok(())
}

/// `btrfs_create` / `btrfs_mknod` / `btrfs_mkdir` (without the symlink body): a new inode
/// named `name` in `dir`. Returns the inode number and item.
#[allow(clippy::too_many_arguments)]
pub fn btrfs_new_inode(
    fs: &FsInfo,
    root: u64,
    dir: u64,
    name: &[u8],
    mode: u32,
    rdev: u64,
    uid: u32,
    gid: u32,
) -> Result<(u64, InodeItem)> {
    check_name(name)?;
    fs.write_op(|c| {
        let mut dii = c.read_inode(root, dir)?;
        if dii.mode & S_IFMT != S_IFDIR {
            return Err(FsError::NotDir);
        }
        if crate::dir_item::name_exists(c, root, dir, name)? {
            return Err(FsError::Exists);
        }
        let transid = c.transid();
        let ino = next_objectid(c, root)?;
        let index = next_dir_index(c, root, dir)?;
        let now = crate::disk_io::now_timespec();
        let is_dir = mode & S_IFMT == S_IFDIR;
        let ii = InodeItem {
            generation: transid,
            transid,
            size: 0,
            nbytes: 0,
            block_group: 0,
            nlink: 1,
            uid,
            gid,
            mode,
            rdev,
            flags: 0,
            sequence: 0,
            atime: now,
            ctime: now,
            mtime: now,
            otime: now,
        };
        c.insert(root, Key::new(ino, item::INODE_ITEM, 0), &ii.to_bytes())?;
        let iref = InodeRef {
            index,
            name: name.to_vec(),
        };
        c.insert(root, Key::new(ino, item::INODE_REF, dir), &iref.to_bytes())?;
        crate::dir_item::insert_dir_item(
            c,
            root,
            dir,
            name,
            Key::new(ino, item::INODE_ITEM, 0),
            file_type_of(mode),
            index,
        )?;
        dii.size += 2 * name.len() as u64;
        dii.transid = transid;
        dii.mtime = now;
        dii.ctime = now;
        dii.sequence += 1;
        let _ = is_dir;
        c.write_inode(root, dir, &dii)?;
        Ok((ino, ii))
    })
}
