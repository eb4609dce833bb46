//! Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2 (§3.3).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::dropout::Dropout;
use super::linear::Linear;
use super::var_store::VarPath;
use crate::Result;

/// The non-linearity between the two projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x), as in the paper.
    #[default]
    Relu,
    /// Exact GELU, x·Φ(x) (PyTorch's `gelu`, BERT).
    Gelu,
    /// GELU's tanh approximation (GPT-2, nanoGPT's `nn.GELU(approximate='tanh')`).
    GeluTanh,
}

impl Activation {
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Gelu if crate::kernels::applies(x) => crate::kernels::gelu::gelu_erf(x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct FeedForward {
    linear1: Linear,
    linear2: Linear,
    activation: Activation,
    dropout: Dropout,
}

impl FeedForward {
    /// Parameters: `linear1.{weight,bias}` (d_ff, d_model), `linear2.{weight,bias}` (d_model, d_ff).
    pub fn new(
        d_model: usize,
        d_ff: usize,
        activation: Activation,
        dropout: f64,
        bias: bool,
        vp: &VarPath,
    ) -> Result<Self> {
        Ok(FeedForward {
            linear1: Linear::new(d_model, d_ff, bias, false, &vp.pp("linear1"))?,
            linear2: Linear::new(d_ff, d_model, bias, true, &vp.pp("linear2"))?,
            activation,
            dropout: Dropout::new(dropout, vp.dropout_rng())?,
        })
    }

    /// linear2(dropout(act(linear1(x)))), the inner dropout as in PyTorch's encoder layer.
    ///
    /// # Shapes
    /// `x`: (..., d_model) → (..., d_model)
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.activation.apply(&self.linear1.forward(x)?)?;
        let h = self.dropout.forward(&h, train)?;
        self.linear2.forward(&h)
    }
}
