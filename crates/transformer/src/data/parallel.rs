//! Parallel corpora for translation: two aligned text files, line `i` of the source file
//! translated by line `i` of the target file (Multi30k's `train.de` / `train.en`).
//!
//! - [`split_lines`]: lines of raw bytes, each checked for UTF-8 on its own, so one bad line is
//!   an error naming its number and never hides the others (the translate command relies on it).
//! - [`read_lines`] / [`read_parallel`]: whole files, with the line counts of the two sides
//!   checked against each other.
//! - [`encode_pairs`]: token ids of every pair, with the pairs too long for the model (or with
//!   an empty side) filtered out and counted.

use std::path::Path;

use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One line of raw input: its 1-based number and its text, or the UTF-8 error it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub number: usize,
    /// The text without its line ending (`\n` or `\r\n`), or the reason it is not text.
    pub text: std::result::Result<String, InvalidUtf8>,
}

/// A line that is not valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUtf8 {
    /// Byte offset of the first invalid byte, within the line.
    pub column_byte: usize,
}

impl std::fmt::Display for InvalidUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counted from 1 like line numbers (and as `embed` reports it); `column_byte` is the
        // 0-based offset.
        write!(
            f,
            "invalid UTF-8 at byte {} of the line",
            self.column_byte + 1
        )
    }
}

/// Split raw bytes into lines at `\n` (a `\r` before it is dropped too). A final line ending
/// does not start another line, so `b"a\nb\n"` and `b"a\nb"` both have two lines and `b""` has
/// none. Each line is decoded on its own: an invalid one does not affect its neighbours.
pub fn split_lines(bytes: &[u8]) -> Vec<Line> {
    let mut lines = Vec::new();
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        return lines;
    }
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(InvalidUtf8 {
                column_byte: e.valid_up_to(),
            }),
        };
        lines.push(Line {
            number: i + 1,
            text,
        });
    }
    lines
}

/// The lines of a text file (see [`split_lines`]); the first invalid UTF-8 line is an error
/// naming the file and the line number.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    split_lines(&bytes)
        .into_iter()
        .map(|line| {
            line.text
                .map_err(|e| Error::msg(format!("{}: line {}: {e}", path.display(), line.number)))
        })
        .collect()
}

/// The aligned lines of a source and a target file. Their line counts must match; otherwise
/// the error names both files and both counts. An empty corpus is an error too.
pub fn read_parallel(src: &Path, tgt: &Path) -> Result<Vec<(String, String)>> {
    let s = read_lines(src)?;
    let t = read_lines(tgt)?;
    if s.len() != t.len() {
        return Err(Error::msg(format!(
            "parallel corpus: {} has {} lines but {} has {} lines; line i of the source must be \
             translated by line i of the target",
            src.display(),
            s.len(),
            tgt.display(),
            t.len()
        )));
    }
    if s.is_empty() {
        return Err(Error::msg(format!(
            "parallel corpus: {} and {} have no lines",
            src.display(),
            tgt.display()
        )));
    }
    Ok(s.into_iter().zip(t).collect())
}

/// Encoded sentence pairs and what was filtered out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedPairs {
    /// (source ids, target ids), without special tokens (batching adds `bos`/`eos`).
    pub pairs: Vec<(Vec<u32>, Vec<u32>)>,
    /// Pairs dropped because a side was longer than the limit.
    pub too_long: usize,
    /// Pairs dropped because a side was empty.
    pub empty: usize,
}

/// Encode `lines` with the source and target tokenizers (the same one for a joint vocabulary)
/// and keep the pairs that fit: source at most `max_len` tokens and target at most
/// `max_len - 1` (the decoder reads `bos` + target and predicts target + `eos`, so it sees
/// one position more). Pairs with an empty side teach nothing and are dropped too.
pub fn encode_pairs(
    src_tok: &Tokenizer,
    tgt_tok: &Tokenizer,
    lines: &[(String, String)],
    max_len: usize,
) -> Result<EncodedPairs> {
    let mut out = EncodedPairs::default();
    for (i, (s, t)) in lines.iter().enumerate() {
        let src = src_tok
            .encode(s)
            .map_err(|e| Error::msg(format!("source line {}: {e}", i + 1)))?;
        let tgt = tgt_tok
            .encode(t)
            .map_err(|e| Error::msg(format!("target line {}: {e}", i + 1)))?;
        if src.is_empty() || tgt.is_empty() {
            out.empty += 1;
        } else if src.len() > max_len || tgt.len() + 1 > max_len {
            out.too_long += 1;
        } else {
            out.pairs.push((src, tgt));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;

    #[test]
    fn lines_split_and_keep_bad_ones_apart() {
        let lines = split_lines(b"eins\r\nzwei\n\n\xffdrei\nvier");
        let texts: Vec<_> = lines.iter().map(|l| l.text.clone()).collect();
        assert_eq!(
            texts,
            vec![
                Ok("eins".to_string()),
                Ok("zwei".to_string()),
                Ok(String::new()),
                Err(InvalidUtf8 { column_byte: 0 }),
                Ok("vier".to_string()),
            ]
        );
        assert_eq!(lines[3].number, 4);
        assert_eq!(split_lines(b"a\n").len(), 1);
        assert_eq!(split_lines(b"\n").len(), 1);
        assert!(split_lines(b"").is_empty());
    }

    #[test]
    fn line_counts_must_match_and_errors_name_both_files() {
        let dir = TempDir::new("parallel");
        let (de, en) = (dir.path().join("train.de"), dir.path().join("train.en"));
        std::fs::write(&de, "ein Hund\nzwei Katzen\ndrei\n").unwrap();
        std::fs::write(&en, "a dog\ntwo cats\n").unwrap();
        let e = read_parallel(&de, &en).unwrap_err().to_string();
        assert!(
            e.contains("train.de has 3 lines") && e.contains("train.en has 2 lines"),
            "{e}"
        );
        std::fs::write(&en, "a dog\ntwo cats\nthree").unwrap();
        let pairs = read_parallel(&de, &en).unwrap();
        assert_eq!(pairs[2], ("drei".to_string(), "three".to_string()));

        // Invalid UTF-8 names the file and the line.
        std::fs::write(&en, b"a dog\ntwo \xc3\x28cats\nthree\n").unwrap();
        let e = read_parallel(&de, &en).unwrap_err().to_string();
        assert!(e.contains("train.en") && e.contains("line 2"), "{e}");

        let e = read_parallel(&de, &dir.path().join("missing.en"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.en"), "{e}");
    }

    #[test]
    fn encoding_filters_long_and_empty_pairs() {
        let specials: Vec<String> = ["<pad>", "<bos>", "<eos>"].map(String::from).to_vec();
        let tok = Tokenizer::char_level("abcdefgh", &specials, None).unwrap();
        let lines: Vec<(String, String)> =
            [("abc", "de"), ("abcdefgh", "a"), ("a", ""), ("ab", "abcd")]
                .iter()
                .map(|(s, t)| (s.to_string(), t.to_string()))
                .collect();
        let enc = encode_pairs(&tok, &tok, &lines, 4).unwrap();
        // "abcdefgh" is too long; "abcd" + eos is 5 > 4; ("a", "") has an empty side.
        assert_eq!((enc.pairs.len(), enc.too_long, enc.empty), (1, 2, 1));
        assert_eq!(enc.pairs[0], (vec![0, 1, 2], vec![3, 4]));
        let bad = vec![("z".to_string(), "a".to_string())];
        let e = encode_pairs(&tok, &tok, &bad, 4).unwrap_err().to_string();
        assert!(e.contains("source line 1"), "{e}");
    }
}
