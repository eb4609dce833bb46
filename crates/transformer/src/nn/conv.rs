//! 1-D convolution over a sequence of feature frames (Whisper's audio front end), with
//! PyTorch's `nn.Conv1d` weight layout (C_out, C_in, K) and initialization.
//!
//! y[b, o, t] = bias[o] + Σ_c Σ_k W[o, c, k] · x[b, c, t·stride + k − padding]
//!
//! Computed as im2col and one matrix product from candle ops whose backward is exact
//! (narrow, cat, reshape, matmul). Not candle's own `conv1d`: its kernel gradient is wrong
//! on the CPU in candle 0.11 (off by up to 1e1 on a 3 × 4 × 3 kernel with batch 2, stride 1,
//! padding 1; `tests/gradcheck.rs` found it), while this one passes the finite-difference
//! checks there.
//!
//! Dimension letters: `B` batch, `C` input channels, `O` output channels, `K` kernel width,
//! `L` input length, `L'` output length = ⌊(L + 2·padding − K) / stride⌋ + 1.

use candle_core::Tensor;

use super::var_store::{Init, VarPath};
use crate::{Error, Result};

/// `nn.Conv1d(c_in, c_out, kernel, stride, padding)` with a bias.
#[derive(Debug, Clone)]
pub struct Conv1d {
    /// (O, C, K)
    weight: Tensor,
    /// (O)
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv1d {
    /// Parameters `weight` (O, C, K) and `bias` (O), both uniform(±1/√(C·K)) as PyTorch
    /// initializes them.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vp: &VarPath,
    ) -> Result<Self> {
        if c_in == 0 || c_out == 0 || kernel == 0 || stride == 0 {
            return Err(Error::Config(format!(
                "conv1d: channels {c_in} → {c_out}, kernel {kernel}, stride {stride} must be > 0"
            )));
        }
        let fan_in = c_in * kernel;
        let weight = vp.var(
            "weight",
            &[c_out, c_in, kernel],
            Init::LinearBias { fan_in },
        )?;
        let bias = bias
            .then(|| vp.var("bias", &[c_out], Init::LinearBias { fan_in }))
            .transpose()?;
        Ok(Conv1d {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The output length for an input of `len` frames.
    pub fn output_len(&self, len: usize) -> Option<usize> {
        let k = self.weight.dim(2).ok()?;
        (len + 2 * self.padding)
            .checked_sub(k)
            .map(|n| n / self.stride + 1)
    }

    /// # Shapes
    /// `x`: (B, C, L) → (B, O, L')
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, c, k) = self.weight.dims3()?;
        let dims = x.dims();
        if dims.len() != 3 || dims[1] != c || dims[2] + 2 * self.padding < k {
            return Err(Error::shape(
                "conv1d input",
                format!("(B, {c}, L) with L + 2·{} ≥ {k}", self.padding),
                dims,
            ));
        }
        let (b, _, l) = x.dims3()?;
        let (s, p) = (self.stride, self.padding);
        let l_out = (l + 2 * p - k) / s + 1;
        let zeros = |n: usize| Tensor::zeros((b, c, n), x.dtype(), x.device());
        // (B, C, L + 2p)
        let x = if p > 0 {
            Tensor::cat(&[&zeros(p)?, x, &zeros(p)?], 2)?
        } else {
            x.clone()
        };
        // Tap `j` reads positions j, j + s, ..., j + (L' − 1)·s: (B, C, L') each.
        let span = (l_out - 1) * s + 1;
        let taps = (0..k)
            .map(|j| {
                let t = x.narrow(2, j, span)?;
                if s == 1 {
                    return Ok(t);
                }
                // (B, C, L'·s) → (B, C, L', s), first of each stride.
                let t = Tensor::cat(&[&t, &zeros(s - 1)?], 2)?;
                t.reshape((b, c, l_out, s))?.narrow(3, 0, 1)?.squeeze(3)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // (B, C, K, L') → (B, C·K, L'), matching the weight's (O, C·K) rows.
        let cols = Tensor::stack(&taps, 2)?.reshape((b, c * k, l_out))?;
        let y = self.weight.reshape((o, c * k))?.broadcast_matmul(&cols)?;
        Ok(match &self.bias {
            // (O) → (1, O, 1)
            Some(b) => y.broadcast_add(&b.reshape((1, o, 1))?)?,
            None => y,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::nn::{InitScheme, VarStore};

    /// The definition in the module docs, summed by hand.
    #[test]
    fn conv1d_is_the_sum_in_the_docs() -> Result<()> {
        let vs = VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, 7);
        let (c, o, k, stride, padding) = (3, 2, 3, 2, 1);
        let conv = Conv1d::new(c, o, k, stride, padding, true, &vs.root())?;
        let (b, l) = (2, 7);
        let xs: Vec<f64> = (0..b * c * l)
            .map(|i| ((i * 37 % 11) as f64) / 7.0 - 0.6)
            .collect();
        let x = Tensor::from_vec(xs.clone(), (b, c, l), &Device::Cpu)?;
        let y = conv.forward(&x)?;
        let l_out = conv.output_len(l).unwrap();
        assert_eq!(y.dims(), &[b, o, l_out]);
        let w = conv.weight.flatten_all()?.to_vec1::<f64>()?;
        let bias = conv.bias.as_ref().unwrap().to_vec1::<f64>()?;
        let y = y.flatten_all()?.to_vec1::<f64>()?;
        for bi in 0..b {
            for oi in 0..o {
                for t in 0..l_out {
                    let mut want = bias[oi];
                    for ci in 0..c {
                        for ki in 0..k {
                            let pos = (t * stride + ki) as isize - padding as isize;
                            if pos >= 0 && (pos as usize) < l {
                                want += w[(oi * c + ci) * k + ki]
                                    * xs[(bi * c + ci) * l + pos as usize];
                            }
                        }
                    }
                    let got = y[(bi * o + oi) * l_out + t];
                    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
                }
            }
        }
        let bad = Tensor::zeros((1, c + 1, l), DType::F64, &Device::Cpu)?;
        assert!(conv
            .forward(&bad)
            .unwrap_err()
            .to_string()
            .contains("conv1d input"));
        Ok(())
    }
}
