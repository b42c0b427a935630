//! The other stock-locking paths of KERNEL-SEMANTICS.md section 5 point 3 that drop map ranges
//! without the inode lock while a fast fsync may log: the error path of ordered-extent
//! completion, relocation's invalidate_extent_cache, folio release, writeback and readers; and
//! the paths that hold the inode and mmap locks (punch hole, fallocate, buffered writes), which
//! must never overlap the logging.

use ubtrfs_extent_map::{Invariant, Policy};
use ubtrfs_race::run::{explore_exhaustive, explore_random, RunOpts, Summary};
use ubtrfs_race::scenario::shipped;
use ubtrfs_race::Check;

const SHRINKER_UAF: Check = Check::ShrinkerRemovedListedLogging;
const RELEASE_UAF: Check = Check::ReleaseRemovedListedLogging;

fn exhaustive(name: &str, opts: &RunOpts, cap: u64) -> Summary {
    let sc = shipped(name).unwrap();
    explore_exhaustive(&sc, opts, 1, cap, |_, _| {})
}

#[test]
fn nocow_io_error_completion_splits_a_logging_map_on_stock_locking() {
    // Test scenario: stock locking. A NOCOW direct overwrite fails; NOCOW failures do not set
    // COW_WRITE_ERROR, so a fast fsync from another thread does not wait for the ordered
    // extent, whose completion error path drops [16K,20K) with no inode lock while the fsync
    // logs the 64K map around it. Kernel policy: the pieces carry stale LOGGING onto the
    // modified list and the shrinker (or folio release) frees one while it is listed.
    //
    //   dio-write (EXCL)      fsync (inode+mmap EXCL)   ordered (no lock)         shrinker
    //   NOCOW [16K,20K)
    //   IO error, unlock
    //                         collect [0,64K) LOGGING
    //                         log ..                    IOERR: drop [16K,20K):
    //                                                   [0,16K) [20K,64K) LOGGING
    //                         done, unlock                                         scan: free
    //                                                                              listed piece
    let until = [SHRINKER_UAF, RELEASE_UAF];
    let k = exhaustive(
        "nocow-ioerr-fsync",
        &RunOpts::new(Policy::Kernel).until(&until),
        3000,
    );
    assert!(k.count(SHRINKER_UAF) > 0, "{k:?}");
    assert!(k.count(RELEASE_UAF) > 0, "{k:?}");
    assert!(k.count(Check::Em(Invariant::StaleLogging)) > 0, "{k:?}");
    assert!(k.count(Check::Em(Invariant::LoggingMapStolen)) > 0, "{k:?}");

    let fs = exhaustive(
        "nocow-ioerr-fsync",
        &RunOpts::new(Policy::FixedSplit).until(&until),
        3000,
    );
    assert_eq!(fs.failing, 0, "{fs:?}");
    assert!(fs.per_check.is_empty(), "{:?}", fs.per_check);

    // fixed-shrinker closes the shrinker's free but not folio release's: release treats
    // LOGGING maps as removable.
    let fsh = exhaustive(
        "nocow-ioerr-fsync",
        &RunOpts::new(Policy::FixedShrinker).until(&until),
        3000,
    );
    assert_eq!(fsh.count(SHRINKER_UAF), 0, "{fsh:?}");
    assert!(fsh.count(RELEASE_UAF) > 0, "{fsh:?}");
    assert!(fsh.count(Check::Em(Invariant::StaleLogging)) > 0, "{fsh:?}");

    let fb = exhaustive(
        "nocow-ioerr-fsync",
        &RunOpts::new(Policy::FixedBoth).until(&until),
        3000,
    );
    assert_eq!(fb.failing, 0, "{fb:?}");
}

#[test]
fn relocation_steals_a_logging_map_on_stock_locking() {
    // Test scenario: balance's invalidate_extent_cache drops whole maps (one file extent item
    // per leaf) under the io range lock only, while a fast fsync logs them. Kernel policy: the
    // dropped map loses LOGGING and is unlinked from fsync's private list: never logged, its
    // reference leaked. It does not split maps (leaf boundaries are item boundaries), so no
    // stale LOGGING. fixed-split keeps LOGGING on the original: fsync still logs it.
    //
    //   fsync (inode+mmap EXCL)            relocation (io range lock)
    //   collect A=[0,128K), B (LOGGING)
    //   log A ..                           drop [128K, MAX): B removed, unlinked
    //   B never logged
    let k = exhaustive("reloc-fsync", &RunOpts::new(Policy::Kernel), 10_000);
    assert_eq!(k.complete, Some(true));
    assert!(k.count(Check::Em(Invariant::LoggingMapStolen)) > 0, "{k:?}");
    assert_eq!(k.count(Check::Em(Invariant::StaleLogging)), 0, "{k:?}");
    for p in [Policy::FixedSplit, Policy::FixedBoth] {
        let s = exhaustive("reloc-fsync", &RunOpts::new(p), 10_000);
        assert_eq!(s.complete, Some(true));
        assert_eq!(s.failing, 0, "{p}: {s:?}");
    }
    let fsh = exhaustive("reloc-fsync", &RunOpts::new(Policy::FixedShrinker), 10_000);
    assert!(
        fsh.count(Check::Em(Invariant::LoggingMapStolen)) > 0,
        "{fsh:?}"
    );
}

#[test]
fn locked_paths_never_overlap_the_logging() {
    // Test scenario: punch hole and fallocate take the inode and mmap locks, buffered writes
    // the inode lock, and writeback only runs on pages fsync has already flushed: none of them
    // touches a map while fsync logs, under any policy; neither does the shrinker (it only
    // try-locks the mmap lock shared). Exhaustive for punch-fsync, seeds for buffered-fsync.
    //
    //   fsync (inode+mmap EXCL)            punch-hole / fallocate / buffered-write
    //   flush, collect, log                inode lock: blocked
    //   unlock                             drop range, hole / prealloc map
    let p = exhaustive("punch-fsync", &RunOpts::new(Policy::Kernel), 10_000);
    assert_eq!(p.complete, Some(true));
    assert_eq!(p.failing, 0, "{p:?}");
    assert!(p.per_check.is_empty(), "{:?}", p.per_check);
    let sc = shipped("buffered-fsync").unwrap();
    let b = explore_random(&sc, &RunOpts::new(Policy::Kernel), 0..400, |_, _| {});
    assert_eq!(b.failing, 0, "{b:?}");
    assert!(b.per_check.is_empty(), "{:?}", b.per_check);
}

#[test]
fn everything_at_once() {
    // Test scenario: every actor on two files. Kernel policy: relocation steals logging maps;
    // no run deadlocks, hangs, panics or hits the step limit under any policy, and with the
    // split fixed nothing fails.
    //
    //   fsync ino 257 (inode+mmap EXCL)   dio-write / relocation / reader   fsync ino 258 ...
    //   log ..                            drop ranges, add maps             (independent)
    let sc = shipped("everything").unwrap();
    for p in Policy::ALL {
        let s = explore_random(&sc, &RunOpts::new(p), 0..150, |_, _| {});
        for c in [
            Check::Deadlock,
            Check::Hung,
            Check::ActorPanic,
            Check::StepLimit,
        ] {
            assert_eq!(s.count(c), 0, "{p} {c}: {s:?}");
        }
        if p.split_fixed() {
            assert_eq!(s.failing, 0, "{p}: {s:?}");
        }
    }
}
