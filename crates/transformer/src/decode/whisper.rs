//! Whisper's decoding rules (openai-whisper's `decoding.py` and `transcribe.py`), over any
//! [`Seq2Seq`] model that encodes log-mel frames.
//!
//! - The prompt: `<|startofprev|>` + previous text (long-form conditioning), then
//!   `<|startoftranscript|>`, the language and task for multilingual models, and
//!   `<|notimestamps|>` when timestamps are off.
//! - Logit filters at every step, in openai-whisper's order: blank and end-of-text suppressed
//!   at the first sampled position (`suppress_begin`), the suppressed tokens (`suppress`:
//!   non-speech symbols and the task tokens), then the timestamp rules: timestamps come in
//!   pairs, never decrease, the first token is a timestamp no later than
//!   `max_initial_timestamp`, and when the timestamps together are likelier than any text
//!   token a timestamp is taken.
//! - Greedy decoding, or beam search with openai-whisper's candidate bookkeeping and its
//!   ranking by summed log-probability over length.
//! - Timestamp tokens cut a window's tokens into segments; long-form audio runs in 30 s
//!   windows that advance to the last complete segment's end, as `transcribe()` does.
//!
//! Dimension letters: `N` beams, `V` vocabulary, `S` encoder positions, `E` d_model.

use candle_core::{Device, Tensor};

use crate::data::audio::{Features, MelConfig};
use crate::models::{Seq2Seq, Source};
use crate::nn::NeedWeights;
use crate::{Error, Result};

/// Seconds per timestamp step (`<|0.02|>` follows `<|0.00|>`).
pub const TIMESTAMP_STEP: f64 = 0.02;

/// The languages of multilingual Whisper, in token order after `<|startoftranscript|>`.
pub const LANGUAGES: &[&str] = &[
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it",
    "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur",
    "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn",
    "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si",
    "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo",
    "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln",
    "ha", "ba", "jw", "su", "yue",
];

/// The special tokens and suppression lists of a Whisper vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperTokens {
    pub eot: u32,
    pub sot: u32,
    pub sot_prev: Option<u32>,
    pub transcribe: Option<u32>,
    pub translate: Option<u32>,
    /// `<|nospeech|>` (`<|nocaptions|>` in older vocabularies).
    pub no_speech: Option<u32>,
    pub no_timestamps: u32,
    /// `<|0.00|>`; every id from it on is a timestamp.
    pub timestamp_begin: u32,
    /// Language code and token id, for multilingual models (empty for English-only ones).
    pub languages: Vec<(String, u32)>,
    /// Tokens never sampled.
    pub suppress: Vec<u32>,
    /// Tokens not sampled first (the blank and end-of-text).
    pub suppress_begin: Vec<u32>,
}

impl WhisperTokens {
    /// The special tokens from a tokenizer (`tokenizer.json`), for a model of `vocab_size`
    /// (multilingual from 51,865 on, as openai-whisper decides), with the suppression lists of
    /// the model's config (`suppress_ids`/`suppress_tokens` and `*_begin`).
    pub fn from_tokenizer(
        tok: &tokenizers::Tokenizer,
        vocab_size: usize,
        suppress: Vec<u32>,
        suppress_begin: Vec<u32>,
    ) -> Result<Self> {
        let need = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                Error::msg(format!(
                    "the tokenizer has no {t} token (is it a Whisper tokenizer.json?)"
                ))
            })
        };
        let sot = need("<|startoftranscript|>")?;
        let no_timestamps = need("<|notimestamps|>")?;
        let multilingual = vocab_size >= 51865;
        let languages = if multilingual {
            LANGUAGES
                .iter()
                .filter_map(|l| {
                    tok.token_to_id(&format!("<|{l}|>"))
                        .map(|id| (l.to_string(), id))
                })
                .filter(|&(_, id)| (id as usize) < vocab_size)
                .collect()
        } else {
            Vec::new()
        };
        let tokens = WhisperTokens {
            eot: need("<|endoftext|>")?,
            sot,
            sot_prev: tok.token_to_id("<|startofprev|>"),
            transcribe: tok.token_to_id("<|transcribe|>"),
            translate: tok.token_to_id("<|translate|>"),
            no_speech: tok
                .token_to_id("<|nospeech|>")
                .or_else(|| tok.token_to_id("<|nocaptions|>")),
            no_timestamps,
            // Older tokenizer.json files lack the timestamp tokens; they follow
            // <|notimestamps|> in every Whisper vocabulary (openai-whisper counts so).
            timestamp_begin: tok.token_to_id("<|0.00|>").unwrap_or(no_timestamps + 1),
            languages,
            suppress,
            suppress_begin,
        };
        for (what, id) in [
            ("<|endoftext|>", tokens.eot),
            ("<|startoftranscript|>", tokens.sot),
            ("<|0.00|>", tokens.timestamp_begin),
            ("<|notimestamps|>", tokens.no_timestamps),
        ] {
            if id as usize >= vocab_size {
                return Err(Error::msg(format!(
                    "{what} is token {id}, outside the model's vocabulary of {vocab_size}"
                )));
            }
        }
        Ok(tokens)
    }

    pub fn is_multilingual(&self) -> bool {
        !self.languages.is_empty()
    }

    /// The token of language `code` (`en`, `de`, ...).
    pub fn language(&self, code: &str) -> Result<u32> {
        self.languages
            .iter()
            .find(|(l, _)| l == code)
            .map(|&(_, id)| id)
            .ok_or_else(|| {
                if self.languages.is_empty() {
                    Error::invalid(
                        "language",
                        "nothing: this model is English-only",
                        code.to_string(),
                    )
                } else {
                    let known: Vec<&str> = self.languages.iter().map(|(l, _)| l.as_str()).collect();
                    Error::invalid("language", format!("one of {}", known.join(", ")), code)
                }
            })
    }
}

/// Transcribe in the spoken language, or translate into English.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    #[default]
    Transcribe,
    Translate,
}

/// How to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperOptions {
    /// 1: greedy; more: beam search with that many beams.
    pub beam_size: usize,
    /// Finished candidates collected before a beam search stops, as a multiple of the beams.
    pub patience: f64,
    /// Language code for multilingual models; detected when `None`.
    pub language: Option<String>,
    pub task: Task,
    /// Timestamp tokens (segments with times) or `<|notimestamps|>`.
    pub timestamps: bool,
    /// The latest first timestamp, in seconds (openai-whisper: 1.0).
    pub max_initial_timestamp: f64,
    /// Sampled tokens per window at most (openai-whisper: half the decoder's positions).
    pub max_new_tokens: Option<usize>,
    /// Prompt each window with the text of the previous ones (long-form audio).
    pub condition_on_previous_text: bool,
    /// A window is silence, and skipped, when P(no speech) is above this and the average
    /// log-probability below `logprob_threshold`.
    pub no_speech_threshold: f64,
    pub logprob_threshold: f64,
}

impl Default for WhisperOptions {
    fn default() -> Self {
        WhisperOptions {
            beam_size: 1,
            patience: 1.0,
            language: None,
            task: Task::Transcribe,
            timestamps: true,
            max_initial_timestamp: 1.0,
            max_new_tokens: None,
            condition_on_previous_text: true,
            no_speech_threshold: 0.6,
            logprob_threshold: -1.0,
        }
    }
}

/// What decoding one window gives.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowResult {
    /// Sampled tokens, without the prompt and the end-of-text.
    pub tokens: Vec<u32>,
    pub sum_logprob: f64,
    /// `sum_logprob` over the sampled tokens and the end-of-text.
    pub avg_logprob: f64,
    /// P(`<|nospeech|>`) at the `<|startoftranscript|>` position.
    pub no_speech_prob: f64,
    /// The language token used (multilingual models).
    pub language: Option<String>,
}

/// A stretch of the transcript with its times.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    /// Text tokens (timestamps removed).
    pub tokens: Vec<u32>,
    /// The segment's tokens as decoded, timestamps included: what the next windows are
    /// prompted with (openai-whisper's and faster-whisper's `segment["tokens"]`).
    pub decoded: Vec<u32>,
    pub avg_logprob: f64,
    pub no_speech_prob: f64,
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + crate::kernels::sum_exp_f64(logits, max).ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// The logit filters of one window.
struct Filters<'a> {
    tokens: &'a WhisperTokens,
    timestamps: bool,
    max_initial_index: Option<u32>,
}

impl Filters<'_> {
    /// Apply every filter to one row's logits, given the tokens sampled so far in that row,
    /// and return the filtered row's log-probabilities (the timestamp rule needs them, so they
    /// are computed once here rather than again by the caller).
    fn apply(&self, logits: &mut [f32], sampled: &[u32]) -> Vec<f64> {
        let t = self.tokens;
        let v = logits.len();
        let ninf = f32::NEG_INFINITY;
        if sampled.is_empty() {
            for &id in &t.suppress_begin {
                if (id as usize) < v {
                    logits[id as usize] = ninf;
                }
            }
        }
        for &id in &t.suppress {
            if (id as usize) < v {
                logits[id as usize] = ninf;
            }
        }
        if !self.timestamps {
            return log_softmax(logits);
        }
        let tb = t.timestamp_begin as usize;
        logits[t.no_timestamps as usize] = ninf;
        let is_ts = |id: u32| id >= t.timestamp_begin;
        let n = sampled.len();
        let last_was_ts = n >= 1 && is_ts(sampled[n - 1]);
        let penultimate_was_ts = n < 2 || is_ts(sampled[n - 2]);
        if last_was_ts {
            if penultimate_was_ts {
                // After a pair, text must follow.
                logits[tb..].fill(ninf);
            } else {
                // A segment's end timestamp (or the end of text) must follow a start.
                logits[..t.eot as usize].fill(ninf);
            }
        }
        if let Some(&last) = sampled.iter().rev().find(|&&id| is_ts(id)) {
            // Timestamps never decrease, and a segment has nonzero length.
            let last = if last_was_ts && !penultimate_was_ts {
                last
            } else {
                last + 1
            };
            let end = (last as usize).min(v);
            if end > tb {
                logits[tb..end].fill(ninf);
            }
        }
        if n == 0 {
            logits[..tb].fill(ninf);
            if let Some(max_idx) = self.max_initial_index {
                let last_allowed = tb + max_idx as usize;
                if last_allowed + 1 < v {
                    logits[last_allowed + 1..].fill(ninf);
                }
            }
        }
        // When the timestamps together are likelier than any text token, take a timestamp.
        let lp = log_softmax(logits);
        let ts_max = lp[tb..].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ts_lse = if ts_max == f64::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            ts_max
                + lp[tb..]
                    .iter()
                    .map(|&x| (x - ts_max).exp())
                    .sum::<f64>()
                    .ln()
        };
        let text_max = lp[..tb].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if ts_lse > text_max {
            logits[..tb].fill(ninf);
            // The text tokens are gone: the timestamps' log-probabilities, renormalized.
            let mut lp = lp;
            lp[..tb].fill(f64::NEG_INFINITY);
            for x in &mut lp[tb..] {
                *x -= ts_lse;
            }
            return lp;
        }
        lp
    }
}

/// Rows of (B, T, V) logits at position `pos` as vectors.
fn rows_at(logits: &Tensor, pos: usize) -> Result<Vec<Vec<f32>>> {
    Ok(logits
        .narrow(1, pos, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?)
}

/// The encoder's memory for one window of frames.
///
/// # Shapes
/// `frames`: (N_frames · M) frame-major → memory (1, S, E)
pub fn encode_window(
    model: &dyn Seq2Seq,
    frames: &[f32],
    n_mels: usize,
    device: &Device,
) -> Result<Tensor> {
    let n = frames.len() / n_mels;
    let x = Tensor::from_slice(frames, (1, n, n_mels), device)?;
    model.encode(
        Source::Features {
            x: &x,
            padding: None,
        },
        false,
    )
}

/// Detect the spoken language: the likeliest language token after `<|startoftranscript|>`.
pub fn detect_language(
    model: &dyn Seq2Seq,
    memory: &Tensor,
    tokens: &WhisperTokens,
) -> Result<(String, f64)> {
    Ok(language_probs(model, memory, tokens)?.swap_remove(0))
}

/// The probability of every language after `<|startoftranscript|>` (a softmax over the
/// language tokens only, as openai-whisper's `detect_language`), likeliest first. An
/// English-only model gives `[("en", 1.0)]`.
pub fn language_probs(
    model: &dyn Seq2Seq,
    memory: &Tensor,
    tokens: &WhisperTokens,
) -> Result<Vec<(String, f64)>> {
    if tokens.languages.is_empty() {
        return Ok(vec![("en".into(), 1.0)]);
    }
    let mut state = model.start_decoding(memory)?;
    let ids = Tensor::new(&[[tokens.sot]], memory.device())?;
    let (logits, _) = model.decode_step(&ids, memory, None, &mut state, NeedWeights::No)?;
    let row = &rows_at(&logits, 0)?[0];
    let scores: Vec<f64> = tokens
        .languages
        .iter()
        .map(|&(_, id)| row[id as usize] as f64)
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    let mut probs: Vec<(String, f64)> = tokens
        .languages
        .iter()
        .zip(&scores)
        .map(|((code, _), s)| (code.clone(), (s - max).exp() / z))
        .collect();
    // A stable sort keeps the token order on exact ties, as `argmax` does.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(probs)
}

/// The prompt of a window: previous text, then the start-of-transcript sequence. Returns the
/// ids and the position of `<|startoftranscript|>`.
pub fn prompt(
    tokens: &WhisperTokens,
    opts: &WhisperOptions,
    language: Option<&str>,
    previous: &[u32],
    max_target: usize,
) -> Result<(Vec<u32>, usize)> {
    let mut ids = Vec::new();
    if let (Some(prev), false) = (tokens.sot_prev, previous.is_empty()) {
        // openai-whisper keeps the last n_ctx / 2 − 1 tokens of the previous text.
        let keep = (max_target / 2).saturating_sub(1);
        ids.push(prev);
        ids.extend_from_slice(&previous[previous.len().saturating_sub(keep)..]);
    }
    let sot_index = ids.len();
    ids.push(tokens.sot);
    if tokens.is_multilingual() {
        ids.push(tokens.language(language.unwrap_or("en"))?);
        let task = match opts.task {
            Task::Transcribe => tokens.transcribe,
            Task::Translate => tokens.translate,
        };
        ids.push(task.ok_or_else(|| Error::msg("the tokenizer has no task tokens"))?);
    } else if opts.task == Task::Translate {
        return Err(Error::invalid(
            "task",
            "transcribe (this model is English-only)",
            "translate",
        ));
    }
    if !opts.timestamps {
        ids.push(tokens.no_timestamps);
    }
    Ok((ids, sot_index))
}

/// Decode one window against its memory (1, S, E): greedy with one beam, beam search with
/// more.
pub fn decode_window(
    model: &dyn Seq2Seq,
    memory: &Tensor,
    tokens: &WhisperTokens,
    opts: &WhisperOptions,
    language: Option<&str>,
    previous: &[u32],
) -> Result<WindowResult> {
    crate::validate::count_in("beam size", opts.beam_size as u64, 1, 64)?;
    crate::validate::positive("patience", opts.patience)?;
    let max_target = model.max_len();
    let (prompt_ids, sot_index) = prompt(tokens, opts, language, previous, max_target)?;
    let sample_len = opts
        .max_new_tokens
        .unwrap_or(max_target / 2)
        .min(max_target.saturating_sub(prompt_ids.len()));
    let filters = Filters {
        tokens,
        timestamps: opts.timestamps,
        max_initial_index: Some((opts.max_initial_timestamp / TIMESTAMP_STEP).round() as u32),
    };
    let n_beams = opts.beam_size;
    let device = memory.device();
    // Every beam reads the one memory (the cross-attention folds the beams into one batch)
    // and starts from the same prompt: it is decoded once, and its cache copied per beam.
    let mut state = model.start_decoding(memory)?;
    let ids = Tensor::from_vec(prompt_ids.clone(), (1, prompt_ids.len()), device)?;
    let (logits, _) = model.decode_step(&ids, memory, None, &mut state, NeedWeights::No)?;
    if n_beams > 1 {
        let zeros = Tensor::zeros(n_beams, candle_core::DType::U32, device)?;
        for c in state.decoder.self_kv.iter_mut() {
            c.select_rows(&zeros)?;
        }
    }
    let no_speech_prob = match tokens.no_speech {
        Some(ns) => {
            let row = &rows_at(&logits, sot_index)?[0];
            log_softmax(row)[ns as usize].exp()
        }
        None => 0.0,
    };
    let mut last = vec![rows_at(&logits, prompt_ids.len() - 1)?.remove(0); n_beams];
    // Beams: sampled tokens and summed log-probabilities.
    let mut beams: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0); n_beams];
    let max_candidates = ((n_beams as f64 * opts.patience).round() as usize).max(1);
    let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
    for _step in 0..sample_len {
        let mut candidates: Vec<(Vec<u32>, f64, usize)> = Vec::new();
        for (b, (seq, sum)) in beams.iter().enumerate() {
            let mut row = std::mem::take(&mut last[b]);
            let lp = filters.apply(&mut row, seq);
            // The best beam_size + 1 tokens of this beam.
            let mut order: Vec<u32> = (0..lp.len() as u32).collect();
            let k = (n_beams + 1).min(order.len());
            order.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
            order.truncate(k);
            order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
            for tok in order {
                let score = sum + lp[tok as usize];
                if score == f64::NEG_INFINITY {
                    continue;
                }
                let mut s = seq.clone();
                s.push(tok);
                // The same sequence from two identical beams (the first step) counts once.
                if !candidates.iter().any(|(c, _, _)| *c == s) {
                    candidates.push((s, score, b));
                }
            }
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut next: Vec<(Vec<u32>, f64)> = Vec::new();
        let mut sources: Vec<u32> = Vec::new();
        let mut newly_finished: Vec<(Vec<u32>, f64)> = Vec::new();
        for (seq, score, src) in candidates {
            if *seq.last().expect("one token") == tokens.eot {
                newly_finished.push((seq, score));
            } else {
                next.push((seq, score));
                sources.push(src as u32);
                if next.len() == n_beams {
                    break;
                }
            }
        }
        for f in newly_finished {
            if finished.len() >= max_candidates {
                break;
            }
            finished.push(f);
        }
        if finished.len() >= max_candidates || next.is_empty() {
            break;
        }
        // Fewer live beams than rows (every other candidate finished): repeat the last one
        // so the batch keeps its shape.
        while next.len() < n_beams {
            let (s, v) = next.last().expect("non-empty").clone();
            let _ = v;
            next.push((s, f64::NEG_INFINITY));
            sources.push(*sources.last().expect("non-empty"));
        }
        if n_beams > 1 {
            let idx = Tensor::from_vec(sources.clone(), n_beams, device)?;
            for c in state.decoder.self_kv.iter_mut() {
                c.select_rows(&idx)?;
            }
        }
        let step_ids: Vec<u32> = next.iter().map(|(s, _)| *s.last().expect("one")).collect();
        beams = next;
        if state.position >= max_target {
            break;
        }
        let ids = Tensor::from_vec(step_ids, (n_beams, 1), device)?;
        let (logits, _) = model.decode_step(&ids, memory, None, &mut state, NeedWeights::No)?;
        last = rows_at(&logits, 0)?;
    }
    if finished.is_empty() {
        // No beam ended: the live ones, as if they had.
        let mut live = beams.clone();
        live.sort_by(|a, b| b.1.total_cmp(&a.1));
        finished.extend(live.into_iter().take(n_beams));
    }
    // Rank by log-probability over length (openai-whisper's default, no length penalty).
    let text_len = |s: &[u32]| s.iter().take_while(|&&t| t != tokens.eot).count();
    let best = finished
        .iter()
        .max_by(|a, b| {
            let sa = a.1 / text_len(&a.0).max(1) as f64;
            let sb = b.1 / text_len(&b.0).max(1) as f64;
            sa.total_cmp(&sb)
        })
        .expect("at least one candidate");
    let n_text = text_len(&best.0);
    let result_tokens = best.0[..n_text].to_vec();
    Ok(WindowResult {
        avg_logprob: best.1 / (n_text + 1) as f64,
        sum_logprob: best.1,
        tokens: result_tokens,
        no_speech_prob,
        language: language.map(str::to_string),
    })
}

/// Cut a window's tokens into segments at its timestamp tokens (openai-whisper's
/// `transcribe`), with times offset by `time_offset` seconds. Returns the segments and how
/// many frames the window consumed (where the next window starts).
pub fn segments(
    result: &WindowResult,
    tokens: &WhisperTokens,
    time_offset: f64,
    segment_frames: usize,
    frames_per_second: f64,
) -> (Vec<Segment>, usize) {
    let t = &result.tokens;
    let tb = tokens.timestamp_begin;
    let is_ts: Vec<bool> = t.iter().map(|&id| id >= tb).collect();
    let time = |id: u32| time_offset + id.saturating_sub(tb) as f64 * TIMESTAMP_STEP;
    let seg = |start: f64, end: f64, toks: &[u32]| Segment {
        start,
        end,
        tokens: toks.iter().copied().filter(|&id| id < tokens.eot).collect(),
        decoded: toks.to_vec(),
        avg_logprob: result.avg_logprob,
        no_speech_prob: result.no_speech_prob,
    };
    let n = t.len();
    let single_ending = n >= 2 && !is_ts[n - 2] && is_ts[n - 1] || (n == 1 && is_ts[0]);
    let consecutive: Vec<usize> = (1..n).filter(|&i| is_ts[i - 1] && is_ts[i]).collect();
    let window_secs = segment_frames as f64 / frames_per_second;
    if !consecutive.is_empty() {
        let mut slices = consecutive;
        if single_ending {
            slices.push(n);
        }
        let mut out = Vec::new();
        let mut last = 0;
        for &cur in &slices {
            let s = &t[last..cur];
            out.push(seg(time(s[0]), time(*s.last().expect("non-empty")), s));
            last = cur;
        }
        let advance = if single_ending {
            segment_frames
        } else {
            // To the last complete segment's end: 2 frames (10 ms each) per timestamp step.
            let ts = t[last - 1].saturating_sub(tb);
            ((ts as f64 * TIMESTAMP_STEP * frames_per_second).round() as usize).min(segment_frames)
        };
        (out, advance.max(1))
    } else {
        let mut duration = window_secs;
        if let Some(&last_ts) = t.iter().rev().find(|&&id| id >= tb) {
            if last_ts != tb {
                duration = (last_ts - tb) as f64 * TIMESTAMP_STEP;
            }
        }
        let out = if t.iter().any(|&id| id < tokens.eot) {
            vec![seg(time_offset, time_offset + duration, t)]
        } else {
            Vec::new()
        };
        (out, segment_frames)
    }
}

/// A whole recording's transcript.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub segments: Vec<Segment>,
    /// The language decoded (multilingual models), detected or given.
    pub language: Option<String>,
}

/// The margin between the two likeliest languages under which detection re-encodes a short
/// clip with faster-whisper's extra frame (see [`transcribe`]).
const NEAR_TIE: f64 = 0.2;

/// Transcribe the features of a whole recording ([`LogMel::long_form`]: the audio and
/// `chunk_length` seconds of padding) in windows, as openai-whisper's `transcribe()` does
/// at temperature 0. `progress(frames_done, frames_total)` is called after each window.
///
/// [`LogMel::long_form`]: crate::data::audio::LogMel::long_form
pub fn transcribe(
    model: &dyn Seq2Seq,
    features: &Features,
    mel: &MelConfig,
    tokens: &WhisperTokens,
    opts: &WhisperOptions,
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Transcript> {
    let window = mel.n_frames();
    let content = features.n_frames.saturating_sub(window);
    let fps = mel.sampling_rate as f64 / mel.hop_length as f64;
    let mut seek = 0;
    let mut all_tokens: Vec<u32> = Vec::new();
    let mut prompt_reset_since = 0;
    let mut done: Vec<Segment> = Vec::new();
    let mut language = opts.language.clone();
    while seek < content {
        let segment_frames = window.min(content - seek);
        // The window holds this stretch of audio and zeros after it, as openai-whisper's
        // `transcribe()` pads (`pad_or_trim` of the stretch's frames).
        let frames = features.window_of(seek, segment_frames, window);
        let memory = encode_window(model, &frames, features.n_mels, device)?;
        if tokens.is_multilingual() && language.is_none() {
            // faster-whisper detects the language on the first 30 s of its features, which
            // hold one frame more than the content it decodes (the frame centred on the last
            // sample). One frame of 3,000 moves the probabilities by little, so the decoding
            // window decides unless its two likeliest languages are close (silence: en 0.33,
            // cy 0.31); then a clip shorter than a window is encoded once more with that
            // frame, as there, and that decides.
            let take = (content + 1).min(window);
            let probs = language_probs(model, &memory, tokens)?;
            let near_tie = probs.len() > 1 && probs[0].1 - probs[1].1 < NEAR_TIE;
            let detected = if seek == 0 && take != segment_frames && near_tie {
                let frames = features.window_of(0, take, window);
                let m = encode_window(model, &frames, features.n_mels, device)?;
                detect_language(model, &m, tokens)?
            } else {
                probs.into_iter().next().expect("at least one language")
            };
            language = Some(detected.0);
        }
        let previous = if opts.condition_on_previous_text {
            &all_tokens[prompt_reset_since..]
        } else {
            &[][..]
        };
        let result = decode_window(model, &memory, tokens, opts, language.as_deref(), previous)?;
        let time_offset = seek as f64 / fps;
        if result.no_speech_prob > opts.no_speech_threshold
            && result.avg_logprob < opts.logprob_threshold
        {
            seek += segment_frames;
            progress(seek.min(content), content);
            continue;
        }
        let (segs, advance) = segments(&result, tokens, time_offset, segment_frames, fps);
        // The next prompt holds the decoded tokens with their timestamps; an instantaneous
        // segment or one without text adds nothing (openai-whisper clears such a segment's
        // tokens, faster-whisper skips it).
        for s in &segs {
            if s.start != s.end && !s.tokens.is_empty() {
                all_tokens.extend_from_slice(&s.decoded);
            }
        }
        // A timestamp past the end of the audio (the last window decoded "<|7.00|>" over
        // 3.5 s of speech) is kept by openai-whisper and faster-whisper; a subtitle must not
        // outlast its file, so the times are clipped to the audio here (the text is theirs).
        let end_secs = content as f64 / fps;
        done.extend(segs.into_iter().map(|mut s| {
            s.end = s.end.min(end_secs);
            s.start = s.start.min(s.end);
            s
        }));
        if !opts.condition_on_previous_text {
            prompt_reset_since = all_tokens.len();
        }
        seek += advance;
        progress(seek.min(content), content);
    }
    Ok(Transcript {
        segments: done,
        language: if tokens.is_multilingual() {
            language
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks() -> WhisperTokens {
        WhisperTokens {
            eot: 10,
            sot: 11,
            sot_prev: Some(12),
            transcribe: None,
            translate: None,
            no_speech: Some(13),
            no_timestamps: 14,
            timestamp_begin: 15,
            languages: Vec::new(),
            suppress: vec![3],
            suppress_begin: vec![4, 10],
        }
    }

    fn allowed(f: &Filters, sampled: &[u32], v: usize) -> Vec<usize> {
        let mut logits = vec![0f32; v];
        f.apply(&mut logits, sampled);
        (0..v).filter(|&i| logits[i] > f32::NEG_INFINITY).collect()
    }

    #[test]
    fn timestamp_rules_as_openai_whisper_states_them() {
        let t = toks();
        let f = Filters {
            tokens: &t,
            timestamps: true,
            max_initial_index: Some(2),
        };
        // First: a timestamp no later than <|0.04|> (index 2).
        assert_eq!(allowed(&f, &[], 40), vec![15, 16, 17]);
        // After the first timestamp (openai-whisper counts the position before it as a
        // timestamp, so this is a pair): text, never a timestamp; not the suppressed 3.
        let mut logits = vec![0f32; 40];
        logits[5] = 10.0;
        f.apply(&mut logits, &[16]);
        let ok: Vec<usize> = (0..40).filter(|&i| logits[i] > f32::NEG_INFINITY).collect();
        assert!(ok.contains(&5) && !ok.contains(&3) && !ok.contains(&14));
        assert!(ok.iter().all(|&i| i < 15), "{ok:?}");
        // After start and text: an end later than the start (nonzero length), text or eot.
        let mut logits = vec![0f32; 40];
        logits[5] = 10.0;
        f.apply(&mut logits, &[16, 5]);
        let ok: Vec<usize> = (0..40).filter(|&i| logits[i] > f32::NEG_INFINITY).collect();
        assert!(ok.contains(&5) && ok.contains(&10) && ok.contains(&17));
        assert!(!ok.contains(&15) && !ok.contains(&16), "{ok:?}");
        // After text then an end timestamp: the next is a timestamp or eot, never text.
        let ok = allowed(&f, &[16, 5, 20], 40);
        assert!(ok.iter().all(|&i| i == 10 || i >= 20), "{ok:?}");
        // After a pair: text only (timestamps suppressed).
        let mut logits = vec![0f32; 40];
        logits[5] = 10.0;
        f.apply(&mut logits, &[16, 5, 20, 20]);
        assert!((15..40).all(|i| logits[i] == f32::NEG_INFINITY));
        // Without timestamps: only the suppression lists.
        let g = Filters {
            tokens: &t,
            timestamps: false,
            max_initial_index: None,
        };
        let ok = allowed(&g, &[], 20);
        assert!(!ok.contains(&4) && !ok.contains(&10) && !ok.contains(&3) && ok.contains(&5));
        assert!(allowed(&g, &[5], 20).contains(&10));
    }

    #[test]
    fn filters_return_the_log_probabilities_of_the_filtered_row() {
        let t = toks();
        for timestamps in [true, false] {
            let f = Filters {
                tokens: &t,
                timestamps,
                max_initial_index: None,
            };
            // Timestamps likelier than any text token in all (the rule fires), and not.
            for (sampled, bias) in [(vec![5u32], 3.0f32), (vec![5], -3.0), (vec![], 0.5)] {
                let mut logits: Vec<f32> = (0..40)
                    .map(|i| ((i * 7) % 11) as f32 * 0.3 + if i >= 15 { bias } else { 0.0 })
                    .collect();
                let lp = f.apply(&mut logits, &sampled);
                let want = log_softmax(&logits);
                for (i, (a, b)) in lp.iter().zip(&want).enumerate() {
                    let same = (a == b) || (a - b).abs() < 1e-12;
                    assert!(
                        same,
                        "token {i} ({timestamps}, {sampled:?}, {bias}): {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn segments_split_at_consecutive_timestamps_and_seek_to_the_last_end() {
        let t = toks();
        let r = |tokens: Vec<u32>| WindowResult {
            tokens,
            sum_logprob: 0.0,
            avg_logprob: 0.0,
            no_speech_prob: 0.0,
            language: None,
        };
        // <|0.00|> a b <|1.00|> <|1.00|> c <|2.00|> d: one complete segment, then an
        // unfinished one: seek to its start, 1.00 s.
        let (segs, advance) =
            segments(&r(vec![15, 1, 2, 65, 65, 5, 115, 6]), &t, 30.0, 3000, 100.0);
        assert_eq!(segs.len(), 1);
        assert_eq!(
            (segs[0].start, segs[0].end, segs[0].tokens.clone()),
            (30.0, 31.0, vec![1, 2])
        );
        // The next window's prompt takes the segment with its timestamps.
        assert_eq!(segs[0].decoded, vec![15, 1, 2, 65]);
        assert_eq!(advance, 100);
        // Ending in a single timestamp: the whole window is done.
        let (segs, advance) = segments(&r(vec![15, 1, 65, 65, 2, 115]), &t, 0.0, 3000, 100.0);
        assert_eq!((segs.len(), advance), (2, 3000));
        // No pair: one segment to the last timestamp.
        let (segs, advance) = segments(&r(vec![15, 1, 2, 90]), &t, 0.0, 1200, 100.0);
        assert_eq!((segs.len(), advance), (1, 1200));
        assert!((segs[0].end - 1.5).abs() < 1e-9);
        // No tokens at all: nothing.
        assert!(segments(&r(vec![]), &t, 0.0, 1200, 100.0).0.is_empty());
    }
}
