//! Image generation with a decoder-only model trained on pixel tokens (`data.kind =
//! "pixels"`): load the checkpoint with its token scheme, score labelled images in bits per
//! pixel, and draw new images per class.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::data::idx::LabelledImages;
use crate::data::pixel_tokens::PixelTokens;
use crate::models::CausalLm;
use crate::train::checkpoint::{load_model, resolve_model_dir, RUN_CONFIG_FILE};
use crate::train::{DataConfig, RunConfig};
use crate::{Error, Result};

/// A pixel-sequence model ready to use.
pub struct LoadedPixelModel {
    /// The directory the weights were read from (a run directory's `best/`).
    pub dir: PathBuf,
    pub model: Box<dyn CausalLm>,
    pub tokens: PixelTokens,
}

/// Whether the checkpoint or run directory `path` holds a model trained on `data.kind =
/// "pixels"` (its saved run config says so).
pub fn is_pixel_model(path: &Path) -> bool {
    let Ok(dir) = resolve_model_dir(path) else {
        return false;
    };
    let run = dir.join(RUN_CONFIG_FILE);
    run.is_file()
        && RunConfig::from_file(&run, &[])
            .is_ok_and(|cfg| matches!(cfg.data, DataConfig::Pixels { .. }))
}

/// Load one of our checkpoint or run directories trained on `data.kind = "pixels"`: the
/// model, and the token scheme from the saved run config (grey levels and pooling) and the
/// model (classes = vocabulary − levels, side = √block_size).
pub fn load_pixel_model(path: &Path, device: &Device) -> Result<LoadedPixelModel> {
    let dir = resolve_model_dir(path)?;
    let run = dir.join(RUN_CONFIG_FILE);
    let not_pixels = |why: &str| Error::Path {
        path: dir.clone(),
        problem: format!(
            "{why}: image generation needs a checkpoint trained with data.kind = \"pixels\""
        ),
    };
    if !run.is_file() {
        return Err(not_pixels(&format!("no {RUN_CONFIG_FILE}")));
    }
    let cfg = RunConfig::from_file(&run, &[])?;
    let DataConfig::Pixels { levels, pool, .. } = cfg.data else {
        return Err(not_pixels("its run config trains on other data"));
    };
    let loaded = load_model(&dir, device, DType::F32)?;
    let model = loaded.model.into_causal_lm("generating images")?;
    let pixels = model.context_length();
    let side = (pixels as f64).sqrt().round() as usize;
    if side * side != pixels || model.vocab_size() <= levels {
        return Err(Error::Path {
            path: dir,
            problem: format!(
                "the model (block_size {pixels}, vocab_size {}) does not fit {levels} grey \
                 levels of a square image",
                model.vocab_size()
            ),
        });
    }
    let tokens = PixelTokens::new(
        side * pool,
        side * pool,
        levels,
        pool,
        model.vocab_size() - levels,
    )?;
    Ok(LoadedPixelModel { dir, model, tokens })
}

/// Mean negative log-likelihood of every image of `images` in bits per pixel (and nats per
/// pixel), `batch` images per forward pass. The images must be the size the model was trained
/// on and their labels among its classes.
pub fn bits_per_pixel(
    m: &LoadedPixelModel,
    images: &LabelledImages,
    batch: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    let t = &m.tokens;
    if images.height != t.side * t.pool || images.width != t.side * t.pool {
        return Err(Error::msg(format!(
            "the images are {}x{}, the model was trained on {}x{}",
            images.height,
            images.width,
            t.side * t.pool,
            t.side * t.pool
        )));
    }
    if let Some(&l) = images.labels.iter().find(|&&l| l as usize >= t.classes) {
        return Err(Error::msg(format!(
            "label {l} is not among the model's {} classes",
            t.classes
        )));
    }
    let all: Vec<usize> = (0..images.len()).collect();
    let nats =
        crate::train::pixels::nats_per_pixel(m.model.as_ref(), images, t, &all, batch, device)?;
    Ok((nats / std::f64::consts::LN_2, nats))
}
