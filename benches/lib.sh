# Shared by the benchmark scripts (sourced, not run): messages, and the pieces of their cleanup
# traps, so that every script leaves no mount, daemon or loop device behind, also when it fails
# or is interrupted. Each script sets BENCH_NAME, WORK and LOOPDEV and defines `cleanup`, which
# calls these and ends with `bench_finish "$rc"`.

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$BENCH_NAME" "$*" >&2; exit 1; }

# Unmount DIR if something is mounted there: a kernel mount or a FUSE one, lazily as a last
# resort (a daemon that no longer answers).
bench_unmount() { # dir
    if findmnt -rn "$1" >/dev/null 2>&1; then
        umount "$1" 2>/dev/null || fusermount3 -u "$1" 2>/dev/null || umount -l "$1"
    fi
}

# Give a FUSE daemon TRIES tenths of a second to exit after its unmount (it commits and closes
# the image), then kill it.
bench_stop_daemon() { # pid tries
    if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
        for _ in $(seq "$2"); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
        # Gone already is fine (a failing kill would end the cleanup trap under `set -e`).
        kill -9 "$1" 2>/dev/null || true
    fi
}

# The end of every cleanup: detach the loop device, remove WORK (unless BENCH_KEEP), exit RC.
bench_finish() { # rc
    [ -n "$LOOPDEV" ] && losetup -d "$LOOPDEV" 2>/dev/null
    if [ -z "${BENCH_KEEP:-}" ]; then
        rm -rf --one-file-system "$WORK"
    else
        log "kept $WORK"
    fi
    exit "$1"
}

# Run `cleanup` on exit, and exit with the shell's conventional status on INT and TERM.
bench_traps() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
