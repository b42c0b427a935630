//! Transaction abort (issue 4, "Failure behaviour"): an error while writing metadata or data
//! aborts the running transaction and turns the mount read-only (EROFS for every later
//! write, as the kernel's `btrfs_abort_transaction` and `BTRFS_FS_STATE_ERROR`); the last
//! committed state stays intact for btrfs check, the kernel and the next ubtrfs mount.

mod common;

use common::oracle::{btrfs_check, mkfs_btrfs, pattern, KernelMount};
use common::TestDir;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use ubtrfs_fs::inode::btrfs_new_inode;
use ubtrfs_fs::{FsError, FsInfo, MountOptions};

/// An image file whose writes start failing with EIO once `budget` bytes have been written
/// (a disk that dies, or a full thin pool): the write that would cross the budget fails whole.
#[derive(Debug)]
struct FailingDevice {
    file: File,
    budget: AtomicU64,
    failed: AtomicU64,
}

impl FailingDevice {
    fn open(img: &Path) -> (Arc<FailingDevice>, u64) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(img)
            .unwrap();
        let size = file.metadata().unwrap().len();
        (
            Arc::new(FailingDevice {
                file,
                budget: AtomicU64::new(u64::MAX),
                failed: AtomicU64::new(0),
            }),
            size,
        )
    }
}

impl ubtrfs_ctree::BlockDevice for FailingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let n = buf.len() as u64;
        let ok = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(n))
            .is_ok();
        if !ok {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        ..MountOptions::default()
    }
}

fn lookup(fs: &FsInfo, root: u64, dir: u64, name: &str) -> Option<u64> {
    match ubtrfs_fs::dir_item::lookup(fs, root, dir, name.as_bytes()) {
        Ok(ubtrfs_fs::dir_item::Target::Inode { ino, .. }) => Some(ino),
        Err(FsError::NotFound) => None,
        other => panic!("{name}: {other:?}"),
    }
}

/// One committed file, then a failing device: `fail` makes the failure happen (a commit or a
/// writeback), after which the mount must be read-only and the committed state intact.
fn abort_case(name: &str, budget: u64, fail: impl FnOnce(&FsInfo, u64, u64) -> FsError) {
    let d = TestDir::new(name);
    let img = d.join("img");
    mkfs_btrfs(&img, 256 << 20, &[]);
    let kept = pattern(1, 300_000);
    {
        let (dev, size) = FailingDevice::open(&img);
        let fs = FsInfo::open_backend(dev.clone(), size, &img, rw()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let (a, _) = btrfs_new_inode(&fs, root, top, b"kept", 0o100644, 0, 0, 0).unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, a, 0, &kept).unwrap();
        fs.sync().unwrap();
        dev.budget.store(budget, Ordering::SeqCst);
        let e = fail(&fs, root, top);
        assert!(
            dev.failed.load(Ordering::SeqCst) > 0,
            "the device never failed: the test does not test what it says"
        );
        assert!(!matches!(e, FsError::ReadOnly), "first error {e}");
        assert!(fs.is_readonly(), "the mount must turn read-only after {e}");
        assert!(fs.aborted.load(Ordering::SeqCst));
        // Every later write says EROFS.
        assert!(matches!(
            btrfs_new_inode(&fs, root, top, b"later", 0o100644, 0, 0, 0),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, a, 0, b"x"),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(fs.commit(), Err(FsError::ReadOnly)));
        // Reads still work.
        assert!(lookup(&fs, root, top, "kept").is_some());
    }
    // The last commit is what is on disk.
    btrfs_check(&img);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        assert!(lookup(&fs, root, top, "lost").is_none());
        let a = lookup(&fs, root, top, "kept").unwrap();
        let ii = ubtrfs_fs::inode::read_inode(&fs, root, a).unwrap();
        let emi = fs.ems.inode(root, a);
        let got = ubtrfs_fs::file::read(&fs, root, a, &ii, &emi, 0, kept.len() as u32).unwrap();
        assert!(got == kept, "ubtrfs: committed content changed");
        // And it is writable again.
        btrfs_new_inode(&fs, root, top, b"again", 0o100644, 0, 0, 0).unwrap();
        fs.commit().unwrap();
    }
    btrfs_check(&img);
    let m = KernelMount::new(&img, &d.join("mnt"), "ro");
    assert!(std::fs::read(m.dir.join("kept")).unwrap() == kept);
    assert!(!m.dir.join("lost").exists());
    assert!(m.dir.join("again").exists());
}

// Test scenario: the device fails every write; the next commit (of a new file) fails while
// writing tree blocks: the transaction aborts, later writes get EROFS, and the image holds the
// previous commit.
#[test]
fn commit_write_error_aborts() {
    abort_case("abort-commit", 0, |fs, root, top| {
        btrfs_new_inode(fs, root, top, b"lost", 0o100644, 0, 0, 0).unwrap();
        fs.commit().unwrap_err()
    });
}

// Test scenario: the device fails after 100 KiB, in the middle of a commit's tree block
// writes (some new blocks reach the disk, the superblock does not).
#[test]
fn commit_write_error_midway_aborts() {
    abort_case("abort-midway", 100 << 10, |fs, root, top| {
        let (_, _) = btrfs_new_inode(fs, root, top, b"lost", 0o100644, 0, 0, 0).unwrap();
        for i in 0..400 {
            let n = format!("lost-{i:03}-a-longer-name-to-fill-several-leaves");
            btrfs_new_inode(fs, root, top, n.as_bytes(), 0o100644, 0, 0, 0).unwrap();
        }
        fs.commit().unwrap_err()
    });
}

// Test scenario: the device fails while writeback writes a file's data. Nothing refers to
// the extents reserved for it yet, so the transaction is not aborted (as in the kernel, where a
// data write error is reported to fsync, not an abort): the writeback returns the I/O error,
// the mount stays writable, the data stays dirty; once the device works again, sync writes it,
// and btrfs check, the kernel and a new mount see it.
#[test]
fn data_write_error_is_reported_without_abort() {
    let d = TestDir::new("data-eio");
    let img = d.join("img");
    mkfs_btrfs(&img, 256 << 20, &[]);
    let data = pattern(2, 3 << 20);
    {
        let (dev, size) = FailingDevice::open(&img);
        let fs = FsInfo::open_backend(dev.clone(), size, &img, rw()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let (b, _) = btrfs_new_inode(&fs, root, top, b"retried", 0o100644, 0, 0, 0).unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, b, 0, &data).unwrap();
        dev.budget.store(0, Ordering::SeqCst);
        let e = ubtrfs_fs::file_write::btrfs_writeback(&fs, root, b).unwrap_err();
        assert!(dev.failed.load(Ordering::SeqCst) > 0);
        assert!(!matches!(e, FsError::ReadOnly | FsError::NoSpace), "{e}");
        assert!(!fs.is_readonly(), "a data write error must not abort");
        // Readers still see the data (from the dirty buffer).
        let ii = ubtrfs_fs::inode::read_inode(&fs, root, b).unwrap();
        let emi = fs.ems.inode(root, b);
        let live = ubtrfs_format::items::InodeItem {
            size: data.len() as u64,
            ..ii
        };
        let got = ubtrfs_fs::file::read(&fs, root, b, &live, &emi, 0, data.len() as u32).unwrap();
        assert!(got == data, "dirty data lost after a failed writeback");
        dev.budget.store(u64::MAX, Ordering::SeqCst);
        fs.sync().unwrap();
    }
    btrfs_check(&img);
    {
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let b = lookup(&fs, root, top, "retried").unwrap();
        let ii = ubtrfs_fs::inode::read_inode(&fs, root, b).unwrap();
        let emi = fs.ems.inode(root, b);
        let got = ubtrfs_fs::file::read(&fs, root, b, &ii, &emi, 0, data.len() as u32).unwrap();
        assert!(got == data, "ubtrfs: content after the retried writeback");
    }
    let m = KernelMount::new(&img, &d.join("mnt"), "ro");
    assert!(std::fs::read(m.dir.join("retried")).unwrap() == data);
}

// Test scenario: an in-place write into preallocated space fails on the device: no abort, the
// writeback reports the error, the prealloc item is untouched, the write's extent map is gone
// (the kernel's btrfs_finish_one_ordered error path drops it, NOCOW or not) and the data stays
// dirty and readable; once the device works, sync writes it in place, and btrfs check, a new
// mount and the kernel see it.
#[test]
fn nocow_write_error_keeps_prealloc_and_data() {
    let d = TestDir::new("nocow-eio");
    let img = d.join("img");
    mkfs_btrfs(&img, 256 << 20, &[]);
    let data = pattern(3, 64 << 10);
    let mut want = vec![0u8; 1 << 20];
    want[..data.len()].copy_from_slice(&data);
    {
        let (dev, size) = FailingDevice::open(&img);
        let fs = FsInfo::open_backend(dev.clone(), size, &img, rw()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let (p, _) = btrfs_new_inode(&fs, root, top, b"pre", 0o100644, 0, 0, 0).unwrap();
        ubtrfs_fs::file_write::btrfs_fallocate(&fs, root, p, 0, 0, 1 << 20).unwrap();
        fs.sync().unwrap();
        ubtrfs_fs::file_write::btrfs_buffered_write(&fs, root, p, 0, &data).unwrap();
        dev.budget.store(0, Ordering::SeqCst);
        let e = ubtrfs_fs::file_write::btrfs_writeback(&fs, root, p).unwrap_err();
        assert!(dev.failed.load(Ordering::SeqCst) > 0);
        assert!(!matches!(e, FsError::ReadOnly | FsError::NoSpace), "{e}");
        assert!(!fs.is_readonly(), "a data write error must not abort");
        let emi = fs.ems.inode(root, p);
        assert!(
            emi.extent_maps()
                .iter()
                .all(|m| m.flags & ubtrfs_extent_map::flags::PINNED == 0),
            "the failed write's pinned map stayed: {:?}",
            emi.extent_maps()
        );
        let em = ubtrfs_fs::file::btrfs_get_extent(&fs, root, p, &emi, 0, 4096).unwrap();
        assert_ne!(em.flags & ubtrfs_extent_map::flags::PREALLOC, 0, "{em:?}");
        let ii = ubtrfs_fs::inode::read_inode(&fs, root, p).unwrap();
        let got = ubtrfs_fs::file::read(&fs, root, p, &ii, &emi, 0, 1 << 20).unwrap();
        assert!(got == want, "dirty data lost after a failed in-place write");
        dev.budget.store(u64::MAX, Ordering::SeqCst);
        fs.sync().unwrap();
        assert_eq!(
            fs.counters
                .prealloc_written_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            64 << 10
        );
    }
    btrfs_check(&img);
    {
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let top = fs.root(root).unwrap().item.root_dirid;
        let p = lookup(&fs, root, top, "pre").unwrap();
        let ii = ubtrfs_fs::inode::read_inode(&fs, root, p).unwrap();
        let emi = fs.ems.inode(root, p);
        let got = ubtrfs_fs::file::read(&fs, root, p, &ii, &emi, 0, 1 << 20).unwrap();
        assert!(got == want, "ubtrfs: content after the retried writeback");
    }
    let m = KernelMount::new(&img, &d.join("mnt"), "ro");
    assert!(std::fs::read(m.dir.join("pre")).unwrap() == want);
}
