#!/usr/bin/env python3
"""Report of benches/fio-bench.sh: a Markdown table file and an SVG plot from its results
directory (fio JSON outputs, `ubtrfs stats --json` snapshots, times.txt, meta.txt).

Usage: fio-report.py RESULTS_DIR OUT.md OUT.svg
Standard library only; the SVG is written by hand so that no plotting package is needed.
"""

import glob
import json
import math
import os
import statistics
import sys

FS = ["ubtrfs", "kernel", "fuse2fs"]
STATES = ["idle", "busy", "budget"]
WORKLOADS = {
    "fsync": "4 KiB random overwrite + fsync",
    "dsync": "4 KiB O_DIRECT + O_DSYNC write, preallocated NODATACOW file",
}
PCTS = [("p50", "50.000000"), ("p99", "99.000000"), ("p99.9", "99.900000")]
POLICIES = ["kernel", "fixed-split", "fixed-shrinker", "fixed-both"]
INVARIANTS = [
    "stale_logging",
    "logging_map_stolen",
    "shrinker_met_logging",
    "removed_still_listed",
    "double_membership",
    "pinned_removed",
    "freed_while_in_use",
    "use_after_free",
]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Results:
    def __init__(self, d):
        self.d = d
        self.meta = []
        self.times = {}  # (fs, what) -> [seconds per round]
        mp = os.path.join(d, "meta.txt")
        if os.path.exists(mp):
            self.meta = [line.rstrip("\n") for line in open(mp)]
        tp = os.path.join(d, "times.txt")
        if os.path.exists(tp):
            for line in open(tp):
                fs, what, secs = line.split()[:3]
                self.times.setdefault((fs, what), []).append(float(secs))

    def fio(self, name):
        return load(os.path.join(self.d, "fio", name + ".json"))

    def stats(self, name):
        return load(os.path.join(self.d, "stats", name + ".json"))

    def rounds(self, name):
        """The names of the rounds of a run (NAME-r1, NAME-r2, ...), or [NAME] if unrounded."""
        found = sorted(
            os.path.basename(f)[: -len(".json")]
            for f in glob.glob(os.path.join(self.d, "fio", glob.escape(name) + "-r*.json"))
        )
        return found or [name]

    def latency(self, name, workload):
        """Median over the rounds of (percentiles in ms, ops/s), plus the per-round values."""
        runs = [v for v in (self.latency1(n, workload) for n in self.rounds(name)) if v]
        if not runs:
            return None
        med = {p: statistics.median(v[0][p] for v in runs) for p, _ in PCTS}
        return med, statistics.median(v[1] for v in runs), runs

    def latency1(self, name, workload):
        """(percentiles in ms {p50, p99, p99.9}, ops/s) of one fsync or dsync run, or None."""
        j = self.fio(name)
        if not j:
            return None
        job = j["jobs"][0]
        # fsync: the fsync calls' own latency; dsync: the whole write (it includes the sync).
        lat = job["sync"]["lat_ns"] if workload == "fsync" else job["write"]["clat_ns"]
        pct = lat.get("percentile", {})
        out = {}
        for label, key in PCTS:
            if key not in pct:
                return None
            out[label] = pct[key] / 1e6
        return out, job["write"]["iops"]

    def bw(self, name, rw):
        """Median over the rounds of the bandwidth in MiB/s."""
        v = [j["jobs"][0][rw]["bw_bytes"] / 1048576 for j in map(self.fio, self.rounds(name)) if j]
        return statistics.median(v) if v else None

    def time(self, fs, what):
        v = self.times.get((fs, what))
        return statistics.median(v) if v else None

    def delta(self, name):
        """after - before of the ubtrfs counters of a run, summed over its rounds."""
        names = self.rounds(name)
        total = None
        for n in names:
            d = self.delta1(n)
            if d is None:
                continue
            if total is None:
                total = d
            else:
                for k, v in d.items():
                    total[k] = v if k == "cached_after" else total.get(k, 0) + v
        return total

    def delta1(self, name):
        """after - before of the ubtrfs counters of one run, flattened, or None."""
        a, b = self.stats(name + ".after"), self.stats(name + ".before")
        if not a or not b:
            return None
        out = {}
        for group in ("shrinker", "fsync", "invariant_violations", "transactions"):
            for k, v in a.get(group, {}).items():
                bv = b.get(group, {}).get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(bv, (int, float)):
                    out[f"{group}.{k}"] = v - bv
        out["cached_after"] = a["extent_maps"]["cached"]
        return out


def f2(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def r2(x):
    return "-" if x is None else f"{x:.2f}"


def report(r, md_path, svg_path):
    L = []
    meta = {}
    for line in r.meta:
        k, _, v = line.partition(" ")
        meta.setdefault(k, []).append(v)
    one = lambda k: meta.get(k, ["?"])[0]
    params = dict(kv.split("=", 1) for kv in one("params").split()) if "params" in meta else {}
    L.append("# End-to-end benchmark: ubtrfs vs kernel btrfs vs fuse2fs")
    L.append("")
    L.append(
        f"`benches/fio-bench.sh`, {one('date')}, kernel {one('host')}, commit {one('commit')}, {one('fio')}."
    )
    L.append(
        "Same-sized images "
        f"({params.get('img_gib', '?')} GiB) in one run on one machine: ubtrfs (release build) and "
        "the kernel's btrfs (loop device) on mkfs.btrfs images, fuse2fs on an ext4 image. "
        f"{params.get('ops', '?')} writes per latency run, on a {params.get('file_mib', '?')} MiB file. "
        f"Median of {params.get('rounds', '1')} rounds (states alternating within a round, the "
        "filesystems taking turns), except the per-policy runs (one each)."
    )
    L.append("")
    L.append("Load average (1, 5, 15 min) at each phase (the machine has 2 cores, shared with builds):")
    L.append("")
    for v in meta.get("load", []):
        L.append(f"- {v}")
    L.append("")
    L.append(
        "Busy: ubtrfs runs `ubtrfs shrink MNT --loop` beside fio"
        + (f" (and mount options `{params.get('busy_opts')}`)" if params.get("busy_opts", "none") != "none" else "")
        + "; the kernel and fuse2fs run `echo 2 > /proc/sys/vm/drop_caches` "
        + ("back to back (every shrinker, btrfs's extent-map shrinker included). " if params.get("drop_secs") == "0"
           else f"every {params.get('drop_secs', '?')} s (every shrinker, btrfs's extent-map shrinker included). ")
        + f"Budget (ubtrfs only): mounted with `em_max={params.get('em_max', '?')}`, the shrinker runs inside the daemon "
        "whenever an insert leaves more maps than that, no `--loop` client. "
        "Latencies in ms; ratio = busy (or budget) / idle."
    )
    L.append("")

    lat = {}
    for w in WORKLOADS:
        L.append(f"## {WORKLOADS[w]}")
        L.append("")
        L.append(
            "| filesystem | state | p50 | p99 | p99.9 | ops/s | vs idle: p50 | p99 | p99.9 | ops/s "
            "| p99 of each round |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fs in FS:
            for s in STATES:
                v = r.latency(f"{fs}-{w}-{s}", w)
                if v is None:
                    continue
                lat[(fs, w, s)] = v
                row = [fs, s] + [f2(v[0][p]) for p, _ in PCTS] + [f"{v[1]:.0f}"]
                if s != "idle" and (fs, w, "idle") in lat:
                    i = lat[(fs, w, "idle")]
                    row += [r2(ratio(v[0][p], i[0][p])) for p, _ in PCTS] + [r2(ratio(v[1], i[1]))]
                else:
                    row += [""] * 4
                row.append(" / ".join(f2(x[0]["p99"]) for x in v[2]))
                L.append("| " + " | ".join(row) + " |")
        L.append("")

    # The shrinker's work during each ubtrfs run.
    rows = []
    for w in WORKLOADS:
        for s in STATES:
            d = r.delta(f"ubtrfs-{w}-{s}")
            if d:
                rows.append((f"{w}, {s}", d))
    for p in POLICIES:
        d = r.delta(f"ubtrfs-policy-{p}")
        if d:
            rows.append((f"dsync, busy, shrinker={p}", d))
    if rows:
        L.append("## ubtrfs counters during the runs (`ubtrfs stats --json`, after - before, summed over the rounds)")
        L.append("")
        L.append(
            "| run | shrinker runs | scanned | dropped | skipped pinned | skipped logging | "
            "inodes busy | NEEDS_FULL_SYNC set | fsync fast | fsync full | full commits | "
            "commits | maps cached after | invariant violations |"
        )
        L.append("|---|" + "---:|" * 13)
        for name, d in rows:
            g = lambda k: d.get(k)
            viol = sum(d.get(f"invariant_violations.{k}", 0) for k in INVARIANTS)
            cells = [
                g("shrinker.runs"),
                g("shrinker.scanned"),
                g("shrinker.dropped"),
                g("shrinker.skipped_pinned"),
                g("shrinker.skipped_logging"),
                g("shrinker.skipped_inode_busy"),
                g("shrinker.full_sync_set"),
                g("fsync.fast"),
                g("fsync.full"),
                g("fsync.full_commit"),
                g("transactions.committed"),
                d["cached_after"],
                viol,
            ]
            L.append(f"| {name} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
        L.append("")

    prow = []
    for p in POLICIES:
        v = r.latency(f"ubtrfs-policy-{p}", "dsync")
        d = r.delta(f"ubtrfs-policy-{p}")
        if v and d:
            prow.append((p, v, d))
    if prow:
        L.append("## O_DSYNC direct writes per `shrinker=` policy (ubtrfs, shrinker busy)")
        L.append("")
        L.append(
            "| policy | p50 | p99 | p99.9 | ops/s | shrinker dropped | "
            + " | ".join(INVARIANTS)
            + " |"
        )
        L.append("|---|" + "---:|" * (5 + len(INVARIANTS)))
        for p, v, d in prow:
            cells = [f2(v[0][q]) for q, _ in PCTS] + [f"{v[1]:.0f}", str(d.get("shrinker.dropped", "-"))]
            cells += [str(d.get(f"invariant_violations.{k}", "-")) for k in INVARIANTS]
            L.append(f"| {p} | " + " | ".join(cells) + " |")
        L.append("")

    # Throughput and metadata.
    thr = {}
    for fs in FS:
        thr[(fs, "seqwrite")] = r.bw(f"{fs}-seqwrite", "write")
        thr[(fs, "seqread")] = r.bw(f"{fs}-seqread", "read")
        c = r.time(fs, "create")
        thr[(fs, "create")] = None if c is None else nfiles(params) / c
        thr[(fs, "walk")] = r.time(fs, "walk")
    L.append("## Throughput and metadata")
    L.append("")
    L.append(
        "| operation | ubtrfs | kernel | fuse2fs | ubtrfs / kernel | ubtrfs / fuse2fs |"
    )
    L.append("|---|---:|---:|---:|---:|---:|")
    labels = [
        ("seqwrite", f"sequential write {params.get('seq_mib', '?')} MiB, 1 MiB writes + fsync (MiB/s)"),
        ("seqread", f"sequential read {params.get('seq_mib', '?')} MiB, cold (MiB/s)"),
        ("create", f"create {params.get('files', '?')} files of 1 KiB + sync (files/s)"),
        ("walk", f"cold `find -printf` over them (s, lower is better)"),
    ]
    for k, label in labels:
        u, kk, f = thr[("ubtrfs", k)], thr[("kernel", k)], thr[("fuse2fs", k)]
        L.append(f"| {label} | {f2(u)} | {f2(kk)} | {f2(f)} | {r2(ratio(u, kk))} | {r2(ratio(u, f))} |")
    L.append("")

    # Targets.
    L.append("## Targets (issue 8), this run")
    L.append("")

    def verdict(ok):
        return "?" if ok is None else ("met" if ok else "**not met**")

    for w in WORKLOADS:
        for s in ("busy", "budget"):
            i, b = lat.get(("ubtrfs", w, "idle")), lat.get(("ubtrfs", w, s))
            if not b:
                continue
            x = ratio(b[0]["p99"], i[0]["p99"]) if i else None
            L.append(
                f"- {w} p99 {s} <= 1.10x idle on ubtrfs: {r2(x)}x, "
                f"{verdict(None if x is None else x <= 1.10)}"
                + ("" if w == "fsync" else " (the target names fsync; dsync shown for completeness)")
            )
    for k, lim, label in [("seqread", 0.8, "sequential read"), ("seqwrite", 0.8, "sequential write"), ("create", 0.5, "file creation")]:
        x = ratio(thr[("ubtrfs", k)], thr[("kernel", k)])
        L.append(f"- {label} >= {lim}x kernel: {r2(x)}x, {verdict(None if x is None else x >= lim)}")
    behind = []
    compared = 0
    for w in WORKLOADS:
        for s in STATES:
            u, f = lat.get(("ubtrfs", w, s)), lat.get(("fuse2fs", w, s))
            if not u or not f:
                continue
            for p, _ in PCTS:
                compared += 1
                if u[0][p] > f[0][p]:
                    behind.append(f"{w} {s} {p} ({f2(u[0][p])} vs {f2(f[0][p])} ms)")
            compared += 1
            if u[1] < f[1]:
                behind.append(f"{w} {s} ops/s ({u[1]:.0f} vs {f[1]:.0f})")
    for k in ("seqwrite", "seqread", "create", "walk"):
        u, f = thr[("ubtrfs", k)], thr[("fuse2fs", k)]
        if u is None or f is None:
            continue
        compared += 1
        if (u > f) if k == "walk" else (u < f):
            behind.append(f"{k} ({f2(u)} vs {f2(f)})")
    if compared:
        L.append(
            f"- every figure ahead of fuse2fs: {verdict(not behind)}"
            + (f"; behind on {len(behind)} of {compared}: " + ", ".join(behind) if behind else f" ({compared} figures)")
        )
    L.append("")
    checks = meta.get("check", [])
    if checks:
        L.append("`btrfs check --readonly` after the run: " + "; ".join(checks) + ".")
        L.append("")
    L.append(f"Plot: `{os.path.basename(svg_path)}` (latency percentiles, idle vs busy).")
    L.append("")
    with open(md_path, "w") as f:
        f.write("\n".join(L))
    with open(svg_path, "w") as f:
        f.write(svg(lat))


def nfiles(params):
    try:
        return int(params.get("files", "0"))
    except ValueError:
        return 0


COLORS = {
    ("ubtrfs", "idle"): "#1f77b4",
    ("ubtrfs", "busy"): "#9ecae9",
    ("kernel", "idle"): "#d62728",
    ("kernel", "busy"): "#f4a3a3",
    ("fuse2fs", "idle"): "#2ca02c",
    ("fuse2fs", "busy"): "#a6dba0",
    ("ubtrfs", "budget"): "#6a51a3",
}


def svg(lat):
    """Two panels (fsync, dsync) of grouped bars on a log scale: percentiles x (fs, state)."""
    series = [(fs, s) for fs in FS for s in STATES if any((fs, w, s) in lat for w in WORKLOADS)]
    vals = [v[0][p] for v in lat.values() for p, _ in PCTS if v[0][p] > 0]
    if not vals:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n'
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals)))
    if hi <= lo:
        hi = lo * 10
    pw, ph, top, left, gap = 430, 300, 50, 60, 40
    width = left + 2 * pw + gap + 20
    height = top + ph + 110
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">'
        "Latency percentiles, idle vs shrinker busy (ms, log scale)</text>",
    ]

    def y(v):
        return top + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    for k, w in enumerate(WORKLOADS):
        x0 = left + k * (pw + gap)
        o.append(f'<text x="{x0 + pw / 2}" y="{top - 10}" text-anchor="middle">{esc(WORKLOADS[w])}</text>')
        o.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        d = lo
        while d <= hi * 1.0001:
            yy = y(d)
            o.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
            o.append(f'<text x="{x0 - 4}" y="{yy + 4:.1f}" text-anchor="end">{d:g}</text>')
            d *= 10
        gw = pw / len(PCTS)
        bw = (gw - 16) / max(1, len(series))
        for g, (p, _) in enumerate(PCTS):
            gx = x0 + g * gw + 8
            o.append(f'<text x="{x0 + g * gw + gw / 2}" y="{top + ph + 16}" text-anchor="middle">{p}</text>')
            for i, (fs, s) in enumerate(series):
                v = lat.get((fs, w, s))
                if not v or v[0][p] <= 0:
                    continue
                yy = y(v[0][p])
                o.append(
                    f'<rect x="{gx + i * bw:.1f}" y="{yy:.1f}" width="{bw - 1:.1f}" '
                    f'height="{top + ph - yy:.1f}" fill="{COLORS[(fs, s)]}">'
                    f"<title>{fs} {s} {p}: {v[0][p]:.3f} ms</title></rect>"
                )
    ly = top + ph + 40
    for i, (fs, s) in enumerate(series):
        lx = left + FS.index(fs) * 200
        yy = ly + STATES.index(s) * 20
        o.append(f'<rect x="{lx}" y="{yy - 10}" width="12" height="12" fill="{COLORS[(fs, s)]}"/>')
        o.append(f'<text x="{lx + 18}" y="{yy}">{fs}, {s}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: fio-report.py RESULTS_DIR OUT.md OUT.svg")
    report(Results(sys.argv[1]), sys.argv[2], sys.argv[3])
