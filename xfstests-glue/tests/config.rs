//! The local.config the glue writes, read back the way xfstests reads it (sourced by bash).

use std::path::PathBuf;
use std::process::Command;
use xfstests_glue::config::{Mode, Setup};

fn setup(mode: Mode) -> Setup {
    Setup {
        mode,
        test_dev: "/dev/loop1".into(),
        test_dir: "/var/tmp/xfstests-glue/run/work/mnt/test".into(),
        scratch_dev: "/dev/loop2".into(),
        scratch_mnt: "/var/tmp/xfstests-glue/run/work/mnt/scratch".into(),
        result_base: "/var/tmp/xfstests-glue/run/results".into(),
        ubtrfs_bin: Some("/var/tmp/xfstests-glue/run/work/bin/ubtrfs".into()),
        libexec: Some("/repo/xfstests-glue/libexec".into()),
        glue_log: "/var/tmp/xfstests-glue/run/glue.log".into(),
    }
}

/// Source `config` in bash and print the named variables, one per line, as xfstests sees them.
fn sourced(config: &str, vars: &[&str]) -> Vec<String> {
    // Tests run on parallel threads: one directory per call.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xfstests-glue-config-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("local.config");
    std::fs::write(&file, config).unwrap();
    let script = vars
        .iter()
        .map(|v| format!("printf '%s\\n' \"${{{v}-<unset>}}\""))
        .collect::<Vec<_>>()
        .join("; ");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -eu; . \"$1\"; {script}"))
        .arg("bash")
        .arg(&file)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("bash must be installed");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "sourcing local.config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

// Test scenario: the ubtrfs config makes xfstests test FSTYP=fuse with the .ubtrfs subtype, run
// the glue's mkfs and fsck programs, and names the devices, mount points and result directory.
#[test]
fn ubtrfs_config_as_bash_sees_it() {
    let cfg = setup(Mode::Ubtrfs).local_config().unwrap();
    let got = sourced(
        &cfg,
        &[
            "FSTYP",
            "FUSE_SUBTYP",
            "TEST_DEV",
            "TEST_DIR",
            "SCRATCH_DEV",
            "SCRATCH_MNT",
            "RESULT_BASE",
            "MKFS_FUSE_PROG",
            "FSCK_FUSE_PROG",
            "UBTRFS_BIN",
            "GLUE_LOG",
            "UMOUNT_PROG",
            "MOUNT_OPTIONS",
        ],
    );
    assert_eq!(
        got,
        [
            "fuse",
            ".ubtrfs",
            "/dev/loop1",
            "/var/tmp/xfstests-glue/run/work/mnt/test",
            "/dev/loop2",
            "/var/tmp/xfstests-glue/run/work/mnt/scratch",
            "/var/tmp/xfstests-glue/run/results",
            "/repo/xfstests-glue/libexec/mkfs.ubtrfs",
            "/repo/xfstests-glue/libexec/fsck.ubtrfs",
            "/var/tmp/xfstests-glue/run/work/bin/ubtrfs",
            "/var/tmp/xfstests-glue/run/glue.log",
            "/repo/xfstests-glue/libexec/umount.ubtrfs",
            // fsname= is per mount (the helper), never in MOUNT_OPTIONS: xfstests remounts the
            // test device with MOUNT_OPTIONS too.
            "<unset>",
        ]
    );
    // Every variable is exported, so that the tests' child processes see it.
    for line in cfg.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.starts_with("export "), "not exported: {line}");
    }
}

// Test scenario: the kernel's btrfs runs stock xfstests: FSTYP=btrfs and no FUSE hooks at all.
#[test]
fn kernel_config_is_stock_btrfs() {
    let mut s = setup(Mode::KernelBtrfs);
    s.ubtrfs_bin = None;
    s.libexec = None;
    let cfg = s.local_config().unwrap();
    let got = sourced(
        &cfg,
        &[
            "FSTYP",
            "FUSE_SUBTYP",
            "MKFS_FUSE_PROG",
            "FSCK_FUSE_PROG",
            "TEST_DEV",
            "SCRATCH_DEV",
        ],
    );
    assert_eq!(
        got,
        [
            "btrfs",
            "<unset>",
            "<unset>",
            "<unset>",
            "/dev/loop1",
            "/dev/loop2"
        ]
    );
}

// Test scenario: setups xfstests would misread are refused with the variable named: the same
// device twice, relative paths, characters the unquoted expansion would split or expand, a
// ubtrfs setup without the binary.
#[test]
fn refuses_bad_setups() {
    let mut s = setup(Mode::Ubtrfs);
    s.scratch_dev = "/dev/loop1".into();
    assert!(s.local_config().unwrap_err().0.contains("same device"));

    let mut s = setup(Mode::Ubtrfs);
    s.scratch_mnt = s.test_dir.clone();
    assert!(s.local_config().unwrap_err().0.contains("same directory"));

    let mut s = setup(Mode::Ubtrfs);
    s.test_dir = "mnt/test".into();
    assert!(s
        .local_config()
        .unwrap_err()
        .0
        .contains("TEST_DIR mnt/test is not an absolute path"));

    for bad in ["/tmp/a b", "/tmp/$HOME", "/tmp/a;rm", "/tmp/*", "/tmp/a\"b"] {
        let mut s = setup(Mode::Ubtrfs);
        s.result_base = PathBuf::from(bad);
        let e = s.local_config().unwrap_err().0;
        assert!(e.contains("RESULT_BASE"), "{bad}: {e}");
    }

    let mut s = setup(Mode::Ubtrfs);
    s.ubtrfs_bin = None;
    assert!(s.local_config().unwrap_err().0.contains("ubtrfs binary"));
}

// Test scenario: the binary's `config` subcommand prints the same text the library makes.
#[test]
fn config_subcommand() {
    let s = setup(Mode::Ubtrfs);
    let out = Command::new(env!("CARGO_BIN_EXE_xfstests-glue"))
        .args(["config", "--mode", "ubtrfs"])
        .args(["--test-dev", "/dev/loop1"])
        .args(["--test-dir", "/var/tmp/xfstests-glue/run/work/mnt/test"])
        .args(["--scratch-dev", "/dev/loop2"])
        .args([
            "--scratch-mnt",
            "/var/tmp/xfstests-glue/run/work/mnt/scratch",
        ])
        .args(["--result-base", "/var/tmp/xfstests-glue/run/results"])
        .args(["--glue-log", "/var/tmp/xfstests-glue/run/glue.log"])
        .args(["--ubtrfs-bin", "/var/tmp/xfstests-glue/run/work/bin/ubtrfs"])
        .args(["--libexec", "/repo/xfstests-glue/libexec"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        s.local_config().unwrap()
    );

    let out = Command::new(env!("CARGO_BIN_EXE_xfstests-glue"))
        .args(["config", "--mode", "zfs"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mode is ubtrfs or kernel-btrfs"));
}
