//! Softmax cross-entropy per row with label smoothing and an ignore index, with backward.
//!
//! Forward, per row x with target t: L = log Σ exp(x), loss = (1-ε)(L - x_t) + ε(L - mean x);
//! a row whose target is the ignore index gives 0. The log-sum-exp of each row is kept for the
//! backward, which is then one pass: dx = g · (exp(x - L) - (1-ε)·[c = t] - ε/V). The
//! probabilities are never stored: the composed version materializes exp, log-softmax and
//! their gradients, each (N, V).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, with_data, Float, PAR_MIN_ELEMS};

struct CrossEntropy {
    eps: f64,
    ignore: Option<u32>,
    /// Log-sum-exp of each row, (N,), written by the forward for the backward.
    lse: Arc<Mutex<Option<Vec<f64>>>>,
}

fn fwd<T: Float>(
    x: &[T],
    targets: &[u32],
    v: usize,
    eps: f64,
    ignore: Option<u32>,
) -> Result<(Vec<T>, Vec<f64>)> {
    let mut loss = vec![T::ZERO; targets.len()];
    let mut lse = vec![0f64; targets.len()];
    let row = |((xr, &t), (out, lse)): ((&[T], &u32), (&mut T, &mut f64))| -> Result<()> {
        if Some(t) == ignore {
            return Ok(());
        }
        if t as usize >= v {
            candle_core::bail!("cross_entropy: target {t} is out of range for {v} classes");
        }
        let mut max = T::NEG_INF;
        let mut sum = T::ZERO;
        for &a in xr {
            max = max.max_(a);
            sum += a;
        }
        let mut z = T::ZERO;
        for &a in xr {
            z += (a - max).exp_();
        }
        let l = max + z.ln_();
        let nll = l - xr[t as usize];
        let smooth = l - sum / T::of(v as f64);
        *out = T::of(1.0 - eps) * nll + T::of(eps) * smooth;
        *lse = l.to_f64();
        Ok(())
    };
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks(v)
            .zip(targets.par_iter())
            .zip(loss.par_iter_mut().zip(lse.par_iter_mut()))
            .try_for_each(row)?;
    } else {
        x.chunks(v)
            .zip(targets)
            .zip(loss.iter_mut().zip(lse.iter_mut()))
            .try_for_each(row)?;
    }
    Ok((loss, lse))
}

#[allow(clippy::too_many_arguments)]
fn bwd_rows<T: Float>(
    x: &[T],
    targets: &[u32],
    g: &[T],
    lse: &[f64],
    v: usize,
    eps: f64,
    ignore: Option<u32>,
) -> Vec<T> {
    let mut dx = vec![T::ZERO; x.len()];
    let on_target = T::of(1.0 - eps);
    let uniform = T::of(eps / v as f64);
    type Row<'a, T> = (((&'a [T], &'a mut [T]), &'a u32), (&'a T, &'a f64));
    let row = |(((xr, dxr), &t), (&g, &l)): Row<T>| {
        if Some(t) == ignore {
            return;
        }
        let l = T::of(l);
        for (d, &a) in dxr.iter_mut().zip(xr) {
            *d = g * ((a - l).exp_() - uniform);
        }
        dxr[t as usize] += -(g * on_target);
    };
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks(v)
            .zip(dx.par_chunks_mut(v))
            .zip(targets.par_iter())
            .zip(g.par_iter().zip(lse.par_iter()))
            .for_each(row);
    } else {
        x.chunks(v)
            .zip(dx.chunks_mut(v))
            .zip(targets)
            .zip(g.iter().zip(lse))
            .for_each(row);
    }
    dx
}

impl CrossEntropy {
    fn fwd_typed<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<Vec<T>> {
        let (_, v) = l1.shape().dims2()?;
        let x = slice::<T>(s1, l1)?;
        let targets = slice::<u32>(s2, l2)?;
        let (loss, lse) = fwd(x, targets, v, self.eps, self.ignore)?;
        *self.lse.lock().unwrap() = Some(lse);
        Ok(loss)
    }

    fn bwd_typed<T: Float>(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let lse = self.lse.lock().unwrap().clone().ok_or_else(|| {
            candle_core::Error::Msg("cross_entropy: backward before forward".into())
        })?;
        let (_, v) = logits.dims2()?;
        let targets = targets.contiguous()?.to_vec1::<u32>()?;
        let g = grad.contiguous()?.to_vec1::<T>()?;
        let dx = with_data::<T, _>(logits, |x| {
            Ok(bwd_rows(x, &targets, &g, &lse, v, self.eps, self.ignore))
        })?;
        Tensor::from_vec(dx, logits.shape(), logits.device())
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, _) = l1.shape().dims2()?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.fwd_typed::<f32>(s1, l1, s2, l2)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.fwd_typed::<f64>(s1, l1, s2, l2)?),
            _ => candle_core::bail!("fused cross_entropy: only f32/f64 logits"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = match logits.dtype() {
            DType::F32 => self.bwd_typed::<f32>(logits, targets, grad)?,
            _ => self.bwd_typed::<f64>(logits, targets, grad)?,
        };
        Ok((Some(dx), None))
    }
}

/// Per-row loss (N,) of `logits` (N, V) against u32 `targets` (N,): label smoothing `eps`,
/// rows whose target is `ignore` give 0. Differentiable with respect to the logits.
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &Tensor,
    eps: f64,
    ignore: Option<u32>,
) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op2(
        &ops::contiguous(logits)?,
        &targets.contiguous()?,
        CrossEntropy {
            eps,
            ignore,
            lse: Arc::new(Mutex::new(None)),
        },
        ops::Output::Unused,
    )
}
