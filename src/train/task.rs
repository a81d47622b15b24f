//! The [`Task`] trait: what differs between training tasks. The loop ([`super::fit`]) owns
//! everything else (run folder, roles, optimiser, schedule, epochs, NaN guard, checkpoints,
//! best epoch, curves, summary, merge) and knows no model. A task *is* its config (the value
//! written to `config.json`) plus these few behaviours; segmentation ([`super::seg`]) and
//! classification ([`super::cls`]) implement it, and a new task is a new file implementing it.
//!
//! The split follows burn's `TrainStep`/`ValidStep` and Lightning's `LightningModule`: a task
//! gives the model, the loss of a batch and the evaluation of a loader; the loop does the rest.

use crate::data::loader::{Loader, Source};
use crate::error::Result;
use crate::gps::policy::Policy;
use crate::nn::{ParamStore, RolePolicy};
use crate::progress::Observer;
use crate::train::config::{Method, TrainCore};
use crate::train::fit::schedule::Schedule;
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A batch of task `T`'s loaders.
pub type BatchOf<T> = <<T as Task>::Source as Source>::Batch;

/// A task's loaders: shuffled training data, and the fixed-order validation and test sets.
/// Every choice (best epoch, the shipped checkpoint) is made on `val`; `test` is only scored.
pub struct Loaders<S: Source> {
    pub train: Loader<S>,
    /// `None` only for a protocol's final stage that trains on train+val (VTAB-1k's
    /// `train800val200`): nothing is chosen then, the *last* epoch ships.
    pub val: Option<Loader<S>>,
    pub test: Loader<S>,
}

/// Whether the schedule's position is the epoch (set once per epoch) or the global step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleUnit {
    Epoch,
    Step,
}

/// What the GPS selection phase needs from a task besides the model and the data.
#[derive(Debug, Clone)]
pub struct SelectionSetup {
    /// Which tensors are selected per row / trained whole / frozen.
    pub policy: Policy,
    /// The loss whose gradients rank entries, as recorded in the artifact (e.g. `bce+iou`).
    pub loss_name: String,
    /// The progress phase's name (e.g. `select`, `select (supcon)`).
    pub phase: String,
}

/// How the loop labels a task's curves ([`crate::train::fit::summary::draw`]).
#[derive(Debug, Clone, Copy)]
pub struct Curves {
    /// The training loss (`BCE + soft IoU`).
    pub loss: &'static str,
    /// The score that chooses the best epoch (`mDice`, `top-1`).
    pub score: &'static str,
    /// The file of the score's chart (`metrics.png`).
    pub file: &'static str,
}

/// One training task. `Self` is the run's config (written to and compared with
/// `<run>/config.json`); everything is read from it and from the opened [`Task::Data`].
///
/// What every task supplies: its data, model, loaders, schedule, one training step and one
/// evaluation (burn's `TrainStep` / `ValidStep`). Hooks with defaults cover what only some
/// tasks need: the GPS selection ([`Task::selection`] and the three after it: a task without
/// one supports no sparse method), whole-tensor roles beyond `full`, files of the best epoch.
/// The loop draws the curves and writes the summary ([`crate::train::fit::summary`]).
pub trait Task: Serialize + DeserializeOwned + PartialEq + Sync {
    /// What the loaders read (training, evaluation and selection share it).
    type Source: Source<Batch: Sync> + Send;
    /// The model built over a [`ParamStore`].
    type Model: Sync;
    /// The opened data (dataset, split) and what the model needs from it.
    type Data;
    /// The held-out metrics of one evaluation, flattened into each `metrics.jsonl` record.
    type Eval: Clone + Default + Serialize + DeserializeOwned;
    /// What an evaluation keeps for drawing the best epoch (overlays, per-image scores).
    type Kept;
    /// The task's own part of `summary.json` (its metrics at the chosen epoch, …).
    type Extra: Serialize + DeserializeOwned + Clone;

    /// The methods this task supports; the others are refused before any work.
    const METHODS: &'static [Method];
    /// The task's name in messages (`segmentation`, `classification`).
    const NAME: &'static str;
    /// How the loop labels the curves it draws.
    const CURVES: Curves;

    /// The shared settings.
    fn core(&self) -> &TrainCore;
    /// The run's label (`gps`, `gps-ce`, `full`, …).
    fn label(&self) -> String {
        self.core().method.name().into()
    }
    /// Refuse the task's own out-of-range settings (the core is validated by the loop).
    fn validate(&self, _device: &Device) -> Result<()> {
        Ok(())
    }
    /// The files and folders the run reads (the output may not equal, contain or sit inside
    /// any of them): by default the data folder and the base checkpoint.
    fn inputs(&self) -> Vec<(&'static str, PathBuf)> {
        let c = self.core();
        let mut v = vec![("--data-dir", c.data_dir.clone())];
        if let Some(b) = &c.base {
            v.push(("--model", b.clone()));
        }
        v
    }
    /// Open the data (writing the run's split / model files into `run_dir`) and load the base
    /// weights the model starts from.
    fn open(
        &self,
        run_dir: &Path,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(Self::Data, TensorMap)>;
    /// The model over `store`.
    fn build(&self, data: &Self::Data, store: &ParamStore) -> Result<Self::Model>;
    /// The shuffling, augmenting training loader and the fixed-order validation and test
    /// loaders.
    fn loaders(&self, data: &Self::Data) -> Result<Loaders<Self::Source>>;
    /// The learning-rate schedule for `steps_per_epoch` optimiser steps per epoch.
    fn schedule(&self, steps_per_epoch: usize) -> (Schedule, ScheduleUnit);
    /// Training loss of one batch and its gradients.
    fn train_step(&self, model: &Self::Model, batch: &BatchOf<Self>)
        -> Result<(Tensor, GradStore)>;
    /// Whether [`train_step`](Self::train_step)'s loss is the mean over the batch of
    /// per-sample terms, so that data-parallel shards combine exactly (each rank's gradient
    /// weighted by its share of the batch). Data-parallel training (`--distributed`) refuses
    /// a task that does not say so (e.g. a loss averaged over objects, or coupling samples).
    fn batch_mean_loss(&self) -> bool {
        false
    }
    /// Images in a batch (for images/s).
    fn batch_len(batch: &BatchOf<Self>) -> Result<usize>;
    /// Evaluate `model` over one pass of `loader`.
    fn evaluate(
        &self,
        model: &Self::Model,
        loader: &mut Loader<Self::Source>,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(Self::Eval, Self::Kept)>;
    /// The one "higher is better" number that picks the best epoch.
    fn score(eval: &Self::Eval) -> f64;
    /// (train, val, test) images, for the summary.
    fn split_sizes(&self, data: &Self::Data) -> [usize; 3];
    /// The task's part of the summary of a finished run.
    fn summary(&self, data: &Self::Data, fit: &Fitted<Self::Eval>) -> Self::Extra;
    /// Roles of the whole-tensor methods: `full` trains everything; a task with other
    /// whole-tensor methods (`decoder`, `linear`, `bias`) says which tensors they train.
    fn baseline_roles(&self, _base: &TensorMap) -> Result<RolePolicy> {
        match self.core().method {
            Method::Full => Ok(RolePolicy::AllTrainable),
            m => Err(crate::error::Error::msg(format!(
                "`{}` has no whole-tensor roles in the {} task",
                m.name(),
                Self::NAME
            ))),
        }
    }
    /// Whether the training step splits a batch into one chunk per thread, and the values of
    /// one image's largest activation: they decide Candle's element-wise pool
    /// ([`crate::util::threads::elementwise_pool_for`]), applied by
    /// [`crate::train::fit::set_elementwise_pool`] at the start of every command that trains,
    /// evaluates or selects (`train`, `select`, `demo`, `experiment`). `None` (the default)
    /// leaves the pool as it is.
    fn elementwise_pool(&self) -> Option<(bool, usize)> {
        None
    }
    /// Files of the best evaluation (overlays, per-image scores); nothing by default.
    fn write_best(&self, _run_dir: &Path, _data: &Self::Data, _kept: &Self::Kept) -> Result<()> {
        Ok(())
    }
    /// The selection policy, loss name and phase name of the sparse methods; `None`: the task
    /// has no sparse method.
    fn selection(&self) -> Option<SelectionSetup> {
        None
    }
    /// The loader whose first batches supply the selection gradients.
    fn selection_loader(&self, _data: &Self::Data) -> Result<Loader<Self::Source>> {
        Err(no_selection(Self::NAME))
    }
    /// The selection loss of one batch (with the pretrained weights).
    fn selection_loss(&self, _model: &Self::Model, _batch: &BatchOf<Self>) -> Result<Tensor> {
        Err(no_selection(Self::NAME))
    }
    /// The selection loss of one batch, detached, and its gradients. By default the plain
    /// backward of [`selection_loss`](Self::selection_loss); a task with block recomputation
    /// uses it here too, so the selection pass never peaks above a training step's budget.
    fn selection_backward(
        &self,
        model: &Self::Model,
        batch: &BatchOf<Self>,
    ) -> Result<(Tensor, GradStore)> {
        let loss = self.selection_loss(model, batch)?;
        let grads = loss.backward()?;
        Ok((loss.detach(), grads))
    }
}

fn no_selection(task: &str) -> crate::error::Error {
    crate::error::Error::msg(format!("the {task} task has no GPS selection"))
}

/// One epoch's record (a line of `metrics.jsonl`): the validation metrics (what the best
/// epoch is chosen on) and the test metrics (logged and labelled, never used to choose).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord<E> {
    pub epoch: usize,
    pub steps: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub val: E,
    pub test: E,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// What the loop measured, for the task's summary.
#[derive(Debug, Clone)]
pub struct Fitted<E> {
    pub label: String,
    pub trainable: usize,
    pub total: usize,
    /// The epoch with the best validation score (0: the base model, not trained), or the last
    /// epoch when the run has no validation split.
    pub best_epoch: Option<usize>,
    /// How the epoch was chosen: `val`, or `last` (no validation split: nothing was chosen).
    pub selected_on: String,
    /// Validation metrics at the best epoch (what chose it).
    pub best_val: E,
    /// Test metrics at the best epoch: the shipped model's reported numbers.
    pub best: E,
    /// Test metrics at the last epoch.
    pub last: E,
    /// Seconds spent selecting (gradient pass + ranking), 0 for whole-tensor methods.
    pub selection_seconds: f64,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub peak_rss_mb: f64,
    pub run_dir: PathBuf,
    /// Merged weights of the best epoch (a zero-shot evaluation: the base checkpoint).
    pub merged: Option<PathBuf>,
}

impl<E> Fitted<E> {
    /// Trainable share in percent.
    pub fn trainable_pct(&self) -> f64 {
        100.0 * self.trainable as f64 / self.total.max(1) as f64
    }
}
