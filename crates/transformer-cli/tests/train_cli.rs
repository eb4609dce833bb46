//! `transformer train`, `generate` and `eval` end to end on a tiny generated corpus: what a run
//! directory holds, exact `--resume`, streaming and deterministic generation, and the eval line.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{checkpoint_step, losses, metrics, text, Workspace, CHECKPOINT_FILES};

#[test]
fn train_writes_metrics_plot_and_checkpoints() {
    let ws = Workspace::new();
    let out = ws.train("run", &[]);
    let stdout = text(&out.stdout);
    // Not a terminal: plain log lines instead of a progress bar.
    assert!(stdout.contains("step      2 | loss"), "{stdout}");
    assert!(stdout.contains("done: 20 steps"), "{stdout}");

    let run = ws.join("run");
    let records = metrics(&run);
    let logs: Vec<_> = records.iter().filter(|r| r["event"] == "log").collect();
    let evals: Vec<_> = records.iter().filter(|r| r["event"] == "eval").collect();
    let log_steps: Vec<u64> = logs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(log_steps, (1..=10).map(|i| 2 * i).collect::<Vec<u64>>());
    let eval_steps: Vec<u64> = evals.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, [10, 20]);
    for r in &records {
        for field in ["train_loss", "lr", "tokens_per_sec"] {
            let v = r[field].as_f64();
            assert!(v.is_some_and(f64::is_finite), "{field} in {r}");
        }
        assert!(r["train_loss"].as_f64().unwrap() > 0.0, "{r}");
    }
    for r in &logs {
        assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r.get("val_loss").is_none(),
            "a log record has no val_loss: {r}"
        );
    }
    for r in &evals {
        assert!(
            r["val_loss"]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v > 0.0),
            "{r}"
        );
    }
    // It learns something even in 20 steps.
    let first = logs[0]["train_loss"].as_f64().unwrap();
    let last = logs[logs.len() - 1]["train_loss"].as_f64().unwrap();
    assert!(last < first, "train loss went from {first} to {last}");

    let svg = std::fs::read_to_string(run.join("loss.svg")).expect("loss.svg");
    assert!(svg.contains("<svg"), "loss.svg is not an SVG");

    for sub in ["checkpoint", "best"] {
        for f in CHECKPOINT_FILES {
            let p = run.join(sub).join(f);
            assert!(
                std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.len() > 0),
                "{} is missing or empty",
                p.display()
            );
        }
    }
    assert_eq!(checkpoint_step(&run.join("checkpoint")), 20);
    let run_toml = std::fs::read_to_string(run.join("checkpoint/run.toml")).unwrap();
    assert!(run_toml.contains("max_steps = 20"), "{run_toml}");
    // No temporary or displaced checkpoint is left behind.
    for leftover in [
        ".checkpoint.tmp",
        ".checkpoint.old",
        ".best.tmp",
        ".best.old",
    ] {
        assert!(!run.join(leftover).exists(), "{leftover} left behind");
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let ws = Workspace::new();
    ws.train("full", &[]);
    ws.train("split", &["--set", "train.max_steps=10"]);
    assert_eq!(checkpoint_step(&ws.join("split/checkpoint")), 10);
    let out = ws.train("split", &["--resume"]);
    assert!(
        text(&out.stdout).contains("resuming at step 10"),
        "{}",
        text(&out.stdout)
    );

    let full = losses(&metrics(&ws.join("full")));
    let split = losses(&metrics(&ws.join("split")));
    assert_eq!(full.len(), 12, "10 log and 2 eval records");
    assert_eq!(
        split, full,
        "a run stopped at 10 steps and resumed to 20 wrote other metrics than a run of 20"
    );
    // The weights agree too: both checkpoints give the same exact loss on the corpus.
    let eval = |dir: &str| -> serde_json::Value {
        let out = ws.ok(&["eval", "--checkpoint", dir, "--text", "corpus.txt"]);
        serde_json::from_str(text(&out.stdout).trim()).unwrap()
    };
    assert_eq!(
        eval("full/checkpoint")["loss"],
        eval("split/checkpoint")["loss"]
    );
}

#[test]
fn generate_is_deterministic_and_cache_free_decoding_agrees() {
    let ws = Workspace::new();
    ws.train("run", &[]);
    let generate = |extra: &[&str]| -> (String, String) {
        let mut args = vec!["generate", "--checkpoint", "run", "--prompt", "the "];
        args.extend_from_slice(extra);
        let out = ws.ok(&args);
        (text(&out.stdout), text(&out.stderr))
    };
    // Prompt (4) + 12 new tokens = block_size: both paths see the same context.
    let greedy = ["--max-new-tokens", "12", "--temperature", "0"];
    let (a, stderr) = generate(&greedy);
    // The prompt, then one character per new token, then a newline.
    assert!(a.starts_with("the "), "{a:?}");
    assert_eq!(a.chars().count(), 4 + 12 + 1, "{a:?}");
    assert!(a.ends_with('\n'), "{a:?}");
    assert!(
        stderr.contains("12 tokens") && stderr.contains("tokens/s") && stderr.contains("KV cache"),
        "{stderr}"
    );
    let (b, _) = generate(&greedy);
    assert_eq!(a, b, "temperature 0 is not deterministic");
    let (c, stderr) = generate(&[&greedy[..], &["--no-cache"]].concat());
    assert_eq!(
        a, c,
        "--no-cache gives another greedy text than the KV cache"
    );
    assert!(stderr.contains("no cache"), "{stderr}");

    // Sampling is repeatable for a seed.
    let sampled = [
        "--max-new-tokens",
        "40",
        "--temperature",
        "1.0",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ];
    let (s1, _) = generate(&sampled);
    let (s2, _) = generate(&sampled);
    assert_eq!(s1, s2, "the same seed sampled different texts");
    assert_eq!(s1.chars().count(), 4 + 40 + 1, "{s1:?}");
}

#[test]
fn generate_streams_tokens_and_a_closed_pipe_stops_it_cleanly() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    // Far more tokens than could be produced in the time allowed: the first ones must reach
    // stdout while generation goes on (streaming), and closing the pipe must end it cleanly.
    let mut child = ws
        .command(&[
            "generate",
            "--checkpoint",
            "run",
            "--prompt",
            "the ",
            "--max-new-tokens",
            "10000000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < 4 + 20 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "generate closed stdout after {:?}", text(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"the "), "{:?}", text(&got));
    drop(stdout);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("generate went on for 60 s after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "a closed pipe is a normal way to stop: {status}\n{stderr}"
    );
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn eval_prints_one_json_line_with_loss_and_perplexity() {
    let ws = Workspace::new();
    ws.train("run", &[]);
    let out = ws.ok(&["eval", "--checkpoint", "run", "--text", "corpus.txt"]);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let loss = r["loss"].as_f64().unwrap();
    let ppl = r["perplexity"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{r}");
    assert!(
        (ppl - loss.exp()).abs() <= 1e-9 * ppl,
        "perplexity {ppl} != exp(loss {loss})"
    );
    // Every token but the first is predicted exactly once.
    let chars = common::corpus().chars().count() as u64;
    assert_eq!(r["tokens"].as_u64(), Some(chars - 1), "{r}");
    // Exact, not sampled: the same figure again.
    let again = ws.ok(&["eval", "--checkpoint", "run", "--text", "corpus.txt"]);
    assert_eq!(stdout, text(&again.stdout));
}

/// `train.precision = "bf16"` (issue 16): the same run in mixed precision starts on the f32
/// losses within bf16 rounding (not exactly) and stays near them, and a precision that does
/// not exist is an error naming the field.
#[test]
fn bf16_training_follows_the_f32_losses() {
    let ws = Workspace::new();
    ws.train("f32", &[]);
    ws.train("bf16", &["--set", "train.precision=bf16"]);
    let (a, b) = (metrics(&ws.join("f32")), metrics(&ws.join("bf16")));
    assert_eq!(a.len(), b.len());
    let mut largest = 0f64;
    for (ra, rb) in a.iter().zip(&b) {
        for key in ["train_loss", "val_loss"] {
            if let (Some(x), Some(y)) = (ra[key].as_f64(), rb[key].as_f64()) {
                let d = (x - y).abs() / x.abs();
                // The first steps differ by the rounding of the products alone; later, as two
                // runs of another seed do, the trajectories drift apart (lm.toml's lr 1e-2).
                let limit = if ra["step"].as_u64().unwrap() <= 4 {
                    1e-4
                } else {
                    0.1
                };
                assert!(d < limit, "step {}: {key} f32 {x}, bf16 {y}", ra["step"]);
                largest = largest.max(d);
            }
        }
    }
    assert!(
        largest > 0.0,
        "bf16 gave exactly the f32 losses: the bf16 path did not run"
    );
    println!("largest relative loss difference bf16 vs f32: {largest:.2e}");
    ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "f16",
            "--set",
            "train.precision=f16",
        ],
        &["precision", "f16"],
    );
}
