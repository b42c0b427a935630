//! fsync through the tree-log (the kernel's tree-log.c and file.c `btrfs_sync_file`);
//! KERNEL-SEMANTICS.md section 4 is the specification, ONDISK-NOTES.md B.12 the layout.
//!
//! # Definitions
//! - The *log tree* of a subvolume holds copies of the items an fsync made durable in the
//!   running transaction; the *log root tree* holds one ROOT_ITEM per logged subvolume and the
//!   primary superblock's `log_root` points at it after a log sync. Both die at the next
//!   transaction commit.
//! - *Fast path* (`btrfs_log_changed_extents`): the extents to log come from the inode's
//!   modified extent maps, handed out by the extent-map layer's logging pass (LOGGING set while
//!   each is copied). *Full path* (NEEDS_FULL_SYNC): every file extent item the running
//!   transaction wrote is copied from the subvolume tree.
//!
//! # Invariants
//! - An fsync that returns success made the inode item, its names (INODE_REF/EXTREF), its
//!   xattrs and every extent changed in the transaction durable, either in the log (log blocks
//!   written and flushed before the superblock points at them) or by a full commit.
//! - Log leaves never hold overlapping file extent items (items of a re-logged range are
//!   dropped first, with splitting), and every logged regular extent of a checksummed inode has
//!   its checksums in the log.
//! - Log trees hold no references and no extent items; their blocks are reserved, not used.
//! - Where the log cannot express a change (renames, unlinks and links of this transaction, a
//!   parent directory created in this transaction, too many modified extents, a logging
//!   error), fsync falls back to a full transaction commit and counts the reason.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use crate::file_write::{btrfs_drop_extents_in, btrfs_writeback};
use crate::transaction::{TreeSel, WriteCtx};
use ubtrfs_extent_map::{flags as em_flags, BtrfsInode, ExtentMap, LogError, EXTENT_MAP_HOLE};
use ubtrfs_format::items::{
    inode_flags, FileExtentItem, InodeItem, FILE_EXTENT_PREALLOC, FILE_EXTENT_REG,
};
use ubtrfs_format::key::{item, objectid, Key};

/// What an fsync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing of the inode changed since the last commit (`skip_inode_logging`).
    Skipped,
    /// The inode was logged and the log synced.
    Logged,
    /// A full transaction commit was needed, for this reason.
    FullCommit(&'static str),
}

/// `btrfs_sync_file` for a regular file or symlink of subvolume `root`.
pub fn btrfs_sync_file(fs: &FsInfo, root: u64, ino: u64) -> Result<SyncOutcome> {
    if fs.is_readonly() {
        return Ok(SyncOutcome::Skipped);
    }
    let emi = fs.ems.inode(root, ino);
    // start_ordered_ops before locking, then again for what was dirtied meanwhile.
    btrfs_writeback(fs, root, ino)?;
    let _inode_lock = emi.inode_lock().write();
    let _mmap_lock = emi.mmap_lock().write();
    btrfs_writeback(fs, root, ino)?;
    let full_sync = emi.needs_full_sync();
    let outcome = fs.write_op(|c| {
        let transid = c.transid();
        let ii = c.read_inode(root, ino)?;
        if ii.transid < transid && c.t.log.full_commit.is_none() {
            return Ok(SyncOutcome::Skipped);
        }
        if let Some(reason) = c.t.log.full_commit {
            return Ok(SyncOutcome::FullCommit(reason));
        }
        if let Some(reason) = needs_full_commit(c, root, ino, &ii)? {
            return Ok(SyncOutcome::FullCommit(reason));
        }
        match btrfs_log_inode(c, root, ino, &ii, &emi, full_sync) {
            Ok(None) => Ok(SyncOutcome::Logged),
            Ok(Some(reason)) => Ok(SyncOutcome::FullCommit(reason)),
            Err(e) => {
                // Any logging error: the log of this transaction can no longer be trusted.
                tracing::warn!(
                    "root {root} ino {ino}: logging failed ({e}); falling back to a full commit"
                );
                c.t.log.full_commit = Some("logging error");
                Ok(SyncOutcome::FullCommit("logging error"))
            }
        }
    })?;
    match outcome {
        SyncOutcome::Skipped => fs
            .counters
            .fsync_skipped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        SyncOutcome::Logged => {
            fs.sync_log()?;
            if full_sync {
                fs.counters
                    .fsync_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            } else {
                fs.counters
                    .fsync_fast
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            }
        }
        SyncOutcome::FullCommit(reason) => {
            tracing::debug!(target: "btrfs_sync_file", root, ino, reason, "full commit");
            fs.note_full_commit_reason(reason);
            fs.commit()?;
            fs.counters
                .fsync_full_commit
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        }
    };
    tracing::debug!(target: "btrfs_sync_file", root, ino, ?outcome, full_sync);
    Ok(outcome)
}

/// Cases the log of this implementation does not express (the kernel logs them with
/// `log_all_new_ancestors` and friends; ubtrfs commits instead, which is always correct).
fn needs_full_commit(
    c: &WriteCtx<'_>,
    root: u64,
    ino: u64,
    ii: &InodeItem,
) -> Result<Option<&'static str>> {
    let transid = c.transid();
    if ii.nlink == 0 {
        return Ok(Some("unlinked inode"));
    }
    if ii.generation == transid {
        // A new inode: replay recreates its name from the logged INODE_REF, which needs the
        // parent directory to exist in the committed tree.
        let refs = c.items(root, Key::new(ino, item::INODE_REF, 0), 64, |k| {
            k.objectid == ino && k.item_type <= item::INODE_EXTREF
        })?;
        if refs.iter().any(|(k, _)| k.item_type == item::INODE_EXTREF) {
            return Ok(Some("extended refs of a new inode"));
        }
        for (k, _) in refs {
            if k.offset != ino {
                let dir = c.read_inode(root, k.offset)?;
                if dir.generation == transid {
                    return Ok(Some("new ancestor"));
                }
            }
        }
    }
    Ok(None)
}

/// `btrfs_log_inode(LOG_INODE_ALL)` for a regular file or symlink. Returns a full-commit reason
/// when the fast path gives up (-EFBIG).
fn btrfs_log_inode(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    ii: &InodeItem,
    emi: &BtrfsInode,
    full_sync: bool,
) -> Result<Option<&'static str>> {
    let transid = c.transid();
    let log = TreeSel::Log(root);
    let datasum = ii.flags & inode_flags::NODATASUM == 0;
    // Drop what an earlier fsync of this transaction logged for the inode: everything in full
    // mode, the inode item, names and xattrs in fast mode (extents are replaced range by range).
    let upto = if full_sync { u8::MAX } else { item::XATTR_ITEM };
    let old = c.sel_items(log, Key::new(ino, item::INODE_ITEM, 0), usize::MAX, |k| {
        k.objectid == ino && k.item_type <= upto
    })?;
    for (k, _) in &old {
        c.sel_delete(log, k)?;
    }
    if full_sync {
        // The old logged extents had csums in the log: drop those of this inode's extents.
        for (k, d) in &old {
            if k.item_type == item::EXTENT_DATA {
                if let Ok(fe) = FileExtentItem::parse(d) {
                    if fe.extent_type != 0 && fe.disk_bytenr != 0 {
                        drop_log_csums(c, root, fe.disk_bytenr, fe.disk_num_bytes)?;
                    }
                }
            }
        }
    }
    // The inode item (nbytes is not logged: replay recomputes it), names and xattrs.
    let mut logged = *ii;
    logged.nbytes = 0;
    logged.transid = transid;
    c.sel_insert(log, Key::new(ino, item::INODE_ITEM, 0), &logged.to_bytes())?;
    let names = c.items(root, Key::new(ino, item::INODE_REF, 0), usize::MAX, |k| {
        k.objectid == ino && k.item_type <= item::XATTR_ITEM
    })?;
    for (k, d) in names {
        c.sel_insert(log, k, &d)?;
    }
    if full_sync {
        // copy_inode_items_to_log: every file extent item written in this transaction.
        let extents = c.items(root, Key::new(ino, item::EXTENT_DATA, 0), usize::MAX, |k| {
            k.objectid == ino && k.item_type == item::EXTENT_DATA
        })?;
        for (k, d) in extents {
            let fe = FileExtentItem::parse(&d)
                .map_err(|e| FsError::corrupt(format!("root {root} {k}: {e}")))?;
            if fe.generation < transid {
                continue;
            }
            c.sel_insert(log, k, &d)?;
            if datasum && fe.extent_type == FILE_EXTENT_REG && fe.disk_bytenr != 0 {
                let (s, l) = if fe.compression != 0 {
                    (fe.disk_bytenr, fe.disk_num_bytes)
                } else {
                    (fe.disk_bytenr + fe.offset, fe.num_bytes)
                };
                log_csums(c, root, s, l)?;
            }
        }
        emi.btrfs_log_inode_clear_modified_extents();
        emi.clear_runtime_flags(ubtrfs_extent_map::runtime_flags::NEEDS_FULL_SYNC);
        return Ok(None);
    }
    // Fast path: the modified extent maps, in start order, LOGGING set while each is copied.
    let r = emi.btrfs_log_changed_extents(transid, ii.size, |em: &ExtentMap| {
        log_one_extent(c, root, ino, em, datasum, transid)
    });
    match r {
        Ok(()) => Ok(None),
        Err(LogError::TooManyModified) => Ok(Some("too many modified extents")),
        Err(LogError::LogOneExtent(e)) => Err(e),
    }
}

/// `log_one_extent`: a file extent item built from the map, replacing whatever the log held for
/// that range, and its checksums.
fn log_one_extent(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    em: &ExtentMap,
    datasum: bool,
    transid: u64,
) -> Result<()> {
    let log = TreeSel::Log(root);
    btrfs_drop_extents_in(c, log, ino, em.start, em.end())?;
    let hole = em.disk_bytenr == EXTENT_MAP_HOLE;
    let prealloc = em.flags & em_flags::PREALLOC != 0;
    let compression = if em.flags & em_flags::COMPRESS_ZLIB != 0 {
        1
    } else if em.flags & em_flags::COMPRESS_LZO != 0 {
        2
    } else if em.flags & em_flags::COMPRESS_ZSTD != 0 {
        3
    } else {
        0
    };
    let fe = FileExtentItem {
        generation: transid,
        ram_bytes: if hole { em.len } else { em.ram_bytes },
        compression,
        encryption: 0,
        other_encoding: 0,
        extent_type: if prealloc {
            FILE_EXTENT_PREALLOC
        } else {
            FILE_EXTENT_REG
        },
        disk_bytenr: if hole { 0 } else { em.disk_bytenr },
        disk_num_bytes: if hole { 0 } else { em.disk_num_bytes },
        offset: if hole { 0 } else { em.offset },
        num_bytes: em.len,
        inline_data: Vec::new(),
    };
    c.sel_insert(
        log,
        Key::new(ino, item::EXTENT_DATA, em.start),
        &fe.to_bytes(),
    )?;
    if datasum && !hole && !prealloc {
        let (s, l) = if compression != 0 {
            (em.disk_bytenr, em.disk_num_bytes)
        } else {
            (em.block_start(), em.len)
        };
        log_csums(c, root, s, l)?;
    }
    Ok(())
}

/// Remove the log's checksums of `[start, start+len)` (`btrfs_del_csums` on the log root).
fn drop_log_csums(c: &mut WriteCtx<'_>, root: u64, start: u64, len: u64) -> Result<()> {
    let reader = &c.fs.reader;
    if !c.t.log.roots.contains_key(&root) {
        return Ok(());
    }
    Ok(c.t.modify_log_tree(reader, root, |w, r| {
        ubtrfs_ctree::extent_tree::delete_csums(w, r, start, len)
    })?)
}

/// `log_csums`: copy the checksums of `[start, start+len)` from the csum tree into the log,
/// replacing any the log held for that range.
fn log_csums(c: &mut WriteCtx<'_>, root: u64, start: u64, len: u64) -> Result<()> {
    let ss = u64::from(c.fs.sectorsize());
    let csize = c.fs.reader.csum_type.size();
    let nr = (len / ss) as usize;
    if nr == 0 {
        return Ok(());
    }
    // Collect from the transaction's csum tree.
    let mut sums: Vec<Option<Vec<u8>>> = vec![None; nr];
    let end = start + len;
    let first = match c.lookup_le(
        objectid::CSUM_TREE,
        &Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, start),
    )? {
        Some((k, _)) if k.objectid == objectid::EXTENT_CSUM && k.item_type == item::EXTENT_CSUM => {
            k.offset
        }
        _ => start,
    };
    let items = c.items(
        objectid::CSUM_TREE,
        Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, first),
        usize::MAX,
        |k| {
            k.objectid == objectid::EXTENT_CSUM
                && k.item_type == item::EXTENT_CSUM
                && k.offset < end
        },
    )?;
    for (k, d) in items {
        let n = (d.len() / csize) as u64;
        for i in 0..n {
            let sector = k.offset + i * ss;
            if sector >= start && sector < end {
                let idx = ((sector - start) / ss) as usize;
                sums[idx] = Some(d[(i as usize) * csize..(i as usize + 1) * csize].to_vec());
            }
        }
    }
    drop_log_csums(c, root, start, len)?;
    // Insert runs of present checksums, at most a quarter leaf per item.
    let per_item = ((c.fs.sb.nodesize as usize / 4) / csize).max(1);
    let mut i = 0;
    while i < nr {
        if sums[i].is_none() {
            i += 1;
            continue;
        }
        let mut body = Vec::new();
        let run_start = i;
        while i < nr && i - run_start < per_item {
            match &sums[i] {
                Some(s) => body.extend_from_slice(s),
                None => break,
            }
            i += 1;
        }
        let key = Key::new(
            objectid::EXTENT_CSUM,
            item::EXTENT_CSUM,
            start + run_start as u64 * ss,
        );
        c.sel_insert(TreeSel::Log(root), key, &body)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Replay (btrfs_recover_log_trees).

/// The items of one log tree, in key order.
type LogItems = Vec<(Key, Vec<u8>)>;

/// What a replay did, per stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayStats {
    pub log_trees: u64,
    pub log_blocks_pinned: u64,
    pub inodes: u64,
    pub names_added: u64,
    pub names_removed: u64,
    pub extents: u64,
    pub csum_items: u64,
    pub xattrs: u64,
    pub orphans: u64,
}

/// Every block of a tree (for pinning the log before replay allocates anything).
fn tree_blocks(fs: &FsInfo, root: &ubtrfs_ctree::RootPtr, out: &mut Vec<u64>) -> Result<()> {
    fn walk(
        fs: &FsInfo,
        bytenr: u64,
        gen: u64,
        level: u8,
        depth: usize,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        if depth > 8 || out.len() > 1_000_000 {
            return Err(FsError::corrupt("log tree too deep or too large"));
        }
        let b = fs.reader.read_tree_block(
            bytenr,
            ubtrfs_ctree::disk_io::BlockExpect {
                generation: Some(gen),
                level: Some(level),
                first_key: None,
                owner: Some(objectid::TREE_LOG),
            },
        )?;
        out.push(bytenr);
        if !b.is_leaf() {
            for i in 0..b.nritems() {
                let p = b
                    .key_ptr(i)
                    .map_err(|e| FsError::corrupt(format!("log block {bytenr}: {e}")))?;
                walk(fs, p.blockptr, p.generation, level - 1, depth + 1, out)?;
            }
        }
        Ok(())
    }
    walk(fs, root.bytenr, root.generation, root.level, 0, out)
}

fn all_items(fs: &FsInfo, root: ubtrfs_ctree::RootPtr) -> Result<Vec<(Key, Vec<u8>)>> {
    let mut out = Vec::new();
    for r in ubtrfs_ctree::TreeIter::new(&fs.reader, root, Key::new(0, 0, 0)) {
        let (k, b, s) = r?;
        out.push((
            k,
            b.item_data(s)
                .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?
                .to_vec(),
        ));
    }
    Ok(out)
}

/// `btrfs_recover_log_trees`: replay the log the superblock points at into the running
/// transaction. The caller commits (read-write) or serves the result from memory (read-only).
pub fn btrfs_recover_log_trees(c: &mut WriteCtx<'_>) -> Result<ReplayStats> {
    use ubtrfs_format::items::RootItem;
    let fs = c.fs;
    let sb = &fs.sb;
    let mut st = ReplayStats::default();
    let lrt = ubtrfs_ctree::RootPtr {
        bytenr: sb.log_root,
        level: sb.log_root_level,
        generation: sb.generation + 1,
        owner: objectid::TREE_LOG,
    };
    // Stage PIN_ONLY: log blocks stay reserved until the replay commits.
    let mut blocks = Vec::new();
    tree_blocks(fs, &lrt, &mut blocks)?;
    let mut logs = Vec::new();
    for (k, d) in all_items(fs, lrt)? {
        if k.objectid != objectid::TREE_LOG || k.item_type != item::ROOT_ITEM {
            continue;
        }
        let ri =
            RootItem::parse(&d).map_err(|e| FsError::corrupt(format!("log root item {k}: {e}")))?;
        let ptr = ubtrfs_ctree::RootPtr {
            bytenr: ri.bytenr,
            level: ri.level,
            generation: ri.generation,
            owner: objectid::TREE_LOG,
        };
        tree_blocks(fs, &ptr, &mut blocks)?;
        logs.push((k.offset, ptr));
    }
    let n = u64::from(fs.sb.nodesize);
    for &b in &blocks {
        c.t.space.claim_reserved(b, n)?;
        c.t.log.blocks.push(b);
    }
    st.log_blocks_pinned = blocks.len() as u64;
    // Data extents the log references that no committed extent item records: their space is
    // free in the committed free space tree; claim it before anything is allocated.
    let mut per_log: Vec<(u64, LogItems)> = Vec::new();
    for (subvol, ptr) in logs {
        let items = all_items(fs, ptr)?;
        for (k, d) in &items {
            if k.item_type != item::EXTENT_DATA {
                continue;
            }
            let fe = FileExtentItem::parse(d)
                .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
            if fe.extent_type == 0 || fe.disk_bytenr == 0 {
                continue;
            }
            let ek = Key::new(fe.disk_bytenr, item::EXTENT_ITEM, fe.disk_num_bytes);
            if c.lookup(objectid::EXTENT_TREE, &ek)?.is_none()
                && !c.t.space.is_claimed(fe.disk_bytenr, fe.disk_num_bytes)
            {
                c.t.space.claim(fe.disk_bytenr, fe.disk_num_bytes)?;
                c.t.space.mark_claimed(fe.disk_bytenr, fe.disk_num_bytes);
            }
        }
        per_log.push((subvol, items));
    }
    // Highest subvolume first, as the kernel walks the log root tree backwards.
    per_log.sort_by_key(|x| std::cmp::Reverse(x.0));
    for (subvol, items) in per_log {
        if c.t.root(subvol).is_none() {
            tracing::warn!("log of subvolume {subvol}: the subvolume is gone; skipped");
            continue;
        }
        st.log_trees += 1;
        replay_subvol(c, subvol, &items, &mut st)?;
    }
    c.t.space.clear_claimed();
    c.fs.next_ino.lock().clear();
    c.fs.next_index.lock().clear();
    Ok(st)
}

fn replay_subvol(
    c: &mut WriteCtx<'_>,
    root: u64,
    items: &[(Key, Vec<u8>)],
    st: &mut ReplayStats,
) -> Result<()> {
    use std::collections::{BTreeMap, BTreeSet};
    let ss = u64::from(c.fs.sectorsize());
    // Inodes the log describes, and those it says are gone (nlink 0: tmpfiles, unlinked).
    let mut inodes: BTreeMap<u64, InodeItem> = BTreeMap::new();
    for (k, d) in items {
        if k.item_type == item::INODE_ITEM && k.objectid != objectid::EXTENT_CSUM {
            let ii =
                InodeItem::parse(d).map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
            inodes.insert(k.objectid, ii);
        }
    }
    let skip: BTreeSet<u64> = inodes
        .iter()
        .filter(|(_, ii)| ii.nlink == 0)
        .map(|(i, _)| *i)
        .collect();
    let mut touched: BTreeSet<u64> = BTreeSet::new();
    // Stage REPLAY_INODES: inode items (overwrite_item).
    for (&ino, logged) in &inodes {
        if skip.contains(&ino) {
            continue;
        }
        let key = Key::new(ino, item::INODE_ITEM, 0);
        let existing = c.lookup(root, &key)?;
        let mut new = *logged;
        match existing {
            Some(d) => {
                let cur = InodeItem::parse(&d)
                    .map_err(|e| FsError::corrupt(format!("root {root} ino {ino}: {e}")))?;
                if logged.generation == 0 {
                    // LOG_INODE_EXISTS copy: keep the subvolume's item, adopt a logged size.
                    new = cur;
                    if logged.size != 0
                        && logged.mode & crate::inode::S_IFMT == crate::inode::S_IFREG
                    {
                        new.size = logged.size;
                    }
                } else {
                    new.nbytes = cur.nbytes;
                    if new.mode & crate::inode::S_IFMT == crate::inode::S_IFDIR {
                        new.size = cur.size;
                    }
                }
                c.update(root, &key, &new.to_bytes())?;
            }
            None => {
                new.nbytes = 0;
                if new.mode & crate::inode::S_IFMT == crate::inode::S_IFDIR {
                    new.size = 0;
                }
                c.insert(root, key, &new.to_bytes())?;
            }
        }
        touched.insert(ino);
        st.inodes += 1;
        // replay_xattr_deletes: the log holds every xattr of a logged inode; the subvolume's
        // others were removed before the fsync.
        let logged_x: BTreeSet<Key> = items
            .iter()
            .filter(|(k, _)| k.objectid == ino && k.item_type == item::XATTR_ITEM)
            .map(|(k, _)| *k)
            .collect();
        let have = c.items(root, Key::new(ino, item::XATTR_ITEM, 0), usize::MAX, |k| {
            k.objectid == ino && k.item_type == item::XATTR_ITEM
        })?;
        for (k, _) in have {
            if !logged_x.contains(&k) {
                c.delete(root, &k)?;
                st.xattrs += 1;
            }
        }
    }
    // Stage REPLAY_DIR_INDEX: directory entries (replay_one_name), and the index ranges the log
    // is authoritative for (replay_dir_deletes).
    let logged_index: BTreeSet<(u64, u64)> = items
        .iter()
        .filter(|(k, _)| k.item_type == item::DIR_INDEX)
        .map(|(k, _)| (k.objectid, k.offset))
        .collect();
    for (k, d) in items {
        if k.item_type != item::DIR_LOG_INDEX && k.item_type != item::DIR_LOG_ITEM {
            continue;
        }
        let last = ubtrfs_format::bytes::u64_at(d, 0, "dir log end")
            .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
        let dir = k.objectid;
        let existing = c.items(
            root,
            Key::new(dir, item::DIR_INDEX, k.offset),
            usize::MAX,
            |x| x.objectid == dir && x.item_type == item::DIR_INDEX && x.offset <= last,
        )?;
        for (ek, ed) in existing {
            if logged_index.contains(&(dir, ek.offset)) {
                continue;
            }
            let de = ubtrfs_format::items::DirItem::parse_all(&ed)
                .map_err(|e| FsError::corrupt(format!("{ek}: {e}")))?;
            if let Some(e) = de.first() {
                if e.location.item_type == item::INODE_ITEM {
                    remove_name(c, root, dir, e.location.objectid, &e.name, ek.offset)?;
                    touched.insert(e.location.objectid);
                    touched.insert(dir);
                    st.names_removed += 1;
                }
            }
        }
    }
    for (k, d) in items {
        if k.item_type != item::DIR_INDEX {
            continue;
        }
        let de = ubtrfs_format::items::DirItem::parse_all(d)
            .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
        let Some(e) = de.into_iter().next() else {
            continue;
        };
        if e.location.item_type != item::INODE_ITEM || skip.contains(&e.location.objectid) {
            continue;
        }
        let target = e.location.objectid;
        if c.lookup(root, &Key::new(target, item::INODE_ITEM, 0))?
            .is_none()
        {
            continue; // the target is neither committed nor logged
        }
        if add_name(c, root, k.objectid, target, &e.name, k.offset, e.file_type)? {
            st.names_added += 1;
        }
        touched.insert(target);
        touched.insert(k.objectid);
    }
    // Stage REPLAY_ALL: names from refs, xattrs, extents, checksums.
    for (k, d) in items {
        if skip.contains(&k.objectid) {
            continue;
        }
        match k.item_type {
            item::INODE_REF => {
                let ino = k.objectid;
                let parent = k.offset;
                let refs = ubtrfs_format::items::InodeRef::parse_all(d)
                    .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
                // Names the subvolume has under this parent that the log does not: gone.
                if let Some(cur) = c.lookup(root, k)? {
                    let cur = ubtrfs_format::items::InodeRef::parse_all(&cur)
                        .map_err(|e| FsError::corrupt(format!("{k}: {e}")))?;
                    for r in cur {
                        if !refs.iter().any(|x| x.name == r.name) {
                            remove_name(c, root, parent, ino, &r.name, r.index)?;
                            st.names_removed += 1;
                        }
                    }
                }
                let ft = inodes
                    .get(&ino)
                    .map(|ii| crate::inode::file_type_of(ii.mode))
                    .unwrap_or(ubtrfs_format::items::ft::REG_FILE);
                if parent != ino {
                    for r in &refs {
                        if add_name(c, root, parent, ino, &r.name, r.index, ft)? {
                            st.names_added += 1;
                        }
                    }
                }
                match c.lookup(root, k)? {
                    Some(_) => c.update(root, k, d)?,
                    None => c.insert(root, *k, d)?,
                }
                touched.insert(ino);
                touched.insert(parent);
            }
            item::INODE_EXTREF => {
                let ino = k.objectid;
                let refs = ubtrfs_format::items::InodeExtref::parse_all(d)
                    .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
                let ft = inodes
                    .get(&ino)
                    .map(|ii| crate::inode::file_type_of(ii.mode))
                    .unwrap_or(ubtrfs_format::items::ft::REG_FILE);
                for r in &refs {
                    if add_name(c, root, r.parent, ino, &r.name, r.index, ft)? {
                        st.names_added += 1;
                    }
                    touched.insert(r.parent);
                }
                match c.lookup(root, k)? {
                    Some(_) => c.update(root, k, d)?,
                    None => c.insert(root, *k, d)?,
                }
                touched.insert(ino);
            }
            item::XATTR_ITEM => {
                match c.lookup(root, k)? {
                    Some(cur) if cur == *d => {}
                    Some(_) => c.update(root, k, d)?,
                    None => c.insert(root, *k, d)?,
                }
                st.xattrs += 1;
            }
            item::EXTENT_DATA => {
                replay_one_extent(c, root, k, d, st)?;
                touched.insert(k.objectid);
            }
            item::EXTENT_CSUM if k.objectid == objectid::EXTENT_CSUM => {
                let n = (d.len() / c.fs.reader.csum_type.size()) as u64;
                // The range is deleted from the csum tree before the item is copied: it must be
                // a real one (the tree-checker does not look at csum items).
                if n == 0 || !k.offset.is_multiple_of(ss) || k.offset.checked_add(n * ss).is_none()
                {
                    return Err(FsError::corrupt(format!(
                        "log item {k}: {} bytes of checksums do not make a valid range",
                        d.len()
                    )));
                }
                let reader = &c.fs.reader;
                c.t.modify_tree(reader, objectid::CSUM_TREE, |w, r| {
                    ubtrfs_ctree::extent_tree::delete_csums(w, r, k.offset, n * ss)
                })?;
                c.insert(objectid::CSUM_TREE, *k, d)?;
                st.csum_items += 1;
            }
            _ => {}
        }
    }
    // Regular files end at their logged size: extents beyond it are dropped.
    for (&ino, logged) in &inodes {
        if skip.contains(&ino)
            || logged.generation == 0
            || logged.mode & crate::inode::S_IFMT != crate::inode::S_IFREG
        {
            continue;
        }
        let from = logged.size.checked_next_multiple_of(ss).ok_or_else(|| {
            FsError::corrupt(format!(
                "log of root {root}: inode {ino} size {} overflows",
                logged.size
            ))
        })?;
        let dropped = btrfs_drop_extents_in(c, TreeSel::Fs(root), ino, from, u64::MAX)?;
        if dropped.bytes_found > 0 {
            let mut ii = c.read_inode(root, ino)?;
            ii.nbytes = ii.nbytes.saturating_sub(dropped.bytes_found);
            c.write_inode(root, ino, &ii)?;
        }
    }
    // fixup_inode_link_counts: nlink is the number of names; directory sizes follow entries.
    for ino in touched {
        let Ok(mut ii) = c.read_inode(root, ino) else {
            continue;
        };
        if ii.mode & crate::inode::S_IFMT == crate::inode::S_IFDIR {
            let entries = c.items(root, Key::new(ino, item::DIR_INDEX, 0), usize::MAX, |k| {
                k.objectid == ino && k.item_type == item::DIR_INDEX
            })?;
            let mut size = 0u64;
            for (_, d) in &entries {
                for e in ubtrfs_format::items::DirItem::parse_all(d)
                    .map_err(|e| FsError::corrupt(format!("dir {ino}: {e}")))?
                {
                    size += 2 * e.name.len() as u64;
                }
            }
            if ii.size != size || ii.nlink != 1 {
                ii.size = size;
                ii.nlink = 1;
                c.write_inode(root, ino, &ii)?;
            }
            continue;
        }
        let names = count_names(c, root, ino)?;
        if names == 0 {
            // The kernel inserts an orphan item; orphan cleanup deletes the inode.
            let ok = Key::new(objectid::ORPHAN, item::ORPHAN_ITEM, ino);
            if c.lookup(root, &ok)?.is_none() {
                c.insert(root, ok, &[])?;
                st.orphans += 1;
            }
        }
        if ii.nlink != names as u32 {
            ii.nlink = names as u32;
            c.write_inode(root, ino, &ii)?;
        }
    }
    Ok(())
}

fn count_names(c: &WriteCtx<'_>, root: u64, ino: u64) -> Result<u64> {
    let mut n = 0u64;
    for (k, d) in c.items(root, Key::new(ino, item::INODE_REF, 0), usize::MAX, |k| {
        k.objectid == ino && k.item_type <= item::INODE_EXTREF
    })? {
        n += if k.item_type == item::INODE_REF {
            ubtrfs_format::items::InodeRef::parse_all(&d)
                .map_err(|e| FsError::corrupt(format!("{k}: {e}")))?
                .len() as u64
        } else {
            ubtrfs_format::items::InodeExtref::parse_all(&d)
                .map_err(|e| FsError::corrupt(format!("{k}: {e}")))?
                .len() as u64
        };
    }
    Ok(n)
}

/// Add `name` -> `ino` in `dir` at `index` unless it is there. True if added.
fn add_name(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    name: &[u8],
    index: u64,
    ft: u8,
) -> Result<bool> {
    if crate::dir_item::name_exists(c, root, dir, name)? {
        return Ok(false);
    }
    if c.lookup(root, &Key::new(dir, item::DIR_INDEX, index))?
        .is_some()
    {
        return Err(FsError::corrupt(format!(
            "root {root} dir {dir}: replay needs index {index} which is taken"
        )));
    }
    crate::dir_item::insert_dir_item(
        c,
        root,
        dir,
        name,
        Key::new(ino, item::INODE_ITEM, 0),
        ft,
        index,
    )?;
    let mut d = c.read_inode(root, dir)?;
    d.size += 2 * name.len() as u64;
    c.write_inode(root, dir, &d)?;
    Ok(true)
}

/// Remove the entry `name` (index `index`) of `dir` that points at `ino`, with its back
/// reference (what replay does to names the log says are gone).
fn remove_name(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    name: &[u8],
    index: u64,
) -> Result<()> {
    use ubtrfs_format::items::{DirItem, InodeRef};
    let hk = Key::new(dir, item::DIR_ITEM, ubtrfs_format::csum::name_hash(name));
    if let Some(d) = c.lookup(root, &hk)? {
        let all = DirItem::parse_all(&d).map_err(|e| FsError::corrupt(format!("{hk}: {e}")))?;
        let rest: Vec<u8> = all
            .iter()
            .filter(|e| e.name != name)
            .flat_map(|e| e.to_bytes())
            .collect();
        if rest.is_empty() {
            c.delete(root, &hk)?;
        } else {
            c.update(root, &hk, &rest)?;
        }
    }
    let ik = Key::new(dir, item::DIR_INDEX, index);
    if c.lookup(root, &ik)?.is_some() {
        c.delete(root, &ik)?;
    }
    let rk = Key::new(ino, item::INODE_REF, dir);
    if let Some(d) = c.lookup(root, &rk)? {
        let all = InodeRef::parse_all(&d).map_err(|e| FsError::corrupt(format!("{rk}: {e}")))?;
        let rest: Vec<u8> = all
            .iter()
            .filter(|r| r.name != name)
            .flat_map(|r| r.to_bytes())
            .collect();
        if rest.is_empty() {
            c.delete(root, &rk)?;
        } else {
            c.update(root, &rk, &rest)?;
        }
    }
    if let Ok(mut dd) = c.read_inode(root, dir) {
        dd.size = dd.size.saturating_sub(2 * name.len() as u64);
        c.write_inode(root, dir, &dd)?;
    }
    Ok(())
}

/// `replay_one_extent`.
fn replay_one_extent(
    c: &mut WriteCtx<'_>,
    root: u64,
    k: &Key,
    d: &[u8],
    st: &mut ReplayStats,
) -> Result<()> {
    let ss = u64::from(c.fs.sectorsize());
    let ino = k.objectid;
    if c.lookup(root, &Key::new(ino, item::INODE_ITEM, 0))?
        .is_none()
    {
        return Ok(()); // the inode does not exist (not logged, not committed)
    }
    let fe =
        FileExtentItem::parse(d).map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
    if c.lookup(root, k)?.as_deref() == Some(d) {
        return Ok(()); // identical item already there
    }
    let end = if fe.extent_type == 0 {
        k.offset
            .checked_add(fe.ram_bytes)
            .and_then(|e| e.checked_next_multiple_of(ss))
            .ok_or_else(|| {
                FsError::corrupt(format!(
                    "log item {k}: inline ram_bytes {} overflows",
                    fe.ram_bytes
                ))
            })?
    } else {
        k.offset + fe.num_bytes
    };
    let no_holes = c.fs.sb.incompat_flags & ubtrfs_format::super_block::incompat::NO_HOLES != 0;
    let dropped = btrfs_drop_extents_in(c, TreeSel::Fs(root), ino, k.offset, end)?;
    let mut added = 0;
    if fe.extent_type != 0 && fe.disk_bytenr == 0 && no_holes {
        // An explicit hole item on a no-holes filesystem: the drop did the work.
    } else {
        c.insert(root, *k, d)?;
        if fe.extent_type != 0 && fe.disk_bytenr != 0 {
            c.t.refs.add(
                fe.disk_bytenr,
                fe.disk_num_bytes,
                ubtrfs_ctree::extent_tree::RefKind::Data {
                    root,
                    ino,
                    offset: k.offset.wrapping_sub(fe.offset),
                },
                1,
            );
            added = fe.num_bytes;
        } else if fe.extent_type == 0 {
            added = fe.ram_bytes;
        }
    }
    let mut ii = c.read_inode(root, ino)?;
    // nbytes of the subvolume's inode is disk data: saturate rather than wrap.
    ii.nbytes = ii
        .nbytes
        .saturating_sub(dropped.bytes_found)
        .saturating_add(added);
    c.write_inode(root, ino, &ii)?;
    st.extents += 1;
    Ok(())
}
