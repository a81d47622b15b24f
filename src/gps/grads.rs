//! Gradient accumulation for selection: run the task loss over the selection data with the
//! *pretrained* weights (no update) and sum the raw gradients of every var, as the reference
//! GPS code does before taking |sum| per entry (Zhang et al., CVPR 2024, §3.1).
//!
//! The accumulator holds at most one f32 buffer per var, on the var's device. It never
//! imports a model: the caller supplies the vars (e.g. [`super::policy::Policy`]-selected
//! tensors made trainable in a [`crate::nn::ParamStore`]) and a closure computing a scalar loss.

use crate::error::{Error, Result};
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

use super::policy::{Policy, Treatment};
use crate::nn::Role;

/// Running sum of gradients, keyed by var name.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: TensorMap,
    batches: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add this backward pass's gradients of `vars`; vars without a gradient are skipped.
    /// A non-finite gradient is an error naming the var.
    pub fn add(&mut self, grads: &GradStore, vars: &[(String, Var)]) -> Result<()> {
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?.detach();
            let s = g.sum_all()?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Err(Error::NonFinite(format!(
                    "gradient of `{name}` in selection batch {}",
                    self.batches
                )));
            }
            let next = match self.sums.remove(name) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            self.sums.insert(name.clone(), next);
        }
        self.batches += 1;
        Ok(())
    }

    /// Number of batches added.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// The accumulated (raw, signed) gradients.
    pub fn finish(self) -> TensorMap {
        self.sums
    }
}

/// Roles for the gradient pass over `base`: tensors `policy` selects become trainable vars
/// (so they get gradients); everything else is frozen, which also skips their weight
/// gradients in backward. Build the model with `ParamStore::with_roles(base, roles, dev)`.
pub fn grad_roles(base: &TensorMap, policy: &Policy) -> HashMap<String, Role> {
    base.iter()
        .filter(|(n, t)| policy.treatment(n, t.dims()) == Treatment::Selected)
        .map(|(n, _)| (n.clone(), Role::Trainable))
        .collect()
}

/// Run `loss_fn` on each batch, backpropagate, and accumulate the gradients of `vars`.
/// Returns the summed gradients and the number of batches. The weights are never updated.
pub fn accumulate<B>(
    vars: &[(String, Var)],
    batches: impl IntoIterator<Item = B>,
    mut loss_fn: impl FnMut(B) -> Result<Tensor>,
) -> Result<(TensorMap, usize)> {
    let mut acc = GradAccumulator::new();
    for batch in batches {
        let loss = loss_fn(batch)?;
        if loss.elem_count() != 1 {
            return Err(Error::msg(format!(
                "selection loss must be a scalar, got shape {:?}",
                loss.dims()
            )));
        }
        let grads = loss.backward()?;
        acc.add(&grads, vars)?;
    }
    let n = acc.batches();
    if n == 0 {
        return Err(Error::msg(
            "gradient accumulation saw no batches (empty selection data)",
        ));
    }
    Ok((acc.finish(), n))
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
