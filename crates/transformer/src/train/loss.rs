//! Cross-entropy loss with label smoothing and an ignore index, from differentiable candle ops.
//!
//! Dimension legend: `N` rows (tokens), `V` vocabulary (classes), `B` batch, `T` time.
//!
//! On CPU f32/f64 the fused kernel (`kernels::cross_entropy`) computes it in one pass each
//! way. Elsewhere the log-softmax is composed of plain ops (max-subtract, `exp`, `sum`, `log`)
//! on purpose: candle's fused `softmax_last_dim` records no backward, so a loss built on it
//! would silently stop the gradient.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::autograd::ops;
use crate::kernels::Kernels;
use crate::{Error, Result};

/// Options of [`cross_entropy`], mirroring `torch.nn.functional.cross_entropy` with
/// `reduction='mean'` and no class weights.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossEntropyConfig {
    /// Label smoothing `ε` in `[0, 1]` (`label_smoothing`; the paper uses 0.1): the target
    /// distribution is `(1 - ε)` on the target class plus `ε / V` on every class.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Targets equal to this id (typically the padding id) contribute nothing, and the mean is
    /// taken over the other targets only (`ignore_index`).
    #[serde(default)]
    pub ignore_index: Option<u32>,
    /// The fused kernel or the composed ops (not a setting of the loss itself: the model's).
    #[serde(skip)]
    pub kernels: Kernels,
}

/// Mean cross-entropy between `logits` and integer class `targets`, as
/// `torch.nn.functional.cross_entropy(logits, targets, ignore_index=.., label_smoothing=ε)`:
///
/// `loss_i = (1 - ε) * (-log p_i[t_i]) + ε * mean_c(-log p_i[c])`, averaged over the rows whose
/// target is not `ignore_index`. If every target is ignored the result is NaN (0 / 0), as in
/// PyTorch.
///
/// # Shapes
/// - `logits`: `(N, V)` or `(B, T, V)`, a float dtype.
/// - `targets`: `(N,)` or `(B, T)` respectively, `u32`, each in `0..V` unless ignored.
/// - returns a scalar (rank-0) tensor of the logits' dtype, differentiable w.r.t. `logits`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    cfg: &CrossEntropyConfig,
) -> Result<Tensor> {
    let eps = cfg.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::Config(format!(
            "cross_entropy: label_smoothing must be in [0, 1], got {eps}"
        )));
    }
    if targets.dtype() != DType::U32 {
        return Err(Error::msg(format!(
            "cross_entropy: targets must be u32, got {:?}",
            targets.dtype()
        )));
    }
    let (logits, targets) = match logits.rank() {
        2 => (logits.clone(), targets.clone()),
        3 => {
            let (b, t, v) = logits.dims3()?;
            if targets.dims() != [b, t] {
                return Err(Error::shape(
                    "cross_entropy targets",
                    format!("({b}, {t}) to match logits (B, T, V) = ({b}, {t}, {v})"),
                    targets.dims(),
                ));
            }
            // (B, T, V) -> (B*T, V); (B, T) -> (B*T,)
            (ops::reshape(logits, (b * t, v))?, targets.flatten_all()?)
        }
        _ => {
            return Err(Error::shape(
                "cross_entropy logits",
                "(N, V) or (B, T, V)",
                logits.dims(),
            ))
        }
    };
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(Error::shape(
            "cross_entropy targets",
            format!("({n},) to match logits (N, V) = ({n}, {v})"),
            targets.dims(),
        ));
    }

    if cfg.kernels.applies(&logits) {
        let per_row = crate::kernels::cross_entropy::cross_entropy_rows(
            &logits,
            &targets,
            eps,
            cfg.ignore_index,
        )?; // (N,), 0 on ignored rows
        let count = match cfg.ignore_index {
            Some(ignore) => targets
                .ne(ignore)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?,
            None => n as f64,
        };
        // 0 / 0 = NaN when every target is ignored, as in PyTorch.
        return Ok(ops::affine(&ops::sum_all(&per_row)?, 1.0 / count, 0.0)?);
    }

    // Log-softmax over V. Subtracting the row max is exact (log-softmax is shift invariant), so
    // the max is detached: no gradient needs to flow through it.
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let shifted = logits.broadcast_sub(&max)?; // (N, V)
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let log_p = shifted.broadcast_sub(&log_sum_exp)?; // (N, V)

    // Ignored rows may hold an id outside 0..V (any padding id): gather at 0 instead and mask
    // the row out afterwards.
    let keep = match cfg.ignore_index {
        Some(ignore) => Some(targets.ne(ignore)?), // (N,) u8, 1 = keep
        None => None,
    };
    let gather_ids = match &keep {
        Some(keep) => keep.where_cond(&targets, &targets.zeros_like()?)?,
        None => targets,
    };
    let nll = log_p
        .gather(&gather_ids.unsqueeze(1)?, 1)? // (N, 1)
        .squeeze(1)?
        .neg()?; // (N,)
    let per_row = if eps > 0.0 {
        let smooth = log_p.mean(D::Minus1)?.neg()?; // (N,)
        ((nll * (1.0 - eps))? + (smooth * eps)?)?
    } else {
        nll
    };

    match keep {
        // `where_cond` rather than a multiply by the mask, so that a non-finite loss on an
        // ignored row (e.g. `-inf` logits) cannot turn the sum into NaN.
        Some(keep) => {
            let zeros = per_row.zeros_like()?;
            let total = keep.where_cond(&per_row, &zeros)?.sum_all()?; // ()
            let count = keep.to_dtype(per_row.dtype())?.sum_all()?; // ()
            Ok(total.div(&count)?)
        }
        None => Ok(per_row.mean_all()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// -log softmax(row)[c] in f64, by hand.
    fn nll_by_hand(row: &[f64], c: usize) -> f64 {
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        lse - row[c]
    }

    fn smooth_by_hand(row: &[f64]) -> f64 {
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        row.iter().map(|x| lse - x).sum::<f64>() / row.len() as f64
    }

    const ROWS: [[f64; 4]; 3] = [
        [1.0, 2.0, 0.5, -1.0],
        [0.0, 0.0, 0.0, 0.0],
        [3.0, -2.0, 1.0, 0.25],
    ];
    const TARGETS: [u32; 3] = [1, 3, 0];

    fn inputs(dtype: DType) -> (Tensor, Tensor) {
        let flat: Vec<f64> = ROWS.iter().flatten().copied().collect();
        let logits = Tensor::from_vec(flat, (3, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let targets = Tensor::new(&TARGETS, &Device::Cpu).unwrap();
        (logits, targets)
    }

    fn scalar(t: &Tensor) -> f64 {
        assert_eq!(t.rank(), 0);
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn plain_matches_hand_computation() {
        let (logits, targets) = inputs(DType::F32);
        let loss = cross_entropy(&logits, &targets, &CrossEntropyConfig::default()).unwrap();
        let expected = (0..3)
            .map(|i| nll_by_hand(&ROWS[i], TARGETS[i] as usize))
            .sum::<f64>()
            / 3.0;
        // Row 1 is uniform: exactly ln 4.
        assert!((nll_by_hand(&ROWS[1], 3) - 4f64.ln()).abs() < 1e-15);
        assert!((scalar(&loss) - expected).abs() < 1e-6, "{}", scalar(&loss));
    }

    #[test]
    fn smoothing_and_ignore_match_hand_computation() {
        let (logits, targets) = inputs(DType::F64);
        let eps = 0.1;
        let per_row = |i: usize| {
            (1.0 - eps) * nll_by_hand(&ROWS[i], TARGETS[i] as usize)
                + eps * smooth_by_hand(&ROWS[i])
        };

        let cfg = CrossEntropyConfig {
            label_smoothing: eps,
            ignore_index: None,
            ..Default::default()
        };
        let loss = scalar(&cross_entropy(&logits, &targets, &cfg).unwrap());
        let expected = (per_row(0) + per_row(1) + per_row(2)) / 3.0;
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");

        // Ignore class 3: row 1 drops out, the mean is over 2 rows.
        let cfg = CrossEntropyConfig {
            label_smoothing: eps,
            ignore_index: Some(3),
            ..Default::default()
        };
        let loss = scalar(&cross_entropy(&logits, &targets, &cfg).unwrap());
        let expected = (per_row(0) + per_row(2)) / 2.0;
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");

        // An ignore id outside 0..V (a padding id beyond the vocabulary) is fine.
        let targets_pad = Tensor::new(&[1u32, 99, 0], &Device::Cpu).unwrap();
        let cfg = CrossEntropyConfig {
            label_smoothing: 0.0,
            ignore_index: Some(99),
            ..Default::default()
        };
        let loss = scalar(&cross_entropy(&logits, &targets_pad, &cfg).unwrap());
        let expected = (nll_by_hand(&ROWS[0], 1) + nll_by_hand(&ROWS[2], 0)) / 2.0;
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");

        // Everything ignored: 0 / 0, as PyTorch.
        let all_pad = Tensor::new(&[99u32, 99, 99], &Device::Cpu).unwrap();
        assert!(scalar(&cross_entropy(&logits, &all_pad, &cfg).unwrap()).is_nan());
    }

    #[test]
    fn batched_input_equals_flattened() {
        // (B, T, V) = (2, 3, 4) built from the 3 rows twice.
        let flat: Vec<f64> = ROWS.iter().chain(ROWS.iter()).flatten().copied().collect();
        let logits = Tensor::from_vec(flat.clone(), (2, 3, 4), &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[1u32, 3, 0], [2, 3, 1]], &Device::Cpu).unwrap();
        let cfg = CrossEntropyConfig {
            label_smoothing: 0.2,
            ignore_index: Some(3),
            ..Default::default()
        };
        let batched = scalar(&cross_entropy(&logits, &targets, &cfg).unwrap());
        let logits2 = Tensor::from_vec(flat, (6, 4), &Device::Cpu).unwrap();
        let targets2 = Tensor::new(&[1u32, 3, 0, 2, 3, 1], &Device::Cpu).unwrap();
        let flat_loss = scalar(&cross_entropy(&logits2, &targets2, &cfg).unwrap());
        assert_eq!(batched, flat_loss);
    }

    #[test]
    fn rejects_bad_inputs() {
        let (logits, targets) = inputs(DType::F32);
        let cfg = CrossEntropyConfig::default();
        let wrong_len = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(matches!(
            cross_entropy(&logits, &wrong_len, &cfg),
            Err(Error::Shape { .. })
        ));
        let as_i64 = targets.to_dtype(DType::I64).unwrap();
        assert!(cross_entropy(&logits, &as_i64, &cfg).is_err());
        let bad_eps = CrossEntropyConfig {
            label_smoothing: 1.5,
            ignore_index: None,
            ..Default::default()
        };
        assert!(matches!(
            cross_entropy(&logits, &targets, &bad_eps),
            Err(Error::Config(_))
        ));
        let logits3 = logits.unsqueeze(0).unwrap(); // (1, 3, 4)
        assert!(matches!(
            cross_entropy(&logits3, &targets, &cfg),
            Err(Error::Shape { .. })
        ));
        // A target out of 0..V is an error on CPU, not a silent wrong loss.
        let oob = Tensor::new(&[1u32, 4, 0], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &oob, &cfg).is_err());
    }

    /// Central finite differences in f64 against the backward pass, with smoothing and an
    /// ignored row so that every branch is checked.
    #[test]
    fn gradient_matches_finite_differences() {
        let (logits, _) = inputs(DType::F64);
        let targets = Tensor::new(&[1u32, 3, 2], &Device::Cpu).unwrap();
        let cfg = CrossEntropyConfig {
            label_smoothing: 0.1,
            ignore_index: Some(3),
            ..Default::default()
        };
        let x = Var::from_tensor(&logits).unwrap();
        let loss = cross_entropy(&x, &targets, &cfg).unwrap();
        let grads = loss.backward().unwrap();
        let grad: Vec<f64> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let base: Vec<f64> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let f = |v: &[f64]| {
            let t = Tensor::from_slice(v, (3, 4), &Device::Cpu).unwrap();
            scalar(&cross_entropy(&t, &targets, &cfg).unwrap())
        };
        let h = 1e-6;
        let mut max_diff = 0f64;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let numeric = (f(&plus) - f(&minus)) / (2.0 * h);
            max_diff = max_diff.max((numeric - grad[i]).abs());
        }
        assert!(max_diff < 1e-8, "max |numeric - backward| = {max_diff:e}");
        // The ignored row (index 1) gets exactly zero gradient.
        assert!(grad[4..8].iter().all(|&g| g == 0.0), "{grad:?}");
        // Rows of a softmax cross-entropy gradient sum to zero.
        let row0: f64 = grad[0..4].iter().sum();
        assert!(row0.abs() < 1e-12);
    }
}
