//! Scenarios are data: files (size, NODATACOW, file extent items and whether their maps are
//! cached or on the modified list), the actors and how many operations each does.
//!
//! # File format (`*.race`)
//! One statement per line; `#` starts a comment; sizes take K, M, G suffixes; a range is
//! `START+LEN`.
//!
//! ```text
//! scenario NAME
//! description TEXT...                     (repeatable, joined with spaces)
//! nosec                                   (direct writes within i_size take the inode lock SHARED)
//! file INO size=SIZE [nodatacow]
//! extent INO START+LEN reg|prealloc new|old [cached]
//!     new: written (or fallocated) in the running transaction, completed, not yet fsynced:
//!          its map is in the tree and on the modified list;
//!     old: committed earlier; its map is in the tree only with `cached`.
//! actor KIND [INO] [ops=RANGE[:ioerr],...] [runs=N] [nr=N] [dsync] [keep-size] [per-leaf=N]
//! ```
//!
//! Actor kinds (the kernel function each one models is in [`ActorKind`]'s docs): `fsync`,
//! `dio-write`, `buffered-write`, `writeback`, `ordered`, `fallocate`, `punch-hole`,
//! `release-folio`, `evict`, `relocation`, `reader`, `shrinker`.
//!
//! The same can be built in Rust with [`Scenario::new`], [`Scenario::file`],
//! [`Scenario::extent`] and [`Scenario::actor`], or parsed with [`Scenario::parse`].

use std::fmt;

use crate::world::PAGE;

/// The kernel code path an actor follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActorKind {
    /// `btrfs_sync_file` of a regular file (inode lock + mmap lock exclusive), fast path
    /// through `btrfs_log_changed_extents` or the full-sync path. `runs` fsyncs.
    Fsync,
    /// `btrfs_direct_write` within i_size: inode lock EXCLUSIVE (stock) or SHARED (`nosec`);
    /// `btrfs_dio_iomap_begin` (io range lock, `btrfs_get_extent`, `btrfs_create_io_em` through
    /// replace-range for COW and NOCOW-into-prealloc, no map for a NOCOW overwrite); the bio;
    /// with `dsync`, the O_DSYNC fsync from inside the write (mmap lock only).
    DioWrite,
    /// `btrfs_buffered_write`: inode lock exclusive, pages dirtied (delalloc), no map.
    BufferedWrite,
    /// The flusher: `extent_writepages` -> `run_delalloc_range` (`cow_file_range` /
    /// `run_delalloc_nocow`): maps created without the inode lock. `runs` passes.
    Writeback,
    /// `endio_write_workers`: `btrfs_finish_one_ordered` (unpin; the error path drops the
    /// range).
    Ordered,
    /// `btrfs_fallocate`: inode + mmap lock, prealloc items and PREALLOC maps on the modified
    /// list.
    Fallocate,
    /// `btrfs_punch_hole`: inode + mmap lock, `btrfs_drop_extents` and a hole map.
    PunchHole,
    /// `btrfs_release_folio` -> `try_release_extent_mapping`, folio by folio, no inode lock.
    ReleaseFolio,
    /// `btrfs_evict_inode`: once nobody uses the inode, drop every map.
    Evict,
    /// Relocation's `invalidate_extent_cache`: drops ranges (leaf by leaf of file extent
    /// items) with skip_pinned, under the io range lock only. `runs` passes.
    Relocation,
    /// `btrfs_read_folio` -> `btrfs_get_extent` -> `btrfs_add_extent_mapping`, under the io
    /// range lock only.
    Reader,
    /// The extent-map shrinker work item (`btrfs_free_extent_maps`): `runs` scans of `nr`.
    Shrinker,
}

impl ActorKind {
    /// All kinds.
    pub const ALL: [ActorKind; 12] = [
        ActorKind::Fsync,
        ActorKind::DioWrite,
        ActorKind::BufferedWrite,
        ActorKind::Writeback,
        ActorKind::Ordered,
        ActorKind::Fallocate,
        ActorKind::PunchHole,
        ActorKind::ReleaseFolio,
        ActorKind::Evict,
        ActorKind::Relocation,
        ActorKind::Reader,
        ActorKind::Shrinker,
    ];

    /// Keyword in the scenario format.
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::Fsync => "fsync",
            ActorKind::DioWrite => "dio-write",
            ActorKind::BufferedWrite => "buffered-write",
            ActorKind::Writeback => "writeback",
            ActorKind::Ordered => "ordered",
            ActorKind::Fallocate => "fallocate",
            ActorKind::PunchHole => "punch-hole",
            ActorKind::ReleaseFolio => "release-folio",
            ActorKind::Evict => "evict",
            ActorKind::Relocation => "relocation",
            ActorKind::Reader => "reader",
            ActorKind::Shrinker => "shrinker",
        }
    }

    /// Needs an inode.
    pub fn needs_ino(self) -> bool {
        !matches!(self, ActorKind::Ordered | ActorKind::Shrinker)
    }

    /// Needs `ops`.
    pub fn needs_ops(self) -> bool {
        matches!(
            self,
            ActorKind::DioWrite
                | ActorKind::BufferedWrite
                | ActorKind::Fallocate
                | ActorKind::PunchHole
                | ActorKind::ReleaseFolio
                | ActorKind::Reader
        )
    }

    /// May create ordered extents (directly or by flushing dirty pages).
    pub fn produces_ordered(self) -> bool {
        matches!(
            self,
            ActorKind::Fsync
                | ActorKind::DioWrite
                | ActorKind::Writeback
                | ActorKind::Fallocate
                | ActorKind::PunchHole
                | ActorKind::BufferedWrite
                | ActorKind::Evict
        )
    }
}

/// One operation: a byte range, and whether its IO fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// Start (page aligned).
    pub start: u64,
    /// Length (page aligned).
    pub len: u64,
    /// The write's IO fails (BTRFS_ORDERED_IOERR).
    pub ioerr: bool,
}

impl Op {
    /// `[start, start+len)`.
    pub fn new(start: u64, len: u64) -> Self {
        Op {
            start,
            len,
            ioerr: false,
        }
    }

    /// The same with an IO error.
    pub fn ioerr(mut self) -> Self {
        self.ioerr = true;
        self
    }

    /// Exclusive end.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// An actor of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorSpec {
    /// Code path.
    pub kind: ActorKind,
    /// Inode it works on.
    pub ino: Option<u64>,
    /// Operations (ranges).
    pub ops: Vec<Op>,
    /// Repetitions (fsync, writeback, relocation, shrinker).
    pub runs: u32,
    /// Shrinker: maps to scan per run.
    pub nr: u64,
    /// Direct write with O_DSYNC.
    pub dsync: bool,
    /// fallocate with FALLOC_FL_KEEP_SIZE.
    pub keep_size: bool,
    /// Relocation: file extent items per leaf.
    pub per_leaf: usize,
}

impl ActorSpec {
    /// An actor of `kind` with defaults (1 run, shrinker scans 1024 maps, 1 item per leaf).
    pub fn new(kind: ActorKind) -> Self {
        ActorSpec {
            kind,
            ino: None,
            ops: Vec::new(),
            runs: 1,
            nr: 1024,
            dsync: false,
            keep_size: false,
            per_leaf: 1,
        }
    }

    /// On inode `ino`.
    pub fn ino(mut self, ino: u64) -> Self {
        self.ino = Some(ino);
        self
    }

    /// Adds an operation.
    pub fn op(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }

    /// Sets `runs`.
    pub fn runs(mut self, n: u32) -> Self {
        self.runs = n;
        self
    }

    /// O_DSYNC.
    pub fn dsync(mut self) -> Self {
        self.dsync = true;
        self
    }
}

/// Kind of an initial file extent item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Regular extent.
    Reg,
    /// Preallocated extent.
    Prealloc,
}

/// An initial file extent item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentSpec {
    /// Inode.
    pub ino: u64,
    /// Start.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// REG or PREALLOC.
    pub kind: ExtentKind,
    /// Written in the running transaction and not fsynced yet: map listed.
    pub new: bool,
    /// Map cached in the tree (always true for `new`).
    pub cached: bool,
}

/// An initial file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSpec {
    /// Inode number.
    pub ino: u64,
    /// i_size.
    pub size: u64,
    /// NODATACOW (and NODATASUM).
    pub nodatacow: bool,
}

/// A scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Name.
    pub name: String,
    /// What it sets up and why.
    pub description: String,
    /// Direct writes within i_size take the inode lock shared by default.
    pub nosec: bool,
    /// Files.
    pub files: Vec<FileSpec>,
    /// Initial file extent items.
    pub extents: Vec<ExtentSpec>,
    /// Actors.
    pub actors: Vec<ActorSpec>,
}

/// A scenario text that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for ParseError {}

/// Parses `64K`, `1M`, `4096`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('+')?;
    Some((parse_size(a)?, parse_size(b)?))
}

fn aligned(v: u64) -> bool {
    v & (PAGE - 1) == 0
}

impl Scenario {
    /// An empty scenario.
    pub fn new(name: &str, description: &str) -> Self {
        Scenario {
            name: name.into(),
            description: description.into(),
            nosec: false,
            files: Vec::new(),
            extents: Vec::new(),
            actors: Vec::new(),
        }
    }

    /// Adds a file.
    pub fn file(mut self, ino: u64, size: u64, nodatacow: bool) -> Self {
        self.files.push(FileSpec {
            ino,
            size,
            nodatacow,
        });
        self
    }

    /// Adds an initial file extent item.
    pub fn extent(mut self, ino: u64, start: u64, len: u64, kind: ExtentKind, new: bool) -> Self {
        self.extents.push(ExtentSpec {
            ino,
            start,
            len,
            kind,
            new,
            cached: true,
        });
        self
    }

    /// Adds an actor.
    pub fn actor(mut self, a: ActorSpec) -> Self {
        self.actors.push(a);
        self
    }

    /// Actor display names: the kind, numbered when a kind appears more than once.
    pub fn actor_names(&self) -> Vec<String> {
        let mut seen = std::collections::HashMap::new();
        let counts = self
            .actors
            .iter()
            .fold(std::collections::HashMap::new(), |mut m, a| {
                *m.entry(a.kind).or_insert(0) += 1;
                m
            });
        self.actors
            .iter()
            .map(|a| {
                let k = seen.entry(a.kind).or_insert(0);
                *k += 1;
                if counts[&a.kind] > 1 {
                    format!("{}#{}", a.kind.name(), k)
                } else {
                    a.kind.name().to_string()
                }
            })
            .collect()
    }

    /// Checks the scenario for mistakes that would make runs meaningless.
    pub fn validate(&self) -> Result<(), String> {
        for f in &self.files {
            if self.files.iter().filter(|g| g.ino == f.ino).count() > 1 {
                return Err(format!("inode {} declared twice", f.ino));
            }
        }
        let has = |ino: u64| self.files.iter().any(|f| f.ino == ino);
        for e in &self.extents {
            if !has(e.ino) {
                return Err(format!("extent of undeclared inode {}", e.ino));
            }
            if !aligned(e.start) || !aligned(e.len) || e.len == 0 {
                return Err(format!("extent {}+{} not page aligned", e.start, e.len));
            }
            for o in &self.extents {
                if !std::ptr::eq(o, e)
                    && o.ino == e.ino
                    && o.start < e.start + e.len
                    && e.start < o.start + o.len
                {
                    return Err(format!("extents overlap at {} of inode {}", e.start, e.ino));
                }
            }
        }
        for a in &self.actors {
            match a.ino {
                Some(i) if !has(i) => {
                    return Err(format!("{} on undeclared inode {i}", a.kind.name()))
                }
                None if a.kind.needs_ino() => {
                    return Err(format!("{} needs an inode", a.kind.name()))
                }
                _ => {}
            }
            if a.kind.needs_ops() && a.ops.is_empty() {
                return Err(format!("{} needs ops=", a.kind.name()));
            }
            for o in &a.ops {
                if !aligned(o.start) || !aligned(o.len) || o.len == 0 {
                    return Err(format!("op {}+{} not page aligned", o.start, o.len));
                }
            }
            if a.per_leaf == 0 {
                return Err("per-leaf must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Parses the text format (see the module docs).
    pub fn parse(text: &str) -> Result<Scenario, ParseError> {
        let mut sc = Scenario::new("", "");
        let mut desc: Vec<String> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let err = |msg: String| ParseError { line, msg };
            let l = raw.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            let mut words = l.split_whitespace();
            let kw = words.next().unwrap_or("");
            let rest: Vec<&str> = words.collect();
            match kw {
                "scenario" => {
                    sc.name = rest
                        .first()
                        .ok_or_else(|| err("scenario needs a name".into()))?
                        .to_string()
                }
                "description" => desc.push(rest.join(" ")),
                "nosec" => sc.nosec = true,
                "file" => {
                    let ino = rest
                        .first()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| err("file needs an inode number".into()))?;
                    let mut f = FileSpec {
                        ino,
                        size: 0,
                        nodatacow: false,
                    };
                    for w in &rest[1..] {
                        match w.split_once('=') {
                            Some(("size", v)) => {
                                f.size =
                                    parse_size(v).ok_or_else(|| err(format!("bad size {v}")))?
                            }
                            None if *w == "nodatacow" => f.nodatacow = true,
                            _ => return Err(err(format!("unknown file attribute {w}"))),
                        }
                    }
                    sc.files.push(f);
                }
                "extent" => {
                    if rest.len() < 4 {
                        return Err(err(
                            "extent INO START+LEN reg|prealloc new|old [cached]".into()
                        ));
                    }
                    let ino = rest[0]
                        .parse()
                        .map_err(|_| err(format!("bad inode {}", rest[0])))?;
                    let (start, len) = parse_range(rest[1])
                        .ok_or_else(|| err(format!("bad range {}", rest[1])))?;
                    let kind = match rest[2] {
                        "reg" => ExtentKind::Reg,
                        "prealloc" => ExtentKind::Prealloc,
                        k => return Err(err(format!("bad extent kind {k}"))),
                    };
                    let new = match rest[3] {
                        "new" => true,
                        "old" => false,
                        k => return Err(err(format!("expected new or old, got {k}"))),
                    };
                    let cached = new || rest.get(4) == Some(&"cached");
                    if rest.len() > 5 || (rest.len() == 5 && rest[4] != "cached") {
                        return Err(err("trailing words after extent".into()));
                    }
                    sc.extents.push(ExtentSpec {
                        ino,
                        start,
                        len,
                        kind,
                        new,
                        cached,
                    });
                }
                "actor" => {
                    let kname = rest
                        .first()
                        .ok_or_else(|| err("actor needs a kind".into()))?;
                    let kind = ActorKind::ALL
                        .into_iter()
                        .find(|k| k.name() == *kname)
                        .ok_or_else(|| err(format!("unknown actor kind {kname}")))?;
                    let mut a = ActorSpec::new(kind);
                    for w in &rest[1..] {
                        if let Ok(ino) = w.parse::<u64>() {
                            a.ino = Some(ino);
                            continue;
                        }
                        match w.split_once('=') {
                            Some(("ops", v)) => {
                                for r in v.split(',') {
                                    let (r, ioerr) = match r.strip_suffix(":ioerr") {
                                        Some(r) => (r, true),
                                        None => (r, false),
                                    };
                                    let (start, len) = parse_range(r)
                                        .ok_or_else(|| err(format!("bad range {r}")))?;
                                    a.ops.push(Op { start, len, ioerr });
                                }
                            }
                            Some(("runs", v)) => {
                                a.runs = v.parse().map_err(|_| err(format!("bad runs {v}")))?
                            }
                            Some(("nr", v)) => {
                                a.nr = parse_size(v).ok_or_else(|| err(format!("bad nr {v}")))?
                            }
                            Some(("per-leaf", v)) => {
                                a.per_leaf =
                                    v.parse().map_err(|_| err(format!("bad per-leaf {v}")))?
                            }
                            None if *w == "dsync" => a.dsync = true,
                            None if *w == "keep-size" => a.keep_size = true,
                            _ => return Err(err(format!("unknown actor attribute {w}"))),
                        }
                    }
                    sc.actors.push(a);
                }
                k => return Err(err(format!("unknown statement {k}"))),
            }
        }
        if sc.name.is_empty() {
            return Err(ParseError {
                line: 0,
                msg: "no `scenario NAME` line".into(),
            });
        }
        sc.description = desc.join(" ");
        sc.validate().map_err(|msg| ParseError { line: 0, msg })?;
        Ok(sc)
    }
}

/// The shipped scenarios: (name, text).
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "prealloc-dsync-dio",
        include_str!("../scenarios/prealloc-dsync-dio.race"),
    ),
    (
        "buffered-fsync",
        include_str!("../scenarios/buffered-fsync.race"),
    ),
    ("punch-fsync", include_str!("../scenarios/punch-fsync.race")),
    (
        "nocow-ioerr-fsync",
        include_str!("../scenarios/nocow-ioerr-fsync.race"),
    ),
    ("reloc-fsync", include_str!("../scenarios/reloc-fsync.race")),
    ("everything", include_str!("../scenarios/everything.race")),
];

/// A shipped scenario by name.
pub fn shipped(name: &str) -> Option<Scenario> {
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| Scenario::parse(t).unwrap_or_else(|e| panic!("shipped scenario {name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse() {
        // Test scenario: every shipped scenario parses, validates and has its own name.
        for (name, _) in SHIPPED {
            let sc = shipped(name).unwrap();
            assert_eq!(&sc.name, name);
            assert!(!sc.description.is_empty());
        }
    }

    #[test]
    fn parse_errors_name_the_line() {
        // Test scenario: a bad statement is reported with its line number.
        let e = Scenario::parse("scenario x\nfile 257 size=1M\nactor fly 257\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.msg.contains("fly"));
        let e = Scenario::parse("scenario x\nactor dio-write 257 ops=0+4K\n").unwrap_err();
        assert!(e.msg.contains("undeclared"), "{e}");
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1M"), Some(1 << 20));
    }

    #[test]
    fn builder_equals_text() {
        // Test scenario: the builder and the text format describe the same scenario.
        let t = Scenario::parse(
            "scenario s\ndescription d\nfile 257 size=1M nodatacow\n\
             extent 257 0+1M prealloc new\nactor dio-write 257 dsync ops=0+64K,128K+4K:ioerr\n",
        )
        .unwrap();
        let b = Scenario::new("s", "d")
            .file(257, 1 << 20, true)
            .extent(257, 0, 1 << 20, ExtentKind::Prealloc, true)
            .actor(
                ActorSpec::new(ActorKind::DioWrite)
                    .ino(257)
                    .dsync()
                    .op(Op::new(0, 64 << 10))
                    .op(Op::new(128 << 10, 4096).ioerr()),
            );
        assert_eq!(t, b);
    }
}
