//! Logging and tracing output: `RUST_LOG` (default `warn,fuser=error`) to stderr, plus the
//! `trace=FILTER` and `trace_file=PATH` mount options.
//!
//! Events that mirror a kernel tracepoint use the tracepoint's name as their `tracing` target
//! and its fields: `btrfs_sync_file`, `btrfs_get_extent`, `btrfs_transaction_commit`,
//! `btrfs_extent_map_shrinker_count`, `btrfs_extent_map_shrinker_scan_enter` / `_scan_exit`,
//! `btrfs_extent_map_shrinker_remove_em`. A filter directive matches target prefixes, so
//! `trace=btrfs_extent_map_shrinker` enables all the shrinker's events, as
//! `events/btrfs/btrfs_extent_map_shrinker*` would.
//!
//! FILTER is `tracing_subscriber::EnvFilter` syntax with `+` between directives (a comma
//! would end the mount option): `trace=btrfs_sync_file+btrfs_get_extent=debug`. A bare name
//! enables every level of that target.
//!
//! Where the output goes: without `trace_file`, everything to stderr (with targets shown when
//! `trace=` is given, so that each line names its tracepoint). With `trace_file=PATH`, the
//! events selected by `RUST_LOG` and `trace=` are appended to PATH with timestamps, and stderr
//! keeps the `RUST_LOG` output (warnings and errors by default), so a failing mount still says
//! why where the user looks.

use std::path::Path;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The default filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "warn,fuser=error";

/// The `trace=` value in `EnvFilter` syntax, checked.
pub fn directives(filter: &str) -> Result<String, String> {
    let d = filter
        .split('+')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    if d.is_empty() {
        return Err("trace= needs at least one target (e.g. trace=btrfs_sync_file)".into());
    }
    EnvFilter::builder()
        .parse(&d)
        .map_err(|e| format!("invalid trace={filter}: {e}"))?;
    Ok(d)
}

fn base() -> String {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string())
}

fn filter(parts: &[&str]) -> EnvFilter {
    let joined = parts
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    // RUST_LOG may hold directives of its own that do not parse: keep the valid ones.
    EnvFilter::builder().parse_lossy(joined)
}

/// Install the global subscriber. `trace` is the `trace=` value (already checked by
/// [`directives`]), `trace_file` the `trace_file=` path.
pub fn init(trace: Option<&str>, trace_file: Option<&Path>) -> Result<(), String> {
    let base = base();
    let trace = trace.map(directives).transpose()?.unwrap_or_default();
    let file = match trace_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("trace_file={}: {e}", p.display()))?,
        ),
        None => None,
    };
    let to_stderr = if file.is_some() {
        filter(&[&base])
    } else {
        filter(&[&base, &trace])
    };
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(!trace.is_empty() && file.is_none())
        .with_ansi(false)
        .without_time()
        .with_filter(to_stderr);
    let file_layer = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::sync::Mutex::new(f))
            .with_target(true)
            .with_ansi(false)
            .with_filter(filter(&[&base, &trace]))
    });
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: '+' separates directives; bad directives and empty filters are refused.
    #[test]
    fn trace_directives() {
        assert_eq!(
            directives("btrfs_sync_file+btrfs_get_extent=debug").unwrap(),
            "btrfs_sync_file,btrfs_get_extent=debug"
        );
        assert!(directives("").is_err());
        assert!(directives("btrfs_sync_file=loud").is_err());
    }
}
