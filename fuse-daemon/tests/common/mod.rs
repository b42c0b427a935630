//! Shared support for the integration tests of the `ubtrfs` binary.
//!
//! - [`TestDir`]: a private temporary directory per test (under `$UBTRFS_TEST_TMPDIR`, default
//!   `/tmp/ubtrfs-tests`), removed on drop after any mount left inside it is detached.
//! - [`mount::Mount`]: `ubtrfs mount -f` as a guard that always unmounts and reaps the daemon;
//!   [`mount::LoopMount`]: a kernel loop mount that always unmounts and detaches its loop device.
//! - [`tree::generate_tree`]: a deterministic tree with the cases that break filesystems.
//! - [`compare`]: snapshots of a tree (metadata, content hashes, xattrs, link targets) and a
//!   diff that reports every difference at once.
//! - [`walk::walk_everything`]: a bounded walk that touches every object and records errnos,
//!   for damaged images.
//!
//! Everything a test needs from the machine (mkfs.btrfs, fusermount3, losetup, xz, root) is
//! checked with [`require_tool`]/[`require_root`], which fail loudly: nothing is skipped.
#![allow(dead_code)]

pub mod compare;
pub mod mount;
pub mod tree;
pub mod walk;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The daemon under test.
pub const UBTRFS: &str = env!("CARGO_BIN_EXE_ubtrfs");

/// Exit code of a Rust process that panicked in `main` (or any thread with panic=unwind
/// propagating to main).
pub const PANIC_EXIT_CODE: i32 = 101;

/// A unique directory for one test; removed (after detaching mounts inside it) on drop unless
/// `UBTRFS_KEEP_TMP` is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/ubtrfs-tests"));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{name}-{}-{n}", std::process::id()));
        if path.exists() {
            mount::detach_everything_under(&path);
            fs::remove_dir_all(&path).unwrap_or_else(|e| panic!("removing {path:?}: {e}"));
        }
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {path:?}: {e}"));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// A new empty directory inside the test dir (for mount points and source trees).
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {p:?}: {e}"));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Never recurse into a mounted filesystem: detach whatever is still mounted first.
        mount::detach_everything_under(&self.path);
        if std::env::var_os("UBTRFS_KEEP_TMP").is_some() {
            eprintln!("keeping {:?} (UBTRFS_KEEP_TMP)", self.path);
            return;
        }
        if mount::mounts_under(&self.path).is_empty() {
            // Files inside trees with mode 000 directories are still removable by root.
            let _ = fs::remove_dir_all(&self.path);
        } else {
            eprintln!(
                "not removing {:?}: something is still mounted inside",
                self.path
            );
        }
    }
}

/// Panic unless running as root (loop devices, kernel mounts, chown in generated trees).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root (loop devices, kernel btrfs mounts); run them as root"
    );
}

/// Panic with a clear message unless `tool` is found in PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` not found in PATH (ci/test.sh installs btrfs-progs, fuse3, \
         xz-utils, util-linux)"
    );
}

/// Check everything the FUSE tests need from the machine.
pub fn require_fuse_env() {
    require_root();
    for t in [
        "mkfs.btrfs",
        "btrfs",
        "fusermount3",
        "losetup",
        "mount",
        "umount",
    ] {
        require_tool(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (load the fuse module)"
    );
}

/// Run a command to completion within `limit`; panics if it cannot be started.
/// Returns None when it had to be killed.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    wait_output_timeout(child, limit)
}

/// Wait for a child with piped output, killing it after `limit`.
pub fn wait_output_timeout(mut child: Child, limit: Duration) -> Option<Output> {
    // Drain the pipes on threads so that a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let status = wait_timeout(&mut child, limit);
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Some(Output {
        status,
        stdout,
        stderr,
    })
}

/// Poll a child until it exits or `limit` passes.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command that must succeed within 10 minutes; returns its stdout.
pub fn run_ok(program: &str, args: &[&OsStr]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(600))
        .unwrap_or_else(|| panic!("{program} {args:?} did not finish within 10 minutes"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run_ok` with string arguments.
pub fn sh(program: &str, args: &[&str]) -> String {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run_ok(program, &args)
}

/// Options for [`mkfs_image`].
#[derive(Clone, Debug, Default)]
pub struct Mkfs<'a> {
    /// `--rootdir` source tree.
    pub rootdir: Option<&'a Path>,
    /// `--csum` algorithm (crc32c, xxhash, sha256, blake2).
    pub csum: Option<&'a str>,
    /// `--nodesize`.
    pub nodesize: Option<u32>,
    /// `-O` feature list, e.g. `^no-holes`.
    pub features: Option<&'a str>,
    /// Image size in bytes (a sparse file); 512 MiB when 0.
    pub size: u64,
}

/// Create a sparse image file and run mkfs.btrfs on it.
pub fn mkfs_image(image: &Path, opts: &Mkfs<'_>) {
    require_tool("mkfs.btrfs");
    let size = if opts.size == 0 { 512 << 20 } else { opts.size };
    let f = fs::File::create(image).unwrap_or_else(|e| panic!("creating {image:?}: {e}"));
    f.set_len(size).expect("sizing the image");
    drop(f);
    let mut args: Vec<std::ffi::OsString> = vec!["-f".into(), "-q".into()];
    if let Some(r) = opts.rootdir {
        args.push("--rootdir".into());
        args.push(r.into());
    }
    if let Some(c) = opts.csum {
        args.push("--csum".into());
        args.push(c.into());
    }
    if let Some(f) = opts.features {
        args.push("-O".into());
        args.push(f.into());
    }
    if let Some(n) = opts.nodesize {
        args.push("--nodesize".into());
        args.push(n.to_string().into());
    }
    args.push(image.into());
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_ok("mkfs.btrfs", &args);
}

/// Overwrite `len` bytes at `offset` of a file with their bitwise complement.
pub fn flip_bytes(file: &Path, offset: u64, len: usize) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap_or_else(|e| panic!("opening {file:?}: {e}"));
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut buf).unwrap();
    for b in &mut buf {
        *b = !*b;
    }
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

/// Offsets of every occurrence of `needle` in `file` (read in chunks; overlaps handled).
pub fn find_in_file(file: &Path, needle: &[u8]) -> Vec<u64> {
    assert!(!needle.is_empty());
    let mut f = fs::File::open(file).unwrap_or_else(|e| panic!("opening {file:?}: {e}"));
    let mut hits = Vec::new();
    let chunk = 8 << 20;
    let mut buf = vec![0u8; chunk + needle.len()];
    let mut carry = 0usize;
    let mut base = 0u64; // file offset of buf[0]
    loop {
        let n = f.read(&mut buf[carry..carry + chunk]).unwrap();
        if n == 0 {
            break;
        }
        let have = carry + n;
        let window = &buf[..have];
        let mut i = 0;
        while i + needle.len() <= have {
            if &window[i..i + needle.len()] == needle {
                hits.push(base + i as u64);
            }
            i += 1;
        }
        let keep = (needle.len() - 1).min(have);
        buf.copy_within(have - keep..have, 0);
        base += (have - keep) as u64;
        carry = keep;
    }
    hits
}

/// The errno of an io::Error, or -1 when it has none.
pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// A readable name for an errno value.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EIO => "EIO",
        libc::EUCLEAN => "EUCLEAN",
        libc::ENOENT => "ENOENT",
        libc::ENOTCONN => "ENOTCONN",
        libc::ENOSYS => "ENOSYS",
        libc::EINVAL => "EINVAL",
        libc::ENODATA => "ENODATA",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOMEM => "ENOMEM",
        libc::EFBIG => "EFBIG",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ELOOP => "ELOOP",
        libc::ERANGE => "ERANGE",
        libc::E2BIG => "E2BIG",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNABORTED => "ECONNABORTED",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Run `f` on a helper thread and wait at most `limit` for it. On timeout `on_timeout` runs
/// (typically: kill the daemon, which makes every blocked FUSE call fail) and this returns
/// None; the helper thread is then given 30 more seconds and abandoned if still stuck.
pub fn with_watchdog<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
    on_timeout: impl FnOnce(),
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => {
            let _ = handle.join();
            Some(v)
        }
        Ok(Err(panic)) => {
            let _ = handle.join();
            std::panic::resume_unwind(panic)
        }
        Err(_) => {
            on_timeout();
            let _ = rx.recv_timeout(Duration::from_secs(30));
            None
        }
    }
}

/// Decompress `src` (an .xz file) into `dir`, returning the path of the result.
pub fn xz_decompress_into(src: &Path, dir: &Path) -> PathBuf {
    require_tool("xz");
    let name = src.file_name().expect("xz file name");
    let copy = dir.join(name);
    fs::copy(src, &copy).unwrap_or_else(|e| panic!("copying {src:?}: {e}"));
    // The test data is read-only; the copy must be removable.
    let mut perm = fs::metadata(&copy).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    fs::set_permissions(&copy, perm).unwrap();
    run_ok(
        "xz",
        &[OsStr::new("-d"), OsStr::new("-f"), copy.as_os_str()],
    );
    copy.with_extension("")
}

/// Snapshot a ubtrfs mount on a helper thread; a hang kills the daemon and fails the test.
pub fn snapshot_guarded(m: &mut mount::Mount, limit: Duration) -> compare::Snapshot {
    m.run_guarded(limit, |p| compare::snapshot(&p))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Collects named lists of problems and panics once with all of them.
#[derive(Default)]
pub struct Problems {
    sections: Vec<(String, Vec<String>)>,
}

impl Problems {
    pub fn add(&mut self, title: impl Into<String>, lines: Vec<String>) {
        if !lines.is_empty() {
            self.sections.push((title.into(), lines));
        }
    }

    pub fn add_one(&mut self, title: impl Into<String>, line: impl Into<String>) {
        self.add(title, vec![line.into()]);
    }

    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// Take over another collection's problems, prefixing their titles.
    pub fn merge(&mut self, prefix: &str, other: Problems) {
        for (title, lines) in other.sections {
            self.sections.push((format!("{prefix}: {title}"), lines));
        }
    }

    /// Panic listing every problem (at most 200 lines per section).
    pub fn check(self, what: &str) {
        if self.sections.is_empty() {
            return;
        }
        let mut msg = format!("{what}:\n");
        for (title, lines) in &self.sections {
            msg.push_str(&format!("== {title} ({} problem(s))\n", lines.len()));
            for l in lines.iter().take(200) {
                msg.push_str("  ");
                msg.push_str(l);
                msg.push('\n');
            }
            if lines.len() > 200 {
                msg.push_str(&format!("  ... and {} more\n", lines.len() - 200));
            }
        }
        panic!("{msg}");
    }
}

/// Seed derived from a test name, so each test has its own tree but reruns are identical.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// True for a line written by the daemon's logger (tracing: optional timestamp, then the level).
pub fn is_log_line(line: &str) -> bool {
    const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
    let mut w = line.split_whitespace();
    let first = w.next().unwrap_or("");
    let second = w.next().unwrap_or("");
    LEVELS.contains(&first) || LEVELS.contains(&second)
}

/// The non-empty lines of a daemon's stderr that are not log lines: the error message(s) a
/// user reads when a mount fails. A clean refusal has exactly one.
pub fn message_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_log_line(l))
        .collect()
}

/// `btrfs check --readonly` of an image must pass and report "no error found" without any
/// ERROR line (btrfs-progs exits 0 on some findings it only prints).
pub fn check_image(img: &Path) {
    require_tool("btrfs");
    let out = Command::new("btrfs")
        .args(["check", "--readonly"])
        .arg(img)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("no error found") && !text.contains("ERROR"),
        "btrfs check failed:\n{text}"
    );
}
