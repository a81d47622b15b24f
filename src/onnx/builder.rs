//! `GraphBuilder`: writes an ONNX graph node by node (after tract's model builder).
//!
//! It owns every name: node names are `<scope>/<Op>_<n>`, tensor names are unique, and a
//! duplicate name or an input that no earlier node, graph input or initializer defines fails
//! loudly, naming the node. Constants are de-duplicated by content; parameters keep their
//! checkpoint names (so the exported initializers can be counted against the checkpoint).
//! Target: opset 17 / IR 8 (ReduceMean's `axes` is still an attribute there).
//! `write_model` writes the `.onnx` (and `<model>.onnx.data` for external tensors) atomically.

use super::proto::*;
use crate::error::{Error, Result};
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Default opset and IR version written by gps-seg.
pub const OPSET: i64 = 17;
/// IR version matching opset 17.
pub const IR_VERSION: i64 = 8;

/// A named tensor inside the graph under construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Value(String);

impl Value {
    /// The tensor name.
    pub fn name(&self) -> &str {
        &self.0
    }
    /// The empty name ONNX uses for an omitted optional input.
    pub fn none() -> Value {
        Value(String::new())
    }
}

/// One dimension of a graph input/output: fixed or symbolic (e.g. `"batch"`).
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(i64),
    Sym(String),
}

impl Dim {
    /// A symbolic dimension.
    pub fn sym(s: &str) -> Dim {
        Dim::Sym(s.to_string())
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::Fixed(v as i64)
    }
}

/// Attribute constructors (every attribute gets its `type`).
pub mod attr {
    use super::super::proto::{attribute_type as t, AttributeProto, TensorProto};
    /// An `INT` attribute.
    pub fn int(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            i,
            r#type: t::INT,
            ..Default::default()
        }
    }
    /// An `INTS` attribute.
    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints: v.to_vec(),
            r#type: t::INTS,
            ..Default::default()
        }
    }
    /// A `FLOAT` attribute.
    pub fn float(name: &str, f: f32) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            f,
            r#type: t::FLOAT,
            ..Default::default()
        }
    }
    /// A `FLOATS` attribute.
    pub fn floats(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            floats: v.to_vec(),
            r#type: t::FLOATS,
            ..Default::default()
        }
    }
    /// A `STRING` attribute.
    pub fn string(name: &str, s: &str) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            s: s.as_bytes().to_vec(),
            r#type: t::STRING,
            ..Default::default()
        }
    }
    /// A `TENSOR` attribute.
    pub fn tensor(name: &str, tp: TensorProto) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            t: Some(tp),
            r#type: t::TENSOR,
            ..Default::default()
        }
    }
}

fn tensor_type(elem: i32, dims: &[Dim]) -> TypeProto {
    TypeProto {
        tensor_type: Some(TypeProtoTensor {
            elem_type: elem,
            shape: Some(TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| Dimension {
                        value: Some(match d {
                            Dim::Fixed(v) => DimValue::DimValue(*v),
                            Dim::Sym(s) => DimValue::DimParam(s.clone()),
                        }),
                    })
                    .collect(),
            }),
        }),
    }
}

fn elem_size(dt: i32) -> usize {
    match dt {
        data_type::FLOAT | data_type::INT32 => 4,
        data_type::INT64 => 8,
        _ => 1,
    }
}

/// Builds one ONNX graph. See the module docs for the naming rules.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph_name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    value_infos: Vec<ValueInfoProto>,
    defined: HashSet<String>,
    node_names: HashSet<String>,
    consts: HashMap<(i32, Vec<i64>, [u8; 32]), String>,
    params: BTreeMap<String, Vec<usize>>,
    counter: usize,
    scope: String,
    doc: String,
    metadata: Vec<(String, String)>,
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph_name: name.into(),
            ..Default::default()
        }
    }

    /// Prefix for the names of nodes added from now on (e.g. `image_encoder.blocks.3.attn`).
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    /// The model's doc string.
    pub fn set_doc(&mut self, doc: &str) {
        self.doc = doc.into();
    }

    /// Add a `metadata_props` entry.
    pub fn add_metadata(&mut self, key: &str, value: &str) {
        self.metadata.push((key.into(), value.into()));
    }

    /// Checkpoint-named parameters recorded so far, with their shapes.
    pub fn params(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.params
    }

    /// Total elements of the checkpoint-named parameters.
    pub fn param_count(&self) -> usize {
        self.params
            .values()
            .map(|d| d.iter().product::<usize>())
            .sum()
    }

    /// A handle on an already defined tensor (graph input, initializer or node output).
    pub fn existing(&self, name: &str) -> Result<Value> {
        if self.defined.contains(name) {
            Ok(Value(name.to_string()))
        } else {
            Err(Error::Onnx(format!("tensor `{name}` is not defined")))
        }
    }

    /// Number of nodes so far.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn define(&mut self, name: &str, what: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Onnx(format!("{what}: empty tensor name")));
        }
        if !self.defined.insert(name.to_string()) {
            return Err(Error::Onnx(format!(
                "{what}: tensor name `{name}` is already defined"
            )));
        }
        Ok(())
    }

    fn fresh(&mut self, base: &str) -> String {
        loop {
            self.counter += 1;
            let n = if self.scope.is_empty() {
                format!("{base}_{}", self.counter)
            } else {
                format!("{}/{base}_{}", self.scope, self.counter)
            };
            if !self.defined.contains(&n) && !self.node_names.contains(&n) {
                return n;
            }
        }
    }

    /// Declare a graph input.
    pub fn input(&mut self, name: &str, elem: i32, dims: &[Dim]) -> Result<Value> {
        self.define(name, &format!("graph input `{name}`"))?;
        self.inputs.push(ValueInfoProto {
            name: name.into(),
            r#type: Some(tensor_type(elem, dims)),
            doc_string: String::new(),
        });
        Ok(Value(name.into()))
    }

    /// Declare `v` as the graph output `name` (an Identity node renames it when needed).
    pub fn output(&mut self, v: &Value, name: &str, elem: i32, dims: &[Dim]) -> Result<()> {
        let v = if v.0 == name {
            v.clone()
        } else {
            self.node_named("Identity", &[v], vec![], &[name])?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Onnx(format!("output `{name}`: no value")))?
        };
        self.outputs.push(ValueInfoProto {
            name: v.0,
            r#type: Some(tensor_type(elem, dims)),
            doc_string: String::new(),
        });
        Ok(())
    }

    /// Record the type and shape of an intermediate value.
    pub fn value_info(&mut self, v: &Value, elem: i32, dims: &[Dim]) {
        self.value_infos.push(ValueInfoProto {
            name: v.0.clone(),
            r#type: Some(tensor_type(elem, dims)),
            doc_string: String::new(),
        });
    }

    /// A parameter initializer under its checkpoint name (f32).
    pub fn param_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> Result<Value> {
        let n: usize = dims.iter().product();
        if n != data.len() {
            return Err(Error::Onnx(format!(
                "initializer `{name}`: shape {dims:?} needs {n} values, got {}",
                data.len()
            )));
        }
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let bad = data.iter().filter(|v| !v.is_finite()).count();
            return Err(Error::NonFinite(format!(
                "weight `{name}` has {bad} non-finite value(s) (first: {v} at flat index {i}); \
                 refusing to export a model that would compute NaN/Inf"
            )));
        }
        self.define(name, &format!("initializer `{name}`"))?;
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.into(),
            raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        self.params.insert(name.into(), dims.to_vec());
        Ok(Value(name.into()))
    }

    /// A parameter initializer from a Candle tensor (converted to f32), keeping its name.
    pub fn param(&mut self, name: &str, t: &candle_core::Tensor) -> Result<Value> {
        let dims = t.dims().to_vec();
        let data = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| Error::Tensor {
                name: name.into(),
                msg: e.to_string(),
            })?;
        self.param_f32(name, &dims, &data)
    }

    /// A constant initializer (not a parameter), de-duplicated by type, shape and content.
    pub fn constant(&mut self, dtype: i32, dims: &[i64], raw: Vec<u8>) -> Result<Value> {
        let n: i64 = dims.iter().product();
        if (n as usize) * elem_size(dtype) != raw.len() {
            return Err(Error::Onnx(format!(
                "constant of shape {dims:?}: {} bytes do not match",
                raw.len()
            )));
        }
        let key = (dtype, dims.to_vec(), Sha256::digest(&raw).into());
        if let Some(name) = self.consts.get(&key) {
            return Ok(Value(name.clone()));
        }
        self.counter += 1;
        let name = format!("const_{}", self.counter);
        self.define(&name, "constant")?;
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: dtype,
            name: name.clone(),
            raw_data: raw,
            ..Default::default()
        });
        self.consts.insert(key, name.clone());
        Ok(Value(name))
    }

    /// An f32 constant.
    pub fn const_f32(&mut self, dims: &[i64], data: &[f32]) -> Result<Value> {
        self.constant(
            data_type::FLOAT,
            dims,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    /// An f32 scalar constant (rank 0).
    pub fn scalar_f32(&mut self, x: f32) -> Result<Value> {
        self.const_f32(&[], &[x])
    }

    /// An i64 constant.
    pub fn const_i64(&mut self, dims: &[i64], data: &[i64]) -> Result<Value> {
        self.constant(
            data_type::INT64,
            dims,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    /// A 1-D i64 constant.
    pub fn ints(&mut self, data: &[i64]) -> Result<Value> {
        self.const_i64(&[data.len() as i64], data)
    }

    fn node_named(
        &mut self,
        op: &str,
        inputs: &[&Value],
        attrs: Vec<AttributeProto>,
        outputs: &[&str],
    ) -> Result<Vec<Value>> {
        let name = self.fresh(op);
        for (i, v) in inputs.iter().enumerate() {
            if !v.0.is_empty() && !self.defined.contains(&v.0) {
                return Err(Error::Onnx(format!(
                    "node `{name}` ({op}): input {i} `{}` is not defined by any earlier node, input or initializer",
                    v.0
                )));
            }
        }
        let mut seen = HashSet::new();
        for a in &attrs {
            if a.r#type == 0 {
                return Err(Error::Onnx(format!(
                    "node `{name}` ({op}): attribute `{}` has no type",
                    a.name
                )));
            }
            if !seen.insert(a.name.clone()) {
                return Err(Error::Onnx(format!(
                    "node `{name}` ({op}): attribute `{}` given twice",
                    a.name
                )));
            }
        }
        for o in outputs {
            self.define(o, &format!("node `{name}` ({op}) output"))?;
        }
        self.node_names.insert(name.clone());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.0.clone()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        Ok(outputs.iter().map(|s| Value(s.to_string())).collect())
    }

    /// Add a node with `n_out` fresh outputs.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&Value],
        attrs: Vec<AttributeProto>,
        n_out: usize,
    ) -> Result<Vec<Value>> {
        let names: Vec<String> = (0..n_out).map(|_| self.fresh(op)).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        self.node_named(op, inputs, attrs, &refs)
    }

    /// Add a node with one output.
    pub fn op(&mut self, op: &str, inputs: &[&Value], attrs: Vec<AttributeProto>) -> Result<Value> {
        let mut v = self.node(op, inputs, attrs, 1)?;
        v.pop()
            .ok_or_else(|| Error::Onnx(format!("{op}: no output")))
    }

    // ---- elementwise -------------------------------------------------------------------------

    pub fn add(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.op("Div", &[a, b], vec![])
    }
    /// `a · s` for a scalar constant `s`.
    pub fn mul_scalar(&mut self, a: &Value, s: f32) -> Result<Value> {
        let c = self.scalar_f32(s)?;
        self.mul(a, &c)
    }
    /// `a + s` for a scalar constant `s`.
    pub fn add_scalar(&mut self, a: &Value, s: f32) -> Result<Value> {
        let c = self.scalar_f32(s)?;
        self.add(a, &c)
    }
    pub fn relu(&mut self, x: &Value) -> Result<Value> {
        self.op("Relu", &[x], vec![])
    }
    pub fn erf(&mut self, x: &Value) -> Result<Value> {
        self.op("Erf", &[x], vec![])
    }
    pub fn sin(&mut self, x: &Value) -> Result<Value> {
        self.op("Sin", &[x], vec![])
    }
    pub fn cos(&mut self, x: &Value) -> Result<Value> {
        self.op("Cos", &[x], vec![])
    }
    pub fn sqrt(&mut self, x: &Value) -> Result<Value> {
        self.op("Sqrt", &[x], vec![])
    }
    pub fn identity(&mut self, x: &Value) -> Result<Value> {
        self.op("Identity", &[x], vec![])
    }
    /// Elementwise equality (bool output).
    pub fn equal(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.op("Equal", &[a, b], vec![])
    }
    /// Cast to the `TensorProto.DataType` `to`.
    pub fn cast(&mut self, x: &Value, to: i32) -> Result<Value> {
        self.op("Cast", &[x], vec![attr::int("to", to as i64)])
    }

    /// Exact (erf) GELU in the form ONNX Runtime fuses into one `Gelu`:
    /// `x · 0.5 · (1 + Erf(x / 1.4142135))` — PyTorch's `nn.GELU()` default.
    pub fn gelu_erf(&mut self, x: &Value) -> Result<Value> {
        let s2 = self.scalar_f32(std::f32::consts::SQRT_2)?;
        let d = self.div(x, &s2)?;
        let e = self.erf(&d)?;
        let one = self.scalar_f32(1.0)?;
        let a = self.add(&e, &one)?;
        let m = self.mul(x, &a)?;
        self.mul_scalar(&m, 0.5)
    }

    // ---- linear algebra, conv, norms ------------------------------------------------------------

    pub fn matmul(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.op("MatMul", &[a, b], vec![])
    }

    /// `nn.Linear`: `x·Wᵀ + b` with `W: [out, in]` as stored in the checkpoint (the Transpose of
    /// the initializer is constant-folded by ONNX Runtime).
    pub fn linear(&mut self, x: &Value, w: &Value, b: Option<&Value>) -> Result<Value> {
        let wt = self.transpose(w, &[1, 0])?;
        let y = self.matmul(x, &wt)?;
        match b {
            Some(b) => self.add(&y, b),
            None => Ok(y),
        }
    }

    /// 2-D convolution, NCHW, square stride/padding.
    pub fn conv(
        &mut self,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
        stride: i64,
        pad: i64,
        group: i64,
    ) -> Result<Value> {
        let attrs = vec![
            attr::ints("strides", &[stride, stride]),
            attr::ints("pads", &[pad, pad, pad, pad]),
            attr::ints("dilations", &[1, 1]),
            attr::int("group", group),
        ];
        match b {
            Some(b) => self.op("Conv", &[x, w, b], attrs),
            None => self.op("Conv", &[x, w], attrs),
        }
    }

    /// 2-D transposed convolution, NCHW, no padding (`nn.ConvTranspose2d(k, stride)`).
    pub fn conv_transpose(
        &mut self,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
        stride: i64,
    ) -> Result<Value> {
        let attrs = vec![attr::ints("strides", &[stride, stride])];
        match b {
            Some(b) => self.op("ConvTranspose", &[x, w, b], attrs),
            None => self.op("ConvTranspose", &[x, w], attrs),
        }
    }

    /// `LayerNormalization` over the last axis.
    pub fn layer_norm(
        &mut self,
        x: &Value,
        scale: &Value,
        bias: &Value,
        eps: f32,
    ) -> Result<Value> {
        self.op(
            "LayerNormalization",
            &[x, scale, bias],
            vec![attr::int("axis", -1), attr::float("epsilon", eps)],
        )
    }

    /// SAM's `LayerNorm2d` on NCHW as Transpose → LayerNormalization → Transpose.
    pub fn layer_norm_2d(
        &mut self,
        x: &Value,
        scale: &Value,
        bias: &Value,
        eps: f32,
    ) -> Result<Value> {
        let t = self.transpose(x, &[0, 2, 3, 1])?;
        let n = self.layer_norm(&t, scale, bias, eps)?;
        self.transpose(&n, &[0, 3, 1, 2])
    }

    pub fn softmax(&mut self, x: &Value, axis: i64) -> Result<Value> {
        self.op("Softmax", &[x], vec![attr::int("axis", axis)])
    }

    /// `ReduceMean` in the opset-17 form (`axes` attribute).
    pub fn reduce_mean(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.op(
            "ReduceMean",
            &[x],
            vec![
                attr::ints("axes", axes),
                attr::int("keepdims", keepdims as i64),
            ],
        )
    }

    // ---- shape ops -------------------------------------------------------------------------------

    /// Reshape to `shape` (0 copies a dim, -1 infers one).
    pub fn reshape(&mut self, x: &Value, shape: &[i64]) -> Result<Value> {
        let s = self.ints(shape)?;
        self.op("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Result<Value> {
        self.op("Transpose", &[x], vec![attr::ints("perm", perm)])
    }

    /// `x[starts:ends]` along `axes` (step 1).
    pub fn slice(
        &mut self,
        x: &Value,
        starts: &[i64],
        ends: &[i64],
        axes: &[i64],
    ) -> Result<Value> {
        let s = self.ints(starts)?;
        let e = self.ints(ends)?;
        let a = self.ints(axes)?;
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }

    /// Zero padding; `pads` = `[begin_0, …, begin_n, end_0, …, end_n]`.
    pub fn pad(&mut self, x: &Value, pads: &[i64]) -> Result<Value> {
        let p = self.ints(pads)?;
        self.op("Pad", &[x, &p], vec![attr::string("mode", "constant")])
    }

    pub fn concat(&mut self, xs: &[&Value], axis: i64) -> Result<Value> {
        self.op("Concat", xs, vec![attr::int("axis", axis)])
    }

    pub fn gather(&mut self, x: &Value, indices: &Value, axis: i64) -> Result<Value> {
        self.op("Gather", &[x, indices], vec![attr::int("axis", axis)])
    }

    /// `x.select(axis, i)`: Gather with a scalar index (drops the axis).
    pub fn select(&mut self, x: &Value, axis: i64, i: i64) -> Result<Value> {
        let idx = self.const_i64(&[], &[i])?;
        self.gather(x, &idx, axis)
    }

    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Result<Value> {
        let a = self.ints(axes)?;
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    pub fn squeeze(&mut self, x: &Value, axes: &[i64]) -> Result<Value> {
        let a = self.ints(axes)?;
        self.op("Squeeze", &[x, &a], vec![])
    }

    pub fn shape(&mut self, x: &Value) -> Result<Value> {
        self.op("Shape", &[x], vec![])
    }

    pub fn expand(&mut self, x: &Value, shape: &Value) -> Result<Value> {
        self.op("Expand", &[x, shape], vec![])
    }

    /// Bilinear `Resize` with `half_pixel` coordinates (= PyTorch `align_corners=False`,
    /// no antialias) by constant `scales` per axis.
    pub fn resize_linear(&mut self, x: &Value, scales: &[f32]) -> Result<Value> {
        let s = self.const_f32(&[scales.len() as i64], scales)?;
        let roi = Value::none();
        self.op(
            "Resize",
            &[x, &roi, &s],
            vec![
                attr::string("mode", "linear"),
                attr::string("coordinate_transformation_mode", "half_pixel"),
            ],
        )
    }

    /// Finish the graph as a model (default: [`OPSET`], [`IR_VERSION`]).
    pub fn finish(self, opset: i64, ir_version: i64) -> Result<ModelProto> {
        if self.outputs.is_empty() {
            return Err(Error::Onnx(format!(
                "graph `{}` has no outputs",
                self.graph_name
            )));
        }
        Ok(ModelProto {
            ir_version,
            producer_name: "gps-seg".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 1,
            doc_string: self.doc,
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.graph_name,
                initializer: self.initializers,
                doc_string: String::new(),
                input: self.inputs,
                output: self.outputs,
                value_info: self.value_infos,
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            metadata_props: self
                .metadata
                .into_iter()
                .map(|(key, value)| StringStringEntryProto { key, value })
                .collect(),
        })
    }
}

/// When initializers go to a `<model>.onnx.data` file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExternalData {
    /// Only when the model would exceed protobuf's 2 GiB limit (then every tensor ≥ 1 KiB).
    Auto,
    /// Every initializer of at least `threshold_bytes` bytes.
    Always { threshold_bytes: usize },
    /// Never (fails for models over 2 GiB).
    Never,
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub model_path: PathBuf,
    pub model_bytes: u64,
    /// The external data file, when one was written.
    pub data_path: Option<PathBuf>,
    pub data_bytes: u64,
    pub external_tensors: usize,
}

/// Protobuf's hard limit on one message.
const PROTO_LIMIT: usize = (1usize << 31) - 1;
/// Offsets inside the data file are aligned so ONNX Runtime can memory-map it.
const DATA_ALIGN: usize = 4096;

/// Write `model` to `path` atomically, moving initializers to `<path>.data` when it would
/// exceed 2 GiB ([`ExternalData::Auto`]).
pub fn write_model(path: &Path, model: ModelProto) -> Result<WriteReport> {
    write_model_with(path, model, ExternalData::Auto)
}

/// Write `model` to `path` atomically with the given external-data policy. Both files are
/// written in full under temp names first; see [`replace_pair`] for how they are put in place.
pub fn write_model_with(path: &Path, model: ModelProto, ext: ExternalData) -> Result<WriteReport> {
    let threshold = match ext {
        ExternalData::Never => None,
        ExternalData::Always { threshold_bytes } => Some(threshold_bytes),
        ExternalData::Auto => (model.encoded_len() >= PROTO_LIMIT).then_some(1024),
    };
    match threshold {
        None => write_model_external(path, model, |_| false),
        Some(th) => write_model_external(path, model, |t| t.raw_data.len() >= th),
    }
}

/// Write `model` to `path` atomically, moving every initializer with inline data for which
/// `external` says so to `<path>.data` (4 KiB-aligned offsets). Initializers that already
/// reference external data are kept as they are (a task file pointing into a base's data).
pub fn write_model_external(
    path: &Path,
    mut model: ModelProto,
    external: impl Fn(&TensorProto) -> bool,
) -> Result<WriteReport> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Onnx(format!("{}: not a file path", path.display())))?;
    let data_name = format!("{file_name}.data");
    let data_path = path.with_file_name(&data_name);
    // A model and its data are one write: one gps-seg process at a time in the folder.
    let _lock = crate::util::fs::locked(crate::util::fs::parent_of(path))?;
    crate::util::fs::guard_write(path)?;
    refuse_replacing_base(path)?;
    let mut blobs: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut record = Vec::new();
    let mut offset = 0usize;
    {
        if let Some(g) = model.graph.as_mut() {
            for t in g.initializer.iter_mut() {
                if !t.raw_data.is_empty() && external(t) {
                    let data = std::mem::take(&mut t.raw_data);
                    let len = data.len();
                    t.data_location = data_location::EXTERNAL;
                    t.external_data = vec![
                        StringStringEntryProto {
                            key: "location".into(),
                            value: data_name.clone(),
                        },
                        StringStringEntryProto {
                            key: "offset".into(),
                            value: offset.to_string(),
                        },
                        StringStringEntryProto {
                            key: "length".into(),
                            value: len.to_string(),
                        },
                    ];
                    record.push(super::integrity::ExternalTensor {
                        name: t.name.clone(),
                        offset: offset as u64,
                        length: len as u64,
                        sha256: super::integrity::sha256_hex(&data),
                    });
                    blobs.push((offset, data));
                    offset = (offset + len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
                }
            }
        }
    }
    // What the data file holds, so a loader can tell it is the data this model was written
    // with (`onnx::integrity`); a model without data of its own records nothing.
    model
        .metadata_props
        .retain(|e| e.key != super::integrity::META_EXTERNAL);
    if !record.is_empty() {
        let rec = super::integrity::ExternalRecord {
            file: data_name.clone(),
            tensors: record,
        };
        let value = serde_json::to_string(&rec)
            .map_err(|e| Error::Onnx(format!("{}: external record: {e}", path.display())))?;
        model.metadata_props.push(StringStringEntryProto {
            key: super::integrity::META_EXTERNAL.into(),
            value,
        });
        crate::util::fs::guard_write(&data_path)?;
    }
    let len = model.encoded_len();
    if len >= PROTO_LIMIT {
        return Err(Error::Onnx(format!(
            "{}: model is {len} bytes, over protobuf's 2 GiB limit; use external data",
            path.display()
        )));
    }
    let mut data_bytes = 0u64;
    let external_tensors = blobs.len();
    let data_written = if blobs.is_empty() {
        None
    } else {
        // The data goes to a temp file now; [`replace_pair`] puts both files in place.
        let staged = staged_data(&data_path, |f| {
            use std::io::Write;
            let mut pos = 0usize;
            let mut w = std::io::BufWriter::new(f);
            for (off, data) in &blobs {
                if *off > pos {
                    w.write_all(&vec![0u8; off - pos])?;
                }
                w.write_all(data)?;
                pos = off + data.len();
            }
            w.flush()
        })?;
        data_bytes = blobs.last().map(|(o, d)| (o + d.len()) as u64).unwrap_or(0);
        Some((staged, data_path))
    };
    drop(blobs);
    let bytes = model.encode_to_vec();
    let data_written = match data_written {
        None => {
            crate::util::fs::write_atomic(path, &bytes)?;
            None
        }
        Some((staged, data_path)) => {
            replace_pair(path, &bytes, &staged, &data_path)?;
            crate::util::fs::guard_created(path);
            crate::util::fs::guard_created(&data_path);
            Some(data_path)
        }
    };
    Ok(WriteReport {
        model_path: path.to_path_buf(),
        model_bytes: bytes.len() as u64,
        data_path: data_written,
        data_bytes,
        external_tensors,
    })
}

/// A gps-seg base file (`export --base-onnx`) is never replaced: its task files point into its
/// data, and would silently run on other weights.
fn refuse_replacing_base(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let role = super::integrity::read_metadata(path)
        .ok()
        .and_then(|m| m.get(super::integrity::META_ROLE).cloned());
    if role.as_deref() == Some("base") {
        return Err(Error::Onnx(format!(
            "refusing to replace {}: it is a shared base of task files (`export --base-onnx`), \
             which point into its data; write to another path, or move the base and its tasks \
             away first",
            path.display()
        )));
    }
    Ok(())
}

fn data_staging_path(data_path: &Path) -> PathBuf {
    let name = data_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx.data".into());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    data_path.with_file_name(format!(".{name}.{}-{n}.staged", std::process::id()))
}

/// Write the external data of a model to its staging name (fsynced); [`replace_pair`] renames it.
fn staged_data(
    data_path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<PathBuf> {
    let staged = data_staging_path(data_path);
    let r = (|| {
        if let Some(parent) = data_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::File::create(&staged)?;
        write(&mut f)?;
        f.sync_all()
    })();
    match r {
        Ok(()) => Ok(staged),
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            Err(Error::io(data_path, e))
        }
    }
}

/// Put a model and its staged external data in place so that no reader ever sees a model next
/// to data it was not written with: the old model (being replaced) is moved away first, then
/// the data is renamed into place, then the model. A crash leaves the old pair, no model, or
/// the new pair; never a model with the wrong data.
fn replace_pair(path: &Path, model_bytes: &[u8], staged: &Path, data_path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let result = (|| -> Result<()> {
        // The new model, fully written under a temp name first.
        let mut tmp = tempfile::Builder::new()
            .prefix(".onnx-model.")
            .suffix(".tmp")
            .tempfile_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        {
            use std::io::Write;
            let f = tmp.as_file_mut();
            f.write_all(model_bytes)
                .and_then(|()| crate::util::fs::set_usual_mode(f, path, 0o644))
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(path, e))?;
        }
        if path.exists() {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
            crate::util::fs::sync_dir(&parent)?;
        }
        std::fs::rename(staged, data_path).map_err(|e| Error::io(data_path, e))?;
        crate::util::fs::sync_dir(&parent)?;
        tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
        crate::util::fs::sync_dir(&parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(staged);
    }
    result
}

/// Read a model file back (initializers stay external if they were).
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Onnx(format!("{}: not an ONNX model: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_and_dangling_names_fail_loudly() {
        let mut b = GraphBuilder::new("g");
        let x = b
            .input("x", data_type::FLOAT, &[Dim::sym("batch"), 4.into()])
            .unwrap();
        assert!(b
            .input("x", data_type::FLOAT, &[])
            .unwrap_err()
            .to_string()
            .contains("`x`"));
        b.set_scope("blk");
        let err = b.add(&x, &Value("nope".into())).unwrap_err().to_string();
        assert!(err.contains("blk/Add") && err.contains("nope"), "{err}");
        b.param_f32("w", &[2], &[1.0, 2.0]).unwrap();
        assert!(b.param_f32("w", &[2], &[1.0, 2.0]).is_err());
        assert!(b
            .param_f32("v", &[3], &[1.0, 2.0])
            .unwrap_err()
            .to_string()
            .contains("`v`"));
        let bad = AttributeProto {
            name: "axis".into(),
            ..Default::default()
        };
        let err = b.op("Softmax", &[&x], vec![bad]).unwrap_err().to_string();
        assert!(err.contains("Softmax") && err.contains("axis"), "{err}");
        // No outputs → error naming the graph.
        assert!(b
            .finish(OPSET, IR_VERSION)
            .unwrap_err()
            .to_string()
            .contains("`g`"));
    }

    #[test]
    fn constants_are_deduplicated_params_are_not() {
        let mut b = GraphBuilder::new("g");
        let a = b.const_f32(&[2], &[1.0, 2.0]).unwrap();
        let c = b.const_f32(&[2], &[1.0, 2.0]).unwrap();
        let d = b.const_f32(&[1, 2], &[1.0, 2.0]).unwrap();
        assert_eq!(a, c);
        assert_ne!(a, d);
        b.param_f32("p", &[2], &[1.0, 2.0]).unwrap();
        b.param_f32("q", &[2], &[1.0, 2.0]).unwrap();
        assert_eq!(b.param_count(), 4);
        assert_eq!(b.params().len(), 2);
    }

    #[test]
    fn external_data_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", data_type::FLOAT, &[3.into()]).unwrap();
        let big: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let w = b.param_f32("big", &[3000], &big).unwrap();
        let small = b.param_f32("small", &[3], &[1.0, 2.0, 3.0]).unwrap();
        let y = b.add(&x, &small).unwrap();
        let _ = w;
        b.output(&y, "y", data_type::FLOAT, &[3.into()]).unwrap();
        let m = b.finish(OPSET, IR_VERSION).unwrap();
        let path = dir.path().join("m.onnx");
        let r = write_model_with(
            &path,
            m,
            ExternalData::Always {
                threshold_bytes: 1024,
            },
        )
        .unwrap();
        assert_eq!(r.external_tensors, 1);
        let data = std::fs::read(dir.path().join("m.onnx.data")).unwrap();
        assert_eq!(data.len(), 12000);
        let back = read_model(&path).unwrap();
        let g = back.graph.unwrap();
        let t = g.initializer.iter().find(|t| t.name == "big").unwrap();
        assert_eq!(t.data_location, data_location::EXTERNAL);
        assert!(t.raw_data.is_empty());
        let kv: Vec<_> = t
            .external_data
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            kv,
            vec![
                ("location", "m.onnx.data"),
                ("offset", "0"),
                ("length", "12000")
            ]
        );
        assert_eq!(
            f32::from_le_bytes(data[4 * 2999..].try_into().unwrap()),
            2999.0
        );
        let s = g.initializer.iter().find(|t| t.name == "small").unwrap();
        assert_eq!(s.data_location, data_location::DEFAULT);
        assert_eq!(s.raw_data.len(), 12);
        // Auto keeps a small model in one file.
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", data_type::FLOAT, &[1.into()]).unwrap();
        b.output(&x, "x", data_type::FLOAT, &[1.into()]).unwrap();
        let r = write_model(
            &dir.path().join("n.onnx"),
            b.finish(OPSET, IR_VERSION).unwrap(),
        )
        .unwrap();
        assert!(r.data_path.is_none());
    }
}
