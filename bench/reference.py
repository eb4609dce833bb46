#!/usr/bin/env python3
"""PyTorch reference programs for bench/run.sh (issue 5).

Each case is the same model, data shapes, loss, optimizer and clipping as `transformer bench
<case>` (crates/transformer-cli/src/bench.rs), in eager PyTorch, f32, on 2 threads, and prints
the same JSON line (`--json`). Nothing here is compiled or fused beyond what eager PyTorch
does by default: the GPT is nanoGPT's model.py (which calls F.scaled_dot_product_attention),
trained as nanoGPT's train.py trains it; the encoder-decoder is nn.Transformer.

  A  GPT 4 layers, 4 heads, 128 wide, T 64, batch 12, vocab 65, dropout 0: training tokens/s
  B  GPT 6 layers, 6 heads, 384 wide, T 256, batch 64, dropout 0.2: training tokens/s, max RSS
  C  nn.Transformer d_model 256, 8 heads, 3+3 layers, d_ff 512, shared vocab 8000, batch 128,
     lengths 12..24 padded to 24, key padding masks, causal mask, label smoothing 0.1:
     training target tokens/s
  D  generation with model A, batch 1, 500 new tokens, a simple KV cache: tokens/s
  D-nocache  the same without a cache: nanoGPT's sampling loop (crop to block_size, full
     forward for every token)

Dimension letters: B batch, T time (target), S source, C channels (d_model), nh heads,
hs head size, V vocab, L layers, N parameters.

Usage: .venv/bin/python bench/reference.py A [--steps N --warmup N --json --seed S]
"""

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CHAR_VOCAB = 65
GRAD_CLIP = 1.0
LR_LM = 1e-3  # nanoGPT's Shakespeare-char rate
LR_SEQ2SEQ = 5e-4
C_BATCH, C_MIN_LEN, C_MAX_LEN, C_VOCAB = 128, 12, 24, 8000
C_LABEL_SMOOTHING = 0.1
PAD, BOS, EOS, FIRST_TOKEN = 0, 1, 2, 3  # C's special ids; the loss ignores PAD
D_NEW_TOKENS, D_WARMUP_TOKENS = 500, 50
# (warm-up, timed) steps, as in bench.rs; for D a step is one generation of 500 tokens.
DEFAULT_STEPS = {"A": (5, 40), "B": (1, 3), "C": (2, 10), "D": (1, 3), "D-nocache": (1, 3)}


# ---------------------------------------------------------------------------------------
# nanoGPT's GPT (model.py), with an optional KV cache in the attention for case D
# ---------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = CHAR_VOCAB
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of the positions seen so far, (B, nh, T_past, hs) each."""

    def __init__(self):
        self.k = None
        self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)

    def clear(self):
        self.k = None
        self.v = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = len(cache)
            if past:
                k = torch.cat((cache.k, k), dim=2)  # (B, nh, T_past + T, hs)
                v = torch.cat((cache.v, v), dim=2)
            cache.k, cache.v = k, v
        # is_causal aligns the mask to the top left, right for a fresh window; a new token
        # after cached ones may see every cached key, so it needs no mask (the cache is only
        # ever extended one token at a time).
        assert past == 0 or T == 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def n_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, caches=None):
        b, t = idx.size()
        offset = 0 if caches is None else len(caches[0])
        assert offset + t <= self.cfg.block_size
        pos = torch.arange(offset, offset + t, dtype=torch.long)  # (t,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i])
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        # Inference: only the last position's logits, as nanoGPT.
        return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)


def nanogpt_optimizer(model, weight_decay, lr, betas):
    """nanoGPT's configure_optimizers on CPU: rank >= 2 decays, no fused kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def cfg_a():
    return GPTConfig()


def cfg_b():
    return GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)


# ---------------------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------------------


def time_training(step_fn, warmup, steps):
    """Run `warmup` untimed and `steps` timed steps; step_fn() -> (loss, tokens)."""
    for _ in range(warmup):
        step_fn()
    step_secs, tokens, losses = [], 0, []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, n = step_fn()
        step_secs.append(time.perf_counter() - t0)
        tokens += n
        losses.append(loss)
    return tokens, step_secs, sum(losses) / len(losses)


# The precision of the training forward passes: "f32" (eager f32) or "bf16", PyTorch's CPU
# mixed precision, `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward and the loss
# (nanoGPT's `ctx`), f32 parameters and optimizer. Set by --precision.
PRECISION = "f32"


def autocast():
    if PRECISION == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_lm(cfg, batch_size, warmup, steps):
    model = GPT(cfg)
    model.train()
    # (1M,) random character ids: the content does not change the work.
    data = torch.randint(cfg.vocab_size, (1 << 20,), dtype=torch.long)
    optimizer = nanogpt_optimizer(model, 0.1, LR_LM, (0.9, 0.95))

    def get_batch():
        ix = torch.randint(len(data) - cfg.block_size, (batch_size,))
        x = torch.stack([data[i:i + cfg.block_size] for i in ix])  # (B, T)
        y = torch.stack([data[i + 1:i + 1 + cfg.block_size] for i in ix])  # (B, T)
        return x, y

    def step():  # nanoGPT train.py's iteration with gradient_accumulation_steps = 1
        x, y = get_batch()
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), batch_size * cfg.block_size

    tokens, step_secs, loss = time_training(step, warmup, steps)
    # 6·N + 12·L·C·T per position, N without the position embedding (nanoGPT's estimate_mfu).
    n = model.n_params() - model.transformer.wpe.weight.numel()
    flops = 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return measurement("train_tokens_per_s", tokens, step_secs, steps, warmup, loss,
                       model.n_params(), flops, batch_size * cfg.block_size)


class Seq2Seq(nn.Module):
    """nn.Transformer with a shared embedding (scaled by sqrt(d_model)), sinusoidal positions,
    embedding dropout and the output projection tied to the embedding (no bias)."""

    def __init__(self, vocab, d_model=256, nhead=8, n_enc=3, n_dec=3, d_ff=512, dropout=0.1,
                 max_len=64):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(
            d_model=d_model, nhead=nhead, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
            dim_feedforward=d_ff, dropout=dropout, activation="relu", batch_first=True,
            norm_first=False)
        self.dropout = nn.Dropout(dropout)
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (max_len, 1)
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                        * (-math.log(10000.0) / d_model))  # (C/2,)
        pe = torch.zeros(max_len, d_model)  # (max_len, C)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def embed_tokens(self, ids):  # (B, T) -> (B, T, C)
        x = self.embed(ids) * math.sqrt(self.d_model) + self.pe[: ids.size(1)]
        return self.dropout(x)

    def forward(self, src, tgt_in, src_pad, tgt_pad):
        """src (B, S), tgt_in (B, T) ids; src_pad (B, S), tgt_pad (B, T) bool, True = padding."""
        T = tgt_in.size(1)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # (T, T) True = masked
        h = self.transformer(
            self.embed_tokens(src), self.embed_tokens(tgt_in), tgt_mask=causal,
            src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad)  # (B, T, C)
        return F.linear(h, self.embed.weight)  # (B, T, V)


def c_lengths(i, step):
    """Source and decoder lengths of row i at a step: the same pattern as bench.rs."""
    span = C_MAX_LEN - C_MIN_LEN + 1
    return C_MIN_LEN + (5 * i + step) % span, C_MIN_LEN + (7 * i + step + 3) % span


def c_batch(step):
    """128 random pairs padded as Seq2SeqBatch pads them: decoder input [BOS] + y, labels
    y + [EOS], both of length dec_len."""
    rows = [c_lengths(i, step) for i in range(C_BATCH)]
    S = max(s for s, _ in rows)
    T = max(t for _, t in rows)
    src = torch.full((C_BATCH, S), PAD, dtype=torch.long)  # (B, S)
    tgt_in = torch.full((C_BATCH, T), PAD, dtype=torch.long)  # (B, T)
    labels = torch.full((C_BATCH, T), PAD, dtype=torch.long)  # (B, T)
    for i, (s, t) in enumerate(rows):
        src[i, :s] = torch.randint(FIRST_TOKEN, C_VOCAB, (s,))
        y = torch.randint(FIRST_TOKEN, C_VOCAB, (t - 1,))
        tgt_in[i, 0] = BOS
        tgt_in[i, 1:t] = y
        labels[i, : t - 1] = y
        labels[i, t - 1] = EOS
    return src, tgt_in, labels, src == PAD, tgt_in == PAD, sum(t for _, t in rows)


def bench_seq2seq(warmup, steps):
    model = Seq2Seq(C_VOCAB)
    model.train()
    # torch.optim.AdamW's defaults, weight decay (0.01) on rank >= 2 only, as bench.rs.
    optimizer = nanogpt_optimizer(model, 0.01, LR_SEQ2SEQ, (0.9, 0.999))
    counter = [0]

    def step():
        src, tgt_in, labels, src_pad, tgt_pad, tokens = c_batch(counter[0])
        counter[0] += 1
        with autocast():
            logits = model(src, tgt_in, src_pad, tgt_pad)  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, C_VOCAB), labels.reshape(-1),
                                   ignore_index=PAD, label_smoothing=C_LABEL_SMOOTHING)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), tokens

    tokens, step_secs, loss = time_training(step, warmup, steps)
    n = sum(p.numel() for p in model.parameters())
    # Per padded target position with S = T = 24: 6·N plus 12·C·T for each of the
    # 3 + 2·3 attention blocks (encoder self, decoder self, cross), as bench.rs.
    flops = 6 * n + 12 * (3 + 2 * 3) * 256 * C_MAX_LEN
    return measurement("train_tokens_per_s", tokens, step_secs, steps, warmup, loss, n, flops,
                       C_BATCH * C_MAX_LEN)


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate_nocache(model, idx, max_new_tokens, temperature=1.0):
    """nanoGPT's GPT.generate: crop to block_size, full forward for every new token."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.cfg.block_size else idx[:, -model.cfg.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / temperature
        probs = F.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


@torch.no_grad()
def generate_cached(model, idx, max_new_tokens, temperature=1.0):
    """The same sampling with a KV cache; when the cache holds block_size positions, the last
    half window is encoded afresh (the library's generate does the same)."""
    block = model.cfg.block_size
    caches = [KVCache() for _ in range(model.cfg.n_layer)]
    logits, _ = model(idx[:, -block:], caches=caches)
    for step in range(max_new_tokens):
        probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
        if step + 1 == max_new_tokens:
            break
        if len(caches[0]) + 1 > block:
            for c in caches:
                c.clear()
            x = idx[:, -max(block // 2, 1):]
        else:
            x = idx_next
        logits, _ = model(x, caches=caches)
    return idx


def bench_generate(use_cache, warmup, steps):
    model = GPT(cfg_a())
    model.eval()
    gen = generate_cached if use_cache else generate_nocache
    prompt = torch.zeros((1, 1), dtype=torch.long)
    for _ in range(warmup):
        gen(model, prompt, D_WARMUP_TOKENS)
    step_secs = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = gen(model, prompt, D_NEW_TOKENS)
        step_secs.append(time.perf_counter() - t0)
        assert out.size(1) == 1 + D_NEW_TOKENS
    return measurement("gen_tokens_per_s", steps * D_NEW_TOKENS, step_secs, steps, warmup, None,
                       model.n_params(), None, None)


# ---------------------------------------------------------------------------------------


def measurement(metric, tokens, step_secs, steps, warmup, loss, n_params, flops, positions):
    seconds = sum(step_secs)
    return {
        "metric": metric,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "warmup": warmup,
        "seconds": seconds,
        "step_ms_median": statistics.median(step_secs) * 1e3,
        "final_loss": loss,
        "n_params": n_params,
        "flops_per_position": flops,
        "positions_per_step": positions,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=lambda s: {k.lower(): k for k in DEFAULT_STEPS}.get(s.lower(), s),
                    choices=list(DEFAULT_STEPS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="bf16: torch.autocast('cpu', dtype=torch.bfloat16) in training")
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision
    # bench/run.sh sets BENCH_THREADS for both sides (default 2, the machine of issue 5).
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(args.seed)
    warmup, steps = DEFAULT_STEPS[args.case]
    warmup = warmup if args.warmup is None else args.warmup
    steps = steps if args.steps is None else args.steps
    if steps < 1:
        sys.exit("error: --steps must be at least 1")
    if args.case == "A":
        m = bench_lm(cfg_a(), 12, warmup, steps)
    elif args.case == "B":
        m = bench_lm(cfg_b(), 64, warmup, steps)
    elif args.case == "C":
        m = bench_seq2seq(warmup, steps)
    else:
        m = bench_generate(args.case == "D", warmup, steps)
    # Linux reports ru_maxrss in KiB.
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = {"impl": "pytorch", "case": args.case, **m, "max_rss_mb": max_rss_mb,
            "precision": args.precision,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        print(json.dumps(line), flush=True)
    else:
        print(f"case {args.case}: {m['tokens_per_s']:.1f} {m['metric']} ({steps} steps after "
              f"{warmup} warm-up, median step {m['step_ms_median']:.1f} ms, {m['n_params']} "
              f"parameters, max RSS {max_rss_mb:.0f} MB)")


if __name__ == "__main__":
    main()
