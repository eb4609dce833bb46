//! Matrix products with GGUF's 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), the
//! weights kept quantized: `y = x Wᵀ` with W (n, k) in blocks of 32 along k.
//!
//! candle 0.11 multiplies these types with scalar code (`vec_dot_unopt`: 79% of a SmolLM2
//! Q4_1 generation's profile, 66% of Gemma 3's Q5_0 one), and converts each block's f16 scale
//! at every use. Here, as in llama.cpp, the activations are quantized once per product to 8
//! bits per 32-block (scale d_x, and d_x·Σq_x for the formats with a minimum), and each
//! block's dot product is 32 integer multiply-adds: AVX2 `maddubs` (unsigned × signed bytes),
//! with the signed formats through the sign trick. The scales are widened to f32 once, at
//! load; the 4- and 5-bit values stay packed as the file has them, since generation is bound
//! by how many weight bytes it reads.
//!
//! Block layouts (ggml's): Q4_0 / Q4_1 hold 16 bytes, element j in the low nibble of byte j
//! and element j + 16 in its high nibble; Q5_0 / Q5_1 add a 32-bit word whose bit j is the
//! fifth bit of element j; Q8_0 holds 32 signed bytes. A value is d·q (Q8_0), d·(q - 8)
//! (Q4_0), d·(q - 16) (Q5_0) or d·q + m (Q4_1, Q5_1).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};

const QK: usize = 32;

/// The block formats this module multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl BlockKind {
    /// The kind of a GGUF tensor type, when this module handles it.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => BlockKind::Q4_0,
            GgmlDType::Q4_1 => BlockKind::Q4_1,
            GgmlDType::Q5_0 => BlockKind::Q5_0,
            GgmlDType::Q5_1 => BlockKind::Q5_1,
            GgmlDType::Q8_0 => BlockKind::Q8_0,
            _ => return None,
        })
    }

    fn has_min(self) -> bool {
        matches!(self, BlockKind::Q4_1 | BlockKind::Q5_1)
    }

    fn has_high_bits(self) -> bool {
        matches!(self, BlockKind::Q5_0 | BlockKind::Q5_1)
    }

    /// Bytes of packed values per block.
    fn qs_bytes(self) -> usize {
        match self {
            BlockKind::Q8_0 => 32,
            _ => 16,
        }
    }

    /// Bytes per block in the file.
    fn file_bytes(self) -> usize {
        match self {
            BlockKind::Q4_0 => 18,
            BlockKind::Q4_1 => 20,
            BlockKind::Q5_0 => 22,
            BlockKind::Q5_1 => 24,
            BlockKind::Q8_0 => 34,
        }
    }
}

/// A quantized (n, k) weight matrix in one of the 32-element block formats.
#[derive(Debug)]
pub struct BlockMatrix {
    kind: BlockKind,
    dtype: GgmlDType,
    n: usize,
    k: usize,
    /// [n, k]
    dims: [usize; 2],
    /// Per block, n·k/32 of each.
    d: Vec<f32>,
    /// Per block, for Q4_1 / Q5_1.
    m: Vec<f32>,
    /// Per block, for Q5_0 / Q5_1: bit j is the fifth bit of element j.
    qh: Vec<u32>,
    /// Per block, `qs_bytes` each.
    qs: Vec<u8>,
}

impl BlockMatrix {
    /// The matrix of a 2-D quantized tensor (candle's (out, in) = (n, k) order), or `None`
    /// when its type is not one of the block formats here.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(kind) = BlockKind::of(q.dtype()) else {
            return Ok(None);
        };
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?;
        let expected = n * k / QK * kind.file_bytes();
        if data.len() != expected {
            return Err(Error::msg(format!(
                "{kind:?} weight ({n}, {k}): {} bytes, expected {expected}",
                data.len()
            )));
        }
        Self::from_reader(q.dtype(), n, k, &mut &data[..])
    }

    /// The matrix read straight from GGUF block bytes (candle's (out, in) = (n, k) order), a
    /// slice of rows at a time: a large table (Gemma 3's 180 MB embedding) never sits in
    /// memory twice.
    pub fn from_reader(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        reader: &mut impl std::io::Read,
    ) -> Result<Option<Self>> {
        let Some(kind) = BlockKind::of(dtype) else {
            return Ok(None);
        };
        if !k.is_multiple_of(QK) {
            return Err(Error::shape(
                "block-quantized weight",
                "(n, k) with k % 32 == 0",
                &[n, k],
            ));
        }
        let blocks = n * k / QK;
        let mut out = BlockMatrix::empty(kind, dtype, n, k);
        let fb = kind.file_bytes();
        let per_read = (1 << 20) / fb;
        let mut buf = vec![0u8; per_read * fb];
        let mut left = blocks;
        while left > 0 {
            let take = left.min(per_read);
            reader
                .read_exact(&mut buf[..take * fb])
                .map_err(|e| Error::msg(format!("reading {kind:?} blocks: {e}")))?;
            out.push_blocks(&buf[..take * fb]);
            left -= take;
        }
        Ok(Some(out))
    }

    /// No blocks yet, room for all of an (n, k) matrix's.
    fn empty(kind: BlockKind, dtype: GgmlDType, n: usize, k: usize) -> Self {
        let blocks = n * k / QK;
        BlockMatrix {
            kind,
            dtype,
            n,
            k,
            dims: [n, k],
            d: Vec::with_capacity(blocks),
            m: Vec::with_capacity(if kind.has_min() { blocks } else { 0 }),
            qh: Vec::with_capacity(if kind.has_high_bits() { blocks } else { 0 }),
            qs: Vec::with_capacity(blocks * kind.qs_bytes()),
        }
    }

    /// Append whole blocks in the file's layout.
    fn push_blocks(&mut self, data: &[u8]) {
        let kind = self.kind;
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let qsb = kind.qs_bytes();
        for b in data.chunks_exact(kind.file_bytes()) {
            self.d.push(half(&b[0..2]));
            let mut at = 2;
            if kind.has_min() {
                self.m.push(half(&b[2..4]));
                at = 4;
            }
            if kind.has_high_bits() {
                self.qh
                    .push(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]));
                at += 4;
            }
            self.qs.extend_from_slice(&b[at..at + qsb]);
        }
    }

    /// (n, k)
    pub fn dims_ref(&self) -> &[usize] {
        &self.dims
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        4 * (self.d.len() + self.m.len() + self.qh.len()) + self.qs.len()
    }

    /// Element `e` (0..32) of block `b` as its integer code (before d and m).
    fn code(&self, b: usize, e: usize) -> i32 {
        let qsb = self.kind.qs_bytes();
        let qs = &self.qs[b * qsb..(b + 1) * qsb];
        if self.kind == BlockKind::Q8_0 {
            return qs[e] as i8 as i32;
        }
        let nib = if e < 16 {
            qs[e] & 0x0F
        } else {
            qs[e - 16] >> 4
        } as i32;
        let high = if self.kind.has_high_bits() {
            (((self.qh[b] >> e) & 1) << 4) as i32
        } else {
            0
        };
        let q = nib | high;
        match self.kind {
            BlockKind::Q4_0 => q - 8,
            BlockKind::Q5_0 => q - 16,
            _ => q,
        }
    }

    /// Rows `ids` dequantized to f32, (ids.len() · k) row-major (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let nb = self.k / QK;
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            let r = id as usize;
            if r >= self.n {
                return Err(Error::input(
                    format!("row {r}"),
                    format!("below {}", self.n),
                    r.to_string(),
                ));
            }
            for b in r * nb..(r + 1) * nb {
                let (d, m) = (self.d[b], self.m.get(b).copied().unwrap_or(0.0));
                out.extend((0..QK).map(|e| d * self.code(b, e) as f32 + m));
            }
        }
        Ok(out)
    }

    /// Every element, (n·k) row-major, for tests.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        self.rows(&(0..self.n as u32).collect::<Vec<_>>())
    }

    /// `x Wᵀ`.
    ///
    /// # Shapes
    /// `x`: (..., k) f32 → (..., n) f32
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
    }
}

/// Activations quantized to 8 bits per 32-block: codes, scales and (for the formats with a
/// minimum) d·Σq per block.
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

fn quantize_rows(x: &[f32]) -> QuantizedRows {
    let blocks = x.len() / QK;
    let mut out = QuantizedRows {
        q: vec![0; x.len()],
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
    };
    // Below a few thousand values (a decoding step) threads cost more than they save.
    let min_len = if x.len() < 8192 { usize::MAX } else { 1 };
    out.q
        .par_chunks_mut(QK * 64)
        .with_min_len(min_len)
        .zip(out.d.par_chunks_mut(64))
        .zip(out.s.par_chunks_mut(64))
        .enumerate()
        .for_each(|(c, ((q, d), s))| {
            let x = &x[c * 64 * QK..(c * 64 * QK + q.len())];
            #[cfg(target_arch = "x86_64")]
            if have_avx2() {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { quantize_blocks_avx2(x, q, d, s) };
            }
            quantize_blocks(x, q, d, s)
        });
    out
}

/// Blocks of 32 values of `x` to codes `q`, scales `d` and d·Σq `s`.
#[inline(always)]
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for ((xs, qb), (db, sb)) in x
        .chunks(QK)
        .zip(q.chunks_mut(QK))
        .zip(d.iter_mut().zip(s.iter_mut()))
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (qv, &v) in qb.iter_mut().zip(xs) {
            let r = (v * inv).round() as i32;
            *qv = r as i8;
            sum += r;
        }
        *db = scale;
        *sb = scale * sum as f32;
    }
}

// The same loop for AVX2: the baseline target rounds with a call to `roundf` per value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    quantize_blocks(x, q, d, s)
}

/// Σ over the blocks of one weight row and one activation row.
fn dot_scalar(w: &BlockMatrix, row: usize, x: &QuantizedRows, xrow: usize) -> f32 {
    let nb = w.k / QK;
    let mut acc = 0f32;
    for bi in 0..nb {
        let b = row * nb + bi;
        let xb = xrow * nb + bi;
        let xq = &x.q[xb * QK..(xb + 1) * QK];
        let dot: i32 = (0..QK).map(|e| w.code(b, e) * xq[e] as i32).sum();
        acc += w.d[b] * x.d[xb] * dot as f32;
        if w.kind.has_min() {
            acc += w.m[b] * x.s[xb];
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockKind, BlockMatrix, QuantizedRows, QK};
    // Signed formats: Σ w·x = Σ |w|·(x·sign(w)), so that `maddubs` (unsigned × signed) serves.
    use std::arch::x86_64::*;

    /// 32 bytes, 0xFF where bit j of `bits` is set (byte j).
    #[inline(always)]
    unsafe fn bits_to_bytes(bits: u32) -> __m256i {
        let v = _mm256_set1_epi32(bits as i32);
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(v, shuf);
        // Byte p of each 8-byte group: every bit but bit p set, so it becomes 0xFF only when
        // bit p was set.
        let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
        _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1))
    }

    /// The 32 nibbles of 16 bytes as bytes 0..15 (low nibbles), 16..31 (high nibbles).
    #[inline(always)]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let t = _mm_loadu_si128(qs as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(t, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(t, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    /// Σ a_i·b_i in 8 lanes for unsigned `a` (< 128) and signed `b`.
    #[inline(always)]
    unsafe fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(a, b);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Weight row `row` against activation rows `xrows` (up to 4 at once, sharing each
    /// block's unpacking), written to `out[0..xrows.len()]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(
        w: &BlockMatrix,
        row: usize,
        x: &QuantizedRows,
        xrows: &[usize],
        out: &mut [f32],
    ) {
        // One monomorphic loop per (format, rows): no branch on either inside it.
        macro_rules! by_rows {
            ($kind:expr) => {
                match xrows.len() {
                    1 => dots_n::<{ $kind }, 1>(w, row, x, xrows, out),
                    2 => dots_n::<{ $kind }, 2>(w, row, x, xrows, out),
                    3 => dots_n::<{ $kind }, 3>(w, row, x, xrows, out),
                    _ => dots_n::<{ $kind }, 4>(w, row, x, xrows, out),
                }
            };
        }
        match w.kind {
            BlockKind::Q4_0 => by_rows!(K_Q4_0),
            BlockKind::Q4_1 => by_rows!(K_Q4_1),
            BlockKind::Q5_0 => by_rows!(K_Q5_0),
            BlockKind::Q5_1 => by_rows!(K_Q5_1),
            BlockKind::Q8_0 => by_rows!(K_Q8_0),
        }
    }

    const K_Q4_0: u8 = 0;
    const K_Q4_1: u8 = 1;
    const K_Q5_0: u8 = 2;
    const K_Q5_1: u8 = 3;
    const K_Q8_0: u8 = 4;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_n<const KIND: u8, const R: usize>(
        w: &BlockMatrix,
        row: usize,
        x: &QuantizedRows,
        xrows: &[usize],
        out: &mut [f32],
    ) {
        let has_min = KIND == K_Q4_1 || KIND == K_Q5_1;
        let nb = w.k / QK;
        let qsb = if KIND == K_Q8_0 { 32 } else { 16 };
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        let mut xoff = [0usize; R];
        for j in 0..R {
            xoff[j] = xrows[j] * nb;
        }
        let wq = w.qs.as_ptr().add(row * nb * qsb);
        let wd = w.d.as_ptr().add(row * nb);
        let wm = w.m.as_ptr().wrapping_add(row * nb);
        let wh = w.qh.as_ptr().wrapping_add(row * nb);
        let xq = x.q.as_ptr();
        let xd = x.d.as_ptr();
        let xs = x.s.as_ptr();
        for bi in 0..nb {
            let qs = wq.add(bi * qsb);
            // The block's 32 codes: unsigned for the formats with a minimum, signed otherwise.
            let codes = match KIND {
                K_Q8_0 => _mm256_loadu_si256(qs as *const __m256i),
                K_Q4_0 => _mm256_sub_epi8(nibbles(qs), _mm256_set1_epi8(8)),
                K_Q4_1 => nibbles(qs),
                K_Q5_0 => {
                    // A clear fifth bit gives q - 16 = nibble | 0xF0 (as i8); a set one, nibble.
                    let high = _mm256_andnot_si256(
                        bits_to_bytes(*wh.add(bi)),
                        _mm256_set1_epi8(0xF0u8 as i8),
                    );
                    _mm256_or_si256(nibbles(qs), high)
                }
                _ => {
                    let high = _mm256_and_si256(bits_to_bytes(*wh.add(bi)), _mm256_set1_epi8(0x10));
                    _mm256_or_si256(nibbles(qs), high)
                }
            };
            // For the signed formats, |w| and the sign moved onto x, once per block.
            let (a, sign) = if has_min {
                (codes, codes)
            } else {
                (_mm256_sign_epi8(codes, codes), codes)
            };
            let d = *wd.add(bi);
            for j in 0..R {
                let xb = xoff[j] + bi;
                let mut xv = _mm256_loadu_si256(xq.add(xb * QK) as *const __m256i);
                if !has_min {
                    xv = _mm256_sign_epi8(xv, sign);
                }
                let p = dot_u8_i8(a, xv);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * *xd.add(xb)), p, acc[j]);
                if has_min {
                    mins[j] += *wm.add(bi) * *xs.add(xb);
                }
            }
        }
        for j in 0..R {
            out[j] = hsum(acc[j]) + mins[j];
        }
    }
}

fn have_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Raw pointer to the output, written at disjoint indices by the parallel tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Weight rows per parallel task, and activation rows per tile (the tile stays in cache
/// while a task's weight rows pass over it).
const ROWS_PER_TASK: usize = 16;
const X_TILE: usize = 64;

/// y (m, n) = x (m, k) · Wᵀ.
fn matmul(w: &BlockMatrix, x: &[f32], m: usize) -> Vec<f32> {
    matmul_many(&[w], x, m).pop().expect("one product")
}

/// From this many activation rows on (a prompt, not a decoding step), products run in f32
/// over weight panels dequantized on the fly: the integer dot products are bound by their
/// instruction count, an f32 matrix product by arithmetic, and the dequantization is shared by
/// all rows (Gemma 3's 512-token prompt: 190 → 400 tokens/s, about the speed of `--dtype
/// f32`, with no f32 copy of the weights kept).
pub const DENSE_MIN_ROWS: usize = 32;

/// Weight rows per dequantized panel (64 × 2048 f32 values: 512 KB, in L2).
const PANEL: usize = 64;

impl BlockMatrix {
    /// Rows `r0..r0 + rows` dequantized into `out` (rows × k, row-major).
    fn dequantize_rows_into(&self, r0: usize, rows: usize, out: &mut [f32]) {
        let nb = self.k / QK;
        let qsb = self.kind.qs_bytes();
        for (bi, o) in (r0 * nb..(r0 + rows) * nb).zip(out.chunks_exact_mut(QK)) {
            let d = self.d[bi];
            let qs = &self.qs[bi * qsb..(bi + 1) * qsb];
            match self.kind {
                BlockKind::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(qs) {
                        *o = d * (q as i8) as f32;
                    }
                }
                kind => {
                    let (m, offset) = match kind {
                        BlockKind::Q4_0 => (0.0, 8.0),
                        BlockKind::Q5_0 => (0.0, 16.0),
                        _ => (self.m[bi], 0.0),
                    };
                    let high = if kind.has_high_bits() { self.qh[bi] } else { 0 };
                    let (lo, hi) = o.split_at_mut(16);
                    for (j, &q) in qs.iter().enumerate() {
                        let h0 = ((high >> j) & 1) << 4;
                        let h1 = ((high >> (j + 16)) & 1) << 4;
                        lo[j] = d * (((q & 0x0F) as u32 | h0) as f32 - offset) + m;
                        hi[j] = d * (((q >> 4) as u32 | h1) as f32 - offset) + m;
                    }
                }
            }
        }
    }
}

/// y (m, n) = x (m, k) · Wᵀ in f32 for each weight, over panels of `PANEL` dequantized rows.
fn matmul_many_dense(ws: &[&BlockMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(wi, w)| (0..w.n.div_ceil(PANEL)).map(move |p| (wi, p)))
        .collect();
    tasks.into_par_iter().for_each(|(wi, p)| {
        let (w, out) = (ws[wi], outs[wi]);
        let (n, k) = (w.n, w.k);
        let r0 = p * PANEL;
        let rows = PANEL.min(n - r0);
        let mut panel = vec![0f32; rows * k];
        w.dequantize_rows_into(r0, rows, &mut panel);
        // SAFETY: x is (m, k) and the panel (rows, k), both row-major; the task writes only
        // columns r0..r0 + rows of the (m, n) output, which no other task touches.
        unsafe {
            gemm::gemm(
                m,
                rows,
                k,
                out.0.add(r0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                // The panel read as its transpose (k, rows).
                panel.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    ys
}

/// One x (m, k) against several weights of the same k (Q, K, V; gate and up): the activations
/// are quantized once and all the products share one parallel region.
fn matmul_many(ws: &[&BlockMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    if m >= DENSE_MIN_ROWS {
        return matmul_many_dense(ws, x, m);
    }
    let xq = quantize_rows(x);
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(wi, w)| (0..w.n.div_ceil(ROWS_PER_TASK)).map(move |t| (wi, t)))
        .collect();
    let simd = have_avx2();
    tasks.into_par_iter().for_each(|(wi, task)| {
        let (w, out) = (ws[wi], outs[wi]);
        let n = w.n;
        let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
        let mut buf = [0f32; 4];
        for tile in (0..m).step_by(X_TILE) {
            let tile_end = (tile + X_TILE).min(m);
            for row in rows.clone() {
                let mut i = tile;
                while i < tile_end {
                    let r = (tile_end - i).min(4);
                    let xrows = [i, i + 1, i + 2, i + 3];
                    let xrows = &xrows[..r];
                    if simd {
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            avx2::dots(w, row, &xq, xrows, &mut buf[..r])
                        };
                    } else {
                        for (j, &xr) in xrows.iter().enumerate() {
                            buf[j] = dot_scalar(w, row, &xq, xr);
                        }
                    }
                    for (j, &xr) in xrows.iter().enumerate() {
                        // SAFETY: each (matrix, xr, row) is written by exactly one task.
                        unsafe { *out.0.add(xr * n + row) = buf[j] };
                    }
                    i += r;
                }
            }
        }
    });
    ys
}

impl BlockMatrix {
    /// `[x Wᵢᵀ]` for weights of the same input width, sharing one quantization of `x`.
    ///
    /// # Shapes
    /// `x`: (..., k) f32 → one (..., nᵢ) per weight
    pub fn matmul_t_many(ws: &[&BlockMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let k = *dims
            .last()
            .ok_or_else(|| Error::msg("block-qmatmul: a scalar input"))?;
        if let Some(w) = ws.iter().find(|w| w.k != k) {
            return Err(Error::shape(
                "block-qmatmul input",
                format!("(..., {})", w.k),
                &dims,
            ));
        }
        let m = x.elem_count() / k.max(1);
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        matmul_many(ws, &data, m)
            .into_iter()
            .zip(ws)
            .map(|(y, w)| {
                let mut out = dims.clone();
                *out.last_mut().unwrap() = w.n;
                Ok(Tensor::from_vec(y, out, x.device())?)
            })
            .collect()
    }
}

impl CustomOp1 for BlockMatrix {
    fn name(&self) -> &'static str {
        "block-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("block-qmatmul: a scalar input");
        };
        if k != self.k {
            candle_core::bail!(
                "block-qmatmul: input {dims:?} against a weight ({}, {})",
                self.n,
                self.k
            );
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("block-qmatmul: f32 input expected");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("block-qmatmul: contiguous input expected");
        };
        let m: usize = lead.iter().product();
        let y = matmul(self, &data[start..end], m);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.n;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Every format against candle's own dequantization and an f32 product: the codes read
    /// back exactly, and the product differs from the f32 one only by the activations'
    /// 8-bit rounding; the SIMD and scalar paths agree.
    #[test]
    fn block_products_match_dequantized_weights() -> Result<()> {
        let mut rng = crate::rng::Rng::new(11);
        let (n, k, m) = (40, 576, 30);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)?;
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            let q = QTensor::quantize(&wt, dtype)?;
            let deq = q.dequantize(&Device::Cpu)?;
            let bm = BlockMatrix::from_qtensor(&q)?.expect("a block format");
            let ours = Tensor::from_vec(bm.dequantize()?, (n, k), &Device::Cpu)?;
            let diff = (&ours - &deq)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-6,
                "{dtype:?}: codes differ from candle's by {diff}"
            );

            let want = xt.matmul(&deq.t()?)?;
            let got = bm.matmul_t(&xt)?;
            assert_eq!(got.dims(), &[m, n]);
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < 0.02 * scale,
                "{dtype:?}: product off by {err} (scale {scale})"
            );

            let xq = quantize_rows(&x);
            for row in [0, n - 1] {
                for xr in [0, m - 1] {
                    let s = dot_scalar(&bm, row, &xq, xr);
                    let v = got.get(xr)?.get(row)?.to_scalar::<f32>()?;
                    assert!(
                        (s - v).abs() < 1e-3 * s.abs().max(1.0),
                        "{dtype:?}: {s} vs {v}"
                    );
                }
            }
            // Several weights sharing one quantization of x give each one's own product.
            // (QTensor::quantize reads the whole storage behind a view: a fresh tensor.)
            let w2: Vec<f32> = (0..32 * k).map(|_| rng.normal() as f32).collect();
            let q2 = QTensor::quantize(&Tensor::from_vec(w2, (32, k), &Device::Cpu)?, dtype)?;
            let bm2 = BlockMatrix::from_qtensor(&q2)?.unwrap();
            let many = BlockMatrix::matmul_t_many(&[&bm, &bm2], &xt)?;
            let one = [bm.matmul_t(&xt)?, bm2.matmul_t(&xt)?];
            for (a, b) in many.iter().zip(&one) {
                assert_eq!(a.dims(), b.dims());
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "{dtype:?}: shared products differ by {d}");
            }
            // From DENSE_MIN_ROWS rows on, the product runs in f32 over dequantized panels:
            // equal to the f32 product up to summation order, and for a partial last panel.
            let (n3, m3) = (PANEL + 9, DENSE_MIN_ROWS + 3);
            let w3: Vec<f32> = (0..n3 * k).map(|_| rng.normal() as f32).collect();
            let q3 = QTensor::quantize(&Tensor::from_vec(w3, (n3, k), &Device::Cpu)?, dtype)?;
            let bm3 = BlockMatrix::from_qtensor(&q3)?.unwrap();
            let x3: Vec<f32> = (0..m3 * k).map(|_| rng.normal() as f32).collect();
            let x3 = Tensor::from_vec(x3, (m3, k), &Device::Cpu)?;
            let want = x3.matmul(&q3.dequantize(&Device::Cpu)?.t()?)?;
            let got = bm3.matmul_t(&x3)?;
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5 * scale, "{dtype:?}: dense product off by {err}");
            // Rank 3 folds its leading dimensions.
            let got3 = bm.matmul_t(&xt.reshape((1, m, k))?)?;
            assert_eq!(got3.dims(), &[1, m, n]);
            let _ = got3.to_dtype(DType::F32)?;
        }
        Ok(())
    }
}
