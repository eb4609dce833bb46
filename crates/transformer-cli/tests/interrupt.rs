//! Ctrl-C during training and crashes during a save (issue 3, item 9): the last good checkpoint
//! survives and `--resume` carries on from it.

mod common;

use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{checkpoint_step, losses, metrics, text, Workspace};

/// Poll `child` until it exits, killing it (and failing) after `limit`.
fn wait_for(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lines of `metrics.jsonl` written so far (0 while it does not exist).
fn metric_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count())
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_completes_the_run() {
    let ws = Workspace::new();
    // 300 steps with a log line at each: a second or two here, far longer than it takes to see
    // the first lines and interrupt. Evaluation (and so a checkpoint) only every 250 steps:
    // the one found after Ctrl-C is the one saved on the interrupt.
    let settings = [
        "--set",
        "train.max_steps=300",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=250",
        "--set",
        "schedule.decay_steps=300",
    ];
    let mut args = vec!["train", "--config", "lm.toml", "--out", "run"];
    args.extend_from_slice(&settings);
    let mut child = ws
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = ws.join("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_lines(&run) < 5 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "no progress in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGINT, as Ctrl-C sends it (the shell's built-in kill: no procps needed).
    let kill = std::process::Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .expect("run sh");
    assert!(kill.success());
    let status = wait_for(&mut child, Duration::from_secs(60), "interrupted training");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "Ctrl-C should exit with 130 (it ended with {status}); stderr: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");

    // The checkpoint is the interrupted step's, complete and loadable.
    let step = checkpoint_step(&run.join("checkpoint"));
    assert!(
        (5..300).contains(&step),
        "checkpoint at step {step} after an interrupt"
    );
    let last = metrics(&run).last().unwrap()["step"].as_u64().unwrap();
    assert_eq!(last, step, "metrics.jsonl and the checkpoint disagree");
    for leftover in [".checkpoint.tmp", ".checkpoint.old"] {
        assert!(!run.join(leftover).exists(), "{leftover} left behind");
    }
    let out = ws.ok(&[
        "eval",
        "--checkpoint",
        "run/checkpoint",
        "--text",
        "corpus.txt",
    ]);
    let r: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(r["loss"].as_f64().is_some_and(f64::is_finite), "{r}");

    // --resume finishes the run.
    let mut resume = vec!["--resume"];
    resume.extend_from_slice(&settings);
    let out = ws.train("run", &resume);
    assert!(
        text(&out.stdout).contains(&format!("resuming at step {step}")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(checkpoint_step(&run.join("checkpoint")), 300);
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter(|r| r["event"] == "log")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=300).collect::<Vec<u64>>(),
        "a step is missing or repeated"
    );
}

#[test]
fn leftovers_of_a_crash_during_a_save_do_not_damage_resume() {
    let ws = Workspace::new();
    ws.train("full", &[]);
    let full = losses(&metrics(&ws.join("full")));

    // A crash while writing the next checkpoint: a half-written temporary directory.
    ws.train("tmp", &["--set", "train.max_steps=10"]);
    let tmp = ws.join("tmp/.checkpoint.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let weights = std::fs::read(ws.join("tmp/checkpoint/model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    std::fs::write(tmp.join("trainer_state.json"), "{\"step\": 1").unwrap();
    // Generating and evaluating from the run ignore it.
    ws.ok(&["eval", "--checkpoint", "tmp", "--text", "corpus.txt"]);
    ws.train("tmp", &["--resume"]);
    assert_eq!(checkpoint_step(&ws.join("tmp/checkpoint")), 20);
    assert!(!tmp.exists(), "the half-written checkpoint was not cleared");
    assert_eq!(losses(&metrics(&ws.join("tmp"))), full);

    // A crash between the two renames of a save: the previous checkpoint sits in
    // .checkpoint.old, checkpoint/ is gone, and the new one is half-written.
    ws.train("old", &["--set", "train.max_steps=10"]);
    std::fs::rename(ws.join("old/checkpoint"), ws.join("old/.checkpoint.old")).unwrap();
    std::fs::create_dir(ws.join("old/.checkpoint.tmp")).unwrap();
    std::fs::write(ws.join("old/.checkpoint.tmp/meta.json"), "{").unwrap();
    // A fresh run may not take the directory over...
    let e = ws.fails(
        &["train", "--config", "lm.toml", "--out", "old"],
        &["already holds a run"],
    );
    assert!(e.contains("--resume"), "{e}");
    // ...and --resume puts the previous checkpoint back and carries on exactly.
    ws.train("old", &["--resume"]);
    assert_eq!(checkpoint_step(&ws.join("old/checkpoint")), 20);
    for leftover in [".checkpoint.tmp", ".checkpoint.old"] {
        assert!(!ws.join("old").join(leftover).exists(), "{leftover} left");
    }
    assert_eq!(losses(&metrics(&ws.join("old"))), full);
}
