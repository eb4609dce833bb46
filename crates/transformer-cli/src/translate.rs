//! `transformer translate --checkpoint DIR [--beam K --alpha A --batch-size N
//! --max-len-mode truncate|fail --attention-out DIR]`: source sentences on stdin, one per line;
//! one translation per line on stdout, in the same order.
//!
//! Bad input never misaligns the output or stops the other lines: an empty line translates to
//! an empty line; a line longer than the model's positions is truncated with a warning (or,
//! with `--max-len-mode fail`, reported and left empty); a line that is not UTF-8 is reported
//! with its number and left empty. Any reported line makes the command exit non-zero at the
//! end, after every other line was written.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use transformer::data::split_lines;
use transformer::decode::{translate_batch, Hypothesis, Seq2SeqDecodeOptions};

use crate::checkpoint::{load_translator, LoadedTranslator};

#[derive(Args)]
pub struct TranslateArgs {
    /// A checkpoint directory, or a run directory (its best/ checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    decode: DecodeArgs,
    /// What to do with a line longer than the model's positions (model.max_len tokens).
    #[arg(long, value_enum, default_value_t = MaxLenMode::Truncate)]
    max_len_mode: MaxLenMode,
    /// Write each sentence's cross-attention here: `line-NNNNNN.json` (weights per layer and
    /// head, and their mean) and `line-NNNNNN.svg` (the mean as a labelled heatmap).
    #[arg(long, value_name = "DIR")]
    attention_out: Option<PathBuf>,
    /// Replace --attention-out even when it holds something other than a previous
    /// `translate --attention-out`.
    #[arg(long, requires = "attention_out")]
    force: bool,
}

/// Decoding flags shared by `translate` and `eval`.
#[derive(Args, Clone)]
pub struct DecodeArgs {
    // `allow_hyphen_values`: without it clap reads `--beam -1` as a stray flag and its
    // error does not name --beam; with it the value reaches parsing, whose error does.
    /// Beam size; 1 decodes greedily.
    #[arg(long, default_value_t = 4, allow_hyphen_values = true)]
    pub beam: usize,
    /// Length penalty exponent α of ((5 + |Y|) / 6)^α (0: none).
    #[arg(long, default_value_t = 0.6, allow_hyphen_values = true)]
    pub alpha: f64,
    /// Sentences decoded together (sorted by length, so that little is padding).
    #[arg(long, default_value_t = 32, allow_hyphen_values = true)]
    pub batch_size: usize,
}

impl DecodeArgs {
    /// The decoding options (the paper's length limit: source length + 50).
    pub fn options(&self, need_attention: bool) -> Result<Seq2SeqDecodeOptions> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let opts = Seq2SeqDecodeOptions {
            beam_size: self.beam,
            alpha: self.alpha,
            need_attention,
            ..Default::default()
        };
        transformer::validate::non_negative("--alpha", self.alpha)?;
        opts.validate().context("--beam / --alpha")?;
        Ok(opts)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MaxLenMode {
    /// Translate the first max_len tokens and warn on stderr.
    Truncate,
    /// Report the line, leave its output empty and exit non-zero at the end.
    Fail,
}

/// Translate `sources` in batches of `batch_size` sentences of similar length; the hypotheses
/// come back in the order of `sources`.
pub fn translate_ids(
    t: &LoadedTranslator,
    sources: &[Vec<u32>],
    opts: &Seq2SeqDecodeOptions,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Hypothesis>> {
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| (sources[i].len(), i));
    let mut out: Vec<Option<Hypothesis>> = vec![None; sources.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| sources[i].clone()).collect();
        let hyps = translate_batch(t.model.as_ref(), &batch, t.ids, opts, device)?;
        for (&i, h) in chunk.iter().zip(hyps) {
            out[i] = Some(h);
        }
    }
    out.into_iter()
        .map(|h| h.context("a sentence was not translated"))
        .collect()
}

/// The text of a hypothesis on one line (a generated line break would misalign the output).
pub fn hypothesis_text(t: &LoadedTranslator, h: &Hypothesis) -> Result<String> {
    let text = t.tgt_tokenizer.decode(&h.tokens)?;
    Ok(text.replace(['\n', '\r'], " "))
}

/// Encode a source line, truncated to the model's positions with a warning naming `what`;
/// `None` (after an error message) when it is too long and `fail` is set.
pub fn encode_source(
    t: &LoadedTranslator,
    text: &str,
    what: &str,
    fail: bool,
) -> Result<Option<Vec<u32>>> {
    let mut ids = t.src_tokenizer.encode(text)?;
    let limit = t.model.max_len();
    if ids.len() > limit {
        if fail {
            eprintln!(
                "error: {what}: {} tokens, more than the model's limit of {limit} \
                 (--max-len-mode fail); its output line is left empty",
                ids.len()
            );
            return Ok(None);
        }
        eprintln!(
            "warning: {what}: {} tokens, more than the model's limit of {limit}; translating \
             only the first {limit}",
            ids.len()
        );
        ids.truncate(limit);
    }
    Ok(Some(ids))
}

pub fn run(args: TranslateArgs) -> Result<()> {
    let opts = args.decode.options(args.attention_out.is_some())?;
    let device = crate::device()?;
    let t = load_translator(&args.checkpoint, &device)?;
    // The attention files are built beside --attention-out and swapped in at the end.
    let staged = match &args.attention_out {
        Some(dir) => {
            crate::output::check_not_input(
                "--attention-out",
                dir,
                &[("--checkpoint", t.dir.as_path())],
            )?;
            Some(crate::output::StagedDir::begin(
                "--attention-out",
                dir,
                "translate --attention-out",
                args.force,
            )?)
        }
        None => None,
    };
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let lines = split_lines(&input);
    let t0 = Instant::now();

    let mut outputs = vec![String::new(); lines.len()];
    let mut failed = 0usize;
    // (index into `lines`, source ids) of the lines to translate.
    let mut todo: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let what = format!("line {}", line.number);
        match &line.text {
            Err(e) => {
                // `e` counts bytes from 1, as `embed` does.
                eprintln!("error: {what}: {e}; its output line is left empty");
                failed += 1;
            }
            Ok(text) if text.trim().is_empty() => {}
            Ok(text) => {
                let fail = args.max_len_mode == MaxLenMode::Fail;
                match encode_source(&t, text, &what, fail) {
                    Ok(Some(ids)) => todo.push((i, ids)),
                    Ok(None) => failed += 1,
                    Err(e) => {
                        eprintln!("error: {what}: {e:#}; its output line is left empty");
                        failed += 1;
                    }
                }
            }
        }
    }
    let sources: Vec<Vec<u32>> = todo.iter().map(|(_, ids)| ids.clone()).collect();
    let hyps = translate_ids(&t, &sources, &opts, args.decode.batch_size, &device)?;
    for ((i, src), h) in todo.iter().zip(&hyps) {
        outputs[*i] = hypothesis_text(&t, h)?;
        if let Some(staged) = &staged {
            write_attention(staged.path(), lines[*i].number, &t, src, h)?;
        }
    }
    if let Some(staged) = staged {
        staged.commit()?;
    }

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for o in &outputs {
        writeln!(out, "{o}")?;
    }
    out.flush()?;
    eprintln!(
        "translated {} of {} lines in {:.1} s (beam {}, alpha {})",
        todo.len(),
        lines.len(),
        t0.elapsed().as_secs_f64(),
        opts.beam_size,
        opts.alpha
    );
    if failed > 0 {
        bail!(
            "{failed} of {} input lines could not be translated (see above); their output \
             lines are empty",
            lines.len()
        );
    }
    Ok(())
}

/// How a token is shown on a heatmap axis: its text (byte-level BPE marks a leading space with
/// `Ġ`, shown here as `▁`), or its vocabulary spelling when it is part of a character.
fn token_label(tok: &transformer::data::Tokenizer, id: u32) -> String {
    match tok.decode(&[id]) {
        Ok(s) if !s.is_empty() && !s.contains('\u{FFFD}') => s.replace(' ', "▁"),
        _ => tok.id_to_token(id).unwrap_or_else(|| format!("#{id}")),
    }
}

/// `DIR/line-NNNNNN.json`: the cross-attention of every decoder layer and head (target ×
/// source) and their mean; `DIR/line-NNNNNN.svg`: the mean as a heatmap.
fn write_attention(
    dir: &Path,
    number: usize,
    t: &LoadedTranslator,
    src: &[u32],
    h: &Hypothesis,
) -> Result<()> {
    let layers = h
        .cross_attention
        .as_ref()
        .context("the decoder returned no attention weights")?; // per layer (H, T, S)
    let per_layer: Vec<Vec<Vec<Vec<f32>>>> = layers
        .iter()
        .map(|l| l.to_vec3::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let mean: Vec<Vec<f32>> = if layers.is_empty() {
        Vec::new()
    } else {
        // (L, H, T, S) -> (T, S)
        Tensor::stack(layers, 0)?
            .mean(0)?
            .mean(0)?
            .to_vec2::<f32>()?
    };
    let src_labels: Vec<String> = src
        .iter()
        .map(|&i| token_label(&t.src_tokenizer, i))
        .collect();
    let mut tgt_labels: Vec<String> = h
        .tokens
        .iter()
        .map(|&i| token_label(&t.tgt_tokenizer, i))
        .collect();
    if h.reached_eos {
        tgt_labels.push("<eos>".into());
    }
    let json = serde_json::json!({
        "line": number,
        "source_tokens": src_labels,
        "target_tokens": tgt_labels,
        "translation": hypothesis_text(t, h)?,
        "layout": "layers[layer][head][target][source]; mean[target][source] over layers and heads",
        "layers": per_layer,
        "mean": mean,
    });
    let path = dir.join(format!("line-{number:06}.json"));
    std::fs::write(&path, serde_json::to_string(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let svg = dir.join(format!("line-{number:06}.svg"));
    crate::plot::attention_heatmap(
        &mean,
        &tgt_labels,
        &src_labels,
        &format!("line {number}: cross-attention, mean over layers and heads (target × source)"),
        &svg,
    )
    .with_context(|| format!("writing {}", svg.display()))
}
