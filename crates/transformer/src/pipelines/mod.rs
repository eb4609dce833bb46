//! Each pipeline goes from what a user has (texts, a model directory) to what they asked for
//! (embeddings, ...), composed from `data` (tokenizers), `import` (checkpoints), `models` and
//! `nn`. Nothing below `pipelines` depends on it.
//!
//! - [`embed`](crate::pipelines::embed): sentence embeddings of a Hugging Face BERT
//!   checkpoint, as sentence-transformers computes them
//!   ([`HfBert`](crate::pipelines::embed::HfBert)).
//! - [`chat`](crate::pipelines::chat): a conversation rendered through the model's chat
//!   template.
//! - [`classify`](crate::pipelines::classify): image classification with a ViT checkpoint
//!   (ours or Hugging Face's), top-k labels and attention rollout.
//! - [`generate_image`](crate::pipelines::generate_image): class-conditional images from a
//!   pixel-sequence model, and its bits per pixel.

pub mod chat;
pub mod classify;
pub mod embed;
pub mod generate_image;

pub mod transcribe;
