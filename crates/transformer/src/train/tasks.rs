//! Training tasks: language modelling on a token stream (decoder-only), and sequence-to-
//! sequence on sentence pairs (encoder-decoder), including the generated reversal task of the
//! demo.

use candle_core::{DType, Device, Tensor};

use super::loss::{cross_entropy, CrossEntropyConfig};
use super::parallel::Shard;
use super::trainer::Task;
use crate::data::{bucket_by_tokens, LmDataset, Seq2SeqBatch, Seq2SeqIds, Split};
use crate::models::{CausalLm, Seq2Seq};
use crate::nn::AttnMask;
use crate::rng::Rng;
use crate::Result;

/// Next-token prediction on random windows of a token stream (nanoGPT's training).
pub struct LmTask {
    pub model: Box<dyn CausalLm>,
    pub data: LmDataset,
    pub batch_size: usize,
    pub block_size: usize,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

impl Task for LmTask {
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> Result<(Tensor, usize)> {
        let b = self.data.batch(
            Split::Train,
            self.batch_size,
            self.block_size,
            rng,
            &self.device,
        )?;
        let rows = shard.rows(self.batch_size);
        if rows.is_empty() {
            return Shard::empty_loss(&self.device);
        }
        let (x, y) = if shard.is_whole() {
            (b.x, b.y)
        } else {
            (
                b.x.narrow(0, rows.start, rows.len())?,
                b.y.narrow(0, rows.start, rows.len())?,
            )
        };
        let logits = self.model.forward(&x, true)?; // (B, T, V)
        Ok((
            cross_entropy(&logits, &y, &self.loss)?,
            rows.len() * self.block_size,
        ))
    }

    fn eval_loss(&mut self, rng: &mut Rng, iters: usize) -> Result<f64> {
        // Plain cross-entropy for validation, whatever smoothing training uses.
        let plain = CrossEntropyConfig::default();
        let mut sum = 0.0;
        for _ in 0..iters {
            let b = self.data.batch(
                Split::Val,
                self.batch_size,
                self.block_size,
                rng,
                &self.device,
            )?;
            let logits = self.model.forward(&b.x, false)?.detach();
            sum += scalar(&cross_entropy(&logits, &b.y, &plain)?)?;
        }
        Ok(sum / iters as f64)
    }
}

/// The mean validation loss, or an error when there was nothing to validate on: a mean over
/// no tokens reported as 0 would look like a perfect model and freeze `best/` at the first
/// evaluation.
fn mean_val_loss(sum: f64, count: usize) -> Result<f64> {
    if count == 0 {
        return Err(crate::Error::msg(
            "the validation set is empty: there is no validation loss to report or to pick \
             best/ by (give the run validation data, e.g. data.n_val >= 1)",
        ));
    }
    Ok(sum / count as f64)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Where the pairs of a [`Seq2SeqTask`] come from.
pub enum PairSource {
    /// Fixed training pairs, sampled uniformly into batches.
    Fixed(Vec<(Vec<u32>, Vec<u32>)>),
    /// Freshly generated random symbol sequences and their reversal.
    Reverse {
        /// Ids of the symbols to draw from.
        symbols: Vec<u32>,
        min_len: usize,
        max_len: usize,
    },
}

/// Teacher-forced encoder-decoder training on (source, target) pairs.
pub struct Seq2SeqTask {
    pub model: Box<dyn Seq2Seq>,
    pub train: PairSource,
    pub val: Vec<(Vec<u32>, Vec<u32>)>,
    pub batch_size: usize,
    pub ids: Seq2SeqIds,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

/// A random symbol sequence and its reversal.
pub fn reverse_pair(
    symbols: &[u32],
    min_len: usize,
    max_len: usize,
    rng: &mut Rng,
) -> (Vec<u32>, Vec<u32>) {
    let len = min_len + rng.below((max_len - min_len + 1) as u64) as usize;
    let src: Vec<u32> = (0..len)
        .map(|_| symbols[rng.below(symbols.len() as u64) as usize])
        .collect();
    let tgt = src.iter().rev().copied().collect();
    (src, tgt)
}

/// Teacher-forced loss of one batch of pairs: the mean cross-entropy over the target tokens
/// (`eos` included, padding skipped).
pub fn seq2seq_loss<S: AsRef<[u32]>, U: AsRef<[u32]>>(
    model: &dyn Seq2Seq,
    pairs: &[(S, U)],
    ids: Seq2SeqIds,
    train: bool,
    loss: &CrossEntropyConfig,
    device: &Device,
) -> Result<Tensor> {
    let batch = Seq2SeqBatch::new(pairs, ids, device)?;
    let src_pad = AttnMask::Block(batch.src_mask()?); // (B, S)
    let tgt_pad = AttnMask::Block(batch.tgt_mask()?); // (B, T)
    let logits = model.forward(
        &batch.src,
        &batch.tgt_in,
        Some(&src_pad),
        Some(&tgt_pad),
        train,
    )?; // (B, T, V)
    let cfg = CrossEntropyConfig {
        ignore_index: Some(ids.ignore),
        ..*loss
    };
    cross_entropy(&logits, &batch.labels, &cfg)
}

impl Seq2SeqTask {
    /// Teacher-forced loss of one batch of pairs.
    pub fn pairs_loss(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        train: bool,
        loss: &CrossEntropyConfig,
    ) -> Result<Tensor> {
        seq2seq_loss(
            self.model.as_ref(),
            pairs,
            self.ids,
            train,
            loss,
            &self.device,
        )
    }
}

impl Task for Seq2SeqTask {
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> Result<(Tensor, usize)> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = match &self.train {
            PairSource::Fixed(all) => (0..self.batch_size)
                .map(|_| all[rng.below(all.len() as u64) as usize].clone())
                .collect(),
            PairSource::Reverse {
                symbols,
                min_len,
                max_len,
            } => (0..self.batch_size)
                .map(|_| reverse_pair(symbols, *min_len, *max_len, rng))
                .collect(),
        };
        let pairs = &pairs[shard.rows(pairs.len())];
        if pairs.is_empty() {
            return Shard::empty_loss(&self.device);
        }
        let tokens = pairs.iter().map(|(_, t)| t.len() + 1).sum();
        Ok((self.pairs_loss(pairs, true, &self.loss)?, tokens))
    }

    /// The loss over the whole validation set (in order, `batch_size` pairs at a time); `rng`
    /// and `iters` are not needed because the set is fixed and small.
    fn eval_loss(&mut self, _rng: &mut Rng, _iters: usize) -> Result<f64> {
        let plain = CrossEntropyConfig::default();
        let (mut sum, mut count) = (0.0, 0usize);
        for chunk in self.val.chunks(self.batch_size) {
            let n: usize = chunk.iter().map(|(_, t)| t.len() + 1).sum();
            sum += scalar(&self.pairs_loss(chunk, false, &plain)?.detach())? * n as f64;
            count += n;
        }
        mean_val_loss(sum, count)
    }
}

/// Decoder positions a pair occupies: the source, and the target plus `eos` (or `bos`).
fn pair_lengths(pairs: &[(Vec<u32>, Vec<u32>)]) -> Vec<(usize, usize)> {
    pairs.iter().map(|(s, t)| (s.len(), t.len() + 1)).collect()
}

/// Length buckets of `pairs` ([`bucket_by_tokens`]) with at most `max_pairs` pairs each.
pub fn token_batches(
    pairs: &[(Vec<u32>, Vec<u32>)],
    max_tokens: usize,
    max_pairs: usize,
) -> Result<Vec<Vec<usize>>> {
    // The order bucket_by_tokens shuffles the batches into does not matter here: the schedule
    // draws batches at random (see BucketSchedule), and evaluation visits all of them.
    let buckets = bucket_by_tokens(&pair_lengths(pairs), max_tokens, &mut Rng::new(0))?;
    let mut batches = Vec::with_capacity(buckets.len());
    for b in buckets {
        for chunk in b.chunks(max_pairs.max(1)) {
            batches.push(chunk.to_vec());
        }
    }
    Ok(batches)
}

/// Most draws replayed to find where a resumed run stands in its data order (about a second of
/// work); a generator state not reached by then was not made by this schedule.
const MAX_REPLAY: u64 = 1 << 27;

/// The order in which training batches are visited: every batch once per epoch, in a fresh
/// random order each epoch (a lazy Fisher-Yates shuffle: each call draws uniformly among the
/// batches this epoch has not used yet).
///
/// Exact resumption with the trainer's data generator as the only saved state: each batch
/// costs exactly one draw, so the generator's state says how many batches were drawn since
/// the start of the run. When a call comes with a state other than the one the previous call
/// left (the first call of a resumed run), the schedule replays the draws from the run's
/// initial state ([`super::trainer::initial_data_rng`]) until it reaches that state; the
/// epochs and the batches already used come out exactly as in an uninterrupted run.
#[derive(Debug, Clone)]
pub struct BucketSchedule {
    n_batches: usize,
    /// The data generator at step 0 of the run.
    initial: Rng,
    /// Batches not yet used in the current epoch.
    remaining: Vec<usize>,
    /// Epochs started (1 during the first).
    epoch: u64,
    /// Batches drawn since the start of the run.
    drawn: u64,
    /// The generator's state after the last draw.
    last: Option<Rng>,
}

impl BucketSchedule {
    pub fn new(n_batches: usize, initial: Rng) -> Result<Self> {
        if n_batches == 0 {
            return Err(crate::Error::msg("the training data has no batches"));
        }
        Ok(BucketSchedule {
            n_batches,
            initial,
            remaining: Vec::new(),
            epoch: 0,
            drawn: 0,
            last: None,
        })
    }

    /// Epochs started so far.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches drawn since the start of the run.
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    fn draw(&mut self, rng: &mut Rng) -> usize {
        if self.remaining.is_empty() {
            self.remaining = (0..self.n_batches).collect();
            self.epoch += 1;
        }
        let j = rng.below(self.remaining.len() as u64) as usize;
        self.drawn += 1;
        self.remaining.swap_remove(j)
    }

    /// Put the schedule where a run whose data generator is now `rng` stands.
    fn sync(&mut self, rng: &Rng) -> Result<()> {
        let mut sim = self.initial.clone();
        self.remaining.clear();
        self.epoch = 0;
        self.drawn = 0;
        while sim != *rng {
            if self.drawn >= MAX_REPLAY {
                return Err(crate::Error::msg(format!(
                    "resuming: the saved data-order state is not among the first {MAX_REPLAY} \
                     batches of this run's schedule; was train.seed changed since the \
                     checkpoint was written?"
                )));
            }
            self.draw(&mut sim);
        }
        Ok(())
    }

    /// The index of the next batch, drawn with `rng`.
    pub fn next(&mut self, rng: &mut Rng) -> Result<usize> {
        if self.last.as_ref() != Some(rng) {
            self.sync(rng)?;
        }
        let b = self.draw(rng);
        self.last = Some(rng.clone());
        Ok(b)
    }
}

/// Translation training: sentence pairs in length buckets of about `max_tokens` tokens
/// (little padding), visited once per epoch in a random order ([`BucketSchedule`]), with the
/// whole validation set as validation loss.
pub struct BucketedSeq2SeqTask {
    pub model: Box<dyn Seq2Seq>,
    /// Encoded training pairs.
    pub train: Vec<(Vec<u32>, Vec<u32>)>,
    /// Indices into `train` of each batch.
    pub train_batches: Vec<Vec<usize>>,
    pub schedule: BucketSchedule,
    /// Encoded validation pairs.
    pub val: Vec<(Vec<u32>, Vec<u32>)>,
    /// Indices into `val` of each validation batch.
    pub val_batches: Vec<Vec<usize>>,
    pub ids: Seq2SeqIds,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

/// The data of a [`BucketedSeq2SeqTask`].
pub struct BucketedPairs {
    /// Encoded training pairs.
    pub train: Vec<(Vec<u32>, Vec<u32>)>,
    /// Encoded validation pairs.
    pub val: Vec<(Vec<u32>, Vec<u32>)>,
    /// Token budget per batch (pairs × longest side, padding included).
    pub max_tokens: usize,
    /// Most pairs per batch.
    pub max_pairs: usize,
    /// The run's data generator at step 0 ([`super::trainer::initial_data_rng`]).
    pub initial_rng: Rng,
}

impl BucketedSeq2SeqTask {
    /// Bucket the training and validation pairs.
    pub fn new(
        model: Box<dyn Seq2Seq>,
        data: BucketedPairs,
        ids: Seq2SeqIds,
        loss: CrossEntropyConfig,
        device: Device,
    ) -> Result<Self> {
        let train_batches = token_batches(&data.train, data.max_tokens, data.max_pairs)?;
        let val_batches = token_batches(&data.val, data.max_tokens, data.max_pairs)?;
        Ok(BucketedSeq2SeqTask {
            model,
            schedule: BucketSchedule::new(train_batches.len(), data.initial_rng)?,
            train: data.train,
            train_batches,
            val: data.val,
            val_batches,
            ids,
            loss,
            device,
        })
    }
}

impl Task for BucketedSeq2SeqTask {
    fn train_batch(&mut self, rng: &mut Rng, shard: Shard) -> Result<(Tensor, usize)> {
        let b = self.schedule.next(rng)?;
        let batch = &self.train_batches[b];
        let rows = shard.rows(batch.len());
        if rows.is_empty() {
            return Shard::empty_loss(&self.device);
        }
        let pairs: Vec<(&[u32], &[u32])> = batch[rows]
            .iter()
            .map(|&i| (self.train[i].0.as_slice(), self.train[i].1.as_slice()))
            .collect();
        let tokens = pairs.iter().map(|(_, t)| t.len() + 1).sum();
        let loss = seq2seq_loss(
            self.model.as_ref(),
            &pairs,
            self.ids,
            true,
            &self.loss,
            &self.device,
        )?;
        Ok((loss, tokens))
    }

    /// The loss over the whole validation set, weighted by target tokens; `rng` and `iters`
    /// are not needed because the set is fixed.
    fn eval_loss(&mut self, _rng: &mut Rng, _iters: usize) -> Result<f64> {
        let plain = CrossEntropyConfig::default();
        let (mut sum, mut count) = (0.0, 0usize);
        for batch in &self.val_batches {
            let pairs: Vec<(&[u32], &[u32])> = batch
                .iter()
                .map(|&i| (self.val[i].0.as_slice(), self.val[i].1.as_slice()))
                .collect();
            let n: usize = pairs.iter().map(|(_, t)| t.len() + 1).sum();
            let loss = seq2seq_loss(
                self.model.as_ref(),
                &pairs,
                self.ids,
                false,
                &plain,
                &self.device,
            )?;
            sum += scalar(&loss.detach())? * n as f64;
            count += n;
        }
        mean_val_loss(sum, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs of lengths 1..=20 (source) and 1..=25 (target).
    fn pairs(n: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut rng = Rng::new(3);
        (0..n)
            .map(|i| {
                let s = 1 + rng.below(20) as usize;
                let t = 1 + rng.below(25) as usize;
                (vec![i as u32; s], vec![i as u32; t])
            })
            .collect()
    }

    /// The batch indices of `n` draws.
    fn draws(sched: &mut BucketSchedule, rng: &mut Rng, n: usize) -> Vec<usize> {
        (0..n).map(|_| sched.next(rng).unwrap()).collect()
    }

    #[test]
    fn token_batches_respect_budget_and_pair_cap() {
        let p = pairs(300);
        let batches = token_batches(&p, 120, 7).unwrap();
        let mut seen = vec![0; p.len()];
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= 7);
            let longest = b.iter().map(|&i| p[i].0.len().max(p[i].1.len() + 1)).max();
            assert!(b.len() * longest.unwrap() <= 120);
            for &i in b {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn schedule_visits_every_batch_once_per_epoch_in_new_orders() {
        let n = 13;
        let initial = Rng::new(42);
        let mut sched = BucketSchedule::new(n, initial.clone()).unwrap();
        let mut rng = initial.clone();
        let e1 = draws(&mut sched, &mut rng, n);
        let e2 = draws(&mut sched, &mut rng, n);
        assert_eq!(sched.epoch(), 2);
        for e in [&e1, &e2] {
            let mut sorted = e.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(e1, e2, "each epoch is reshuffled");

        // Same seed, same order.
        let mut again = BucketSchedule::new(n, initial.clone()).unwrap();
        let mut rng2 = initial.clone();
        assert_eq!(draws(&mut again, &mut rng2, 2 * n), [e1, e2].concat());
    }

    #[test]
    fn schedule_resumes_mid_epoch_exactly() {
        let n = 10;
        let initial = Rng::new(9);
        let mut full = BucketSchedule::new(n, initial.clone()).unwrap();
        let mut rng = initial.clone();
        let all = draws(&mut full, &mut rng, 37);

        // Stop after 24 draws (mid third epoch); a fresh schedule continues from the saved
        // generator state alone.
        let mut first = BucketSchedule::new(n, initial.clone()).unwrap();
        let mut rng = initial.clone();
        let head = draws(&mut first, &mut rng, 24);
        let saved = rng.clone();
        let mut resumed = BucketSchedule::new(n, initial.clone()).unwrap();
        let mut rng = saved;
        let tail = draws(&mut resumed, &mut rng, 13);
        assert_eq!(resumed.drawn(), 37);
        assert_eq!(resumed.epoch(), 4);
        assert_eq!([head, tail].concat(), all);
    }
}
