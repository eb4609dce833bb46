"""PyTorch reference for configs/fashion-mnist-pixels.toml: the same decoder-only model and
recipe on Fashion-MNIST as pixel-token sequences, then the test split's negative
log-likelihood in bits per pixel.

Tokens (crates/transformer/src/data/pixel_tokens.rs): each image averaged over pool x pool
blocks (rounded), every pixel v as grey level floor(v * levels / 256) in raster order, after a
class token levels + label. The model reads the class token and every pixel but the last and
predicts every pixel; the loss is the mean cross-entropy over the pixels.

Model: bench/shakespeare_ref.py's GPT (our decoder_only family with the shakespeare_char
preset's choices: pre-norm, learned positions, exact GELU, no biases, output tied to the
token embedding, GPT-2 init), with PyTorch's fused causal scaled_dot_product_attention.

Recipe (the config's [train], [optimizer], [schedule]): AdamW (0.9, 0.95 by default, eps 1e-8)
with weight decay on the parameters of rank >= 2 only, linear warmup then cosine to min_lr,
gradient clipping, the last n_val training images held out; epochs are reshuffled
permutations. It stops at --max-steps or after --minutes of training, whichever comes first.

Usage: python bench/pixels_reference.py --data data/fashion-mnist [--threads 2] [--minutes M]
       [--max-steps N] ...   prints one JSON line.

Dimension letters: B batch, N pixels per image, V vocabulary.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shakespeare_ref import GPT, get_lr  # noqa: E402
from vit_reference import EpochOrder, read_idx  # noqa: E402


class PixelGPT(GPT):
    def forward(self, idx):  # (B, N) -> logits (B, N, V)
        B, T = idx.shape
        C, nh = self.C, self.nh
        hs = C // nh
        x = self.wte[idx] + self.wpe[:T]
        for i in range(self.n_layers):
            h = F.layer_norm(x, (C,), self.ln1[i], None, self.eps)
            q, k, v = (h @ self.attn[i].t()).split(C, dim=2)
            q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + y.transpose(1, 2).reshape(B, T, C) @ self.proj[i].t()
            h = F.layer_norm(x, (C,), self.ln2[i], None, self.eps)
            x = x + F.gelu(h @ self.fc[i].t()) @ self.fc2[i].t()
        x = F.layer_norm(x, (C,), self.lnf, None, self.eps)
        return x @ self.wte.t()


def tokens(images, labels, levels, pool):
    """(M, 28, 28) bytes, (M,) labels -> (M, 1 + side^2) int64 sequences."""
    x = images.astype(np.int64)
    if pool > 1:
        m, h, w = x.shape
        s = x.reshape(m, h // pool, pool, w // pool, pool).sum(axis=(2, 4))
        n = pool * pool
        x = (s + n // 2) // n
    q = (x * levels // 256).reshape(len(x), -1)
    cls = (levels + labels.astype(np.int64))[:, None]
    return torch.from_numpy(np.concatenate([cls, q], axis=1))


@torch.no_grad()
def nats_per_pixel(model, seqs, batch):
    total = 0.0
    for i in range(0, len(seqs), batch):
        s = seqs[i : i + batch]
        logits = model(s[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), s[:, 1:].reshape(-1)).item() * len(s)
    return total / len(seqs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=1e9)
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--pool", type=int, default=1)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--ff", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--min-lr", type=float, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--eval-batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def load(split):
        x = read_idx(os.path.join(args.data, f"{split}-images-idx3-ubyte"))
        y = read_idx(os.path.join(args.data, f"{split}-labels-idx1-ubyte"))
        return tokens(x, y, args.levels, args.pool)

    train = load("train")
    test = load("t10k")
    n_train = len(train) - args.n_val
    val, train = train[n_train:], train[:n_train]
    n_pix = train.shape[1] - 1
    model = PixelGPT(args.levels + 10, n_pix, args.width, args.heads, args.layers, args.ff)
    model.init_nanogpt(gen)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, args.beta2),
        eps=1e-8,
    )
    budget = args.minutes * 60
    order = EpochOrder(n_train, args.batch, gen)
    step, images, train_time, losses = 0, 0, 0.0, []
    while step < args.max_steps and train_time < budget:
        t0 = time.perf_counter()
        s = train[order.next()]
        for grp in opt.param_groups:
            grp["lr"] = get_lr(step, args.lr, args.warmup, args.max_steps, args.min_lr)
        logits = model(s[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), s[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        train_time += time.perf_counter() - t0
        step += 1
        images += len(s)
        losses.append(loss.item())
        if step % 50 == 0:
            print(
                f"step {step} loss {sum(losses[-50:]) / 50:.4f} "
                f"{images / train_time:.1f} img/s {train_time:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    val_nats = nats_per_pixel(model, val, args.eval_batch)
    test_nats = nats_per_pixel(model, test, args.eval_batch)
    print(
        json.dumps(
            {
                "steps": step,
                "images": images,
                "train_seconds": train_time,
                "images_per_sec": images / max(train_time, 1e-9),
                "pixels_per_sec": images * n_pix / max(train_time, 1e-9),
                "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                "val_bits_per_pixel": val_nats / math.log(2),
                "test_bits_per_pixel": test_nats / math.log(2),
                "threads": args.threads,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
