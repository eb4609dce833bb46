//! Loading what `train` wrote, with errors that name the directory and the missing piece.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use transformer::data::Tokenizer;
use transformer::models::{DecoderOnly, DecoderOnlyConfig, CONFIG_FILE, WEIGHTS_FILE};
use transformer::train::checkpoint::{read_meta, require_files, resolve_model_dir, TOKENIZER_FILE};
use transformer::train::Family;

/// A decoder-only model with its tokenizer.
pub struct LoadedLm {
    pub dir: PathBuf,
    pub model: DecoderOnly,
    pub tokenizer: Tokenizer,
}

/// Load a decoder-only checkpoint (a checkpoint directory or a run directory).
pub fn load_lm(path: &Path, device: &Device) -> Result<LoadedLm> {
    let dir = resolve_model_dir(path)?;
    require_files(&dir, &[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])?;
    let meta = read_meta(&dir)?;
    if meta.family != Family::DecoderOnly {
        bail!(
            "{}: holds a {:?} model; this command needs a decoder_only (language) model",
            dir.display(),
            meta.family
        );
    }
    let tokenizer = Tokenizer::load(dir.join(TOKENIZER_FILE))?;
    let cfg: DecoderOnlyConfig = transformer::models::read_config(&dir.join(CONFIG_FILE))?;
    if cfg.vocab_size != tokenizer.vocab_size() {
        bail!(
            "{}: the model's vocab_size is {} but {TOKENIZER_FILE} has {} tokens",
            dir.display(),
            cfg.vocab_size,
            tokenizer.vocab_size()
        );
    }
    let (model, _vs) =
        DecoderOnly::load(&dir, device).with_context(|| format!("loading {}", dir.display()))?;
    Ok(LoadedLm {
        dir,
        model,
        tokenizer,
    })
}
