//! `transformer train --config FILE [--set section.key=value ...] [--out DIR] [--resume|--force]`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use transformer::train::parallel::{Collective, Local};
use transformer::train::run::prepare_run_on;
use transformer::train::Silent;
use transformer::train::{DataConfig, RunConfig};

use crate::progress::CliObserver;

#[derive(Args)]
pub struct TrainArgs {
    /// The run's TOML config.
    #[arg(long)]
    config: PathBuf,
    /// Override a config field, e.g. `--set train.max_steps=100` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Run directory (default: runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Start over in an --out directory that holds another run (its checkpoints are deleted).
    #[arg(long)]
    force: bool,
}

/// Files and folders that make a directory "a run" (with the `step-XXXXXX/` checkpoints of
/// `train.keep_last`, see [`holds_a_run`]). The `.old` names hold the previous checkpoint when
/// a crash came between the two renames of a save (see `checkpoint::recover`).
const RUN_ENTRIES: [&str; 8] = [
    "checkpoint",
    "best",
    ".checkpoint.old",
    ".best.old",
    "metrics.jsonl",
    "loss.svg",
    "accuracy.svg",
    crate::output::MARKER_FILE,
];

/// Whether `dir` holds a training run (or what is left of one): any of [`RUN_ENTRIES`], or a
/// step checkpoint on its own, which is a run's weights as much as `checkpoint/` is.
pub fn holds_a_run(dir: &Path) -> bool {
    RUN_ENTRIES.iter().any(|e| dir.join(e).exists())
        || transformer::train::trainer::step_dirs(dir).is_ok_and(|d| !d.is_empty())
}

/// The files a run's config reads (the config itself, its data, a tokenizer file).
fn config_inputs<'a>(args: &'a TrainArgs, cfg: &'a RunConfig) -> Vec<(&'static str, &'a Path)> {
    let mut inputs: Vec<(&'static str, &Path)> = Vec::new();
    // `--resume --config RUN/checkpoint/run.toml` resumes with the run's own config, read
    // once before anything is written and saved again with every checkpoint.
    if !args.resume {
        inputs.push(("--config", args.config.as_path()));
    }
    match &cfg.data {
        DataConfig::Text { path, .. } => inputs.push(("data.path", path)),
        DataConfig::Parallel {
            train_src,
            train_tgt,
            val_src,
            val_tgt,
            ..
        } => {
            inputs.push(("data.train_src", train_src));
            inputs.push(("data.train_tgt", train_tgt));
            inputs.push(("data.val_src", val_src));
            inputs.push(("data.val_tgt", val_tgt));
        }
        DataConfig::Images {
            train_images,
            train_labels,
            ..
        }
        | DataConfig::Pixels {
            train_images,
            train_labels,
            ..
        } => {
            inputs.push(("data.train_images", train_images));
            inputs.push(("data.train_labels", train_labels));
        }
        DataConfig::ImageFolder {
            train_dir, val_dir, ..
        } => {
            inputs.push(("data.train_dir", train_dir));
            if let Some(v) = val_dir {
                inputs.push(("data.val_dir", v));
            }
        }
        DataConfig::Reverse { .. } => {}
    }
    if let Some(p) = &cfg.tokenizer.path {
        inputs.push(("tokenizer.path", p));
    }
    inputs
}

/// The ranks of this run: MPI's world when `mpirun` started this process (the `mpi`
/// feature), else this process alone.
fn collective() -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if let Some(world) = transformer::train::parallel::mpi::MpiCollective::from_env()? {
        return Ok(Arc::new(world));
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = transformer::train::parallel::launcher_world_size().filter(|&n| n > 1) {
        // N independent runs would all write the same run directory.
        bail!(
            "started by mpirun as one of {n} ranks, but this transformer was built without \
             data-parallel training; rebuild it with `--features mpi` (needs an MPI library: \
             scripts/install-mpi.sh)"
        );
    }
    Ok(Arc::new(Local))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let comm = collective()?;
    if comm.world_size() == 1 {
        return run_on(args, comm);
    }
    install_sigterm_message(comm.rank());
    let rank = comm.rank();
    match run_on(args, comm.clone()) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The other ranks would wait for this one in their next sum: end them all.
            eprintln!("error: rank {rank}: {}", crate::error_message(&e));
            comm.abort(1)
        }
    }
}

/// mpirun ends every rank with SIGTERM when one fails or is killed; without a handler the
/// survivors would vanish without a word. The message is made before the handler is
/// installed: a signal handler may only write.
fn install_sigterm_message(rank: usize) {
    static MESSAGE: OnceLock<Vec<u8>> = OnceLock::new();
    MESSAGE.get_or_init(|| {
        format!(
            "error: rank {rank}: stopped by SIGTERM: the job is ending because another rank \
             failed or was killed, or mpirun itself was stopped (its message says which); the \
             last checkpoint on disk is intact\n"
        )
        .into_bytes()
    });
    extern "C" fn on_sigterm(_: libc::c_int) {
        if let Some(m) = MESSAGE.get() {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is static.
            unsafe {
                libc::write(2, m.as_ptr().cast(), m.len());
            }
        }
        unsafe { libc::_exit(143) }
    }
    // SAFETY: installing a handler that only writes and exits.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
}

fn run_on(args: TrainArgs, comm: Arc<dyn Collective>) -> Result<()> {
    let leader = comm.rank() == 0;
    let cfg = RunConfig::from_file(&args.config, &args.overrides)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = args
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(stem.unwrap_or_else(|| "run".into()))
    });
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: a file is there; --out names the run directory (choose another path)",
            out.display()
        );
    }
    // A `--force` that was interrupted before its new run wrote a checkpoint: the old run goes
    // back (had it written one, the old run is deleted, as asked). Rank 0 alone moves files;
    // the others look once it is done.
    if leader {
        crate::output::settle_set_aside(&out, out.join("checkpoint").exists())?;
        if args.resume {
            transformer::train::checkpoint::recover(&out.join("checkpoint"))?;
        }
    }
    comm.barrier()?;
    // What this run writes or (with --force) deletes may not be anything it reads.
    let inputs = config_inputs(&args, &cfg);
    let mut written: Vec<PathBuf> = RUN_ENTRIES.iter().map(|e| out.join(e)).collect();
    written.extend(
        transformer::train::trainer::step_dirs(&out)?
            .into_iter()
            .map(|(_, p)| p),
    );
    for w in &written {
        crate::output::check_not_input("--out", w, &inputs)?;
    }
    if args.resume {
        if !out.join("checkpoint").exists() && !out.join(".checkpoint.old").exists() {
            bail!(
                "{}: nothing to resume (no checkpoint/ in it)",
                out.display()
            );
        }
    } else if holds_a_run(&out) && !args.force {
        bail!(
            "{} already holds a run; pass --resume to continue it or --force to start over \
             (deleting its checkpoints), or choose another --out",
            out.display()
        );
    }
    if args.resume {
        // Checked before anything is loaded or rewritten: resuming a finished run would train
        // no step and report a final loss of NaN.
        let ckpt = out.join("checkpoint");
        if let Ok(state) = transformer::train::checkpoint::read_trainer_state(&ckpt) {
            if state.step >= cfg.train.max_steps {
                bail!(
                    "{}: the run already finished at step {} (train.max_steps = {}); to train \
                     further, raise it, e.g. --resume --set train.max_steps={}",
                    out.display(),
                    state.step,
                    cfg.train.max_steps,
                    state.step * 2
                );
            }
        }
    }
    let device = crate::device()?;
    let mut prepared = prepare_run_on(&cfg, &out, args.resume, &device, comm.clone())?;
    // Every rank has read what it needs of the old run before rank 0 sets it aside.
    comm.barrier()?;
    // Only now that the data, tokenizer and model are known to be good does --force touch the
    // old run: a bad corpus or config must leave it as it was. (A fresh `prepare_run` writes
    // nothing into `out` but the directory itself.) Even then it is only moved aside, and
    // deleted once the new run has its first checkpoint.
    let set_aside = if args.force && leader {
        // The step checkpoints of `train.keep_last` belong to the old run too.
        Some(crate::output::set_aside(&out, &written)?)
    } else {
        None
    };
    let start = prepared.trainer.state().step;
    let vocab = match &prepared.tokenizer {
        Some(t) => format!(", vocabulary {}", t.vocab_size()),
        None => String::new(),
    };
    if leader {
        println!(
            "training {} model: {} parameters{vocab}, run directory {}{}",
            prepared.model_config.family().name,
            prepared.n_params,
            out.display(),
            if args.resume {
                format!(", resuming at step {start}")
            } else {
                String::new()
            }
        );
        for note in &prepared.data_notes {
            println!("{note}");
        }
        if comm.world_size() > 1 {
            println!(
                "data parallel on {}: the global batch of {} shared out among the ranks, {} bytes \
             summed per rank and step",
                comm.describe(),
                cfg.train.batch_size,
                prepared.trainer.bytes_reduced_per_step()
            );
        }
    }
    let stop = prepared.trainer.stop_flag();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            // Second Ctrl-C: the user really wants out; the last checkpoint on disk is intact.
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint (Ctrl-C again to quit without saving)");
    })
    .context("installing the Ctrl-C handler")?;
    if !leader {
        // Rank 0 reports, evaluates and writes.
        let summary = prepared.trainer.run(prepared.task.as_mut(), &mut Silent)?;
        if summary.interrupted {
            // Finalizes MPI: every rank stopped after the same step.
            drop(prepared);
            drop(comm);
            std::process::exit(130);
        }
        return Ok(());
    }
    let mut observer = CliObserver::new(cfg.train.max_steps, start, out.join("loss.svg"));
    match cfg.data {
        DataConfig::Images { .. } | DataConfig::ImageFolder { .. } => {
            observer = observer.with_unit("img/s")
        }
        DataConfig::Pixels { .. } => observer = observer.with_unit("pixels/s"),
        _ => {}
    }
    let result = prepared.trainer.run(prepared.task.as_mut(), &mut observer);
    if let Some(aside) = set_aside {
        let replaced = out.join("checkpoint").exists();
        aside.settle(replaced)?;
        if !replaced {
            let why = match &result {
                Err(e) => format!("{e}; "),
                Ok(_) => String::new(),
            };
            bail!(
                "{why}the new run wrote no checkpoint, so the previous run in {} was put back",
                out.display()
            );
        }
    }
    let summary = result?;
    observer.finish();
    crate::plot::loss_curves(prepared.trainer.records(), &out.join("loss.svg"))?;
    crate::plot::accuracy_curve(prepared.trainer.records(), &out.join("accuracy.svg"))?;
    if summary.interrupted {
        println!(
            "stopped at step {}; checkpoint saved in {}; continue with --resume",
            summary.steps,
            out.join("checkpoint").display()
        );
        drop(prepared);
        drop(comm);
        std::process::exit(130);
    }
    println!(
        "done: {} steps, final train loss {:.4}, best val loss {}, {:.0} s of training; checkpoints in {}",
        summary.steps,
        summary.final_train_loss,
        summary.best_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        prepared.trainer.state().elapsed_s,
        out.display()
    );
    Ok(())
}
