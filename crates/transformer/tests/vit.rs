//! The Vision Transformer (issue 14): images in, exactly as transformers' ViT image processor
//! (Pillow's resize), and a Hugging Face `ViTForImageClassification` checkpoint giving the
//! same logits and hidden states as transformers. References are written by
//! `tests/fixtures/gen_vit.py` into `tests/fixtures/vit/`; the two scikit-learn photos come
//! from `scripts/fetch-sklearn-images.sh` (git-ignored `.cache/`), and a test that needs them
//! fails, naming the script, when they are missing. Each comparison prints its max difference.
//!
//! Dimension letters: `B` batch, `C` channels, `H`/`W` image height/width, `T` tokens
//! (1 + patches), `E` hidden width.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use transformer::data::images::{
    read_image, resize, ImageProcessor, ImageProcessorConfig, Pixels, Resample,
};
use transformer::Result;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vit")
}

/// The photos' directory (`TRANSFORMER_SKLEARN_IMAGES`, by default the fetch script's cache).
fn photos() -> PathBuf {
    match std::env::var_os("TRANSFORMER_SKLEARN_IMAGES") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/sklearn-images/images")
        }
    }
}

fn photo(name: &str) -> PathBuf {
    let p = photos().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-sklearn-images.sh",
        p.display()
    );
    p
}

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/gen_vit.py)", path.display()))
}

fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("reference.safetensors has no {key}"))
}

fn model_processor() -> Result<ImageProcessor> {
    ImageProcessor::from_file(&fixtures().join("model"), 3)
}

/// Bytes (H, W, C) as a u8 tensor.
fn bytes(p: &Pixels) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        p.data.clone(),
        (p.height, p.width, p.channels),
        &Device::Cpu,
    )?)
}

#[test]
fn resize_is_pillows_bit_for_bit_for_every_filter() -> Result<()> {
    let r = reference();
    let rgb = read_image(&fixtures().join("small/noise.png"))?;
    let grey = read_image(&fixtures().join("small/noise_l.png"))?;
    assert_eq!((rgb.width, rgb.height, rgb.channels), (13, 9, 3));
    assert_eq!(grey.channels, 1);
    let mut checked = 0;
    for (key, t) in &r {
        let parts: Vec<&str> = key.split('.').collect();
        let img = match parts[0] {
            "resize" => &rgb,
            "resize_l" => &grey,
            _ => continue,
        };
        let [_, f, size] = parts[..] else {
            panic!("reference key {key}")
        };
        let filter = Resample::try_from(f.parse::<u8>().expect("filter")).expect("filter");
        let (w, h) = size.split_once('x').expect("WxH");
        let (w, h): (usize, usize) = (w.parse().expect("W"), h.parse().expect("H"));
        let ours = bytes(&resize(img, w, h, filter)?)?;
        let d = max_abs_diff(&ours, t)?;
        assert_eq!(d, 0.0, "{key}: differs from Pillow by {d} levels");
        checked += 1;
    }
    assert_eq!(checked, 2 * 6 * 6, "resize references");
    println!(
        "resize: {checked} Pillow resizes (6 filters, 6 sizes, RGB and grey) equal, max diff 0"
    );
    Ok(())
}

#[test]
fn pixel_tensor_matches_the_python_processor_on_lossless_photos() -> Result<()> {
    let r = reference();
    let vit = model_processor()?;
    let bicubic = ImageProcessor::from_file(&fixtures().join("preprocessor_bicubic.json"), 3)?;
    for name in ["china_crop", "flower_crop"] {
        let img = read_image(&fixtures().join(format!("{name}.png")))?;
        for (proc, key, shape) in [
            (&vit, format!("pixels.{name}"), [1, 3, 32, 32]),
            (&bicubic, format!("pixels_bicubic.{name}"), [1, 3, 64, 64]),
        ] {
            let ours = proc.pixel_values(std::slice::from_ref(&img), &Device::Cpu)?;
            assert_eq!(ours.dims(), shape, "{key}");
            let d = max_abs_diff(&ours, get(&r, &key))?;
            println!("{key}: max |ours - transformers| = {d:e}");
            assert!(d <= 1e-5, "{key}: {d}");
        }
    }
    Ok(())
}

#[test]
fn every_colour_mode_converts_as_transformers_convert_to_rgb() -> Result<()> {
    let r = reference();
    let proc = model_processor()?;
    for (name, channels) in [
        ("noise", 3),
        ("noise_l", 1),
        ("la", 2),
        ("rgba", 4),
        ("palette", 4),
    ] {
        let img = read_image(&fixtures().join(format!("small/{name}.png")))?;
        assert_eq!(img.channels, channels, "{name}");
        let ours = proc.pixel_values(&[img], &Device::Cpu)?;
        let d = max_abs_diff(&ours, get(&r, &format!("pixels_rgb.{name}")))?;
        println!("pixels_rgb.{name}: max diff {d:e}");
        assert!(d <= 1e-5, "{name}: {d}");
    }
    // 1x1 is a valid image: Pillow resizes it to a constant (transformers itself misreads a
    // (1, 1, 3) array as channels-first, so the reference is Pillow's resize).
    let one = read_image(&fixtures().join("small/one.png"))?;
    assert_eq!((one.width, one.height), (1, 1));
    let resized = proc.resized(&one)?;
    assert_eq!(max_abs_diff(&bytes(&resized)?, get(&r, "resize_one"))?, 0.0);
    Ok(())
}

/// The JPEG photos end to end. The `image` crate decodes JPEG with a different integer IDCT
/// than Pillow's libjpeg-turbo (up to 3 levels on ~1% of the values), so after the resize a
/// pixel may differ by a level or two: 1/255/0.5 ≈ 0.0078 per level. The bound is two levels.
#[test]
fn pixel_tensor_of_the_jpeg_photos_is_within_two_grey_levels() -> Result<()> {
    let r = reference();
    let proc = model_processor()?;
    for name in ["china", "flower"] {
        let ours = proc.load_files(&[photo(&format!("{name}.jpg"))], &Device::Cpu)?;
        let theirs = get(&r, &format!("pixels.{name}"));
        let d = max_abs_diff(&ours, theirs)?;
        let differ = (ours.sub(theirs)?.abs()?.gt(1e-5)?)
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        println!(
            "pixels.{name} (JPEG): max diff {d:e} ({} of {} values differ)",
            differ,
            ours.elem_count()
        );
        assert!(d <= 2.0 / 255.0 / 0.5 + 1e-5, "{name}: {d}");
    }
    Ok(())
}

#[test]
fn processor_config_reads_hugging_face_files() -> Result<()> {
    let cfg = ImageProcessorConfig::read(&fixtures().join("model/preprocessor_config.json"))?;
    assert_eq!(cfg.resample, Resample::Bilinear);
    assert_eq!(ImageProcessor::new(cfg, 3)?.output_size(427, 640), (32, 32));
    let cfg = ImageProcessorConfig::read(&fixtures().join("preprocessor_bicubic.json"))?;
    assert_eq!(cfg.resample, Resample::Bicubic);
    assert_eq!(ImageProcessor::new(cfg, 3)?.output_size(427, 640), (64, 64));
    Ok(())
}
