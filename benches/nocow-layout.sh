#!/usr/bin/env bash
# The file extent items that fio's O_DIRECT|O_DSYNC job of fio-bench.sh leaves in a
# preallocated NODATACOW file, on ubtrfs and on the kernel's btrfs, side by side: the writes go
# in place into the one preallocated extent on both, splitting its item into REG and PREALLOC
# pieces (btrfs_mark_extent_written). Prints the item counts, the number of distinct extents,
# and the items that differ (generations left out).
#
# Usage (as root): benches/nocow-layout.sh [WORKDIR]
#   BENCH_OPS=N       writes (default 2000)
#   BENCH_FILE_MIB=N  size of the preallocated file (default 64)
#   UBTRFS_BIN=PATH   the ubtrfs binary (default target/release/ubtrfs, built if missing)
# Not run in CI.
set -euo pipefail

cd "$(dirname "$0")/.."
OPS=${BENCH_OPS:-2000}
FILE_MIB=${BENCH_FILE_MIB:-64}
BIN=${UBTRFS_BIN:-$(pwd)/target/release/ubtrfs}
W=${1:-/tmp/ubtrfs-nocow-layout.$$}
[ -x "$BIN" ] || cargo build --release -p ubtrfs
mkdir -p "$W"
LOOPDEV=""
DAEMON=""
cleanup() {
    for m in "$W/mnt-kernel" "$W/mnt-ubtrfs"; do
        grep -q " $m " /proc/mounts && umount "$m"
    done
    [ -n "$LOOPDEV" ] && losetup -d "$LOOPDEV"
    [ -n "$DAEMON" ] && wait "$DAEMON" || true
}
trap cleanup EXIT

# A mkfs.btrfs image with nocow/pre: NODATACOW (inherited from the directory), preallocated.
prepare() { # image
    rm -f "$1"
    truncate -s 2G "$1"
    mkfs.btrfs -q -f "$1" >/dev/null
    mkdir -p "$W/mnt-kernel"
    LOOPDEV=$(losetup --find --show "$1")
    mount -t btrfs "$LOOPDEV" "$W/mnt-kernel"
    mkdir "$W/mnt-kernel/nocow"
    chattr +C "$W/mnt-kernel/nocow"
    fallocate -l "${FILE_MIB}M" "$W/mnt-kernel/nocow/pre"
}

run_fio() { # file
    fio --name=dsync --filename="$1" --rw=randwrite --bs=4k --size="${FILE_MIB}M" --direct=1 \
        --sync=dsync --number_ios="$OPS" --ioengine=psync --numjobs=1 --randrepeat=1 \
        --fallocate=none --output-format=terse >/dev/null
}

# "key type disk_bytenr offset nr" of the file's EXTENT_DATA items.
items() { # image
    btrfs inspect-internal dump-tree -t 5 "$1" | awk '
        /item [0-9]+ key \(258 EXTENT_DATA/ { off = $6; sub(/\)/, "", off); getline; t = $4
            getline; d = $5; getline; print off, t, d, $4, $6 }'
}

prepare "$W/kernel.img"
run_fio "$W/mnt-kernel/nocow/pre"
umount "$W/mnt-kernel"
losetup -d "$LOOPDEV"
LOOPDEV=""

prepare "$W/ubtrfs.img"
umount "$W/mnt-kernel"
losetup -d "$LOOPDEV"
LOOPDEV=""
mkdir -p "$W/mnt-ubtrfs"
"$BIN" mount -f "$W/ubtrfs.img" "$W/mnt-ubtrfs" 2>>"$W/ubtrfs.stderr" &
DAEMON=$!
for _ in $(seq 100); do grep -q " $W/mnt-ubtrfs " /proc/mounts && break; sleep 0.1; done
run_fio "$W/mnt-ubtrfs/nocow/pre"
umount "$W/mnt-ubtrfs"
wait "$DAEMON"
DAEMON=""

for fs in kernel ubtrfs; do
    items "$W/$fs.img" >"$W/$fs.items"
    printf '%-7s REG %5d  PREALLOC %5d  distinct extents %d\n' "$fs" \
        "$(awk '$2 == 1' "$W/$fs.items" | wc -l)" "$(awk '$2 == 2' "$W/$fs.items" | wc -l)" \
        "$(awk '{print $3}' "$W/$fs.items" | sort -u | wc -l)"
done
echo "items that differ (< kernel, > ubtrfs):"
diff "$W/kernel.items" "$W/ubtrfs.items" || true
btrfs check --readonly "$W/ubtrfs.img" >/dev/null 2>&1 && echo "btrfs check: ubtrfs image clean"
