//! Tokenizers, datasets and batching (padding, masks, shifting, bucketing).
//!
//! - [`tokenizer`]: character-level and Hugging Face tokenizers behind one [`Tokenizer`],
//!   built from a [`TokenizerConfig`], with a [`StreamDecoder`] for streaming generation.
//! - [`text`]: language-model data from one text file: train/val split, random windows
//!   (nanoGPT's `get_batch`) and exact-evaluation windows.
//! - [`batch`]: padding, key-padding masks (1 = padding), teacher-forcing shifts and length
//!   bucketing for sequence-to-sequence data.
//! - [`parallel`]: aligned source/target text files for translation, with per-line UTF-8
//!   checks and length filtering.
//! - [`images`], [`resize`], [`idx`], [`image_folder`]: images in (PNG/JPEG decoding, Pillow's
//!   resize and transformers' ViT preprocessing, IDX files, folder-per-class trees).
//! - [`image_set`]: labelled images of one size in memory, as classification trains on them.
//! - [`pixel_tokens`]: grey images as class-conditional pixel-token sequences (generation).

pub mod audio;
pub mod batch;
pub mod datasets;
pub mod idx;
pub mod image_folder;
pub mod image_set;
pub mod images;
pub mod parallel;
pub mod pixel_tokens;
pub mod resize;
pub mod text;
pub mod tokenizer;

#[cfg(test)]
pub(crate) mod test_util;

pub use batch::{
    bucket_by_tokens, pad_batch, padding_mask, shift_targets, Padded, Seq2SeqBatch, Seq2SeqIds,
};
pub use parallel::{encode_pairs, read_lines, read_parallel, split_lines, EncodedPairs, Line};
pub use text::{eval_windows, random_windows, read_text, EvalWindow, LmBatch, LmDataset, Split};
pub use tokenizer::{
    CharTokenizer, HfTokenizer, SpecialIds, StreamDecoder, Tokenizer, TokenizerConfig,
    TokenizerKind,
};
