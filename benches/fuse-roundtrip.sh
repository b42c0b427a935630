#!/usr/bin/env bash
# What one FUSE round trip costs on this machine (issue 8: file creation makes five synchronous
# ones per file). ubtrfs (release build) on a fresh mkfs.btrfs image; a Python loop calls
# getxattr("user.x") on one file BENCH_CALLS times (ENODATA: one request, one tree search in the
# daemon), and the same loop on a file of the root filesystem is subtracted (the caller's own
# syscall cost). Two placements, alternating, BENCH_ROUNDS rounds each:
#   free    caller and daemon threads may run on any CPU (as in every other benchmark);
#   pinned  caller and every daemon thread on CPU BENCH_CPU (`taskset`), so that no request or
#           reply has to wake another CPU.
# The difference between the two is what the cross-CPU wake-ups of /dev/fuse cost (in a VM: an
# IPI and a halted vCPU to wake, each way). Prints µs per round trip, the median and each round.
#
# Usage (as root): benches/fuse-roundtrip.sh [WORKDIR]
#   WORKDIR           image and mount point (default /tmp/ubtrfs-roundtrip.PID)
#   BENCH_CALLS=N     getxattr calls per measurement (default 20000)
#   BENCH_ROUNDS=N    rounds (default 5)
#   BENCH_CPU=N       the CPU of the pinned placement (default 1)
#   BENCH_KEEP=1      keep WORKDIR at the end
# Not run in CI: timings depend on the machine.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
CALLS=${BENCH_CALLS:-20000}
ROUNDS=${BENCH_ROUNDS:-5}
CPU=${BENCH_CPU:-1}
WORK=${1:-/tmp/ubtrfs-roundtrip.$$}
BIN="$REPO/target/release/ubtrfs"

BENCH_NAME=fuse-roundtrip
LOOPDEV=""
DAEMON_PID=""
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (mount)"
for c in mkfs.btrfs findmnt taskset python3 cargo; do
    command -v "$c" >/dev/null || die "missing $c"
done
[ "$CPU" -lt "$(nproc)" ] || die "BENCH_CPU=$CPU: this machine has $(nproc) CPUs"

cleanup() {
    local rc=$?
    bench_unmount "$WORK/mnt"
    bench_stop_daemon "$DAEMON_PID" 100
    bench_finish "$rc"
}
bench_traps

log "building ubtrfs (release)"
cargo build --release -p ubtrfs >&2
mkdir -p "$WORK/mnt"
truncate -s 1G "$WORK/img"
mkfs.btrfs -q -f "$WORK/img" >/dev/null
"$BIN" mount -f "$WORK/img" "$WORK/mnt" 2>>"$WORK/ubtrfs.stderr" &
DAEMON_PID=$!
for _ in $(seq 300); do
    findmnt -rn "$WORK/mnt" >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "ubtrfs did not mount: $(tail -3 "$WORK/ubtrfs.stderr")"
    sleep 0.1
done
findmnt -rn "$WORK/mnt" >/dev/null || die "ubtrfs did not mount within 30 s"
echo x >"$WORK/mnt/f"
echo x >"$WORK/local"

# µs per getxattr on the FUSE file minus on the local one; the arguments (if any) are the
# command that runs Python (taskset).
measure() {
    "$@" python3 - "$WORK/mnt/f" "$WORK/local" "$CALLS" <<'EOF'
import os, sys, time
def loop(path, n):
    t = time.perf_counter()
    for _ in range(n):
        try:
            os.getxattr(path, "user.x")
        except OSError:
            pass
    return time.perf_counter() - t
fuse, local, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(f"{(loop(fuse, n) - loop(local, n)) / n * 1e6:.2f}")
EOF
}

all_cpus="0-$(( $(nproc) - 1 ))"
declare -A R=()
LOADS=""
for r in $(seq "$ROUNDS"); do
    LOADS+="${LOADS:+ / }$(cut -d' ' -f1 /proc/loadavg)"
    taskset -a -p -c "$all_cpus" "$DAEMON_PID" >/dev/null
    free=$(measure)
    taskset -a -p -c "$CPU" "$DAEMON_PID" >/dev/null
    pinned=$(measure taskset -c "$CPU")
    R[free]+="$free "
    R[pinned]+="$pinned "
    log "round $r: free $free µs, pinned $pinned µs"
done
taskset -a -p -c "$all_cpus" "$DAEMON_PID" >/dev/null
umount "$WORK/mnt"
# The daemon exits by itself once unmounted.
wait "$DAEMON_PID" || die "ubtrfs exited with status $? (stderr: $(tail -3 "$WORK/ubtrfs.stderr"))"
DAEMON_PID=""

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "FUSE round trip (getxattr, ENODATA), $CALLS calls, $(uname -r), $(nproc) CPUs, load average (1 min) per round: $LOADS"
for p in free pinned; do
    printf '%-6s median %s µs; rounds: %s\n' "$p" "$(echo "${R[$p]}" | median)" "${R[$p]}"
done
