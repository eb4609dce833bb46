//! Shared by the CLI integration tests: a generated corpus, a tiny language-model config and
//! helpers to run the built binary. Every run trains the `tiny` decoder-only preset with
//! block_size 16 on a few kilobytes, so that one takes well under a second here.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary working directory holding `corpus.txt` and `lm.toml`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

/// `lm.toml`: 20 steps, a log line every 2 steps, evaluation (and a checkpoint) every 10.
pub const LM_CONFIG: &str = r#"
[model]
family = "decoder_only"
preset = "tiny"
block_size = 16
dropout = 0.1

[data]
kind = "text"
path = "corpus.txt"

[train]
seed = 7
batch_size = 4
max_steps = 20
eval_every = 10
eval_iters = 2
log_every = 2
grad_clip = 1.0

[optimizer]
weight_decay = 0.1

[schedule]
kind = "warmup_cosine"
lr = 1e-2
warmup_steps = 2
decay_steps = 20
min_lr = 1e-3
"#;

/// The characters of the generated corpus (and so the vocabulary of models trained on it).
pub const CORPUS_WORDS: [&str; 12] = [
    "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home",
];

/// About 9 KB of lines of eight words drawn by a fixed linear congruential generator.
pub fn corpus() -> String {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut text = String::new();
    for _ in 0..300 {
        let line: Vec<&str> = (0..8)
            .map(|_| CORPUS_WORDS[next() % CORPUS_WORDS.len()])
            .collect();
        text.push_str(&line.join(" "));
        text.push('\n');
    }
    text
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("corpus.txt"), corpus()).unwrap();
        std::fs::write(dir.path().join("lm.toml"), LM_CONFIG).unwrap();
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A command for the binary, run in this directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_transformer"));
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("TRANSFORMER_DEVICE");
        cmd
    }

    /// Run the binary to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .expect("run the transformer binary")
    }

    /// Run the binary and require success.
    pub fn ok(&self, args: &[&str]) -> Output {
        succeeded(self.run(args), &format!("transformer {args:?}"))
    }

    /// `transformer train --config lm.toml --out OUT` plus `extra` arguments; must succeed.
    pub fn train(&self, out: &str, extra: &[&str]) -> Output {
        let mut args = vec!["train", "--config", "lm.toml", "--out", out];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// Run the binary and require a failure whose message starts with `error:` and contains
    /// every one of `needles`; returns stderr.
    pub fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        let out = self.run(args);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "transformer {args:?} succeeded but should have failed\nstdout: {}\nstderr: {stderr}",
            text(&out.stdout)
        );
        assert!(
            stderr.starts_with("error:"),
            "transformer {args:?}: stderr does not start with `error:`:\n{stderr}"
        );
        for n in needles {
            assert!(
                stderr.contains(n),
                "transformer {args:?}: the error does not mention {n:?}:\n{stderr}"
            );
        }
        assert!(
            !stderr.contains("panicked"),
            "transformer {args:?} panicked:\n{stderr}"
        );
        stderr
    }
}

/// `out`, after checking that `what` (for the message) succeeded.
pub fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every line of `metrics.jsonl` as JSON.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    let path = run_dir.join("metrics.jsonl");
    let body = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The fields of the metric records that a deterministic run must reproduce exactly (timing
/// fields left out).
pub fn losses(records: &[serde_json::Value]) -> Vec<serde_json::Value> {
    records
        .iter()
        .map(|r| {
            serde_json::json!({
                "event": r["event"],
                "step": r["step"],
                "train_loss": r["train_loss"],
                "val_loss": r["val_loss"],
                "lr": r["lr"],
            })
        })
        .collect()
}

/// The step recorded in a checkpoint's `trainer_state.json`.
pub fn checkpoint_step(ckpt: &Path) -> u64 {
    let path = ckpt.join("trainer_state.json");
    let body = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    state["step"]
        .as_u64()
        .expect("trainer_state.json has a step")
}

/// Every file under `dir` (recursively, hidden ones too) with its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, into);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                into.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

/// The files of a complete checkpoint directory.
pub const CHECKPOINT_FILES: [&str; 8] = [
    "model.safetensors",
    "config.json",
    "meta.json",
    "tokenizer.json",
    "optimizer.safetensors",
    "optimizer.json",
    "trainer_state.json",
    "run.toml",
];

/// An IDX file of unsigned bytes (the MNIST format) with dimensions `dims`.
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// `{prefix}images.idx` and `{prefix}labels.idx` in `dir`: `n` square images of `side`
/// pixels, image `i` and its label from `image(i)`.
pub fn write_idx_set(
    dir: &Path,
    prefix: &str,
    n: usize,
    side: u32,
    image: impl Fn(usize) -> (Vec<u8>, u8),
) {
    let (mut px, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (p, l) = image(i);
        px.extend(p);
        labels.push(l);
    }
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes).unwrap();
    write(
        &format!("{prefix}images.idx"),
        idx(&[n as u32, side, side], &px),
    );
    write(&format!("{prefix}labels.idx"), idx(&[n as u32], &labels));
}
