//! Parameter selection: for every tensor a [`Policy`] marks `Selected`, viewed as
//! `[out, rest]` (conv kernels `[out, in, kh, kw]` flattened to `[out, in·kh·kw]`), keep the
//! top-K entries of each output row ("neuron") by |score| — GPS's rule (Zhang et al.,
//! CVPR 2024, §3). Scores come from a [`Criterion`]: accumulated gradient (the paper),
//! weight magnitude, or seeded random. For the paper's ablation the same budget
//! (Σ rows·min(K, cols)) can be spent per tensor ([`Level::Layer`]) or over all selected
//! tensors pooled ([`Level::Net`]).
//!
//! Ordering is total and deterministic: higher score first, ties broken by the lower flat
//! index (within a row: the lower column), and at net level by tensor name order.

use super::policy::{Policy, Treatment};
use crate::error::{Error, Result};
use crate::nn::Role;
use crate::util::tensors::TensorMap;
use crate::util::Rng;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

/// What ranks the entries of a selected tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// |accumulated gradient of the selection loss| (GPS).
    #[value(alias = "grad")]
    Gradient,
    /// |pretrained weight|.
    Magnitude,
    /// Uniform random scores from the seed and the tensor name.
    Random,
}

/// Where the top-K budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// K per output row (GPS).
    Neuron,
    /// The same fraction of every selected tensor (top-% per tensor, anywhere in it), the
    /// fraction set so the total equals the neuron-level budget.
    Layer,
    /// Σ rows·min(K, cols) over all selected tensors pooled.
    Net,
}

impl FromStr for Criterion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gradient" | "grad" => Ok(Criterion::Gradient),
            "magnitude" => Ok(Criterion::Magnitude),
            "random" => Ok(Criterion::Random),
            o => Err(Error::Config {
                field: "criterion".into(),
                msg: format!("unknown criterion `{o}` (expected gradient, magnitude or random)"),
            }),
        }
    }
}

impl FromStr for Level {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "neuron" => Ok(Level::Neuron),
            "layer" => Ok(Level::Layer),
            "net" => Ok(Level::Net),
            o => Err(Error::Config {
                field: "level".into(),
                msg: format!("unknown level `{o}` (expected neuron, layer or net)"),
            }),
        }
    }
}

/// `[rows, cols]` view of a shape: rows = first dim, cols = product of the rest.
pub fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_first() {
        Some((&r, rest)) => (r, rest.iter().product()),
        None => (1, 1),
    }
}

/// Neuron-level budget of one tensor: rows·min(K, cols).
pub fn budget(shape: &[usize], k: usize) -> usize {
    let (r, c) = rows_cols(shape);
    r * k.min(c)
}

/// The result of selection: what trains, and where.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    /// Per selected tensor: sorted, unique flat (row-major) indices.
    pub indices: BTreeMap<String, Vec<u32>>,
    /// Tensors that train fully.
    pub trainable: Vec<String>,
    /// Shapes of every selected and trainable tensor (for validation and counts).
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl Selection {
    /// Roles for [`crate::nn::ParamStore::with_roles`]: `Sparse` for selected tensors,
    /// `Trainable` for fully trainable ones; absent names are frozen.
    pub fn roles(&self) -> HashMap<String, Role> {
        let mut m: HashMap<String, Role> = self
            .indices
            .iter()
            .map(|(n, i)| (n.clone(), Role::Sparse(i.clone())))
            .collect();
        for n in &self.trainable {
            m.insert(n.clone(), Role::Trainable);
        }
        m
    }

    /// Number of selected entries (sparse) and of fully trainable entries.
    pub fn sizes(&self) -> (usize, usize) {
        let sel = self.indices.values().map(Vec::len).sum();
        let tr = self
            .trainable
            .iter()
            .filter_map(|n| self.shapes.get(n))
            .map(|s| s.iter().product::<usize>())
            .sum();
        (sel, tr)
    }

    /// Check internal consistency: indices sorted, unique and inside their tensor; every
    /// named tensor has a shape. Errors name the tensor.
    pub fn validate(&self) -> Result<()> {
        for (name, idx) in &self.indices {
            let shape = self.shapes.get(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "selected tensor has no recorded shape".into(),
            })?;
            let numel: usize = shape.iter().product();
            if let Some(w) = idx.windows(2).find(|w| w[0] >= w[1]) {
                return Err(Error::Tensor {
                    name: name.clone(),
                    msg: format!(
                        "selected indices are not sorted and unique ({} then {})",
                        w[0], w[1]
                    ),
                });
            }
            if let Some(&last) = idx.last() {
                if last as usize >= numel {
                    return Err(Error::Tensor {
                        name: name.clone(),
                        msg: format!(
                            "selected index {last} is outside the tensor ({numel} entries, shape {shape:?})"
                        ),
                    });
                }
            }
        }
        for name in &self.trainable {
            if !self.shapes.contains_key(name) {
                return Err(Error::Tensor {
                    name: name.clone(),
                    msg: "trainable tensor has no recorded shape".into(),
                });
            }
            if self.indices.contains_key(name) {
                return Err(Error::Tensor {
                    name: name.clone(),
                    msg: "listed both as selected and as fully trainable".into(),
                });
            }
        }
        Ok(())
    }
}

/// Top-`k` flat indices of each row of `scores` viewed as `[rows, cols]`, sorted ascending.
/// Order: higher score first, ties → lower column. `k ≥ cols` keeps whole rows.
/// Scores must be finite (callers check).
pub fn topk_per_row(scores: &[f32], cols: usize, k: usize) -> Vec<u32> {
    if cols == 0 || k == 0 {
        return Vec::new();
    }
    let k = k.min(cols);
    let per_row: Vec<Vec<u32>> = scores
        .par_chunks(cols)
        .enumerate()
        .map_init(
            || Vec::with_capacity(cols),
            |cand: &mut Vec<u32>, (r, row)| {
                let base = (r * cols) as u32;
                if k == cols {
                    return (0..cols as u32).map(|c| base + c).collect();
                }
                cand.clear();
                cand.extend(0..cols as u32);
                let cmp =
                    |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
                cand.select_nth_unstable_by(k - 1, cmp);
                let mut top: Vec<u32> = cand[..k].iter().map(|c| base + c).collect();
                top.sort_unstable();
                top
            },
        )
        .collect();
    per_row.concat()
}

/// Top-`n` flat indices over a whole score vector, sorted ascending (ties → lower index).
pub fn topn(scores: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(scores.len());
    if n == 0 {
        return Vec::new();
    }
    let mut cand: Vec<u32> = (0..scores.len() as u32).collect();
    if n < cand.len() {
        cand.select_nth_unstable_by(n - 1, |a, b| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        });
        cand.truncate(n);
    }
    cand.sort_unstable();
    cand
}

/// Scores of one tensor for `criterion`, as |value| f32 (random: uniform [0, 1)).
fn scores_for(
    name: &str,
    weight: &Tensor,
    grads: Option<&TensorMap>,
    criterion: Criterion,
    seed: u64,
) -> Result<Vec<f32>> {
    let n = weight.elem_count();
    let v = match criterion {
        Criterion::Random => {
            let mut rng = Rng::derive(seed, &format!("gps-select:{name}"));
            return Ok((0..n).map(|_| rng.f32()).collect());
        }
        Criterion::Magnitude => weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        Criterion::Gradient => {
            let g = grads
                .and_then(|g| g.get(name))
                .ok_or_else(|| Error::Tensor {
                    name: name.to_string(),
                    msg:
                        "no accumulated gradient for this selected tensor (did the loss reach it?)"
                            .into(),
                })?;
            if g.dims() != weight.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    found: g.dims().to_vec(),
                    expected: weight.dims().to_vec(),
                });
            }
            g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
        }
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!(
            "{criterion:?} score of `{name}` at flat index {i} is {}",
            v[i]
        )));
    }
    Ok(v.into_iter().map(f32::abs).collect())
}

/// How to select, as one value: the policy, K, the level the budget is spent at, the
/// criterion and (for [`Criterion::Random`]) the seed.
#[derive(Debug, Clone, Copy)]
pub struct SelectSpec<'a> {
    pub policy: &'a Policy,
    pub k: usize,
    pub level: Level,
    pub criterion: Criterion,
    pub seed: u64,
}

/// [`select`] with positional arguments (kept for existing callers; new code passes a
/// [`SelectSpec`]).
pub fn select_from_grads(
    base: &TensorMap,
    grads: Option<&TensorMap>,
    policy: &Policy,
    k: usize,
    level: Level,
    criterion: Criterion,
    seed: u64,
) -> Result<Selection> {
    let spec = SelectSpec {
        policy,
        k,
        level,
        criterion,
        seed,
    };
    select(base, grads, &spec)
}

/// GPS selection over the named tensors of `base`.
///
/// Every tensor is classified by `spec.policy`; `Selected` ones get their top-`k` entries per
/// row (or the same budget at `level`), `Trainable` ones are listed whole. `grads` is needed
/// only for [`Criterion::Gradient`] (accumulated gradients keyed by tensor name, see
/// [`super::grads`]); the seed only for [`Criterion::Random`].
pub fn select(base: &TensorMap, grads: Option<&TensorMap>, spec: &SelectSpec) -> Result<Selection> {
    let SelectSpec {
        policy,
        k,
        level,
        criterion,
        seed,
    } = *spec;
    if k == 0 {
        return Err(Error::Config {
            field: "k".into(),
            msg: "K must be at least 1".into(),
        });
    }
    let mut sel = Selection::default();
    let mut chosen: Vec<(&String, &Tensor)> = Vec::new();
    for (name, t) in base {
        match policy.treatment(name, t.dims()) {
            Treatment::Selected => chosen.push((name, t)),
            Treatment::Trainable => sel.trainable.push(name.clone()),
            Treatment::Frozen => continue,
        }
        sel.shapes.insert(name.clone(), t.dims().to_vec());
    }
    match level {
        Level::Neuron => {
            for (name, t) in chosen {
                let s = scores_for(name, t, grads, criterion, seed)?;
                let (_, cols) = rows_cols(t.dims());
                sel.indices.insert(name.clone(), topk_per_row(&s, cols, k));
            }
        }
        Level::Layer => {
            let total: usize = chosen.iter().map(|(_, t)| budget(t.dims(), k)).sum();
            let sizes: Vec<usize> = chosen.iter().map(|(_, t)| t.elem_count()).collect();
            for ((name, t), quota) in chosen.into_iter().zip(apportion(&sizes, total)) {
                let s = scores_for(name, t, grads, criterion, seed)?;
                sel.indices.insert(name.clone(), topn(&s, quota));
            }
        }
        Level::Net => {
            let mut all: Vec<Vec<f32>> = Vec::with_capacity(chosen.len());
            let mut total = 0usize;
            for (name, t) in &chosen {
                all.push(scores_for(name, t, grads, criterion, seed)?);
                total += budget(t.dims(), k);
            }
            for ((name, _), idx) in chosen.iter().zip(net_topn(&all, total)) {
                sel.indices.insert((*name).clone(), idx);
            }
        }
    }
    Ok(sel)
}

/// The whole GPS selection in one call, for any model: build the model from a store over
/// `base` in which only the policy's `Selected` tensors are vars ([`super::grads::grad_roles`]),
/// accumulate the gradients of `loss(model, batch)` over `batches` with the pretrained weights,
/// and select the top-`k` |gradient| entries per row at `level`.
/// Returns the selection and the number of batches seen.
#[allow(clippy::too_many_arguments)]
pub fn select_by_gradient<M, B>(
    base: &TensorMap,
    policy: &Policy,
    device: &Device,
    build: impl FnOnce(&crate::nn::ParamStore) -> Result<M>,
    batches: impl IntoIterator<Item = B>,
    mut loss: impl FnMut(&M, B) -> Result<Tensor>,
    k: usize,
    level: Level,
) -> Result<(Selection, usize)> {
    let roles = super::grads::grad_roles(base, policy);
    let store = crate::nn::ParamStore::with_roles(base.clone(), roles, device);
    let model = build(&store)?;
    let vars = store.trainable_vars();
    let (grads, n) = super::grads::accumulate(&vars, batches, |b| loss(&model, b))?;
    let sel = select_from_grads(base, Some(&grads), policy, k, level, Criterion::Gradient, 0)?;
    Ok((sel, n))
}

/// Split `total` over tensors of `sizes` entries in proportion to their size (the same
/// fraction of every tensor), by largest remainder: the quotas sum to exactly `total`;
/// remainder ties go to the earlier tensor.
pub fn apportion(sizes: &[usize], total: usize) -> Vec<usize> {
    let n: u128 = sizes.iter().map(|&s| s as u128).sum();
    if n == 0 {
        return vec![0; sizes.len()];
    }
    let total = (total as u128).min(n);
    let mut quota: Vec<usize> = Vec::with_capacity(sizes.len());
    let mut rems: Vec<(u128, usize)> = Vec::with_capacity(sizes.len());
    for (i, &s) in sizes.iter().enumerate() {
        let num = total * s as u128;
        quota.push((num / n) as usize);
        rems.push((num % n, i));
    }
    let left = total as usize - quota.iter().sum::<usize>();
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rems.iter().take(left) {
        quota[i] += 1;
    }
    quota
}

/// Pooled top-`n` over several score vectors: per vector, its sorted chosen indices.
/// Threshold = the n-th largest score; everything above it is taken, then entries equal to
/// it in (vector, index) order until the budget is filled.
fn net_topn(all: &[Vec<f32>], n: usize) -> Vec<Vec<u32>> {
    let len: usize = all.iter().map(Vec::len).sum();
    if n == 0 || len == 0 {
        return vec![Vec::new(); all.len()];
    }
    let n = n.min(len);
    let mut pool: Vec<f32> = Vec::with_capacity(len);
    for v in all {
        pool.extend_from_slice(v);
    }
    let (_, thr, _) = pool.select_nth_unstable_by(n - 1, |a, b| b.total_cmp(a));
    let thr = *thr;
    drop(pool);
    let above: usize = all
        .par_iter()
        .map(|v| v.iter().filter(|&&x| x > thr).count())
        .sum();
    let mut ties_left = n - above;
    all.iter()
        .map(|v| {
            let mut out = Vec::new();
            for (i, &x) in v.iter().enumerate() {
                if x > thr {
                    out.push(i as u32);
                } else if x == thr && ties_left > 0 {
                    out.push(i as u32);
                    ties_left -= 1;
                }
            }
            out
        })
        .collect()
}

/// Selected indices as u32 tensors keyed by tensor name (for `selection.safetensors`).
pub fn indices_to_tensors(sel: &Selection) -> Result<TensorMap> {
    sel.indices
        .iter()
        .map(|(n, i)| {
            Ok((
                n.clone(),
                Tensor::from_vec(i.clone(), i.len(), &Device::Cpu)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: sort every row's columns by (score desc, col asc), take k.
    fn brute(scores: &[f32], cols: usize, k: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for (r, row) in scores.chunks(cols).enumerate() {
            let mut c: Vec<usize> = (0..cols).collect();
            c.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            let mut t: Vec<u32> = c[..k.min(cols)]
                .iter()
                .map(|&c| (r * cols + c) as u32)
                .collect();
            t.sort();
            out.extend(t);
        }
        out
    }

    #[test]
    fn topk_per_row_matches_brute_force_with_ties() {
        let mut rng = Rng::new(5);
        for &(rows, cols) in &[(7usize, 13usize), (1, 1), (3, 2), (16, 40)] {
            // Quantised scores → many ties.
            let s: Vec<f32> = (0..rows * cols).map(|_| rng.below(4) as f32).collect();
            for k in [1, 2, 3, cols, cols + 5] {
                assert_eq!(
                    topk_per_row(&s, cols, k),
                    brute(&s, cols, k),
                    "{rows}x{cols} k={k}"
                );
            }
        }
        // Explicit tie: equal scores → lower column wins.
        assert_eq!(topk_per_row(&[1., 5., 5., 5.], 4, 2), vec![1, 2]);
    }

    #[test]
    fn apportion_is_proportional_and_exact() {
        assert_eq!(apportion(&[10, 30, 60], 10), vec![1, 3, 6]);
        assert_eq!(apportion(&[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(apportion(&[5, 0], 9), vec![5, 0]);
        assert_eq!(apportion(&[], 3), Vec::<usize>::new());
        let q = apportion(&[7, 13, 101, 3], 37);
        assert_eq!(q.iter().sum::<usize>(), 37);
    }

    #[test]
    fn topn_and_net_pool_break_ties_by_position() {
        assert_eq!(topn(&[1., 3., 3., 2.], 2), vec![1, 2]);
        assert_eq!(topn(&[1., 3., 3., 2.], 9), vec![0, 1, 2, 3]);
        let a = vec![1f32, 2., 2.];
        let b = vec![2f32, 0.5];
        assert_eq!(
            net_topn(&[a.clone(), b.clone()], 2),
            vec![vec![1, 2], vec![]]
        );
        assert_eq!(net_topn(&[a, b], 4), vec![vec![0, 1, 2], vec![0]]);
    }

    #[test]
    fn selection_rejects_bad_k_and_non_finite_scores() {
        let dev = Device::Cpu;
        let mut base = TensorMap::new();
        base.insert("w".into(), Tensor::new(&[[1f32, f32::NAN]], &dev).unwrap());
        let p = Policy {
            name: "t".into(),
            rules: vec![super::super::policy::Rule::new("*", Treatment::Selected)],
            default: Treatment::Frozen,
        };
        let e = select_from_grads(&base, None, &p, 0, Level::Neuron, Criterion::Magnitude, 0);
        assert!(e.unwrap_err().to_string().contains("`k`"));
        let e = select_from_grads(&base, None, &p, 1, Level::Neuron, Criterion::Magnitude, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`") && e.contains("NaN"), "{e}");
        let e = select_from_grads(&base, None, &p, 1, Level::Neuron, Criterion::Gradient, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`") && e.contains("gradient"), "{e}");
    }
}
