//! Shared helpers for the ubtrfs benchmarks.
