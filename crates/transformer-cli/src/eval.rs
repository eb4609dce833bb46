//! `transformer eval`: one JSON line.
//!
//! - `--checkpoint DIR --text FILE`: loss and perplexity of a language model.
//! - `--checkpoint DIR --src FILE --ref FILE [--beam K]`: translate the source file with an
//!   encoder-decoder and score it against the references with sacreBLEU's corpus BLEU, cased
//!   and lowercased, and chrF2.
//! - `--checkpoint DIR [--images FILE --labels FILE | --images DIR] [--confusion-out FILE]`:
//!   accuracy and the confusion matrix of an image classifier on labelled IDX images (by
//!   default the Fashion-MNIST test split in `data/fashion-mnist/`) or on a folder-per-class
//!   tree whose folders are named after the model's labels, the matrix also drawn as an SVG; for a
//!   model trained on `data.kind = "pixels"`, its negative log-likelihood of those images in
//!   bits per pixel.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use transformer::data::{read_parallel, read_text};
use transformer::metrics::{corpus_bleu, corpus_chrf};
use transformer::train::eval::evaluate_lm;

use crate::translate::{encode_source, hypothesis_text, translate_ids, DecodeArgs};

#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its best/ checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text file to evaluate a language model on.
    #[arg(long, conflicts_with = "src")]
    text: Option<PathBuf>,
    /// Source sentences to translate, one per line (encoder-decoder models).
    #[arg(long, requires = "reference")]
    src: Option<PathBuf>,
    /// Reference translations, aligned with --src.
    #[arg(long = "ref", requires = "src")]
    reference: Option<PathBuf>,
    // `allow_hyphen_values` on the numeric flags: the error then names the flag.
    /// Beam size for --src; 1 decodes greedily.
    #[arg(long, default_value_t = 4, allow_hyphen_values = true)]
    beam: usize,
    /// Length penalty exponent α for --src.
    #[arg(long, default_value_t = 0.6, allow_hyphen_values = true)]
    alpha: f64,
    /// Write the translations of --src here, one per line (an existing file only with
    /// --force; never one of the inputs).
    #[arg(long, requires = "src")]
    hyp_out: Option<PathBuf>,
    /// Replace an existing --hyp-out file.
    #[arg(long, requires = "hyp_out")]
    force: bool,
    /// Windows (language model), sentences (translation) or images per forward pass.
    #[arg(long, default_value_t = 16, allow_hyphen_values = true)]
    batch_size: usize,
    /// IDX image file to evaluate an image classifier on, or a folder-per-class tree
    /// (`DIR/<label>/*.png`, the folders named after the model's labels).
    #[arg(
        long,
        default_value = "data/fashion-mnist/t10k-images-idx3-ubyte",
        conflicts_with_all = ["text", "src"]
    )]
    images: PathBuf,
    /// IDX label file aligned with an IDX --images [default:
    /// data/fashion-mnist/t10k-labels-idx1-ubyte].
    #[arg(long, conflicts_with_all = ["text", "src"])]
    labels: Option<PathBuf>,
    /// Where to draw the confusion matrix of an image classifier (SVG; an existing file only
    /// with --force-confusion).
    #[arg(long, default_value = "confusion.svg", conflicts_with_all = ["text", "src"])]
    confusion_out: PathBuf,
    /// Replace an existing --confusion-out file.
    #[arg(long)]
    force_confusion: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    // Both modes take --batch-size; 0 is refused as by every other command, not read as 1.
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1, got 0");
    }
    match (&args.src, &args.reference, &args.text) {
        (Some(src), Some(reference), _) => eval_translation(&args, src, reference),
        (_, _, Some(text)) => eval_lm(&args, text),
        // Neither: an image model, generative (bits per pixel) or a classifier.
        _ if transformer::pipelines::generate_image::is_pixel_model(&args.checkpoint) => {
            eval_pixels(&args)
        }
        _ => crate::classify::eval_images(&ImageEvalArgs {
            checkpoint: &args.checkpoint,
            images: &args.images,
            labels: args.labels.as_deref(),
            confusion_out: &args.confusion_out,
            force: args.force_confusion,
            batch_size: args.batch_size,
        }),
    }
}

/// The IDX label file of `--images`: `--labels`, or the Fashion-MNIST test labels.
fn idx_labels(args: &EvalArgs) -> &Path {
    args.labels
        .as_deref()
        .unwrap_or(Path::new(DEFAULT_TEST_LABELS))
}

/// `--labels` when not given.
pub const DEFAULT_TEST_LABELS: &str = "data/fashion-mnist/t10k-labels-idx1-ubyte";

/// What `eval` of an image classifier reads and writes.
pub struct ImageEvalArgs<'a> {
    pub checkpoint: &'a Path,
    pub images: &'a Path,
    /// The IDX labels of an IDX `images` (none for a folder tree).
    pub labels: Option<&'a Path>,
    pub confusion_out: &'a Path,
    pub force: bool,
    pub batch_size: usize,
}

/// Bits per pixel of a pixel-sequence model on labelled IDX images.
fn eval_pixels(args: &EvalArgs) -> Result<()> {
    use transformer::pipelines::generate_image::{bits_per_pixel, load_pixel_model};
    let device = crate::device()?;
    let m = load_pixel_model(&args.checkpoint, &device)
        .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
    let images = transformer::data::idx::LabelledImages::read_idx(&args.images, idx_labels(args))?;
    let t0 = Instant::now();
    let (bits, nats) = bits_per_pixel(&m, &images, args.batch_size, &device)
        .with_context(|| format!("--images {}", args.images.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": m.dir.display().to_string(),
            "images": args.images.display().to_string(),
            "n_images": images.len(),
            "bits_per_pixel": bits,
            "nats_per_pixel": nats,
            "side": m.tokens.side,
            "levels": m.tokens.levels,
            "seconds": t0.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

fn eval_lm(args: &EvalArgs, text_path: &Path) -> Result<()> {
    let device = crate::device()?;
    let lm = crate::checkpoint::load_lm(
        &crate::checkpoint::ModelArgs {
            model: args.checkpoint.clone(),
            dtype: crate::checkpoint::WeightDtype::F32,
        },
        &device,
    )?;
    let text = read_text(text_path)?;
    let tokens = lm.tokenizer.encode(&text).with_context(|| {
        format!(
            "{} cannot be encoded with this model's tokenizer",
            text_path.display()
        )
    })?;
    let r = evaluate_lm(lm.model.as_ref(), &tokens, args.batch_size, &device)?;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": lm.dir.display().to_string(),
            "text": text_path.display().to_string(),
            "loss": r.loss,
            "perplexity": r.perplexity,
            "tokens": r.tokens,
            "windows": r.windows,
        })
    );
    Ok(())
}

fn eval_translation(args: &EvalArgs, src: &Path, reference: &Path) -> Result<()> {
    let decode = DecodeArgs {
        beam: args.beam,
        alpha: args.alpha,
        batch_size: args.batch_size,
    };
    let opts = decode.options(false)?;
    // Checked before any work: the hypotheses may not replace an input or an unrelated file.
    if let Some(path) = &args.hyp_out {
        // The checkpoint directory the model is read from (a run directory's best/): a file
        // in it may be one the model needs; the rest of a run directory is fair game.
        let model_dir = transformer::train::checkpoint::resolve_model_dir(&args.checkpoint)?;
        crate::output::check_not_input(
            "--hyp-out",
            path,
            &[
                ("--src", src),
                ("--ref", reference),
                ("--checkpoint", model_dir.as_path()),
            ],
        )?;
        crate::output::check_file("--hyp-out", path, args.force)?;
    }
    let device = crate::device()?;
    let t = crate::checkpoint::load_translator(&args.checkpoint, &device)?;
    let pairs = read_parallel(src, reference)?;
    let t0 = Instant::now();
    let mut sources = Vec::with_capacity(pairs.len());
    for (i, (s, _)) in pairs.iter().enumerate() {
        let what = format!("{} line {}", src.display(), i + 1);
        // Scoring needs every line: an over-long one is truncated (with a warning), not skipped.
        let ids = encode_source(&t, s, &what, false)
            .with_context(|| what.clone())?
            .unwrap_or_default();
        sources.push(ids);
    }
    let hyps = translate_ids(&t, &sources, &opts, decode.batch_size, &device)?;
    let texts: Vec<String> = hyps
        .iter()
        .map(|h| hypothesis_text(&t, h))
        .collect::<Result<_>>()?;
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(path) = &args.hyp_out {
        let mut body = texts.join("\n");
        body.push('\n');
        crate::output::write_file(path, body.as_bytes())?;
    }
    let refs: Vec<&str> = pairs.iter().map(|(_, r)| r.as_str()).collect();
    let bleu = corpus_bleu(&texts, &refs, false)?;
    let bleu_lc = corpus_bleu(&texts, &refs, true)?;
    let chrf = corpus_chrf(&texts, &refs, false)?;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": t.dir.display().to_string(),
            "src": src.display().to_string(),
            "ref": reference.display().to_string(),
            "sentences": texts.len(),
            "beam": opts.beam_size,
            "alpha": opts.alpha,
            "bleu": bleu.score,
            "bleu_lowercase": bleu_lc.score,
            "chrf": chrf.score,
            "bleu_detail": bleu.to_string(),
            "bleu_lowercase_detail": bleu_lc.to_string(),
            "signature": "nrefs:1|case:mixed/lc|eff:no|tok:13a|smooth:exp (sacreBLEU 2 defaults)",
            "seconds": seconds,
        })
    );
    Ok(())
}
