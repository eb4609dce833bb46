//! Speech recognition with Whisper: from a model directory and audio to a transcript.
//!
//! A model directory is either
//! - CTranslate2's (faster-whisper's): `model.bin`, its `config.json` (`suppress_ids`,
//!   `suppress_ids_begin`), `tokenizer.json`; read by [`import::ctranslate2`]; or
//! - Hugging Face's: `config.json`, `model.safetensors`, `tokenizer.json`, and
//!   `generation_config.json` (the suppression lists; older checkpoints keep them in
//!   `config.json`); read by [`import::hf_whisper`].
//!
//! `preprocessor_config.json`, where present, must agree with the model's mel bins.
//!
//! [`import::ctranslate2`]: crate::import::ctranslate2
//! [`import::hf_whisper`]: crate::import::hf_whisper

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::data::audio::{Audio, LogMel, MelConfig, WHISPER_SAMPLE_RATE};
use crate::decode::whisper::{transcribe, Transcript, WhisperOptions, WhisperTokens};
use crate::import::{ctranslate2, hf_whisper};
use crate::models::{Whisper, WhisperConfig};
use crate::{Error, Result};

/// The format a model directory is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhisperFormat {
    CTranslate2,
    HuggingFace,
}

/// A loaded Whisper with its tokenizer, special tokens and front end.
pub struct SpeechModel {
    pub model: Whisper,
    pub config: WhisperConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub tokens: WhisperTokens,
    pub mel: LogMel,
    pub format: WhisperFormat,
    pub dir: PathBuf,
    device: Device,
}

fn ids_field(v: &serde_json::Value, key: &str, path: &Path) -> Result<Option<Vec<u32>>> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            format!("{}: {key}", path.display()),
                            "a list of token ids",
                            x.to_string(),
                        )
                    })
            })
            .collect::<Result<Vec<u32>>>()
            .map(Some),
        Some(other) => Err(Error::invalid(
            format!("{}: {key}", path.display()),
            "a list of token ids",
            other.to_string(),
        )),
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    crate::models::config_from_json(&text, &path.display().to_string()).map(Some)
}

impl SpeechModel {
    /// Load a model directory (or a CTranslate2 `model.bin` inside one), in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let dir = if path.is_file() {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        if !dir.is_dir() {
            return Err(Error::Path {
                path: path.to_path_buf(),
                problem: "not a Whisper model directory (it does not exist)".into(),
            });
        }
        let (format, (model, _vs, config)) = if dir.join("model.bin").is_file() {
            (
                WhisperFormat::CTranslate2,
                ctranslate2::load_whisper(&dir.join("model.bin"), device)?,
            )
        } else if dir.join(crate::models::WEIGHTS_FILE).is_file() {
            (WhisperFormat::HuggingFace, hf_whisper::load(&dir, device)?)
        } else {
            return Err(Error::Path {
                path: dir.clone(),
                problem: "not a Whisper model directory: it has neither model.bin (CTranslate2) \
                          nor model.safetensors (Hugging Face)"
                    .into(),
            });
        };
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::Path {
                path: tok_path,
                problem: "missing: a Whisper model directory needs its tokenizer.json".into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Path {
            path: tok_path.clone(),
            problem: format!("not a readable tokenizer ({e})"),
        })?;
        // The suppression lists.
        let (suppress, suppress_begin) = match format {
            WhisperFormat::CTranslate2 => {
                let p = dir.join("config.json");
                let v = read_json(&p)?.unwrap_or(serde_json::Value::Null);
                (
                    ids_field(&v, "suppress_ids", &p)?,
                    ids_field(&v, "suppress_ids_begin", &p)?,
                )
            }
            WhisperFormat::HuggingFace => {
                let g = dir.join("generation_config.json");
                let c = dir.join("config.json");
                let gv = read_json(&g)?.unwrap_or(serde_json::Value::Null);
                let cv = read_json(&c)?.unwrap_or(serde_json::Value::Null);
                (
                    match ids_field(&gv, "suppress_tokens", &g)? {
                        Some(v) => Some(v),
                        None => ids_field(&cv, "suppress_tokens", &c)?,
                    },
                    match ids_field(&gv, "begin_suppress_tokens", &g)? {
                        Some(v) => Some(v),
                        None => ids_field(&cv, "begin_suppress_tokens", &c)?,
                    },
                )
            }
        };
        let tokens = WhisperTokens::from_tokenizer(
            &tokenizer,
            config.vocab_size,
            suppress.unwrap_or_default(),
            // openai-whisper's SuppressBlank: " " and end-of-text.
            match suppress_begin {
                Some(v) => v,
                None => {
                    let mut v: Vec<u32> = tokenizer.token_to_id("Ġ").into_iter().collect();
                    v.extend(tokenizer.token_to_id("<|endoftext|>"));
                    v
                }
            },
        )
        .map_err(|e| Error::msg(format!("{}: {e}", tok_path.display())))?;
        let pre = dir.join("preprocessor_config.json");
        if let Some(v) = read_json(&pre)? {
            if let Some(n) = v.get("feature_size").and_then(|x| x.as_u64()) {
                if n as usize != config.num_mel_bins {
                    return Err(Error::invalid(
                        format!("{}: feature_size", pre.display()),
                        format!("the model's {} mel bins", config.num_mel_bins),
                        n.to_string(),
                    ));
                }
            }
        }
        let mel = LogMel::new(MelConfig {
            chunk_length: config.n_frames() * 160 / WHISPER_SAMPLE_RATE as usize,
            ..MelConfig::whisper(config.num_mel_bins)
        })?;
        Ok(SpeechModel {
            model,
            config,
            tokenizer,
            tokens,
            mel,
            format,
            dir,
            device: device.clone(),
        })
    }

    /// Transcribe mono audio at 16 kHz (`data::audio::load_audio` gives it from a file).
    pub fn transcribe(
        &self,
        audio: &Audio,
        opts: &WhisperOptions,
        progress: impl FnMut(usize, usize) + Send,
    ) -> Result<Transcript> {
        if audio.sample_rate != WHISPER_SAMPLE_RATE {
            return Err(Error::input(
                "audio for Whisper",
                format!("{WHISPER_SAMPLE_RATE} Hz"),
                format!("{} Hz", audio.sample_rate),
            ));
        }
        if audio.samples.is_empty() {
            return Err(Error::input(
                "audio for Whisper",
                "at least one sample",
                "none",
            ));
        }
        let features = self.mel.long_form(&audio.samples)?;
        crate::kernels::on_pool(|| {
            transcribe(
                &self.model,
                &features,
                self.mel.config(),
                &self.tokens,
                opts,
                &self.device,
                progress,
            )
        })
    }

    /// The text of tokens (special tokens and timestamps left out).
    pub fn text(&self, ids: &[u32]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| id < self.tokens.eot)
            .collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| Error::msg(format!("decoding tokens: {e}")))
    }
}
