//! GGUF (llama.cpp's format) → a [`DecoderOnly`] model, read with candle's
//! `quantized::gguf_file`: the architecture and hyperparameters come from the metadata, the
//! tensors from llama.cpp's names mapped onto ours. This first path dequantizes every tensor at
//! load (`--dtype f32` in the terms); keeping them quantized through `QMatMul` comes
//! next (docs/gguf-research.md says what it takes).
//!
//! Architectures: `llama` (SmolLM2, Llama 2/3 without RoPE scaling). Others are refused by name.
//!
//! Metadata (`A` = `general.architecture`):
//!
//! | key                                   | ours                                   |
//! |---------------------------------------|----------------------------------------|
//! | `A.embedding_length`                  | `d_model`                              |
//! | `A.block_count`                       | `n_layers`                             |
//! | `A.feed_forward_length`               | `d_ff`                                 |
//! | `A.attention.head_count`              | `n_heads`                              |
//! | `A.attention.head_count_kv`           | `n_kv_heads` (default: `n_heads`)      |
//! | `A.attention.key_length`              | `head_dim` (default: d_model / heads)  |
//! | `A.attention.layer_norm_rms_epsilon`  | `layer_norm_eps`                       |
//! | `A.context_length`                    | `block_size`                           |
//! | `A.rope.freq_base`                    | `rope_theta` (default 10000)           |
//! | `A.vocab_size` or `token_embd` rows   | `vocab_size`                           |
//!
//! Tensors (`N` the layer; shapes as candle reads them, `(out, in)`, PyTorch's order):
//!
//! | GGUF                          | ours                                                    |
//! |-------------------------------|---------------------------------------------------------|
//! | `token_embd.weight`           | `tok_embed.weight`                                      |
//! | `output.weight` (absent: tied)| `lm_head.weight`                                        |
//! | `output_norm.weight`          | `norm.weight`                                           |
//! | `blk.N.attn_norm.weight`      | `layers.N.norm1.weight`                                 |
//! | `blk.N.attn_{q,k,v}.weight`   | `layers.N.self_attn.in_proj.weight`, rows Q, K, V        |
//! | `blk.N.attn_output.weight`    | `layers.N.self_attn.out_proj.weight`                    |
//! | `blk.N.ffn_norm.weight`       | `layers.N.norm2.weight`                                 |
//! | `blk.N.ffn_{gate,up,down}.weight` | `layers.N.ff.{gate,up,down}_proj.weight`            |
//!
//! RoPE pairs: llama.cpp's converter permutes the rows of Llama's W_q and W_k so that each head
//! rotates adjacent pairs (its "NORM" RoPE type), where Hugging Face files rotate half-split
//! pairs. The rows are taken as they are and the model is built with
//! `rope_layout = interleaved`, which rotates the same pairs: the same function, no permutation
//! at load (a test checks it against the half-split model the file was made from).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use crate::data::Tokenizer;
use crate::models::{DecoderOnly, DecoderOnlyConfig, FamilyConfig};
use crate::nn::{Activation, InitScheme, MlpKind, NormKind, PositionalKind, RopeLayout, VarStore};
use crate::{Error, Result};

/// Architectures this importer builds.
pub const ARCHITECTURES: &[&str] = &["llama"];

/// An open GGUF file: its header (metadata and tensor table), checked against the file size.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Read the header and check that every tensor's bytes lie inside the file, so that a
    /// truncated download fails here, naming the first tensor cut off, before anything loads.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::Weights {
            source_name: path.display().to_string(),
            msg: format!("not a readable GGUF file: {e}"),
        })?;
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let block = info.ggml_dtype.block_size();
            let bytes = (info.shape.elem_count() / block * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(Error::Weights {
                    source_name: path.display().to_string(),
                    msg: format!(
                        "truncated: tensor {name} needs bytes up to {end}, the file has \
                         {file_len}"
                    ),
                });
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        match self.metadata("general.architecture") {
            Some(Value::String(s)) => Ok(s),
            other => Err(self.bad_key("general.architecture", "a string", other)),
        }
    }

    pub(crate) fn bad_key(&self, key: &str, expected: &str, got: Option<&Value>) -> Error {
        let actual = match got {
            None => "nothing (the key is absent)".to_string(),
            Some(v) => format!("{v:?}"),
        };
        Error::invalid(
            format!("{}: metadata {key}", self.path.display()),
            expected,
            actual,
        )
    }

    /// An integer of any width (converters differ in the type they write), at least `min`.
    pub(crate) fn int_key(&self, key: &str, min: i128) -> Result<Option<usize>> {
        let v = match self.metadata(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: Option<i128> = match v {
            Value::U8(x) => Some(*x as i128),
            Value::I8(x) => Some(*x as i128),
            Value::U16(x) => Some(*x as i128),
            Value::I16(x) => Some(*x as i128),
            Value::U32(x) => Some(*x as i128),
            Value::I32(x) => Some(*x as i128),
            Value::U64(x) => Some(*x as i128),
            Value::I64(x) => Some(*x as i128),
            _ => None,
        };
        match n {
            Some(n) if n >= min && n <= usize::MAX as i128 => Ok(Some(n as usize)),
            _ if min > 0 => Err(self.bad_key(key, "a positive integer", Some(v))),
            _ => Err(self.bad_key(key, "an integer >= 0", Some(v))),
        }
    }

    /// A positive integer of any width.
    fn usize_key(&self, key: &str) -> Result<Option<usize>> {
        self.int_key(key, 1)
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.usize_key(key)?
            .ok_or_else(|| self.bad_key(key, "a positive integer", None))
    }

    fn f64_key(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.bad_key(key, "a float", Some(v))),
        }
    }

    /// The tensor's shape (candle's `(out, in)` order), if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims())
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort();
        names
    }

    /// A tensor, dequantized into `dtype`, after checking its shape.
    pub fn dequantized(
        &mut self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let weights_err = |msg: String| Error::Weights {
            source_name: self.path.display().to_string(),
            msg,
        };
        match self.shape(name) {
            None => return Err(weights_err(format!("missing tensor {name}"))),
            Some(dims) if dims != expected => {
                return Err(weights_err(format!(
                    "tensor {name}: expected shape {expected:?} from the metadata, got {dims:?}"
                )))
            }
            Some(_) => {}
        }
        let q = self
            .content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| weights_err(format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?.to_dtype(dtype)?)
    }

    /// The decoder-only config the metadata describes.
    pub fn decoder_only_config(&self) -> Result<DecoderOnlyConfig> {
        let arch = self.architecture()?.to_string();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(Error::invalid(
                format!("{}: metadata general.architecture", self.path.display()),
                format!("one of {}", ARCHITECTURES.join(", ")),
                arch,
            ));
        }
        let k = |name: &str| format!("{arch}.{name}");
        if let Some(v) = self.metadata(&k("rope.scaling.type")) {
            if !matches!(v, Value::String(s) if s == "none") {
                return Err(self.bad_key(
                    &k("rope.scaling.type"),
                    "\"none\" (RoPE scaling is not supported yet)",
                    Some(v),
                ));
            }
        }
        let d_model = self.required_usize(&k("embedding_length"))?;
        let n_heads = self.required_usize(&k("attention.head_count"))?;
        let n_kv_heads = self.usize_key(&k("attention.head_count_kv"))?;
        let key_length = self.usize_key(&k("attention.key_length"))?;
        let vocab_size = match self.usize_key(&k("vocab_size"))? {
            Some(v) => v,
            None => match self.shape("token_embd.weight") {
                Some(&[v, _]) => v,
                _ => {
                    return Err(self.bad_key(
                        &k("vocab_size"),
                        "a positive integer, or a token_embd.weight of (vocab, d_model)",
                        None,
                    ))
                }
            },
        };
        let cfg = DecoderOnlyConfig {
            vocab_size,
            block_size: self.required_usize(&k("context_length"))?,
            d_model,
            n_heads,
            n_layers: self.required_usize(&k("block_count"))?,
            d_ff: self.required_usize(&k("feed_forward_length"))?,
            dropout: 0.0,
            activation: Activation::Silu,
            bias: false,
            positional: PositionalKind::Rope,
            rope_theta: self.f64_key(&k("rope.freq_base"))?.unwrap_or(10000.0),
            norm_first: true,
            tie_embeddings: self.shape("output.weight").is_none(),
            layer_norm_eps: self
                .f64_key(&k("attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| {
                    self.bad_key(&k("attention.layer_norm_rms_epsilon"), "a float", None)
                })?,
            init: InitScheme::Gpt2,
            norm: NormKind::RmsNorm,
            norm_unit_offset: false,
            mlp: MlpKind::Gated,
            n_kv_heads: n_kv_heads.filter(|&h| h != n_heads),
            head_dim: key_length.filter(|&d| d * n_heads != d_model),
            qk_norm: false,
            rope_layout: RopeLayout::Interleaved,
        };
        let source = self.path.display().to_string();
        FamilyConfig::validate(&cfg).map_err(|e| e.in_source(&source))?;
        // Our RoPE rotates the whole head; a partial rotary width is refused, not ignored.
        let head = cfg.layer().mha().head_width();
        if let Some(n_rot) = self.usize_key(&k("rope.dimension_count"))? {
            if n_rot != head {
                return Err(self.bad_key(
                    &k("rope.dimension_count"),
                    &format!("the head width {head} (partial rotary embeddings are not supported)"),
                    self.metadata(&k("rope.dimension_count")),
                ));
            }
        }
        Ok(cfg)
    }

    /// Every tensor under our names, dequantized into `dtype`, shapes checked against `cfg`;
    /// a tensor the model does not use is an error that names it.
    pub fn decoder_only_tensors(
        &mut self,
        cfg: &DecoderOnlyConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let (e, f, v) = (cfg.d_model, cfg.d_ff, cfg.vocab_size);
        let mha = cfg.layer().mha();
        let (h, hkv, d) = (cfg.n_heads, mha.kv_heads(), mha.head_width());
        let mut out = HashMap::new();
        let mut used: Vec<String> = Vec::new();
        let mut take = |file: &mut Self, gguf: String, shape: &[usize]| -> Result<Tensor> {
            let t = file.dequantized(&gguf, shape, dtype, device)?;
            used.push(gguf);
            Ok(t)
        };
        let embed = take(self, "token_embd.weight".into(), &[v, e])?;
        out.insert("tok_embed.weight".to_string(), embed);
        let norm = take(self, "output_norm.weight".into(), &[e])?;
        out.insert("norm.weight".to_string(), norm);
        if !cfg.tie_embeddings {
            let head = take(self, "output.weight".into(), &[v, e])?;
            out.insert("lm_head.weight".to_string(), head);
        }
        for n in 0..cfg.n_layers {
            let g = |s: &str| format!("blk.{n}.{s}.weight");
            let o = |s: &str| format!("layers.{n}.{s}.weight");
            out.insert(o("norm1"), take(self, g("attn_norm"), &[e])?);
            let q = take(self, g("attn_q"), &[h * d, e])?;
            let k = take(self, g("attn_k"), &[hkv * d, e])?;
            let val = take(self, g("attn_v"), &[hkv * d, e])?;
            // The packed projection: rows of Q, then K, then V.
            out.insert(o("self_attn.in_proj"), Tensor::cat(&[q, k, val], 0)?);
            out.insert(
                o("self_attn.out_proj"),
                take(self, g("attn_output"), &[e, h * d])?,
            );
            out.insert(o("norm2"), take(self, g("ffn_norm"), &[e])?);
            out.insert(o("ff.gate_proj"), take(self, g("ffn_gate"), &[f, e])?);
            out.insert(o("ff.up_proj"), take(self, g("ffn_up"), &[f, e])?);
            out.insert(o("ff.down_proj"), take(self, g("ffn_down"), &[e, f])?);
        }
        let unused: Vec<&str> = self
            .tensor_names()
            .into_iter()
            .filter(|n| !used.iter().any(|u| u == n))
            .collect();
        if !unused.is_empty() {
            return Err(Error::Weights {
                source_name: self.path.display().to_string(),
                msg: format!(
                    "tensors the {} model does not use: {}",
                    self.architecture()?,
                    unused.join(", ")
                ),
            });
        }
        Ok(out)
    }
}

impl GgufFile {
    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>> {
        let bad = |got| self.bad_key(key, "an array of strings", got);
        match self.metadata(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(bad(Some(other))),
                })
                .collect(),
            other => Err(bad(other)),
        }
    }

    /// `tokenizer.chat_template`, when the file has one (instruct models do).
    pub fn chat_template(&self) -> Result<Option<String>> {
        match self.metadata("tokenizer.chat_template") {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            other => Err(self.bad_key("tokenizer.chat_template", "a string", other)),
        }
    }

    /// The text of the token with the id at `key` (`tokenizer.ggml.bos_token_id`, ...).
    pub fn special_token(&self, key: &str) -> Result<Option<String>> {
        let Some(id) = self.int_key(key, 0)? else {
            return Ok(None);
        };
        // One entry of the token list, not a copy of all of it.
        let tokens_key = "tokenizer.ggml.tokens";
        let Some(Value::Array(tokens)) = self.metadata(tokens_key) else {
            return Err(self.bad_key(tokens_key, "an array of strings", self.metadata(tokens_key)));
        };
        match tokens.get(id) {
            Some(Value::String(t)) => Ok(Some(t.clone())),
            Some(other) => Err(self.bad_key(tokens_key, "an array of strings", Some(other))),
            None => Err(self.bad_key(
                key,
                &format!("a token id below {}", tokens.len()),
                self.metadata(key),
            )),
        }
    }

    /// The tokenizer the metadata describes: byte-level BPE (`gpt2`) or SentencePiece
    /// (`llama`); see [`super::gguf_tokenizer`].
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        super::gguf_tokenizer::from_gguf(self)
    }
}

/// A decoder-only model from a GGUF file, every tensor dequantized into `dtype`.
pub fn load_decoder_only(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(DecoderOnly, VarStore, DecoderOnlyConfig)> {
    GgufFile::open(path)?.decoder_only(device, dtype)
}

impl GgufFile {
    /// The decoder-only model of this file, every tensor dequantized into `dtype` (for callers
    /// that also read the tokenizer or template: the header is read once).
    pub fn decoder_only(
        &mut self,
        device: &Device,
        dtype: DType,
    ) -> Result<(DecoderOnly, VarStore, DecoderOnlyConfig)> {
        let cfg = self.decoder_only_config()?;
        let tensors = self.decoder_only_tensors(&cfg, dtype, device)?;
        let vs = FamilyConfig::var_store(&cfg, dtype, device, 0).for_inference();
        let model = FamilyConfig::build(&cfg, &vs.root())?;
        vs.load_map(&tensors, &self.path.display().to_string())?;
        Ok((model, vs, cfg))
    }
}
