//! The training loop: micro-batches with gradient accumulation, clipping, AdamW with a
//! learning-rate schedule, periodic evaluation, `metrics.jsonl`, checkpoints (latest and best)
//! and exact resumption.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointParts, TrainerState};
use super::clip::{clip_grad_norm, GradAccumulator};
use super::config::{Engine, RunConfig, TrainConfig};
use super::optim::AdamW;
use super::parallel::{Collective, GradReducer, Shard};
use super::schedule::LrSchedule;
use crate::autograd;
use crate::data::Tokenizer;
use crate::nn::VarStore;
use crate::rng::Rng;
use crate::{Error, Result};

/// A model plus its data, seen by the loop as "give me a loss".
pub trait Task {
    /// One micro-batch drawn with `rng`: the scalar loss (mean over its target tokens, with
    /// the graph for backward) and the number of tokens it covered.
    ///
    /// In data-parallel training, `shard` says which rows of the batch are this rank's: the
    /// task draws the whole batch with `rng` (every rank draws the same), and computes the
    /// loss over its rows only ([`Shard::rows`]; [`Shard::empty_loss`] when there are none).
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> Result<(Tensor, usize)>;

    /// Mean validation loss over `iters` batches drawn with `rng`, without dropout.
    fn eval_loss(&mut self, rng: &mut Rng, iters: usize) -> Result<f64>;

    /// What an evaluation reports: the validation loss, and the accuracy for tasks that have
    /// one (classification).
    fn evaluate(&mut self, rng: &mut Rng, iters: usize) -> Result<Evaluation> {
        Ok(Evaluation {
            loss: self.eval_loss(rng, iters)?,
            accuracy: None,
        })
    }
}

/// The outcome of [`Task::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean validation loss (plain cross-entropy).
    pub loss: f64,
    /// Fraction of validation examples classified correctly.
    pub accuracy: Option<f64>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// `"log"` or `"eval"`.
    pub event: String,
    pub step: u64,
    /// Mean training loss since the previous record of the same kind.
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Validation accuracy of a classification task.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_accuracy: Option<f64>,
    pub lr: f64,
    pub tokens_per_sec: f64,
    pub elapsed_s: f64,
}

/// Receives progress as training runs (progress bars, plots).
pub trait Observer {
    /// After every optimizer step.
    fn on_step(&mut self, _step: u64, _max_steps: u64, _loss: f64, _lr: f64, _tokens_per_sec: f64) {
    }
    /// After every record written to `metrics.jsonl`.
    fn on_record(&mut self, _record: &MetricRecord, _all: &[MetricRecord]) {}
    /// After a checkpoint was written.
    fn on_checkpoint(&mut self, _dir: &Path, _best: bool) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub best_val_loss: Option<f64>,
    pub interrupted: bool,
    /// Loss of every optimizer step run in this call, in order.
    pub losses: Vec<f64>,
}

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Drives training of one model.
pub struct Trainer {
    out_dir: PathBuf,
    vs: VarStore,
    optimizer: AdamW,
    schedule: LrSchedule,
    cfg: TrainConfig,
    family: &'static str,
    model_config: serde_json::Value,
    tokenizer: Option<Tokenizer>,
    src_tokenizer: Option<Tokenizer>,
    run_config: Option<RunConfig>,
    state: TrainerState,
    records: Vec<MetricRecord>,
    stop: Arc<AtomicBool>,
    /// The step of the newest `checkpoint/` on disk, for the finiteness guard's message.
    saved_step: Option<u64>,
    /// The ranks of a data-parallel run ([`super::parallel::Local`] for one process).
    collective: Arc<dyn Collective>,
    /// The gradient sums of a run with more than one rank.
    reducer: Option<GradReducer>,
}

/// Pieces a [`Trainer`] is built from.
pub struct TrainerSetup {
    pub out_dir: PathBuf,
    pub vs: VarStore,
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
    pub train: TrainConfig,
    /// The family's registry name.
    pub family: &'static str,
    pub model_config: serde_json::Value,
    pub tokenizer: Option<Tokenizer>,
    /// The source tokenizer of a translation model with separate vocabularies.
    pub src_tokenizer: Option<Tokenizer>,
    pub run_config: Option<RunConfig>,
    /// The ranks this run trains on: [`super::parallel::Local`] for one process; with more,
    /// each rank trains on its shard of every batch, and only rank 0 evaluates and writes.
    pub collective: Arc<dyn Collective>,
}

/// The loss `batch` computes (with its token count) and the gradients of the `vars`, from
/// `engine`: our tape, or candle's `backward` (also for an unresolved `Auto`: see
/// [`Engine::resolve`]).
pub fn loss_and_gradients(
    engine: Engine,
    vars: &[Var],
    batch: impl FnOnce() -> Result<(Tensor, usize)>,
) -> Result<(Tensor, usize, GradStore)> {
    match engine {
        Engine::Tape => {
            let ((loss, n), tape) = autograd::record(vars, batch)?;
            let grads = tape.backward(&loss)?;
            Ok((loss, n, grads))
        }
        Engine::Candle | Engine::Auto => {
            let (loss, n) = batch()?;
            let grads = loss.backward()?;
            Ok((loss, n, grads))
        }
    }
}

/// The generator that draws the training batches of a run seeded with `seed`, as it is before
/// the first step. Tasks that replay their data order from the start (to resume exactly in the
/// middle of an epoch) start from it.
pub fn initial_data_rng(seed: u64) -> Rng {
    Rng::new(seed ^ 0x5EED_DA7A)
}

/// The directory name of the step checkpoint kept for averaging (`train.keep_last`).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The step checkpoints (`step-XXXXXX/`) in a run directory, oldest first.
pub fn step_dirs(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut dirs = Vec::new();
    let entries = match std::fs::read_dir(out_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dirs),
        Err(e) => return Err(Error::io(out_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(out_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if entry.path().is_dir() {
                dirs.push((step, entry.path()));
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

impl Trainer {
    /// A trainer starting at step 0.
    pub fn new(setup: TrainerSetup) -> Result<Self> {
        setup.train.validate()?;
        setup.schedule.validate()?;
        let state = TrainerState {
            step: 0,
            best_val_loss: None,
            data_rng: initial_data_rng(setup.train.seed),
            dropout_rng: setup.vs.dropout_rng().state(),
            tokens_seen: 0,
            elapsed_s: 0.0,
        };
        let world = setup.collective.world_size();
        let reducer = if world > 1 {
            if setup.train.batch_size < world {
                return Err(Error::invalid(
                    "train.batch_size",
                    format!("at least the number of data-parallel ranks ({world}): it is the global batch, shared out among them"),
                    setup.train.batch_size.to_string(),
                ));
            }
            Some(GradReducer::new(
                setup.collective.clone(),
                &setup.vs.all_vars(),
            )?)
        } else {
            None
        };
        if setup.collective.rank() == 0 {
            std::fs::create_dir_all(&setup.out_dir).map_err(|e| Error::io(&setup.out_dir, e))?;
        }
        let mut t = Trainer {
            out_dir: setup.out_dir,
            vs: setup.vs,
            optimizer: setup.optimizer,
            schedule: setup.schedule,
            cfg: setup.train,
            family: setup.family,
            model_config: setup.model_config,
            tokenizer: setup.tokenizer,
            src_tokenizer: setup.src_tokenizer,
            run_config: setup.run_config,
            state,
            records: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            saved_step: None,
            collective: setup.collective,
            reducer,
        };
        t.seed_rank_dropout();
        Ok(t)
    }

    /// Ranks other than 0 draw their dropout masks from a generator of their own (the same
    /// masks on every shard would correlate the ranks' noise), derived from the saved state
    /// (rank 0's), so a resumed run derives the same ones.
    fn seed_rank_dropout(&mut self) {
        let rank = self.collective.rank() as u64;
        if rank > 0 {
            let mut base = self.state.dropout_rng.clone();
            let seed = base.next_u64() ^ rank.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.vs.dropout_rng().set_state(Rng::new(seed));
        }
    }

    /// Whether this process writes checkpoints and metrics: the only one, or rank 0.
    fn leader(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Bytes each rank hands the collective per optimizer step (0 for one process).
    pub fn bytes_reduced_per_step(&self) -> usize {
        // One scalar sum per micro-batch; bytes_per_step counts the first.
        self.reducer.as_ref().map_or(0, |r| {
            r.bytes_per_step() + 3 * 8 * (self.cfg.grad_accum - 1)
        })
    }

    /// A trainer continuing from `out_dir/checkpoint`: weights, optimizer, step, RNG states
    /// and metrics up to that step are restored, so the continuation is exact.
    pub fn resume(setup: TrainerSetup) -> Result<Self> {
        let dir = setup.out_dir.join("checkpoint");
        checkpoint::recover(&dir)?;
        let mut t = Self::new(setup)?;
        checkpoint::require_files(
            &dir,
            &[
                crate::models::WEIGHTS_FILE,
                checkpoint::TRAINER_STATE_FILE,
                checkpoint::OPTIMIZER_FILE,
                checkpoint::OPTIMIZER_STATE_FILE,
            ],
        )?;
        let saved_cfg = checkpoint::read_model_config(&dir)?;
        if saved_cfg != t.model_config {
            return Err(Error::Config(format!(
                "{}: the checkpoint's model config differs from this run's; resume with the same model settings\n  checkpoint: {saved_cfg}\n  this run:   {}",
                dir.display(),
                t.model_config
            )));
        }
        t.vs.load(dir.join(crate::models::WEIGHTS_FILE))?;
        checkpoint::load_optimizer(&dir, &mut t.optimizer)?;
        t.state = checkpoint::read_trainer_state(&dir)?;
        t.saved_step = Some(t.state.step);
        // A checkpoint written by a diverged run (before this guard existed, or damaged on
        // disk) must not be trained on: every later loss would be NaN and the advice to lower
        // the learning rate would mislead.
        if let Some(tensor) = t.first_non_finite()? {
            return Err(Error::NonFinite {
                what: dir.display().to_string(),
                tensor,
                advice: "this checkpoint holds a diverged state and cannot be resumed; start \
                         over with --force, or resume from a copy of an earlier checkpoint"
                    .into(),
            });
        }
        t.vs.dropout_rng().set_state(t.state.dropout_rng.clone());
        t.seed_rank_dropout();
        // Keep the metrics written up to the checkpoint; later lines belong to the lost run.
        t.records = read_metrics(&t.out_dir.join(METRICS_FILE))?
            .into_iter()
            .filter(|r| r.step <= t.state.step)
            .collect();
        if t.leader() {
            t.rewrite_metrics()?;
        }
        Ok(t)
    }

    /// A flag that stops training (after saving a checkpoint) when set, e.g. on Ctrl-C.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    pub fn records(&self) -> &[MetricRecord] {
        &self.records
    }

    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Train until `max_steps` (or the stop flag), evaluating and checkpointing on the way; the
    /// forward passes (training and evaluation) in `train.precision`.
    pub fn run(&mut self, task: &mut dyn Task, observer: &mut dyn Observer) -> Result<RunSummary> {
        let precision = self.cfg.precision;
        crate::kernels::bf16::autocast(precision, || self.run_steps(task, observer))
    }

    fn run_steps(
        &mut self,
        task: &mut dyn Task,
        observer: &mut dyn Observer,
    ) -> Result<RunSummary> {
        let vars = self.vs.all_vars();
        let max_steps = self.cfg.max_steps;
        let ckpt_every = self.cfg.checkpoint_every.unwrap_or(self.cfg.eval_every);
        let mut losses = Vec::new();
        let (mut log_sum, mut log_n, mut log_tokens) = (0.0, 0usize, 0usize);
        let (mut eval_sum, mut eval_n) = (0.0, 0usize);
        let mut log_clock = Instant::now();
        let mut interrupted = false;
        let mut last_loss = f64::NAN;
        let leader = self.leader();
        let world = self.collective.world_size();
        // Ranks that start apart (another tokenizer, corpus or seed) stop before training.
        super::parallel::check_in_sync(self.collective.as_ref(), &vars, self.state.step)?;
        while self.state.step < max_steps {
            // With several ranks the stop request travels with the step's sums instead, so
            // that every rank stops after the same step.
            if world == 1 && self.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let t0 = Instant::now();
            let lr = self.schedule.lr(self.state.step);
            let (loss, tokens, stop) = if world == 1 {
                let (loss, tokens) = self.train_step(task, &vars, lr)?;
                (loss, tokens, false)
            } else {
                self.parallel_train_step(task, &vars, lr)?
            };
            self.state.step += 1;
            self.state.tokens_seen += tokens as u64;
            self.state.elapsed_s += t0.elapsed().as_secs_f64();
            losses.push(loss);
            last_loss = loss;
            log_sum += loss;
            log_n += 1;
            log_tokens += tokens;
            eval_sum += loss;
            eval_n += 1;
            let step = self.state.step;
            observer.on_step(
                step,
                max_steps,
                loss,
                lr,
                tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            );

            if world > 1
                && (step.is_multiple_of(self.cfg.sync_check_every) || step == max_steps || stop)
            {
                super::parallel::check_in_sync(self.collective.as_ref(), &vars, step)?;
            }
            if !leader {
                // Rank 0 alone evaluates and writes; the others go on to the next step's sums.
                if stop {
                    interrupted = true;
                    break;
                }
                continue;
            }
            if step.is_multiple_of(self.cfg.log_every) || step == max_steps {
                let secs = log_clock.elapsed().as_secs_f64().max(1e-9);
                let rec = self.record(
                    "log",
                    log_sum / log_n as f64,
                    None,
                    lr,
                    log_tokens as f64 / secs,
                );
                self.push_record(rec, observer)?;
                (log_sum, log_n, log_tokens) = (0.0, 0, 0);
                log_clock = Instant::now();
            }
            let eval_now = step.is_multiple_of(self.cfg.eval_every) || step == max_steps;
            if eval_now {
                // Evaluation draws from its own generator so that it never shifts the training
                // batches: a resumed run sees exactly the batches an uninterrupted one does.
                let mut eval_rng = Rng::new(self.cfg.seed ^ step.wrapping_mul(0x9E37_79B9));
                let eval = task.evaluate(&mut eval_rng, self.cfg.eval_iters)?;
                let val = eval.loss;
                if !val.is_finite() {
                    let tensor = match self.first_non_finite()? {
                        Some(t) => t,
                        None => format!("the validation loss ({val})"),
                    };
                    return Err(self.diverged(tensor, step, lr));
                }
                let mut rec =
                    self.record("eval", eval_sum / eval_n.max(1) as f64, Some(val), lr, 0.0);
                rec.val_accuracy = eval.accuracy;
                self.push_record(rec, observer)?;
                (eval_sum, eval_n) = (0.0, 0);
                let improved = self.state.best_val_loss.is_none_or(|b| val < b);
                if improved {
                    self.state.best_val_loss = Some(val);
                }
                self.save("checkpoint", observer, false)?;
                if improved && self.cfg.keep_best {
                    self.save("best", observer, true)?;
                }
                if step.is_multiple_of(ckpt_every) || step == max_steps {
                    self.save_step()?;
                }
            } else if step.is_multiple_of(ckpt_every) {
                self.save("checkpoint", observer, false)?;
                self.save_step()?;
            }
            if stop {
                interrupted = true;
                break;
            }
        }
        if interrupted && leader {
            self.save("checkpoint", observer, false)?;
        }
        Ok(RunSummary {
            steps: self.state.step,
            final_train_loss: last_loss,
            best_val_loss: self.state.best_val_loss,
            interrupted,
            losses,
        })
    }

    fn train_step(
        &mut self,
        task: &mut dyn Task,
        vars: &[candle_core::Var],
        lr: f64,
    ) -> Result<(f64, usize)> {
        let accum = self.cfg.grad_accum;
        let mut tokens = 0;
        let mut loss_sum = 0.0;
        let engine = self.cfg.engine.resolve(&self.vs);
        let data_rng = &mut self.state.data_rng;
        let mut micro_batch = || -> Result<(f64, usize, GradStore)> {
            let (loss, n, grads) =
                loss_and_gradients(engine, vars, || task.train_batch(data_rng, Shard::WHOLE))?;
            Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, n, grads))
        };
        let grads = if accum == 1 {
            let (loss, n, grads) = micro_batch()?;
            tokens += n;
            loss_sum += loss;
            grads
        } else {
            let mut acc = GradAccumulator::new(vars);
            for _ in 0..accum {
                let (loss, n, grads) = micro_batch()?;
                tokens += n;
                loss_sum += loss;
                acc.add(&grads)?;
            }
            acc.finish()?
        };
        let loss = loss_sum / accum as f64;
        self.update(grads, vars, loss, lr)?;
        Ok((loss, tokens))
    }

    /// The end of every step: the finiteness guard on the step's `loss`, clipping, and the
    /// optimizer's update with the step's gradients.
    fn update(&mut self, mut grads: GradStore, vars: &[Var], loss: f64, lr: f64) -> Result<()> {
        if !loss.is_finite() {
            // Name the parameter when the previous update already broke one: then the loss
            // is only the symptom.
            let tensor = match self.first_non_finite()? {
                Some(t) => t,
                None => format!("the training loss ({loss})"),
            };
            return Err(self.diverged(tensor, self.state.step + 1, lr));
        }
        if let Some(max_norm) = self.cfg.grad_clip {
            clip_grad_norm(&mut grads, vars, max_norm)?;
        }
        self.optimizer.step(&grads, lr)
    }

    /// One optimizer step of a data-parallel run: this rank's shard of each micro-batch, the
    /// loss and token counts summed over the ranks, the backward seeded with this rank's
    /// share of the tokens, and the gradients summed bucket by bucket (with the tape and one
    /// micro-batch, each bucket as soon as the backward has finished it). Returns the global
    /// loss, the global token count, and whether any rank asked to stop.
    fn parallel_train_step(
        &mut self,
        task: &mut dyn Task,
        vars: &[Var],
        lr: f64,
    ) -> Result<(f64, usize, bool)> {
        let accum = self.cfg.grad_accum;
        let engine = self.cfg.engine.resolve(&self.vs);
        let shard = self.collective.shard();
        let reducer = self.reducer.as_ref().expect("a reducer with several ranks");
        let mut reduction = reducer.begin();
        let mut acc = (accum > 1).then(|| GradAccumulator::new(vars));
        let (mut loss_sum, mut tokens) = (0.0, 0usize);
        let mut stop = false;
        for m in 0..accum {
            let data_rng = &mut self.state.data_rng;
            let ((loss, n), tape) = match engine {
                Engine::Tape => {
                    let (out, tape) = autograd::record(vars, || task.train_batch(data_rng, shard))?;
                    (out, Some(tape))
                }
                Engine::Candle | Engine::Auto => (task.train_batch(data_rng, shard)?, None),
            };
            let local = if n > 0 {
                loss.to_dtype(DType::F64)?.to_scalar::<f64>()?
            } else {
                0.0
            };
            let asked = m == 0 && self.stop.load(Ordering::SeqCst);
            let (total, weighted, any_stop) = reducer.sum_scalars(n, local, asked)?;
            stop |= any_stop;
            if total <= 0.0 {
                return Err(Error::msg(
                    "data parallel: a batch with no tokens on any rank",
                ));
            }
            loss_sum += weighted / total;
            tokens += total as usize;
            if n == 0 {
                continue;
            }
            // The sum over the ranks of (n_rank / n_total) × the rank's mean-loss gradient is
            // the gradient of the global mean loss.
            let share = n as f64 / total;
            match (tape, acc.as_mut()) {
                (Some(tape), None) => {
                    tape.backward_streaming(&loss, share, |i, g| reduction.add(i, g))?
                }
                (Some(tape), Some(acc)) => acc.add(&tape.backward_scaled(&loss, share)?)?,
                (None, acc) => {
                    let grads = loss.affine(share, 0.0)?.backward()?;
                    match acc {
                        Some(acc) => acc.add(&grads)?,
                        None => reduction.add_all(&grads)?,
                    }
                }
            }
        }
        if let Some(mut acc) = acc {
            let grads = acc.finish()?;
            reduction.add_all(&grads)?;
        }
        let grads = reduction.finish()?;
        let loss = loss_sum / accum as f64;
        self.update(grads, vars, loss, lr)?;
        Ok((loss, tokens, stop))
    }

    fn record(
        &self,
        event: &str,
        train_loss: f64,
        val_loss: Option<f64>,
        lr: f64,
        tps: f64,
    ) -> MetricRecord {
        MetricRecord {
            event: event.to_string(),
            step: self.state.step,
            train_loss,
            val_loss,
            val_accuracy: None,
            lr,
            tokens_per_sec: tps,
            elapsed_s: self.state.elapsed_s,
        }
    }

    fn push_record(&mut self, rec: MetricRecord, observer: &mut dyn Observer) -> Result<()> {
        let path = self.out_dir.join(METRICS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let line = serde_json::to_string(&rec).map_err(|source| Error::Json {
            what: "metric record".into(),
            source,
        })?;
        writeln!(f, "{line}").map_err(|e| Error::io(&path, e))?;
        self.records.push(rec);
        observer.on_record(self.records.last().unwrap(), &self.records);
        Ok(())
    }

    fn rewrite_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for r in &self.records {
            text.push_str(&serde_json::to_string(r).map_err(|source| Error::Json {
                what: "metric record".into(),
                source,
            })?);
            text.push('\n');
        }
        crate::models::write_atomic(&self.out_dir.join(METRICS_FILE), text.as_bytes())
    }

    /// With `train.keep_last = N`: the weights of this step in `step-XXXXXX/` (no optimizer
    /// state: they are only for averaging and translating), and only the last N kept.
    fn save_step(&mut self) -> Result<()> {
        let Some(keep) = self.cfg.keep_last else {
            return Ok(());
        };
        let dir = self.out_dir.join(step_dir_name(self.state.step));
        self.check_finite_before_save()?;
        checkpoint::save_checkpoint(
            &dir,
            &CheckpointParts {
                family: self.family,
                model_config: &self.model_config,
                vs: &self.vs,
                optimizer: None,
                trainer: Some(&self.state),
                tokenizer: self.tokenizer.as_ref(),
                src_tokenizer: self.src_tokenizer.as_ref(),
                run_config: self.run_config.as_ref(),
            },
        )?;
        let all = step_dirs(&self.out_dir)?;
        for (_, old) in &all[..all.len().saturating_sub(keep)] {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
        Ok(())
    }

    fn save(&mut self, name: &str, observer: &mut dyn Observer, best: bool) -> Result<()> {
        self.state.dropout_rng = self.vs.dropout_rng().state();
        let dir = self.out_dir.join(name);
        self.check_finite_before_save()?;
        checkpoint::save_checkpoint(
            &dir,
            &CheckpointParts {
                family: self.family,
                model_config: &self.model_config,
                vs: &self.vs,
                optimizer: Some(&self.optimizer),
                trainer: Some(&self.state),
                tokenizer: self.tokenizer.as_ref(),
                src_tokenizer: self.src_tokenizer.as_ref(),
                run_config: self.run_config.as_ref(),
            },
        )?;
        if name == "checkpoint" {
            self.saved_step = Some(self.state.step);
        }
        observer.on_checkpoint(&dir, best);
        Ok(())
    }

    /// The first parameter or optimizer moment holding a NaN or an infinity.
    fn first_non_finite(&self) -> Result<Option<String>> {
        checkpoint::first_non_finite(&self.vs, Some(&self.optimizer))
    }

    /// The finiteness guard: every save goes through it, so a diverged state never replaces
    /// the last good checkpoint (the loss alone is checked one update too late: the update
    /// that breaks the weights comes after the loss it was computed from).
    fn check_finite_before_save(&self) -> Result<()> {
        match self.first_non_finite()? {
            None => Ok(()),
            Some(tensor) => {
                let lr = self.schedule.lr(self.state.step.saturating_sub(1));
                Err(self.diverged(tensor, self.state.step, lr))
            }
        }
    }

    /// The error that stops a diverged run: the step, the tensor, what is left on disk and the
    /// likely cause. `step` is the step that failed, `lr` the learning rate of its update.
    fn diverged(&self, tensor: String, step: u64, lr: f64) -> Error {
        let kept = match self.saved_step {
            Some(step) => format!(
                "{} was not overwritten and still holds step {step}",
                self.out_dir.join("checkpoint").display()
            ),
            None => "no checkpoint was written".into(),
        };
        let clip = if self.cfg.grad_clip.is_none() {
            ", or set train.grad_clip (e.g. 1.0) to bound the updates"
        } else {
            ""
        };
        Error::NonFinite {
            what: format!("training stopped at step {step}"),
            tensor,
            advice: format!(
                "{kept}; likely cause: the updates diverged at learning rate {lr:.3e} (lower \
                 {}{clip}), or the data holds values the model overflows on",
                self.schedule.scale_field()
            ),
        }
    }
}

/// Read `metrics.jsonl` (missing file: no records).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| Error::Json {
                what: format!("{} line {}", path.display(), i + 1),
                source,
            })
        })
        .collect()
}
