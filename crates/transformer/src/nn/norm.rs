//! Normalization layers: layer norm (Ba et al. 2016) and RMS norm (Zhang & Sennrich 2019),
//! composed from differentiable ops or through the fused kernels, which have a backward.
//!
//! `candle_nn::LayerNorm` / `RmsNorm` switch to fused kernels without a backward on contiguous
//! input, which silently stops gradients; these always record their graph.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::linear::Linear;
use super::var_store::{Init, VarPath};
use crate::autograd::ops;
use crate::kernels::Kernels;
use crate::{Error, Result};

/// Which normalization a model's layers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// (x - mean) / std · w + b, as `nn.LayerNorm` (the paper, GPT-2, BERT).
    #[default]
    LayerNorm,
    /// x / rms(x) · w, as Llama's `RMSNorm`; never a bias.
    RmsNorm,
}

/// The shape of a norm layer beyond its width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormConfig {
    pub kind: NormKind,
    /// Added to the variance (or mean square) before the square root.
    pub eps: f64,
    /// A learned bias (layer norm only).
    pub bias: bool,
    /// Scale by `1 + weight` instead of `weight`, the weight starting at zero (Gemma's
    /// `RMSNorm`).
    pub unit_offset: bool,
}

impl NormConfig {
    pub fn layer_norm(eps: f64, bias: bool) -> Self {
        NormConfig {
            kind: NormKind::LayerNorm,
            eps,
            bias,
            unit_offset: false,
        }
    }

    pub fn rms_norm(eps: f64) -> Self {
        NormConfig {
            kind: NormKind::RmsNorm,
            eps,
            bias: false,
            unit_offset: false,
        }
    }
}

/// A layer norm or RMS norm over the last dimension.
#[derive(Debug, Clone)]
pub struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    unit_offset: bool,
    kernels: Kernels,
}

impl Norm {
    /// Parameters: `weight` (d), and `bias` (d) for a layer norm with a bias.
    pub fn new(d: usize, cfg: &NormConfig, vp: &VarPath) -> Result<Self> {
        if cfg.eps.is_nan() || cfg.eps <= 0.0 {
            return Err(Error::invalid(
                "norm eps",
                "a number > 0",
                format!("{}", cfg.eps),
            ));
        }
        let init = if cfg.unit_offset {
            Init::Zeros
        } else {
            Init::Ones
        };
        let weight = vp.var("weight", &[d], init)?;
        let bias = match (cfg.kind, cfg.bias) {
            (NormKind::LayerNorm, true) => Some(vp.var("bias", &[d], Init::Zeros)?),
            _ => None,
        };
        Ok(Norm {
            kind: cfg.kind,
            weight,
            bias,
            eps: cfg.eps,
            unit_offset: cfg.unit_offset,
            kernels: vp.kernels(),
        })
    }

    /// `nn.LayerNorm(d, eps, bias=bias)`.
    pub fn layer_norm(d: usize, eps: f64, bias: bool, vp: &VarPath) -> Result<Self> {
        Self::new(d, &NormConfig::layer_norm(eps, bias), vp)
    }

    pub fn kind(&self) -> NormKind {
        self.kind
    }

    /// The scale applied after normalizing: `weight`, or `1 + weight`.
    fn gamma(&self) -> Result<Tensor> {
        Ok(if self.unit_offset {
            ops::affine(&self.weight, 1.0, 1.0)?
        } else {
            self.weight.clone()
        })
    }

    /// # Shapes
    /// `x`: (..., d) → (..., d), normalized over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.weight.dims()[0];
        if x.dims().last() != Some(&d) {
            return Err(Error::shape("norm input", format!("(..., {d})"), x.dims()));
        }
        let gamma = self.gamma()?;
        Ok(match self.kind {
            NormKind::LayerNorm => {
                layer_norm(x, &gamma, self.bias.as_ref(), self.eps, self.kernels)?
            }
            NormKind::RmsNorm => rms_norm(x, &gamma, self.eps, self.kernels)?,
        })
    }

    /// `linear(norm(x))`. In training on CPU, with neither the norm nor the linear layer
    /// having a bias (GPT- and Llama-style pre-norm models), one node (`kernels::norm_linear`)
    /// that recomputes the norm in its backward instead of keeping its output.
    ///
    /// # Shapes
    /// `x`: (..., d_model) → (..., d_out)
    pub fn forward_linear(&self, x: &Tensor, linear: &Linear, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let fusable = train
            && self.bias.is_none()
            && linear.bias().is_none()
            && self.kernels.applies(x)
            && self.weight.dtype() == dtype
            && linear.d_in() == self.weight.dims()[0];
        let dense = linear.dense_weight().filter(|w| w.dtype() == dtype);
        if let Some(w) = dense.filter(|_| fusable) {
            use crate::kernels::norm_linear::{norm_linear, rms_norm_linear};
            let gamma = self.gamma()?;
            return Ok(match self.kind {
                NormKind::LayerNorm => norm_linear(x, &gamma, w, self.eps)?,
                NormKind::RmsNorm => rms_norm_linear(x, &gamma, w, self.eps)?,
            });
        }
        linear.forward(&self.forward(x)?)
    }
}

/// A sub-layer's input: `x` itself (post-norm), or `norm(x)` not computed yet (pre-norm), so
/// that the norm can fuse with the sub-layer's first linear layer.
#[derive(Clone, Copy)]
pub(crate) struct NormedInput<'a> {
    pub x: &'a Tensor,
    pub norm: Option<&'a Norm>,
}

impl NormedInput<'_> {
    /// `linear(input)`.
    pub fn linear(&self, linear: &Linear, train: bool) -> Result<Tensor> {
        match self.norm {
            Some(norm) => norm.forward_linear(self.x, linear, train),
            None => linear.forward(self.x),
        }
    }

    /// `[l(input) for l in layers]`. In training each fuses with the norm; otherwise the norm
    /// is computed once and the layers share it ([`Linear::forward_shared`]).
    pub fn linear_shared(&self, layers: &[&Linear], train: bool) -> Result<Vec<Tensor>> {
        match self.norm {
            Some(norm) if train => layers
                .iter()
                .map(|l| norm.forward_linear(self.x, l, train))
                .collect(),
            Some(norm) => Linear::forward_shared(layers, &norm.forward(self.x)?),
            None => Linear::forward_shared(layers, self.x),
        }
    }
}

/// Layer norm over the last dimension, with the biased variance as PyTorch computes it.
/// Half-precision inputs are normalized in f32.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if kernels.applies(x) && weight.dtype() == x.dtype() {
        return crate::kernels::layer_norm::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// RMS norm over the last dimension: x / √(mean(x²) + ε) · weight, as Llama's `RMSNorm`
/// (half-precision inputs normalized in f32).
pub fn rms_norm(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if kernels.applies(x) && weight.dtype() == x.dtype() {
        return crate::kernels::layer_norm::rms_norm(x, weight, eps);
    }
    rms_norm_composed(x, weight, eps)
}

fn internal_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// The composed reference: mean, centred square, rsqrt and affine as separate ops.
pub fn layer_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let in_dtype = x.dtype();
    let x = x.to_dtype(internal_dtype(in_dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = xn.to_dtype(in_dtype)?.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The composed reference of [`rms_norm`].
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let in_dtype = x.dtype();
    let x = x.to_dtype(internal_dtype(in_dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    xn.to_dtype(in_dtype)?.broadcast_mul(weight)
}
