//! `ubtrfs`: btrfs in userspace. Command line and FUSE daemon.
//!
//! `ubtrfs mount [-o OPTIONS] [-f] IMAGE MOUNTPOINT` mounts a btrfs image or block device.
//! Without `-f` the command returns once the mount is live and a background daemon serves it;
//! `umount MOUNTPOINT` ends the daemon. The mount(8) helper form `ubtrfs IMAGE MOUNTPOINT -o OPTS`
//! (what `mount -t fuse.ubtrfs` runs through mount.fuse3) is accepted too.
//!
//! `ubtrfs stats MOUNTPOINT` and `ubtrfs shrink MOUNTPOINT` talk to a running daemon through
//! its control socket (control.rs); the daemon also watches memory pressure (pressure.rs).

mod control;
mod fuse;
mod options;
mod pressure;
mod stats;
mod trace;

use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

/// Environment variable telling a re-executed daemon to report readiness on stdout.
const READY_ENV: &str = "UBTRFS_DAEMON_READY";
const DEFAULT_IMAGE: &str = "ubtrfs.img";
const DEFAULT_MOUNTPOINT: &str = "mnt";
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

#[derive(Parser)]
#[command(
    name = "ubtrfs",
    version,
    about = "btrfs in userspace: mount real btrfs images through FUSE"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount IMAGE (file or block device) on MOUNTPOINT. With no arguments, mounts ./ubtrfs.img
    /// (created, 1 GiB sparse, when missing) on ./mnt.
    Mount {
        /// Mount options, comma separated (ro, subvol=, subvolid=, fsname=, ...).
        #[arg(short = 'o', action = clap::ArgAction::Append)]
        options: Vec<String>,
        /// Stay in the foreground.
        #[arg(short = 'f')]
        foreground: bool,
        image: Option<PathBuf>,
        mountpoint: Option<PathBuf>,
    },
    /// Make a new btrfs filesystem on IMAGE (file or block device) with mkfs.btrfs's default
    /// features. A missing IMAGE is created as a sparse file of --size (default 1 GiB).
    Mkfs {
        /// Filesystem size (bytes, or with a K/M/G/T suffix). Default: the size of IMAGE.
        #[arg(long, short = 'b', value_parser = ubtrfs_fs::mkfs::parse_size)]
        size: Option<u64>,
        /// Checksum algorithm: crc32c, xxhash, sha256 or blake2.
        #[arg(long, alias = "checksum", default_value = "crc32c", value_parser = parse_csum)]
        csum: ubtrfs_format::CsumType,
        /// Tree block size: a power of two from 4096 to 65536.
        #[arg(long, short = 'n', default_value_t = ubtrfs_fs::mkfs::DEFAULT_NODESIZE)]
        nodesize: u32,
        /// Filesystem label (at most 255 bytes).
        #[arg(long, short = 'L', default_value = "")]
        label: String,
        /// Comma-separated features to add: block-group-tree.
        #[arg(long, short = 'O', value_delimiter = ',')]
        features: Vec<String>,
        /// Print nothing on success.
        #[arg(long, short = 'q')]
        quiet: bool,
        image: PathBuf,
    },
    /// Print the counters of a running ubtrfs mount, grouped, with units: extent maps, the
    /// shrinker, invariant violations, fsync, transactions, caches, checksum errors, I/O,
    /// memory pressure.
    Stats {
        mountpoint: PathBuf,
        /// Print what changed every SECS seconds (after one full report), until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
        /// With --watch: stop after N reports.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
        /// One JSON object, for scripts (with --watch: one object per line).
        #[arg(long)]
        json: bool,
    },
    /// Run the extent-map shrinker of a running ubtrfs mount now and print what it did.
    Shrink {
        mountpoint: PathBuf,
        /// Maps to scan (default: every cached map).
        #[arg(long, value_name = "N")]
        nr: Option<u64>,
        /// Run again and again until interrupted, printing a summary every second.
        #[arg(long = "loop")]
        looping: bool,
    },
    /// Race explorer: kernel code paths as actors over the real extent-map code, explored by
    /// seed or exhaustively; prints violations per invariant and replayable schedules.
    Race(ubtrfs_race::cli::RaceArgs),
}

fn parse_csum(s: &str) -> Result<ubtrfs_format::CsumType, String> {
    ubtrfs_fs::mkfs::parse_csum_type(s)
        .ok_or_else(|| format!("unknown checksum type '{s}' (crc32c, xxhash, sha256, blake2)"))
}

/// `RUST_LOG` to stderr; the mount command installs its own (trace=, trace_file=).
fn init_tracing() {
    let _ = trace::init(None, None);
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    // mount(8) helper form: ubtrfs IMAGE MOUNTPOINT [-o OPTS]
    if args.len() >= 3
        && !args[1].starts_with('-')
        && !matches!(
            args[1].as_str(),
            "mount" | "mkfs" | "race" | "stats" | "shrink" | "help"
        )
    {
        args.insert(1, "mount".into());
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.cmd {
        Cmd::Mount {
            options,
            foreground,
            image,
            mountpoint,
        } => cmd_mount(options, foreground, image, mountpoint),
        Cmd::Mkfs {
            size,
            csum,
            nodesize,
            label,
            features,
            quiet,
            image,
        } => {
            init_tracing();
            cmd_mkfs(size, csum, nodesize, label, features, quiet, &image)
        }
        Cmd::Stats {
            mountpoint,
            watch,
            count,
            json,
        } => {
            init_tracing();
            stats::cmd_stats(&mountpoint, watch, count, json)
        }
        Cmd::Shrink {
            mountpoint,
            nr,
            looping,
        } => {
            init_tracing();
            stats::cmd_shrink(&mountpoint, nr, looping)
        }
        Cmd::Race(args) => ubtrfs_race::cli::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ubtrfs: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Create the default image (1 GiB, sparse) with ubtrfs's own mkfs.
fn create_default_image(path: &Path) -> Result<(), String> {
    let opts = ubtrfs_fs::mkfs::MkfsOptions {
        size: Some(DEFAULT_IMAGE_SIZE),
        ..Default::default()
    };
    ubtrfs_fs::mkfs::mkfs(path, &opts).map_err(|e| format!("creating {}: {e}", path.display()))?;
    eprintln!("ubtrfs: created {} (1 GiB, ubtrfs mkfs)", path.display());
    Ok(())
}

fn cmd_mkfs(
    size: Option<u64>,
    csum: ubtrfs_format::CsumType,
    nodesize: u32,
    label: String,
    features: Vec<String>,
    quiet: bool,
    image: &Path,
) -> Result<(), String> {
    use ubtrfs_fs::mkfs::{format_uuid, mkfs, MkfsOptions};
    let mut opts = MkfsOptions {
        size,
        csum,
        nodesize,
        label,
        ..Default::default()
    };
    for f in features.iter().filter(|f| !f.is_empty()) {
        match f.as_str() {
            "block-group-tree" | "bgt" => opts.block_group_tree = true,
            "^block-group-tree" | "^bgt" => opts.block_group_tree = false,
            other => {
                return Err(format!(
                    "unknown feature '{other}' (known: block-group-tree)"
                ))
            }
        }
    }
    let r = mkfs(image, &opts).map_err(|e| e.to_string())?;
    if !quiet {
        println!("Label:              {}", r.label);
        println!("UUID:               {}", format_uuid(&r.fsid));
        println!("Node size:          {}", r.nodesize);
        println!("Sector size:        {}", r.sectorsize);
        println!("Filesystem size:    {}", r.total_bytes);
        println!("Checksum:           {}", r.csum.name());
        println!("Block group profiles:");
        for c in &r.chunks {
            use ubtrfs_format::items::bg_flags;
            let kind = match c.flags & bg_flags::TYPE_MASK {
                bg_flags::DATA => "Data",
                bg_flags::METADATA => "Metadata",
                _ => "System",
            };
            let profile = if c.flags & bg_flags::DUP != 0 {
                "DUP"
            } else {
                "single"
            };
            println!(
                "  {kind:<16}  {profile:<8} {:>12} at {}",
                c.length, c.logical
            );
        }
        println!(
            "Device:             {} (uuid {})",
            image.display(),
            format_uuid(&r.dev_uuid)
        );
    }
    Ok(())
}

fn cmd_mount(
    opts: Vec<String>,
    foreground: bool,
    image: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
) -> Result<(), String> {
    let (image, mountpoint) = match (image, mountpoint) {
        (Some(i), Some(m)) => (i, m),
        (None, None) => {
            let i = PathBuf::from(DEFAULT_IMAGE);
            let m = PathBuf::from(DEFAULT_MOUNTPOINT);
            if !i.exists() {
                create_default_image(&i)?;
            }
            std::fs::create_dir_all(&m).map_err(|e| format!("creating {}: {e}", m.display()))?;
            (i, m)
        }
        _ => return Err("usage: ubtrfs mount [-o OPTIONS] [-f] IMAGE MOUNTPOINT".into()),
    };
    let parsed = options::parse(&opts)?;
    let daemon = foreground || std::env::var_os(READY_ENV).is_some();
    if daemon {
        trace::init(parsed.trace.as_deref(), parsed.trace_file.as_deref())?;
    } else {
        init_tracing();
    }
    if !mountpoint.is_dir() {
        return Err(format!(
            "mountpoint {} does not exist or is not a directory",
            mountpoint.display()
        ));
    }
    if !image.exists() {
        return Err(format!("{}: no such file or device", image.display()));
    }
    if !daemon {
        if let Some(existing) = served_elsewhere(&image, &parsed) {
            return mount_again(&existing, &mountpoint, parsed.fs.readonly);
        }
        return spawn_daemon(&image, &mountpoint, &opts);
    }
    let fs = match ubtrfs_fs::FsInfo::open(&image, parsed.fs.clone()) {
        Ok(fs) => fs,
        // Images ubtrfs must not write (snapshots, pending balance, v1 space cache, ...) are
        // refused read-write and served read-only, never half-written.
        Err(ubtrfs_fs::FsError::ReadWriteRefused(why)) => {
            eprintln!(
                "ubtrfs: {}: cannot mount read-write: {why}; mounting read-only",
                image.display()
            );
            let ro = ubtrfs_fs::MountOptions {
                readonly: true,
                ..parsed.fs.clone()
            };
            ubtrfs_fs::FsInfo::open(&image, ro).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    serve(fs, &image, &mountpoint, &parsed)
}

/// The live ubtrfs mount of `image` with the same subvolume options, if there is one: its
/// daemon holds the image, so a second daemon cannot serve it.
fn served_elsewhere(image: &Path, p: &options::ParsedOptions) -> Option<control::Client> {
    let canon = std::fs::canonicalize(image).ok()?;
    let want = control::subvol_key(&p.fs);
    // Only mounts whose source names this image are asked (a hung FUSE mount elsewhere
    // must not hang this one).
    let names = [
        p.fsname.clone().unwrap_or_default(),
        image.display().to_string(),
        canon.display().to_string(),
    ];
    control::fuse_mounts().into_iter().find_map(|m| {
        if !names.iter().any(|n| !n.is_empty() && *n == m.source) {
            return None;
        }
        let c = control::Client::connect(&m.target).ok()?;
        (c.image == canon && c.subvol == want).then_some(c)
    })
}

/// A second mount of an image a ubtrfs daemon already serves, as the kernel makes a second
/// mount of a mounted btrfs: the same filesystem (one superblock, here one daemon) seen at
/// another place, by a bind mount of the first, read-only if asked. A read-write mount of an
/// image mounted read-only would need the daemon to turn read-write: refused.
fn mount_again(
    existing: &control::Client,
    mountpoint: &Path,
    readonly: bool,
) -> Result<(), String> {
    let src = &existing.mountpoint;
    let shown = format!(
        "{} (served by pid {} at {})",
        existing.image.display(),
        existing.pid,
        src.display()
    );
    let st = nix_statvfs_readonly(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if st && !readonly {
        return Err(format!(
            "{shown} is mounted read-only; a read-write mount needs that mount gone first"
        ));
    }
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())
    };
    let (s, d) = (c(src)?, c(mountpoint)?);
    // SAFETY: valid NUL-terminated paths; no filesystem type or data for a bind mount.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!(
            "bind mount of {shown} on {}: {}",
            mountpoint.display(),
            std::io::Error::last_os_error()
        ));
    }
    // A bind of a shared mount joins its peer group; a second mount of a device is a mount
    // of its own: take it out of the group, and give it a new one where a fresh mount
    // would be shared (its parent mount is shared).
    let parent_shared = mount_is_shared(mountpoint.parent().unwrap_or(Path::new("/")));
    for flags in [
        Some(libc::MS_PRIVATE),
        parent_shared.then_some(libc::MS_SHARED),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: valid path; a propagation change takes no source, type or data.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: valid path; undo the bind mount made above.
            unsafe { libc::umount2(d.as_ptr(), libc::MNT_DETACH) };
            return Err(format!(
                "mount propagation of {}: {e}",
                mountpoint.display()
            ));
        }
    }
    if readonly {
        // SAFETY: as above; a bind remount changes only this mount's flags.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: valid path; undo the bind mount made above.
            unsafe { libc::umount2(d.as_ptr(), libc::MNT_DETACH) };
            return Err(format!(
                "read-only bind mount on {}: {e}",
                mountpoint.display()
            ));
        }
    }
    eprintln!(
        "ubtrfs: {} is {shown}: mounted there too",
        mountpoint.display()
    );
    Ok(())
}

/// Whether the mount that holds `p` is shared (a `shared:N` tag in /proc/self/mountinfo).
fn mount_is_shared(p: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(p) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // The longest mount point that is a prefix of `canon` (the last one listed wins ties).
    let mut best: Option<(usize, bool)> = None;
    for line in text.lines() {
        let Some((pre, _)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = pre.split(' ').collect();
        if f.len() < 6 {
            continue;
        }
        let target = PathBuf::from(f[4].replace("\\040", " "));
        if canon.starts_with(&target) {
            let len = target.as_os_str().len();
            let shared = f[6..].iter().any(|t| t.starts_with("shared:"));
            if best.is_none_or(|(l, _)| len >= l) {
                best = Some((len, shared));
            }
        }
    }
    best.is_some_and(|(_, s)| s)
}

/// Whether the mount at `p` is read-only (statvfs ST_RDONLY).
fn nix_statvfs_readonly(p: &Path) -> std::io::Result<bool> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c is a valid path and st points to writable storage for one statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded and filled st.
    let st = unsafe { st.assume_init() };
    Ok(st.f_flag & libc::ST_RDONLY != 0)
}

/// Re-run ourselves in the foreground as a background daemon, and return when it reports that
/// the mount is live (or print why it failed).
fn spawn_daemon(image: &Path, mountpoint: &Path, opts: &[String]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding own executable: {e}"))?;
    let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("-f");
    for o in opts {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(image).arg(mountpoint);
    cmd.env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::inherit());
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    drop(cmd);
    let mut line = String::new();
    let _ = BufReader::new(reader).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(());
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the daemon: {e}"))?;
    Err(format!("mount failed (daemon exited with {status})"))
}

/// Mount the FUSE filesystem ourselves so that /proc/mounts shows `fuse.SUBTYPE` with the image
/// as source (fuser's own mount path always says plain `fuse`). Returns the /dev/fuse descriptor
/// the session serves. Needs CAP_SYS_ADMIN; callers fall back to fuser's mount otherwise.
fn kernel_mount(
    fsname: &str,
    mountpoint: &Path,
    p: &options::ParsedOptions,
    readonly: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::mount::{mount, MsFlags};
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut flags = MsFlags::empty();
    for (on, f) in [
        (readonly, MsFlags::MS_RDONLY),
        (p.nodev, MsFlags::MS_NODEV),
        (p.nosuid, MsFlags::MS_NOSUID),
        (p.noexec, MsFlags::MS_NOEXEC),
        (p.noatime, MsFlags::MS_NOATIME),
        (p.sync, MsFlags::MS_SYNCHRONOUS),
        (p.dirsync, MsFlags::MS_DIRSYNC),
    ] {
        if on {
            flags |= f;
        }
    }
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if p.allow_other {
        data.push_str(",allow_other");
    }
    let fstype = if p.subtype.is_empty() {
        "fuse".to_string()
    } else {
        format!("fuse.{}", p.subtype)
    };
    mount(
        Some(fsname),
        mountpoint,
        Some(fstype.as_str()),
        flags,
        Some(data.as_str()),
    )
    .map_err(std::io::Error::from)?;
    Ok(dev.into())
}

/// glibc's allocator, tuned for the daemon's buffers: dirty data is held in sector buffers and
/// written back through 1 MiB run chunks, megabytes that are freed and allocated again at
/// every writeback. By default glibc hands such memory back to the kernel as soon as it is
/// free (heap trimming, and an mmap per chunk), and every new allocation then faults in and
/// zeroes fresh pages, which on a virtual machine costs more than the data copy itself
/// (measured: 64 MiB of fresh anonymous memory filled in ~130 ms, the same memory reused in
/// ~10 ms). Freed memory is kept for reuse up to TRIM_KEEP instead; the memory-pressure
/// monitor gives it back (`malloc_trim`) when the system or the cgroup is short of memory.
#[cfg(target_env = "gnu")]
fn tune_malloc() {
    const MMAP_ABOVE: libc::c_int = 4 << 20;
    const TRIM_KEEP: libc::c_int = 256 << 20;
    // SAFETY: mallopt only sets allocator parameters (no pointers); glibc takes the main
    // arena's lock inside, so threads allocating meanwhile are not disturbed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_ABOVE);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_KEEP);
    }
}

#[cfg(not(target_env = "gnu"))]
fn tune_malloc() {}

fn serve(
    fs: Arc<ubtrfs_fs::FsInfo>,
    image: &Path,
    mountpoint: &Path,
    p: &options::ParsedOptions,
) -> Result<(), String> {
    use fuser::MountOption as M;
    tune_malloc();
    let mut cfg = fuser::Config::default();
    let fsname = p.fsname.clone().unwrap_or_else(|| {
        std::fs::canonicalize(image)
            .unwrap_or_else(|_| image.to_path_buf())
            .display()
            .to_string()
    });
    cfg.mount_options.push(M::FSName(fsname.clone()));
    if !p.subtype.is_empty() {
        cfg.mount_options.push(M::Subtype(p.subtype.clone()));
    }
    let readonly = fs.is_readonly();
    cfg.mount_options.push(if readonly { M::RO } else { M::RW });
    cfg.mount_options.push(M::DefaultPermissions);
    // fuser defaults to nodev,nosuid; a kernel mount defaults to dev,suid.
    cfg.mount_options
        .push(if p.nodev { M::NoDev } else { M::Dev });
    cfg.mount_options
        .push(if p.nosuid { M::NoSuid } else { M::Suid });
    for (flag, opt) in [
        (p.noatime, M::NoAtime),
        (p.noexec, M::NoExec),
        (p.sync, M::Sync),
        (p.dirsync, M::DirSync),
    ] {
        if flag {
            cfg.mount_options.push(opt);
        }
    }
    if p.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    // One worker thread per CPU, at least two (one can serve requests while another waits
    // for a log sync or a commit). Every thread blocks in read() on the device, and the
    // kernel hands each request to the longest-waiting one, so threads beyond the CPUs only
    // add wake-ups and cold caches: creating 20000 files one after the other on 2 CPUs took
    // a third more CPU time (daemon and caller) with 4 threads than with 2.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    cfg.n_threads = Some(threads);
    cfg.clone_fd = true;
    // The extent-map budget (em_max=, em_max_bytes=): a scan runs whenever an insert leaves
    // the cache above it.
    fs.ems.set_budget(p.em_max, p.em_max_bytes);
    // The control socket is bound before the mount appears, so that `ubtrfs stats` works as
    // soon as the mount is visible. Without it the mount is still served.
    let daemon = match control::canonical_mountpoint(mountpoint) {
        Ok(mnt) => Some(Arc::new(stats::Daemon {
            fs: fs.clone(),
            mountpoint: mnt,
            image: std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf()),
            started: std::time::Instant::now(),
            budget_maps: p.em_max,
            budget_bytes: p.em_max_bytes,
            pressure: Arc::default(),
        })),
        Err(e) => {
            tracing::warn!("no control socket: {e}");
            None
        }
    };
    let control = daemon.as_ref().and_then(|d| {
        control::ControlServer::start(d.clone())
            .map_err(|e| tracing::warn!("no control socket (ubtrfs stats/shrink): {e}"))
            .inspect(|c| tracing::debug!("control socket {}", c.path().display()))
            .ok()
    });
    let fuse_fs = fuse::UbtrfsFuse::new(fs.clone()).with_atime(ubtrfs_fs::fileattr::AtimePolicy {
        noatime: p.noatime,
        strictatime: p.strictatime,
        nodiratime: p.nodiratime,
    });
    let notifier_slot = fuse_fs.notifier_slot();
    let session = match kernel_mount(&fsname, mountpoint, p, readonly) {
        Ok(fd) => fuser::Session::from_fd(fuse_fs, fd, cfg.acl, cfg),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            fuser::Session::new(fuse_fs, mountpoint, &cfg)
        }
        Err(e) => Err(e),
    }
    .map_err(|e| format!("mounting on {}: {e}", mountpoint.display()))?;
    let _ = notifier_slot.set(session.notifier());
    // kswapd's part: run the shrinker when the system or our cgroup reports memory pressure.
    let monitor = daemon.as_ref().and_then(|d| {
        pressure::PressureMonitor::start(fs.clone(), d.pressure.clone())
            .map_err(|e| tracing::warn!("no memory pressure monitor: {e}"))
            .ok()
    });
    if std::env::var_os(READY_ENV).is_some() {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    // The transaction kthread: write back and commit every `commit=` seconds.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = (!readonly).then(|| {
        let fs = fs.clone();
        let stop = stop.clone();
        let every = std::time::Duration::from_secs(p.fs.commit_interval);
        std::thread::Builder::new()
            .name("btrfs-transaction".into())
            .spawn(move || {
                let tick = std::time::Duration::from_millis(200);
                let mut waited = std::time::Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    waited += tick;
                    if waited >= every {
                        waited = std::time::Duration::ZERO;
                        if let Err(e) = fs.sync() {
                            tracing::error!("periodic commit failed: {e}");
                        }
                    }
                }
            })
            .expect("spawning the commit thread")
    });
    let r = session.run();
    if let Some(m) = monitor {
        m.shutdown();
    }
    if let Some(c) = control {
        c.shutdown();
    }
    drop(daemon);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(c) = committer {
        let _ = c.join();
    }
    // Commit whatever the last requests left (destroy already did unless the kernel skipped it).
    if !readonly {
        if let Err(e) = fs.sync() {
            tracing::error!("final commit failed: {e}");
        }
    }
    // The session ended (unmounted): drop the filesystem, which closes the image, before exiting.
    drop(fs);
    r.map_err(|e| format!("serving {}: {e}", mountpoint.display()))
}
