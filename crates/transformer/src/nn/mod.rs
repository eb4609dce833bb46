//! Building blocks: attention, multi-head attention (grouped-query, query/key norms), MLPs
//! (plain and gated), norms (layer and RMS), embeddings, positional encodings, encoder and
//! decoder layers, and the parameter store.

pub mod attention;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod layers;
pub mod linear;
pub mod mha;
pub mod mlp;
pub mod norm;
pub mod var_store;

pub use crate::kernels::bf16::{autocast, Precision};
pub use crate::kernels::Kernels;
pub use attention::{
    causal_mask, scaled_dot_product_attention, sliding_window_mask, AttnMask, AttnOutput,
    SdpaOptions,
};
pub use conv::Conv1d;
pub use dropout::Dropout;
pub use embedding::{
    whisper_sinusoids, AbsolutePositions, PositionalKind, Rope, RopeLayout, TokenEmbedding,
};
pub use layers::{
    Decoder, DecoderLayer, DecoderOutput, DecoderState, Encoder, EncoderLayer, LayerConfig,
    LayerOptions, Masks, Memory, SelfAttentionBlock, SelfCache,
};
pub use linear::Linear;
pub use mha::{
    BatchKvCache, KvCache, MhaConfig, MhaInput, MhaOutput, MultiHeadAttention, NeedWeights,
    ProjectedKv, RowCaches,
};
pub use mlp::{Activation, Mlp, MlpConfig, MlpKind};
pub use norm::{Norm, NormConfig, NormKind};
pub use var_store::{Init, InitScheme, VarPath, VarStore};
