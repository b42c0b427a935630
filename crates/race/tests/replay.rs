//! Reproducibility: a seed is one schedule, and every reported failing schedule replays to the
//! same violation at the same step; the command line prints what the issue asks for.

use ubtrfs_extent_map::Policy;
use ubtrfs_race::cli::{run_to, RaceArgs};
use ubtrfs_race::run::{
    exhaustive_nth, explore_exhaustive, explore_random, parse_schedule, run_schedule, run_seed,
    RunOpts, RunResult,
};
use ubtrfs_race::scenario::shipped;
use ubtrfs_race::Check;

fn same(a: &RunResult, b: &RunResult) {
    assert_eq!(a.steps, b.steps);
    assert_eq!(a.failure, b.failure);
    assert_eq!(a.seen, b.seen);
    assert_eq!(a.schedule(), b.schedule());
}

#[test]
fn every_failing_schedule_replays_to_the_same_violation() {
    // Test scenario: for the failing runs of three scenarios (random seeds and exhaustive
    // schedules), running the same seed again, the printed schedule, and the exhaustive index
    // gives the same steps and stops at the same step with the same checks.
    //
    //   run (seed S)                      replay (seed S / --schedule C)
    //   steps 1..n, stop at n: X          steps 1..n, stop at n: X
    let cases = [
        (
            "prealloc-dsync-dio",
            RunOpts::new(Policy::Kernel).nosec(true),
        ),
        (
            "prealloc-dsync-dio",
            RunOpts::new(Policy::Kernel)
                .nosec(true)
                .until(&[Check::ShrinkerRemovedListedLogging]),
        ),
        ("nocow-ioerr-fsync", RunOpts::new(Policy::Kernel)),
        ("reloc-fsync", RunOpts::new(Policy::FixedShrinker)),
    ];
    for (name, opts) in cases {
        let sc = shipped(name).unwrap();
        let mut failing = Vec::new();
        explore_random(&sc, &opts, 0..600, |seed, r| {
            if r.failed() && failing.len() < 3 {
                failing.push((seed, r.steps.clone(), r.failure.clone(), r.schedule()));
            }
        });
        for (seed, steps, failure, schedule) in &failing {
            let again = run_seed(&sc, &opts, *seed);
            assert_eq!(&again.steps, steps, "{name} seed {seed}");
            assert_eq!(&again.failure, failure, "{name} seed {seed}");
            let by_choices = run_schedule(&sc, &opts, &parse_schedule(schedule).unwrap());
            same(&again, &by_choices);
        }
        let mut exh = Vec::new();
        explore_exhaustive(&sc, &opts, 1, 1500, |i, r| {
            if r.failed() && exh.len() < 2 {
                exh.push((i, r.steps.clone(), r.failure.clone(), r.schedule()));
            }
        });
        for (i, steps, failure, schedule) in &exh {
            let nth = exhaustive_nth(&sc, &opts, 1, *i).unwrap();
            assert_eq!(&nth.steps, steps, "{name} schedule {i}");
            assert_eq!(&nth.failure, failure);
            let by_choices = run_schedule(&sc, &opts, &parse_schedule(schedule).unwrap());
            same(&nth, &by_choices);
        }
        assert!(
            !failing.is_empty() || !exh.is_empty(),
            "{name}: expected failing runs to replay"
        );
    }
}

#[test]
fn a_seed_is_one_schedule() {
    // Test scenario: the same seed twice gives the same run, step for step, including runs
    // with no violation; different seeds give different schedules.
    let sc = shipped("everything").unwrap();
    let opts = RunOpts::new(Policy::FixedSplit);
    let a = run_seed(&sc, &opts, 7);
    let b = run_seed(&sc, &opts, 7);
    same(&a, &b);
    let c = run_seed(&sc, &opts, 8);
    assert_ne!(a.schedule(), c.schedule());
}

fn cli(args: RaceArgs) -> String {
    let mut out = Vec::new();
    run_to(&args, &mut out).expect("ran");
    String::from_utf8(out).unwrap()
}

#[test]
fn command_line_table_and_replay() {
    // Test scenario: `ubtrfs race` prints the table and ends with `violations: N` and, when N
    // > 0, `first failing seed: S`; `--replay S` prints the steps and stops at the same check;
    // `--list` names every scenario and policy; a clean run ends with `violations: 0`.
    let base = RaceArgs {
        scenario: Some("prealloc-dsync-dio".into()),
        policy: "kernel".into(),
        seeds: 300,
        nosec: true,
        until: "any".into(),
        preemptions: 1,
        max_schedules: 1_000_000,
        max_steps: 20_000,
        ..RaceArgs::default()
    };
    let out = cli(base.clone());
    let lines: Vec<&str> = out.lines().collect();
    let n = lines.len();
    assert!(lines[n - 2].starts_with("violations: "), "{out}");
    let v: u64 = lines[n - 2]["violations: ".len()..].parse().unwrap();
    assert!(v > 0, "{out}");
    let seed: u64 = lines[n - 1]
        .strip_prefix("first failing seed: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(out.contains("stale_logging"), "{out}");
    assert!(out.contains("--replay"), "{out}");

    let replay = cli(RaceArgs {
        replay: Some(seed),
        ..base.clone()
    });
    assert!(replay.contains("result: stopped after step"), "{replay}");
    assert!(replay.trim_end().ends_with("violations: 1"), "{replay}");
    assert!(replay.contains("!! "), "{replay}");

    let clean = cli(RaceArgs {
        nosec: false,
        seeds: 50,
        ..base.clone()
    });
    assert!(clean.trim_end().ends_with("violations: 0"), "{clean}");
    assert!(clean.contains("runs"), "{clean}");

    let exh = cli(RaceArgs {
        scenario: Some("reloc-fsync".into()),
        nosec: false,
        exhaustive: true,
        ..base.clone()
    });
    assert!(
        exh.contains("every schedule within the bound explored"),
        "{exh}"
    );
    assert!(exh.contains("first failing seed: "), "{exh}");

    let list = cli(RaceArgs {
        list: true,
        ..RaceArgs::default()
    });
    for name in [
        "prealloc-dsync-dio",
        "buffered-fsync",
        "punch-fsync",
        "everything",
        "fixed-split",
        "fixed-shrinker",
        "fixed-both",
        "shrinker_removed_listed_logging",
    ] {
        assert!(list.contains(name), "{name}: {list}");
    }
}
