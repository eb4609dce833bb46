//! `transformer generate-image --checkpoint DIR --out FILE.png [--per-class N]`: new images
//! from a model trained on `data.kind = "pixels"`, drawn pixel by pixel, one row of the grid
//! per class (class 0 at the top), written as a PNG.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use image::{GrayImage, Luma};
use transformer::decode::image::sample_images;
use transformer::decode::Sampling;
use transformer::pipelines::generate_image::load_pixel_model;
use transformer::rng::Rng;

#[derive(Args)]
pub struct GenerateImageArgs {
    /// A checkpoint or run directory trained with data.kind = "pixels".
    #[arg(long)]
    checkpoint: PathBuf,
    /// The PNG grid to write (an existing file only with --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
    /// Images per class (the columns of the grid).
    #[arg(long, default_value_t = 8, allow_hyphen_values = true)]
    per_class: usize,
    /// Only these classes (comma-separated labels), in this order; all by default.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    classes: Vec<usize>,
    /// Sampling temperature; 1 draws from the model's distribution, 0 is greedy.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    temperature: f64,
    /// Sample only among the k most likely grey levels.
    #[arg(long, allow_hyphen_values = true)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1337, allow_hyphen_values = true)]
    seed: u64,
    /// Each pixel drawn as a square of this many pixels.
    #[arg(long, default_value_t = 2, allow_hyphen_values = true)]
    scale: u32,
}

/// Grid gap between images, in output pixels.
const GAP: u32 = 2;

pub fn run(args: GenerateImageArgs) -> Result<()> {
    if args.per_class == 0 || args.per_class > 64 {
        bail!("--per-class must be from 1 to 64, got {}", args.per_class);
    }
    if args.scale == 0 || args.scale > 16 {
        bail!("--scale must be from 1 to 16, got {}", args.scale);
    }
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: None,
    };
    sampling.validate().context("invalid sampling flags")?;
    crate::output::check_not_input(
        "--out",
        &args.out,
        &[("--checkpoint", args.checkpoint.as_path())],
    )?;
    crate::output::check_file("--out", &args.out, args.force)?;
    let device = crate::device()?;
    let m = load_pixel_model(&args.checkpoint, &device)
        .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
    let t = m.tokens;
    let classes: Vec<usize> = if args.classes.is_empty() {
        (0..t.classes).collect()
    } else {
        args.classes.clone()
    };
    if let Some(&c) = classes.iter().find(|&&c| c >= t.classes) {
        bail!(
            "--classes: {c} is not a class of this model (it has {}: 0 to {})",
            t.classes,
            t.classes - 1
        );
    }
    let labels: Vec<usize> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, args.per_class))
        .collect();
    let mut rng = Rng::new(args.seed);
    let start = std::time::Instant::now();
    let images = sample_images(m.model.as_ref(), &t, &labels, &sampling, &mut rng, &device)?;
    let seconds = start.elapsed().as_secs_f64();
    let side = t.side as u32 * args.scale;
    let cols = args.per_class as u32;
    let rows = classes.len() as u32;
    let mut grid = GrayImage::from_pixel(
        cols * (side + GAP) + GAP,
        rows * (side + GAP) + GAP,
        Luma([128]),
    );
    for (k, img) in images.iter().enumerate() {
        let (r, c) = ((k / args.per_class) as u32, (k % args.per_class) as u32);
        let (x0, y0) = (GAP + c * (side + GAP), GAP + r * (side + GAP));
        for (i, &v) in img.iter().enumerate() {
            let (py, px) = ((i / t.side) as u32, (i % t.side) as u32);
            for dy in 0..args.scale {
                for dx in 0..args.scale {
                    grid.put_pixel(
                        x0 + px * args.scale + dx,
                        y0 + py * args.scale + dy,
                        Luma([v]),
                    );
                }
            }
        }
    }
    let mut png = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the PNG")?;
    crate::output::write_file(&args.out, &png)?;
    println!(
        "{}",
        serde_json::json!({
            "checkpoint": m.dir.display().to_string(),
            "out": args.out.display().to_string(),
            "classes": classes,
            "per_class": args.per_class,
            "side": t.side,
            "levels": t.levels,
            "temperature": args.temperature,
            "seed": args.seed,
            "seconds": seconds,
        })
    );
    Ok(())
}
