//! The data side of the classification task ([`super::cls`]): the training and held-out
//! splits of each layout (VTAB's `train800val200` / `test`, FGVC's train+val / test,
//! ImageFolder's split folders or a seeded split written into the run, CIFAR-100's binaries),
//! seeded limits, the decoded-image cache budget and the loaders; and its base model
//! (`--model` → checkpoint + architecture, the head resized to the dataset's classes).

use super::config::ClsTrainConfig;
use crate::data::augment::ClsAugment;
use crate::data::classification::{ClsDataset, ClsLayout, ClsSplit};
use crate::data::loader::{ClsSource, Loader, LoaderConfig};
use crate::error::{Error, Result};
use crate::models::{Classifier, ClassifierConfig};
use crate::nn::ParamStore;
use crate::progress::{Event, Observer};
use crate::util::fs::{read_json, write_json_atomic};
use crate::util::tensors::TensorMap;
use crate::util::Rng;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// Validation data (the data's own split, or carved from training): chooses the epoch.
    /// `None` in VTAB's final stage (`final_stage`: train800val200 trains, the last epoch ships).
    pub val: Option<ClsDataset>,
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
        let sp: SeededSplit = read_json(&path)?;
        if sp.seed != cfg.seed || sp.test_fraction != cfg.test_fraction {
            return Err(Error::Config {
                field: if sp.seed != cfg.seed {
                    "seed"
                } else {
                    "test_fraction"
                }
                .into(),
                msg: format!(
                    "{} was made with seed {} / test_fraction {}, this run asks for {} / {}; \
                     use a new --out",
                    path.display(),
                    sp.seed,
                    sp.test_fraction,
                    cfg.seed,
                    cfg.test_fraction
                ),
            });
        }
        sp
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

/// The splits of a layout with split files or folders: (train, its own validation split if
/// the data has one, test, description).
///
/// - ImageFolder: `train/` + `val/` + `test/`; `train/` + `test/`; or `train/` + `val/` alone,
///   where `val/` is the held-out set (scored as test) and validation is carved from `train/`.
/// - VTAB-1k: `train800` / `val200` / `test` (the protocol's model-selection stage).
/// - FGVC: `train.json` / `val.json` / `test.json` (validation carved when `val.json` is absent).
/// - CIFAR-100: `train.bin` (validation carved from it) / `test.bin`.
#[allow(clippy::type_complexity)]
fn split_files(
    cfg: &ClsTrainConfig,
) -> Result<(ClsDataset, Option<ClsDataset>, ClsDataset, String)> {
    let root = &cfg.data_dir;
    let (tr_split, va_split, te_split, desc) = match cfg.layout {
        ClsLayout::ImageFolder => match (root.join("val").is_dir(), root.join("test").is_dir()) {
            (true, true) => (
                ClsSplit::Train,
                Some(ClsSplit::Val),
                ClsSplit::Test,
                "train / val / test",
            ),
            (false, true) => (ClsSplit::Train, None, ClsSplit::Test, "train / test"),
            (true, false) => (
                ClsSplit::Train,
                None,
                ClsSplit::Val,
                "train / val (as test)",
            ),
            (false, false) => {
                return Err(Error::Data {
                    msg: format!(
                        "{}: has train/ but neither val/ nor test/ to evaluate on",
                        root.display()
                    ),
                })
            }
        },
        ClsLayout::Vtab
            if root.join("train800.txt").is_file() && root.join("val200.txt").is_file() =>
        {
            (
                ClsSplit::Train,
                Some(ClsSplit::Val),
                ClsSplit::Test,
                "train800.txt / val200.txt / test.txt",
            )
        }
        ClsLayout::Vtab => (
            ClsSplit::TrainVal,
            None,
            ClsSplit::Test,
            "train800val200.txt / test.txt",
        ),
        ClsLayout::Fgvc if root.join("val.json").is_file() => (
            ClsSplit::Train,
            Some(ClsSplit::Val),
            ClsSplit::Test,
            "train.json / val.json / test.json",
        ),
        ClsLayout::Fgvc => (
            ClsSplit::Train,
            None,
            ClsSplit::Test,
            "train.json / test.json",
        ),
        ClsLayout::Cifar100 => (
            ClsSplit::Train,
            None,
            ClsSplit::Test,
            "train.bin / test.bin",
        ),
    };
    let tr = ClsDataset::open(root, cfg.layout, tr_split, None)?;
    let n = (cfg.layout != ClsLayout::Cifar100).then_some(tr.num_classes);
    let va = match va_split {
        Some(v) => Some(ClsDataset::open(root, cfg.layout, v, n)?),
        None => None,
    };
    let te = ClsDataset::open(root, cfg.layout, te_split, n)?;
    if cfg.layout == ClsLayout::ImageFolder
        && (te.class_names != tr.class_names
            || va.as_ref().is_some_and(|v| v.class_names != tr.class_names))
    {
        return Err(Error::Data {
            msg: format!(
                "{}: the training and evaluation splits have different class folders",
                root.display()
            ),
        });
    }
    Ok((tr, va, te, desc.to_string()))
}

impl ClsData {
    /// Open the training and held-out splits of `cfg.data_dir` (see the module docs); a
    /// seeded split is written to (and on resume read from) `<run>/split.json`.
    pub fn open(cfg: &ClsTrainConfig, run_dir: &Path) -> Result<ClsData> {
        let root = &cfg.data_dir;
        if cfg.final_stage {
            return Self::open_final(cfg);
        }
        let (train, val, test, mut split) = match cfg.layout {
            ClsLayout::ImageFolder if !root.join("train").is_dir() => {
                let (a, b, d) = seeded_split(cfg, run_dir)?;
                (a, None, b, d)
            }
            _ => split_files(cfg)?,
        };
        // Validation: the data's own, else a seeded, stratified part of the training data.
        let (train, val) = match val {
            Some(v) => (train, v),
            None => {
                split.push_str(&format!(
                    "; val carved from train ({:.0}%, seed {})",
                    100.0 * cfg.val_fraction,
                    cfg.seed
                ));
                train.carve_val(cfg.seed, cfg.val_fraction)?
            }
        };
        crate::data::classification::check_disjoint(&[
            ("train", &train),
            ("val", &val),
            ("test", &test),
        ])?;
        let train = limit(train, cfg.train_limit, cfg.seed, "train");
        let test = limit(test, cfg.test_limit, cfg.seed, "test");
        if train.is_empty() || val.is_empty() || test.is_empty() || train.num_classes < 2 {
            return Err(Error::Data {
                msg: format!(
                    "{}: the split leaves {} training, {} validation and {} test images in {} \
                     classes; need all non-empty and at least 2 classes",
                    root.display(),
                    train.len(),
                    val.len(),
                    test.len(),
                    train.num_classes
                ),
            });
        }
        let model = with_classes(&cfg.model, train.num_classes);
        Ok(ClsData {
            train,
            val: Some(val),
            test,
            split,
            model,
        })
    }

    /// VTAB-1k's final stage: `train800val200` trains, `test` is scored at the last epoch,
    /// no validation split (the settings were chosen beforehand on train800 → val200).
    fn open_final(cfg: &ClsTrainConfig) -> Result<ClsData> {
        let root = &cfg.data_dir;
        if cfg.layout != ClsLayout::Vtab {
            return Err(Error::Config {
                field: "final_stage".into(),
                msg: format!(
                    "--final is VTAB-1k's second stage (train800val200 → last epoch on test); \
                     {} is {:?}",
                    root.display(),
                    cfg.layout
                ),
            });
        }
        let train = ClsDataset::open(root, cfg.layout, ClsSplit::TrainVal, None)?;
        let test = ClsDataset::open(root, cfg.layout, ClsSplit::Test, Some(train.num_classes))?;
        crate::data::classification::check_disjoint(&[
            ("train800val200", &train),
            ("test", &test),
        ])?;
        let train = limit(train, cfg.train_limit, cfg.seed, "train");
        let test = limit(test, cfg.test_limit, cfg.seed, "test");
        if train.is_empty() || test.is_empty() || train.num_classes < 2 {
            return Err(Error::Data {
                msg: format!(
                    "{}: {} training and {} test images in {} classes",
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
            val: None,
            test,
            split: "train800val200.txt / test.txt (final stage: the last epoch ships)".into(),
            model,
        })
    }

    pub(crate) fn source(
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
    pub(crate) fn cacheable(ds: &ClsDataset, cfg: &ClsTrainConfig) -> bool {
        let s = cfg.model.image_size();
        ds.len().saturating_mul(3 * s * s) <= CACHE_BYTES
    }

    /// Shuffling, augmenting loader over the training images (cached when small).
    pub fn train_loader(&self, cfg: &ClsTrainConfig) -> Result<Loader<ClsSource>> {
        let mut lc = LoaderConfig::train(cfg.batch_size, cfg.seed);
        lc.cache = Self::cacheable(&self.train, cfg);
        Loader::all(self.source(&self.train, cfg, cfg.augment, 1), lc)
    }

    /// Fixed-order loader over the test images (no augmentation).
    pub fn test_loader(&self, cfg: &ClsTrainConfig) -> Result<Loader<ClsSource>> {
        self.eval_loader(&self.test, cfg)
    }

    /// Fixed-order loader over the validation images (no augmentation); `None` in the final
    /// stage.
    pub fn val_loader(&self, cfg: &ClsTrainConfig) -> Result<Option<Loader<ClsSource>>> {
        self.val
            .as_ref()
            .map(|v| self.eval_loader(v, cfg))
            .transpose()
    }

    fn eval_loader(&self, ds: &ClsDataset, cfg: &ClsTrainConfig) -> Result<Loader<ClsSource>> {
        let mut lc = LoaderConfig::eval(cfg.eval_batch_size);
        lc.cache = Self::cacheable(ds, cfg);
        Loader::all(self.source(ds, cfg, cfg.augment, 1), lc)
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
