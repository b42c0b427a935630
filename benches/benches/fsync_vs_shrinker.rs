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
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
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
//
// Maps are stored by value in the BTreeMap (the fastest natural layout: no allocation per map),
// with what the kernel's logging pass relies on besides the value: an identity (the kernel's
// lists link the map object itself, so fsync clears LOGGING on the map it collected, not on
// whatever map now starts at that offset), the reference count (fsync's reference, and
// try_merge_map's `refs > 2` rule) and the evictable-map counter (updated per merge and per
// shrinker removal, batched per critical section as ubtrfs-extent-map does).

const LISTED: u32 = 1 << 16;

#[derive(Clone, Copy)]
struct BMap {
    em: ExtentMap,
    /// Identity of the map object (never reused).
    id: u64,
    /// Kernel reference count, the tree's reference included.
    refs: u32,
}

#[derive(Default)]
struct BTree {
    maps: BTreeMap<u64, BMap>,
    /// The modified list: (start, identity) of each linked map.
    modified: Vec<(u64, u64)>,
    next_id: u64,
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
    /// Inserts; returns the change of the evictable count.
    fn insert(&mut self, em: ExtentMap, modified: bool) -> i64 {
        let overlap = self
            .maps
            .range(..=em.start)
            .next_back()
            .is_some_and(|(_, p)| p.em.end() > em.start)
            || self
                .maps
                .range(em.start + 1..)
                .next()
                .is_some_and(|(_, n)| n.em.start < em.end());
        if overlap {
            return 0;
        }
        self.next_id += 1;
        let id = self.next_id;
        if modified {
            let m = BMap {
                em: em.with_flags(LISTED),
                id,
                refs: 1,
            };
            self.maps.insert(em.start, m);
            self.modified.push((em.start, id));
            1
        } else {
            self.maps.insert(em.start, BMap { em, id, refs: 1 });
            1 + self.try_merge(em.start)
        }
    }

    /// `try_merge_map`; returns the change of the evictable count.
    fn try_merge(&mut self, start: u64) -> i64 {
        let Some(mut m) = self.maps.get(&start).copied() else {
            return 0;
        };
        if m.refs > 2 {
            return 0;
        }
        let mut delta = 0;
        if let Some((&ps, prev)) = self.maps.range(..start).next_back() {
            if b_mergeable(&prev.em, &m.em) {
                let prev = prev.em;
                self.maps.remove(&start);
                m.em.start = ps;
                m.em.len += prev.len;
                m.em.disk_bytenr = prev.disk_bytenr;
                m.em.disk_num_bytes += prev.disk_num_bytes;
                m.em.ram_bytes = m.em.disk_num_bytes;
                m.em.flags |= flags::MERGED;
                self.maps.insert(ps, m);
                delta -= 1;
            }
        }
        if let Some((&ns, next)) = self.maps.range(m.em.start + 1..).next() {
            if b_mergeable(&m.em, &next.em) {
                let next = next.em;
                self.maps.remove(&ns);
                m.em.len += next.len;
                m.em.disk_num_bytes += next.disk_num_bytes;
                m.em.ram_bytes = m.em.disk_num_bytes;
                m.em.flags |= flags::MERGED;
                self.maps.insert(m.em.start, m);
                delta -= 1;
            }
        }
        delta
    }
}

struct Base {
    target: Arc<BInode>,
    inodes: Vec<Arc<BInode>>,
    /// `evictable_extent_maps`, on its own cache line as in ubtrfs-extent-map.
    evictable: CachePadded,
}

#[repr(align(128))]
#[derive(Default)]
struct CachePadded(AtomicI64);

impl Base {
    fn new() -> Self {
        let target = Arc::new(BInode::default());
        let mut inodes = vec![target.clone()];
        let evictable = CachePadded::default();
        // Built on another thread, as for `Ours`.
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..OTHERS {
                    let o = Arc::new(BInode::default());
                    {
                        let mut t = o.tree.write();
                        let mut d = 0;
                        for i in 0..OTHER_MAPS {
                            d += t.insert(other_map(i), false);
                        }
                        evictable.0.fetch_add(d, Ordering::Relaxed);
                    }
                    inodes.push(o);
                }
            });
        });
        Base {
            target,
            inodes,
            evictable,
        }
    }

    fn evictable_add(&self, d: i64) {
        if d != 0 {
            self.evictable.0.fetch_add(d, Ordering::Relaxed);
        }
    }

    fn fsync_round(&self, round: u64) -> Duration {
        let t = &self.target;
        let _il = t.inode_lock.write();
        let _ml = t.mmap_lock.write();
        {
            let mut tr = t.tree.write();
            let n = tr.maps.len() as i64;
            tr.maps.clear();
            tr.modified.clear();
            self.evictable_add(-n);
        }
        for i in 0..BATCH {
            let em = batch_map(i, round);
            let mut tr = t.tree.write();
            let d = tr.insert(em, true);
            self.evictable_add(d);
        }
        let start = Instant::now();
        self.log_pass(t);
        start.elapsed()
    }

    /// The timed logging pass (a function of its own so that a profiler can single it out).
    #[inline(never)]
    fn log_pass(&self, t: &BInode) {
        // Collect (take a reference, mark LOGGING), sort.
        let mut tr = t.tree.write();
        let list = std::mem::take(&mut tr.modified);
        let mut logging = Vec::new();
        for (s, id) in list {
            if let Some(m) = tr.maps.get_mut(&s).filter(|m| m.id == id) {
                m.em.flags &= !LISTED;
                if m.em.generation >= TRANSID {
                    m.em.flags |= flags::LOGGING;
                    m.refs += 1;
                    logging.push((m.em, id));
                }
            }
        }
        logging.sort_by_key(|(e, _)| e.start);
        for (em, id) in logging {
            drop(tr);
            log_one_extent(&em);
            tr = t.tree.write();
            // btrfs_clear_em_logging on the collected map, then drop fsync's reference.
            if let Some(m) = tr.maps.get_mut(&em.start).filter(|m| m.id == id) {
                m.em.flags &= !flags::LOGGING;
                let d = tr.try_merge(em.start);
                if let Some(m) = tr
                    .maps
                    .range_mut(..=em.start)
                    .next_back()
                    .map(|(_, m)| m)
                    .filter(|m| m.id == id)
                {
                    m.refs -= 1;
                }
                self.evictable_add(d);
            }
        }
        drop(tr);
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
                let mut dropped = 0;
                for k in keys {
                    scanned += 1;
                    let pinned = tr.maps.get(&k).is_some_and(|m| m.em.has(flags::PINNED));
                    if !pinned {
                        tr.maps.remove(&k);
                        dropped += 1;
                    }
                    if scanned >= 4096 {
                        break;
                    }
                }
                self.evictable_add(-dropped);
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
                        .is_some_and(|(_, p)| p.em.end() > em.start);
                    if !present {
                        let d = o.tree.write().insert(em, false);
                        self.evictable_add(d);
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

/// One round of [`phases`]: collection, loop without `log_one_extent`, `log_one_extent`, and how
/// many times the shrinker met the target inode meanwhile.
type PhaseRound = (Duration, Duration, Duration, u64);

/// Where a logging pass's time goes (`UBTRFS_BENCH_PHASES=1`, or `=busy` with the shrinker
/// thread running): collection (`begin`), the loop without `log_one_extent`, and
/// `log_one_extent` itself (the two timer reads per map inflate the last two a little).
/// Prints the median and p90 of each phase, and, for the slowest tenth of the rounds, how
/// often the shrinker met the target inode during the round.
fn phases(busy: bool) {
    let ours = Arc::new(Ours::new());
    let stop = Arc::new(AtomicBool::new(false));
    let h = busy.then(|| {
        let (o, s) = (ours.clone(), stop.clone());
        std::thread::spawn(move || o.shrinker_loop(&s))
    });
    let mut v: Vec<PhaseRound> = Vec::new();
    for round in 0..3000u64 {
        let t = &ours.target;
        let _il = t.inode_lock().write();
        let _ml = t.mmap_lock().write();
        t.btrfs_drop_extent_map_range(0, u64::MAX, false);
        for i in 0..BATCH {
            t.btrfs_replace_extent_map_range(batch_map(i, round), true)
                .expect("write");
        }
        let skipped = ours.fs.stats().shrinker_skipped_inode_busy;
        let t0 = Instant::now();
        let mut pass = t.btrfs_log_changed_extents_begin(TRANSID, u64::MAX);
        let t1 = Instant::now();
        let mut log = Duration::ZERO;
        while let Some(em) = pass.next_extent() {
            let a = Instant::now();
            log_one_extent(&em);
            log += a.elapsed();
        }
        assert!(pass.finish().is_ok());
        let t2 = Instant::now();
        let met = ours.fs.stats().shrinker_skipped_inode_busy - skipped;
        v.push((t1 - t0, t2 - t1 - log, log, met));
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = h {
        h.join().expect("shrinker");
    }
    let q = |f: &dyn Fn(&PhaseRound) -> Duration| {
        let mut x: Vec<Duration> = v.iter().map(f).collect();
        x.sort();
        (x[x.len() / 2], x[x.len() * 9 / 10])
    };
    let b = q(&|x| x.0);
    let l = q(&|x| x.1);
    let g = q(&|x| x.2);
    let t = q(&|x| x.0 + x.1 + x.2);
    println!(
        "phases{} (median / p90): begin {:?} / {:?}, loop without log_one_extent {:?} / {:?}, \
         log_one_extent {:?} / {:?}, total {:?} / {:?}",
        if busy { " busy" } else { "" },
        b.0,
        b.1,
        l.0,
        l.1,
        g.0,
        g.1,
        t.0,
        t.1
    );
    let slow: Vec<_> = v.iter().filter(|x| x.0 + x.1 + x.2 >= t.1).collect();
    let fast: Vec<_> = v.iter().filter(|x| x.0 + x.1 + x.2 < t.1).collect();
    let met =
        |w: &[&PhaseRound]| w.iter().filter(|x| x.3 > 0).count() as f64 / w.len().max(1) as f64;
    println!(
        "rounds where the shrinker met the target inode: slowest tenth {:.0} %, others {:.0} %",
        met(&slow) * 100.0,
        met(&fast) * 100.0
    );
}

fn quick() {
    if let Some(p) = std::env::var_os("UBTRFS_BENCH_PHASES") {
        phases(p == "busy");
        return;
    }
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
    if let Ok(n) = std::env::var("UBTRFS_BENCH_PROFILE_IDLE_RWLOCK") {
        // Long idle run of the baseline for a profiler (its pass is `Base::log_pass`).
        let n: usize = n.parse().unwrap_or(100_000);
        let base = Base::new();
        quantiles("idle_rwlock (profile)", n, |r| base.fsync_round(r));
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
