//! The oracles of the read-write tests: `mkfs.btrfs`, `btrfs check --readonly` and a kernel loop
//! mount that is unmounted and detached on drop, even when the test panics.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A sparse image of `size` bytes made by `mkfs.btrfs` with `extra` options.
pub fn mkfs_btrfs(img: &Path, size: u64, extra: &[&str]) {
    super::require_tool("mkfs.btrfs");
    let f = std::fs::File::create(img).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let out = Command::new("mkfs.btrfs")
        .arg("-q")
        .arg("-f")
        .args(extra)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.btrfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `btrfs check --readonly` must exit 0 and say "no error found". Returns its output.
pub fn btrfs_check(img: &Path) -> String {
    super::require_tool("btrfs");
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
        out.status.success() && !text.contains("ERROR") && text.contains("no error found"),
        "btrfs check failed:\n{text}"
    );
    text
}

/// A kernel loop mount, unmounted and its loop device detached on drop.
pub struct KernelMount {
    pub dir: PathBuf,
    dev: String,
}

impl KernelMount {
    pub fn new(img: &Path, dir: &Path, opts: &str) -> Self {
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
            .args(["-o", opts, &dev])
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
        // umount fails with EBUSY while something else briefly holds the mount (a parallel
        // test's btrfs check scanning devices, udev): retry, then detach lazily, so that no
        // mount outlives the test.
        let mut done = false;
        for _ in 0..20 {
            if Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
            {
                done = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !done {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
