//! Directory entries: lookup by name through DIR_ITEM (name hash) and listing through DIR_INDEX
//! (index order, the kernel's readdir order and cookies).

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use ubtrfs_ctree::ctree::lookup_item;
use ubtrfs_ctree::TreeIter;
use ubtrfs_format::csum::name_hash;
use ubtrfs_format::items::{DirItem, RootRef};
use ubtrfs_format::key::{item, Key};

/// What a directory entry leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// An inode of subvolume `root` (for a subvolume entry: the subvolume's root directory).
    Inode { root: u64, ino: u64 },
    /// A subvolume entry the parent does not own (a nested subvolume seen through a snapshot):
    /// the kernel shows an empty directory (`new_fake_inode`).
    EmptySubvolPlaceholder { root: u64 },
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// DIR_INDEX key offset: readdir cookie of this entry (the next one starts at index + 1).
    pub index: u64,
    pub name: Vec<u8>,
    pub file_type: u8,
    pub target: Target,
}

/// Resolve a DIR_ITEM/DIR_INDEX location key found in directory `dir` of `root`.
fn resolve(fs: &FsInfo, root: u64, dir: u64, d: &DirItem) -> Result<Target> {
    match d.location.item_type {
        item::INODE_ITEM => Ok(Target::Inode {
            root,
            ino: d.location.objectid,
        }),
        item::ROOT_ITEM => {
            // fixup_tree_root_location: the entry is ours only if a ROOT_REF says so.
            let sub = d.location.objectid;
            let tree_root = fs.tree_root();
            let key = Key::new(root, item::ROOT_REF, sub);
            let owned = match lookup_item(&fs.reader, &tree_root, &key)? {
                Some(data) => {
                    let rr = RootRef::parse(&data)
                        .map_err(|e| FsError::corrupt(format!("root ref {key}: {e}")))?;
                    rr.dirid == dir && rr.name == d.name
                }
                None => false,
            };
            if !owned {
                return Ok(Target::EmptySubvolPlaceholder { root });
            }
            match fs.root(sub) {
                Ok(s) => Ok(Target::Inode {
                    root: sub,
                    ino: s.item.root_dirid,
                }),
                Err(FsError::NotFound) => Ok(Target::EmptySubvolPlaceholder { root }),
                Err(e) => Err(e),
            }
        }
        other => Err(FsError::corrupt(format!(
            "root {root} dir {dir}: entry {:?} has location type {other}",
            String::from_utf8_lossy(&d.name)
        ))),
    }
}

/// `btrfs_lookup_dentry`: find `name` in directory `dir` of `root`.
pub fn lookup(fs: &FsInfo, root: u64, dir: u64, name: &[u8]) -> Result<Target> {
    if dir == crate::inode::EMPTY_SUBVOL_DIR_OBJECTID {
        return Err(FsError::NotFound);
    }
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    let key = Key::new(dir, item::DIR_ITEM, name_hash(name));
    let data = lookup_item(&fs.reader, &r.ptr, &key)?.ok_or(FsError::NotFound)?;
    let items = DirItem::parse_all(&data)
        .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
    let d = items
        .iter()
        .find(|d| d.name == name)
        .ok_or(FsError::NotFound)?;
    resolve(fs, root, dir, d)
}

/// List entries of `dir` with DIR_INDEX >= `start_index`, at most `limit` of them.
pub fn readdir(
    fs: &FsInfo,
    root: u64,
    dir: u64,
    start_index: u64,
    limit: usize,
) -> Result<Vec<DirEntry>> {
    let mut out = Vec::new();
    if dir == crate::inode::EMPTY_SUBVOL_DIR_OBJECTID {
        return Ok(out);
    }
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    for it in TreeIter::new(
        &fs.reader,
        r.ptr,
        Key::new(dir, item::DIR_INDEX, start_index),
    ) {
        let (key, block, slot) = it?;
        if key.objectid != dir || key.item_type != item::DIR_INDEX {
            break;
        }
        let data = block
            .item_data(slot)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        let items = DirItem::parse_all(data)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
        let Some(d) = items.into_iter().next() else {
            continue;
        };
        let target = resolve(fs, root, dir, &d)?;
        out.push(DirEntry {
            index: key.offset,
            name: d.name,
            file_type: d.file_type,
            target,
        });
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// `btrfs_get_dir_last_index`: the highest DIR_INDEX of `dir` now (1 when it has no entries,
/// so that nothing but "." and ".." is listed). readdir lists only entries up to the index
/// the directory had when it was opened (or rewound): an entry renamed during the listing
/// gets a new, higher index and would otherwise be returned twice.
pub fn last_dir_index(fs: &FsInfo, root: u64, dir: u64) -> Result<u64> {
    if dir == crate::inode::EMPTY_SUBVOL_DIR_OBJECTID {
        return Ok(1);
    }
    let _g = fs.read_guard();
    let r = fs.root(root)?;
    let last = ubtrfs_ctree::ctree::lookup_le(
        &fs.reader,
        &r.ptr,
        &Key::new(dir, item::DIR_INDEX, u64::MAX),
    )?;
    Ok(match last {
        Some((k, _)) if k.objectid == dir && k.item_type == item::DIR_INDEX => k.offset,
        _ => 1,
    })
}

/// `btrfs_insert_dir_item`: the DIR_ITEM (appended to a hash-collision item when one exists)
/// and the DIR_INDEX entry of `name` in `dir`.
#[allow(clippy::too_many_arguments)]
pub fn insert_dir_item(
    c: &mut crate::transaction::WriteCtx<'_>,
    root: u64,
    dir: u64,
    name: &[u8],
    location: Key,
    file_type: u8,
    index: u64,
) -> Result<()> {
    let transid = c.transid();
    let entry = DirItem {
        location,
        transid,
        file_type,
        name: name.to_vec(),
        data: Vec::new(),
    };
    let key = Key::new(dir, item::DIR_ITEM, name_hash(name));
    match c.lookup(root, &key)? {
        Some(existing) => {
            let items = DirItem::parse_all(&existing)
                .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?;
            if items.iter().any(|d| d.name == name) {
                return Err(FsError::Exists);
            }
            let mut data = existing;
            data.extend_from_slice(&entry.to_bytes());
            c.update(root, &key, &data)?;
        }
        None => c.insert(root, key, &entry.to_bytes())?,
    }
    c.insert(
        root,
        Key::new(dir, item::DIR_INDEX, index),
        &entry.to_bytes(),
    )
}

/// Whether `name` exists in `dir` (transaction view).
pub fn name_exists(
    c: &crate::transaction::WriteCtx<'_>,
    root: u64,
    dir: u64,
    name: &[u8],
) -> Result<bool> {
    let key = Key::new(dir, item::DIR_ITEM, name_hash(name));
    Ok(match c.lookup(root, &key)? {
        Some(d) => DirItem::parse_all(&d)
            .map_err(|e| FsError::corrupt(format!("root {root} {key}: {e}")))?
            .iter()
            .any(|x| x.name == name),
        None => false,
    })
}
