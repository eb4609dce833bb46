//! Choosing the next token from logits: temperature, top-k and nucleus (top-p) filtering.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::Result;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Divides the logits; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[serde(default)]
    pub top_p: Option<f64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Every field in range ([`crate::validate`]): temperature 0 or at least
    /// [`crate::validate::MIN_TEMPERATURE`], top_k >= 1, top_p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        crate::validate::temperature("temperature", self.temperature)?;
        if let Some(k) = self.top_k {
            crate::validate::at_least_one("top_k", k as u64)?;
        }
        if let Some(p) = self.top_p {
            crate::validate::in_open_closed("top_p", p, 0.0, 1.0)?;
        }
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Set every logit below the k-th largest to -inf (ties with the k-th are kept, as in
/// nanoGPT's `logits[logits < v[:, [-1]]] = -inf`).
pub fn filter_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for x in logits.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus filtering: keep the most likely tokens until their cumulative probability reaches
/// `p` (the token that crosses it is kept; at least one is always kept); -inf for the rest.
pub fn filter_top_p(logits: &mut [f32], p: f64) {
    if p >= 1.0 || logits.is_empty() {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut cum = 0.0f64;
    let mut keep = vec![false; logits.len()];
    for &i in &order {
        keep[i] = true;
        cum += probs[i];
        if cum >= p {
            break;
        }
    }
    for (x, k) in logits.iter_mut().zip(keep) {
        if !k {
            *x = f32::NEG_INFINITY;
        }
    }
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Choose the next token from one row of logits.
pub fn sample_token(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature == 0.0 {
        return argmax(logits);
    }
    // (x - max) / T rather than x / T: the largest logit becomes exactly 0 and the others
    // negative, so a small temperature can only push them to -inf (probability 0), never to
    // +inf, whose softmax is inf - inf = NaN.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut l: Vec<f32> = logits
        .iter()
        .map(|&x| ((x as f64 - max) / s.temperature) as f32)
        .collect();
    if let Some(k) = s.top_k {
        filter_top_k(&mut l, k);
    }
    if let Some(p) = s.top_p {
        filter_top_p(&mut l, p);
    }
    let probs = softmax(&l);
    let u = rng.uniform();
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return i as u32;
        }
    }
    // Rounding left u above the total: the last token with non-zero probability.
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_argmax() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut rng = Rng::new(0);
        for _ in 0..10 {
            assert_eq!(sample_token(&logits, &Sampling::greedy(), &mut rng), 1);
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let mut l = [1.0, 5.0, 3.0, 4.0, 2.0];
        filter_top_k(&mut l, 2);
        let ninf = f32::NEG_INFINITY;
        assert_eq!(l, [ninf, 5.0, ninf, 4.0, ninf]);
        let mut rng = Rng::new(1);
        let s = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
        };
        for _ in 0..200 {
            let t = sample_token(&[1.0, 5.0, 3.0, 4.0, 2.0], &s, &mut rng);
            assert!(t == 1 || t == 3, "sampled {t}");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (logits are their logs)
        let base = [0.5f32.ln(), 0.25f32.ln(), 0.125f32.ln(), 0.125f32.ln()];
        let mut l = base;
        filter_top_p(&mut l, 0.7);
        assert!(l[0].is_finite() && l[1].is_finite());
        assert!(l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
        let mut l = base;
        filter_top_p(&mut l, 0.4);
        assert!(l[0].is_finite() && l[1..].iter().all(|x| *x == f32::NEG_INFINITY));
        // Sampling frequencies follow the renormalized nucleus: 2/3 and 1/3.
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.7),
        };
        let mut rng = Rng::new(2);
        let n = 30_000;
        let zeros = (0..n)
            .filter(|_| sample_token(&base, &s, &mut rng) == 0)
            .count();
        let f = zeros as f64 / n as f64;
        assert!((f - 2.0 / 3.0).abs() < 0.02, "frequency {f}");
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let bad = [
            Sampling {
                temperature: -1.0,
                ..Default::default()
            },
            Sampling {
                top_k: Some(0),
                ..Default::default()
            },
            Sampling {
                top_p: Some(0.0),
                ..Default::default()
            },
            Sampling {
                top_p: Some(1.5),
                ..Default::default()
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
    }
}
