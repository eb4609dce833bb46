#!/usr/bin/env bash
# Pretrained LLMs from GGUF, side by side with llama.cpp (issue 12): prompt processing (a
# 512-token prompt) and generation (128 new tokens, batch 1, greedy, EOS ignored) in tokens/s,
# and peak RSS, for SmolLM2-135M-Instruct (Q4_1) and Gemma 3 270M (Q4_K_M). Ours keeps the
# file's quantized weights (`--dtype stored`); llama.cpp is llama-cpp-python built from source
# on this machine (scripts/py-env-llm.sh); transformers (its GGUF loader, float32) is a second
# row. Same thread count for all, runs alternating, medians over the repetitions.
#
# Usage: bench/llm.sh [REPS]     (default 3)      THREADS=N (default 2)
# Prints a markdown table (with the CPU) to stdout; the raw JSON lines go to
# runs/bench-llm/<date>.jsonl. Run it on a quiet machine.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
reps="${1:-3}"
threads="${THREADS:-2}"
new_tokens=128
prompt_tokens=512
out_dir="${root}/runs/bench-llm"
mkdir -p "${out_dir}"
raw="${out_dir}/$(date -u +%Y%m%dT%H%M%SZ).jsonl"

echo "bench: building the CLI in release" >&2
cargo build --release -p transformer-cli --manifest-path "${root}/Cargo.toml" >&2
ours="${root}/target/release/transformer"
smollm2="$(bash "${root}/scripts/fetch-smollm2.sh" | tail -n 1)"
gemma3="$(bash "${root}/scripts/fetch-gemma3.sh" | tail -n 1)"
py="$(bash "${root}/scripts/py-env-llm.sh" | tail -n 1)"

# A text of exactly 512 tokens for each model (its own tokenizer; ours agrees with it).
make_prompt() {
    "${py}" - "$1" "${prompt_tokens}" "$2" <<'PY'
import sys, llama_cpp
path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = " ".join(
    f"In chapter {i}, the travellers reached the {['northern', 'eastern', 'southern', 'western'][i % 4]} "
    f"gate of the old city and counted {i * 7 % 13 + 2} towers along its wall."
    for i in range(1, 200)
)
llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:n]
# Trimmed at a token boundary; the detokenized text re-encodes to the same ids.
open(out, "w", encoding="utf-8").write(llm.detokenize(ids).decode("utf-8"))
PY
}

run_ours() { # model prompt-file
    local err rss
    err="$(mktemp)"
    /usr/bin/time -f "%M" -o "${err}.rss" env RAYON_NUM_THREADS="${threads}" "${ours}" \
        --threads "${threads}" generate --model "$1" --prompt "$(cat "$2")" \
        --max-new-tokens "${new_tokens}" --ignore-eos --temperature 0 >/dev/null 2>"${err}"
    rss="$(tail -n 1 "${err}.rss")"
    python3 - "${err}" "${rss}" <<'PY'
import json, re, sys
line = open(sys.argv[1]).read().strip().splitlines()[-1]
m = re.search(r"prompt: (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\); generation: (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s", line)
print(json.dumps({"impl": "ours", "prompt_tokens": int(m[1]), "prompt_tps": float(m[3]),
                  "gen_tps": float(m[5]), "peak_rss_kb": int(sys.argv[2])}))
PY
    rm -f "${err}" "${err}.rss"
}

for model in smollm2 gemma3; do
    path="${!model}"
    prompt="${out_dir}/prompt-${model}.txt"
    make_prompt "${path}" "${prompt}"
    for rep in $(seq "${reps}"); do
        for impl in ours llama-cpp transformers; do
            echo "bench: ${model} rep ${rep} ${impl}" >&2
            if [[ "${impl}" == ours ]]; then
                line="$(run_ours "${path}" "${prompt}")"
            else
                line="$("${py}" "${root}/bench/llm_ref.py" "${impl}" "${path}" "${prompt}" \
                    "${new_tokens}" "${threads}" 2>/dev/null | tail -n 1)"
            fi
            python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["model"]=sys.argv[2]; d["rep"]=int(sys.argv[3]); print(json.dumps(d))' \
                "${line}" "${model}" "${rep}" >>"${raw}"
        done
    done
done

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
python3 - "${raw}" "${cpu}" "${threads}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu, threads = sys.argv[2], sys.argv[3]
med = lambda xs: statistics.median(xs)
print(f"CPU: {cpu}, {threads} threads; medians of {max(r['rep'] for r in rows)} alternating runs; "
      "prompt 512 tokens, 128 new tokens (greedy, batch 1).\n")
print("| model | implementation | prompt tokens/s | generation tokens/s | peak RSS (MB) |")
print("|---|---|---:|---:|---:|")
for model in ["smollm2", "gemma3"]:
    by = {}
    for impl in ["ours", "llama-cpp", "transformers"]:
        rs = [r for r in rows if r["model"] == model and r["impl"] == impl]
        if not rs:
            continue
        by[impl] = (med([r["prompt_tps"] for r in rs]), med([r["gen_tps"] for r in rs]),
                    med([r["peak_rss_kb"] for r in rs]) / 1024,
                    med([r.get("interpreter_rss_kb", 0) for r in rs]) / 1024)
        pp, tg, rss, base = by[impl]
        note = f" ({base:.0f} before loading)" if base else ""
        print(f"| {model} | {impl} | {pp:.1f} | {tg:.1f} | {rss:.0f}{note} |")
    if "ours" in by and "llama-cpp" in by:
        o, l = by["ours"], by["llama-cpp"]
        print(f"| {model} | **ours / llama.cpp** | **{o[0]/l[0]:.2f}×** | **{o[1]/l[1]:.2f}×** | "
              f"**{o[2]/l[2]:.2f}×** |")
PY
echo "bench: raw results in ${raw}" >&2
