//! Softmax over the last dimension with backward: y = exp(x - max) / Σ exp(x - max);
//! dx = y ⊙ (dy - Σ dy ⊙ y). A row of all -inf (fully masked) gives zeros, not NaN.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, with_data, Float, PAR_MIN_ELEMS};

struct Softmax;

fn softmax_rows<T: Float>(x: &[T], y: &mut [T], n: usize) {
    let row = |(xr, yr): (&[T], &mut [T])| {
        let mut max = T::NEG_INF;
        for &v in xr {
            max = max.max_(v);
        }
        if max == T::NEG_INF {
            yr.iter_mut().for_each(|v| *v = T::ZERO);
            return;
        }
        let mut sum = T::ZERO;
        for (o, &v) in yr.iter_mut().zip(xr) {
            let e = (v - max).exp_();
            *o = e;
            sum += e;
        }
        let inv = T::ONE / sum;
        yr.iter_mut().for_each(|v| *v *= inv);
    };
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks(n).zip(y.par_chunks_mut(n)).for_each(row);
    } else {
        x.chunks(n).zip(y.chunks_mut(n)).for_each(row);
    }
}

fn softmax_bwd_rows<T: Float>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
    let row = |((yr, dyr), dxr): ((&[T], &[T]), &mut [T])| {
        let mut dot = T::ZERO;
        for (&a, &b) in yr.iter().zip(dyr) {
            dot += a * b;
        }
        for ((o, &a), &b) in dxr.iter_mut().zip(yr).zip(dyr) {
            *o = a * (b - dot);
        }
    };
    if y.len() >= PAR_MIN_ELEMS {
        y.par_chunks(n)
            .zip(dy.par_chunks(n))
            .zip(dx.par_chunks_mut(n))
            .for_each(row);
    } else {
        y.chunks(n)
            .zip(dy.chunks(n))
            .zip(dx.chunks_mut(n))
            .for_each(row);
    }
}

fn fwd<T: Float>(s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
    let x = slice::<T>(s, l)?;
    let n = *l.dims().last().unwrap_or(&1);
    let mut y = vec![T::ZERO; x.len()];
    if n > 0 {
        softmax_rows(x, &mut y, n);
    }
    Ok(y)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(fwd::<f32>(s, l)?),
            CpuStorage::F64(_) => CpuStorage::F64(fwd::<f64>(s, l)?),
            _ => candle_core::bail!("fused softmax: only f32/f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = *res.dims().last().unwrap_or(&1);
        let dx = match res.dtype() {
            candle_core::DType::F32 => bwd::<f32>(res, grad, n)?,
            _ => bwd::<f64>(res, grad, n)?,
        };
        Ok(Some(dx))
    }
}

fn bwd<T: Float>(y: &Tensor, dy: &Tensor, n: usize) -> Result<Tensor> {
    let dx = with_data::<T, _>(y, |ys| {
        with_data::<T, _>(dy, |dys| {
            let mut dx = vec![T::ZERO; ys.len()];
            if n > 0 {
                softmax_bwd_rows(ys, dys, &mut dx, n);
            }
            Ok(dx)
        })
    })?;
    Tensor::from_vec(dx, y.shape(), y.device())
}

/// Fused softmax over the last dimension (contiguous f32/f64 CPU tensors).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op1(&ops::contiguous(x)?, Softmax, ops::Output::Kept)
}
