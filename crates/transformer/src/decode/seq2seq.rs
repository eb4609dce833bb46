//! Translation with the encoder-decoder model: batched greedy decoding and beam search.
//!
//! The source sentences are padded into one batch and encoded once; the decoder then runs one
//! token per step with its self-attention KV cache and the cross-attention keys/values of the
//! memory projected once ([`EncoderDecoder::decode_step`]). Sentences that end leave the batch
//! ([`DecodeState::select_rows`]), so a long sentence does not keep short ones computing.
//!
//! Beam search follows the paper (§6.1: beam size 4, length penalty α = 0.6, maximum output
//! length = input length + 50) with GNMT's length penalty (Wu et al. 2016, eq. 14) and fairseq's
//! bookkeeping: at every step the 2k best expansions of a sentence's beams are ranked; an `eos`
//! among the first k ends a hypothesis, the first k others continue; a sentence is done when it
//! holds k ended hypotheses or reaches its length limit.
//!
//! Scores are sums of natural-log probabilities, accumulated in f64 from the f32 log-softmax.
//! The length limit counts every generated token, `eos` included, so decoding never feeds the
//! decoder more than `max_len` positions.
//!
//! Dimension letters: `B` sentences, `R` decoder rows (hypotheses still decoding: one per
//! sentence for greedy, up to k for beam search), `S` padded source length, `E` d_model,
//! `V` target vocabulary, `H` heads, `T` generated tokens.

use std::cmp::Ordering;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::Seq2SeqIds;
use crate::models::encoder_decoder::DecodeState;
use crate::models::{Seq2Seq, Source};
use crate::nn::{AttnMask, NeedWeights};
use crate::{Error, Result};

/// Token ids with a fixed role in translation. `pad` and `bos` are never generated (unless
/// one of them is also the `eos`), as the model is never trained to output them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Pads source sentences to the batch's longest (a source-vocabulary id).
    pub pad: u32,
    /// Starts every target (a target-vocabulary id).
    pub bos: u32,
    /// Ends a target (a target-vocabulary id).
    pub eos: u32,
}

impl From<Seq2SeqIds> for SpecialTokens {
    fn from(ids: Seq2SeqIds) -> Self {
        SpecialTokens {
            pad: ids.pad,
            bos: ids.bos,
            eos: ids.eos,
        }
    }
}

/// Options of [`translate_batch`], [`greedy_batch`] and [`beam_search_batch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seq2SeqDecodeOptions {
    /// Hypotheses kept per sentence (k); 1 makes [`translate_batch`] decode greedily.
    pub beam_size: usize,
    /// Length-penalty exponent α: hypotheses are ranked by score / ((5 + |Y|) / 6)^α
    /// ([`length_penalty`]); 0 ranks by the plain log-probability.
    pub alpha: f64,
    /// Output length limit a·|x| + b, this is a (per source token).
    pub max_len_a: f64,
    /// Output length limit a·|x| + b, this is b. The limit counts generated tokens, `eos`
    /// included, and is also capped at the model's `max_len`.
    pub max_extra: usize,
    /// Return the cross-attention weights of each returned hypothesis.
    pub need_attention: bool,
}

impl Default for Seq2SeqDecodeOptions {
    /// The paper's settings (§6.1): beam 4, α = 0.6, output length ≤ input length + 50.
    fn default() -> Self {
        Seq2SeqDecodeOptions {
            beam_size: 4,
            alpha: 0.6,
            max_len_a: 1.0,
            max_extra: 50,
            need_attention: false,
        }
    }
}

/// The largest beam [`Seq2SeqDecodeOptions::validate`] accepts (far above the 4-10 of
/// practice).
pub const MAX_BEAM: usize = 1024;

impl Seq2SeqDecodeOptions {
    /// Greedy decoding with the paper's length limit.
    pub fn greedy() -> Self {
        Seq2SeqDecodeOptions {
            beam_size: 1,
            ..Default::default()
        }
    }

    /// Every field in range ([`crate::validate`]).
    pub fn validate(&self) -> Result<()> {
        // The upper bound: candidate lists are sized beam × beam per sentence, so a typo
        // (`--beam 4294967296`) would be an allocation that aborts rather than an error.
        crate::validate::count_in("beam_size", self.beam_size as u64, 1, MAX_BEAM as u64)?;
        crate::validate::non_negative("alpha (length penalty)", self.alpha)?;
        crate::validate::non_negative("max_len_a", self.max_len_a)?;
        Ok(())
    }

    /// Most tokens (`eos` included) generated for a source of `src_len` tokens.
    fn max_output_len(&self, src_len: usize, model_max_len: usize) -> usize {
        let limit = (self.max_len_a * src_len as f64).floor() as usize + self.max_extra;
        limit.min(model_max_len)
    }
}

/// One decoded sentence.
#[derive(Debug, Clone)]
pub struct Hypothesis {
    /// Output tokens, without `bos` and `eos`.
    pub tokens: Vec<u32>,
    /// Sum of the log-probabilities of every generated token (`eos` included when reached).
    pub score: f64,
    /// `score / length_penalty(generated tokens, alpha)`: what hypotheses are ranked by.
    pub normalized_score: f64,
    /// The hypothesis ended with `eos`; false when it stopped at the length limit.
    pub reached_eos: bool,
    /// With `need_attention`: per decoder layer, the cross-attention weights (H, T, S_b), where
    /// row `i` is the attention while predicting generated token `i` (the last row predicts
    /// `eos` when reached) and `S_b` is this sentence's unpadded source length.
    pub cross_attention: Option<Vec<Tensor>>,
}

/// GNMT's length penalty lp(Y) = ((5 + |Y|) / 6)^α (Wu et al. 2016, eq. 14).
pub fn length_penalty(len: usize, alpha: f64) -> f64 {
    ((5.0 + len as f64) / 6.0).powf(alpha)
}

/// Translate a batch of source sentences: greedy when `opts.beam_size == 1`, beam search
/// otherwise. Returns one hypothesis per source, in order. An empty source is decoded against
/// a fully masked memory.
pub fn translate_batch(
    model: &dyn Seq2Seq,
    sources: &[Vec<u32>],
    ids: SpecialTokens,
    opts: &Seq2SeqDecodeOptions,
    device: &Device,
) -> Result<Vec<Hypothesis>> {
    if opts.beam_size == 1 {
        greedy_batch(model, sources, ids, opts, device)
    } else {
        beam_search_batch(model, sources, ids, opts, device)
    }
}

/// Greedy decoding of a batch: the most likely token at every step (the first one on ties).
/// `opts.beam_size` is ignored.
pub fn greedy_batch(
    model: &dyn Seq2Seq,
    sources: &[Vec<u32>],
    ids: SpecialTokens,
    opts: &Seq2SeqDecodeOptions,
    device: &Device,
) -> Result<Vec<Hypothesis>> {
    opts.validate()?;
    let mut batch = Batch::new(model, sources, ids, opts, device)?;
    let mut out: Vec<Option<Hypothesis>> = vec![None; sources.len()];
    // Per row: tokens so far and their summed log-probability.
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch.rows()];
    let mut scores = vec![0f64; batch.rows()];
    let mut last = vec![ids.bos; batch.rows()];
    let mut step = 0;
    while batch.rows() > 0 {
        let logp = batch.step(&last)?; // R rows of V
        step += 1;
        let mut keep = Vec::with_capacity(batch.rows());
        for (r, row) in logp.iter().enumerate() {
            let next = top_n(row, 1)[0];
            scores[r] += row[next as usize] as f64;
            let reached_eos = next == ids.eos;
            if !reached_eos {
                tokens[r].push(next);
            }
            let b = batch.sentence[r];
            if reached_eos || step == batch.limits[b] {
                let toks = std::mem::take(&mut tokens[r]);
                out[b] = Some(batch.hypothesis(r, toks, scores[r], reached_eos)?);
            } else {
                keep.push(r);
            }
        }
        tokens = keep
            .iter()
            .map(|&r| std::mem::take(&mut tokens[r]))
            .collect();
        scores = keep.iter().map(|&r| scores[r]).collect();
        last = tokens.iter().map(|t| t[t.len() - 1]).collect();
        batch.select(&keep)?;
    }
    batch.collect(out)
}

/// Beam search over a batch with `opts.beam_size` hypotheses per sentence, ranked by
/// length-normalized log-probability ([`length_penalty`] with `opts.alpha`). Beam size 1 gives
/// exactly [`greedy_batch`]'s result.
pub fn beam_search_batch(
    model: &dyn Seq2Seq,
    sources: &[Vec<u32>],
    ids: SpecialTokens,
    opts: &Seq2SeqDecodeOptions,
    device: &Device,
) -> Result<Vec<Hypothesis>> {
    opts.validate()?;
    let k = opts.beam_size;
    // The first step has one row per sentence (all beams would be identical); each step then
    // replaces a sentence's rows by its best continuations, up to k of them.
    let mut batch = Batch::new(model, sources, ids, opts, device)?;
    let mut ended: Vec<Vec<Hypothesis>> = vec![Vec::new(); sources.len()];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch.rows()];
    let mut scores = vec![0f64; batch.rows()];
    let mut last = vec![ids.bos; batch.rows()];
    let mut step = 0;
    while batch.rows() > 0 {
        let logp = batch.step(&last)?; // R rows of V
        step += 1;
        let mut parents = Vec::new();
        let mut next_tokens = Vec::new();
        let mut next_scores = Vec::new();
        // A sentence's rows are contiguous: rows are only ever rebuilt sentence by sentence.
        let mut r0 = 0;
        while r0 < batch.rows() {
            let b = batch.sentence[r0];
            let r1 = (r0..batch.rows())
                .find(|&r| batch.sentence[r] != b)
                .unwrap_or(batch.rows());
            let cands = candidates(&logp[r0..r1], &scores[r0..r1], r0, 2 * k);
            let at_limit = step == batch.limits[b];
            let mut cont = Vec::new();
            for (rank, c) in cands.iter().enumerate() {
                if c.token == ids.eos || at_limit {
                    // At the limit the k best candidates all end, with or without eos.
                    if rank < k {
                        let mut toks = tokens[c.row].clone();
                        if c.token != ids.eos {
                            toks.push(c.token);
                        }
                        let reached_eos = c.token == ids.eos;
                        ended[b].push(batch.hypothesis(c.row, toks, c.score, reached_eos)?);
                    }
                } else if cont.len() < k {
                    cont.push(*c);
                }
            }
            let best_ended = ended[b]
                .iter()
                .map(|h| h.normalized_score)
                .fold(f64::NEG_INFINITY, f64::max);
            // With α = 0 a continuation can only lose probability, so once an ended hypothesis
            // beats every beam nothing can overtake it.
            let settled = opts.alpha == 0.0 && cont.first().is_some_and(|c| best_ended >= c.score);
            let done = at_limit || ended[b].len() >= k || cont.is_empty() || settled;
            if !done {
                for c in cont {
                    parents.push(c.row);
                    let mut toks = tokens[c.row].clone();
                    toks.push(c.token);
                    next_tokens.push(toks);
                    next_scores.push(c.score);
                }
            }
            r0 = r1;
        }
        tokens = next_tokens;
        scores = next_scores;
        last = tokens.iter().map(|t| t[t.len() - 1]).collect();
        batch.select(&parents)?;
    }
    let best = ended
        .into_iter()
        .map(|hyps| {
            // The first of the best on ties: the one that ended earliest.
            let mut best: Option<Hypothesis> = None;
            for h in hyps {
                if best
                    .as_ref()
                    .is_none_or(|b| h.normalized_score > b.normalized_score)
                {
                    best = Some(h);
                }
            }
            best
        })
        .collect();
    batch.collect(best)
}

/// One expansion of a beam: `row`'s hypothesis followed by `token`.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f64,
    row: usize,
    token: u32,
}

/// The `n` best expansions of rows `first_row ..` (log-probabilities `logp`, hypothesis scores
/// `scores`), best first; ties go to the lower row, then the lower token, as greedy's argmax.
fn candidates(logp: &[Vec<f32>], scores: &[f64], first_row: usize, n: usize) -> Vec<Candidate> {
    let mut cands = Vec::with_capacity(n * logp.len());
    for (i, (row, &score)) in logp.iter().zip(scores).enumerate() {
        // The overall best n are among each row's best n.
        for token in top_n(row, n) {
            let score = score + row[token as usize] as f64;
            // Blocked tokens (-inf) are never candidates.
            if score > f64::NEG_INFINITY {
                cands.push(Candidate {
                    score,
                    row: first_row + i,
                    token,
                });
            }
        }
    }
    cands.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.row.cmp(&b.row))
            .then(a.token.cmp(&b.token))
    });
    cands.truncate(n);
    cands
}

/// Indices of the `n` largest values of `row`, largest first (the lower index first on ties).
fn top_n(row: &[f32], n: usize) -> Vec<u32> {
    let rank = |a: &u32, b: &u32| -> Ordering {
        row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n, rank);
        idx.truncate(n);
    }
    idx.sort_by(rank);
    idx
}

/// The encoded batch and the decoder rows still running, with everything kept per row: the
/// decoder caches, the memory and its padding mask, and the cross-attention so far.
struct Batch<'a> {
    model: &'a dyn Seq2Seq,
    device: Device,
    /// (B, S, E) encoder output of every sentence.
    memory: Tensor,
    /// Row of `memory` holding each sentence (sentences that generate nothing are not encoded).
    memory_index: Vec<usize>,
    /// Unpadded source length of each sentence.
    src_lens: Vec<usize>,
    /// Most generated tokens of each sentence.
    limits: Vec<usize>,
    /// Sentence of each row.
    sentence: Vec<usize>,
    /// (R, S, E)
    memory_rows: Tensor,
    /// (R, S), `Block` convention: nonzero = padding.
    pad_rows: AttnMask,
    /// `None` when no sentence generates anything (nothing is encoded then).
    state: Option<DecodeState>,
    need_attention: bool,
    /// Per decoder layer (R, H, T, S): the cross-attention of every step so far.
    attention: Vec<Tensor>,
    alpha: f64,
    /// Target ids never generated: `bos` and `pad`, less `eos`.
    blocked: Vec<usize>,
}

impl<'a> Batch<'a> {
    /// Check the inputs, encode every source and start one row per sentence that may
    /// generate at least one token.
    fn new(
        model: &'a dyn Seq2Seq,
        sources: &[Vec<u32>],
        ids: SpecialTokens,
        opts: &Seq2SeqDecodeOptions,
        device: &Device,
    ) -> Result<Self> {
        let (src_vocab_size, tgt_vocab_size) = (model.src_vocab_size(), model.tgt_vocab_size());
        let max_len = model.max_len();
        check_id("pad", ids.pad, "source", src_vocab_size)?;
        check_id("bos", ids.bos, "target", tgt_vocab_size)?;
        check_id("eos", ids.eos, "target", tgt_vocab_size)?;
        for (i, src) in sources.iter().enumerate() {
            if src.len() > max_len {
                return Err(Error::input(
                    format!("source {i}"),
                    format!("at most the model's max_len {max_len} tokens"),
                    format!("{} tokens", src.len()),
                ));
            }
            if let Some((j, t)) = src
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= src_vocab_size)
            {
                return Err(Error::input(
                    format!("source {i}, position {j}: token id {t}"),
                    format!("an id in range for a source vocabulary of {src_vocab_size}"),
                    t.to_string(),
                ));
            }
        }
        let src_lens: Vec<usize> = sources.iter().map(Vec::len).collect();
        // At least one position, so that an empty source still has a (fully masked) memory.
        let s = src_lens.iter().copied().max().unwrap_or(0).max(1);
        let limits: Vec<usize> = src_lens
            .iter()
            .map(|&l| opts.max_output_len(l, max_len))
            .collect();
        let alive: Vec<usize> = (0..sources.len()).filter(|&b| limits[b] > 0).collect();

        let mut padded = Vec::with_capacity(alive.len() * s);
        for &b in &alive {
            padded.extend_from_slice(&sources[b]);
            padded.extend(std::iter::repeat_n(ids.pad, s - sources[b].len()));
        }
        let alive_lens: Vec<usize> = alive.iter().map(|&b| src_lens[b]).collect();
        let pad_rows = AttnMask::from_lengths(&alive_lens, s, device)?; // (R, S)
        let (memory, state) = if alive.is_empty() {
            let empty = Tensor::zeros((0, s, model.d_model()), DType::F32, device)?;
            (empty, None)
        } else {
            let src = Tensor::from_vec(padded, (alive.len(), s), device)?; // (R, S)
            let source = Source::Tokens {
                ids: &src,
                padding: Some(&pad_rows),
            };
            let memory = model.encode(source, false)?; // (R, S, E)
            let state = model.start_decoding(&memory)?;
            (memory, Some(state))
        };
        // Rows index `memory` through their sentence's position among the alive ones.
        let mut memory_index = vec![0; sources.len()];
        for (i, &b) in alive.iter().enumerate() {
            memory_index[b] = i;
        }
        Ok(Batch {
            model,
            device: device.clone(),
            memory_rows: memory.clone(),
            memory,
            memory_index,
            src_lens,
            limits,
            sentence: alive,
            pad_rows,
            state,
            need_attention: opts.need_attention,
            attention: Vec::new(),
            alpha: opts.alpha,
            blocked: [ids.bos, ids.pad]
                .into_iter()
                .filter(|&t| t != ids.eos && (t as usize) < tgt_vocab_size)
                .map(|t| t as usize)
                .collect(),
        })
    }

    fn rows(&self) -> usize {
        self.sentence.len()
    }

    /// Feed each row's last token; returns each row's log-probabilities of the next token, -inf
    /// for the blocked ones.
    fn step(&mut self, last: &[u32]) -> Result<Vec<Vec<f32>>> {
        let r = self.rows();
        let tgt = Tensor::from_vec(last.to_vec(), (r, 1), &self.device)?; // (R, 1)
        let need = if self.need_attention {
            NeedWeights::PerHead
        } else {
            NeedWeights::No
        };
        let state = self
            .state
            .as_mut()
            .ok_or_else(|| Error::msg("seq2seq decoding: a step with no sentence encoded"))?;
        let (logits, cross) =
            self.model
                .decode_step(&tgt, &self.memory_rows, Some(&self.pad_rows), state, need)?;
        if self.need_attention {
            // cross: per layer (R, H, 1, S), appended along T.
            self.attention = if self.attention.is_empty() {
                cross
            } else {
                self.attention
                    .iter()
                    .zip(&cross)
                    .map(|(past, w)| Tensor::cat(&[past, w], 2))
                    .collect::<candle_core::Result<_>>()?
            };
        }
        // (R, 1, V) -> (R, V)
        let logp =
            candle_nn::ops::log_softmax(&logits.squeeze(1)?.to_dtype(DType::F32)?, D::Minus1)?;
        let mut logp = logp.to_vec2::<f32>()?;
        for row in &logp {
            crate::validate::check_finite_logits("seq2seq decoding", row)?;
        }
        for row in logp.iter_mut() {
            for &t in &self.blocked {
                row[t] = f32::NEG_INFINITY;
            }
        }
        Ok(logp)
    }

    /// Keep the rows `parents` (in that order, repeats allowed) for the next step.
    fn select(&mut self, parents: &[usize]) -> Result<()> {
        if parents.iter().copied().eq(0..self.rows()) {
            return Ok(());
        }
        self.sentence = parents.iter().map(|&p| self.sentence[p]).collect();
        if parents.is_empty() {
            return Ok(());
        }
        let idx: Vec<u32> = parents.iter().map(|&p| p as u32).collect();
        let idx = Tensor::from_vec(idx, parents.len(), &self.device)?;
        if let Some(state) = self.state.as_mut() {
            state.select_rows(&idx)?;
        }
        let mem_idx: Vec<u32> = self
            .sentence
            .iter()
            .map(|&b| self.memory_index[b] as u32)
            .collect();
        let mem_idx = Tensor::from_vec(mem_idx, parents.len(), &self.device)?;
        self.memory_rows = self.memory.index_select(&mem_idx, 0)?; // (R, S, E)
        let s = self.memory.dims()[1];
        let lens: Vec<usize> = self.sentence.iter().map(|&b| self.src_lens[b]).collect();
        self.pad_rows = AttnMask::from_lengths(&lens, s, &self.device)?; // (R, S)
        for a in self.attention.iter_mut() {
            *a = a.index_select(&idx, 0)?; // (R, H, T, S)
        }
        Ok(())
    }

    /// The hypothesis of row `r` (before this step's `select`) ending with `tokens`.
    fn hypothesis(
        &self,
        r: usize,
        tokens: Vec<u32>,
        score: f64,
        reached_eos: bool,
    ) -> Result<Hypothesis> {
        let generated = tokens.len() + usize::from(reached_eos);
        let cross_attention = if self.need_attention {
            let s_b = self.src_lens[self.sentence[r]];
            let mut per_layer = Vec::with_capacity(self.attention.len());
            for a in &self.attention {
                // (R, H, T, S) -> (H, T, S_b)
                per_layer.push(a.get(r)?.narrow(2, 0, s_b)?.contiguous()?);
            }
            Some(per_layer)
        } else {
            None
        };
        Ok(Hypothesis {
            tokens,
            score,
            normalized_score: score / length_penalty(generated, self.alpha),
            reached_eos,
            cross_attention,
        })
    }

    /// Fill in the sentences that generated nothing (a length limit of 0).
    fn collect(&self, out: Vec<Option<Hypothesis>>) -> Result<Vec<Hypothesis>> {
        let (n_heads, n_layers) = (self.model.n_heads(), self.model.n_decoder_layers());
        out.into_iter()
            .enumerate()
            .map(|(b, h)| match h {
                Some(h) => Ok(h),
                None => Ok(Hypothesis {
                    tokens: Vec::new(),
                    score: 0.0,
                    normalized_score: 0.0,
                    reached_eos: false,
                    cross_attention: if self.need_attention {
                        let shape = (n_heads, 0, self.src_lens[b]);
                        let empty = Tensor::zeros(shape, DType::F32, &self.device)?;
                        Some(vec![empty; n_layers])
                    } else {
                        None
                    },
                }),
            })
            .collect()
    }
}

fn check_id(name: &str, id: u32, vocab: &str, size: usize) -> Result<()> {
    if id as usize >= size {
        return Err(Error::input(
            format!("{name} id {id}"),
            format!("an id in range for a {vocab} vocabulary of {size}"),
            id.to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{EncoderDecoder, EncoderDecoderConfig};
    use crate::nn::VarStore;
    use crate::rng::Rng;
    use crate::train::{cross_entropy, AdamW, AdamWConfig, CrossEntropyConfig};

    const V: usize = 16;
    const IDS: SpecialTokens = SpecialTokens {
        pad: 0,
        bos: 1,
        eos: 2,
    };
    /// Ordinary tokens are `FIRST..V`.
    const FIRST: u32 = 3;

    fn cpu() -> Device {
        Device::Cpu
    }

    fn config() -> EncoderDecoderConfig {
        EncoderDecoderConfig {
            dropout: 0.0,
            max_len: 64,
            ..EncoderDecoderConfig::tiny(V)
        }
    }

    fn random_model(seed: u64) -> Result<(EncoderDecoder, VarStore)> {
        EncoderDecoder::init(&config(), DType::F32, &cpu(), seed)
    }

    fn random_sentence(rng: &mut Rng, len: usize) -> Vec<u32> {
        (0..len)
            .map(|_| FIRST + rng.below(V as u64 - FIRST as u64) as u32)
            .collect()
    }

    /// Sources of different lengths, an empty one among them.
    fn sources(seed: u64) -> Vec<Vec<u32>> {
        let mut rng = Rng::new(seed);
        [6, 0, 11, 1, 4]
            .iter()
            .map(|&l| random_sentence(&mut rng, l))
            .collect()
    }

    /// A model trained for a few dozen steps to copy its source, so that it is confident and
    /// ends with eos, unlike a random one.
    fn trained_model() -> Result<(EncoderDecoder, VarStore)> {
        let (model, vs) = random_model(7)?;
        let mut opt = AdamW::new(vs.vars(), AdamWConfig::paper())?;
        let ce = CrossEntropyConfig {
            label_smoothing: 0.0,
            ignore_index: Some(IDS.pad),
            ..Default::default()
        };
        let mut rng = Rng::new(11);
        let (b, s) = (16, 6);
        for _ in 0..40 {
            let (mut src, mut tgt_in, mut tgt_out, mut lens) = (vec![], vec![], vec![], vec![]);
            for _ in 0..b {
                let len = 2 + rng.below(s as u64 - 1) as usize;
                let x = random_sentence(&mut rng, len);
                let pad = s - len;
                src.extend(x.iter().copied().chain(std::iter::repeat_n(IDS.pad, pad)));
                tgt_in.push(IDS.bos);
                tgt_in.extend(x.iter().copied().chain(std::iter::repeat_n(IDS.pad, pad)));
                tgt_out.extend(
                    x.iter()
                        .copied()
                        .chain([IDS.eos])
                        .chain(std::iter::repeat_n(IDS.pad, pad)),
                );
                lens.push(len);
            }
            let src = Tensor::from_vec(src, (b, s), &cpu())?; // (B, S)
            let tgt_in = Tensor::from_vec(tgt_in, (b, s + 1), &cpu())?; // (B, T)
            let tgt_out = Tensor::from_vec(tgt_out, (b, s + 1), &cpu())?; // (B, T)
            let src_pad = AttnMask::from_lengths(&lens, s, &cpu())?;
            let logits = model.forward(&src, &tgt_in, Some(&src_pad), None, true)?; // (B, T, V)
            let loss = cross_entropy(&logits, &tgt_out, &ce)?;
            opt.step(&loss.backward()?, 3e-3)?;
        }
        Ok((model, vs))
    }

    fn opts(beam_size: usize, alpha: f64) -> Seq2SeqDecodeOptions {
        Seq2SeqDecodeOptions {
            beam_size,
            alpha,
            need_attention: true,
            ..Default::default()
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        assert_eq!(a.dims(), b.dims());
        if a.elem_count() == 0 {
            return Ok(0.0);
        }
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
    }

    /// Target input (bos + tokens) and output (tokens + eos) of the generated sequence.
    fn teacher_forcing(h: &Hypothesis) -> (Vec<u32>, Vec<u32>) {
        let mut out = h.tokens.clone();
        if h.reached_eos {
            out.push(IDS.eos);
        }
        let mut input = vec![IDS.bos];
        input.extend_from_slice(&h.tokens);
        input.truncate(out.len());
        (input, out)
    }

    /// The model's log-probability of `h` for `src`, from the full (uncached) forward pass, and
    /// the cross-attention of every layer (1, H, T, S) from one multi-token decoding step.
    fn rescore(model: &dyn Seq2Seq, src: &[u32], h: &Hypothesis) -> Result<(f64, Vec<Tensor>)> {
        let (input, out) = teacher_forcing(h);
        if out.is_empty() {
            return Ok((0.0, Vec::new()));
        }
        let s = src.len().max(1);
        let mut padded = src.to_vec();
        padded.resize(s, IDS.pad);
        let src_t = Tensor::from_vec(padded, (1, s), &cpu())?; // (1, S)
        let src_pad = AttnMask::from_lengths(&[src.len()], s, &cpu())?;
        let tgt = Tensor::from_vec(input, (1, out.len()), &cpu())?; // (1, T)
        let logits = model.forward(&src_t, &tgt, Some(&src_pad), None, false)?; // (1, T, V)
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec3::<f32>()?;
        let score = out
            .iter()
            .enumerate()
            .map(|(i, &y)| logp[0][i][y as usize] as f64)
            .sum();

        let source = Source::Tokens {
            ids: &src_t,
            padding: Some(&src_pad),
        };
        let memory = model.encode(source, false)?;
        let mut state = model.start_decoding(&memory)?;
        let (_, cross) = model.decode_step(
            &tgt,
            &memory,
            Some(&src_pad),
            &mut state,
            NeedWeights::PerHead,
        )?;
        Ok((score, cross))
    }

    #[test]
    fn length_penalty_follows_gnmt() {
        assert_eq!(length_penalty(1, 0.6), 1.0);
        assert!((length_penalty(7, 0.6) - 2f64.powf(0.6)).abs() < 1e-12);
        assert!((length_penalty(13, 1.0) - 3.0).abs() < 1e-12);
        for len in [0, 1, 10, 100] {
            assert_eq!(length_penalty(len, 0.0), 1.0);
        }
        // Longer hypotheses are divided by more, which favours them (scores are negative).
        assert!(length_penalty(20, 0.6) > length_penalty(10, 0.6));
    }

    #[test]
    fn beam_of_one_is_greedy() -> Result<()> {
        let models = [random_model(3)?, trained_model()?];
        for (m, (model, _)) in models.iter().enumerate() {
            let src = sources(20 + m as u64);
            for alpha in [0.0, 0.6] {
                let greedy = greedy_batch(model, &src, IDS, &opts(1, alpha), &cpu())?;
                let beam = beam_search_batch(model, &src, IDS, &opts(1, alpha), &cpu())?;
                let via_translate = translate_batch(model, &src, IDS, &opts(1, alpha), &cpu())?;
                for ((g, b), t) in greedy.iter().zip(&beam).zip(&via_translate) {
                    assert_eq!(g.tokens, b.tokens, "model {m}, alpha {alpha}");
                    assert_eq!(g.tokens, t.tokens);
                    assert_eq!(g.score, b.score);
                    assert_eq!(g.normalized_score, b.normalized_score);
                    assert_eq!(g.reached_eos, b.reached_eos);
                    let (ga, ba) = (
                        g.cross_attention.as_ref().unwrap(),
                        b.cross_attention.as_ref().unwrap(),
                    );
                    for (x, y) in ga.iter().zip(ba) {
                        assert_eq!(max_diff(x, y)?, 0.0);
                    }
                }
            }
            let ended = greedy_batch(model, &src, IDS, &opts(1, 0.0), &cpu())?
                .iter()
                .filter(|h| h.reached_eos)
                .count();
            println!(
                "model {m}: {ended} of {} greedy hypotheses reached eos",
                src.len()
            );
        }
        Ok(())
    }

    #[test]
    fn batching_does_not_change_results() -> Result<()> {
        let (model, _vs) = random_model(5)?;
        let src = sources(30);
        for k in [1, 3] {
            let o = opts(k, 0.6);
            let batched = translate_batch(&model, &src, IDS, &o, &cpu())?;
            for (i, s) in src.iter().enumerate() {
                let alone = translate_batch(&model, std::slice::from_ref(s), IDS, &o, &cpu())?;
                let (a, b) = (&alone[0], &batched[i]);
                assert_eq!(a.tokens, b.tokens, "beam {k}, sentence {i}");
                assert_eq!(a.reached_eos, b.reached_eos);
                assert!(
                    (a.score - b.score).abs() < 1e-4,
                    "{} vs {}",
                    a.score,
                    b.score
                );
                for (x, y) in a
                    .cross_attention
                    .as_ref()
                    .unwrap()
                    .iter()
                    .zip(b.cross_attention.as_ref().unwrap())
                {
                    assert!(max_diff(x, y)? < 1e-5);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn beam_scores_are_model_scores_and_beat_greedy() -> Result<()> {
        let models = [random_model(9)?, trained_model()?];
        let cfg = config();
        for (m, (model, _)) in models.iter().enumerate() {
            let src = sources(40 + m as u64);
            let greedy = greedy_batch(model, &src, IDS, &opts(1, 0.0), &cpu())?;
            for alpha in [0.0, 0.6] {
                let beam = beam_search_batch(model, &src, IDS, &opts(4, alpha), &cpu())?;
                for (i, (h, g)) in beam.iter().zip(&greedy).enumerate() {
                    let (score, cross) = rescore(model, &src[i], h)?;
                    println!(
                        "model {m}, alpha {alpha}, sentence {i}: beam {} tokens {:.4} (eos {}), \
                         greedy {} tokens {:.4} (eos {})",
                        h.tokens.len(),
                        h.score,
                        h.reached_eos,
                        g.tokens.len(),
                        g.score,
                        g.reached_eos
                    );
                    assert!(
                        (score - h.score).abs() < 1e-4,
                        "model {m}, sentence {i}: {score} vs {}",
                        h.score
                    );
                    let generated = teacher_forcing(h).1.len();
                    let special = [IDS.pad, IDS.bos, IDS.eos];
                    assert!(!h
                        .tokens
                        .iter()
                        .chain(&g.tokens)
                        .any(|t| special.contains(t)));
                    let lp = length_penalty(generated, alpha);
                    assert!((h.normalized_score - h.score / lp).abs() < 1e-12);
                    if alpha == 0.0 {
                        assert!(
                            // Equal hypotheses scored in batches of different shapes differ by f32 rounding.
                            h.score >= g.score - 1e-5,
                            "model {m}, sentence {i}: beam {} < greedy {}",
                            h.score,
                            g.score
                        );
                    }
                    // The attention returned is the one of the returned hypothesis.
                    let att = h.cross_attention.as_ref().unwrap();
                    assert_eq!(att.len(), cfg.n_decoder_layers);
                    for (l, a) in att.iter().enumerate() {
                        assert_eq!(a.dims(), [cfg.n_heads, generated, src[i].len()]);
                        if let Some(c) = cross.get(l) {
                            let c = c.get(0)?.narrow(2, 0, src[i].len())?; // (H, T, S_b)
                            assert!(max_diff(a, &c)? < 1e-5, "layer {l}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn length_limit_is_respected() -> Result<()> {
        let (model, _vs) = random_model(13)?;
        let src = sources(50);
        for k in [1, 3] {
            let o = Seq2SeqDecodeOptions {
                max_len_a: 0.5,
                max_extra: 3,
                ..opts(k, 0.6)
            };
            for (s, h) in src
                .iter()
                .zip(translate_batch(&model, &src, IDS, &o, &cpu())?)
            {
                let limit = s.len() / 2 + 3;
                let generated = h.tokens.len() + usize::from(h.reached_eos);
                assert!(generated <= limit);
                if !h.reached_eos {
                    assert_eq!(generated, limit);
                }
            }
        }
        // The model's max_len caps the limit.
        let cfg = EncoderDecoderConfig {
            max_len: 12,
            ..config()
        };
        let (short, _vs) = EncoderDecoder::init(&cfg, DType::F32, &cpu(), 13)?;
        for k in [1, 3] {
            for h in translate_batch(&short, &src, IDS, &opts(k, 0.0), &cpu())? {
                assert!(h.tokens.len() + usize::from(h.reached_eos) <= 12);
            }
        }
        // A limit of 0 generates nothing.
        let none = Seq2SeqDecodeOptions {
            max_len_a: 0.0,
            max_extra: 0,
            ..opts(2, 0.6)
        };
        for (s, h) in src
            .iter()
            .zip(translate_batch(&model, &src, IDS, &none, &cpu())?)
        {
            assert!(h.tokens.is_empty() && !h.reached_eos && h.score == 0.0);
            for a in h.cross_attention.unwrap() {
                assert_eq!(a.dims(), [cfg.n_heads, 0, s.len()]);
            }
        }
        Ok(())
    }

    #[test]
    fn eos_ends_a_hypothesis() -> Result<()> {
        let (model, _vs) = random_model(17)?;
        let src = sources(60);
        // Make the token greedy picks first for sentence 0 the eos.
        let first = greedy_batch(&model, &src, IDS, &opts(1, 0.0), &cpu())?[0].tokens[0];
        let ids = SpecialTokens { eos: first, ..IDS };
        for k in [1, 4] {
            let out = translate_batch(&model, &src, ids, &opts(k, 0.0), &cpu())?;
            for (s, h) in src.iter().zip(&out) {
                assert!(!h.tokens.contains(&first), "eos inside the output");
                if !h.reached_eos {
                    assert_eq!(h.tokens.len(), (s.len() + 50).min(64));
                }
            }
            if k == 1 {
                assert!(out[0].tokens.is_empty() && out[0].reached_eos);
                assert!(out[0].score < 0.0);
                assert_eq!(out[0].cross_attention.as_ref().unwrap()[0].dims()[1], 1);
            }
        }
        // fairseq starts decoding with eos: bos == eos must still be able to end hypotheses.
        let ids = SpecialTokens { bos: first, ..ids };
        for k in [1, 4] {
            let out = translate_batch(&model, &src, ids, &opts(k, 0.0), &cpu())?;
            assert!(out[0].reached_eos, "beam {k}");
            assert!(out
                .iter()
                .all(|h| !h.tokens.contains(&first) && !h.tokens.contains(&IDS.pad)));
        }
        Ok(())
    }

    #[test]
    fn empty_sources_and_batches() -> Result<()> {
        let (model, _vs) = random_model(19)?;
        for k in [1, 3] {
            assert!(translate_batch(&model, &[], IDS, &opts(k, 0.6), &cpu())?.is_empty());
            let out = translate_batch(&model, &[vec![], vec![]], IDS, &opts(k, 0.6), &cpu())?;
            assert_eq!(out.len(), 2);
            for h in out {
                for a in h.cross_attention.unwrap() {
                    // Nothing to attend to: zero columns.
                    assert_eq!(a.dims()[2], 0);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn attention_rows_are_distributions() -> Result<()> {
        let (model, _vs) = random_model(23)?;
        let src = sources(70);
        for h_s in translate_batch(&model, &src, IDS, &opts(3, 0.6), &cpu())?
            .iter()
            .zip(&src)
        {
            let (h, s) = h_s;
            if s.is_empty() {
                continue;
            }
            for a in h.cross_attention.as_ref().unwrap() {
                let sums = a.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
                assert!(sums.iter().all(|x| (x - 1.0).abs() < 1e-5), "{sums:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn invalid_inputs_are_errors() -> Result<()> {
        let (model, _vs) = random_model(29)?;
        let ok = opts(2, 0.6);
        let e =
            translate_batch(&model, &[vec![3], vec![4, V as u32]], IDS, &ok, &cpu()).unwrap_err();
        assert!(e.to_string().contains("source 1, position 1"), "{e}");
        let e = translate_batch(&model, &[vec![3; 65]], IDS, &ok, &cpu()).unwrap_err();
        assert!(e.to_string().contains("max_len"), "{e}");
        let bad_eos = SpecialTokens {
            eos: V as u32,
            ..IDS
        };
        assert!(translate_batch(&model, &[vec![3]], bad_eos, &ok, &cpu()).is_err());
        for bad in [
            Seq2SeqDecodeOptions {
                beam_size: 0,
                ..ok.clone()
            },
            Seq2SeqDecodeOptions {
                alpha: f64::NAN,
                ..ok.clone()
            },
            Seq2SeqDecodeOptions {
                alpha: -1.0,
                ..ok.clone()
            },
            Seq2SeqDecodeOptions {
                max_len_a: f64::INFINITY,
                ..ok.clone()
            },
        ] {
            assert!(
                translate_batch(&model, &[vec![3]], IDS, &bad, &cpu()).is_err(),
                "{bad:?}"
            );
        }
        Ok(())
    }
}
