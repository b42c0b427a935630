//! Shared support for the library-level integration tests of ubtrfs-fs.
//!
//! - [`TestDir`]: a private temporary directory per test (under `$UBTRFS_TEST_TMPDIR`, default
//!   `/tmp/ubtrfs-tests`), removed on drop unless `UBTRFS_KEEP_TMP` is set.
//! - [`Rng`]: SplitMix64, so that one seed replays one run exactly.
//! - [`image`]: a generated source tree and `mkfs.btrfs --rootdir` images of it.
//! - [`walk::walk`]: a bounded walk over an opened [`ubtrfs_fs::FsInfo`] that touches every
//!   object and collects errors, for damaged images.
//!
//! Tools the tests need (mkfs.btrfs, xz) are checked with [`require_tool`], which fails loudly:
//! nothing is skipped.
#![allow(dead_code)]

pub mod image;
pub mod oracle;
pub mod walk;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique directory for one test; removed on drop unless `UBTRFS_KEEP_TMP` is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("UBTRFS_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/ubtrfs-tests"));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("fs-{name}-{}-{n}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).unwrap_or_else(|e| panic!("removing {path:?}: {e}"));
        }
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {path:?}: {e}"));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("UBTRFS_KEEP_TMP").is_some() {
            eprintln!("keeping {:?} (UBTRFS_KEEP_TMP)", self.path);
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Panic with a clear message unless `tool` is found in PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` not found in PATH (ci/test.sh installs btrfs-progs and xz-utils)"
    );
}

/// Run a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// SplitMix64: small, deterministic, good enough for test data and mutation choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform index into a slice of length `n` (n > 0).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Mix a base seed and an iteration number into the seed of one case.
pub fn case_seed(base: u64, iteration: u64) -> u64 {
    Rng::new(base ^ iteration.wrapping_mul(0xa076_1d64_78bd_642f)).next_u64()
}
