//! Labelled images of one size held in memory as bytes, channel-first: what image
//! classification trains on, whether the images came from IDX files ([`super::idx`]) or from a
//! folder-per-class tree ([`super::image_folder`]), which is decoded and resized once.

use super::idx::LabelledImages;
use super::resize::Pixels;
use crate::{Error, Result};

/// Images of `channels` × `height` × `width` bytes, each with a label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// (N, C, H, W) bytes, row-major.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
}

impl From<LabelledImages> for ImageSet {
    fn from(images: LabelledImages) -> Self {
        ImageSet {
            channels: 1,
            height: images.height,
            width: images.width,
            pixels: images.pixels,
            labels: images.labels.into_iter().map(u32::from).collect(),
        }
    }
}

impl ImageSet {
    /// An empty set of images of this size.
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        ImageSet {
            channels,
            height,
            width,
            pixels: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Append an image (interleaved, as decoded) of exactly this set's size and channels.
    pub fn push(&mut self, img: &Pixels, label: u32) -> Result<()> {
        if (img.channels, img.height, img.width) != (self.channels, self.height, self.width) {
            return Err(Error::input(
                "image",
                format!(
                    "{}x{} pixels of {} channel(s)",
                    self.height, self.width, self.channels
                ),
                format!(
                    "{}x{} of {} channel(s)",
                    img.height, img.width, img.channels
                ),
            ));
        }
        let (c, plane) = (self.channels, self.height * self.width);
        let start = self.pixels.len();
        self.pixels.resize(start + c * plane, 0);
        let out = &mut self.pixels[start..];
        // Interleaved (H, W, C) to planes (C, H, W).
        for (i, px) in img.data.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * plane + i] = v;
            }
        }
        self.labels.push(label);
        Ok(())
    }

    /// The `C·H·W` bytes of image `i` (channel-first) and its label.
    pub fn bytes(&self, i: usize) -> Result<(&[u8], u32)> {
        if i >= self.len() {
            return Err(Error::input(
                "image index",
                format!("< {}", self.len()),
                i.to_string(),
            ));
        }
        let size = self.image_len();
        Ok((&self.pixels[i * size..(i + 1) * size], self.labels[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_stores_planes_and_refuses_other_sizes() -> Result<()> {
        let mut set = ImageSet::new(3, 1, 2);
        // Two RGB pixels: (1, 2, 3) and (4, 5, 6).
        set.push(&Pixels::new(2, 1, 3, vec![1, 2, 3, 4, 5, 6])?, 7)?;
        assert_eq!(set.bytes(0)?, (&[1u8, 4, 2, 5, 3, 6][..], 7));
        assert!(set.push(&Pixels::new(2, 1, 1, vec![1, 2])?, 0).is_err());
        assert!(set.bytes(1).is_err());
        Ok(())
    }

    #[test]
    fn idx_images_become_one_channel() {
        let idx = LabelledImages {
            height: 1,
            width: 2,
            pixels: vec![9, 8, 7, 6],
            labels: vec![3, 200],
        };
        let set = ImageSet::from(idx);
        assert_eq!((set.channels, set.len(), set.image_len()), (1, 2, 2));
        assert_eq!(set.labels, vec![3, 200]);
    }
}
