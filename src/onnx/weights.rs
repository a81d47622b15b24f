//! Checkpoint tensors as graph initializers, for every exporter: each tensor is taken by its
//! checkpoint name, checked against the architecture's expected shape, added once, and
//! recorded as used (so an exporter can report or refuse unused tensors).

use super::builder::{GraphBuilder, Value};
use crate::error::{Error, Result};
use crate::util::tensors::TensorMap;
use std::collections::{BTreeMap, BTreeSet};

/// The weights an exporter reads, their expected shapes, and the names used so far.
pub struct Weights<'a> {
    pub w: &'a TensorMap,
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub used: BTreeSet<String>,
}

impl<'a> Weights<'a> {
    pub fn new(w: &'a TensorMap, shapes: BTreeMap<String, Vec<usize>>) -> Self {
        Weights {
            w,
            shapes,
            used: BTreeSet::new(),
        }
    }

    /// The checkpoint tensor `name` as an initializer of `b` (shape checked).
    pub fn param(&mut self, b: &mut GraphBuilder, name: &str) -> Result<Value> {
        let expected =
            self.shapes.get(name).cloned().ok_or_else(|| {
                Error::Onnx(format!("exporter asked for unknown tensor `{name}`"))
            })?;
        if self.used.contains(name) {
            return b.existing(name);
        }
        let t = self.w.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            expected: expected.clone(),
        })?;
        if t.dims() != expected.as_slice() {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                found: t.dims().to_vec(),
                expected,
            });
        }
        let v = b.param(name, t)?;
        self.used.insert(name.into());
        Ok(v)
    }

    /// `x·Wᵀ (+ b)` with `{pre}.weight` and, when the architecture has it, `{pre}.bias`.
    pub fn linear(&mut self, b: &mut GraphBuilder, x: &Value, pre: &str) -> Result<Value> {
        let w = self.param(b, &format!("{pre}.weight"))?;
        let bname = format!("{pre}.bias");
        if self.shapes.contains_key(&bname) {
            let bias = self.param(b, &bname)?;
            b.linear(x, &w, Some(&bias))
        } else {
            b.linear(x, &w, None)
        }
    }

    /// LayerNormalization over the last dim with `{pre}.weight` / `{pre}.bias`.
    pub fn layer_norm(
        &mut self,
        b: &mut GraphBuilder,
        x: &Value,
        pre: &str,
        eps: f32,
    ) -> Result<Value> {
        let w = self.param(b, &format!("{pre}.weight"))?;
        let bias = self.param(b, &format!("{pre}.bias"))?;
        b.layer_norm(x, &w, &bias, eps)
    }
}
