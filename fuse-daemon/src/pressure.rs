//! Memory pressure from the system: the daemon's kswapd.
//!
//! In the kernel the extent-map shrinker runs when reclaim calls the superblock shrinker
//! (kswapd, direct reclaim, `drop_caches`; KERNEL-SEMANTICS.md section 3). A daemon gets no
//! such call, so a monitor thread (`ubtrfs-kswapd`) watches what the kernel reports and calls
//! the same entry points (`btrfs_nr_cached_objects`, then `btrfs_free_extent_maps`):
//!
//! - **PSI.** The cgroup's `memory.pressure` when the daemon runs in a non-root cgroup v2
//!   group, `/proc/pressure/memory` otherwise. A PSI trigger ([`PSI_TRIGGER`]) is registered
//!   and waited for with poll(2) (nix's safe wrapper, no `unsafe` here); where the kernel
//!   refuses triggers the monitor reads `avg10` every second instead ([`POLL_AVG10_PERCENT`]).
//!   Any measurable stall is a signal: by the time tasks stall on memory, kswapd has long been
//!   reclaiming and calling shrinkers, so the threshold is low (1 % of a 2 s window; 2 s is
//!   also the window granularity the kernel imposes on triggers without CAP_SYS_RESOURCE).
//! - **The cgroup memory limit.** Reclaim in the daemon's memory cgroup: `memory.events`
//!   `high`/`max` (v2) or `memory.failcnt` (v1) grew since the last check (once a second):
//!   the cgroup hit its limit and the kernel reclaimed, which is when it would shrink slabs.
//!   The cgroup is looked up again every second: a daemon moved into another cgroup while it
//!   runs (`echo PID > cgroup.procs`, a systemd scope) is watched there.
//!
//! Each pressure event scans a share of the cached maps that grows while the pressure lasts,
//! the shape of kswapd lowering its scan priority until reclaim succeeds: 1/8, 1/4, 1/2, then
//! all of them; [`CALM_RESET`] without an event starts again at 1/8.
//!
//! The same thread logs every increase of an invariant violation count (the extent-map crate
//! reports only the first of each kind), so a non-zero count is never silent.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ubtrfs_extent_map::{Invariant, SHRINK_BATCH};
use ubtrfs_fs::FsInfo;

/// The PSI trigger: a stall of 20 ms of "some" memory pressure within a 2 s window.
pub const PSI_TRIGGER: &str = "some 20000 2000000";
/// Without triggers: pressure when "some" avg10 reaches this percentage.
pub const POLL_AVG10_PERCENT: f64 = 1.0;
/// Scan share per consecutive pressure event, per mille (kswapd's priority escalation).
const ESCALATION_PERMILLE: [u64; 4] = [125, 250, 500, 1000];
/// Quiet time after which the scan share starts low again.
const CALM_RESET: Duration = Duration::from_secs(10);
/// How often the cgroup and the invariant counters are looked at.
const TICK: Duration = Duration::from_secs(1);

/// How PSI is watched.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PsiMode {
    /// A PSI trigger is armed and polled.
    Trigger,
    /// avg10 is read every second (triggers refused).
    Poll,
    /// No PSI file (kernel without PSI, or psi=0).
    #[default]
    Unavailable,
}

/// What `ubtrfs stats` shows of the monitor.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PressureSnapshot {
    pub psi_mode: PsiMode,
    pub psi_file: Option<String>,
    pub psi_trigger: Option<String>,
    /// Why a trigger could not be used, or why PSI is unavailable.
    pub psi_note: Option<String>,
    /// Last "some" avg10 read (percent).
    pub psi_some_avg10: Option<f64>,
    /// The daemon's memory cgroup: version and path (relative to the hierarchy).
    pub cgroup_version: Option<u8>,
    pub cgroup: Option<String>,
    /// The tightest memory limit over the cgroup and its ancestors, and the usage of that
    /// cgroup (None: no limit).
    pub memory_limit: Option<u64>,
    pub memory_usage: Option<u64>,
    pub psi_events: u64,
    pub limit_events: u64,
    pub shrinker_runs: u64,
    pub maps_requested: u64,
}

impl PressureSnapshot {
    pub fn psi_description(&self) -> String {
        let file = self.psi_file.as_deref().unwrap_or("-");
        let avg = self
            .psi_some_avg10
            .map(|a| format!(", some avg10 {a:.2} %"))
            .unwrap_or_default();
        let note = self
            .psi_note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        match self.psi_mode {
            PsiMode::Trigger => format!(
                "trigger \"{}\" on {file}{avg}",
                self.psi_trigger.as_deref().unwrap_or("?")
            ),
            PsiMode::Poll => {
                format!("polling {file} every 1 s (avg10 >= {POLL_AVG10_PERCENT} %){avg}{note}")
            }
            PsiMode::Unavailable => format!("unavailable{note}"),
        }
    }

    pub fn cgroup_description(&self) -> String {
        let Some(path) = &self.cgroup else {
            return "no memory cgroup found".into();
        };
        let v = self.cgroup_version.unwrap_or(0);
        let usage = self
            .memory_usage
            .map(|u| format!("usage {}", crate::stats::fmt_bytes(u)))
            .unwrap_or_else(|| "usage unknown".into());
        match self.memory_limit {
            Some(l) => format!(
                "v{v} {path}: {usage} of limit {}",
                crate::stats::fmt_bytes(l)
            ),
            None => format!("v{v} {path}: {usage}, no memory limit"),
        }
    }
}

/// Shared between the monitor thread and the control socket.
#[derive(Default)]
pub struct PressureMonitorState {
    desc: parking_lot::Mutex<PressureSnapshot>,
    psi_events: AtomicU64,
    limit_events: AtomicU64,
    shrinker_runs: AtomicU64,
    maps_requested: AtomicU64,
}

impl PressureMonitorState {
    pub fn snapshot(&self) -> PressureSnapshot {
        let mut s = self.desc.lock().clone();
        s.psi_events = self.psi_events.load(Relaxed);
        s.limit_events = self.limit_events.load(Relaxed);
        s.shrinker_runs = self.shrinker_runs.load(Relaxed);
        s.maps_requested = self.maps_requested.load(Relaxed);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// cgroups

/// The daemon's memory cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cgroup {
    version: u8,
    /// Path inside the hierarchy ("/a/b").
    rel: String,
    /// Where the hierarchy is mounted.
    root: PathBuf,
}

impl Cgroup {
    fn dir(&self) -> PathBuf {
        self.root.join(self.rel.trim_start_matches('/'))
    }

    /// The cgroup and its ancestors up to the hierarchy's root, innermost first.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        let mut d = self.dir();
        loop {
            v.push(d.clone());
            if d == self.root || !d.pop() || !d.starts_with(&self.root) {
                break;
            }
        }
        v
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// "No limit" as the kernel writes it (v1: PAGE_COUNTER_MAX rounded to pages; v2: "max").
fn parse_limit(s: &str) -> Option<u64> {
    if s == "max" {
        return None;
    }
    s.parse::<u64>().ok().filter(|&v| v < (1u64 << 62))
}

/// Find the memory cgroup: the v1 memory controller if mounted (hybrid hosts), else v2.
fn find_memory_cgroup() -> Option<Cgroup> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // (fstype, super options, mount root, mount point)
    let mounts: Vec<(String, String, String, PathBuf)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 3 {
                return None;
            }
            Some((
                post[0].to_string(),
                post[2].to_string(),
                pre[3].to_string(),
                PathBuf::from(pre[4]),
            ))
        })
        .collect();
    let strip = |rel: &str, mroot: &str| -> String {
        if mroot != "/" {
            if let Some(r) = rel.strip_prefix(mroot) {
                return if r.is_empty() { "/".into() } else { r.into() };
            }
        }
        rel.to_string()
    };
    let mut v2 = None;
    for line in cg.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(rel)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if ctrl.split(',').any(|c| c == "memory") {
            if let Some((_, _, mroot, mp)) = mounts
                .iter()
                .find(|(t, so, _, _)| t == "cgroup" && so.split(',').any(|o| o == "memory"))
            {
                return Some(Cgroup {
                    version: 1,
                    rel: strip(rel, mroot),
                    root: mp.clone(),
                });
            }
        } else if id == "0" && ctrl.is_empty() {
            if let Some((_, _, mroot, mp)) = mounts.iter().find(|(t, ..)| t == "cgroup2") {
                v2 = Some(Cgroup {
                    version: 2,
                    rel: strip(rel, mroot),
                    root: mp.clone(),
                });
            }
        }
    }
    v2
}

/// (tightest limit, usage of that cgroup) over the cgroup and its ancestors.
fn memory_limit(cg: &Cgroup) -> (Option<u64>, Option<u64>) {
    let (limit_files, usage_file): (&[&str], &str) = if cg.version == 1 {
        (&["memory.limit_in_bytes"], "memory.usage_in_bytes")
    } else {
        (&["memory.max", "memory.high"], "memory.current")
    };
    let own_usage = read_trim(&cg.dir().join(usage_file)).and_then(|s| s.parse().ok());
    let mut best: Option<(u64, Option<u64>)> = None;
    for d in cg.dirs() {
        for f in limit_files {
            if let Some(l) = read_trim(&d.join(f)).as_deref().and_then(parse_limit) {
                if best.is_none_or(|(b, _)| l < b) {
                    let u = read_trim(&d.join(usage_file)).and_then(|s| s.parse().ok());
                    best = Some((l, u));
                }
            }
        }
    }
    match best {
        Some((l, u)) => (Some(l), u),
        None => (None, own_usage),
    }
}

/// Reclaim events of the cgroup so far: v2 `memory.events` high + max, v1 `memory.failcnt`.
fn reclaim_events(cg: &Cgroup) -> Option<u64> {
    if cg.version == 1 {
        return read_trim(&cg.dir().join("memory.failcnt")).and_then(|s| s.parse().ok());
    }
    let text = std::fs::read_to_string(cg.dir().join("memory.events")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == "high" || *k == "max")
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum(),
    )
}

// ---------------------------------------------------------------------------------------------
// PSI

/// The PSI file for this process: the cgroup's own (v2, not the root) or the system's.
fn psi_file(cg: Option<&Cgroup>) -> Option<PathBuf> {
    if let Some(cg) = cg.filter(|c| c.version == 2 && c.rel != "/") {
        let p = cg.dir().join("memory.pressure");
        if p.exists() {
            return Some(p);
        }
    }
    let p = PathBuf::from("/proc/pressure/memory");
    p.exists().then_some(p)
}

/// Register a trigger (the kernel wants the string with its NUL, in one write).
fn open_trigger(p: &Path) -> std::io::Result<File> {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(p)?;
    let mut b = PSI_TRIGGER.as_bytes().to_vec();
    b.push(0);
    f.write_all(&b)?;
    Ok(f)
}

/// "some avg10=1.23 ..." → 1.23.
fn some_avg10(p: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(p).ok()?;
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()
}

enum Wait {
    Pressure,
    Calm,
    /// The stop pipe became readable (or closed): the daemon is unmounting.
    Stop,
    TriggerGone(String),
}

/// Wait up to `timeout` for the trigger (if any) or the stop pipe.
fn wait(trigger: Option<&File>, stop: &OwnedFd, timeout: Duration) -> Wait {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    if let Some(f) = trigger {
        fds.push(PollFd::new(f.as_fd(), PollFlags::POLLPRI));
    }
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => Wait::Calm,
        Ok(_) => {
            let ev = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
            if !ev(0).is_empty() {
                return Wait::Stop;
            }
            let ev = ev(1);
            if ev.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                Wait::TriggerGone(format!("poll reported {ev:?}"))
            } else if ev.contains(PollFlags::POLLPRI) {
                Wait::Pressure
            } else {
                Wait::Calm
            }
        }
        Err(nix::errno::Errno::EINTR) => Wait::Calm,
        Err(e) if trigger.is_some() => Wait::TriggerGone(format!("poll: {e}")),
        Err(_) => {
            std::thread::sleep(timeout);
            Wait::Calm
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The monitor

/// The running monitor thread.
pub struct PressureMonitor {
    stop: Arc<AtomicBool>,
    /// Closing (dropping) the write end of the stop pipe wakes the thread at once.
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl PressureMonitor {
    /// Start watching for `fs`. Never fails the mount: what cannot be watched is said in the
    /// stats (and once in the log).
    pub fn start(fs: Arc<FsInfo>, state: Arc<PressureMonitorState>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_rx, wake) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        let t = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ubtrfs-kswapd".into())
                .spawn(move || run(&fs, &state, &stop, &stop_rx))?
        };
        Ok(PressureMonitor {
            stop,
            wake: Some(wake),
            thread: Some(t),
        })
    }

    /// Stop and join.
    pub fn shutdown(mut self) {
        self.do_shutdown();
    }

    fn do_shutdown(&mut self) {
        self.stop.store(true, Relaxed);
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PressureMonitor {
    fn drop(&mut self) {
        self.do_shutdown();
    }
}

/// Describe what is watched for `cg` and arm its PSI trigger: returns the PSI file and the
/// trigger (None where the kernel refuses triggers or has no PSI).
fn watch(state: &PressureMonitorState, cg: Option<&Cgroup>) -> (Option<PathBuf>, Option<File>) {
    let psi = psi_file(cg);
    let mut trigger = None;
    let mut d = state.desc.lock();
    d.cgroup_version = cg.map(|c| c.version);
    d.cgroup = cg.map(|c| c.rel.clone());
    d.psi_file = psi.as_ref().map(|p| p.display().to_string());
    d.psi_trigger = None;
    d.psi_note = None;
    match &psi {
        None => {
            d.psi_mode = PsiMode::Unavailable;
            d.psi_note = Some("no /proc/pressure/memory: kernel without PSI, or psi=0".into());
        }
        Some(p) => match open_trigger(p) {
            Ok(f) => {
                d.psi_mode = PsiMode::Trigger;
                d.psi_trigger = Some(PSI_TRIGGER.into());
                trigger = Some(f);
            }
            Err(e) => {
                d.psi_mode = PsiMode::Poll;
                d.psi_note = Some(format!("trigger refused: {e}"));
            }
        },
    }
    tracing::debug!(
        target: "ubtrfs_memory_pressure",
        "watching memory pressure: PSI {}; memory cgroup {}",
        d.psi_description(),
        cg.map(|c| format!("v{} {}", c.version, c.rel))
            .unwrap_or_else(|| "none found".into())
    );
    (psi, trigger)
}

fn run(fs: &FsInfo, state: &PressureMonitorState, stop: &AtomicBool, stop_rx: &OwnedFd) {
    let mut cg = find_memory_cgroup();
    let (mut psi, mut trigger) = watch(state, cg.as_ref());
    let mut last_reclaim = cg.as_ref().and_then(reclaim_events);
    let mut level = 0usize;
    let mut last_event: Option<Instant> = None;
    let mut last_tick = Instant::now() - TICK;
    let mut violations = [0u64; Invariant::COUNT];
    while !stop.load(Relaxed) {
        // 1. Once a tick (the first at once): avg10, the cgroup's limit and reclaim events,
        // invariants.
        let mut psi_pressure = false;
        let mut limit_pressure = false;
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            // The daemon may be moved to another cgroup while it runs (`echo PID >
            // cgroup.procs`, systemd scopes): follow it.
            let now_cg = find_memory_cgroup();
            if now_cg != cg {
                cg = now_cg;
                (psi, trigger) = watch(state, cg.as_ref());
                last_reclaim = cg.as_ref().and_then(reclaim_events);
            }
            let avg = psi.as_deref().and_then(some_avg10);
            if trigger.is_none() && avg.is_some_and(|a| a >= POLL_AVG10_PERCENT) {
                psi_pressure = true;
            }
            let (limit, usage) = cg.as_ref().map(memory_limit).unwrap_or((None, None));
            {
                let mut d = state.desc.lock();
                d.psi_some_avg10 = avg;
                d.memory_limit = limit;
                d.memory_usage = usage;
            }
            if let Some(cg) = &cg {
                let now = reclaim_events(cg);
                if let (Some(n), Some(l)) = (now, last_reclaim) {
                    limit_pressure = n > l;
                }
                last_reclaim = now.or(last_reclaim);
            }
            log_new_violations(fs, &mut violations);
        }
        // 2. PSI: wait for the trigger (or just the tick when polling avg10).
        match wait(trigger.as_ref(), stop_rx, TICK) {
            Wait::Pressure => psi_pressure = true,
            Wait::Calm => {}
            Wait::Stop => break,
            Wait::TriggerGone(why) => {
                tracing::warn!("PSI trigger stopped working ({why}); polling avg10 instead");
                trigger = None;
                let mut d = state.desc.lock();
                d.psi_mode = PsiMode::Poll;
                d.psi_note = Some(format!("trigger stopped: {why}"));
            }
        }
        if stop.load(Relaxed) {
            break;
        }
        // 3. React as kswapd would.
        if psi_pressure {
            state.psi_events.fetch_add(1, Relaxed);
        }
        if limit_pressure {
            state.limit_events.fetch_add(1, Relaxed);
        }
        if psi_pressure || limit_pressure {
            if last_event.is_some_and(|t| t.elapsed() >= CALM_RESET) {
                level = 0;
            }
            last_event = Some(Instant::now());
            let permille = ESCALATION_PERMILLE[level];
            level = (level + 1).min(ESCALATION_PERMILLE.len() - 1);
            let nr = fs.ems.btrfs_nr_cached_objects();
            tracing::trace!(target: "btrfs_extent_map_shrinker_count", nr);
            let share = (u128::from(nr) * u128::from(permille) / 1000) as u64;
            let nr_to_scan = share.max(nr.min(SHRINK_BATCH));
            let ran = nr_to_scan > 0 && fs.ems.btrfs_free_extent_maps(nr_to_scan);
            if ran {
                state.shrinker_runs.fetch_add(1, Relaxed);
                state.maps_requested.fetch_add(nr_to_scan, Relaxed);
            }
            // The free memory the allocator keeps for reuse (main.rs `tune_malloc`) goes
            // back to the kernel too.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim takes no pointers and is safe to call from any thread.
            unsafe {
                libc::malloc_trim(0);
            }
            tracing::debug!(
                target: "ubtrfs_memory_pressure",
                psi = psi_pressure,
                cgroup_limit = limit_pressure,
                permille,
                nr,
                nr_to_scan,
                ran,
                "memory pressure: shrinking extent maps"
            );
        } else if last_event.is_some_and(|t| t.elapsed() >= CALM_RESET) {
            level = 0;
        }
    }
}

/// Log every invariant whose violation count grew since the last look.
fn log_new_violations(fs: &FsInfo, seen: &mut [u64; Invariant::COUNT]) {
    let st = fs.ems.stats();
    for (i, inv) in Invariant::ALL.iter().enumerate() {
        let n = st.violations(*inv);
        if n > seen[i] {
            tracing::error!(
                invariant = inv.name(),
                total = n,
                "extent map invariant {} violated {} more time(s) (total {n}; `ubtrfs stats` \
                 shows all counts)",
                inv.name(),
                n - seen[i]
            );
            seen[i] = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: the kernel's "no limit" spellings are no limit; real limits parse.
    #[test]
    fn limits() {
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_limit("67108864"), Some(64 << 20));
        assert_eq!(parse_limit("junk"), None);
    }

    // Test scenario: a cgroup's ancestors are walked up to the hierarchy's root, never above.
    #[test]
    fn cgroup_ancestors() {
        let c = Cgroup {
            version: 2,
            rel: "/a/b".into(),
            root: PathBuf::from("/sys/fs/cgroup"),
        };
        assert_eq!(
            c.dirs(),
            vec![
                PathBuf::from("/sys/fs/cgroup/a/b"),
                PathBuf::from("/sys/fs/cgroup/a"),
                PathBuf::from("/sys/fs/cgroup"),
            ]
        );
        let root = Cgroup {
            rel: "/".into(),
            ..c
        };
        assert_eq!(root.dirs(), vec![PathBuf::from("/sys/fs/cgroup")]);
    }

    // Test scenario: this machine's cgroup and PSI are found (whatever they are) without panic,
    // and the description says something for each case.
    #[test]
    fn describes_this_machine() {
        let cg = find_memory_cgroup();
        let psi = psi_file(cg.as_ref());
        let s = PressureSnapshot {
            psi_file: psi.map(|p| p.display().to_string()),
            cgroup: cg.as_ref().map(|c| c.rel.clone()),
            cgroup_version: cg.as_ref().map(|c| c.version),
            ..Default::default()
        };
        assert!(!s.psi_description().is_empty());
        assert!(!s.cgroup_description().is_empty());
    }
}
