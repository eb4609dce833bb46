//! `transformer generate --model DIR --prompt TEXT [...]`: stream tokens as they are made.

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;
use transformer::decode::{generate, GenerateOptions, Overflow};
use transformer::rng::Rng;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: crate::checkpoint::ModelArgs,
    /// Text to continue. Empty is allowed for models that start from a BOS token (Gemma).
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// The most tokens to generate (0: print the prompt and stop). Generation also stops at
    /// the model's end-of-sequence / end-of-turn tokens.
    #[arg(long, default_value_t = 500, allow_hyphen_values = true)]
    max_new_tokens: usize,
    /// When prompt + new tokens exceed the context window: `slide` keeps the most recent
    /// tokens, `fail` refuses before generating.
    #[arg(long, value_enum, default_value_t = OverflowArg::Slide)]
    context_overflow: OverflowArg,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    sampling: crate::sampling::SamplingArgs,
    /// Recompute the whole context at every step instead of using the KV cache.
    #[arg(long)]
    no_cache: bool,
    /// Sample this many completions of the prompt together, in one batch (completion i
    /// seeded with --seed + i), and print them one after another, separated by blank lines,
    /// when all are done. The context does not slide.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    completions: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverflowArg {
    Slide,
    Fail,
}

impl OverflowArg {
    pub fn overflow(self) -> Overflow {
        match self {
            OverflowArg::Slide => Overflow::Slide,
            OverflowArg::Fail => Overflow::Fail,
        }
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = args.sampling.sampling()?;
    let device = crate::device()?;
    let lm = crate::checkpoint::load_lm(&args.model, &device)?;
    let prompt = lm.encode_prompt(&args.prompt)?;
    if prompt.is_empty() {
        bail!("--prompt is empty, and this model has no BOS token to start from");
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        use_cache: !args.no_cache,
        overflow: args.context_overflow.overflow(),
    };
    let stop: &[u32] = if args.ignore_eos { &[] } else { &lm.stop };
    if args.completions > 1 {
        if args.no_cache {
            bail!("--completions above 1 decodes with the KV cache; drop --no-cache");
        }
        let n = args.completions as usize;
        let (all, stats) = transformer::decode::generate_many(
            lm.model.as_ref(),
            &prompt,
            n,
            &opts,
            stop,
            &device,
            args.sampling.seed,
        )?;
        let mut out = std::io::stdout().lock();
        for (i, ids) in all.iter().enumerate() {
            let ids: Vec<u32> = ids.iter().copied().filter(|t| !stop.contains(t)).collect();
            if i > 0 {
                writeln!(out)?;
            }
            writeln!(out, "{}{}", args.prompt, lm.tokenizer.decode(&ids)?)?;
        }
        // The first token of each completion comes from the prompt's pass; the rest from the
        // batched steps.
        let stepped = stats.new_tokens - n;
        eprintln!(
            "prompt: {} tokens in {:.2} s ({:.1} tokens/s); generation: {} tokens in {:.2} s \
             ({:.1} tokens/s in {} steps of up to {n} completions)",
            stats.prompt_tokens,
            stats.prompt_seconds,
            stats.prompt_tokens_per_sec(),
            stats.new_tokens,
            stats.seconds - stats.prompt_seconds,
            stepped as f64 / stats.decode_seconds.max(1e-9),
            stats.decode_steps,
        );
        return Ok(());
    }
    // Unlocked: the token callback runs on a pool thread (see `generate`).
    let mut out = std::io::stdout();
    out.write_all(args.prompt.as_bytes())?;
    out.flush()?;
    let mut stream = lm.tokenizer.stream_decoder();
    let mut rng = Rng::new(args.sampling.seed);
    let mut write_err: Option<std::io::Error> = None;
    let (_, stats) = generate(lm.model.as_ref(), &prompt, &opts, &device, &mut rng, |id| {
        if stop.contains(&id) {
            return Ok(false);
        }
        let piece = stream.push(id)?;
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            write_err = Some(e);
            return Ok(false);
        }
        Ok(true)
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    out.write_all(stream.finish()?.as_bytes())?;
    writeln!(out)?;
    eprintln!(
        "prompt: {} tokens in {:.2} s ({:.1} tokens/s); generation: {} tokens in {:.2} s \
         ({:.1} tokens/s{})",
        stats.prompt_tokens,
        stats.prompt_seconds,
        stats.prompt_tokens_per_sec(),
        stats.new_tokens,
        stats.seconds - stats.prompt_seconds,
        stats.decode_tokens_per_sec(),
        if args.no_cache {
            ", no cache"
        } else {
            ", KV cache"
        }
    );
    Ok(())
}
