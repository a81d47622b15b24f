//! Linear layers as one custom op each, whose backward computes only the gradients that
//! train (issue: make a GPS step cheaper than a full step).
//!
//! Candle's matmul backward always computes both operand gradients, so a frozen weight still
//! pays `dW = dyᵀ·x` — a third of a linear layer's training FLOPs — and GPS, which trains a
//! handful of entries per row, would pay it for every encoder matrix. Here `y = x·Wᵀ (+ b)` is
//! a custom op on `x` (and `δ`, or the dense weight `W`, and a trainable `b`) whose forward
//! runs the gemm straight into the output buffer (a constant bias is folded in: no extra pass
//! or graph node) and whose backward returns
//! - `dx = dy·W` (dense: backpropagation must continue), and
//! - for a GPS-sparse weight, `dδ_j = Σ_t dy[t, r_j]·x[t, c_j]` at the selected entries only:
//!   O(tokens × selected) instead of O(tokens × out × in);
//! - for a trainable weight (full fine-tuning, the selection pass), the dense `dW = dyᵀ·x`.
//!
//! Every product runs on [`super::cpu_gemm::matmul_into`] (rows split between threads).
//! `y = op(x, …)` has the value of the dense path and the same gradients; tests compare both
//! against the dense path and finite differences. Used on CPU; other devices take the dense
//! path.

use super::base::{data, Fl};
use super::cpu_gemm::{matmul, matmul_into, Mat};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `y = x·Wᵀ (+ b)` for `x: [rows, in]`, `W: [out, in]`, `b: [out]`, straight into the output
/// buffer (bias rows first, the product accumulated onto them), rows split between the
/// threads ([`super::cpu_gemm`]), so the op's value is never copied.
fn linear_value<T: Fl>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (rows, inp, out): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    let mut y = match b {
        Some(b) => {
            let mut y = Vec::with_capacity(rows.saturating_mul(out));
            for _ in 0..rows {
                y.extend_from_slice(b);
            }
            y
        }
        None => vec![T::ZERO; rows.saturating_mul(out)],
    };
    matmul_into(
        &mut y,
        (rows, inp, out),
        Mat::row_major(x, inp),
        Mat::transposed(w, inp),
        b.is_some(),
    )?;
    Ok(y)
}

/// Run `f` on the contiguous CPU data of `t` (f32/f64).
pub(crate) fn with_data<T: Fl, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(data::<T>(s, l)?),
        _ => candle_core::bail!("linear fast path: expected a CPU tensor"),
    }
}

/// Where the bias of the value comes from.
enum BiasSrc<'a> {
    None,
    /// A constant bias held by the op.
    Held(&'a Tensor),
    /// The trainable bias, an input of the op.
    Input(&'a CpuStorage, &'a Layout),
}

/// Forward of the carrier: `x·Wᵀ (+ b)` for `x` = the op's first input.
fn forward_value(
    w: &Tensor,
    bias: BiasSrc<'_>,
    s: &CpuStorage,
    l: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (out, w_in) = w.dims2()?;
    let x_dims = l.shape().dims();
    let inp = x_dims.last().copied().unwrap_or(0);
    if w_in != inp || inp == 0 {
        candle_core::bail!("linear fast path: input has {inp} features, the weight {w_in}");
    }
    let rows = l.shape().elem_count() / inp;
    let mut y_dims = x_dims.to_vec();
    if let Some(last) = y_dims.last_mut() {
        *last = out;
    }
    fn k<T: Fl>(
        w: &Tensor,
        bias: BiasSrc<'_>,
        x: &[T],
        dims: (usize, usize, usize),
    ) -> candle_core::Result<CpuStorage> {
        with_data::<T, _>(w, |w| {
            let y = match bias {
                BiasSrc::None => linear_value(x, w, None, dims)?,
                BiasSrc::Held(b) => with_data::<T, _>(b, |b| linear_value(x, w, Some(b), dims))?,
                BiasSrc::Input(s, l) => linear_value(x, w, Some(data::<T>(s, l)?), dims)?,
            };
            Ok(T::to_cpu_storage_owned(y))
        })
    }
    let dims = (rows, inp, out);
    let st = match s {
        CpuStorage::F32(_) => k::<f32>(w, bias, data(s, l)?, dims)?,
        CpuStorage::F64(_) => k::<f64>(w, bias, data(s, l)?, dims)?,
        _ => candle_core::bail!("linear fast path: only f32 and f64 are supported"),
    };
    Ok((st, Shape::from(y_dims)))
}

/// `dδ_j = Σ_t dy[t, rows_j]·x[t, cols_j]` for `dy: [T, out]`, `x: [T, in]`: per token, a
/// gather from two cache-resident rows; parallel over blocks of entries.
fn sparse_entries_grad<T: Fl>(
    dy: &[T],
    x: &[T],
    rows: &[u32],
    cols: &[u32],
    (out, inp): (usize, usize),
) -> Vec<T> {
    let n = rows.len();
    let t = dy.len().checked_div(out).unwrap_or(0);
    let mut dd = vec![T::ZERO; n];
    let block = n.div_ceil(4 * rayon::current_num_threads().max(1)).max(256);
    dd.par_chunks_mut(block).enumerate().for_each(|(bi, acc)| {
        let j0 = bi * block;
        let (r, c) = (&rows[j0..j0 + acc.len()], &cols[j0..j0 + acc.len()]);
        for tok in 0..t {
            let g = &dy[tok * out..(tok + 1) * out];
            let xr = &x[tok * inp..(tok + 1) * inp];
            for ((a, &ri), &ci) in acc.iter_mut().zip(r).zip(c) {
                *a += g[ri as usize] * xr[ci as usize];
            }
        }
    });
    dd
}

/// `db = Σ_t dy[t, :]` for `dy: [T, out]` (rows summed in parallel blocks).
fn column_sums<T: Fl>(dy: &[T], out: usize) -> Vec<T> {
    let rows_per = 64;
    dy.par_chunks(rows_per * out.max(1))
        .fold(
            || vec![T::ZERO; out],
            |mut acc, block| {
                for row in block.chunks_exact(out) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
                acc
            },
        )
        .reduce(
            || vec![T::ZERO; out],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += *y;
                }
                a
            },
        )
}

/// Row and column (`[n]` each) of a sparse weight's selected entries, shared with its
/// [`crate::nn::param::SparseParam`].
pub type SelectedEntries = (Arc<[u32]>, Arc<[u32]>);

/// Which gradients a carrier's backward computes.
struct Wanted<'a> {
    /// `dx`.
    dx: bool,
    /// Rows and columns of the GPS-selected entries (`dδ`).
    idx: Option<(&'a [u32], &'a [u32])>,
    /// The dense `dW`.
    dense: bool,
    /// `db`.
    bias: bool,
}

/// Gradient carrier for `y = x·Wᵀ (+ b)`: one graph node for the product and its bias,
/// whatever the weight is — frozen, GPS-sparse (`W = W₀ + S(δ)`) or dense trainable. Its
/// forward computes the value with one gemm; its backward gives `dx = dy·W`, the sparse `dδ`
/// or the dense `dW = dyᵀ·x`, and, for a trainable bias, `db = Σ_t dy`. (Candle's own
/// `x.matmul(&w.t()).broadcast_add(&b)` is three nodes, each summed into the gradient store
/// on its own, and its matmul backward always computes both operand gradients.)
///
/// The op's inputs are `x`, then `δ` when [`Self::sparse`] is set or the weight itself when
/// [`Self::dense_weight`] is, then `b` when [`Self::trainable_bias`] is set — one to three
/// inputs, so it implements `CustomOp1/2/3`.
pub struct LinearCarrier {
    /// The full current weight `[out, in]`, detached and contiguous.
    pub w: Tensor,
    /// A constant bias `[out]` folded into the value, if any.
    pub frozen_bias: Option<Tensor>,
    /// Rows and columns of the selected entries of a GPS-sparse weight.
    pub sparse: Option<SelectedEntries>,
    /// Whether the second input is the trainable weight `[out, in]` (the value of [`Self::w`]
    /// on the graph) and gets the dense gradient. Excludes [`Self::sparse`].
    pub dense_weight: bool,
    /// Whether the last input is a trainable bias `[out]`.
    pub trainable_bias: bool,
}

impl LinearCarrier {
    /// `(dx, d_weight, db)` from the op's input `x` and the output gradient: `dx` only where
    /// `x` is on the graph (the patch embedding's input image is not), `d_weight` the sparse
    /// `dδ` or the dense `dW`, `db` for a trainable bias. Each product runs on the row-split
    /// gemm of [`super::cpu_gemm`].
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (out, inp) = self.w.dims2()?;
        let rows = dy.elem_count() / out.max(1);
        let x_shape = x.shape().clone();
        let need_dx = x.track_op();
        let need_x = self.sparse.is_some() || self.dense_weight;
        let x = if need_x { Some(x.contiguous()?) } else { None };
        let want = Wanted {
            dx: need_dx,
            idx: self.sparse.as_ref().map(|(r, c)| (&r[..], &c[..])),
            dense: self.dense_weight,
            bias: self.trainable_bias,
        };
        fn k<T: Fl>(
            w: &Tensor,
            dy: &Tensor,
            x: Option<&Tensor>,
            want: &Wanted<'_>,
            (rows, out, inp): (usize, usize, usize),
            x_shape: &Shape,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dev = dy.device();
            with_data::<T, _>(dy, |g| {
                let dx = if want.dx {
                    let v = with_data::<T, _>(w, |w| {
                        matmul(
                            (rows, out, inp),
                            Mat::row_major(g, out),
                            Mat::row_major(w, inp),
                        )
                    })?;
                    Some(Tensor::from_vec(v, x_shape.clone(), dev)?)
                } else {
                    None
                };
                let dweight = match (x, want.idx, want.dense) {
                    (Some(x), Some((r, c)), _) => {
                        let v = with_data::<T, _>(x, |x| {
                            Ok(sparse_entries_grad(g, x, r, c, (out, inp)))
                        })?;
                        let n = v.len();
                        Some(Tensor::from_vec(v, n, dev)?)
                    }
                    (Some(x), None, true) => {
                        let v = with_data::<T, _>(x, |x| {
                            matmul(
                                (out, rows, inp),
                                Mat::transposed(g, out),
                                Mat::row_major(x, inp),
                            )
                        })?;
                        Some(Tensor::from_vec(v, (out, inp), dev)?)
                    }
                    _ => None,
                };
                let db = if want.bias {
                    Some(Tensor::from_vec(column_sums(g, out), out, dev)?)
                } else {
                    None
                };
                Ok((dx, dweight, db))
            })
        }
        let dims = (rows, out, inp);
        match dy.dtype() {
            candle_core::DType::F32 => k::<f32>(&self.w, &dy, x.as_ref(), &want, dims, &x_shape),
            candle_core::DType::F64 => k::<f64>(&self.w, &dy, x.as_ref(), &want, dims, &x_shape),
            other => candle_core::bail!("linear fast path: unsupported dtype {other:?}"),
        }
    }

    fn held_bias(&self) -> BiasSrc<'_> {
        match &self.frozen_bias {
            Some(b) => BiasSrc::Held(b),
            None => BiasSrc::None,
        }
    }
}

impl CustomOp1 for LinearCarrier {
    fn name(&self) -> &'static str {
        "linear-carrier"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        forward_value(&self.w, self.held_bias(), s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.grads(x, grad)?.0)
    }
}

impl CustomOp2 for LinearCarrier {
    fn name(&self) -> &'static str {
        "linear-carrier"
    }

    /// Inputs `(x, δ)` (sparse weight), `(x, W)` (dense weight) or `(x, b)` (trainable bias).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let bias = if self.trainable_bias {
            BiasSrc::Input(s2, l2)
        } else {
            self.held_bias()
        };
        forward_value(&self.w, bias, s1, l1)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _second: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dweight, db) = self.grads(x, grad)?;
        Ok((dx, if self.trainable_bias { db } else { dweight }))
    }
}

impl CustomOp3 for LinearCarrier {
    fn name(&self) -> &'static str {
        "linear-carrier"
    }

    /// Inputs `(x, δ, b)` or `(x, W, b)`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        forward_value(&self.w, BiasSrc::Input(s3, l3), s1, l1)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _delta: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dd, db) = self.grads(x, grad)?;
        Ok((dx, dd, db))
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

    /// Fast path (carrier op) and Candle's dense path agree on values and on the gradients of
    /// the input, the selected entries and trainable biases — for every input combination of
    /// the carrier: sparse weight with trainable (`s`) or frozen (`h`) bias, frozen weight
    /// without bias (`f`), with a trainable bias (`g`) or a frozen one (`k`), dense trainable
    /// weight with a trainable (`t`), frozen (`u`) or no bias (`v`).
    #[test]
    fn fast_linear_matches_dense_path() {
        let dev = Device::Cpu;
        let mut src = TensorMap::new();
        for (i, name) in ["s", "h", "f", "g", "k", "t", "u", "v"].iter().enumerate() {
            src.insert(format!("{name}.weight"), randn(&[6, 5], 1 + 2 * i as u64));
            src.insert(format!("{name}.bias"), randn(&[6], 2 + 2 * i as u64));
        }
        let mut roles = HashMap::new();
        // Two entries in row 0, one in rows 2 and 5 (flat indices into [6, 5]).
        roles.insert("s.weight".to_string(), Role::Sparse(vec![1, 3, 12, 29]));
        roles.insert("s.bias".to_string(), Role::Trainable);
        roles.insert("h.weight".to_string(), Role::Sparse(vec![0, 7, 8, 20, 21]));
        roles.insert("g.bias".to_string(), Role::Trainable);
        for t in ["t.weight", "t.bias", "u.weight", "v.weight"] {
            roles.insert(t.to_string(), Role::Trainable);
        }
        let store = ParamStore::with_roles(src, roles, &dev);
        let layer = |name: &str, bias: bool| Linear::new(&store.pp(name), 5, 6, bias).unwrap();
        let layers = [
            layer("s", true),
            layer("h", true),
            layer("f", false),
            layer("g", true),
            layer("k", true),
            layer("t", true),
            layer("u", true),
            layer("v", false),
        ];
        for (l, n) in layers[..2].iter().zip([4, 5]) {
            if let crate::nn::Param::Sparse(s) = &l.weight {
                s.delta.set(&randn(&[n], 4 + n as u64)).unwrap();
            } else {
                panic!("expected a sparse weight");
            }
        }
        let proj = randn(&[2, 3, 6], 5);
        let x = Var::from_tensor(&randn(&[2, 3, 5], 6)).unwrap();
        let run = |fast: bool| {
            let mut y = x.as_tensor().zeros_like().unwrap().narrow(2, 0, 1).unwrap();
            for l in &layers {
                let out = if fast {
                    l.forward(x.as_tensor()).unwrap()
                } else {
                    l.forward_dense(x.as_tensor()).unwrap()
                };
                y = y.broadcast_add(&out).unwrap();
            }
            let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let vars = store.trainable_vars();
            let gs: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).unwrap().clone()))
                .collect();
            (y, g.get(x.as_tensor()).unwrap().clone(), gs)
        };
        let (y1, dx1, g1) = run(true);
        let (y2, dx2, g2) = run(false);
        assert!(max_abs_diff(&y1, &y2) < 1e-5);
        assert!(max_abs_diff(&dx1, &dx2) < 1e-5);
        // s.weight, s.bias, h.weight, g.bias, t.weight, t.bias, u.weight, v.weight
        assert_eq!(
            g1.len(),
            8,
            "{:?}",
            g1.iter().map(|g| &g.0).collect::<Vec<_>>()
        );
        for ((n, a), (_, b)) in g1.iter().zip(&g2) {
            assert!(max_abs_diff(a, b) < 1e-5, "{n}: {a} vs {b}");
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
