#!/usr/bin/env bash
# ubtrfs CI: fmt, clippy, build, short fuzz run (when a target exists), tests.
#
# Runs as root on a fresh clone with CI=true and no stdin, on 2 cores, within 30 minutes.
# The integration tests (fuse-daemon/tests) need root, /dev/fuse, loop devices, btrfs-progs,
# fuse3 (fusermount3), xz and the kernel's btrfs; missing pieces fail loudly here, before cargo.
#
# cargo test runs last and its output is not filtered, so the last line it prints is the last
# line of this script's stdout (the cleanup trap writes only to stderr).
set -euo pipefail

cd "$(dirname "$0")/.."
START=$SECONDS

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'ci/test.sh: FATAL: %s\n' "$*" >&2; exit 1; }

# Every temporary file of the integration tests lives under this directory (the tests read
# UBTRFS_TEST_TMPDIR), so the cleanup below can find what they leave behind if they crash.
export UBTRFS_TEST_TMPDIR="${UBTRFS_TEST_TMPDIR:-/tmp/ubtrfs-tests-ci.$$}"
mkdir -p "$UBTRFS_TEST_TMPDIR"
export RUST_BACKTRACE=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# --- cleanup: FUSE mounts and loop devices made by the tests ---------------------------------
cleanup() {
    local rc=$?
    set +e
    local mnt
    # Mount points under the test directory, deepest first (fuse and kernel loop mounts alike).
    while read -r mnt; do
        [ -n "$mnt" ] || continue
        echo "ci/test.sh: cleanup: unmounting stray mount $mnt" >&2
        fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    done < <(findmnt -rn -o TARGET 2>/dev/null | sed 's/\\x20/ /g' \
             | grep -F "$UBTRFS_TEST_TMPDIR/" | sort -r)
    # Loop devices whose backing file is under the test directory.
    local dev
    while read -r dev; do
        [ -n "$dev" ] || continue
        echo "ci/test.sh: cleanup: detaching stray loop device $dev" >&2
        losetup -d "$dev" 2>/dev/null
    done < <(losetup -n -O NAME,BACK-FILE 2>/dev/null \
             | awk -v d="$UBTRFS_TEST_TMPDIR/" 'index($2, d) == 1 {print $1}')
    if [ -z "${UBTRFS_KEEP_TMP:-}" ]; then
        rm -rf --one-file-system "$UBTRFS_TEST_TMPDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- system packages ------------------------------------------------------------------------
need_pkgs=()
command -v mkfs.btrfs >/dev/null 2>&1 || need_pkgs+=(btrfs-progs)
command -v btrfs >/dev/null 2>&1 || need_pkgs+=(btrfs-progs)
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
command -v getfattr >/dev/null 2>&1 || need_pkgs+=(attr)
command -v xz >/dev/null 2>&1 || need_pkgs+=(xz-utils)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
for c in losetup mount umount findmnt; do
    command -v "$c" >/dev/null 2>&1 || need_pkgs+=(util-linux)
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
    log "installing ${need_pkgs[*]}"
    [ "$(id -u)" -eq 0 ] || die "missing packages ${need_pkgs[*]} and not root to install them"
    command -v apt-get >/dev/null 2>&1 || die "missing packages ${need_pkgs[*]} and no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >&2
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" </dev/null >&2
fi

# --- the machine: root, /dev/fuse, loop devices, btrfs in the kernel ------------------------
[ "$(id -u)" -eq 0 ] || die "the integration tests need root (loop devices, kernel btrfs mounts)"
[ -c /dev/fuse ] || die "/dev/fuse is missing or not a character device (load the fuse module)"
[ -c /dev/loop-control ] || die "/dev/loop-control is missing (load the loop module)"
probe=$(losetup -f 2>&1) || die "no free loop device: $probe"
grep -qw btrfs /proc/filesystems \
    || die "the kernel does not list btrfs in /proc/filesystems (load the btrfs module)"
grep -qw fuse /proc/filesystems || die "the kernel does not list fuse in /proc/filesystems"

# --- Rust toolchain --------------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found in PATH"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || die "rustfmt/clippy missing and no rustup to add them"
    log "adding rustfmt and clippy"
    rustup component add rustfmt clippy </dev/null >&2
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo build"
cargo build --workspace

# --- HOOK: bounded fuzz / corruption run -------------------------------------------------------
# When a fuzz target exists, run it here for a bounded time. Recognised, in this order:
#   ci/fuzz.sh            a script of our own (gets FUZZ_SECONDS in the environment)
#   fuzz/Cargo.toml       a cargo-fuzz project: every target runs FUZZ_SECONDS (needs nightly
#                         and cargo-fuzz installed; otherwise this fails loudly)
# FUZZ_SECONDS defaults to 120 in total so that CI stays well inside its 30 minutes.
FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
if [ -x ci/fuzz.sh ]; then
    log "fuzz: ci/fuzz.sh (${FUZZ_SECONDS}s)"
    FUZZ_SECONDS="$FUZZ_SECONDS" timeout --kill-after=30 "$((FUZZ_SECONDS + 300))" ci/fuzz.sh >&2
elif [ -f fuzz/Cargo.toml ]; then
    command -v cargo-fuzz >/dev/null 2>&1 || die "fuzz/ exists but cargo-fuzz is not installed"
    mapfile -t targets < <(cargo fuzz list 2>/dev/null)
    [ "${#targets[@]}" -gt 0 ] || die "fuzz/ exists but cargo fuzz list found no target"
    per=$(( FUZZ_SECONDS / ${#targets[@]} )); [ "$per" -ge 10 ] || per=10
    for t in "${targets[@]}"; do
        log "fuzz: $t (${per}s)"
        timeout --kill-after=30 "$((per + 600))" \
            cargo +nightly fuzz run "$t" -- -max_total_time="$per" </dev/null >&2
    done
else
    log "fuzz: no fuzz target yet (add ci/fuzz.sh or fuzz/Cargo.toml)"
fi
# --- end of fuzz hook -------------------------------------------------------------------------

# The tests guard every mount operation with their own timeouts; this bound only keeps a stuck
# run from eating the whole CI slot (30 minutes, minus what the steps above took).
budget=$(( ${CI_TOTAL_SECONDS:-1800} - (SECONDS - START) - 60 ))
[ "$budget" -ge 300 ] || budget=300
log "cargo test (time limit ${budget}s)"
# Last command: its own output (and exit status) is what CI reads. --no-fail-fast: one failing
# test binary must not hide the results of the others.
timeout --kill-after=30 "$budget" cargo test --workspace --no-fail-fast
