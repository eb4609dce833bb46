//! Hugging Face Whisper directories (`WhisperForConditionalGeneration` or `WhisperModel`:
//! `config.json`, `model.safetensors`) → [`Whisper`](crate::models::Whisper).
//!
//! Names (with or without the `model.` prefix; `N` is the layer):
//!
//! | Hugging Face                                             | ours                                   |
//! |----------------------------------------------------------|----------------------------------------|
//! | `encoder.conv{1,2}.*`                                    | `conv{1,2}.*`                          |
//! | `encoder.embed_positions.weight`                         | `encoder_pos.weight`                   |
//! | `encoder.layers.N.self_attn.{q,k,v}_proj.*`              | `encoder.layers.N.self_attn.in_proj.*` (stacked; no key bias: zeros) |
//! | `{encoder,decoder}.layers.N.self_attn.out_proj.*`        | `….self_attn.out_proj.*`               |
//! | `{encoder,decoder}.layers.N.self_attn_layer_norm.*`      | `….norm1.*`                            |
//! | `encoder.layers.N.final_layer_norm.*`                    | `encoder.layers.N.norm2.*`             |
//! | `{encoder,decoder}.layers.N.fc{1,2}.*`                   | `….ff.linear{1,2}.*`                   |
//! | `{encoder,decoder}.layer_norm.*`                         | `{encoder,decoder}.norm.*`             |
//! | `decoder.embed_tokens.weight` (`proj_out.weight` tied)   | `embed.weight`                         |
//! | `decoder.embed_positions.weight`                         | `decoder_pos.weight`                   |
//! | `decoder.layers.N.encoder_attn.{q,k,v}_proj.*`           | `decoder.layers.N.cross_attn.in_proj.*`|
//! | `decoder.layers.N.encoder_attn.out_proj.*`               | `decoder.layers.N.cross_attn.out_proj.*` |
//! | `decoder.layers.N.encoder_attn_layer_norm.*`             | `decoder.layers.N.norm2.*`             |
//! | `decoder.layers.N.final_layer_norm.*`                    | `decoder.layers.N.norm3.*`             |

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::strict::StrictRename;
use crate::models::{Whisper, WhisperConfig};
use crate::nn::var_store::read_safetensors;
use crate::nn::VarStore;
use crate::{Error, Result};

/// The fields of a Hugging Face Whisper `config.json` that shape the network.
#[derive(Debug, Clone, Deserialize)]
pub struct HfWhisperConfig {
    pub vocab_size: usize,
    #[serde(default = "default_mels")]
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_layers: usize,
    pub decoder_attention_heads: usize,
    pub decoder_ffn_dim: usize,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    /// Older checkpoints keep the suppression lists here rather than in
    /// `generation_config.json`.
    #[serde(default)]
    pub suppress_tokens: Option<Vec<i64>>,
    #[serde(default)]
    pub begin_suppress_tokens: Option<Vec<i64>>,
}

fn default_mels() -> usize {
    80
}
fn default_act() -> String {
    "gelu".into()
}

impl HfWhisperConfig {
    pub fn read(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }

    /// Our config; an activation or embedding scale our model does not implement is an error.
    pub fn to_whisper(&self, source: &str) -> Result<WhisperConfig> {
        if self.activation_function != "gelu" {
            return Err(Error::invalid(
                format!("{source}: activation_function"),
                "\"gelu\" (Whisper's)",
                format!("{:?}", self.activation_function),
            ));
        }
        if self.scale_embedding {
            return Err(Error::invalid(
                format!("{source}: scale_embedding"),
                "false (Whisper's)",
                "true",
            ));
        }
        let cfg = WhisperConfig {
            vocab_size: self.vocab_size,
            num_mel_bins: self.num_mel_bins,
            d_model: self.d_model,
            encoder_layers: self.encoder_layers,
            encoder_attention_heads: self.encoder_attention_heads,
            encoder_ffn_dim: self.encoder_ffn_dim,
            decoder_layers: self.decoder_layers,
            decoder_attention_heads: self.decoder_attention_heads,
            decoder_ffn_dim: self.decoder_ffn_dim,
            max_source_positions: self.max_source_positions,
            max_target_positions: self.max_target_positions,
            dropout: 0.0,
            layer_norm_eps: 1e-5,
        };
        cfg.validate().map_err(|e| e.in_source(source))?;
        Ok(cfg)
    }
}

/// Where our parameter comes from: Hugging Face names (without prefix) stacked along dim 0;
/// `None` in the list is a zero part (the missing key bias).
fn hf_source(ours: &str) -> Option<Vec<Option<String>>> {
    let one = |n: String| Some(vec![Some(n)]);
    let parts: Vec<&str> = ours.split('.').collect();
    let qkv = |m: String, leaf: &str| {
        Some(
            ["q", "k", "v"]
                .iter()
                .map(|p| (leaf == "weight" || *p != "k").then(|| format!("{m}.{p}_proj.{leaf}")))
                .collect(),
        )
    };
    match parts.as_slice() {
        [c @ ("conv1" | "conv2"), l] => one(format!("encoder.{c}.{l}")),
        ["encoder_pos", "weight"] => one("encoder.embed_positions.weight".into()),
        ["decoder_pos", "weight"] => one("decoder.embed_positions.weight".into()),
        ["embed", "weight"] => one("decoder.embed_tokens.weight".into()),
        [side @ ("encoder" | "decoder"), "norm", l] => one(format!("{side}.layer_norm.{l}")),
        [side @ ("encoder" | "decoder"), "layers", n, rest @ ..] => {
            let p = format!("{side}.layers.{n}");
            match (*side, rest) {
                (_, ["self_attn", "in_proj", l]) => qkv(format!("{p}.self_attn"), l),
                (_, ["self_attn", "out_proj", l]) => one(format!("{p}.self_attn.out_proj.{l}")),
                (_, ["norm1", l]) => one(format!("{p}.self_attn_layer_norm.{l}")),
                ("encoder", ["norm2", l]) | ("decoder", ["norm3", l]) => {
                    one(format!("{p}.final_layer_norm.{l}"))
                }
                ("decoder", ["norm2", l]) => one(format!("{p}.encoder_attn_layer_norm.{l}")),
                ("decoder", ["cross_attn", "in_proj", l]) => qkv(format!("{p}.encoder_attn"), l),
                ("decoder", ["cross_attn", "out_proj", l]) => {
                    one(format!("{p}.encoder_attn.out_proj.{l}"))
                }
                (_, ["ff", "linear1", l]) => one(format!("{p}.fc1.{l}")),
                (_, ["ff", "linear2", l]) => one(format!("{p}.fc2.{l}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Our parameters from a Hugging Face Whisper state dict, strictly (missing, unused and
/// mis-shaped tensors are errors naming the Hugging Face tensor).
pub fn map_state_dict(
    hf: &HashMap<String, Tensor>,
    params: &[(String, Vec<usize>)],
    source: &str,
) -> Result<HashMap<String, Tensor>> {
    let prefix = if hf.keys().any(|k| k.starts_with("model.encoder.")) {
        "model."
    } else {
        ""
    };
    let mut r = StrictRename::new(hf, source);
    let out = r.rename_all(params, "Whisper", hf_source, |r, sources, shape| {
        let parts: Vec<Option<Vec<String>>> = sources
            .into_iter()
            .map(|s| s.map(|name| vec![format!("{prefix}{name}")]))
            .collect();
        r.take_stacked(&parts, shape)
    })?;
    // The output projection must be the embedding (Whisper ties them).
    if let (Some(p), Some(e)) = (
        r.peek("proj_out.weight"),
        r.peek(&format!("{prefix}decoder.embed_tokens.weight")),
    ) {
        let same = p.dims() == e.dims()
            && (p.to_dtype(DType::F32)? - e.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                == 0.0;
        if !same {
            return Err(r.error(
                "proj_out.weight differs from decoder.embed_tokens.weight; our Whisper ties them"
                    .into(),
            ));
        }
        r.mark_used("proj_out.weight");
    }
    r.finish(|_| false, "our Whisper")?;
    Ok(out)
}

/// A Whisper model from a Hugging Face directory, in f32 on `device`.
pub fn load(dir: &Path, device: &Device) -> Result<(Whisper, VarStore, WhisperConfig)> {
    let config_path = dir.join(crate::models::CONFIG_FILE);
    let hf_cfg = HfWhisperConfig::read(&config_path)?;
    let cfg = hf_cfg.to_whisper(&config_path.display().to_string())?;
    let weights = dir.join(crate::models::WEIGHTS_FILE);
    let hf = read_safetensors(&weights)?;
    let vs = crate::models::FamilyConfig::var_store(&cfg, DType::F32, device, 0).for_inference();
    let model = Whisper::new(&cfg, &vs.root())?;
    let params: Vec<(String, Vec<usize>)> = vs
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    let source = weights.display().to_string();
    let map = map_state_dict(&hf, &params, &source)?;
    vs.load_map(&map, &source)?;
    Ok((model, vs, cfg))
}
