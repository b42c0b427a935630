//! direct-io.c: `btrfs_direct_write` for a write within i_size, with
//! `btrfs_dio_iomap_begin` (`lock_extent_direct`, `btrfs_get_extent`, `btrfs_create_dio_extent`)
//! and, for O_DSYNC, the fsync run from `iomap_dio_complete` with the inode lock still held.
//!
//! The inode lock mode is decided as the kernel decides it (KERNEL-SEMANTICS.md section 5,
//! point 3): SHARED only for a write within i_size on an inode with S_NOSEC, which btrfs never
//! sets on stock kernels, so EXCLUSIVE unless the run has the `nosec` option.

use super::file::btrfs_sync_file;
use super::inode::{
    btrfs_get_extent, create_ordered, end_io, fdatawait_range, fdatawrite_range,
    lock_range_no_ordered, plan_write,
};
use super::{r, ActorOpts};
use crate::scenario::ActorSpec;
use crate::sched::{Ctx, InodeLock, Mode};

/// The direct-write actor: one `btrfs_direct_write` per op.
pub(crate) fn btrfs_direct_write(ctx: &Ctx, spec: &ActorSpec, opts: ActorOpts) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for op in &spec.ops {
        let (s, e) = (op.start, op.end());
        let tag = format!(
            "dio write{} ino {ino} {}{}",
            if spec.dsync { " O_DSYNC" } else { "" },
            r(s, e),
            if op.ioerr { " (IO error)" } else { "" }
        );
        ctx.doing(tag.clone());
        let within = ctx.world(|w| e <= w.inode(ino).i_size);
        let mode = if opts.nosec && within {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let il = ctx.lock(&inode, InodeLock::Inode, mode);
        // kiocb_invalidate_pages: write back and wait for cached folios of the range.
        fdatawrite_range(ctx, &inode, ino, s, e);
        if fdatawait_range(ctx, ino, s, e) {
            ctx.point("kiocb_invalidate_pages: -EIO, the write fails");
            ctx.unlock(il, &inode, InodeLock::Inode);
            continue;
        }
        // btrfs_dio_iomap_begin, one extent map at a time.
        let g = lock_range_no_ordered(ctx, ino, s, e);
        let mut ids = Vec::new();
        let mut pos = s;
        while pos < e {
            let em = btrfs_get_extent(ctx, &inode, ino, pos, e - pos);
            let end = em.end().min(e);
            let plan = plan_write(ctx, ino, pos, end);
            ids.extend(create_ordered(ctx, &inode, ino, &plan));
            pos = end;
        }
        g.unlock();
        ctx.point("bio submitted");
        end_io(ctx, &inode, &ids, op.ioerr);
        ctx.point(format!(
            "btrfs_dio_end_io{}: ordered completion queued",
            if op.ioerr { " with an IO error" } else { "" }
        ));
        if spec.dsync && !op.ioerr {
            // iomap_dio_complete -> generic_write_sync -> btrfs_sync_file (stub).
            btrfs_sync_file(ctx, ino, true);
            ctx.doing(tag);
        }
        ctx.unlock(il, &inode, InodeLock::Inode);
    }
}
