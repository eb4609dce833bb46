//! Corpus chrF (Popović, 2015, "chrF: character n-gram F-score for automatic MT evaluation")
//! exactly as sacreBLEU 2.x computes it by default: `sacrebleu.corpus_chrf(hyps, [refs])`, i.e.
//! chrF2 with character n-grams up to 6, no word n-grams, whitespace ignored, and sacreBLEU's
//! "effective order" averaging (not the eps smoothing of chrF++.py).
//!
//! Whitespace is removed from each line, then character n-grams (over Unicode scalar values)
//! of orders 1..6 are counted. Per order, the hypothesis n-grams (0 when the reference has
//! none of that order), the reference n-grams and the clipped matches are summed over the
//! corpus. Then, over the orders where both sides have n-grams,
//!
//! ```text
//! P = mean_n(matches[n] / hyp[n]),   R = mean_n(matches[n] / ref[n])
//! chrF = 100 * (1 + beta^2) * P * R / (beta^2 * P + R)     (0 when P + R == 0)
//! ```

use std::collections::HashMap;
use std::fmt;

use super::{check_lengths, is_py_whitespace, maybe_lower};
use crate::Result;

/// The largest character n-gram order (sacreBLEU's `CHRF.CHAR_ORDER`).
pub const CHRF_CHAR_ORDER: usize = 6;

/// Recall weighs `beta` times as much as precision (sacreBLEU's `CHRF.BETA`).
pub const CHRF_BETA: f64 = 2.0;

/// A corpus chrF score with its statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct ChrfScore {
    /// chrF2 in percent, 0..=100.
    pub score: f64,
    /// The summed statistics the score was computed from.
    pub stats: ChrfStats,
}

/// sacreBLEU's line, e.g. `chrF2 = 80.80`.
impl fmt::Display for ChrfScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chrF{} = {:.2}", CHRF_BETA, self.score)
    }
}

/// Sufficient statistics of corpus chrF, for accumulating segment by segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChrfStats {
    /// Lowercase both sides first (sacreBLEU's `CHRF(lowercase=True)`).
    pub lowercase: bool,
    /// Hypothesis character n-grams per order 1..6 (counted only where the reference has
    /// n-grams of that order, as sacreBLEU does).
    pub hyp: [usize; CHRF_CHAR_ORDER],
    /// Reference character n-grams per order 1..6.
    pub reference: [usize; CHRF_CHAR_ORDER],
    /// Clipped matches per order 1..6.
    pub matches: [usize; CHRF_CHAR_ORDER],
}

impl ChrfStats {
    /// Empty statistics; `lowercase` as sacreBLEU's `CHRF(lowercase=...)`.
    pub fn new(lowercase: bool) -> Self {
        Self {
            lowercase,
            ..Self::default()
        }
    }

    /// Adds one hypothesis and its reference (raw lines).
    pub fn add(&mut self, hyp: &str, reference: &str) {
        let hyp = chars_without_whitespace(&maybe_lower(hyp, self.lowercase));
        let reference = chars_without_whitespace(&maybe_lower(reference, self.lowercase));
        for n in 1..=CHRF_CHAR_ORDER {
            let hyp_ngrams = count_char_ngrams(&hyp, n);
            let ref_ngrams = count_char_ngrams(&reference, n);
            let mut hyp_count = 0;
            let mut matches = 0;
            for (ngram, &count) in &hyp_ngrams {
                hyp_count += count;
                if let Some(&ref_count) = ref_ngrams.get(ngram) {
                    matches += count.min(ref_count);
                }
            }
            // sacreBLEU does not count hypothesis n-grams of an order the reference lacks.
            if !ref_ngrams.is_empty() {
                self.hyp[n - 1] += hyp_count;
            }
            self.reference[n - 1] += reference.len().saturating_sub(n - 1);
            self.matches[n - 1] += matches;
        }
    }

    /// chrF from the statistics so far (sacreBLEU's `CHRF._compute_f_score`, effective order).
    pub fn score(&self) -> ChrfScore {
        let factor = CHRF_BETA * CHRF_BETA;
        let mut avg_prec = 0.0;
        let mut avg_rec = 0.0;
        let mut effective_order = 0;
        for n in 0..CHRF_CHAR_ORDER {
            let (n_hyp, n_ref, n_match) = (self.hyp[n], self.reference[n], self.matches[n]);
            if n_hyp > 0 && n_ref > 0 {
                avg_prec += n_match as f64 / n_hyp as f64;
                avg_rec += n_match as f64 / n_ref as f64;
                effective_order += 1;
            }
        }
        if effective_order > 0 {
            avg_prec /= effective_order as f64;
            avg_rec /= effective_order as f64;
        }
        let score = if avg_prec + avg_rec != 0.0 {
            // Same operation order as sacreBLEU, so the floats agree to the bit.
            let f = (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec);
            100.0 * f
        } else {
            0.0
        };
        ChrfScore {
            score,
            stats: self.clone(),
        }
    }
}

/// Corpus chrF2 of `hyps` against `refs` (one reference per hypothesis), equal to
/// `sacrebleu.corpus_chrf(hyps, [refs])` (with `lowercase`, `CHRF(lowercase=True)`).
///
/// Errors when the two lists differ in length. An empty corpus scores 0.
pub fn corpus_chrf(
    hyps: &[impl AsRef<str>],
    refs: &[impl AsRef<str>],
    lowercase: bool,
) -> Result<ChrfScore> {
    check_lengths("corpus_chrf", hyps.len(), refs.len())?;
    let mut stats = ChrfStats::new(lowercase);
    for (hyp, reference) in hyps.iter().zip(refs) {
        stats.add(hyp.as_ref(), reference.as_ref());
    }
    Ok(stats.score())
}

/// The line's characters with every (Python) whitespace character removed.
fn chars_without_whitespace(line: &str) -> Vec<char> {
    line.chars().filter(|&c| !is_py_whitespace(c)).collect()
}

/// Counts of the character n-grams of order `n`.
fn count_char_ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut counts = HashMap::new();
    for ngram in chars.windows(n) {
        *counts.entry(ngram).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_is_100_and_disjoint_is_0() {
        let s = corpus_chrf(&["a cat sat"], &["a cat sat"], false).unwrap();
        assert_eq!(s.score, 100.0);
        let s = corpus_chrf(&["xyz"], &["abc"], false).unwrap();
        assert_eq!(s.score, 0.0);
        assert!(corpus_chrf(&["a"], &["a", "b"], false).is_err());
    }

    #[test]
    fn whitespace_is_ignored() {
        let a = corpus_chrf(&["a b c"], &["abc d"], false).unwrap();
        let b = corpus_chrf(&["abc"], &["a b cd"], false).unwrap();
        assert_eq!(a.score, b.score);
    }
}
