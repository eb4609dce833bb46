//! The model-family seam: the registry builds, saves and loads every family without naming it;
//! capability traits drive them; Llama-style pieces (RMS norm, gated MLP, grouped-query
//! attention, query/key norms, RoPE) are configurations of the existing families; and the
//! fused/composed choice is a property of each model, not of the process.
//!
//! Dimension letters: `B` batch, `S` source length, `T` target length, `V` vocab.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, rand_ids, randomize_params};
use transformer::kernels::Kernels;
use transformer::models::{
    family, save_model, AnyConfig, DecoderOnlyConfig, EncoderDecoderConfig, FamilyConfig, Model,
    Source, FAMILIES,
};
use transformer::nn::{
    Activation, AttnMask, Masks, MlpKind, NeedWeights, NormKind, PositionalKind,
};
use transformer::rng::Rng;
use transformer::Result;

const TOL: f64 = 1e-5;

/// A tiny Llama/Gemma-style decoder: RMS norm (1 + weight), SwiGLU, 4 query heads sharing 2
/// key/value heads of width 6 (so H·D = 24 ≠ d_model = 32), query/key norms, RoPE, untied.
fn llama_config() -> DecoderOnlyConfig {
    DecoderOnlyConfig {
        n_heads: 4,
        n_kv_heads: Some(2),
        head_dim: Some(6),
        norm: NormKind::RmsNorm,
        norm_unit_offset: true,
        mlp: MlpKind::Gated,
        activation: Activation::Silu,
        qk_norm: true,
        positional: PositionalKind::Rope,
        tie_embeddings: false,
        ..DecoderOnlyConfig::tiny(50)
    }
}

/// The paper's encoder-decoder with RoPE in both stacks' self-attention, grouped-query
/// attention and RMS norms.
fn rope_enc_dec_config() -> EncoderDecoderConfig {
    EncoderDecoderConfig {
        positional: PositionalKind::Rope,
        n_kv_heads: Some(2),
        norm: NormKind::RmsNorm,
        norm_first: true,
        mlp: MlpKind::Gated,
        activation: Activation::GeluTanh,
        share_embeddings: false,
        tgt_vocab_size: 30,
        ..EncoderDecoderConfig::tiny(40)
    }
}

#[test]
fn registry_names_every_family_and_refuses_unknown_ones() -> Result<()> {
    let names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
    assert_eq!(
        names,
        [
            "encoder_decoder",
            "decoder_only",
            "encoder_only",
            "whisper",
            "vit"
        ]
    );
    for f in FAMILIES {
        assert_eq!(family(f.name)?.name, f.name);
        // Every preset builds, and its JSON comes back as the same config.
        for &p in f.presets {
            let cfg = f.preset(p, 64)?;
            assert_eq!(cfg.family().name, f.name);
            let back = f.config_from_json(cfg.to_json()?, p)?;
            assert_eq!(back.to_json()?, cfg.to_json()?, "{}/{p}", f.name);
        }
        let err = f.preset("no_such_preset", 64).expect_err("unknown preset");
        assert!(err.to_string().contains("no_such_preset"), "{err}");
    }
    let err = family("llama2").expect_err("unknown family").to_string();
    assert!(
        err.contains("llama2") && err.contains("decoder_only") && err.contains("encoder_only"),
        "{err}"
    );
    Ok(())
}

#[test]
fn models_load_through_the_registry_with_their_capabilities() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("transformer-families-{}", std::process::id()));
    let cpu = Device::Cpu;
    let cases: Vec<(Box<dyn AnyConfig>, &str)> = vec![
        (Box::new(llama_config()), "causal"),
        (Box::new(rope_enc_dec_config()), "seq2seq"),
        (
            Box::new(transformer::models::EncoderOnlyConfig::tiny(30)),
            "encoder",
        ),
        (Box::new(transformer::models::ViTConfig::tiny()), "image"),
    ];
    for (cfg, kind) in cases {
        let name = cfg.family().name;
        let vs = cfg.var_store(DType::F32, &cpu, 7);
        let built = cfg.build(&vs.root())?;
        let sub = dir.join(name);
        save_model(&sub, &cfg.to_json()?, &vs)?;
        let loaded = family(name)?.load(&sub, &cpu, DType::F32)?;
        assert_eq!(loaded.config.to_json()?, cfg.to_json()?);
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &cpu)?; // (1, 4)
        let pixels = Tensor::ones((1, 3, 16, 16), DType::F32, &cpu)?; // (1, C, H, W)
        let outputs = |m: &Model| -> Result<Tensor> {
            match m {
                Model::CausalLm(lm) => lm.forward(&ids, false),
                Model::Seq2Seq(s) => s.forward(&ids, &ids, None, None, false),
                Model::Encoder(e) => e.hidden_states(&ids, None, None, false),
                Model::ImageClassifier(c) => c.logits(&pixels, false),
            }
        };
        let d = max_abs_diff(&outputs(&built)?, &outputs(&loaded.model)?)?;
        assert_eq!(d, 0.0, "{name}: loaded model differs by {d}");
        let what = match loaded.model {
            Model::CausalLm(_) => "causal",
            Model::Seq2Seq(_) => "seq2seq",
            Model::Encoder(_) => "encoder",
            Model::ImageClassifier(_) => "image",
        };
        assert_eq!(what, kind, "{name}");
    }
    // A task that needs another capability says what it got.
    let cfg = rope_enc_dec_config();
    let vs = FamilyConfig::var_store(&cfg, DType::F32, &cpu, 1);
    let err = AnyConfig::build(&cfg, &vs.root())?
        .into_causal_lm("generation")
        .err()
        .expect("an encoder-decoder is no causal LM")
        .to_string();
    assert!(
        err.contains("generation") && err.contains("sequence-to-sequence"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The interleaved RoPE layout of Llama GGUF files decodes with a cache like the full pass.
#[test]
fn interleaved_rope_caches_like_the_full_forward() -> Result<()> {
    let cfg = DecoderOnlyConfig {
        rope_layout: transformer::nn::RopeLayout::Interleaved,
        ..llama_config()
    };
    let back: DecoderOnlyConfig = serde_json::from_value(AnyConfig::to_json(&cfg)?).unwrap();
    assert_eq!(back, cfg);
    let (model, vs) = cfg.init(DType::F32, &Device::Cpu, 14)?;
    randomize_params(&vs, &mut Rng::new(15), 0.3)?;
    let ids = rand_ids(&mut Rng::new(16), 2, 10, 0, 50)?;
    let full = model.forward(&ids, false)?;
    let mut caches = model.new_cache();
    let mut steps = Vec::new();
    for j in 0..10 {
        steps.push(model.forward_cached(&ids.narrow(1, j, 1)?, &mut caches)?);
    }
    let d = max_abs_diff(&full, &Tensor::cat(&steps, 1)?)?;
    assert!(d <= TOL, "cached decoding differs by {d}");
    // Not the half-split model: the layouts rotate different coordinates together.
    let half = DecoderOnlyConfig {
        rope_layout: transformer::nn::RopeLayout::HalfSplit,
        ..cfg.clone()
    };
    let other = FamilyConfig::build(&half, &vs.root())?;
    assert!(max_abs_diff(&full, &other.forward(&ids, false)?)? > 1e-4);
    Ok(())
}

#[test]
fn llama_style_decoder_caches_and_trains() -> Result<()> {
    let cfg = llama_config();
    let (model, vs) = cfg.init(DType::F32, &Device::Cpu, 3)?;
    // Grouped-query attention keeps 2 key/value heads: the packed projection is
    // (4 + 2·2)·6 rows, W^O maps 4·6 back to 32; the norms (1 + weight) start at zero.
    let in_proj = vs
        .get("layers.0.self_attn.in_proj.weight")
        .expect("packed q/k/v");
    assert_eq!(in_proj.dims(), [48, 32]);
    let out_proj = vs.get("layers.0.self_attn.out_proj.weight").expect("W^O");
    assert_eq!(out_proj.dims(), [32, 24]);
    for name in [
        "layers.0.self_attn.q_norm.weight",
        "layers.0.norm1.weight",
        "norm.weight",
    ] {
        let w = vs.get(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(w.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0, "{name}");
    }
    for name in ["gate_proj", "up_proj", "down_proj"] {
        assert!(
            vs.get(&format!("layers.1.ff.{name}.weight")).is_some(),
            "{name}"
        );
    }
    randomize_params(&vs, &mut Rng::new(4), 0.3)?;

    // Saved in f32, loaded in f64: the same config and the same values.
    let dir = std::env::temp_dir().join(format!("transformer-llama-{}", std::process::id()));
    cfg.save(&dir, &vs)?;
    let (_, vs64, back) = DecoderOnlyConfig::load(&dir, &Device::Cpu, DType::F64)?;
    assert_eq!(back, cfg);
    for (name, v) in vs.vars() {
        let w = vs64
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not loaded"));
        assert_eq!(w.dtype(), DType::F64);
        let d = max_abs_diff(&w.to_dtype(DType::F32)?, &v)?;
        assert_eq!(d, 0.0, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Cached decoding, token by token and in uneven chunks, equals the full forward.
    let mut rng = Rng::new(5);
    let (b, t) = (2, 12);
    let ids = rand_ids(&mut rng, b, t, 0, 50)?; // (B, T)
    let full = model.forward(&ids, false)?; // (B, T, V)
    let mut caches = model.new_cache();
    let mut chunks = Vec::new();
    for (start, len) in [(0, 5), (5, 1), (6, 6)] {
        chunks.push(model.forward_cached(&ids.narrow(1, start, len)?, &mut caches)?);
    }
    let d = max_abs_diff(&full, &Tensor::cat(&chunks, 1)?)?;
    assert!(d <= TOL, "cached decoding differs by {d}");
    // The cache holds the 2 key/value heads only.
    assert_eq!(caches[0].len(), t);

    // A few AdamW steps on one batch lower the loss, and every parameter gets a gradient.
    let mut opt = transformer::train::AdamW::new(vs.vars(), Default::default())?;
    let (x, y) = (ids.narrow(1, 0, t - 1)?, ids.narrow(1, 1, t - 1)?);
    let loss_of = || -> Result<Tensor> {
        transformer::train::cross_entropy(&model.forward(&x, true)?, &y, &Default::default())
    };
    let first = loss_of()?.to_scalar::<f32>()?;
    for _ in 0..10 {
        let grads = loss_of()?.backward()?;
        for (name, v) in vs.vars() {
            assert!(grads.get(&v).is_some(), "no gradient for {name}");
        }
        opt.step(&grads, 3e-3)?;
    }
    let last = loss_of()?.to_scalar::<f32>()?;
    assert!(last < first - 0.1, "loss {first} -> {last}");
    Ok(())
}

/// The decoder's self-attention takes RoPE as the encoder's does (it was dropped before).
#[test]
fn encoder_decoder_with_rope_decodes_incrementally_like_teacher_forcing() -> Result<()> {
    let cfg = rope_enc_dec_config();
    let (model, vs) = cfg.init(DType::F32, &Device::Cpu, 8)?;
    randomize_params(&vs, &mut Rng::new(9), 0.3)?;
    let mut rng = Rng::new(10);
    let (b, s, t) = (2, 6, 7);
    let src = rand_ids(&mut rng, b, s, 1, 40)?;
    let tgt = rand_ids(&mut rng, b, t, 1, 30)?;
    let src_pad = AttnMask::from_lengths(&[6, 3], s, &Device::Cpu)?;
    let source = Source::Tokens {
        ids: &src,
        padding: Some(&src_pad),
    };
    let seq: &dyn transformer::models::Seq2Seq = &model;
    let memory = seq.encode(source, false)?;
    let mem_masks = Masks::none().with_key_padding(Some(&src_pad));
    let full = seq.decode(&tgt, &memory, &Masks::causal(), &mem_masks, false)?;
    let mut state = seq.start_decoding(&memory)?;
    let mut steps = Vec::new();
    for j in 0..t {
        let (logits, _) = seq.decode_step(
            &tgt.narrow(1, j, 1)?,
            &memory,
            Some(&src_pad),
            &mut state,
            NeedWeights::No,
        )?;
        steps.push(logits);
    }
    let d = max_abs_diff(&full, &Tensor::cat(&steps, 1)?)?;
    assert!(d <= TOL, "incremental decoding differs by {d}");

    // Positions matter to the decoder: the same target tokens in another order do not give
    // the same logits at the last position, though causal attention without positions would
    // (a permutation of the earlier tokens leaves the last query's attention set unchanged).
    let rev: Vec<u32> = {
        let mut v = tgt.get(0)?.to_vec1::<u32>()?;
        v[..t - 1].reverse();
        v
    };
    let rev = Tensor::new(rev.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let one = |x: &Tensor| -> Result<Tensor> {
        let m = memory.narrow(0, 0, 1)?;
        let masks = Masks::none().with_key_padding(None);
        Ok(seq
            .decode(x, &m, &Masks::causal(), &masks, false)?
            .narrow(1, t - 1, 1)?)
    };
    let moved = max_abs_diff(&one(&tgt.narrow(0, 0, 1)?)?, &one(&rev)?)?;
    assert!(moved > 1e-3, "decoder ignores positions ({moved})");
    Ok(())
}

/// Two models of the same weights, one on the fused kernels and one on composed ops, used at
/// the same time from two threads: each keeps giving its own result, which differ in their
/// rounding (a process-wide switch flipped by one could not give both).
#[test]
fn the_kernel_choice_belongs_to_each_model() -> Result<()> {
    let cfg = llama_config();
    let build = |k: Kernels| -> Result<_> {
        let vs = FamilyConfig::var_store(&cfg, DType::F32, &Device::Cpu, 11).with_kernels(k);
        let model = FamilyConfig::build(&cfg, &vs.root())?;
        randomize_params(&vs, &mut Rng::new(12), 0.3)?;
        Ok(model)
    };
    let (fused, composed) = (build(Kernels::Fused)?, build(Kernels::Composed)?);
    let ids = rand_ids(&mut Rng::new(13), 2, 16, 0, 50)?;
    let (yf, yc) = (fused.forward(&ids, true)?, composed.forward(&ids, true)?);
    let d = max_abs_diff(&yf, &yc)?;
    assert!(d > 0.0 && d < 1e-4, "fused vs composed: {d}");
    std::thread::scope(|s| {
        let runs = [(&fused, &yf), (&composed, &yc)].map(|(m, want)| {
            let ids = &ids;
            s.spawn(move || -> Result<()> {
                for _ in 0..10 {
                    let again = m.forward(ids, true)?;
                    assert_eq!(max_abs_diff(&again, want)?, 0.0);
                }
                Ok(())
            })
        });
        for r in runs {
            r.join().expect("thread")?;
        }
        Ok(())
    })
}
