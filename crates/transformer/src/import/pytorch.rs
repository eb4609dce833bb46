//! PyTorch → ours: parameter names of `nn.MultiheadAttention`, `nn.TransformerEncoderLayer`,
//! `nn.TransformerDecoderLayer` and `nn.Transformer` `state_dict`s, and PyTorch's two boolean
//! mask conventions.
//!
//! | PyTorch                                   | ours                                   |
//! |-------------------------------------------|----------------------------------------|
//! | `*.in_proj_weight` / `*.in_proj_bias`     | `*.in_proj.weight` / `*.in_proj.bias`  |
//! | `*.{q,k,v}_proj_weight` (kdim/vdim ≠ E)   | `*.{q,k,v}_proj.weight`                |
//! | `*.in_proj_bias` (with separate q/k/v)    | split into `*.{q,k,v}_proj.bias`       |
//! | `*.multihead_attn.*`                      | `*.cross_attn.*`                       |
//! | `*.linear1.*`, `*.linear2.*`              | `*.ff.linear1.*`, `*.ff.linear2.*`     |
//! | `out_proj`, `norm1..3`, `encoder.norm`, … | unchanged                              |

use std::collections::HashMap;

use candle_core::Tensor;

use crate::nn::{AttnMask, VarStore};
use crate::{Error, Result};

/// Rename (and where needed split) a PyTorch `state_dict` into our parameter names.
pub fn map_state_dict(torch: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in torch {
        let (prefix, leaf) = match name.rsplit_once('.') {
            Some((p, l)) => (format!("{p}."), l),
            None => (String::new(), name.as_str()),
        };
        let separate = torch.contains_key(&format!("{prefix}q_proj_weight"));
        let mapped: Vec<(String, Tensor)> = match leaf {
            "in_proj_weight" => vec![(format!("{prefix}in_proj.weight"), t.clone())],
            "q_proj_weight" | "k_proj_weight" | "v_proj_weight" => {
                vec![(format!("{prefix}{}.weight", &leaf[..6]), t.clone())]
            }
            "in_proj_bias" if separate => {
                let n = t.dims1()?;
                if n % 3 != 0 {
                    return Err(Error::Weights {
                        source_name: "PyTorch state_dict".into(),
                        msg: format!("{name}: length {n} is not divisible by 3"),
                    });
                }
                let e = n / 3;
                vec![
                    (format!("{prefix}q_proj.bias"), t.narrow(0, 0, e)?),
                    (format!("{prefix}k_proj.bias"), t.narrow(0, e, e)?),
                    (format!("{prefix}v_proj.bias"), t.narrow(0, 2 * e, e)?),
                ]
            }
            "in_proj_bias" => vec![(format!("{prefix}in_proj.bias"), t.clone())],
            _ => vec![(name.clone(), t.clone())],
        };
        for (n, t) in mapped {
            out.insert(rename_modules(&n), t);
        }
    }
    Ok(out)
}

fn rename_modules(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len() + 1);
    for p in parts {
        match p {
            "multihead_attn" => out.push("cross_attn"),
            "linear1" | "linear2" => {
                out.push("ff");
                out.push(p);
            }
            _ => out.push(p),
        }
    }
    out.join(".")
}

/// Load a PyTorch `state_dict` (already read into tensors) into `vs`, strictly.
pub fn load_state_dict(
    vs: &VarStore,
    torch: &HashMap<String, Tensor>,
    source_name: &str,
) -> Result<()> {
    vs.load_map(&map_state_dict(torch)?, source_name)
}

/// A boolean mask in `nn.MultiheadAttention` / `nn.Transformer*`'s convention
/// (True = masked out), for `attn_mask` and `*_key_padding_mask`.
pub fn mha_bool_mask(t: Tensor) -> AttnMask {
    AttnMask::Block(t)
}

/// A boolean mask in `F.scaled_dot_product_attention`'s convention (True = may attend).
pub fn sdpa_bool_mask(t: Tensor) -> AttnMask {
    AttnMask::Allow(t)
}

/// A float mask (either API): added to the scores.
pub fn float_mask(t: Tensor) -> AttnMask {
    AttnMask::Additive(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn names_map_onto_ours() -> Result<()> {
        let z = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let mut m = HashMap::new();
        m.insert(
            "decoder.layers.1.multihead_attn.in_proj_weight".to_string(),
            z(3),
        );
        m.insert("encoder.layers.0.linear1.bias".to_string(), z(3));
        m.insert("attn.q_proj_weight".to_string(), z(2));
        m.insert("attn.in_proj_bias".to_string(), z(6));
        let out = map_state_dict(&m)?;
        let mut keys: Vec<_> = out.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "attn.k_proj.bias",
                "attn.q_proj.bias",
                "attn.q_proj.weight",
                "attn.v_proj.bias",
                "decoder.layers.1.cross_attn.in_proj.weight",
                "encoder.layers.0.ff.linear1.bias",
            ]
        );
        Ok(())
    }
}
