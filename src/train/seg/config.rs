//! A segmentation run's settings ([`SegTrainConfig`], written to `<run>/config.json`), its
//! per-epoch metrics and its summary.

pub use crate::data::pranet::SegLayout;
use crate::data::prompts::PromptSpec;
use crate::data::resize::Resize;
use crate::metrics::{SegReport, SetRow};
use crate::nn::Precision;
use crate::sam::SamConfig;
use crate::train::config::{Method, TrainCore};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything a segmentation run depends on; written to `<run>/config.json` (one flat object:
/// the core's fields, then these).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegTrainConfig {
    #[serde(flatten)]
    pub core: TrainCore,
    /// The SAM architecture.
    pub sam: SamConfig,
    pub resize: Resize,
    /// Horizontal-flip probability during training.
    pub hflip: f64,
    /// Binarisation threshold for evaluation.
    pub threshold: f32,
    /// Recompute image-encoder blocks in backward instead of keeping their activations
    /// (less memory, same gradients; for large inputs such as ViT-B at 1024 px).
    #[serde(default)]
    pub checkpoint_blocks: bool,
    /// Leave out (and list in `<run>/skipped.txt`) the image/mask pairs with a problem instead
    /// of refusing the data folder.
    #[serde(default)]
    pub skip_bad: bool,
    /// Compute dtype of SAM's image encoder (`f32`, or `bf16`/`f16` autocast on CUDA; master
    /// weights, optimiser state and the rest of SAM stay f32). Runs written before this field
    /// existed load as f32.
    #[serde(default)]
    pub dtype: Precision,
    /// Prompts sampled from the ground truth (`--prompt`, [`crate::data::prompts`]); `none`
    /// (the default, GPS's own recipe) is prompt-free and is not written to `config.json`, so
    /// prompt-free runs keep their config byte for byte. See [`super::prompted`].
    #[serde(default, skip_serializing_if = "PromptSpec::is_prompt_free")]
    pub prompt: PromptSpec,
    /// The data folder's layout (`--data`): Kvasir-SEG (the default, not written to
    /// `config.json`, so earlier runs keep their config byte for byte) or PraNet's benchmark
    /// ([`crate::data::pranet`]: train on `TrainDataset`, validation carved from it, every test
    /// set present scored with the field's metrics).
    #[serde(default, skip_serializing_if = "SegLayout::is_kvasir")]
    pub data: SegLayout,
}

/// The core's fields read and set as the config's own (`cfg.epochs`, `cfg.lr = …`).
impl std::ops::Deref for SegTrainConfig {
    type Target = TrainCore;
    fn deref(&self) -> &TrainCore {
        &self.core
    }
}

impl std::ops::DerefMut for SegTrainConfig {
    fn deref_mut(&mut self) -> &mut TrainCore {
        &mut self.core
    }
}

impl SegTrainConfig {
    /// The GPS SAM recipe (gps-method.md) for `data_dir` and `sam`.
    pub fn recipe(data_dir: PathBuf, base: Option<PathBuf>, sam: SamConfig) -> Self {
        SegTrainConfig {
            core: TrainCore {
                data_dir,
                base,
                method: Method::Gps,
                topk: 1,
                level: crate::gps::select::Level::Neuron,
                epochs: 20,
                lr: 2e-4,
                min_lr: 1e-7,
                weight_decay: 0.01,
                batch_size: 1,
                eval_batch_size: 8,
                seed: 42,
                split_seed: None,
                select_batches: None,
                test_fraction: 0.12,
                val_fraction: crate::train::config::default_val_fraction(),
                train_limit: None,
                test_limit: None,
                max_steps_per_epoch: None,
                total_steps: None,
                keep_last: 2,
            },
            sam,
            resize: Resize::Squash,
            hflip: 0.5,
            threshold: 0.5,
            checkpoint_blocks: false,
            skip_bad: false,
            dtype: Precision::F32,
            prompt: PromptSpec::default(),
            data: SegLayout::Kvasir,
        }
    }

    /// The seed of the fixed evaluation prompts (val and test): the run's seed, so every
    /// method trained or evaluated with one seed sees the same prompts per image.
    pub fn eval_prompt_seed(&self) -> u64 {
        self.seed
    }
}

/// The held-out metrics of one epoch (the `eval` field of a `metrics.jsonl` record).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SegEval {
    pub eval: SegReport,
    /// The field's metrics per test set ([`crate::metrics::SetTable`], on the 8-bit maps
    /// `infer --save-probs` writes), for evaluations of set-qualified ids (a PraNet run's
    /// test sets); empty otherwise and then not written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<SetRow>,
}

/// One epoch's record (a line of `metrics.jsonl`).
pub type EpochRecord = crate::train::task::EpochRecord<SegEval>;

/// What a checkpoint's `state.json` holds besides tensors.
pub type TrainState = crate::train::fit::folder::TrainState<EpochRecord>;

/// The segmentation part of a run's `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegSummary {
    /// Validation metrics at the chosen epoch.
    pub val: SegReport,
    /// Test metrics at the chosen epoch: the shipped model's numbers.
    pub best: SegReport,
    /// Test metrics at the last epoch.
    pub last: SegReport,
    /// The field's metrics per test set at the chosen epoch (PraNet runs: one row per test set
    /// present; nothing about them chose the epoch). Empty, and not written, otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_sets: Vec<SetRow>,
    /// Merged weights of the best epoch (full checkpoint of the base architecture).
    pub merged: Option<PathBuf>,
}

/// A segmentation run's `summary.json`.
pub type RunSummary = crate::train::fit::summary::RunSummary<SegSummary>;
