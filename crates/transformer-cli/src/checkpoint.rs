//! Loading what `train` wrote, with errors that name the directory and the missing piece.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use transformer::data::{Seq2SeqIds, Tokenizer};
use transformer::decode::SpecialTokens;
use transformer::import::gguf::WeightFormat;
use transformer::models::{CausalLm, LoadedModel, Seq2Seq, CONFIG_FILE, WEIGHTS_FILE};
use transformer::pipelines::chat::ChatTemplate;
use transformer::train::checkpoint::{
    read_meta, require_files, resolve_model_dir, SRC_TOKENIZER_FILE, TOKENIZER_FILE,
};

/// Which language model to load, and how to hold its weights.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A GGUF file (llama architecture), a checkpoint directory, or a run directory (its
    /// best/ checkpoint is used).
    #[arg(long, visible_alias = "checkpoint")]
    pub model: PathBuf,
    /// The weights in memory: `stored` keeps a GGUF file's quantized matrices quantized
    /// (candle's quantized matmul; f32 for our checkpoints); `f32` / `bf16` dequantize into
    /// that dtype at load.
    #[arg(long, value_enum, default_value_t = WeightDtype::Stored)]
    pub dtype: WeightDtype,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    Stored,
    F32,
    Bf16,
}

impl WeightDtype {
    fn format(self) -> WeightFormat {
        match self {
            WeightDtype::Stored => WeightFormat::AsStored,
            WeightDtype::F32 => WeightFormat::Dense(DType::F32),
            WeightDtype::Bf16 => WeightFormat::Dense(DType::BF16),
        }
    }
}

/// A causal language model with its tokenizer.
pub struct LoadedLm {
    pub dir: PathBuf,
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    /// The chat template of an instruct model, when the file has one.
    pub chat: Option<ChatTemplate>,
    /// Prepended to every prompt (models trained with it: Gemma).
    pub bos: Option<u32>,
    /// Tokens that end a generation (EOS, end-of-turn); none for our own checkpoints.
    pub stop: Vec<u32>,
}

impl LoadedLm {
    /// A text's ids as the model reads them: the BOS token first when the model wants one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(
            self.tokenizer
                .encode(text)
                .context("the prompt cannot be encoded with this model's tokenizer")?,
        );
        Ok(ids)
    }
}

/// The model of a checkpoint directory, through the family its `meta.json` names.
fn load_model(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    // A diverged run's weights decode to garbage (NaN logits): load_model refuses them by name.
    transformer::train::checkpoint::load_model(dir, device, dtype)
        .with_context(|| format!("loading {}", dir.display()))
}

/// Load a language model: a checkpoint directory, a run directory, or a GGUF file (its
/// weights in `dtype`, its tokenizer from the metadata).
pub fn load_lm(args: &ModelArgs, device: &Device) -> Result<LoadedLm> {
    let path = args.model.as_path();
    let format = args.dtype.format();
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let mut file = transformer::import::gguf::GgufFile::open(path)?;
        let tokenizer = file
            .tokenizer()
            .with_context(|| format!("{}: tokenizer", path.display()))?;
        let chat = match file.chat_template()? {
            None => None,
            Some(source) => {
                let special = |key: &str| -> Result<String> {
                    Ok(file.special_token(key)?.unwrap_or_default())
                };
                let eos = special("tokenizer.ggml.eos_token_id")?;
                let template =
                    ChatTemplate::new(&source, &special("tokenizer.ggml.bos_token_id")?, &eos)
                        .with_context(|| format!("{}: tokenizer.chat_template", path.display()))?;
                Some(template)
            }
        };
        let bos = if file.add_bos_token()? {
            file.bos_token_id()?
        } else {
            None
        };
        let stop = file.stop_token_ids()?;
        let (model, _vs, _cfg) = file.decoder_only(device, format)?;
        return Ok(LoadedLm {
            dir: path.to_path_buf(),
            model: Box::new(model),
            tokenizer,
            chat,
            bos,
            stop,
        });
    }
    let dir = resolve_model_dir(path)?;
    require_files(&dir, &[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])?;
    let family = read_meta(&dir)?.family;
    let tokenizer = Tokenizer::load(dir.join(TOKENIZER_FILE))?;
    let model = load_model(&dir, device, format.dtype())?
        .model
        .into_causal_lm("this command")
        .with_context(|| {
            format!(
                "{}: holds a {family} model; this command needs a language model \
                 (decoder_only)",
                dir.display()
            )
        })?;
    if model.vocab_size() != tokenizer.vocab_size() {
        bail!(
            "{}: the model's vocab_size is {} but {TOKENIZER_FILE} has {} tokens",
            dir.display(),
            model.vocab_size(),
            tokenizer.vocab_size()
        );
    }
    Ok(LoadedLm {
        dir,
        model,
        tokenizer,
        chat: None,
        bos: None,
        stop: Vec::new(),
    })
}

/// A sequence-to-sequence (translation) model with its tokenizers.
pub struct LoadedTranslator {
    pub dir: PathBuf,
    pub model: Box<dyn Seq2Seq>,
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
    let family = read_meta(&dir)?.family;
    let model = load_model(&dir, device, DType::F32)?
        .model
        .into_seq2seq("this command")
        .with_context(|| {
            format!(
                "{}: holds a {family} model; this command needs a translation model \
                 (encoder_decoder)",
                dir.display()
            )
        })?;
    let tgt_tokenizer = Tokenizer::load(dir.join(TOKENIZER_FILE))?;
    let src_path = dir.join(SRC_TOKENIZER_FILE);
    let src_tokenizer = if src_path.is_file() {
        Tokenizer::load(&src_path)?
    } else {
        tgt_tokenizer.clone()
    };
    for (side, model_v, tok) in [
        ("source", model.src_vocab_size(), &src_tokenizer),
        ("target", model.tgt_vocab_size(), &tgt_tokenizer),
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
    Ok(LoadedTranslator {
        dir,
        model,
        src_tokenizer,
        tgt_tokenizer,
        ids: ids.into(),
    })
}
