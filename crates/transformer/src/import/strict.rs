//! Strict renaming of another framework's state dict into our parameter names, shared by the
//! Hugging Face importers (BERT, ViT, Whisper): every parameter of the model must be found
//! with its shape, and every tensor of the file must be used or ignored by name. A checkpoint
//! that loads without complaint is then one that fills the whole model and nothing else,
//! which is what catches a config that does not match its weights. Errors name the file and
//! the tensor as the file spells it.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// One pass over a state dict. Look tensors up with [`take`](Self::take) and its variants,
/// which note what is used and what is missing; [`finish`](Self::finish) reports both.
pub(crate) struct StrictRename<'a> {
    hf: &'a HashMap<String, Tensor>,
    source_name: &'a str,
    used: HashSet<String>,
    missing: Vec<String>,
}

impl<'a> StrictRename<'a> {
    /// Renaming from `hf`, read from `source_name` (the file, for the errors).
    pub fn new(hf: &'a HashMap<String, Tensor>, source_name: &'a str) -> Self {
        StrictRename {
            hf,
            source_name,
            used: HashSet::new(),
            missing: Vec::new(),
        }
    }

    /// An error about this file.
    pub fn error(&self, msg: String) -> Error {
        Error::Weights {
            source_name: self.source_name.to_string(),
            msg,
        }
    }

    /// Every parameter of `params` (name, shape) from the tensors that `source` names for it,
    /// taken by `take`; a parameter without a source is an error (`checkpoints` say whose).
    /// A parameter whose tensors are missing is left out (and reported by
    /// [`finish`](Self::finish)).
    pub fn rename_all<S>(
        &mut self,
        params: &[(String, Vec<usize>)],
        checkpoints: &str,
        source: impl Fn(&str) -> Option<S>,
        mut take: impl FnMut(&mut Self, S, &[usize]) -> Result<Option<Tensor>>,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (ours, shape) in params {
            let s = source(ours).ok_or_else(|| {
                self.error(format!(
                    "the model has a parameter {ours} that {checkpoints} checkpoints do not hold"
                ))
            })?;
            if let Some(t) = take(self, s, shape)? {
                out.insert(ours.clone(), t);
            }
        }
        Ok(out)
    }

    /// The tensor `name` without marking it used (to look at its shape first).
    pub fn peek(&self, name: &str) -> Option<&'a Tensor> {
        self.hf.get(name)
    }

    /// Mark `name` used, when the file holds it (a tied copy that is checked, not loaded).
    pub fn mark_used(&mut self, name: &str) {
        if self.hf.contains_key(name) {
            self.used.insert(name.to_string());
        }
    }

    /// The first of the alternative names `names` that the file holds, of shape `expected`,
    /// in f32. None when it holds none of them: the first name is then noted missing.
    pub fn take(&mut self, names: &[String], expected: &[usize]) -> Result<Option<Tensor>> {
        self.take_with(names, expected, |t| t.dims() == expected)
    }

    /// Like [`take`](Self::take), but any shape with `expected`'s element count is accepted
    /// if `accept` says so, and the tensor is reshaped (row-major) to `expected`.
    pub fn take_reshaped(
        &mut self,
        names: &[String],
        expected: &[usize],
        accept: impl Fn(&[usize]) -> bool,
    ) -> Result<Option<Tensor>> {
        let count: usize = expected.iter().product();
        let t = self.take_with(names, expected, |t| {
            t.elem_count() == count && (t.dims() == expected || accept(t.dims()))
        })?;
        t.map(|t| Ok(t.reshape(expected)?)).transpose()
    }

    /// Parts stacked along dim 0 into one parameter of shape `expected` (fused projections:
    /// query, key and value into one `in_proj`), each part `expected[0] / parts.len()` rows.
    /// A part that is None is zeros (a bias the reference model does not have). None when
    /// any part is missing.
    pub fn take_stacked(
        &mut self,
        parts: &[Option<Vec<String>>],
        expected: &[usize],
    ) -> Result<Option<Tensor>> {
        let mut part_shape = expected.to_vec();
        part_shape[0] /= parts.len();
        let mut tensors = Vec::with_capacity(parts.len());
        for part in parts {
            match part {
                None => tensors.push(Tensor::zeros(
                    part_shape.as_slice(),
                    DType::F32,
                    &Device::Cpu,
                )?),
                Some(names) => {
                    if let Some(t) = self.take(names, &part_shape)? {
                        tensors.push(t);
                    }
                }
            }
        }
        if tensors.len() < parts.len() {
            return Ok(None);
        }
        Ok(Some(if tensors.len() == 1 {
            tensors.pop().expect("one part")
        } else {
            Tensor::cat(&tensors, 0)?
        }))
    }

    fn take_with(
        &mut self,
        names: &[String],
        expected: &[usize],
        fits: impl Fn(&Tensor) -> bool,
    ) -> Result<Option<Tensor>> {
        let Some((name, t)) = names.iter().find_map(|n| self.hf.get(n).map(|t| (n, t))) else {
            if let Some(first) = names.first() {
                self.missing.push(first.clone());
            }
            return Ok(None);
        };
        if !fits(t) {
            return Err(self.error(format!(
                "tensor {name}: expected shape {expected:?}, got {:?}",
                t.dims()
            )));
        }
        self.used.insert(name.clone());
        Ok(Some(t.to_dtype(DType::F32)?))
    }

    /// The end of the pass: an error listing the missing tensors, if any; else one listing
    /// the tensors neither used nor `ignored` (by full name), which `model` (as its config
    /// describes it) does not use.
    pub fn finish(self, ignored: impl Fn(&str) -> bool, model: &str) -> Result<()> {
        if !self.missing.is_empty() {
            return Err(self.error(format!("missing tensors: {}", self.missing.join(", "))));
        }
        let mut unused: Vec<&str> = self
            .hf
            .keys()
            .filter(|k| !self.used.contains(*k) && !ignored(k))
            .map(String::as_str)
            .collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(self.error(format!(
                "tensors {model} (as config.json describes it) does not use: {}",
                unused.join(", ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict() -> HashMap<String, Tensor> {
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        HashMap::from([
            ("a.weight".to_string(), t(&[2, 3])),
            ("q".to_string(), t(&[2, 3])),
            ("v".to_string(), t(&[2, 3])),
            ("conv".to_string(), t(&[4, 1, 2, 2])),
            ("extra".to_string(), t(&[1])),
        ])
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn message(r: Result<()>) -> String {
        r.expect_err("an error").to_string()
    }

    #[test]
    fn a_full_pass_uses_every_tensor() -> Result<()> {
        let hf = dict();
        let mut r = StrictRename::new(&hf, "w.safetensors");
        // The second alternative is the one the file holds.
        let a = r.take(&names(&["a.gamma", "a.weight"]), &[2, 3])?;
        assert_eq!(a.map(|t| t.dims().to_vec()), Some(vec![2, 3]));
        let qkv = r.take_stacked(&[Some(names(&["q"])), None, Some(names(&["v"]))], &[6, 3])?;
        assert_eq!(qkv.map(|t| t.dims().to_vec()), Some(vec![6, 3]));
        let conv = r.take_reshaped(&names(&["conv"]), &[4, 4], |d| d.len() == 4)?;
        assert_eq!(conv.map(|t| t.dims().to_vec()), Some(vec![4, 4]));
        r.finish(|n| n == "extra", "the model")
    }

    #[test]
    fn errors_name_the_file_and_the_tensor() -> Result<()> {
        let hf = dict();
        let mut r = StrictRename::new(&hf, "w.safetensors");
        let e = r
            .take(&names(&["a.weight"]), &[3, 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("w.safetensors")
                && e.contains("tensor a.weight: expected shape [3, 2], got [2, 3]"),
            "{e}"
        );
        let e = r
            .take_reshaped(&names(&["conv"]), &[4, 4], |d| d.len() == 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor conv"), "{e}");

        let mut r = StrictRename::new(&hf, "w.safetensors");
        assert!(r.take(&names(&["b.weight", "b.gamma"]), &[2, 3])?.is_none());
        assert!(r
            .take_stacked(&[Some(names(&["q"])), Some(names(&["k"]))], &[4, 3])?
            .is_none());
        let e = message(r.finish(|_| true, "the model"));
        assert!(e.contains("missing tensors: b.weight, k"), "{e}");

        let mut r = StrictRename::new(&hf, "w.safetensors");
        r.take(&names(&["a.weight"]), &[2, 3])?;
        r.mark_used("q");
        let e = message(r.finish(|n| n == "conv", "our Whisper"));
        assert!(
            e.contains("tensors our Whisper (as config.json describes it) does not use: extra, v"),
            "{e}"
        );
        Ok(())
    }
}
