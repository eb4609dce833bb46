//! Exact evaluation of a language model on a token stream: the mean cross-entropy over all
//! non-overlapping windows of `block_size` tokens covering it (each token predicted from the
//! tokens before it in its window), so the figure is repeatable rather than a random sample.

use candle_core::{DType, Device, Tensor};

use super::loss::{cross_entropy, CrossEntropyConfig};
use crate::data::{eval_windows, EvalWindow};
use crate::models::CausalLm;
use crate::{Error, Result};

/// Loss and perplexity of a text.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LmEval {
    /// Mean cross-entropy per predicted token (nats).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Tokens predicted.
    pub tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
}

/// Evaluate `model` on `tokens`, `batch_size` windows at a time.
pub fn evaluate_lm(
    model: &dyn CausalLm,
    tokens: &[u32],
    batch_size: usize,
    device: &Device,
) -> Result<LmEval> {
    let block = model.context_length();
    if tokens.len() < 2 {
        return Err(Error::msg(format!(
            "the text has {} tokens; evaluation needs at least 2",
            tokens.len()
        )));
    }
    let windows: Vec<_> = eval_windows(tokens, block)?.collect();
    let plain = CrossEntropyConfig::default();
    let (mut sum, mut count) = (0.0f64, 0usize);
    // Full windows in batches; the shorter last window on its own.
    let (full, rest): (Vec<&EvalWindow>, Vec<&EvalWindow>) =
        windows.iter().partition(|w| w.len() == block);
    let mut run = |inputs: Vec<u32>, targets: Vec<u32>, b: usize, t: usize| -> Result<()> {
        let x = Tensor::from_vec(inputs, (b, t), device)?;
        let y = Tensor::from_vec(targets, (b, t), device)?;
        let logits = model.forward(&x, false)?;
        let loss = cross_entropy(&logits, &y, &plain)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        sum += loss * (b * t) as f64;
        count += b * t;
        Ok(())
    };
    for chunk in full.chunks(batch_size.max(1)) {
        let inputs = chunk
            .iter()
            .flat_map(|w| w.inputs.iter().copied())
            .collect();
        let targets = chunk
            .iter()
            .flat_map(|w| w.targets.iter().copied())
            .collect();
        run(inputs, targets, chunk.len(), block)?;
    }
    for w in rest {
        run(w.inputs.to_vec(), w.targets.to_vec(), 1, w.len())?;
    }
    let loss = sum / count as f64;
    // A NaN here would print as `"loss": null` with exit 0.
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            what: "evaluation".into(),
            tensor: format!("the loss ({loss})"),
            advice: "the model's logits are not finite on this text; its weights are probably \
                     from a diverged training run"
                .into(),
        });
    }
    Ok(LmEval {
        loss,
        perplexity: loss.exp(),
        tokens: count,
        windows: windows.len(),
    })
}
