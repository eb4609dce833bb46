//! Loading what `train` wrote, with errors that name the directory and the missing piece.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use transformer::data::{Seq2SeqIds, Tokenizer};
use transformer::decode::SpecialTokens;
use transformer::models::{
    DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig, CONFIG_FILE, WEIGHTS_FILE,
};
use transformer::train::checkpoint::{
    read_meta, require_files, resolve_model_dir, SRC_TOKENIZER_FILE, TOKENIZER_FILE,
};
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

/// An encoder-decoder (translation) model with its tokenizers.
pub struct LoadedTranslator {
    pub dir: PathBuf,
    pub model: EncoderDecoder,
    /// Encodes the source side (the same as `tgt_tokenizer` with a joint vocabulary).
    pub src_tokenizer: Tokenizer,
    /// Decodes the target side.
    pub tgt_tokenizer: Tokenizer,
    pub ids: SpecialTokens,
}

/// Load an encoder-decoder checkpoint (a checkpoint directory or a run directory): the model,
/// `tokenizer.json` (target, or both sides) and `src_tokenizer.json` when the vocabularies are
/// separate.
pub fn load_translator(path: &Path, device: &Device) -> Result<LoadedTranslator> {
    let dir = resolve_model_dir(path)?;
    require_files(&dir, &[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])?;
    let meta = read_meta(&dir)?;
    if meta.family != Family::EncoderDecoder {
        bail!(
            "{}: holds a {:?} model; this command needs an encoder_decoder (translation) model",
            dir.display(),
            meta.family
        );
    }
    let tgt_tokenizer = Tokenizer::load(dir.join(TOKENIZER_FILE))?;
    let src_path = dir.join(SRC_TOKENIZER_FILE);
    let src_tokenizer = if src_path.is_file() {
        Tokenizer::load(&src_path)?
    } else {
        tgt_tokenizer.clone()
    };
    let cfg: EncoderDecoderConfig = transformer::models::read_config(&dir.join(CONFIG_FILE))?;
    for (side, model_v, tok) in [
        ("source", cfg.src_vocab_size, &src_tokenizer),
        ("target", cfg.tgt_vocab_size, &tgt_tokenizer),
    ] {
        if model_v != tok.vocab_size() {
            bail!(
                "{}: the model's {side} vocabulary has {model_v} tokens but its tokenizer has {}",
                dir.display(),
                tok.vocab_size()
            );
        }
    }
    let ids = Seq2SeqIds::from_tokenizer(&tgt_tokenizer)
        .with_context(|| format!("{}: {TOKENIZER_FILE}", dir.display()))?;
    let (model, _vs) =
        EncoderDecoder::load(&dir, device).with_context(|| format!("loading {}", dir.display()))?;
    Ok(LoadedTranslator {
        dir,
        model,
        src_tokenizer,
        tgt_tokenizer,
        ids: ids.into(),
    })
}
