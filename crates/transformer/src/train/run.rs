//! From a [`RunConfig`] to a ready [`Trainer`] and its [`Task`]: tokenizer, data, model,
//! optimizer — fresh or resumed from the run directory's checkpoint.

use std::path::Path;

use candle_core::{DType, Device};

use super::checkpoint::{self, TOKENIZER_FILE};
use super::config::{DataConfig, ModelConfig, RunConfig};
use super::loss::CrossEntropyConfig;
use super::optim::AdamW;
use super::tasks::{reverse_pair, LmTask, PairSource, Seq2SeqTask};
use super::trainer::{Task, Trainer, TrainerSetup};
use crate::data::{read_text, CharTokenizer, LmDataset, Seq2SeqIds, Tokenizer};
use crate::models::{DecoderOnly, EncoderDecoder};
use crate::rng::Rng;
use crate::{Error, Result};

/// Symbols of the generated reversal task.
pub const REVERSE_ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz0123456789";

/// The tokenizer of the reversal task: `n_symbols` letters plus `<pad>`, `<bos>`, `<eos>`.
pub fn reverse_tokenizer(n_symbols: usize) -> Result<Tokenizer> {
    if n_symbols < 2 || n_symbols > REVERSE_ALPHABET.len() {
        return Err(Error::Config(format!(
            "data.n_symbols must be in [2, {}], got {n_symbols}",
            REVERSE_ALPHABET.len()
        )));
    }
    let chars: Vec<char> = REVERSE_ALPHABET.chars().take(n_symbols).collect();
    let specials = ["<pad>", "<bos>", "<eos>"].map(String::from).to_vec();
    Ok(CharTokenizer::new(chars, specials, None)?.into())
}

/// Builds the task once the model config (vocabulary size) is known.
type TaskBuilder =
    Box<dyn FnOnce(&ModelConfig, &crate::nn::VarStore, &Tokenizer) -> Result<Box<dyn Task>>>;

/// A run ready to train.
pub struct PreparedRun {
    pub trainer: Trainer,
    pub task: Box<dyn Task>,
    pub tokenizer: Tokenizer,
    pub model_config: ModelConfig,
    pub n_params: usize,
}

/// Build the tokenizer, data, model and optimizer of `cfg` writing into `out_dir`; with
/// `resume`, continue from `out_dir/checkpoint` (its tokenizer is reused so ids never shift).
pub fn prepare_run(
    cfg: &RunConfig,
    out_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<PreparedRun> {
    cfg.validate()?;
    let ckpt_dir = out_dir.join("checkpoint");
    if resume {
        checkpoint::recover(&ckpt_dir)?;
        checkpoint::require_files(&ckpt_dir, &[TOKENIZER_FILE])?;
    }
    let saved_tokenizer = || Tokenizer::load(ckpt_dir.join(TOKENIZER_FILE));
    let seed = cfg.train.seed;
    let loss = CrossEntropyConfig {
        label_smoothing: cfg.train.label_smoothing,
        ignore_index: None,
    };
    let (tokenizer, task_builder): (Tokenizer, TaskBuilder) = match &cfg.data {
        DataConfig::Text {
            path,
            train_fraction,
        } => {
            let text = read_text(path)?;
            let tokenizer = if resume {
                saved_tokenizer()?
            } else {
                cfg.tokenizer.build(Some(&text))?
            };
            let tokens = tokenizer
                .encode(&text)
                .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
            let data = LmDataset::from_tokens(tokens, *train_fraction)?;
            let batch_size = cfg.train.batch_size;
            let device = device.clone();
            let path = path.clone();
            let builder = move |mc: &ModelConfig,
                                vs: &crate::nn::VarStore,
                                _: &Tokenizer|
                  -> Result<Box<dyn Task>> {
                let ModelConfig::DecoderOnly(c) = mc else {
                    return Err(Error::Config(
                        "data.kind = \"text\" trains a decoder_only model".into(),
                    ));
                };
                let need = c.block_size + 1;
                for (split, n) in [
                    ("training", data.train().len()),
                    ("validation", data.val().len()),
                ] {
                    if n < need {
                        return Err(Error::msg(format!(
                                "{}: the {split} split has {n} tokens, fewer than block_size + 1 = {need}",
                                path.display()
                            )));
                    }
                }
                Ok(Box::new(LmTask {
                    model: DecoderOnly::new(c, &vs.root())?,
                    data,
                    batch_size,
                    block_size: c.block_size,
                    loss,
                    device,
                }))
            };
            (tokenizer, Box::new(builder))
        }
        DataConfig::Reverse {
            n_symbols,
            min_len,
            max_len,
            n_val,
        } => {
            if *min_len == 0 || min_len > max_len {
                return Err(Error::Config(format!(
                        "data.min_len must be in [1, max_len], got min_len {min_len} and max_len {max_len}"
                    )));
            }
            let tokenizer = reverse_tokenizer(*n_symbols)?;
            let (min_len, max_len, n_val) = (*min_len, *max_len, *n_val);
            let batch_size = cfg.train.batch_size;
            let device = device.clone();
            let builder = move |mc: &ModelConfig,
                                vs: &crate::nn::VarStore,
                                tok: &Tokenizer|
                  -> Result<Box<dyn Task>> {
                let ModelConfig::EncoderDecoder(c) = mc else {
                    return Err(Error::Config(
                        "data.kind = \"reverse\" trains an encoder_decoder model".into(),
                    ));
                };
                let symbols: Vec<u32> = REVERSE_ALPHABET
                    .chars()
                    .take(tok.vocab_size() - 3)
                    .map(|ch| {
                        tok.token_to_id(&ch.to_string())
                            .expect("alphabet in vocabulary")
                    })
                    .collect();
                let mut val_rng = Rng::new(seed ^ 0x7A1_u64);
                let val = (0..n_val)
                    .map(|_| reverse_pair(&symbols, min_len, max_len, &mut val_rng))
                    .collect();
                Ok(Box::new(Seq2SeqTask {
                    model: EncoderDecoder::new(c, &vs.root())?,
                    train: PairSource::Reverse {
                        symbols,
                        min_len,
                        max_len,
                    },
                    val,
                    batch_size,
                    ids: Seq2SeqIds::from_tokenizer(tok)?,
                    loss,
                    device,
                }))
            };
            (tokenizer, Box::new(builder))
        }
    };
    let model_config = cfg.model_config(tokenizer.vocab_size())?;
    let (init, n_layers) = match &model_config {
        ModelConfig::EncoderDecoder(c) => (c.init, c.n_encoder_layers + c.n_decoder_layers),
        ModelConfig::DecoderOnly(c) => (c.init, c.n_layers),
        ModelConfig::EncoderOnly(c) => (c.init, c.n_layers),
    };
    let vs = crate::nn::VarStore::new(DType::F32, device, init, seed).with_n_layers(n_layers);
    let task = task_builder(&model_config, &vs, &tokenizer)?;
    let optimizer = AdamW::new(vs.vars(), cfg.optimizer)?;
    let setup = TrainerSetup {
        out_dir: out_dir.to_path_buf(),
        vs: vs.clone(),
        optimizer,
        schedule: cfg.schedule.clone(),
        train: cfg.train.clone(),
        family: model_config.family(),
        model_config: model_config.to_json()?,
        tokenizer: Some(tokenizer.clone()),
        run_config: Some(cfg.clone()),
    };
    let trainer = if resume {
        Trainer::resume(setup)?
    } else {
        Trainer::new(setup)?
    };
    Ok(PreparedRun {
        trainer,
        task,
        tokenizer,
        model_config,
        n_params: vs.num_params(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::trainer::Silent;

    fn corpus_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("transformer-run-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text: String = (0..400)
            .map(|i| format!("the cat sat on mat {} times.\n", i % 7))
            .collect();
        std::fs::write(dir.join("corpus.txt"), text).unwrap();
        dir
    }

    fn lm_config(dir: &Path, steps: u64) -> RunConfig {
        let toml = format!(
            r#"
[model]
family = "decoder_only"
preset = "tiny"
block_size = 16
dropout = 0.1

[data]
kind = "text"
path = "{}"

[train]
batch_size = 4
max_steps = {steps}
eval_every = 3
eval_iters = 2
log_every = 1
grad_clip = 1.0
grad_accum = 2

[optimizer]
weight_decay = 0.1

[schedule]
kind = "warmup_cosine"
lr = 1e-2
warmup_steps = 2
decay_steps = 6
min_lr = 1e-3
"#,
            dir.join("corpus.txt").display()
        );
        RunConfig::from_toml(&toml, &[], "test").unwrap()
    }

    #[test]
    fn resumed_run_reproduces_the_uninterrupted_losses() -> Result<()> {
        let dir = corpus_dir("resume");
        let cfg = lm_config(&dir, 6);
        let mut full = prepare_run(&cfg, &dir.join("full"), false, &Device::Cpu)?;
        let all = full.trainer.run(full.task.as_mut(), &mut Silent)?;
        assert_eq!(all.losses.len(), 6);

        // Stop after 3 steps (a checkpoint is written there), then resume to 6.
        let half_cfg = lm_config(&dir, 3);
        let mut first = prepare_run(&half_cfg, &dir.join("split"), false, &Device::Cpu)?;
        let a = first.trainer.run(first.task.as_mut(), &mut Silent)?;
        let mut second = prepare_run(&cfg, &dir.join("split"), true, &Device::Cpu)?;
        assert_eq!(second.trainer.state().step, 3);
        let b = second.trainer.run(second.task.as_mut(), &mut Silent)?;
        let resumed: Vec<f64> = a.losses.iter().chain(&b.losses).copied().collect();
        assert_eq!(
            resumed, all.losses,
            "resumed losses differ from the uninterrupted run"
        );
        assert!(all.losses[5] < all.losses[0]);

        let metrics =
            crate::train::trainer::read_metrics(&dir.join("split").join("metrics.jsonl"))?;
        assert_eq!(metrics.iter().filter(|r| r.event == "eval").count(), 2);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
