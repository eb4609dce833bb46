//! Prediction: sampling filters (temperature, top-k, top-p), autoregressive generation with a
//! KV cache for decoder-only models, batched greedy decoding and beam search for encoder-decoder
//! models.

pub mod generate;
pub mod image;
pub mod sampling;
pub mod seq2seq;
pub mod whisper;

pub use generate::{generate, generate_many, GenerateOptions, GenerateStats, Overflow};
pub use sampling::{filter_top_k, filter_top_p, sample_token, Sampling};
pub use seq2seq::{
    beam_search_batch, greedy_batch, length_penalty, translate_batch, Hypothesis,
    Seq2SeqDecodeOptions, SpecialTokens,
};
