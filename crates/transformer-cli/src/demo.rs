//! `transformer demo`: train a small encoder-decoder to reverse random symbol sequences, show
//! some predictions and the accuracy, and draw its cross-attention (an anti-diagonal when the
//! model has learned to reverse).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, IndexOp};
use clap::Args;
use transformer::data::Seq2SeqIds;
use transformer::decode::{translate_batch, Seq2SeqDecodeOptions, SpecialTokens};
use transformer::models::EncoderDecoder;
use transformer::rng::Rng;
use transformer::train::run::{prepare_run, REVERSE_ALPHABET};
use transformer::train::tasks::reverse_pair;
use transformer::train::RunConfig;

use crate::output::StagedDir;
use crate::progress::CliObserver;

/// The demo's configuration, built into the binary so that it runs with no files at all.
const DEMO_CONFIG: &str = include_str!("../../../configs/demo-reverse.toml");

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo's run goes. A previous demo there is replaced; anything else (a training
    /// run, other files) only with --force.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Replace --out even when it holds something other than a previous demo.
    #[arg(long)]
    force: bool,
    /// Override a field of the built-in config (configs/demo-reverse.toml), e.g.
    /// `--set train.max_steps=300`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Test sequences to score (at least 1).
    #[arg(long, default_value_t = 200, allow_hyphen_values = true)]
    n_test: usize,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let cfg = RunConfig::from_toml(DEMO_CONFIG, &args.overrides, "built-in demo config")?;
    if args.n_test == 0 {
        bail!("--n-test must be at least 1 (the accuracy and the heatmap need a test sequence)");
    }
    let device = crate::device()?;
    // The new demo is built beside --out and swapped in when complete: a bad --set or a
    // failure half-way leaves whatever was there as it was.
    let staged = StagedDir::begin("--out", &args.out, "demo", args.force)?;
    let work = staged.path().to_path_buf();
    let mut prepared = prepare_run(&cfg, &work, false, &device)?;
    println!(
        "demo: an encoder-decoder Transformer ({} parameters) learns to reverse sequences of symbols",
        prepared.n_params
    );
    let t0 = std::time::Instant::now();
    let mut observer = CliObserver::new(cfg.train.max_steps, 0, work.join("loss.svg"));
    prepared
        .trainer
        .run(prepared.task.as_mut(), &mut observer)?;
    observer.finish();
    crate::plot::loss_curves(prepared.trainer.records(), &work.join("loss.svg"))?;
    println!("trained in {:.1} s", t0.elapsed().as_secs_f64());

    // best/ unless train.keep_best = false turned it off.
    let best = match work.join("best") {
        b if b.is_dir() => b,
        _ => work.join("checkpoint"),
    };
    let (model, _) = EncoderDecoder::load(&best, &device)?;
    let Some(tok) = prepared.tokenizer.as_ref() else {
        bail!("the demo's run has no tokenizer");
    };
    let ids = Seq2SeqIds::from_tokenizer(tok)?;
    let symbols: Vec<u32> = REVERSE_ALPHABET
        .chars()
        .take(tok.vocab_size() - 3)
        .map(|c| {
            tok.token_to_id(&c.to_string())
                .expect("alphabet in vocabulary")
        })
        .collect();
    let (min_len, max_len) = match cfg.data {
        transformer::train::DataConfig::Reverse {
            min_len, max_len, ..
        } => (min_len, max_len),
        _ => anyhow::bail!("the demo config must use data.kind = \"reverse\""),
    };
    // Fresh sequences the model has not seen (a seed of their own).
    let mut rng = Rng::new(0xDE_30);
    let pairs: Vec<_> = (0..args.n_test)
        .map(|_| reverse_pair(&symbols, min_len, max_len, &mut rng))
        .collect();
    let sources: Vec<Vec<u32>> = pairs.iter().map(|(s, _)| s.clone()).collect();
    let opts = Seq2SeqDecodeOptions {
        beam_size: 1,
        need_attention: true,
        ..Default::default()
    };
    let special = SpecialTokens {
        pad: ids.pad,
        bos: ids.bos,
        eos: ids.eos,
    };
    let hyps = translate_batch(&model, &sources, special, &opts, &device)?;
    let (mut exact, mut tok_ok, mut tok_n) = (0, 0, 0);
    for ((_, tgt), h) in pairs.iter().zip(&hyps) {
        exact += usize::from(&h.tokens == tgt);
        tok_ok += tgt.iter().zip(&h.tokens).filter(|(a, b)| a == b).count();
        tok_n += tgt.len();
    }
    let show = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    println!("\n{:<14} predicted", "input");
    for ((src, tgt), h) in pairs.iter().zip(&hyps).take(6) {
        let mark = if &h.tokens == tgt { "ok" } else { "wrong" };
        println!("{:<14} {:<14} {mark}", show(src), show(&h.tokens));
    }
    println!(
        "\nsequence accuracy {:.1}% ({exact}/{}), token accuracy {:.1}% on unseen sequences",
        100.0 * exact as f64 / pairs.len() as f64,
        pairs.len(),
        100.0 * tok_ok as f64 / tok_n.max(1) as f64
    );

    // Heatmap: the last decoder layer's cross-attention, averaged over heads, for the first
    // test sequence (rows: predicted symbols, columns: input symbols).
    let (src, _) = &pairs[0];
    let h = &hyps[0];
    let layers = h
        .cross_attention
        .as_ref()
        .context("decoder returned no attention")?;
    let last = layers.last().context("model has no decoder layers")?; // (H, T, S)
    let avg = last.mean(0)?.to_dtype(DType::F32)?; // (T, S)
    let rows_n = h.tokens.len().min(avg.dims()[0]);
    let weights: Vec<Vec<f32>> = (0..rows_n)
        .map(|i| avg.i(i).and_then(|r| r.to_vec1::<f32>()))
        .collect::<candle_core::Result<_>>()?;
    let label = |ids: &[u32]| -> Vec<String> { ids.iter().map(|&i| show(&[i])).collect() };
    crate::plot::attention_heatmap(
        &weights,
        &label(&h.tokens[..rows_n]),
        &label(src),
        "cross-attention, last decoder layer (rows: output, columns: input)",
        &work.join("attention.svg"),
    )?;
    staged.commit()?;
    let path = args.out.join("attention.svg");
    println!(
        "cross-attention heatmap: {} (reversal shows as the anti-diagonal); loss curve: {}",
        path.display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}
