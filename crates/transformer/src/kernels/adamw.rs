//! AdamW's update as in-place CPU kernels (no temporary tensors): the two moment updates and
//! the parameter update of `train::optim`, which falls back to composed ops elsewhere.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::Float;

/// The per-step scalars of the parameter update, computed in f64 once per parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpdateScalars {
    /// `1 - lr * weight_decay`, or 1 outside the decay group.
    pub decay_factor: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
}

/// The contiguous slice a layout covers, or an error naming the op.
fn contiguous<'a, T>(data: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: needs contiguous tensors"),
    }
}

fn contiguous_mut<'a, T>(data: &'a mut [T], l: &Layout, op: &str) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{op}: needs contiguous tensors"),
    }
}

/// `m = beta * m + (1 - beta) * g`, or with `g * g` when `square`, in place.
pub(crate) fn moment_update(m: &Tensor, g: &Tensor, beta: f64, square: bool) -> Result<()> {
    m.inplace_op2(g, &MomentUpdate { beta, square })
}

/// `p = p * decay_factor - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)`, in place.
pub(crate) fn param_update(p: &Tensor, m: &Tensor, v: &Tensor, s: UpdateScalars) -> Result<()> {
    p.inplace_op3(m, v, &ParamUpdate(s))
}

/// In place on a moment `x` with the gradient `g`: `x = beta * x + (1 - beta) * g` (first
/// moment) or `x = beta * x + (1 - beta) * g * g` (second moment).
struct MomentUpdate {
    beta: f64,
    square: bool,
}

impl MomentUpdate {
    fn apply<T: Float>(&self, x: &mut [T], g: &[T]) {
        let beta = T::of(self.beta);
        let one_minus_beta = T::of(1.0 - self.beta);
        if self.square {
            for (x, &g) in x.iter_mut().zip(g) {
                *x = beta * *x + one_minus_beta * (g * g);
            }
        } else {
            for (x, &g) in x.iter_mut().zip(g) {
                *x = beta * *x + one_minus_beta * g;
            }
        }
    }
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = InplaceOp2::name(self);
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                self.apply(contiguous_mut(x, l1, name)?, contiguous(g, l2, name)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                self.apply(contiguous_mut(x, l1, name)?, contiguous(g, l2, name)?)
            }
            (x, g) => candle_core::bail!(
                "{name}: unsupported dtypes {:?} / {:?}",
                x.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }
}

/// In place on the parameter `p`, reading the already updated moments `m` and `v`:
/// `p = p * decay_factor - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)`.
struct ParamUpdate(UpdateScalars);

impl ParamUpdate {
    fn apply<T: Float>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let s = self.0;
        let decay_factor = T::of(s.decay_factor);
        let step_size = T::of(s.step_size);
        let bc2_sqrt = T::of(s.bias_correction2_sqrt);
        let eps = T::of(s.eps);
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt_() / bc2_sqrt + eps;
            *p = *p * decay_factor - step_size * m / denom;
        }
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = InplaceOp3::name(self);
        match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => self.apply(
                contiguous_mut(p, l1, name)?,
                contiguous(m, l2, name)?,
                contiguous(v, l3, name)?,
            ),
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => self.apply(
                contiguous_mut(p, l1, name)?,
                contiguous(m, l2, name)?,
                contiguous(v, l3, name)?,
            ),
            (p, _, _) => candle_core::bail!("{name}: unsupported dtype {:?}", p.dtype()),
        }
        Ok(())
    }
}
