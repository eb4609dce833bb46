//! Finite-difference gradient checks in f64 on tiny shapes (STYLE habit 5).
//!
//! Every check draws a random projection `g` of the output and compares candle's `backward()`
//! of L = sum(out · g) with central differences, for the inputs and every parameter (all
//! elements of small tensors, a random subset of larger ones; see `common::check_grads`).
//! Parameters are re-drawn at random first so that no check sits on a special point (zero
//! attention biases, unit norm weights).
//!
//! Dimension letters: `B` batch 2, `H` heads 2, `T` query positions 3, `S` key positions 4,
//! `D` head width 4, `E` d_model 8, `F` d_ff 12.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_grads, randn, randn_var, randomize_params};
use transformer::nn::{
    scaled_dot_product_attention, Activation, AttnMask, Conv1d, DecoderLayer, EncoderLayer,
    InitScheme, LayerConfig, LayerOptions, Masks, MhaConfig, MhaInput, Mlp, MultiHeadAttention,
    NeedWeights, Norm, Rope, SdpaOptions, VarStore,
};
use transformer::rng::Rng;
use transformer::Result;

const B: usize = 2;
const H: usize = 2;
const T: usize = 3;
const S: usize = 4;
const D: usize = 4;
const E: usize = 8;
const F: usize = 12;

fn store(seed: u64) -> VarStore {
    VarStore::new(DType::F64, &Device::Cpu, InitScheme::XavierUniform, seed)
}

/// sum(out · g) as a scalar tensor.
fn project(out: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok((out * g)?.sum_all()?)
}

fn named(name: &str, v: &Var) -> (String, Var) {
    (name.to_string(), v.clone())
}

fn layer_config(activation: Activation, norm_first: bool) -> LayerConfig {
    LayerConfig::new(E, H, F, 0.0, activation, norm_first, 1e-5, true)
}

/// An additive (rows, cols) mask of small random values with `-inf` at the given cells.
fn additive_mask(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    blocked: &[(usize, usize)],
) -> Result<AttnMask> {
    let mut v: Vec<f64> = (0..rows * cols).map(|_| rng.normal() * 0.5).collect();
    for &(i, j) in blocked {
        v[i * cols + j] = f64::NEG_INFINITY;
    }
    Ok(AttnMask::Additive(Tensor::from_vec(
        v,
        (rows, cols),
        &Device::Cpu,
    )?))
}

#[test]
fn sdpa_with_causal_key_padding_and_additive_masks() -> Result<()> {
    let mut rng = Rng::new(11);
    let q = randn_var(&mut rng, &[B, H, T, D])?; // (B, H, T, D)
    let k = randn_var(&mut rng, &[B, H, S, D])?; // (B, H, S, D)
    let v = randn_var(&mut rng, &[B, H, S, 5])?; // (B, H, S, Dv), Dv ≠ D on purpose
                                                 // Causal with T < S: query i sees keys j ≤ i + 1. Row 1 keeps only key 0, and the additive
                                                 // mask blocks key 0 for query 0, so query 0 of row 1 is fully masked (zero weights): the
                                                 // check covers that path too.
    let pad = AttnMask::from_lengths(&[S, 1], S, &Device::Cpu)?;
    let add = additive_mask(&mut rng, T, S, &[(0, 0)])?;
    let g_ctx = randn(&mut rng, &[B, H, T, 5], 1.0, DType::F64)?;
    let g_w = randn(&mut rng, &[B, H, T, S], 1.0, DType::F64)?;
    let vars = [named("q", &q), named("k", &k), named("v", &v)];
    check_grads("sdpa causal+padding+additive", &vars, &mut rng, || {
        let out = scaled_dot_product_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &SdpaOptions {
                attn_mask: Some(&add),
                key_padding_mask: Some(&pad),
                causal: true,
                need_weights: true,
                ..Default::default()
            },
        )?;
        let w = out.weights.expect("weights were requested");
        Ok((project(&out.context, &g_ctx)? + project(&w, &g_w)?)?)
    })
}

#[test]
fn sdpa_with_per_head_block_mask_and_scale() -> Result<()> {
    let mut rng = Rng::new(12);
    let q = randn_var(&mut rng, &[B, H, T, D])?;
    let k = randn_var(&mut rng, &[B, H, S, D])?;
    let v = randn_var(&mut rng, &[B, H, S, D])?;
    // (B·H, T, S), nonzero = masked out; about a third of the cells.
    let m: Vec<u8> = (0..B * H * T * S)
        .map(|_| u8::from(rng.uniform() < 0.33))
        .collect();
    let mask = AttnMask::Block(Tensor::from_vec(m, (B * H, T, S), &Device::Cpu)?);
    let g = randn(&mut rng, &[B, H, T, D], 1.0, DType::F64)?;
    let vars = [named("q", &q), named("k", &k), named("v", &v)];
    check_grads("sdpa (B*H,T,S) block mask", &vars, &mut rng, || {
        let out = scaled_dot_product_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &SdpaOptions {
                attn_mask: Some(&mask),
                scale: Some(0.3),
                ..Default::default()
            },
        )?;
        project(&out.context, &g)
    })
}

#[test]
fn mha_self_attention_with_masks() -> Result<()> {
    let mut rng = Rng::new(21);
    let vs = store(1);
    let mha = MultiHeadAttention::new(&MhaConfig::new(E, H), &vs.root())?;
    randomize_params(&vs, &mut rng, 0.5)?;
    let x = randn_var(&mut rng, &[B, T, E])?; // (B, T, E)
    let pad = AttnMask::from_lengths(&[T, 2], T, &Device::Cpu)?;
    let add = additive_mask(&mut rng, T, T, &[])?;
    let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
    let g_w = randn(&mut rng, &[B, T, T], 1.0, DType::F64)?;
    let mut vars = vs.vars();
    vars.push(named("x", &x));
    check_grads("mha self", &vars, &mut rng, || {
        let out = mha.forward(
            MhaInput::self_attn(x.as_tensor())
                .key_padding_mask(Some(&pad))
                .attn_mask(Some(&add))
                .causal(true)
                .need_weights(NeedWeights::Averaged),
        )?;
        let w = out.weights.expect("weights were requested"); // (B, T, T)
        Ok((project(&out.context, &g)? + project(&w, &g_w)?)?)
    })
}

#[test]
fn mha_cross_attention_with_masks() -> Result<()> {
    let mut rng = Rng::new(22);
    let vs = store(2);
    let mha = MultiHeadAttention::new(&MhaConfig::new(E, H), &vs.root())?;
    randomize_params(&vs, &mut rng, 0.5)?;
    let x = randn_var(&mut rng, &[B, T, E])?; // (B, T, E)
    let mem = randn_var(&mut rng, &[B, S, E])?; // (B, S, E)
    let pad = AttnMask::from_lengths(&[S, 2], S, &Device::Cpu)?;
    let block: Vec<u8> = vec![0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1]; // (T, S)
    let block = AttnMask::Block(Tensor::from_vec(block, (T, S), &Device::Cpu)?);
    let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
    let mut vars = vs.vars();
    vars.push(named("query", &x));
    vars.push(named("memory", &mem));
    check_grads("mha cross", &vars, &mut rng, || {
        let out = mha.forward(
            MhaInput::cross_attn(x.as_tensor(), mem.as_tensor())
                .key_padding_mask(Some(&pad))
                .attn_mask(Some(&block)),
        )?;
        project(&out.context, &g)
    })
}

#[test]
fn mha_cross_attention_with_separate_key_value_widths() -> Result<()> {
    let mut rng = Rng::new(23);
    let vs = store(3);
    let cfg = MhaConfig {
        kdim: Some(6),
        vdim: Some(5),
        ..MhaConfig::new(E, H)
    };
    let mha = MultiHeadAttention::new(&cfg, &vs.root())?;
    randomize_params(&vs, &mut rng, 0.5)?;
    let x = randn_var(&mut rng, &[B, T, E])?;
    let key = randn_var(&mut rng, &[B, S, 6])?; // (B, S, kdim)
    let value = randn_var(&mut rng, &[B, S, 5])?; // (B, S, vdim)
    let pad = AttnMask::from_lengths(&[3, S], S, &Device::Cpu)?;
    let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
    let mut vars = vs.vars();
    vars.extend([
        named("query", &x),
        named("key", &key),
        named("value", &value),
    ]);
    check_grads("mha cross kdim/vdim", &vars, &mut rng, || {
        let out = mha.forward(
            MhaInput::qkv(x.as_tensor(), key.as_tensor(), value.as_tensor())
                .key_padding_mask(Some(&pad)),
        )?;
        project(&out.context, &g)
    })
}

#[test]
fn layer_norm() -> Result<()> {
    let mut rng = Rng::new(31);
    let vs = store(4);
    let norm = Norm::layer_norm(E, 1e-5, true, &vs.root())?;
    randomize_params(&vs, &mut rng, 1.0)?;
    let x = randn_var(&mut rng, &[B, T, E])?;
    let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
    let mut vars = vs.vars();
    vars.push(named("x", &x));
    check_grads("layer norm", &vars, &mut rng, || {
        project(&norm.forward(x.as_tensor())?, &g)
    })
}

#[test]
fn feed_forward_relu_gelu_and_gelu_tanh() -> Result<()> {
    for (i, act) in [Activation::Relu, Activation::Gelu, Activation::GeluTanh]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(40 + i as u64);
        let vs = store(5);
        let ff = Mlp::plain(E, F, act, 0.0, true, &vs.root())?;
        randomize_params(&vs, &mut rng, 0.5)?;
        let x = randn_var(&mut rng, &[B, T, E])?;
        let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
        let mut vars = vs.vars();
        vars.push(named("x", &x));
        let what = format!("feed-forward {act:?}");
        check_grads(&what, &vars, &mut rng, || {
            project(&ff.forward(x.as_tensor(), false)?, &g)
        })?;
    }
    Ok(())
}

#[test]
fn encoder_layer_post_norm_and_pre_norm() -> Result<()> {
    for (norm_first, act) in [(false, Activation::Relu), (true, Activation::Gelu)] {
        let mut rng = Rng::new(50 + u64::from(norm_first));
        let vs = store(6);
        let layer = EncoderLayer::new(&layer_config(act, norm_first), &vs.root())?;
        randomize_params(&vs, &mut rng, 0.5)?;
        let x = randn_var(&mut rng, &[B, T, E])?;
        let pad = AttnMask::from_lengths(&[T, 2], T, &Device::Cpu)?;
        let add = additive_mask(&mut rng, T, T, &[(2, 0)])?;
        let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
        let mut vars = vs.vars();
        vars.push(named("x", &x));
        let masks = Masks::none()
            .with_key_padding(Some(&pad))
            .with_attn(Some(&add));
        let what = format!("encoder layer norm_first={norm_first}");
        check_grads(&what, &vars, &mut rng, || {
            project(&layer.forward(x.as_tensor(), &masks, false)?, &g)
        })?;
    }
    Ok(())
}

#[test]
fn decoder_layer_with_memory_masks() -> Result<()> {
    for (norm_first, act) in [(false, Activation::Relu), (true, Activation::Gelu)] {
        let mut rng = Rng::new(60 + u64::from(norm_first));
        let vs = store(7);
        let layer = DecoderLayer::new(&layer_config(act, norm_first), &vs.root())?;
        randomize_params(&vs, &mut rng, 0.5)?;
        let x = randn_var(&mut rng, &[B, T, E])?; // (B, T, E)
        let mem = randn_var(&mut rng, &[B, S, E])?; // (B, S, E)
        let tgt_pad = AttnMask::from_lengths(&[T, 2], T, &Device::Cpu)?;
        let mem_pad = AttnMask::from_lengths(&[3, S], S, &Device::Cpu)?;
        let mem_attn = additive_mask(&mut rng, T, S, &[(1, 2)])?;
        let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
        let mut vars = vs.vars();
        vars.extend([named("x", &x), named("memory", &mem)]);
        let tgt = Masks::causal().with_key_padding(Some(&tgt_pad));
        let mem_masks = Masks::none()
            .with_key_padding(Some(&mem_pad))
            .with_attn(Some(&mem_attn));
        let what = format!("decoder layer norm_first={norm_first}");
        check_grads(&what, &vars, &mut rng, || {
            let out = layer.forward(x.as_tensor(), mem.as_tensor(), &tgt, &mem_masks, false)?;
            project(&out, &g)
        })?;
    }
    Ok(())
}

#[test]
fn rope_apply_with_offset() -> Result<()> {
    let mut rng = Rng::new(70);
    let rope = Rope::new(D, 16, 10000.0, DType::F64, &Device::Cpu)?;
    let x = randn_var(&mut rng, &[B, H, T, D])?; // (B, H, T, D)
    let g = randn(&mut rng, &[B, H, T, D], 1.0, DType::F64)?;
    check_grads("rope apply offset 5", &[named("x", &x)], &mut rng, || {
        project(&rope.apply(x.as_tensor(), 5)?, &g)
    })
}

#[test]
fn mha_and_pre_norm_layer_with_rope() -> Result<()> {
    let mut rng = Rng::new(71);
    let rope = Rope::new(E / H, 16, 10000.0, DType::F64, &Device::Cpu)?;

    let vs = store(8);
    let mha = MultiHeadAttention::new(&MhaConfig::new(E, H), &vs.root())?;
    randomize_params(&vs, &mut rng, 0.5)?;
    let x = randn_var(&mut rng, &[B, T, E])?;
    let g = randn(&mut rng, &[B, T, E], 1.0, DType::F64)?;
    let mut vars = vs.vars();
    vars.push(named("x", &x));
    check_grads("mha self causal rope", &vars, &mut rng, || {
        let out = mha.forward(
            MhaInput::self_attn(x.as_tensor())
                .causal(true)
                .rope(Some(&rope)),
        )?;
        project(&out.context, &g)
    })?;

    // The decoder-only block: pre-norm encoder layer, causal, RoPE.
    let vs = store(9);
    let layer = EncoderLayer::new(&layer_config(Activation::GeluTanh, true), &vs.root())?;
    randomize_params(&vs, &mut rng, 0.5)?;
    let mut vars = vs.vars();
    vars.push(named("x", &x));
    let opts = LayerOptions {
        rope: Some(&rope),
        ..Default::default()
    };
    check_grads("pre-norm layer causal rope", &vars, &mut rng, || {
        let (out, _) = layer.forward_with(x.as_tensor(), &Masks::causal(), &opts, None)?;
        project(&out, &g)
    })
}

/// Whisper's front end: stride 1 and stride 2 with padding 1 (candle's conv1d backward: a
/// transposed convolution for the input, a convolution for the kernel).
#[test]
fn conv1d_with_stride_and_padding() -> Result<()> {
    for (i, (stride, padding)) in [(1, 1), (2, 1), (2, 0)].into_iter().enumerate() {
        let mut rng = Rng::new(90 + i as u64);
        let vs = store(9);
        let conv = Conv1d::new(3, 4, 3, stride, padding, true, &vs.root())?;
        randomize_params(&vs, &mut rng, 0.5)?;
        let x = randn_var(&mut rng, &[B, 3, 7])?;
        let l_out = conv.output_len(7).expect("an output");
        let g = randn(&mut rng, &[B, 4, l_out], 1.0, DType::F64)?;
        let mut vars = vs.vars();
        vars.push(named("x", &x));
        let what = format!("conv1d stride {stride} padding {padding}");
        check_grads(&what, &vars, &mut rng, || {
            project(&conv.forward(x.as_tensor())?, &g)
        })?;
    }
    Ok(())
}

/// A whole (tiny) Whisper: conv front end, encoder, decoder with cross-attention, tied output.
#[test]
fn whisper_teacher_forced_loss() -> Result<()> {
    use transformer::models::{FamilyConfig, Seq2Seq, Source, WhisperConfig};
    let mut rng = Rng::new(97);
    let cfg = WhisperConfig {
        vocab_size: 11,
        num_mel_bins: 3,
        d_model: 8,
        encoder_layers: 1,
        encoder_attention_heads: 2,
        encoder_ffn_dim: 12,
        decoder_layers: 1,
        decoder_attention_heads: 2,
        decoder_ffn_dim: 12,
        max_source_positions: 4,
        max_target_positions: 5,
        dropout: 0.0,
        layer_norm_eps: 1e-5,
    };
    let (model, vs) = cfg.init(DType::F64, &Device::Cpu, 3)?;
    randomize_params(&vs, &mut rng, 0.5)?;
    let x = randn_var(&mut rng, &[1, 8, 3])?;
    let ids = Tensor::new(&[[1u32, 4, 9]], &Device::Cpu)?;
    let g = randn(&mut rng, &[1, 3, 11], 1.0, DType::F64)?;
    let mut vars = vs.vars();
    vars.push(named("x", &x));
    check_grads("whisper", &vars, &mut rng, || {
        let memory = model.encode(
            Source::Features {
                x: x.as_tensor(),
                padding: None,
            },
            true,
        )?;
        let logits = model.decode(&ids, &memory, &Masks::causal(), &Masks::none(), true)?;
        project(&logits, &g)
    })
}
