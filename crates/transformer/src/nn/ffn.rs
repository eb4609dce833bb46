//! Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2 (§3.3).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::dropout::Dropout;
use super::linear::Linear;
use super::norm::NormedInput;
use super::var_store::VarPath;
use crate::kernels::{
    self,
    projection::{project, Act, Projection},
};
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

    /// The feed-forward up to linear1: the rest is left to the layer's residual connection,
    /// which fuses it.
    pub(crate) fn branch(&self, x: NormedInput<'_>, train: bool) -> Result<Branch<'_>> {
        Ok(Branch {
            h: x.linear(&self.linear1, train)?,
            act: Some(self.activation),
            dropout_in: Some(&self.dropout),
            linear: &self.linear2,
        })
    }
}

/// A sub-layer's output before its last projection: `linear(dropout_in(act(h)))`.
pub(crate) struct Branch<'a> {
    pub h: Tensor,
    pub act: Option<Activation>,
    pub dropout_in: Option<&'a Dropout>,
    pub linear: &'a Linear,
}

impl<'a> Branch<'a> {
    /// An attention output and W^O.
    pub fn projection(h: Tensor, linear: &'a Linear) -> Self {
        Branch {
            h,
            act: None,
            dropout_in: None,
            linear,
        }
    }

    /// The residual connection `x + dropout(branch)`. In training on CPU this is one node
    /// (`kernels::projection`) that keeps none of the branch's intermediates.
    ///
    /// # Shapes
    /// `x`: (B, T, E), `h`: (B, T, F) → (B, T, E)
    pub fn add_to(self, x: &Tensor, dropout: &Dropout, train: bool) -> Result<Tensor> {
        let act = match self.act {
            None => Some(Act::Identity),
            Some(Activation::Relu) => Some(Act::Relu),
            Some(Activation::Gelu) => Some(Act::GeluErf),
            Some(Activation::GeluTanh) => None,
        };
        let dtype = self.h.dtype();
        let same_dtype = x.dtype() == dtype && self.linear.weight().dtype() == dtype;
        let fusable = train && same_dtype && kernels::applies(&self.h);
        if let Some(act) = act.filter(|_| fusable) {
            let mask = |d: &Dropout| (d.p() > 0.0).then(|| (d.p(), d.seed()));
            let cfg = Projection {
                act,
                dropout_in: self.dropout_in.and_then(mask),
                dropout_out: mask(dropout),
            };
            let w = self.linear.weight();
            return Ok(project(&self.h, w, self.linear.bias(), Some(x), cfg)?);
        }
        let a = match self.act {
            Some(act) => act.apply(&self.h)?,
            None => self.h,
        };
        let a = match self.dropout_in {
            Some(d) => d.forward(&a, train)?,
            None => a,
        };
        dropout.add_to(x, &self.linear.forward(&a)?, train)
    }
}
