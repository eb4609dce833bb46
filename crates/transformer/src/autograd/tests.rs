//! The tape against candle's `backward`: op by op, then whole models of each family that the
//! engine covers, within 1e-6 (f32).

use candle_core::{DType, Device, Tensor, Var};

use super::ops;
use super::record;
use crate::kernels::tests::max_diff;
use crate::models::decoder_only::{DecoderOnly, DecoderOnlyConfig};
use crate::nn::VarStore;
use crate::train::loss::{cross_entropy, CrossEntropyConfig};
use crate::Result;

/// Runs `loss` twice, once under candle's backward and once on a tape, with the dropout
/// generator reset in between, and checks that the losses are equal and every var's gradient
/// within `tol`. Returns the largest difference and the tape's node count.
fn check(
    vars: &[(String, Var)],
    reset: &dyn Fn(),
    loss: &dyn Fn() -> Result<Tensor>,
    tol: f64,
) -> (f64, usize) {
    reset();
    let candle_loss = loss().unwrap();
    let candle = candle_loss.backward().unwrap();
    reset();
    let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let (tape_loss, tape) = record(&all, loss).unwrap();
    let nodes = tape.len();
    assert!(
        !tape_loss.track_op(),
        "the tape's forward built a candle graph"
    );
    let ours = tape.backward(&tape_loss).unwrap();
    let (a, b) = (
        candle_loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        tape_loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
    );
    assert_eq!(a, b, "the two forward passes differ");
    let mut worst = 0.0f64;
    for (name, var) in vars {
        match (candle.get(var), ours.get(var)) {
            (Some(c), Some(o)) => {
                assert!(o.is_contiguous(), "{name}: gradient not contiguous");
                let d = max_diff(c, o);
                assert!(d <= tol, "{name}: gradients differ by {d:e}");
                worst = worst.max(d);
            }
            (None, None) => {}
            (c, o) => panic!(
                "{name}: candle has a gradient: {}, the tape: {}",
                c.is_some(),
                o.is_some()
            ),
        }
    }
    (worst, nodes)
}

fn var(dims: &[usize], seed: u64) -> Var {
    let n: usize = dims.iter().product();
    let mut rng = crate::rng::Rng::new(seed);
    let v: Vec<f32> = (0..n).map(|_| rng.uniform_f32() * 2.0 - 1.0).collect();
    Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn every_op_gives_candles_gradient() {
    let table = var(&[7, 6], 1);
    let w = var(&[5, 6], 2);
    let bias = var(&[5], 3);
    let gamma = var(&[5], 4);
    let vars = vec![
        ("table".to_string(), table.clone()),
        ("w".to_string(), w.clone()),
        ("bias".to_string(), bias.clone()),
        ("gamma".to_string(), gamma.clone()),
    ];
    let ids = Tensor::new(&[0u32, 3, 3, 6, 1, 0], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[1u32, 4, 0, 2, 2, 3], &Device::Cpu).unwrap();
    let loss = || -> Result<Tensor> {
        // The table reaches the loss three ways (lookup, the tied product, a narrow), so
        // its gradient is summed out of place once and in place after.
        let x = ops::index_select(&table, &ids, 0)?; // (6, 6)
        let x3 = ops::reshape(&x, (2, 3, 6))?;
        let x3 = ops::broadcast_add(&x3, &ops::narrow(&table, 0, 1, 3)?)?;
        let xt = ops::contiguous(&ops::transpose(&x3, 0, 1)?)?; // (3, 2, 6)
        let x2 = ops::reshape(&ops::transpose(&xt, 0, 1)?, (6, 6))?;
        let h = ops::broadcast_add(&ops::matmul(&x2, &ops::t(&w)?)?, &bias)?; // (6, 5)
        let h = crate::kernels::gelu::gelu_erf(&h)?;
        let h = crate::kernels::layer_norm::layer_norm(&h, &gamma, Some(&bias), 1e-5)?;
        let h = ops::add(&h, &ops::affine(&h, 0.5, 1.0)?)?;
        let s = crate::kernels::softmax::softmax_last_dim(&h)?;
        let logits = ops::matmul(&s, &ops::narrow(&table, 0, 2, 5)?)?; // (6, 6)
        let logits = ops::narrow(&logits, 1, 0, 5)?;
        let ce = cross_entropy(&logits, &targets, &CrossEntropyConfig::default())?;
        Ok(ops::add(&ce, &ops::affine(&ops::sum_all(&x)?, 1e-3, 0.0)?)?)
    };
    let (worst, nodes) = check(&vars, &|| {}, &loss, 1e-6);
    assert!(nodes > 15, "{nodes} nodes");
    eprintln!("ops: worst gradient difference {worst:e} over {nodes} nodes");
}

#[test]
fn an_op_outside_the_tape_is_an_error_not_a_lost_gradient() {
    let w = var(&[3, 4], 5);
    let err = record(std::slice::from_ref(&w), || {
        // candle's exp, not the tape's: candle tracks it from the var.
        let e = w.exp()?;
        Ok(ops::sum_all(&e)?)
    })
    .err()
    .expect("an op outside autograd::ops");
    let msg = err.to_string();
    assert!(msg.contains("outside autograd::ops"), "{msg}");
    assert!(
        !super::is_recording(),
        "the tape must be removed after an error"
    );
}

#[test]
fn a_loss_from_another_tape_or_none_is_refused() {
    let w = var(&[2, 2], 6);
    let (_, tape) = record(std::slice::from_ref(&w), || Ok(())).unwrap();
    let plain = w.as_tensor().sum_all().unwrap();
    assert!(tape.backward(&plain).is_err());
}

#[test]
fn custom_ops_keep_their_output_only_when_asked() {
    // Softmax's backward reads its output; a custom op told `Unused` gets a placeholder, so
    // this also checks that softmax asks for it.
    let x = var(&[3, 4], 7);
    let vars = vec![("x".to_string(), x.clone())];
    let loss = || -> Result<Tensor> {
        let s = crate::kernels::softmax::softmax_last_dim(x.as_tensor())?;
        // A constant operand: the product's backward skips its gradient.
        let w = super::constant(Tensor::new(&[[1f32], [2.], [3.], [4.]], &Device::Cpu)?);
        Ok(ops::sum_all(&ops::matmul(&s, &w)?)?)
    };
    check(&vars, &|| {}, &loss, 1e-6);
}

/// A decoder-only model's loss on a fixed batch, under either engine.
fn decoder_only_case(cfg: DecoderOnlyConfig, seed: u64) -> (f64, usize) {
    let (model, vs): (DecoderOnly, VarStore) =
        DecoderOnly::init(&cfg, DType::F32, &Device::Cpu, seed).unwrap();
    let (b, t) = (3, cfg.block_size.min(9));
    let mut rng = crate::rng::Rng::new(seed + 1);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let x = Tensor::from_vec(ids.clone(), (b, t), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        ids.iter()
            .map(|i| (i + 1) % cfg.vocab_size as u32)
            .collect::<Vec<_>>(),
        (b, t),
        &Device::Cpu,
    )
    .unwrap();
    let start = vs.dropout_rng().state();
    let rng_handle = vs.dropout_rng().clone();
    let reset = move || rng_handle.set_state(start.clone());
    let loss = || -> Result<Tensor> {
        let logits = crate::models::CausalLm::forward(&model, &x, true)?;
        cross_entropy(&logits, &y, &CrossEntropyConfig::default())
    };
    check(&vs.vars(), &reset, &loss, 1e-6)
}

#[test]
fn decoder_only_shakespeare_char_gradients_equal_candles() {
    let (worst, nodes) = decoder_only_case(DecoderOnlyConfig::tiny(23), 11);
    eprintln!("decoder_only tiny: worst {worst:e}, {nodes} nodes");
}

#[test]
fn decoder_only_with_biases_dropout_and_untied_head_gradients_equal_candles() {
    let cfg = DecoderOnlyConfig {
        bias: true,
        dropout: 0.1,
        tie_embeddings: false,
        ..DecoderOnlyConfig::tiny(19)
    };
    let (worst, nodes) = decoder_only_case(cfg, 12);
    eprintln!("decoder_only gpt2-style: worst {worst:e}, {nodes} nodes");
}

#[test]
fn candles_tensor_numbers_are_readable_and_increase() {
    // The strictness check reads them from `Debug`; a candle that prints them differently
    // must fail here, not turn the check off silently.
    let a = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let (sa, sb) = (super::serial(a.id()), super::serial(b.id()));
    assert!(sa > 0 && sb > sa, "{sa} then {sb}");
}

/// An encoder-decoder's teacher-forced loss on pairs of different lengths (padding masks on
/// both sides, label smoothing, the ignored label), under either engine.
fn encoder_decoder_case(cfg: crate::models::EncoderDecoderConfig, seed: u64) -> (f64, usize) {
    use crate::data::Seq2SeqIds;
    let (model, vs) =
        crate::models::EncoderDecoder::init(&cfg, DType::F32, &Device::Cpu, seed).unwrap();
    let ids = Seq2SeqIds {
        pad: 0,
        bos: 1,
        eos: 2,
        ignore: 0,
    };
    let mut rng = crate::rng::Rng::new(seed + 1);
    let v = cfg.tgt_vocab_size as u64;
    let mut seq = |n: usize| -> Vec<u32> { (0..n).map(|_| 3 + rng.below(v - 3) as u32).collect() };
    let pairs: Vec<(Vec<u32>, Vec<u32>)> =
        vec![(seq(5), seq(7)), (seq(8), seq(3)), (seq(2), seq(6))];
    let start = vs.dropout_rng().state();
    let rng_handle = vs.dropout_rng().clone();
    let reset = move || rng_handle.set_state(start.clone());
    let loss_cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let loss = || -> Result<Tensor> {
        crate::train::tasks::seq2seq_loss(&model, &pairs, ids, true, &loss_cfg, &Device::Cpu)
    };
    check(&vs.vars(), &reset, &loss, 1e-6)
}

#[test]
fn encoder_decoder_post_norm_gradients_equal_candles() {
    let (worst, nodes) = encoder_decoder_case(crate::models::EncoderDecoderConfig::tiny(31), 21);
    eprintln!("encoder_decoder post-norm: worst {worst:e}, {nodes} nodes");
}

#[test]
fn encoder_decoder_pre_norm_untied_gradients_equal_candles() {
    let cfg = crate::models::EncoderDecoderConfig {
        norm_first: true,
        share_embeddings: false,
        tie_output: false,
        activation: crate::nn::Activation::Gelu,
        ..crate::models::EncoderDecoderConfig::tiny(29)
    };
    let (worst, nodes) = encoder_decoder_case(cfg, 22);
    eprintln!("encoder_decoder pre-norm: worst {worst:e}, {nodes} nodes");
}

#[test]
fn vit_classifier_gradients_equal_candles() {
    let cfg = crate::models::ViTConfig {
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        ..crate::models::ViTConfig::tiny()
    };
    let (model, vs) = crate::models::ViT::init(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
    let mut rng = crate::rng::Rng::new(9);
    let pixels: Vec<f32> = (0..2 * 3 * 16 * 16).map(|_| rng.uniform_f32()).collect();
    let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let start = vs.dropout_rng().state();
    let rng_handle = vs.dropout_rng().clone();
    let reset = move || rng_handle.set_state(start.clone());
    let loss = || -> Result<Tensor> {
        // Made inside the forward, as a task makes its batch: declared data.
        let x = super::constant(Tensor::from_vec(
            pixels.clone(),
            (2, 3, 16, 16),
            &Device::Cpu,
        )?);
        let logits = model.classify(&x, true)?;
        cross_entropy(&logits, &labels, &CrossEntropyConfig::default())
    };
    let (worst, nodes) = check(&vs.vars(), &reset, &loss, 1e-6);
    eprintln!("vit: worst {worst:e}, {nodes} nodes");
}

#[test]
fn decoder_only_llama_style_gradients_equal_candles() {
    // RoPE (half-split), RMSNorm, SwiGLU, grouped-query attention, per-head q/k norms.
    use crate::nn::{Activation, MlpKind, NormKind, PositionalKind};
    let cfg = DecoderOnlyConfig {
        n_heads: 4,
        n_kv_heads: Some(2),
        positional: PositionalKind::Rope,
        norm: NormKind::RmsNorm,
        mlp: MlpKind::Gated,
        activation: Activation::Silu,
        qk_norm: true,
        tie_embeddings: false,
        ..DecoderOnlyConfig::tiny(21)
    };
    let (worst, nodes) = decoder_only_case(cfg, 13);
    eprintln!("decoder_only llama-style: worst {worst:e}, {nodes} nodes");
}

#[test]
fn decoder_only_gemma_style_gradients_equal_candles() {
    // Interleaved RoPE, GeGLU (tanh GELU), sandwich norms, (1 + w) norm weights, scaled
    // embeddings, sliding-window layers shorter than the batch.
    use crate::models::LayerAttention;
    use crate::nn::{Activation, MlpKind, NormKind, PositionalKind, RopeLayout};
    let cfg = DecoderOnlyConfig {
        positional: PositionalKind::Rope,
        rope_layout: RopeLayout::Interleaved,
        norm: NormKind::RmsNorm,
        norm_unit_offset: true,
        mlp: MlpKind::Gated,
        activation: Activation::GeluTanh,
        post_norm: true,
        embed_scale: true,
        layer_types: vec![LayerAttention::Sliding, LayerAttention::Full],
        sliding_window: Some(4),
        rope_local_theta: Some(1000.0),
        ..DecoderOnlyConfig::tiny(17)
    };
    let (worst, nodes) = decoder_only_case(cfg, 14);
    eprintln!("decoder_only gemma-style: worst {worst:e}, {nodes} nodes");
}
