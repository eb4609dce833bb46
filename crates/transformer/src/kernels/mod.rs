//! Fused CPU kernels as candle custom ops, each with a real backward.
//!
//! candle-nn's fused `softmax_last_dim` and `layer_norm` record no backward, and the composed
//! versions run five to ten passes over memory with a fresh allocation each. These kernels do
//! one pass forward and one backward, on contiguous f32/f64 CPU tensors. Everywhere else (other
//! devices or dtypes, or a model built with [`Kernels::Composed`]) the composed ops in `nn` run,
//! and they remain the reference the kernels are tested against.

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod cross_entropy;
pub mod dropout;
pub mod few_rows;
pub mod gelu;
pub mod layer_norm;
pub mod norm_linear;
pub mod projection;
pub mod quantized;
mod rows;
pub mod softmax;

pub(crate) use rows::sum_exp_f64;

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use serde::{Deserialize, Serialize};

/// Which implementation a module's ops take: the fused kernels of this module where they apply
/// (CPU, f32/f64) or the composed candle ops everywhere. It is an explicit value held by each
/// module (chosen when the model is built, see `VarStore::with_kernels`) and passed to the free
/// functions, never a process-wide switch: tests build one model of each kind side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// Fused kernels where they apply, composed ops elsewhere.
    #[default]
    Fused,
    /// Composed candle ops only: the reference the kernels are tested against.
    Composed,
}

impl Kernels {
    /// The default for new models: `Composed` when `TRANSFORMER_KERNELS=composed`, else `Fused`.
    /// Read, never written: a process that wants both builds both.
    pub fn from_env() -> Self {
        match std::env::var("TRANSFORMER_KERNELS") {
            Ok(v) if v == "composed" => Kernels::Composed,
            _ => Kernels::Fused,
        }
    }

    /// True when a fused kernel can take `t`: fused kernels chosen, CPU, f32 or f64.
    pub fn applies(self, t: &Tensor) -> bool {
        self == Kernels::Fused
            && matches!(t.device(), Device::Cpu)
            && matches!(t.dtype(), DType::F32 | DType::F64)
    }
}

/// The elements of a contiguous CPU storage as a slice.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused kernel needs a contiguous input"),
    }
}

/// Run `f` on the CPU data of a contiguous tensor.
pub(crate) fn with_data<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
    }
}

/// The value of a custom op, computed before the op is made (ordinary candle ops on detached
/// inputs) and handed over once by the op's `cpu_fwd`. The graph then holds the op's inputs
/// but none of the intermediates of its value, which the op's backward recomputes.
pub(crate) struct Stash(Mutex<Option<Tensor>>);

impl Stash {
    pub(crate) fn new(value: Tensor) -> Self {
        Stash(Mutex::new(Some(value)))
    }

    /// The value as the op's output storage (once: a node's forward runs once).
    pub(crate) fn take(&self) -> Result<(CpuStorage, Shape)> {
        let v = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("stashed op value taken twice".into()))?;
        let flat = v.flatten_all()?;
        let storage = match v.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            dt => candle_core::bail!("fused kernel: only f32/f64, got {dt:?}"),
        };
        Ok((storage, v.shape().clone()))
    }
}

/// Whether loops compiled for AVX2 + FMA (`#[target_feature]`) may run here.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512F (with AVX2 and FMA, which every AVX-512 CPU has), checked once per call site's
/// dispatch.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && has_avx2()
}

/// Rows processed in parallel only when there is enough work to pay for the threads. Measured
/// (issue 16, with a temporary build reading it from the environment) on Shakespeare training,
/// 2 threads, the calling thread one of the pool's, Intel Xeon with AMX, 300 steps, medians of
/// 2: 8K elements 22.2K tokens/s, 16K 22.2K, 32K 22.6K, 128K 21.1K, 512K 18.9K, never in
/// parallel 18.8K.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Float operations the kernels need, for f32 and f64.
pub(crate) trait Float:
    WithDType + num_traits_like::Float + Send + Sync + Copy + 'static
{
}
impl Float for f32 {}
impl Float for f64 {}

/// The few float operations used by the kernels (a tiny stand-in for num-traits).
pub(crate) mod num_traits_like {
    pub trait Float:
        Copy
        + PartialOrd
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
        + std::ops::AddAssign
        + std::ops::MulAssign
        + std::ops::Neg<Output = Self>
    {
        const ZERO: Self;
        const ONE: Self;
        const NEG_INF: Self;
        fn exp_(self) -> Self;
        fn sqrt_(self) -> Self;
        fn ln_(self) -> Self;
        fn of(v: f64) -> Self;
        fn max_(self, o: Self) -> Self;
        /// The largest of `init` and the elements of `row`.
        fn max_of(row: &[Self], init: Self) -> Self {
            row.iter().fold(init, |m, &x| m.max_(x))
        }
        /// x ← e^(x − m) for every x of `row`, returning their sum (the softmax numerators
        /// of the attention kernels).
        fn exp_sub_sum(row: &mut [Self], m: Self) -> Self {
            let mut sum = Self::ZERO;
            for x in row.iter_mut() {
                let e = (*x - m).exp_();
                *x = e;
                sum += e;
            }
            sum
        }
    }
    impl Float for f32 {
        const ZERO: Self = 0.0;
        const ONE: Self = 1.0;
        const NEG_INF: Self = f32::NEG_INFINITY;
        fn exp_(self) -> Self {
            f32::exp(self)
        }
        fn sqrt_(self) -> Self {
            f32::sqrt(self)
        }
        fn ln_(self) -> Self {
            f32::ln(self)
        }
        fn of(v: f64) -> Self {
            v as f32
        }
        fn max_(self, o: Self) -> Self {
            f32::max(self, o)
        }
        fn max_of(row: &[Self], init: Self) -> Self {
            super::rows::max_f32(row, init)
        }
        fn exp_sub_sum(row: &mut [Self], m: Self) -> Self {
            super::rows::exp_sub_sum_f32(row, m)
        }
    }
    impl Float for f64 {
        const ZERO: Self = 0.0;
        const ONE: Self = 1.0;
        const NEG_INF: Self = f64::NEG_INFINITY;
        fn exp_(self) -> Self {
            f64::exp(self)
        }
        fn sqrt_(self) -> Self {
            f64::sqrt(self)
        }
        fn ln_(self) -> Self {
            f64::ln(self)
        }
        fn of(v: f64) -> Self {
            v
        }
        fn max_(self, o: Self) -> Self {
            f64::max(self, o)
        }
    }
}

/// Run `f` on a thread of rayon's pool.
///
/// A parallel kernel called from outside the pool hands its work to the pool's threads and
/// sleeps until they finish, two thread wake-ups per call; called from a pool thread, it starts
/// at once on that thread while the others join in. Decoding calls a few hundred small
/// kernels per token, so loops like generation run their whole body on the pool.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
