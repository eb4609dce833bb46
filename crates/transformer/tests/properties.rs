//! Properties every model must have, whatever its weights:
//! (a) tokens at padded positions never change the outputs at real positions;
//! (b) incremental (cached) decoding equals the full causal forward;
//! (c) a row computed alone equals the same row inside a (padded) batch;
//! (d) a fully masked query row gives zero weights and no NaN, forward and backward;
//! (e) initialization is seeded and follows its scheme (Xavier bounds, GPT-2 std and scaling);
//! (f) configs and saved models round-trip exactly.
//!
//! Dimension letters: `B` batch, `S` source length, `T` target length, `E` d_model, `V` vocab.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, rand_ids, randn, to_vec};
use transformer::models::{
    config_from_json, save_model, DecoderOnly, DecoderOnlyConfig, EncoderDecoder,
    EncoderDecoderConfig, EncoderOnly, EncoderOnlyConfig, Pooling,
};
use transformer::nn::{
    scaled_dot_product_attention, Activation, AttnMask, InitScheme, Masks, MhaConfig, MhaInput,
    MultiHeadAttention, NeedWeights, PositionalKind, SdpaOptions, VarStore,
};
use transformer::rng::Rng;
use transformer::Result;

/// f32 outputs that should be equal up to reduction order.
const TOL: f64 = 1e-5;

fn cpu() -> Device {
    Device::Cpu
}

/// A small encoder-decoder with distinct source and target vocabularies, untied output and
/// dropout 0.1 (inactive outside training, which these tests also pin).
fn enc_dec_config(positional: PositionalKind) -> EncoderDecoderConfig {
    EncoderDecoderConfig {
        src_vocab_size: 40,
        tgt_vocab_size: 30,
        d_model: 32,
        n_heads: 4,
        d_ff: 64,
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        max_len: 64,
        positional,
        share_embeddings: false,
        tie_output: false,
        ..EncoderDecoderConfig::tiny(40)
    }
}

/// A tiny decoder-only model with Xavier init, so that logits are O(1) and a wrong position or
/// cache shows up far above the tolerance.
fn dec_only_config(positional: PositionalKind) -> DecoderOnlyConfig {
    DecoderOnlyConfig {
        positional,
        bias: true,
        init: InitScheme::XavierUniform,
        ..DecoderOnlyConfig::tiny(50)
    }
}

fn ids_tensor(v: Vec<u32>, b: usize, t: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (b, t), &cpu())?)
}

/// Copy of `ids` (B, T) with every position at or past `lens[b]` redrawn from `[lo, hi)`.
fn redraw_padding(ids: &Tensor, lens: &[usize], rng: &mut Rng, lo: u32, hi: u32) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let mut v = ids.flatten_all()?.to_vec1::<u32>()?;
    for (row, &len) in lens.iter().enumerate() {
        for j in len..t {
            let old = v[row * t + j];
            let mut new = old;
            while new == old {
                new = lo + (rng.next_u64() % u64::from(hi - lo)) as u32;
            }
            v[row * t + j] = new;
        }
    }
    ids_tensor(v, b, t)
}

/// max |a - b| over the first `lens[b]` positions of every row of (B, T, ...) tensors.
fn max_diff_valid(a: &Tensor, b: &Tensor, lens: &[usize]) -> Result<f64> {
    let mut m = 0f64;
    for (row, &len) in lens.iter().enumerate() {
        if len > 0 {
            let (ra, rb) = (
                a.get(row)?.narrow(0, 0, len)?,
                b.get(row)?.narrow(0, 0, len)?,
            );
            m = m.max(max_abs_diff(&ra, &rb)?);
        }
    }
    Ok(m)
}

fn assert_finite(what: &str, t: &Tensor) -> Result<()> {
    let v = to_vec(t)?;
    assert!(
        v.iter().all(|x| x.is_finite()),
        "{what} has non-finite values: {v:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) padding tokens do not change the outputs at real positions

#[test]
fn encoder_decoder_ignores_tokens_at_padded_positions() -> Result<()> {
    let mut rng = Rng::new(1);
    let cfg = enc_dec_config(PositionalKind::Sinusoidal);
    let (model, _vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 1)?;
    let (src_lens, tgt_lens) = ([7, 4, 1], [5, 3, 2]);
    let (s, t) = (7, 5);
    let src = rand_ids(&mut rng, 3, s, 1, 40)?; // (B, S)
    let tgt = rand_ids(&mut rng, 3, t, 1, 30)?; // (B, T)
    let src_pad = AttnMask::from_lengths(&src_lens, s, &cpu())?;
    let tgt_pad = AttnMask::from_lengths(&tgt_lens, t, &cpu())?;
    let logits = model.forward(&src, &tgt, Some(&src_pad), Some(&tgt_pad), false)?; // (B, T, V)

    let src2 = redraw_padding(&src, &src_lens, &mut rng, 0, 40)?;
    let tgt2 = redraw_padding(&tgt, &tgt_lens, &mut rng, 0, 30)?;
    let logits2 = model.forward(&src2, &tgt2, Some(&src_pad), Some(&tgt_pad), false)?;
    let diff = max_diff_valid(&logits, &logits2, &tgt_lens)?;
    println!("encoder-decoder, padding redrawn: max diff {diff:.2e}");
    assert!(diff <= TOL, "padded tokens changed the logits by {diff}");

    // Sanity: a real source token does change the outputs.
    let mut v = src.flatten_all()?.to_vec1::<u32>()?;
    v[0] = if v[0] == 1 { 2 } else { 1 };
    let logits3 = model.forward(
        &ids_tensor(v, 3, s)?,
        &tgt,
        Some(&src_pad),
        Some(&tgt_pad),
        false,
    )?;
    assert!(max_diff_valid(&logits, &logits3, &[tgt_lens[0], 0, 0])? > 1e-3);
    Ok(())
}

#[test]
fn encoder_only_ignores_tokens_at_padded_positions() -> Result<()> {
    let mut rng = Rng::new(2);
    let cfg = EncoderOnlyConfig {
        pooling: Pooling::Mean,
        pooler: true,
        n_classes: Some(3),
        ..EncoderOnlyConfig::tiny(40)
    };
    let (model, _vs) = EncoderOnly::init(&cfg, DType::F32, &cpu(), 2)?;
    let lens = [6, 2, 4];
    let t = 6;
    let ids = rand_ids(&mut rng, 3, t, 1, 40)?; // (B, T)
    let pad = AttnMask::from_lengths(&lens, t, &cpu())?;
    let ids2 = redraw_padding(&ids, &lens, &mut rng, 0, 40)?;

    let h = model.forward(&ids, None, Some(&pad), false)?; // (B, T, E)
    let h2 = model.forward(&ids2, None, Some(&pad), false)?;
    let diff = max_diff_valid(&h, &h2, &lens)?;
    let pooled = max_abs_diff(&model.pool(&h, Some(&pad))?, &model.pool(&h2, Some(&pad))?)?;
    let logits = max_abs_diff(
        &model.classify(&ids, Some(&pad), false)?,
        &model.classify(&ids2, Some(&pad), false)?,
    )?;
    println!("encoder-only, padding redrawn: hidden {diff:.2e}, mean-pooled {pooled:.2e}, logits {logits:.2e}");
    assert!(diff <= TOL && pooled <= TOL && logits <= TOL);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (b) cached decoding equals the full causal forward

#[test]
fn decoder_only_cached_decoding_equals_full_forward() -> Result<()> {
    for (i, pos) in [
        PositionalKind::Learned,
        PositionalKind::Rope,
        PositionalKind::Sinusoidal,
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(10 + i as u64);
        let cfg = dec_only_config(pos);
        let (model, _vs) = DecoderOnly::init(&cfg, DType::F32, &cpu(), 3)?;
        let (b, t) = (2, 12);
        let ids = rand_ids(&mut rng, b, t, 0, 50)?; // (B, T)
        let full = model.forward(&ids, false)?; // (B, T, V)

        // One token at a time.
        let mut caches = model.new_cache();
        let mut steps = Vec::new();
        for j in 0..t {
            steps.push(model.forward_cached(&ids.narrow(1, j, 1)?, &mut caches)?);
            // (B, 1, V)
        }
        assert!(caches.iter().all(|c| c.len() == t));
        let one_by_one = Tensor::cat(&steps, 1)?;

        // Uneven chunks: a prompt of 5, then 1, then 6 (T > 1 against a non-empty cache).
        let mut caches = model.new_cache();
        let mut chunks = Vec::new();
        for (start, len) in [(0, 5), (5, 1), (6, 6)] {
            chunks.push(model.forward_cached(&ids.narrow(1, start, len)?, &mut caches)?);
        }
        let chunked = Tensor::cat(&chunks, 1)?;

        let scale = to_vec(&full)?.iter().fold(0f64, |m, x| m.max(x.abs()));
        let (d1, d2) = (
            max_abs_diff(&full, &one_by_one)?,
            max_abs_diff(&full, &chunked)?,
        );
        println!("decoder-only {pos:?}: max|logit| {scale:.2}, token by token {d1:.2e}, chunked {d2:.2e}");
        assert!(
            scale > 0.1,
            "logits too small for the comparison to mean anything"
        );
        assert!(
            d1 <= TOL && d2 <= TOL,
            "{pos:?}: cached decoding differs ({d1}, {d2})"
        );
    }
    Ok(())
}

#[test]
fn encoder_decoder_incremental_decoding_equals_teacher_forcing() -> Result<()> {
    for (i, pos) in [PositionalKind::Sinusoidal, PositionalKind::Learned]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(20 + i as u64);
        let cfg = EncoderDecoderConfig {
            init: InitScheme::XavierUniform,
            ..enc_dec_config(pos)
        };
        let (model, _vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 4)?;
        let (b, s, t) = (2, 6, 7);
        let src = rand_ids(&mut rng, b, s, 1, 40)?;
        let tgt = rand_ids(&mut rng, b, t, 1, 30)?;
        let src_pad = AttnMask::from_lengths(&[6, 3], s, &cpu())?;
        let mem_masks = Masks::none().with_key_padding(Some(&src_pad));
        let memory = model.encode(&src, &mem_masks, false)?; // (B, S, E)
        let full = model.decode(&tgt, &memory, &Masks::causal(), &mem_masks, false)?; // (B, T, V)

        let mut state = model.start_decoding(&memory)?;
        let mut steps = Vec::new();
        for j in 0..t {
            let (logits, _) = model.decode_step(
                &tgt.narrow(1, j, 1)?,
                &memory,
                Some(&src_pad),
                &mut state,
                NeedWeights::No,
            )?;
            steps.push(logits); // (B, 1, V)
        }
        assert_eq!(state.position, t);
        let d = max_abs_diff(&full, &Tensor::cat(&steps, 1)?)?;
        println!("encoder-decoder {pos:?}: step by step vs teacher forcing {d:.2e}");
        assert!(d <= TOL, "{pos:?}: incremental decoding differs by {d}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (c) a row alone equals the same row inside a padded batch

#[test]
fn decoder_only_row_alone_equals_row_in_padded_batch() -> Result<()> {
    for pos in [PositionalKind::Learned, PositionalKind::Rope] {
        let mut rng = Rng::new(30);
        let (model, _vs) = DecoderOnly::init(&dec_only_config(pos), DType::F32, &cpu(), 5)?;
        let lens = [10, 6, 3];
        let t = 10;
        let mut ids = rand_ids(&mut rng, 3, t, 1, 50)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        for (row, &len) in lens.iter().enumerate() {
            for j in len..t {
                ids[row * t + j] = 0; // right padding
            }
        }
        let batch_ids = ids_tensor(ids, 3, t)?;
        let batch = model.forward(&batch_ids, false)?; // (B, T, V)
        let mut worst = 0f64;
        for (row, &len) in lens.iter().enumerate() {
            let alone = model.forward(&batch_ids.narrow(0, row, 1)?.narrow(1, 0, len)?, false)?; // (1, len, V)
            worst = worst.max(max_abs_diff(
                &alone.get(0)?,
                &batch.get(row)?.narrow(0, 0, len)?,
            )?);
        }
        println!("decoder-only {pos:?}: row alone vs in batch {worst:.2e}");
        assert!(
            worst <= TOL,
            "{pos:?}: a row alone differs from the batch by {worst}"
        );
    }
    Ok(())
}

#[test]
fn encoder_decoder_row_alone_equals_row_in_padded_batch() -> Result<()> {
    let mut rng = Rng::new(31);
    let (model, _vs) = EncoderDecoder::init(
        &enc_dec_config(PositionalKind::Sinusoidal),
        DType::F32,
        &cpu(),
        6,
    )?;
    let (src_lens, tgt_lens) = ([5, 3, 4], [4, 2, 3]);
    let (s, t) = (5, 4);
    let src = redraw_padding(&rand_ids(&mut rng, 3, s, 1, 40)?, &[s; 3], &mut rng, 1, 40)?;
    let tgt = rand_ids(&mut rng, 3, t, 1, 30)?;
    let src_pad = AttnMask::from_lengths(&src_lens, s, &cpu())?;
    let tgt_pad = AttnMask::from_lengths(&tgt_lens, t, &cpu())?;
    let batch = model.forward(&src, &tgt, Some(&src_pad), Some(&tgt_pad), false)?; // (B, T, V)
    let mut worst = 0f64;
    for row in 0..3 {
        let src_row = src.narrow(0, row, 1)?.narrow(1, 0, src_lens[row])?; // (1, S_b)
        let tgt_row = tgt.narrow(0, row, 1)?.narrow(1, 0, tgt_lens[row])?; // (1, T_b)
        let alone = model.forward(&src_row, &tgt_row, None, None, false)?; // (1, T_b, V)
        let d = max_abs_diff(
            &alone.get(0)?,
            &batch.get(row)?.narrow(0, 0, tgt_lens[row])?,
        )?;
        worst = worst.max(d);
    }
    println!("encoder-decoder: unpadded row alone vs padded batch {worst:.2e}");
    assert!(
        worst <= TOL,
        "a row alone differs from the padded batch by {worst}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (d) fully masked query rows

#[test]
fn fully_masked_query_row_gives_zero_weights_and_no_nan() -> Result<()> {
    let mut rng = Rng::new(40);
    let (b, h, t, s, d) = (2, 2, 3, 4, 4);
    let q = Var::from_tensor(&randn(&mut rng, &[b, h, t, d], 1.0, DType::F32)?)?;
    let k = Var::from_tensor(&randn(&mut rng, &[b, h, s, d], 1.0, DType::F32)?)?;
    let v = Var::from_tensor(&randn(&mut rng, &[b, h, s, d], 1.0, DType::F32)?)?;
    // Query 1 may attend to nothing (Allow convention: 1 = may attend).
    let allow: Vec<u8> = vec![1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1];
    let mask = AttnMask::Allow(Tensor::from_vec(allow, (t, s), &cpu())?);
    let out = scaled_dot_product_attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        &SdpaOptions {
            attn_mask: Some(&mask),
            need_weights: true,
            ..Default::default()
        },
    )?;
    let w = out.weights.clone().expect("weights were requested"); // (B, H, T, S)
    assert_finite("weights", &w)?;
    assert_finite("context", &out.context)?;
    let row1 = to_vec(&w.narrow(2, 1, 1)?)?;
    assert!(
        row1.iter().all(|&x| x == 0.0),
        "masked row weights: {row1:?}"
    );
    assert!(to_vec(&out.context.narrow(2, 1, 1)?)?
        .iter()
        .all(|&x| x == 0.0));
    for x in to_vec(&w.sum(3)?.narrow(2, 0, 1)?)? {
        assert!((x - 1.0).abs() < 1e-6, "an unmasked row sums to {x}");
    }
    let grads = (out.context.sum_all()? + w.sqr()?.sum_all()?)?.backward()?;
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let g = grads
            .get(var.as_tensor())
            .expect("gradient reaches the input");
        assert_finite(&format!("d/d{name}"), g)?;
    }

    // Multi-head attention with a batch row whose keys are all padding: per-head weights of 0,
    // and the context of that row is the output projection's bias alone.
    let vs = VarStore::new(DType::F32, &cpu(), InitScheme::XavierUniform, 7);
    let mha = MultiHeadAttention::new(&MhaConfig::new(8, 2), &vs.root())?;
    common::randomize_params(&vs, &mut rng, 0.5)?;
    let x = Var::from_tensor(&randn(&mut rng, &[b, t, 8], 1.0, DType::F32)?)?;
    let pad = AttnMask::from_lengths(&[t, 0], t, &cpu())?;
    let out = mha.forward(
        MhaInput::self_attn(x.as_tensor())
            .key_padding_mask(Some(&pad))
            .causal(true)
            .need_weights(NeedWeights::PerHead),
    )?;
    let w = out.weights.expect("weights were requested"); // (B, H, T, T)
    assert!(to_vec(&w.get(1)?)?.iter().all(|&x| x == 0.0));
    assert_finite("mha context", &out.context)?;
    let bias = vs.get("out_proj.bias").expect("out_proj.bias exists");
    let expect = bias.as_tensor().reshape((1, 8))?.broadcast_as((t, 8))?;
    assert!(max_abs_diff(&out.context.get(1)?, &expect)? == 0.0);
    let grads = out.context.sqr()?.sum_all()?.backward()?;
    assert_finite(
        "mha d/dx",
        grads.get(x.as_tensor()).expect("gradient reaches x"),
    )?;
    for (name, var) in vs.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            assert_finite(&name, g)?;
        }
    }

    // A whole model with an all-padding sequence stays finite.
    let cfg = EncoderOnlyConfig {
        pooling: Pooling::Mean,
        n_classes: Some(2),
        ..EncoderOnlyConfig::tiny(20)
    };
    let (model, _vs) = EncoderOnly::init(&cfg, DType::F32, &cpu(), 8)?;
    let ids = rand_ids(&mut rng, 2, 5, 1, 20)?;
    let pad = AttnMask::from_lengths(&[5, 0], 5, &cpu())?;
    assert_finite(
        "encoder-only logits",
        &model.classify(&ids, Some(&pad), false)?,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (e) initialization

fn tensors_f64(vs: &VarStore) -> Result<BTreeMap<String, Vec<f64>>> {
    vs.tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, to_vec(&t)?)))
        .collect()
}

#[test]
fn same_seed_same_parameters_different_seed_different() -> Result<()> {
    type Init = fn(u64) -> Result<VarStore>;
    let families: [(&str, Init); 3] = [
        ("encoder-decoder", |seed| {
            Ok(EncoderDecoder::init(
                &enc_dec_config(PositionalKind::Learned),
                DType::F32,
                &cpu(),
                seed,
            )?
            .1)
        }),
        ("decoder-only", |seed| {
            Ok(DecoderOnly::init(&DecoderOnlyConfig::tiny(50), DType::F32, &cpu(), seed)?.1)
        }),
        ("encoder-only", |seed| {
            Ok(EncoderOnly::init(&EncoderOnlyConfig::tiny(50), DType::F32, &cpu(), seed)?.1)
        }),
    ];
    for (name, init) in families {
        let store = init(42)?;
        let a = tensors_f64(&store)?;
        let b = tensors_f64(&init(42)?)?;
        assert_eq!(a, b, "{name}: the same seed gave different parameters");
        let c = tensors_f64(&init(43)?)?;
        assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
        // Every matrix is random under both schemes; vectors may be constant (norms, biases).
        let mut n_matrices = 0;
        for (k, va) in &a {
            if store.get(k).expect("listed").dims().len() >= 2 {
                n_matrices += 1;
                assert_ne!(va, &c[k], "{name}: {k} is the same under seeds 42 and 43");
            }
        }
        assert!(n_matrices >= 5, "{name}: only {n_matrices} matrices");
    }
    Ok(())
}

#[test]
fn xavier_uniform_init_respects_its_bounds() -> Result<()> {
    let cfg = enc_dec_config(PositionalKind::Learned);
    let (_model, vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 9)?;
    let mut n_checked = 0;
    for (name, t) in vs.tensors() {
        let v = to_vec(&t)?;
        let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        match *t.dims() {
            // xavier_uniform_: U(±√(6 / (fan_in + fan_out))), fans of an (out, in) matrix.
            [out, inp] => {
                let bound = (6.0 / (out + inp) as f64).sqrt();
                assert!(
                    max <= bound * (1.0 + 1e-6),
                    "{name}: max |w| {max} > bound {bound}"
                );
                assert!(
                    max >= 0.95 * bound,
                    "{name}: max |w| {max} far below bound {bound}"
                );
                n_checked += 1;
            }
            [_] if name.contains("norm") && name.ends_with("weight") => {
                assert!(v.iter().all(|&x| x == 1.0), "{name} is not all ones")
            }
            [_] if name.contains("norm") || name.contains("attn") => {
                // Norm biases and attention biases (nn.MultiheadAttention) start at zero.
                assert!(v.iter().all(|&x| x == 0.0), "{name} is not all zeros")
            }
            [_] => {
                // nn.Linear's bias: U(±1/√fan_in).
                let fan_in = if name.contains("linear2") {
                    cfg.d_ff
                } else {
                    cfg.d_model
                };
                let bound = 1.0 / (fan_in as f64).sqrt();
                assert!(
                    max <= bound * (1.0 + 1e-6) && max > 0.5 * bound,
                    "{name}: max {max}, bound {bound}"
                );
            }
            _ => panic!("{name}: unexpected rank {:?}", t.dims()),
        }
    }
    assert!(n_checked >= 20, "only {n_checked} matrices checked");
    Ok(())
}

fn std_of(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
}

/// Every matrix has std ≈ 0.02, except the projections into the residual stream (attention
/// `out_proj`, `ff.linear2`), which have 0.02/√(2·n_layers); biases are zero.
fn check_gpt2_init(what: &str, vs: &VarStore, n_layers: usize) -> Result<()> {
    let residual_std = 0.02 / (2.0 * n_layers as f64).sqrt();
    let (mut n_plain, mut n_residual) = (0, 0);
    for (name, t) in vs.tensors() {
        let v = to_vec(&t)?;
        if t.dims().len() == 2 {
            let is_residual =
                name.ends_with("out_proj.weight") || name.ends_with("ff.linear2.weight");
            let expect = if is_residual { residual_std } else { 0.02 };
            let std = std_of(&v);
            // At least 1024 samples each: the std's own relative error is < 2.3%.
            assert!(
                (std / expect - 1.0).abs() < 0.1,
                "{what} {name}: std {std:.5}, expected {expect:.5}"
            );
            if is_residual {
                n_residual += 1
            } else {
                n_plain += 1
            }
        } else if name.contains("norm") && name.ends_with("weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{what} {name} is not all ones");
        } else {
            assert!(
                v.iter().all(|&x| x == 0.0),
                "{what} {name}: GPT-2 biases start at zero"
            );
        }
    }
    println!("{what}: {n_plain} matrices at std 0.02, {n_residual} residual at {residual_std:.5}");
    assert!(n_plain >= 4 && n_residual >= 4);
    Ok(())
}

#[test]
fn gpt2_init_std_and_residual_scaling() -> Result<()> {
    let cfg = DecoderOnlyConfig {
        bias: true,
        ..DecoderOnlyConfig::tiny(50)
    };
    assert_eq!(cfg.init, InitScheme::Gpt2);
    let (_m, vs) = DecoderOnly::init(&cfg, DType::F32, &cpu(), 10)?;
    check_gpt2_init("decoder-only", &vs, cfg.n_layers)?;

    // The encoder-decoder counts both stacks: 0.02/√(2·(2 + 2)), cross-attention included.
    let cfg = EncoderDecoderConfig {
        init: InitScheme::Gpt2,
        ..enc_dec_config(PositionalKind::Learned)
    };
    let (_m, vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 11)?;
    check_gpt2_init(
        "encoder-decoder",
        &vs,
        cfg.n_encoder_layers + cfg.n_decoder_layers,
    )
}

// ---------------------------------------------------------------------------------------------
// (f) config and model round trips

fn round_trip<T>(what: &str, cfg: &T) -> Result<()>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string_pretty(cfg).expect("configs serialize");
    let back: T = config_from_json(&text, what)?;
    assert_eq!(&back, cfg, "{what} changed in a JSON round trip:\n{text}");
    Ok(())
}

#[test]
fn configs_and_presets_round_trip_through_json() -> Result<()> {
    let base = EncoderDecoderConfig::base(37000);
    assert_eq!(
        (
            base.d_model,
            base.n_heads,
            base.d_ff,
            base.n_encoder_layers,
            base.n_decoder_layers
        ),
        (512, 8, 2048, 6, 6)
    );
    assert_eq!(base.dropout, 0.1);
    assert_eq!(base.activation, Activation::Relu);
    assert!(!base.norm_first && base.share_embeddings && base.tie_output && base.scale_embeddings);
    assert_eq!(base.positional, PositionalKind::Sinusoidal);
    let json: serde_json::Value = serde_json::to_value(&base).expect("serializes");
    assert_eq!(json["d_model"], 512);
    assert_eq!(json["positional"], "sinusoidal");
    assert_eq!(json["init"], "xavier_uniform");

    for name in ["base", "big", "tiny"] {
        let cfg = EncoderDecoderConfig::preset(name, 1000)?;
        cfg.validate()?;
        round_trip(&format!("encoder-decoder {name}"), &cfg)?;
    }
    for name in ["shakespeare_char", "gpt2_small", "tiny"] {
        let cfg = DecoderOnlyConfig::preset(name, 65)?;
        cfg.validate()?;
        round_trip(&format!("decoder-only {name}"), &cfg)?;
    }
    for name in ["bert_base", "minilm_l6", "tiny"] {
        let cfg = EncoderOnlyConfig::preset(name, 30522)?;
        cfg.validate()?;
        round_trip(&format!("encoder-only {name}"), &cfg)?;
    }
    // Every non-default enum variant survives too.
    round_trip(
        "encoder-decoder variants",
        &EncoderDecoderConfig {
            activation: Activation::GeluTanh,
            norm_first: true,
            positional: PositionalKind::Learned,
            init: InitScheme::Gpt2,
            ..enc_dec_config(PositionalKind::None)
        },
    )?;
    round_trip(
        "decoder-only variants",
        &DecoderOnlyConfig {
            positional: PositionalKind::Rope,
            rope_theta: 500000.0,
            activation: Activation::Relu,
            init: InitScheme::XavierUniform,
            tie_embeddings: false,
            ..DecoderOnlyConfig::tiny(50)
        },
    )?;
    round_trip(
        "encoder-only variants",
        &EncoderOnlyConfig {
            pooling: Pooling::Mean,
            n_classes: Some(4),
            type_vocab_size: 0,
            ..EncoderOnlyConfig::tiny(50)
        },
    )?;

    // Fields with defaults may be left out of the file.
    let minimal = r#"{"src_vocab_size": 100, "tgt_vocab_size": 100, "d_model": 512, "n_heads": 8,
        "d_ff": 2048, "n_encoder_layers": 6, "n_decoder_layers": 6, "dropout": 0.1,
        "max_len": 1024, "share_embeddings": true, "tie_output": true}"#;
    let cfg: EncoderDecoderConfig = config_from_json(minimal, "minimal")?;
    assert_eq!(cfg, EncoderDecoderConfig::base(100));
    Ok(())
}

/// A scratch directory unique to this process and test; removed by the caller.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("transformer-props-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn assert_same_store(what: &str, a: &VarStore, b: &VarStore) -> Result<()> {
    assert_eq!(
        tensors_f64(a)?,
        tensors_f64(b)?,
        "{what}: loaded parameters differ"
    );
    Ok(())
}

#[test]
fn saved_models_load_with_identical_outputs() -> Result<()> {
    let mut rng = Rng::new(50);

    // Encoder-decoder: learned positions, separate embeddings, untied generator.
    let dir = scratch_dir("enc-dec");
    let cfg = enc_dec_config(PositionalKind::Learned);
    let (model, vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 12)?;
    let src = rand_ids(&mut rng, 2, 5, 1, 40)?;
    let tgt = rand_ids(&mut rng, 2, 4, 1, 30)?;
    let pad = AttnMask::from_lengths(&[5, 3], 5, &cpu())?;
    save_model(&dir, &cfg, &vs)?;
    let (loaded, lvs) = EncoderDecoder::load(&dir, &cpu())?;
    assert_eq!(loaded.config(), &cfg);
    assert_same_store("encoder-decoder", &vs, &lvs)?;
    let (a, b) = (
        model.forward(&src, &tgt, Some(&pad), None, false)?,
        loaded.forward(&src, &tgt, Some(&pad), None, false)?,
    );
    assert_eq!(
        to_vec(&a)?,
        to_vec(&b)?,
        "encoder-decoder outputs differ after loading"
    );
    std::fs::remove_dir_all(&dir).ok();

    // Decoder-only: RoPE, untied head, biases.
    let dir = scratch_dir("dec-only");
    let cfg = DecoderOnlyConfig {
        tie_embeddings: false,
        ..dec_only_config(PositionalKind::Rope)
    };
    let (model, vs) = DecoderOnly::init(&cfg, DType::F32, &cpu(), 13)?;
    let ids = rand_ids(&mut rng, 2, 6, 0, 50)?;
    save_model(&dir, &cfg, &vs)?;
    let (loaded, lvs) = DecoderOnly::load(&dir, &cpu())?;
    assert_eq!(loaded.config(), &cfg);
    assert_same_store("decoder-only", &vs, &lvs)?;
    assert_eq!(
        to_vec(&model.forward(&ids, false)?)?,
        to_vec(&loaded.forward(&ids, false)?)?
    );
    std::fs::remove_dir_all(&dir).ok();

    // Encoder-only: token types, pooler and classifier.
    let dir = scratch_dir("enc-only");
    let cfg = EncoderOnlyConfig {
        n_classes: Some(3),
        ..EncoderOnlyConfig::tiny(50)
    };
    let (model, vs) = EncoderOnly::init(&cfg, DType::F32, &cpu(), 14)?;
    let ids = rand_ids(&mut rng, 2, 6, 0, 50)?;
    let pad = AttnMask::from_lengths(&[6, 4], 6, &cpu())?;
    save_model(&dir, &cfg, &vs)?;
    let (loaded, lvs) = EncoderOnly::load(&dir, &cpu())?;
    assert_eq!(loaded.config(), &cfg);
    assert_same_store("encoder-only", &vs, &lvs)?;
    assert_eq!(
        to_vec(&model.classify(&ids, Some(&pad), false)?)?,
        to_vec(&loaded.classify(&ids, Some(&pad), false)?)?
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
