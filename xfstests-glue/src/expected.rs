//! The expected-results file and the comparison of a run with it.
//!
//! Format: `#` comments, then one line per test, sorted: `TEST STATUS [REASON]`, where STATUS
//! is `pass`, `fail`, `notrun` or `unmeasured` and every status but `pass` has a one-line
//! reason (for `unmeasured`: "not run yet").
//!
//! Comparison: a test the file lists as `pass` that fails or is no longer run is a regression;
//! a test listed as `fail` that passes means the file must be updated. Both make the glue exit
//! non-zero. Other changes (a `notrun` that now runs, a `fail` now not run, an unmeasured test
//! that got a result, a test the file does not list) are reported without failing the run.
//! Only the tests a run measured are compared: a run of a few tests is compared on those.

use crate::config::Mode;
use crate::reasons::notrun_reason;
use crate::results::{one_line, TestResult};
use crate::{valid_test_name, Status, Totals};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One line of an expected-results file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub status: Status,
    pub reason: String,
}

/// A parsed expected-results file: its header comments and its entries by test name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub header: Vec<String>,
    pub entries: BTreeMap<String, Entry>,
}

/// A malformed expected-results file: where and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for ParseError {}

impl Expected {
    pub fn parse(text: &str) -> Result<Expected, ParseError> {
        let mut e = Expected::default();
        let mut seen_entry = false;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let err = |msg: String| ParseError { line: line_no, msg };
            let line = raw.trim_end();
            if line.trim().is_empty() {
                continue;
            }
            if line.trim_start().starts_with('#') {
                if !seen_entry {
                    e.header.push(line.to_string());
                }
                continue;
            }
            seen_entry = true;
            let mut it = line.splitn(3, char::is_whitespace);
            let name = it.next().unwrap_or_default();
            let status = it.next().unwrap_or_default().trim();
            let reason = it.next().unwrap_or_default().trim().to_string();
            if !valid_test_name(name) {
                return Err(err(format!(
                    "{name:?} is not a test name (like generic/001)"
                )));
            }
            let status = Status::parse(status).ok_or_else(|| {
                err(format!(
                    "{name}: status {status:?} is not pass, fail, notrun or unmeasured"
                ))
            })?;
            if status != Status::Pass && reason.is_empty() {
                return Err(err(format!("{name}: {status} needs a reason")));
            }
            if e.entries.contains_key(name) {
                return Err(err(format!("{name} is listed twice")));
            }
            e.entries.insert(name.to_string(), Entry { status, reason });
        }
        Ok(e)
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for e in self.entries.values() {
            t.add(e.status);
        }
        t
    }

    /// The file's text: header, then entries sorted by name, reasons aligned.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for h in &self.header {
            s.push_str(h);
            s.push('\n');
        }
        let width = self.entries.keys().map(|k| k.len()).max().unwrap_or(0);
        for (name, e) in &self.entries {
            if e.reason.is_empty() {
                let _ = writeln!(s, "{name:<width$} {}", e.status);
            } else {
                let _ = writeln!(s, "{name:<width$} {:<10} {}", e.status, e.reason);
            }
        }
        s
    }

    /// A new file from a run: each test of `results` gets its measured status. The reason is
    /// the old file's when the status did not change (a hand-written reason survives), and
    /// otherwise the run's (a "not run" message mapped by [`notrun_reason`] for `mode`). Tests
    /// the run has no result for keep their old lines.
    pub fn updated(&self, results: &[TestResult], mode: Mode) -> Expected {
        let mut out = self.clone();
        for r in results {
            let old = self.entries.get(&r.name);
            let entry = match r.status {
                Status::Unmeasured => match old {
                    Some(o) => o.clone(),
                    None => Entry {
                        status: Status::Unmeasured,
                        reason: "not run yet".into(),
                    },
                },
                Status::Pass => Entry {
                    status: Status::Pass,
                    reason: String::new(),
                },
                s => match old {
                    Some(o) if o.status == s && !o.reason.is_empty() => o.clone(),
                    _ => Entry {
                        status: s,
                        reason: match s {
                            Status::NotRun => notrun_reason(mode, &r.reason),
                            _ => one_line(&r.reason, 200),
                        },
                    },
                },
            };
            out.entries.insert(r.name.clone(), entry);
        }
        out
    }
}

/// How one test's result differs from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Listed as pass; failed or was not run.
    Regression,
    /// Listed as fail; passed.
    Fixed,
    /// Listed as unmeasured; now measured (reported, not an error).
    Measured,
    /// Any other change of status (reported, not an error).
    Changed,
    /// Not in the file at all.
    Unlisted,
}

/// One difference between a run and the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub name: String,
    pub change: Change,
    pub expected: Option<Status>,
    pub got: Status,
    pub reason: String,
}

/// A run compared with an expected-results file.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    pub totals: Totals,
    pub differences: Vec<Difference>,
}

impl Comparison {
    /// Regressions and fixed failures: what makes the glue exit non-zero.
    pub fn is_failure(&self) -> bool {
        self.differences
            .iter()
            .any(|d| matches!(d.change, Change::Regression | Change::Fixed))
    }

    pub fn count(&self, c: &Change) -> usize {
        self.differences.iter().filter(|d| &d.change == c).count()
    }
}

/// Compare a run's results with the file. Unmeasured results (the run did not get to the test)
/// are never differences.
pub fn compare(expected: &Expected, results: &[TestResult]) -> Comparison {
    let mut c = Comparison::default();
    for r in results {
        c.totals.add(r.status);
        if r.status == Status::Unmeasured {
            continue;
        }
        let exp = expected.entries.get(&r.name).map(|e| e.status);
        let change = match exp {
            None => Some(Change::Unlisted),
            Some(e) if e == r.status => None,
            Some(Status::Pass) => Some(Change::Regression),
            Some(Status::Fail) if r.status == Status::Pass => Some(Change::Fixed),
            Some(Status::Unmeasured) => Some(Change::Measured),
            Some(_) => Some(Change::Changed),
        };
        if let Some(change) = change {
            c.differences.push(Difference {
                name: r.name.clone(),
                change,
                expected: exp,
                got: r.status,
                reason: r.reason.clone(),
            });
        }
    }
    c
}

/// The report the glue prints: one line per test that did not pass, the totals, and every
/// difference from the expected file.
pub fn report(results: &[TestResult], cmp: Option<(&str, &Comparison)>) -> String {
    let mut s = String::new();
    let mut totals = Totals::default();
    for r in results {
        totals.add(r.status);
    }
    for status in [Status::Fail, Status::NotRun] {
        let list: Vec<_> = results.iter().filter(|r| r.status == status).collect();
        if list.is_empty() {
            continue;
        }
        let title = match status {
            Status::Fail => "Failed",
            _ => "Not run",
        };
        let _ = writeln!(s, "{title} ({}):", list.len());
        for r in list {
            let _ = writeln!(s, "  {:<14} {}", r.name, r.reason);
        }
    }
    let _ = writeln!(s, "Totals: {totals}");
    if let Some((file, c)) = cmp {
        if c.differences.is_empty() {
            let _ = writeln!(s, "Compared with {file}: no differences");
        } else {
            let _ = writeln!(
                s,
                "Compared with {file}: {} regressions, {} fixed (update the file), {} changed, {} newly measured, {} not listed",
                c.count(&Change::Regression),
                c.count(&Change::Fixed),
                c.count(&Change::Changed),
                c.count(&Change::Measured),
                c.count(&Change::Unlisted)
            );
            for d in &c.differences {
                let label = match d.change {
                    Change::Regression => "REGRESSION",
                    Change::Fixed => "FIXED",
                    Change::Changed => "changed",
                    Change::Measured => "measured",
                    Change::Unlisted => "unlisted",
                };
                let exp = d
                    .expected
                    .map(|e| e.as_str().to_string())
                    .unwrap_or_else(|| "-".into());
                let why = if d.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.reason)
                };
                let _ = writeln!(
                    s,
                    "  {label:<10} {:<14} expected {exp}, got {}{why}",
                    d.name, d.got
                );
            }
        }
    }
    s
}
