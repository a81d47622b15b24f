//! Evaluating a training run folder (`gps-seg infer --run runs/NAME`): its held-out split
//! (`split.json`, capped by the run's `test_limit` exactly as training evaluated it), its data
//! folder, resize policy and threshold (`config.json`), and its best merged weights
//! (`merged.safetensors`), exported to `<run>/model.onnx` on first use. A PraNet run's held-out
//! images are every test set present, each capped at `test_limit`, with set-qualified ids
//! (`Kvasir/<id>`, [`PranetDataset::test_pairs`], as training took them): its job scores the
//! per-set table.
//!
//! The run's files are read as data (a view of the fields inference needs), so inference does
//! not depend on the training code.

use super::input::{self, Candidate, Inputs};
use crate::data::kvasir::{KvasirDataset, KvasirEntry, Split};
use crate::data::pranet::{PranetDataset, SegLayout};
use crate::data::prompts::PromptSpec;
use crate::data::resize::Resize;
use crate::error::{Error, Result};
use crate::onnx::sam::{
    export_image_encoder, export_prompt_free, export_prompted_decoder, SamExportOptions,
};
use crate::progress::{Event, Observer};
use crate::sam::SamConfig;
use crate::util::fs::read_json;
use serde::Deserialize;
use std::path::{Path, PathBuf};

fn default_threshold() -> f32 {
    0.5
}

/// The fields of a run's `config.json` that inference needs.
#[derive(Debug, Clone, Deserialize)]
pub struct RunView {
    pub data_dir: PathBuf,
    pub sam: SamConfig,
    #[serde(default)]
    pub resize: Resize,
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    #[serde(default)]
    pub test_limit: Option<usize>,
    /// The run's prompts (`none` for prompt-free runs and runs written before prompts).
    #[serde(default)]
    pub prompt: PromptSpec,
    /// The run's seed: its fixed evaluation prompts are drawn with it.
    #[serde(default)]
    pub seed: u64,
    /// The data folder's layout (`kvasir` for runs written before layouts).
    #[serde(default)]
    pub data: SegLayout,
}

/// An opened run folder.
#[derive(Debug, Clone)]
pub struct RunFolder {
    pub dir: PathBuf,
    pub view: RunView,
}

impl RunFolder {
    /// Read `<dir>/config.json`.
    pub fn open(dir: &Path) -> Result<RunFolder> {
        let cfg = dir.join("config.json");
        if !cfg.is_file() {
            return Err(Error::io(
                &cfg,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a training run folder (no config.json)",
                ),
            ));
        }
        let view: RunView = read_json(&cfg)?;
        Ok(RunFolder {
            dir: dir.to_path_buf(),
            view,
        })
    }

    /// The test images of the run's split (in split order, first `test_limit`), with masks,
    /// header-checked. `data_dir` overrides the folder recorded in `config.json`.
    pub fn test_inputs(&self, data_dir: Option<&Path>) -> Result<Inputs> {
        let data = data_dir.unwrap_or(&self.view.data_dir);
        let split_path = self.dir.join("split.json");
        let split = Split::read_json(&split_path)?;
        let entries: Vec<KvasirEntry> = match self.view.data {
            SegLayout::Kvasir => {
                let ds = KvasirDataset::open(data)?;
                let mut idx = ds.indices_of(&split.test, &split_path.display().to_string())?;
                if let Some(n) = self.view.test_limit {
                    idx.truncate(n);
                }
                idx.into_iter().map(|i| ds.entries[i].clone()).collect()
            }
            SegLayout::Pranet => {
                let entries = PranetDataset::open(data)?.test_pairs(self.view.test_limit);
                // The data folder must still hold the run's test sets: every pair is one the
                // run's split lists.
                let known: std::collections::BTreeSet<&str> =
                    split.test.iter().map(|s| s.as_str()).collect();
                if let Some(e) = entries.iter().find(|e| !known.contains(e.id.as_str())) {
                    return Err(Error::Data {
                        msg: format!(
                            "{}: test pair `{}` is not in the run's split {}; is this the \
                             data folder the run was trained with?",
                            data.display(),
                            e.id,
                            split_path.display()
                        ),
                    });
                }
                entries
            }
        };
        let candidates = entries
            .into_iter()
            .map(|e| Candidate {
                id: e.id,
                image: e.image_path,
                mask: Some(e.mask_path),
            })
            .collect();
        Ok(input::check(candidates, Vec::new()))
    }

    /// The run's merged weights: `merged.safetensors`, else the `merged` path of
    /// `summary.json` (a zero-shot run points at its base checkpoint).
    pub fn weights(&self) -> Result<PathBuf> {
        let p = self.dir.join("merged.safetensors");
        if p.is_file() {
            return Ok(p);
        }
        let summary = self.dir.join("summary.json");
        if summary.is_file() {
            let v: serde_json::Value = read_json(&summary)?;
            if let Some(m) = v.get("merged").and_then(|m| m.as_str()) {
                let m = PathBuf::from(m);
                if m.is_file() {
                    return Ok(m);
                }
            }
        }
        Err(Error::io(
            &p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no merged weights (has the run finished?)",
            ),
        ))
    }

    /// `<run>/model.onnx`, exported from [`RunFolder::weights`] (normalisation in-graph) when
    /// missing or older than the weights; says so through `obs`.
    pub fn ensure_onnx(&self, obs: &mut dyn Observer) -> Result<PathBuf> {
        let model = self.dir.join("model.onnx");
        let weights = self.weights()?;
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let fresh = model.is_file()
            && match (mtime(&model), mtime(&weights)) {
                (Some(m), Some(w)) => m >= w,
                _ => true,
            };
        if fresh {
            return Ok(model);
        }
        obs.event(Event::Info(format!(
            "exporting {} → {} (prompt-free SAM, normalisation in-graph)",
            weights.display(),
            model.display()
        )));
        export_onnx(&weights, &self.view.sam, &model)?;
        Ok(model)
    }
}

impl RunFolder {
    /// `<run>/model_prompted.onnx` (image encoder, normalisation in-graph) and
    /// `<run>/model_prompted_decoder.onnx` (prompted decoder), exported from
    /// [`RunFolder::weights`] when missing or older than the weights.
    pub fn ensure_prompted_onnx(&self, obs: &mut dyn Observer) -> Result<(PathBuf, PathBuf)> {
        let enc = self.dir.join("model_prompted.onnx");
        let dec = self.dir.join("model_prompted_decoder.onnx");
        let weights = self.weights()?;
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let fresh = |m: &Path| {
            m.is_file()
                && match (mtime(m), mtime(&weights)) {
                    (Some(m), Some(w)) => m >= w,
                    _ => true,
                }
        };
        if fresh(&enc) && fresh(&dec) {
            return Ok((enc, dec));
        }
        obs.event(Event::Info(format!(
            "exporting {} → {} + {} (prompted SAM: image encoder + prompted decoder)",
            weights.display(),
            enc.display(),
            dec.display()
        )));
        let cfg = &self.view.sam;
        let map = crate::sam::load_weights(&weights, cfg, &candle_core::Device::Cpu)?;
        let (m, _) = export_image_encoder(cfg, &map, SamExportOptions::default())?;
        crate::onnx::write_model(&enc, m)?;
        let (m, _) = export_prompted_decoder(cfg, &map)?;
        crate::onnx::write_model(&dec, m)?;
        Ok((enc, dec))
    }
}

/// Export `weights` for `cfg` as the prompt-free graph to `out` (atomic).
pub fn export_onnx(weights: &Path, cfg: &SamConfig, out: &Path) -> Result<()> {
    let map = crate::sam::load_weights(weights, cfg, &candle_core::Device::Cpu)?;
    let (model, _) = export_prompt_free(cfg, &map, SamExportOptions::default())?;
    crate::onnx::write_model(out, model)?;
    Ok(())
}

/// Training's best held-out report from `<run>/summary.json` (`best.mdice`, `best.miou`), for
/// comparison; `None` when the run has no summary.
pub fn training_best(run_dir: &Path) -> Result<Option<(f64, f64)>> {
    let p = run_dir.join("summary.json");
    if !p.is_file() {
        return Ok(None);
    }
    let v: serde_json::Value = read_json(&p)?;
    let best = &v["best"];
    Ok(best["mdice"].as_f64().zip(best["miou"].as_f64()))
}
