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

// ---------------------------------------------------------------------------------------
// The Hugging Face checkpoint: logits, hidden states, interpolated positions.

fn hf_model() -> Result<transformer::import::hf_vit::HfViT> {
    transformer::import::hf_vit::load(&fixtures().join("model"), &Device::Cpu)
}

#[test]
fn hugging_face_vit_gives_transformers_logits_for_both_photos() -> Result<()> {
    let r = reference();
    let hf = hf_model()?;
    assert_eq!(
        hf.config.labels(),
        ["cat", "dog", "temple", "flower", "other"]
    );
    for name in ["china", "flower"] {
        let logits = hf
            .model
            .classify(get(&r, &format!("pixels.{name}")), false)?;
        let d = max_abs_diff(&logits, get(&r, &format!("logits.{name}")))?;
        println!("logits.{name}: max |ours - transformers| = {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
    // A batch of both gives each its own logits.
    let both = Tensor::cat(&[get(&r, "pixels.china"), get(&r, "pixels.flower")], 0)?;
    let logits = hf.model.classify(&both, false)?;
    let want = Tensor::cat(&[get(&r, "logits.china"), get(&r, "logits.flower")], 0)?;
    assert!(max_abs_diff(&logits, &want)? <= 1e-4);
    Ok(())
}

#[test]
fn hugging_face_vit_gives_every_hidden_state_of_transformers() -> Result<()> {
    let r = reference();
    let hf = hf_model()?;
    let opts = transformer::models::ViTOptions {
        hidden_states: true,
        attentions: true,
        ..Default::default()
    };
    let out = hf.model.forward_with(get(&r, "pixels.china"), &opts)?;
    assert_eq!(out.hidden_states.len(), 4);
    for (i, h) in out.hidden_states.iter().enumerate() {
        let d = max_abs_diff(h, get(&r, &format!("hidden.china.{i}")))?;
        println!("hidden_states[{i}]: max diff {d:e}");
        assert!(d <= 1e-4, "hidden state {i}: {d}");
    }
    let d = max_abs_diff(&out.last_hidden, get(&r, "last_hidden.china"))?;
    println!("last_hidden_state: max diff {d:e}");
    assert!(d <= 1e-4);
    // Attention weights per layer and head, rows summing to one: (B, Hd, T, T).
    assert_eq!(out.attentions.len(), 3);
    for a in &out.attentions {
        assert_eq!(a.dims(), [1, 4, 17, 17]);
        let rows = a.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }
    Ok(())
}

#[test]
fn position_embeddings_interpolate_as_transformers_at_another_size() -> Result<()> {
    let r = reference();
    let hf = hf_model()?;
    // 48x48 pixels in patches of 8: a 6x6 grid for a table learned on 4x4.
    let pos = hf.model.position_embeddings(6, 6)?;
    let d = max_abs_diff(&pos, get(&r, "pos48"))?;
    println!("interpolated position embeddings (4x4 -> 6x6): max diff {d:e}");
    assert!(d <= 1e-5, "{d}");
    let logits = hf.model.classify(get(&r, "pixels48.china"), false)?;
    let d = max_abs_diff(&logits, get(&r, "logits48.china"))?;
    println!("logits48.china: max diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    Ok(())
}

#[test]
fn photos_classify_end_to_end_through_the_checkpoints_processor() -> Result<()> {
    let hf = hf_model()?;
    let px = hf
        .processor
        .load_files(&[photo("china.jpg"), photo("flower.jpg")], &Device::Cpu)?;
    assert_eq!(px.dims(), [2, 3, 32, 32]);
    let logits = hf.model.classify(&px, false)?;
    let r = reference();
    let want = Tensor::cat(&[get(&r, "logits.china"), get(&r, "logits.flower")], 0)?;
    // The JPEG decoders differ by a grey level here and there: not bit-equal, but close.
    let d = max_abs_diff(&logits, &want)?;
    println!("logits from the JPEG files through our decoder: max diff {d:e}");
    assert!(d <= 1e-2, "{d}");
    Ok(())
}

#[test]
fn hugging_face_checkpoint_errors_name_the_tensor() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("transformer-vit-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| transformer::Error::io(&dir, e))?;
    let src = fixtures().join("model");
    let copy = |f: &str| std::fs::copy(src.join(f), dir.join(f)).map(|_| ());
    copy("config.json").map_err(|e| transformer::Error::io(&dir, e))?;
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
    w.remove("vit.encoder.layer.2.layernorm_after.bias");
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    let err = transformer::import::hf_vit::load(&dir, &Device::Cpu)
        .err()
        .expect("missing tensor")
        .to_string();
    assert!(
        err.contains("vit.encoder.layer.2.layernorm_after.bias") && err.contains("missing"),
        "{err}"
    );
    // A config that is not a ViT's.
    let text = std::fs::read_to_string(src.join("config.json"))
        .map_err(|e| transformer::Error::io(&src, e))?
        .replace("\"model_type\": \"vit\"", "\"model_type\": \"bert\"");
    std::fs::write(dir.join("config.json"), text).map_err(|e| transformer::Error::io(&dir, e))?;
    let err = transformer::import::hf_vit::load(&dir, &Device::Cpu)
        .err()
        .expect("bert config")
        .to_string();
    assert!(err.contains("model_type") && err.contains("bert"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A `ViTModel` checkpoint (no `vit.` prefix, no head, a pooler that is ignored) written with
/// transformers 5's in-memory names (`layers.N.attention.q_proj`, `mlp.fc1`, ...) loads too
/// and gives the same last hidden state.
#[test]
fn headless_checkpoints_with_transformers_5_names_load_too() -> Result<()> {
    let r = reference();
    let dir = std::env::temp_dir().join(format!("transformer-vit-v5-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| transformer::Error::io(&dir, e))?;
    let src = fixtures().join("model");
    std::fs::copy(src.join("config.json"), dir.join("config.json"))
        .map_err(|e| transformer::Error::io(&dir, e))?;
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
    let renames = [
        ("encoder.layer.", "layers."),
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ];
    let mut renamed = HashMap::new();
    for (name, t) in w {
        let Some(body) = name.strip_prefix("vit.") else {
            continue; // the classifier: a ViTModel has none
        };
        let mut n = body.to_string();
        for (old, new) in renames {
            n = n.replace(old, new);
        }
        renamed.insert(n, t);
    }
    let e = 64;
    renamed.insert(
        "pooler.dense.weight".into(),
        Tensor::zeros((e, e), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&renamed, dir.join("model.safetensors"))?;
    let hf = transformer::import::hf_vit::load(&dir, &Device::Cpu)?;
    assert_eq!(hf.config.n_labels(), 0);
    let out = hf.model.forward(get(&r, "pixels.china"), false)?;
    let d = max_abs_diff(&out, get(&r, "last_hidden.china"))?;
    println!("ViTModel with transformers-5 names: last hidden max diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    assert!(hf.model.classify(get(&r, "pixels.china"), false).is_err());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Our model: gradients and training.

#[test]
fn embedding_gradients_match_finite_differences_at_another_size() -> Result<()> {
    use transformer::models::{FamilyConfig, ViTConfig};
    let cfg = ViTConfig {
        hidden_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 8,
        image_size: 8,
        patch_size: 4,
        num_channels: 2,
        num_labels: Some(2),
        ..ViTConfig::tiny()
    };
    let vs = cfg.var_store(DType::F64, &Device::Cpu, 3);
    let vit = cfg.build(&vs.root())?;
    let mut rng = transformer::rng::Rng::new(5);
    // 13x10 pixels: a 3x2 grid (the table is 2x2), rows and columns past it dropped.
    let px = common::randn_var(&mut rng, &[2, 2, 13, 10])?;
    let g = common::randn(&mut rng, &[2, 7, 8], 1.0, DType::F64)?;
    let mut vars: Vec<(String, candle_core::Var)> = vs
        .vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("embed."))
        .collect();
    vars.push(("pixels".into(), px.clone()));
    assert_eq!(vars.len(), 5, "patch weight and bias, cls, pos, pixels");
    common::check_grads("ViT embeddings (3x2 grid)", &vars, &mut rng, || {
        Ok((vit.embed(px.as_tensor(), false)? * &g)?.sum_all()?)
    })
}

#[test]
fn a_few_training_steps_lower_the_loss_on_a_toy_batch() -> Result<()> {
    use transformer::models::{ViT, ViTConfig};
    use transformer::train::{cross_entropy, AdamW, AdamWConfig, CrossEntropyConfig};
    let cfg = ViTConfig::tiny();
    let (vit, vs) = ViT::init(&cfg, DType::F32, &Device::Cpu, 1)?;
    let mut rng = transformer::rng::Rng::new(2);
    let px = common::randn(&mut rng, &[6, 3, 16, 16], 1.0, DType::F32)?;
    let labels = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &Device::Cpu)?;
    let mut opt = AdamW::new(vs.vars(), AdamWConfig::nanogpt())?;
    let ce = CrossEntropyConfig::default();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let loss = cross_entropy(&vit.classify(&px, true)?, &labels, &ce)?;
        losses.push(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3)?;
    }
    println!("toy batch losses: {losses:?}");
    assert!(losses[4] < losses[0] - 0.05, "{losses:?}");
    // Every parameter received a gradient (none stopped at a fused op).
    let loss = cross_entropy(&vit.classify(&px, true)?, &labels, &ce)?;
    let grads = loss.backward()?;
    for (name, var) in vs.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn vit_saves_and_loads_its_config_and_weights() -> Result<()> {
    use transformer::models::{save_model, ViT, ViTConfig};
    let dir = std::env::temp_dir().join(format!("transformer-vit-save-{}", std::process::id()));
    let cfg = ViTConfig::fashion_mnist();
    let (vit, vs) = ViT::init(&cfg, DType::F32, &Device::Cpu, 4)?;
    save_model(&dir, &cfg, &vs)?;
    let (back, _) = ViT::load(&dir, &Device::Cpu)?;
    assert_eq!(back.config(), &cfg);
    let px = Tensor::ones((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
    assert_eq!(
        max_abs_diff(&vit.classify(&px, false)?, &back.classify(&px, false)?)?,
        0.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bad input: a clear error naming the file, never a panic.

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("transformer-vit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Scratch(d)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("dir");
        }
        std::fs::write(&p, bytes).expect("write");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn err_of<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The start of a PNG of `w`x`h` grey pixels: the signature, a valid IHDR chunk and an empty
/// IDAT chunk, which is as far as a reader goes for the size; the pixels themselves are absent.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(b"IDAT", &[]));
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn bad_image_files_are_errors_naming_the_file() -> Result<()> {
    let s = Scratch::new("bad-images");
    let good = std::fs::read(fixtures().join("small/noise.png"))
        .map_err(|e| transformer::Error::io("noise.png", e))?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "text.png",
            b"hello, I am not an image\n".to_vec(),
            "not a PNG or JPEG",
        ),
        ("empty.jpg", Vec::new(), "the file is empty"),
        (
            "truncated.png",
            good[..good.len() / 2].to_vec(),
            "cannot decode the PNG",
        ),
        ("header.png", good[..40].to_vec(), "PNG"),
        (
            "huge.png",
            png_header_only(10_000, 10_000),
            "more than the 89478485",
        ),
        ("zero.png", png_header_only(0, 5), "PNG"),
        (
            "image.gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            "only PNG and JPEG",
        ),
        (
            "jpeg-head.jpg",
            vec![0xff, 0xd8, 0xff, 0xe0, 0, 0x10],
            "JPEG",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = s.write(name, &bytes);
        let err = err_of(read_image(&path));
        println!("{name}: {err}");
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    // A truncated photo as well (JPEG decoders may pad a cut-off scan; either way no panic,
    // and an error names the file).
    let jpg = std::fs::read(photo("china.jpg")).map_err(|e| transformer::Error::io("china", e))?;
    let path = s.write("cut.jpg", &jpg[..jpg.len() / 3]);
    match read_image(&path) {
        Ok(img) => assert_eq!((img.width, img.height), (640, 427)),
        Err(e) => assert!(e.to_string().contains("cut.jpg"), "{e}"),
    }
    // A missing file.
    let err = err_of(read_image(&s.0.join("nope.png")));
    assert!(err.contains("nope.png"), "{err}");
    Ok(())
}

#[test]
fn grey_rgb_and_rgba_all_feed_a_grey_or_an_rgb_model() -> Result<()> {
    let rgb = ImageProcessor::new(ImageProcessorConfig::square(8), 3)?;
    let grey = ImageProcessor::new(ImageProcessorConfig::square(8), 1)?;
    for name in ["noise", "noise_l", "la", "rgba", "palette", "one"] {
        let img = read_image(&fixtures().join(format!("small/{name}.png")))?;
        assert_eq!(
            rgb.pixel_values(std::slice::from_ref(&img), &Device::Cpu)?
                .dims(),
            [1, 3, 8, 8]
        );
        assert_eq!(
            grey.pixel_values(&[img], &Device::Cpu)?.dims(),
            [1, 1, 8, 8]
        );
    }
    let err = err_of(ImageProcessor::new(ImageProcessorConfig::square(8), 4));
    assert!(err.contains("num_channels"), "{err}");
    Ok(())
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

#[test]
fn idx_files_read_raw_and_gzipped_and_refuse_bad_ones() -> Result<()> {
    use transformer::data::idx::{read_idx, LabelledImages};
    let s = Scratch::new("idx");
    let pixels: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8 * 10).collect();
    let images = s.write(
        "train-images-idx3-ubyte.gz",
        &gzip(&idx(&[2, 3, 4], &pixels)),
    );
    let labels = s.write("train-labels-idx1-ubyte", &idx(&[2], &[7, 1]));
    let set = LabelledImages::read_idx(&images, &labels)?;
    assert_eq!((set.len(), set.height, set.width), (2, 3, 4));
    assert_eq!(set.image(1)?.data, pixels[12..]);
    let (px, lab) = set.batch(&[1, 0], 0.5, 0.5, &Device::Cpu)?;
    assert_eq!(px.dims(), [2, 1, 3, 4]);
    assert_eq!(lab.to_vec1::<u32>()?, [1, 7]);
    assert!(set.image(2).is_err());

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short.idx", idx(&[2, 3, 4], &pixels[..20]), "truncated"),
        (
            "long.idx",
            idx(&[2, 3, 4], &[pixels.clone(), vec![1]].concat()),
            "more data",
        ),
        (
            "magic.idx",
            b"\x01\x02\x08\x01abcd".to_vec(),
            "not an IDX file",
        ),
        (
            "type.idx",
            vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0],
            "0x0d",
        ),
        ("dims.idx", vec![0, 0, 8, 3, 0, 0], "truncated IDX header"),
        ("huge.idx", idx(&[u32::MAX, u32::MAX, 2], &[]), "exceed"),
        (
            "bad.gz",
            vec![0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7],
            "gzipped IDX",
        ),
        (
            "cut.gz",
            gzip(&idx(&[2, 3, 4], &pixels))[..30].to_vec(),
            "gzipped IDX",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = s.write(name, &bytes);
        let err = err_of(read_idx(&path));
        println!("{name}: {err}");
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    // Counts that disagree, and files of the wrong rank.
    let three = s.write("three-labels", &idx(&[3], &[0, 1, 2]));
    let err = err_of(LabelledImages::read_idx(&images, &three));
    println!("counts: {err}");
    assert!(
        err.contains("three-labels") && err.contains("3 labels") && err.contains("2 images"),
        "{err}"
    );
    let err = err_of(LabelledImages::read_idx(&labels, &labels));
    assert!(err.contains("3 dimensions"), "{err}");
    let err = err_of(LabelledImages::read_idx(&images, &images));
    assert!(err.contains("1 dimension"), "{err}");
    Ok(())
}

#[test]
fn image_folders_list_classes_and_refuse_empty_ones() -> Result<()> {
    use transformer::data::image_folder::ImageFolder;
    let s = Scratch::new("folder");
    let png = std::fs::read(fixtures().join("small/noise.png"))
        .map_err(|e| transformer::Error::io("noise.png", e))?;
    s.write("data/dog/b.png", &png);
    s.write("data/dog/nested/a.PNG", &png);
    s.write("data/cat/x.png", &png);
    s.write("data/cat/notes.txt", b"not an image");
    s.write("data/.hidden/y.png", &png);
    let folder = ImageFolder::scan(&s.0.join("data"))?;
    assert_eq!(folder.classes, ["cat", "dog"]);
    let labels: Vec<usize> = folder.samples.iter().map(|(_, l)| *l).collect();
    assert_eq!(labels, [0, 1, 1]);
    let proc = ImageProcessor::new(ImageProcessorConfig::square(8), 3)?;
    let (px, lab) = folder.batch(&[0, 2], &proc, &Device::Cpu)?;
    assert_eq!(px.dims(), [2, 3, 8, 8]);
    assert_eq!(lab.to_vec1::<u32>()?, [0, 1]);

    // A class folder with no images.
    s.write("data/empty/readme.txt", b"nothing here");
    let err = err_of(ImageFolder::scan(&s.0.join("data")));
    println!("empty class: {err}");
    assert!(
        err.contains("empty") && err.contains("without images"),
        "{err}"
    );
    // A bad image inside is named when it is loaded.
    std::fs::remove_dir_all(s.0.join("data/empty")).expect("rm");
    s.write("data/cat/y.png", b"broken");
    let folder = ImageFolder::scan(&s.0.join("data"))?;
    let err = err_of(folder.batch(&[0, 1], &proc, &Device::Cpu));
    assert!(
        err.contains("y.png") && err.contains("not a PNG or JPEG"),
        "{err}"
    );
    // No class folders, and no folder at all.
    s.write("flat/a.png", &png);
    let err = err_of(ImageFolder::scan(&s.0.join("flat")));
    assert!(
        err.contains("flat") && err.contains("no class folders"),
        "{err}"
    );
    let err = err_of(ImageFolder::scan(&s.0.join("missing")));
    assert!(err.contains("missing"), "{err}");
    Ok(())
}
