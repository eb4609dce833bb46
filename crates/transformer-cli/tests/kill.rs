//! Issue 15: `kill -9` at random moments of a run that checkpoints at every step, ten times;
//! after each, the previous checkpoint loads and `--resume` continues at its step. Seeded, so
//! the moments are the same on every run (the process's speed still varies).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{checkpoint_step, metrics, text, Workspace};

/// Steps the interrupted run is configured for: more than ten short segments can reach.
const MAX_STEPS: &str = "train.max_steps=100000";

#[test]
fn kill_9_at_random_moments_never_loses_the_previous_checkpoint() {
    let ws = Workspace::new();
    let settings = [
        "--set",
        MAX_STEPS,
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=100000",
        "--set",
        "schedule.decay_steps=100000",
    ];
    let run = ws.join("run");
    let mut rng: u64 = 0x15_15_15;
    let mut prev: Option<u64> = None;
    for round in 0..10 {
        let mut args = vec!["train", "--config", "lm.toml", "--out", "run"];
        if prev.is_some() {
            args.push("--resume");
        }
        args.extend_from_slice(&settings);
        let log = ws.join(&format!("stdout-{round}.txt"));
        let mut child = ws
            .command(&args)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for training to start (the first line is printed once the run is prepared),
        // then a pseudo-random 0-250 ms: before, during or after any of the saves.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("run directory")
        {
            assert!(
                child.try_wait().unwrap().is_none(),
                "round {round}: the run ended early: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "round {round}: no start in 60 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let wait_ms = (rng >> 33) % 250;
        std::thread::sleep(Duration::from_millis(wait_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let started = std::fs::read_to_string(&log).unwrap();
        if let Some(step) = prev {
            assert!(
                started.contains(&format!("resuming at step {step}")),
                "round {round}: --resume did not continue at step {step}:\n{started}"
            );
        }
        // The previous checkpoint loads (evaluating the run directory also puts it back when
        // the kill came between the two renames of a save).
        if run.join("checkpoint").exists() || run.join(".checkpoint.old").exists() {
            let out = ws.ok(&["eval", "--checkpoint", "run", "--text", "corpus.txt"]);
            let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
            assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{v}");
            let step = checkpoint_step(&run.join("checkpoint"));
            if let Some(p) = prev {
                assert!(
                    step >= p,
                    "round {round}: the checkpoint went back from {p} to {step}"
                );
            }
            prev = Some(step);
        } else {
            // Killed before the first save: nothing to resume yet, start afresh.
            assert!(prev.is_none(), "round {round}: the checkpoint disappeared");
            let _ = std::fs::remove_dir_all(&run);
        }
    }
    // Finish a few steps after the last checkpoint: every step logged once, none missing.
    let last = prev.expect("at least one checkpoint in ten rounds");
    let end = last + 3;
    let max = format!("train.max_steps={end}");
    let mut finish = settings.to_vec();
    finish[1] = &max;
    finish.insert(0, "--resume");
    let out = ws.train("run", &finish);
    assert!(
        text(&out.stdout).contains(&format!("resuming at step {last}")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(checkpoint_step(&run.join("checkpoint")), end);
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter(|r| r["event"] == "log")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=end).collect::<Vec<u64>>(),
        "a step is missing or repeated"
    );
}
