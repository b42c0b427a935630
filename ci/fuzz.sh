#!/usr/bin/env bash
# Bounded fuzz run: the parser property tests with many more cases than `cargo test` runs, then
# the seeded corruption loops of crates/fs/tests/corruption.rs (damaged tree blocks, superblock,
# data, log trees; open + full walk of each case; a panic or a 30 s hang fails) for the rest of
# the time, both loops side by side.
#
# ci/test.sh calls this (its fuzz hook: `[ -x ci/fuzz.sh ]`) with FUZZ_SECONDS in the
# environment; developers can run it directly. Environment:
#   FUZZ_SECONDS       total time budget, default 120 (building the tests comes on top)
#   UBTRFS_FUZZ_SEED   base seed of the corruption loop; random when unset (printed, so that a
#                      failure replays with the same value)
#   PROPTEST_CASES     cases per parser property test, default 20000
# A failing corruption case prints its case seed; `UBTRFS_FUZZ_CASE=<seed> cargo test -p
# ubtrfs-fs --test corruption <test name>` runs that case alone.
set -euo pipefail

cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
PROPTEST_CASES="${PROPTEST_CASES:-20000}"
seed="${UBTRFS_FUZZ_SEED:-0x$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')}"

log() { printf '==> fuzz: %s\n' "$*" >&2; }

# Build first, so that compile time does not eat the fuzzing budget.
log "building the fuzz tests"
cargo test -p ubtrfs-format --test parser_fuzz --no-run
cargo test -p ubtrfs-fs --test corruption --no-run

start=$SECONDS
log "parser property tests, ${PROPTEST_CASES} cases each"
PROPTEST_CASES="$PROPTEST_CASES" timeout --kill-after=10 "$((FUZZ_SECONDS + 60))" \
    cargo test -p ubtrfs-format --test parser_fuzz

left=$(( FUZZ_SECONDS - (SECONDS - start) ))
[ "$left" -ge 10 ] || left=10
log "corruption loops for ${left}s, base seed ${seed}" \
    "(replay: UBTRFS_FUZZ_SEED=${seed} UBTRFS_FUZZ_SECONDS=${left} ci/fuzz.sh)"
# The loops stop starting cases after UBTRFS_FUZZ_SECONDS; one case may take up to 30 s more
# before it counts as a hang. "random_" selects random_corruption_never_panics and
# random_log_corruption_never_panics.
UBTRFS_FUZZ_SEED="$seed" UBTRFS_FUZZ_ITERS=1000000000 UBTRFS_FUZZ_SECONDS="$left" \
    timeout --kill-after=10 "$((left + 120))" \
    cargo test -p ubtrfs-fs --test corruption random_ -- --nocapture
log "done: no panic, no hang"
