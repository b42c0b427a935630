//! inode.c (and the parts of extent_io.c it drives): `btrfs_get_extent`,
//! `btrfs_create_io_em`, delalloc writeback (`cow_file_range`, `run_delalloc_nocow`),
//! `btrfs_finish_one_ordered`, `btrfs_release_folio`, `btrfs_read_folio`,
//! `btrfs_evict_inode`, and the helpers the other paths share (`btrfs_wait_ordered_range`,
//! `lock_extent` with ordered-extent flushing).

use ubtrfs_extent_map::{flags, runtime_flags, BtrfsInode, ExtentMap};

use super::{m, r};
use crate::check::Check;
use crate::scenario::ActorSpec;
use crate::sched::{Ctx, RangeGuard};
use crate::world::{
    ActorError, DirtyRange, FileExtentItem, ItemKind, OeKind, OeState, PAGE, PINNED_GEN, TRANSID,
};

/// `btrfs_get_extent`: the map serving `start` (at most `len` bytes asked), read from the file
/// extent items and inserted with `btrfs_add_extent_mapping` when the tree has none. The caller
/// holds the io range lock.
pub(crate) fn btrfs_get_extent(
    ctx: &Ctx,
    inode: &BtrfsInode,
    ino: u64,
    start: u64,
    len: u64,
) -> ExtentMap {
    if let Some(em) = inode.btrfs_lookup_extent_mapping(start, len) {
        if em.start <= start && em.end() > start {
            return em;
        }
    }
    let em = ctx.world(|w| {
        let im = w.inode(ino);
        match im.items.covering(start) {
            Some(it) => it.to_map(),
            None => {
                let end = im
                    .items
                    .next_start_after(start)
                    .map_or(start + len, |n| n.min(start + len));
                ExtentMap::hole(start, end - start, 0)
            }
        }
    });
    match inode.btrfs_add_extent_mapping(em, start, len) {
        Ok(got) => {
            ctx.point(format!(
                "btrfs_get_extent: added map {} from the items",
                m(&got)
            ));
            got
        }
        Err(e) => {
            ctx.point(format!("btrfs_get_extent: add_extent_mapping failed: {e}"));
            em
        }
    }
}

/// `btrfs_create_io_em`: a PINNED map for an ordered extent, put in place with
/// `btrfs_replace_extent_map_range(modified)`.
pub(crate) fn btrfs_create_io_em(ctx: &Ctx, inode: &BtrfsInode, item: &FileExtentItem) {
    let em = ExtentMap {
        start: item.start,
        len: item.len,
        disk_bytenr: item.disk_bytenr,
        disk_num_bytes: item.disk_num_bytes,
        offset: item.offset,
        ram_bytes: item.disk_num_bytes,
        generation: PINNED_GEN,
        flags: flags::PINNED,
    };
    let res = inode.btrfs_replace_extent_map_range(em, true);
    ctx.point(match res {
        Ok(()) => format!("btrfs_create_io_em: PINNED map {} in place", m(&em)),
        Err(e) => format!("btrfs_create_io_em: replace failed: {e}"),
    });
}

/// One piece of a write, decided from the file extent items as `run_delalloc_nocow` /
/// `can_nocow_extent` do: into a prealloc extent (NOCOW, new map), over a regular extent of a
/// NODATACOW file (NOCOW, no map), else COW (new extent, new map).
pub(crate) fn plan_write(
    ctx: &Ctx,
    ino: u64,
    start: u64,
    end: u64,
) -> Vec<(OeKind, FileExtentItem)> {
    ctx.world(|w| {
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let (nodatacow, cover, next) = {
                let im = w.inode(ino);
                (
                    im.nodatacow,
                    im.items.covering(pos),
                    im.items.next_start_after(pos),
                )
            };
            match cover {
                Some(it) if it.kind == ItemKind::Prealloc => {
                    let e = it.end().min(end);
                    out.push((OeKind::Prealloc, it.slice(pos, e)));
                    pos = e;
                }
                Some(it) if nodatacow => {
                    let e = it.end().min(end);
                    out.push((OeKind::Nocow, it.slice(pos, e)));
                    pos = e;
                }
                _ => {
                    // COW up to the next item of another kind (or the end).
                    let mut e = end;
                    if let Some(it) = cover {
                        e = e.min(it.end());
                    } else if let Some(n) = next {
                        e = e.min(n);
                    }
                    let len = e - pos;
                    let disk = w.alloc_disk(len);
                    out.push((
                        OeKind::Cow,
                        FileExtentItem {
                            start: pos,
                            len,
                            disk_bytenr: disk,
                            disk_num_bytes: len,
                            offset: 0,
                            kind: ItemKind::Reg,
                            generation: TRANSID,
                        },
                    ));
                    pos = e;
                }
            }
        }
        out
    })
}

/// Creates the ordered extents (and maps) of a planned write; returns their ids.
pub(crate) fn create_ordered(
    ctx: &Ctx,
    inode: &BtrfsInode,
    ino: u64,
    plan: &[(OeKind, FileExtentItem)],
) -> Vec<u64> {
    let mut ids = Vec::new();
    for (kind, item) in plan {
        if *kind != OeKind::Nocow {
            btrfs_create_io_em(ctx, inode, item);
        }
        let id = ctx.world(|w| {
            w.inode(ino).needs_log = true;
            w.add_oe(ino, *kind, *item)
        });
        ctx.point(format!(
            "btrfs_alloc_ordered_extent #{id} {kind:?} {}",
            r(item.start, item.end())
        ));
        ids.push(id);
    }
    ids
}

/// The bio of ordered extents `ids` completed (`btrfs_finish_ordered_extent` from the end io
/// handler): each is queued for completion; a failed non-NOCOW one sets COW_WRITE_ERROR.
pub(crate) fn end_io(ctx: &Ctx, inode: &BtrfsInode, ids: &[u64], ioerr: bool) {
    let cow_error = ctx.world(|w| {
        let mut cow_error = false;
        for id in ids {
            let oe = w.oe(*id);
            oe.state = OeState::IoDone;
            oe.ioerr = ioerr;
            cow_error |= ioerr && oe.kind != OeKind::Nocow;
        }
        cow_error
    });
    if cow_error {
        inode.set_runtime_flags(runtime_flags::COW_WRITE_ERROR);
    }
}

/// Writeback of one dirty range already taken off the dirty list and marked as under
/// writeback with its pages locked (`extent_writepage` -> `run_delalloc_range`).
pub(crate) fn writeback_range(ctx: &Ctx, inode: &BtrfsInode, ino: u64, d: DirtyRange) {
    let g = ctx.lock_range(ino, d.start, d.end);
    let plan = plan_write(ctx, ino, d.start, d.end);
    let ids = create_ordered(ctx, inode, ino, &plan);
    g.unlock();
    // Pages unlocked, bio submitted.
    ctx.world(|w| {
        for wb in w.inode(ino).writeback.iter_mut() {
            if wb.0 == d.start && wb.1 == d.end {
                wb.2 = false;
            }
        }
    });
    ctx.point(format!(
        "bio submitted for {}, folios unlocked, under writeback",
        r(d.start, d.end)
    ));
    end_io(ctx, inode, &ids, d.ioerr);
    ctx.world(|w| {
        let im = w.inode(ino);
        im.writeback
            .retain(|wb| !(wb.0 == d.start && wb.1 == d.end));
        // mapping_set_error on a failed write.
        im.wb_err |= d.ioerr;
    });
    ctx.point(format!(
        "end_bbio_data_write {}{}: writeback ended, ordered completion queued",
        r(d.start, d.end),
        if d.ioerr { " with an IO error" } else { "" }
    ));
}

/// Takes the first dirty range of `ino` inside `[start, end)` for writeback (pages locked).
pub(crate) fn take_dirty_for_writeback(
    ctx: &Ctx,
    ino: u64,
    start: u64,
    end: u64,
) -> Option<DirtyRange> {
    ctx.world(|w| {
        let im = w.inode(ino);
        let d = im.take_dirty(start, end)?;
        im.writeback.push((d.start, d.end, true));
        Some(d)
    })
}

/// `btrfs_fdatawrite_range`: writes back every dirty range of `[start, end)` in the caller's
/// context, then waits until no folio of the range is locked by another writeback (the
/// folio locks `write_cache_pages` takes).
pub(crate) fn fdatawrite_range(ctx: &Ctx, inode: &BtrfsInode, ino: u64, start: u64, end: u64) {
    while let Some(d) = take_dirty_for_writeback(ctx, ino, start, end) {
        writeback_range(ctx, inode, ino, d);
    }
    ctx.wait_until(
        format!("folios of ino {ino} {} locked by writeback", r(start, end)),
        move |w| {
            !w.inodes[&ino]
                .writeback
                .iter()
                .any(|wb| wb.2 && wb.0 < end && wb.1 > start)
        },
    );
}

/// `filemap_fdatawait_range`: waits for writeback of the range, then `filemap_check_errors`:
/// returns (and clears) a failed buffered writeback of the inode (AS_EIO).
pub(crate) fn fdatawait_range(ctx: &Ctx, ino: u64, start: u64, end: u64) -> bool {
    ctx.wait_until(
        format!("writeback of ino {ino} {}", r(start, end)),
        move |w| {
            !w.inodes[&ino]
                .writeback
                .iter()
                .any(|wb| wb.0 < end && wb.1 > start)
        },
    );
    ctx.world(|w| std::mem::take(&mut w.inode(ino).wb_err))
}

/// `btrfs_wait_ordered_range`: write back, wait for writeback, wait for every ordered extent
/// of the range to complete. Returns true for -EIO: a writeback error, or an ordered extent it
/// waited for failed.
#[must_use]
pub(crate) fn btrfs_wait_ordered_range(
    ctx: &Ctx,
    inode: &BtrfsInode,
    ino: u64,
    start: u64,
    end: u64,
) -> bool {
    fdatawrite_range(ctx, inode, ino, start, end);
    let wb_err = fdatawait_range(ctx, ino, start, end);
    let waited = ctx.world(|w| w.pending_oes(ino, start, end));
    ctx.wait_until(
        format!("ordered extents of ino {ino} {}", r(start, end)),
        move |w| w.pending_oes(ino, start, end).is_empty(),
    );
    let oe_err = ctx.world(|w| waited.iter().any(|id| w.oe(*id).ioerr));
    wb_err || oe_err
}

/// `lock_extent` for IO paths that must not run beside an ordered extent of the range
/// (`btrfs_lock_and_flush_ordered_range`, `lock_extent_direct`): lock, and if an ordered
/// extent is pending there, unlock, wait for it and retry.
pub(crate) fn lock_range_no_ordered<'a>(
    ctx: &'a Ctx,
    ino: u64,
    start: u64,
    end: u64,
) -> RangeGuard<'a> {
    loop {
        let g = ctx.lock_range(ino, start, end);
        if ctx.world(|w| w.pending_oes(ino, start, end).is_empty()) {
            return g;
        }
        g.unlock();
        ctx.wait_until(
            format!("ordered extents of ino {ino} {}", r(start, end)),
            move |w| w.pending_oes(ino, start, end).is_empty(),
        );
    }
}

/// The flusher (`wb_workfn` -> `extent_writepages`): `runs` passes, each writing back the
/// first dirty range of the inode, without the inode lock.
pub(crate) fn writeback_actor(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for run in 0..spec.runs {
        ctx.doing(format!("writeback ino {ino} pass {}", run + 1));
        match take_dirty_for_writeback(ctx, ino, 0, u64::MAX) {
            Some(d) => writeback_range(ctx, &inode, ino, d),
            None => ctx.point("nothing dirty"),
        }
    }
}

/// `endio_write_workers`: runs `btrfs_finish_one_ordered` for queued ordered extents until no
/// actor can create more.
pub(crate) fn endio_write_worker(ctx: &Ctx) {
    loop {
        ctx.doing("endio_write_workers");
        ctx.wait_until("a queued ordered extent (or no writer left)", |w| {
            w.first_queued_oe().is_some()
                || (w.producers_alive == 0 && !w.oes.iter().any(|o| o.state == OeState::Running))
        });
        let Some(id) = ctx.world(|w| {
            let id = w.first_queued_oe()?;
            w.oe(id).state = OeState::Completing;
            Some(id)
        }) else {
            return;
        };
        btrfs_finish_one_ordered(ctx, id);
    }
}

/// `btrfs_finish_one_ordered`.
fn btrfs_finish_one_ordered(ctx: &Ctx, id: u64) {
    let oe = ctx.world(|w| *w.oe(id));
    let inode = ctx.inode(oe.ino);
    ctx.doing(format!(
        "btrfs_finish_one_ordered #{id} {:?} ino {} {}",
        oe.kind,
        oe.ino,
        r(oe.start, oe.end())
    ));
    if oe.ioerr {
        // `goto out` with -EIO: no io range lock, drop the maps of the unwritten range (NOCOW
        // ones too: only the free space inode is exempt).
        inode.btrfs_drop_extent_map_range(oe.start, oe.end() - 1, false);
        ctx.point(format!(
            "IOERR: btrfs_drop_extent_map_range {} (error path)",
            r(oe.start, oe.end())
        ));
    } else if oe.kind == OeKind::Nocow {
        ctx.world(|w| w.inode(oe.ino).needs_log = true);
        ctx.point("NOCOW: inode item updated");
    } else {
        let g = ctx.lock_range(oe.ino, oe.start, oe.end());
        ctx.world(|w| {
            let im = w.inode(oe.ino);
            if oe.kind == OeKind::Cow {
                let mut item = oe.item;
                item.generation = TRANSID;
                im.items.insert(item);
            } else {
                im.items.mark_written(oe.start, oe.end(), TRANSID);
            }
            im.needs_log = true;
        });
        ctx.point(if oe.kind == OeKind::Cow {
            "insert_ordered_extent_file_extent"
        } else {
            "btrfs_mark_extent_written"
        });
        if let Err(e) = inode.btrfs_unpin_extent_cache(oe.start, oe.len, TRANSID) {
            let me = ctx.id();
            ctx.world(|w| {
                w.errors.push(ActorError {
                    actor: me,
                    check: Check::UnpinFailed,
                    detail: format!(
                        "ordered extent #{id} ino {} {}: {e}",
                        oe.ino,
                        r(oe.start, oe.end())
                    ),
                })
            });
        }
        ctx.point("unpin_extent_cache");
        g.unlock();
    }
    ctx.world(|w| w.oe(id).state = OeState::Complete);
    ctx.point("ordered extent removed (complete)");
}

/// `btrfs_release_folio` for every folio of the ops' ranges: clean folios only, then
/// `try_release_extent_mapping` with the io_tree EXTENT_LOCKED test.
pub(crate) fn btrfs_release_folio(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for op in &spec.ops {
        let mut f = op.start;
        while f < op.end() {
            ctx.doing(format!("release_folio ino {ino} at {}", crate::fmt_size(f)));
            let busy = ctx.world(|w| w.inode(ino).busy_pages(f, f + PAGE));
            if busy {
                ctx.point("folio dirty or under writeback: not released");
            } else {
                inode.try_release_extent_mapping_unless_locked(f, f + PAGE - 1, |a, b| {
                    ctx.world(|w| w.range_locked(ino, a, b.saturating_add(1)))
                });
                ctx.point("try_release_extent_mapping");
            }
            f += PAGE;
        }
    }
}

/// `btrfs_read_folio` for every folio of the ops' ranges that is not in the page cache
/// (taken as: not dirty, not under writeback): `btrfs_lock_and_flush_ordered_range` then
/// `btrfs_get_extent`.
pub(crate) fn btrfs_read_folio(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for op in &spec.ops {
        let mut f = op.start;
        while f < op.end() {
            ctx.doing(format!("read_folio ino {ino} at {}", crate::fmt_size(f)));
            if ctx.world(|w| w.inode(ino).busy_pages(f, f + PAGE)) {
                ctx.point("folio cached (dirty): no read");
            } else {
                let g = lock_range_no_ordered(ctx, ino, f, f + PAGE);
                let em = btrfs_get_extent(ctx, &inode, ino, f, PAGE);
                ctx.doing(format!(
                    "read_folio ino {ino} at {} (map {})",
                    crate::fmt_size(f),
                    m(&em)
                ));
                g.unlock();
            }
            f += PAGE;
        }
    }
}

/// `btrfs_evict_inode`: waits until no other actor uses the inode, writes back what is still
/// dirty and waits for its ordered extents (an inode with dirty pages is written back before
/// it can be evicted), then drops every map (`btrfs_drop_extent_map_range(0, -1)`).
pub(crate) fn btrfs_evict_inode(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    ctx.doing(format!("evict ino {ino}"));
    ctx.wait_until(
        format!("last reference of ino {ino} (no other user)"),
        move |w| w.users.get(&ino).copied().unwrap_or(0) <= 1,
    );
    let inode = ctx.inode(ino);
    let _ = btrfs_wait_ordered_range(ctx, &inode, ino, 0, u64::MAX);
    drop(inode);
    ctx.fs().evict_inode(ctx.root(), ino);
    ctx.world(|w| w.inode(ino).evicted = true);
    ctx.point("drop_all_extent_maps_fast: inode evicted");
}
