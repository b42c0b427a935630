//! A run directory, parsed into one status per test.
//!
//! The `run` script runs `./check TEST` once per test (so that a hang is bounded by `timeout`
//! and cannot take the rest of the run with it) and leaves, under its output directory:
//!
//! ```text
//! run.info                 key=value lines: mode, xfstests commit, ubtrfs version, devices, ...
//! tests.txt                the tests asked for, in order
//! log/generic/001.check    check's stdout and stderr for that test
//! log/generic/001.status   exit=N, seconds=N, timeout=0|1, limit=N (when check returned)
//! results/generic/001.*    xfstests' own files (RESULT_BASE): .notrun, .out.bad, .full, .dmesg
//! ```
//!
//! A test with no status file was not measured. A timed-out test failed. Otherwise check's own
//! summary decides (`Failures:`, `Not run:`, `Passed all`), and the lines check printed for the
//! test give the reason: xfstests' "not run" message, an output mismatch with its first wrong
//! line, a failed filesystem check, a non-zero exit status, a kernel warning in dmesg.

use crate::{valid_test_name, Status};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The outcome of one test in a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestResult {
    pub name: String,
    pub status: Status,
    /// Empty for a pass; otherwise why it did not pass (one line).
    pub reason: String,
    /// Wall-clock seconds check took for the test, when measured.
    pub seconds: Option<u64>,
}

/// What the `run` script recorded about one `./check TEST` invocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStatus {
    pub exit: Option<i32>,
    pub seconds: Option<u64>,
    pub timed_out: bool,
    /// The time limit the test ran under, in seconds.
    pub limit: Option<u64>,
}

impl RunStatus {
    pub fn parse(text: &str) -> RunStatus {
        let mut st = RunStatus::default();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            match k {
                "exit" => st.exit = v.parse().ok(),
                "seconds" => st.seconds = v.parse().ok(),
                "timeout" => st.timed_out = v == "1",
                "limit" => st.limit = v.parse().ok(),
                _ => {}
            }
        }
        st
    }
}

/// Devices of the run, to say which one a failed filesystem check was about.
#[derive(Clone, Debug, Default)]
pub struct Devices {
    pub test_dev: Option<String>,
    pub scratch_dev: Option<String>,
}

impl Devices {
    fn name_of(&self, dev: &str) -> String {
        if self.test_dev.as_deref() == Some(dev) {
            "the test device".into()
        } else if self.scratch_dev.as_deref() == Some(dev) {
            "the scratch device".into()
        } else {
            dev.to_string()
        }
    }
}

/// Keep a reason to one readable line.
pub fn one_line(s: &str, max: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= max {
        s
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(3)).collect();
        t.push_str("...");
        t
    }
}

/// Classify one test from check's output (`check`), the status the script recorded, and the
/// `.notrun` file xfstests wrote (if any).
pub fn classify(
    name: &str,
    check: &str,
    status: &RunStatus,
    notrun_file: Option<&str>,
    devices: &Devices,
) -> TestResult {
    if status.timed_out {
        let secs = match (status.limit, status.seconds) {
            (Some(l), _) => format!(" within the {l} s time limit"),
            (None, Some(s)) => format!(" after {s} s"),
            (None, None) => String::new(),
        };
        return TestResult {
            name: name.to_string(),
            status: Status::Fail,
            reason: format!("timeout: no result{secs} (hang?), killed by the glue"),
            seconds: status.seconds,
        };
    }
    let block = test_block(check, name);
    let mut failures_listed = false;
    let mut notrun_listed = false;
    let mut passed_all = false;
    for line in check.lines() {
        if let Some(rest) = line.strip_prefix("Failures:") {
            failures_listed |= rest.split_whitespace().any(|t| t == name);
        } else if let Some(rest) = line.strip_prefix("Not run:") {
            notrun_listed |= rest.split_whitespace().any(|t| t == name);
        } else if line.starts_with("Passed all ") {
            passed_all = true;
        }
    }
    let fail_reasons = failure_reasons(&block, devices);
    let notrun_line = block
        .iter()
        .find_map(|l| l.split_once("[not run]").map(|(_, r)| r.trim().to_string()));
    let expunged = block.iter().any(|l| l.contains("[expunged]"));
    if failures_listed || (!fail_reasons.is_empty() && !notrun_listed) {
        let reason = if fail_reasons.is_empty() {
            "failed (check lists it under Failures:)".to_string()
        } else {
            fail_reasons.join("; ")
        };
        return TestResult {
            name: name.to_string(),
            status: Status::Fail,
            reason: one_line(&reason, 200),
            seconds: status.seconds,
        };
    }
    if notrun_listed || notrun_line.is_some() || expunged {
        let reason = notrun_file
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or(notrun_line)
            .unwrap_or_else(|| "expunged".into());
        return TestResult {
            name: name.to_string(),
            status: Status::NotRun,
            reason: one_line(&reason, 200),
            seconds: None,
        };
    }
    if passed_all && status.exit.unwrap_or(0) == 0 {
        return TestResult {
            name: name.to_string(),
            status: Status::Pass,
            reason: String::new(),
            seconds: status_seconds(Status::Pass, check, name).or(status.seconds),
        };
    }
    // check ended without saying anything about the test: an interrupted or broken run.
    let last = check
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    let exit = status
        .exit
        .map(|e| format!("exit status {e}"))
        .unwrap_or_else(|| "no exit status".into());
    TestResult {
        name: name.to_string(),
        status: Status::Fail,
        reason: one_line(&format!("check gave no result ({exit}): {last}"), 200),
        seconds: status.seconds,
    }
}

/// The lines check printed about `name`: from the line that starts with the name to the
/// summary (`Ran:`) or the next test.
fn test_block<'a>(check: &'a str, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in check.lines() {
        let starts_test = line
            .split_whitespace()
            .next()
            .is_some_and(|w| valid_test_name(w) && line.starts_with(w));
        if starts_test {
            inside = line.split_whitespace().next() == Some(name);
        } else if line.starts_with("Ran:") {
            inside = false;
        }
        if inside {
            out.push(line);
        }
    }
    out
}

/// Seconds check printed for a passing test: `generic/001 5s ...  4s` or `generic/001   4s`.
fn status_seconds(status: Status, check: &str, name: &str) -> Option<u64> {
    if status != Status::Pass {
        return None;
    }
    let line = check
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    let last = line.split_whitespace().last()?;
    last.strip_suffix('s')?.parse().ok()
}

fn failure_reasons(block: &[&str], devices: &Devices) -> Vec<String> {
    let mut reasons = Vec::new();
    // An unmount that failed leaves the filesystem mounted, and the check that follows fails
    // without having looked at it: say that, not "inconsistent".
    let busy = block
        .iter()
        .any(|l| l.contains("umount: ") && l.contains("target is busy"));
    if busy {
        reasons.push("umount failed (target is busy): the filesystem could not be checked".into());
    }
    for (i, line) in block.iter().enumerate() {
        if let Some(pos) = line.find("[failed, exit status ") {
            let rest = &line[pos + "[failed, exit status ".len()..];
            let code: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            reasons.push(format!("exit status {code}"));
        }
        if let Some(pos) = line.find("filesystem on ") {
            if line.contains("is inconsistent") && !busy {
                let dev = line[pos + "filesystem on ".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("?");
                let what = if line.contains("_check_fuse_filesystem")
                    || line.contains("_check_btrfs_filesystem")
                {
                    "btrfs check"
                } else {
                    "filesystem check"
                };
                reasons.push(format!("{what} failed on {}", devices.name_of(dev)));
            }
        }
        if line.contains("_check_dmesg: something found in dmesg") {
            reasons.push("kernel warning or BUG in dmesg".into());
        }
        if line.contains("output mismatch") {
            let first = block[i + 1..]
                .iter()
                .map(|l| l.trim_start())
                .take_while(|l| !l.starts_with("(Run '"))
                .find(|l| l.starts_with('+') && !l.starts_with("+++"))
                .or_else(|| {
                    block[i + 1..]
                        .iter()
                        .map(|l| l.trim_start())
                        .take_while(|l| !l.starts_with("(Run '"))
                        .find(|l| l.starts_with('-') && !l.starts_with("---"))
                });
            match first {
                Some(l) => reasons.push(format!("output mismatch: {}", one_line(l, 120))),
                None => reasons.push("output mismatch".into()),
            }
        }
    }
    reasons
}

/// A parsed run directory.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// run.info, as key=value pairs.
    pub info: BTreeMap<String, String>,
    /// One result per test of tests.txt, in that order (unmeasured when never run).
    pub tests: Vec<TestResult>,
}

/// Errors reading a run directory.
#[derive(Debug)]
pub struct RunError(pub String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunError {}

fn read_opt(p: &Path) -> Result<Option<String>, RunError> {
    match std::fs::read(p) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RunError(format!("reading {}: {e}", p.display()))),
    }
}

/// Parse key=value lines (run.info).
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Read a run directory written by the `run` script.
pub fn read_run(dir: &Path) -> Result<Run, RunError> {
    let info = read_opt(&dir.join("run.info"))?
        .map(|t| parse_info(&t))
        .unwrap_or_default();
    let list = read_opt(&dir.join("tests.txt"))?.ok_or_else(|| {
        RunError(format!(
            "{}: no tests.txt (not a run directory of xfstests-glue/run)",
            dir.display()
        ))
    })?;
    let devices = Devices {
        test_dev: info.get("test_dev").cloned(),
        scratch_dev: info.get("scratch_dev").cloned(),
    };
    let mut tests = Vec::new();
    for name in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if !valid_test_name(name) {
            return Err(RunError(format!(
                "{}: tests.txt names {name:?}, not a test",
                dir.display()
            )));
        }
        tests.push(read_test(dir, name, &devices)?);
    }
    Ok(Run { info, tests })
}

fn log_path(dir: &Path, name: &str, ext: &str) -> PathBuf {
    dir.join("log").join(format!("{name}.{ext}"))
}

fn read_test(dir: &Path, name: &str, devices: &Devices) -> Result<TestResult, RunError> {
    let Some(status) = read_opt(&log_path(dir, name, "status"))? else {
        return Ok(TestResult {
            name: name.to_string(),
            status: Status::Unmeasured,
            reason: "not run yet".into(),
            seconds: None,
        });
    };
    let status = RunStatus::parse(&status);
    let check = read_opt(&log_path(dir, name, "check"))?.unwrap_or_default();
    let notrun = read_opt(&dir.join("results").join(format!("{name}.notrun")))?;
    Ok(classify(name, &check, &status, notrun.as_deref(), devices))
}
