//! Optimisers over named vars: [`Adam`] (plain, no weight decay — GPS's default, as in the
//! reference code, since decay would move frozen entries) and [`AdamW`] (decoupled weight
//! decay applied ONLY to the vars it is given, unlike Candle's `AdamW` which decays every var
//! it holds; see `shared/notes/candle.md`). Update rule as PyTorch's `torch.optim.Adam/AdamW`
//! (Kingma & Ba 2015; Loshchilov & Hutter 2019), with a per-var step count.
//!
//! State (m, v, step per var) exists only for the vars given — for GPS that is the sparse
//! deltas plus the fully-trainable tensors — and round-trips through a [`TensorMap`] so a
//! training run can checkpoint and resume exactly.

use crate::error::{Error, Result};
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// Hyper-parameters shared by Adam and AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 for Adam.
    pub weight_decay: f64,
}

impl AdamConfig {
    /// PyTorch defaults with learning rate `lr` and no decay.
    pub fn new(lr: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    step: u32,
}

/// Common machinery of [`Adam`] and [`AdamW`].
struct Core {
    cfg: AdamConfig,
    slots: Vec<Slot>,
}

impl Core {
    fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                return Err(Error::Tensor {
                    name,
                    msg: "given to the optimiser twice".into(),
                });
            }
            let m = var.zeros_like()?.to_dtype(DType::F32)?;
            let v = m.clone();
            slots.push(Slot {
                name,
                var,
                m,
                v,
                step: 0,
            });
        }
        Ok(Core { cfg, slots })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            // Candle's gradients can still reference the forward graph (an op between a
            // detached gradient and a tracked activation tracks its op): detach, or the
            // moments would keep every step's graph alive.
            let g = g.detach().to_dtype(DType::F32)?;
            s.step += 1;
            let t = s.step as i32;
            let mut theta = s.var.as_tensor().detach();
            if weight_decay != 0.0 {
                theta = theta.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            s.m = (s.m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?.detach();
            s.v = (s.v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?.detach();
            let bc1 = 1.0 - beta1.powi(t);
            let bc2 = 1.0 - beta2.powi(t);
            // PyTorch: denom = sqrt(v)/sqrt(bc2) + eps; θ -= (lr/bc1)·m/denom.
            let denom = s.v.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
            let update = (&s.m / denom)?.affine(lr / bc1, 0.0)?;
            s.var.set(&(theta - update)?)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.to_device(&Device::Cpu)?);
            out.insert(format!("v.{}", s.name), s.v.to_device(&Device::Cpu)?);
            out.insert(
                format!("step.{}", s.name),
                Tensor::new(&[s.step], &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &TensorMap) -> Result<()> {
        let mut used = 0usize;
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let get = |kind: &str| {
                let key = format!("{kind}.{}", s.name);
                state.get(&key).ok_or_else(|| Error::MissingTensor {
                    name: key,
                    expected: if kind == "step" {
                        vec![1]
                    } else {
                        s.var.dims().to_vec()
                    },
                })
            };
            let (m, v, st) = (get("m")?, get("v")?, get("step")?);
            for (kind, t) in [("m", m), ("v", v)] {
                if t.dims() != s.var.dims() {
                    return Err(Error::ShapeMismatch {
                        name: format!("{kind}.{}", s.name),
                        found: t.dims().to_vec(),
                        expected: s.var.dims().to_vec(),
                    });
                }
            }
            let step = st
                .to_dtype(DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?
                .first()
                .copied()
                .ok_or_else(|| Error::Tensor {
                    name: format!("step.{}", s.name),
                    msg: "empty step count".into(),
                })?;
            let dev = s.var.device();
            loaded.push((
                m.to_dtype(DType::F32)?.to_device(dev)?,
                v.to_dtype(DType::F32)?.to_device(dev)?,
                step,
            ));
            used += 3;
        }
        if used != state.len() {
            let names: std::collections::HashSet<String> = self
                .slots
                .iter()
                .flat_map(|s| ["m", "v", "step"].map(|k| format!("{k}.{}", s.name)))
                .collect();
            let extra: Vec<&String> = state.keys().filter(|k| !names.contains(*k)).collect();
            return Err(Error::UnexpectedTensors {
                count: extra.len(),
                names: extra
                    .iter()
                    .take(8)
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for (s, (m, v, step)) in self.slots.iter_mut().zip(loaded) {
            s.m = m;
            s.v = v;
            s.step = step;
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.slots.iter().map(|s| 2 * 4 * s.var.elem_count()).sum()
    }
}

/// A named-var optimiser.
pub trait Optimizer: Send {
    /// One update from `grads`; vars without a gradient are skipped (their step count too).
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn lr(&self) -> f64;
    fn set_lr(&mut self, lr: f64);
    /// Moments and step counts as named tensors (`m.<var>`, `v.<var>`, `step.<var>`).
    fn state(&self) -> Result<TensorMap>;
    /// Restore [`Optimizer::state`]; missing, mis-shaped or unknown entries are errors.
    fn load_state(&mut self, state: &TensorMap) -> Result<()>;
    /// Bytes held by the moments (2 × f32 per trained entry).
    fn state_bytes(&self) -> usize;
    /// Number of vars and of entries it updates.
    fn sizes(&self) -> (usize, usize);
}

macro_rules! impl_optimizer {
    ($t:ty) => {
        impl Optimizer for $t {
            fn step(&mut self, grads: &GradStore) -> Result<()> {
                self.0.step(grads)
            }
            fn lr(&self) -> f64 {
                self.0.cfg.lr
            }
            fn set_lr(&mut self, lr: f64) {
                self.0.cfg.lr = lr;
            }
            fn state(&self) -> Result<TensorMap> {
                self.0.state()
            }
            fn load_state(&mut self, state: &TensorMap) -> Result<()> {
                self.0.load_state(state)
            }
            fn state_bytes(&self) -> usize {
                self.0.state_bytes()
            }
            fn sizes(&self) -> (usize, usize) {
                (
                    self.0.slots.len(),
                    self.0.slots.iter().map(|s| s.var.elem_count()).sum(),
                )
            }
        }
    };
}

/// Plain Adam (no weight decay): GPS's optimiser.
pub struct Adam(Core);

impl Adam {
    /// Adam over `vars` with PyTorch defaults (β = 0.9, 0.999; ε = 1e-8) and rate `lr`.
    pub fn new(vars: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        Self::with_config(vars, AdamConfig::new(lr))
    }

    /// Adam with explicit betas/eps; `weight_decay` must be 0 (use [`AdamW`]).
    pub fn with_config(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        if cfg.weight_decay != 0.0 {
            return Err(Error::Config {
                field: "weight_decay".into(),
                msg: "plain Adam takes no weight decay; use AdamW".into(),
            });
        }
        Ok(Adam(Core::new(vars, cfg)?))
    }
}

/// AdamW: decoupled weight decay on exactly the vars given.
pub struct AdamW(Core);

impl AdamW {
    /// AdamW over `vars` with PyTorch default betas/eps.
    pub fn new(vars: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Result<Self> {
        Ok(AdamW(Core::new(
            vars,
            AdamConfig {
                weight_decay,
                ..AdamConfig::new(lr)
            },
        )?))
    }
}

impl_optimizer!(Adam);
impl_optimizer!(AdamW);

#[cfg(test)]
mod tests {
    use super::*;

    fn quad_loss(w: &Var, target: &Tensor) -> Tensor {
        (w.as_tensor() - target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    }

    #[test]
    fn adam_matches_a_hand_computed_first_step_and_skips_gradless_vars() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, -1.], &dev).unwrap();
        let other = Var::new(&[5f32], &dev).unwrap();
        let mut opt = Adam::new(
            vec![("w".into(), w.clone()), ("o".into(), other.clone())],
            0.1,
        )
        .unwrap();
        let target = Tensor::new(&[0f32, 0.], &dev).unwrap();
        let g = quad_loss(&w, &target).backward().unwrap();
        opt.step(&g).unwrap();
        // First Adam step moves each entry by lr·sign(g) (up to eps).
        let v = w.to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 0.9).abs() < 1e-6,
            "{v:?}"
        );
        assert_eq!(other.to_vec1::<f32>().unwrap(), vec![5.]);
        let st = opt.state().unwrap();
        assert_eq!(st["step.w"].to_vec1::<u32>().unwrap(), vec![1]);
        assert_eq!(st["step.o"].to_vec1::<u32>().unwrap(), vec![0]);
        assert_eq!(opt.sizes(), (2, 3));
        assert_eq!(opt.state_bytes(), 24);
        assert!(Adam::with_config(
            vec![],
            AdamConfig {
                weight_decay: 0.1,
                ..AdamConfig::new(1.0)
            }
        )
        .is_err());
    }

    #[test]
    fn adamw_decays_only_given_vars_and_state_resumes_exactly() {
        let dev = Device::Cpu;
        let target = Tensor::new(&[0.5f32, 2., -3.], &dev).unwrap();
        let run = |steps: usize, resume_at: Option<usize>| -> Vec<f32> {
            let w = Var::new(&[1f32, -1., 0.], &dev).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.05, 0.1).unwrap();
            for i in 0..steps {
                if Some(i) == resume_at {
                    let st = opt.state().unwrap();
                    let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
                    let mut opt2 = AdamW::new(vec![("w".into(), w2.clone())], 0.05, 0.1).unwrap();
                    opt2.load_state(&st).unwrap();
                    for _ in i..steps {
                        let g = quad_loss(&w2, &target).backward().unwrap();
                        opt2.step(&g).unwrap();
                    }
                    return w2.to_vec1::<f32>().unwrap();
                }
                let g = quad_loss(&w, &target).backward().unwrap();
                opt.step(&g).unwrap();
            }
            w.to_vec1::<f32>().unwrap()
        };
        let straight = run(6, None);
        let resumed = run(6, Some(3));
        assert_eq!(straight, resumed);

        // A frozen tensor never given to AdamW is not decayed.
        let frozen = Tensor::new(&[1f32, 2.], &dev).unwrap();
        let w = Var::new(&[1f32], &dev).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.1, 0.5).unwrap();
        let g = (w.as_tensor() * 2.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&g).unwrap();
        assert_eq!(frozen.to_vec1::<f32>().unwrap(), vec![1., 2.]);
        // Decoupled decay: θ(1 − lr·wd) − lr·sign(g).
        assert!((w.to_vec1::<f32>().unwrap()[0] - (0.95 - 0.1)).abs() < 1e-6);

        // Bad state is rejected, naming the entry.
        let mut st = opt.state().unwrap();
        st.insert("m.ghost".into(), Tensor::new(&[0f32], &dev).unwrap());
        let e = opt.load_state(&st).unwrap_err().to_string();
        assert!(e.contains("m.ghost"), "{e}");
        st.remove("m.ghost");
        st.insert("v.w".into(), Tensor::new(&[0f32, 1.], &dev).unwrap());
        let e = opt.load_state(&st).unwrap_err().to_string();
        assert!(e.contains("v.w"), "{e}");
        st.remove("v.w");
        let e = opt.load_state(&st).unwrap_err().to_string();
        assert!(e.contains("v.w"), "{e}");
    }

    /// The moments must not keep the forward graph alive (a leak of one step's activations
    /// per step): gradients through tracked activations carry ops until detached.
    #[test]
    fn moments_hold_no_graph() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2.], &dev).unwrap();
        let other = Var::new(&[3f32, 4.], &dev).unwrap();
        let act = (other.as_tensor() * 2.0).unwrap(); // a tracked activation
        let loss = (w.as_tensor() * &act)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(w.as_tensor()).unwrap().track_op());
        let mut opt = Adam::new(vec![("w".into(), w.clone())], 0.1).unwrap();
        opt.step(&grads).unwrap();
        let st = opt.state().unwrap();
        assert!(!st["m.w"].track_op() && !st["v.w"].track_op());
        assert!(!w.as_tensor().track_op() || w.as_tensor().is_variable());
    }
}
