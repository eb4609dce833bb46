//! From a [`RunConfig`] to a ready [`Trainer`] and its [`Task`]: tokenizer, data, model,
//! optimizer — fresh or resumed from the run directory's checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::checkpoint::{self, SRC_TOKENIZER_FILE, TOKENIZER_FILE};
use super::config::{DataConfig, RunConfig};
use super::images::{Augment, EpochSampler, ImageClassificationTask, ImageTraining, Normalize};
use super::loss::CrossEntropyConfig;
use super::optim::AdamW;
use super::parallel::{Collective, Local};
use super::pixels::PixelLmTask;
use super::tasks::{
    reverse_pair, BucketedPairs, BucketedSeq2SeqTask, LmTask, PairSource, Seq2SeqTask,
};
use super::trainer::{initial_data_rng, Task, Trainer, TrainerSetup};
use crate::data::idx::LabelledImages;
use crate::data::image_folder::ImageFolder;
use crate::data::image_set::ImageSet;
use crate::data::images::{ImageProcessor, ImageProcessorConfig, PerChannel};
use crate::data::pixel_tokens::PixelTokens;
use crate::data::{
    encode_pairs, read_parallel, read_text, CharTokenizer, LmDataset, Seq2SeqIds, Tokenizer,
    TokenizerConfig,
};
use crate::models::AnyConfig;
use crate::rng::Rng;
use crate::{Error, Result};

/// Symbols of the generated reversal task.
pub const REVERSE_ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz0123456789";

/// The tokenizer of the reversal task: `n_symbols` letters plus `<pad>`, `<bos>`, `<eos>`.
pub fn reverse_tokenizer(n_symbols: usize) -> Result<Tokenizer> {
    if n_symbols < 2 || n_symbols > REVERSE_ALPHABET.len() {
        return Err(Error::invalid(
            "data.n_symbols",
            format!("in [2, {}]", REVERSE_ALPHABET.len()),
            n_symbols.to_string(),
        ));
    }
    let chars: Vec<char> = REVERSE_ALPHABET.chars().take(n_symbols).collect();
    let specials = ["<pad>", "<bos>", "<eos>"].map(String::from).to_vec();
    Ok(CharTokenizer::new(chars, specials, None)?.into())
}

/// Builds the task once the model config (vocabulary size) is known.
type TaskBuilder = Box<dyn FnOnce(&dyn AnyConfig, &crate::nn::VarStore) -> Result<Box<dyn Task>>>;

/// A run ready to train.
pub struct PreparedRun {
    pub trainer: Trainer,
    pub task: Box<dyn Task>,
    /// The tokenizer of a text run (none for images).
    pub tokenizer: Option<Tokenizer>,
    pub model_config: Box<dyn AnyConfig>,
    pub n_params: usize,
    /// The source tokenizer of a translation run with separate vocabularies.
    pub src_tokenizer: Option<Tokenizer>,
    /// Lines worth showing the user about the data (sizes, filtered pairs).
    pub data_notes: Vec<String>,
}

/// The special tokens a translation vocabulary needs, used when `[tokenizer]` lists none.
pub const SEQ2SEQ_SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "<unk>"];

/// `cfg` with [`SEQ2SEQ_SPECIAL_TOKENS`] when it lists no special tokens.
fn with_seq2seq_specials(cfg: &TokenizerConfig) -> TokenizerConfig {
    let mut cfg = cfg.clone();
    if cfg.special_tokens.is_empty() && cfg.kind != crate::data::TokenizerKind::File {
        cfg.special_tokens = SEQ2SEQ_SPECIAL_TOKENS.map(String::from).to_vec();
    }
    cfg
}

/// The training text of both sides of a parallel corpus, one sentence per line.
fn corpus_text<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let mut text = String::new();
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    text
}

/// What every data kind's preparation reads.
struct SetupContext<'a> {
    cfg: &'a RunConfig,
    /// The run's checkpoint, whose tokenizers a resumed run reuses.
    ckpt_dir: PathBuf,
    resume: bool,
    loss: CrossEntropyConfig,
    device: &'a Device,
}

/// What a data kind sets up: its tokenizers, the task to build once the model config is known,
/// the model fields it decides unless the `[model]` section sets them, and lines worth showing
/// the user. A new data kind is one function returning this and one arm in [`prepare_run`].
struct DataSetup {
    tokenizer: Option<Tokenizer>,
    src_tokenizer: Option<Tokenizer>,
    builder: TaskBuilder,
    model_defaults: Vec<(&'static str, toml::Value)>,
    /// The vocabulary of data without a tokenizer (pixel tokens).
    vocab_size: Option<usize>,
    notes: Vec<String>,
}

impl DataSetup {
    /// One tokenizer, no model fields decided, nothing to tell.
    fn new(tokenizer: Tokenizer, builder: TaskBuilder) -> Self {
        DataSetup {
            tokenizer: Some(tokenizer),
            src_tokenizer: None,
            builder,
            model_defaults: Vec::new(),
            vocab_size: None,
            notes: Vec::new(),
        }
    }
}

/// Build the tokenizer, data, model and optimizer of `cfg` writing into `out_dir`; with
/// `resume`, continue from `out_dir/checkpoint` (its tokenizer is reused so ids never shift).
pub fn prepare_run(
    cfg: &RunConfig,
    out_dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<PreparedRun> {
    prepare_run_on(cfg, out_dir, resume, device, Arc::new(Local))
}

/// [`prepare_run`] for one rank of a data-parallel job over `collective`: every rank builds
/// the same model and data (the same seed), and only rank 0 writes into `out_dir`.
pub fn prepare_run_on(
    cfg: &RunConfig,
    out_dir: &Path,
    resume: bool,
    device: &Device,
    collective: Arc<dyn Collective>,
) -> Result<PreparedRun> {
    cfg.validate()?;
    let ckpt_dir = out_dir.join("checkpoint");
    if resume {
        checkpoint::recover(&ckpt_dir)?;
        // Images have no tokenizer.
        if !matches!(
            cfg.data,
            DataConfig::Images { .. } | DataConfig::ImageFolder { .. } | DataConfig::Pixels { .. }
        ) {
            checkpoint::require_files(&ckpt_dir, &[TOKENIZER_FILE])?;
        }
    }
    let seed = cfg.train.seed;
    let loss = CrossEntropyConfig {
        label_smoothing: cfg.train.label_smoothing,
        ignore_index: None,
        kernels: crate::kernels::Kernels::from_env(),
    };
    let ctx = SetupContext {
        cfg,
        ckpt_dir,
        resume,
        loss,
        device,
    };
    let DataSetup {
        tokenizer,
        src_tokenizer,
        builder: task_builder,
        model_defaults,
        vocab_size: data_vocab,
        notes: data_notes,
    } = match &cfg.data {
        DataConfig::Text {
            path,
            train_fraction,
        } => text_data(&ctx, path, train_fraction)?,
        DataConfig::Reverse {
            n_symbols,
            min_len,
            max_len,
            n_val,
        } => reverse_data(&ctx, n_symbols, min_len, max_len, n_val)?,
        DataConfig::Parallel {
            train_src,
            train_tgt,
            val_src,
            val_tgt,
            max_tokens,
            max_len,
            joint_vocab,
        } => parallel_data(
            &ctx,
            train_src,
            train_tgt,
            val_src,
            val_tgt,
            max_tokens,
            max_len,
            joint_vocab,
        )?,
        DataConfig::Images {
            train_images,
            train_labels,
            n_val,
            mean,
            std,
            crop_padding,
            hflip,
        } => image_data(
            &ctx,
            train_images,
            train_labels,
            *n_val,
            Normalize {
                mean: vec![*mean as f32],
                std: vec![*std as f32],
            },
            Augment {
                crop_padding: *crop_padding,
                hflip: *hflip,
            },
        )?,
        DataConfig::ImageFolder {
            train_dir,
            val_dir,
            n_val,
            mean,
            std,
            crop_padding,
            hflip,
        } => folder_data(
            &ctx,
            train_dir,
            val_dir.as_deref(),
            *n_val,
            (mean, std),
            Augment {
                crop_padding: *crop_padding,
                hflip: *hflip,
            },
        )?,
        DataConfig::Pixels {
            train_images,
            train_labels,
            n_val,
            levels,
            pool,
        } => pixel_data(&ctx, train_images, train_labels, *n_val, *levels, *pool)?,
    };
    let mut model_cfg = cfg.clone();
    for (key, value) in model_defaults {
        model_cfg.model.entry(key.to_string()).or_insert(value);
    }
    // A model without a vocabulary (images) ignores the sizes.
    let tgt_vocab = tokenizer
        .as_ref()
        .map_or(data_vocab.unwrap_or(0), Tokenizer::vocab_size);
    let src_vocab = src_tokenizer
        .as_ref()
        .map_or(tgt_vocab, Tokenizer::vocab_size);
    let model_config = model_cfg.model_config_with_vocabs(src_vocab, tgt_vocab)?;
    let vs = model_config.var_store(DType::F32, device, seed);
    let task = task_builder(model_config.as_ref(), &vs)?;
    // An initialization scale too large for f32 (e.g. model.embed_init_std = 1e300) gives
    // infinite weights before the first step; say so rather than blame the learning rate.
    let tensors = vs.tensors();
    let named = tensors.iter().map(|(n, t)| (n.as_str(), t));
    if let Some(name) = crate::validate::first_non_finite(named)? {
        return Err(Error::NonFinite {
            what: "model initialization".into(),
            tensor: format!("parameter `{name}`"),
            advice: "an initialization field of [model] (such as embed_init_std) is out of \
                     range for f32"
                .into(),
        });
    }
    let optimizer = AdamW::new(vs.vars(), cfg.optimizer)?.with_kernels(vs.kernels());
    let setup = TrainerSetup {
        out_dir: out_dir.to_path_buf(),
        vs: vs.clone(),
        optimizer,
        schedule: cfg.schedule.clone(),
        train: cfg.train.clone(),
        family: model_config.family().name,
        model_config: model_config.to_json()?,
        tokenizer: tokenizer.clone(),
        src_tokenizer: src_tokenizer.clone(),
        run_config: Some(cfg.clone()),
        collective,
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
        src_tokenizer,
        data_notes,
    })
}

/// `data.kind = "text"`: language modelling on one text file.
fn text_data(ctx: &SetupContext, path: &Path, train_fraction: &f64) -> Result<DataSetup> {
    let cfg = ctx.cfg;
    let resume = ctx.resume;
    let loss = ctx.loss;
    let device = ctx.device;
    let saved_tokenizer = || Tokenizer::load(ctx.ckpt_dir.join(TOKENIZER_FILE));
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
    let train_fraction = *train_fraction;
    let batch_size = cfg.train.batch_size;
    let device = device.clone();
    let path = path.to_path_buf();
    let builder = move |mc: &dyn AnyConfig, vs: &crate::nn::VarStore| -> Result<Box<dyn Task>> {
        let model = mc
            .build(&vs.root())?
            .into_causal_lm("data.kind = \"text\" (language modelling)")?;
        let block_size = model.context_length();
        let need = block_size + 1;
        for (split, n) in [
            ("training", data.train().len()),
            ("validation", data.val().len()),
        ] {
            if n < need {
                return Err(Error::msg(format!(
                    "{}: the {split} split has {n} tokens, fewer than block_size + 1 = {need} \
                     (data.train_fraction = {} of the text trains, the rest validates)",
                    path.display(),
                    crate::validate::show(train_fraction)
                )));
            }
        }
        Ok(Box::new(LmTask {
            model,
            data,
            batch_size,
            block_size,
            loss,
            device,
        }))
    };
    Ok(DataSetup::new(tokenizer, Box::new(builder)))
}
/// `data.kind = "reverse"`: the generated sequence-reversal task of the demo.
fn reverse_data(
    ctx: &SetupContext,
    n_symbols: &usize,
    min_len: &usize,
    max_len: &usize,
    n_val: &usize,
) -> Result<DataSetup> {
    let cfg = ctx.cfg;
    let loss = ctx.loss;
    let seed = cfg.train.seed;
    let device = ctx.device;
    if *min_len == 0 || min_len > max_len {
        return Err(Error::invalid(
            "data.min_len",
            format!("in [1, max_len = {max_len}]"),
            min_len.to_string(),
        ));
    }
    let tokenizer = reverse_tokenizer(*n_symbols)?;
    let (min_len, max_len, n_val) = (*min_len, *max_len, *n_val);
    let batch_size = cfg.train.batch_size;
    let device = device.clone();
    let tok = tokenizer.clone();
    let builder = move |mc: &dyn AnyConfig, vs: &crate::nn::VarStore| -> Result<Box<dyn Task>> {
        let model = mc
            .build(&vs.root())?
            .into_seq2seq("data.kind = \"reverse\"")?;
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
            model,
            train: PairSource::Reverse {
                symbols,
                min_len,
                max_len,
            },
            val,
            batch_size,
            ids: Seq2SeqIds::from_tokenizer(&tok)?,
            loss,
            device,
        }))
    };
    Ok(DataSetup::new(tokenizer, Box::new(builder)))
}
/// `data.kind = "parallel"`: translation on a parallel corpus, in length buckets.
#[allow(clippy::too_many_arguments)]
fn parallel_data(
    ctx: &SetupContext,
    train_src: &Path,
    train_tgt: &Path,
    val_src: &Path,
    val_tgt: &Path,
    max_tokens: &usize,
    max_len: &usize,
    joint_vocab: &bool,
) -> Result<DataSetup> {
    let cfg = ctx.cfg;
    let resume = ctx.resume;
    let loss = ctx.loss;
    let seed = cfg.train.seed;
    let device = ctx.device;
    let ckpt_dir = &ctx.ckpt_dir;
    let saved_tokenizer = || Tokenizer::load(ctx.ckpt_dir.join(TOKENIZER_FILE));
    let mut src_tokenizer: Option<Tokenizer> = None;
    let mut data_notes = Vec::new();
    let mut model_defaults: Vec<(&'static str, toml::Value)> = Vec::new();
    let (max_tokens, max_len, joint) = (*max_tokens, *max_len, *joint_vocab);
    if max_len == 0 {
        return Err(Error::invalid("data.max_len", "> 0", "0"));
    }
    if max_tokens < max_len {
        return Err(Error::invalid(
            "data.max_tokens",
            format!(
                "at least data.max_len = {max_len}, so that every kept sentence pair fits in a \
                 batch"
            ),
            max_tokens.to_string(),
        ));
    }
    let train_lines = read_parallel(train_src, train_tgt)?;
    let val_lines = read_parallel(val_src, val_tgt)?;
    let tok_cfg = with_seq2seq_specials(&cfg.tokenizer);
    let tokenizer = if resume {
        if !joint {
            checkpoint::require_files(ckpt_dir, &[SRC_TOKENIZER_FILE])?;
            src_tokenizer = Some(Tokenizer::load(ckpt_dir.join(SRC_TOKENIZER_FILE))?);
        }
        saved_tokenizer()?
    } else if joint {
        let text = corpus_text(
            train_lines
                .iter()
                .flat_map(|(s, t)| [s.as_str(), t.as_str()]),
        );
        tok_cfg.build(Some(&text))?
    } else {
        let src_text = corpus_text(train_lines.iter().map(|(s, _)| s.as_str()));
        let tgt_text = corpus_text(train_lines.iter().map(|(_, t)| t.as_str()));
        src_tokenizer = Some(tok_cfg.build(Some(&src_text))?);
        tok_cfg.build(Some(&tgt_text))?
    };
    let ids = Seq2SeqIds::from_tokenizer(&tokenizer)?;
    if let Some(st) = &src_tokenizer {
        // The batch pads sources with the target's pad id.
        if st.pad_id() != Some(ids.pad) {
            return Err(Error::Config(format!(
                "separate vocabularies need the padding token at the same id on both \
                 sides; source {:?}, target {}",
                st.pad_id(),
                ids.pad
            )));
        }
    }
    let src_tok = src_tokenizer.as_ref().unwrap_or(&tokenizer);
    let train = encode_pairs(src_tok, &tokenizer, &train_lines, max_len)?;
    let val = encode_pairs(src_tok, &tokenizer, &val_lines, max_len)?;
    for (what, set, n) in [
        ("training", &train, train_lines.len()),
        ("validation", &val, val_lines.len()),
    ] {
        data_notes.push(format!(
            "{what} pairs: {} kept of {n} ({} longer than data.max_len = {max_len}, {} \
             with an empty side)",
            set.pairs.len(),
            set.too_long,
            set.empty
        ));
    }
    if train.pairs.is_empty() || val.pairs.is_empty() {
        return Err(Error::msg(format!(
            "no sentence pairs left after filtering ({} training, {} validation); \
             raise data.max_len",
            train.pairs.len(),
            val.pairs.len()
        )));
    }
    model_defaults.push(("share_embeddings", toml::Value::Boolean(joint)));
    model_defaults.push(("tie_output", toml::Value::Boolean(true)));
    let max_pairs = cfg.train.batch_size;
    let device = device.clone();
    let builder = move |mc: &dyn AnyConfig, vs: &crate::nn::VarStore| -> Result<Box<dyn Task>> {
        let model = mc
            .build(&vs.root())?
            .into_seq2seq("data.kind = \"parallel\" (translation)")?;
        if model.max_len() < max_len {
            return Err(Error::invalid(
                "data.max_len",
                format!(
                    "at most the model's positions (model.max_len = {}); lower data.max_len or \
                     raise model.max_len",
                    model.max_len()
                ),
                max_len.to_string(),
            ));
        }
        let data = BucketedPairs {
            train: train.pairs,
            val: val.pairs,
            max_tokens,
            max_pairs,
            initial_rng: initial_data_rng(seed),
        };
        Ok(Box::new(BucketedSeq2SeqTask::new(
            model, data, ids, loss, device,
        )?))
    };
    Ok(DataSetup {
        tokenizer: Some(tokenizer),
        src_tokenizer,
        builder: Box::new(builder),
        model_defaults,
        vocab_size: None,
        notes: data_notes,
    })
}

/// The labelled IDX images of an image data section and their count, which `n_val` must
/// leave some of for training.
fn read_labelled(
    train_images: &Path,
    train_labels: &Path,
    n_val: usize,
) -> Result<(LabelledImages, usize)> {
    let images = LabelledImages::read_idx(train_images, train_labels)?;
    let n = images.len();
    if n_val >= n {
        return Err(Error::invalid(
            "data.n_val",
            format!(
                "fewer than the {n} images of {} (the rest train)",
                train_images.display()
            ),
            n_val.to_string(),
        ));
    }
    Ok((images, n))
}

/// `data.kind = "images"`: image classification on labelled IDX images.
fn image_data(
    ctx: &SetupContext,
    train_images: &Path,
    train_labels: &Path,
    n_val: usize,
    normalize: Normalize,
    augment: Augment,
) -> Result<DataSetup> {
    let (images, n) = read_labelled(train_images, train_labels, n_val)?;
    let n_train = n - n_val;
    let notes = vec![format!(
        "images: {n_train} training and {n_val} validation of {}x{} pixels from {} (augmentation: \
         crop padding {}, horizontal flip {})",
        images.height,
        images.width,
        train_images.display(),
        augment.crop_padding,
        if augment.hflip { "on" } else { "off" }
    )];
    let how = image_training(ctx, augment);
    let builder = move |mc: &dyn AnyConfig, vs: &crate::nn::VarStore| -> Result<Box<dyn Task>> {
        let model = mc
            .build(&vs.root())?
            .into_image_classifier("data.kind = \"images\" (image classification)")?;
        let images = ImageSet::from(images);
        Ok(Box::new(ImageClassificationTask::new(
            model, images, n_train, normalize, how,
        )?))
    };
    Ok(DataSetup {
        tokenizer: None,
        src_tokenizer: None,
        builder: Box::new(builder),
        model_defaults: Vec::new(),
        vocab_size: None,
        notes,
    })
}

/// The training settings of an image classification task, from `[train]`.
fn image_training(ctx: &SetupContext, augment: Augment) -> ImageTraining {
    ImageTraining {
        batch_size: ctx.cfg.train.batch_size,
        seed: ctx.cfg.train.seed,
        augment,
        loss: ctx.loss,
        device: ctx.device.clone(),
    }
}

/// Seeds the choice of validation images of an image folder without `val_dir`, apart from the
/// data order (which [`initial_data_rng`] seeds).
const FOLDER_SPLIT_SEED: u64 = 0x5EED_F01D;

/// `data.kind = "image_folder"`: image classification on a folder-per-class tree. The trees
/// are listed now (for the class names, which become the model's labels unless `[model]` sets
/// them); the images are decoded once the model gives their size and channels.
fn folder_data(
    ctx: &SetupContext,
    train_dir: &Path,
    val_dir: Option<&Path>,
    n_val: Option<usize>,
    (mean, std): (&PerChannel, &PerChannel),
    augment: Augment,
) -> Result<DataSetup> {
    let train = ImageFolder::scan(train_dir)?;
    let val = match val_dir {
        Some(dir) => {
            let val = ImageFolder::scan(dir)?;
            if val.classes != train.classes {
                return Err(Error::Path {
                    path: dir.to_path_buf(),
                    problem: format!(
                        "its class folders {:?} differ from those of data.train_dir {} ({:?}); \
                         both trees need the same ones",
                        val.classes,
                        train_dir.display(),
                        train.classes
                    ),
                });
            }
            Some(val)
        }
        None => None,
    };
    // Without a validation tree: a seeded random n_val of the training images validate.
    let (train_idx, held_out) = match &val {
        Some(_) => ((0..train.len()).collect::<Vec<_>>(), Vec::new()),
        None => {
            let n = train.len();
            let n_val = n_val.unwrap_or((n / 10).max(1));
            if n_val >= n {
                return Err(Error::invalid(
                    "data.n_val",
                    format!(
                        "fewer than the {n} images of {} (the rest train)",
                        train_dir.display()
                    ),
                    n_val.to_string(),
                ));
            }
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = Rng::new(ctx.cfg.train.seed ^ FOLDER_SPLIT_SEED);
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let held = order.split_off(n - n_val);
            (order, held)
        }
    };
    let n_train = train_idx.len();
    let n_val = val.as_ref().map_or(held_out.len(), ImageFolder::len);
    let classes = train.classes.clone();
    let notes = vec![format!(
        "images: {n_train} training and {n_val} validation in {} classes from {}{} \
         (augmentation: crop padding {}, horizontal flip {})",
        classes.len(),
        train_dir.display(),
        val_dir.map_or(String::new(), |v| format!(" and {}", v.display())),
        augment.crop_padding,
        if augment.hflip { "on" } else { "off" }
    )];
    // The head has one class per folder. A `[model]` num_labels must agree (and the folder
    // names label it unless `[model]` names the labels itself).
    if let Some(v) = ctx.cfg.model.get("num_labels") {
        if v.as_integer() != Some(classes.len() as i64) {
            return Err(Error::invalid(
                "model.num_labels",
                format!(
                    "{} (the class folders of {}), or unset",
                    classes.len(),
                    train_dir.display()
                ),
                v.to_string(),
            ));
        }
    }
    let id2label: toml::Table = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), toml::Value::String(c.clone())))
        .collect();
    let model_defaults = vec![
        ("num_labels", toml::Value::Integer(classes.len() as i64)),
        ("id2label", toml::Value::Table(id2label)),
    ];
    let (mean, std) = (mean.clone(), std.clone());
    let how = image_training(ctx, augment);
    let builder = move |mc: &dyn AnyConfig, vs: &crate::nn::VarStore| -> Result<Box<dyn Task>> {
        let model = mc
            .build(&vs.root())?
            .into_image_classifier("data.kind = \"image_folder\" (image classification)")?;
        let n_labels = model.labels().len();
        if n_labels != classes.len() {
            return Err(Error::invalid(
                "model.num_labels",
                format!(
                    "{} (the class folders of {})",
                    classes.len(),
                    train.root.display()
                ),
                n_labels.to_string(),
            ));
        }
        let (c, side) = (model.num_channels(), model.image_size());
        let normalize = Normalize {
            mean: mean.for_channels(c, "data.mean")?,
            std: std.for_channels(c, "data.std")?,
        };
        let processor =
            ImageProcessor::new(ImageProcessorConfig::square_normalized(side, mean, std), c)?;
        let mut images = train.load(&train_idx, &processor, c, side)?;
        let eval = match &val {
            Some(v) => v.load(&(0..v.len()).collect::<Vec<_>>(), &processor, c, side)?,
            None => train.load(&held_out, &processor, c, side)?,
        };
        images.pixels.extend_from_slice(&eval.pixels);
        images.labels.extend_from_slice(&eval.labels);
        Ok(Box::new(ImageClassificationTask::new(
            model, images, n_train, normalize, how,
        )?))
    };
    Ok(DataSetup {
        tokenizer: None,
        src_tokenizer: None,
        builder: Box::new(builder),
        model_defaults,
        vocab_size: None,
        notes,
    })
}

/// `data.kind = "pixels"`: class-conditional image generation on labelled IDX images.
fn pixel_data(
    ctx: &SetupContext,
    train_images: &Path,
    train_labels: &Path,
    n_val: usize,
    levels: usize,
    pool: usize,
) -> Result<DataSetup> {
    let (images, n) = read_labelled(train_images, train_labels, n_val)?;
    let tokens = PixelTokens::for_images(&images, levels, pool)
        .map_err(|e| Error::msg(format!("{}: {e}", train_images.display())))?;
    let n_train = n - n_val;
    let notes = vec![format!(
        "pixels: {n_train} training and {n_val} validation images from {}, {}x{} pixels of {} \
         grey levels after {pool}x{pool} pooling, {} classes: {} tokens per image",
        train_images.display(),
        tokens.side,
        tokens.side,
        tokens.levels,
        tokens.classes,
        tokens.pixels()
    )];
    let batch_size = ctx.cfg.train.batch_size;
    let seed = ctx.cfg.train.seed;
    let loss = ctx.loss;
    let device = ctx.device.clone();
    let builder = move |mc: &dyn AnyConfig, vs: &crate::nn::VarStore| -> Result<Box<dyn Task>> {
        let model = mc
            .build(&vs.root())?
            .into_causal_lm("data.kind = \"pixels\" (image generation)")?;
        tokens.check_model(model.vocab_size(), model.context_length())?;
        Ok(Box::new(PixelLmTask {
            model,
            sampler: EpochSampler::new(n_train, batch_size, initial_data_rng(seed))?,
            train: (0..n_train).collect(),
            val: (n_train..n).collect(),
            images,
            tokens,
            batch_size,
            loss,
            device,
        }))
    };
    Ok(DataSetup {
        tokenizer: None,
        src_tokenizer: None,
        builder: Box::new(builder),
        model_defaults: vec![("block_size", toml::Value::Integer(tokens.pixels() as i64))],
        vocab_size: Some(tokens.vocab_size()),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::Engine;
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

    /// Trains `cfg` with candle's backward and with the tape, in `dir/candle` and `dir/tape`,
    /// and checks that every step's loss agrees within 1e-6. Returns the tape's losses.
    fn engines_agree(cfg: &RunConfig, dir: &Path) -> Result<Vec<f64>> {
        let mut losses = Vec::new();
        for engine in [Engine::Candle, Engine::Tape] {
            let mut cfg = cfg.clone();
            cfg.train.engine = engine;
            let out = dir.join(format!("{engine:?}"));
            let mut run = prepare_run(&cfg, &out, false, &Device::Cpu)?;
            losses.push(run.trainer.run(run.task.as_mut(), &mut Silent)?.losses);
        }
        let (candle, tape) = (&losses[0], &losses[1]);
        assert_eq!(candle.len(), tape.len());
        for (i, (c, t)) in candle.iter().zip(tape).enumerate() {
            assert!(
                (c - t).abs() <= 1e-6,
                "step {}: candle {c}, tape {t}",
                i + 1
            );
        }
        Ok(losses.pop().expect("two runs"))
    }

    #[test]
    fn the_tape_engine_trains_as_candles_backward() -> Result<()> {
        // Dropout, clipping and two micro-batches per step: every path of the step.
        let dir = corpus_dir("engine");
        let tape = engines_agree(&lm_config(&dir, 6), &dir)?;
        assert!(tape[5] < tape[0]);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// A toy parallel corpus: "German" words and their word-for-word "English" translations.
    fn parallel_dir(name: &str, n: usize) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("transformer-run-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let words = [
            ("ein", "a"),
            ("hund", "dog"),
            ("katze", "cat"),
            ("läuft", "runs"),
            ("schläft", "sleeps"),
            ("rot", "red"),
            ("groß", "big"),
        ];
        let mut rng = Rng::new(5);
        let (mut de, mut en) = (String::new(), String::new());
        for _ in 0..n {
            let len = 2 + rng.below(6) as usize;
            let idx: Vec<usize> = (0..len)
                .map(|_| rng.below(words.len() as u64) as usize)
                .collect();
            let line = |side: fn(&(&str, &str)) -> String| -> String {
                idx.iter()
                    .map(|&i| side(&words[i]))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            de.push_str(&line(|w| w.0.to_string()));
            de.push('\n');
            en.push_str(&line(|w| w.1.to_string()));
            en.push('\n');
        }
        for (f, text) in [
            ("train.de", &de),
            ("train.en", &en),
            ("val.de", &de),
            ("val.en", &en),
        ] {
            std::fs::write(dir.join(f), text).unwrap();
        }
        dir
    }

    fn parallel_config(dir: &Path, steps: u64, joint: bool) -> RunConfig {
        let toml = format!(
            r#"
[model]
family = "encoder_decoder"
preset = "tiny"
d_model = 32
d_ff = 64
n_heads = 2
n_encoder_layers = 1
n_decoder_layers = 1
max_len = 48

[data]
kind = "parallel"
train_src = "{d}/train.de"
train_tgt = "{d}/train.en"
val_src = "{d}/val.de"
val_tgt = "{d}/val.en"
max_tokens = 96
max_len = 40
joint_vocab = {joint}

[tokenizer]
kind = "bpe"
vocab_size = 300

[train]
batch_size = 8
max_steps = {steps}
grad_accum = 2
label_smoothing = 0.1
eval_every = 3
log_every = 1

[optimizer]
beta1 = 0.9
beta2 = 0.98
eps = 1e-9
weight_decay = 0.0

[schedule]
kind = "noam"
d_model = 32
warmup_steps = 4
factor = 1.0
"#,
            d = dir.display()
        );
        RunConfig::from_toml(&toml, &[], "test").unwrap()
    }

    #[test]
    fn the_tape_engine_trains_translation_as_candles_backward() -> Result<()> {
        // Padding on both sides, label smoothing, the ignored label, two micro-batches.
        let dir = parallel_dir("parallel-engine", 24);
        assert_eq!(
            engines_agree(&parallel_config(&dir, 4, true), &dir)?.len(),
            4
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn parallel_run_resumes_mid_epoch_exactly() -> Result<()> {
        // 40 pairs in batches of at most 8: about 6 batches an epoch, so 8 steps of 2
        // micro-batches cross two epoch boundaries and the split at step 3 falls mid-epoch.
        let dir = parallel_dir("parallel-resume", 40);
        let cfg = parallel_config(&dir, 8, true);
        let mut full = prepare_run(&cfg, &dir.join("full"), false, &Device::Cpu)?;
        let mc = full
            .model_config
            .downcast_ref::<crate::models::EncoderDecoderConfig>()
            .expect("family");
        assert!(
            mc.share_embeddings && mc.tie_output,
            "joint vocabulary shares embeddings"
        );
        assert_eq!(
            full.tokenizer.as_ref().map(|t| t.special_ids().bos),
            Some(Some(1))
        );
        let all = full.trainer.run(full.task.as_mut(), &mut Silent)?;
        assert_eq!(all.losses.len(), 8);

        let mut first = prepare_run(
            &parallel_config(&dir, 3, true),
            &dir.join("split"),
            false,
            &Device::Cpu,
        )?;
        let a = first.trainer.run(first.task.as_mut(), &mut Silent)?;
        let mut second = prepare_run(&cfg, &dir.join("split"), true, &Device::Cpu)?;
        let b = second.trainer.run(second.task.as_mut(), &mut Silent)?;
        let resumed: Vec<f64> = a.losses.iter().chain(&b.losses).copied().collect();
        assert_eq!(
            resumed, all.losses,
            "resumed losses differ from the uninterrupted run"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn parallel_run_with_separate_vocabularies() -> Result<()> {
        let dir = parallel_dir("parallel-separate", 24);
        let cfg = parallel_config(&dir, 1, false);
        let out = dir.join("run");
        let mut run = prepare_run(&cfg, &out, false, &Device::Cpu)?;
        let mc = run
            .model_config
            .downcast_ref::<crate::models::EncoderDecoderConfig>()
            .expect("family");
        let src = run.src_tokenizer.as_ref().expect("a source tokenizer");
        assert_eq!(mc.src_vocab_size, src.vocab_size());
        assert_eq!(
            Some(mc.tgt_vocab_size),
            run.tokenizer.as_ref().map(Tokenizer::vocab_size)
        );
        assert!(!mc.share_embeddings);
        run.trainer.run(run.task.as_mut(), &mut Silent)?;
        let ckpt = out.join("checkpoint");
        assert!(ckpt.join(SRC_TOKENIZER_FILE).is_file() && ckpt.join(TOKENIZER_FILE).is_file());

        // Line counts that differ are named with both files.
        std::fs::write(dir.join("val.en"), "a dog\n").unwrap();
        let e = prepare_run(&cfg, &dir.join("bad"), false, &Device::Cpu)
            .err()
            .expect("mismatched files")
            .to_string();
        assert!(
            e.contains("val.de has 24 lines") && e.contains("val.en has 1 lines"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Trains `cfg` in one process and as `world` ranks (threads over a
    /// [`crate::train::parallel::ThreadGroup`]) with the same global batch; every step's loss
    /// must agree within 1e-6, and every rank must report the same losses. Returns the
    /// ranks' losses.
    fn ranks_agree(cfg: &RunConfig, dir: &Path, world: usize) -> Result<Vec<f64>> {
        use crate::train::parallel::ThreadGroup;
        let mut single = prepare_run(cfg, &dir.join("single"), false, &Device::Cpu)?;
        let one = single
            .trainer
            .run(single.task.as_mut(), &mut Silent)?
            .losses;
        let out = dir.join(format!("ranks-{world}"));
        let runs: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ThreadGroup::new(world)
                .into_iter()
                .map(|group| {
                    let out = out.clone();
                    scope.spawn(move || -> Result<Vec<f64>> {
                        let mut run =
                            prepare_run_on(cfg, &out, false, &Device::Cpu, Arc::new(group))?;
                        Ok(run.trainer.run(run.task.as_mut(), &mut Silent)?.losses)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let runs: Vec<Vec<f64>> = runs.into_iter().collect::<Result<_>>()?;
        for (rank, losses) in runs.iter().enumerate() {
            assert_eq!(
                losses, &runs[0],
                "rank {rank} reports other losses than rank 0"
            );
        }
        assert_eq!(runs[0].len(), one.len());
        for (i, (a, b)) in one.iter().zip(&runs[0]).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "step {}: one process {a}, {world} ranks {b}",
                i + 1
            );
        }
        // Rank 0 alone wrote the run.
        assert!(out.join("checkpoint").is_dir());
        Ok(runs.into_iter().next().expect("a rank"))
    }

    fn without_dropout(mut cfg: RunConfig) -> RunConfig {
        // Each rank draws its own dropout masks, which a single process cannot reproduce.
        cfg.model.insert("dropout".into(), toml::Value::Float(0.0));
        cfg
    }

    #[test]
    fn ranks_train_a_language_model_as_one_process() -> Result<()> {
        // A global batch of 5 (shards of 3 and 2: the token weighting matters), clipping and
        // two micro-batches, with both engines; then 3 ranks on the tape.
        let dir = corpus_dir("ranks-lm");
        for engine in [Engine::Tape, Engine::Candle] {
            let mut cfg = without_dropout(lm_config(&dir, 6));
            cfg.train.batch_size = 5;
            cfg.train.engine = engine;
            let losses = ranks_agree(&cfg, &dir.join(format!("{engine:?}")), 2)?;
            assert!(losses[5] < losses[0]);
        }
        // One micro-batch: the buckets are summed while the backward runs.
        let mut cfg = without_dropout(lm_config(&dir, 4));
        cfg.train.grad_accum = 1;
        cfg.train.batch_size = 7;
        ranks_agree(&cfg, &dir.join("three"), 3)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn ranks_train_translation_as_one_process() -> Result<()> {
        // Length buckets of 1 to 8 pairs: shards of unequal token counts, and empty ones.
        let dir = parallel_dir("ranks-parallel", 24);
        let mut cfg = without_dropout(parallel_config(&dir, 4, true));
        cfg.train.grad_accum = 1;
        ranks_agree(&cfg, &dir, 3)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_batch_smaller_than_the_world_is_refused() {
        use crate::train::parallel::ThreadGroup;
        let dir = corpus_dir("ranks-small");
        let mut cfg = lm_config(&dir, 2);
        cfg.train.batch_size = 1;
        let group = ThreadGroup::new(2).into_iter().next().unwrap();
        let e = prepare_run_on(&cfg, &dir.join("run"), false, &Device::Cpu, Arc::new(group))
            .err()
            .expect("batch 1 on 2 ranks")
            .to_string();
        assert!(
            e.contains("train.batch_size") && e.contains("ranks (2)"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
