//! Hugging Face ViT checkpoints (`ViTForImageClassification`, or `ViTModel` without a head) →
//! [`ViT`]: `config.json` (`"model_type": "vit"`, with `id2label`), `model.safetensors` (or
//! `pytorch_model.bin`) and `preprocessor_config.json` (the image processor; ViT's defaults
//! at the model's image size when absent).
//!
//! Parameter names (the `vit.` prefix of `ViTForImageClassification` optional; the names
//! `save_pretrained` writes, and in brackets transformers 5's in-memory names; `N` the layer):
//!
//! | Hugging Face                                                  | ours                         |
//! |---------------------------------------------------------------|------------------------------|
//! | `embeddings.patch_embeddings.projection.weight` (E, C, P, P)  | `embed.patch.weight` (E, C·P·P) |
//! | `embeddings.patch_embeddings.projection.bias`                 | `embed.patch.bias`           |
//! | `embeddings.cls_token`                                        | `embed.cls`                  |
//! | `embeddings.position_embeddings`                              | `embed.pos`                  |
//! | `encoder.layer.N.layernorm_before.*` (`layers.N.layernorm_before.*`) | `layers.N.norm1.*`    |
//! | `encoder.layer.N.attention.attention.{query,key,value}.*` (`layers.N.attention.{q,k,v}_proj.*`) | `layers.N.self_attn.in_proj.*` (stacked along dim 0) |
//! | `encoder.layer.N.attention.output.dense.*` (`layers.N.attention.o_proj.*`) | `layers.N.self_attn.out_proj.*` |
//! | `encoder.layer.N.layernorm_after.*`                           | `layers.N.norm2.*`           |
//! | `encoder.layer.N.intermediate.dense.*` (`layers.N.mlp.fc1.*`) | `layers.N.ff.linear1.*`      |
//! | `encoder.layer.N.output.dense.*` (`layers.N.mlp.fc2.*`)       | `layers.N.ff.linear2.*`      |
//! | `layernorm.*`                                                 | `norm.*`                     |
//! | `classifier.*` (never prefixed)                               | `classifier.*`               |
//!
//! `pooler.*` (ViTModel's pooler, unused by classification) and `embeddings.mask_token`
//! (masked image modelling) are ignored; any other tensor is an error, as are missing tensors
//! and wrong shapes, named by their Hugging Face name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::hf_bert::{read_weights, HF_CONFIG_FILE};
use super::strict::StrictRename;
use crate::data::images::{ImageProcessor, ImageProcessorConfig, PREPROCESSOR_CONFIG_FILE};
use crate::models::{config_from_json, FamilyConfig, ViT, ViTConfig};
use crate::nn::{InitScheme, VarStore};
use crate::{Error, Result};

/// A side given as a number or as `[height, width]` (transformers accepts both).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Side {
    One(usize),
    Pair(Vec<usize>),
}

impl Side {
    fn square(&self, field: &str, path: &str) -> Result<usize> {
        match self {
            Side::One(s) => Ok(*s),
            Side::Pair(v) if v.len() == 2 && v[0] == v[1] => Ok(v[0]),
            Side::Pair(v) => Err(Error::Config(format!(
                "{path}: field `{field}` is {v:?}; only square sizes are supported"
            ))),
        }
    }
}

/// The fields of a Hugging Face `ViTConfig` that shape the network; the others
/// (`architectures`, `encoder_stride`, `pooler_*`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HfViTConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_layers")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_range")]
    pub initializer_range: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image")]
    pub image_size: Side,
    #[serde(default = "d_patch")]
    pub patch_size: Side,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default)]
    pub id2label: std::collections::BTreeMap<String, String>,
}

// transformers' ViTConfig defaults (ViT-B/16).
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_range() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}
fn d_image() -> Side {
    Side::One(224)
}
fn d_patch() -> Side {
    Side::One(16)
}
fn d_channels() -> usize {
    3
}
fn d_true() -> bool {
    true
}

impl HfViTConfig {
    /// Read `config.json`, which must say `"model_type": "vit"`; `path` names it in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|source| Error::Json {
                what: path.to_string(),
                source,
            })?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("vit") => {}
            Some(other) => {
                return Err(Error::Config(format!(
                    "{path}: model_type is {other:?}, but only \"vit\" checkpoints can be loaded \
                     here (ViTForImageClassification, ViTModel)"
                )))
            }
            None => {
                return Err(Error::Config(format!(
                    "{path}: no \"model_type\" field; expected \"model_type\": \"vit\""
                )))
            }
        }
        config_from_json(text, path)
    }

    /// Our configuration of the same network; `head` says whether the checkpoint has a
    /// classifier (a `ViTModel` has none, whatever its `id2label`).
    pub fn to_vit(&self, head: bool, path: &str) -> Result<ViTConfig> {
        let (id2label, num_labels) = if head {
            (self.id2label.clone(), self.num_labels)
        } else {
            (Default::default(), Some(0))
        };
        let cfg = ViTConfig {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act.clone(),
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            initializer_range: self.initializer_range,
            layer_norm_eps: self.layer_norm_eps,
            image_size: self.image_size.square("image_size", path)?,
            patch_size: self.patch_size.square("patch_size", path)?,
            num_channels: self.num_channels,
            qkv_bias: self.qkv_bias,
            num_labels,
            id2label,
            init: InitScheme::Gpt2,
        };
        cfg.validate().map_err(|e| e.in_source(path))?;
        Ok(cfg)
    }
}

/// How one of our parameters is made from Hugging Face tensors (names without prefix).
enum HfSource {
    /// One tensor; the alternatives (saved and in-memory names) are tried in order.
    One(Vec<String>),
    /// The convolution weight (E, C, P, P), flattened to (E, C·P·P).
    Conv(String),
    /// Query, key and value stacked along dim 0 (each with its alternatives).
    Qkv([Vec<String>; 3]),
}

fn hf_source(ours: &str) -> Option<HfSource> {
    let one = |names: &[String]| Some(HfSource::One(names.to_vec()));
    let parts: Vec<&str> = ours.split('.').collect();
    match parts.as_slice() {
        ["embed", "patch", "weight"] => Some(HfSource::Conv(
            "embeddings.patch_embeddings.projection.weight".into(),
        )),
        ["embed", "patch", "bias"] => one(&["embeddings.patch_embeddings.projection.bias".into()]),
        ["embed", "cls"] => one(&["embeddings.cls_token".into()]),
        ["embed", "pos"] => one(&["embeddings.position_embeddings".into()]),
        ["norm", leaf] => one(&[format!("layernorm.{leaf}")]),
        ["classifier", leaf] => one(&[format!("classifier.{leaf}")]),
        ["layers", n, rest @ ..] => {
            let (old, new) = (format!("encoder.layer.{n}"), format!("layers.{n}"));
            let both = |o: &str, v: &str, leaf: &str| {
                vec![format!("{old}.{o}.{leaf}"), format!("{new}.{v}.{leaf}")]
            };
            match rest {
                ["norm1", leaf] => one(&both("layernorm_before", "layernorm_before", leaf)),
                ["norm2", leaf] => one(&both("layernorm_after", "layernorm_after", leaf)),
                ["self_attn", "in_proj", leaf] => Some(HfSource::Qkv([
                    both("attention.attention.query", "attention.q_proj", leaf),
                    both("attention.attention.key", "attention.k_proj", leaf),
                    both("attention.attention.value", "attention.v_proj", leaf),
                ])),
                ["self_attn", "out_proj", leaf] => {
                    one(&both("attention.output.dense", "attention.o_proj", leaf))
                }
                ["ff", "linear1", leaf] => one(&both("intermediate.dense", "mlp.fc1", leaf)),
                ["ff", "linear2", leaf] => one(&both("output.dense", "mlp.fc2", leaf)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether a tensor (unprefixed) belongs to no part of the network we build and is ignored.
fn ignored(name: &str) -> bool {
    name.starts_with("pooler.") || name == "embeddings.mask_token"
}

/// The body's prefix: `vit.` for `ViTFor*` checkpoints, none for `ViTModel`.
fn body_prefix(hf: &HashMap<String, Tensor>) -> &'static str {
    if hf.keys().any(|k| k.starts_with("vit.embeddings.")) {
        "vit."
    } else {
        ""
    }
}

/// Whether the state dict has a classification head.
pub fn has_classifier(hf: &HashMap<String, Tensor>) -> bool {
    hf.contains_key("classifier.weight")
}

/// Rename a Hugging Face ViT state dict into our names for `params` (name, shape) of the
/// model that receives it. Strict, like `hf_bert::map_state_dict`: every parameter found
/// with its shape, every tensor used or ignored by name; tensors converted to f32.
pub fn map_state_dict(
    hf: &HashMap<String, Tensor>,
    params: &[(String, Vec<usize>)],
    source_name: &str,
) -> Result<HashMap<String, Tensor>> {
    let prefix = body_prefix(hf);
    // The classifier is outside the body: never prefixed.
    let full = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .map(|n| {
                if n.starts_with("classifier.") {
                    n.to_string()
                } else {
                    format!("{prefix}{n}")
                }
            })
            .collect()
    };
    let mut r = StrictRename::new(hf, source_name);
    let out = r.rename_all(params, "ViT", hf_source, |r, source, shape| match source {
        HfSource::One(names) => r.take(&full(&names), shape),
        HfSource::Conv(name) => {
            // (E, C, P, P) → (E, C·P·P): the row-major flattening is our (c, i, j).
            let [e, cpp] = shape[..] else {
                return Err(r.error(format!("{name}: expected a matrix, got {shape:?}")));
            };
            let names = full(&[name]);
            if let Some(t) = r.peek(&names[0]) {
                if !matches!(t.dims4(), Ok((te, c, p, q)) if te == e && c * p * q == cpp && p == q)
                {
                    return Err(r.error(format!(
                        "tensor {}: expected shape ({e}, C, P, P) with C·P·P = {cpp}, got {:?}",
                        names[0],
                        t.dims()
                    )));
                }
            }
            r.take_reshaped(&names, shape, |d| d.len() == 4)
        }
        // in_proj is (3E, E) / (3E): each of q, k, v a third of dim 0.
        HfSource::Qkv(parts) => r.take_stacked(&parts.map(|names| Some(full(&names))), shape),
    })?;
    r.finish(
        |k| ignored(k.strip_prefix(prefix).unwrap_or(k)),
        "the model",
    )?;
    Ok(out)
}

/// A Hugging Face ViT directory, loaded.
pub struct HfViT {
    pub model: ViT,
    pub vs: VarStore,
    pub config: ViTConfig,
    /// From `preprocessor_config.json`, else ViT's defaults at the model's image size.
    pub processor: ImageProcessor,
}

/// Load a `ViTForImageClassification` (or `ViTModel`) directory.
pub fn load(dir: &Path, device: &Device) -> Result<HfViT> {
    let cfg_path = dir.join(HF_CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let what = cfg_path.display().to_string();
    let hf_cfg = HfViTConfig::from_json(&text, &what)?;
    let (weights, source) = read_weights(dir)?;
    let config = hf_cfg.to_vit(has_classifier(&weights), &what)?;
    let vs = config.var_store(DType::F32, device, 0);
    let model = config.build(&vs.root())?;
    let params: Vec<(String, Vec<usize>)> = vs
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    let source_name = source.display().to_string();
    let mapped = map_state_dict(&weights, &params, &source_name)?;
    vs.load_map(&mapped, &source_name)?;
    let pre = dir.join(PREPROCESSOR_CONFIG_FILE);
    let processor = if pre.is_file() {
        ImageProcessor::from_file(&pre, config.num_channels)?
    } else {
        ImageProcessor::new(
            ImageProcessorConfig::square(config.image_size),
            config.num_channels,
        )?
    };
    Ok(HfViT {
        model,
        vs,
        config,
        processor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_of_a_vit_has_a_hugging_face_name() -> Result<()> {
        let (_, vs) = ViT::init(&ViTConfig::tiny(), DType::F32, &Device::Cpu, 0)?;
        for (name, _) in vs.vars() {
            assert!(
                hf_source(&name).is_some(),
                "{name} has no Hugging Face name"
            );
        }
        match hf_source("layers.1.self_attn.in_proj.bias") {
            Some(HfSource::Qkv([q, ..])) => assert_eq!(
                q,
                [
                    "encoder.layer.1.attention.attention.query.bias",
                    "layers.1.attention.q_proj.bias"
                ]
            ),
            _ => panic!("in_proj is stacked from query, key, value"),
        }
        Ok(())
    }
}
