#!/usr/bin/env python3
"""sentence-transformers reference for bench/embed.sh (issue 6): texts/s of
SentenceTransformer.encode on PyTorch's CPU backend, f32, `torch.set_num_threads(2)`.

It reads the first N lines of a text file (one text per line, as `transformer embed` does),
loads the model directory, warms up on one batch, then times one `encode` of all N texts at
the given batch size (sentence-transformers sorts them by length and pads per batch, as ours
does). Model loading and the `import torch` are not timed; the Rust side's figure includes its
whole process (start, model load, tokenization, JSON output), so the comparison is
conservative for ours.

Prints one JSON line: {"impl", "texts", "batch_size", "threads", "seconds", "texts_per_s",
"versions"}.

Usage: .venv/bin/python bench/embed_ref.py --model DIR --input FILE [--lines 1000]
       [--batch-size 32] [--threads 2]
"""

import argparse
import json
import os
import time

# Keep Hugging Face libraries off the network: the model is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    with open(args.input, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for _, line in zip(range(args.lines), f)]
    model = SentenceTransformer(args.model, device="cpu")
    model.eval()
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    emb = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    seconds = time.perf_counter() - start
    assert emb.shape[0] == len(texts)
    print(
        json.dumps(
            {
                "impl": "sentence-transformers",
                "texts": len(texts),
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "seconds": seconds,
                "texts_per_s": len(texts) / seconds,
                "versions": {
                    "sentence_transformers": sentence_transformers.__version__,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
