//! The GPS artifact, PEFT-style (cf. HF PEFT's `adapter_config.json` +
//! `adapter_model.safetensors`): a folder holding
//! - `gps_config.json` — policy, K, level, criterion, selection loss, batches, seed, the base
//!   model's identity (file name + [`content_hash`]), the shape and role of every tuned tensor,
//!   and counts;
//! - `selection.safetensors` — per selected tensor its sorted flat indices (u32 `[n]`), named by
//!   the tensor;
//! - `delta.safetensors` (after training) — only tuned values: per selected tensor the delta at
//!   its indices (f32 `[n]`), and the whole value of each fully-trainable tensor.
//!
//! Kilobytes to a few MB, never a copy of the base. Every file is written atomically; loading
//! validates indices, lengths and fields, naming the file and tensor at fault.

use super::counts::CountTotals;
use super::policy::{Policy, Treatment};
use super::select::{indices_to_tensors, Criterion, Level, Selection};
use crate::error::{Error, Result};
use crate::nn::{Param, ParamStore};
use crate::util::fs::{read_json, write_json_atomic};
use crate::util::tensors::{content_hash, load, save_safetensors, TensorMap};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Config file name inside an artifact folder.
pub const CONFIG_FILE: &str = "gps_config.json";
/// Selected indices file name.
pub const SELECTION_FILE: &str = "selection.safetensors";
/// Tuned values file name.
pub const DELTA_FILE: &str = "delta.safetensors";
/// Artifact format tag written into the config.
pub const FORMAT: &str = "gps-seg-artifact/1";

/// Identity of the base checkpoint an artifact was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    /// File name of the base checkpoint (informational).
    pub file: String,
    /// [`content_hash`] of the base tensors (names, shapes, f32 values).
    pub content_hash: String,
    /// Number of tensors and of entries in the base.
    pub tensors: usize,
    pub entries: usize,
}

impl BaseModel {
    /// Identify `base` (hashes every value: O(size)).
    pub fn of(base: &TensorMap, file: &str) -> Result<Self> {
        Ok(BaseModel {
            file: file.to_string(),
            content_hash: content_hash(base)?,
            tensors: base.len(),
            entries: base.values().map(|t| t.elem_count()).sum(),
        })
    }
}

/// How the selection was made (recorded for reproducibility).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectionInfo {
    pub k: usize,
    pub level: Level,
    pub criterion: Criterion,
    /// Name of the loss whose gradients ranked the entries (e.g. `bce+iou`, `supcon`).
    pub selection_loss: String,
    /// Number of batches the gradients were accumulated over.
    pub batches: usize,
    /// Number of training images the gradients came from (0 for magnitude / random).
    #[serde(default)]
    pub selection_images: usize,
    pub seed: u64,
}

/// Shape and role of one tuned tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub shape: Vec<usize>,
    pub treatment: Treatment,
}

/// `gps_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpsConfig {
    pub format: String,
    pub policy: Policy,
    #[serde(flatten)]
    pub info: SelectionInfo,
    pub base: BaseModel,
    /// Every selected or fully-trainable tensor.
    pub tensors: BTreeMap<String, TensorSpec>,
    /// Selected / trainable entries (frozen and total relative to the base).
    pub counts: CountTotals,
}

/// A GPS artifact in memory.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub config: GpsConfig,
    pub selection: Selection,
    /// Tuned values, once trained.
    pub delta: Option<TensorMap>,
}

impl Artifact {
    /// Refuse to reuse this artifact for a run whose settings differ: an error naming the
    /// first differing field (K, level, criterion, selection loss, seed, base content hash).
    pub fn check_reusable(&self, dir: &Path, want: &SelectionInfo, base: &BaseModel) -> Result<()> {
        let have = &self.config.info;
        let diff: Option<(&str, String, String)> = if have.k != want.k {
            Some(("k", have.k.to_string(), want.k.to_string()))
        } else if have.level != want.level {
            Some((
                "level",
                format!("{:?}", have.level),
                format!("{:?}", want.level),
            ))
        } else if have.criterion != want.criterion {
            Some((
                "criterion",
                format!("{:?}", have.criterion),
                format!("{:?}", want.criterion),
            ))
        } else if have.selection_loss != want.selection_loss {
            Some((
                "selection_loss",
                have.selection_loss.clone(),
                want.selection_loss.clone(),
            ))
        } else if have.seed != want.seed {
            Some(("seed", have.seed.to_string(), want.seed.to_string()))
        } else if self.config.base.content_hash != base.content_hash {
            Some((
                "base.content_hash",
                self.config.base.content_hash.clone(),
                base.content_hash.clone(),
            ))
        } else {
            None
        };
        match diff {
            None => Ok(()),
            Some((field, was, now)) => Err(Error::Checkpoint {
                path: dir.join(CONFIG_FILE),
                msg: format!(
                    "stale selection: field `{field}` is {was} there but {now} for this run; \
                     start a new --out (a selection is never silently reused)"
                ),
            }),
        }
    }

    /// A fresh (untrained) artifact for `selection` made on `base`.
    pub fn new(
        policy: Policy,
        info: SelectionInfo,
        base: BaseModel,
        selection: Selection,
    ) -> Result<Self> {
        selection.validate()?;
        let mut tensors = BTreeMap::new();
        for n in selection.indices.keys() {
            tensors.insert(
                n.clone(),
                TensorSpec {
                    shape: selection.shapes[n].clone(),
                    treatment: Treatment::Selected,
                },
            );
        }
        for n in &selection.trainable {
            tensors.insert(
                n.clone(),
                TensorSpec {
                    shape: selection.shapes[n].clone(),
                    treatment: Treatment::Trainable,
                },
            );
        }
        let (sel, tr) = selection.sizes();
        let counts = CountTotals {
            selected: sel,
            trainable: tr,
            frozen: base.entries.saturating_sub(sel + tr),
            total: base.entries,
        };
        Ok(Artifact {
            config: GpsConfig {
                format: FORMAT.into(),
                policy,
                info,
                base,
                tensors,
                counts,
            },
            selection,
            delta: None,
        })
    }

    /// Attach tuned values (validated: names, lengths/shapes, finiteness).
    pub fn set_delta(&mut self, delta: TensorMap) -> Result<()> {
        validate_delta(&self.selection, &delta)?;
        self.delta = Some(delta);
        Ok(())
    }

    /// Write the folder: selection, delta (if any), config last. A folder that already holds a
    /// trained delta is never overwritten by a selection without one (the delta would be lost,
    /// or left indexing another selection): that is an error naming the file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let delta_path = dir.join(DELTA_FILE);
        if self.delta.is_none() && delta_path.exists() {
            return Err(Error::Checkpoint {
                path: delta_path,
                msg: "this folder holds a trained GPS artifact; refusing to replace it with an \
                      untrained selection (choose another output folder)"
                    .into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        save_safetensors(
            &dir.join(SELECTION_FILE),
            &indices_to_tensors(&self.selection)?,
            None,
        )?;
        if let Some(d) = &self.delta {
            save_safetensors(&delta_path, d, None)?;
        }
        write_json_atomic(&dir.join(CONFIG_FILE), &self.config)
    }

    /// Read and validate an artifact folder; tensors land on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let config: GpsConfig = read_json(&cfg_path)?;
        let bad = |msg: String| Error::Checkpoint {
            path: cfg_path.clone(),
            msg,
        };
        if config.format != FORMAT {
            return Err(bad(format!(
                "unknown format `{}` (expected `{FORMAT}`)",
                config.format
            )));
        }
        if config.info.k == 0 {
            return Err(bad("field `k` must be at least 1".into()));
        }
        config.policy.validate().map_err(|e| bad(e.to_string()))?;

        let sel_path = dir.join(SELECTION_FILE);
        let raw = load(&sel_path, &Device::Cpu)?;
        let sel_err = |msg: String| Error::Checkpoint {
            path: sel_path.clone(),
            msg,
        };
        let mut selection = Selection::default();
        for (name, spec) in &config.tensors {
            selection.shapes.insert(name.clone(), spec.shape.clone());
            match spec.treatment {
                Treatment::Selected => {
                    let t = raw.get(name).ok_or_else(|| {
                        sel_err(format!("no indices for selected tensor `{name}`"))
                    })?;
                    if t.dtype() != DType::U32 || t.rank() != 1 {
                        return Err(sel_err(format!(
                            "tensor `{name}`: indices must be u32 [n], found {:?} {:?}",
                            t.dtype(),
                            t.dims()
                        )));
                    }
                    selection.indices.insert(name.clone(), t.to_vec1::<u32>()?);
                }
                Treatment::Trainable => selection.trainable.push(name.clone()),
                Treatment::Frozen => {
                    return Err(bad(format!("tensor `{name}` is listed as frozen")));
                }
            }
        }
        if let Some(extra) = raw.keys().find(|k| !selection.indices.contains_key(*k)) {
            return Err(sel_err(format!(
                "tensor `{extra}` is not a selected tensor of {CONFIG_FILE}"
            )));
        }
        selection.validate().map_err(|e| sel_err(e.to_string()))?;

        let delta_path = dir.join(DELTA_FILE);
        let delta = if delta_path.exists() {
            let d = load(&delta_path, device)?;
            validate_delta(&selection, &d).map_err(|e| Error::Checkpoint {
                path: delta_path.clone(),
                msg: e.to_string(),
            })?;
            Some(d)
        } else {
            None
        };
        Ok(Artifact {
            config,
            selection,
            delta,
        })
    }
}

/// Check that `delta` holds exactly the selection's tuned values: `[n]` per selected tensor
/// (n = number of indices), the full shape per trainable tensor, all finite.
pub fn validate_delta(sel: &Selection, delta: &TensorMap) -> Result<()> {
    let mut expected: BTreeMap<&String, Vec<usize>> = BTreeMap::new();
    for (n, idx) in &sel.indices {
        expected.insert(n, vec![idx.len()]);
    }
    for n in &sel.trainable {
        let shape = sel.shapes.get(n).ok_or_else(|| Error::Tensor {
            name: n.clone(),
            msg: "trainable tensor has no recorded shape".into(),
        })?;
        expected.insert(n, shape.clone());
    }
    for (name, shape) in &expected {
        let t = delta.get(*name).ok_or_else(|| Error::MissingTensor {
            name: (*name).clone(),
            expected: shape.clone(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name: (*name).clone(),
                found: t.dims().to_vec(),
                expected: shape.clone(),
            });
        }
        check_finite(name, t)?;
    }
    if let Some(extra) = delta.keys().find(|k| !expected.contains_key(k)) {
        return Err(Error::Tensor {
            name: extra.clone(),
            msg: "in the delta but neither selected nor trainable".into(),
        });
    }
    Ok(())
}

/// Error naming `name` if `t` holds NaN or ±Inf.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!(
            "tensor `{name}` has {} at flat index {i}",
            v[i]
        )));
    }
    Ok(())
}

/// The tuned values held by a [`ParamStore`]: each sparse param's delta (`[n]`) and each
/// fully-trainable param's whole value, keyed by param name.
pub fn delta_from_store(store: &ParamStore) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for (name, p) in store.params() {
        match p {
            Param::Frozen(_) => {}
            Param::Trainable(v) => {
                out.insert(name, v.as_tensor().detach().copy()?);
            }
            Param::Sparse(s) => {
                out.insert(name, s.delta.as_tensor().detach().copy()?);
            }
        }
    }
    Ok(out)
}
