//! Position-wise feed-forward networks: the paper's FFN(x) = act(x W1 + b1) W2 + b2 (§3.3),
//! and the gated form GLU(x) = (act(x W_gate) ⊙ x W_up) W_down (Shazeer 2020: SwiGLU with SiLU
//! in Llama, GeGLU with tanh-GELU in Gemma).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::dropout::Dropout;
use super::linear::Linear;
use super::norm::NormedInput;
use super::var_store::VarPath;
use crate::autograd::ops;
use crate::kernels::{
    projection::{project, Act, Projection},
    Kernels,
};
use crate::{Error, Result};

/// The non-linearity between the two projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x), as in the paper.
    #[default]
    Relu,
    /// Exact GELU, x·Φ(x) (PyTorch's `gelu`, BERT).
    Gelu,
    /// GELU's tanh approximation (GPT-2, nanoGPT's `nn.GELU(approximate='tanh')`, Gemma).
    GeluTanh,
    /// x·σ(x), PyTorch's `silu` (Llama's SwiGLU).
    Silu,
}

impl Activation {
    pub fn apply(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => ops::relu(x)?,
            Activation::Gelu if kernels.applies(x) => crate::kernels::gelu::gelu_erf(x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh if kernels.applies(x) => crate::kernels::gelu::gelu_tanh(x)?,
            // Composed from exact ops: candle's own `gelu` differentiates with its constants
            // rounded to six digits (gradients off by ~1e-6).
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let inner = ((x + ((x.sqr()? * x)? * 0.044_715)?)? * c)?;
                ((x * 0.5)? * (inner.tanh()? + 1.0)?)?
            }
            Activation::Silu => ops::silu(x)?,
        })
    }
}

/// Plain or gated feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// act(x W1) W2, the paper's.
    #[default]
    Plain,
    /// (act(x W_gate) ⊙ x W_up) W_down: SwiGLU with `silu`, GeGLU with `gelu_tanh`.
    Gated,
}

/// The shape of a feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpConfig {
    pub d_model: usize,
    pub d_ff: usize,
    pub kind: MlpKind,
    pub activation: Activation,
    /// Dropout on the hidden activations (training only).
    pub dropout: f64,
    /// Biases on the linear layers.
    pub bias: bool,
}

#[derive(Debug, Clone)]
enum Up {
    /// `linear1`, as PyTorch's encoder layer names it.
    Plain(Linear),
    /// `gate_proj` and `up_proj`, as Hugging Face's Llama names them.
    Gated { gate: Linear, up: Linear },
}

/// A feed-forward block, plain or gated, deciding itself when to take the fused kernels.
#[derive(Debug, Clone)]
pub struct Mlp {
    up: Up,
    down: Linear,
    activation: Activation,
    dropout: Dropout,
    kernels: Kernels,
}

impl Mlp {
    /// Parameters, plain: `linear1.{weight,bias}` (d_ff, d_model), `linear2.{weight,bias}`
    /// (d_model, d_ff); gated: `gate_proj.*`, `up_proj.*` (d_ff, d_model), `down_proj.*`
    /// (d_model, d_ff).
    pub fn new(cfg: &MlpConfig, vp: &VarPath) -> Result<Self> {
        let MlpConfig {
            d_model,
            d_ff,
            bias,
            ..
        } = *cfg;
        if d_ff == 0 {
            return Err(Error::invalid("d_ff", "> 0", "0"));
        }
        let (up, down) = match cfg.kind {
            MlpKind::Plain => (
                Up::Plain(Linear::new(d_model, d_ff, bias, false, &vp.pp("linear1"))?),
                Linear::new(d_ff, d_model, bias, true, &vp.pp("linear2"))?,
            ),
            MlpKind::Gated => (
                Up::Gated {
                    gate: Linear::new(d_model, d_ff, bias, false, &vp.pp("gate_proj"))?,
                    up: Linear::new(d_model, d_ff, bias, false, &vp.pp("up_proj"))?,
                },
                Linear::new(d_ff, d_model, bias, true, &vp.pp("down_proj"))?,
            ),
        };
        Ok(Mlp {
            up,
            down,
            activation: cfg.activation,
            dropout: vp.dropout(cfg.dropout)?,
            kernels: vp.kernels(),
        })
    }

    /// The paper's plain feed-forward (`linear1`, `linear2`).
    pub fn plain(
        d_model: usize,
        d_ff: usize,
        activation: Activation,
        dropout: f64,
        bias: bool,
        vp: &VarPath,
    ) -> Result<Self> {
        let cfg = MlpConfig {
            d_model,
            d_ff,
            kind: MlpKind::Plain,
            activation,
            dropout,
            bias,
        };
        Self::new(&cfg, vp)
    }

    /// down(dropout(hidden(x))), the inner dropout as in PyTorch's encoder layer.
    ///
    /// # Shapes
    /// `x`: (..., d_model) → (..., d_model)
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = match &self.up {
            Up::Plain(l1) => self.activation.apply(&l1.forward(x)?, self.kernels)?,
            Up::Gated { gate, up } => {
                let [g, u]: [Tensor; 2] = Linear::forward_shared(&[gate, up], x)?
                    .try_into()
                    .expect("two layers, two outputs");
                self.gated(g, u)?
            }
        };
        let h = self.dropout.forward(&h, train)?;
        self.down.forward(&h)
    }

    fn gated(&self, gate: Tensor, up: Tensor) -> Result<Tensor> {
        Ok(ops::mul(&self.activation.apply(&gate, self.kernels)?, &up)?)
    }

    /// The feed-forward up to its last projection: the rest is left to the layer's residual
    /// connection, which fuses it.
    pub(crate) fn branch(&self, x: NormedInput<'_>, train: bool) -> Result<Branch<'_>> {
        Ok(match &self.up {
            Up::Plain(l1) => Branch {
                h: x.linear(l1, train)?,
                act: Some(self.activation),
                dropout_in: Some(&self.dropout),
                linear: &self.down,
                kernels: self.kernels,
            },
            // The product of the two halves is the projection's input; the activation is
            // applied before it, so the fused projection sees the identity.
            Up::Gated { gate, up } => Branch {
                h: {
                    let [g, u]: [Tensor; 2] = x
                        .linear_shared(&[gate, up], train)?
                        .try_into()
                        .expect("two layers, two outputs");
                    self.gated(g, u)?
                },
                act: None,
                dropout_in: Some(&self.dropout),
                linear: &self.down,
                kernels: self.kernels,
            },
        })
    }
}

/// A sub-layer's output before its last projection: `linear(dropout_in(act(h)))`.
pub(crate) struct Branch<'a> {
    pub h: Tensor,
    pub act: Option<Activation>,
    pub dropout_in: Option<&'a Dropout>,
    pub linear: &'a Linear,
    pub kernels: Kernels,
}

impl<'a> Branch<'a> {
    /// An attention output and W^O.
    pub fn projection(h: Tensor, linear: &'a Linear, kernels: Kernels) -> Self {
        Branch {
            h,
            act: None,
            dropout_in: None,
            linear,
            kernels,
        }
    }

    /// The branch's output alone, `linear(dropout_in(act(h)))`, composed (for a sub-layer
    /// whose output is normalized before the residual sum).
    pub fn output(self, train: bool) -> Result<Tensor> {
        let a = match self.act {
            Some(act) => act.apply(&self.h, self.kernels)?,
            None => self.h,
        };
        let a = match self.dropout_in {
            Some(d) => d.forward(&a, train)?,
            None => a,
        };
        self.linear.forward(&a)
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
            Some(Activation::GeluTanh | Activation::Silu) => None,
        };
        let dtype = self.h.dtype();
        let dense = self.linear.dense_weight().filter(|w| w.dtype() == dtype);
        let fusable = train && x.dtype() == dtype && self.kernels.applies(&self.h);
        if let (Some(act), Some(w)) = (act.filter(|_| fusable), dense) {
            let mask = |d: &Dropout| (d.p() > 0.0).then(|| (d.p(), d.seed()));
            let cfg = Projection {
                act,
                dropout_in: self.dropout_in.and_then(mask),
                dropout_out: mask(dropout),
            };
            return Ok(project(&self.h, w, self.linear.bias(), Some(x), cfg)?);
        }
        dropout.add_to(x, &self.output(train)?, train)
    }
}
