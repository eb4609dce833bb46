//! The Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"): the
//! image cut into P×P patches, each patch flattened and projected to a token (eq. 1,
//! x_p E), a learned class token in front, learned position embeddings added, our pre-norm
//! encoder (eqs. 2–3), a final layer norm, and a linear classifier on the class token (eq. 4).
//! The config mirrors Hugging Face's `ViTConfig` field names, so that `config.json` of a
//! `ViTForImageClassification` reads almost as is (`import::hf_vit`).
//!
//! The patch embedding is the reshape + linear form of the strided P×P convolution
//! (`nn.Conv2d(C, E, P, stride=P)`): the same weights flattened to (E, C·P·P) in (c, i, j)
//! order, with the gradient of candle's reshape, permute and matmul. Rows and columns beyond
//! the last whole patch are dropped, as the convolution drops them.
//!
//! Position embeddings are learned for the training grid (image_size / patch_size)²; an
//! image of another size gets them resampled bicubically over the grid, as transformers'
//! `interpolate_pos_encoding` and timm's `resample_abs_pos_embed` do (PyTorch's bicubic,
//! a = -0.75, `align_corners=False`), written as two constant interpolation matrices so the
//! gradient reaches the table.
//!
//! Dimension letters: `B` batch, `C` channels, `H`/`W` image height/width, `P` patch size,
//! `Gh`/`Gw` patch grid, `N` = Gh·Gw patches, `T` = 1 + N tokens, `E` hidden size,
//! `L` labels, `Hd` heads.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::family::{FamilyConfig, ImageClassifier, Model};
use crate::autograd::ops;
use crate::nn::{
    Activation, Dropout, Encoder, Init, InitScheme, LayerConfig, LayerOptions, Linear, Masks,
    NeedWeights, Norm, VarPath, VarStore,
};
use crate::{Error, Result};

/// Configuration of a ViT; saved as `config.json`. Field names are Hugging Face's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViTConfig {
    /// Width of every layer (E).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Inner width of the feed-forward blocks.
    pub intermediate_size: usize,
    /// Feed-forward non-linearity: `gelu` (exact), `gelu_new` / `gelu_pytorch_tanh`, `relu`,
    /// `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on embeddings and sub-layer outputs.
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention weights (our layers take one rate: it must equal
    /// `hidden_dropout_prob`).
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Standard deviation of the class token and position embeddings at initialization.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Layer norm epsilon (Hugging Face: 1e-12; timm: 1e-6).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Side of the (square) training images; it sets the position table's grid.
    pub image_size: usize,
    /// Side of the square patches (P).
    pub patch_size: usize,
    /// Input channels (3 RGB, 1 grey).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Biases on the query, key and value projections (only `true` is supported: our
    /// attention has one bias switch for every projection).
    #[serde(default = "super::default_true")]
    pub qkv_bias: bool,
    /// Classes of the head; 0 for none. When `id2label` is given, its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Class names by index (`"0"`, `"1"`, ... as in Hugging Face files).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub id2label: BTreeMap<String, String>,
    /// Parameter initialization of the layers.
    #[serde(default = "default_gpt2")]
    pub init: InitScheme,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_init_range() -> f64 {
    0.02
}
fn default_eps() -> f64 {
    1e-12
}
fn default_channels() -> usize {
    3
}
fn default_gpt2() -> InitScheme {
    InitScheme::Gpt2
}

/// Fashion-MNIST's classes in label order.
pub const FASHION_MNIST_LABELS: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

impl ViTConfig {
    /// ViT-B/16 (Dosovitskiy et al. table 1): 12 layers, 12 heads, 768 wide, MLP 3072, 224×224
    /// RGB, 1000 ImageNet classes.
    pub fn vit_base() -> Self {
        ViTConfig {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: default_act(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
            num_labels: Some(1000),
            id2label: BTreeMap::new(),
            init: InitScheme::Gpt2,
        }
    }

    /// ViT-S/16 (DeiT-S, timm `vit_small_patch16_224`): 384 wide, 6 heads, MLP 1536.
    pub fn vit_small() -> Self {
        ViTConfig {
            hidden_size: 384,
            num_attention_heads: 6,
            intermediate_size: 1536,
            ..Self::vit_base()
        }
    }

    /// ViT-Ti/16 (DeiT-Ti, timm `vit_tiny_patch16_224`): 192 wide, 3 heads, MLP 768.
    pub fn vit_tiny() -> Self {
        ViTConfig {
            hidden_size: 192,
            num_attention_heads: 3,
            intermediate_size: 768,
            ..Self::vit_base()
        }
    }

    /// A small ViT for Fashion-MNIST on a CPU: 28×28 grey images in 4×4 patches (49 tokens
    /// and the class token), 6 layers, 4 heads, 96 wide, MLP 192, the 10 named classes.
    pub fn fashion_mnist() -> Self {
        ViTConfig {
            hidden_size: 96,
            num_hidden_layers: 6,
            num_attention_heads: 4,
            intermediate_size: 192,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            layer_norm_eps: 1e-6,
            image_size: 28,
            patch_size: 4,
            num_channels: 1,
            num_labels: Some(10),
            id2label: FASHION_MNIST_LABELS
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.to_string()))
                .collect(),
            ..Self::vit_base()
        }
    }

    /// A tiny ViT for tests: 16×16 RGB in 4×4 patches, 2 layers, 2 heads, 32 wide, 3 classes.
    pub fn tiny() -> Self {
        ViTConfig {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 64,
            image_size: 16,
            patch_size: 4,
            num_labels: Some(3),
            ..Self::vit_base()
        }
    }

    /// The named presets: `vit_tiny`, `vit_small`, `vit_base`, `fashion_mnist`, `tiny`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "vit_tiny" => Ok(Self::vit_tiny()),
            "vit_small" => Ok(Self::vit_small()),
            "vit_base" => Ok(Self::vit_base()),
            "fashion_mnist" => Ok(Self::fashion_mnist()),
            "tiny" => Ok(Self::tiny()),
            _ => Err(Error::Config(format!(
                "unknown vit preset {name:?} (known: {})",
                <Self as FamilyConfig>::PRESETS.join(", ")
            ))),
        }
    }

    /// The feed-forward non-linearity named by `hidden_act`.
    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            // transformers' "gelu" is the exact erf form.
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::invalid(
                "hidden_act",
                "\"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\", \"relu\" or \"silu\"",
                format!("{other:?}"),
            )),
        }
    }

    /// The patch grid of the training images (its side).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Classes of the head (0: none).
    pub fn n_labels(&self) -> usize {
        if self.id2label.is_empty() {
            self.num_labels.unwrap_or(0)
        } else {
            self.id2label.len()
        }
    }

    /// Class names in label order (`LABEL_i` where `id2label` has none, as transformers).
    pub fn labels(&self) -> Vec<String> {
        (0..self.n_labels())
            .map(|i| {
                self.id2label
                    .get(&i.to_string())
                    .cloned()
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }

    /// Our layer: pre-norm, biases everywhere, one dropout rate.
    pub fn layer(&self) -> Result<LayerConfig> {
        Ok(LayerConfig::new(
            self.hidden_size,
            self.num_attention_heads,
            self.intermediate_size,
            self.hidden_dropout_prob,
            self.activation()?,
            true,
            self.layer_norm_eps,
            true,
        ))
    }

    pub fn validate(&self) -> Result<()> {
        self.layer()?.validate()?;
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(Error::invalid(
                "patch_size",
                format!("> 0 and at most image_size ({})", self.image_size),
                self.patch_size.to_string(),
            ));
        }
        if self.num_channels == 0 {
            return Err(Error::invalid("num_channels", "> 0", "0"));
        }
        if !self.qkv_bias {
            return Err(Error::invalid(
                "qkv_bias",
                "true (our attention has biases on every projection)",
                "false",
            ));
        }
        if self.attention_probs_dropout_prob != self.hidden_dropout_prob {
            return Err(Error::invalid(
                "attention_probs_dropout_prob",
                format!(
                    "equal to hidden_dropout_prob ({}): our layers take one dropout rate",
                    self.hidden_dropout_prob
                ),
                self.attention_probs_dropout_prob.to_string(),
            ));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(Error::invalid(
                "initializer_range",
                "finite and >= 0",
                self.initializer_range.to_string(),
            ));
        }
        if !self.id2label.is_empty() {
            if let Some(n) = self.num_labels {
                if n != self.id2label.len() {
                    return Err(Error::invalid(
                        "num_labels",
                        format!("the size of id2label ({})", self.id2label.len()),
                        n.to_string(),
                    ));
                }
            }
            for i in 0..self.id2label.len() {
                if !self.id2label.contains_key(&i.to_string()) {
                    return Err(Error::invalid(
                        "id2label",
                        format!("keys \"0\" to \"{}\"", self.id2label.len() - 1),
                        format!("no key \"{i}\""),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What a forward pass returns beyond the final hidden states.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViTOptions {
    pub train: bool,
    /// Keep the input of every layer and the last layer's output (before the final norm):
    /// transformers' `output_hidden_states`.
    pub hidden_states: bool,
    /// Keep every layer's attention weights per head (attention rollout).
    pub attentions: bool,
}

/// A forward pass's outputs.
#[derive(Debug, Clone)]
pub struct ViTOutput {
    /// (B, T, E) after the final norm.
    pub last_hidden: Tensor,
    /// (B, L) when the model has a head.
    pub logits: Option<Tensor>,
    /// `num_hidden_layers + 1` tensors (B, T, E): the embeddings, then each layer's output.
    pub hidden_states: Vec<Tensor>,
    /// `num_hidden_layers` tensors (B, Hd, T, T), softmax over the last axis.
    pub attentions: Vec<Tensor>,
}

/// A Vision Transformer.
///
/// Parameters: `embed.patch.{weight,bias}` (E, C·P·P), `embed.cls` (1, 1, E), `embed.pos`
/// (1, 1 + G², E), `layers.N.*`, `norm.*`, `classifier.*`.
pub struct ViT {
    cfg: ViTConfig,
    patch: Linear,
    cls: Tensor,
    pos: Tensor,
    encoder: Encoder,
    norm: Norm,
    classifier: Option<Linear>,
    dropout: Dropout,
}

impl ViT {
    pub fn new(cfg: &ViTConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let (e, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let ev = vp.pp("embed");
        let patch = Linear::new(c * p * p, e, true, false, &ev.pp("patch"))?;
        let std = cfg.initializer_range;
        let cls = ev.var("cls", &[1, 1, e], Init::Normal { std })?;
        let g = cfg.grid();
        let pos = ev.var("pos", &[1, 1 + g * g, e], Init::Normal { std })?;
        // The final norm is ours (not the encoder's) so that the hidden states before it
        // can be returned, as transformers does.
        let encoder = Encoder::new(&cfg.layer()?, cfg.num_hidden_layers, false, vp)?;
        let norm = Norm::layer_norm(e, cfg.layer_norm_eps, true, &vp.pp("norm"))?;
        let classifier = match cfg.n_labels() {
            0 => None,
            l => Some(Linear::new(e, l, true, false, &vp.pp("classifier"))?),
        };
        Ok(ViT {
            cfg: cfg.clone(),
            patch,
            cls,
            pos,
            encoder,
            norm,
            classifier,
            dropout: vp.dropout(cfg.hidden_dropout_prob)?,
        })
    }

    /// A freshly initialized model with its parameter store.
    pub fn init(
        cfg: &ViTConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarStore)> {
        FamilyConfig::init(cfg, dtype, device, seed)
    }

    /// Load `config.json` and `model.safetensors` from a directory of ours (f32); Hugging Face
    /// directories load through `import::hf_vit`.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, VarStore)> {
        let (model, vs, _) = ViTConfig::load(dir, device, DType::F32)?;
        Ok((model, vs))
    }

    pub fn config(&self) -> &ViTConfig {
        &self.cfg
    }

    /// Every layer of the encoder (their attention modules, for inspection).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The patches of each image, flattened in (c, i, j) order like the convolution's weight.
    ///
    /// # Shapes
    /// `pixels`: (B, C, H, W) → ((B, N, C·P·P), (Gh, Gw))
    pub fn patchify(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (b, c, h, w) = pixels
            .dims4()
            .map_err(|_| Error::shape("pixel values", "(B, C, H, W)", pixels.dims()))?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || h < p || w < p {
            return Err(Error::shape(
                "pixel values",
                format!(
                    "(B, {}, H, W) with H, W >= patch_size {p}",
                    self.cfg.num_channels
                ),
                pixels.dims(),
            ));
        }
        let (gh, gw) = (h / p, w / p);
        // The strided convolution ignores the rows and columns past the last whole patch.
        let x = ops::narrow(&ops::narrow(pixels, 2, 0, gh * p)?, 3, 0, gw * p)?;
        let x = ops::reshape(&x, (b, c, gh, p, gw, p))?; // (B, C, Gh, P, Gw, P)
        let x = ops::contiguous(&ops::permute(&x, &[0, 2, 4, 1, 3, 5])?)?; // (B, Gh, Gw, C, P, P)
        let x = ops::reshape(&x, (b, gh * gw, c * p * p))?; // (B, N, C·P·P)
        Ok((x, (gh, gw)))
    }

    /// The position embeddings for a (Gh, Gw) grid: the table itself on the training grid,
    /// else its patch part resampled bicubically (the class token's row unchanged).
    ///
    /// # Shapes
    /// → (1, 1 + Gh·Gw, E)
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.cfg.grid();
        if (gh, gw) == (g, g) {
            return Ok(self.pos.clone());
        }
        let e = self.cfg.hidden_size;
        let cls_pos = self.pos.narrow(1, 0, 1)?; // (1, 1, E)
        let grid = self.pos.narrow(1, 1, g * g)?.reshape((g, g * e))?; // (G, G·E)
        let dt = self.pos.dtype();
        let dev = self.pos.device();
        let mh = bicubic_matrix(g, gh, dt, dev)?; // (Gh, G)
        let mw = bicubic_matrix(g, gw, dt, dev)?; // (Gw, G)
        let x = mh.matmul(&grid)?.reshape((gh, g, e))?; // (Gh, G, E) rows resampled
        let x = x.transpose(1, 2)?.contiguous()?; // (Gh, E, G)
        let x = x.broadcast_matmul(&mw.t()?)?; // (Gh, E, Gw)
        let x = x.transpose(1, 2)?.contiguous()?.reshape((1, gh * gw, e))?; // (1, N, E)
        Ok(Tensor::cat(&[cls_pos, x], 1)?)
    }

    /// The encoder's input: patch tokens after the class token, plus positions.
    ///
    /// # Shapes
    /// `pixels`: (B, C, H, W) → (B, T, E)
    pub fn embed(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let (patches, (gh, gw)) = self.patchify(pixels)?;
        let b = patches.dim(0)?;
        let x = self.patch.forward(&patches)?; // (B, N, E)
        let cls = ops::broadcast_as(&self.cls, (b, 1, self.cfg.hidden_size))?; // (B, 1, E)
        let x = ops::cat(&[&cls, &x], 1)?; // (B, T, E)
        let x = ops::broadcast_add(&x, &self.position_embeddings(gh, gw)?)?;
        self.dropout.forward(&x, train)
    }

    /// The full pass with the outputs `opts` asks for.
    ///
    /// # Shapes
    /// `pixels`: (B, C, H, W) → last hidden (B, T, E), logits (B, L), hidden states
    /// `n_layers + 1` × (B, T, E), attentions `n_layers` × (B, Hd, T, T)
    pub fn forward_with(&self, pixels: &Tensor, opts: &ViTOptions) -> Result<ViTOutput> {
        let mut x = self.embed(pixels, opts.train)?;
        let layer_opts = LayerOptions {
            train: opts.train,
            rope: None,
            need_weights: if opts.attentions {
                NeedWeights::PerHead
            } else {
                NeedWeights::No
            },
        };
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        for layer in self.encoder.layers() {
            if opts.hidden_states {
                hidden_states.push(x.clone());
            }
            let (y, weights) = layer.forward_with(&x, &Masks::none(), &layer_opts, None)?;
            if let Some(w) = weights.filter(|_| opts.attentions) {
                attentions.push(w);
            }
            x = y;
        }
        if opts.hidden_states {
            hidden_states.push(x.clone());
        }
        let last_hidden = self.norm.forward(&x)?;
        let logits = match &self.classifier {
            Some(head) => {
                let cls = ops::squeeze(&ops::narrow(&last_hidden, 1, 0, 1)?, 1)?; // (B, E)
                Some(head.forward(&cls)?)
            }
            None => None,
        };
        Ok(ViTOutput {
            last_hidden,
            logits,
            hidden_states,
            attentions,
        })
    }

    /// Hidden states after the final norm.
    ///
    /// # Shapes
    /// `pixels`: (B, C, H, W) → (B, T, E)
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let opts = ViTOptions {
            train,
            ..Default::default()
        };
        Ok(self.forward_with(pixels, &opts)?.last_hidden)
    }

    /// Class logits from the class token.
    ///
    /// # Shapes
    /// `pixels`: (B, C, H, W) → (B, L)
    pub fn classify(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        if self.classifier.is_none() {
            return Err(Error::Config(
                "the model has no classification head (num_labels 0)".into(),
            ));
        }
        let opts = ViTOptions {
            train,
            ..Default::default()
        };
        self.forward_with(pixels, &opts)?
            .logits
            .ok_or_else(|| Error::msg("no logits"))
    }
}

/// PyTorch's cubic convolution weights (a = -0.75) for the fractional offset `t`, taps at
/// -1, 0, 1, 2 (`upsample_bicubic2d`'s `get_cubic_upsample_coefficients`).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The (out, in) matrix of `F.interpolate(mode="bicubic", align_corners=False)` along one
/// axis: source coordinate (o + 0.5)·in/out - 0.5, taps clamped to the border.
fn bicubic_matrix(n_in: usize, n_out: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let i0 = src.floor();
        let w = cubic_weights(src - i0);
        for (k, wk) in w.iter().enumerate() {
            let i = (i0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[o * n_in + i] += wk;
        }
    }
    Ok(Tensor::from_vec(m, (n_out, n_in), device)?.to_dtype(dtype)?)
}

impl FamilyConfig for ViTConfig {
    type Model = ViT;
    const NAME: &'static str = "vit";
    const PRESETS: &'static [&'static str] =
        &["vit_tiny", "vit_small", "vit_base", "fashion_mnist", "tiny"];
    // Images have no vocabulary.
    const VOCAB_KEYS: &'static [&'static str] = &[];

    fn preset(name: &str, _vocab_size: usize) -> Result<Self> {
        ViTConfig::preset(name)
    }
    fn validate(&self) -> Result<()> {
        ViTConfig::validate(self)
    }
    fn init_scheme(&self) -> InitScheme {
        self.init
    }
    fn n_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn build(&self, vp: &VarPath) -> Result<ViT> {
        ViT::new(self, vp)
    }
    fn erase(model: ViT) -> Model {
        Model::ImageClassifier(Box::new(model))
    }
}

impl ImageClassifier for ViT {
    fn num_channels(&self) -> usize {
        self.cfg.num_channels
    }
    fn image_size(&self) -> usize {
        self.cfg.image_size
    }
    fn patch_size(&self) -> usize {
        self.cfg.patch_size
    }
    fn labels(&self) -> Vec<String> {
        self.cfg.labels()
    }
    fn logits(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        self.classify(pixels, train)
    }
    fn attentions(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let opts = ViTOptions {
            attentions: true,
            ..Default::default()
        };
        Ok(self.forward_with(pixels, &opts)?.attentions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_rows_sum_to_one_and_same_size_is_identity() -> Result<()> {
        for (i, o) in [(4, 6), (4, 4), (7, 3), (2, 9)] {
            let m = bicubic_matrix(i, o, DType::F64, &Device::Cpu)?.to_vec2::<f64>()?;
            for row in &m {
                let s: f64 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{i}->{o}: {s}");
            }
            if i == o {
                for (r, row) in m.iter().enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        assert!((v - f64::from(r == c)).abs() < 1e-12);
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn presets_validate_and_have_their_shapes() -> Result<()> {
        for &p in <ViTConfig as FamilyConfig>::PRESETS {
            ViTConfig::preset(p)?.validate()?;
        }
        let f = ViTConfig::fashion_mnist();
        assert_eq!((f.grid(), f.n_labels(), f.num_channels), (7, 10, 1));
        assert_eq!(f.labels()[9], "Ankle boot");
        assert_eq!(ViTConfig::vit_base().labels()[3], "LABEL_3");
        let bad = ViTConfig {
            patch_size: 32,
            ..ViTConfig::tiny()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("patch_size"));
        Ok(())
    }

    #[test]
    fn patches_are_the_convolutions_in_c_i_j_order() -> Result<()> {
        let (vit, _) = ViT::init(&ViTConfig::tiny(), DType::F32, &Device::Cpu, 0)?;
        // Pixel value = its flat index in (B, C, H, W).
        let px = Tensor::arange(0f32, (2 * 3 * 17 * 18) as f32, &Device::Cpu)?
            .reshape((2, 3, 17, 18))?;
        let (patches, grid) = vit.patchify(&px)?;
        assert_eq!(grid, (4, 4)); // 17 and 18 cut to 16
        assert_eq!(patches.dims(), [2, 16, 48]);
        // Batch 1, patch (row 2, column 3), channel 1, offset (i 1, j 2).
        let v = patches
            .get(1)?
            .get(2 * 4 + 3)?
            .get(16 + 4 + 2)?
            .to_scalar::<f32>()?;
        let (b, c, y, x) = (1, 1, 2 * 4 + 1, 3 * 4 + 2);
        assert_eq!(v as usize, ((b * 3 + c) * 17 + y) * 18 + x);
        Ok(())
    }
}
