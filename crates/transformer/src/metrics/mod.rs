//! Translation metrics, identical to sacreBLEU's defaults (Post, 2018, "A Call for Clarity in
//! Reporting BLEU Scores"):
//!
//! - [`corpus_bleu`]: `sacrebleu.corpus_bleu(hyps, [refs])` (13a tokenization, n-grams up to 4,
//!   brevity penalty, 'exp' smoothing, no effective order), cased or with `lowercase=True`.
//! - [`corpus_chrf`]: `sacrebleu.corpus_chrf(hyps, [refs])` (chrF2: character n-grams up to 6,
//!   no word n-grams, beta = 2).
//! - [`tokenize_13a`]: the mteval-v13a tokenizer BLEU uses.
//!
//! Both metrics take one reference per hypothesis. Scores are on sacreBLEU's 0-100 scale and
//! match sacreBLEU 2.6.0 to the last bit on the checked-in fixtures
//! (`tests/fixtures/gen_bleu.py`).
//!
//! Text is handled as Python handles it, so that scores agree on any input: whitespace is
//! Python's `str.isspace` set ([`is_py_whitespace`]), n-grams of characters are over Unicode
//! scalar values (Python code points), and lowercasing is `str::to_lowercase` (the full Unicode
//! mapping, as `str.lower`; the two can differ only where their Unicode versions do).

pub mod bleu;
pub mod chrf;

pub use bleu::{corpus_bleu, tokenize_13a, BleuScore, BleuStats, MAX_NGRAM_ORDER};
pub use chrf::{corpus_chrf, ChrfScore, ChrfStats, CHRF_BETA, CHRF_CHAR_ORDER};

#[cfg(test)]
mod tests;

/// Python's `str.isspace`: Unicode `White_Space` (Rust's [`char::is_whitespace`]) plus the four
/// ASCII information separators U+001C..U+001F, which Python's `str.split()` and `rstrip()`
/// also treat as whitespace.
pub fn is_py_whitespace(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

/// Python's `s.split()` (no argument): runs of whitespace separate words; no empty words.
pub(crate) fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_whitespace).filter(|w| !w.is_empty())
}

/// Python's `s.lower()` if `lowercase`, else `s` unchanged.
pub(crate) fn maybe_lower(s: &str, lowercase: bool) -> std::borrow::Cow<'_, str> {
    if lowercase {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// The error for hypothesis and reference lists of different lengths.
pub(crate) fn check_lengths(metric: &str, n_hyps: usize, n_refs: usize) -> crate::Result<()> {
    if n_hyps != n_refs {
        crate::bail!(
            "{metric}: got {n_hyps} hypotheses but {n_refs} references; \
             each hypothesis needs exactly one reference"
        );
    }
    Ok(())
}
