//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, checkpointable.
//!
//! The update is exactly `torch.optim.AdamW`'s, per parameter `p` with gradient `g` at its
//! `t`-th update (t counted from 1):
//!
//! ```text
//! p     <- p * (1 - lr * weight_decay)            (decoupled decay, only for decayed params)
//! m     <- beta1 * m + (1 - beta1) * g
//! v     <- beta2 * v + (1 - beta2) * g^2
//! p     <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Plain Adam is AdamW with `weight_decay = 0`; [`AdamWConfig::paper`] is the paper's
//! Adam(beta1 = 0.9, beta2 = 0.98, eps = 1e-9).
//!
//! candle-nn's `AdamW` keeps its moments private, so a run could not be resumed exactly; here
//! [`AdamW::state`] / [`AdamW::load_state`] export and import them as named tensors (for a
//! safetensors file) plus an [`AdamWState`] (for JSON).
//!
//! On CPU with f32/f64 parameters the update runs in place through three fused element-wise
//! kernels (no temporary tensors); elsewhere (CUDA, half precision) it falls back to composed
//! tensor ops and [`Var::set`].

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::kernels::adamw::{self, UpdateScalars};
use crate::kernels::Kernels;
use crate::{Error, Result};

/// AdamW hyperparameters other than the learning rate, which [`AdamW::step`] takes per step
/// (from an [`crate::train::LrSchedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Decay rate of the first-moment (mean) estimate (`betas[0]`).
    pub beta1: f64,
    /// Decay rate of the second-moment (uncentered variance) estimate (`betas[1]`).
    pub beta2: f64,
    /// Added to `sqrt(v_hat)` in the denominator, for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay coefficient, applied as `p -= lr * weight_decay * p` to the
    /// parameters of the decay group only; 0 gives plain Adam.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// "Attention Is All You Need", section 5.3: Adam with beta1 = 0.9, beta2 = 0.98,
    /// eps = 1e-9 and no weight decay.
    pub fn paper() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            weight_decay: 0.0,
        }
    }

    /// nanoGPT's `train.py` defaults: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    pub fn nanogpt() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }

    /// Checks the ranges PyTorch checks, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid(
                    format!("optimizer.{field} (adamw)"),
                    "in [0, 1)",
                    beta.to_string(),
                ));
            }
        }
        // eps > 0: AdamW divides by sqrt(v) + eps, and v is 0 for every parameter whose
        // gradient has been 0 so far (an unused embedding row), so eps = 0 turns those
        // updates into 0 / 0 = NaN. The same happens to an eps that rounds to 0 in f32.
        crate::validate::positive("optimizer.eps (adamw)", self.eps)?;
        if self.eps < f32::MIN_POSITIVE as f64 {
            return Err(Error::invalid(
                "optimizer.eps (adamw)",
                format!(
                    "at least {:e} (smaller rounds to 0 in f32, and m / (sqrt(v) + eps) becomes \
                     0 / 0 for parameters without gradient)",
                    f32::MIN_POSITIVE
                ),
                self.eps.to_string(),
            ));
        }
        crate::validate::non_negative("optimizer.weight_decay (adamw)", self.weight_decay)?;
        Ok(())
    }
}

/// The non-tensor part of the optimizer state, for a checkpoint's JSON: the number of updates
/// each parameter has received (its bias-correction step `t`). A parameter that never had a
/// gradient stays at 0, as in PyTorch, where its state does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWState {
    /// Parameter name -> number of updates applied to it.
    pub steps: BTreeMap<String, u64>,
}

/// The key of a parameter's first-moment tensor in [`AdamW::state`]'s map (`exp_avg` in
/// PyTorch's state dict).
pub fn exp_avg_key(name: &str) -> String {
    format!("{name}.exp_avg")
}

/// The key of a parameter's second-moment tensor in [`AdamW::state`]'s map (`exp_avg_sq`).
pub fn exp_avg_sq_key(name: &str) -> String {
    format!("{name}.exp_avg_sq")
}

/// One parameter with its optimizer state.
#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    /// Whether weight decay applies (the "decay" parameter group).
    decay: bool,
    /// Number of updates applied so far (`t` of the bias corrections).
    step: u64,
    /// First moment, same shape, dtype and device as the parameter. Owned: never shares
    /// storage with a tensor outside the optimizer, since the CPU path updates it in place.
    m: Tensor,
    /// Second moment, as `m`.
    v: Tensor,
}

/// AdamW over named parameters, with weight decay by parameter group. See the module docs for
/// the update rule.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    /// The in-place CPU kernels when the tensors allow it, or the composed ops (the reference
    /// they are tested against).
    kernels: Kernels,
}

/// nanoGPT's grouping: weight matrices and embeddings (rank >= 2) decay; biases and norm gains
/// (rank 1) and scalars do not.
pub fn decay_by_rank(_name: &str, var: &Var) -> bool {
    var.rank() >= 2
}

impl AdamW {
    /// AdamW over `params` (the model store's `(name, var)` list), with weight decay on the
    /// parameters of rank >= 2 only ([`decay_by_rank`]).
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::with_decay_filter(params, config, decay_by_rank)
    }

    /// AdamW over `params`, with weight decay on the parameters for which `decay(name, var)`
    /// is true.
    pub fn with_decay_filter(
        params: Vec<(String, Var)>,
        config: AdamWConfig,
        decay: impl Fn(&str, &Var) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::msg(format!(
                    "adamw: parameter `{name}` is listed twice"
                )));
            }
            if !var.dtype().is_float() {
                return Err(Error::msg(format!(
                    "adamw: parameter `{name}` has non-float dtype {:?}",
                    var.dtype()
                )));
            }
            let m = var.zeros_like()?;
            let v = var.zeros_like()?;
            out.push(Param {
                decay: decay(&name, &var),
                name,
                var,
                step: 0,
                m,
                v,
            });
        }
        Ok(AdamW {
            config,
            params: out,
            kernels: Kernels::from_env(),
        })
    }

    /// Update in place through the fused kernels or with composed ops (default:
    /// [`Kernels::from_env`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The key ([`exp_avg_key`] / [`exp_avg_sq_key`]) of the first moment holding a NaN or an
    /// infinity: checked before a checkpoint is saved, so that a diverged state never
    /// replaces a good one.
    pub fn first_non_finite_moment(&self) -> Result<Option<String>> {
        for p in &self.params {
            if !crate::validate::all_finite(&p.m)? {
                return Ok(Some(exp_avg_key(&p.name)));
            }
            if !crate::validate::all_finite(&p.v)? {
                return Ok(Some(exp_avg_sq_key(&p.name)));
            }
        }
        Ok(None)
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Names of the parameters with and without weight decay, in creation order:
    /// `(decayed, not_decayed)`.
    pub fn param_groups(&self) -> (Vec<&str>, Vec<&str>) {
        let mut decayed = Vec::new();
        let mut not_decayed = Vec::new();
        for p in &self.params {
            if p.decay {
                decayed.push(p.name.as_str());
            } else {
                not_decayed.push(p.name.as_str());
            }
        }
        (decayed, not_decayed)
    }

    /// Number of updates applied to parameter `name`, or `None` for an unknown name.
    pub fn step_count(&self, name: &str) -> Option<u64> {
        self.params.iter().find(|p| p.name == name).map(|p| p.step)
    }

    /// One AdamW update of every parameter that has a gradient in `grads`, in place, with
    /// learning rate `lr`. Parameters without a gradient are left alone, moments and step count
    /// included (as PyTorch skips parameters whose `.grad` is `None`).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !lr.is_finite() {
            return Err(Error::msg(format!(
                "adamw: learning rate must be finite, got {lr}"
            )));
        }
        let cfg = self.config;
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            if g.dims() != p.var.dims() {
                return Err(Error::shape(
                    format!("adamw: gradient of `{}`", p.name),
                    format!("{:?} (the parameter's shape)", p.var.dims()),
                    g.dims(),
                ));
            }
            if !p.var.is_contiguous() {
                // Both the in-place kernels and `Var::set` need this; parameters from a store
                // are always contiguous.
                return Err(Error::msg(format!(
                    "adamw: parameter `{}` is not contiguous",
                    p.name
                )));
            }
            let g = g.to_dtype(p.var.dtype())?.contiguous()?;
            p.step += 1;
            let t = p.step as f64;
            let scalars = UpdateScalars {
                decay_factor: if p.decay {
                    1.0 - lr * cfg.weight_decay
                } else {
                    1.0
                },
                step_size: lr / (1.0 - cfg.beta1.powf(t)),
                bias_correction2_sqrt: (1.0 - cfg.beta2.powf(t)).sqrt(),
                eps: cfg.eps,
            };
            let fusable = matches!(p.var.device(), Device::Cpu)
                && matches!(p.var.dtype(), DType::F32 | DType::F64);
            if self.kernels == Kernels::Fused && fusable {
                adamw::moment_update(&p.m, &g, cfg.beta1, false)?;
                adamw::moment_update(&p.v, &g, cfg.beta2, true)?;
                adamw::param_update(&p.var, &p.m, &p.v, scalars)?;
            } else {
                let m = ((&p.m * cfg.beta1)? + (&g * (1.0 - cfg.beta1))?)?;
                let v = ((&p.v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
                let denom = ((v.sqrt()? / scalars.bias_correction2_sqrt)? + scalars.eps)?;
                let decayed = if p.decay {
                    (p.var.as_tensor() * scalars.decay_factor)?
                } else {
                    p.var.as_tensor().clone()
                };
                let new = (decayed - (m.div(&denom)? * scalars.step_size)?)?;
                p.var.set(&new)?;
                p.m = m;
                p.v = v;
            }
        }
        Ok(())
    }

    /// The optimizer state for a checkpoint: step counts (for JSON) and, keyed by
    /// [`exp_avg_key`] / [`exp_avg_sq_key`], copies of both moments of every parameter (for a
    /// safetensors file).
    pub fn state(&self) -> Result<(AdamWState, HashMap<String, Tensor>)> {
        let mut steps = BTreeMap::new();
        let mut tensors = HashMap::with_capacity(2 * self.params.len());
        for p in &self.params {
            steps.insert(p.name.clone(), p.step);
            // Copies: the moments are updated in place by later steps.
            tensors.insert(exp_avg_key(&p.name), p.m.copy()?);
            tensors.insert(exp_avg_sq_key(&p.name), p.v.copy()?);
        }
        Ok((AdamWState { steps }, tensors))
    }

    /// Restores a state produced by [`AdamW::state`] (on this or another device or dtype: the
    /// tensors are converted to each parameter's). The names must be exactly this optimizer's
    /// parameters and the shapes theirs; on error, naming the parameter, nothing is changed.
    pub fn load_state(
        &mut self,
        state: &AdamWState,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let weights_err = |msg: String| Error::Weights {
            source_name: "optimizer state".into(),
            msg,
        };
        let ours: HashSet<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        if let Some(extra) = state.steps.keys().find(|k| !ours.contains(k.as_str())) {
            return Err(weights_err(format!(
                "step count for unknown parameter `{extra}`"
            )));
        }
        let mut expected_keys = HashSet::with_capacity(2 * self.params.len());
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let step = *state
                .steps
                .get(&p.name)
                .ok_or_else(|| weights_err(format!("no step count for parameter `{}`", p.name)))?;
            let m = load_moment(tensors, &exp_avg_key(&p.name), p)?;
            let v = load_moment(tensors, &exp_avg_sq_key(&p.name), p)?;
            expected_keys.insert(exp_avg_key(&p.name));
            expected_keys.insert(exp_avg_sq_key(&p.name));
            loaded.push((step, m, v));
        }
        if let Some(extra) = tensors.keys().find(|k| !expected_keys.contains(*k)) {
            return Err(weights_err(format!(
                "tensor `{extra}` matches no parameter of the optimizer"
            )));
        }
        for (p, (step, m, v)) in self.params.iter_mut().zip(loaded) {
            p.step = step;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }
}

/// The moment `key` of parameter `p` from a loaded state, checked against the parameter's
/// shape and converted to its dtype and device.
fn load_moment(tensors: &HashMap<String, Tensor>, key: &str, p: &Param) -> Result<Tensor> {
    let t = tensors.get(key).ok_or_else(|| Error::Weights {
        source_name: "optimizer state".into(),
        msg: format!("missing `{key}` for parameter `{}`", p.name),
    })?;
    if t.dims() != p.var.dims() {
        return Err(Error::shape(
            format!("optimizer state `{key}`"),
            format!("{:?} (the shape of parameter `{}`)", p.var.dims(), p.name),
            t.dims(),
        ));
    }
    let t = t.to_dtype(p.var.dtype())?.to_device(p.var.device())?;
    // An owned, contiguous copy: the caller's tensor must not change when the moments are
    // later updated in place.
    let t = if t.is_contiguous() {
        t.copy()?
    } else {
        t.contiguous()?
    };
    Ok(t.detach())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Device {
        Device::Cpu
    }

    fn grads_for(pairs: &[(&Var, &[f64])]) -> GradStore {
        let mut s = GradStore::default();
        for (var, g) in pairs {
            let t = Tensor::from_slice(g, var.dims(), &cpu())
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap();
            s.insert(var, t);
        }
        s
    }

    fn values(var: &Var) -> Vec<f64> {
        var.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// PyTorch's AdamW for one scalar parameter, by hand in f64.
    struct Reference {
        p: f64,
        m: f64,
        v: f64,
        t: i32,
    }

    impl Reference {
        fn step(&mut self, g: f64, lr: f64, cfg: &AdamWConfig, decay: bool) {
            self.t += 1;
            if decay {
                self.p *= 1.0 - lr * cfg.weight_decay;
            }
            self.m = cfg.beta1 * self.m + (1.0 - cfg.beta1) * g;
            self.v = cfg.beta2 * self.v + (1.0 - cfg.beta2) * g * g;
            let m_hat = self.m / (1.0 - cfg.beta1.powi(self.t));
            let v_hat = self.v / (1.0 - cfg.beta2.powi(self.t));
            self.p -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
        }
    }

    /// With a constant gradient `g` the bias-corrected moments are exactly `g` and `g^2`, so
    /// every step is `p <- a * p - c` with `a = 1 - lr * wd`, `c = lr * g / (|g| + eps)`, and
    /// after `n` steps `p_n = a^n * p_0 - c * (1 - a^n) / (1 - a)` (closed form).
    #[test]
    fn constant_gradient_matches_closed_form() {
        for fused in [true, false] {
            for dtype in [DType::F64, DType::F32] {
                let cfg = AdamWConfig {
                    beta1: 0.9,
                    beta2: 0.98,
                    eps: 1e-9,
                    weight_decay: 0.1,
                };
                let p0 = [[1.0, -2.0], [0.5, 3.0]];
                let g = [0.5, -0.25, 2.0, 1e-3];
                let w =
                    Var::from_tensor(&Tensor::new(&p0, &cpu()).unwrap().to_dtype(dtype).unwrap())
                        .unwrap();
                let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).unwrap();
                opt.kernels = if fused {
                    Kernels::Fused
                } else {
                    Kernels::Composed
                };
                let lr = 0.01;
                let n = 5;
                for _ in 0..n {
                    opt.step(&grads_for(&[(&w, &g)]), lr).unwrap();
                }
                let a: f64 = 1.0 - lr * cfg.weight_decay;
                let p0 = p0.iter().flatten().copied().collect::<Vec<f64>>();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                for ((got, p0), g) in values(&w).iter().zip(p0).zip(g) {
                    let c = lr * g / (g.abs() + cfg.eps);
                    let want = a.powi(n) * p0 - c * (1.0 - a.powi(n)) / (1.0 - a);
                    assert!(
                        (got - want).abs() < tol,
                        "fused={fused} {dtype:?}: {got} vs {want}"
                    );
                }
                assert_eq!(opt.step_count("w"), Some(n as u64));
            }
        }
    }

    /// Varying gradients and learning rates, decay and no-decay groups, against the scalar
    /// recurrence in f64.
    #[test]
    fn varying_gradients_match_reference() {
        for fused in [true, false] {
            let cfg = AdamWConfig::nanogpt();
            let w = Var::new(&[[0.3f64, -0.7]], &cpu()).unwrap(); // rank 2: decayed
            let b = Var::new(&[0.1f64], &cpu()).unwrap(); // rank 1: not decayed
            let mut opt = AdamW::new(
                vec![
                    ("layer.weight".into(), w.clone()),
                    ("layer.bias".into(), b.clone()),
                ],
                cfg,
            )
            .unwrap();
            opt.kernels = if fused {
                Kernels::Fused
            } else {
                Kernels::Composed
            };
            assert_eq!(
                opt.param_groups(),
                (vec!["layer.weight"], vec!["layer.bias"])
            );
            let mut refs = [
                Reference {
                    p: 0.3,
                    m: 0.0,
                    v: 0.0,
                    t: 0,
                },
                Reference {
                    p: -0.7,
                    m: 0.0,
                    v: 0.0,
                    t: 0,
                },
                Reference {
                    p: 0.1,
                    m: 0.0,
                    v: 0.0,
                    t: 0,
                },
            ];
            let gs = [
                [1.0, -0.5, 0.2],
                [-0.3, 0.0, 4.0],
                [2.5, 0.7, -1.0],
                [0.01, -3.0, 0.5],
            ];
            for (i, g) in gs.iter().enumerate() {
                let lr = 1e-2 * (i + 1) as f64;
                opt.step(&grads_for(&[(&w, &g[..2]), (&b, &g[2..])]), lr)
                    .unwrap();
                refs[0].step(g[0], lr, &cfg, true);
                refs[1].step(g[1], lr, &cfg, true);
                refs[2].step(g[2], lr, &cfg, false);
            }
            let got: Vec<f64> = values(&w).into_iter().chain(values(&b)).collect();
            for (got, r) in got.iter().zip(&refs) {
                assert!((got - r.p).abs() < 1e-14, "fused={fused}: {got} vs {}", r.p);
            }
        }
    }

    #[test]
    fn fused_and_composed_paths_agree_in_f32() {
        let init = Tensor::arange(0f32, 24., &cpu())
            .unwrap()
            .affine(0.1, -1.0)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let run = |fused: bool| {
            let w = Var::from_tensor(&init).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
            opt.kernels = if fused {
                Kernels::Fused
            } else {
                Kernels::Composed
            };
            for s in 0..10 {
                let g = init.sin().unwrap().affine(1.0 + s as f64, 0.1).unwrap();
                let mut grads = GradStore::default();
                grads.insert(&w, g);
                opt.step(&grads, 1e-2).unwrap();
            }
            values(&w)
        };
        let (a, b) = (run(true), run(false));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn plain_adam_and_groups() {
        // Paper Adam: no decay anywhere, whatever the grouping says.
        let w = Var::new(&[[2.0f64]], &cpu()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::paper()).unwrap();
        opt.step(&grads_for(&[(&w, &[0.0])]), 1.0).unwrap();
        assert_eq!(values(&w), [2.0]); // zero gradient, no decay: unchanged

        // An explicit predicate: decay only the embedding.
        let e = Var::new(&[[1.0f64, 1.0]], &cpu()).unwrap();
        let l = Var::new(&[[1.0f64, 1.0]], &cpu()).unwrap();
        let opt = AdamW::with_decay_filter(
            vec![("tok_embed.weight".into(), e), ("linear.weight".into(), l)],
            AdamWConfig::default(),
            |name, _| name.contains("embed"),
        )
        .unwrap();
        assert_eq!(
            opt.param_groups(),
            (vec!["tok_embed.weight"], vec!["linear.weight"])
        );

        // Bad configs and duplicates are refused.
        let bad = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        assert!(matches!(
            AdamW::new(vec![], bad),
            Err(Error::Config(_) | Error::Invalid { .. })
        ));
        let v = Var::new(&[1.0f32], &cpu()).unwrap();
        assert!(AdamW::new(
            vec![("x".into(), v.clone()), ("x".into(), v)],
            AdamWConfig::default()
        )
        .is_err());
    }

    #[test]
    fn vars_without_gradient_are_skipped() {
        let a = Var::new(&[[1.0f32, 2.0]], &cpu()).unwrap();
        let b = Var::new(&[[3.0f32, 4.0]], &cpu()).unwrap();
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.step(&grads_for(&[(&a, &[1.0, 1.0])]), 0.1).unwrap();
        assert_eq!(values(&b), [3.0, 4.0]); // no decay either
        assert_eq!(opt.step_count("a"), Some(1));
        assert_eq!(opt.step_count("b"), Some(0));
        assert_ne!(values(&a), [1.0, 2.0]);

        // A gradient of the wrong shape is an error naming the parameter.
        let mut grads = GradStore::default();
        grads.insert(&b, Tensor::zeros(3, DType::F32, &cpu()).unwrap());
        let err = opt.step(&grads, 0.1).unwrap_err().to_string();
        assert!(err.contains("`b`"), "{err}");
    }

    /// A tiny least-squares problem whose gradients depend on the parameters, so that any state
    /// lost across save/load would change the trajectory.
    fn train(opt: &mut AdamW, w: &Var, b: &Var, steps: std::ops::Range<usize>) {
        let x = Tensor::new(&[[1.0f32, 2.0, -1.0], [0.5, -1.5, 2.0]], &cpu()).unwrap(); // (2, 3)
        let y = Tensor::new(&[[1.0f32, 0.0], [-1.0, 2.0]], &cpu()).unwrap(); // (2, 2)
        for s in steps {
            let pred = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap(); // (2, 2)
            let loss = (pred - &y).unwrap().sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 1e-2 / (1.0 + s as f64)).unwrap();
        }
    }

    fn fresh(w0: &Tensor, b0: &Tensor) -> (AdamW, Var, Var) {
        let w = Var::from_tensor(w0).unwrap();
        let b = Var::from_tensor(b0).unwrap();
        let opt = AdamW::new(
            vec![
                ("fc.weight".into(), w.clone()),
                ("fc.bias".into(), b.clone()),
            ],
            AdamWConfig::nanogpt(),
        )
        .unwrap();
        (opt, w, b)
    }

    #[test]
    fn save_load_continue_is_bit_identical() {
        let w0 = Tensor::new(&[[0.1f32, -0.2, 0.3], [0.4, 0.5, -0.6]], &cpu()).unwrap(); // (2, 3)
        let b0 = Tensor::new(&[0.01f32, -0.02], &cpu()).unwrap(); // (2,)

        let (mut opt, w, b) = fresh(&w0, &b0);
        train(&mut opt, &w, &b, 0..8);
        let (want_w, want_b) = (values(&w), values(&b));

        let (mut opt, w, b) = fresh(&w0, &b0);
        train(&mut opt, &w, &b, 0..3);
        let (state, tensors) = opt.state().unwrap();
        let saved_w = w.as_tensor().copy().unwrap();
        let saved_b = b.as_tensor().copy().unwrap();
        // Training on after the export must not change what was exported (the moments are
        // updated in place), so write the files only afterwards.
        train(&mut opt, &w, &b, 3..5);
        drop(opt);
        // Through the checkpoint formats: safetensors for tensors, JSON for the rest.
        let dir = std::env::temp_dir().join(format!("transformer-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optim.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let json = serde_json::to_string(&state).unwrap();

        let (mut opt, w, b) = fresh(&saved_w, &saved_b);
        let tensors = candle_core::safetensors::load(&path, &cpu()).unwrap();
        let state: AdamWState = serde_json::from_str(&json).unwrap();
        opt.load_state(&state, &tensors).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(opt.step_count("fc.bias"), Some(3));
        train(&mut opt, &w, &b, 3..8);
        assert_eq!(values(&w), want_w);
        assert_eq!(values(&b), want_b);
    }

    #[test]
    fn load_state_errors_name_the_parameter() {
        let w0 = Tensor::zeros((2, 3), DType::F32, &cpu()).unwrap();
        let b0 = Tensor::zeros(2, DType::F32, &cpu()).unwrap();
        let (opt, _, _) = fresh(&w0, &b0);
        let (state, tensors) = opt.state().unwrap();
        assert_eq!(tensors.len(), 4);
        assert!(tensors.contains_key("fc.weight.exp_avg_sq"));

        let (mut target, _, _) = fresh(&w0, &b0);
        let err_of = |target: &mut AdamW, s: &AdamWState, t: &HashMap<String, Tensor>| {
            target.load_state(s, t).unwrap_err().to_string()
        };

        let mut t = tensors.clone();
        t.insert(
            "fc.bias.exp_avg".into(),
            Tensor::zeros(3, DType::F32, &cpu()).unwrap(),
        );
        let err = err_of(&mut target, &state, &t);
        assert!(
            err.contains("fc.bias.exp_avg") && err.contains("fc.bias"),
            "{err}"
        );

        let mut t = tensors.clone();
        t.remove("fc.weight.exp_avg");
        let err = err_of(&mut target, &state, &t);
        assert!(err.contains("fc.weight"), "{err}");

        let mut t = tensors.clone();
        t.insert("fc2.weight.exp_avg".into(), b0.clone());
        let err = err_of(&mut target, &state, &t);
        assert!(err.contains("fc2.weight.exp_avg"), "{err}");

        let mut s = state.clone();
        s.steps.remove("fc.bias");
        let err = err_of(&mut target, &s, &tensors);
        assert!(err.contains("fc.bias"), "{err}");

        let mut s = state.clone();
        s.steps.insert("extra".into(), 1);
        let err = err_of(&mut target, &s, &tensors);
        assert!(err.contains("extra"), "{err}");

        target.load_state(&state, &tensors).unwrap();
    }
}
