//! `transformer`: build, train, evaluate and run Transformer models from the command line.
//!
//! `main` only parses and dispatches; each subcommand lives in its own file.

mod average;
mod bench;
mod chat;
mod checkpoint;
mod classify;
mod data;
mod demo;
mod embed;
mod eval;
mod generate;
mod generate_image;
mod heatmap;
mod inspect;
mod models;
mod output;
mod plot;
mod progress;
mod sampling;
mod train;
mod transcribe;
mod translate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Every candle op allocates its output; glibc malloc returns large blocks to the OS and faults
// them in again on the next step, which made training 1.8–2.5× slower here than mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "transformer",
    version,
    about = "The Transformer (Vaswani et al. 2017) in Rust: train, evaluate and run attention models",
    long_about = None
)]
struct Cli {
    /// Threads for matrix products and fused kernels (default: TRANSFORMER_THREADS, else all
    /// cores).
    #[arg(long, global = true, value_name = "N", allow_hyphen_values = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Size the thread pools before candle creates them.
///
/// candle's element-wise ops run on a "barrier pool" whose threads spin (25,000 iterations per
/// wait) before sleeping. On 2 cores that are shared with anything else, the spinning costs
/// more than the element-wise work it splits: measured here, 80 demo steps took 4.2 s with it
/// off and 20.1 s with it on, and Shakespeare steps ran 2.6-3.8x faster. So element-wise ops
/// stay on the calling thread unless CANDLE_NUM_THREADS says otherwise; matrix products and
/// our kernels use rayon's pool of `--threads` (or TRANSFORMER_THREADS) threads.
fn configure_threads(threads: Option<usize>) -> anyhow::Result<()> {
    // Each source is named in its own errors: a bad TRANSFORMER_THREADS is not a bad --threads.
    // The upper bound keeps a typo from asking rayon for millions of threads (an abort).
    const MAX_THREADS: usize = 1024;
    let threads = match (threads, std::env::var("TRANSFORMER_THREADS")) {
        (Some(n), _) if !(1..=MAX_THREADS).contains(&n) => {
            anyhow::bail!("--threads must be in [1, {MAX_THREADS}], got {n}")
        }
        (Some(n), _) => Some(n),
        (None, Ok(v)) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Some(n),
            Ok(n) => anyhow::bail!("TRANSFORMER_THREADS must be in [1, {MAX_THREADS}], got {n}"),
            Err(_) => anyhow::bail!(
                "TRANSFORMER_THREADS={v:?}: expected a whole number of threads in [1, \
                 {MAX_THREADS}]"
            ),
        },
        (None, Err(_)) => None,
    };
    // Always set: without RAYON_NUM_THREADS, candle 0.11 works out its matrix-product
    // threads on every product by parsing /proc/cpuinfo (`num_cpus::get_physical`), which
    // made generation 4x slower here (5,600 vs 1,300 tokens/s in `bench D`).
    let n = match threads {
        Some(n) => Some(n),
        None if std::env::var_os("RAYON_NUM_THREADS").is_none() => {
            Some(std::thread::available_parallelism().map_or(1, |n| n.get()))
        }
        None => None,
    };
    if let Some(n) = n {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // The main thread is one of the pool's threads: a parallel kernel called from it starts
    // at once on it, while the other threads join in. From outside the pool, every kernel (a
    // few hundred per training step) handed its work to the pool and slept until it was done:
    // Shakespeare training on 2 threads went from 19.3K to 21.9K tokens/s (Intel Xeon with
    // AMX, 300 steps, medians of 3, the same losses).
    let mut pool = rayon::ThreadPoolBuilder::new().use_current_thread();
    if let Some(n) = n {
        pool = pool.num_threads(n);
    }
    pool.build_global()
        .map_err(|e| anyhow::anyhow!("starting the thread pool: {e}"))?;
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Train a small encoder-decoder to reverse sequences and show its attention (no data needed).
    Demo(demo::DemoArgs),
    /// Print the model families and their named presets.
    Models,
    /// Fetch known data sets into data/NAME/.
    Data(data::DataArgs),
    /// Train a model from a TOML config (data-parallel under `mpirun -np N` when built with
    /// `--features mpi`).
    Train(train::TrainArgs),
    /// Continue a text with a trained language model, streaming tokens.
    Generate(generate::GenerateArgs),
    /// Talk with an instruct model (GGUF): each line of standard input is a user turn.
    Chat(chat::ChatArgs),
    /// What a GGUF file holds: architecture, sizes, quantization types, tokenizer.
    Inspect(inspect::InspectArgs),
    /// Loss and perplexity of a language model on a text file, BLEU of a translation model on
    /// a source and reference file, or accuracy and confusion matrix of an image classifier on
    /// labelled images (one JSON line).
    Eval(eval::EvalArgs),
    /// Translate stdin's lines with an encoder-decoder checkpoint, one output line per input line.
    Translate(translate::TranslateArgs),
    /// Average the weights of checkpoints of one run into a new checkpoint.
    Average(average::AverageArgs),
    /// Top-k labels of images with a Vision Transformer (one JSON line per image), optionally
    /// with attention heatmaps.
    Classify(classify::ClassifyArgs),
    /// New images from a model trained on pixel tokens (data.kind = "pixels"), one row of a
    /// PNG grid per class.
    GenerateImage(generate_image::GenerateImageArgs),
    /// Sentence embeddings of stdin's lines with a Hugging Face BERT model (one JSON line each).
    Embed(embed::EmbedArgs),
    /// Speech to text with Whisper (CTranslate2 or Hugging Face model directories).
    Transcribe(transcribe::TranscribeArgs),
    /// Throughput on the fixed configurations of bench/run.sh (one JSON line per case).
    #[command(hide = true)]
    Bench(bench::BenchArgs),
}

/// The compute device: CPU, or CUDA when built with `--features cuda` and
/// `TRANSFORMER_DEVICE=cuda`.
pub fn device() -> anyhow::Result<candle_core::Device> {
    match std::env::var("TRANSFORMER_DEVICE").as_deref() {
        Ok("cuda") => Ok(candle_core::Device::new_cuda(0)?),
        Ok("cpu") | Err(_) => Ok(candle_core::Device::Cpu),
        Ok(other) => anyhow::bail!("TRANSFORMER_DEVICE={other:?}: expected cpu or cuda"),
    }
}

/// Keep freed memory mapped instead of handing it back to the OS.
///
/// A training step frees and re-allocates the same large activation buffers every step. With
/// mimalloc's default (return pages unused for 1 s), each step faulted them in again and the
/// kernel zeroed them: 11% of a case-C profile in `clear_page_erms`. Without purging, `bench B`
/// ran 1,022 -> 1,425 tokens/s and `bench A` 9,360 -> 11,350, with peak RSS within 3% (the
/// peak is the largest live set either way). `MIMALLOC_PURGE_DELAY` still overrides it.
fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // mimalloc's `mi_option_purge_delay` (15 in both its v2 and v3 enums; the sys crate
        // names only the older options); -1 = never purge.
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: sets one integer option; mimalloc reads it when it next considers purging.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() -> ExitCode {
    configure_allocator();
    let cli = Cli::parse();
    if let Err(e) = configure_threads(cli.threads) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Models => models::run(),
        Command::Data(args) => data::run(args),
        Command::Train(args) => train::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Translate(args) => translate::run(args),
        Command::Average(args) => average::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Transcribe(args) => transcribe::run(args),
        Command::Classify(args) => classify::run(args),
        Command::GenerateImage(args) => generate_image::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`transformer generate | head`) is a normal way to stop.
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", error_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, like `{:#}`, but each cause once: the library's I/O
/// and JSON errors already print their source in their own message, and `{:#}` would repeat it
/// ("x.txt: No such file or directory (os error 2): No such file or directory (os error 2)").
pub fn error_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}
