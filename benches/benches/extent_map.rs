//! Group `extent_map`: lookup hit, add with merge, drop range with split, a shrinker scan over
//! 1M maps, lookups per second with 1 and 2 threads, and lookups while another thread shrinks
//! and refills the same inode (versus a plain RwLock tree).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use parking_lot::RwLock;
use ubtrfs_extent_map::{BtrfsInode, ExtentMap, FsExtentMaps, Policy};

const K: u64 = 4096;

/// `n` unmergeable one-block maps (a disk gap between neighbours) at even blocks.
fn filled(fs: &FsExtentMaps, ino: u64, n: u64) -> Arc<BtrfsInode> {
    let inode = fs.inode(5, ino);
    for i in 0..n {
        let em = ExtentMap::regular(i * 2 * K, K, (1 << 30) + i * 3 * K, 1);
        inode
            .btrfs_add_extent_mapping(em, i * 2 * K, K)
            .expect("add");
    }
    inode
}

fn lookup_hit(c: &mut Criterion) {
    let fs = FsExtentMaps::new(Policy::FixedSplit);
    let n = 100_000;
    let inode = filled(&fs, 257, n);
    let mut x = 0x1234_5678u64;
    c.bench_function("extent_map/lookup_hit_100k", |b| {
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let blk = (x >> 33) % n * 2;
            black_box(inode.btrfs_lookup_extent_mapping(blk * K, K))
        })
    });
}

fn add_with_merge(c: &mut Criterion) {
    let fs = FsExtentMaps::new(Policy::FixedSplit);
    let inode = filled(&fs, 257, 10_000);
    // A growing map after the filled range: every add is contiguous with it and merges.
    let base = 1_000_000 * K;
    let mut next = 0u64;
    c.bench_function("extent_map/add_with_merge_10k", |b| {
        b.iter(|| {
            let s = base + next * K;
            let em = ExtentMap::regular(s, K, (1 << 40) + next * K, 1);
            let got = inode.btrfs_add_extent_mapping(em, s, K).expect("add");
            debug_assert_eq!(got.start, base.min(got.start));
            next += 1;
            if next == 1_000_000 {
                inode.btrfs_drop_extent_map_range(base, u64::MAX - 1, false);
                next = 0;
            }
        })
    });
}

fn drop_range_split(c: &mut Criterion) {
    c.bench_function("extent_map/drop_range_split_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let fs = FsExtentMaps::new(Policy::FixedSplit);
                let inode = fs.inode(5, 257);
                let n = 10_000.min(iters - done);
                for i in 0..10_000u64 {
                    // Three-block maps separated by a one-block gap.
                    let em = ExtentMap::regular(i * 4 * K, 3 * K, (1 << 30) + i * 8 * K, 1);
                    inode
                        .btrfs_add_extent_mapping(em, i * 4 * K, K)
                        .expect("add");
                }
                let t = Instant::now();
                for i in 0..n {
                    // Drop the middle block: head and tail pieces.
                    let s = i * 4 * K + K;
                    inode.btrfs_drop_extent_map_range(s, s + K - 1, false);
                }
                total += t.elapsed();
                done += n;
            }
            total
        })
    });
}

fn shrinker_scan_1m(c: &mut Criterion) {
    let mut g = c.benchmark_group("extent_map");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function("shrinker_scan_1m", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let fs = FsExtentMaps::new(Policy::FixedSplit);
                for ino in 0..16u64 {
                    filled(&fs, 257 + ino, 62_500);
                }
                assert_eq!(fs.stats().cached_maps, 1_000_000);
                let t = Instant::now();
                assert!(fs.btrfs_free_extent_maps(1_000_000));
                total += t.elapsed();
                assert_eq!(fs.stats().cached_maps, 0);
            }
            total
        })
    });
    g.finish();
}

fn lookups_threads(c: &mut Criterion) {
    let fs = FsExtentMaps::new(Policy::FixedSplit);
    let n = 100_000;
    let inode = filled(&fs, 257, n);
    let mut g = c.benchmark_group("extent_map/lookups_per_sec");
    for threads in [1u64, 2] {
        g.throughput(Throughput::Elements(threads));
        g.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for id in 0..t {
                        let inode = &inode;
                        s.spawn(move || {
                            let mut x = 0x9E37_79B9u64 + id;
                            for _ in 0..iters {
                                x = x
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                let blk = (x >> 33) % n * 2;
                                black_box(inode.btrfs_lookup_extent_mapping(blk * K, K));
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// Lookups on an inode while another thread keeps shrinking and refilling it (the shrinker
/// holds the inode's tree lock for a whole scan of 10k maps): ours versus a plain
/// `RwLock<BTreeMap>` whose readers wait for the scan.
fn lookup_while_shrinking(c: &mut Criterion) {
    const N: u64 = 10_000;
    let map = |i: u64| ExtentMap::regular(i * 2 * K, K, (1 << 30) + i * 3 * K, 1);
    let mut g = c.benchmark_group("extent_map/lookup_while_shrinking");

    let fs = FsExtentMaps::new(Policy::FixedSplit);
    let inode = filled(&fs, 257, N);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                fs.btrfs_free_extent_maps(N);
                for i in 0..N {
                    let _ = inode.btrfs_add_extent_mapping(map(i), i * 2 * K, K);
                }
            }
        });
        g.bench_function("epoch", |b| {
            let mut x = 7u64;
            b.iter(|| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                black_box(inode.btrfs_lookup_extent_mapping((x >> 33) % N * 2 * K, K))
            })
        });
        stop.store(true, Ordering::Relaxed);
    });

    let tree: RwLock<BTreeMap<u64, ExtentMap>> =
        RwLock::new((0..N).map(|i| (i * 2 * K, map(i))).collect());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                // The kernel-shaped scan: the write lock held for the whole inode.
                tree.write()
                    .retain(|_, e| e.has(ubtrfs_extent_map::flags::PINNED));
                for i in 0..N {
                    tree.write().insert(i * 2 * K, map(i));
                }
            }
        });
        g.bench_function("rwlock", |b| {
            let mut x = 7u64;
            b.iter(|| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 33) % N * 2 * K;
                let t = tree.read();
                black_box(
                    t.range(..=off)
                        .next_back()
                        .filter(|(_, e)| e.end() > off)
                        .map(|(_, e)| *e),
                )
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

fn main() {
    let (v, t, n) = ubtrfs_extent_map::type_sizes();
    println!(
        "size_of::<ExtentMap>() = {v} bytes; B+tree leaf slot = {t} bytes; identity (arena entry) = {n} bytes; \
         per cached map incl. share of tree nodes = {} bytes (kernel struct extent_map: 104)",
        ubtrfs_extent_map::MAP_FOOTPRINT_BYTES
    );
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    lookup_hit(&mut c);
    add_with_merge(&mut c);
    drop_range_split(&mut c);
    shrinker_scan_1m(&mut c);
    lookups_threads(&mut c);
    lookup_while_shrinking(&mut c);
    c.final_summary();
}
