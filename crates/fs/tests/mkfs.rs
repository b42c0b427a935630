//! `ubtrfs mkfs` against the oracles: `btrfs check --readonly` (no errors, no warnings),
//! ubtrfs's own read-only open, and a read-write kernel loop mount that must keep a file across
//! unmount and leave a filesystem that still checks clean.
//!
//! Needs root (loop devices, mount), btrfs-progs and util-linux. A missing tool fails the test
//! with a message; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use ubtrfs_format::csum::CsumType;
use ubtrfs_format::items::bg_flags;
use ubtrfs_format::super_block::{compat_ro, incompat};
use ubtrfs_fs::mkfs::{mkfs, MkfsOptions};
use ubtrfs_fs::{FsInfo, MountOptions};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Run `cmd`, failing loudly when the tool is missing; returns (exit ok, stdout + stderr).
fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} (install btrfs-progs / util-linux; tests need root): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "ubtrfs-mkfs-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loop device attached to an image; detached on drop (also while unwinding).
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach(image: &Path) -> Self {
        let (ok, out) = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        assert!(ok, "losetup --find --show {}: {out}", image.display());
        LoopDev {
            dev: out.trim().to_string(),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let (ok, out) = run("losetup", &["-d", &self.dev]);
        if !ok && !std::thread::panicking() {
            panic!("losetup -d {}: {out}", self.dev);
        }
    }
}

/// A kernel mount of a loop device; unmounted on drop, before the loop device is detached
/// (field order: the mount is dropped first).
struct KernelMount {
    dir: PathBuf,
    mounted: bool,
    _loop: LoopDev,
}

impl KernelMount {
    fn new(image: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let lo = LoopDev::attach(image);
        let (ok, out) = run("mount", &[&lo.dev, dir.to_str().unwrap()]);
        assert!(
            ok,
            "kernel mount of {} ({}) failed: {out}\n{}",
            image.display(),
            lo.dev,
            dmesg_tail()
        );
        KernelMount {
            dir: dir.to_path_buf(),
            mounted: true,
            _loop: lo,
        }
    }

    fn unmount(&mut self) {
        if self.mounted {
            let (ok, out) = run("umount", &[self.dir.to_str().unwrap()]);
            assert!(ok, "umount {}: {out}", self.dir.display());
            self.mounted = false;
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run("umount", &[self.dir.to_str().unwrap()]);
        }
    }
}

fn dmesg_tail() -> String {
    let (_, out) = run("dmesg", &[]);
    let lines: Vec<&str> = out.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// `btrfs check --readonly` exits 0 and prints no ERROR and no warning line, in the original
/// and in the lowmem mode (they verify differently).
fn assert_check_clean(image: &Path, when: &str) {
    for mode in ["--mode=original", "--mode=lowmem"] {
        let (ok, out) = run(
            "btrfs",
            &["check", "--readonly", mode, image.to_str().unwrap()],
        );
        let bad: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("ERROR") || l.to_ascii_lowercase().contains("warning"))
            .collect();
        assert!(
            ok && bad.is_empty(),
            "btrfs check {mode} {} ({when}) failed:\n{out}",
            image.display()
        );
        assert!(out.contains("no error found"), "{out}");
    }
}

/// ubtrfs opens the image read-only; the superblock says what mkfs was asked for and the
/// root directory of the default subvolume is empty.
fn assert_ubtrfs_reads(image: &Path, opts: &MkfsOptions, total_bytes: u64) {
    let fs = FsInfo::open(image, MountOptions::default())
        .unwrap_or_else(|e| panic!("FsInfo::open {}: {e}", image.display()));
    let sb = &fs.sb;
    assert_eq!(sb.csum_type().unwrap(), opts.csum);
    assert_eq!(sb.nodesize, opts.nodesize);
    assert_eq!(sb.sectorsize, 4096);
    assert_eq!(sb.total_bytes, total_bytes);
    assert_eq!(sb.generation, 1);
    assert_eq!(sb.label, opts.label);
    assert_eq!(
        sb.incompat_flags,
        incompat::MIXED_BACKREF
            | incompat::EXTENDED_IREF
            | incompat::SKINNY_METADATA
            | incompat::NO_HOLES
    );
    let mut want_ro = compat_ro::FREE_SPACE_TREE | compat_ro::FREE_SPACE_TREE_VALID;
    if opts.block_group_tree {
        want_ro |= compat_ro::BLOCK_GROUP_TREE;
    }
    assert_eq!(sb.compat_ro_flags, want_ro);
    assert_eq!(sb.cache_generation, 0);
    assert_eq!(sb.uuid_tree_generation, 1);
    assert_eq!(fs.mount_root, 5);
    let root = ubtrfs_fs::inode::read_inode(&fs, 5, 256).unwrap();
    assert_eq!(root.mode & 0o170000, 0o040000);
    assert_eq!(root.nlink, 1);
    let entries = ubtrfs_fs::dir_item::readdir(&fs, 5, 256, 0, 100).unwrap();
    assert!(
        entries.is_empty(),
        "root dir not empty: {} entries",
        entries.len()
    );
}

/// The kernel mounts read-write, a file written there survives unmount and a second mount,
/// and btrfs check still passes afterwards.
fn assert_kernel_roundtrip(image: &Path, dir: &Path) {
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut m = KernelMount::new(image, dir);
        // Scrub reads every allocated block, both DUP copies, against its checksum.
        let (ok, out) = run("btrfs", &["scrub", "start", "-B", dir.to_str().unwrap()]);
        assert!(ok && out.contains("no errors found"), "scrub: {out}");
        std::fs::write(dir.join("hello"), b"written by the kernel\n").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/data"), &payload).unwrap();
        m.unmount();
    }
    assert_check_clean(image, "after a kernel read-write mount");
    {
        let mut m = KernelMount::new(image, dir);
        assert_eq!(
            std::fs::read(dir.join("hello")).unwrap(),
            b"written by the kernel\n"
        );
        assert_eq!(std::fs::read(dir.join("sub/data")).unwrap(), payload);
        m.unmount();
    }
}

fn mkfs_and_verify(csum: CsumType, nodesize: u32, size: u64, kernel: bool) {
    let tmp = TempDir::new(&format!("{}-{nodesize}-{}", csum.name(), size / MIB));
    let image = tmp.path("fs.img");
    let opts = MkfsOptions {
        size: Some(size),
        csum,
        nodesize,
        label: format!("ubtrfs-{}-{nodesize}", csum.name()),
        ..Default::default()
    };
    let report = mkfs(&image, &opts).unwrap_or_else(|e| panic!("mkfs {opts:?}: {e}"));
    assert_eq!(report.total_bytes, size);
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), size);
    {
        use std::os::unix::fs::MetadataExt;
        // Sparse: only what was written is allocated.
        assert!(meta.blocks() * 512 < 16 * MIB, "image is not sparse");
    }
    assert_check_clean(&image, "fresh");
    assert_ubtrfs_reads(&image, &opts, size);
    if kernel {
        assert_kernel_roundtrip(&image, &tmp.path("mnt"));
    }
}

// Test scenario: crc32c at nodesizes 4096/16384/65536 on 128 MiB, 1 GiB and 8 GiB sparse
// images: check clean, ubtrfs reads an empty root, the kernel mounts read-write and keeps a
// file, check clean again.
#[test]
fn crc32c_matrix() {
    for nodesize in [4096, 16384, 65536] {
        for size in [128 * MIB, GIB, 8 * GIB] {
            mkfs_and_verify(CsumType::Crc32c, nodesize, size, true);
        }
    }
}

// Test scenario: as crc32c_matrix with xxhash64.
#[test]
fn xxhash_matrix() {
    for nodesize in [4096, 16384, 65536] {
        for size in [128 * MIB, GIB, 8 * GIB] {
            mkfs_and_verify(CsumType::Xxhash64, nodesize, size, true);
        }
    }
}

// Test scenario: as crc32c_matrix with sha256.
#[test]
fn sha256_matrix() {
    for nodesize in [4096, 16384, 65536] {
        for size in [128 * MIB, GIB, 8 * GIB] {
            mkfs_and_verify(CsumType::Sha256, nodesize, size, true);
        }
    }
}

// Test scenario: as crc32c_matrix with blake2b.
#[test]
fn blake2_matrix() {
    for nodesize in [4096, 16384, 65536] {
        for size in [128 * MIB, GIB, 8 * GIB] {
            mkfs_and_verify(CsumType::Blake2b, nodesize, size, true);
        }
    }
}

// Test scenario: the chunk tree as dump-tree shows it for the 1 GiB default image has the
// layout mkfs.btrfs 6.2 makes (DATA single 8 MiB at 13 MiB, SYSTEM DUP at 21 MiB, METADATA
// DUP 53673984 at 29 MiB) and the free space tree leaves out the 64 MiB superblock copy.
#[test]
fn layout_matches_mkfs_btrfs() {
    let tmp = TempDir::new("layout");
    let image = tmp.path("fs.img");
    let r = mkfs(&image, &MkfsOptions::default()).unwrap();
    assert_eq!(r.total_bytes, GIB, "a new image defaults to 1 GiB");
    let flags: Vec<(u64, u64, u64)> = r
        .chunks
        .iter()
        .map(|c| (c.logical, c.length, c.flags))
        .collect();
    assert_eq!(
        flags,
        vec![
            (13 * MIB, 8 * MIB, bg_flags::DATA),
            (21 * MIB, 8 * MIB, bg_flags::SYSTEM | bg_flags::DUP),
            (29 * MIB, 53_673_984, bg_flags::METADATA | bg_flags::DUP),
        ]
    );
    let (ok, chunk) = run(
        "btrfs",
        &[
            "inspect-internal",
            "dump-tree",
            "-t",
            "chunk",
            image.to_str().unwrap(),
        ],
    );
    assert!(ok, "{chunk}");
    assert!(
        chunk.contains("devid 1 total_bytes 1073741824 bytes_used 132513792"),
        "{chunk}"
    );
    assert!(
        chunk.contains("stripe 1 devid 1 offset 30408704"),
        "{chunk}"
    );
    let (ok, fst) = run(
        "btrfs",
        &[
            "inspect-internal",
            "dump-tree",
            "-t",
            "10",
            image.to_str().unwrap(),
        ],
    );
    assert!(ok, "{fst}");
    // The superblock copy at device offset 64 MiB is logical 29 MiB + (64 - 37) MiB.
    let sb_logical = 29 * MIB + 27 * MIB;
    assert!(
        fst.contains(&format!(
            "FREE_SPACE_EXTENT {}",
            sb_logical - (30408704 + 8 * 16384)
        )),
        "{fst}"
    );
    assert!(
        fst.contains(&format!("({} FREE_SPACE_EXTENT", sb_logical + 65536)),
        "{fst}"
    );
    let (ok, sup) = run(
        "btrfs",
        &[
            "inspect-internal",
            "dump-super",
            "-a",
            image.to_str().unwrap(),
        ],
    );
    assert!(ok, "{sup}");
    // Primary and the 64 MiB mirror both exist and verify; no 256 GiB mirror on 1 GiB.
    assert_eq!(sup.matches("[match]").count(), 2 * 3, "{sup}");
    assert!(sup.contains("superblock: bytenr=67108864"), "{sup}");
}

// Test scenario: an existing file keeps its size when --size is not given, a previous
// mkfs.btrfs filesystem on it is replaced (new fsid, check clean), and the block-group-tree
// opt-in produces a filesystem that checks clean and mounts.
#[test]
fn existing_file_and_block_group_tree() {
    let tmp = TempDir::new("existing");
    let image = tmp.path("fs.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(300 * MIB).unwrap();
    drop(f);
    let (ok, out) = run("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()]);
    assert!(ok, "mkfs.btrfs: {out}");
    let old = FsInfo::open(&image, MountOptions::default())
        .unwrap()
        .sb
        .fsid;
    let opts = MkfsOptions {
        block_group_tree: true,
        nodesize: 4096,
        label: "L".repeat(255),
        ..Default::default()
    };
    let r = mkfs(&image, &opts).unwrap();
    assert_eq!(r.total_bytes, 300 * MIB);
    assert_ne!(r.fsid, old);
    assert_check_clean(&image, "over an old mkfs.btrfs image");
    assert_ubtrfs_reads(&image, &opts, 300 * MIB);
    assert_kernel_roundtrip(&image, &tmp.path("mnt"));
}

// Test scenario: mkfs on a block device (a loop device over a 200 MiB file) uses the device
// size; the result checks clean through the backing file.
#[test]
fn block_device() {
    let tmp = TempDir::new("blockdev");
    let image = tmp.path("backing.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(200 * MIB).unwrap();
    drop(f);
    {
        let lo = LoopDev::attach(&image);
        let r = mkfs(Path::new(&lo.dev), &MkfsOptions::default()).unwrap();
        assert_eq!(r.total_bytes, 200 * MIB);
        // A size beyond the device is refused.
        let big = MkfsOptions {
            size: Some(400 * MIB),
            ..Default::default()
        };
        assert!(mkfs(Path::new(&lo.dev), &big).is_err());
    }
    assert_check_clean(&image, "made on a block device");
    assert_ubtrfs_reads(&image, &MkfsOptions::default(), 200 * MIB);
}

// Test scenario: bad options are refused before anything is created: too small, bad node
// sizes, an over-long label; a refused new image is not left behind.
#[test]
fn refusals() {
    let tmp = TempDir::new("refuse");
    let image = tmp.path("fs.img");
    for opts in [
        MkfsOptions {
            size: Some(64 * MIB),
            ..Default::default()
        },
        MkfsOptions {
            nodesize: 2048,
            ..Default::default()
        },
        MkfsOptions {
            nodesize: 24576,
            ..Default::default()
        },
        MkfsOptions {
            nodesize: 131072,
            ..Default::default()
        },
        MkfsOptions {
            label: "x".repeat(256),
            ..Default::default()
        },
    ] {
        assert!(mkfs(&image, &opts).is_err(), "{opts:?} accepted");
        assert!(!image.exists(), "{opts:?} left an image behind");
    }
}

// Test scenario: for sizes from the minimum to 300 GiB (metadata chunk 32 MiB, 10% of the
// device, 256 MiB, 1 GiB above 50 GiB), ubtrfs mkfs's chunk and dev trees are what mkfs.btrfs
// makes on a file of the same size, uuids aside.
#[test]
fn chunk_tree_matches_mkfs_btrfs() {
    let tmp = TempDir::new("vs-progs");
    let normalized = |image: &Path, tree: &str| {
        let (ok, out) = run(
            "btrfs",
            &[
                "inspect-internal",
                "dump-tree",
                "-t",
                tree,
                image.to_str().unwrap(),
            ],
        );
        assert!(ok, "{out}");
        // Everything but the leaf header (address, generation) and the random uuids.
        out.lines()
            .map(str::trim)
            .filter(|l| {
                !l.starts_with("leaf ")
                    && !l.starts_with("btrfs-progs")
                    && !l.contains("uuid")
                    && !l.contains("fsid")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    for size in [
        ubtrfs_fs::mkfs::min_dev_size(),
        120_000_000,
        700 * MIB,
        3 * GIB,
        50 * GIB + 4096,
        300 * GIB,
    ] {
        let theirs = tmp.path("progs.img");
        let ours = tmp.path("ours.img");
        for p in [&theirs, &ours] {
            let _ = std::fs::remove_file(p);
            std::fs::File::create(p).unwrap().set_len(size).unwrap();
        }
        let (ok, out) = run("mkfs.btrfs", &["-q", "-f", theirs.to_str().unwrap()]);
        assert!(ok, "mkfs.btrfs on {size} bytes: {out}");
        mkfs(&ours, &MkfsOptions::default()).unwrap();
        for tree in ["chunk", "dev"] {
            assert_eq!(
                normalized(&theirs, tree),
                normalized(&ours, tree),
                "{tree} tree, size {size}"
            );
        }
    }
}

// Test scenario: a 300 GiB sparse image gets all three superblock copies (64 KiB, 64 MiB,
// 256 GiB), each verifying with its own bytenr; check passes and the kernel mounts it.
#[test]
fn third_superblock_copy() {
    let tmp = TempDir::new("300g");
    let image = tmp.path("fs.img");
    let opts = MkfsOptions {
        size: Some(300 * GIB),
        csum: CsumType::Xxhash64,
        ..Default::default()
    };
    mkfs(&image, &opts).unwrap();
    let (ok, sup) = run(
        "btrfs",
        &[
            "inspect-internal",
            "dump-super",
            "-a",
            image.to_str().unwrap(),
        ],
    );
    assert!(ok, "{sup}");
    assert!(sup.contains("superblock: bytenr=274877906944"), "{sup}");
    assert_eq!(sup.matches("[match]").count(), 3 * 3, "{sup}");
    assert_check_clean(&image, "300 GiB");
    assert_ubtrfs_reads(&image, &opts, 300 * GIB);
    assert_kernel_roundtrip(&image, &tmp.path("mnt"));
}
