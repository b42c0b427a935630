//! Read-write mounts through FUSE: a seeded random workload applied both to a ubtrfs mount and
//! to a reference directory on the host; the trees must match live, after a remount, and
//! through the kernel's mount of the image; `btrfs check --readonly` must be clean after every
//! unmount. Run on ubtrfs's own mkfs image and on a mkfs.btrfs image.

mod common;

use common::compare::{diff, snapshot, CompareOptions};
use common::mount::{LoopMount, Mount};
use common::{check_image, require_fuse_env, require_tool, run_ok, seed_of, TestDir};
use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Paths (relative) of the entries that currently exist, by kind.
#[derive(Default)]
struct Model {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    links: Vec<PathBuf>,
}

/// Apply one random operation to both trees. The same call on both sides; errors must agree.
fn step(rng: &mut Rng, m: &mut Model, a: &Path, b: &Path, i: usize) {
    let pick = |rng: &mut Rng, v: &Vec<PathBuf>| -> Option<PathBuf> {
        (!v.is_empty()).then(|| v[rng.below(v.len() as u64) as usize].clone())
    };
    let dir = pick(rng, &m.dirs).unwrap_or_default();
    let both = |f: &dyn Fn(&Path) -> std::io::Result<()>| {
        let ra = f(a);
        let rb = f(b);
        assert_eq!(
            ra.as_ref().map_err(|e| e.raw_os_error()),
            rb.as_ref().map_err(|e| e.raw_os_error()),
            "step {i}: ubtrfs and the reference disagree"
        );
        ra.is_ok()
    };
    match rng.below(14) {
        0 | 1 => {
            let name = dir.join(format!("f{i}"));
            let n = rng.below(3) as usize * rng.below(70_000) as usize + rng.below(3000) as usize;
            let data = rng.bytes(n);
            if both(&|r| fs::write(r.join(&name), &data)) {
                m.files.push(name);
            }
        }
        2 => {
            let name = dir.join(format!("d{i}"));
            if both(&|r| fs::create_dir(r.join(&name))) {
                m.dirs.push(name);
            }
        }
        3 | 4 => {
            let Some(f) = pick(rng, &m.files) else { return };
            let off = rng.below(200_000);
            let n = rng.below(40_000) as usize + 1;
            let data = rng.bytes(n);
            both(&|r| {
                let mut h = fs::OpenOptions::new().write(true).open(r.join(&f))?;
                h.seek(SeekFrom::Start(off))?;
                h.write_all(&data)
            });
        }
        5 => {
            let Some(f) = pick(rng, &m.files) else { return };
            let len = rng.below(150_000);
            both(&|r| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(r.join(&f))?
                    .set_len(len)
            });
        }
        6 => {
            let Some(f) = pick(rng, &m.files) else { return };
            if both(&|r| fs::remove_file(r.join(&f))) {
                m.files.retain(|x| x != &f);
            }
        }
        7 => {
            let Some(f) = pick(rng, &m.files) else { return };
            let to = dir.join(format!("r{i}"));
            if both(&|r| fs::rename(r.join(&f), r.join(&to))) {
                m.files.retain(|x| x != &f);
                m.files.push(to);
            }
        }
        8 => {
            let (Some(f), Some(g)) = (pick(rng, &m.files), pick(rng, &m.files)) else {
                return;
            };
            if f == g {
                return;
            }
            if both(&|r| fs::rename(r.join(&f), r.join(&g))) {
                m.files.retain(|x| x != &f);
            }
        }
        9 => {
            let Some(f) = pick(rng, &m.files) else { return };
            let to = dir.join(format!("h{i}"));
            if both(&|r| fs::hard_link(r.join(&f), r.join(&to))) {
                m.files.push(to);
            }
        }
        10 => {
            let name = dir.join(format!("s{i}"));
            let target = format!("target-{}", "x".repeat(rng.below(300) as usize));
            if both(&|r| std::os::unix::fs::symlink(&target, r.join(&name))) {
                m.links.push(name);
            }
        }
        11 => {
            let Some(f) = pick(rng, &m.files) else { return };
            let mode = [0o600, 0o644, 0o755, 0o4711][rng.below(4) as usize];
            both(&|r| fs::set_permissions(r.join(&f), fs::Permissions::from_mode(mode)));
        }
        12 => {
            let Some(f) = pick(rng, &m.files) else { return };
            let name = format!("user.k{}", rng.below(4));
            let n = rng.below(200) as usize;
            let val = rng.bytes(n);
            both(&|r| {
                let p = std::ffi::CString::new(r.join(&f).as_os_str().as_encoded_bytes()).unwrap();
                let n = std::ffi::CString::new(name.as_str()).unwrap();
                // SAFETY: valid NUL-terminated strings and a buffer of the given length.
                let rc = unsafe {
                    libc::setxattr(p.as_ptr(), n.as_ptr(), val.as_ptr().cast(), val.len(), 0)
                };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        _ => {
            let Some(d) = pick(rng, &m.dirs) else { return };
            if both(&|r| fs::remove_dir(r.join(&d))) {
                m.dirs.retain(|x| x != &d);
            }
        }
    }
    if rng.below(20) == 0 {
        if let Some(f) = pick(rng, &m.files) {
            // fsync through the mount (tree-log or commit); the reference needs nothing.
            let h = fs::File::open(a.join(&f)).unwrap();
            h.sync_all().unwrap();
        }
    }
}

fn compare_opts() -> CompareOptions {
    CompareOptions {
        mtime: None,
        atime_ctime: false,
        root_attrs: false,
        same_image: false,
        inode_numbers: false,
        hardlinks: true,
        xattrs: true,
        owners: true,
    }
}

fn assert_trees(what: &str, reference: &Path, actual: &Path) {
    let d = diff(&snapshot(reference), &snapshot(actual), &compare_opts());
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

fn workload(name: &str, make: impl Fn(&Path)) {
    require_fuse_env();
    let t = TestDir::new(name);
    let img = t.join("image");
    make(&img);
    let reference = t.mkdir("reference");
    let mnt = t.mkdir("mnt");
    let mut rng = Rng(seed_of(name) | 1);
    let mut model = Model::default();
    for round in 0..2 {
        let m = Mount::with_options(&img, &mnt, "rw,commit=5");
        for i in 0..400 {
            step(&mut rng, &mut model, &mnt, &reference, round * 1000 + i);
        }
        assert_trees(&format!("{name} round {round} live"), &reference, &mnt);
        let exit = m.unmount();
        assert!(exit.is_clean_exit(), "daemon: {}", exit.describe());
        check_image(&img);
    }
    // Remount: the same tree.
    let m = Mount::with_options(&img, &mnt, "ro");
    assert_trees(&format!("{name} after remount"), &reference, &mnt);
    drop(m);
    // The kernel sees the same tree.
    let k = LoopMount::new(&img, &mnt, "ro");
    assert_trees(&format!("{name} kernel"), &reference, &mnt);
    k.unmount();
}

// Test scenario: 800 random operations (create, write, overwrite, truncate, unlink, rename,
// rename over, link, symlink, chmod, setxattr, mkdir, rmdir, fsync) on a ubtrfs-made image,
// mirrored on a host directory, over two mount cycles; compared live, after remount and through
// the kernel; btrfs check clean after each unmount.
#[test]
fn random_workload_on_ubtrfs_mkfs() {
    workload("rw-ubtrfs-mkfs", |img| {
        let exe = env!("CARGO_BIN_EXE_ubtrfs");
        run_ok(
            exe,
            &[
                OsStr::new("mkfs"),
                OsStr::new("-q"),
                OsStr::new("--size"),
                OsStr::new("1G"),
                img.as_os_str(),
            ],
        );
    });
}

// Test scenario: the same workload on a mkfs.btrfs image.
#[test]
fn random_workload_on_mkfs_btrfs() {
    workload("rw-mkfs-btrfs", |img| {
        require_tool("mkfs.btrfs");
        let f = fs::File::create(img).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        run_ok(
            "mkfs.btrfs",
            &[OsStr::new("-q"), OsStr::new("-f"), img.as_os_str()],
        );
    });
}
