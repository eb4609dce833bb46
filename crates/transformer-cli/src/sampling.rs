//! The sampling flags that `generate` and `chat` share.

use anyhow::{Context, Result};
use clap::Args;
use transformer::decode::Sampling;

// `allow_hyphen_values` on the numeric flags: without it clap reads `--temperature -1` (or
// `-inf`, which `allow_negative_numbers` does not take for a number) as a stray flag and its
// error does not name --temperature; with it the value reaches parsing and validation, whose
// errors do.
#[derive(Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 means greedy (argmax).
    #[arg(long, default_value_t = 0.8, allow_hyphen_values = true)]
    temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long, allow_hyphen_values = true)]
    top_k: Option<usize>,
    /// Sample only within the smallest set of tokens whose probability reaches p.
    #[arg(long, allow_hyphen_values = true)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1337, allow_hyphen_values = true)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The validated sampling options.
    pub fn sampling(&self) -> Result<Sampling> {
        let sampling = Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        };
        sampling.validate().context("invalid sampling flags")?;
        Ok(sampling)
    }
}
