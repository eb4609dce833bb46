//! Autoregressive generation from a decoder-only model, P(y_i | y_<i), one token at a time.

use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor};

use super::sampling::{sample_token, Sampling};
use crate::kernels::on_pool;
use crate::models::CausalLm;
use crate::nn::BatchKvCache;
use crate::rng::Rng;
use crate::{Error, Result};

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Reuse keys/values of earlier positions (the default); false recomputes the whole context
    /// at every step, as nanoGPT samples.
    pub use_cache: bool,
    /// What happens when the prompt and the new tokens outgrow the context window.
    pub overflow: Overflow,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 100,
            sampling: Sampling::default(),
            use_cache: true,
            overflow: Overflow::Slide,
        }
    }
}

/// When prompt + new tokens exceed the model's context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Keep the most recent tokens: a prompt is cut to its last `context` tokens, and when
    /// the cache fills, it restarts from the last half of the window.
    #[default]
    Slide,
    /// Refuse, before generating anything, with an error that gives the lengths.
    Fail,
}

/// Timing of a generation run.
#[derive(Debug, Clone, Copy)]
pub struct GenerateStats {
    /// Tokens of the prompt the model read (after sliding, at most the context length).
    pub prompt_tokens: usize,
    /// Time to read the prompt and produce the first token's logits.
    pub prompt_seconds: f64,
    pub new_tokens: usize,
    /// Forward passes after the prompt's (one per new token but the first).
    pub decode_steps: usize,
    pub decode_seconds: f64,
    /// Everything, sampling included.
    pub seconds: f64,
}

impl GenerateStats {
    /// New tokens per second overall (prompt included).
    pub fn tokens_per_sec(&self) -> f64 {
        self.new_tokens as f64 / self.seconds.max(1e-9)
    }

    /// Prompt processing speed.
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_seconds.max(1e-9)
    }

    /// Generation speed: decoding steps per second, as llama.cpp's "eval" rate counts them.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_steps as f64 / self.decode_seconds.max(1e-9)
    }
}

fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let (_, t, _) = logits.dims3()?;
    Ok(logits
        .i((0, t - 1))?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

fn ids_tensor(ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Generate up to `opts.max_new_tokens` tokens after `prompt`, calling `on_token` with each
/// new token as soon as it is chosen (return `false` from it to stop early).
///
/// The context slides when it outgrows the model's `block_size`: without the cache the last
/// `block_size` tokens are fed at every step (nanoGPT); with the cache, when it is full the
/// last half window is encoded afresh and decoding continues from there, so that the cost stays
/// linear. Within one window both paths see exactly the same context.
///
/// The loop runs on a thread of rayon's pool ([`on_pool`]), `on_token` included: a decoding
/// step is a few hundred small kernels, and each started from outside the pool would cost two
/// thread hand-offs (SmolLM2 on 2 threads: 42 → 70 tokens/s).
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &candle_core::Device,
    rng: &mut Rng,
    on_token: impl FnMut(u32) -> Result<bool> + Send,
) -> Result<(Vec<u32>, GenerateStats)> {
    on_pool(|| generate_here(model, prompt, opts, device, rng, on_token))
}

/// The checks shared by [`generate`] and [`generate_many`]: sampling options, a non-empty
/// prompt, and prompt + new tokens within `block` when `opts.overflow` is `Fail` (or, when
/// the prompt cannot slide, whenever the prompt alone is longer).
fn check_request(
    prompt: &[u32],
    opts: &GenerateOptions,
    block: usize,
    prompt_slides: bool,
) -> Result<()> {
    opts.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::msg(
            "the prompt is empty: generation needs at least one token",
        ));
    }
    let too_long = prompt.len() + opts.max_new_tokens > block;
    if too_long && (opts.overflow == Overflow::Fail || (!prompt_slides && prompt.len() > block)) {
        return Err(Error::input(
            "prompt and new tokens",
            format!("at most the context length {block} in all"),
            format!(
                "{} prompt tokens + {} new tokens",
                prompt.len(),
                opts.max_new_tokens
            ),
        ));
    }
    Ok(())
}

fn generate_here(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &candle_core::Device,
    rng: &mut Rng,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<(Vec<u32>, GenerateStats)> {
    let block = model.context_length();
    check_request(prompt, opts, block, true)?;
    let start = Instant::now();
    let mut tokens = prompt.to_vec();
    let mut caches = model.new_cache();
    let prompt_tokens = tokens.len().min(block);
    let mut prompt_seconds = 0.0;
    let mut logits = Vec::new();
    if opts.use_cache && opts.max_new_tokens > 0 {
        let from = tokens.len() - prompt_tokens;
        logits = last_logits(
            &model.forward_cached_last(&ids_tensor(&tokens[from..], device)?, &mut caches)?,
        )?;
        prompt_seconds = start.elapsed().as_secs_f64();
    }
    let mut produced = 0;
    let mut decode_steps = 0;
    let mut decode_seconds = 0.0;
    for step in 0..opts.max_new_tokens {
        if !opts.use_cache {
            let t0 = Instant::now();
            let from = tokens.len().saturating_sub(block);
            logits = last_logits(&model.forward(&ids_tensor(&tokens[from..], device)?, false)?)?;
            if step == 0 {
                prompt_seconds = t0.elapsed().as_secs_f64();
            } else {
                decode_steps += 1;
                decode_seconds += t0.elapsed().as_secs_f64();
            }
        }
        crate::validate::check_finite_logits(&format!("generating token {}", step + 1), &logits)?;
        let next = sample_token(&logits, &opts.sampling, rng);
        tokens.push(next);
        produced += 1;
        if !on_token(next)? || step + 1 == opts.max_new_tokens {
            break;
        }
        if opts.use_cache {
            let t0 = Instant::now();
            let cached = caches.first().map_or(0, |c| c.len());
            let x = if cached + 1 > block {
                for c in caches.iter_mut() {
                    c.clear();
                }
                let keep = (block / 2).max(1);
                ids_tensor(&tokens[tokens.len() - keep..], device)?
            } else {
                ids_tensor(&[next], device)?
            };
            logits = last_logits(&model.forward_cached_last(&x, &mut caches)?)?;
            decode_steps += 1;
            decode_seconds += t0.elapsed().as_secs_f64();
        }
    }
    let stats = GenerateStats {
        prompt_tokens,
        prompt_seconds,
        new_tokens: produced,
        decode_steps,
        decode_seconds,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((tokens, stats))
}

/// `n` completions of one prompt decoded together (OpenAI's `n`, Hugging Face's
/// `num_return_sequences`): the prompt is read once, its caches copied for each completion,
/// and every step runs the `n` rows in one batch ([`CausalLm::forward_batch_last`]), so each
/// weight is read once per step for all of them. Completion `i` samples with
/// `Rng::new(seed + i)`; a completion ends at a `stop` token (included) or after
/// `opts.max_new_tokens`, and all end at the context length (the context does not slide).
///
/// Returns each completion's new tokens; `new_tokens` in the stats counts all of them and
/// `decode_steps` the batched steps.
pub fn generate_many(
    model: &dyn CausalLm,
    prompt: &[u32],
    n: usize,
    opts: &GenerateOptions,
    stop: &[u32],
    device: &candle_core::Device,
    seed: u64,
) -> Result<(Vec<Vec<u32>>, GenerateStats)> {
    on_pool(|| generate_many_here(model, prompt, n, opts, stop, device, seed))
}

fn generate_many_here(
    model: &dyn CausalLm,
    prompt: &[u32],
    n: usize,
    opts: &GenerateOptions,
    stop: &[u32],
    device: &candle_core::Device,
    seed: u64,
) -> Result<(Vec<Vec<u32>>, GenerateStats)> {
    if n == 0 {
        return Err(Error::input("completions", "at least 1", "0"));
    }
    let block = model.context_length();
    // The prompt itself cannot slide here: it is read once for all completions.
    check_request(prompt, opts, block, false)?;
    let start = Instant::now();
    let mut rngs: Vec<Rng> = (0..n as u64)
        .map(|i| Rng::new(seed.wrapping_add(i)))
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        prompt_seconds: 0.0,
        new_tokens: 0,
        decode_steps: 0,
        decode_seconds: 0.0,
        seconds: 0.0,
    };
    if opts.max_new_tokens > 0 {
        let mut caches = model.new_cache();
        let logits =
            last_logits(&model.forward_cached_last(&ids_tensor(prompt, device)?, &mut caches)?)?;
        crate::validate::check_finite_logits("generating token 1", &logits)?;
        stats.prompt_seconds = start.elapsed().as_secs_f64();
        // Row r of the batch is completion live[r].
        let mut batch = BatchKvCache::new(caches.len());
        let mut live = Vec::new();
        for (i, (o, rng)) in out.iter_mut().zip(&mut rngs).enumerate() {
            let next = sample_token(&logits, &opts.sampling, rng);
            o.push(next);
            if !stop.contains(&next) && opts.max_new_tokens > 1 {
                batch.push(caches.clone())?;
                live.push(i);
            }
        }
        while !live.is_empty() && prompt.len() + out[live[0]].len() <= block {
            let t0 = Instant::now();
            let last: Vec<u32> = live.iter().map(|&i| *out[i].last().unwrap()).collect();
            let ids = Tensor::new(last.as_slice(), device)?.unsqueeze(1)?;
            let logits = model.forward_batch_last(&ids, &mut batch)?;
            stats.decode_steps += 1;
            for r in (0..live.len()).rev() {
                let i = live[r];
                let row = logits.i((r, 0))?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let what = format!(
                    "generating token {} of completion {}",
                    out[i].len() + 1,
                    i + 1
                );
                crate::validate::check_finite_logits(&what, &row)?;
                let next = sample_token(&row, &opts.sampling, &mut rngs[i]);
                out[i].push(next);
                if stop.contains(&next) || out[i].len() == opts.max_new_tokens {
                    batch.remove(r)?;
                    live.remove(r);
                }
            }
            stats.decode_seconds += t0.elapsed().as_secs_f64();
        }
    }
    stats.new_tokens = out.iter().map(Vec::len).sum();
    stats.seconds = start.elapsed().as_secs_f64();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{DecoderOnly, DecoderOnlyConfig};
    use crate::nn::PositionalKind;
    use candle_core::Device;

    fn run(model: &DecoderOnly, prompt: &[u32], n: usize, cache: bool, s: Sampling) -> Vec<u32> {
        let opts = GenerateOptions {
            max_new_tokens: n,
            sampling: s,
            use_cache: cache,
            ..Default::default()
        };
        let mut rng = Rng::new(5);
        generate(model, prompt, &opts, &Device::Cpu, &mut rng, |_| Ok(true))
            .unwrap()
            .0
    }

    #[test]
    fn cache_gives_the_same_tokens_as_recomputing() -> Result<()> {
        for positional in [PositionalKind::Learned, PositionalKind::Rope] {
            let cfg = DecoderOnlyConfig {
                positional,
                ..DecoderOnlyConfig::tiny(11)
            };
            let (model, _) = DecoderOnly::init(&cfg, DType::F32, &Device::Cpu, 3)?;
            let prompt = [1u32, 4, 2];
            let n = cfg.block_size - prompt.len();
            for s in [
                Sampling::greedy(),
                Sampling {
                    temperature: 0.8,
                    top_k: Some(5),
                    top_p: Some(0.9),
                },
            ] {
                let a = run(&model, &prompt, n, true, s.clone());
                let b = run(&model, &prompt, n, false, s);
                assert_eq!(a, b, "{positional:?}");
                assert_eq!(a.len(), prompt.len() + n);
            }
        }
        Ok(())
    }

    #[test]
    fn long_generation_slides_the_window() -> Result<()> {
        let cfg = DecoderOnlyConfig::tiny(7);
        let (model, _) = DecoderOnly::init(&cfg, DType::F32, &Device::Cpu, 1)?;
        let long_prompt: Vec<u32> = (0..50).map(|i| i % 7).collect();
        for cache in [true, false] {
            let out = run(&model, &long_prompt, 40, cache, Sampling::greedy());
            assert_eq!(out.len(), 90);
            assert!(out.iter().all(|&t| t < 7));
        }
        let mut rng = Rng::new(0);
        let e = generate(
            &model,
            &[],
            &GenerateOptions::default(),
            &Device::Cpu,
            &mut rng,
            |_| Ok(true),
        )
        .unwrap_err();
        assert!(e.to_string().contains("prompt is empty"));
        // Failing instead of sliding: refused before anything is generated.
        let opts = GenerateOptions {
            max_new_tokens: 40,
            overflow: Overflow::Fail,
            ..Default::default()
        };
        let mut calls = 0;
        let e = generate(&model, &long_prompt, &opts, &Device::Cpu, &mut rng, |_| {
            calls += 1;
            Ok(true)
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("context length 32") && e.contains("50 prompt tokens"),
            "{e}"
        );
        assert_eq!(calls, 0);
        // No new tokens: the prompt comes back, the model is never run.
        let opts = GenerateOptions {
            max_new_tokens: 0,
            ..Default::default()
        };
        let (out, stats) = generate(&model, &[1, 2], &opts, &Device::Cpu, &mut rng, |_| {
            calls += 1;
            Ok(true)
        })?;
        assert_eq!((out, stats.new_tokens, calls), (vec![1, 2], 0, 0));
        Ok(())
    }

    /// Completions decoded together equal each decoded alone with its own seed (sampled and
    /// greedy), end at a stop token or at the context length, and bad requests are errors.
    #[test]
    fn many_completions_equal_each_alone() -> Result<()> {
        let cfg = DecoderOnlyConfig {
            positional: PositionalKind::Rope,
            ..DecoderOnlyConfig::tiny(11)
        };
        let (model, _) = DecoderOnly::init(&cfg, candle_core::DType::F64, &Device::Cpu, 4)?;
        let prompt = [1u32, 5, 2];
        for temperature in [0.0, 1.0] {
            let opts = GenerateOptions {
                max_new_tokens: 9,
                sampling: Sampling {
                    temperature,
                    ..Default::default()
                },
                ..Default::default()
            };
            let (many, stats) = generate_many(&model, &prompt, 3, &opts, &[], &Device::Cpu, 40)?;
            assert_eq!(stats.new_tokens, 27);
            assert_eq!(stats.decode_steps, 8);
            for (i, got) in many.iter().enumerate() {
                let mut rng = Rng::new(40 + i as u64);
                let (all, _) =
                    generate(&model, &prompt, &opts, &Device::Cpu, &mut rng, |_| Ok(true))?;
                assert_eq!(
                    got,
                    &all[prompt.len()..].to_vec(),
                    "T {temperature}, completion {i}"
                );
            }
            if temperature > 0.0 {
                assert!(
                    many[0] != many[1] || many[1] != many[2],
                    "seeds must differ"
                );
            }
        }
        // A stop token ends its completion (kept), the others go on.
        let opts = GenerateOptions {
            max_new_tokens: 20,
            sampling: Sampling {
                temperature: 1.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let (free, _) = generate_many(&model, &prompt, 4, &opts, &[], &Device::Cpu, 1)?;
        let stop = free[0][2];
        let (stopped, _) = generate_many(&model, &prompt, 4, &opts, &[stop], &Device::Cpu, 1)?;
        for (f, s) in free.iter().zip(&stopped) {
            let end = f.iter().position(|&t| t == stop).map_or(f.len(), |p| p + 1);
            assert_eq!(s, &f[..end].to_vec());
        }
        // The context (32) ends every completion: after 3 prompt tokens, 29 new ones are fed
        // back and a 30th comes from the last position.
        let long = GenerateOptions {
            max_new_tokens: 100,
            ..opts.clone()
        };
        let (capped, _) = generate_many(&model, &prompt, 2, &long, &[], &Device::Cpu, 1)?;
        assert!(
            capped.iter().all(|c| c.len() == 30),
            "{:?}",
            capped.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let fail = GenerateOptions {
            overflow: Overflow::Fail,
            ..long
        };
        assert!(generate_many(&model, &prompt, 2, &fail, &[], &Device::Cpu, 1).is_err());
        assert!(generate_many(&model, &prompt, 0, &opts, &[], &Device::Cpu, 1).is_err());
        assert!(generate_many(&model, &[], 2, &opts, &[], &Device::Cpu, 1).is_err());
        Ok(())
    }
}
