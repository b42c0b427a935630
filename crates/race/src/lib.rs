//! ubtrfs-race: the race explorer. Actors modelled on the kernel's code paths (fsync, direct
//! and buffered writes, writeback, ordered-extent completion, fallocate, punch hole, folio
//! release, eviction, relocation, readers, the extent-map shrinker) drive the real extent-map
//! code (`ubtrfs-extent-map`) under a seeded deterministic scheduler. After every step the
//! layer's invariant counters and the explorer's own checks run; the first violation stops
//! the run and comes back with its schedule and a command line that replays it
//! (`ubtrfs race`). KERNEL-SEMANTICS.md section 5 is the question it answers.
//!
//! # Definitions
//! - [`Scenario`]: data: files (size, NODATACOW), their file extent items and whether the maps
//!   are cached or on the modified list, and the actors with their operations
//!   ([`scenario`] has the text format, shipped scenarios are in `scenarios/*.race`).
//! - Actor ([`ActorKind`]): one kernel code path on its own thread, a step machine whose steps
//!   end at scheduling points: the extent-map layer's [`ubtrfs_extent_map::SchedPoint`]s
//!   (reached inside the real code through the `sched-points` hook) and points the actor adds
//!   between kernel steps and at lock acquisition and release. Actors take the kernel's locks
//!   in the kernel's modes (the table in [`actors`]); a blocked acquisition makes the actor
//!   not runnable.
//! - Schedule: the list of choices ([`sched`]): at each point, which runnable actor goes on.
//!   A run is reproducible from (scenario, policy, options, seed) in random mode (seeds cycle
//!   through PCT with 0 to 3 priority changes and uniform choices) and from its choices in any
//!   mode; [`run::explore_exhaustive`] enumerates every schedule with at most K preemptions
//!   (DFS over the choices).
//! - [`Check`]: the layer's [`ubtrfs_extent_map::Invariant`] counters plus the explorer's
//!   own ([`check`]).
//!
//! # What is modelled
//! The extent-map layer itself is not modelled: it is the real code, with the policy of the
//! run (`kernel`, `fixed-split`, `fixed-shrinker`, `fixed-both`). Around it, [`world`] keeps
//! what decides who touches which map when: i_size, dirty and writeback ranges, the file
//! extent items (what `btrfs_get_extent` reads, where relocation's leaves start), ordered
//! extents (Running, IoDone, Completing, Complete, with IO errors) and io_tree range locks.
//! The inode lock and the mmap lock are the real `BtrfsInode` locks, so the shrinker's own
//! try-lock sees exactly who holds them.
//!
//! # What is not modelled
//! Transaction commits (one running transaction, generation 10), the log tree's content (what
//! fsync logged is recorded, not written), checksums, compression, reflinks and shared extents
//! (every NOCOW check succeeds on a regular extent of a NODATACOW file), truncate, mmap writes,
//! page cache residency (a folio is "cached" only while dirty or under writeback), memory
//! allocation failures, the fairness of rwsems (a reader may pass a waiting writer: a superset
//! of the kernel's schedules), several workqueue workers (one `ordered` actor completes
//! ordered extents in order; add more actors for more workers), and the relocation path that
//! try-locks the mmap lock (`replace_file_extents`).
//!
//! # Adding an actor
//! Add a variant to [`ActorKind`] (name, whether it needs an inode and ops), write its body in
//! the module named after the kernel file (`actors/*.rs`): take locks with [`Ctx::lock`] /
//! [`Ctx::lock_range`], wait with [`Ctx::wait_until`], end every kernel step with
//! [`Ctx::point`], never call the extent-map layer inside [`Ctx::world`]; then dispatch it in
//! `actors::body`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod actors;
pub mod check;
pub mod cli;
pub mod run;
pub mod scenario;
pub mod sched;
pub mod world;

pub use check::{Check, StopOn};
pub use run::{
    explore_exhaustive, explore_random, run_schedule, run_seed, RunOpts, RunResult, Summary,
};
pub use scenario::{ActorKind, ActorSpec, Scenario};
pub use sched::Ctx;

/// `64K`, `1M`, `MAX` for step descriptions.
pub fn fmt_size(v: u64) -> String {
    if v == u64::MAX {
        "MAX".into()
    } else if v == 0 {
        "0".into()
    } else if v & ((1 << 20) - 1) == 0 {
        format!("{}M", v >> 20)
    } else if v & 1023 == 0 {
        format!("{}K", v >> 10)
    } else {
        v.to_string()
    }
}
