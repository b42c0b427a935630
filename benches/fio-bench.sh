#!/usr/bin/env bash
# End-to-end benchmark (issue 8): fsync and O_DSYNC latency with the extent-map shrinker idle
# and busy, plus sequential read/write, file creation and a cold metadata walk, on three
# filesystems in one run on one machine:
#   ubtrfs   this project (release build), FUSE, on a mkfs.btrfs image
#   kernel   the kernel's btrfs on a loop device over a same-sized mkfs.btrfs image
#   fuse2fs  ext4 in FUSE (e2fsprogs' fuse2fs), the nearest FUSE peer, same-sized image
#
# Workloads (fio, psync engine, one job):
#   fsync  4 KiB random overwrites of a laid-out file, fsync after every write, BENCH_OPS writes;
#          latency = fio's fsync latency percentiles, throughput = write+fsync pairs per second.
#   dsync  4 KiB O_DIRECT|O_DSYNC random writes into a preallocated NODATACOW file (the pattern
#          of databases and VM images), BENCH_OPS writes; latency = the whole write call.
# each once idle and once busy:
#   ubtrfs: `ubtrfs shrink MNT --loop` runs the extent-map shrinker continuously beside fio
#           (BENCH_BUSY_OPTS adds mount options to the busy mount too, e.g. em_max=64);
#   kernel, fuse2fs: a loop of `echo 2 > /proc/sys/vm/drop_caches` (drop_slab: runs every
#           shrinker, btrfs's extent-map shrinker included, and evicts unused inodes and
#           dentries), back to back like `--loop` by default, or every BENCH_DROP_SECS.
# and on ubtrfs once more under a budget: `-o em_max=BENCH_EM_MAX`, the shrinker runs inside
# the daemon whenever an insert exceeds it (as the kernel's runs from reclaim), without the
# CPU that the `--loop` client and its socket round trips take from fio on a small machine.
# The ubtrfs counters (`ubtrfs stats --json`) are read before and after every ubtrfs run; the
# report shows the shrinker's work during each run. Then the dsync workload runs once more on
# ubtrfs per `shrinker=` policy (kernel, fixed-split, fixed-shrinker, fixed-both) with the
# shrinker busy, and the report shows each policy's invariant-violation counters.
# Then: sequential write of BENCH_SEQ_MIB (1 MiB writes, fsync at the end), sequential read of
# that file cold (fresh mount, caches dropped), creation of BENCH_FILES files of 1 KiB in 100
# directories (+ sync -f), and a cold `find -printf` (readdir + stat of everything).
#
# The machine is shared (other builds come and go), so everything but the per-policy runs is
# done in BENCH_ROUNDS rounds; within a round the states alternate (idle, busy, budget) and the
# filesystems take turns in a rotating order, and the report shows the median of the rounds
# (the counters are summed over them). Every run gets a fresh mount with caches dropped.
#
# The NODATACOW files: the btrfs images are prepared by a kernel mount (a directory with +C and
# the preallocated files in it, fallocate), then unmounted, so that ubtrfs and the kernel start
# from identical extents.
# fuse2fs gets the same files preallocated with fallocate (ext4 has no COW to turn off).
#
# Usage (as root): benches/fio-bench.sh [WORKDIR]
#   WORKDIR            images and mount points (default /tmp/ubtrfs-fio.PID; about 8 GiB free)
#   BENCH_OPS=N        writes per fsync/dsync run (default 4000)
#   BENCH_IMG_GIB=N    size of each image (default 8; sparse)
#   BENCH_ROUNDS=N     rounds (default 3)
#   BENCH_FILE_MIB=N   size of the fsync test file and of each preallocated file (default 64)
#   BENCH_SEQ_MIB=N    sequential write/read size (default 1024)
#   BENCH_FILES=N      files created (default 20000)
#   BENCH_DROP_SECS=S  pause of the drop_caches loop (default 0: none)
#   BENCH_BUSY_OPTS=   extra ubtrfs mount options for the busy runs (default none)
#   BENCH_EM_MAX=N     em_max of the ubtrfs budget runs (default 64; 0: no budget runs)
#   BENCH_FS="ubtrfs kernel fuse2fs"  which filesystems to run
#   BENCH_OUT=DIR      where RESULTS-fio.md and fio-latency.svg go (default benches/)
#   BENCH_KEEP=1       keep WORKDIR at the end
# fio and fuse2fs are installed with apt-get when missing. Not run in CI: timings depend on the
# machine, and nothing here asserts a time.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OPS=${BENCH_OPS:-4000}
IMG_GIB=${BENCH_IMG_GIB:-8}
FILE_MIB=${BENCH_FILE_MIB:-64}
ROUNDS=${BENCH_ROUNDS:-3}
SEQ_MIB=${BENCH_SEQ_MIB:-1024}
NFILES=${BENCH_FILES:-20000}
DROP_SECS=${BENCH_DROP_SECS:-0}
BUSY_OPTS=${BENCH_BUSY_OPTS:-}
EM_MAX=${BENCH_EM_MAX:-64}
FSLIST=${BENCH_FS:-ubtrfs kernel fuse2fs}
OUT=${BENCH_OUT:-$REPO/benches}
POLICIES="kernel fixed-split fixed-shrinker fixed-both"
WORK=${1:-/tmp/ubtrfs-fio.$$}
RES="$WORK/results"
BIN="$REPO/target/release/ubtrfs"

BENCH_NAME=fio-bench
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (loop devices, kernel mounts, drop_caches)"
need_pkg() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2; } \
        || die "cannot install $2"
}
need_pkg fio fio
need_pkg fuse2fs fuse2fs
for c in mkfs.btrfs mkfs.ext4 btrfs losetup mount umount findmnt fusermount3 cargo python3 chattr fallocate find; do
    command -v "$c" >/dev/null 2>&1 || die "missing tool: $c"
done
[ -c /dev/fuse ] || die "/dev/fuse is missing"

# --- cleanup: every mount, loop device and background loop of this script ---------------------
declare -A DAEMON=()   # fs -> pid of its FUSE daemon (ubtrfs, fuse2fs), foreground mode
LOOPDEV=""
BUSY_PID=""
cleanup() {
    local rc=$? fs
    set +e
    stop_busy
    for fs in ubtrfs kernel fuse2fs; do
        bench_unmount "$WORK/mnt-$fs"
        bench_stop_daemon "${DAEMON[$fs]:-}" 100
    done
    if [ "$rc" -ne 0 ] && [ -d "$RES" ]; then
        # Keep what was measured: `fio-report.py DIR OUT.md OUT.svg` reports on it.
        rm -rf "$WORK.results" && mv "$RES" "$WORK.results" && log "results so far kept in $WORK.results"
    fi
    bench_finish "$rc"
}
bench_traps

mkdir -p "$RES"/{fio,stats} "$OUT"
META="$RES/meta.txt"
TIMES="$RES/times.txt"
: >"$META"
: >"$TIMES"
meta() { printf '%s\n' "$*" >>"$META"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# --- mounts -----------------------------------------------------------------------------------
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
img() { echo "$WORK/$1.img"; }
mnt() { echo "$WORK/mnt-$1"; }

wait_mounted() { # fs pid
    local m
    m=$(mnt "$1")
    for _ in $(seq 300); do
        findmnt -rn "$m" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$WORK/$1.stderr" >&2
    die "$1 did not mount $(img "$1")"
}

do_mount() { # fs [extra ubtrfs options]
    local fs=$1 opts=${2:-}
    case $fs in
    ubtrfs)
        "$BIN" mount -f ${opts:+-o "$opts"} "$(img ubtrfs)" "$(mnt ubtrfs)" 2>>"$WORK/ubtrfs.stderr" &
        DAEMON[ubtrfs]=$!
        wait_mounted ubtrfs "${DAEMON[ubtrfs]}"
        ;;
    kernel)
        LOOPDEV=$(losetup --find --show "$(img kernel)")
        mount -t btrfs "$LOOPDEV" "$(mnt kernel)"
        ;;
    fuse2fs)
        fuse2fs "$(img fuse2fs)" "$(mnt fuse2fs)" -f 2>>"$WORK/fuse2fs.stderr" &
        DAEMON[fuse2fs]=$!
        wait_mounted fuse2fs "${DAEMON[fuse2fs]}"
        ;;
    esac
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
    local fs=$1
    case $fs in
    kernel)
        umount_retry "$(mnt kernel)"
        losetup -d "$LOOPDEV"
        LOOPDEV=""
        ;;
    *)
        umount_retry "$(mnt "$fs")"
        # The daemon exits by itself once unmounted; the image is consistent only then.
        wait "${DAEMON[$fs]}" || die "$fs exited with status $? (stderr: $(tail -3 "$WORK/$fs.stderr"))"
        DAEMON[$fs]=""
        ;;
    esac
}

# --- busy: the shrinker runs hard -------------------------------------------------------------
start_busy() { # fs
    if [ "$1" = ubtrfs ]; then
        "$BIN" shrink "$(mnt ubtrfs)" --loop >"$WORK/shrink-loop.out" 2>&1 &
    else
        if [ "$DROP_SECS" = 0 ]; then
            while :; do echo 2 > /proc/sys/vm/drop_caches; done &
        else
            while :; do echo 2 > /proc/sys/vm/drop_caches; sleep "$DROP_SECS"; done &
        fi
    fi
    BUSY_PID=$!
}
stop_busy() {
    if [ -n "$BUSY_PID" ]; then
        kill "$BUSY_PID" 2>/dev/null
        wait "$BUSY_PID" 2>/dev/null || true
        BUSY_PID=""
    fi
    return 0
}

stats() { # name: ubtrfs counters into $RES/stats/NAME.json
    "$BIN" stats "$(mnt ubtrfs)" --json >"$RES/stats/$1.json"
}

# idle, busy, and for ubtrfs the em_max budget.
states() {
    if [ "$1" = ubtrfs ] && [ "$EM_MAX" -gt 0 ]; then echo "idle busy budget"; else echo "idle busy"; fi
}

# --- images -----------------------------------------------------------------------------------
# Preallocated files: one per state and round, and (ubtrfs) one per shrinker policy.
prealloc_names() {
    local s r
    for (( r = 1; r <= ROUNDS; r++ )); do
        for s in $(states "$1"); do printf 'pre-%s-r%s ' "$s" "$r"; done
    done
    if [ "$1" = ubtrfs ]; then
        for s in $POLICIES; do printf 'pre-%s ' "$s"; done
    fi
}

make_image() { # fs
    local fs=$1 f dev
    local m
    m=$(mnt "$fs")
    mkdir -p "$m"
    rm -f "$(img "$fs")"
    truncate -s "${IMG_GIB}G" "$(img "$fs")"
    if [ "$fs" = fuse2fs ]; then
        mkfs.ext4 -q -F "$(img "$fs")"
        do_mount fuse2fs
        mkdir "$m/nocow"
        for f in $(prealloc_names "$fs"); do fallocate -l "${FILE_MIB}M" "$m/nocow/$f"; done
        do_umount fuse2fs
    else
        mkfs.btrfs -q -f "$(img "$fs")" >/dev/null
        # A kernel mount sets NODATACOW on the directory (inherited by new files) and
        # preallocates the files, for ubtrfs's image as for the kernel's.
        dev=$(losetup --find --show "$(img "$fs")")
        LOOPDEV=$dev
        mount -t btrfs "$dev" "$m"
        mkdir "$m/nocow"
        chattr +C "$m/nocow"
        for f in $(prealloc_names "$fs"); do fallocate -l "${FILE_MIB}M" "$m/nocow/$f"; done
        lsattr "$m/nocow/pre-idle-r1" | grep -q C || die "pre-idle-r1 is not NODATACOW"
        umount_retry "$m"
        losetup -d "$dev"
        LOOPDEV=""
    fi
}

# --- fio --------------------------------------------------------------------------------------
# --fallocate=none: fio would otherwise preallocate every file it lays out; the files are
# written plainly, as an application does (the dsync files are preallocated on purpose, above).
FIO_COMMON=(--ioengine=psync --numjobs=1 --randrepeat=1 --fallocate=none --output-format=json)
fio_run() { # out-name fio-args...
    local out=$1
    shift
    fio "${FIO_COMMON[@]}" --output="$RES/fio/$out.json" "$@" >/dev/null 2>"$RES/fio/$out.err" \
        || die "fio $out failed: $(tail -3 "$RES/fio/$out.err")"
}
fio_fsync() { # fs name file
    fio_run "$2" --name=fsync --filename="$3" --rw=randwrite --bs=4k --size="${FILE_MIB}M" \
        --fsync=1 --number_ios="$OPS"
}
fio_dsync() { # fs name file
    fio_run "$2" --name=dsync --filename="$3" --rw=randwrite --bs=4k --size="${FILE_MIB}M" \
        --direct=1 --sync=dsync --number_ios="$OPS"
}

latency_runs() { # fs round
    local fs=$1 r=$2 state m
    m=$(mnt "$fs")
    for state in $(states "$fs"); do
        drop_caches
        if [ "$state" = budget ]; then
            do_mount ubtrfs "em_max=$EM_MAX"
        elif [ "$fs" = ubtrfs ] && [ "$state" = busy ] && [ -n "$BUSY_OPTS" ]; then
            do_mount ubtrfs "$BUSY_OPTS"
        else
            do_mount "$fs"
        fi
        # Lay the fsync file out before the shrinker starts (fio does it if missing).
        fio_run "$fs-layout-$state-r$r" --name=layout --filename="$m/rand-$state-r$r" --rw=write \
            --bs=1M --size="${FILE_MIB}M" --end_fsync=1
        [ "$state" = busy ] && start_busy "$fs"
        meta "load round $r $fs $state: $(loadavg)"
        for w in fsync dsync; do
            log "round $r: $fs: $w, $state"
            [ "$fs" = ubtrfs ] && stats "$fs-$w-$state-r$r.before"
            if [ $w = fsync ]; then
                fio_fsync "$fs" "$fs-$w-$state-r$r" "$m/rand-$state-r$r"
            else
                fio_dsync "$fs" "$fs-$w-$state-r$r" "$m/nocow/pre-$state-r$r"
            fi
            [ "$fs" = ubtrfs ] && stats "$fs-$w-$state-r$r.after"
        done
        stop_busy
        do_umount "$fs"
    done
}

policy_runs() {
    local p m
    m=$(mnt ubtrfs)
    for p in $POLICIES; do
        log "ubtrfs: dsync, busy, shrinker=$p"
        drop_caches
        do_mount ubtrfs "shrinker=$p${BUSY_OPTS:+,$BUSY_OPTS}"
        start_busy ubtrfs
        meta "load policy $p: $(loadavg)"
        stats "ubtrfs-policy-$p.before"
        fio_dsync ubtrfs "ubtrfs-policy-$p" "$m/nocow/pre-$p"
        stats "ubtrfs-policy-$p.after"
        stop_busy
        do_umount ubtrfs
    done
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

throughput_runs() { # fs round
    local fs=$1 r=$2 m t0 n
    m=$(mnt "$fs")
    drop_caches
    do_mount "$fs"
    meta "load round $r $fs seq: $(loadavg)"
    log "round $r: $fs: sequential write ${SEQ_MIB} MiB"
    fio_run "$fs-seqwrite-r$r" --name=seqwrite --filename="$m/seq" --rw=write --bs=1M \
        --size="${SEQ_MIB}M" --end_fsync=1
    do_umount "$fs"

    drop_caches
    do_mount "$fs"
    log "round $r: $fs: sequential read, cold"
    fio_run "$fs-seqread-r$r" --name=seqread --filename="$m/seq" --rw=read --bs=1M --size="${SEQ_MIB}M"

    log "round $r: $fs: create $NFILES files"
    t0=$(now)
    python3 "$REPO/benches/create_files.py" "$m/tree" "$NFILES"
    sync -f "$m/tree"
    echo "$fs create $(elapsed "$t0") $r" >>"$TIMES"
    do_umount "$fs"

    drop_caches
    do_mount "$fs"
    log "round $r: $fs: cold metadata walk"
    t0=$(now)
    n=$(find "$m/tree" -printf '%i %s %T@\n' | wc -l)
    echo "$fs walk $(elapsed "$t0") $r" >>"$TIMES"
    [ "$n" -eq $(( NFILES + 101 )) ] || die "$fs: find saw $n entries, expected $(( NFILES + 101 ))"
    # Room for the next round.
    rm -rf "$m/tree" "$m/seq"
    sync -f "$m"
    do_umount "$fs"
}

# --- run --------------------------------------------------------------------------------------
if [[ " $FSLIST " == *" ubtrfs "* ]]; then
    log "building ubtrfs (release)"
    cargo build --release -p ubtrfs >&2
fi
meta "date $(date -u '+%Y-%m-%d %H:%M UTC')"
meta "host $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
meta "commit $(git -C "$REPO" rev-parse --short HEAD)"
meta "fio $(fio --version), fuse2fs $(dpkg-query -W -f '${Version}' fuse2fs 2>/dev/null || echo '?')"
meta "params rounds=$ROUNDS ops=$OPS img_gib=$IMG_GIB file_mib=$FILE_MIB seq_mib=$SEQ_MIB files=$NFILES drop_secs=$DROP_SECS busy_opts=${BUSY_OPTS:-none} em_max=$EM_MAX"
meta "load start $(loadavg)"
for fs in $FSLIST; do
    log "$fs: image"
    make_image "$fs"
done
read -r -a FSARR <<<"$FSLIST"
for (( r = 1; r <= ROUNDS; r++ )); do
    # Rotate the order so that no filesystem always runs first (or last) in a round.
    for (( i = 0; i < ${#FSARR[@]}; i++ )); do
        fs=${FSARR[(i + r - 1) % ${#FSARR[@]}]}
        latency_runs "$fs" "$r"
        throughput_runs "$fs" "$r"
    done
done
if [[ " $FSLIST " == *" ubtrfs "* ]]; then
    policy_runs
fi
for fs in $FSLIST; do
    if [ "$fs" != fuse2fs ]; then
        log "$fs: btrfs check --readonly"
        if btrfs check --readonly "$(img "$fs")" >"$WORK/$fs.check" 2>&1; then
            meta "check $fs ok"
        else
            meta "check $fs FAILED: $(grep -m1 -i error "$WORK/$fs.check" || tail -1 "$WORK/$fs.check")"
            cp "$WORK/$fs.check" "$OUT/fio-bench-$fs.check.txt"
        fi
    fi
done
meta "load end $(loadavg)"
[ -s "$WORK/ubtrfs.stderr" ] && meta "ubtrfs stderr lines $(wc -l <"$WORK/ubtrfs.stderr")"

python3 "$REPO/benches/fio-report.py" "$RES" "$OUT/RESULTS-fio.md" "$OUT/fio-latency.svg"
cat "$OUT/RESULTS-fio.md"
