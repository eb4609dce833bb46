//! CTranslate2 model files (`model.bin`, as faster-whisper runs them) → our parameters.
//!
//! # The format (binary version 5 and 6, little-endian)
//!
//! ```text
//! u32      binary version
//! string   spec name ("WhisperSpec")          string = u16 byte length (with the NUL),
//! u32      spec revision                                then the bytes, NUL-terminated
//! u32      variable count, then per variable:
//!   string   name ("encoder/layer_0/ffn/linear_0/weight")
//!   u8       rank, then rank × u32 dimensions
//!   u8       dtype: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16
//!   u32      byte count, then the bytes (row-major)
//! u32      alias count, then per alias: string alias, string variable it names
//! ```
//!
//! Scalars (rank 0) hold the spec's attributes: `decoder/num_heads`, `decoder/pre_norm`,
//! `decoder/activation` (3 = exact GELU), ... A weight quantized to int8 comes with a
//! `<name>_scale` of one f32 per row: the weight is `int8 / scale`.
//!
//! # Whisper's names (`WhisperSpec`) → ours ([`crate::models::Whisper`]); `N` is the layer
//!
//! | CTranslate2                                              | ours                                     |
//! |----------------------------------------------------------|------------------------------------------|
//! | `encoder/conv{1,2}/{weight,bias}`                         | `conv{1,2}.{weight,bias}`                |
//! | `encoder/position_encodings/encodings`                    | `encoder_pos.weight`                     |
//! | `encoder/layer_N/self_attention/layer_norm/{gamma,beta}`  | `encoder.layers.N.norm1.{weight,bias}`   |
//! | `encoder/layer_N/self_attention/linear_0/*` (q, k, v fused) | `encoder.layers.N.self_attn.in_proj.*` |
//! | `encoder/layer_N/self_attention/linear_1/*`               | `encoder.layers.N.self_attn.out_proj.*`  |
//! | `encoder/layer_N/ffn/layer_norm/*`                        | `encoder.layers.N.norm2.*`               |
//! | `encoder/layer_N/ffn/linear_{0,1}/*`                      | `encoder.layers.N.ff.linear{1,2}.*`      |
//! | `encoder/layer_norm/*`                                    | `encoder.norm.*`                         |
//! | `decoder/embeddings/weight` (`decoder/projection/weight` is its alias: tied) | `embed.weight`  |
//! | `decoder/position_encodings/encodings`                    | `decoder_pos.weight`                     |
//! | `decoder/layer_N/self_attention/layer_norm/*`             | `decoder.layers.N.norm1.*`               |
//! | `decoder/layer_N/self_attention/linear_{0,1}/*`           | `decoder.layers.N.self_attn.{in,out}_proj.*` |
//! | `decoder/layer_N/attention/layer_norm/*`                  | `decoder.layers.N.norm2.*`               |
//! | `decoder/layer_N/attention/linear_0/*` (q) and `linear_1/*` (k, v fused) | `decoder.layers.N.cross_attn.in_proj.*` (stacked) |
//! | `decoder/layer_N/attention/linear_2/*`                    | `decoder.layers.N.cross_attn.out_proj.*` |
//! | `decoder/layer_N/ffn/layer_norm/*`                        | `decoder.layers.N.norm3.*`               |
//! | `decoder/layer_N/ffn/linear_{0,1}/*`                      | `decoder.layers.N.ff.linear{1,2}.*`      |
//! | `decoder/layer_norm/*`                                    | `decoder.norm.*`                         |
//!
//! Every tensor is converted to f32. A truncated file, an unknown binary version, a spec
//! that is not Whisper's, a missing variable, a wrong shape or an attribute our model does
//! not implement is an error naming the file and the variable.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::models::WhisperConfig;
use crate::{Error, Result};

/// The binary versions this reader knows.
pub const BINARY_VERSIONS: std::ops::RangeInclusive<u32> = 5..=6;

/// Element types of a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Dtype {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Dtype {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Ct2Dtype::F32,
            1 => Ct2Dtype::I8,
            2 => Ct2Dtype::I16,
            3 => Ct2Dtype::I32,
            4 => Ct2Dtype::F16,
            5 => Ct2Dtype::Bf16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Ct2Dtype::I8 => 1,
            Ct2Dtype::I16 | Ct2Dtype::F16 | Ct2Dtype::Bf16 => 2,
            Ct2Dtype::F32 | Ct2Dtype::I32 => 4,
        }
    }
}

/// One variable: its shape, type and where its bytes lie in the file.
#[derive(Debug, Clone)]
pub struct Ct2Variable {
    pub dims: Vec<usize>,
    pub dtype: Ct2Dtype,
    bytes: std::ops::Range<usize>,
}

/// A `model.bin`: its spec and variables, with aliases resolved.
#[derive(Debug)]
pub struct Ct2Model {
    /// Where it was read from, for errors.
    pub source: String,
    pub binary_version: u32,
    pub spec: String,
    pub spec_revision: u32,
    variables: HashMap<String, Ct2Variable>,
    /// alias → the variable it names.
    aliases: HashMap<String, String>,
    /// The whole file: variables are ranges of it, so that reading a model holds it once.
    bytes: Vec<u8>,
}

/// A cursor over the file's bytes that reports truncation with what it was reading.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    source: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            _ => Err(Error::Weights {
                source_name: self.source.to_string(),
                msg: format!(
                    "truncated: {} needs {n} bytes at offset {}, the file has {}",
                    what(),
                    self.pos,
                    self.bytes.len()
                ),
            }),
        }
    }
    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        String::from_utf8(b.to_vec()).map_err(|_| Error::Weights {
            source_name: self.source.to_string(),
            msg: format!("{} is not UTF-8", what()),
        })
    }
}

impl Ct2Model {
    /// Read `model.bin` (a file, or a model directory holding one).
    pub fn read(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("model.bin")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        Self::parse(bytes, &file.display().to_string())
    }

    /// Parse the bytes of a `model.bin`; `source` names it in errors.
    pub fn parse(bytes: Vec<u8>, source: &str) -> Result<Self> {
        let err = |msg: String| Error::Weights {
            source_name: source.to_string(),
            msg,
        };
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
            source,
        };
        let binary_version = r.u32(&|| "the binary version".into())?;
        if !BINARY_VERSIONS.contains(&binary_version) {
            return Err(err(format!(
                "binary version {binary_version}: this reader knows CTranslate2 versions {}..={} \
                 (is it a CTranslate2 model.bin?)",
                BINARY_VERSIONS.start(),
                BINARY_VERSIONS.end()
            )));
        }
        let spec = r.string(&|| "the spec name".into())?;
        let spec_revision = r.u32(&|| "the spec revision".into())?;
        let count = r.u32(&|| "the variable count".into())? as usize;
        let mut variables = HashMap::new();
        for i in 0..count {
            let name = r.string(&|| format!("the name of variable {i}"))?;
            let what = |part: &str| {
                let (name, part) = (name.clone(), part.to_string());
                move || format!("{part} of variable {name}")
            };
            let rank = r.u8(&what("the rank"))? as usize;
            let mut dims = Vec::with_capacity(rank);
            for _ in 0..rank {
                dims.push(r.u32(&what("the shape"))? as usize);
            }
            let code = r.u8(&what("the dtype"))?;
            let dtype = Ct2Dtype::from_code(code)
                .ok_or_else(|| err(format!("variable {name}: unknown dtype code {code}")))?;
            let n_bytes = r.u32(&what("the byte count"))? as usize;
            let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if elems.and_then(|e| e.checked_mul(dtype.size())) != Some(n_bytes) {
                return Err(err(format!(
                    "variable {name}: shape {dims:?} of {dtype:?} does not take {n_bytes} bytes"
                )));
            }
            let start = r.pos;
            r.take(n_bytes, &what("the data"))?;
            variables.insert(
                name,
                Ct2Variable {
                    dims,
                    dtype,
                    bytes: start..r.pos,
                },
            );
        }
        let mut aliases = HashMap::new();
        let n_aliases = r.u32(&|| "the alias count".into())? as usize;
        for i in 0..n_aliases {
            let alias = r.string(&|| format!("alias {i}"))?;
            let target = r.string(&|| format!("the variable of alias {alias}"))?;
            if !variables.contains_key(&target) {
                return Err(err(format!(
                    "alias {alias} names {target}, which the file does not hold"
                )));
            }
            aliases.insert(alias, target);
        }
        if r.pos != bytes.len() {
            return Err(err(format!(
                "{} bytes after the last alias (a damaged or concatenated file?)",
                bytes.len() - r.pos
            )));
        }
        Ok(Ct2Model {
            source: source.to_string(),
            binary_version,
            spec,
            spec_revision,
            variables,
            aliases,
            bytes,
        })
    }

    fn err(&self, msg: String) -> Error {
        Error::Weights {
            source_name: self.source.clone(),
            msg,
        }
    }

    /// The variable `name`, through an alias if it is one.
    pub fn variable(&self, name: &str) -> Option<&Ct2Variable> {
        let name = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        self.variables.get(name)
    }

    /// The variable an alias names, if `name` is an alias.
    pub fn alias_target(&self, name: &str) -> Option<&str> {
        self.aliases.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.variables.keys().map(String::as_str)
    }

    fn require(&self, name: &str) -> Result<&Ct2Variable> {
        self.variable(name)
            .ok_or_else(|| self.err(format!("missing variable {name}")))
    }

    /// The dimensions of variable `name`.
    pub fn dims(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.require(name)?.dims)
    }

    /// An integer attribute (a rank-0 integer variable).
    pub fn int(&self, name: &str) -> Result<i64> {
        let v = self.require(name)?;
        let b = &self.bytes[v.bytes.clone()];
        if !v.dims.is_empty() {
            return Err(self.err(format!("{name}: expected a scalar, got shape {:?}", v.dims)));
        }
        Ok(match v.dtype {
            Ct2Dtype::I8 => b[0] as i8 as i64,
            Ct2Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            Ct2Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            other => {
                return Err(self.err(format!("{name}: expected an integer, got {other:?}")));
            }
        })
    }

    /// Variable `name` as an f32 tensor, dequantized if it is int8 with a `_scale`.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let v = self.require(name)?;
        let dev = &Device::Cpu;
        let b = &self.bytes[v.bytes.clone()];
        // Straight to f32 (exact from f16 and bf16), without a half-precision copy first.
        let floats = |vals: Vec<f32>| Tensor::from_vec(vals, v.dims.as_slice(), dev);
        let t = match v.dtype {
            Ct2Dtype::F32 => floats(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )?,
            Ct2Dtype::F16 => floats(
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            )?,
            Ct2Dtype::Bf16 => floats(
                b.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            )?,
            Ct2Dtype::I8 => {
                // int8 weights: w = q / scale, one scale per row.
                let scale_name = format!("{name}_scale");
                let scale = self.tensor(&scale_name).map_err(|_| {
                    self.err(format!(
                        "{name} is int8 without {scale_name} (only quantized weights are int8)"
                    ))
                })?;
                let rows = v.dims.first().copied().unwrap_or(1);
                let scale = scale.flatten_all()?;
                if scale.elem_count() != rows {
                    return Err(self.err(format!(
                        "{scale_name}: {} scales for {rows} rows of {name}",
                        scale.elem_count()
                    )));
                }
                let vals: Vec<f32> = b.iter().map(|&q| q as i8 as f32).collect();
                let q = Tensor::from_vec(vals, v.dims.as_slice(), dev)?;
                let mut shape = vec![rows];
                shape.extend(std::iter::repeat_n(1, v.dims.len().saturating_sub(1)));
                q.broadcast_div(&scale.reshape(shape)?)?
            }
            other => {
                return Err(self.err(format!(
                    "{name}: {other:?} is not a weight type (f32, f16, bf16, or int8 with scales)"
                )))
            }
        };
        Ok(t)
    }
}

/// Whisper's hyperparameters from the shapes and attributes of a `WhisperSpec` model, after
/// checking that the attributes are those our model implements.
pub fn whisper_config(m: &Ct2Model) -> Result<WhisperConfig> {
    if m.spec != "WhisperSpec" {
        return Err(m.err(format!(
            "spec {:?}: this is not a Whisper model (expected WhisperSpec)",
            m.spec
        )));
    }
    // Attributes with the values of every released Whisper; anything else is another model.
    for (name, want, meaning) in [
        ("decoder/pre_norm", 1, "pre-norm layers"),
        ("decoder/activation", 3, "exact GELU"),
        ("decoder/scale_embeddings", 0, "unscaled embeddings"),
        ("decoder/alibi", 0, "no ALiBi"),
    ] {
        if let Ok(v) = m.int(name) {
            if v != want {
                return Err(m.err(format!(
                    "{name} is {v}; our Whisper implements {want} ({meaning})"
                )));
            }
        }
    }
    if let Some(target) = m.alias_target("decoder/projection/weight") {
        if target != "decoder/embeddings/weight" {
            return Err(m.err(format!(
                "decoder/projection/weight is an alias of {target}; Whisper ties it to decoder/embeddings/weight"
            )));
        }
    } else if m.variable("decoder/projection/weight").is_some() {
        return Err(m.err(
            "decoder/projection/weight is a separate matrix; Whisper ties it to decoder/embeddings/weight".into(),
        ));
    }
    let count = |side: &str| {
        (0..)
            .take_while(|i| {
                m.variable(&format!("{side}/layer_{i}/ffn/linear_0/weight"))
                    .is_some()
            })
            .count()
    };
    let dim2 = |name: &str| -> Result<(usize, usize)> {
        match m.dims(name)? {
            &[a, b] => Ok((a, b)),
            d => Err(m.err(format!("{name}: expected 2 dimensions, got {d:?}"))),
        }
    };
    let (vocab_size, d_model) = dim2("decoder/embeddings/weight")?;
    let conv1 = m.dims("encoder/conv1/weight")?;
    let num_mel_bins = match conv1 {
        &[o, c, 3] if o == d_model => c,
        d => {
            return Err(m.err(format!(
                "encoder/conv1/weight: expected ({d_model}, mel bins, 3), got {d:?}"
            )))
        }
    };
    let heads = |name: &str| -> Result<usize> {
        let h = m.int(name)?;
        if h <= 0 {
            return Err(m.err(format!("{name} is {h}")));
        }
        Ok(h as usize)
    };
    let cfg = WhisperConfig {
        vocab_size,
        num_mel_bins,
        d_model,
        encoder_layers: count("encoder"),
        encoder_attention_heads: heads("encoder/num_heads")?,
        encoder_ffn_dim: dim2("encoder/layer_0/ffn/linear_0/weight")?.0,
        decoder_layers: count("decoder"),
        decoder_attention_heads: heads("decoder/num_heads")?,
        decoder_ffn_dim: dim2("decoder/layer_0/ffn/linear_0/weight")?.0,
        max_source_positions: dim2("encoder/position_encodings/encodings")?.0,
        max_target_positions: dim2("decoder/position_encodings/encodings")?.0,
        dropout: 0.0,
        layer_norm_eps: 1e-5,
    };
    cfg.validate().map_err(|e| m.err(e.to_string()))?;
    Ok(cfg)
}

/// Where each of our parameters comes from: one CTranslate2 variable, or several stacked
/// along dim 0 (the cross-attention's query then fused key/value).
fn whisper_source(ours: &str) -> Option<Vec<String>> {
    let one = |n: String| Some(vec![n]);
    let leaf = |l: &str| match l {
        "weight" => "gamma",
        _ => "beta",
    };
    let parts: Vec<&str> = ours.split('.').collect();
    match parts.as_slice() {
        [conv @ ("conv1" | "conv2"), l] => one(format!("encoder/{conv}/{l}")),
        ["encoder_pos", "weight"] => one("encoder/position_encodings/encodings".into()),
        ["decoder_pos", "weight"] => one("decoder/position_encodings/encodings".into()),
        ["embed", "weight"] => one("decoder/embeddings/weight".into()),
        [side @ ("encoder" | "decoder"), "norm", l] => {
            one(format!("{side}/layer_norm/{}", leaf(l)))
        }
        [side @ ("encoder" | "decoder"), "layers", n, rest @ ..] => {
            let p = format!("{side}/layer_{n}");
            match (*side, rest) {
                (_, ["norm1", l]) => one(format!("{p}/self_attention/layer_norm/{}", leaf(l))),
                (_, ["self_attn", "in_proj", l]) => one(format!("{p}/self_attention/linear_0/{l}")),
                (_, ["self_attn", "out_proj", l]) => {
                    one(format!("{p}/self_attention/linear_1/{l}"))
                }
                ("encoder", ["norm2", l]) | ("decoder", ["norm3", l]) => {
                    one(format!("{p}/ffn/layer_norm/{}", leaf(l)))
                }
                (_, ["ff", "linear1", l]) => one(format!("{p}/ffn/linear_0/{l}")),
                (_, ["ff", "linear2", l]) => one(format!("{p}/ffn/linear_1/{l}")),
                ("decoder", ["norm2", l]) => one(format!("{p}/attention/layer_norm/{}", leaf(l))),
                ("decoder", ["cross_attn", "in_proj", l]) => Some(vec![
                    format!("{p}/attention/linear_0/{l}"),
                    format!("{p}/attention/linear_1/{l}"),
                ]),
                ("decoder", ["cross_attn", "out_proj", l]) => {
                    one(format!("{p}/attention/linear_2/{l}"))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Our parameters `params` (name, shape) from a Whisper `model.bin`, as f32 tensors; strict:
/// every parameter must be found with its shape and every weight of the file used.
pub fn whisper_tensors(
    m: &Ct2Model,
    params: &[(String, Vec<usize>)],
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut used = std::collections::HashSet::new();
    for (ours, shape) in params {
        let sources = whisper_source(ours).ok_or_else(|| {
            m.err(format!(
                "the model has a parameter {ours} that Whisper's CTranslate2 spec does not hold"
            ))
        })?;
        let parts = sources
            .iter()
            .map(|s| {
                used.insert(s.clone());
                m.tensor(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let t = if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        if t.dims() != shape.as_slice() {
            return Err(m.err(format!(
                "{}: expected shape {shape:?} (for our {ours}), got {:?}",
                sources.join(" + "),
                t.dims()
            )));
        }
        out.insert(ours.clone(), t);
    }
    // Weights of the file that no parameter took: a model with more than ours.
    let mut unused: Vec<&str> = m
        .names()
        .filter(|n| !used.contains(*n) && !n.ends_with("_scale"))
        .filter(|n| m.variable(n).is_some_and(|v| !v.dims.is_empty()))
        .collect();
    if !unused.is_empty() {
        unused.sort();
        return Err(m.err(format!(
            "variables our Whisper does not use: {}",
            unused.join(", ")
        )));
    }
    Ok(out)
}

/// A Whisper model from a CTranslate2 `model.bin` (or a directory holding one), in f32 on
/// `device`, with the config read off its shapes.
pub fn load_whisper(
    path: &Path,
    device: &Device,
) -> Result<(crate::models::Whisper, crate::nn::VarStore, WhisperConfig)> {
    let m = Ct2Model::read(path)?;
    let cfg = whisper_config(&m)?;
    let store =
        || crate::models::FamilyConfig::var_store(&cfg, DType::F32, device, 0).for_inference();
    // Our parameters' names and shapes, from a model of zeros that is dropped at once.
    let params: Vec<(String, Vec<usize>)> = {
        let probe = store();
        crate::models::Whisper::new(&cfg, &probe.root())?;
        probe
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect()
    };
    let map = whisper_tensors(&m, &params)?;
    let source = m.source.clone();
    // The model is then built from the converted tensors themselves, after the file's bytes
    // are gone: the weights are held once (tiny.en: 410 -> 250 MB at load).
    drop(m);
    let vs = store().with_values(map);
    let model = crate::models::Whisper::new(&cfg, &vs.root())?;
    vs.check_values_used(&source)?;
    Ok((model, vs, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `model.bin` written by hand, in the layout the module docs give.
    fn file(
        version: u32,
        vars: &[(&str, &[u32], u8, Vec<u8>)],
        aliases: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend(((s.len() + 1) as u16).to_le_bytes());
            b.extend(s.as_bytes());
            b.push(0);
        };
        b.extend(version.to_le_bytes());
        s(&mut b, "WhisperSpec");
        b.extend(3u32.to_le_bytes());
        b.extend((vars.len() as u32).to_le_bytes());
        for (name, dims, code, data) in vars {
            s(&mut b, name);
            b.push(dims.len() as u8);
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.push(*code);
            b.extend((data.len() as u32).to_le_bytes());
            b.extend(data);
        }
        b.extend((aliases.len() as u32).to_le_bytes());
        for (a, t) in aliases {
            s(&mut b, a);
            s(&mut b, t);
        }
        b
    }

    #[test]
    fn reads_variables_aliases_and_every_weight_type() -> Result<()> {
        let f16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = [0.25f32, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let int8: Vec<u8> = vec![10u8, (-20i8) as u8, 30, 40];
        let scale: Vec<u8> = [10.0f32, 20.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = file(
            6,
            &[
                ("a", &[2], 4, f16),
                ("b", &[2], 0, f32s),
                ("q", &[2, 2], 1, int8),
                ("q_scale", &[2], 0, scale),
                ("heads", &[], 2, 6i16.to_le_bytes().to_vec()),
            ],
            &[("alias_of_a", "a")],
        );
        let m = Ct2Model::parse(bytes, "m.bin")?;
        assert_eq!(
            (m.binary_version, m.spec.as_str(), m.spec_revision),
            (6, "WhisperSpec", 3)
        );
        assert_eq!(m.tensor("a")?.to_vec1::<f32>()?, vec![1.5, -2.0]);
        assert_eq!(m.tensor("alias_of_a")?.to_vec1::<f32>()?, vec![1.5, -2.0]);
        assert_eq!(m.tensor("b")?.to_vec1::<f32>()?, vec![0.25, 4.0]);
        assert_eq!(
            m.tensor("q")?.to_vec2::<f32>()?,
            vec![vec![1.0, -2.0], vec![1.5, 2.0]]
        );
        assert_eq!(m.int("heads")?, 6);
        Ok(())
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_the_variable() {
        let good = file(6, &[("encoder/conv1/weight", &[4], 0, vec![0; 16])], &[]);
        // Every truncation point is an error, never a panic.
        for cut in 0..good.len() {
            let e = Ct2Model::parse(good[..cut].to_vec(), "m.bin")
                .unwrap_err()
                .to_string();
            assert!(e.contains("m.bin") && e.contains("truncated"), "{cut}: {e}");
        }
        let e = Ct2Model::parse(good[..good.len() - 5].to_vec(), "m.bin")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("encoder/conv1/weight") || e.contains("alias"),
            "{e}"
        );
        let e = Ct2Model::parse(file(9, &[], &[]), "m.bin")
            .unwrap_err()
            .to_string();
        assert!(e.contains("binary version 9"), "{e}");
        let e = Ct2Model::parse(file(6, &[("x", &[3], 0, vec![0; 8])], &[]), "m.bin")
            .unwrap_err()
            .to_string();
        assert!(e.contains("variable x") && e.contains("8 bytes"), "{e}");
        let e = Ct2Model::parse(file(6, &[], &[("a", "nothing")]), "m.bin")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing"), "{e}");
        let m = Ct2Model::parse(good.clone(), "m.bin").unwrap();
        let e = m.tensor("encoder/conv2/weight").unwrap_err().to_string();
        assert!(e.contains("missing variable encoder/conv2/weight"), "{e}");
        let e = whisper_config(&m).unwrap_err().to_string();
        assert!(e.contains("m.bin"), "{e}");
    }

    /// Every parameter of our Whisper has a CTranslate2 source.
    #[test]
    fn every_parameter_has_its_ctranslate2_name() -> Result<()> {
        let cfg = WhisperConfig::preset("tiny", 100)?;
        let cfg = WhisperConfig {
            d_model: 16,
            encoder_ffn_dim: 32,
            decoder_ffn_dim: 32,
            encoder_attention_heads: 2,
            decoder_attention_heads: 2,
            encoder_layers: 2,
            decoder_layers: 2,
            ..cfg
        };
        let vs = crate::models::FamilyConfig::var_store(&cfg, DType::F32, &Device::Cpu, 0)
            .for_inference();
        crate::models::Whisper::new(&cfg, &vs.root())?;
        for (name, _) in vs.vars() {
            assert!(whisper_source(&name).is_some(), "{name}");
        }
        Ok(())
    }
}
