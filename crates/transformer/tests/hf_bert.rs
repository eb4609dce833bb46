//! Hugging Face BERT import (`transformer::import::hf_bert`) and its sentence embeddings
//! (`transformer::pipelines::embed`) on small checkpoints that need no network: the committed `tests/fixtures/embeddings/tiny_bert` (a random `BertForPreTraining`
//! written by `tests/fixtures/gen_embeddings.py` with `torch.save`, checked against
//! transformers' `BertModel`), and directories this test writes from it to exercise the other
//! layouts (safetensors, no `bert.` prefix, `gamma`/`beta`, sentence-transformers files) and the
//! bad inputs, whose errors must name the file and the mismatch.
//!
//! Dimension letters: `B` batch 3, `T` tokens 9, `E` hidden 16.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use serde_json::Value;
use transformer::import::hf_bert::read_weights;
use transformer::models::Pooling;
use transformer::nn::AttnMask;
use transformer::pipelines::embed::HfBert;
use transformer::Result;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/embeddings/tiny_bert")
}

fn expected() -> Value {
    let path = fixture_dir().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/fixtures/gen_embeddings.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("expected.json is JSON")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn u32_rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// The error message of `r`, which must be an `Err` containing every string in `parts`.
#[track_caller]
fn expect_err<T>(r: Result<T>, parts: &[&str]) -> String {
    let msg = match r {
        Ok(_) => panic!("expected an error containing {parts:?}, got Ok"),
        Err(e) => e.to_string(),
    };
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
    println!("error as expected: {msg}");
    msg
}

/// Hidden states of the fixture's padded batch, and its padding mask.
///
/// # Shapes
/// → (B, T, E), mask (B, T)
fn hidden_of_fixture_batch(m: &HfBert, exp: &Value) -> Result<(Tensor, AttnMask)> {
    let rows = u32_rows(&exp["batch_ids"]);
    let (b, t) = (rows.len(), rows[0].len());
    let ids = Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)?;
    let lengths: Vec<usize> = u32_rows(&exp["attention_mask"])
        .iter()
        .map(|r| r.iter().filter(|&&x| x == 1).count())
        .collect();
    let mask = AttnMask::from_lengths(&lengths, t, &Device::Cpu)?;
    Ok((m.model.forward(&ids, None, Some(&mask), false)?, mask))
}

/// Load `dir` and compare its hidden states and pooler output with transformers'.
fn check_matches_transformers(dir: &Path) -> Result<()> {
    let exp = expected();
    let m = HfBert::load(dir, &Device::Cpu)?;
    let (hidden, _) = hidden_of_fixture_batch(&m, &exp)?;
    let shape: Vec<usize> = exp["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(hidden.dims(), shape.as_slice());
    let want = Tensor::from_vec(
        f32s(&exp["last_hidden_state"]),
        shape.as_slice(),
        &Device::Cpu,
    )?;
    let diff = max_abs_diff(&hidden, &want)?;
    println!(
        "{}: last_hidden_state max |diff| = {diff:.2e}",
        dir.display()
    );
    assert!(diff <= 1e-5, "last_hidden_state differs by {diff}");

    // BertPooler: tanh(dense(h[:, 0])).
    let w = m
        .vars
        .get("pooler.weight")
        .expect("the fixture has a pooler");
    let bias = m.vars.get("pooler.bias").expect("pooler bias");
    let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?; // (B, E)
    let pooled = cls
        .matmul(&w.as_tensor().t()?)?
        .broadcast_add(bias.as_tensor())?
        .tanh()?;
    let want = Tensor::from_vec(f32s(&exp["pooler_output"]), pooled.dims(), &Device::Cpu)?;
    let diff = max_abs_diff(&pooled, &want)?;
    println!("{}: pooler_output max |diff| = {diff:.2e}", dir.display());
    assert!(diff <= 1e-5, "pooler_output differs by {diff}");
    Ok(())
}

#[test]
fn pytorch_checkpoint_with_prefix_and_heads_matches_transformers() -> Result<()> {
    // pytorch_model.bin read through candle's pickle reader: `bert.` prefix, MLM/NSP heads and
    // the position_ids buffer are present and must be handled.
    check_matches_transformers(&fixture_dir())
}

#[test]
fn tokenizer_matches_the_python_tokenizer() -> Result<()> {
    let exp = expected();
    let m = HfBert::load(&fixture_dir(), &Device::Cpu)?;
    let opts = m.embed_options();
    let texts = exp["texts"].as_array().unwrap();
    for (text, ids) in texts.iter().zip(u32_rows(&exp["input_ids"])) {
        assert_eq!(m.tokenize(text.as_str().unwrap(), &opts)?, ids, "{text}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hand-made directories
// ---------------------------------------------------------------------------------------------

/// A model directory in a temporary folder, made from the fixture: `config.json` (as a JSON
/// value, to edit), the tensors (to rename, reshape or drop) and `tokenizer.json`.
struct Checkpoint {
    config: Value,
    tensors: HashMap<String, Tensor>,
    tokenizer: bool,
}

impl Checkpoint {
    fn from_fixture() -> Result<Self> {
        let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
        let (tensors, _) = read_weights(&fixture_dir())?;
        Ok(Checkpoint {
            config: serde_json::from_str(&text).unwrap(),
            tensors,
            tokenizer: true,
        })
    }

    /// Rename every tensor by `f`; None drops it.
    fn rename(mut self, f: impl Fn(&str) -> Option<String>) -> Self {
        self.tensors = self
            .tensors
            .into_iter()
            .filter_map(|(k, v)| f(&k).map(|k| (k, v)))
            .collect();
        self
    }

    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config).unwrap(),
        )
        .unwrap();
        candle_core::safetensors::save(&self.tensors, dir.join("model.safetensors"))?;
        if self.tokenizer {
            std::fs::copy(
                fixture_dir().join("tokenizer.json"),
                dir.join("tokenizer.json"),
            )
            .unwrap();
        }
        Ok(())
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

#[test]
fn safetensors_without_prefix_and_with_gamma_beta_load_alike() -> Result<()> {
    let t = tmp();
    // Only the BERT body, no `bert.` prefix (BertModel.save_pretrained), safetensors.
    let plain = t.path().join("plain");
    Checkpoint::from_fixture()?
        .rename(|k| k.strip_prefix("bert.").map(str::to_string))
        .write(&plain)?;
    check_matches_transformers(&plain)?;
    // TensorFlow-era LayerNorm names, prefix kept, heads kept.
    let old = t.path().join("gamma_beta");
    Checkpoint::from_fixture()?
        .rename(|k| {
            Some(
                k.replace("LayerNorm.weight", "LayerNorm.gamma")
                    .replace("LayerNorm.bias", "LayerNorm.beta"),
            )
        })
        .write(&old)?;
    check_matches_transformers(&old)
}

#[test]
fn checkpoint_without_pooler_loads_without_one() -> Result<()> {
    let t = tmp();
    Checkpoint::from_fixture()?
        .rename(|k| (!k.contains("pooler")).then(|| k.to_string()))
        .write(t.path())?;
    let m = HfBert::load(t.path(), &Device::Cpu)?;
    assert!(m.vars.get("pooler.weight").is_none());
    assert!(!m.model.config().pooler);
    Ok(())
}

#[test]
fn missing_files_are_named() -> Result<()> {
    let t = tmp();
    let dir = t.path();
    expect_err(
        HfBert::load(&dir.join("nope"), &Device::Cpu),
        &["nope", "not a directory"],
    );
    expect_err(HfBert::load(dir, &Device::Cpu), &["config.json", "missing"]);

    let mut ck = Checkpoint::from_fixture()?;
    ck.tokenizer = false;
    ck.write(dir)?;
    expect_err(
        HfBert::load(dir, &Device::Cpu),
        &["tokenizer.json", "missing"],
    );

    std::fs::copy(
        fixture_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    expect_err(
        HfBert::load(dir, &Device::Cpu),
        &["model.safetensors", "pytorch_model.bin"],
    );

    std::fs::write(dir.join("pytorch_model.bin"), b"not a zip").unwrap();
    expect_err(
        HfBert::load(dir, &Device::Cpu),
        &["pytorch_model.bin", "cannot read"],
    );
    Ok(())
}

#[test]
fn other_architectures_are_refused() -> Result<()> {
    let t = tmp();
    let mut ck = Checkpoint::from_fixture()?;
    ck.config["model_type"] = "gpt2".into();
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["config.json", "model_type", "\"gpt2\"", "\"bert\""],
    );

    let mut ck = Checkpoint::from_fixture()?;
    ck.config.as_object_mut().unwrap().remove("model_type");
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["config.json", "model_type"],
    );

    let mut ck = Checkpoint::from_fixture()?;
    ck.config["hidden_act"] = "swish".into();
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["config.json", "hidden_act", "swish"],
    );

    let mut ck = Checkpoint::from_fixture()?;
    ck.config["position_embedding_type"] = "relative_key".into();
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["config.json", "position_embedding_type", "relative_key"],
    );

    let mut ck = Checkpoint::from_fixture()?;
    ck.config["num_attention_heads"] = 5.into(); // 16 is not divisible by 5
    ck.write(t.path())?;
    expect_err(HfBert::load(t.path(), &Device::Cpu), &["config.json", "5"]);
    Ok(())
}

#[test]
fn wrong_shapes_name_the_tensor_and_both_shapes() -> Result<()> {
    let t = tmp();
    let name = "bert.encoder.layer.1.intermediate.dense.weight";
    let mut ck = Checkpoint::from_fixture()?;
    ck.tensors.insert(
        name.into(),
        Tensor::zeros((33, 16), DType::F32, &Device::Cpu)?,
    );
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["model.safetensors", name, "[32, 16]", "[33, 16]"],
    );

    // One part of the packed attention projection.
    let name = "bert.encoder.layer.0.attention.self.key.bias";
    let mut ck = Checkpoint::from_fixture()?;
    ck.tensors
        .insert(name.into(), Tensor::zeros(17, DType::F32, &Device::Cpu)?);
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &[name, "[16]", "[17]"],
    );

    // A config that disagrees with the weights: the position table is larger in the file.
    let mut ck = Checkpoint::from_fixture()?;
    ck.config["max_position_embeddings"] = 20.into();
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &[
            "bert.embeddings.position_embeddings.weight",
            "[20, 16]",
            "[24, 16]",
        ],
    );
    Ok(())
}

#[test]
fn missing_and_unused_tensors_are_named() -> Result<()> {
    let t = tmp();
    let gone = "bert.encoder.layer.1.attention.self.value.weight";
    Checkpoint::from_fixture()?
        .rename(|k| (k != gone).then(|| k.to_string()))
        .write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["model.safetensors", "missing tensors", gone],
    );

    // The weights have two layers, the config one: layer 1 is left over.
    let mut ck = Checkpoint::from_fixture()?;
    ck.config["num_hidden_layers"] = 1.into();
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["does not use", "bert.encoder.layer.1.output.dense.weight"],
    );
    Ok(())
}

#[test]
fn tokenizer_of_another_vocabulary_is_refused() -> Result<()> {
    let t = tmp();
    let mut ck = Checkpoint::from_fixture()?;
    ck.config["vocab_size"] = 36.into();
    // Keep the weights consistent with the config, so that only the tokenizer disagrees.
    let name = "bert.embeddings.word_embeddings.weight";
    ck.tensors.insert(
        name.into(),
        Tensor::zeros((36, 16), DType::F32, &Device::Cpu)?,
    );
    ck.write(t.path())?;
    expect_err(
        HfBert::load(t.path(), &Device::Cpu),
        &["tokenizer.json", "35", "config.json", "vocab_size 36"],
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sentence-transformers files and the embedding pipeline
// ---------------------------------------------------------------------------------------------

fn write_json(path: &Path, v: Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn modules(normalize: bool) -> Value {
    let mut m = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if normalize {
        m.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    Value::Array(m)
}

fn pooling_config(cls: bool, mean: bool, max: bool) -> Value {
    serde_json::json!({
        "word_embedding_dimension": 16,
        "pooling_mode_cls_token": cls,
        "pooling_mode_mean_tokens": mean,
        "pooling_mode_max_tokens": max,
        "pooling_mode_mean_sqrt_len_tokens": false
    })
}

#[test]
fn sentence_transformers_files_set_the_defaults() -> Result<()> {
    let t = tmp();
    let dir = t.path();
    Checkpoint::from_fixture()?.write(dir)?;
    // No sentence-transformers files: a plain Hugging Face model gets mean pooling.
    let opts = HfBert::load(dir, &Device::Cpu)?.embed_options();
    assert_eq!(
        (
            opts.pooling,
            opts.normalize,
            opts.max_length,
            opts.do_lower_case
        ),
        (Pooling::Mean, false, 24, false)
    );

    write_json(&dir.join("modules.json"), modules(true));
    write_json(
        &dir.join("1_Pooling/config.json"),
        pooling_config(true, false, false),
    );
    write_json(
        &dir.join("sentence_bert_config.json"),
        serde_json::json!({"max_seq_length": 6, "do_lower_case": true}),
    );
    let m = HfBert::load(dir, &Device::Cpu)?;
    let opts = m.embed_options();
    assert_eq!(
        (
            opts.pooling,
            opts.normalize,
            opts.max_length,
            opts.do_lower_case
        ),
        (Pooling::Cls, true, 6, true)
    );
    // Truncation keeps [CLS] first and [SEP] last.
    let ids = m.tokenize("the cat sat on the mat and the dog ran", &opts)?;
    assert_eq!(ids.len(), 6);
    assert_eq!((ids[0], ids[5]), (2, 3), "[CLS] ... [SEP]: {ids:?}");
    let e = m.embed(&["the cat", "a dog ran to the big house"], &opts)?;
    let norms = e.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
    Ok(())
}

#[test]
fn unsupported_sentence_transformers_modules_are_named() -> Result<()> {
    let t = tmp();
    let dir = t.path();
    Checkpoint::from_fixture()?.write(dir)?;
    write_json(&dir.join("modules.json"), modules(false));
    write_json(
        &dir.join("1_Pooling/config.json"),
        pooling_config(false, false, true),
    );
    expect_err(
        HfBert::load(dir, &Device::Cpu),
        &["1_Pooling/config.json", "pooling_mode_max_tokens"],
    );
    write_json(
        &dir.join("1_Pooling/config.json"),
        pooling_config(false, true, false),
    );
    let mut m = modules(true);
    m.as_array_mut().unwrap().push(serde_json::json!(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    ));
    write_json(&dir.join("modules.json"), m);
    expect_err(
        HfBert::load(dir, &Device::Cpu),
        &["modules.json", "sentence_transformers.models.Dense"],
    );
    Ok(())
}

#[test]
fn embeddings_do_not_depend_on_batching_or_padding() -> Result<()> {
    let m = HfBert::load(&fixture_dir(), &Device::Cpu)?;
    let texts = [
        "the cat sat on the mat.",
        "",
        "a big dog ran to the small red house and jumped over the blue mat!",
        "x",
        "run, jump, run",
    ];
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let mut opts = m.embed_options();
        opts.pooling = pooling;
        let all = m.embed(&texts, &opts)?; // (N, E), in input order
        assert_eq!(all.dims(), &[texts.len(), 16]);
        opts.batch_size = 2;
        let batched = m.embed(&texts, &opts)?;
        for (i, text) in texts.iter().enumerate() {
            let alone = m.embed(&[text], &opts)?;
            let diff = max_abs_diff(&alone, &all.narrow(0, i, 1)?)?;
            assert!(
                diff <= 1e-5,
                "{pooling:?} text {i}: alone vs batch differs by {diff}"
            );
            let diff = max_abs_diff(&alone, &batched.narrow(0, i, 1)?)?;
            assert!(
                diff <= 1e-5,
                "{pooling:?} text {i}: batch of 2 differs by {diff}"
            );
        }
    }
    assert_eq!(m.embed(&[], &m.embed_options())?.dims(), &[0, 16]);
    Ok(())
}

#[test]
fn bad_embed_options_are_errors() -> Result<()> {
    let m = HfBert::load(&fixture_dir(), &Device::Cpu)?;
    let mut opts = m.embed_options();
    opts.max_length = 25;
    expect_err(m.embed(&["x"], &opts), &["max_length", "24", "25"]);
    opts.max_length = 2;
    expect_err(m.embed(&["x"], &opts), &["max_length", "3..=24", "got 2"]);
    let mut opts = m.embed_options();
    opts.batch_size = 0;
    expect_err(m.embed(&["x"], &opts), &["batch_size"]);
    Ok(())
}
