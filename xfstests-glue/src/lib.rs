//! xfstests glue: what the `run` script needs that is worth testing without xfstests.
//!
//! `xfstests-glue/run` (bash) makes the loop devices, installs the mount helper, runs xfstests'
//! `./check` one test at a time and cleans up. This crate does the rest, and CI tests it on
//! recorded result directories (`testdata/`):
//!
//! - [`config`]: the `local.config` xfstests reads, for ubtrfs (FSTYP=fuse with the glue's mkfs
//!   and fsck programs) and for the kernel's btrfs (FSTYP=btrfs, stock).
//! - [`results`]: a run directory (check's output per test, xfstests' result files) parsed into
//!   one status per test: pass, fail, notrun (with xfstests' reason), or unmeasured.
//! - [`expected`]: the expected-results file, the comparison of a run with it (a listed pass
//!   that no longer passes is a regression, a listed failure that passes means the file must be
//!   updated) and the writing of an updated file.
//! - [`reasons`]: xfstests' "not run" messages mapped to the reason in words of the kernel
//!   interface FUSE lacks (remap_file_range, FIEMAP, shutdown, ...) or of what this machine lacks.

pub mod config;
pub mod expected;
pub mod reasons;
pub mod results;

/// Status of one test, as the expected-results file writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Pass,
    Fail,
    NotRun,
    /// Not measured: the run did not get to it (or the file says "not run yet").
    Unmeasured,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::NotRun => "notrun",
            Status::Unmeasured => "unmeasured",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pass" => Status::Pass,
            "fail" => Status::Fail,
            "notrun" => Status::NotRun,
            "unmeasured" => Status::Unmeasured,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A test name as xfstests writes it: `DIR/NAME` (`generic/001`), nothing a shell or a path
/// could misread.
pub fn valid_test_name(name: &str) -> bool {
    let Some((dir, test)) = name.split_once('/') else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    ok(dir) && ok(test) && dir != ".." && test != ".."
}

/// Totals of a list of statuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub pass: usize,
    pub fail: usize,
    pub notrun: usize,
    pub unmeasured: usize,
}

impl Totals {
    pub fn add(&mut self, s: Status) {
        match s {
            Status::Pass => self.pass += 1,
            Status::Fail => self.fail += 1,
            Status::NotRun => self.notrun += 1,
            Status::Unmeasured => self.unmeasured += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.pass + self.fail + self.notrun + self.unmeasured
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tests: {} passed, {} failed, {} not run, {} unmeasured",
            self.total(),
            self.pass,
            self.fail,
            self.notrun,
            self.unmeasured
        )
    }
}
