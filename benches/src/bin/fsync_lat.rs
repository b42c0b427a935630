//! fsync latency driver for `benches/fsync-bench.sh`: runs one measurement in a directory of
//! a mounted filesystem (ubtrfs through FUSE, or the kernel's btrfs) and prints one line
//! `RESULT <test> n=<n> p50_us=<..> p99_us=<..> mean_us=<..> ops_per_s=<..>`.
//!
//! Tests (only the sync call is timed unless said otherwise; a few untimed rounds first):
//! - `overwrite <file MiB> <n>`: a file of that size, written and fsynced beforehand; each
//!   round overwrites one random 4 KiB block (buffered) and fsyncs the file.
//! - `create <n>`: each round creates a new empty file and fsyncs it (create + fsync timed).
//! - `rename <n>`: each round renames one of n files in a directory and fsyncs the directory
//!   (rename + fsync timed).
//! - `threads <threads> <n>`: each thread owns a 4 MiB file and does n rounds of `overwrite`;
//!   latencies of all threads together, ops/s over the wall time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const WARMUP: usize = 3;

fn usage() -> ! {
    eprintln!("usage: fsync_lat DIR overwrite MIB N | create N | rename N | threads THREADS N");
    std::process::exit(2)
}

/// xorshift, so that runs are repeatable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage())
}

fn fsync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync {}: {e}", dir.display()));
}

/// A file of `bytes` bytes of non-zero data, durable.
fn prepare(path: &Path, bytes: u64) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 1) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    fsync_dir(path.parent().expect("has a parent"));
    f
}

fn overwrite_rounds(f: &File, bytes: u64, n: usize, seed: u64) -> Vec<Duration> {
    let blocks = (bytes / BLOCK as u64).max(1);
    let mut rng = Rng(seed | 1);
    let mut lat = Vec::with_capacity(n);
    for round in 0..n + WARMUP {
        let b = rng.next() % blocks;
        let buf = [(round % 251) as u8 + 1; BLOCK];
        f.write_all_at(&buf, b * BLOCK as u64).unwrap();
        let t = Instant::now();
        f.sync_all().unwrap();
        if round >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat
}

fn report(test: &str, mut lat: Vec<Duration>, wall: Duration) {
    assert!(!lat.is_empty());
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "RESULT {test} n={} p50_us={} p99_us={} mean_us={} ops_per_s={:.0}",
        lat.len(),
        pct(0.50).as_micros(),
        pct(0.99).as_micros(),
        mean.as_micros(),
        lat.len() as f64 / wall.as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        usage();
    }
    let dir = PathBuf::from(&args[1]);
    let test = args[2].as_str();
    let work = dir.join(format!("fsync-lat-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    fsync_dir(&dir);
    let t0 = Instant::now();
    match test {
        "overwrite" => {
            let mib: u64 = arg(&args, 3);
            let n: usize = arg(&args, 4);
            let bytes = mib << 20;
            let f = prepare(&work.join("f"), bytes);
            let t0 = Instant::now();
            let lat = overwrite_rounds(&f, bytes, n, 42);
            report(&format!("overwrite-{mib}MiB"), lat, t0.elapsed());
        }
        "create" => {
            let n: usize = arg(&args, 3);
            let mut lat = Vec::with_capacity(n);
            for i in 0..n + WARMUP {
                let t = Instant::now();
                let f = File::create(work.join(format!("c{i}"))).unwrap();
                f.sync_all().unwrap();
                if i >= WARMUP {
                    lat.push(t.elapsed());
                }
            }
            report("create", lat, t0.elapsed());
        }
        "rename" => {
            let n: usize = arg(&args, 3);
            for i in 0..n + WARMUP {
                File::create(work.join(format!("r{i}"))).unwrap();
            }
            fsync_dir(&work);
            let mut lat = Vec::with_capacity(n);
            let t0 = Instant::now();
            for i in 0..n + WARMUP {
                let t = Instant::now();
                std::fs::rename(work.join(format!("r{i}")), work.join(format!("s{i}"))).unwrap();
                fsync_dir(&work);
                if i >= WARMUP {
                    lat.push(t.elapsed());
                }
            }
            report("rename", lat, t0.elapsed());
        }
        "threads" => {
            let threads: usize = arg(&args, 3);
            let n: usize = arg(&args, 4);
            let files: Vec<File> = (0..threads)
                .map(|t| prepare(&work.join(format!("t{t}")), 4 << 20))
                .collect();
            let t0 = Instant::now();
            let lat: Vec<Duration> = std::thread::scope(|s| {
                let hs: Vec<_> = files
                    .iter()
                    .enumerate()
                    .map(|(t, f)| s.spawn(move || overwrite_rounds(f, 4 << 20, n, t as u64 + 7)))
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            report(&format!("threads-{threads}"), lat, t0.elapsed());
        }
        _ => usage(),
    }
    std::fs::remove_dir_all(&work).unwrap();
}
