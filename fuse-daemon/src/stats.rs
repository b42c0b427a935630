//! `ubtrfs stats` and `ubtrfs shrink`: what the daemon measures, gathered into one
//! [`Snapshot`] on the daemon side, sent over the control socket (control.rs) and printed
//! grouped with units (or as JSON) on the client side.
//!
//! Sources: `FsInfo::counters` (I/O, commits, fsync), the tree-block cache of the block reader,
//! `FsExtentMaps::stats` (cached maps, shrinker outcomes, invariant violations) and the memory
//! pressure monitor (pressure.rs). Nothing is printed that is not measured: what the daemon
//! does not count (skips by generation: no such rule; batched fsyncs from an older daemon)
//! is `null` in JSON and `n/a` with the reason on the terminal, never a zero.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubtrfs_extent_map::{Invariant, MAP_FOOTPRINT_BYTES};
use ubtrfs_fs::FsInfo;

use crate::control::Client;
use crate::pressure::{PressureMonitorState, PressureSnapshot};

/// Why there is no batched-fsync count (a snapshot from a daemon that did not batch).
const NO_LOG_BATCH: &str = "n/a (not counted by the daemon that sent this snapshot)";
/// Why there is no generation skip count.
const NO_GENERATION_SKIP: &str = "n/a (no such skip: a modified map of the running \
                                  transaction is dropped and NEEDS_FULL_SYNC set, see below)";

/// Extent maps cached across the filesystem (fs-tree inodes only, as the kernel counts).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMapStats {
    /// `evictable_extent_maps` (`btrfs_nr_cached_objects`).
    pub cached: u64,
    pub cached_bytes: u64,
    /// Approximate memory of one cached map (B+tree slot, identity node, share of nodes).
    pub bytes_per_map: u64,
    /// Sizes behind one map: the value, its B+tree leaf slot, its identity node.
    pub value_bytes: u64,
    pub slot_bytes: u64,
    pub node_bytes: u64,
    /// `em_max=` / `em_max_bytes=` (None: no budget).
    pub budget_maps: Option<u64>,
    pub budget_bytes: Option<u64>,
}

/// Outcomes of the extent-map shrinker (`btrfs_scan_inode`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ShrinkerStats {
    pub policy: String,
    pub runs: u64,
    /// Requests dropped because a run was pending or running (the kernel's cmpxchg).
    pub requests_dropped: u64,
    /// Maps visited, skipped ones included (as the kernel counts).
    pub scanned: u64,
    pub dropped: u64,
    pub skipped_pinned: u64,
    pub skipped_logging: u64,
    /// Inodes (not maps) skipped because their mmap lock was busy.
    pub skipped_inode_busy: u64,
    /// Always None: there is no generation-based skip (KERNEL-SEMANTICS.md section 3).
    pub skipped_generation: Option<u64>,
    /// Times the shrinker set NEEDS_FULL_SYNC (a listed map of the running transaction went).
    pub full_sync_set: u64,
}

/// fsync outcomes (tree_log.rs `btrfs_sync_file`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct FsyncStats {
    /// Logged through the fast path (modified extent maps).
    pub fast: u64,
    /// Logged through the full path (NEEDS_FULL_SYNC: every extent item of the transaction).
    pub full: u64,
    /// Nothing to log (`skip_inode_logging`).
    pub skipped: u64,
    /// Of `skipped`: the inode was already in the log of the running transaction with nothing
    /// changed since (`btrfs_inode_in_log`). 0 in snapshots from daemons that did not count it.
    #[serde(default)]
    pub skipped_in_log: u64,
    /// fsyncs run by O_DSYNC/O_SYNC direct writes under their inode lock (only the mmap lock
    /// taken: `skip_ilock`); also counted by outcome.
    #[serde(default)]
    pub dio: u64,
    /// Fell back to a full transaction commit, in all and by reason.
    pub full_commit: u64,
    pub full_commit_reasons: BTreeMap<String, u64>,
    /// Log syncs (superblock writes pointing at the log).
    pub log_syncs: u64,
    /// Logged fsyncs whose log transid another fsync's log sync had already written (log_batch
    /// joining); None in snapshots from daemons that did not count it.
    pub batched: Option<u64>,
    /// The extent-map crate's side of fast fsync: maps handed to logging, maps lost from
    /// fsync's list, references leaked with them.
    pub extent_maps_logged: u64,
    pub logging_maps_lost: u64,
    pub leaked_refs: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TransactionStats {
    pub committed: u64,
    pub commit_ns_total: u64,
    pub commit_ns_last: u64,
    pub tree_blocks_written: u64,
    /// Last committed generation (transid).
    pub generation: u64,
    /// The mount turned read-only after a transaction abort.
    pub aborted: bool,
    /// Commits made to unpin space before answering ENOSPC.
    #[serde(default)]
    pub enospc_commits: u64,
    /// Data bytes reserved by writes and fallocate, not yet allocated (`bytes_may_use`).
    #[serde(default)]
    pub data_may_use: u64,
    /// Size of the global block reserve.
    #[serde(default)]
    pub global_rsv: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeBlockCacheStats {
    pub bytes: u64,
    pub blocks: u64,
    pub budget_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ChecksumErrorStats {
    /// Data sectors that failed verification on every copy (the read got EIO).
    pub data: u64,
    /// Checksum mismatches counted by the block reader: tree blocks, plus data sectors that no
    /// mirror could repair.
    pub block_reader: u64,
    /// Tree-block copies that failed to read or verify (another mirror may have served).
    pub bad_tree_block_copies: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub decompressed_extents: u64,
    /// O_DIRECT writes that stayed direct, and those that fell back to buffered + writeback
    /// (checksummed inode, unaligned range), as `btrfs_direct_write` decides.
    #[serde(default)]
    pub direct_writes: u64,
    #[serde(default)]
    pub direct_write_fallbacks: u64,
    /// Bytes written back in place over regular extents of NODATACOW files.
    #[serde(default)]
    pub nocow_bytes: u64,
    /// Bytes written back in place into preallocated extents.
    #[serde(default)]
    pub prealloc_written_bytes: u64,
}

/// What the log replay at mount did, per stage (`btrfs_recover_log_trees`; tree_log.rs
/// `ReplayStats`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LogReplayStats {
    pub log_trees: u64,
    pub log_blocks_pinned: u64,
    /// Stage 1 (LOG_WALK_REPLAY_INODES): inode items copied.
    pub inodes: u64,
    /// Stages 2-3: names added from INODE_REF/DIR_INDEX items, names removed by DIR_LOG_INDEX
    /// ranges and by the link-count fix-up.
    pub names_added: u64,
    pub names_removed: u64,
    /// Stage 3 (LOG_WALK_REPLAY_ALL): file extent items, checksum items, xattrs.
    pub extents: u64,
    pub csum_items: u64,
    pub xattrs: u64,
    /// Orphan items left for the orphan cleanup (inodes whose last name the replay removed).
    pub orphans: u64,
}

/// Everything `ubtrfs stats` shows, as the daemon measured it at one moment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub mountpoint: String,
    pub image: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub readonly: bool,
    pub extent_maps: ExtentMapStats,
    pub shrinker: ShrinkerStats,
    /// Violations per invariant, by `Invariant::name` (each 0 in a healthy run).
    pub invariant_violations: BTreeMap<String, u64>,
    pub fsync: FsyncStats,
    pub transactions: TransactionStats,
    pub tree_block_cache: TreeBlockCacheStats,
    pub checksum_errors: ChecksumErrorStats,
    pub io: IoStats,
    pub memory_pressure: PressureSnapshot,
    /// The log replay this mount did (None: no log was pending, or `rescue=nologreplay`).
    #[serde(default)]
    pub log_replay: Option<LogReplayStats>,
}

/// What one `ubtrfs shrink` request did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ShrinkReport {
    /// False when nothing was cached, or a run was already pending (the request is dropped,
    /// as the kernel's `btrfs_free_extent_maps` drops it).
    pub ran: bool,
    pub nr_to_scan: u64,
    pub cached_before: u64,
    pub cached_after: u64,
    pub scanned: u64,
    pub dropped: u64,
    pub skipped_pinned: u64,
    pub skipped_logging: u64,
    pub skipped_inode_busy: u64,
    pub full_sync_set: u64,
    pub elapsed_us: u64,
}

/// The daemon's side: the filesystem and what the control socket and the pressure monitor
/// need to know about this mount.
pub struct Daemon {
    pub fs: Arc<FsInfo>,
    /// Canonical mount point (the control socket's key).
    pub mountpoint: PathBuf,
    pub image: PathBuf,
    pub started: Instant,
    /// `em_max=` and `em_max_bytes=` (0: none).
    pub budget_maps: u64,
    pub budget_bytes: u64,
    pub pressure: Arc<PressureMonitorState>,
}

impl Daemon {
    /// Gather every counter (cheap: atomics and one cache-stats read).
    pub fn snapshot(&self) -> Snapshot {
        let fs = &self.fs;
        let c = &fs.counters;
        let em = fs.ems.stats();
        let cache = fs.reader.cache_stats();
        let (value, slot, node) = ubtrfs_extent_map::type_sizes();
        let invariant_violations = Invariant::ALL
            .iter()
            .map(|i| (i.name().to_string(), em.violations(*i)))
            .collect();
        Snapshot {
            mountpoint: self.mountpoint.display().to_string(),
            image: self.image.display().to_string(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            readonly: fs.is_readonly(),
            extent_maps: ExtentMapStats {
                cached: em.cached_maps,
                cached_bytes: em.cached_bytes,
                bytes_per_map: MAP_FOOTPRINT_BYTES,
                value_bytes: value as u64,
                slot_bytes: slot as u64,
                node_bytes: node as u64,
                budget_maps: (self.budget_maps != 0).then_some(self.budget_maps),
                budget_bytes: (self.budget_bytes != 0).then_some(self.budget_bytes),
            },
            shrinker: ShrinkerStats {
                policy: fs.ems.policy().name().to_string(),
                runs: em.shrinker_runs,
                requests_dropped: em.shrinker_requests_dropped,
                scanned: em.shrinker_scanned,
                dropped: em.shrinker_dropped,
                skipped_pinned: em.shrinker_skipped_pinned,
                skipped_logging: em.shrinker_skipped_logging,
                skipped_inode_busy: em.shrinker_skipped_inode_busy,
                skipped_generation: None,
                full_sync_set: em.shrinker_full_sync_set,
            },
            invariant_violations,
            fsync: FsyncStats {
                fast: c.fsync_fast.load(Relaxed),
                full: c.fsync_full.load(Relaxed),
                skipped: c.fsync_skipped.load(Relaxed),
                skipped_in_log: c.fsync_skipped_in_log.load(Relaxed),
                dio: c.fsync_dio.load(Relaxed),
                full_commit: c.fsync_full_commit.load(Relaxed),
                full_commit_reasons: c
                    .full_commit_reasons
                    .lock()
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                log_syncs: c.log_syncs.load(Relaxed),
                batched: Some(c.fsync_batched.load(Relaxed)),
                extent_maps_logged: em.maps_logged,
                logging_maps_lost: em.logging_maps_lost,
                leaked_refs: em.leaked_refs,
            },
            transactions: TransactionStats {
                committed: c.commits.load(Relaxed),
                commit_ns_total: c.commit_ns_total.load(Relaxed),
                commit_ns_last: c.commit_ns_last.load(Relaxed),
                tree_blocks_written: c.commit_blocks_written.load(Relaxed),
                generation: fs.ems.generation(),
                aborted: fs.aborted.load(Relaxed),
                enospc_commits: c.enospc_commits.load(Relaxed),
                data_may_use: fs.data_may_use.load(Relaxed),
                global_rsv: ubtrfs_fs::space_info::global_rsv_size(fs),
            },
            tree_block_cache: TreeBlockCacheStats {
                bytes: cache.bytes,
                blocks: cache.blocks,
                budget_bytes: fs.options.block_cache_bytes,
                hits: cache.hits,
                misses: cache.misses,
            },
            checksum_errors: ChecksumErrorStats {
                data: c.data_csum_errors.load(Relaxed),
                block_reader: cache.csum_errors,
                bad_tree_block_copies: cache.bad_copies,
            },
            io: IoStats {
                bytes_read: c.bytes_read.load(Relaxed),
                bytes_written: c.bytes_written.load(Relaxed),
                decompressed_extents: c.decompressed_extents.load(Relaxed),
                direct_writes: c.direct_writes.load(Relaxed),
                direct_write_fallbacks: c.direct_write_fallbacks.load(Relaxed),
                nocow_bytes: c.nocow_bytes.load(Relaxed),
                prealloc_written_bytes: c.prealloc_written_bytes.load(Relaxed),
            },
            memory_pressure: self.pressure.snapshot(),
            log_replay: fs.counters.replay.lock().map(|r| LogReplayStats {
                log_trees: r.log_trees,
                log_blocks_pinned: r.log_blocks_pinned,
                inodes: r.inodes,
                names_added: r.names_added,
                names_removed: r.names_removed,
                extents: r.extents,
                csum_items: r.csum_items,
                xattrs: r.xattrs,
                orphans: r.orphans,
            }),
        }
    }

    /// Run the shrinker now over `nr` maps (default: all cached), as `drop_caches` would reach
    /// it through the superblock shrinker (`btrfs_nr_cached_objects`, then
    /// `btrfs_free_cached_objects`), on this thread.
    pub fn shrink(&self, nr: Option<u64>) -> ShrinkReport {
        let ems = &self.fs.ems;
        let before = ems.stats();
        let cached = ems.btrfs_nr_cached_objects();
        tracing::trace!(target: "btrfs_extent_map_shrinker_count", nr = cached);
        let nr_to_scan = nr.unwrap_or(cached).min(i64::MAX as u64);
        let t = Instant::now();
        // A run can only be started here or by a budget overrun or the pressure monitor, one
        // at a time: when ours ran, the counter deltas are ours (unless another run finished
        // between the snapshot above and our start).
        let ran = ems.btrfs_free_extent_maps(nr_to_scan);
        let elapsed_us = t.elapsed().as_micros() as u64;
        let after = ems.stats();
        let d = |a: u64, b: u64| a.saturating_sub(b);
        ShrinkReport {
            ran,
            nr_to_scan,
            cached_before: cached,
            cached_after: after.cached_maps,
            scanned: d(after.shrinker_scanned, before.shrinker_scanned),
            dropped: d(after.shrinker_dropped, before.shrinker_dropped),
            skipped_pinned: d(
                after.shrinker_skipped_pinned,
                before.shrinker_skipped_pinned,
            ),
            skipped_logging: d(
                after.shrinker_skipped_logging,
                before.shrinker_skipped_logging,
            ),
            skipped_inode_busy: d(
                after.shrinker_skipped_inode_busy,
                before.shrinker_skipped_inode_busy,
            ),
            full_sync_set: d(after.shrinker_full_sync_set, before.shrinker_full_sync_set),
            elapsed_us,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Presentation: one table drives the terminal output (absolute or deltas) and the JSON deltas.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Only grows: `--watch` shows the change.
    Counter,
    /// A current value: `--watch` shows it with its change.
    Gauge,
}

#[derive(Clone, Copy, Debug)]
enum Unit {
    /// A count of something, named.
    Of(&'static str),
    Bytes,
    Nanos,
}

#[derive(Clone, Debug)]
struct Row {
    /// Field name in the JSON (`group.key`).
    key: &'static str,
    label: &'static str,
    kind: Kind,
    unit: Unit,
    /// None: not measured; `text` says why (or says what the value is, for text rows).
    value: Option<u64>,
    text: String,
}

#[derive(Clone, Debug)]
struct Group {
    key: &'static str,
    title: String,
    rows: Vec<Row>,
}

fn counter(key: &'static str, label: &'static str, unit: Unit, v: u64) -> Row {
    Row {
        key,
        label,
        kind: Kind::Counter,
        unit,
        value: Some(v),
        text: String::new(),
    }
}

fn gauge(key: &'static str, label: &'static str, unit: Unit, v: u64) -> Row {
    Row {
        key,
        label,
        kind: Kind::Gauge,
        unit,
        value: Some(v),
        text: String::new(),
    }
}

fn text(key: &'static str, label: &'static str, t: impl Into<String>) -> Row {
    Row {
        key,
        label,
        kind: Kind::Gauge,
        unit: Unit::Of(""),
        value: None,
        text: t.into(),
    }
}

fn opt_counter(
    key: &'static str,
    label: &'static str,
    unit: Unit,
    v: Option<u64>,
    why: &str,
) -> Row {
    Row {
        value: v,
        text: if v.is_none() {
            why.to_string()
        } else {
            String::new()
        },
        ..counter(key, label, unit, 0)
    }
}

fn table(s: &Snapshot) -> Vec<Group> {
    let maps = Unit::Of("maps");
    let em = &s.extent_maps;
    let budget = |v: Option<u64>, unit: Unit, key, label, opt: &str| match v {
        Some(v) => gauge(key, label, unit, v),
        None => text(key, label, format!("none (no {opt}=)")),
    };
    let sh = &s.shrinker;
    let mut inv_rows: Vec<Row> = Vec::new();
    for inv in Invariant::ALL {
        let n = s.invariant_violations.get(inv.name()).copied().unwrap_or(0);
        inv_rows.push(counter(inv.name(), inv.name(), Unit::Of(""), n));
    }
    let f = &s.fsync;
    let t = &s.transactions;
    let avg = t.commit_ns_total.checked_div(t.committed).unwrap_or(0);
    let c = &s.tree_block_cache;
    let p = &s.memory_pressure;
    vec![
        Group {
            key: "extent_maps",
            title: "Extent maps".into(),
            rows: vec![
                gauge("cached", "cached", maps, em.cached),
                gauge(
                    "cached_bytes",
                    "cached memory",
                    Unit::Bytes,
                    em.cached_bytes,
                ),
                Row {
                    text: format!(
                        "(B+tree slot {} B, node {} B, tree share; value {} B; the kernel's \
                         struct extent_map is 104 B)",
                        em.slot_bytes, em.node_bytes, em.value_bytes
                    ),
                    ..gauge("bytes_per_map", "per map", Unit::Bytes, em.bytes_per_map)
                },
                budget(
                    em.budget_maps,
                    maps,
                    "budget_maps",
                    "budget (count)",
                    "em_max",
                ),
                budget(
                    em.budget_bytes,
                    Unit::Bytes,
                    "budget_bytes",
                    "budget (memory)",
                    "em_max_bytes",
                ),
            ],
        },
        Group {
            key: "shrinker",
            title: format!("Extent-map shrinker (policy {})", sh.policy),
            rows: vec![
                counter("runs", "runs", Unit::Of("runs"), sh.runs),
                counter(
                    "requests_dropped",
                    "requests dropped (run pending)",
                    Unit::Of("requests"),
                    sh.requests_dropped,
                ),
                counter("scanned", "scanned", maps, sh.scanned),
                counter("dropped", "dropped", maps, sh.dropped),
                counter("skipped_pinned", "skipped: pinned", maps, sh.skipped_pinned),
                counter(
                    "skipped_logging",
                    "skipped: logging",
                    maps,
                    sh.skipped_logging,
                ),
                counter(
                    "skipped_inode_busy",
                    "skipped: inode busy",
                    Unit::Of("inodes"),
                    sh.skipped_inode_busy,
                ),
                opt_counter(
                    "skipped_generation",
                    "skipped: generation",
                    maps,
                    sh.skipped_generation,
                    NO_GENERATION_SKIP,
                ),
                counter(
                    "full_sync_set",
                    "NEEDS_FULL_SYNC set",
                    Unit::Of("times"),
                    sh.full_sync_set,
                ),
            ],
        },
        Group {
            key: "invariant_violations",
            title: "Invariant violations (each 0 in a healthy run)".into(),
            rows: inv_rows,
        },
        Group {
            key: "fsync",
            title: "fsync".into(),
            rows: vec![
                counter("fast", "logged, fast path", Unit::Of("fsyncs"), f.fast),
                counter(
                    "full",
                    "logged, full path (full sync)",
                    Unit::Of("fsyncs"),
                    f.full,
                ),
                counter(
                    "skipped",
                    "skipped (nothing to log)",
                    Unit::Of("fsyncs"),
                    f.skipped,
                ),
                counter(
                    "skipped_in_log",
                    "  of which already in the log",
                    Unit::Of("fsyncs"),
                    f.skipped_in_log,
                ),
                counter(
                    "dio",
                    "under a direct write's inode lock",
                    Unit::Of("fsyncs"),
                    f.dio,
                ),
                Row {
                    text: if f.full_commit_reasons.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "({})",
                            f.full_commit_reasons
                                .iter()
                                .map(|(k, v)| format!("{k}: {v}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    ..counter(
                        "full_commit",
                        "full transaction commits",
                        Unit::Of("fsyncs"),
                        f.full_commit,
                    )
                },
                counter("log_syncs", "log syncs", Unit::Of("syncs"), f.log_syncs),
                opt_counter(
                    "batched",
                    "batched (log_batch)",
                    Unit::Of("fsyncs"),
                    f.batched,
                    NO_LOG_BATCH,
                ),
                counter(
                    "extent_maps_logged",
                    "extent maps logged",
                    maps,
                    f.extent_maps_logged,
                ),
                counter(
                    "logging_maps_lost",
                    "logging maps lost",
                    maps,
                    f.logging_maps_lost,
                ),
                counter(
                    "leaked_refs",
                    "leaked map references",
                    Unit::Of("refs"),
                    f.leaked_refs,
                ),
            ],
        },
        Group {
            key: "transactions",
            title: if t.aborted {
                "Transactions (ABORTED: the mount is read-only)".into()
            } else {
                "Transactions".into()
            },
            rows: vec![
                counter("committed", "committed", Unit::Of("commits"), t.committed),
                counter(
                    "commit_ns_total",
                    "commit time, total",
                    Unit::Nanos,
                    t.commit_ns_total,
                ),
                gauge("commit_ns_avg", "commit time, average", Unit::Nanos, avg),
                gauge(
                    "commit_ns_last",
                    "commit time, last",
                    Unit::Nanos,
                    t.commit_ns_last,
                ),
                counter(
                    "tree_blocks_written",
                    "tree blocks written",
                    Unit::Of("blocks"),
                    t.tree_blocks_written,
                ),
                gauge("generation", "generation", Unit::Of(""), t.generation),
                counter(
                    "enospc_commits",
                    "commits to unpin space before ENOSPC",
                    Unit::Of("commits"),
                    t.enospc_commits,
                ),
                gauge(
                    "data_may_use",
                    "data reserved, not yet allocated",
                    Unit::Bytes,
                    t.data_may_use,
                ),
                gauge(
                    "global_rsv",
                    "global block reserve",
                    Unit::Bytes,
                    t.global_rsv,
                ),
            ],
        },
        Group {
            key: "tree_block_cache",
            title: "Tree-block cache".into(),
            rows: vec![
                gauge("bytes", "size", Unit::Bytes, c.bytes),
                gauge("blocks", "blocks", Unit::Of("blocks"), c.blocks),
                gauge("budget_bytes", "budget", Unit::Bytes, c.budget_bytes),
                counter("hits", "hits", Unit::Of("lookups"), c.hits),
                counter("misses", "misses", Unit::Of("lookups"), c.misses),
            ],
        },
        Group {
            key: "checksum_errors",
            title: "Checksum errors".into(),
            rows: vec![
                counter(
                    "data",
                    "data (EIO returned)",
                    Unit::Of("sectors"),
                    s.checksum_errors.data,
                ),
                counter(
                    "block_reader",
                    "block reader mismatches",
                    Unit::Of(""),
                    s.checksum_errors.block_reader,
                ),
                counter(
                    "bad_tree_block_copies",
                    "bad tree-block copies",
                    Unit::Of("copies"),
                    s.checksum_errors.bad_tree_block_copies,
                ),
            ],
        },
        Group {
            key: "io",
            title: "I/O".into(),
            rows: vec![
                counter("bytes_read", "read", Unit::Bytes, s.io.bytes_read),
                counter("bytes_written", "written", Unit::Bytes, s.io.bytes_written),
                counter(
                    "decompressed_extents",
                    "extents decompressed",
                    Unit::Of("extents"),
                    s.io.decompressed_extents,
                ),
                counter(
                    "direct_writes",
                    "direct writes",
                    Unit::Of("writes"),
                    s.io.direct_writes,
                ),
                counter(
                    "direct_write_fallbacks",
                    "direct writes done buffered",
                    Unit::Of("writes"),
                    s.io.direct_write_fallbacks,
                ),
                counter(
                    "nocow_bytes",
                    "written in place (NODATACOW)",
                    Unit::Bytes,
                    s.io.nocow_bytes,
                ),
                counter(
                    "prealloc_written_bytes",
                    "written in place (prealloc)",
                    Unit::Bytes,
                    s.io.prealloc_written_bytes,
                ),
            ],
        },
        Group {
            key: "memory_pressure",
            title: "Memory pressure".into(),
            rows: vec![
                text("psi", "PSI", p.psi_description()),
                text("cgroup", "cgroup", p.cgroup_description()),
                counter("psi_events", "PSI events", Unit::Of("events"), p.psi_events),
                counter(
                    "limit_events",
                    "near cgroup limit",
                    Unit::Of("events"),
                    p.limit_events,
                ),
                counter(
                    "shrinker_runs",
                    "shrinker runs started",
                    Unit::Of("runs"),
                    p.shrinker_runs,
                ),
                counter(
                    "maps_requested",
                    "maps asked to scan",
                    maps,
                    p.maps_requested,
                ),
            ],
        },
        Group {
            key: "log_replay",
            title: "Log replay at mount".into(),
            rows: match &s.log_replay {
                None => vec![text(
                    "replayed",
                    "replayed",
                    "none (no log was pending, or rescue=nologreplay)",
                )],
                Some(r) => {
                    let items = Unit::Of("items");
                    vec![
                        gauge("log_trees", "log trees", Unit::Of("trees"), r.log_trees),
                        gauge(
                            "log_blocks_pinned",
                            "log blocks pinned",
                            Unit::Of("blocks"),
                            r.log_blocks_pinned,
                        ),
                        gauge("inodes", "stage 1: inode items", items, r.inodes),
                        gauge(
                            "names_added",
                            "names added",
                            Unit::Of("names"),
                            r.names_added,
                        ),
                        gauge(
                            "names_removed",
                            "names removed",
                            Unit::Of("names"),
                            r.names_removed,
                        ),
                        gauge("extents", "file extent items", items, r.extents),
                        gauge("csum_items", "checksum items", items, r.csum_items),
                        gauge("xattrs", "xattrs", items, r.xattrs),
                        gauge(
                            "orphans",
                            "orphans left for cleanup",
                            Unit::Of("inodes"),
                            r.orphans,
                        ),
                    ]
                }
            },
        },
    ]
}

/// `1536` → `1.5 KiB`; exact below 1 KiB.
pub fn fmt_bytes(n: u64) -> String {
    const U: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", U[i])
}

/// Nanoseconds in the unit that reads best.
pub fn fmt_ns(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", n as f64 / 1e3),
        10_000_000..=999_999_999 => format!("{:.1} ms", n as f64 / 1e6),
        _ => format!("{:.2} s", n as f64 / 1e9),
    }
}

fn fmt_value(v: u64, unit: Unit) -> String {
    match unit {
        Unit::Bytes => fmt_bytes(v),
        Unit::Nanos => fmt_ns(v),
        Unit::Of("") => v.to_string(),
        Unit::Of(what) => format!("{v} {what}"),
    }
}

fn fmt_signed(d: i128, unit: Unit) -> String {
    let sign = if d < 0 { "-" } else { "+" };
    let mag = d.unsigned_abs().min(u64::MAX as u128) as u64;
    format!("{sign}{}", fmt_value(mag, unit))
}

const LABEL_WIDTH: usize = 32;

/// The terminal form: every group, absolute values.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let up = Duration::from_millis(s.uptime_ms);
    out.push_str(&format!(
        "ubtrfs {} (image {}, daemon pid {}, up {}, {})\n",
        s.mountpoint,
        s.image,
        s.pid,
        fmt_uptime(up),
        if s.readonly {
            "read-only"
        } else {
            "read-write"
        }
    ));
    for g in table(s) {
        out.push_str(&format!("\n{}\n", g.title));
        for r in &g.rows {
            let v = match r.value {
                Some(v) if r.text.is_empty() => fmt_value(v, r.unit),
                Some(v) => format!("{} {}", fmt_value(v, r.unit), r.text),
                None => r.text.clone(),
            };
            out.push_str(&format!("  {:<LABEL_WIDTH$} {v}\n", r.label));
        }
    }
    out
}

/// The terminal form of one `--watch` interval: counters as their change, gauges as their
/// value and change. Rows that did not change are left out (except gauges of extent maps).
pub fn render_delta(cur: &Snapshot, prev: &Snapshot, secs: f64) -> String {
    let mut out = format!(
        "--- {} +{secs:.1} s (changes; maps cached {})\n",
        cur.mountpoint, cur.extent_maps.cached
    );
    let prev_t = table(prev);
    let mut any = false;
    for (g, pg) in table(cur).into_iter().zip(prev_t) {
        let mut lines = Vec::new();
        for (r, pr) in g.rows.iter().zip(&pg.rows) {
            let (Some(v), Some(pv)) = (r.value, pr.value) else {
                continue;
            };
            let d = i128::from(v) - i128::from(pv);
            if d == 0 {
                continue;
            }
            let shown = match r.kind {
                Kind::Counter => {
                    let mut s = fmt_signed(d, r.unit);
                    if matches!(r.unit, Unit::Bytes) && secs > 0.0 {
                        s.push_str(&format!(" ({}/s)", fmt_bytes((d as f64 / secs) as u64)));
                    }
                    s
                }
                Kind::Gauge => format!("{} ({})", fmt_value(v, r.unit), fmt_signed(d, r.unit)),
            };
            lines.push(format!("  {:<LABEL_WIDTH$} {shown}\n", r.label));
        }
        if !lines.is_empty() {
            any = true;
            out.push_str(&format!("{}\n", g.title));
            out.extend(lines);
        }
    }
    if !any {
        out.push_str("  (no change)\n");
    }
    out
}

/// The JSON form of one `--watch` interval: the change of every counter and gauge, by group.
pub fn delta_json(cur: &Snapshot, prev: &Snapshot) -> serde_json::Value {
    let mut groups = serde_json::Map::new();
    for (g, pg) in table(cur).into_iter().zip(table(prev)) {
        let mut m = serde_json::Map::new();
        for (r, pr) in g.rows.iter().zip(&pg.rows) {
            if let (Some(v), Some(pv)) = (r.value, pr.value) {
                let d = i128::from(v) - i128::from(pv);
                m.insert(r.key.to_string(), serde_json::json!(d as i64));
            }
        }
        groups.insert(g.key.to_string(), serde_json::Value::Object(m));
    }
    serde_json::Value::Object(groups)
}

fn fmt_uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// One `ubtrfs shrink` result, one line.
pub fn render_shrink(r: &ShrinkReport) -> String {
    if r.nr_to_scan == 0 {
        return format!(
            "shrinker: nothing to scan ({} maps cached)",
            r.cached_before
        );
    }
    if !r.ran {
        return format!(
            "shrinker: a run was already pending; this request for {} maps was dropped (as the \
             kernel's btrfs_free_extent_maps drops it)",
            r.nr_to_scan
        );
    }
    let skipped = r.skipped_pinned + r.skipped_logging;
    format!(
        "shrinker: scanned {} maps: dropped {}, skipped {} (pinned {}, logging {}); inodes busy \
         {}; NEEDS_FULL_SYNC set {}; cached {} -> {} maps in {}",
        r.scanned,
        r.dropped,
        skipped,
        r.skipped_pinned,
        r.skipped_logging,
        r.skipped_inode_busy,
        r.full_sync_set,
        r.cached_before,
        r.cached_after,
        fmt_ns(r.elapsed_us.saturating_mul(1000))
    )
}

// ---------------------------------------------------------------------------------------------
// The commands

/// `ubtrfs stats MOUNTPOINT [--watch SECS [--count N]] [--json]`.
pub fn cmd_stats(
    mountpoint: &Path,
    watch: Option<f64>,
    count: Option<u64>,
    json: bool,
) -> Result<(), String> {
    let mut c = Client::connect(mountpoint)?;
    let first = c.stats()?;
    let mut out = std::io::stdout().lock();
    let print = |out: &mut std::io::StdoutLock<'_>, s: String| -> Result<(), String> {
        out.write_all(s.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| format!("writing to stdout: {e}"))
    };
    let Some(secs) = watch else {
        let s = if json {
            serde_json::to_string_pretty(&first).map_err(|e| e.to_string())? + "\n"
        } else {
            render(&first)
        };
        return print(&mut out, s);
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!(
            "--watch {secs}: the interval must be a positive number of seconds"
        ));
    }
    let interval = Duration::from_secs_f64(secs);
    // The first report is absolute (as vmstat's first line), then one report of changes
    // per interval, until interrupted, unmounted, or --count reports were printed.
    if json {
        let line = serde_json::json!({ "interval_s": secs, "current": &first, "delta": null });
        print(&mut out, format!("{line}\n"))?;
    } else {
        print(&mut out, render(&first))?;
    }
    let mut prev = first;
    let mut printed = 1u64;
    let mut last = Instant::now();
    while count.is_none_or(|n| printed < n) {
        std::thread::sleep(interval);
        let cur = c.stats()?;
        let secs_real = last.elapsed().as_secs_f64();
        last = Instant::now();
        let s = if json {
            let line = serde_json::json!({
                "interval_s": secs_real,
                "current": &cur,
                "delta": delta_json(&cur, &prev),
            });
            format!("{line}\n")
        } else {
            render_delta(&cur, &prev, secs_real)
        };
        print(&mut out, s)?;
        prev = cur;
        printed += 1;
    }
    Ok(())
}

/// `ubtrfs shrink MOUNTPOINT [--nr N] [--loop]`.
pub fn cmd_shrink(mountpoint: &Path, nr: Option<u64>, looping: bool) -> Result<(), String> {
    let mut c = Client::connect(mountpoint)?;
    if !looping {
        let r = c.shrink(nr)?;
        println!("{}", render_shrink(&r));
        return Ok(());
    }
    // Continuously, until interrupted (or unmounted): one summary line per second.
    let mut sum = ShrinkReport::default();
    let mut runs = 0u64;
    let mut dropped_requests = 0u64;
    let mut since = Instant::now();
    loop {
        let r = c.shrink(nr)?;
        if r.ran {
            runs += 1;
            sum.scanned += r.scanned;
            sum.dropped += r.dropped;
            sum.skipped_pinned += r.skipped_pinned;
            sum.skipped_logging += r.skipped_logging;
            sum.skipped_inode_busy += r.skipped_inode_busy;
            sum.full_sync_set += r.full_sync_set;
        } else if r.nr_to_scan > 0 {
            dropped_requests += 1;
        }
        sum.cached_after = r.cached_after;
        if r.nr_to_scan == 0 || !r.ran {
            // Nothing cached (or a run pending): do not spin on the daemon.
            std::thread::sleep(Duration::from_millis(50));
        }
        if since.elapsed() >= Duration::from_secs(1) {
            println!(
                "shrinker: {runs} runs: scanned {} maps: dropped {}, skipped {} (pinned {}, \
                 logging {}); inodes busy {}; NEEDS_FULL_SYNC set {}; {} requests dropped \
                 (run pending); {} maps cached",
                sum.scanned,
                sum.dropped,
                sum.skipped_pinned + sum.skipped_logging,
                sum.skipped_pinned,
                sum.skipped_logging,
                sum.skipped_inode_busy,
                sum.full_sync_set,
                dropped_requests,
                sum.cached_after
            );
            sum = ShrinkReport::default();
            runs = 0;
            dropped_requests = 0;
            since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: units read as a person expects them.
    #[test]
    fn units() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(8 << 20), "8.0 MiB");
        assert_eq!(fmt_ns(950), "950 ns");
        assert_eq!(fmt_ns(12_300_000), "12.3 ms");
        assert_eq!(fmt_ns(2_500_000_000), "2.50 s");
    }

    // Test scenario: what is not measured prints as n/a with its reason, never as 0; every
    // invariant is listed; a snapshot survives the wire (JSON) unchanged.
    #[test]
    fn not_measured_is_na_and_json_round_trips() {
        let mut s = Snapshot::default();
        for inv in Invariant::ALL {
            s.invariant_violations.insert(inv.name().into(), 0);
        }
        s.fsync.full_commit = 3;
        let text = render(&s);
        assert!(text.contains("n/a (not counted"), "{text}");
        let batched = text.lines().find(|l| l.contains("batched")).unwrap();
        assert!(!batched.contains(" 0"), "{batched}");
        let generation = text
            .lines()
            .find(|l| l.contains("skipped: generation"))
            .unwrap();
        assert!(generation.contains("n/a"), "{generation}");
        for inv in Invariant::ALL {
            assert!(text.contains(inv.name()), "{}", inv.name());
        }
        let j = serde_json::to_string(&s).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert!(v["fsync"]["batched"].is_null());
        assert!(v["shrinker"]["skipped_generation"].is_null());
        assert_eq!(v["fsync"]["full_commit"], 3);
        assert_eq!(serde_json::from_str::<Snapshot>(&j).unwrap(), s);
    }

    // Test scenario: --watch shows counter changes and gauge values with their change.
    #[test]
    fn deltas() {
        let prev = Snapshot::default();
        let mut cur = prev.clone();
        cur.io.bytes_written = 2 << 20;
        cur.extent_maps.cached = 10;
        cur.transactions.committed = 2;
        let d = render_delta(&cur, &prev, 2.0);
        assert!(d.contains("+2.0 MiB (1.0 MiB/s)"), "{d}");
        assert!(d.contains("10 maps (+10 maps)"), "{d}");
        let j = delta_json(&cur, &prev);
        assert_eq!(j["io"]["bytes_written"], 2 << 20);
        assert_eq!(j["transactions"]["committed"], 2);
        assert_eq!(render_delta(&prev, &prev, 1.0).lines().count(), 2);
    }
}
