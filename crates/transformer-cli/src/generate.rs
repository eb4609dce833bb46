//! `transformer generate --model DIR --prompt TEXT [...]`: stream tokens as they are made.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use transformer::decode::{generate, GenerateOptions};
use transformer::rng::Rng;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: crate::checkpoint::ModelArgs,
    /// Text to continue.
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[arg(long, default_value_t = 500, allow_negative_numbers = true)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: crate::sampling::SamplingArgs,
    /// Recompute the whole context at every step instead of using the KV cache.
    #[arg(long)]
    no_cache: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = args.sampling.sampling()?;
    let device = crate::device()?;
    let lm = crate::checkpoint::load_lm(&args.model, &device)?;
    let prompt = lm
        .tokenizer
        .encode(&args.prompt)
        .with_context(|| "the prompt cannot be encoded with this model's tokenizer")?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        use_cache: !args.no_cache,
    };
    let mut out = std::io::stdout().lock();
    out.write_all(args.prompt.as_bytes())?;
    out.flush()?;
    let mut stream = lm.tokenizer.stream_decoder();
    let mut rng = Rng::new(args.sampling.seed);
    let mut write_err: Option<std::io::Error> = None;
    let (_, stats) = generate(lm.model.as_ref(), &prompt, &opts, &device, &mut rng, |id| {
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
        "{} tokens in {:.2} s ({:.1} tokens/s{})",
        stats.new_tokens,
        stats.seconds,
        stats.tokens_per_sec(),
        if args.no_cache {
            ", no cache"
        } else {
            ", KV cache"
        }
    );
    Ok(())
}
