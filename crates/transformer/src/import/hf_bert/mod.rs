//! Hugging Face BERT checkpoints → [`EncoderOnly`](crate::models::EncoderOnly): the
//! configuration, the weights and their names. Sentence embeddings on top of this (with the
//! sentence-transformers files and the tokenizer) are a pipeline: `pipelines::embed`.
//!
//! A model directory holds `config.json` (`"model_type": "bert"`) and `model.safetensors` (or,
//! if absent, `pytorch_model.bin` in torch's zip format, read by candle's pickle reader).
//!
//! - `config.rs`: [`HfBertConfig`], the fields of `config.json` that shape the network, and
//!   their translation into our [`EncoderOnlyConfig`](crate::models::EncoderOnlyConfig).
//! - `names.rs`: [`map_state_dict`], the renaming of a state dict by the table below.
//! - `files.rs`: the file names of a model directory and [`read_weights`].
//!
//! Parameter names (Hugging Face names with or without the `bert.` prefix of `BertFor*`
//! checkpoints; `N` is the layer):
//!
//! | Hugging Face                                          | ours                              |
//! |-------------------------------------------------------|-----------------------------------|
//! | `embeddings.word_embeddings.weight`                   | `embed.tok.weight`                |
//! | `embeddings.position_embeddings.weight`               | `embed.pos.weight`                |
//! | `embeddings.token_type_embeddings.weight`             | `embed.type.weight`               |
//! | `embeddings.LayerNorm.{weight,bias}` (`gamma`,`beta`) | `embed.norm.{weight,bias}`        |
//! | `encoder.layer.N.attention.self.{query,key,value}.*`  | `layers.N.self_attn.in_proj.*` (q, k, v stacked along dim 0) |
//! | `encoder.layer.N.attention.output.dense.*`            | `layers.N.self_attn.out_proj.*`   |
//! | `encoder.layer.N.attention.output.LayerNorm.*`        | `layers.N.norm1.*`                |
//! | `encoder.layer.N.intermediate.dense.*`                | `layers.N.ff.linear1.*`           |
//! | `encoder.layer.N.output.dense.*`                      | `layers.N.ff.linear2.*`           |
//! | `encoder.layer.N.output.LayerNorm.*`                  | `layers.N.norm2.*`                |
//! | `pooler.dense.*`                                      | `pooler.*`                        |
//!
//! `embeddings.position_ids` buffers and task heads outside the BERT body (`cls.*` MLM/NSP
//! heads, `classifier.*`, ...) are ignored; any other tensor of the body that the model does
//! not use is an error, as are missing tensors and wrong shapes (named by their Hugging Face
//! name, with the expected and the actual shape).

// Private: every item has one path, `import::hf_bert::NAME`; the files only show the parts.
mod config;
mod files;
mod names;

pub use config::HfBertConfig;
pub use files::{
    read_weights, HF_CONFIG_FILE, HF_PYTORCH_FILE, HF_SAFETENSORS_FILE, HF_TOKENIZER_FILE,
};
pub use names::{has_pooler, map_state_dict};
