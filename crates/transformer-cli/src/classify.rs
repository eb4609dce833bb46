//! `transformer classify --checkpoint DIR IMAGE... [--top-k K] [--attention-out DIR]`: the
//! top-k labels of each image with their probabilities, one JSON line per image, from one of
//! our ViT checkpoints or a Hugging Face `ViTForImageClassification` directory.
//!
//! With `--attention-out DIR`, per image: `<stem>-rollout.png`, the attention rollout of the
//! class token over the patches (Abnar & Zuidema 2020), and `<stem>-head<h>.png`, the last
//! layer's class-token attention of each head, laid over the image the model saw, with a
//! colour bar.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use transformer::data::images::read_image;
use transformer::pipelines::classify::{
    class_token_maps, load_classifier, probabilities, top_k, LoadedClassifier,
};

use crate::output::StagedDir;

#[derive(Args)]
pub struct ClassifyArgs {
    /// A ViT checkpoint or run directory of ours, or a Hugging Face ViTForImageClassification
    /// directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// PNG or JPEG files.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// How many labels to print per image.
    #[arg(long, default_value_t = 5, allow_hyphen_values = true)]
    top_k: usize,
    /// Write attention heatmaps (PNG) of every image into this directory.
    #[arg(long, value_name = "DIR")]
    attention_out: Option<PathBuf>,
    /// Replace an --attention-out directory that is not a previous classify output.
    #[arg(long, requires = "attention_out")]
    force: bool,
}

/// File stems for the heatmaps, made unique (`a`, `a-2`, ...) when two images share one.
fn unique_stems(paths: &[PathBuf]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mut name = stem.clone();
        let mut k = 2;
        while !seen.insert(name.clone()) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        out.push(name);
    }
    out
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1, got 0");
    }
    // Checked before any work: the heatmaps may not replace an input or an unrelated folder.
    if let Some(out) = &args.attention_out {
        let mut inputs: Vec<(&str, &Path)> = vec![("--checkpoint", args.checkpoint.as_path())];
        inputs.extend(args.images.iter().map(|p| ("IMAGE", p.as_path())));
        crate::output::check_not_input("--attention-out", out, &inputs)?;
        crate::output::check_dir("--attention-out", out, "classify", args.force)?;
    }
    let device = crate::device()?;
    let clf = load_classifier(&args.checkpoint, &device)
        .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
    // Every image is decoded before anything is printed or written: a bad file stops the
    // command with its name, and no partial output is left.
    let mut decoded = Vec::with_capacity(args.images.len());
    for path in &args.images {
        decoded.push(read_image(path)?);
    }
    let staged = match &args.attention_out {
        Some(out) => Some(StagedDir::begin(
            "--attention-out",
            out,
            "classify",
            args.force,
        )?),
        None => None,
    };
    let stems = unique_stems(&args.images);
    let mut lines = Vec::with_capacity(decoded.len());
    for ((path, img), stem) in args.images.iter().zip(&decoded).zip(&stems) {
        let pixels = clf
            .processor
            .pixel_values(std::slice::from_ref(img), &device)
            .with_context(|| path.display().to_string())?; // (1, C, H, W)
        let probs = probabilities(&clf.model.logits(&pixels, false)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let top: Vec<serde_json::Value> = top_k(&probs, args.top_k)
            .into_iter()
            .map(|(i, p)| serde_json::json!({"label": clf.labels[i], "index": i, "probability": p}))
            .collect();
        let mut line = serde_json::json!({
            "image": path.display().to_string(),
            "top": top,
        });
        if let Some(st) = &staged {
            let files = write_attention(&clf, img, &pixels, stem, st.path())
                .with_context(|| format!("attention of {}", path.display()))?;
            line["attention"] = serde_json::json!(files);
        }
        lines.push(line);
    }
    if let Some(st) = staged {
        st.commit()?;
    }
    for line in &lines {
        println!("{line}");
    }
    Ok(())
}

/// The rollout and per-head heatmaps of one image; the paths written, as they will be once
/// the staging directory is swapped in.
fn write_attention(
    clf: &LoadedClassifier,
    img: &transformer::data::resize::Pixels,
    pixels: &candle_core::Tensor,
    stem: &str,
    dir: &Path,
) -> Result<serde_json::Value> {
    let (_, _, h, w) = pixels.dims4()?;
    let p = clf.model.patch_size();
    let grid = (h / p, w / p);
    let attentions = clf.model.attentions(pixels)?; // n_layers × (1, Hd, T, T)
    let (roll, last) = class_token_maps(&attentions)?; // (1, N), (1, Hd, N)
    let seen = clf.processor.resized(img)?; // the image at the model's size
    let rollout_name = format!("{stem}-rollout.png");
    let roll = roll.squeeze(0)?.to_vec1::<f32>()?;
    crate::heatmap::write_overlay(&seen, &roll, grid, p, &dir.join(&rollout_name))?;
    let mut heads = Vec::new();
    for (hd, map) in last.squeeze(0)?.to_vec2::<f32>()?.iter().enumerate() {
        let name = format!("{stem}-head{hd}.png");
        crate::heatmap::write_overlay(&seen, map, grid, p, &dir.join(&name))?;
        heads.push(name);
    }
    Ok(serde_json::json!({"rollout": rollout_name, "last_layer_heads": heads}))
}

/// `transformer eval` of an image classifier: accuracy and the confusion matrix (rows: true
/// label, columns: predicted) on labelled IDX images or a folder-per-class tree, printed as
/// one JSON line, the matrix also drawn as an SVG.
pub fn eval_images(args: &crate::eval::ImageEvalArgs) -> Result<()> {
    let idx_labels = args
        .labels
        .unwrap_or(Path::new(crate::eval::DEFAULT_TEST_LABELS));
    crate::output::check_not_input(
        "--confusion-out",
        args.confusion_out,
        &[
            ("--images", args.images),
            ("--labels", idx_labels),
            ("--checkpoint", args.checkpoint),
        ],
    )?;
    crate::output::check_file("--confusion-out", args.confusion_out, args.force)?;
    let device = crate::device()?;
    let clf = load_classifier(args.checkpoint, &device).with_context(|| {
        format!(
            "--checkpoint {}: without --text (a language model) or --src/--ref (a translation \
             model), eval expects an image classifier",
            args.checkpoint.display()
        )
    })?;
    // Checked once: the JSON line below says which kind of data it read.
    let folder = args.images.is_dir();
    let data = if folder {
        if let Some(l) = args.labels {
            bail!(
                "--labels {}: the folder tree --images {} is labelled by its class folders; \
                 --labels goes with an IDX image file",
                l.display(),
                args.images.display()
            );
        }
        EvalImages::folder(args.images, &clf.labels)?
    } else {
        if !args.images.exists() {
            bail!(
                "--images {}: no such file (fetch the Fashion-MNIST test split with \
                 `transformer data fetch fashion-mnist`, or give --images FILE --labels FILE, \
                 or --images DIR of class folders)",
                args.images.display()
            );
        }
        let data = transformer::data::idx::LabelledImages::read_idx(args.images, idx_labels)?;
        let n_labels = clf.labels.len();
        if let Some(&max) = data.labels.iter().max() {
            if max as usize >= n_labels {
                bail!(
                    "{}: label {max} is beyond the model's {n_labels} classes",
                    idx_labels.display()
                );
            }
        }
        EvalImages::Idx(data)
    };
    let n_labels = clf.labels.len();
    let t0 = std::time::Instant::now();
    let mut confusion = vec![vec![0u64; n_labels]; n_labels];
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(args.batch_size) {
        let (images, truth): (Vec<_>, Vec<_>) = chunk
            .iter()
            .map(|&i| data.get(i))
            .collect::<transformer::Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let pixels = clf.processor.pixel_values(&images, &device)?; // (B, C, H, W)
        let preds = transformer::train::images::predictions(&clf.model.logits(&pixels, false)?)?;
        for (&t, &p) in truth.iter().zip(&preds) {
            confusion[t][p as usize] += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let correct: u64 = (0..n_labels).map(|i| confusion[i][i]).sum();
    let accuracy = correct as f64 / data.len().max(1) as f64;
    let svg = crate::plot::confusion_matrix_svg(&confusion, &clf.labels, accuracy)?;
    crate::output::write_file(args.confusion_out, svg.as_bytes())?;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": clf.dir.display().to_string(),
            "images": args.images.display().to_string(),
            "labels": (!folder).then(|| idx_labels.display().to_string()),
            "examples": data.len(),
            "accuracy": accuracy,
            "class_names": clf.labels,
            "confusion": confusion,
            "confusion_svg": args.confusion_out.display().to_string(),
            "images_per_sec": data.len() as f64 / seconds.max(1e-9),
        })
    );
    Ok(())
}

/// What `eval` scores an image classifier on.
enum EvalImages {
    Idx(transformer::data::idx::LabelledImages),
    /// A folder tree, with the model's label of each class folder.
    Folder(transformer::data::image_folder::ImageFolder, Vec<usize>),
}

impl EvalImages {
    /// A folder tree whose class folders are all among the model's `labels`.
    fn folder(dir: &Path, labels: &[String]) -> Result<Self> {
        let tree = transformer::data::image_folder::ImageFolder::scan(dir)?;
        let to_label = tree
            .classes
            .iter()
            .map(|c| {
                labels.iter().position(|l| l == c).with_context(|| {
                    format!(
                        "--images {}: class folder {c:?} is not one of the model's labels ({})",
                        dir.display(),
                        labels.join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?;
        Ok(EvalImages::Folder(tree, to_label))
    }

    fn len(&self) -> usize {
        match self {
            EvalImages::Idx(d) => d.len(),
            EvalImages::Folder(t, _) => t.len(),
        }
    }

    /// Image `i` decoded, and the model's label for it.
    fn get(&self, i: usize) -> transformer::Result<(transformer::data::resize::Pixels, usize)> {
        match self {
            EvalImages::Idx(d) => Ok((d.image(i)?, d.labels[i] as usize)),
            EvalImages::Folder(t, to_label) => {
                let (img, class) = t.image(i)?;
                Ok((img, to_label[class]))
            }
        }
    }
}
