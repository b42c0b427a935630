//! The glue's shell programs: syntax, and the mkfs.btrfs option translation of mkfs.ubtrfs,
//! run against a stand-in for the ubtrfs binary that records its arguments.

use std::path::PathBuf;
use std::process::Command;

fn glue_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// Test scenario: every script of the glue parses (bash -n / sh -n).
#[test]
fn scripts_parse() {
    for (shell, rel) in [
        ("bash", "run"),
        ("bash", "libexec/mkfs.ubtrfs"),
        ("bash", "libexec/mount-helper"),
        ("bash", "libexec/umount.ubtrfs"),
        ("sh", "libexec/fsck.ubtrfs"),
        ("sh", "libexec/wait-device-free"),
    ] {
        let p = glue_dir().join(rel);
        let st = Command::new(shell).arg("-n").arg(&p).status().unwrap();
        assert!(st.success(), "{shell} -n {}", p.display());
    }
}

// Test scenario: the patch to xfstests touches common/rc and two tests only, adds both hooks,
// the subtype for tests that mount with -t $FSTYP, btrfs's timestamp range, byte-string names,
// label length and delayed allocation for ubtrfs, btrfs's xattr value limit in generic/020 and
// btrfs's FITRIM rules in generic/260.
#[test]
fn patch_shape() {
    let patch = std::fs::read_to_string(glue_dir().join("fuse-mkfs-fsck.patch")).unwrap();
    let files: Vec<_> = patch.lines().filter(|l| l.starts_with("+++ ")).collect();
    assert_eq!(
        files,
        [
            "+++ b/common/rc",
            "+++ b/tests/generic/020",
            "+++ b/tests/generic/260"
        ]
    );
    assert!(patch.contains("+\t[ -n \"$MKFS_FUSE_PROG\" ]"));
    assert!(patch.contains("+_check_fuse_filesystem()"));
    assert!(patch.contains("$FSCK_FUSE_PROG $device"));
    assert!(patch.contains("arg=fuse$FUSE_SUBTYP"));
    // btrfs's facts that xfstests keys on FSTYP=btrfs, for FUSE_SUBTYP=.ubtrfs only.
    assert_eq!(patch.matches("[ \"$FUSE_SUBTYP\" = .ubtrfs ]").count(), 4);
    assert_eq!(
        patch
            .matches("[ \"$FSTYP$FUSE_SUBTYP\" = fuse.ubtrfs ]")
            .count(),
        3
    );
}

struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new(tag: &str) -> Fake {
        let dir = std::env::temp_dir().join(format!("xfstests-glue-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Stands in for ubtrfs: writes its arguments, one per line.
        let bin = dir.join("ubtrfs");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}/args\n",
                dir.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("dev.img"), b"").unwrap();
        Fake { dir }
    }

    fn dev(&self) -> String {
        self.dir.join("dev.img").display().to_string()
    }

    /// Run mkfs.ubtrfs with `args`; (exit status, stderr, arguments ubtrfs got).
    fn mkfs(&self, args: &[&str]) -> (i32, String, Vec<String>) {
        let _ = std::fs::remove_file(self.dir.join("args"));
        let out = Command::new(glue_dir().join("libexec/mkfs.ubtrfs"))
            .args(args)
            .env("UBTRFS_BIN", self.dir.join("ubtrfs"))
            .env("GLUE_BIN", env!("CARGO_BIN_EXE_xfstests-glue"))
            .env("GLUE_LOG", self.dir.join("glue.log"))
            .output()
            .unwrap();
        let got = std::fs::read_to_string(self.dir.join("args"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            got,
        )
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// Test scenario: mkfs.btrfs options a test passes are translated to `ubtrfs mkfs`; the ones
// ubtrfs mkfs has no equivalent for are refused by name with "not supported", and ubtrfs is not
// run at all then.
#[test]
fn mkfs_translation() {
    let f = Fake::new("mkfs");
    let dev = f.dev();

    let (rc, err, got) = f.mkfs(&[&dev]);
    assert_eq!((rc, err.as_str()), (0, ""));
    assert_eq!(got, ["mkfs", dev.as_str()]);

    let (rc, _, got) = f.mkfs(&[
        "-f",
        "-K",
        "-q",
        "-b",
        "268435456",
        "--nodesize=65536",
        "-L",
        "lbl",
        "--csum",
        "xxhash",
        "-O",
        "no-holes,^block-group-tree",
        "-O",
        "block-group-tree",
        "-m",
        "DUP",
        "-d",
        "single",
        "-s",
        "4096",
        &dev,
    ]);
    assert_eq!(rc, 0);
    assert_eq!(
        got,
        [
            "mkfs",
            "--size",
            "268435456",
            "--nodesize",
            "65536",
            "--label",
            "lbl",
            "--csum",
            "xxhash",
            "-O",
            "block-group-tree",
            dev.as_str()
        ]
    );

    for (args, needle) in [
        (
            vec!["--mixed"],
            "--mixed (mixed block groups) not supported",
        ),
        (vec!["-s", "65536"], "sectorsize 65536"),
        (vec!["--sectorsize=16k"], "sectorsize 16k"),
        (vec!["-m", "raid1"], "metadata profile raid1"),
        (vec!["-d", "dup"], "data profile dup"),
        (vec!["-O", "raid-stripe-tree"], "feature 'raid-stripe-tree'"),
        (vec!["-R", "quota"], "runtime feature 'quota'"),
        (vec!["--rootdir", "/etc"], "--rootdir"),
        (vec!["-Z"], "option -Z"),
        (vec!["/dev/null"], "several devices"),
    ] {
        let mut all = args.clone();
        all.push(&dev);
        let (rc, err, got) = f.mkfs(&all);
        assert_eq!(rc, 1, "{all:?}");
        assert!(err.contains(needle), "{all:?}: {err}");
        assert!(
            err.contains("not supported by ubtrfs mkfs"),
            "{all:?}: {err}"
        );
        assert!(got.is_empty(), "{all:?}: ubtrfs ran with {got:?}");
    }
    let log = std::fs::read_to_string(f.dir.join("glue.log")).unwrap();
    assert!(log.contains("mkfs: --mixed"), "{log}");
}

// Test scenario: wait-device-free returns at once for a device (here a file) nobody holds, and
// names the device when it cannot open it at all.
#[test]
fn wait_device_free() {
    let f = Fake::new("wait");
    let run = |dev: &str| {
        Command::new(glue_dir().join("libexec/wait-device-free"))
            .args([dev, "1"])
            .env("GLUE_BIN", env!("CARGO_BIN_EXE_xfstests-glue"))
            .output()
            .unwrap()
    };
    let out = run(&f.dev());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let missing = f.dir.join("missing");
    let out = run(missing.to_str().unwrap());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing: No such file or directory"), "{err}");
}
