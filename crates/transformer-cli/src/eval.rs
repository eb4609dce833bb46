//! `transformer eval --checkpoint DIR --text FILE`: loss and perplexity as one JSON line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use transformer::data::read_text;
use transformer::train::eval::evaluate_lm;

#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its best/ checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text file to evaluate a language model on.
    #[arg(long)]
    text: PathBuf,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let device = crate::device()?;
    let lm = crate::checkpoint::load_lm(&args.checkpoint, &device)?;
    let text = read_text(&args.text)?;
    let tokens = lm.tokenizer.encode(&text).with_context(|| {
        format!(
            "{} cannot be encoded with this model's tokenizer",
            args.text.display()
        )
    })?;
    let r = evaluate_lm(&lm.model, &tokens, args.batch_size, &device)?;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": lm.dir.display().to_string(),
            "text": args.text.display().to_string(),
            "loss": r.loss,
            "perplexity": r.perplexity,
            "tokens": r.tokens,
            "windows": r.windows,
        })
    );
    Ok(())
}
