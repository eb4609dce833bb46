//! Issue 15: a bounded, seeded fuzz of the shipped configs (`configs/*.toml`) and of the
//! flags, against tiny models. Every case must either succeed or fail with an `error:` line
//! that names what it was given; never panic or die on a signal, never exit 0 with non-finite
//! output, and never change a file that existed before it (every file is hashed before and
//! after).
//!
//! Each case takes one shipped config shrunk to a tiny model and a few steps (the `--set`s of
//! [`shrink`]), then applies one mutation after them: a field set to a wrong type, a sign,
//! zero, NaN, infinity, a huge or tiny value, an unknown key or section, or a flag (a bad
//! `--out`, `--resume` with nothing to resume, `--threads`), or, for `generate` / `eval`,
//! one numeric flag. Huge values are not given to `train.max_steps` or `--max-new-tokens`:
//! there a huge value is a valid request for a very long job, not a bad input.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{text, Workspace};

const CASES: usize = 400;
const SEED: u64 = 0x15;
/// A case still running after this is a failure (a hang, or a huge value taken as valid).
const CASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Run the binary, killing it after [`CASE_LIMIT`]; the output and whether it was killed.
/// Output goes to files in `logs` (outside the workspace, whose files are hashed), so that a
/// chatty case cannot block on a full pipe.
fn run_bounded(ws: &Workspace, logs: &Path, args: &[&str]) -> (Output, bool) {
    let (out_path, err_path) = (logs.join("stdout"), logs.join("stderr"));
    let mut child = ws
        .command(args)
        // What `translate` reads; the other commands ignore stdin.
        .stdin(std::fs::File::open(logs.join("stdin")).unwrap())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run the transformer binary");
    let deadline = std::time::Instant::now() + CASE_LIMIT;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            timed_out = true;
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let out = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    };
    (out, timed_out)
}

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values every field is tried with: wrong types, signs, zero, NaN, infinities, huge and tiny.
const VALUES: [&str; 17] = [
    "0",
    "-1",
    "-0.5",
    "1.5",
    "nan",
    "inf",
    "-inf",
    "1e300",
    "1e-300",
    "4294967296",
    "9223372036854775807",
    "\"zzq\"",
    "true",
    "[1, 2]",
    "{ a = 1 }",
    "\"\"",
    "3",
];
const HUGE: [&str; 3] = ["1e300", "4294967296", "9223372036854775807"];

/// `section.key` of every field of a shipped config (a line parser is enough for them).
fn fields(config: &str) -> Vec<String> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in config.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            out.push(format!("{section}.{}", key.trim()));
        }
    }
    out
}

/// The `--set`s that make a shipped config a tiny model on the workspace's data, 2 steps.
fn shrink(name: &str) -> Vec<&'static str> {
    let common = [
        "train.max_steps=2",
        "train.eval_every=1",
        "train.log_every=1",
    ];
    let specific: &[&str] = match name {
        "shakespeare-char.toml" => &[
            "data.path=\"corpus.txt\"",
            "model.preset=\"tiny\"",
            "model.block_size=16",
            "train.batch_size=4",
            "train.eval_iters=1",
            "schedule.warmup_steps=1",
            "schedule.decay_steps=2",
        ],
        "multi30k-de-en.toml" => &[
            "data.train_src=\"train.de\"",
            "data.train_tgt=\"train.en\"",
            "data.val_src=\"train.de\"",
            "data.val_tgt=\"train.en\"",
            "data.max_tokens=256",
            "data.max_len=30",
            "model.d_model=16",
            "model.n_heads=2",
            "model.d_ff=32",
            "model.n_encoder_layers=1",
            "model.n_decoder_layers=1",
            "model.max_len=32",
            "tokenizer.vocab_size=300",
            "train.batch_size=16",
            "train.checkpoint_every=1",
            "train.keep_last=1",
            "schedule.d_model=16",
            "schedule.warmup_steps=1",
        ],
        "demo-reverse.toml" => &[
            "data.n_val=8",
            "train.batch_size=8",
            "schedule.warmup_steps=1",
            "schedule.decay_steps=2",
        ],
        // Both read the workspace's tiny IDX set in data/fashion-mnist/.
        "fashion-mnist-vit.toml" => &[
            "data.n_val=8",
            "model.num_hidden_layers=1",
            "model.hidden_size=16",
            "model.intermediate_size=32",
            "train.batch_size=8",
            "schedule.warmup_steps=1",
            "schedule.decay_steps=2",
        ],
        "fashion-mnist-pixels.toml" => &[
            "data.n_val=8",
            "model.n_layers=1",
            "model.d_model=16",
            "model.d_ff=32",
            "model.n_heads=2",
            "train.batch_size=4",
            "schedule.warmup_steps=1",
            "schedule.decay_steps=2",
        ],
        other => panic!("no shrink settings for configs/{other}; add them here"),
    };
    common.iter().chain(specific).copied().collect()
}

/// A hash of every file under `root` except those under `skip` (the case's own output).
fn hashes(root: &Path, skip: &Path) -> BTreeMap<PathBuf, u64> {
    fn walk(dir: &Path, skip: &Path, into: &mut BTreeMap<PathBuf, u64>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.starts_with(skip) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(&path, skip, into);
            } else {
                let mut h = DefaultHasher::new();
                std::fs::read(&path).unwrap_or_default().hash(&mut h);
                into.insert(path, h.finish());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, skip, &mut out);
    out
}

/// Every loss in `out`'s metrics and every weight of its checkpoints is finite.
fn run_is_finite(out: &Path) -> Result<(), String> {
    if let Ok(body) = std::fs::read_to_string(out.join("metrics.jsonl")) {
        for line in body.lines() {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            for k in ["train_loss", "val_loss"] {
                if !v[k].is_null() && !v[k].as_f64().is_some_and(f64::is_finite) {
                    return Err(format!("metrics.jsonl: {k} is {}", v[k]));
                }
            }
        }
    }
    for ckpt in ["checkpoint", "best"] {
        let path = out.join(ckpt).join("model.safetensors");
        if !path.is_file() {
            continue;
        }
        let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
            .map_err(|e| e.to_string())?;
        for (name, t) in tensors {
            let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if values.iter().any(|x| !x.is_finite()) {
                return Err(format!("{}: {name} is not finite", path.display()));
            }
        }
    }
    Ok(())
}

struct Case {
    args: Vec<String>,
    /// The error, when there is one, must mention one of these.
    named: Vec<String>,
    /// The run directory the case may create.
    out: PathBuf,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Ways the error may name a `--set key=value` mutation: the key, its last part, the value.
fn names_of(key: &str, value: &str) -> Vec<String> {
    let mut named = vec![key.to_string()];
    if let Some((_, last)) = key.rsplit_once('.') {
        named.push(last.to_string());
    }
    let bare = value.trim_matches('"');
    if bare.len() >= 3 {
        named.push(bare.to_string());
    }
    named
}

fn config_case(rng: &mut Lcg, n: usize, configs: &[(String, String)]) -> Case {
    let (name, body) = rng.pick(configs);
    let out_name = format!("out-{n}");
    let mut args: Vec<String> = if name == "demo-reverse.toml" {
        strings(&["demo", "--out", &out_name, "--n-test", "2"])
    } else {
        strings(&[
            "train",
            "--config",
            &format!("configs/{name}"),
            "--out",
            &out_name,
        ])
    };
    for s in shrink(name) {
        args.extend(strings(&["--set", s]));
    }
    let fields = fields(body);
    let named;
    match rng.below(10) {
        // Most cases: one field of the shipped config.
        0..=6 => {
            let key = rng.pick(&fields).clone();
            let mut value = *rng.pick(&VALUES);
            if key == "train.max_steps" && HUGE.contains(&value) {
                value = "0";
            }
            args.extend(strings(&["--set", &format!("{key}={value}")]));
            named = names_of(&key, value);
        }
        7 => {
            let key = rng.pick(&fields).clone();
            let section = key.split('.').next().unwrap().to_string();
            let bogus = if rng.below(2) == 0 {
                format!("{section}.bogus_key")
            } else {
                "bogus_section.key".to_string()
            };
            args.extend(strings(&["--set", &format!("{bogus}=1")]));
            named = vec!["bogus".into()];
        }
        8 => {
            let (flag, needle): (&[&str], &str) = *rng.pick(&[
                (&["--out", "corpus.txt"][..], "a file is there"),
                (&["--out", "existing"][..], "already holds"),
                (&["--threads", "0"][..], "--threads"),
                (&["--threads", "99999999"][..], "--threads"),
                (&["--threads", "-2"][..], "--threads"),
                (&["--set", "nonsense"][..], "--set"),
            ]);
            if flag[0] == "--out" {
                // Replaces the case's --out (given twice, clap would refuse the repeat).
                let i = args.iter().position(|a| a == "--out").unwrap();
                args[i + 1] = flag[1].to_string();
            } else {
                args.extend(strings(flag));
            }
            named = vec![needle.to_string()];
        }
        _ => {
            if args[0] == "train" {
                args.push("--resume".into());
                named = vec!["nothing to resume".into()];
            } else {
                let v = *rng.pick(&["0", "-1", "1.5", "zzq"]);
                args.extend(strings(&["--n-test", v]));
                named = vec!["--n-test".into()];
            }
        }
    }
    Case {
        args,
        named,
        out: PathBuf::from(out_name),
    }
}

/// One numeric flag of `generate`, `eval` or `translate` against the pre-built tiny models
/// (`existing`: a language model; `mt`: a translation model).
fn flag_case(rng: &mut Lcg, n: usize) -> Case {
    let value = *rng.pick(&VALUES);
    let value = value.trim_matches('"');
    let which = rng.below(4);
    let (mut args, flag) = if which == 2 {
        let flag = *rng.pick(&["--beam", "--alpha", "--batch-size"]);
        let (cmd, extra): (&str, &[&str]) = *rng.pick(&[
            ("translate", &[][..]),
            ("eval", &["--src", "train.de", "--ref", "train.en"][..]),
        ]);
        let mut args = strings(&[cmd, "--checkpoint", "mt", flag, value]);
        args.extend(strings(extra));
        (args, flag)
    } else if which == 3 {
        let flag = "--attention-out";
        let dir = *rng.pick(&["mt", "mt/best", "corpus.txt", "configs", "att"]);
        (
            strings(&["translate", "--checkpoint", "mt", "--beam", "1", flag, dir]),
            flag,
        )
    } else if which == 0 {
        let flag = *rng.pick(&[
            "--temperature",
            "--top-k",
            "--top-p",
            "--max-new-tokens",
            "--seed",
        ]);
        let value = if flag == "--max-new-tokens" && HUGE.contains(&value) {
            "0"
        } else {
            value
        };
        (
            strings(&[
                "generate",
                "--checkpoint",
                "existing",
                "--prompt",
                "the",
                flag,
                value,
            ]),
            flag,
        )
    } else {
        let flag = "--batch-size";
        (
            strings(&[
                "eval",
                "--checkpoint",
                "existing",
                "--text",
                "corpus.txt",
                flag,
                value,
            ]),
            flag,
        )
    };
    let out = match args.iter().position(|a| a == "--attention-out") {
        Some(i) if args[i + 1] == "att" => PathBuf::from("att"),
        _ => PathBuf::from(format!("none-{n}")),
    };
    if !args.iter().any(|a| a == "--max-new-tokens") && args[0] == "generate" {
        args.extend(strings(&["--max-new-tokens", "4"]));
    }
    let mut named = vec![
        flag.to_string(),
        flag.trim_start_matches("--").replace('-', "_"),
    ];
    if value.len() >= 3 {
        named.push(value.to_string());
    }
    Case { args, named, out }
}

fn check(ws: &Workspace, case: &Case, out: &Output) -> Result<(), String> {
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    let code = out
        .status
        .code()
        .ok_or_else(|| format!("killed by a signal ({})", out.status))?;
    if stderr.contains("panicked") || code == 101 {
        return Err(format!("panicked: {stderr}"));
    }
    match code {
        0 => {
            if stdout.contains("NaN") || stdout.contains("null") {
                return Err(format!("exit 0 with non-finite output: {stdout}"));
            }
            run_is_finite(&ws.path().join(&case.out))
        }
        1 | 2 => {
            // 2: clap's usage errors, which name the flag and value themselves.
            if !stderr.starts_with("error:") {
                return Err(format!("stderr does not start with `error:`: {stderr}"));
            }
            if !case.named.iter().any(|n| stderr.contains(n.as_str())) {
                return Err(format!(
                    "the error names none of {:?}: {stderr}",
                    case.named
                ));
            }
            Ok(())
        }
        other => Err(format!("exit code {other}: {stderr}")),
    }
}

#[test]
fn mutated_configs_and_flags_fail_cleanly_or_succeed_finitely() {
    let ws = Workspace::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut configs: Vec<(String, String)> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    configs.sort();
    assert!(configs.len() >= 3, "shipped configs: {configs:?}");
    std::fs::create_dir(ws.join("configs")).unwrap();
    for (name, body) in &configs {
        std::fs::write(ws.join("configs").join(name), body).unwrap();
    }
    // A tiny Fashion-MNIST for the image configs: 40 noise images of 28x28, labels 0-9.
    let fm = ws.join("data/fashion-mnist");
    std::fs::create_dir_all(&fm).unwrap();
    let mut state = SEED;
    let noise: Vec<u8> = (0..40 * 28 * 28)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    std::fs::write(
        fm.join("train-images-idx3-ubyte"),
        common::idx(&[40, 28, 28], &noise),
    )
    .unwrap();
    let labels: Vec<u8> = (0..40).map(|i| (i % 10) as u8).collect();
    std::fs::write(
        fm.join("train-labels-idx1-ubyte"),
        common::idx(&[40], &labels),
    )
    .unwrap();
    // A parallel corpus for the translation config.
    let (mut de, mut en) = (String::new(), String::new());
    for i in 0..40 {
        let (d, e) = [
            ("ein hund", "a dog"),
            ("eine katze", "a cat"),
            ("der hund läuft", "the dog runs"),
        ][i % 3];
        de.push_str(&format!("{d}\n"));
        en.push_str(&format!("{e}\n"));
    }
    std::fs::write(ws.join("train.de"), de).unwrap();
    std::fs::write(ws.join("train.en"), en).unwrap();
    // A finished run: the target of `--out existing` and the model of the flag cases.
    ws.train("existing", &["--set", "train.max_steps=2"]);
    // A translation model for the flag cases of `translate` and `eval --src`.
    let mut mt = strings(&[
        "train",
        "--config",
        "configs/multi30k-de-en.toml",
        "--out",
        "mt",
    ]);
    for s in shrink("multi30k-de-en.toml") {
        mt.extend(strings(&["--set", s]));
    }
    ws.ok(&mt.iter().map(String::as_str).collect::<Vec<_>>());

    let logs = tempfile::tempdir().unwrap();
    std::fs::write(logs.path().join("stdin"), "ein hund\nder hund läuft\n").unwrap();
    let mut rng = Lcg(SEED);
    let mut failures = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    let mut per_command: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..CASES {
        let case = if n % 5 == 4 {
            flag_case(&mut rng, n)
        } else {
            config_case(&mut rng, n, &configs)
        };
        *per_command.entry(case.args[0].clone()).or_default() += 1;
        let before = hashes(ws.path(), &ws.path().join(&case.out));
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let (out, timed_out) = run_bounded(&ws, logs.path(), &args);
        let mut result = if timed_out {
            Err(format!("still running after {CASE_LIMIT:?}"))
        } else {
            check(&ws, &case, &out)
        };
        let after = hashes(ws.path(), &ws.path().join(&case.out));
        if result.is_ok() && after != before {
            let changed: Vec<_> = after
                .iter()
                .filter(|(p, h)| before.get(*p) != Some(h))
                .map(|(p, _)| p.display().to_string())
                .chain(
                    before
                        .keys()
                        .filter(|p| !after.contains_key(*p))
                        .map(|p| p.display().to_string()),
                )
                .collect();
            result = Err(format!("changed pre-existing files: {changed:?}"));
        }
        match result {
            Ok(()) if out.status.success() => ok += 1,
            Ok(()) => refused += 1,
            Err(e) => failures.push(format!(
                "case {n}: transformer {}\n  {e}",
                case.args.join(" ")
            )),
        }
        let _ = std::fs::remove_dir_all(ws.path().join(&case.out));
    }
    eprintln!(
        "{CASES} cases ({per_command:?}): {ok} succeeded, {refused} refused with a named error"
    );
    assert!(
        failures.is_empty(),
        "{} of {CASES} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The fuzz must exercise both outcomes to mean anything.
    assert!(
        ok >= 10 && refused >= 100,
        "{ok} succeeded, {refused} refused"
    );
}
