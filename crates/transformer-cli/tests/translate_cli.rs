//! `transformer translate`, `eval --src/--ref` and `average` end to end, on a tiny
//! encoder-decoder trained for a few steps in the test on a generated word-for-word "German" →
//! "English" corpus (the model's quality does not matter here, only the plumbing).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const WORDS: [(&str, &str); 8] = [
    ("ein", "a"),
    ("hund", "dog"),
    ("katze", "cat"),
    ("läuft", "runs"),
    ("schläft", "sleeps"),
    ("rot", "red"),
    ("groß", "big"),
    ("und", "and"),
];

/// Tiny model (model.max_len 48 positions), 6 steps, a step checkpoint every 3.
const CONFIG: &str = r#"
[model]
family = "encoder_decoder"
preset = "tiny"
d_model = 32
d_ff = 64
n_heads = 2
n_encoder_layers = 1
n_decoder_layers = 2
max_len = 48

[data]
kind = "parallel"
train_src = "train.de"
train_tgt = "train.en"
val_src = "val.de"
val_tgt = "val.en"
max_tokens = 256
max_len = 40

[tokenizer]
kind = "bpe"
vocab_size = 320

[train]
batch_size = 32
max_steps = 6
eval_every = 3
log_every = 3
keep_last = 2

[optimizer]
beta1 = 0.9
beta2 = 0.98
eps = 1e-9
weight_decay = 0.0

[schedule]
kind = "noam"
d_model = 32
warmup_steps = 2
factor = 1.0
"#;

/// `n` sentence pairs drawn by a fixed linear congruential generator.
fn corpus(n: usize, seed: u64) -> (String, String) {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let (mut de, mut en) = (String::new(), String::new());
    for _ in 0..n {
        let idx: Vec<usize> = (0..2 + next() % 5).map(|_| next() % WORDS.len()).collect();
        let de_line: Vec<&str> = idx.iter().map(|&i| WORDS[i].0).collect();
        let en_line: Vec<&str> = idx.iter().map(|&i| WORDS[i].1).collect();
        de.push_str(&(de_line.join(" ") + "\n"));
        en.push_str(&(en_line.join(" ") + "\n"));
    }
    (de, en)
}

/// The run directory of the tiny model, trained once for all tests of this file.
fn trained() -> &'static Path {
    // Statics are never dropped, so the directory lives under Cargo's per-target temporary
    // directory (named by process, as other `cargo test` runs may share it) instead of /tmp.
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, run) = RUN.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("translate_cli-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let (de, en) = corpus(120, 1);
        let (vde, ven) = corpus(20, 2);
        for (f, t) in [
            ("train.de", &de),
            ("train.en", &en),
            ("val.de", &vde),
            ("val.en", &ven),
        ] {
            std::fs::write(dir.path().join(f), t).unwrap();
        }
        std::fs::write(dir.path().join("tiny.toml"), CONFIG).unwrap();
        let out = transformer(
            dir.path(),
            &["train", "--config", "tiny.toml", "--out", "run"],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let run = dir.path().join("run");
        (dir, run)
    });
    run
}

fn transformer(cwd: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_transformer"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the transformer binary");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `translate` on `input` with extra flags: (stdout lines, stderr, success).
fn translate(input: &[u8], flags: &[&str]) -> (Vec<String>, String, bool) {
    let run = trained();
    let ckpt = run.to_str().unwrap();
    let mut args = vec!["translate", "--checkpoint", ckpt];
    args.extend_from_slice(flags);
    let out = transformer(run, &args, Some(input));
    let stdout = text(&out.stdout);
    let lines = stdout.lines().map(str::to_string).collect();
    (lines, text(&out.stderr), out.status.success())
}

#[test]
fn translate_keeps_order_and_aligns_bad_lines() {
    let long = vec!["hund"; 60].join(" ");
    let mut input = Vec::new();
    for line in [
        "ein hund läuft",
        "",
        "katze",
        "ein großer roter hund und eine katze schlafen",
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(b"rot \xff\xfe hund\n"); // line 5: invalid UTF-8
    input.extend_from_slice(long.as_bytes()); // line 6: longer than 48 tokens
    input.extend_from_slice(b"\nkatze schl\xc3\xa4ft\n");

    let (out, err, ok) = translate(&input, &["--beam", "1", "--batch-size", "1"]);
    assert!(!ok, "an invalid line makes the exit status non-zero");
    assert_eq!(
        out.len(),
        7,
        "one output line per input line: {out:?}\n{err}"
    );
    assert_eq!(out[1], "", "an empty line gives an empty line");
    assert_eq!(out[4], "", "the invalid line gives an empty line");
    assert!(err.contains("line 5") && err.contains("UTF-8"), "{err}");
    assert!(
        err.contains("warning: line 6") && err.contains("limit of 48"),
        "{err}"
    );

    // Each line translated alone gives the same output at the same place.
    for i in [0, 2, 3, 6] {
        let line: Vec<u8> = input.split(|&b| b == b'\n').nth(i).unwrap().to_vec();
        let (alone, err, ok) = translate(&line, &["--beam", "1", "--batch-size", "1"]);
        assert!(ok, "{err}");
        assert_eq!(alone, vec![out[i].clone()], "line {}", i + 1);
    }
    // Batching sentences together changes nothing.
    let (batched, _, _) = translate(&input, &["--beam", "1", "--batch-size", "8"]);
    assert_eq!(batched, out);

    // With --max-len-mode fail the long line is reported and left empty; the others are kept.
    let (failed, err, ok) = translate(&input, &["--beam", "1", "--max-len-mode", "fail"]);
    assert!(!ok);
    assert_eq!(failed.len(), 7);
    assert_eq!(failed[5], "");
    assert_eq!(failed[6], out[6]);
    assert!(err.contains("error: line 6"), "{err}");

    // Good input only: success.
    let (beam, err, ok) = translate(b"ein hund\nkatze\n", &["--beam", "3"]);
    assert!(ok, "{err}");
    assert_eq!(beam.len(), 2);
}

#[test]
fn translate_writes_attention_per_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let att = dir.path().join("att");
    let (out, err, ok) = translate(
        b"ein hund\n\nkatze rot\n",
        &["--beam", "2", "--attention-out", att.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert_eq!(out.len(), 3);
    for n in [1, 3] {
        let json = std::fs::read_to_string(att.join(format!("line-{n:06}.json"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let src = v["source_tokens"].as_array().unwrap().len();
        let tgt = v["target_tokens"].as_array().unwrap().len();
        let layers = v["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "one entry per decoder layer");
        assert_eq!(layers[0].as_array().unwrap().len(), 2, "one per head");
        let mean = v["mean"].as_array().unwrap();
        assert_eq!(mean.len(), tgt);
        for row in mean {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(row.len(), src);
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "attention rows are distributions");
        }
        let svg = std::fs::read_to_string(att.join(format!("line-{n:06}.svg"))).unwrap();
        assert!(svg.contains("<svg"), "a heatmap");
    }
    assert!(
        !att.join("line-000002.json").exists(),
        "the empty line has none"
    );
}

#[test]
fn eval_prints_bleu_as_one_json_line() {
    let run = trained();
    let out = transformer(
        run,
        &[
            "eval",
            "--checkpoint",
            run.to_str().unwrap(),
            "--src",
            "../val.de",
            "--ref",
            "../val.en",
            "--beam",
            "2",
            "--hyp-out",
            "hyp.txt",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in ["bleu", "bleu_lowercase", "chrf"] {
        let x = v[key].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&x), "{key} = {x}");
    }
    assert_eq!(v["sentences"], 20);
    assert_eq!(v["beam"], 2);
    let hyps = std::fs::read_to_string(run.join("hyp.txt")).unwrap();
    assert_eq!(hyps.lines().count(), 20);

    // Files of different lengths are an error naming both.
    std::fs::write(run.join("short.en"), "a dog\n").unwrap();
    let out = transformer(
        run,
        &[
            "eval",
            "--checkpoint",
            ".",
            "--src",
            "../val.de",
            "--ref",
            "short.en",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("20 lines") && err.contains("short.en has 1 lines"),
        "{err}"
    );
}

#[test]
fn average_of_the_kept_step_checkpoints_translates() {
    let run = trained();
    let steps: Vec<String> = ["step-000003", "step-000006"]
        .iter()
        .map(|s| {
            assert!(run.join(s).is_dir(), "keep_last = 2 keeps {s}");
            s.to_string()
        })
        .collect();
    let out = transformer(
        run,
        &["average", "--out", "avg", &steps[0], &steps[1]],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = transformer(
        run,
        &["translate", "--checkpoint", "avg"],
        Some(b"ein hund\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);

    // One checkpoint is not an average.
    let out = transformer(run, &["average", "--out", "avg2", &steps[0]], None);
    assert!(!out.status.success());
}
