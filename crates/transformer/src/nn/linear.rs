//! `y = x Wᵀ + b`, with PyTorch's weight layout (out_features, in_features).

use candle_core::{Module, Tensor};

use super::var_store::{Init, VarPath};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer whose bias (if any) is initialized as `nn.Linear` does under the Xavier
    /// scheme. `residual` marks a projection into the residual stream (GPT-2 scaled init).
    pub fn new(
        d_in: usize,
        d_out: usize,
        bias: bool,
        residual: bool,
        vp: &VarPath,
    ) -> Result<Self> {
        Self::with_bias_init(
            d_in,
            d_out,
            bias,
            residual,
            Init::LinearBias { fan_in: d_in },
            vp,
        )
    }

    pub fn with_bias_init(
        d_in: usize,
        d_out: usize,
        bias: bool,
        residual: bool,
        bias_init: Init,
        vp: &VarPath,
    ) -> Result<Self> {
        let weight = vp.var("weight", &[d_out, d_in], Init::Weight { residual })?;
        let bias = if bias {
            Some(vp.var("bias", &[d_out], bias_init)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// `x`: (..., d_in) → (..., d_out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d_in = self.d_in();
        if x.dims().last() != Some(&d_in) {
            return Err(Error::shape(
                "linear input",
                format!("(..., {d_in})"),
                x.dims(),
            ));
        }
        Ok(linear(x, &self.weight, self.bias.as_ref())?)
    }
}

/// `x Wᵀ + b` for x of any rank; folds leading dimensions into one matmul.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((lead, d_in))?;
    let y = x2.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = w.dims()[0];
    y.reshape(out_dims)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}
