#!/usr/bin/env bash
# Issue 5's benchmark: our library (`transformer bench <case>`) against equivalent eager
# PyTorch programs (bench/reference.py) on identical configurations, alternating the two in one
# run, several repetitions, medians in one table, written to BENCHMARKS.md under
# "## Performance (issue 5)" (other sections of that file are kept).
#
# Usage, from anywhere:  bench/run.sh
#
# It builds the CLI in release, creates the git-ignored .venv with torch on first use
# (scripts/py-env.sh), then for every repetition and case runs both implementations, each in a
# fresh process (so that max RSS is the case's own), ours first in odd repetitions and PyTorch
# first in even ones. Before every run it waits (up to BENCH_QUIET_TIMEOUT seconds) until the
# CPUs are quiet: on 2 shared cores another process (a compile) slows both sides unevenly.
#
# Environment (defaults in brackets):
#   BENCH_REPS [3]                repetitions; the table shows medians over them
#   BENCH_CASES [A B C D D-nocache]   cases to run (D-nocache: generation without the cache)
#   BENCH_SKIP_B [0]              1 leaves out case B (T 256, batch 64: seconds per step)
#   BENCH_<CASE>_STEPS, BENCH_<CASE>_WARMUP   timed / warm-up steps per case, e.g.
#                                 BENCH_B_STEPS=3 BENCH_B_WARMUP=1 (defaults: A 40/5, B 3/1,
#                                 C 10/2, D and D-nocache 3/1 generations of 500 tokens)
#   BENCH_ENGINE [candle]         our training cases' reverse-mode engine: candle or tape
#                                 (train.engine; the command in the table shows it)
#   BENCH_PRECISION [f32]         the training cases' precision: f32 (both eager f32) or bf16
#                                 (ours `--precision bf16`, train.precision; PyTorch
#                                 `torch.autocast("cpu", dtype=torch.bfloat16)`)
#   BENCH_PEAK_GFLOPS [230]       peak for the MFU column (the issue's measured FMA peak)
#   BENCH_QUIET_TIMEOUT [60]      seconds to wait for quiet CPUs before a run (0: never wait)
#   BENCH_MAX_BUSY [0.25]         "quiet": at most this fraction of the CPUs busy over 2 s
#   BENCH_WRITE [1]               0: print the table only, leave BENCHMARKS.md alone
#   BENCH_THREADS [2]             threads of both sides: torch.set_num_threads, and
#                                 TRANSFORMER_THREADS for ours unless that is set (otherwise ours
#                                 sizes its pool to every CPU it sees, even under taskset)
#   PYTHON, PIP_INDEX_URL         passed to scripts/py-env.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

reps="${BENCH_REPS:-3}"
cases="${BENCH_CASES:-A B C D D-nocache}"
if [[ "${BENCH_SKIP_B:-0}" == 1 ]]; then
    cases="$(tr ' ' '\n' <<<"${cases}" | grep -vx B | tr '\n' ' ')"
fi
peak="${BENCH_PEAK_GFLOPS:-230}"
quiet_timeout="${BENCH_QUIET_TIMEOUT:-60}"
max_busy="${BENCH_MAX_BUSY:-0.25}"
out_dir="${root}/target/bench"
mkdir -p "${out_dir}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
results="${out_dir}/results-${stamp}.jsonl"
log="${out_dir}/run-${stamp}.log"

echo "bench: building the CLI in release" >&2
cargo build --release -p transformer-cli
# What the binary was built from (HEAD may move while the benchmark runs).
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    commit="${commit} with uncommitted changes"
fi
commit="${commit}, built $(date -u '+%H:%M UTC')"
# A private copy: others may rebuild target/release while the benchmark runs.
ours="${out_dir}/transformer-${stamp}"
cp "${root}/target/release/transformer" "${ours}"
export BENCH_THREADS="${BENCH_THREADS:-2}"
export TRANSFORMER_THREADS="${TRANSFORMER_THREADS:-${BENCH_THREADS}}"

echo "bench: preparing the Python environment" >&2
py="$("${root}/scripts/py-env.sh" | tail -n 1)"

# shellcheck source=bench/steps.sh
source "${root}/bench/steps.sh"

cpu_busy() { # fraction of both CPUs busy over the next 2 seconds
    local a b
    a=($(head -n 1 /proc/stat))
    sleep 2
    b=($(head -n 1 /proc/stat))
    awk -v a="${a[*]}" -v b="${b[*]}" 'BEGIN {
        n = split(a, x, " "); split(b, y, " "); total = 0
        for (i = 2; i <= n; i++) total += y[i] - x[i]
        idle = (y[5] - x[5]) + (y[6] - x[6])
        printf "%.3f", (total > 0) ? 1 - idle / total : 0 }'
}

wait_quiet() { # prints the busy fraction seen last
    local busy waited=0
    busy="$(cpu_busy)"
    while awk -v b="${busy}" -v m="${max_busy}" 'BEGIN { exit !(b > m) }' \
        && (( waited < quiet_timeout )); do
        if (( waited == 0 )); then
            echo "bench: CPUs ${busy} busy; waiting up to ${quiet_timeout} s for quiet" >&2
        fi
        sleep 8
        waited=$((waited + 10))
        busy="$(cpu_busy)"
    done
    echo "${busy}"
}

run_one() { # impl case rep
    local impl="$1" case="$2" rep="$3" busy line
    local -a cmd
    # shellcheck disable=SC2207
    local args=($(steps_args "${case}"))
    if [[ "${impl}" == ours ]]; then
        cmd=("${ours}" bench "${case}" "${args[@]}" --json --engine "${BENCH_ENGINE:-candle}"
            --precision "${BENCH_PRECISION:-f32}")
    else
        cmd=("${py}" bench/reference.py "${case}" "${args[@]}" --json
            --precision "${BENCH_PRECISION:-f32}")
    fi
    busy="$(wait_quiet)"
    echo "bench: rep ${rep}/${reps} case ${case} ${impl} (CPUs ${busy} busy before): ${cmd[*]}" >&2
    if line="$("${cmd[@]}" 2>>"${log}")"; then
        "${py}" -c 'import json, sys
d = json.loads(sys.argv[1])
d.update(rep=int(sys.argv[2]), cpu_busy_before=float(sys.argv[3]), loadavg_after=list(__import__("os").getloadavg()))
print(json.dumps(d))' "${line}" "${rep}" "${busy}" | tee -a "${results}"
    else
        echo "bench: FAILED (see ${log}): ${cmd[*]}" >&2
        printf '{"impl": "%s", "case": "%s", "rep": %d, "error": true}\n' \
            "${impl}" "${case}" "${rep}" >>"${results}"
    fi
}

# PyTorch's sgemm on 1024³ for context (the MFU uses the fixed peak above).
probe="$("${py}" - <<'EOF'
import os, time, torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
for _ in range(3):
    a @ b
n, t0 = 20, time.perf_counter()
for _ in range(n):
    a @ b
print(f"{2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9:.0f}")
EOF
)"
echo "bench: PyTorch sgemm 1024^3: ${probe} GFLOP/s" >&2

for rep in $(seq 1 "${reps}"); do
    for case in ${cases}; do
        if (( rep % 2 == 1 )); then
            run_one ours "${case}" "${rep}"
            run_one pytorch "${case}" "${rep}"
        else
            run_one pytorch "${case}" "${rep}"
            run_one ours "${case}" "${rep}"
        fi
    done
done

write_args=()
if [[ "${BENCH_WRITE:-1}" == 1 ]]; then
    write_args=(--write "${root}/BENCHMARKS.md")
fi
# The command as run, with the BENCH_* settings that were given.
env_desc="$(env | grep -E '^BENCH_[A-Z_]+=' | sort | sed -E 's/=(.*)/="\1"/' | tr '\n' ' ' || true)"
"${py}" bench/summarize.py "${results}" --peak-gflops "${peak}" --probe-gflops "${probe}" \
    --commit "${commit}" --command "${env_desc}bench/run.sh" "${write_args[@]}"
rm -f "${ours}"
echo "bench: raw results in ${results}, stderr of the runs in ${log}" >&2
