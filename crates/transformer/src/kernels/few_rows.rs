//! `a Wᵀ` for a few rows of `a`: the products of incremental decoding, one row per sequence or
//! beam against a weight of PyTorch's (out, in) layout.
//!
//! Why not candle's matmul: the gemm crate packs the weight into panels on every call and
//! runs a microkernel tiled for many rows, so with one to eight rows it spends its time
//! copying the weight and multiplying padding. Here each weight row is read once and
//! multiplied with every row of `a` (which stays in L1): four weight rows × up to six rows of
//! `a` at a time in AVX-512 accumulators (two × four in AVX2 elsewhere), the next weight rows
//! prefetched, the weight's rows split over threads. Minimum of 50 calls, AMD EPYC (AVX-512),
//! 2 threads (a throwaway timing loop; the end-to-end figures are in BENCHMARKS.md):
//!
//! | rows × (out × in) | candle | here |
//! |---|---:|---:|
//! | 5 × (51,864 × 384), Whisper tiny's vocabulary, 80 MB | 6.5 ms | 3.6 ms |
//! | 1 × (51,864 × 384) | 3.0 ms | 2.8 ms (a plain sum of the weight: 3.2 ms) |
//! | 5 × (384 × 1536), the feed-forward's second layer | 1.27 ms | 0.056 ms |
//! | 5 × (1536 × 384) | 0.148 ms | 0.060 ms |
//! | 16 × (51,864 × 384) | 8.3 ms | 7.9 ms (hence [`MAX_ROWS`] = 8) |
//!
//! [`matmul_t`] is the graph op (a custom op whose backward is two ordinary matmuls), used by
//! `nn::linear` for [`MAX_ROWS`] rows or fewer; [`matmul_t_value`] is the value alone, for the
//! fused kernels that compute their value on detached inputs.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::has_avx512;
use super::{slice, PAR_MIN_ELEMS};

/// The most rows of `a` that take this kernel; at 16 candle's tiled product is as fast.
pub const MAX_ROWS: usize = 8;

/// Weight rows per parallel task.
const CHUNK: usize = 32;

/// True when [`matmul_t`] takes this product: f32 on the CPU, at most [`MAX_ROWS`] rows.
pub fn applies(a: &Tensor, w: &Tensor) -> bool {
    a.dtype() == DType::F32
        && w.dtype() == DType::F32
        && matches!(a.device(), Device::Cpu)
        && a.rank() == 2
        && w.rank() == 2
        && a.dims()[0] <= MAX_ROWS
        && a.dims()[1] == w.dims()[1]
}

/// `a Wᵀ` as a graph op.
///
/// # Shapes
/// `a`: (n, k), `w`: (c, k) → (n, c)
pub fn matmul_t(a: &Tensor, w: &Tensor) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op2(
        &ops::contiguous(a)?,
        &ops::contiguous(w)?,
        FewRows,
        ops::Output::Unused,
    )
}

/// `a Wᵀ` without a graph (the inputs are used as given, their gradients ignored).
///
/// # Shapes
/// `a`: (n, k), `w`: (c, k) → (n, c)
pub fn matmul_t_value(a: &Tensor, w: &Tensor) -> Result<Tensor> {
    a.detach()
        .contiguous()?
        .apply_op2_no_bwd(&w.detach().contiguous()?, &FewRows)
}

struct FewRows;

impl CustomOp2 for FewRows {
    fn name(&self) -> &'static str {
        "few-rows-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = l1.shape().dims2()?;
        let (c, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("few-rows matmul: a is ({n}, {k}), w is ({c}, {k2})");
        }
        let a = slice::<f32>(s1, l1)?;
        let w = slice::<f32>(s2, l2)?;
        Ok((CpuStorage::F32(product(a, w, n, k, c)), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d a = g W, d W = gᵀ a.
        Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(a)?)))
    }
}

/// (n, k) × (c, k)ᵀ → (n, c), row-major.
fn product(a: &[f32], w: &[f32], n: usize, k: usize, c: usize) -> Vec<f32> {
    // Each task writes its weight rows' outputs, (rows, n); transposed into (n, c) after.
    let mut by_weight_row = vec![0f32; c * n];
    if n == 0 || c == 0 {
        return by_weight_row;
    }
    let task = |(t, out): (usize, &mut [f32])| {
        let r0 = t * CHUNK;
        let rows = out.len() / n;
        block(a, n, k, &w[r0 * k..(r0 + rows) * k], rows, out);
    };
    if c * k * n >= PAR_MIN_ELEMS * 4 {
        by_weight_row
            .par_chunks_mut(CHUNK * n)
            .enumerate()
            .for_each(task);
    } else {
        by_weight_row
            .chunks_mut(CHUNK * n)
            .enumerate()
            .for_each(task);
    }
    if n == 1 {
        return by_weight_row;
    }
    let mut out = vec![0f32; n * c];
    for (j, row) in by_weight_row.chunks_exact(n).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * c + j] = v;
        }
    }
    out
}

/// `out[j·n + i] = w_j · a_i` for the `rows` weight rows of `w`.
fn block(a: &[f32], n: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above); shapes as below.
        unsafe { block_avx512(a, n, k, w, rows, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the slices hold n·k, rows·k
        // and rows·n elements (the callers' shapes).
        unsafe { block_avx2(a, n, k, w, rows, out) };
        return;
    }
    for j in 0..rows {
        let wj = &w[j * k..(j + 1) * k];
        for i in 0..n {
            let ai = &a[i * k..(i + 1) * k];
            out[j * n + i] = wj.iter().zip(ai).map(|(x, y)| x * y).sum();
        }
    }
}

/// Four weight rows × up to six rows of `a` at a time: up to 24 16-lane accumulators (of
/// AVX-512's 32 registers), so that even one row of `a` has four independent chains; the
/// width's tail through masked loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(a: &[f32], n: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32]) {
    assert!(a.len() >= n * k && w.len() >= rows * k && out.len() >= rows * n && rows > 0);
    let mut j = 0;
    while j < rows {
        let valid = (rows - j).min(4);
        // Missing rows repeat the last one (computed, not stored).
        let row = |r: usize| w.as_ptr().add((j + r.min(valid - 1)) * k);
        let wp = [row(0), row(1), row(2), row(3)];
        let mut i = 0;
        while i < n {
            // Up to six rows in one pass (24 accumulators); eight as four and four.
            let m = match n - i {
                r @ (5 | 6) => r,
                r => r.min(4),
            };
            let ap = a.as_ptr().add(i * k);
            let sums = match m {
                6 => dots512::<6>(ap, wp, k),
                5 => dots512::<5>(ap, wp, k),
                4 => dots512::<4>(ap, wp, k),
                3 => dots512::<3>(ap, wp, k),
                2 => dots512::<2>(ap, wp, k),
                _ => dots512::<1>(ap, wp, k),
            };
            for (q, row) in sums.iter().enumerate().take(valid) {
                for r in 0..m {
                    out[(j + q) * n + i + r] = row[r];
                }
            }
            i += m;
        }
        j += valid;
    }
}

/// The dot products of the four weight rows `wp` with the `M` rows of `a` from `ap`
/// (stride k): `[weight row][row of a]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
// Indices, not iterators: r addresses a row of `a` and a column of accumulators at once.
#[allow(clippy::needless_range_loop)]
unsafe fn dots512<const M: usize>(ap: *const f32, wp: [*const f32; 4], k: usize) -> [[f32; 6]; 4] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); M]; 4];
    let mut kk = 0;
    while kk < k {
        let mask: __mmask16 = if k - kk >= 16 {
            0xffff
        } else {
            (1u16 << (k - kk)) - 1
        };
        // (No closures here: they would not inherit the target feature, nor be inlined.)
        // The hardware prefetcher does not follow four interleaved rows well (this loop ran
        // at half the bandwidth of a plain sum): fetch the next four rows (contiguous after
        // these) ahead, four lines per step, all of them over the k/16 steps.
        let ahead = wp[0].wrapping_add(4 * k + 4 * kk);
        for l in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * l) as *const i8);
        }
        let x = [
            _mm512_maskz_loadu_ps(mask, wp[0].add(kk)),
            _mm512_maskz_loadu_ps(mask, wp[1].add(kk)),
            _mm512_maskz_loadu_ps(mask, wp[2].add(kk)),
            _mm512_maskz_loadu_ps(mask, wp[3].add(kk)),
        ];
        for r in 0..M {
            let av = _mm512_maskz_loadu_ps(mask, ap.add(r * k + kk));
            for q in 0..4 {
                acc[q][r] = _mm512_fmadd_ps(x[q], av, acc[q][r]);
            }
        }
        kk += 16;
    }
    let mut out = [[0f32; 6]; 4];
    for q in 0..4 {
        for r in 0..M {
            out[q][r] = _mm512_reduce_add_ps(acc[q][r]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(a: &[f32], n: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32]) {
    assert!(a.len() >= n * k && w.len() >= rows * k && out.len() >= rows * n);
    let mut j = 0;
    while j < rows {
        let pair = rows - j >= 2;
        let mut i = 0;
        while i < n {
            let m = (n - i).min(4);
            let w0 = w.as_ptr().add(j * k);
            let w1 = if pair { w0.add(k) } else { w0 };
            let ap = a.as_ptr().add(i * k);
            let sums = match m {
                4 => dots::<4>(ap, w0, w1, k),
                3 => dots::<3>(ap, w0, w1, k),
                2 => dots::<2>(ap, w0, w1, k),
                _ => dots::<1>(ap, w0, w1, k),
            };
            for r in 0..m {
                out[j * n + i + r] = sums[0][r];
                if pair {
                    out[(j + 1) * n + i + r] = sums[1][r];
                }
            }
            i += m;
        }
        j += if pair { 2 } else { 1 };
    }
}

/// The dot products of weight rows `w0`, `w1` with the `M` rows of `a` from `ap` (stride k).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots<const M: usize>(
    ap: *const f32,
    w0: *const f32,
    w1: *const f32,
    k: usize,
) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    let mut kk = 0;
    while kk + 8 <= k {
        let x0 = _mm256_loadu_ps(w0.add(kk));
        let x1 = _mm256_loadu_ps(w1.add(kk));
        for r in 0..M {
            let av = _mm256_loadu_ps(ap.add(r * k + kk));
            acc0[r] = _mm256_fmadd_ps(x0, av, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(x1, av, acc1[r]);
        }
        kk += 8;
    }
    let mut out = [[0f32; 4]; 2];
    for r in 0..M {
        let (mut s0, mut s1) = (hsum(acc0[r]), hsum(acc1[r]));
        for t in kk..k {
            let av = *ap.add(r * k + t);
            s0 += *w0.add(t) * av;
            s1 += *w1.add(t) * av;
        }
        out[0][r] = s0;
        out[1][r] = s1;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(rng: &mut crate::rng::Rng, dims: &[usize]) -> Tensor {
        crate::kernels::tests::randn(rng, dims, DType::F32)
    }

    /// Every row count up to MAX_ROWS, odd widths (the scalar tail), one weight row left
    /// over from the pairs, and a weight large enough to be split over threads: the f64
    /// product within f32 rounding.
    #[test]
    fn equals_the_f64_product() {
        let mut rng = crate::rng::Rng::new(11);
        for &(c, k) in &[(1usize, 3usize), (7, 8), (33, 19), (65, 384), (2048, 67)] {
            for n in 1..=MAX_ROWS {
                let a = randn(&mut rng, &[n, k]);
                let w = randn(&mut rng, &[c, k]);
                let got = matmul_t_value(&a, &w).unwrap();
                assert_eq!(got.dims(), &[n, c]);
                let want = a
                    .to_dtype(DType::F64)
                    .unwrap()
                    .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
                    .unwrap();
                let err =
                    crate::kernels::tests::max_diff(&got.to_dtype(DType::F64).unwrap(), &want);
                assert!(err < 1e-5 * (k as f64).sqrt(), "n {n} c {c} k {k}: {err}");
            }
        }
    }

    /// The AVX-512, AVX2 and scalar loops agree (whichever this CPU has).
    #[test]
    fn every_path_gives_the_same_products() {
        let mut rng = crate::rng::Rng::new(13);
        for &(n, c, k) in &[
            (1usize, 5usize, 7usize),
            (5, 9, 40),
            (8, 31, 384),
            (6, 4, 17),
        ] {
            let a: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..c * k).map(|_| rng.normal() as f32).collect();
            let scalar: Vec<f32> = (0..c * n)
                .map(|o| {
                    let (j, i) = (o / n, o % n);
                    (0..k).map(|t| w[j * k + t] * a[i * k + t]).sum()
                })
                .collect();
            let mut outs = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if has_avx512() {
                    let mut o = vec![0f32; c * n];
                    unsafe { block_avx512(&a, n, k, &w, c, &mut o) };
                    outs.push(("avx512", o));
                }
                if crate::kernels::has_avx2() {
                    let mut o = vec![0f32; c * n];
                    unsafe { block_avx2(&a, n, k, &w, c, &mut o) };
                    outs.push(("avx2", o));
                }
            }
            for (name, o) in outs {
                for (x, y) in o.iter().zip(&scalar) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()) * k as f32,
                        "{name}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The graph op's gradients are candle's matmul's.
    #[test]
    fn gradients_are_the_matmuls() {
        let mut rng = crate::rng::Rng::new(12);
        let a = candle_core::Var::from_tensor(&randn(&mut rng, &[3, 21])).unwrap();
        let w = candle_core::Var::from_tensor(&randn(&mut rng, &[10, 21])).unwrap();
        let g = randn(&mut rng, &[3, 10]);
        let ours = (matmul_t(&a, &w).unwrap() * &g).unwrap().sum_all().unwrap();
        let theirs = (a.matmul(&w.t().unwrap()).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let (go, gt) = (ours.backward().unwrap(), theirs.backward().unwrap());
        for v in [&a, &w] {
            let d = crate::kernels::tests::max_diff(go.get(v).unwrap(), gt.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }
}
