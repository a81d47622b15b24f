//! Classification fine-tuning of a ViT or ConvNeXt with GPS and its baselines.
//!
//! Flow (GPS, Zhang et al., CVPR 2024, §3; `shared/notes/gps-method.md`): open data (train on
//! VTAB's `train800val200` / FGVC's train+val / ImageFolder's `train[+val]`, test on the
//! held-out split; an ImageFolder without split folders gets a seeded split written into the
//! run) → base weights (head re-initialised for the dataset's classes) → selection:
//! gradients of a head-free supervised contrastive loss (SupCon, T = 0.07) on two augmented
//! views per image, accumulated with the pretrained weights, then `Policy::classifier()` top-K
//! per row (or cross-entropy through the fresh head, the paper's ablation; or random /
//! magnitude at the same budget) → masked fine-tuning with Adam (head trainable),
//! cross-entropy, warm-up + cosine per step → top-1 accuracy on the held-out split every epoch
//! → checkpoints (resumable), best epoch kept → best epoch merged into a full checkpoint.
//! Baselines: full (AdamW), linear (head only), bias (BitFit: every bias + the head).

use crate::data::augment::ClsAugment;
use crate::data::classification::{ClsDataset, ClsLayout, ClsSplit};
use crate::data::loader::{ClsBatch, ClsSource, Loader, LoaderConfig};
use crate::error::{Error, Result};
use crate::gps::artifact::{Artifact, BaseModel, SelectionInfo};
use crate::gps::policy::{Policy, Rule, Treatment};
use crate::gps::select::{select_from_grads, Criterion, Level};
use crate::models::{Classifier, ClassifierConfig};
use crate::nn::{ParamStore, Role, RolePolicy};
use crate::train::loss::{cross_entropy, supcon};
use crate::train::metrics::{Accuracy, Metric};
use crate::train::observer::{Event, Observer};
use crate::train::optim::{Adam, AdamW};
use crate::train::run::{
    delta_from_params, open_run, restore, smoothed_loss, snapshot, write_jsonl, Opt,
};
use crate::train::schedule::Schedule;
use crate::util::fs::{read_json, write_json_atomic};
use crate::util::mem::peak_rss_mb;
use crate::util::tensors::{self, TensorMap};
use crate::util::threads::on_worker;
use crate::util::Rng;
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// What trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// GPS: top-K |selection gradient| per neuron in every weight matrix; biases and head train.
    Gps,
    /// Every parameter (AdamW).
    Full,
    /// The head only (linear probing).
    Linear,
    /// BitFit: every bias, plus the head.
    Bias,
    /// Same policy and budget as GPS, entries chosen at random (seeded).
    Random,
    /// Same policy and budget as GPS, entries with the largest |w|.
    Magnitude,
}

impl Method {
    pub const ALL: [&'static str; 6] = ["gps", "full", "linear", "bias", "random", "magnitude"];

    /// The selection criterion of the sparse methods.
    pub fn criterion(self) -> Option<Criterion> {
        match self {
            Method::Gps => Some(Criterion::Gradient),
            Method::Random => Some(Criterion::Random),
            Method::Magnitude => Some(Criterion::Magnitude),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Gps => "gps",
            Method::Full => "full",
            Method::Linear => "linear",
            Method::Bias => "bias",
            Method::Random => "random",
            Method::Magnitude => "magnitude",
        }
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gps" => Ok(Method::Gps),
            "full" => Ok(Method::Full),
            "linear" | "head" => Ok(Method::Linear),
            "bias" | "bitfit" => Ok(Method::Bias),
            "random" => Ok(Method::Random),
            "magnitude" => Ok(Method::Magnitude),
            other => Err(Error::Config {
                field: "method".into(),
                msg: format!("`{other}` is not one of {}", Method::ALL.join(", ")),
            }),
        }
    }
}

/// The loss whose gradients rank the entries (GPS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectLoss {
    /// Head-free supervised contrastive loss on two augmented views (the GPS recipe).
    SupCon,
    /// Cross-entropy through the freshly initialised head (the paper's ablation).
    Ce,
}

impl FromStr for SelectLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "supcon" => Ok(SelectLoss::SupCon),
            "ce" | "cross-entropy" => Ok(SelectLoss::Ce),
            other => Err(Error::Config {
                field: "select_loss".into(),
                msg: format!("`{other}` is not one of supcon, ce"),
            }),
        }
    }
}

/// Everything a classification run depends on; written to `<run>/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClsTrainConfig {
    /// Dataset root.
    pub data_dir: PathBuf,
    pub layout: ClsLayout,
    /// Base checkpoint (None: fresh random init — tests only).
    pub base: Option<PathBuf>,
    /// Architecture; its head is resized to the dataset's class count.
    pub model: ClassifierConfig,
    pub method: Method,
    pub select_loss: SelectLoss,
    /// SupCon temperature.
    pub temperature: f64,
    /// GPS K (entries per neuron); also the budget of random/magnitude.
    pub topk: usize,
    pub level: Level,
    pub epochs: usize,
    /// Linear warm-up length in epochs (counted in steps).
    pub warmup_epochs: usize,
    pub lr: f64,
    pub min_lr: f64,
    /// AdamW decay for `full` (the other methods use plain Adam).
    pub weight_decay: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
    /// Batches whose gradients rank entries (capped at one pass over the training set).
    pub select_batches: usize,
    /// Training augmentation.
    pub augment: ClsAugment,
    /// Test fraction of a seeded split (ImageFolder without split folders).
    pub test_fraction: f64,
    /// Use at most this many training / test images (a seeded subset; quick runs).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Optimiser steps per epoch cap (quick runs).
    pub max_steps_per_epoch: Option<usize>,
    pub keep_last: usize,
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
            data_dir,
            layout,
            base,
            model,
            method: Method::Gps,
            select_loss: SelectLoss::SupCon,
            temperature: 0.07,
            topk: 1,
            level: Level::Neuron,
            epochs: 100,
            warmup_epochs: 10,
            lr: 1e-3,
            min_lr: 1e-8,
            weight_decay: 0.05,
            batch_size: 32,
            eval_batch_size: 64,
            seed: 42,
            select_batches: 32,
            augment: ClsAugment::default(),
            test_fraction: 0.2,
            train_limit: None,
            test_limit: None,
            max_steps_per_epoch: None,
            keep_last: 2,
        }
    }

    /// The run's method label: `gps`, `gps-ce` (CE selection), or the baseline's name.
    pub fn label(&self) -> String {
        match (self.method, self.select_loss) {
            (Method::Gps, SelectLoss::Ce) => "gps-ce".into(),
            (m, _) => m.name().into(),
        }
    }

    /// Refuse out-of-range values before any work starts; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| {
            Err(Error::Config {
                field: field.into(),
                msg: msg.into(),
            })
        };
        if self.topk == 0 {
            return bad("topk", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("min_lr", "must be in [0, lr]");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a positive number");
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad("batch_size", "batch sizes must be at least 1");
        }
        if self.method == Method::Gps
            && self.select_loss == SelectLoss::SupCon
            && self.batch_size < 2
        {
            return bad(
                "batch_size",
                "SupCon selection needs at least 2 images per batch",
            );
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return bad("warmup_epochs", "must be smaller than epochs");
        }
        if self.select_batches == 0 {
            return bad("select_batches", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.augment.hflip) {
            return bad("augment.hflip", "must be a probability in [0, 1]");
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return bad("test_fraction", "must be in (0, 1)");
        }
        crate::util::fs::require_dir(&self.data_dir, "data folder")?;
        if let Some(b) = &self.base {
            crate::util::fs::require_file(b, "base checkpoint")?;
        }
        self.model.validate()
    }
}

/// `cfg` with a head of `n` classes.
pub fn with_classes(cfg: &ClassifierConfig, n: usize) -> ClassifierConfig {
    match cfg {
        ClassifierConfig::Vit(c) => ClassifierConfig::Vit(c.clone().with_num_classes(n)),
        ClassifierConfig::ConvNext(c) => ClassifierConfig::ConvNext(c.clone().with_num_classes(n)),
    }
}

/// Resolve a `--model` argument to (base checkpoint, architecture).
///
/// - `vit_tiny` / `convnext_tiny` (or their preset names `vit_tiny_cpu`, `convnext_tiny_cpu`,
///   and `vit_b16`, `convnext_b`): the project's shipped checkpoint `sam/<name>.safetensors`
///   with its `sam/<name>.json` (e.g. `sam/vit-tiny.*`, written by `gps-seg pretrain vit`);
///   with `random_init`, the preset with fresh weights instead (no checkpoint).
/// - a checkpoint path: its architecture from `<stem>.json` beside it, else from `arch`.
pub fn resolve_model(
    model: &str,
    arch: Option<&str>,
    random_init: bool,
) -> Result<(Option<PathBuf>, ClassifierConfig)> {
    let preset = match model {
        "vit_tiny" | "vit-tiny" | "vit_tiny_cpu" => Some(("vit_tiny_cpu", "vit-tiny")),
        "convnext_tiny" | "convnext-tiny" | "convnext_tiny_cpu" => {
            Some(("convnext_tiny_cpu", "convnext-tiny"))
        }
        "vit_b16" | "vit-b16" => Some(("vit_b16", "vit-b16")),
        "convnext_b" | "convnext-b" => Some(("convnext_b", "convnext-b")),
        _ => None,
    };
    if let Some((name, stem)) = preset {
        if random_init {
            return Ok((None, ClassifierConfig::preset(name, 2)?));
        }
        for d in crate::sam::registry::model_dirs() {
            let w = d.join(format!("{stem}.safetensors"));
            let c = d.join(format!("{stem}.json"));
            if w.is_file() && c.is_file() {
                let cfg: ClassifierConfig = read_json(&c)?;
                cfg.validate()?;
                return Ok((Some(w), cfg));
            }
        }
        return Err(Error::Config {
            field: "model".into(),
            msg: format!(
                "no shipped checkpoint sam/{stem}.safetensors (+ .json) found; create it \
                 (`gps-seg pretrain vit` for vit_tiny), pass a checkpoint path, or train from \
                 scratch with --random-init"
            ),
        });
    }
    let path = PathBuf::from(model);
    if !path.is_file() {
        return Err(Error::Config {
            field: "model".into(),
            msg: format!(
                "`{model}` is neither a preset (vit_tiny, convnext_tiny, vit_b16, convnext_b) \
                 nor an existing checkpoint file"
            ),
        });
    }
    let beside = path.with_extension("json");
    let cfg = if beside.is_file() {
        read_json::<ClassifierConfig>(&beside)?
    } else {
        let a = arch.ok_or_else(|| Error::Config {
            field: "arch".into(),
            msg: format!(
                "{} has no {} beside it; name its architecture with --arch ({})",
                path.display(),
                beside.display(),
                ClassifierConfig::PRESETS.join(", ")
            ),
        })?;
        ClassifierConfig::preset(a, 2)?
    };
    cfg.validate()?;
    Ok((Some(path), cfg))
}

/// One epoch's record (a line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub steps: usize,
    pub train_loss: f64,
    pub lr: f64,
    /// Top-1 accuracy on the held-out split.
    pub test_acc: f64,
    /// Mean cross-entropy on the held-out split.
    pub test_loss: f64,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// What a checkpoint's `state.json` holds besides tensors.
pub type TrainState = crate::train::run::TrainState<EpochRecord>;

/// The result of a run, for the summary table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClsRunSummary {
    /// `gps`, `gps-ce`, `full`, …
    pub method: String,
    pub topk: usize,
    pub trainable: usize,
    pub total: usize,
    pub trainable_pct: f64,
    pub best_epoch: Option<usize>,
    pub best_acc: f64,
    pub last_acc: f64,
    pub train_images: usize,
    pub test_images: usize,
    /// Seconds spent selecting (gradient pass + ranking), 0 for whole-tensor methods.
    pub selection_seconds: f64,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub peak_rss_mb: f64,
    pub run_dir: PathBuf,
    /// Merged weights of the best epoch (`model.json` beside it holds the config).
    pub merged: PathBuf,
}

/// Decoded-image cache budget per loader (1 GiB of u8 pixels: VTAB-1k at 224 px is 150 MB;
/// CIFAR-100's 50 k training images at 224 px are 7.5 GB and stream from disk instead).
pub const CACHE_BYTES: usize = 1 << 30;

/// The seeded split of an ImageFolder without split folders (`<run>/split.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeededSplit {
    pub seed: u64,
    pub test_fraction: f64,
    pub train: Vec<String>,
    pub test: Vec<String>,
}

/// Training and held-out data of a run.
pub struct ClsData {
    pub train: ClsDataset,
    pub test: ClsDataset,
    /// Where the split came from (e.g. `train800val200.txt / test.txt`).
    pub split: String,
}

fn subset(ds: &ClsDataset, keep: impl Fn(&str) -> bool) -> ClsDataset {
    ClsDataset {
        samples: ds.samples.iter().filter(|s| keep(&s.id)).cloned().collect(),
        class_names: ds.class_names.clone(),
        num_classes: ds.num_classes,
    }
}

/// A seeded subset of at most `n` samples (order kept), so limits do not cut whole classes.
fn limit(ds: ClsDataset, n: Option<usize>, seed: u64, what: &str) -> ClsDataset {
    let Some(n) = n else { return ds };
    if n >= ds.len() {
        return ds;
    }
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    Rng::derive(seed, &format!("cls-limit/{what}")).shuffle(&mut idx);
    idx.truncate(n);
    idx.sort_unstable();
    ClsDataset {
        samples: idx.into_iter().map(|i| ds.samples[i].clone()).collect(),
        class_names: ds.class_names,
        num_classes: ds.num_classes,
    }
}

impl ClsData {
    /// Open the training and held-out splits of `cfg.data_dir` (see the module docs); a
    /// seeded split is written to (and on resume read from) `<run>/split.json`.
    pub fn open(cfg: &ClsTrainConfig, run_dir: &Path) -> Result<ClsData> {
        let root = &cfg.data_dir;
        let (train, test, split) = match cfg.layout {
            ClsLayout::ImageFolder if !root.join("train").is_dir() => {
                let all = ClsDataset::image_folder(root)?;
                let path = run_dir.join("split.json");
                let sp: SeededSplit = if path.exists() {
                    read_json(&path)?
                } else {
                    let mut ids: Vec<String> = all.samples.iter().map(|s| s.id.clone()).collect();
                    Rng::derive(cfg.seed, "cls-split").shuffle(&mut ids);
                    let n_test = ((ids.len() as f64 * cfg.test_fraction).round() as usize)
                        .clamp(1, ids.len().saturating_sub(1).max(1));
                    let test = ids.split_off(ids.len() - n_test);
                    let sp = SeededSplit {
                        seed: cfg.seed,
                        test_fraction: cfg.test_fraction,
                        train: ids,
                        test,
                    };
                    write_json_atomic(&path, &sp)?;
                    sp
                };
                let tr: std::collections::HashSet<&str> =
                    sp.train.iter().map(String::as_str).collect();
                let te: std::collections::HashSet<&str> =
                    sp.test.iter().map(String::as_str).collect();
                (
                    subset(&all, |id| tr.contains(id)),
                    subset(&all, |id| te.contains(id)),
                    format!(
                        "seeded {:.0}% test split ({})",
                        100.0 * cfg.test_fraction,
                        path.display()
                    ),
                )
            }
            ClsLayout::ImageFolder => {
                let (tr_split, te_split, desc) =
                    match (root.join("val").is_dir(), root.join("test").is_dir()) {
                        (true, true) => (ClsSplit::TrainVal, ClsSplit::Test, "train+val / test"),
                        (false, true) => (ClsSplit::Train, ClsSplit::Test, "train / test"),
                        (true, false) => (ClsSplit::Train, ClsSplit::Val, "train / val"),
                        (false, false) => {
                            return Err(Error::Data {
                                msg: format!(
                                    "{}: has train/ but neither val/ nor test/ to evaluate on",
                                    root.display()
                                ),
                            })
                        }
                    };
                let tr = ClsDataset::open(root, cfg.layout, tr_split, None)?;
                let te = ClsDataset::open(root, cfg.layout, te_split, Some(tr.num_classes))?;
                if te.class_names != tr.class_names {
                    return Err(Error::Data {
                        msg: format!(
                            "{}: the training and evaluation splits have different class folders",
                            root.display()
                        ),
                    });
                }
                (tr, te, desc.to_string())
            }
            ClsLayout::Vtab => {
                let tr = ClsDataset::open(root, cfg.layout, ClsSplit::TrainVal, None)?;
                let te = ClsDataset::open(root, cfg.layout, ClsSplit::Test, Some(tr.num_classes))?;
                (tr, te, "train800val200.txt / test.txt".to_string())
            }
            ClsLayout::Fgvc => {
                let (s, d) = if root.join("val.json").is_file() {
                    (ClsSplit::TrainVal, "train.json+val.json / test.json")
                } else {
                    (ClsSplit::Train, "train.json / test.json")
                };
                let tr = ClsDataset::open(root, cfg.layout, s, None)?;
                let te = ClsDataset::open(root, cfg.layout, ClsSplit::Test, Some(tr.num_classes))?;
                (tr, te, d.to_string())
            }
            ClsLayout::Cifar100 => {
                let tr = ClsDataset::open(root, cfg.layout, ClsSplit::Train, None)?;
                let te = ClsDataset::open(root, cfg.layout, ClsSplit::Test, None)?;
                (tr, te, "train.bin / test.bin".to_string())
            }
        };
        let train = limit(train, cfg.train_limit, cfg.seed, "train");
        let test = limit(test, cfg.test_limit, cfg.seed, "test");
        if train.is_empty() || test.is_empty() || train.num_classes < 2 {
            return Err(Error::Data {
                msg: format!(
                    "{}: the split leaves {} training and {} test images in {} classes; \
                     need both non-empty and at least 2 classes",
                    root.display(),
                    train.len(),
                    test.len(),
                    train.num_classes
                ),
            });
        }
        Ok(ClsData { train, test, split })
    }

    fn source(
        &self,
        ds: &ClsDataset,
        cfg: &ClsTrainConfig,
        augment: ClsAugment,
        views: usize,
    ) -> ClsSource {
        ClsSource {
            dataset: ds.clone(),
            size: cfg.model.image_size(),
            augment,
            views,
        }
    }

    /// Whether `ds` resized to the model's input fits the in-memory cache budget
    /// ([`CACHE_BYTES`]; u8 CHW per image).
    fn cacheable(ds: &ClsDataset, cfg: &ClsTrainConfig) -> bool {
        let s = cfg.model.image_size();
        ds.len().saturating_mul(3 * s * s) <= CACHE_BYTES
    }

    /// Shuffling, augmenting loader over the training images (cached when small).
    pub fn train_loader(&self, cfg: &ClsTrainConfig) -> Result<Loader<ClsSource>> {
        let mut lc = LoaderConfig::train(cfg.batch_size, cfg.seed);
        lc.cache = Self::cacheable(&self.train, cfg);
        Loader::all(self.source(&self.train, cfg, cfg.augment, 1), lc)
    }

    /// Fixed-order loader over the held-out images (no augmentation).
    pub fn test_loader(&self, cfg: &ClsTrainConfig) -> Result<Loader<ClsSource>> {
        let mut lc = LoaderConfig::eval(cfg.eval_batch_size);
        lc.cache = Self::cacheable(&self.test, cfg);
        Loader::all(self.source(&self.test, cfg, cfg.augment, 1), lc)
    }
}

/// Base weights adapted to `model` (head re-initialised when the class count differs; the
/// changes are reported as info events), or a fresh seeded set when `base` is `None`.
pub fn base_weights(
    model: &ClassifierConfig,
    base: Option<&Path>,
    seed: u64,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<TensorMap> {
    match base {
        Some(p) => {
            let (map, report) = model.load_checkpoint(p, device, seed)?;
            for l in report.lines() {
                obs.event(Event::Info(format!("{}: {l}", p.display())));
            }
            Ok(map)
        }
        None => {
            let store = ParamStore::init(device, seed);
            Classifier::new(model, &store)?;
            store.current_tensors()
        }
    }
}

/// The selection loss of one batch. SupCon: `batch` holds two views (`[2B, 3, S, S]`,
/// view-major, labels `[2B]`); the loss is computed on head-free features, so the head gets
/// no gradient. CE: logits through the head against the labels.
pub fn selection_loss(
    model: &Classifier,
    batch: &ClsBatch,
    loss: SelectLoss,
    temperature: f64,
) -> Result<Tensor> {
    match loss {
        SelectLoss::SupCon => {
            let n = batch.labels.dim(0)?;
            if n % 2 != 0 {
                return Err(Error::msg(format!(
                    "SupCon selection needs two views per image; got a batch of {n}"
                )));
            }
            let feats = model.features(&batch.images)?;
            supcon(&feats, &batch.labels.narrow(0, 0, n / 2)?, temperature)
        }
        SelectLoss::Ce => cross_entropy(&model.forward(&batch.images)?, &batch.labels),
    }
}

/// Roles of the whole-tensor baselines.
fn baseline_roles(base: &TensorMap, method: Method) -> RolePolicy {
    let rules = match method {
        Method::Full => return RolePolicy::AllTrainable,
        Method::Linear => vec![Rule::new("head.*", Treatment::Trainable)],
        _ => vec![
            Rule::new("head.*", Treatment::Trainable),
            Rule::new("*.bias", Treatment::Trainable),
        ],
    };
    let p = Policy {
        name: method.name().into(),
        rules,
        default: Treatment::Frozen,
    };
    let roles: HashMap<String, Role> = base
        .iter()
        .filter(|(n, t)| p.treatment(n, t.dims()) == Treatment::Trainable)
        .map(|(n, _)| (n.clone(), Role::Trainable))
        .collect();
    RolePolicy::Map(roles)
}

/// Selection for the sparse methods; read back from `<run>/gps` when resuming.
fn selection_for(
    cfg: &ClsTrainConfig,
    model_cfg: &ClassifierConfig,
    base: &TensorMap,
    data: &ClsData,
    run_dir: &Path,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<Artifact> {
    let art_dir = run_dir.join("gps");
    if art_dir.join("gps_config.json").exists() {
        obs.event(Event::Info(format!(
            "selection: reusing {}",
            art_dir.display()
        )));
        return Artifact::load(&art_dir, device);
    }
    let criterion = cfg
        .method
        .criterion()
        .ok_or_else(|| Error::msg("selection asked for a method without one"))?;
    let policy = Policy::classifier();
    let t0 = Instant::now();
    let (grads, batches) = if criterion == Criterion::Gradient {
        let store = ParamStore::with_roles(
            base.clone(),
            crate::gps::grads::grad_roles(base, &policy),
            device,
        );
        let model = Classifier::new(model_cfg, &store)?;
        let vars = store.trainable_vars();
        let (aug, views) = match cfg.select_loss {
            SelectLoss::SupCon => (ClsAugment::contrastive(), 2),
            SelectLoss::Ce => (cfg.augment, 1),
        };
        let mut loader = Loader::all(
            data.source(&data.train, cfg, aug, views),
            LoaderConfig {
                cache: ClsData::cacheable(&data.train, cfg),
                ..LoaderConfig::train(cfg.batch_size, cfg.seed ^ 0x5e1ec7)
            },
        )?;
        let n = cfg.select_batches.min(loader.batches_per_epoch().max(1));
        obs.event(Event::PhaseStart {
            name: format!(
                "select ({})",
                match cfg.select_loss {
                    SelectLoss::SupCon => "supcon",
                    SelectLoss::Ce => "ce",
                }
            ),
            total: n,
        });
        let mut list = Vec::with_capacity(n);
        for _ in 0..n {
            match loader.next_batch(device)? {
                Some(b) => list.push(b),
                None => break,
            }
        }
        let mut done = 0;
        let r = crate::gps::grads::accumulate(&vars, list, |b: ClsBatch| {
            let loss = selection_loss(&model, &b, cfg.select_loss, cfg.temperature)?;
            done += 1;
            obs.event(Event::Step {
                done,
                loss: loss.to_scalar::<f32>().ok().map(f64::from),
                lr: None,
                images_per_s: None,
            });
            Ok(loss)
        })?;
        (Some(r.0), r.1)
    } else {
        (None, 0)
    };
    let selection = select_from_grads(
        base,
        grads.as_ref(),
        &policy,
        cfg.topk,
        cfg.level,
        criterion,
        cfg.seed,
    )?;
    let base_file = cfg
        .base
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fresh-init".into());
    let selection_loss = match (criterion, cfg.select_loss) {
        (Criterion::Gradient, SelectLoss::SupCon) => format!("supcon(T={})", cfg.temperature),
        (Criterion::Gradient, SelectLoss::Ce) => "cross-entropy (fresh head)".into(),
        _ => "none".into(),
    };
    let art = Artifact::new(
        policy,
        SelectionInfo {
            k: cfg.topk,
            level: cfg.level,
            criterion,
            selection_loss,
            batches,
            seed: cfg.seed,
        },
        BaseModel::of(base, &base_file)?,
        selection,
    )?;
    art.save(&art_dir)?;
    if criterion == Criterion::Gradient {
        obs.event(Event::PhaseEnd {
            summary: format!(
                "gradients over {batches} batches, selection in {:.1}s",
                t0.elapsed().as_secs_f64()
            ),
        });
    }
    Ok(art)
}

/// Top-1 accuracy and mean cross-entropy of `model` over a loader (one pass).
pub fn evaluate(
    model: &Classifier,
    loader: &mut Loader<ClsSource>,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(f64, f64)> {
    let mut acc = Accuracy::default();
    let total = loader.batches_per_epoch();
    obs.event(Event::PhaseStart {
        name: "eval".into(),
        total,
    });
    let (mut loss_sum, mut n) = (0.0f64, 0usize);
    let mut done = 0;
    while let Some(batch) = loader.next_batch(device)? {
        let logits = on_worker(|| model.forward(&batch.images))?.detach();
        let b = batch.labels.dim(0)?;
        loss_sum += cross_entropy(&logits, &batch.labels)?.to_scalar::<f32>()? as f64 * b as f64;
        n += b;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let truth = batch.labels.to_vec1::<u32>()?;
        let pairs: Vec<(u32, u32)> = pred.into_iter().zip(truth).collect();
        acc.update(&pairs);
        done += 1;
        obs.event(Event::Step {
            done,
            loss: None,
            lr: None,
            images_per_s: None,
        });
    }
    loader.next_epoch();
    let a = acc.compute();
    let l = loss_sum / n.max(1) as f64;
    obs.event(Event::PhaseEnd {
        summary: format!("top-1 {:.2}%  loss {l:.4}  ({n} images)", 100.0 * a),
    });
    Ok((a, l))
}

/// Train (or resume) one classification run in `run_dir`.
pub fn train(
    cfg: &ClsTrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<ClsRunSummary> {
    cfg.validate()?;
    let t_start = Instant::now();
    let (ckpts, latest): (_, Option<(PathBuf, TrainState)>) =
        open_run(run_dir, cfg, cfg.keep_last, resume)?;

    let data = ClsData::open(cfg, run_dir)?;
    obs.event(Event::Info(format!(
        "data: {} ({} train / {} test images, {} classes, split {})",
        cfg.data_dir.display(),
        data.train.len(),
        data.test.len(),
        data.train.num_classes,
        data.split
    )));
    let model_cfg = with_classes(&cfg.model, data.train.num_classes);
    write_json_atomic(&run_dir.join("model.json"), &model_cfg)?;
    let base = base_weights(&model_cfg, cfg.base.as_deref(), cfg.seed, device, obs)?;

    let t_sel = Instant::now();
    let artifact = match cfg.method.criterion() {
        Some(_) => Some(selection_for(
            cfg, &model_cfg, &base, &data, run_dir, device, obs,
        )?),
        None => None,
    };
    let selection_seconds = if artifact.is_some() {
        t_sel.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let roles = match &artifact {
        Some(a) => RolePolicy::Map(a.selection.roles()),
        None => baseline_roles(&base, cfg.method),
    };
    let store = ParamStore::new(Some(base.clone()), roles, device, cfg.seed);
    let model = Classifier::new(&model_cfg, &store)?;
    store.check_all_used()?;
    let (trainable, total) = store.counts();
    obs.event(Event::Info(format!(
        "method {}: {} of {} parameters train ({:.3}%)",
        cfg.label(),
        trainable,
        total,
        100.0 * trainable as f64 / total.max(1) as f64
    )));
    let vars = store.trainable_vars();
    let mut opt = match cfg.method {
        Method::Full => Opt::AdamW(AdamW::new(vars.clone(), cfg.lr, cfg.weight_decay)?),
        _ => Opt::Adam(Adam::new(vars.clone(), cfg.lr)?),
    };
    let mut train_loader = data.train_loader(cfg)?;
    let mut test_loader = data.test_loader(cfg)?;
    let per_epoch = train_loader.batches_per_epoch();
    let steps_per_epoch = cfg
        .max_steps_per_epoch
        .map_or(per_epoch, |m| m.min(per_epoch))
        .max(1);
    let schedule = Schedule::WarmupCosine {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup: cfg.warmup_epochs * steps_per_epoch,
        total: cfg.epochs * steps_per_epoch,
    };

    let mut state = TrainState {
        epochs_done: 0,
        global_step: 0,
        loader: train_loader.state(),
        history: Vec::new(),
        best_epoch: None,
        step_losses: Vec::new(),
    };
    if let Some((dir, st)) = latest {
        restore(&dir, &vars, opt.get(), device)?;
        train_loader.restore(st.loader.clone())?;
        obs.event(Event::Info(format!(
            "resuming {} after epoch {}",
            run_dir.display(),
            st.epochs_done
        )));
        state = st;
    }

    let mut steps_time = 0.0;
    let mut steps_count = 0usize;
    while state.epochs_done < cfg.epochs {
        let epoch = state.epochs_done;
        obs.event(Event::PhaseStart {
            name: format!("epoch {}/{}", epoch + 1, cfg.epochs),
            total: steps_per_epoch,
        });
        let t0 = Instant::now();
        let (mut loss_sum, mut images, mut done) = (0.0, 0usize, 0usize);
        let mut lr = schedule.lr(state.global_step);
        // Batch k+1 is decoded and augmented on a background thread while step k runs.
        train_loader.run_batches(steps_per_epoch, device, |step, batch| {
            lr = schedule.lr(state.global_step);
            opt.get().set_lr(lr);
            let ts = Instant::now();
            // Forward, backward and the update run on a rayon worker (`on_worker`).
            let loss = on_worker(|| cross_entropy(&model.forward(&batch.images)?, &batch.labels))?;
            let lv = loss.to_scalar::<f32>()?;
            if !lv.is_finite() {
                return Err(Error::NonFinite(format!(
                    "training loss is {lv} at epoch {} step {} (global step {}); \
                     the last good checkpoint is kept in {}",
                    epoch + 1,
                    step + 1,
                    state.global_step + 1,
                    run_dir.join("checkpoints").display()
                )));
            }
            let o = opt.get();
            on_worker(|| o.step(&loss.backward()?))?;
            steps_time += ts.elapsed().as_secs_f64();
            steps_count += 1;
            state.global_step += 1;
            state.step_losses.push(lv);
            loss_sum += lv as f64;
            images += batch.labels.dim(0)?;
            done += 1;
            obs.event(Event::Step {
                done,
                loss: Some(loss_sum / done as f64),
                lr: Some(lr),
                images_per_s: Some(images as f64 / t0.elapsed().as_secs_f64().max(1e-9)),
            });
            Ok(())
        })?;
        train_loader.next_epoch();
        let train_secs = t0.elapsed().as_secs_f64();
        let train_loss = loss_sum / done.max(1) as f64;
        obs.event(Event::PhaseEnd {
            summary: format!(
                "loss {train_loss:.4}  {:.1} img/s",
                images as f64 / train_secs.max(1e-9)
            ),
        });
        let (acc, test_loss) = evaluate(&model, &mut test_loader, device, obs)?;
        state.history.push(EpochRecord {
            epoch: epoch + 1,
            steps: done,
            train_loss,
            lr,
            test_acc: acc,
            test_loss,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s: images as f64 / train_secs.max(1e-9),
        });
        state.epochs_done = epoch + 1;
        state.loader = train_loader.state();
        let is_best = state
            .best_epoch
            .and_then(|b| state.history.iter().find(|r| r.epoch == b))
            .is_none_or(|b| acc > b.test_acc);
        if is_best {
            state.best_epoch = Some(epoch + 1);
        }
        let params = snapshot(&vars);
        let ost = opt.get().state()?;
        ckpts.save(
            epoch + 1,
            &[("params", &params), ("optimizer", &ost)],
            &state,
        )?;
        if is_best {
            ckpts.mark_best(epoch + 1)?;
        }
        write_jsonl(&run_dir.join("metrics.jsonl"), &state.history)?;
        write_curves(run_dir, &state)?;
    }

    // The best epoch merged into a full checkpoint of the base architecture.
    let best_params = tensors::load(&run_dir.join("best").join("params.safetensors"), device)?;
    let merged = match &artifact {
        Some(art) => {
            let mut art = art.clone();
            art.set_delta(delta_from_params(&art, &best_params)?)?;
            art.save(&run_dir.join("gps"))?;
            crate::gps::merge::merge(&base, &art)?
        }
        None => {
            let mut m = base.clone();
            m.extend(best_params);
            m
        }
    };
    let merged_path = run_dir.join("merged.safetensors");
    tensors::save_safetensors(&merged_path, &merged, None)?;

    let rec = |e: Option<usize>| {
        e.and_then(|b| state.history.iter().find(|r| r.epoch == b))
            .map_or(0.0, |r| r.test_acc)
    };
    let summary = ClsRunSummary {
        method: cfg.label(),
        topk: cfg.topk,
        trainable,
        total,
        trainable_pct: 100.0 * trainable as f64 / total.max(1) as f64,
        best_epoch: state.best_epoch,
        best_acc: rec(state.best_epoch),
        last_acc: state.history.last().map_or(0.0, |r| r.test_acc),
        train_images: data.train.len(),
        test_images: data.test.len(),
        selection_seconds,
        seconds: t_start.elapsed().as_secs_f64(),
        seconds_per_step: if steps_count > 0 {
            steps_time / steps_count as f64
        } else {
            0.0
        },
        peak_rss_mb: peak_rss_mb(),
        run_dir: run_dir.to_path_buf(),
        merged: merged_path,
    };
    write_json_atomic(&run_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

fn write_curves(run_dir: &Path, state: &TrainState) -> Result<()> {
    use crate::util::draw::{line_chart, save_png, Series};
    let loss = line_chart(
        "TRAINING LOSS (CROSS-ENTROPY)",
        "STEP",
        &[Series {
            name: "loss",
            points: smoothed_loss(&state.step_losses),
        }],
        720,
        400,
    );
    save_png(&run_dir.join("loss.png"), &loss)?;
    let acc = line_chart(
        "HELD-OUT TOP-1 ACCURACY",
        "EPOCH",
        &[Series {
            name: "top-1",
            points: state
                .history
                .iter()
                .map(|r| (r.epoch as f64, r.test_acc))
                .collect(),
        }],
        720,
        400,
    );
    save_png(&run_dir.join("accuracy.png"), &acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_losses_parse() {
        for m in Method::ALL {
            assert_eq!(m.parse::<Method>().unwrap().name(), m);
        }
        assert!("lora".parse::<Method>().is_err());
        assert_eq!("ce".parse::<SelectLoss>().unwrap(), SelectLoss::Ce);
        assert!("mse".parse::<SelectLoss>().is_err());
    }

    #[test]
    fn baseline_roles_pick_head_and_biases() {
        let cfg = ClassifierConfig::preset("vit_tiny_cpu", 3).unwrap();
        let store = ParamStore::init(&Device::Cpu, 0);
        Classifier::new(&cfg, &store).unwrap();
        let base = store.current_tensors().unwrap();
        let RolePolicy::Map(lin) = baseline_roles(&base, Method::Linear) else {
            panic!("linear must be a map")
        };
        let mut names: Vec<_> = lin.keys().cloned().collect();
        names.sort();
        assert_eq!(names, vec!["head.bias", "head.weight"]);
        let RolePolicy::Map(bias) = baseline_roles(&base, Method::Bias) else {
            panic!("bias must be a map")
        };
        assert!(bias.contains_key("blocks.0.attn.qkv.bias"));
        assert!(bias.contains_key("head.weight"));
        assert!(!bias.contains_key("blocks.0.attn.qkv.weight"));
        assert!(bias
            .keys()
            .all(|n| n.ends_with(".bias") || n.starts_with("head.")));
    }
}
