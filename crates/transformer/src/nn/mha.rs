//! Multi-head attention: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, with
//! head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).
//!
//! Dimension letters: `B` batch, `T` query positions, `S` key positions, `E` = d_model,
//! `H` heads, `D` = E / H.

use candle_core::{Tensor, D};

use super::attention::{scaled_dot_product_attention, AttnMask, SdpaOptions};
use super::dropout::Dropout;
use super::embedding::Rope;
use super::linear::{linear, Linear};
use super::norm::LayerNorm;
use super::var_store::{Init, VarPath};
use crate::{Error, Result};

/// Shape of a multi-head attention block.
#[derive(Debug, Clone, PartialEq)]
pub struct MhaConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// Width of the key input (defaults to d_model).
    pub kdim: Option<usize>,
    /// Width of the value input (defaults to d_model).
    pub vdim: Option<usize>,
    /// Biases on the input and output projections.
    pub bias: bool,
    /// Dropout on the attention weights (training only).
    pub dropout: f64,
}

impl MhaConfig {
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        MhaConfig {
            d_model,
            n_heads,
            kdim: None,
            vdim: None,
            bias: true,
            dropout: 0.0,
        }
    }

    /// Check that the shape is usable: d_model divisible by the head count, nothing zero.
    pub fn validate(&self) -> Result<()> {
        if self.n_heads == 0 || self.d_model == 0 {
            return Err(Error::Config(format!(
                "attention needs d_model > 0 and n_heads > 0, got d_model {} and n_heads {}",
                self.d_model, self.n_heads
            )));
        }
        if self.d_model % self.n_heads != 0 {
            return Err(Error::Config(format!(
                "d_model ({}) must be divisible by n_heads ({})",
                self.d_model, self.n_heads
            )));
        }
        Ok(())
    }
}

/// Which attention weights to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NeedWeights {
    #[default]
    No,
    /// Averaged over heads: (B, T, S), as `nn.MultiheadAttention` returns by default.
    Averaged,
    /// Per head: (B, H, T, S).
    PerHead,
}

/// Keys and values kept between decoding steps of self-attention.
///
/// The positions live in buffers with spare capacity that grow by doubling, and each step
/// writes its new keys and values in place: appending by concatenation would copy the whole
/// cache at every generated token. Attention reads the cached positions as a strided view.
#[derive(Debug, Default)]
pub struct KvCache {
    /// (B, H, capacity, D); positions 0..len are the cache.
    k: Option<Tensor>,
    /// (B, H, capacity, Dv)
    v: Option<Tensor>,
    len: usize,
}

impl Clone for KvCache {
    /// A deep copy: the clone must not write into the original's buffers.
    fn clone(&self) -> Self {
        KvCache {
            k: self
                .k
                .as_ref()
                .map(|t| t.copy().expect("copying a KV cache")),
            v: self
                .v
                .as_ref()
                .map(|t| t.copy().expect("copying a KV cache")),
            len: self.len,
        }
    }
}

impl KvCache {
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.k = None;
        self.v = None;
        self.len = 0;
    }

    /// The cached keys and values, (B, H, len, D) views.
    fn cached(&self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match (&self.k, &self.v) {
            (Some(k), Some(v)) => Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)),
            _ => None,
        })
    }

    /// Keep only the batch rows in `indices` (beam search reorders hypotheses).
    pub fn select_rows(&mut self, indices: &Tensor) -> Result<()> {
        // Whole buffers (contiguous, as index_select needs), so the capacity is kept.
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            self.k = Some(k.index_select(indices, 0)?);
            self.v = Some(v.index_select(indices, 0)?);
        }
        Ok(())
    }

    /// Drop the oldest positions so that at most `max_len` remain (sliding window).
    pub fn truncate_front(&mut self, max_len: usize) -> Result<()> {
        let len = self.len();
        if len > max_len {
            let (k, v) = self.cached()?.expect("a non-empty cache has buffers");
            let drop = len - max_len;
            self.k = Some(k.narrow(2, drop, max_len)?.contiguous()?);
            self.v = Some(v.narrow(2, drop, max_len)?.contiguous()?);
            self.len = max_len;
        }
        Ok(())
    }

    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dims()[2];
        let need = self.len + t;
        let capacity = self.k.as_ref().map_or(0, |k| k.dims()[2]);
        if need > capacity {
            let capacity = need.next_power_of_two().max(16);
            let grow = |new: &Tensor, old: Option<Tensor>| -> Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                let buf = Tensor::zeros((b, h, capacity, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = self.cached()?;
            let (old_k, old_v) = match old {
                Some((k, v)) => (Some(k), Some(v)),
                None => (None, None),
            };
            self.k = Some(grow(&k, old_k)?);
            self.v = Some(grow(&v, old_v)?);
        }
        let (kb, vb) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok(self.cached()?.expect("just filled"))
    }
}

/// Keys and values of an encoder memory, projected once and reused at every decoding step.
#[derive(Debug, Clone)]
pub struct ProjectedKv {
    /// (B, H, S, D)
    pub k: Tensor,
    /// (B, H, S, D)
    pub v: Tensor,
}

impl ProjectedKv {
    /// Keep only the batch rows in `indices`.
    pub fn select_rows(&self, indices: &Tensor) -> Result<ProjectedKv> {
        Ok(ProjectedKv {
            k: self.k.index_select(indices, 0)?,
            v: self.v.index_select(indices, 0)?,
        })
    }
}

/// Inputs of [`MultiHeadAttention::forward`]. Build with [`MhaInput::self_attn`] or
/// [`MhaInput::cross_attn`] and the chained setters.
pub struct MhaInput<'a> {
    /// (B, T, E)
    pub query: &'a Tensor,
    /// (B, S, kdim); `None` for self-attention (the query is used).
    pub key: Option<&'a Tensor>,
    /// (B, S, vdim); `None` means the key tensor is also the value.
    pub value: Option<&'a Tensor>,
    /// (B, S)
    pub key_padding_mask: Option<&'a AttnMask>,
    /// (T, S) or (B·H, T, S)
    pub attn_mask: Option<&'a AttnMask>,
    pub causal: bool,
    pub need_weights: NeedWeights,
    /// Self-attention cache for incremental decoding: new keys/values are appended to it.
    pub cache: Option<&'a mut KvCache>,
    /// Precomputed keys/values (cross-attention over a fixed memory); `key`/`value` are ignored.
    pub static_kv: Option<&'a ProjectedKv>,
    /// Rotary position embedding applied to queries and keys.
    pub rope: Option<&'a Rope>,
    pub train: bool,
    /// Pre-norm: attend from `norm(query)` (and, in self-attention, to it), computed here so
    /// that in training it fuses with the packed input projection.
    pub query_norm: Option<&'a LayerNorm>,
}

impl<'a> MhaInput<'a> {
    pub fn self_attn(x: &'a Tensor) -> Self {
        MhaInput {
            query: x,
            key: None,
            value: None,
            key_padding_mask: None,
            attn_mask: None,
            causal: false,
            need_weights: NeedWeights::No,
            cache: None,
            static_kv: None,
            rope: None,
            train: false,
            query_norm: None,
        }
    }

    pub fn cross_attn(query: &'a Tensor, memory: &'a Tensor) -> Self {
        MhaInput {
            key: Some(memory),
            ..Self::self_attn(query)
        }
    }

    /// Separate key and value inputs.
    pub fn qkv(query: &'a Tensor, key: &'a Tensor, value: &'a Tensor) -> Self {
        MhaInput {
            key: Some(key),
            value: Some(value),
            ..Self::self_attn(query)
        }
    }

    pub fn key_padding_mask(mut self, m: Option<&'a AttnMask>) -> Self {
        self.key_padding_mask = m;
        self
    }

    pub fn attn_mask(mut self, m: Option<&'a AttnMask>) -> Self {
        self.attn_mask = m;
        self
    }

    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn need_weights(mut self, w: NeedWeights) -> Self {
        self.need_weights = w;
        self
    }

    pub fn cache(mut self, c: Option<&'a mut KvCache>) -> Self {
        self.cache = c;
        self
    }

    pub fn static_kv(mut self, kv: Option<&'a ProjectedKv>) -> Self {
        self.static_kv = kv;
        self
    }

    pub fn rope(mut self, r: Option<&'a Rope>) -> Self {
        self.rope = r;
        self
    }

    pub fn train(mut self, train: bool) -> Self {
        self.train = train;
        self
    }

    pub fn query_norm(mut self, norm: Option<&'a LayerNorm>) -> Self {
        self.query_norm = norm;
        self
    }
}

/// Output of multi-head attention.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// (B, T, E)
    pub context: Tensor,
    /// (B, T, S) averaged or (B, H, T, S) per head, when requested.
    pub weights: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum InProj {
    /// PyTorch's packed `in_proj_weight` (3E, E): rows [0, E) for Q, [E, 2E) K, [2E, 3E) V.
    Packed(Linear),
    /// Separate projections when the key or value width differs from d_model.
    Separate { q: Linear, k: Linear, v: Linear },
}

/// Multi-head attention, batch first.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    in_proj: InProj,
    out_proj: Linear,
    n_heads: usize,
    d_model: usize,
    kdim: usize,
    vdim: usize,
    dropout: Dropout,
}

impl MultiHeadAttention {
    /// Parameters: `in_proj.{weight,bias}` (packed) or `{q,k,v}_proj.{weight,bias}`,
    /// `out_proj.{weight,bias}`.
    pub fn new(cfg: &MhaConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let e = cfg.d_model;
        let kdim = cfg.kdim.unwrap_or(e);
        let vdim = cfg.vdim.unwrap_or(e);
        let in_proj = if kdim == e && vdim == e {
            InProj::Packed(Linear::with_bias_init(
                e,
                3 * e,
                cfg.bias,
                false,
                Init::AttnBias,
                &vp.pp("in_proj"),
            )?)
        } else {
            let mk = |d_in: usize, name: &str| {
                Linear::with_bias_init(d_in, e, cfg.bias, false, Init::AttnBias, &vp.pp(name))
            };
            InProj::Separate {
                q: mk(e, "q_proj")?,
                k: mk(kdim, "k_proj")?,
                v: mk(vdim, "v_proj")?,
            }
        };
        let out_proj =
            Linear::with_bias_init(e, e, cfg.bias, true, Init::AttnBias, &vp.pp("out_proj"))?;
        Ok(MultiHeadAttention {
            in_proj,
            out_proj,
            n_heads: cfg.n_heads,
            d_model: e,
            kdim,
            vdim,
            dropout: Dropout::new(cfg.dropout, vp.dropout_rng())?,
        })
    }

    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    pub fn d_model(&self) -> usize {
        self.d_model
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    fn check_width(&self, what: &str, x: &Tensor, width: usize) -> Result<(usize, usize)> {
        match *x.dims() {
            [b, t, w] if w == width => Ok((b, t)),
            _ => Err(Error::shape(
                format!("attention {what}"),
                format!("(B, T, {width})"),
                x.dims(),
            )),
        }
    }

    /// (B, L, E) -> (B, H, L, D)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.n_heads, self.head_dim()))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    fn project(&self, x: &Tensor, which: usize) -> Result<Tensor> {
        let e = self.d_model;
        Ok(match &self.in_proj {
            InProj::Packed(p) => {
                let w = p.weight().narrow(0, which * e, e)?;
                let b = p.bias().map(|b| b.narrow(0, which * e, e)).transpose()?;
                linear(x, &w, b.as_ref())?
            }
            InProj::Separate { q, k, v } => [q, k, v][which].forward(x)?,
        })
    }

    /// Project an encoder memory into keys and values once, for reuse across decoding steps.
    ///
    /// # Shapes
    /// `memory`: (B, S, kdim) (used for both keys and values) → k, v: (B, H, S, D)
    pub fn project_kv(&self, memory: &Tensor) -> Result<ProjectedKv> {
        self.check_width("memory", memory, self.kdim)?;
        if self.kdim != self.vdim {
            return Err(Error::msg(
                "project_kv needs kdim == vdim (one memory tensor serves keys and values)",
            ));
        }
        let (k, v) = self.project_key_value(memory, memory, true)?;
        Ok(ProjectedKv {
            k: self.split_heads(&k)?,
            v: self.split_heads(&v)?,
        })
    }

    fn project_key_value(
        &self,
        key: &Tensor,
        value: &Tensor,
        same: bool,
    ) -> Result<(Tensor, Tensor)> {
        let e = self.d_model;
        match (&self.in_proj, same) {
            (InProj::Packed(p), true) => {
                // One matmul for K and V together.
                let w = p.weight().narrow(0, e, 2 * e)?;
                let b = p.bias().map(|b| b.narrow(0, e, 2 * e)).transpose()?;
                let kv = linear(key, &w, b.as_ref())?;
                Ok((kv.narrow(D::Minus1, 0, e)?, kv.narrow(D::Minus1, e, e)?))
            }
            _ => Ok((self.project(key, 1)?, self.project(value, 2)?)),
        }
    }

    /// # Shapes
    /// - query (B, T, E); key (B, S, kdim); value (B, S, vdim)
    /// - key_padding_mask (B, S); attn_mask (T, S) or (B·H, T, S)
    /// - returns context (B, T, E) and weights (B, T, S) or (B, H, T, S)
    pub fn forward(&self, input: MhaInput) -> Result<MhaOutput> {
        let out = self.forward_heads(input)?;
        Ok(MhaOutput {
            context: self.out_proj.forward(&out.context)?,
            weights: out.weights,
        })
    }

    /// The output projection W^O, which [`Self::forward_heads`] leaves to the caller.
    pub(crate) fn out_proj(&self) -> &Linear {
        &self.out_proj
    }

    /// [`Self::forward`] up to Concat(head_1..head_h), before W^O: a layer applies W^O fused
    /// with its residual connection.
    pub(crate) fn forward_heads(&self, input: MhaInput) -> Result<MhaOutput> {
        let MhaInput {
            query,
            key,
            value,
            key_padding_mask,
            attn_mask,
            causal,
            need_weights,
            cache,
            static_kv,
            rope,
            train,
            query_norm,
        } = input;
        let e = self.d_model;
        let (b, t) = self.check_width("query", query, e)?;
        let is_self = key.is_none() && static_kv.is_none();
        // Self-attention through the packed projection takes norm(query) fused with it;
        // the other paths use the normalized query itself.
        let fuse_norm = is_self && matches!(self.in_proj, InProj::Packed(_));
        let normed;
        let query = match query_norm {
            Some(norm) if !fuse_norm => {
                normed = norm.forward(query)?;
                &normed
            }
            _ => query,
        };

        // Q, K, V: (B, H, L, D)
        let (q, k, v) = if let Some(kv) = static_kv {
            (
                self.split_heads(&self.project(query, 0)?)?,
                kv.k.clone(),
                kv.v.clone(),
            )
        } else if is_self {
            let qkv = match (&self.in_proj, query_norm) {
                (InProj::Packed(p), Some(norm)) => norm.forward_linear(query, p, train)?,
                (InProj::Packed(p), None) => p.forward(query)?,
                (InProj::Separate { .. }, _) => Tensor::cat(
                    &[
                        self.project(query, 0)?,
                        self.project(query, 1)?,
                        self.project(query, 2)?,
                    ],
                    D::Minus1,
                )?,
            };
            // (B, T, 3E) -> (B, T, 3H, D), then each of q, k, v as a strided (B, H, T, D)
            // view: the fused kernel reads them in place, the other paths copy what they
            // need. (`Tensor::get` would copy: it reshapes the non-contiguous slice.)
            let h = self.n_heads;
            let qkv = qkv.reshape((b, t, 3 * h, self.head_dim()))?;
            let part = |i: usize| qkv.narrow(2, i * h, h)?.transpose(1, 2);
            (part(0)?, part(1)?, part(2)?)
        } else {
            let key = key.unwrap();
            let (bk, _) = self.check_width("key", key, self.kdim)?;
            let same = value.is_none();
            let value = value.unwrap_or(key);
            let (bv, _) = self.check_width("value", value, self.vdim)?;
            if bk != b || bv != b || key.dims()[1] != value.dims()[1] {
                return Err(Error::shape(
                    "attention key/value",
                    format!("batch {b} and equal lengths (key {:?})", key.dims()),
                    value.dims(),
                ));
            }
            let (k, v) = self.project_key_value(key, value, same)?;
            (
                self.split_heads(&self.project(query, 0)?)?,
                self.split_heads(&k)?,
                self.split_heads(&v)?,
            )
        };

        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, offset)?, r.apply(&k, offset)?),
            None => (q, k),
        };
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };

        let out = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            &SdpaOptions {
                attn_mask,
                key_padding_mask,
                causal,
                scale: None,
                dropout: Some(&self.dropout),
                train,
                need_weights: need_weights != NeedWeights::No,
            },
        )?;
        // (B, H, T, D) -> (B, T, E)
        let context = out.context.transpose(1, 2)?.reshape((b, t, e))?;
        let weights = match (need_weights, out.weights) {
            (NeedWeights::Averaged, Some(w)) => Some(w.mean(1)?),
            (NeedWeights::PerHead, Some(w)) => Some(w),
            _ => None,
        };
        Ok(MhaOutput { context, weights })
    }
}
