//! Gradient accumulation for selection: run the task loss over the selection data with the
//! *pretrained* weights (no update) and sum the raw gradients of every var, as the reference
//! GPS code does before taking |sum| per entry (Zhang et al., CVPR 2024, §3.1).
//!
//! Memory: the accumulator holds one f32 score buffer per var (host memory on the CPU, summed
//! in place; a tensor on other devices). Each gradient is taken out of the backward pass's
//! store, added and dropped at once, and the forward graph is released before the gradients
//! are added. [`grad_store`] builds the vars so that they share storage with the base weights
//! (the pass never updates them), so the pass holds one f32 copy of the base, not two. It
//! never imports a model: the caller supplies the vars (the [`super::policy::Policy`]-selected
//! tensors made trainable) and a closure computing a scalar loss (or a loss and its gradients,
//! e.g. with block recomputation, [`accumulate_with`]).

use crate::error::{Error, Result};
use crate::nn::ParamStore;
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use std::collections::HashMap;

use super::policy::{Policy, Treatment};
use crate::nn::Role;

/// One running sum.
#[derive(Debug)]
enum Sum {
    /// CPU: summed in place.
    Host { data: Vec<f32>, shape: Vec<usize> },
    /// Other devices: `acc + g` on the device.
    Device(Tensor),
}

/// Running sum of gradients, keyed by var name.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: HashMap<String, Sum>,
    batches: usize,
}

/// `f` over the contiguous f32 host data of `t`; `None` when `t` is not an f32 CPU tensor.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c @ CpuStorage::F32(_)) => {
            let all = c.as_slice::<f32>()?;
            let part = l
                .contiguous_offsets()
                .and_then(|(a, b)| all.get(a..b))
                .ok_or_else(|| Error::msg("gradient storage is not contiguous"))?;
            Ok(Some(f(part)))
        }
        _ => Ok(None),
    }
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add this backward pass's gradients of `vars`, taking each out of `grads` (dropped once
    /// added); vars without a gradient are skipped. A non-finite gradient is an error naming
    /// the var.
    pub fn add(&mut self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
        let batch = self.batches;
        let non_finite = |name: &str| {
            Error::NonFinite(format!("gradient of `{name}` in selection batch {batch}"))
        };
        for (name, var) in vars {
            let Some(g) = grads.remove(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?.detach();
            let entry = self.sums.remove(name);
            let added = match entry {
                Some(Sum::Host { mut data, shape }) => {
                    if shape != g.dims() {
                        return Err(Error::ShapeMismatch {
                            name: name.clone(),
                            found: g.dims().to_vec(),
                            expected: shape,
                        });
                    }
                    let finite = with_host_f32(&g, |gs| {
                        let mut ok = true;
                        for (a, &x) in data.iter_mut().zip(gs) {
                            ok &= x.is_finite();
                            *a += x;
                        }
                        ok
                    })?;
                    match finite {
                        Some(true) => Sum::Host { data, shape },
                        Some(false) => return Err(non_finite(name)),
                        None => {
                            return Err(Error::msg(format!(
                                "gradient of `{name}` left the CPU between batches"
                            )))
                        }
                    }
                }
                Some(Sum::Device(acc)) => {
                    check_finite_tensor(&g).map_err(|_| non_finite(name))?;
                    Sum::Device((acc + g)?)
                }
                None => match with_host_f32(&g, |gs| {
                    gs.iter().all(|x| x.is_finite()).then(|| gs.to_vec())
                })? {
                    Some(Some(data)) => Sum::Host {
                        data,
                        shape: g.dims().to_vec(),
                    },
                    Some(None) => return Err(non_finite(name)),
                    None => {
                        check_finite_tensor(&g).map_err(|_| non_finite(name))?;
                        Sum::Device(g)
                    }
                },
            };
            self.sums.insert(name.clone(), added);
        }
        self.batches += 1;
        Ok(())
    }

    /// Number of batches added.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// The accumulated (raw, signed) gradients.
    pub fn finish(self) -> Result<TensorMap> {
        self.sums
            .into_iter()
            .map(|(name, s)| {
                let t = match s {
                    Sum::Host { data, shape } => Tensor::from_vec(data, shape, &Device::Cpu)?,
                    Sum::Device(t) => t,
                };
                Ok((name, t))
            })
            .collect()
    }
}

fn check_finite_tensor(g: &Tensor) -> Result<()> {
    let s = g.sum_all()?.to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite("gradient".into()))
    }
}

/// Roles for the gradient pass over `base`: tensors `policy` selects become trainable vars
/// (so they get gradients); everything else is frozen, which also skips their weight
/// gradients in backward. Build the model with [`grad_store`] (or
/// `ParamStore::with_roles(base, roles, dev)`, which copies the selected tensors).
pub fn grad_roles(base: &TensorMap, policy: &Policy) -> HashMap<String, Role> {
    base.iter()
        .filter(|(n, t)| policy.treatment(n, t.dims()) == Treatment::Selected)
        .map(|(n, _)| (n.clone(), Role::Trainable))
        .collect()
}

/// The parameter store of the gradient pass without a second copy of the base: each tensor
/// `policy` selects becomes a var (one copy of that tensor), and `base` is repointed at the
/// var's storage (the original is freed when nothing else holds it), so the base and the
/// store's vars are one buffer. Sound because the pass never updates its vars; the values
/// in `base` are unchanged. Tensors on another device or of another dtype than f32 are left
/// to the store (copied as usual).
pub fn grad_store(base: &mut TensorMap, policy: &Policy, device: &Device) -> Result<ParamStore> {
    let roles = grad_roles(base, policy);
    let mut src = TensorMap::new();
    for (name, t) in base.iter_mut() {
        if roles.contains_key(name) && t.device().same_device(device) && t.dtype() == DType::F32 {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().detach();
            src.insert(name.clone(), v.as_tensor().clone());
        } else {
            src.insert(name.clone(), t.clone());
        }
    }
    Ok(ParamStore::with_roles(src, roles, device))
}

/// Run `loss_fn` on each batch, backpropagate, and accumulate the gradients of `vars`.
/// Returns the summed gradients and the number of batches. The weights are never updated.
pub fn accumulate<B>(
    vars: &[(String, Var)],
    batches: impl IntoIterator<Item = B>,
    mut loss_fn: impl FnMut(B) -> Result<Tensor>,
) -> Result<(TensorMap, usize)> {
    accumulate_with(vars, batches, |b| {
        let loss = loss_fn(b)?;
        check_scalar(&loss)?;
        let grads = loss.backward()?;
        // The detached loss keeps no graph: the forward activations go with `loss`.
        Ok((loss.detach(), grads))
    })
}

fn check_scalar(loss: &Tensor) -> Result<()> {
    if loss.elem_count() != 1 {
        return Err(Error::msg(format!(
            "selection loss must be a scalar, got shape {:?}",
            loss.dims()
        )));
    }
    Ok(())
}

/// [`accumulate`] with a closure that runs the backward pass itself and returns the (scalar)
/// loss and the gradients, e.g. with block recomputation. Return the loss detached so that
/// its forward graph is gone before the gradients are added.
pub fn accumulate_with<B>(
    vars: &[(String, Var)],
    batches: impl IntoIterator<Item = B>,
    mut step: impl FnMut(B) -> Result<(Tensor, GradStore)>,
) -> Result<(TensorMap, usize)> {
    let mut acc = GradAccumulator::new();
    for batch in batches {
        let (loss, mut grads) = step(batch)?;
        check_scalar(&loss)?;
        drop(loss);
        acc.add(&mut grads, vars)?;
    }
    let n = acc.batches();
    if n == 0 {
        return Err(Error::msg(
            "gradient accumulation saw no batches (empty selection data)",
        ));
    }
    Ok((acc.finish()?, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accumulates_raw_sums_and_skips_unreached_vars() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, -2., 3.], &dev).unwrap();
        let unused = Var::new(&[0f32], &dev).unwrap();
        let vars = vec![("w".to_string(), w.clone()), ("u".to_string(), unused)];
        let xs = vec![[1f32, 1., 1.], [2., -1., 0.5]];
        let (g, n) = accumulate(&vars, xs, |x| {
            let x = Tensor::new(&x, &dev)?;
            Ok((w.as_tensor() * x)?.sum_all()?)
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(g["w"].to_vec1::<f32>().unwrap(), vec![3., 0., 1.5]);
        assert!(!g.contains_key("u"));
        // Weights untouched.
        assert_eq!(w.to_vec1::<f32>().unwrap(), vec![1., -2., 3.]);
        let e = accumulate(&vars, Vec::<[f32; 3]>::new(), |_| unreachable!()).unwrap_err();
        assert!(e.to_string().contains("no batches"));
        let e = accumulate(&vars, [0], |_| Ok((w.as_tensor() * f64::NAN)?.sum_all()?)).unwrap_err();
        assert!(e.to_string().contains("`w`"), "{e}");
    }
}
