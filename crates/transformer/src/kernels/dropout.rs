//! Dropout with a counter-based mask: element `i` of a call is dropped when a hash of
//! (seed, i) falls below p·2³². The backward regenerates the mask from the seed, so nothing is
//! stored. The composed dropout keeps a full-size mask alive in the graph until the backward
//! ends, and `x + dropout(y)` (every residual connection in training) keeps the mask, the
//! dropped tensor and the sum: here it is one pass that keeps only the sum.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, Float, PAR_MIN_ELEMS};

/// Keep decision of dropout for element `idx`: splitmix64 of (seed, idx), kept with
/// probability 1 - threshold / 2³². Shared with the attention kernel.
#[inline]
pub(crate) fn keep(seed: u64, idx: u64, threshold: u32) -> bool {
    let mut z = seed.wrapping_add(idx.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32 >= threshold
}

/// The threshold that drops with probability `p`.
pub(crate) fn threshold(p: f64) -> u32 {
    (p * 4_294_967_296.0).min(4_294_967_295.0) as u32
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy)]
struct Mask {
    threshold: u32,
    scale: f64,
    seed: u64,
}

impl Mask {
    fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        Ok(Mask {
            threshold: threshold(p),
            scale: 1.0 / (1.0 - p),
            seed,
        })
    }

    /// out[i] = (x[i] if given, else 0) + mask(i)·scale·y[i], over the whole tensor in chunks
    /// whose element indices are global, so that the mask does not depend on the threading.
    fn run<T: Float>(&self, x: Option<&[T]>, y: &[T]) -> Vec<T> {
        let scale = T::of(self.scale);
        let body = |ci: usize, out: &mut [T]| {
            let base = ci * CHUNK;
            for (j, o) in out.iter_mut().enumerate() {
                let i = base + j;
                let d = if keep(self.seed, i as u64, self.threshold) {
                    y[i] * scale
                } else {
                    T::ZERO
                };
                *o = match x {
                    Some(x) => x[i] + d,
                    None => d,
                };
            }
        };
        let mut out = vec![T::ZERO; y.len()];
        if y.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(ci, o)| body(ci, o));
        } else {
            out.chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(ci, o)| body(ci, o));
        }
        out
    }
}

fn storage<T: Float>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

impl CustomOp1 for Mask {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => storage(self.run::<f32>(None, slice(s, l)?)),
            CpuStorage::F64(_) => storage(self.run::<f64>(None, slice(s, l)?)),
            _ => candle_core::bail!("fused dropout: only f32/f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The same mask and scale applied to the gradient.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// `x + dropout(y)`, the mask on `y` only.
struct AddMasked(Mask);

impl CustomOp2 for AddMasked {
    fn name(&self) -> &'static str {
        "fused-dropout-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "fused dropout-add: shapes differ, {:?} and {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                storage(self.0.run::<f32>(Some(slice(s1, l1)?), slice(s2, l2)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                storage(self.0.run::<f64>(Some(slice(s1, l1)?), slice(s2, l2)?))
            }
            _ => candle_core::bail!("fused dropout-add: only f32/f64, both the same"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?.apply_op1_no_bwd(&self.0)?;
        Ok((Some(grad.clone()), Some(dy)))
    }
}

/// Dropout of a CPU f32/f64 tensor: each element zeroed with probability `p`, the rest scaled
/// by 1/(1-p); the mask is a function of `seed` and the element's position.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op1(
        &ops::contiguous(x)?,
        Mask::new(p, seed)?,
        ops::Output::Unused,
    )
}

/// `x + dropout(y)` in one pass, with the mask of [`dropout`]`(y, p, seed)`.
pub fn dropout_add(x: &Tensor, y: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op2(
        &ops::contiguous(x)?,
        &ops::contiguous(y)?,
        AddMasked(Mask::new(p, seed)?),
        ops::Output::Unused,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_diff;
    use candle_core::{DType, Device, Var};

    fn ramp(n: usize, dtype: DType) -> Tensor {
        Tensor::arange(1f32, n as f32 + 1.0, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Large enough for the parallel path and several chunks.
    const N: usize = 100_003;

    #[test]
    fn drops_p_and_scales_the_rest() {
        let p = 0.3;
        let x = ramp(N, DType::F32);
        let y = dropout(&x, p, 7).unwrap().to_vec1::<f32>().unwrap();
        let xs = x.to_vec1::<f32>().unwrap();
        let mut dropped = 0;
        for (a, b) in xs.iter().zip(&y) {
            if *b == 0.0 {
                dropped += 1;
            } else {
                assert!((b / a - 1.0 / 0.7).abs() < 1e-6, "{a} -> {b}");
            }
        }
        let frac = dropped as f64 / N as f64;
        // 4 standard deviations of a binomial proportion.
        let sd = (p * (1.0 - p) / N as f64).sqrt();
        assert!((frac - p).abs() < 4.0 * sd, "dropped {frac}");
        // The same seed gives the same mask, another seed another.
        assert_eq!(dropout(&x, p, 7).unwrap().to_vec1::<f32>().unwrap(), y);
        assert_ne!(dropout(&x, p, 8).unwrap().to_vec1::<f32>().unwrap(), y);
    }

    #[test]
    fn add_uses_the_same_mask_and_both_gradients_are_right() {
        let (p, seed) = (0.4, 99);
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&ramp(N, dtype).affine(-1.0, 0.0).unwrap()).unwrap();
            let y = Var::from_tensor(&ramp(N, dtype).affine(0.5, 0.0).unwrap()).unwrap();
            let fused = dropout_add(&x, &y, p, seed).unwrap();
            let composed = (x.as_tensor() + dropout(&y, p, seed).unwrap()).unwrap();
            let diff = max_diff(&fused, &composed);
            assert_eq!(diff, 0.0, "{dtype:?}");
            // Weighted sum, so that each element's gradient is its own weight.
            let w = ramp(N, dtype).affine(0.001, 0.0).unwrap();
            let grads = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(&x).unwrap().to_dtype(DType::F64).unwrap();
            let dy = grads.get(&y).unwrap().to_dtype(DType::F64).unwrap();
            let w64 = w.to_dtype(DType::F64).unwrap();
            assert_eq!(dx.to_vec1::<f64>().unwrap(), w64.to_vec1::<f64>().unwrap());
            // dy = w where kept (scaled), 0 where dropped: dropout of w with the same mask.
            let want = dropout(&w, p, seed).unwrap().to_dtype(DType::F64).unwrap();
            let err = max_diff(&dy, &want);
            assert!(err < 1e-6, "{dtype:?}: {err}");
        }
    }

    #[test]
    fn mask_is_independent_of_threading_and_layout() {
        // A transposed (non-contiguous) input is read in logical order.
        let x = ramp(6 * 5, DType::F64).reshape((6, 5)).unwrap();
        let t = x.t().unwrap();
        let a = dropout(&t, 0.5, 3).unwrap();
        let b = dropout(&t.contiguous().unwrap(), 0.5, 3).unwrap();
        assert_eq!(a.to_vec2::<f64>().unwrap(), b.to_vec2::<f64>().unwrap());
        // Serial (small) and parallel (large) runs agree on a shared prefix of indices.
        let small = dropout(&ramp(1000, DType::F32), 0.5, 5).unwrap();
        let large = dropout(&ramp(N, DType::F32), 0.5, 5).unwrap();
        assert_eq!(
            small.to_vec1::<f32>().unwrap(),
            large.narrow(0, 0, 1000).unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn bad_probability_is_an_error() {
        let x = ramp(4, DType::F32);
        assert!(dropout(&x, 1.0, 0).is_err());
        assert!(dropout(&x, -0.1, 0).is_err());
    }
}
