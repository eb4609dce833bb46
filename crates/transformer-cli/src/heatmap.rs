//! PNG heatmaps laid over an image, with a colour bar: how `classify --attention-out` shows
//! where a Vision Transformer looked. Drawn pixel by pixel into an RGB buffer (no fonts or
//! native libraries); the colour bar's two numbers use a 3×5 bitmap font of digits.

use std::path::Path;

use anyhow::{bail, Context, Result};
use transformer::data::resize::Pixels;

/// viridis (matplotlib's default colour map) at five stops, interpolated linearly: dark blue
/// for little attention, yellow for the most.
const VIRIDIS: [(f32, [f32; 3]); 5] = [
    (0.0, [68.0, 1.0, 84.0]),
    (0.25, [59.0, 82.0, 139.0]),
    (0.5, [33.0, 145.0, 140.0]),
    (0.75, [94.0, 201.0, 98.0]),
    (1.0, [253.0, 231.0, 37.0]),
];

/// The colour of `t` in [0, 1].
pub fn colour(t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    for w in VIRIDIS.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if t <= t1 {
            let f = (t - t0) / (t1 - t0);
            return [0, 1, 2].map(|i| (c0[i] + f * (c1[i] - c0[i])).round() as u8);
        }
    }
    VIRIDIS[4].1.map(|v| v as u8)
}

/// 3×5 glyphs of the digits and the point, one row per entry, high bit on the left.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b001, 0b001, 0b001],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0, 0, 0, 0, 0b010],
        _ => return None,
    })
}

/// An RGB canvas.
struct Canvas {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            data: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// `text` (digits and points) with its top-left corner at (x, y), each font pixel `s`×`s`.
    fn text(&mut self, text: &str, x: usize, y: usize, s: usize) {
        let mut cx = x;
        for ch in text.chars() {
            if let Some(rows) = glyph(ch) {
                for (ry, bits) in rows.iter().enumerate() {
                    for rx in 0..3 {
                        if bits & (0b100 >> rx) != 0 {
                            for dy in 0..s {
                                for dx in 0..s {
                                    self.set(cx + rx * s + dx, y + ry * s + dy, [0, 0, 0]);
                                }
                            }
                        }
                    }
                }
            }
            cx += 4 * s;
        }
    }
}

/// A number for the colour bar: three significant digits without an exponent.
fn label(v: f32) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `map` (a `gh`×`gw` grid of non-negative values, row-major: one per patch of `patch`×`patch`
/// pixels) coloured from 0 to its maximum and blended half and half over `image` (the model's
/// input, grey or RGB), enlarged to about 256 pixels; a colour bar from 0 (bottom) to the
/// maximum (top) on the right. Written as PNG to `path`.
pub fn write_overlay(
    image: &Pixels,
    map: &[f32],
    (gh, gw): (usize, usize),
    patch: usize,
    path: &Path,
) -> Result<()> {
    if map.len() != gh * gw || gh * patch > image.height || gw * patch > image.width {
        bail!(
            "a {gh}x{gw} map of {patch}-pixel patches does not fit a {}x{} image ({} values)",
            image.height,
            image.width,
            map.len()
        );
    }
    let (h, w) = (image.height, image.width);
    let scale = (256 / h.max(w)).max(1);
    let max = map
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0f32, f32::max);
    let (iw, ih) = (w * scale, h * scale);
    let margin = 10;
    let bar_w = 16;
    let top_label = label(max);
    let text_w = 4 * 2 * top_label.len().max(1);
    let cw = margin + iw + margin + bar_w + 6 + text_w + margin;
    let ch = margin + ih + margin;
    let mut canvas = Canvas::new(cw, ch);
    for y in 0..h {
        for x in 0..w {
            let px = &image.data[(y * w + x) * image.channels..];
            let base = if image.channels >= 3 {
                [px[0], px[1], px[2]]
            } else {
                [px[0]; 3]
            };
            let (py, pxi) = (y / patch, x / patch);
            let c = if py < gh && pxi < gw {
                let v = map[py * gw + pxi];
                let heat = colour(if max > 0.0 { v / max } else { 0.0 });
                [0, 1, 2].map(|i| ((base[i] as u16 + heat[i] as u16) / 2) as u8)
            } else {
                // Rows and columns past the last whole patch are not seen by the model.
                base
            };
            for dy in 0..scale {
                for dx in 0..scale {
                    canvas.set(margin + x * scale + dx, margin + y * scale + dy, c);
                }
            }
        }
    }
    let bx = margin + iw + margin;
    for y in 0..ih {
        let c = colour(1.0 - y as f32 / (ih - 1).max(1) as f32);
        for x in 0..bar_w {
            canvas.set(bx + x, margin + y, c);
        }
    }
    canvas.text(&top_label, bx + bar_w + 6, margin, 2);
    canvas.text("0", bx + bar_w + 6, margin + ih - 10, 2);
    let img = image::RgbImage::from_raw(cw as u32, ch as u32, canvas.data)
        .context("heatmap canvas size")?;
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_map_runs_from_dark_blue_to_yellow() {
        assert_eq!(colour(0.0), [68, 1, 84]);
        assert_eq!(colour(1.0), [253, 231, 37]);
        assert_eq!(colour(f32::NAN), colour(0.0));
        assert_eq!(colour(2.0), colour(1.0));
    }

    #[test]
    fn overlay_colours_the_hottest_patch_yellow() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let img = Pixels::new(4, 4, 1, vec![0; 16])?;
        let path = dir.path().join("h.png");
        write_overlay(&img, &[0.0, 0.5, 0.0, 1.0], (2, 2), 2, &path)?;
        let png = image::open(&path)?.to_rgb8();
        let scale = 256 / 4;
        // Bottom-right patch (value = max) over black: half of viridis' yellow.
        let p = png.get_pixel((10 + 3 * scale) as u32, (10 + 3 * scale) as u32);
        assert_eq!(p.0, [126, 115, 18]);
        // Top-left (0): half of dark blue.
        let p = png.get_pixel(10, 10);
        assert_eq!(p.0, [34, 0, 42]);
        assert!(write_overlay(&img, &[0.0; 3], (2, 2), 2, &path).is_err());
        Ok(())
    }
}
