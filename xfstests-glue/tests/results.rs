//! The result parser and the expected-results comparison, on recorded result directories
//! (subsets of real runs of xfstests-glue/run: testdata/ubtrfs-sample from a ubtrfs run of the
//! quick group, testdata/kernel-sample from a kernel btrfs run with a 10 s time limit).

use std::path::PathBuf;
use std::process::Command;
use xfstests_glue::config::Mode;
use xfstests_glue::expected::{compare, Change, Expected};
use xfstests_glue::results::read_run;
use xfstests_glue::{Status, Totals};

fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(rel)
}

fn table(run: &xfstests_glue::results::Run) -> Vec<(String, Status, String)> {
    run.tests
        .iter()
        .map(|t| (t.name.clone(), t.status, t.reason.clone()))
        .collect()
}

fn row(name: &str, status: Status, reason: &str) -> (String, Status, String) {
    (name.to_string(), status, reason.to_string())
}

// Test scenario: every way a test ends in a real ubtrfs run is read right: passes (one with a
// failed check of the test device *before* the test, which xfstests does not count against
// it), output mismatches with their first wrong line, xfstests' "not run" messages, a check
// that could not run because the unmount before it failed, and a listed test the run never
// reached.
#[test]
fn ubtrfs_sample() {
    let run = read_run(&testdata("ubtrfs-sample")).unwrap();
    assert_eq!(run.info.get("mode").map(String::as_str), Some("ubtrfs"));
    assert_eq!(
        table(&run),
        [
            row("generic/001", Status::Pass, ""),
            row(
                "generic/003",
                Status::Fail,
                "output mismatch: +ERROR: access time has not been updated after accessing file1 first time"
            ),
            row("generic/004", Status::NotRun, "O_TMPFILE is not supported"),
            row(
                "generic/009",
                Status::NotRun,
                "xfs_io fiemap failed (old kernel/wrong fs?)"
            ),
            row(
                "generic/033",
                Status::Fail,
                "umount failed (target is busy): the filesystem could not be checked"
            ),
            row(
                "generic/065",
                Status::NotRun,
                "This test requires dm flakey support"
            ),
            row("generic/087", Status::Pass, ""),
            row("generic/450", Status::Unmeasured, "not run yet"),
        ]
    );
    // A pass takes check's own time; anything else the glue's wall clock; not-run none.
    let secs: Vec<_> = run.tests.iter().map(|t| t.seconds).collect();
    assert_eq!(
        secs,
        [Some(6), Some(13), None, None, Some(62), None, Some(1), None]
    );
}

// Test scenario: a test killed at the time limit is a failure that says so, whatever check
// printed before it was killed.
#[test]
fn kernel_sample_with_timeout() {
    let run = read_run(&testdata("kernel-sample")).unwrap();
    assert_eq!(
        table(&run),
        [
            row(
                "generic/003",
                Status::Fail,
                "timeout: no result within the 10 s time limit (hang?), killed by the glue"
            ),
            row("generic/002", Status::Pass, ""),
            row("generic/009", Status::Pass, ""),
        ]
    );
}

// Test scenario: comparing the ubtrfs sample with a hand-made expected file finds exactly the
// regression (listed pass, now fail), the fixed test (listed fail, now pass), a changed
// not-run, an unlisted test, and ignores the unmeasured test and the unchanged ones.
#[test]
fn comparison() {
    let run = read_run(&testdata("ubtrfs-sample")).unwrap();
    let exp = Expected::parse(
        "# hand-made for this test\n\
         generic/001 fail   bug: was broken\n\
         generic/003 pass\n\
         generic/004 notrun O_TMPFILE: ubtrfs has no tmpfile handler yet\n\
         generic/009 pass\n\
         generic/033 fail   bug: scratch busy\n\
         generic/087 pass\n\
         generic/450 pass\n",
    )
    .unwrap();
    let c = compare(&exp, &run.tests);
    let diffs: Vec<_> = c
        .differences
        .iter()
        .map(|d| (d.name.as_str(), d.change.clone(), d.expected, d.got))
        .collect();
    assert_eq!(
        diffs,
        [
            (
                "generic/001",
                Change::Fixed,
                Some(Status::Fail),
                Status::Pass
            ),
            (
                "generic/003",
                Change::Regression,
                Some(Status::Pass),
                Status::Fail
            ),
            (
                "generic/009",
                Change::Regression,
                Some(Status::Pass),
                Status::NotRun
            ),
            ("generic/065", Change::Unlisted, None, Status::NotRun),
        ]
    );
    assert!(c.is_failure());
    assert_eq!(
        c.totals,
        Totals {
            pass: 2,
            fail: 2,
            notrun: 3,
            unmeasured: 1
        }
    );

    // The same run against a file that says what it measured: nothing to report.
    let same = Expected::default().updated(&run.tests, Mode::Ubtrfs);
    let c = compare(&same, &run.tests);
    assert!(c.differences.is_empty(), "{:?}", c.differences);
    assert!(!c.is_failure());
}

// Test scenario: `report` prints the failures, the totals and the differences, and exits 1 on
// a regression, 0 when the run matches the file, 2 on a malformed file.
#[test]
fn report_subcommand_exit_status() {
    let bin = env!("CARGO_BIN_EXE_xfstests-glue");
    let dir = std::env::temp_dir().join(format!("xfstests-glue-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sample = testdata("ubtrfs-sample");

    let exact = dir.join("exact.txt");
    let out = Command::new(bin)
        .args(["update-expected", exact.to_str().unwrap()])
        .arg(&sample)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&exact, &out.stdout).unwrap();
    let out = Command::new(bin)
        .arg("report")
        .arg(&sample)
        .arg("--expect")
        .arg(&exact)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("Totals: 8 tests: 2 passed, 2 failed, 3 not run, 1 unmeasured"));
    assert!(text.contains("no differences"), "{text}");

    let worse = dir.join("worse.txt");
    let edited = std::fs::read_to_string(&exact)
        .unwrap()
        .replace("generic/003 fail ", "generic/003 pass #")
        .lines()
        .map(|l| {
            if l.starts_with("generic/003") {
                "generic/003 pass".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&worse, edited).unwrap();
    let out = Command::new(bin)
        .arg("report")
        .arg(&sample)
        .arg("--expect")
        .arg(&worse)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("REGRESSION generic/003    expected pass, got fail"),
        "{text}"
    );

    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "generic/003 fail\n").unwrap();
    let out = Command::new(bin)
        .arg("report")
        .arg(&sample)
        .arg("--expect")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 1: generic/003: fail needs a reason")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// Test scenario: updating an expected file keeps hand-written reasons where the status did
// not change, maps xfstests' not-run messages to the interface FUSE lacks, and keeps the lines
// of tests the run did not measure.
#[test]
fn update_keeps_reasons() {
    let run = read_run(&testdata("ubtrfs-sample")).unwrap();
    let old = Expected::parse(
        "# header survives\n\
         generic/003 fail   bug: atime not updated on read (relatime)\n\
         generic/033 pass\n\
         generic/450 fail   bug: something measured before\n\
         generic/999 notrun kept as it was\n",
    )
    .unwrap();
    let new = old.updated(&run.tests, Mode::Ubtrfs);
    let get = |n: &str| {
        let e = &new.entries[n];
        (e.status, e.reason.as_str())
    };
    assert_eq!(new.header, ["# header survives"]);
    assert_eq!(
        get("generic/003"),
        (Status::Fail, "bug: atime not updated on read (relatime)")
    );
    assert_eq!(
        get("generic/033"),
        (
            Status::Fail,
            "umount failed (target is busy): the filesystem could not be checked"
        )
    );
    assert_eq!(
        get("generic/009"),
        (Status::NotRun, "FIEMAP: FUSE has no fiemap (FS_IOC_FIEMAP)")
    );
    assert_eq!(
        get("generic/065"),
        (
            Status::NotRun,
            "dm-flakey: no device-mapper on this machine"
        )
    );
    assert_eq!(
        get("generic/450"),
        (Status::Fail, "bug: something measured before")
    );
    assert_eq!(get("generic/999"), (Status::NotRun, "kept as it was"));
    assert_eq!(get("generic/001"), (Status::Pass, ""));
    // What it writes parses back to the same thing.
    assert_eq!(Expected::parse(&new.render()).unwrap(), new);
}

// Test scenario: the committed expected-results files are well formed (a reason for every
// status but pass, no test twice), the ubtrfs and kernel files of a group list the same tests,
// every test listed is a generic test, and the fsync subset agrees with the quick files.
#[test]
fn committed_expected_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("expected");
    for group in ["quick", "log", "quick-fsync"] {
        let read = |name: &str| {
            let p = dir.join(name);
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            Expected::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let ours = read(&format!("generic-{group}.txt"));
        let kernel = read(&format!("kernel-btrfs-generic-{group}.txt"));
        assert!(!ours.entries.is_empty());
        let a: Vec<_> = ours.entries.keys().collect();
        let b: Vec<_> = kernel.entries.keys().collect();
        assert_eq!(
            a, b,
            "generic-{group}.txt and kernel-btrfs-generic-{group}.txt differ in tests"
        );
        assert!(a.iter().all(|n| n.starts_with("generic/")));
        for (n, e) in ours.entries.iter().chain(kernel.entries.iter()) {
            if e.status == Status::Unmeasured {
                assert_eq!(e.reason, "not run yet", "{n}");
            }
        }
    }
    for prefix in ["", "kernel-btrfs-"] {
        let read = |name: String| {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            Expected::parse(&text).unwrap()
        };
        let quick = read(format!("{prefix}generic-quick.txt"));
        let fsync = read(format!("{prefix}generic-quick-fsync.txt"));
        for (n, e) in &fsync.entries {
            assert_eq!(Some(e), quick.entries.get(n), "{prefix}: {n}");
        }
    }
}

// Test scenario: `update-expected --only-listed` updates the tests a file lists (a list
// restricted to some tests, like the fsync tests of the quick group) and adds none.
#[test]
fn update_only_listed() {
    let dir = std::env::temp_dir().join(format!("xfstests-glue-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("list.txt");
    std::fs::write(
        &file,
        "# two tests\ngeneric/003 unmeasured not run yet\ngeneric/999 unmeasured not run yet\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xfstests-glue"))
        .args(["update-expected", "--only-listed"])
        .arg(&file)
        .arg(testdata("ubtrfs-sample"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let e = Expected::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let names: Vec<_> = e.entries.keys().map(String::as_str).collect();
    assert_eq!(names, ["generic/003", "generic/999"]);
    assert_eq!(e.entries["generic/003"].status, Status::Fail);
    assert_eq!(e.entries["generic/999"].status, Status::Unmeasured);
    let _ = std::fs::remove_dir_all(&dir);
}
