//! The scheduler itself: a schedule where nobody can run is reported as a deadlock (with who
//! waits for what), not hung; so are livelocks (step limit), actors that never reach a point
//! (hung) and panics; the run's locks are released when it is torn down.

use std::time::Duration;

use ubtrfs_extent_map::Policy;
use ubtrfs_race::sched::{Body, Env, InodeLock, Limits, Mode, Sched, Strategy};
use ubtrfs_race::world::World;
use ubtrfs_race::{ActorKind, Check, Ctx, StopOn};

fn run(
    actors: Vec<(&str, Body)>,
    choices: Vec<u32>,
    limits: Limits,
) -> ubtrfs_race::sched::Outcome {
    let env = Env::new(Policy::Kernel, World::default());
    let actors = actors
        .into_iter()
        .map(|(n, b)| (n.to_string(), ActorKind::Fsync, b))
        .collect();
    Sched::run(
        env,
        actors,
        Strategy::Prefix {
            prefix: choices,
            bound: None,
        },
        StopOn::Any,
        &limits,
    )
}

fn abba(first: InodeLock, second: InodeLock) -> Body {
    Box::new(move |ctx: &Ctx| {
        let inode = ctx.inode(257);
        let a = ctx.lock(&inode, first, Mode::Exclusive);
        let b = ctx.lock(&inode, second, Mode::Exclusive);
        ctx.unlock(b, &inode, second);
        ctx.unlock(a, &inode, first);
    })
}

#[test]
fn deadlock_is_reported_not_hung() {
    // Test scenario: two actors take the inode and mmap locks in opposite orders; the schedule
    // that lets each take its first lock leaves nobody runnable: reported as a deadlock naming
    // both waits, and both threads are unwound (the test returns).
    //
    //   a                                  b
    //   inode lock EXCL
    //                                      mmap lock EXCL
    //   mmap lock: blocked                 inode lock: blocked
    let out = run(
        vec![
            ("a", abba(InodeLock::Inode, InodeLock::Mmap)),
            ("b", abba(InodeLock::Mmap, InodeLock::Inode)),
        ],
        // start a; after its first lock, switch to b.
        vec![0, 1],
        Limits::default(),
    );
    let f = out.failure.expect("deadlock");
    assert_eq!(f.checks[0].0, Check::Deadlock);
    let d = &f.checks[0].1;
    assert!(
        d.contains("a waits for mmap lock") && d.contains("b waits for inode lock"),
        "{d}"
    );
    // The schedule without the switch runs to the end.
    let ok = run(
        vec![
            ("a", abba(InodeLock::Inode, InodeLock::Mmap)),
            ("b", abba(InodeLock::Mmap, InodeLock::Inode)),
        ],
        vec![],
        Limits::default(),
    );
    assert!(ok.failure.is_none(), "{:?}", ok.failure);
}

#[test]
fn livelock_hits_the_step_limit() {
    // Test scenario: an actor that yields forever is stopped at the step limit.
    let out = run(
        vec![(
            "spin",
            Box::new(|ctx: &Ctx| loop {
                ctx.point("spin");
            }),
        )],
        vec![],
        Limits {
            max_steps: 100,
            ..Limits::default()
        },
    );
    assert_eq!(out.failure.unwrap().checks[0].0, Check::StepLimit);
    assert_eq!(out.steps.len(), 100);
}

#[test]
fn panic_is_reported_and_locks_released() {
    // Test scenario: an actor panics while another one waits for the lock it holds; the run
    // ends with actor_panic and the lock is released by unwinding.
    //
    //   holder                      waiter
    //   inode lock EXCL
    //                               inode lock: blocked
    //   panic
    let env = Env::new(Policy::Kernel, World::default());
    let inode = env.fs.inode(5, 257);
    let holder: Body = Box::new(|ctx: &Ctx| {
        let inode = ctx.inode(257);
        let _g = ctx.lock(&inode, InodeLock::Inode, Mode::Exclusive);
        ctx.point("holding");
        panic!("bug in an actor");
    });
    let waiter: Body = Box::new(|ctx: &Ctx| {
        let inode = ctx.inode(257);
        let g = ctx.lock(&inode, InodeLock::Inode, Mode::Exclusive);
        ctx.unlock(g, &inode, InodeLock::Inode);
    });
    let out = Sched::run(
        env,
        vec![
            ("holder".into(), ActorKind::Fsync, holder),
            ("waiter".into(), ActorKind::Fsync, waiter),
        ],
        Strategy::Prefix {
            prefix: vec![0, 1],
            bound: None,
        },
        StopOn::Any,
        &Limits::default(),
    );
    let f = out.failure.expect("panic reported");
    assert_eq!(f.checks[0].0, Check::ActorPanic);
    assert!(f.checks[0].1.contains("bug in an actor"));
    assert!(inode.inode_lock().try_write().is_some(), "lock released");
}

#[test]
fn an_actor_without_points_is_reported_hung() {
    // Test scenario: an actor busy for longer than the hang limit without reaching a point is
    // reported as hung (the run returns; the thread is left to finish on its own).
    let out = run(
        vec![(
            "sleeper",
            Box::new(|_ctx: &Ctx| std::thread::sleep(Duration::from_millis(1500))),
        )],
        vec![],
        Limits {
            hung_after: Duration::from_millis(200),
            ..Limits::default()
        },
    );
    assert_eq!(out.failure.unwrap().checks[0].0, Check::Hung);
}
