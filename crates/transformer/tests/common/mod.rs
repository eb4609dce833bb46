//! Helpers shared by the integration tests: seeded random tensors and a finite-difference
//! gradient check.
//!
//! Each test binary uses only some of these.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use transformer::nn::VarStore;
use transformer::rng::Rng;
use transformer::Result;

/// Step of the central differences (f64: truncation error O(h²) ≈ 1e-12, rounding ≈ 1e-10).
pub const FD_STEP: f64 = 1e-6;
/// Accept |fd - backward| ≤ FD_ATOL + FD_RTOL · max(|fd|, |backward|).
pub const FD_ATOL: f64 = 1e-6;
pub const FD_RTOL: f64 = 1e-6;
/// Tensors with more elements are checked on a random subset of this many.
pub const FD_MAX_ELEMS: usize = 32;

/// A tensor of normal(0, std) values drawn from `rng`, in `dtype` on the CPU.
pub fn randn(rng: &mut Rng, dims: &[usize], std: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * std).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)?)
}

/// A trainable f64 input of standard normal values.
pub fn randn_var(rng: &mut Rng, dims: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(&randn(rng, dims, 1.0, DType::F64)?)?)
}

/// Uniform random token ids in `[lo, hi)`, shape (B, T), as u32.
pub fn rand_ids(rng: &mut Rng, b: usize, t: usize, lo: u32, hi: u32) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t)
        .map(|_| lo + (rng.next_u64() % u64::from(hi - lo)) as u32)
        .collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

/// Overwrite every parameter of `vs` with normal(0, std) values, so that gradient checks do not
/// sit on special points (zero biases, unit norm weights).
pub fn randomize_params(vs: &VarStore, rng: &mut Rng, std: f64) -> Result<()> {
    for (_, var) in vs.vars() {
        let t = randn(rng, var.dims(), std, var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// max |a - b| over all elements (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// All elements as f64.
pub fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// `k` distinct indices out of `0..n` (all of them when n ≤ k), drawn from `rng`.
fn sample_indices(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if n <= k {
        return idx;
    }
    // Partial Fisher-Yates: the first k slots become a uniform sample.
    for i in 0..k {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

/// Compare candle's `backward()` of the scalar `loss` with central differences
/// (L(x + h) - L(x - h)) / 2h for every tensor in `vars` (all elements, or a random subset of
/// [`FD_MAX_ELEMS`]). Prints the max difference per tensor and panics listing every element
/// out of tolerance, and any tensor whose checked gradient is identically zero (a vacuous
/// check, or a gradient that stopped).
///
/// `loss` must recompute the forward from the current values of the vars.
pub fn check_grads(
    what: &str,
    vars: &[(String, Var)],
    rng: &mut Rng,
    loss: impl Fn() -> Result<Tensor>,
) -> Result<()> {
    let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_scalar::<f64>()?) };
    let l0 = loss()?;
    assert_eq!(l0.dtype(), DType::F64, "{what}: gradient checks run in f64");
    let grads = l0.backward()?;
    let mut failures = Vec::new();
    for (name, var) in vars {
        let n = var.elem_count();
        // A var the graph never reached has no entry: its gradient is zero.
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => to_vec(g)?,
            None => vec![0.0; n],
        };
        let orig = to_vec(var.as_tensor())?;
        let shape = var.shape().clone();
        let mut perturbed = orig.clone();
        let mut eval_at = |i: usize, x: f64| -> Result<f64> {
            perturbed[i] = x;
            var.set(&Tensor::from_vec(
                perturbed.clone(),
                shape.clone(),
                &Device::Cpu,
            )?)?;
            let l = scalar(loss()?)?;
            perturbed[i] = orig[i];
            Ok(l)
        };
        let (mut max_diff, mut max_grad) = (0f64, 0f64);
        let checked = sample_indices(rng, n, FD_MAX_ELEMS);
        for &i in &checked {
            let lp = eval_at(i, orig[i] + FD_STEP)?;
            let lm = eval_at(i, orig[i] - FD_STEP)?;
            let fd = (lp - lm) / (2.0 * FD_STEP);
            let an = analytic[i];
            let diff = (fd - an).abs();
            max_diff = max_diff.max(diff);
            max_grad = max_grad.max(an.abs()).max(fd.abs());
            // NaN (in either gradient) fails too.
            if diff.is_nan() || diff > FD_ATOL + FD_RTOL * an.abs().max(fd.abs()) {
                failures.push(format!(
                    "{what} {name}[{i}]: backward {an:.9e}, finite difference {fd:.9e}"
                ));
            }
        }
        var.set(&Tensor::from_vec(orig, shape, &Device::Cpu)?)?;
        println!(
            "{what:<28} {name:<24} {:>3}/{n:<3} elements  max|grad| {max_grad:.2e}  \
             max|fd - backward| {max_diff:.2e}",
            checked.len()
        );
        // A key-projection bias adds q·b_k to every score of a row, which softmax ignores: its
        // gradient is zero by design. Anything else must have some gradient, or the check
        // would pass vacuously (or the gradient stopped).
        if max_grad < 1e-6 && !name.ends_with("k_proj.bias") {
            failures.push(format!(
                "{what} {name}: gradient is zero on every checked element"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "gradient check failed:\n{}",
        failures.join("\n")
    );
    Ok(())
}
