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
pub const S_IFCHR: u32 = 0o020000;

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
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".."
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
    fs.write_op(|c| new_inode_in(c, root, dir, name, mode, rdev, uid, gid))
}

/// The body of [`btrfs_new_inode`] inside a running write operation (`btrfs_create_new_inode`),
/// for callers that add more items in the same transaction (symlink).
#[allow(clippy::too_many_arguments)]
pub(crate) fn new_inode_in(
    c: &mut crate::transaction::WriteCtx<'_>,
    root: u64,
    dir: u64,
    name: &[u8],
    mode: u32,
    rdev: u64,
    uid: u32,
    gid: u32,
) -> Result<(u64, InodeItem)> {
    let mut dii = c.read_inode(root, dir)?;
    if dii.mode & S_IFMT != S_IFDIR {
        return Err(FsError::NotDir);
    }
    // A removed directory that is still open takes no new entries (IS_DEADDIR).
    if dii.nlink == 0 {
        return Err(FsError::NotFound);
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
        flags: crate::fileattr::inherited_flags(dii.flags, mode)
            | crate::fileattr::mount_data_flags(&c.fs.options, mode),
        sequence: 0,
        atime: now,
        ctime: now,
        mtime: now,
        otime: now,
    };
    c.insert(root, Key::new(ino, item::INODE_ITEM, 0), &ii.to_bytes())?;
    c.t.log.set_inode_last_trans(root, ino);
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
}

// ---------------------------------------------------------------------------------------------
// Namespace operations of the read-write mount (the kernel's inode.c `btrfs_unlink`,
// `btrfs_rmdir`, `btrfs_link`, `btrfs_symlink`, `btrfs_rename`, `btrfs_setattr`,
// `btrfs_evict_inode`, `btrfs_orphan_cleanup`; inode-item.c for the back references).
//
// # Invariants every operation keeps (what `btrfs check` verifies)
// - nlink of an inode = number of its names (INODE_REF entries + INODE_EXTREF entries); a
//   directory has nlink 1 (0 once removed).
// - Every name has a DIR_ITEM entry (possibly inside a hash-collision item), a DIR_INDEX item
//   and a back reference, all three agreeing on name, index and file type.
// - Directory i_size = 2 × the sum of its name lengths.
// - An inode with nlink 0 exists only while it is open, and then has an ORPHAN_ITEM
//   (ORPHAN_OBJECTID, ORPHAN_ITEM, ino); eviction deletes every item of the inode, drops the
//   data references of its file extents and deletes the orphan item, in one transaction.
// - Every inode item written gets transid = the running transaction and its sequence
//   (iversion) bumped, as `btrfs_update_inode` does.
// ---------------------------------------------------------------------------------------------

use crate::transaction::WriteCtx;
use ubtrfs_ctree::extent_tree::RefKind;
use ubtrfs_format::csum::{extref_hash, name_hash};
use ubtrfs_format::items::{DirItem, FileExtentItem, Timespec, FILE_EXTENT_INLINE};

/// `BTRFS_LINK_MAX`.
pub const LINK_MAX: u32 = 65535;
/// Path names are at most `PATH_MAX` bytes with their NUL: a symlink target at most 4095.
pub const PATH_MAX: usize = 4096;
/// `renameat2` flags.
pub const RENAME_NOREPLACE: u32 = 1 << 0;
pub const RENAME_EXCHANGE: u32 = 1 << 1;
pub const RENAME_WHITEOUT: u32 = 1 << 2;

/// `BTRFS_MAX_ITEM_SIZE`: the largest item body a leaf holds.
pub fn max_item_size(fs: &FsInfo) -> usize {
    fs.sb.nodesize as usize
        - ubtrfs_format::tree_block::HEADER_SIZE
        - ubtrfs_format::tree_block::ITEM_SIZE
}

/// `BTRFS_MAX_INLINE_DATA_SIZE`: the largest inline extent body.
pub fn max_inline_data_size(fs: &FsInfo) -> usize {
    max_item_size(fs) - FileExtentItem::INLINE_HEADER_SIZE
}

fn is_dir_mode(mode: u32) -> bool {
    mode & S_IFMT == S_IFDIR
}

/// `btrfs_update_inode` bookkeeping: the item changed in this transaction.
fn touch(c: &WriteCtx<'_>, ii: &mut InodeItem) {
    ii.transid = c.transid();
    ii.sequence += 1;
}

/// An operation is about to write the inode item of `ino` with a new ctime: the mtime of data
/// written but not yet written back (kept in the dirty buffer, set at write time as the
/// kernel's `file_update_time` sets the in-memory inode) moves into the item now, so that a
/// later writeback does not turn mtime and ctime back to the write's time. The dirty map and
/// buffer are only tried (never waited for) because the tree lock is held: their holders may
/// be waiting for it (see [`forget_inode`]).
pub(crate) fn fold_dirty_mtime(c: &WriteCtx<'_>, root: u64, ino: u64, ii: &mut InodeItem) {
    let dirty =
        c.fs.dirty
            .try_lock()
            .and_then(|m| m.get(&(root, ino)).cloned());
    if let Some(d) = dirty {
        if let Some(mut d) = d.try_lock() {
            if let Some(m) = d.mtime.take() {
                ii.mtime = m;
                ii.ctime = m;
            }
        }
    }
}

fn corrupt_at(root: u64, key: &Key, e: impl std::fmt::Display) -> FsError {
    FsError::corrupt(format!("root {root} {key}: {e}"))
}

/// Name lookup in the VFS sense: names longer than 255 bytes cannot exist.
fn check_lookup_name(name: &[u8]) -> Result<()> {
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::NotFound);
    }
    Ok(())
}

/// `btrfs_lookup_dir_item` in the running transaction: the entry `name` of `dir`.
pub(crate) fn lookup_dir_entry(
    c: &WriteCtx<'_>,
    root: u64,
    dir: u64,
    name: &[u8],
) -> Result<Option<DirItem>> {
    let key = Key::new(dir, item::DIR_ITEM, name_hash(name));
    let Some(data) = c.lookup(root, &key)? else {
        return Ok(None);
    };
    let items = DirItem::parse_all(&data).map_err(|e| corrupt_at(root, &key, e))?;
    Ok(items.into_iter().find(|d| d.name == name))
}

/// `btrfs_delete_one_dir_name`: remove the entry `name` from the DIR_ITEM/XATTR_ITEM at `key`
/// (the whole item when it is the only entry). False if the entry is not there.
pub(crate) fn delete_one_dir_name(
    c: &mut WriteCtx<'_>,
    root: u64,
    key: &Key,
    name: &[u8],
) -> Result<bool> {
    let Some(data) = c.lookup(root, key)? else {
        return Ok(false);
    };
    let items = DirItem::parse_all(&data).map_err(|e| corrupt_at(root, key, e))?;
    let Some(pos) = items.iter().position(|d| d.name == name) else {
        return Ok(false);
    };
    if items.len() == 1 {
        c.delete(root, key)?;
    } else {
        let mut out = Vec::with_capacity(data.len());
        for (i, d) in items.iter().enumerate() {
            if i != pos {
                d.encode_into(&mut out);
            }
        }
        c.update(root, key, &out)?;
    }
    Ok(true)
}

/// `btrfs_insert_inode_ref`: add (index, name) to the INODE_REF item of (ino, parent); when that
/// item would outgrow a leaf and the filesystem has EXTENDED_IREF, the name goes into an
/// INODE_EXTREF item instead (`btrfs_insert_inode_extref`), else EMLINK.
pub(crate) fn insert_inode_ref(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    parent: u64,
    name: &[u8],
    index: u64,
) -> Result<()> {
    let key = Key::new(ino, item::INODE_REF, parent);
    let entry = InodeRef {
        index,
        name: name.to_vec(),
    };
    let Some(data) = c.lookup(root, &key)? else {
        return c.insert(root, key, &entry.to_bytes());
    };
    let refs = InodeRef::parse_all(&data).map_err(|e| corrupt_at(root, &key, e))?;
    if refs.iter().any(|r| r.name == name) {
        return Err(FsError::Exists);
    }
    let mut grown = data;
    entry.encode_into(&mut grown);
    if grown.len() <= max_item_size(c.fs) {
        return c.update(root, &key, &grown);
    }
    if c.fs.sb.incompat_flags & ubtrfs_format::super_block::incompat::EXTENDED_IREF == 0 {
        return Err(FsError::TooManyLinks);
    }
    let xkey = Key::new(ino, item::INODE_EXTREF, extref_hash(parent, name));
    let xentry = InodeExtref {
        parent,
        index,
        name: name.to_vec(),
    };
    match c.lookup(root, &xkey)? {
        None => c.insert(root, xkey, &xentry.to_bytes()),
        Some(data) => {
            let refs = InodeExtref::parse_all(&data).map_err(|e| corrupt_at(root, &xkey, e))?;
            if refs.iter().any(|r| r.parent == parent && r.name == name) {
                return Err(FsError::Exists);
            }
            let mut grown = data;
            xentry.encode_into(&mut grown);
            if grown.len() > max_item_size(c.fs) {
                return Err(FsError::TooManyLinks);
            }
            c.update(root, &xkey, &grown)
        }
    }
}

/// `btrfs_del_inode_ref` (falling back to `btrfs_del_inode_extref`): remove the back reference
/// (parent, name) of `ino`; returns its directory index.
fn del_inode_ref(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    parent: u64,
    name: &[u8],
) -> Result<u64> {
    let key = Key::new(ino, item::INODE_REF, parent);
    if let Some(data) = c.lookup(root, &key)? {
        let refs = InodeRef::parse_all(&data).map_err(|e| corrupt_at(root, &key, e))?;
        if let Some(pos) = refs.iter().position(|r| r.name == name) {
            let index = refs[pos].index;
            if refs.len() == 1 {
                c.delete(root, &key)?;
            } else {
                let mut out = Vec::with_capacity(data.len());
                for (i, r) in refs.iter().enumerate() {
                    if i != pos {
                        r.encode_into(&mut out);
                    }
                }
                c.update(root, &key, &out)?;
            }
            return Ok(index);
        }
    }
    let xkey = Key::new(ino, item::INODE_EXTREF, extref_hash(parent, name));
    if let Some(data) = c.lookup(root, &xkey)? {
        let refs = InodeExtref::parse_all(&data).map_err(|e| corrupt_at(root, &xkey, e))?;
        if let Some(pos) = refs
            .iter()
            .position(|r| r.parent == parent && r.name == name)
        {
            let index = refs[pos].index;
            if refs.len() == 1 {
                c.delete(root, &xkey)?;
            } else {
                let mut out = Vec::with_capacity(data.len());
                for (i, r) in refs.iter().enumerate() {
                    if i != pos {
                        r.encode_into(&mut out);
                    }
                }
                c.update(root, &xkey, &out)?;
            }
            return Ok(index);
        }
    }
    Err(FsError::corrupt(format!(
        "root {root} ino {ino}: no back reference for name {:?} in dir {parent}",
        String::from_utf8_lossy(name)
    )))
}

/// `__btrfs_unlink_inode`: remove the name `name` of `ino` from `dir` (DIR_ITEM entry, back
/// reference, DIR_INDEX) and update the directory (size, times). The inode item itself is left
/// to the caller. Returns the index the name had.
fn unlink_name(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    name: &[u8],
    now: Timespec,
) -> Result<u64> {
    let dkey = Key::new(dir, item::DIR_ITEM, name_hash(name));
    if !delete_one_dir_name(c, root, &dkey, name)? {
        return Err(FsError::NotFound);
    }
    let index = del_inode_ref(c, root, ino, dir, name)?;
    let ikey = Key::new(dir, item::DIR_INDEX, index);
    match c.lookup(root, &ikey)? {
        Some(data) => {
            let d = DirItem::parse_all(&data).map_err(|e| corrupt_at(root, &ikey, e))?;
            if d.first().map(|d| d.name.as_slice()) != Some(name) {
                return Err(FsError::corrupt(format!(
                    "root {root} {ikey}: DIR_INDEX names another entry than {:?}",
                    String::from_utf8_lossy(name)
                )));
            }
            c.delete(root, &ikey)?;
        }
        None => {
            return Err(FsError::corrupt(format!(
                "root {root} dir {dir}: no DIR_INDEX {index} for {:?}",
                String::from_utf8_lossy(name)
            )))
        }
    }
    let mut dii = c.read_inode(root, dir)?;
    dii.size = dii
        .size
        .checked_sub(2 * name.len() as u64)
        .ok_or_else(|| FsError::corrupt(format!("root {root} dir {dir}: i_size underflow")))?;
    dii.mtime = now;
    dii.ctime = now;
    touch(c, &mut dii);
    c.write_inode(root, dir, &dii)?;
    Ok(index)
}

/// `btrfs_unlink_inode`: [`unlink_name`] plus `drop_nlink` and the inode update. Returns the
/// inode item as written.
fn unlink_inode(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    name: &[u8],
    now: Timespec,
) -> Result<InodeItem> {
    let index = unlink_name(c, root, dir, ino, name, now)?;
    crate::tree_log::btrfs_del_inode_ref_in_log(c, root, ino, dir, name);
    crate::tree_log::btrfs_del_dir_entries_in_log(c, root, dir, index);
    let mut ii = c.read_inode(root, ino)?;
    fold_dirty_mtime(c, root, ino, &mut ii);
    ii.nlink = ii.nlink.saturating_sub(1);
    if is_dir_mode(ii.mode) {
        // btrfs_rmdir: the directory is empty now.
        ii.size = 0;
    }
    ii.ctime = now;
    touch(c, &mut ii);
    c.write_inode(root, ino, &ii)?;
    Ok(ii)
}

/// `btrfs_add_link`: the DIR_ITEM and DIR_INDEX of `name` → `ino` in `dir` (and, with
/// `add_backref`, the back reference), then the directory's size and times.
#[allow(clippy::too_many_arguments)]
fn add_link(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    mode: u32,
    name: &[u8],
    index: u64,
    add_backref: bool,
    now: Timespec,
) -> Result<()> {
    if add_backref {
        insert_inode_ref(c, root, ino, dir, name, index)?;
    }
    crate::dir_item::insert_dir_item(
        c,
        root,
        dir,
        name,
        Key::new(ino, item::INODE_ITEM, 0),
        file_type_of(mode),
        index,
    )?;
    let mut dii = c.read_inode(root, dir)?;
    dii.size += 2 * name.len() as u64;
    dii.mtime = now;
    dii.ctime = now;
    touch(c, &mut dii);
    c.write_inode(root, dir, &dii)
}

fn orphan_key(ino: u64) -> Key {
    Key::new(ubtrfs_format::key::objectid::ORPHAN, item::ORPHAN_ITEM, ino)
}

/// `btrfs_orphan_add`: mark `ino` as unlinked-but-in-use (an existing item is fine).
fn orphan_add(c: &mut WriteCtx<'_>, root: u64, ino: u64) -> Result<()> {
    let key = orphan_key(ino);
    if c.lookup(root, &key)?.is_none() {
        c.insert(root, key, &[])?;
    }
    Ok(())
}

/// `btrfs_orphan_del` (absent is fine).
fn orphan_del(c: &mut WriteCtx<'_>, root: u64, ino: u64) -> Result<()> {
    let key = orphan_key(ino);
    if c.lookup(root, &key)?.is_some() {
        c.delete(root, &key)?;
    }
    Ok(())
}

/// Forget the in-memory state of an evicted inode: dirty data, extent maps, index counter.
///
/// Runs inside a write operation (tree lock held). The dirty map is only tried: a writeback
/// holds it while it takes an inode's dirty mutex, whose holder may be waiting for the tree
/// lock; on contention the entry is dropped by [`write_op_evicting`] once the tree lock is
/// released.
fn forget_inode(fs: &FsInfo, root: u64, ino: u64) {
    match fs.dirty.try_lock() {
        Some(mut m) => {
            m.remove(&(root, ino));
        }
        None => DEFERRED_FORGET.with(|d| d.borrow_mut().push((root, ino))),
    }
    fs.next_index.lock().remove(&(root, ino));
    fs.ems.evict_inode(root, ino);
}

/// Drop the cached in-memory state of an inode nobody references any more (FUSE FORGET, the
/// kernel's inode eviction from its cache): its extent maps and modified list. An inode changed
/// in the running transaction is marked so that, re-read, its next fsync takes the full path
/// (`btrfs_read_locked_inode`: `last_trans` equal to the fs generation sets NEEDS_FULL_SYNC):
/// the fast path logs from the modified list, which no longer holds what it changed.
///
/// The transaction mutex is held across the check and the eviction, so no write operation
/// (which changes inode items under it) falls between them.
pub fn btrfs_forget_cached_inode(fs: &FsInfo, root: u64, ino: u64) {
    match &fs.trans {
        Some(t) => {
            let mut t = t.lock();
            fs.ems.evict_inode(root, ino);
            if t.log.last_sub_trans.contains_key(&(root, ino)) {
                t.log.full_sync_on_load.insert((root, ino));
            }
        }
        None => fs.ems.evict_inode(root, ino),
    }
}

thread_local! {
    /// Evicted inodes whose dirty data could not be forgotten under the tree lock.
    static DEFERRED_FORGET: std::cell::RefCell<Vec<(u64, u64)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// [`FsInfo::write_op`] for operations that may evict inodes: afterwards, the dirty data of
/// inodes evicted under contention is dropped.
fn write_op_evicting<R>(
    fs: &FsInfo,
    rsv: crate::space_info::MetaRsv,
    f: impl FnOnce(&mut WriteCtx<'_>) -> Result<R>,
) -> Result<R> {
    let r = fs.write_op_rsv(rsv, f);
    let pending = DEFERRED_FORGET.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for key in pending {
        fs.dirty.lock().remove(&key);
    }
    let evict = PENDING_EVICT.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if r.is_ok() {
        for (root, ino) in evict {
            // The name is gone (committed with the operation); an eviction that cannot finish
            // now is finished by the orphan cleanup of the next mount.
            if let Err(e) = btrfs_evict_inode(fs, root, ino) {
                tracing::warn!("root {root} ino {ino}: eviction left to orphan cleanup: {e}");
                break;
            }
        }
    }
    r
}

/// Items one eviction step deletes: the metadata it COWs stays bounded (a few leaves and
/// their paths), so an inode with many items (xattrs, extents) can be evicted on a full
/// filesystem, one reservation and, when needed, one commit at a time (the kernel's
/// `btrfs_evict_inode` loop of `btrfs_truncate_inode_items` with a refilled reserve).
const EVICT_BATCH: usize = 128;

/// The body of `btrfs_evict_inode` for an inode with no names: `btrfs_truncate_inode_items`
/// with new size 0 and min type 0 (every item of the inode goes, from the last key down, data
/// references of its file extents are dropped), then the orphan item. In-memory state is
/// forgotten too. Deletes at most [`EVICT_BATCH`] items; when more are left, the inode keeps
/// its inode item (with size and nbytes of what is left) and an orphan item, so any commit in
/// between leaves a consistent, resumable state, and `Ok(false)` says to call again.
fn evict_locked(c: &mut WriteCtx<'_>, root: u64, ino: u64) -> Result<bool> {
    let last = Key::new(ino, u8::MAX, u64::MAX);
    let mut deleted = 0usize;
    let mut sub_bytes = 0u64;
    let mut new_size: Option<u64> = None;
    while let Some((key, data)) = c.lookup_le(root, &last)? {
        if key.objectid != ino || key.item_type == item::INODE_ITEM {
            break;
        }
        if deleted == EVICT_BATCH {
            // More to do: keep what is left consistent and resumable.
            orphan_add(c, root, ino)?;
            let mut ii = c.read_inode(root, ino)?;
            ii.nbytes = ii.nbytes.saturating_sub(sub_bytes);
            if let Some(sz) = new_size {
                ii.size = ii.size.min(sz);
            }
            touch(c, &mut ii);
            c.write_inode(root, ino, &ii)?;
            return Ok(false);
        }
        if key.item_type == item::EXTENT_DATA {
            let fe = FileExtentItem::parse(&data).map_err(|e| corrupt_at(root, &key, e))?;
            if fe.extent_type == FILE_EXTENT_INLINE {
                sub_bytes += fe.ram_bytes;
            } else if fe.disk_bytenr != 0 {
                sub_bytes += fe.num_bytes;
                c.t.refs.add(
                    fe.disk_bytenr,
                    fe.disk_num_bytes,
                    RefKind::Data {
                        root,
                        ino,
                        offset: key.offset.wrapping_sub(fe.offset),
                    },
                    -1,
                );
            }
            new_size = Some(key.offset);
        }
        c.delete(root, &key)?;
        deleted += 1;
    }
    c.delete(root, &Key::new(ino, item::INODE_ITEM, 0))?;
    orphan_del(c, root, ino)?;
    forget_inode(c.fs, root, ino);
    Ok(true)
}

thread_local! {
    /// Inodes whose eviction needs more steps once the current write operation ends.
    static PENDING_EVICT: std::cell::RefCell<Vec<(u64, u64)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// What happens to an inode whose last name went away: an open inode gets an orphan item and
/// lives until its last release ([`btrfs_evict_inode`]); otherwise it is evicted now, as the
/// kernel's final iput does right after the unlink (in further steps after this operation if
/// it has many items).
fn last_link_gone(c: &mut WriteCtx<'_>, root: u64, ino: u64) -> Result<()> {
    if c.fs.open_count(root, ino) > 0 {
        orphan_add(c, root, ino)
    } else {
        if !evict_locked(c, root, ino)? {
            PENDING_EVICT.with(|p| p.borrow_mut().push((root, ino)));
        }
        Ok(())
    }
}

/// `btrfs_unlink`: remove the name `name` (a regular file, symlink or special file) from
/// `dir`. The inode loses a link; at zero links it is evicted, or kept with an orphan item
/// while it is open ([`FsInfo::open_count`]).
pub fn btrfs_unlink(fs: &FsInfo, root: u64, dir: u64, name: &[u8]) -> Result<()> {
    check_lookup_name(name)?;
    write_op_evicting(fs, crate::space_info::MetaRsv::UNLINK, |c| {
        let dii = c.read_inode(root, dir)?;
        if !is_dir_mode(dii.mode) {
            return Err(FsError::NotDir);
        }
        let entry = lookup_dir_entry(c, root, dir, name)?.ok_or(FsError::NotFound)?;
        if entry.location.item_type != item::INODE_ITEM {
            // A subvolume (its root directory).
            return Err(FsError::IsDir);
        }
        let ino = entry.location.objectid;
        let ii = c.read_inode(root, ino)?;
        if is_dir_mode(ii.mode) {
            return Err(FsError::IsDir);
        }
        crate::tree_log::btrfs_record_unlink_dir(c, root, dir, ino, false);
        let now = crate::disk_io::now_timespec();
        let ii = unlink_inode(c, root, dir, ino, name, now)?;
        if ii.nlink == 0 {
            last_link_gone(c, root, ino)?;
        }
        Ok(())
    })
}

/// `btrfs_rmdir`: remove the empty directory `name` from `dir` (ENOTEMPTY unless its i_size is
/// 0, i.e. it holds no names). Subvolumes are not deleted here.
pub fn btrfs_rmdir(fs: &FsInfo, root: u64, dir: u64, name: &[u8]) -> Result<()> {
    check_lookup_name(name)?;
    write_op_evicting(fs, crate::space_info::MetaRsv::UNLINK, |c| {
        let dii = c.read_inode(root, dir)?;
        if !is_dir_mode(dii.mode) {
            return Err(FsError::NotDir);
        }
        let entry = lookup_dir_entry(c, root, dir, name)?.ok_or(FsError::NotFound)?;
        if entry.location.item_type != item::INODE_ITEM {
            return Err(FsError::Unsupported(
                "deleting a subvolume with rmdir".into(),
            ));
        }
        let ino = entry.location.objectid;
        let ii = c.read_inode(root, ino)?;
        if !is_dir_mode(ii.mode) {
            return Err(FsError::NotDir);
        }
        if ii.size > 0 {
            return Err(FsError::NotEmpty);
        }
        crate::tree_log::btrfs_propagate_unlink_trans(c, root, dir, ino);
        crate::tree_log::btrfs_record_unlink_dir(c, root, dir, ino, false);
        let now = crate::disk_io::now_timespec();
        let ii = unlink_inode(c, root, dir, ino, name, now)?;
        if ii.nlink == 0 {
            last_link_gone(c, root, ino)?;
        }
        Ok(())
    })
}

/// `btrfs_evict_inode`: the last release of an inode. If it has no names left, every item of
/// it is deleted, the data references of its extents are dropped and its orphan item removed;
/// an inode that still has names is left alone. Returns whether it was evicted.
pub fn btrfs_evict_inode(fs: &FsInfo, root: u64, ino: u64) -> Result<bool> {
    // Bounded: every step deletes EVICT_BATCH items of a finite inode.
    loop {
        let step = write_op_evicting(fs, crate::space_info::MetaRsv::UNLINK, |c| {
            match c.read_inode(root, ino) {
                Ok(ii) if ii.nlink > 0 => Ok(Some(false)),
                Ok(_) => Ok(evict_locked(c, root, ino)?.then_some(true)),
                Err(FsError::NotFound) => {
                    orphan_del(c, root, ino)?;
                    forget_inode(c.fs, root, ino);
                    Ok(Some(true))
                }
                Err(e) => Err(e),
            }
        })?;
        if let Some(evicted) = step {
            return Ok(evicted);
        }
    }
}

/// `btrfs_orphan_cleanup` for every subvolume, as a read-write mount does before serving:
/// orphans whose inode is gone or has links again lose the orphan item; the others are
/// evicted. Inodes open in this mount are skipped (their last release evicts them). Returns
/// the number of inodes evicted.
pub fn orphan_cleanup(fs: &FsInfo) -> Result<u64> {
    let roots: Vec<u64> = {
        let trans = fs.trans.as_ref().ok_or(FsError::ReadOnly)?;
        let t = trans.lock();
        t.roots
            .keys()
            .copied()
            .filter(|&id| ubtrfs_format::key::is_fstree(id))
            .collect()
    };
    let mut evicted = 0;
    for root in roots {
        let orphans: Vec<u64> = fs.write_op_rsv(crate::space_info::MetaRsv::UNLINK, |c| {
            let start = orphan_key(0);
            Ok(c.items(root, start, usize::MAX, |k| {
                k.objectid == start.objectid && k.item_type == item::ORPHAN_ITEM
            })?
            .into_iter()
            .map(|(k, _)| k.offset)
            .collect())
        })?;
        for ino in orphans {
            if fs.open_count(root, ino) > 0 {
                continue;
            }
            if btrfs_evict_inode(fs, root, ino)? {
                evicted += 1;
            } else {
                // Linked again (or an orphan item from an old kernel's truncate): just the item.
                fs.write_op_rsv(crate::space_info::MetaRsv::UNLINK, |c| {
                    orphan_del(c, root, ino)
                })?;
            }
        }
    }
    Ok(evicted)
}

/// `btrfs_link`: a new name `newname` in `newdir` for the existing inode `ino` (not a
/// directory). Names of one inode in one directory share an INODE_REF item until it would
/// outgrow a leaf; further names go to INODE_EXTREF items (EXTENDED_IREF filesystems).
pub fn btrfs_link(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    newdir: u64,
    newname: &[u8],
) -> Result<InodeItem> {
    check_name(newname)?;
    fs.write_op(|c| {
        // The VFS order of checks (do_linkat, vfs_link): the new name, then the inode.
        let mut ii = c.read_inode(root, ino)?;
        let dii = c.read_inode(root, newdir)?;
        if !is_dir_mode(dii.mode) {
            return Err(FsError::NotDir);
        }
        if dii.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if crate::dir_item::name_exists(c, root, newdir, newname)? {
            return Err(FsError::Exists);
        }
        if is_dir_mode(ii.mode) {
            return Err(FsError::NotPermitted);
        }
        if ii.nlink == 0 {
            // Only O_TMPFILE inodes may be linked back; ubtrfs has none.
            return Err(FsError::NotFound);
        }
        if ii.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let index = next_dir_index(c, root, newdir)?;
        let now = crate::disk_io::now_timespec();
        add_link(c, root, newdir, ino, ii.mode, newname, index, true, now)?;
        fold_dirty_mtime(c, root, ino, &mut ii);
        ii.nlink += 1;
        ii.ctime = now;
        touch(c, &mut ii);
        c.write_inode(root, ino, &ii)?;
        crate::tree_log::btrfs_log_new_name(c, root, ino, false, None);
        Ok(ii)
    })
}

/// `btrfs_symlink`: a symlink `name` in `dir` pointing at `target`, stored as an inline extent
/// (i_size = nbytes = target length, mode 0o120777). Targets the VFS would refuse (empty, or
/// PATH_MAX and longer) and targets that do not fit an inline extent (the kernel's
/// ENAMETOOLONG for more than `BTRFS_MAX_INLINE_DATA_SIZE`) are refused.
pub fn btrfs_symlink(
    fs: &FsInfo,
    root: u64,
    dir: u64,
    name: &[u8],
    target: &[u8],
    uid: u32,
    gid: u32,
) -> Result<(u64, InodeItem)> {
    check_name(name)?;
    if target.is_empty() {
        return Err(FsError::NotFound);
    }
    if target.len() >= PATH_MAX || target.len() > max_inline_data_size(fs) {
        return Err(FsError::NameTooLong);
    }
    fs.write_op(|c| {
        let (ino, mut ii) = new_inode_in(c, root, dir, name, S_IFLNK | 0o777, 0, uid, gid)?;
        let fe = FileExtentItem {
            generation: c.transid(),
            ram_bytes: target.len() as u64,
            compression: 0,
            encryption: 0,
            other_encoding: 0,
            extent_type: FILE_EXTENT_INLINE,
            disk_bytenr: 0,
            disk_num_bytes: 0,
            offset: 0,
            num_bytes: 0,
            inline_data: target.to_vec(),
        };
        c.insert(root, Key::new(ino, item::EXTENT_DATA, 0), &fe.to_bytes())?;
        ii.size = target.len() as u64;
        ii.nbytes = target.len() as u64;
        c.write_inode(root, ino, &ii)?;
        Ok((ino, ii))
    })
}

/// Whether `dir` is `anc` or lies below it (walking INODE_REF parents up to the subvolume
/// root), for the VFS rule that a directory cannot move into itself.
fn is_same_or_descendant(c: &WriteCtx<'_>, root: u64, mut dir: u64, anc: u64) -> Result<bool> {
    for _ in 0..4096 {
        if dir == anc {
            return Ok(true);
        }
        let refs = c.items(root, Key::new(dir, item::INODE_REF, 0), 1, |k| {
            k.objectid == dir && k.item_type == item::INODE_REF
        })?;
        let Some((k, _)) = refs.into_iter().next() else {
            return Ok(false);
        };
        if k.offset == dir {
            return Ok(false); // the subvolume root's ".." reference to itself
        }
        dir = k.offset;
    }
    Err(FsError::corrupt(format!(
        "root {root}: directory {dir} is nested more than 4096 deep (a loop?)"
    )))
}

/// `btrfs_rename2`: rename `oldname` of `olddir` to `newname` of `newdir` (same subvolume).
/// Plain renames replace an existing target (the replaced inode loses a link with unlink
/// semantics, orphan included; a replaced directory must be empty); `RENAME_NOREPLACE` fails
/// with EEXIST instead; `RENAME_EXCHANGE` swaps two existing names; `RENAME_WHITEOUT` leaves
/// a whiteout at the old name (owned by root here; see [`btrfs_rename_as`]). A directory moved to another parent gets its INODE_REF re-keyed to it.
#[allow(clippy::too_many_arguments)]
pub fn btrfs_rename(
    fs: &FsInfo,
    root: u64,
    olddir: u64,
    oldname: &[u8],
    newdir: u64,
    newname: &[u8],
    flags: u32,
) -> Result<()> {
    btrfs_rename_as(fs, root, olddir, oldname, newdir, newname, flags, (0, 0))
}

/// [`btrfs_rename`] with the owner (uid, gid) of the whiteout that `RENAME_WHITEOUT` leaves
/// at the old name: a character device 0:0 with mode 0 (`new_whiteout_inode`), created in the
/// rename's transaction.
#[allow(clippy::too_many_arguments)]
pub fn btrfs_rename_as(
    fs: &FsInfo,
    root: u64,
    olddir: u64,
    oldname: &[u8],
    newdir: u64,
    newname: &[u8],
    flags: u32,
    whiteout_owner: (u32, u32),
) -> Result<()> {
    if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) != 0 {
        return Err(FsError::Invalid(format!("rename flags {flags:#x}")));
    }
    let exchange = flags & RENAME_EXCHANGE != 0;
    if exchange && flags & (RENAME_NOREPLACE | RENAME_WHITEOUT) != 0 {
        return Err(FsError::Invalid(
            "RENAME_EXCHANGE with NOREPLACE or WHITEOUT".into(),
        ));
    }
    check_lookup_name(oldname)?;
    // btrfs_rename: 11 items in the worst case (both names, both inodes, an overwritten
    // inode's ref and orphan item, the two parents).
    let rsv = crate::space_info::MetaRsv {
        items: 11,
        flush: crate::space_info::Flush::All,
    };
    write_op_evicting(fs, rsv, |c| {
        for d in [olddir, newdir] {
            let dii = c.read_inode(root, d)?;
            if !is_dir_mode(dii.mode) {
                return Err(FsError::NotDir);
            }
        }
        let old = lookup_dir_entry(c, root, olddir, oldname)?.ok_or(FsError::NotFound)?;
        // The VFS looks the new name up only after the old one.
        check_name(newname)?;
        let new = lookup_dir_entry(c, root, newdir, newname)?;
        if c.read_inode(root, newdir)?.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if old.location.item_type != item::INODE_ITEM {
            return Err(FsError::Unsupported("renaming a subvolume".into()));
        }
        if let Some(n) = &new {
            if n.location.item_type != item::INODE_ITEM {
                return Err(if exchange {
                    FsError::Unsupported("exchanging with a subvolume".into())
                } else {
                    FsError::NotEmpty
                });
            }
        }
        let old_ino = old.location.objectid;
        let oii = c.read_inode(root, old_ino)?;
        let old_is_dir = is_dir_mode(oii.mode);
        if exchange && new.is_none() {
            return Err(FsError::NotFound);
        }
        if flags & RENAME_NOREPLACE != 0 && new.is_some() {
            return Err(FsError::Exists);
        }
        let new_ino = new.as_ref().map(|n| n.location.objectid);
        let nii = match new_ino {
            Some(n) => Some(c.read_inode(root, n)?),
            None => None,
        };
        let new_is_dir = nii.map(|n| is_dir_mode(n.mode)).unwrap_or(false);
        // lock_rename's trap: a directory cannot move below itself (EINVAL), and a target
        // that is an ancestor of the source is not empty (ENOTEMPTY; EINVAL for exchange).
        if olddir != newdir {
            if old_is_dir && is_same_or_descendant(c, root, newdir, old_ino)? {
                return Err(FsError::Invalid("moving a directory below itself".into()));
            }
            if let Some(n) = new_ino {
                if new_is_dir && is_same_or_descendant(c, root, olddir, n)? {
                    return Err(if exchange {
                        FsError::Invalid("moving a directory below itself".into())
                    } else {
                        FsError::NotEmpty
                    });
                }
            }
        }
        if new_ino == Some(old_ino) {
            // Two names of one inode (or the same name): POSIX says do nothing.
            return Ok(());
        }
        if !exchange {
            if let Some(n) = &nii {
                if old_is_dir && !new_is_dir {
                    return Err(FsError::NotDir);
                }
                if !old_is_dir && new_is_dir {
                    return Err(FsError::IsDir);
                }
                if new_is_dir && n.size > 0 {
                    return Err(FsError::NotEmpty);
                }
            }
        }
        let now = crate::disk_io::now_timespec();
        if exchange {
            let new_ino = new_ino.unwrap_or(0);
            let nmode = nii.map(|n| n.mode).unwrap_or(0);
            if olddir != newdir {
                crate::tree_log::btrfs_record_unlink_dir(c, root, olddir, old_ino, true);
                crate::tree_log::btrfs_record_unlink_dir(c, root, newdir, new_ino, true);
            }
            // btrfs_rename_exchange: both indexes first (new dir, then old dir).
            let old_idx = next_dir_index(c, root, newdir)?;
            let new_idx = next_dir_index(c, root, olddir)?;
            insert_inode_ref(c, root, old_ino, newdir, newname, old_idx)?;
            insert_inode_ref(c, root, new_ino, olddir, oldname, new_idx)?;
            let old_old_idx = unlink_name(c, root, olddir, old_ino, oldname, now)?;
            let new_old_idx = unlink_name(c, root, newdir, new_ino, newname, now)?;
            add_link(
                c, root, newdir, old_ino, oii.mode, newname, old_idx, false, now,
            )?;
            add_link(
                c, root, olddir, new_ino, nmode, oldname, new_idx, false, now,
            )?;
            for ino in [old_ino, new_ino] {
                let mut ii = c.read_inode(root, ino)?;
                fold_dirty_mtime(c, root, ino, &mut ii);
                ii.ctime = now;
                touch(c, &mut ii);
                c.write_inode(root, ino, &ii)?;
            }
            let new_is_dir = is_dir_mode(nmode);
            crate::tree_log::btrfs_log_new_name(
                c,
                root,
                old_ino,
                old_is_dir,
                Some((olddir, old_old_idx)),
            );
            crate::tree_log::btrfs_log_new_name(
                c,
                root,
                new_ino,
                new_is_dir,
                Some((newdir, new_old_idx)),
            );
            return Ok(());
        }
        if olddir != newdir {
            crate::tree_log::btrfs_record_unlink_dir(c, root, olddir, old_ino, true);
        }
        let index = next_dir_index(c, root, newdir)?;
        insert_inode_ref(c, root, old_ino, newdir, newname, index)?;
        let old_index = unlink_name(c, root, olddir, old_ino, oldname, now)?;
        {
            let mut ii = c.read_inode(root, old_ino)?;
            fold_dirty_mtime(c, root, old_ino, &mut ii);
            ii.ctime = now;
            touch(c, &mut ii);
            c.write_inode(root, old_ino, &ii)?;
        }
        if let Some(victim) = new_ino {
            let vii = unlink_inode(c, root, newdir, victim, newname, now)?;
            if vii.nlink == 0 {
                last_link_gone(c, root, victim)?;
            }
        }
        add_link(
            c, root, newdir, old_ino, oii.mode, newname, index, false, now,
        )?;
        crate::tree_log::btrfs_log_new_name(
            c,
            root,
            old_ino,
            old_is_dir,
            Some((olddir, old_index)),
        );
        if flags & RENAME_WHITEOUT != 0 {
            let (uid, gid) = whiteout_owner;
            new_inode_in(c, root, olddir, oldname, S_IFCHR, 0, uid, gid)?;
        }
        Ok(())
    })
}

/// A time for [`btrfs_setattr`]: the current time (`ATTR_ATIME` without `ATTR_ATIME_SET`) or
/// a given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timespec),
}

/// The attributes [`btrfs_setattr`] changes (`struct iattr`): `None` leaves one alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (and setuid/setgid/sticky); the file type bits are kept.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend a regular file.
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// An explicit ctime (FUSE's `FATTR_CTIME`); otherwise any change sets ctime to now, as
    /// `notify_change` does.
    pub ctime: Option<Timespec>,
}

/// `btrfs_truncate_inode_items` for file data (min type EXTENT_DATA): drop the file extent
/// items wholly beyond `new_size`, shrink the one that straddles it (regular and prealloc
/// items to the sector boundary; an uncompressed inline item in place, a compressed one is
/// rewritten uncompressed), dropping the data references of removed items.
pub fn btrfs_truncate_inode_items(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    new_size: u64,
) -> Result<TruncateResult> {
    let ss = u64::from(c.fs.sectorsize());
    let start = match c.lookup_le(root, &Key::new(ino, item::EXTENT_DATA, new_size))? {
        Some((k, _)) if k.objectid == ino && k.item_type == item::EXTENT_DATA => k.offset,
        _ => new_size,
    };
    let items = c.items(
        root,
        Key::new(ino, item::EXTENT_DATA, start),
        usize::MAX,
        |k| k.objectid == ino && k.item_type == item::EXTENT_DATA,
    )?;
    let mut sub = 0u64;
    let mut found = 0u64;
    for (key, data) in items {
        let mut fe = FileExtentItem::parse(&data).map_err(|e| corrupt_at(root, &key, e))?;
        if key.offset >= new_size
            || fe.extent_type == FILE_EXTENT_INLINE && key.offset + fe.ram_bytes > new_size
            || fe.extent_type != FILE_EXTENT_INLINE
                && fe.num_bytes > (new_size - key.offset).div_ceil(ss) * ss
        {
            found += 1;
        }
        if fe.extent_type == FILE_EXTENT_INLINE {
            let end = key.offset + fe.ram_bytes;
            if key.offset >= new_size {
                c.delete(root, &key)?;
                sub += fe.ram_bytes;
            } else if end > new_size {
                let keep = (new_size - key.offset) as usize;
                let mut content = if fe.compression == 0 {
                    fe.inline_data.clone()
                } else {
                    decompress_inline_item(root, ino, &key, &fe, c.fs.sectorsize())?
                };
                content.resize(keep, 0);
                fe.inline_data = content;
                fe.compression = 0;
                fe.ram_bytes = keep as u64;
                c.update(root, &key, &fe.to_bytes())?;
                sub += end - new_size;
            }
            continue;
        }
        let end = key.offset + fe.num_bytes;
        if end <= new_size {
            continue;
        }
        let counts = fe.disk_bytenr != 0;
        if key.offset >= new_size {
            c.delete(root, &key)?;
            if counts {
                c.t.refs.add(
                    fe.disk_bytenr,
                    fe.disk_num_bytes,
                    RefKind::Data {
                        root,
                        ino,
                        offset: key.offset.wrapping_sub(fe.offset),
                    },
                    -1,
                );
                sub += fe.num_bytes;
            }
        } else {
            let keep = (new_size - key.offset).div_ceil(ss) * ss;
            if keep < fe.num_bytes {
                if counts {
                    sub += fe.num_bytes - keep;
                }
                fe.num_bytes = keep;
                c.update(root, &key, &fe.to_bytes())?;
            }
        }
    }
    Ok(TruncateResult {
        sub_bytes: sub,
        extents_found: found,
    })
}

/// What [`btrfs_truncate_inode_items`] did (`struct btrfs_truncate_control` outputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TruncateResult {
    /// Bytes to subtract from the inode's nbytes.
    pub sub_bytes: u64,
    /// File extent items dropped or trimmed.
    pub extents_found: u64,
}

/// Drop the in-memory mtime of the dirty buffer, so that a later writeback does not replace
/// the times an operation set explicitly.
pub(crate) fn forget_dirty_mtime(fs: &FsInfo, root: u64, ino: u64) {
    if let Some(d) = crate::file_write::dirty_inode(fs, root, ino) {
        d.lock().mtime = None;
    }
}

/// `btrfs_setsize`: truncate or extend a regular file to `new_size`. Dirty data is written
/// back first; shrinking drops and shrinks extent items (`btrfs_truncate`); extending zeroes
/// the tail of the old last sector (`btrfs_cont_expand` → `btrfs_truncate_block`) and, without
/// NO_HOLES, inserts a hole item. A changed size sets mtime and ctime to now.
fn btrfs_setsize(fs: &FsInfo, root: u64, ino: u64, new_size: u64) -> Result<()> {
    if new_size > i64::MAX as u64 {
        return Err(FsError::FileTooBig);
    }
    let ss = u64::from(fs.sectorsize());
    crate::file_write::btrfs_writeback(fs, root, ino)?;
    let ii = read_inode(fs, root, ino)?;
    let old = ii.size;
    if new_size > old {
        return crate::file_write::btrfs_expand_to(fs, root, ino, new_size);
    }
    // A shrinking truncate gives space back: it may use the global reserve, so it works on a
    // full filesystem (as unlink does).
    let found = fs.write_op_rsv(crate::space_info::MetaRsv::UNLINK, |c| {
        let tr = btrfs_truncate_inode_items(c, root, ino, new_size)?;
        let mut ii = c.read_inode(root, ino)?;
        ii.nbytes = ii.nbytes.saturating_sub(tr.sub_bytes);
        if new_size != ii.size {
            let now = crate::disk_io::now_timespec();
            ii.size = new_size;
            ii.mtime = now;
            ii.ctime = now;
        }
        touch(c, &mut ii);
        c.write_inode(root, ino, &ii)?;
        Ok(tr.extents_found)
    })?;
    let emi = fs.ems.inode(root, ino);
    emi.btrfs_drop_extent_map_range(new_size - new_size % ss, u64::MAX, false);
    // btrfs_truncate: items were dropped or trimmed, so the next fsync must log the inode's
    // extents from the tree, not from the (dropped) modified maps.
    if found > 0 {
        emi.btrfs_set_inode_full_sync();
    }
    crate::file_write::truncate_dirty(fs, root, ino, new_size);
    // Stale bytes after the new EOF in its last sector are replaced by zeros, so that no later
    // extension can expose them (the kernel zeroes them in the page cache and again at every
    // extension; ubtrfs rewrites the sector once, only when it holds non-zero bytes).
    if !new_size.is_multiple_of(ss) && crate::file_write::tail_is_stale(fs, root, ino, new_size)? {
        crate::file_write::btrfs_truncate_block(fs, root, ino, new_size, 0, false)?;
        forget_dirty_mtime(fs, root, ino);
        crate::file_write::btrfs_writeback(fs, root, ino)?;
    }
    Ok(())
}

/// `btrfs_setattr`: change the size (regular files only) and the attributes of `ino`; ctime is
/// set as `notify_change` sets it (now, unless given). The caller holds the inode lock.
/// Returns the inode item as it now reads (with the in-memory size of unwritten data).
pub fn btrfs_setattr(fs: &FsInfo, root: u64, ino: u64, attrs: &SetAttr) -> Result<InodeItem> {
    let ii = read_inode(fs, root, ino)?;
    if let Some(size) = attrs.size {
        match ii.mode & S_IFMT {
            S_IFREG => btrfs_setsize(fs, root, ino, size)?,
            S_IFDIR => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("truncate of a special file".into())),
        }
    }
    let any = attrs.mode.is_some()
        || attrs.uid.is_some()
        || attrs.gid.is_some()
        || attrs.atime.is_some()
        || attrs.mtime.is_some()
        || attrs.ctime.is_some()
        || attrs.size.is_some();
    // The inode update that completes a truncate is part of it (the kernel updates the inode
    // in the truncate's transaction): it may use the global reserve too.
    let rsv = if attrs.size.is_some() {
        crate::space_info::MetaRsv::UNLINK
    } else {
        crate::space_info::MetaRsv::DEFAULT
    };
    if any {
        fs.write_op_rsv(rsv, |c| {
            let mut ii = c.read_inode(root, ino)?;
            fold_dirty_mtime(c, root, ino, &mut ii);
            let now = crate::disk_io::now_timespec();
            let at = |t: TimeSet| match t {
                TimeSet::Now => now,
                TimeSet::At(t) => t,
            };
            if let Some(m) = attrs.mode {
                ii.mode = (ii.mode & S_IFMT) | (m & 0o7777);
            }
            if let Some(u) = attrs.uid {
                ii.uid = u;
            }
            if let Some(g) = attrs.gid {
                ii.gid = g;
            }
            if let Some(t) = attrs.atime {
                ii.atime = at(t);
            }
            if let Some(t) = attrs.mtime {
                ii.mtime = at(t);
            }
            ii.ctime = attrs.ctime.unwrap_or(now);
            touch(c, &mut ii);
            c.write_inode(root, ino, &ii)
        })?;
        if attrs.mtime.is_some() {
            forget_dirty_mtime(fs, root, ino);
        }
    }
    let mut ii = read_inode(fs, root, ino)?;
    crate::file_write::live_attrs(fs, root, ino, &mut ii);
    Ok(ii)
}

/// The content of a compressed inline extent item.
fn decompress_inline_item(
    root: u64,
    ino: u64,
    key: &Key,
    fe: &FileExtentItem,
    sectorsize: u32,
) -> Result<Vec<u8>> {
    use crate::compression::{btrfs_decompress_inline, CompressionType};
    let kind = CompressionType::from_disk(fe.compression)
        .ok_or_else(|| corrupt_at(root, key, format!("compression {}", fe.compression)))?;
    btrfs_decompress_inline(kind, &fe.inline_data, fe.ram_bytes as usize, sectorsize).map_err(
        |source| FsError::Decompress {
            root,
            ino,
            offset: key.offset,
            source,
        },
    )
}
