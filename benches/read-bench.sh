#!/usr/bin/env bash
# End-to-end read benchmark: ubtrfs (FUSE) against the kernel's btrfs on the same image.
#
# Builds ubtrfs in release mode, creates an image through a kernel loop mount holding a 1 GiB
# file and a tree of 100k files (100 directories x 1000 files, 0..7 KB each, so both inline and
# regular extents), then measures, for the ubtrfs mount and for the kernel's read-only loop mount
# of the same image:
#   - reading the 1 GiB file cold (fresh mount, caches dropped) and warm (read again);
#   - `find | wc -l` over the 100k-file tree, cold (readdir only);
#   - `find -printf` of inode, size and mtime of every entry, cold (readdir + stat of all).
# Each measurement runs BENCH_RUNS times (default 3); the table shows the median and the ratio
# ubtrfs/kernel (above 1: ubtrfs is slower).
#
# Usage (as root): benches/read-bench.sh [WORKDIR]
#   WORKDIR            where the image and mount points go (default /tmp/ubtrfs-bench.PID);
#                      needs about 1.5 GiB of space
#   BENCH_RUNS=N       repetitions per measurement (default 3)
#   BENCH_FILES=N      files in the tree (default 100000)
#   BENCH_BIG_MIB=N    size of the big file in MiB (default 1024)
#   BENCH_WRITE_OPTS=  mount options of the kernel mount that writes the image, e.g.
#                      compress-force=zstd to benchmark decompression (default: none)
#   BENCH_MOUNT_OPTS=  extra -o options for ubtrfs (default: ro)
#   BENCH_KEEP=1       keep WORKDIR (the image) at the end
# Not run in CI: timings depend on the machine.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
RUNS=${BENCH_RUNS:-3}
FILES=${BENCH_FILES:-100000}
BIG_MIB=${BENCH_BIG_MIB:-1024}
WORK=${1:-/tmp/ubtrfs-bench.$$}
IMG="$WORK/bench.img"
MNT="$WORK/mnt"
BIN="$REPO/target/release/ubtrfs"

BENCH_NAME=read-bench
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (loop devices, kernel mounts, drop_caches)"
for c in mkfs.btrfs losetup mount umount findmnt fusermount3 cargo dd find awk sort; do
    command -v "$c" >/dev/null 2>&1 || die "missing tool: $c"
done
[ -c /dev/fuse ] || die "/dev/fuse is missing"

# --- cleanup: whatever is mounted or attached by this script --------------------------------
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

# --- helpers ----------------------------------------------------------------------------------
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

kernel_mount() { # $1: options
    LOOPDEV=$(losetup --find --show "$IMG")
    mount -t btrfs -o "$1" "$LOOPDEV" "$MNT"
}
kernel_umount() {
    umount "$MNT"
    losetup -d "$LOOPDEV"
    LOOPDEV=""
}

ubtrfs_mount() {
    "$BIN" mount -f -o "${BENCH_MOUNT_OPTS:-ro}" "$IMG" "$MNT" 2>"$WORK/ubtrfs.stderr" &
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
    # The daemon exits by itself once unmounted; the image is free only then.
    wait "$DAEMON_PID" || die "ubtrfs exited with status $? (stderr: $(tail -3 "$WORK/ubtrfs.stderr"))"
    DAEMON_PID=""
}

now() { date +%s.%N; }
# Time a shell command line; prints seconds. Its output goes to $WORK/last.out.
timed() {
    local t0 t1
    t0=$(now)
    bash -c "$1" >"$WORK/last.out"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- build and image --------------------------------------------------------------------------
log "building ubtrfs (release)"
cargo build --release -p ubtrfs >&2

log "creating the image: ${BIG_MIB} MiB file + $FILES files"
truncate -s $(( BIG_MIB * 2 + 3072 ))M "$IMG"
mkfs.btrfs -q -f "$IMG" >/dev/null
kernel_mount "${BENCH_WRITE_OPTS:-defaults}"
dd if=/dev/urandom of="$MNT/big" bs=1M count="$BIG_MIB" status=none
per_dir=1000
dirs=$(( (FILES + per_dir - 1) / per_dir ))
n=0
for (( d = 0; d < dirs; d++ )); do
    dir="$MNT/tree/d$(printf '%03d' "$d")"
    mkdir -p "$dir"
    for (( f = 0; f < per_dir && n < FILES; f++, n++ )); do
        # Builtin printf only (no fork per file): a number padded to 0..7000 bytes.
        printf '%*d' $(( (n % 8) * 1000 )) "$n" > "$dir/f$f"
    done
done
sync
kernel_umount
BIG_SIZE=$(( BIG_MIB * 1024 * 1024 ))

# --- measurements -----------------------------------------------------------------------------
declare -A RESULT
run_side() { # $1: kernel|ubtrfs
    local side=$1 i t
    local -a cold warm walk statall
    for (( i = 0; i < RUNS; i++ )); do
        # Read the big file: a fresh mount with dropped caches, then again warm.
        drop_caches
        if [ "$side" = kernel ]; then kernel_mount ro; else ubtrfs_mount; fi
        t=$(timed "dd if='$MNT/big' of=/dev/null bs=1M status=none")
        cold+=("$t")
        t=$(timed "dd if='$MNT/big' of=/dev/null bs=1M status=none")
        warm+=("$t")
        if [ "$side" = kernel ]; then kernel_umount; else ubtrfs_umount; fi

        drop_caches
        if [ "$side" = kernel ]; then kernel_mount ro; else ubtrfs_mount; fi
        t=$(timed "find '$MNT/tree' | wc -l")
        walk+=("$t")
        local count
        count=$(cat "$WORK/last.out")
        [ "$count" -eq $(( FILES + dirs + 1 )) ] \
            || die "$side: find saw $count entries, expected $(( FILES + dirs + 1 ))"
        if [ "$side" = kernel ]; then kernel_umount; else ubtrfs_umount; fi

        drop_caches
        if [ "$side" = kernel ]; then kernel_mount ro; else ubtrfs_mount; fi
        t=$(timed "find '$MNT/tree' -printf '%i %s %T@\n' | wc -l")
        statall+=("$t")
        if [ "$side" = kernel ]; then kernel_umount; else ubtrfs_umount; fi
        log "$side run $((i + 1))/$RUNS: read cold ${cold[-1]}s warm ${warm[-1]}s, find ${walk[-1]}s, find+stat ${statall[-1]}s"
    done
    RESULT[$side,cold]=$(printf '%s\n' "${cold[@]}" | median)
    RESULT[$side,warm]=$(printf '%s\n' "${warm[@]}" | median)
    RESULT[$side,walk]=$(printf '%s\n' "${walk[@]}" | median)
    RESULT[$side,stat]=$(printf '%s\n' "${statall[@]}" | median)
}

log "kernel btrfs"
run_side kernel
log "ubtrfs"
run_side ubtrfs

# --- report -----------------------------------------------------------------------------------
mbps() { awk -v b="$BIG_SIZE" -v s="$1" 'BEGIN { if (s > 0) printf "%.0f", b / 1048576 / s; else print "-" }'; }
ratio() { awk -v k="$1" -v u="$2" 'BEGIN { if (k > 0) printf "%.2f", u / k; else print "-" }'; }
row() { # label key
    local k=${RESULT[kernel,$2]} u=${RESULT[ubtrfs,$2]}
    printf '| %s | %s | %s | %s |\n' "$1" "$k" "$u" "$(ratio "$k" "$u")"
}

echo
echo "### ubtrfs vs kernel btrfs, read-only ($(uname -r), $(nproc) CPUs, median of $RUNS)"
echo
echo "Image: ${BIG_MIB} MiB file of random data + $FILES files in $dirs directories" \
     "(write options: ${BENCH_WRITE_OPTS:-defaults}; ubtrfs options: ${BENCH_MOUNT_OPTS:-ro})."
echo
echo "| Operation | kernel (s) | ubtrfs (s) | ubtrfs / kernel |"
echo "|---|---:|---:|---:|"
row "read ${BIG_MIB} MiB file, cold ($(mbps "${RESULT[kernel,cold]}") vs $(mbps "${RESULT[ubtrfs,cold]}") MiB/s)" cold
row "read ${BIG_MIB} MiB file, warm ($(mbps "${RESULT[kernel,warm]}") vs $(mbps "${RESULT[ubtrfs,warm]}") MiB/s)" warm
row "find \\| wc -l, $FILES files, cold" walk
row "find -printf (stat all), $FILES files, cold" stat
