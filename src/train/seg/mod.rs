//! The segmentation task: SAM on Kvasir-shaped data, prompt-free (GPS's recipe) or prompted.
//! [`config`] (the run's settings, metrics and summary), [`data`] (dataset, split, loaders,
//! base weights), [`task`] (the [`crate::train::task::Task`] implementation, evaluation,
//! overlays), [`prompted`] (the prompted loss and predictions, `--prompt`).

pub mod config;
pub mod data;
pub mod prompted;
pub mod task;

pub use crate::train::config::Method;
pub use config::{EpochRecord, RunSummary, SegEval, SegSummary, SegTrainConfig, TrainState};
pub use data::{base_weights, SegData};
pub use task::{evaluate, predict_probs, select, train, Kept};
