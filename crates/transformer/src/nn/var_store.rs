//! Parameter storage: named, trainable variables created in a deterministic order with a
//! seeded initializer, saved to and loaded from safetensors with strict name and shape checks.
//!
//! candle-nn's `VarMap` draws its initial values from candle's CPU RNG, which cannot be seeded,
//! and iterates a `HashMap`; ours is ordered by creation and seeded, so that the same seed
//! gives the same model bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::dropout::Dropout;
use super::linear::Weight;
use crate::kernels::Kernels;
use crate::rng::{Rng, SharedRng};
use crate::{Error, Result};

/// How weight matrices are initialized.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// Xavier-uniform on every matrix, as `nn.Transformer._reset_parameters` does; attention
    /// biases zero, feed-forward biases uniform(±1/√fan_in) as `nn.Linear` leaves them.
    #[default]
    XavierUniform,
    /// GPT-2: normal(0, 0.02) on matrices and embeddings, zero biases, and the projections that
    /// write into the residual stream scaled by 1/√(2·n_layers).
    Gpt2,
}

/// What a parameter is, so that the store's scheme can choose its initial values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// A weight matrix or embedding table; `residual` marks projections into the residual stream.
    Weight {
        residual: bool,
    },
    /// An attention projection bias (zero under both schemes).
    AttnBias,
    /// A `nn.Linear` bias with the given fan-in.
    LinearBias {
        fan_in: usize,
    },
    Zeros,
    Ones,
    /// Explicit normal(0, std), whatever the scheme.
    Normal {
        std: f64,
    },
}

struct Inner {
    vars: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    init_rng: Rng,
    /// Values for the variables still to be created ([`VarStore::with_values`]).
    values: Option<HashMap<String, Tensor>>,
    /// Variables created without a value although values were given.
    without_value: Vec<String>,
}

/// The set of trainable parameters of a model.
#[derive(Clone)]
pub struct VarStore {
    inner: Arc<Mutex<Inner>>,
    device: Device,
    dtype: DType,
    scheme: InitScheme,
    n_layers: usize,
    dropout_rng: SharedRng,
    /// Modules get detached views of the parameters (see [`VarStore::for_inference`]).
    inference: bool,
    /// Fused kernels or composed ops, for every module built from this store.
    kernels: Kernels,
    /// Quantized weight matrices by full name (from a GGUF file): modules that find their
    /// matrix here take it as it is instead of creating a variable.
    quantized: Arc<HashMap<String, Weight>>,
}

impl VarStore {
    /// A new, empty store. `seed` drives initialization; dropout gets an independent stream.
    pub fn new(dtype: DType, device: &Device, scheme: InitScheme, seed: u64) -> Self {
        let mut init_rng = Rng::new(seed);
        let dropout_rng = SharedRng::new(init_rng.next_u64() ^ 0xD809_0C7D_0D2F_0001);
        VarStore {
            inner: Arc::new(Mutex::new(Inner {
                vars: Vec::new(),
                index: HashMap::new(),
                init_rng,
                values: None,
                without_value: Vec::new(),
            })),
            device: device.clone(),
            dtype,
            scheme,
            n_layers: 1,
            dropout_rng,
            inference: false,
            kernels: Kernels::from_env(),
            quantized: Arc::new(HashMap::new()),
        }
    }

    /// Create each variable from its tensor in `values` (full names) instead of zeros or
    /// random draws, taking it out of the map: a model built from this store holds its weights
    /// once, where building it and then [`VarStore::load_map`] holds them twice. Shapes are
    /// checked as variables are created; [`VarStore::check_values_used`] then reports the
    /// variables that had no value and the values no variable took.
    pub fn with_values(self, values: HashMap<String, Tensor>) -> Self {
        self.lock().values = Some(values);
        self
    }

    /// Whether [`VarStore::with_values`] holds a value for `name` not yet taken by a variable.
    pub fn has_value(&self, name: &str) -> bool {
        self.lock()
            .values
            .as_ref()
            .is_some_and(|v| v.contains_key(name))
    }

    /// After building a model from [`VarStore::with_values`]: every variable had a value and
    /// every value was taken, or an error naming the tensors (as [`VarStore::load_map`]'s).
    pub fn check_values_used(&self, source_name: &str) -> Result<()> {
        let inner = self.lock();
        let err = |msg: String| Error::Weights {
            source_name: source_name.to_string(),
            msg,
        };
        if !inner.without_value.is_empty() {
            return Err(err(format!(
                "missing tensors: {}",
                inner.without_value.join(", ")
            )));
        }
        let mut extra: Vec<&str> = inner
            .values
            .iter()
            .flat_map(|v| v.keys().map(String::as_str))
            .collect();
        if !extra.is_empty() {
            extra.sort();
            return Err(err(format!("unexpected tensors: {}", extra.join(", "))));
        }
        Ok(())
    }

    /// Serve these weight matrices (full names, e.g. `layers.0.ff.up_proj.weight`) quantized:
    /// [`VarPath::matrix`] returns them instead of creating variables, so they are neither
    /// trained nor saved, and [`VarStore::load_map`] does not expect them.
    pub fn with_quantized(mut self, weights: HashMap<String, Weight>) -> Self {
        self.quantized = Arc::new(weights);
        self
    }

    /// The names of the quantized weight matrices the store serves.
    pub fn quantized_names(&self) -> Vec<&str> {
        self.quantized.keys().map(String::as_str).collect()
    }

    /// Build modules that use fused kernels or only composed ops (default:
    /// [`Kernels::from_env`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Which implementation the modules built from this store use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Tell the GPT-2 scheme how many layers scale the residual projections.
    pub fn with_n_layers(mut self, n_layers: usize) -> Self {
        self.n_layers = n_layers.max(1);
        self
    }

    /// Hand modules detached views of the parameters, for inference: a forward pass then
    /// records no autograd graph, so each activation is freed as soon as it has been used
    /// instead of living until the output is dropped (for a BERT forward, the difference
    /// between a few MB and ~100 MB of fresh pages per batch). The views share the variables'
    /// storage, so [`VarStore::load`] / [`VarStore::load_map`] still fill them; gradients
    /// never reach the variables. Parameters start at zero instead of the scheme's random
    /// draws: such a store is there to be loaded.
    pub fn for_inference(mut self) -> Self {
        self.inference = true;
        self
    }

    pub fn root(&self) -> VarPath {
        VarPath {
            store: self.clone(),
            prefix: String::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The generator dropout draws from (saved in training checkpoints).
    pub fn dropout_rng(&self) -> &SharedRng {
        &self.dropout_rng
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// All variables in creation order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().vars.clone()
    }

    /// Just the variables, in creation order (what an optimizer takes).
    pub fn all_vars(&self) -> Vec<Var> {
        self.lock().vars.iter().map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        let inner = self.lock();
        inner.index.get(name).map(|&i| inner.vars[i].1.clone())
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.lock().vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn create(&self, name: String, shape: &[usize], init: Init) -> Result<Tensor> {
        let mut inner = self.lock();
        if let Some(&i) = inner.index.get(&name) {
            let v = &inner.vars[i].1;
            if v.dims() != shape {
                return Err(Error::shape(
                    format!("parameter {name} (created twice)"),
                    format!("{:?}", v.dims()),
                    shape,
                ));
            }
            return Ok(self.view(v.as_tensor()));
        }
        let value = inner.values.as_mut().map(|v| v.remove(&name));
        if let Some(Some(t)) = value {
            if t.dims() != shape {
                return Err(Error::shape(
                    format!("tensor {name}"),
                    format!("{shape:?}"),
                    t.dims(),
                ));
            }
            let var = Var::from_tensor(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
            return Ok(self.push(&mut inner, name, var));
        }
        if value.is_some() {
            inner.without_value.push(name.clone());
        }
        let var = if self.inference {
            // To be loaded: random draws would be overwritten (and cost a second per 20M
            // parameters). Made a variable directly: `Var::from_tensor` copies, which wrote
            // every page of a model's worth of zeros before the weights were even read.
            Var::zeros(shape, self.dtype, &self.device)?
        } else {
            let n: usize = shape.iter().product();
            let values = init_values(
                &mut inner.init_rng,
                self.scheme,
                self.n_layers,
                shape,
                init,
                n,
            );
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?;
            Var::from_tensor(&t)?
        };
        Ok(self.push(&mut inner, name, var))
    }

    /// Add `var` under `name`; what modules get for it.
    fn push(&self, inner: &mut Inner, name: String, var: Var) -> Tensor {
        let out = var.as_tensor().clone();
        let idx = inner.vars.len();
        inner.vars.push((name.clone(), var));
        inner.index.insert(name, idx);
        self.view(&out)
    }

    /// What modules get for a variable's tensor: itself, or a detached view for inference.
    fn view(&self, t: &Tensor) -> Tensor {
        if self.inference {
            t.detach()
        } else {
            t.clone()
        }
    }

    /// All parameters as a name → tensor map (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.lock()
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Save every parameter to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let map: HashMap<String, Tensor> = self.tensors().into_iter().collect();
        candle_core::safetensors::save(&map, path).map_err(|e| Error::Weights {
            source_name: path.display().to_string(),
            msg: format!("cannot write: {e}"),
        })
    }

    /// Load parameters from a safetensors file; every parameter must be present with its shape,
    /// and the file must hold nothing else.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let map = read_safetensors(path)?;
        self.load_map(&map, &path.display().to_string())
    }

    /// Copy `map` into the parameters, strictly: names missing from `map`, names the model does
    /// not have, and shape mismatches are all errors naming the tensor. Nothing is changed
    /// unless everything matches.
    pub fn load_map(&self, map: &HashMap<String, Tensor>, source_name: &str) -> Result<()> {
        let inner = self.lock();
        Self::check_map(&inner, map, source_name)?;
        for (name, var) in inner.vars.iter() {
            Self::fill(var, &map[name], self.dtype, &self.device)?;
        }
        Ok(())
    }

    fn check_map(inner: &Inner, map: &HashMap<String, Tensor>, source_name: &str) -> Result<()> {
        let err = |msg: String| Error::Weights {
            source_name: source_name.to_string(),
            msg,
        };
        let missing: Vec<&str> = inner
            .vars
            .iter()
            .filter(|(n, _)| !map.contains_key(n))
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(err(format!("missing tensors: {}", missing.join(", "))));
        }
        let mut extra: Vec<&str> = map
            .keys()
            .filter(|k| !inner.index.contains_key(*k))
            .map(|k| k.as_str())
            .collect();
        if !extra.is_empty() {
            extra.sort();
            return Err(err(format!("unexpected tensors: {}", extra.join(", "))));
        }
        for (name, var) in inner.vars.iter() {
            let t = &map[name];
            if t.dims() != var.dims() {
                return Err(err(format!(
                    "tensor {name}: expected shape {:?}, got {:?}",
                    var.dims(),
                    t.dims()
                )));
            }
        }
        Ok(())
    }

    fn fill(var: &Var, t: &Tensor, dtype: DType, device: &Device) -> Result<()> {
        let t = t.to_dtype(dtype)?.to_device(device)?;
        // A map from this store's own `tensors()` holds the variables themselves, which
        // `Var::set` refuses ("derived from its value"); they already hold the value.
        if t.id() == var.as_tensor().id() {
            return Ok(());
        }
        var.set(&t)?;
        Ok(())
    }
}

/// Read a safetensors file into a map, with errors that name the file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Weights {
        source_name: path.display().to_string(),
        msg: format!("cannot read safetensors: {e}"),
    })
}

fn init_values(
    rng: &mut Rng,
    scheme: InitScheme,
    n_layers: usize,
    shape: &[usize],
    init: Init,
    n: usize,
) -> Vec<f64> {
    let uniform = |rng: &mut Rng, bound: f64| -> Vec<f64> {
        (0..n)
            .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
            .collect()
    };
    let normal =
        |rng: &mut Rng, std: f64| -> Vec<f64> { (0..n).map(|_| rng.normal() * std).collect() };
    match init {
        Init::Zeros | Init::AttnBias => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal { std } => normal(rng, std),
        Init::LinearBias { fan_in } => match scheme {
            InitScheme::XavierUniform => uniform(rng, 1.0 / (fan_in.max(1) as f64).sqrt()),
            InitScheme::Gpt2 => vec![0.0; n],
        },
        Init::Weight { residual } => match scheme {
            InitScheme::XavierUniform => {
                // PyTorch's fans for a 2-D tensor (out, in): fan_in = in, fan_out = out.
                let (fan_out, fan_in) = match shape {
                    [o, i] => (*o, *i),
                    [o, i, rest @ ..] => {
                        let r: usize = rest.iter().product();
                        (o * r, i * r)
                    }
                    [o] => (*o, *o),
                    [] => (1, 1),
                };
                uniform(rng, (6.0 / (fan_in + fan_out) as f64).sqrt())
            }
            InitScheme::Gpt2 => {
                let std = if residual {
                    0.02 / (2.0 * n_layers as f64).sqrt()
                } else {
                    0.02
                };
                normal(rng, std)
            }
        },
    }
}

/// A position in the parameter namespace (`encoder.layers.0.self_attn`), from which modules
/// create their parameters.
#[derive(Clone)]
pub struct VarPath {
    store: VarStore,
    prefix: String,
}

impl VarPath {
    /// A sub-path: `vp.pp("layers").pp(3)` names `layers.3.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> VarPath {
        VarPath {
            store: self.store.clone(),
            prefix: self.join(&name.to_string()),
        }
    }

    fn join(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Create (or fetch, if it exists with the same shape) the parameter `name` under this path.
    pub fn var(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.store.create(self.join(name), shape, init)
    }

    /// A weight matrix: the store's quantized one under this name (its shape checked), or a
    /// dense parameter as [`VarPath::var`] creates it.
    pub fn matrix(&self, name: &str, shape: &[usize], init: Init) -> Result<Weight> {
        let full = self.join(name);
        match self.store.quantized.get(&full) {
            Some(q) if q.dims() != shape => Err(Error::shape(
                format!("quantized weight {full}"),
                format!("{shape:?}"),
                q.dims(),
            )),
            Some(q) => Ok(q.clone()),
            None => Ok(Weight::Dense(self.var(name, shape, init)?)),
        }
    }

    /// Whether the store serves `name` under this path quantized.
    pub fn has_quantized(&self, name: &str) -> bool {
        self.store.quantized.contains_key(&self.join(name))
    }

    pub fn store(&self) -> &VarStore {
        &self.store
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn dropout_rng(&self) -> SharedRng {
        self.store.dropout_rng.clone()
    }

    /// Which implementation modules built here use.
    pub fn kernels(&self) -> Kernels {
        self.store.kernels
    }

    /// A dropout layer drawing from the model's generator, with the store's kernels.
    pub fn dropout(&self, p: f64) -> Result<Dropout> {
        Dropout::new(p, self.dropout_rng(), self.kernels())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_init_and_strict_load() -> Result<()> {
        let make = || -> Result<VarStore> {
            let vs = VarStore::new(DType::F32, &Device::Cpu, InitScheme::XavierUniform, 3);
            let root = vs.root();
            root.pp("a")
                .var("weight", &[4, 3], Init::Weight { residual: false })?;
            root.pp("a")
                .var("bias", &[4], Init::LinearBias { fan_in: 3 })?;
            Ok(vs)
        };
        let (a, b) = (make()?, make()?);
        let ta = a.tensors();
        let tb = b.tensors();
        assert_eq!(
            ta["a.weight"].flatten_all()?.to_vec1::<f32>()?,
            tb["a.weight"].flatten_all()?.to_vec1::<f32>()?
        );
        let bound = (6.0f32 / 7.0).sqrt();
        let w = ta["a.weight"].flatten_all()?.to_vec1::<f32>()?;
        assert!(w.iter().all(|x| x.abs() <= bound) && w.iter().any(|x| *x != 0.0));

        let mut map: HashMap<String, Tensor> = ta.clone().into_iter().collect();
        map.remove("a.bias");
        let e = a.load_map(&map, "test").unwrap_err().to_string();
        assert!(e.contains("missing tensors: a.bias"), "{e}");
        map.insert("a.bias".into(), Tensor::zeros(5, DType::F32, &Device::Cpu)?);
        let e = a.load_map(&map, "test").unwrap_err().to_string();
        assert!(
            e.contains("a.bias") && e.contains("[4]") && e.contains("[5]"),
            "{e}"
        );
        map.insert("a.bias".into(), Tensor::zeros(4, DType::F32, &Device::Cpu)?);
        map.insert(
            "b.extra".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu)?,
        );
        let e = a.load_map(&map, "test").unwrap_err().to_string();
        assert!(e.contains("unexpected tensors: b.extra"), "{e}");
        Ok(())
    }

    #[test]
    fn inference_views_see_loaded_values_and_record_no_graph() -> Result<()> {
        let vs = VarStore::new(DType::F32, &Device::Cpu, InitScheme::Gpt2, 0).for_inference();
        let w = vs.root().var("w", &[2], Init::Ones)?;
        assert!(!w.track_op(), "a detached view");
        assert_eq!(w.to_vec1::<f32>()?, [0., 0.], "zeros until loaded");
        let map = HashMap::from([("w".to_string(), Tensor::new(&[3f32, 4.], &Device::Cpu)?)]);
        vs.load_map(&map, "test")?;
        assert_eq!(w.to_vec1::<f32>()?, [3., 4.]);
        assert!(!(&w * 2.0)?.track_op());
        // The default store hands out the variables themselves.
        let vs = VarStore::new(DType::F32, &Device::Cpu, InitScheme::Gpt2, 0);
        assert!(vs.root().var("w", &[2], Init::Ones)?.track_op());
        Ok(())
    }

    #[test]
    fn built_from_values_holds_them_and_reports_what_did_not_match() -> Result<()> {
        let dev = &Device::Cpu;
        let values = || -> Result<HashMap<String, Tensor>> {
            Ok(HashMap::from([
                ("a.w".to_string(), Tensor::new(&[1f32, 2.], dev)?),
                ("a.b".to_string(), Tensor::new(&[5f64], dev)?),
            ]))
        };
        let store = || VarStore::new(DType::F32, dev, InitScheme::Gpt2, 0).for_inference();
        let vs = store().with_values(values()?);
        let w = vs.root().pp("a").var("w", &[2], Init::Ones)?;
        let b = vs.root().pp("a").var("b", &[1], Init::Zeros)?;
        vs.check_values_used("test")?;
        assert_eq!(w.to_vec1::<f32>()?, [1., 2.]);
        assert_eq!(b.to_vec1::<f32>()?, [5.], "converted to the store's dtype");
        assert_eq!(vs.num_params(), 3);
        // A wrong shape fails where the variable is made, naming the tensor.
        let vs = store().with_values(values()?);
        let e = vs.root().pp("a").var("w", &[3], Init::Ones).unwrap_err();
        assert!(e.to_string().contains("a.w"), "{e}");
        // A variable without a value, and a value no variable took.
        let vs = store().with_values(values()?);
        vs.root().pp("a").var("w", &[2], Init::Ones)?;
        vs.root().pp("a").var("c", &[2], Init::Ones)?;
        let e = vs.check_values_used("m.bin").unwrap_err().to_string();
        assert!(
            e.contains("m.bin") && e.contains("missing tensors: a.c"),
            "{e}"
        );
        let vs = store().with_values(values()?);
        vs.root().pp("a").var("w", &[2], Init::Ones)?;
        let e = vs.check_values_used("m.bin").unwrap_err().to_string();
        assert!(e.contains("unexpected tensors: a.b"), "{e}");
        Ok(())
    }
}
