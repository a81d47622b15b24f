//! An ONNX Runtime session on one model file ([`OrtModel`]), or a task file run on its base held
//! once per process ([`super::shared`]); named f32 inputs in, named outputs out.

use super::runtime::{environment, io_infos, IoInfo};
use crate::error::{Error, Result};
use ndarray::ArrayD;
use ort::session::Session;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What runs an [`OrtModel`]: its own session, or a task on a shared base's session.
enum Backing {
    Own(Mutex<Session>),
    Shared {
        base: std::sync::Arc<super::shared::SharedBase>,
        task: std::sync::Arc<super::shared::SharedTask>,
    },
}

/// An ONNX Runtime session on one model file (or, for a task file served on a shared base, that
/// base's session with the task's weights: [`OrtModel::load_shared`]).
pub struct OrtModel {
    backing: Backing,
    path: PathBuf,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    /// The model's custom metadata (`metadata_props`), e.g. `gps_seg.input`.
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl OrtModel {
    /// Load `path` with `threads` intra-op threads (0 = ONNX Runtime's default), using the
    /// process environment (library found by [`locate`]`(None)` on first use).
    pub fn load(path: &Path, threads: usize) -> Result<OrtModel> {
        Self::load_with(path, threads, None)
    }

    /// As [`OrtModel::load`], with an explicit library path for the first environment.
    pub fn load_with(path: &Path, threads: usize, ort_lib: Option<&Path>) -> Result<OrtModel> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file"),
            ));
        }
        // The files it points into (its external data; a task file's base) are checked first.
        crate::onnx::integrity::verify_model_file(path)?;
        let (env, _) = environment(ort_lib)?;
        let err = |e: String| Error::Onnx(format!("{}: {e}", path.display()));
        let mut b = Session::builder(env).map_err(|e| err(e.to_string()))?;
        if threads > 0 {
            b = b
                .with_intra_threads(threads)
                .map_err(|e| err(e.to_string()))?;
        }
        let session = b.commit_from_file(path).map_err(|e| err(e.to_string()))?;
        let inputs = io_infos(session.inputs());
        let outputs = io_infos(session.outputs());
        let mut metadata = std::collections::BTreeMap::new();
        if let Ok(meta) = session.metadata() {
            for k in meta.custom_keys().unwrap_or_default() {
                if let Some(v) = meta.custom(&k) {
                    metadata.insert(k, v);
                }
            }
        }
        Ok(OrtModel {
            backing: Backing::Own(Mutex::new(session)),
            path: path.to_path_buf(),
            inputs,
            outputs,
            metadata,
        })
    }

    /// A task file (`export --base-onnx`) served on its base held once per process
    /// ([`super::shared`]): the base is loaded on first use (`threads` intra-op threads for its
    /// session), the task's pair with it checked, and only the task's own tensors held here.
    pub fn load_shared(path: &Path, threads: usize, ort_lib: Option<&Path>) -> Result<OrtModel> {
        let meta = crate::onnx::integrity::read_metadata(path)?;
        if meta.get(crate::onnx::delta::META_ROLE).map(String::as_str) != Some("task") {
            return Err(Error::Onnx(format!(
                "{}: not a task file (only `export --base-onnx` task files share a base)",
                path.display()
            )));
        }
        let base_path = crate::onnx::integrity::verify_task_base_path(path, &meta)?;
        let base = super::shared::SharedBase::get_or_load(&base_path, threads, ort_lib)?;
        let task = std::sync::Arc::new(base.load_task(path)?);
        Ok(OrtModel {
            path: path.to_path_buf(),
            inputs: base.inputs.clone(),
            outputs: base.outputs.clone(),
            metadata: task.metadata.clone(),
            backing: Backing::Shared { base, task },
        })
    }

    /// For a task on a shared base: its base and its own tensors.
    pub fn shared(
        &self,
    ) -> Option<(
        &std::sync::Arc<super::shared::SharedBase>,
        &std::sync::Arc<super::shared::SharedTask>,
    )> {
        match &self.backing {
            Backing::Shared { base, task } => Some((base, task)),
            Backing::Own(_) => None,
        }
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Check the inputs: `(name, rank, Some(channels at axis 1))`. Error shows expected vs found.
    pub fn expect_signature(&self, expected: &[(&str, usize, Option<i64>)]) -> Result<()> {
        let ok = expected.len() == self.inputs.len()
            && expected.iter().zip(&self.inputs).all(|((n, r, c), i)| {
                *n == i.name && *r == i.shape.len() && c.is_none_or(|c| i.shape.get(1) == Some(&c))
            });
        if ok {
            return Ok(());
        }
        let exp: Vec<String> = expected
            .iter()
            .map(|(n, r, c)| match c {
                Some(c) => format!("{n} rank {r} with {c} channels"),
                None => format!("{n} rank {r}"),
            })
            .collect();
        let found: Vec<String> = self.inputs.iter().map(|i| i.to_string()).collect();
        Err(Error::Onnx(format!(
            "{}: unexpected inputs: expected [{}], found [{}]",
            self.path.display(),
            exp.join("; "),
            found.join("; ")
        )))
    }

    /// Run with named f32 inputs; returns every output in order as `(name, array)`.
    pub fn run(&self, inputs: &[(&str, &ArrayD<f32>)]) -> Result<Vec<(String, ArrayD<f32>)>> {
        let err = |e: String| Error::Onnx(format!("{}: {e}", self.path.display()));
        let session = match &self.backing {
            Backing::Shared { base, task } => return base.run(task, inputs),
            Backing::Own(s) => s,
        };
        let mut values: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::new();
        for (name, arr) in inputs {
            if !self.inputs.iter().any(|i| i.name == *name) {
                return Err(err(format!(
                    "no input named `{name}` (inputs: {})",
                    self.inputs
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let t = ort::value::TensorRef::from_array_view(arr.view())
                .map_err(|e| err(format!("input `{name}`: {e}")))?;
            values.push((name.to_string(), t.into()));
        }
        let mut session = session
            .lock()
            .map_err(|_| err("session lock poisoned".into()))?;
        let outputs = session.run(values).map_err(|e| err(e.to_string()))?;
        let mut out = Vec::new();
        for o in &self.outputs {
            let v = outputs[o.name.as_str()]
                .try_extract_array::<f32>()
                .map_err(|e| err(format!("output `{}`: {e}", o.name)))?;
            out.push((o.name.clone(), v.to_owned()));
        }
        Ok(out)
    }

    /// Run a single-input model; returns the first output.
    pub fn run_f32(&self, input: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let name =
            self.inputs.first().map(|i| i.name.clone()).ok_or_else(|| {
                Error::Onnx(format!("{}: model has no inputs", self.path.display()))
            })?;
        self.run(&[(&name, input)])?
            .into_iter()
            .next()
            .map(|(_, a)| a)
            .ok_or_else(|| Error::Onnx(format!("{}: model has no outputs", self.path.display())))
    }

    /// [`OrtModel::run_f32`] on a Candle tensor.
    pub fn run_tensor(&self, input: &candle_core::Tensor) -> Result<ArrayD<f32>> {
        self.run_f32(&tensor_to_array(input)?)
    }
}

/// Candle tensor → ndarray (f32).
pub fn tensor_to_array(t: &candle_core::Tensor) -> Result<ArrayD<f32>> {
    let dims = t.dims().to_vec();
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    ArrayD::from_shape_vec(dims, v).map_err(|e| Error::msg(format!("tensor to array: {e}")))
}
