//! `ubtrfs race`: the command line of the explorer (the `ubtrfs` binary wires [`RaceArgs`] in as
//! a subcommand and calls [`run`]).
//!
//! Output of an exploration: a header, a table (runs, steps, and per check the number of runs
//! in which it failed and the first such seed), a replay command for the first failing run,
//! and last `violations: N` (runs stopped by a check) followed by `first failing seed: S`
//! when N > 0. It returns Ok whenever it ran, whatever it found.

use std::io::Write;
use std::path::PathBuf;

use ubtrfs_extent_map::Policy;

use crate::check::{Check, StopOn};
use crate::run::{
    exhaustive_nth, explore_exhaustive, explore_random, parse_schedule, run_schedule, run_seed,
    RunOpts, RunResult, Summary,
};
use crate::scenario::{shipped, Scenario, SHIPPED};
use crate::sched::Limits;

/// `ubtrfs race` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RaceArgs {
    /// List the shipped scenarios, the policies and the checks.
    #[arg(long)]
    pub list: bool,
    /// Shipped scenario to run (see --list).
    #[arg(long, value_name = "NAME")]
    pub scenario: Option<String>,
    /// Scenario file in the text format (see crates/race/src/scenario.rs).
    #[arg(long, value_name = "PATH", conflicts_with = "scenario")]
    pub scenario_file: Option<PathBuf>,
    /// Extent-map policy: kernel, fixed-split, fixed-shrinker or fixed-both.
    #[arg(long, default_value = "kernel")]
    pub policy: String,
    /// Number of random seeds to run.
    #[arg(long, default_value_t = 100)]
    pub seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Explore every schedule with at most --preemptions preemptions (DFS) instead of seeds.
    #[arg(long)]
    pub exhaustive: bool,
    /// Preemption bound of --exhaustive.
    #[arg(long, default_value_t = 2)]
    pub preemptions: usize,
    /// Cap on the schedules --exhaustive runs.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_schedules: u64,
    /// Force S_NOSEC: direct writes within i_size take the inode lock SHARED.
    #[arg(long)]
    pub nosec: bool,
    /// Checks that stop a run: `any` (default) or a comma-separated list of check names;
    /// the others are still counted.
    #[arg(long, default_value = "any")]
    pub until: String,
    /// Print the schedule of this seed (with --exhaustive: of this schedule index) step by
    /// step.
    #[arg(long, value_name = "SEED")]
    pub replay: Option<u64>,
    /// Print the run that makes these choices (dot-separated, as printed).
    #[arg(long, value_name = "CHOICES", conflicts_with = "replay")]
    pub schedule: Option<String>,
    /// Steps after which a run is stopped.
    #[arg(long, default_value_t = 20_000)]
    pub max_steps: usize,
}

/// Runs the command, printing to stdout. Err only for bad arguments.
pub fn run(args: &RaceArgs) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(args, &mut out)
}

/// Same, printing to `out`.
pub fn run_to(args: &RaceArgs, out: &mut dyn Write) -> Result<(), String> {
    let w = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    if args.list {
        list(out);
        return Ok(());
    }
    let (sc, sc_arg) = match (&args.scenario, &args.scenario_file) {
        (Some(n), _) => (
            shipped(n).ok_or_else(|| format!("unknown scenario {n:?} (see ubtrfs race --list)"))?,
            format!("--scenario {n}"),
        ),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            (
                Scenario::parse(&text).map_err(|e| format!("{}: {e}", p.display()))?,
                format!("--scenario-file {}", p.display()),
            )
        }
        (None, None) => return Err("need --scenario NAME, --scenario-file PATH or --list".into()),
    };
    let policy: Policy = args.policy.parse().map_err(|e| format!("{e}"))?;
    let stop = StopOn::parse(&args.until)?;
    let opts = RunOpts {
        policy,
        nosec: args.nosec,
        stop: stop.clone(),
        limits: Limits {
            max_steps: args.max_steps,
            ..Limits::default()
        },
    };
    let nosec = args.nosec || sc.nosec;
    let mut base = format!("ubtrfs race {sc_arg} --policy {}", policy.name());
    if args.nosec {
        base.push_str(" --nosec");
    }
    if stop != StopOn::Any {
        base.push_str(&format!(" --until {}", stop.to_arg()));
    }
    if args.max_steps != 20_000 {
        base.push_str(&format!(" --max-steps {}", args.max_steps));
    }
    let locking = if nosec {
        "nosec (direct writes within i_size take the inode lock SHARED)"
    } else {
        "stock (direct writes take the inode lock EXCLUSIVE)"
    };
    if args.replay.is_some() || args.schedule.is_some() {
        let (r, what) = if let Some(s) = &args.schedule {
            let choices = parse_schedule(s)?;
            (run_schedule(&sc, &opts, &choices), format!("schedule {s}"))
        } else if args.exhaustive {
            let i = args.replay.unwrap_or(0);
            let r = exhaustive_nth(&sc, &opts, args.preemptions, i).ok_or_else(|| {
                format!(
                    "there is no schedule {i} with at most {} preemptions",
                    args.preemptions
                )
            })?;
            (
                r,
                format!(
                    "exhaustive schedule {i} (preemption bound {})",
                    args.preemptions
                ),
            )
        } else {
            let seed = args.replay.unwrap_or(0);
            (run_seed(&sc, &opts, seed), format!("seed {seed}"))
        };
        w(
            out,
            format!(
                "ubtrfs race replay: scenario {}, policy {}, locking {locking}, {what}",
                sc.name,
                policy.name()
            ),
        );
        print_replay(out, &r, &base);
        return Ok(());
    }
    w(
        out,
        format!(
            "ubtrfs race: scenario {}, policy {}, locking {locking}",
            sc.name,
            policy.name()
        ),
    );
    let summary: Summary;
    let replay_of_first: String;
    if args.exhaustive {
        summary = explore_exhaustive(&sc, &opts, args.preemptions, args.max_schedules, |_, _| {});
        w(
            out,
            format!(
                "mode: exhaustive, at most {} preemption(s): {} schedule(s), {}; stop on: {}",
                args.preemptions,
                summary.runs,
                if summary.complete == Some(true) {
                    "every schedule within the bound explored".to_string()
                } else {
                    format!("cut at --max-schedules {}", args.max_schedules)
                },
                stop.to_arg()
            ),
        );
        replay_of_first = format!(
            "{base} --exhaustive --preemptions {} --replay {}",
            args.preemptions,
            summary.first_failing.unwrap_or(0)
        );
    } else {
        let seeds = args.first_seed..args.first_seed.saturating_add(args.seeds);
        w(
            out,
            format!(
                "mode: random, seeds {}..{}; stop on: {}",
                seeds.start,
                seeds.end,
                stop.to_arg()
            ),
        );
        summary = explore_random(&sc, &opts, seeds, |_, _| {});
        replay_of_first = format!("{base} --replay {}", summary.first_failing.unwrap_or(0));
    }
    print_table(out, &summary, args.exhaustive);
    if let Some(first) = summary.first_failing {
        w(
            out,
            format!(
                "first failing run stopped by: {}",
                summary
                    .first_failing_checks
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        w(out, format!("replay: {replay_of_first}"));
        if let Some(s) = &summary.first_failing_schedule {
            w(out, format!("        {base} --schedule {s}"));
        }
        w(out, format!("violations: {}", summary.failing));
        w(out, format!("first failing seed: {first}"));
    } else {
        w(out, format!("violations: {}", summary.failing));
    }
    Ok(())
}

fn list(out: &mut dyn Write) {
    let _ = writeln!(out, "scenarios:");
    for (name, _) in SHIPPED {
        let sc = shipped(name).expect("shipped scenarios parse");
        let _ = writeln!(out, "  {name}");
        let _ = writeln!(out, "      {}", sc.description);
    }
    let _ = writeln!(out, "policies:");
    let _ = writeln!(
        out,
        "  kernel          split pieces inherit LOGGING, shrinker skips only PINNED (6.12.100)"
    );
    let _ = writeln!(
        out,
        "  fixed-split     split pieces never get LOGGING (the upstream fix, current kernels)"
    );
    let _ = writeln!(
        out,
        "  fixed-shrinker  the shrinker also skips LOGGING maps (the June 2026 proposal)"
    );
    let _ = writeln!(out, "  fixed-both      both fixes");
    let _ = writeln!(out, "checks (--until):");
    for c in Check::all() {
        let _ = writeln!(out, "  {:32} {}", c.name(), c.meaning());
    }
}

fn print_table(out: &mut dyn Write, s: &Summary, exhaustive: bool) {
    let first = if exhaustive {
        "first schedule"
    } else {
        "first seed"
    };
    let _ = writeln!(out, "{:34} {:>10}", "runs", s.runs);
    let _ = writeln!(out, "{:34} {:>10}", "steps", s.steps);
    let _ = writeln!(out, "{:34} {:>10}  {}", "check", "runs", first);
    for c in Check::all() {
        let (n, f) = s.per_check.get(&c).copied().unwrap_or((0, 0));
        let f = if n > 0 { f.to_string() } else { "-".into() };
        let _ = writeln!(out, "  {:32} {:>10}  {}", c.name(), n, f);
    }
}

/// Prints a run step by step, the actors in columns of their own.
pub fn print_replay(out: &mut dyn Write, r: &RunResult, base: &str) {
    let _ = writeln!(
        out,
        "actors: {}",
        r.actors
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i} {a}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let width = r.actors.iter().map(|a| a.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(out, "{:>5}  {:width$}  what", "step", "actor");
    for (i, s) in r.steps.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>5}  {:width$}  {}",
            i + 1,
            r.actors.get(s.actor).map_or("?", |a| a.as_str()),
            s.what
        );
        for (c, d) in &s.checks {
            let _ = writeln!(
                out,
                "{:>5}  {:width$}  !! {}: {} ({d})",
                "",
                "",
                c.name(),
                c.meaning()
            );
        }
    }
    match &r.failure {
        Some(f) => {
            let _ = writeln!(
                out,
                "result: stopped after step {} ({}) by {}",
                f.step,
                r.actors.get(f.actor).map_or("?", |a| a.as_str()),
                f.checks
                    .iter()
                    .map(|(c, d)| format!("{c} [{d}]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        None => {
            let _ = writeln!(
                out,
                "result: every actor finished, no check stopped the run"
            );
        }
    }
    let _ = writeln!(out, "schedule: {}", r.schedule());
    let _ = writeln!(out, "replay: {base} --schedule {}", r.schedule());
    let _ = writeln!(out, "violations: {}", u32::from(r.failed()));
}
