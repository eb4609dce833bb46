#!/usr/bin/env bash
# Issue 16: the same training run under both reverse-mode engines (train.engine = candle, then
# tape), and the largest difference between their logged losses. Not a speed benchmark (one
# run each, not alternated): it checks that the tape trains as candle's backward does.
#
# Usage, from the repo root, after `cargo build --release -p transformer-cli`:
#   bench/engines.sh [CONFIG] [STEPS] [DATA_PATH]
# defaults: configs/shakespeare-char.toml, 500, ../shared/data/tinyshakespeare/input.txt
set -euo pipefail
config="${1:-configs/shakespeare-char.toml}"
steps="${2:-500}"
data="${3:-../shared/data/tinyshakespeare/input.txt}"
bin="${TRANSFORMER_BIN:-target/release/transformer}"
out="$(mktemp -d /tmp/engines.XXXXXX)"
trap 'rm -rf "${out}"' EXIT
for engine in candle tape; do
    start=$(date +%s.%N)
    "${bin}" train --config "${config}" --out "${out}/${engine}" \
        --set "data.path=${data}" --set "train.max_steps=${steps}" \
        --set "train.engine=${engine}" >"${out}/${engine}.log" 2>&1 \
        || { cat "${out}/${engine}.log" >&2; exit 1; }
    echo "${engine}: $(awk -v a="${start}" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s (whole process)"
done
python3 - "${out}" <<'PY'
import json, sys
runs = {e: [json.loads(l) for l in open(f"{sys.argv[1]}/{e}/metrics.jsonl")] for e in ("candle", "tape")}
a, b = runs["candle"], runs["tape"]
assert [r["step"] for r in a] == [r["step"] for r in b], "different records"
train = max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b))
val = [abs(x["val_loss"] - y["val_loss"]) for x, y in zip(a, b) if x.get("val_loss") is not None]
print(f"{len(a)} records; largest difference: train loss {train:.3g}, val loss {max(val):.3g}")
print(f"last: candle train {a[-1]['train_loss']:.6f} val {a[-1].get('val_loss')}, tape train {b[-1]['train_loss']:.6f} val {b[-1].get('val_loss')}")
PY
