//! Many tasks on one base in memory: one ONNX Runtime session per base on its serving graph
//! ([`crate::onnx::serving`]: weights are graph inputs), the base's weights held once in buffers
//! this process owns, and per task only what it changes ([`SharedTask`]: its GPS patches and
//! fully trained tensors — about the size of its task file).
//!
//! A run of task T takes the base's lock, writes T's merged values into the shared buffers at
//! T's indices if another task (or none) is applied — saving the base values there, which are
//! written back when the next task comes — and hands T's fully trained tensors as the inputs of
//! those weights. Applying is exact both ways (values are copied, never recomputed), so a
//! task's outputs are the merged model's up to ONNX Runtime's own summation order. Runs of one
//! base are serialised (one batch at a time, using every intra-op thread); the server batches
//! a task's queued requests into one run.
//!
//! Bases are loaded once per process and file ([`SharedBase::get_or_load`]), their data checked
//! against the SHA-256 record written at export while it is read.

use super::runtime::{environment, IoInfo};
use crate::error::{Error, Result};
use crate::onnx::integrity::{self, META_EXTERNAL};
use crate::onnx::serving::{ServingGraph, TaskParts, WeightInput};
use crate::onnx::ModelProto;
use ndarray::ArrayD;
use ort::session::Session;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The base values a task overwrote: (weight, [(index, value)]).
type Saved = Vec<(usize, Vec<(usize, f32)>)>;

/// The mutable half of a base: its session, the weight buffers, the task applied to them.
struct State {
    session: Session,
    buffers: Vec<Vec<f32>>,
    /// The applied task's id and the base values it overwrote: (weight, [(index, value)]).
    applied: Option<(u64, Saved)>,
}

/// One base file loaded for serving (see the module docs).
pub struct SharedBase {
    pub path: PathBuf,
    /// The base's `metadata_props` (content hash, graph kind, config, external record).
    pub metadata: BTreeMap<String, String>,
    /// The base's own inputs (not the weights) and outputs, as ONNX Runtime reports them.
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    /// Bytes of the weight buffers.
    pub weight_bytes: usize,
    base_model: ModelProto,
    weights: Vec<WeightInput>,
    index: HashMap<String, usize>,
    state: Mutex<State>,
}

impl std::fmt::Debug for SharedBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBase")
            .field("path", &self.path)
            .field("weights", &self.weights.len())
            .field("weight_bytes", &self.weight_bytes)
            .finish()
    }
}

/// What one task changes, in its base's buffer layout.
#[derive(Debug)]
pub struct SharedTask {
    id: u64,
    pub path: PathBuf,
    /// The task file's `metadata_props`.
    pub metadata: BTreeMap<String, String>,
    /// (weight, indices in the buffer, merged values).
    sparse: Vec<(usize, Vec<usize>, Vec<f32>)>,
    /// weight → the task's own values (fully trained tensors).
    full: HashMap<usize, Vec<f32>>,
    /// Bytes this task holds in memory.
    pub bytes: usize,
}

static NEXT_TASK: AtomicU64 = AtomicU64::new(1);
static BASES: Mutex<Vec<(PathBuf, Arc<SharedBase>)>> = Mutex::new(Vec::new());

impl SharedBase {
    /// The base at `path`, loaded once per process (`threads` intra-op threads for its one
    /// session; the first load decides).
    pub fn get_or_load(
        path: &Path,
        threads: usize,
        ort_lib: Option<&Path>,
    ) -> Result<Arc<SharedBase>> {
        let key = crate::util::fs::canonical_lenient(path);
        let mut bases = BASES
            .lock()
            .map_err(|_| Error::msg("shared base table poisoned"))?;
        if let Some((_, b)) = bases.iter().find(|(k, _)| *k == key) {
            return Ok(b.clone());
        }
        let b = Arc::new(SharedBase::load(path, threads, ort_lib)?);
        bases.push((key, b.clone()));
        Ok(b)
    }

    /// Load the base file at `path`: its serving graph, its data (checked against the record
    /// while read) and one session.
    pub fn load(path: &Path, threads: usize, ort_lib: Option<&Path>) -> Result<SharedBase> {
        let bad = |m: String| Error::Onnx(format!("{}: {m}", path.display()));
        let metadata = integrity::read_metadata(path)?;
        let record_json = metadata.get(META_EXTERNAL).ok_or_else(|| {
            bad(format!(
                "no `{META_EXTERNAL}` record: not a base written by this gps-seg (export a new \
                 base with `export --base-onnx`)"
            ))
        })?;
        let record = integrity::parse_record(path, record_json)?;
        let base_model = crate::onnx::read_model(path)?;
        let sg = ServingGraph::from_base(&base_model, path)?;
        let by_name: HashMap<&str, &integrity::ExternalTensor> = record
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let data_path = crate::util::fs::parent_of(path).join(&record.file);
        let need: u64 = sg.weights.iter().map(|w| w.length).sum();
        crate::util::mem::check_fits("the shared base's weights", need)?;
        let mut f = std::fs::File::open(&data_path).map_err(|e| Error::io(&data_path, e))?;
        let file_len = f.metadata().map_err(|e| Error::io(&data_path, e))?.len();
        let mut buffers = Vec::with_capacity(sg.weights.len());
        let mut bytes = Vec::new();
        for w in &sg.weights {
            let r = by_name.get(w.tensor.as_str()).ok_or_else(|| {
                bad(format!(
                    "tensor `{}` is not in the external record",
                    w.tensor
                ))
            })?;
            if (r.offset, r.length) != (w.offset, w.length) {
                return Err(bad(format!(
                    "tensor `{}`: the graph and the record disagree on where it lies",
                    w.tensor
                )));
            }
            if w.offset.saturating_add(w.length) > file_len {
                return Err(Error::Onnx(format!(
                    "{}: tensor `{}` needs bytes {}..{} but the file has {file_len} bytes \
                     (truncated, or not the data this base was written with)",
                    data_path.display(),
                    w.tensor,
                    w.offset,
                    w.offset.saturating_add(w.length)
                )));
            }
            bytes.resize(w.length as usize, 0u8);
            f.seek(SeekFrom::Start(w.offset))
                .and_then(|_| f.read_exact(&mut bytes))
                .map_err(|e| Error::io(&data_path, e))?;
            if integrity::sha256_hex(&bytes) != r.sha256 {
                return Err(Error::Onnx(format!(
                    "{}: tensor `{}` does not match the SHA-256 recorded in {} (the data file \
                     was changed or replaced after export)",
                    data_path.display(),
                    w.tensor,
                    path.display()
                )));
            }
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            buffers.push(w.to_layout(v));
        }
        drop(bytes);
        let (env, _) = environment(ort_lib)?;
        let err = |e: String| bad(format!("serving session: {e}"));
        let mut b = Session::builder(env).map_err(|e| err(e.to_string()))?;
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(|e| err(e.to_string()))?;
        }
        let graph_bytes = {
            use prost::Message;
            sg.model.encode_to_vec()
        };
        let session = b
            .commit_from_memory(&graph_bytes)
            .map_err(|e| err(e.to_string()))?;
        let all_in = super::runtime::io_infos(session.inputs());
        let inputs = all_in
            .into_iter()
            .filter(|i| sg.data_inputs.contains(&i.name))
            .collect();
        let outputs = super::runtime::io_infos(session.outputs());
        let index = sg
            .weights
            .iter()
            .enumerate()
            .map(|(k, w)| (w.tensor.clone(), k))
            .collect();
        Ok(SharedBase {
            path: path.to_path_buf(),
            metadata,
            inputs,
            outputs,
            weight_bytes: need as usize,
            base_model,
            weights: sg.weights,
            index,
            state: Mutex::new(State {
                session,
                buffers,
                applied: None,
            }),
        })
    }

    /// Load the task file at `path` onto this base: its pair with the base is checked (role,
    /// content hash, data digest) and its graph must be this base's plus the GPS patches.
    pub fn load_task(&self, path: &Path) -> Result<SharedTask> {
        let metadata = integrity::read_metadata(path)?;
        if metadata
            .get(crate::onnx::delta::META_ROLE)
            .map(String::as_str)
            != Some("task")
        {
            return Err(Error::Onnx(format!(
                "{}: not a task file (`export --base-onnx` writes them)",
                path.display()
            )));
        }
        integrity::check_pair(path, &metadata, &self.path, &self.metadata)?;
        let model = crate::onnx::read_model(path)?;
        let parts = TaskParts::from_task(&model, path, &self.base_model)?;
        drop(model);
        self.task_from_parts(path, metadata, parts)
    }

    fn task_from_parts(
        &self,
        path: &Path,
        metadata: BTreeMap<String, String>,
        parts: TaskParts,
    ) -> Result<SharedTask> {
        let bad = |m: String| Error::Onnx(format!("{}: {m}", path.display()));
        let slot = |name: &str| {
            self.index
                .get(name)
                .copied()
                .ok_or_else(|| bad(format!("`{name}` is not a weight of the base's graph")))
        };
        let mut sparse = Vec::with_capacity(parts.sparse.len());
        for (name, p) in parts.sparse {
            let k = slot(&name)?;
            let w = &self.weights[k];
            let idx: Vec<usize> = p.indices.iter().map(|&i| w.map_index(i as usize)).collect();
            sparse.push((k, idx, p.values));
        }
        let mut full = HashMap::new();
        for (name, (dims, v)) in parts.full {
            let k = slot(&name)?;
            let w = &self.weights[k];
            if dims != w.dims {
                return Err(bad(format!(
                    "`{name}` has shape {dims:?}, the base {:?}",
                    w.dims
                )));
            }
            full.insert(k, w.to_layout(v));
        }
        let bytes = sparse
            .iter()
            .map(|(_, i, v)| i.len() * 8 + v.len() * 4)
            .sum::<usize>()
            + full.values().map(|v| v.len() * 4).sum::<usize>();
        Ok(SharedTask {
            id: NEXT_TASK.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            metadata,
            sparse,
            full,
            bytes,
        })
    }

    /// The base's content hash (`gps_seg.base_content_hash`).
    pub fn content_hash(&self) -> &str {
        self.metadata
            .get(crate::onnx::delta::META_BASE_HASH)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Run `task` on named data inputs (the base's own inputs, e.g. `image`); returns every
    /// output in order.
    pub fn run(
        &self,
        task: &SharedTask,
        data: &[(&str, &ArrayD<f32>)],
    ) -> Result<Vec<(String, ArrayD<f32>)>> {
        let err = |e: String| Error::Onnx(format!("{} (shared base): {e}", task.path.display()));
        let mut guard = self
            .state
            .lock()
            .map_err(|_| err("base lock poisoned".into()))?;
        let State {
            session,
            buffers,
            applied,
        } = &mut *guard;
        if applied.as_ref().map(|a| a.0) != Some(task.id) {
            if let Some((_, saved)) = applied.take() {
                for (k, entries) in saved {
                    if let Some(buf) = buffers.get_mut(k) {
                        for (i, v) in entries {
                            if let Some(x) = buf.get_mut(i) {
                                *x = v;
                            }
                        }
                    }
                }
            }
            let mut saved = Vec::with_capacity(task.sparse.len());
            for (k, idx, vals) in &task.sparse {
                let Some(buf) = buffers.get_mut(*k) else {
                    continue;
                };
                let mut keep = Vec::with_capacity(idx.len());
                for (&i, &v) in idx.iter().zip(vals) {
                    if let Some(x) = buf.get_mut(i) {
                        keep.push((i, *x));
                        *x = v;
                    }
                }
                saved.push((*k, keep));
            }
            *applied = Some((task.id, saved));
        }
        let mut values: Vec<(String, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(data.len() + self.weights.len());
        for (name, arr) in data {
            if !self.inputs.iter().any(|i| i.name == *name) {
                return Err(err(format!("no input named `{name}`")));
            }
            let t = ort::value::TensorRef::from_array_view(arr.view())
                .map_err(|e| err(format!("input `{name}`: {e}")))?;
            values.push((name.to_string(), t.into()));
        }
        for (k, w) in self.weights.iter().enumerate() {
            let slice: &[f32] = match task.full.get(&k) {
                Some(v) => v,
                None => buffers.get(k).map(Vec::as_slice).unwrap_or_default(),
            };
            let view = ndarray::ArrayViewD::from_shape(ndarray::IxDyn(&w.input_dims()), slice)
                .map_err(|e| err(format!("weight `{}`: {e}", w.tensor)))?;
            let t = ort::value::TensorRef::from_array_view(view)
                .map_err(|e| err(format!("weight `{}`: {e}", w.tensor)))?;
            values.push((w.input.clone(), t.into()));
        }
        let outputs = session.run(values).map_err(|e| err(e.to_string()))?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for o in &self.outputs {
            let v = outputs[o.name.as_str()]
                .try_extract_array::<f32>()
                .map_err(|e| err(format!("output `{}`: {e}", o.name)))?;
            out.push((o.name.clone(), v.to_owned()));
        }
        Ok(out)
    }
}

impl SharedTask {
    /// The task's tensors: (patched tensors, patched entries, fully trained tensors).
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.sparse.len(),
            self.sparse.iter().map(|(_, i, _)| i.len()).sum(),
            self.full.len(),
        )
    }
}
