//! The model-family seam.
//!
//! A family is a serde config (with named presets) plus the composition of `nn` blocks it
//! builds. [`FamilyConfig`] is what a family writes; [`Family`] is its entry in the registry
//! ([`FAMILIES`], looked up by the name stored in `config.json`'s run config and a
//! checkpoint's `meta.json`), through which training, decoding and the CLI build, initialize,
//! save and load any family without naming it. What a built model can do is said by the
//! capability traits, which tasks, decoding and the CLI use instead of concrete types:
//! [`CausalLm`] (generation), [`Seq2Seq`] (translation; tomorrow speech and images) and
//! [`EncoderModel`] (embeddings, classification) and [`ImageClassifier`] (vision).
//!
//! Adding a family: its config and `FamilyConfig` impl, its model built from `nn` blocks with
//! the capability traits it has, a name mapping in `import/` for the files users have, and one
//! line in [`FAMILIES`].

use std::any::Any;
use std::fmt::Debug;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::nn::{
    AttnMask, BatchKvCache, InitScheme, KvCache, Masks, NeedWeights, VarPath, VarStore,
};
use crate::{Error, Result};

use super::encoder_decoder::DecodeState;

/// A model generating left to right: P(y) = ∏ P(y_i | y_<i).
pub trait CausalLm: Send + Sync {
    fn vocab_size(&self) -> usize;

    /// The longest sequence the model attends over (positions of its table).
    fn context_length(&self) -> usize;

    /// Empty per-layer caches for [`CausalLm::forward_cached`]: one set per sequence or
    /// batch of sequences decoded together.
    fn new_cache(&self) -> Vec<KvCache>;

    /// Logits for every position.
    ///
    /// # Shapes
    /// `ids`: (B, T) with T ≤ context length → logits (B, T, V)
    fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor>;

    /// Logits for new positions, appending their keys and values to `caches`; positions
    /// continue from the cached length.
    ///
    /// # Shapes
    /// `ids`: (B, T_new) → logits (B, T_new, V)
    fn forward_cached(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor>;

    /// [`CausalLm::forward_cached`] for the last position's logits only, which is all that
    /// generation reads: a model may skip the output projection of the other positions (for
    /// a 512-token prompt and a 49k vocabulary, a third of the work).
    ///
    /// # Shapes
    /// `ids`: (B, T_new) → logits (B, 1, V)
    fn forward_cached_last(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        let logits = self.forward_cached(ids, caches)?;
        let t = logits.dim(1)?;
        Ok(logits.narrow(1, t - 1, 1)?)
    }

    /// Separate sequences decoded together (a server's requests), each with its own caches
    /// and length: row `b` of `ids` continues sequence `b` of `batch`. A sequence joins with
    /// the caches of its prompt ([`CausalLm::forward_cached_last`] on a batch of one) and
    /// may leave between steps ([`BatchKvCache::push`], [`BatchKvCache::remove`]).
    ///
    /// # Shapes
    /// `ids`: (B, T_new) with B = `batch.rows()` → logits (B, 1, V)
    fn forward_batch_last(&self, ids: &Tensor, batch: &mut BatchKvCache) -> Result<Tensor> {
        let _ = (ids, batch);
        Err(Error::msg(
            "this model does not decode separate sequences in one batch",
        ))
    }
}

/// What a sequence-to-sequence model encodes.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// (B, S) token ids, with a (B, S) key-padding mask.
    Tokens {
        ids: &'a Tensor,
        padding: Option<&'a AttnMask>,
    },
    /// (B, S, F) feature frames (audio frames, image patches), with a (B, S) key-padding mask.
    Features {
        x: &'a Tensor,
        padding: Option<&'a AttnMask>,
    },
}

impl<'a> Source<'a> {
    /// The key-padding mask of the source positions.
    pub fn padding(&self) -> Option<&'a AttnMask> {
        match self {
            Source::Tokens { padding, .. } | Source::Features { padding, .. } => *padding,
        }
    }
}

/// An encoder-decoder: encode a source into a memory once, then decode target tokens
/// against it, with a cache.
pub trait Seq2Seq: Send + Sync {
    /// Source vocabulary size (token sources), or 0 for a model that encodes features.
    fn src_vocab_size(&self) -> usize;

    fn tgt_vocab_size(&self) -> usize;

    /// The longest source and target the model's positions cover.
    fn max_len(&self) -> usize;

    /// Width of the memory.
    fn d_model(&self) -> usize;

    /// Heads of the cross-attention (the weights returned by `decode_step`).
    fn n_heads(&self) -> usize;

    /// Decoder layers (one cross-attention map each).
    fn n_decoder_layers(&self) -> usize;

    /// # Shapes
    /// `src` (B, S) ids or (B, S, F) features → memory (B, S', E)
    fn encode(&self, src: Source, train: bool) -> Result<Tensor>;

    /// Teacher-forced logits of `tgt` against the memory.
    ///
    /// # Shapes
    /// `tgt`: (B, T), `memory`: (B, S, E) → logits (B, T, V)
    fn decode(
        &self,
        tgt: &Tensor,
        memory: &Tensor,
        tgt_masks: &Masks,
        memory_masks: &Masks,
        train: bool,
    ) -> Result<Tensor>;

    /// A fresh decoding state for `memory` (B, S, E): empty caches, memory projected per layer.
    fn start_decoding(&self, memory: &Tensor) -> Result<DecodeState>;

    /// Logits of the next target tokens given the state, and every layer's cross-attention
    /// weights when requested.
    ///
    /// # Shapes
    /// `tgt_new`: (B, T_new), `memory_pad`: (B, S) → logits (B, T_new, V)
    fn decode_step(
        &self,
        tgt_new: &Tensor,
        memory: &Tensor,
        memory_pad: Option<&AttnMask>,
        state: &mut DecodeState,
        need_weights: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)>;

    /// The teacher-forced forward pass of token sources: encode, then decode under a causal
    /// mask with the given key-padding masks.
    ///
    /// # Shapes
    /// `src`: (B, S), `tgt`: (B, T), `src_pad`: (B, S), `tgt_pad`: (B, T) → logits (B, T, V)
    fn forward(
        &self,
        src: &Tensor,
        tgt: &Tensor,
        src_pad: Option<&AttnMask>,
        tgt_pad: Option<&AttnMask>,
        train: bool,
    ) -> Result<Tensor> {
        let source = Source::Tokens {
            ids: src,
            padding: src_pad,
        };
        let memory = self.encode(source, train)?;
        let tgt_masks = Masks::causal().with_key_padding(tgt_pad);
        let src_masks = Masks::none().with_key_padding(src_pad);
        self.decode(tgt, &memory, &tgt_masks, &src_masks, train)
    }
}

/// An encoder of token sequences into hidden states, pooled into one vector per sequence.
pub trait EncoderModel: Send + Sync {
    fn d_model(&self) -> usize;

    /// # Shapes
    /// `ids`, `token_types`: (B, T), `padding`: (B, T) → (B, T, E)
    fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        padding: Option<&AttnMask>,
        train: bool,
    ) -> Result<Tensor>;

    /// # Shapes
    /// `hidden`: (B, T, E), `padding`: (B, T) → (B, E)
    fn pool(&self, hidden: &Tensor, padding: Option<&AttnMask>) -> Result<Tensor>;
}

/// A classifier of images (the Vision Transformer).
pub trait ImageClassifier: Send + Sync {
    /// Input channels (3 RGB, 1 grey).
    fn num_channels(&self) -> usize;

    /// Side of the training images; other sizes work with resampled position embeddings.
    fn image_size(&self) -> usize;

    /// Side of the square patches: an H×W input has (H / P)·(W / P) patch tokens.
    fn patch_size(&self) -> usize;

    /// Class names in label order.
    fn labels(&self) -> Vec<String>;

    /// # Shapes
    /// `pixels`: (B, C, H, W) → logits (B, L)
    fn logits(&self, pixels: &Tensor, train: bool) -> Result<Tensor>;

    /// Every layer's attention weights per head, for attention rollout.
    ///
    /// # Shapes
    /// `pixels`: (B, C, H, W) → n_layers × (B, H, T, T)
    fn attentions(&self, pixels: &Tensor) -> Result<Vec<Tensor>>;
}

/// A built model of any family, by what it can do.
pub enum Model {
    CausalLm(Box<dyn CausalLm>),
    Seq2Seq(Box<dyn Seq2Seq>),
    Encoder(Box<dyn EncoderModel>),
    ImageClassifier(Box<dyn ImageClassifier>),
}

impl Model {
    fn kind(&self) -> &'static str {
        match self {
            Model::CausalLm(_) => "a causal language model",
            Model::Seq2Seq(_) => "a sequence-to-sequence model",
            Model::Encoder(_) => "an encoder",
            Model::ImageClassifier(_) => "an image classifier",
        }
    }

    /// The image classifier, or an error naming what the model is.
    pub fn into_image_classifier(self, what: &str) -> Result<Box<dyn ImageClassifier>> {
        match self {
            Model::ImageClassifier(m) => Ok(m),
            other => Err(Error::invalid(
                format!("the model for {what}"),
                "an image classifier",
                other.kind(),
            )),
        }
    }

    /// The causal LM, or an error saying what `what` needed and what the model is.
    pub fn into_causal_lm(self, what: &str) -> Result<Box<dyn CausalLm>> {
        match self {
            Model::CausalLm(m) => Ok(m),
            other => Err(Error::invalid(
                format!("the model for {what}"),
                "a causal language model",
                other.kind(),
            )),
        }
    }

    /// The sequence-to-sequence model, or an error naming what the model is.
    pub fn into_seq2seq(self, what: &str) -> Result<Box<dyn Seq2Seq>> {
        match self {
            Model::Seq2Seq(m) => Ok(m),
            other => Err(Error::invalid(
                format!("the model for {what}"),
                "a sequence-to-sequence model",
                other.kind(),
            )),
        }
    }

    /// The encoder, or an error naming what the model is.
    pub fn into_encoder(self, what: &str) -> Result<Box<dyn EncoderModel>> {
        match self {
            Model::Encoder(m) => Ok(m),
            other => Err(Error::invalid(
                format!("the model for {what}"),
                "an encoder",
                other.kind(),
            )),
        }
    }
}

/// What a family implements: its config type, presets and how it builds its model.
pub trait FamilyConfig:
    Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync + 'static
{
    /// The model it builds.
    type Model;
    /// The name in run configs and checkpoints (`decoder_only`).
    const NAME: &'static str;
    /// The named presets.
    const PRESETS: &'static [&'static str];
    /// Config fields set from the tokenizer: source then target vocabulary, or just one.
    const VOCAB_KEYS: &'static [&'static str];

    /// A named preset with the given vocabulary size.
    fn preset(name: &str, vocab_size: usize) -> Result<Self>;
    fn validate(&self) -> Result<()>;
    /// How its parameters are initialized.
    fn init_scheme(&self) -> InitScheme;
    /// Layers in all (the GPT-2 scheme scales residual projections by it).
    fn n_layers(&self) -> usize;
    /// Build the model's modules, creating or fetching the parameters under `vp`.
    fn build(&self, vp: &VarPath) -> Result<Self::Model>;
    /// The built model by what it can do.
    fn erase(model: Self::Model) -> Model;

    /// A parameter store for this config (its init scheme and layer count).
    fn var_store(&self, dtype: DType, device: &Device, seed: u64) -> VarStore {
        VarStore::new(dtype, device, self.init_scheme(), seed).with_n_layers(self.n_layers())
    }

    /// A freshly initialized model with its parameter store.
    fn init(&self, dtype: DType, device: &Device, seed: u64) -> Result<(Self::Model, VarStore)> {
        let vs = self.var_store(dtype, device, seed);
        let model = self.build(&vs.root())?;
        Ok((model, vs))
    }

    /// Save `config.json` and `model.safetensors` (in the store's dtype) into `dir`.
    fn save(&self, dir: &Path, vs: &VarStore) -> Result<()> {
        super::save_model(dir, self, vs)
    }

    /// Load `config.json` and `model.safetensors` from a directory, in `dtype`.
    fn load(dir: &Path, device: &Device, dtype: DType) -> Result<(Self::Model, VarStore, Self)> {
        super::check_model_dir(dir)?;
        let cfg: Self = super::read_config(&dir.join(super::CONFIG_FILE))?;
        cfg.validate()?;
        let vs = cfg.var_store(dtype, device, 0);
        let model = cfg.build(&vs.root())?;
        vs.load(dir.join(super::WEIGHTS_FILE))?;
        Ok((model, vs, cfg))
    }
}

/// A config of any family (what a run or a checkpoint holds).
pub trait AnyConfig: Debug + Send + Sync {
    fn family(&self) -> &'static Family;
    fn to_json(&self) -> Result<serde_json::Value>;
    fn validate(&self) -> Result<()>;
    fn var_store(&self, dtype: DType, device: &Device, seed: u64) -> VarStore;
    fn build(&self, vp: &VarPath) -> Result<Model>;
    /// For callers that know the family (tests, family-specific options).
    fn as_any(&self) -> &dyn Any;
}

impl<C: FamilyConfig> AnyConfig for C {
    fn family(&self) -> &'static Family {
        family(C::NAME).expect("every FamilyConfig is registered in FAMILIES")
    }

    fn to_json(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self).map_err(|source| Error::Json {
            what: format!("{} config", C::NAME),
            source,
        })
    }

    fn validate(&self) -> Result<()> {
        FamilyConfig::validate(self)
    }

    fn var_store(&self, dtype: DType, device: &Device, seed: u64) -> VarStore {
        FamilyConfig::var_store(self, dtype, device, seed)
    }

    fn build(&self, vp: &VarPath) -> Result<Model> {
        Ok(C::erase(FamilyConfig::build(self, vp)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl dyn AnyConfig {
    /// The concrete config, when it is of family `C`.
    pub fn downcast_ref<C: FamilyConfig>(&self) -> Option<&C> {
        self.as_any().downcast_ref()
    }
}

/// A family's entry in the registry.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub presets: &'static [&'static str],
    /// Config fields set from the tokenizer (source, target; or one).
    pub vocab_keys: &'static [&'static str],
    preset: fn(&str, usize) -> Result<Box<dyn AnyConfig>>,
    from_json: fn(serde_json::Value, &str) -> Result<Box<dyn AnyConfig>>,
}

impl Family {
    /// The registry entry of `C`.
    pub const fn of<C: FamilyConfig>() -> Family {
        Family {
            name: C::NAME,
            presets: C::PRESETS,
            vocab_keys: C::VOCAB_KEYS,
            preset: preset_of::<C>,
            from_json: from_json_of::<C>,
        }
    }

    /// A named preset with the given vocabulary size.
    pub fn preset(&self, name: &str, vocab_size: usize) -> Result<Box<dyn AnyConfig>> {
        (self.preset)(name, vocab_size)
    }

    /// The config in `value` (not validated); `what` names its source in errors.
    pub fn config_from_json(
        &self,
        value: serde_json::Value,
        what: &str,
    ) -> Result<Box<dyn AnyConfig>> {
        (self.from_json)(value, what)
    }

    /// Read and validate `config.json` of a model directory of this family.
    pub fn read_config(&self, dir: &Path) -> Result<Box<dyn AnyConfig>> {
        super::check_model_dir(dir)?;
        let path = dir.join(super::CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = super::config_from_json(&text, &path.display().to_string())?;
        let cfg = self.config_from_json(value, &path.display().to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Build a model of this family from `dir` (`config.json`, `model.safetensors`), in
    /// `dtype`; its parameters stay trainable.
    pub fn load(&self, dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
        let config = self.read_config(dir)?;
        let vs = config.var_store(dtype, device, 0);
        let model = config.build(&vs.root())?;
        vs.load(dir.join(super::WEIGHTS_FILE))?;
        Ok(LoadedModel { model, config, vs })
    }
}

/// A model loaded through the registry, with its config and parameters.
pub struct LoadedModel {
    pub model: Model,
    pub config: Box<dyn AnyConfig>,
    pub vs: VarStore,
}

fn preset_of<C: FamilyConfig>(name: &str, vocab_size: usize) -> Result<Box<dyn AnyConfig>> {
    Ok(Box::new(C::preset(name, vocab_size)?))
}

fn from_json_of<C: FamilyConfig>(
    value: serde_json::Value,
    what: &str,
) -> Result<Box<dyn AnyConfig>> {
    let cfg: C = serde_json::from_value(value).map_err(|source| Error::Json {
        what: what.to_string(),
        source,
    })?;
    Ok(Box::new(cfg))
}

/// Every family, by name.
pub static FAMILIES: &[Family] = &[
    Family::of::<super::EncoderDecoderConfig>(),
    Family::of::<super::DecoderOnlyConfig>(),
    Family::of::<super::EncoderOnlyConfig>(),
    Family::of::<super::WhisperConfig>(),
    Family::of::<super::ViTConfig>(),
];

/// The registered family called `name`.
pub fn family(name: &str) -> Result<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        Error::invalid("model family", format!("one of {}", known.join(", ")), name)
    })
}
