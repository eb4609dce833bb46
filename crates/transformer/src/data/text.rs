//! Language-model data: one text file → one token stream → train/val split → batches of
//! random windows (nanoGPT's `get_batch`), plus exact evaluation over every token.
//!
//! Dimension letters: `B` batch, `T` time (block size, the context length).

use std::path::Path;

use candle_core::{Device, Tensor};

use super::tokenizer::Tokenizer;
use crate::rng::Rng;
use crate::{Error, Result};

/// Read a whole UTF-8 text file. Errors name the path: a missing or unreadable file, an empty
/// file, and invalid UTF-8 (with the byte offset and line of the first bad byte).
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::msg(format!(
            "{}: the text file is empty",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::msg(format!(
            "{}: invalid UTF-8 at byte offset {offset} (line {line})",
            path.display()
        ))
    })
}

/// Which part of a [`LmDataset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The first `train_fraction` of the tokens.
    Train,
    /// The rest.
    Val,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

/// A batch of windows: `x` (B, T) inputs and `y` (B, T) next-token targets, both `u32`,
/// with `y[b, t] = x[b, t + 1]` for `t < T - 1`.
#[derive(Debug, Clone)]
pub struct LmBatch {
    /// Inputs, (B, T) u32.
    pub x: Tensor,
    /// Targets: the inputs shifted left by one, (B, T) u32.
    pub y: Tensor,
}

/// A token stream split into a training and a validation part, in order, as nanoGPT's
/// `prepare.py` does: `n = int(len * train_fraction)`, train = `[:n]`, val = `[n:]`. A split in
/// order (not shuffled) keeps validation text unseen even by overlapping training windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmDataset {
    train: Vec<u32>,
    val: Vec<u32>,
}

impl LmDataset {
    /// Split `tokens`: the first `floor(len * train_fraction)` train, the rest val.
    /// `train_fraction` must be in (0, 1].
    pub fn from_tokens(mut tokens: Vec<u32>, train_fraction: f64) -> Result<Self> {
        if !(train_fraction > 0.0 && train_fraction <= 1.0) {
            return Err(Error::Config(format!(
                "train_fraction must be in (0, 1], got {train_fraction}"
            )));
        }
        let n = (tokens.len() as f64 * train_fraction) as usize;
        let val = tokens.split_off(n);
        Ok(LmDataset { train: tokens, val })
    }

    /// Read `path` (see [`read_text`]), encode it with `tokenizer` and split it.
    pub fn from_file(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        train_fraction: f64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path)?;
        let tokens = tokenizer
            .encode(&text)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        Self::from_tokens(tokens, train_fraction)
    }

    /// The tokens of one split.
    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// The training tokens.
    pub fn train(&self) -> &[u32] {
        &self.train
    }

    /// The validation tokens.
    pub fn val(&self) -> &[u32] {
        &self.val
    }

    /// `batch_size` random windows of `block_size + 1` tokens from `split`
    /// (see [`random_windows`]); x and y are (B, T) with B = `batch_size`, T = `block_size`.
    pub fn batch(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<LmBatch> {
        random_windows(self.tokens(split), batch_size, block_size, rng, device).map_err(|e| match e
        {
            Error::Msg(m) => Error::Msg(format!("{split} split: {m}")),
            other => other,
        })
    }
}

/// nanoGPT's `get_batch`: draw `batch_size` start positions uniformly from
/// `[0, len - block_size)` and cut windows of `block_size + 1` tokens; x is the first
/// `block_size`, y the last `block_size`. Returns x, y of shape (B, T) u32 on `device`.
/// The same `rng` state gives the same batch.
pub fn random_windows(
    tokens: &[u32],
    batch_size: usize,
    block_size: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<LmBatch> {
    if batch_size == 0 || block_size == 0 {
        return Err(Error::Config(format!(
            "batch_size and block_size must be positive, got {batch_size} and {block_size}"
        )));
    }
    if tokens.len() < block_size + 1 {
        return Err(Error::msg(format!(
            "{} tokens are fewer than block_size + 1 = {} needed for one window",
            tokens.len(),
            block_size + 1
        )));
    }
    // Number of valid starts: a window at `start` needs tokens[start..=start + block_size].
    let n_starts = (tokens.len() - block_size) as u64;
    let mut x = Vec::with_capacity(batch_size * block_size); // (B, T) row-major
    let mut y = Vec::with_capacity(batch_size * block_size); // (B, T) row-major
    for _ in 0..batch_size {
        let start = rng.below(n_starts) as usize;
        x.extend_from_slice(&tokens[start..start + block_size]);
        y.extend_from_slice(&tokens[start + 1..start + 1 + block_size]);
    }
    Ok(LmBatch {
        x: Tensor::from_vec(x, (batch_size, block_size), device)?,
        y: Tensor::from_vec(y, (batch_size, block_size), device)?,
    })
}

/// One window of [`eval_windows`]: `inputs[t]` is followed by `targets[t]` in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalWindow<'a> {
    /// Position in the stream of `inputs[0]`.
    pub start: usize,
    /// Up to `block_size` input tokens.
    pub inputs: &'a [u32],
    /// The next token of each input (same length as `inputs`).
    pub targets: &'a [u32],
}

impl EvalWindow<'_> {
    /// Number of positions (T of this window; the last window may be shorter).
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Whether the window has no positions (never true for windows from [`eval_windows`]).
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// The window as a batch of one: x and y of shape (1, T) u32 on `device`.
    pub fn to_batch(&self, device: &Device) -> Result<LmBatch> {
        let t = self.inputs.len();
        Ok(LmBatch {
            x: Tensor::from_slice(self.inputs, (1, t), device)?,
            y: Tensor::from_slice(self.targets, (1, t), device)?,
        })
    }
}

/// Iterator over consecutive, non-overlapping windows of a token stream; see [`eval_windows`].
#[derive(Debug, Clone)]
pub struct EvalWindows<'a> {
    tokens: &'a [u32],
    block_size: usize,
    /// Start of the next window.
    pos: usize,
}

/// All non-overlapping windows of up to `block_size` inputs covering `tokens`, for an exact
/// evaluation: every token but the first is the target of exactly one position, and the last,
/// shorter window is included. Summing the per-position losses over all windows and dividing
/// by `tokens.len() - 1` gives the stream's mean loss (each window starts without context
/// from the previous one).
pub fn eval_windows(tokens: &[u32], block_size: usize) -> Result<EvalWindows<'_>> {
    if block_size == 0 {
        return Err(Error::Config(
            "block_size must be positive, got 0".to_string(),
        ));
    }
    Ok(EvalWindows {
        tokens,
        block_size,
        pos: 0,
    })
}

impl<'a> Iterator for EvalWindows<'a> {
    type Item = EvalWindow<'a>;

    fn next(&mut self) -> Option<EvalWindow<'a>> {
        // The last token has no successor, so inputs stop at len - 1.
        let n_inputs = self.tokens.len().saturating_sub(1);
        if self.pos >= n_inputs {
            return None;
        }
        let start = self.pos;
        let end = (start + self.block_size).min(n_inputs);
        self.pos = end;
        Some(EvalWindow {
            start,
            inputs: &self.tokens[start..end],
            targets: &self.tokens[start + 1..end + 1],
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.tokens.len().saturating_sub(1).saturating_sub(self.pos);
        let n = left.div_ceil(self.block_size);
        (n, Some(n))
    }
}

impl ExactSizeIterator for EvalWindows<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;

    #[test]
    fn read_text_errors_name_the_path() {
        let dir = TempDir::new("read_text");
        let missing = dir.path().join("missing.txt");
        let e = read_text(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.txt"), "{e}");

        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, b"").unwrap();
        let e = read_text(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");

        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"ok\nab\xffcd").unwrap();
        let e = read_text(&bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.txt") && e.contains("byte offset 5") && e.contains("line 2"),
            "{e}"
        );

        let good = dir.path().join("good.txt");
        std::fs::write(&good, "héllo\n").unwrap();
        assert_eq!(read_text(&good).unwrap(), "héllo\n");
    }

    #[test]
    fn split_is_first_ninety_percent() {
        let ds = LmDataset::from_tokens((0..1000).collect(), 0.9).unwrap();
        assert_eq!(ds.train().len(), 900);
        assert_eq!(ds.val().len(), 100);
        assert_eq!(ds.train()[899], 899);
        assert_eq!(ds.val()[0], 900);
        // nanoGPT's int(n * 0.9) floors.
        let ds = LmDataset::from_tokens((0..15).collect(), 0.9).unwrap();
        assert_eq!((ds.train().len(), ds.val().len()), (13, 2));
        assert!(LmDataset::from_tokens(vec![1, 2], 0.0).is_err());
        assert!(LmDataset::from_tokens(vec![1, 2], 1.5).is_err());
        assert!(LmDataset::from_tokens(vec![1, 2], f64::NAN).is_err());
    }

    #[test]
    fn from_file_encodes_and_splits() {
        let dir = TempDir::new("lm_from_file");
        let path = dir.path().join("input.txt");
        let text = "hello world\n".repeat(10);
        std::fs::write(&path, &text).unwrap();
        let tok = Tokenizer::char_level(&text, &[], None).unwrap();
        let ds = LmDataset::from_file(&path, &tok, 0.9).unwrap();
        assert_eq!(ds.train().len() + ds.val().len(), text.chars().count());
        let mut all = ds.train().to_vec();
        all.extend_from_slice(ds.val());
        assert_eq!(tok.decode(&all).unwrap(), text);
    }

    #[test]
    fn windows_shape_shift_and_determinism() {
        let tokens: Vec<u32> = (0..100).collect();
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        let b = random_windows(&tokens, 4, 8, &mut rng, &dev).unwrap();
        assert_eq!(b.x.dims(), &[4, 8]);
        assert_eq!(b.y.dims(), &[4, 8]);
        assert_eq!(b.x.dtype(), candle_core::DType::U32);
        let x = b.x.to_vec2::<u32>().unwrap();
        let y = b.y.to_vec2::<u32>().unwrap();
        for (xr, yr) in x.iter().zip(&y) {
            for t in 0..8 {
                // Tokens are their positions, so a window is consecutive integers.
                assert_eq!(yr[t], xr[t] + 1);
            }
            assert!(xr[0] + 8 < 100);
        }
        let mut rng2 = Rng::new(3);
        let b2 = random_windows(&tokens, 4, 8, &mut rng2, &dev).unwrap();
        assert_eq!(b2.x.to_vec2::<u32>().unwrap(), x);
        let b3 = random_windows(&tokens, 4, 8, &mut rng, &dev).unwrap();
        assert_ne!(b3.x.to_vec2::<u32>().unwrap(), x, "the rng state advances");
    }

    #[test]
    fn windows_reach_both_ends_and_fit_exactly() {
        // With len = block_size + 1 there is exactly one window.
        let tokens: Vec<u32> = (0..9).collect();
        let mut rng = Rng::new(0);
        let b = random_windows(&tokens, 3, 8, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(
            b.x.to_vec2::<u32>().unwrap(),
            vec![(0..8).collect::<Vec<_>>(); 3]
        );
        // Every start in [0, len - block_size) is drawn.
        let tokens: Vec<u32> = (0..12).collect();
        let b = random_windows(&tokens, 200, 8, &mut rng, &Device::Cpu).unwrap();
        let starts: std::collections::BTreeSet<u32> =
            b.x.to_vec2::<u32>().unwrap().iter().map(|r| r[0]).collect();
        assert_eq!(starts.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn too_short_split_names_both_numbers() {
        let ds = LmDataset::from_tokens((0..100).collect(), 0.95).unwrap();
        let e = ds
            .batch(Split::Val, 2, 8, &mut Rng::new(0), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("val split") && e.contains("5 tokens") && e.contains("= 9"),
            "{e}"
        );
        assert!(ds
            .batch(Split::Train, 2, 8, &mut Rng::new(0), &Device::Cpu)
            .is_ok());
    }

    #[test]
    fn eval_windows_cover_every_target_once() {
        for (len, block) in [(0, 4), (1, 4), (2, 4), (9, 4), (10, 3), (13, 4), (5, 100)] {
            let tokens: Vec<u32> = (0..len as u32).collect();
            let windows: Vec<_> = eval_windows(&tokens, block).unwrap().collect();
            assert_eq!(
                windows.len(),
                eval_windows(&tokens, block).unwrap().len(),
                "size_hint, len {len} block {block}"
            );
            let mut seen = vec![0usize; len];
            for w in &windows {
                assert!(!w.is_empty() && w.len() <= block);
                assert_eq!(w.inputs.len(), w.targets.len());
                for (t, (&i, &o)) in w.inputs.iter().zip(w.targets).enumerate() {
                    assert_eq!(i as usize, w.start + t);
                    assert_eq!(o, i + 1);
                    seen[o as usize] += 1;
                }
            }
            // Every token but the first is a target exactly once.
            let expect: Vec<usize> = (0..len).map(|i| usize::from(i > 0)).collect();
            assert_eq!(seen, expect, "len {len} block {block}");
        }
        let tokens: Vec<u32> = (0..10).collect();
        let last = eval_windows(&tokens, 4).unwrap().last().unwrap();
        let b = last.to_batch(&Device::Cpu).unwrap();
        assert_eq!(b.x.to_vec2::<u32>().unwrap(), vec![vec![8]]);
        assert_eq!(b.y.to_vec2::<u32>().unwrap(), vec![vec![9]]);
        assert!(eval_windows(&tokens, 0).is_err());
    }
}
