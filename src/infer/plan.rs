//! What a `gps-seg infer` job reads and writes, decided from its flags before anything runs:
//! the files it reads (named by the flag that named them, for `util::fs::IoPaths`), the
//! settings a `--run` supplies when a flag is absent (resize, threshold, output folder, saved
//! probability maps), and the row name of a plain folder's per-set table. The CLI parses the
//! flags into an [`InferPlan`] and reports; the decisions live here.

use super::input::Inputs;
use super::run::RunFolder;
use crate::data::pranet::SegLayout;
use crate::data::resize::Resize;
use crate::error::{Error, Result};
use crate::util::fs::IoPaths;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A run's exported models, re-exported by `infer --run` when older than its weights.
const RUN_EXPORTS: [&str; 6] = [
    "model.onnx",
    "model.onnx.data",
    "model_prompted.onnx",
    "model_prompted.onnx.data",
    "model_prompted_decoder.onnx",
    "model_prompted_decoder.onnx.data",
];

/// The paths and options of one job as the flags gave them (`None`: not given).
#[derive(Debug, Clone, Default)]
pub struct InferPlan {
    pub model: Option<PathBuf>,
    pub decoder: Option<PathBuf>,
    pub prompts: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    /// `--config`: a preset name or a config file.
    pub config: Option<String>,
    pub images: Option<PathBuf>,
    pub masks: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resize: Option<Resize>,
    pub threshold: Option<f32>,
    /// `--data`: must be the run's layout when given with `--run`.
    pub data: Option<SegLayout>,
    pub save_probs: bool,
}

impl InferPlan {
    /// The resize policy: the flag, else the run's, else squash.
    pub fn resize(&self, run: Option<&RunFolder>) -> Resize {
        self.resize
            .or(run.map(|r| r.view.resize))
            .unwrap_or_default()
    }

    /// The threshold: the flag, else the run's, else 0.5.
    pub fn threshold(&self, run: Option<&RunFolder>) -> f32 {
        self.threshold
            .or(run.map(|r| r.view.threshold))
            .unwrap_or(0.5)
    }

    /// Refuse a `--data` layout that is not the run's.
    pub fn check_layout(&self, run: Option<&RunFolder>) -> Result<()> {
        match (self.data, run) {
            (Some(d), Some(r)) if d != r.view.data => Err(Error::Config {
                field: "data".into(),
                msg: format!(
                    "--data {} but the run {} was trained on the {} layout",
                    d.name(),
                    r.dir.display(),
                    r.view.data.name()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Save the probability maps (and score the field's metrics on them): asked for, or
    /// implied by a PraNet run, whose per-set table is computed from the saved maps.
    pub fn save_probs(&self, run: Option<&RunFolder>) -> bool {
        self.save_probs || run.is_some_and(|r| r.view.data == SegLayout::Pranet)
    }

    /// The row name of a plain folder's per-set table: the `--images` folder's name.
    pub fn set_name(&self) -> String {
        self.images
            .as_deref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "images".into())
    }

    /// The output folder: `--out`, else `<run>/infer-<engine>` (`infer-onnxruntime-prompted`
    /// for a prompted job).
    pub fn out(
        &self,
        run: Option<&RunFolder>,
        engine_dir: &str,
        prompted: bool,
    ) -> Result<PathBuf> {
        match (&self.out, run) {
            (Some(o), _) => Ok(o.clone()),
            (None, Some(r)) if prompted => Ok(r.dir.join("infer-onnxruntime-prompted")),
            (None, Some(r)) => Ok(r.dir.join(format!("infer-{engine_dir}"))),
            (None, None) => Err(Error::Config {
                field: "out".into(),
                msg: "--out is required without --run".into(),
            }),
        }
    }

    /// Everything the job reads, each named by its flag: the files named, the input images'
    /// and masks' folders, what loading a model reads besides its file (external data, a task
    /// file's base), and a run's weights and records (its exports are replaceable); `out` as
    /// the output.
    pub fn io_paths(&self, run: Option<&RunFolder>, inputs: &Inputs, out: &Path) -> IoPaths {
        let mut io = IoPaths::new()
            .input_opt("--model", self.model.as_deref())
            .input_opt("--decoder", self.decoder.as_deref())
            .input_opt("--prompts", self.prompts.as_deref())
            .input_opt("--checkpoint", self.checkpoint.as_deref())
            .input_opt("--images", self.images.as_deref())
            .input_opt("--masks", self.masks.as_deref());
        if let Some(c) = self.config.as_deref().map(Path::new) {
            if c.is_file() {
                io = io.input("--config", c);
            }
        }
        let mut read_dirs = BTreeSet::new();
        for it in &inputs.items {
            for p in std::iter::once(&it.image).chain(it.mask.as_ref()) {
                if let Some(d) = p.parent() {
                    read_dirs.insert(d.to_path_buf());
                }
            }
        }
        for d in &read_dirs {
            io = io.input("(input images)", d);
        }
        for m in [self.model.as_deref(), self.decoder.as_deref()]
            .into_iter()
            .flatten()
        {
            for c in crate::onnx::integrity::companion_files(m) {
                io = io.input("--model (external data or base)", c);
            }
        }
        if let Some(r) = run {
            if let Ok(w) = r.weights() {
                io = io.input("--run (weights)", w);
            }
            for f in ["config.json", "split.json", "summary.json"] {
                io = io.input("--run", r.dir.join(f));
            }
            for f in RUN_EXPORTS {
                io = io.replaceable(r.dir.join(f));
            }
        }
        io.output("--out", out)
    }
}
