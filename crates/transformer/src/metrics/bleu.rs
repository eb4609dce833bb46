//! Corpus BLEU (Papineni et al., 2002, "BLEU: a Method for Automatic Evaluation of Machine
//! Translation") exactly as sacreBLEU 2.x computes it by default:
//! `sacrebleu.corpus_bleu(hyps, [refs])`, optionally with `lowercase=True`.
//!
//! Each line is (optionally) lowercased, stripped of trailing whitespace and tokenized with
//! [`tokenize_13a`]. Clipped n-gram matches (`counts`) and hypothesis n-grams (`totals`) for
//! n = 1..4 are summed over the corpus, as are the hypothesis and reference lengths. Then
//!
//! ```text
//! p_n  = 100 * counts[n] / totals[n]                     (in percent)
//! p_n  = 100 / (2^k * totals[n])   if counts[n] == 0     ('exp' smoothing, NIST mteval-v13a;
//!                                                          k counts the zero orders so far)
//! BP   = 1 if sys_len >= ref_len else exp(1 - ref_len / sys_len)   (0 if sys_len == 0)
//! BLEU = BP * exp(sum_n ln(p_n) / 4)
//! ```
//!
//! with sacreBLEU's corner cases: no match of any order gives 0, and an order with no
//! hypothesis n-gram at all (`totals[n] == 0`, a corpus of fewer than 4 tokens) keeps
//! `p_n = 0`, whose log is floored to -9999999999, so BLEU = 0.

use std::collections::HashMap;
use std::fmt;

use super::{check_lengths, is_py_whitespace, maybe_lower, py_split};
use crate::Result;

/// The largest n-gram order BLEU counts (sacreBLEU's `MAX_NGRAM_ORDER`).
pub const MAX_NGRAM_ORDER: usize = 4;

/// sacreBLEU's floor for `ln(0)` (`sacrebleu.utils.my_log`).
const LOG_ZERO: f64 = -9_999_999_999.0;

/// A corpus BLEU score with its statistics; the fields of sacreBLEU's `BLEUScore`.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScore {
    /// BLEU in percent, 0..=100.
    pub score: f64,
    /// Clipped n-gram matches for n = 1..4, summed over the corpus.
    pub counts: [usize; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams for n = 1..4, summed over the corpus.
    pub totals: [usize; MAX_NGRAM_ORDER],
    /// Modified n-gram precisions in percent, after smoothing (all 0 when nothing matched).
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// The brevity penalty, 0..=1.
    pub bp: f64,
    /// Hypothesis tokens in the corpus.
    pub sys_len: usize,
    /// Reference tokens in the corpus.
    pub ref_len: usize,
}

impl BleuScore {
    /// `sys_len / ref_len` (0 when the references are empty), as sacreBLEU reports it.
    pub fn ratio(&self) -> f64 {
        if self.ref_len == 0 {
            0.0
        } else {
            self.sys_len as f64 / self.ref_len as f64
        }
    }
}

/// sacreBLEU's line, e.g.
/// `BLEU = 36.79 100.0/100.0/100.0/100.0 (BP = 0.368 ratio = 0.500 hyp_len = 5 ref_len = 10)`.
impl fmt::Display for BleuScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.precisions;
        write!(
            f,
            "BLEU = {:.2} {:.1}/{:.1}/{:.1}/{:.1} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
            self.score,
            p[0],
            p[1],
            p[2],
            p[3],
            self.bp,
            self.ratio(),
            self.sys_len,
            self.ref_len
        )
    }
}

/// Sufficient statistics of corpus BLEU, for accumulating segment by segment (for instance
/// over validation batches) instead of collecting every line first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BleuStats {
    /// Lowercase both sides before tokenizing (sacreBLEU's `lowercase=True`).
    pub lowercase: bool,
    /// Hypothesis tokens so far.
    pub sys_len: usize,
    /// Reference tokens so far.
    pub ref_len: usize,
    /// Clipped n-gram matches so far, n = 1..4.
    pub counts: [usize; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams so far, n = 1..4.
    pub totals: [usize; MAX_NGRAM_ORDER],
}

impl BleuStats {
    /// Empty statistics; `lowercase` as sacreBLEU's `BLEU(lowercase=...)`.
    pub fn new(lowercase: bool) -> Self {
        Self {
            lowercase,
            ..Self::default()
        }
    }

    /// Adds one hypothesis and its reference (raw, untokenized lines).
    pub fn add(&mut self, hyp: &str, reference: &str) {
        let hyp = preprocess(hyp, self.lowercase);
        let reference = preprocess(reference, self.lowercase);
        let hyp_tokens: Vec<&str> = py_split(&hyp).collect();
        let ref_tokens: Vec<&str> = py_split(&reference).collect();
        self.sys_len += hyp_tokens.len();
        // With one reference, sacreBLEU's "closest reference length" is that reference's.
        self.ref_len += ref_tokens.len();

        let ref_ngrams = count_ngrams(&ref_tokens);
        for (ngram, hyp_count) in count_ngrams(&hyp_tokens) {
            let n = ngram.len() - 1;
            self.totals[n] += hyp_count;
            if let Some(&ref_count) = ref_ngrams.get(ngram) {
                self.counts[n] += hyp_count.min(ref_count);
            }
        }
    }

    /// BLEU from the statistics so far (sacreBLEU's `BLEU.compute_bleu` with smoothing 'exp').
    pub fn score(&self) -> BleuScore {
        let (sys_len, ref_len) = (self.sys_len, self.ref_len);
        let bp = if sys_len >= ref_len {
            1.0
        } else if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        };
        let mut out = BleuScore {
            score: 0.0,
            counts: self.counts,
            totals: self.totals,
            precisions: [0.0; MAX_NGRAM_ORDER],
            bp,
            sys_len,
            ref_len,
        };
        // sacreBLEU returns 0 early when no n-gram of any order matched (its issue #141).
        if self.counts.iter().all(|&c| c == 0) {
            return out;
        }
        let mut smooth = 1.0_f64;
        for n in 0..MAX_NGRAM_ORDER {
            let (correct, total) = (self.counts[n], self.totals[n]);
            if total == 0 {
                break; // this and longer orders keep precision 0
            }
            out.precisions[n] = if correct == 0 {
                smooth *= 2.0;
                100.0 / (smooth * total as f64)
            } else {
                100.0 * correct as f64 / total as f64
            };
        }
        // A plain left-to-right sum, as Python's `sum` of floats before 3.12.
        let mut log_sum = 0.0;
        for &p in &out.precisions {
            log_sum += if p == 0.0 { LOG_ZERO } else { p.ln() };
        }
        out.score = bp * (log_sum / MAX_NGRAM_ORDER as f64).exp();
        out
    }
}

/// Corpus BLEU of `hyps` against `refs` (one reference per hypothesis), equal to
/// `sacrebleu.corpus_bleu(hyps, [refs], lowercase=lowercase)` with sacreBLEU's defaults.
///
/// Errors when the two lists differ in length. An empty corpus scores 0.
pub fn corpus_bleu(
    hyps: &[impl AsRef<str>],
    refs: &[impl AsRef<str>],
    lowercase: bool,
) -> Result<BleuScore> {
    check_lengths("corpus_bleu", hyps.len(), refs.len())?;
    let mut stats = BleuStats::new(lowercase);
    for (hyp, reference) in hyps.iter().zip(refs) {
        stats.add(hyp.as_ref(), reference.as_ref());
    }
    Ok(stats.score())
}

/// sacreBLEU's `BLEU._preprocess_segment`: lowercase, strip trailing whitespace, tokenize.
fn preprocess(line: &str, lowercase: bool) -> String {
    let line = maybe_lower(line, lowercase);
    tokenize_13a(line.trim_end_matches(is_py_whitespace))
}

/// Every n-gram of orders 1..=4 with its count.
fn count_ngrams<'a>(tokens: &'a [&'a str]) -> HashMap<&'a [&'a str], usize> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_NGRAM_ORDER {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// The mteval-v13a tokenizer (sacreBLEU's `Tokenizer13a`), returning tokens joined by single
/// spaces.
///
/// 1. Remove `<skipped>`, join `-\n` line-break hyphens, turn other newlines into spaces, and
///    unescape `&quot;`, `&amp;`, `&lt;`, `&gt;` (in that order, once each).
/// 2. Pad with a space on both sides, then apply mteval's four regex substitutions in order,
///    each a left-to-right pass over non-overlapping matches (see the functions below).
/// 3. Split on whitespace and join with single spaces.
///
/// Periods and commas stay attached between digits (`1,000.5`), a dash is split off only after
/// a digit (`10 - 20` but `well-known`), and apostrophes are never split (`it's`).
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut chars: Vec<char> = Vec::with_capacity(line.len() + 2);
    chars.push(' ');
    chars.extend(line.chars());
    chars.push(' ');

    let chars = split_symbols(&chars);
    let chars = split_period_comma_after_non_digit(&chars);
    let chars = split_period_comma_before_non_digit(&chars);
    let chars = split_dash_after_digit(&chars);

    let text: String = chars.into_iter().collect();
    py_split(&text).collect::<Vec<_>>().join(" ")
}

/// `s/([\{-\~\[-\` -\&\(-\+\:-\@\/])/ $1 /g`: pad ASCII symbols with spaces. The class is
/// every printable ASCII character except letters, digits, `'`, `,`, `-` and `.`.
fn split_symbols(s: &[char]) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() * 2);
    for &c in s {
        let symbol = matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
        if symbol {
            out.extend([' ', c, ' ']);
        } else {
            out.push(c);
        }
    }
    out
}

/// `s/([^0-9])([\.,])/$1 $2 /g`: split a period or comma off what precedes it, unless a digit.
/// Matches are non-overlapping, so in `a.,b` only the `.` is split here.
fn split_period_comma_after_non_digit(s: &[char]) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() * 2);
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        match s.get(i + 1) {
            Some(&p) if !c.is_ascii_digit() && matches!(p, '.' | ',') => {
                out.extend([c, ' ', p, ' ']);
                i += 2;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `s/([\.,])([^0-9])/ $1 $2/g`: split a period or comma off what follows it, unless a digit.
fn split_period_comma_before_non_digit(s: &[char]) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() * 2);
    let mut i = 0;
    while i < s.len() {
        let p = s[i];
        match s.get(i + 1) {
            Some(&c) if matches!(p, '.' | ',') && !c.is_ascii_digit() => {
                out.extend([' ', p, ' ', c]);
                i += 2;
            }
            _ => {
                out.push(p);
                i += 1;
            }
        }
    }
    out
}

/// `s/([0-9])(-)/$1 $2 /g`: split a dash off a preceding digit.
fn split_dash_after_digit(s: &[char]) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() * 2);
    let mut i = 0;
    while i < s.len() {
        let d = s[i];
        if d.is_ascii_digit() && s.get(i + 1) == Some(&'-') {
            out.extend([d, ' ', '-', ' ']);
            i += 2;
        } else {
            out.push(d);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_13a_examples() {
        assert_eq!(tokenize_13a("Hello, world."), "Hello , world .");
        assert_eq!(tokenize_13a("1,000.5 and 3.14"), "1,000.5 and 3.14");
        assert_eq!(tokenize_13a("a.,b"), "a . , b");
        assert_eq!(tokenize_13a("10-20 well-known"), "10 - 20 well-known");
        assert_eq!(tokenize_13a("it's &quot;ok&quot;"), "it's \" ok \"");
        assert_eq!(tokenize_13a("&amp;quot;"), "& quot ;");
        assert_eq!(tokenize_13a("wor-\nld<skipped>!"), "world !");
        assert_eq!(tokenize_13a(""), "");
        assert_eq!(tokenize_13a("a\u{1f}b\u{a0}c"), "a b c");
    }

    #[test]
    fn length_mismatch_names_both_counts() {
        let err = corpus_bleu(&["a", "b"], &["a"], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 hypotheses") && err.contains("1 references"),
            "{err}"
        );
    }

    #[test]
    fn empty_corpus_scores_zero() {
        let none: [&str; 0] = [];
        let s = corpus_bleu(&none, &none, false).unwrap();
        assert_eq!((s.score, s.bp, s.sys_len, s.ref_len), (0.0, 1.0, 0, 0));
    }

    #[test]
    fn stats_accumulate_like_corpus() {
        let hyps = ["the cat sat on the mat", "a dog ran"];
        let refs = ["the cat sat on a mat", "the dog ran away"];
        let mut stats = BleuStats::new(false);
        for (h, r) in hyps.iter().zip(&refs) {
            stats.add(h, r);
        }
        assert_eq!(stats.score(), corpus_bleu(&hyps, &refs, false).unwrap());
    }
}
