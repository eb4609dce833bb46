//! Token embeddings and positional information: sinusoidal encodings (the paper), learned
//! position embeddings (GPT, BERT) and rotary embeddings (RoPE).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::linear::{Linear, Weight};
use super::var_store::{Init, VarPath};
use crate::autograd::ops;
use crate::{Error, Result};

/// A lookup table of token vectors, optionally scaled (by √d_model in the paper, §3.4, and
/// in Gemma). The table is dense, or quantized as a GGUF file stores it: then only the rows
/// looked up are dequantized, and a tied output projection multiplies by the same blocks.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    weight: Weight,
    scale: Option<f64>,
}

impl TokenEmbedding {
    /// Parameter: `weight` (vocab_size, d_model), initialized by the store's scheme.
    pub fn new(
        vocab_size: usize,
        d_model: usize,
        scale_by_sqrt_d: bool,
        vp: &VarPath,
    ) -> Result<Self> {
        Self::with_init(
            vocab_size,
            d_model,
            scale_by_sqrt_d,
            Init::Weight { residual: false },
            vp,
        )
    }

    /// [`TokenEmbedding::new`] with an explicit initialization of the table.
    pub fn with_init(
        vocab_size: usize,
        d_model: usize,
        scale_by_sqrt_d: bool,
        init: Init,
        vp: &VarPath,
    ) -> Result<Self> {
        let weight = vp.matrix("weight", &[vocab_size, d_model], init)?;
        Ok(TokenEmbedding {
            weight,
            scale: scale_by_sqrt_d.then(|| (d_model as f64).sqrt()),
        })
    }

    /// The table (vocab_size, d_model), e.g. to tie an output projection to it.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// An output projection tied to the table: logits = x Eᵀ, sharing its storage (and, for
    /// a dense table, its gradient).
    pub fn as_linear(&self) -> Linear {
        Linear::from_weight(self.weight.clone(), None)
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn d_model(&self) -> usize {
        self.weight.dims()[1]
    }

    /// # Shapes
    /// `ids`: (B, T) integer ids → (B, T, d_model)
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids
            .dims2()
            .map_err(|_| Error::shape("token ids", "(B, T)", ids.dims()))?;
        if b * t == 0 {
            // candle cannot reduce an empty tensor; say what is wrong instead.
            return Err(Error::shape(
                "token ids",
                "(B, T) with B, T >= 1",
                ids.dims(),
            ));
        }
        let v = self.vocab_size();
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
        let max = ids.max(0)?.to_scalar::<u32>().unwrap_or(0);
        if max as usize >= v {
            return Err(Error::input(
                format!("token id {max}"),
                format!("an id in range for a vocabulary of {v}"),
                max.to_string(),
            ));
        }
        let d = self.d_model();
        let x = match &self.weight {
            Weight::Dense(w) => ops::index_select(w, &ids, 0)?,
            Weight::Quantized(q) => quantized_rows(q, &ids.to_vec1::<u32>()?, d)?,
            Weight::Blocks(bm) => {
                let ids = ids.to_vec1::<u32>()?;
                let n = ids.len();
                // The block kernels' tables live in host memory.
                Tensor::from_vec(bm.rows(&ids)?, (n, d), &Device::Cpu)?
            }
        };
        let x = ops::reshape(&x, (b, t, d))?;
        Ok(match self.scale {
            Some(s) => ops::affine(&x, s, 0.0)?,
            None => x,
        })
    }
}

/// Rows `ids` of a quantized (V, d) table, dequantized to f32 (ids.len(), d): each row is a
/// whole number of blocks, so the rows' bytes are gathered and dequantized together.
fn quantized_rows(q: &QTensor, ids: &[u32], d: usize) -> Result<Tensor> {
    let dtype = q.dtype();
    let row_bytes = d / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut bytes = Vec::with_capacity(ids.len() * row_bytes);
    for &id in ids {
        let start = id as usize * row_bytes;
        bytes.extend_from_slice(&data[start..start + row_bytes]);
    }
    let rows = qtensor_from_ggml(dtype, &bytes, vec![ids.len(), d], &q.device())?;
    Ok(rows.dequantize(&q.device())?)
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PositionalKind {
    /// Fixed sin/cos of geometric frequencies, added to the embeddings (the paper, §3.5).
    #[default]
    Sinusoidal,
    /// A learned table added to the embeddings (GPT-2, BERT).
    Learned,
    /// Rotary embeddings applied to queries and keys in every attention layer.
    Rope,
    /// No positional information.
    None,
}

/// The paper's table: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
pub fn sinusoidal_table(
    max_len: usize,
    d_model: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut v = vec![0f32; max_len * d_model];
    for pos in 0..max_len {
        for i in (0..d_model).step_by(2) {
            let freq = (-(i as f64) * (10000f64).ln() / d_model as f64).exp();
            let a = pos as f64 * freq;
            v[pos * d_model + i] = a.sin() as f32;
            if i + 1 < d_model {
                v[pos * d_model + i + 1] = a.cos() as f32;
            }
        }
    }
    Ok(Tensor::from_vec(v, (max_len, d_model), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Whisper's encoder positions (openai-whisper's `sinusoids`): the sines of all D/2
/// frequencies, then their cosines, with timescales from 1 to 10000 spaced geometrically:
/// PE(pos, i) = sin(pos · 10000^(−i/(D/2 − 1))), PE(pos, D/2 + i) = cos(the same).
pub fn whisper_sinusoids(
    max_len: usize,
    d_model: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let half = d_model / 2;
    let increment = (10000f64).ln() / (half.max(2) - 1) as f64;
    let mut v = vec![0f32; max_len * d_model];
    for pos in 0..max_len {
        for i in 0..half {
            let a = pos as f64 * (-increment * i as f64).exp();
            v[pos * d_model + i] = a.sin() as f32;
            v[pos * d_model + half + i] = a.cos() as f32;
        }
    }
    Ok(Tensor::from_vec(v, (max_len, d_model), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Additive absolute positions (sinusoidal or learned).
#[derive(Debug, Clone)]
pub struct AbsolutePositions {
    /// (max_len, d_model)
    table: Tensor,
}

impl AbsolutePositions {
    pub fn sinusoidal(max_len: usize, d_model: usize, vp: &VarPath) -> Result<Self> {
        Ok(AbsolutePositions {
            table: sinusoidal_table(max_len, d_model, vp.dtype(), vp.device())?,
        })
    }

    /// Parameter: `weight` (max_len, d_model).
    pub fn learned(max_len: usize, d_model: usize, vp: &VarPath) -> Result<Self> {
        Ok(AbsolutePositions {
            table: vp.var(
                "weight",
                &[max_len, d_model],
                Init::Weight { residual: false },
            )?,
        })
    }

    /// Parameter `weight` (max_len, d_model), starting from `table` instead of random values
    /// (Whisper's encoder positions start from its sinusoids, [`whisper_sinusoids`]).
    pub fn learned_from(table: &Tensor, vp: &VarPath) -> Result<Self> {
        let (max_len, d_model) = table.dims2()?;
        let name = if vp.prefix().is_empty() {
            "weight".to_string()
        } else {
            format!("{}.weight", vp.prefix())
        };
        // A store built from a checkpoint's values keeps the checkpoint's table.
        let given = vp.store().has_value(&name);
        let weight = vp.var("weight", &[max_len, d_model], Init::Zeros)?;
        if let (false, Some(var)) = (given, vp.store().get(&name)) {
            var.set(&table.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(AbsolutePositions { table: weight })
    }

    pub fn max_len(&self) -> usize {
        self.table.dims()[0]
    }

    /// Add the encodings of positions `offset .. offset + T`.
    ///
    /// # Shapes
    /// `x`: (B, T, d_model) → (B, T, d_model)
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        if offset + t > self.max_len() {
            return Err(Error::input(
                "sequence length",
                format!(
                    "at most the model's maximum length (max_len) {}",
                    self.max_len()
                ),
                format!("{} positions", offset + t),
            ));
        }
        Ok(ops::broadcast_add(
            x,
            &ops::narrow(&self.table, 0, offset, t)?,
        )?)
    }
}

/// Which coordinates of a head RoPE rotates together. Both rotate pair `i` by
/// `position · θ^(-2i/D)`; they differ in where the pair's two coordinates sit, which must
/// match how the checkpoint laid out the rows of W_q and W_k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Pair `i` is `(x[i], x[i + D/2])`: "rotate half" (GPT-NeoX, Hugging Face Llama, Gemma;
    /// llama.cpp's NEOX type).
    #[default]
    HalfSplit,
    /// Pair `i` is `(x[2i], x[2i + 1])`: the original paper's, and what llama.cpp's converter
    /// gives Llama-architecture GGUF files by permuting the rows of W_q and W_k (its NORM type).
    Interleaved,
}

/// Rotary position embedding (Su et al. 2021), in either pair layout ([`RopeLayout`]).
///
/// The angles of the first [`ROPE_TABLE_ROWS`] positions are tabulated; positions past the
/// table (long contexts: Gemma 3 has 32k) are computed when asked for, so that a model's
/// context length does not cost its whole table in memory.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (rows, D/2)
    cos: Tensor,
    /// (rows, D/2)
    sin: Tensor,
    layout: RopeLayout,
    head_dim: usize,
    theta: f64,
    max_len: usize,
}

/// Positions whose RoPE angles are kept in a table.
pub const ROPE_TABLE_ROWS: usize = 4096;

impl Rope {
    pub fn new(
        head_dim: usize,
        max_len: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "RoPE needs an even head width, got {head_dim}"
            )));
        }
        let rows = max_len.min(ROPE_TABLE_ROWS);
        let (cos, sin) = Self::angles(head_dim, theta, 0, rows, dtype, device)?;
        Ok(Rope {
            cos,
            sin,
            layout: RopeLayout::HalfSplit,
            head_dim,
            theta,
            max_len,
        })
    }

    /// cos and sin of positions `start .. start + n`, (n, D/2) each.
    fn angles(
        head_dim: usize,
        theta: f64,
        start: usize,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = head_dim / 2;
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for p in 0..n {
            for i in 0..half {
                let freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let a = (start + p) as f64 * freq;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let mk = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (n, half), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// The base θ of the frequencies θ^(-2i/D).
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The same rotation with the given pair layout.
    pub fn with_layout(mut self, layout: RopeLayout) -> Self {
        self.layout = layout;
        self
    }

    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rotate positions `offset .. offset + T`.
    ///
    /// # Shapes
    /// `x`: (B, H, T, D) → (B, H, T, D)
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        if offset + t > self.max_len() {
            return Err(Error::input(
                "sequence length",
                format!("at most the RoPE table length {}", self.max_len()),
                format!("{} positions", offset + t),
            ));
        }
        let half = d / 2;
        if d != self.head_dim {
            return Err(Error::shape(
                "RoPE input",
                format!("(B, H, T, {})", self.head_dim),
                x.dims(),
            ));
        }
        // (T, D/2) each
        let (cos, sin) = if offset + t <= self.cos.dims()[0] {
            (
                ops::narrow(&self.cos, 0, offset, t)?,
                ops::narrow(&self.sin, 0, offset, t)?,
            )
        } else {
            let dtype = self.cos.dtype();
            let (cos, sin) = Self::angles(d, self.theta, offset, t, dtype, self.cos.device())?;
            (
                crate::autograd::constant(cos),
                crate::autograd::constant(sin),
            )
        };
        // x1·cos − x2·sin, x2·cos + x1·sin
        let rotate = |x1: &Tensor, x2: &Tensor| -> Result<(Tensor, Tensor)> {
            let r1 = ops::sub(
                &ops::broadcast_mul(x1, &cos)?,
                &ops::broadcast_mul(x2, &sin)?,
            )?;
            let r2 = ops::add(
                &ops::broadcast_mul(x2, &cos)?,
                &ops::broadcast_mul(x1, &sin)?,
            )?;
            Ok((r1, r2))
        };
        match self.layout {
            RopeLayout::HalfSplit => {
                let x1 = ops::narrow(x, D::Minus1, 0, half)?;
                let x2 = ops::narrow(x, D::Minus1, half, half)?;
                let (r1, r2) = rotate(&x1, &x2)?;
                Ok(ops::cat(&[&r1, &r2], r1.rank() - 1)?)
            }
            RopeLayout::Interleaved => {
                let (b, h, _, _) = x.dims4()?;
                // (B, H, T, D) -> (B, H, T, D/2, 2): the pairs along the last axis.
                let pairs = ops::reshape(x, (b, h, t, half, 2))?;
                let x1 = ops::squeeze(&ops::narrow(&pairs, 4, 0, 1)?, 4)?; // (B, H, T, D/2)
                let x2 = ops::squeeze(&ops::narrow(&pairs, 4, 1, 1)?, 4)?;
                let (r1, r2) = rotate(&x1, &x2)?;
                // (B, H, T, D/2, 2) -> (B, H, T, D)
                Ok(ops::reshape(&ops::stack(&[&r1, &r2], 4)?, (b, h, t, d))?)
            }
        }
    }
}

#[cfg(test)]
mod rope_tests {
    use super::*;

    /// Positions past the tabulated rows are computed when asked for, with the same angles:
    /// a chunk that crosses the table's end equals the rotation written out by hand.
    #[test]
    fn positions_past_the_table_rotate_as_the_formula_says() {
        let (d, theta) = (8, 500.0);
        let rope = Rope::new(d, ROPE_TABLE_ROWS + 100, theta, DType::F64, &Device::Cpu).unwrap();
        let mut rng = crate::rng::Rng::new(5);
        let x = crate::kernels::tests::randn(&mut rng, &[1, 1, 4, d], DType::F64);
        let offset = ROPE_TABLE_ROWS - 2;
        let got = rope.apply(&x, offset).unwrap().flatten_all().unwrap();
        let got = got.to_vec1::<f64>().unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for t in 0..4 {
            for i in 0..d / 2 {
                let a = (offset + t) as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
                let (x1, x2) = (xs[t * d + i], xs[t * d + i + d / 2]);
                let want = [x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()];
                for (k, w) in want.iter().enumerate() {
                    let g = got[t * d + i + k * d / 2];
                    // The angles are rounded to f32 like the table's.
                    assert!(
                        (g - w).abs() < 1e-5,
                        "position {}, pair {i}: {g} vs {w}",
                        offset + t
                    );
                }
            }
        }
        assert!(
            rope.apply(&x, ROPE_TABLE_ROWS + 97).is_err(),
            "past max_len"
        );
    }

    /// Interleaved RoPE on a head whose coordinates were permuted as llama.cpp's converter
    /// permutes W_q and W_k rows (`2j + s` ← `s·D/2 + j`) equals half-split RoPE on the
    /// original head, permuted the same way; so q·k, and attention, are unchanged.
    #[test]
    fn interleaved_layout_is_half_split_on_permuted_coordinates() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let mut rng = crate::rng::Rng::new(31);
        let x = crate::kernels::tests::randn(&mut rng, &[b, h, t, d], DType::F64);
        let half = Rope::new(d, 16, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let inter = half.clone().with_layout(RopeLayout::Interleaved);
        // perm[2j + s] = s·D/2 + j
        let perm: Vec<u32> = (0..d).map(|r| ((r % 2) * d / 2 + r / 2) as u32).collect();
        let perm = Tensor::new(perm.as_slice(), &Device::Cpu).unwrap();
        let permute = |x: &Tensor| x.index_select(&perm, 3).unwrap();
        for offset in [0, 3] {
            let want = permute(&half.apply(&x, offset).unwrap());
            let got = inter.apply(&permute(&x), offset).unwrap();
            let diff = crate::kernels::tests::max_diff(&got, &want);
            assert!(diff < 1e-12, "offset {offset}: {diff}");
        }
        // And it is a rotation: lengths are kept (to the f32 precision of the cos/sin table).
        let y = inter.apply(&x, 2).unwrap();
        let sq = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!((sq(&y) / sq(&x) - 1.0).abs() < 1e-6);
        assert_ne!(inter.layout(), half.layout());
    }
}
