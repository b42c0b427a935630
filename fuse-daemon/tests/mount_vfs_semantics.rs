//! VFS semantics that a FUSE filesystem has to provide itself, with the kernel's btrfs as the
//! oracle: the same probe runs on a ubtrfs read-write mount and on a kernel mount of an
//! identical mkfs.btrfs image, and every observation (result or errno) must match. Then the
//! ubtrfs image must pass `btrfs check` and the kernel must read back what ubtrfs wrote.
//!
//! Covered: inode flags through FS_IOC_GETFLAGS/SETFLAGS and FS_IOC_FSGETXATTR/FSSETXATTR
//! (chattr/lsattr, xfs_io chattr) and the immutable / append-only checks of open, write,
//! truncate, setattr, unlink, rename, link, xattrs and fallocate.

mod common;

use common::mount::{LoopMount, Mount};
use common::{errno_name, mkfs_image, require_fuse_env, require_tool, Mkfs, TestDir};
use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_IMMUTABLE_FL: u32 = 0x10;
const FS_APPEND_FL: u32 = 0x20;
const FS_NODUMP_FL: u32 = 0x40;
const FS_NOATIME_FL: u32 = 0x80;
const FS_SYNC_FL: u32 = 0x08;
const FS_NOCOMP_FL: u32 = 0x400;
const FS_COMPR_FL: u32 = 0x04;
const FS_NOCOW_FL: u32 = 0x0080_0000;
const FS_XFLAG_IMMUTABLE: u32 = 0x8;
const FS_XFLAG_APPEND: u32 = 0x10;
const FS_XFLAG_NODUMP: u32 = 0x80;
const FS_XFLAG_EXTSIZE: u32 = 0x800;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_errno() -> String {
    errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
}

fn res<T: std::fmt::Debug>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(-1)),
    }
}

fn open_ro(p: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
}

fn getflags(p: &Path) -> String {
    let f = match open_ro(p) {
        Ok(f) => f,
        Err(e) => return res::<()>(Err(e)),
    };
    let mut v: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which points to `v`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut v as *mut libc::c_int) };
    if r < 0 {
        last_errno()
    } else {
        format!("{:#x}", v as u32)
    }
}

fn setflags(p: &Path, flags: u32) -> String {
    let f = match open_ro(p) {
        Ok(f) => f,
        Err(e) => return res::<()>(Err(e)),
    };
    let v = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which points to `v`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &v as *const libc::c_int) };
    if r < 0 {
        last_errno()
    } else {
        "ok".into()
    }
}

/// FS_IOC_FSGETXATTR, then (when `set` is given) FS_IOC_FSSETXATTR with those xflags and
/// extent size; returns both results.
fn fsxattr(p: &Path, set: Option<(u32, u32)>) -> String {
    let f = match open_ro(p) {
        Ok(f) => f,
        Err(e) => return res::<()>(Err(e)),
    };
    let mut x = [0u32; 7];
    // SAFETY: FS_IOC_FSGETXATTR writes a 28-byte struct fsxattr; `x` is 28 bytes.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, x.as_mut_ptr()) };
    let got = if r < 0 {
        last_errno()
    } else {
        format!("xflags {:#x} extsize {}", x[0], x[1])
    };
    let Some((xflags, extsize)) = set else {
        return got;
    };
    x[0] = xflags;
    x[1] = extsize;
    // SAFETY: FS_IOC_FSSETXATTR reads a 28-byte struct fsxattr; `x` is 28 bytes.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR, x.as_ptr()) };
    format!(
        "{got}; set: {}",
        if r < 0 { last_errno() } else { "ok".into() }
    )
}

fn open_flags(p: &Path, flags: i32) -> String {
    let c = cpath(p);
    // SAFETY: c is a valid C string; the fd is closed right away.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    if fd < 0 {
        return last_errno();
    }
    // SAFETY: fd was just opened by us.
    unsafe { libc::close(fd) };
    "ok".into()
}

fn append(p: &Path, data: &[u8]) -> String {
    use std::io::Write;
    res(fs::OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|mut f| f.write_all(data)))
}

fn fallocate(p: &Path, mode: i32, off: i64, len: i64) -> String {
    let f = match fs::OpenOptions::new().append(true).open(p) {
        Ok(f) => f,
        Err(e) => return format!("open: {}", res::<()>(Err(e))),
    };
    // SAFETY: plain fallocate on an fd we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
    if r < 0 {
        last_errno()
    } else {
        "ok".into()
    }
}

fn setxattr(p: &Path, name: &str) -> String {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a 1-byte value buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    if r < 0 {
        last_errno()
    } else {
        "ok".into()
    }
}

fn utimes_now(p: &Path) -> String {
    let c = cpath(p);
    // SAFETY: a NULL times pointer means "now" for both times.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) };
    if r < 0 {
        last_errno()
    } else {
        "ok".into()
    }
}

fn size_of(p: &Path) -> String {
    res(fs::metadata(p).map(|m| m.len()))
}

/// The inode-flags probe: every line is one operation and its outcome.
fn probe_inode_flags(root: &Path) -> Vec<String> {
    let mut o = Vec::new();
    let f = root.join("f");
    let d = root.join("d");
    fs::write(&f, b"data").unwrap();
    fs::create_dir(&d).unwrap();
    fs::write(d.join("inside"), b"x").unwrap();
    std::os::unix::fs::symlink("f", root.join("sym")).unwrap();
    let mut push = |what: &str, r: String| o.push(format!("{what}: {r}"));

    push("getflags new file", getflags(&f));
    push("getflags new dir", getflags(&d));
    push("fsgetxattr new file", fsxattr(&f, None));

    // Immutable file: nothing changes.
    let ctime = || {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&f).map(|m| (m.ctime(), m.ctime_nsec())).ok()
    };
    let before = ctime();
    std::thread::sleep(std::time::Duration::from_millis(20));
    push("set +i", setflags(&f, FS_IMMUTABLE_FL));
    push("ctime changed by chattr", (ctime() != before).to_string());
    push("getflags +i", getflags(&f));
    push("fsgetxattr +i", fsxattr(&f, None));
    push("open O_WRONLY", open_flags(&f, libc::O_WRONLY));
    push(
        "open O_RDONLY|O_TRUNC",
        open_flags(&f, libc::O_RDONLY | libc::O_TRUNC),
    );
    push("open O_RDONLY", open_flags(&f, libc::O_RDONLY));
    push("append", append(&f, b"more"));
    push(
        "truncate",
        res(fs::File::open(&f).and_then(|_| {
            let c = cpath(&f);
            // SAFETY: valid C string.
            if unsafe { libc::truncate(c.as_ptr(), 0) } < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        })),
    );
    push(
        "chmod",
        res(fs::set_permissions(
            &f,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )),
    );
    push("utimes now", utimes_now(&f));
    push("unlink", res(fs::remove_file(&f)));
    push("rename away", res(fs::rename(&f, root.join("g"))));
    push("link", res(fs::hard_link(&f, root.join("h"))));
    push("setxattr", setxattr(&f, "user.a"));
    push("size", size_of(&f));
    push("set -i", setflags(&f, 0));
    push(
        "unlink after -i",
        res(fs::write(root.join("tmp"), b"").and_then(|_| fs::remove_file(root.join("tmp")))),
    );

    // Append-only file: only appends.
    push("set +a", setflags(&f, FS_APPEND_FL));
    push("open O_WRONLY", open_flags(&f, libc::O_WRONLY));
    push(
        "open O_WRONLY|O_APPEND",
        open_flags(&f, libc::O_WRONLY | libc::O_APPEND),
    );
    push(
        "open O_WRONLY|O_APPEND|O_TRUNC",
        open_flags(&f, libc::O_WRONLY | libc::O_APPEND | libc::O_TRUNC),
    );
    push("append", append(&f, b"more"));
    push("size after append", size_of(&f));
    push("utimes now", utimes_now(&f));
    push(
        "chmod",
        res(fs::set_permissions(
            &f,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )),
    );
    push(
        "fallocate keep size",
        fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 8192),
    );
    push(
        "fallocate punch",
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        ),
    );
    push("unlink", res(fs::remove_file(&f)));
    push("setxattr", setxattr(&f, "user.a"));
    push("set -a", setflags(&f, 0));

    // Immutable and append-only directories.
    push("dir set +i", setflags(&d, FS_IMMUTABLE_FL));
    push("create in +i dir", res(fs::write(d.join("new"), b"")));
    push("unlink in +i dir", res(fs::remove_file(d.join("inside"))));
    push("mkdir in +i dir", res(fs::create_dir(d.join("sub"))));
    push("rename into +i dir", res(fs::rename(&f, d.join("moved"))));
    push("dir set +a", setflags(&d, FS_APPEND_FL));
    push("create in +a dir", res(fs::write(d.join("new"), b"")));
    push("unlink in +a dir", res(fs::remove_file(d.join("new"))));
    push(
        "rename out of +a dir",
        res(fs::rename(d.join("inside"), root.join("out"))),
    );
    push("dir set 0", setflags(&d, 0));
    push("unlink after", res(fs::remove_file(d.join("new"))));

    // The other flags, their round trip and the kernel's refusals.
    let e = root.join("empty");
    fs::write(&e, b"").unwrap();
    push("empty +C", setflags(&e, FS_NOCOW_FL));
    push("empty flags", getflags(&e));
    push("empty +C +c", setflags(&e, FS_NOCOW_FL | FS_COMPR_FL));
    push("empty +c", setflags(&e, FS_COMPR_FL));
    push("empty -C", setflags(&e, 0));
    push("empty +c again", setflags(&e, FS_COMPR_FL));
    push("empty flags", getflags(&e));
    push(
        "compression prop",
        res(common::compare::get_xattr(&e, "btrfs.compression".as_ref())),
    );
    push("empty +m", setflags(&e, FS_NOCOMP_FL));
    push(
        "compression prop after +m",
        res(common::compare::get_xattr(&e, "btrfs.compression".as_ref())),
    );
    push("file with data +C", setflags(&f, FS_NOCOW_FL));
    push("file with data flags", getflags(&f));
    push(
        "file +dsA",
        setflags(&f, FS_NODUMP_FL | FS_SYNC_FL | FS_NOATIME_FL),
    );
    push("file flags", getflags(&f));
    push("unknown flag", setflags(&f, 0x0100_0000));
    push("dir +C", setflags(&d, FS_NOCOW_FL));
    fs::write(d.join("child"), b"").unwrap();
    fs::create_dir(d.join("childdir")).unwrap();
    push("inherited by file", getflags(&d.join("child")));
    push("inherited by dir", getflags(&d.join("childdir")));
    push("symlink getflags", getflags(&root.join("sym")));

    // xfs_io's path: FS_IOC_FSSETXATTR.
    push(
        "fsx +i",
        fsxattr(&e, Some((FS_XFLAG_IMMUTABLE | FS_XFLAG_NODUMP, 0))),
    );
    push("fsx after", fsxattr(&e, None));
    push("getflags after fsx", getflags(&e));
    push("fsx extsize", fsxattr(&e, Some((FS_XFLAG_EXTSIZE, 4096))));
    push("fsx clear", fsxattr(&e, Some((0, 0))));
    push("fsx +a", fsxattr(&e, Some((FS_XFLAG_APPEND, 0))));
    push("getflags after fsx +a", getflags(&e));
    o
}

fn check_image(img: &Path) {
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
        out.status.success() && !text.contains("ERROR"),
        "btrfs check failed:\n{text}"
    );
}

/// Run `probe` on a ubtrfs mount and on a kernel mount of identical fresh images; the
/// observations must match line by line; the ubtrfs image must pass btrfs check, and
/// `reread` (run on the kernel's mount of the ubtrfs image, and on the kernel's own image)
/// must see the same.
fn against_kernel(name: &str, probe: fn(&Path) -> Vec<String>, reread: fn(&Path) -> Vec<String>) {
    require_fuse_env();
    let t = TestDir::new(name);
    let ui = t.join("ubtrfs.img");
    let ki = t.join("kernel.img");
    mkfs_image(&ui, &Mkfs::default());
    mkfs_image(&ki, &Mkfs::default());
    let mnt = t.mkdir("mnt");
    let m = Mount::with_options(&ui, &mnt, "rw");
    let ours = probe(&mnt);
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
    let k = LoopMount::new(&ki, &mnt, "");
    let kernel = probe(&mnt);
    let kernel_reread = reread(&mnt);
    k.unmount();
    eprintln!("{name} on ubtrfs:\n{}", ours.join("\n"));
    let diffs: Vec<String> = ours
        .iter()
        .zip(&kernel)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("ubtrfs {a}\nkernel {b}"))
        .collect();
    assert_eq!(ours.len(), kernel.len());
    assert!(
        diffs.is_empty(),
        "{name}: differences from the kernel:\n{}",
        diffs.join("\n")
    );
    check_image(&ui);
    let k = LoopMount::new(&ui, &mnt, "ro");
    let ours_reread = reread(&mnt);
    k.unmount();
    assert_eq!(
        ours_reread, kernel_reread,
        "{name}: the kernel reads ubtrfs's image differently"
    );
}

fn reread_flags(root: &Path) -> Vec<String> {
    ["f", "d", "empty", "d/child", "d/childdir"]
        .iter()
        .map(|p| format!("{p}: {}", getflags(&root.join(p))))
        .collect()
}

// Test scenario: chattr/lsattr and xfs_io chattr on files, directories and symlinks, and every
// operation on immutable and append-only files and directories, answer as the kernel's btrfs
// does; the flags ubtrfs stores read back the same through the kernel; btrfs check is clean.
#[test]
fn inode_flags_match_kernel() {
    against_kernel("inode_flags", probe_inode_flags, reread_flags);
}

fn stat_line(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(p) {
        Ok(m) => format!(
            "mode {:o} rdev {:#x} size {} nlink {} uid {}",
            m.mode(),
            m.rdev(),
            m.size(),
            m.nlink(),
            m.uid()
        ),
        Err(e) => res::<()>(Err(e)),
    }
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> String {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid C strings; renameat2 has no other pointer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        last_errno()
    } else {
        "ok".into()
    }
}

/// Rename semantics: RENAME_WHITEOUT, an open directory replaced by rename, and readdir of a
/// directory whose entries are renamed during the listing.
fn probe_rename(root: &Path) -> Vec<String> {
    let mut o = Vec::new();
    let mut push = |what: &str, r: String| o.push(format!("{what}: {r}"));
    const RENAME_NOREPLACE: u32 = 1;
    const RENAME_EXCHANGE: u32 = 2;
    const RENAME_WHITEOUT: u32 = 4;

    fs::write(root.join("w1"), b"whiteout me").unwrap();
    fs::write(root.join("w3"), b"target").unwrap();
    push(
        "whiteout rename",
        renameat2(&root.join("w1"), &root.join("w2"), RENAME_WHITEOUT),
    );
    push("whiteout left", stat_line(&root.join("w1")));
    push("renamed", stat_line(&root.join("w2")));
    push(
        "whiteout over target",
        renameat2(&root.join("w2"), &root.join("w3"), RENAME_WHITEOUT),
    );
    push(
        "whiteout over existing whiteout",
        renameat2(&root.join("w3"), &root.join("w1"), RENAME_WHITEOUT),
    );
    push("w1 after", stat_line(&root.join("w1")));
    push("w3 after", stat_line(&root.join("w3")));
    push(
        "whiteout|exchange",
        renameat2(
            &root.join("w1"),
            &root.join("w3"),
            RENAME_WHITEOUT | RENAME_EXCHANGE,
        ),
    );
    push(
        "whiteout|noreplace",
        renameat2(
            &root.join("w1"),
            &root.join("w3"),
            RENAME_WHITEOUT | RENAME_NOREPLACE,
        ),
    );
    push("unlink whiteout", res(fs::remove_file(root.join("w3"))));

    // fstat of an open directory that a rename replaced (generic/035).
    for (a, b) in [("d1", "d2"), ("f1", "f2")] {
        let (pa, pb) = (root.join(a), root.join(b));
        if a.starts_with('d') {
            fs::create_dir(&pa).unwrap();
            fs::create_dir(&pb).unwrap();
        } else {
            fs::write(&pa, b"a").unwrap();
            fs::write(&pb, b"b").unwrap();
        }
        let held = open_ro(&pb).unwrap();
        push(
            &format!("rename {a} over open {b}"),
            res(fs::rename(&pa, &pb)),
        );
        push(
            &format!("fstat of replaced {b}"),
            res(held.metadata().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.nlink(), m.is_dir())
            })),
        );
        drop(held);
        push(
            &format!("{b} now"),
            stat_line(&pb)
                .split(" size")
                .next()
                .unwrap_or("")
                .to_string(),
        );
    }

    // readdir while every entry is renamed (generic/736): no name twice, no more entries
    // than exist.
    let big = root.join("big");
    fs::create_dir(&big).unwrap();
    const N: usize = 3000;
    for i in 0..N {
        fs::write(big.join(format!("file-{i:05}")), b"").unwrap();
    }
    let c = cpath(&big);
    // SAFETY: valid C string; the stream is closed below.
    let dirp = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!dirp.is_null());
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    let mut renamed = false;
    loop {
        // SAFETY: dirp is an open stream.
        let e = unsafe { libc::readdir(dirp) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        if name == "." || name == ".." {
            continue;
        }
        total += 1;
        seen.insert(name);
        if !renamed {
            renamed = true;
            for i in 0..N {
                let from = big.join(format!("file-{i:05}"));
                let _ = fs::rename(&from, big.join(format!("renamed-{i:05}")));
            }
        }
    }
    // SAFETY: dirp is open and not used afterwards.
    unsafe { libc::closedir(dirp) };
    push(
        "readdir during renames: a name twice",
        (seen.len() != total).to_string(),
    );
    push(
        "readdir during renames: more than exist",
        (total > N).to_string(),
    );
    o
}

fn reread_rename(root: &Path) -> Vec<String> {
    [
        "w1",
        "w2",
        "w3",
        "d2",
        "f2",
        "big/renamed-00000",
        "big/file-00000",
    ]
    .iter()
    .map(|p| format!("{p}: {}", stat_line(&root.join(p))))
    .collect()
}

// Test scenario: renameat2 RENAME_WHITEOUT leaves a 0:0 character device as the kernel does
// (also over an existing target, refused with EXCHANGE/NOREPLACE); fstat of an open file or
// directory that a rename replaced still works with nlink 0; readdir of a directory whose
// entries are all renamed mid-listing returns no name twice and no more entries than exist.
// The kernel reads the whiteout and the renamed tree from ubtrfs's image as from its own.
#[test]
fn rename_semantics_match_kernel() {
    against_kernel("rename", probe_rename, reread_rename);
}

/// `name_to_handle_at(AT_FDCWD, p)`: the handle as `struct file_handle` bytes.
fn handle_of(p: &Path) -> Result<Vec<u8>, String> {
    let c = cpath(p);
    let mut buf = vec![0u8; 8 + 128];
    buf[..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: buf holds a struct file_handle with room for 128 handle bytes, as handle_bytes
    // says; mount_id is a valid int.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(buf)
    }
}

/// `open_by_handle_at` relative to the mount `root`: the opened file's type and content.
fn open_handle(root: &Path, h: &Result<Vec<u8>, String>) -> String {
    let Ok(h) = h else {
        return "no handle".into();
    };
    let mnt = open_ro(root).unwrap();
    let mut h = h.clone();
    // SAFETY: h is a struct file_handle filled by name_to_handle_at.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mnt.as_raw_fd(),
            h.as_mut_ptr(),
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return last_errno();
    }
    // SAFETY: fd was just opened and is owned by the File from here on.
    let f = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let m = f.metadata().unwrap();
    if m.is_dir() {
        "dir".into()
    } else {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut &f, &mut s);
        format!(
            "file {s:?} nlink {}",
            std::os::unix::fs::MetadataExt::nlink(&m)
        )
    }
}

/// File handles: taken, caches dropped (the kernel forgets the inodes), then opened again;
/// also after renames, for an unlinked file (stale) and for one still open when unlinked.
fn probe_handles(root: &Path) -> Vec<String> {
    let mut o = Vec::new();
    let d = root.join("h");
    fs::create_dir(&d).unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("f"), b"content").unwrap();
    fs::write(d.join("gone"), b"x").unwrap();
    fs::write(d.join("held"), b"held").unwrap();
    let names = ["", "h", "h/sub", "h/f", "h/gone", "h/held"];
    let handles: Vec<_> = names.iter().map(|n| handle_of(&root.join(n))).collect();
    for (n, h) in names.iter().zip(&handles) {
        o.push(format!(
            "handle of /{n}: {}",
            if h.is_ok() { "ok" } else { "failed" }
        ));
    }
    let held = open_ro(&d.join("held")).unwrap();
    fs::remove_file(d.join("gone")).unwrap();
    fs::remove_file(d.join("held")).unwrap();
    fs::rename(d.join("f"), d.join("sub/f2")).unwrap();
    fs::rename(d.join("sub"), root.join("sub2")).unwrap();
    common::mount::drop_caches();
    for (n, h) in names.iter().zip(&handles) {
        o.push(format!(
            "open /{n} after drop_caches: {}",
            open_handle(root, h)
        ));
    }
    o.push(format!(
        "root st_ino after reconnecting: {}",
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(root).unwrap())
    ));
    drop(held);
    common::mount::drop_caches();
    o.push(format!(
        "open /h/held after close: {}",
        open_handle(root, &handles[5])
    ));
    o
}

fn reread_nothing(_: &Path) -> Vec<String> {
    Vec::new()
}

// Test scenario: file handles of the root, directories and files open again by handle after
// the kernel dropped its caches, also after the files and directories were renamed; an
// unlinked file's handle is stale, one of a file still open is not until it is closed. As on
// the kernel's btrfs.
#[test]
fn file_handles_match_kernel() {
    against_kernel("handles", probe_handles, reread_nothing);
}

/// An ACL in the VFS's xattr form from (tag, perm, id) entries.
fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut b = 2u32.to_le_bytes().to_vec();
    for &(t, p, i) in entries {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&p.to_le_bytes());
        b.extend_from_slice(&i.to_le_bytes());
    }
    b
}

fn set_xattr_value(p: &Path, name: &str, v: &[u8]) -> String {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of v.len() bytes.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r < 0 {
        last_errno()
    } else {
        "ok".into()
    }
}

fn mode_and_acls(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mode = fs::metadata(p).map(|m| format!("{:o}", m.mode()));
    let a = common::compare::get_xattr(p, "system.posix_acl_access".as_ref());
    let d = common::compare::get_xattr(p, "system.posix_acl_default".as_ref());
    format!("mode {} access {} default {}", res(mode), res(a), res(d))
}

/// POSIX ACLs: inheritance of a default ACL by new files and directories (with the umask
/// ignored), setting an access ACL sets the mode (and one equivalent to the mode is not
/// kept), chmod rewrites the ACL.
fn probe_acls(root: &Path) -> Vec<String> {
    const U: u32 = u32::MAX;
    let mut o = Vec::new();
    // SAFETY: umask has no preconditions; the test's own umask, restored below.
    let old_umask = unsafe { libc::umask(0o027) };
    let a = root.join("acl");
    fs::create_dir(&a).unwrap();
    let def = acl_bytes(&[
        (1, 7, U),
        (2, 7, 1000),
        (4, 5, U),
        (0x10, 7, U),
        (0x20, 5, U),
    ]);
    o.push(format!(
        "set default: {}",
        set_xattr_value(&a, "system.posix_acl_default", &def)
    ));
    fs::write(a.join("f"), b"").unwrap();
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/g"), b"").unwrap();
    let c = cpath(&a.join("node"));
    // SAFETY: valid C string.
    unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | 0o666, 0) };
    for n in ["f", "d", "d/g", "node"] {
        o.push(format!("{n}: {}", mode_and_acls(&a.join(n))));
    }
    let plain = root.join("plain");
    fs::write(&plain, b"").unwrap();
    o.push(format!("without default ACL: {}", mode_and_acls(&plain)));
    let base = acl_bytes(&[(1, 6, U), (4, 4, U), (0x20, 0, U)]);
    o.push(format!(
        "set base-only access ACL: {}",
        set_xattr_value(&plain, "system.posix_acl_access", &base)
    ));
    o.push(format!("after: {}", mode_and_acls(&plain)));
    let named = acl_bytes(&[
        (1, 7, U),
        (2, 6, 1000),
        (4, 4, U),
        (0x10, 6, U),
        (0x20, 1, U),
    ]);
    o.push(format!(
        "set named access ACL: {}",
        set_xattr_value(&plain, "system.posix_acl_access", &named)
    ));
    o.push(format!("after: {}", mode_and_acls(&plain)));
    o.push(format!(
        "chmod 640: {}",
        res(fs::set_permissions(
            &plain,
            std::os::unix::fs::PermissionsExt::from_mode(0o640)
        ))
    ));
    o.push(format!("after: {}", mode_and_acls(&plain)));
    o.push(format!(
        "default ACL on a file: {}",
        set_xattr_value(&plain, "system.posix_acl_default", &def)
    ));
    // SAFETY: restores the umask saved above.
    unsafe { libc::umask(old_umask) };
    o
}

fn reread_acls(root: &Path) -> Vec<String> {
    ["acl", "acl/f", "acl/d", "acl/d/g", "plain"]
        .iter()
        .map(|p| format!("{p}: {}", mode_and_acls(&root.join(p))))
        .collect()
}

// Test scenario: POSIX ACLs kept in step with the mode bits as the kernel's btrfs keeps them:
// default ACL inheritance on create (umask ignored), mode from a set access ACL, an ACL
// equivalent to the mode not stored, chmod rewriting the ACL's mask; the kernel reads the
// same modes and ACLs from ubtrfs's image.
#[test]
fn posix_acls_match_kernel() {
    against_kernel("acls", probe_acls, reread_acls);
}

const FITRIM: libc::c_ulong = 0xc018_5879;

/// FITRIM on the mount with (start, len, minlen): "ok" with the bytes trimmed, or the errno.
fn fitrim(root: &Path, start: u64, len: u64) -> Result<u64, String> {
    let f = open_ro(root).map_err(|e| res::<()>(Err(e)))?;
    let mut r = [start, len, 0u64];
    // SAFETY: FITRIM reads and writes a 24-byte struct fstrim_range; `r` is one.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FITRIM, r.as_mut_ptr()) };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(r[1])
    }
}

/// FITRIM argument checks as btrfs makes them, and a trim that leaves the data alone.
fn probe_fitrim(root: &Path) -> Vec<String> {
    let mut o = Vec::new();
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    fs::write(root.join("data"), &data).unwrap();
    for (what, s, l) in [
        ("len 0", 0, 0),
        ("len below sector", 0, 100),
        ("start 2^64-1", u64::MAX, u64::MAX),
        ("start 2^64-1 len 1M", u64::MAX, 1 << 20),
        ("start+len overflow", u64::MAX - 4096, 1 << 20),
        ("whole fs", 0, u64::MAX),
        ("from 10M", 10 << 20, u64::MAX),
    ] {
        o.push(format!(
            "{what}: {}",
            fitrim(root, s, l)
                .map(|_| "ok".to_string())
                .unwrap_or_else(|e| e)
        ));
    }
    o.push(format!(
        "data intact: {}",
        fs::read(root.join("data")).unwrap() == data
    ));
    o
}

// Test scenario: FITRIM refuses what btrfs refuses (length 0 or below a sector, start 2^64-1,
// an overflowing range) and trims otherwise; ubtrfs discards unallocated device space, so
// the image file shrinks on disk, its data reads back the same through the kernel, and
// btrfs check is clean.
#[test]
fn fitrim_matches_kernel() {
    against_kernel("fitrim", probe_fitrim, reread_fitrim);
    // The bytes: ubtrfs trims a fresh image's unallocated space (most of it).
    require_fuse_env();
    let t = TestDir::new("fitrim_bytes");
    let img = t.join("img");
    mkfs_image(&img, &Mkfs::default());
    let blocks = || std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&img).unwrap());
    // mkfs.btrfs wrote only its metadata, so fill the unallocated space first.
    {
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        let junk = vec![0xa5u8; 1 << 20];
        for mib in [200u64, 300, 400] {
            std::os::unix::fs::FileExt::write_all_at(&f, &junk, mib << 20).unwrap();
        }
    }
    let before = blocks();
    let mnt = t.mkdir("mnt");
    let m = Mount::with_options(&img, &mnt, "rw");
    let trimmed = fitrim(&mnt, 0, u64::MAX);
    let exit = m.unmount();
    assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
    let trimmed = trimmed.unwrap();
    assert!(
        trimmed > 256 << 20,
        "trimmed only {trimmed} bytes of a 512 MiB image"
    );
    assert!(
        blocks() + 3 * 2048 <= before,
        "the junk stayed: {before} -> {} blocks",
        blocks()
    );
    check_image(&img);
}

fn reread_fitrim(root: &Path) -> Vec<String> {
    vec![format!(
        "data: {}",
        res(fs::read(root.join("data")).map(|d| d.len()))
    )]
}

/// In a child running as uid/gid 65534 (not in the file's group), open `p` for writing and
/// do `op`: 0 = write one byte at the end, 1 = fallocate keeping the size, 2 = punch a hole.
fn as_nobody(p: &Path, op: i32) -> String {
    let c = cpath(p);
    // SAFETY: the child only makes async-signal-safe system calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain system calls on values owned by this (child) process.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                libc::_exit(2);
            }
            let fd = libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_APPEND);
            if fd < 0 {
                libc::_exit(3);
            }
            let r = match op {
                0 => (libc::write(fd, b"x".as_ptr().cast(), 1) == 1) as i32 - 1,
                1 => libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 16),
                _ => libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                ),
            };
            libc::_exit(if r == 0 { 0 } else { 4 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    format!("child exit {}", libc::WEXITSTATUS(status))
}

/// setuid/setgid bits after a write or fallocate by an unprivileged user outside the group
/// (`file_remove_privs`), for group-executable and non-executable files.
fn probe_privs(root: &Path) -> Vec<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut o = Vec::new();
    for (op, name) in [(0, "write"), (1, "fallocate"), (2, "punch")] {
        for mode in [0o2666, 0o2676, 0o4666, 0o6777, 0o2660] {
            let f = root.join(format!("{name}-{mode:o}"));
            fs::write(&f, vec![1u8; 8192]).unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            let r = as_nobody(&f, op);
            let after = fs::metadata(&f).map(|m| format!("{:o}", m.mode() & 0o7777));
            o.push(format!("{name} on {mode:o}: {r}, mode {}", res(after)));
        }
    }
    o
}

// Test scenario: a write, fallocate or hole punch by an unprivileged caller outside the
// file's group clears setuid and setgid as the kernel's btrfs does (file_remove_privs), also
// the setgid of a file without group execute, which FUSE's kernel side leaves to the daemon.
#[test]
fn remove_privs_matches_kernel() {
    against_kernel("privs", probe_privs, reread_nothing);
}

/// Unmounts (lazily) on drop whatever is still mounted at its path.
struct Unmounter(std::path::PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        if common::mount::mount_at(&self.0).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

// Test scenario: mounting an image that a ubtrfs daemon already serves gives a second view of
// the same filesystem, as a second kernel mount of a mounted btrfs does (one superblock): a
// write through one mount is seen through the other, a read-only second mount refuses
// writes, the first mount can go while the second stays usable, the daemon ends with the last
// mount, and btrfs check is clean.
#[test]
fn second_mount_shares_the_daemon() {
    require_fuse_env();
    let t = TestDir::new("second_mount");
    let img = t.join("img");
    mkfs_image(&img, &Mkfs::default());
    let (m1, m2, m3) = (t.mkdir("m1"), t.mkdir("m2"), t.mkdir("m3"));
    let first = Mount::with_options(&img, &m1, "rw");
    let _g2 = Unmounter(m2.clone());
    let _g3 = Unmounter(m3.clone());
    let again = |mnt: &Path, opts: &str| {
        common::run_with_timeout(
            Command::new(common::UBTRFS)
                .args(["mount", "-o", opts])
                .arg(&img)
                .arg(mnt),
            std::time::Duration::from_secs(60),
        )
        .expect("second ubtrfs mount hung")
    };
    let out = again(&m2, "rw");
    assert!(
        out.status.success(),
        "second mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = again(&m3, "ro");
    assert!(
        out.status.success(),
        "read-only mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(m1.join("a"), b"through m1").unwrap();
    assert_eq!(fs::read(m2.join("a")).unwrap(), b"through m1");
    fs::write(m2.join("b"), b"through m2").unwrap();
    assert_eq!(fs::read(m1.join("b")).unwrap(), b"through m2");
    assert_eq!(fs::read(m3.join("b")).unwrap(), b"through m2");
    assert_eq!(res(fs::write(m3.join("c"), b"")), errno_name(libc::EROFS));
    // The first mount goes; the daemon stays for the others.
    assert!(Command::new("umount").arg(&m1).status().unwrap().success());
    fs::write(m2.join("c"), b"after m1 went").unwrap();
    assert!(Command::new("umount").arg(&m3).status().unwrap().success());
    assert!(Command::new("umount").arg(&m2).status().unwrap().success());
    let exit = first.unmount();
    assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
    check_image(&img);
    let k = LoopMount::new(&img, &m1, "ro");
    assert_eq!(fs::read(m1.join("c")).unwrap(), b"after m1 went");
    k.unmount();
}

fn times(p: &Path) -> (i64, i64, i64, i64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).unwrap();
    (
        m.atime(),
        m.atime_nsec(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Which of atime, mtime, ctime changed between two `times`.
fn changed(a: (i64, i64, i64, i64, i64, i64), b: (i64, i64, i64, i64, i64, i64)) -> String {
    format!(
        "atime {} mtime {} ctime {}",
        (a.0, a.1) != (b.0, b.1),
        (a.2, a.3) != (b.2, b.3),
        (a.4, a.5) != (b.4, b.5)
    )
}

/// relatime (the default): the first read after a change updates atime, the next does not;
/// a directory listing updates the directory's atime the same way; ctime never moves.
fn probe_atime(root: &Path) -> Vec<String> {
    let pause = || std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut o = Vec::new();
    let f = root.join("f");
    fs::write(&f, b"aaa").unwrap();
    let d = root.join("d");
    fs::create_dir(&d).unwrap();
    let (t0, d0) = (times(&f), times(&d));
    pause();
    fs::read(&f).unwrap();
    let _ = fs::read_dir(&d).unwrap().count();
    let (t1, d1) = (times(&f), times(&d));
    o.push(format!("first read: {}", changed(t0, t1)));
    o.push(format!("first listing: {}", changed(d0, d1)));
    pause();
    fs::read(&f).unwrap();
    let _ = fs::read_dir(&d).unwrap().count();
    o.push(format!("second read: {}", changed(t1, times(&f))));
    o.push(format!("second listing: {}", changed(d1, times(&d))));
    pause();
    fs::write(&f, b"bbb").unwrap();
    let t2 = times(&f);
    pause();
    fs::read(&f).unwrap();
    let t3 = times(&f);
    o.push(format!("read after a write: {}", changed(t2, t3)));
    o
}

// Test scenario: atime follows relatime as on the kernel's btrfs (FUSE leaves atime to the
// daemon): the first read or listing after a change updates it, a second one does not, mtime
// and ctime never move on reads; the kernel reads the same atimes back from the image.
#[test]
fn atime_matches_kernel() {
    against_kernel("atime", probe_atime, reread_nothing);
}

const FS_IOC_GETFSLABEL: libc::c_ulong = 0x8100_9431;
const FS_IOC_SETFSLABEL: libc::c_ulong = 0x4100_9432;

fn get_label(root: &Path) -> String {
    let f = open_ro(root).unwrap();
    let mut b = [0u8; 256];
    // SAFETY: FS_IOC_GETFSLABEL writes 256 bytes into `b`.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFSLABEL, b.as_mut_ptr()) } < 0 {
        return last_errno();
    }
    let n = b.iter().position(|&c| c == 0).unwrap_or(256);
    format!("{:?}", String::from_utf8_lossy(&b[..n]))
}

fn set_label(root: &Path, l: &[u8]) -> String {
    let f = open_ro(root).unwrap();
    let mut b = [0u8; 256];
    b[..l.len()].copy_from_slice(l);
    // SAFETY: FS_IOC_SETFSLABEL reads 256 bytes from `b`.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFSLABEL, b.as_ptr()) } < 0 {
        return last_errno();
    }
    "ok".into()
}

/// The superblock's label as the device holds it now (written by the commit the ioctl makes).
fn label_on_disk(root: &Path) -> String {
    let dev = common::mount::mountinfo()
        .into_iter()
        .rfind(|m| m.target == root)
        .map(|m| m.source)
        .unwrap_or_default();
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-super"])
        .arg(&dev)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("label").map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// FS_IOC_GETFSLABEL/SETFSLABEL: set, read back, on disk at once, clear, too long.
fn probe_label(root: &Path) -> Vec<String> {
    vec![
        format!("initial: {}", get_label(root)),
        format!("set: {}", set_label(root, b"label.test")),
        format!("get: {}", get_label(root)),
        format!("on disk: {}", label_on_disk(root)),
        format!("set 255 bytes: {}", set_label(root, &[b'o'; 255])),
        format!("get: {}", get_label(root).len()),
        format!("set 256 bytes: {}", set_label(root, &[b'o'; 256])),
        format!("clear: {}", set_label(root, b"")),
        format!("get: {}", get_label(root)),
        format!("set again: {}", set_label(root, b"again")),
    ]
}

fn reread_label(root: &Path) -> Vec<String> {
    vec![get_label(root)]
}

// Test scenario: the filesystem label ioctls answer as on the kernel's btrfs (255 bytes at
// most, EINVAL beyond), a new label is on disk as soon as the ioctl returns, and the kernel
// reads the label ubtrfs wrote; btrfs check is clean.
#[test]
fn fs_label_matches_kernel() {
    against_kernel("label", probe_label, reread_label);
}

/// Times at the edges btrfs holds, set with utimensat and read back with stat.
fn probe_times(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let f = root.join("t");
    fs::write(&f, b"").unwrap();
    let c = cpath(&f);
    let mut o = Vec::new();
    for (sec, nsec) in [
        (i64::MIN, 0),
        (i64::MAX, 0),
        (-1, 999_999_999),
        (-315_619_200, 500_000_000),
        (1 << 40, 1),
    ] {
        let ts = [
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            },
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            },
        ];
        // SAFETY: valid path and two timespecs.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
        let got = fs::metadata(&f).map(|m| (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec()));
        o.push(format!(
            "set {sec}.{nsec:09}: {} -> {}",
            if r == 0 { "ok".into() } else { last_errno() },
            res(got)
        ));
    }
    o
}

fn reread_times(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    vec![res(
        fs::metadata(root.join("t")).map(|m| (m.atime(), m.atime_nsec(), m.mtime()))
    )]
}

// Test scenario: utimensat with the earliest and latest times btrfs holds (-2^63 and 2^63-1
// seconds) and with times before 1970 that carry nanoseconds read back as on the kernel's
// btrfs (fuser's conversion of such times is compensated, and the daemon does not panic), and
// the kernel reads them from ubtrfs's image.
#[test]
fn extreme_times_match_kernel() {
    against_kernel("times", probe_times, reread_times);
}

fn blocks(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    res(fs::metadata(p).map(|m| m.blocks()))
}

/// Write `len` bytes of `byte` at `off` through a shared mapping of `p` (which must be at
/// least `off + len` long), then unmap it.
fn mmap_write(p: &Path, off: usize, len: usize, byte: u8) -> String {
    let f = match fs::OpenOptions::new().read(true).write(true).open(p) {
        Ok(f) => f,
        Err(e) => return res::<()>(Err(e)),
    };
    // SAFETY: a fresh shared mapping of `off + len` bytes of a file that long; nothing else
    // maps it in this process.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            off + len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if a == libc::MAP_FAILED {
        return last_errno();
    }
    // SAFETY: `a` maps `off + len` writable bytes; the range written is inside it, and the
    // mapping is unmapped once, right after.
    unsafe {
        std::ptr::write_bytes(a.cast::<u8>().add(off), byte, len);
        libc::munmap(a, off + len);
    }
    "ok".into()
}

/// st_blocks of files with data not yet written back (the kernel counts the new delalloc
/// bytes, `btrfs_getattr`), and of the same files after a sync: appends, sparse writes, a
/// small (inline) file, an mmap write into a truncated file (generic/614), overwrites of
/// written and preallocated data, and a truncate of unwritten data.
fn probe_blocks(root: &Path) -> Vec<String> {
    let mut o = Vec::new();
    let names = ["a", "sparse", "small", "mm", "over", "pre", "trunc"];
    let p = |n: &str| root.join(n);
    fs::write(p("a"), vec![0xa1; 65536]).unwrap();
    o.push(format!("64 KiB written: {}", blocks(&p("a"))));
    let f = fs::File::create(p("sparse")).unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    o.push(format!("1 MiB truncated: {}", blocks(&p("sparse"))));
    o.push(format!("4 KiB at 512 KiB: {}", {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(p("sparse"))
            .unwrap();
        f.write_all_at(&[0x5a; 4096], 512 << 10).unwrap();
        f.write_all_at(&[0x5b; 100], (768 << 10) + 10).unwrap();
        blocks(&p("sparse"))
    }));
    fs::write(p("small"), vec![0x33; 1000]).unwrap();
    o.push(format!("1000 bytes: {}", blocks(&p("small"))));
    let f = fs::File::create(p("mm")).unwrap();
    f.set_len(65536).unwrap();
    drop(f);
    o.push(format!(
        "mmap write: {} {}",
        mmap_write(&p("mm"), 0, 65536, 0xab),
        blocks(&p("mm"))
    ));
    fs::write(p("over"), vec![1; 65536]).unwrap();
    fs::write(p("trunc"), vec![2; 65536]).unwrap();
    o.push(format!(
        "truncated to 8 KiB before writeback: {} {}",
        {
            let f = fs::OpenOptions::new().write(true).open(p("trunc")).unwrap();
            res(f.set_len(8192))
        },
        blocks(&p("trunc"))
    ));
    fs::write(p("pre"), b"").unwrap();
    o.push(format!(
        "fallocate 64 KiB: {} {}",
        fallocate(&p("pre"), 0, 0, 65536),
        blocks(&p("pre"))
    ));
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(p("pre")).unwrap();
        f.write_all_at(&[7; 8192], 4096).unwrap();
    }
    o.push(format!(
        "8 KiB into the preallocated range: {}",
        blocks(&p("pre"))
    ));
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    for n in names {
        o.push(format!("{n} after sync: {}", blocks(&p(n))));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(p("over")).unwrap();
        f.write_all_at(&[9; 8192], 16384).unwrap();
        f.write_all_at(&[9; 4096], 65536).unwrap();
    }
    o.push(format!(
        "8 KiB overwritten, 4 KiB appended: {}",
        blocks(&p("over"))
    ));
    // SAFETY: as above.
    unsafe { libc::sync() };
    o.push(format!("over after sync: {}", blocks(&p("over"))));
    o
}

fn reread_blocks(root: &Path) -> Vec<String> {
    ["a", "sparse", "small", "mm", "over", "pre", "trunc"]
        .iter()
        .map(|n| format!("{n}: {}", blocks(&root.join(n))))
        .collect()
}

// Test scenario: st_blocks counts data written but not yet written back over holes, as the
// kernel's btrfs does (new delalloc bytes): right after writes, mmap writes, sparse writes and
// a truncate the counts match the kernel's, and overwrites of written or preallocated data
// add nothing; after a sync they match again, and the kernel reads the same counts back.
#[test]
fn st_blocks_of_unwritten_data_match_kernel() {
    against_kernel("st_blocks", probe_blocks, reread_blocks);
}
