//! GGUF import on files written here the way llama.cpp's converter writes a Llama checkpoint:
//! Hugging Face-layout weights (half-split RoPE), W_q / W_k rows permuted to adjacent pairs,
//! llama.cpp's tensor names and metadata keys. The imported model must compute what the
//! original computes, and every defect of the file must be an error that names it.
//!
//! Dimension letters: `B` batch, `T` time, `E` d_model, `H` heads, `D` head width.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, rand_ids, randomize_params};
use transformer::import::gguf::{load_decoder_only, GgufFile};
use transformer::models::{DecoderOnly, DecoderOnlyConfig, FamilyConfig};
use transformer::nn::{Activation, MlpKind, NormKind, PositionalKind, RopeLayout, VarStore};
use transformer::rng::Rng;
use transformer::Result;

/// A small Llama: 4 heads over 2 key/value heads of width 8 (E = 32), SwiGLU, RMS norm.
fn llama(tie: bool) -> DecoderOnlyConfig {
    DecoderOnlyConfig {
        vocab_size: 64,
        block_size: 32,
        d_model: 32,
        n_heads: 4,
        n_kv_heads: Some(2),
        n_layers: 2,
        d_ff: 64,
        norm: NormKind::RmsNorm,
        layer_norm_eps: 1e-5,
        mlp: MlpKind::Gated,
        activation: Activation::Silu,
        positional: PositionalKind::Rope,
        rope_theta: 100000.0,
        tie_embeddings: tie,
        ..DecoderOnlyConfig::tiny(64)
    }
}

fn original(cfg: &DecoderOnlyConfig) -> Result<(DecoderOnly, VarStore)> {
    let (model, vs) = cfg.init(DType::F32, &Device::Cpu, 1)?;
    randomize_params(&vs, &mut Rng::new(2), 0.2)?;
    Ok((model, vs))
}

/// llama.cpp's `permute`: within each head, row `2j + s` of the file is row `s·D/2 + j` of the
/// Hugging Face weight.
fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, e) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, e))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, e))?)
}

type Metadata = Vec<(String, Value)>;
type Tensors = Vec<(String, QTensor)>;

/// The metadata and tensors llama.cpp's converter would write for `vs`.
fn gguf_parts(
    cfg: &DecoderOnlyConfig,
    vs: &VarStore,
    matrix: GgmlDType,
) -> Result<(Metadata, Tensors)> {
    let get = |n: &str| vs.get(n).unwrap().as_tensor().clone();
    let u = |x: usize| Value::U32(x as u32);
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("llama.context_length".into(), u(cfg.block_size)),
        ("llama.embedding_length".into(), u(cfg.d_model)),
        ("llama.block_count".into(), u(cfg.n_layers)),
        ("llama.feed_forward_length".into(), u(cfg.d_ff)),
        ("llama.attention.head_count".into(), u(cfg.n_heads)),
        (
            "llama.attention.head_count_kv".into(),
            u(cfg.n_kv_heads.unwrap()),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.layer_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
    ];
    let (h, hkv, d) = (
        cfg.n_heads,
        cfg.n_kv_heads.unwrap(),
        cfg.d_model / cfg.n_heads,
    );
    // Fresh tensors: `QTensor::quantize` (candle 0.11) reads the whole storage behind a view,
    // not just the part the view covers (and `Tensor::copy` keeps that storage).
    let own = |t: &Tensor| -> Result<Tensor> {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Tensor::from_vec(v, t.shape(), &Device::Cpu)?)
    };
    let q = |t: &Tensor| -> Result<QTensor> { Ok(QTensor::quantize(&own(t)?, matrix)?) };
    // Norms stay f32, as llama.cpp keeps them.
    let f32 = |t: &Tensor| -> Result<QTensor> { Ok(QTensor::quantize(&own(t)?, GgmlDType::F32)?) };
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            q(&get("tok_embed.weight"))?,
        ),
        ("output_norm.weight".to_string(), f32(&get("norm.weight"))?),
    ];
    if !cfg.tie_embeddings {
        tensors.push(("output.weight".into(), q(&get("lm_head.weight"))?));
    }
    for n in 0..cfg.n_layers {
        let ours = |s: &str| get(&format!("layers.{n}.{s}.weight"));
        let g = |s: &str| format!("blk.{n}.{s}.weight");
        let in_proj = ours("self_attn.in_proj");
        let wq = in_proj.narrow(0, 0, h * d)?;
        let wk = in_proj.narrow(0, h * d, hkv * d)?;
        let wv = in_proj.narrow(0, (h + hkv) * d, hkv * d)?;
        tensors.push((g("attn_norm"), f32(&ours("norm1"))?));
        tensors.push((g("attn_q"), q(&permute(&wq, h)?)?));
        tensors.push((g("attn_k"), q(&permute(&wk, hkv)?)?));
        tensors.push((g("attn_v"), q(&wv)?));
        tensors.push((g("attn_output"), q(&ours("self_attn.out_proj"))?));
        tensors.push((g("ffn_norm"), f32(&ours("norm2"))?));
        tensors.push((g("ffn_gate"), q(&ours("ff.gate_proj"))?));
        tensors.push((g("ffn_up"), q(&ours("ff.up_proj"))?));
        tensors.push((g("ffn_down"), q(&ours("ff.down_proj"))?));
    }
    Ok((meta, tensors))
}

/// Another set of the same tensors (`QTensor` is not `Clone`), in f32.
fn copies(tensors: &Tensors) -> Tensors {
    tensors
        .iter()
        .map(|(k, v)| {
            let t = v.dequantize(&Device::Cpu).unwrap();
            (k.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect()
}

fn write(path: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &tensors).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("transformer-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn expect_err<T: std::fmt::Debug>(what: &str, r: Result<T>, needles: &[&str]) {
    let e = r.expect_err(what).to_string();
    for n in needles {
        assert!(e.contains(n), "{what}: error {e:?} does not mention {n:?}");
    }
}

#[test]
fn llama_gguf_computes_what_the_original_computes() -> Result<()> {
    for tie in [false, true] {
        let cfg = llama(tie);
        let (model, vs) = original(&cfg)?;
        let (meta, tensors) = gguf_parts(&cfg, &vs, GgmlDType::F32)?;
        let path = scratch(&format!("llama-f32-{tie}.gguf"));
        write(&path, &meta, &tensors);

        let (loaded, _vs, got) = load_decoder_only(&path, &Device::Cpu, DType::F32)?;
        assert_eq!(got.rope_layout, RopeLayout::Interleaved);
        assert_eq!(got.tie_embeddings, tie);
        assert_eq!(
            DecoderOnlyConfig {
                rope_layout: RopeLayout::HalfSplit,
                init: cfg.init,
                ..got.clone()
            },
            DecoderOnlyConfig {
                // GGUF keeps the epsilon in f32.
                layer_norm_eps: cfg.layer_norm_eps as f32 as f64,
                ..cfg.clone()
            },
            "the metadata gives back the config"
        );
        let ids = rand_ids(&mut Rng::new(3), 2, 12, 0, 64)?;
        let want = model.forward(&ids, false)?;
        let d = max_abs_diff(&loaded.forward(&ids, false)?, &want)?;
        assert!(d < 1e-5, "tie {tie}: logits differ by {d}");
        // Cached decoding too (the interleaved pairs with a position offset).
        let mut cache = loaded.new_cache();
        let a = loaded.forward_cached(&ids.narrow(1, 0, 7)?, &mut cache)?;
        let b = loaded.forward_cached(&ids.narrow(1, 7, 5)?, &mut cache)?;
        let d = max_abs_diff(&Tensor::cat(&[a, b], 1)?, &want)?;
        assert!(d < 1e-5, "tie {tie}: cached logits differ by {d}");
    }
    Ok(())
}

#[test]
fn quantized_llama_gguf_is_close_to_the_original() -> Result<()> {
    let cfg = llama(false);
    let (model, vs) = original(&cfg)?;
    let (meta, tensors) = gguf_parts(&cfg, &vs, GgmlDType::Q8_0)?;
    let path = scratch("llama-q8.gguf");
    write(&path, &meta, &tensors);
    let file = GgufFile::open(&path)?;
    assert_eq!(file.architecture()?, "llama");
    assert!(file.tensor_names().contains(&"blk.1.ffn_down.weight"));
    let (loaded, _, _) = load_decoder_only(&path, &Device::Cpu, DType::F32)?;
    let ids = rand_ids(&mut Rng::new(4), 1, 10, 0, 64)?;
    let want = model.forward(&ids, false)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let d = max_abs_diff(&loaded.forward(&ids, false)?, &want)?;
    // Q8_0 keeps about 2 decimal digits of each weight.
    assert!(
        d > 0.0 && d < 0.05 * scale,
        "Q8_0 logits differ by {d} (scale {scale})"
    );
    Ok(())
}

#[test]
fn bad_gguf_files_are_errors_that_name_the_problem() -> Result<()> {
    let cfg = llama(false);
    let (_, vs) = original(&cfg)?;
    let (meta, tensors) = gguf_parts(&cfg, &vs, GgmlDType::F32)?;
    let load = |name: &str, meta: &[(String, Value)], tensors: &[(String, QTensor)]| {
        let path = scratch(name);
        write(&path, meta, tensors);
        load_decoder_only(&path, &Device::Cpu, DType::F32).map(|_| ())
    };

    // Truncated: the last tensor is cut short.
    let path = scratch("truncated.gguf");
    write(&path, &meta, &tensors);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    expect_err(
        "truncated",
        load_decoder_only(&path, &Device::Cpu, DType::F32).map(|_| ()),
        &["truncated.gguf", "truncated", "tensor blk."],
    );
    std::fs::write(&path, &bytes[..20]).unwrap();
    expect_err(
        "header cut",
        load_decoder_only(&path, &Device::Cpu, DType::F32).map(|_| ()),
        &["truncated.gguf", "GGUF"],
    );

    // Unknown architecture.
    let mut m = meta.clone();
    m[0].1 = Value::String("mamba".into());
    expect_err(
        "architecture",
        load("mamba.gguf", &m, &tensors),
        &["mamba.gguf", "general.architecture", "mamba", "llama"],
    );

    // A missing key, and one of the wrong type.
    let m: Vec<_> = meta
        .iter()
        .filter(|(k, _)| k != "llama.block_count")
        .cloned()
        .collect();
    expect_err(
        "missing key",
        load("nokey.gguf", &m, &tensors),
        &["llama.block_count", "absent"],
    );
    let mut m = meta.clone();
    m[3].1 = Value::String("two".into());
    expect_err(
        "key type",
        load("keytype.gguf", &m, &tensors),
        &["llama.block_count", "integer", "two"],
    );

    // A partial rotary width.
    let mut m = meta.clone();
    m.push(("llama.rope.dimension_count".into(), Value::U32(4)));
    expect_err(
        "partial rope",
        load("nrot.gguf", &m, &tensors),
        &["llama.rope.dimension_count", "head width 8", "U32(4)"],
    );

    // A missing tensor, one of the wrong shape, and one the model does not use.
    let t: Tensors = copies(&tensors)
        .into_iter()
        .filter(|(k, _)| k != "blk.1.ffn_up.weight")
        .collect();
    expect_err(
        "missing tensor",
        load("notensor.gguf", &meta, &t),
        &["notensor.gguf", "missing tensor blk.1.ffn_up.weight"],
    );
    let mut t = copies(&tensors);
    let i = t
        .iter()
        .position(|(k, _)| k == "blk.0.attn_k.weight")
        .unwrap();
    t[i].1 = QTensor::quantize(
        &Tensor::zeros((8, 32), DType::F32, &Device::Cpu)?,
        GgmlDType::F32,
    )?;
    expect_err(
        "wrong shape",
        load("shape.gguf", &meta, &t),
        &["blk.0.attn_k.weight", "[16, 32]", "[8, 32]"],
    );
    let mut t = copies(&tensors);
    t.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&Tensor::ones(4, DType::F32, &Device::Cpu)?, GgmlDType::F32)?,
    ));
    expect_err(
        "extra tensor",
        load("extra.gguf", &meta, &t),
        &["does not use", "rope_freqs.weight"],
    );

    // Not a file at all.
    expect_err(
        "absent",
        load_decoder_only(&scratch("absent.gguf"), &Device::Cpu, DType::F32).map(|_| ()),
        &["absent.gguf"],
    );
    Ok(())
}
