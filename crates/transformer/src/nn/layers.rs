//! Encoder and decoder layers (post-norm as in the paper and PyTorch's default, or pre-norm
//! with `norm_first`) and their stacks, composed of three residual blocks: self-attention
//! (shared by both layers), cross-attention and the feed-forward. The norm (layer or RMS), the
//! feed-forward (plain or gated), grouped-query attention and query/key norms come from the
//! [`LayerConfig`]; each block decides itself when to take the fused kernels.
//!
//! Dimension letters: `B` batch, `T` target/query positions, `S` source/memory positions,
//! `E` = d_model.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::attention::AttnMask;
use super::dropout::Dropout;
use super::embedding::Rope;
use super::mha::{
    BatchKvCache, KvCache, MhaConfig, MhaInput, MultiHeadAttention, NeedWeights, ProjectedKv,
    RowCaches,
};
use super::mlp::{Activation, Branch, Mlp, MlpConfig, MlpKind};
use super::norm::{Norm, NormConfig, NormKind, NormedInput};
use super::var_store::VarPath;
use crate::{Error, Result};

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Shape and behaviour shared by the encoder and decoder layers of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub dropout: f64,
    pub activation: Activation,
    /// Pre-norm (x + f(norm(x))) instead of the paper's post-norm (norm(x + f(x))).
    pub norm_first: bool,
    /// The norms' epsilon (layer or RMS norm).
    pub layer_norm_eps: f64,
    /// Biases in the linear and norm layers.
    pub bias: bool,
    /// Dropout on the feed-forward's hidden activations; `None` means `dropout`, as in
    /// PyTorch's `nn.TransformerEncoderLayer`. GPT-2 and nanoGPT have none (`Some(0.0)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_dropout: Option<f64>,
    /// Layer norm (default) or RMS norm.
    #[serde(default, skip_serializing_if = "is_default")]
    pub norm: NormKind,
    /// RMS norms scale by `1 + weight` (Gemma).
    #[serde(default, skip_serializing_if = "is_default")]
    pub norm_unit_offset: bool,
    /// Plain (default) or gated feed-forward.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mlp: MlpKind,
    /// Key/value heads for grouped-query attention (default: `n_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    /// Width of each attention head (default: d_model / n_heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Norms over each head's queries and keys (Gemma 3), of the layers' norm kind.
    #[serde(default, skip_serializing_if = "is_default")]
    pub qk_norm: bool,
    /// A second norm on each sub-layer's output before the residual sum,
    /// x + norm'(f(norm(x))) (Gemma 2/3's "sandwich" norms; `post_norm{1,2}.*`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub post_norm: bool,
}

impl LayerConfig {
    /// The paper's layer: layer norm, plain feed-forward, as many key/value heads as heads.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        d_model: usize,
        n_heads: usize,
        d_ff: usize,
        dropout: f64,
        activation: Activation,
        norm_first: bool,
        layer_norm_eps: f64,
        bias: bool,
    ) -> Self {
        LayerConfig {
            d_model,
            n_heads,
            d_ff,
            dropout,
            activation,
            norm_first,
            layer_norm_eps,
            bias,
            ffn_dropout: None,
            norm: NormKind::LayerNorm,
            norm_unit_offset: false,
            mlp: MlpKind::Plain,
            n_kv_heads: None,
            head_dim: None,
            qk_norm: false,
            post_norm: false,
        }
    }

    /// The norm of every residual block and of the stacks' final norm.
    pub fn norm_config(&self) -> NormConfig {
        NormConfig {
            kind: self.norm,
            eps: self.layer_norm_eps,
            bias: self.bias,
            unit_offset: self.norm_unit_offset,
        }
    }

    pub fn mha(&self) -> MhaConfig {
        MhaConfig {
            bias: self.bias,
            dropout: self.dropout,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            // Per-head norms have no bias.
            qk_norm: self.qk_norm.then_some(NormConfig {
                bias: false,
                ..self.norm_config()
            }),
            ..MhaConfig::new(self.d_model, self.n_heads)
        }
    }

    pub fn mlp_config(&self) -> MlpConfig {
        MlpConfig {
            d_model: self.d_model,
            d_ff: self.d_ff,
            kind: self.mlp,
            activation: self.activation,
            dropout: self.ffn_dropout.unwrap_or(self.dropout),
            bias: self.bias,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.mha().validate()?;
        if self.d_ff == 0 {
            return Err(Error::invalid("d_ff", "> 0", "0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                "dropout",
                "in [0, 1)",
                self.dropout.to_string(),
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(Error::invalid(
                "layer_norm_eps",
                "> 0",
                self.layer_norm_eps.to_string(),
            ));
        }
        if self.post_norm && !self.norm_first {
            return Err(Error::invalid(
                "post_norm",
                "false unless norm_first (sandwich norms are pre-norm layers)",
                "true",
            ));
        }
        if self.norm_unit_offset && self.norm != NormKind::RmsNorm {
            return Err(Error::invalid(
                "norm_unit_offset",
                "false unless norm = \"rms_norm\"",
                "true",
            ));
        }
        Ok(())
    }
}

/// The masks of one attention: key padding (B, S), attention mask (T, S) / (B·H, T, S), causal.
#[derive(Debug, Clone, Copy, Default)]
pub struct Masks<'a> {
    pub key_padding: Option<&'a AttnMask>,
    pub attn: Option<&'a AttnMask>,
    pub causal: bool,
}

impl<'a> Masks<'a> {
    pub fn none() -> Self {
        Masks::default()
    }

    pub fn causal() -> Self {
        Masks {
            causal: true,
            ..Default::default()
        }
    }

    pub fn with_key_padding(mut self, m: Option<&'a AttnMask>) -> Self {
        self.key_padding = m;
        self
    }

    pub fn with_attn(mut self, m: Option<&'a AttnMask>) -> Self {
        self.attn = m;
        self
    }
}

/// Per-call options of a layer beyond its masks.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerOptions<'a> {
    pub train: bool,
    /// Rotary embedding of self-attention's queries and keys (encoder and decoder alike).
    pub rope: Option<&'a Rope>,
    pub need_weights: NeedWeights,
}

/// A residual connection: `x + dropout(f(norm(x)))` (pre-norm) or `norm(x + dropout(f(x)))`
/// (post-norm). `f` returns its output before its last projection, so that the projection,
/// the dropout and the sum fuse; in pre-norm the norm is left to `f`, to fuse with its first.
#[derive(Debug, Clone)]
struct Residual {
    norm: Norm,
    /// The sandwich norm on the sub-layer's output (pre-norm only).
    post_norm: Option<Norm>,
    dropout: Dropout,
    norm_first: bool,
}

impl Residual {
    fn new(cfg: &LayerConfig, norm_vp: &VarPath, dropout: Dropout) -> Result<Self> {
        Ok(Residual {
            norm: Norm::new(cfg.d_model, &cfg.norm_config(), norm_vp)?,
            post_norm: None,
            dropout,
            norm_first: cfg.norm_first,
        })
    }

    /// With the sandwich norm `post_norm_vp` when the config has them.
    fn with_post_norm(mut self, cfg: &LayerConfig, post_norm_vp: &VarPath) -> Result<Self> {
        if cfg.post_norm {
            self.post_norm = Some(Norm::new(cfg.d_model, &cfg.norm_config(), post_norm_vp)?);
        }
        Ok(self)
    }

    fn apply<'a>(
        &self,
        x: &Tensor,
        train: bool,
        f: impl FnOnce(NormedInput<'_>) -> Result<Branch<'a>>,
    ) -> Result<Tensor> {
        if self.norm_first {
            let input = NormedInput {
                x,
                norm: Some(&self.norm),
            };
            match &self.post_norm {
                Some(post) => {
                    let y = post.forward(&f(input)?.output(train)?)?;
                    self.dropout.add_to(x, &y, train)
                }
                None => f(input)?.add_to(x, &self.dropout, train),
            }
        } else {
            let input = NormedInput { x, norm: None };
            self.norm
                .forward(&f(input)?.add_to(x, &self.dropout, train)?)
        }
    }
}

/// A self-attention layer's cache for one call.
pub enum SelfCache<'a> {
    None,
    /// One cache for the whole batch (its rows decode in step).
    Shared(&'a mut KvCache),
    /// One per row: separate sequences decoded together ([`super::BatchKvCache`]).
    Rows(RowCaches<'a>),
}

impl<'a> From<Option<&'a mut KvCache>> for SelfCache<'a> {
    fn from(c: Option<&'a mut KvCache>) -> Self {
        c.map_or(SelfCache::None, SelfCache::Shared)
    }
}

/// Self-attention in its residual block: the first block of encoder and decoder layers.
#[derive(Debug, Clone)]
pub struct SelfAttentionBlock {
    attn: MultiHeadAttention,
    residual: Residual,
}

impl SelfAttentionBlock {
    /// Self-attention with `masks`, a cache for incremental decoding and RoPE.
    ///
    /// # Shapes
    /// `x`: (B, T, E) → ((B, T, E), weights (B, T, S) or (B, H, T, S))
    pub fn forward<'c>(
        &self,
        x: &Tensor,
        masks: &Masks,
        opts: &LayerOptions,
        cache: impl Into<SelfCache<'c>>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (cache, rows) = match cache.into() {
            SelfCache::None => (None, None),
            SelfCache::Shared(c) => (Some(c), None),
            SelfCache::Rows(r) => (None, Some(r)),
        };
        let mut weights = None;
        let x = self.residual.apply(x, opts.train, |h| {
            let out = self.attn.forward_heads(
                MhaInput::self_attn(h.x)
                    .query_norm(h.norm)
                    .key_padding_mask(masks.key_padding)
                    .attn_mask(masks.attn)
                    .causal(masks.causal)
                    .need_weights(opts.need_weights)
                    .cache(cache)
                    .row_caches(rows)
                    .rope(opts.rope)
                    .train(opts.train),
            )?;
            weights = out.weights;
            Ok(Branch::projection(
                out.context,
                self.attn.out_proj(),
                self.attn.kernels(),
            ))
        })?;
        Ok((x, weights))
    }

    pub fn attention(&self) -> &MultiHeadAttention {
        &self.attn
    }
}

/// Cross-attention over an encoder memory in its residual block.
#[derive(Debug, Clone)]
struct CrossAttentionBlock {
    attn: MultiHeadAttention,
    residual: Residual,
}

impl CrossAttentionBlock {
    fn forward(
        &self,
        x: &Tensor,
        memory: Memory,
        masks: &Masks,
        opts: &LayerOptions,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut weights = None;
        let x = self.residual.apply(x, opts.train, |h| {
            let input = match memory {
                Memory::Raw(m) => MhaInput::cross_attn(h.x, m).query_norm(h.norm),
                Memory::Projected(kv) => MhaInput::self_attn(h.x)
                    .static_kv(Some(kv))
                    .query_norm(h.norm),
            };
            let out = self.attn.forward_heads(
                input
                    .key_padding_mask(masks.key_padding)
                    .attn_mask(masks.attn)
                    .causal(masks.causal)
                    .need_weights(opts.need_weights)
                    .train(opts.train),
            )?;
            weights = out.weights;
            Ok(Branch::projection(
                out.context,
                self.attn.out_proj(),
                self.attn.kernels(),
            ))
        })?;
        Ok((x, weights))
    }
}

/// The feed-forward in its residual block.
#[derive(Debug, Clone)]
struct FeedForwardBlock {
    mlp: Mlp,
    residual: Residual,
}

impl FeedForwardBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.residual.apply(x, train, |h| self.mlp.branch(h, train))
    }
}

/// Self-attention and feed-forward, each in a residual block.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    self_attn: SelfAttentionBlock,
    ff: FeedForwardBlock,
}

impl EncoderLayer {
    /// Parameters: `self_attn.*`, `ff.*` (`linear{1,2}` or `{gate,up,down}_proj`),
    /// `norm{1,2}.*`, and `post_norm{1,2}.*` with sandwich norms.
    pub fn new(cfg: &LayerConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        // Created in this order (attention, feed-forward, then the norms) so that a seed
        // gives the same parameters as it always has.
        let attn = MultiHeadAttention::new(&cfg.mha(), &vp.pp("self_attn"))?;
        let mlp = Mlp::new(&cfg.mlp_config(), &vp.pp("ff"))?;
        let residual = |name: &str| Residual::new(cfg, &vp.pp(name), vp.dropout(cfg.dropout)?);
        let (attn_residual, ff_residual) = (residual("norm1")?, residual("norm2")?);
        Ok(EncoderLayer {
            self_attn: SelfAttentionBlock {
                attn,
                residual: attn_residual.with_post_norm(cfg, &vp.pp("post_norm1"))?,
            },
            ff: FeedForwardBlock {
                mlp,
                residual: ff_residual.with_post_norm(cfg, &vp.pp("post_norm2"))?,
            },
        })
    }

    pub fn self_attn(&self) -> &MultiHeadAttention {
        &self.self_attn.attn
    }

    /// # Shapes
    /// `x`: (B, T, E) → (B, T, E)
    pub fn forward(&self, x: &Tensor, masks: &Masks, train: bool) -> Result<Tensor> {
        let opts = LayerOptions {
            train,
            ..Default::default()
        };
        Ok(self.forward_with(x, masks, &opts, None)?.0)
    }

    /// Forward with a self-attention cache (decoder-only generation), RoPE and weights.
    ///
    /// # Shapes
    /// `x`: (B, T, E) → ((B, T, E), weights (B, T, S) or (B, H, T, S))
    pub fn forward_with<'c>(
        &self,
        x: &Tensor,
        masks: &Masks,
        opts: &LayerOptions,
        cache: impl Into<SelfCache<'c>>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (x, weights) = self.self_attn.forward(x, masks, opts, cache)?;
        Ok((self.ff.forward(&x, opts.train)?, weights))
    }
}

/// Masked self-attention, cross-attention over the encoder memory, and feed-forward.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: SelfAttentionBlock,
    cross_attn: CrossAttentionBlock,
    ff: FeedForwardBlock,
}

/// What a decoder layer returns.
#[derive(Debug, Clone)]
pub struct DecoderLayerOutput {
    /// (B, T, E)
    pub x: Tensor,
    /// Self-attention weights, when requested.
    pub self_weights: Option<Tensor>,
    /// Cross-attention weights (B, T, S) or (B, H, T, S), when requested.
    pub cross_weights: Option<Tensor>,
}

impl DecoderLayer {
    /// Parameters: `self_attn.*`, `cross_attn.*`, `ff.*`, `norm{1,2,3}.*`.
    pub fn new(cfg: &LayerConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let self_attn = MultiHeadAttention::new(&cfg.mha(), &vp.pp("self_attn"))?;
        let cross_attn = MultiHeadAttention::new(&cfg.mha(), &vp.pp("cross_attn"))?;
        let mlp = Mlp::new(&cfg.mlp_config(), &vp.pp("ff"))?;
        let residual = |name: &str| Residual::new(cfg, &vp.pp(name), vp.dropout(cfg.dropout)?);
        Ok(DecoderLayer {
            self_attn: SelfAttentionBlock {
                attn: self_attn,
                residual: residual("norm1")?,
            },
            cross_attn: CrossAttentionBlock {
                attn: cross_attn,
                residual: residual("norm2")?,
            },
            ff: FeedForwardBlock {
                mlp,
                residual: residual("norm3")?,
            },
        })
    }

    /// Project the encoder memory for this layer's cross-attention once (for decoding).
    pub fn project_memory(&self, memory: &Tensor) -> Result<ProjectedKv> {
        self.cross_attn.attn.project_kv(memory)
    }

    /// # Shapes
    /// `x`: (B, T, E), `memory`: (B, S, E) → (B, T, E)
    pub fn forward(
        &self,
        x: &Tensor,
        memory: &Tensor,
        tgt: &Masks,
        mem: &Masks,
        train: bool,
    ) -> Result<Tensor> {
        let opts = LayerOptions {
            train,
            ..Default::default()
        };
        Ok(self
            .forward_with(x, Memory::Raw(memory), tgt, mem, &opts, None)?
            .x)
    }

    /// Forward with a self-attention cache, projected memory, RoPE and attention weights.
    ///
    /// # Shapes
    /// `x`: (B, T, E), memory (B, S, E) → (B, T, E) and weights
    pub fn forward_with(
        &self,
        x: &Tensor,
        memory: Memory,
        tgt: &Masks,
        mem: &Masks,
        opts: &LayerOptions,
        cache: Option<&mut KvCache>,
    ) -> Result<DecoderLayerOutput> {
        let (x, self_weights) = self.self_attn.forward(x, tgt, opts, cache)?;
        let (x, cross_weights) = self.cross_attn.forward(&x, memory, mem, opts)?;
        Ok(DecoderLayerOutput {
            x: self.ff.forward(&x, opts.train)?,
            self_weights,
            cross_weights,
        })
    }
}

/// The encoder memory as a decoder layer sees it.
#[derive(Debug, Clone, Copy)]
pub enum Memory<'a> {
    /// (B, S, E), projected on every call.
    Raw(&'a Tensor),
    /// Keys/values projected once by [`DecoderLayer::project_memory`].
    Projected(&'a ProjectedKv),
}

/// The final norm of a stack, when it has one.
fn final_norm(cfg: &LayerConfig, final_norm: bool, vp: &VarPath) -> Result<Option<Norm>> {
    final_norm
        .then(|| Norm::new(cfg.d_model, &cfg.norm_config(), &vp.pp("norm")))
        .transpose()
}

/// A stack of encoder layers with an optional final norm.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    norm: Option<Norm>,
}

impl Encoder {
    /// Parameters: `layers.N.*`, `norm.*` when `final_norm`.
    pub fn new(cfg: &LayerConfig, n_layers: usize, final_norm: bool, vp: &VarPath) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|i| EncoderLayer::new(cfg, &vp.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = self::final_norm(cfg, final_norm, vp)?;
        Ok(Encoder { layers, norm })
    }

    pub fn layers(&self) -> &[EncoderLayer] {
        &self.layers
    }

    /// # Shapes
    /// `x`: (B, S, E) → (B, S, E)
    pub fn forward(&self, x: &Tensor, masks: &Masks, train: bool) -> Result<Tensor> {
        let opts = LayerOptions {
            train,
            ..Default::default()
        };
        self.forward_with(x, masks, &opts, None)
    }

    /// Forward with per-layer caches (decoder-only generation) and RoPE.
    ///
    /// # Shapes
    /// `x`: (B, S, E) → (B, S, E)
    pub fn forward_with(
        &self,
        x: &Tensor,
        masks: &Masks,
        opts: &LayerOptions,
        caches: Option<&mut [KvCache]>,
    ) -> Result<Tensor> {
        self.forward_each(x, |_| (*masks, *opts), caches)
    }

    /// [`Encoder::forward_with`] with each layer's masks and options from `per_layer(i)`
    /// (Gemma 3's sliding-window and global layers differ in both).
    ///
    /// # Shapes
    /// `x`: (B, S, E) → (B, S, E)
    pub fn forward_each<'m>(
        &self,
        x: &Tensor,
        per_layer: impl Fn(usize) -> (Masks<'m>, LayerOptions<'m>),
        mut caches: Option<&mut [KvCache]>,
    ) -> Result<Tensor> {
        if let Some(c) = &caches {
            if c.len() != self.layers.len() {
                return Err(Error::msg(format!(
                    "{} caches for {} layers",
                    c.len(),
                    self.layers.len()
                )));
            }
        }
        self.stack(x, |i, layer, x| {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let (masks, opts) = per_layer(i);
            Ok(layer.forward_with(x, &masks, &opts, cache)?.0)
        })
    }

    /// Separate sequences decoded together: row `b` of `x` continues sequence `b` of
    /// `caches`, at its own position; `per_layer(i)` gives layer `i`'s options and
    /// sliding window.
    ///
    /// # Shapes
    /// `x`: (B, T, E) with B = `caches.rows()` → (B, T, E)
    pub fn forward_rows<'m>(
        &self,
        x: &Tensor,
        per_layer: impl Fn(usize) -> (LayerOptions<'m>, Option<usize>),
        caches: &mut BatchKvCache,
    ) -> Result<Tensor> {
        if caches.n_layers() != self.layers.len() {
            return Err(Error::msg(format!(
                "a batch cache of {} layers for {} layers",
                caches.n_layers(),
                self.layers.len()
            )));
        }
        self.stack(x, |i, layer, x| {
            let (opts, window) = per_layer(i);
            let rows = RowCaches {
                caches: caches.layer_mut(i),
                window,
            };
            Ok(layer
                .forward_with(x, &Masks::none(), &opts, SelfCache::Rows(rows))?
                .0)
        })
    }

    /// `f` through the layers in turn, then the final norm.
    fn stack(
        &self,
        x: &Tensor,
        mut f: impl FnMut(usize, &EncoderLayer, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = f(i, layer, &x)?;
        }
        match &self.norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }
}

/// Self-attention caches and projected memory of every decoder layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct DecoderState {
    pub self_kv: Vec<KvCache>,
    pub memory_kv: Vec<ProjectedKv>,
}

impl DecoderState {
    /// Keep only the batch rows in `indices` (beam search reorders hypotheses).
    pub fn select_rows(&mut self, indices: &Tensor) -> Result<()> {
        for c in self.self_kv.iter_mut() {
            c.select_rows(indices)?;
        }
        for m in self.memory_kv.iter_mut() {
            *m = m.select_rows(indices)?;
        }
        Ok(())
    }
}

/// A stack of decoder layers with an optional final norm.
#[derive(Debug, Clone)]
pub struct Decoder {
    layers: Vec<DecoderLayer>,
    norm: Option<Norm>,
}

/// What the decoder stack returns.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// (B, T, E)
    pub x: Tensor,
    /// Cross-attention weights of every layer, when requested.
    pub cross_weights: Vec<Tensor>,
}

impl Decoder {
    /// Parameters: `layers.N.*`, `norm.*` when `final_norm`.
    pub fn new(cfg: &LayerConfig, n_layers: usize, final_norm: bool, vp: &VarPath) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|i| DecoderLayer::new(cfg, &vp.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = self::final_norm(cfg, final_norm, vp)?;
        Ok(Decoder { layers, norm })
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// # Shapes
    /// `x`: (B, T, E), `memory`: (B, S, E) → (B, T, E)
    pub fn forward(
        &self,
        x: &Tensor,
        memory: &Tensor,
        tgt: &Masks,
        mem: &Masks,
        train: bool,
    ) -> Result<Tensor> {
        let opts = LayerOptions {
            train,
            ..Default::default()
        };
        Ok(self.forward_with(x, memory, tgt, mem, &opts, None)?.x)
    }

    /// A fresh decoding state for `memory` (B, S, E): empty caches, memory projected per layer.
    pub fn start_state(&self, memory: &Tensor) -> Result<DecoderState> {
        Ok(DecoderState {
            self_kv: self.layers.iter().map(|_| KvCache::new()).collect(),
            memory_kv: self
                .layers
                .iter()
                .map(|l| l.project_memory(memory))
                .collect::<Result<_>>()?,
        })
    }

    /// Forward with optional incremental state, RoPE and attention weights.
    ///
    /// # Shapes
    /// `x`: (B, T, E), `memory`: (B, S, E) → (B, T, E)
    pub fn forward_with(
        &self,
        x: &Tensor,
        memory: &Tensor,
        tgt: &Masks,
        mem: &Masks,
        opts: &LayerOptions,
        mut state: Option<&mut DecoderState>,
    ) -> Result<DecoderOutput> {
        let mut x = x.clone();
        let mut cross_weights = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let out = match state.as_deref_mut() {
                Some(st) => layer.forward_with(
                    &x,
                    Memory::Projected(&st.memory_kv[i]),
                    tgt,
                    mem,
                    opts,
                    Some(&mut st.self_kv[i]),
                )?,
                None => layer.forward_with(&x, Memory::Raw(memory), tgt, mem, opts, None)?,
            };
            x = out.x;
            cross_weights.extend(out.cross_weights);
        }
        let x = match &self.norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        Ok(DecoderOutput { x, cross_weights })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{DecoderOnlyConfig, EncoderDecoderConfig};
    use crate::nn::var_store::{InitScheme, VarStore};
    use crate::nn::AttnMask;
    use candle_core::{DType, Device};

    fn randn(rng: &mut crate::rng::Rng, dims: &[usize]) -> Tensor {
        crate::kernels::tests::randn(rng, dims, DType::F64)
    }

    /// Output and every parameter's gradient of `sum(layer(x) * g)`.
    fn run(vs: &VarStore, out: Tensor, g: &Tensor) -> (Vec<f64>, Vec<(String, Vec<f64>)>) {
        let grads = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let params = vs
            .vars()
            .into_iter()
            .map(|(name, v)| {
                let g = grads
                    .get(&v)
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                (name, flat(g))
            })
            .collect();
        (flat(&out), params)
    }

    fn assert_close(
        what: &str,
        a: &(Vec<f64>, Vec<(String, Vec<f64>)>),
        b: &(Vec<f64>, Vec<(String, Vec<f64>)>),
    ) {
        let worst = |x: &[f64], y: &[f64]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max)
        };
        assert!(worst(&a.0, &b.0) < 1e-12, "{what}: outputs differ");
        for ((name, ga), (_, gb)) in a.1.iter().zip(&b.1) {
            let d = worst(ga, gb);
            assert!(d < 1e-10, "{what}: d{name} differs by {d}");
        }
    }

    /// With dropout 0, training (the fused output projections of `kernels::projection`) and
    /// evaluation (linear layers, activation and sum as separate ops) compute the same
    /// function: same outputs and parameter gradients, for each activation and norm placement,
    /// with and without biases.
    #[test]
    fn fused_residual_projections_equal_the_composed_layers() {
        let mut rng = crate::rng::Rng::new(11);
        let (b, t, s, e) = (2, 5, 4, 8);
        let cases = [
            (Activation::Relu, false, true),
            (Activation::Gelu, true, false),
            (Activation::GeluTanh, true, true),
        ];
        for (activation, norm_first, bias) in cases {
            let cfg = LayerConfig::new(e, 2, 16, 0.0, activation, norm_first, 1e-5, bias);
            let what = format!("{activation:?} norm_first {norm_first} bias {bias}");
            let x = randn(&mut rng, &[b, t, e]);
            let memory = randn(&mut rng, &[b, s, e]);
            let g = randn(&mut rng, &[b, t, e]);
            let pad = AttnMask::from_lengths(&[4, 2], s, &Device::Cpu).unwrap();
            let mem_masks = Masks::none().with_key_padding(Some(&pad));

            let vs = VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, 1);
            let enc = EncoderLayer::new(&cfg, &vs.root().pp("enc")).unwrap();
            let runs: Vec<_> = [true, false]
                .iter()
                .map(|&train| run(&vs, enc.forward(&x, &Masks::causal(), train).unwrap(), &g))
                .collect();
            assert_close(&format!("encoder layer, {what}"), &runs[0], &runs[1]);

            let vs = VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, 2);
            let dec = DecoderLayer::new(&cfg, &vs.root().pp("dec")).unwrap();
            let runs: Vec<_> = [true, false]
                .iter()
                .map(|&train| {
                    let out = dec
                        .forward(&x, &memory, &Masks::causal(), &mem_masks, train)
                        .unwrap();
                    run(&vs, out, &g)
                })
                .collect();
            assert_close(&format!("decoder layer, {what}"), &runs[0], &runs[1]);
        }
    }

    /// Layers of every new kind (RMS norm with and without `1 + weight`, gated MLPs,
    /// grouped-query attention, query/key norms, RoPE) built twice from the same seed, once on
    /// the fused kernels and once on composed ops only, in training: same outputs and
    /// parameter gradients.
    #[test]
    fn fused_and_composed_layers_agree_for_every_block_kind() {
        use crate::kernels::Kernels;
        let mut rng = crate::rng::Rng::new(21);
        let (b, t, s, e) = (2, 5, 4, 16);
        let llama = LayerConfig {
            norm: NormKind::RmsNorm,
            mlp: MlpKind::Gated,
            activation: Activation::Silu,
            n_kv_heads: Some(2),
            ..LayerConfig::new(e, 4, 24, 0.0, Activation::Silu, true, 1e-6, false)
        };
        let gemma = LayerConfig {
            norm_unit_offset: true,
            activation: Activation::GeluTanh,
            n_kv_heads: Some(1),
            head_dim: Some(6),
            qk_norm: true,
            ..llama.clone()
        };
        let post_norm = LayerConfig {
            mlp: MlpKind::Gated,
            n_kv_heads: Some(2),
            ..LayerConfig::new(e, 4, 24, 0.0, Activation::Silu, false, 1e-5, true)
        };
        let rope = crate::nn::Rope::new(6, 16, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let rope4 = crate::nn::Rope::new(4, 16, 10000.0, DType::F64, &Device::Cpu).unwrap();
        for (name, cfg, rope) in [
            ("llama", &llama, &rope4),
            ("gemma", &gemma, &rope),
            ("post-norm gated, biases", &post_norm, &rope4),
        ] {
            let x = randn(&mut rng, &[b, t, e]);
            let memory = randn(&mut rng, &[b, s, e]);
            let g = randn(&mut rng, &[b, t, e]);
            let opts = LayerOptions {
                train: true,
                rope: Some(rope),
                need_weights: NeedWeights::No,
            };
            let runs: Vec<_> = [Kernels::Fused, Kernels::Composed]
                .iter()
                .map(|&k| {
                    let vs = VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, 3)
                        .with_kernels(k);
                    let enc = EncoderLayer::new(cfg, &vs.root().pp("enc")).unwrap();
                    let dec = DecoderLayer::new(cfg, &vs.root().pp("dec")).unwrap();
                    let h = enc
                        .forward_with(&x, &Masks::causal(), &opts, None)
                        .unwrap()
                        .0;
                    let mem = Memory::Raw(&memory);
                    let out = dec
                        .forward_with(&h, mem, &Masks::causal(), &Masks::none(), &opts, None)
                        .unwrap()
                        .x;
                    run(&vs, out, &g)
                })
                .collect();
            assert_close(name, &runs[0], &runs[1]);
        }
    }

    /// Gemma 3's sandwich norms, x + post_norm(f(norm(x))) in each block: with both
    /// post-norms' weights zero the branches vanish and the layer is the identity; the
    /// gradient through the whole layer matches finite differences.
    #[test]
    fn sandwich_norms_normalize_each_branch_before_the_sum() {
        let mut rng = crate::rng::Rng::new(23);
        let e = 8;
        let cfg = LayerConfig {
            norm: NormKind::RmsNorm,
            mlp: MlpKind::Gated,
            n_kv_heads: Some(1),
            head_dim: Some(6),
            qk_norm: true,
            post_norm: true,
            ..LayerConfig::new(e, 2, 12, 0.0, Activation::GeluTanh, true, 1e-6, false)
        };
        let vs = VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, 5);
        let layer = EncoderLayer::new(&cfg, &vs.root()).unwrap();
        let names: Vec<String> = vs.vars().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"post_norm1.weight".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"post_norm2.weight".to_string()));
        let x = randn(&mut rng, &[1, 4, e]);
        let g = randn(&mut rng, &[1, 4, e]);
        let f = |t: &Tensor| layer.forward(t, &Masks::causal(), false).unwrap();
        crate::kernels::tests::finite_difference_check(&x, &g, &f);
        assert!(
            max_abs(&(f(&x) - &x).unwrap()) > 1e-3,
            "the branches contribute"
        );
        for n in ["post_norm1.weight", "post_norm2.weight"] {
            let v = vs.get(n).unwrap();
            v.set(&v.zeros_like().unwrap()).unwrap();
        }
        assert!(max_abs(&(f(&x) - &x).unwrap()) < 1e-12);
        // Sandwich norms are a pre-norm layer's.
        let post = LayerConfig {
            norm_first: false,
            ..cfg
        };
        assert!(post
            .validate()
            .unwrap_err()
            .to_string()
            .contains("post_norm"));
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// SwiGLU by hand: down(silu(x W_gate) ⊙ x W_up).
    #[test]
    fn gated_mlp_is_down_of_act_gate_times_up() {
        let mut rng = crate::rng::Rng::new(22);
        let vs = VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, 4);
        let cfg = MlpConfig {
            d_model: 6,
            d_ff: 10,
            kind: MlpKind::Gated,
            activation: Activation::Silu,
            dropout: 0.0,
            bias: false,
        };
        let mlp = Mlp::new(&cfg, &vs.root()).unwrap();
        let x = randn(&mut rng, &[3, 6]);
        let w = |n: &str| vs.get(&format!("{n}.weight")).unwrap().as_tensor().clone();
        let gate = x.matmul(&w("gate_proj").t().unwrap()).unwrap();
        let silu = (&gate * candle_nn::ops::sigmoid(&gate).unwrap()).unwrap();
        let up = x.matmul(&w("up_proj").t().unwrap()).unwrap();
        let want = (silu * up)
            .unwrap()
            .matmul(&w("down_proj").t().unwrap())
            .unwrap();
        let got = mlp.forward(&x, false).unwrap();
        assert!(crate::kernels::tests::max_diff(&got, &want) < 1e-12);
        assert_eq!(w("down_proj").dims(), [6, 10]);
    }

    #[test]
    fn ffn_dropout_is_optional_and_gpt_has_none() {
        // A layer config saved before the field existed still loads, meaning `dropout`.
        let json = r#"{"d_model": 8, "n_heads": 2, "d_ff": 16, "dropout": 0.1,
            "activation": "relu", "norm_first": false, "layer_norm_eps": 1e-5, "bias": true}"#;
        let cfg: LayerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.ffn_dropout, None);
        assert!(!serde_json::to_string(&cfg).unwrap().contains("ffn_dropout"));
        // GPT-2 / nanoGPT: dropout after the MLP's output only; the paper's model (and
        // PyTorch's layers) also inside it.
        let mut gpt = DecoderOnlyConfig::tiny(10);
        gpt.dropout = 0.2;
        assert_eq!(gpt.layer().ffn_dropout, Some(0.0));
        assert_eq!(EncoderDecoderConfig::tiny(10).layer().ffn_dropout, None);
    }
}
