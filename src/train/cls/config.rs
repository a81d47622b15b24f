//! A classification run's settings ([`ClsTrainConfig`], written to `<run>/config.json`), its
//! selection loss, per-epoch metrics and summary.

use crate::data::augment::ClsAugment;
use crate::data::classification::ClsLayout;
use crate::error::{Error, Result};
use crate::models::ClassifierConfig;
use crate::train::config::{Method, TrainCore};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The loss whose gradients rank the entries (GPS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SelectLoss {
    /// Head-free supervised contrastive loss on two augmented views (the GPS recipe).
    #[value(name = "supcon")]
    SupCon,
    /// Cross-entropy through the freshly initialised head (the paper's ablation).
    #[value(alias = "cross-entropy")]
    Ce,
}

impl SelectLoss {
    pub fn name(self) -> &'static str {
        match self {
            SelectLoss::SupCon => "supcon",
            SelectLoss::Ce => "ce",
        }
    }
}

impl std::str::FromStr for SelectLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        <SelectLoss as clap::ValueEnum>::from_str(s, true).map_err(|_| Error::Config {
            field: "select_loss".into(),
            msg: format!("`{s}` is not one of supcon, ce"),
        })
    }
}

/// Everything a classification run depends on; written to `<run>/config.json` (one flat
/// object: the core's fields, then these).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClsTrainConfig {
    #[serde(flatten)]
    pub core: TrainCore,
    pub layout: ClsLayout,
    /// Architecture; its head is resized to the dataset's class count.
    pub model: ClassifierConfig,
    pub select_loss: SelectLoss,
    /// SupCon temperature.
    pub temperature: f64,
    /// Linear warm-up length in epochs (counted in steps).
    pub warmup_epochs: usize,
    /// Training augmentation.
    pub augment: ClsAugment,
    /// VTAB-1k's final stage: train on `train800val200`, choose nothing, score the *last*
    /// epoch on test (after settings were chosen on `train800` → `val200`).
    #[serde(default)]
    pub final_stage: bool,
}

/// The core's fields read and set as the config's own (`cfg.epochs`, `cfg.lr = …`).
impl std::ops::Deref for ClsTrainConfig {
    type Target = TrainCore;
    fn deref(&self) -> &TrainCore {
        &self.core
    }
}

impl std::ops::DerefMut for ClsTrainConfig {
    fn deref_mut(&mut self) -> &mut TrainCore {
        &mut self.core
    }
}

impl ClsTrainConfig {
    /// The GPS classification recipe for `data_dir` (VTAB-style: 100 epochs, 10 warm-up,
    /// lr 1e-3 cosine, batch 32, SupCon selection at T = 0.07, K = 1).
    pub fn recipe(
        data_dir: PathBuf,
        layout: ClsLayout,
        base: Option<PathBuf>,
        model: ClassifierConfig,
    ) -> Self {
        ClsTrainConfig {
            core: TrainCore {
                data_dir,
                base,
                method: Method::Gps,
                topk: 1,
                level: crate::gps::select::Level::Neuron,
                epochs: 100,
                lr: 1e-3,
                min_lr: 1e-8,
                weight_decay: 0.05,
                batch_size: 32,
                eval_batch_size: 64,
                seed: 42,
                split_seed: None,
                select_batches: None,
                test_fraction: 0.2,
                val_fraction: crate::train::config::default_val_fraction(),
                train_limit: None,
                test_limit: None,
                max_steps_per_epoch: None,
                keep_last: 2,
            },
            layout,
            model,
            select_loss: SelectLoss::SupCon,
            temperature: 0.07,
            warmup_epochs: 10,
            augment: ClsAugment::default(),
            final_stage: false,
        }
    }

    /// The run's method label: `gps`, `gps-ce` (CE selection), or the baseline's name.
    pub fn label(&self) -> String {
        match (self.method, self.select_loss) {
            (Method::Gps, SelectLoss::Ce) => "gps-ce".into(),
            (m, _) => m.name().into(),
        }
    }
}

/// The held-out metrics of one epoch (fields of a `metrics.jsonl` record).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClsEval {
    /// Top-1 accuracy on the held-out split.
    pub test_acc: f64,
    /// Mean cross-entropy on the held-out split.
    pub test_loss: f64,
}

/// One epoch's record (a line of `metrics.jsonl`).
pub type EpochRecord = crate::train::task::EpochRecord<ClsEval>;

/// What a checkpoint's `state.json` holds besides tensors.
pub type TrainState = crate::train::fit::folder::TrainState<EpochRecord>;

/// The classification part of a run's `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClsSummary {
    pub topk: usize,
    /// Validation top-1 at the chosen epoch.
    pub val_acc: f64,
    /// Test top-1 at the chosen epoch (the shipped model) and at the last epoch.
    pub best_acc: f64,
    pub last_acc: f64,
    /// Merged weights of the best epoch (`model.json` beside it holds the config).
    pub merged: PathBuf,
}

/// A classification run's `summary.json`.
pub type ClsRunSummary = crate::train::fit::summary::RunSummary<ClsSummary>;
