//! Bad input (issue 3, item 9): each case exits non-zero with an `error:` line that names what
//! is at fault, and overwrites nothing.

mod common;

use common::{snapshot, text, Workspace};

/// A train command on `lm.toml` into `out` with `extra` arguments.
fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--config", "lm.toml", "--out", out];
    args.extend_from_slice(extra);
    args
}

#[test]
fn bad_corpora_are_refused_before_anything_is_written() {
    let ws = Workspace::new();
    std::fs::write(ws.join("empty.txt"), "").unwrap();
    // 20 characters: block_size + 1 = 17 does not fit in either split.
    std::fs::write(ws.join("short.txt"), "the cat sat on a mat").unwrap();
    // Long enough to train on, but its last 10% (15 characters) is shorter than 17.
    let corpus = common::corpus();
    std::fs::write(ws.join("short_val.txt"), &corpus[..150]).unwrap();

    ws.fails(
        &train_args("r", &["--set", "data.path=missing.txt"]),
        &["missing.txt", "No such file"],
    );
    ws.fails(
        &train_args("r", &["--set", "data.path=empty.txt"]),
        &["empty.txt", "empty"],
    );
    ws.fails(
        &train_args("r", &["--set", "data.path=short.txt"]),
        &["short.txt", "block_size + 1 = 17"],
    );
    ws.fails(
        &train_args("r", &["--set", "data.path=short_val.txt"]),
        &["short_val.txt", "validation split", "block_size + 1 = 17"],
    );
    assert!(!ws.join("r").exists(), "a failed run created its directory");
}

#[test]
fn config_errors_name_the_field() {
    let ws = Workspace::new();
    let config = common::LM_CONFIG;
    std::fs::write(
        ws.join("unknown.toml"),
        config.replace("batch_size = 4", "batch_size = 4\nbatch_sise = 4"),
    )
    .unwrap();
    std::fs::write(
        ws.join("wrong_type.toml"),
        config.replace("batch_size = 4", "batch_size = \"four\""),
    )
    .unwrap();
    ws.fails(
        &["train", "--config", "unknown.toml", "--out", "r"],
        &["unknown.toml", "unknown field `batch_sise`"],
    );
    ws.fails(
        &["train", "--config", "wrong_type.toml", "--out", "r"],
        &["wrong_type.toml", "train.batch_size", "invalid type"],
    );
    // The same mistakes in the [model] section, which is checked against the model's config.
    ws.fails(
        &train_args("r", &["--set", "model.d_modle=64"]),
        &["model.d_modle", "unknown field"],
    );
    ws.fails(
        &train_args("r", &["--set", "model.n_layers=two"]),
        &["model.n_layers", "invalid type"],
    );
    ws.fails(
        &["train", "--config", "missing.toml", "--out", "r"],
        &["missing.toml"],
    );
    // A library error that carries its cause prints it once.
    let e = ws.fails(&["train", "--config", "missing.toml"], &[]);
    assert_eq!(e.matches("No such file").count(), 1, "{e}");
    assert!(!ws.join("r").exists());
}

#[test]
fn bad_set_syntax_is_refused() {
    let ws = Workspace::new();
    for bad in [
        "nonsense",
        "train.max_steps",
        "=3",
        "train.=3",
        ".max_steps=3",
    ] {
        ws.fails(&train_args("r", &["--set", bad]), &["--set", bad]);
    }
    // A key that is not a section.
    ws.fails(
        &train_args("r", &["--set", "train.max_steps.x=3"]),
        &["max_steps", "not a section"],
    );
    assert!(!ws.join("r").exists());
}

#[test]
fn an_out_directory_holding_a_run_is_not_overwritten() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=10"]);
    let before = snapshot(&ws.join("run"));
    assert!(before.contains_key(std::path::Path::new("checkpoint/model.safetensors")));

    ws.fails(
        &train_args("run", &[]),
        &["run", "already holds a run", "--resume", "--force"],
    );
    assert_eq!(
        snapshot(&ws.join("run")),
        before,
        "a refused run changed files"
    );
    // --force with a bad corpus fails before deleting the old run.
    ws.fails(
        &train_args("run", &["--force", "--set", "data.path=missing.txt"]),
        &["missing.txt"],
    );
    assert_eq!(
        snapshot(&ws.join("run")),
        before,
        "--force deleted a run and then failed"
    );
    // --resume with a model of another shape is refused, and the run is left as it was.
    ws.fails(
        &train_args("run", &["--resume", "--set", "model.d_model=64"]),
        &["model config differs"],
    );
    assert_eq!(snapshot(&ws.join("run")), before);

    // --force starts over.
    ws.train("run", &["--force", "--set", "train.max_steps=4"]);
    assert_eq!(common::checkpoint_step(&ws.join("run/checkpoint")), 4);
    let steps: Vec<u64> = common::metrics(&ws.join("run"))
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 4], "the old run's metrics were kept");
}

#[test]
fn resume_with_nothing_to_resume_is_refused() {
    let ws = Workspace::new();
    ws.fails(
        &train_args("nowhere", &["--resume"]),
        &["nowhere", "nothing to resume"],
    );
    assert!(!ws.join("nowhere").exists());
    std::fs::create_dir(ws.join("empty")).unwrap();
    ws.fails(
        &train_args("empty", &["--resume"]),
        &["empty", "nothing to resume"],
    );
    assert_eq!(std::fs::read_dir(ws.join("empty")).unwrap().count(), 0);
}

#[test]
fn broken_checkpoints_are_named() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    let generate = |ckpt: &str| {
        vec![
            "generate",
            "--checkpoint",
            ckpt,
            "--prompt",
            "the",
            "--max-new-tokens",
            "3",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let eval = |ckpt: &str| {
        ["eval", "--checkpoint", ckpt, "--text", "corpus.txt"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let fails = |args: Vec<String>, needles: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ws.fails(&args, needles)
    };

    // A missing file, through the run directory (which picks best/) and directly.
    std::fs::remove_file(ws.join("run/best/tokenizer.json")).unwrap();
    fails(generate("run"), &["best", "missing tokenizer.json"]);
    fails(eval("run"), &["best", "missing tokenizer.json"]);
    std::fs::remove_file(ws.join("run/checkpoint/model.safetensors")).unwrap();
    fails(
        generate("run/checkpoint"),
        &["checkpoint", "missing model.safetensors"],
    );
    fails(eval("run/checkpoint"), &["missing model.safetensors"]);
    fails(generate("no_such_dir"), &["no_such_dir"]);

    // Weights of another model shape.
    ws.train(
        "wide",
        &["--set", "train.max_steps=2", "--set", "model.d_model=64"],
    );
    ws.train("narrow", &["--set", "train.max_steps=2"]);
    let before = snapshot(&ws.join("narrow"));
    std::fs::copy(
        ws.join("wide/best/model.safetensors"),
        ws.join("narrow/best/model.safetensors"),
    )
    .unwrap();
    let e = fails(generate("narrow"), &["model.safetensors", "expected shape"]);
    assert!(e.contains("64"), "{e}");
    fails(eval("narrow"), &["model.safetensors", "expected shape"]);
    // And --resume with it is refused before any file of the run changes.
    std::fs::copy(
        ws.join("wide/checkpoint/model.safetensors"),
        ws.join("narrow/checkpoint/model.safetensors"),
    )
    .unwrap();
    let tampered = snapshot(&ws.join("narrow"));
    assert_ne!(tampered, before);
    fails(
        {
            let mut a: Vec<String> = train_args("narrow", &["--resume"])
                .into_iter()
                .map(String::from)
                .collect();
            a.extend(["--set".into(), "train.max_steps=4".into()]);
            a
        },
        &["model.safetensors", "expected shape"],
    );
    assert_eq!(snapshot(&ws.join("narrow")), tampered);
}

#[test]
fn prompts_and_texts_outside_the_vocabulary_are_named() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    let out = ws.run(&["generate", "--checkpoint", "run", "--prompt", "the çat"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error:") && stderr.contains("prompt") && stderr.contains("'ç'"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "wrote {:?}", text(&out.stdout));
    ws.fails(
        &["generate", "--checkpoint", "run", "--prompt", ""],
        &["prompt is empty"],
    );
    std::fs::write(ws.join("caps.txt"), "the cat\nThe Dog\n").unwrap();
    ws.fails(
        &["eval", "--checkpoint", "run", "--text", "caps.txt"],
        &["caps.txt", "'T'", "line 2"],
    );
    ws.fails(
        &["eval", "--checkpoint", "run", "--text", "missing.txt"],
        &["missing.txt"],
    );
}

#[test]
fn invalid_sampling_numbers_are_refused() {
    let ws = Workspace::new();
    ws.train("run", &["--set", "train.max_steps=2"]);
    let cases: [(&str, &str, &str); 10] = [
        ("--temperature", "-1", "temperature"),
        ("--temperature", "NaN", "temperature"),
        ("--temperature", "inf", "temperature"),
        ("--temperature", "warm", "--temperature"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p"),
        ("--top-p", "-0.5", "top_p"),
        ("--top-k", "0", "top_k"),
        ("--top-k", "-3", "--top-k"),
        ("--max-new-tokens", "-1", "--max-new-tokens"),
    ];
    for (flag, value, named) in cases {
        let out = ws.run(&["generate", "--checkpoint", "run", flag, value]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(
            stderr.starts_with("error:") && stderr.contains(named) && stderr.contains(value),
            "{flag} {value}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{flag} {value}: {:?}",
            text(&out.stdout)
        );
    }
}
