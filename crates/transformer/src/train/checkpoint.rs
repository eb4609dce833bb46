//! Checkpoints: a directory with the weights (`model.safetensors`), the model config
//! (`config.json`), `meta.json` (family, library version), the tokenizer (`tokenizer.json`),
//! the optimizer state (`optimizer.safetensors` + `optimizer.json`), the trainer state
//! (`trainer_state.json`: step, best validation loss, RNG states) and the run config
//! (`run.toml`).
//!
//! A checkpoint is written into a temporary sibling directory and then swapped in with renames,
//! so that a crash during a save never damages the previous checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::config::{Family, RunConfig};
use super::optim::{AdamW, AdamWState};
use crate::data::Tokenizer;
use crate::models::{read_config, write_json_atomic, CONFIG_FILE, WEIGHTS_FILE};
use crate::nn::VarStore;
use crate::rng::Rng;
use crate::{Error, Result};

pub const META_FILE: &str = "meta.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const OPTIMIZER_STATE_FILE: &str = "optimizer.json";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const RUN_CONFIG_FILE: &str = "run.toml";

/// What kind of model a directory holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub family: Family,
    /// Version of this library that wrote the checkpoint.
    pub version: String,
}

/// Where training stands; restored exactly on `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// Draws the training batches.
    pub data_rng: Rng,
    /// Draws the dropout masks.
    pub dropout_rng: Rng,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Wall-clock seconds spent training, summed over runs.
    pub elapsed_s: f64,
}

/// Everything a checkpoint is made of.
pub struct CheckpointParts<'a> {
    pub family: Family,
    pub model_config: &'a serde_json::Value,
    pub vs: &'a VarStore,
    pub optimizer: Option<&'a AdamW>,
    pub trainer: Option<&'a TrainerState>,
    pub tokenizer: Option<&'a Tokenizer>,
    pub run_config: Option<&'a RunConfig>,
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

/// If a crash happened between the two renames of a save, put the previous checkpoint back.
pub fn recover(dir: &Path) -> Result<()> {
    let old = sibling(dir, "old");
    if !dir.exists() && old.is_dir() {
        std::fs::rename(&old, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Write a checkpoint directory atomically.
pub fn save_checkpoint(dir: &Path, parts: &CheckpointParts) -> Result<()> {
    recover(dir)?;
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    parts.vs.save(tmp.join(WEIGHTS_FILE))?;
    write_json_atomic(parts.model_config, &tmp.join(CONFIG_FILE))?;
    write_json_atomic(
        &Meta {
            family: parts.family,
            version: crate::version().to_string(),
        },
        &tmp.join(META_FILE),
    )?;
    if let Some(t) = parts.tokenizer {
        t.save(tmp.join(TOKENIZER_FILE))?;
    }
    if let Some(opt) = parts.optimizer {
        let (state, tensors) = opt.state()?;
        let path = tmp.join(OPTIMIZER_FILE);
        candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Weights {
            source_name: path.display().to_string(),
            msg: format!("cannot write: {e}"),
        })?;
        write_json_atomic(&state, &tmp.join(OPTIMIZER_STATE_FILE))?;
    }
    if let Some(t) = parts.trainer {
        write_json_atomic(t, &tmp.join(TRAINER_STATE_FILE))?;
    }
    if let Some(r) = parts.run_config {
        let path = tmp.join(RUN_CONFIG_FILE);
        std::fs::write(&path, r.to_toml()?).map_err(|e| Error::io(&path, e))?;
    }
    let old = sibling(dir, "old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Resolve what the user pointed at: a model/checkpoint directory itself, or a run directory
/// holding `best/` and `checkpoint/` (best is preferred).
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.join(META_FILE).is_file() || path.join(CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for sub in ["best", "checkpoint"] {
        let p = path.join(sub);
        recover(&p)?;
        if p.join(META_FILE).is_file() {
            return Ok(p);
        }
    }
    if !path.exists() {
        return Err(Error::msg(format!("{}: no such directory", path.display())));
    }
    Err(Error::msg(format!(
        "{}: not a checkpoint (no {META_FILE} or {CONFIG_FILE}, and no best/ or checkpoint/ inside)",
        path.display()
    )))
}

/// Check that a checkpoint directory holds the files a use needs, naming the missing ones.
pub fn require_files(dir: &Path, files: &[&str]) -> Result<()> {
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "{}: checkpoint is missing {}",
            dir.display(),
            missing.join(", ")
        )))
    }
}

pub fn read_meta(dir: &Path) -> Result<Meta> {
    require_files(dir, &[META_FILE])?;
    read_config(&dir.join(META_FILE))
}

pub fn read_trainer_state(dir: &Path) -> Result<TrainerState> {
    require_files(dir, &[TRAINER_STATE_FILE])?;
    read_config(&dir.join(TRAINER_STATE_FILE))
}

/// Read the optimizer state written by [`save_checkpoint`] into `opt`.
pub fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<()> {
    require_files(dir, &[OPTIMIZER_FILE, OPTIMIZER_STATE_FILE])?;
    let state: AdamWState = read_config(&dir.join(OPTIMIZER_STATE_FILE))?;
    let tensors: HashMap<String, Tensor> =
        crate::nn::var_store::read_safetensors(&dir.join(OPTIMIZER_FILE))?;
    opt.load_state(&state, &tensors)
}

pub fn read_model_config(dir: &Path) -> Result<serde_json::Value> {
    require_files(dir, &[CONFIG_FILE])?;
    read_config(&dir.join(CONFIG_FILE))
}
