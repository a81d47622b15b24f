//! Segmentation fine-tuning of SAM on a Kvasir-shaped dataset: the GPS recipe and its baselines.
//!
//! Flow: open data → split (file or seeded, written into the run) → base weights → selection
//! (GPS: gradients of BCE + soft IoU accumulated with the pretrained model; or random /
//! magnitude at the same budget) → model with sparse deltas → epochs of masked fine-tuning with
//! Adam and a per-epoch cosine schedule → held-out evaluation every epoch (per-image Dice/IoU at
//! the ground truth's resolution) → checkpoints (resumable) → best epoch's merged weights.

use crate::data::augment::SegAugment;
use crate::data::kvasir::{KvasirDataset, SegBatch, Split};
use crate::data::loader::{Loader, LoaderConfig, SegSource};
use crate::data::resize::{to_original, Resize};
use crate::error::{Error, Result};
use crate::gps::artifact::{Artifact, BaseModel, SelectionInfo};
use crate::gps::policy::{Policy, Treatment};
use crate::gps::select::{select_from_grads, Criterion, Level, Selection};
use crate::nn::{ParamStore, Precision, Role, RolePolicy};
use crate::sam::{Sam, SamConfig};
use crate::train::loss::seg_loss;
use crate::train::metrics::{Metric, SegInput, SegMetrics, SegReport};
use crate::train::observer::{Event, Observer};
use crate::train::optim::{Adam, AdamW};
use crate::train::run::{
    delta_from_params, open_run, restore, smoothed_loss, snapshot, write_jsonl, Opt,
};
use crate::train::schedule::Schedule;
use crate::util::fs::{write_atomic, write_json_atomic};
use crate::util::tensors::{self, TensorMap};
use crate::util::threads::on_worker;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// What trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// GPS: top-K |gradient| per neuron in the image encoder, the rest of SAM trainable.
    Gps,
    /// Every parameter (AdamW).
    Full,
    /// SAM's mask decoder only.
    Decoder,
    /// Same budget and policy as GPS, entries chosen at random (seeded).
    Random,
    /// Same budget and policy as GPS, entries with the largest |w|.
    Magnitude,
    /// No tuning: evaluate the base model.
    ZeroShot,
}

impl Method {
    pub const ALL: [&'static str; 6] =
        ["gps", "full", "decoder", "random", "magnitude", "zero-shot"];

    /// The selection criterion for the sparse methods.
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
            Method::Decoder => "decoder",
            Method::Random => "random",
            Method::Magnitude => "magnitude",
            Method::ZeroShot => "zero-shot",
        }
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gps" => Ok(Method::Gps),
            "full" => Ok(Method::Full),
            "decoder" => Ok(Method::Decoder),
            "random" => Ok(Method::Random),
            "magnitude" => Ok(Method::Magnitude),
            "zero-shot" | "zeroshot" | "none" => Ok(Method::ZeroShot),
            other => Err(Error::Config {
                field: "method".into(),
                msg: format!("`{other}` is not one of {}", Method::ALL.join(", ")),
            }),
        }
    }
}

/// Everything a segmentation run depends on; written to `<run>/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegTrainConfig {
    /// Kvasir-SEG-shaped folder (`images/`, `masks/`).
    pub data_dir: PathBuf,
    /// Base checkpoint (None: fresh random init — only for tests).
    pub base: Option<PathBuf>,
    /// The SAM architecture.
    pub sam: SamConfig,
    pub method: Method,
    /// GPS K (entries per neuron); also sets the budget of random/magnitude.
    pub topk: usize,
    pub level: Level,
    pub epochs: usize,
    pub lr: f64,
    pub min_lr: f64,
    /// AdamW decay for `full` (ignored by Adam methods).
    pub weight_decay: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
    /// Batches of training data whose gradients rank entries (GPS).
    pub select_batches: usize,
    pub resize: Resize,
    /// Horizontal-flip probability during training.
    pub hflip: f64,
    /// Binarisation threshold for evaluation.
    pub threshold: f32,
    /// Test fraction of a seeded split (when the data has no split files).
    pub test_fraction: f64,
    /// Use at most this many training / test images (quick runs).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Optimiser steps per epoch cap (quick runs); None = whole epoch.
    pub max_steps_per_epoch: Option<usize>,
    /// How many epoch checkpoints to keep.
    pub keep_last: usize,
    /// Recompute image-encoder blocks in backward instead of keeping their activations
    /// (less memory, same gradients; for large inputs such as ViT-B at 1024 px).
    #[serde(default)]
    pub checkpoint_blocks: bool,
    /// Compute dtype of SAM's image encoder (`f32`, or `bf16`/`f16` autocast on CUDA; master
    /// weights, optimiser state and the rest of SAM stay f32). Runs written before this field
    /// existed load as f32.
    #[serde(default)]
    pub dtype: Precision,
}

impl SegTrainConfig {
    /// The GPS SAM recipe (gps-method.md) for `data_dir` and `sam`.
    pub fn recipe(data_dir: PathBuf, base: Option<PathBuf>, sam: SamConfig) -> Self {
        SegTrainConfig {
            data_dir,
            base,
            sam,
            method: Method::Gps,
            topk: 1,
            level: Level::Neuron,
            epochs: 20,
            lr: 2e-4,
            min_lr: 1e-7,
            weight_decay: 0.01,
            batch_size: 1,
            eval_batch_size: 8,
            seed: 42,
            select_batches: 32,
            resize: Resize::Squash,
            hflip: 0.5,
            threshold: 0.5,
            test_fraction: 0.12,
            train_limit: None,
            test_limit: None,
            max_steps_per_epoch: None,
            keep_last: 2,
            checkpoint_blocks: false,
            dtype: Precision::F32,
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
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.eval_batch_size == 0 {
            return bad("eval_batch_size", "must be at least 1");
        }
        if self.epochs == 0 && self.method != Method::ZeroShot {
            return bad("epochs", "must be at least 1");
        }
        if self.select_batches == 0 {
            return bad("select_batches", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return bad("hflip", "must be a probability in [0, 1]");
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return bad("test_fraction", "must be in (0, 1)");
        }
        crate::util::fs::require_dir(&self.data_dir, "data folder")?;
        if let Some(b) = &self.base {
            crate::util::fs::require_file(b, "base checkpoint")?;
        }
        self.sam.validate()
    }
}

/// One epoch's record (a line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub steps: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub eval: SegReport,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// What a checkpoint's `state.json` holds besides tensors.
pub type TrainState = crate::train::run::TrainState<EpochRecord>;

/// The result of a run, for the summary table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub method: String,
    pub trainable: usize,
    pub total: usize,
    pub trainable_pct: f64,
    pub best_epoch: Option<usize>,
    pub best: SegReport,
    pub last: SegReport,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub peak_rss_mb: f64,
    pub run_dir: PathBuf,
    /// Merged weights of the best epoch (full checkpoint of the base architecture).
    pub merged: Option<PathBuf>,
}

use crate::util::mem::peak_rss_mb;

/// Roles for whole-tensor methods from a policy (`Selected` tensors are not allowed here).
fn roles_from_policy(base: &TensorMap, policy: &Policy) -> HashMap<String, Role> {
    base.iter()
        .filter(|(n, t)| policy.treatment(n, t.dims()) == Treatment::Trainable)
        .map(|(n, _)| (n.clone(), Role::Trainable))
        .collect()
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

/// The data of a run: dataset, split (read from the run folder when resuming) and loaders.
pub struct SegData {
    pub dataset: KvasirDataset,
    pub split: Split,
    pub train_idx: Vec<usize>,
    pub test_idx: Vec<usize>,
}

impl SegData {
    /// Open the dataset and decide the split: the run's own `split.json` when it exists, else
    /// the data folder's split files, else a seeded split. The split is written to the run.
    pub fn open(cfg: &SegTrainConfig, run_dir: &Path) -> Result<SegData> {
        let dataset = KvasirDataset::open(&cfg.data_dir)?;
        let split_path = run_dir.join("split.json");
        let split = if split_path.exists() {
            Split::read_json(&split_path)?
        } else {
            match Split::from_root(&cfg.data_dir)? {
                Some(s) => s,
                None => Split::seeded(&dataset.ids(), cfg.seed, cfg.test_fraction),
            }
        };
        if !split_path.exists() {
            split.write_json(&split_path)?;
        }
        let mut train_idx = dataset.indices_of(&split.train, "split train list")?;
        let mut test_idx = dataset.indices_of(&split.test, "split test list")?;
        if let Some(n) = cfg.train_limit {
            train_idx.truncate(n);
        }
        if let Some(n) = cfg.test_limit {
            test_idx.truncate(n);
        }
        if train_idx.is_empty() || test_idx.is_empty() {
            return Err(Error::Data {
                msg: format!(
                    "{}: the split leaves {} training and {} test images; both must be non-empty",
                    cfg.data_dir.display(),
                    train_idx.len(),
                    test_idx.len()
                ),
            });
        }
        Ok(SegData {
            dataset,
            split,
            train_idx,
            test_idx,
        })
    }

    fn source(&self, cfg: &SegTrainConfig, hflip: f64) -> SegSource {
        SegSource {
            dataset: self.dataset.clone(),
            size: cfg.sam.image_size,
            resize: cfg.resize,
            augment: SegAugment { hflip },
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
        let mut lc = LoaderConfig::eval(cfg.eval_batch_size);
        lc.cache = true;
        Loader::new(self.source(cfg, 0.0), self.test_idx.clone(), lc)
    }
}

/// One evaluated image kept for overlays: its probability map and ground truth at the
/// original resolution.
#[derive(Debug, Clone)]
pub struct Kept {
    pub id: String,
    pub prob: Vec<f32>,
    pub gt: Vec<u8>,
}

/// Evaluate `sam` on a loader: per-image Dice/IoU at the ground truth's resolution.
/// `keep` returns the first `keep` probability maps (original resolution) for overlays.
pub fn evaluate(
    sam: &Sam,
    loader: &mut Loader<SegSource>,
    cfg: &SegTrainConfig,
    device: &Device,
    keep: usize,
    obs: &mut dyn Observer,
) -> Result<(SegReport, SegMetrics, Vec<Kept>)> {
    let mut metrics = SegMetrics::new(cfg.threshold);
    let mut kept = Vec::new();
    let total = loader.batches_per_epoch();
    obs.event(Event::PhaseStart {
        name: "eval".into(),
        total,
    });
    let mut done = 0;
    while let Some(batch) = loader.next_batch(device)? {
        let probs = predict_probs(sam, &batch)?;
        score_batch(&batch, &probs, cfg, &mut metrics, &mut kept, keep)?;
        done += 1;
        obs.event(Event::Step {
            done,
            loss: None,
            lr: None,
            images_per_s: None,
        });
    }
    loader.next_epoch();
    let report = metrics.compute();
    obs.event(Event::PhaseEnd {
        summary: format!(
            "mDice {:.4}  mIoU {:.4}  ({} images)",
            report.mdice, report.miou, report.images
        ),
    });
    Ok((report, metrics, kept))
}

/// Sigmoid probabilities `[B, S·S]` of the prompt-free logits, on the CPU.
pub fn predict_probs(sam: &Sam, batch: &SegBatch) -> Result<Vec<Vec<f32>>> {
    let logits = on_worker(|| sam.forward_prompt_free(&batch.images))?.detach();
    let probs = candle_nn::ops::sigmoid(&logits)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let b = probs.dim(0)?;
    let flat = probs.reshape((b, ()))?;
    Ok(flat.to_vec2::<f32>()?)
}

fn score_batch(
    batch: &SegBatch,
    probs: &[Vec<f32>],
    cfg: &SegTrainConfig,
    metrics: &mut SegMetrics,
    kept: &mut Vec<Kept>,
    keep: usize,
) -> Result<()> {
    let s = cfg.sam.image_size;
    for (i, p) in probs.iter().enumerate() {
        let orig = to_original(p, s, cfg.resize, batch.orig_sizes[i])?;
        metrics.update(SegInput {
            id: &batch.ids[i],
            prob: &orig,
            gt: &batch.orig_masks[i],
        });
        if kept.len() < keep {
            kept.push(Kept {
                id: batch.ids[i].clone(),
                prob: orig,
                gt: batch.orig_masks[i].clone(),
            });
        }
    }
    Ok(())
}

/// Selection for the sparse methods; reads it back from the run when resuming.
fn selection_for(
    cfg: &SegTrainConfig,
    base: &TensorMap,
    data: &SegData,
    art_dir: &Path,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<Artifact> {
    if art_dir.join("gps_config.json").exists() {
        let art = Artifact::load(art_dir, device)?;
        obs.event(Event::Info(format!(
            "selection: reusing {}",
            art_dir.display()
        )));
        return Ok(art);
    }
    let criterion = cfg
        .method
        .criterion()
        .ok_or_else(|| Error::msg("selection asked for a method without one"))?;
    let policy = Policy::sam();
    let t0 = Instant::now();
    let (grads, batches) = if criterion == Criterion::Gradient {
        let store = ParamStore::with_roles(
            base.clone(),
            crate::gps::grads::grad_roles(base, &policy),
            device,
        );
        let sam = Sam::new(&cfg.sam, &store)?.with_precision(cfg.dtype);
        let vars = store.trainable_vars();
        let mut loader = Loader::new(
            data.source(cfg, 0.0),
            data.train_idx.clone(),
            LoaderConfig {
                shuffle: true,
                augment: false,
                cache: false,
                ..LoaderConfig::train(cfg.batch_size, cfg.seed ^ 0x5e1ec7)
            },
        )?;
        let n = cfg.select_batches.min(loader.batches_per_epoch().max(1));
        obs.event(Event::PhaseStart {
            name: "select".into(),
            total: n,
        });
        let mut batches = Vec::with_capacity(n);
        for _ in 0..n {
            match loader.next_batch(device)? {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        let mut done = 0;
        let r = crate::gps::grads::accumulate(&vars, batches, |b: SegBatch| {
            let logits = sam.forward_prompt_free(&b.images)?;
            let loss = seg_loss(&logits, &b.masks)?;
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
    let selection: Selection = select_from_grads(
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
    let art = Artifact::new(
        policy,
        SelectionInfo {
            k: cfg.topk,
            level: cfg.level,
            criterion,
            selection_loss: "bce+iou".into(),
            batches,
            seed: cfg.seed,
        },
        BaseModel::of(base, &base_file)?,
        selection,
    )?;
    art.save(art_dir)?;
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

/// Selection alone (`gps-seg select` with data): accumulate the task-loss gradients of the
/// pretrained model over `cfg.select_batches` training batches and write the GPS artifact
/// (`gps_config.json` + `selection.safetensors`) to `out`, with the split beside it.
pub fn select(
    cfg: &SegTrainConfig,
    out: &Path,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<Artifact> {
    cfg.validate()?;
    cfg.dtype.check_device(device)?;
    if cfg.method.criterion().is_none() {
        return Err(Error::Config {
            field: "method".into(),
            msg: format!("`{}` selects nothing", cfg.method.name()),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let data = SegData::open(cfg, out)?;
    let base = base_weights(cfg, device)?;
    selection_for(cfg, &base, &data, out, device, obs)
}

/// Train (or resume) one segmentation run in `run_dir`.
pub fn train(
    cfg: &SegTrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<RunSummary> {
    cfg.validate()?;
    cfg.dtype.check_device(device)?;
    let t_start = Instant::now();
    let (ckpts, latest): (_, Option<(PathBuf, TrainState)>) =
        open_run(run_dir, cfg, cfg.keep_last, resume)?;
    write_json_atomic(&run_dir.join("sam_config.json"), &cfg.sam)?;

    let data = SegData::open(cfg, run_dir)?;
    obs.event(Event::Info(format!(
        "data: {} ({} train / {} test images, split {})",
        cfg.data_dir.display(),
        data.train_idx.len(),
        data.test_idx.len(),
        data.split.source
    )));
    let base = base_weights(cfg, device)?;

    // Roles per method.
    let artifact = match cfg.method {
        Method::Gps | Method::Random | Method::Magnitude => Some(selection_for(
            cfg,
            &base,
            &data,
            &run_dir.join("gps"),
            device,
            obs,
        )?),
        _ => None,
    };
    let roles_policy = match cfg.method {
        Method::Full => RolePolicy::AllTrainable,
        Method::Decoder => RolePolicy::Map(roles_from_policy(&base, &Policy::decoder())),
        Method::ZeroShot => RolePolicy::AllFrozen,
        _ => RolePolicy::Map(
            artifact
                .as_ref()
                .map(|a| a.selection.roles())
                .unwrap_or_default(),
        ),
    };
    let store = ParamStore::new(Some(base.clone()), roles_policy, device, cfg.seed);
    let sam = Sam::new(&cfg.sam, &store)?.with_precision(cfg.dtype);
    store.check_all_used()?;
    let (trainable, total) = store.counts();
    obs.event(Event::Info(format!(
        "method {}: {} of {} parameters train ({:.3}%)",
        cfg.method.name(),
        trainable,
        total,
        100.0 * trainable as f64 / total.max(1) as f64
    )));
    let vars = store.trainable_vars();
    let mut opt = match cfg.method {
        Method::Full => Opt::AdamW(AdamW::new(vars.clone(), cfg.lr, cfg.weight_decay)?),
        _ => Opt::Adam(Adam::new(vars.clone(), cfg.lr)?),
    };
    let schedule = Schedule::Cosine {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        total: cfg.epochs,
    };
    let mut train_loader = data.train_loader(cfg)?;
    let mut test_loader = data.test_loader(cfg)?;

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

    let keep_overlays = 4;
    let mut steps_time = 0.0;
    let mut steps_count = 0usize;
    if cfg.method == Method::ZeroShot {
        let (report, metrics, kept) =
            evaluate(&sam, &mut test_loader, cfg, device, keep_overlays, obs)?;
        write_overlays(run_dir, &data, &kept, cfg)?;
        write_scores(run_dir, &metrics)?;
        state.history.push(EpochRecord {
            epoch: 0,
            steps: 0,
            train_loss: f64::NAN,
            lr: 0.0,
            eval: report,
            seconds: 0.0,
            images_per_s: 0.0,
        });
        state.best_epoch = Some(0);
    }
    while state.epochs_done < cfg.epochs && cfg.method != Method::ZeroShot {
        let epoch = state.epochs_done;
        let lr = schedule.lr(epoch);
        opt.get().set_lr(lr);
        let per_epoch = train_loader.batches_per_epoch();
        let steps = cfg
            .max_steps_per_epoch
            .map_or(per_epoch, |m| m.min(per_epoch));
        obs.event(Event::PhaseStart {
            name: format!("epoch {}/{}", epoch + 1, cfg.epochs),
            total: steps,
        });
        let t0 = Instant::now();
        let mut loss_sum = 0.0;
        let mut images = 0usize;
        // Batch k+1 is decoded and augmented on a background thread while step k runs.
        train_loader.run_batches(steps, device, |step, batch| {
            let ts = Instant::now();
            // Forward, backward and the update run on a rayon worker (`on_worker`).
            let (loss, grads) = on_worker(|| -> Result<_> {
                if cfg.checkpoint_blocks {
                    sam.prompt_free_backward_checkpointed(&batch.images, |l| {
                        seg_loss(l, &batch.masks)
                    })
                } else {
                    let logits = sam.forward_prompt_free(&batch.images)?;
                    let loss = seg_loss(&logits, &batch.masks)?;
                    let grads = loss.backward()?;
                    Ok((loss, grads))
                }
            })?;
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
            on_worker(|| o.step(&grads))?;
            steps_time += ts.elapsed().as_secs_f64();
            steps_count += 1;
            state.global_step += 1;
            state.step_losses.push(lv);
            loss_sum += lv as f64;
            images += batch.ids.len();
            obs.event(Event::Step {
                done: step + 1,
                loss: Some(loss_sum / (step + 1) as f64),
                lr: Some(lr),
                images_per_s: Some(images as f64 / t0.elapsed().as_secs_f64().max(1e-9)),
            });
            Ok(())
        })?;
        train_loader.next_epoch();
        let train_secs = t0.elapsed().as_secs_f64();
        let done_steps = steps.max(1);
        obs.event(Event::PhaseEnd {
            summary: format!(
                "loss {:.4}  {:.1} img/s",
                loss_sum / done_steps as f64,
                images as f64 / train_secs.max(1e-9)
            ),
        });
        let (report, metrics, kept) =
            evaluate(&sam, &mut test_loader, cfg, device, keep_overlays, obs)?;
        let rec = EpochRecord {
            epoch: epoch + 1,
            steps,
            train_loss: loss_sum / done_steps as f64,
            lr,
            eval: report.clone(),
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s: images as f64 / train_secs.max(1e-9),
        };
        state.history.push(rec);
        state.epochs_done = epoch + 1;
        state.loader = train_loader.state();
        let is_best = state
            .best_epoch
            .and_then(|b| state.history.iter().find(|r| r.epoch == b))
            .is_none_or(|b| report.mdice > b.eval.mdice);
        if is_best {
            state.best_epoch = Some(epoch + 1);
        }
        // Checkpoint: trainable tensors (deltas for GPS), optimiser, state.
        let params = snapshot(&vars);
        let ost = opt.get().state()?;
        ckpts.save(
            epoch + 1,
            &[("params", &params), ("optimizer", &ost)],
            &state,
        )?;
        if is_best {
            ckpts.mark_best(epoch + 1)?;
            write_overlays(run_dir, &data, &kept, cfg)?;
            write_scores(run_dir, &metrics)?;
        }
        write_jsonl(&run_dir.join("metrics.jsonl"), &state.history)?;
        write_curves(run_dir, &state)?;
    }

    // Merge the best epoch into a full checkpoint of the base architecture.
    let merged_path = run_dir.join("merged.safetensors");
    let mut merged_out = None;
    if cfg.method != Method::ZeroShot {
        let best_dir = run_dir.join("best");
        let best_params = tensors::load(&best_dir.join("params.safetensors"), device)?;
        let merged = match &artifact {
            Some(art) => {
                let mut art = art.clone();
                let delta = delta_from_params(&art, &best_params)?;
                art.set_delta(delta)?;
                art.save(&run_dir.join("gps"))?;
                crate::gps::merge::merge(&base, &art)?
            }
            None => {
                let mut m = base.clone();
                for (n, t) in best_params {
                    m.insert(n, t);
                }
                m
            }
        };
        tensors::save_safetensors(&merged_path, &merged, None)?;
        merged_out = Some(merged_path);
    } else if let Some(p) = &cfg.base {
        merged_out = Some(p.clone());
    }

    let best = state
        .best_epoch
        .and_then(|b| state.history.iter().find(|r| r.epoch == b))
        .map(|r| r.eval.clone())
        .unwrap_or_default();
    let last = state
        .history
        .last()
        .map(|r| r.eval.clone())
        .unwrap_or_default();
    let summary = RunSummary {
        method: cfg.method.name().into(),
        trainable,
        total,
        trainable_pct: 100.0 * trainable as f64 / total.max(1) as f64,
        best_epoch: state.best_epoch,
        best,
        last,
        seconds: t_start.elapsed().as_secs_f64(),
        seconds_per_step: if steps_count > 0 {
            steps_time / steps_count as f64
        } else {
            0.0
        },
        peak_rss_mb: peak_rss_mb(),
        run_dir: run_dir.to_path_buf(),
        merged: merged_out,
    };
    write_json_atomic(&run_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

/// Per-image scores of the best epoch (`scores.csv`).
fn write_scores(run_dir: &Path, metrics: &SegMetrics) -> Result<()> {
    let mut s = String::from("id,dice,iou\n");
    for r in &metrics.scores {
        s.push_str(&format!("{},{:.6},{:.6}\n", r.id, r.dice, r.iou));
    }
    write_atomic(&run_dir.join("scores.csv"), s.as_bytes())
}

fn write_overlays(
    run_dir: &Path,
    data: &SegData,
    kept: &[Kept],
    cfg: &SegTrainConfig,
) -> Result<()> {
    let dir = run_dir.join("overlays");
    for k in kept {
        let Some(entry) = data.dataset.entries.iter().find(|e| e.id == k.id) else {
            continue;
        };
        let img = crate::data::imgio::decode_rgb(&entry.image_path)?;
        let (w, h) = img.dimensions();
        let pred: Vec<u8> = k.prob.iter().map(|&p| (p >= cfg.threshold) as u8).collect();
        let o = crate::util::draw::overlay(img.as_raw(), w, h, &pred, Some(&k.gt))?;
        crate::util::draw::save_png(&dir.join(format!("{}.png", k.id)), &o)?;
    }
    Ok(())
}

fn write_curves(run_dir: &Path, state: &TrainState) -> Result<()> {
    use crate::util::draw::{line_chart, save_png, Series};
    let pts = smoothed_loss(&state.step_losses);
    let loss = line_chart(
        "TRAINING LOSS (BCE + SOFT IOU)",
        "STEP",
        &[Series {
            name: "loss",
            points: pts,
        }],
        720,
        400,
    );
    save_png(&run_dir.join("loss.png"), &loss)?;
    let ep = |f: fn(&EpochRecord) -> f64| -> Vec<(f64, f64)> {
        state
            .history
            .iter()
            .map(|r| (r.epoch as f64, f(r)))
            .collect()
    };
    let m = line_chart(
        "HELD-OUT METRICS",
        "EPOCH",
        &[
            Series {
                name: "mDice",
                points: ep(|r| r.eval.mdice),
            },
            Series {
                name: "mIoU",
                points: ep(|r| r.eval.miou),
            },
        ],
        720,
        400,
    );
    save_png(&run_dir.join("metrics.png"), &m)
}
