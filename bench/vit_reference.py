"""PyTorch reference for configs/fashion-mnist-vit.toml: the same Vision Transformer and recipe,
trained for the same wall time on the CPU, then scored on the Fashion-MNIST test split.

Model (crates/transformer/src/models/vit.rs): 28x28 grey images cut into 7x7 patches, each
flattened in (c, i, j) order and projected (the strided convolution as reshape + linear), a
learned class token first, learned positions, pre-norm encoder layers (LayerNorm eps 1e-6,
multi-head self-attention with biases, exact-GELU MLP), a final LayerNorm and a linear head on
the class token. Init as our GPT-2 scheme: weights N(0, 0.02), the residual projections (attention
output, second MLP layer) N(0, 0.02 / sqrt(2 n_layers)), biases 0, class token and positions
N(0, 0.02).

4 layers of width 192, 4 heads, MLP 384 (the defaults below are the config's).

Recipe (the config's [train], [optimizer], [schedule], [data]): batch 128, AdamW (0.9, 0.999,
eps 1e-8) with weight decay 0.05 on the parameters of rank >= 2 only, peak learning rate 5e-4,
linear warmup then cosine to min_lr over max_steps (crates/transformer/src/train/schedule.rs),
no label smoothing (--label-smoothing), gradient clipping at 1.0, the last 5,000 training images
held out, augmentation RandomCrop(28, padding=1) + RandomHorizontalFlip (--crop-padding 0
--hflip 0 for none), pixels (v / 255 - 0.2860) / 0.3530. Epochs are reshuffled permutations.

It stops at max_steps or after --minutes of training, whichever comes first (the schedule is
the config's, so a run stopped by the clock has not finished its decay), evaluates on the test
split and prints one JSON line: steps, images/s, validation and test accuracy.

Usage: python bench/vit_reference.py --data data/fashion-mnist [--minutes 30] [--threads 2]
       [--max-steps 9000] [--layers 4] ...

Dimension letters: B batch, T tokens (1 + N patches), E width, H heads, P patch size.
"""

import argparse
import gzip
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    """An IDX file of unsigned bytes (gzipped or raw) as a numpy array."""
    opener = gzip.open if open(path, "rb").read(2) == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


class EpochOrder:
    """Every training index once per epoch, a fresh permutation each epoch, `batch` at a time;
    a batch may straddle two epochs, as our EpochSampler's does."""

    def __init__(self, n, batch, gen):
        self.n, self.batch, self.gen = n, batch, gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def next(self):
        parts, have = [], 0
        while have < self.batch:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = min(self.batch - have, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            have += take
        return torch.cat(parts)


class Block(nn.Module):
    def __init__(self, e, heads, ff, eps):
        super().__init__()
        self.ln1 = nn.LayerNorm(e, eps=eps)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(e, eps=eps)
        self.fc1 = nn.Linear(e, ff)
        self.fc2 = nn.Linear(ff, e)

    def forward(self, x):  # (B, T, E)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self, args):
        super().__init__()
        e, p = args.width, args.patch
        self.p = p
        g = 28 // p
        self.patch = nn.Linear(p * p, e)
        self.cls = nn.Parameter(torch.randn(1, 1, e) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + g * g, e) * 0.02)
        self.blocks = nn.ModuleList(
            [Block(e, args.heads, args.ff, 1e-6) for _ in range(args.layers)]
        )
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self.head = nn.Linear(e, 10)
        resid_std = 0.02 / math.sqrt(2 * args.layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = resid_std if name.endswith("fc2") else 0.02
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
                nn.init.normal_(m.out_proj.weight, std=resid_std)
                nn.init.zeros_(m.out_proj.bias)

    def forward(self, x):  # (B, 1, 28, 28)
        b, p = x.shape[0], self.p
        g = 28 // p
        x = x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p)  # (B, N, P*P)
        x = self.patch(x)  # (B, N, E)
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1) + self.pos  # (B, T, E)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])  # (B, 10)


def lr_at(step, args):
    """Warmup then cosine, as LrSchedule::WarmupCosine."""
    if step < args.warmup:
        return args.lr * (step + 1) / (args.warmup + 1)
    if step > args.max_steps:
        return args.min_lr
    ratio = (step - args.warmup) / (args.max_steps - args.warmup)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def augment(x, gen, pad, hflip):
    """RandomCrop(28, padding=pad) with zero fill (pad 0: none), then RandomHorizontalFlip
    (when hflip), per image."""
    b = x.shape[0]
    padded = F.pad(x, (pad, pad, pad, pad))  # zero bytes: the padding is black
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    flips = torch.randint(0, 2, (b,), generator=gen)
    for k in range(b):
        dy, dx = offs[k].tolist()
        img = padded[k, :, dy : dy + 28, dx : dx + 28]
        out[k] = img.flip(-1) if hflip and flips[k] else img
    return out


def evaluate(model, images, labels, norm):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x = (images[i : i + 500].float() / 255 - norm[0]) / norm[1]
            correct += (model(x).argmax(1) == labels[i : i + 500]).sum().item()
    model.train()
    return correct / len(images)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--crop-padding", type=int, default=1)
    ap.add_argument("--hflip", type=int, choices=[0, 1], default=1)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=384)
    ap.add_argument("--patch", type=int, default=7)
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    norm = (0.2860, 0.3530)

    def load(split):
        x = read_idx(os.path.join(args.data, f"{split}-images-idx3-ubyte"))
        y = read_idx(os.path.join(args.data, f"{split}-labels-idx1-ubyte"))
        return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = load("train")
    test_x, test_y = load("t10k")
    n_train = len(train_x) - args.n_val
    val_x, val_y = train_x[n_train:], train_y[n_train:]
    train_x, train_y = train_x[:n_train], train_y[:n_train]

    model = ViT(args)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    budget = args.minutes * 60
    order = EpochOrder(n_train, args.batch, gen)
    step, images, train_time = 0, 0, 0.0
    losses = []
    while step < args.max_steps and train_time < budget:
        t0 = time.perf_counter()
        idx = order.next()
        x = train_x[idx]
        if args.crop_padding > 0 or args.hflip:
            x = augment(x, gen, args.crop_padding, args.hflip)
        x = (x.float() / 255 - norm[0]) / norm[1]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args)
        loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        train_time += time.perf_counter() - t0
        step += 1
        images += len(idx)
        losses.append(loss.item())
        if step % 50 == 0:
            print(
                f"step {step} loss {sum(losses[-50:]) / 50:.4f} "
                f"{images / train_time:.0f} img/s {train_time:.0f}s",
                flush=True,
            )
    print(
        json.dumps(
            {
                "steps": step,
                "images": images,
                "train_seconds": train_time,
                "images_per_sec": images / max(train_time, 1e-9),
                "epochs": images / n_train,
                "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                "val_accuracy": evaluate(model, val_x, val_y, norm),
                "test_accuracy": evaluate(model, test_x, test_y, norm),
                "threads": args.threads,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
