#!/usr/bin/env bash
# Write benchmark (issue 4): ubtrfs (FUSE, release build) against the kernel's btrfs on a loop
# device, two mkfs.btrfs images of the same size, in one run on one machine:
#   - sequential write of BENCH_SEQ_MIB (default 1 GiB) in 1 MiB writes, fsync at the end;
#     then, after unmount, the number of EXTENT_DATA items of that file
#     (`btrfs inspect-internal dump-tree`): small sequential writes must become large extents;
#   - BENCH_RAND_OPS (default 65536) buffered 4 KiB random overwrites of that file, fsync at
#     the end;
#   - creation of BENCH_FILES (default 100000) files of 1 KiB in 100 directories, then sync -f;
#     then unlink of all of them, then sync -f.
# Every phase is timed by the wall clock (final fsync/sync included); the table shows seconds,
# the rate and ubtrfs's rate / the kernel's (above 1: ubtrfs is faster). `btrfs check
# --readonly` runs on both images at the end of every round.
# The machine is shared, so this runs in BENCH_ROUNDS rounds (fresh images each, the kernel and
# ubtrfs taking turns to go first) and the table shows the median with every round's seconds.
#
# Usage (as root): benches/write-bench.sh [WORKDIR]
#   WORKDIR             images and mount points (default /tmp/ubtrfs-write.PID; ~5 GiB free)
#   BENCH_IMG_GIB=N     size of each image (default 4)
#   BENCH_SEQ_MIB=N     sequential write size (default 1024)
#   BENCH_RAND_OPS=N    random 4 KiB overwrites (default 65536)
#   BENCH_FILES=N       files created and unlinked (default 100000)
#   BENCH_ROUNDS=N      rounds (default 3)
#   BENCH_OUT=FILE      Markdown table (default benches/RESULTS-write.md)
#   BENCH_KEEP=1        keep WORKDIR at the end
# fio is installed with apt-get when missing. Not run in CI: timings depend on the machine.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
IMG_GIB=${BENCH_IMG_GIB:-4}
SEQ_MIB=${BENCH_SEQ_MIB:-1024}
RAND_OPS=${BENCH_RAND_OPS:-65536}
NFILES=${BENCH_FILES:-100000}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=${BENCH_OUT:-$REPO/benches/RESULTS-write.md}
WORK=${1:-/tmp/ubtrfs-write.$$}
BIN="$REPO/target/release/ubtrfs"

BENCH_NAME=write-bench
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (loop devices, kernel mounts, drop_caches)"
if ! command -v fio >/dev/null 2>&1; then
    log "installing fio"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >&2 || die "cannot install fio"
fi
for c in mkfs.btrfs btrfs losetup mount umount findmnt fusermount3 cargo python3 fio; do
    command -v "$c" >/dev/null 2>&1 || die "missing tool: $c"
done
[ -c /dev/fuse ] || die "/dev/fuse is missing"

# --- cleanup: every mount and loop device of this script --------------------------------------
LOOPDEV=""
DAEMON_PID=""
cleanup() {
    local rc=$? fs
    set +e
    for fs in ubtrfs kernel; do
        bench_unmount "$WORK/mnt-$fs"
    done
    bench_stop_daemon "$DAEMON_PID" 100
    bench_finish "$rc"
}
bench_traps

mkdir -p "$WORK"
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
img() { echo "$WORK/$1.img"; }
mnt() { echo "$WORK/mnt-$1"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

do_mount() { # fs
    if [ "$1" = kernel ]; then
        LOOPDEV=$(losetup --find --show "$(img kernel)")
        mount -t btrfs "$LOOPDEV" "$(mnt kernel)"
        return
    fi
    "$BIN" mount -f "$(img ubtrfs)" "$(mnt ubtrfs)" 2>>"$WORK/ubtrfs.stderr" &
    DAEMON_PID=$!
    for _ in $(seq 300); do
        findmnt -rn "$(mnt ubtrfs)" >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$WORK/ubtrfs.stderr" >&2
    die "ubtrfs did not mount $(img ubtrfs)"
}
# umount, retried: a process of someone else's that walks /tmp can hold the mount point for a
# moment ("target is busy").
umount_retry() {
    for _ in $(seq 20); do
        umount "$1" 2>/dev/null && return 0
        sleep 0.5
    done
    umount "$1"
}
do_umount() { # fs
    umount_retry "$(mnt "$1")"
    if [ "$1" = kernel ]; then
        losetup -d "$LOOPDEV"
        LOOPDEV=""
    else
        # The daemon exits by itself once unmounted; the image is consistent only then.
        wait "$DAEMON_PID" || die "ubtrfs exited with status $? (stderr: $(tail -3 "$WORK/ubtrfs.stderr"))"
        DAEMON_PID=""
    fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

declare -A T=() EXTENTS=() LOAD=()
run_fs() { # fs round
    local fs=$1 r=$2 m t0 ino
    m=$(mnt "$fs")
    mkdir -p "$m"
    rm -f "$(img "$fs")"
    truncate -s "${IMG_GIB}G" "$(img "$fs")"
    mkfs.btrfs -q -f "$(img "$fs")" >/dev/null

    drop_caches
    do_mount "$fs"
    LOAD[$fs]+="${LOAD[$fs]:+ / }$(loadavg)"
    log "round $r: $fs: sequential write ${SEQ_MIB} MiB"
    t0=$(now)
    fio --name=seq --filename="$m/seq" --rw=write --bs=1M --size="${SEQ_MIB}M" --ioengine=psync \
        --fallocate=none --end_fsync=1 --output="$WORK/$fs-seq.json" --output-format=json >/dev/null
    T[$fs,seq]+="$(elapsed "$t0") "
    ino=$(stat -c %i "$m/seq")
    do_umount "$fs"
    EXTENTS[$fs]+="$(btrfs inspect-internal dump-tree -t fs "$(img "$fs")" \
        | grep -c "key ($ino EXTENT_DATA " || true) "

    drop_caches
    do_mount "$fs"
    log "round $r: $fs: $RAND_OPS random 4 KiB overwrites"
    t0=$(now)
    fio --name=rand --filename="$m/seq" --rw=randwrite --bs=4k --size="${SEQ_MIB}M" \
        --number_ios="$RAND_OPS" --ioengine=psync --end_fsync=1 --randrepeat=1 \
        --output="$WORK/$fs-rand.json" --output-format=json >/dev/null
    T[$fs,rand]+="$(elapsed "$t0") "

    log "round $r: $fs: create $NFILES files"
    t0=$(now)
    python3 "$REPO/benches/create_files.py" "$m/tree" "$NFILES"
    sync -f "$m"
    T[$fs,create]+="$(elapsed "$t0") "

    log "round $r: $fs: unlink $NFILES files"
    t0=$(now)
    python3 - "$m/tree" "$NFILES" <<'EOF'
import os, sys
top, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    os.unlink(f"{top}/d{i % 100:02}/f{i}")
EOF
    sync -f "$m"
    T[$fs,unlink]+="$(elapsed "$t0") "
    [ -z "$(find "$m/tree" -type f -print -quit)" ] || die "$fs: files left after unlink"
    do_umount "$fs"

    if btrfs check --readonly "$(img "$fs")" >"$WORK/$fs.check" 2>&1; then
        T[$fs,check]+="${T[$fs,check]:+, }ok"
    else
        T[$fs,check]+="${T[$fs,check]:+, }FAILED ($(grep -m1 -i error "$WORK/$fs.check" || tail -1 "$WORK/$fs.check"))"
    fi
}

log "building ubtrfs (release)"
cargo build --release -p ubtrfs >&2
LOAD0=$(loadavg)
for (( r = 1; r <= ROUNDS; r++ )); do
    if (( r % 2 )); then run_fs kernel "$r"; run_fs ubtrfs "$r"; else run_fs ubtrfs "$r"; run_fs kernel "$r"; fi
done
LOAD1=$(loadavg)

# --- report -----------------------------------------------------------------------------------
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "-" }'; }
ratio() { awk -v k="$1" -v u="$2" 'BEGIN { if (u > 0) printf "%.2f", k / u; else print "-" }'; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
row() { # label key amount unit
    local k u
    k=$(median <<<"${T[kernel,$2]}")
    u=$(median <<<"${T[ubtrfs,$2]}")
    printf '| %s | %s (%s %s) | %s (%s %s) | %s | %s | %s |\n' "$1" "$k" "$(rate "$3" "$k")" "$4" \
        "$u" "$(rate "$3" "$u")" "$4" "$(ratio "$k" "$u")" "${T[kernel,$2]% }" "${T[ubtrfs,$2]% }"
}
# Average extent size at the median extent count of the rounds.
avg_extent() { awk -v m="$SEQ_MIB" -v n="$(median <<<"$1")" 'BEGIN { if (n > 0) printf "%.1f MiB", m / n; else print "-" }'; }
{
    echo "# Write benchmark: ubtrfs vs kernel btrfs"
    echo
    echo "\`benches/write-bench.sh\`, $(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r)," \
         "$(nproc) CPUs, commit $(git -C "$REPO" rev-parse --short HEAD). Two mkfs.btrfs images of" \
         "${IMG_GIB} GiB; the kernel's on a loop device, ubtrfs's through FUSE (release build)."
    echo "Load average (1, 5, 15 min): start $LOAD0; kernel rounds ${LOAD[kernel]};" \
         "ubtrfs rounds ${LOAD[ubtrfs]}; end $LOAD1 (2 cores, shared with builds)."
    echo
    echo "Median of $ROUNDS rounds: seconds (wall clock, final fsync or sync included) and rate;" \
         "ratio = ubtrfs's rate / the kernel's (above 1: ubtrfs is faster)."
    echo
    echo "| operation | kernel s (rate) | ubtrfs s (rate) | ubtrfs / kernel | kernel s, each round | ubtrfs s, each round |"
    echo "|---|---:|---:|---:|---:|---:|"
    row "sequential write ${SEQ_MIB} MiB, 1 MiB writes + fsync" seq "$SEQ_MIB" MiB/s
    row "$RAND_OPS random 4 KiB buffered overwrites + fsync" rand "$RAND_OPS" IOPS
    row "create $NFILES files of 1 KiB (100 dirs) + sync" create "$NFILES" files/s
    row "unlink them + sync" unlink "$NFILES" files/s
    echo
    echo "Extents of the sequentially written file (EXTENT_DATA items after unmount, each round):" \
         "kernel ${EXTENTS[kernel]% } (median's average size $(avg_extent "${EXTENTS[kernel]}"))," \
         "ubtrfs ${EXTENTS[ubtrfs]% } (median's average size $(avg_extent "${EXTENTS[ubtrfs]}"))."
    echo
    echo "\`btrfs check --readonly\` after each round: kernel ${T[kernel,check]}; ubtrfs ${T[ubtrfs,check]}."
} >"$OUT"
cat "$OUT"
