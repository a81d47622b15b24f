//! What every training run shares: the [`Method`] vocabulary (mapped to roles by each task)
//! and the config core ([`TrainCore`]: data, base, method, budget, schedule, batches, seeds,
//! limits), validated once. Task configs (`seg::SegTrainConfig`, `cls::ClsTrainConfig`)
//! flatten the core (`#[serde(flatten)]`, so `config.json` keeps one flat object) and add their
//! own fields.

use crate::error::{Error, Result};
use crate::gps::select::{Criterion, Level};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What trains. Each task supports a subset ([`crate::train::task::Task::METHODS`]) and
/// refuses the others by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// GPS: top-K |selection gradient| per neuron; the task's policy says what else trains.
    Gps,
    /// Every parameter (AdamW).
    Full,
    /// Same policy and budget as GPS, entries chosen at random (seeded).
    Random,
    /// Same policy and budget as GPS, entries with the largest |w|.
    Magnitude,
    /// No tuning: evaluate the base model (routed to [`crate::train::fit::evaluate`]).
    #[value(alias = "zeroshot", alias = "none")]
    ZeroShot,
    /// Segmentation: SAM's mask decoder only.
    Decoder,
    /// Classification: the head only (linear probing).
    #[value(alias = "head")]
    Linear,
    /// Classification: BitFit, every bias plus the head.
    #[value(alias = "bitfit")]
    Bias,
    /// SAM: everything GPS trains except the selected entries (mask decoder, prompt encoder,
    /// encoder biases): the baseline that isolates what the selected entries add.
    #[value(name = "decoder+bias", alias = "decoder-bias")]
    #[serde(rename = "decoder+bias")]
    DecoderBias,
    /// SAM: GPS's selected encoder entries and encoder biases only (decoder frozen).
    #[value(name = "gps-encoder", alias = "gps-encoder-only")]
    #[serde(rename = "gps-encoder")]
    GpsEncoder,
}

impl Method {
    pub const ALL: [&'static str; 10] = [
        "gps",
        "full",
        "random",
        "magnitude",
        "zero-shot",
        "decoder",
        "linear",
        "bias",
        "decoder+bias",
        "gps-encoder",
    ];

    /// The selection criterion of the sparse methods.
    pub fn criterion(self) -> Option<Criterion> {
        match self {
            Method::Gps | Method::GpsEncoder => Some(Criterion::Gradient),
            Method::Random => Some(Criterion::Random),
            Method::Magnitude => Some(Criterion::Magnitude),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Gps => "gps",
            Method::Full => "full",
            Method::Random => "random",
            Method::Magnitude => "magnitude",
            Method::ZeroShot => "zero-shot",
            Method::Decoder => "decoder",
            Method::Linear => "linear",
            Method::Bias => "bias",
            Method::DecoderBias => "decoder+bias",
            Method::GpsEncoder => "gps-encoder",
        }
    }

    /// `Err` naming the method and the task's choices when `self` is not in `supported`.
    pub fn check_in(self, supported: &[Method], task: &str) -> Result<()> {
        if supported.contains(&self) {
            return Ok(());
        }
        let names: Vec<&str> = supported.iter().map(|m| m.name()).collect();
        Err(Error::Config {
            field: "method".into(),
            msg: format!(
                "`{}` does not apply to {task} (one of {})",
                self.name(),
                names.join(", ")
            ),
        })
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        <Method as clap::ValueEnum>::from_str(s, true).map_err(|_| Error::Config {
            field: "method".into(),
            msg: format!("`{s}` is not one of {}", Method::ALL.join(", ")),
        })
    }
}

/// The settings every task has; written (flattened) into `<run>/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainCore {
    /// Dataset root.
    pub data_dir: PathBuf,
    /// Base checkpoint (None: fresh random init — tests only).
    pub base: Option<PathBuf>,
    pub method: Method,
    /// GPS K (entries per neuron); also the budget of random/magnitude.
    pub topk: usize,
    pub level: Level,
    pub epochs: usize,
    pub lr: f64,
    /// Floor of the cosine schedule (≤ lr).
    pub min_lr: f64,
    /// AdamW decay for `full` (the other methods use plain Adam, which never moves a frozen
    /// entry).
    pub weight_decay: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
    /// Seed of the data split when it must stay fixed while `seed` varies (experiments over
    /// seeds score every seed on the same test images); `None`: `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// Batches whose gradients rank entries (capped at one pass over the training set).
    pub select_batches: Option<usize>,
    /// Test fraction of a seeded split (data without split files).
    pub test_fraction: f64,
    /// Validation fraction carved (seeded) from the training data when the data brings no
    /// validation split of its own; the best epoch is chosen on it.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Use at most this many training / test images (quick runs).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Optimiser steps per epoch cap (quick runs); None = whole epoch.
    pub max_steps_per_epoch: Option<usize>,
    /// Optimiser steps of the whole run (a step-scheduled run whose last epoch is shorter,
    /// e.g. pretraining on a stream); None = every epoch whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<usize>,
    /// How many epoch checkpoints to keep (the best epoch's is kept too).
    pub keep_last: usize,
}

/// The default validation share of the training data (10%).
pub fn default_val_fraction() -> f64 {
    0.1
}

fn bad(field: &str, msg: impl Into<String>) -> Result<()> {
    Err(Error::Config {
        field: field.into(),
        msg: msg.into(),
    })
}

impl TrainCore {
    /// Refuse out-of-range values before any work starts; errors name the field (and the
    /// flag where one sets it).
    pub fn validate(&self) -> Result<()> {
        if self.topk == 0 {
            return bad("topk", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(
                "min_lr",
                format!(
                    "--min-lr {:e} must be in [0, --lr {:e}]",
                    self.min_lr, self.lr
                ),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be a non-negative number");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.eval_batch_size == 0 {
            return bad("eval_batch_size", "must be at least 1");
        }
        if self.epochs == 0 && self.method != Method::ZeroShot {
            return bad("epochs", "must be at least 1");
        }
        if self.select_batches == Some(0) {
            return bad("select_batches", "must be at least 1");
        }
        if self.total_steps == Some(0) {
            return bad("total_steps", "must be at least 1");
        }
        if self.max_steps_per_epoch == Some(0) {
            return bad(
                "max_steps_per_epoch",
                "--max-steps must be at least 1 (an epoch without a step trains nothing)",
            );
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return bad("val_fraction", "must be in (0, 1)");
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return bad("test_fraction", "must be in (0, 1)");
        }
        // An empty `data_dir`: the task reads no folder (a generated stream, e.g. pretraining).
        if !self.data_dir.as_os_str().is_empty() {
            crate::util::fs::require_dir(&self.data_dir, "data folder")?;
        }
        if let Some(b) = &self.base {
            crate::util::fs::require_file(b, "base checkpoint")?;
        }
        Ok(())
    }

    /// The default `min_lr` clamped to `lr` (a user who lowers `--lr` below the default floor
    /// without naming `--min-lr` gets a constant-floor schedule, not an error).
    pub fn min_lr_or_default(&self, explicit: Option<f64>) -> f64 {
        explicit.unwrap_or(self.min_lr.min(self.lr))
    }

    /// The base checkpoint's file name for the artifact (`fresh-init` without one).
    pub fn base_file(&self) -> String {
        self.base
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fresh-init".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_with_aliases_and_refuse_unknown() {
        for m in Method::ALL {
            assert_eq!(m.parse::<Method>().unwrap().name(), m);
        }
        assert_eq!("bitfit".parse::<Method>().unwrap(), Method::Bias);
        assert_eq!("zeroshot".parse::<Method>().unwrap(), Method::ZeroShot);
        let e = "lora".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("method") && e.contains("decoder"), "{e}");
        let e = Method::Decoder
            .check_in(&[Method::Gps, Method::Linear], "classification")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`decoder`") && e.contains("gps, linear"), "{e}");
    }
}
