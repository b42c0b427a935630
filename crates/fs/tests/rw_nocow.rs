//! In-place (NOCOW) writeback into preallocated extents and into the regular extents of
//! NODATACOW files, with the kernel as the oracle: a base image prepared on a kernel loop mount
//! (fallocate, chattr +C, a reflink) gets the same writes from the kernel and from ubtrfs; the
//! file extent items (disk_bytenr of the extents that existed, split prealloc items, types),
//! the data back references of those extents and the file contents must come out the same, and
//! `btrfs check --readonly` must be clean. A second test fsyncs such writes and "crashes"
//! (drops the FsInfo without a commit): the kernel and ubtrfs replay the log to the same
//! contents.

mod common;

use common::oracle::{btrfs_check, mkfs_btrfs, pattern, KernelMount};
use common::{require_tool, TestDir};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use ubtrfs_extent_map::flags as em_flags;
use ubtrfs_fs::dir_item::Target;
use ubtrfs_fs::file_write::{btrfs_buffered_write, btrfs_writeback};
use ubtrfs_fs::{FsInfo, MountOptions};

const IMG_SIZE: u64 = 512 << 20;
const K: u64 = 1024;

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        commit_interval: 3600,
        ..MountOptions::default()
    }
}

fn sh(dir: &Path, cmd: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "`{cmd}` failed in {}", dir.display());
}

/// The base image, made by the kernel:
/// - `p`: 1 MiB preallocated (size 1 MiB), checksummed;
/// - `pk`: 1 MiB preallocated with KEEP_SIZE (size 0);
/// - `c`: NODATACOW, 256 KiB written (one regular extent);
/// - `cp`: NODATACOW, 512 KiB preallocated;
/// - `s`, `s2`: NODATACOW, 64 KiB written to `s` and reflinked into `s2` (a shared extent);
/// - `r`: checksummed, 64 KiB written (regular, not NODATACOW).
fn base_image(d: &TestDir) -> std::path::PathBuf {
    base_image_sized(d, IMG_SIZE)
}

fn base_image_sized(d: &TestDir, size: u64) -> std::path::PathBuf {
    require_tool("losetup");
    require_tool("chattr");
    require_tool("fallocate");
    let img = d.join("base");
    mkfs_btrfs(&img, size, &[]);
    let m = KernelMount::new(&img, &d.join("mnt-base"), "rw");
    let dir = &m.dir;
    sh(
        dir,
        "fallocate -l 1M p && touch pk && fallocate -n -l 1M pk",
    );
    sh(dir, "touch c cp s && chattr +C c cp s");
    std::fs::write(dir.join("c"), pattern(1, 256 * K as usize)).unwrap();
    sh(dir, "fallocate -l 512K cp");
    std::fs::write(dir.join("s"), pattern(2, 64 * K as usize)).unwrap();
    sh(
        dir,
        "touch s2 && chattr +C s2 && cp --reflink=always s s2 && sync",
    );
    std::fs::write(dir.join("r"), pattern(3, 64 * K as usize)).unwrap();
    sh(dir, "sync");
    drop(m);
    btrfs_check(&img);
    img
}

/// (file, offset, length, seed): each write is written back on its own (the kernel side
/// calls fdatasync after each, ubtrfs writes back after each).
const WRITES: &[(&str, u64, u64, u64)] = &[
    // Middle of a prealloc extent: three items.
    ("p", 64 * K, 8 * K, 10),
    // Front of the extent: two items (nothing before to merge with).
    ("p", 0, 4 * K, 11),
    // Front of the rest, right after a written part of the same extent: that part grows.
    ("p", 4 * K, 4 * K, 12),
    // Back of a prealloc item, right before a written part of the same extent: that part
    // grows backwards over it.
    ("p", 56 * K, 8 * K, 21),
    // Between two written parts: all three merge into one REG item.
    ("p", 8 * K, 48 * K, 13),
    // Across the end of the prealloc extent into a hole past EOF: NOCOW piece + COW piece.
    ("p", 1020 * K, 8 * K, 14),
    // Beyond i_size into KEEP_SIZE preallocation.
    ("pk", 0, 4 * K, 15),
    // Overwrite of a NODATACOW file's regular extent: in place.
    ("c", 4 * K, 8 * K, 16),
    // NODATACOW file, prealloc extent.
    ("cp", 100 * K, 12 * K, 17),
    // NODATACOW but shared (reflinked): copy-on-write.
    ("s", 0, 4 * K, 18),
    // Regular extent of a checksummed file: copy-on-write as always.
    ("r", 8 * K, 4 * K, 19),
    // NODATACOW file, past its extent (a hole): COW piece, no inline extent.
    ("c", 300 * K, K, 20),
];

fn kernel_workload(img: &Path, d: &TestDir) -> BTreeMap<String, Vec<u8>> {
    let m = KernelMount::new(img, &d.join("mnt-kernel"), "rw");
    for &(name, off, len, seed) in WRITES {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir.join(name))
            .unwrap();
        f.write_all_at(&pattern(seed, len as usize), off).unwrap();
        f.sync_data().unwrap();
    }
    sh(&m.dir, "sync");
    let out = contents(&m.dir);
    drop(m);
    out
}

fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    ["p", "pk", "c", "cp", "s", "s2", "r"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
        .collect()
}

fn ino_of(fs: &FsInfo, name: &str) -> u64 {
    let root = fs.mount_root;
    let top = fs.root(root).unwrap().item.root_dirid;
    match ubtrfs_fs::dir_item::lookup(fs, root, top, name.as_bytes()).unwrap() {
        Target::Inode { ino, .. } => ino,
        _ => panic!("{name}"),
    }
}

/// One EXTENT_DATA item as dump-tree prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fe {
    ty: String,
    disk: u64,
    disk_nr: u64,
    off: u64,
    nr: u64,
    ram: u64,
}

fn dump(img: &Path, tree: &str) -> String {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-tree", "-t", tree])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "dump-tree -t {tree} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Item blocks of a dump: (key text, body lines).
fn items(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with("item ") {
            let key = t
                .split_once("key (")
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(k, _)| k.to_string())
                .unwrap_or_default();
            out.push((key, Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(t.to_string());
        }
    }
    out
}

fn num_after(line: &str, word: &str) -> u64 {
    opt_num_after(line, word).unwrap_or_else(|| panic!("no `{word}` in `{line}`"))
}

fn opt_num_after(line: &str, word: &str) -> Option<u64> {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == word {
            return it.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

/// The items of the subvolume log tree of a crash image (dump-tree prints it after the
/// "log tree key" line).
fn log_items(img: &Path) -> Vec<(String, Vec<String>)> {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "dump-tree"])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find("log tree key (TREE_LOG ROOT_ITEM 5)")
        .unwrap_or_else(|| panic!("no log tree in the crash image"));
    let rest = &text[start..];
    let end = rest.find("total bytes").unwrap_or(rest.len());
    items(&rest[..end])
}

/// (inode, file offset) -> item, from the fs tree.
fn file_extents(img: &Path) -> BTreeMap<(u64, u64), Fe> {
    let mut out = BTreeMap::new();
    for (key, body) in items(&dump(img, "5")) {
        let k: Vec<&str> = key.split_whitespace().collect();
        if k.len() != 3 || k[1] != "EXTENT_DATA" {
            continue;
        }
        let ino: u64 = k[0].parse().unwrap();
        let off: u64 = k[2].parse().unwrap();
        let ty = body[0]
            .split_once('(')
            .map(|(_, r)| r.trim_end_matches(')').to_string())
            .unwrap();
        let fe = if ty == "inline" {
            Fe {
                ty,
                disk: 0,
                disk_nr: 0,
                off: 0,
                nr: 0,
                ram: 0,
            }
        } else {
            Fe {
                ty,
                disk: num_after(&body[1], "byte"),
                disk_nr: num_after(&body[1], "nr"),
                off: num_after(&body[2], "offset"),
                nr: num_after(&body[2], "nr"),
                // dump-tree prints no ram_bytes for prealloc items.
                ram: opt_num_after(&body[2], "ram").unwrap_or(0),
            }
        };
        out.insert((ino, off), fe);
    }
    out
}

/// bytenr -> the extent item's refs and back references (generation left out), from the
/// extent tree.
fn data_refs(img: &Path) -> BTreeMap<u64, Vec<String>> {
    let mut out = BTreeMap::new();
    for (key, body) in items(&dump(img, "2")) {
        let k: Vec<&str> = key.split_whitespace().collect();
        if k.len() != 3 || k[1] != "EXTENT_ITEM" {
            continue;
        }
        let lines = body
            .iter()
            .filter(|l| l.starts_with("refs ") || l.contains("backref"))
            .map(|l| {
                let mut w: Vec<&str> = l.split_whitespace().collect();
                if let Some(i) = w.iter().position(|x| *x == "gen") {
                    w.drain(i..i + 2);
                }
                w.join(" ")
            })
            .collect();
        out.insert(k[0].parse().unwrap(), lines);
    }
    out
}

/// Extents that did not exist in the base image are named by order of appearance (the
/// allocators may place them differently).
fn normalized(
    fes: &BTreeMap<(u64, u64), Fe>,
    base: &BTreeSet<u64>,
) -> BTreeMap<(u64, u64), (Fe, bool)> {
    fes.iter()
        .map(|(k, fe)| {
            let old = fe.disk == 0 || base.contains(&fe.disk);
            let mut fe = fe.clone();
            if !old {
                fe.disk = 0;
            }
            (*k, (fe, old))
        })
        .collect()
}

// Test scenario: prealloc and NODATACOW files made by the kernel get the same writes from the
// kernel and from ubtrfs; item layout (same disk_bytenr for in-place writes, prealloc items
// split and merged as btrfs_mark_extent_written does), back references, contents, csum
// coverage (btrfs check) agree; the extent maps ubtrfs made carry the kernel's flags.
#[test]
fn nocow_writeback_matches_kernel() {
    let d = TestDir::new("nocow-kernel");
    let base = base_image(&d);
    let base_fes = file_extents(&base);
    let base_disk: BTreeSet<u64> = base_fes.values().map(|f| f.disk).collect();
    let kimg = d.join("kernel");
    let uimg = d.join("ubtrfs");
    std::fs::copy(&base, &kimg).unwrap();
    std::fs::copy(&base, &uimg).unwrap();
    let kernel_contents = kernel_workload(&kimg, &d);
    btrfs_check(&kimg);

    {
        let fs = FsInfo::open(&uimg, rw()).unwrap();
        let root = fs.mount_root;
        let maps_before: BTreeMap<&str, usize> = ["c"]
            .iter()
            .map(|n| {
                (
                    *n,
                    fs.ems.inode(root, ino_of(&fs, n)).modified_extents().len(),
                )
            })
            .collect();
        for &(name, off, len, seed) in WRITES {
            let ino = ino_of(&fs, name);
            btrfs_buffered_write(&fs, root, ino, off, &pattern(seed, len as usize)).unwrap();
            btrfs_writeback(&fs, root, ino).unwrap();
        }
        let ctr = &fs.counters;
        use std::sync::atomic::Ordering::Relaxed;
        // p: 8+4+4+56+4 KiB, pk: 4, cp: 12 into preallocation; c: 8 in place.
        assert_eq!(ctr.prealloc_written_bytes.load(Relaxed), 92 * K);
        assert_eq!(ctr.nocow_bytes.load(Relaxed), 8 * K);
        // A NOCOW overwrite of a regular extent creates no extent map.
        let c = fs.ems.inode(root, ino_of(&fs, "c"));
        let c_mod: Vec<_> = c
            .modified_extents()
            .into_iter()
            .filter(|m| m.start < 256 * K)
            .collect();
        assert_eq!(c_mod.len(), maps_before["c"], "maps of c: {c_mod:?}");
        // The written part of a prealloc extent: a REG map (no PREALLOC), unpinned, with the
        // transid, pointing into the old extent, on the modified list.
        let p_ino = ino_of(&fs, "p");
        let p = fs.ems.inode(root, p_ino);
        let get = |s: u64| ubtrfs_fs::file::btrfs_get_extent(&fs, root, p_ino, &p, s, 4 * K);
        let em = get(0).unwrap();
        assert_eq!(
            em.flags & (em_flags::PREALLOC | em_flags::PINNED),
            0,
            "{em:?}"
        );
        assert!(base_disk.contains(&em.disk_bytenr), "{em:?}");
        assert_ne!(em.generation, u64::MAX);
        assert!(p.modified_extents().iter().any(|m| m.start == em.start));
        let rest = get(200 * K).unwrap();
        assert_ne!(rest.flags & em_flags::PREALLOC, 0, "{rest:?}");
        fs.sync().unwrap();
    }
    btrfs_check(&uimg);

    let kfes = normalized(&file_extents(&kimg), &base_disk);
    let ufes = normalized(&file_extents(&uimg), &base_disk);
    let show = |m: &BTreeMap<(u64, u64), (Fe, bool)>| {
        m.iter()
            .map(|(k, v)| format!("{k:?} {v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        show(&ufes),
        show(&kfes),
        "file extent items differ (left ubtrfs, right kernel)"
    );
    let krefs = data_refs(&kimg);
    let urefs = data_refs(&uimg);
    for b in &base_disk {
        if *b == 0 {
            continue;
        }
        assert_eq!(urefs.get(b), krefs.get(b), "back references of extent {b}");
    }
    let m = KernelMount::new(&uimg, &d.join("mnt-check"), "ro");
    let got = contents(&m.dir);
    drop(m);
    for (name, want) in &kernel_contents {
        assert!(
            got[name] == *want,
            "content of {name} differs from the kernel's"
        );
    }
}

// Test scenario: writes into preallocated space of a checksummed file and over a NODATACOW
// file's extent, each fsynced, then a crash (no commit): the kernel and ubtrfs replay the log
// to the written contents; btrfs check is clean on the crash image (log included) and after.
#[test]
fn nocow_fsync_log_replay() {
    let d = TestDir::new("nocow-log");
    let base = base_image(&d);
    let img = d.join("crash");
    std::fs::copy(&base, &img).unwrap();
    let mut want = {
        let m = KernelMount::new(&base, &d.join("mnt-base-ro"), "ro");
        let c = contents(&m.dir);
        drop(m);
        c
    };
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        for (name, off, len, seed) in [
            ("p", 12 * K, 20 * K, 30u64),
            ("p", 512 * K, 4 * K, 31),
            ("cp", 0, 8 * K, 32),
            ("c", 128 * K, 16 * K, 33),
            ("pk", 4 * K, 4 * K, 34),
        ] {
            let ino = ino_of(&fs, name);
            let data = pattern(seed, len as usize);
            btrfs_buffered_write(&fs, root, ino, off, &data).unwrap();
            ubtrfs_fs::tree_log::btrfs_sync_file(&fs, root, ino).unwrap();
            let w = want.get_mut(name).unwrap();
            let end = (off + len) as usize;
            if w.len() < end {
                w.resize(end, 0);
            }
            w[off as usize..end].copy_from_slice(&data);
        }
        // Dropped without a commit: the superblock points at the log.
    }
    btrfs_check(&img);
    // What the log holds: the written parts of preallocated extents as REG items pointing into
    // those extents, their checksums only where the file has them, nothing for the in-place
    // overwrite of c's regular extent (no new extent map, as in the kernel).
    let base_fes = file_extents(&base);
    let inos = {
        let m = KernelMount::new(&base, &d.join("mnt-inos"), "ro");
        let inos: BTreeMap<String, u64> = ["p", "pk", "c", "cp"]
            .iter()
            .map(|n| {
                use std::os::unix::fs::MetadataExt;
                (
                    n.to_string(),
                    std::fs::metadata(m.dir.join(n)).unwrap().ino(),
                )
            })
            .collect();
        drop(m);
        inos
    };
    let extent_of = |name: &str| {
        base_fes
            .iter()
            .find(|((ino, _), _)| *ino == inos[name])
            .map(|(_, fe)| fe.disk)
            .unwrap()
    };
    let log = log_items(&img);
    let logged = |name: &str, off: u64| {
        log.iter()
            .find(|(k, _)| *k == format!("{} EXTENT_DATA {off}", inos[name]))
            .map(|(_, body)| body.join(" "))
    };
    for (name, off, len) in [
        ("p", 12 * K, 20 * K),
        ("p", 512 * K, 4 * K),
        ("cp", 0, 8 * K),
    ] {
        let body = logged(name, off).unwrap_or_else(|| panic!("{name}@{off} not logged"));
        let want = format!(
            "type 1 (regular) extent data disk byte {} nr",
            extent_of(name)
        );
        assert!(body.contains(&want), "{name}@{off}: {body}");
        assert!(
            body.contains(&format!("extent data offset {off} nr {len} ")),
            "{name}@{off}: {body}"
        );
    }
    assert!(
        logged("c", 128 * K).is_none(),
        "NOCOW overwrite logged an extent"
    );
    let csums: Vec<(u64, u64)> = log
        .iter()
        .filter(|(k, _)| k.starts_with("EXTENT_CSUM EXTENT_CSUM"))
        .map(|(_, b)| {
            let l = b.iter().find(|l| l.starts_with("range start")).unwrap();
            (num_after(l, "start"), num_after(l, "end"))
        })
        .collect();
    let covered = |a: u64, b: u64| csums.iter().any(|&(s, e)| s <= a && b <= e);
    let p_disk = extent_of("p");
    assert!(covered(p_disk + 12 * K, p_disk + 32 * K), "{csums:?}");
    assert!(covered(p_disk + 512 * K, p_disk + 516 * K), "{csums:?}");
    for name in ["c", "cp"] {
        let x = extent_of(name);
        assert!(
            !csums.iter().any(|&(s, e)| s < x + 256 * K && e > x),
            "{name} is NODATASUM but the log has checksums for it: {csums:?}"
        );
    }
    let kimg = d.join("crash-kernel");
    std::fs::copy(&img, &kimg).unwrap();
    let m = KernelMount::new(&kimg, &d.join("mnt-replay"), "rw");
    let got = contents(&m.dir);
    drop(m);
    btrfs_check(&kimg);
    for (name, w) in &want {
        assert!(got[name] == *w, "kernel replay: content of {name}");
    }
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        for (name, w) in &want {
            let root = fs.mount_root;
            let ino = ino_of(&fs, name);
            let ii = ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap();
            let emi = fs.ems.inode(root, ino);
            let got = ubtrfs_fs::file::read(&fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap();
            assert!(got == *w, "ubtrfs replay: content of {name}");
        }
        fs.sync().unwrap();
    }
    btrfs_check(&img);
}

// Test scenario: with data space used up (a file written until ENOSPC, synced), a write over a
// NODATACOW file's extent and a write into preallocated space still succeed (no data
// reservation is needed: btrfs_check_nocow_lock), a write that would need a new extent gets
// ENOSPC, a second write over the still dirty preallocated range gets EAGAIN (the kernel's
// answer), and a write running from a NODATACOW extent into a hole is cut short where the
// extent ends. Everything accepted is written back; btrfs check is clean and the kernel reads
// the same contents.
#[test]
fn nocow_writes_need_no_data_space() {
    let d = TestDir::new("nocow-enospc");
    let base = base_image_sized(&d, 160 << 20);
    let img = d.join("full");
    std::fs::copy(&base, &img).unwrap();
    let mut want = {
        let m = KernelMount::new(&base, &d.join("mnt-base-ro"), "ro");
        let c = contents(&m.dir);
        drop(m);
        c
    };
    let put = |want: &mut BTreeMap<String, Vec<u8>>, name: &str, off: u64, data: &[u8]| {
        let w = want.get_mut(name).unwrap();
        let end = off as usize + data.len();
        if w.len() < end {
            w.resize(end, 0);
        }
        w[off as usize..end].copy_from_slice(data);
    };
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let (filler, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, top, b"filler", 0o100644, 0, 0, 0)
                .unwrap();
        let chunk = pattern(40, (1 << 20) as usize);
        let mut off = 0u64;
        // 1 MiB writes until ENOSPC, then 4 KiB ones: no room for another sector is left.
        for step in [1 << 20, 4096] {
            let full = loop {
                match btrfs_buffered_write(&fs, root, filler, off, &chunk[..step]) {
                    Ok(n) => off += n as u64,
                    Err(e) => break e,
                }
                assert!(off < 1 << 30, "160 MiB never filled up");
            };
            assert!(matches!(full, ubtrfs_fs::FsError::NoSpace), "{full}");
        }
        fs.sync().unwrap();
        let write = |name: &str, off: u64, data: &[u8]| {
            btrfs_buffered_write(&fs, root, ino_of(&fs, name), off, data)
        };
        // Copy-on-write needs a new extent: no room.
        let e = write("r", 0, &pattern(41, 4096)).unwrap_err();
        assert!(matches!(e, ubtrfs_fs::FsError::NoSpace), "{e}");
        // In place: accepted whole.
        let c = pattern(42, 64 * K as usize);
        assert_eq!(write("c", 0, &c).unwrap(), c.len());
        put(&mut want, "c", 0, &c);
        let p = pattern(43, 128 * K as usize);
        assert_eq!(write("p", 256 * K, &p).unwrap(), p.len());
        put(&mut want, "p", 256 * K, &p);
        // Again over that data before its writeback: the kernel answers EAGAIN (a prealloc
        // range of a file without NODATACOW that holds dirty data, can_nocow_extent).
        let e = write("p", 380 * K, &pattern(45, 8192)).unwrap_err();
        assert!(matches!(e, ubtrfs_fs::FsError::Again), "{e}");
        // From the last 4 KiB of c's extent into the hole after it: cut where the extent ends.
        let tail = pattern(44, 8 * K as usize);
        assert_eq!(write("c", 252 * K, &tail).unwrap(), 4 * K as usize);
        put(&mut want, "c", 252 * K, &tail[..4 * K as usize]);
        for name in ["c", "p"] {
            btrfs_writeback(&fs, root, ino_of(&fs, name)).unwrap();
        }
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(fs.counters.nocow_bytes.load(Relaxed), 68 * K);
        assert_eq!(fs.counters.prealloc_written_bytes.load(Relaxed), 128 * K);
        fs.sync().unwrap();
        assert!(!fs.is_readonly());
    }
    btrfs_check(&img);
    let m = KernelMount::new(&img, &d.join("mnt-check"), "ro");
    let got = contents(&m.dir);
    drop(m);
    for (name, w) in &want {
        assert!(got[name] == *w, "content of {name}");
    }
}

// Test scenario: with the `nodatacow` mount option a new regular file gets NODATACOW and
// NODATASUM (lsattr on a kernel mount shows C) and its overwrites go in place; a file created
// without the option stays copy-on-write; btrfs check is clean and the kernel reads the data.
#[test]
fn nodatacow_mount_option() {
    let d = TestDir::new("nocow-mountopt");
    let img = d.join("img");
    mkfs_btrfs(&img, 256 << 20, &[]);
    let first = pattern(50, 64 * K as usize);
    let over = pattern(51, 4 * K as usize);
    let mut want_f = first.clone();
    want_f[8 * K as usize..12 * K as usize].copy_from_slice(&over);
    use std::sync::atomic::Ordering::Relaxed;
    for (name, nodatacow) in [("cow", false), ("f", true)] {
        let fs = FsInfo::open(&img, MountOptions { nodatacow, ..rw() }).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let (ino, ii) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, top, name.as_bytes(), 0o100644, 0, 0, 0)
                .unwrap();
        let want = ubtrfs_format::items::inode_flags::NODATACOW
            | ubtrfs_format::items::inode_flags::NODATASUM;
        assert_eq!(ii.flags & want, if nodatacow { want } else { 0 }, "{name}");
        btrfs_buffered_write(&fs, root, ino, 0, &first).unwrap();
        btrfs_writeback(&fs, root, ino).unwrap();
        fs.sync().unwrap();
        btrfs_buffered_write(&fs, root, ino, 8 * K, &over).unwrap();
        btrfs_writeback(&fs, root, ino).unwrap();
        let expect = if nodatacow { 4 * K } else { 0 };
        assert_eq!(fs.counters.nocow_bytes.load(Relaxed), expect, "{name}");
        fs.sync().unwrap();
    }
    btrfs_check(&img);
    let m = KernelMount::new(&img, &d.join("mnt"), "ro");
    let lsattr = Command::new("lsattr")
        .arg(m.dir.join("f"))
        .arg(m.dir.join("cow"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&lsattr.stdout).into_owned();
    let got_f = std::fs::read(m.dir.join("f")).unwrap();
    let got_cow = std::fs::read(m.dir.join("cow")).unwrap();
    drop(m);
    let attrs = |n: &str| {
        text.lines()
            .find(|l| l.ends_with(&format!("/{n}")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("lsattr: {text}"))
            .to_string()
    };
    assert!(attrs("f").contains('C'), "{text}");
    assert!(!attrs("cow").contains('C'), "{text}");
    assert!(got_f == want_f && got_cow == want_f);
}

// Test scenario: a NODATACOW file whose extent has checksums (written before the flag was set:
// the kernel's API cannot make one, so the flag is set under ubtrfs) is overwritten
// copy-on-write, never in place (csum_exist_in_range), and keeps reading right.
#[test]
fn nodatacow_with_checksums_is_cow() {
    let d = TestDir::new("nocow-csum");
    let img = d.join("img");
    mkfs_btrfs(&img, 256 << 20, &[]);
    let fs = FsInfo::open(&img, rw()).unwrap();
    let root = fs.mount_root;
    let top = fs.root(root).unwrap().item.root_dirid;
    let (ino, _) =
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, top, b"f", 0o100644, 0, 0, 0).unwrap();
    let mut want = pattern(52, 64 * K as usize);
    btrfs_buffered_write(&fs, root, ino, 0, &want).unwrap();
    btrfs_writeback(&fs, root, ino).unwrap();
    fs.write_op(|c| {
        let mut ii = c.read_inode(root, ino)?;
        ii.flags |= ubtrfs_format::items::inode_flags::NODATACOW;
        c.write_inode(root, ino, &ii)
    })
    .unwrap();
    fs.sync().unwrap();
    let emi = fs.ems.inode(root, ino);
    let before = ubtrfs_fs::file::btrfs_get_extent(&fs, root, ino, &emi, 0, 4 * K).unwrap();
    let over = pattern(53, 4 * K as usize);
    btrfs_buffered_write(&fs, root, ino, 16 * K, &over).unwrap();
    btrfs_writeback(&fs, root, ino).unwrap();
    want[16 * K as usize..20 * K as usize].copy_from_slice(&over);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(fs.counters.nocow_bytes.load(Relaxed), 0);
    let after = ubtrfs_fs::file::btrfs_get_extent(&fs, root, ino, &emi, 16 * K, 4 * K).unwrap();
    assert_ne!(
        after.disk_bytenr, before.disk_bytenr,
        "{after:?} vs {before:?}"
    );
    let ii = ubtrfs_fs::inode::read_inode(&fs, root, ino).unwrap();
    let got = ubtrfs_fs::file::read(&fs, root, ino, &ii, &emi, 0, u32::MAX).unwrap();
    assert!(got == want);
    fs.sync().unwrap();
    drop(fs);
    btrfs_check(&img);
}
