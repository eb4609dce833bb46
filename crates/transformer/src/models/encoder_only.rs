//! A BERT-style encoder-only model: token, position and token-type embeddings with a layer
//! norm, a stack of (post-norm) encoder layers, pooling and an optional classification head.
//!
//! Dimension letters: `B` batch, `T` time, `E` d_model, `C` classes.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::family::{EncoderModel, FamilyConfig, Model};
use crate::nn::{
    AbsolutePositions, Activation, AttnMask, Dropout, Encoder, InitScheme, LayerConfig, Linear,
    Masks, Norm, TokenEmbedding, VarPath, VarStore,
};
use crate::{Error, Result};

/// How a sequence of hidden states becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token's state (BERT's [CLS]).
    #[default]
    Cls,
    /// The mean over non-padding positions (sentence-transformers).
    Mean,
}

/// Configuration of an encoder-only model; saved as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderOnlyConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest input (learned position table size).
    pub max_len: usize,
    /// Number of token types (segments); 0 for none.
    #[serde(default)]
    pub type_vocab_size: usize,
    /// Width of every layer.
    pub d_model: usize,
    /// Attention heads per layer.
    pub n_heads: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Inner width of the feed-forward blocks.
    pub d_ff: usize,
    /// Dropout on embeddings, sub-layers and attention weights.
    pub dropout: f64,
    /// Feed-forward non-linearity (BERT: exact GELU).
    #[serde(default = "default_gelu")]
    pub activation: Activation,
    /// Pre-norm layers (BERT is post-norm).
    #[serde(default)]
    pub norm_first: bool,
    /// Layer norm epsilon (BERT: 1e-12).
    #[serde(default = "default_bert_eps")]
    pub layer_norm_eps: f64,
    /// Layer norm over the summed embeddings (BERT).
    #[serde(default = "super::default_true")]
    pub embedding_norm: bool,
    /// Pooling for sentence vectors and the classifier.
    #[serde(default)]
    pub pooling: Pooling,
    /// BERT's pooler: dense + tanh on the pooled vector.
    #[serde(default)]
    pub pooler: bool,
    /// Classification head size; none when absent.
    #[serde(default)]
    pub n_classes: Option<usize>,
    /// Parameter initialization.
    #[serde(default = "default_gpt2")]
    pub init: InitScheme,
}

fn default_gelu() -> Activation {
    Activation::Gelu
}
fn default_bert_eps() -> f64 {
    1e-12
}
fn default_gpt2() -> InitScheme {
    InitScheme::Gpt2
}

impl EncoderOnlyConfig {
    /// BERT-base: 12 layers, 12 heads, 768 wide, d_ff 3072, 512 positions, 2 token types.
    pub fn bert_base(vocab_size: usize) -> Self {
        EncoderOnlyConfig {
            vocab_size,
            max_len: 512,
            type_vocab_size: 2,
            d_model: 768,
            n_heads: 12,
            n_layers: 12,
            d_ff: 3072,
            dropout: 0.1,
            activation: Activation::Gelu,
            norm_first: false,
            layer_norm_eps: 1e-12,
            embedding_norm: true,
            pooling: Pooling::Cls,
            pooler: true,
            n_classes: None,
            init: InitScheme::Gpt2,
        }
    }

    /// all-MiniLM-L6-v2's shape: 6 layers, 12 heads, 384 wide, d_ff 1536, mean pooling.
    pub fn minilm_l6(vocab_size: usize) -> Self {
        EncoderOnlyConfig {
            d_model: 384,
            n_layers: 6,
            d_ff: 1536,
            pooling: Pooling::Mean,
            ..Self::bert_base(vocab_size)
        }
    }

    /// A tiny model for tests: 2 layers, 2 heads, 32 wide.
    pub fn tiny(vocab_size: usize) -> Self {
        EncoderOnlyConfig {
            max_len: 64,
            d_model: 32,
            n_heads: 2,
            n_layers: 2,
            d_ff: 64,
            ..Self::bert_base(vocab_size)
        }
    }

    /// The named presets: `bert_base`, `minilm_l6`, `tiny`.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        match name {
            "bert_base" => Ok(Self::bert_base(vocab_size)),
            "minilm_l6" => Ok(Self::minilm_l6(vocab_size)),
            "tiny" => Ok(Self::tiny(vocab_size)),
            _ => Err(Error::Config(format!(
                "unknown encoder-only preset {name:?} (known: bert_base, minilm_l6, tiny)"
            ))),
        }
    }

    pub fn layer(&self) -> LayerConfig {
        LayerConfig::new(
            self.d_model,
            self.n_heads,
            self.d_ff,
            self.dropout,
            self.activation,
            self.norm_first,
            self.layer_norm_eps,
            true,
        )
    }

    pub fn validate(&self) -> Result<()> {
        self.layer().validate()?;
        if self.vocab_size == 0 || self.max_len == 0 {
            return Err(Error::invalid(
                "vocab_size and max_len",
                "> 0",
                format!("{} and {}", self.vocab_size, self.max_len),
            ));
        }
        if self.n_classes == Some(0) {
            return Err(Error::invalid("n_classes", "> 0 when set", "0"));
        }
        Ok(())
    }
}

/// Encoder-only model.
///
/// Parameter names: `embed.tok.weight`, `embed.pos.weight`, `embed.type.weight`,
/// `embed.norm.*`, `layers.N.*`, `pooler.*`, `classifier.*`.
pub struct EncoderOnly {
    cfg: EncoderOnlyConfig,
    tok: TokenEmbedding,
    pos: AbsolutePositions,
    token_type: Option<TokenEmbedding>,
    embed_norm: Option<Norm>,
    encoder: Encoder,
    pooler: Option<Linear>,
    classifier: Option<Linear>,
    dropout: Dropout,
}

impl EncoderOnly {
    pub fn new(cfg: &EncoderOnlyConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let e = vp.pp("embed");
        let tok = TokenEmbedding::new(cfg.vocab_size, cfg.d_model, false, &e.pp("tok"))?;
        let pos = AbsolutePositions::learned(cfg.max_len, cfg.d_model, &e.pp("pos"))?;
        let token_type = if cfg.type_vocab_size > 0 {
            Some(TokenEmbedding::new(
                cfg.type_vocab_size,
                cfg.d_model,
                false,
                &e.pp("type"),
            )?)
        } else {
            None
        };
        let embed_norm = if cfg.embedding_norm {
            Some(Norm::layer_norm(
                cfg.d_model,
                cfg.layer_norm_eps,
                true,
                &e.pp("norm"),
            )?)
        } else {
            None
        };
        // Pre-norm stacks need a final norm; post-norm layers already end in one.
        let encoder = Encoder::new(&cfg.layer(), cfg.n_layers, cfg.norm_first, vp)?;
        let pooler = if cfg.pooler {
            Some(Linear::new(
                cfg.d_model,
                cfg.d_model,
                true,
                false,
                &vp.pp("pooler"),
            )?)
        } else {
            None
        };
        let classifier = match cfg.n_classes {
            Some(c) => Some(Linear::new(
                cfg.d_model,
                c,
                true,
                false,
                &vp.pp("classifier"),
            )?),
            None => None,
        };
        Ok(EncoderOnly {
            cfg: cfg.clone(),
            tok,
            pos,
            token_type,
            embed_norm,
            encoder,
            pooler,
            classifier,
            dropout: vp.dropout(cfg.dropout)?,
        })
    }

    /// A freshly initialized model with its parameter store.
    pub fn init(
        cfg: &EncoderOnlyConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarStore)> {
        FamilyConfig::init(cfg, dtype, device, seed)
    }

    /// Load `config.json` and `model.safetensors` from a directory (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, VarStore)> {
        let (model, vs, _) = EncoderOnlyConfig::load(dir, device, DType::F32)?;
        Ok((model, vs))
    }

    pub fn config(&self) -> &EncoderOnlyConfig {
        &self.cfg
    }

    /// Hidden states of every position.
    ///
    /// # Shapes
    /// `ids`: (B, T), `token_types`: (B, T), `padding`: (B, T) key-padding mask → (B, T, E)
    pub fn forward(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        padding: Option<&AttnMask>,
        train: bool,
    ) -> Result<Tensor> {
        let x = self.tok.forward(ids)?;
        let x = self.pos.forward(&x, 0)?;
        let x = match (&self.token_type, token_types) {
            (Some(tt), Some(types)) => (x + tt.forward(types)?)?,
            (Some(tt), None) => {
                // Segment 0 everywhere, as BERT assumes when no types are given.
                let zeros = ids.zeros_like()?.to_dtype(DType::U32)?;
                (x + tt.forward(&zeros)?)?
            }
            (None, Some(_)) => {
                return Err(Error::msg(
                    "token types given but the model has type_vocab_size 0",
                ))
            }
            (None, None) => x,
        };
        let x = match &self.embed_norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        let x = self.dropout.forward(&x, train)?;
        self.encoder
            .forward(&x, &Masks::none().with_key_padding(padding), train)
    }

    /// One vector per sequence by the configured pooling, through the pooler when present.
    ///
    /// # Shapes
    /// `hidden`: (B, T, E), `padding`: (B, T) → (B, E)
    pub fn pool(&self, hidden: &Tensor, padding: Option<&AttnMask>) -> Result<Tensor> {
        let pooled = pool(hidden, padding, self.cfg.pooling)?;
        match &self.pooler {
            Some(p) => Ok(p.forward(&pooled)?.tanh()?),
            None => Ok(pooled),
        }
    }

    /// Class logits.
    ///
    /// # Shapes
    /// `ids`: (B, T) → (B, C)
    pub fn classify(
        &self,
        ids: &Tensor,
        padding: Option<&AttnMask>,
        train: bool,
    ) -> Result<Tensor> {
        let Some(head) = &self.classifier else {
            return Err(Error::Config(
                "the model has no classification head (n_classes unset)".into(),
            ));
        };
        let h = self.forward(ids, None, padding, train)?;
        let pooled = self.dropout.forward(&self.pool(&h, padding)?, train)?;
        head.forward(&pooled)
    }
}

impl FamilyConfig for EncoderOnlyConfig {
    type Model = EncoderOnly;
    const NAME: &'static str = "encoder_only";
    const PRESETS: &'static [&'static str] = &["bert_base", "minilm_l6", "tiny"];
    const VOCAB_KEYS: &'static [&'static str] = &["vocab_size"];

    fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        EncoderOnlyConfig::preset(name, vocab_size)
    }
    fn validate(&self) -> Result<()> {
        EncoderOnlyConfig::validate(self)
    }
    fn init_scheme(&self) -> InitScheme {
        self.init
    }
    fn n_layers(&self) -> usize {
        self.n_layers
    }
    fn build(&self, vp: &VarPath) -> Result<EncoderOnly> {
        EncoderOnly::new(self, vp)
    }
    fn erase(model: EncoderOnly) -> Model {
        Model::Encoder(Box::new(model))
    }
}

impl EncoderModel for EncoderOnly {
    fn d_model(&self) -> usize {
        self.cfg.d_model
    }
    fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        padding: Option<&AttnMask>,
        train: bool,
    ) -> Result<Tensor> {
        EncoderOnly::forward(self, ids, token_types, padding, train)
    }
    fn pool(&self, hidden: &Tensor, padding: Option<&AttnMask>) -> Result<Tensor> {
        EncoderOnly::pool(self, hidden, padding)
    }
}

/// Pool hidden states (B, T, E) into (B, E): the first position, or the mean over positions
/// that are not padding.
pub fn pool(hidden: &Tensor, padding: Option<&AttnMask>, pooling: Pooling) -> Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    match pooling {
        Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
        Pooling::Mean => {
            let keep = match padding {
                // Additive 0 = keep, -inf = padding; boolean masks by their convention.
                Some(m) => m
                    .to_additive(DType::F32)?
                    .eq(0f64)?
                    .to_dtype(hidden.dtype())?,
                None => Tensor::ones((b, t), hidden.dtype(), hidden.device())?,
            };
            if keep.dims() != [b, t] {
                return Err(Error::shape(
                    "padding mask",
                    format!("({b}, {t})"),
                    keep.dims(),
                ));
            }
            let keep = keep.unsqueeze(D::Minus1)?; // (B, T, 1)
            let sum = hidden.broadcast_mul(&keep)?.sum(1)?;
            // Clamp as sentence-transformers does, so an all-padding row gives zeros.
            let count = keep.sum(1)?.clamp(1e-9, f64::INFINITY)?;
            Ok(sum.broadcast_div(&count)?)
        }
    }
}
