//! The training pipeline learns (issue 3, item 7, in miniature): a tiny decoder-only model
//! trained for a few dozen steps on a slice of Tiny Shakespeare must predict the held-out end of
//! that slice well below the slice's unigram entropy — the loss of the best model that ignores
//! context. A model stuck at the unigram plateau (broken attention, masks, optimizer or data
//! windows) fails.
//!
//! The data comes from the shared mirror beside the repository (`<repo>/../shared/data`, as on
//! CI). Its absence is a failure, not a skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use transformer::data::{read_text, LmDataset};
use transformer::models::DecoderOnly;
use transformer::train::eval::evaluate_lm;
use transformer::train::run::prepare_run;
use transformer::train::{RunConfig, Silent};

/// Characters of the slice: 27,000 train and 3,000 validation.
const SLICE_CHARS: usize = 30_000;
/// The validation loss must be below this fraction of the unigram entropy.
const MAX_FRACTION: f64 = 0.85;

fn tinyshakespeare() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/tinyshakespeare/input.txt");
    assert!(
        path.is_file(),
        "{} is missing: this test needs the shared data mirror <repo>/../shared/data beside the \
         repository (or copy it there with `transformer data fetch tinyshakespeare` and move \
         data/tinyshakespeare into it)",
        path.display()
    );
    path
}

/// Entropy in nats of the character frequencies of `text`.
fn unigram_entropy(text: &str) -> f64 {
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    for ch in text.chars() {
        *counts.entry(ch).or_default() += 1;
    }
    let n = text.chars().count() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

#[test]
fn tiny_model_beats_the_unigram_entropy_of_its_slice() -> transformer::Result<()> {
    let text = read_text(tinyshakespeare())?;
    let slice: String = text.chars().take(SLICE_CHARS).collect();
    let entropy = unigram_entropy(&slice);
    let dir = tempfile::tempdir().map_err(|e| transformer::Error::io("tempdir", e))?;
    let corpus = dir.path().join("slice.txt");
    std::fs::write(&corpus, &slice).map_err(|e| transformer::Error::io(&corpus, e))?;

    // The `tiny` preset (2 layers, 32 wide) with an untied output layer, which leaves the
    // unigram plateau much sooner than a tied one at this size; 80 steps of 32 windows of 16.
    let steps = 80;
    let toml = format!(
        r#"
[model]
family = "decoder_only"
preset = "tiny"
block_size = 16
dropout = 0.0
tie_embeddings = false

[data]
kind = "text"
path = {corpus:?}
train_fraction = 0.9

[train]
seed = 1337
batch_size = 32
max_steps = {steps}
eval_every = {steps}
eval_iters = 10
log_every = 10

[optimizer]
beta2 = 0.99
weight_decay = 0.1

[schedule]
kind = "warmup_cosine"
lr = 1e-2
warmup_steps = 5
decay_steps = {steps}
min_lr = 1e-3
"#,
        corpus = corpus.display().to_string()
    );
    let cfg = RunConfig::from_toml(&toml, &[], "lm_learns config")?;
    let out = dir.path().join("run");
    let device = Device::Cpu;
    let mut prepared = prepare_run(&cfg, &out, false, &device)?;
    let summary = prepared.trainer.run(prepared.task.as_mut(), &mut Silent)?;
    assert_eq!(summary.steps, steps);

    // The exact loss (every validation window, in order) of the checkpoint training wrote.
    let (model, _) = DecoderOnly::load(&out.join("checkpoint"), &device)?;
    let tokenizer = prepared
        .tokenizer
        .as_ref()
        .ok_or_else(|| transformer::Error::msg("a text run has a tokenizer"))?;
    let tokens = tokenizer.encode(&slice)?;
    let data = LmDataset::from_tokens(tokens, 0.9)?;
    let val = evaluate_lm(&model, data.val(), 32, &device)?;
    eprintln!(
        "unigram entropy of the slice {entropy:.4} nats; first train loss {:.4}; validation \
         loss after {steps} steps {:.4} ({:.3} of the entropy)",
        summary.losses[0],
        val.loss,
        val.loss / entropy
    );
    assert!(
        val.loss < MAX_FRACTION * entropy,
        "validation loss {:.4} is not below {MAX_FRACTION} x the unigram entropy {entropy:.4} \
         = {:.4}: the model did not learn beyond character frequencies",
        val.loss,
        MAX_FRACTION * entropy
    );
    Ok(())
}
