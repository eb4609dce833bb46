//! Scaled dot-product attention: softmax(QKᵀ/√d_k + mask) V.
//!
//! Dimension letters: `B` batch, `H` heads, `Hkv` key/value heads (grouped-query attention,
//! dividing `H`), `T` query positions, `S` key positions, `D` head width of queries and keys,
//! `Dv` head width of values.

use candle_core::{DType, Device, Tensor, D};

use super::dropout::Dropout;
use crate::kernels::Kernels;
use crate::{Error, Result};

/// A mask over attention scores, boolean or additive. The two boolean conventions PyTorch uses
/// are opposite, so each has its own variant and the choice is explicit at every call site.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Nonzero = may attend (`F.scaled_dot_product_attention`'s boolean convention).
    Allow(Tensor),
    /// Nonzero = masked out (`nn.MultiheadAttention`'s convention for `attn_mask` and
    /// `key_padding_mask`).
    Block(Tensor),
    /// Added to the scaled scores; `-inf` masks a position out.
    Additive(Tensor),
}

impl AttnMask {
    pub fn tensor(&self) -> &Tensor {
        match self {
            AttnMask::Allow(t) | AttnMask::Block(t) | AttnMask::Additive(t) => t,
        }
    }

    pub fn dims(&self) -> &[usize] {
        self.tensor().dims()
    }

    /// Key-padding mask from sequence lengths: position `j` of row `b` is padding iff
    /// `j >= lengths[b]`. Shape (B, S).
    pub fn from_lengths(lengths: &[usize], s: usize, device: &Device) -> Result<AttnMask> {
        let mut v = vec![0u8; lengths.len() * s];
        for (b, &len) in lengths.iter().enumerate() {
            for j in len.min(s)..s {
                v[b * s + j] = 1;
            }
        }
        Ok(AttnMask::Block(Tensor::from_vec(
            v,
            (lengths.len(), s),
            device,
        )?))
    }

    /// Key-padding mask from token ids: positions holding `pad_id` are masked out. Shape (B, S).
    pub fn from_padding(ids: &Tensor, pad_id: u32) -> Result<AttnMask> {
        Ok(AttnMask::Block(ids.eq(pad_id as f64)?))
    }

    /// The additive form (0 where allowed, -inf where masked), in `dtype`.
    pub fn to_additive(&self, dtype: DType) -> Result<Tensor> {
        let (allow, t) = match self {
            AttnMask::Additive(t) => return Ok(t.to_dtype(dtype)?),
            AttnMask::Allow(t) => (true, t),
            AttnMask::Block(t) => (false, t),
        };
        let nonzero = t.ne(0f64)?;
        let zeros = Tensor::zeros(t.shape(), dtype, t.device())?;
        let neg = Tensor::full(f32::NEG_INFINITY, t.shape(), t.device())?.to_dtype(dtype)?;
        Ok(if allow {
            nonzero.where_cond(&zeros, &neg)?
        } else {
            nonzero.where_cond(&neg, &zeros)?
        })
    }
}

/// The causal mask for `t` queries that follow `s - t` cached positions: query `i` may see
/// key `j` iff `j <= i + (s - t)`. Shape (T, S), `Allow` convention.
pub fn causal_mask(t: usize, s: usize, device: &Device) -> Result<AttnMask> {
    if s < t {
        return Err(Error::msg(format!(
            "causal mask: {t} queries cannot follow {s} keys (need keys >= queries)"
        )));
    }
    let offset = s - t;
    let v: Vec<u8> = (0..t)
        .flat_map(|i| (0..s).map(move |j| u8::from(j <= i + offset)))
        .collect();
    Ok(AttnMask::Allow(Tensor::from_vec(v, (t, s), device)?))
}

/// Causal attention over the last `window` positions: query `i` (at position `S - T + i`)
/// may attend to key `j` when `0 <= (S - T + i) - j < window`.
///
/// # Shapes
/// → (T, S), nonzero = may attend
pub fn sliding_window_mask(t: usize, s: usize, window: usize, device: &Device) -> Result<AttnMask> {
    let offset = s - t;
    let v: Vec<u8> = (0..t)
        .flat_map(|i| {
            let q = i + offset;
            (0..s).map(move |j| u8::from(j <= q && q - j < window))
        })
        .collect();
    Ok(AttnMask::Allow(Tensor::from_vec(v, (t, s), device)?))
}

/// Options of [`scaled_dot_product_attention`].
#[derive(Default, Clone, Copy)]
pub struct SdpaOptions<'a> {
    /// (T, S), (B·H, T, S) or (B, H, T, S).
    pub attn_mask: Option<&'a AttnMask>,
    /// (B, S).
    pub key_padding_mask: Option<&'a AttnMask>,
    /// Mask future keys (with the offset of a KV cache when S > T).
    pub causal: bool,
    /// Defaults to 1/√D.
    pub scale: Option<f64>,
    /// Dropout on the attention weights, applied only when `train`.
    pub dropout: Option<&'a Dropout>,
    pub train: bool,
    /// Return the attention weights (B, H, T, S), taken before dropout.
    pub need_weights: bool,
    /// Fused kernel or composed ops.
    pub kernels: Kernels,
}

/// Result of attention: the context vectors and optionally the weights.
#[derive(Debug, Clone)]
pub struct AttnOutput {
    /// (B, H, T, Dv)
    pub context: Tensor,
    /// (B, H, T, S), present when requested.
    pub weights: Option<Tensor>,
}

/// softmax(Q Kᵀ · scale + masks) V: the fused kernel (`kernels::attention`) on CPU f32/f64
/// when the weights are not requested, else composed of differentiable candle ops.
///
/// A query row whose keys are all masked out gets all-zero weights (and a zero context),
/// not NaN.
///
/// # Shapes
/// - `q`: (B, H, T, D), `k`: (B, Hkv, S, D), `v`: (B, Hkv, S, Dv), Hkv dividing H (query
///   head `h` attends with key/value head `h / (H / Hkv)`)
/// - returns context (B, H, T, Dv) and weights (B, H, T, S)
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<AttnOutput> {
    let (b, h, t, d) = q
        .dims4()
        .map_err(|_| Error::shape("attention query", "(B, H, T, D)", q.dims()))?;
    let (bk, hk, s, dk) = k.dims4().map_err(|_| {
        Error::shape(
            "attention key",
            "(B, H, S, D) (H: key/value heads)",
            k.dims(),
        )
    })?;
    if hk == 0 || h % hk != 0 {
        return Err(Error::shape(
            "attention key",
            format!("({b}, Hkv, S, {d}) with Hkv key/value heads dividing the {h} query heads"),
            k.dims(),
        ));
    }
    if (bk, dk) != (b, d) {
        return Err(Error::shape(
            "attention key",
            format!("({b}, {hk}, S, {d}) to match the query"),
            k.dims(),
        ));
    }
    let (bv, hv, sv, _dv) = v.dims4().map_err(|_| {
        Error::shape(
            "attention value",
            "(B, H, S, Dv) (H: key/value heads)",
            v.dims(),
        )
    })?;
    if (bv, hv, sv) != (b, hk, s) {
        return Err(Error::shape(
            "attention value",
            format!("({b}, {hk}, {s}, Dv) to match the key"),
            v.dims(),
        ));
    }
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !opts.need_weights
        && opts.kernels.applies(q)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
    {
        // The fused kernel applies the causal mask itself, without a (T, S) tensor.
        if opts.causal && s < t {
            causal_mask(t, s, q.device())?;
        }
        let no_causal = SdpaOptions {
            causal: false,
            ..*opts
        };
        let bias = mask_bias(b, h, t, s, &no_causal, q.dtype(), q.device())?;
        let dropout = match opts.dropout {
            Some(drop) if opts.train && drop.p() > 0.0 => Some((drop.p(), drop.seed())),
            _ => None,
        };
        let context = crate::kernels::attention::attention(
            q,
            k,
            v,
            &crate::kernels::attention::FlashOptions {
                scale,
                causal: opts.causal,
                bias,
                dropout,
            },
        )?;
        return Ok(AttnOutput {
            context,
            weights: None,
        });
    }
    let bias = mask_bias(b, h, t, s, opts, q.dtype(), q.device())?;
    let (k, v) = (repeat_kv(k, h / hk)?, repeat_kv(v, h / hk)?);

    // (B, H, T, D) x (B, H, D, S) -> (B, H, T, S)
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let weights = match &bias {
        None => softmax_last_dim(&scores, opts.kernels)?,
        Some(bias) => masked_softmax_last_dim(&scores.broadcast_add(bias)?, opts.kernels)?,
    };
    let dropped = match opts.dropout {
        Some(drop) if opts.train => drop.forward(&weights, true)?,
        _ => weights.clone(),
    };
    let context = dropped.matmul(&v.contiguous()?)?;
    Ok(AttnOutput {
        context,
        weights: opts.need_weights.then_some(weights),
    })
}

/// Each key/value head repeated for the `group` query heads that share it:
/// (B, Hkv, S, D) → (B, Hkv·group, S, D), as Hugging Face's `repeat_kv`.
pub fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, hk, s, d) = x.dims4()?;
    // (B, Hkv, 1, S, D) -> (B, Hkv, group, S, D) -> (B, Hkv·group, S, D)
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, hk, group, s, d))?
        .contiguous()?
        .reshape((b, hk * group, s, d))?)
}

/// The sum of all masks as one additive bias that broadcasts to (B, H, T, S), or None.
fn mask_bias(
    b: usize,
    h: usize,
    t: usize,
    s: usize,
    opts: &SdpaOptions,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let mut bias: Option<Tensor> = None;
    let mut add = |m: Tensor| -> Result<()> {
        bias = Some(match bias.take() {
            None => m,
            Some(acc) => acc.broadcast_add(&m)?,
        });
        Ok(())
    };
    if let Some(m) = opts.attn_mask {
        let a = m.to_additive(dtype)?;
        let a = match *m.dims() {
            [mt, ms] if (mt, ms) == (t, s) => a.reshape((1, 1, t, s))?,
            [bh, mt, ms] if (bh, mt, ms) == (b * h, t, s) => a.reshape((b, h, t, s))?,
            [mb, mh, mt, ms] if (mb, mh, mt, ms) == (b, h, t, s) => a,
            _ => {
                return Err(Error::shape(
                    "attn_mask",
                    format!("({t}, {s}) or ({}, {t}, {s})", b * h),
                    m.dims(),
                ))
            }
        };
        add(a.to_device(device)?)?;
    }
    if let Some(m) = opts.key_padding_mask {
        if m.dims() != [b, s] {
            return Err(Error::shape(
                "key_padding_mask",
                format!("({b}, {s})"),
                m.dims(),
            ));
        }
        add(m
            .to_additive(dtype)?
            .reshape((b, 1, 1, s))?
            .to_device(device)?)?;
    }
    if opts.causal {
        let c = causal_mask(t, s, device)?.to_additive(dtype)?;
        add(c.reshape((1, 1, t, s))?)?;
    }
    Ok(bias)
}

/// Softmax over the last dimension from differentiable ops (candle-nn's fused
/// `softmax_last_dim` records no backward). The max is a constant for the gradient.
pub fn softmax_last_dim(x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
    if kernels.applies(x) {
        return crate::kernels::softmax::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Softmax that maps a row of all `-inf` to all zeros instead of NaN.
pub fn masked_softmax_last_dim(x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
    if kernels.applies(x) {
        return crate::kernels::softmax::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let finite = max.ne(f64::NEG_INFINITY)?;
    let max = finite.where_cond(&max, &max.zeros_like()?)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    // Only a fully masked row sums to 0; dividing it by 1 keeps its zeros.
    let sum = (&sum + sum.eq(0f64)?.to_dtype(sum.dtype())?)?;
    e.broadcast_div(&sum)
}
