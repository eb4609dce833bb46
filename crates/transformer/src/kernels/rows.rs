//! Row reductions of the attention kernels' softmax, vectorized:
//! - [`max_f32`], the row maximum, eight lanes at a time (`f32::max`'s NaN rules kept it
//!   scalar);
//! - [`exp_sub_sum_f32`], x ← e^(x − m) and the sum of the row, with an exponential as
//!   accurate as libm's `expf`.
//!
//! Why the exponential is computed in f64: Whisper's encoder (1500 × 1500 scores per head)
//! spent a third of its time in scalar `expf`. A polynomial in f32 (relative error 2e-7) made
//! it fast, but was withdrawn as less accurate than libm (and the free-running quantized
//! Gemma 3 tokens moved off llama.cpp's on one more prompt; tests/gguf_reference.rs now
//! compares each step on llama.cpp's continuation, since near ties amplify any change). Here e^x = 2^(k/16) · e^r with
//! |r| ≤ ln2/32 and a degree-6 Taylor polynomial, all in f64 (relative error below 1e-15),
//! rounded once to f32: the correctly rounded value except within ~1e-15 of a halfway
//! point. glibc's `expf` rounds the other way on 1 input in 13,000 (those within ~1e-3 ulp of
//! halfway); everywhere else the two agree bit for bit (`tests::exp_matches_libm`). The sum
//! is kept in four f64 lanes (the f32 values added in f64, rounded once at the end): more
//! accurate than a running f32 sum, and no longer a chain of dependent adds.

/// The largest of `init` and `row` (scores, never NaN).
pub(crate) fn max_f32(row: &[f32], init: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { max_avx2(row, init) };
    }
    row.iter().fold(init, |m, &x| if x > m { x } else { m })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(row: &[f32], init: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_ptr();
    let mut acc = _mm256_set1_ps(init);
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_max_ps(acc, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let m = lanes.iter().fold(init, |m, &x| if x > m { x } else { m });
    row[i..].iter().fold(m, |m, &x| if x > m { x } else { m })
}

/// x ← e^(x − m) for every x of `row`, returning their sum.
pub(crate) fn exp_sub_sum_f32(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { exp_sub_sum_avx2(row, m) };
    }
    exp_sub_sum_scalar(row, m, 0.0)
}

/// Σ e^(x − m) over `row`, in f64 (a log-sum-exp over a vocabulary: Whisper's decoding
/// rules take one per beam and step, 51,864 scalar f64 `exp` calls each).
pub(crate) fn sum_exp_f64(row: &[f32], m: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { sum_exp_f64_avx2(row, m) };
    }
    row.iter().map(|&x| (x as f64 - m).exp()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_f64_avx2(row: &[f32], m: f64) -> f64 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_ptr();
    let vm = _mm256_set1_pd(m);
    let mut acc = _mm256_setzero_pd();
    let mut i = 0;
    while i + 4 <= n {
        let d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p.add(i))), vm);
        acc = _mm256_add_pd(acc, exp4_f64(d));
        i += 4;
    }
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), acc);
    let tail: f64 = row[i..].iter().map(|&x| (x as f64 - m).exp()).sum();
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

fn exp_sub_sum_scalar(row: &mut [f32], m: f32, mut sum: f32) -> f32 {
    for x in row.iter_mut() {
        let e = (*x - m).exp();
        *x = e;
        sum += e;
    }
    sum
}

/// 2^(j/16) for j = 0..16, the nearest f64 to each.
#[cfg(target_arch = "x86_64")]
static EXP2_SIXTEENTHS: [f64; 16] = [
    1.0,
    1.044_273_782_427_413_8,
    1.090_507_732_665_257_7,
    1.138_788_634_756_691_6,
    1.189_207_115_002_721,
    1.241_857_812_073_484,
    1.296_839_554_651_009_6,
    1.354_255_546_936_892_7,
    std::f64::consts::SQRT_2,
    1.476_826_145_939_499_3,
    1.542_210_825_407_940_7,
    1.610_490_331_949_254_3,
    1.681_792_830_507_429,
    1.756_252_160_373_299_5,
    1.834_008_086_409_342_4,
    1.915_206_561_397_147_4,
];

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(row: &mut [f32], m: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let vm = _mm_set1_ps(m);
    let mut acc = _mm256_setzero_pd();
    let mut i = 0;
    while i + 4 <= n {
        // The difference in f32, as the scalar loop takes it, then widened.
        let d = _mm_sub_ps(_mm_loadu_ps(p.add(i)), vm);
        let e = _mm256_cvtpd_ps(exp4_f64(_mm256_cvtps_pd(d)));
        _mm_storeu_ps(p.add(i), e);
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(e));
        i += 4;
    }
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), acc);
    let sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) as f32;
    exp_sub_sum_scalar(&mut row[i..], m, sum)
}

/// e^x on four f64 lanes: relative error below 1e-15 on [-110, 89], which covers every x
/// whose e^x is a nonzero finite f32; x is clamped to that range (e^x then rounds to 0 or +∞
/// in f32 as it should; in f64, e^-110 ≈ 2e-48 stands for anything smaller) and NaN stays
/// NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp4_f64(x: std::arch::x86_64::__m256d) -> std::arch::x86_64::__m256d {
    use std::arch::x86_64::*;
    // max/min return their second operand when one is NaN: x second keeps a NaN.
    let x = _mm256_min_pd(
        _mm256_set1_pd(89.0),
        _mm256_max_pd(_mm256_set1_pd(-110.0), x),
    );
    // k = round(x · 16/ln2) by adding 1.5·2⁵²: the sum's low mantissa bits then hold k.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let t = _mm256_fmadd_pd(
        x,
        _mm256_set1_pd(16.0 / std::f64::consts::LN_2),
        _mm256_set1_pd(SHIFT),
    );
    let kf = _mm256_sub_pd(t, _mm256_set1_pd(SHIFT));
    let k = _mm256_sub_epi64(
        _mm256_castpd_si256(t),
        _mm256_set1_epi64x(SHIFT.to_bits() as i64),
    );
    // r = x − k·ln2/16, with ln2/16 in two parts (Cody-Waite) so that r keeps its precision.
    const LN2_16_HI: f64 = 0.043_321_698_784_996_58;
    const LN2_16_LO: f64 = 1.449_404_258_653_937_2e-18;
    let r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_16_HI), x);
    let r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_16_LO), r);
    // e^r, |r| ≤ ln2/32: the Taylor series to r⁶ leaves r⁷/7! < 5e-16.
    let c = |v: f64| _mm256_set1_pd(v);
    let mut q = c(1.0 / 720.0);
    for a in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        q = _mm256_fmadd_pd(q, r, c(a));
    }
    // 2^(k/16) = 2^(k >> 4) · 2^((k & 15)/16): the table entry with k >> 4 added to its
    // exponent field ((k << 48) with the low 52 bits cleared is (k >> 4) << 52).
    let j = _mm256_and_si256(k, _mm256_set1_epi64x(15));
    let tj = _mm256_i64gather_pd::<8>(EXP2_SIXTEENTHS.as_ptr(), j);
    let e = _mm256_and_si256(
        _mm256_slli_epi64::<48>(k),
        _mm256_set1_epi64x(0xFFF0_0000_0000_0000_u64 as i64),
    );
    let scale = _mm256_castsi256_pd(_mm256_add_epi64(_mm256_castpd_si256(tj), e));
    _mm256_mul_pd(q, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e^x through the vectorized path for each x (a row with m = 0).
    fn vector_exp(xs: &[f32]) -> Vec<f32> {
        let mut row = xs.to_vec();
        exp_sub_sum_f32(&mut row, 0.0);
        row
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm() {
        // Every 61st f32 in [-110, 89] (the negative side is what softmax feeds in),
        // about 36 million values.
        let mut xs = Vec::new();
        let mut bits = (-110f32).to_bits();
        while bits > 0x8000_0000 {
            xs.push(f32::from_bits(bits));
            bits -= 61;
        }
        let mut bits = 0u32;
        while f32::from_bits(bits) < 89.0 {
            xs.push(f32::from_bits(bits));
            bits += 61;
        }
        let ours = vector_exp(&xs);
        let mut off = 0usize;
        for (&x, &e) in xs.iter().zip(&ours) {
            let libm = x.exp();
            if e.to_bits() == libm.to_bits() {
                continue;
            }
            off += 1;
            // Where the two differ, ours is the nearer f32 to e^x (taken in f64, which
            // resolves the ~1e-4 ulp that separates them from the halfway point).
            let exact = (x as f64).exp();
            assert!(
                ulps(e, libm) <= 1 && (e as f64 - exact).abs() <= (libm as f64 - exact).abs(),
                "e^{x:e}: ours {e:e}, libm {libm:e}, exact {exact:e}"
            );
        }
        // Measured on glibc 2.36: 2,826 of 36,732,391 differ (libm's expf is not correctly
        // rounded within ~1e-3 ulp of a halfway point).
        assert!(
            off * 5_000 <= xs.len(),
            "{off} of {} differ from libm by an ulp",
            xs.len()
        );
    }

    #[test]
    fn exp_edge_cases() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -110.0,
            -103.9,
            -87.5,
            -0.0,
            0.0,
            1e-30,
            88.7,
            88.8,
            1e30,
            f32::INFINITY,
        ];
        let ours = vector_exp(&xs);
        for (&x, &e) in xs.iter().zip(&ours) {
            assert!(
                ulps(e, x.exp()) <= 1,
                "e^{x:e}: ours {e:e}, libm {:e}",
                x.exp()
            );
        }
        assert_eq!(ours[0], 0.0);
        assert_eq!(ours[5], 1.0);
        assert_eq!(ours[11], f32::INFINITY);
        let nan = vector_exp(&[f32::NAN, 0.0, f32::NAN, 1.0]);
        assert!(nan[0].is_nan() && nan[2].is_nan() && nan[1] == 1.0);
    }

    #[test]
    fn f64_sums_match_libm() {
        let mut rng = crate::rng::Rng::new(9);
        for n in [0, 1, 3, 4, 7, 51_864] {
            let row: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 10.0).collect();
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let ours = sum_exp_f64(&row, m);
            let libm: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            // Summed in another order: n·ε of the sum bounds the difference.
            let tol = (n.max(1) as f64) * f64::EPSILON * libm;
            assert!((ours - libm).abs() <= tol, "{n}: {ours} vs {libm}");
        }
    }

    #[test]
    fn sums_the_rounded_values() {
        let mut rng = crate::rng::Rng::new(7);
        for n in [0, 1, 3, 4, 5, 17, 1500] {
            let row: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 8.0).collect();
            let m = max_f32(&row, f32::NEG_INFINITY);
            assert_eq!(m, row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
            let mut ours = row.clone();
            let s = exp_sub_sum_f32(&mut ours, m);
            // The sum of what was written, to f32 rounding (f64 lanes, then the f32 tail).
            let exact: f64 = ours.iter().map(|&e| e as f64).sum();
            assert!(
                (s as f64 - exact).abs() <= 2e-7 * exact,
                "sum of {n}: {s} vs {exact}"
            );
            for (&x, &e) in row.iter().zip(&ours) {
                assert!(ulps(e, (x - m).exp()) <= 1, "row of {n}");
            }
        }
    }
}
