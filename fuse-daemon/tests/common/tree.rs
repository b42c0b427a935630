//! A deterministic (seeded) source tree with the cases that break filesystems:
//! sizes around the inline and sector limits, a large file, sparse files, a big directory,
//! a deep path, long and non-ASCII names, short and long symlinks, hard links across
//! directories, user xattrs, fifos, unusual modes and owners, nanosecond timestamps
//! (including before 1970 and after 2038).

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// SplitMix64: small, deterministic, good enough for test data.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x005e_ed0f_b77f)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a generated file contains (each kind behaves differently under compression).
#[derive(Clone, Copy, Debug)]
pub enum Content {
    /// Incompressible bytes.
    Random,
    /// Words and numbers: compresses well.
    Text,
    /// Alternating 4 KiB random and text blocks.
    Mixed,
    /// All zeros (written, not holes).
    Zeros,
}

/// Write `len` bytes of `kind` content derived from `seed` at the current position.
pub fn write_content(w: &mut impl Write, seed: u64, len: u64, kind: Content) {
    let mut rng = Rng::new(seed);
    let mut left = len;
    let mut buf = vec![0u8; 64 * 1024];
    let mut block = 0u64;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        for (i, sub) in chunk.chunks_mut(4096).enumerate() {
            let text = match kind {
                Content::Random => false,
                Content::Text => true,
                Content::Zeros => {
                    sub.fill(0);
                    continue;
                }
                Content::Mixed => (block + i as u64) % 2 == 1,
            };
            if text {
                fill_text(&mut rng, sub);
            } else {
                rng.fill(sub);
            }
        }
        block += n.div_ceil(4096) as u64;
        w.write_all(chunk).expect("writing generated content");
        left -= n as u64;
    }
}

fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    const WORDS: &[&str] = &[
        "btrfs",
        "extent",
        "inode",
        "subvolume",
        "checksum",
        "chunk",
        "leaf",
        "node",
        "fsync",
        "transaction",
        "ubtrfs",
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "snapshot",
        "balance",
    ];
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if rng.below(10) == 0 { b"\n" } else { b" " };
        for &b in w.iter().chain(sep.iter()) {
            if i < buf.len() {
                buf[i] = b;
                i += 1;
            }
        }
    }
}

/// Create a file of `len` bytes.
pub fn make_file(path: &Path, seed: u64, len: u64, kind: Content) {
    let f = File::create(path).unwrap_or_else(|e| panic!("creating {path:?}: {e}"));
    let mut w = BufWriter::with_capacity(256 * 1024, f);
    write_content(&mut w, seed, len, kind);
    w.flush().unwrap();
}

/// A sparse file: `(offset, len)` data pieces written at their offsets, then sized to `size`.
pub fn make_sparse(path: &Path, seed: u64, pieces: &[(u64, u64)], size: u64) {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {path:?}: {e}"));
    for (i, &(off, len)) in pieces.iter().enumerate() {
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut w = BufWriter::new(&mut f);
        write_content(&mut w, seed.wrapping_add(i as u64), len, Content::Mixed);
        w.flush().unwrap();
    }
    f.set_len(size).unwrap();
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// lsetxattr(2).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    // SAFETY: p and n are valid NUL-terminated strings, value points to value.len() bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "lsetxattr {path:?} {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// mkfifo(3).
pub fn make_fifo(path: &Path, mode: u32) {
    let p = cpath(path);
    // SAFETY: p is a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(p.as_ptr(), mode as libc::mode_t) };
    assert_eq!(r, 0, "mkfifo {path:?}: {}", std::io::Error::last_os_error());
}

/// lchown(2).
pub fn set_owner(path: &Path, uid: u32, gid: u32) {
    let p = cpath(path);
    // SAFETY: p is a valid NUL-terminated path.
    let r = unsafe { libc::lchown(p.as_ptr(), uid, gid) };
    assert_eq!(r, 0, "lchown {path:?}: {}", std::io::Error::last_os_error());
}

/// Set atime and mtime (seconds, nanoseconds) without following symlinks.
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let p = cpath(path);
    let ts = [
        libc::timespec {
            tv_sec: atime.0 as libc::time_t,
            tv_nsec: atime.1 as libc::c_long,
        },
        libc::timespec {
            tv_sec: mtime.0 as libc::time_t,
            tv_nsec: mtime.1 as libc::c_long,
        },
    ];
    // SAFETY: p is a valid path, ts is an array of two timespecs as utimensat requires.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {path:?}: {}",
        std::io::Error::last_os_error()
    );
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {path:?} {mode:o}: {e}"));
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub seed: u64,
    /// Size of `big/large.bin`.
    pub large_file_size: u64,
    /// Entries in `many/`.
    pub many_entries: usize,
    /// Levels under `deep/`.
    pub depth: usize,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            seed: 1,
            large_file_size: 20 << 20,
            many_entries: 3000,
            depth: 40,
        }
    }
}

/// Sizes around the inline limit (2048 by default, max_inline), the sector (4096), pages,
/// the 128 KiB compression chunk, and a few MiB.
pub const SIZES: &[u64] = &[
    0,
    1,
    2,
    100,
    2047,
    2048,
    2049,
    3000,
    4095,
    4096,
    4097,
    8191,
    8192,
    8193,
    12345,
    65535,
    65536,
    65537,
    131071,
    131072,
    131073,
    131072 * 3 + 17,
    1_000_001,
];

/// Generate the tree under `root` (which must exist and be empty). Returns the number of
/// entries created.
pub fn generate_tree(root: &Path, o: &GenOptions) -> usize {
    let mut rng = Rng::new(o.seed);
    let mut count = 0usize;
    let d = |name: &str| -> PathBuf {
        let p = root.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {p:?}: {e}"));
        p
    };

    // Sizes x content kinds.
    let small = d("sizes");
    for (i, &len) in SIZES.iter().enumerate() {
        for (kname, kind) in [
            ("random", Content::Random),
            ("text", Content::Text),
            ("mixed", Content::Mixed),
        ] {
            make_file(
                &small.join(format!("{kname}-{len}")),
                o.seed
                    .wrapping_mul(1000)
                    .wrapping_add(i as u64 * 7 + kind as u64),
                len,
                kind,
            );
            count += 1;
        }
    }
    make_file(&small.join("zeros-70000"), 0, 70000, Content::Zeros);
    count += 1;

    // A large file: random and compressible regions.
    let big = d("big");
    make_file(
        &big.join("large.bin"),
        o.seed ^ 0xb16,
        o.large_file_size,
        Content::Mixed,
    );
    count += 1;

    // Sparse files.
    let sp = d("sparse");
    let mib = 1u64 << 20;
    make_sparse(
        &sp.join("hole-at-start"),
        o.seed.wrapping_add(11),
        &[(mib + 123, 9000)],
        mib + 123 + 9000,
    );
    make_sparse(
        &sp.join("hole-in-middle"),
        o.seed.wrapping_add(12),
        &[(0, 70000), (3 * mib + 17, 5000)],
        3 * mib + 17 + 5000,
    );
    make_sparse(
        &sp.join("hole-at-end"),
        o.seed.wrapping_add(13),
        &[(0, 5000)],
        8 * mib + 5,
    );
    make_sparse(&sp.join("all-hole"), 0, &[], 3 * mib);
    make_sparse(
        &sp.join("one-sector-holes"),
        o.seed.wrapping_add(14),
        &[(0, 4096), (8192, 4096), (16384 + 100, 10)],
        32768,
    );
    make_sparse(
        &sp.join("inline-then-hole"),
        o.seed.wrapping_add(15),
        &[(0, 100)],
        mib,
    );
    count += 6;

    // A big directory: files (some empty), a few subdirectories and symlinks.
    let many = d("many");
    for i in 0..o.many_entries {
        let name = format!("entry-{i:05}-{:x}", rng.below(1 << 20));
        let p = many.join(&name);
        match i % 100 {
            0 => {
                fs::create_dir(&p).unwrap();
                make_file(&p.join("inside"), i as u64, 10, Content::Text);
                count += 1;
            }
            1 => symlink(format!("../sizes/text-{}", SIZES[i % SIZES.len()]), &p).unwrap(),
            n if n % 3 == 0 => make_file(&p, i as u64, 0, Content::Text),
            _ => make_file(&p, i as u64, 1 + rng.below(300), Content::Text),
        }
        count += 1;
    }

    // A deep path.
    let mut deep = d("deep");
    for level in 0..o.depth {
        deep = deep.join(format!("level-{level:02}"));
        fs::create_dir(&deep).unwrap();
        if level % 10 == 9 {
            make_file(&deep.join("file"), level as u64, 5000, Content::Text);
            count += 1;
        }
        count += 1;
    }
    make_file(&deep.join("bottom.txt"), 4242, 33, Content::Text);
    count += 1;

    // Names.
    let names = d("names");
    let mut name_list: Vec<OsString> = vec![
        "a".repeat(255).into(),
        // 127 two-byte characters + 1 byte = 255 bytes.
        format!("{}x", "é".repeat(127)).into(),
        // 85 three-byte characters = 255 bytes.
        "日".repeat(85).into(),
        "ünïcödé".into(),
        "日本語のファイル名".into(),
        "🦀 crab".into(),
        "with space".into(),
        "tab\there".into(),
        "new\nline".into(),
        "-leading-dash".into(),
        ".hidden".into(),
        "..dots..".into(),
        "back\\slash".into(),
        "quote'\"".into(),
    ];
    // A name that is not valid UTF-8.
    name_list.push(OsString::from_vec(vec![b'b', b'a', b'd', 0xff, 0xfe, b'!']));
    for (i, n) in name_list.iter().enumerate() {
        make_file(&names.join(n), 900 + i as u64, 10 + i as u64, Content::Text);
        count += 1;
    }
    let long_dir = names.join("d".repeat(255));
    fs::create_dir(&long_dir).unwrap();
    make_file(&long_dir.join("f".repeat(255)), 999, 1, Content::Text);
    count += 2;

    // Symlinks.
    let links = d("links");
    let long_target: String = (0..)
        .map(|i| format!("segment-{i:03}/"))
        .take(3000 / 12 + 1)
        .collect::<String>()[..3000]
        .to_string();
    let max_target = "t".repeat(4095);
    for (name, target) in [
        ("short", "target".to_string()),
        ("one", "x".to_string()),
        ("absolute", "/nonexistent/absolute/path".to_string()),
        ("dangling", "does-not-exist".to_string()),
        ("to-dir", "../sizes".to_string()),
        ("to-file", "../sizes/text-4096".to_string()),
        ("long-3000", long_target),
        ("max-4095", max_target),
        ("non-ascii", "ünïcödé/日本".to_string()),
    ] {
        symlink(&target, links.join(name)).unwrap();
        count += 1;
    }

    // Hard links across directories.
    let hl = d("hardlinks");
    let other = d("hardlinks-other");
    make_file(&hl.join("group1-a"), 77, 10000, Content::Mixed);
    fs::hard_link(hl.join("group1-a"), other.join("group1-b")).unwrap();
    fs::hard_link(hl.join("group1-a"), many.join("group1-c")).unwrap();
    make_file(&hl.join("group2-a"), 78, 100, Content::Text);
    fs::hard_link(hl.join("group2-a"), hl.join("group2-b")).unwrap();
    make_file(&hl.join("empty-a"), 0, 0, Content::Text);
    fs::hard_link(hl.join("empty-a"), other.join("empty-b")).unwrap();
    count += 7;

    // User xattrs of various sizes, on files and directories.
    let xd = d("xattrs");
    let xf = xd.join("file");
    make_file(&xf, 55, 1234, Content::Text);
    let mut big_value = vec![0u8; 3000];
    rng.fill(&mut big_value);
    let mut medium = vec![0u8; 200];
    rng.fill(&mut medium);
    set_xattr(&xf, "user.small", b"v");
    set_xattr(&xf, "user.empty", b"");
    set_xattr(&xf, "user.medium", &medium);
    set_xattr(&xf, "user.large", &big_value);
    set_xattr(&xf, &format!("user.{}", "n".repeat(200)), b"long name");
    set_xattr(&xf, "user.ünïcödé", "värde".as_bytes());
    set_xattr(&xd, "user.on-directory", b"dir value");
    let many_x = xd.join("many-xattrs");
    make_file(&many_x, 56, 0, Content::Text);
    for i in 0..50 {
        set_xattr(
            &many_x,
            &format!("user.attr-{i:02}"),
            format!("{i}").as_bytes(),
        );
    }
    count += 2;

    // Special files, modes and owners.
    let sp = d("special");
    make_fifo(&sp.join("fifo"), 0o644);
    make_fifo(&sp.join("fifo-600"), 0o600);
    let owned = sp.join("owned");
    make_file(&owned, 60, 100, Content::Text);
    set_owner(&owned, 1234, 5678);
    // chown clears setuid/setgid, so modes come after owners.
    let setuid = sp.join("setuid");
    make_file(&setuid, 61, 100, Content::Text);
    set_owner(&setuid, 1000, 1000);
    chmod(&setuid, 0o4755);
    let setgid = sp.join("setgid-dir");
    fs::create_dir(&setgid).unwrap();
    chmod(&setgid, 0o2775);
    let sticky = sp.join("sticky-dir");
    fs::create_dir(&sticky).unwrap();
    make_file(&sticky.join("inside"), 62, 10, Content::Text);
    chmod(&sticky, 0o1777);
    let m000 = sp.join("mode-000");
    make_file(&m000, 63, 100, Content::Text);
    chmod(&m000, 0o000);
    let d000 = sp.join("dir-000");
    fs::create_dir(&d000).unwrap();
    make_file(&d000.join("inside"), 64, 100, Content::Text);
    chmod(&d000, 0o000);
    let m7777 = sp.join("mode-7777");
    make_file(&m7777, 65, 1, Content::Text);
    chmod(&m7777, 0o7777);
    let link_owned = sp.join("symlink-owned");
    symlink("owned", &link_owned).unwrap();
    set_owner(&link_owned, 4321, 8765);
    make_file(&sp.join("old-time"), 66, 10, Content::Text);
    make_file(&sp.join("future-time"), 67, 10, Content::Text);
    count += 13;

    // Timestamps with nanoseconds on everything, children before parents.
    set_all_times(root, o.seed);
    // Times outside 1970..2038.
    set_times(
        &sp.join("old-time"),
        (-1_000_000, 5),
        (-1_000_000, 999_999_999),
    );
    set_times(
        &sp.join("future-time"),
        (8_589_934_592 + 7, 1),
        (8_589_934_592 + 7, 123),
    );
    // Setting those changed nothing in the parent (no entry changed), so the parent's times
    // set above still stand.
    count
}

/// Deterministic (seconds, nanoseconds) for a relative path.
pub fn time_for(rel: &OsStr, seed: u64, which: u64) -> (i64, i64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed ^ which.wrapping_mul(0x100_0000_01b3);
    for &b in rel.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let mut r = Rng::new(h);
    let sec = 946_684_800 + r.below(1_000_000_000) as i64;
    let nsec = r.below(1_000_000_000) as i64;
    (sec, nsec)
}

/// Set atime/mtime of every entry under `root` (and root itself), post-order.
pub fn set_all_times(root: &Path, seed: u64) {
    fn rec(root: &Path, p: &Path, seed: u64) {
        let md = fs::symlink_metadata(p).unwrap();
        if md.is_dir() {
            let mut names: Vec<_> = fs::read_dir(p)
                .unwrap_or_else(|e| panic!("read_dir {p:?}: {e}"))
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                rec(root, &p.join(n), seed);
            }
        }
        let rel = p.strip_prefix(root).unwrap().as_os_str();
        set_times(p, time_for(rel, seed, 1), time_for(rel, seed, 2));
    }
    rec(root, root, seed);
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {path:?}: {e}"))
}

fn pwrite_content(path: &Path, seed: u64, off: u64, len: u64) {
    let mut f = open_rw(path);
    f.seek(SeekFrom::Start(off)).unwrap();
    write_content(&mut f, seed, len, Content::Random);
    f.sync_all().unwrap();
}

fn fallocate(path: &Path, mode: i32, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let f = open_rw(path);
    // SAFETY: the fd is valid for the life of `f`; fallocate takes plain integers.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(
        r,
        0,
        "fallocate {path:?} mode {mode:#x}: {}",
        std::io::Error::last_os_error()
    );
    f.sync_all().unwrap();
}

fn synced_file(path: &Path, seed: u64, len: u64, kind: Content) {
    make_file(path, seed, len, kind);
    File::open(path).unwrap().sync_all().unwrap();
}

/// Files only a kernel writing into a mounted btrfs produces, under `dir` (which must be on a
/// kernel btrfs mount): partially overwritten (compressed) extents, so that file extent items
/// point into the middle of extents; preallocated extents inside and beyond EOF; punched
/// holes; reflinked extents then overwritten; truncation inside an extent; NOCOW (nodatasum,
/// never compressed) data; inline extents that grew into regular ones; fragmented files.
/// Every step is fsynced so that extents are allocated (and compressed) before the next one.
pub fn kernel_extras(dir: &Path, seed: u64) {
    super::require_tool("cp");
    super::require_tool("chattr");
    fs::create_dir_all(dir).unwrap();
    let mib = 1u64 << 20;
    let s = |n: u64| seed.wrapping_add(n);

    let ow = dir.join("overwritten");
    synced_file(&ow, s(1), mib, Content::Mixed);
    pwrite_content(&ow, s(2), 300_000, 5000);
    pwrite_content(&ow, s(3), 700_001, 10);

    let pre = dir.join("prealloc");
    fallocate(&pre, 0, 0, mib);
    pwrite_content(&pre, s(4), 500_000, 100);

    let pre_eof = dir.join("prealloc-beyond-eof");
    synced_file(&pre_eof, s(5), 1000, Content::Text);
    fallocate(&pre_eof, libc::FALLOC_FL_KEEP_SIZE, 0, mib);

    let punched = dir.join("punched");
    synced_file(&punched, s(6), mib, Content::Mixed);
    fallocate(
        &punched,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        5000,
        200_000,
    );

    let refl = dir.join("reflinked");
    super::run_ok(
        "cp",
        &[
            OsStr::new("--reflink=always"),
            ow.as_os_str(),
            refl.as_os_str(),
        ],
    );
    pwrite_content(&refl, s(7), 65536, 4096);

    let tr = dir.join("truncated");
    synced_file(&tr, s(8), mib, Content::Mixed);
    open_rw(&tr).set_len(200_001).unwrap();

    let nocow = dir.join("nocow");
    fs::create_dir(&nocow).unwrap();
    super::run_ok("chattr", &[OsStr::new("+C"), nocow.as_os_str()]);
    synced_file(&nocow.join("data"), s(9), 300_000, Content::Mixed);
    synced_file(&nocow.join("small"), s(10), 100, Content::Text);

    let grown = dir.join("inline-grown");
    synced_file(&grown, s(11), 100, Content::Text);
    let mut f = OpenOptions::new().append(true).open(&grown).unwrap();
    write_content(&mut f, s(12), 10_000, Content::Text);
    f.sync_all().unwrap();

    let sparse = dir.join("inline-then-far-write");
    synced_file(&sparse, s(13), 100, Content::Text);
    pwrite_content(&sparse, s(14), mib, 10);

    // Enough long-named hard links in one directory to overflow the INODE_REF item into
    // INODE_EXTREF items.
    let links = dir.join("many-links");
    fs::create_dir(&links).unwrap();
    let target = links.join("target");
    synced_file(&target, s(15), 3000, Content::Text);
    for i in 0..300 {
        fs::hard_link(&target, links.join(format!("{}-{i:03}", "l".repeat(200)))).unwrap();
    }

    let frag = dir.join("fragmented");
    for i in 0..64u64 {
        pwrite_content(&frag, s(100 + i), i * 8192, 4096);
    }
}
