//! The deterministic scheduler: actors are threads, exactly one runs at a time, and control
//! changes hands only at scheduling points.
//!
//! # Definitions
//! - A *point* is a place where the kernel can be preempted or drops a lock: the extent-map
//!   layer's [`SchedPoint`]s (reported through its hook) and the points the actors add between
//!   kernel steps and at lock acquisition and release.
//! - A *step* is what one actor runs between two of its points. After every step the checks of
//!   [`crate::check`] run and the scheduler picks the next actor.
//! - An actor is *runnable* unless it is done or blocked; a blocked actor waits for a lock (the
//!   inode lock, the mmap lock, an io_tree range) or a condition (writeback finished, ordered
//!   extents complete) and becomes runnable when that is available again.
//! - The *options* at a decision are the runnable actors, the current one first (continuing it
//!   is option 0) and the others by id; a *choice* is the index picked. Picking another actor
//!   while the current one could go on is a *preemption*.
//!
//! # Invariants
//! - At most one actor thread runs outside `park` at any time (the one in `running`), so the
//!   real code is driven exactly as the schedule says and every run is reproducible from its
//!   choices (random mode: from the seed, which determines the choices).
//! - Points are never reached with the extent-map tree lock or the world mutex held (the
//!   extent-map hook contract, and `Ctx::world` takes a closure that cannot reach a point), so
//!   the checker and the blockers may take them.
//! - No actor ever blocks on a real lock: acquisitions are try-locks, a failed one parks the
//!   actor as blocked, so a schedule where nobody can run is detected (deadlock) instead of
//!   hanging. A run ends when every actor is done, or at the first violation that stops it,
//!   a deadlock, the step limit, or an actor that runs too long without a point (hung); the
//!   other actors are then unwound (their locks are released by their destructors).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use ubtrfs_extent_map::{flags, BtrfsInode, FsExtentMaps, Invariant, SchedPoint, Stats};

use crate::check::{Check, StopOn};
use crate::scenario::ActorKind;
use crate::world::World;

/// What every actor and the checker share.
pub struct Env {
    /// The real extent-map layer.
    pub fs: Arc<FsExtentMaps>,
    /// The model of everything else.
    pub world: Mutex<World>,
    /// Subvolume id of the scenario's inodes.
    pub root: u64,
}

impl Env {
    /// A fresh extent-map layer running `policy` at the scenarios' generation, with `world`.
    pub fn new(policy: ubtrfs_extent_map::Policy, world: World) -> Arc<Env> {
        let fs = FsExtentMaps::new(policy);
        fs.set_generation(crate::world::TRANSID);
        Arc::new(Env {
            fs,
            world: Mutex::new(world),
            root: crate::run::ROOT,
        })
    }
}

/// One step of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Actor that ran it.
    pub actor: usize,
    /// What it did (the point it reached).
    pub what: String,
    /// Checks that failed right after it (with details).
    pub checks: Vec<(Check, String)>,
}

/// One scheduling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Index picked among the options.
    pub pick: u32,
    /// Number of options (1 when the preemption bound forbade switching).
    pub n: u32,
    /// The current actor could have gone on.
    pub preemptive: bool,
}

/// How the scheduler picks.
#[derive(Clone, Debug)]
pub enum Strategy {
    /// Uniformly among the options, from a seeded generator.
    Random(SplitMix64),
    /// PCT (probabilistic concurrency testing, Burckhardt et al. 2010): every actor has a
    /// distinct priority and the runnable actor with the highest one runs; at each of the
    /// `change` decision indices the actor that just ran drops below everybody. Finds a bug
    /// that needs `change.len() + 1` ordering constraints with probability at least
    /// 1/(actors * steps^changes) per run, where uniform choices starve long actors.
    Pct {
        /// Priority per actor (higher runs first).
        prio: Vec<i64>,
        /// Decision indices at which the running actor's priority drops.
        change: Vec<usize>,
        /// Next low priority to hand out (decreasing).
        low: i64,
    },
    /// Follow `prefix`, then option 0; with a bound, no more than `bound` preemptions (DFS and
    /// replays of a schedule).
    Prefix {
        /// Choices to make first.
        prefix: Vec<u32>,
        /// Preemption bound.
        bound: Option<usize>,
    },
}

/// The splitmix64 generator (deterministic, no dependency).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl Strategy {
    /// PCT for `actors` actors over about `steps` decisions with `depth - 1` priority
    /// changes, all drawn from `seed`.
    pub fn pct(seed: u64, actors: usize, steps: usize, depth: usize) -> Strategy {
        let mut rng = SplitMix64::new(seed);
        // A random permutation of the priorities actors..1.
        let mut prio: Vec<i64> = (1..=actors as i64).collect();
        for i in (1..prio.len()).rev() {
            let j = rng.below(i as u32 + 1) as usize;
            prio.swap(i, j);
        }
        let steps = steps.max(1);
        let change = (1..depth)
            .map(|_| rng.below(steps as u32) as usize)
            .collect();
        Strategy::Pct {
            prio,
            change,
            low: 0,
        }
    }
}

impl SplitMix64 {
    /// Generator for `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed ^ 0x005e_ed0f_b7f5)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * n as u64) >> 32) as u32
    }
}

/// Why a run stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// 1-based index of the step after which it was found.
    pub step: usize,
    /// Actor that ran that step.
    pub actor: usize,
    /// The checks that stop the run (first one first) with their details.
    pub checks: Vec<(Check, String)>,
}

/// A condition a blocked actor waits for.
pub struct Blocker {
    /// For the schedule and deadlock reports.
    pub what: String,
    /// Is it available now? Called by the scheduler between steps.
    pub ready: Box<dyn Fn(&Env) -> bool + Send + Sync>,
}

enum Status {
    Runnable,
    Blocked(Blocker),
    Done,
}

struct ActorSlot {
    name: String,
    kind: ActorKind,
    status: Status,
    doing: String,
}

struct State {
    running: Option<usize>,
    actors: Vec<ActorSlot>,
    threads: Vec<Option<Thread>>,
    strategy: Strategy,
    choices: Vec<Choice>,
    preemptions: usize,
    steps: Vec<Step>,
    abort: bool,
    all_done: bool,
    failure: Option<Failure>,
    seen: BTreeMap<Check, usize>,
    prev: Stats,
    stale_logging_state: bool,
    stop: StopOn,
    max_steps: usize,
    last_progress: Instant,
    main: Thread,
}

/// The scheduler of one run.
pub struct Sched {
    env: Arc<Env>,
    st: Mutex<State>,
}

/// Unwinding payload that ends an actor when the run is aborted.
struct Aborted;

thread_local! {
    static CURRENT: RefCell<Option<(Arc<Sched>, usize)>> = const { RefCell::new(None) };
}

/// The extent-map layer's scheduling hook: hands over at the point if the calling thread is
/// an actor of a run, does nothing otherwise (setup code, other tests' threads).
fn em_hook(p: SchedPoint) {
    let cur = CURRENT.with(|c| c.borrow().clone());
    if let Some((s, me)) = cur {
        s.point_em(me, p);
    }
}

/// The result of one run, as the scheduler saw it.
pub struct Outcome {
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// Every decision.
    pub choices: Vec<Choice>,
    /// First step at which each check failed.
    pub seen: BTreeMap<Check, usize>,
    /// What stopped the run, if anything did.
    pub failure: Option<Failure>,
    /// Actor names.
    pub actors: Vec<String>,
}

/// What an actor thread runs.
pub type Body = Box<dyn FnOnce(&Ctx) + Send>;

/// Limits of one run.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Steps after which the run is stopped ([`Check::StepLimit`]).
    pub max_steps: usize,
    /// Time one actor may run without reaching a point ([`Check::Hung`]).
    pub hung_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: 20_000,
            hung_after: Duration::from_secs(30),
        }
    }
}

impl Sched {
    /// Runs `actors` (name, kind, body) to the end under `strategy`.
    pub fn run(
        env: Arc<Env>,
        actors: Vec<(String, ActorKind, Body)>,
        strategy: Strategy,
        stop: StopOn,
        limits: &Limits,
    ) -> Outcome {
        let prev = env.fs.stats();
        let sched = Arc::new(Sched {
            env: env.clone(),
            st: Mutex::new(State {
                running: None,
                actors: actors
                    .iter()
                    .map(|(n, k, _)| ActorSlot {
                        name: n.clone(),
                        kind: *k,
                        status: Status::Runnable,
                        doing: String::new(),
                    })
                    .collect(),
                threads: vec![None; actors.len()],
                strategy,
                choices: Vec::new(),
                preemptions: 0,
                steps: Vec::new(),
                abort: false,
                all_done: actors.is_empty(),
                failure: None,
                seen: BTreeMap::new(),
                prev,
                stale_logging_state: false,
                stop,
                max_steps: limits.max_steps,
                last_progress: Instant::now(),
                main: thread::current(),
            }),
        });
        env.fs.set_sched_hook(Some(em_hook));
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for (id, (name, _, body)) in actors.into_iter().enumerate() {
            let s = sched.clone();
            let h = thread::Builder::new()
                .name(format!("race-{name}"))
                .spawn(move || s.actor_main(id, body))
                .expect("spawn actor thread");
            sched.st.lock().threads[id] = Some(h.thread().clone());
            handles.push(h);
        }
        {
            let mut st = sched.st.lock();
            st.last_progress = Instant::now();
            if !st.all_done {
                sched.choose(&mut st, None);
            }
        }
        // Wait for the end, watching for an actor that never reaches a point.
        let mut hung = false;
        loop {
            let mut st = sched.st.lock();
            if st.all_done || st.abort {
                break;
            }
            if st.last_progress.elapsed() > limits.hung_after {
                let who = st.running.map(|r| st.actors[r].name.clone());
                let step = st.steps.len();
                let detail = format!(
                    "{} ran for more than {:?} without reaching a scheduling point",
                    who.unwrap_or_else(|| "nobody".into()),
                    limits.hung_after
                );
                Self::record_seen(&mut st, Check::Hung, step);
                st.failure = Some(Failure {
                    step,
                    actor: st.running.unwrap_or(0),
                    checks: vec![(Check::Hung, detail)],
                });
                Self::abort_all(&mut st);
                hung = true;
                break;
            }
            drop(st);
            thread::park_timeout(Duration::from_millis(200));
        }
        if !hung {
            for h in handles {
                let _ = h.join();
            }
        }
        env.fs.set_sched_hook(None);
        let mut st = sched.st.lock();
        Outcome {
            steps: std::mem::take(&mut st.steps),
            choices: std::mem::take(&mut st.choices),
            seen: std::mem::take(&mut st.seen),
            failure: st.failure.take(),
            actors: st.actors.iter().map(|a| a.name.clone()).collect(),
        }
    }

    fn actor_main(self: Arc<Self>, id: usize, body: Body) {
        // The explorer reports violations itself; the layer's tracing warnings would repeat
        // them once per run.
        let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
        CURRENT.with(|c| *c.borrow_mut() = Some((self.clone(), id)));
        let started = {
            let st = self.st.lock();
            self.wait_turn(st, id)
        };
        if started {
            let ctx = Ctx {
                sched: self.clone(),
                id,
            };
            let r = panic::catch_unwind(AssertUnwindSafe(|| body(&ctx)));
            if let Err(p) = r {
                if !p.is::<Aborted>() {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    let mut st = self.st.lock();
                    if !st.abort {
                        let step = st.steps.len() + 1;
                        let what = format!("{}: panicked: {msg}", st.actors[id].doing);
                        st.steps.push(Step {
                            actor: id,
                            what,
                            checks: vec![(Check::ActorPanic, msg.clone())],
                        });
                        Self::record_seen(&mut st, Check::ActorPanic, step);
                        st.failure = Some(Failure {
                            step,
                            actor: id,
                            checks: vec![(Check::ActorPanic, msg)],
                        });
                        Self::abort_all(&mut st);
                    }
                }
            }
        }
        CURRENT.with(|c| *c.borrow_mut() = None);
        let mut st = self.st.lock();
        st.actors[id].status = Status::Done;
        if !st.abort && st.running == Some(id) {
            self.end_step(&mut st, id, "done".into());
            if !st.abort {
                self.choose(&mut st, Some(id));
            }
        }
    }

    /// Parks until it is `me`'s turn; false if the run was aborted first.
    fn wait_turn<'a>(&'a self, mut st: MutexGuard<'a, State>, me: usize) -> bool {
        loop {
            if st.abort {
                return false;
            }
            if st.running == Some(me) {
                return true;
            }
            drop(st);
            thread::park();
            st = self.st.lock();
        }
    }

    /// Same, unwinding the actor if the run was aborted.
    fn wait_turn_or_unwind<'a>(&'a self, st: MutexGuard<'a, State>, me: usize) {
        if !self.wait_turn(st, me) {
            panic::resume_unwind(Box::new(Aborted));
        }
    }

    fn point_em(&self, me: usize, p: SchedPoint) {
        if thread::panicking() {
            return;
        }
        let what = {
            let st = self.st.lock();
            format!("{} [{p:?}]", st.actors[me].doing)
        };
        self.point(me, what);
    }

    /// The end of a step of `me`: check, pick the next actor, wait for `me`'s next turn.
    pub(crate) fn point(&self, me: usize, what: String) {
        if thread::panicking() {
            return;
        }
        let mut st = self.st.lock();
        if st.abort {
            drop(st);
            panic::resume_unwind(Box::new(Aborted));
        }
        self.end_step(&mut st, me, what);
        if !st.abort {
            self.choose(&mut st, Some(me));
        }
        self.wait_turn_or_unwind(st, me);
    }

    /// `me` cannot go on until `b` is ready: a step that ends blocked.
    pub(crate) fn block(&self, me: usize, b: Blocker) {
        if thread::panicking() {
            return;
        }
        let mut st = self.st.lock();
        if st.abort {
            drop(st);
            panic::resume_unwind(Box::new(Aborted));
        }
        let what = format!("{}: waits for {}", st.actors[me].doing, b.what);
        st.actors[me].status = Status::Blocked(b);
        self.end_step(&mut st, me, what);
        if !st.abort {
            self.choose(&mut st, Some(me));
        }
        self.wait_turn_or_unwind(st, me);
    }

    fn set_doing(&self, me: usize, what: String) {
        self.st.lock().actors[me].doing = what;
    }

    fn record_seen(st: &mut State, c: Check, step: usize) {
        st.seen.entry(c).or_insert(step);
    }

    fn abort_all(st: &mut State) {
        st.abort = true;
        for t in st.threads.iter().flatten() {
            t.unpark();
        }
        st.main.unpark();
    }

    /// Records the step and runs the checks.
    fn end_step(&self, st: &mut State, me: usize, what: String) {
        st.last_progress = Instant::now();
        let checks = self.run_checks(st, me);
        let step = st.steps.len() + 1;
        for (c, _) in &checks {
            Self::record_seen(st, *c, step);
        }
        let stopping: Vec<(Check, String)> = checks
            .iter()
            .filter(|(c, _)| st.stop.stops(*c))
            .cloned()
            .collect();
        st.steps.push(Step {
            actor: me,
            what,
            checks,
        });
        if !stopping.is_empty() && st.failure.is_none() {
            st.failure = Some(Failure {
                step,
                actor: me,
                checks: stopping,
            });
            Self::abort_all(st);
            return;
        }
        if st.steps.len() >= st.max_steps && st.failure.is_none() {
            let detail = format!("{} steps", st.steps.len());
            Self::record_seen(st, Check::StepLimit, step);
            st.failure = Some(Failure {
                step,
                actor: me,
                checks: vec![(Check::StepLimit, detail)],
            });
            Self::abort_all(st);
        }
    }

    /// The checks of [`crate::check`] after a step of `me`.
    fn run_checks(&self, st: &mut State, me: usize) -> Vec<(Check, String)> {
        let env = &self.env;
        let mut out = Vec::new();
        let stats = env.fs.stats();
        for inv in Invariant::ALL {
            let d = stats.violations(inv) - st.prev.violations(inv);
            if d > 0 {
                out.push((Check::Em(inv), format!("+{d}")));
            }
        }
        let removed_listed = stats.violations(Invariant::RemovedStillListed)
            - st.prev.violations(Invariant::RemovedStillListed);
        if removed_listed > 0 {
            match st.actors[me].kind {
                ActorKind::Shrinker => out.push((
                    Check::ShrinkerRemovedListedLogging,
                    format!("{removed_listed} map(s)"),
                )),
                ActorKind::ReleaseFolio => out.push((
                    Check::ReleaseRemovedListedLogging,
                    format!("{removed_listed} map(s)"),
                )),
                _ => {}
            }
        }
        st.prev = stats;
        let Some(mut w) = env.world.try_lock() else {
            panic!("the world mutex is held across a scheduling point");
        };
        for e in w.errors.drain(..) {
            out.push((e.check, e.detail));
        }
        // State check: LOGGING outside any logging pass of the inode.
        let mut stale = Vec::new();
        for (ino, m) in &w.inodes {
            if m.evicted || w.logging.contains_key(ino) {
                continue;
            }
            let Some(inode) = env.fs.lookup_inode(env.root, *ino) else {
                continue;
            };
            for em in inode.modified_extents() {
                if em.has(flags::LOGGING) {
                    stale.push(format!(
                        "ino {ino} [{}, {}) on the modified list",
                        crate::fmt_size(em.start),
                        crate::fmt_size(em.end())
                    ));
                }
            }
            for em in inode.extent_maps() {
                if em.has(flags::LOGGING) {
                    stale.push(format!(
                        "ino {ino} [{}, {}) in the tree",
                        crate::fmt_size(em.start),
                        crate::fmt_size(em.end())
                    ));
                }
            }
        }
        drop(w);
        if stale.is_empty() {
            st.stale_logging_state = false;
        } else if !st.stale_logging_state {
            st.stale_logging_state = true;
            stale.dedup();
            out.push((Check::LoggingOutsideFsync, stale.join("; ")));
        }
        out
    }

    fn runnable(&self, st: &State, i: usize) -> bool {
        match &st.actors[i].status {
            Status::Runnable => true,
            Status::Blocked(b) => (b.ready)(&self.env),
            Status::Done => false,
        }
    }

    /// Picks the next actor after a step of `current` (None at the start).
    fn choose(&self, st: &mut State, current: Option<usize>) {
        let cur = current.filter(|c| self.runnable(st, *c));
        let mut options: Vec<usize> = cur.into_iter().collect();
        for i in 0..st.actors.len() {
            if Some(i) != cur && self.runnable(st, i) {
                options.push(i);
            }
        }
        if options.is_empty() {
            if st.actors.iter().all(|a| matches!(a.status, Status::Done)) {
                st.running = None;
                st.all_done = true;
                st.main.unpark();
                return;
            }
            let waiting: Vec<String> = st
                .actors
                .iter()
                .filter_map(|a| match &a.status {
                    Status::Blocked(b) => Some(format!("{} waits for {}", a.name, b.what)),
                    _ => None,
                })
                .collect();
            let step = st.steps.len();
            Self::record_seen(st, Check::Deadlock, step);
            if st.failure.is_none() {
                st.failure = Some(Failure {
                    step,
                    actor: current.unwrap_or(0),
                    checks: vec![(Check::Deadlock, waiting.join("; "))],
                });
            }
            Self::abort_all(st);
            return;
        }
        let preemptive = cur.is_some();
        let n = options.len() as u32;
        let decision = st.choices.len();
        let (pick, n) = match &mut st.strategy {
            Strategy::Random(rng) => (rng.below(n), n),
            Strategy::Pct { prio, change, low } => {
                if let Some(c) = current {
                    if change.contains(&decision) {
                        *low -= 1;
                        prio[c] = *low;
                    }
                }
                let best = (0..options.len())
                    .max_by_key(|i| prio[options[*i]])
                    .unwrap_or(0);
                (best as u32, n)
            }
            Strategy::Prefix { prefix, bound } => {
                let lim = if preemptive && bound.is_some_and(|b| st.preemptions >= b) {
                    1
                } else {
                    n
                };
                let p = prefix
                    .get(st.choices.len())
                    .copied()
                    .unwrap_or(0)
                    .min(lim - 1);
                (p, lim)
            }
        };
        st.choices.push(Choice {
            pick,
            n,
            preemptive,
        });
        if preemptive && pick != 0 {
            st.preemptions += 1;
        }
        let next = options[pick as usize];
        st.actors[next].status = Status::Runnable;
        st.running = Some(next);
        if Some(next) != current {
            if let Some(t) = &st.threads[next] {
                t.unpark();
            }
        }
    }
}

/// Which of an inode's two sleeping locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeLock {
    /// `i_rwsem`.
    Inode,
    /// `i_mmap_lock`.
    Mmap,
}

/// Lock mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// down_read.
    Shared,
    /// down_write.
    Exclusive,
}

impl Mode {
    /// "SHARED" / "EXCL".
    pub fn name(self) -> &'static str {
        match self {
            Mode::Shared => "SHARED",
            Mode::Exclusive => "EXCL",
        }
    }
}

/// A held inode or mmap lock.
pub enum Held<'a> {
    /// Shared.
    Shared(RwLockReadGuard<'a, ()>),
    /// Exclusive.
    Exclusive(RwLockWriteGuard<'a, ()>),
}

fn lock_of(inode: &BtrfsInode, which: InodeLock) -> &RwLock<()> {
    match which {
        InodeLock::Inode => inode.inode_lock(),
        InodeLock::Mmap => inode.mmap_lock(),
    }
}

fn try_take(l: &RwLock<()>, mode: Mode) -> Option<Held<'_>> {
    match mode {
        Mode::Shared => l.try_read().map(Held::Shared),
        Mode::Exclusive => l.try_write().map(Held::Exclusive),
    }
}

/// An actor's handle on the run.
pub struct Ctx {
    sched: Arc<Sched>,
    id: usize,
}

/// A held io_tree range lock (EXTENT_LOCKED); released on drop.
pub struct RangeGuard<'a> {
    ctx: &'a Ctx,
    ino: u64,
    start: u64,
    end: u64,
    released: bool,
}

impl RangeGuard<'_> {
    /// `unlock_extent`, then a point.
    pub fn unlock(mut self) {
        self.release();
        self.ctx.point(format!(
            "unlock_extent ino {} [{}, {})",
            self.ino,
            crate::fmt_size(self.start),
            crate::fmt_size(self.end)
        ));
    }

    fn release(&mut self) {
        if !self.released {
            self.released = true;
            let (ino, s, e, me) = (self.ino, self.start, self.end, self.ctx.id);
            let mut w = self.ctx.sched.env.world.lock();
            if let Some(i) = w
                .range_locks
                .iter()
                .position(|l| l.ino == ino && l.start == s && l.end == e && l.owner == me)
            {
                w.range_locks.remove(i);
            }
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Ctx {
    /// This actor's id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Ends a step: `what` is what the actor just did.
    pub fn point(&self, what: impl Into<String>) {
        let doing = {
            let st = self.sched.st.lock();
            st.actors[self.id].doing.clone()
        };
        let what = what.into();
        let what = if doing.is_empty() {
            what
        } else {
            format!("{doing}: {what}")
        };
        self.sched.point(self.id, what);
    }

    /// Sets the operation the actor is in (prefixes its step descriptions, including the
    /// extent-map layer's points).
    pub fn doing(&self, what: impl Into<String>) {
        self.sched.set_doing(self.id, what.into());
    }

    /// Runs `f` on the world. `f` must not reach a scheduling point (no extent-map calls).
    pub fn world<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        let mut w = self
            .sched
            .env
            .world
            .try_lock()
            .expect("world mutex is never contended");
        f(&mut w)
    }

    /// Like [`Ctx::world`], but waits for the mutex: for destructors, which may run while a
    /// run is being aborted and other actors unwind at the same time.
    pub(crate) fn world_blocking<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut self.sched.env.world.lock())
    }

    /// The extent-map layer.
    pub fn fs(&self) -> &Arc<FsExtentMaps> {
        &self.sched.env.fs
    }

    /// The extent-map inode `ino` of the scenario's root.
    pub fn inode(&self, ino: u64) -> Arc<BtrfsInode> {
        self.sched.env.fs.inode(self.sched.env.root, ino)
    }

    /// Subvolume id.
    pub fn root(&self) -> u64 {
        self.sched.env.root
    }

    /// Blocks until `pred` holds (returns at once, without a point, if it already does).
    pub fn wait_until(
        &self,
        what: impl Into<String>,
        pred: impl Fn(&World) -> bool + Send + Sync + 'static,
    ) {
        let what = what.into();
        let pred = Arc::new(pred);
        loop {
            if self.world(|w| pred(w)) {
                return;
            }
            let p2 = pred.clone();
            self.sched.block(
                self.id,
                Blocker {
                    what: what.clone(),
                    ready: Box::new(move |env: &Env| match env.world.try_lock() {
                        Some(w) => p2(&w),
                        None => false,
                    }),
                },
            );
        }
    }

    /// Takes an inode's inode or mmap lock in `mode`, blocking (not runnable) while it is
    /// taken, then ends the step.
    pub fn lock<'a>(&self, inode: &'a Arc<BtrfsInode>, which: InodeLock, mode: Mode) -> Held<'a> {
        let name = match which {
            InodeLock::Inode => "inode lock",
            InodeLock::Mmap => "mmap lock",
        };
        loop {
            if let Some(h) = try_take(lock_of(inode, which), mode) {
                self.point(format!(
                    "took {name} of ino {} {}",
                    inode.ino(),
                    mode.name()
                ));
                return h;
            }
            let i2 = inode.clone();
            self.sched.block(
                self.id,
                Blocker {
                    what: format!("{name} of ino {} {}", inode.ino(), mode.name()),
                    ready: Box::new(move |_| try_take(lock_of(&i2, which), mode).is_some()),
                },
            );
        }
    }

    /// Releases a lock taken with [`Ctx::lock`], then ends the step.
    pub fn unlock(&self, held: Held<'_>, inode: &BtrfsInode, which: InodeLock) {
        let mode = match &held {
            Held::Shared(_) => Mode::Shared,
            Held::Exclusive(_) => Mode::Exclusive,
        };
        drop(held);
        let name = match which {
            InodeLock::Inode => "inode lock",
            InodeLock::Mmap => "mmap lock",
        };
        self.point(format!(
            "released {name} of ino {} {}",
            inode.ino(),
            mode.name()
        ));
    }

    /// `lock_extent(io_tree, start, end - 1)`: blocks while any part is locked, then ends the
    /// step.
    pub fn lock_range(&self, ino: u64, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let me = self.id;
            let got = self.world(|w| {
                if w.range_locked(ino, start, end) {
                    false
                } else {
                    w.range_locks.push(crate::world::RangeLock {
                        ino,
                        start,
                        end,
                        owner: me,
                    });
                    true
                }
            });
            if got {
                let g = RangeGuard {
                    ctx: self,
                    ino,
                    start,
                    end,
                    released: false,
                };
                self.point(format!(
                    "lock_extent ino {ino} [{}, {})",
                    crate::fmt_size(start),
                    crate::fmt_size(end)
                ));
                return g;
            }
            self.wait_until(
                format!(
                    "io range ino {ino} [{}, {})",
                    crate::fmt_size(start),
                    crate::fmt_size(end)
                ),
                move |w| !w.range_locked(ino, start, end),
            );
        }
    }
}
