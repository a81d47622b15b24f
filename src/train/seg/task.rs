//! Segmentation fine-tuning of SAM on a Kvasir-shaped dataset: the GPS recipe and its
//! baselines, as a [`Task`] of the one training loop ([`crate::train::fit`]).
//!
//! What is specific to segmentation: data (split file or seeded split, written into the run),
//! base weights (resized position tables), the prompt-free model with its compute dtype, the
//! loss (BCE + soft IoU; optionally with checkpointed encoder blocks), selection with the task
//! loss and `Policy::sam()`, a per-epoch cosine schedule, held-out per-image Dice/IoU at the
//! ground truth's resolution (mDice picks the best epoch), overlays and `scores.csv`.
//! Methods: gps / random / magnitude (sparse), full, decoder, zero-shot ([`fit::evaluate`]).
//! With `prompt` set (`--prompt box|points|box+points`) the same task trains and evaluates
//! SAM's prompted path instead ([`super::prompted`]); `none` is the recipe above, unchanged.

use super::prompted as seg_prompted;
use crate::data::kvasir::SegBatch;
use crate::data::loader::{Loader, LoaderConfig, SegSource};
use crate::data::resize::to_original;
use crate::error::{Error, Result};
use crate::gps::artifact::Artifact;
use crate::gps::policy::Policy;
use crate::metrics::{
    probs_to_8bit, score_8bit, set_of_id, FieldOptions, FieldScore, Metric, SegInput, SegMetrics,
    SetTable,
};
use crate::nn::{ParamStore, RolePolicy};
use crate::progress::{Event, Observer};
use crate::sam::Sam;
use crate::train::fit;
use crate::train::fit::folder::roles_from_policy;
use crate::train::fit::schedule::Schedule;
use crate::train::loss::seg_loss;
use crate::train::task::{Curves, Fitted, Loaders, ScheduleUnit, SelectionSetup, Task};
use crate::util::fs::{write_atomic, write_json_atomic};
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

use super::config::{RunSummary, SegEval, SegSummary, SegTrainConfig};
use super::data::{base_weights, SegData};
use crate::train::config::{Method, TrainCore};

/// Train (or resume) one segmentation run in `run_dir`; `zero-shot` evaluates the base model
/// instead ([`fit::evaluate`]).
pub fn train(
    cfg: &SegTrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<RunSummary> {
    match cfg.method {
        Method::ZeroShot => fit::evaluate(cfg, run_dir, device, obs),
        _ => fit::fit(cfg, run_dir, device, resume, obs),
    }
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
    fit::select(cfg, out, device, obs)
}

impl Task for SegTrainConfig {
    type Source = SegSource;
    type Model = Sam;
    type Data = SegData;
    type Eval = SegEval;
    type Kept = (SegMetrics, Vec<Kept>);
    type Extra = SegSummary;

    const METHODS: &'static [Method] = &[
        Method::Gps,
        Method::GpsEncoder,
        Method::Full,
        Method::Decoder,
        Method::DecoderBias,
        Method::Random,
        Method::Magnitude,
        Method::ZeroShot,
    ];
    const NAME: &'static str = "segmentation";
    const CURVES: Curves = Curves {
        loss: "BCE + soft IoU",
        score: "mDice",
        file: "metrics.png",
    };

    fn core(&self) -> &TrainCore {
        &self.core
    }

    /// The training step splits batches of two or more into per-thread chunks unless it
    /// recomputes blocks or is prompted (see `train_step`).
    fn elementwise_pool(&self) -> Option<(bool, usize)> {
        let split =
            self.core.batch_size >= 2 && !self.checkpoint_blocks && !self.prompt.is_prompted();
        Some((split, self.sam.encoder_values_per_image()))
    }

    fn validate(&self, device: &Device) -> Result<()> {
        if !(0.0..=1.0).contains(&self.hflip) {
            return Err(Error::Config {
                field: "hflip".into(),
                msg: "must be a probability in [0, 1]".into(),
            });
        }
        self.sam.validate()?;
        self.prompt.validate()?;
        if self.prompt.is_prompted() && self.checkpoint_blocks {
            return Err(Error::Config {
                field: "checkpoint_blocks".into(),
                msg: "block checkpointing is implemented for the prompt-free path only; \
                      drop --checkpoint-blocks or --prompt"
                    .into(),
            });
        }
        self.dtype.check_device(device)
    }

    fn open(
        &self,
        run_dir: &Path,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(SegData, TensorMap)> {
        write_json_atomic(&run_dir.join("sam_config.json"), &self.sam)?;
        let data = SegData::open(self, run_dir)?;
        obs.event(Event::Info(format!(
            "data: {} ({} train / {} test images, split {})",
            self.data_dir.display(),
            data.train_idx.len(),
            data.test_idx.len(),
            data.split.source
        )));
        Ok((data, base_weights(self, device)?))
    }

    fn baseline_roles(&self, base: &TensorMap) -> Result<RolePolicy> {
        match self.method {
            Method::Full => Ok(RolePolicy::AllTrainable),
            Method::Decoder => Ok(roles_from_policy(base, &Policy::decoder())),
            Method::DecoderBias => Ok(roles_from_policy(base, &Policy::sam_decoder_bias())),
            m => Err(Error::msg(format!(
                "`{}` has no whole-tensor roles",
                m.name()
            ))),
        }
    }

    fn build(&self, _data: &SegData, store: &ParamStore) -> Result<Sam> {
        Ok(Sam::new(&self.sam, store)?.with_precision(self.dtype))
    }

    fn loaders(&self, data: &SegData) -> Result<Loaders<SegSource>> {
        Ok(Loaders {
            train: data.train_loader(self)?,
            val: Some(data.val_loader(self)?),
            test: data.test_loader(self)?,
        })
    }

    fn schedule(&self, _steps_per_epoch: usize) -> (Schedule, ScheduleUnit) {
        let s = Schedule::Cosine {
            lr: self.lr,
            min_lr: self.min_lr,
            total: self.epochs,
        };
        (s, ScheduleUnit::Epoch)
    }

    fn train_step(&self, sam: &Sam, batch: &SegBatch) -> Result<(Tensor, GradStore)> {
        if self.prompt.is_prompted() {
            let loss = seg_prompted::prompted_loss(sam, batch, &self.prompt)?;
            let grads = loss.backward()?;
            Ok((loss, grads))
        } else if self.checkpoint_blocks {
            sam.prompt_free_backward_checkpointed(&batch.images, |l| seg_loss(l, &batch.masks))
        } else {
            // seg_loss is a batch mean of per-image terms: on the CPU, one image chunk per
            // thread, each weighted by its share (`nn::split_backward`).
            let n = batch.images.dim(0)?;
            crate::nn::split_backward(n, batch.images.device().is_cpu(), |r| {
                let x = batch.images.narrow(0, r.start, r.len())?;
                let m = batch.masks.narrow(0, r.start, r.len())?;
                Ok((seg_loss(&sam.forward_prompt_free(&x)?, &m)? * (r.len() as f64 / n as f64))?)
            })
        }
    }

    /// The prompt-free loss is a batch mean of per-image terms; the prompted one a mean over
    /// objects (images hold different numbers), which shards would weight differently.
    fn batch_mean_loss(&self) -> bool {
        !self.prompt.is_prompted()
    }

    fn batch_len(batch: &SegBatch) -> Result<usize> {
        Ok(batch.ids.len())
    }

    fn evaluate(
        &self,
        sam: &Sam,
        loader: &mut Loader<SegSource>,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(SegEval, Self::Kept)> {
        let (eval, metrics, kept) = evaluate(sam, loader, self, device, KEEP_OVERLAYS, obs)?;
        Ok((eval, (metrics, kept)))
    }

    fn score(eval: &SegEval) -> f64 {
        eval.eval.mdice
    }

    fn write_best(&self, run_dir: &Path, data: &SegData, kept: &Self::Kept) -> Result<()> {
        write_overlays(run_dir, data, &kept.1, self)?;
        write_scores(run_dir, &kept.0)
    }

    fn split_sizes(&self, data: &SegData) -> [usize; 3] {
        [
            data.train_idx.len(),
            data.val_idx.len(),
            data.test_idx.len(),
        ]
    }

    fn summary(&self, _data: &SegData, f: &Fitted<SegEval>) -> SegSummary {
        SegSummary {
            val: f.best_val.eval.clone(),
            best: f.best.eval.clone(),
            last: f.last.eval.clone(),
            test_sets: f.best.sets.clone(),
            merged: f.merged.clone(),
        }
    }

    fn selection(&self) -> Option<SelectionSetup> {
        Some(SelectionSetup {
            policy: match self.method {
                Method::GpsEncoder => Policy::sam_encoder_only(),
                _ => Policy::sam(),
            },
            loss_name: if self.prompt.is_prompted() {
                format!("prompted ({}) bce+iou", self.prompt.kind.name())
            } else {
                "bce+iou".into()
            },
            phase: "select".into(),
        })
    }

    fn selection_loader(&self, data: &SegData) -> Result<Loader<SegSource>> {
        let lc = LoaderConfig {
            shuffle: true,
            augment: false,
            cache: false,
            ..LoaderConfig::train(self.batch_size, self.seed ^ 0x5e1ec7)
        };
        Loader::new(data.source(self, 0.0), data.train_idx.clone(), lc)
    }

    fn selection_loss(&self, sam: &Sam, batch: &SegBatch) -> Result<Tensor> {
        if self.prompt.is_prompted() {
            return seg_prompted::prompted_loss(sam, batch, &self.prompt);
        }
        seg_loss(&sam.forward_prompt_free(&batch.images)?, &batch.masks)
    }

    /// Always with the encoder's blocks recomputed in backward: the selection pass computes a
    /// dense gradient of every selected tensor, and with the whole encoder graph on top it was
    /// a run's peak (vit_b@512: 3.0 GB plain, 1.4 GB recomputed; the same selection, bit for
    /// bit, docs/PERF.md). It costs one more encoder forward per selection batch. A prompted
    /// task ranks with its own prompted loss (no block recomputation on that path: its
    /// backward keeps only the vars' gradients).
    fn selection_backward(&self, sam: &Sam, batch: &SegBatch) -> Result<(Tensor, GradStore)> {
        if self.prompt.is_prompted() {
            let loss = seg_prompted::prompted_loss(sam, batch, &self.prompt)?;
            let grads = crate::nn::backward_vars(&loss)?;
            return Ok((loss.detach(), grads));
        }
        sam.prompt_free_backward_checkpointed(&batch.images, |l| seg_loss(l, &batch.masks))
    }
}

/// Probability maps kept per evaluation for the best epoch's overlays.
const KEEP_OVERLAYS: usize = 4;

/// One evaluated image kept for overlays: its probability map and ground truth at the
/// original resolution.
#[derive(Debug, Clone)]
pub struct Kept {
    pub id: String,
    pub prob: Vec<f32>,
    pub gt: Vec<u8>,
}

/// Evaluate `sam` on a loader: per-image Dice/IoU at the ground truth's resolution, and for
/// set-qualified ids (a PraNet run's test sets, `Kvasir/<id>`) the field's metrics per set
/// ([`SetTable`]) on the 8-bit map `infer --save-probs` saves ([`probs_to_8bit`]), so `infer
/// --run` scores exactly the values training scored. `keep` returns the first `keep`
/// probability maps (original resolution) for overlays.
pub fn evaluate(
    sam: &Sam,
    loader: &mut Loader<SegSource>,
    cfg: &SegTrainConfig,
    device: &Device,
    keep: usize,
    obs: &mut dyn Observer,
) -> Result<(SegEval, SegMetrics, Vec<Kept>)> {
    let mut metrics = SegMetrics::new(cfg.threshold);
    let mut table = SetTable::new(FieldOptions::default(), "test");
    let mut kept = Vec::new();
    let total = loader.batches_per_epoch();
    obs.event(Event::PhaseStart {
        name: "eval".into(),
        total,
    });
    let mut done = 0;
    while let Some(batch) = loader.next_batch(device)? {
        let probs = if cfg.prompt.is_prompted() {
            seg_prompted::predict_probs(sam, &batch, &cfg.prompt)?
        } else {
            predict_probs(sam, &batch)?
        };
        score_batch(
            &batch,
            &probs,
            cfg,
            (&mut metrics, &mut table),
            &mut kept,
            keep,
        )?;
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
    let sets = table.finish()?;
    obs.event(Event::PhaseEnd {
        summary: format!(
            "mDice {:.4}  mIoU {:.4}  ({} images{})",
            report.mdice,
            report.miou,
            report.images,
            match sets.len() {
                0 => String::new(),
                n => format!(", {n} test sets"),
            }
        ),
    });
    Ok((SegEval { eval: report, sets }, metrics, kept))
}

/// Sigmoid probabilities `[B, S·S]` of the prompt-free logits, on the CPU.
pub fn predict_probs(sam: &Sam, batch: &SegBatch) -> Result<Vec<Vec<f32>>> {
    // One image chunk per thread on the CPU (`nn::split_forward`).
    let logits = crate::nn::split_forward(&batch.images, |x| sam.predict_prompt_free(x))?;
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
    (metrics, table): (&mut SegMetrics, &mut SetTable),
    kept: &mut Vec<Kept>,
    keep: usize,
) -> Result<()> {
    use rayon::prelude::*;
    let s = cfg.sam.image_size;
    let n = batch.ids.len();
    if probs.len() != n || batch.orig_sizes.len() != n || batch.orig_masks.len() != n {
        return Err(Error::msg(format!(
            "evaluation batch: {} probability maps for {n} images ({} sizes, {} masks)",
            probs.len(),
            batch.orig_sizes.len(),
            batch.orig_masks.len()
        )));
    }
    // Back to each image's resolution and, for a test set's image, the field's metrics on its
    // 8-bit map: one image per thread.
    type Scored = (Vec<f32>, Option<FieldScore>);
    let scored: Vec<Scored> = (0..n)
        .into_par_iter()
        .map(|i| -> Result<Scored> {
            let size = batch.orig_sizes[i];
            let orig = to_original(&probs[i], s, cfg.resize, size)?;
            let field = match set_of_id(&batch.ids[i]) {
                Some(_) => Some(
                    score_8bit(
                        &probs_to_8bit(&orig),
                        &batch.orig_masks[i],
                        size,
                        &FieldOptions::default(),
                    )
                    .map_err(|e| Error::msg(format!("image `{}`: {e}", batch.ids[i])))?,
                ),
                None => None,
            };
            Ok((orig, field))
        })
        .collect::<Result<_>>()?;
    for ((orig, field), (id, gt)) in scored
        .into_iter()
        .zip(batch.ids.iter().zip(&batch.orig_masks))
    {
        metrics.update(SegInput {
            id,
            prob: &orig,
            gt,
        });
        if let Some(f) = field {
            table.add(id, f);
        }
        if kept.len() < keep {
            kept.push(Kept {
                id: id.clone(),
                prob: orig,
                gt: gt.clone(),
            });
        }
    }
    Ok(())
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
        let found = data.dataset.entries.iter().chain(&data.test.entries);
        let Some(entry) = found.into_iter().find(|e| e.id == k.id) else {
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
