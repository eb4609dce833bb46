//! Pillow's `Image.resize` on 8-bit images, bit for bit: the separable convolution of
//! `libImaging/Resample.c` (filter support scaled by the downscaling factor, which is the
//! antialiasing; coefficients in 22-bit fixed point; a horizontal then a vertical pass, each
//! rounded and clipped to 8 bits), and nearest-neighbour scaling as `ImagingScaleAffine` does it.
//! Hugging Face's PIL image processors resize through Pillow, so a pixel tensor can match
//! theirs exactly only if the resize is this one (a float resize differs by whole grey levels).
//!
//! Images are interleaved `(H, W, C)` bytes; every channel is resampled alike.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Pillow's resampling filters, with the numbers `preprocessor_config.json` stores
/// (`PIL.Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Resample {
    Nearest,
    Lanczos,
    /// Transformers' ViT default.
    #[default]
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl TryFrom<u8> for Resample {
    type Error = String;
    fn try_from(v: u8) -> std::result::Result<Self, String> {
        Ok(match v {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => {
                return Err(format!(
                    "resample {v} is not a PIL filter (0 nearest, 1 lanczos, 2 bilinear, \
                     3 bicubic, 4 box, 5 hamming)"
                ))
            }
        })
    }
}

impl From<Resample> for u8 {
    fn from(r: Resample) -> u8 {
        match r {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }
}

/// Bits of the fixed-point coefficients: 32 - 8 (pixel) - 2 (headroom for negative lobes).
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x * (0.54 + 0.46 * x.cos())
}

/// Keys' cubic with a = -0.5 (Pillow's choice; PyTorch's bicubic uses -0.75).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    // Sinc windowed by a 3-lobe sinc.
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

/// The filter and its support (in input pixels, before scaling).
fn filter_of(r: Resample) -> (fn(f64) -> f64, f64) {
    match r {
        Resample::Box => (box_filter, 0.5),
        Resample::Bilinear => (bilinear_filter, 1.0),
        Resample::Hamming => (hamming_filter, 1.0),
        Resample::Bicubic => (bicubic_filter, 2.0),
        Resample::Lanczos => (lanczos_filter, 3.0),
        // Not a convolution; handled by `resize_nearest`.
        Resample::Nearest => (box_filter, 0.5),
    }
}

/// One output position's taps: the first input index and the fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` then `normalize_coeffs_8bpc` of Resample.c, for resizing `in_size`
/// pixels to `out_size`.
fn coefficients(in_size: usize, out_size: usize, resample: Resample) -> Vec<Taps> {
    let (filter, base_support) = filter_of(resample);
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the filter by the factor: that is Pillow's antialiasing.
    let filterscale = scale.max(1.0);
    let support = base_support * filterscale;
    let ss = 1.0 / filterscale;
    let mut out = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // `as i64` truncates toward zero, like C's `(int)` cast that Pillow rounds with.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let mut k: Vec<f64> = (0..xmax.max(0))
            .map(|x| filter(((x + xmin) as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for w in &mut k {
                *w /= ww;
            }
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let weights = k
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        out.push(Taps {
            start: xmin as usize,
            weights,
        });
    }
    out
}

/// Round the fixed-point sum to 8 bits, clipping to [0, 255].
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An 8-bit image as interleaved `(H, W, C)` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    /// 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA).
    pub channels: usize,
    /// `height * width * channels` bytes, row-major.
    pub data: Vec<u8>,
}

impl Pixels {
    /// Check that the buffer holds `height * width * channels` bytes.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || !(1..=4).contains(&channels) {
            return Err(Error::input(
                "image",
                "width, height > 0 and 1 to 4 channels",
                format!("{width}x{height} with {channels} channels"),
            ));
        }
        if data.len() != width * height * channels {
            return Err(Error::input(
                format!("{width}x{height}x{channels} image"),
                format!("{} bytes", width * height * channels),
                format!("{} bytes", data.len()),
            ));
        }
        Ok(Pixels {
            width,
            height,
            channels,
            data,
        })
    }
}

/// `Image.resize((width, height), resample)` of Pillow on an 8-bit grey or RGB image (without
/// `reducing_gap`, as transformers calls it). Images with alpha are refused: Pillow resizes
/// them premultiplied, and the image processors composite the alpha away first.
pub fn resize(img: &Pixels, width: usize, height: usize, resample: Resample) -> Result<Pixels> {
    if img.channels != 1 && img.channels != 3 {
        return Err(Error::input(
            "image to resize",
            "1 (grey) or 3 (RGB) channels",
            format!("{} channels", img.channels),
        ));
    }
    if width == 0 || height == 0 {
        return Err(Error::input(
            "resize target",
            "width and height > 0",
            format!("{width}x{height}"),
        ));
    }
    if (width, height) == (img.width, img.height) {
        return Ok(img.clone());
    }
    if resample == Resample::Nearest {
        return Ok(resize_nearest(img, width, height));
    }
    let c = img.channels;
    let mut cur = img.clone();
    // Pillow skips a pass whose size does not change (its coefficients would be the identity
    // anyway), horizontal first.
    if width != cur.width {
        let taps = coefficients(cur.width, width, resample);
        let mut data = vec![0u8; cur.height * width * c];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * c..(y + 1) * cur.width * c];
            for (xx, t) in taps.iter().enumerate() {
                for ch in 0..c {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in t.weights.iter().enumerate() {
                        ss += row[(t.start + i) * c + ch] as i64 * w as i64;
                    }
                    data[(y * width + xx) * c + ch] = clip8(ss);
                }
            }
        }
        cur = Pixels {
            width,
            height: cur.height,
            channels: c,
            data,
        };
    }
    if height != cur.height {
        let taps = coefficients(cur.height, height, resample);
        let w = cur.width;
        let mut data = vec![0u8; height * w * c];
        for (yy, t) in taps.iter().enumerate() {
            for x in 0..w {
                for ch in 0..c {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &k) in t.weights.iter().enumerate() {
                        ss += cur.data[((t.start + i) * w + x) * c + ch] as i64 * k as i64;
                    }
                    data[(yy * w + x) * c + ch] = clip8(ss);
                }
            }
        }
        cur = Pixels {
            width: w,
            height,
            channels: c,
            data,
        };
    }
    Ok(cur)
}

/// Nearest neighbour as Pillow's `ImagingScaleAffine`: source coordinates stepped in f64 from
/// the first pixel's centre, truncated.
fn resize_nearest(img: &Pixels, width: usize, height: usize) -> Pixels {
    let index = |in_size: usize, out_size: usize| -> Vec<usize> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        let mut out = Vec::with_capacity(out_size);
        for _ in 0..out_size {
            // Accumulated like Pillow's loop (`xo += a[0]`), so rounding agrees with it.
            out.push((pos as usize).min(in_size - 1));
            pos += step;
        }
        out
    };
    let (xs, ys) = (index(img.width, width), index(img.height, height));
    let c = img.channels;
    let mut data = Vec::with_capacity(width * height * c);
    for &y in &ys {
        for &x in &xs {
            let at = (y * img.width + x) * c;
            data.extend_from_slice(&img.data[at..at + c]);
        }
    }
    Pixels {
        width,
        height,
        channels: c,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_each_output_sum_to_one_in_fixed_point() {
        for r in [
            Resample::Box,
            Resample::Bilinear,
            Resample::Hamming,
            Resample::Bicubic,
            Resample::Lanczos,
        ] {
            for (i, o) in [(640, 32), (13, 40), (7, 5), (1, 9)] {
                for t in coefficients(i, o, r) {
                    let s: i64 = t.weights.iter().map(|&w| w as i64).sum();
                    // Each weight is rounded separately: the sum is off by at most one unit
                    // per tap.
                    let one = 1i64 << PRECISION_BITS;
                    assert!(
                        (s - one).abs() <= t.weights.len() as i64,
                        "{r:?} {i}->{o}: {s}"
                    );
                    assert!(t.start + t.weights.len() <= i);
                }
            }
        }
    }

    #[test]
    fn a_constant_image_stays_constant_at_any_size() -> Result<()> {
        let img = Pixels::new(1, 1, 3, vec![10, 200, 255])?;
        for r in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Nearest,
        ] {
            let out = resize(&img, 7, 4, r)?;
            assert_eq!((out.width, out.height), (7, 4));
            for px in out.data.chunks(3) {
                assert_eq!(px, [10, 200, 255], "{r:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn resample_numbers_are_pils() {
        for v in 0u8..=5 {
            assert_eq!(u8::from(Resample::try_from(v).unwrap()), v);
        }
        let err = Resample::try_from(6).unwrap_err();
        assert!(err.contains("resample 6"), "{err}");
    }
}
