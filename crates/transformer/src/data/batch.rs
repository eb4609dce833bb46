//! Batching sequences of different lengths: padding, key-padding masks, target shifting for
//! teacher forcing, and length bucketing under a token budget.
//!
//! Dimension letters: `B` batch, `S` source length, `T` target length (both padded to the
//! longest sequence of the batch).
//!
//! Mask convention: the key-padding masks built here are `u8` with **1 = padding** (masked
//! out), PyTorch's `key_padding_mask` convention and the attention module's `Block` mask.

use candle_core::{Device, Tensor};

use super::tokenizer::Tokenizer;
use crate::rng::Rng;
use crate::{Error, Result};

/// Sequences padded to a common length.
#[derive(Debug, Clone)]
pub struct Padded {
    /// Token ids, (B, T_max) u32, each row's tail filled with the pad id.
    pub ids: Tensor,
    /// The true length of each row (B of them).
    pub lengths: Vec<usize>,
}

impl Padded {
    /// The key-padding mask of these rows, (B, T_max) u8, 1 = padding.
    pub fn mask(&self) -> Result<Tensor> {
        let (_b, t) = self.ids.dims2()?;
        padding_mask(&self.lengths, t, self.ids.device())
    }
}

/// Pad `seqs` with `pad` to the longest one's length: ids (B, T_max) u32 and the lengths.
/// An empty batch, or one whose sequences are all empty, is an error.
pub fn pad_batch<S: AsRef<[u32]>>(seqs: &[S], pad: u32, device: &Device) -> Result<Padded> {
    let ids = pad_rows(seqs, pad)?;
    let b = seqs.len();
    let t = ids.len() / b;
    Ok(Padded {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        lengths: seqs.iter().map(|s| s.as_ref().len()).collect(),
    })
}

/// The rows of `seqs` padded with `pad`, flattened row-major: (B, T_max).
fn pad_rows<S: AsRef<[u32]>>(seqs: &[S], pad: u32) -> Result<Vec<u32>> {
    let t = seqs.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
    if t == 0 {
        return Err(Error::msg(format!(
            "cannot pad a batch of {} sequences that has no tokens",
            seqs.len()
        )));
    }
    let mut ids = Vec::with_capacity(seqs.len() * t); // (B, T_max)
    for s in seqs {
        let s = s.as_ref();
        ids.extend_from_slice(s);
        ids.resize(ids.len() + (t - s.len()), pad);
    }
    Ok(ids)
}

/// Key-padding mask (B, T) u8 from lengths: row `b`, position `j` is 1 (padding) iff
/// `j >= lengths[b]`.
pub fn padding_mask(lengths: &[usize], t: usize, device: &Device) -> Result<Tensor> {
    let mut mask = vec![0u8; lengths.len() * t]; // (B, T)
    for (b, &len) in lengths.iter().enumerate() {
        if len > t {
            return Err(Error::msg(format!(
                "padding mask: row {b} has length {len}, longer than the padded length {t}"
            )));
        }
        mask[b * t + len..(b + 1) * t].fill(1);
    }
    Ok(Tensor::from_vec(mask, (lengths.len(), t), device)?)
}

/// Decoder input and labels for teacher forcing: with `y' = y + [eos]`, the decoder reads
/// `[bos] + y'[:-1]` (= `[bos] + y`) and predicts `y'`, so position `t` sees the gold tokens
/// before `t` and is trained on token `t`. Both have `len(y) + 1` entries.
pub fn shift_targets(y: &[u32], bos: u32, eos: u32) -> (Vec<u32>, Vec<u32>) {
    let mut input = Vec::with_capacity(y.len() + 1);
    input.push(bos);
    input.extend_from_slice(y);
    let mut labels = Vec::with_capacity(y.len() + 1);
    labels.extend_from_slice(y);
    labels.push(eos);
    (input, labels)
}

/// The special ids a sequence-to-sequence batch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq2SeqIds {
    /// Pads source and decoder-input rows.
    pub pad: u32,
    /// Starts every decoder input.
    pub bos: u32,
    /// Ends every label row.
    pub eos: u32,
    /// Pads label rows; the loss must skip this id (often the pad id itself).
    pub ignore: u32,
}

impl Seq2SeqIds {
    /// The pad, BOS and EOS ids of `tokenizer`, with `ignore` = pad; an error names any that
    /// the vocabulary lacks.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let ids = tokenizer.special_ids();
        let need = |id: Option<u32>, what: &str, names: &str| {
            id.ok_or_else(|| {
                Error::msg(format!(
                    "the tokenizer has no {what} token (looked for {names}); add it to \
                     tokenizer.special_tokens"
                ))
            })
        };
        let pad = need(ids.pad, "padding", "<pad>, [PAD]")?;
        Ok(Seq2SeqIds {
            pad,
            bos: need(ids.bos, "beginning-of-sequence", "<bos>, <s>")?,
            eos: need(ids.eos, "end-of-sequence", "<eos>, </s>, <|endoftext|>")?,
            ignore: pad,
        })
    }
}

/// A padded batch of (source, target) pairs ready for an encoder-decoder.
#[derive(Debug, Clone)]
pub struct Seq2SeqBatch {
    /// Source ids, (B, S) u32, padded with `pad`.
    pub src: Tensor,
    /// True source lengths (B).
    pub src_lengths: Vec<usize>,
    /// Decoder inputs `[bos] + y`, (B, T) u32, padded with `pad`.
    pub tgt_in: Tensor,
    /// Labels `y + [eos]`, (B, T) u32, padded with `ignore`.
    pub labels: Tensor,
    /// True decoder lengths `len(y) + 1` (B).
    pub tgt_lengths: Vec<usize>,
}

impl Seq2SeqBatch {
    /// Shift the targets (see [`shift_targets`]) and pad everything.
    pub fn new<S: AsRef<[u32]>, U: AsRef<[u32]>>(
        pairs: &[(S, U)],
        ids: Seq2SeqIds,
        device: &Device,
    ) -> Result<Self> {
        if pairs.is_empty() {
            return Err(Error::msg("cannot build a batch from 0 sentence pairs"));
        }
        let srcs: Vec<&[u32]> = pairs.iter().map(|(s, _)| s.as_ref()).collect();
        let src = pad_batch(&srcs, ids.pad, device)?;
        let (inputs, labels): (Vec<Vec<u32>>, Vec<Vec<u32>>) = pairs
            .iter()
            .map(|(_, y)| shift_targets(y.as_ref(), ids.bos, ids.eos))
            .unzip();
        let tgt_in = pad_batch(&inputs, ids.pad, device)?;
        let (b, t) = tgt_in.ids.dims2()?;
        let labels = Tensor::from_vec(pad_rows(&labels, ids.ignore)?, (b, t), device)?;
        Ok(Seq2SeqBatch {
            src: src.ids,
            src_lengths: src.lengths,
            tgt_in: tgt_in.ids,
            labels,
            tgt_lengths: tgt_in.lengths,
        })
    }

    /// Source key-padding mask, (B, S) u8, 1 = padding.
    pub fn src_mask(&self) -> Result<Tensor> {
        let (_b, s) = self.src.dims2()?;
        padding_mask(&self.src_lengths, s, self.src.device())
    }

    /// Target key-padding mask, (B, T) u8, 1 = padding.
    pub fn tgt_mask(&self) -> Result<Tensor> {
        let (_b, t) = self.tgt_in.dims2()?;
        padding_mask(&self.tgt_lengths, t, self.tgt_in.device())
    }
}

/// Group sentence pairs into batches of at most `max_tokens` padded tokens per side, as in
/// Vaswani et al. (2017, §5.1: "sentence pairs were batched together by approximate sequence
/// length ... approximately 25000 source tokens and 25000 target tokens").
///
/// `lengths[i]` is (source, target) length of pair `i`, counted as the model will see them
/// (e.g. target + 1 after [`shift_targets`]). Pairs are sorted by length (the longer side, then
/// source, then target, then index, so ties are deterministic) and cut greedily: a batch of
/// `n` pairs costs `n * max(longest source, longest target)`, which must not exceed
/// `max_tokens`. Sorting keeps the padding small; the batch order is then shuffled with `rng`
/// (the same seed gives the same batches) so that training does not see lengths in order.
/// Returns the pair indices of each batch. A pair longer than `max_tokens` by itself is an
/// error naming it.
pub fn bucket_by_tokens(
    lengths: &[(usize, usize)],
    max_tokens: usize,
    rng: &mut Rng,
) -> Result<Vec<Vec<usize>>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    let key = |i: usize| {
        let (s, t) = lengths[i];
        (s.max(t), s, t, i)
    };
    order.sort_unstable_by_key(|&i| key(i));

    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0; // max over `current` of max(source, target)
    for i in order {
        let (s, t) = lengths[i];
        let len = s.max(t);
        if len > max_tokens {
            return Err(Error::msg(format!(
                "sentence pair {i} (source {s} tokens, target {t} tokens) does not fit the \
                 batch budget of {max_tokens} tokens"
            )));
        }
        let new_longest = longest.max(len);
        if !current.is_empty() && (current.len() + 1) * new_longest > max_tokens {
            batches.push(std::mem::take(&mut current));
            longest = len;
        } else {
            longest = new_longest;
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }

    // Fisher-Yates over the batches, not the pairs: each batch keeps its similar lengths.
    for i in (1..batches.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        batches.swap(i, j);
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_mask_values() {
        let seqs = vec![vec![5u32, 6, 7], vec![8], vec![9, 10]];
        let p = pad_batch(&seqs, 0, &Device::Cpu).unwrap();
        assert_eq!(
            p.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 0, 0], vec![9, 10, 0]]
        );
        assert_eq!(p.lengths, vec![3, 1, 2]);
        assert_eq!(
            p.mask().unwrap().to_vec2::<u8>().unwrap(),
            vec![vec![0, 0, 0], vec![0, 1, 1], vec![0, 0, 1]]
        );
        // An empty row is all padding.
        let p = pad_batch(&[vec![], vec![1u32, 2]], 3, &Device::Cpu).unwrap();
        assert_eq!(
            p.ids.to_vec2::<u32>().unwrap(),
            vec![vec![3, 3], vec![1, 2]]
        );
        assert_eq!(
            p.mask().unwrap().to_vec2::<u8>().unwrap(),
            vec![vec![1, 1], vec![0, 0]]
        );
        assert!(pad_batch::<Vec<u32>>(&[], 0, &Device::Cpu).is_err());
        assert!(pad_batch(&[Vec::<u32>::new()], 0, &Device::Cpu).is_err());
        assert!(padding_mask(&[4], 3, &Device::Cpu).is_err());
    }

    #[test]
    fn shift_and_seq2seq_batch() {
        let (inp, lab) = shift_targets(&[10, 11, 12], 1, 2);
        assert_eq!(inp, vec![1, 10, 11, 12]);
        assert_eq!(lab, vec![10, 11, 12, 2]);
        let (inp, lab) = shift_targets(&[], 1, 2);
        assert_eq!((inp, lab), (vec![1], vec![2]));

        let ids = Seq2SeqIds {
            pad: 0,
            bos: 1,
            eos: 2,
            ignore: 99,
        };
        let pairs = vec![
            (vec![20u32, 21, 22], vec![30u32]),
            (vec![23], vec![31, 32, 33]),
        ];
        let b = Seq2SeqBatch::new(&pairs, ids, &Device::Cpu).unwrap();
        assert_eq!(
            b.src.to_vec2::<u32>().unwrap(),
            vec![vec![20, 21, 22], vec![23, 0, 0]]
        );
        assert_eq!(
            b.tgt_in.to_vec2::<u32>().unwrap(),
            vec![vec![1, 30, 0, 0], vec![1, 31, 32, 33]]
        );
        assert_eq!(
            b.labels.to_vec2::<u32>().unwrap(),
            vec![vec![30, 2, 99, 99], vec![31, 32, 33, 2]]
        );
        assert_eq!(b.src_lengths, vec![3, 1]);
        assert_eq!(b.tgt_lengths, vec![2, 4]);
        assert_eq!(
            b.src_mask().unwrap().to_vec2::<u8>().unwrap(),
            vec![vec![0, 0, 0], vec![0, 1, 1]]
        );
        assert_eq!(
            b.tgt_mask().unwrap().to_vec2::<u8>().unwrap(),
            vec![vec![0, 0, 1, 1], vec![0, 0, 0, 0]]
        );
    }

    #[test]
    fn seq2seq_ids_from_tokenizer() {
        let specials: Vec<String> = ["<pad>", "<bos>", "<eos>"].map(String::from).to_vec();
        let tok = Tokenizer::char_level("abc", &specials, None).unwrap();
        let ids = Seq2SeqIds::from_tokenizer(&tok).unwrap();
        assert_eq!(
            ids,
            Seq2SeqIds {
                pad: 3,
                bos: 4,
                eos: 5,
                ignore: 3
            }
        );
        let tok = Tokenizer::char_level("abc", &specials[..2], None).unwrap();
        let e = Seq2SeqIds::from_tokenizer(&tok).unwrap_err().to_string();
        assert!(e.contains("end-of-sequence"), "{e}");
    }

    /// Deterministic pseudo-random lengths in [1, 40].
    fn lengths(n: usize, seed: u64) -> Vec<(usize, usize)> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (1 + rng.below(40) as usize, 1 + rng.below(40) as usize))
            .collect()
    }

    #[test]
    fn bucketing_keeps_every_pair_once_within_budget() {
        let lens = lengths(500, 1);
        let budget = 200;
        let batches = bucket_by_tokens(&lens, budget, &mut Rng::new(7)).unwrap();
        let mut seen = vec![0usize; lens.len()];
        let (mut real, mut padded) = (0, 0);
        for batch in &batches {
            assert!(!batch.is_empty());
            let longest = batch
                .iter()
                .map(|&i| lens[i].0.max(lens[i].1))
                .max()
                .unwrap();
            assert!(batch.len() * longest <= budget, "{batch:?}");
            for &i in batch {
                seen[i] += 1;
                real += lens[i].0.max(lens[i].1);
            }
            padded += batch.len() * longest;
        }
        assert!(seen.iter().all(|&c| c == 1));
        // Sorting by length keeps padding small (random batches would waste about 40%).
        assert!(
            (padded - real) as f64 / padded as f64 <= 0.1,
            "{real} / {padded}"
        );

        let again = bucket_by_tokens(&lens, budget, &mut Rng::new(7)).unwrap();
        assert_eq!(batches, again, "same seed, same batches");
        let other = bucket_by_tokens(&lens, budget, &mut Rng::new(8)).unwrap();
        assert_ne!(batches, other, "another seed shuffles differently");
        let mut a = batches.clone();
        let mut b = other;
        a.sort();
        b.sort();
        assert_eq!(a, b, "only the order of batches depends on the seed");
    }

    #[test]
    fn bucketing_rejects_a_pair_over_budget() {
        let e = bucket_by_tokens(&[(3, 4), (50, 2)], 40, &mut Rng::new(0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pair 1") && e.contains("50") && e.contains("40"),
            "{e}"
        );
        assert!(bucket_by_tokens(&[], 40, &mut Rng::new(0))
            .unwrap()
            .is_empty());
    }
}
