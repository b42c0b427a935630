//! Mount option parsing. The ordinary VFS options are accepted, btrfs's own are honoured where
//! implemented, anything else is refused by name (ARCHITECTURE.md "FUSE specifics").

use ubtrfs_extent_map::Policy;
use ubtrfs_fs::MountOptions;

/// Everything `-o` can say, split into what the filesystem needs and what FUSE needs.
#[derive(Clone, Debug)]
pub struct ParsedOptions {
    pub fs: MountOptions,
    /// Source shown in /proc/mounts (default: the image path).
    pub fsname: Option<String>,
    /// Subtype shown as `fuse.SUBTYPE` (default `ubtrfs`; empty for plain `fuse`).
    pub subtype: String,
    pub noatime: bool,
    /// `strictatime` (or `norelatime`): every access updates atime; otherwise relatime.
    pub strictatime: bool,
    pub nodiratime: bool,
    pub nodev: bool,
    pub nosuid: bool,
    pub noexec: bool,
    pub sync: bool,
    pub dirsync: bool,
    pub allow_other: bool,
    /// Whether `rw` was asked for explicitly (or implied by no `ro`).
    pub rw_requested: bool,
    /// `em_max=COUNT`: the shrinker keeps at most this many extent maps cached (0: no limit).
    pub em_max: u64,
    /// `em_max_bytes=BYTES`: and at most this much memory in them (0: no limit).
    pub em_max_bytes: u64,
    /// `trace=FILTER`: tracing directives, `+`-separated (trace.rs), checked.
    pub trace: Option<String>,
    /// `trace_file=PATH`: where tracing output goes (appended).
    pub trace_file: Option<std::path::PathBuf>,
}

/// VFS and mount(8) options that need nothing from us beyond acceptance.
const ACCEPTED_NOOP: &[&str] = &[
    "lazytime",
    "nolazytime",
    "dev",
    "suid",
    "exec",
    "async",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "nofail",
    "_netdev",
    "defaults",
    "default_permissions",
    "nostrictatime",
    "loop",
    "silent",
    "loud",
    "iversion",
    "noiversion",
    "mand",
    "nomand",
];

/// btrfs options that do not change a read-only mount's behaviour (accepted as the kernel would).
const BTRFS_NOOP: &[&str] = &[
    "ssd",
    "nossd",
    "ssd_spread",
    "nossd_spread",
    "discard",
    "nodiscard",
    "space_cache",
    "nospace_cache",
    "autodefrag",
    "noautodefrag",
    "barrier",
    "nobarrier",
    "treelog",
    "notreelog",
    "flushoncommit",
    "noflushoncommit",
    "acl",
    "noacl",
    "enospc_debug",
    "noenospc_debug",
    "user_subvol_rm_allowed",
    "skip_balance",
    "norecovery",
];

const BTRFS_NOOP_PREFIX: &[&str] = &[
    "space_cache=",
    "discard=",
    "compress=",
    "compress-force=",
    "thread_pool=",
    "max_inline=",
    "device=",
    "fatal_errors=",
    "check_int",
    "metadata_ratio=",
];

pub fn parse(opts: &[String]) -> Result<ParsedOptions, String> {
    let mut p = ParsedOptions {
        fs: MountOptions {
            readonly: false,
            ..MountOptions::default()
        },
        fsname: None,
        subtype: "ubtrfs".into(),
        noatime: false,
        strictatime: false,
        nodiratime: false,
        nodev: false,
        nosuid: false,
        noexec: false,
        sync: false,
        dirsync: false,
        allow_other: true,
        rw_requested: true,
        em_max: 0,
        em_max_bytes: 0,
        trace: None,
        trace_file: None,
    };
    for group in opts {
        for o in group.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match o.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (o, None),
            };
            match (name, value) {
                ("ro", None) => {
                    p.fs.readonly = true;
                    p.rw_requested = false;
                }
                ("rw", None) => {
                    p.fs.readonly = false;
                    p.rw_requested = true;
                }
                ("commit", Some(v)) => {
                    let n: u64 = v.parse().map_err(|_| format!("invalid commit={v}"))?;
                    if n == 0 {
                        return Err("commit=0 is not valid (use a number of seconds)".into());
                    }
                    if n > 300 {
                        eprintln!("ubtrfs: excessive commit interval {n}");
                    }
                    p.fs.commit_interval = n;
                }
                ("noatime", None) => p.noatime = true,
                ("atime", None) => p.noatime = false,
                ("relatime", None) => {
                    p.noatime = false;
                    p.strictatime = false;
                }
                ("strictatime" | "norelatime", None) => {
                    p.noatime = false;
                    p.strictatime = true;
                }
                ("nodiratime", None) => p.nodiratime = true,
                ("diratime", None) => p.nodiratime = false,
                ("nodev", None) => p.nodev = true,
                ("nosuid", None) => p.nosuid = true,
                ("noexec", None) => p.noexec = true,
                ("sync", None) => p.sync = true,
                ("dirsync", None) => p.dirsync = true,
                ("allow_other", None) => p.allow_other = true,
                ("fsname", Some(v)) => p.fsname = Some(v.to_string()),
                ("subtype", Some(v)) => p.subtype = v.to_string(),
                ("nosubtype", None) => p.subtype.clear(),
                // super.c btrfs_parse_param: nodatacow implies nodatasum; datasum clears both.
                ("datasum", None) => {
                    p.fs.nodatacow = false;
                    p.fs.nodatasum = false;
                }
                ("nodatasum", None) => p.fs.nodatasum = true,
                ("datacow", None) => p.fs.nodatacow = false,
                ("nodatacow", None) => {
                    p.fs.nodatacow = true;
                    p.fs.nodatasum = true;
                }
                ("subvolid", Some(v)) => {
                    p.fs.subvolid = Some(v.parse().map_err(|_| format!("invalid subvolid={v}"))?)
                }
                ("subvol", Some(v)) => p.fs.subvol = Some(v.to_string()),
                ("rescue", Some(v)) => {
                    for r in v.split(':') {
                        match r {
                            "nologreplay" => p.fs.nologreplay = true,
                            "usebackuproot" | "ignorebadroots" | "ignoredatacsums" | "all" => {
                                return Err(format!("rescue={r} is not supported by ubtrfs"))
                            }
                            other => return Err(format!("unknown rescue option {other}")),
                        }
                    }
                }
                ("nologreplay", None) => p.fs.nologreplay = true,
                ("log_rename_unlink", None) => p.fs.log_rename_unlink = true,
                ("nolog_rename_unlink", None) => p.fs.log_rename_unlink = false,
                ("shrinker", Some(v)) => {
                    p.fs.policy = v.parse::<Policy>().map_err(|_| {
                        format!(
                        "invalid shrinker={v} (kernel, fixed-split, fixed-shrinker, fixed-both)"
                    )
                    })?
                }
                ("em_max", Some(v)) => {
                    p.em_max = v
                        .parse()
                        .map_err(|_| format!("invalid em_max={v} (a number of extent maps)"))?
                }
                ("em_max_bytes", Some(v)) => {
                    p.em_max_bytes = parse_size(v)
                        .ok_or_else(|| format!("invalid em_max_bytes={v} (bytes, K/M/G suffix)"))?
                }
                ("trace", Some(v)) => {
                    crate::trace::directives(v)?;
                    p.trace = Some(v.to_string());
                }
                ("trace_file", Some(v)) if !v.is_empty() => p.trace_file = Some(v.into()),
                ("block_cache", Some(v)) => {
                    p.fs.block_cache_bytes =
                        parse_size(v).ok_or_else(|| format!("invalid block_cache={v}"))?
                }
                (n, None) if ACCEPTED_NOOP.contains(&n) || BTRFS_NOOP.contains(&n) => {}
                (n, Some(_)) if n.starts_with("x-") || n == "context" || n.ends_with("context") => {
                }
                _ if BTRFS_NOOP_PREFIX.iter().any(|pre| o.starts_with(pre)) => {}
                _ => return Err(format!("unknown mount option '{o}'")),
            }
        }
    }
    Ok(p)
}

/// Parse sizes like 4096, 64K, 256M, 1G.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: VFS options are accepted, btrfs's known ones honoured, unknown refused by name.
    #[test]
    fn accepts_and_refuses() {
        let p = parse(&["ro,relatime,nodev,subvolid=256,fsname=/dev/loop0".into()]).unwrap();
        assert!(p.fs.readonly && p.nodev);
        assert_eq!(p.fs.subvolid, Some(256));
        assert_eq!(p.fsname.as_deref(), Some("/dev/loop0"));
        let e = parse(&["ro,frobnicate".into()]).unwrap_err();
        assert!(e.contains("frobnicate"), "{e}");
        assert!(parse(&["shrinker=fixed-both".into()]).is_ok());
        assert!(parse(&["shrinker=nope".into()]).is_err());
        assert_eq!(parse_size("64M"), Some(64 << 20));
        // The kernel's tree-log behaviour by default; ubtrfs's rename logging on request.
        assert!(!parse(&[]).unwrap().fs.log_rename_unlink);
        assert!(
            parse(&["log_rename_unlink".into()])
                .unwrap()
                .fs
                .log_rename_unlink
        );
        assert!(
            !parse(&["log_rename_unlink,nolog_rename_unlink".into()])
                .unwrap()
                .fs
                .log_rename_unlink
        );
    }

    // Test scenario: the observability options parse into ParsedOptions and bad values are
    // refused by name; shrinker= reaches MountOptions::policy (which FsInfo::open hands to
    // FsExtentMaps::new).
    #[test]
    fn data_cow_and_sum_options() {
        // As the kernel parses them, last one wins: nodatacow implies nodatasum, datasum
        // clears both, datacow only nodatacow.
        let p = parse(&["nodatacow".into()]).unwrap();
        assert!(p.fs.nodatacow && p.fs.nodatasum);
        let p = parse(&["nodatacow,datacow".into()]).unwrap();
        assert!(!p.fs.nodatacow && p.fs.nodatasum);
        let p = parse(&["nodatacow,datasum".into()]).unwrap();
        assert!(!p.fs.nodatacow && !p.fs.nodatasum);
        let p = parse(&["nodatasum".into()]).unwrap();
        assert!(!p.fs.nodatacow && p.fs.nodatasum);
        let p = parse(&["rw".into()]).unwrap();
        assert!(!p.fs.nodatacow && !p.fs.nodatasum);
    }

    #[test]
    fn observability_options() {
        let p = parse(&[
            "em_max=1000,em_max_bytes=4M,trace=btrfs_sync_file+btrfs_get_extent=debug".into(),
            "trace_file=/tmp/t.log,shrinker=kernel".into(),
        ])
        .unwrap();
        assert_eq!((p.em_max, p.em_max_bytes), (1000, 4 << 20));
        assert_eq!(
            p.trace.as_deref(),
            Some("btrfs_sync_file+btrfs_get_extent=debug")
        );
        assert_eq!(
            p.trace_file.as_deref(),
            Some(std::path::Path::new("/tmp/t.log"))
        );
        assert_eq!(p.fs.policy, Policy::Kernel);
        assert_eq!(parse(&[]).unwrap().em_max, 0);
        for bad in [
            "em_max=lots",
            "em_max_bytes=1Q",
            "trace=x=loud",
            "trace=",
            "trace_file=",
        ] {
            let e = parse(&[bad.into()]).unwrap_err();
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
    }
}
