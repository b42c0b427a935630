//! The control channel between a running daemon and `ubtrfs stats` / `ubtrfs shrink`.
//!
//! # Why a Unix socket
//! Three channels were possible; the socket is the only one that keeps the FUSE adapter out of
//! it:
//! - a virtual xattr (`getfattr -n ubtrfs.stats MNT`) or an ioctl would go through `fuse.rs`
//!   and the kernel's FUSE request queue: when the FUSE workers are stuck (the very moment one
//!   wants the counters) the request queues behind them; an ioctl also needs `unsafe` on the
//!   client side and FUSE restricts ioctls on non-CUSE mounts; and a long-running request such
//!   as `shrink --loop` would hold a FUSE worker.
//! - a Unix stream socket per mount is served by a thread of its own, answers while every FUSE
//!   worker is blocked, carries streams (`--watch`, `--loop`) naturally and lets the daemon
//!   check who asks (`SO_PEERCRED`): anyone may read counters, only root or the daemon's user
//!   may run the shrinker.
//!
//! # Naming
//! One socket per mount, in the run directory ([`run_dirs`]: `/run/ubtrfs` for root,
//! `$XDG_RUNTIME_DIR/ubtrfs` or `/tmp/ubtrfs-UID` otherwise, `$UBTRFS_RUN_DIR` overrides),
//! named after the canonical mount point: `LAST-COMPONENT-FNV64.sock` (the hash keeps any path
//! within `sun_path`'s 108 bytes; the readable prefix is for `ls`). The daemon binds it before
//! mounting, so it exists by the time the mount shows in /proc/self/mountinfo, and removes it
//! at unmount only if it is still its own (a daemon mounted over the same path since then owns
//! the name). A client first checks /proc/self/mountinfo (no mount there, or not a FUSE mount:
//! one clear line), then says `hello` and checks that the daemon serves the same mount point.
//!
//! # Protocol
//! Newline-delimited JSON, one request and one reply per line ([`Request`], [`Response`]),
//! versioned by [`PROTOCOL`]. A connection may carry any number of requests (the client of
//! `--watch` and `--loop` keeps one open). Bounds: [`MAX_CONNECTIONS`] concurrent connections,
//! [`MAX_REQUEST_BYTES`] per request line.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::stats::{Daemon, ShrinkReport, Snapshot};

/// Version of the request/reply format; a client refuses a daemon that speaks another.
pub const PROTOCOL: u32 = 1;
/// Concurrent control connections a daemon serves; more are refused with an error reply.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: u64 = 4096;

/// A request from `ubtrfs stats` / `ubtrfs shrink`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Who are you (protocol, mount point, pid)?
    Hello,
    /// All counters ([`Snapshot`]).
    Stats,
    /// Run the extent-map shrinker now over `nr` maps (default: every cached map).
    Shrink { nr: Option<u64> },
}

/// The daemon's answer to one [`Request`].
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        mountpoint: String,
        image: String,
        pid: u32,
        /// The subvolume options the daemon was mounted with ([`subvol_key`]).
        #[serde(default)]
        subvol: String,
    },
    Stats(Box<Snapshot>),
    Shrink(ShrinkReport),
    Error {
        message: String,
    },
}

/// Directories a socket may live in, in the order a client looks.
pub fn run_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("UBTRFS_RUN_DIR") {
        return vec![PathBuf::from(d)];
    }
    let uid = nix::unistd::geteuid();
    let mut v = vec![PathBuf::from("/run/ubtrfs")];
    if !uid.is_root() {
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
            v.push(PathBuf::from(x).join("ubtrfs"));
        }
        v.push(PathBuf::from(format!("/tmp/ubtrfs-{uid}")));
    }
    v
}

/// The directory the daemon binds in: the first of [`run_dirs`] it can create and write.
fn bind_dir() -> Result<PathBuf, String> {
    let mut why = Vec::new();
    for d in run_dirs() {
        match std::fs::create_dir_all(&d) {
            Ok(()) => {
                // Readable by all (anyone may read counters); the socket itself says who may
                // do what.
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
                if nix::unistd::access(&d, nix::unistd::AccessFlags::W_OK).is_ok() {
                    return Ok(d);
                }
                why.push(format!("{}: not writable", d.display()));
            }
            Err(e) => why.push(format!("{}: {e}", d.display())),
        }
    }
    Err(why.join("; "))
}

/// FNV-1a 64 of the canonical mount point (a name, not a secret: `hello` checks identity).
fn fnv64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The socket file name for a canonical mount point.
pub fn socket_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let last: String = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    format!(
        "{last}-{:016x}.sock",
        fnv64(mountpoint.as_os_str().as_bytes())
    )
}

/// The mount point as both sides name it: the canonical path (the form /proc/self/mountinfo
/// shows).
pub fn canonical_mountpoint(p: &Path) -> Result<PathBuf, String> {
    std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Daemon side

/// The daemon's control socket: a listener thread and one thread per connection.
pub struct ControlServer {
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file we bound: removed at shutdown only if still ours.
    ident: (u64, u64),
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
    conns: Conns,
}

impl ControlServer {
    /// Bind the socket for `daemon.mountpoint` (canonical) and start serving.
    pub fn start(daemon: Arc<Daemon>) -> Result<ControlServer, String> {
        let dir = bind_dir()?;
        let path = dir.join(socket_name(&daemon.mountpoint));
        if path.exists() {
            // A live daemon answering here serves a mount at the same path that we are about
            // to cover; a dead one left its file behind. Either way the name is ours now.
            if UnixStream::connect(&path).is_ok() {
                tracing::warn!(
                    "{}: replacing the control socket of another ubtrfs daemon for {}",
                    path.display(),
                    daemon.mountpoint.display()
                );
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener =
            UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
        let md = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let t = {
            let stop = stop.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name("ubtrfs-control".into())
                .spawn(move || accept_loop(listener, daemon, stop, conns))
                .map_err(|e| format!("starting the control thread: {e}"))?
        };
        Ok(ControlServer {
            path,
            ident: (md.dev(), md.ino()),
            stop,
            listener: Some(t),
            conns,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop serving: wake the listener, close every connection, join every thread, remove the
    /// socket file if it is still ours.
    pub fn shutdown(mut self) {
        self.do_shutdown();
    }

    fn do_shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.listener.take() {
            // accept() has no timeout: a connection of our own wakes it up.
            let _ = UnixStream::connect(&self.path);
            let _ = t.join();
        }
        let conns: Vec<_> = self.conns.lock().drain().collect();
        for (_, (s, _)) in &conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for (_, (_, t)) in conns {
            if let Some(t) = t {
                let _ = t.join();
            }
        }
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.do_shutdown();
    }
}

/// Open connections: a handle to shut each down, and its thread once started.
type Conns = Arc<parking_lot::Mutex<HashMap<u64, (UnixStream, Option<JoinHandle<()>>)>>>;

fn accept_loop(listener: UnixListener, daemon: Arc<Daemon>, stop: Arc<AtomicBool>, conns: Conns) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        // Reap finished connection threads before counting.
        {
            let mut c = conns.lock();
            let done: Vec<u64> = c
                .iter()
                .filter(|(_, (_, t))| t.as_ref().is_some_and(|t| t.is_finished()))
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                if let Some((_, Some(t))) = c.remove(&id) {
                    let _ = t.join();
                }
            }
            if c.len() >= MAX_CONNECTIONS {
                drop(c);
                let _ = send(
                    &mut stream,
                    &Response::Error {
                        message: format!(
                            "too many control connections (at most {MAX_CONNECTIONS})"
                        ),
                    },
                );
                continue;
            }
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // Registered before the thread starts, so that shutdown always finds the stream.
        conns.lock().insert(id, (clone, None));
        let d = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("ubtrfs-control-conn".into())
            .spawn(move || serve_connection(stream, &d));
        match spawned {
            Ok(t) => {
                if let Some(e) = conns.lock().get_mut(&id) {
                    e.1 = Some(t);
                }
            }
            Err(e) => {
                tracing::warn!("control socket: starting a connection thread: {e}");
                conns.lock().remove(&id);
            }
        }
    }
}

fn send(stream: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// May this peer change the daemon's state (run the shrinker)? Root or the daemon's own user.
fn peer_may_act(stream: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "permission denied: only root or uid {me} may run the shrinker of this mount"
        ))
    }
}

fn serve_connection(stream: UnixStream, daemon: &Daemon) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_REQUEST_BYTES).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = send(
                &mut out,
                &Response::Error {
                    message: format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                },
            );
            return;
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Hello) => Response::Hello {
                protocol: PROTOCOL,
                mountpoint: daemon.mountpoint.display().to_string(),
                image: daemon.image.display().to_string(),
                pid: std::process::id(),
                subvol: subvol_key(&daemon.fs.options),
            },
            Ok(Request::Stats) => Response::Stats(Box::new(daemon.snapshot())),
            Ok(Request::Shrink { nr }) => match peer_may_act(&out) {
                Ok(()) => Response::Shrink(daemon.shrink(nr)),
                Err(message) => Response::Error { message },
            },
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        if send(&mut out, &reply).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// A mount as /proc/self/mountinfo shows it.
#[derive(Clone, Debug)]
pub struct MountEntry {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
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

/// The topmost mount at exactly `target` (canonical), from /proc/self/mountinfo.
pub fn mount_at(target: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 2 {
                return None;
            }
            Some(MountEntry {
                target: PathBuf::from(unescape_mountinfo(pre[4])),
                fstype: post[0].to_string(),
                source: unescape_mountinfo(post[1]),
            })
        })
        .rfind(|m| m.target == target)
}

/// A connection to the daemon serving one mount point.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub mountpoint: PathBuf,
    pub pid: u32,
    /// The image the daemon serves (canonical) and its subvolume options ([`subvol_key`]).
    pub image: PathBuf,
    pub subvol: String,
}

/// What a mount's subvolume options say, comparable between two mounts of one image.
pub fn subvol_key(o: &ubtrfs_fs::MountOptions) -> String {
    format!(
        "subvol={} subvolid={}",
        o.subvol.as_deref().unwrap_or(""),
        o.subvolid.map(|i| i.to_string()).unwrap_or_default()
    )
}

/// Every FUSE mount (target, source) in /proc/self/mountinfo.
pub fn fuse_mounts() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 2 {
                return None;
            }
            Some(MountEntry {
                target: PathBuf::from(unescape_mountinfo(pre[4])),
                fstype: post[0].to_string(),
                source: unescape_mountinfo(post[1]),
            })
        })
        .filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
        .collect()
}

impl Client {
    /// Connect to the daemon of `mountpoint`. Every failure is one line that says what the
    /// path is instead (no such path, not a mount point, not a FUSE mount, no daemon answers).
    pub fn connect(mountpoint: &Path) -> Result<Client, String> {
        let canon = canonical_mountpoint(mountpoint)?;
        let shown = mountpoint.display();
        let Some(m) = mount_at(&canon) else {
            return Err(format!("{shown}: not a mount point"));
        };
        if m.fstype != "fuse" && !m.fstype.starts_with("fuse.") {
            return Err(format!(
                "{shown}: not a ubtrfs mount ({} from {})",
                m.fstype, m.source
            ));
        }
        let name = socket_name(&canon);
        let mut last_err = None;
        for dir in run_dirs() {
            let path = dir.join(&name);
            match UnixStream::connect(&path) {
                Ok(s) => return Self::hello(s, &canon, shown),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => last_err = Some(format!("{}: {e}", path.display())),
            }
        }
        Err(match last_err {
            Some(e) => format!(
                "{shown}: not served by a live ubtrfs daemon ({} from {}; control socket {e})",
                m.fstype, m.source
            ),
            None => format!(
                "{shown}: not a ubtrfs mount ({} from {}; no ubtrfs control socket for it)",
                m.fstype, m.source
            ),
        })
    }

    fn hello(s: UnixStream, canon: &Path, shown: std::path::Display<'_>) -> Result<Client, String> {
        let writer = s
            .try_clone()
            .map_err(|e| format!("{shown}: control socket: {e}"))?;
        let mut c = Client {
            reader: BufReader::new(s),
            writer,
            mountpoint: canon.to_path_buf(),
            pid: 0,
            image: PathBuf::new(),
            subvol: String::new(),
        };
        match c.request(&Request::Hello)? {
            Response::Hello {
                protocol,
                mountpoint,
                pid,
                image,
                subvol,
            } => {
                if protocol != PROTOCOL {
                    return Err(format!(
                        "{shown}: the daemon speaks control protocol {protocol}, this ubtrfs \
                         speaks {PROTOCOL} (mixed versions)"
                    ));
                }
                if Path::new(&mountpoint) != canon {
                    return Err(format!(
                        "{shown}: the control socket belongs to the ubtrfs daemon of \
                         {mountpoint} (pid {pid}), not of this mount"
                    ));
                }
                c.pid = pid;
                c.image = PathBuf::from(image);
                c.subvol = subvol;
                Ok(c)
            }
            other => Err(format!("{shown}: unexpected hello reply {other:?}")),
        }
    }

    /// One request, one reply. A daemon error becomes `Err`.
    pub fn request(&mut self, r: &Request) -> Result<Response, String> {
        let who = self.mountpoint.display();
        let mut line = serde_json::to_string(r).map_err(|e| e.to_string())?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("{who}: sending to the daemon: {e}"))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .map_err(|e| format!("{who}: reading the daemon's reply: {e}"))?;
        if n == 0 {
            return Err(format!(
                "{who}: the daemon closed the control connection (unmounted?)"
            ));
        }
        match serde_json::from_str::<Response>(reply.trim()) {
            Ok(Response::Error { message }) => Err(format!("{who}: {message}")),
            Ok(r) => Ok(r),
            Err(e) => Err(format!("{who}: unreadable reply from the daemon: {e}")),
        }
    }

    pub fn stats(&mut self) -> Result<Snapshot, String> {
        match self.request(&Request::Stats)? {
            Response::Stats(s) => Ok(*s),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    pub fn shrink(&mut self, nr: Option<u64>) -> Result<ShrinkReport, String> {
        match self.request(&Request::Shrink { nr })? {
            Response::Shrink(s) => Ok(s),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: socket names are stable, distinct for distinct mount points, fit sun_path
    // for any path length, and keep a readable hint of the mount point.
    #[test]
    fn socket_names() {
        let a = socket_name(Path::new("/tmp/x/mnt"));
        assert_eq!(a, socket_name(Path::new("/tmp/x/mnt")));
        assert_ne!(a, socket_name(Path::new("/tmp/y/mnt")));
        assert!(a.starts_with("mnt-") && a.ends_with(".sock"), "{a}");
        let long = format!("/{}", "d/".repeat(200));
        let n = socket_name(Path::new(&long));
        assert!(
            Path::new("/run/ubtrfs").join(&n).as_os_str().len() < 108,
            "{n}"
        );
        assert!(socket_name(Path::new("/")).starts_with("root-"));
    }

    // Test scenario: requests and replies keep their wire form (what another version of the
    // client would send).
    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Shrink { nr: Some(5) }).unwrap(),
            r#"{"cmd":"shrink","nr":5}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"stats"}"#).unwrap(),
            Request::Stats
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format"}"#).is_err());
        let e = serde_json::to_string(&Response::Error {
            message: "x".into(),
        })
        .unwrap();
        assert_eq!(e, r#"{"reply":"error","message":"x"}"#);
    }

    // Test scenario: mountinfo escapes (space, tab, backslash) are undone.
    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"/plain\04"), r"/plain\04");
    }
}
