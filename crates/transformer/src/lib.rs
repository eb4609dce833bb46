//! # transformer
//!
//! The attention mechanism and the Transformer (Vaswani et al., 2017, "Attention Is All You
//! Need") on [candle](https://github.com/huggingface/candle): scaled dot-product and multi-head
//! attention, encoder and decoder layers, three model families (encoder-decoder, decoder-only,
//! encoder-only), PyTorch weight import, training and decoding.
//!
//! Layout (dependencies point one way): `autograd` (the tape our training records its ops on)
//! → `kernels` → `nn` → `models` → `import` / `pipelines` / `train` / `decode`; `data` holds
//! tokenizers and batching.

pub mod autograd;
pub mod data;
pub mod decode;
pub mod error;
pub mod import;
pub mod kernels;
pub mod metrics;
pub mod models;
pub mod nn;
/// End-to-end jobs a user names — embedding today; translation, generation, speech and vision
/// pipelines will live here too.
pub mod pipelines;
pub mod rng;
pub mod train;
/// Numeric validation of config fields and flags, and finiteness checks of tensors.
pub mod validate;

pub use error::{Error, Result};

/// The crate version.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The README's example runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
