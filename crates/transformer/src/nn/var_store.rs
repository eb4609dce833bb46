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
        let t = if self.inference {
            // To be loaded: random draws would be overwritten (and cost a second per 20M
            // parameters).
            Tensor::zeros(shape, self.dtype, &self.device)?
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
            Tensor::from_vec(values, shape, &Device::Cpu)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        let idx = inner.vars.len();
        inner.vars.push((name.clone(), var));
        inner.index.insert(name, idx);
        Ok(self.view(&out))
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
        for (name, var) in inner.vars.iter() {
            let t = map[name].to_dtype(self.dtype)?.to_device(&self.device)?;
            // A map from this store's own `tensors()` holds the variables themselves, which
            // `Var::set` refuses ("derived from its value"); they already hold the value.
            if t.id() == var.as_tensor().id() {
                continue;
            }
            var.set(&t)?;
        }
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
}
