//! `transformer bench <case>`: throughput of the library on the fixed configurations of issue 5,
//! one JSON line per case (`--json`). `bench/run.sh` runs it alternately with the PyTorch
//! programs of `bench/reference.py`, which print the same fields, and tabulates the medians.
//!
//! Not a test: timings depend on the machine and its load, so nothing here asserts a speed.
//!
//! The models, loss, optimizer, clipping and generation are the library's own, called as the
//! trainer and `transformer generate` call them:
//! - A: decoder-only, nanoGPT's Shakespeare-char CPU config (4 layers, 4 heads, 128 wide,
//!   T 64, batch 12, vocab 65, dropout 0): training tokens/s.
//! - B: decoder-only, 6 layers, 6 heads, 384 wide, T 256, batch 64, dropout 0.2: training
//!   tokens/s and peak memory (max RSS).
//! - C: encoder-decoder, d_model 256, 8 heads, 3+3 layers, d_ff 512, shared vocab 8000,
//!   batch 128, source and target lengths 12..=24 padded to 24, label smoothing 0.1:
//!   training target tokens/s (non-padding labels).
//! - D: generation with model A, batch 1, 500 new tokens, KV cache: tokens/s;
//!   `d-nocache` recomputes the cropped context at every token, as nanoGPT samples.
//!
//! Dimension letters: `B` batch, `T` time (target), `S` source, `C` d_model, `L` layers,
//! `N` parameters, `V` vocab.

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, ValueEnum};
use transformer::data::{LmDataset, Seq2SeqIds};
use transformer::decode::{generate, GenerateOptions, Sampling};
use transformer::models::{DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig};
use transformer::nn::{autocast, Activation, PositionalKind, Precision};
use transformer::rng::Rng;
use transformer::train::config::Engine;
use transformer::train::parallel::Shard;
use transformer::train::{
    clip_grad_norm, loss_and_gradients, AdamW, AdamWConfig, CrossEntropyConfig, LmTask, PairSource,
    Seq2SeqTask, Task,
};

/// Character vocabulary of Shakespeare-char (A, B, D).
const CHAR_VOCAB: usize = 65;
/// Global gradient-norm clip of every training case (nanoGPT's `grad_clip`).
const GRAD_CLIP: f64 = 1.0;
/// Constant learning rates: nanoGPT's Shakespeare-char rate for A and B; C's is smaller, as
/// for a post-norm encoder-decoder without warm-up. Throughput does not depend on them.
const LR_LM: f64 = 1e-3;
const LR_SEQ2SEQ: f64 = 5e-4;
/// C: batch, shortest and longest source / decoder length, vocabulary, label smoothing.
const C_BATCH: usize = 128;
const C_MIN_LEN: usize = 12;
const C_MAX_LEN: usize = 24;
const C_VOCAB: usize = 8000;
const C_LABEL_SMOOTHING: f64 = 0.1;
/// C's special ids; ordinary tokens are drawn from `C_FIRST_TOKEN..C_VOCAB`.
const C_IDS: Seq2SeqIds = Seq2SeqIds {
    pad: 0,
    bos: 1,
    eos: 2,
    ignore: 0,
};
const C_FIRST_TOKEN: u32 = 3;
/// D: new tokens per generation and the length of the warm-up generation.
const D_NEW_TOKENS: usize = 500;
const D_WARMUP_TOKENS: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Case {
    /// Train the 4-layer, 128-wide GPT (T 64, batch 12).
    A,
    /// Train the 6-layer, 384-wide GPT (T 256, batch 64, dropout 0.2); reports peak memory.
    B,
    /// Train the 3+3-layer encoder-decoder (d_model 256, batch 128, padded lengths 24).
    C,
    /// Generate 500 tokens with model A, KV cache.
    D,
    /// Generate 500 tokens with model A, recomputing the context at every token.
    #[value(name = "d-nocache")]
    DNoCache,
}

impl Case {
    /// The name shared with bench/reference.py and bench/run.sh.
    fn name(self) -> &'static str {
        match self {
            Case::A => "A",
            Case::B => "B",
            Case::C => "C",
            Case::D => "D",
            Case::DNoCache => "D-nocache",
        }
    }

    /// (warm-up, timed) steps; for D a step is one generation of 500 tokens. B's steps take
    /// seconds each, so it gets few.
    fn default_steps(self) -> (usize, usize) {
        match self {
            Case::A => (5, 40),
            Case::B => (1, 3),
            Case::C => (2, 10),
            Case::D | Case::DNoCache => (1, 3),
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Which configuration to measure (case-insensitive).
    #[arg(value_enum, ignore_case = true)]
    case: Case,
    /// Timed steps (D: timed generations of 500 tokens).
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed steps before them.
    #[arg(long)]
    warmup: Option<usize>,
    /// Print one JSON line (the format bench/run.sh reads) instead of a sentence.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// The reverse-mode engine of the training cases (`train.engine`).
    #[arg(long, value_enum, default_value_t = EngineArg::Candle)]
    engine: EngineArg,
    /// The precision of the training cases' matrix products (`train.precision`): f32, or bf16
    /// mixed precision (bf16 inputs, f32 accumulation and master weights).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
}

/// `train.precision` as a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
}

impl PrecisionArg {
    fn precision(self) -> Precision {
        match self {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// `train.engine` as a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Candle,
    Tape,
}

/// What one case measured; serialized with the same field names as bench/reference.py.
struct Measurement {
    /// `train_tokens_per_s` or `gen_tokens_per_s`.
    metric: &'static str,
    /// Counted tokens (training: non-padding target tokens; generation: new tokens) per second.
    tokens_per_s: f64,
    steps: usize,
    warmup: usize,
    /// Wall time of the timed steps.
    seconds: f64,
    /// Median time of one timed step.
    step_ms_median: f64,
    /// Mean loss of the timed steps (training), a sanity check that both sides train.
    final_loss: Option<f64>,
    n_params: usize,
    /// Model FLOPs per position (6·N + 12·L·C·T) and positions (B·T, padding included) per
    /// step, for the MFU; absent for generation.
    flops_per_position: Option<f64>,
    positions_per_step: Option<usize>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = crate::device()?;
    let (default_warmup, default_steps) = args.case.default_steps();
    let warmup = args.warmup.unwrap_or(default_warmup);
    let steps = args.steps.unwrap_or(default_steps);
    ensure!(steps >= 1, "--steps must be at least 1");
    let m = match args.case {
        Case::A => bench_lm(lm_config_a(), 12, warmup, steps, &args, &device)?,
        Case::B => bench_lm(lm_config_b(), 64, warmup, steps, &args, &device)?,
        Case::C => bench_seq2seq(warmup, steps, &args, &device)?,
        Case::D => bench_generate(true, warmup, steps, args.seed, &device)?,
        Case::DNoCache => bench_generate(false, warmup, steps, args.seed, &device)?,
    };
    let max_rss_mb = max_rss_mb();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "ours",
                "case": args.case.name(),
                "engine": match args.engine {
                    EngineArg::Candle => "candle",
                    EngineArg::Tape => "tape",
                },
                "precision": match args.precision {
                    PrecisionArg::F32 => "f32",
                    PrecisionArg::Bf16 => "bf16",
                },
                "metric": m.metric,
                "tokens_per_s": m.tokens_per_s,
                "steps": m.steps,
                "warmup": m.warmup,
                "seconds": m.seconds,
                "step_ms_median": m.step_ms_median,
                "final_loss": m.final_loss,
                "n_params": m.n_params,
                "flops_per_position": m.flops_per_position,
                "positions_per_step": m.positions_per_step,
                "max_rss_mb": max_rss_mb,
                "threads": candle_core::utils::get_num_threads(),
                "elementwise_threads": elementwise_threads(),
            })
        );
    } else {
        println!(
            "case {}: {:.1} {} ({} steps after {} warm-up, median step {:.1} ms, {} parameters, max RSS {:.0} MB)",
            args.case.name(),
            m.tokens_per_s,
            m.metric,
            m.steps,
            m.warmup,
            m.step_ms_median,
            m.n_params,
            max_rss_mb,
        );
    }
    Ok(())
}

/// A: nanoGPT's Shakespeare-char configuration.
fn lm_config_a() -> DecoderOnlyConfig {
    DecoderOnlyConfig::shakespeare_char(CHAR_VOCAB)
}

/// B: 6 layers, 6 heads, 384 wide, T 256, dropout 0.2 (nanoGPT's GPU Shakespeare-char).
fn lm_config_b() -> DecoderOnlyConfig {
    DecoderOnlyConfig {
        block_size: 256,
        d_model: 384,
        n_heads: 6,
        n_layers: 6,
        d_ff: 4 * 384,
        dropout: 0.2,
        ..DecoderOnlyConfig::shakespeare_char(CHAR_VOCAB)
    }
}

/// C: the paper's base model shrunk to d_model 256, 8 heads, d_ff 512, 3+3 layers, vocab 8000.
/// The fields that bench/reference.py's `nn.Transformer` model mirrors are spelled out, so that
/// a change of the `base` preset cannot silently make the two programs differ.
fn seq2seq_config_c() -> EncoderDecoderConfig {
    EncoderDecoderConfig {
        d_model: 256,
        n_heads: 8,
        d_ff: 512,
        n_encoder_layers: 3,
        n_decoder_layers: 3,
        dropout: 0.1,
        activation: Activation::Relu,
        norm_first: false,
        layer_norm_eps: 1e-5,
        bias: true,
        max_len: 64,
        positional: PositionalKind::Sinusoidal,
        share_embeddings: true,
        tie_output: true,
        final_norm: true,
        scale_embeddings: true,
        ..EncoderDecoderConfig::base(C_VOCAB)
    }
}

/// One optimizer step exactly as `Trainer::train_step` takes it with `grad_accum = 1`: the
/// task's loss, read back to the host, backward, clipping by global norm, AdamW in place.
fn train_step(
    task: &mut dyn Task,
    rng: &mut Rng,
    vars: &[Var],
    optimizer: &mut AdamW,
    lr: f64,
    args: &BenchArgs,
) -> Result<(f64, usize)> {
    let engine = match args.engine {
        EngineArg::Candle => Engine::Candle,
        EngineArg::Tape => Engine::Tape,
    };
    // The forward in the asked precision; each product's backward keeps its forward's.
    let (loss, tokens, mut grads) = autocast(args.precision.precision(), || {
        loss_and_gradients(engine, vars, || task.train_batch(rng, Shard::WHOLE))
    })?;
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    ensure!(loss_value.is_finite(), "training loss became {loss_value}");
    clip_grad_norm(&mut grads, vars, GRAD_CLIP)?;
    optimizer.step(&grads, lr)?;
    Ok((loss_value, tokens))
}

/// Warm up, then time `steps` training steps: (tokens counted, seconds of each timed step,
/// mean loss of the timed steps).
fn time_training(
    task: &mut dyn Task,
    vars: &[Var],
    optimizer: &mut AdamW,
    lr: f64,
    warmup: usize,
    steps: usize,
    args: &BenchArgs,
) -> Result<(usize, Vec<f64>, f64)> {
    let mut rng = Rng::new(args.seed ^ 0xDA7A);
    for _ in 0..warmup {
        train_step(task, &mut rng, vars, optimizer, lr, args)?;
    }
    let mut step_secs = Vec::with_capacity(steps);
    let (mut tokens, mut loss_sum) = (0usize, 0.0);
    for _ in 0..steps {
        let t0 = Instant::now();
        let (loss, n) = train_step(task, &mut rng, vars, optimizer, lr, args)?;
        step_secs.push(t0.elapsed().as_secs_f64());
        tokens += n;
        loss_sum += loss;
    }
    Ok((tokens, step_secs, loss_sum / steps as f64))
}

fn median_ms(secs: &[f64]) -> f64 {
    let mut v = secs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mid = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    mid * 1e3
}

/// nanoGPT's `get_num_params(non_embedding=True)`: all parameters but the learned positions
/// (the token embedding stays, since it is also the output projection).
fn lm_n_params_for_flops(cfg: &DecoderOnlyConfig, n_params: usize) -> usize {
    match cfg.positional {
        PositionalKind::Learned => n_params - cfg.block_size * cfg.d_model,
        _ => n_params,
    }
}

/// A and B: next-token prediction on random windows of a random token stream.
fn bench_lm(
    cfg: DecoderOnlyConfig,
    batch_size: usize,
    warmup: usize,
    steps: usize,
    args: &BenchArgs,
    device: &Device,
) -> Result<Measurement> {
    let seed = args.seed;
    let (model, vs) = DecoderOnly::init(&cfg, DType::F32, device, seed)?;
    let n_params = vs.num_params();
    let mut data_rng = Rng::new(seed ^ 0x70C5);
    // (1M,) random character ids: the content does not change the work.
    let stream: Vec<u32> = (0..1 << 20)
        .map(|_| data_rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let mut task = LmTask {
        model: Box::new(model),
        data: LmDataset::from_tokens(stream, 1.0)?,
        batch_size,
        block_size: cfg.block_size,
        loss: CrossEntropyConfig::default(),
        device: device.clone(),
    };
    let vars = vs.all_vars();
    let mut optimizer = AdamW::new(vs.vars(), AdamWConfig::nanogpt())?;
    let (tokens, step_secs, loss) =
        time_training(&mut task, &vars, &mut optimizer, LR_LM, warmup, steps, args)?;
    let seconds: f64 = step_secs.iter().sum();
    // 6·N + 12·L·C·T per position (PaLM appendix B, as nanoGPT's `estimate_mfu`).
    let n = lm_n_params_for_flops(&cfg, n_params) as f64;
    let (l, c, t) = (
        cfg.n_layers as f64,
        cfg.d_model as f64,
        cfg.block_size as f64,
    );
    Ok(Measurement {
        metric: "train_tokens_per_s",
        tokens_per_s: tokens as f64 / seconds,
        steps,
        warmup,
        seconds,
        step_ms_median: median_ms(&step_secs),
        final_loss: Some(loss),
        n_params,
        flops_per_position: Some(6.0 * n + 12.0 * l * c * t),
        positions_per_step: Some(batch_size * cfg.block_size),
    })
}

/// Source and decoder lengths of row `i` at step `step`, each in `C_MIN_LEN..=C_MAX_LEN`:
/// a fixed pattern (the same in bench/reference.py) so that both sides count the same tokens
/// and every batch of 128 rows is padded to exactly 24.
fn c_lengths(i: usize, step: usize) -> (usize, usize) {
    let span = C_MAX_LEN - C_MIN_LEN + 1;
    (
        C_MIN_LEN + (5 * i + step) % span,
        C_MIN_LEN + (7 * i + step + 3) % span,
    )
}

/// C's task: each batch is 128 random pairs with the lengths of [`c_lengths`], through
/// [`Seq2SeqTask::pairs_loss`] (padding, target shifting, key-padding masks, causal mask,
/// label-smoothed loss with the padding ignored).
struct Seq2SeqBench {
    inner: Seq2SeqTask,
    step: usize,
}

impl Task for Seq2SeqBench {
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> transformer::Result<(Tensor, usize)> {
        let n_tokens = C_VOCAB as u64 - C_FIRST_TOKEN as u64;
        let mut draw = |len: usize| -> Vec<u32> {
            (0..len)
                .map(|_| C_FIRST_TOKEN + rng.below(n_tokens) as u32)
                .collect()
        };
        let mut pairs = Vec::with_capacity(C_BATCH);
        for i in 0..C_BATCH {
            let (src_len, dec_len) = c_lengths(i, self.step);
            // The decoder reads [bos] + y and predicts y + [eos]: dec_len = len(y) + 1.
            pairs.push((draw(src_len), draw(dec_len - 1)));
        }
        self.step += 1;
        let pairs = &pairs[shard.rows(pairs.len())];
        let tokens = pairs.iter().map(|(_, y)| y.len() + 1).sum();
        let loss = self.inner.pairs_loss(pairs, true, &self.inner.loss)?;
        Ok((loss, tokens))
    }

    fn eval_loss(&mut self, _rng: &mut Rng, _iters: usize) -> transformer::Result<f64> {
        Ok(f64::NAN)
    }
}

fn bench_seq2seq(
    warmup: usize,
    steps: usize,
    args: &BenchArgs,
    device: &Device,
) -> Result<Measurement> {
    let seed = args.seed;
    let cfg = seq2seq_config_c();
    let (model, vs) = EncoderDecoder::init(&cfg, DType::F32, device, seed)?;
    let n_params = vs.num_params();
    let mut task = Seq2SeqBench {
        inner: Seq2SeqTask {
            model: Box::new(model),
            train: PairSource::Fixed(Vec::new()),
            val: Vec::new(),
            batch_size: C_BATCH,
            ids: C_IDS,
            loss: CrossEntropyConfig {
                label_smoothing: C_LABEL_SMOOTHING,
                ignore_index: Some(C_IDS.ignore),
                kernels: transformer::kernels::Kernels::from_env(),
            },
            device: device.clone(),
        },
        step: 0,
    };
    let vars = vs.all_vars();
    // torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01).
    let mut optimizer = AdamW::new(vs.vars(), AdamWConfig::default())?;
    let (tokens, step_secs, loss) = time_training(
        &mut task,
        &vars,
        &mut optimizer,
        LR_SEQ2SEQ,
        warmup,
        steps,
        args,
    )?;
    let seconds: f64 = step_secs.iter().sum();
    // Per padded target position, with S = T = 24: 6·N (the encoder's parameters see as many
    // source positions as the decoder's and the output projection see target positions) plus
    // 12·C·24 for each of the L = 3 + 2·3 attention blocks (encoder self, decoder self, cross).
    let l_attn = (cfg.n_encoder_layers + 2 * cfg.n_decoder_layers) as f64;
    let (c, t) = (cfg.d_model as f64, C_MAX_LEN as f64);
    Ok(Measurement {
        metric: "train_tokens_per_s",
        tokens_per_s: tokens as f64 / seconds,
        steps,
        warmup,
        seconds,
        step_ms_median: median_ms(&step_secs),
        final_loss: Some(loss),
        n_params,
        flops_per_position: Some(6.0 * n_params as f64 + 12.0 * l_attn * c * t),
        positions_per_step: Some(C_BATCH * C_MAX_LEN),
    })
}

/// D: `transformer generate`'s path (temperature 1, no top-k) from a one-token prompt with
/// model A (random weights: the speed does not depend on them); 500 tokens overflow the
/// 64-token context, so the window slides as in real use.
fn bench_generate(
    use_cache: bool,
    warmup: usize,
    steps: usize,
    seed: u64,
    device: &Device,
) -> Result<Measurement> {
    let cfg = lm_config_a();
    let (model, vs) = DecoderOnly::init(&cfg, DType::F32, device, seed)?;
    let mut rng = Rng::new(seed ^ 0x6E4);
    let prompt = [0u32];
    let mut opts = GenerateOptions {
        max_new_tokens: D_WARMUP_TOKENS,
        sampling: Sampling::default(),
        use_cache,
        ..Default::default()
    };
    for _ in 0..warmup {
        generate(&model, &prompt, &opts, device, &mut rng, |_| Ok(true))?;
    }
    opts.max_new_tokens = D_NEW_TOKENS;
    let mut step_secs = Vec::with_capacity(steps);
    let mut tokens = 0;
    for _ in 0..steps {
        let (_, stats) = generate(&model, &prompt, &opts, device, &mut rng, |_| Ok(true))?;
        step_secs.push(stats.seconds);
        tokens += stats.new_tokens;
    }
    let seconds: f64 = step_secs.iter().sum();
    Ok(Measurement {
        metric: "gen_tokens_per_s",
        tokens_per_s: tokens as f64 / seconds,
        steps,
        warmup,
        seconds,
        step_ms_median: median_ms(&step_secs),
        final_loss: None,
        n_params: vs.num_params(),
        flops_per_position: None,
        positions_per_step: None,
    })
}

/// Threads of candle's element-wise pool: `CANDLE_NUM_THREADS` (which `main` sets), else the
/// matrix-product pool's.
fn elementwise_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

/// This process's peak resident set size in MB (`getrusage(RUSAGE_SELF).ru_maxrss`, which
/// Linux reports in KiB), as Python's `resource.getrusage` reads it in bench/reference.py.
fn max_rss_mb() -> f64 {
    // SAFETY: getrusage only writes the struct it is given, which is zero-initialized plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0
}
