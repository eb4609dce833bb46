#!/usr/bin/env bash
# Issue 16: data-parallel scaling on MPI. The same Shakespeare run (global batch unchanged) as
# one process pinned to one core, then as `mpirun -np 2` with one core per rank, alternating,
# REPEATS times each; training throughput from the runs' own clocks (the time spent in
# training steps, evaluation excluded), the scaling efficiency (2-rank tokens/s over twice
# the 1-process tokens/s), the bytes each rank hands MPI per step, and the largest difference
# between the two runs' losses.
#
# Usage, from the repo root, after `cargo build --release -p transformer-cli --features mpi`:
#   bench/mpi.sh [STEPS] [BATCH] [REPEATS] [DATA_PATH]
# defaults: 300, 12 (the config's), 3, ../shared/data/tinyshakespeare/input.txt
set -euo pipefail
steps="${1:-300}"
batch="${2:-12}"
repeats="${3:-3}"
data="${4:-../shared/data/tinyshakespeare/input.txt}"
bin="$(realpath "${TRANSFORMER_BIN:-target/release/transformer}")"
out="$(mktemp -d /tmp/mpi-bench.XXXXXX)"
trap 'rm -rf "${out}"' EXIT
export RAYON_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args=(train --config configs/shakespeare-char.toml --set "data.path=${data}"
    --set "train.max_steps=${steps}" --set "train.batch_size=${batch}"
    --set "train.eval_every=${steps}")
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), ${steps} steps, global batch ${batch}, RAYON_NUM_THREADS=1"
for r in $(seq 1 "${repeats}"); do
    taskset -c 0 "${bin}" "${args[@]}" --out "${out}/one-${r}" >"${out}/one-${r}.log" 2>&1 \
        || { cat "${out}/one-${r}.log" >&2; exit 1; }
    mpirun -np 2 --bind-to core "${bin}" "${args[@]}" --out "${out}/two-${r}" \
        >"${out}/two-${r}.log" 2>&1 || { cat "${out}/two-${r}.log" >&2; exit 1; }
done
python3 - "${out}" "${repeats}" "${batch}" <<'PY'
import json, re, statistics, sys
out, repeats, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = 64
def run(name):
    recs = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    last = recs[-1]
    return recs, last["step"] * batch * block / last["elapsed_s"]
tps = {k: [] for k in ("one", "two")}
worst = 0.0
for r in range(1, repeats + 1):
    a, ta = run(f"one-{r}")
    b, tb = run(f"two-{r}")
    tps["one"].append(ta)
    tps["two"].append(tb)
    logs = [(x, y) for x, y in zip(a, b) if x["event"] == "log"]
    worst = max([worst] + [abs(x["train_loss"] - y["train_loss"]) for x, y in logs])
    print(f"run {r}: 1 process {ta:,.0f} tokens/s, 2 ranks {tb:,.0f} tokens/s")
one, two = statistics.median(tps["one"]), statistics.median(tps["two"])
line = open(f"{out}/two-1.log").read()
sent = re.search(r"(\d+) bytes summed per rank and step", line).group(1)
print(f"median: 1 process {one:,.0f} tokens/s, 2 ranks {two:,.0f} tokens/s: speed-up {two / one:.2f}x, scaling efficiency {two / (2 * one):.0%}")
print(f"bytes summed per rank and step: {int(sent):,}; largest train-loss difference 1 process vs 2 ranks: {worst:.2g}")
PY
