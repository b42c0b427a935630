//! A bounded library-level walk over a (possibly damaged) filesystem that touches everything the
//! read path serves: from the mount root, readdir every directory in batches (as FUSE does, with
//! DIR_INDEX cookies), look every name up again through DIR_ITEM, read the inode of every entry
//! and its back references, read every regular file to the end in 128 KiB chunks, readlink every
//! symlink, list and get every xattr, and statfs once.
//!
//! Errors are counted and kept (operation, where, message) rather than stopping the walk: on a
//! damaged image an `Err` is the right answer. What the walk must never see is a panic; the
//! callers run it under `catch_unwind` and a time limit.
//!
//! Bounds, so that a damaged image cannot make the walk itself endless: directory cycles are cut
//! by remembering (root, inode) of the directories on the current path, every directory is
//! listed at most once, and entries (so readdir batches too), depth and bytes read (per file
//! and in total) are capped.

use std::collections::HashSet;
use std::sync::Arc;
use ubtrfs_format::items::InodeItem;
use ubtrfs_fs::dir_item::{self, Target};
use ubtrfs_fs::inode::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use ubtrfs_fs::{file, inode, xattr, FsError, FsInfo};

/// Size of one file read, as a FUSE read of the default max_read.
pub const READ_CHUNK: u32 = 128 * 1024;

#[derive(Clone, Debug)]
pub struct WalkLimits {
    /// Inodes visited (directory entries followed), in total.
    pub max_entries: usize,
    /// Directory nesting below the mount root.
    pub max_depth: usize,
    /// Entries asked for per readdir call.
    pub readdir_batch: usize,
    /// Bytes read per regular file (a corrupt i_size can claim exabytes of holes).
    pub max_bytes_per_file: u64,
    /// Bytes read in total, so that the walk's time is bounded whatever the damage.
    pub max_total_bytes: u64,
    /// Xattrs read per inode.
    pub max_xattrs_per_inode: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_entries: 20_000,
            max_depth: 64,
            readdir_batch: 64,
            max_bytes_per_file: 8 << 20,
            max_total_bytes: 256 << 20,
            max_xattrs_per_inode: 256,
        }
    }
}

/// One error met by the walk.
#[derive(Clone, Debug)]
pub struct WalkError {
    pub op: &'static str,
    /// Where: "root R ino I" plus a name or offset where that helps.
    pub at: String,
    pub msg: String,
}

#[derive(Clone, Debug, Default)]
pub struct WalkReport {
    pub dirs: usize,
    pub files: usize,
    pub symlinks: usize,
    pub other: usize,
    pub entries: usize,
    pub bytes_read: u64,
    pub xattrs: usize,
    pub errors: Vec<WalkError>,
    /// A limit cut the walk short.
    pub truncated: bool,
    /// Directory cycles seen (a directory that is its own ancestor).
    pub cycles: usize,
    /// Content of every regular file read without error, by path (only when asked for).
    pub contents: Vec<(String, Vec<u8>)>,
    /// Symlink targets by path (only when contents are kept).
    pub links: Vec<(String, Vec<u8>)>,
    /// Xattrs by path (only when contents are kept).
    pub xattr_values: Vec<(String, Vec<u8>, Vec<u8>)>,
}

impl WalkReport {
    /// Errors counted by operation, e.g. "readdir x3, read x1".
    pub fn error_summary(&self) -> String {
        let mut m: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in &self.errors {
            *m.entry(e.op).or_default() += 1;
        }
        m.iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct Walker<'a> {
    fs: &'a FsInfo,
    limits: &'a WalkLimits,
    keep_contents: bool,
    report: WalkReport,
    /// (root, ino) of directories on the current path.
    ancestors: Vec<(u64, u64)>,
    /// (root, ino) of every directory listed so far.
    listed: HashSet<(u64, u64)>,
}

/// Walk everything reachable from the mount root of `fs`.
pub fn walk(fs: &Arc<FsInfo>, limits: &WalkLimits) -> WalkReport {
    walk_impl(fs, limits, false)
}

/// [`walk`], also keeping file contents, symlink targets and xattr values (for checking the
/// walk against the source tree of an undamaged image).
pub fn walk_keep_contents(fs: &Arc<FsInfo>, limits: &WalkLimits) -> WalkReport {
    walk_impl(fs, limits, true)
}

fn walk_impl(fs: &Arc<FsInfo>, limits: &WalkLimits, keep_contents: bool) -> WalkReport {
    let mut w = Walker {
        fs,
        limits,
        keep_contents,
        report: WalkReport::default(),
        ancestors: Vec::new(),
        listed: HashSet::new(),
    };
    // statfs only reads figures computed at open, but it does arithmetic on them.
    let _ = fs.statfs();
    let root = fs.mount_root;
    match fs.root(root) {
        Ok(r) => {
            let dirid = r.item.root_dirid;
            w.visit(root, dirid, String::new(), 0);
        }
        Err(e) => w.err("root", format!("root {root}"), e),
    }
    w.report
}

impl Walker<'_> {
    fn err(&mut self, op: &'static str, at: String, e: FsError) {
        self.report.errors.push(WalkError {
            op,
            at,
            msg: e.to_string(),
        });
    }

    /// Visit inode `ino` of subvolume `root`, reached by `path`.
    fn visit(&mut self, root: u64, ino: u64, path: String, depth: usize) {
        if self.report.entries >= self.limits.max_entries {
            self.report.truncated = true;
            return;
        }
        self.report.entries += 1;
        let at = format!("root {root} ino {ino} ({path:?})");
        let ii = match inode::read_inode(self.fs, root, ino) {
            Ok(ii) => ii,
            Err(e) => return self.err("read_inode", at, e),
        };
        if let Err(e) = inode::inode_refs(self.fs, root, ino) {
            self.err("inode_refs", at.clone(), e);
        }
        self.xattrs(root, ino, &path, &at);
        match ii.mode & S_IFMT {
            S_IFDIR => {
                self.report.dirs += 1;
                self.dir(root, ino, &path, depth, &at);
            }
            S_IFREG => {
                self.report.files += 1;
                self.file(root, ino, &ii, &path, &at);
            }
            S_IFLNK => {
                self.report.symlinks += 1;
                match file::readlink(self.fs, root, ino, &ii) {
                    Ok(t) => {
                        if self.keep_contents {
                            self.report.links.push((path, t));
                        }
                    }
                    Err(e) => self.err("readlink", at, e),
                }
            }
            _ => self.report.other += 1,
        }
    }

    fn xattrs(&mut self, root: u64, ino: u64, path: &str, at: &str) {
        let names = match xattr::list(self.fs, root, ino) {
            Ok(n) => n,
            Err(e) => return self.err("listxattr", at.to_string(), e),
        };
        for name in names.into_iter().take(self.limits.max_xattrs_per_inode) {
            self.report.xattrs += 1;
            match xattr::get(self.fs, root, ino, &name) {
                Ok(v) => {
                    if self.keep_contents {
                        self.report.xattr_values.push((path.to_string(), name, v));
                    }
                }
                Err(e) => self.err("getxattr", at.to_string(), e),
            }
        }
    }

    fn file(&mut self, root: u64, ino: u64, ii: &InodeItem, path: &str, at: &str) {
        let emi = self.fs.ems.inode(root, ino);
        let budget = self
            .limits
            .max_total_bytes
            .saturating_sub(self.report.bytes_read);
        if budget < ii.size.min(self.limits.max_bytes_per_file) {
            self.report.truncated = true;
        }
        let end = ii.size.min(self.limits.max_bytes_per_file).min(budget);
        let mut content = Vec::new();
        let mut off = 0u64;
        while off < end {
            match file::read(self.fs, root, ino, ii, &emi, off, READ_CHUNK) {
                Ok(data) => {
                    if data.is_empty() {
                        break;
                    }
                    off += data.len() as u64;
                    self.report.bytes_read += data.len() as u64;
                    if self.keep_contents {
                        content.extend_from_slice(&data);
                    }
                }
                Err(e) => {
                    self.err("read", format!("{at} off {off}"), e);
                    break;
                }
            }
        }
        if self.keep_contents && off >= end {
            self.report.contents.push((path.to_string(), content));
        }
        // Reads that do not start where an extent starts, as FUSE sends them for random access:
        // the middle and the last byte (within the VFS limit of i64::MAX), and 4 KiB reads
        // straddling a sector boundary.
        let limit = ii.size.min(i64::MAX as u64 - u64::from(READ_CHUNK));
        for probe in [
            limit / 2,
            limit.saturating_sub(1),
            4096 + 100,
            limit / 3 * 2,
        ] {
            if probe >= ii.size {
                continue;
            }
            if let Err(e) = file::read(self.fs, root, ino, ii, &emi, probe, 4096) {
                self.err("read", format!("{at} off {probe}"), e);
            }
        }
    }

    fn dir(&mut self, root: u64, dir: u64, path: &str, depth: usize, at: &str) {
        if self.ancestors.contains(&(root, dir)) {
            self.report.cycles += 1;
            return;
        }
        if !self.listed.insert((root, dir)) {
            // Listed already through another entry (a damaged image can link a directory twice).
            return;
        }
        if depth >= self.limits.max_depth {
            self.report.truncated = true;
            return;
        }
        self.ancestors.push((root, dir));
        let mut start = 0u64;
        'batches: loop {
            if self.report.entries >= self.limits.max_entries {
                self.report.truncated = true;
                break;
            }
            let batch =
                match dir_item::readdir(self.fs, root, dir, start, self.limits.readdir_batch) {
                    Ok(b) => b,
                    Err(e) => {
                        self.err("readdir", format!("{at} index {start}"), e);
                        break;
                    }
                };
            if batch.is_empty() {
                break;
            }
            for ent in batch {
                if ent.index < start {
                    // Cookies must move forward; a damaged tree could make them repeat.
                    self.err(
                        "readdir",
                        format!("{at} index {start}"),
                        FsError::corrupt(format!("entry index {} went backwards", ent.index)),
                    );
                    break 'batches;
                }
                let name = String::from_utf8_lossy(&ent.name).into_owned();
                let child_path = format!("{path}/{name}");
                match dir_item::lookup(self.fs, root, dir, &ent.name) {
                    Ok(t) if t != ent.target => self.err(
                        "lookup",
                        format!("{at} name {name:?}"),
                        FsError::corrupt(format!(
                            "DIR_ITEM leads to {t:?}, DIR_INDEX to {:?}",
                            ent.target
                        )),
                    ),
                    Ok(_) => {}
                    Err(e) => self.err("lookup", format!("{at} name {name:?}"), e),
                }
                match ent.target {
                    Target::Inode { root: r, ino } => self.visit(r, ino, child_path, depth + 1),
                    Target::EmptySubvolPlaceholder { root: r } => {
                        self.visit(r, inode::EMPTY_SUBVOL_DIR_OBJECTID, child_path, depth + 1)
                    }
                }
                match ent.index.checked_add(1) {
                    Some(n) => start = n,
                    None => break 'batches,
                }
            }
        }
        self.ancestors.pop();
    }
}
