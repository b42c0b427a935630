//! The June 2026 configuration (KERNEL-SEMANTICS.md section 5): a preallocated NODATACOW
//! file, two threads doing O_DSYNC direct writes to different parts of it, ordered-extent
//! completion and the shrinker. Every schedule with at most one preemption is explored, with
//! stock locking and with `nosec`, under the four policies.

use ubtrfs_extent_map::{Invariant, Policy};
use ubtrfs_race::run::{explore_exhaustive, run_schedule, RunOpts, Summary};
use ubtrfs_race::scenario::shipped;
use ubtrfs_race::Check;

const UAF: Check = Check::ShrinkerRemovedListedLogging;
const BOUND: usize = 1;
const CAP: u64 = 50_000;

fn explore(policy: Policy, nosec: bool) -> Summary {
    let sc = shipped("prealloc-dsync-dio").unwrap();
    let opts = RunOpts::new(policy).nosec(nosec).until(&[UAF]);
    let s = explore_exhaustive(&sc, &opts, BOUND, CAP, |_, _| {});
    assert_eq!(
        s.complete,
        Some(true),
        "{policy} nosec={nosec}: cut at {CAP}"
    );
    s
}

#[test]
fn stock_locking_never_overlaps_the_logging() {
    // Test scenario: stock btrfs: every direct write takes the inode lock EXCLUSIVE, so the
    // range drop of one write cannot run while the other write's O_DSYNC fsync logs; in the
    // whole explored space (every schedule with <= 1 preemption) no check fails at all, and the
    // use-after-free point is never reached.
    //
    //   dio-write#1 (inode lock EXCL)         dio-write#2
    //   replace [0,64K) (splits prealloc)
    //   fsync: mmap lock, log N, P            inode lock EXCL: blocked
    //   unlock                                replace [512K,576K) (splits P, not LOGGING)
    let s = explore(Policy::Kernel, false);
    assert!(s.runs > 1000, "{s:?}");
    assert_eq!(s.failing, 0, "{s:?}");
    assert!(s.per_check.is_empty(), "{:?}", s.per_check);
}

#[test]
fn nosec_reaches_the_use_after_free_point_and_the_fixes_close_it() {
    // Test scenario: SB_NOSEC forced on: both writes take the inode lock SHARED, so writer 2's
    // replace-range splits the PREALLOC map writer 1's fsync collected. Kernel policy: the
    // pieces inherit LOGGING (stale), the original is stolen from fsync's list; after fsync
    // ends the shrinker frees a piece still linked on the modified list.
    //
    //   dio-write#1 (SHARED)               dio-write#2 (SHARED)              shrinker
    //   replace [0,64K): N, P=[64K,1M)
    //   fsync: collect N, P (LOGGING)
    //   log_one_extent N ..                replace [512K,576K): split P:
    //                                      pieces LOGGING on modified list,
    //                                      P unlinked from fsync's list
    //   clear N, done, unlock mmap                                            scan: remove a
    //                                                                          piece: listed +
    //                                                                          LOGGING: freed
    let k = explore(Policy::Kernel, true);
    assert!(k.count(UAF) > 0, "kernel: {k:?}");
    for inv in [
        Invariant::StaleLogging,
        Invariant::LoggingMapStolen,
        Invariant::RemovedStillListed,
        Invariant::FreedWhileInUse,
        Invariant::ShrinkerMetLogging,
    ] {
        assert!(k.count(Check::Em(inv)) > 0, "kernel {inv:?}: {k:?}");
    }
    assert!(k.count(Check::LoggingOutsideFsync) > 0, "{k:?}");
    assert!(k.failing < k.runs / 4, "most schedules are harmless: {k:?}");

    // The first failing schedule replays to the same violation, after the same steps.
    let sc = shipped("prealloc-dsync-dio").unwrap();
    let opts = RunOpts::new(Policy::Kernel).nosec(true).until(&[UAF]);
    let choices: Vec<u32> =
        ubtrfs_race::run::parse_schedule(k.first_failing_schedule.as_ref().unwrap()).unwrap();
    let r = run_schedule(&sc, &opts, &choices);
    let f = r.failure.as_ref().expect("replay fails again");
    assert_eq!(f.checks[0].0, UAF);
    assert_eq!(k.first_failing_checks, vec![UAF]);
    // The chain: stale LOGGING and the stolen map come first, the shrinker's free last.
    let stale = r.seen[&Check::Em(Invariant::StaleLogging)];
    let stolen = r.seen[&Check::Em(Invariant::LoggingMapStolen)];
    assert!(stale < f.step && stolen < f.step, "{:?}", r.seen);
    assert_eq!(r.actors[f.actor], "shrinker");

    // fixed-split: no stale LOGGING, nothing stolen, nothing freed while listed.
    let fs = explore(Policy::FixedSplit, true);
    assert_eq!(fs.failing, 0, "fixed-split: {fs:?}");
    assert!(fs.per_check.is_empty(), "fixed-split: {:?}", fs.per_check);

    // fixed-shrinker: the split bug remains (stale LOGGING, stolen maps, the shrinker meets
    // them) but the shrinker skips them: no free while listed.
    let fsh = explore(Policy::FixedShrinker, true);
    assert_eq!(fsh.count(UAF), 0, "{fsh:?}");
    assert_eq!(fsh.count(Check::Em(Invariant::FreedWhileInUse)), 0);
    assert_eq!(fsh.count(Check::Em(Invariant::RemovedStillListed)), 0);
    assert!(fsh.count(Check::Em(Invariant::StaleLogging)) > 0, "{fsh:?}");
    assert!(
        fsh.count(Check::Em(Invariant::LoggingMapStolen)) > 0,
        "{fsh:?}"
    );
    assert!(
        fsh.count(Check::Em(Invariant::ShrinkerMetLogging)) > 0,
        "{fsh:?}"
    );
    assert_eq!(fsh.failing, 0);

    let fb = explore(Policy::FixedBoth, true);
    assert_eq!(fb.failing, 0, "fixed-both: {fb:?}");
    assert!(fb.per_check.is_empty(), "fixed-both: {:?}", fb.per_check);
}
