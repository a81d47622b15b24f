//! The serving form of one base and many tasks (`gps-seg serve`): one graph per base whose
//! checkpoint weights are **graph inputs**, not initializers, so the weights live once in the
//! process (buffers the server owns) and every task runs through the same ONNX Runtime session.
//!
//! - [`ServingGraph::from_base`] turns a base file (`export --base-onnx`) into that graph: each
//!   initializer stored in the base's data becomes an input of the same name; a 2-D weight whose
//!   every use is `Transpose(perm = [1, 0])` (a linear layer's `x·Wᵀ`) becomes an input named
//!   `<name>::T` holding the transposed matrix, and those Transpose nodes are dropped, so no
//!   weight is reshuffled at run time. Every other node is the base's, unchanged.
//! - [`TaskParts::from_task`] reads what a task file changes: for each GPS-selected tensor its
//!   flat indices and merged values (the folded `ScatterND` patches of [`super::delta`]), and
//!   each fully trained tensor (stored inline). The task's graph must be the base's graph plus
//!   the patch prologue, node for node (checked), so running the task's weights through the
//!   base's graph is running the task.
//!
//! A task is applied by writing its merged values into the shared buffers at its indices (and
//! the base values back when another task runs), and by handing its fully trained tensors as
//! the inputs of those weights: a GPS-changed weight is never materialised per task. ONNX
//! Runtime packs a weight that is an input at every run instead of once at load (measured on
//! ViT-B@512, 2 threads, Intel Xeon AVX-512: about 5% of a batch-1 run; `gps-seg bench
//! serve-tasks`), the price of sharing.

use super::delta::{META_ROLE, SFX_BASE, SFX_INDICES, SFX_VALUES};
use super::proto::{
    data_location, data_type, AttributeProto, DimValue, Dimension, ModelProto, NodeProto,
    TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// Suffix of the input holding a transposed weight.
pub const SFX_TRANSPOSED: &str = "::T";

/// One weight input of the serving graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightInput {
    /// The graph input's name (`<tensor>` or `<tensor>::T`).
    pub input: String,
    /// The checkpoint tensor's name.
    pub tensor: String,
    /// The tensor's shape as stored in the base (`[out, in]` for a linear weight).
    pub dims: Vec<usize>,
    /// The input holds the transposed matrix (`[in, out]`).
    pub transposed: bool,
    /// Where the base's data holds it.
    pub offset: u64,
    pub length: u64,
}

impl WeightInput {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The input's shape (transposed for `::T`).
    pub fn input_dims(&self) -> Vec<usize> {
        if self.transposed {
            self.dims.iter().rev().copied().collect()
        } else {
            self.dims.clone()
        }
    }

    /// Flat index `i` of the stored tensor (row-major `[out, in]`) in this input's layout.
    pub fn map_index(&self, i: usize) -> usize {
        match (self.transposed, self.dims.as_slice()) {
            (true, [rows, cols]) if *cols > 0 => (i % cols) * rows + i / cols,
            _ => i,
        }
    }

    /// The stored tensor's values (row-major, as in the base) in this input's layout.
    pub fn to_layout(&self, v: Vec<f32>) -> Vec<f32> {
        match (self.transposed, self.dims.as_slice()) {
            (true, [rows, cols]) => {
                let (rows, cols) = (*rows, *cols);
                let mut t = vec![0f32; v.len()];
                for (r, row) in v.chunks_exact(cols.max(1)).enumerate().take(rows) {
                    for (c, &x) in row.iter().enumerate() {
                        if let Some(slot) = t.get_mut(c * rows + r) {
                            *slot = x;
                        }
                    }
                }
                t
            }
            _ => v,
        }
    }
}

/// A base's serving graph and its weight inputs.
#[derive(Debug, Clone)]
pub struct ServingGraph {
    /// The graph, weights as inputs (no external data left).
    pub model: ModelProto,
    /// In the graph's input order after the base's own inputs.
    pub weights: Vec<WeightInput>,
    /// The base's own inputs (e.g. `image`), first in the graph.
    pub data_inputs: Vec<String>,
}

fn ext_field(t: &TensorProto, key: &str) -> Option<String> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.clone())
}

fn is_transpose_10(n: &NodeProto) -> bool {
    n.op_type == "Transpose"
        && n.input.len() == 1
        && n.attribute
            .iter()
            .any(|a: &AttributeProto| a.name == "perm" && a.ints == [1, 0])
}

fn float_input(name: &str, dims: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(DimValue::DimValue(d as i64)),
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    }
}

impl ServingGraph {
    /// The serving graph of the base file `base` (read from `path`; see the module docs).
    pub fn from_base(base: &ModelProto, path: &Path) -> Result<ServingGraph> {
        let bad = |m: String| Error::Onnx(format!("{}: {m}", path.display()));
        let role = base
            .metadata_props
            .iter()
            .find(|e| e.key == META_ROLE)
            .map(|e| e.value.as_str());
        if role != Some("base") {
            return Err(bad(
                "not a gps-seg base file (`export --base-onnx` writes one)".into(),
            ));
        }
        let mut model = base.clone();
        let g = model
            .graph
            .as_mut()
            .ok_or_else(|| bad("model has no graph".into()))?;
        let data_inputs: Vec<String> = g.input.iter().map(|i| i.name.clone()).collect();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (k, n) in g.node.iter().enumerate() {
            for i in &n.input {
                consumers.entry(i.clone()).or_default().push(k);
            }
        }
        let mut weights = Vec::new();
        let mut drop_nodes: BTreeSet<usize> = BTreeSet::new();
        let mut rename: HashMap<String, String> = HashMap::new();
        let mut keep = Vec::new();
        for t in std::mem::take(&mut g.initializer) {
            if t.data_location != data_location::EXTERNAL {
                keep.push(t);
                continue;
            }
            if t.data_type != data_type::FLOAT {
                return Err(bad(format!(
                    "initializer `{}` is not f32 (data type {}); the serving form needs an f32 \
                     base",
                    t.name, t.data_type
                )));
            }
            let num = |k: &str| -> Result<u64> {
                ext_field(&t, k)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad(format!("initializer `{}`: no external `{k}`", t.name)))
            };
            let dims: Vec<usize> = t
                .dims
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad(format!("initializer `{}`: negative dimension", t.name)))?;
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let (offset, length) = (num("offset")?, num("length")?);
            if numel.and_then(|n| n.checked_mul(4)) != Some(length as usize) {
                return Err(bad(format!(
                    "initializer `{}`: {length} bytes for shape {dims:?}",
                    t.name
                )));
            }
            let uses = consumers.get(&t.name).cloned().unwrap_or_default();
            let transposed = dims.len() == 2
                && !uses.is_empty()
                && uses
                    .iter()
                    .all(|&k| g.node.get(k).is_some_and(is_transpose_10));
            let input = if transposed {
                let name = format!("{}{SFX_TRANSPOSED}", t.name);
                for &k in &uses {
                    drop_nodes.insert(k);
                    if let Some(out) = g.node.get(k).and_then(|n| n.output.first()) {
                        rename.insert(out.clone(), name.clone());
                    }
                }
                name
            } else {
                t.name.clone()
            };
            weights.push(WeightInput {
                input,
                tensor: t.name.clone(),
                dims,
                transposed,
                offset,
                length,
            });
        }
        g.initializer = keep;
        let nodes = std::mem::take(&mut g.node);
        g.node = nodes
            .into_iter()
            .enumerate()
            .filter(|(k, _)| !drop_nodes.contains(k))
            .map(|(_, mut n)| {
                for i in n.input.iter_mut() {
                    if let Some(r) = rename.get(i) {
                        *i = r.clone();
                    }
                }
                n
            })
            .collect();
        g.value_info.retain(|v| !rename.contains_key(&v.name));
        for w in &weights {
            g.input.push(float_input(&w.input, &w.input_dims()));
        }
        if weights.is_empty() {
            return Err(bad("no weight lies in the base's data".into()));
        }
        Ok(ServingGraph {
            model,
            weights,
            data_inputs,
        })
    }
}

/// A GPS-selected tensor's patch: flat indices into the stored tensor and the merged values.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsePatch {
    pub indices: Vec<u64>,
    pub values: Vec<f32>,
}

/// What a task file changes on its base.
#[derive(Debug, Clone, Default)]
pub struct TaskParts {
    /// GPS-selected tensors: tensor name → patch.
    pub sparse: BTreeMap<String, SparsePatch>,
    /// Fully trained tensors stored inline: tensor name → (dims, values).
    pub full: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TaskParts {
    /// Bytes the parts hold in memory.
    pub fn bytes(&self) -> usize {
        let s: usize = self
            .sparse
            .values()
            .map(|p| p.indices.len() * 8 + p.values.len() * 4)
            .sum();
        let f: usize = self.full.values().map(|(_, v)| v.len() * 4).sum();
        s + f
    }

    /// Read the parts of the task file `task` (read from `path`) on the base graph `base`: the
    /// task's nodes must be the base's plus the patch prologue.
    pub fn from_task(task: &ModelProto, path: &Path, base: &ModelProto) -> Result<TaskParts> {
        let bad = |m: String| Error::Onnx(format!("{}: {m}", path.display()));
        let tg = task
            .graph
            .as_ref()
            .ok_or_else(|| bad("model has no graph".into()))?;
        let bg = base
            .graph
            .as_ref()
            .ok_or_else(|| bad("its base has no graph".into()))?;
        let own: Vec<&NodeProto> = tg
            .node
            .iter()
            .filter(|n| !n.name.starts_with("gps_delta/"))
            .collect();
        if own.len() != bg.node.len() || own.iter().zip(&bg.node).any(|(a, b)| *a != b) {
            return Err(bad(
                "its graph is not its base's graph plus the GPS patches (exported from another \
                 graph?); export it again on this base"
                    .into(),
            ));
        }
        let base_inits: HashMap<&str, &TensorProto> = bg
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let inits: HashMap<&str, &TensorProto> = tg
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let f32s = |t: &TensorProto| -> Result<Vec<f32>> {
            if t.data_type != data_type::FLOAT || !t.raw_data.len().is_multiple_of(4) {
                return Err(bad(format!("tensor `{}` is not inline f32 data", t.name)));
            }
            Ok(t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut parts = TaskParts::default();
        for t in &tg.initializer {
            if let Some(name) = t.name.strip_suffix(SFX_BASE) {
                let get = |sfx: &str| {
                    inits
                        .get(format!("{name}{sfx}").as_str())
                        .copied()
                        .ok_or_else(|| bad(format!("`{name}`: no `{name}{sfx}`")))
                };
                let (it, vt) = (get(SFX_INDICES)?, get(SFX_VALUES)?);
                if it.data_type != data_type::INT64 || !it.raw_data.len().is_multiple_of(8) {
                    return Err(bad(format!("`{}` is not inline int64 data", it.name)));
                }
                let indices: Vec<u64> = it
                    .raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .map(|i| u64::try_from(i).map_err(|_| bad(format!("`{}`: index {i}", it.name))))
                    .collect::<Result<_>>()?;
                let values = f32s(vt)?;
                if values.len() != indices.len() {
                    return Err(bad(format!(
                        "`{name}`: {} indices but {} values",
                        indices.len(),
                        values.len()
                    )));
                }
                let numel = base_inits
                    .get(name)
                    .map(|b| b.dims.iter().product::<i64>())
                    .ok_or_else(|| bad(format!("`{name}` is not a tensor of its base")))?;
                if let Some(i) = indices.iter().find(|&&i| i >= numel as u64) {
                    return Err(bad(format!(
                        "`{name}`: index {i} outside the tensor ({numel} entries)"
                    )));
                }
                parts
                    .sparse
                    .insert(name.to_string(), SparsePatch { indices, values });
            } else if let Some(b) = base_inits.get(t.name.as_str()) {
                if t.data_location == data_location::EXTERNAL {
                    if t != *b {
                        return Err(bad(format!(
                            "`{}` references other bytes of the base's data than the base does",
                            t.name
                        )));
                    }
                    continue;
                }
                if b.data_location != data_location::EXTERNAL {
                    continue; // a graph constant, the same in every export
                }
                if t.dims != b.dims {
                    return Err(bad(format!(
                        "`{}` has shape {:?}, its base {:?}",
                        t.name, t.dims, b.dims
                    )));
                }
                let dims = t.dims.iter().map(|&d| d.max(0) as usize).collect();
                parts.full.insert(t.name.clone(), (dims, f32s(t)?));
            }
        }
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_layout_maps_indices_and_values() {
        let w = WeightInput {
            input: "w::T".into(),
            tensor: "w".into(),
            dims: vec![2, 3],
            transposed: true,
            offset: 0,
            length: 24,
        };
        let v: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t = w.to_layout(v.clone());
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5.]);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(t[w.map_index(i)], *x);
        }
        assert_eq!(w.input_dims(), vec![3, 2]);
    }
}
