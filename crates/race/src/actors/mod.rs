//! The actors: the kernel's code paths as step machines. Each runs on its own thread and
//! yields at every scheduling point; the modules mirror the kernel files the paths live in.
//!
//! Every actor takes the locks the kernel path takes, in the same modes and order:
//!
//! | actor | inode lock | mmap lock | io range lock | extent-map calls |
//! |---|---|---|---|---|
//! | fsync (file.c) | EXCL | EXCL | - | log_changed_extents / clear_modified |
//! | O_DSYNC fsync from a direct write | (held by the write) | EXCL | - | same |
//! | dio-write (direct-io.c) | EXCL (stock), SHARED (`nosec`) | - | yes | get_extent, replace |
//! | buffered-write (file.c) | EXCL | - | - | - |
//! | writeback (inode.c) | - | - | yes | replace (create_io_em) |
//! | ordered (inode.c) | - | - | yes (normal path) | unpin, drop range (error) |
//! | fallocate / punch-hole (file.c) | EXCL | EXCL | yes | replace, drop range |
//! | release-folio (extent_io.c) | - | - | tested | try_release_extent_mapping |
//! | evict (inode.c) | (no users left) | - | - | drop all |
//! | relocation (relocation.c) | - | - | yes | drop range (skip pinned) |
//! | reader (inode.c) | - | - | yes | get_extent (add_extent_mapping) |
//! | shrinker (extent_map.c) | - | try SHARED | - | btrfs_free_extent_maps |

mod direct_io;
mod extent_map;
mod file;
mod inode;
mod relocation;

use std::sync::Arc;

use ubtrfs_extent_map::ExtentMap;

use crate::scenario::{ActorKind, ActorSpec};
use crate::sched::{Body, Ctx};

/// Options that change how actors behave in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActorOpts {
    /// Direct writes within i_size take the inode lock shared (SB_NOSEC forced on).
    pub nosec: bool,
}

/// `[start, end)` for step descriptions.
pub(crate) fn r(start: u64, end: u64) -> String {
    format!("[{}, {})", crate::fmt_size(start), crate::fmt_size(end))
}

/// A map for step descriptions.
pub(crate) fn m(em: &ExtentMap) -> String {
    r(em.start, em.end())
}

/// Keeps the world's per-inode user count and the producer count right however the actor
/// ends (including unwinding when a run is aborted).
struct Leave<'a> {
    ctx: &'a Ctx,
    ino: Option<u64>,
    producer: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let (ino, producer) = (self.ino, self.producer);
        // Not through Ctx::world: during an abort other threads unwind at the same time.
        self.ctx.world_blocking(|w| {
            if let Some(i) = ino {
                if let Some(u) = w.users.get_mut(&i) {
                    *u = u.saturating_sub(1);
                }
            }
            if producer {
                w.producers_alive = w.producers_alive.saturating_sub(1);
            }
        });
    }
}

/// The thread body of the actor `spec`.
pub(crate) fn body(spec: &ActorSpec, opts: ActorOpts) -> Body {
    let spec = Arc::new(spec.clone());
    Box::new(move |ctx: &Ctx| {
        let _leave = Leave {
            ctx,
            ino: spec.ino,
            producer: spec.kind.produces_ordered(),
        };
        match spec.kind {
            ActorKind::Fsync => file::fsync_actor(ctx, &spec),
            ActorKind::DioWrite => direct_io::btrfs_direct_write(ctx, &spec, opts),
            ActorKind::BufferedWrite => file::btrfs_buffered_write(ctx, &spec),
            ActorKind::Writeback => inode::writeback_actor(ctx, &spec),
            ActorKind::Ordered => inode::endio_write_worker(ctx),
            ActorKind::Fallocate => file::btrfs_fallocate(ctx, &spec),
            ActorKind::PunchHole => file::btrfs_punch_hole(ctx, &spec),
            ActorKind::ReleaseFolio => inode::btrfs_release_folio(ctx, &spec),
            ActorKind::Evict => inode::btrfs_evict_inode(ctx, &spec),
            ActorKind::Relocation => relocation::invalidate_extent_cache(ctx, &spec),
            ActorKind::Reader => inode::btrfs_read_folio(ctx, &spec),
            ActorKind::Shrinker => extent_map::shrinker_work(ctx, &spec),
        }
    })
}
