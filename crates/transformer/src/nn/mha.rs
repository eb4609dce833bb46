//! Multi-head attention: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, with
//! head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).
//!
//! Grouped-query attention (Ainslie et al. 2023) shares each key/value head among
//! `n_heads / n_kv_heads` query heads; `n_kv_heads = n_heads` is the paper's attention,
//! `n_kv_heads = 1` multi-query attention. Optional query/key norms (Gemma 3, OLMo) normalize
//! each head's queries and keys before the rotary embedding.
//!
//! Dimension letters: `B` batch, `T` query positions, `S` key positions, `E` = d_model,
//! `H` query heads, `Hkv` key/value heads, `D` head width (E / H unless set).

use candle_core::{Tensor, D};

use super::attention::{scaled_dot_product_attention, sliding_window_mask, AttnMask, SdpaOptions};
use super::dropout::Dropout;
use super::embedding::Rope;
use super::linear::{linear, Linear};
use super::norm::{Norm, NormConfig};
use super::var_store::{Init, VarPath};
use crate::autograd::ops;
use crate::kernels::Kernels;
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
    /// Key/value heads (grouped-query attention); `None` means `n_heads`.
    pub n_kv_heads: Option<usize>,
    /// Width of each head; `None` means d_model / n_heads.
    pub head_dim: Option<usize>,
    /// Norms over each head's queries and keys (`q_norm.*`, `k_norm.*`), applied before RoPE.
    pub qk_norm: Option<NormConfig>,
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
            n_kv_heads: None,
            head_dim: None,
            qk_norm: None,
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Width of each head.
    pub fn head_width(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Check that the shape is usable: d_model divisible by the head count (unless the head
    /// width is given), key/value heads dividing the query heads, nothing zero.
    pub fn validate(&self) -> Result<()> {
        if self.n_heads == 0 || self.d_model == 0 {
            return Err(Error::invalid(
                "attention d_model and n_heads",
                "both > 0",
                format!("d_model {} and n_heads {}", self.d_model, self.n_heads),
            ));
        }
        if self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::invalid(
                format!("d_model ({})", self.d_model),
                format!(
                    "divisible by n_heads ({}) unless head_dim is set",
                    self.n_heads
                ),
                format!("remainder {}", self.d_model % self.n_heads),
            ));
        }
        if self.head_dim == Some(0) {
            return Err(Error::invalid("head_dim", "> 0", "0"));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return Err(Error::invalid(
                "n_kv_heads",
                format!("> 0 and dividing n_heads = {}", self.n_heads),
                kv.to_string(),
            ));
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

/// The caches of a batch of independent sequences (a server's requests): per layer, one
/// [`KvCache`] per sequence, so that sequences of different lengths decode together, each
/// weight read once per step for all of them, and may join or leave between steps.
///
/// A sequence joins with the per-layer caches of its own prompt (e.g. from
/// `CausalLm::forward_cached_last` on a batch of one): its row is the next index.
#[derive(Debug, Clone, Default)]
pub struct BatchKvCache {
    /// [layer][row]
    layers: Vec<Vec<KvCache>>,
}

impl BatchKvCache {
    /// No sequences yet, for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        BatchKvCache {
            layers: (0..n_layers).map(|_| Vec::new()).collect(),
        }
    }

    /// Sequences in the batch.
    pub fn rows(&self) -> usize {
        self.layers.first().map_or(0, Vec::len)
    }

    /// Cached positions of sequence `row`.
    pub fn len_of(&self, row: usize) -> usize {
        self.layers.first().map_or(0, |l| l[row].len())
    }

    /// Add a sequence (its per-layer caches, batch 1); it becomes the last row.
    pub fn push(&mut self, caches: Vec<KvCache>) -> Result<()> {
        if caches.len() != self.layers.len() {
            return Err(Error::msg(format!(
                "a sequence with {} layer caches joining a batch of {} layers",
                caches.len(),
                self.layers.len()
            )));
        }
        if let Some(k) = caches.iter().find_map(|c| c.k.as_ref()) {
            if k.dims()[0] != 1 {
                return Err(Error::shape(
                    "a joining sequence's cache",
                    "batch 1",
                    k.dims(),
                ));
            }
        }
        for (layer, c) in self.layers.iter_mut().zip(caches) {
            layer.push(c);
        }
        Ok(())
    }

    /// Take sequence `row` out of the batch (the rows after it move up by one), returning its
    /// per-layer caches.
    pub fn remove(&mut self, row: usize) -> Result<Vec<KvCache>> {
        if row >= self.rows() {
            return Err(Error::input(
                "batch row",
                format!("below {}", self.rows()),
                row.to_string(),
            ));
        }
        Ok(self.layers.iter_mut().map(|l| l.remove(row)).collect())
    }

    /// Layer `i`'s caches, one per row.
    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut [KvCache] {
        &mut self.layers[i]
    }

    /// Layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
}

/// Self-attention over per-sequence caches ([`BatchKvCache`]): row `b` of the input continues
/// sequence `b`, at its own position, and attends causally to its own cache only.
pub struct RowCaches<'a> {
    /// One per row of the batch.
    pub caches: &'a mut [KvCache],
    /// Attend to the last `window` positions only (sliding-window layers).
    pub window: Option<usize>,
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
    /// Per-sequence caches instead of `cache` (batched decoding of separate sequences):
    /// masks come from the causal offset of each row and the window; `attn_mask` and
    /// `key_padding_mask` must be unset.
    pub rows: Option<RowCaches<'a>>,
    /// Precomputed keys/values (cross-attention over a fixed memory); `key`/`value` are ignored.
    pub static_kv: Option<&'a ProjectedKv>,
    /// Rotary position embedding applied to queries and keys.
    pub rope: Option<&'a Rope>,
    pub train: bool,
    /// Pre-norm: attend from `norm(query)` (and, in self-attention, to it), computed here so
    /// that in training it fuses with the packed input projection.
    pub query_norm: Option<&'a Norm>,
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
            rows: None,
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

    pub fn row_caches(mut self, rows: Option<RowCaches<'a>>) -> Self {
        self.rows = rows;
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

    pub fn query_norm(mut self, norm: Option<&'a Norm>) -> Self {
        self.query_norm = norm;
        self
    }
}

/// Output of multi-head attention.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// (B, T, E), or (B, T, H·D) before the output projection
    pub context: Tensor,
    /// (B, T, S) averaged or (B, H, T, S) per head, when requested.
    pub weights: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum InProj {
    /// PyTorch's packed `in_proj_weight` ((H + 2·Hkv)·D, E): the rows of Q, then K, then V
    /// ((3E, E) without grouped-query attention).
    Packed(Linear),
    /// Separate projections: when the key or value width differs from d_model, and for
    /// quantized weights (blocks cannot be sliced into Q, K and V rows).
    Separate { q: Linear, k: Linear, v: Linear },
}

/// Multi-head attention, batch first.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    in_proj: InProj,
    out_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    d_model: usize,
    kdim: usize,
    vdim: usize,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    dropout: Dropout,
    kernels: Kernels,
}

impl MultiHeadAttention {
    /// Parameters: `in_proj.{weight,bias}` (packed) or `{q,k,v}_proj.{weight,bias}`,
    /// `out_proj.{weight,bias}`, and `{q,k}_norm.*` with query/key norms.
    pub fn new(cfg: &MhaConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let e = cfg.d_model;
        let kdim = cfg.kdim.unwrap_or(e);
        let vdim = cfg.vdim.unwrap_or(e);
        let (h, hkv, d) = (cfg.n_heads, cfg.kv_heads(), cfg.head_width());
        let quantized = vp.has_quantized("q_proj.weight");
        let in_proj = if kdim == e && vdim == e && !quantized {
            InProj::Packed(Linear::with_bias_init(
                e,
                (h + 2 * hkv) * d,
                cfg.bias,
                false,
                Init::AttnBias,
                &vp.pp("in_proj"),
            )?)
        } else {
            let mk = |d_in: usize, d_out: usize, name: &str| {
                Linear::with_bias_init(d_in, d_out, cfg.bias, false, Init::AttnBias, &vp.pp(name))
            };
            InProj::Separate {
                q: mk(e, h * d, "q_proj")?,
                k: mk(kdim, hkv * d, "k_proj")?,
                v: mk(vdim, hkv * d, "v_proj")?,
            }
        };
        let out_proj =
            Linear::with_bias_init(h * d, e, cfg.bias, true, Init::AttnBias, &vp.pp("out_proj"))?;
        let (q_norm, k_norm) = match &cfg.qk_norm {
            Some(n) => (
                Some(Norm::new(d, n, &vp.pp("q_norm"))?),
                Some(Norm::new(d, n, &vp.pp("k_norm"))?),
            ),
            None => (None, None),
        };
        Ok(MultiHeadAttention {
            in_proj,
            out_proj,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            d_model: e,
            kdim,
            vdim,
            q_norm,
            k_norm,
            dropout: vp.dropout(cfg.dropout)?,
            kernels: vp.kernels(),
        })
    }

    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Key/value heads (equal to `n_heads` without grouped-query attention).
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    pub fn d_model(&self) -> usize {
        self.d_model
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub(crate) fn kernels(&self) -> Kernels {
        self.kernels
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

    /// (B, L, heads·D) -> (B, heads, L, D)
    fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let x = ops::reshape(x, (b, l, heads, self.head_dim))?;
        Ok(ops::contiguous(&ops::transpose(&x, 1, 2)?)?)
    }

    /// Rows of the packed projection: (first row, count) of Q (0), K (1) or V (2).
    fn rows(&self, which: usize) -> (usize, usize) {
        let (q, kv) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        [(0, q), (q, kv), (q + kv, kv)][which]
    }

    /// The packed projection's weight tensor (always dense: see [`InProj::Separate`]).
    fn packed_weight(p: &Linear) -> Result<&Tensor> {
        p.dense_weight()
            .ok_or_else(|| Error::msg("a packed in_proj needs a dense weight"))
    }

    fn project(&self, x: &Tensor, which: usize) -> Result<Tensor> {
        Ok(match &self.in_proj {
            InProj::Packed(p) => {
                let (start, len) = self.rows(which);
                let w = ops::narrow(Self::packed_weight(p)?, 0, start, len)?;
                let b = p
                    .bias()
                    .map(|b| ops::narrow(b, 0, start, len))
                    .transpose()?;
                linear(x, &w, b.as_ref())?
            }
            InProj::Separate { q, k, v } => [q, k, v][which].forward(x)?,
        })
    }

    /// The per-head query/key norms, when the model has them.
    fn norm_heads(norm: &Option<Norm>, x: Tensor) -> Result<Tensor> {
        match norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// Project an encoder memory into keys and values once, for reuse across decoding steps.
    ///
    /// # Shapes
    /// `memory`: (B, S, kdim) (used for both keys and values) → k, v: (B, Hkv, S, D)
    pub fn project_kv(&self, memory: &Tensor) -> Result<ProjectedKv> {
        self.check_width("memory", memory, self.kdim)?;
        if self.kdim != self.vdim {
            return Err(Error::msg(
                "project_kv needs kdim == vdim (one memory tensor serves keys and values)",
            ));
        }
        let (k, v) = self.project_key_value(memory, memory, true)?;
        let hkv = self.n_kv_heads;
        Ok(ProjectedKv {
            k: Self::norm_heads(&self.k_norm, self.split_heads(&k, hkv)?)?,
            v: self.split_heads(&v, hkv)?,
        })
    }

    fn project_key_value(
        &self,
        key: &Tensor,
        value: &Tensor,
        same: bool,
    ) -> Result<(Tensor, Tensor)> {
        match (&self.in_proj, same) {
            (InProj::Packed(p), true) => {
                // One matmul for K and V together.
                let (start, len) = self.rows(1);
                let w = ops::narrow(Self::packed_weight(p)?, 0, start, 2 * len)?;
                let b = p
                    .bias()
                    .map(|b| ops::narrow(b, 0, start, 2 * len))
                    .transpose()?;
                let kv = linear(key, &w, b.as_ref())?;
                Ok((
                    ops::narrow(&kv, D::Minus1, 0, len)?,
                    ops::narrow(&kv, D::Minus1, len, len)?,
                ))
            }
            _ => Ok((self.project(key, 1)?, self.project(value, 2)?)),
        }
    }

    /// # Shapes
    /// - query (B, T, E); key (B, S, kdim); value (B, S, vdim)
    /// - key_padding_mask (B, S); attn_mask (T, S) or (B·H, T, S)
    /// - a cache holds (B, Hkv, S, D) keys and values
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
            rows,
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

        let (h, hkv) = (self.n_heads, self.n_kv_heads);
        // Q: (B, H, T, D); K, V: (B, Hkv, S, D)
        let (q, k, v) = if let Some(kv) = static_kv {
            // The projected memory's keys are normalized already.
            (
                self.split_heads(&self.project(query, 0)?, h)?,
                kv.k.clone(),
                kv.v.clone(),
            )
        } else if let (true, InProj::Separate { q, k, v }) = (is_self, &self.in_proj) {
            let [q, k, v]: [Tensor; 3] = Linear::forward_shared(&[q, k, v], query)?
                .try_into()
                .expect("three layers, three outputs");
            let heads = |x: Tensor, n: usize| {
                ops::transpose(&ops::reshape(&x, (b, t, n, self.head_dim))?, 1, 2)
            };
            (
                Self::norm_heads(&self.q_norm, heads(q, h)?)?,
                Self::norm_heads(&self.k_norm, heads(k, hkv)?)?,
                heads(v, hkv)?,
            )
        } else if let (true, InProj::Packed(p)) = (is_self, &self.in_proj) {
            let qkv = match query_norm {
                Some(norm) => norm.forward_linear(query, p, train)?,
                None => p.forward(query)?,
            };
            // (B, T, (H + 2Hkv)·D) -> (B, T, H + 2Hkv, D), then each of q, k, v as a strided
            // (B, heads, T, D) view: the fused kernel reads them in place, the other paths
            // copy what they need. (`Tensor::get` would copy: it reshapes the non-contiguous
            // slice.)
            let qkv = ops::reshape(&qkv, (b, t, h + 2 * hkv, self.head_dim))?;
            let part =
                |start: usize, n: usize| ops::transpose(&ops::narrow(&qkv, 2, start, n)?, 1, 2);
            let (q, k) = (part(0, h)?, part(h, hkv)?);
            (
                Self::norm_heads(&self.q_norm, q)?,
                Self::norm_heads(&self.k_norm, k)?,
                part(h + hkv, hkv)?,
            )
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
                self.split_heads(&self.project(query, 0)?, h)?,
                Self::norm_heads(&self.k_norm, self.split_heads(&k, hkv)?)?,
                self.split_heads(&v, hkv)?,
            )
        };
        let q = match (&self.q_norm, static_kv.is_some() || !is_self) {
            (Some(n), true) => n.forward(&q)?,
            _ => q,
        };

        if let Some(rows) = rows {
            if attn_mask.is_some() || key_padding_mask.is_some() || cache.is_some() || !is_self {
                return Err(Error::msg(
                    "per-sequence caches take self-attention without masks or a shared cache",
                ));
            }
            let out = self.attend_rows(&q, &k, &v, rows, rope, need_weights)?;
            return Ok(MhaOutput {
                context: out.transpose(1, 2)?.reshape((b, t, h * self.head_dim))?,
                weights: None,
            });
        }
        // One memory shared by every row (the beams of one utterance): the rows' queries
        // become positions of one batch, so each step reads the memory's keys and values
        // once, not once per beam. Exact: no mask couples the rows.
        let shared = matches!(static_kv, Some(kv) if kv.k.dim(0)? == 1 && b > 1)
            && attn_mask.is_none()
            && key_padding_mask.is_none()
            && rope.is_none()
            && cache.is_none();
        let q = if shared {
            q.transpose(0, 1)?
                .contiguous()?
                .reshape((1, h, b * t, self.head_dim))?
        } else {
            q
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
                kernels: self.kernels,
            },
        )?;
        let unfold = |x: Tensor| -> Result<Tensor> {
            if shared {
                let last = x.dim(3)?;
                Ok(x.reshape((h, b, t, last))?.transpose(0, 1)?)
            } else {
                Ok(x)
            }
        };
        // (B, H, T, D) -> (B, T, H·D)
        let context = ops::reshape(
            &ops::transpose(&unfold(out.context)?, 1, 2)?,
            (b, t, h * self.head_dim),
        )?;
        let weights = match (need_weights, out.weights) {
            (NeedWeights::Averaged, Some(w)) => Some(unfold(w)?.mean(1)?),
            (NeedWeights::PerHead, Some(w)) => Some(unfold(w)?),
            _ => None,
        };
        Ok(MhaOutput { context, weights })
    }

    /// Row `b` of q, k, v (B, heads, T, D) as the next T positions of sequence `b`: RoPE at
    /// its own offset, its keys and values appended to its own cache, causal attention over
    /// that cache (within the window, if any). → (B, H, T, Dv)
    fn attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: RowCaches,
        rope: Option<&Rope>,
        need_weights: NeedWeights,
    ) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        if rows.caches.len() != b {
            return Err(Error::msg(format!(
                "{} sequence caches for a batch of {b}",
                rows.caches.len()
            )));
        }
        if need_weights != NeedWeights::No {
            return Err(Error::msg(
                "attention weights are not returned with per-sequence caches",
            ));
        }
        let mut out = Vec::with_capacity(b);
        for (i, cache) in rows.caches.iter_mut().enumerate() {
            let row = |x: &Tensor| x.narrow(0, i, 1);
            let offset = cache.len();
            let (qi, ki) = match rope {
                Some(r) => (r.apply(&row(q)?, offset)?, r.apply(&row(k)?, offset)?),
                None => (row(q)?, row(k)?),
            };
            let (ki, vi) = cache.append(ki, row(v)?)?;
            let s = offset + t;
            let window = match rows.window {
                Some(w) if s > w => Some(sliding_window_mask(t, s, w, q.device())?),
                _ => None,
            };
            let ctx = scaled_dot_product_attention(
                &qi,
                &ki,
                &vi,
                &SdpaOptions {
                    attn_mask: window.as_ref(),
                    causal: window.is_none(),
                    dropout: Some(&self.dropout),
                    kernels: self.kernels,
                    ..Default::default()
                },
            )?;
            out.push(ctx.context);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
