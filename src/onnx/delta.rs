//! One base, many tasks: per-task ONNX files that share one base model's weights.
//!
//! - The **base** file (`BASE.onnx`) is an ordinary export of the base checkpoint whose every
//!   checkpoint-named initializer lives in `BASE.onnx.data` (4 KiB-aligned), stamped with the
//!   base's content hash ([`crate::util::tensors::content_hash`], the one a GPS artifact
//!   records) in `metadata_props` (`gps_seg.delta_role = base`, `gps_seg.base_content_hash`).
//! - A **task** file is the same graph with
//!   - every unchanged initializer referencing `BASE.onnx.data` at the base's own offsets (no
//!     copy: the task file holds only the delta);
//!   - every GPS-selected tensor `W` computed as
//!     `Reshape(ScatterND(Reshape(W_base, [-1]), indices[n,1], values[n]), shape(W))` on constant
//!     inputs, where `values` are the merged values (`base + delta`, computed by
//!     [`crate::gps::merge`], so they are bit-identical to the merged checkpoint's). ONNX Runtime
//!     folds these nodes at session creation: the graph that runs holds plain weights, no extra
//!     parameters or compute ([`crate::infer::runtime::optimized_ops`] checks this from ORT's optimized model);
//!   - every fully trained tensor (the mask decoder in the SAM recipe) stored inline.
//!
//! ONNX Runtime resolves external data relative to the model file's folder, so a task file sits
//! in its base's folder (checked). Refused: a base written for another checkpoint (content
//! hash), a base that is not a gps-seg base file, a graph of another kind.

use super::builder::{write_model_external, WriteReport};
use super::proto::{
    data_location, data_type, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
};
use crate::error::{Error, Result};
use crate::gps::Artifact;
use crate::util::tensors::TensorMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub use super::integrity::{META_BASE_FILE, META_BASE_HASH, META_GRAPH, META_ROLE};

/// Suffixes of the names a task file adds (after the tensor's checkpoint name).
pub(crate) const SFX_BASE: &str = "::gps_base";
const SFX_FLAT: &str = "::gps_flat";
pub(crate) const SFX_INDICES: &str = "::gps_indices";
pub(crate) const SFX_VALUES: &str = "::gps_values";
const SFX_SCATTERED: &str = "::gps_scattered";
const SFX_SHAPE: &str = "::gps_shape";
const FLAT_SHAPE: &str = "gps::flat_shape";

fn meta(model: &ModelProto, key: &str) -> Option<String> {
    model
        .metadata_props
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.clone())
}

fn set_meta(model: &mut ModelProto, key: &str, value: &str) {
    model.metadata_props.retain(|e| e.key != key);
    model.metadata_props.push(StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    });
}

/// The external data file name of a model file (`<file>.data`).
pub fn data_file_name(model_path: &Path) -> Result<String> {
    model_path
        .file_name()
        .map(|n| format!("{}.data", n.to_string_lossy()))
        .ok_or_else(|| Error::Onnx(format!("{}: not a file path", model_path.display())))
}

/// Write `model` (an export of the base checkpoint whose content hash is `base_hash`) as a base
/// file: every initializer named in `params` (the checkpoint's tensor names) goes to
/// `<path>.data`; graph constants stay inline.
pub fn write_base(
    path: &Path,
    mut model: ModelProto,
    base_hash: &str,
    params: &BTreeSet<String>,
) -> Result<WriteReport> {
    set_meta(&mut model, META_ROLE, "base");
    set_meta(&mut model, META_BASE_HASH, base_hash);
    write_model_external(path, model, |t| params.contains(&t.name))
}

/// What a task file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskReport {
    /// Selected tensors patched by a folded ScatterND, and their entries.
    pub sparse_tensors: usize,
    pub sparse_entries: usize,
    /// Fully trained tensors stored in the task file, and their entries.
    pub full_tensors: usize,
    pub full_entries: usize,
    /// Initializers that reference the base's data unchanged.
    pub shared_tensors: usize,
    /// Tuned tensors this graph does not use (e.g. point embeddings in the prompt-free graph).
    pub not_in_graph: Vec<String>,
}

/// Check that `base` (read from `base_path`) is a gps-seg base file for the checkpoint the
/// artifact was made on, of graph kind `graph` when given. Errors name the file and field.
pub fn check_base(
    base: &ModelProto,
    base_path: &Path,
    artifact: &Artifact,
    graph: Option<&str>,
) -> Result<()> {
    let bad = |msg: String| Error::Onnx(format!("{}: {msg}", base_path.display()));
    match meta(base, META_ROLE).as_deref() {
        Some("base") => {}
        Some(r) => {
            return Err(bad(format!(
                "`{META_ROLE}` is `{r}`, not `base`: give the base file written by \
                 `export --base-onnx`, not a task file"
            )))
        }
        None => {
            return Err(bad(format!(
                "not a gps-seg base file (no `{META_ROLE}` in metadata_props); \
                 `export --base-onnx` writes one when the path does not exist"
            )))
        }
    }
    let hash = meta(base, META_BASE_HASH).unwrap_or_default();
    let want = &artifact.config.base.content_hash;
    if &hash != want {
        return Err(bad(format!(
            "base content hash `{hash}` differs from the one the GPS artifact was made for \
             (`{want}` of `{}`): this base was exported from another checkpoint",
            artifact.config.base.file
        )));
    }
    if let Some(g) = graph {
        let have = meta(base, META_GRAPH).unwrap_or_default();
        if have != g {
            return Err(bad(format!(
                "graph `{have}`, but this export writes `{g}` (a prompt-free base for a \
                 prompted export, or the other way round?)"
            )));
        }
    }
    Ok(())
}

/// The task file for `artifact` on `base` (the base file's model, as read from `base_path`):
/// see the module docs. `base_weights` is the base checkpoint (the artifact's base, checked by
/// content hash in the merge); `task_path` must sit in the base file's folder.
pub fn task_model(
    base: &ModelProto,
    base_path: &Path,
    task_path: &Path,
    base_weights: &TensorMap,
    artifact: &Artifact,
) -> Result<(ModelProto, TaskReport)> {
    check_base(base, base_path, artifact, None)?;
    let folder = |p: &Path| -> PathBuf {
        let parent = p.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = parent.unwrap_or(Path::new("."));
        std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf())
    };
    if folder(base_path) != folder(task_path) {
        return Err(Error::Onnx(format!(
            "{}: a task file must sit in its base's folder ({}): ONNX Runtime resolves the \
             base's external data relative to the task file",
            task_path.display(),
            folder(base_path).display()
        )));
    }
    let data_name = data_file_name(base_path)?;
    let base_record = meta(base, super::integrity::META_EXTERNAL).ok_or_else(|| {
        Error::Onnx(format!(
            "{}: the base records no external data (`{}`): written by an older gps-seg; \
             export a new base (a new --base-onnx path)",
            base_path.display(),
            super::integrity::META_EXTERNAL
        ))
    })?;
    let merged = crate::gps::merge(base_weights, artifact)?;
    let mut model = base.clone();
    model
        .metadata_props
        .retain(|e| e.key != super::integrity::META_EXTERNAL);
    set_meta(
        &mut model,
        super::integrity::META_BASE_DATA,
        &super::integrity::record_digest(&base_record),
    );
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::Onnx(format!("{}: model has no graph", base_path.display())))?;
    let in_graph: BTreeSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    let mut rep = TaskReport::default();
    for name in artifact.config.tensors.keys() {
        if !in_graph.contains(name) {
            rep.not_in_graph.push(name.clone());
        }
    }
    let sel = &artifact.selection;
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut prologue: Vec<NodeProto> = Vec::new();
    let mut need_flat_shape = false;
    for t in graph.initializer.iter_mut() {
        let name = t.name.clone();
        let external_here = t.data_location == data_location::EXTERNAL
            && t.external_data
                .iter()
                .any(|e| e.key == "location" && e.value == data_name);
        if let Some(idx) = sel.indices.get(&name) {
            if !external_here {
                return Err(Error::Onnx(format!(
                    "{}: initializer `{name}` is not in {data_name}; not a base file",
                    base_path.display()
                )));
            }
            if t.data_type != data_type::FLOAT {
                return Err(Error::Onnx(format!(
                    "{}: initializer `{name}` is not f32 (data type {}); a delta needs an f32 \
                     base (export the base without --quantize / --precision)",
                    base_path.display(),
                    t.data_type
                )));
            }
            let m = merged.get(&name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "missing from the merged weights".into(),
            })?;
            let flat = m
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut values = Vec::with_capacity(idx.len() * 4);
            let mut indices = Vec::with_capacity(idx.len() * 8);
            for &i in idx {
                let v = flat.get(i as usize).ok_or_else(|| Error::Tensor {
                    name: name.clone(),
                    msg: format!(
                        "selected index {i} outside the tensor ({} entries)",
                        flat.len()
                    ),
                })?;
                values.extend_from_slice(&v.to_le_bytes());
                indices.extend_from_slice(&i64::from(i).to_le_bytes());
            }
            let n = idx.len() as i64;
            let dims = t.dims.clone();
            t.name = format!("{name}{SFX_BASE}");
            new_inits.push(TensorProto {
                dims: vec![n, 1],
                data_type: data_type::INT64,
                name: format!("{name}{SFX_INDICES}"),
                raw_data: indices,
                ..Default::default()
            });
            new_inits.push(TensorProto {
                dims: vec![n],
                data_type: data_type::FLOAT,
                name: format!("{name}{SFX_VALUES}"),
                raw_data: values,
                ..Default::default()
            });
            new_inits.push(TensorProto {
                dims: vec![dims.len() as i64],
                data_type: data_type::INT64,
                name: format!("{name}{SFX_SHAPE}"),
                raw_data: dims.iter().flat_map(|d| d.to_le_bytes()).collect(),
                ..Default::default()
            });
            need_flat_shape = true;
            let node = |op: &str, inputs: Vec<String>, output: String| NodeProto {
                input: inputs,
                output: vec![output.clone()],
                name: format!("gps_delta/{op}/{output}"),
                op_type: op.into(),
                ..Default::default()
            };
            prologue.push(node(
                "Reshape",
                vec![format!("{name}{SFX_BASE}"), FLAT_SHAPE.into()],
                format!("{name}{SFX_FLAT}"),
            ));
            prologue.push(node(
                "ScatterND",
                vec![
                    format!("{name}{SFX_FLAT}"),
                    format!("{name}{SFX_INDICES}"),
                    format!("{name}{SFX_VALUES}"),
                ],
                format!("{name}{SFX_SCATTERED}"),
            ));
            prologue.push(node(
                "Reshape",
                vec![
                    format!("{name}{SFX_SCATTERED}"),
                    format!("{name}{SFX_SHAPE}"),
                ],
                name.clone(),
            ));
            rep.sparse_tensors += 1;
            rep.sparse_entries += idx.len();
        } else if sel.trainable.iter().any(|n| n == &name) {
            let m = merged.get(&name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                msg: "missing from the merged weights".into(),
            })?;
            let v = m
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let dims: Vec<i64> = m.dims().iter().map(|&d| d as i64).collect();
            if dims != t.dims {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    found: m.dims().to_vec(),
                    expected: t.dims.iter().map(|&d| d.max(0) as usize).collect(),
                });
            }
            t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            t.data_location = data_location::DEFAULT;
            t.external_data.clear();
            t.data_type = data_type::FLOAT;
            rep.full_tensors += 1;
            rep.full_entries += v.len();
        } else if external_here {
            rep.shared_tensors += 1;
        }
    }
    if need_flat_shape {
        new_inits.push(TensorProto {
            dims: vec![1],
            data_type: data_type::INT64,
            name: FLAT_SHAPE.into(),
            raw_data: (-1i64).to_le_bytes().to_vec(),
            ..Default::default()
        });
    }
    graph.initializer.extend(new_inits);
    prologue.append(&mut graph.node);
    graph.node = prologue;
    let base_file = base_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    set_meta(&mut model, META_ROLE, "task");
    set_meta(&mut model, META_BASE_FILE, &base_file);
    model.doc_string = format!(
        "{} GPS task delta on {base_file}: {} selected tensors ({} entries, folded ScatterND), \
         {} fully trained tensors inline; every other weight in {data_name}.",
        model.doc_string, rep.sparse_tensors, rep.sparse_entries, rep.full_tensors
    );
    Ok((model, rep))
}

/// Write a task model (see [`task_model`]): its own tensors inline, the base's references kept.
pub fn write_task(path: &Path, model: ModelProto) -> Result<WriteReport> {
    write_model_external(path, model, |_| false)
}

/// Which SAM graph a base / task pair holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamGraph {
    PromptFree,
    ImageEncoder,
    PromptedDecoder,
}

impl SamGraph {
    /// The `gps_seg.graph` name the exporter writes.
    pub fn name(self) -> &'static str {
        match self {
            SamGraph::PromptFree => "sam_prompt_free",
            SamGraph::ImageEncoder => "sam_image_encoder",
            SamGraph::PromptedDecoder => "sam_prompted_decoder",
        }
    }

    fn export(
        self,
        cfg: &crate::sam::SamConfig,
        w: &TensorMap,
        opts: super::sam::SamExportOptions,
    ) -> Result<ModelProto> {
        use super::sam::{export_image_encoder, export_prompt_free, export_prompted_decoder};
        Ok(match self {
            SamGraph::PromptFree => export_prompt_free(cfg, w, opts)?.0,
            SamGraph::ImageEncoder => export_image_encoder(cfg, w, opts)?.0,
            SamGraph::PromptedDecoder => export_prompted_decoder(cfg, w)?.0,
        })
    }

    /// Whether the graph takes the image (and so records the input normalisation).
    fn takes_image(self) -> bool {
        self != SamGraph::PromptedDecoder
    }
}

/// What [`export_sam_task`] did for one graph.
#[derive(Debug, Clone)]
pub struct TaskExport {
    pub graph: SamGraph,
    pub base_path: PathBuf,
    /// The base file was written now (it did not exist).
    pub base_written: bool,
    /// Bytes of the base (`.onnx` + `.onnx.data`): what a merged model of this graph holds.
    pub base_bytes: u64,
    pub task: WriteReport,
    pub report: TaskReport,
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Export one SAM graph of a GPS task as a delta on a shared base: write the base file at
/// `base_path` when it does not exist (from `base_weights`), else check it (gps-seg base,
/// content hash, graph kind, input normalisation, SAM config); then write the task file at
/// `out`. Callers check that `out` is not an input (`util::fs::IoPaths`).
pub fn export_sam_task(
    graph: SamGraph,
    cfg: &crate::sam::SamConfig,
    base_weights: &TensorMap,
    artifact: &Artifact,
    opts: super::sam::SamExportOptions,
    base_path: &Path,
    out: &Path,
) -> Result<TaskExport> {
    // One writer at a time in the base's folder (between processes): the base is written
    // once, never replaced, and a task is never written against a base being replaced.
    let _lock =
        crate::util::fs::FolderLock::acquire(crate::util::fs::parent_of(base_path), &mut |m| {
            tracing::info!("{m}")
        })?;
    let base_written = !base_path.exists();
    if base_written {
        let hash = crate::util::tensors::content_hash(base_weights)?;
        if hash != artifact.config.base.content_hash {
            return Err(Error::msg(format!(
                "the run's base checkpoint (content hash {hash}) is not the one its GPS artifact \
                 was made for ({} of `{}`)",
                artifact.config.base.content_hash, artifact.config.base.file
            )));
        }
        let model = graph.export(cfg, base_weights, opts)?;
        let params: BTreeSet<String> = super::sam::sam_param_shapes(cfg).into_keys().collect();
        write_base(base_path, model, &hash, &params)?;
    }
    let base = super::builder::read_model(base_path)?;
    check_base(&base, base_path, artifact, Some(graph.name()))?;
    if !base_written {
        // Reusing a base: its data must be the data it was written with, whole.
        super::integrity::verify_model_file(base_path)?;
    }
    let bad = |field: &str, have: &str, want: &str| {
        Error::Onnx(format!(
            "{}: `{field}` is `{have}`, this export needs `{want}`",
            base_path.display()
        ))
    };
    if graph.takes_image() {
        let want = super::sam::input_metadata(opts);
        let have = meta(&base, "gps_seg.input").unwrap_or_default();
        if have != want {
            return Err(bad("gps_seg.input", &have, want));
        }
    }
    let want = serde_json::to_string(cfg).map_err(|e| Error::msg(e.to_string()))?;
    let have = meta(&base, "gps_seg.sam_config").unwrap_or_default();
    if have != want {
        return Err(bad("gps_seg.sam_config", &have, &want));
    }
    let (model, report) = task_model(&base, base_path, out, base_weights, artifact)?;
    let task = write_task(out, model)?;
    let data = base_path.with_file_name(data_file_name(base_path)?);
    Ok(TaskExport {
        graph,
        base_path: base_path.to_path_buf(),
        base_written,
        base_bytes: file_len(base_path) + file_len(&data),
        task,
        report,
    })
}
