//! The `local.config` xfstests reads (through `HOST_OPTIONS`, so the checkout is not touched).
//!
//! ubtrfs runs as xfstests' FSTYP=fuse with FUSE_SUBTYP=.ubtrfs: `mount -t fuse.ubtrfs` runs
//! the glue's `/sbin/mount.fuse.ubtrfs`, which adds `nosubtype,fsname=DEV` so that /proc/mounts
//! shows what xfstests accepts (type `fuse`, source exactly TEST_DEV / SCRATCH_DEV). Stock
//! FSTYP=fuse neither makes a filesystem nor checks one; the glue's patch to common/rc (applied
//! to a shadow copy of the checkout) calls MKFS_FUSE_PROG and FSCK_FUSE_PROG where xfstests
//! calls mkfs.btrfs and `btrfs check` for the kernel's btrfs. The kernel's btrfs runs stock.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Which filesystem xfstests tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// ubtrfs through FUSE (FSTYP=fuse, FUSE_SUBTYP=.ubtrfs, the glue's mkfs and fsck).
    Ubtrfs,
    /// The kernel's btrfs on the same loop devices (FSTYP=btrfs, stock xfstests).
    KernelBtrfs,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "ubtrfs" => Some(Mode::Ubtrfs),
            "kernel-btrfs" | "btrfs" | "kernel" => Some(Mode::KernelBtrfs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ubtrfs => "ubtrfs",
            Mode::KernelBtrfs => "kernel-btrfs",
        }
    }
}

/// Everything a run's `local.config` says.
#[derive(Clone, Debug)]
pub struct Setup {
    pub mode: Mode,
    pub test_dev: PathBuf,
    pub test_dir: PathBuf,
    pub scratch_dev: PathBuf,
    pub scratch_mnt: PathBuf,
    /// xfstests' RESULT_BASE: where it writes NNN.full, NNN.out.bad, NNN.notrun.
    pub result_base: PathBuf,
    /// ubtrfs mode: the ubtrfs binary the mkfs program runs (a copy taken at setup).
    pub ubtrfs_bin: Option<PathBuf>,
    /// ubtrfs mode: the glue's libexec directory (mkfs.ubtrfs, fsck.ubtrfs).
    pub libexec: Option<PathBuf>,
    /// Where the glue's programs record each mkfs and fsck (GLUE_LOG).
    pub glue_log: PathBuf,
}

/// Why a setup cannot be written as a local.config.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// A path local.config can hold unquoted: absolute, and nothing a shell would expand or split
/// (xfstests splices these variables into commands without quotes).
fn shell_safe_path(what: &str, p: &Path) -> Result<String, ConfigError> {
    let s = p
        .to_str()
        .ok_or_else(|| ConfigError(format!("{what} {} is not UTF-8", p.display())))?;
    if !s.starts_with('/') {
        return Err(ConfigError(format!("{what} {s} is not an absolute path")));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-+:@".contains(*c)))
    {
        return Err(ConfigError(format!(
            "{what} {s} has the character {c:?}, which xfstests would split or expand"
        )));
    }
    Ok(s.trim_end_matches('/').to_string()).map(|t| if t.is_empty() { "/".into() } else { t })
}

impl Setup {
    /// The text of local.config for this setup.
    pub fn local_config(&self) -> Result<String, ConfigError> {
        let test_dev = shell_safe_path("TEST_DEV", &self.test_dev)?;
        let scratch_dev = shell_safe_path("SCRATCH_DEV", &self.scratch_dev)?;
        let test_dir = shell_safe_path("TEST_DIR", &self.test_dir)?;
        let scratch_mnt = shell_safe_path("SCRATCH_MNT", &self.scratch_mnt)?;
        let result_base = shell_safe_path("RESULT_BASE", &self.result_base)?;
        let glue_log = shell_safe_path("GLUE_LOG", &self.glue_log)?;
        if test_dev == scratch_dev {
            return Err(ConfigError(format!(
                "TEST_DEV and SCRATCH_DEV are the same device {test_dev}"
            )));
        }
        if test_dir == scratch_mnt {
            return Err(ConfigError(format!(
                "TEST_DIR and SCRATCH_MNT are the same directory {test_dir}"
            )));
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# local.config written by xfstests-glue for {} (do not edit: every run writes it anew)",
            self.mode.as_str()
        );
        match self.mode {
            Mode::Ubtrfs => {
                let bin = self
                    .ubtrfs_bin
                    .as_deref()
                    .ok_or_else(|| ConfigError("ubtrfs mode needs the ubtrfs binary".into()))?;
                let bin = shell_safe_path("UBTRFS_BIN", bin)?;
                let libexec = self.libexec.as_deref().ok_or_else(|| {
                    ConfigError("ubtrfs mode needs the glue's libexec directory".into())
                })?;
                let libexec = shell_safe_path("libexec", libexec)?;
                s.push_str(
                    "# ubtrfs is a FUSE filesystem: mount -t fuse.ubtrfs runs the glue's\n\
                     # /sbin/mount.fuse.ubtrfs, which adds nosubtype,fsname=DEV so that /proc/mounts\n\
                     # shows type fuse and the device as xfstests names it.\n",
                );
                let _ = writeln!(s, "export FSTYP=fuse");
                let _ = writeln!(s, "export FUSE_SUBTYP=.ubtrfs");
                s.push_str(
                    "# The glue's patch to common/rc makes FSTYP=fuse run these where it runs\n\
                     # mkfs.btrfs and btrfs check for the kernel's btrfs.\n",
                );
                let _ = writeln!(s, "export UBTRFS_BIN={bin}");
                let _ = writeln!(s, "export MKFS_FUSE_PROG={libexec}/mkfs.ubtrfs");
                let _ = writeln!(s, "export FSCK_FUSE_PROG={libexec}/fsck.ubtrfs");
                s.push_str(
                    "# A FUSE mount can be busy for a moment after its last user has gone, and\n\
                     # xfstests unmounts once before checking: retry while busy, up to 10 s.\n",
                );
                let _ = writeln!(s, "export UMOUNT_PROG={libexec}/umount.ubtrfs");
                s.push_str(
                    "# No fsname= here: xfstests remounts the test device with MOUNT_OPTIONS too\n\
                     # (_mount_or_remount_rw), so the helper sets nosubtype,fsname=SOURCE per mount.\n",
                );
            }
            Mode::KernelBtrfs => {
                let _ = writeln!(s, "export FSTYP=btrfs");
            }
        }
        let _ = writeln!(s, "export TEST_DEV={test_dev}");
        let _ = writeln!(s, "export TEST_DIR={test_dir}");
        let _ = writeln!(s, "export SCRATCH_DEV={scratch_dev}");
        let _ = writeln!(s, "export SCRATCH_MNT={scratch_mnt}");
        let _ = writeln!(s, "export RESULT_BASE={result_base}");
        let _ = writeln!(s, "export GLUE_LOG={glue_log}");
        Ok(s)
    }
}
