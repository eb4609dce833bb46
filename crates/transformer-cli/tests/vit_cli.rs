//! The Vision Transformer from the command line (issue 14): `data fetch fashion-mnist`,
//! `train` on IDX images (accuracy in metrics.jsonl, exact resume), `classify` (top-k JSON
//! lines, attention heatmaps), `eval` (accuracy, confusion matrix) and their bad input.
//!
//! Most tests train a tiny ViT (width 16, one layer, 7x7 patches) on generated 28x28 images
//! of two classes for a few steps; one fetches the real Fashion-MNIST from the Debian package
//! that `scripts/fetch-fashion-mnist.sh` unpacks into `.cache/` (it fails, naming the script,
//! when that is missing).

mod common;

use std::path::{Path, PathBuf};

use common::{idx, metrics, text, write_idx_set, Workspace};

/// Image `i` of the generated set: class 0 is bright in the top half, class 1 in the bottom
/// half (top/bottom, not left/right: the runs flip horizontally), with noise.
fn synthetic(i: usize) -> (Vec<u8>, u8) {
    let label = (i % 2) as u8;
    let mut state = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut px = vec![0u8; 28 * 28];
    for (k, p) in px.iter_mut().enumerate() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 60) as u8;
        let top = k / 28 < 14;
        *p = if top == (label == 0) {
            180 + noise
        } else {
            noise
        };
    }
    (px, label)
}

/// A tiny ViT config on the generated images.
const VIT_CONFIG: &str = r#"
[model]
family = "vit"
preset = "fashion_mnist"
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 32
patch_size = 7
num_labels = 2
id2label = { "0" = "top", "1" = "bottom" }

[data]
kind = "images"
train_images = "images.idx"
train_labels = "labels.idx"
n_val = 40
mean = 0.3
std = 0.35
crop_padding = 2
hflip = true

[train]
seed = 3
batch_size = 16
max_steps = 30
label_smoothing = 0.1
grad_clip = 1.0
eval_every = 10
log_every = 5

[optimizer]
weight_decay = 0.05

[schedule]
kind = "warmup_cosine"
lr = 3e-3
warmup_steps = 3
decay_steps = 30
min_lr = 1e-4
"#;

fn vit_workspace() -> Workspace {
    let ws = Workspace::new();
    write_idx_set(ws.path(), "", 240, 28, synthetic);
    write_idx_set(ws.path(), "test-", 60, 28, synthetic);
    std::fs::write(ws.join("vit.toml"), VIT_CONFIG).unwrap();
    ws
}

fn write_png(path: &Path, i: usize) {
    let (px, _) = synthetic(i);
    image::GrayImage::from_raw(28, 28, px)
        .unwrap()
        .save(path)
        .unwrap();
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    text(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn train_reports_accuracy_learns_and_resumes_exactly() {
    let ws = vit_workspace();
    ws.ok(&["train", "--config", "vit.toml", "--out", "full"]);
    let recs = metrics(&ws.join("full"));
    let evals: Vec<&serde_json::Value> = recs.iter().filter(|r| r["event"] == "eval").collect();
    assert_eq!(evals.len(), 3);
    let acc: Vec<f64> = evals
        .iter()
        .map(|r| r["val_accuracy"].as_f64().expect("val_accuracy"))
        .collect();
    eprintln!("validation accuracy at steps 10, 20, 30: {acc:?}");
    assert!(acc[2] >= 0.9, "the two classes are easy: {acc:?}");
    let logs: Vec<f64> = recs
        .iter()
        .filter(|r| r["event"] == "log")
        .map(|r| r["train_loss"].as_f64().unwrap())
        .collect();
    assert!(
        logs[logs.len() - 1] < logs[0],
        "loss did not fall: {logs:?}"
    );
    for f in [
        "loss.svg",
        "accuracy.svg",
        "checkpoint/run.toml",
        "best/model.safetensors",
    ] {
        assert!(ws.join("full").join(f).exists(), "{f} missing");
    }

    // 10 steps, then resumed to 30: the same losses and accuracies as the run without a stop.
    ws.ok(&[
        "train",
        "--config",
        "vit.toml",
        "--out",
        "split",
        "--set",
        "train.max_steps=10",
    ]);
    ws.ok(&[
        "train", "--config", "vit.toml", "--out", "split", "--resume",
    ]);
    let strip = |recs: Vec<serde_json::Value>| -> Vec<(u64, f64, Option<f64>)> {
        recs.iter()
            .map(|r| {
                (
                    r["step"].as_u64().unwrap(),
                    r["train_loss"].as_f64().unwrap(),
                    r["val_accuracy"].as_f64(),
                )
            })
            .collect()
    };
    // The stop at step 10 writes a log line for its last step; the full run's records for
    // steps 1-10 are the same (log_every divides 10).
    assert_eq!(strip(metrics(&ws.join("split"))), strip(recs));
}

/// A trained tiny checkpoint in `run/`.
fn trained() -> Workspace {
    let ws = vit_workspace();
    ws.ok(&["train", "--config", "vit.toml", "--out", "run"]);
    ws
}

#[test]
fn classify_prints_top_k_and_draws_attention() {
    let ws = trained();
    write_png(&ws.join("a.png"), 0); // class 0, "top"
    write_png(&ws.join("b.png"), 1); // class 1, "bottom"
    let out = ws.ok(&[
        "classify",
        "--checkpoint",
        "run",
        "a.png",
        "b.png",
        "--top-k",
        "2",
        "--attention-out",
        "att",
    ]);
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2);
    for (line, want) in lines.iter().zip(["top", "bottom"]) {
        let top = line["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["label"], want, "{line}");
        let p: f64 = top.iter().map(|t| t["probability"].as_f64().unwrap()).sum();
        assert!((p - 1.0).abs() < 1e-4, "two classes, both listed: {p}");
        assert!(top[0]["probability"].as_f64() >= top[1]["probability"].as_f64());
    }
    assert_eq!(lines[0]["attention"]["rollout"], "a-rollout.png");
    for f in [
        "a-rollout.png",
        "a-head0.png",
        "a-head1.png",
        "b-rollout.png",
    ] {
        let img = image::open(ws.join("att").join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .to_rgb8();
        // The 28-pixel input enlarged 9x, with margins and the colour bar.
        assert!(img.width() > 252 && img.height() > 252, "{f}");
    }
    // A second run replaces its own output; an unrelated folder needs --force.
    ws.ok(&[
        "classify",
        "--checkpoint",
        "run",
        "a.png",
        "--attention-out",
        "att",
    ]);
    assert!(!ws.join("att/b-rollout.png").exists());
    std::fs::create_dir(ws.join("mine")).unwrap();
    std::fs::write(ws.join("mine/notes.txt"), "mine").unwrap();
    ws.fails(
        &[
            "classify",
            "--checkpoint",
            "run",
            "a.png",
            "--attention-out",
            "mine",
        ],
        &["mine", "--force"],
    );
    assert!(ws.join("mine/notes.txt").exists());
}

#[test]
fn eval_prints_accuracy_and_draws_the_confusion_matrix() {
    let ws = trained();
    let out = ws.ok(&[
        "eval",
        "--checkpoint",
        "run",
        "--images",
        "test-images.idx",
        "--labels",
        "test-labels.idx",
        "--confusion-out",
        "cm.svg",
    ]);
    let line = &json_lines(&out.stdout)[0];
    let cm: Vec<Vec<u64>> = serde_json::from_value(line["confusion"].clone()).unwrap();
    assert_eq!(cm.len(), 2);
    assert_eq!(cm.iter().flatten().sum::<u64>(), 60);
    // 30 of each class (rows are the true labels).
    assert_eq!(cm[0].iter().sum::<u64>(), 30);
    let acc = line["accuracy"].as_f64().unwrap();
    assert!((acc - (cm[0][0] + cm[1][1]) as f64 / 60.0).abs() < 1e-12);
    assert!(acc >= 0.9, "{line}");
    let svg = std::fs::read_to_string(ws.join("cm.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("bottom"),
        "labels drawn"
    );
    // The file is not replaced without --force-confusion.
    ws.fails(
        &[
            "eval",
            "--checkpoint",
            "run",
            "--images",
            "test-images.idx",
            "--labels",
            "test-labels.idx",
            "--confusion-out",
            "cm.svg",
        ],
        &["cm.svg"],
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let ws = trained();
    std::fs::write(ws.join("notes.png"), "not a picture").unwrap();
    write_png(&ws.join("a.png"), 0);
    ws.fails(
        &["classify", "--checkpoint", "run", "a.png", "notes.png"],
        &["notes.png"],
    );
    ws.fails(
        &["classify", "--checkpoint", "no-such-run", "a.png"],
        &["no-such-run"],
    );
    ws.fails(
        &["classify", "--checkpoint", "run", "missing.png"],
        &["missing.png"],
    );
    // A language model is not an image classifier.
    ws.train("lm", &[]);
    ws.fails(
        &["classify", "--checkpoint", "lm", "a.png"],
        &["image classifier"],
    );
    ws.fails(
        &["eval", "--checkpoint", "lm"],
        &["--text", "image classifier"],
    );
    // Labels that disagree with the images, and a label beyond the model's classes.
    std::fs::write(ws.join("short-labels.idx"), idx(&[5], &[0; 5])).unwrap();
    ws.fails(
        &[
            "eval",
            "--checkpoint",
            "run",
            "--images",
            "test-images.idx",
            "--labels",
            "short-labels.idx",
        ],
        &["short-labels.idx", "5 labels"],
    );
    std::fs::write(ws.join("big-labels.idx"), idx(&[60], &[7; 60])).unwrap();
    ws.fails(
        &[
            "eval",
            "--checkpoint",
            "run",
            "--images",
            "test-images.idx",
            "--labels",
            "big-labels.idx",
        ],
        &["big-labels.idx", "label 7"],
    );
    // Training data whose labels outnumber the model's classes.
    std::fs::write(ws.join("labels.idx"), idx(&[240], &[5; 240])).unwrap();
    ws.fails(
        &["train", "--config", "vit.toml", "--out", "bad"],
        &["num_labels"],
    );
    ws.fails(
        &["classify", "--checkpoint", "run", "a.png", "--top-k", "0"],
        &["--top-k"],
    );
}

#[test]
fn hugging_face_vit_directories_classify_too() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vit/model");
    let img =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vit/china_crop.png");
    let ws = Workspace::new();
    let out = ws.ok(&[
        "classify",
        "--checkpoint",
        model.to_str().unwrap(),
        img.to_str().unwrap(),
        "--attention-out",
        "att",
    ]);
    let line = &json_lines(&out.stdout)[0];
    let labels: Vec<&str> = line["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["label"].as_str().unwrap())
        .collect();
    let mut sorted = labels.clone();
    sorted.sort();
    // All five of id2label (top-k 5 by default).
    assert_eq!(sorted, ["cat", "dog", "flower", "other", "temple"]);
    // 4 heads in the last layer.
    assert!(ws.join("att/china_crop-head3.png").is_file());
}

/// Debian's dataset-fashion-mnist unpacked by scripts/fetch-fashion-mnist.sh.
fn debian_fashion_mnist() -> PathBuf {
    let root = match std::env::var_os("TRANSFORMER_FASHION_MNIST_ROOT") {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/fashion-mnist/root"),
    };
    let dir = root.join("usr/share/datasets");
    assert!(
        dir.join("fashion-mnist/train-images-idx3-ubyte.gz")
            .is_file(),
        "{} is missing: run scripts/fetch-fashion-mnist.sh",
        dir.display()
    );
    dir
}

#[test]
fn fashion_mnist_fetches_trains_and_evaluates() {
    let mirror = debian_fashion_mnist();
    let ws = Workspace::new();
    let out = ws.ok(&[
        "data",
        "fetch",
        "fashion-mnist",
        "--mirror",
        mirror.to_str().unwrap(),
    ]);
    assert!(
        text(&out.stdout).contains("4 file(s)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::metadata(ws.join("data/fashion-mnist/train-images-idx3-ubyte"))
            .unwrap()
            .len(),
        47_040_016
    );
    // The repository's config, shrunk to a tiny model and 150 steps (a few seconds).
    let cfg =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/fashion-mnist-vit.toml");
    ws.ok(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        "fm",
        "--set",
        "model.hidden_size=32",
        "--set",
        "model.num_hidden_layers=1",
        "--set",
        "model.intermediate_size=64",
        "--set",
        "model.patch_size=7",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.max_steps=150",
        "--set",
        "train.eval_every=150",
        "--set",
        "schedule.lr=3e-3",
        "--set",
        "schedule.warmup_steps=10",
        "--set",
        "schedule.decay_steps=150",
        "--set",
        "data.n_val=500",
    ]);
    let out = ws.ok(&["eval", "--checkpoint", "fm", "--confusion-out", "cm.svg"]);
    let line = &json_lines(&out.stdout)[0];
    assert_eq!(line["examples"], 10_000);
    let acc = line["accuracy"].as_f64().unwrap();
    eprintln!("test accuracy after 150 steps of a tiny ViT: {acc:.4}");
    // Chance is 10% (the run is seeded: this gave 0.42 when written); ViTs start slowly, and
    // the point here is the whole path on the real files, not the accuracy.
    assert!(acc > 0.3, "{line}");
    assert_eq!(line["class_names"][9], "Ankle boot");
}
