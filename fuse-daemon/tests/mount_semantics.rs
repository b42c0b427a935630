//! System-call semantics of the read-only mount, with the kernel as the oracle: the same probes
//! run against the ubtrfs mount and against the kernel's mount of the same (kernel-written,
//! zstd-compressed, sparse, preallocated) image, and every observation must match:
//! errnos of lookups and opens, xattr size queries and ERANGE, readdir with telldir/seekdir,
//! SEEK_DATA/SEEK_HOLE maps, statfs, pread at odd offsets, mmap, and concurrent readers.
//! The image is built and probed once; each test checks one group of observations.

mod common;

use common::compare::{get_xattr, hash_file, list_xattrs};
use common::mount::{LoopMount, Mount};
use common::tree::{generate_tree, kernel_extras, GenOptions, Rng};
use common::{errno_name, mkfs_image, require_fuse_env, require_tool, sh, Mkfs, Problems, TestDir};
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn res<T: std::fmt::Debug>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(-1)),
    }
}

/// Probes of lookups and opens that must fail the way the kernel fails them.
fn probe_errnos(root: &Path, obs: &mut Vec<String>) {
    let long = "n".repeat(256);
    for rel in [
        long.as_str(),
        "nonexistent",
        "sizes/text-1/below-a-file",
        "links/dangling/x",
    ] {
        obs.push(format!(
            "lstat {}: {}",
            &rel[..rel.len().min(40)],
            res(fs::symlink_metadata(root.join(rel)).map(|_| ()))
        ));
    }
    let opens: [(&str, i32, &str); 4] = [
        ("sizes/text-1", libc::O_WRONLY, "O_WRONLY"),
        (
            "sizes/text-1",
            libc::O_RDWR | libc::O_TRUNC,
            "O_RDWR|O_TRUNC",
        ),
        ("sizes/text-1", libc::O_DIRECTORY, "O_DIRECTORY on a file"),
        ("links/short", libc::O_NOFOLLOW, "O_NOFOLLOW on a symlink"),
    ];
    for (rel, flags, what) in opens {
        let p = cpath(&root.join(rel));
        // SAFETY: p is a valid C string; the fd is closed right away.
        let fd = unsafe { libc::open(p.as_ptr(), flags) };
        let r = if fd >= 0 {
            // SAFETY: fd was just opened.
            unsafe { libc::close(fd) };
            "ok".to_string()
        } else {
            errno_name(errno())
        };
        obs.push(format!("open {rel} {what}: {r}"));
    }
    let mut buf = [0u8; 16];
    let r = fs::File::open(root.join("sizes")).and_then(|mut f| f.read(&mut buf));
    obs.push(format!("read on a directory: {}", res(r)));
    obs.push(format!(
        "readlink on a file: {}",
        res(fs::read_link(root.join("sizes/text-1")))
    ));
    obs.push(format!(
        "mkdir on a read-only mount: {}",
        res(fs::create_dir(root.join("new-dir")))
    ));
}

/// getxattr/listxattr size queries, ERANGE on short buffers, ENODATA for missing names.
fn probe_xattrs(root: &Path, obs: &mut Vec<String>) {
    for rel in [
        "xattrs/file",
        "xattrs",
        "xattrs/many-xattrs",
        "links/short",
        "special/fifo",
    ] {
        let path = root.join(rel);
        let p = cpath(&path);
        // SAFETY: a NULL buffer with size 0 is the documented size query.
        let n = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        obs.push(format!(
            "{rel}: listxattr size query: {}",
            if n < 0 {
                errno_name(errno())
            } else {
                n.to_string()
            }
        ));
        if n > 1 {
            let mut small = vec![0u8; n as usize - 1];
            // SAFETY: small is writable for its length.
            let r = unsafe { libc::llistxattr(p.as_ptr(), small.as_mut_ptr().cast(), small.len()) };
            obs.push(format!(
                "{rel}: listxattr short buffer: {}",
                if r < 0 {
                    errno_name(errno())
                } else {
                    r.to_string()
                }
            ));
        }
        let mut names = list_xattrs(&path).unwrap_or_default();
        names.sort();
        for name in names {
            let n_c = CString::new(name.as_bytes()).unwrap();
            // SAFETY: size query with a NULL buffer.
            let sz = unsafe { libc::lgetxattr(p.as_ptr(), n_c.as_ptr(), std::ptr::null_mut(), 0) };
            let value = get_xattr(&path, &name);
            obs.push(format!(
                "{rel}: getxattr {}: size query {}, value {}",
                name.to_string_lossy(),
                if sz < 0 {
                    errno_name(errno())
                } else {
                    sz.to_string()
                },
                match &value {
                    Ok(v) => format!("{} bytes", v.len()),
                    Err(e) => errno_name(e.raw_os_error().unwrap_or(-1)),
                }
            ));
            if let Ok(v) = value {
                if v.len() > 1 {
                    let mut small = vec![0u8; v.len() - 1];
                    // SAFETY: small is writable for its length.
                    let r = unsafe {
                        libc::lgetxattr(
                            p.as_ptr(),
                            n_c.as_ptr(),
                            small.as_mut_ptr().cast(),
                            small.len(),
                        )
                    };
                    obs.push(format!(
                        "{rel}: getxattr {} short buffer: {}",
                        name.to_string_lossy(),
                        if r < 0 {
                            errno_name(errno())
                        } else {
                            r.to_string()
                        }
                    ));
                }
            }
        }
        obs.push(format!(
            "{rel}: getxattr user.missing: {}",
            res(get_xattr(&path, OsStr::new("user.missing")))
        ));
    }
}

/// readdir of a big directory with telldir/seekdir back to the middle and to the start.
fn probe_readdir(root: &Path, obs: &mut Vec<String>) {
    let dir = cpath(&root.join("many"));
    // SAFETY: dir is a valid path; the stream is closed at the end; entries are read before
    // the next readdir call as the API requires.
    unsafe {
        let dp = libc::opendir(dir.as_ptr());
        if dp.is_null() {
            obs.push(format!("opendir many: {}", errno_name(errno())));
            return;
        }
        let mut names = Vec::new();
        let mut pos = Vec::new();
        loop {
            pos.push(libc::telldir(dp));
            let ent = libc::readdir(dp);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                .to_bytes()
                .to_vec();
            names.push(name);
        }
        let count = names.len();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        obs.push(format!(
            "readdir many: {count} entries, {} distinct",
            sorted.len()
        ));
        for at in [count / 2, count.saturating_sub(1), 0] {
            if at >= names.len() {
                continue;
            }
            libc::seekdir(dp, pos[at]);
            let ent = libc::readdir(dp);
            let got = if ent.is_null() {
                None
            } else {
                Some(
                    std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                        .to_bytes()
                        .to_vec(),
                )
            };
            obs.push(format!(
                "seekdir to entry {at}: {}",
                if got.as_ref() == Some(&names[at]) {
                    "same entry again"
                } else {
                    "a different entry"
                }
            ));
        }
        libc::closedir(dp);
    }
}

/// SEEK_DATA/SEEK_HOLE map of a file: (data start, hole start) pairs.
fn data_map(path: &Path) -> String {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return res::<()>(Err(e)),
    };
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off: i64 = 0;
    for _ in 0..64 {
        // SAFETY: fd is open for the life of f.
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            out.push(errno_name(errno()));
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            out.push(errno_name(errno()));
            break;
        }
        out.push(format!("{d}..{h}"));
        off = h;
    }
    out.join(" ")
}

fn probe_holes(root: &Path, obs: &mut Vec<String>) {
    for rel in [
        "sparse/hole-at-start",
        "sparse/hole-in-middle",
        "sparse/hole-at-end",
        "sparse/all-hole",
        "sparse/one-sector-holes",
        "kernel-extras/prealloc",
        "kernel-extras/punched",
        "kernel-extras/inline-then-far-write",
        "kernel-extras/fragmented",
        "sizes/random-8193",
    ] {
        obs.push(format!(
            "{rel}: SEEK_DATA/SEEK_HOLE {}",
            data_map(&root.join(rel))
        ));
    }
}

fn probe_statfs(root: &Path, obs: &mut Vec<String>) {
    let p = cpath(root);
    // SAFETY: st is plain old data filled by statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: p is valid, st is writable.
    let r = unsafe { libc::statvfs(p.as_ptr(), &mut st) };
    if r != 0 {
        obs.push(format!("statvfs: {}", errno_name(errno())));
        return;
    }
    obs.push(format!(
        "statvfs: bsize {} frsize {} blocks {} bfree {} bavail {} files {} ffree {} namemax {} \
         read-only {}",
        st.f_bsize,
        st.f_frsize,
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
        st.f_namemax,
        st.f_flag & libc::ST_RDONLY != 0
    ));
}

/// pread at odd offsets and lengths, and mmap, must agree with a plain sequential read on the
/// same mount (content against the source is checked by the other tests).
fn probe_reads(root: &Path, obs: &mut Vec<String>) {
    let mut rng = Rng::new(99);
    for rel in [
        "big/large.bin",
        "sizes/mixed-1000001",
        "sizes/text-131073",
        "sparse/hole-in-middle",
        "kernel-extras/overwritten",
        "kernel-extras/reflinked",
        "kernel-extras/punched",
    ] {
        let path = root.join(rel);
        let whole = match fs::read(&path) {
            Ok(w) => w,
            Err(e) => {
                obs.push(format!("{rel}: read: {}", res::<()>(Err(e))));
                continue;
            }
        };
        let f = fs::File::open(&path).unwrap();
        let mut bad = 0;
        for _ in 0..200 {
            let off = rng.below(whole.len() as u64 + 5000);
            let len = [1u64, 7, 4095, 4096, 4097, 65536, 131075, 1 << 20][rng.below(8) as usize];
            let mut buf = vec![0u8; len as usize];
            let n = f.read_at(&mut buf, off).unwrap_or(usize::MAX);
            let start = (off as usize).min(whole.len());
            let end = (start + len as usize).min(whole.len());
            if n == usize::MAX || buf[..n.min(buf.len())] != whole[start..end] {
                bad += 1;
            }
        }
        obs.push(format!(
            "{rel}: 200 preads, {bad} inconsistent with a full read"
        ));
        let direct = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map(|_| ());
        obs.push(format!("{rel}: O_DIRECT open: {}", res(direct)));
        if !whole.is_empty() {
            // SAFETY: a private read-only mapping of an open file, unmapped below; its length
            // is the file's length.
            let same = unsafe {
                let m = libc::mmap(
                    std::ptr::null_mut(),
                    whole.len(),
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    f.as_raw_fd(),
                    0,
                );
                if m == libc::MAP_FAILED {
                    None
                } else {
                    let s = std::slice::from_raw_parts(m as *const u8, whole.len()) == &whole[..];
                    libc::munmap(m, whole.len());
                    Some(s)
                }
            };
            obs.push(format!("{rel}: mmap equals read: {same:?}"));
        }
    }
}

/// Eight threads reading random files at once must see what a single reader sees.
fn probe_concurrency(root: &Path, obs: &mut Vec<String>) {
    let mut files: Vec<PathBuf> = Vec::new();
    for d in ["sizes", "many", "kernel-extras"] {
        for e in fs::read_dir(root.join(d)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files.truncate(400);
    let expected: Vec<Option<[u8; 32]>> = files.iter().map(|f| hash_file(f).ok()).collect();
    let files = std::sync::Arc::new(files);
    let expected = std::sync::Arc::new(expected);
    let handles: Vec<_> = (0..8u64)
        .map(|k| {
            let files = files.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(k);
                let mut bad = 0;
                for _ in 0..300 {
                    let i = rng.below(files.len() as u64) as usize;
                    if hash_file(&files[i]).ok() != expected[i] {
                        bad += 1;
                    }
                }
                bad
            })
        })
        .collect();
    let bad: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    obs.push(format!("8 concurrent readers: {bad} reads differed"));
}

type Observations = BTreeMap<&'static str, Vec<String>>;
type Probe = fn(&Path, &mut Vec<String>);

fn probe_all(root: PathBuf) -> Observations {
    let mut m = Observations::new();
    let groups: [(&'static str, Probe); 7] = [
        ("errnos", probe_errnos),
        ("xattrs", probe_xattrs),
        ("readdir", probe_readdir),
        ("holes", probe_holes),
        ("statfs", probe_statfs),
        ("reads", probe_reads),
        ("concurrency", probe_concurrency),
    ];
    for (name, probe) in groups {
        let mut obs = Vec::new();
        probe(&root, &mut obs);
        m.insert(name, obs);
    }
    m
}

/// Observations through the kernel and through ubtrfs, and how the daemon ended: made once
/// (by whichever test comes first) and shared by all the tests of this file.
struct Shared {
    kernel: Observations,
    ours: Observations,
    daemon: Option<String>,
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        require_fuse_env();
        require_tool("cp");
        let t = TestDir::new("semantics");
        let src = t.mkdir("src");
        generate_tree(
            &src,
            &GenOptions {
                seed: 5,
                large_file_size: 4 << 20,
                many_entries: 3000,
                depth: 5,
            },
        );
        let img = t.join("image");
        mkfs_image(&img, &Mkfs::default());
        let mnt = t.mkdir("mnt");
        {
            let w = LoopMount::new(&img, &mnt, "compress-force=zstd");
            sh(
                "cp",
                &[
                    "-a",
                    &format!("{}/.", src.display()),
                    &w.path().display().to_string(),
                ],
            );
            kernel_extras(&w.path().join("kernel-extras"), 5);
            sh("sync", &[]);
        }
        let k = LoopMount::new(&img, &mnt, "ro");
        let kernel = probe_all(k.path().to_path_buf());
        drop(k);
        let mut m = Mount::new(&img, &mnt);
        let ours = m
            .run_guarded(Duration::from_secs(600), probe_all)
            .unwrap_or_else(|e| panic!("{e}"));
        let exit = m.unmount();
        let daemon = (!(exit.is_clean_exit() && exit.status.and_then(|s| s.code()) == Some(0)))
            .then(|| exit.describe());
        Shared {
            kernel,
            ours,
            daemon,
        }
    })
}

/// Compare one group of observations.
fn check_group(group: &str) {
    let s = shared();
    let kernel = &s.kernel[group];
    let ours = &s.ours[group];
    let mut lines = Vec::new();
    for (i, k) in kernel.iter().enumerate() {
        match ours.get(i) {
            Some(o) if o == k => {}
            Some(o) => lines.push(format!("kernel: {k}\n    ubtrfs: {o}")),
            None => lines.push(format!("kernel: {k}\n    ubtrfs: (no observation)")),
        }
    }
    if ours.len() != kernel.len() {
        lines.push(format!(
            "{} observations through ubtrfs, {} through the kernel",
            ours.len(),
            kernel.len()
        ));
    }
    let mut p = Problems::default();
    p.add(
        format!("{group}: observations that differ from the kernel's"),
        lines,
    );
    if let Some(d) = &s.daemon {
        p.add_one("daemon exit after unmount", d.clone());
    }
    p.check("syscall semantics (kernel-written zstd image)");
}

// Test scenario: failing lookups and opens (256-byte name, missing name, a file used as a
// directory, dangling symlink as a directory, writes on a read-only mount, O_DIRECTORY on a file,
// O_NOFOLLOW on a symlink, read on a directory, readlink on a file) give the kernel's errnos.
#[test]
fn errnos_match_kernel() {
    check_group("errnos");
}

// Test scenario: listxattr/getxattr size queries, ERANGE on short buffers and ENODATA for a
// missing name behave as on the kernel mount, on files, directories, symlinks and fifos.
#[test]
fn xattr_protocol_matches_kernel() {
    check_group("xattrs");
}

// Test scenario: reading a 3000-entry directory gives the same number of distinct entries and
// telldir/seekdir back to the middle, the end and the start return the same entry again.
#[test]
fn readdir_seekdir_matches_kernel() {
    check_group("readdir");
}

// Test scenario: SEEK_DATA/SEEK_HOLE see the same holes as the kernel (sparse files, punched
// holes, unwritten prealloc, an inline extent followed by a far write, a fragmented file).
#[test]
fn seek_data_hole_matches_kernel() {
    check_group("holes");
}

// Test scenario: statfs reports the same block size, total, free and available blocks, file
// counts, name length limit and read-only flag as the kernel for the same image.
#[test]
fn statfs_matches_kernel() {
    check_group("statfs");
}

// Test scenario: pread at odd offsets and lengths, O_DIRECT opens and mmap agree with a full
// read, on compressed, sparse, overwritten and reflinked files, as on the kernel mount.
#[test]
fn pread_direct_mmap_match_kernel() {
    check_group("reads");
}

// Test scenario: eight threads reading 400 files at random at the same time see exactly what a
// single reader sees.
#[test]
fn concurrent_readers_match_kernel() {
    check_group("concurrency");
}
