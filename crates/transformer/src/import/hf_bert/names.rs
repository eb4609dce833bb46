//! Hugging Face BERT parameter names → ours (the table in the [module docs](super)), and the
//! strict renaming of a whole state dict.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::import::strict::StrictRename;
use crate::Result;

/// Where one of our parameters comes from in a Hugging Face state dict (names without prefix).
enum HfSource {
    /// One tensor; the alternatives are tried in order (`LayerNorm.weight` or `.gamma`).
    One(Vec<String>),
    /// Query, key and value stacked along dim 0 into our packed `in_proj`.
    Qkv([String; 3]),
}

/// The Hugging Face tensor(s) holding our parameter `ours`, or None for a parameter that no
/// BERT checkpoint has.
fn hf_source(ours: &str) -> Option<HfSource> {
    let one = |n: String| Some(HfSource::One(vec![n]));
    // LayerNorm parameters: `weight`/`bias`, or `gamma`/`beta` in TensorFlow-era checkpoints.
    let norm = |module: &str, leaf: &str| {
        let old = if leaf == "weight" { "gamma" } else { "beta" };
        Some(HfSource::One(vec![
            format!("{module}.LayerNorm.{leaf}"),
            format!("{module}.LayerNorm.{old}"),
        ]))
    };
    let parts: Vec<&str> = ours.split('.').collect();
    match parts.as_slice() {
        ["embed", "tok", "weight"] => one("embeddings.word_embeddings.weight".into()),
        ["embed", "pos", "weight"] => one("embeddings.position_embeddings.weight".into()),
        ["embed", "type", "weight"] => one("embeddings.token_type_embeddings.weight".into()),
        ["embed", "norm", leaf] => norm("embeddings", leaf),
        ["pooler", leaf] => one(format!("pooler.dense.{leaf}")),
        ["layers", n, rest @ ..] => {
            let l = format!("encoder.layer.{n}");
            match rest {
                ["self_attn", "in_proj", leaf] => Some(HfSource::Qkv(
                    ["query", "key", "value"].map(|p| format!("{l}.attention.self.{p}.{leaf}")),
                )),
                ["self_attn", "out_proj", leaf] => {
                    one(format!("{l}.attention.output.dense.{leaf}"))
                }
                ["norm1", leaf] => norm(&format!("{l}.attention.output"), leaf),
                ["ff", "linear1", leaf] => one(format!("{l}.intermediate.dense.{leaf}")),
                ["ff", "linear2", leaf] => one(format!("{l}.output.dense.{leaf}")),
                ["norm2", leaf] => norm(&format!("{l}.output"), leaf),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The prefix of the BERT body in a state dict: `bert.` for `BertFor*` checkpoints, or none.
fn body_prefix(hf: &HashMap<String, Tensor>) -> &'static str {
    if hf.keys().any(|k| k.starts_with("bert.embeddings.")) {
        "bert."
    } else {
        ""
    }
}

/// Whether the state dict holds BERT's pooler (`pooler.dense.weight`, with or without the
/// `bert.` prefix): the model that receives it must then be built with one.
pub fn has_pooler(hf: &HashMap<String, Tensor>) -> bool {
    let prefix = body_prefix(hf);
    hf.contains_key(&format!("{prefix}pooler.dense.weight"))
}

/// Whether `name` (without prefix) belongs to the BERT body rather than to a task head.
fn in_body(name: &str) -> bool {
    ["embeddings.", "encoder.", "pooler."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Rename a Hugging Face BERT state dict into our parameter names, for the parameters
/// `params` (name, shape) of the model that will receive it. Strict: every parameter must be
/// found with its shape, and every tensor of the BERT body must be used; errors name the
/// Hugging Face tensor, the expected and the actual shape. Tensors are converted to f32.
pub fn map_state_dict(
    hf: &HashMap<String, Tensor>,
    params: &[(String, Vec<usize>)],
    source_name: &str,
) -> Result<HashMap<String, Tensor>> {
    let prefix = body_prefix(hf);
    let full = |names: &[String]| -> Vec<String> {
        names.iter().map(|n| format!("{prefix}{n}")).collect()
    };
    let mut r = StrictRename::new(hf, source_name);
    let out = r.rename_all(params, "BERT", hf_source, |r, source, shape| match source {
        HfSource::One(names) => r.take(&full(&names), shape),
        // in_proj is (3E, E) / (3E): each of q, k, v is a third of dim 0.
        HfSource::Qkv(names) => r.take_stacked(&names.map(|n| Some(full(&[n]))), shape),
    })?;
    // Task heads (outside the body) are not ours to load.
    r.finish(
        |k| {
            k.strip_prefix(prefix)
                .is_none_or(|n| !in_body(n) || n == "embeddings.position_ids")
        },
        "the model",
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::models::{EncoderOnly, EncoderOnlyConfig};

    fn names(ours: &str) -> Vec<String> {
        match hf_source(ours) {
            Some(HfSource::One(n)) => n,
            Some(HfSource::Qkv(n)) => n.to_vec(),
            None => vec![],
        }
    }

    #[test]
    fn every_parameter_has_its_hugging_face_name() {
        assert_eq!(
            names("embed.tok.weight"),
            ["embeddings.word_embeddings.weight"]
        );
        assert_eq!(
            names("embed.norm.bias"),
            ["embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta"]
        );
        assert_eq!(
            names("layers.3.self_attn.in_proj.weight"),
            [
                "encoder.layer.3.attention.self.query.weight",
                "encoder.layer.3.attention.self.key.weight",
                "encoder.layer.3.attention.self.value.weight",
            ]
        );
        assert_eq!(
            names("layers.0.norm1.weight"),
            [
                "encoder.layer.0.attention.output.LayerNorm.weight",
                "encoder.layer.0.attention.output.LayerNorm.gamma",
            ]
        );
        assert_eq!(
            names("layers.11.ff.linear1.bias"),
            ["encoder.layer.11.intermediate.dense.bias"]
        );
        assert_eq!(
            names("layers.1.ff.linear2.weight"),
            ["encoder.layer.1.output.dense.weight"]
        );
        assert_eq!(names("pooler.weight"), ["pooler.dense.weight"]);
        assert!(names("classifier.weight").is_empty());
        // Every parameter of a BERT-shaped model is covered.
        let cfg = EncoderOnlyConfig::tiny(10);
        let (_, vs) = EncoderOnly::init(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
        for (name, _) in vs.vars() {
            assert!(!names(&name).is_empty(), "{name} has no Hugging Face name");
        }
    }
}
