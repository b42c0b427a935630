//! xfstests' "not run" messages, mapped to a reason that names what is missing: the kernel
//! interface FUSE does not pass to a daemon, what this machine lacks (device-mapper targets,
//! the fsgqa user), or the ubtrfs feature that is not there yet.
//!
//! The table is matched in order, on the lower-cased message; the first rule whose every
//! needle occurs wins. A message no rule knows keeps xfstests' own words.

/// (needles that must all occur, reason)
const RULES: &[(&[&str], &str)] = &[
    // What FUSE has no interface for.
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
        "idmapped mounts: FUSE does not set FS_ALLOW_IDMAP for this mount",
    ),
    (&["swap"], "swapfiles: FUSE has no swap_activate"),
    (
        &["encrypt"],
        "fscrypt: FUSE has no fscrypt (FS_IOC_SET_ENCRYPTION_POLICY)",
    ),
    (
        &["casefold"],
        "casefold: FUSE has no casefolded directories",
    ),
    (&["verity"], "fs-verity: FUSE has no FS_IOC_ENABLE_VERITY"),
    (
        &["o_tmpfile"],
        "O_TMPFILE: ubtrfs has no tmpfile handler yet (FUSE_TMPFILE)",
    ),
    (
        &["fsxattr"],
        "FS_IOC_FSGETXATTR/FSSETXATTR: FUSE passes no fsxattr ioctls",
    ),
    (
        &["exchange"],
        "file exchange: FUSE has no XFS_IOC_EXCHANGE_RANGE",
    ),
    (&["atomic"], "atomic writes: FUSE has no RWF_ATOMIC support"),
    // What this machine lacks.
    (&["flakey"], "dm-flakey: no device-mapper on this machine"),
    (
        &["log-writes"],
        "dm-log-writes: no device-mapper on this machine",
    ),
    (
        &["log_writes"],
        "dm-log-writes: no device-mapper on this machine",
    ),
    (&["dm error"], "dm-error: no device-mapper on this machine"),
    (&["dm-error"], "dm-error: no device-mapper on this machine"),
    (&["dm_error"], "dm-error: no device-mapper on this machine"),
    (&["dm-delay"], "dm-delay: no device-mapper on this machine"),
    (&["dm delay"], "dm-delay: no device-mapper on this machine"),
    (&["dm-thin"], "dm-thin: no device-mapper on this machine"),
    (&["dm thin"], "dm-thin: no device-mapper on this machine"),
    (
        &["dm-snapshot"],
        "dm-snapshot: no device-mapper on this machine",
    ),
    (
        &["dm-linear"],
        "dm-linear: no device-mapper on this machine",
    ),
    (
        &["dm linear"],
        "dm-linear: no device-mapper on this machine",
    ),
    (&["dm-dust"], "dm-dust: no device-mapper on this machine"),
    (
        &["dm target"],
        "device-mapper target missing on this machine",
    ),
    (&["dmsetup"], "device-mapper missing on this machine"),
    (
        &["fsgqa"],
        "no fsgqa test user on this machine (xfstests README, optional step)",
    ),
    (
        &["123456-fsgqa"],
        "no 123456-fsgqa test user on this machine (xfstests README, optional step)",
    ),
];

/// The reason to write for a test xfstests did not run, from its message.
pub fn notrun_reason(message: &str) -> String {
    let lower = message.to_lowercase();
    for (needles, reason) in RULES {
        if needles.iter().all(|n| lower.contains(n)) {
            return (*reason).to_string();
        }
    }
    message.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: messages xfstests prints for FUSE limits map to the interface's name.
    #[test]
    fn known_messages() {
        assert_eq!(
            notrun_reason("Reflink not supported by scratch filesystem type: fuse"),
            "reflink: FUSE has no remap_file_range (FICLONE/FICLONERANGE)"
        );
        assert_eq!(
            notrun_reason("Dedupe not supported by test filesystem type: fuse"),
            "dedupe: FUSE has no remap_file_range (FIDEDUPERANGE)"
        );
        assert_eq!(
            notrun_reason("This test requires dm flakey support"),
            "dm-flakey: no device-mapper on this machine"
        );
        assert_eq!(
            notrun_reason("fuse does not support shutdown"),
            "shutdown: FUSE has no FS_IOC_SHUTDOWN (godown)"
        );
        assert_eq!(notrun_reason("  something new  "), "something new");
    }
}
