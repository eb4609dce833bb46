//! Sentence embeddings of a Hugging Face BERT checkpoint, computed exactly as
//! sentence-transformers computes them (all-MiniLM-L6-v2 and other BERT-based models).
//!
//! The model directory is read by [`import::hf_bert`](crate::import::hf_bert): `config.json`,
//! `model.safetensors` or `pytorch_model.bin`, and `tokenizer.json`. The sentence-transformers
//! files are honoured when present: `modules.json` (Transformer → Pooling → optional
//! Normalize), the pooling module's `config.json` (`1_Pooling/config.json`) and
//! `sentence_bert_config.json` (`max_seq_length`, `do_lower_case`).
//!
//! Dimension letters: `N` texts, `B` batch, `T` tokens, `E` hidden size.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use tokenizers::{PostProcessor, TruncationDirection};

use crate::data::{HfTokenizer, Tokenizer};
use crate::import::hf_bert::{
    has_pooler, map_state_dict, read_weights, HfBertConfig, HF_CONFIG_FILE, HF_PYTORCH_FILE,
    HF_SAFETENSORS_FILE, HF_TOKENIZER_FILE,
};
use crate::models::encoder_only::pool;
use crate::models::{config_from_json, EncoderOnly, Pooling};
use crate::nn::{autocast, AttnMask, Precision, VarStore};
use crate::{Error, Result};

/// sentence-transformers' list of modules (Transformer, Pooling, Normalize).
pub const ST_MODULES_FILE: &str = "modules.json";
/// sentence-transformers' `max_seq_length` and `do_lower_case`.
pub const ST_BERT_CONFIG_FILE: &str = "sentence_bert_config.json";

// ---------------------------------------------------------------------------------------------
// sentence-transformers settings
// ---------------------------------------------------------------------------------------------

/// How a sentence-transformers model turns token states into a sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceConfig {
    /// Mean over the non-padding tokens, or the [CLS] token (`1_Pooling/config.json`).
    pub pooling: Pooling,
    /// L2-normalize the pooled vector (a `Normalize` module in `modules.json`).
    pub normalize: bool,
    /// Inputs longer than this many tokens (special tokens included) are truncated
    /// (`sentence_bert_config.json`'s `max_seq_length`; else `max_position_embeddings`).
    pub max_seq_length: usize,
    /// Lowercase texts before tokenizing (`sentence_bert_config.json`; the tokenizer's own
    /// normalizer may lowercase as well).
    pub do_lower_case: bool,
}

#[derive(Deserialize)]
struct StModule {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct StBertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// `1_Pooling/config.json`: one boolean per mode (older files), or `pooling_mode` (newer).
#[derive(Deserialize)]
struct StPoolingConfig {
    #[serde(default)]
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode: Option<String>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    config_from_json(&text, &path.display().to_string())
}

fn read_pooling(path: &Path, hidden_size: usize) -> Result<Pooling> {
    let p: StPoolingConfig = read_json_file(path)?;
    let shown = path.display();
    if let Some(d) = p.word_embedding_dimension {
        if d != hidden_size {
            return Err(Error::Config(format!(
                "{shown}: word_embedding_dimension is {d}, but the model's hidden_size is \
                 {hidden_size}"
            )));
        }
    }
    if let Some(mode) = &p.pooling_mode {
        return match mode.as_str() {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            other => Err(Error::Config(format!(
                "{shown}: pooling_mode {other:?} is not supported (supported: \"mean\", \"cls\")"
            ))),
        };
    }
    let modes = [
        ("pooling_mode_cls_token", p.pooling_mode_cls_token),
        ("pooling_mode_mean_tokens", p.pooling_mode_mean_tokens),
        ("pooling_mode_max_tokens", p.pooling_mode_max_tokens),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            p.pooling_mode_mean_sqrt_len_tokens,
        ),
        (
            "pooling_mode_weightedmean_tokens",
            p.pooling_mode_weightedmean_tokens,
        ),
        ("pooling_mode_lasttoken", p.pooling_mode_lasttoken),
    ];
    let on: Vec<&str> = modes.iter().filter(|m| m.1).map(|m| m.0).collect();
    match on.as_slice() {
        ["pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
        ["pooling_mode_cls_token"] => Ok(Pooling::Cls),
        [] => Err(Error::Config(format!("{shown}: no pooling mode is set"))),
        _ => Err(Error::Config(format!(
            "{shown}: pooling {} is not supported (exactly one of pooling_mode_mean_tokens, \
             pooling_mode_cls_token must be true)",
            on.join(" + ")
        ))),
    }
}

impl SentenceConfig {
    /// The sentence-transformers settings of `dir`, or its defaults for a plain Hugging Face
    /// model (mean pooling, no normalization, the full position table, no lowercasing).
    /// `model_dir` is the Transformer module's directory ([`transformer_dir`]).
    pub fn read(dir: &Path, model_dir: &Path, hf: &HfBertConfig) -> Result<SentenceConfig> {
        let mut cfg = SentenceConfig {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: hf.max_position_embeddings,
            do_lower_case: false,
        };
        let modules_path = dir.join(ST_MODULES_FILE);
        if modules_path.is_file() {
            let modules: Vec<StModule> = read_json_file(&modules_path)?;
            let shown = modules_path.display();
            for (i, m) in modules.iter().enumerate() {
                let kind = m.kind.rsplit('.').next().unwrap_or("");
                match (i, kind) {
                    (0, _) => {} // checked by transformer_dir
                    (_, "Pooling") => {
                        cfg.pooling =
                            read_pooling(&dir.join(&m.path).join("config.json"), hf.hidden_size)?
                    }
                    (_, "Normalize") => cfg.normalize = true,
                    _ => {
                        return Err(Error::Config(format!(
                            "{shown}: module {:?} is not supported (supported: Transformer, \
                             Pooling, Normalize)",
                            m.kind
                        )))
                    }
                }
            }
        }
        for st in [
            model_dir.join(ST_BERT_CONFIG_FILE),
            dir.join(ST_BERT_CONFIG_FILE),
        ] {
            if st.is_file() {
                let c: StBertConfig = read_json_file(&st)?;
                if let Some(n) = c.max_seq_length {
                    cfg.max_seq_length = n;
                }
                cfg.do_lower_case = c.do_lower_case;
                break;
            }
        }
        if cfg.max_seq_length > hf.max_position_embeddings {
            // sentence-transformers would fail on such inputs inside the position lookup.
            cfg.max_seq_length = hf.max_position_embeddings;
        }
        Ok(cfg)
    }
}

/// The directory of the Transformer module: `dir` itself, or the subfolder that the first
/// entry of `modules.json` names (older sentence-transformers models use `0_Transformer/`).
pub fn transformer_dir(dir: &Path) -> Result<PathBuf> {
    let modules_path = dir.join(ST_MODULES_FILE);
    if !modules_path.is_file() {
        return Ok(dir.to_path_buf());
    }
    let modules: Vec<StModule> = read_json_file(&modules_path)?;
    match modules.first() {
        Some(m) if m.kind.rsplit('.').next() == Some("Transformer") => Ok(dir.join(&m.path)),
        Some(m) => Err(Error::Config(format!(
            "{}: the first module is {:?}; expected a Transformer",
            modules_path.display(),
            m.kind
        ))),
        None => Err(Error::Config(format!(
            "{}: no modules listed",
            modules_path.display()
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// Options of [`HfBert::embed`]; [`HfBert::embed_options`] gives the model's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedOptions {
    /// Mean over the text's tokens ([CLS] and [SEP] included, padding excluded) or [CLS].
    pub pooling: Pooling,
    /// L2-normalize each embedding.
    pub normalize: bool,
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Tokens per text after truncation, [CLS] and [SEP] included.
    pub max_length: usize,
    /// Lowercase texts before tokenizing (sentence-transformers' `do_lower_case`).
    pub do_lower_case: bool,
    /// The precision of the encoder's matrix products (`kernels::bf16`): f32, or bf16 inputs
    /// with f32 accumulation (AMX where the CPU has it). Norms, softmax, pooling and the
    /// output stay f32.
    pub precision: Precision,
}

/// A Hugging Face BERT checkpoint loaded into our [`EncoderOnly`], with its tokenizer and
/// sentence-transformers settings.
pub struct HfBert {
    /// The network (the pooler is loaded when the checkpoint has one; sentence embeddings do
    /// not use it, as in sentence-transformers). Built for inference: its forward passes record
    /// no autograd graph ([`VarStore::for_inference`]).
    pub model: EncoderOnly,
    /// Its parameters.
    pub vars: VarStore,
    /// The Hugging Face configuration it was built from.
    pub hf_config: HfBertConfig,
    /// The sentence-transformers settings (or their defaults).
    pub sentence: SentenceConfig,
    /// The file the weights were read from.
    pub weights_file: PathBuf,
    /// `tokenizer.json`, with its own truncation and padding switched off: [`HfBert::embed`]
    /// truncates to the requested length and pads per batch.
    tokenizer: tokenizers::Tokenizer,
    /// Special tokens the post-processor adds to one sequence ([CLS] and [SEP]: 2).
    n_special: usize,
    pad_id: u32,
}

impl HfBert {
    /// Load a model directory (see the module docs). Errors name the file at fault.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "{}: not a directory (expected a Hugging Face model directory with \
                 {HF_CONFIG_FILE}, {HF_SAFETENSORS_FILE} or {HF_PYTORCH_FILE}, and \
                 {HF_TOKENIZER_FILE})",
                dir.display()
            )));
        }
        let model_dir = transformer_dir(dir)?;
        let config_path = model_dir.join(HF_CONFIG_FILE);
        let hf_config = read_hf_config(&config_path)?;
        let config_shown = config_path.display().to_string();
        let sentence = SentenceConfig::read(dir, &model_dir, &hf_config)?;

        let tok_path = model_dir.join(HF_TOKENIZER_FILE);
        if !tok_path.is_file() {
            return Err(Error::msg(format!(
                "{}: missing {HF_TOKENIZER_FILE} (a Hugging Face fast tokenizer file; \
                 vocab.txt alone is not read)",
                model_dir.display()
            )));
        }
        let hf_tok = match Tokenizer::load(&tok_path)? {
            Tokenizer::Hf(t) => t,
            Tokenizer::Char(_) => {
                return Err(Error::msg(format!(
                    "{}: a character-level tokenizer of this library, not a Hugging Face \
                     tokenizer.json",
                    tok_path.display()
                )))
            }
        };
        let n_tok = hf_tok.vocab_size();
        if n_tok != hf_config.vocab_size {
            return Err(Error::msg(format!(
                "{} has a vocabulary of {n_tok} tokens, but {config_shown} says vocab_size {} \
                 (the tokenizer does not belong to this model)",
                tok_path.display(),
                hf_config.vocab_size
            )));
        }
        let (tokenizer, n_special, pad_id) = prepare_tokenizer(&hf_tok)?;

        let (hf_weights, weights_file) = read_weights(&model_dir)?;
        let cfg =
            hf_config.to_encoder_only(has_pooler(&hf_weights), sentence.pooling, &config_shown)?;
        // Inference views: forward passes record no autograd graph (see for_inference).
        let vars = VarStore::new(DType::F32, device, cfg.init, 0)
            .with_n_layers(cfg.n_layers)
            .for_inference();
        let model = EncoderOnly::new(&cfg, &vars.root())?;
        let params: Vec<(String, Vec<usize>)> = vars
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        let source = weights_file.display().to_string();
        let mapped = map_state_dict(&hf_weights, &params, &source)?;
        vars.load_map(&mapped, &source)?;
        Ok(HfBert {
            model,
            vars,
            hf_config,
            sentence,
            weights_file,
            tokenizer,
            n_special,
            pad_id,
        })
    }

    /// The model's defaults: its sentence-transformers settings, 32 texts per batch.
    pub fn embed_options(&self) -> EmbedOptions {
        EmbedOptions {
            pooling: self.sentence.pooling,
            normalize: self.sentence.normalize,
            batch_size: 32,
            max_length: self.sentence.max_seq_length,
            do_lower_case: self.sentence.do_lower_case,
            precision: Precision::F32,
        }
    }

    /// Width of the embeddings (E).
    pub fn dim(&self) -> usize {
        self.hf_config.hidden_size
    }

    /// Token ids of one text as sentence-transformers makes them: blanks stripped, lowercased
    /// when configured, the tokenizer's [CLS] ... [SEP] added, and the text's tokens cut so
    /// that the whole fits in `max_length` (tokenizers' `longest_first` truncation).
    pub fn tokenize(&self, text: &str, opts: &EmbedOptions) -> Result<Vec<u32>> {
        self.check_options(opts)?;
        let lowered;
        let mut text = text.trim();
        if opts.do_lower_case {
            lowered = text.to_lowercase();
            text = &lowered;
        }
        let tok_err = |e| Error::msg(format!("tokenizing {text:?}: {e}"));
        let mut enc = self.tokenizer.encode_fast(text, false).map_err(tok_err)?;
        enc.truncate(
            opts.max_length - self.n_special,
            0,
            TruncationDirection::Right,
        );
        let enc = self
            .tokenizer
            .post_process(enc, None, true)
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Check `opts` against the model: `max_length` leaves room for a token besides [CLS] and
    /// [SEP] and fits the position table, `batch_size` is positive.
    pub fn check_options(&self, opts: &EmbedOptions) -> Result<()> {
        let max = self.hf_config.max_position_embeddings;
        if opts.max_length <= self.n_special || opts.max_length > max {
            return Err(Error::Config(format!(
                "max_length must be in {}..={max} (the special tokens need {}, the position \
                 table has {max} rows), got {}",
                self.n_special + 1,
                self.n_special,
                opts.max_length
            )));
        }
        if opts.batch_size == 0 {
            return Err(Error::Config("batch_size must be > 0, got 0".into()));
        }
        Ok(())
    }

    /// Sentence embeddings of `texts`, in order.
    ///
    /// Texts are tokenized ([`HfBert::tokenize`]), sorted by length so that each batch holds
    /// texts of similar lengths (as sentence-transformers does), padded to the longest of
    /// their batch with a key-padding mask, encoded, pooled over their own tokens, and
    /// L2-normalized when asked.
    ///
    /// # Shapes
    /// `texts`: N → (N, E), f32
    pub fn embed(&self, texts: &[&str], opts: &EmbedOptions) -> Result<Tensor> {
        self.check_options(opts)?;
        let device = self.vars.device();
        let e = self.dim();
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, e), DType::F32, device)?);
        }
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenize(t, opts))
            .collect::<Result<_>>()?;
        // Longest first, stable so that equal lengths keep their input order.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut pooled: Vec<Tensor> = Vec::with_capacity(texts.len().div_ceil(opts.batch_size));
        for batch in order.chunks(opts.batch_size) {
            pooled.push(self.embed_batch(batch.iter().map(|&i| &ids[i][..]), opts)?);
        }
        let sorted = Tensor::cat(&pooled, 0)?.contiguous()?; // (N, E) in `order`
                                                             // Row k of `sorted` is text order[k]: invert the permutation.
        let mut inverse = vec![0u32; order.len()];
        for (k, &i) in order.iter().enumerate() {
            inverse[i] = k as u32;
        }
        let inverse = Tensor::from_vec(inverse, texts.len(), device)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }

    /// # Shapes
    /// B id sequences → (B, E)
    fn embed_batch<'a>(
        &self,
        seqs: impl ExactSizeIterator<Item = &'a [u32]> + Clone,
        opts: &EmbedOptions,
    ) -> Result<Tensor> {
        let device = self.vars.device();
        let b = seqs.len();
        let lengths: Vec<usize> = seqs.clone().map(<[u32]>::len).collect();
        // At least one position, so that a tokenizer without special tokens and an empty text
        // still make a valid (fully masked, zero-pooled) row.
        let t = lengths.iter().copied().max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(b * t);
        for s in seqs {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(self.pad_id, t - s.len()));
        }
        let ids = Tensor::from_vec(flat, (b, t), device)?; // (B, T)
        let padding = AttnMask::from_lengths(&lengths, t, device)?; // (B, T), 1 = padding
        let hidden = autocast(opts.precision, || {
            self.model.forward(&ids, None, Some(&padding), false)
        })?; // (B, T, E)
        let pooled = pool(&hidden, Some(&padding), opts.pooling)?; // (B, E)
        let pooled = if opts.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        // NaN would reach the JSON output as `null` with exit 0.
        if !crate::validate::all_finite(&pooled)? {
            return Err(Error::NonFinite {
                what: "sentence embedding".into(),
                tensor: "the pooled embeddings".into(),
                advice: "the model's weights or this input overflow; check the model files".into(),
            });
        }
        // A no-op with the inference store of `load`; with variables (a model built some
        // other way) it keeps one batch's graph of activations from outliving the batch.
        Ok(pooled.detach())
    }
}

/// `x / max(‖x‖₂, 1e-12)` per row, as `torch.nn.functional.normalize` (sentence-transformers'
/// `Normalize` module).
///
/// # Shapes
/// `x`: (B, E) → (B, E)
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?; // (B, 1)
    x.broadcast_div(&norm)
}

fn read_hf_config(path: &Path) -> Result<HfBertConfig> {
    if !path.is_file() {
        return Err(Error::msg(format!(
            "{}: missing (a Hugging Face model directory needs {HF_CONFIG_FILE}, \
             {HF_SAFETENSORS_FILE} or {HF_PYTORCH_FILE}, and {HF_TOKENIZER_FILE})",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    HfBertConfig::from_json(&text, &path.display().to_string())
}

/// A copy of the tokenizer without its own truncation and padding (MiniLM's `tokenizer.json`
/// pads and truncates everything to 128, which sentence-transformers overrides per call),
/// the number of special tokens it adds to one sequence, and the padding id.
fn prepare_tokenizer(t: &HfTokenizer) -> Result<(tokenizers::Tokenizer, usize, u32)> {
    let mut tok = t.inner().clone();
    tok.with_truncation(None)
        .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
    tok.with_padding(None);
    let n_special = tok
        .get_post_processor()
        .map_or(0, |p| p.added_tokens(false));
    // Padded positions are masked out, so the pad id only has to be a valid id.
    let pad_id = t
        .inner()
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tok.token_to_id("[PAD]"))
        .unwrap_or(0);
    Ok((tok, n_special, pad_id))
}
