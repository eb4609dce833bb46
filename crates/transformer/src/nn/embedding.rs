//! Token embeddings and positional information: sinusoidal encodings (the paper), learned
//! position embeddings (GPT, BERT) and rotary embeddings (RoPE).

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::var_store::{Init, VarPath};
use crate::{Error, Result};

/// A lookup table of token vectors, optionally scaled by √d_model as in the paper (§3.4).
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    weight: Tensor,
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
        let weight = vp.var("weight", &[vocab_size, d_model], init)?;
        Ok(TokenEmbedding {
            weight,
            scale: scale_by_sqrt_d.then(|| (d_model as f64).sqrt()),
        })
    }

    /// The table (vocab_size, d_model), e.g. to tie an output projection to it.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
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
        let ids = ids.to_dtype(DType::U32)?;
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>().unwrap_or(0);
        if max as usize >= v {
            return Err(Error::input(
                format!("token id {max}"),
                format!("an id in range for a vocabulary of {v}"),
                max.to_string(),
            ));
        }
        let x = self.weight.index_select(&ids.flatten_all()?, 0)?;
        let x = x.reshape((b, t, self.weight.dims()[1]))?;
        Ok(match self.scale {
            Some(s) => (x * s)?,
            None => x,
        })
    }
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
        Ok(x.broadcast_add(&self.table.narrow(0, offset, t)?)?)
    }
}

/// Rotary position embedding (Su et al. 2021), in the "rotate half" layout (GPT-NeoX, LLaMA):
/// the first and second halves of each head form the rotated pairs.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (max_len, D/2)
    cos: Tensor,
    /// (max_len, D/2)
    sin: Tensor,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_len: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "RoPE needs an even head width, got {head_dim}"
            )));
        }
        let half = head_dim / 2;
        let mut cos = vec![0f32; max_len * half];
        let mut sin = vec![0f32; max_len * half];
        for p in 0..max_len {
            for i in 0..half {
                let freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let a = p as f64 * freq;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let mk = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (max_len, half), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        Ok(Rope {
            cos: mk(cos)?,
            sin: mk(sin)?,
        })
    }

    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
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
        let cos = self.cos.narrow(0, offset, t)?; // (T, D/2)
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    }
}
