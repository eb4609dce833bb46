//! Checkpoints: a directory with the weights (`model.safetensors`), the model config
//! (`config.json`), `meta.json` (family, library version), the tokenizer (`tokenizer.json`,
//! plus `src_tokenizer.json` for a translation model with separate vocabularies),
//! the optimizer state (`optimizer.safetensors` + `optimizer.json`), the trainer state
//! (`trainer_state.json`: step, best validation loss, RNG states) and the run config
//! (`run.toml`).
//!
//! A checkpoint is written into a temporary sibling directory and then swapped in with renames,
//! so that a crash during a save never damages the previous checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::RunConfig;
use super::optim::{AdamW, AdamWState};
use crate::data::Tokenizer;
use crate::models::{
    family, read_config, write_json_atomic, LoadedModel, CONFIG_FILE, WEIGHTS_FILE,
};
use crate::nn::VarStore;
use crate::rng::Rng;
use crate::{Error, Result};

pub const META_FILE: &str = "meta.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The source-side tokenizer of a translation model with separate vocabularies
/// (`tokenizer.json` is then the target side's); absent when the vocabulary is joint.
pub const SRC_TOKENIZER_FILE: &str = "src_tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const OPTIMIZER_STATE_FILE: &str = "optimizer.json";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const RUN_CONFIG_FILE: &str = "run.toml";

/// What kind of model a directory holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The family's name in the registry (`models::FAMILIES`).
    pub family: String,
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
    /// The family's registry name.
    pub family: &'a str,
    pub model_config: &'a serde_json::Value,
    pub vs: &'a VarStore,
    pub optimizer: Option<&'a AdamW>,
    pub trainer: Option<&'a TrainerState>,
    pub tokenizer: Option<&'a Tokenizer>,
    /// The source tokenizer when it differs from `tokenizer` (separate vocabularies).
    pub src_tokenizer: Option<&'a Tokenizer>,
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

/// Write a checkpoint directory atomically. A state holding NaN or an infinity is refused
/// before anything is written, so that it never replaces a good checkpoint (callers with more
/// context, such as the trainer, check first and explain the likely cause).
pub fn save_checkpoint(dir: &Path, parts: &CheckpointParts) -> Result<()> {
    if let Some(tensor) = first_non_finite(parts.vs, parts.optimizer)? {
        return Err(Error::NonFinite {
            what: format!("saving {}", dir.display()),
            tensor,
            advice: "nothing was written; the previous checkpoint there is unchanged".into(),
        });
    }
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
            family: parts.family.to_string(),
            version: crate::version().to_string(),
        },
        &tmp.join(META_FILE),
    )?;
    if let Some(t) = parts.tokenizer {
        t.save(tmp.join(TOKENIZER_FILE))?;
    }
    if let Some(t) = parts.src_tokenizer {
        t.save(tmp.join(SRC_TOKENIZER_FILE))?;
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

/// The first parameter of `vs`, or moment of `optimizer`, holding a NaN or an infinity
/// (`parameter `name`` / `optimizer moment `name.exp_avg``). The one finiteness check of the
/// training state: every save, resume and load of a checkpoint goes through it.
pub fn first_non_finite(vs: &VarStore, optimizer: Option<&AdamW>) -> Result<Option<String>> {
    let tensors = vs.tensors();
    let named = tensors.iter().map(|(n, t)| (n.as_str(), t));
    if let Some(name) = crate::validate::first_non_finite(named)? {
        return Ok(Some(format!("parameter `{name}`")));
    }
    match optimizer {
        Some(opt) => Ok(opt
            .first_non_finite_moment()?
            .map(|name| format!("optimizer moment `{name}`"))),
        None => Ok(None),
    }
}

/// The model of a checkpoint directory, through the family its `meta.json` names, with its
/// weights checked finite ([`check_finite_weights`]).
pub fn load_model(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let meta = read_meta(dir)?;
    let fam = family(&meta.family)
        .map_err(|e| e.in_source(&dir.join(META_FILE).display().to_string()))?;
    let loaded = fam.load(dir, device, dtype)?;
    check_finite_weights(dir, &loaded.vs)?;
    Ok(loaded)
}

/// Refuse a checkpoint whose weights hold NaN or an infinity (written by a diverged run, or
/// damaged on disk), naming the first such parameter: decoding or evaluating it gives garbage.
pub fn check_finite_weights(dir: &Path, vs: &VarStore) -> Result<()> {
    match first_non_finite(vs, None)? {
        None => Ok(()),
        Some(tensor) => Err(Error::NonFinite {
            what: dir.display().to_string(),
            tensor,
            advice: "the checkpoint holds a diverged state (NaN weights) and cannot be used; \
                     train again (with a lower schedule.lr) or use an earlier checkpoint"
                .into(),
        }),
    }
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

/// What [`average_checkpoints`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AveragedFrom {
    /// The checkpoint directories whose weights were averaged, in the order given.
    pub checkpoints: Vec<PathBuf>,
}

/// The file in an averaged checkpoint that lists its sources.
pub const AVERAGED_FROM_FILE: &str = "averaged_from.json";

/// Average the weights of `dirs` (Vaswani et al. 2017, §6.1: "averaging the last 5 checkpoints")
/// into a new checkpoint directory `out`: every tensor is the element-wise mean (computed in
/// f64) of that tensor in each input. The inputs must hold the same family and model config and
/// the same tensors; `out` gets the averaged `model.safetensors`, the shared `config.json` and
/// `meta.json`, the tokenizer files and `run.toml` of the last input, and
/// [`AVERAGED_FROM_FILE`]. No optimizer or trainer state: the result is for translating and
/// evaluating, not for resuming.
pub fn average_checkpoints(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let Some(last) = dirs.last() else {
        return Err(Error::msg(
            "checkpoint averaging needs at least one checkpoint",
        ));
    };
    for d in dirs {
        require_files(d, &[META_FILE, CONFIG_FILE, WEIGHTS_FILE])?;
        if out.exists() && same_dir(d, out) {
            return Err(Error::msg(format!(
                "{}: the output directory is one of the checkpoints being averaged",
                out.display()
            )));
        }
    }
    let meta = read_meta(last)?;
    let config = read_model_config(last)?;
    let mut sums: Vec<(String, Vec<usize>, Vec<f64>)> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        if read_meta(d)?.family != meta.family || read_model_config(d)? != config {
            return Err(Error::msg(format!(
                "{} and {} hold different models (family or config.json differ); only \
                 checkpoints of one run can be averaged",
                d.display(),
                last.display()
            )));
        }
        let path = d.join(WEIGHTS_FILE);
        let tensors = crate::nn::var_store::read_safetensors(&path)?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        if i == 0 {
            for name in names {
                let t = &tensors[name];
                let values = t.flatten_all()?.to_dtype(candle_core::DType::F64)?;
                sums.push((name.clone(), t.dims().to_vec(), values.to_vec1::<f64>()?));
            }
            continue;
        }
        if names.len() != sums.len() || names.iter().zip(&sums).any(|(a, (b, _, _))| *a != b) {
            return Err(Error::Weights {
                source_name: path.display().to_string(),
                msg: format!(
                    "holds other tensors than {}",
                    dirs[0].join(WEIGHTS_FILE).display()
                ),
            });
        }
        for (name, dims, sum) in sums.iter_mut() {
            let t = &tensors[name.as_str()];
            if t.dims() != dims.as_slice() {
                return Err(Error::Weights {
                    source_name: path.display().to_string(),
                    msg: format!("{name}: shape {:?}, expected {dims:?}", t.dims()),
                });
            }
            let values = t.flatten_all()?.to_dtype(candle_core::DType::F64)?;
            for (s, v) in sum.iter_mut().zip(values.to_vec1::<f64>()?) {
                *s += v;
            }
        }
    }
    let n = dirs.len() as f64;
    let mut averaged = HashMap::with_capacity(sums.len());
    for (name, dims, sum) in sums {
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        // An input from a diverged run would make the average NaN: refuse before writing.
        if mean.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: "checkpoint averaging".into(),
                tensor: format!("the mean of parameter `{name}`"),
                advice: "one of the checkpoints holds NaN or inf weights; leave it out".into(),
            });
        }
        let t = Tensor::from_vec(mean, dims, &candle_core::Device::Cpu)?;
        averaged.insert(name, t);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let weights = out.join(WEIGHTS_FILE);
    let tmp = out.join(format!("{WEIGHTS_FILE}.tmp-write"));
    candle_core::safetensors::save(&averaged, &tmp).map_err(|e| Error::Weights {
        source_name: tmp.display().to_string(),
        msg: format!("cannot write: {e}"),
    })?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    write_json_atomic(&config, &out.join(CONFIG_FILE))?;
    write_json_atomic(&meta, &out.join(META_FILE))?;
    for f in [TOKENIZER_FILE, SRC_TOKENIZER_FILE, RUN_CONFIG_FILE] {
        let (src, dst) = (last.join(f), out.join(f));
        if src.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        } else if dst.exists() {
            // A stale file from an earlier average into the same directory.
            std::fs::remove_file(&dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    write_json_atomic(
        &AveragedFrom {
            checkpoints: dirs.to_vec(),
        },
        &out.join(AVERAGED_FROM_FILE),
    )
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{EncoderDecoder, EncoderDecoderConfig};
    use candle_core::{DType, Device};

    fn save(dir: &Path, seed: u64, cfg: &EncoderDecoderConfig) -> VarStore {
        let (_, vs) = EncoderDecoder::init(cfg, DType::F32, &Device::Cpu, seed).unwrap();
        let json = serde_json::to_value(cfg).unwrap();
        save_checkpoint(
            dir,
            &CheckpointParts {
                family: "encoder_decoder",
                model_config: &json,
                vs: &vs,
                optimizer: None,
                trainer: None,
                tokenizer: None,
                src_tokenizer: None,
                run_config: None,
            },
        )
        .unwrap();
        vs
    }

    #[test]
    fn a_non_finite_state_is_never_saved_over_a_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let cfg = EncoderDecoderConfig::tiny(20);
        let vs = save(&dir, 1, &cfg);
        let before = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let var = vs.get("encoder.norm.weight").unwrap();
        var.set(&(var.as_tensor().ones_like().unwrap() * f64::INFINITY).unwrap())
            .unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        let e = save_checkpoint(
            &dir,
            &CheckpointParts {
                family: "encoder_decoder",
                model_config: &json,
                vs: &vs,
                optimizer: None,
                trainer: None,
                tokenizer: None,
                src_tokenizer: None,
                run_config: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("encoder.norm.weight") && e.contains("not finite"),
            "{e}"
        );
        assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(), before);
        let e = check_finite_weights(&dir, &vs).unwrap_err().to_string();
        assert!(e.contains("encoder.norm.weight"), "{e}");
    }

    #[test]
    fn averaging_two_checkpoints_gives_the_mean_of_their_weights() {
        let root = tempfile::tempdir().unwrap();
        let cfg = EncoderDecoderConfig::tiny(20);
        let a = save(&root.path().join("a"), 1, &cfg);
        let b = save(&root.path().join("b"), 2, &cfg);
        let out = root.path().join("avg");
        let dirs = vec![root.path().join("a"), root.path().join("b")];
        average_checkpoints(&dirs, &out).unwrap();

        let (_, avg) = EncoderDecoder::load(&out, &Device::Cpu).unwrap();
        let (ta, tb, tavg) = (a.tensors(), b.tensors(), avg.tensors());
        assert_eq!(tavg.len(), ta.len());
        for (name, t) in &tavg {
            let x = ta[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = tb[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for ((x, y), m) in x.iter().zip(&y).zip(&m) {
                assert_eq!(*m, ((*x as f64 + *y as f64) / 2.0) as f32, "{name}");
            }
        }
        assert_eq!(read_meta(&out).unwrap().family, "encoder_decoder");
        let from: AveragedFrom = read_config(&out.join(AVERAGED_FROM_FILE)).unwrap();
        assert_eq!(from.checkpoints, dirs);

        // Different models are refused, naming them; so is averaging into an input.
        save(&root.path().join("c"), 3, &EncoderDecoderConfig::tiny(21));
        let e = average_checkpoints(&[dirs[0].clone(), root.path().join("c")], &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("different models") && e.contains("c"), "{e}");
        let e = average_checkpoints(&dirs, &dirs[1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("output directory"), "{e}");
    }
}
