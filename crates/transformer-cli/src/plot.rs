//! Images: training curves and attention heatmaps, as SVG (no fonts or native libraries needed).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use transformer::train::MetricRecord;

/// Train and validation loss against step.
pub fn loss_curves(records: &[MetricRecord], path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.event == "log")
        .map(|r| (r.step as f64, r.train_loss))
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v)))
        .collect();
    if train.is_empty() {
        return Ok(());
    }
    let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))?
                .label("val")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Validation accuracy (in %) against step; nothing is drawn when no record has one.
pub fn accuracy_curve(records: &[MetricRecord], path: &Path) -> Result<()> {
    let acc: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_accuracy.map(|a| (r.step as f64, 100.0 * a)))
        .collect();
    if acc.is_empty() {
        return Ok(());
    }
    let max_step = acc.iter().map(|p| p.0).fold(1.0, f64::max);
    let lo = acc.iter().map(|p| p.1).fold(100.0, f64::min);
    let lo = (lo - 2.0).clamp(0.0, 99.0);
    let tmp = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("validation accuracy", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_step, lo..100.0)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("accuracy (%)")
            .draw()?;
        chart.draw_series(LineSeries::new(acc.clone(), RED.stroke_width(2)))?;
        chart.draw_series(acc.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A heatmap of `weights[t][s]` (rows: output tokens, columns: input tokens), labelled.
pub fn attention_heatmap(
    weights: &[Vec<f32>],
    rows: &[String],
    cols: &[String],
    title: &str,
    path: &Path,
) -> Result<()> {
    let (t, s) = (weights.len(), weights.first().map_or(0, |r| r.len()));
    let cell = 28i32;
    let (left, top) = (90i32, 90i32);
    // Wide enough for the title (about 8 px per character at 16 px).
    let w = (left + cell * s as i32 + 20).max(20 + 8 * title.len() as i32) as u32;
    let h = (top + cell * t as i32 + 20) as u32;
    let root = SVGBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(title.to_string(), (10, 10), ("sans-serif", 16)))?;
    let max = weights.iter().flatten().cloned().fold(1e-9f32, f32::max);
    for (i, row) in weights.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            // Darker is more attention (white = 0, black = the largest weight).
            let g = (255.0 * (1.0 - v / max)).clamp(0.0, 255.0) as u8;
            let (x, y) = (left + j as i32 * cell, top + i as i32 * cell);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                RGBColor(g, g, g).filled(),
            ))?;
        }
    }
    let style = ("monospace", 13).into_font();
    for (j, c) in cols.iter().enumerate() {
        root.draw(&Text::new(
            c.clone(),
            (left + j as i32 * cell + 8, top - 20),
            style.clone(),
        ))?;
    }
    for (i, r) in rows.iter().enumerate() {
        root.draw(&Text::new(
            r.clone(),
            (10, top + i as i32 * cell + 8),
            style.clone(),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// The confusion matrix of a classifier (rows: true label, columns: predicted) as SVG text:
/// cells shaded by their share of the row, with their counts; the title gives the accuracy.
pub fn confusion_matrix_svg(
    counts: &[Vec<u64>],
    labels: &[String],
    accuracy: f64,
) -> Result<String> {
    let n = counts.len();
    let cell = 44i32;
    let name_w = 8 * labels.iter().map(|l| l.len()).max().unwrap_or(1) as i32 + 20;
    let (left, top) = (name_w, 60 + name_w);
    let w = (left + cell * n as i32 + 20) as u32;
    let h = (top + cell * n as i32 + 40) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        root.draw(&Text::new(
            format!(
                "confusion matrix: accuracy {:.2}% (rows: true label, columns: predicted)",
                100.0 * accuracy
            ),
            (10, 10),
            ("sans-serif", 16),
        ))?;
        let style = ("sans-serif", 13).into_font();
        for (i, row) in counts.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            for (j, &c) in row.iter().enumerate() {
                let share = c as f64 / total;
                // Darker is a larger share of the true class (white = none of it).
                let g = (255.0 * (1.0 - share)).clamp(0.0, 255.0) as u8;
                let (x, y) = (left + j as i32 * cell, top + i as i32 * cell);
                let fill = if i == j {
                    RGBColor(g, g, 255)
                } else {
                    RGBColor(255, g, g)
                };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    c.to_string(),
                    (x + 6, y + cell / 2 - 6),
                    style.clone().color(&ink),
                ))?;
            }
            root.draw(&Text::new(
                labels.get(i).cloned().unwrap_or_default(),
                (10, top + i as i32 * cell + cell / 2 - 6),
                style.clone(),
            ))?;
        }
        for (j, l) in labels.iter().enumerate() {
            // Column names run upwards above their column.
            root.draw(&Text::new(
                l.clone(),
                (left + j as i32 * cell + cell / 2 - 6, top - 8),
                style.clone().transform(FontTransform::Rotate270),
            ))?;
        }
        root.present()?;
    }
    Ok(svg)
}
