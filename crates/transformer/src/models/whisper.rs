//! Whisper (Radford et al. 2022): the paper's encoder-decoder with an audio front end, built
//! from our layers.
//!
//! - Encoder: log-mel frames → two 1-D convolutions with exact GELU (kernel 3, padding 1;
//!   the second with stride 2, halving 3000 frames to 1500 positions) → sinusoidal positions
//!   → pre-norm layers (self-attention, GELU feed-forward) → final layer norm.
//! - Decoder: token embedding (not scaled) + learned positions → pre-norm layers with masked
//!   self-attention, cross-attention over the encoder's memory and a GELU feed-forward →
//!   final layer norm → logits through the token embedding (tied).
//!
//! Attention scales queries and keys each by D^-1/4 in openai-whisper, which is the paper's
//! 1/√D on the product. Keys have no bias in the checkpoints; ours are a zero bias (a key
//! bias adds the same q·b to every score of a query, so softmax ignores it and training
//! leaves it at zero).
//!
//! Dimension letters: `B` batch, `M` mel bins, `N` frames (2·S), `S` encoder positions,
//! `T` target length, `E` d_model, `V` vocabulary.
//!
//! Parameter names: `conv1.*`, `conv2.*`, `encoder_pos.weight`, `encoder.layers.N.*`,
//! `encoder.norm.*`, `embed.weight`, `decoder_pos.weight`, `decoder.layers.N.*`,
//! `decoder.norm.*` (the layers' own names: `self_attn.in_proj` with q, k, v stacked,
//! `self_attn.out_proj`, `cross_attn.*`, `ff.linear{1,2}`, `norm{1,2,3}`).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::encoder_decoder::DecodeState;
use super::family::{FamilyConfig, Model, Seq2Seq, Source};
use crate::nn::{
    whisper_sinusoids, AbsolutePositions, Activation, AttnMask, Conv1d, Decoder, Encoder,
    InitScheme, Kernels, LayerConfig, LayerOptions, Masks, NeedWeights, TokenEmbedding, VarPath,
    VarStore,
};
use crate::{Error, Result};

/// Configuration of a Whisper model, with the names of Hugging Face's `WhisperConfig`;
/// saved as `config.json` beside the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhisperConfig {
    /// Token vocabulary (51,864 for English-only models, 51,865 multilingual, 51,866 large-v3).
    pub vocab_size: usize,
    /// Mel bins of the input (80; 128 for large-v3).
    pub num_mel_bins: usize,
    /// Width of every layer.
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    /// Inner width of the encoder's feed-forward blocks.
    pub encoder_ffn_dim: usize,
    pub decoder_layers: usize,
    pub decoder_attention_heads: usize,
    /// Inner width of the decoder's feed-forward blocks.
    pub decoder_ffn_dim: usize,
    /// Encoder positions (1500: 30 s of 10 ms frames after the stride-2 convolution).
    pub max_source_positions: usize,
    /// Decoder positions (448 tokens).
    pub max_target_positions: usize,
    /// Dropout on embeddings and sub-layer outputs (0 in every released checkpoint).
    #[serde(default)]
    pub dropout: f64,
    /// Layer norm epsilon (PyTorch's default in every checkpoint).
    #[serde(default = "super::default_eps")]
    pub layer_norm_eps: f64,
}

impl WhisperConfig {
    /// The released sizes: `tiny` (384, 6 heads, 4+4 layers), `base` (512, 8, 6+6),
    /// `small` (768, 12, 12+12), `medium` (1024, 16, 24+24), `large` (1280, 20, 32+32).
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        let (d, heads, layers) = match name {
            "tiny" => (384, 6, 4),
            "base" => (512, 8, 6),
            "small" => (768, 12, 12),
            "medium" => (1024, 16, 24),
            "large" => (1280, 20, 32),
            _ => {
                return Err(Error::Config(format!(
                    "unknown whisper preset {name:?} (known: tiny, base, small, medium, large)"
                )))
            }
        };
        Ok(WhisperConfig {
            vocab_size,
            num_mel_bins: 80,
            d_model: d,
            encoder_layers: layers,
            encoder_attention_heads: heads,
            encoder_ffn_dim: 4 * d,
            decoder_layers: layers,
            decoder_attention_heads: heads,
            decoder_ffn_dim: 4 * d,
            max_source_positions: 1500,
            max_target_positions: 448,
            dropout: 0.0,
            layer_norm_eps: 1e-5,
        })
    }

    /// Frames of one input window: the convolutions halve them to `max_source_positions`.
    pub fn n_frames(&self) -> usize {
        2 * self.max_source_positions
    }

    fn layer(&self, heads: usize, d_ff: usize) -> LayerConfig {
        LayerConfig::new(
            self.d_model,
            heads,
            d_ff,
            self.dropout,
            Activation::Gelu,
            true,
            self.layer_norm_eps,
            true,
        )
    }

    pub fn encoder_layer(&self) -> LayerConfig {
        self.layer(self.encoder_attention_heads, self.encoder_ffn_dim)
    }

    pub fn decoder_layer(&self) -> LayerConfig {
        self.layer(self.decoder_attention_heads, self.decoder_ffn_dim)
    }

    pub fn validate(&self) -> Result<()> {
        self.encoder_layer().validate()?;
        self.decoder_layer().validate()?;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("num_mel_bins", self.num_mel_bins),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("max_source_positions", self.max_source_positions),
            ("max_target_positions", self.max_target_positions),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, "> 0", "0"));
            }
        }
        if !self.d_model.is_multiple_of(2) {
            return Err(Error::invalid(
                "d_model",
                "even (sines and cosines of d_model / 2 frequencies)",
                self.d_model.to_string(),
            ));
        }
        Ok(())
    }
}

/// The Whisper model.
pub struct Whisper {
    cfg: WhisperConfig,
    conv1: Conv1d,
    conv2: Conv1d,
    encoder_pos: AbsolutePositions,
    encoder: Encoder,
    embed: TokenEmbedding,
    decoder_pos: AbsolutePositions,
    decoder: Decoder,
    kernels: Kernels,
}

impl Whisper {
    pub fn new(cfg: &WhisperConfig, vp: &VarPath) -> Result<Self> {
        cfg.validate()?;
        let (m, e) = (cfg.num_mel_bins, cfg.d_model);
        let conv1 = Conv1d::new(m, e, 3, 1, 1, true, &vp.pp("conv1"))?;
        let conv2 = Conv1d::new(e, e, 3, 2, 1, true, &vp.pp("conv2"))?;
        let table = whisper_sinusoids(cfg.max_source_positions, e, vp.dtype(), vp.device())?;
        let encoder_pos = AbsolutePositions::learned_from(&table, &vp.pp("encoder_pos"))?;
        let encoder = Encoder::new(
            &cfg.encoder_layer(),
            cfg.encoder_layers,
            true,
            &vp.pp("encoder"),
        )?;
        let embed = TokenEmbedding::new(cfg.vocab_size, e, false, &vp.pp("embed"))?;
        let decoder_pos =
            AbsolutePositions::learned(cfg.max_target_positions, e, &vp.pp("decoder_pos"))?;
        let decoder = Decoder::new(
            &cfg.decoder_layer(),
            cfg.decoder_layers,
            true,
            &vp.pp("decoder"),
        )?;
        Ok(Whisper {
            cfg: cfg.clone(),
            conv1,
            conv2,
            encoder_pos,
            encoder,
            embed,
            decoder_pos,
            decoder,
            kernels: vp.kernels(),
        })
    }

    /// A freshly initialized model with its parameter store.
    pub fn init(
        cfg: &WhisperConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarStore)> {
        FamilyConfig::init(cfg, dtype, device, seed)
    }

    pub fn config(&self) -> &WhisperConfig {
        &self.cfg
    }

    /// Encode log-mel frames into the memory.
    ///
    /// # Shapes
    /// `frames`: (B, N, M) with N ≤ 2·max_source_positions → memory (B, ⌈N/2⌉, E)
    pub fn encode_frames(&self, frames: &Tensor, train: bool) -> Result<Tensor> {
        let dims = frames.dims();
        let (m, n_max) = (self.cfg.num_mel_bins, self.cfg.n_frames());
        if dims.len() != 3 || dims[2] != m || dims[1] == 0 || dims[1] > n_max {
            return Err(Error::shape(
                "whisper input features",
                format!("(B, N ≤ {n_max}, {m}) log-mel frames"),
                dims,
            ));
        }
        // (B, N, M) → (B, M, N)
        let x = frames.transpose(1, 2)?.contiguous()?;
        let x = Activation::Gelu.apply(&self.conv1.forward(&x)?, self.kernels)?;
        let x = Activation::Gelu.apply(&self.conv2.forward(&x)?, self.kernels)?;
        // (B, E, S) → (B, S, E)
        let x = x.transpose(1, 2)?.contiguous()?;
        let x = self.encoder_pos.forward(&x, 0)?;
        let opts = LayerOptions {
            train,
            ..Default::default()
        };
        self.encoder.forward_with(&x, &Masks::none(), &opts, None)
    }

    fn embed_target(&self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let x = self.embed.forward(ids)?;
        self.decoder_pos.forward(&x, offset)
    }

    /// # Shapes
    /// `x`: (B, T, E) → (B, T, V)
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.embed.as_linear().forward(x)
    }
}

impl FamilyConfig for WhisperConfig {
    type Model = Whisper;
    const NAME: &'static str = "whisper";
    const PRESETS: &'static [&'static str] = &["tiny", "base", "small", "medium", "large"];
    const VOCAB_KEYS: &'static [&'static str] = &["vocab_size"];

    fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        WhisperConfig::preset(name, vocab_size)
    }
    fn validate(&self) -> Result<()> {
        WhisperConfig::validate(self)
    }
    fn init_scheme(&self) -> InitScheme {
        InitScheme::XavierUniform
    }
    fn n_layers(&self) -> usize {
        self.encoder_layers + self.decoder_layers
    }
    fn build(&self, vp: &VarPath) -> Result<Whisper> {
        Whisper::new(self, vp)
    }
    fn erase(model: Whisper) -> Model {
        Model::Seq2Seq(Box::new(model))
    }
}

impl Seq2Seq for Whisper {
    fn src_vocab_size(&self) -> usize {
        0
    }
    fn tgt_vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn max_len(&self) -> usize {
        self.cfg.max_target_positions
    }
    fn d_model(&self) -> usize {
        self.cfg.d_model
    }
    fn n_heads(&self) -> usize {
        self.cfg.decoder_attention_heads
    }
    fn n_decoder_layers(&self) -> usize {
        self.cfg.decoder_layers
    }
    fn encode(&self, src: Source, train: bool) -> Result<Tensor> {
        match src {
            Source::Features { x, .. } => self.encode_frames(x, train),
            Source::Tokens { ids, .. } => Err(Error::shape(
                "whisper source",
                "(B, N, M) log-mel frames (Whisper encodes audio, not tokens)",
                ids.dims(),
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
        let y = self.embed_target(tgt, 0)?;
        let opts = LayerOptions {
            train,
            ..Default::default()
        };
        let y = self
            .decoder
            .forward_with(&y, memory, tgt_masks, memory_masks, &opts, None)?;
        self.logits(&y.x)
    }
    fn start_decoding(&self, memory: &Tensor) -> Result<DecodeState> {
        Ok(DecodeState {
            decoder: self.decoder.start_state(memory)?,
            position: 0,
        })
    }
    fn decode_step(
        &self,
        tgt_new: &Tensor,
        memory: &Tensor,
        memory_pad: Option<&AttnMask>,
        state: &mut DecodeState,
        need_weights: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (_, t_new) = tgt_new.dims2()?;
        let y = self.embed_target(tgt_new, state.position)?;
        let opts = LayerOptions {
            need_weights,
            ..Default::default()
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
        Ok((self.logits(&out.x)?, out.cross_weights))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> WhisperConfig {
        WhisperConfig {
            vocab_size: 50,
            num_mel_bins: 8,
            d_model: 16,
            encoder_layers: 2,
            encoder_attention_heads: 2,
            encoder_ffn_dim: 32,
            decoder_layers: 2,
            decoder_attention_heads: 2,
            decoder_ffn_dim: 32,
            max_source_positions: 12,
            max_target_positions: 10,
            dropout: 0.0,
            layer_norm_eps: 1e-5,
        }
    }

    /// Cached decoding, one token at a time, gives the teacher-forced logits.
    #[test]
    fn cached_steps_equal_the_teacher_forced_pass() -> Result<()> {
        let cfg = tiny();
        let (model, _vs) = Whisper::init(&cfg, DType::F64, &Device::Cpu, 3)?;
        let mut rng = crate::rng::Rng::new(5);
        let frames: Vec<f64> = (0..2 * 24 * 8).map(|_| rng.normal()).collect();
        let frames = Tensor::from_vec(frames, (2, 24, 8), &Device::Cpu)?;
        let memory = Seq2Seq::encode(
            &model,
            Source::Features {
                x: &frames,
                padding: None,
            },
            false,
        )?;
        assert_eq!(memory.dims(), &[2, 12, 16]);
        let ids = Tensor::new(&[[1u32, 7, 3, 9, 2], [4, 4, 8, 0, 1]], &Device::Cpu)?;
        let full = Seq2Seq::decode(
            &model,
            &ids,
            &memory,
            &Masks::causal(),
            &Masks::none(),
            false,
        )?;
        let mut state = model.start_decoding(&memory)?;
        for t in 0..5 {
            let (step, _) = model.decode_step(
                &ids.narrow(1, t, 1)?,
                &memory,
                None,
                &mut state,
                NeedWeights::No,
            )?;
            let want = full.narrow(1, t, 1)?;
            let err = (step - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(err < 1e-10, "step {t}: {err}");
        }
        Ok(())
    }

    #[test]
    fn the_encoder_positions_start_as_whisper_sinusoids_and_bad_frames_are_errors() -> Result<()> {
        let cfg = tiny();
        let (model, vs) = Whisper::init(&cfg, DType::F32, &Device::Cpu, 3)?;
        let table = vs.get("encoder_pos.weight").unwrap();
        let want = whisper_sinusoids(12, 16, DType::F32, &Device::Cpu)?;
        let err = (table.as_tensor() - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(err, 0.0);
        // Position 1, frequency 0: sin(1); the cosines start at d_model / 2.
        let v = table.as_tensor().to_vec2::<f32>()?;
        assert!((v[1][0] - 1f32.sin()).abs() < 1e-7 && (v[1][8] - 1f32.cos()).abs() < 1e-7);
        for bad in [(1, 25, 8), (1, 24, 7)] {
            let x = Tensor::zeros(bad, DType::F32, &Device::Cpu)?;
            let e = model.encode_frames(&x, false).unwrap_err().to_string();
            assert!(e.contains("whisper input features"), "{e}");
        }
        Ok(())
    }
}
