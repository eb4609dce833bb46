//! Tokenizers: text ↔ token ids.
//!
//! Two families behind one [`Tokenizer`] enum, so that training and generation code does not
//! care which one a run uses:
//!
//! - **Character level** ([`CharTokenizer`]), as in nanoGPT's `shakespeare_char`: the
//!   vocabulary is the sorted set of characters of a corpus (`sorted(list(set(data)))`),
//!   optionally followed by special tokens. Saved as a small JSON file of our own with
//!   `"type": "char"`.
//! - **Hugging Face** ([`HfTokenizer`]): a byte-level BPE trained here on a corpus with the
//!   `tokenizers` crate (GPT-2's scheme), or any `tokenizer.json` (BPE, WordPiece, Unigram, ...)
//!   loaded from disk. Saved in the Hugging Face format.
//!
//! [`Tokenizer::load`] tells the two file formats apart by the top-level `"type": "char"` field,
//! which Hugging Face files never have.
//!
//! Conventions shared by both families:
//! - [`Tokenizer::encode`] never adds special tokens (no BOS/EOS, no `[CLS]`/`[SEP]`): batching
//!   code adds them explicitly (see [`super::batch`]).
//! - [`Tokenizer::decode`] drops special tokens (Hugging Face's `skip_special_tokens=True`), the
//!   form wanted for printing; [`Tokenizer::decode_with_special_tokens`] keeps them.
//! - An id outside the vocabulary is an error in decoding, never silently dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::{Error, Result};

/// Names looked up to find each special token in a vocabulary, in order of preference.
/// They cover our own defaults (`<pad>`, `<bos>`, ...), BERT's (`[PAD]`, `[UNK]`) and the
/// SentencePiece/GPT-2 ones (`<s>`, `</s>`, `<|endoftext|>`).
const PAD_NAMES: &[&str] = &["<pad>", "[PAD]", "<|pad|>"];
const BOS_NAMES: &[&str] = &["<bos>", "<s>", "<|startoftext|>", "<|begin_of_text|>"];
const EOS_NAMES: &[&str] = &["<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>"];
const UNK_NAMES: &[&str] = &["<unk>", "[UNK]", "<|unk|>"];

/// The number of symbols a byte-level BPE starts from (one per byte value), before merges.
const BYTE_ALPHABET: usize = 256;

/// Ids of the special tokens a model needs, where the vocabulary has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    /// Padding (`<pad>` or `[PAD]`).
    pub pad: Option<u32>,
    /// Beginning of sequence (`<bos>` or `<s>`).
    pub bos: Option<u32>,
    /// End of sequence (`<eos>`, `</s>` or `<|endoftext|>`).
    pub eos: Option<u32>,
    /// Unknown (`<unk>` or `[UNK]`).
    pub unk: Option<u32>,
}

impl SpecialIds {
    /// Find the special tokens by their usual names through `lookup` (token → id).
    fn find(lookup: impl Fn(&str) -> Option<u32>) -> SpecialIds {
        let first = |names: &[&str]| names.iter().find_map(|n| lookup(n));
        SpecialIds {
            pad: first(PAD_NAMES),
            bos: first(BOS_NAMES),
            eos: first(EOS_NAMES),
            unk: first(UNK_NAMES),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Character level
// ---------------------------------------------------------------------------------------------

/// A character-level tokenizer: id `i < n_chars` is the `i`-th character of the sorted
/// vocabulary (exactly nanoGPT's `stoi`), ids `n_chars..` are the special tokens in the order
/// given. Special tokens are never produced by [`CharTokenizer::encode`]: `"<pad>"` in a text is
/// five characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    /// id → character, for ids below `chars.len()`.
    chars: Vec<char>,
    /// id - `chars.len()` → special token.
    specials: Vec<String>,
    /// The special token that unknown characters map to; `None` makes them an error.
    unk: Option<String>,
    /// character → id.
    char_to_id: HashMap<char, u32>,
}

/// The on-disk form of a [`CharTokenizer`] (`tokenizer.json` with `"type": "char"`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CharFile {
    /// Always `"char"`: tells this format from Hugging Face's in [`Tokenizer::load`].
    #[serde(rename = "type")]
    kind: String,
    /// The vocabulary, one single-character string per id.
    chars: Vec<String>,
    /// Special tokens, with ids following the characters.
    #[serde(default)]
    special_tokens: Vec<String>,
    /// The special token unknown characters map to, if any.
    #[serde(default)]
    unk: Option<String>,
}

impl CharTokenizer {
    /// The vocabulary of `corpus` (its sorted distinct characters), then `special_tokens`.
    /// `unk`, when given, is appended to the special tokens unless already among them, and
    /// characters outside the vocabulary then encode to it.
    pub fn from_corpus(corpus: &str, special_tokens: &[String], unk: Option<&str>) -> Result<Self> {
        let mut chars: Vec<char> = corpus.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        if chars.is_empty() {
            return Err(Error::msg(
                "character tokenizer: the corpus is empty, so there is no vocabulary to build",
            ));
        }
        let mut specials = special_tokens.to_vec();
        if let Some(u) = unk {
            if !specials.iter().any(|s| s == u) {
                specials.push(u.to_string());
            }
        }
        Self::new(chars, specials, unk.map(str::to_string))
    }

    /// A tokenizer with exactly these characters (id = position) and special tokens (ids after
    /// the characters). Fails on duplicates, on a special token that is also a character, and on
    /// an `unk` that is not among the special tokens.
    pub fn new(chars: Vec<char>, specials: Vec<String>, unk: Option<String>) -> Result<Self> {
        let mut char_to_id = HashMap::with_capacity(chars.len());
        for (i, &c) in chars.iter().enumerate() {
            if char_to_id.insert(c, i as u32).is_some() {
                return Err(Error::msg(format!(
                    "character tokenizer: character {c:?} appears twice in the vocabulary"
                )));
            }
        }
        for (i, s) in specials.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::msg("character tokenizer: a special token is empty"));
            }
            if specials[..i].contains(s) {
                return Err(Error::msg(format!(
                    "character tokenizer: special token {s:?} is listed twice"
                )));
            }
            let mut it = s.chars();
            if let (Some(c), None) = (it.next(), it.next()) {
                if char_to_id.contains_key(&c) {
                    return Err(Error::msg(format!(
                        "character tokenizer: special token {s:?} is also a character of the \
                         vocabulary, so it would have two ids"
                    )));
                }
            }
        }
        if let Some(u) = &unk {
            if !specials.contains(u) {
                return Err(Error::msg(format!(
                    "character tokenizer: unk token {u:?} is not among the special tokens {specials:?}"
                )));
            }
        }
        Ok(CharTokenizer {
            chars,
            specials,
            unk,
            char_to_id,
        })
    }

    /// The characters of the vocabulary, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// The special tokens, in id order (their ids start at `chars().len()`).
    pub fn special_tokens(&self) -> &[String] {
        &self.specials
    }

    /// Number of ids: characters plus special tokens.
    pub fn vocab_size(&self) -> usize {
        self.chars.len() + self.specials.len()
    }

    /// One id per character. A character outside the vocabulary maps to the unk token when one
    /// is configured, and is otherwise an error naming the character and where it is.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let unk_id = self.unk.as_deref().and_then(|u| self.token_to_id(u));
        let mut ids = Vec::with_capacity(text.len());
        for (pos, c) in text.chars().enumerate() {
            match (self.char_to_id.get(&c), unk_id) {
                (Some(&id), _) => ids.push(id),
                (None, Some(unk)) => ids.push(unk),
                (None, None) => {
                    let (line, column) = line_column(text, pos);
                    return Err(Error::msg(format!(
                        "character {c:?} (U+{:04X}) at character {pos} (line {line}, column \
                         {column}) is not in the vocabulary of {} characters and no unk token \
                         is configured",
                        c as u32,
                        self.chars.len()
                    )));
                }
            }
        }
        Ok(ids)
    }

    /// The text of `ids`; special tokens are written out unless `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut out = String::with_capacity(ids.len());
        for &id in ids {
            let i = id as usize;
            if let Some(&c) = self.chars.get(i) {
                out.push(c);
            } else if let Some(s) = self.specials.get(i - self.chars.len()) {
                if !skip_special_tokens {
                    out.push_str(s);
                }
            } else {
                return Err(unknown_id(id, self.vocab_size()));
            }
        }
        Ok(out)
    }

    /// The id of a single character or of a special token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        let mut it = token.chars();
        if let (Some(c), None) = (it.next(), it.next()) {
            if let Some(&id) = self.char_to_id.get(&c) {
                return Some(id);
            }
        }
        let pos = self.specials.iter().position(|s| s == token)?;
        Some((self.chars.len() + pos) as u32)
    }

    /// The character or special token with this id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        let i = id as usize;
        match self.chars.get(i) {
            Some(c) => Some(c.to_string()),
            None => self.specials.get(i - self.chars.len()).cloned(),
        }
    }

    /// The JSON text of the `"type": "char"` file format.
    pub fn to_json(&self) -> Result<String> {
        let file = CharFile {
            kind: "char".to_string(),
            chars: self.chars.iter().map(|c| c.to_string()).collect(),
            special_tokens: self.specials.clone(),
            unk: self.unk.clone(),
        };
        serde_json::to_string_pretty(&file).map_err(|source| Error::Json {
            what: "character tokenizer".to_string(),
            source,
        })
    }

    /// Parse the `"type": "char"` file format; `what` names the source in errors.
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let file: CharFile = serde_json::from_str(json).map_err(|source| Error::Json {
            what: what.to_string(),
            source,
        })?;
        if file.kind != "char" {
            return Err(Error::msg(format!(
                "{what}: expected \"type\": \"char\", got {:?}",
                file.kind
            )));
        }
        let mut chars = Vec::with_capacity(file.chars.len());
        for (i, s) in file.chars.iter().enumerate() {
            let mut it = s.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => chars.push(c),
                _ => {
                    return Err(Error::msg(format!(
                        "{what}: chars[{i}] = {s:?} is not exactly one character"
                    )))
                }
            }
        }
        Self::new(chars, file.special_tokens, file.unk)
            .map_err(|e| Error::msg(format!("{what}: {e}")))
    }
}

/// 1-based line and column of the character at index `pos` (counted in characters).
fn line_column(text: &str, pos: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for c in text.chars().take(pos) {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

fn unknown_id(id: u32, vocab_size: usize) -> Error {
    Error::msg(format!(
        "token id {id} is not in the vocabulary (size {vocab_size})"
    ))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face
// ---------------------------------------------------------------------------------------------

/// A Hugging Face tokenizer (any model the `tokenizers` crate reads: BPE, WordPiece, Unigram,
/// WordLevel), with errors converted to ours.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    // Boxed: the Hugging Face tokenizer is several hundred bytes, the character one is small.
    inner: Box<tokenizers::Tokenizer>,
}

/// Turn a `tokenizers` error into ours, saying what we were doing.
fn hf_error(what: &str, e: tokenizers::Error) -> Error {
    Error::msg(format!("{what}: {e}"))
}

impl HfTokenizer {
    /// Wrap a tokenizer built with the `tokenizers` crate directly.
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        HfTokenizer {
            inner: Box::new(inner),
        }
    }

    /// The wrapped tokenizer, for what this wrapper does not expose (offsets, pairs, ...).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Train a byte-level BPE (GPT-2's scheme: bytes mapped to printable characters, the GPT-2
    /// splitting regex, no normalizer) on `corpus`. The vocabulary has at most `vocab_size`
    /// entries, counting the 256 byte symbols and the special tokens, which take ids
    /// `0..special_tokens.len()` in order; fewer when the corpus runs out of pairs to merge.
    /// Because every byte has a symbol, any text encodes without an unk token.
    pub fn train_bpe(corpus: &str, vocab_size: usize, special_tokens: &[String]) -> Result<Self> {
        for (i, s) in special_tokens.iter().enumerate() {
            if special_tokens[..i].contains(s) {
                return Err(Error::Config(format!(
                    "tokenizer.special_tokens: {s:?} is listed twice"
                )));
            }
        }
        let min = BYTE_ALPHABET + special_tokens.len();
        if vocab_size < min {
            return Err(Error::Config(format!(
                "tokenizer.vocab_size = {vocab_size} is below the minimum {min} of a byte-level \
                 BPE ({BYTE_ALPHABET} byte symbols + {} special tokens)",
                special_tokens.len()
            )));
        }
        if corpus.is_empty() {
            return Err(Error::msg("BPE training: the corpus is empty"));
        }
        let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
        // No prefix space: it would make "Hello" at the start of a text differ from the
        // training data's "Hello" after a newline and breaks exact decode(encode(x)) == x.
        let byte_level = ByteLevel::new(false, true, true);
        tokenizer.with_pre_tokenizer(Some(byte_level));
        tokenizer.with_post_processor(Some(byte_level));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(
                special_tokens
                    .iter()
                    .map(|s| AddedToken::from(s.clone(), true))
                    .collect(),
            )
            // All 256 byte symbols, seen in the corpus or not, so that no input is ever unknown.
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        // Lines (newline kept) are the trainer's sequences: it counts words in parallel across
        // sequences, and the pre-tokenizer never merges across a newline anyway.
        tokenizer
            .train(&mut trainer, corpus.split_inclusive('\n'))
            .map_err(|e| hf_error("BPE training", e))?;
        Ok(HfTokenizer::new(tokenizer))
    }

    /// Parse a Hugging Face `tokenizer.json`; `what` names the source in errors.
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| {
            Error::msg(format!(
                "{what}: not a Hugging Face tokenizer.json (nor a \"type\": \"char\" file): {e}"
            ))
        })?;
        Ok(HfTokenizer::new(inner))
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| hf_error("serializing the tokenizer", e))
    }

    /// Ids without special tokens added (the post-processor's `[CLS]`/`[SEP]`, `<s>` are not).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // encode_fast skips the offset bookkeeping, which we never use.
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| hf_error("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids with the post-processor's special tokens (e.g. BERT's `[CLS] ... [SEP]`).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| hf_error("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; an id outside the vocabulary is an error (the `tokenizers` crate
    /// would silently drop it).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(unknown_id(bad, n));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| hf_error("decoding", e))
    }

    /// Number of ids, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

// ---------------------------------------------------------------------------------------------
// The common interface
// ---------------------------------------------------------------------------------------------

/// A tokenizer of either family; see the module docs for the shared conventions.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// Character level, our own file format.
    Char(CharTokenizer),
    /// Hugging Face `tokenizers` (BPE trained here, or any `tokenizer.json`).
    Hf(HfTokenizer),
}

impl From<CharTokenizer> for Tokenizer {
    fn from(t: CharTokenizer) -> Self {
        Tokenizer::Char(t)
    }
}

impl From<HfTokenizer> for Tokenizer {
    fn from(t: HfTokenizer) -> Self {
        Tokenizer::Hf(t)
    }
}

impl Tokenizer {
    /// A character-level tokenizer over the characters of `corpus`
    /// (see [`CharTokenizer::from_corpus`]).
    pub fn char_level(corpus: &str, special_tokens: &[String], unk: Option<&str>) -> Result<Self> {
        Ok(CharTokenizer::from_corpus(corpus, special_tokens, unk)?.into())
    }

    /// A byte-level BPE trained on `corpus` (see [`HfTokenizer::train_bpe`]).
    pub fn train_bpe(corpus: &str, vocab_size: usize, special_tokens: &[String]) -> Result<Self> {
        Ok(HfTokenizer::train_bpe(corpus, vocab_size, special_tokens)?.into())
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Hf(t) => t.encode(text),
        }
    }

    /// The text of `ids`, special tokens dropped (the form to show a user).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Char(t) => t.decode(ids, true),
            Tokenizer::Hf(t) => t.decode(ids, true),
        }
    }

    /// The text of `ids`, special tokens written out (the form to debug with).
    pub fn decode_with_special_tokens(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Char(t) => t.decode(ids, false),
            Tokenizer::Hf(t) => t.decode(ids, false),
        }
    }

    /// Number of ids (the model's `V`), special tokens included.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t.vocab_size(),
        }
    }

    /// The id of a token (for the character tokenizer: one character or a special token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Char(t) => t.token_to_id(token),
            Tokenizer::Hf(t) => t.inner.token_to_id(token),
        }
    }

    /// The token with this id, in the vocabulary's own spelling (byte-level BPE writes a space
    /// as `Ġ`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Tokenizer::Char(t) => t.id_to_token(id),
            Tokenizer::Hf(t) => t.inner.id_to_token(id),
        }
    }

    /// Pad/BOS/EOS/unk ids, found by their usual names (`<pad>`, `[PAD]`, `<bos>`, `<s>`,
    /// `<eos>`, `</s>`, `<|endoftext|>`, `<unk>`, `[UNK]`, ...). For a character tokenizer the
    /// configured unk token counts whatever its name.
    pub fn special_ids(&self) -> SpecialIds {
        let mut ids = SpecialIds::find(|name| self.special_token_id(name));
        if let Tokenizer::Char(t) = self {
            if let Some(u) = &t.unk {
                ids.unk = t.token_to_id(u);
            }
        }
        ids
    }

    /// The id of `name` only if it is a special token (not an ordinary entry that happens to be
    /// spelled `<s>`).
    fn special_token_id(&self, name: &str) -> Option<u32> {
        match self {
            Tokenizer::Char(t) => {
                let pos = t.specials.iter().position(|s| s == name)?;
                Some((t.chars.len() + pos) as u32)
            }
            Tokenizer::Hf(t) => {
                let id = t.inner.token_to_id(name)?;
                // WordPiece and SentencePiece files often keep `[UNK]`/`<unk>` in the model's
                // vocabulary only, not as an added token; accept those too.
                let added = t.inner.get_added_tokens_decoder();
                match added.get(&id) {
                    Some(tok) if !tok.special => None,
                    _ => Some(id),
                }
            }
        }
    }

    /// The padding id, if the vocabulary has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.special_ids().pad
    }

    /// The beginning-of-sequence id, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.special_ids().bos
    }

    /// The end-of-sequence id, if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.special_ids().eos
    }

    /// The unknown-token id, if the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        self.special_ids().unk
    }

    /// Write the tokenizer to `path` (conventionally `tokenizer.json`): our `"type": "char"`
    /// format or Hugging Face's.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = match self {
            Tokenizer::Char(t) => t.to_json()?,
            Tokenizer::Hf(t) => t.to_json()?,
        };
        std::fs::write(path, json).map_err(|e| Error::io(path, e))
    }

    /// Read a tokenizer written by [`Tokenizer::save`], or any Hugging Face `tokenizer.json`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let what = path.display().to_string();
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                what: what.clone(),
                source,
            })?;
        if value.get("type").and_then(|v| v.as_str()) == Some("char") {
            Ok(CharTokenizer::from_json(&text, &what)?.into())
        } else {
            Ok(HfTokenizer::from_json(&text, &what)?.into())
        }
    }

    /// A decoder for streaming generation: feed it ids one at a time, print what it returns.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            read: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming decoding
// ---------------------------------------------------------------------------------------------

/// Decodes a growing sequence of ids token by token and returns only the new, complete text.
///
/// A token's text can depend on its neighbours (byte-level BPE splits one UTF-8 character over
/// several tokens; SentencePiece and WordPiece decoders strip or join spaces at word edges), so
/// decoding each id alone is wrong. As in Hugging Face's text-generation-inference, the decoder
/// re-decodes a short window that starts one step back: the text beyond the window's old part
/// is new, and it is held back while it ends in U+FFFD (an incomplete UTF-8 character).
/// The concatenation of everything returned, plus [`StreamDecoder::finish`], equals
/// [`Tokenizer::decode`] of all the ids, except where a decoder's clean-up rewrites text that
/// was already returned (WordPiece joining `do n't`): then [`StreamDecoder::push`] returns an
/// error rather than print something `decode` would not. Special tokens are dropped, as in
/// `decode`.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// The context window: ids whose text was already returned (`..read`), then the ids not
    /// yet returned (`read..`). Older ids are dropped, so the cost per step stays small.
    ids: Vec<u32>,
    /// How many ids at the start of the window have had their text returned.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Add one id; returns the text it completes (often empty, e.g. for part of a character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[..self.read])?;
        let full = self.tokenizer.decode(&self.ids)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = full.strip_prefix(&prefix) else {
            return Err(Error::msg(format!(
                "streaming decode: after token {id} the text {full:?} no longer starts with the \
                 text already returned {prefix:?}"
            )));
        };
        let new = new.to_string();
        // Slide the window: the ids just returned become the next step's context.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(new)
    }

    /// The text still held back at the end of generation (e.g. an incomplete character, which
    /// decodes to U+FFFD).
    pub fn finish(self) -> Result<String> {
        let prefix = self.tokenizer.decode(&self.ids[..self.read])?;
        let full = self.tokenizer.decode(&self.ids)?;
        Ok(match full.strip_prefix(&prefix) {
            Some(rest) => rest.to_string(),
            None => full,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How to build a tokenizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// Character level, vocabulary from the training corpus.
    #[default]
    Char,
    /// Byte-level BPE trained on the training corpus.
    Bpe,
    /// Load a saved tokenizer (ours or any Hugging Face `tokenizer.json`) from `path`.
    File,
}

/// The `[tokenizer]` section of a run's config.
///
/// ```toml
/// [tokenizer]
/// kind = "bpe"
/// vocab_size = 4096
/// special_tokens = ["<pad>", "<bos>", "<eos>"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// `"char"`, `"bpe"` or `"file"`.
    pub kind: TokenizerKind,
    /// Largest vocabulary for `bpe`, counting the 256 byte symbols and the special tokens.
    /// Ignored otherwise.
    pub vocab_size: usize,
    /// The file to load for `file`; must be unset otherwise.
    pub path: Option<PathBuf>,
    /// For `char`: the token unknown characters map to (added to the special tokens); without
    /// it they are an error. For `bpe` it is only added as a special token, since byte-level
    /// BPE has no unknown input.
    pub unk: Option<String>,
    /// Special tokens added to the vocabulary (after the characters for `char`, first for
    /// `bpe`), e.g. `["<pad>", "<bos>", "<eos>", "<unk>"]`.
    pub special_tokens: Vec<String>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            kind: TokenizerKind::Char,
            // Small corpora (the ones this library trains on) cannot fill a GPT-2-sized vocabulary.
            vocab_size: 4096,
            path: None,
            unk: None,
            special_tokens: Vec::new(),
        }
    }
}

impl TokenizerConfig {
    /// Check that the fields fit together.
    pub fn validate(&self) -> Result<()> {
        match (self.kind, &self.path) {
            (TokenizerKind::File, None) => {
                return Err(Error::Config(
                    "tokenizer.kind = \"file\" needs tokenizer.path".to_string(),
                ))
            }
            (TokenizerKind::Char | TokenizerKind::Bpe, Some(p)) => {
                return Err(Error::Config(format!(
                    "tokenizer.path = {:?} is only read with kind = \"file\" (kind is {:?})",
                    p.display().to_string(),
                    self.kind
                )))
            }
            _ => {}
        }
        if self.kind == TokenizerKind::File
            && (self.unk.is_some() || !self.special_tokens.is_empty())
        {
            return Err(Error::Config(
                "tokenizer.unk and tokenizer.special_tokens do not apply to kind = \"file\": the \
                 file defines its own vocabulary"
                    .to_string(),
            ));
        }
        Ok(())
    }

    /// Build the tokenizer; `corpus` (the training text) is needed for `char` and `bpe`.
    pub fn build(&self, corpus: Option<&str>) -> Result<Tokenizer> {
        self.validate()?;
        let need_corpus = || {
            corpus.ok_or_else(|| {
                Error::Config(format!(
                    "tokenizer.kind = {:?} builds its vocabulary from a corpus, but none was given",
                    self.kind
                ))
            })
        };
        match self.kind {
            TokenizerKind::Char => {
                Tokenizer::char_level(need_corpus()?, &self.special_tokens, self.unk.as_deref())
            }
            TokenizerKind::Bpe => {
                let mut specials = self.special_tokens.clone();
                if let Some(u) = &self.unk {
                    if !specials.contains(u) {
                        specials.push(u.clone());
                    }
                }
                Tokenizer::train_bpe(need_corpus()?, self.vocab_size, &specials)
            }
            TokenizerKind::File => match &self.path {
                Some(p) => Tokenizer::load(p),
                // validate() has already refused this; an error keeps the code panic-free.
                None => Err(Error::Config(
                    "tokenizer.kind = \"file\" needs tokenizer.path".to_string(),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;

    const CORPUS: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\
        All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to \
        famish?\n\nAll:\nResolved. resolved.\n";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn bpe(vocab_size: usize) -> Tokenizer {
        let specials = strings(&["<pad>", "<bos>", "<eos>", "<unk>"]);
        Tokenizer::train_bpe(&CORPUS.repeat(3), vocab_size, &specials).unwrap()
    }

    #[test]
    fn char_vocab_is_sorted_unique_chars_and_round_trips() {
        let tok = Tokenizer::char_level("hello world", &[], None).unwrap();
        let Tokenizer::Char(c) = &tok else {
            panic!("expected a char tokenizer")
        };
        assert_eq!(c.chars(), &[' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
        assert_eq!(tok.vocab_size(), 8);
        let ids = tok.encode("hello").unwrap();
        assert_eq!(ids, vec![3, 2, 4, 4, 5]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello");
        assert_eq!(tok.token_to_id("w"), Some(7));
        assert_eq!(tok.id_to_token(0).as_deref(), Some(" "));
        assert_eq!(tok.id_to_token(8), None);
        let e = tok.decode(&[8]).unwrap_err().to_string();
        assert!(e.contains("token id 8") && e.contains("size 8"), "{e}");

        let tok = Tokenizer::char_level(CORPUS, &[], None).unwrap();
        assert_eq!(tok.decode(&tok.encode(CORPUS).unwrap()).unwrap(), CORPUS);
        assert_eq!(tok.special_ids(), SpecialIds::default());
    }

    #[test]
    fn unknown_char_is_an_error_naming_it_and_its_position() {
        let tok = Tokenizer::char_level("ab\n", &[], None).unwrap();
        let e = tok.encode("ab\nbaz").unwrap_err().to_string();
        assert!(
            e.contains("'z'") && e.contains("character 5") && e.contains("line 2, column 3"),
            "{e}"
        );
    }

    #[test]
    fn unknown_char_maps_to_unk_when_configured() {
        let specials = strings(&["<pad>"]);
        let tok = Tokenizer::char_level("ab", &specials, Some("<unk>")).unwrap();
        // Characters first (a, b), then the special tokens in order, unk appended.
        assert_eq!(tok.vocab_size(), 4);
        let ids = tok.encode("azb").unwrap();
        assert_eq!(ids, vec![0, 3, 1]);
        assert_eq!(tok.decode(&ids).unwrap(), "ab");
        assert_eq!(tok.decode_with_special_tokens(&ids).unwrap(), "a<unk>b");
        let sp = tok.special_ids();
        assert_eq!((sp.pad, sp.unk, sp.bos), (Some(2), Some(3), None));
        // Special tokens are whole tokens, never matched inside text.
        assert_eq!(tok.token_to_id("<pad>"), Some(2));
        // A special token spelled as a vocabulary character would have two ids.
        assert!(Tokenizer::char_level("ab", &strings(&["a"]), None).is_err());
        assert!(Tokenizer::char_level("", &[], None).is_err());
    }

    #[test]
    fn char_save_load_round_trip() {
        let dir = TempDir::new("char_tok");
        let path = dir.path().join("tokenizer.json");
        let tok = Tokenizer::char_level(CORPUS, &strings(&["<eos>"]), Some("<unk>")).unwrap();
        tok.save(&path).unwrap();
        let json = std::fs::read_to_string(&path).unwrap();
        assert!(json.contains("\"type\": \"char\""), "{json}");
        let loaded = Tokenizer::load(&path).unwrap();
        let (Tokenizer::Char(a), Tokenizer::Char(b)) = (&tok, &loaded) else {
            panic!("expected char tokenizers")
        };
        assert_eq!(a, b);
        assert_eq!(loaded.eos_id(), tok.eos_id());
        assert_eq!(
            loaded.encode("Speak~").unwrap(),
            tok.encode("Speak~").unwrap()
        );

        // A malformed vocabulary entry is named.
        std::fs::write(&path, r#"{"type": "char", "chars": ["a", "bc"]}"#).unwrap();
        let e = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("chars[1]") && e.contains("tokenizer.json"),
            "{e}"
        );
        let e = Tokenizer::load(dir.path().join("nope.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.json"), "{e}");
    }

    #[test]
    fn bpe_trains_to_at_most_the_vocab_size_and_round_trips() {
        let tok = bpe(300);
        assert!(tok.vocab_size() <= 300, "{}", tok.vocab_size());
        assert!(tok.vocab_size() > 256 + 4, "some merges were learnt");
        let sp = tok.special_ids();
        assert_eq!(
            (sp.pad, sp.bos, sp.eos, sp.unk),
            (Some(0), Some(1), Some(2), Some(3))
        );
        // Merges make common text shorter than its bytes.
        let ids = tok.encode(CORPUS).unwrap();
        assert!(ids.len() < CORPUS.len() / 2, "{} tokens", ids.len());
        // Byte level: text never seen in training (accents, emoji) still round-trips.
        for text in [CORPUS, "  Résolu, 你好 🙂\n\tx", ""] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        // A special token in the text is one id; decode drops it unless asked.
        let ids = tok.encode("speak<eos>").unwrap();
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(tok.decode(&ids).unwrap(), "speak");
        assert_eq!(tok.decode_with_special_tokens(&ids).unwrap(), "speak<eos>");
        let n = tok.vocab_size() as u32;
        assert!(tok.decode(&[n]).is_err());

        let e = Tokenizer::train_bpe(CORPUS, 100, &strings(&["<pad>"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("100") && e.contains("257"), "{e}");
    }

    #[test]
    fn hf_save_load_round_trip() {
        let dir = TempDir::new("hf_tok");
        let path = dir.path().join("tokenizer.json");
        let tok = bpe(290);
        tok.save(&path).unwrap();
        let json = std::fs::read_to_string(&path).unwrap();
        assert!(json.contains("\"ByteLevel\"") && json.contains("\"BPE\""));
        let loaded = Tokenizer::load(&path).unwrap();
        assert!(matches!(loaded, Tokenizer::Hf(_)));
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!(loaded.special_ids(), tok.special_ids());
        let text = "Before we proceed, Résolu!";
        assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(loaded.decode(&loaded.encode(text).unwrap()).unwrap(), text);
    }

    /// A minimal BERT-style WordPiece `tokenizer.json` written by hand, as Hugging Face lays it out.
    const WORDPIECE_JSON: &str = r###"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
      "pre_tokenizer": {"type": "BertPreTokenizer"},
      "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
      "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
      "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100,
                "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4,
                          "world": 5, "!": 6, "wor": 7, "##ld": 8, "##s": 9}}
    }"###;

    #[test]
    fn loads_a_wordpiece_tokenizer_json() {
        let dir = TempDir::new("wordpiece");
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, WORDPIECE_JSON).unwrap();
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!(tok.vocab_size(), 10);
        // BERT pre-tokenizer splits punctuation, the normalizer lowercases, WordPiece takes the
        // longest prefix ("world" + "##s").
        assert_eq!(tok.encode("Hello worlds!").unwrap(), vec![4, 5, 9, 6]);
        assert_eq!(tok.encode("hello xyz").unwrap(), vec![4, 1]);
        let Tokenizer::Hf(hf) = &tok else {
            panic!("expected a Hugging Face tokenizer")
        };
        assert_eq!(
            hf.encode_with_special_tokens("hello").unwrap(),
            vec![2, 4, 3]
        );
        assert_eq!(tok.decode(&[2, 4, 5, 6, 3]).unwrap(), "hello world!");
        let sp = tok.special_ids();
        assert_eq!(
            (sp.pad, sp.unk, sp.bos, sp.eos),
            (Some(0), Some(1), None, None)
        );

        std::fs::write(&path, r#"{"model": 3}"#).unwrap();
        let e = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("Hugging Face"),
            "{e}"
        );
    }

    /// Stream `ids` through a [`StreamDecoder`]; returns the pieces and the final flush.
    fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut dec = tok.stream_decoder();
        let pieces = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
        (pieces, dec.finish().unwrap())
    }

    #[test]
    fn stream_decoder_matches_full_decode() {
        let text = "Speak, speak 🙂 é你好!\nAll";
        for tok in [Tokenizer::char_level(text, &[], None).unwrap(), bpe(300)] {
            let ids = tok.encode(text).unwrap();
            let (pieces, rest) = stream(&tok, &ids);
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
            assert_eq!(rest, "");
            assert_eq!(pieces.concat(), text);
        }
        // Byte-level BPE spells the unseen emoji as 4 byte tokens: nothing until the last one.
        let tok = bpe(300);
        let ids = tok.encode("🙂").unwrap();
        assert_eq!(ids.len(), 4);
        let (pieces, _) = stream(&tok, &ids);
        assert_eq!(pieces, vec!["", "", "", "🙂"]);
        // Generation stopped mid-character: finish flushes what decode would give.
        let (pieces, rest) = stream(&tok, &ids[..2]);
        assert_eq!(pieces.concat() + &rest, tok.decode(&ids[..2]).unwrap());
        // WordPiece joins "##" pieces to the previous word.
        let wp = Tokenizer::Hf(HfTokenizer::from_json(WORDPIECE_JSON, "test").unwrap());
        let (pieces, _) = stream(&wp, &[4, 7, 8, 9, 6]);
        assert_eq!(pieces.concat(), wp.decode(&[4, 7, 8, 9, 6]).unwrap());
    }

    #[test]
    fn config_defaults_validation_and_build() {
        let cfg: TokenizerConfig = serde_json::from_str(r#"{"kind": "bpe"}"#).unwrap();
        assert_eq!(cfg.kind, TokenizerKind::Bpe);
        assert_eq!(cfg.vocab_size, TokenizerConfig::default().vocab_size);
        let e = serde_json::from_str::<TokenizerConfig>(r#"{"kind": "char", "vocab": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab"), "{e}");
        assert!(serde_json::from_str::<TokenizerConfig>(r#"{"kind": "word"}"#).is_err());

        let file_without_path = TokenizerConfig {
            kind: TokenizerKind::File,
            ..Default::default()
        };
        assert!(file_without_path.validate().is_err());
        let char_with_path = TokenizerConfig {
            path: Some("tok.json".into()),
            ..Default::default()
        };
        assert!(char_with_path.validate().is_err());
        assert!(TokenizerConfig::default().build(None).is_err());

        let cfg = TokenizerConfig {
            unk: Some("<unk>".into()),
            ..Default::default()
        };
        let tok = cfg.build(Some("abc")).unwrap();
        assert_eq!(tok.encode("abz").unwrap(), vec![0, 1, 3]);

        let cfg = TokenizerConfig {
            kind: TokenizerKind::Bpe,
            vocab_size: 280,
            special_tokens: strings(&["<pad>", "<eos>"]),
            unk: Some("<unk>".into()),
            ..Default::default()
        };
        let tok = cfg.build(Some(CORPUS)).unwrap();
        assert!(tok.vocab_size() <= 280);
        assert_eq!(
            (tok.pad_id(), tok.eos_id(), tok.unk_id()),
            (Some(0), Some(1), Some(2))
        );

        let dir = TempDir::new("tok_cfg");
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let cfg = TokenizerConfig {
            kind: TokenizerKind::File,
            path: Some(path),
            ..Default::default()
        };
        assert_eq!(cfg.build(None).unwrap().vocab_size(), tok.vocab_size());
    }
}
