//! Class-conditional image generation from a decoder-only model trained on pixel tokens
//! ([`crate::data::pixel_tokens`]): the class token first, then one grey level per pixel in
//! raster order, each drawn from the model's distribution over the grey tokens only.

use candle_core::{DType, Device, Tensor};

use super::sampling::{sample_token, Sampling};
use crate::data::pixel_tokens::PixelTokens;
use crate::kernels::on_pool;
use crate::models::CausalLm;
use crate::rng::Rng;
use crate::Result;

/// One image per entry of `labels`, all decoded together (one row each, one cache), pixel by
/// pixel; every pixel is drawn with `sampling` from the logits of the grey tokens (the class
/// tokens are never drawn). Returns `side²` bytes per image, row-major.
pub fn sample_images(
    model: &dyn CausalLm,
    tokens: &PixelTokens,
    labels: &[usize],
    sampling: &Sampling,
    rng: &mut Rng,
    device: &Device,
) -> Result<Vec<Vec<u8>>> {
    sampling.validate()?;
    tokens.check_model(model.vocab_size(), model.context_length())?;
    if labels.is_empty() {
        return Ok(Vec::new());
    }
    let b = labels.len();
    let mut next: Vec<u32> = labels
        .iter()
        .map(|&l| tokens.class_token(l))
        .collect::<Result<_>>()?;
    let mut out = vec![Vec::with_capacity(tokens.pixels()); b];
    let mut caches = model.new_cache();
    on_pool(|| -> Result<()> {
        for step in 0..tokens.pixels() {
            let x = Tensor::from_vec(next.clone(), (b, 1), device)?;
            let logits = model.forward_cached_last(&x, &mut caches)?; // (B, 1, V)
            let rows = logits
                .squeeze(1)?
                .narrow(1, 0, tokens.levels)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (i, row) in rows.iter().enumerate() {
                crate::validate::check_finite_logits(
                    &format!("generating pixel {} of image {}", step + 1, i + 1),
                    row,
                )?;
                let q = sample_token(row, sampling, rng);
                next[i] = q;
                out[i].push(tokens.grey(q));
            }
        }
        Ok(())
    })?;
    Ok(out)
}
