//! Group `fsync_vs_shrinker`, filesystem level (IDs `fs_idle`, `fs_busy`): the extent-map
//! level group of the same name (benches/fsync_vs_shrinker.rs) on a real filesystem opened by
//! the library (`FsInfo`, read-write, no FUSE). Each round overwrites one 4 KiB block of an
//! 8 MiB file made of 2048 separate extents (buffered, untimed) and times `btrfs_sync_file`
//! (log the changed extent, sync the log: two device flushes).
//! - `fs_idle`: nothing else runs;
//! - `fs_busy`: one thread keeps reading 256 KiB pieces (64 extents) of four other 4 MiB files
//!   (1024 extents each) and of the fsynced file, each read followed by a full shrinker scan
//!   (`btrfs_free_cached_objects`), so fsync meets dropped maps (NEEDS_FULL_SYNC) and a
//!   shrinker walking the inode's tree.
//!
//! The running transaction is committed every 64 rounds (untimed), as the periodic commit
//! bounds the log. After criterion, 2000 rounds of each are timed one by one and p50 / p99 and
//! the busy / idle ratio are printed.
//!
//! The image lives in `$UBTRFS_BENCH_DIR`, default /dev/shm (a device flush costs nothing
//! there, so the figures are ubtrfs's own CPU and lock time; point it at a disk to include
//! the flushes).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ubtrfs_fs::{FsInfo, MountOptions};

const BLOCK: u64 = 4096;
const TARGET_BLOCKS: u64 = 2048;
const OTHERS: usize = 4;
const OTHER_BLOCKS: u64 = 1024;
const COMMIT_EVERY: u64 = 64;

struct Bench {
    fs: Arc<FsInfo>,
    root: u64,
    target: u64,
    others: Vec<u64>,
    img: PathBuf,
    rounds: AtomicU64,
    /// Reads that failed while fsyncs ran (a correct filesystem has none).
    read_errors: AtomicU64,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.img);
    }
}

/// A file of `blocks` 4 KiB extents, written back one block at a time in a scattered order so
/// that neighbouring blocks are not contiguous on disk (no extent merging).
fn fragmented_file(fs: &FsInfo, root: u64, dir: u64, name: &str, blocks: u64) -> u64 {
    let (ino, _) =
        ubtrfs_fs::inode::btrfs_new_inode(fs, root, dir, name.as_bytes(), 0o100644, 0, 0, 0)
            .unwrap();
    // A stride coprime with the block count visits every block once.
    let stride = 769;
    for i in 0..blocks {
        let b = (i * stride) % blocks;
        let buf = vec![(b % 251) as u8 + 1; BLOCK as usize];
        ubtrfs_fs::file_write::btrfs_buffered_write(fs, root, ino, b * BLOCK, &buf).unwrap();
        ubtrfs_fs::file_write::btrfs_writeback(fs, root, ino).unwrap();
    }
    ino
}

impl Bench {
    fn new() -> Bench {
        let dir = std::env::var_os("UBTRFS_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                if shm.is_dir() {
                    shm
                } else {
                    std::env::temp_dir()
                }
            });
        let img = dir.join(format!("ubtrfs-fsync-fs-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&img);
        ubtrfs_fs::mkfs::mkfs(
            &img,
            &ubtrfs_fs::mkfs::MkfsOptions {
                size: Some(1 << 30),
                ..Default::default()
            },
        )
        .unwrap();
        let fs = FsInfo::open(
            &img,
            MountOptions {
                readonly: false,
                commit_interval: 3600,
                ..MountOptions::default()
            },
        )
        .unwrap();
        let root = fs.mount_root;
        let dir = fs.root(root).unwrap().item.root_dirid;
        let target = fragmented_file(&fs, root, dir, "target", TARGET_BLOCKS);
        let others = (0..OTHERS)
            .map(|i| fragmented_file(&fs, root, dir, &format!("other{i}"), OTHER_BLOCKS))
            .collect();
        fs.sync().unwrap();
        Bench {
            fs,
            root,
            target,
            others,
            img,
            rounds: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
        }
    }

    /// One round: dirty one block (untimed), time the fsync.
    fn round(&self) -> Duration {
        let r = self.rounds.fetch_add(1, Ordering::Relaxed);
        if r % COMMIT_EVERY == COMMIT_EVERY - 1 {
            self.fs.commit().unwrap();
        }
        let b = (r * 7919) % TARGET_BLOCKS;
        let buf = vec![(r % 253) as u8 + 1; BLOCK as usize];
        ubtrfs_fs::file_write::btrfs_buffered_write(
            &self.fs,
            self.root,
            self.target,
            b * BLOCK,
            &buf,
        )
        .unwrap();
        let t = Instant::now();
        black_box(ubtrfs_fs::tree_log::btrfs_sync_file(&self.fs, self.root, self.target).unwrap());
        t.elapsed()
    }

    /// Read 256 KiB of a file at `off`; read errors are counted (and reported: they are bugs).
    fn read_piece(&self, ino: u64, off: u64, errors: &AtomicU64) {
        let ii = ubtrfs_fs::inode::read_inode(&self.fs, self.root, ino).unwrap();
        let emi = self.fs.ems.inode(self.root, ino);
        if let Err(e) = ubtrfs_fs::file::read(&self.fs, self.root, ino, &ii, &emi, off, 256 << 10) {
            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("WARNING: read of ino {ino} at {off} during fsyncs failed: {e}");
            }
        }
    }

    /// Run `f` while a thread reads and shrinks as hard as it can.
    fn with_shrinker<R>(&self, f: impl FnOnce() -> R) -> (R, u64) {
        let stop = AtomicBool::new(false);
        let passes = AtomicU64::new(0);
        let errors = &self.read_errors;
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let files: Vec<(u64, u64)> = self
                    .others
                    .iter()
                    .map(|&i| (i, OTHER_BLOCKS))
                    .chain([(self.target, TARGET_BLOCKS)])
                    .collect();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Rebuild some maps (64 extents), then drop every map that can go.
                    let (ino, blocks) = files[(n % files.len() as u64) as usize];
                    let off = (n * 64 * 13 % blocks) * BLOCK;
                    self.read_piece(ino, off, errors);
                    self.fs.ems.btrfs_free_cached_objects(u64::MAX);
                    passes.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            });
            let r = f();
            stop.store(true, Ordering::Relaxed);
            r
        });
        (r, passes.load(Ordering::Relaxed))
    }
}

fn quantiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (p(0.5), p(0.99))
}

fn main() {
    let b = Bench::new();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("fsync_vs_shrinker");
        g.bench_function("fs_idle", |bn| {
            bn.iter_custom(|iters| (0..iters).map(|_| b.round()).sum())
        });
        b.with_shrinker(|| {
            g.bench_function("fs_busy", |bn| {
                bn.iter_custom(|iters| (0..iters).map(|_| b.round()).sum())
            });
        });
        g.finish();
    }
    c.final_summary();

    const ROUNDS: usize = 2000;
    let idle: Vec<Duration> = (0..ROUNDS).map(|_| b.round()).collect();
    let (busy, passes) = b.with_shrinker(|| (0..ROUNDS).map(|_| b.round()).collect::<Vec<_>>());
    let (i50, i99) = quantiles(idle);
    let (b50, b99) = quantiles(busy);
    let errors = b.read_errors.load(Ordering::Relaxed);
    if errors > 0 {
        println!("WARNING: {errors} reads of the busy thread failed (see stderr): a bug");
    }
    let c = &b.fs.counters;
    println!(
        "fsync_vs_shrinker (fs level, {ROUNDS} rounds each): idle p50 {i50:?} p99 {i99:?}; \
         busy p50 {b50:?} p99 {b99:?} ({passes} read+shrink rounds); busy/idle p50 {:.2} \
         p99 {:.2}; fsyncs fast {} full {} full-commit {}",
        b50.as_secs_f64() / i50.as_secs_f64(),
        b99.as_secs_f64() / i99.as_secs_f64(),
        c.fsync_fast.load(Ordering::Relaxed),
        c.fsync_full.load(Ordering::Relaxed),
        c.fsync_full_commit.load(Ordering::Relaxed),
    );
}
