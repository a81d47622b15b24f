//! Pretraining the project's small ViT classifier on the synthetic UPSTREAM classification set
//! ([`crate::data::synth_cls`], class = shape × colour), so that GPS has a *pretrained*
//! backbone to adapt to the downstream set (class = texture × shape).
//!
//! This is ordinary supervised pretraining with cross-entropy, run through the classification
//! trainer ([`super::cls::train`], method `full`: AdamW, warm-up + cosine, an epoch-level
//! checkpoint, resume, metrics and curves in `<out>.run/`). The generated data lives in
//! `<data_dir>` (re-used when its `synth.json` matches). The result is `<out>.safetensors`
//! (the best epoch's weights, timm names, head included) and `<out>.json` (its
//! [`ClassifierConfig`]); a downstream run re-initialises the head for its own classes.

use crate::data::classification::ClsLayout;
use crate::data::synth_cls::{self, SynthClsConfig, SynthKind, SynthLayout};
use crate::error::{Error, Result};
use crate::models::{ClassifierConfig, VitConfig};
use crate::train::cls::{self, ClsRunSummary, ClsTrainConfig, Method};
use crate::train::observer::{Event, Observer};
use crate::util::fs::{read_json, write_json_atomic};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Pretraining settings (written into `<out>.run/config.json` via the trainer).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainVitConfig {
    /// The architecture (its head is sized to `classes`).
    pub model: ClassifierConfig,
    /// Upstream classes (≤ 56 = 7 shapes × 8 colours).
    pub classes: usize,
    /// Training images per class (80% train, 20% val; both used for training).
    pub per_class: usize,
    /// Held-out images per class (the upstream validation accuracy).
    pub test_per_class: usize,
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub seed: u64,
    /// Where the upstream set is generated (re-used if it matches).
    pub data_dir: PathBuf,
}

impl PretrainVitConfig {
    /// The default short run: `vit_tiny_cpu` at 32 px (patch 8 → 16 tokens), all 56 upstream
    /// classes × 30 training images (+ 5 held out), 6 epochs of batch 32, AdamW lr 1e-3:
    /// about 10 k training images seen, ≈ 3 minutes of 2 free cores (longer on a shared machine).
    pub fn new(data_dir: PathBuf) -> Self {
        PretrainVitConfig {
            model: ClassifierConfig::Vit(VitConfig::tiny().with_image_size(32)),
            classes: synth_cls::max_classes(SynthKind::Upstream),
            per_class: 30,
            test_per_class: 5,
            epochs: 6,
            warmup_epochs: 1,
            lr: 1e-3,
            weight_decay: 0.05,
            batch_size: 32,
            seed: 0,
            data_dir,
        }
    }

    fn synth(&self) -> SynthClsConfig {
        SynthClsConfig {
            classes: self.classes,
            per_class: self.per_class,
            test_per_class: self.test_per_class,
            layout: SynthLayout::Vtab,
            kind: SynthKind::Upstream,
            size: self.model.image_size(),
            seed: self.seed,
        }
    }
}

/// What a finished pretraining reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainVitSummary {
    pub config: PretrainVitConfig,
    /// The trainer's summary (best / last upstream held-out top-1, time, memory).
    pub run: ClsRunSummary,
    /// Seconds spent generating the upstream set (0 when re-used).
    pub data_seconds: f64,
    pub weights: PathBuf,
    pub config_file: PathBuf,
}

/// Generate the upstream set in `cfg.data_dir` unless a matching one is there.
/// Returns the seconds spent (0 when re-used).
pub fn upstream_data(cfg: &PretrainVitConfig, obs: &mut dyn Observer) -> Result<f64> {
    let marker = cfg.data_dir.join("synth.json");
    let want = serde_json::to_value(cfg.synth()).map_err(|e| Error::msg(e.to_string()))?;
    if marker.is_file() {
        let have: serde_json::Value = read_json(&marker)?;
        if have == want {
            obs.event(Event::Info(format!(
                "upstream data: re-using {}",
                cfg.data_dir.display()
            )));
            return Ok(0.0);
        }
        return Err(Error::Config {
            field: "data_dir".into(),
            msg: format!(
                "{} holds a synthetic set made with other settings; remove it or choose another folder",
                cfg.data_dir.display()
            ),
        });
    }
    let t = std::time::Instant::now();
    let n = synth_cls::generate(&cfg.data_dir, &cfg.synth())?;
    write_json_atomic(&marker, &cfg.synth())?;
    obs.event(Event::Info(format!(
        "upstream data: generated {n} images ({} classes, {} px) in {}",
        cfg.classes,
        cfg.model.image_size(),
        cfg.data_dir.display()
    )));
    Ok(t.elapsed().as_secs_f64())
}

/// Pretrain (or resume) into `out`: `<out>.safetensors`, `<out>.json`, run folder `<out>.run/`.
pub fn pretrain_vit(
    cfg: &PretrainVitConfig,
    out: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<PretrainVitSummary> {
    cfg.model.validate()?;
    let data_seconds = upstream_data(cfg, obs)?;
    let mut tc = ClsTrainConfig::recipe(
        cfg.data_dir.clone(),
        ClsLayout::Vtab,
        None,
        cls::with_classes(&cfg.model, cfg.classes),
    );
    tc.method = Method::Full;
    tc.epochs = cfg.epochs;
    tc.warmup_epochs = cfg.warmup_epochs;
    tc.lr = cfg.lr;
    tc.min_lr = cfg.lr * 1e-2;
    tc.weight_decay = cfg.weight_decay;
    tc.batch_size = cfg.batch_size;
    tc.eval_batch_size = 128;
    tc.seed = cfg.seed;
    tc.keep_last = 1;
    let run_dir = out.with_extension("run");
    let run = cls::train(&tc, &run_dir, device, resume, obs)?;
    let weights = out.with_extension("safetensors");
    let bytes = std::fs::read(&run.merged).map_err(|e| Error::io(&run.merged, e))?;
    crate::util::fs::write_atomic(&weights, &bytes)?;
    let config_file = out.with_extension("json");
    let model: ClassifierConfig = read_json(&run_dir.join("model.json"))?;
    write_json_atomic(&config_file, &model)?;
    let summary = PretrainVitSummary {
        config: cfg.clone(),
        run,
        data_seconds,
        weights,
        config_file,
    };
    write_json_atomic(&run_dir.join("pretrain_summary.json"), &summary)?;
    Ok(summary)
}
