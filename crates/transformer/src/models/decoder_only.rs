//! A GPT-style decoder-only language model, P(y) = ∏ P(y_i | y_<i): token embeddings,
//! positions (learned, sinusoidal or rotary), a stack of causal self-attention layers, a final
//! norm and an output projection tied to the token embedding.
//!
//! Dimension letters: `B` batch, `T` time, `E` d_model, `V` vocab.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::family::{CausalLm, FamilyConfig, Model};
pub use crate::nn::sliding_window_mask;
use crate::nn::{
    AbsolutePositions, Activation, BatchKvCache, Dropout, Encoder, InitScheme, KvCache,
    LayerConfig, LayerOptions, Linear, Masks, MlpKind, NormKind, PositionalKind, Rope, RopeLayout,
    TokenEmbedding, VarPath, VarStore,
};
use crate::{Error, Result};

/// Configuration of a decoder-only language model; saved as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderOnlyConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length (longest sequence the model attends over).
    pub block_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads per layer.
    pub n_heads: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Inner width of the feed-forward blocks (4·d_model in GPT).
    pub d_ff: usize,
    /// Dropout on embeddings, residual branches and attention weights.
    pub dropout: f64,
    /// Feed-forward non-linearity (nanoGPT: exact GELU).
    #[serde(default = "default_gelu")]
    pub activation: Activation,
    /// Biases in linear and norm layers.
    #[serde(default = "super::default_true")]
    pub bias: bool,
    /// Learned (GPT-2), sinusoidal or rotary positions.
    #[serde(default = "default_learned")]
    pub positional: PositionalKind,
    /// RoPE base frequency.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Pre-norm layers (GPT-2); false gives post-norm.
    #[serde(default = "super::default_true")]
    pub norm_first: bool,
    /// Output projection shares the token embedding matrix.
    #[serde(default = "super::default_true")]
    pub tie_embeddings: bool,
    /// Layer norm epsilon.
    #[serde(default = "super::default_eps")]
    pub layer_norm_eps: f64,
    /// Parameter initialization.
    #[serde(default = "default_gpt2")]
    pub init: InitScheme,
    /// Layer norm (default) or RMS norm (Llama).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub norm: NormKind,
    /// RMS norms scale by `1 + weight` (Gemma).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub norm_unit_offset: bool,
    /// Plain (default) or gated feed-forward (`gated` with `silu`: Llama's SwiGLU).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub mlp: MlpKind,
    /// Key/value heads for grouped-query attention (default: n_heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    /// Width of each attention head (default: d_model / n_heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Norms over each head's queries and keys (Gemma 3).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub qk_norm: bool,
    /// Which coordinates RoPE rotates together: `half_split` (Hugging Face) or `interleaved`
    /// (Llama-architecture GGUF files).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub rope_layout: RopeLayout,
    /// Sandwich norms: each sub-layer's output normalized before the residual sum (Gemma 3).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub post_norm: bool,
    /// Token embeddings scaled by √d_model (the paper, §3.4; Gemma).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub embed_scale: bool,
    /// Each layer's attention span: empty means every layer attends to the whole context;
    /// otherwise one entry per layer (Gemma 3: five sliding-window layers, then a global one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_types: Vec<LayerAttention>,
    /// How many positions a sliding-window layer sees: itself and the `sliding_window - 1`
    /// before it (as Hugging Face and llama.cpp count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// RoPE base of the sliding-window layers (Gemma 3: 10000, its global layers 1e6); `None`
    /// means `rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_theta: Option<f64>,
}

/// What one decoder layer attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerAttention {
    /// Every earlier position (and itself).
    #[serde(rename = "full_attention")]
    Full,
    /// The last `sliding_window` positions.
    #[serde(rename = "sliding_attention")]
    Sliding,
}

fn default_gelu() -> Activation {
    Activation::Gelu
}
fn default_learned() -> PositionalKind {
    PositionalKind::Learned
}
fn default_theta() -> f64 {
    10000.0
}
fn default_gpt2() -> InitScheme {
    InitScheme::Gpt2
}

impl DecoderOnlyConfig {
    /// nanoGPT's Shakespeare-char CPU configuration: 4 layers, 4 heads, 128 wide, block 64,
    /// no biases, dropout 0.
    pub fn shakespeare_char(vocab_size: usize) -> Self {
        DecoderOnlyConfig {
            vocab_size,
            block_size: 64,
            d_model: 128,
            n_heads: 4,
            n_layers: 4,
            d_ff: 512,
            dropout: 0.0,
            activation: Activation::Gelu,
            bias: false,
            positional: PositionalKind::Learned,
            rope_theta: 10000.0,
            norm_first: true,
            tie_embeddings: true,
            layer_norm_eps: 1e-5,
            init: InitScheme::Gpt2,
            norm: NormKind::LayerNorm,
            norm_unit_offset: false,
            mlp: MlpKind::Plain,
            n_kv_heads: None,
            head_dim: None,
            qk_norm: false,
            rope_layout: RopeLayout::HalfSplit,
            post_norm: false,
            embed_scale: false,
            layer_types: Vec::new(),
            sliding_window: None,
            rope_local_theta: None,
        }
    }

    /// GPT-2 small: 12 layers, 12 heads, 768 wide, block 1024.
    pub fn gpt2_small(vocab_size: usize) -> Self {
        DecoderOnlyConfig {
            block_size: 1024,
            d_model: 768,
            n_heads: 12,
            n_layers: 12,
            d_ff: 3072,
            dropout: 0.1,
            bias: true,
            ..Self::shakespeare_char(vocab_size)
        }
    }

    /// A tiny model for tests: 2 layers, 2 heads, 32 wide.
    pub fn tiny(vocab_size: usize) -> Self {
        DecoderOnlyConfig {
            block_size: 32,
            d_model: 32,
            n_heads: 2,
            n_layers: 2,
            d_ff: 128,
            ..Self::shakespeare_char(vocab_size)
        }
    }

    /// The named presets: `shakespeare_char`, `gpt2_small`, `tiny`.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        match name {
            "shakespeare_char" => Ok(Self::shakespeare_char(vocab_size)),
            "gpt2_small" => Ok(Self::gpt2_small(vocab_size)),
            "tiny" => Ok(Self::tiny(vocab_size)),
            _ => Err(Error::Config(format!(
                "unknown decoder-only preset {name:?} (known: shakespeare_char, gpt2_small, tiny)"
            ))),
        }
    }

    pub fn layer(&self) -> LayerConfig {
        LayerConfig {
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_ff: self.d_ff,
            dropout: self.dropout,
            activation: self.activation,
            norm_first: self.norm_first,
            layer_norm_eps: self.layer_norm_eps,
            bias: self.bias,
            // GPT-2's MLP drops out only its output, in the residual connection.
            ffn_dropout: Some(0.0),
            norm: self.norm,
            norm_unit_offset: self.norm_unit_offset,
            mlp: self.mlp,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            qk_norm: self.qk_norm,
            post_norm: self.post_norm,
        }
    }

    /// Layer `i`'s attention span.
    pub fn layer_attention(&self, i: usize) -> LayerAttention {
        self.layer_types
            .get(i)
            .copied()
            .unwrap_or(LayerAttention::Full)
    }

    pub fn validate(&self) -> Result<()> {
        self.layer().validate()?;
        if self.vocab_size == 0 || self.block_size == 0 || self.n_layers == 0 {
            return Err(Error::invalid(
                "vocab_size, block_size and n_layers",
                "> 0",
                format!(
                    "{}, {}, {}",
                    self.vocab_size, self.block_size, self.n_layers
                ),
            ));
        }
        if !self.layer_types.is_empty() && self.layer_types.len() != self.n_layers {
            return Err(Error::invalid(
                "layer_types",
                format!("empty or one entry per layer ({})", self.n_layers),
                format!("{} entries", self.layer_types.len()),
            ));
        }
        let sliding = self.layer_types.contains(&LayerAttention::Sliding);
        match self.sliding_window {
            None if sliding => {
                return Err(Error::invalid(
                    "sliding_window",
                    "a window length for the sliding_attention layers",
                    "none",
                ))
            }
            Some(0) => return Err(Error::invalid("sliding_window", "> 0", "0")),
            _ => {}
        }
        let head_dim = self.layer().mha().head_width();
        if self.positional == PositionalKind::Rope && !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                "the head width (head_dim, or d_model / n_heads) with RoPE positions",
                "even",
                head_dim.to_string(),
            ));
        }
        Ok(())
    }
}

/// Decoder-only language model.
///
/// Parameter names: `tok_embed.weight`, `pos_embed.weight` (learned positions), `layers.N.*`,
/// `norm.*`, `lm_head.weight` (absent when tied).
pub struct DecoderOnly {
    cfg: DecoderOnlyConfig,
    tok_embed: TokenEmbedding,
    pos: Option<AbsolutePositions>,
    rope: Option<Rope>,
    /// The sliding-window layers' RoPE, when its base differs.
    rope_local: Option<Rope>,
    blocks: Encoder,
    /// The output projection; tied, it shares the token embedding's table.
    lm_head: Linear,
    dropout: Dropout,
}

impl DecoderOnly {
    pub fn new(cfg: &DecoderOnlyConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let tok_embed = TokenEmbedding::new(
            cfg.vocab_size,
            cfg.d_model,
            cfg.embed_scale,
            &vp.pp("tok_embed"),
        )?;
        let pos = match cfg.positional {
            PositionalKind::Learned => Some(AbsolutePositions::learned(
                cfg.block_size,
                cfg.d_model,
                &vp.pp("pos_embed"),
            )?),
            PositionalKind::Sinusoidal => Some(AbsolutePositions::sinusoidal(
                cfg.block_size,
                cfg.d_model,
                vp,
            )?),
            _ => None,
        };
        let rope_with = |theta: f64| -> Result<Rope> {
            Ok(Rope::new(
                cfg.layer().mha().head_width(),
                cfg.block_size,
                theta,
                vp.dtype(),
                vp.device(),
            )?
            .with_layout(cfg.rope_layout))
        };
        let (rope, rope_local) = match cfg.positional {
            PositionalKind::Rope => (
                Some(rope_with(cfg.rope_theta)?),
                cfg.rope_local_theta
                    .filter(|&t| t != cfg.rope_theta)
                    .map(rope_with)
                    .transpose()?,
            ),
            _ => (None, None),
        };
        // The layer stack holds the final norm (`norm.*` sits beside `layers.*`).
        let blocks = Encoder::new(&cfg.layer(), cfg.n_layers, cfg.norm_first, vp)?;
        let lm_head = if cfg.tie_embeddings {
            tok_embed.as_linear()
        } else {
            Linear::new(cfg.d_model, cfg.vocab_size, false, false, &vp.pp("lm_head"))?
        };
        Ok(DecoderOnly {
            cfg: cfg.clone(),
            tok_embed,
            pos,
            rope,
            rope_local,
            blocks,
            lm_head,
            dropout: vp.dropout(cfg.dropout)?,
        })
    }

    /// A freshly initialized model with its parameter store.
    pub fn init(
        cfg: &DecoderOnlyConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarStore)> {
        FamilyConfig::init(cfg, dtype, device, seed)
    }

    /// Load `config.json` and `model.safetensors` from a directory (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, VarStore)> {
        let (model, vs, _) = DecoderOnlyConfig::load(dir, device, DType::F32)?;
        Ok((model, vs))
    }

    pub fn config(&self) -> &DecoderOnlyConfig {
        &self.cfg
    }

    /// Empty per-layer caches for [`DecoderOnly::forward_cached`].
    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.cfg.n_layers).map(|_| KvCache::new()).collect()
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// `ids`: (B, T) with T ≤ block_size → logits (B, T, V)
    pub fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_inner(ids, train, None, false)
    }

    /// Logits for new positions, appending their keys/values to `caches` (one per layer).
    /// Positions continue from the cached length.
    ///
    /// # Shapes
    /// `ids`: (B, T_new) → logits (B, T_new, V)
    pub fn forward_cached(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        self.forward_inner(ids, false, Some(caches), false)
    }

    /// [`DecoderOnly::forward_cached`] with the output projection of the last position only.
    ///
    /// # Shapes
    /// `ids`: (B, T_new) → logits (B, 1, V)
    pub fn forward_cached_last(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        self.forward_inner(ids, false, Some(caches), true)
    }

    /// Separate sequences decoded together: row `b` of `ids` continues sequence `b` of
    /// `batch`, at its own position, its keys and values appended to its own caches. Returns
    /// each row's last-position logits.
    ///
    /// # Shapes
    /// `ids`: (B, T_new) with B = `batch.rows()` → logits (B, 1, V)
    pub fn forward_batch_last(&self, ids: &Tensor, batch: &mut BatchKvCache) -> Result<Tensor> {
        let (b, t) = ids
            .dims2()
            .map_err(|_| Error::shape("token ids", "(B, T)", ids.dims()))?;
        if b != batch.rows() {
            return Err(Error::shape(
                "token ids",
                format!("one row per sequence of the batch ({})", batch.rows()),
                ids.dims(),
            ));
        }
        for row in 0..b {
            let offset = batch.len_of(row);
            if offset + t > self.cfg.block_size {
                return Err(Error::input(
                    format!("sequence length of batch row {row}"),
                    format!(
                        "at most the context length (block_size) {}",
                        self.cfg.block_size
                    ),
                    format!("{} tokens", offset + t),
                ));
            }
        }
        let x = self.tok_embed.forward(ids)?;
        let x = match &self.pos {
            // Each row at its own offset.
            Some(p) => Tensor::cat(
                &(0..b)
                    .map(|row| p.forward(&x.narrow(0, row, 1)?, batch.len_of(row)))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?,
            None => x,
        };
        let x = self.blocks.forward_rows(
            &x,
            |i| {
                let (rope, window) = match self.cfg.layer_attention(i) {
                    LayerAttention::Full => (self.rope.as_ref(), None),
                    LayerAttention::Sliding => (
                        self.rope_local.as_ref().or(self.rope.as_ref()),
                        self.cfg.sliding_window,
                    ),
                };
                let opts = LayerOptions {
                    rope,
                    ..Default::default()
                };
                (opts, window)
            },
            batch,
        )?;
        self.lm_head.forward(&x.narrow(1, t - 1, 1)?)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        train: bool,
        caches: Option<&mut [KvCache]>,
        last_only: bool,
    ) -> Result<Tensor> {
        let (_, t) = ids
            .dims2()
            .map_err(|_| Error::shape("token ids", "(B, T)", ids.dims()))?;
        let offset = caches
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, |c| c.len());
        if offset + t > self.cfg.block_size {
            return Err(Error::input(
                "sequence length",
                format!(
                    "at most the context length (block_size) {}",
                    self.cfg.block_size
                ),
                format!("{} tokens", offset + t),
            ));
        }
        let x = self.tok_embed.forward(ids)?;
        let x = match &self.pos {
            Some(p) => p.forward(&x, offset)?,
            None => x,
        };
        let x = self.dropout.forward(&x, train)?;
        // Sliding-window layers need a mask only once the context outgrows the window.
        let window = self
            .cfg
            .sliding_window
            .filter(|&w| offset + t > w && self.cfg.layer_types.contains(&LayerAttention::Sliding))
            .map(|w| sliding_window_mask(t, offset + t, w, x.device()))
            .transpose()?;
        let x = self.blocks.forward_each(
            &x,
            |i| {
                let (masks, rope) = match self.cfg.layer_attention(i) {
                    LayerAttention::Full => (Masks::causal(), self.rope.as_ref()),
                    LayerAttention::Sliding => (
                        match &window {
                            Some(w) => Masks::none().with_attn(Some(w)),
                            None => Masks::causal(),
                        },
                        self.rope_local.as_ref().or(self.rope.as_ref()),
                    ),
                };
                let opts = LayerOptions {
                    train,
                    rope,
                    ..Default::default()
                };
                (masks, opts)
            },
            caches,
        )?;
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        self.lm_head.forward(&x)
    }
}

impl FamilyConfig for DecoderOnlyConfig {
    type Model = DecoderOnly;
    const NAME: &'static str = "decoder_only";
    const PRESETS: &'static [&'static str] = &["shakespeare_char", "gpt2_small", "tiny"];
    const VOCAB_KEYS: &'static [&'static str] = &["vocab_size"];

    fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        DecoderOnlyConfig::preset(name, vocab_size)
    }
    fn validate(&self) -> Result<()> {
        DecoderOnlyConfig::validate(self)
    }
    fn init_scheme(&self) -> InitScheme {
        self.init
    }
    fn n_layers(&self) -> usize {
        self.n_layers
    }
    fn build(&self, vp: &VarPath) -> Result<DecoderOnly> {
        DecoderOnly::new(self, vp)
    }
    fn erase(model: DecoderOnly) -> Model {
        Model::CausalLm(Box::new(model))
    }
}

impl CausalLm for DecoderOnly {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn context_length(&self) -> usize {
        self.cfg.block_size
    }
    fn new_cache(&self) -> Vec<KvCache> {
        DecoderOnly::new_cache(self)
    }
    fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        DecoderOnly::forward(self, ids, train)
    }
    fn forward_cached(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        DecoderOnly::forward_cached(self, ids, caches)
    }
    fn forward_cached_last(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        DecoderOnly::forward_cached_last(self, ids, caches)
    }
    fn forward_batch_last(&self, ids: &Tensor, batch: &mut BatchKvCache) -> Result<Tensor> {
        DecoderOnly::forward_batch_last(self, ids, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_mask_keeps_the_last_window_positions() -> Result<()> {
        // 2 new queries after 3 cached positions, window 3: query 0 sits at position 3 and
        // sees 1, 2, 3; query 1 at position 4 sees 2, 3, 4.
        let m = sliding_window_mask(2, 5, 3, &Device::Cpu)?;
        let rows = m.tensor().to_vec2::<u8>()?;
        assert_eq!(rows, vec![vec![0, 1, 1, 1, 0], vec![0, 0, 1, 1, 1]]);
        Ok(())
    }

    fn gemma_like(window: Option<usize>) -> DecoderOnlyConfig {
        DecoderOnlyConfig {
            positional: PositionalKind::Rope,
            norm: NormKind::RmsNorm,
            mlp: MlpKind::Gated,
            activation: Activation::GeluTanh,
            n_kv_heads: Some(1),
            qk_norm: true,
            post_norm: true,
            embed_scale: true,
            layer_types: if window.is_some() {
                vec![LayerAttention::Sliding, LayerAttention::Full]
            } else {
                Vec::new()
            },
            sliding_window: window,
            rope_local_theta: window.map(|_| 100.0),
            ..DecoderOnlyConfig::tiny(13)
        }
    }

    /// Separate sequences decoded in one batch, each with its own caches and length, give
    /// each sequence's own logits, while they step, leave and join; with RoPE, grouped
    /// keys/values and sliding windows (Gemma-like) and with learned positions (GPT).
    #[test]
    fn batched_sequences_decode_as_each_alone() -> Result<()> {
        let dev = Device::Cpu;
        let row = |v: &[u32]| -> Result<Tensor> { Ok(Tensor::new(v, &dev)?.unsqueeze(0)?) };
        for cfg in [gemma_like(Some(4)), DecoderOnlyConfig::tiny(13)] {
            let (model, _) = DecoderOnly::init(&cfg, DType::F64, &dev, 3)?;
            let mut batch = BatchKvCache::new(cfg.n_layers);
            let mut alone: Vec<Vec<KvCache>> = Vec::new();
            let join = |p: &[u32], batch: &mut BatchKvCache, alone: &mut Vec<_>| -> Result<()> {
                let mut c = model.new_cache();
                model.forward_cached_last(&row(p)?, &mut c)?;
                alone.push(c.clone());
                batch.push(c)
            };
            // Lengths on both sides of the window (4).
            for p in [
                &[1u32, 2, 3][..],
                &[4, 5, 6, 7, 8, 9, 10],
                &[11, 12, 0, 5, 9],
            ] {
                join(p, &mut batch, &mut alone)?;
            }
            for step in 0..5 {
                let toks: Vec<u32> = (0..batch.rows())
                    .map(|r| ((step * 3 + r) % 13) as u32)
                    .collect();
                let ids = Tensor::new(toks.as_slice(), &dev)?.unsqueeze(1)?;
                let got = model.forward_batch_last(&ids, &mut batch)?;
                assert_eq!(got.dims(), &[toks.len(), 1, 13]);
                for (r, c) in alone.iter_mut().enumerate() {
                    let want = model.forward_cached_last(&row(&[toks[r]])?, c)?;
                    let d = (got.narrow(0, r, 1)? - want)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f64>()?;
                    assert!(d < 1e-10, "step {step}, row {r}: differs by {d}");
                    assert_eq!(batch.len_of(r), c[0].len());
                }
                if step == 1 {
                    // The second sequence leaves; a new one joins as the last row.
                    batch.remove(1)?;
                    alone.remove(1);
                    join(&[7, 7], &mut batch, &mut alone)?;
                }
            }
            let wrong_rows = Tensor::new(&[[1u32], [2]], &dev)?;
            assert!(model.forward_batch_last(&wrong_rows, &mut batch).is_err());
            assert!(batch.remove(9).is_err());
            assert!(batch.push(Vec::new()).is_err());
        }
        Ok(())
    }

    /// Sliding-window layers: the same function through the cache as without it, past the
    /// window; within the window the same as full attention (with the local RoPE base equal
    /// to the global one); and a window that changes the output once the context outgrows it.
    #[test]
    fn sliding_window_layers_agree_with_and_without_the_cache() -> Result<()> {
        let ids: Vec<u32> = (0..12).map(|i| (i * 5 % 13) as u32).collect();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let cfg = gemma_like(Some(4));
        let (model, vs) = DecoderOnly::init(&cfg, DType::F64, &Device::Cpu, 7)?;
        let full = model.forward(&x, false)?;
        let mut caches = model.new_cache();
        let mut steps = Vec::new();
        for chunk in [0..5, 5..6, 6..12] {
            let part = x.narrow(1, chunk.start, chunk.len())?;
            steps.push(model.forward_cached(&part, &mut caches)?);
        }
        let cached = Tensor::cat(&steps, 1)?;
        let d = (&full - &cached)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(d < 1e-10, "cached differs by {d}");
        let last = model.forward_cached_last(&x.narrow(1, 0, 12)?, &mut model.new_cache())?;
        let d = (&last - &full.narrow(1, 11, 1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-10, "last-position logits differ by {d}");

        // The same weights with every layer global: equal while T <= window, not after.
        let global = DecoderOnlyConfig {
            rope_local_theta: None,
            ..gemma_like(None)
        };
        let local_same_theta = DecoderOnlyConfig {
            rope_local_theta: None,
            ..cfg.clone()
        };
        let build = |c: &DecoderOnlyConfig| -> Result<DecoderOnly> {
            let v = FamilyConfig::var_store(c, DType::F64, &Device::Cpu, 0);
            let m = DecoderOnly::new(c, &v.root())?;
            let map = vs.tensors().into_iter().collect();
            v.load_map(&map, "test")?;
            Ok(m)
        };
        let (g, l) = (build(&global)?, build(&local_same_theta)?);
        let short = x.narrow(1, 0, 4)?;
        let d = (g.forward(&short, false)? - l.forward(&short, false)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-12, "within the window: {d}");
        let d = (g.forward(&x, false)? - l.forward(&x, false)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d > 1e-6, "past the window the sliding layer must see less");

        let bad = DecoderOnlyConfig {
            sliding_window: None,
            ..cfg
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sliding_window"));
        Ok(())
    }
}
