//! `xfstests-glue`: the parts of `xfstests-glue/run` that are worth testing on their own.
//!
//! ```text
//! xfstests-glue config --mode ubtrfs|kernel-btrfs --test-dev DEV --test-dir DIR
//!     --scratch-dev DEV --scratch-mnt DIR --result-base DIR --glue-log FILE
//!     [--ubtrfs-bin BIN --libexec DIR]           print local.config
//! xfstests-glue report RUNDIR [--expect FILE]    summary, and the comparison with FILE
//!                                                (exit 1 on a regression or a fixed failure)
//! xfstests-glue results [--only TEST] RUNDIR...  one line per test: name, status, seconds, reason
//! xfstests-glue update-expected [--only-listed] FILE RUNDIR...
//!                                                FILE updated with the runs' results (stdout);
//!                                                --only-listed: only the tests FILE lists
//! xfstests-glue totals FILE...                   the totals of expected-results files
//! xfstests-glue wait-device-free DEV [SECS]       wait until no one holds DEV with O_EXCL
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use xfstests_glue::config::{Mode, Setup};
use xfstests_glue::expected::{compare, report, Expected};
use xfstests_glue::results::{read_run, TestResult};

const USAGE: &str =
    "usage: xfstests-glue config|report|results|update-expected|totals ... (see src/main.rs)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("xfstests-glue: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Options that take no value.
const BOOL_FLAGS: &[&str] = &["only-listed"];

/// `--name value` pairs (`--flag` for BOOL_FLAGS) and positional arguments.
struct Args {
    opts: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let mut opts = Vec::new();
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if BOOL_FLAGS.contains(&name) {
                    opts.push((name.to_string(), "1".to_string()));
                    continue;
                }
                let (name, value) = match name.split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => (
                        name.to_string(),
                        it.next()
                            .ok_or_else(|| format!("--{name} needs a value"))?
                            .clone(),
                    ),
                };
                opts.push((name, value));
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args { opts, positional })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn need(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.opts.iter().find(|(n, _)| !known.contains(&n.as_str())) {
            Some((n, _)) => Err(format!("unknown option --{n}")),
            None => Ok(()),
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    let a = Args::parse(rest)?;
    match cmd.as_str() {
        "config" => {
            a.only(&[
                "mode",
                "test-dev",
                "test-dir",
                "scratch-dev",
                "scratch-mnt",
                "result-base",
                "glue-log",
                "ubtrfs-bin",
                "libexec",
            ])?;
            let mode = Mode::parse(a.need("mode")?).ok_or("--mode is ubtrfs or kernel-btrfs")?;
            let setup = Setup {
                mode,
                test_dev: a.need("test-dev")?.into(),
                test_dir: a.need("test-dir")?.into(),
                scratch_dev: a.need("scratch-dev")?.into(),
                scratch_mnt: a.need("scratch-mnt")?.into(),
                result_base: a.need("result-base")?.into(),
                glue_log: a.need("glue-log")?.into(),
                ubtrfs_bin: a.get("ubtrfs-bin").map(PathBuf::from),
                libexec: a.get("libexec").map(PathBuf::from),
            };
            print!("{}", setup.local_config().map_err(|e| e.to_string())?);
            Ok(ExitCode::SUCCESS)
        }
        "report" => {
            a.only(&["expect"])?;
            let [dir] = a.positional.as_slice() else {
                return Err("report takes one run directory".into());
            };
            let run = read_run(Path::new(dir)).map_err(|e| e.to_string())?;
            let expected = match a.get("expect") {
                Some(f) => Some((f, read_expected(Path::new(f))?)),
                None => None,
            };
            let cmp = expected.as_ref().map(|(f, e)| (*f, compare(e, &run.tests)));
            print!("{}", report(&run.tests, cmp.as_ref().map(|(f, c)| (*f, c))));
            Ok(match cmp {
                Some((_, c)) if c.is_failure() => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            })
        }
        "results" => {
            a.only(&["only"])?;
            let (results, _) = read_runs_mode(&a.positional)?;
            // Raw reasons, as the run gave them (update-expected maps them).
            for r in results
                .iter()
                .filter(|r| a.get("only").is_none_or(|o| o == r.name))
            {
                let mut line = format!("{} {}", r.name, r.status);
                if let Some(s) = r.seconds {
                    line.push_str(&format!(" {s}s"));
                }
                if !r.reason.is_empty() {
                    line.push_str(&format!(" {}", r.reason));
                }
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        "update-expected" => {
            a.only(&["only-listed"])?;
            let Some((file, dirs)) = a.positional.split_first() else {
                return Err("update-expected takes FILE RUNDIR...".into());
            };
            let old = if Path::new(file).exists() {
                read_expected(Path::new(file))?
            } else {
                Expected::default()
            };
            let (mut results, mode) = read_runs_mode(dirs)?;
            if a.get("only-listed").is_some() {
                results.retain(|r| old.entries.contains_key(&r.name));
            }
            print!("{}", old.updated(&results, mode).render());
            Ok(ExitCode::SUCCESS)
        }
        "totals" => {
            a.only(&[])?;
            for f in &a.positional {
                let e = read_expected(Path::new(f))?;
                println!("{f}: {}", e.totals());
            }
            Ok(ExitCode::SUCCESS)
        }
        "wait-device-free" => {
            a.only(&[])?;
            let (dev, secs) = match a.positional.as_slice() {
                [dev] => (dev, 60.0),
                [dev, secs] => (
                    dev,
                    secs.parse::<f64>()
                        .map_err(|_| format!("{secs}: not a number of seconds"))?,
                ),
                _ => return Err("wait-device-free takes DEVICE [SECONDS]".into()),
            };
            wait_device_free(Path::new(dev), secs)?;
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(USAGE.into()),
    }
}

/// Wait until nothing holds `dev` exclusively. A FUSE daemon keeps its block device open with
/// O_EXCL until it has written its last transaction and exits, and umount(8) returns before
/// that; opening the device with O_EXCL ourselves fails with EBUSY while the daemon (or a
/// kernel mount) still holds it. (On a regular file O_EXCL without O_CREAT does nothing.)
fn wait_device_free(dev: &Path, secs: f64) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let limit = std::time::Duration::from_secs_f64(secs.max(0.0));
    let start = std::time::Instant::now();
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dev)
        {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < limit => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(format!(
                    "wait-device-free: {} still held after {secs:.0} s: {e}",
                    dev.display()
                ))
            }
            Err(e) => return Err(format!("wait-device-free: {}: {e}", dev.display())),
        }
    }
}

fn read_expected(p: &Path) -> Result<Expected, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    Expected::parse(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// Results of several runs of one mode, later runs overriding earlier ones for the same test
/// (a test re-run alone replaces its result in the whole run); unmeasured results never
/// override.
fn read_runs_mode(dirs: &[String]) -> Result<(Vec<TestResult>, Mode), String> {
    if dirs.is_empty() {
        return Err("no run directory given".into());
    }
    let mut order: Vec<String> = Vec::new();
    let mut by_name: std::collections::HashMap<String, TestResult> = Default::default();
    let mut mode = None;
    for d in dirs {
        let run = read_run(Path::new(d)).map_err(|e| e.to_string())?;
        let m = run
            .info
            .get("mode")
            .and_then(|m| Mode::parse(m))
            .ok_or_else(|| format!("{d}: run.info names no mode (ubtrfs or kernel-btrfs)"))?;
        if mode.is_some_and(|old| old != m) {
            return Err(format!(
                "{d}: a {} run among runs of another mode",
                m.as_str()
            ));
        }
        mode = Some(m);
        for t in run.tests {
            match by_name.get(&t.name) {
                None => {
                    order.push(t.name.clone());
                    by_name.insert(t.name.clone(), t);
                }
                Some(_) if t.status == xfstests_glue::Status::Unmeasured => {}
                Some(_) => {
                    by_name.insert(t.name.clone(), t);
                }
            }
        }
    }
    let results = order
        .into_iter()
        .filter_map(|n| by_name.remove(&n))
        .collect();
    Ok((results, mode.unwrap_or(Mode::Ubtrfs)))
}
