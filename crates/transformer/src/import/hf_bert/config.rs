//! `config.json` of a Hugging Face BERT checkpoint, and its translation into our
//! [`EncoderOnlyConfig`].

use serde::Deserialize;

use crate::models::{config_from_json, EncoderOnlyConfig, Pooling};
use crate::nn::{Activation, InitScheme};
use crate::{Error, Result};

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
        cfg.validate().map_err(|e| e.in_source(path))?;
        Ok(cfg)
    }
}
