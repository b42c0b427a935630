//! file.c: `btrfs_sync_file` (with tree-log.c's `btrfs_log_inode` / `btrfs_log_changed_extents`
//! for the extent-map side), `btrfs_buffered_write`, `btrfs_fallocate`, `btrfs_punch_hole`.

use ubtrfs_extent_map::{runtime_flags, EmError, ExtentMap, EXTENT_MAP_HOLE};

use super::inode::{btrfs_get_extent, btrfs_wait_ordered_range, fdatawait_range, fdatawrite_range};
use super::{m, r};
use crate::scenario::ActorSpec;
use crate::sched::{Ctx, InodeLock, Mode};
use crate::world::{FileExtentItem, ItemKind, Logged, TRANSID};

/// The fsync actor: `runs` calls of `btrfs_sync_file` from user space.
pub(crate) fn fsync_actor(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    for _ in 0..spec.runs {
        btrfs_sync_file(ctx, ino, false);
    }
}

/// `btrfs_sync_file` of a regular file. `from_dio`: called from an O_DSYNC direct write that
/// holds the inode lock (the journal_info stub): only the mmap lock is taken.
pub(crate) fn btrfs_sync_file(ctx: &Ctx, ino: u64, from_dio: bool) {
    let inode = ctx.inode(ino);
    let tag = if from_dio {
        format!("fsync ino {ino} (O_DSYNC, inside the direct write)")
    } else {
        format!("fsync ino {ino}")
    };
    ctx.doing(tag.clone());
    // start_ordered_ops, before locking.
    fdatawrite_range(ctx, &inode, ino, 0, u64::MAX);
    ctx.point("start_ordered_ops");
    let il = (!from_dio).then(|| ctx.lock(&inode, InodeLock::Inode, Mode::Exclusive));
    let ml = ctx.lock(&inode, InodeLock::Mmap, Mode::Exclusive);
    // start_ordered_ops again, under the locks.
    fdatawrite_range(ctx, &inode, ino, 0, u64::MAX);
    let full_sync = inode.needs_full_sync();
    let (collected, eio) = if full_sync {
        let eio = btrfs_wait_ordered_range(ctx, &inode, ino, 0, u64::MAX);
        inode.clear_runtime_flags(runtime_flags::COW_WRITE_ERROR);
        (0, eio)
    } else {
        // btrfs_get_ordered_extents_for_logging, then filemap_fdatawait_range.
        let n = ctx.world(|w| w.pending_oes(ino, 0, u64::MAX).len());
        let mut eio = fdatawait_range(ctx, ino, 0, u64::MAX);
        if !eio && inode.runtime_flags() & runtime_flags::COW_WRITE_ERROR != 0 {
            inode.clear_runtime_flags(runtime_flags::COW_WRITE_ERROR);
            eio = btrfs_wait_ordered_range(ctx, &inode, ino, 0, u64::MAX);
        }
        (n, eio)
    };
    ctx.point(format!(
        "{} sync, {collected} ordered extent(s) collected{}",
        if full_sync { "full" } else { "fast" },
        if eio { ", -EIO" } else { "" }
    ));
    let needs_log = ctx.world(|w| w.inode(ino).needs_log);
    if eio {
        ctx.point("-EIO: goto out_release_extents (nothing logged)");
    } else if !needs_log && collected == 0 {
        inode.clear_runtime_flags(runtime_flags::NEEDS_FULL_SYNC);
        ctx.point("skip_inode_logging: nothing new to log");
    } else {
        let i_size = ctx.world(|w| {
            let im = w.inode(ino);
            im.needs_log = false;
            im.i_size
        });
        let me = ctx.id();
        if full_sync {
            // btrfs_log_inode, LOG_INODE_ALL with NEEDS_FULL_SYNC: clear the flag, copy the
            // file extent items, then empty the modified list.
            inode.clear_runtime_flags(
                runtime_flags::NEEDS_FULL_SYNC | runtime_flags::COPY_EVERYTHING,
            );
            let n = ctx.world(|w| {
                let items = w.inode(ino).items.all();
                for it in &items {
                    w.log.push(Logged {
                        actor: me,
                        ino,
                        em: it.to_map(),
                    });
                }
                items.len()
            });
            ctx.point(format!(
                "btrfs_log_inode (full): {n} file extent item(s) copied"
            ));
            ctx.doing(format!("{tag}: btrfs_log_inode (full)"));
            inode.btrfs_log_inode_clear_modified_extents();
            ctx.point("modified list emptied");
        } else {
            ctx.world(|w| w.logging.insert(ino, me));
            ctx.doing(format!("{tag}: btrfs_log_changed_extents"));
            let mut pass = inode.btrfs_log_changed_extents_begin(TRANSID, i_size);
            ctx.point("modified list collected (LOGGING set)");
            while let Some(em) = pass.next_extent() {
                ctx.world(|w| w.log.push(Logged { actor: me, ino, em }));
                ctx.doing(format!("{tag}: log_one_extent {}", m(&em)));
            }
            ctx.doing(format!("{tag}: btrfs_log_changed_extents"));
            let res = pass.finish();
            ctx.world(|w| w.logging.remove(&ino));
            ctx.point(match res {
                Ok(()) => "logging pass done".to_string(),
                Err(EmError::TooManyModified) => "-EFBIG: full commit".to_string(),
                Err(e) => format!("logging failed: {e}"),
            });
        }
    }
    ctx.doing(tag);
    ctx.unlock(ml, &inode, InodeLock::Mmap);
    if let Some(il) = il {
        ctx.unlock(il, &inode, InodeLock::Inode);
    }
    ctx.point("btrfs_sync_log");
}

/// `btrfs_buffered_write`: inode lock exclusive, wait for ordered extents and writeback of
/// the range, dirty the folios (delalloc, no map).
pub(crate) fn btrfs_buffered_write(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for op in &spec.ops {
        let (s, e) = (op.start, op.end());
        ctx.doing(format!("buffered write ino {ino} {}", r(s, e)));
        let il = ctx.lock(&inode, InodeLock::Inode, Mode::Exclusive);
        ctx.wait_until(
            format!("ordered extents and writeback of ino {ino} {}", r(s, e)),
            move |w| {
                w.pending_oes(ino, s, e).is_empty()
                    && !w.inodes[&ino]
                        .writeback
                        .iter()
                        .any(|wb| wb.0 < e && wb.1 > s)
            },
        );
        ctx.world(|w| {
            let im = w.inode(ino);
            im.add_dirty(s, e, op.ioerr);
            im.i_size = im.i_size.max(e);
            im.needs_log = true;
        });
        ctx.point("folios dirtied (delalloc)");
        ctx.unlock(il, &inode, InodeLock::Inode);
    }
}

/// `btrfs_fallocate` (mode 0 or KEEP_SIZE): inode + mmap lock, wait for ordered extents,
/// lock the range, find the holes with `btrfs_get_extent`, `btrfs_prealloc_file_range` for
/// each (prealloc item + PREALLOC map on the modified list).
pub(crate) fn btrfs_fallocate(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for op in &spec.ops {
        let (s, e) = (op.start, op.end());
        ctx.doing(format!(
            "fallocate ino {ino} {}{}",
            r(s, e),
            if spec.keep_size { " KEEP_SIZE" } else { "" }
        ));
        let il = ctx.lock(&inode, InodeLock::Inode, Mode::Exclusive);
        let ml = ctx.lock(&inode, InodeLock::Mmap, Mode::Exclusive);
        if btrfs_wait_ordered_range(ctx, &inode, ino, s, e) {
            ctx.point("btrfs_wait_ordered_range: -EIO, fallocate fails");
            ctx.unlock(ml, &inode, InodeLock::Mmap);
            ctx.unlock(il, &inode, InodeLock::Inode);
            continue;
        }
        let g = ctx.lock_range(ino, s, e);
        let i_size = ctx.world(|w| w.inode(ino).i_size);
        let mut holes = Vec::new();
        let mut cur = s;
        while cur < e {
            let em = btrfs_get_extent(ctx, &inode, ino, cur, e - cur);
            let last = em.end().min(e);
            if em.disk_bytenr == EXTENT_MAP_HOLE
                || (cur >= i_size && em.flags & ubtrfs_extent_map::flags::PREALLOC == 0)
            {
                holes.push((cur, last));
            }
            cur = last;
        }
        for (hs, he) in holes {
            let item = ctx.world(|w| {
                let len = he - hs;
                let disk = w.alloc_disk(len);
                let item = FileExtentItem {
                    start: hs,
                    len,
                    disk_bytenr: disk,
                    disk_num_bytes: len,
                    offset: 0,
                    kind: ItemKind::Prealloc,
                    generation: TRANSID,
                };
                w.inode(ino).items.insert(item);
                item
            });
            let res = inode.btrfs_replace_extent_map_range(item.to_map(), true);
            if res.is_err() {
                inode.btrfs_set_inode_full_sync();
            }
            ctx.point(format!(
                "btrfs_prealloc_file_range: prealloc item and PREALLOC map {}",
                r(hs, he)
            ));
        }
        ctx.world(|w| {
            let im = w.inode(ino);
            if !spec.keep_size {
                im.i_size = im.i_size.max(e);
            }
            im.needs_log = true;
        });
        g.unlock();
        ctx.unlock(ml, &inode, InodeLock::Mmap);
        ctx.unlock(il, &inode, InodeLock::Inode);
    }
}

/// `btrfs_punch_hole`: inode + mmap lock, wait for ordered extents, lock the range, drop the
/// page cache, `btrfs_drop_extents` (items and maps), `fill_holes` (hole map on the modified
/// list; no hole item on a no-holes filesystem).
pub(crate) fn btrfs_punch_hole(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for op in &spec.ops {
        ctx.doing(format!("punch hole ino {ino} {}", r(op.start, op.end())));
        let il = ctx.lock(&inode, InodeLock::Inode, Mode::Exclusive);
        let ml = ctx.lock(&inode, InodeLock::Mmap, Mode::Exclusive);
        let i_size = ctx.world(|w| w.inode(ino).i_size);
        let (s, e) = (op.start, op.end().min(i_size));
        if s >= e {
            ctx.point("range beyond i_size: nothing to punch");
        } else if btrfs_wait_ordered_range(ctx, &inode, ino, s, e) {
            ctx.point("btrfs_wait_ordered_range: -EIO, punch hole fails");
        } else {
            let g = ctx.lock_range(ino, s, e);
            ctx.world(|w| {
                let im = w.inode(ino);
                im.items.punch(s, e);
                im.needs_log = true;
            });
            inode.btrfs_drop_extent_map_range(s, e - 1, false);
            ctx.point(format!("btrfs_drop_extents {}", r(s, e)));
            let res =
                inode.btrfs_replace_extent_map_range(ExtentMap::hole(s, e - s, TRANSID), true);
            if res.is_err() {
                inode.btrfs_set_inode_full_sync();
            }
            ctx.point(format!("fill_holes: hole map {}", r(s, e)));
            g.unlock();
        }
        ctx.unlock(ml, &inode, InodeLock::Mmap);
        ctx.unlock(il, &inode, InodeLock::Inode);
    }
}
