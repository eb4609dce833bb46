//! Layer normalization, composed from differentiable ops.
//!
//! `candle_nn::LayerNorm` switches to a fused kernel without a backward on contiguous input,
//! which silently stops gradients; this one always records its graph.

use candle_core::{DType, Tensor, D};

use super::linear::Linear;
use super::var_store::{Init, VarPath};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(d_model: usize, eps: f64, bias: bool, vp: &VarPath) -> Result<Self> {
        let weight = vp.var("weight", &[d_model], Init::Ones)?;
        let bias = if bias {
            Some(vp.var("bias", &[d_model], Init::Zeros)?)
        } else {
            None
        };
        Ok(LayerNorm { weight, bias, eps })
    }

    /// # Shapes
    /// `x`: (..., d_model) → (..., d_model), normalized over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.weight.dims()[0];
        if x.dims().last() != Some(&d) {
            return Err(Error::shape(
                "layer norm input",
                format!("(..., {d})"),
                x.dims(),
            ));
        }
        Ok(layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)?)
    }

    /// `linear(norm(x))`. In training on CPU, with neither the norm nor the linear layer
    /// having a bias (GPT-style pre-norm models), one node (`kernels::norm_linear`) that
    /// recomputes the norm in its backward instead of keeping its output.
    ///
    /// # Shapes
    /// `x`: (..., d_model) → (..., d_out)
    pub fn forward_linear(&self, x: &Tensor, linear: &Linear, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let fusable = train
            && self.bias.is_none()
            && linear.bias().is_none()
            && crate::kernels::applies(x)
            && self.weight.dtype() == dtype
            && linear.weight().dtype() == dtype
            && linear.d_in() == self.weight.dims()[0];
        if fusable {
            return Ok(crate::kernels::norm_linear::norm_linear(
                x,
                &self.weight,
                linear.weight(),
                self.eps,
            )?);
        }
        linear.forward(&self.forward(x)?)
    }
}

/// A sub-layer's input: `x` itself (post-norm), or `norm(x)` not computed yet (pre-norm), so
/// that the norm can fuse with the sub-layer's first linear layer.
#[derive(Clone, Copy)]
pub(crate) struct NormedInput<'a> {
    pub x: &'a Tensor,
    pub norm: Option<&'a LayerNorm>,
}

impl NormedInput<'_> {
    /// `linear(input)`.
    pub fn linear(&self, linear: &Linear, train: bool) -> Result<Tensor> {
        match self.norm {
            Some(norm) => norm.forward_linear(self.x, linear, train),
            None => linear.forward(self.x),
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
) -> candle_core::Result<Tensor> {
    if crate::kernels::applies(x) && weight.dtype() == x.dtype() {
        return crate::kernels::layer_norm::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// The composed reference: mean, centred square, rsqrt and affine as separate ops.
pub fn layer_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let in_dtype = x.dtype();
    let internal = match in_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let x = x.to_dtype(internal)?;
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
