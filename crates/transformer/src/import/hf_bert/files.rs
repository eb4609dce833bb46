//! The files of a Hugging Face model directory, and reading its weights: `model.safetensors`
//! (memory-mapped), else `pytorch_model.bin` (torch's zip format, through candle's pickle
//! reader).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// The model's configuration (`"model_type": "bert"`), read by [`HfBertConfig::from_json`].
///
/// [`HfBertConfig::from_json`]: super::HfBertConfig::from_json
pub const HF_CONFIG_FILE: &str = "config.json";
/// The weights in safetensors format, preferred when present.
pub const HF_SAFETENSORS_FILE: &str = "model.safetensors";
/// The weights as `torch.save` wrote them, read when there is no safetensors file.
pub const HF_PYTORCH_FILE: &str = "pytorch_model.bin";
/// The Hugging Face fast tokenizer.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

/// Read the weights of a model directory: `model.safetensors`, else `pytorch_model.bin`.
/// Returns the tensors and the file they came from.
pub fn read_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, PathBuf)> {
    let st = dir.join(HF_SAFETENSORS_FILE);
    if st.is_file() {
        let bad = |e: candle_core::Error| Error::Weights {
            source_name: st.display().to_string(),
            msg: format!("cannot read safetensors: {e}"),
        };
        // Mapped rather than read: reading copied the whole file into a fresh buffer first,
        // and that page faulting and copying was most of `embed`'s start-up time.
        // SAFETY: the mapping is only read, and dropped before this function returns; a model
        // file changed by another process while it loads is not supported.
        let mm = unsafe { candle_core::safetensors::MmapedSafetensors::new(&st) }.map_err(bad)?;
        let mut map = HashMap::new();
        for (name, _) in mm.tensors() {
            let t = mm.load(&name, &Device::Cpu).map_err(bad)?;
            map.insert(name, t);
        }
        return Ok((map, st));
    }
    let pt = dir.join(HF_PYTORCH_FILE);
    if pt.is_file() {
        let list = candle_core::pickle::read_all(&pt).map_err(|e| Error::Weights {
            source_name: pt.display().to_string(),
            msg: format!(
                "cannot read the PyTorch checkpoint (torch.save's zip format of torch >= 1.6 \
                 is supported): {e}"
            ),
        })?;
        return Ok((list.into_iter().collect(), pt));
    }
    let sharded = dir
        .join(format!("{HF_SAFETENSORS_FILE}.index.json"))
        .is_file()
        || dir.join(format!("{HF_PYTORCH_FILE}.index.json")).is_file();
    Err(Error::msg(format!(
        "{}: no {HF_SAFETENSORS_FILE} or {HF_PYTORCH_FILE}{}",
        dir.display(),
        if sharded {
            " (sharded checkpoints with an .index.json are not supported)"
        } else {
            ""
        }
    )))
}
