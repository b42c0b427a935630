//! Direct writes and O_DSYNC writes: the kernel's direct-io.c `btrfs_direct_write` and file.c
//! `btrfs_do_write_iter`, i.e. which inode lock a write takes, when a direct write falls back
//! to a buffered one, and which `btrfs_sync_file` an O_DSYNC/O_SYNC write runs under which
//! lock.
//!
//! # The kernel (6.12 source, re-read for this module)
//! - `btrfs_do_write_iter` sends a direct write (IOCB_DIRECT) to `btrfs_direct_write` and
//!   any other to `btrfs_buffered_write`, then `btrfs_set_inode_last_sub_trans`, then, for an
//!   O_DSYNC/O_SYNC file or RWF_DSYNC/RWF_SYNC write, `generic_write_sync` → `btrfs_sync_file`
//!   with the ordinary locking (inode lock and mmap lock), after the write dropped its lock.
//! - `btrfs_direct_write` takes the inode lock exclusively. It would take it shared for a
//!   write within i_size of an IS_NOSEC inode, but btrfs never sets SB_NOSEC (its superblock
//!   comes from its own sget_fc), so on stock btrfs every direct write is exclusive
//!   (KERNEL-SEMANTICS.md section 5). It falls back to a buffered write when the offset or
//!   the buffer is not sector aligned, or when the inode has data checksums (the user could
//!   change the buffer under the checksum); the fallback drops the lock (the buffered write
//!   takes it again), then writes back and waits for the range before returning.
//! - A write that stays direct completes in `iomap_dio_complete` with the inode still locked.
//!   For O_DSYNC/O_SYNC that runs `generic_write_sync` there (IOMAP_DIO_NEED_SYNC) with
//!   `current->journal_info = BTRFS_TRANS_DIO_WRITE_STUB`, so `btrfs_sync_file` takes only
//!   the mmap lock (`skip_ilock`). On a device with FUA, an O_DSYNC (not O_SYNC) write goes
//!   out FUA and iomap skips that sync; ubtrfs's devices are a volatile cache without FUA
//!   (they only flush), so here it always runs. `btrfs_do_write_iter` then sets the inode's
//!   `last_sub_trans` to the root's log transid, which that sync's log sync has just moved
//!   on, and its own `generic_write_sync` runs a second, ordinary fsync: the inode is not
//!   `btrfs_inode_in_log` any more, so it is logged again and the next log transid synced.
//!
//! # Here
//! - The data of a direct write goes through the inode's dirty buffer and is written back at
//!   once, under the inode lock, before the write returns. The state it leaves is the
//!   kernel's (a new extent, nothing cached: the buffer only ever holds unwritten data), and
//!   a concurrent reader sees the old data or the new, never an extent whose data is not on
//!   disk yet (in the kernel the extent range lock and the ordered-extent wait do that; here
//!   it is the dirty buffer's rule, file.rs `read_disk_under`). Writes into NODATACOW or
//!   prealloc extents take whatever path writeback takes for them.
//! - Through FUSE (measured on Linux 6.18 with a daemon logging every request, no
//!   FOPEN_DIRECT_IO, no writeback cache): for an O_DIRECT open the client sends FUSE_WRITE
//!   with the open flags (`fuse_write_flags`: f_flags, plus O_DSYNC/O_SYNC for a dsync
//!   iocb) and, for O_DSYNC/O_SYNC/RWF_DSYNC, FUSE_FSYNC after it (its own
//!   `generic_write_sync`, after it dropped its inode lock; datasync set for O_DSYNC). So
//!   the daemon runs [`btrfs_file_write`] for a FUSE_WRITE (the direct path and its
//!   mmap-lock-only sync for O_DIRECT|O_DSYNC) and the client's FUSE_FSYNC is the second,
//!   ordinary `btrfs_sync_file` of `btrfs_do_write_iter`. A direct write larger than the
//!   connection's max_write arrives as several FUSE_WRITEs, each a direct write of its own
//!   with its own sync, where the kernel's btrfs would sync once per system call.

use crate::disk_io::FsInfo;
use crate::error::{FsError, Result};
use crate::file_write::{btrfs_buffered_write, btrfs_writeback};
use crate::tree_log::{btrfs_sync_file, btrfs_sync_file_dio, SyncOutcome};
use std::sync::atomic::Ordering;
use ubtrfs_format::items::inode_flags;

/// How a write was asked for: the parts of the kiocb's flags that choose its path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// IOCB_DIRECT (O_DIRECT).
    pub direct: bool,
    /// `iocb_is_dsync`: O_DSYNC, O_SYNC, RWF_DSYNC or RWF_SYNC.
    pub dsync: bool,
}

impl WriteFlags {
    /// From open flags, as FUSE_WRITE carries them (`fuse_write_flags`). O_SYNC includes the
    /// O_DSYNC bit.
    pub fn from_open_flags(flags: i32) -> WriteFlags {
        WriteFlags {
            direct: flags & libc::O_DIRECT != 0,
            dsync: flags & libc::O_DSYNC != 0,
        }
    }
}

/// Which way a write went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePath {
    /// `btrfs_buffered_write` (not a direct write).
    Buffered,
    /// `btrfs_direct_write` that stayed direct.
    Direct,
    /// `btrfs_direct_write` that fell back to a buffered write plus writeback.
    DirectFallback,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    pub written: usize,
    pub path: WritePath,
    /// The fsync an O_DSYNC direct write ran under its inode lock (`iomap_dio_complete`).
    pub dio_sync: Option<SyncOutcome>,
    /// The ordinary fsync of `generic_write_sync` after the write ([`btrfs_do_write_iter`]).
    pub write_sync: Option<SyncOutcome>,
}

/// `btrfs_do_write_iter`: [`btrfs_file_write`], then for a dsync write `generic_write_sync`,
/// an ordinary [`btrfs_sync_file`] with the inode unlocked. `checks` runs under the inode
/// lock before anything is written (`generic_write_checks`, `btrfs_write_check`).
pub fn btrfs_do_write_iter(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    data: &[u8],
    flags: WriteFlags,
    checks: impl FnOnce() -> Result<()>,
) -> Result<WriteOutcome> {
    let mut out = btrfs_file_write(fs, root, ino, offset, data, flags, checks)?;
    // generic_write_sync, with the inode unlocked.
    if flags.dsync && out.written > 0 {
        out.write_sync = Some(btrfs_sync_file(fs, root, ino)?);
    }
    Ok(out)
}

/// The write of `btrfs_do_write_iter` without its closing `generic_write_sync` (which the
/// FUSE client sends as FUSE_FSYNC): a direct write for `flags.direct`, else a buffered one,
/// each under the inode lock, `checks` first.
pub fn btrfs_file_write(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    data: &[u8],
    flags: WriteFlags,
    checks: impl FnOnce() -> Result<()>,
) -> Result<WriteOutcome> {
    let out = if flags.direct {
        btrfs_direct_write(fs, root, ino, offset, data, flags.dsync, checks)?
    } else {
        let emi = fs.ems.inode(root, ino);
        let _ilock = emi.inode_lock().write();
        checks()?;
        let written = btrfs_buffered_write(fs, root, ino, offset, data)?;
        WriteOutcome {
            written,
            path: WritePath::Buffered,
            dio_sync: None,
            write_sync: None,
        }
    };
    btrfs_set_inode_last_sub_trans(fs, root, ino);
    Ok(out)
}

/// `btrfs_set_inode_last_sub_trans`, after every write: the inode's data changed in the
/// root's current log transid, so an fsync must log it again (`btrfs_inode_in_log`).
fn btrfs_set_inode_last_sub_trans(fs: &FsInfo, root: u64, ino: u64) {
    if let Some(t) = &fs.trans {
        t.lock().log.set_inode_last_sub_trans(root, ino);
    }
}

/// `btrfs_direct_write`: the inode lock exclusive; a checksummed inode or an unaligned range
/// falls back to a buffered write that is written back before returning; otherwise the data
/// goes to a new extent before returning and, for `dsync`, the inode is synced with the
/// inode lock still held ([`btrfs_sync_file_dio`]: only the mmap lock taken).
pub fn btrfs_direct_write(
    fs: &FsInfo,
    root: u64,
    ino: u64,
    offset: u64,
    data: &[u8],
    dsync: bool,
    checks: impl FnOnce() -> Result<()>,
) -> Result<WriteOutcome> {
    if fs.is_readonly() {
        return Err(FsError::ReadOnly);
    }
    let ss = u64::from(fs.sectorsize());
    let emi = fs.ems.inode(root, ino);
    // Exclusive: BTRFS_ILOCK_SHARED needs IS_NOSEC, which btrfs inodes never have.
    let ilock = emi.inode_lock().write();
    checks()?;
    let ii = crate::inode::read_inode(fs, root, ino)?;
    let aligned = offset.is_multiple_of(ss) && (data.len() as u64).is_multiple_of(ss);
    if !aligned || ii.flags & inode_flags::NODATASUM == 0 {
        // check_direct_IO / data checksums: buffered, then written back and waited for.
        drop(ilock);
        let written = {
            let _l = emi.inode_lock().write();
            btrfs_buffered_write(fs, root, ino, offset, data)?
        };
        btrfs_writeback(fs, root, ino)?;
        fs.counters
            .direct_write_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        return Ok(WriteOutcome {
            written,
            path: WritePath::DirectFallback,
            dio_sync: None,
            write_sync: None,
        });
    }
    // The page cache range is written back and invalidated first (iomap), then the data
    // goes to a new extent and the ordered extent completes, all under the inode lock.
    let written = btrfs_buffered_write(fs, root, ino, offset, data)?;
    btrfs_writeback(fs, root, ino)?;
    fs.counters.direct_writes.fetch_add(1, Ordering::Relaxed);
    // iomap_dio_complete → generic_write_sync, inode still locked.
    let dio_sync = if dsync && written > 0 {
        Some(btrfs_sync_file_dio(fs, root, ino, &ilock)?)
    } else {
        None
    };
    drop(ilock);
    Ok(WriteOutcome {
        written,
        path: WritePath::Direct,
        dio_sync,
        write_sync: None,
    })
}
