//! Merge a trained GPS artifact into its base checkpoint, returning a NEW full set of weights
//! with the base's exact names and shapes (cf. HF PEFT's `merge_and_unload`, which also
//! refuses non-finite values). Selected tensors become `base + delta` at their indices — with
//! the same `index_add` the sparse param uses in training, so the merged model computes exactly
//! what the tuned in-memory model did; fully-trainable tensors are replaced.
//!
//! Refuses a delta made for another base: a tensor missing or of another shape (naming it), or
//! a content-hash mismatch; and non-finite results (naming the tensor).

use super::artifact::{check_finite, validate_delta, Artifact};
use crate::error::{Error, Result};
use crate::util::tensors::{content_hash, TensorMap};
use candle_core::{DType, Tensor};

/// What a merge changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Selected tensors patched, and the entries written into them.
    pub sparse_tensors: usize,
    pub sparse_entries: usize,
    /// Fully-trainable tensors replaced, and their entries.
    pub full_tensors: usize,
    pub full_entries: usize,
    /// Entries whose value actually differs from the base.
    pub changed_entries: usize,
    /// Tensors passed through unchanged.
    pub untouched_tensors: usize,
}

/// Merge `artifact` into `base`; see the module docs.
pub fn merge(base: &TensorMap, artifact: &Artifact) -> Result<TensorMap> {
    merge_with_report(base, artifact).map(|(m, _)| m)
}

/// [`merge`], also reporting what changed.
pub fn merge_with_report(
    base: &TensorMap,
    artifact: &Artifact,
) -> Result<(TensorMap, MergeReport)> {
    let delta = artifact.delta.as_ref().ok_or_else(|| {
        Error::msg("the artifact has no delta.safetensors (it was selected but never trained)")
    })?;
    let sel = &artifact.selection;
    sel.validate()?;
    validate_delta(sel, delta)?;
    let foreign = |name: &str, what: String| Error::Tensor {
        name: name.to_string(),
        msg: format!(
            "{what}: this delta was made for another base model (`{}`)",
            artifact.config.base.file
        ),
    };
    // Names and shapes first: the most specific message.
    for (name, spec) in &artifact.config.tensors {
        let t = base
            .get(name)
            .ok_or_else(|| foreign(name, "not in the base checkpoint".into()))?;
        if t.dims() != spec.shape.as_slice() {
            return Err(foreign(
                name,
                format!(
                    "base has shape {:?}, the delta expects {:?}",
                    t.dims(),
                    spec.shape
                ),
            ));
        }
    }
    let hash = content_hash(base)?;
    if hash != artifact.config.base.content_hash {
        return Err(Error::msg(format!(
            "base checkpoint content hash {hash} differs from the one the delta was made for \
             ({} of `{}`): refusing to merge into a different base",
            artifact.config.base.content_hash, artifact.config.base.file
        )));
    }

    let mut out = TensorMap::new();
    let mut rep = MergeReport::default();
    for (name, b) in base {
        let merged = if let Some(idx) = sel.indices.get(name) {
            let d = &delta[name];
            let dev = b.device();
            let index = Tensor::from_vec(idx.clone(), idx.len(), dev)?;
            let d = d.to_dtype(DType::F32)?.to_device(dev)?;
            let flat = b.to_dtype(DType::F32)?.flatten_all()?;
            let m = flat.index_add(&index, &d, 0)?.reshape(b.shape())?;
            rep.sparse_tensors += 1;
            rep.sparse_entries += idx.len();
            m
        } else if sel.trainable.iter().any(|n| n == name) {
            let m = delta[name].to_dtype(DType::F32)?.to_device(b.device())?;
            rep.full_tensors += 1;
            rep.full_entries += m.elem_count();
            m
        } else {
            rep.untouched_tensors += 1;
            out.insert(name.clone(), b.clone());
            continue;
        };
        check_finite(name, &merged)?;
        let a = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let c = merged.flatten_all()?.to_vec1::<f32>()?;
        rep.changed_entries += a.iter().zip(&c).filter(|(x, y)| x != y).count();
        out.insert(name.clone(), merged);
    }
    Ok((out, rep))
}
