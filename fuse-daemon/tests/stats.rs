//! `ubtrfs stats`, `ubtrfs shrink`, the em_max budget and the memory-pressure monitor, against
//! live mounts. Every mount is a `Mount` guard (unmounted on drop, also while panicking); the
//! tests of this file run one at a time because the pressure test makes system-wide memory
//! pressure, to which every daemon on the machine reacts.

mod common;

use common::mount::{LoopMount, Mount};
use common::{mkfs_image, require_fuse_env, run_with_timeout, sh, Mkfs, TestDir, UBTRFS};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `ubtrfs ARGS` within 60 s.
fn ubtrfs(args: &[&str]) -> Output {
    run_with_timeout(Command::new(UBTRFS).args(args), Duration::from_secs(60))
        .unwrap_or_else(|| panic!("ubtrfs {args:?} did not finish within 60 s"))
}

fn ok_stdout(args: &[&str]) -> String {
    let o = ubtrfs(args);
    assert!(
        o.status.success(),
        "ubtrfs {args:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `ubtrfs stats MNT --json`, parsed.
fn stats(mnt: &Path) -> Value {
    let out = ok_stdout(&["stats", &mnt.display().to_string(), "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats --json is not JSON ({e}):\n{out}"))
}

fn u(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats {group}.{key} is not a number: {}", v[group][key]))
}

/// A file `big` of `n` 128 KiB extents that never merge: written by the kernel with
/// compress-force=zstd (every compressed extent is its own map). The content compresses well
/// and says where it is, so a read can be checked.
fn compressed_image(t: &TestDir, n: u64) -> PathBuf {
    compressed_image_with(t, n, 0)
}

/// As [`compressed_image`], plus a file `random` of `random_mib` MiB that does not compress
/// (stored uncompressed: its bytes on disk are as many as in the file).
fn compressed_image_with(t: &TestDir, n: u64, random_mib: u64) -> PathBuf {
    let img = t.join("image");
    mkfs_image(&img, &Mkfs::default());
    let mnt = t.mkdir("kernel");
    let k = LoopMount::new(&img, &mnt, "compress-force=zstd");
    let mut f = fs::File::create(k.path().join("big")).unwrap();
    let mut block = vec![0u8; 128 << 10];
    for i in 0..n {
        for (j, c) in block.chunks_mut(16).enumerate() {
            c.copy_from_slice(format!("{i:07}:{j:07}\n").as_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    if random_mib > 0 {
        sh(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", k.path().join("random").display()),
                "bs=1M",
                &format!("count={random_mib}"),
                "status=none",
            ],
        );
    }
    sh("sync", &[]);
    drop(k);
    img
}

/// Read `path` in 128 KiB pieces, calling `each` after every `every` pieces.
fn read_all(path: &Path, every: u64, mut each: impl FnMut()) -> u64 {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut buf = vec![0u8; 128 << 10];
    let (mut total, mut pieces) = (0u64, 0u64);
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("reading {path:?}: {e}"));
        if n == 0 {
            break;
        }
        total += n as u64;
        pieces += 1;
        if pieces == every {
            pieces = 0;
            each();
        }
    }
    total
}

// Test scenario: `ubtrfs stats` against a live read-write mount while a script works on it:
// bytes written grow by exactly what was written, an fsync is counted once and made durable by
// a log sync or a commit, the commit thread commits by itself (commit=1), reads after a
// remount cache extent maps and count bytes read; shrinker= reaches the extent-map layer; the
// text output has every group with units, --json parses, --watch prints changes.
#[test]
fn stats_follow_a_workload() {
    let _s = serial();
    require_fuse_env();
    let t = TestDir::new("stats-live");
    let img = t.join("image");
    ok_stdout(&["mkfs", "-q", "-b", "256M", &img.display().to_string()]);
    let mnt = t.mkdir("mnt");
    let m = Mount::with_options(&img, &mnt, "rw,commit=1,shrinker=kernel");
    let s0 = stats(m.path());
    assert_eq!(
        s0["shrinker"]["policy"], "kernel",
        "shrinker= did not reach FsExtentMaps"
    );
    assert_eq!(s0["readonly"], false);
    assert_eq!(
        s0["mountpoint"].as_str(),
        Some(m.path().to_str().unwrap()),
        "{s0}"
    );

    // Writes: bytes_written counts what write(2) accepted.
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    for i in 0..4 {
        fs::write(m.path().join(format!("f{i}")), &data).unwrap();
    }
    let s1 = stats(m.path());
    assert_eq!(
        u(&s1, "io", "bytes_written") - u(&s0, "io", "bytes_written"),
        4 << 20
    );

    // One fsync: counted once (fast, full, skipped or a full commit), made durable by a log
    // sync or a transaction commit.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path().join("f0"))
        .unwrap();
    f.write_all_at(b"fsync me", 100).unwrap();
    let before = stats(m.path());
    f.sync_all().unwrap();
    drop(f);
    let after = stats(m.path());
    let fsyncs = |v: &Value| {
        ["fast", "full", "skipped", "full_commit"]
            .iter()
            .map(|k| u(v, "fsync", k))
            .sum::<u64>()
    };
    assert_eq!(fsyncs(&after) - fsyncs(&before), 1, "{after}");
    let durable = (u(&after, "transactions", "committed")
        - u(&before, "transactions", "committed"))
        + (u(&after, "fsync", "log_syncs") - u(&before, "fsync", "log_syncs"));
    assert!(
        durable >= 1,
        "fsync neither committed nor synced the log: {after}"
    );
    // One fsync alone cannot join another's log sync.
    assert_eq!(
        after["fsync"]["batched"].as_u64(),
        before["fsync"]["batched"].as_u64(),
        "batched is measured and did not move: {after}"
    );
    assert!(after["fsync"]["batched"].is_u64(), "{after}");

    // The commit thread (commit=1) commits a change without any fsync.
    fs::write(m.path().join("late"), b"x").unwrap();
    let c0 = u(&stats(m.path()), "transactions", "committed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let s2 = loop {
        let s = stats(m.path());
        if u(&s, "transactions", "committed") > c0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        u(&s2, "transactions", "committed") > c0,
        "no commit within 10 s with commit=1: {s2}"
    );
    assert!(u(&s2, "transactions", "commit_ns_total") > 0);
    assert!(u(&s2, "transactions", "tree_blocks_written") > 0);

    // The text form: every group, with units.
    let text = ok_stdout(&["stats", &m.path().display().to_string()]);
    for group in [
        "Extent maps",
        "Extent-map shrinker (policy kernel)",
        "Invariant violations",
        "fsync",
        "Transactions",
        "Tree-block cache",
        "Checksum errors",
        "I/O",
        "Memory pressure",
    ] {
        assert!(text.contains(group), "no group {group:?} in:\n{text}");
    }
    assert!(text.contains(" MiB"), "{text}");
    assert!(text.contains(" maps"), "{text}");
    drop(m);

    // Reads after a remount reach the daemon: maps cached, bytes read counted.
    let m = Mount::with_options(&img, &mnt, "ro");
    let s3 = stats(m.path());
    for i in 0..4 {
        assert_eq!(
            fs::read(m.path().join(format!("f{i}"))).unwrap().len(),
            1 << 20
        );
    }
    let s4 = stats(m.path());
    assert!(u(&s4, "extent_maps", "cached") >= 4, "{s4}");
    assert!(u(&s4, "extent_maps", "cached_bytes") > 0);
    assert!(u(&s4, "io", "bytes_read") - u(&s3, "io", "bytes_read") >= 4 << 20);
    assert!(u(&s4, "tree_block_cache", "misses") > 0);
    for (name, n) in s4["invariant_violations"].as_object().unwrap() {
        assert_eq!(n, 0, "invariant {name} violated in a healthy run");
    }

    // --watch: one full report, then changes; --json --watch: one object per line.
    let mp = m.path().display().to_string();
    let w = ok_stdout(&["stats", &mp, "--watch", "0.2", "--count", "2"]);
    assert!(w.contains("Extent maps") && w.contains("--- "), "{w}");
    let wj = ok_stdout(&["stats", &mp, "--watch", "0.2", "--count", "3", "--json"]);
    let lines: Vec<Value> = wj
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{wj}");
    assert!(lines[0]["delta"].is_null());
    assert!(
        lines[2]["delta"]["io"]["bytes_read"].is_i64(),
        "{}",
        lines[2]
    );
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "{}", exit.describe());
}

// Test scenario: what is not a ubtrfs mount gets one clear line and a non-zero exit: a path
// that does not exist, a directory that is not a mount point, a kernel btrfs mount; a control
// socket is gone once its mount is.
#[test]
fn stats_refuses_what_is_not_ubtrfs() {
    let _s = serial();
    require_fuse_env();
    let t = TestDir::new("stats-refuse");
    let one_line_failure = |args: &[&str], want: &str| {
        let o = ubtrfs(args);
        assert!(!o.status.success(), "ubtrfs {args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(
            err.contains(want),
            "ubtrfs {args:?}: {err:?} does not say {want:?}"
        );
    };
    let missing = t.join("missing").display().to_string();
    one_line_failure(&["stats", &missing], "No such file or directory");
    let plain = t.mkdir("plain").display().to_string();
    one_line_failure(&["stats", &plain], "not a mount point");
    one_line_failure(&["shrink", &plain], "not a mount point");

    let img = t.join("image");
    mkfs_image(&img, &Mkfs::default());
    let mnt = t.mkdir("mnt");
    {
        let k = LoopMount::new(&img, &mnt, "ro");
        one_line_failure(
            &["stats", &k.path().display().to_string()],
            "not a ubtrfs mount (btrfs",
        );
    }
    let m = Mount::new(&img, &mnt);
    let mp = m.path().display().to_string();
    ok_stdout(&["stats", &mp]);
    drop(m);
    one_line_failure(&["stats", &mp], "not a mount point");
}

// Test scenario: em_max=64 keeps the extent-map cache under its limit while a file of 256
// compressed extents (256 maps) is read: sampled during the read the count stays within a few
// maps of the limit (maps inserted by concurrent readers before their budget check), at the
// end it is at most the limit, the shrinker ran and dropped maps, and its counters add up.
#[test]
fn em_max_bounds_the_cache_during_a_large_read() {
    let _s = serial();
    require_fuse_env();
    const LIMIT: u64 = 64;
    let t = TestDir::new("stats-em-max");
    let img = compressed_image(&t, 256);
    let mnt = t.mkdir("mnt");
    let m = Mount::with_options(&img, &mnt, &format!("ro,em_max={LIMIT}"));
    let s0 = stats(m.path());
    assert_eq!(u(&s0, "extent_maps", "budget_maps"), LIMIT);
    let mut peak = 0;
    let mp = m.path().to_path_buf();
    let n = read_all(&m.path().join("big"), 32, || {
        peak = peak.max(u(&stats(&mp), "extent_maps", "cached"));
    });
    assert_eq!(n, 256 * (128 << 10));
    let s = stats(m.path());
    let cached = u(&s, "extent_maps", "cached");
    assert!(
        cached <= LIMIT,
        "{cached} maps cached with em_max={LIMIT}: {s}"
    );
    assert!(
        peak <= LIMIT + 8,
        "peak {peak} maps during the read with em_max={LIMIT}"
    );
    assert!(u(&s, "shrinker", "runs") > 0, "{s}");
    assert!(u(&s, "shrinker", "dropped") > 0, "{s}");
    assert_eq!(
        u(&s, "shrinker", "scanned"),
        u(&s, "shrinker", "dropped")
            + u(&s, "shrinker", "skipped_pinned")
            + u(&s, "shrinker", "skipped_logging"),
        "{s}"
    );
    assert!(u(&s, "io", "decompressed_extents") >= 256, "{s}");
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "{}", exit.describe());
}

/// Parse "shrinker: scanned S maps: dropped D, skipped K (pinned P, logging L); ... cached
/// B -> A maps ..." into (S, D, K, P, L, B, A).
fn parse_shrink(line: &str) -> [u64; 7] {
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        line.starts_with("shrinker: scanned ") && nums.len() >= 9,
        "unexpected shrink output: {line}"
    );
    // scanned, dropped, skipped, pinned, logging, busy, full-sync, before, after, [time]
    [
        nums[0], nums[1], nums[2], nums[3], nums[4], nums[7], nums[8],
    ]
}

/// `ubtrfs shrink ARGS`, retried while a run of the budget or pressure path is pending.
fn shrink(args: &[&str]) -> [u64; 7] {
    for _ in 0..50 {
        let out = ok_stdout(args);
        let line = out.trim();
        if line.contains("already pending") {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return parse_shrink(line);
    }
    panic!("ubtrfs {args:?}: a shrinker run stayed pending");
}

// Test scenario: `ubtrfs shrink` on a mount with 256 cached maps: --nr 10 scans exactly 10
// maps, a plain run scans every cached map and leaves none (nothing is pinned on a read-only
// mount); every report adds up (scanned = dropped + skipped, cached before - dropped = after)
// and `stats` agrees with the reports; --loop runs until killed, printing summaries.
#[test]
fn shrink_drops_maps_and_counts_add_up() {
    let _s = serial();
    require_fuse_env();
    let t = TestDir::new("stats-shrink");
    let img = compressed_image(&t, 256);
    let mnt = t.mkdir("mnt");
    let m = Mount::with_options(&img, &mnt, "ro");
    let mp = m.path().display().to_string();
    read_all(&m.path().join("big"), u64::MAX, || {});
    let s0 = stats(m.path());
    let cached = u(&s0, "extent_maps", "cached");
    assert!(
        cached >= 256,
        "reading 256 compressed extents cached {cached} maps"
    );

    let [sc, dr, sk, pi, lo, b, a] = shrink(&["shrink", &mp, "--nr", "10"]);
    assert_eq!(sc, 10, "--nr 10 scanned {sc}");
    assert_eq!((sc, sk), (dr + sk, pi + lo));
    assert_eq!(b - dr, a);

    let [sc2, dr2, sk2, pi2, lo2, b2, a2] = shrink(&["shrink", &mp]);
    assert_eq!(sc2, b2, "a plain shrink scans every cached map");
    assert_eq!((sc2, sk2), (dr2 + sk2, pi2 + lo2));
    assert_eq!((a2, sk2), (0, 0), "a read-only mount pins nothing");

    let s1 = stats(m.path());
    assert_eq!(u(&s1, "extent_maps", "cached"), 0);
    let d = |k| u(&s1, "shrinker", k) - u(&s0, "shrinker", k);
    assert!(d("scanned") >= sc + sc2);
    assert!(d("dropped") >= dr + dr2);
    assert_eq!(
        u(&s1, "shrinker", "scanned"),
        u(&s1, "shrinker", "dropped")
            + u(&s1, "shrinker", "skipped_pinned")
            + u(&s1, "shrinker", "skipped_logging")
    );

    // Maps come back on the next read; --loop keeps dropping them until it is killed.
    read_all(&m.path().join("big"), u64::MAX, || {});
    let mut child = Command::new(UBTRFS)
        .args(["shrink", &mp, "--loop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(&mut child);
    std::thread::sleep(Duration::from_millis(2500));
    drop(guard);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let first = out.lines().next().unwrap_or_default();
    assert!(first.contains(" runs: scanned "), "--loop printed: {out:?}");
    assert_eq!(u(&stats(m.path()), "extent_maps", "cached"), 0);
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "{}", exit.describe());
}

/// A memory cgroup made for the test (v1 memory controller, or v2 with the memory controller
/// delegated); every process left in it is killed and the cgroup removed on drop (also while
/// panicking).
struct MemCgroup {
    path: PathBuf,
}

impl MemCgroup {
    /// A cgroup limited to `limit` (e.g. "16M"), or why there is none.
    fn create(name: &str, limit: &str) -> Result<MemCgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let (path, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), "memory.limit_in_bytes")
        } else if fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "memory"))
        {
            (v2.join(name), "memory.max")
        } else {
            return Err("no memory cgroup controller to make pressure with".into());
        };
        fs::create_dir(&path).map_err(|e| format!("creating {path:?}: {e}"))?;
        let cg = MemCgroup { path };
        fs::write(cg.path.join(limit_file), limit)
            .map_err(|e| format!("limiting {:?}: {e}", cg.path))?;
        Ok(cg)
    }

    fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = fs::read_to_string(self.procs_file()) {
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: could not remove cgroup {:?}", self.path);
    }
}

/// A process reading `file` over and over inside a 16 MiB memory cgroup: page-cache thrashing,
/// whose reclaim stalls PSI counts system-wide. Stopped (and the cgroup removed) on drop.
struct Thrasher {
    child: Option<Child>,
    // Dropped after the child is reaped.
    _cgroup: MemCgroup,
}

impl Thrasher {
    fn start(name: &str, file: &Path) -> Result<Thrasher, String> {
        let cgroup = MemCgroup::create(name, "16M")?;
        let script = format!(
            "echo $$ > '{}' || exit 1; while :; do cat '{}' > /dev/null; done",
            cgroup.procs_file().display(),
            file.display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the thrasher: {e}"))?;
        Ok(Thrasher {
            child: Some(child),
            _cgroup: cgroup,
        })
    }
}

impl Drop for Thrasher {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The cgroup's drop kills the cat the shell left running.
    }
}

/// Drop `file` from the page cache, so that reading it charges the reader's cgroup again.
fn evict_from_page_cache(file: &Path) {
    sh(
        "dd",
        &[
            &format!("if={}", file.display()),
            "iflag=nocache",
            "count=0",
            "status=none",
        ],
    );
}

// Test scenario: the daemon's own memory cgroup reaching its limit is memory pressure: the
// running daemon is moved into a 16 MiB memory cgroup (it follows the move) and reads a 64 MiB
// incompressible file from an image evicted from the page cache, so that its buffered image
// reads are charged to the cgroup, which reclaims at its limit; the daemon sees the reclaim
// (v2 memory.events, v1 memory.failcnt), counts limit events and runs the shrinker. Skipped,
// with the reason printed, where no memory cgroup can be made.
#[test]
fn cgroup_limit_runs_the_shrinker() {
    let _s = serial();
    require_fuse_env();
    let t = TestDir::new("stats-cgroup");
    let img = compressed_image_with(&t, 256, 64);
    let mnt = t.mkdir("mnt");
    // Declared before the mount, so dropped after it: the daemon has left the cgroup by then.
    let name = format!("ubtrfs-test-limit-{}", std::process::id());
    let cg = match MemCgroup::create(&name, "16M") {
        Ok(c) => c,
        Err(why) => {
            eprintln!("SKIPPED cgroup_limit_runs_the_shrinker: {why}");
            return;
        }
    };
    let m = Mount::with_options(&img, &mnt, "ro");
    read_all(&m.path().join("big"), u64::MAX, || {});
    let s0 = stats(m.path());
    let daemon = s0["pid"].as_u64().unwrap();
    fs::write(cg.procs_file(), daemon.to_string()).unwrap();
    let moved = wait_stats(m.path(), Duration::from_secs(10), |s| {
        s["memory_pressure"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&name))
    });
    assert!(
        moved["memory_pressure"]["memory_limit"].as_u64() == Some(16 << 20),
        "the daemon did not follow its move into {name}: {}",
        moved["memory_pressure"]
    );
    evict_from_page_cache(&img);
    let n = read_all(&m.path().join("random"), u64::MAX, || {});
    assert_eq!(n, 64 << 20);
    let s = wait_stats(m.path(), Duration::from_secs(10), |s| {
        u(s, "memory_pressure", "limit_events") > 0 && u(s, "memory_pressure", "shrinker_runs") > 0
    });
    assert!(
        u(&s, "memory_pressure", "limit_events") > 0,
        "no reclaim seen in a 16 MiB cgroup after reading 64 MiB: {}",
        s["memory_pressure"]
    );
    assert!(
        u(&s, "memory_pressure", "shrinker_runs") > 0,
        "{}",
        s["memory_pressure"]
    );
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "{}", exit.describe());
    drop(cg);
}

/// Poll `stats` until `done` holds or `limit` passes; returns the last stats.
fn wait_stats(mnt: &Path, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = stats(mnt);
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// Test scenario: where the kernel offers PSI triggers, the daemon arms one, and real memory
// pressure (a reader thrashing the page cache in a 16 MiB memory cgroup: reclaim stalls, which
// PSI counts system-wide) makes the daemon run the shrinker as kswapd would: pressure events
// and shrinker runs are counted and cached maps go down. Skipped, with the reason printed,
// where the kernel has no PSI, refuses triggers, or no memory cgroup can be made.
#[test]
fn psi_trigger_runs_the_shrinker() {
    let _s = serial();
    require_fuse_env();
    if !Path::new("/proc/pressure/memory").exists() {
        eprintln!("SKIPPED psi_trigger_runs_the_shrinker: no /proc/pressure/memory (no PSI)");
        return;
    }
    let t = TestDir::new("stats-psi");
    let img = compressed_image(&t, 256);
    let mnt = t.mkdir("mnt");
    let m = Mount::with_options(&img, &mnt, "ro");
    read_all(&m.path().join("big"), u64::MAX, || {});
    let s0 = stats(m.path());
    let p = &s0["memory_pressure"];
    if p["psi_mode"] != "trigger" {
        eprintln!(
            "SKIPPED psi_trigger_runs_the_shrinker: the daemon could not arm a PSI trigger \
             (mode {}, {})",
            p["psi_mode"], p["psi_note"]
        );
        return;
    }
    let cached0 = u(&s0, "extent_maps", "cached");
    assert!(cached0 >= 256, "{s0}");

    // 96 MiB of data, not in the page cache, read over and over in 16 MiB.
    let big = t.join("thrash");
    {
        let mut f = fs::File::create(&big).unwrap();
        let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 253) as u8).collect();
        for _ in 0..96 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    evict_from_page_cache(&big);
    let thrasher = match Thrasher::start(&format!("ubtrfs-test-psi-{}", std::process::id()), &big) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED psi_trigger_runs_the_shrinker: {why}");
            return;
        }
    };
    let s = wait_stats(m.path(), Duration::from_secs(60), |s| {
        u(s, "memory_pressure", "psi_events") > 0 && u(s, "memory_pressure", "shrinker_runs") > 0
    });
    drop(thrasher);
    assert!(
        u(&s, "memory_pressure", "psi_events") > 0,
        "no PSI event within 60 s of page-cache thrashing: {}",
        s["memory_pressure"]
    );
    assert!(
        u(&s, "memory_pressure", "shrinker_runs") > 0,
        "{}",
        s["memory_pressure"]
    );
    assert!(u(&s, "shrinker", "dropped") > 0, "{}", s["shrinker"]);
    assert!(
        u(&s, "extent_maps", "cached") < cached0,
        "cached maps did not go down under pressure: {} -> {}",
        cached0,
        u(&s, "extent_maps", "cached")
    );
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "{}", exit.describe());
}
