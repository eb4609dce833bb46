//! Each kernel against the composed ops, and its backward against finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};

use super::{layer_norm, softmax};
use crate::nn::attention::{masked_softmax_last_dim, softmax_last_dim};
use crate::nn::norm::layer_norm_composed;
use crate::rng::Rng;

fn randn(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Forward and gradients of `f` with the kernels on and off.
fn both_paths(
    inputs: &[Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> Vec<(Tensor, Vec<Tensor>)> {
    [true, false]
        .iter()
        .map(|&on| {
            super::set_enabled(on);
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let loss = (&y * g).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gs = vars
                .iter()
                .map(|v| {
                    grads
                        .get(v)
                        .cloned()
                        .unwrap_or_else(|| v.zeros_like().unwrap())
                })
                .collect();
            super::set_enabled(true);
            (y, gs)
        })
        .collect()
}

#[test]
fn softmax_matches_composed_with_masked_rows() {
    let mut rng = Rng::new(1);
    let x = randn(&mut rng, &[3, 4, 70], DType::F32);
    // Fully mask row 0 of the first block, and some entries elsewhere.
    let mut mask = vec![0f32; 3 * 4 * 70];
    mask[..70].iter_mut().for_each(|m| *m = f32::NEG_INFINITY);
    mask[200..230]
        .iter_mut()
        .for_each(|m| *m = f32::NEG_INFINITY);
    let mask = Tensor::from_vec(mask, (3, 4, 70), &Device::Cpu).unwrap();
    let x = (x + mask).unwrap();
    let g = randn(&mut rng, &[3, 4, 70], DType::F32);
    let r = both_paths(&[x], &g, &|t| masked_softmax_last_dim(&t[0]).unwrap());
    let (fused, composed) = (&r[0], &r[1]);
    assert!(max_diff(&fused.0, &composed.0) < 1e-6);
    assert!(max_diff(&fused.1[0], &composed.1[0]) < 1e-6);
    let row0 = fused.0.flatten_all().unwrap().narrow(0, 0, 70).unwrap();
    assert_eq!(
        row0.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // Large input runs the parallel path.
    let x = randn(&mut rng, &[64, 1024], DType::F32);
    let g = randn(&mut rng, &[64, 1024], DType::F32);
    let r = both_paths(&[x], &g, &|t| softmax_last_dim(&t[0]).unwrap());
    assert!(max_diff(&r[0].0, &r[1].0) < 1e-6);
    assert!(max_diff(&r[0].1[0], &r[1].1[0]) < 1e-6);
}

#[test]
fn layer_norm_matches_composed() {
    let mut rng = Rng::new(2);
    for (dims, bias) in [
        (vec![2, 5, 16], true),
        (vec![2, 5, 16], false),
        (vec![512, 128], true),
    ] {
        let c = *dims.last().unwrap();
        let x = randn(&mut rng, &dims, DType::F32);
        let w = randn(&mut rng, &[c], DType::F32).affine(0.1, 1.0).unwrap();
        let b = randn(&mut rng, &[c], DType::F32);
        let g = randn(&mut rng, &dims, DType::F32);
        let r = both_paths(&[x, w, b], &g, &|t| {
            crate::nn::norm::layer_norm(&t[0], &t[1], bias.then_some(&t[2]), 1e-5).unwrap()
        });
        assert!(max_diff(&r[0].0, &r[1].0) < 1e-5, "forward");
        for i in 0..2 {
            let d = max_diff(&r[0].1[i], &r[1].1[i]);
            assert!(d < 1e-4, "grad {i}: {d}");
        }
        if bias {
            assert!(max_diff(&r[0].1[2], &r[1].1[2]) < 1e-4);
        }
    }
    // The composed reference is what the fused path is compared with above.
    let _ = layer_norm_composed;
}

/// Central differences of sum(f(x) * g) against the kernel's backward, in f64.
fn finite_difference_check(x: &Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let loss = (f(var.as_tensor()) * g).unwrap().sum_all().unwrap();
    let grad = loss
        .backward()
        .unwrap()
        .get(&var)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-6;
    for i in 0..base.len() {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            (f(&t) * g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() < 1e-6 + 1e-6 * fd.abs(),
            "element {i}: fd {fd} vs {}",
            grad[i]
        );
    }
}

#[test]
fn kernels_backward_matches_finite_differences_f64() {
    super::set_enabled(true);
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[3, 7], DType::F64);
    let g = randn(&mut rng, &[3, 7], DType::F64);
    finite_difference_check(&x, &g, &|t| softmax::softmax_last_dim(t).unwrap());
    let w = randn(&mut rng, &[7], DType::F64).affine(0.1, 1.0).unwrap();
    let b = randn(&mut rng, &[7], DType::F64);
    finite_difference_check(&x, &g, &|t| {
        layer_norm::layer_norm(t, &w, Some(&b), 1e-5).unwrap()
    });
    // And with respect to the weight and bias.
    let xw = x.clone();
    finite_difference_check(&w, &randn(&mut rng, &[3, 7], DType::F64), &|t| {
        layer_norm::layer_norm(&xw, t, Some(&b), 1e-5).unwrap()
    });
    finite_difference_check(&b, &randn(&mut rng, &[3, 7], DType::F64), &|t| {
        layer_norm::layer_norm(&xw, &w, Some(t), 1e-5).unwrap()
    });
}

#[test]
fn gelu_matches_composed_and_finite_differences() {
    let mut rng = Rng::new(4);
    let x = randn(&mut rng, &[4, 9, 33], DType::F32)
        .affine(3.0, 0.0)
        .unwrap();
    let g = randn(&mut rng, &[4, 9, 33], DType::F32);
    let r = both_paths(&[x], &g, &|t| {
        crate::nn::Activation::Gelu.apply(&t[0]).unwrap()
    });
    assert!(
        max_diff(&r[0].0, &r[1].0) < 1e-6,
        "forward {}",
        max_diff(&r[0].0, &r[1].0)
    );
    assert!(
        max_diff(&r[0].1[0], &r[1].1[0]) < 1e-5,
        "backward {}",
        max_diff(&r[0].1[0], &r[1].1[0])
    );
    super::set_enabled(true);
    let x = randn(&mut rng, &[2, 6], DType::F64)
        .affine(2.0, 0.0)
        .unwrap();
    let g = randn(&mut rng, &[2, 6], DType::F64);
    finite_difference_check(&x, &g, &|t| super::gelu::gelu_erf(t).unwrap());
}
