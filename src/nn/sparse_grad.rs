//! Linear layers whose backward skips the dense weight gradient (issue: make a GPS step
//! cheaper than a full step).
//!
//! Candle's matmul backward always computes both operand gradients, so a frozen weight still
//! pays `dW = dyᵀ·x` — a third of a linear layer's training FLOPs — and GPS, which trains a
//! handful of entries per row, would pay it for every encoder matrix. Here the value of
//! `y = x·Wᵀ` is computed on detached inputs and handed to a custom op on `x` (and `δ`) whose
//! forward returns that value (moved, so the graph holds it once) and whose backward returns
//! - `dx = dy·W` (dense: backpropagation must continue), and
//! - for a GPS-sparse weight, `dδ_j = Σ_t dy[t, r_j]·x[t, c_j]` at the selected entries only:
//!   O(tokens × selected) instead of O(tokens × out × in).
//!
//! `y = op(x, δ)` has the value of the dense path and the same gradients; tests compare both against the dense path and finite differences.
//! Used on CPU; other devices take the dense path.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Move the precomputed value out of `slot` as the op's output (one copy, and the value is
/// not retained by the graph a second time).
fn take_value(slot: &Mutex<Option<Tensor>>) -> candle_core::Result<(CpuStorage, Shape)> {
    let y = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("linear value lock poisoned".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("linear value already used".into()))?
        .contiguous()?;
    let (st, l) = y.storage_and_layout();
    let n = l.shape().elem_count();
    let out = match (&*st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) if b - a == n => {
            CpuStorage::F32(v[a..b].to_vec())
        }
        (Storage::Cpu(CpuStorage::F64(v)), Some((a, b))) if b - a == n => {
            CpuStorage::F64(v[a..b].to_vec())
        }
        _ => candle_core::bail!("linear fast path: expected a contiguous f32/f64 CPU value"),
    };
    Ok((out, l.shape().clone()))
}

/// Gradient carrier for `x·Wᵀ` with a constant `W`: its forward returns the value `x·Wᵀ`
/// computed beforehand on the detached input; backward gives `dx = dy·W` only.
pub struct InputGradOnly {
    /// The full weight `[out, in]`, detached.
    pub w: Tensor,
    /// The value `x·Wᵀ` `[rows, out]`, moved into the output by the forward.
    pub value: Mutex<Option<Tensor>>,
}

impl InputGradOnly {
    pub fn new(w: Tensor, value: Tensor) -> Self {
        InputGradOnly {
            w,
            value: Mutex::new(Some(value)),
        }
    }
}

impl CustomOp1 for InputGradOnly {
    fn name(&self) -> &'static str {
        "linear-input-grad"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        take_value(&self.value)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// Gradient carrier for `x·(W₀ + S(δ))ᵀ`: its forward returns the value computed beforehand;
/// backward gives `dx = dy·W` and the sparse `dδ`.
pub struct SparseWeightGrad {
    /// The full current weight `[out, in]` (base + delta), detached.
    pub w: Tensor,
    /// The value `x·Wᵀ` `[rows, out]`, moved into the output by the forward.
    pub value: Mutex<Option<Tensor>>,
    /// Row of each selected entry (u32 `[n]`).
    pub rows: Tensor,
    /// Column of each selected entry (u32 `[n]`).
    pub cols: Tensor,
}

impl CustomOp2 for SparseWeightGrad {
    fn name(&self) -> &'static str {
        "linear-sparse-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _ = (s1, l1);
        take_value(&self.value)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _delta: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad_res.matmul(&self.w)?;
        let gy = grad_res.index_select(&self.rows, 1)?; // [T, n]
        let xs = x.index_select(&self.cols, 1)?; // [T, n]
        let dd = (gy * xs)?.sum(0)?;
        Ok((Some(dx), Some(dd)))
    }
}

#[cfg(test)]
mod tests {
    use crate::nn::param::{ParamStore, Role};
    use crate::nn::Linear;
    use crate::util::tensors::TensorMap;
    use candle_core::{Device, Tensor, Var};
    use std::collections::HashMap;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::randn(shape, seed, candle_core::DType::F32).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::nn::gradcheck::max_abs_diff(a, b).unwrap() as f32
    }

    /// Fast path (sparse/input-only gradient) and Candle's dense path agree on values and on
    /// the gradients of the input and of the selected entries.
    #[test]
    fn fast_linear_matches_dense_path() {
        let dev = Device::Cpu;
        let mut src = TensorMap::new();
        src.insert("s.weight".into(), randn(&[6, 5], 1));
        src.insert("s.bias".into(), randn(&[6], 2));
        src.insert("f.weight".into(), randn(&[6, 5], 3));
        let mut roles = HashMap::new();
        // Two entries in row 0, one in rows 2 and 5 (flat indices into [6, 5]).
        roles.insert("s.weight".to_string(), Role::Sparse(vec![1, 3, 12, 29]));
        roles.insert("s.bias".to_string(), Role::Trainable);
        let store = ParamStore::with_roles(src, roles, &dev);
        let sparse = Linear::new(&store.pp("s"), 5, 6, true).unwrap();
        let frozen = Linear::new(&store.pp("f"), 5, 6, false).unwrap();
        if let crate::nn::Param::Sparse(s) = &sparse.weight {
            s.delta.set(&randn(&[4], 4)).unwrap();
        } else {
            panic!("expected a sparse weight");
        }
        let proj = randn(&[2, 3, 6], 5);
        let x = Var::from_tensor(&randn(&[2, 3, 5], 6)).unwrap();
        let run = |fast: bool| {
            let (a, b) = if fast {
                (
                    sparse.forward(x.as_tensor()).unwrap(),
                    frozen.forward(x.as_tensor()).unwrap(),
                )
            } else {
                (
                    sparse.forward_dense(x.as_tensor()).unwrap(),
                    frozen.forward_dense(x.as_tensor()).unwrap(),
                )
            };
            let y = (a + b).unwrap();
            let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let vars = store.trainable_vars();
            let gs: Vec<Tensor> = vars
                .iter()
                .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
                .collect();
            (y, g.get(x.as_tensor()).unwrap().clone(), gs)
        };
        let (y1, dx1, g1) = run(true);
        let (y2, dx2, g2) = run(false);
        assert!(max_abs_diff(&y1, &y2) < 1e-5);
        assert!(max_abs_diff(&dx1, &dx2) < 1e-5);
        assert_eq!(g1.len(), 2);
        for (a, b) in g1.iter().zip(&g2) {
            assert!(max_abs_diff(a, b) < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn fast_linear_input_gradient_matches_finite_differences() {
        let store = ParamStore::new(None, crate::nn::RolePolicy::AllFrozen, &Device::Cpu, 3);
        let lin = Linear::new(&store, 4, 3, true).unwrap();
        let x = randn(&[2, 4], 9);
        let e = crate::nn::gradcheck::check(&x, 8, 0, |x| {
            // the fast path runs in f32; compare in f32 precision
            let y = lin.forward(&x.to_dtype(candle_core::DType::F32)?)?;
            Ok(y.to_dtype(candle_core::DType::F64)?)
        })
        .unwrap();
        assert!(e < 2e-2, "{e}");
    }
}
