//! Issue 16: data-parallel training on MPI, `mpirun -np 2 transformer train …`, against a
//! single process with the same global batch; resuming at another world size; a rank killed
//! mid-run; a config that cannot be shared out. Needs the `mpi` feature and Open MPI's
//! `mpirun` (`scripts/install-mpi.sh`; CI runs it): without `mpirun` these tests fail.
#![cfg(feature = "mpi")]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{losses, metrics, succeeded as ok, text, Workspace};

/// Dropout off (each rank draws its own masks), one record per step, a global batch of 5
/// (shards of 3 and 2 rows: the token weighting matters) in two micro-batches, and
/// nanoGPT's learning rate: lm.toml's 1e-2 on a tiny model lets Adam amplify the last-bit
/// differences of summing the rows in another order (a gradient element near 0 whose sign
/// flips moves by the whole step) to 1.2e-6 by step 7.
const SETTINGS: [&str; 12] = [
    "--set",
    "schedule.lr=1e-3",
    "--set",
    "schedule.min_lr=1e-4",
    "--set",
    "model.dropout=0",
    "--set",
    "train.log_every=1",
    "--set",
    "train.batch_size=5",
    "--set",
    "train.grad_accum=2",
];

/// `mpirun -np N transformer ARGS` in the workspace: one thread per rank, as root where CI
/// runs, no binding to cores (containers may not allow it).
fn mpirun(ws: &Workspace, np: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(env!("CARGO_BIN_EXE_transformer"))
    .args(args)
    .current_dir(ws.path())
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RAYON_NUM_THREADS", "1")
    .env_remove("TRANSFORMER_DEVICE");
    cmd
}

/// Runs `cmd` to completion within `limit`, killing it after.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (scripts/install-mpi.sh installs Open MPI)");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("mpirun did not end within {limit:?}");
        }
    }
}

fn train_args<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--config", "lm.toml", "--out", out, "--set", steps];
    args.extend_from_slice(&SETTINGS);
    args.extend_from_slice(extra);
    args
}

/// The training loss of every step of a run directory.
fn step_losses(ws: &Workspace, dir: &str) -> Vec<(u64, f64)> {
    losses(&metrics(&ws.join(dir)))
        .iter()
        .filter(|r| r["event"] == "log")
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    let worst = a
        .iter()
        .zip(b)
        .map(|((_, x), (_, y))| (x - y).abs())
        .fold(0.0, f64::max);
    println!("{what}: largest difference {worst:e}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}");
        assert!(
            (la - lb).abs() <= 1e-6,
            "{what}: step {sa}: {la} vs {lb} (differ by {:e})",
            (la - lb).abs()
        );
    }
}

#[test]
fn two_ranks_train_as_one_process_and_resume_at_any_world_size() {
    let ws = Workspace::new();
    let limit = Duration::from_secs(120);
    let steps = "train.max_steps=20";
    ws.ok(&train_args("one", steps, &[]));
    let out = ok(
        output_within(mpirun(&ws, 2, &train_args("two", steps, &[])), limit),
        "mpirun -np 2",
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("data parallel on MPI") && stdout.contains("2 ranks"),
        "{stdout}"
    );
    // Rank 0 alone reports.
    assert_eq!(stdout.matches("done: 20 steps").count(), 1, "{stdout}");
    let one = step_losses(&ws, "one");
    assert_eq!(one.len(), 20);
    assert_close(&one, &step_losses(&ws, "two"), "1 process vs 2 ranks");
    assert!(one[19].1 < one[0].1, "the loss fell: {one:?}");
    assert!(ws.join("two/checkpoint/model.safetensors").is_file());

    // 2 ranks to step 10 (a checkpoint at the evaluation there), then one process to 20;
    // and the other way round.
    let half = "train.max_steps=10";
    ok(
        output_within(mpirun(&ws, 2, &train_args("down", half, &[])), limit),
        "2 ranks to step 10",
    );
    ws.ok(&train_args("down", steps, &["--resume"]));
    ws.ok(&train_args("up", half, &[]));
    ok(
        output_within(
            mpirun(&ws, 2, &train_args("up", steps, &["--resume"])),
            limit,
        ),
        "2 ranks resuming at step 10",
    );
    assert_close(&one, &step_losses(&ws, "down"), "2 ranks, resumed on 1");
    assert_close(&one, &step_losses(&ws, "up"), "1 process, resumed on 2");
}

/// The processes whose working directory is `dir` and whose MPI rank is `rank`.
fn rank_pids(dir: &std::path::Path, rank: usize) -> Vec<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let here = std::fs::read_link(entry.path().join("cwd")).is_ok_and(|c| c == dir);
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if here && env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn killing_one_rank_stops_the_job_with_an_error_on_the_other() {
    let ws = Workspace::new();
    let dir = ws.path().canonicalize().unwrap();
    let mut cmd = mpirun(
        &ws,
        2,
        &train_args(
            "run",
            "train.max_steps=1000000",
            &[
                "--set",
                "schedule.decay_steps=1000000",
                "--set",
                "train.eval_every=100",
            ],
        ),
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (scripts/install-mpi.sh installs Open MPI)");
    // Wait until both ranks train (rank 0 has logged steps), then kill rank 1.
    let deadline = Instant::now() + Duration::from_secs(60);
    let logged = || {
        std::fs::read_to_string(ws.join("run/metrics.jsonl"))
            .unwrap_or_default()
            .matches('\n')
            .count()
    };
    while logged() < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        assert!(Instant::now() < deadline, "no training within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victims = rank_pids(&dir, 1);
    assert_eq!(victims.len(), 1, "rank 1's process: {victims:?}");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &victims[0].to_string()])
        .status()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the job hung after rank 1 was killed");
        }
    };
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "stopped {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        stderr.contains("error: rank 0: stopped by SIGTERM")
            && stderr.contains("another rank failed or was killed"),
        "rank 0 says why it stops:\n{stderr}"
    );
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "mpirun names the killed rank:\n{stderr}"
    );
    assert!(rank_pids(&dir, 0).is_empty(), "rank 0 is still running");
    // The checkpoint of step 100 or later, if one was written, is whole.
    if ws.join("run/checkpoint").exists() {
        assert!(ws.join("run/checkpoint/model.safetensors").is_file());
    }
}

#[test]
fn a_global_batch_smaller_than_the_world_is_an_error_on_every_rank() {
    let ws = Workspace::new();
    let out = output_within(
        mpirun(
            &ws,
            2,
            &[
                "train",
                "--config",
                "lm.toml",
                "--out",
                "run",
                "--set",
                "train.batch_size=1",
            ],
        ),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("error: rank ")
            && stderr.contains("train.batch_size")
            && stderr.contains("data-parallel ranks (2)"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
