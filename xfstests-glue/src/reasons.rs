//! xfstests' "not run" messages, mapped to a reason that names what is missing: the kernel
//! interface FUSE does not pass to a daemon, what this machine lacks (device-mapper targets,
//! the fsgqa user, scsi_debug), or the ubtrfs feature that is not there yet.
//!
//! The tables are matched in order on the lower-cased message; the first rule whose every
//! needle occurs wins. The machine's rules apply to both filesystems, the FUSE and ubtrfs rules
//! only to ubtrfs runs (the kernel's btrfs has reflink, FIEMAP, ...). A message no rule knows
//! keeps xfstests' own words.

use crate::config::Mode;

type Rule = (&'static [&'static str], &'static str);

/// What this machine lacks, whatever the filesystem.
const MACHINE: &[Rule] = &[
    (&["flakey"], "dm-flakey: no device-mapper on this machine"),
    (
        &["log-writes"],
        "dm-log-writes: no device-mapper on this machine",
    ),
    (
        &["log_writes"],
        "dm-log-writes: no device-mapper on this machine",
    ),
    (
        &["logwrites_dev"],
        "dm-log-writes: no device-mapper on this machine",
    ),
    (&["dm error"], "dm-error: no device-mapper on this machine"),
    (&["dm-error"], "dm-error: no device-mapper on this machine"),
    (&["dm delay"], "dm-delay: no device-mapper on this machine"),
    (&["dm-delay"], "dm-delay: no device-mapper on this machine"),
    (&["dm thin"], "dm-thin: no device-mapper on this machine"),
    (&["dm-thin"], "dm-thin: no device-mapper on this machine"),
    (
        &["dm snapshot"],
        "dm-snapshot: no device-mapper on this machine",
    ),
    (
        &["dm-snapshot"],
        "dm-snapshot: no device-mapper on this machine",
    ),
    (
        &["dm linear"],
        "dm-linear: no device-mapper on this machine",
    ),
    (
        &["dm-linear"],
        "dm-linear: no device-mapper on this machine",
    ),
    (&["dm dust"], "dm-dust: no device-mapper on this machine"),
    (&["dm-dust"], "dm-dust: no device-mapper on this machine"),
    (&["dmsetup"], "device-mapper missing on this machine"),
    (
        &["scsi_debug"],
        "scsi_debug: module missing on this machine",
    ),
    (
        &["123456-fsgqa"],
        "no 123456-fsgqa test user on this machine (xfstests README, optional step)",
    ),
    (
        &["fsgqa"],
        "no fsgqa test user on this machine (xfstests README, optional step)",
    ),
];

/// What a FUSE mount cannot do, or ubtrfs does not do yet.
const FUSE: &[Rule] = &[
    (
        &["dedupe"],
        "dedupe: FUSE has no remap_file_range (FIDEDUPERANGE)",
    ),
    (
        &["reflink"],
        "reflink: FUSE has no remap_file_range (FICLONE/FICLONERANGE)",
    ),
    (&["fiemap"], "FIEMAP: FUSE has no fiemap (FS_IOC_FIEMAP)"),
    (
        &["shutdown"],
        "shutdown: FUSE has no FS_IOC_SHUTDOWN (godown)",
    ),
    (
        &["freez"],
        "freeze: FUSE has no freeze_fs (FIFREEZE/FITHAW)",
    ),
    (
        &["dax"],
        "DAX: not available on a FUSE mount of a block device",
    ),
    (
        &["idmap"],
        "idmapped mounts: FUSE allows them only with FUSE_ALLOW_IDMAP, under which the kernel sends no caller uid/gid (FUSE_INVALID_UIDGID) but on creation, and ubtrfs needs the caller for the VFS checks FUSE leaves to it (setgid clearing, FITRIM)",
    ),
    (&["swap"], "swapfiles: FUSE has no swap_activate"),
    (&["encrypt"], "fscrypt: FUSE has no fscrypt"),
    (&["inlinecrypt"], "fscrypt: FUSE has no fscrypt"),
    (
        &["casefold"],
        "casefold: FUSE has no casefolded directories",
    ),
    (&["verity"], "fs-verity: FUSE has no FS_IOC_ENABLE_VERITY"),
    (
        &["exchangerange support is missing"],
        "file exchange: xfs_io here lacks exchangerange, and FUSE has no XFS_IOC_EXCHANGE_RANGE",
    ),
    (
        &["exchange"],
        "file exchange: FUSE has no XFS_IOC_EXCHANGE_RANGE",
    ),
    (&["atomic"], "atomic writes: FUSE has no RWF_ATOMIC"),
    (&["quota"], "quota: FUSE has no quotactl"),
    (
        &["fcollapse"],
        "fallocate collapse range: FUSE does not pass the mode (the kernel's btrfs lacks it too)",
    ),
    (
        &["finsert"],
        "fallocate insert range: FUSE does not pass the mode (the kernel's btrfs lacks it too)",
    ),
    (
        &["defragmentation"],
        "defrag: _require_defrag also needs FIEMAP to count extents, which FUSE lacks (FS_IOC_FIEMAP); xfstests knows no defrag tool for FSTYP=fuse, and ubtrfs has no BTRFS_IOC_DEFRAG_RANGE",
    ),
    (
        &["with geometry"],
        "stripe geometry: xfstests makes it for xfs and ext4 only (btrfs neither)",
    ),
    (
        &["maximum acl count"],
        "xfstests knows no ACL count limit for FSTYP=fuse",
    ),
    (
        &["sectorsize"],
        "sector sizes other than 4096: ubtrfs mkfs makes 4096 only",
    ),
    (
        &["_scratch_mkfs_sized failed"],
        "small filesystem: below ubtrfs mkfs's minimum (~109 MiB, no mixed block groups)",
    ),
    (
        &["o_tmpfile"],
        "O_TMPFILE: the kernel sends FUSE_TMPFILE (opcode 51), fuser 0.18 (newest release) answers ENOSYS to opcodes it does not know and the kernel then gives EOPNOTSUPP; Filesystem::tmpfile is in fuser's unreleased master (PR 740)",
    ),
    (
        &["chattr +x"],
        "DAX flag: btrfs has no FS_XFLAG_DAX (chattr +x fails on the kernel's btrfs too)",
    ),
    (
        &["creation time"],
        "birth time: the kernel sends FUSE_STATX (opcode 52), fuser 0.18 (newest release) answers ENOSYS and the kernel falls back to FUSE_GETATTR, which has no btime; Filesystem::statx is in fuser's unreleased master (PR 746)",
    ),
    (
        &["timestamp bounds"],
        "xfstests knows no timestamp range for FSTYP=fuse",
    ),
    (
        &["unrestricted byte streams"],
        "xfstests assumes FSTYP=fuse names are not arbitrary byte strings",
    ),
    (
        &["falloc"],
        "fallocate: ubtrfs has no fallocate yet (README status: read-write mount)",
    ),
    (
        &["fpunch"],
        "fallocate punch hole: ubtrfs has no fallocate yet (README status: read-write mount)",
    ),
    (
        &["fzero"],
        "fallocate zero range: ubtrfs has no fallocate yet (README status: read-write mount)",
    ),
];

fn lookup(rules: &[Rule], lower: &str) -> Option<&'static str> {
    rules
        .iter()
        .find(|(needles, _)| needles.iter().all(|n| lower.contains(n)))
        .map(|(_, r)| *r)
}

/// The reason to write for a test xfstests did not run on `mode`, from its message.
pub fn notrun_reason(mode: Mode, message: &str) -> String {
    let lower = message.to_lowercase();
    let found = lookup(MACHINE, &lower).or(match mode {
        Mode::Ubtrfs => lookup(FUSE, &lower),
        Mode::KernelBtrfs => None,
    });
    match found {
        Some(r) => r.to_string(),
        None => message.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: messages xfstests prints for FUSE limits map to the interface's name on
    // ubtrfs, while the kernel's btrfs keeps xfstests' words except for what the machine lacks.
    #[test]
    fn known_messages() {
        let u = |m| notrun_reason(Mode::Ubtrfs, m);
        let k = |m| notrun_reason(Mode::KernelBtrfs, m);
        assert_eq!(
            u("Reflink not supported by scratch filesystem type: fuse"),
            "reflink: FUSE has no remap_file_range (FICLONE/FICLONERANGE)"
        );
        assert_eq!(
            u("Dedupe not supported by test filesystem type: fuse"),
            "dedupe: FUSE has no remap_file_range (FIDEDUPERANGE)"
        );
        assert_eq!(
            u("fuse does not support shutdown"),
            "shutdown: FUSE has no FS_IOC_SHUTDOWN (godown)"
        );
        assert_eq!(
            k("btrfs does not support shutdown"),
            "btrfs does not support shutdown"
        );
        let m = "This test requires dm flakey support";
        assert_eq!(u(m), k(m));
        assert_eq!(u(m), "dm-flakey: no device-mapper on this machine");
        assert_eq!(
            k("fsgqa user not defined."),
            "no fsgqa test user on this machine (xfstests README, optional step)"
        );
        assert_eq!(u("  something new  "), "something new");
    }
}
