//! Named parameters for models that both run and train.
//!
//! A model is built from a [`ParamStore`] (our counterpart of Candle's `VarBuilder`): each layer
//! asks for its tensors by their reference name (`image_encoder.blocks.0.attn.qkv.weight`) and
//! receives a [`Param`]. What the param *is* depends on the store's [`RolePolicy`], not on the
//! model:
//! - [`Param::Frozen`]: a constant tensor (inference, or frozen under GPS);
//! - [`Param::Trainable`]: a Candle `Var` (full fine-tuning, gradient accumulation);
//! - [`Param::Sparse`]: GPS's masked fine-tuning — the frozen base weight plus a small trainable
//!   delta added at selected flat indices with `index_add` (whose backward is correct, unlike
//!   `scatter_add`). Unselected entries are bit-identical to the base by construction.
//!
//! Layers call [`Param::tensor`] inside `forward`, so a step's updates to vars are seen by the
//! next forward. The store records every param it hands out, so after construction it can list
//! trainable vars, check that a checkpoint had no unused tensors, and write current values.

use crate::error::{Error, Result};
use crate::util::tensors::TensorMap;
use crate::util::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// How one named tensor takes part in training.
#[derive(Debug, Clone)]
pub enum Role {
    /// Never changes.
    Frozen,
    /// Every entry trains.
    Trainable,
    /// Only these flat (row-major) indices train; sorted, unique.
    Sparse(Vec<u32>),
}

/// Which role each tensor gets.
#[derive(Debug, Clone)]
pub enum RolePolicy {
    /// Inference: everything frozen.
    AllFrozen,
    /// Everything trainable (full fine-tuning, gradient accumulation for selection, pretraining).
    AllTrainable,
    /// Explicit roles; names not in the map are frozen.
    Map(HashMap<String, Role>),
}

impl RolePolicy {
    fn role(&self, name: &str) -> Role {
        match self {
            RolePolicy::AllFrozen => Role::Frozen,
            RolePolicy::AllTrainable => Role::Trainable,
            RolePolicy::Map(m) => m.get(name).cloned().unwrap_or(Role::Frozen),
        }
    }
}

/// Base weight plus a trainable delta at selected flat indices.
#[derive(Debug, Clone)]
pub struct SparseParam {
    /// The frozen pretrained tensor, in its own shape.
    pub base: Tensor,
    /// Selected flat indices into `base` (u32, `[n]`).
    pub index: Tensor,
    /// Trainable values added at `index` (`[n]`), initialised to zero.
    pub delta: Var,
    /// Row of each selected entry with the tensor viewed as `[out, rest]` (host memory: read
    /// by the CPU linear carrier's backward, [`super::kernels::sparse_grad::LinearCarrier`]).
    pub rows: Arc<[u32]>,
    /// Column of each selected entry in that `[out, rest]` view.
    pub cols: Arc<[u32]>,
}

impl SparseParam {
    /// `base + scatter(delta at index)`, differentiable w.r.t. `delta` only.
    pub fn tensor(&self) -> Result<Tensor> {
        let flat = self.base.flatten_all()?;
        let w = flat.index_add(&self.index, self.delta.as_tensor(), 0)?;
        Ok(w.reshape(self.base.shape())?)
    }
}

/// One named parameter as a layer holds it.
#[derive(Debug, Clone)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
    Sparse(SparseParam),
}

impl Param {
    /// The current value, as a tensor on the autograd graph where it trains.
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Param::Frozen(t) => Ok(t.clone()),
            Param::Trainable(v) => Ok(v.as_tensor().clone()),
            Param::Sparse(s) => s.tensor(),
        }
    }

    /// Shape of the full tensor.
    pub fn dims(&self) -> &[usize] {
        match self {
            Param::Frozen(t) => t.dims(),
            Param::Trainable(v) => v.dims(),
            Param::Sparse(s) => s.base.dims(),
        }
    }

    /// Number of entries in the full tensor.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// Number of entries that train.
    pub fn trainable_count(&self) -> usize {
        match self {
            Param::Frozen(_) => 0,
            Param::Trainable(v) => v.elem_count(),
            Param::Sparse(s) => s.delta.elem_count(),
        }
    }
}

/// How a tensor is initialised when the store has no checkpoint for it.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    Const(f32),
    /// Normal(0, std).
    Normal(f32),
    /// Normal(0, std) truncated to ±2·std (timm's trunc_normal_).
    TruncNormal(f32),
    /// Uniform(-bound, bound) — PyTorch's default for Linear/Conv is bound = 1/sqrt(fan_in).
    Uniform(f32),
}

impl Init {
    fn sample(&self, n: usize, rng: &mut Rng) -> Vec<f32> {
        match *self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Const(c) => vec![c; n],
            Init::Normal(s) => (0..n).map(|_| rng.normal() * s).collect(),
            Init::TruncNormal(s) => (0..n)
                .map(|_| loop {
                    let z = rng.normal();
                    if z.abs() <= 2.0 {
                        break z * s;
                    }
                })
                .collect(),
            Init::Uniform(b) => (0..n).map(|_| rng.uniform(-b, b)).collect(),
        }
    }
}

struct Inner {
    device: Device,
    source: Option<TensorMap>,
    policy: RolePolicy,
    params: Mutex<BTreeMap<String, Param>>,
    /// Names fetched with [`ParamStore::buffer`]: always frozen, not counted as parameters.
    buffers: Mutex<BTreeSet<String>>,
    rng: Mutex<Rng>,
}

/// Source of named params for model construction; cheap to clone, prefix with [`pp`](Self::pp).
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Inner>,
    prefix: String,
}

impl ParamStore {
    /// A store over `source` (a loaded checkpoint) or, when `None`, fresh seeded initialisation.
    pub fn new(source: Option<TensorMap>, policy: RolePolicy, device: &Device, seed: u64) -> Self {
        ParamStore {
            inner: Arc::new(Inner {
                device: device.clone(),
                source,
                policy,
                params: Mutex::new(BTreeMap::new()),
                buffers: Mutex::new(BTreeSet::new()),
                rng: Mutex::new(Rng::derive(seed, "init")),
            }),
            prefix: String::new(),
        }
    }

    /// Fresh, seeded random initialisation; every param trainable.
    pub fn init(device: &Device, seed: u64) -> Self {
        Self::new(None, RolePolicy::AllTrainable, device, seed)
    }

    /// Load `weights`, all frozen (inference).
    pub fn frozen(weights: TensorMap, device: &Device) -> Self {
        Self::new(Some(weights), RolePolicy::AllFrozen, device, 0)
    }

    /// Load `weights`, all trainable.
    pub fn trainable(weights: TensorMap, device: &Device) -> Self {
        Self::new(Some(weights), RolePolicy::AllTrainable, device, 0)
    }

    /// Load `weights` with explicit roles (names absent from `roles` are frozen).
    pub fn with_roles(weights: TensorMap, roles: HashMap<String, Role>, device: &Device) -> Self {
        Self::new(Some(weights), RolePolicy::Map(roles), device, 0)
    }

    /// A view of this store under `prefix.` (like `VarBuilder::pp`).
    pub fn pp(&self, s: impl ToString) -> Self {
        let s = s.to_string();
        let prefix = if self.prefix.is_empty() {
            s
        } else {
            format!("{}.{}", self.prefix, s)
        };
        ParamStore {
            inner: self.inner.clone(),
            prefix,
        }
    }

    /// The device params live on.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// Full name of `name` under this store's prefix.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether the checkpoint has `name` (always false for a fresh store).
    pub fn contains(&self, name: &str) -> bool {
        let full = self.path(name);
        self.inner
            .source
            .as_ref()
            .is_some_and(|s| s.contains_key(&full))
    }

    /// Get (or create) the param `name` of `shape`. With a checkpoint, a missing tensor or a
    /// shape mismatch is an error naming the tensor; without one, `init` fills it.
    /// Asking twice for one name returns the same param (weight sharing).
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Param> {
        self.get_with(shape, name, init, false)
    }

    /// A buffer (PyTorch `register_buffer`): loaded and saved like a param, but always frozen
    /// whatever the policy, and left out of [`counts`](Self::counts) (as `parameters()` does).
    pub fn buffer(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.inner
            .buffers
            .lock()
            .map_err(|_| Error::msg("parameter store lock poisoned"))?
            .insert(self.path(name));
        self.get_with(shape, name, init, true)?.tensor()
    }

    /// Whether `full_name` was fetched as a buffer.
    pub fn is_buffer(&self, full_name: &str) -> bool {
        self.inner
            .buffers
            .lock()
            .map(|b| b.contains(full_name))
            .unwrap_or(false)
    }

    fn get_with(&self, shape: &[usize], name: &str, init: Init, buffer: bool) -> Result<Param> {
        let full = self.path(name);
        let mut params = self
            .inner
            .params
            .lock()
            .map_err(|_| Error::msg("parameter store lock poisoned"))?;
        if let Some(p) = params.get(&full) {
            if p.dims() != shape {
                return Err(Error::ShapeMismatch {
                    name: full,
                    found: p.dims().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            return Ok(p.clone());
        }
        let base = match &self.inner.source {
            Some(src) => {
                let t = src.get(&full).ok_or_else(|| Error::MissingTensor {
                    name: full.clone(),
                    expected: shape.to_vec(),
                })?;
                if t.dims() != shape {
                    return Err(Error::ShapeMismatch {
                        name: full,
                        found: t.dims().to_vec(),
                        expected: shape.to_vec(),
                    });
                }
                t.to_dtype(DType::F32)?.to_device(&self.inner.device)?
            }
            None => {
                let n: usize = shape.iter().product();
                let data = {
                    let mut rng = self
                        .inner
                        .rng
                        .lock()
                        .map_err(|_| Error::msg("parameter store lock poisoned"))?;
                    init.sample(n, &mut rng)
                };
                Tensor::from_vec(data, shape, &self.inner.device)?
            }
        };
        let role = if buffer {
            Role::Frozen
        } else {
            self.inner.policy.role(&full)
        };
        let param = match role {
            Role::Frozen => Param::Frozen(base.detach()),
            Role::Trainable => Param::Trainable(Var::from_tensor(&base)?),
            Role::Sparse(idx) => {
                let numel: usize = shape.iter().product();
                if let Some(&bad) = idx.iter().find(|&&i| i as usize >= numel) {
                    return Err(Error::Tensor {
                        name: full,
                        msg: format!(
                            "selected index {bad} is outside the tensor ({numel} entries)"
                        ),
                    });
                }
                let n = idx.len();
                let rest = if shape.is_empty() {
                    1
                } else {
                    numel / shape[0].max(1)
                }
                .max(1);
                let rows: Arc<[u32]> = idx.iter().map(|&i| i / rest as u32).collect();
                let cols: Arc<[u32]> = idx.iter().map(|&i| i % rest as u32).collect();
                let index = Tensor::from_vec(idx, n, &self.inner.device)?;
                let delta = Var::zeros(n, DType::F32, &self.inner.device)?;
                Param::Sparse(SparseParam {
                    base: base.detach(),
                    index,
                    delta,
                    rows,
                    cols,
                })
            }
        };
        params.insert(full, param.clone());
        Ok(param)
    }

    /// Every param handed out so far, by full name.
    pub fn params(&self) -> BTreeMap<String, Param> {
        self.inner
            .params
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// The vars an optimiser should update, by param name: whole tensors for trainable params,
    /// the deltas for sparse ones.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.params()
            .into_iter()
            .filter_map(|(n, p)| match p {
                Param::Frozen(_) => None,
                Param::Trainable(v) => Some((n, v)),
                Param::Sparse(s) => Some((n, s.delta)),
            })
            .collect()
    }

    /// Current full values of every param (base + delta for sparse ones), e.g. to save.
    pub fn current_tensors(&self) -> Result<TensorMap> {
        self.params()
            .into_iter()
            .map(|(n, p)| Ok((n, p.tensor()?.detach())))
            .collect()
    }

    /// (trainable entries, total entries) over every param handed out (buffers excluded).
    pub fn counts(&self) -> (usize, usize) {
        self.params()
            .iter()
            .filter(|(n, _)| !self.is_buffer(n))
            .fold((0, 0), |(t, a), (_, p)| {
                (t + p.trainable_count(), a + p.elem_count())
            })
    }

    /// Error if the checkpoint holds tensors that no layer asked for.
    pub fn check_all_used(&self) -> Result<()> {
        let Some(src) = &self.inner.source else {
            return Ok(());
        };
        let params = self.params();
        let unused: Vec<&String> = src.keys().filter(|k| !params.contains_key(*k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        let mut names: Vec<String> = unused.iter().take(8).map(|s| format!("`{s}`")).collect();
        if unused.len() > 8 {
            names.push(format!("… and {} more", unused.len() - 8));
        }
        Err(Error::UnexpectedTensors {
            count: unused.len(),
            names: names.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_param_changes_only_selected_entries_and_has_gradient() {
        let dev = Device::Cpu;
        let mut src = TensorMap::new();
        src.insert(
            "w".into(),
            Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap(),
        );
        let mut roles = HashMap::new();
        roles.insert("w".to_string(), Role::Sparse(vec![1, 5]));
        let store = ParamStore::with_roles(src, roles, &dev);
        let p = store.get(&[2, 3], "w", Init::Zeros).unwrap();
        let Param::Sparse(s) = &p else {
            panic!("expected sparse")
        };
        s.delta
            .set(&Tensor::new(&[10f32, 20.], &dev).unwrap())
            .unwrap();
        let w = p.tensor().unwrap();
        assert_eq!(
            w.to_vec2::<f32>().unwrap(),
            vec![vec![1., 12., 3.], vec![4., 5., 26.]]
        );
        let loss = (w * Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let gd = g.get(s.delta.as_tensor()).unwrap();
        assert_eq!(gd.to_vec1::<f32>().unwrap(), vec![2., 6.]);
        assert_eq!(store.counts(), (2, 6));
    }

    #[test]
    fn loading_errors_name_the_tensor() {
        let dev = Device::Cpu;
        let mut src = TensorMap::new();
        src.insert(
            "a.w".into(),
            Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
        );
        src.insert("extra".into(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        let store = ParamStore::frozen(src, &dev);
        let e = store.pp("a").get(&[3, 2], "w", Init::Zeros).unwrap_err();
        assert!(e.to_string().contains("a.w") && e.to_string().contains("[2, 3]"));
        let e = store.get(&[1], "missing", Init::Zeros).unwrap_err();
        assert!(e.to_string().contains("missing"));
        store.pp("a").get(&[2, 3], "w", Init::Zeros).unwrap();
        let e = store.check_all_used().unwrap_err();
        assert!(e.to_string().contains("extra"));
    }

    #[test]
    fn fresh_init_is_seeded() {
        let a = ParamStore::init(&Device::Cpu, 5);
        let b = ParamStore::init(&Device::Cpu, 5);
        let ta = a
            .get(&[4, 4], "x", Init::Normal(1.0))
            .unwrap()
            .tensor()
            .unwrap();
        let tb = b
            .get(&[4, 4], "x", Init::Normal(1.0))
            .unwrap()
            .tensor()
            .unwrap();
        assert_eq!(
            ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
