//! Many GPS tasks on one loaded base: switching task writes the sparse delta into the live
//! weights in place and restores what it overwrote exactly.
//!
//! [`TaskSet`] holds the live tensors a model computes with (Candle tensors share their
//! storage, so a model built from clones of the same map sees every write) and, per task, only
//! its delta: per selected tensor the flat indices and the delta values, per fully trained
//! tensor its whole value. [`TaskSet::activate`] first restores the active task's overwritten
//! entries from the values it saved (not by subtracting: the base is bit-identical after any
//! sequence of switches), then saves the base values at the new task's entries and writes
//! `base + delta` there (the same single f32 addition as [`super::merge`], so the live weights
//! equal the merged checkpoint bit for bit). Memory: the base, Σ deltas, and the saved entries
//! of the active task (the whole value of its fully trained tensors) — not N merged copies.
//!
//! The set refuses an artifact made for another base (content hash) or one never trained.

use super::artifact::{validate_delta, Artifact};
use crate::error::{Error, Result};
use crate::util::tensors::{content_hash, TensorMap};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// One task's delta, ready to apply.
#[derive(Debug, Clone)]
struct TaskDelta {
    /// (tensor, flat indices u32 `[n]`, delta f32 `[n]`).
    sparse: Vec<(String, Tensor, Tensor)>,
    /// (tensor, whole new value).
    full: Vec<(String, Tensor)>,
}

impl TaskDelta {
    fn bytes(&self) -> usize {
        let sp: usize = self
            .sparse
            .iter()
            .map(|(_, i, d)| i.elem_count() * 4 + d.elem_count() * 4)
            .sum();
        let fu: usize = self.full.iter().map(|(_, t)| t.elem_count() * 4).sum();
        sp + fu
    }
}

/// What the active task overwrote.
#[derive(Debug)]
enum Saved {
    Entries {
        name: String,
        index: Tensor,
        values: Tensor,
    },
    Whole {
        name: String,
        value: Tensor,
    },
}

/// A base with several tasks; see the module docs.
#[derive(Debug)]
pub struct TaskSet {
    live: TensorMap,
    base_hash: String,
    tasks: BTreeMap<String, TaskDelta>,
    active: Option<String>,
    saved: Vec<Saved>,
}

/// Memory of a task set against N merged copies (bytes of f32 values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSetMemory {
    pub base_bytes: usize,
    /// Per task, its delta's bytes (indices + values + whole tensors).
    pub delta_bytes: Vec<(String, usize)>,
    /// The saved entries of the active task.
    pub saved_bytes: usize,
    /// `tasks × base_bytes`: what one merged model per task would hold.
    pub merged_copies_bytes: usize,
}

fn get<'a>(m: &'a TensorMap, name: &str) -> Result<&'a Tensor> {
    m.get(name).ok_or_else(|| Error::Tensor {
        name: name.into(),
        msg: "not in the loaded base".into(),
    })
}

fn flat(t: &Tensor, name: &str) -> Result<Tensor> {
    if t.dtype() != DType::F32 {
        return Err(Error::Tensor {
            name: name.into(),
            msg: format!(
                "task switching needs f32 weights, found {:?} (load the base as f32)",
                t.dtype()
            ),
        });
    }
    if !t.is_contiguous() {
        return Err(Error::Tensor {
            name: name.into(),
            msg: "live weight is not contiguous; cannot write it in place".into(),
        });
    }
    Ok(t.flatten_all()?)
}

impl TaskSet {
    /// A set over `live` (the very tensors the model was built from; the base, no task active).
    /// Hashes the base once (O(size)) to check every artifact against it.
    pub fn new(live: TensorMap) -> Result<Self> {
        let base_hash = content_hash(&live)?;
        Ok(TaskSet {
            live,
            base_hash,
            tasks: BTreeMap::new(),
            active: None,
            saved: Vec::new(),
        })
    }

    /// Add a trained artifact under `name` (does not activate it).
    pub fn add(&mut self, name: &str, artifact: &Artifact) -> Result<()> {
        if self.tasks.contains_key(name) {
            return Err(Error::msg(format!("task `{name}` is already loaded")));
        }
        if artifact.config.base.content_hash != self.base_hash {
            return Err(Error::msg(format!(
                "task `{name}`: its GPS artifact was made for base `{}` (content hash {}), \
                 not the loaded base ({})",
                artifact.config.base.file, artifact.config.base.content_hash, self.base_hash
            )));
        }
        let delta = artifact.delta.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "task `{name}`: the artifact has no delta.safetensors (never trained)"
            ))
        })?;
        let sel = &artifact.selection;
        sel.validate()?;
        validate_delta(sel, delta)?;
        let mut td = TaskDelta {
            sparse: Vec::new(),
            full: Vec::new(),
        };
        for (t, idx) in &sel.indices {
            let live = self.live.get(t).ok_or_else(|| Error::Tensor {
                name: t.clone(),
                msg: format!("task `{name}` tunes it but the base has no such tensor"),
            })?;
            let dev = live.device();
            let index = Tensor::from_vec(idx.clone(), idx.len(), dev)?;
            let d = get(delta, t)?.to_dtype(DType::F32)?.to_device(dev)?;
            td.sparse.push((t.clone(), index, d));
        }
        for t in &sel.trainable {
            let live = self.live.get(t).ok_or_else(|| Error::Tensor {
                name: t.clone(),
                msg: format!("task `{name}` trains it but the base has no such tensor"),
            })?;
            let v = get(delta, t)?
                .to_dtype(DType::F32)?
                .to_device(live.device())?
                .contiguous()?;
            if v.dims() != live.dims() {
                return Err(Error::ShapeMismatch {
                    name: t.clone(),
                    found: v.dims().to_vec(),
                    expected: live.dims().to_vec(),
                });
            }
            td.full.push((t.clone(), v));
        }
        self.tasks.insert(name.to_string(), td);
        Ok(())
    }

    /// Task names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tasks.keys().cloned().collect()
    }

    /// The active task (`None`: the base).
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// The live tensors (base, or base with the active task written in).
    pub fn live(&self) -> &TensorMap {
        &self.live
    }

    /// Put the base back: every entry the active task overwrote gets its saved value.
    pub fn deactivate(&mut self) -> Result<()> {
        for s in self.saved.drain(..).rev() {
            match s {
                Saved::Entries {
                    name,
                    index,
                    values,
                } => {
                    let t = flat(get(&self.live, &name)?, &name)?;
                    t.scatter_set(&index, &values, 0)?;
                }
                Saved::Whole { name, value } => {
                    get(&self.live, &name)?.slice_set(&value, 0, 0)?;
                }
            }
        }
        self.active = None;
        Ok(())
    }

    /// Make `name` the active task (`None`: the base).
    pub fn activate(&mut self, name: Option<&str>) -> Result<()> {
        if self.active.as_deref() == name {
            return Ok(());
        }
        if let Some(n) = name {
            if !self.tasks.contains_key(n) {
                return Err(Error::msg(format!(
                    "no task `{n}` (loaded: {})",
                    self.names().join(", ")
                )));
            }
        }
        self.deactivate()?;
        let Some(n) = name else {
            return Ok(());
        };
        let td = self
            .tasks
            .get(n)
            .ok_or_else(|| Error::msg(format!("no task `{n}`")))?;
        for (t, index, d) in &td.sparse {
            let live = flat(get(&self.live, t)?, t)?;
            let base = live.index_select(index, 0)?;
            let new = (&base + d)?;
            live.scatter_set(index, &new, 0)?;
            self.saved.push(Saved::Entries {
                name: t.clone(),
                index: index.clone(),
                values: base,
            });
        }
        for (t, v) in &td.full {
            let live = get(&self.live, t)?;
            flat(live, t)?;
            let keep = live.copy()?;
            live.slice_set(v, 0, 0)?;
            self.saved.push(Saved::Whole {
                name: t.clone(),
                value: keep,
            });
        }
        self.active = Some(n.to_string());
        Ok(())
    }

    /// Bytes held: base, deltas, saved entries, against one merged copy per task.
    pub fn memory(&self) -> TaskSetMemory {
        let base_bytes = self
            .live
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let saved_bytes = self
            .saved
            .iter()
            .map(|s| match s {
                Saved::Entries { index, values, .. } => {
                    4 * (index.elem_count() + values.elem_count())
                }
                Saved::Whole { value, .. } => 4 * value.elem_count(),
            })
            .sum();
        TaskSetMemory {
            base_bytes,
            delta_bytes: self
                .tasks
                .iter()
                .map(|(n, t)| (n.clone(), t.bytes()))
                .collect(),
            saved_bytes,
            merged_copies_bytes: self.tasks.len() * base_bytes,
        }
    }
}
