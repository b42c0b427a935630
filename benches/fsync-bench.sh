#!/usr/bin/env bash
# fsync latency benchmark (issue 7): ubtrfs (FUSE, read-write) against the kernel's btrfs on a
# loop mount of an image of the same size, in the same run. Prints a Markdown table.
#
# Measurements (driver: benches/src/bin/fsync_lat.rs; only the sync call is timed unless said):
#   - 4 KiB overwrite + fsync of a 16 MiB file: p50 / p99;
#   - create + fsync of a new empty file (both timed);
#   - rename + fsync of the parent directory (both timed);
#   - one dirty 4 KiB block + fsync in a 1 MiB file and in a 1 GiB file (fsync must cost what
#     changed, not what exists);
#   - N threads each overwriting + fsyncing its own 4 MiB file: p50 / p99 and fsyncs/s in all
#     (the kernel batches concurrent fsyncs into one log sync).
# Each side gets a fresh mkfs.btrfs image; `btrfs check --readonly` must pass after each side.
#
# Usage (as root): benches/fsync-bench.sh [WORKDIR]
#   WORKDIR           where the images and mount points go (default /tmp/ubtrfs-fsync-bench.PID;
#                     needs about 2.5 GiB, and its filesystem's fsync cost shows in both columns)
#   BENCH_N=N         fsyncs per measurement (default 200)
#   BENCH_THREADS=T   threads of the batching measurement (default 4)
#   BENCH_BIG_MIB=N   size of the big file (default 1024)
#   BENCH_KEEP=1      keep WORKDIR at the end
# Not run in CI: timings depend on the machine.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
N=${BENCH_N:-200}
THREADS=${BENCH_THREADS:-4}
BIG_MIB=${BENCH_BIG_MIB:-1024}
WORK=${1:-/tmp/ubtrfs-fsync-bench.$$}
IMG="$WORK/bench.img"
MNT="$WORK/mnt"
BIN="$REPO/target/release/ubtrfs"
DRIVER="$REPO/target/release/fsync_lat"

BENCH_NAME=fsync-bench
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (loop devices, kernel mounts)"
for c in mkfs.btrfs btrfs losetup mount umount findmnt fusermount3 cargo awk; do
    command -v "$c" >/dev/null 2>&1 || die "missing tool: $c"
done
[ -c /dev/fuse ] || die "/dev/fuse is missing"

# --- cleanup: whatever this script mounted or attached ---------------------------------------
LOOPDEV=""
DAEMON_PID=""
cleanup() {
    local rc=$?
    set +e
    bench_unmount "$MNT"
    bench_stop_daemon "$DAEMON_PID" 50
    bench_finish "$rc"
}
bench_traps

mkdir -p "$MNT"

fresh_image() {
    rm -f "$IMG"
    truncate -s $(( BIG_MIB + 1536 ))M "$IMG"
    mkfs.btrfs -q -f "$IMG" >/dev/null
}
kernel_mount() {
    LOOPDEV=$(losetup --find --show "$IMG")
    mount -t btrfs -o rw "$LOOPDEV" "$MNT"
}
kernel_umount() {
    umount "$MNT"
    losetup -d "$LOOPDEV"
    LOOPDEV=""
}
ubtrfs_mount() {
    "$BIN" mount -f -o rw "$IMG" "$MNT" 2>"$WORK/ubtrfs.stderr" &
    DAEMON_PID=$!
    for _ in $(seq 300); do
        if findmnt -rn -t fuse,fuse.ubtrfs "$MNT" >/dev/null 2>&1; then return 0; fi
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$WORK/ubtrfs.stderr" >&2
    die "ubtrfs did not mount $IMG"
}
ubtrfs_umount() {
    fusermount3 -u "$MNT"
    wait "$DAEMON_PID" || die "ubtrfs exited with status $? (stderr: $(tail -3 "$WORK/ubtrfs.stderr"))"
    DAEMON_PID=""
}

# --- build --------------------------------------------------------------------------------------
log "building ubtrfs and the fsync driver (release)"
cargo build --release -p ubtrfs -p ubtrfs-benches --bin ubtrfs --bin fsync_lat >&2

# --- measurements -------------------------------------------------------------------------------
declare -A RES
TESTS=(ow16 create rename ow1 owbig threads)
run_side() { # $1: kernel|ubtrfs
    local side=$1 t line
    fresh_image
    if [ "$side" = kernel ]; then kernel_mount; else ubtrfs_mount; fi
    for t in "${TESTS[@]}"; do
        case $t in
            ow16) line=$("$DRIVER" "$MNT" overwrite 16 "$N") ;;
            create) line=$("$DRIVER" "$MNT" create "$N") ;;
            rename) line=$("$DRIVER" "$MNT" rename "$N") ;;
            ow1) line=$("$DRIVER" "$MNT" overwrite 1 "$N") ;;
            owbig) line=$("$DRIVER" "$MNT" overwrite "$BIG_MIB" "$N") ;;
            threads) line=$("$DRIVER" "$MNT" threads "$THREADS" $(( N / THREADS + 1 ))) ;;
        esac
        log "$side: $line"
        RES[$side,$t,p50]=$(sed -n 's/.* p50_us=\([0-9]*\).*/\1/p' <<<"$line")
        RES[$side,$t,p99]=$(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' <<<"$line")
        RES[$side,$t,ops]=$(sed -n 's/.* ops_per_s=\([0-9]*\).*/\1/p' <<<"$line")
    done
    if [ "$side" = kernel ]; then kernel_umount; else ubtrfs_umount; fi
    btrfs check --readonly "$IMG" >"$WORK/check.out" 2>&1 \
        || { cat "$WORK/check.out" >&2; die "btrfs check failed after the $side run"; }
}

log "kernel btrfs"
run_side kernel
log "ubtrfs"
run_side ubtrfs

# --- report -------------------------------------------------------------------------------------
us() { awk -v v="$1" 'BEGIN { if (v >= 10000) printf "%.1f ms", v / 1000; else printf "%d µs", v }'; }
ratio() { awk -v k="$1" -v u="$2" 'BEGIN { if (k > 0) printf "%.2f", u / k; else print "-" }'; }
row() { # label test
    local t=$2
    printf '| %s | %s / %s | %s / %s | %s |\n' "$1" \
        "$(us "${RES[kernel,$t,p50]}")" "$(us "${RES[kernel,$t,p99]}")" \
        "$(us "${RES[ubtrfs,$t,p50]}")" "$(us "${RES[ubtrfs,$t,p99]}")" \
        "$(ratio "${RES[kernel,$t,p50]}" "${RES[ubtrfs,$t,p50]}")"
}

echo
echo "### fsync latency, ubtrfs vs kernel btrfs ($(uname -r), $(nproc) CPUs, $N fsyncs each)"
echo
echo "Backing store of the images: $(df --output=fstype "$WORK" | tail -1) ($WORK)."
echo
echo "| Measurement | kernel p50 / p99 | ubtrfs p50 / p99 | ubtrfs / kernel (p50) |"
echo "|---|---:|---:|---:|"
row "4 KiB overwrite + fsync, 16 MiB file" ow16
row "create + fsync (both timed)" create
row "rename + fsync of the parent (both timed)" rename
row "1 dirty 4 KiB block + fsync, 1 MiB file" ow1
row "1 dirty 4 KiB block + fsync, ${BIG_MIB} MiB file" owbig
row "$THREADS threads, 4 KiB overwrite + fsync each" threads
echo
echo "$THREADS threads: kernel ${RES[kernel,threads,ops]} fsyncs/s," \
     "ubtrfs ${RES[ubtrfs,threads,ops]} fsyncs/s in all."
echo "${BIG_MIB} MiB vs 1 MiB file (p50): kernel" \
     "$(ratio "${RES[kernel,ow1,p50]}" "${RES[kernel,owbig,p50]}")x," \
     "ubtrfs $(ratio "${RES[ubtrfs,ow1,p50]}" "${RES[ubtrfs,owbig,p50]}")x."
