//! Dropout driven by the model's seedable generator, active only in training.

use candle_core::{DType, Device, Tensor};

use crate::kernels::{self, Kernels};
use crate::rng::SharedRng;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: SharedRng,
    kernels: Kernels,
}

impl Dropout {
    pub fn new(p: f64, rng: SharedRng, kernels: Kernels) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("dropout", "in [0, 1)", p.to_string()));
        }
        Ok(Dropout { p, rng, kernels })
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// A fresh seed from the model's generator, for kernels that draw their own masks.
    pub fn seed(&self) -> u64 {
        self.rng.with(|r| r.next_u64())
    }

    /// Zero each element with probability p and scale the rest by 1/(1-p) when `train`;
    /// the identity otherwise.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        if self.kernels.applies(x) {
            // The mask is a hash of a seed and the position: nothing kept for the backward.
            return Ok(kernels::dropout::dropout(x, self.p, self.seed())?);
        }
        let mask = dropout_mask(&self.rng, x.dims(), self.p, x.dtype(), x.device())?;
        Ok(x.mul(&mask)?)
    }

    /// `x + dropout(y)`, a residual connection: one fused pass on CPU.
    ///
    /// # Shapes
    /// `x`, `y`: the same shape → that shape
    pub fn add_to(&self, x: &Tensor, y: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.p > 0.0 && self.kernels.applies(x) && x.dtype() == y.dtype() {
            if x.dims() != y.dims() {
                return Err(Error::shape(
                    "residual branch",
                    format!("{:?}", x.dims()),
                    y.dims(),
                ));
            }
            return Ok(kernels::dropout::dropout_add(x, y, self.p, self.seed())?);
        }
        Ok(crate::autograd::ops::add(x, &self.forward(y, train)?)?)
    }
}

/// A mask of 0 and 1/(1-p) values drawn from `rng`.
pub fn dropout_mask(
    rng: &SharedRng,
    dims: &[usize],
    p: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let keep = (1.0 / (1.0 - p)) as f32;
    let p32 = p as f32;
    let values: Vec<f32> = rng.with(|r| {
        (0..n)
            .map(|_| if r.uniform_f32() < p32 { 0.0 } else { keep })
            .collect()
    });
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}
