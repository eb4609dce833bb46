//! Image classification training (the Vision Transformer on Fashion-MNIST, or on users' own
//! folder-per-class images): labelled images held in memory as bytes, visited once per epoch in a fresh random order, with the light
//! augmentation of small-image recipes (torchvision's `RandomCrop(size, padding=p)` with zero
//! fill, then `RandomHorizontalFlip()`), seeded and deterministic.
//!
//! Exact resumption with the trainer's data generator as the only saved state, as
//! [`super::tasks::BucketSchedule`] does: a batch costs a fixed sequence of draws (one per
//! image for the order, then one seed for the batch's augmentation), so a resumed run replays
//! the draws from the run's initial state until it reaches the saved one and continues with
//! the same epoch, the same images left in it and the same crops and flips.
//!
//! Dimension letters: `B` batch, `C` channels, `H`/`W` image height/width, `L` labels.

use candle_core::{DType, Device, Tensor};

use super::loss::{cross_entropy, CrossEntropyConfig};
use super::parallel::Shard;
use super::trainer::{initial_data_rng, Evaluation, Task};
use crate::data::image_set::ImageSet;
use crate::models::ImageClassifier;
use crate::rng::Rng;
use crate::{Error, Result};

/// Most batches replayed to find where a resumed run stands (a few seconds of draws).
const MAX_REPLAY_BATCHES: u64 = 1 << 22;

/// Light augmentation of 2-D images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Pad every side with this many zero pixels, then crop the original size back at a
    /// uniformly random offset (0: no crop).
    pub crop_padding: usize,
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.hflip
    }

    /// One image of `c` planes of `h`×`w` bytes (channel-first, row-major) augmented into
    /// `out`: the crop offset is drawn first (row, then column, each in [0, 2p]), then the
    /// flip; every channel moves the same way.
    pub fn apply(&self, src: &[u8], c: usize, h: usize, w: usize, rng: &mut Rng, out: &mut [u8]) {
        let p = self.crop_padding;
        let (dy, dx) = if p > 0 {
            let span = (2 * p + 1) as u64;
            (rng.below(span) as usize, rng.below(span) as usize)
        } else {
            (0, 0)
        };
        let flip = self.hflip && rng.below(2) == 1;
        for (src, out) in src
            .chunks_exact(h * w)
            .zip(out.chunks_exact_mut(h * w))
            .take(c)
        {
            Self::move_plane(src, h, w, p, (dy, dx), flip, out);
        }
    }

    fn move_plane(
        src: &[u8],
        h: usize,
        w: usize,
        p: usize,
        (dy, dx): (usize, usize),
        flip: bool,
        out: &mut [u8],
    ) {
        for y in 0..h {
            // Row y of the crop is row y + dy of the padded image, row y + dy - p of `src`.
            let sy = (y + dy).wrapping_sub(p);
            for x in 0..w {
                let sx = (x + dx).wrapping_sub(p);
                // Out of range (wrapped below zero, or past the edge): the zero padding.
                let v = if sy < h && sx < w {
                    src[sy * w + sx]
                } else {
                    0
                };
                let ox = if flip { w - 1 - x } else { x };
                out[y * w + ox] = v;
            }
        }
    }
}

/// The order of training images: every image once per epoch, in a fresh random order each
/// epoch (a lazy Fisher-Yates shuffle), `batch` images at a time; a batch may straddle two
/// epochs. See the module documentation for how it resumes.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    n: usize,
    batch: usize,
    initial: Rng,
    remaining: Vec<usize>,
    epoch: u64,
    batches: u64,
    last: Option<Rng>,
}

impl EpochSampler {
    pub fn new(n: usize, batch: usize, initial: Rng) -> Result<Self> {
        if n == 0 || batch == 0 {
            return Err(Error::msg(format!(
                "cannot sample batches of {batch} from {n} training images"
            )));
        }
        Ok(EpochSampler {
            n,
            batch,
            initial,
            remaining: Vec::new(),
            epoch: 0,
            batches: 0,
            last: None,
        })
    }

    /// Epochs started so far (1 during the first).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches drawn since the start of the run.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    fn draw(&mut self, rng: &mut Rng) -> (Vec<usize>, u64) {
        let mut idx = Vec::with_capacity(self.batch);
        for _ in 0..self.batch {
            if self.remaining.is_empty() {
                self.remaining = (0..self.n).collect();
                self.epoch += 1;
            }
            let j = rng.below(self.remaining.len() as u64) as usize;
            idx.push(self.remaining.swap_remove(j));
        }
        self.batches += 1;
        (idx, rng.next_u64())
    }

    fn sync(&mut self, rng: &Rng) -> Result<()> {
        let mut sim = self.initial.clone();
        self.remaining.clear();
        self.epoch = 0;
        self.batches = 0;
        while sim != *rng {
            if self.batches >= MAX_REPLAY_BATCHES {
                return Err(Error::msg(format!(
                    "resuming: the saved data-order state is not among the first \
                     {MAX_REPLAY_BATCHES} batches of this run's schedule; was train.seed or \
                     train.batch_size changed since the checkpoint was written?"
                )));
            }
            self.draw(&mut sim);
        }
        Ok(())
    }

    /// The next batch's image indices and the seed of its augmentation, drawn with `rng`.
    pub fn next(&mut self, rng: &mut Rng) -> Result<(Vec<usize>, u64)> {
        if self.last.as_ref() != Some(rng) {
            self.sync(rng)?;
        }
        let out = self.draw(rng);
        self.last = Some(rng.clone());
        Ok(out)
    }
}

/// How raw bytes become the model's input: `(v / 255 - mean) / std` per channel, as
/// transformers' image processor computes it (rescale in f64, then f32).
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// One value per channel.
    pub mean: Vec<f32>,
    /// One value per channel.
    pub std: Vec<f32>,
}

impl Normalize {
    /// Byte `v` of channel `ch`.
    pub fn apply(&self, v: u8, ch: usize) -> f32 {
        ((v as f64 * (1.0 / 255.0)) as f32 - self.mean[ch]) / self.std[ch]
    }
}

/// A batch of images as the model's input.
///
/// # Shapes
/// `pixels`: B × (C·H·W) bytes, channel-first → (B, C, H, W) f32
pub fn image_batch(
    pixels: &[u8],
    (b, c, h, w): (usize, usize, usize, usize),
    norm: &Normalize,
    device: &Device,
) -> Result<Tensor> {
    if norm.mean.len() != c || norm.std.len() != c {
        return Err(Error::msg(format!(
            "normalization for {} channel(s), images of {c}",
            norm.mean.len()
        )));
    }
    let plane = h * w;
    let data: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &v)| norm.apply(v, (i / plane) % c))
        .collect();
    Ok(Tensor::from_vec(data, (b, c, h, w), device)?)
}

/// Class predictions and their correctness for a batch of logits.
///
/// # Shapes
/// `logits`: (B, L) → B predicted labels
pub fn predictions(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Supervised training of an image classifier on labelled images.
pub struct ImageClassificationTask {
    pub model: Box<dyn ImageClassifier>,
    pub images: ImageSet,
    /// Indices into `images` that train.
    pub train: Vec<usize>,
    /// Indices into `images` that validate (the whole set at every evaluation).
    pub val: Vec<usize>,
    pub sampler: EpochSampler,
    pub batch_size: usize,
    pub augment: Augment,
    pub normalize: Normalize,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

/// How an [`ImageClassificationTask`] trains: everything but the model, the images and
/// their normalization.
#[derive(Debug, Clone)]
pub struct ImageTraining {
    pub batch_size: usize,
    /// `train.seed`: it seeds the epoch order ([`initial_data_rng`]).
    pub seed: u64,
    pub augment: Augment,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

impl ImageClassificationTask {
    /// The task on `images`, of which the first `n_train` train and the rest validate, once
    /// [`check_model`](Self::check_model) accepts them.
    pub fn new(
        model: Box<dyn ImageClassifier>,
        images: ImageSet,
        n_train: usize,
        normalize: Normalize,
        how: ImageTraining,
    ) -> Result<Self> {
        Self::check_model(model.as_ref(), &images)?;
        let n = images.len();
        Ok(ImageClassificationTask {
            model,
            sampler: EpochSampler::new(n_train, how.batch_size, initial_data_rng(how.seed))?,
            train: (0..n_train).collect(),
            val: (n_train..n).collect(),
            images,
            batch_size: how.batch_size,
            augment: how.augment,
            normalize,
            loss: how.loss,
            device: how.device,
        })
    }

    /// Check that the model reads these images and has a class for every label.
    pub fn check_model(model: &dyn ImageClassifier, images: &ImageSet) -> Result<()> {
        if model.num_channels() != images.channels {
            return Err(Error::invalid(
                "model.num_channels",
                format!("{} (the images' channels)", images.channels),
                model.num_channels().to_string(),
            ));
        }
        if model.image_size() != images.height || images.height != images.width {
            return Err(Error::invalid(
                "model.image_size",
                format!(
                    "the images' side ({}x{} pixels)",
                    images.height, images.width
                ),
                model.image_size().to_string(),
            ));
        }
        let n_labels = model.labels().len();
        if let Some(&max) = images.labels.iter().max() {
            if max as usize >= n_labels {
                return Err(Error::invalid(
                    "model.num_labels",
                    format!("more than the largest label in the data ({max})"),
                    n_labels.to_string(),
                ));
            }
        }
        Ok(())
    }

    /// The pixels of `indices`, augmented with `seed` when `augment`.
    fn pixels(&self, indices: &[usize], seed: Option<u64>) -> Result<Tensor> {
        let (c, h, w) = (self.images.channels, self.images.height, self.images.width);
        let size = self.images.image_len();
        let mut buf = vec![0u8; indices.len() * size];
        let mut rng = seed.map(Rng::new);
        for (k, &i) in indices.iter().enumerate() {
            let src = &self.images.pixels[i * size..(i + 1) * size];
            let out = &mut buf[k * size..(k + 1) * size];
            match rng.as_mut() {
                Some(r) => self.augment.apply(src, c, h, w, r, out),
                None => out.copy_from_slice(src),
            }
        }
        image_batch(
            &buf,
            (indices.len(), c, h, w),
            &self.normalize,
            &self.device,
        )
    }

    fn labels(&self, indices: &[usize]) -> Result<Tensor> {
        let labels: Vec<u32> = indices.iter().map(|&i| self.images.labels[i]).collect();
        Ok(Tensor::from_vec(labels, indices.len(), &self.device)?)
    }
}

impl Task for ImageClassificationTask {
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> Result<(Tensor, usize)> {
        let (batch, seed) = self.sampler.next(rng)?;
        let indices: Vec<usize> = batch.iter().map(|&j| self.train[j]).collect();
        let seed = (!self.augment.is_identity()).then_some(seed);
        let rows = shard.rows(indices.len());
        if rows.is_empty() {
            return Shard::empty_loss(&self.device);
        }
        // The augmentation draws image after image from one generator: a shard augments the
        // whole batch and keeps its rows, to see exactly the pixels a single process sees.
        let mut pixels = self.pixels(&indices, seed)?; // (B, C, H, W)
        if !shard.is_whole() {
            pixels = pixels.narrow(0, rows.start, rows.len())?;
        }
        // Data: no gradient (a recording tape is told so).
        let pixels = crate::autograd::constant(pixels);
        let logits = self.model.logits(&pixels, true)?; // (B, L)
        let loss = cross_entropy(&logits, &self.labels(&indices[rows.clone()])?, &self.loss)?;
        Ok((loss, rows.len()))
    }

    fn eval_loss(&mut self, rng: &mut Rng, iters: usize) -> Result<f64> {
        Ok(self.evaluate(rng, iters)?.loss)
    }

    /// Loss and accuracy over the whole validation set, without augmentation; `rng` and
    /// `iters` are not needed because the set is fixed.
    fn evaluate(&mut self, _rng: &mut Rng, _iters: usize) -> Result<Evaluation> {
        if self.val.is_empty() {
            return Err(Error::msg(
                "the validation set is empty (set data.n_val >= 1)",
            ));
        }
        let plain = CrossEntropyConfig::default();
        let (mut sum, mut correct) = (0.0, 0usize);
        for chunk in self.val.chunks(self.batch_size) {
            let pixels = self.pixels(chunk, None)?;
            let labels = self.labels(chunk)?;
            let logits = self.model.logits(&pixels, false)?.detach(); // (B, L)
            let loss = cross_entropy(&logits, &labels, &plain)?;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
            let truth = labels.to_vec1::<u32>()?;
            correct += predictions(&logits)?
                .iter()
                .zip(&truth)
                .filter(|(p, t)| p == t)
                .count();
        }
        let n = self.val.len() as f64;
        Ok(Evaluation {
            loss: sum / n,
            accuracy: Some(correct as f64 / n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_and_flip_move_pixels_as_torchvision() {
        // 3x3 image 1..9; padding 1.
        let src: Vec<u8> = (1..=9).collect();
        let aug = Augment {
            crop_padding: 1,
            hflip: false,
        };
        let mut out = vec![0u8; 9];
        let mut checked = 0;
        // Find a draw with offset (0, 0): the crop's top-left is the padding's corner, so the
        // image moves one pixel down and right.
        for seed in 0..200 {
            let mut r = Rng::new(seed);
            let mut probe = r.clone();
            let (dy, dx) = (probe.below(3), probe.below(3));
            aug.apply(&src, 1, 3, 3, &mut r, &mut out);
            let expect: Vec<u8> = match (dy, dx) {
                (0, 0) => vec![0, 0, 0, 0, 1, 2, 0, 4, 5],
                (1, 1) => src.clone(),
                (2, 2) => vec![5, 6, 0, 8, 9, 0, 0, 0, 0],
                (2, 0) => vec![0, 4, 5, 0, 7, 8, 0, 0, 0],
                _ => continue,
            };
            assert_eq!(out, expect, "offset ({dy}, {dx})");
            checked += 1;
        }
        assert!(checked > 20, "{checked} offsets checked");
        let flip = Augment {
            crop_padding: 0,
            hflip: true,
        };
        let mut flips = 0;
        for seed in 0..50 {
            flip.apply(&src, 1, 3, 3, &mut Rng::new(seed), &mut out);
            if out == [3, 2, 1, 6, 5, 4, 9, 8, 7] {
                flips += 1;
            } else {
                assert_eq!(out, src);
            }
        }
        assert!((10..40).contains(&flips), "{flips} flips of 50");
    }

    #[test]
    fn every_channel_moves_with_the_same_draw() {
        // Two 2x2 planes; the second is the first + 10.
        let src = [1u8, 2, 3, 4, 11, 12, 13, 14];
        let aug = Augment {
            crop_padding: 1,
            hflip: true,
        };
        for seed in 0..30 {
            let mut out = [0u8; 8];
            aug.apply(&src, 2, 2, 2, &mut Rng::new(seed), &mut out);
            let mut grey = [0u8; 4];
            aug.apply(&src[..4], 1, 2, 2, &mut Rng::new(seed), &mut grey);
            assert_eq!(out[..4], grey, "seed {seed}");
            for (a, b) in out[..4].iter().zip(&out[4..]) {
                // Padding stays 0 in both planes; pixels keep their offset of 10.
                assert_eq!(*b, if *a == 0 { 0 } else { a + 10 }, "seed {seed}");
            }
        }
    }

    #[test]
    fn batches_normalize_each_channel_with_its_own_statistics() -> Result<()> {
        let norm = Normalize {
            mean: vec![0.0, 1.0],
            std: vec![1.0, 0.5],
        };
        // One image of two 1x2 planes.
        let t = image_batch(&[0, 255, 0, 255], (1, 2, 1, 2), &norm, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 2, 1, 2]);
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            vec![0.0, 1.0, -2.0, 0.0]
        );
        assert!(image_batch(&[0; 4], (1, 1, 2, 2), &norm, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn sampler_visits_every_image_once_per_epoch() -> Result<()> {
        let mut s = EpochSampler::new(10, 4, Rng::new(1))?;
        let mut rng = Rng::new(1);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.extend(s.next(&mut rng)?.0);
        }
        // 20 draws = two whole epochs.
        for epoch in seen.chunks(10) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(seen[..10], seen[10..], "each epoch is reshuffled");
        assert_eq!(s.epoch(), 2);
        Ok(())
    }

    #[test]
    fn sampler_resumes_mid_epoch_exactly() -> Result<()> {
        let initial = Rng::new(5);
        let mut full = EpochSampler::new(7, 3, initial.clone())?;
        let mut rng = initial.clone();
        let all: Vec<_> = (0..9).map(|_| full.next(&mut rng)).collect::<Result<_>>()?;
        let mut first = EpochSampler::new(7, 3, initial.clone())?;
        let mut rng = initial.clone();
        let head: Vec<_> = (0..4)
            .map(|_| first.next(&mut rng))
            .collect::<Result<_>>()?;
        let mut resumed = EpochSampler::new(7, 3, initial.clone())?;
        let tail: Vec<_> = (0..5)
            .map(|_| resumed.next(&mut rng))
            .collect::<Result<_>>()?;
        assert_eq!([head, tail].concat(), all);
        assert_eq!(resumed.batches(), 9);
        Ok(())
    }
}
