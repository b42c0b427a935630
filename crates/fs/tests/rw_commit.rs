//! Read-write commits checked by the oracles: `btrfs check --readonly` and a kernel mount.

use std::path::{Path, PathBuf};
use std::process::Command;
use ubtrfs_fs::{FsInfo, MountOptions};

fn tmpdir(name: &str) -> PathBuf {
    let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("rw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkfs(img: &Path, size: u64, extra: &[&str]) {
    let f = std::fs::File::create(img).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let out = Command::new("mkfs.btrfs")
        .arg("-q")
        .arg("-f")
        .args(extra)
        .arg(img)
        .output()
        .expect("mkfs.btrfs must be installed");
    assert!(
        out.status.success(),
        "mkfs.btrfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `btrfs check --readonly` must exit 0 and report no error.
fn btrfs_check(img: &Path) {
    let out = Command::new("btrfs")
        .args(["check", "--readonly"])
        .arg(img)
        .output()
        .expect("btrfs-progs must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("ERROR") && text.contains("no error found"),
        "btrfs check failed:\n{text}"
    );
}

fn rw() -> MountOptions {
    MountOptions {
        readonly: false,
        ..MountOptions::default()
    }
}

/// A kernel loop mount, unmounted and detached on drop.
struct KernelMount {
    dir: PathBuf,
    dev: String,
}

impl KernelMount {
    fn new(img: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let st = Command::new("mount")
            .args(["-o", "ro", &dev])
            .arg(dir)
            .status()
            .unwrap();
        if !st.success() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            panic!("kernel mount of {} failed", img.display());
        }
        KernelMount {
            dir: dir.to_path_buf(),
            dev,
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

// Test scenario: on a fresh mkfs.btrfs image, ubtrfs creates files and directories in one
// transaction and commits; btrfs check finds no error, ubtrfs and the kernel both see the names.
#[test]
fn create_commit_check_and_kernel_mount() {
    let d = tmpdir("create");
    let img = d.join("img");
    mkfs(&img, 512 << 20, &[]);
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let (sub, _) =
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"subdir", 0o040755, 0, 0, 0)
                .unwrap();
        for i in 0..300 {
            let name = format!("file-{i:04}-with-a-longer-name-to-fill-leaves");
            ubtrfs_fs::inode::btrfs_new_inode(
                &fs,
                root,
                sub,
                name.as_bytes(),
                0o100644,
                0,
                1000,
                1000,
            )
            .unwrap();
        }
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"top", 0o100600, 0, 0, 0).unwrap();
        assert!(matches!(
            ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"top", 0o100600, 0, 0, 0),
            Err(ubtrfs_fs::FsError::Exists)
        ));
        let st = fs.commit().unwrap().expect("something to commit");
        assert!(st.blocks_written > 0);
        // Readers see the new state.
        let entries = ubtrfs_fs::dir_item::readdir(&fs, root, sub, 0, 1000).unwrap();
        assert_eq!(entries.len(), 300);
    }
    btrfs_check(&img);
    {
        let fs = FsInfo::open(&img, MountOptions::default()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let top = ubtrfs_fs::dir_item::readdir(&fs, root, dir, 0, 100).unwrap();
        let names: Vec<_> = top
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        assert_eq!(names, vec!["subdir", "top"]);
    }
    {
        let m = KernelMount::new(&img, &d.join("mnt"));
        let n = std::fs::read_dir(m.dir.join("subdir")).unwrap().count();
        assert_eq!(n, 300);
        let md = std::fs::metadata(
            m.dir
                .join("subdir/file-0042-with-a-longer-name-to-fill-leaves"),
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.uid(), md.mode() & 0o7777), (1000, 0o644));
    }
    // A second transaction on top of the first.
    {
        let fs = FsInfo::open(&img, rw()).unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        ubtrfs_fs::inode::btrfs_new_inode(&fs, root, dir, b"second", 0o100644, 0, 0, 0).unwrap();
        fs.commit().unwrap();
    }
    btrfs_check(&img);
    let _ = std::fs::remove_dir_all(&d);
}
