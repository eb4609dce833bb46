//! Image classification with a Vision Transformer: load a checkpoint (ours, or a Hugging Face
//! `ViTForImageClassification` directory), turn image files into the model's pixels, rank the
//! labels, and explain a prediction with attention rollout.
//!
//! Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers",
//! §3): the residual connection is modelled by adding the identity to each layer's
//! head-averaged attention, `Ã_l = norm(mean_h A_l + I)` (rows renormalized to sum to 1), and
//! the attention of the output tokens to the input tokens is the product over layers,
//! `R = Ã_L · … · Ã_1`. The class token's row of `R` over the patches says how much each patch
//! flowed into the classification.
//!
//! Dimension letters: `B` batch, `Hd` heads, `T` = 1 + N tokens (class token first), `N`
//! patches, `L` labels.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};

use crate::data::images::{ImageProcessor, ImageProcessorConfig, PerChannel, SizeSpec};
use crate::data::resize::Resample;
use crate::models::ImageClassifier;
use crate::train::checkpoint::{load_model, resolve_model_dir, META_FILE, RUN_CONFIG_FILE};
use crate::train::{DataConfig, RunConfig};
use crate::{Error, Result};

/// Where a classifier came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierSource {
    /// A checkpoint written by our trainer (`meta.json` names the `vit` family).
    Ours,
    /// A Hugging Face `ViTForImageClassification` directory.
    HuggingFace,
}

/// An image classifier ready to use.
pub struct LoadedClassifier {
    /// The directory the weights were read from (a run directory's `best/`).
    pub dir: PathBuf,
    pub model: Box<dyn ImageClassifier>,
    /// Turns decoded images into the model's pixels.
    pub processor: ImageProcessor,
    /// Class names in label order.
    pub labels: Vec<String>,
    pub source: ClassifierSource,
}

/// The preprocessing of a model trained on `data.kind = "images"` (or `"image_folder"`): the images are already the
/// model's size, so other images are resized to it (bilinear, as `ViTImageProcessor`), then
/// scaled to [0, 1] and normalized with the run's mean and std.
pub fn processor_of_run(cfg: &RunConfig, image_size: usize) -> Option<ImageProcessorConfig> {
    match &cfg.data {
        DataConfig::Images { mean, std, .. } => Some(ImageProcessorConfig {
            size: SizeSpec::Square(image_size),
            resample: Resample::Bilinear,
            image_mean: PerChannel::One(*mean),
            image_std: PerChannel::One(*std),
            ..Default::default()
        }),
        // Training decoded its trees with this resize too (`train::run`).
        DataConfig::ImageFolder { mean, std, .. } => Some(ImageProcessorConfig::square_normalized(
            image_size,
            mean.clone(),
            std.clone(),
        )),
        _ => None,
    }
}

/// Load an image classifier: one of our checkpoint or run directories, or a Hugging Face ViT
/// directory (`config.json`, `model.safetensors` or `pytorch_model.bin` weights,
/// `preprocessor_config.json`).
pub fn load_classifier(path: &Path, device: &Device) -> Result<LoadedClassifier> {
    let dir = resolve_model_dir(path)?;
    if !dir.join(META_FILE).is_file() {
        let hf = crate::import::hf_vit::load(&dir, device)?;
        crate::train::checkpoint::check_finite_weights(&dir, &hf.vs)?;
        let labels = hf.config.labels();
        if labels.is_empty() {
            return Err(Error::Path {
                path: dir,
                problem: "the ViT has no classification head (a ViTModel, not a \
                          ViTForImageClassification)"
                    .into(),
            });
        }
        return Ok(LoadedClassifier {
            dir,
            model: Box::new(hf.model),
            processor: hf.processor,
            labels,
            source: ClassifierSource::HuggingFace,
        });
    }
    let loaded = load_model(&dir, device, DType::F32)?;
    let model = loaded.model.into_image_classifier("classifying images")?;
    let labels = model.labels();
    if labels.is_empty() {
        return Err(Error::Path {
            path: dir,
            problem: "the model has no classification head (num_labels 0)".into(),
        });
    }
    // The normalization the run trained with; a checkpoint without its run config (or one
    // trained on other data) gets ViT's defaults at the model's size.
    let run_cfg = dir.join(RUN_CONFIG_FILE);
    let pre = if run_cfg.is_file() {
        let cfg = RunConfig::from_file(&run_cfg, &[])?;
        processor_of_run(&cfg, model.image_size())
    } else {
        None
    };
    let pre = pre.unwrap_or_else(|| ImageProcessorConfig::square(model.image_size()));
    let processor = ImageProcessor::new(pre, model.num_channels())?;
    Ok(LoadedClassifier {
        dir,
        model,
        processor,
        labels,
        source: ClassifierSource::Ours,
    })
}

/// Softmax probabilities of logits.
///
/// # Shapes
/// `logits`: (B, L) → (B, L)
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// The `k` most probable labels of one row of probabilities, most probable first (ties: the
/// lower label first).
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);
    ranked
}

/// The attention rollout of every token to every token.
///
/// # Shapes
/// `attentions`: n_layers × (B, Hd, T, T), softmax rows → (B, T, T)
pub fn rollout(attentions: &[Tensor]) -> Result<Tensor> {
    let Some(first) = attentions.first() else {
        return Err(Error::msg("attention rollout needs at least one layer"));
    };
    let (b, _, t, t2) = first.dims4()?;
    if t != t2 {
        return Err(Error::shape(
            "attention weights",
            "(B, Hd, T, T)",
            first.dims(),
        ));
    }
    let dev = first.device();
    let eye = Tensor::eye(t, DType::F32, dev)?.unsqueeze(0)?; // (1, T, T)
    let mut r = Tensor::eye(t, DType::F32, dev)?
        .unsqueeze(0)?
        .broadcast_as((b, t, t))?
        .contiguous()?; // (B, T, T)
    for a in attentions {
        let a = a.to_dtype(DType::F32)?.mean(1)?; // (B, T, T) heads averaged
        let a = a.broadcast_add(&eye)?; // the residual path
        let a = a.broadcast_div(&a.sum_keepdim(D::Minus1)?)?; // rows sum to 1
        r = a.matmul(&r)?; // this layer after the ones below it
    }
    Ok(r)
}

/// The class token's rollout over the patches, and the last layer's class-token attention
/// over the patches per head.
///
/// # Shapes
/// `attentions`: n_layers × (B, Hd, T, T) → ((B, N), (B, Hd, N))
pub fn class_token_maps(attentions: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let r = rollout(attentions)?; // (B, T, T)
    let t = r.dim(1)?;
    let cls_rollout = r.narrow(1, 0, 1)?.squeeze(1)?.narrow(1, 1, t - 1)?; // (B, N)
    let last = attentions[attentions.len() - 1].to_dtype(DType::F32)?; // (B, Hd, T, T)
    let cls_last = last.narrow(2, 0, 1)?.squeeze(2)?.narrow(2, 1, t - 1)?; // (B, Hd, N)
    Ok((cls_rollout, cls_last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t4(data: &[f32], dims: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_vec(data.to_vec(), dims, &Device::Cpu).unwrap()
    }

    /// A hand-computed case: T = 2 tokens, two layers, two heads.
    ///
    /// Layer 1, heads [[1, 0], [0, 1]] and [[0, 1], [1, 0]]: mean [[.5, .5], [.5, .5]];
    /// plus I, [[1.5, .5], [.5, 1.5]]; rows / 2 → Ã₁ = [[.75, .25], [.25, .75]].
    ///
    /// Layer 2, both heads [[0, 1], [0, 1]]: plus I, [[1, 1], [0, 2]]; rows / 2 →
    /// Ã₂ = [[.5, .5], [0, 1]].
    ///
    /// R = Ã₂ Ã₁ = [[.5·.75 + .5·.25, .5·.25 + .5·.75], [.25, .75]] = [[.5, .5], [.25, .75]].
    #[test]
    fn rollout_matches_a_hand_computed_case() -> Result<()> {
        let l1 = t4(&[1., 0., 0., 1., 0., 1., 1., 0.], (1, 2, 2, 2));
        let l2 = t4(&[0., 1., 0., 1., 0., 1., 0., 1.], (1, 2, 2, 2));
        let r = rollout(&[l1.clone(), l2.clone()])?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let expect = [[0.5, 0.5], [0.25, 0.75]];
        for (row, e) in r.iter().zip(expect) {
            for (v, e) in row.iter().zip(e) {
                assert!((v - e).abs() < 1e-6, "{r:?}");
            }
        }
        // One layer alone is Ã₁.
        let r1 = rollout(std::slice::from_ref(&l1))?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        assert!((r1[0][0] - 0.75).abs() < 1e-6 && (r1[1][0] - 0.25).abs() < 1e-6);

        let (cls, last) = class_token_maps(&[l1, l2])?;
        assert_eq!(cls.to_vec2::<f32>()?, [[0.5]]); // R[0, 1]
        assert_eq!(last.dims(), [1, 2, 1]);
        assert_eq!(last.flatten_all()?.to_vec1::<f32>()?, [1.0, 1.0]); // A₂[h, 0, 1]
        Ok(())
    }

    #[test]
    fn rollout_rows_stay_distributions() -> Result<()> {
        // Random softmax rows over 5 tokens, 3 layers of 2 heads, batch 2.
        let mut rng = crate::rng::Rng::new(3);
        let mut layers = Vec::new();
        for _ in 0..3 {
            let v: Vec<f32> = (0..2 * 2 * 5 * 5)
                .map(|_| rng.uniform_f32() * 4.0)
                .collect();
            let x = t4(&v, (2, 2, 5, 5));
            layers.push(candle_nn::ops::softmax_last_dim(&x)?);
        }
        let r = rollout(&layers)?;
        let sums = r.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        assert!(r.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v >= 0.0));
        Ok(())
    }

    #[test]
    fn top_k_ranks_by_probability() {
        assert_eq!(top_k(&[0.1, 0.6, 0.3], 2), [(1, 0.6), (2, 0.3)]);
        assert_eq!(top_k(&[0.5, 0.5], 5), [(0, 0.5), (1, 0.5)]);
    }
}
