//! What is checked after every step.
//!
//! - The extent-map layer's own invariant counters ([`Invariant`], `FsExtentMaps::stats`): any
//!   increase during a step is a violation by the actor that ran the step.
//! - The explorer's own checks:
//!   - [`Check::LoggingOutsideFsync`]: a map carrying LOGGING is in the tree or on the
//!     modified list while no fsync of that inode is in its logging pass (the stale flag of
//!     KERNEL-SEMANTICS.md section 5, seen as a state rather than as an insertion).
//!   - [`Check::ShrinkerRemovedListedLogging`]: during a shrinker step a map carrying LOGGING
//!     left its tree while still linked on the modified list: the kernel frees it there (the
//!     tree's reference is the last one) while it stays linked: the use-after-free point.
//!   - [`Check::ReleaseRemovedListedLogging`]: the same done by folio release.
//!   - [`Check::UnpinFailed`]: `btrfs_unpin_extent_cache` found no map or a misplaced one
//!     (WARN and transaction abort in the kernel).
//!   - [`Check::Deadlock`], [`Check::StepLimit`], [`Check::Hung`], [`Check::ActorPanic`]:
//!     the run could not go on.

use std::fmt;

use ubtrfs_extent_map::Invariant;

/// One thing the explorer checks. The names are the table's row names and `--until` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// A counter of the extent-map layer.
    Em(Invariant),
    /// LOGGING on a map in the tree or on the modified list while no fsync of the inode logs.
    LoggingOutsideFsync,
    /// The shrinker removed a map carrying LOGGING that is still on the modified list.
    ShrinkerRemovedListedLogging,
    /// Folio release removed a map carrying LOGGING that is still on the modified list.
    ReleaseRemovedListedLogging,
    /// `btrfs_unpin_extent_cache` failed (-ENOENT / -EUCLEAN: WARN, transaction abort).
    UnpinFailed,
    /// No actor can run and some are blocked.
    Deadlock,
    /// The run went past the step limit (a livelock, or a scenario too big for the limit).
    StepLimit,
    /// An actor ran for too long without reaching a scheduling point.
    Hung,
    /// An actor panicked (a bug in the explorer or in the code it drives).
    ActorPanic,
}

impl Check {
    /// Every check, in table order.
    pub fn all() -> Vec<Check> {
        let mut v: Vec<Check> = Invariant::ALL.iter().map(|i| Check::Em(*i)).collect();
        v.extend([
            Check::LoggingOutsideFsync,
            Check::ShrinkerRemovedListedLogging,
            Check::ReleaseRemovedListedLogging,
            Check::UnpinFailed,
            Check::Deadlock,
            Check::StepLimit,
            Check::Hung,
            Check::ActorPanic,
        ]);
        v
    }

    /// Stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Check::Em(i) => i.name(),
            Check::LoggingOutsideFsync => "logging_outside_fsync",
            Check::ShrinkerRemovedListedLogging => "shrinker_removed_listed_logging",
            Check::ReleaseRemovedListedLogging => "release_removed_listed_logging",
            Check::UnpinFailed => "unpin_failed",
            Check::Deadlock => "deadlock",
            Check::StepLimit => "step_limit",
            Check::Hung => "hung",
            Check::ActorPanic => "actor_panic",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Check> {
        Check::all().into_iter().find(|c| c.name() == s)
    }

    /// The run cannot go on after this, whatever the stop set says.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            Check::Deadlock | Check::StepLimit | Check::Hung | Check::ActorPanic
        )
    }

    /// One line saying what it means.
    pub fn meaning(self) -> &'static str {
        match self {
            Check::Em(Invariant::ShrinkerMetLogging) => "the shrinker met a map carrying LOGGING",
            Check::Em(Invariant::StaleLogging) => {
                "a map carrying LOGGING was inserted (a split piece inherited the flag)"
            }
            Check::Em(Invariant::RemovedStillListed) => {
                "a map left its tree while still linked on the modified list"
            }
            Check::Em(Invariant::DoubleMembership) => "a map in two trees or on two lists",
            Check::Em(Invariant::FreedWhileInUse) => {
                "the last reference of a map still in a tree or on a list was dropped (kernel: freed while listed)"
            }
            Check::Em(Invariant::UseAfterFree) => {
                "a walk of the modified list met a map the kernel had freed"
            }
            Check::Em(Invariant::LoggingMapStolen) => {
                "a map fsync collected was unlinked from its private list by another task (never logged, reference leaked)"
            }
            Check::Em(Invariant::PinnedRemoved) => "a PINNED map was removed from its tree",
            Check::Em(_) => "an extent-map invariant",
            Check::LoggingOutsideFsync => {
                "a map carrying LOGGING is in the tree or on the modified list while no fsync of the inode is logging"
            }
            Check::ShrinkerRemovedListedLogging => {
                "the shrinker removed a map carrying LOGGING still linked on the modified list (the kernel's use-after-free point)"
            }
            Check::ReleaseRemovedListedLogging => {
                "folio release removed a map carrying LOGGING still linked on the modified list (use-after-free)"
            }
            Check::UnpinFailed => {
                "btrfs_unpin_extent_cache found no map or a misplaced one (WARN, transaction abort)"
            }
            Check::Deadlock => "no actor can run and some are blocked",
            Check::StepLimit => "the run exceeded the step limit",
            Check::Hung => "an actor ran too long without reaching a scheduling point",
            Check::ActorPanic => "an actor panicked",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which checks stop a run (fatal ones always do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOn {
    /// The first violation of any check.
    Any,
    /// Only these (and fatal ones); the others are recorded and the run goes on.
    Only(Vec<Check>),
}

impl StopOn {
    /// Does `c` stop the run?
    pub fn stops(&self, c: Check) -> bool {
        c.is_fatal()
            || match self {
                StopOn::Any => true,
                StopOn::Only(v) => v.contains(&c),
            }
    }

    /// Parses `any` or a comma-separated list of check names.
    pub fn parse(s: &str) -> Result<StopOn, String> {
        if s == "any" {
            return Ok(StopOn::Any);
        }
        let mut v = Vec::new();
        for n in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            v.push(Check::parse(n).ok_or_else(|| {
                format!(
                    "unknown check {n:?} (expected any or one of: {})",
                    Check::all()
                        .iter()
                        .map(|c| c.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?);
        }
        if v.is_empty() {
            return Err("empty --until list".into());
        }
        Ok(StopOn::Only(v))
    }

    /// The form `parse` accepts.
    pub fn to_arg(&self) -> String {
        match self {
            StopOn::Any => "any".into(),
            StopOn::Only(v) => v.iter().map(|c| c.name()).collect::<Vec<_>>().join(","),
        }
    }
}
