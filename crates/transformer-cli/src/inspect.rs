//! `transformer inspect FILE.gguf`: what a GGUF file holds, without loading its weights: the
//! architecture and the model we would build from it, the tensors' quantization types, and
//! the tokenizer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use transformer::import::gguf::GgufFile;

#[derive(Args)]
pub struct InspectArgs {
    /// A GGUF file.
    file: PathBuf,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let path = &args.file;
    let file = GgufFile::open(path)?;
    let size = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    let text = |key: &str| match file.metadata(key) {
        Some(candle_core::quantized::gguf_file::Value::String(s)) => s.clone(),
        _ => "-".to_string(),
    };
    println!(
        "file          {} ({:.1} MB)",
        path.display(),
        size as f64 / 1e6
    );
    println!("name          {}", text("general.name"));
    println!("architecture  {}", file.architecture()?);

    let infos = file.tensor_infos();
    let params: usize = infos
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>())
        .sum();
    println!(
        "tensors       {} ({:.1} M parameters)",
        infos.len(),
        params as f64 / 1e6
    );
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (_, dtype, shape) in &infos {
        let n: usize = shape.iter().product();
        let bytes = n / dtype.block_size() * dtype.type_size();
        let e = by_type.entry(format!("{dtype:?}")).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    for (dtype, (count, bytes)) in &by_type {
        println!(
            "  {dtype:<10}  {count:>4} tensors, {:.1} MB",
            *bytes as f64 / 1e6
        );
    }

    match file.decoder_only_config() {
        Ok(cfg) => {
            let mha = cfg.layer().mha();
            println!(
                "model         decoder_only: {} layers, d_model {}, {} heads / {} KV heads of \
                 {}, d_ff {}, {:?} {:?} MLP, context {}",
                cfg.n_layers,
                cfg.d_model,
                cfg.n_heads,
                mha.kv_heads(),
                mha.head_width(),
                cfg.d_ff,
                cfg.activation,
                cfg.mlp,
                cfg.block_size
            );
            println!(
                "              RoPE θ {} ({:?} pairs){}{}, {} output",
                cfg.rope_theta,
                cfg.rope_layout,
                cfg.rope_local_theta
                    .map(|t| format!(", local θ {t}"))
                    .unwrap_or_default(),
                cfg.sliding_window
                    .map(|w| format!(", sliding window {w}"))
                    .unwrap_or_default(),
                if cfg.tie_embeddings { "tied" } else { "untied" }
            );
        }
        Err(e) => println!("model         not loadable: {e}"),
    }

    match file.tokenizer() {
        Ok(tok) => {
            let name = |id: Option<u32>| {
                id.and_then(|i| tok.id_to_token(i))
                    .unwrap_or_else(|| "-".to_string())
            };
            let bos = file.bos_token_id()?;
            let stop: Vec<String> = file
                .stop_token_ids()?
                .into_iter()
                .map(|i| name(Some(i)))
                .collect();
            println!(
                "tokenizer     {} ({} tokens); BOS {}{}; stops at {}",
                text("tokenizer.ggml.model"),
                tok.vocab_size(),
                name(bos),
                if file.add_bos_token()? {
                    " (prepended)"
                } else {
                    ""
                },
                stop.join(" ")
            );
        }
        Err(e) => println!("tokenizer     not loadable: {e}"),
    }
    println!(
        "chat template {}",
        match file.chat_template()? {
            Some(t) => format!("yes ({} characters)", t.len()),
            None => "no".to_string(),
        }
    );
    Ok(())
}
