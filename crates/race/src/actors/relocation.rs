//! relocation.c: `invalidate_extent_cache`, run by balance after a subtree swap of the fs
//! tree: for the key range of the swapped leaves, lock the io range and drop the extent maps
//! (skipping PINNED ones), without the inode lock or the mmap lock.
//!
//! The ranges come from the leaf boundaries: each leaf holds `per_leaf` file extent items; a
//! range starts at the first item's key offset (0 for the first leaf, whose first key is the
//! inode item) and ends before the next leaf's first key offset (at u64::MAX for the last).

use super::r;
use crate::scenario::ActorSpec;
use crate::sched::Ctx;

/// The relocation actor: `runs` passes over the inode's leaves.
pub(crate) fn invalidate_extent_cache(ctx: &Ctx, spec: &ActorSpec) {
    let ino = spec.ino.expect("validated");
    let inode = ctx.inode(ino);
    for run in 0..spec.runs {
        let starts: Vec<u64> =
            ctx.world(|w| w.inode(ino).items.all().iter().map(|i| i.start).collect());
        let mut leaves: Vec<(u64, u64)> = Vec::new();
        let bounds: Vec<u64> = starts.iter().step_by(spec.per_leaf).copied().collect();
        for (k, b) in bounds.iter().enumerate() {
            let start = if k == 0 { 0 } else { *b };
            let end = bounds.get(k + 1).map_or(u64::MAX, |n| n - 1);
            leaves.push((start, end));
        }
        if leaves.is_empty() {
            leaves.push((0, u64::MAX));
        }
        for (start, end) in leaves {
            let end_excl = end.saturating_add(1);
            ctx.doing(format!(
                "relocation pass {} invalidate_extent_cache ino {ino} {}",
                run + 1,
                r(start, end_excl)
            ));
            let g = ctx.lock_range(ino, start, end_excl);
            inode.btrfs_drop_extent_map_range(start, end, true);
            ctx.point("btrfs_drop_extent_map_range (skip pinned)");
            g.unlock();
        }
    }
}
