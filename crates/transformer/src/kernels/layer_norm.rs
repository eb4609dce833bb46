//! Layer norm and RMS norm over the last dimension with backward, one pass each way.
//!
//! Layer norm (Ba et al. 2016): x̂ = (x - μ) / √(σ² + ε), y = x̂ ⊙ w + b (biased variance,
//! as PyTorch). Backward, with g = dy ⊙ w: dx = (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂)) / √(σ² + ε);
//! dw = Σ_rows dy ⊙ x̂; db = Σ_rows dy. μ and σ are recomputed from x in the backward.
//!
//! RMS norm (Zhang & Sennrich 2019, Llama's `RMSNorm`) is the same without centring: μ = 0,
//! σ² = mean(x²), no bias, and the `mean(g)` term of dx drops out.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, with_data, Float, PAR_MIN_ELEMS};

/// Which normalization: centred (layer norm) or not (RMS norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Centre {
    Mean,
    None,
}

struct LayerNormOp {
    eps: f64,
    centre: Centre,
}

fn stats<T: Float>(x: &[T], eps: f64, centre: Centre) -> (T, T) {
    let n = T::of(x.len() as f64);
    let mean = match centre {
        Centre::Mean => {
            let mut sum = T::ZERO;
            for &v in x {
                sum += v;
            }
            sum / n
        }
        Centre::None => T::ZERO,
    };
    let mut var = T::ZERO;
    for &v in x {
        let d = v - mean;
        var += d * d;
    }
    let rstd = T::ONE / (var / n + T::of(eps)).sqrt_();
    (mean, rstd)
}

fn fwd<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64, centre: Centre) -> Vec<T> {
    let c = w.len();
    let mut y = vec![T::ZERO; x.len()];
    let row = |(xr, yr): (&[T], &mut [T])| {
        let (mean, rstd) = stats(xr, eps, centre);
        for i in 0..c {
            yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks(c).zip(y.par_chunks_mut(c)).for_each(row);
    } else {
        x.chunks(c).zip(y.chunks_mut(c)).for_each(row);
    }
    y
}

/// dx for a block of rows, accumulating dw and db.
#[allow(clippy::too_many_arguments)]
fn bwd_rows<T: Float>(
    x: &[T],
    dy: &[T],
    w: &[T],
    eps: f64,
    centre: Centre,
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
) {
    let c = w.len();
    let nf = T::of(c as f64);
    for ((xr, dyr), dxr) in x.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c)) {
        let (mean, rstd) = stats(xr, eps, centre);
        let (mut sum_g, mut sum_gx) = (T::ZERO, T::ZERO);
        for i in 0..c {
            let xh = (xr[i] - mean) * rstd;
            let g = dyr[i] * w[i];
            sum_g += g;
            sum_gx += g * xh;
            dw[i] += dyr[i] * xh;
            db[i] += dyr[i];
        }
        let mg = match centre {
            Centre::Mean => sum_g / nf,
            Centre::None => T::ZERO,
        };
        let mgx = sum_gx / nf;
        for i in 0..c {
            let xh = (xr[i] - mean) * rstd;
            dxr[i] = (dyr[i] * w[i] - mg - xh * mgx) * rstd;
        }
    }
}

fn bwd<T: Float>(x: &[T], dy: &[T], w: &[T], eps: f64, centre: Centre) -> (Vec<T>, Vec<T>, Vec<T>) {
    let c = w.len();
    let rows = x.len() / c.max(1);
    let mut dx = vec![T::ZERO; x.len()];
    if x.len() >= PAR_MIN_ELEMS && rows >= 2 {
        // Each thread accumulates its own dw/db over a block of rows; blocks are then summed.
        let threads = rayon::current_num_threads().max(1);
        let block = rows.div_ceil(threads) * c;
        let partial: Vec<(Vec<T>, Vec<T>)> = x
            .par_chunks(block)
            .zip(dy.par_chunks(block))
            .zip(dx.par_chunks_mut(block))
            .map(|((xb, dyb), dxb)| {
                let (mut dw, mut db) = (vec![T::ZERO; c], vec![T::ZERO; c]);
                bwd_rows(xb, dyb, w, eps, centre, dxb, &mut dw, &mut db);
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![T::ZERO; c], vec![T::ZERO; c]);
        for (pw, pb) in partial {
            for i in 0..c {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        (dx, dw, db)
    } else {
        let (mut dw, mut db) = (vec![T::ZERO; c], vec![T::ZERO; c]);
        bwd_rows(x, dy, w, eps, centre, &mut dx, &mut dw, &mut db);
        (dx, dw, db)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(
                slice::<f32>(s1, l1)?,
                slice::<f32>(s2, l2)?,
                slice::<f32>(s3, l3)?,
                self.eps,
                self.centre,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(
                slice::<f64>(s1, l1)?,
                slice::<f64>(s2, l2)?,
                slice::<f64>(s3, l3)?,
                self.eps,
                self.centre,
            )),
            _ => candle_core::bail!("fused layer norm: only f32/f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = norm_backward(x, w, grad, self.eps, self.centre)?;
        let db = (self.centre == Centre::Mean).then_some(db);
        Ok((Some(dx), Some(dw), db))
    }
}

/// (dx, dw, db) of the layer or RMS norm of `x` (rows of w.len()) with weight `w`, given dy.
pub(crate) fn norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    centre: Centre,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn run<T: Float>(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
        centre: Centre,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dx, dw, db) = with_data::<T, _>(x, |xs| {
            with_data::<T, _>(dy, |dys| {
                with_data::<T, _>(w, |ws| Ok(bwd(xs, dys, ws, eps, centre)))
            })
        })?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, w.shape(), dev)?,
            Tensor::from_vec(db, w.shape(), dev)?,
        ))
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x, w, dy, eps, centre),
        _ => run::<f64>(x, w, dy, eps, centre),
    }
}

/// Fused layer norm over the last dimension of a contiguous f32/f64 CPU tensor; `bias` of
/// `None` is a zero bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    norm(x, weight, bias, eps, Centre::Mean)
}

/// Fused RMS norm over the last dimension of a contiguous f32/f64 CPU tensor:
/// x / √(mean(x²) + ε) ⊙ weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    norm(x, weight, None, eps, Centre::None)
}

pub(crate) fn norm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
    centre: Centre,
) -> Result<Tensor> {
    let zeros;
    let b = match bias {
        Some(b) => b,
        None => {
            zeros = crate::autograd::constant(weight.zeros_like()?.detach());
            &zeros
        }
    };
    use crate::autograd::ops;
    ops::apply_op3(
        &ops::contiguous(x)?,
        &ops::contiguous(weight)?,
        &ops::contiguous(b)?,
        LayerNormOp { eps, centre },
        ops::Output::Unused,
    )
}
