//! Grey images as token sequences, for image generation with a decoder-only model (issue 14,
//! item 7; the pixel-sequence setup of Image GPT, Chen et al. 2020, at Fashion-MNIST scale).
//!
//! An image of `side`×`side` grey pixels becomes `1 + side²` tokens: first a class token that
//! conditions the image on its label, then every pixel in raster order (row by row, left to
//! right) as one of `levels` grey levels. The vocabulary is the `levels` grey tokens
//! (`0..levels`) followed by one class token per label (`levels + label`). A language model
//! trained on these sequences is scored on the pixel tokens only, in bits per pixel.
//!
//! The grey level of a byte `v` is `floor(v · levels / 256)` (equal-width bins, as
//! `v >> (8 - log2 levels)` for a power of two); a level turns back into the byte at its bin's
//! centre. With `pool = 2` the images are first averaged over 2×2 blocks (28×28 → 14×14), a
//! quarter of the tokens for a CPU's budget.

use super::idx::LabelledImages;
use crate::{Error, Result};

/// How grey images and their labels become tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelTokens {
    /// Grey levels: tokens `0..levels`.
    pub levels: usize,
    /// Class tokens `levels..levels + classes`.
    pub classes: usize,
    /// Side of the (square) image after pooling.
    pub side: usize,
    /// Average `pool`×`pool` blocks of the source image into one pixel (1: none).
    pub pool: usize,
}

impl PixelTokens {
    /// The token scheme for `images` (`classes` = the largest label + 1), checked: 2 to 256
    /// levels, square images whose side `pool` divides.
    pub fn for_images(images: &LabelledImages, levels: usize, pool: usize) -> Result<Self> {
        let classes = images
            .labels
            .iter()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        Self::new(images.height, images.width, levels, pool, classes)
    }

    pub fn new(
        height: usize,
        width: usize,
        levels: usize,
        pool: usize,
        classes: usize,
    ) -> Result<Self> {
        if !(2..=256).contains(&levels) {
            return Err(Error::invalid(
                "data.levels",
                "from 2 to 256 grey levels",
                levels.to_string(),
            ));
        }
        if height != width {
            return Err(Error::msg(format!(
                "image generation needs square images, got {height}x{width}"
            )));
        }
        if pool == 0 || !height.is_multiple_of(pool) {
            return Err(Error::invalid(
                "data.pool",
                format!("at least 1 and a divisor of the image side {height}"),
                pool.to_string(),
            ));
        }
        if classes == 0 {
            return Err(Error::msg("image generation needs at least one label"));
        }
        Ok(PixelTokens {
            levels,
            classes,
            side: height / pool,
            pool,
        })
    }

    /// Tokens in all: grey levels then class tokens.
    pub fn vocab_size(&self) -> usize {
        self.levels + self.classes
    }

    /// Pixels per image (after pooling): the tokens a model predicts.
    pub fn pixels(&self) -> usize {
        self.side * self.side
    }

    /// The grey token of byte `v`.
    pub fn level(&self, v: u8) -> u32 {
        (v as usize * self.levels / 256) as u32
    }

    /// The byte at the centre of grey level `q`'s bin.
    pub fn grey(&self, q: u32) -> u8 {
        let centre = (2 * q as usize + 1) * 256 / (2 * self.levels);
        centre.min(255) as u8
    }

    /// The class token of `label`.
    pub fn class_token(&self, label: usize) -> Result<u32> {
        if label >= self.classes {
            return Err(Error::input(
                "label",
                format!("< {}", self.classes),
                label.to_string(),
            ));
        }
        Ok((self.levels + label) as u32)
    }

    /// The `side²` pooled bytes of a source image of `(side·pool)²` bytes, row-major (each the
    /// rounded mean of its block).
    pub fn pooled(&self, src: &[u8]) -> Vec<u8> {
        let (p, s) = (self.pool, self.side);
        if p == 1 {
            return src.to_vec();
        }
        let w = s * p;
        let n = (p * p) as u32;
        let mut out = Vec::with_capacity(s * s);
        for y in 0..s {
            for x in 0..s {
                let mut sum = 0u32;
                for dy in 0..p {
                    for dx in 0..p {
                        sum += src[(y * p + dy) * w + x * p + dx] as u32;
                    }
                }
                out.push(((sum + n / 2) / n) as u8);
            }
        }
        out
    }

    /// The `1 + side²` tokens of one source image with its label.
    pub fn sequence(&self, src: &[u8], label: usize) -> Result<Vec<u32>> {
        let mut seq = Vec::with_capacity(1 + self.pixels());
        seq.push(self.class_token(label)?);
        seq.extend(self.pooled(src).into_iter().map(|v| self.level(v)));
        Ok(seq)
    }

    /// Check that a language model with `vocab_size` tokens and `context_length` positions
    /// reads this scheme: the same vocabulary, and exactly the positions of the class token and
    /// every pixel but the last (the inputs of the `side²` predictions).
    pub fn check_model(&self, vocab_size: usize, context_length: usize) -> Result<()> {
        if vocab_size != self.vocab_size() {
            return Err(Error::msg(format!(
                "the model's vocab_size is {vocab_size}, but {} grey levels and {} classes \
                 need {}",
                self.levels,
                self.classes,
                self.vocab_size()
            )));
        }
        // Exactly: a checkpoint's token scheme is read back from it (side = √block_size).
        if context_length != self.pixels() {
            return Err(Error::msg(format!(
                "the model's block_size is {context_length}, but a {}x{} image needs {} \
                 positions (the class token and every pixel but the last)",
                self.side,
                self.side,
                self.pixels()
            )));
        }
        Ok(())
    }

    /// Grey tokens back to bytes (`side²` of them, row-major).
    pub fn to_bytes(&self, tokens: &[u32]) -> Vec<u8> {
        tokens.iter().map(|&q| self.grey(q)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_equal_width_bins_and_grey_is_their_centre() {
        let t = PixelTokens::new(4, 4, 16, 1, 10).unwrap();
        assert_eq!(t.level(0), 0);
        assert_eq!(t.level(15), 0);
        assert_eq!(t.level(16), 1);
        assert_eq!(t.level(255), 15);
        // v >> 4 for 16 levels.
        for v in 0..=255u8 {
            assert_eq!(t.level(v), (v >> 4) as u32);
        }
        assert_eq!(t.grey(0), 8);
        assert_eq!(t.grey(15), 248);
        // Every level's centre falls back into its own bin.
        for q in 0..16 {
            assert_eq!(t.level(t.grey(q)), q);
        }
        let t = PixelTokens::new(4, 4, 256, 1, 1).unwrap();
        assert!((0..=255u8).all(|v| t.grey(t.level(v)) == v));
    }

    #[test]
    fn sequence_is_class_token_then_pooled_pixels_in_raster_order() {
        let t = PixelTokens::new(4, 4, 4, 2, 3).unwrap();
        #[rustfmt::skip]
        let src = [
            0, 0, 255, 255,
            0, 1, 255, 254,
            64, 64, 128, 130,
            64, 64, 128, 129,
        ];
        // Block means (rounded): 0.25 → 0, 254.75 → 255, 64, 128.75 → 129.
        assert_eq!(t.pooled(&src), vec![0, 255, 64, 129]);
        assert_eq!(t.sequence(&src, 2).unwrap(), vec![4 + 2, 0, 3, 1, 2]);
        assert_eq!(t.vocab_size(), 7);
        assert_eq!(t.pixels(), 4);
        assert!(t.sequence(&src, 3).is_err());
    }

    #[test]
    fn bad_schemes_are_refused_by_field() {
        let e = PixelTokens::new(28, 28, 1, 1, 10).unwrap_err().to_string();
        assert!(e.contains("data.levels"), "{e}");
        let e = PixelTokens::new(28, 28, 16, 3, 10).unwrap_err().to_string();
        assert!(e.contains("data.pool"), "{e}");
        let e = PixelTokens::new(28, 14, 16, 1, 10).unwrap_err().to_string();
        assert!(e.contains("square"), "{e}");
    }
}
