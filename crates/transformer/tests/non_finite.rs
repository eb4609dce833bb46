//! Issue 15: non-finite numbers are errors, never silent output. A model whose weights hold a
//! NaN (a diverged run) must make generation, seq2seq decoding and evaluation fail by name,
//! instead of decoding token 0 or reporting a loss of `null`; a tiny temperature must not
//! overflow sampling.

use candle_core::{DType, Device};
use transformer::decode::{
    generate, sample_token, translate_batch, GenerateOptions, Sampling, Seq2SeqDecodeOptions,
    SpecialTokens,
};
use transformer::models::{DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig};
use transformer::nn::VarStore;
use transformer::rng::Rng;
use transformer::train::eval::evaluate_lm;

/// Set every value of the parameter `name` to NaN.
fn poison(vs: &VarStore, name: &str) {
    let var = vs
        .get(name)
        .unwrap_or_else(|| panic!("no parameter {name}"));
    let nan = (var.as_tensor().ones_like().unwrap() * f64::NAN).unwrap();
    var.set(&nan).unwrap();
}

#[test]
fn nan_weights_stop_generation_and_evaluation() {
    let cfg = DecoderOnlyConfig::tiny(11);
    let (model, vs) = DecoderOnly::init(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    poison(&vs, "norm.weight");
    for sampling in [Sampling::greedy(), Sampling::default()] {
        let opts = GenerateOptions {
            max_new_tokens: 4,
            sampling,
            ..Default::default()
        };
        let mut tokens = Vec::new();
        let e = generate(
            &model,
            &[1, 2],
            &opts,
            &Device::Cpu,
            &mut Rng::new(1),
            |t| {
                tokens.push(t);
                Ok(true)
            },
        )
        .expect_err("NaN logits were decoded")
        .to_string();
        assert!(e.contains("non-finite logit"), "{e}");
        assert!(tokens.is_empty(), "tokens were emitted: {tokens:?}");
    }
    let text: Vec<u32> = (0..40).map(|i| i % 11).collect();
    let e = evaluate_lm(&model, &text, 4, &Device::Cpu)
        .expect_err("a NaN loss was reported")
        .to_string();
    assert!(e.contains("not finite"), "{e}");
}

#[test]
fn nan_weights_stop_seq2seq_decoding() {
    let cfg = EncoderDecoderConfig::tiny(20);
    let (model, vs) = EncoderDecoder::init(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    poison(&vs, "decoder.norm.weight");
    let ids = SpecialTokens {
        pad: 0,
        bos: 1,
        eos: 2,
    };
    for beam in [1, 3] {
        let opts = Seq2SeqDecodeOptions {
            beam_size: beam,
            ..Default::default()
        };
        let e = translate_batch(&model, &[vec![5, 6, 7]], ids, &opts, &Device::Cpu)
            .expect_err("NaN logits were decoded")
            .to_string();
        assert!(e.contains("non-finite logit"), "beam {beam}: {e}");
    }
}

#[test]
fn the_smallest_temperature_samples_the_argmax_without_nan() {
    // Large logits: at T = 1e-4, logits / T alone overflows f32 (4e34 / 1e-4 = 4e38 > 3.4e38),
    // and inf - inf in the softmax is NaN. The argmax is not token 0, where NaN used to land.
    let logits = [-4e34f32, 0.0, 4e34, 3.9e34];
    let s = Sampling {
        temperature: transformer::validate::MIN_TEMPERATURE,
        ..Default::default()
    };
    s.validate().unwrap();
    let mut rng = Rng::new(9);
    for _ in 0..20 {
        assert_eq!(sample_token(&logits, &s, &mut rng), 2);
    }
    let tiny = Sampling {
        temperature: 1e-38,
        ..Default::default()
    };
    let e = tiny.validate().unwrap_err().to_string();
    assert!(e.contains("temperature") && e.contains("greedy"), "{e}");
}
