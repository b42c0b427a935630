//! extent_map.c: the shrinker work item. The real `btrfs_free_extent_maps` runs here; it
//! try-locks each inode's tree and then its mmap lock SHARED, skipping busy inodes, and yields
//! at its own scheduling points (between roots and between inodes).

use crate::scenario::ActorSpec;
use crate::sched::Ctx;

/// The shrinker actor: `runs` scans of `nr` maps.
pub(crate) fn shrinker_work(ctx: &Ctx, spec: &ActorSpec) {
    for run in 0..spec.runs {
        ctx.doing(format!(
            "shrinker run {}: btrfs_free_extent_maps({})",
            run + 1,
            spec.nr
        ));
        let before = ctx.fs().stats();
        ctx.fs().btrfs_free_extent_maps(spec.nr);
        let after = ctx.fs().stats();
        ctx.point(format!(
            "scan done: {} dropped, {} inode(s) busy",
            after.shrinker_dropped - before.shrinker_dropped,
            after.shrinker_skipped_inode_busy - before.shrinker_skipped_inode_busy
        ));
    }
}
