//! Parity with PyTorch: every fixture in `tests/fixtures/parity` (made by
//! `tests/fixtures/gen_parity.py`, format in `tests/fixtures/README.md`) is rebuilt with our
//! modules, loaded through the PyTorch importer, and compared tensor by tensor: the forward
//! outputs (and attention weights) within 1e-5, and the gradients of
//! loss = (out * grad_out).sum() w.r.t. every parameter and every input within 1e-4.
//!
//! Dimension letters: `B` batch, `T` query/target positions, `S` key/source positions,
//! `E` = d_model, `H` heads, `D` = E / H.
//!
//! Run with `--nocapture` to see the max difference of every tensor.

use candle_core::{DType, Device, Tensor};
use transformer::import::pytorch::{float_mask, load_state_dict, mha_bool_mask, sdpa_bool_mask};
use transformer::nn::{
    scaled_dot_product_attention, Activation, AttnMask, Decoder, DecoderLayer, Encoder,
    EncoderLayer, LayerConfig, Masks, MhaConfig, MhaInput, MultiHeadAttention, NeedWeights, Norm,
    SdpaOptions, VarStore,
};
use transformer::Result;

use fixture::{Convention, Fixture};

/// Forward outputs and attention weights.
const FORWARD_TOL: f32 = 1e-5;
/// Gradients (longer chains of f32 rounding).
const GRAD_TOL: f32 = 1e-4;

/// The main output and, where the case returns them, the attention weights.
struct Forward {
    out: Tensor,
    weights: Option<Tensor>,
}

/// Build the case's module, load PyTorch's parameters, run forward and backward, and compare.
fn run(case: &str) -> Result<()> {
    let fx = Fixture::load(case)?;
    assert_eq!(
        fx.meta("case")?,
        case,
        "file {case}.safetensors holds another case"
    );
    let vs = VarStore::new(DType::F32, &Device::Cpu, fixture::INIT, 0);
    let fwd = if case.starts_with("mha_") {
        forward_mha(&fx, &vs)?
    } else if case.starts_with("encoder_layer_") {
        forward_encoder_layer(&fx, &vs)?
    } else if case.starts_with("decoder_layer_") {
        forward_decoder_layer(&fx, &vs)?
    } else if case == "transformer_full" {
        forward_transformer_full(&fx, &vs)?
    } else if case.starts_with("sdpa_") {
        forward_sdpa(&fx)?
    } else if case == "layer_norm" {
        forward_layer_norm(&fx, &vs)?
    } else {
        panic!("no parity test knows the fixture case {case}");
    };

    fx.check("output.out", &fwd.out, FORWARD_TOL)?;
    match (&fwd.weights, fx.has("output.weights")) {
        (Some(w), true) => fx.check("output.weights", w, FORWARD_TOL)?,
        (None, false) => {}
        (w, has) => fx.fail(format!(
            "attention weights: ours present {}, PyTorch's present {has}",
            w.is_some()
        )),
    }

    let loss = fwd.out.mul(&fx.tensor("input.grad_out")?)?.sum_all()?;
    let grads = loss.backward()?;
    fx.check_grads(&vs, &grads, GRAD_TOL)?;
    fx.finish()
}

/// Layer hyperparameters from the fixture's flags (dropout 0: PyTorch ran in `eval()`).
fn layer_config(fx: &Fixture, d_model: usize) -> Result<LayerConfig> {
    let activation = match fx.meta("activation")? {
        "relu" => Activation::Relu,
        // PyTorch's "gelu" is the exact erf GELU.
        "gelu" => Activation::Gelu,
        other => panic!("{}: unknown activation {other}", fx.case()),
    };
    Ok(LayerConfig::new(
        d_model,
        fx.meta_parse("nhead")?,
        fx.meta_parse("dim_feedforward")?,
        0.0,
        activation,
        fx.meta_parse("norm_first")?,
        fx.meta_parse("layer_norm_eps")?,
        true,
    ))
}

/// `nn.MultiheadAttention(E, H, kdim, vdim, bias, batch_first=True)`, self- or cross-attention.
fn forward_mha(fx: &Fixture, vs: &VarStore) -> Result<Forward> {
    let query_name = if fx.has("input.x") { "x" } else { "query" };
    let d_model = fx.tensor(&format!("input.{query_name}"))?.dims3()?.2;
    let cfg = MhaConfig {
        kdim: fx.meta_opt_parse("kdim")?,
        vdim: fx.meta_opt_parse("vdim")?,
        bias: fx.meta_opt_parse("bias")?.unwrap_or(true),
        ..MhaConfig::new(d_model, fx.meta_parse("nhead")?)
    };
    let attn = MultiHeadAttention::new(&cfg, &vs.root())?;
    fx.load_params(vs)?;

    let kpm = fx.opt_mask("key_padding_mask", Convention::Mha)?; // (B, S)
    let attn_mask = fx.opt_mask("attn_mask", Convention::Mha)?; // (T, S) or (B·H, T, S)
                                                                // PyTorch's defaults: need_weights=True, average_attn_weights=True.
    let need_weights = match (
        fx.meta_opt_parse::<bool>("need_weights")?,
        fx.meta_opt_parse::<bool>("average_attn_weights")?,
    ) {
        (Some(false), _) => NeedWeights::No,
        (_, Some(false)) => NeedWeights::PerHead,
        _ => NeedWeights::Averaged,
    };
    let query = fx.input(query_name)?; // (B, T, E)
    let (key, value) = if query_name == "x" {
        (None, None)
    } else {
        (Some(fx.input("key")?), Some(fx.input("value")?)) // (B, S, kdim), (B, S, vdim)
    };
    let input = match (&key, &value) {
        (Some(k), Some(v)) => MhaInput::qkv(&query, k, v),
        _ => MhaInput::self_attn(&query),
    };
    let out = attn.forward(
        input
            .key_padding_mask(kpm.as_ref())
            .attn_mask(attn_mask.as_ref())
            .need_weights(need_weights)
            .train(false),
    )?;
    Ok(Forward {
        out: out.context,
        weights: out.weights,
    })
}

/// `nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)`, post- or pre-norm.
fn forward_encoder_layer(fx: &Fixture, vs: &VarStore) -> Result<Forward> {
    let src = fx.input("src")?; // (B, T, E)
    let cfg = layer_config(fx, src.dims3()?.2)?;
    let layer = EncoderLayer::new(&cfg, &vs.root())?;
    fx.load_params(vs)?;
    let src_mask = fx.mask("src_mask", Convention::Mha)?; // (T, T)
    let src_kpm = fx.mask("src_key_padding_mask", Convention::Mha)?; // (B, T)
    let masks = Masks::none()
        .with_attn(Some(&src_mask))
        .with_key_padding(Some(&src_kpm));
    let out = layer.forward(&src, &masks, false)?;
    Ok(Forward { out, weights: None })
}

/// `nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=True)`, post- or pre-norm.
fn forward_decoder_layer(fx: &Fixture, vs: &VarStore) -> Result<Forward> {
    let tgt = fx.input("tgt")?; // (B, T, E)
    let memory = fx.input("memory")?; // (B, S, E)
    let cfg = layer_config(fx, tgt.dims3()?.2)?;
    let layer = DecoderLayer::new(&cfg, &vs.root())?;
    fx.load_params(vs)?;
    let (tgt_mask, tgt_kpm, memory_mask, memory_kpm) = decoder_masks(fx)?;
    let tgt_masks = Masks::none()
        .with_attn(Some(&tgt_mask))
        .with_key_padding(Some(&tgt_kpm));
    let mem_masks = Masks::none()
        .with_attn(Some(&memory_mask))
        .with_key_padding(Some(&memory_kpm));
    let out = layer.forward(&tgt, &memory, &tgt_masks, &mem_masks, false)?;
    Ok(Forward { out, weights: None })
}

/// The decoder's four masks, in PyTorch's `nn.Transformer*` convention (True = masked out):
/// `tgt_mask` (T, T), `tgt_key_padding_mask` (B, T), `memory_mask` (T, S),
/// `memory_key_padding_mask` (B, S).
fn decoder_masks(fx: &Fixture) -> Result<(AttnMask, AttnMask, AttnMask, AttnMask)> {
    Ok((
        fx.mask("tgt_mask", Convention::Mha)?,
        fx.mask("tgt_key_padding_mask", Convention::Mha)?,
        fx.mask("memory_mask", Convention::Mha)?,
        fx.mask("memory_key_padding_mask", Convention::Mha)?,
    ))
}

/// `nn.Transformer(E, H, n_enc, n_dec, FF, dropout=0.0, batch_first=True)`: encoder and
/// decoder stacks, each with its final norm, under the `encoder.` and `decoder.` prefixes.
fn forward_transformer_full(fx: &Fixture, vs: &VarStore) -> Result<Forward> {
    let src = fx.input("src")?; // (B, S, E)
    let tgt = fx.input("tgt")?; // (B, T, E)
    let cfg = layer_config(fx, src.dims3()?.2)?;
    let root = vs.root();
    let encoder = Encoder::new(
        &cfg,
        fx.meta_parse("num_encoder_layers")?,
        true,
        &root.pp("encoder"),
    )?;
    let decoder = Decoder::new(
        &cfg,
        fx.meta_parse("num_decoder_layers")?,
        true,
        &root.pp("decoder"),
    )?;
    fx.load_params(vs)?;

    let src_mask = fx.mask("src_mask", Convention::Mha)?; // (S, S), float here
    let src_kpm = fx.mask("src_key_padding_mask", Convention::Mha)?; // (B, S)
    let src_masks = Masks::none()
        .with_attn(Some(&src_mask))
        .with_key_padding(Some(&src_kpm));
    let memory = encoder.forward(&src, &src_masks, false)?; // (B, S, E)

    let (tgt_mask, tgt_kpm, memory_mask, memory_kpm) = decoder_masks(fx)?;
    let tgt_masks = Masks::none()
        .with_attn(Some(&tgt_mask))
        .with_key_padding(Some(&tgt_kpm));
    let mem_masks = Masks::none()
        .with_attn(Some(&memory_mask))
        .with_key_padding(Some(&memory_kpm));
    let out = decoder.forward(&tgt, &memory, &tgt_masks, &mem_masks, false)?; // (B, T, E)
    Ok(Forward { out, weights: None })
}

/// `F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale)`; its bool mask
/// means True = may attend.
fn forward_sdpa(fx: &Fixture) -> Result<Forward> {
    let q = fx.input("query")?; // (B, H, T, D)
    let k = fx.input("key")?; // (B, H, S, D)
    let v = fx.input("value")?; // (B, H, S, D)
    let attn_mask = fx.opt_mask("attn_mask", Convention::Sdpa)?; // (T, S)
    let opts = SdpaOptions {
        attn_mask: attn_mask.as_ref(),
        causal: fx.meta_parse("causal")?,
        scale: fx.meta_opt_parse("scale")?,
        train: false,
        ..Default::default()
    };
    let out = scaled_dot_product_attention(&q, &k, &v, &opts)?.context; // (B, H, T, D)
    Ok(Forward { out, weights: None })
}

/// `nn.LayerNorm(E)` with its weight and bias at the root.
fn forward_layer_norm(fx: &Fixture, vs: &VarStore) -> Result<Forward> {
    let x = fx.input("x")?; // (B, T, E)
    let norm = Norm::layer_norm(x.dims3()?.2, fx.meta_parse("eps")?, true, &vs.root())?;
    fx.load_params(vs)?;
    Ok(Forward {
        out: norm.forward(&x)?,
        weights: None,
    })
}

/// One test per fixture file; `every_fixture_file_has_a_test` keeps this list complete.
macro_rules! parity_cases {
    ($($case:ident),* $(,)?) => {
        const CASES: &[&str] = &[$(stringify!($case)),*];
        $(
            #[test]
            fn $case() -> Result<()> {
                run(stringify!($case))
            }
        )*
    };
}

parity_cases!(
    mha_kpm_boolmask,
    mha_floatmask_perhead,
    mha_kdim_vdim_nobias,
    encoder_layer_post_relu,
    encoder_layer_pre_relu,
    encoder_layer_post_gelu,
    encoder_layer_pre_gelu,
    decoder_layer_post,
    decoder_layer_pre,
    transformer_full,
    sdpa_bool_allow,
    sdpa_causal,
    sdpa_scale,
    layer_norm,
);

#[test]
fn every_fixture_file_has_a_test() -> std::io::Result<()> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(fixture::dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                files.push(stem.to_string());
            }
        }
    }
    files.sort();
    let mut cases: Vec<String> = CASES.iter().map(|c| c.to_string()).collect();
    cases.sort();
    assert_eq!(files, cases, "fixture files and parity tests differ");
    Ok(())
}

/// Reading a fixture file and comparing our tensors with it.
mod fixture {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;
    use std::str::FromStr;

    use candle_core::backprop::GradStore;
    use candle_core::{DType, Device, Tensor, Var};
    use transformer::import::pytorch::map_state_dict;
    use transformer::nn::{AttnMask, InitScheme, VarStore};
    use transformer::{Error, Result};

    use super::{float_mask, load_state_dict, mha_bool_mask, sdpa_bool_mask};

    /// Initial values are overwritten by the load; any scheme would do.
    pub const INIT: InitScheme = InitScheme::XavierUniform;

    /// `tests/fixtures/parity` at the workspace root, whatever the current directory.
    pub fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
    }

    /// Which PyTorch API a bool mask was given to (they read True oppositely).
    #[derive(Clone, Copy)]
    pub enum Convention {
        /// `nn.MultiheadAttention` / `nn.Transformer*`: True = masked out.
        Mha,
        /// `F.scaled_dot_product_attention`: True = may attend.
        Sdpa,
    }

    /// One fixture file, the inputs we made `Var`s of, and the failures found so far.
    pub struct Fixture {
        case: String,
        tensors: HashMap<String, Tensor>,
        meta: HashMap<String, String>,
        inputs: RefCell<Vec<(String, Var)>>,
        failures: RefCell<Vec<String>>,
    }

    impl Fixture {
        pub fn load(case: &str) -> Result<Self> {
            let path = dir().join(format!("{case}.safetensors"));
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
            let meta = header.metadata().clone().unwrap_or_default();
            let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
            println!("== {case}");
            Ok(Fixture {
                case: case.to_string(),
                tensors,
                meta,
                inputs: RefCell::new(Vec::new()),
                failures: RefCell::new(Vec::new()),
            })
        }

        pub fn case(&self) -> &str {
            &self.case
        }

        pub fn has(&self, key: &str) -> bool {
            self.tensors.contains_key(key)
        }

        pub fn tensor(&self, key: &str) -> Result<Tensor> {
            self.tensors
                .get(key)
                .cloned()
                .ok_or_else(|| Error::msg(format!("{}: no tensor {key}", self.case)))
        }

        pub fn meta(&self, key: &str) -> Result<&str> {
            self.meta
                .get(key)
                .map(String::as_str)
                .ok_or_else(|| Error::msg(format!("{}: no metadata {key}", self.case)))
        }

        /// A metadata flag parsed as `T` (booleans are "true" / "false").
        pub fn meta_parse<T: FromStr>(&self, key: &str) -> Result<T> {
            let s = self.meta(key)?;
            s.parse().map_err(|_| {
                Error::msg(format!(
                    "{}: metadata {key} = {s:?} does not parse",
                    self.case
                ))
            })
        }

        pub fn meta_opt_parse<T: FromStr>(&self, key: &str) -> Result<Option<T>> {
            if self.meta.contains_key(key) {
                self.meta_parse(key).map(Some)
            } else {
                Ok(None)
            }
        }

        /// The float input `input.<name>` as a `Var`, so that its gradient is recorded.
        pub fn input(&self, name: &str) -> Result<Tensor> {
            let var = Var::from_tensor(&self.tensor(&format!("input.{name}"))?)?;
            let t = var.as_tensor().clone();
            self.inputs.borrow_mut().push((name.to_string(), var));
            Ok(t)
        }

        /// `mask.<name>` converted at the import boundary, by its metadata type (bool / float)
        /// and, for bool masks, the convention of the PyTorch API that received it.
        pub fn mask(&self, name: &str, convention: Convention) -> Result<AttnMask> {
            let t = self.tensor(&format!("mask.{name}"))?;
            Ok(match (self.meta(&format!("mask.{name}"))?, convention) {
                ("bool", _) if t.dtype() != DType::U8 => {
                    return Err(Error::msg(format!(
                        "{}: bool mask {name} is not u8",
                        self.case
                    )))
                }
                ("bool", Convention::Mha) => mha_bool_mask(t),
                ("bool", Convention::Sdpa) => sdpa_bool_mask(t),
                ("float", _) => float_mask(t),
                (other, _) => {
                    return Err(Error::msg(format!(
                        "{}: mask {name} of type {other}",
                        self.case
                    )))
                }
            })
        }

        pub fn opt_mask(&self, name: &str, convention: Convention) -> Result<Option<AttnMask>> {
            if self.has(&format!("mask.{name}")) {
                self.mask(name, convention).map(Some)
            } else {
                Ok(None)
            }
        }

        /// The tensors whose key starts with `prefix` (`param.`, `grad.param.`, `grad.input.`),
        /// keyed by the rest: PyTorch's `state_dict` names for parameters.
        pub fn torch_params(&self, prefix: &str) -> HashMap<String, Tensor> {
            self.tensors
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.clone())))
                .collect()
        }

        /// Load every `param.*` into `vs` through the PyTorch importer, strictly.
        pub fn load_params(&self, vs: &VarStore) -> Result<()> {
            load_state_dict(vs, &self.torch_params("param."), &self.case)
        }

        /// Print the max |ours − theirs| of `key` and record a failure above `tol`.
        pub fn check(&self, key: &str, ours: &Tensor, tol: f32) -> Result<()> {
            let theirs = self.tensor(key)?;
            self.compare(key, ours, &theirs, tol)
        }

        fn compare(&self, name: &str, ours: &Tensor, theirs: &Tensor, tol: f32) -> Result<()> {
            if ours.dims() != theirs.dims() {
                self.fail(format!(
                    "{name}: shape {:?}, PyTorch's {:?}",
                    ours.dims(),
                    theirs.dims()
                ));
                return Ok(());
            }
            let a = ours.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let b = theirs
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // NaN anywhere makes the difference NaN, which fails the check.
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, |m, d| {
                    if d.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.max(d)
                    }
                });
            println!("{name}: max diff {d:e}");
            if d.is_nan() || d > tol {
                self.fail(format!("{name}: max diff {d:e} > {tol:e}"));
            }
            Ok(())
        }

        /// Compare the gradient of every parameter and every input we made a `Var` of with
        /// PyTorch's `grad.param.*` / `grad.input.*`.
        ///
        /// Parameter gradients go through the same name mapping as the weights
        /// (`map_state_dict`), so a packed `in_proj_bias` gradient is split like the bias
        /// itself when the model has separate q/k/v projections.
        pub fn check_grads(&self, vs: &VarStore, grads: &GradStore, tol: f32) -> Result<()> {
            let expected: BTreeMap<String, Tensor> =
                map_state_dict(&self.torch_params("grad.param."))?
                    .into_iter()
                    .collect();
            let ours: BTreeMap<String, Var> = vs.vars().into_iter().collect();
            if !expected.keys().eq(ours.keys()) {
                self.fail(format!(
                    "gradient names: ours {:?}, PyTorch's (mapped) {:?}",
                    ours.keys().collect::<Vec<_>>(),
                    expected.keys().collect::<Vec<_>>()
                ));
            }
            for (name, theirs) in &expected {
                let Some(var) = vs.get(name) else { continue };
                self.compare_grad(&format!("grad.param.{name}"), &var, grads, theirs, tol)?;
            }

            let inputs = self.inputs.borrow();
            for name in self.torch_params("grad.input.").keys() {
                if !inputs.iter().any(|(n, _)| n == name) {
                    self.fail(format!(
                        "input {name} has a PyTorch gradient but was not used"
                    ));
                }
            }
            for (name, var) in inputs.iter() {
                let key = format!("grad.input.{name}");
                let theirs = self.tensor(&key)?;
                self.compare_grad(&key, var, grads, &theirs, tol)?;
            }
            Ok(())
        }

        fn compare_grad(
            &self,
            name: &str,
            var: &Var,
            grads: &GradStore,
            theirs: &Tensor,
            tol: f32,
        ) -> Result<()> {
            match grads.get(var.as_tensor()) {
                Some(g) => self.compare(name, g, theirs, tol),
                None => {
                    // No gradient recorded: compare zeros, which only PyTorch's zeros match.
                    println!("{name}: no gradient recorded");
                    self.compare(name, &var.as_tensor().zeros_like()?, theirs, tol)
                }
            }
        }

        pub fn fail(&self, msg: String) {
            println!("FAIL {msg}");
            self.failures.borrow_mut().push(msg);
        }

        /// Panic with every failure of the case (all diffs are printed before that).
        pub fn finish(&self) -> Result<()> {
            let failures = self.failures.borrow();
            assert!(
                failures.is_empty(),
                "{}: {} parity failure(s):\n  {}",
                self.case,
                failures.len(),
                failures.join("\n  ")
            );
            Ok(())
        }
    }
}
