#!/usr/bin/env bash
# The floor under an fsync on an image file (issue 8): what the image's backing store charges
# for the I/O sequence a crash-safe btrfs log commit needs, against the sequence fuse2fs issues,
# measured with plain syscalls on one file of WORKDIR's filesystem (no FUSE, no filesystem code).
#
# A btrfs log sync must order two things (btrfs_sync_log, write_all_supers): the file data and
# the log tree blocks are durable BEFORE the superblock that points at the log root is written,
# and then that superblock is durable. On an image file both barriers are a flush of the file
# (fdatasync), so its floor is: write data + log blocks, flush, write the superblock, flush.
# fuse2fs writes no journal: its fsync writes the dirty blocks in place and calls fsync(2) on
# the image, twice as it runs here (the second has nothing left to write: a bare flush), with no
# order between the blocks of one fsync.
#
# Rows (each timed from the first write to the last flush; p50 / p99 / mean in µs; the rows
# take turns, one run each, so that a noisy moment of a shared machine falls on all alike):
#   bare flush                  fdatasync with nothing dirty
#   4 KiB + flush               one 4 KiB pwrite + fdatasync (allocated region)
#   fuse2fs                     3 x 4 KiB pwrite (a data block, the group descriptor block, an
#                               inode table block) + fsync + fsync, as strace shows fuse2fs 1.47
#                               doing for a 4 KiB overwrite + fsync
#   fuse2fs, one fsync          the same writes + one fsync
#   btrfs log commit            4 KiB data + two 16 KiB log blocks written twice (DUP metadata,
#                               one pwritev per copy) + flush + 4 KiB primary superblock + flush,
#                               with fdatasync ("fdatasync") or fsync(2) ("fsync") as the flush,
#                               into allocated regions ("allocated") or into holes of the sparse
#                               image, new ones each time ("holes": a COW filesystem on a fresh
#                               sparse image writes its data and log blocks to places the image
#                               file never had, and the host must allocate them at the flush;
#                               "data in a hole": only the data block; "fallocated": the data
#                               block into space preallocated with fallocate(2) but never
#                               written, which the host must still convert at the flush)
#
# Usage: benches/fsync-floor.sh [WORKDIR]
#   WORKDIR        where the scratch file goes (default /tmp/ubtrfs-fsync-floor.PID; needs
#                  about 600 MiB of real space, 2 GiB apparent). Put it on the filesystem that
#                  holds the images you compare with.
#   BENCH_N=N      iterations per row (default 2000)
#   BENCH_KEEP=1   keep WORKDIR
# Not run in CI: timings depend on the machine. Prints a Markdown table and the load average.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
N=${BENCH_N:-2000}
WORK=${1:-/tmp/ubtrfs-fsync-floor.$$}
LOOPDEV=""

BENCH_NAME=fsync-floor
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

command -v python3 >/dev/null 2>&1 || die "missing tool: python3"
cleanup() {
    local rc=$?
    set +e
    bench_finish "$rc"
}
bench_traps
mkdir -p "$WORK"

log "floor on $(findmnt -rn -o SOURCE,FSTYPE,OPTIONS --target "$WORK" | cut -c1-120)"
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK/floor.img" "$N" <<'PY'
import os, random, sys, time

path, n = sys.argv[1], int(sys.argv[2])
KIB, MIB = 1024, 1024 * 1024
NODE = 16 * KIB
ALLOC = 256 * MIB      # written at the start: the "allocated" region
SIZE = 2048 * MIB      # apparent size; everything past ALLOC is a hole until written

fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, SIZE)
chunk = os.urandom(MIB)
for off in range(0, ALLOC, MIB):
    os.pwrite(fd, chunk, off)
os.fsync(fd)

# Preallocated but never written (fallocate(2): unwritten extents on ext4 and XFS), for the
# "fallocated" row.
FALLOC = SIZE - 256 * MIB
os.posix_fallocate(fd, FALLOC, 256 * MIB)
os.fsync(fd)
falloc_next = [FALLOC]

rng = random.Random(1)
data4k = os.urandom(4 * KIB)
node = os.urandom(NODE)
sb = os.urandom(4 * KIB)
hole_next = [ALLOC + 64 * MIB]


def take(cursor, end, nbytes, what):
    """The next `nbytes` of a never-written region: cursor = [next offset], region ends at end."""
    off = cursor[0]
    cursor[0] += nbytes
    if cursor[0] > end:
        raise SystemExit(f"fsync-floor: ran out of {what}; lower BENCH_N")
    return off


def fresh(nbytes):
    """The next never-written range of the image (a hole until now)."""
    return take(hole_next, FALLOC, nbytes, "holes")


def fallocated(nbytes):
    """The next preallocated, never-written range."""
    return take(falloc_next, SIZE, nbytes, "preallocated space")


def alloc_data():
    return rng.randrange(0, 96 * MIB // (4 * KIB)) * 4 * KIB


log_ring = [0]


def alloc_log():
    # Two adjacent tree blocks in [96 MiB, 160 MiB), their DUP copy 64 MiB further on.
    off = 96 * MIB + (log_ring[0] % 2048) * 2 * NODE
    log_ring[0] += 1
    return off, off + 64 * MIB


def bare():
    os.fdatasync(fd)


def one_4k():
    os.pwrite(fd, data4k, alloc_data())
    os.fdatasync(fd)


def fuse2fs(flushes):
    def run():
        os.pwrite(fd, data4k, alloc_data())
        os.pwrite(fd, data4k, 4 * KIB)             # group descriptors
        os.pwrite(fd, data4k, 4 * MIB + 128 * KIB)  # inode table block
        for _ in range(flushes):
            os.fsync(fd)
    return run


def btrfs(flush, holes):
    def run():
        if holes == "data":
            d = fresh(4 * KIB)
            a, b = alloc_log()
        elif holes == "falloc":
            d = fallocated(4 * KIB)
            a, b = alloc_log()
        elif holes:
            d = fresh(4 * KIB)
            a = fresh(2 * NODE)
            b = fresh(2 * NODE)
        else:
            d = alloc_data()
            a, b = alloc_log()
        os.pwrite(fd, data4k, d)
        os.pwritev(fd, [node, node], a)
        os.pwritev(fd, [node, node], b)
        flush(fd)
        os.pwrite(fd, sb, 64 * KIB)
        flush(fd)
    return run


rows = [
    ("bare flush (fdatasync, nothing dirty)", "-", bare),
    ("4 KiB pwrite + fdatasync", "1 / 1", one_4k),
    ("fuse2fs: 3 x 4 KiB + fsync + fsync (as run)", "3 / 2", fuse2fs(2)),
    ("fuse2fs: 3 x 4 KiB + one fsync", "3 / 1", fuse2fs(1)),
    ("btrfs log commit, fdatasync, allocated", "4 / 2", btrfs(os.fdatasync, False)),
    ("btrfs log commit, fsync(2), allocated", "4 / 2", btrfs(os.fsync, False)),
    ("btrfs log commit, fdatasync, holes", "4 / 2", btrfs(os.fdatasync, True)),
    ("btrfs log commit, fsync(2), holes", "4 / 2", btrfs(os.fsync, True)),
    ("btrfs log commit, fdatasync, data in a hole, log blocks allocated", "4 / 2",
     btrfs(os.fdatasync, "data")),
    ("btrfs log commit, fdatasync, data into fallocated space, log blocks allocated", "4 / 2",
     btrfs(os.fdatasync, "falloc")),
]

# Round robin, one run of each row in turn, so that a noisy moment of the shared machine
# lands on every row alike.
for _, _, fn in rows:
    for _ in range(min(50, n)):  # warm up (and leave the first holes behind)
        fn()
lat = [[] for _ in rows]
for _ in range(n):
    for i, (_, _, fn) in enumerate(rows):
        t = time.perf_counter_ns()
        fn()
        lat[i].append(time.perf_counter_ns() - t)
print(f"| sequence ({n} runs each, interleaved) | writes / flushes | p50 µs | p99 µs | mean µs |")
print("|---|---:|---:|---:|---:|")
for (name, shape, _), l in zip(rows, lat):
    l.sort()
    p50 = l[len(l) // 2] / 1e3
    p99 = l[min(len(l) - 1, len(l) * 99 // 100)] / 1e3
    mean = sum(l) / len(l) / 1e3
    print(f"| {name} | {shape} | {p50:.0f} | {p99:.0f} | {mean:.0f} |")
os.close(fd)
PY
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
