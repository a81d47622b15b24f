//! The embedded default, end to end: a synthetic Kvasir-shaped set → GPS selection and masked
//! fine-tuning of the shipped pretrained `sam-tiny` (with the zero-shot base as reference) →
//! merge → ONNX export → batch inference through ONNX Runtime on the held-out split, whose mDice
//! must equal training's evaluation. This is what `gps-seg demo` runs.

use crate::data::synth_kvasir::SynthKvasirConfig;
use crate::error::{Error, Result};
use crate::infer::{self, InferOptions, OrtEngine, RunFolder};
use crate::metrics::SegReport;
use crate::progress::{Event, Observer};
use crate::train::config::Method;
use crate::train::fit::folder::clear_for_run;
use crate::train::seg::{self, RunSummary, SegTrainConfig};
use crate::util::fs::IoPaths;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// Demo settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoConfig {
    /// Data folder; generated when it has no `images/`.
    pub data_dir: PathBuf,
    /// Synthetic images to generate (when generating).
    pub count: usize,
    /// Largest side of generated images.
    pub max_side: usize,
    /// `--model` spec (preset with shipped weights, or a checkpoint path).
    pub model: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub topk: usize,
    pub seed: u64,
    /// Cap on optimiser steps per epoch and on test images (quick runs).
    pub max_steps_per_epoch: Option<usize>,
    pub test_limit: Option<usize>,
    pub out: PathBuf,
    /// Replace the `zero-shot/` and `gps/` runs of an earlier demo in `out` (otherwise an
    /// earlier run there is refused, never deleted).
    #[serde(default)]
    pub overwrite: bool,
}

impl DemoConfig {
    /// The default demo: a few minutes on 2 cores.
    pub fn standard() -> Self {
        DemoConfig {
            data_dir: PathBuf::from("data/synth-kvasir-demo"),
            count: 400,
            max_side: 512,
            model: "tiny".into(),
            epochs: 6,
            batch_size: 4,
            lr: 1e-3,
            topk: 1,
            seed: 7,
            max_steps_per_epoch: None,
            test_limit: None,
            out: PathBuf::from("runs/demo"),
            overwrite: false,
        }
    }

    /// A shortened run for CI (a minute or two).
    pub fn quick() -> Self {
        DemoConfig {
            data_dir: PathBuf::from("data/synth-kvasir-quick"),
            count: 60,
            epochs: 1,
            max_steps_per_epoch: Some(6),
            test_limit: Some(8),
            out: PathBuf::from("runs/demo-quick"),
            ..Self::standard()
        }
    }

    /// The GPS run's settings: the recipe on the demo's data, model and budget.
    pub fn train_config(&self) -> Result<SegTrainConfig> {
        let (base, sam) = crate::registry::resolve_sam(&self.model, None)?;
        let mut tc = SegTrainConfig::recipe(self.data_dir.clone(), Some(base), sam);
        tc.epochs = self.epochs;
        tc.batch_size = self.batch_size;
        tc.lr = self.lr;
        tc.topk = self.topk;
        tc.seed = self.seed;
        tc.max_steps_per_epoch = self.max_steps_per_epoch;
        tc.test_limit = self.test_limit;
        tc.select_batches = None;
        Ok(tc)
    }
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    pub zero_shot: SegReport,
    pub gps: RunSummary,
    pub onnx: PathBuf,
    pub ort: SegReport,
    pub ort_images_per_s: f64,
    pub seconds: f64,
}

/// The demo's synthetic set (made once, then reused).
pub fn ensure_data(cfg: &DemoConfig, obs: &mut dyn Observer) -> Result<()> {
    let settings = SynthKvasirConfig {
        count: cfg.count,
        seed: cfg.seed,
        max_side: cfg.max_side,
        ..Default::default()
    };
    crate::data::synth_kvasir::ensure(&cfg.data_dir, &settings, obs)?;
    Ok(())
}

/// Run the whole chain. Fails if the ONNX Runtime mDice differs from training's by > 1e-3.
pub fn demo(cfg: &DemoConfig, device: &Device, obs: &mut dyn Observer) -> Result<DemoReport> {
    let t0 = Instant::now();
    let model_path = std::path::Path::new(&cfg.model);
    IoPaths::new()
        .input("the demo data folder", &cfg.data_dir)
        .input_opt("--model", model_path.exists().then_some(model_path))
        .output("--out", &cfg.out)
        .check()?;
    let zs_dir = cfg.out.join("zero-shot");
    let gps_dir = cfg.out.join("gps");
    for d in [&zs_dir, &gps_dir] {
        clear_for_run(d, cfg.overwrite, "--out")?;
    }
    ensure_data(cfg, obs)?;
    let tc = cfg.train_config()?;
    obs.event(Event::Info(format!(
        "model: {} ({}, {}×{} input)",
        tc.base
            .as_ref()
            .map_or(String::new(), |b| b.display().to_string()),
        tc.sam.name,
        tc.sam.image_size,
        tc.sam.image_size
    )));

    // Zero-shot reference: the pretrained model, untouched.
    let mut zc = tc.clone();
    zc.method = Method::ZeroShot;
    obs.event(Event::Info(
        "zero-shot: evaluating the pretrained model".into(),
    ));
    let zs = seg::train(&zc, &zs_dir, device, false, obs)?;

    obs.event(Event::Info(format!(
        "gps: select K={} per neuron, then masked fine-tuning for {} epoch(s)",
        cfg.topk, cfg.epochs
    )));
    let gps = seg::train(&tc, &gps_dir, device, false, obs)?;

    // Export + ONNX Runtime inference on the run's held-out split.
    let run = RunFolder::open(&gps_dir)?;
    let onnx = run.ensure_onnx(obs)?;
    let inputs = run.test_inputs(None)?;
    inputs.require_clean(false)?;
    let engine = OrtEngine::load(&onnx, 0, None, obs)?;
    let mut opts = InferOptions::new(gps_dir.join("infer-ort"));
    opts.resize = run.view.resize;
    opts.threshold = run.view.threshold;
    let (r, _) = infer::infer(&engine, &inputs, &opts, obs)?;
    let ort = r
        .metrics
        .clone()
        .ok_or_else(|| Error::msg("ONNX Runtime inference produced no metrics (no masks?)"))?;
    let diff = (ort.mdice - gps.best.mdice).abs();
    if diff > 1e-3 {
        return Err(Error::msg(format!(
            "ONNX Runtime mDice {:.4} differs from training's evaluation {:.4} by {diff:.2e}",
            ort.mdice, gps.best.mdice
        )));
    }
    let report = DemoReport {
        zero_shot: zs.task.best,
        gps,
        onnx,
        ort,
        ort_images_per_s: r.images_per_s,
        seconds: t0.elapsed().as_secs_f64(),
    };
    crate::util::fs::write_json_atomic(&cfg.out.join("demo.json"), &report)?;
    Ok(report)
}
