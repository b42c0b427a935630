//! A bounded walk over a (possibly damaged) mounted tree that touches everything: lstat every
//! entry, read every regular file to the end, readlink every symlink, list and read every
//! xattr. Errors are recorded (path, operation, errno) rather than stopping the walk.
//!
//! Bounds, so that a damaged image cannot make the walk itself endless: directory cycles are
//! cut by remembering (dev, ino) of directories on the current path, and entries, depth and
//! bytes read per file are capped.

use super::compare::{get_xattr, list_xattrs};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct WalkLimits {
    pub max_entries: usize,
    pub max_depth: usize,
    pub max_bytes_per_file: u64,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_entries: 200_000,
            max_depth: 100,
            max_bytes_per_file: 256 << 20,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct WalkReport {
    pub dirs: usize,
    pub files: usize,
    pub symlinks: usize,
    pub other: usize,
    pub bytes_read: u64,
    pub xattrs: usize,
    /// (path, operation, errno or -1).
    pub errors: Vec<(PathBuf, &'static str, i32)>,
    /// True when a limit cut the walk short.
    pub truncated: bool,
    /// Directory cycles seen (a directory that is its own ancestor).
    pub cycles: usize,
}

impl WalkReport {
    /// Errors counted by errno name, e.g. "EIO x3, ENOENT x1".
    pub fn error_summary(&self) -> String {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for (_, op, e) in &self.errors {
            *m.entry(format!("{op}:{}", super::errno_name(*e)))
                .or_default() += 1;
        }
        m.iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// True when any error came without an errno or with ENOTCONN/ECONNABORTED (the daemon
    /// went away).
    pub fn daemon_gone(&self) -> bool {
        self.errors
            .iter()
            .any(|(_, _, e)| *e == libc::ENOTCONN || *e == libc::ECONNABORTED)
    }
}

/// Walk everything below `root`.
pub fn walk_everything(root: &Path, limits: &WalkLimits) -> WalkReport {
    let mut r = WalkReport::default();
    let mut ancestors: Vec<(u64, u64)> = Vec::new();
    walk_dir(root, 0, &mut ancestors, limits, &mut r);
    r
}

fn err(r: &mut WalkReport, p: &Path, op: &'static str, e: &std::io::Error) {
    r.errors
        .push((p.to_path_buf(), op, e.raw_os_error().unwrap_or(-1)));
}

fn walk_xattrs(p: &Path, r: &mut WalkReport) {
    match list_xattrs(p) {
        Ok(names) => {
            for n in names {
                r.xattrs += 1;
                if let Err(e) = get_xattr(p, &n) {
                    // ENODATA can be a race-free "listed but unreadable" in damaged images.
                    err(r, p, "getxattr", &e);
                }
            }
        }
        Err(e) => err(r, p, "listxattr", &e),
    }
}

fn walk_dir(
    dir: &Path,
    depth: usize,
    ancestors: &mut Vec<(u64, u64)>,
    limits: &WalkLimits,
    r: &mut WalkReport,
) {
    let md = match fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) => {
            err(r, dir, "lstat", &e);
            return;
        }
    };
    let id = (md.dev(), md.ino());
    if ancestors.contains(&id) {
        r.cycles += 1;
        return;
    }
    if depth > limits.max_depth {
        r.truncated = true;
        return;
    }
    r.dirs += 1;
    walk_xattrs(dir, r);
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            err(r, dir, "opendir", &e);
            return;
        }
    };
    let mut names = Vec::new();
    for de in rd {
        match de {
            Ok(de) => names.push(de.file_name()),
            Err(e) => {
                err(r, dir, "readdir", &e);
                break;
            }
        }
        if names.len() > limits.max_entries {
            r.truncated = true;
            break;
        }
    }
    ancestors.push(id);
    for n in names {
        if r.dirs + r.files + r.symlinks + r.other > limits.max_entries {
            r.truncated = true;
            break;
        }
        let p = dir.join(&n);
        let md = match fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) => {
                err(r, &p, "lstat", &e);
                continue;
            }
        };
        let ft = md.file_type();
        if ft.is_dir() {
            walk_dir(&p, depth + 1, ancestors, limits, r);
        } else if ft.is_symlink() {
            r.symlinks += 1;
            if let Err(e) = fs::read_link(&p) {
                err(r, &p, "readlink", &e);
            }
            walk_xattrs(&p, r);
        } else if ft.is_file() {
            r.files += 1;
            read_file(&p, limits, r);
            walk_xattrs(&p, r);
        } else {
            r.other += 1;
            walk_xattrs(&p, r);
        }
    }
    ancestors.pop();
}

fn read_file(p: &Path, limits: &WalkLimits, r: &mut WalkReport) {
    let mut f = match fs::File::open(p) {
        Ok(f) => f,
        Err(e) => {
            err(r, p, "open", &e);
            return;
        }
    };
    let mut buf = vec![0u8; 1 << 17];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if total >= limits.max_bytes_per_file {
                    r.truncated = true;
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                err(r, p, "read", &e);
                break;
            }
        }
    }
    r.bytes_read += total;
}
