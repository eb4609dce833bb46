//! Bad input returns `Err`, never panics, and the message names the tensor or field at fault
//! together with the expected and the actual value (STYLE habit 4).
//!
//! Dimension letters: `B` batch 2, `H` heads 2, `T` query positions 3, `S` key positions 4,
//! `D` head width 4, `E` d_model 8.

mod common;

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::rand_ids;
use transformer::models::{
    config_from_json, save_model, DecoderOnly, DecoderOnlyConfig, EncoderDecoder,
    EncoderDecoderConfig, EncoderOnly, EncoderOnlyConfig,
};
use transformer::nn::{
    scaled_dot_product_attention, AttnMask, InitScheme, KvCache, Masks, MhaConfig, MhaInput,
    MultiHeadAttention, NeedWeights, PositionalKind, SdpaOptions, VarStore,
};
use transformer::rng::Rng;
use transformer::Result;

fn cpu() -> Device {
    Device::Cpu
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::F32, &cpu()).expect("zeros")
}

/// The error message of `r`, which must be an `Err` containing every string in `parts`.
#[track_caller]
fn expect_err<T: Debug>(r: Result<T>, parts: &[&str]) -> String {
    let msg = match r {
        Ok(v) => panic!("expected an error containing {parts:?}, got Ok({v:?})"),
        Err(e) => e.to_string(),
    };
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
    msg
}

/// Run `f` and show its message (for `--nocapture`): one line per bad input.
#[track_caller]
fn check<T: Debug>(what: &str, r: Result<T>, parts: &[&str]) {
    let msg = expect_err(r, parts);
    println!("{what:<40} {msg}");
}

fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, opts: &SdpaOptions) -> Result<()> {
    scaled_dot_product_attention(q, k, v, opts).map(|_| ())
}

fn mha() -> Result<MultiHeadAttention> {
    let vs = VarStore::new(DType::F32, &cpu(), InitScheme::XavierUniform, 0);
    MultiHeadAttention::new(&MhaConfig::new(8, 2), &vs.root())
}

fn mha_forward(m: &MultiHeadAttention, input: MhaInput) -> Result<()> {
    m.forward(input).map(|_| ())
}

fn small_enc_dec() -> EncoderDecoderConfig {
    EncoderDecoderConfig {
        d_model: 16,
        n_heads: 2,
        d_ff: 32,
        n_encoder_layers: 1,
        n_decoder_layers: 1,
        max_len: 16,
        ..EncoderDecoderConfig::tiny(20)
    }
}

fn small_dec_only() -> DecoderOnlyConfig {
    DecoderOnlyConfig {
        block_size: 8,
        d_model: 16,
        n_heads: 2,
        n_layers: 2,
        d_ff: 32,
        ..DecoderOnlyConfig::tiny(20)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention inputs

#[test]
fn attention_inputs_of_the_wrong_rank_or_width() -> Result<()> {
    let (q, k, v) = (
        zeros(&[2, 2, 3, 4]),
        zeros(&[2, 2, 4, 4]),
        zeros(&[2, 2, 4, 4]),
    );
    let o = SdpaOptions::default();
    check(
        "sdpa query of rank 3",
        sdpa(&zeros(&[2, 3, 4]), &k, &v, &o),
        &["attention query", "(B, H, T, D)", "[2, 3, 4]"],
    );
    check(
        "sdpa key of rank 5",
        sdpa(&q, &zeros(&[1, 2, 2, 4, 4]), &v, &o),
        &["attention key", "(B, H, S, D)", "[1, 2, 2, 4, 4]"],
    );
    check(
        "sdpa key head width 5 for D 4",
        sdpa(&q, &zeros(&[2, 2, 4, 5]), &v, &o),
        &["attention key", "(2, 2, S, 4)", "[2, 2, 4, 5]"],
    );
    check(
        "sdpa value with 3 positions for S 4",
        sdpa(&q, &k, &zeros(&[2, 2, 3, 4]), &o),
        &["attention value", "(2, 2, 4, Dv)", "[2, 2, 3, 4]"],
    );
    check(
        "sdpa value batch 1 for B 2",
        sdpa(&q, &k, &zeros(&[1, 2, 4, 4]), &o),
        &["attention value", "[1, 2, 4, 4]"],
    );

    let m = mha()?;
    check(
        "mha query width 7 for d_model 8",
        mha_forward(&m, MhaInput::self_attn(&zeros(&[2, 3, 7]))),
        &["attention query", "8", "[2, 3, 7]"],
    );
    check(
        "mha query of rank 2",
        mha_forward(&m, MhaInput::self_attn(&zeros(&[3, 8]))),
        &["attention query", "8", "[3, 8]"],
    );
    let x = zeros(&[2, 3, 8]);
    check(
        "mha memory width 6 for d_model 8",
        mha_forward(&m, MhaInput::cross_attn(&x, &zeros(&[2, 4, 6]))),
        &["attention key", "8", "[2, 4, 6]"],
    );
    check(
        "mha memory batch 3 for B 2",
        mha_forward(&m, MhaInput::cross_attn(&x, &zeros(&[3, 4, 8]))),
        &["attention key/value", "batch 2", "[3, 4, 8]"],
    );
    check(
        "mha value length 5 for key length 4",
        mha_forward(
            &m,
            MhaInput::qkv(&x, &zeros(&[2, 4, 8]), &zeros(&[2, 5, 8])),
        ),
        &["attention key/value", "[2, 4, 8]", "[2, 5, 8]"],
    );
    check(
        "mha project_kv of rank 2",
        m.project_kv(&zeros(&[4, 8])).map(|_| ()),
        &["attention memory", "8", "[4, 8]"],
    );
    Ok(())
}

#[test]
fn d_model_not_divisible_by_n_heads() {
    let vs = VarStore::new(DType::F32, &cpu(), InitScheme::XavierUniform, 0);
    check(
        "MhaConfig 10 / 3",
        MultiHeadAttention::new(&MhaConfig::new(10, 3), &vs.root()).map(|_| ()),
        &["d_model (10)", "n_heads (3)", "divisible"],
    );
    check(
        "MhaConfig n_heads 0",
        MultiHeadAttention::new(&MhaConfig::new(8, 0), &vs.root()).map(|_| ()),
        &["n_heads", "0"],
    );
    let cfg = EncoderDecoderConfig {
        d_model: 30,
        n_heads: 4,
        ..small_enc_dec()
    };
    check(
        "encoder-decoder d_model 30, 4 heads",
        EncoderDecoder::init(&cfg, DType::F32, &cpu(), 0).map(|_| ()),
        &["d_model (30)", "n_heads (4)"],
    );
    let cfg = DecoderOnlyConfig {
        d_model: 30,
        n_heads: 4,
        ..small_dec_only()
    };
    check(
        "decoder-only d_model 30, 4 heads",
        cfg.validate(),
        &["d_model (30)", "n_heads (4)"],
    );
    let cfg = EncoderOnlyConfig {
        d_model: 30,
        n_heads: 4,
        ..EncoderOnlyConfig::tiny(20)
    };
    check(
        "encoder-only d_model 30, 4 heads",
        cfg.validate(),
        &["d_model (30)", "n_heads (4)"],
    );
}

#[test]
fn masks_of_the_wrong_shape() -> Result<()> {
    let (q, k, v) = (
        zeros(&[2, 2, 3, 4]),
        zeros(&[2, 2, 4, 4]),
        zeros(&[2, 2, 4, 4]),
    );
    let bad_attn = AttnMask::Block(Tensor::zeros((3, 5), DType::U8, &cpu())?);
    check(
        "attn_mask (3, 5) for T 3, S 4",
        sdpa(
            &q,
            &k,
            &v,
            &SdpaOptions {
                attn_mask: Some(&bad_attn),
                ..Default::default()
            },
        ),
        &["attn_mask", "(3, 4)", "[3, 5]"],
    );
    let bad_attn = AttnMask::Additive(zeros(&[2, 3, 4]));
    check(
        "attn_mask (2, 3, 4) for B·H 4",
        sdpa(
            &q,
            &k,
            &v,
            &SdpaOptions {
                attn_mask: Some(&bad_attn),
                ..Default::default()
            },
        ),
        &["attn_mask", "(4, 3, 4)", "[2, 3, 4]"],
    );
    let bad_attn = AttnMask::Allow(Tensor::ones(4, DType::U8, &cpu())?);
    check(
        "attn_mask of rank 1",
        sdpa(
            &q,
            &k,
            &v,
            &SdpaOptions {
                attn_mask: Some(&bad_attn),
                ..Default::default()
            },
        ),
        &["attn_mask", "(3, 4)", "[4]"],
    );
    let bad_pad = AttnMask::from_lengths(&[4, 4], 5, &cpu())?;
    check(
        "key_padding_mask (2, 5) for S 4",
        sdpa(
            &q,
            &k,
            &v,
            &SdpaOptions {
                key_padding_mask: Some(&bad_pad),
                ..Default::default()
            },
        ),
        &["key_padding_mask", "(2, 4)", "[2, 5]"],
    );
    let bad_pad = AttnMask::from_lengths(&[4, 4, 4], 4, &cpu())?;
    check(
        "key_padding_mask (3, 4) for B 2",
        sdpa(
            &q,
            &k,
            &v,
            &SdpaOptions {
                key_padding_mask: Some(&bad_pad),
                ..Default::default()
            },
        ),
        &["key_padding_mask", "(2, 4)", "[3, 4]"],
    );

    let m = mha()?;
    let x = zeros(&[2, 3, 8]);
    let bad_pad = AttnMask::from_lengths(&[3, 3], 4, &cpu())?;
    check(
        "mha key_padding_mask (2, 4) for T 3",
        mha_forward(&m, MhaInput::self_attn(&x).key_padding_mask(Some(&bad_pad))),
        &["key_padding_mask", "(2, 3)", "[2, 4]"],
    );

    // Through a whole model: a source padding mask one position too long.
    let (model, _vs) = EncoderDecoder::init(&small_enc_dec(), DType::F32, &cpu(), 0)?;
    let mut rng = Rng::new(0);
    let src = rand_ids(&mut rng, 2, 5, 0, 20)?;
    let tgt = rand_ids(&mut rng, 2, 3, 0, 20)?;
    let src_pad = AttnMask::from_lengths(&[5, 2], 6, &cpu())?;
    check(
        "encoder-decoder src padding (2, 6) for S 5",
        model
            .forward(&src, &tgt, Some(&src_pad), None, false)
            .map(|_| ()),
        &["key_padding_mask", "(2, 5)", "[2, 6]"],
    );
    let tgt_pad = AttnMask::from_lengths(&[3], 3, &cpu())?;
    check(
        "encoder-decoder tgt padding (1, 3) for B 2",
        model
            .forward(&src, &tgt, None, Some(&tgt_pad), false)
            .map(|_| ()),
        &["key_padding_mask", "(2, 3)", "[1, 3]"],
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configs

fn base_json() -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(small_enc_dec()).expect("serializes") {
        serde_json::Value::Object(m) => m,
        other => panic!("a config serializes to an object, got {other}"),
    }
}

fn parse(map: serde_json::Map<String, serde_json::Value>) -> Result<EncoderDecoderConfig> {
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(map)).expect("serializes");
    config_from_json::<EncoderDecoderConfig>(&text, "config.json")
}

#[test]
fn config_json_with_a_missing_unknown_or_mistyped_field() {
    // The unmodified file parses: the failures below are the edits alone.
    assert_eq!(
        parse(base_json()).expect("the base file parses"),
        small_enc_dec()
    );

    let mut m = base_json();
    m.remove("d_model");
    check(
        "missing d_model",
        parse(m),
        &["config.json", "missing field", "d_model"],
    );

    let mut m = base_json();
    m.insert("d_modle".into(), 16.into());
    check(
        "unknown field d_modle",
        parse(m),
        &["config.json", "unknown field", "d_modle"],
    );

    let mut m = base_json();
    m.insert("n_heads".into(), "eight".into());
    check(
        "n_heads as a string",
        parse(m),
        &["config.json", "n_heads", "eight", "usize"],
    );

    let mut m = base_json();
    m.insert("dropout".into(), serde_json::json!([0.1]));
    check(
        "dropout as a list",
        parse(m),
        &["config.json", "dropout", "sequence", "f64"],
    );

    let mut m = base_json();
    m.insert("n_encoder_layers".into(), serde_json::json!(-2));
    check(
        "negative n_encoder_layers",
        parse(m),
        &["config.json", "n_encoder_layers", "-2"],
    );

    let mut m = base_json();
    m.insert("activation".into(), "swish".into());
    check(
        "unknown activation",
        parse(m),
        &["config.json", "activation", "swish", "relu"],
    );

    let mut m = base_json();
    m.insert("share_embeddings".into(), "yes".into());
    check(
        "share_embeddings as a string",
        parse(m),
        &["share_embeddings", "yes", "boolean"],
    );

    // A value that deserializes but does not validate.
    let cfg = EncoderDecoderConfig {
        dropout: 1.5,
        ..small_enc_dec()
    };
    check("dropout 1.5", cfg.validate(), &["dropout", "1.5"]);
    let cfg = EncoderDecoderConfig {
        tgt_vocab_size: 21,
        ..small_enc_dec()
    };
    check(
        "shared embeddings, vocab 20 vs 21",
        cfg.validate(),
        &["share_embeddings", "20", "21"],
    );
    check(
        "unknown preset",
        EncoderDecoderConfig::preset("huge", 10).map(|_| ()),
        &["huge", "base", "big", "tiny"],
    );
    let cfg = DecoderOnlyConfig {
        n_heads: 16,
        d_model: 48,
        positional: PositionalKind::Rope,
        ..small_dec_only()
    };
    check(
        "RoPE with odd head width 3",
        cfg.validate(),
        &["RoPE", "even", "3"],
    );
}

// ---------------------------------------------------------------------------------------------
// Weights

#[test]
fn weights_with_a_missing_extra_or_mis_shaped_tensor() -> Result<()> {
    let cfg = small_enc_dec();
    let (_model, vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 1)?;
    // Loading the store's own tensors is a no-op (regression: `Var::set` used to refuse them
    // as "derived from its value").
    let good: HashMap<String, Tensor> = vs.tensors().into_iter().collect();
    vs.load_map(&good, "good")?;

    let name = "decoder.layers.0.cross_attn.in_proj.weight";
    let mut m = good.clone();
    m.remove(name);
    check(
        "missing tensor",
        vs.load_map(&m, "ckpt.safetensors"),
        &["ckpt.safetensors", "missing", name],
    );

    let mut m = good.clone();
    m.insert("decoder.layers.1.norm1.weight".into(), zeros(&[16]));
    check(
        "extra tensor",
        vs.load_map(&m, "ckpt.safetensors"),
        &[
            "ckpt.safetensors",
            "unexpected",
            "decoder.layers.1.norm1.weight",
        ],
    );

    let mut m = good.clone();
    m.insert(name.into(), zeros(&[48, 15]));
    check(
        "mis-shaped tensor",
        vs.load_map(&m, "ckpt.safetensors"),
        &["ckpt.safetensors", name, "[48, 16]", "[48, 15]"],
    );

    // Nothing was changed by the failed loads.
    for (n, t) in vs.tensors() {
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            good[&n].flatten_all()?.to_vec1::<f32>()?,
            "{n} changed by a failed load"
        );
    }

    // Through files: weights of a model with another shape, and a file that is not there.
    let dir = std::env::temp_dir().join(format!("transformer-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| transformer::Error::io(&dir, e))?;
    let wider = EncoderDecoderConfig {
        d_ff: 40,
        ..cfg.clone()
    };
    let (_m, wide_vs) = EncoderDecoder::init(&wider, DType::F32, &cpu(), 1)?;
    let path = dir.join("wide.safetensors");
    wide_vs.save(&path)?;
    check(
        "file with d_ff 40 into d_ff 32",
        vs.load(&path),
        &[
            "wide.safetensors",
            "encoder.layers.0.ff.linear1.weight",
            "[32, 16]",
            "[40, 16]",
        ],
    );
    let deeper = EncoderDecoderConfig {
        n_decoder_layers: 2,
        ..cfg.clone()
    };
    let (_m, deep_vs) = EncoderDecoder::init(&deeper, DType::F32, &cpu(), 1)?;
    let path = dir.join("deep.safetensors");
    deep_vs.save(&path)?;
    check(
        "file with an extra layer",
        vs.load(&path),
        &["deep.safetensors", "unexpected", "decoder.layers.1."],
    );
    check(
        "file without a layer",
        deep_vs.load(dir.join("wide.safetensors")),
        &["missing", "decoder.layers.1."],
    );
    let missing = dir.join("nope.safetensors");
    check(
        "no such file",
        vs.load(&missing),
        &["nope.safetensors", "not found"],
    );
    std::fs::write(dir.join("garbage.safetensors"), b"not a safetensors file").expect("write");
    check(
        "not a safetensors file",
        vs.load(dir.join("garbage.safetensors")),
        &["garbage.safetensors"],
    );

    // A model directory without its config, or with a config that does not parse.
    let model_dir: PathBuf = dir.join("model");
    save_model(&model_dir, &cfg, &vs)?;
    std::fs::write(model_dir.join("config.json"), r#"{"d_model": 16}"#).expect("write");
    check(
        "config.json missing fields",
        EncoderDecoder::load(&model_dir, &cpu()).map(|_| ()),
        &["config.json", "missing field"],
    );
    std::fs::remove_file(model_dir.join("config.json")).expect("remove");
    check(
        "model dir without config.json",
        EncoderDecoder::load(&model_dir, &cpu()).map(|_| ()),
        &["missing config.json"],
    );
    check(
        "model dir that does not exist",
        DecoderOnly::load(&dir.join("absent"), &cpu()).map(|_| ()),
        &["absent", "not a directory"],
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token ids and lengths

#[test]
fn token_ids_out_of_range_or_of_the_wrong_rank() -> Result<()> {
    let mut rng = Rng::new(3);
    let (model, _vs) = EncoderDecoder::init(&small_enc_dec(), DType::F32, &cpu(), 0)?;
    let src = rand_ids(&mut rng, 2, 5, 0, 20)?;
    let tgt = rand_ids(&mut rng, 2, 3, 0, 20)?;
    let bad = Tensor::from_vec(vec![1u32, 2, 20, 3, 4, 5], (2, 3), &cpu())?;
    check(
        "encoder-decoder source id 20, vocab 20",
        model.forward(&bad, &tgt, None, None, false).map(|_| ()),
        &["token id 20", "vocabulary of 20"],
    );
    check(
        "encoder-decoder target id 20, vocab 20",
        model.forward(&src, &bad, None, None, false).map(|_| ()),
        &["token id 20", "vocabulary of 20"],
    );

    let (dec, _vs) = DecoderOnly::init(&small_dec_only(), DType::F32, &cpu(), 0)?;
    let neg = Tensor::from_vec(vec![1i64, -1], (1, 2), &cpu())?;
    check(
        "decoder-only id -1",
        dec.forward(&neg, false).map(|_| ()),
        &["token id", "vocabulary of 20"],
    );
    check(
        "decoder-only ids of rank 1",
        dec.forward(&Tensor::from_vec(vec![1u32, 2], 2, &cpu())?, false)
            .map(|_| ()),
        &["token ids", "(B, T)", "[2]"],
    );
    check(
        "decoder-only ids of rank 3",
        dec.forward(&Tensor::zeros((1, 2, 1), DType::U32, &cpu())?, false)
            .map(|_| ()),
        &["token ids", "(B, T)", "[1, 2, 1]"],
    );

    let (enc, _vs) = EncoderOnly::init(&EncoderOnlyConfig::tiny(20), DType::F32, &cpu(), 0)?;
    check(
        "encoder-only id 20, vocab 20",
        enc.forward(&bad, None, None, false).map(|_| ()),
        &["token id 20"],
    );
    let types = Tensor::from_vec(vec![0u32, 1, 2, 0, 0, 0], (2, 3), &cpu())?;
    check(
        "encoder-only token type 2 of 2",
        enc.forward(&src.narrow(1, 0, 3)?, Some(&types), None, false)
            .map(|_| ()),
        &["token id 2", "vocabulary of 2"],
    );
    Ok(())
}

#[test]
fn sequences_longer_than_the_model_allows() -> Result<()> {
    let mut rng = Rng::new(4);
    for pos in [
        PositionalKind::Learned,
        PositionalKind::Rope,
        PositionalKind::None,
    ] {
        let cfg = DecoderOnlyConfig {
            positional: pos,
            ..small_dec_only()
        };
        let (dec, _vs) = DecoderOnly::init(&cfg, DType::F32, &cpu(), 0)?;
        check(
            &format!("decoder-only {pos:?} 9 tokens, block 8"),
            dec.forward(&rand_ids(&mut rng, 1, 9, 0, 20)?, false)
                .map(|_| ()),
            &["9", "block_size", "8"],
        );
    }

    let (model, _vs) = EncoderDecoder::init(&small_enc_dec(), DType::F32, &cpu(), 0)?;
    let long = rand_ids(&mut rng, 1, 17, 0, 20)?;
    let short = rand_ids(&mut rng, 1, 3, 0, 20)?;
    check(
        "encoder-decoder source 17, max_len 16",
        model.forward(&long, &short, None, None, false).map(|_| ()),
        &["17", "max_len", "16"],
    );
    check(
        "encoder-decoder target 17, max_len 16",
        model.forward(&short, &long, None, None, false).map(|_| ()),
        &["17", "max_len", "16"],
    );
    let (enc, _vs) = EncoderOnly::init(&EncoderOnlyConfig::tiny(20), DType::F32, &cpu(), 0)?;
    check(
        "encoder-only 65 tokens, max_len 64",
        enc.forward(&rand_ids(&mut rng, 1, 65, 0, 20)?, None, None, false)
            .map(|_| ()),
        &["65", "max_len", "64"],
    );
    Ok(())
}

#[test]
fn kv_cache_past_the_context_length() -> Result<()> {
    let mut rng = Rng::new(5);
    for pos in [PositionalKind::Learned, PositionalKind::Rope] {
        let cfg = DecoderOnlyConfig {
            positional: pos,
            ..small_dec_only()
        };
        let (dec, _vs) = DecoderOnly::init(&cfg, DType::F32, &cpu(), 0)?;
        let mut caches = dec.new_cache();
        dec.forward_cached(&rand_ids(&mut rng, 2, 6, 0, 20)?, &mut caches)?;
        dec.forward_cached(&rand_ids(&mut rng, 2, 2, 0, 20)?, &mut caches)?;
        check(
            &format!("decoder-only {pos:?} cache 8 + 1, block 8"),
            dec.forward_cached(&rand_ids(&mut rng, 2, 1, 0, 20)?, &mut caches)
                .map(|_| ()),
            &["9", "block_size", "8"],
        );
        // The failed step left the caches as they were.
        assert!(caches.iter().all(|c| c.len() == 8));
        let mut short = vec![KvCache::new()];
        check(
            "decoder-only 1 cache for 2 layers",
            dec.forward_cached(&rand_ids(&mut rng, 2, 1, 0, 20)?, &mut short)
                .map(|_| ()),
            &["1 caches", "2 layers"],
        );
    }

    // Encoder-decoder: decoding steps past max_len.
    let (model, _vs) = EncoderDecoder::init(&small_enc_dec(), DType::F32, &cpu(), 0)?;
    let memory = model.encode(&rand_ids(&mut rng, 1, 4, 0, 20)?, &Masks::none(), false)?;
    let mut state = model.start_decoding(&memory)?;
    model.decode_step(
        &rand_ids(&mut rng, 1, 16, 0, 20)?,
        &memory,
        None,
        &mut state,
        NeedWeights::No,
    )?;
    check(
        "encoder-decoder step 17, max_len 16",
        model
            .decode_step(
                &rand_ids(&mut rng, 1, 1, 0, 20)?,
                &memory,
                None,
                &mut state,
                NeedWeights::No,
            )
            .map(|_| ()),
        &["17", "max_len", "16"],
    );
    Ok(())
}

#[test]
fn empty_and_mismatched_batches() -> Result<()> {
    let mut rng = Rng::new(6);
    let (dec, _vs) = DecoderOnly::init(&small_dec_only(), DType::F32, &cpu(), 0)?;
    // Empty prompts and batches (candle's own message was "empty tensor for reduce").
    let empty = Tensor::zeros((1, 0), DType::U32, &cpu())?;
    check(
        "decoder-only empty prompt",
        dec.forward(&empty, false).map(|_| ()),
        &["token ids", "[1, 0]"],
    );
    let (model, _vs) = EncoderDecoder::init(&small_enc_dec(), DType::F32, &cpu(), 0)?;
    let src = rand_ids(&mut rng, 2, 3, 0, 20)?;
    check(
        "encoder-decoder empty batch",
        model
            .forward(
                &Tensor::zeros((0, 3), DType::U32, &cpu())?,
                &src,
                None,
                None,
                false,
            )
            .map(|_| ()),
        &["token ids", "[0, 3]"],
    );
    // A cached step whose batch differs from the cache's: an error (candle's message), no panic.
    let mut caches = dec.new_cache();
    dec.forward_cached(&rand_ids(&mut rng, 2, 3, 0, 20)?, &mut caches)?;
    let r = dec.forward_cached(&rand_ids(&mut rng, 3, 1, 0, 20)?, &mut caches);
    let msg = expect_err(r, &[]);
    println!("{:<40} {msg}", "decoder-only batch 3 against cache of 2");

    let (enc, _vs) = EncoderOnly::init(&EncoderOnlyConfig::tiny(20), DType::F32, &cpu(), 0)?;
    let no_types = EncoderOnlyConfig {
        type_vocab_size: 0,
        ..EncoderOnlyConfig::tiny(20)
    };
    let (plain, _vs) = EncoderOnly::init(&no_types, DType::F32, &cpu(), 0)?;
    let ids = rand_ids(&mut rng, 2, 3, 0, 20)?;
    check(
        "token types for type_vocab_size 0",
        plain
            .forward(&ids, Some(&ids.zeros_like()?), None, false)
            .map(|_| ()),
        &["token types", "type_vocab_size 0"],
    );
    check(
        "classify without a head",
        enc.classify(&ids, None, false).map(|_| ()),
        &["n_classes"],
    );
    Ok(())
}
