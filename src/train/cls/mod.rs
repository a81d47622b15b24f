//! The classification task: a ViT or ConvNeXt on an image-classification layout. [`config`]
//! (the run's settings, selection loss, metrics, summary), [`data`] (layouts, splits, loaders,
//! the model and its base weights), [`task`] (the [`crate::train::task::Task`] implementation).

pub mod config;
pub mod data;
pub mod task;

pub use crate::train::config::Method;
pub use config::{
    ClsEval, ClsRunSummary, ClsSummary, ClsTrainConfig, EpochRecord, SelectLoss, TrainState,
};
pub use data::{base_weights, resolve_model, with_classes, ClsData, SeededSplit, CACHE_BYTES};
pub use task::{baseline_roles, evaluate, evaluate_per_image, selection_loss, train};
