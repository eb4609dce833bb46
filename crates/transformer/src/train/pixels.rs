//! Image generation training: a decoder-only model learns labelled grey images as pixel-token
//! sequences ([`crate::data::pixel_tokens`]), the class token first, scored on the pixels in
//! nats per pixel (bits per pixel = nats / ln 2).
//!
//! Training images are visited once per epoch in a fresh random order by the same
//! [`EpochSampler`] as image classification, so a resumed run continues exactly.
//!
//! Dimension letters: `B` batch, `N` pixels per image (`side²`), `V` vocabulary.

use candle_core::{DType, Device, Tensor};

use super::images::EpochSampler;
use super::loss::{cross_entropy, CrossEntropyConfig};
use super::parallel::Shard;
use super::trainer::{Evaluation, Task};
use crate::data::idx::LabelledImages;
use crate::data::pixel_tokens::PixelTokens;
use crate::kernels::on_pool;
use crate::models::CausalLm;
use crate::rng::Rng;
use crate::{Error, Result};

/// The inputs and targets of images `indices`: inputs are the class token and every pixel but
/// the last, targets every pixel.
///
/// # Shapes
/// → inputs (B, N) u32, targets (B, N) u32
pub fn pixel_batch(
    images: &LabelledImages,
    tokens: &PixelTokens,
    indices: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = tokens.pixels();
    let mut x = Vec::with_capacity(indices.len() * n);
    let mut y = Vec::with_capacity(indices.len() * n);
    for &i in indices {
        let (bytes, label) = images.bytes(i)?;
        let seq = tokens.sequence(bytes, label as usize)?;
        x.extend_from_slice(&seq[..n]);
        y.extend_from_slice(&seq[1..]);
    }
    let shape = (indices.len(), n);
    Ok((
        Tensor::from_vec(x, shape, device)?,
        Tensor::from_vec(y, shape, device)?,
    ))
}

/// Mean negative log-likelihood in nats per pixel of images `indices` under `model`, `batch`
/// images per forward pass (exact: every pixel of every image counts once).
pub fn nats_per_pixel(
    model: &dyn CausalLm,
    images: &LabelledImages,
    tokens: &PixelTokens,
    indices: &[usize],
    batch: usize,
    device: &Device,
) -> Result<f64> {
    if indices.is_empty() {
        return Err(Error::msg("no images to score"));
    }
    tokens.check_model(model.vocab_size(), model.context_length())?;
    let plain = CrossEntropyConfig::default();
    let mut sum = 0.0;
    on_pool(|| -> Result<()> {
        for chunk in indices.chunks(batch.max(1)) {
            let (x, y) = pixel_batch(images, tokens, chunk, device)?;
            let logits = model.forward(&x, false)?.detach(); // (B, N, V)
            let loss = cross_entropy(&logits, &y, &plain)?;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
        }
        Ok(())
    })?;
    Ok(sum / indices.len() as f64)
}

/// `data.kind = "pixels"`: class-conditional pixel-sequence modelling.
pub struct PixelLmTask {
    pub model: Box<dyn CausalLm>,
    pub images: LabelledImages,
    pub tokens: PixelTokens,
    pub sampler: EpochSampler,
    /// Indices of the training images (the sampler draws positions in it).
    pub train: Vec<usize>,
    /// Indices of the validation images.
    pub val: Vec<usize>,
    pub batch_size: usize,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

impl Task for PixelLmTask {
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> Result<(Tensor, usize)> {
        let (batch, _seed) = self.sampler.next(rng)?;
        let all: Vec<usize> = batch.iter().map(|&j| self.train[j]).collect();
        let indices = &all[shard.rows(all.len())];
        if indices.is_empty() {
            return Shard::empty_loss(&self.device);
        }
        let (x, y) = pixel_batch(&self.images, &self.tokens, indices, &self.device)?;
        let logits = self.model.forward(&x, true)?; // (B, N, V)
        let loss = cross_entropy(&logits, &y, &self.loss)?;
        Ok((loss, indices.len() * self.tokens.pixels()))
    }

    /// Nats per pixel over the whole validation set; `rng` and `iters` are not needed because
    /// the set is fixed.
    fn eval_loss(&mut self, _rng: &mut Rng, _iters: usize) -> Result<f64> {
        if self.val.is_empty() {
            return Err(Error::msg(
                "the validation set is empty (set data.n_val >= 1)",
            ));
        }
        nats_per_pixel(
            self.model.as_ref(),
            &self.images,
            &self.tokens,
            &self.val,
            self.batch_size,
            &self.device,
        )
    }

    fn evaluate(&mut self, rng: &mut Rng, iters: usize) -> Result<Evaluation> {
        Ok(Evaluation {
            loss: self.eval_loss(rng, iters)?,
            accuracy: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> LabelledImages {
        LabelledImages {
            height: 2,
            width: 2,
            pixels: vec![0, 255, 128, 16, 255, 255, 0, 0],
            labels: vec![1, 0],
        }
    }

    #[test]
    fn batch_shifts_the_sequence_by_one() -> Result<()> {
        let imgs = images();
        let t = PixelTokens::for_images(&imgs, 16, 1)?;
        let (x, y) = pixel_batch(&imgs, &t, &[0, 1], &Device::Cpu)?;
        // Class tokens 16 + label; 128 → level 8, 16 → level 1.
        assert_eq!(
            x.to_vec2::<u32>()?,
            vec![vec![17, 0, 15, 8], vec![16, 15, 15, 0]]
        );
        assert_eq!(
            y.to_vec2::<u32>()?,
            vec![vec![0, 15, 8, 1], vec![15, 15, 0, 0]]
        );
        assert!(pixel_batch(&imgs, &t, &[2], &Device::Cpu).is_err());
        Ok(())
    }
}
