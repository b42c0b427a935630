//! Group `fsync_vs_shrinker`: one thread logs a batch of modified maps of an inode
//! (`btrfs_log_changed_extents` with a small per-map `log_one_extent` cost):
//! - `idle`: no shrinker;
//! - `busy`: a shrinker thread scans continuously over that inode and 8 others (half of their
//!   maps pinned, so it always has maps to visit; the dropped ones are re-added as readers
//!   would);
//! - `busy_rwlock`: the same workload on a plain `RwLock<BTreeMap>` + `Arc` tree written here
//!   as a baseline (kernel-shaped: write lock for every change, the same try-lock shrinker).
//!
//! Each measured iteration is one logging pass over `BATCH` maps; the batch is written under
//! the inode and mmap locks right before (untimed), as a buffered write + fsync would.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use parking_lot::RwLock;
use ubtrfs_extent_map::{flags, BtrfsInode, ExtentMap, FsExtentMaps, Policy};

const K: u64 = 4096;
const BATCH: u64 = 256;
const OTHERS: u64 = 8;
const OTHER_MAPS: u64 = 16_384;
const TRANSID: u64 = 7;

/// Stand-in for `log_one_extent`'s work (building and inserting a file extent item).
fn log_one_extent(em: &ExtentMap) -> u64 {
    let mut h = em.start ^ em.disk_bytenr.rotate_left(17) ^ em.len;
    for i in 0..256u64 {
        h = (h ^ i).wrapping_mul(0x100_0000_01b3);
    }
    black_box(h)
}

fn batch_map(i: u64, round: u64) -> ExtentMap {
    // Contiguous on disk: once logged, the maps merge (clear_em_logging's try_merge_map).
    ExtentMap::regular(
        i * K,
        K,
        (1 << 40) + (round % 1024) * (1 << 24) + i * K,
        TRANSID,
    )
}

fn other_map(i: u64) -> ExtentMap {
    let em = ExtentMap::regular(i * 2 * K, K, (1 << 30) + i * 3 * K, 1);
    if i & 1 == 0 {
        em.with_flags(flags::PINNED)
    } else {
        em
    }
}

// ------------------------------------------------------------------------------------------
// ubtrfs-extent-map

struct Ours {
    fs: Arc<FsExtentMaps>,
    target: Arc<BtrfsInode>,
    others: Vec<Arc<BtrfsInode>>,
}

impl Ours {
    fn new() -> Self {
        let fs = FsExtentMaps::new(Policy::FixedSplit);
        fs.set_generation(TRANSID);
        let target = fs.inode(5, 257);
        let others: Vec<_> = (0..OTHERS).map(|i| fs.inode(5, 300 + i)).collect();
        // The other inodes' maps are built on another thread, as FUSE worker threads would
        // build them in the daemon (not by the fsync thread, whose malloc arena would
        // otherwise receive every free the shrinker does).
        std::thread::scope(|s| {
            s.spawn(|| Self::fill_others(&others));
        });
        Ours { fs, target, others }
    }

    fn fill_others(others: &[Arc<BtrfsInode>]) {
        for o in others {
            for i in 0..OTHER_MAPS {
                let em = other_map(i);
                if em.has(flags::PINNED) {
                    o.btrfs_replace_extent_map_range(em, false).expect("pin");
                } else {
                    o.btrfs_add_extent_mapping(em, em.start, K).expect("add");
                }
            }
        }
    }

    /// One fsync of a freshly written batch; returns the time of the logging pass.
    fn fsync_round(&self, round: u64) -> Duration {
        let t = &self.target;
        let _il = t.inode_lock().write();
        let _ml = t.mmap_lock().write();
        t.btrfs_drop_extent_map_range(0, u64::MAX, false);
        for i in 0..BATCH {
            t.btrfs_replace_extent_map_range(batch_map(i, round), true)
                .expect("write");
        }
        let start = Instant::now();
        let r = t.btrfs_log_changed_extents::<()>(TRANSID, u64::MAX, |em| {
            log_one_extent(em);
            Ok(())
        });
        let el = start.elapsed();
        assert!(r.is_ok());
        el
    }

    fn shrinker_loop(&self, stop: &AtomicBool) {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            self.fs.btrfs_free_extent_maps(4096);
            n += 1;
            if n & 7 == 0 {
                // Readers bring back the dropped maps of one inode.
                let o = &self.others[(n / 8 % OTHERS) as usize];
                for i in (1..OTHER_MAPS).step_by(2) {
                    let em = other_map(i);
                    if o.btrfs_lookup_extent_mapping(em.start, K).is_none() {
                        let _ = o.btrfs_add_extent_mapping(em, em.start, K);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Baseline: RwLock<BTreeMap> + Arc, kernel-shaped

const LISTED: u32 = 1 << 16;

#[derive(Default)]
struct BTree {
    maps: BTreeMap<u64, ExtentMap>,
    modified: Vec<u64>,
}

#[derive(Default)]
struct BInode {
    tree: RwLock<BTree>,
    inode_lock: RwLock<()>,
    mmap_lock: RwLock<()>,
}

fn b_mergeable(prev: &ExtentMap, next: &ExtentMap) -> bool {
    let ok = |e: &ExtentMap| {
        e.flags & (flags::PINNED | flags::LOGGING | flags::COMPRESS_MASK | LISTED) == 0
    };
    ok(prev)
        && ok(next)
        && prev.end() == next.start
        && (prev.flags & !flags::MERGED) == (next.flags & !flags::MERGED)
        && next.block_start() == prev.block_end()
}

impl BTree {
    fn insert(&mut self, em: ExtentMap, modified: bool) -> bool {
        let overlap = self
            .maps
            .range(..=em.start)
            .next_back()
            .is_some_and(|(_, p)| p.end() > em.start)
            || self
                .maps
                .range(em.start + 1..)
                .next()
                .is_some_and(|(_, n)| n.start < em.end());
        if overlap {
            return false;
        }
        if modified {
            self.maps.insert(em.start, em.with_flags(LISTED));
            self.modified.push(em.start);
        } else {
            self.maps.insert(em.start, em);
            self.try_merge(em.start);
        }
        true
    }

    fn try_merge(&mut self, start: u64) {
        let Some(mut em) = self.maps.get(&start).copied() else {
            return;
        };
        if let Some((&ps, prev)) = self.maps.range(..start).next_back() {
            if b_mergeable(prev, &em) {
                let prev = *prev;
                self.maps.remove(&start);
                em.start = ps;
                em.len += prev.len;
                em.disk_bytenr = prev.disk_bytenr;
                em.disk_num_bytes += prev.disk_num_bytes;
                em.ram_bytes = em.disk_num_bytes;
                em.flags |= flags::MERGED;
                self.maps.insert(ps, em);
            }
        }
        if let Some((&ns, next)) = self.maps.range(em.start + 1..).next() {
            if b_mergeable(&em, next) {
                let next = *next;
                self.maps.remove(&ns);
                em.len += next.len;
                em.disk_num_bytes += next.disk_num_bytes;
                em.ram_bytes = em.disk_num_bytes;
                em.flags |= flags::MERGED;
                self.maps.insert(em.start, em);
            }
        }
    }
}

struct Base {
    target: Arc<BInode>,
    inodes: Vec<Arc<BInode>>,
}

impl Base {
    fn new() -> Self {
        let target = Arc::new(BInode::default());
        let mut inodes = vec![target.clone()];
        // Built on another thread, as for `Ours`.
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..OTHERS {
                    let o = Arc::new(BInode::default());
                    {
                        let mut t = o.tree.write();
                        for i in 0..OTHER_MAPS {
                            t.insert(other_map(i), false);
                        }
                    }
                    inodes.push(o);
                }
            });
        });
        Base { target, inodes }
    }

    fn fsync_round(&self, round: u64) -> Duration {
        let t = &self.target;
        let _il = t.inode_lock.write();
        let _ml = t.mmap_lock.write();
        {
            let mut tr = t.tree.write();
            tr.maps.clear();
            tr.modified.clear();
        }
        for i in 0..BATCH {
            let em = batch_map(i, round);
            let mut tr = t.tree.write();
            let _ = tr.insert(em, true);
        }
        let start = Instant::now();
        // Collect, mark LOGGING, sort.
        let mut tr = t.tree.write();
        let list = std::mem::take(&mut tr.modified);
        let mut logging = Vec::new();
        for s in list {
            if let Some(e) = tr.maps.get_mut(&s) {
                e.flags &= !LISTED;
                if e.generation >= TRANSID {
                    e.flags |= flags::LOGGING;
                    logging.push(*e);
                }
            }
        }
        logging.sort_by_key(|e| e.start);
        for em in logging {
            drop(tr);
            log_one_extent(&em);
            tr = t.tree.write();
            if let Some(e) = tr.maps.get_mut(&em.start) {
                e.flags &= !flags::LOGGING;
                tr.try_merge(em.start);
            }
        }
        drop(tr);
        start.elapsed()
    }

    fn shrinker_loop(&self, stop: &AtomicBool) {
        let mut cursor = 0usize;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut scanned = 0;
            let mut visited = 0;
            while scanned < 4096 && visited < self.inodes.len() {
                let inode = &self.inodes[cursor % self.inodes.len()];
                cursor += 1;
                visited += 1;
                let Some(mut tr) = inode.tree.try_write() else {
                    continue;
                };
                if tr.maps.is_empty() {
                    continue;
                }
                let Some(_m) = inode.mmap_lock.try_read() else {
                    continue;
                };
                let keys: Vec<u64> = tr.maps.keys().copied().collect();
                for k in keys {
                    scanned += 1;
                    let pinned = tr.maps.get(&k).is_some_and(|e| e.has(flags::PINNED));
                    if !pinned {
                        tr.maps.remove(&k);
                    }
                    if scanned >= 4096 {
                        break;
                    }
                }
            }
            n += 1;
            if n & 7 == 0 {
                let o = &self.inodes[1 + (n / 8 % OTHERS) as usize];
                for i in (1..OTHER_MAPS).step_by(2) {
                    let em = other_map(i);
                    let present = o
                        .tree
                        .read()
                        .maps
                        .range(..=em.start)
                        .next_back()
                        .is_some_and(|(_, p)| p.end() > em.start);
                    if !present {
                        o.tree.write().insert(em, false);
                    }
                }
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("fsync_vs_shrinker");
    g.throughput(Throughput::Elements(BATCH));

    let ours = Arc::new(Ours::new());
    let mut round = 0u64;
    g.bench_function("idle", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    round += 1;
                    ours.fsync_round(round)
                })
                .sum()
        })
    });

    let stop = Arc::new(AtomicBool::new(false));
    let shrinker = {
        let (o, s) = (ours.clone(), stop.clone());
        std::thread::spawn(move || o.shrinker_loop(&s))
    };
    g.bench_function("busy", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    round += 1;
                    ours.fsync_round(round)
                })
                .sum()
        })
    });
    stop.store(true, Ordering::Relaxed);
    shrinker.join().expect("shrinker");
    let s = ours.fs.stats();
    println!(
        "busy: shrinker runs {}, scanned {}, dropped {}, target inode skipped busy {} times",
        s.shrinker_runs, s.shrinker_scanned, s.shrinker_dropped, s.shrinker_skipped_inode_busy
    );

    let base = Arc::new(Base::new());
    let stop = Arc::new(AtomicBool::new(false));
    let shrinker = {
        let (o, s) = (base.clone(), stop.clone());
        std::thread::spawn(move || o.shrinker_loop(&s))
    };
    g.bench_function("busy_rwlock", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    round += 1;
                    base.fsync_round(round)
                })
                .sum()
        })
    });
    stop.store(true, Ordering::Relaxed);
    shrinker.join().expect("shrinker");
    g.finish();
}

/// Per-round wall-clock quantiles (median, p90, max) of `rounds` fsyncs, for a quick look at
/// the distribution on a loaded machine (`UBTRFS_BENCH_QUANTILES=1`).
fn quantiles(name: &str, rounds: usize, mut f: impl FnMut(u64) -> Duration) {
    let mut v: Vec<Duration> = (0..rounds as u64).map(&mut f).collect();
    v.sort();
    println!(
        "{name}: median {:?} p90 {:?} max {:?}",
        v[v.len() / 2],
        v[v.len() * 9 / 10],
        v[v.len() - 1]
    );
}

fn quick() {
    quantiles("log_one_extent only", 2000, |r| {
        let start = Instant::now();
        for i in 0..BATCH {
            log_one_extent(&batch_map(i, r));
        }
        start.elapsed()
    });
    let ours = Arc::new(Ours::new());
    if let Ok(n) = std::env::var("UBTRFS_BENCH_PROFILE_IDLE") {
        // Long idle run for a profiler.
        let n: usize = n.parse().unwrap_or(100_000);
        quantiles("idle (profile)", n, |r| ours.fsync_round(r));
        return;
    }
    quantiles("idle", 2000, |r| ours.fsync_round(r));
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (o, s) = (ours.clone(), stop.clone());
        std::thread::spawn(move || o.shrinker_loop(&s))
    };
    quantiles("busy", 2000, |r| ours.fsync_round(r + 10_000));
    stop.store(true, Ordering::Relaxed);
    h.join().expect("shrinker");
    let base = Arc::new(Base::new());
    quantiles("idle_rwlock", 2000, |r| base.fsync_round(r));
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (o, s) = (base.clone(), stop.clone());
        std::thread::spawn(move || o.shrinker_loop(&s))
    };
    quantiles("busy_rwlock", 2000, |r| base.fsync_round(r + 10_000));
    stop.store(true, Ordering::Relaxed);
    h.join().expect("shrinker");
}

fn main() {
    if std::env::var_os("UBTRFS_BENCH_QUANTILES").is_some() {
        quick();
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
