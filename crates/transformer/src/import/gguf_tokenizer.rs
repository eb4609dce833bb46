//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built as a Hugging
//! Face `tokenizers::Tokenizer` (wrapped in our [`Tokenizer`]), so that a GGUF model needs no
//! `tokenizer.json` beside it. The reference is transformers' GGUF loader
//! (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), which rebuilds the model's own
//! Hugging Face tokenizer from the same metadata; `tests/gguf_tokenizer.rs` checks ours against
//! it on SmolLM2 and Gemma 3 (fixtures from `scripts/reference/gguf_tokenizer.py`).
//!
//! | `tokenizer.ggml.model` | vocabulary                                  | built as                              |
//! |------------------------|---------------------------------------------|---------------------------------------|
//! | `gpt2`                 | byte-level BPE (SmolLM2, Llama 3)           | BPE from `tokens` + `merges`          |
//! | `llama`                | SentencePiece BPE (Gemma, Llama 2, Mistral) | BPE with byte fallback, merges derived from `scores` |
//!
//! Metadata read: `tokens`, `token_type` (absent: all normal), `merges` (`gpt2`; optional for
//! `llama`), `scores` (`llama`; absent: all 0), `add_space_prefix` (`llama`; absent: true, as
//! llama.cpp), `unknown_token_id`, `bos_token_id`, `add_bos_token`.
//!
//! Token types (`token_type`, llama.cpp's `llama_token_type`): 1 normal, 2 unknown, 3 control,
//! 4 user-defined, 5 unused, 6 byte. Control and unknown tokens (`<bos>`, `<|im_start|>`,
//! `<start_of_turn>`) become special added tokens and user-defined ones (`<table>`, `\n\n`) plain
//! added tokens: both are matched whole in the raw text before the model sees it, as llama.cpp
//! does, and never cut into pieces.
//!
//! # SentencePiece by score
//!
//! llama.cpp's SPM tokenizer (`llm_tokenizer_spm`): the text, every space written `▁` (U+2581)
//! and one `▁` prepended when `add_space_prefix`, starts as one symbol per character; the
//! adjacent pair whose concatenation is the vocabulary entry of highest score merges first,
//! until no pair forms an entry; a symbol left that is no entry is written as its UTF-8 bytes,
//! the `<0xNN>` tokens (byte fallback). A BPE whose merge list holds every cut of every entry
//! into two entries, ranked by the entry's score, merges the same pairs in the same order; that
//! is how Hugging Face writes such a tokenizer (transformers' `generate_merges`, and Gemma's own
//! `tokenizer.json`: a BPE with `byte_fallback`, a normalizer replacing `" "` with `▁`, no
//! pre-tokenizer), and what [`spm_merges`] builds.
//!
//! Two details follow the reference where a converter leaves a mark in the file:
//!
//! - The scores of non-normal tokens are placeholders (0 for byte and control tokens, -1000 for
//!   Gemma's user-defined ones), so these rank ahead of the normal tokens, in file order. For
//!   Gemma this is transformers' ranking by file position on every piece BPE can form (the
//!   non-normal pieces stored after the normal ones, `<unused…>` and the tab runs, are matched
//!   whole before BPE runs); for Llama 2-style files, whose byte and control tokens score 0
//!   above every normal token, it is llama.cpp's.
//! - Gemma stores its whitespace-run tokens (ids 138–165, two to 31 spaces) with real spaces,
//!   which the `▁`-escaped text never contains. A token of spaces only is respelled with `▁`
//!   and merged like any other entry (transformers does the same), not matched whole. Runs of
//!   up to 31 spaces come out as the one token either way; a longer run is cut as BPE merges it
//!   (40 spaces: 16 + 24) where llama.cpp matches the longest token first (31 + 9).
//!
//! One difference with llama.cpp remains by construction: when two cuts of the same entry
//! compete over the same symbol (`a|aa|a` toward `aaa`), BPE takes the cut with the longer left
//! part, llama.cpp the leftmost pair.

use std::cmp::Ordering;
use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use super::gguf::GgufFile;
use crate::data::{HfTokenizer, Tokenizer};
use crate::{Error, Result};

const MODEL_KEY: &str = "tokenizer.ggml.model";
const TOKENS_KEY: &str = "tokenizer.ggml.tokens";
const TYPES_KEY: &str = "tokenizer.ggml.token_type";
const SCORES_KEY: &str = "tokenizer.ggml.scores";
const MERGES_KEY: &str = "tokenizer.ggml.merges";
const SPACE_PREFIX_KEY: &str = "tokenizer.ggml.add_space_prefix";
const UNK_KEY: &str = "tokenizer.ggml.unknown_token_id";
const BOS_KEY: &str = "tokenizer.ggml.bos_token_id";
const ADD_BOS_KEY: &str = "tokenizer.ggml.add_bos_token";

/// SentencePiece's space marker.
const SPACE: &str = "\u{2581}";

/// llama.cpp's token types, the values of `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

impl GgufFile {
    /// Whether a prompt starts with the BOS token ([`GgufFile::bos_token_id`]):
    /// `tokenizer.ggml.add_bos_token`; when the file does not say, yes for a SentencePiece
    /// vocabulary and no otherwise (llama.cpp's and transformers' defaults). Gemma says yes,
    /// SmolLM2 no. [`GgufFile::tokenizer`]'s `encode` never adds it: the caller prepends it.
    pub fn add_bos_token(&self) -> Result<bool> {
        match self.metadata(ADD_BOS_KEY) {
            Some(Value::Bool(b)) => Ok(*b),
            None => Ok(self.tokenizer_model()? == "llama"),
            other => Err(self.bad_key(ADD_BOS_KEY, "a bool", other)),
        }
    }

    /// `tokenizer.ggml.bos_token_id`, checked to be a token of the vocabulary.
    pub fn bos_token_id(&self) -> Result<Option<u32>> {
        self.token_id(BOS_KEY)
    }

    /// The tokens that end a generation: `tokenizer.ggml.eos_token_id`,
    /// `tokenizer.ggml.eot_token_id`, and the end-of-turn markers of the common chat formats
    /// when the vocabulary has them as control tokens (`<|im_end|>` of ChatML, Gemma's
    /// `<end_of_turn>`, Llama 3's `<|eot_id|>`), as llama.cpp's end-of-generation set has them.
    pub fn stop_token_ids(&self) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = [
            self.token_id("tokenizer.ggml.eos_token_id")?,
            self.token_id("tokenizer.ggml.eot_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        let types = match self.metadata("tokenizer.ggml.token_type") {
            Some(Value::Array(t)) => t.as_slice(),
            _ => &[],
        };
        if let Some(Value::Array(tokens)) = self.metadata(TOKENS_KEY) {
            for (i, tok) in tokens.iter().enumerate() {
                let is_marker = matches!(tok, Value::String(t)
                    if ["<|im_end|>", "<end_of_turn>", "<|eot_id|>"].contains(&t.as_str()));
                let control = matches!(types.get(i), Some(Value::I32(3)) | Some(Value::U32(3)));
                if is_marker && control && !ids.contains(&(i as u32)) {
                    ids.push(i as u32);
                }
            }
        }
        Ok(ids)
    }

    fn tokenizer_model(&self) -> Result<&str> {
        match self.metadata(MODEL_KEY) {
            Some(Value::String(m)) => Ok(m),
            other => Err(self.bad_key(MODEL_KEY, "a string", other)),
        }
    }

    /// The token id at `key`, below the vocabulary size.
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let Some(id) = self.int_key(key, 0)? else {
            return Ok(None);
        };
        let n = match self.metadata(TOKENS_KEY) {
            Some(Value::Array(tokens)) => tokens.len(),
            other => return Err(self.bad_key(TOKENS_KEY, "an array of strings", other)),
        };
        if id >= n || id > u32::MAX as usize {
            return Err(self.bad_key(key, &format!("a token id below {n}"), self.metadata(key)));
        }
        Ok(Some(id as u32))
    }

    /// A metadata error that does not print the (possibly 262 144-entry) array it is about.
    fn bad_array(&self, key: &str, msg: String) -> Error {
        Error::Weights {
            source_name: self.path().display().to_string(),
            msg: format!("metadata {key}: {msg}"),
        }
    }

    /// `token_type`, one per token; all normal when the file has none.
    fn token_types(&self, n: usize) -> Result<Vec<TokenType>> {
        let items = match self.metadata(TYPES_KEY) {
            None => return Ok(vec![TokenType::Normal; n]),
            Some(Value::Array(items)) => items,
            other => return Err(self.bad_key(TYPES_KEY, "an array of integers", other)),
        };
        if items.len() != n {
            return Err(
                self.bad_array(TYPES_KEY, format!("{} entries for {n} tokens", items.len()))
            );
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_i64(v).and_then(TokenType::from_code).ok_or_else(|| {
                    self.bad_array(
                        TYPES_KEY,
                        format!("entry {i} is {v:?}, expected a token type 1..=6"),
                    )
                })
            })
            .collect()
    }

    /// `scores`, one per token; all 0 when the file has none.
    fn token_scores(&self, n: usize) -> Result<Vec<f32>> {
        let items = match self.metadata(SCORES_KEY) {
            None => return Ok(vec![0.0; n]),
            Some(Value::Array(items)) => items,
            other => return Err(self.bad_key(SCORES_KEY, "an array of floats", other)),
        };
        if items.len() != n {
            return Err(self.bad_array(
                SCORES_KEY,
                format!("{} entries for {n} tokens", items.len()),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(self.bad_array(
                    SCORES_KEY,
                    format!("entry {i} is {other:?}, expected a float"),
                )),
            })
            .collect()
    }

    /// `merges`, each "left right".
    fn merges(&self) -> Result<Vec<(String, String)>> {
        self.strings(MERGES_KEY)?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(self.bad_key(
                    MERGES_KEY,
                    "entries \"left right\"",
                    Some(&Value::String(m.clone())),
                )),
            })
            .collect()
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// The tokenizer `file` describes (see the module docs).
pub(crate) fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let source = file.path().display().to_string();
    let tok_err = |e: tokenizers::Error| Error::Weights {
        source_name: source.clone(),
        msg: format!("tokenizer: {e}"),
    };
    let inner = match file.tokenizer_model()? {
        "gpt2" => byte_level(file, &tok_err)?,
        "llama" => sentencepiece(file, &tok_err)?,
        _ => {
            return Err(file.bad_key(
                MODEL_KEY,
                "\"gpt2\" (byte-level BPE) or \"llama\" (SentencePiece)",
                file.metadata(MODEL_KEY),
            ))
        }
    };
    Ok(HfTokenizer::new(inner).into())
}

type TokErr<'a> = &'a dyn Fn(tokenizers::Error) -> Error;

/// `gpt2`: byte-level BPE from `tokens` and `merges`, each digit split off first as llama.cpp's
/// `smollm` / `llama3` pre-tokenizers do, no prefix space.
fn byte_level(file: &GgufFile, tok_err: TokErr) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::PreTokenizerWrapper;

    let tokens = file.strings(TOKENS_KEY)?;
    let types = file.token_types(tokens.len())?;
    let merges = file.merges()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(tok_err)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre: Vec<PreTokenizerWrapper> = vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ];
    inner.with_pre_tokenizer(Some(Sequence::new(pre)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    add_whole_tokens(&mut inner, &tokens, &types, &[], tok_err)?;
    Ok(inner)
}

/// `llama`: SentencePiece BPE (see the module docs).
fn sentencepiece(file: &GgufFile, tok_err: TokErr) -> Result<tokenizers::Tokenizer> {
    let tokens = file.strings(TOKENS_KEY)?;
    let n = tokens.len();
    let types = file.token_types(n)?;
    let scores = file.token_scores(n)?;
    let add_space_prefix = match file.metadata(SPACE_PREFIX_KEY) {
        None => true,
        Some(Value::Bool(b)) => *b,
        other => return Err(file.bad_key(SPACE_PREFIX_KEY, "a bool", other)),
    };
    // Gemma's whitespace runs are stored as real spaces: spell them as the escaped text does.
    let respelled: Vec<bool> = tokens
        .iter()
        .map(|t| !t.is_empty() && t.chars().all(|c| c == ' '))
        .collect();
    let pieces: Vec<String> = tokens
        .iter()
        .zip(&respelled)
        .map(|(t, &r)| if r { t.replace(' ', SPACE) } else { t.clone() })
        .collect();
    let merges = match file.metadata(MERGES_KEY) {
        Some(_) => file.merges()?,
        None => spm_merges(&pieces, &types, &scores),
    };
    let vocab: tokenizers::models::bpe::Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = file.token_id(UNK_KEY)? {
        bpe = bpe.unk_token(pieces[unk as usize].clone());
    }
    let mut inner = tokenizers::Tokenizer::new(bpe.build().map_err(tok_err)?);

    let replace = Replace::new(" ", SPACE).map_err(tok_err)?;
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        // Per stretch of text between whole-matched tokens, as llama.cpp prefixes the text
        // after every special token.
        normalizers.push(Prepend::new(SPACE.to_string()).into());
    }
    normalizers.push(replace.into());
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tok_err)?;

    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE, " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    add_whole_tokens(&mut inner, &pieces, &types, &respelled, tok_err)?;
    Ok(inner)
}

/// Control and unknown tokens as special added tokens, user-defined ones as plain added tokens,
/// all matched on the raw text (not normalized); `skip[i]` leaves token `i` to the model.
fn add_whole_tokens(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[String],
    types: &[TokenType],
    skip: &[bool],
    tok_err: TokErr,
) -> Result<()> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (i, (tok, ty)) in tokens.iter().zip(types).enumerate() {
        if skip.get(i).copied().unwrap_or(false) || tok.is_empty() {
            continue;
        }
        match ty {
            TokenType::Control | TokenType::Unknown => {
                special.push(AddedToken::from(tok.clone(), true).normalized(false))
            }
            TokenType::UserDefined => {
                user.push(AddedToken::from(tok.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    inner.add_special_tokens(special).map_err(tok_err)?;
    inner.add_tokens(user).map_err(tok_err)?;
    Ok(())
}

/// The merges of a BPE that tokenizes as SentencePiece does with these pieces: for every piece,
/// best first, each cut into two pieces of the vocabulary, the longer left part first
/// (transformers' `generate_merges` order, so that ties resolve as its tokenizers do).
///
/// Best first: non-normal pieces (byte, control, user-defined, unused), whose scores are
/// placeholders, in file order; then normal pieces by score, ties in file order. When a piece
/// is spelled twice, the later id is the one the vocabulary keeps (as llama.cpp and transformers
/// do) and the earlier is never merged into.
pub(crate) fn spm_merges(
    pieces: &[String],
    types: &[TokenType],
    scores: &[f32],
) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let normal = |i: usize| types.get(i) == Some(&TokenType::Normal);
    let score = |i: usize| scores.get(i).copied().unwrap_or(0.0);
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by(|&a, &b| {
        let by_score = if normal(a) && normal(b) {
            score(b).total_cmp(&score(a))
        } else {
            Ordering::Equal
        };
        normal(a).cmp(&normal(b)).then(by_score).then(a.cmp(&b))
    });
    let mut merges = Vec::new();
    for i in order {
        let piece = pieces[i].as_str();
        if vocab.get(piece) != Some(&i) {
            continue;
        }
        // Cuts at character boundaries, longest left part first.
        let cuts: Vec<usize> = piece.char_indices().skip(1).map(|(k, _)| k).collect();
        for &k in cuts.iter().rev() {
            let (left, right) = piece.split_at(k);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left.to_string(), right.to_string()));
            }
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    use TokenType::{Byte, Control, Normal, UserDefined};

    /// A tiny SentencePiece vocabulary, built the way [`sentencepiece`] builds Gemma's, without
    /// a file: `(piece, type, score)`.
    fn tiny(entries: &[(&str, TokenType, f32)], add_space_prefix: bool) -> HfTokenizer {
        let pieces: Vec<String> = entries.iter().map(|e| e.0.to_string()).collect();
        let types: Vec<TokenType> = entries.iter().map(|e| e.1).collect();
        let scores: Vec<f32> = entries.iter().map(|e| e.2).collect();
        let merges = spm_merges(&pieces, &types, &scores);
        let vocab: tokenizers::models::bpe::Vocab = pieces
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            norms.push(Prepend::new(SPACE.into()).into());
        }
        norms.push(Replace::new(" ", SPACE).unwrap().into());
        inner
            .with_normalizer(Some(NormalizerSequence::new(norms)))
            .unwrap();
        let mut decs: Vec<DecoderWrapper> = vec![
            Replace::new(SPACE, " ").unwrap().into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            decs.push(Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decs)));
        let err = |e: tokenizers::Error| Error::msg(e.to_string());
        add_whole_tokens(&mut inner, &pieces, &types, &[], &err).unwrap();
        HfTokenizer::new(inner)
    }

    /// `<unk>`, `<bos>`, the 256 bytes, then the pieces given (normal, scored).
    fn vocab_with(normal: &[(&str, f32)]) -> Vec<(String, TokenType, f32)> {
        let mut v = vec![
            ("<unk>".to_string(), Control, 0.0),
            ("<bos>".to_string(), Control, 0.0),
        ];
        for b in 0..=255u8 {
            v.push((format!("<0x{b:02X}>"), Byte, 0.0));
        }
        for (p, s) in normal {
            v.push((p.to_string(), Normal, *s));
        }
        v
    }

    fn build(normal: &[(&str, f32)], extra: &[(&str, TokenType)], prefix: bool) -> HfTokenizer {
        let mut v = vocab_with(normal);
        for (p, t) in extra {
            v.push((p.to_string(), *t, -1000.0));
        }
        let entries: Vec<(&str, TokenType, f32)> =
            v.iter().map(|(p, t, s)| (p.as_str(), *t, *s)).collect();
        tiny(&entries, prefix)
    }

    fn pieces_of(tok: &HfTokenizer, text: &str) -> Vec<String> {
        let ids = tok.encode(text).unwrap();
        ids.iter()
            .map(|&id| tok.inner().id_to_token(id).unwrap())
            .collect()
    }

    #[test]
    fn merges_follow_the_score_not_the_left_to_right_order() {
        // "abc": "bc" scores above "ab", so b+c merges first and "a" stays alone, although "ab"
        // comes first in the text; with the scores swapped, "ab" wins.
        let base = [("a", -1.0), ("b", -2.0), ("c", -3.0)];
        let mut v = base.to_vec();
        v.extend([("bc", -4.0), ("ab", -5.0)]);
        assert_eq!(pieces_of(&build(&v, &[], false), "abc"), ["a", "bc"]);
        let mut v = base.to_vec();
        v.extend([("ab", -4.0), ("bc", -5.0)]);
        assert_eq!(pieces_of(&build(&v, &[], false), "abc"), ["ab", "c"]);
    }

    #[test]
    fn a_piece_is_reached_through_its_best_scored_parts() {
        // "abcd" exists, but only as "ab"+"cd": with "bc" scored best, b+c merges first and
        // "abcd" is never formed (SentencePiece's greedy merging, not the longest match).
        let v = [
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("d", -1.0),
            ("bc", -2.0),
            ("ab", -3.0),
            ("cd", -4.0),
            ("abcd", -5.0),
        ];
        assert_eq!(pieces_of(&build(&v, &[], false), "abcd"), ["a", "bc", "d"]);
        let merges = spm_merges(
            &v.iter().map(|p| p.0.to_string()).collect::<Vec<_>>(),
            &[Normal; 8],
            &v.iter().map(|p| p.1).collect::<Vec<_>>(),
        );
        assert_eq!(
            merges,
            [("b", "c"), ("a", "b"), ("c", "d"), ("ab", "cd")]
                .map(|(l, r)| (l.to_string(), r.to_string()))
        );
    }

    #[test]
    fn spaces_are_marked_and_unknown_characters_fall_back_to_bytes() {
        let v = [
            (SPACE, -1.0),
            ("h", -2.0),
            ("i", -3.0),
            ("hi", -4.0),
            ("\u{2581}hi", -5.0),
        ];
        let tok = build(&v, &[], false);
        assert_eq!(pieces_of(&tok, "hi hi"), ["hi", "\u{2581}hi"]);
        // "é" (C3 A9) is not in the vocabulary: its two bytes.
        assert_eq!(pieces_of(&tok, "hé"), ["h", "<0xC3>", "<0xA9>"]);
        assert_eq!(
            tok.decode(&tok.encode("hé hi").unwrap(), false).unwrap(),
            "hé hi"
        );
        // add_space_prefix: "hi" is read as " hi", and the decoder takes the space off again.
        let tok = build(&v, &[], true);
        assert_eq!(pieces_of(&tok, "hi"), ["\u{2581}hi"]);
        assert_eq!(
            tok.decode(&tok.encode("hi hi").unwrap(), false).unwrap(),
            "hi hi"
        );
    }

    #[test]
    fn control_and_user_defined_tokens_are_matched_whole() {
        let v = [
            ("<", -1.0),
            ("b", -2.0),
            ("o", -3.0),
            ("s", -4.0),
            (">", -5.0),
            ("hi", -6.0),
        ];
        let v: Vec<(&str, f32)> = v
            .iter()
            .copied()
            .chain([("h", -7.0), ("i", -8.0)])
            .collect();
        let tok = build(&v, &[("<table>", UserDefined)], false);
        assert_eq!(
            pieces_of(&tok, "<bos>hi<table>hi"),
            ["<bos>", "hi", "<table>", "hi"]
        );
        assert_eq!(
            tok.decode(&tok.encode("<bos>hi<table>").unwrap(), false)
                .unwrap(),
            "<bos>hi<table>"
        );
        // Control tokens are special (dropped when decoding for a user), user-defined ones not.
        assert_eq!(
            tok.decode(&tok.encode("<bos>hi<table>").unwrap(), true)
                .unwrap(),
            "hi<table>"
        );
    }

    #[test]
    fn non_normal_pieces_rank_ahead_of_normal_ones_in_file_order() {
        let pieces = ["x", "y", "xy", "yx", "<0x78>"].map(String::from);
        let types = [Normal, Normal, Normal, UserDefined, Byte];
        // Normal scores are ignored for non-normal pieces: "yx" (user-defined, score -1000)
        // comes before the normal "xy".
        let merges = spm_merges(&pieces, &types, &[-1.0, -2.0, -3.0, -1000.0, 0.0]);
        assert_eq!(
            merges,
            [("y", "x"), ("x", "y")].map(|(l, r)| (l.to_string(), r.to_string()))
        );
    }
}
