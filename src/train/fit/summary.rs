//! What every run reports, whatever its task: the run's [`RunSummary`] (`summary.json`: the
//! loop's numbers, then the task's own fields flattened in), and the curves the loop draws
//! after every epoch (`loss.png`, and the task's score per epoch, val and test).

use super::folder::smoothed_loss;
use crate::error::Result;
use crate::train::task::{Curves, EpochRecord};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `summary.json` of a run: what the loop measured, and the task's own part `X` (its metrics
/// at the chosen epoch, the merged weights…), whose fields read as the summary's own
/// (`summary.best_acc`, through `Deref`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary<X> {
    /// `gps`, `gps-ce`, `full`, …
    pub method: String,
    pub trainable: usize,
    pub total: usize,
    pub trainable_pct: f64,
    /// How the epoch was chosen: `"val"`, or `"last"` when the run has no validation split
    /// (a protocol's final stage: nothing chosen). The test split never chooses.
    pub selected_on: String,
    /// The epoch with the best validation score (0: the base model, untrained).
    pub best_epoch: Option<usize>,
    pub train_images: usize,
    pub val_images: usize,
    pub test_images: usize,
    /// Seconds spent selecting (gradient pass + ranking), 0 for whole-tensor methods.
    #[serde(default)]
    pub selection_seconds: f64,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub peak_rss_mb: f64,
    pub run_dir: PathBuf,
    #[serde(flatten)]
    pub task: X,
}

impl<X> std::ops::Deref for RunSummary<X> {
    type Target = X;
    fn deref(&self) -> &X {
        &self.task
    }
}

/// `loss.png` (smoothed loss per step) and the score chart (val and test per epoch).
pub fn draw<E>(
    run_dir: &Path,
    curves: Curves,
    history: &[EpochRecord<E>],
    step_losses: &[f32],
    score: impl Fn(&E) -> f64,
) -> Result<()> {
    use crate::util::draw::{line_chart, save_png, Series};
    let loss = line_chart(
        &format!("TRAINING LOSS ({})", curves.loss.to_uppercase()),
        "STEP",
        &[Series {
            name: "loss",
            points: smoothed_loss(step_losses),
        }],
        720,
        400,
    );
    save_png(&run_dir.join("loss.png"), &loss)?;
    let per_epoch = |f: &dyn Fn(&EpochRecord<E>) -> f64| -> Vec<(f64, f64)> {
        history.iter().map(|r| (r.epoch as f64, f(r))).collect()
    };
    let (val_name, test_name) = (
        format!("val {}", curves.score),
        format!("test {}", curves.score),
    );
    let chart = line_chart(
        &format!(
            "{} PER EPOCH (VAL CHOOSES; TEST IS ONLY SCORED)",
            curves.score.to_uppercase()
        ),
        "EPOCH",
        &[
            Series {
                name: &val_name,
                points: per_epoch(&|r| score(&r.val)),
            },
            Series {
                name: &test_name,
                points: per_epoch(&|r| score(&r.test)),
            },
        ],
        720,
        400,
    );
    save_png(&run_dir.join(curves.file), &chart)
}
