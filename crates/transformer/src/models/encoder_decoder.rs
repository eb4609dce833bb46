//! The paper's encoder-decoder Transformer: embeddings (scaled by √d_model), positions,
//! encoder and decoder stacks and the output projection (optionally tied to the embeddings).
//!
//! Dimension letters: `B` batch, `S` source length, `T` target length, `E` d_model, `V` vocab.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::family::{FamilyConfig, Model, Seq2Seq, Source};
use crate::nn::{
    AbsolutePositions, Activation, AttnMask, Decoder, DecoderState, Dropout, Encoder, Init,
    InitScheme, LayerConfig, LayerOptions, Linear, Masks, MlpKind, NeedWeights, NormKind,
    PositionalKind, Rope, RopeLayout, TokenEmbedding, VarPath, VarStore,
};
use crate::{Error, Result};

/// Configuration of an encoder-decoder model; saved as `config.json` beside the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderDecoderConfig {
    /// Source vocabulary size.
    pub src_vocab_size: usize,
    /// Target vocabulary size.
    pub tgt_vocab_size: usize,
    /// Width of every layer's input and output.
    pub d_model: usize,
    /// Attention heads per layer.
    pub n_heads: usize,
    /// Inner width of the feed-forward blocks.
    pub d_ff: usize,
    /// Encoder layers.
    pub n_encoder_layers: usize,
    /// Decoder layers.
    pub n_decoder_layers: usize,
    /// Dropout on embeddings, sub-layer outputs, attention weights and the feed-forward inside.
    pub dropout: f64,
    /// Feed-forward non-linearity.
    #[serde(default)]
    pub activation: Activation,
    /// Pre-norm layers instead of the paper's post-norm.
    #[serde(default)]
    pub norm_first: bool,
    /// Layer norm epsilon.
    #[serde(default = "super::default_eps")]
    pub layer_norm_eps: f64,
    /// Biases in linear and norm layers.
    #[serde(default = "super::default_true")]
    pub bias: bool,
    /// Longest sequence the positional encoding covers.
    pub max_len: usize,
    /// Sinusoidal (paper) or learned positions.
    #[serde(default)]
    pub positional: PositionalKind,
    /// One embedding table for source and target (needs equal vocabularies).
    #[serde(default)]
    pub share_embeddings: bool,
    /// Output projection shares the target embedding matrix (paper §3.4).
    #[serde(default)]
    pub tie_output: bool,
    /// Layer norms after the encoder and decoder stacks (`nn.Transformer` has them).
    #[serde(default = "super::default_true")]
    pub final_norm: bool,
    /// Multiply embeddings by √d_model (paper §3.4).
    #[serde(default = "super::default_true")]
    pub scale_embeddings: bool,
    /// Parameter initialization.
    #[serde(default)]
    pub init: InitScheme,
    /// Initialize the token embeddings from normal(0, this std) instead of `init`'s scheme.
    /// tensor2tensor and fairseq use d_model^-0.5, so that the scaled embeddings (×√d_model)
    /// start at unit scale, above the positional encodings; with Xavier's much smaller values a
    /// joint, shared and tied vocabulary let the output softmax pull every source-only token
    /// the same way and the encoder learned to ignore positions (issue 4, BENCHMARKS.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_init_std: Option<f64>,
    /// RoPE base frequency (with `positional = "rope"`, applied in encoder and decoder
    /// self-attention).
    #[serde(
        default = "super::default_theta",
        skip_serializing_if = "super::is_default_theta"
    )]
    pub rope_theta: f64,
    /// Layer norm (default) or RMS norm (Llama).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub norm: NormKind,
    /// RMS norms scale by `1 + weight` (Gemma).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub norm_unit_offset: bool,
    /// Plain (default) or gated feed-forward (`gated` with `silu`: Llama's SwiGLU).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub mlp: MlpKind,
    /// Key/value heads for grouped-query attention (default: n_heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    /// Width of each attention head (default: d_model / n_heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Norms over each head's queries and keys (Gemma 3).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub qk_norm: bool,
    /// Which coordinates RoPE rotates together: `half_split` (Hugging Face) or `interleaved`
    /// (Llama-architecture GGUF files).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub rope_layout: RopeLayout,
}

impl EncoderDecoderConfig {
    /// The paper's base model (Table 3): d_model 512, 8 heads, d_ff 2048, 6+6 layers, dropout 0.1,
    /// shared source/target vocabulary with tied output projection.
    pub fn base(vocab_size: usize) -> Self {
        EncoderDecoderConfig {
            src_vocab_size: vocab_size,
            tgt_vocab_size: vocab_size,
            d_model: 512,
            n_heads: 8,
            d_ff: 2048,
            n_encoder_layers: 6,
            n_decoder_layers: 6,
            dropout: 0.1,
            activation: Activation::Relu,
            norm_first: false,
            layer_norm_eps: 1e-5,
            bias: true,
            max_len: 1024,
            positional: PositionalKind::Sinusoidal,
            share_embeddings: true,
            tie_output: true,
            final_norm: true,
            scale_embeddings: true,
            init: InitScheme::XavierUniform,
            embed_init_std: None,
            rope_theta: super::default_theta(),
            norm: NormKind::LayerNorm,
            norm_unit_offset: false,
            mlp: MlpKind::Plain,
            n_kv_heads: None,
            head_dim: None,
            qk_norm: false,
            rope_layout: RopeLayout::HalfSplit,
        }
    }

    /// The paper's big model: d_model 1024, 16 heads, d_ff 4096, dropout 0.3.
    pub fn big(vocab_size: usize) -> Self {
        EncoderDecoderConfig {
            d_model: 1024,
            n_heads: 16,
            d_ff: 4096,
            dropout: 0.3,
            ..Self::base(vocab_size)
        }
    }

    /// A small model for tests and demos: d_model 64, 4 heads, d_ff 128, 2+2 layers.
    pub fn tiny(vocab_size: usize) -> Self {
        EncoderDecoderConfig {
            d_model: 64,
            n_heads: 4,
            d_ff: 128,
            n_encoder_layers: 2,
            n_decoder_layers: 2,
            max_len: 256,
            ..Self::base(vocab_size)
        }
    }

    /// The named presets: `base`, `big`, `tiny`.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        match name {
            "base" => Ok(Self::base(vocab_size)),
            "big" => Ok(Self::big(vocab_size)),
            "tiny" => Ok(Self::tiny(vocab_size)),
            _ => Err(Error::Config(format!(
                "unknown encoder-decoder preset {name:?} (known: base, big, tiny)"
            ))),
        }
    }

    pub fn layer(&self) -> LayerConfig {
        LayerConfig {
            d_model: self.d_model,
            n_heads: self.n_heads,
            d_ff: self.d_ff,
            dropout: self.dropout,
            activation: self.activation,
            norm_first: self.norm_first,
            layer_norm_eps: self.layer_norm_eps,
            bias: self.bias,
            ffn_dropout: None,
            norm: self.norm,
            norm_unit_offset: self.norm_unit_offset,
            mlp: self.mlp,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            qk_norm: self.qk_norm,
            post_norm: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.layer().validate()?;
        if self.src_vocab_size == 0 || self.tgt_vocab_size == 0 {
            return Err(Error::invalid(
                "src_vocab_size and tgt_vocab_size",
                "> 0",
                format!("{} and {}", self.src_vocab_size, self.tgt_vocab_size),
            ));
        }
        if self.max_len == 0 {
            return Err(Error::invalid("max_len", "> 0", "0"));
        }
        if self.share_embeddings && self.src_vocab_size != self.tgt_vocab_size {
            return Err(Error::invalid(
                "src_vocab_size and tgt_vocab_size with share_embeddings",
                "equal (share_embeddings needs src_vocab_size == tgt_vocab_size)",
                format!("{} and {}", self.src_vocab_size, self.tgt_vocab_size),
            ));
        }
        if let Some(std) = self.embed_init_std {
            // Above 10 (the usual values are d_model^-0.5 and 1) the embeddings are so large
            // that the first update diverges, and the error would blame the learning rate.
            if !std.is_finite() || std <= 0.0 || std > 10.0 {
                return Err(Error::invalid(
                    "embed_init_std",
                    "in (0, 10]",
                    crate::validate::show(std),
                ));
            }
        }
        let head_dim = self.layer().mha().head_width();
        if self.positional == PositionalKind::Rope && !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                "the head width (head_dim, or d_model / n_heads) with RoPE positions",
                "even",
                head_dim.to_string(),
            ));
        }
        Ok(())
    }
}

/// The encoder-decoder Transformer.
///
/// Parameter names: `src_embed.weight`, `tgt_embed.weight` (absent when shared),
/// `src_pos.weight`/`tgt_pos.weight` (learned positions), `encoder.*`, `decoder.*`,
/// `generator.{weight,bias}` (absent when tied).
pub struct EncoderDecoder {
    cfg: EncoderDecoderConfig,
    src_embed: TokenEmbedding,
    tgt_embed: Option<TokenEmbedding>,
    src_pos: Option<AbsolutePositions>,
    tgt_pos: Option<AbsolutePositions>,
    /// Rotary positions of both stacks' self-attention, with `positional = "rope"`.
    rope: Option<Rope>,
    encoder: Encoder,
    decoder: Decoder,
    generator: Option<Linear>,
    dropout: Dropout,
}

/// Incremental decoding state: per-layer caches and the number of target positions so far.
pub struct DecodeState {
    pub decoder: DecoderState,
    pub position: usize,
}

impl DecodeState {
    /// Keep only the batch rows in `indices` (beam search).
    pub fn select_rows(&mut self, indices: &Tensor) -> Result<()> {
        self.decoder.select_rows(indices)
    }
}

impl EncoderDecoder {
    pub fn new(cfg: &EncoderDecoderConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let scale = cfg.scale_embeddings;
        let embed_init = match cfg.embed_init_std {
            Some(std) => Init::Normal { std },
            None => Init::Weight { residual: false },
        };
        let src_embed = TokenEmbedding::with_init(
            cfg.src_vocab_size,
            cfg.d_model,
            scale,
            embed_init,
            &vp.pp("src_embed"),
        )?;
        let tgt_embed = if cfg.share_embeddings {
            None
        } else {
            Some(TokenEmbedding::with_init(
                cfg.tgt_vocab_size,
                cfg.d_model,
                scale,
                embed_init,
                &vp.pp("tgt_embed"),
            )?)
        };
        let positions = |name: &str| -> Result<Option<AbsolutePositions>> {
            match cfg.positional {
                PositionalKind::Sinusoidal => Ok(Some(AbsolutePositions::sinusoidal(
                    cfg.max_len,
                    cfg.d_model,
                    vp,
                )?)),
                PositionalKind::Learned => Ok(Some(AbsolutePositions::learned(
                    cfg.max_len,
                    cfg.d_model,
                    &vp.pp(name),
                )?)),
                PositionalKind::None | PositionalKind::Rope => Ok(None),
            }
        };
        let src_pos = positions("src_pos")?;
        let tgt_pos = positions("tgt_pos")?;
        let layer = cfg.layer();
        let encoder = Encoder::new(
            &layer,
            cfg.n_encoder_layers,
            cfg.final_norm,
            &vp.pp("encoder"),
        )?;
        let decoder = Decoder::new(
            &layer,
            cfg.n_decoder_layers,
            cfg.final_norm,
            &vp.pp("decoder"),
        )?;
        let generator = if cfg.tie_output {
            None
        } else {
            Some(Linear::new(
                cfg.d_model,
                cfg.tgt_vocab_size,
                cfg.bias,
                false,
                &vp.pp("generator"),
            )?)
        };
        let rope = match cfg.positional {
            PositionalKind::Rope => Some(
                Rope::new(
                    layer.mha().head_width(),
                    cfg.max_len,
                    cfg.rope_theta,
                    vp.dtype(),
                    vp.device(),
                )?
                .with_layout(cfg.rope_layout),
            ),
            _ => None,
        };
        Ok(EncoderDecoder {
            cfg: cfg.clone(),
            src_embed,
            tgt_embed,
            src_pos,
            tgt_pos,
            rope,
            encoder,
            decoder,
            generator,
            dropout: vp.dropout(cfg.dropout)?,
        })
    }

    /// A freshly initialized model with its parameter store.
    pub fn init(
        cfg: &EncoderDecoderConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarStore)> {
        FamilyConfig::init(cfg, dtype, device, seed)
    }

    /// Load `config.json` and `model.safetensors` from a directory (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, VarStore)> {
        let (model, vs, _) = EncoderDecoderConfig::load(dir, device, DType::F32)?;
        Ok((model, vs))
    }

    pub fn config(&self) -> &EncoderDecoderConfig {
        &self.cfg
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    fn tgt_embed(&self) -> &TokenEmbedding {
        self.tgt_embed.as_ref().unwrap_or(&self.src_embed)
    }

    fn embed(
        &self,
        ids: &Tensor,
        embed: &TokenEmbedding,
        pos: Option<&AbsolutePositions>,
        offset: usize,
        train: bool,
    ) -> Result<Tensor> {
        let x = embed.forward(ids)?;
        let x = match pos {
            Some(p) => p.forward(&x, offset)?,
            None => x,
        };
        self.dropout.forward(&x, train)
    }

    /// Encode source ids into the memory.
    ///
    /// # Shapes
    /// `src`: (B, S) ids, `src_key_padding`: (B, S) → memory (B, S, E)
    pub fn encode(&self, src: &Tensor, src_masks: &Masks, train: bool) -> Result<Tensor> {
        let x = self.embed(src, &self.src_embed, self.src_pos.as_ref(), 0, train)?;
        self.encoder
            .forward_with(&x, src_masks, &self.layer_options(train), None)
    }

    fn layer_options(&self, train: bool) -> LayerOptions<'_> {
        LayerOptions {
            train,
            rope: self.rope.as_ref(),
            ..Default::default()
        }
    }

    /// Project decoder states to vocabulary logits.
    ///
    /// # Shapes
    /// `x`: (B, T, E) → (B, T, V)
    pub fn generate_logits(&self, x: &Tensor) -> Result<Tensor> {
        match &self.generator {
            Some(g) => g.forward(x),
            None => self.tgt_embed().as_linear().forward(x),
        }
    }

    /// Decode target ids (teacher forcing) against the memory. `tgt_masks` normally has
    /// `causal: true`.
    ///
    /// # Shapes
    /// `tgt`: (B, T) ids, `memory`: (B, S, E) → logits (B, T, V)
    pub fn decode(
        &self,
        tgt: &Tensor,
        memory: &Tensor,
        tgt_masks: &Masks,
        memory_masks: &Masks,
        train: bool,
    ) -> Result<Tensor> {
        let y = self.embed(tgt, self.tgt_embed(), self.tgt_pos.as_ref(), 0, train)?;
        let opts = self.layer_options(train);
        let y = self
            .decoder
            .forward_with(&y, memory, tgt_masks, memory_masks, &opts, None)?;
        self.generate_logits(&y.x)
    }

    /// Full forward pass with padding masks from the given key-padding masks and a causal
    /// target mask.
    ///
    /// # Shapes
    /// `src`: (B, S), `tgt`: (B, T), `src_pad`: (B, S), `tgt_pad`: (B, T) → logits (B, T, V)
    pub fn forward(
        &self,
        src: &Tensor,
        tgt: &Tensor,
        src_pad: Option<&AttnMask>,
        tgt_pad: Option<&AttnMask>,
        train: bool,
    ) -> Result<Tensor> {
        let src_masks = Masks::none().with_key_padding(src_pad);
        let memory = self.encode(src, &src_masks, train)?;
        let tgt_masks = Masks::causal().with_key_padding(tgt_pad);
        self.decode(tgt, &memory, &tgt_masks, &src_masks, train)
    }

    /// A fresh incremental decoding state for `memory` (B, S, E).
    pub fn start_decoding(&self, memory: &Tensor) -> Result<DecodeState> {
        Ok(DecodeState {
            decoder: self.decoder.start_state(memory)?,
            position: 0,
        })
    }

    /// Decode the next target tokens given the cached state, returning logits for them and,
    /// when requested, every layer's cross-attention weights.
    ///
    /// # Shapes
    /// `tgt_new`: (B, T_new) ids, `memory_pad`: (B, S) → logits (B, T_new, V)
    pub fn decode_step(
        &self,
        tgt_new: &Tensor,
        memory: &Tensor,
        memory_pad: Option<&AttnMask>,
        state: &mut DecodeState,
        need_weights: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (_, t_new) = tgt_new.dims2()?;
        let y = self.embed(
            tgt_new,
            self.tgt_embed(),
            self.tgt_pos.as_ref(),
            state.position,
            false,
        )?;
        let opts = LayerOptions {
            need_weights,
            ..self.layer_options(false)
        };
        let out = self.decoder.forward_with(
            &y,
            memory,
            &Masks::causal(),
            &Masks::none().with_key_padding(memory_pad),
            &opts,
            Some(&mut state.decoder),
        )?;
        state.position += t_new;
        Ok((self.generate_logits(&out.x)?, out.cross_weights))
    }
}

impl FamilyConfig for EncoderDecoderConfig {
    type Model = EncoderDecoder;
    const NAME: &'static str = "encoder_decoder";
    const PRESETS: &'static [&'static str] = &["base", "big", "tiny"];
    const VOCAB_KEYS: &'static [&'static str] = &["src_vocab_size", "tgt_vocab_size"];

    fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        EncoderDecoderConfig::preset(name, vocab_size)
    }
    fn validate(&self) -> Result<()> {
        EncoderDecoderConfig::validate(self)
    }
    fn init_scheme(&self) -> InitScheme {
        self.init
    }
    fn n_layers(&self) -> usize {
        self.n_encoder_layers + self.n_decoder_layers
    }
    fn build(&self, vp: &VarPath) -> Result<EncoderDecoder> {
        EncoderDecoder::new(self, vp)
    }
    fn erase(model: EncoderDecoder) -> Model {
        Model::Seq2Seq(Box::new(model))
    }
}

impl Seq2Seq for EncoderDecoder {
    fn src_vocab_size(&self) -> usize {
        self.cfg.src_vocab_size
    }
    fn tgt_vocab_size(&self) -> usize {
        self.cfg.tgt_vocab_size
    }
    fn max_len(&self) -> usize {
        self.cfg.max_len
    }
    fn d_model(&self) -> usize {
        self.cfg.d_model
    }
    fn n_heads(&self) -> usize {
        self.cfg.n_heads
    }
    fn n_decoder_layers(&self) -> usize {
        self.cfg.n_decoder_layers
    }
    fn encode(&self, src: Source, train: bool) -> Result<Tensor> {
        match src {
            Source::Tokens { ids, padding } => {
                EncoderDecoder::encode(self, ids, &Masks::none().with_key_padding(padding), train)
            }
            Source::Features { x, .. } => Err(Error::shape(
                "encoder-decoder source",
                "(B, S) token ids (this model embeds tokens, not features)",
                x.dims(),
            )),
        }
    }
    fn decode(
        &self,
        tgt: &Tensor,
        memory: &Tensor,
        tgt_masks: &Masks,
        memory_masks: &Masks,
        train: bool,
    ) -> Result<Tensor> {
        EncoderDecoder::decode(self, tgt, memory, tgt_masks, memory_masks, train)
    }
    fn start_decoding(&self, memory: &Tensor) -> Result<DecodeState> {
        EncoderDecoder::start_decoding(self, memory)
    }
    fn decode_step(
        &self,
        tgt_new: &Tensor,
        memory: &Tensor,
        memory_pad: Option<&AttnMask>,
        state: &mut DecodeState,
        need_weights: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        EncoderDecoder::decode_step(self, tgt_new, memory, memory_pad, state, need_weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (mean, std) of a tensor's elements.
    fn moments(t: &Tensor) -> (f64, f64) {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    /// Regression test for issue 4: with Xavier-initialized shared embeddings the Multi30k model
    /// never learned to attend to the source; `embed_init_std` gives the tensor2tensor/fairseq
    /// initialization, and leaving it out keeps the old configs and checkpoints as they were.
    #[test]
    fn embed_init_std_draws_the_embeddings_from_that_normal() {
        let base = EncoderDecoderConfig {
            share_embeddings: false,
            ..EncoderDecoderConfig::tiny(500)
        };
        let xavier = (6.0f64 / (500.0 + 64.0)).sqrt() / 3f64.sqrt();
        let (_, vs) = EncoderDecoder::init(&base, DType::F32, &Device::Cpu, 1).unwrap();
        let (_, std) = moments(&vs.get("src_embed.weight").unwrap());
        assert!(
            (std - xavier).abs() < 0.1 * xavier,
            "{std} vs Xavier {xavier}"
        );
        let json = serde_json::to_string(&base).unwrap();
        assert!(
            !json.contains("embed_init_std"),
            "absent unless set: {json}"
        );

        let cfg = EncoderDecoderConfig {
            embed_init_std: Some(0.125),
            ..base.clone()
        };
        let (_, vs) = EncoderDecoder::init(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
        for name in ["src_embed.weight", "tgt_embed.weight"] {
            let (mean, std) = moments(&vs.get(name).unwrap());
            assert!(
                mean.abs() < 0.01 && (std - 0.125).abs() < 0.005,
                "{name}: {mean} {std}"
            );
        }
        let back: EncoderDecoderConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);

        for bad in [0.0, -1.0, f64::NAN] {
            let cfg = EncoderDecoderConfig {
                embed_init_std: Some(bad),
                ..base.clone()
            };
            assert!(cfg
                .validate()
                .unwrap_err()
                .to_string()
                .contains("embed_init_std"));
        }
    }
}
