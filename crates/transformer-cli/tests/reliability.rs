//! Issue 15: never lose a good checkpoint or a user's file, and never turn a numeric blow-up
//! into silent output. One test per cause and per weak message of the issue; each failed
//! before its fix.

mod common;

use std::path::Path;

use common::{checkpoint_step, snapshot, text, Workspace};

/// Settings that make the demo take a fraction of a second.
const TINY_DEMO: [&str; 10] = [
    "--set",
    "train.max_steps=4",
    "--set",
    "train.eval_every=2",
    "--set",
    "data.n_val=8",
    "--set",
    "train.batch_size=8",
    "--n-test",
    "3",
];

fn demo_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["demo", "--out", out];
    args.extend_from_slice(&TINY_DEMO);
    args.extend_from_slice(extra);
    args
}

/// Replace every value of `tensor` in `ckpt/model.safetensors` with NaN: what a diverged run
/// wrote before the finiteness guard.
fn poison(ckpt: &Path, tensor: &str) {
    let path = ckpt.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let t = tensors.get(tensor).expect("tensor in checkpoint");
    let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(tensor.to_string(), nan);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// Whether every tensor of a checkpoint's weights is finite.
fn weights_finite(ckpt: &Path) -> bool {
    let tensors =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    tensors.values().all(|t| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    })
}

// Cause 1: a diverging run replaced the last good checkpoint with NaN weights.
#[test]
fn a_diverging_run_never_overwrites_the_last_good_checkpoint() {
    let ws = Workspace::new();
    ws.train(
        "run",
        &["--set", "train.max_steps=4", "--set", "train.eval_every=2"],
    );
    assert_eq!(checkpoint_step(&ws.join("run/checkpoint")), 4);
    // lr 1e10 with a checkpoint at every step: some update turns a weight into NaN or inf
    // while the loss it came from was still finite.
    let e = ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "run",
            "--resume",
            "--set",
            "train.max_steps=20",
            "--set",
            "schedule.lr=1e10",
            "--set",
            "train.checkpoint_every=1",
        ],
        &["training stopped at step", "not finite", "schedule.lr"],
    );
    assert!(
        e.contains("parameter `") || e.contains("optimizer moment `") || e.contains("loss"),
        "the error names no tensor: {e}"
    );
    let ckpt = ws.join("run/checkpoint");
    let kept = checkpoint_step(&ckpt);
    assert!(
        e.contains(&format!("still holds step {kept}")),
        "the error does not name the kept step {kept}: {e}"
    );
    assert!(weights_finite(&ckpt), "a non-finite checkpoint was saved");
    assert!(weights_finite(&ws.join("run/best")));
    // The kept checkpoint still evaluates to a finite loss.
    let out = ws.ok(&[
        "eval",
        "--checkpoint",
        "run/checkpoint",
        "--text",
        "corpus.txt",
    ]);
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{v}");
}

// Cause 1, second half: eval printed `"loss": null` with exit 0 and generate printed token 0
// from a NaN checkpoint; --resume from it advised lowering the learning rate.
#[test]
fn a_nan_checkpoint_is_an_error_for_eval_generate_and_resume() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    poison(&ws.join("run/checkpoint"), "norm.weight");
    poison(&ws.join("run/best"), "norm.weight");
    let before = snapshot(&ws.join("run"));
    let out = ws.run(&["eval", "--checkpoint", "run", "--text", "corpus.txt"]);
    assert!(!out.status.success(), "eval of NaN weights exited 0");
    assert!(
        out.stdout.is_empty(),
        "eval printed {:?}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("norm.weight") && err.contains("not finite"),
        "{err}"
    );
    let out = ws.run(&[
        "generate",
        "--checkpoint",
        "run",
        "--prompt",
        "the",
        "--max-new-tokens",
        "3",
    ]);
    assert!(!out.status.success(), "generate from NaN weights exited 0");
    assert!(
        text(&out.stderr).contains("not finite"),
        "{}",
        text(&out.stderr)
    );
    let e = ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "run",
            "--resume",
            "--set",
            "train.max_steps=4",
        ],
        &["norm.weight", "cannot be resumed"],
    );
    assert!(!e.contains("lower the learning rate"), "{e}");
    assert_eq!(
        snapshot(&ws.join("run")),
        before,
        "a refused command changed the run"
    );
}

// Cause 2: `demo --out DIR` replaced a training run without --force, deleting it before its
// own config was validated; the same for a previous demo.
#[test]
fn demo_never_replaces_a_run_and_keeps_an_old_demo_on_failure() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    let run = snapshot(&ws.join("run"));
    ws.fails(&demo_args("run", &[]), &["run", "training run", "--force"]);
    // d_model 64 is not divisible by 3 heads: even with --force, the invalid config is
    // refused before the run is touched.
    ws.fails(
        &demo_args("run", &["--force", "--set", "model.n_heads=3"]),
        &["n_heads"],
    );
    assert_eq!(
        snapshot(&ws.join("run")),
        run,
        "demo changed a training run"
    );

    ws.ok(&demo_args("d", &[]));
    let demo = snapshot(&ws.join("d"));
    assert!(demo.contains_key(Path::new("best/model.safetensors")));
    ws.fails(&demo_args("d", &["--set", "model.n_heads=3"]), &["n_heads"]);
    assert_eq!(
        snapshot(&ws.join("d")),
        demo,
        "a failed demo changed the old one"
    );
    // A finished demo is replaced by the next one without --force; nothing is left beside it.
    ws.ok(&demo_args("d", &["--set", "train.seed=8"]));
    assert_ne!(snapshot(&ws.join("d")), demo);
    let names: Vec<String> = std::fs::read_dir(ws.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "left beside the output: {names:?}");
    // --force replaces the training run.
    ws.ok(&demo_args("run", &["--force"]));
    assert!(ws.join("run/attention.svg").is_file());
}

// Cause 3: a directory holding only step-* checkpoints was not seen as a run.
#[test]
fn a_directory_of_step_checkpoints_is_a_run() {
    let ws = Workspace::new();
    ws.train(
        "run",
        &[
            "--set",
            "train.max_steps=4",
            "--set",
            "train.eval_every=2",
            "--set",
            "train.keep_last=2",
        ],
    );
    for e in ["checkpoint", "best"] {
        std::fs::remove_dir_all(ws.join("run").join(e)).unwrap();
    }
    for f in ["metrics.jsonl", "loss.svg"] {
        std::fs::remove_file(ws.join("run").join(f)).unwrap();
    }
    std::fs::write(ws.join("run/notes.txt"), "mine").unwrap();
    let before = snapshot(&ws.join("run"));
    assert!(before.keys().any(|k| k.starts_with("step-000004")));
    ws.fails(
        &["train", "--config", "lm.toml", "--out", "run"],
        &["already holds a run", "--force"],
    );
    assert_eq!(snapshot(&ws.join("run")), before);
}

// Cause 4: a tiny temperature overflowed logits / T and decoded token 0.
#[test]
fn tiny_temperatures_are_refused() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    for t in ["1e-38", "1e-300", "5e-324"] {
        let out = ws.run(&["generate", "--checkpoint", "run", "--temperature", t]);
        assert!(!out.status.success(), "--temperature {t} was accepted");
        let err = text(&out.stderr);
        assert!(
            err.contains("temperature") && err.contains("0 (greedy)"),
            "{t}: {err}"
        );
        assert!(out.stdout.is_empty(), "{t}: {:?}", text(&out.stdout));
    }
    // 0 (greedy) and ordinary temperatures still work.
    for t in ["0", "0.5"] {
        ws.ok(&[
            "generate",
            "--checkpoint",
            "run",
            "--temperature",
            t,
            "--max-new-tokens",
            "4",
        ]);
    }
}

// Cause 6: `demo --n-test 0` panicked after printing a NaN accuracy.
#[test]
fn demo_with_no_test_sequences_is_an_error() {
    let ws = Workspace::new();
    let out = ws.run(&["demo", "--out", "d", "--n-test", "0"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error:") && err.contains("--n-test"),
        "{err}"
    );
    assert!(!err.contains("panicked") && !text(&out.stdout).contains("NaN"));
    assert!(!ws.join("d").exists());
    ws.fails(&["demo", "--n-test", "-1"], &["--n-test", "-1"]);
}

// Cause 7: an empty validation set reported val loss 0.0 and froze best/.
#[test]
fn an_empty_validation_set_is_an_error() {
    let ws = Workspace::new();
    ws.fails(
        &demo_args("d", &["--set", "data.n_val=0"]),
        &["data.n_val", "got 0"],
    );
    ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "r",
            "--set",
            "data.train_fraction=1.0",
        ],
        &["data.train_fraction", "validation"],
    );
    assert!(!ws.join("d").exists() && !ws.join("r").exists());
}

// Weak messages of the issue, each now naming the flag, field or variable at fault.
#[test]
fn weak_messages_name_what_is_wrong() {
    let ws = Workspace::new();
    let train = |set: &str, needles: &[&str]| {
        ws.fails(
            &["train", "--config", "lm.toml", "--out", "r", "--set", set],
            needles,
        )
    };
    train("model.dropout=nan", &["model.dropout", "finite", "NaN"]);
    train(
        "schedule.min_lr=0.1",
        &["schedule.min_lr", "at most schedule.lr = 0.01"],
    );
    let e = train("optimizer.eps=0", &["optimizer.eps", "> 0", "got 0"]);
    assert!(!e.contains("learning rate"), "{e}");
    train("train.grad_clip=inf", &["train.grad_clip", "inf"]);
    train(
        "train.batch_size=100000000000",
        &["train.batch_size", "100000000000"],
    );
    assert!(!ws.join("r").exists());

    std::fs::write(ws.join("afile"), "mine").unwrap();
    ws.fails(
        &["train", "--config", "lm.toml", "--out", "afile"],
        &["--out afile", "a file is there"],
    );
    ws.fails(
        &demo_args("afile", &[]),
        &["--out afile", "a file is there"],
    );
    assert_eq!(std::fs::read_to_string(ws.join("afile")).unwrap(), "mine");

    let out = ws
        .command(&["models"])
        .env("TRANSFORMER_THREADS", "0")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("TRANSFORMER_THREADS"),
        "{err}"
    );
    assert!(!err.contains("--threads"), "{err}");
    ws.fails(&["--threads", "0", "models"], &["--threads"]);

    // --resume of a finished run.
    ws.train("done", &["--set", "train.max_steps=2"]);
    let before = snapshot(&ws.join("done"));
    let e = ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "done",
            "--resume",
            "--set",
            "train.max_steps=2",
        ],
        &["already finished at step 2", "train.max_steps"],
    );
    assert!(!e.contains("NaN"), "{e}");
    assert_eq!(snapshot(&ws.join("done")), before);

    // eval --batch-size 0 is refused as by every other command.
    ws.fails(
        &[
            "eval",
            "--checkpoint",
            "done",
            "--text",
            "corpus.txt",
            "--batch-size",
            "0",
        ],
        &["--batch-size", "0"],
    );
    // A huge beam is refused, not allocated.
    ws.fails(
        &["translate", "--checkpoint", "done", "--beam", "4294967296"],
        &["beam_size", "in [1, 1024]", "4294967296"],
    );
    // Negative numbers reach the flag's own parsing, whose error names it.
    for (flag, cmd) in [
        ("--beam", "translate"),
        ("--alpha", "translate"),
        ("--batch-size", "translate"),
        ("--beam", "eval"),
        ("--alpha", "eval"),
        ("--batch-size", "eval"),
    ] {
        let mut args = vec![cmd, "--checkpoint", "done", flag, "-1"];
        if cmd == "eval" {
            args.extend(["--src", "corpus.txt", "--ref", "corpus.txt"]);
        }
        let e = ws.fails(&args, &[flag, "-1"]);
        assert!(!e.contains("unexpected argument"), "{cmd} {flag} -1: {e}");
    }
}

/// A tiny translation model (1 step) in a workspace with a parallel corpus.
fn translation_workspace() -> Workspace {
    let ws = Workspace::new();
    let pairs = [
        ("ein hund", "a dog"),
        ("eine katze", "a cat"),
        ("der hund läuft", "the dog runs"),
        ("die katze schläft", "the cat sleeps"),
    ];
    let (mut de, mut en) = (String::new(), String::new());
    for i in 0..40 {
        let (d, e) = pairs[i % pairs.len()];
        de.push_str(&format!("{d}\n"));
        en.push_str(&format!("{e}\n"));
    }
    for (f, t) in [
        ("train.de", &de),
        ("train.en", &en),
        ("val.de", &de),
        ("val.en", &en),
    ] {
        std::fs::write(ws.join(f), t).unwrap();
    }
    std::fs::write(ws.join("mt.toml"), MT_CONFIG).unwrap();
    ws.ok(&["train", "--config", "mt.toml", "--out", "mt"]);
    ws
}

const MT_CONFIG: &str = r#"
[model]
family = "encoder_decoder"
preset = "tiny"
d_model = 16
d_ff = 32
n_heads = 2
n_encoder_layers = 1
n_decoder_layers = 1
max_len = 32

[data]
kind = "parallel"
train_src = "train.de"
train_tgt = "train.en"
val_src = "val.de"
val_tgt = "val.en"
max_tokens = 256
max_len = 30

[train]
batch_size = 16
max_steps = 1
eval_every = 1

[schedule]
kind = "constant"
lr = 1e-3
"#;

// Cause 5: `eval --hyp-out` could name the --ref (or --src) file and overwrote it; weak
// message: invalid UTF-8 positions counted from 0 in translate, from 1 in embed.
#[test]
fn outputs_never_replace_inputs_or_unrelated_files() {
    let ws = translation_workspace();
    let before = snapshot(ws.path());
    fn eval<'a>(hyp: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "eval",
            "--checkpoint",
            "mt",
            "--src",
            "val.de",
            "--ref",
            "val.en",
            "--beam",
            "1",
            "--hyp-out",
            hyp,
        ];
        args.extend_from_slice(extra);
        args
    }
    ws.fails(&eval("val.en", &[]), &["--hyp-out val.en", "--ref"]);
    ws.fails(&eval("./sub/../val.de", &["--force"]), &["--src"]);
    std::os::unix::fs::symlink(ws.join("val.en"), ws.join("link.txt")).unwrap();
    ws.fails(&eval("link.txt", &["--force"]), &["--ref"]);
    std::fs::remove_file(ws.join("link.txt")).unwrap();
    ws.fails(
        &eval("mt/best/model.safetensors", &["--force"]),
        &["--checkpoint"],
    );
    std::fs::write(ws.join("notes.txt"), "mine").unwrap();
    ws.fails(&eval("notes.txt", &[]), &["notes.txt", "--force"]);
    assert_eq!(
        std::fs::read_to_string(ws.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(ws.join("notes.txt")).unwrap();
    assert_eq!(snapshot(ws.path()), before, "a refused eval changed a file");
    // A new file, and an existing one with --force, are written whole.
    ws.ok(&eval("hyp.txt", &[]));
    assert_eq!(
        std::fs::read_to_string(ws.join("hyp.txt"))
            .unwrap()
            .lines()
            .count(),
        40
    );
    ws.ok(&eval("hyp.txt", &["--force"]));

    // average and translate --attention-out: not into an input, not over unrelated files.
    ws.train(
        "keep",
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.keep_last=2",
        ],
    );
    fn avg(out: &str) -> Vec<&str> {
        vec![
            "average",
            "--out",
            out,
            "keep/step-000001",
            "keep/step-000002",
        ]
    }
    ws.fails(&avg("keep"), &["--out keep", "holds the input"]);
    ws.fails(&avg("keep/step-000002"), &["--out", "input"]);
    ws.ok(&avg("avg"));
    ws.ok(&avg("avg")); // a previous average is replaced
    ws.fails(&avg("mt"), &["--out mt", "--force"]);
    let translate = |dir: &str, extra: &[&str]| {
        let mut args = vec![
            "translate",
            "--checkpoint",
            "mt",
            "--beam",
            "1",
            "--attention-out",
            dir,
        ];
        args.extend_from_slice(extra);
        ws.command(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                // A refused command exits before reading stdin: a broken pipe is expected.
                let _ = c.stdin.take().unwrap().write_all(b"ein hund\nab\xffcd\n");
                c.wait_with_output()
            })
            .unwrap()
    };
    let out = translate("mt/best", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--checkpoint"),
        "{}",
        text(&out.stderr)
    );
    std::fs::create_dir(ws.join("mine")).unwrap();
    std::fs::write(ws.join("mine/a.txt"), "mine").unwrap();
    let out = translate("mine", &[]);
    assert!(!out.status.success() && text(&out.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(ws.join("mine/a.txt")).unwrap(),
        "mine"
    );
    // Line 2 holds an invalid byte at its third byte: counted from 1, as `embed` counts.
    let out = translate("att", &[]);
    let err = text(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("byte 3 of the line"),
        "{err}"
    );
    assert!(ws.join("att/line-000001.json").is_file());
}

// `train --force` builds the new run in place of the old one, which is only moved aside until
// the new run has a checkpoint: a new run that fails (or is killed) before that gives the old
// run back.
#[test]
fn train_force_keeps_the_old_run_until_the_new_one_has_a_checkpoint() {
    let ws = Workspace::new();
    let small = ["--set", "train.max_steps=4", "--set", "train.eval_every=2"];
    ws.train("run", &small);
    let before = snapshot(&ws.join("run"));
    // lr 1e10 diverges within a few steps, long before the first checkpoint at step 50.
    let e = ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "run",
            "--force",
            "--set",
            "schedule.lr=1e10",
            "--set",
            "train.max_steps=50",
            "--set",
            "train.eval_every=50",
        ],
        &["not finite"],
    );
    assert!(e.contains("the previous run in run was put back"), "{e}");
    assert_eq!(
        snapshot(&ws.join("run")),
        before,
        "the old run was not restored"
    );

    // Killed before its first checkpoint: the next train of the directory puts the old run
    // back, and --resume continues it.
    let mut child = ws
        .command(&[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "run",
            "--force",
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.eval_every=100000",
            "--set",
            "schedule.decay_steps=100000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("training"), "{first}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        ws.join("run/.replaced-run/checkpoint").is_dir(),
        "the old run is not aside"
    );
    assert!(!ws.join("run/checkpoint").exists());
    let out = ws.train(
        "run",
        &[
            "--resume",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.eval_every=2",
        ],
    );
    assert!(
        text(&out.stdout).contains("resuming at step 4"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(checkpoint_step(&ws.join("run/checkpoint")), 6);
    assert!(!ws.join("run/.replaced-run").exists());

    // A --force run that gets its checkpoint replaces the old one for good.
    ws.train(
        "run",
        &[
            "--force",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_every=2",
        ],
    );
    assert_eq!(checkpoint_step(&ws.join("run/checkpoint")), 2);
    assert!(!ws.join("run/.replaced-run").exists());
}

// The finiteness guard covers every writer of checkpoints: averaging in a diverged
// checkpoint is refused before anything is written.
#[test]
fn average_refuses_a_nan_checkpoint() {
    let ws = Workspace::new();
    ws.train(
        "run",
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.keep_last=2",
        ],
    );
    poison(&ws.join("run/step-000002"), "norm.weight");
    ws.fails(
        &[
            "average",
            "--out",
            "avg",
            "run/step-000001",
            "run/step-000002",
        ],
        &["norm.weight", "not finite"],
    );
    assert!(!ws.join("avg").exists() && !ws.join(".avg.staging").exists());
}

// train's inputs may not live in what it writes or deletes, except its own saved config on
// --resume.
#[test]
fn train_never_replaces_its_own_inputs() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    std::fs::copy(ws.join("corpus.txt"), ws.join("run/checkpoint/corpus.txt")).unwrap();
    let before = snapshot(&ws.join("run"));
    ws.fails(
        &[
            "train",
            "--config",
            "lm.toml",
            "--out",
            "run",
            "--force",
            "--set",
            "data.path=\"run/checkpoint/corpus.txt\"",
        ],
        &["holds the input data.path"],
    );
    assert_eq!(snapshot(&ws.join("run")), before);
    std::fs::remove_file(ws.join("run/checkpoint/corpus.txt")).unwrap();
    // Resuming with the run's own saved config is fine.
    let out = ws.train("run", &["--resume", "--set", "train.max_steps=4"]);
    assert!(text(&out.stdout).contains("resuming at step 2"));
    let out = ws.ok(&[
        "train",
        "--config",
        "run/checkpoint/run.toml",
        "--out",
        "run",
        "--resume",
        "--set",
        "train.max_steps=6",
    ]);
    assert!(
        text(&out.stdout).contains("resuming at step 4"),
        "{}",
        text(&out.stdout)
    );
}
