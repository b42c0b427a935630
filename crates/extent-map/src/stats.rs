//! Counters and invariant checks (always on, cheap, reported once through `tracing`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// The invariants of KERNEL-SEMANTICS.md section 5 that the kernel relies on and that this crate
/// checks and counts instead (never panicking).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Invariant {
    /// The shrinker met a map with LOGGING set.
    ShrinkerMetLogging,
    /// A map with LOGGING exists outside any fsync logging (a split piece inherited the flag).
    StaleLogging,
    /// A map removed from its tree stays linked on the modified list (LOGGING skipped the
    /// unlink in `btrfs_remove_extent_mapping`).
    RemovedStillListed,
    /// A map was inserted into a second tree, or linked onto a second list.
    DoubleMembership,
    /// The final release of a map that is still in a tree or on a list (the WARN_ONs in
    /// `btrfs_free_extent_map`); the kernel frees it anyway: a use-after-free to come.
    FreedWhileInUse,
    /// A walk of the modified list met a map the kernel would already have freed (list
    /// corruption in the kernel). Here the entry is unlinked and skipped.
    UseAfterFree,
    /// A map collected by fsync was unlinked from fsync's private list by another task: it is
    /// never logged and fsync's reference to it is leaked.
    LoggingMapStolen,
    /// A PINNED map was removed from its tree (the WARN_ON in `btrfs_remove_extent_mapping` /
    /// `replace_extent_mapping`).
    PinnedRemoved,
}

impl Invariant {
    /// Number of invariants.
    pub const COUNT: usize = 8;
    /// All invariants, in declaration order.
    pub const ALL: [Invariant; Invariant::COUNT] = [
        Invariant::ShrinkerMetLogging,
        Invariant::StaleLogging,
        Invariant::RemovedStillListed,
        Invariant::DoubleMembership,
        Invariant::FreedWhileInUse,
        Invariant::UseAfterFree,
        Invariant::LoggingMapStolen,
        Invariant::PinnedRemoved,
    ];

    /// A stable snake_case name for logs and the stats command.
    pub const fn name(self) -> &'static str {
        match self {
            Invariant::ShrinkerMetLogging => "shrinker_met_logging",
            Invariant::StaleLogging => "stale_logging",
            Invariant::RemovedStillListed => "removed_still_listed",
            Invariant::DoubleMembership => "double_membership",
            Invariant::FreedWhileInUse => "freed_while_in_use",
            Invariant::UseAfterFree => "use_after_free",
            Invariant::LoggingMapStolen => "logging_map_stolen",
            Invariant::PinnedRemoved => "pinned_removed",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Plain snapshot of the filesystem-wide counters ([`crate::FsExtentMaps::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Maps in the trees of fs-tree inodes (`evictable_extent_maps`).
    pub cached_maps: u64,
    /// Approximate memory of those maps (`cached_maps * MAP_FOOTPRINT_BYTES`).
    pub cached_bytes: u64,
    /// Completed shrinker runs.
    pub shrinker_runs: u64,
    /// Scan requests dropped because a run was pending or running.
    pub shrinker_requests_dropped: u64,
    /// Maps visited by the shrinker (skipped ones included, as in the kernel).
    pub shrinker_scanned: u64,
    /// Maps the shrinker removed.
    pub shrinker_dropped: u64,
    /// Maps skipped because PINNED.
    pub shrinker_skipped_pinned: u64,
    /// Maps skipped because LOGGING (fixed-shrinker policies only).
    pub shrinker_skipped_logging: u64,
    /// Inodes skipped because their mmap lock was busy.
    pub shrinker_skipped_inode_busy: u64,
    /// Times the shrinker set NEEDS_FULL_SYNC on an inode.
    pub shrinker_full_sync_set: u64,
    /// Kernel references that can never be dropped (fsync's reference on a stolen map).
    pub leaked_refs: u64,
    /// Maps fsync collected but never logged because they were stolen from its list.
    pub logging_maps_lost: u64,
    /// Maps handed to fsync's per-map logging work.
    pub maps_logged: u64,
    /// Invariant violations, indexed like [`Invariant::ALL`].
    pub invariant_violations: [u64; Invariant::COUNT],
}

impl Stats {
    /// Violations of one invariant.
    pub fn violations(&self, inv: Invariant) -> u64 {
        self.invariant_violations[inv.index()]
    }

    /// Violations of all invariants.
    pub fn total_violations(&self) -> u64 {
        self.invariant_violations.iter().sum()
    }
}

/// The atomic counters behind [`Stats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) shrinker_runs: AtomicU64,
    pub(crate) shrinker_requests_dropped: AtomicU64,
    pub(crate) shrinker_scanned: AtomicU64,
    pub(crate) shrinker_dropped: AtomicU64,
    pub(crate) shrinker_skipped_pinned: AtomicU64,
    pub(crate) shrinker_skipped_logging: AtomicU64,
    pub(crate) shrinker_skipped_inode_busy: AtomicU64,
    pub(crate) shrinker_full_sync_set: AtomicU64,
    pub(crate) leaked_refs: AtomicU64,
    pub(crate) logging_maps_lost: AtomicU64,
    pub(crate) maps_logged: AtomicU64,
    violations: [AtomicU64; Invariant::COUNT],
    reported: [AtomicBool; Invariant::COUNT],
}

impl Counters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Counts a violation; the first one of each kind is reported through `tracing`.
    pub(crate) fn violation(&self, inv: Invariant, root: u64, ino: u64, start: u64, len: u64) {
        self.violations[inv.index()].fetch_add(1, Relaxed);
        if !self.reported[inv.index()].swap(true, Relaxed) {
            tracing::warn!(
                invariant = inv.name(),
                root,
                ino,
                start,
                len,
                "extent map invariant violated: {} (root {root} ino {ino} range [{start}, {})); further violations are only counted",
                inv.name(),
                start.saturating_add(len)
            );
        }
    }

    pub(crate) fn snapshot(&self, cached_maps: u64, footprint: u64) -> Stats {
        let mut invariant_violations = [0; Invariant::COUNT];
        for (o, v) in invariant_violations.iter_mut().zip(&self.violations) {
            *o = v.load(Relaxed);
        }
        Stats {
            cached_maps,
            cached_bytes: cached_maps.saturating_mul(footprint),
            shrinker_runs: self.shrinker_runs.load(Relaxed),
            shrinker_requests_dropped: self.shrinker_requests_dropped.load(Relaxed),
            shrinker_scanned: self.shrinker_scanned.load(Relaxed),
            shrinker_dropped: self.shrinker_dropped.load(Relaxed),
            shrinker_skipped_pinned: self.shrinker_skipped_pinned.load(Relaxed),
            shrinker_skipped_logging: self.shrinker_skipped_logging.load(Relaxed),
            shrinker_skipped_inode_busy: self.shrinker_skipped_inode_busy.load(Relaxed),
            shrinker_full_sync_set: self.shrinker_full_sync_set.load(Relaxed),
            leaked_refs: self.leaked_refs.load(Relaxed),
            logging_maps_lost: self.logging_maps_lost.load(Relaxed),
            maps_logged: self.maps_logged.load(Relaxed),
            invariant_violations,
        }
    }
}
