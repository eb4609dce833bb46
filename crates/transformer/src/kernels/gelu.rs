//! GELU, exact and tanh-approximated, with backward:
//! - exact, x·Φ(x) = ½x(1 + erf(x/√2)), backward dy·(Φ(x) + x·φ(x));
//! - tanh (GPT-2, Gemma), ½x(1 + tanh u) with u = √(2/π)(x + 0.044715x³), computed as
//!   x·σ(2u) (the same function: ½(1 + tanh u) = σ(2u)), backward
//!   dy·(σ + x·σ(1 - σ)·2u′).
//!
//! candle's `gelu_erf` and `gelu` call a scalar erf or tanh per element (a tenth of Gemma 3's
//! prompt time went to `tanhf` and `expm1f`) and their backwards compose several ops. Here f32
//! uses a branch-free erf (Abramowitz & Stegun 7.1.26: 1.5e-7, under 6e-7 with f32 rounding)
//! and sigmoid over a branch-free exp, so that the loops auto-vectorize; f64 uses libm (full
//! precision, for the finite-difference checks).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::has_avx512;
use super::{has_avx2, slice, with_data, PAR_MIN_ELEMS};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// e^x for f32 without branches: x = n·ln2 + r, e^r by a degree-6 polynomial, 2^n through the
/// exponent bits. Relative error about 2e-7 over the range GELU needs; clamped to avoid
/// overflow.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = x·log2(e) rounded to nearest even, by adding 1.5·2²³: the sum's low mantissa bits
    // then hold n as an integer. Unlike `round_ties_even` plus `n as i32` (a saturating cast
    // that stays scalar, with a NaN check per lane), every step here vectorizes.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // ln 2 split in two (Cody-Waite) so that r keeps its precision for large |x|.
    let r = (x - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ: n + 127 in the exponent field (n is in -126..=127 after the clamp).
    let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// erf for f32, branch-free (A&S 7.1.26).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - t * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))))
            * exp_f32(-a * a);
    y.copysign(x)
}

/// √(2/π)
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of GELU's tanh approximation.
const GELU_TANH_C: f64 = 0.044_715;

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Erf,
    Tanh,
}

/// 2u for the tanh form and its derivative 2u′.
#[inline(always)]
fn two_u(v: f32) -> (f32, f32) {
    let (a, c) = (2.0 * SQRT_2_OVER_PI as f32, GELU_TANH_C as f32);
    (a * (v + c * v * v * v), a * (1.0 + 3.0 * c * v * v))
}

#[inline(always)]
fn fwd_body<const TANH: bool>(y: &mut [f32], x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = if TANH {
            // x·σ(2u); e^{-2u} overflowing to +inf (clamped in exp_f32) gives 0, as it should.
            v / (1.0 + exp_f32(-two_u(v).0))
        } else {
            0.5 * v * (1.0 + erf_f32(v * FRAC_1_SQRT_2))
        };
    }
}

#[inline(always)]
fn bwd_body<const TANH: bool>(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *o = if TANH {
            let (u2, du2) = two_u(v);
            let sig = 1.0 / (1.0 + exp_f32(-u2));
            g * (sig + v * sig * (1.0 - sig) * du2)
        } else {
            let cdf = 0.5 * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI as f32 * exp_f32(-0.5 * v * v);
            g * (cdf + v * pdf)
        };
    }
}

// The same loops compiled for AVX2: the baseline x86-64 target has no vector rounding
// instruction, so there `exp_f32` stays scalar (a call to `rintf` per element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_avx2<const TANH: bool>(y: &mut [f32], x: &[f32]) {
    fwd_body::<TANH>(y, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_avx2<const TANH: bool>(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    bwd_body::<TANH>(dx, x, dy)
}

// And for AVX-512: sixteen lanes. Every operation is element-wise IEEE arithmetic (Rust never
// contracts a multiply and an add into an FMA on its own), so each lane gives the bits the
// AVX2 and scalar loops give.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn fwd_avx512<const TANH: bool>(y: &mut [f32], x: &[f32]) {
    fwd_body::<TANH>(y, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn bwd_avx512<const TANH: bool>(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    bwd_body::<TANH>(dx, x, dy)
}

fn fwd_chunk<const TANH: bool>(y: &mut [f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { fwd_avx512::<TANH>(y, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { fwd_avx2::<TANH>(y, x) };
    }
    fwd_body::<TANH>(y, x)
}

fn bwd_chunk<const TANH: bool>(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: as in `fwd_chunk`.
        return unsafe { bwd_avx512::<TANH>(dx, x, dy) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as in `fwd_chunk`.
        return unsafe { bwd_avx2::<TANH>(dx, x, dy) };
    }
    bwd_body::<TANH>(dx, x, dy)
}

/// Elements per parallel task.
const CHUNK: usize = 4096;

fn fwd_f32<const TANH: bool>(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if x.len() >= PAR_MIN_ELEMS {
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| fwd_chunk::<TANH>(y, x));
    } else {
        fwd_chunk::<TANH>(&mut y, x);
    }
    y
}

fn bwd_f32<const TANH: bool>(x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    if x.len() >= PAR_MIN_ELEMS {
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(dy.par_chunks(CHUNK))
            .for_each(|((dx, x), dy)| bwd_chunk::<TANH>(dx, x, dy));
    } else {
        bwd_chunk::<TANH>(&mut dx, x, dy);
    }
    dx
}

fn fwd_f64(kind: Kind, x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| match kind {
            Kind::Erf => 0.5 * v * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2)),
            Kind::Tanh => 0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + GELU_TANH_C * v.powi(3))).tanh()),
        })
        .collect()
}

fn bwd_f64(kind: Kind, x: &[f64], dy: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| match kind {
            Kind::Erf => {
                let cdf = 0.5 * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
                g * (cdf + v * INV_SQRT_2PI * (-0.5 * v * v).exp())
            }
            Kind::Tanh => {
                let th = (SQRT_2_OVER_PI * (v + GELU_TANH_C * v.powi(3))).tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * v * v);
                g * (0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * du)
            }
        })
        .collect()
}

struct Gelu(Kind);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Erf => "fused-gelu-erf",
            Kind::Tanh => "fused-gelu-tanh",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s, self.0) {
            (CpuStorage::F32(_), Kind::Erf) => CpuStorage::F32(fwd_f32::<false>(slice(s, l)?)),
            (CpuStorage::F32(_), Kind::Tanh) => CpuStorage::F32(fwd_f32::<true>(slice(s, l)?)),
            (CpuStorage::F64(_), kind) => CpuStorage::F64(fwd_f64(kind, slice::<f64>(s, l)?)),
            _ => candle_core::bail!("fused gelu: only f32/f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward(self.0, x, grad)?))
    }
}

/// dy·GELU'(x) for f32/f64 CPU tensors of the same shape.
fn backward(kind: Kind, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => {
            let v = with_data::<f32, _>(x, |xs| {
                with_data::<f32, _>(grad, |gs| {
                    Ok(match kind {
                        Kind::Erf => bwd_f32::<false>(xs, gs),
                        Kind::Tanh => bwd_f32::<true>(xs, gs),
                    })
                })
            })?;
            Tensor::from_vec(v, x.shape(), x.device())
        }
        _ => {
            let v = with_data::<f64, _>(x, |xs| {
                with_data::<f64, _>(grad, |gs| Ok(bwd_f64(kind, xs, gs)))
            })?;
            Tensor::from_vec(v, x.shape(), x.device())
        }
    }
}

/// dy·GELU'(x) (exact GELU) for f32/f64 CPU tensors of the same shape.
pub(crate) fn gelu_erf_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    backward(Kind::Erf, x, grad)
}

/// Fused exact GELU of a contiguous f32/f64 CPU tensor.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op1(&ops::contiguous(x)?, Gelu(Kind::Erf), ops::Output::Unused)
}

/// Fused tanh-approximated GELU (PyTorch's `gelu(x, approximate='tanh')`) of an f32/f64 CPU
/// tensor.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op1(&ops::contiguous(x)?, Gelu(Kind::Tanh), ops::Output::Unused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_erf_and_exp_are_accurate() {
        let mut worst_erf = 0f64;
        let mut worst_exp = 0f64;
        for i in -6000..=6000 {
            let x = i as f64 / 1000.0;
            worst_erf = worst_erf.max((erf_f32(x as f32) as f64 - libm::erf(x)).abs());
            // Against the exact exp of the f32 input (its rounding is not exp's error).
            let xf = (x * 10.0) as f32;
            let e = (xf as f64).exp();
            worst_exp = worst_exp.max(((exp_f32(xf) as f64 - e) / e).abs());
        }
        // 1.5e-7 from the approximation plus f32 rounding.
        assert!(worst_erf < 6e-7, "erf error {worst_erf}");
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
    }

    /// The AVX-512 and AVX2 loops give the scalar loop's bits, forward and backward, for both
    /// forms (on a CPU without them, only the scalar loop runs and there is nothing to compare).
    #[test]
    fn the_vector_loops_give_the_scalar_bits() {
        // 1,003 values over [-12, 12]: whole vectors and a tail of each width.
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.024).collect();
        let dy: Vec<f32> = (0..1003)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3)
            .collect();
        let n = x.len();
        fn both<const TANH: bool>(x: &[f32], dy: &[f32], n: usize) {
            let (mut y0, mut d0) = (vec![0f32; n], vec![0f32; n]);
            fwd_body::<TANH>(&mut y0, x);
            bwd_body::<TANH>(&mut d0, x, dy);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            #[cfg(target_arch = "x86_64")]
            {
                let (mut y, mut d) = (vec![0f32; n], vec![0f32; n]);
                if has_avx2() {
                    // SAFETY: checked just above.
                    unsafe {
                        fwd_avx2::<TANH>(&mut y, x);
                        bwd_avx2::<TANH>(&mut d, x, dy);
                    }
                    assert_eq!(bits(&y), bits(&y0), "AVX2 forward, tanh {TANH}");
                    assert_eq!(bits(&d), bits(&d0), "AVX2 backward, tanh {TANH}");
                }
                if has_avx512() {
                    // SAFETY: checked just above.
                    unsafe {
                        fwd_avx512::<TANH>(&mut y, x);
                        bwd_avx512::<TANH>(&mut d, x, dy);
                    }
                    assert_eq!(bits(&y), bits(&y0), "AVX-512 forward, tanh {TANH}");
                    assert_eq!(bits(&d), bits(&d0), "AVX-512 backward, tanh {TANH}");
                }
            }
            let _ = bits;
        }
        both::<false>(&x, &dy, n);
        both::<true>(&x, &dy, n);
    }
}
