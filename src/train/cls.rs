//! Classification fine-tuning of a ViT or ConvNeXt with GPS and its baselines, as a [`Task`]
//! of the one training loop ([`super::fit`]).
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
//! (picks the best epoch) → best epoch merged into a full checkpoint.
//! Baselines: full (AdamW), linear (head only), bias (BitFit: every bias + the head).

use crate::data::augment::ClsAugment;
use crate::data::classification::{ClsDataset, ClsLayout, ClsSplit};
use crate::data::loader::{ClsBatch, ClsSource, Loader, LoaderConfig};
use crate::error::{Error, Result};
use crate::gps::policy::{Policy, Rule, Treatment};
use crate::gps::select::Criterion;
use crate::models::{Classifier, ClassifierConfig};
use crate::nn::{ParamStore, RolePolicy};
use crate::train::config::TrainCore;
use crate::train::loss::{cross_entropy, supcon};
use crate::train::metrics::{Accuracy, Metric};
use crate::train::observer::{Event, Observer};
use crate::train::run::{roles_from_policy, smoothed_loss};
use crate::train::schedule::Schedule;
use crate::train::task::{Fitted, Loaders, ScheduleUnit, SelectionSetup, Task};
use crate::util::fs::{read_json, write_json_atomic};
use crate::util::tensors::TensorMap;
use crate::util::threads::on_worker;
use crate::util::Rng;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::train::config::Method;

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
                select_batches: 32,
                test_fraction: 0.2,
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

/// Training and held-out data of a run, and the architecture with the dataset's classes.
pub struct ClsData {
    pub train: ClsDataset,
    pub test: ClsDataset,
    /// Where the split came from (e.g. `train800val200.txt / test.txt`).
    pub split: String,
    /// `cfg.model` with a head of the dataset's class count (`<run>/model.json`).
    pub model: ClassifierConfig,
}

/// The seeded split of an ImageFolder without split folders, read from (on resume) or written
/// to `<run>/split.json`.
fn seeded_split(cfg: &ClsTrainConfig, run_dir: &Path) -> Result<(ClsDataset, ClsDataset, String)> {
    let all = ClsDataset::image_folder(&cfg.data_dir)?;
    let path = run_dir.join("split.json");
    let sp: SeededSplit = if path.exists() {
        read_json(&path)?
    } else {
        let mut ids: Vec<String> = all.samples.iter().map(|s| s.id.clone()).collect();
        Rng::derive(cfg.seed, "cls-split").shuffle(&mut ids);
        let n_test = ((ids.len() as f64 * cfg.test_fraction).round() as usize)
            .clamp(1, ids.len().saturating_sub(1).max(1));
        let test = ids.split_off(ids.len().saturating_sub(n_test));
        let sp = SeededSplit {
            seed: cfg.seed,
            test_fraction: cfg.test_fraction,
            train: ids,
            test,
        };
        write_json_atomic(&path, &sp)?;
        sp
    };
    let tr: std::collections::HashSet<&str> = sp.train.iter().map(String::as_str).collect();
    let te: std::collections::HashSet<&str> = sp.test.iter().map(String::as_str).collect();
    let desc = format!(
        "seeded {:.0}% test split ({})",
        100.0 * cfg.test_fraction,
        path.display()
    );
    Ok((
        subset(&all, |id| tr.contains(id)),
        subset(&all, |id| te.contains(id)),
        desc,
    ))
}

/// The splits of a layout with split files or folders: (train, test, description).
fn split_files(cfg: &ClsTrainConfig) -> Result<(ClsDataset, ClsDataset, String)> {
    let root = &cfg.data_dir;
    let (tr_split, te_split, desc) = match cfg.layout {
        ClsLayout::ImageFolder => match (root.join("val").is_dir(), root.join("test").is_dir()) {
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
        },
        ClsLayout::Vtab => (
            ClsSplit::TrainVal,
            ClsSplit::Test,
            "train800val200.txt / test.txt",
        ),
        ClsLayout::Fgvc if root.join("val.json").is_file() => (
            ClsSplit::TrainVal,
            ClsSplit::Test,
            "train.json+val.json / test.json",
        ),
        ClsLayout::Fgvc => (ClsSplit::Train, ClsSplit::Test, "train.json / test.json"),
        ClsLayout::Cifar100 => (ClsSplit::Train, ClsSplit::Test, "train.bin / test.bin"),
    };
    let tr = ClsDataset::open(root, cfg.layout, tr_split, None)?;
    let n = (cfg.layout != ClsLayout::Cifar100).then_some(tr.num_classes);
    let te = ClsDataset::open(root, cfg.layout, te_split, n)?;
    if cfg.layout == ClsLayout::ImageFolder && te.class_names != tr.class_names {
        return Err(Error::Data {
            msg: format!(
                "{}: the training and evaluation splits have different class folders",
                root.display()
            ),
        });
    }
    Ok((tr, te, desc.to_string()))
}

impl ClsData {
    /// Open the training and held-out splits of `cfg.data_dir` (see the module docs); a
    /// seeded split is written to (and on resume read from) `<run>/split.json`.
    pub fn open(cfg: &ClsTrainConfig, run_dir: &Path) -> Result<ClsData> {
        let root = &cfg.data_dir;
        let (train, test, split) = match cfg.layout {
            ClsLayout::ImageFolder if !root.join("train").is_dir() => seeded_split(cfg, run_dir)?,
            _ => split_files(cfg)?,
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
        let model = with_classes(&cfg.model, train.num_classes);
        Ok(ClsData {
            train,
            test,
            split,
            model,
        })
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

/// Roles of the whole-tensor baselines (`full`, `linear`, `bias`).
pub fn baseline_roles(base: &TensorMap, method: Method) -> RolePolicy {
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
    roles_from_policy(base, &p)
}

/// Train (or resume) one classification run in `run_dir`.
pub fn train(
    cfg: &ClsTrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<ClsRunSummary> {
    crate::train::fit::fit(cfg, run_dir, device, resume, obs)
}

fn bad(field: &str, msg: &str) -> Result<()> {
    Err(Error::Config {
        field: field.into(),
        msg: msg.into(),
    })
}

impl Task for ClsTrainConfig {
    type Source = ClsSource;
    type Model = Classifier;
    type Data = ClsData;
    type Eval = ClsEval;
    type Kept = ();
    type Summary = ClsRunSummary;

    const METHODS: &'static [Method] = &[
        Method::Gps,
        Method::Full,
        Method::Linear,
        Method::Bias,
        Method::Random,
        Method::Magnitude,
    ];
    const NAME: &'static str = "classification";

    fn core(&self) -> &TrainCore {
        &self.core
    }

    fn label(&self) -> String {
        ClsTrainConfig::label(self)
    }

    fn validate(&self, _device: &Device) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a positive number");
        }
        let supcon = self.method == Method::Gps && self.select_loss == SelectLoss::SupCon;
        if supcon && self.batch_size < 2 {
            return bad(
                "batch_size",
                "SupCon selection needs at least 2 images per batch",
            );
        }
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return bad("warmup_epochs", "must be smaller than epochs");
        }
        if !(0.0..=1.0).contains(&self.augment.hflip) {
            return bad("augment.hflip", "must be a probability in [0, 1]");
        }
        self.model.validate()
    }

    fn open(
        &self,
        run_dir: &Path,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(ClsData, TensorMap)> {
        let data = ClsData::open(self, run_dir)?;
        obs.event(Event::Info(format!(
            "data: {} ({} train / {} test images, {} classes, split {})",
            self.data_dir.display(),
            data.train.len(),
            data.test.len(),
            data.train.num_classes,
            data.split
        )));
        write_json_atomic(&run_dir.join("model.json"), &data.model)?;
        let base = base_weights(&data.model, self.base.as_deref(), self.seed, device, obs)?;
        Ok((data, base))
    }

    fn baseline_roles(&self, base: &TensorMap) -> Result<RolePolicy> {
        Ok(baseline_roles(base, self.method))
    }

    fn build(&self, data: &ClsData, store: &ParamStore) -> Result<Classifier> {
        Classifier::new(&data.model, store)
    }

    fn loaders(&self, data: &ClsData) -> Result<Loaders<ClsSource>> {
        Ok((data.train_loader(self)?, data.test_loader(self)?))
    }

    fn schedule(&self, steps_per_epoch: usize) -> (Schedule, ScheduleUnit) {
        let s = Schedule::WarmupCosine {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup_epochs.saturating_mul(steps_per_epoch),
            total: self.epochs.saturating_mul(steps_per_epoch),
        };
        (s, ScheduleUnit::Step)
    }

    fn train_step(&self, model: &Classifier, batch: &ClsBatch) -> Result<(Tensor, GradStore)> {
        let loss = cross_entropy(&model.forward(&batch.images)?, &batch.labels)?;
        let grads = loss.backward()?;
        Ok((loss, grads))
    }

    fn batch_len(batch: &ClsBatch) -> Result<usize> {
        Ok(batch.labels.dim(0)?)
    }

    fn evaluate(
        &self,
        model: &Classifier,
        loader: &mut Loader<ClsSource>,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(ClsEval, ())> {
        let (test_acc, test_loss) = evaluate(model, loader, device, obs)?;
        Ok((
            ClsEval {
                test_acc,
                test_loss,
            },
            (),
        ))
    }

    fn score(eval: &ClsEval) -> f64 {
        eval.test_acc
    }

    fn draw(&self, run_dir: &Path, history: &[EpochRecord], step_losses: &[f32]) -> Result<()> {
        write_curves(run_dir, history, step_losses)
    }

    fn summary(&self, data: &ClsData, f: Fitted<ClsEval>) -> ClsRunSummary {
        ClsRunSummary {
            method: f.label.clone(),
            topk: self.topk,
            trainable: f.trainable,
            total: f.total,
            trainable_pct: f.trainable_pct(),
            best_epoch: f.best_epoch,
            best_acc: f.best.test_acc,
            last_acc: f.last.test_acc,
            train_images: data.train.len(),
            test_images: data.test.len(),
            selection_seconds: f.selection_seconds,
            seconds: f.seconds,
            seconds_per_step: f.seconds_per_step,
            peak_rss_mb: f.peak_rss_mb,
            run_dir: f.run_dir,
            merged: f.merged.unwrap_or_default(),
        }
    }

    fn selection(&self) -> SelectionSetup {
        let loss_name = match (self.method.criterion(), self.select_loss) {
            (Some(Criterion::Gradient), SelectLoss::SupCon) => {
                format!("supcon(T={})", self.temperature)
            }
            (Some(Criterion::Gradient), SelectLoss::Ce) => "cross-entropy (fresh head)".into(),
            _ => "none".into(),
        };
        SelectionSetup {
            policy: Policy::classifier(),
            loss_name,
            phase: format!("select ({})", self.select_loss.name()),
        }
    }

    fn selection_loader(&self, data: &ClsData) -> Result<Loader<ClsSource>> {
        let (aug, views) = match self.select_loss {
            SelectLoss::SupCon => (ClsAugment::contrastive(), 2),
            SelectLoss::Ce => (self.augment, 1),
        };
        let lc = LoaderConfig {
            cache: ClsData::cacheable(&data.train, self),
            ..LoaderConfig::train(self.batch_size, self.seed ^ 0x5e1ec7)
        };
        Loader::all(data.source(&data.train, self, aug, views), lc)
    }

    fn selection_loss(&self, model: &Classifier, batch: &ClsBatch) -> Result<Tensor> {
        selection_loss(model, batch, self.select_loss, self.temperature)
    }
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

fn write_curves(run_dir: &Path, history: &[EpochRecord], step_losses: &[f32]) -> Result<()> {
    use crate::util::draw::{line_chart, save_png, Series};
    let loss = line_chart(
        "TRAINING LOSS (CROSS-ENTROPY)",
        "STEP",
        &[Series {
            name: "loss",
            points: smoothed_loss(step_losses),
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
            points: history
                .iter()
                .map(|r| (r.epoch as f64, r.eval.test_acc))
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
