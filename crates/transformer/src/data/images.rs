//! Images in: decoding PNG and JPEG files, Pillow's colour conversions, and the preprocessing
//! of Hugging Face's ViT image processor (`ViTImageProcessorPil`: resize with Pillow, optional
//! centre crop, rescale, normalize), configured by `preprocessor_config.json`.
//!
//! Exactness: from the same decoded pixels the pixel tensor equals transformers' to float
//! rounding (the resize is Pillow's fixed-point one, [`super::resize`]; the conversions are
//! Pillow's integer formulas). PNG decoding is lossless and so exact. JPEG decoding is the
//! `image` crate's (zune-jpeg), whose integer IDCT differs from libjpeg-turbo's (which Pillow
//! uses) by up to 3 grey levels on about 1% of the values of the scikit-learn photos; the
//! tests measure what that leaves after resizing.
//!
//! Bounds: an image has at least one pixel (a 1×1 image is valid and resizes to a constant)
//! and at most [`MAX_PIXELS`], Pillow's decompression-bomb threshold, checked from the header
//! before anything is decoded.
//!
//! Dimension letters: `B` batch, `C` channels, `H` height, `W` width.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use super::resize::{resize, Pixels, Resample};
use crate::{Error, Result};

/// The most pixels an image may have: `PIL.Image.MAX_IMAGE_PIXELS` (89,478,485, about
/// 9459×9459), where Pillow starts warning of a decompression bomb. A 10000×10000 image is
/// refused.
pub const MAX_PIXELS: u64 = 89_478_485;

/// File name of the image processor's configuration in a Hugging Face model directory.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";

fn bad_image(path: &Path, problem: impl Into<String>) -> Error {
    Error::Path {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Read and decode a PNG or JPEG file; errors name the file.
pub fn read_image(path: &Path) -> Result<Pixels> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// Decode PNG or JPEG bytes (`path` names them in errors) into grey, grey + alpha, RGB or
/// RGBA 8-bit pixels; 16-bit images are reduced to 8 bits (rounded, as the `image` crate
/// does; Pillow truncates some of them, so those are not matched exactly).
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<Pixels> {
    let format = image::guess_format(bytes).map_err(|_| {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        bad_image(
            path,
            format!(
                "not a PNG or JPEG image (first bytes: {})",
                if head.is_empty() {
                    "none, the file is empty".to_string()
                } else {
                    head.join(" ")
                }
            ),
        )
    })?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(bad_image(
            path,
            format!("a {format:?} image; only PNG and JPEG are read"),
        ));
    }
    let name = if format == image::ImageFormat::Png {
        "PNG"
    } else {
        "JPEG"
    };
    let reader = || image::ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader()
        .into_dimensions()
        .map_err(|e| bad_image(path, format!("cannot read the {name} header: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels == 0 {
        return Err(bad_image(path, format!("the image is {w}x{h}: no pixels")));
    }
    if pixels > MAX_PIXELS {
        return Err(bad_image(
            path,
            format!(
                "the image is {w}x{h} = {pixels} pixels, more than the {MAX_PIXELS} accepted \
                 (Pillow's decompression-bomb threshold)"
            ),
        ));
    }
    let img = reader()
        .decode()
        .map_err(|e| bad_image(path, format!("cannot decode the {name} image: {e}")))?;
    let color = img.color();
    let (w, h) = (w as usize, h as usize);
    let (channels, data) = match (color.has_color(), color.has_alpha()) {
        (false, false) => (1, img.into_luma8().into_raw()),
        (false, true) => (2, img.into_luma_alpha8().into_raw()),
        (true, false) => (3, img.into_rgb8().into_raw()),
        (true, true) => (4, img.into_rgba8().into_raw()),
    };
    Pixels::new(w, h, channels, data)
}

/// Pillow's `alpha_composite` of one pixel over an opaque white background
/// (`libImaging/AlphaComposite.c`, 7 extra bits of precision, divisions by 255 rounded).
fn over_white(v: u8, a: u8) -> u8 {
    const PREC: u32 = 7;
    let div255 = |x: u32| ((x >> 8) + x) >> 8;
    if a == 0 {
        return 255;
    }
    let (v, a) = (v as u32, a as u32);
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << PREC) / outa255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let t = v * coef1 + 255 * coef2;
    (div255(t + (0x80 << PREC)) >> PREC) as u8
}

/// transformers' `convert_to_rgb`: grey replicated; transparency composited onto white with
/// Pillow's arithmetic, then dropped.
pub fn to_rgb(img: &Pixels) -> Pixels {
    let data: Vec<u8> = match img.channels {
        1 => img.data.iter().flat_map(|&v| [v, v, v]).collect(),
        2 => img
            .data
            .chunks_exact(2)
            .flat_map(|p| {
                let v = over_white(p[0], p[1]);
                [v, v, v]
            })
            .collect(),
        3 => img.data.clone(),
        _ => img
            .data
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|c| over_white(p[c], p[3])))
            .collect(),
    };
    Pixels {
        width: img.width,
        height: img.height,
        channels: 3,
        data,
    }
}

/// Pillow's `convert("L")` of RGB (ITU-R 601-2 luma, L = R·299/1000 + G·587/1000 +
/// B·114/1000 in 16-bit fixed point), after [`to_rgb`] for images with alpha.
pub fn to_grey(img: &Pixels) -> Pixels {
    if img.channels == 1 {
        return img.clone();
    }
    let rgb = to_rgb(img);
    let data = rgb
        .data
        .chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    Pixels {
        width: img.width,
        height: img.height,
        channels: 1,
        data,
    }
}

/// A size in `preprocessor_config.json`: a number (old files: square) or a dictionary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Square(usize),
    Dict {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        height: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        width: Option<usize>,
        /// Resize the shorter side to this, keeping the aspect ratio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shortest_edge: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        longest_edge: Option<usize>,
    },
}

impl Default for SizeSpec {
    fn default() -> Self {
        SizeSpec::Dict {
            height: Some(224),
            width: Some(224),
            shortest_edge: None,
            longest_edge: None,
        }
    }
}

/// How an image of `(height, width)` is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Exact { height: usize, width: usize },
    ShortestEdge(usize),
}

impl SizeSpec {
    fn target(&self, field: &str) -> Result<Target> {
        let t = match *self {
            SizeSpec::Square(s) => Target::Exact {
                height: s,
                width: s,
            },
            SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                shortest_edge: None,
                longest_edge: None,
            } => Target::Exact {
                height: h,
                width: w,
            },
            SizeSpec::Dict {
                height: None,
                width: None,
                shortest_edge: Some(s),
                longest_edge: None,
            } => Target::ShortestEdge(s),
            ref other => {
                return Err(Error::invalid(
                    field,
                    "a number, {\"height\", \"width\"} or {\"shortest_edge\"}",
                    format!("{other:?}"),
                ))
            }
        };
        let zero = match t {
            Target::Exact { height, width } => height == 0 || width == 0,
            Target::ShortestEdge(s) => s == 0,
        };
        if zero {
            return Err(Error::invalid(field, "sizes > 0", format!("{self:?}")));
        }
        Ok(t)
    }
}

/// Per-channel values (`image_mean`, `image_std`): one number for every channel, or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerChannel {
    One(f64),
    Each(Vec<f64>),
}

impl PerChannel {
    /// One value per channel of `c`; `field` names the setting in the error.
    pub fn for_channels(&self, c: usize, field: &str) -> Result<Vec<f32>> {
        // numpy normalizes in the image's dtype, float32.
        match self {
            PerChannel::One(v) => Ok(vec![*v as f32; c]),
            PerChannel::Each(v) if v.len() == c => Ok(v.iter().map(|&x| x as f32).collect()),
            PerChannel::Each(v) if v.len() == 1 => Ok(vec![v[0] as f32; c]),
            PerChannel::Each(v) => Err(Error::invalid(
                field,
                if c == 1 {
                    "1 value (the model has 1 channel)".to_string()
                } else {
                    format!("1 or {c} values (the model's channels)")
                },
                format!("{} values", v.len()),
            )),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_half() -> PerChannel {
    // transformers' IMAGENET_STANDARD_MEAN / _STD (0.5 for each of R, G, B), as one value so
    // that it fits a grey model too.
    PerChannel::One(0.5)
}

/// `preprocessor_config.json` of a ViT image processor: the fields that change the pixels,
/// with `ViTImageProcessor`'s defaults; other fields (`image_processor_type`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// The resize target (default 224×224).
    #[serde(default)]
    pub size: SizeSpec,
    /// Pillow filter (default bilinear).
    #[serde(default)]
    pub resample: Resample,
    #[serde(default)]
    pub do_center_crop: bool,
    /// The centre crop after resizing (height and width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// Multiplies the bytes (default 1/255).
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    /// Subtracted per channel after rescaling (default 0.5).
    #[serde(default = "default_half")]
    pub image_mean: PerChannel,
    /// Divides per channel after the mean (default 0.5).
    #[serde(default = "default_half")]
    pub image_std: PerChannel,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: SizeSpec::default(),
            resample: Resample::Bilinear,
            do_center_crop: false,
            crop_size: None,
            do_rescale: true,
            rescale_factor: default_rescale(),
            do_normalize: true,
            image_mean: default_half(),
            image_std: default_half(),
        }
    }
}

impl ImageProcessorConfig {
    /// ViT's processor resizing to `size`×`size`.
    pub fn square(size: usize) -> Self {
        ImageProcessorConfig {
            size: SizeSpec::Square(size),
            ..Default::default()
        }
    }

    /// ViT's processor resizing to `size`×`size` (bilinear) and normalizing with `mean` and
    /// `std`: how `data.kind = "image_folder"` runs decode their images, in training and after.
    pub fn square_normalized(size: usize, mean: PerChannel, std: PerChannel) -> Self {
        ImageProcessorConfig {
            image_mean: mean,
            image_std: std,
            ..Self::square(size)
        }
    }

    /// Read `preprocessor_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }
}

/// The preprocessing of a ViT image processor for a model of 1 or 3 channels.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: ImageProcessorConfig,
    channels: usize,
    resize: Option<Target>,
    crop: Option<(usize, usize)>,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl ImageProcessor {
    /// Check the config for a model with `channels` input channels (1 or 3).
    pub fn new(cfg: ImageProcessorConfig, channels: usize) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(Error::invalid(
                "num_channels",
                "1 (grey) or 3 (RGB)",
                channels.to_string(),
            ));
        }
        let resize = if cfg.do_resize {
            Some(cfg.size.target("size")?)
        } else {
            None
        };
        let crop = match (cfg.do_center_crop, &cfg.crop_size) {
            (false, _) => None,
            (true, None) => {
                return Err(Error::invalid(
                    "crop_size",
                    "set when do_center_crop",
                    "nothing",
                ))
            }
            (true, Some(s)) => match s.target("crop_size")? {
                Target::Exact { height, width } => Some((height, width)),
                Target::ShortestEdge(_) => {
                    return Err(Error::invalid(
                        "crop_size",
                        "a number or {\"height\", \"width\"}",
                        format!("{s:?}"),
                    ))
                }
            },
        };
        let mean = cfg.image_mean.for_channels(channels, "image_mean")?;
        let std = cfg.image_std.for_channels(channels, "image_std")?;
        if cfg.do_normalize && std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::invalid(
                "image_std",
                "finite and non-zero",
                format!("{std:?}"),
            ));
        }
        if !cfg.rescale_factor.is_finite() {
            return Err(Error::invalid(
                "rescale_factor",
                "finite",
                cfg.rescale_factor.to_string(),
            ));
        }
        Ok(ImageProcessor {
            cfg,
            channels,
            resize,
            crop,
            mean,
            std,
        })
    }

    /// Read `preprocessor_config.json` (a file, or a model directory holding one).
    pub fn from_file(path: &Path, channels: usize) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(PREPROCESSOR_CONFIG_FILE)
        } else {
            path.to_path_buf()
        };
        let cfg = ImageProcessorConfig::read(&file)?;
        Self::new(cfg, channels).map_err(|e| e.in_source(&file.display().to_string()))
    }

    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    /// The (height, width) of the pixels an image of `(height, width)` becomes.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        if let Some((h, w)) = self.crop {
            return (h, w);
        }
        match self.resize {
            Some(t) => resize_target(t, height, width),
            None => (height, width),
        }
    }

    /// Convert, resize and crop, as bytes: what the Pillow processor holds before rescaling.
    pub fn resized(&self, img: &Pixels) -> Result<Pixels> {
        let img = if self.channels == 3 {
            to_rgb(img)
        } else {
            to_grey(img)
        };
        let img = match self.resize {
            Some(t) => {
                let (h, w) = resize_target(t, img.height, img.width);
                resize(&img, w, h, self.cfg.resample)?
            }
            None => img,
        };
        match self.crop {
            Some((h, w)) => center_crop(&img, h, w),
            None => Ok(img),
        }
    }

    /// One image's pixel values, channel-first.
    ///
    /// # Shapes
    /// `img`: (H₀, W₀) of any channel count → (C, H, W) as a flat vector, with (C, H, W)
    pub fn preprocess(&self, img: &Pixels) -> Result<(Vec<f32>, [usize; 3])> {
        let img = self.resized(img)?;
        let (c, h, w) = (img.channels, img.height, img.width);
        let mut out = vec![0f32; c * h * w];
        for (i, px) in img.data.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                // numpy: bytes to float64 times the factor, then float32; the normalization
                // in float32.
                let mut x = if self.cfg.do_rescale {
                    (v as f64 * self.cfg.rescale_factor) as f32
                } else {
                    v as f32
                };
                if self.cfg.do_normalize {
                    x = (x - self.mean[ch]) / self.std[ch];
                }
                out[ch * h * w + i] = x; // (C, H, W)
            }
        }
        Ok((out, [c, h, w]))
    }

    /// A batch of pixel values from decoded images; all must come out the same size.
    ///
    /// # Shapes
    /// `images`: B images → (B, C, H, W) f32
    pub fn pixel_values(&self, images: &[Pixels], device: &Device) -> Result<Tensor> {
        let mut data = Vec::new();
        let mut shape: Option<[usize; 3]> = None;
        for (i, img) in images.iter().enumerate() {
            let (v, s) = self.preprocess(img)?;
            match shape {
                None => shape = Some(s),
                Some(first) if first != s => {
                    return Err(Error::input(
                        format!("image {i} of the batch"),
                        format!("pixels of {first:?} like the first"),
                        format!("{s:?}"),
                    ))
                }
                Some(_) => {}
            }
            data.extend(v);
        }
        let Some([c, h, w]) = shape else {
            return Err(Error::input("image batch", "at least one image", "none"));
        };
        Ok(Tensor::from_vec(data, (images.len(), c, h, w), device)?)
    }

    /// Read, decode and preprocess image files; errors name the file.
    ///
    /// # Shapes
    /// `paths`: B files → (B, C, H, W) f32
    pub fn load_files<P: AsRef<Path>>(&self, paths: &[P], device: &Device) -> Result<Tensor> {
        let mut images = Vec::with_capacity(paths.len());
        for p in paths {
            images.push(read_image(p.as_ref())?);
        }
        self.pixel_values(&images, device)
    }
}

/// transformers' output size: exact, or the shorter side to `s` with the longer scaled and
/// truncated (`get_resize_output_image_size(default_to_square=False)`).
fn resize_target(t: Target, height: usize, width: usize) -> (usize, usize) {
    match t {
        Target::Exact { height, width } => (height, width),
        Target::ShortestEdge(s) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_long = ((s * long) as f64 / short as f64) as usize;
            if width <= height {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// transformers' `center_crop` (top and left offsets rounded down) of an image at least as
/// large as the crop; smaller images, which transformers pads with zeros, are refused.
fn center_crop(img: &Pixels, h: usize, w: usize) -> Result<Pixels> {
    if h > img.height || w > img.width {
        return Err(Error::input(
            "centre crop",
            format!("an image of at least {h}x{w} (height x width) after resizing"),
            format!("{}x{}", img.height, img.width),
        ));
    }
    let (top, left, c) = ((img.height - h) / 2, (img.width - w) / 2, img.channels);
    let mut data = Vec::with_capacity(h * w * c);
    for y in top..top + h {
        let row = (y * img.width + left) * c;
        data.extend_from_slice(&img.data[row..row + w * c]);
    }
    Pixels::new(w, h, c, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_over_white_keeps_opaque_and_whitens_transparent() {
        for v in [0u8, 1, 77, 254, 255] {
            assert_eq!(over_white(v, 255), v);
            assert_eq!(over_white(v, 0), 255);
        }
        // Half transparent black is mid grey.
        assert!((over_white(0, 128) as i32 - 127).abs() <= 1);
    }

    #[test]
    fn grey_of_grey_is_itself_and_of_rgb_is_the_luma() -> Result<()> {
        let g = Pixels::new(2, 1, 1, vec![3, 250])?;
        assert_eq!(to_grey(&to_rgb(&g)).data, [3, 250]);
        let rgb = Pixels::new(1, 1, 3, vec![255, 0, 0])?;
        assert_eq!(to_grey(&rgb).data, [76]); // 255 · 0.299
        Ok(())
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_truncated() {
        assert_eq!(
            resize_target(Target::ShortestEdge(256), 427, 640),
            (256, 383)
        );
        assert_eq!(
            resize_target(Target::ShortestEdge(256), 640, 427),
            (383, 256)
        );
    }

    #[test]
    fn config_defaults_are_vits_and_old_forms_parse() -> Result<()> {
        let cfg: ImageProcessorConfig = serde_json::from_str("{}").map_err(|e| Error::Json {
            what: "test".into(),
            source: e,
        })?;
        assert_eq!(cfg, ImageProcessorConfig::default());
        let old: ImageProcessorConfig = serde_json::from_str(
            r#"{"size": 384, "resample": 3, "image_mean": 0.5}"#,
        )
        .map_err(|e| Error::Json {
            what: "test".into(),
            source: e,
        })?;
        let p = ImageProcessor::new(old, 3)?;
        assert_eq!(p.output_size(10, 20), (384, 384));
        let bad = ImageProcessorConfig {
            image_mean: PerChannel::Each(vec![0.5, 0.5]),
            ..Default::default()
        };
        let err = ImageProcessor::new(bad, 3).unwrap_err().to_string();
        assert!(
            err.contains("image_mean") && err.contains("2 values"),
            "{err}"
        );
        Ok(())
    }
}
