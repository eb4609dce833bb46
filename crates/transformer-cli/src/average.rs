//! `transformer average --out DIR CKPT...`: average the weights of checkpoints of one run
//! (Vaswani et al. 2017, §6.1 average the last 5), e.g. the `step-XXXXXX/` directories that
//! `train.keep_last` keeps.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use transformer::train::checkpoint::{average_checkpoints, resolve_model_dir};

#[derive(Args)]
pub struct AverageArgs {
    /// Directory for the averaged checkpoint. A previous average there is replaced; anything
    /// else only with --force.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out even when it holds something other than a previous average.
    #[arg(long)]
    force: bool,
    /// Checkpoint directories to average, e.g. `runs/multi30k/step-*` (two or more).
    #[arg(required = true, num_args = 2.., value_name = "CKPT")]
    checkpoints: Vec<PathBuf>,
}

pub fn run(args: AverageArgs) -> Result<()> {
    let dirs: Vec<PathBuf> = args
        .checkpoints
        .iter()
        .map(|p| resolve_model_dir(p))
        .collect::<transformer::Result<_>>()?;
    let inputs: Vec<(&str, &std::path::Path)> =
        dirs.iter().map(|d| ("checkpoint", d.as_path())).collect();
    crate::output::check_not_input("--out", &args.out, &inputs)?;
    let staged = crate::output::StagedDir::begin("--out", &args.out, "average", args.force)?;
    average_checkpoints(&dirs, staged.path())?;
    staged.commit()?;
    println!(
        "averaged {} checkpoints into {}",
        dirs.len(),
        args.out.display()
    );
    Ok(())
}
