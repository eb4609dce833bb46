//! Matrix products on bf16 inputs with f32 accumulation: the products of bf16 mixed precision
//! (`train.precision = "bf16"`, `embed --dtype bf16`), on Intel AMX where the CPU has it.
//!
//! Legend: a product is C (m, n) = A (m, k) · B (k, n); inputs are f32 tensors, rounded to bf16
//! (round to nearest even) while they are packed, multiplied in the tile unit with f32
//! accumulation, and the output is f32. Everything around the products (norms, softmax, loss,
//! the optimizer and its master weights) stays in f32, as `torch.autocast("cpu",
//! dtype=torch.bfloat16)` keeps it; unlike autocast, the outputs are f32, not bf16, so no
//! further rounding happens between ops.
//!
//! Which ops take this path is a scope, not a model setting: [`autocast`] runs a closure with
//! bf16 products on the calling thread (as PyTorch's autocast is a thread-local context), and
//! each op records the choice it made, so a backward run after the scope closed uses the same
//! precision as its forward.
//!
//! The tile unit: `TDPBF16PS` multiplies a 16 × 32 bf16 tile of A by a 32 × 16 tile of B held
//! as 16 rows of pairs (B's rows 2q and 2q + 1 interleaved, "VNNI" order) into a 16 × 16 f32
//! tile of C. The kernel keeps a 32 × 32 block of C in four tiles and streams two tiles of A
//! and two of B per 32 steps of k. A is packed row-major (m and k padded to 32), B in blocks of
//! 16 columns, each k / 2 rows of 64 bytes, so that every tile load is one strided load.
//!
//! Without AMX (or where Linux refuses the tile state) the same rounded inputs go through the
//! f32 product: the same numerics up to the order of the sums, without the speed.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, PAR_MIN_ELEMS};

/// The precision of the matrix products of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// Products on bf16-rounded inputs with f32 accumulation; the rest in f32.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!(
                "unknown precision {s:?} (expected \"f32\" or \"bf16\")"
            )),
        }
    }
}

thread_local! {
    static SCOPE: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with the products of the calling thread in `precision` (the previous precision is
/// restored after, also on a panic).
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPE.with(|s| s.replace(precision)));
    f()
}

/// The precision of the enclosing [`autocast`] scope on this thread (f32 outside any).
pub fn current() -> Precision {
    SCOPE.with(|s| s.get())
}

/// True when a product of `a` and `w` in `precision` takes the bf16 path: bf16 asked, both
/// f32 on the CPU.
pub fn takes(precision: Precision, a: &Tensor, w: &Tensor) -> bool {
    precision == Precision::Bf16
        && a.dtype() == DType::F32
        && w.dtype() == DType::F32
        && matches!(a.device(), Device::Cpu)
        && matches!(w.device(), Device::Cpu)
}

/// Whether the AMX tile unit runs here: the CPU has AMX-TILE and AMX-BF16 and Linux granted
/// this process the tile state (asked once).
pub fn has_amx() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        if std::env::var("TRANSFORMER_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        amx::request()
    })
}

/// f32 → bf16, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// The f32 nearest to `x` in bf16 (for the emulated path and for tests).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16(x) as u32) << 16)
}

/// An f32 matrix read through strides: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// A row-major matrix of `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Strided {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix of `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Strided {
            data,
            rs: 1,
            cs: cols,
        }
    }

    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// C (m, n) = A (m, k) · B (k, n) on bf16-rounded inputs, f32 accumulation, row-major output.
pub fn gemm(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    if k == 0 {
        return vec![0.0; m * n];
    }
    if has_amx() {
        amx::gemm(m, n, k, a, b)
    } else {
        emulated(m, n, k, a, b)
    }
}

/// The rounded inputs through the f32 product (the gemm crate, as candle's CPU matmul).
fn emulated(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
    let mut ar = vec![0f32; m * k];
    for i in 0..m {
        for p in 0..k {
            ar[i * k + p] = round_bf16(a.at(i, p));
        }
    }
    let mut br = vec![0f32; k * n];
    for p in 0..k {
        for j in 0..n {
            br[p * n + j] = round_bf16(b.at(p, j));
        }
    }
    let mut c = vec![0f32; m * n];
    let threads = if m * n * k >= PAR_MIN_ELEMS * 64 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers hold m×k, k×n and m×n elements, row-major with the strides
    // given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            ar.as_ptr(),
            1,
            k as isize,
            br.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
    c
}

/// `dst[i] = to_bf16(src[i])`, 32 at a time with AVX512-BF16's conversion where the CPU has
/// it (every AMX CPU does).
fn convert(src: &[f32], dst: &mut [u16]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_convert() {
        // SAFETY: the CPU has AVX512-BF16 (checked), and the two slices have one length.
        unsafe { convert_avx512(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_convert() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
    })
}

/// The vector conversion. Unlike [`to_bf16`] it flushes f32 subnormals to zero, as the tile
/// unit does with bf16 subnormal inputs anyway.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mut i = 0;
    while i + 32 <= n {
        let lo = _mm512_loadu_ps(src.as_ptr().add(i));
        let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
        let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut __m512i, r);
        i += 32;
    }
    for j in i..n {
        dst[j] = to_bf16(src[j]);
    }
}

thread_local! {
    /// The packed inputs of the last products on this thread, reused: fresh buffers of
    /// several MB each cost a page fault per 4 KiB on every product (the kernel's page
    /// clearing was 16% of a GPT training step's time). The largest product's stay allocated.
    static SCRATCH: std::cell::RefCell<(Vec<u16>, Vec<u16>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Runs `f` on two buffers of `la` and `lb` elements with unspecified contents.
fn with_scratch<R>(la: usize, lb: usize, f: impl FnOnce(&mut [u16], &mut [u16]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (a, b) = &mut *bufs;
            if a.len() < la {
                a.resize(la, 0);
            }
            if b.len() < lb {
                b.resize(lb, 0);
            }
            f(&mut a[..la], &mut b[..lb])
        }
        // A product started inside another's closure (not done today): its own buffers.
        Err(_) => f(&mut vec![0; la], &mut vec![0; lb]),
    })
}

/// A packed for the tile loads into `out` ((m_pad, k_pad) bf16, row-major), zeros written
/// into the padding.
fn pack_a(m: usize, k: usize, a: Strided, m_pad: usize, k_pad: usize, out: &mut [u16]) {
    debug_assert_eq!(out.len(), m_pad * k_pad);
    let par = m * k >= PAR_MIN_ELEMS * 4;
    if a.cs == 1 {
        let fill = |(i, row): (usize, &mut [u16])| {
            if i < m {
                convert(&a.data[i * a.rs..i * a.rs + k], &mut row[..k]);
                row[k..].fill(0);
            } else {
                row.fill(0);
            }
        };
        if par {
            out.par_chunks_mut(k_pad).enumerate().for_each(fill);
        } else {
            out.chunks_mut(k_pad).enumerate().for_each(fill);
        }
    } else {
        // A read by columns (a transposed matrix, a.rs == 1 in the products here): each
        // source row holds one column of A; convert 32 of its elements at a time and spread
        // them over 32 rows of the packed A.
        let task = |(blk, rows): (usize, &mut [u16])| {
            let i0 = blk * 32;
            let i1 = (i0 + 32).min(m);
            if i1 - i0 < 32 || k < k_pad {
                rows.fill(0);
            }
            let mut tmp = [0u16; 32];
            let mut col = [0f32; 32];
            for p in 0..k {
                let t = &mut tmp[..i1 - i0];
                if a.rs == 1 {
                    convert(&a.data[p * a.cs + i0..p * a.cs + i1], t);
                } else {
                    for (c, i) in col.iter_mut().zip(i0..i1) {
                        *c = a.at(i, p);
                    }
                    convert(&col[..i1 - i0], t);
                }
                for (r, &v) in t.iter().enumerate() {
                    rows[r * k_pad + p] = v;
                }
            }
        };
        if par {
            out.par_chunks_mut(32 * k_pad).enumerate().for_each(task);
        } else {
            out.chunks_mut(32 * k_pad).enumerate().for_each(task);
        }
    }
}

/// B packed for the tile loads into `out`: n_pad / 16 blocks of 16 columns, each k_pad / 2
/// rows of 16 pairs (B[2q][j], B[2q + 1][j]), zeros written into the padding.
fn pack_b(n: usize, k: usize, b: Strided, n_pad: usize, k_pad: usize, out: &mut [u16]) {
    debug_assert_eq!(out.len(), n_pad * k_pad);
    let block = k_pad * 16;
    let fill = |(blk, dst): (usize, &mut [u16])| {
        let j0 = blk * 16;
        let j1 = (j0 + 16).min(n);
        if j0 >= n || j1 - j0 < 16 || k < k_pad {
            dst.fill(0);
        }
        if j0 >= n {
            return; // a block of padding
        }
        if b.rs == 1 {
            // B = Wᵀ with W row-major (n, k): column j of B is W's row j, contiguous, and
            // its consecutive pairs go to consecutive rows of the block.
            let mut tmp = vec![0u16; k_pad];
            for j in j0..j1 {
                convert(&b.data[j * b.cs..j * b.cs + k], &mut tmp[..k]);
                let jj = j - j0;
                for (q, pair) in tmp.chunks_exact(2).enumerate() {
                    dst[q * 32 + jj * 2] = pair[0];
                    dst[q * 32 + jj * 2 + 1] = pair[1];
                }
            }
        } else {
            let mut tmp = [0u16; 16];
            let mut row = [0f32; 16];
            for p in 0..k {
                let t = &mut tmp[..j1 - j0];
                if b.cs == 1 {
                    convert(&b.data[p * b.rs + j0..p * b.rs + j1], t);
                } else {
                    for (r, j) in row.iter_mut().zip(j0..j1) {
                        *r = b.at(p, j);
                    }
                    convert(&row[..j1 - j0], t);
                }
                let base = (p / 2) * 32 + (p & 1);
                for (jj, &v) in t.iter().enumerate() {
                    dst[base + jj * 2] = v;
                }
            }
        }
    };
    if n * k >= PAR_MIN_ELEMS * 4 {
        out.par_chunks_mut(block).enumerate().for_each(fill);
    } else {
        out.chunks_mut(block).enumerate().for_each(fill);
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use rayon::prelude::*;

    use super::{pack_a, pack_b, round_up, Strided};

    /// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`), after checking CPUID for AMX-TILE and AMX-BF16.
    pub(super) fn request() -> bool {
        let leaf0 = std::arch::x86_64::__cpuid(0);
        if leaf0.eax < 7 {
            return false;
        }
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx_bf16 = l7.edx & (1 << 22) != 0;
        let amx_tile = l7.edx & (1 << 24) != 0;
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            rc == 0
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    pub(super) fn gemm(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
        let (m_pad, n_pad, k_pad) = (round_up(m, 32), round_up(n, 32), round_up(k, 32));
        super::with_scratch(m_pad * k_pad, n_pad * k_pad, |pa, pb| {
            pack_a(m, k, a, m_pad, k_pad, pa);
            pack_b(n, k, b, n_pad, k_pad, pb);
            tiles(m, n, m_pad, n_pad, k_pad, pa, pb)
        })
    }

    /// The tile products of packed A and B, cut to (m, n).
    fn tiles(
        m: usize,
        n: usize,
        m_pad: usize,
        n_pad: usize,
        k_pad: usize,
        pa: &[u16],
        pb: &[u16],
    ) -> Vec<f32> {
        // Every element of C is written by a tile store: no zero fill (a memset of C took 6%
        // of the products' time).
        let mut c: Vec<f32> = Vec::with_capacity(m_pad * n_pad);
        let task = |(ib, rows): (usize, &mut [std::mem::MaybeUninit<f32>])| {
            // SAFETY: AMX was granted (`has_amx`); every tile load reads 16 rows of 64 bytes
            // inside the packed buffers (m_pad, k_pad multiples of 32) and every store writes
            // 16 rows of 64 bytes inside this task's 32 rows of C (n_pad a multiple of 32).
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
                let a0 = pa.as_ptr().add(ib * 32 * k_pad) as *const u8;
                let a1 = a0.add(16 * k_pad * 2);
                let lda = k_pad * 2;
                let ldc = n_pad * 4;
                for jb in 0..n_pad / 32 {
                    let b0 = pb.as_ptr().add(2 * jb * k_pad * 16) as *const u8;
                    let b1 = b0.add(k_pad * 16 * 2);
                    block(a0, a1, lda, b0, b1, k_pad / 32);
                    let c0 = rows.as_mut_ptr().add(jb * 32) as *mut u8;
                    let c1 = c0.add(16 * ldc);
                    asm!(
                        "tilestored [{c0} + {ldc}*1], tmm0",
                        "tilestored [{c0b} + {ldc}*1], tmm1",
                        "tilestored [{c1} + {ldc}*1], tmm2",
                        "tilestored [{c1b} + {ldc}*1], tmm3",
                        c0 = in(reg) c0,
                        c0b = in(reg) c0.add(64),
                        c1 = in(reg) c1,
                        c1b = in(reg) c1.add(64),
                        ldc = in(reg) ldc,
                        options(nostack),
                    );
                }
                asm!("tilerelease", options(nostack, nomem));
            }
        };
        let work = m_pad * n_pad * k_pad;
        if work >= super::PAR_MIN_ELEMS * 256 && m_pad > 32 {
            c.spare_capacity_mut()[..m_pad * n_pad]
                .par_chunks_mut(32 * n_pad)
                .enumerate()
                .for_each(task);
        } else {
            c.spare_capacity_mut()[..m_pad * n_pad]
                .chunks_mut(32 * n_pad)
                .enumerate()
                .for_each(task);
        }
        // SAFETY: the tasks stored every one of the m_pad × n_pad elements (m_pad / 32 row
        // blocks × n_pad / 32 column blocks × four 16 × 16 tiles).
        unsafe { c.set_len(m_pad * n_pad) };
        if m_pad == m && n_pad == n {
            return c;
        }
        let mut out = vec![0f32; m * n];
        for (dst, src) in out.chunks_exact_mut(n).zip(c.chunks_exact(n_pad)) {
            dst.copy_from_slice(&src[..n]);
        }
        out
    }

    /// tmm0..tmm3 = the 32 × 32 block of C from A rows at `a0`, `a1` (16 each, `lda` bytes
    /// apart) and the B blocks at `b0`, `b1` (16 columns each), over `steps` × 32 of k.
    #[inline(always)]
    unsafe fn block(
        a0: *const u8,
        a1: *const u8,
        lda: usize,
        b0: *const u8,
        b1: *const u8,
        steps: usize,
    ) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for s in 0..steps {
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(s * 64),
                a1 = in(reg) a1.add(s * 64),
                b0 = in(reg) b0.add(s * 1024),
                b1 = in(reg) b1.add(s * 1024),
                lda = in(reg) lda,
                ldb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use super::Strided;

    pub(super) fn request() -> bool {
        false
    }

    pub(super) fn gemm(_: usize, _: usize, _: usize, _: Strided, _: Strided) -> Vec<f32> {
        unreachable!("has_amx() is false off x86-64")
    }
}

/// The CPU data of a contiguous f32 tensor, with its two dimensions.
fn dims2_data(t: &Tensor) -> Result<((usize, usize), Vec<f32>)> {
    let dims = t.dims2()?;
    let data = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Ok((dims, data))
}

/// `a Wᵀ` in bf16 without a graph.
///
/// # Shapes
/// `a`: (m, k), `w`: (n, k) → (m, n)
pub fn matmul_t_value(a: &Tensor, w: &Tensor) -> Result<Tensor> {
    a.detach()
        .contiguous()?
        .apply_op2_no_bwd(&w.detach().contiguous()?, &MatmulT)
}

/// `g W` in bf16 (the input gradient of a product with `W`).
///
/// # Shapes
/// `g`: (m, n), `w`: (n, k) → (m, k)
pub fn matmul_value(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((m, n), gd) = dims2_data(g)?;
    let ((n2, k), wd) = dims2_data(w)?;
    if n != n2 {
        candle_core::bail!("bf16 matmul: g is ({m}, {n}), w is ({n2}, {k})");
    }
    let c = gemm(m, k, n, Strided::rows(&gd, n), Strided::rows(&wd, k));
    Tensor::from_vec(c, (m, k), g.device())
}

/// `gᵀ a` in bf16 (the weight gradient of `a Wᵀ`).
///
/// # Shapes
/// `g`: (m, n), `a`: (m, k) → (n, k)
pub fn t_matmul_value(g: &Tensor, a: &Tensor) -> Result<Tensor> {
    let ((m, n), gd) = dims2_data(g)?;
    let ((m2, k), ad) = dims2_data(a)?;
    if m != m2 {
        candle_core::bail!("bf16 matmul: g is ({m}, {n}), a is ({m2}, {k})");
    }
    let c = gemm(n, k, m, Strided::transposed(&gd, n), Strided::rows(&ad, k));
    Tensor::from_vec(c, (n, k), g.device())
}

/// `a Wᵀ` without a graph, in `precision`: the few-rows kernel for a few rows (whose time
/// is reading the weight, in either precision), the tile products in bf16, candle's otherwise.
/// The fused kernels compute their values and gradients through these three.
///
/// # Shapes
/// `a`: (m, k), `w`: (n, k) → (m, n)
pub fn product_t(a: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    if super::few_rows::applies(a, w) {
        super::few_rows::matmul_t_value(a, w)
    } else if takes(precision, a, w) {
        matmul_t_value(a, w)
    } else {
        a.matmul(&w.detach().t()?)
    }
}

/// `g W` without a graph, in `precision`.
///
/// # Shapes
/// `g`: (m, n), `w`: (n, k) → (m, k)
pub fn product(g: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    if takes(precision, g, w) {
        matmul_value(g, w)
    } else {
        g.matmul(&w.contiguous()?)
    }
}

/// `gᵀ a` without a graph, in `precision`.
///
/// # Shapes
/// `g`: (m, n), `a`: (m, k) → (n, k)
pub fn t_product(g: &Tensor, a: &Tensor, precision: Precision) -> Result<Tensor> {
    if takes(precision, g, a) {
        t_matmul_value(g, a)
    } else {
        g.t()?.matmul(a)
    }
}

/// `a Wᵀ` in bf16 as a graph op; its backward runs in bf16 too (`g W`, `gᵀ a`).
///
/// # Shapes
/// `a`: (m, k), `w`: (n, k) → (m, n)
pub fn matmul_t(a: &Tensor, w: &Tensor) -> Result<Tensor> {
    use crate::autograd::ops;
    ops::apply_op2(
        &ops::contiguous(a)?,
        &ops::contiguous(w)?,
        MatmulT,
        ops::Output::Unused,
    )
}

struct MatmulT;

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "bf16-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("bf16 matmul: a is ({m}, {k}), w is ({n}, {k2})");
        }
        let a = slice::<f32>(s1, l1)?;
        let w = slice::<f32>(s2, l2)?;
        let c = gemm(m, n, k, Strided::rows(a, k), Strided::transposed(w, k));
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(matmul_value(grad, w)?), Some(t_matmul_value(grad, a)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of the rounded inputs in f64, row-major.
    fn reference(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| round_bf16(a.at(i, p)) as f64 * round_bf16(b.at(p, j)) as f64)
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed * 40503);
                ((x >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: to the even one.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(to_bf16(f32::NAN), 0x7FC0);
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(-2.5), -2.5);
    }

    /// Every layout the products use, at sizes with and without padding, against the f64
    /// product of the same rounded inputs (the tile unit's and the emulation's results differ
    /// only in the order of f32 sums).
    #[test]
    fn products_match_the_rounded_reference() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 3),
            (32, 32, 32),
            (33, 47, 65),
            (64, 96, 384),
            (100, 16, 40),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let g = values(m * n, 3);
            // a Wᵀ: (m, k) × (n, k)ᵀ.
            let cases: [(usize, usize, usize, Strided, Strided); 3] = [
                (m, n, k, Strided::rows(&x, k), Strided::transposed(&w, k)),
                // g W: (m, n) × (n, k).
                (m, k, n, Strided::rows(&g, n), Strided::rows(&w, k)),
                // gᵀ x: (n, m) × (m, k).
                (n, k, m, Strided::transposed(&g, n), Strided::rows(&x, k)),
            ];
            for (case, (mm, nn, kk, a, b)) in cases.into_iter().enumerate() {
                let want = reference(mm, nn, kk, a, b);
                for (path, got) in [
                    ("dispatched", gemm(mm, nn, kk, a, b)),
                    ("emulated", emulated(mm, nn, kk, a, b)),
                ] {
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(&g, &w)| (g as f64 - w).abs())
                        .fold(0f64, f64::max);
                    assert!(
                        worst <= 1e-5 * kk as f64,
                        "{path} case {case} ({mm}×{kk})·({kk}×{nn}): largest difference {worst}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_scope_is_restored_after_a_panic() {
        assert_eq!(current(), Precision::F32);
        let r = std::panic::catch_unwind(|| {
            autocast(Precision::Bf16, || {
                assert_eq!(current(), Precision::Bf16);
                panic!("inside");
            })
        });
        assert!(r.is_err());
        assert_eq!(current(), Precision::F32);
    }

    /// The graph op's gradients are the bf16 products of the f32 rule (d a = g W, d W = gᵀ a).
    #[test]
    fn graph_op_gradients_match_f32_within_bf16_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let (m, n, k) = (40, 24, 56);
        let a = candle_core::Var::from_tensor(&Tensor::from_vec(values(m * k, 4), (m, k), &dev)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::from_vec(values(n * k, 5), (n, k), &dev)?)?;
        let y = matmul_t(a.as_tensor(), w.as_tensor())?;
        let y32 = a.as_tensor().matmul(&w.as_tensor().t()?)?;
        let rel = |x: &Tensor, r: &Tensor| -> Result<f32> {
            let d = (x - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / r.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert!(rel(&y, &y32)? < 1e-2);
        let gy = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
        let g32 = (y32.sqr()?.sum_all()? * 0.5)?.backward()?;
        for v in [&a, &w] {
            let got = gy.get(v.as_tensor()).unwrap();
            let want = g32.get(v.as_tensor()).unwrap();
            assert!(
                rel(got, want)? < 2e-2,
                "gradient off by {}",
                rel(got, want)?
            );
        }
        Ok(())
    }

    /// The fused sub-layer kernels compute value and gradients in the precision of the scope
    /// they were built in, also when the backward runs after the scope closed: within bf16
    /// rounding of f32, and not equal to it.
    #[test]
    fn fused_kernels_keep_the_forward_s_precision() -> Result<()> {
        use crate::kernels::norm_linear::norm_linear;
        use crate::kernels::projection::{project, Act, Projection};
        use candle_core::Var;
        let dev = Device::Cpu;
        let (n, f, c) = (48, 64, 40);
        let var = |len, dims: (usize, usize), seed| -> Result<Var> {
            Var::from_tensor(&Tensor::from_vec(values(len, seed), dims, &dev)?.reshape(dims)?)
        };
        let h = var(n * f, (n, f), 6)?;
        let w = var(c * f, (c, f), 7)?;
        let b = var(c, (1, c), 8)?;
        let gamma = var(f, (1, f), 9)?;
        let rel = |x: &Tensor, r: &Tensor| -> Result<f32> {
            let d = (x - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / r.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let cfg = Projection {
            act: Act::GeluErf,
            dropout_in: None,
            dropout_out: None,
        };
        type Case<'a> = &'a dyn Fn() -> Result<Tensor>;
        let b1 = b.as_tensor().flatten_all()?;
        let g1 = (gamma.as_tensor().flatten_all()? + 1.0)?;
        let projection = || project(h.as_tensor(), w.as_tensor(), Some(&b1), None, cfg);
        let normed = || norm_linear(h.as_tensor(), &g1, w.as_tensor(), 1e-5);
        for (name, case) in [
            ("projection", &projection as Case),
            ("norm-linear", &normed),
        ] {
            let run = |p: Precision| -> Result<(Tensor, Vec<Tensor>)> {
                let y = autocast(p, case)?;
                // Outside the scope: the nodes remember their precision.
                let grads = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
                let g = [&h, &w]
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                    .collect();
                Ok((y, g))
            };
            let (y32, g32) = run(Precision::F32)?;
            let (y16, g16) = run(Precision::Bf16)?;
            let d = rel(&y16, &y32)?;
            assert!(d > 0.0 && d < 1e-2, "{name}: value off by {d}");
            for (i, (a, r)) in g16.iter().zip(&g32).enumerate() {
                let d = rel(a, r)?;
                assert!(d > 0.0 && d < 3e-2, "{name}: gradient {i} off by {d}");
            }
        }
        Ok(())
    }
}
