//! Training tasks: language modelling on a token stream (decoder-only), and sequence-to-
//! sequence on sentence pairs (encoder-decoder), including the generated reversal task of the
//! demo.

use candle_core::{DType, Device, Tensor};

use super::loss::{cross_entropy, CrossEntropyConfig};
use super::trainer::Task;
use crate::data::{LmDataset, Seq2SeqBatch, Seq2SeqIds, Split};
use crate::models::{DecoderOnly, EncoderDecoder};
use crate::nn::AttnMask;
use crate::rng::Rng;
use crate::Result;

/// Next-token prediction on random windows of a token stream (nanoGPT's training).
pub struct LmTask {
    pub model: DecoderOnly,
    pub data: LmDataset,
    pub batch_size: usize,
    pub block_size: usize,
    pub loss: CrossEntropyConfig,
    pub device: Device,
}

impl LmTask {
    fn batch_loss(&self, split: Split, rng: &mut Rng, train: bool) -> Result<Tensor> {
        let b = self
            .data
            .batch(split, self.batch_size, self.block_size, rng, &self.device)?;
        let logits = self.model.forward(&b.x, train)?; // (B, T, V)
        cross_entropy(&logits, &b.y, &self.loss)
    }
}

impl Task for LmTask {
    fn train_batch(&mut self, rng: &mut Rng) -> Result<(Tensor, usize)> {
        Ok((
            self.batch_loss(Split::Train, rng, true)?,
            self.batch_size * self.block_size,
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
    pub model: EncoderDecoder,
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

impl Seq2SeqTask {
    /// Teacher-forced loss of one batch of pairs.
    pub fn pairs_loss(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        train: bool,
        loss: &CrossEntropyConfig,
    ) -> Result<Tensor> {
        let batch = Seq2SeqBatch::new(pairs, self.ids, &self.device)?;
        let src_pad = AttnMask::Block(batch.src_mask()?);
        let tgt_pad = AttnMask::Block(batch.tgt_mask()?);
        let logits = self.model.forward(
            &batch.src,
            &batch.tgt_in,
            Some(&src_pad),
            Some(&tgt_pad),
            train,
        )?;
        let cfg = CrossEntropyConfig {
            ignore_index: Some(self.ids.ignore),
            ..*loss
        };
        cross_entropy(&logits, &batch.labels, &cfg)
    }
}

impl Task for Seq2SeqTask {
    fn train_batch(&mut self, rng: &mut Rng) -> Result<(Tensor, usize)> {
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
        let tokens = pairs.iter().map(|(_, t)| t.len() + 1).sum();
        Ok((self.pairs_loss(&pairs, true, &self.loss)?, tokens))
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
        Ok(sum / count.max(1) as f64)
    }
}
