#!/usr/bin/env python3
"""Tabulate bench/run.sh's JSON lines: medians over repetitions, ratios ours / PyTorch, MFU;
print the table and optionally replace the "## Performance (issue 5)" section of
BENCHMARKS.md (every other section is kept as it is).

Usage: python bench/summarize.py RESULTS.jsonl [--peak-gflops 230] [--probe-gflops X]
                                 [--command CMD] [--write BENCHMARKS.md]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

SECTION = "## Performance (issue 5)"

# (row label, metric field, our case, PyTorch case, ratio direction, target, target text)
# Ratio is ours / PyTorch for speeds (higher is better) and for memory (lower is better).
ROWS = [
    ("A train (tokens/s)", "tokens_per_s", "A", "A", 2.0, "≥ 2.0×"),
    ("B train (tokens/s)", "tokens_per_s", "B", "B", 1.3, "≥ 1.3×"),
    ("B peak memory (max RSS, MB)", "max_rss_mb", "B", "B", 0.5, "≤ 0.5×"),
    ("C train (target tokens/s)", "tokens_per_s", "C", "C", 1.5, "≥ 1.5×"),
    ("D generate, ours cached vs PyTorch no cache (tokens/s)", "tokens_per_s", "D", "D-nocache",
     10.0, "≥ 10×"),
    ("D generate, ours cached vs PyTorch KV cache (tokens/s)", "tokens_per_s", "D", "D", 2.0,
     "≥ 2×"),
    ("D-nocache generate, both without cache (tokens/s)", "tokens_per_s", "D-nocache",
     "D-nocache", None, "—"),
]


def load(path):
    runs = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            runs.setdefault((d["impl"], d["case"]), []).append(d)
    return runs


def ok(runs, impl, case):
    return [r for r in runs.get((impl, case), []) if not r.get("error")]


def med(rs, field):
    vals = [r[field] for r in rs if r.get(field) is not None]
    return statistics.median(vals) if vals else None


def fmt(x, digits=None):
    if x is None:
        return "—"
    if digits is None:
        digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:,.{digits}f}"


def cell(rs, field):
    """Median and, over several repetitions, the range: `1,234 (1,100–1,300)`."""
    m = med(rs, field)
    if m is None:
        return "failed" if rs is not None else "—"
    vals = [r[field] for r in rs]
    if len(vals) > 1:
        return f"{fmt(m)} ({fmt(min(vals))}–{fmt(max(vals))})"
    return fmt(m)


def mfu(rs, peak):
    """Model FLOPs per second over the peak, median over repetitions."""
    vals = []
    for r in rs:
        if r.get("flops_per_position") and r.get("positions_per_step"):
            flops_per_s = r["flops_per_position"] * r["positions_per_step"] * r["steps"] / r["seconds"]
            vals.append(flops_per_s / (peak * 1e9))
    return f"{100 * statistics.median(vals):.1f}%" if vals else "—"


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(l.split(":", 1) for l in out.splitlines() if ":" in l)
        name = fields.get("Model name", "").strip()
        cores = fields.get("CPU(s)", "").strip()
        flags = fields.get("Flags", "")
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
        return f"{name}, {cores} CPUs{', ' + simd if simd else ''}"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(runs, peak):
    lines = [
        "| case | ours | PyTorch | ratio (ours / PyTorch) | target | MFU ours | MFU PyTorch |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for label, field, our_case, torch_case, target, target_text in ROWS:
        ours, theirs = ok(runs, "ours", our_case), ok(runs, "pytorch", torch_case)
        if (("ours", our_case) not in runs) and (("pytorch", torch_case) not in runs):
            continue
        a, b = med(ours, field), med(theirs, field)
        ratio = a / b if a is not None and b else None
        met = ""
        if ratio is not None and target is not None:
            good = ratio <= target if field == "max_rss_mb" else ratio >= target
            met = " ✓" if good else " ✗"
        training = field == "tokens_per_s" and our_case in ("A", "B", "C")
        lines.append(
            f"| {label} | {cell(ours, field)} | {cell(theirs, field)} | "
            f"{fmt(ratio, 2) + '×' if ratio is not None else '—'}{met} | {target_text} | "
            f"{mfu(ours, peak) if training else '—'} | {mfu(theirs, peak) if training else '—'} |")
    return "\n".join(lines)


def checks(runs):
    """Parameter counts must agree (the same architecture on both sides); losses and noise."""
    notes = []
    for case in sorted({c for _, c in runs}):
        ours, theirs = ok(runs, "ours", case), ok(runs, "pytorch", case)
        failed = [i for (i, c), rs in runs.items() if c == case for r in rs if r.get("error")]
        if failed:
            notes.append(f"case {case}: {len(failed)} FAILED run(s) ({', '.join(sorted(set(failed)))})")
        if ours and theirs:
            n_ours, n_torch = ours[0]["n_params"], theirs[0]["n_params"]
            if n_ours != n_torch:
                notes.append(f"case {case}: PARAMETER COUNTS DIFFER: ours {n_ours:,}, PyTorch {n_torch:,}")
            else:
                notes.append(f"case {case}: {n_ours:,} parameters on both sides")
            lo, lt = med(ours, "final_loss"), med(theirs, "final_loss")
            if lo is not None and lt is not None:
                notes[-1] += f"; mean training loss of the timed steps: ours {lo:.3f}, PyTorch {lt:.3f}"
    busy = [r.get("cpu_busy_before") for rs in runs.values() for r in rs
            if r.get("cpu_busy_before") is not None]
    if busy:
        notes.append(f"CPU busy fraction in the 2 s before each run: median {statistics.median(busy):.2f}, "
                     f"max {max(busy):.2f} (0 = idle machine)")
    loads = [r["loadavg_after"][0] for rs in runs.values() for r in rs if r.get("loadavg_after")]
    if loads:
        notes.append(f"1-minute load average after each run: median {statistics.median(loads):.1f}, "
                     f"max {max(loads):.1f} (2 CPUs)")
    threads = sorted({(i, r.get("threads"), r.get("elementwise_threads"))
                      for (i, _), rs in runs.items() for r in rs if r.get("threads")})
    if threads:
        notes.append("threads: " + ", ".join(
            f"{i} {t}" + (f" (element-wise ops: {e})" if e else "") for i, t, e in threads))
    return notes


def load_notes(runs, quiet):
    """Warn when most runs started on busy CPUs, and give the ratios of the runs that did not:
    under contention PyTorch's OpenMP threads lose far more than ours, so loaded ratios flatter
    ours."""
    busy = [r["cpu_busy_before"] for rs in runs.values() for r in rs
            if r.get("cpu_busy_before") is not None]
    if not busy or statistics.median(busy) <= 0.5:
        return []
    notes = [f"**MEASURED UNDER LOAD**: the CPUs were busy before most runs (median "
             f"{statistics.median(busy):.2f}), so these figures are indicative only; rerun on an "
             "idle machine before quoting a ratio. Contention hurts the two sides unequally."]
    for label, field, our_case, torch_case, _, _ in ROWS:
        if field != "tokens_per_s":
            continue
        a = [r[field] for r in ok(runs, "ours", our_case) if r.get("cpu_busy_before", 1) <= quiet]
        b = [r[field] for r in ok(runs, "pytorch", torch_case)
             if r.get("cpu_busy_before", 1) <= quiet]
        if a and b:
            notes.append(f"runs that started on quiet CPUs (≤ {quiet:g} busy), {label}: ours "
                         f"{fmt(statistics.median(a))}, PyTorch {fmt(statistics.median(b))}, "
                         f"ratio {statistics.median(a) / statistics.median(b):.2f}×")
    return notes


def section(runs, args):
    torch_versions = sorted({r.get("torch") for rs in runs.values() for r in rs if r.get("torch")})
    reps = max((r.get("rep", 1) for rs in runs.values() for r in rs), default=1)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    steps = sorted({(c, r["warmup"], r["steps"]) for (i, c), rs in runs.items() for r in rs
                    if i == "ours" and "steps" in r})
    out = [
        SECTION,
        "",
        f"Measured {now} on {cpu_model()}; commit {args.commit or git_rev()}; PyTorch "
        f"{', '.join(torch_versions) or '?'} (eager, f32); {reps} repetition(s), alternating ours "
        "and PyTorch, each run a fresh process; medians, with the range over repetitions in "
        "parentheses.",
        "",
        "```",
        "bench/run.sh",
        f"# this run: {args.command}" if args.command else "",
        "```",
        "",
        table(runs, args.peak_gflops),
        "",
        f"- MFU = (6·N + 12·L·C·T) FLOPs per position × positions/s / {args.peak_gflops:g} GFLOP/s, "
        "the issue's measured f32 FMA peak on 2 threads (fixed, not re-measured"
        + (f"; PyTorch's sgemm reached {args.probe_gflops} GFLOP/s on 1024³ at the start of this "
           "run, which shows the load at that moment). " if args.probe_gflops else "). ")
        + "A/B: N without the position embedding, as nanoGPT's `estimate_mfu`. C: N all parameters, "
        "L = 3 + 2·3 attention blocks, T = 24, per padded target position (source and target are "
        "both padded to 24); its tokens/s counts non-padding target tokens only.",
        "- Ratios are ours / PyTorch: above 1 means we are faster, except for memory, where below "
        "1 means we use less. Targets are issue 5's.",
        "- Steps per run (warm-up + timed): "
        + ", ".join(f"{c} {w}+{s}" for c, w, s in steps)
        + " (D: generations of 500 tokens from a one-token prompt, temperature 1, random weights).",
    ]
    out += [f"- {n}" for n in checks(runs)]
    out += [f"- {n}" for n in load_notes(runs, args.quiet_busy)]
    out.append("- The machine is shared: other processes (compiles, training runs) can slow either "
               "side; run.sh waits for quiet CPUs before each run, and the busy fraction above says "
               "how well that worked.")
    return "\n".join(l for l in out if l is not None) + "\n"


def write_section(path, text):
    """Replace SECTION (up to the next heading of level 1 or 2) or append it."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        # The next heading outside code blocks (whose shell comments also start with "# ").
        end, fenced = len(lines), False
        for j in range(start + 1, len(lines)):
            if lines[j].startswith("```"):
                fenced = not fenced
            elif not fenced and (lines[j].startswith("## ") or lines[j].startswith("# ")):
                end = j
                break
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    tmp = path + ".tmp-write"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--peak-gflops", type=float, default=230.0)
    ap.add_argument("--probe-gflops")
    ap.add_argument("--command")
    ap.add_argument("--commit", help="what our binary was built from (default: HEAD now)")
    ap.add_argument("--quiet-busy", type=float, default=0.25,
                    help="a run 'started quiet' when at most this fraction of the CPUs was busy")
    ap.add_argument("--write", metavar="BENCHMARKS_MD")
    args = ap.parse_args()
    runs = load(args.results)
    if not runs:
        sys.exit(f"error: {args.results} holds no results")
    text = section(runs, args)
    print(text)
    if args.write:
        write_section(args.write, text)
        print(f"wrote the section {SECTION!r} of {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
