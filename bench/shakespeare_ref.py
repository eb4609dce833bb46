"""PyTorch reference for configs/shakespeare-char.toml (nanoGPT's Shakespeare-char, CPU).

Two modes:

* parity (default): start from our initial weights (`--init DIR/model.safetensors`, a checkpoint
  written by a run with lr 0 for one step) and draw exactly our training batches (xoshiro256**
  seeded as `initial_data_rng(seed)` in crates/transformer/src/train/trainer.rs, windows as
  `random_windows` in crates/transformer/src/data/text.rs); print per-step losses, and compare
  them with our `metrics.jsonl` (`--ours DIR/metrics.jsonl`, a run with train.log_every=1).
* own (`--own`): PyTorch's own init (nanoGPT's: normal 0.02, residual projections
  0.02/sqrt(2 n_layers)) and torch.randint batches, then the full validation-split loss as
  crates/transformer/src/train/eval.rs defines it.

The model is written out (nanoGPT-style math, f32): pre-norm blocks, learned positions, exact
GELU, no biases, output tied to the token embedding.

Dimension letters: B batch, T time, C channels (d_model), V vocab, nh heads, hs head size.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

M64 = (1 << 64) - 1


# ---------------------------------------------------------------- our RNG (crates/.../rng.rs)
class Rng:
    """xoshiro256** seeded through SplitMix64, as crate::rng::Rng."""

    def __init__(self, seed):
        sm = seed & M64
        s = []
        for _ in range(4):
            sm = (sm + 0x9E3779B97F4A7C15) & M64
            z = sm
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            s.append(z ^ (z >> 31))
        self.s = s

    @staticmethod
    def _rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & M64

    def next_u64(self):
        s = self.s
        result = (self._rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self._rotl(s[3], 45)
        return result

    def below(self, n):
        return (self.next_u64() * n) >> 64


def our_batch(tokens, rng, batch_size, block_size):
    """random_windows: B starts uniform in [0, len - block_size); x (B, T), y (B, T)."""
    n_starts = len(tokens) - block_size
    starts = [rng.below(n_starts) for _ in range(batch_size)]
    x = torch.stack([tokens[s : s + block_size] for s in starts])
    y = torch.stack([tokens[s + 1 : s + 1 + block_size] for s in starts])
    return x, y


# ---------------------------------------------------------------- the model
class GPT(torch.nn.Module):
    def __init__(self, V, T, C, nh, n_layers, d_ff, eps=1e-5):
        super().__init__()
        self.T, self.C, self.nh, self.eps = T, C, nh, eps
        P = torch.nn.Parameter
        self.wte = P(torch.empty(V, C))  # (V, C), also the output projection
        self.wpe = P(torch.empty(T, C))  # (T, C)
        self.ln1 = torch.nn.ParameterList([P(torch.ones(C)) for _ in range(n_layers)])
        self.ln2 = torch.nn.ParameterList([P(torch.ones(C)) for _ in range(n_layers)])
        self.attn = torch.nn.ParameterList([P(torch.empty(3 * C, C)) for _ in range(n_layers)])
        self.proj = torch.nn.ParameterList([P(torch.empty(C, C)) for _ in range(n_layers)])
        self.fc = torch.nn.ParameterList([P(torch.empty(d_ff, C)) for _ in range(n_layers)])
        self.fc2 = torch.nn.ParameterList([P(torch.empty(C, d_ff)) for _ in range(n_layers)])
        self.lnf = P(torch.ones(C))
        self.n_layers = n_layers

    def init_nanogpt(self, gen):
        std_res = 0.02 / math.sqrt(2 * self.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() < 2:
                    p.fill_(1.0)
                elif name.startswith("proj") or name.startswith("fc2"):
                    p.normal_(0.0, std_res, generator=gen)
                else:
                    p.normal_(0.0, 0.02, generator=gen)

    def load_ours(self, path):
        from safetensors.torch import load_file

        d = load_file(path)
        m = {"tok_embed.weight": self.wte, "pos_embed.weight": self.wpe, "norm.weight": self.lnf}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            m[p + "norm1.weight"] = self.ln1[i]
            m[p + "norm2.weight"] = self.ln2[i]
            m[p + "self_attn.in_proj.weight"] = self.attn[i]  # rows: Q, K, V
            m[p + "self_attn.out_proj.weight"] = self.proj[i]
            m[p + "ff.linear1.weight"] = self.fc[i]
            m[p + "ff.linear2.weight"] = self.fc2[i]
        assert set(d) == set(m), (set(d) ^ set(m))
        with torch.no_grad():
            for k, p in m.items():
                assert d[k].shape == p.shape, k
                p.copy_(d[k].float())

    def forward(self, idx, targets):
        B, T = idx.shape
        C, nh = self.C, self.nh
        hs = C // nh
        x = self.wte[idx] + self.wpe[:T]  # (B, T, C)
        for i in range(self.n_layers):
            h = F.layer_norm(x, (C,), self.ln1[i], None, self.eps)
            q, k, v = (h @ self.attn[i].t()).split(C, dim=2)  # (B, T, C) each
            q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, nh, hs).transpose(1, 2)
            v = v.view(B, T, nh, hs).transpose(1, 2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
            x = x + y @ self.proj[i].t()
            h = F.layer_norm(x, (C,), self.ln2[i], None, self.eps)
            x = x + F.gelu(h @ self.fc[i].t()) @ self.fc2[i].t()
        x = F.layer_norm(x, (C,), self.lnf, None, self.eps)
        logits = x @ self.wte.t()  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def get_lr(it, lr=1e-3, warmup=100, decay=2000, min_lr=1e-4):
    """nanoGPT's get_lr (it = 0-based index of the step about to be taken)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def full_val_loss(model, val, T, batch_size=64):
    """eval.rs: non-overlapping windows of T inputs over val (the last one shorter), mean CE
    over every predicted token (len(val) - 1 of them)."""
    n_inputs = len(val) - 1
    total, count = 0.0, 0
    starts = list(range(0, n_inputs, T))
    full = [s for s in starts if s + T <= n_inputs]
    rest = [s for s in starts if s + T > n_inputs]
    for i in range(0, len(full), batch_size):
        ch = full[i : i + batch_size]
        x = torch.stack([val[s : s + T] for s in ch])
        y = torch.stack([val[s + 1 : s + 1 + T] for s in ch])
        _, loss = model(x, y)
        total += loss.item() * x.numel()
        count += x.numel()
    for s in rest:
        x = val[s:n_inputs].unsqueeze(0)
        y = val[s + 1 : n_inputs + 1].unsqueeze(0)
        _, loss = model(x, y)
        total += loss.item() * x.numel()
        count += x.numel()
    assert count == n_inputs
    return total / count


def estimate_spread(model, val, T, B, reps, iters=20):
    """nanoGPT's val estimate (mean loss of `iters` random batches), drawn `reps` times."""
    g = torch.Generator().manual_seed(0)
    ests = []
    with torch.no_grad():
        for _ in range(reps):
            tot = 0.0
            for _ in range(iters):
                ix = torch.randint(len(val) - T, (B,), generator=g)
                x = torch.stack([val[i:i + T] for i in ix])
                y = torch.stack([val[i + 1:i + T + 1] for i in ix])
                tot += model(x, y)[1].item()
            ests.append(tot / iters)
    return ests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/tinyshakespeare/input.txt")
    ap.add_argument("--init", help="our model.safetensors to start from (parity mode)")
    ap.add_argument("--ours", help="our metrics.jsonl (log_every=1) to compare with")
    ap.add_argument("--own", action="store_true", help="torch init and torch batches")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--eval-only", help="our model.safetensors: print its full val-split loss")
    ap.add_argument("--estimate-reps", type=int, default=0,
                    help="with --eval-only: also draw nanoGPT's 20-batch val estimate this many "
                         "times and print its spread")
    ap.add_argument("--print-first-batch", action="store_true")
    ap.add_argument("--out", help="write per-step losses (and val loss) as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(len(data) * 0.9)
    train, val = data[:n], data[n:]
    V, T, C, nh, L, B = len(chars), 64, 128, 4, 4, 12

    model = GPT(V, T, C, nh, L, 4 * C)
    if args.eval_only:
        model.load_ours(args.eval_only)
        print(f"full val-split loss of {args.eval_only}: {full_val_loss(model, val, T):.6f}")
        if args.estimate_reps:
            ests = estimate_spread(model, val, T, B, args.estimate_reps)
            print(f"20-batch estimate over {len(ests)} draws: mean {statistics.mean(ests):.4f} "
                  f"sd {statistics.stdev(ests):.4f} min {min(ests):.4f} max {max(ests):.4f}")
        return
    if args.own:
        torch.manual_seed(args.seed)
        model.init_nanogpt(torch.Generator().manual_seed(args.seed))
    else:
        model.load_ours(args.init)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    rng = Rng(args.seed ^ 0x5EEDDA7A)
    gen = torch.Generator().manual_seed(args.seed)

    # Our "log" records: step -> mean training loss over the steps since the previous record
    # (one step each with train.log_every=1).
    ours, prev = {}, 0
    if args.ours:
        for line in open(args.ours):
            r = json.loads(line)
            if r["event"] == "log":
                ours[r["step"]] = (prev, r["train_loss"])
                prev = r["step"]

    losses = []
    t0 = time.time()
    for it in range(args.steps):
        lr = get_lr(it, args.lr, 100, 2000, args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        if args.own:
            ix = torch.randint(len(train) - T, (B,), generator=gen)
            x = torch.stack([train[i : i + T] for i in ix])
            y = torch.stack([train[i + 1 : i + 1 + T] for i in ix])
        else:
            x, y = our_batch(train, rng, B, T)
        if it == 0 and args.print_first_batch:
            print("first batch x[0][:16]:", x[0, :16].tolist())
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not args.no_clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        else:
            norm = float("nan")
        opt.step()
        losses.append(loss.item())
        step = it + 1
        if step in ours:
            since, theirs = ours[step]
            mine = sum(losses[since:step]) / (step - since)
            print(f"step {step:5d} lr {lr:.3e} torch {mine:.6f} ours {theirs:.6f} "
                  f"diff {mine - theirs:+.2e} gnorm {norm:.4f}", flush=True)
        elif step <= 10 or step % 50 == 0:
            print(f"step {step:5d} lr {lr:.3e} torch {loss.item():.6f} gnorm {norm:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    result = {"seed": args.seed, "own": args.own, "losses": losses}
    if args.steps > 0:
        result["val_loss"] = full_val_loss(model, val, T)
        print(f"full val-split loss: {result['val_loss']:.4f}")
    if args.out:
        json.dump(result, open(args.out, "w"))


if __name__ == "__main__":
    main()
