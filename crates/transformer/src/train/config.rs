//! The run configuration: one TOML file with `[model]`, `[data]`, `[tokenizer]`, `[train]`,
//! `[optimizer]` and `[schedule]` sections; any field can be overridden with
//! `section.key=value` (`--set` on the command line).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::schedule::LrSchedule;
use crate::data::images::PerChannel;
use crate::data::TokenizerConfig;
use crate::models::{family, AnyConfig, Family, FAMILIES};
use crate::{Error, Result};

/// Where the training data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// One text file for language modelling: the first `train_fraction` of its tokens train,
    /// the rest validate.
    Text {
        path: PathBuf,
        #[serde(default = "default_train_fraction")]
        train_fraction: f64,
    },
    /// Generated sequences to reverse (the demo's copy-task family): random symbols from an
    /// alphabet of `n_symbols`, lengths in [min_len, max_len].
    Reverse {
        n_symbols: usize,
        min_len: usize,
        max_len: usize,
        #[serde(default = "default_n_val")]
        n_val: usize,
    },
    /// A parallel corpus for translation: line `i` of `train_src` is translated by line `i` of
    /// `train_tgt` (likewise for validation). The tokenizer is trained on the training text of
    /// both sides (one joint vocabulary) or of each side (two vocabularies). Training batches
    /// hold sentence pairs of similar length, up to `max_tokens` padded tokens per side and
    /// `train.batch_size` pairs (Vaswani et al. 2017, §5.1).
    Parallel {
        /// Training source text, one sentence per line.
        train_src: PathBuf,
        /// Training target text, aligned with `train_src`.
        train_tgt: PathBuf,
        /// Validation source text.
        val_src: PathBuf,
        /// Validation target text, aligned with `val_src`.
        val_tgt: PathBuf,
        /// Token budget of a batch: pairs × the longest side (in tokens, padding included).
        max_tokens: usize,
        /// Training pairs with more than `max_len` source tokens, or target tokens + eos, are
        /// dropped (validation pairs too long for the model's positions are dropped as well).
        #[serde(default = "default_parallel_max_len")]
        max_len: usize,
        /// One tokenizer and vocabulary for both languages (then the model shares its source
        /// and target embeddings and ties the output projection to them); `false` trains one
        /// tokenizer per side.
        #[serde(default = "yes")]
        joint_vocab: bool,
    },
    /// Labelled grey images for classification, from IDX files (MNIST, Fashion-MNIST): the
    /// last `n_val` training images validate, the others train with the given augmentation.
    Images {
        /// IDX image file (N, H, W), gzipped or raw.
        train_images: PathBuf,
        /// IDX label file (N), aligned with `train_images`.
        train_labels: PathBuf,
        /// Training images held out (the last ones) for validation and `best/`.
        #[serde(default = "default_image_n_val")]
        n_val: usize,
        /// Subtracted from the pixels after scaling to [0, 1] (Fashion-MNIST's mean: 0.2860).
        #[serde(default = "half")]
        mean: f64,
        /// Divides the pixels after the mean (Fashion-MNIST's: 0.3530).
        #[serde(default = "half")]
        std: f64,
        /// Random crop: pad every side with this many zero pixels and crop the original size
        /// back at a random offset (torchvision's `RandomCrop(size, padding)`); 0: none.
        #[serde(default)]
        crop_padding: usize,
        /// Random horizontal flip with probability 1/2.
        #[serde(default)]
        hflip: bool,
    },
    /// Users' own labelled images in torchvision's `ImageFolder` layout (`DIR/<label>/…/*.png`
    /// or `.jpg`; classes are the sub-folders in sorted order), for classification. Every image
    /// is decoded once, converted to the model's channels (grey or RGB) and resized to its
    /// `image_size` square (bilinear, as `ViTImageProcessor`), and kept in memory as bytes. The
    /// class folders set the model's `num_labels` and `id2label` unless `[model]` does.
    ImageFolder {
        /// The training tree.
        train_dir: PathBuf,
        /// A validation tree with the same class folders; without it, `n_val` images of
        /// `train_dir` (a seeded random choice) validate and the others train.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        val_dir: Option<PathBuf>,
        /// Images of `train_dir` held out for validation when there is no `val_dir` (default:
        /// a tenth, at least 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n_val: Option<usize>,
        /// Subtracted per channel after scaling to [0, 1]: one number, or one per channel
        /// (ImageNet's: [0.485, 0.456, 0.406]).
        #[serde(default = "half_per_channel")]
        mean: PerChannel,
        /// Divides per channel after the mean (ImageNet's: [0.229, 0.224, 0.225]).
        #[serde(default = "half_per_channel")]
        std: PerChannel,
        /// Random crop with zero padding, as for `images`; 0: none.
        #[serde(default)]
        crop_padding: usize,
        /// Random horizontal flip with probability 1/2.
        #[serde(default)]
        hflip: bool,
    },
    /// Labelled grey images as class-conditional pixel-token sequences, for image generation
    /// with a decoder-only model ([`crate::data::pixel_tokens`]): the class token, then the
    /// pixels in raster order as `levels` grey levels. The model's `vocab_size` is `levels` +
    /// the number of classes and its `block_size` defaults to the pixels per image. The last
    /// `n_val` training images validate (loss in nats per pixel).
    Pixels {
        /// IDX image file (N, H, W) of square images, gzipped or raw.
        train_images: PathBuf,
        /// IDX label file (N), aligned with `train_images`.
        train_labels: PathBuf,
        /// Training images held out (the last ones) for validation and `best/`.
        #[serde(default = "default_pixels_n_val")]
        n_val: usize,
        /// Grey levels (tokens per pixel), 2 to 256.
        #[serde(default = "default_levels")]
        levels: usize,
        /// Average `pool`×`pool` blocks into one pixel first (2: 28×28 → 14×14).
        #[serde(default = "one")]
        pool: usize,
    },
}

fn default_pixels_n_val() -> usize {
    1000
}
fn default_levels() -> usize {
    16
}

fn default_image_n_val() -> usize {
    5000
}
fn half() -> f64 {
    0.5
}
fn half_per_channel() -> PerChannel {
    PerChannel::One(0.5)
}

fn default_train_fraction() -> f64 {
    0.9
}
fn default_n_val() -> usize {
    256
}
fn default_parallel_max_len() -> usize {
    128
}

/// The `[train]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds initialization, data order and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Optimizer steps to run.
    pub max_steps: u64,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value (none: no clipping).
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Label smoothing of the cross-entropy.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Evaluate every this many steps (and at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Validation batches per evaluation.
    #[serde(default = "default_eval_iters")]
    pub eval_iters: usize,
    /// Log a training line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Save the checkpoint every this many steps (default: at every evaluation).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Keep a copy of the checkpoint with the best validation loss in `best/`.
    #[serde(default = "yes")]
    pub keep_best: bool,
    /// Also save the weights at every checkpoint in `step-XXXXXX/` and keep the last this many
    /// of them, for checkpoint averaging (`transformer average`; the paper averages the last 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<usize>,
    /// Which reverse-mode engine computes the gradients: `"tape"` (ours, `crate::autograd`:
    /// less memory, fewer passes), `"candle"` (candle's `backward`), or `"auto"` (the
    /// default): the tape where it covers every op, which is with the fused CPU kernels in
    /// f32/f64, candle's otherwise (`TRANSFORMER_KERNELS=composed`, another device or dtype).
    /// A model using an op the tape does not cover stops at its first step with an error
    /// naming the op.
    #[serde(default)]
    pub engine: Engine,
    /// In data-parallel training (`mpirun -np N transformer train …`), check every this many
    /// steps (and at the start and the end) that every rank holds the same parameters, by a
    /// hash of their bits: ranks that drift apart stop the run with an error.
    #[serde(default = "default_sync_check_every")]
    pub sync_check_every: u64,
    /// The precision of the matrix products, forward and backward: `"f32"` (the default) or
    /// `"bf16"` (mixed precision: the products' inputs rounded to bf16 with f32 accumulation,
    /// on AMX where the CPU has it; master weights, optimizer state, norms, softmax and loss
    /// in f32). See `kernels::bf16`.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: crate::kernels::bf16::Precision,
}

fn is_f32(p: &crate::kernels::bf16::Precision) -> bool {
    *p == crate::kernels::bf16::Precision::F32
}

/// The `train.engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Auto,
    Candle,
    Tape,
}

impl Engine {
    /// The engine that runs for a model whose parameters are in `vs`.
    pub fn resolve(self, vs: &crate::nn::VarStore) -> Engine {
        match self {
            Engine::Auto => {
                let kernels_apply = vs.kernels() == crate::kernels::Kernels::Fused
                    && vs.device().is_cpu()
                    && matches!(
                        vs.dtype(),
                        candle_core::DType::F32 | candle_core::DType::F64
                    );
                if kernels_apply {
                    Engine::Tape
                } else {
                    Engine::Candle
                }
            }
            e => e,
        }
    }
}

fn default_seed() -> u64 {
    1337
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_eval_every() -> u64 {
    250
}
fn default_eval_iters() -> usize {
    20
}
fn default_log_every() -> u64 {
    10
}
fn default_sync_check_every() -> u64 {
    100
}

/// Upper bounds on counts that size allocations: far above any real run, low enough that a
/// typo is an error naming the field rather than an allocation that exhausts memory.
const MAX_BATCH: u64 = 1 << 20;
const MAX_ACCUM: u64 = 1 << 16;

impl TrainConfig {
    /// Every field in range (see [`crate::validate`]); errors name the field, the value and
    /// the allowed range.
    pub fn validate(&self) -> Result<()> {
        use crate::validate::{at_least_one, count_in, in_half_open, positive};
        count_in("train.batch_size", self.batch_size as u64, 1, MAX_BATCH)?;
        at_least_one("train.max_steps", self.max_steps)?;
        count_in("train.grad_accum", self.grad_accum as u64, 1, MAX_ACCUM)?;
        at_least_one("train.eval_every", self.eval_every)?;
        count_in("train.eval_iters", self.eval_iters as u64, 1, MAX_BATCH)?;
        at_least_one("train.log_every", self.log_every)?;
        at_least_one("train.sync_check_every", self.sync_check_every)?;
        if let Some(c) = self.grad_clip {
            positive("train.grad_clip", c)?;
        }
        in_half_open("train.label_smoothing", self.label_smoothing, 0.0, 1.0)?;
        if let Some(c) = self.checkpoint_every {
            at_least_one("train.checkpoint_every", c)?;
        }
        if self.keep_last == Some(0) {
            return Err(Error::invalid(
                "train.keep_last",
                "> 0 (leave it out to keep no step checkpoints)",
                "0",
            ));
        }
        Ok(())
    }
}

impl DataConfig {
    /// The numeric fields of the data section in range.
    pub fn validate(&self) -> Result<()> {
        use crate::validate::count_in;
        match self {
            DataConfig::Text { train_fraction, .. } => {
                // Not 1: the rest of the text is the validation split, which val loss and
                // best/ need.
                let f = *train_fraction;
                if !(f.is_finite() && f > 0.0 && f < 1.0) {
                    return Err(Error::invalid(
                        "data.train_fraction",
                        "in (0, 1) (the rest of the text is the validation split)",
                        f.to_string(),
                    ));
                }
            }
            DataConfig::Reverse {
                min_len,
                max_len,
                n_val,
                ..
            } => {
                // An empty validation set would report a val loss of 0 and freeze best/ at
                // the first evaluation.
                count_in("data.n_val", *n_val as u64, 1, MAX_BATCH)?;
                count_in("data.max_len", *max_len as u64, 1, 1 << 16)?;
                count_in("data.min_len", *min_len as u64, 1, *max_len as u64)?;
            }
            DataConfig::Parallel {
                max_tokens,
                max_len,
                ..
            } => {
                count_in("data.max_len", *max_len as u64, 1, 1 << 16)?;
                count_in("data.max_tokens", *max_tokens as u64, 1, 1 << 24)?;
            }
            DataConfig::Images {
                n_val,
                mean,
                std,
                crop_padding,
                ..
            } => {
                // An empty validation set would report no accuracy and freeze best/.
                count_in("data.n_val", *n_val as u64, 1, MAX_BATCH)?;
                count_in("data.crop_padding", *crop_padding as u64, 0, 1 << 12)?;
                if !mean.is_finite() {
                    return Err(Error::invalid("data.mean", "finite", mean.to_string()));
                }
                if !(std.is_finite() && *std > 0.0) {
                    return Err(Error::invalid(
                        "data.std",
                        "finite and > 0",
                        std.to_string(),
                    ));
                }
            }
            DataConfig::ImageFolder {
                n_val,
                val_dir,
                mean,
                std,
                crop_padding,
                ..
            } => {
                if let Some(n) = n_val {
                    if val_dir.is_some() {
                        return Err(Error::invalid(
                            "data.n_val",
                            "unset when data.val_dir gives the validation images",
                            n.to_string(),
                        ));
                    }
                    count_in("data.n_val", *n as u64, 1, MAX_BATCH)?;
                }
                count_in("data.crop_padding", *crop_padding as u64, 0, 1 << 12)?;
                for (field, values, positive) in
                    [("data.mean", mean, false), ("data.std", std, true)]
                {
                    let values = match values {
                        PerChannel::One(v) => vec![*v],
                        PerChannel::Each(v) => v.clone(),
                    };
                    let ok = |v: &f64| v.is_finite() && (!positive || *v > 0.0);
                    if values.is_empty() || !values.iter().all(ok) {
                        return Err(Error::invalid(
                            field,
                            if positive {
                                "finite numbers > 0 (one, or one per channel)"
                            } else {
                                "finite numbers (one, or one per channel)"
                            },
                            format!("{values:?}"),
                        ));
                    }
                }
            }
            DataConfig::Pixels {
                n_val,
                levels,
                pool,
                ..
            } => {
                count_in("data.n_val", *n_val as u64, 1, MAX_BATCH)?;
                count_in("data.levels", *levels as u64, 2, 256)?;
                count_in("data.pool", *pool as u64, 1, 1 << 12)?;
            }
        }
        Ok(())
    }
}

/// A whole run, as read from the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `family` (encoder_decoder, decoder_only, encoder_only), optional `preset`, and any
    /// field of that family's config; `vocab_size` comes from the tokenizer.
    pub model: toml::Table,
    pub data: DataConfig,
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
}

impl RunConfig {
    /// Parse TOML text (after applying `overrides` of the form `section.key=value`).
    pub fn from_toml(text: &str, overrides: &[String], what: &str) -> Result<Self> {
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::Config(format!("{what}: {e}")))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        // Before serde sees them: its errors for NaN in an integer field do not say which.
        crate::validate::toml_finite("", &doc).map_err(|e| e.in_source(what))?;
        let cfg: RunConfig = doc.clone().try_into().map_err(|e: toml::de::Error| {
            let field = bad_tagged_field(&doc, &e.to_string());
            Error::Config(match field {
                Some(f) => format!("{what}: {f}: {e}"),
                None => format!("{what}: {e}"),
            })
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a config file (with overrides).
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, overrides, &path.display().to_string())
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Config(format!("cannot write config: {e}")))
    }

    pub fn validate(&self) -> Result<()> {
        crate::validate::toml_finite("model", &self.model)?;
        self.data.validate()?;
        self.train.validate()?;
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.tokenizer.validate()?;
        self.family()?;
        Ok(())
    }

    /// The family named by the `model.family` field.
    pub fn family(&self) -> Result<&'static Family> {
        let known = || {
            FAMILIES
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let f = self.model.get("family").ok_or_else(|| {
            Error::invalid("model.family", format!("one of {}", known()), "nothing")
        })?;
        match f {
            toml::Value::String(name) => family(name)
                .map_err(|_| Error::invalid("model.family", format!("one of {}", known()), name)),
            v => Err(Error::invalid(
                "model.family",
                format!("a string, one of {}", known()),
                v.to_string(),
            )),
        }
    }

    /// The model config: the preset (if any), then every other `[model]` field over it, with
    /// `vocab_size` (or both vocabulary sizes) from the tokenizer.
    pub fn model_config(&self, vocab_size: usize) -> Result<Box<dyn AnyConfig>> {
        self.model_config_with_vocabs(vocab_size, vocab_size)
    }

    /// [`RunConfig::model_config`] with separate source and target vocabulary sizes (an
    /// encoder-decoder with two tokenizers); families with one vocabulary need them equal.
    pub fn model_config_with_vocabs(
        &self,
        src_vocab_size: usize,
        tgt_vocab_size: usize,
    ) -> Result<Box<dyn AnyConfig>> {
        let family = self.family()?;
        let vocab_keys: Vec<(&str, usize)> = match family.vocab_keys {
            [src, tgt] => vec![(*src, src_vocab_size), (*tgt, tgt_vocab_size)],
            keys => {
                if src_vocab_size != tgt_vocab_size {
                    return Err(Error::Config(format!(
                        "a {} model has one vocabulary, got source {src_vocab_size} and \
                         target {tgt_vocab_size} tokens",
                        family.name
                    )));
                }
                keys.iter().map(|k| (*k, tgt_vocab_size)).collect()
            }
        };
        let mut fields = self.model.clone();
        fields.remove("family");
        let preset = match fields.remove("preset") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(v) => {
                return Err(Error::invalid(
                    "model.preset",
                    format!("a string, one of {}", family.presets.join(", ")),
                    v.to_string(),
                ))
            }
        };
        let mut base = match &preset {
            Some(p) => family.preset(p, tgt_vocab_size)?.to_json()?,
            None => serde_json::Value::Object(Default::default()),
        };
        let obj = base.as_object_mut().expect("configs serialize to objects");
        for &(k, n) in &vocab_keys {
            if fields.contains_key(k) {
                return Err(Error::Config(format!(
                    "model.{k} is set by the tokenizer ({n}); remove it from the config"
                )));
            }
            obj.insert(k.to_string(), n.into());
        }
        for (k, v) in &fields {
            let json = serde_json::to_value(v).map_err(|source| Error::Json {
                what: format!("model.{k}"),
                source,
            })?;
            obj.insert(k.clone(), json);
        }
        let cfg = family
            .config_from_json(base, "[model] section")
            .map_err(|e| bad_model_field(family, &fields).unwrap_or(e))?;
        cfg.validate()?;
        check_model_size(&cfg.to_json()?)?;
        Ok(cfg)
    }
}

/// The most parameters a run config may ask for: 4e9 f32 parameters are 16 GB before the
/// optimizer's two moments. Above it a typo (`d_model = 4294967296`) would be an allocation
/// that aborts the process or takes the machine down, not an error naming the field.
pub const MAX_PARAMS: f64 = 4e9;

/// A rough parameter count from the paper-named fields every family uses (`d_model`, `d_ff`,
/// the layer counts, the vocabularies and positions), or their Hugging Face names in the
/// families that mirror a Hugging Face config (ViT's `hidden_size`, `intermediate_size`,
/// `num_hidden_layers`; Whisper's `encoder_layers`, `encoder_ffn_dim`, ...), checked against
/// [`MAX_PARAMS`] before anything is allocated.
fn check_model_size(json: &serde_json::Value) -> Result<()> {
    let get = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as f64;
    let max_of = |keys: &[&str]| keys.iter().map(|k| get(k)).fold(0.0, f64::max);
    let sum_of = |keys: &[&str]| keys.iter().map(|k| get(k)).sum::<f64>();
    const WIDTH: [&str; 2] = ["d_model", "hidden_size"];
    const FF: [&str; 4] = [
        "d_ff",
        "intermediate_size",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
    ];
    const LAYERS: [&str; 6] = [
        "n_layers",
        "n_encoder_layers",
        "n_decoder_layers",
        "num_hidden_layers",
        "encoder_layers",
        "decoder_layers",
    ];
    const TABLES: [&str; 8] = [
        "vocab_size",
        "src_vocab_size",
        "tgt_vocab_size",
        "block_size",
        "max_len",
        "max_source_positions",
        "max_target_positions",
        "num_labels",
    ];
    let d = max_of(&WIDTH);
    let ff = max_of(&FF);
    let attn = (get("n_heads") * get("head_dim")).max(d);
    let layers = sum_of(&LAYERS);
    let tables = sum_of(&TABLES);
    // Per layer: attention projections (q, k, v, out; twice with cross-attention, counted
    // once), the feed-forward (up to three matrices when gated).
    let params = layers * (4.0 * d * attn + 3.0 * d * ff) + tables * d;
    if params > MAX_PARAMS {
        // The fields as the config names them, with their exact values.
        let fields: Vec<String> = WIDTH
            .iter()
            .chain(&FF)
            .chain(&["n_heads", "head_dim"])
            .chain(&LAYERS)
            .chain(&TABLES)
            .filter_map(|k| {
                let v = json.get(*k)?.as_u64()?;
                Some(format!("{k} = {v}"))
            })
            .collect();
        return Err(Error::invalid(
            "[model]",
            format!(
                "a model of at most {MAX_PARAMS:e} parameters ({})",
                fields.join(", ")
            ),
            format!("about {params:.2e} parameters"),
        ));
    }
    Ok(())
}

/// serde's errors inside an internally tagged section (`[data]`, `[schedule]`, whose `kind`
/// picks the variant) name only the section (`invalid type: integer, expected usize in
/// \`data\``). Find the field: the first one whose removal changes the error.
fn bad_tagged_field(doc: &toml::Table, error: &str) -> Option<String> {
    for section in ["data", "schedule"] {
        if !error.contains(&format!("in `{section}`")) {
            continue;
        }
        let table = doc.get(section)?.as_table()?;
        for key in table.keys().filter(|k| *k != "kind") {
            let mut probe = doc.clone();
            probe.get_mut(section)?.as_table_mut()?.remove(key);
            let changed = match probe.try_into::<RunConfig>() {
                Ok(_) => true,
                Err(e) => e.to_string() != error,
            };
            if changed {
                return Some(format!("{section}.{key}"));
            }
        }
    }
    None
}

/// serde_json's errors say what was wrong (`invalid type: string "x", expected usize`) but not
/// where; find the `[model]` field at fault by setting each one alone on the family's first
/// preset, which is known to deserialize, so that the error can name it.
fn bad_model_field(family: &Family, fields: &toml::Table) -> Option<Error> {
    let preset = family.presets.first()?;
    for (k, v) in fields {
        let mut probe = family.preset(preset, 2).ok()?.to_json().ok()?;
        probe
            .as_object_mut()?
            .insert(k.clone(), serde_json::to_value(v).ok()?);
        if let Err(Error::Json { source, .. }) = family.config_from_json(probe, "probe") {
            return Some(Error::Config(format!("model.{k}: {source}")));
        }
    }
    None
}

/// Set `section.key=value` in a TOML document; the value is parsed as TOML (number, bool,
/// string in quotes, array) and taken as a plain string if it does not parse.
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| {
        Error::Config(format!("--set {assignment:?}: expected section.key=value"))
    })?;
    let path = path.trim();
    let keys: Vec<&str> = path.split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        return Err(Error::Config(format!(
            "--set {assignment:?}: expected section.key=value (e.g. train.max_steps=100)"
        )));
    }
    let value: toml::Value = match format!("v = {}", raw.trim()).parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let mut table = doc;
    for k in &keys[..keys.len() - 1] {
        let entry = table
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("--set {assignment:?}: {k} is not a section")))?;
    }
    table.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
[model]
family = "decoder_only"
preset = "shakespeare_char"
dropout = 0.1

[data]
kind = "text"
path = "data/tinyshakespeare/input.txt"

[train]
batch_size = 12
max_steps = 2000

[schedule]
kind = "warmup_cosine"
lr = 1e-3
warmup_steps = 100
decay_steps = 2000
min_lr = 1e-4
"#;

    #[test]
    fn parses_presets_and_overrides() -> Result<()> {
        let cfg = RunConfig::from_toml(
            CFG,
            &["train.max_steps=50".into(), "model.n_layers=2".into()],
            "t",
        )?;
        assert_eq!(cfg.train.max_steps, 50);
        let mc = cfg.model_config(65)?;
        let m = mc
            .downcast_ref::<crate::models::DecoderOnlyConfig>()
            .expect("family");
        assert_eq!(
            (m.vocab_size, m.n_layers, m.d_model, m.dropout),
            (65, 2, 128, 0.1)
        );
        // The config survives a round trip through TOML.
        let again = RunConfig::from_toml(&cfg.to_toml()?, &[], "t2")?;
        assert_eq!(again, cfg);
        Ok(())
    }

    #[test]
    fn huge_models_are_refused_under_hugging_face_field_names_too() {
        // ViT's config mirrors Hugging Face's names; a layer count of 2^62 once built
        // layer after layer until a watchdog stopped it (found by tests/fuzz.rs).
        let vit = CFG
            .replace(
                "family = \"decoder_only\"\npreset = \"shakespeare_char\"\ndropout = 0.1",
                "family = \"vit\"\npreset = \"fashion_mnist\"",
            )
            .replace(
                "kind = \"text\"\npath = \"data/tinyshakespeare/input.txt\"",
                "kind = \"images\"\ntrain_images = \"i\"\ntrain_labels = \"l\"",
            );
        let ok = RunConfig::from_toml(&vit, &[], "t").unwrap();
        assert!(ok.model_config(0).is_ok());
        for field in ["num_hidden_layers", "hidden_size", "intermediate_size"] {
            let cfg =
                RunConfig::from_toml(&vit, &[format!("model.{field}=4611686018427387904")], "t")
                    .unwrap();
            let e = cfg.model_config(0).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("[model]")),
                "{field}: {e:?}"
            );
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let e = RunConfig::from_toml(CFG, &["train.bach_size=3".into()], "cfg.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bach_size") && e.contains("cfg.toml"), "{e}");
        let e = RunConfig::from_toml(CFG, &["train.batch_size=\"x\"".into()], "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
        let cfg = RunConfig::from_toml(CFG, &["model.d_modle=3".into()], "c").unwrap();
        let e = cfg.model_config(65).unwrap_err().to_string();
        assert!(e.contains("d_modle"), "{e}");
        let e = RunConfig::from_toml(CFG, &["nonsense".into()], "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("section.key=value"), "{e}");
        let cfg = RunConfig::from_toml(CFG, &["model.n_layers=\"x\"".into()], "c").unwrap();
        let e = cfg.model_config(65).unwrap_err().to_string();
        assert!(
            e.contains("model.n_layers") && e.contains("invalid type"),
            "{e}"
        );
        let cfg = RunConfig::from_toml(CFG, &["model.n_heads=3".into()], "c").unwrap();
        let e = cfg.model_config(65).unwrap_err().to_string();
        assert!(e.contains("divisible"), "{e}");
    }
}
