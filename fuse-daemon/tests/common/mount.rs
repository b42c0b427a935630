//! Mount guards: the daemon under test ([`Mount`]) and kernel loop mounts ([`LoopMount`]).
//!
//! Both guards undo what they did on drop, also while the test is panicking: unmount (lazily if
//! need be), reap the daemon (killing it if it does not exit by itself), detach the loop device.

use super::{require_tool, run_with_timeout, wait_timeout, PANIC_EXIT_CODE, UBTRFS};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the daemon may take to show up in /proc/self/mountinfo.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to exit after its mount is gone.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// One line of /proc/self/mountinfo that matters here.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
}

fn unescape_mountinfo(s: &str) -> String {
    // Spaces, tabs, newlines and backslashes are octal-escaped (\040 etc.).
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All current mounts, from /proc/self/mountinfo.
pub fn mountinfo() -> Vec<MountInfo> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 2 {
            continue;
        }
        v.push(MountInfo {
            target: PathBuf::from(unescape_mountinfo(pre[4])),
            fstype: post[0].to_string(),
            source: unescape_mountinfo(post[1]),
        });
    }
    v
}

/// The mount at exactly `target`, if any (the last one when stacked).
pub fn mount_at(target: &Path) -> Option<MountInfo> {
    mountinfo().into_iter().rev().find(|m| m.target == target)
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo()
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .map(|m| m.target)
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Lazily unmount everything at or below `dir` and detach loop devices backed by files below
/// it. Used by TestDir's drop as the last line of defence.
pub fn detach_everything_under(dir: &Path) {
    for m in mounts_under(dir) {
        eprintln!("cleanup: unmounting stray mount {m:?}");
        let _ = run_with_timeout(
            Command::new("fusermount3").arg("-u").arg("-z").arg(&m),
            Duration::from_secs(10),
        );
        if mount_at(&m).is_some() {
            let _ = run_with_timeout(
                Command::new("umount").arg("-l").arg(&m),
                Duration::from_secs(10),
            );
        }
    }
    for (dev, back) in loop_devices() {
        if back.starts_with(dir) {
            eprintln!("cleanup: detaching stray loop device {dev} ({back:?})");
            let _ = run_with_timeout(
                Command::new("losetup").arg("-d").arg(&dev),
                Duration::from_secs(10),
            );
        }
    }
}

/// (device, backing file) of every loop device.
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    let Some(out) = run_with_timeout(
        Command::new("losetup").args(["-n", "-l", "-O", "NAME,BACK-FILE"]),
        Duration::from_secs(10),
    ) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let dev = it.next()?.to_string();
            let rest: Vec<&str> = it.collect();
            Some((dev, PathBuf::from(rest.join(" "))))
        })
        .collect()
}

/// How the daemon ended.
#[derive(Debug, Clone)]
pub struct DaemonExit {
    pub status: Option<ExitStatus>,
    /// True when it did not exit by itself within [`EXIT_TIMEOUT`] and was killed.
    pub killed: bool,
    pub stderr: String,
}

impl DaemonExit {
    /// Exited by itself, not by a panic, not by a signal.
    pub fn is_clean_exit(&self) -> bool {
        !self.killed
            && self
                .status
                .map(|s| s.code().is_some() && s.code() != Some(PANIC_EXIT_CODE))
                .unwrap_or(false)
    }

    pub fn panicked(&self) -> bool {
        self.status.and_then(|s| s.code()) == Some(PANIC_EXIT_CODE)
            || self.stderr.contains("panicked at")
    }

    pub fn describe(&self) -> String {
        let how = match (self.killed, self.status) {
            (true, _) => "did not exit by itself and was killed".to_string(),
            (false, Some(s)) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => format!("ended with {s}"),
            },
            (false, None) => "exit status unknown".to_string(),
        };
        format!("{how}; stderr:\n{}", self.stderr)
    }
}

/// Why a mount did not come up.
#[derive(Debug, Clone)]
pub struct MountFailure {
    pub exit: DaemonExit,
    /// True when the daemon neither mounted nor exited within [`MOUNT_TIMEOUT`].
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// `ubtrfs mount -f -o OPTS IMAGE MNT` as a guard.
pub struct Mount {
    child: Option<Child>,
    mnt: PathBuf,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    exit: Option<DaemonExit>,
}

impl Mount {
    /// Mount read-only (`-o ro`); panics with the daemon's stderr if it does not come up.
    pub fn new(image: &Path, mnt: &Path) -> Mount {
        Self::with_options(image, mnt, "ro")
    }

    /// Mount with the given `-o` options; panics with the daemon's stderr if it does not
    /// come up.
    pub fn with_options(image: &Path, mnt: &Path, opts: &str) -> Mount {
        match Self::try_new(image, mnt, opts) {
            Ok(m) => m,
            Err(f) => panic!(
                "ubtrfs mount {image:?} {mnt:?} failed{} after {:?}: {}",
                if f.timed_out { " (timed out)" } else { "" },
                f.elapsed,
                f.exit.describe()
            ),
        }
    }

    /// Start the daemon and wait until its mount appears; an error says how it ended.
    pub fn try_new(image: &Path, mnt: &Path, opts: &str) -> Result<Mount, MountFailure> {
        Self::try_new_timeout(image, mnt, opts, MOUNT_TIMEOUT)
    }

    /// As [`Mount::try_new`] with a given bound on the time to mount.
    pub fn try_new_timeout(
        image: &Path,
        mnt: &Path,
        opts: &str,
        mount_timeout: Duration,
    ) -> Result<Mount, MountFailure> {
        Self::try_new_env(image, mnt, opts, mount_timeout, &[])
    }

    /// As [`Mount::try_new_timeout`], with extra environment variables for the daemon.
    pub fn try_new_env(
        image: &Path,
        mnt: &Path,
        opts: &str,
        mount_timeout: Duration,
        env: &[(&str, &str)],
    ) -> Result<Mount, MountFailure> {
        require_tool("fusermount3");
        let mnt = fs::canonicalize(mnt).unwrap_or_else(|e| panic!("mount point {mnt:?}: {e}"));
        let stderr_path = mnt.with_extension(format!("ubtrfs-stderr.{}", unique()));
        let stdout_path = mnt.with_extension(format!("ubtrfs-stdout.{}", unique()));
        let err_file = fs::File::create(&stderr_path).expect("stderr capture file");
        let out_file = fs::File::create(&stdout_path).expect("stdout capture file");
        let start = Instant::now();
        let child = Command::new(UBTRFS)
            .arg("mount")
            .arg("-f")
            .arg("-o")
            .arg(opts)
            .arg(image)
            .arg(&mnt)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {UBTRFS}: {e}"));
        let mut m = Mount {
            child: Some(child),
            mnt,
            stderr_path,
            stdout_path,
            exit: None,
        };
        loop {
            if let Some(info) = mount_at(&m.mnt) {
                if info.fstype == "fuse" || info.fstype.starts_with("fuse.") {
                    return Ok(m);
                }
            }
            let child = m.child.as_mut().expect("child present while mounting");
            if let Ok(Some(status)) = child.try_wait() {
                m.child = None;
                let exit = DaemonExit {
                    status: Some(status),
                    killed: false,
                    stderr: m.stderr(),
                };
                m.exit = Some(exit.clone());
                return Err(MountFailure {
                    exit,
                    timed_out: false,
                    elapsed: start.elapsed(),
                });
            }
            if start.elapsed() > mount_timeout {
                let _ = child.kill();
                let status = child.wait().ok();
                m.child = None;
                // It may have mounted in the meantime.
                m.force_unmount();
                let exit = DaemonExit {
                    status,
                    killed: true,
                    stderr: m.stderr(),
                };
                m.exit = Some(exit.clone());
                return Err(MountFailure {
                    exit,
                    timed_out: true,
                    elapsed: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// What the daemon has written to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// True while the daemon process is running.
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The daemon's exit, if it has already ended (without waiting).
    pub fn try_exit(&mut self) -> Option<DaemonExit> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                self.exit = Some(DaemonExit {
                    status: Some(status),
                    killed: false,
                    stderr: self.stderr(),
                });
            }
        }
        self.exit.clone()
    }

    /// Run `f(mountpoint)` on a helper thread. If it does not finish within `limit` (a hung
    /// daemon), the daemon is killed (which fails every blocked request) and the error names
    /// the hang and carries the daemon's stderr.
    pub fn run_guarded<T: Send + 'static>(
        &mut self,
        limit: Duration,
        f: impl FnOnce(PathBuf) -> T + Send + 'static,
    ) -> Result<T, String> {
        let p = self.mnt.clone();
        let r = super::with_watchdog(limit, move || f(p), || self.kill());
        match r {
            Some(v) => Ok(v),
            None => Err(format!(
                "operations on {:?} did not finish within {limit:?}: the daemon hung and was \
                 killed; its stderr:\n{}",
                self.mnt,
                self.stderr()
            )),
        }
    }

    /// SIGKILL the daemon (every blocked FUSE request then fails) and detach the mount.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let status = c.wait().ok();
            self.exit = Some(DaemonExit {
                status,
                killed: true,
                stderr: self.stderr(),
            });
        }
        self.force_unmount();
    }

    fn force_unmount(&self) {
        if mount_at(&self.mnt).is_some() {
            let _ = run_with_timeout(
                Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.mnt),
                Duration::from_secs(10),
            );
        }
        if mount_at(&self.mnt).is_some() {
            let _ = run_with_timeout(
                Command::new("umount").arg("-l").arg(&self.mnt),
                Duration::from_secs(10),
            );
        }
    }

    /// Unmount with `fusermount3 -u` (lazy unmount as a fallback) and wait for the daemon to
    /// exit by itself; kills it after [`EXIT_TIMEOUT`]. Returns how it ended.
    pub fn unmount(mut self) -> DaemonExit {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> DaemonExit {
        if let Some(e) = self.exit.clone() {
            self.force_unmount();
            return e;
        }
        let mut unmount_err = String::new();
        if mount_at(&self.mnt).is_some() {
            match run_with_timeout(
                Command::new("fusermount3").arg("-u").arg(&self.mnt),
                Duration::from_secs(20),
            ) {
                Some(o) if o.status.success() => {}
                Some(o) => {
                    unmount_err = format!(
                        "fusermount3 -u failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )
                }
                None => unmount_err = "fusermount3 -u hung".to_string(),
            }
            if mount_at(&self.mnt).is_some() {
                let _ = run_with_timeout(
                    Command::new("umount").arg("-l").arg(&self.mnt),
                    Duration::from_secs(20),
                );
            }
        }
        let mut c = match self.child.take() {
            Some(c) => c,
            None => {
                return DaemonExit {
                    status: None,
                    killed: false,
                    stderr: self.stderr(),
                }
            }
        };
        let (status, killed) = match wait_timeout(&mut c, EXIT_TIMEOUT) {
            Some(s) => (Some(s), false),
            None => {
                let _ = c.kill();
                (c.wait().ok(), true)
            }
        };
        let mut stderr = self.stderr();
        if !unmount_err.is_empty() {
            stderr.push_str(&format!("\n[test harness: {unmount_err}]"));
        }
        let e = DaemonExit {
            status,
            killed,
            stderr,
        };
        self.exit = Some(e.clone());
        e
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let e = self.do_unmount();
        let _ = fs::remove_file(&self.stderr_path);
        let _ = fs::remove_file(&self.stdout_path);
        if !std::thread::panicking() && (e.killed || e.panicked()) {
            eprintln!("warning: ubtrfs daemon for {:?} {}", self.mnt, e.describe());
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A kernel btrfs mount of an image file through a loop device it allocates itself
/// (`losetup --find --show`), so that it detaches exactly that device on drop.
pub struct LoopMount {
    dev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopMount {
    /// `losetup --find --show [-r] IMAGE` + `mount -t btrfs -o OPTS DEV MNT`. Panics (after
    /// detaching the device) when the kernel refuses the mount.
    pub fn new(image: &Path, mnt: &Path, opts: &str) -> LoopMount {
        match Self::try_new(image, mnt, opts) {
            Ok(m) => m,
            Err(e) => panic!("kernel mount of {image:?} failed: {e}"),
        }
    }

    /// As [`LoopMount::new`], returning the mount error (with dmesg's last btrfs lines) instead.
    pub fn try_new(image: &Path, mnt: &Path, opts: &str) -> Result<LoopMount, String> {
        require_tool("losetup");
        require_tool("mount");
        let ro = opts.split(',').any(|o| o == "ro");
        let dev = attach_loop(image, ro);
        let mnt = fs::canonicalize(mnt).unwrap_or_else(|e| panic!("mount point {mnt:?}: {e}"));
        let mut m = LoopMount {
            dev,
            mnt,
            mounted: false,
        };
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", opts])
                .arg(&m.dev)
                .arg(&m.mnt),
            Duration::from_secs(120),
        );
        match out {
            Some(o) if o.status.success() => {
                m.mounted = true;
                Ok(m)
            }
            Some(o) => Err(format!(
                "mount -t btrfs -o {opts} {} {:?}: {}",
                m.dev,
                m.mnt,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            None => Err(format!("mount -t btrfs -o {opts} {} hung", m.dev)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    pub fn device(&self) -> &str {
        &self.dev
    }

    /// Unmount and detach now (drop does the same).
    pub fn unmount(mut self) {
        self.cleanup();
    }

    fn cleanup(&mut self) {
        if self.mounted {
            let mut done = false;
            for _ in 0..50 {
                let ok = run_with_timeout(
                    Command::new("umount").arg(&self.mnt),
                    Duration::from_secs(60),
                )
                .map(|o| o.status.success())
                .unwrap_or(false);
                if ok || mount_at(&self.mnt).is_none() {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !done {
                let _ = run_with_timeout(
                    Command::new("umount").arg("-l").arg(&self.mnt),
                    Duration::from_secs(30),
                );
            }
            self.mounted = false;
        }
        if !self.dev.is_empty() {
            detach_loop(&self.dev);
            self.dev.clear();
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Run `sync` and drop the page cache, dentries and inodes (cold reads).
pub fn drop_caches() {
    let _ = run_with_timeout(&mut Command::new("sync"), Duration::from_secs(120));
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// A loop device over an image file, for mounting the daemon on a block device; detached on
/// drop (also while unwinding). Declare it before the [`Mount`]s that use it, so that they
/// are dropped (unmounted, daemon reaped) first.
pub struct LoopDevice {
    dev: String,
}

impl LoopDevice {
    /// `losetup --find --show IMAGE`.
    pub fn attach(image: &Path) -> LoopDevice {
        require_tool("losetup");
        LoopDevice {
            dev: attach_loop(image, false),
        }
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !detach_loop(&self.dev) {
            eprintln!("warning: could not detach {}", self.dev);
        }
    }
}

/// `losetup --find --show [-r] IMAGE`: the loop device attached (panics if losetup fails).
fn attach_loop(image: &Path, read_only: bool) -> String {
    let mut cmd = Command::new("losetup");
    cmd.arg("--find").arg("--show");
    if read_only {
        cmd.arg("-r");
    }
    cmd.arg(image);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("losetup --find --show {image:?} hung"));
    assert!(
        out.status.success(),
        "losetup --find --show {image:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    dev
}

/// `losetup -d DEV`, retried for about 5 s while the device is still busy (a daemon or the
/// kernel closing it); whether it was detached.
fn detach_loop(dev: &str) -> bool {
    for _ in 0..50 {
        let ok = run_with_timeout(
            Command::new("losetup").arg("-d").arg(dev),
            Duration::from_secs(30),
        )
        .map(|o| o.status.success())
        .unwrap_or(false);
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
