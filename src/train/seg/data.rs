//! The data side of the segmentation task ([`super::seg`]): a Kvasir-shaped dataset, its split
//! (the run's own `split.json` on resume, else the data folder's split files, else a seeded
//! split, written into the run), limits and the loaders; and the base weights.

use super::config::SegTrainConfig;
use crate::data::augment::SegAugment;
use crate::data::kvasir::{KvasirDataset, OpenOptions, Split, SplitSpec};
use crate::data::loader::{Loader, LoaderConfig, PromptSampling, SegSource};
use crate::error::{Error, Result};
use crate::nn::ParamStore;
use crate::sam::Sam;
use crate::util::tensors::TensorMap;
use candle_core::Device;
use std::path::Path;

/// The data of a run: dataset, split (read from the run folder when resuming) and loaders.
pub struct SegData {
    pub dataset: KvasirDataset,
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
        let dataset = KvasirDataset::open_with(&cfg.data_dir, &opts)?;
        if !dataset.skipped.is_empty() {
            let mut text = format!(
                "# {} problem(s) in {}; these pairs were left out (--skip-bad)\n",
                dataset.skipped.len(),
                cfg.data_dir.display()
            );
            for l in &dataset.skipped {
                text.push_str(l);
                text.push('\n');
            }
            crate::util::fs::write_atomic(&run_dir.join("skipped.txt"), text.as_bytes())?;
        }
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
            dataset,
            split,
            train_idx,
            val_idx,
            test_idx,
        })
    }

    pub(crate) fn source(&self, cfg: &SegTrainConfig, hflip: f64) -> SegSource {
        SegSource {
            dataset: self.dataset.clone(),
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
        self.eval_loader(cfg, &self.test_idx)
    }

    /// Fixed-order loader over the validation images (no augmentation).
    pub fn val_loader(&self, cfg: &SegTrainConfig) -> Result<Loader<SegSource>> {
        self.eval_loader(cfg, &self.val_idx)
    }

    fn eval_loader(&self, cfg: &SegTrainConfig, idx: &[usize]) -> Result<Loader<SegSource>> {
        let mut lc = LoaderConfig::eval(cfg.eval_batch_size);
        lc.cache = true;
        let mut src = self.source(cfg, 0.0);
        if let Some(p) = &mut src.prompts {
            // Fixed prompts per image: the same every epoch and for every method.
            p.fixed_seed = Some(cfg.eval_prompt_seed());
        }
        Loader::new(src, idx.to_vec(), lc)
    }
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
