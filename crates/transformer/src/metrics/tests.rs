//! Parity with sacreBLEU 2.6.0 on `tests/fixtures/bleu/cases.json` (made by
//! `tests/fixtures/gen_bleu.py`): every 13a-tokenized line, and cased and lowercased BLEU and
//! chrF with all their statistics.

use std::path::PathBuf;

use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
struct Fixture {
    sacrebleu_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    hyps: Vec<String>,
    refs: Vec<String>,
    tok13a: Tokenized,
    bleu: RefBleu,
    bleu_lc: RefBleu,
    chrf: RefChrf,
    chrf_lc: RefChrf,
}

#[derive(Deserialize)]
struct Tokenized {
    hyps: Vec<String>,
    refs: Vec<String>,
}

#[derive(Deserialize)]
struct RefBleu {
    score_bits: String,
    precisions_bits: Vec<String>,
    bp_bits: String,
    counts: Vec<usize>,
    totals: Vec<usize>,
    sys_len: usize,
    ref_len: usize,
    formatted: String,
}

#[derive(Deserialize)]
struct RefChrf {
    score_bits: String,
    formatted: String,
}

/// A float stored by the generator as the hex of its IEEE-754 bits (exact, unlike decimal
/// JSON numbers through serde_json's default parser).
fn from_bits(hex: &str) -> f64 {
    f64::from_bits(u64::from_str_radix(hex, 16).expect("fixture float bits are hex"))
}

fn load() -> Fixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bleu/cases.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/gen_bleu.py)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Tracks the largest absolute and relative difference and how many floats were bit-identical.
#[derive(Default)]
struct Diff {
    max_abs: f64,
    max_rel: f64,
    exact: usize,
    n: usize,
}

impl Diff {
    /// Records `ours` against sacreBLEU's `theirs`; fails beyond 1e-9 relative.
    fn check(&mut self, what: &str, ours: f64, theirs: f64) {
        let abs = (ours - theirs).abs();
        let rel = abs / theirs.abs().max(1e-300);
        self.max_abs = self.max_abs.max(abs);
        self.max_rel = self.max_rel.max(if abs == 0.0 { 0.0 } else { rel });
        self.exact += usize::from(ours.to_bits() == theirs.to_bits());
        self.n += 1;
        assert!(
            abs <= 1e-9 * theirs.abs().max(1.0),
            "{what}: ours {ours:?} vs sacreBLEU {theirs:?} (diff {abs:e})"
        );
    }
}

#[test]
fn tokenize_13a_matches_sacrebleu_line_by_line() {
    let fixture = load();
    let mut lines = 0;
    for case in &fixture.cases {
        let raw = case.hyps.iter().chain(&case.refs);
        let expected = case.tok13a.hyps.iter().chain(&case.tok13a.refs);
        for (line, want) in raw.zip(expected) {
            assert_eq!(
                &tokenize_13a(line),
                want,
                "case {}: line {line:?}",
                case.name
            );
            lines += 1;
        }
    }
    println!(
        "13a: {lines} lines identical to sacreBLEU {}",
        fixture.sacrebleu_version
    );
}

#[test]
fn corpus_bleu_matches_sacrebleu() {
    let fixture = load();
    let mut diff = Diff::default();
    for case in &fixture.cases {
        for (lowercase, want) in [(false, &case.bleu), (true, &case.bleu_lc)] {
            let what = format!("case {} (lowercase {lowercase})", case.name);
            let got = corpus_bleu(&case.hyps, &case.refs, lowercase).unwrap();
            assert_eq!(got.counts.to_vec(), want.counts, "{what}: counts");
            assert_eq!(got.totals.to_vec(), want.totals, "{what}: totals");
            assert_eq!(
                (got.sys_len, got.ref_len),
                (want.sys_len, want.ref_len),
                "{what}: sys_len, ref_len"
            );
            diff.check(
                &format!("{what}: score"),
                got.score,
                from_bits(&want.score_bits),
            );
            diff.check(&format!("{what}: bp"), got.bp, from_bits(&want.bp_bits));
            for (n, bits) in want.precisions_bits.iter().enumerate() {
                let what = format!("{what}: precision {}", n + 1);
                diff.check(&what, got.precisions[n], from_bits(bits));
            }
            assert_eq!(got.to_string(), want.formatted, "{what}: formatted");
        }
    }
    println!(
        "BLEU vs sacreBLEU {}: max abs diff {:e}, max rel diff {:e}, {}/{} floats bit-identical",
        fixture.sacrebleu_version, diff.max_abs, diff.max_rel, diff.exact, diff.n
    );
}

#[test]
fn corpus_chrf_matches_sacrebleu() {
    let fixture = load();
    let mut diff = Diff::default();
    for case in &fixture.cases {
        for (lowercase, want) in [(false, &case.chrf), (true, &case.chrf_lc)] {
            let what = format!("case {} (lowercase {lowercase})", case.name);
            let got = corpus_chrf(&case.hyps, &case.refs, lowercase).unwrap();
            diff.check(
                &format!("{what}: chrF"),
                got.score,
                from_bits(&want.score_bits),
            );
            assert_eq!(got.to_string(), want.formatted, "{what}: formatted");
        }
    }
    println!(
        "chrF vs sacreBLEU {}: max abs diff {:e}, max rel diff {:e}, {}/{} scores bit-identical",
        fixture.sacrebleu_version, diff.max_abs, diff.max_rel, diff.exact, diff.n
    );
}

/// The whitespace set equals Python's `str.isspace` over every code point (the list is
/// `[c for c in range(0x110000) if chr(c).isspace()]` from CPython 3.11).
#[test]
fn py_whitespace_is_python_isspace() {
    let python: &[u32] = &[
        0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2000, 0x2001,
        0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029,
        0x202f, 0x205f, 0x3000,
    ];
    let ours: Vec<u32> = (0..=char::MAX as u32)
        .filter_map(char::from_u32)
        .filter(|&c| is_py_whitespace(c))
        .map(u32::from)
        .collect();
    assert_eq!(ours, python);
}
