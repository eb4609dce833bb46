//! Users' own labelled images in torchvision's `ImageFolder` layout: `ROOT/<label>/…/*.png`.
//! Classes are the sub-folders of `ROOT` in sorted order (their index is the label); the
//! images of a class are its PNG and JPEG files at any depth, in sorted path order. A class
//! folder without images is an error, as in torchvision (which says "Found no valid file").
//! Files are listed here and decoded when loaded, so a bad file is reported by name then.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::image_set::ImageSet;
use super::images::{read_image, ImageProcessor};
use super::resize::Pixels;
use crate::{Error, Result};

/// Most bytes [`ImageFolder::load`] decodes into memory (16 GiB): a tree of large photographs
/// at a large `image_size` would otherwise exhaust memory part way through.
pub const MAX_LOADED_BYTES: usize = 16 << 30;

/// Images decoded at once by [`ImageFolder::load`]: enough to keep every core busy, few enough
/// that the decoded originals (before resizing) stay small.
const DECODE_CHUNK: usize = 256;

/// The extensions read (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

fn bad(path: &Path, problem: impl Into<String>) -> Error {
    Error::Path {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// The images of a folder-per-class tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names (the sub-folder names), sorted; a label is an index into it.
    pub classes: Vec<String>,
    /// Every image with its label.
    pub samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// List `root`'s classes and images.
    pub fn scan(root: &Path) -> Result<Self> {
        let mut classes = Vec::new();
        for entry in read_dir_sorted(root)? {
            if entry.is_dir() {
                let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
                match name {
                    // Hidden folders (.git, .ipynb_checkpoints) are not classes.
                    Some(n) if !n.starts_with('.') => classes.push((n, entry)),
                    _ => {}
                }
            }
        }
        if classes.is_empty() {
            return Err(bad(
                root,
                "no class folders: expected ROOT/<label>/*.png (or .jpg, .jpeg)",
            ));
        }
        let mut samples = Vec::new();
        for (label, (_, dir)) in classes.iter().enumerate() {
            let before = samples.len();
            collect_images(dir, label, &mut samples)?;
            if samples.len() == before {
                return Err(bad(
                    dir,
                    format!(
                        "class folder without images (looked for {} files at any depth)",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes: classes.into_iter().map(|(n, _)| n).collect(),
            samples,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Decode sample `i`; errors name the file.
    pub fn image(&self, i: usize) -> Result<(Pixels, usize)> {
        let Some((path, label)) = self.samples.get(i) else {
            return Err(Error::input(
                "sample index",
                format!("< {}", self.len()),
                i.to_string(),
            ));
        };
        Ok((read_image(path)?, *label))
    }

    /// Decode samples `indices` into memory, each converted and resized by `processor` to
    /// `channels` × `side` × `side` bytes (what it holds before rescaling), in parallel;
    /// errors name the file.
    pub fn load(
        &self,
        indices: &[usize],
        processor: &ImageProcessor,
        channels: usize,
        side: usize,
    ) -> Result<ImageSet> {
        let bytes = indices
            .len()
            .checked_mul(channels * side * side)
            .filter(|&b| b <= MAX_LOADED_BYTES)
            .ok_or_else(|| {
                bad(
                    &self.root,
                    format!(
                        "{} images of {channels}x{side}x{side} bytes exceed the {} GiB that \
                         are decoded into memory; use a smaller model.image_size or fewer \
                         images",
                        indices.len(),
                        MAX_LOADED_BYTES >> 30
                    ),
                )
            })?;
        let mut set = ImageSet::new(channels, side, side);
        set.pixels.reserve_exact(bytes);
        for chunk in indices.chunks(DECODE_CHUNK) {
            let decoded: Vec<(Pixels, usize, usize)> = chunk
                .par_iter()
                .map(|&i| {
                    let (img, label) = self.image(i)?;
                    let img = processor
                        .resized(&img)
                        .map_err(|e| bad(&self.samples[i].0, e.to_string()))?;
                    Ok((img, label, i))
                })
                .collect::<Result<_>>()?;
            for (img, label, i) in decoded {
                set.push(&img, label as u32)
                    .map_err(|e| bad(&self.samples[i].0, e.to_string()))?;
            }
        }
        Ok(set)
    }

    /// Samples `indices` through an image processor, with their labels.
    ///
    /// # Shapes
    /// → pixels (B, C, H, W) f32, labels (B) u32
    pub fn batch(
        &self,
        indices: &[usize],
        processor: &ImageProcessor,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let mut images = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let (img, label) = self.image(i)?;
            images.push(img);
            labels.push(label as u32);
        }
        let pixels = processor.pixel_values(&images, device)?;
        let n = labels.len();
        Ok((pixels, candle_core::Tensor::from_vec(labels, n, device)?))
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

fn collect_images(dir: &Path, label: usize, out: &mut Vec<(PathBuf, usize)>) -> Result<()> {
    for path in read_dir_sorted(dir)? {
        if path.is_dir() {
            collect_images(&path, label, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push((path, label));
        }
    }
    Ok(())
}
