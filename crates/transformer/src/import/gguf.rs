//! GGUF (llama.cpp's format) → a [`DecoderOnly`] model, read with candle's
//! `quantized::gguf_file`: the architecture and hyperparameters come from the metadata, the
//! tensors from llama.cpp's names mapped onto ours. [`WeightFormat::AsStored`] keeps the
//! quantized matrices quantized (our kernel for the 32-element block formats, candle's
//! quantized matmul for the k-quants; F32 tensors dense); [`WeightFormat::Dense`] dequantizes
//! everything into a dtype (trainable).
//!
//! Architectures: `llama` (SmolLM2, Llama 2/3 without RoPE scaling) and `gemma3` (Gemma 3
//! text models without RoPE scaling: the 270M and 1B). Others are refused by name.
//!
//! Gemma 3 is the same decoder with: GELU-tanh gated MLP, per-head query/key RMS norms, a
//! second ("sandwich") norm on each sub-layer's output, embeddings scaled by √d_model, five
//! sliding-window layers (window `gemma3.attention.sliding_window`, RoPE base 10000) for every
//! global one (RoPE base `rope.freq_base`), half-split RoPE pairs, and a tied output. Its
//! converter stores each RMS norm weight w as 1 + w, so the norms take the weights as they
//! are. Extra tensors: `blk.N.attn_{q,k}_norm` → `layers.N.self_attn.{q,k}_norm`,
//! `blk.N.post_attention_norm` → `layers.N.post_norm1`, `blk.N.post_ffw_norm` →
//! `layers.N.post_norm2`.
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
//! | `blk.N.attn_{q,k,v}.weight`   | `layers.N.self_attn.{q,k,v}_proj.weight` (quantized), or |
//! |                               | packed into `layers.N.self_attn.in_proj.weight` (dense)  |
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
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::data::Tokenizer;
use crate::kernels::quantized::{BlockKind, BlockMatrix};
use crate::models::{DecoderOnly, DecoderOnlyConfig, FamilyConfig, LayerAttention};
use crate::nn::linear::Weight;
use crate::nn::{Activation, InitScheme, MlpKind, NormKind, PositionalKind, RopeLayout, VarStore};
use crate::{Error, Result};

/// Architectures this importer builds.
pub const ARCHITECTURES: &[&str] = &["llama", "gemma3"];

/// Gemma 3's layer pattern, fixed by the architecture (llama.cpp and transformers hard-code
/// it; the file does not say): five sliding-window layers, then a global one.
const GEMMA3_GLOBAL_EVERY: usize = 6;
/// Gemma 3's RoPE base on its sliding-window layers (the file's `rope.freq_base` is the
/// global layers').
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10000.0;

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

    /// Every tensor's name, block type and shape (candle's `(out, in)` order), sorted by name.
    pub fn tensor_infos(&self) -> Vec<(&str, GgmlDType, &[usize])> {
        let mut infos: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n.as_str(), i.ggml_dtype, i.shape.dims()))
            .collect();
        infos.sort_by_key(|(n, _, _)| *n);
        infos
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
            post_norm: false,
            embed_scale: false,
            layer_types: Vec::new(),
            sliding_window: None,
            rope_local_theta: None,
        };
        let cfg = match arch.as_str() {
            "gemma3" => {
                let n_layers = cfg.n_layers;
                let window = self.required_usize(&k("attention.sliding_window"))?;
                DecoderOnlyConfig {
                    activation: Activation::GeluTanh,
                    // Gemma rotates half-split pairs (llama.cpp's NEOX type): the converter
                    // leaves W_q and W_k as they are.
                    rope_layout: RopeLayout::HalfSplit,
                    // The converter stores Gemma's RMSNorm weights w as 1 + w already.
                    norm_unit_offset: false,
                    qk_norm: true,
                    post_norm: true,
                    embed_scale: true,
                    layer_types: (0..n_layers)
                        .map(|i| {
                            if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 {
                                LayerAttention::Full
                            } else {
                                LayerAttention::Sliding
                            }
                        })
                        .collect(),
                    sliding_window: Some(window),
                    rope_local_theta: Some(GEMMA3_LOCAL_ROPE_THETA),
                    ..cfg
                }
            }
            _ => cfg,
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

    /// Every tensor the decoder-only model of `cfg` reads: (GGUF name, our name, shape), with
    /// Q, K and V under separate names (`self_attn.{q,k,v}_proj.weight`).
    fn decoder_only_names(cfg: &DecoderOnlyConfig) -> Vec<(String, String, Vec<usize>)> {
        let (e, f, v) = (cfg.d_model, cfg.d_ff, cfg.vocab_size);
        let mha = cfg.layer().mha();
        let (h, hkv, d) = (cfg.n_heads, mha.kv_heads(), mha.head_width());
        let mut names = vec![
            (
                "token_embd".to_string(),
                "tok_embed".to_string(),
                vec![v, e],
            ),
            ("output_norm".into(), "norm".into(), vec![e]),
        ];
        if !cfg.tie_embeddings {
            names.push(("output".into(), "lm_head".into(), vec![v, e]));
        }
        for n in 0..cfg.n_layers {
            let layer = [
                ("attn_norm", "norm1", vec![e]),
                ("attn_q", "self_attn.q_proj", vec![h * d, e]),
                ("attn_k", "self_attn.k_proj", vec![hkv * d, e]),
                ("attn_v", "self_attn.v_proj", vec![hkv * d, e]),
                ("attn_output", "self_attn.out_proj", vec![e, h * d]),
                ("ffn_norm", "norm2", vec![e]),
                ("ffn_gate", "ff.gate_proj", vec![f, e]),
                ("ffn_up", "ff.up_proj", vec![f, e]),
                ("ffn_down", "ff.down_proj", vec![e, f]),
            ];
            let qk_norms = [
                ("attn_q_norm", "self_attn.q_norm", vec![d]),
                ("attn_k_norm", "self_attn.k_norm", vec![d]),
            ];
            let post_norms = [
                ("post_attention_norm", "post_norm1", vec![e]),
                ("post_ffw_norm", "post_norm2", vec![e]),
            ];
            let layer = layer
                .into_iter()
                .chain(qk_norms.into_iter().filter(|_| cfg.qk_norm))
                .chain(post_norms.into_iter().filter(|_| cfg.post_norm));
            for (g, o, shape) in layer {
                names.push((format!("blk.{n}.{g}"), format!("layers.{n}.{o}"), shape));
            }
        }
        names
            .into_iter()
            .map(|(g, o, shape)| (format!("{g}.weight"), format!("{o}.weight"), shape))
            .collect()
    }

    fn weights_err(&self, msg: String) -> Error {
        Error::Weights {
            source_name: self.path.display().to_string(),
            msg,
        }
    }

    /// That the file has tensor `name` with the shape the metadata implies.
    fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        match self.shape(name) {
            None => Err(self.weights_err(format!("missing tensor {name}"))),
            Some(dims) if dims != expected => Err(self.weights_err(format!(
                "tensor {name}: expected shape {expected:?} from the metadata, got {dims:?}"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// A tensor as the file stores it, after checking its shape against the metadata's.
    fn stored(&mut self, name: &str, expected: &[usize], device: &Device) -> Result<QTensor> {
        self.check_shape(name, expected)?;
        let weights_err = |msg: String| Error::Weights {
            source_name: self.path.display().to_string(),
            msg,
        };
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| weights_err(format!("tensor {name}: {e}")))
    }

    /// A tensor in one of our block kernels' formats, read from the file straight into
    /// them ([`BlockMatrix::from_reader`]); `None` for other types.
    fn block_matrix(&mut self, name: &str, expected: &[usize]) -> Result<Option<BlockMatrix>> {
        self.check_shape(name, expected)?;
        let source = self.path.display().to_string();
        let err = |msg: String| Error::Weights {
            source_name: source.clone(),
            msg,
        };
        let info = &self.content.tensor_infos[name];
        if BlockKind::of(info.ggml_dtype).is_none() || expected.len() != 2 {
            return Ok(None);
        }
        let start = self.content.tensor_data_offset + info.offset;
        let dtype = info.ggml_dtype;
        self.reader
            .seek(SeekFrom::Start(start))
            .map_err(|e| err(format!("tensor {name}: {e}")))?;
        BlockMatrix::from_reader(dtype, expected[0], expected[1], &mut self.reader)
            .map_err(|e| err(format!("tensor {name}: {e}")))
    }

    /// A tensor the model does not use is an error that names it.
    fn check_all_used(&self, used: &[String]) -> Result<()> {
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
        Ok(())
    }

    /// Every tensor under our names, shapes checked against `cfg`, in `format`: dense tensors
    /// for the store to load, and the quantized matrices it serves as they are
    /// ([`VarStore::with_quantized`]; none when dequantizing). Dense Q, K and V are packed
    /// into `self_attn.in_proj.weight` (rows Q, K, V).
    pub fn decoder_only_tensors(
        &mut self,
        cfg: &DecoderOnlyConfig,
        format: impl Into<WeightFormat>,
        device: &Device,
    ) -> Result<DecoderOnlyTensors> {
        let format = format.into();
        let mut out = DecoderOnlyTensors::default();
        let mut used = Vec::new();
        for (gguf, ours, shape) in Self::decoder_only_names(cfg) {
            if format == WeightFormat::AsStored && device.is_cpu() {
                if let Some(b) = self.block_matrix(&gguf, &shape)? {
                    out.quantized.insert(ours, Weight::Blocks(Arc::new(b)));
                    used.push(gguf);
                    continue;
                }
            }
            let q = self.stored(&gguf, &shape, device)?;
            used.push(gguf);
            let block_quantized =
                !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            match format {
                WeightFormat::AsStored if block_quantized => {
                    out.quantized.insert(ours, Weight::from_qtensor(q)?);
                }
                WeightFormat::AsStored => {
                    out.dense.insert(ours, q.dequantize(device)?);
                }
                WeightFormat::Dense(dtype) => {
                    out.dense
                        .insert(ours, q.dequantize(device)?.to_dtype(dtype)?);
                }
            }
        }
        self.check_all_used(&used)?;
        // Q, K and V that all stay dense go into the packed projection.
        for n in 0..cfg.n_layers {
            let name = |p: &str| format!("layers.{n}.self_attn.{p}_proj.weight");
            let qkv: Vec<String> = ["q", "k", "v"].iter().map(|p| name(p)).collect();
            if qkv.iter().all(|k| out.dense.contains_key(k)) {
                let parts: Vec<Tensor> = qkv
                    .iter()
                    .map(|k| out.dense.remove(k).expect("checked above"))
                    .collect();
                out.dense.insert(
                    format!("layers.{n}.self_attn.in_proj.weight"),
                    Tensor::cat(&parts, 0)?,
                );
            }
        }
        Ok(out)
    }
}

/// How a GGUF file's weights are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// As the file stores them: block-quantized matrices stay quantized (candle's quantized
    /// matmul), F32/F16/BF16 tensors become f32 tensors. Inference only.
    AsStored,
    /// Every tensor dequantized into this dtype (trainable).
    Dense(DType),
}

impl From<DType> for WeightFormat {
    fn from(dtype: DType) -> Self {
        WeightFormat::Dense(dtype)
    }
}

impl WeightFormat {
    /// The dtype of the model's activations and dense parameters.
    pub fn dtype(&self) -> DType {
        match self {
            WeightFormat::AsStored => DType::F32,
            WeightFormat::Dense(d) => *d,
        }
    }
}

/// A decoder-only model's tensors under our names (see [`GgufFile::decoder_only_tensors`]).
#[derive(Debug, Default)]
pub struct DecoderOnlyTensors {
    /// What the [`VarStore`] loads.
    pub dense: HashMap<String, Tensor>,
    /// What it serves quantized.
    pub quantized: HashMap<String, Weight>,
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

/// A decoder-only model from a GGUF file, its weights in `format` (a [`DType`] dequantizes
/// every tensor into it; [`WeightFormat::AsStored`] keeps quantized matrices quantized).
pub fn load_decoder_only(
    path: &Path,
    device: &Device,
    format: impl Into<WeightFormat>,
) -> Result<(DecoderOnly, VarStore, DecoderOnlyConfig)> {
    GgufFile::open(path)?.decoder_only(device, format)
}

impl GgufFile {
    /// The decoder-only model of this file, its weights in `format` (for callers that also
    /// read the tokenizer or template: the header is read once).
    pub fn decoder_only(
        &mut self,
        device: &Device,
        format: impl Into<WeightFormat>,
    ) -> Result<(DecoderOnly, VarStore, DecoderOnlyConfig)> {
        let format = format.into();
        let cfg = self.decoder_only_config()?;
        let tensors = self.decoder_only_tensors(&cfg, format, device)?;
        let vs = FamilyConfig::var_store(&cfg, format.dtype(), device, 0)
            .for_inference()
            .with_quantized(tensors.quantized);
        let model = FamilyConfig::build(&cfg, &vs.root())?;
        vs.load_map(&tensors.dense, &self.path.display().to_string())?;
        Ok((model, vs, cfg))
    }
}
