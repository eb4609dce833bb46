//! Importers for weights saved by other frameworks.

pub mod ctranslate2;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf_bert;
pub mod hf_vit;
pub mod hf_whisper;
pub mod pytorch;
pub(crate) mod strict;
