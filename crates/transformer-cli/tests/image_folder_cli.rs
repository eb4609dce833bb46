//! Training a Vision Transformer on users' own images in torchvision's `ImageFolder` layout
//! (issue 14): `data.kind = "image_folder"` with a validation tree or a held-out share,
//! resized RGB photos of any size, the class folders as the model's labels in `classify`,
//! `eval --images DIR`, exact resume with crops and flips on three channels, and bad trees.
//!
//! The images are generated: three classes of noisy colour fields (mostly red, green or blue)
//! in PNG and JPEG of several sizes, some in nested folders.

mod common;

use std::path::Path;

use common::{metrics, text, Workspace};

const CLASSES: [&str; 3] = ["blue", "green", "red"];

/// Image `i` of class `c` (an index into [`CLASSES`]): `w`×`h` RGB, the class's channel bright,
/// the others dim, with noise.
fn picture(c: usize, i: usize, w: u32, h: u32) -> image::RgbImage {
    let mut state = (i as u64 * 3 + c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // RGB order: blue is channel 2, green 1, red 0.
    let bright = 2 - c;
    image::RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for (ch, v) in px.iter_mut().enumerate() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 70) as u8;
            *v = if ch == bright {
                150 + noise
            } else {
                20 + noise
            };
        }
        image::Rgb(px)
    })
}

/// `n` images per class under `root/<class>/`: PNGs of 20×12, JPEGs of 9×15, every third one
/// in a `more/` sub-folder.
fn write_tree(root: &Path, n: usize, offset: usize) {
    for (c, class) in CLASSES.iter().enumerate() {
        for k in 0..n {
            let i = offset + k;
            let dir = if k % 3 == 2 {
                root.join(class).join("more")
            } else {
                root.join(class)
            };
            std::fs::create_dir_all(&dir).unwrap();
            if k % 2 == 0 {
                picture(c, i, 20, 12)
                    .save(dir.join(format!("{i}.png")))
                    .unwrap();
            } else {
                picture(c, i, 9, 15)
                    .save(dir.join(format!("{i}.jpg")))
                    .unwrap();
            }
        }
    }
}

/// A tiny RGB ViT (16×16, 4×4 patches) on `train/` with `val/` validating; the class folders
/// give its labels.
const FOLDER_CONFIG: &str = r#"
[model]
family = "vit"
preset = "tiny"
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 32

[data]
kind = "image_folder"
train_dir = "train"
val_dir = "val"
mean = [0.4, 0.4, 0.4]
std = 0.3
crop_padding = 2
hflip = true

[train]
seed = 5
batch_size = 12
max_steps = 30
grad_clip = 1.0
eval_every = 10
log_every = 5

[optimizer]
weight_decay = 0.05

[schedule]
kind = "warmup_cosine"
lr = 5e-3
warmup_steps = 3
decay_steps = 30
min_lr = 1e-4
"#;

fn folder_workspace() -> Workspace {
    let ws = Workspace::new();
    write_tree(&ws.join("train"), 24, 0);
    write_tree(&ws.join("val"), 8, 1000);
    std::fs::write(ws.join("folder.toml"), FOLDER_CONFIG).unwrap();
    ws
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    text(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn folders_train_classify_evaluate_and_resume_exactly() {
    let ws = folder_workspace();
    let out = ws.ok(&["train", "--config", "folder.toml", "--out", "run"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("72 training and 24 validation in 3 classes"),
        "{stdout}"
    );
    let recs = metrics(&ws.join("run"));
    let acc: Vec<f64> = recs
        .iter()
        .filter(|r| r["event"] == "eval")
        .map(|r| r["val_accuracy"].as_f64().expect("val_accuracy"))
        .collect();
    eprintln!("validation accuracy at steps 10, 20, 30: {acc:?}");
    assert_eq!(acc.len(), 3);
    assert!(acc[2] >= 0.9, "colour classes are easy: {acc:?}");
    let val_loss: Vec<f64> = recs
        .iter()
        .filter(|r| r["event"] == "eval")
        .map(|r| r["val_loss"].as_f64().unwrap())
        .collect();
    assert!(val_loss[2] < val_loss[0], "validation loss: {val_loss:?}");

    // The class folders are the labels: classify names them.
    picture(2, 5000, 31, 17).save(ws.join("a-red.png")).unwrap();
    picture(0, 5001, 16, 16)
        .save(ws.join("a-blue.jpg"))
        .unwrap();
    let lines = json_lines(
        &ws.ok(&[
            "classify",
            "--checkpoint",
            "run",
            "a-red.png",
            "a-blue.jpg",
            "--top-k",
            "3",
        ])
        .stdout,
    );
    assert_eq!(lines[0]["top"][0]["label"], "red", "{}", lines[0]);
    assert_eq!(lines[1]["top"][0]["label"], "blue", "{}", lines[1]);
    assert_eq!(lines[0]["top"].as_array().unwrap().len(), 3);

    // eval on a tree: the validation images again, now through classify's preprocessing.
    let out = ws.ok(&[
        "eval",
        "--checkpoint",
        "run",
        "--images",
        "val",
        "--confusion-out",
        "confusion.svg",
    ]);
    let res = &json_lines(&out.stdout)[0];
    assert_eq!(res["examples"], 24);
    assert_eq!(res["class_names"], serde_json::json!(CLASSES));
    let eval_acc = res["accuracy"].as_f64().unwrap();
    // eval reads best/, saved at the lowest validation loss: eval's preprocessing of the
    // files gives the pixels that training decoded, so the accuracy is the one measured then.
    let best = recs
        .iter()
        .filter(|r| r["event"] == "eval")
        .min_by(|a, b| {
            let l = |r: &serde_json::Value| r["val_loss"].as_f64().unwrap();
            l(a).total_cmp(&l(b))
        })
        .unwrap();
    assert_eq!(
        eval_acc,
        best["val_accuracy"].as_f64().unwrap(),
        "eval against training's {best}"
    );
    assert!(ws.join("confusion.svg").exists());

    // 10 steps, then resumed to 30: the same records as the run without a stop.
    ws.ok(&[
        "train",
        "--config",
        "folder.toml",
        "--out",
        "split",
        "--set",
        "train.max_steps=10",
    ]);
    ws.ok(&[
        "train",
        "--config",
        "folder.toml",
        "--out",
        "split",
        "--resume",
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
    assert_eq!(strip(metrics(&ws.join("split"))), strip(recs));
}

#[test]
fn without_a_validation_tree_a_seeded_share_validates() {
    let ws = folder_workspace();
    let cfg = FOLDER_CONFIG.replace("val_dir = \"val\"\n", "");
    std::fs::write(ws.join("split.toml"), &cfg).unwrap();
    let out = ws.ok(&[
        "train",
        "--config",
        "split.toml",
        "--out",
        "a",
        "--set",
        "train.max_steps=5",
        "--set",
        "train.eval_every=5",
    ]);
    // A tenth of the 72 images validates by default.
    assert!(
        text(&out.stdout).contains("65 training and 7 validation"),
        "{}",
        text(&out.stdout)
    );
    let out = ws.ok(&[
        "train",
        "--config",
        "split.toml",
        "--out",
        "b",
        "--set",
        "train.max_steps=5",
        "--set",
        "train.eval_every=5",
        "--set",
        "data.n_val=12",
    ]);
    assert!(text(&out.stdout).contains("60 training and 12 validation"));
    // The same seed, the same split and the same run.
    ws.ok(&[
        "train",
        "--config",
        "split.toml",
        "--out",
        "c",
        "--set",
        "train.max_steps=5",
        "--set",
        "train.eval_every=5",
    ]);
    let loss = |run: &str| -> Vec<f64> {
        metrics(&ws.join(run))
            .iter()
            .map(|r| r["train_loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(loss("a"), loss("c"));
}

#[test]
fn bad_trees_are_clear_errors() {
    let ws = folder_workspace();
    let train = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["train", "--config", "folder.toml", "--out", "bad"];
        for e in extra {
            args.extend(["--set", e]);
        }
        ws.fails(&args, needles);
        assert!(!ws.join("bad").join("checkpoint").exists());
    };
    // A validation tree with other classes.
    std::fs::create_dir_all(ws.join("val2/blue")).unwrap();
    picture(0, 1, 8, 8)
        .save(ws.join("val2/blue/x.png"))
        .unwrap();
    train(&["data.val_dir=\"val2\""], &["val2", "class folders"]);
    // n_val beside a validation tree; too many held out.
    train(&["data.n_val=5"], &["data.n_val", "val_dir"]);
    // A head of another size than the classes.
    train(
        &["model.num_labels=5"],
        &["model.num_labels", "class folders"],
    );
    // Per-channel statistics of the wrong length.
    train(&["data.mean=[0.5, 0.5]"], &["data.mean", "3"]);
    train(&["data.std=[0.5, 0.0, 0.5]"], &["data.std"]);
    // A missing tree, a class folder without images, a file that is not an image.
    train(&["data.train_dir=\"nowhere\""], &["nowhere"]);
    std::fs::create_dir_all(ws.join("train/empty")).unwrap();
    train(&[], &["empty", "without images"]);
    std::fs::remove_dir(ws.join("train/empty")).unwrap();
    std::fs::write(ws.join("train/red/broken.png"), "not a picture").unwrap();
    train(&[], &["broken.png"]);
    std::fs::remove_file(ws.join("train/red/broken.png")).unwrap();
    // A truncated PNG.
    let good = std::fs::read(ws.join("train/red/0.png")).unwrap();
    std::fs::write(ws.join("train/red/cut.png"), &good[..good.len() / 2]).unwrap();
    train(&[], &["cut.png"]);
    std::fs::remove_file(ws.join("train/red/cut.png")).unwrap();

    // eval on a tree whose folders are not the model's labels, or with --labels.
    ws.ok(&[
        "train",
        "--config",
        "folder.toml",
        "--out",
        "run",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.eval_every=2",
    ]);
    std::fs::create_dir_all(ws.join("other/purple")).unwrap();
    picture(0, 1, 8, 8)
        .save(ws.join("other/purple/x.png"))
        .unwrap();
    ws.fails(
        &["eval", "--checkpoint", "run", "--images", "other"],
        &["purple", "blue, green, red"],
    );
    ws.fails(
        &[
            "eval",
            "--checkpoint",
            "run",
            "--images",
            "val",
            "--labels",
            "x.idx",
        ],
        &["--labels", "class folders"],
    );
}
