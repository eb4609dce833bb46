#!/usr/bin/env bash
# Our binary against an earlier build of it on bench/run.sh's cases: a refactor must stay within
# noise. The two binaries alternate in one run (the new one first in odd repetitions, the old
# one first in even ones), each run in a fresh process; the table gives medians and new / old.
#
# Usage:  bench/compare.sh OLD_BINARY NEW_BINARY
#   e.g. git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release -p
#        transformer-cli) and compare /tmp/old/target/release/transformer with ours.
#
# Environment (defaults in brackets):
#   BENCH_REPS [3]                    repetitions
#   BENCH_CASES [A B C D D-nocache]   cases
#   BENCH_<CASE>_STEPS, BENCH_<CASE>_WARMUP   as in bench/run.sh
#   BENCH_THREADS [2]                 TRANSFORMER_THREADS of both binaries
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 OLD_BINARY NEW_BINARY" >&2
    exit 2
fi
old="$1" new="$2"
for b in "${old}" "${new}"; do
    if [[ ! -x "${b}" ]]; then
        echo "compare: ${b} is not an executable" >&2
        exit 2
    fi
done
reps="${BENCH_REPS:-3}"
cases="${BENCH_CASES:-A B C D D-nocache}"
export TRANSFORMER_THREADS="${BENCH_THREADS:-2}"
results="$(mktemp)"
trap 'rm -f "${results}"' EXIT

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/steps.sh
source "${root}/bench/steps.sh"

for rep in $(seq 1 "${reps}"); do
    for case in ${cases}; do
        if (( rep % 2 == 1 )); then order="new old"; else order="old new"; fi
        for which in ${order}; do
            bin="${old}"
            [[ "${which}" == new ]] && bin="${new}"
            # shellcheck disable=SC2046
            line="$("${bin}" bench "${case}" $(steps_args "${case}") --json 2>/dev/null)"
            echo "compare: rep ${rep} ${case} ${which}: ${line}" >&2
            printf '%s\t%s\t%s\n' "${which}" "${case}" "${line}" >>"${results}"
        done
    done
done

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
python3 - "${results}" "${cpu}" "${reps}" <<'EOF'
import json, statistics, sys
path, cpu, reps = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {}
for row in open(path):
    which, case, line = row.rstrip("\n").split("\t", 2)
    runs.setdefault((case, which), []).append(json.loads(line))
print(f"CPU: {cpu}; {reps} repetitions, alternating; medians")
print()
print("| case | metric | old | new | new / old | peak RSS old / new (MB) |")
print("|---|---|---:|---:|---:|---:|")
for case in dict.fromkeys(c for c, _ in runs):
    o, n = runs[(case, "old")], runs[(case, "new")]
    metric = o[0]["metric"]
    mo = statistics.median(r["tokens_per_s"] for r in o)
    mn = statistics.median(r["tokens_per_s"] for r in n)
    ro = statistics.median(r["max_rss_mb"] for r in o)
    rn = statistics.median(r["max_rss_mb"] for r in n)
    print(f"| {case} | {metric} | {mo:,.0f} | {mn:,.0f} | {mn / mo:.3f} | {ro:,.0f} / {rn:,.0f} |")
EOF
