//! `y = x Wᵀ + b`, with PyTorch's weight layout (out_features, in_features). The weight is a
//! dense tensor (trainable) or quantized blocks read from a GGUF file, multiplied by candle's
//! quantized matmul (AVX-512 VNNI repacked kernels, AMX where the CPU has it).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Module, Tensor};

use super::var_store::{Init, VarPath};
use crate::autograd::ops;
use crate::kernels::bf16;
use crate::kernels::quantized::BlockMatrix;
use crate::{Error, Result};

/// The largest k-quant matrix dequantized for a many-row product (16 MB of f32).
const DENSE_MAX_ELEMS: usize = 1 << 22;

/// A weight matrix (out, in).
#[derive(Debug, Clone)]
pub enum Weight {
    /// A tensor: trainable, any dtype.
    Dense(Tensor),
    /// GGUF's k-quant blocks (Q4_K, Q6_K, ...), kept as the file stores them and multiplied
    /// by candle's quantized matmul. Inference only: it has no backward, for the weight or the
    /// input.
    Quantized(Arc<QTensor>),
    /// GGUF's 32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) through our kernel
    /// (`kernels::quantized`), which candle multiplies with scalar code. Inference only.
    Blocks(Arc<BlockMatrix>),
}

impl Weight {
    /// A quantized weight as read from a file: through our kernel for the 32-element block
    /// formats, candle's for the others.
    pub fn from_qtensor(q: QTensor) -> Result<Weight> {
        Ok(match BlockMatrix::from_qtensor(&q)? {
            Some(b) => Weight::Blocks(Arc::new(b)),
            None => Weight::Quantized(Arc::new(q)),
        })
    }

    /// (out, in)
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quantized(q) => q.shape().dims(),
            Weight::Blocks(b) => b.dims_ref(),
        }
    }

    /// The dense tensor, when the weight is one.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            _ => None,
        }
    }

    /// The block type of a quantized weight.
    pub fn quantization(&self) -> Option<GgmlDType> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quantized(q) => Some(q.dtype()),
            Weight::Blocks(b) => Some(b.dtype()),
        }
    }

    /// `x Wᵀ` for x of any rank (..., in) → (..., out).
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) => linear(x, w, None),
            Weight::Quantized(q) => {
                // Many rows (a prompt): dequantized and multiplied in f32, as the block formats
                // are (`kernels::quantized::DENSE_MIN_ROWS`); candle's k-quant products spend
                // most of such a call quantizing the rows. Not for the largest matrices (an
                // output layer over a whole vocabulary), whose f32 copy would not fit in cache
                // nor, for 262k-token vocabularies, comfortably in memory.
                let (n, k) = q.shape().dims2()?;
                let rows = x.elem_count() / k.max(1);
                if x.dtype() == DType::F32
                    && rows >= crate::kernels::quantized::DENSE_MIN_ROWS
                    && n * k <= DENSE_MAX_ELEMS
                {
                    return linear(x, &q.dequantize(x.device())?, None);
                }
                // The quantized kernels take contiguous f32 (or f16) rows; other dtypes go
                // through f32 and come back.
                let dtype = x.dtype();
                let xf = match dtype {
                    DType::F32 | DType::F16 => x.contiguous()?,
                    _ => x.to_dtype(DType::F32)?.contiguous()?,
                };
                let y = xf.apply_op1_no_bwd(q.as_ref())?;
                if y.dtype() == dtype {
                    Ok(y)
                } else {
                    y.to_dtype(dtype)
                }
            }
            Weight::Blocks(b) => {
                let dtype = x.dtype();
                let y = x
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(b.as_ref())?;
                y.to_dtype(dtype)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
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

    /// Parameters: `weight` (d_out, d_in), dense or, when the store holds quantized weights
    /// under this name, quantized; `bias` (d_out).
    pub fn with_bias_init(
        d_in: usize,
        d_out: usize,
        bias: bool,
        residual: bool,
        bias_init: Init,
        vp: &VarPath,
    ) -> Result<Self> {
        let weight = vp.matrix("weight", &[d_out, d_in], Init::Weight { residual })?;
        let bias = if bias {
            Some(vp.var("bias", &[d_out], bias_init)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// A layer over a weight of either kind.
    pub fn from_weight(weight: Weight, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The weight, dense or quantized.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// The weight tensor, when it is dense (the fused training kernels need one).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        self.weight.dense()
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

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let d_in = self.d_in();
        if x.dims().last() != Some(&d_in) {
            return Err(Error::shape(
                "linear input",
                format!("(..., {d_in})"),
                x.dims(),
            ));
        }
        Ok(())
    }

    /// # Shapes
    /// `x`: (..., d_in) → (..., d_out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        Ok(Module::forward(self, x)?)
    }

    /// Several layers applied to the same input: `[l.forward(x) for l in layers]`. Quantized
    /// layers without biases (Q, K, V; gate and up) share one quantization of `x` and one
    /// parallel region when candle's fused kernel takes them.
    ///
    /// # Shapes
    /// `x`: (..., d_in) → one (..., d_out_i) per layer
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        for l in layers {
            l.check_input(x)?;
        }
        let quantized: Option<Vec<&QTensor>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (Weight::Quantized(q), None) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        let blocks: Option<Vec<&BlockMatrix>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (Weight::Blocks(b), None) => Some(b.as_ref()),
                _ => None,
            })
            .collect();
        if let (Some(bs), DType::F32, true) = (blocks, x.dtype(), layers.len() > 1) {
            return BlockMatrix::matmul_t_many(&bs, x);
        }
        if let (Some(qs), DType::F32) = (quantized, x.dtype()) {
            if layers.len() > 1 {
                let x = x.contiguous()?;
                if let Some(ys) = QTensor::gemv_fused_shared_lhs(&qs, &x)? {
                    return Ok(ys);
                }
            }
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }
}

/// `x Wᵀ + b` for x of any rank; folds leading dimensions into one matmul, in the precision of
/// the enclosing `kernels::bf16::autocast` scope.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = ops::reshape(x, (lead, d_in))?;
    // A few rows (incremental decoding): read the weight once, untiled.
    let y = if crate::kernels::few_rows::applies(&x2, w) {
        crate::kernels::few_rows::matmul_t(&x2, w)?
    } else if bf16::takes(bf16::current(), &x2, w) {
        // Inside a bf16 scope (`kernels::bf16::autocast`).
        bf16::matmul_t(&x2, w)?
    } else {
        ops::matmul(&x2, &ops::t(w)?)?
    };
    let y = match b {
        Some(b) => ops::broadcast_add(&y, b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = w.dims()[0];
    ops::reshape(&y, out_dims)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => linear(x, w, self.bias.as_ref()),
            q => {
                let y = q.matmul_t(x)?;
                match &self.bias {
                    Some(b) => ops::broadcast_add(&y, b),
                    None => Ok(y),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A k-quant layer gives the product with its dequantized weight both ways: candle's
    /// quantized kernel for a few rows (up to its 8-bit rounding of the rows), the f32
    /// product from `DENSE_MIN_ROWS` rows on (up to summation order).
    #[test]
    fn k_quant_products_match_the_dequantized_weight() -> Result<()> {
        let mut rng = crate::rng::Rng::new(3);
        let (n, k) = (48, 512);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu)?, GgmlDType::Q4K)?;
        let deq = q.dequantize(&Device::Cpu)?;
        let layer = Linear::from_weight(Weight::from_qtensor(q)?, None);
        for (rows, tol) in [(3, 0.02), (crate::kernels::quantized::DENSE_MIN_ROWS, 1e-5)] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.normal() as f32).collect();
            let x = Tensor::from_vec(x, (1, rows, k), &Device::Cpu)?;
            let want = x.reshape((rows, k))?.matmul(&deq.t()?)?;
            let got = layer.forward(&x)?;
            assert_eq!(got.dims(), &[1, rows, n]);
            let err = (got.reshape((rows, n))? - &want)?.abs()?.max_all()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = err.to_scalar::<f32>()?;
            assert!(
                err < tol * scale,
                "{rows} rows: off by {err} (scale {scale})"
            );
        }
        Ok(())
    }
}
