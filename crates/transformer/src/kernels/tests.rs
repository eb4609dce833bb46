//! Each kernel against the composed ops, and its backward against finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};

use super::{layer_norm, softmax, Kernels};
use crate::nn::attention::{masked_softmax_last_dim, softmax_last_dim};
use crate::nn::norm::layer_norm_composed;
use crate::rng::Rng;

/// Standard normal values of the given shape (tests across the crate share it).
pub(crate) fn randn(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The largest |a - b| element, as f64.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
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

/// Forward and gradients of `f` with the fused kernels (first) and the composed ops (second),
/// each chosen explicitly, so that tests running in parallel cannot change what another
/// compares.
fn both_paths(
    inputs: &[Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor], Kernels) -> Tensor,
) -> Vec<(Tensor, Vec<Tensor>)> {
    [Kernels::Fused, Kernels::Composed]
        .iter()
        .map(|&kernels| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts, kernels);
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
    let r = both_paths(&[x], &g, &|t, k| masked_softmax_last_dim(&t[0], k).unwrap());
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
    let r = both_paths(&[x], &g, &|t, k| softmax_last_dim(&t[0], k).unwrap());
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
        let r = both_paths(&[x, w, b], &g, &|t, k| {
            crate::nn::norm::layer_norm(&t[0], &t[1], bias.then_some(&t[2]), 1e-5, k).unwrap()
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
pub(crate) fn finite_difference_check(x: &Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
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
    use crate::nn::Activation;
    let mut rng = Rng::new(4);
    for act in [Activation::Gelu, Activation::GeluTanh] {
        // Wide enough (±12) that the tanh form's exp saturates at both ends.
        let x = randn(&mut rng, &[4, 9, 33], DType::F32)
            .affine(4.0, 0.0)
            .unwrap();
        let g = randn(&mut rng, &[4, 9, 33], DType::F32);
        let r = both_paths(&[x], &g, &|t, k| act.apply(&t[0], k).unwrap());
        let (fwd, bwd) = (max_diff(&r[0].0, &r[1].0), max_diff(&r[0].1[0], &r[1].1[0]));
        assert!(fwd < 2e-6, "{act:?}: forward {fwd}");
        assert!(bwd < 1e-5, "{act:?}: backward {bwd}");
        let x = randn(&mut rng, &[2, 6], DType::F64)
            .affine(2.0, 0.0)
            .unwrap();
        let g = randn(&mut rng, &[2, 6], DType::F64);
        finite_difference_check(&x, &g, &|t| act.apply(t, Kernels::Fused).unwrap());
        // f64 against candle's own (scalar) forms.
        let ours = act.apply(&x, Kernels::Fused).unwrap();
        let theirs = act.apply(&x, Kernels::Composed).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-12, "{act:?}: f64 forward");
    }
}

/// (B, H, T, S, D, Dv)
type Dims = (usize, usize, usize, usize, usize, usize);

/// Context and the gradients of q, k and v of `sdpa` with the fused kernel and composed.
fn attention_both_paths(
    rng: &mut Rng,
    dims: Dims,
    opts: &crate::nn::SdpaOptions,
    dtype: DType,
) -> (f64, [f64; 3]) {
    let (b, h, t, s, d, dv) = dims;
    let q = randn(rng, &[b, h, t, d], dtype);
    let k = randn(rng, &[b, h, s, d], dtype);
    let v = randn(rng, &[b, h, s, dv], dtype);
    let g = randn(rng, &[b, h, t, dv], dtype);
    let r = both_paths(&[q, k, v], &g, &|x, kernels| {
        let opts = crate::nn::SdpaOptions { kernels, ..*opts };
        crate::nn::scaled_dot_product_attention(&x[0], &x[1], &x[2], &opts)
            .unwrap()
            .context
    });
    (
        max_diff(&r[0].0, &r[1].0),
        [0, 1, 2].map(|i| max_diff(&r[0].1[i], &r[1].1[i])),
    )
}

#[test]
fn fused_attention_matches_composed_with_every_mask() {
    use crate::nn::{AttnMask, SdpaOptions};
    let mut rng = Rng::new(5);
    let dev = Device::Cpu;
    // Tiles of 64: these sizes give partial tiles, several tiles, and a KV-cache offset.
    let causal = SdpaOptions {
        causal: true,
        ..Default::default()
    };
    let plain = SdpaOptions::default();
    // Batch 1 has every key padded: its rows must come out as zeros on both paths.
    let kpm = AttnMask::from_lengths(&[150, 0, 37], 150, &dev).unwrap();
    let padded = SdpaOptions {
        key_padding_mask: Some(&kpm),
        causal: false,
        ..Default::default()
    };
    let mut blocks = vec![0u8; 70 * 70];
    for (i, m) in blocks.iter_mut().enumerate() {
        *m = u8::from((i * 7919) % 5 == 0);
    }
    let block = AttnMask::Block(Tensor::from_vec(blocks, (70, 70), &dev).unwrap());
    let additive = AttnMask::Additive(
        randn(&mut rng, &[2 * 3, 70, 70], DType::F32)
            .affine(0.5, 0.0)
            .unwrap(),
    );
    type Case<'a> = (&'a str, Dims, SdpaOptions<'a>);
    let cases: Vec<Case> = vec![
        ("causal", (2, 3, 70, 70, 16, 8), causal),
        ("causal with cache offset", (2, 2, 5, 80, 16, 16), causal),
        ("causal, several tiles", (1, 2, 130, 130, 8, 8), causal),
        ("no mask", (2, 2, 130, 150, 16, 24), plain),
        ("fewer keys than queries", (2, 2, 70, 9, 8, 8), plain),
        ("key padding", (3, 2, 20, 150, 8, 8), padded),
        // Up to four queries take the untiled path (decoding steps).
        ("one query after a cache", (2, 3, 1, 150, 16, 8), causal),
        ("four queries after a cache", (1, 2, 4, 77, 8, 12), causal),
        ("one query, key padding", (3, 2, 1, 150, 8, 8), padded),
        ("three queries, no mask", (2, 2, 3, 9, 5, 3), plain),
        (
            "bool (T, S) mask and causal",
            (2, 3, 70, 70, 8, 8),
            SdpaOptions {
                attn_mask: Some(&block),
                causal: true,
                ..Default::default()
            },
        ),
        (
            "additive (B·H, T, S) mask",
            (2, 3, 70, 70, 8, 8),
            SdpaOptions {
                attn_mask: Some(&additive),
                ..Default::default()
            },
        ),
        (
            "custom scale",
            (1, 1, 9, 9, 4, 4),
            SdpaOptions {
                scale: Some(0.3),
                causal: true,
                ..Default::default()
            },
        ),
    ];
    for (name, dims, opts) in cases {
        let (fwd, grads) = attention_both_paths(&mut rng, dims, &opts, DType::F32);
        assert!(fwd < 2e-6, "{name}: forward differs by {fwd}");
        for (which, d) in ["q", "k", "v"].iter().zip(grads) {
            assert!(d < 2e-5, "{name}: grad of {which} differs by {d}");
        }
    }
}

#[test]
fn fused_attention_reads_strided_inputs_and_zeroes_masked_rows() {
    let mut rng = Rng::new(6);
    // (B, T, H, D) transposed to (B, H, T, D): not contiguous.
    let q = randn(&mut rng, &[2, 10, 3, 8], DType::F32);
    let k = randn(&mut rng, &[2, 12, 3, 8], DType::F32);
    let v = randn(&mut rng, &[2, 12, 3, 8], DType::F32);
    let (qt, kt, vt) = (
        q.transpose(1, 2).unwrap(),
        k.transpose(1, 2).unwrap(),
        v.transpose(1, 2).unwrap(),
    );
    assert!(!qt.is_contiguous());
    let mut bias = vec![0f32; 2 * 12];
    bias[12..].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    let opts = super::attention::FlashOptions {
        scale: 0.25,
        causal: false,
        bias: Some(Tensor::from_vec(bias, (2, 1, 1, 12), &Device::Cpu).unwrap()),
        dropout: None,
    };
    let fused = super::attention::attention(&qt, &kt, &vt, &opts).unwrap();
    let reference = super::attention::attention(
        &qt.contiguous().unwrap(),
        &kt.contiguous().unwrap(),
        &vt.contiguous().unwrap(),
        &opts,
    )
    .unwrap();
    assert_eq!(fused.dims(), &[2, 3, 10, 8]);
    assert!(max_diff(&fused, &reference) == 0.0);
    let masked = fused.get(1).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(masked.to_scalar::<f32>().unwrap(), 0.0);
    let kept = fused.get(0).unwrap().abs().unwrap().sum_all().unwrap();
    assert!(kept.to_scalar::<f32>().unwrap() > 0.0);
}

/// The forward of a decoding step (two queries after five cached keys) writes the
/// log-sum-exp that the backward reads.
fn few_queries_backward_matches_finite_differences(rng: &mut Rng) {
    let (b, h, t, s, d) = (1, 2, 2, 7, 3);
    let q = randn(rng, &[b, h, t, d], DType::F64);
    let k = randn(rng, &[b, h, s, d], DType::F64);
    let v = randn(rng, &[b, h, s, d], DType::F64);
    let g = randn(rng, &[b, h, t, d], DType::F64);
    let opts = super::attention::FlashOptions {
        scale: 0.6,
        causal: true,
        bias: None,
        dropout: None,
    };
    let f =
        |q: &Tensor, k: &Tensor, v: &Tensor| super::attention::attention(q, k, v, &opts).unwrap();
    finite_difference_check(&q, &g, &|x| f(x, &k, &v));
    finite_difference_check(&k, &g, &|x| f(&q, x, &v));
    finite_difference_check(&v, &g, &|x| f(&q, &k, x));
}

#[test]
fn fused_attention_backward_matches_finite_differences_f64() {
    let mut rng = Rng::new(7);
    // Five queries take the tiled path; the untiled one (up to four) is checked below.
    let (b, h, t, s, d) = (1, 2, 5, 7, 3);
    few_queries_backward_matches_finite_differences(&mut rng);
    let q = randn(&mut rng, &[b, h, t, d], DType::F64);
    let k = randn(&mut rng, &[b, h, s, d], DType::F64);
    let v = randn(&mut rng, &[b, h, s, d], DType::F64);
    let g = randn(&mut rng, &[b, h, t, d], DType::F64);
    let mut bias = vec![0f64; t * s];
    bias[3] = f64::NEG_INFINITY;
    bias[10] = 0.7;
    let bias = Tensor::from_vec(bias, (1, 1, t, s), &Device::Cpu).unwrap();
    // Dropout with a fixed seed is a fixed function of the inputs, so its backward can be
    // checked too: the mask must be the forward's.
    for dropout in [None, Some((0.3, 11u64))] {
        let opts = super::attention::FlashOptions {
            scale: 0.6,
            causal: true,
            bias: Some(bias.clone()),
            dropout,
        };
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            super::attention::attention(q, k, v, &opts).unwrap()
        };
        finite_difference_check(&q, &g, &|x| f(x, &k, &v));
        finite_difference_check(&k, &g, &|x| f(&q, x, &v));
        finite_difference_check(&v, &g, &|x| f(&q, &k, x));
    }
}

#[test]
fn fused_attention_dropout_drops_p_and_rescales() {
    let (b, h, t, s) = (2, 4, 64, 64);
    let q = Tensor::zeros((b, h, t, 4), DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::zeros((b, h, s, 4), DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::ones((b, h, s, 1), DType::F32, &Device::Cpu).unwrap();
    let run = |p: f64, seed: u64| {
        let opts = super::attention::FlashOptions {
            scale: 1.0,
            causal: false,
            bias: None,
            dropout: Some((p, seed)),
        };
        super::attention::attention(&q, &k, &v, &opts)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    // Uniform weights 1/64 over ones: each output is (kept keys / 64) / (1 - p).
    let out = run(0.25, 1);
    let mean = out.iter().sum::<f32>() / out.len() as f32;
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    let kept: f32 = out.iter().map(|o| o * 0.75 * 64.0).sum::<f32>() / (out.len() * 64) as f32;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    assert_eq!(out, run(0.25, 1), "same seed, same mask");
    assert_ne!(out, run(0.25, 2), "another seed, another mask");
}

#[test]
fn fused_cross_entropy_matches_composed_and_finite_differences() {
    use crate::train::loss::{cross_entropy, CrossEntropyConfig};
    let mut rng = Rng::new(8);
    // Small (serial) and large (parallel) inputs; smoothing on and off; padding ignored.
    for (n, v, eps, ignore) in [
        (7, 11, 0.0, None),
        (7, 11, 0.1, Some(0u32)),
        (300, 500, 0.1, Some(3u32)),
    ] {
        let logits = randn(&mut rng, &[n, v], DType::F32)
            .affine(3.0, 0.0)
            .unwrap();
        let ids: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let targets = Tensor::from_vec(ids, n, &Device::Cpu).unwrap();
        let g = Tensor::new(1.7f32, &Device::Cpu).unwrap();
        let r = both_paths(&[logits], &g, &|x, kernels| {
            let cfg = CrossEntropyConfig {
                label_smoothing: eps,
                ignore_index: ignore,
                kernels,
            };
            cross_entropy(&x[0], &targets, &cfg).unwrap()
        });
        let (f, c) = (&r[0], &r[1]);
        assert!(
            max_diff(&f.0, &c.0) < 1e-5,
            "loss {n}x{v}: {}",
            max_diff(&f.0, &c.0)
        );
        assert!(max_diff(&f.1[0], &c.1[0]) < 1e-6, "grad {n}x{v}");
    }
    let x = randn(&mut rng, &[4, 6], DType::F64);
    let targets = Tensor::from_vec(vec![2u32, 0, 5, 9], 4, &Device::Cpu).unwrap();
    let g = randn(&mut rng, &[4], DType::F64);
    finite_difference_check(&x, &g, &|t| {
        super::cross_entropy::cross_entropy_rows(t, &targets, 0.2, Some(9)).unwrap()
    });
    // A target out of range (and not ignored) is an error, not a wrong loss.
    let err = super::cross_entropy::cross_entropy_rows(&x, &targets, 0.2, None).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn rms_norm_matches_composed_and_finite_differences() {
    let mut rng = Rng::new(12);
    for dims in [vec![2, 5, 16], vec![512, 128]] {
        let c = *dims.last().unwrap();
        let x = randn(&mut rng, &dims, DType::F32);
        let w = randn(&mut rng, &[c], DType::F32).affine(0.1, 1.0).unwrap();
        let g = randn(&mut rng, &dims, DType::F32);
        let r = both_paths(&[x, w], &g, &|t, k| {
            crate::nn::norm::rms_norm(&t[0], &t[1], 1e-6, k).unwrap()
        });
        assert!(max_diff(&r[0].0, &r[1].0) < 1e-5, "forward");
        for i in 0..2 {
            let d = max_diff(&r[0].1[i], &r[1].1[i]);
            assert!(d < 1e-4, "grad {i}: {d}");
        }
    }
    // The kernel's backward, in f64, with respect to the input and the weight.
    let x = randn(&mut rng, &[3, 7], DType::F64);
    let w = randn(&mut rng, &[7], DType::F64).affine(0.1, 1.0).unwrap();
    let g = randn(&mut rng, &[3, 7], DType::F64);
    finite_difference_check(&x, &g, &|t| layer_norm::rms_norm(t, &w, 1e-6).unwrap());
    finite_difference_check(&w, &g, &|t| layer_norm::rms_norm(&x, t, 1e-6).unwrap());
    // RMS norm by hand: x / sqrt(mean(x^2) + eps) * w.
    let v = x.to_vec2::<f64>().unwrap();
    let wv = w.to_vec1::<f64>().unwrap();
    let y = layer_norm::rms_norm(&x, &w, 1e-6)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for (row, out) in v.iter().zip(&y) {
        let rms = (row.iter().map(|a| a * a).sum::<f64>() / 7.0 + 1e-6).sqrt();
        for i in 0..7 {
            assert!((out[i] - row[i] / rms * wv[i]).abs() < 1e-12);
        }
    }
}

/// Grouped-query attention: key/value heads shared by groups of query heads, through the
/// fused kernel and the composed path (which repeats them), forward and gradients.
#[test]
fn fused_attention_with_grouped_kv_heads_matches_composed() {
    use crate::nn::SdpaOptions;
    let mut rng = Rng::new(13);
    let causal = SdpaOptions {
        causal: true,
        ..Default::default()
    };
    // (B, H, Hkv, T, S, D): grouped, multi-query (Hkv = 1), with a cache offset.
    for (b, h, hkv, t, s, d) in [
        (2, 4, 2, 70, 70, 8),
        (1, 6, 1, 9, 9, 4),
        (2, 4, 2, 3, 20, 8),
    ] {
        let q = randn(&mut rng, &[b, h, t, d], DType::F32);
        let k = randn(&mut rng, &[b, hkv, s, d], DType::F32);
        let v = randn(&mut rng, &[b, hkv, s, d], DType::F32);
        let g = randn(&mut rng, &[b, h, t, d], DType::F32);
        let r = both_paths(&[q.clone(), k.clone(), v.clone()], &g, &|x, kernels| {
            let opts = SdpaOptions { kernels, ..causal };
            crate::nn::scaled_dot_product_attention(&x[0], &x[1], &x[2], &opts)
                .unwrap()
                .context
        });
        let case = format!("H {h}, Hkv {hkv}, T {t}, S {s}");
        assert!(max_diff(&r[0].0, &r[1].0) < 2e-6, "{case}: forward");
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            assert_eq!(r[0].1[i].dims(), r[1].1[i].dims(), "{case}: d{name} shape");
            let diff = max_diff(&r[0].1[i], &r[1].1[i]);
            assert!(diff < 2e-5, "{case}: d{name} differs by {diff}");
        }
        // The same as ordinary attention over explicitly repeated key/value heads.
        let group = h / hkv;
        let rep = |x: &Tensor| crate::nn::attention::repeat_kv(x, group).unwrap();
        let full = crate::nn::scaled_dot_product_attention(&q, &rep(&k), &rep(&v), &causal)
            .unwrap()
            .context;
        assert!(max_diff(&r[0].0, &full) < 2e-6, "{case}: vs repeated heads");
    }
    // The kernel's backward by finite differences in f64 (each group sums its heads' dK, dV).
    let (b, h, hkv, t, s, d) = (1, 4, 2, 5, 7, 3);
    let q = randn(&mut rng, &[b, h, t, d], DType::F64);
    let k = randn(&mut rng, &[b, hkv, s, d], DType::F64);
    let v = randn(&mut rng, &[b, hkv, s, d], DType::F64);
    let g = randn(&mut rng, &[b, h, t, d], DType::F64);
    let opts = super::attention::FlashOptions {
        scale: 0.6,
        causal: true,
        bias: None,
        dropout: Some((0.2, 5)),
    };
    let f =
        |q: &Tensor, k: &Tensor, v: &Tensor| super::attention::attention(q, k, v, &opts).unwrap();
    finite_difference_check(&q, &g, &|x| f(x, &k, &v));
    finite_difference_check(&k, &g, &|x| f(&q, x, &v));
    finite_difference_check(&v, &g, &|x| f(&q, &k, x));
    // Key/value heads that do not divide the query heads are refused.
    let k3 = randn(&mut rng, &[b, 3, s, d], DType::F64);
    assert!(crate::nn::scaled_dot_product_attention(&q, &k3, &k3, &Default::default()).is_err());
}
