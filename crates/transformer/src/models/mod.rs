//! The model families behind one seam (`family`: the [`FamilyConfig`] trait, the registry
//! [`FAMILIES`] and the capability traits), each with a serde `Config` saved as `config.json`
//! beside its weights (`model.safetensors`) and named presets.

pub mod decoder_only;
pub mod encoder_decoder;
pub mod encoder_only;
pub mod family;
pub mod vit;
pub mod whisper;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::nn::VarStore;
use crate::{Error, Result};

pub use decoder_only::{sliding_window_mask, DecoderOnly, DecoderOnlyConfig, LayerAttention};
pub use encoder_decoder::{EncoderDecoder, EncoderDecoderConfig};
pub use encoder_only::{EncoderOnly, EncoderOnlyConfig, Pooling};
pub use family::{
    family, AnyConfig, CausalLm, EncoderModel, Family, FamilyConfig, ImageClassifier, LoadedModel,
    Model, Seq2Seq, Source, FAMILIES,
};
pub use vit::{ViT, ViTConfig, ViTOptions, ViTOutput};
pub use whisper::{Whisper, WhisperConfig};

/// File names inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Parse a config from JSON text; `what` names the source in errors. serde's message names a
/// missing or unknown field, the expected type and the line/column; for a value of the wrong
/// type or an unknown variant it gives only the position, so the field is added from there.
pub fn config_from_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|source| {
        let what = match key_at_error(text, &source) {
            Some(field) => format!("{what}: field `{field}`"),
            None => what.to_string(),
        };
        Error::Json { what, source }
    })
}

/// The key of the last `"key":` before a data error's position (the field whose value failed),
/// unless serde's message already names a field.
fn key_at_error(text: &str, err: &serde_json::Error) -> Option<String> {
    if !err.is_data() || err.line() == 0 || err.to_string().contains("field `") {
        return None;
    }
    // Byte offset of (line, column), both 1-based.
    let line_start: usize = text
        .split_inclusive('\n')
        .take(err.line() - 1)
        .map(str::len)
        .sum();
    let end = (line_start + err.column()).min(text.len());
    let (mut key, mut last, mut current) = (None, Vec::new(), Vec::new());
    let (mut in_string, mut escaped) = (false, false);
    for &b in &text.as_bytes()[..end] {
        if in_string {
            match b {
                _ if escaped => {
                    escaped = false;
                    current.push(b);
                }
                b'\\' => escaped = true,
                b'"' => {
                    in_string = false;
                    last = std::mem::take(&mut current);
                }
                _ => current.push(b),
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b':' {
            key = Some(last.clone());
        }
    }
    key.map(|k| String::from_utf8_lossy(&k).into_owned())
}

/// Read `config.json`-style files.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    config_from_json(&text, &path.display().to_string())
}

/// Write `value` as pretty JSON through a temporary file and a rename, so that a crash never
/// leaves a half-written file behind.
pub fn write_json_atomic<T: Serialize>(value: &T, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        what: path.display().to_string(),
        source,
    })?;
    write_atomic(path, text.as_bytes())
}

/// Write bytes through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Save a model directory: `config.json` and `model.safetensors`.
pub fn save_model<T: Serialize>(dir: &Path, config: &T, vs: &VarStore) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp-write"));
    vs.save(&tmp)?;
    let dst = dir.join(WEIGHTS_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    write_json_atomic(config, &dir.join(CONFIG_FILE))
}

/// Check that a model directory holds its two files, naming what is missing.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Path {
            path: dir.to_path_buf(),
            problem: "not a directory".into(),
        });
    }
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        if !dir.join(f).is_file() {
            return Err(Error::Path {
                path: dir.to_path_buf(),
                problem: format!("missing {f}"),
            });
        }
    }
    Ok(())
}

fn default_true() -> bool {
    true
}

fn default_eps() -> f64 {
    1e-5
}

fn default_theta() -> f64 {
    10000.0
}

fn is_default_theta(v: &f64) -> bool {
    *v == default_theta()
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
