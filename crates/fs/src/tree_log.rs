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
//! - *LOG_INODE_ALL* logs everything of an inode that changed in the transaction (for a
//!   directory: its new DIR_INDEX items and DIR_LOG_INDEX ranges); *LOG_INODE_EXISTS* logs
//!   just enough to recreate it: the inode item with generation 0 (replay keeps an existing
//!   inode's item), its names and xattrs.
//! - A *DIR_LOG_INDEX range* `(dir, 72, first) -> last` says the log is authoritative for the
//!   directory's indexes `first..=last`: replay deletes every entry of that range the log
//!   does not hold (`replay_dir_deletes`).
//! - Per-inode log state lives with the transaction (`LogState::inodes`, the kernel's
//!   `logged_trans == transid`; `LogState::last_unlink`, its `last_unlink_trans == transid`).
//!
//! # Invariants
//! - An fsync that returns success made the inode item, its names (INODE_REF/EXTREF), its
//!   xattrs and every extent changed in the transaction durable, either in the log (log blocks
//!   written and flushed before the superblock points at them) or by a full commit.
//! - Every name the log adds at replay leads to an inode that exists after replay (committed,
//!   or logged: new ancestors and the inodes of new dentries are logged LOG_INODE_EXISTS).
//! - A DIR_LOG_INDEX range never covers a committed entry that still exists and is not in the
//!   log: ranges stop at every unchanged (older) index item (`log_directory_changes`).
//! - An index removed from a logged directory in this transaction is covered by a range or
//!   removed from the log (`btrfs_del_dir_entries_in_log`, `btrfs_log_new_name`).
//! - Log leaves never hold overlapping file extent items (items of a re-logged range are
//!   dropped first, with splitting), and every logged regular extent of a checksummed inode has
//!   its checksums in the log.
//! - Log trees hold no references and no extent items; their blocks are reserved, not used.
//! - Where the log cannot express a change, fsync falls back to a full transaction commit and
//!   counts the reason; every such fallback also marks the transaction (`full_commit`) so that
//!   no later log sync makes a half-written log durable.
//!
//! # Full-commit reasons (each one the kernel's too, counted in `full_commit_reasons`)
//! "directory with an entry renamed away" (full logging of a directory whose
//! `last_unlink_trans` a rename set), "old parent directory deleted", "extended refs of a
//! logged inode" (-EMLINK of `log_new_ancestors`), "ancestor without a name", "too many
//! conflicting inodes" (> MAX_CONFLICT_INODES), "conflicting directory with unlinks",
//! "conflicting name in a deleted directory", "too many modified extents" (-EFBIG),
//! "too many inodes to log" (a bound of ours on recursive new-dentry logging), "logging
//! error", "log update error" (a namespace hook could not update the log), "log sync error",
//! "new block group" (a chunk allocated in the transaction: `btrfs_make_block_group`).
//!
//! # Locks and skips of `btrfs_sync_file`
//! The inode lock and the mmap lock are taken exclusively while the inode is logged and
//! dropped before the log sync (or the full commit). An O_DSYNC/O_SYNC direct write
//! (direct_io.rs) holds the inode lock and fsyncs through `btrfs_sync_file_dio`, which takes
//! only the mmap lock (`skip_ilock`). The skips, in the kernel's order: an inode already in the
//! log (`btrfs_inode_in_log`: logged in full in this transaction since its last change, and
//! that change's log transid synced; the `last_sub_trans` / `last_log_commit` per inode live
//! in `LogState`), then an inode unchanged since the last commit, then an unlinked one.
//!
//! # Log syncs
//! `btrfs_sync_log` ([`FsInfo::sync_log`]) takes the log transid an fsync logged into; one
//! that another fsync's sync already made durable returns at once (counted as batched).
//! Log blocks are written under the tree lock, the flushes and the superblock after it; why
//! that replaces the kernel's LOG1/LOG2 parity is in [`FsInfo::sync_log`]'s docs.
//!
//! # Renamed entries of a logged directory
//! As in the kernel, a file renamed into a directory from another one and logged as that
//! directory's new dentry is logged LOG_INODE_EXISTS under its new name only: replay shows it
//! under both names, link count 2. The `log_rename_unlink` mount option also logs the removal
//! of the old name (`log_removed_names`).

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use crate::file_write::{btrfs_drop_extents_in, btrfs_writeback};
use crate::inode::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use crate::transaction::{TreeSel, WriteCtx};
use ubtrfs_ctree::ctree::RootPtr;
use ubtrfs_extent_map::{flags as em_flags, BtrfsInode, ExtentMap, LogError, EXTENT_MAP_HOLE};
use ubtrfs_format::items::{
    inode_flags, DirItem, FileExtentItem, InodeExtref, InodeItem, InodeRef, FILE_EXTENT_PREALLOC,
    FILE_EXTENT_REG,
};
use ubtrfs_format::key::{item, objectid, Key};

/// What an fsync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing of the inode changed since the last commit (`skip_inode_logging`), or there is
    /// nothing to make durable (an unlinked inode: `BTRFS_NO_LOG_SYNC`).
    Skipped,
    /// The inode was logged and the log synced.
    Logged,
    /// A full transaction commit was needed, for this reason.
    FullCommit(&'static str),
}

/// `LOG_INODE_ALL` / `LOG_INODE_EXISTS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogMode {
    All,
    Exists,
}

/// `MAX_CONFLICT_INODES`: more conflicting inodes than this and fsync commits instead.
const MAX_CONFLICT_INODES: usize = 10;

/// Bound on the inodes one fsync logs (new dentries are logged recursively); past it the
/// fsync commits instead.
const MAX_LOGGED_INODES: usize = 100_000;

/// `struct btrfs_log_ctx`, the parts this implementation needs.
#[derive(Default)]
struct LogCtx {
    /// The last full directory logging logged dentries pointing at inodes.
    log_new_dentries: bool,
    /// Conflicting inodes found while logging names: (inode, parent directory).
    conflicts: Vec<(u64, u64)>,
    /// Set while `log_conflicting_inodes` runs (names are checked then even for old inodes).
    logging_conflict_inodes: bool,
    /// Set for `btrfs_log_new_name`: the inode is logged to update its names.
    logging_new_name: bool,
    /// Inodes logged by this operation.
    logged: usize,
}

fn fmt_of(ii: &InodeItem) -> u32 {
    ii.mode & S_IFMT
}

fn corrupt(root: u64, k: &Key, e: impl std::fmt::Display) -> FsError {
    FsError::corrupt(format!("root {root} {k}: {e}"))
}

/// `btrfs_sync_file` for an inode of subvolume `root`: a regular file, a symlink or a
/// directory (fsyncdir comes here too, as in the kernel where both are `btrfs_sync_file`).
/// Takes the inode lock and the mmap lock exclusively (`btrfs_inode_lock(BTRFS_ILOCK_MMAP)`)
/// while it logs, and syncs the log (or commits) after dropping them.
pub fn btrfs_sync_file(fs: &FsInfo, root: u64, ino: u64) -> Result<SyncOutcome> {
    sync_file(fs, root, ino, false)
}

/// `btrfs_sync_file` called from an O_DSYNC/O_SYNC direct write (`iomap_dio_complete` →
/// `generic_write_sync` with `current->journal_info == BTRFS_TRANS_DIO_WRITE_STUB`): the
/// write holds the inode lock (`ilock` is its guard), so only the mmap lock is taken
/// (`skip_ilock`). Everything else is the ordinary fsync. Counted in `fsync_dio` too.
pub(crate) fn btrfs_sync_file_dio(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    ilock: &InodeLockGuard<'_>,
) -> Result<SyncOutcome> {
    // btrfs_assert_inode_locked: the guard must be this inode's.
    let emi = fs.ems.inode(root, ino);
    if !std::ptr::eq(
        parking_lot::RwLockWriteGuard::rwlock(ilock),
        emi.inode_lock(),
    ) {
        return Err(FsError::Invalid(format!(
            "root {root} ino {ino}: direct-write fsync without the inode's lock"
        )));
    }
    fs.counters
        .fsync_dio
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sync_file(fs, root, ino, true)
}

/// The exclusive inode lock of a write (`inode_lock`), as a direct write holds it.
pub type InodeLockGuard<'a> = parking_lot::RwLockWriteGuard<'a, ()>;

fn sync_file(fs: &FsInfo, root: u64, ino: u64, skip_ilock: bool) -> Result<SyncOutcome> {
    if fs.is_readonly() {
        return Ok(SyncOutcome::Skipped);
    }
    let emi = fs.ems.inode(root, ino);
    // start_ordered_ops before locking, then again for what was dirtied meanwhile.
    btrfs_writeback(fs, root, ino)?;
    let inode_lock = (!skip_ilock).then(|| emi.inode_lock().write());
    let mmap_lock = emi.mmap_lock().write();
    btrfs_writeback(fs, root, ino)?;
    if let Some(t) = &fs.trans {
        if t.lock().log.full_sync_on_load.remove(&(root, ino)) {
            emi.btrfs_set_inode_full_sync();
        }
    }
    let full_sync = emi.needs_full_sync();
    let mut ticket = (0, 0);
    let mut in_log = false;
    let outcome = fs.write_op(|c| {
        let transid = c.transid();
        // skip_inode_logging, first rule: already in the log with nothing changed since
        // (no ordered extents can be pending here: writeback above completed them).
        if c.t.log.inode_in_log(root, ino) {
            in_log = true;
            return Ok(SyncOutcome::Skipped);
        }
        let ii = c.read_inode(root, ino)?;
        if let Some(reason) = c.t.log.full_commit {
            if ii.transid < transid {
                return Ok(SyncOutcome::Skipped);
            }
            return Ok(SyncOutcome::FullCommit(reason));
        }
        if ii.transid < transid {
            return Ok(SyncOutcome::Skipped);
        }
        if ii.nlink == 0 {
            // btrfs_log_inode_parent: a link count of 0 means the inode will never be
            // reachable again; logging it is pointless (BTRFS_NO_LOG_SYNC).
            return Ok(SyncOutcome::Skipped);
        }
        let mut ctx = LogCtx::default();
        let r = btrfs_log_inode_parent(c, root, ino, LogMode::All, Some(&emi), full_sync, &mut ctx);
        match r {
            Ok(None) => {
                // start_log_trans: the log transid this fsync's items belong to.
                ticket = (transid, c.t.log.log_transid);
                Ok(SyncOutcome::Logged)
            }
            Ok(Some(reason)) => {
                // btrfs_set_log_full_commit: the log may hold a part of this fsync's items.
                c.t.log.full_commit.get_or_insert(reason);
                Ok(SyncOutcome::FullCommit(reason))
            }
            Err(e) => {
                // Any logging error: the log of this transaction can no longer be trusted.
                tracing::warn!(
                    "root {root} ino {ino}: logging failed ({e}); falling back to a full commit"
                );
                c.t.log.full_commit = Some("logging error");
                Ok(SyncOutcome::FullCommit("logging error"))
            }
        }
    });
    // The log is consistent on disk once synced; the log sync and any commit run with the
    // inode unlocked (btrfs_inode_unlock before btrfs_sync_log).
    drop(mmap_lock);
    drop(inode_lock);
    // No metadata space to log into (the reservation refused before anything changed): the
    // commit, which may use the global reserve, makes the data durable instead.
    let outcome = match outcome {
        Err(FsError::NoSpace) => SyncOutcome::FullCommit("no space for the log"),
        other => other?,
    };
    match outcome {
        SyncOutcome::Skipped => {
            if in_log {
                fs.counters
                    .fsync_skipped_in_log
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            fs.counters
                .fsync_skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        }
        SyncOutcome::Logged => {
            if fs.sync_log(ticket.0, ticket.1)? {
                fs.counters
                    .fsync_batched
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
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
    tracing::debug!(target: "btrfs_sync_file", root, ino, ?outcome, full_sync, skip_ilock);
    Ok(outcome)
}

/// The tree of subvolume `root` as the last commit left it (`path->search_commit_root`).
fn commit_root(c: &WriteCtx<'_>, root: u64) -> Result<Option<RootPtr>> {
    let (bytenr, level, generation) = {
        let sb = c.fs.sb_live.lock();
        (sb.root, sb.root_level, sb.generation)
    };
    let tree_root = RootPtr {
        bytenr,
        level,
        generation,
        owner: objectid::ROOT_TREE,
    };
    let found = ubtrfs_ctree::ctree::lookup_le(
        &c.fs.reader,
        &tree_root,
        &Key::new(root, item::ROOT_ITEM, u64::MAX),
    )?;
    let Some((k, d)) = found else {
        return Ok(None);
    };
    if k.objectid != root || k.item_type != item::ROOT_ITEM {
        return Ok(None);
    }
    let ri = ubtrfs_format::items::RootItem::parse(&d).map_err(|e| corrupt(1, &k, e))?;
    Ok(Some(RootPtr {
        bytenr: ri.bytenr,
        level: ri.level,
        generation: ri.generation,
        owner: root,
    }))
}

/// Items of the commit root of `root` from `start` while `keep` holds.
fn commit_root_items(
    c: &WriteCtx<'_>,
    root: u64,
    start: Key,
    keep: impl Fn(&Key) -> bool,
) -> Result<Vec<(Key, Vec<u8>)>> {
    let Some(r) = commit_root(c, root)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for it in ubtrfs_ctree::TreeIter::new(&c.fs.reader, r, start) {
        let (k, b, s) = it?;
        if !keep(&k) {
            break;
        }
        out.push((
            k,
            b.item_data(s).map_err(|e| corrupt(root, &k, e))?.to_vec(),
        ));
    }
    Ok(out)
}

/// The (parent, name) pairs of an INODE_REF or INODE_EXTREF item.
fn ref_names(root: u64, k: &Key, d: &[u8]) -> Result<Vec<(u64, Vec<u8>, u64)>> {
    Ok(if k.item_type == item::INODE_REF {
        InodeRef::parse_all(d)
            .map_err(|e| corrupt(root, k, e))?
            .into_iter()
            .map(|r| (k.offset, r.name, r.index))
            .collect()
    } else {
        InodeExtref::parse_all(d)
            .map_err(|e| corrupt(root, k, e))?
            .into_iter()
            .map(|r| (r.parent, r.name, r.index))
            .collect()
    })
}

/// `need_log_inode`: unmodified directories and inodes already logged in this transaction
/// need no (re)logging as other inodes (their name changes update the log directly).
///
/// A directory counts as logged only once logged in full: one logged LOG_INODE_EXISTS (a new
/// ancestor, the old directory of a renamed dentry) has none of its entries in the log.
fn need_log_inode(c: &WriteCtx<'_>, root: u64, ino: u64, ii: &InodeItem) -> bool {
    if fmt_of(ii) == S_IFDIR && ii.transid < c.transid() {
        return false;
    }
    match c.t.log.inodes.get(&(root, ino)) {
        None => true,
        Some(l) => fmt_of(ii) == S_IFDIR && !l.all,
    }
}

/// The names `ino` had at the last commit and has no more (renamed away in this
/// transaction): each old directory gets a one-index DIR_LOG_INDEX range, with its inode item
/// (LOG_INODE_EXISTS) if the log has none, so replay removes the old entry.
///
/// Only with the `log_rename_unlink` option, for a renamed inode logged as a new dentry of
/// another directory. The kernel does not do this (`log_new_dir_dentries` logs such an inode
/// LOG_INODE_EXISTS and never its old parents): its replay shows the inode under both names
/// with a link count of 2, a state that never existed, and that is the default here too. The
/// log stays in the kernel's format with the option; the kernel's replay of it removes the old
/// name too.
fn log_removed_names(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    let keep = |k: &Key| k.objectid == ino && k.item_type <= item::INODE_EXTREF;
    let old = commit_root_items(c, root, Key::new(ino, item::INODE_REF, 0), keep)?;
    if old.is_empty() {
        return Ok(None);
    }
    let mut cur = Vec::new();
    for (k, d) in c.items(root, Key::new(ino, item::INODE_REF, 0), usize::MAX, keep)? {
        cur.extend(ref_names(root, &k, &d)?);
    }
    for (k, d) in old {
        for (p, name, idx) in ref_names(root, &k, &d)? {
            if p == ino
                || cur
                    .iter()
                    .any(|(cp, cn, ci)| *cp == p && *cn == name && *ci == idx)
            {
                continue;
            }
            match c.read_inode(root, p) {
                Ok(_) => {}
                Err(FsError::NotFound) => return Ok(Some("old parent directory deleted")),
                Err(e) => return Err(e),
            }
            if !c.t.log.inodes.contains_key(&(root, p)) {
                if let Some(r) = btrfs_log_inode(c, root, p, LogMode::Exists, None, false, ctx)? {
                    return Ok(Some(r));
                }
            }
            insert_dir_log_key(c, root, p, idx, idx)?;
        }
    }
    Ok(None)
}

/// `btrfs_log_inode_parent`: log the inode, then the other inodes the kernel logs with it
/// (old parents after an unlink or rename, new ancestors, the inodes of new dentries).
/// Returns a full-commit reason where the kernel returns BTRFS_LOG_FORCE_COMMIT.
fn btrfs_log_inode_parent(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    mode: LogMode,
    emi: Option<&BtrfsInode>,
    full_sync: bool,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    let transid = c.transid();
    if let Some(r) = btrfs_log_inode(c, root, ino, mode, emi, full_sync, ctx)? {
        return Ok(Some(r));
    }
    let ii = c.read_inode(root, ino)?;
    let unlinked = c.t.log.last_unlink.contains(&(root, ino));
    // A regular file that is on disk and kept its names needs nothing of its parents.
    if fmt_of(&ii) == S_IFREG && ii.generation < transid && !unlinked {
        return Ok(None);
    }
    let log_dentries = fmt_of(&ii) == S_IFDIR && ctx.log_new_dentries;
    if unlinked {
        if let Some(r) = btrfs_log_all_parents(c, root, ino, ctx)? {
            return Ok(Some(r));
        }
    }
    if let Some(r) = log_all_new_ancestors(c, root, ino, ctx)? {
        return Ok(Some(r));
    }
    if log_dentries {
        return log_new_dir_dentries(c, root, ino, ctx);
    }
    Ok(None)
}

/// `btrfs_log_all_parents`: every parent the inode had at the last commit is logged in full,
/// so that names removed from them replay as removed. A parent that no longer exists forces a
/// commit (the kernel's example: a file moved out of a directory that was then replaced).
fn btrfs_log_all_parents(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    let refs = commit_root_items(c, root, Key::new(ino, item::INODE_REF, 0), |k| {
        k.objectid == ino && k.item_type <= item::INODE_EXTREF
    })?;
    let mut parents = Vec::new();
    for (k, d) in &refs {
        for (p, _, _) in ref_names(root, k, d)? {
            if !parents.contains(&p) {
                parents.push(p);
            }
        }
    }
    for p in parents {
        if p == ino {
            continue;
        }
        let pii = match c.read_inode(root, p) {
            Ok(x) => x,
            Err(FsError::NotFound) => return Ok(Some("old parent directory deleted")),
            Err(e) => return Err(e),
        };
        if !need_log_inode(c, root, p, &pii) {
            continue;
        }
        ctx.log_new_dentries = false;
        if let Some(r) = btrfs_log_inode(c, root, p, LogMode::All, None, false, ctx)? {
            return Ok(Some(r));
        }
        if ctx.log_new_dentries {
            if let Some(r) = log_new_dir_dentries(c, root, p, ctx)? {
                return Ok(Some(r));
            }
        }
    }
    Ok(None)
}

/// `log_all_new_ancestors`: every ancestor directory created in this transaction is logged
/// LOG_INODE_EXISTS, up every path of the inode's current names, so replay can recreate the
/// path. Extended refs are not walked (the kernel's -EMLINK: commit).
fn log_all_new_ancestors(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    let transid = c.transid();
    let refs = c.items(root, Key::new(ino, item::INODE_REF, 0), usize::MAX, |k| {
        k.objectid == ino && k.item_type <= item::INODE_EXTREF
    })?;
    if refs.iter().any(|(k, _)| k.item_type == item::INODE_EXTREF) {
        return Ok(Some("extended refs of a logged inode"));
    }
    for (k, _) in refs {
        let mut p = k.offset;
        let mut cur = ino;
        for _ in 0..4096 {
            if p == cur {
                break; // the subvolume root's reference to itself
            }
            let pii = c.read_inode(root, p)?;
            if pii.generation >= transid && need_log_inode(c, root, p, &pii) {
                if let Some(r) = btrfs_log_inode(c, root, p, LogMode::Exists, None, false, ctx)? {
                    return Ok(Some(r));
                }
            }
            let up = c.items(root, Key::new(p, item::INODE_REF, 0), 1, |k| {
                k.objectid == p && k.item_type == item::INODE_REF
            })?;
            let Some((uk, _)) = up.into_iter().next() else {
                return Ok(Some("ancestor without a name"));
            };
            cur = p;
            p = uk.offset;
        }
    }
    Ok(None)
}

/// `log_new_dir_dentries`: the inodes the directory's logged entries point at are logged
/// (directories LOG_INODE_ALL, recursively; others LOG_INODE_EXISTS), so every replayed
/// name leads to an inode with a matching link count.
fn log_new_dir_dentries(
    c: &mut WriteCtx<'_>,
    root: u64,
    start: u64,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    let mut work = vec![start];
    while let Some(dir) = work.pop() {
        let logged = c.sel_items(
            TreeSel::Log(root),
            Key::new(dir, item::DIR_INDEX, 0),
            usize::MAX,
            |k| k.objectid == dir && k.item_type == item::DIR_INDEX,
        )?;
        for (k, d) in logged {
            let Some(e) = DirItem::parse_all(&d)
                .map_err(|e| corrupt(root, &k, e))?
                .into_iter()
                .next()
            else {
                continue;
            };
            if e.location.item_type != item::INODE_ITEM {
                continue; // a subvolume entry
            }
            let x = e.location.objectid;
            let xii = match c.read_inode(root, x) {
                Ok(ii) => ii,
                Err(FsError::NotFound) => continue,
                Err(e) => return Err(e),
            };
            if !need_log_inode(c, root, x, &xii) {
                continue;
            }
            let is_dir = fmt_of(&xii) == S_IFDIR;
            let mode = if is_dir {
                LogMode::All
            } else {
                LogMode::Exists
            };
            ctx.log_new_dentries = false;
            if let Some(r) = btrfs_log_inode(c, root, x, mode, None, false, ctx)? {
                return Ok(Some(r));
            }
            if is_dir && ctx.log_new_dentries {
                work.push(x);
            }
            if !is_dir && c.fs.options.log_rename_unlink && c.t.log.last_unlink.contains(&(root, x))
            {
                if let Some(r) = log_removed_names(c, root, x, ctx)? {
                    return Ok(Some(r));
                }
            }
        }
    }
    Ok(None)
}

/// `btrfs_check_ref_name_override`: a name of the inode that, in the commit root, belongs to
/// another inode (replaced by a rename, or freed and reused). That inode must be logged too,
/// or replay would leave the old name's inode behind.
fn check_ref_name_override(
    c: &WriteCtx<'_>,
    root: u64,
    ino: u64,
    parent: u64,
    name: &[u8],
) -> Result<Option<u64>> {
    let Some(r) = commit_root(c, root)? else {
        return Ok(None);
    };
    let key = Key::new(parent, item::DIR_ITEM, ubtrfs_format::csum::name_hash(name));
    let Some(d) = ubtrfs_ctree::ctree::lookup_item(&c.fs.reader, &r, &key)? else {
        return Ok(None);
    };
    for e in DirItem::parse_all(&d).map_err(|e| corrupt(root, &key, e))? {
        if e.name == name && e.location.item_type == item::INODE_ITEM && e.location.objectid != ino
        {
            return Ok(Some(e.location.objectid));
        }
    }
    Ok(None)
}

/// `log_conflicting_inodes`: conflicting inodes that still exist are logged LOG_INODE_EXISTS
/// (their own names checked in turn); for one that was deleted, the directory of the name
/// is logged in full so the old entry replays as deleted. More than MAX_CONFLICT_INODES:
/// commit.
fn log_conflicting_inodes(
    c: &mut WriteCtx<'_>,
    root: u64,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    if ctx.logging_conflict_inodes {
        return Ok(None);
    }
    ctx.logging_conflict_inodes = true;
    let mut seen = 0usize;
    let r = (|| {
        while let Some((other, parent)) = ctx.conflicts.pop() {
            seen += 1;
            if seen > MAX_CONFLICT_INODES {
                return Ok(Some("too many conflicting inodes"));
            }
            match c.read_inode(root, other) {
                Ok(oii) if oii.nlink > 0 => {
                    if fmt_of(&oii) == S_IFDIR && c.t.log.last_unlink.contains(&(root, other)) {
                        return Ok(Some("conflicting directory with unlinks"));
                    }
                    if !c.t.log.inodes.contains_key(&(root, other)) {
                        if let Some(r) =
                            btrfs_log_inode(c, root, other, LogMode::Exists, None, false, ctx)?
                        {
                            return Ok(Some(r));
                        }
                    }
                }
                Ok(_) | Err(FsError::NotFound) => {
                    let pii = match c.read_inode(root, parent) {
                        Ok(p) => p,
                        Err(FsError::NotFound) => {
                            return Ok(Some("conflicting name in a deleted directory"))
                        }
                        Err(e) => return Err(e),
                    };
                    if need_log_inode(c, root, parent, &pii) {
                        if let Some(r) =
                            btrfs_log_inode(c, root, parent, LogMode::All, None, false, ctx)?
                        {
                            return Ok(Some(r));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    })();
    ctx.logging_conflict_inodes = false;
    ctx.conflicts.clear();
    r
}

/// The size a LOG_INODE_EXISTS copy of a regular file carries (`get_inode_size_to_log`): what
/// the log already says, else what the last commit says, never more than i_size; 0 for an
/// inode new in this transaction.
fn inode_size_to_log(c: &WriteCtx<'_>, root: u64, ino: u64, ii: &InodeItem) -> Result<u64> {
    let key = Key::new(ino, item::INODE_ITEM, 0);
    let found = if c.t.log.inodes.contains_key(&(root, ino)) {
        c.sel_lookup(TreeSel::Log(root), &key)?
    } else if ii.generation < c.transid() {
        match commit_root(c, root)? {
            Some(r) => ubtrfs_ctree::ctree::lookup_item(&c.fs.reader, &r, &key)?,
            None => None,
        }
    } else {
        return Ok(0);
    };
    let Some(d) = found else {
        return Ok(0);
    };
    let logged = InodeItem::parse(&d).map_err(|e| corrupt(root, &key, e))?;
    Ok(logged.size.min(ii.size))
}

/// `btrfs_log_inode` in LOG_INODE_ALL or LOG_INODE_EXISTS mode, for any inode type. `emi` is
/// the in-memory inode of an fsynced regular file (fast path); without it, a file logged in
/// full mode copies every extent item of this transaction. Returns a full-commit reason where
/// the kernel gives up.
#[allow(clippy::too_many_arguments)]
fn btrfs_log_inode(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    mode: LogMode,
    emi: Option<&BtrfsInode>,
    full_sync: bool,
    ctx: &mut LogCtx,
) -> Result<Option<&'static str>> {
    ctx.logged += 1;
    if ctx.logged > MAX_LOGGED_INODES {
        return Ok(Some("too many inodes to log"));
    }
    let transid = c.transid();
    let log = TreeSel::Log(root);
    let ii = c.read_inode(root, ino)?;
    let fmt = fmt_of(&ii);
    let is_dir = fmt == S_IFDIR;
    // Symlinks are always logged in full: their target is an inline extent.
    let mode = if fmt == S_IFLNK { LogMode::All } else { mode };
    // Logging a directory that had an entry renamed away: the new place of that entry cannot
    // be found from here, so the log could lose it.
    if is_dir && mode == LogMode::All && c.t.log.last_unlink.contains(&(root, ino)) {
        return Ok(Some("directory with an entry renamed away"));
    }
    let datasum = ii.flags & inode_flags::NODATASUM == 0;
    // Symlinks have no modified extent maps (the inline extent is written at creation): their
    // items are copied, as the kernel's NEEDS_FULL_SYNC of a new inode does.
    let copy_extents =
        !is_dir && mode == LogMode::All && (full_sync || emi.is_none() || fmt == S_IFLNK);
    let logged_size = if fmt == S_IFREG && mode == LogMode::Exists {
        inode_size_to_log(c, root, ino, &ii)?
    } else {
        0
    };
    // Drop what an earlier logging of this transaction wrote for the inode: everything when
    // its extents are copied anew, else the inode item, names and xattrs (fast-path extents
    // are replaced range by range; directory entries by log_directory_changes).
    let upto = if copy_extents {
        u8::MAX
    } else {
        item::XATTR_ITEM
    };
    let old = c.sel_items(log, Key::new(ino, item::INODE_ITEM, 0), usize::MAX, |k| {
        k.objectid == ino
            && k.item_type <= upto
            && k.item_type != item::DIR_LOG_INDEX
            && k.item_type != item::DIR_INDEX
    })?;
    for (k, _) in &old {
        c.sel_delete(log, k)?;
    }
    if copy_extents {
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
    // The inode item (fill_inode_item; nbytes is not logged: replay recomputes it).
    let mut logged = ii;
    logged.nbytes = 0;
    logged.transid = transid;
    if mode == LogMode::Exists {
        logged.generation = 0;
        logged.size = logged_size;
    }
    c.sel_insert(log, Key::new(ino, item::INODE_ITEM, 0), &logged.to_bytes())?;
    // Names and xattrs.
    let names = c.items(root, Key::new(ino, item::INODE_REF, 0), usize::MAX, |k| {
        k.objectid == ino && k.item_type <= item::XATTR_ITEM
    })?;
    let check_names = ii.generation == transid || ctx.logging_conflict_inodes;
    for (k, d) in names {
        if check_names && (k.item_type == item::INODE_REF || k.item_type == item::INODE_EXTREF) {
            for (parent, name, _) in ref_names(root, &k, &d)? {
                if parent == ino {
                    continue;
                }
                if let Some(other) = check_ref_name_override(c, root, ino, parent, &name)? {
                    if !ctx.conflicts.contains(&(other, parent)) {
                        ctx.conflicts.push((other, parent));
                    }
                }
            }
        }
        c.sel_insert(log, k, &d)?;
    }
    let mut reason = None;
    if is_dir {
        if mode == LogMode::All {
            log_directory_changes(c, root, ino, ctx)?;
        }
    } else if copy_extents {
        // copy_inode_items_to_log: every file extent item written in this transaction.
        let extents = c.items(root, Key::new(ino, item::EXTENT_DATA, 0), usize::MAX, |k| {
            k.objectid == ino && k.item_type == item::EXTENT_DATA
        })?;
        for (k, d) in extents {
            let fe = FileExtentItem::parse(&d).map_err(|e| corrupt(root, &k, e))?;
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
        if let Some(emi) = emi {
            emi.btrfs_log_inode_clear_modified_extents();
            emi.clear_runtime_flags(ubtrfs_extent_map::runtime_flags::NEEDS_FULL_SYNC);
        }
    } else if mode == LogMode::All {
        if let Some(emi) = emi {
            // Fast path: the modified extent maps, in start order, LOGGING set while each is
            // copied.
            let r = emi.btrfs_log_changed_extents(transid, ii.size, |em: &ExtentMap| {
                log_one_extent(c, root, ino, em, datasum, transid)
            });
            match r {
                Ok(()) => {}
                Err(LogError::TooManyModified) => reason = Some("too many modified extents"),
                Err(LogError::LogOneExtent(e)) => return Err(e),
            }
        }
    }
    if reason.is_some() {
        return Ok(reason);
    }
    // logged_trans = transid; last_log_commit = last_sub_trans, except for LOG_INODE_EXISTS
    // and new-name logging (the kernel's three reasons in btrfs_log_inode).
    let sub =
        c.t.log
            .last_sub_trans
            .get(&(root, ino))
            .copied()
            .unwrap_or(0);
    let e = c.t.log.inodes.entry((root, ino)).or_default();
    e.all |= mode == LogMode::All;
    if mode == LogMode::All && !ctx.logging_new_name {
        e.last_log_commit = Some(sub);
    }
    if !ctx.conflicts.is_empty() && !ctx.logging_new_name {
        return log_conflicting_inodes(c, root, ctx);
    }
    if ctx.logging_new_name {
        ctx.conflicts.clear();
    }
    Ok(None)
}

/// `log_directory_changes` / `log_dir_items`: the directory's DIR_INDEX items written in this
/// transaction, and DIR_LOG_INDEX ranges covering them and every index removed in this
/// transaction, so that replay both adds and deletes entries.
///
/// Older entries are boundaries: a range never covers one (it is not in the log, so replay
/// would delete it). As in the kernel, only the neighbourhood of changed leaves needs ranges
/// (a removal rewrites the leaf that held the entry): a gap between two older entries gets a
/// range when it holds a logged entry, when a leaf around it changed in this transaction, or
/// when the two entries are in different leaves (a whole leaf may have gone). The gap after
/// the last older entry always gets one (it ends at u64::MAX).
///
/// Whatever an earlier fsync of this transaction logged for the directory is dropped first
/// and derived again from the current entries.
fn log_directory_changes(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ctx: &mut LogCtx,
) -> Result<()> {
    /// BTRFS_DIR_START_INDEX.
    const DIR_START_INDEX: u64 = 2;
    let transid = c.transid();
    let log = TreeSel::Log(root);
    let old = c.sel_items(
        log,
        Key::new(dir, item::DIR_LOG_INDEX, 0),
        usize::MAX,
        |k| k.objectid == dir && k.item_type <= item::DIR_INDEX,
    )?;
    for (k, _) in old {
        if k.item_type == item::DIR_LOG_INDEX || k.item_type == item::DIR_INDEX {
            c.sel_delete(log, &k)?;
        }
    }
    let mut to_log: Vec<(Key, Vec<u8>)> = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    // The last older entry (DIR_START_INDEX - 1 before the first), its leaf, and what the
    // gap after it has seen so far.
    let mut prev_old = DIR_START_INDEX - 1;
    let mut prev_leaf: Option<u64> = None;
    let mut gap_dirty = false;
    let mut gap_logged = false;
    let start = Key::new(dir, item::DIR_INDEX, 0);
    for it in ubtrfs_ctree::TreeIter::new(&c.fs.reader, c.root_ptr(root)?, start) {
        let (k, b, s) = it?;
        if k.objectid != dir || k.item_type != item::DIR_INDEX {
            break;
        }
        let changed = b.header.generation >= transid;
        if changed {
            let data = b.item_data(s).map_err(|e| corrupt(root, &k, e))?;
            let e = DirItem::parse_all(data)
                .map_err(|e| corrupt(root, &k, e))?
                .into_iter()
                .next()
                .ok_or_else(|| corrupt(root, &k, "empty DIR_INDEX item"))?;
            if e.transid >= transid {
                if e.location.item_type == item::INODE_ITEM {
                    ctx.log_new_dentries = true;
                }
                to_log.push((k, data.to_vec()));
                gap_logged = true;
                gap_dirty = true;
                continue;
            }
        }
        let leaf = b.header.bytenr;
        let emit = gap_dirty || gap_logged || changed || prev_leaf != Some(leaf);
        if emit && k.offset > prev_old + 1 {
            ranges.push((prev_old + 1, k.offset - 1));
        }
        prev_old = k.offset;
        prev_leaf = Some(leaf);
        gap_dirty = changed;
        gap_logged = false;
    }
    if prev_old < u64::MAX {
        ranges.push((prev_old + 1, u64::MAX));
    }
    for (k, d) in to_log {
        c.sel_insert(log, k, &d)?;
    }
    for (first, last) in ranges {
        insert_dir_log_key(c, root, dir, first, last)?;
    }
    Ok(())
}

/// `insert_dir_log_key`: the log is authoritative for `dir`'s indexes `first..=last`. An
/// existing range item with the same start keeps the larger end.
fn insert_dir_log_key(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    first: u64,
    last: u64,
) -> Result<()> {
    let log = TreeSel::Log(root);
    let key = Key::new(dir, item::DIR_LOG_INDEX, first);
    match c.sel_lookup(log, &key)? {
        Some(d) => {
            let cur = ubtrfs_format::bytes::u64_at(&d, 0, "dir log end")
                .map_err(|e| corrupt(root, &key, e))?;
            c.sel_update(log, &key, &last.max(cur).to_le_bytes())
        }
        None => c.sel_insert(log, key, &last.to_le_bytes()),
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks of the namespace operations (inode.rs), run inside their write operation. Like the
// kernel's, they never fail the operation: a log they cannot update is marked for a full
// commit instead.

/// `btrfs_record_unlink_dir`: called before a name of `ino` in `dir` is removed (unlink,
/// rmdir, rename). The inode's parents must be logged when it is fsynced; for a rename, if
/// neither the directory nor the inode was logged, a later full logging of the directory
/// cannot find the entry's new place and must commit instead.
pub(crate) fn btrfs_record_unlink_dir(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    for_rename: bool,
) {
    c.t.log.last_unlink.insert((root, ino));
    if !for_rename {
        return;
    }
    if c.t.log.inodes.contains_key(&(root, dir)) || c.t.log.inodes.contains_key(&(root, ino)) {
        return;
    }
    c.t.log.last_unlink.insert((root, dir));
}

/// The rmdir part of `btrfs_rmdir`: a removed directory's `last_unlink_trans` passes to its
/// parent (`btrfs_record_snapshot_destroy`).
pub(crate) fn btrfs_propagate_unlink_trans(c: &mut WriteCtx<'_>, root: u64, dir: u64, ino: u64) {
    if c.t.log.last_unlink.contains(&(root, ino)) {
        c.t.log.last_unlink.insert((root, dir));
    }
}

/// `btrfs_del_dir_entries_in_log`: `name` (index `index`) left `dir`; if the directory was
/// logged in this transaction, the log must not bring it back. The logged entry is deleted;
/// if the log has none (an older entry), a one-index range records the deletion.
pub(crate) fn btrfs_del_dir_entries_in_log(c: &mut WriteCtx<'_>, root: u64, dir: u64, index: u64) {
    if !c.t.log.inodes.contains_key(&(root, dir)) {
        return;
    }
    if let Err(e) = del_logged_dentry(c, root, dir, index) {
        tracing::warn!("root {root} dir {dir}: updating the log for a removed entry: {e}");
        c.t.log.full_commit.get_or_insert("log update error");
    }
}

/// `del_logged_dentry`, plus the one-index range of `btrfs_log_new_name` when the entry is
/// not in the log.
fn del_logged_dentry(c: &mut WriteCtx<'_>, root: u64, dir: u64, index: u64) -> Result<()> {
    let key = Key::new(dir, item::DIR_INDEX, index);
    if c.sel_lookup(TreeSel::Log(root), &key)?.is_some() {
        c.sel_delete(TreeSel::Log(root), &key)?;
        // A range covers every logged entry, so the deletion replays.
        return Ok(());
    }
    insert_dir_log_key(c, root, dir, index, index)
}

/// `btrfs_del_inode_ref_in_log`: `name` of `ino` in `dir` is gone; if the inode was logged
/// in this transaction, its logged back reference loses the name.
pub(crate) fn btrfs_del_inode_ref_in_log(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    dir: u64,
    name: &[u8],
) {
    if !c.t.log.inodes.contains_key(&(root, ino)) {
        return;
    }
    let r = (|| -> Result<()> {
        let log = TreeSel::Log(root);
        let key = Key::new(ino, item::INODE_REF, dir);
        if let Some(d) = c.sel_lookup(log, &key)? {
            let all = InodeRef::parse_all(&d).map_err(|e| corrupt(root, &key, e))?;
            let rest: Vec<u8> = all
                .iter()
                .filter(|r| r.name != name)
                .flat_map(|r| r.to_bytes())
                .collect();
            if rest.is_empty() {
                c.sel_delete(log, &key)?;
            } else if rest.len() != d.len() {
                c.sel_update(log, &key, &rest)?;
            }
            return Ok(());
        }
        // The name may be in a logged extended ref: not edited here.
        let ext = c.sel_items(log, Key::new(ino, item::INODE_EXTREF, 0), 1, |k| {
            k.objectid == ino && k.item_type == item::INODE_EXTREF
        })?;
        if !ext.is_empty() {
            return Err(FsError::Unsupported("extended refs in the log".into()));
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!("root {root} ino {ino}: updating the log for a removed name: {e}");
        c.t.log.full_commit.get_or_insert("log update error");
    }
}

/// `btrfs_log_new_name`: after a link or rename added a name of `ino` in `new_parent`. If the
/// inode or (for a rename) its old directory was logged in this transaction, the log is
/// updated: the old entry leaves the old directory's log, and the inode is logged
/// LOG_INODE_EXISTS with its current names (and new ancestors). `old` is (old directory, old
/// index) of a rename.
pub(crate) fn btrfs_log_new_name(
    c: &mut WriteCtx<'_>,
    root: u64,
    ino: u64,
    is_dir: bool,
    old: Option<(u64, u64)>,
) {
    if !is_dir {
        c.t.log.last_unlink.insert((root, ino));
    }
    let inode_logged = c.t.log.inodes.contains_key(&(root, ino));
    let old_dir_logged = old
        .map(|(d, _)| c.t.log.inodes.contains_key(&(root, d)))
        .unwrap_or(false);
    if !inode_logged && !old_dir_logged {
        return;
    }
    let r = (|| -> Result<Option<&'static str>> {
        if let Some((old_dir, old_index)) = old {
            if old_dir_logged {
                del_logged_dentry(c, root, old_dir, old_index)?;
            }
        }
        let mut ctx = LogCtx {
            logging_new_name: true,
            ..LogCtx::default()
        };
        btrfs_log_inode_parent(c, root, ino, LogMode::Exists, None, false, &mut ctx)
    })();
    match r {
        Ok(None) => {}
        Ok(Some(reason)) => {
            c.t.log.full_commit.get_or_insert(reason);
        }
        Err(e) => {
            tracing::warn!("root {root} ino {ino}: logging a new name: {e}");
            c.t.log.full_commit.get_or_insert("log update error");
        }
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
                if new.generation == 0 {
                    // A LOG_INODE_EXISTS copy of an inode the subvolume does not have: the
                    // generation is filled in (overwrite_item).
                    new.generation = c.transid();
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
        if add_name(
            c,
            root,
            k.objectid,
            target,
            &e.name,
            k.offset,
            e.file_type,
            &mut touched,
        )? {
            st.names_added += 1;
            // replay_one_name adds the back reference unless the log has it (the ref stage
            // below then writes the logged one).
            let logged_ref = items.iter().any(|(rk, rd)| {
                rk.objectid == target
                    && ((rk.item_type == item::INODE_REF && rk.offset == k.objectid)
                        || rk.item_type == item::INODE_EXTREF)
                    && ref_names(root, rk, rd)
                        .map(|v| v.iter().any(|(p, n, _)| *p == k.objectid && *n == e.name))
                        .unwrap_or(false)
            });
            if !logged_ref && name_index(c, root, k.objectid, target, &e.name)?.is_none() {
                crate::inode::insert_inode_ref(c, root, target, k.objectid, &e.name, k.offset)?;
            }
        }
        touched.insert(target);
        touched.insert(k.objectid);
    }
    // Stage REPLAY_ALL: names from refs, xattrs, extents, checksums.
    // Disk ranges whose checksums replay takes from the log: those the replayed extents
    // reference (replay_one_extent looks up the log's csums per extent). The log may hold
    // stale checksums of extents an earlier fsync logged and a later one replaced.
    let mut csum_ranges: Vec<(u64, u64)> = Vec::new();
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
                // add_inode_ref: a parent that exists neither committed nor logged (a new
                // directory that was not logged) is skipped with its names.
                if c.lookup(root, &Key::new(parent, item::INODE_ITEM, 0))?
                    .is_none()
                {
                    continue;
                }
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
                        if add_name(c, root, parent, ino, &r.name, r.index, ft, &mut touched)? {
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
                let mut parents_exist = true;
                for r in &refs {
                    if c.lookup(root, &Key::new(r.parent, item::INODE_ITEM, 0))?
                        .is_none()
                    {
                        parents_exist = false;
                    }
                }
                if !parents_exist {
                    continue; // as add_inode_ref does at the first missing parent
                }
                let ft = inodes
                    .get(&ino)
                    .map(|ii| crate::inode::file_type_of(ii.mode))
                    .unwrap_or(ubtrfs_format::items::ft::REG_FILE);
                for r in &refs {
                    if add_name(c, root, r.parent, ino, &r.name, r.index, ft, &mut touched)? {
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
                let in_subvol = replay_one_extent(c, root, k, d, st)?;
                touched.insert(k.objectid);
                let fe = FileExtentItem::parse(d)
                    .map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
                if in_subvol && fe.extent_type == FILE_EXTENT_REG && fe.disk_bytenr != 0 {
                    let (s, l) = if fe.compression != 0 {
                        (fe.disk_bytenr, fe.disk_num_bytes)
                    } else {
                        (fe.disk_bytenr.saturating_add(fe.offset), fe.num_bytes)
                    };
                    csum_ranges.push((s, s.saturating_add(l)));
                }
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
                let csize = c.fs.reader.csum_type.size() as u64;
                let (item_start, item_end) = (k.offset, k.offset + n * ss);
                for &(rs, re) in &csum_ranges {
                    let ps = rs.max(item_start).next_multiple_of(ss);
                    let pe = re.min(item_end);
                    if ps >= pe {
                        continue;
                    }
                    let pe = ps + (pe - ps).div_ceil(ss) * ss;
                    let from = ((ps - item_start) / ss * csize) as usize;
                    let to = ((pe.min(item_end) - item_start) / ss * csize) as usize;
                    let reader = &c.fs.reader;
                    c.t.modify_tree(reader, objectid::CSUM_TREE, |w, r| {
                        ubtrfs_ctree::extent_tree::delete_csums(w, r, ps, pe - ps)
                    })?;
                    c.insert(
                        objectid::CSUM_TREE,
                        Key::new(objectid::EXTENT_CSUM, item::EXTENT_CSUM, ps),
                        &d[from..to],
                    )?;
                    st.csum_items += 1;
                }
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
    // A directory left without a name loses its entries (their inodes are fixed up in turn)
    // and gets an orphan item, as a file does.
    let mut pending = touched;
    let mut rounds = 0usize;
    while let Some(ino) = pending.pop_first() {
        rounds += 1;
        if rounds > 10_000_000 {
            return Err(FsError::corrupt(format!(
                "log of root {root}: link count fixup does not converge"
            )));
        }
        let Ok(mut ii) = c.read_inode(root, ino) else {
            continue;
        };
        let names = count_names(c, root, ino)?;
        if names == 0 {
            // The kernel inserts an orphan item; orphan cleanup deletes the inode.
            let ok = Key::new(objectid::ORPHAN, item::ORPHAN_ITEM, ino);
            if c.lookup(root, &ok)?.is_none() {
                c.insert(root, ok, &[])?;
                st.orphans += 1;
            }
        }
        if ii.mode & crate::inode::S_IFMT == crate::inode::S_IFDIR {
            let entries = c.items(root, Key::new(ino, item::DIR_INDEX, 0), usize::MAX, |k| {
                k.objectid == ino && k.item_type == item::DIR_INDEX
            })?;
            if names == 0 {
                for (k, d) in &entries {
                    for e in ubtrfs_format::items::DirItem::parse_all(d)
                        .map_err(|e| FsError::corrupt(format!("dir {ino}: {e}")))?
                    {
                        if e.location.item_type == item::INODE_ITEM {
                            remove_name(c, root, ino, e.location.objectid, &e.name, k.offset)?;
                            st.names_removed += 1;
                            pending.insert(e.location.objectid);
                        }
                    }
                }
                let mut ii = c.read_inode(root, ino)?;
                if ii.nlink != 0 || ii.size != 0 {
                    ii.nlink = 0;
                    ii.size = 0;
                    c.write_inode(root, ino, &ii)?;
                }
                continue;
            }
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

/// The index of the name `name` of `ino` in `dir`, from its back reference.
fn name_index(c: &WriteCtx<'_>, root: u64, dir: u64, ino: u64, name: &[u8]) -> Result<Option<u64>> {
    for (k, d) in c.items(root, Key::new(ino, item::INODE_REF, dir), usize::MAX, |k| {
        k.objectid == ino
            && ((k.item_type == item::INODE_REF && k.offset == dir)
                || k.item_type == item::INODE_EXTREF)
    })? {
        for (p, n, index) in ref_names(root, &k, &d)? {
            if p == dir && n == name {
                return Ok(Some(index));
            }
        }
    }
    Ok(None)
}

/// The DIR_INDEX of `dir` holding `name` -> `ino` (a scan of the directory's index items).
fn index_of_entry(
    c: &WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    name: &[u8],
) -> Result<Option<u64>> {
    for (k, d) in c.items(root, Key::new(dir, item::DIR_INDEX, 0), usize::MAX, |k| {
        k.objectid == dir && k.item_type == item::DIR_INDEX
    })? {
        for e in DirItem::parse_all(&d).map_err(|e| corrupt(root, &k, e))? {
            if e.name == name && e.location.objectid == ino {
                return Ok(Some(k.offset));
            }
        }
    }
    Ok(None)
}

/// Add `name` -> `ino` in `dir` at `index` unless it is there (`replay_one_name` /
/// `__add_inode_ref`): an entry of that name for another inode or at another index, and
/// another entry at that index, are removed first (their inodes go to `touched` for the link
/// count fixup). True if added.
#[allow(clippy::too_many_arguments)]
fn add_name(
    c: &mut WriteCtx<'_>,
    root: u64,
    dir: u64,
    ino: u64,
    name: &[u8],
    index: u64,
    ft: u8,
    touched: &mut std::collections::BTreeSet<u64>,
) -> Result<bool> {
    let hk = Key::new(dir, item::DIR_ITEM, ubtrfs_format::csum::name_hash(name));
    if let Some(d) = c.lookup(root, &hk)? {
        let all = DirItem::parse_all(&d).map_err(|e| corrupt(root, &hk, e))?;
        if let Some(e) = all.into_iter().find(|e| e.name == name) {
            if e.location.item_type != item::INODE_ITEM {
                return Err(FsError::corrupt(format!(
                    "root {root} dir {dir}: replay of {:?} collides with a subvolume entry",
                    String::from_utf8_lossy(name)
                )));
            }
            let other = e.location.objectid;
            // The entry's index: from the back reference, else (an entry added by the dir
            // index stage whose logged back reference is not copied yet) from the index items.
            let cur = match name_index(c, root, dir, other, name)? {
                Some(i) => Some(i),
                None => index_of_entry(c, root, dir, other, name)?,
            };
            if other == ino && cur == Some(index) {
                return Ok(false);
            }
            let ci = cur.ok_or_else(|| {
                FsError::corrupt(format!(
                    "root {root} dir {dir}: entry {:?} has no index item",
                    String::from_utf8_lossy(name)
                ))
            })?;
            remove_name(c, root, dir, other, name, ci)?;
            touched.insert(other);
        }
    }
    let ik = Key::new(dir, item::DIR_INDEX, index);
    if let Some(d) = c.lookup(root, &ik)? {
        let e = DirItem::parse_all(&d)
            .map_err(|e| corrupt(root, &ik, e))?
            .into_iter()
            .next()
            .ok_or_else(|| corrupt(root, &ik, "empty DIR_INDEX item"))?;
        if e.location.item_type != item::INODE_ITEM {
            return Err(FsError::corrupt(format!(
                "root {root} dir {dir}: replay needs index {index}, held by a subvolume entry"
            )));
        }
        remove_name(c, root, dir, e.location.objectid, &e.name, index)?;
        touched.insert(e.location.objectid);
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

/// `replay_one_extent`. Returns whether the subvolume now holds the logged extent item (false
/// when its inode exists neither committed nor logged).
fn replay_one_extent(
    c: &mut WriteCtx<'_>,
    root: u64,
    k: &Key,
    d: &[u8],
    st: &mut ReplayStats,
) -> Result<bool> {
    let ss = u64::from(c.fs.sectorsize());
    let ino = k.objectid;
    if c.lookup(root, &Key::new(ino, item::INODE_ITEM, 0))?
        .is_none()
    {
        return Ok(false); // the inode does not exist (not logged, not committed)
    }
    let fe =
        FileExtentItem::parse(d).map_err(|e| FsError::corrupt(format!("log item {k}: {e}")))?;
    if c.lookup(root, k)?.as_deref() == Some(d) {
        return Ok(true); // identical item already there
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
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk_io::MountOptions;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    fn image(name: &str) -> std::path::PathBuf {
        let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).unwrap();
        let img = base.join(format!("tree-log-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&img);
        crate::mkfs::mkfs(
            &img,
            &crate::mkfs::MkfsOptions {
                size: Some(256 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        img
    }

    // Test scenario: two threads fsync two different files while a third holds the log sync
    // mutex (a log sync in progress). Both log into the same log transid; when the mutex is
    // released one of them syncs the log and the other finds its log transid committed:
    //
    //   holder               thread A                 thread B
    //   lock log_sync_mutex
    //                        log a (log transid 0)
    //                        wait for the mutex       log b (log transid 0)
    //                                                 wait for the mutex
    //   unlock
    //                        sync: writes a and b
    //                                                 transid 0 committed: batched
    //
    // One log sync, one batched fsync, and a replay shows both files.
    #[test]
    fn concurrent_fsyncs_share_one_log_sync() {
        let img = image("batch");
        let opts = MountOptions {
            readonly: false,
            commit_interval: 3600,
            ..MountOptions::default()
        };
        {
            let fs = Arc::new(FsInfo::open(&img, opts.clone()).unwrap());
            let root = fs.mount_root;
            let dir = fs.root(root).unwrap().item.root_dirid;
            let mut inos = Vec::new();
            for name in [&b"a"[..], b"b"] {
                let (ino, _) =
                    crate::inode::btrfs_new_inode(&fs, root, dir, name, 0o100644, 0, 0, 0).unwrap();
                inos.push(ino);
            }
            fs.sync().unwrap();
            for (i, &ino) in inos.iter().enumerate() {
                crate::file_write::btrfs_buffered_write(&fs, root, ino, 0, &[i as u8 + 1; 5000])
                    .unwrap();
            }
            let held = fs.log_sync_mutex.lock();
            let threads: Vec<_> = inos
                .iter()
                .map(|&ino| {
                    let fs = fs.clone();
                    std::thread::spawn(move || btrfs_sync_file(&fs, root, ino).unwrap())
                })
                .collect();
            // Wait until both inodes are in the log (bounded: 10 s).
            let logged = |fs: &FsInfo| {
                let t = fs.trans.as_ref().unwrap().lock();
                inos.iter().all(|&i| t.log.inodes.contains_key(&(root, i)))
            };
            let start = std::time::Instant::now();
            while !logged(&fs) {
                assert!(start.elapsed().as_secs() < 10, "the fsyncs did not log");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(held);
            for t in threads {
                assert_eq!(t.join().unwrap(), SyncOutcome::Logged);
            }
            assert_eq!(fs.counters.log_syncs.load(Relaxed), 1);
            assert_eq!(fs.counters.fsync_batched.load(Relaxed), 1);
            // Crash: no commit.
        }
        let fs = FsInfo::open(&img, opts).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        for (i, name) in [&b"a"[..], b"b"].iter().enumerate() {
            let crate::dir_item::Target::Inode { ino, .. } =
                crate::dir_item::lookup(&fs, root, dir, name).unwrap()
            else {
                panic!("not an inode")
            };
            let ii = crate::inode::read_inode(&fs, root, ino).unwrap();
            let emi = fs.ems.inode(root, ino);
            let data = crate::file::read(&fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap();
            assert_eq!(data, vec![i as u8 + 1; 5000]);
        }
        drop(fs);
        let _ = std::fs::remove_file(&img);
    }

    /// An image file as a device that counts the log tree blocks written to it, and records
    /// where each one went, in order.
    #[derive(Debug)]
    struct Counting {
        file: std::fs::File,
        log_blocks: std::sync::atomic::AtomicU64,
        log_writes: std::sync::Mutex<Vec<u64>>,
    }

    impl ubtrfs_ctree::BlockDevice for Counting {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            // The header's owner (offset 88): TREE_LOG for blocks of log trees.
            let owner = buf
                .get(88..96)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            if owner == Some(objectid::TREE_LOG) {
                self.log_blocks.fetch_add(1, Relaxed);
                self.log_writes.lock().unwrap().push(offset);
            }
            std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
    }

    fn read_named(fs: &FsInfo, name: &[u8]) -> Vec<u8> {
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let crate::dir_item::Target::Inode { ino, .. } =
            crate::dir_item::lookup(fs, root, dir, name).unwrap()
        else {
            panic!("not an inode")
        };
        let ii = crate::inode::read_inode(fs, root, ino).unwrap();
        let emi = fs.ems.inode(root, ino);
        crate::file::read(fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap()
    }

    // Test scenario: why log syncs need no LOG1/LOG2 parity here (FsInfo::sync_log's docs).
    // Log sync N of file x is stopped after its blocks are written, before its flush and
    // superblock; a writer of the next log transid logs file y meanwhile:
    //
    //   thread X                                   thread Y
    //   fsync x: log x (log transid N)
    //   sync N: blocks written, tree lock dropped
    //   [hook]                                     write y, fsync y: logs y (log transid
    //                                              N+1) without writing a log block; its
    //                                              sync waits for log_sync_mutex
    //   flush, superblock N, flush
    //   [hook: copy the image]
    //   fsync x returns                            sync N+1: blocks, flush, superblock
    //
    // The copy (a crash right after N's superblock) replays x's new data and y's old data; the
    // final image replays both. If writers of N+1 could change what N wrote, or N+1's blocks
    // could reach the disk before N's superblock, the copy would not replay cleanly or would
    // show y's new data. And sync N+1 writes none of N's log blocks again: y's logging freed
    // some of them during N's write-out, and they may be reused only once N+1 is durable.
    #[test]
    fn next_log_transid_logs_during_a_sync_write_out() {
        type Handle = std::thread::JoinHandle<SyncOutcome>;
        let img = image("parity");
        let snap = img.with_extension("after-n");
        let opts = MountOptions {
            readonly: false,
            commit_interval: 3600,
            ..MountOptions::default()
        };
        let old_y = vec![7u8; 6000];
        let new_x = vec![1u8; 9000];
        let new_y = vec![2u8; 12_000];
        {
            let dev = Arc::new(Counting {
                file: std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&img)
                    .unwrap(),
                log_blocks: Default::default(),
                log_writes: Default::default(),
            });
            let size = std::fs::metadata(&img).unwrap().len();
            let fs = FsInfo::open_backend(dev.clone(), size, &img, opts.clone()).unwrap();
            let root = fs.mount_root;
            let dir = fs.root(root).unwrap().item.root_dirid;
            let (x, _) =
                crate::inode::btrfs_new_inode(&fs, root, dir, b"x", 0o100644, 0, 0, 0).unwrap();
            let (y, _) =
                crate::inode::btrfs_new_inode(&fs, root, dir, b"y", 0o100644, 0, 0, 0).unwrap();
            crate::file_write::btrfs_buffered_write(&fs, root, y, 0, &old_y).unwrap();
            fs.sync().unwrap();
            crate::file_write::btrfs_buffered_write(&fs, root, x, 0, &new_x).unwrap();
            // What the hook saw: (N, log blocks written while y logged), y's fsync thread.
            let seen: Arc<std::sync::Mutex<Option<(u64, u64, Handle)>>> = Default::default();
            // Log block writes issued up to N's write-out (N's blocks, the last of them).
            let mark: Arc<std::sync::atomic::AtomicUsize> = Default::default();
            let hook = {
                let (fs, dev, seen, snap, img, mark) = (
                    Arc::downgrade(&fs),
                    dev.clone(),
                    seen.clone(),
                    snap.clone(),
                    img.clone(),
                    mark.clone(),
                );
                let new_y = new_y.clone();
                move |point: crate::disk_io::SyncLogPoint| {
                    if point == crate::disk_io::SyncLogPoint::SuperWritten {
                        std::fs::copy(&img, &snap).unwrap();
                        return;
                    }
                    let fs = fs.upgrade().expect("mounted");
                    let n = fs.trans.as_ref().unwrap().lock().log.log_transid - 1;
                    let before = dev.log_blocks.load(Relaxed);
                    mark.store(dev.log_writes.lock().unwrap().len(), Relaxed);
                    let fy = fs.clone();
                    let data = new_y.clone();
                    let h = std::thread::spawn(move || {
                        crate::file_write::btrfs_buffered_write(&fy, root, y, 0, &data).unwrap();
                        btrfs_sync_file(&fy, root, y).unwrap()
                    });
                    let start = std::time::Instant::now();
                    let logged = || {
                        let t = fs.trans.as_ref().unwrap().lock();
                        t.log.inodes.get(&(root, y)).and_then(|l| l.last_log_commit)
                    };
                    while logged().is_none() {
                        assert!(
                            start.elapsed().as_secs() < 60,
                            "y was not logged while sync N wrote out"
                        );
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    assert_eq!(logged(), Some(n + 1), "y logged into log transid N+1");
                    let written = dev.log_blocks.load(Relaxed) - before;
                    *seen.lock().unwrap() = Some((n, written, h));
                }
            };
            *fs.sync_log_hook.lock() = Some(Box::new(hook));
            assert_eq!(btrfs_sync_file(&fs, root, x).unwrap(), SyncOutcome::Logged);
            let (n, written, h) = seen.lock().unwrap().take().expect("the hook ran");
            assert_eq!(written, 0, "a writer of log transid N+1 wrote log blocks");
            assert_eq!(h.join().unwrap(), SyncOutcome::Logged);
            assert_eq!(fs.counters.log_syncs.load(Relaxed), 2);
            assert_eq!(fs.counters.fsync_batched.load(Relaxed), 0);
            let t = fs.trans.as_ref().unwrap().lock();
            assert_eq!(t.log.synced_upto, n + 2);
            drop(t);
            // Log blocks are reused within the transaction (LogAlloc), but nothing N wrote may
            // be rewritten by N+1: N's log is the durable one until N+1's superblock. y's
            // logging during N's write-out COWed N's blocks (freed in N+1); handing them out
            // once N was durable, a log transid too early, would put N+1's writes on them.
            let writes = dev.log_writes.lock().unwrap();
            let (by_n, after) = writes.split_at(mark.load(Relaxed));
            assert!(!after.is_empty(), "sync N+1 wrote log blocks");
            for a in after {
                assert!(
                    !by_n.contains(a),
                    "log block {a} of sync N rewritten by sync N+1"
                );
            }
            drop(writes);
            // Crash: no commit.
        }
        // A crash right after N's superblock: x's new data, y as committed.
        let fs = FsInfo::open(&snap, MountOptions::default()).unwrap();
        assert!(fs.sb.log_root != 0);
        assert_eq!(read_named(&fs, b"x"), new_x);
        assert_eq!(read_named(&fs, b"y"), old_y);
        drop(fs);
        // The end: both.
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        assert_eq!(read_named(&fs, b"x"), new_x);
        assert_eq!(read_named(&fs, b"y"), new_y);
        drop(fs);
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&snap);
    }
}
