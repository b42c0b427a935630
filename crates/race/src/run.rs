//! Runs: setting a scenario up, one run under a strategy, and the two exploration modes
//! (seeded random schedules; bounded exhaustive DFS over the scheduling choices).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use ubtrfs_extent_map::{Policy, Stats};

use crate::actors::{self, ActorOpts};
use crate::check::{Check, StopOn};
use crate::scenario::{ExtentKind, Scenario};
use crate::sched::{Choice, Env, Failure, Limits, Sched, SplitMix64, Step, Strategy};
use crate::world::{
    FileExtentItem, InodeModel, ItemKind, Items, Logged, World, OLD_GEN, PAGE, TRANSID,
};

/// Subvolume of the scenarios' files (the default fs tree).
pub const ROOT: u64 = 5;

/// What a run is asked to do besides the scenario.
#[derive(Clone, Debug)]
pub struct RunOpts {
    /// Extent-map policy.
    pub policy: Policy,
    /// Direct writes within i_size take the inode lock shared (or the scenario says `nosec`).
    pub nosec: bool,
    /// Which checks stop a run.
    pub stop: StopOn,
    /// Step limit and hang detection.
    pub limits: Limits,
}

impl RunOpts {
    /// `policy`, stock locking, stop at the first violation, default limits.
    pub fn new(policy: Policy) -> Self {
        RunOpts {
            policy,
            nosec: false,
            stop: StopOn::Any,
            limits: Limits::default(),
        }
    }

    /// With `nosec`.
    pub fn nosec(mut self, on: bool) -> Self {
        self.nosec = on;
        self
    }

    /// Stop only on `checks` (and fatal ones).
    pub fn until(mut self, checks: &[Check]) -> Self {
        self.stop = StopOn::Only(checks.to_vec());
        self
    }
}

/// The result of one run.
#[derive(Debug)]
pub struct RunResult {
    /// Steps in order.
    pub steps: Vec<Step>,
    /// Scheduling decisions in order.
    pub choices: Vec<Choice>,
    /// First step (1-based) at which each check failed.
    pub seen: BTreeMap<Check, usize>,
    /// What stopped the run.
    pub failure: Option<Failure>,
    /// Actor names by id.
    pub actors: Vec<String>,
    /// Extent-map counters at the end.
    pub stats: Stats,
    /// What the fsyncs logged.
    pub logged: Vec<Logged>,
}

impl RunResult {
    /// The run was stopped by a check.
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// The choices, as `--schedule` takes them.
    pub fn schedule(&self) -> String {
        schedule_string(&self.choices)
    }
}

/// `0.1.0.2` (choices joined by dots); trailing zeros are dropped (they are the default).
pub fn schedule_string(choices: &[Choice]) -> String {
    let mut v: Vec<u32> = choices.iter().map(|c| c.pick).collect();
    while v.last() == Some(&0) {
        v.pop();
    }
    if v.is_empty() {
        return "0".into();
    }
    v.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// Parses a `--schedule` string.
pub fn parse_schedule(s: &str) -> Result<Vec<u32>, String> {
    s.split(['.', ','])
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| format!("bad choice {p:?} in schedule"))
        })
        .collect()
}

/// Builds the initial state: the extent-map layer (policy, generation) and the world, with
/// the scenario's file extent items and their maps (listed for `new` ones).
pub fn setup(sc: &Scenario, opts: &RunOpts) -> Arc<Env> {
    let mut world = World {
        next_disk: 1 << 30,
        ..World::default()
    };
    for f in &sc.files {
        world.inodes.insert(
            f.ino,
            InodeModel {
                ino: f.ino,
                i_size: f.size,
                nodatacow: f.nodatacow,
                items: Items::default(),
                dirty: Vec::new(),
                writeback: Vec::new(),
                needs_log: false,
                wb_err: false,
                evicted: false,
            },
        );
    }
    let env = Env::new(opts.policy, World::default());
    let env_fs = env.fs.clone();
    // Setup runs on this thread, which is no actor: the hook (not installed yet) would ignore it.
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    for e in &sc.extents {
        let disk = world.alloc_disk(e.len);
        let item = FileExtentItem {
            start: e.start,
            len: e.len,
            disk_bytenr: disk,
            disk_num_bytes: e.len,
            offset: 0,
            kind: match e.kind {
                ExtentKind::Reg => ItemKind::Reg,
                ExtentKind::Prealloc => ItemKind::Prealloc,
            },
            generation: if e.new { TRANSID } else { OLD_GEN },
        };
        let im = world.inode(e.ino);
        im.items.insert(item);
        let inode = env_fs.inode(ROOT, e.ino);
        if e.new {
            im.needs_log = true;
            inode
                .btrfs_replace_extent_map_range(item.to_map(), true)
                .expect("setup: replace");
        } else if e.cached {
            inode
                .btrfs_add_extent_mapping(item.to_map(), item.start, PAGE)
                .expect("setup: add");
        }
    }
    for a in &sc.actors {
        if let Some(i) = a.ino {
            *world.users.entry(i).or_insert(0) += 1;
        }
        if a.kind.produces_ordered() {
            world.producers_alive += 1;
        }
    }
    *env.world.lock() = world;
    env
}

/// One run of `sc` under `strategy`.
pub fn run_with(sc: &Scenario, opts: &RunOpts, strategy: Strategy) -> RunResult {
    let env = setup(sc, opts);
    let aopts = ActorOpts {
        nosec: opts.nosec || sc.nosec,
    };
    let names = sc.actor_names();
    let actors = sc
        .actors
        .iter()
        .zip(names)
        .map(|(a, n)| (n, a.kind, actors::body(a, aopts)))
        .collect();
    let out = Sched::run(
        env.clone(),
        actors,
        strategy,
        opts.stop.clone(),
        &opts.limits,
    );
    let logged = std::mem::take(&mut env.world.lock().log);
    RunResult {
        steps: out.steps,
        choices: out.choices,
        seen: out.seen,
        failure: out.failure,
        actors: out.actors,
        stats: env.fs.stats(),
        logged,
    }
}

/// Length (decisions) of the run that never preempts: the horizon PCT spreads its priority
/// changes over. Deterministic, so a seed means the same schedule everywhere.
pub fn horizon(sc: &Scenario, opts: &RunOpts) -> usize {
    let r = run_schedule(sc, opts, &[]);
    r.choices.len()
}

/// The strategy of random seed `seed`: seeds cycle through PCT with 0, 1, 2 and 3 priority
/// changes and uniform random choices (`seed % 5 == 4`).
pub fn seed_strategy(seed: u64, actors: usize, horizon: usize) -> Strategy {
    match seed % 5 {
        4 => Strategy::Random(SplitMix64::new(seed)),
        d => Strategy::pct(seed, actors, horizon, d as usize + 1),
    }
}

/// The run of random seed `seed`.
pub fn run_seed(sc: &Scenario, opts: &RunOpts, seed: u64) -> RunResult {
    let h = horizon(sc, opts);
    run_with(sc, opts, seed_strategy(seed, sc.actors.len(), h))
}

/// The run that makes the choices `choices` (then option 0: go on with the current actor).
pub fn run_schedule(sc: &Scenario, opts: &RunOpts, choices: &[u32]) -> RunResult {
    run_with(
        sc,
        opts,
        Strategy::Prefix {
            prefix: choices.to_vec(),
            bound: None,
        },
    )
}

/// Aggregate of many runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Runs made.
    pub runs: u64,
    /// Steps over all runs.
    pub steps: u64,
    /// Per check: runs in which it failed, and the first such seed (schedule index in
    /// exhaustive mode).
    pub per_check: BTreeMap<Check, (u64, u64)>,
    /// Runs stopped by a check.
    pub failing: u64,
    /// First failing seed / schedule index.
    pub first_failing: Option<u64>,
    /// Its choices.
    pub first_failing_schedule: Option<String>,
    /// The check(s) that stopped the first failing run.
    pub first_failing_checks: Vec<Check>,
    /// Exhaustive mode: every schedule within the bound was run (not cut by the cap).
    pub complete: Option<bool>,
}

impl Summary {
    fn add(&mut self, id: u64, r: &RunResult) {
        self.runs += 1;
        self.steps += r.steps.len() as u64;
        for c in r.seen.keys() {
            let e = self.per_check.entry(*c).or_insert((0, id));
            e.0 += 1;
        }
        if let Some(f) = &r.failure {
            self.failing += 1;
            if self.first_failing.is_none() {
                self.first_failing = Some(id);
                self.first_failing_schedule = Some(r.schedule());
                self.first_failing_checks = f.checks.iter().map(|c| c.0).collect();
            }
        }
    }

    /// Runs in which `c` failed.
    pub fn count(&self, c: Check) -> u64 {
        self.per_check.get(&c).map_or(0, |e| e.0)
    }
}

/// Runs seeds `seeds`; `each` sees every run (for tests that look inside).
pub fn explore_random(
    sc: &Scenario,
    opts: &RunOpts,
    seeds: Range<u64>,
    mut each: impl FnMut(u64, &RunResult),
) -> Summary {
    let mut s = Summary::default();
    let h = horizon(sc, opts);
    for seed in seeds {
        let r = run_with(sc, opts, seed_strategy(seed, sc.actors.len(), h));
        each(seed, &r);
        s.add(seed, &r);
    }
    s
}

/// The next DFS prefix after a run that made `choices`, or None when all were explored.
fn next_prefix(choices: &[Choice]) -> Option<Vec<u32>> {
    let mut t = choices.to_vec();
    while let Some(c) = t.pop() {
        if c.pick + 1 < c.n {
            let mut p: Vec<u32> = t.iter().map(|x| x.pick).collect();
            p.push(c.pick + 1);
            return Some(p);
        }
    }
    None
}

/// Every schedule with at most `bound` preemptions, in DFS order, up to `max` schedules;
/// `each` sees every run with its index.
pub fn explore_exhaustive(
    sc: &Scenario,
    opts: &RunOpts,
    bound: usize,
    max: u64,
    mut each: impl FnMut(u64, &RunResult),
) -> Summary {
    let mut s = Summary::default();
    let mut prefix = Vec::new();
    let mut n = 0u64;
    loop {
        let r = run_with(
            sc,
            opts,
            Strategy::Prefix {
                prefix: prefix.clone(),
                bound: Some(bound),
            },
        );
        each(n, &r);
        s.add(n, &r);
        n += 1;
        match next_prefix(&r.choices) {
            Some(p) if n < max => prefix = p,
            Some(_) => {
                s.complete = Some(false);
                return s;
            }
            None => {
                s.complete = Some(true);
                return s;
            }
        }
    }
}

/// Schedule number `index` of the exhaustive exploration (re-enumerated), if it exists.
pub fn exhaustive_nth(
    sc: &Scenario,
    opts: &RunOpts,
    bound: usize,
    index: u64,
) -> Option<RunResult> {
    let mut prefix = Vec::new();
    let mut n = 0u64;
    loop {
        let r = run_with(
            sc,
            opts,
            Strategy::Prefix {
                prefix: prefix.clone(),
                bound: Some(bound),
            },
        );
        if n == index {
            return Some(r);
        }
        n += 1;
        prefix = next_prefix(&r.choices)?;
    }
}
