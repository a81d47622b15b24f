//! The data side of the segmentation task ([`super::seg`]): a Kvasir-shaped dataset, its split
//! (the run's own `split.json` on resume, else the data folder's split files, else a seeded
//! split, written into the run), limits and the loaders; and the base weights.
//!
//! A PraNet-layout folder ([`crate::data::pranet`], `--data pranet`) trains on `TrainDataset`
//! with validation carved from it (seeded, Kvasir-SEG's rule) and tests on every test set
//! present, pooled into one test loader with set-qualified ids (`Kvasir/<id>`), so one
//! evaluation also gives the per-set table; `test_limit` caps each set.

use super::config::SegTrainConfig;
use crate::data::augment::SegAugment;
use crate::data::kvasir::{KvasirDataset, OpenOptions, Split, SplitSpec};
use crate::data::loader::{Loader, LoaderConfig, PromptSampling, SegSource};
use crate::data::pranet::{PranetDataset, SegLayout};
use crate::error::{Error, Result};
use crate::nn::ParamStore;
use crate::sam::Sam;
use crate::util::tensors::TensorMap;
use candle_core::Device;
use std::path::Path;

/// The data of a run: dataset, split (read from the run folder when resuming) and loaders.
pub struct SegData {
    /// Training and validation pairs (and a Kvasir run's test pairs).
    pub dataset: KvasirDataset,
    /// The test pairs: `dataset` for Kvasir-SEG; a PraNet run's test sets, ids set-qualified.
    pub test: KvasirDataset,
    pub split: Split,
    pub train_idx: Vec<usize>,
    pub val_idx: Vec<usize>,
    pub test_idx: Vec<usize>,
}

impl SegData {
    /// Open the dataset (`skip_bad`: leaving out and listing the bad pairs in
    /// `<run>/skipped.txt`) and decide the train/val/test split: the run's own `split.json`
    /// when it exists (a stale one is refused, naming the field), else the data folder's split
    /// files or a seeded split, with validation carved from train when the data has none.
    pub fn open(cfg: &SegTrainConfig, run_dir: &Path) -> Result<SegData> {
        let opts = OpenOptions {
            skip_bad: cfg.skip_bad,
            ..Default::default()
        };
        if cfg.data == SegLayout::Pranet {
            return Self::open_pranet(cfg, run_dir, &opts);
        }
        let dataset = KvasirDataset::open_with(&cfg.data_dir, &opts)?;
        write_skipped(cfg, run_dir, &dataset.skipped)?;
        let split = dataset.split3_for_run(
            run_dir,
            SplitSpec {
                seed: cfg.split_seed.unwrap_or(cfg.seed),
                test_fraction: cfg.test_fraction,
                val_fraction: cfg.val_fraction,
            },
        )?;
        let mut train_idx = dataset.indices_of(&split.train, "split train list")?;
        let val_idx = dataset.indices_of(&split.val, "split val list")?;
        let mut test_idx = dataset.indices_of(&split.test, "split test list")?;
        if let Some(n) = cfg.train_limit {
            train_idx.truncate(n);
        }
        if let Some(n) = cfg.test_limit {
            test_idx.truncate(n);
        }
        if train_idx.is_empty() || val_idx.is_empty() || test_idx.is_empty() {
            return Err(Error::Data {
                msg: format!(
                    "{}: the split leaves {} training, {} validation and {} test images; \
                     all must be non-empty",
                    cfg.data_dir.display(),
                    train_idx.len(),
                    val_idx.len(),
                    test_idx.len()
                ),
            });
        }
        Ok(SegData {
            test: dataset.clone(),
            dataset,
            split,
            train_idx,
            val_idx,
            test_idx,
        })
    }

    /// A PraNet-layout root: train and validation carved from `TrainDataset` (seeded by
    /// `split_seed`, else `seed`), the test sets present (each capped at `test_limit`) as
    /// one set-qualified list; the split is written to (or, resuming, checked against)
    /// `<run>/split.json`.
    fn open_pranet(cfg: &SegTrainConfig, run_dir: &Path, opts: &OpenOptions) -> Result<SegData> {
        let pranet = PranetDataset::open_with(&cfg.data_dir, opts)?;
        write_skipped(cfg, run_dir, &pranet.skipped)?;
        let seed = cfg.split_seed.unwrap_or(cfg.seed);
        let (train, val) = pranet.train_val(seed, cfg.val_fraction)?;
        let test_entries = pranet.test_pairs(None);
        let split = Split {
            train,
            val,
            test: test_entries.iter().map(|e| e.id.clone()).collect(),
            source: format!("{} (PraNet layout)", cfg.data_dir.display()),
            spec: Some(SplitSpec {
                seed,
                test_fraction: cfg.test_fraction,
                val_fraction: cfg.val_fraction,
            }),
        };
        let path = run_dir.join("split.json");
        if path.is_file() {
            let old = Split::read_json(&path)?;
            if (&old.train, &old.val, &old.test, old.spec)
                != (&split.train, &split.val, &split.test, split.spec)
            {
                return Err(Error::Config {
                    field: "split".into(),
                    msg: format!(
                        "{} differs from the split this run's settings make of {} (another \
                         seed, validation fraction or data folder); use a new --out",
                        path.display(),
                        cfg.data_dir.display()
                    ),
                });
            }
        } else {
            split.write_json(&path)?;
        }
        let train_set = pranet.train()?;
        let dataset = KvasirDataset {
            root: train_set.dir.clone(),
            entries: train_set.entries.clone(),
            root_split: None,
            skipped: Vec::new(),
            skipped_ids: Default::default(),
        };
        let test = KvasirDataset {
            root: cfg.data_dir.join(crate::data::pranet::TEST_DIR),
            entries: pranet.test_pairs(cfg.test_limit),
            root_split: None,
            skipped: Vec::new(),
            skipped_ids: Default::default(),
        };
        let mut train_idx = dataset.indices_of(&split.train, "split train list")?;
        let val_idx = dataset.indices_of(&split.val, "split val list")?;
        if let Some(n) = cfg.train_limit {
            train_idx.truncate(n);
        }
        let test_idx: Vec<usize> = (0..test.entries.len()).collect();
        if train_idx.is_empty() || val_idx.is_empty() || test_idx.is_empty() {
            return Err(Error::Data {
                msg: format!(
                    "{}: {} training, {} validation and {} test images; all must be non-empty",
                    cfg.data_dir.display(),
                    train_idx.len(),
                    val_idx.len(),
                    test_idx.len()
                ),
            });
        }
        Ok(SegData {
            dataset,
            test,
            split,
            train_idx,
            val_idx,
            test_idx,
        })
    }

    pub(crate) fn source(&self, cfg: &SegTrainConfig, hflip: f64) -> SegSource {
        Self::source_of(&self.dataset, cfg, hflip)
    }

    fn source_of(dataset: &KvasirDataset, cfg: &SegTrainConfig, hflip: f64) -> SegSource {
        SegSource {
            dataset: dataset.clone(),
            size: cfg.sam.image_size,
            resize: cfg.resize,
            augment: SegAugment { hflip },
            prompts: cfg.prompt.is_prompted().then_some(PromptSampling {
                spec: cfg.prompt,
                fixed_seed: None,
            }),
        }
    }

    /// Shuffling, augmenting, caching loader over the training images.
    pub fn train_loader(&self, cfg: &SegTrainConfig) -> Result<Loader<SegSource>> {
        Loader::new(
            self.source(cfg, cfg.hflip),
            self.train_idx.clone(),
            LoaderConfig::train(cfg.batch_size, cfg.seed),
        )
    }

    /// Fixed-order loader over the test images (no augmentation).
    pub fn test_loader(&self, cfg: &SegTrainConfig) -> Result<Loader<SegSource>> {
        self.eval_loader(cfg, &self.test, &self.test_idx)
    }

    /// Fixed-order loader over the validation images (no augmentation).
    pub fn val_loader(&self, cfg: &SegTrainConfig) -> Result<Loader<SegSource>> {
        self.eval_loader(cfg, &self.dataset, &self.val_idx)
    }

    fn eval_loader(
        &self,
        cfg: &SegTrainConfig,
        dataset: &KvasirDataset,
        idx: &[usize],
    ) -> Result<Loader<SegSource>> {
        let mut lc = LoaderConfig::eval(cfg.eval_batch_size);
        lc.cache = true;
        let mut src = Self::source_of(dataset, cfg, 0.0);
        if let Some(p) = &mut src.prompts {
            // Fixed prompts per image: the same every epoch and for every method.
            p.fixed_seed = Some(cfg.eval_prompt_seed());
        }
        Loader::new(src, idx.to_vec(), lc)
    }
}

/// `<run>/skipped.txt`: the pairs `--skip-bad` left out, one line each (nothing when none).
fn write_skipped(cfg: &SegTrainConfig, run_dir: &Path, skipped: &[String]) -> Result<()> {
    if skipped.is_empty() {
        return Ok(());
    }
    let mut text = format!(
        "# {} problem(s) in {}; these pairs were left out (--skip-bad)\n",
        skipped.len(),
        cfg.data_dir.display()
    );
    for l in skipped {
        text.push_str(l);
        text.push('\n');
    }
    crate::util::fs::write_atomic(&run_dir.join("skipped.txt"), text.as_bytes())
}

/// Load the base weights (or make a fresh seeded set for tests).
pub fn base_weights(cfg: &SegTrainConfig, device: &Device) -> Result<TensorMap> {
    match &cfg.base {
        Some(p) => crate::sam::load_weights(p, &cfg.sam, device),
        None => {
            let store = ParamStore::init(device, cfg.seed);
            Sam::new(&cfg.sam, &store)?;
            store.current_tensors()
        }
    }
}
