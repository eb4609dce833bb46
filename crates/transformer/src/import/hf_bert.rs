//! Hugging Face BERT checkpoints → [`EncoderOnly`], and sentence embeddings computed exactly as
//! sentence-transformers computes them (all-MiniLM-L6-v2 and other BERT-based models).
//!
//! A model directory holds `config.json` (`"model_type": "bert"`), `model.safetensors` (or, if
//! absent, `pytorch_model.bin` in torch's zip format, read by candle's pickle reader) and
//! `tokenizer.json`. The sentence-transformers files are honoured when present: `modules.json`
//! (Transformer → Pooling → optional Normalize), the pooling module's `config.json`
//! (`1_Pooling/config.json`) and `sentence_bert_config.json` (`max_seq_length`,
//! `do_lower_case`).
//!
//! Parameter names (Hugging Face names with or without the `bert.` prefix of `BertFor*`
//! checkpoints; `N` is the layer):
//!
//! | Hugging Face                                          | ours                              |
//! |-------------------------------------------------------|-----------------------------------|
//! | `embeddings.word_embeddings.weight`                   | `embed.tok.weight`                |
//! | `embeddings.position_embeddings.weight`               | `embed.pos.weight`                |
//! | `embeddings.token_type_embeddings.weight`             | `embed.type.weight`               |
//! | `embeddings.LayerNorm.{weight,bias}` (`gamma`,`beta`) | `embed.norm.{weight,bias}`        |
//! | `encoder.layer.N.attention.self.{query,key,value}.*`  | `layers.N.self_attn.in_proj.*` (q, k, v stacked along dim 0) |
//! | `encoder.layer.N.attention.output.dense.*`            | `layers.N.self_attn.out_proj.*`   |
//! | `encoder.layer.N.attention.output.LayerNorm.*`        | `layers.N.norm1.*`                |
//! | `encoder.layer.N.intermediate.dense.*`                | `layers.N.ff.linear1.*`           |
//! | `encoder.layer.N.output.dense.*`                      | `layers.N.ff.linear2.*`           |
//! | `encoder.layer.N.output.LayerNorm.*`                  | `layers.N.norm2.*`                |
//! | `pooler.dense.*`                                      | `pooler.*`                        |
//!
//! `embeddings.position_ids` buffers and task heads outside the BERT body (`cls.*` MLM/NSP
//! heads, `classifier.*`, ...) are ignored; any other tensor of the body that the model does
//! not use is an error, as are missing tensors and wrong shapes (named by their Hugging Face
//! name, with the expected and the actual shape).
//!
//! Dimension letters: `N` texts, `B` batch, `T` tokens, `E` hidden size.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use tokenizers::{PostProcessor, TruncationDirection};

use crate::data::{HfTokenizer, Tokenizer};
use crate::models::encoder_only::pool;
use crate::models::{config_from_json, EncoderOnly, EncoderOnlyConfig, Pooling};
use crate::nn::{Activation, AttnMask, InitScheme, VarStore};
use crate::{Error, Result};

/// File names of a Hugging Face / sentence-transformers model directory.
pub const HF_CONFIG_FILE: &str = "config.json";
pub const HF_SAFETENSORS_FILE: &str = "model.safetensors";
pub const HF_PYTORCH_FILE: &str = "pytorch_model.bin";
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";
pub const ST_MODULES_FILE: &str = "modules.json";
pub const ST_BERT_CONFIG_FILE: &str = "sentence_bert_config.json";

/// The fields of a Hugging Face `BertConfig` (`config.json`) that shape the network; the many
/// other fields (dropout, `architectures`, `transformers_version`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HfBertConfig {
    /// Vocabulary size (rows of `word_embeddings`).
    pub vocab_size: usize,
    /// Width of every layer (E).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Inner width of the feed-forward blocks.
    pub intermediate_size: usize,
    /// Feed-forward non-linearity: `gelu` (exact), `gelu_new` / `gelu_pytorch_tanh` (tanh
    /// approximation) or `relu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Rows of the learned position table: the longest input.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Number of segment types.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states (training only; kept so that fine-tuning starts from BERT's).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Only `absolute` positions are supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}

impl HfBertConfig {
    /// Read `config.json`, which must say `"model_type": "bert"`; `path` names it in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|source| Error::Json {
                what: path.to_string(),
                source,
            })?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("bert") => {}
            Some(other) => {
                return Err(Error::Config(format!(
                    "{path}: model_type is {other:?}, but only \"bert\" checkpoints can be \
                     loaded (BERT, MiniLM, all-MiniLM-L6-v2, ...)"
                )))
            }
            None => {
                return Err(Error::Config(format!(
                    "{path}: no \"model_type\" field; expected \"model_type\": \"bert\""
                )))
            }
        }
        config_from_json(text, path)
    }

    /// Our configuration of the same network. `pooler` says whether the checkpoint has BERT's
    /// pooler; `pooling` is the sentence pooling the model should use.
    pub fn to_encoder_only(
        &self,
        pooler: bool,
        pooling: Pooling,
        path: &str,
    ) -> Result<EncoderOnlyConfig> {
        let activation = match self.hidden_act.as_str() {
            // transformers' "gelu" is the exact erf form (GELUActivation).
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::Config(format!(
                    "{path}: field `hidden_act` is {other:?}; supported: \"gelu\", \
                     \"gelu_new\", \"gelu_pytorch_tanh\", \"relu\""
                )))
            }
        };
        if let Some(kind) = &self.position_embedding_type {
            if kind != "absolute" {
                return Err(Error::Config(format!(
                    "{path}: field `position_embedding_type` is {kind:?}; only \"absolute\" \
                     is supported"
                )));
            }
        }
        let cfg = EncoderOnlyConfig {
            vocab_size: self.vocab_size,
            max_len: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            d_model: self.hidden_size,
            n_heads: self.num_attention_heads,
            n_layers: self.num_hidden_layers,
            d_ff: self.intermediate_size,
            dropout: self.hidden_dropout_prob,
            activation,
            norm_first: false,
            layer_norm_eps: self.layer_norm_eps,
            embedding_norm: true,
            pooling,
            pooler,
            n_classes: None,
            init: InitScheme::Gpt2,
        };
        cfg.validate().map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{path}: {msg}")),
            other => other,
        })?;
        Ok(cfg)
    }
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// Where one of our parameters comes from in a Hugging Face state dict (names without prefix).
enum HfSource {
    /// One tensor; the alternatives are tried in order (`LayerNorm.weight` or `.gamma`).
    One(Vec<String>),
    /// Query, key and value stacked along dim 0 into our packed `in_proj`.
    Qkv([String; 3]),
}

/// The Hugging Face tensor(s) holding our parameter `ours`, or None for a parameter that no
/// BERT checkpoint has.
fn hf_source(ours: &str) -> Option<HfSource> {
    let one = |n: String| Some(HfSource::One(vec![n]));
    // LayerNorm parameters: `weight`/`bias`, or `gamma`/`beta` in TensorFlow-era checkpoints.
    let norm = |module: &str, leaf: &str| {
        let old = if leaf == "weight" { "gamma" } else { "beta" };
        Some(HfSource::One(vec![
            format!("{module}.LayerNorm.{leaf}"),
            format!("{module}.LayerNorm.{old}"),
        ]))
    };
    let parts: Vec<&str> = ours.split('.').collect();
    match parts.as_slice() {
        ["embed", "tok", "weight"] => one("embeddings.word_embeddings.weight".into()),
        ["embed", "pos", "weight"] => one("embeddings.position_embeddings.weight".into()),
        ["embed", "type", "weight"] => one("embeddings.token_type_embeddings.weight".into()),
        ["embed", "norm", leaf] => norm("embeddings", leaf),
        ["pooler", leaf] => one(format!("pooler.dense.{leaf}")),
        ["layers", n, rest @ ..] => {
            let l = format!("encoder.layer.{n}");
            match rest {
                ["self_attn", "in_proj", leaf] => Some(HfSource::Qkv(
                    ["query", "key", "value"].map(|p| format!("{l}.attention.self.{p}.{leaf}")),
                )),
                ["self_attn", "out_proj", leaf] => {
                    one(format!("{l}.attention.output.dense.{leaf}"))
                }
                ["norm1", leaf] => norm(&format!("{l}.attention.output"), leaf),
                ["ff", "linear1", leaf] => one(format!("{l}.intermediate.dense.{leaf}")),
                ["ff", "linear2", leaf] => one(format!("{l}.output.dense.{leaf}")),
                ["norm2", leaf] => norm(&format!("{l}.output"), leaf),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The prefix of the BERT body in a state dict: `bert.` for `BertFor*` checkpoints, or none.
fn body_prefix(hf: &HashMap<String, Tensor>) -> &'static str {
    if hf.keys().any(|k| k.starts_with("bert.embeddings.")) {
        "bert."
    } else {
        ""
    }
}

/// Whether `name` (without prefix) belongs to the BERT body rather than to a task head.
fn in_body(name: &str) -> bool {
    ["embeddings.", "encoder.", "pooler."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Rename a Hugging Face BERT state dict into our parameter names, for the parameters
/// `params` (name, shape) of the model that will receive it. Strict: every parameter must be
/// found with its shape, and every tensor of the BERT body must be used; errors name the
/// Hugging Face tensor, the expected and the actual shape. Tensors are converted to f32.
pub fn map_state_dict(
    hf: &HashMap<String, Tensor>,
    params: &[(String, Vec<usize>)],
    source_name: &str,
) -> Result<HashMap<String, Tensor>> {
    let err = |msg: String| Error::Weights {
        source_name: source_name.to_string(),
        msg,
    };
    let prefix = body_prefix(hf);
    let mut used: HashSet<String> = HashSet::new();
    let mut missing: Vec<String> = Vec::new();
    // Look up one tensor by its unprefixed name(s) and check its shape.
    let mut fetch = |names: &[String], expected: &[usize], used: &mut HashSet<String>| {
        let Some((full, t)) = names.iter().find_map(|n| {
            let full = format!("{prefix}{n}");
            hf.get(&full).map(|t| (full, t))
        }) else {
            missing.push(format!("{prefix}{}", names[0]));
            return Ok(None);
        };
        if t.dims() != expected {
            return Err(err(format!(
                "tensor {full}: expected shape {expected:?}, got {:?}",
                t.dims()
            )));
        }
        used.insert(full);
        Ok(Some(t.to_dtype(DType::F32)?))
    };
    let mut out = HashMap::new();
    for (ours, shape) in params {
        let source = hf_source(ours).ok_or_else(|| {
            err(format!(
                "the model has a parameter {ours} that BERT checkpoints do not hold"
            ))
        })?;
        match source {
            HfSource::One(names) => {
                if let Some(t) = fetch(&names, shape, &mut used)? {
                    out.insert(ours.clone(), t);
                }
            }
            HfSource::Qkv(names) => {
                // in_proj is (3E, E) / (3E): each of q, k, v is a third of dim 0.
                let mut part_shape = shape.clone();
                part_shape[0] /= 3;
                let mut parts = Vec::with_capacity(3);
                for n in &names {
                    if let Some(t) = fetch(std::slice::from_ref(n), &part_shape, &mut used)? {
                        parts.push(t);
                    }
                }
                if parts.len() == 3 {
                    out.insert(ours.clone(), Tensor::cat(&parts, 0)?);
                }
            }
        }
    }
    if !missing.is_empty() {
        return Err(err(format!("missing tensors: {}", missing.join(", "))));
    }
    let mut unexpected: Vec<&str> = hf
        .keys()
        .filter(|k| !used.contains(*k))
        .filter(|k| {
            k.strip_prefix(prefix)
                .is_some_and(|n| in_body(n) && n != "embeddings.position_ids")
        })
        .map(|k| k.as_str())
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(err(format!(
            "tensors the model (as config.json describes it) does not use: {}",
            unexpected.join(", ")
        )));
    }
    Ok(out)
}

/// Read the weights of a model directory: `model.safetensors`, else `pytorch_model.bin`.
/// Returns the tensors and the file they came from.
pub fn read_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, PathBuf)> {
    let st = dir.join(HF_SAFETENSORS_FILE);
    if st.is_file() {
        let bad = |e: candle_core::Error| Error::Weights {
            source_name: st.display().to_string(),
            msg: format!("cannot read safetensors: {e}"),
        };
        // Mapped rather than read: reading copied the whole file into a fresh buffer first,
        // and that page faulting and copying was most of `embed`'s start-up time.
        // SAFETY: the mapping is only read, and dropped before this function returns; a model
        // file changed by another process while it loads is not supported.
        let mm = unsafe { candle_core::safetensors::MmapedSafetensors::new(&st) }.map_err(bad)?;
        let mut map = HashMap::new();
        for (name, _) in mm.tensors() {
            let t = mm.load(&name, &Device::Cpu).map_err(bad)?;
            map.insert(name, t);
        }
        return Ok((map, st));
    }
    let pt = dir.join(HF_PYTORCH_FILE);
    if pt.is_file() {
        let list = candle_core::pickle::read_all(&pt).map_err(|e| Error::Weights {
            source_name: pt.display().to_string(),
            msg: format!(
                "cannot read the PyTorch checkpoint (torch.save's zip format of torch >= 1.6 \
                 is supported): {e}"
            ),
        })?;
        return Ok((list.into_iter().collect(), pt));
    }
    let sharded = dir
        .join(format!("{HF_SAFETENSORS_FILE}.index.json"))
        .is_file()
        || dir.join(format!("{HF_PYTORCH_FILE}.index.json")).is_file();
    Err(Error::msg(format!(
        "{}: no {HF_SAFETENSORS_FILE} or {HF_PYTORCH_FILE}{}",
        dir.display(),
        if sharded {
            " (sharded checkpoints with an .index.json are not supported)"
        } else {
            ""
        }
    )))
}

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
        let prefix = body_prefix(&hf_weights);
        let has_pooler = hf_weights.contains_key(&format!("{prefix}pooler.dense.weight"));
        let cfg = hf_config.to_encoder_only(has_pooler, sentence.pooling, &config_shown)?;
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
        let hidden = self.model.forward(&ids, None, Some(&padding), false)?; // (B, T, E)
        let pooled = pool(&hidden, Some(&padding), opts.pooling)?; // (B, E)
        let pooled = if opts.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ours: &str) -> Vec<String> {
        match hf_source(ours) {
            Some(HfSource::One(n)) => n,
            Some(HfSource::Qkv(n)) => n.to_vec(),
            None => vec![],
        }
    }

    #[test]
    fn every_parameter_has_its_hugging_face_name() {
        assert_eq!(
            names("embed.tok.weight"),
            ["embeddings.word_embeddings.weight"]
        );
        assert_eq!(
            names("embed.norm.bias"),
            ["embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta"]
        );
        assert_eq!(
            names("layers.3.self_attn.in_proj.weight"),
            [
                "encoder.layer.3.attention.self.query.weight",
                "encoder.layer.3.attention.self.key.weight",
                "encoder.layer.3.attention.self.value.weight",
            ]
        );
        assert_eq!(
            names("layers.0.norm1.weight"),
            [
                "encoder.layer.0.attention.output.LayerNorm.weight",
                "encoder.layer.0.attention.output.LayerNorm.gamma",
            ]
        );
        assert_eq!(
            names("layers.11.ff.linear1.bias"),
            ["encoder.layer.11.intermediate.dense.bias"]
        );
        assert_eq!(
            names("layers.1.ff.linear2.weight"),
            ["encoder.layer.1.output.dense.weight"]
        );
        assert_eq!(names("pooler.weight"), ["pooler.dense.weight"]);
        assert!(names("classifier.weight").is_empty());
        // Every parameter of a BERT-shaped model is covered.
        let cfg = EncoderOnlyConfig::tiny(10);
        let (_, vs) = EncoderOnly::init(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
        for (name, _) in vs.vars() {
            assert!(!names(&name).is_empty(), "{name} has no Hugging Face name");
        }
    }
}
