//! Fused scaled dot-product attention on the CPU: FlashAttention's algorithm (Dao et al.,
//! 2022), tiled with an online softmax, so that the (T, S) score matrix is never materialized.
//!
//! Forward, per (batch, head) and block of `BR` queries: for each block of `BC` keys,
//! S = scale·Q Kᵀ + bias (causal positions -inf), m' = max(m, rowmax S), P = exp(S - m'),
//! l = l·e^(m-m') + rowsum P, O = O·e^(m-m') + P V; finally O /= l and the log-sum-exp
//! L = m + ln l of each row is kept for the backward. Extra memory: O(T) per head, plus one
//! BR × BC tile per thread.
//!
//! Backward, with Δ = rowsum(dO ⊙ O): P = exp(S - L) is recomputed tile by tile;
//! dV += Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP - Δ), dQ += scale·dS K, dK += scale·dSᵀ Q.
//!
//! Dropout on the attention weights uses a counter-based generator: the keep decision for
//! (batch, head, query, key) is a hash of the call's seed and that index, so the backward
//! regenerates exactly the forward's mask without storing it.
//!
//! A query whose keys are all masked gets a zero context and zero gradients, as the composed
//! path in `nn::attention` gives.
//!
//! Grouped-query attention (Ainslie et al. 2023): with `Hkv` key/value heads for `H` query
//! heads (`Hkv` dividing `H`), query head `h` reads key/value head `h / (H / Hkv)` in place;
//! the backward accumulates dK and dV per query head and sums each group afterwards.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::{keep, threshold};
use super::{with_data, Float};

/// Queries per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 64;

/// Options of [`attention`].
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// Multiplies QKᵀ (usually 1/√D).
    pub scale: f64,
    /// Query `i` may see key `j` iff `j <= i + (S - T)` (the offset of a KV cache).
    pub causal: bool,
    /// Additive bias of shape (B or 1, H or 1, T or 1, S); `-inf` masks a position out.
    pub bias: Option<Tensor>,
    /// (p, seed): drop each attention weight with probability p and scale the rest by
    /// 1/(1-p).
    pub dropout: Option<(f64, u64)>,
}

/// softmax(scale·Q Kᵀ + bias) V, fused, with backward.
///
/// # Shapes
/// - `q`: (B, H, T, D), `k`: (B, Hkv, S, D), `v`: (B, Hkv, S, Dv), any strides, Hkv | H
/// - returns (B, H, T, Dv), a transposed view of a contiguous (B, T, H, Dv) buffer, so that
///   merging the heads afterwards costs no copy.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &FlashOptions) -> Result<Tensor> {
    let (b, h, t, _) = q.dims4()?;
    let s = k.dims4()?.2;
    if opts.causal && s < t {
        candle_core::bail!("fused attention: causal with {t} queries but only {s} keys");
    }
    let bias = match &opts.bias {
        None => None,
        Some(m) => {
            let dims = m.dims4()?;
            let fits = |d: usize, full: usize| d == 1 || d == full;
            if !(fits(dims.0, b) && fits(dims.1, h) && fits(dims.2, t) && dims.3 == s) {
                candle_core::bail!(
                    "fused attention: bias {:?} does not broadcast to ({b}, {h}, {t}, {s})",
                    m.dims()
                );
            }
            Some(m.to_dtype(q.dtype())?.contiguous()?)
        }
    };
    let op = FlashAttention {
        scale: opts.scale,
        causal: opts.causal,
        bias,
        dropout: opts.dropout.filter(|&(p, _)| p > 0.0),
        lse: Arc::new(Mutex::new(None)),
    };
    use crate::autograd::ops;
    ops::transpose(&ops::apply_op3(q, k, v, op, ops::Output::Kept)?, 1, 2)
}

struct FlashAttention {
    scale: f64,
    causal: bool,
    bias: Option<Tensor>,
    dropout: Option<(f64, u64)>,
    /// Log-sum-exp of each query row, (B, H, T), written by the forward for the backward.
    lse: Arc<Mutex<Option<Tensor>>>,
}

/// A strided (B, H, L, D) view of a tensor's data.
#[derive(Clone, Copy)]
struct View<T> {
    ptr: *const T,
    sb: isize,
    sh: isize,
    sl: isize,
    sd: isize,
}

// The views only read data that outlives the parallel loops that use them.
unsafe impl<T> Send for View<T> {}
unsafe impl<T> Sync for View<T> {}

impl<T> View<T> {
    fn new(data: &[T], layout: &Layout) -> Result<Self> {
        let st = layout.stride();
        if st.len() != 4 {
            candle_core::bail!(
                "fused attention: expected a 4-d tensor, got {:?}",
                layout.dims()
            );
        }
        let ptr = data[layout.start_offset()..].as_ptr();
        let s = |i: usize| st[i] as isize;
        Ok(View {
            ptr,
            sb: s(0),
            sh: s(1),
            sl: s(2),
            sd: s(3),
        })
    }

    /// Pointer to element (b, h, l, 0).
    fn at(&self, b: usize, h: usize, l: usize) -> *const T {
        // SAFETY: callers stay inside the tensor's dims.
        unsafe {
            self.ptr
                .offset(b as isize * self.sb + h as isize * self.sh + l as isize * self.sl)
        }
    }
}

/// A mutable pointer that may cross threads; each thread writes a disjoint part.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    // A method, so that closures capture the whole (Sync) wrapper, not its raw field.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Everything a head's forward or backward reads.
struct Ctx<T> {
    b: usize,
    h: usize,
    /// Query heads per key/value head.
    group: usize,
    t: usize,
    s: usize,
    d: usize,
    dv: usize,
    q: View<T>,
    k: View<T>,
    v: View<T>,
    /// Broadcast view of the bias (stride 0 along its size-1 dims).
    bias: Option<View<T>>,
    scale: T,
    causal: bool,
    /// (threshold on a u32, 1/(1-p), seed)
    dropout: Option<(u32, T, u64)>,
}

/// A tile: queries i0..i0+br against keys j0..j0+bc of head h of batch row b.
#[derive(Clone, Copy)]
struct Tile {
    b: usize,
    h: usize,
    i0: usize,
    br: usize,
    j0: usize,
    bc: usize,
}

impl<T: Float> Ctx<T> {
    /// scale·Q[i0..i0+br] K[j0..j0+bc]ᵀ + bias, causal positions -inf, into `sc` (br × bc).
    fn scores(&self, tile: Tile, sc: &mut [T]) {
        let Tile {
            b,
            h,
            i0,
            br,
            j0,
            bc,
        } = tile;
        // SAFETY: the tiles lie inside q and k; sc holds br·bc values.
        unsafe {
            mm(
                br,
                bc,
                self.d,
                sc.as_mut_ptr(),
                bc as isize,
                false,
                (self.q.at(b, h, i0), self.q.sl, self.q.sd),
                (self.k.at(b, h / self.group, j0), self.k.sd, self.k.sl),
                self.scale,
            );
        }
        // Only used when causal, where S >= T is checked; cross-attention may have S < T.
        let off = self.s.saturating_sub(self.t);
        for r in 0..br {
            let i = i0 + r;
            let row = &mut sc[r * bc..(r + 1) * bc];
            if let Some(bias) = &self.bias {
                let p = bias.at(b, h, i);
                for (jj, x) in row.iter_mut().enumerate() {
                    // SAFETY: key j0 + jj < S, the bias's last dim (stride sd).
                    *x += unsafe { *p.offset((j0 + jj) as isize * bias.sd) };
                }
            }
            if self.causal && j0 + bc > i + off + 1 {
                let first = (i + off + 1).saturating_sub(j0);
                row[first..].iter_mut().for_each(|x| *x = T::NEG_INF);
            }
        }
    }

    /// Multiplies the tile of (already exponentiated) weights by the dropout mask, scaled.
    fn drop_tile(&self, tile: Tile, p: &mut [T]) {
        let Some((threshold, inv_keep, seed)) = self.dropout else {
            return;
        };
        let Tile {
            b,
            h,
            i0,
            br,
            j0,
            bc,
        } = tile;
        for r in 0..br {
            let base = (((b * self.h + h) * self.t + i0 + r) * self.s + j0) as u64;
            for (jj, x) in p[r * bc..(r + 1) * bc].iter_mut().enumerate() {
                *x = if keep(seed, base + jj as u64, threshold) {
                    *x * inv_keep
                } else {
                    T::ZERO
                };
            }
        }
    }

    /// First key past the last one that the tile of queries i0..i0+br may see.
    fn key_end(&self, i0: usize, br: usize) -> usize {
        if self.causal {
            self.s.min(i0 + br + (self.s - self.t))
        } else {
            self.s
        }
    }
}

/// dst (m × n, row stride `dst_rs`, unit column stride) = [dst +] beta · lhs (m × k) · rhs
/// (k × n); `lhs` and `rhs` are (pointer, row stride, column stride). One thread: the
/// parallelism is over heads.
///
/// # Safety
/// All pointers must address matrices of the given sizes and strides.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    accumulate: bool,
    lhs: (*const T, isize, isize),
    rhs: (*const T, isize, isize),
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        T::ONE,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Run `f` for every (batch, head) pair, in parallel when there is enough work.
fn for_heads<F: Fn(usize) + Sync + Send>(n_heads: usize, work: usize, f: F) {
    if work >= super::PAR_MIN_ELEMS && n_heads > 1 {
        (0..n_heads).into_par_iter().for_each(f);
    } else {
        (0..n_heads).for_each(f);
    }
}

/// Below this many queries per head (decoding steps) the forward skips the tiles: see
/// [`forward_few`].
const FEW_QUERIES: usize = 4;

/// Σ a·b over two rows of `n` values with strides `sa`, `sb`. Unit strides (the usual
/// layout of queries and cached keys) run in eight independent sums, which vectorize.
///
/// # Safety
/// Both rows must hold `n` values at their strides.
#[inline(always)]
unsafe fn dot<T: Float>(a: *const T, sa: isize, b: *const T, sb: isize, n: usize) -> T {
    if sa == 1 && sb == 1 {
        let (a, b) = (
            std::slice::from_raw_parts(a, n),
            std::slice::from_raw_parts(b, n),
        );
        let mut acc = [T::ZERO; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut sum = acc.iter().fold(T::ZERO, |s, &x| s + x);
        for (&x, &y) in ra.iter().zip(rb) {
            sum += x * y;
        }
        sum
    } else {
        (0..n as isize).fold(T::ZERO, |s, i| s + *a.offset(i * sa) * *b.offset(i * sb))
    }
}

/// The forward for a few queries per head (a decoding step: one query against a long KV
/// cache). The tiled path's two small matrix products per 64 keys cost more in call overhead
/// than in arithmetic here (a third of SmolLM2's decoding time at 600 cached positions);
/// with one row of scores per query, the softmax is exact in two passes instead of online.
fn forward_few<T: Float>(c: &Ctx<T>) -> (Vec<T>, Vec<T>) {
    let (t, dv) = (c.t, c.dv);
    let mut out = vec![T::ZERO; c.b * t * c.h * dv];
    let mut lse = vec![T::NEG_INF; c.b * c.h * t];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let lse_ptr = OutPtr(lse.as_mut_ptr());
    let avx2 = super::has_avx2();
    for_heads(c.b * c.h, c.b * c.h * t * c.s * c.d, |bh| {
        let mut p = vec![T::ZERO; c.s];
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has the features; the head's rows are its own (see few_head).
            return unsafe { few_head_avx2(c, bh, &mut p, out_ptr, lse_ptr) };
        }
        let _ = avx2;
        // SAFETY: as above.
        unsafe { few_head(c, bh, &mut p, out_ptr, lse_ptr) }
    });
    (out, lse)
}

// The same loop compiled for AVX2 + FMA (the baseline target has SSE2 only): the dot
// products over cached keys and the sums over values are most of a long-context step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_head_avx2<T: Float>(
    c: &Ctx<T>,
    bh: usize,
    p: &mut [T],
    out: OutPtr<T>,
    lse: OutPtr<T>,
) {
    few_head(c, bh, p, out, lse)
}

/// Head `bh` (batch · H + head) of [`forward_few`], with `p` (S values) for its scores.
///
/// # Safety
/// `out` and `lse` must point at (B, T, H, Dv) and (B, H, T) buffers; only this head's rows
/// are written.
#[inline(always)]
unsafe fn few_head<T: Float>(c: &Ctx<T>, bh: usize, p: &mut [T], out: OutPtr<T>, lse: OutPtr<T>) {
    let (t, dv) = (c.t, c.dv);
    let (b, h) = (bh / c.h, bh % c.h);
    let hk = h / c.group;
    for i in 0..t {
        let j_end = c.key_end(i, 1);
        let q = c.q.at(b, h, i);
        let mut m = T::NEG_INF;
        for (j, x) in p[..j_end].iter_mut().enumerate() {
            // Query i and key j < S lie inside q and k, each d wide.
            let mut e = dot(q, c.q.sd, c.k.at(b, hk, j), c.k.sd, c.d) * c.scale;
            if let Some(bias) = &c.bias {
                // The bias broadcasts to (B, H, T, S).
                e += *bias.at(b, h, i).offset(j as isize * bias.sd);
            }
            *x = e;
            m = m.max_(e);
        }
        if m == T::NEG_INF {
            // All keys masked: a zero context, as the tiled path gives.
            continue;
        }
        let l = T::exp_sub_sum(&mut p[..j_end], m);
        let inv = T::ONE / l;
        let o = std::slice::from_raw_parts_mut(out.get().add(((b * t + i) * c.h + h) * dv), dv);
        for (j, &w) in p[..j_end].iter().enumerate() {
            let w = w * inv;
            let vr = c.v.at(b, hk, j);
            if c.v.sd == 1 {
                let vr = std::slice::from_raw_parts(vr, dv);
                for (o, &x) in o.iter_mut().zip(vr) {
                    *o += w * x;
                }
            } else {
                for (dd, o) in o.iter_mut().enumerate() {
                    *o += w * *vr.offset(dd as isize * c.v.sd);
                }
            }
        }
        *lse.get().add(bh * t + i) = m + l.ln_();
    }
}

fn forward<T: Float>(c: &Ctx<T>) -> (Vec<T>, Vec<T>) {
    if c.t <= FEW_QUERIES && c.dropout.is_none() {
        return forward_few(c);
    }
    let (t, dv) = (c.t, c.dv);
    let mut out = vec![T::ZERO; c.b * t * c.h * dv];
    let mut lse = vec![T::NEG_INF; c.b * c.h * t];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let lse_ptr = OutPtr(lse.as_mut_ptr());
    for_heads(c.b * c.h, c.b * c.h * t * c.s, |bh| {
        let (b, h) = (bh / c.h, bh % c.h);
        let mut sc = [T::ZERO; BR * BC];
        let mut acc = vec![T::ZERO; BR * dv];
        let mut m = [T::NEG_INF; BR];
        let mut l = [T::ZERO; BR];
        for i0 in (0..t).step_by(BR) {
            let br = BR.min(t - i0);
            acc.iter_mut().for_each(|x| *x = T::ZERO);
            m.iter_mut().for_each(|x| *x = T::NEG_INF);
            l.iter_mut().for_each(|x| *x = T::ZERO);
            let j_end = c.key_end(i0, br);
            for j0 in (0..j_end).step_by(BC) {
                let bc = BC.min(j_end - j0);
                let sc = &mut sc[..br * bc];
                c.scores(
                    Tile {
                        b,
                        h,
                        i0,
                        br,
                        j0,
                        bc,
                    },
                    sc,
                );
                for r in 0..br {
                    let row = &mut sc[r * bc..(r + 1) * bc];
                    let m_new = T::max_of(row, m[r]);
                    if m_new == T::NEG_INF {
                        row.iter_mut().for_each(|x| *x = T::ZERO);
                        continue;
                    }
                    let corr = (m[r] - m_new).exp_();
                    let sum = T::exp_sub_sum(row, m_new);
                    l[r] = l[r] * corr + sum;
                    m[r] = m_new;
                    if corr != T::ONE {
                        acc[r * dv..(r + 1) * dv]
                            .iter_mut()
                            .for_each(|x| *x *= corr);
                    }
                }
                c.drop_tile(
                    Tile {
                        b,
                        h,
                        i0,
                        br,
                        j0,
                        bc,
                    },
                    sc,
                );
                // SAFETY: sc is br × bc, the value tile bc × dv, acc br × dv.
                unsafe {
                    mm(
                        br,
                        dv,
                        bc,
                        acc.as_mut_ptr(),
                        dv as isize,
                        true,
                        (sc.as_ptr(), bc as isize, 1),
                        (c.v.at(b, h / c.group, j0), c.v.sl, c.v.sd),
                        T::ONE,
                    );
                }
            }
            for r in 0..br {
                let i = i0 + r;
                // SAFETY: (b, i, h) rows of out and (b, h, i) of lse belong to this head only.
                unsafe {
                    let o = out_ptr.get().add(((b * t + i) * c.h + h) * dv);
                    if l[r] > T::ZERO {
                        let inv = T::ONE / l[r];
                        for dd in 0..dv {
                            *o.add(dd) = acc[r * dv + dd] * inv;
                        }
                        *lse_ptr.get().add(bh * t + i) = m[r] + l[r].ln_();
                    }
                }
            }
        }
    });
    (out, lse)
}

/// Gradients (dq, dk, dv), each contiguous (B, H, L, D): dk and dv per query head, summed over
/// each group by the caller.
fn backward<T: Float>(c: &Ctx<T>, o: &[T], d_o: &[T], lse: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, s, d, dv, nh) = (c.t, c.s, c.d, c.dv, c.h);
    let mut dq = vec![T::ZERO; c.b * nh * t * d];
    let mut dk = vec![T::ZERO; c.b * nh * s * d];
    let mut dvv = vec![T::ZERO; c.b * nh * s * dv];
    let (dq_p, dk_p, dv_p) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dvv.as_mut_ptr()),
    );
    let o_rs = (nh * dv) as isize;
    for_heads(c.b * nh, c.b * nh * t * s, |bh| {
        let (b, h) = (bh / nh, bh % nh);
        // SAFETY: each head owns its (L, D) slices of the three gradients.
        let (dq_h, dk_h, dv_h) = unsafe {
            (
                dq_p.get().add(bh * t * d),
                dk_p.get().add(bh * s * d),
                dv_p.get().add(bh * s * dv),
            )
        };
        let row_of = |i: usize| ((b * t + i) * nh + h) * dv..((b * t + i) * nh + h + 1) * dv;
        let delta: Vec<T> = (0..t)
            .map(|i| {
                let mut acc = T::ZERO;
                for (&a, &g) in o[row_of(i)].iter().zip(&d_o[row_of(i)]) {
                    acc += a * g;
                }
                acc
            })
            .collect();
        let lse_h = &lse[bh * t..(bh + 1) * t];
        let mut p = [T::ZERO; BR * BC];
        let mut pd = [T::ZERO; BR * BC];
        let mut ds = [T::ZERO; BR * BC];
        let off = s.saturating_sub(t);
        for j0 in (0..s).step_by(BC) {
            let bc = BC.min(s - j0);
            // With a causal mask the queries before j0 - off see none of these keys.
            let i_first = if c.causal {
                (j0.saturating_sub(off) / BR) * BR
            } else {
                0
            };
            for i0 in (i_first..t).step_by(BR) {
                let br = BR.min(t - i0);
                let (p, pd, ds) = (&mut p[..br * bc], &mut pd[..br * bc], &mut ds[..br * bc]);
                c.scores(
                    Tile {
                        b,
                        h,
                        i0,
                        br,
                        j0,
                        bc,
                    },
                    p,
                );
                for r in 0..br {
                    let l = lse_h[i0 + r];
                    let row = &mut p[r * bc..(r + 1) * bc];
                    if l == T::NEG_INF {
                        row.iter_mut().for_each(|x| *x = T::ZERO);
                    } else {
                        T::exp_sub_sum(row, l);
                    }
                }
                let weights: &[T] = if c.dropout.is_some() {
                    pd.copy_from_slice(p);
                    c.drop_tile(
                        Tile {
                            b,
                            h,
                            i0,
                            br,
                            j0,
                            bc,
                        },
                        pd,
                    );
                    pd
                } else {
                    p
                };
                let do_tile = d_o[((b * t + i0) * nh + h) * dv..].as_ptr();
                // SAFETY: tiles within their matrices; see `mm`.
                unsafe {
                    // dV_j += Pdᵀ dO_i
                    mm(
                        bc,
                        dv,
                        br,
                        dv_h.add(j0 * dv),
                        dv as isize,
                        true,
                        (weights.as_ptr(), 1, bc as isize),
                        (do_tile, o_rs, 1),
                        T::ONE,
                    );
                    // dP = dO_i V_jᵀ
                    mm(
                        br,
                        bc,
                        dv,
                        ds.as_mut_ptr(),
                        bc as isize,
                        false,
                        (do_tile, o_rs, 1),
                        (c.v.at(b, h / c.group, j0), c.v.sd, c.v.sl),
                        T::ONE,
                    );
                }
                // The dropout mask scales dP as it scaled P.
                c.drop_tile(
                    Tile {
                        b,
                        h,
                        i0,
                        br,
                        j0,
                        bc,
                    },
                    ds,
                );
                for r in 0..br {
                    let dl = delta[i0 + r];
                    for (g, &pw) in ds[r * bc..(r + 1) * bc]
                        .iter_mut()
                        .zip(&p[r * bc..(r + 1) * bc])
                    {
                        *g = pw * (*g - dl);
                    }
                }
                // SAFETY: as above.
                unsafe {
                    // dQ_i += scale · dS K_j
                    mm(
                        br,
                        d,
                        bc,
                        dq_h.add(i0 * d),
                        d as isize,
                        true,
                        (ds.as_ptr(), bc as isize, 1),
                        (c.k.at(b, h / c.group, j0), c.k.sl, c.k.sd),
                        c.scale,
                    );
                    // dK_j += scale · dSᵀ Q_i
                    mm(
                        bc,
                        d,
                        br,
                        dk_h.add(j0 * d),
                        d as isize,
                        true,
                        (ds.as_ptr(), 1, bc as isize),
                        (c.q.at(b, h, i0), c.q.sl, c.q.sd),
                        c.scale,
                    );
                }
            }
        }
    });
    (dq, dk, dvv)
}

impl FlashAttention {
    fn ctx<T: Float>(
        &self,
        q: (&[T], &Layout),
        k: (&[T], &Layout),
        v: (&[T], &Layout),
        bias: Option<&[T]>,
    ) -> Result<Ctx<T>> {
        let (b, h, t, d) = q.1.shape().dims4()?;
        let (bk, hk, s, dk) = k.1.shape().dims4()?;
        let (bv, hv, sv, dv) = v.1.shape().dims4()?;
        if (bk, dk) != (b, d) || (bv, hv, sv) != (b, hk, s) || hk == 0 || h % hk != 0 {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not match",
                q.1.dims(),
                k.1.dims(),
                v.1.dims()
            );
        }
        let bias = match (&self.bias, bias) {
            (Some(m), Some(data)) => {
                let (mb, mh, mt, _) = m.dims4()?;
                let st = |n: usize, stride: usize| if n == 1 { 0 } else { stride as isize };
                Some(View {
                    ptr: data.as_ptr(),
                    sb: st(mb, mh * mt * s),
                    sh: st(mh, mt * s),
                    sl: st(mt, s),
                    sd: 1,
                })
            }
            _ => None,
        };
        let dropout = self
            .dropout
            .map(|(p, seed)| (threshold(p), T::of(1.0 / (1.0 - p)), seed));
        Ok(Ctx {
            b,
            h,
            group: h / hk,
            t,
            s,
            d,
            dv,
            q: View::new(q.0, q.1)?,
            k: View::new(k.0, k.1)?,
            v: View::new(v.0, v.1)?,
            bias,
            scale: T::of(self.scale),
            causal: self.causal,
            dropout,
        })
    }

    #[allow(clippy::too_many_arguments)]
    /// Run `f` with the bias's data (already contiguous and of the query's dtype), if any.
    fn with_bias<T: Float, R>(&self, f: impl FnOnce(Option<&[T]>) -> Result<R>) -> Result<R> {
        match &self.bias {
            Some(m) => with_data::<T, _>(m, |b| f(Some(b))),
            None => f(None),
        }
    }

    /// The context, (B, T, H, Dv); the log-sum-exp of each row is kept for the backward.
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let (out, lse, (b, t, h, dv)) = self.with_bias::<T, _>(|bias| {
            let c = self.ctx(
                (T::cpu_storage_as_slice(s1)?, l1),
                (T::cpu_storage_as_slice(s2)?, l2),
                (T::cpu_storage_as_slice(s3)?, l3),
                bias,
            )?;
            let (out, lse) = forward(&c);
            Ok((out, lse, (c.b, c.t, c.h, c.dv)))
        })?;
        *self.lse.lock().unwrap() =
            Some(Tensor::from_vec(lse, (b, h, t), &candle_core::Device::Cpu)?);
        Ok((out, Shape::from((b, t, h, dv))))
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        Ok(match s1 {
            CpuStorage::F32(_) => {
                let (out, shape) = self.fwd::<f32>(s1, l1, s2, l2, s3, l3)?;
                (CpuStorage::F32(out), shape)
            }
            CpuStorage::F64(_) => {
                let (out, shape) = self.fwd::<f64>(s1, l1, s2, l2, s3, l3)?;
                (CpuStorage::F64(out), shape)
            }
            _ => candle_core::bail!("fused attention: only f32/f64"),
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap().clone().ok_or_else(|| {
            candle_core::Error::Msg("fused attention: backward before forward".into())
        })?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.bwd_typed::<f32>(q, k, v, res, grad, &lse)?,
            DType::F64 => self.bwd_typed::<f64>(q, k, v, res, grad, &lse)?,
            dt => candle_core::bail!("fused attention: no backward for {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FlashAttention {
    fn bwd_typed<T: Float>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (qd, kd, vd) = (
            cpu_slice::<T>(&qs)?,
            cpu_slice::<T>(&ks)?,
            cpu_slice::<T>(&vs)?,
        );
        // Read in place: O, dO and the log-sum-exp are not copied.
        let (dq, dk, dv, c) = self.with_bias::<T, _>(|bias| {
            let c = self.ctx((qd, ql), (kd, kl), (vd, vl), bias)?;
            let (dq, dk, dv) = with_data::<T, _>(res, |o| {
                with_data::<T, _>(grad, |d_o| {
                    with_data::<T, _>(lse, |lse| Ok(backward(&c, o, d_o, lse)))
                })
            })?;
            Ok((dq, dk, dv, (c.b, c.h, c.group, c.t, c.s, c.d, c.dv)))
        })?;
        let (b, h, group, t, s, d, dv_width) = c;
        let dev = q.device();
        // Per query head (B, H, S, ·) -> summed over each group of query heads (B, Hkv, S, ·).
        let per_kv_head = |g: Vec<T>, width: usize| -> Result<Tensor> {
            let g = Tensor::from_vec(g, (b, h, s, width), dev)?;
            if group == 1 {
                return Ok(g);
            }
            g.reshape((b, h / group, group, s, width))?.sum(2)
        };
        Ok((
            Tensor::from_vec(dq, (b, h, t, d), dev)?,
            per_kv_head(dk, d)?,
            per_kv_head(dv, dv_width)?,
        ))
    }
}

/// All elements of a CPU storage (the layout says which of them a tensor uses).
fn cpu_slice<T: Float>(s: &candle_core::Storage) -> Result<&[T]> {
    match s {
        candle_core::Storage::Cpu(c) => T::cpu_storage_as_slice(c),
        _ => candle_core::bail!("fused attention: tensor is not on the CPU"),
    }
}
