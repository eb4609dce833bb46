//! Image generation from the command line (issue 14, item 7): `train` on `data.kind =
//! "pixels"`, `eval` in bits per pixel, `generate-image` as a PNG grid, exact resume, and bad
//! input.
//!
//! The data are generated 8x8 images of three classes that a tiny model learns in a few
//! hundred steps: class 0 dark, class 1 bright, class 2 dark with a bright middle column, each
//! with a little noise.

mod common;
use common::{idx, metrics, text, write_idx_set, Workspace};

const SIDE: usize = 8;

fn synthetic(i: usize) -> (Vec<u8>, u8) {
    let label = (i % 3) as u8;
    let mut state = (i as u64 + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut px = vec![0u8; SIDE * SIDE];
    for (k, p) in px.iter_mut().enumerate() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 40) as u8;
        let bright = match label {
            0 => false,
            1 => true,
            _ => (3..5).contains(&(k % SIDE)),
        };
        *p = if bright { 215 - noise } else { noise };
    }
    (px, label)
}

const CONFIG: &str = r#"
[model]
family = "decoder_only"
preset = "shakespeare_char"
n_layers = 1
n_heads = 2
d_model = 32
d_ff = 64

[data]
kind = "pixels"
train_images = "images.idx"
train_labels = "labels.idx"
n_val = 30
levels = 4

[train]
seed = 5
batch_size = 16
max_steps = 120
grad_clip = 1.0
eval_every = 40
log_every = 10

[schedule]
kind = "warmup_cosine"
lr = 1e-2
warmup_steps = 10
decay_steps = 120
min_lr = 1e-4
"#;

fn workspace() -> Workspace {
    let ws = Workspace::new();
    write_idx_set(ws.path(), "", 300, SIDE as u32, synthetic);
    write_idx_set(ws.path(), "test-", 60, SIDE as u32, synthetic);
    std::fs::write(ws.join("pixels.toml"), CONFIG).unwrap();
    ws
}

fn json(out: &[u8]) -> serde_json::Value {
    let t = text(out);
    let line = t.lines().last().unwrap_or_else(|| panic!("no output: {t}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn trains_scores_bits_per_pixel_and_draws_each_class() {
    let ws = workspace();
    ws.ok(&["train", "--config", "pixels.toml", "--out", "run"]);
    let evals: Vec<f64> = metrics(&ws.join("run"))
        .iter()
        .filter(|r| r["event"] == "eval")
        .map(|r| r["val_loss"].as_f64().unwrap())
        .collect();
    eprintln!("validation nats per pixel at steps 40, 80, 120: {evals:?}");
    assert_eq!(evals.len(), 3);
    // Uniform over 4 levels is ln 4 = 1.386 nats; the classes are nearly constant images.
    assert!(evals[2] < 0.5, "{evals:?}");

    let out = ws.ok(&[
        "eval",
        "--checkpoint",
        "run",
        "--images",
        "test-images.idx",
        "--labels",
        "test-labels.idx",
    ]);
    let r = json(&out.stdout);
    let bits = r["bits_per_pixel"].as_f64().unwrap();
    let nats = r["nats_per_pixel"].as_f64().unwrap();
    assert!((bits - nats / std::f64::consts::LN_2).abs() < 1e-9, "{r}");
    assert!(bits < 0.75, "{r}");
    assert_eq!(r["n_images"], 60);

    let out = ws.ok(&[
        "generate-image",
        "--checkpoint",
        "run",
        "--out",
        "grid.png",
        "--per-class",
        "4",
        "--scale",
        "1",
    ]);
    let r = json(&out.stdout);
    assert_eq!(r["classes"], serde_json::json!([0, 1, 2]));
    let png = image::open(ws.join("grid.png")).unwrap().to_luma8();
    // 4 columns and 3 rows of 8x8 images with 2-pixel gaps.
    assert_eq!(png.dimensions(), (4 * 10 + 2, 3 * 10 + 2));
    let cell = |row: u32, col: u32, x: u32, y: u32| -> f64 {
        png.get_pixel(2 + col * 10 + x, 2 + row * 10 + y).0[0] as f64
    };
    let mean = |row: u32, xs: std::ops::Range<u32>| -> f64 {
        let mut sum = 0.0;
        let mut n = 0.0;
        for col in 0..4 {
            for y in 0..8 {
                for x in xs.clone() {
                    sum += cell(row, col, x, y);
                    n += 1.0;
                }
            }
        }
        sum / n
    };
    // The class token conditions the images: dark, bright, and a bright middle column.
    let (dark, bright) = (mean(0, 0..8), mean(1, 0..8));
    let (edge, middle) = (mean(2, 0..3), mean(2, 3..5));
    eprintln!("class means: dark {dark:.0}, bright {bright:.0}, column {middle:.0} / {edge:.0}");
    assert!(dark < 60.0 && bright > 160.0, "{dark} {bright}");
    assert!(middle > 140.0 && edge < 70.0, "{middle} {edge}");

    // The same seed draws the same images; --out is not replaced without --force.
    ws.fails(
        &["generate-image", "--checkpoint", "run", "--out", "grid.png"],
        &["--out", "exists", "--force"],
    );
    let again = |name: &str| {
        ws.ok(&[
            "generate-image",
            "--checkpoint",
            "run",
            "--out",
            name,
            "--per-class",
            "4",
            "--scale",
            "1",
        ]);
        std::fs::read(ws.join(name)).unwrap()
    };
    assert_eq!(again("a.png"), std::fs::read(ws.join("grid.png")).unwrap());
}

#[test]
fn resumed_pixel_run_reproduces_the_uninterrupted_losses() {
    let ws = workspace();
    let set = [
        "--set",
        "train.max_steps=40",
        "--set",
        "schedule.decay_steps=40",
        "--set",
        "train.log_every=10",
    ];
    let mut full = vec!["train", "--config", "pixels.toml", "--out", "full"];
    full.extend(set);
    ws.ok(&full);
    let mut part = vec!["train", "--config", "pixels.toml", "--out", "split"];
    part.extend(set);
    part.extend(["--set", "train.max_steps=20"]);
    ws.ok(&part);
    let mut resume = vec![
        "train",
        "--config",
        "pixels.toml",
        "--out",
        "split",
        "--resume",
    ];
    resume.extend(set);
    ws.ok(&resume);
    // The log lines, and the validation loss at the end (the stopped run also evaluated at
    // its last step, 20, and its eval record's train_loss covers steps 21-40 only).
    let logs = |recs: &[serde_json::Value]| -> Vec<(u64, f64)> {
        recs.iter()
            .filter(|r| r["event"] == "log")
            .map(|r| {
                (
                    r["step"].as_u64().unwrap(),
                    r["train_loss"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let last_val = |recs: &[serde_json::Value]| -> f64 {
        let r = recs.iter().rev().find(|r| r["event"] == "eval").unwrap();
        assert_eq!(r["step"], 40);
        r["val_loss"].as_f64().unwrap()
    };
    let (split, full) = (metrics(&ws.join("split")), metrics(&ws.join("full")));
    assert_eq!(logs(&split), logs(&full));
    assert_eq!(logs(&full).len(), 4);
    assert_eq!(last_val(&split), last_val(&full));
}

#[test]
fn bad_pixel_input_is_named() {
    let ws = workspace();
    // Not square.
    std::fs::write(ws.join("wide.idx"), idx(&[2, 4, 8], &[0u8; 64])).unwrap();
    std::fs::write(ws.join("two.idx"), idx(&[2], &[0, 1])).unwrap();
    ws.fails(
        &[
            "train",
            "--config",
            "pixels.toml",
            "--out",
            "r1",
            "--set",
            "data.train_images=\"wide.idx\"",
            "--set",
            "data.train_labels=\"two.idx\"",
            "--set",
            "data.n_val=1",
        ],
        &["wide.idx", "square"],
    );
    ws.fails(
        &[
            "train",
            "--config",
            "pixels.toml",
            "--out",
            "r2",
            "--set",
            "data.levels=1",
        ],
        &["data.levels"],
    );
    ws.fails(
        &[
            "train",
            "--config",
            "pixels.toml",
            "--out",
            "r3",
            "--set",
            "data.pool=3",
        ],
        &["data.pool"],
    );
    ws.fails(
        &[
            "train",
            "--config",
            "pixels.toml",
            "--out",
            "r4",
            "--set",
            "model.block_size=10",
        ],
        &["block_size"],
    );
    // A trained checkpoint for the flag checks.
    ws.ok(&[
        "train",
        "--config",
        "pixels.toml",
        "--out",
        "run",
        "--set",
        "train.max_steps=2",
        "--set",
        "schedule.decay_steps=2",
        "--set",
        "schedule.warmup_steps=1",
        "--set",
        "train.eval_every=2",
    ]);
    ws.fails(
        &[
            "generate-image",
            "--checkpoint",
            "nowhere",
            "--out",
            "x.png",
        ],
        &["nowhere"],
    );
    ws.fails(
        &[
            "generate-image",
            "--checkpoint",
            "run",
            "--out",
            "x.png",
            "--classes",
            "3",
        ],
        &["--classes", "3"],
    );
    ws.fails(
        &[
            "generate-image",
            "--checkpoint",
            "run",
            "--out",
            "x.png",
            "--per-class",
            "0",
        ],
        &["--per-class"],
    );
    ws.fails(
        &[
            "generate-image",
            "--checkpoint",
            "run",
            "--out",
            "x.png",
            "--temperature",
            "-1",
        ],
        &["temperature"],
    );
    // Test images of another size.
    std::fs::write(ws.join("big.idx"), idx(&[2, 16, 16], &[0u8; 512])).unwrap();
    ws.fails(
        &[
            "eval",
            "--checkpoint",
            "run",
            "--images",
            "big.idx",
            "--labels",
            "two.idx",
        ],
        &["16x16", "8x8"],
    );
    assert!(!ws.join("x.png").exists());
}
