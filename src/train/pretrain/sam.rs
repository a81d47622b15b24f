//! Pretraining the project's small SAM on the synthetic "segment anything" upstream task
//! ([`crate::data::synth_scenes`]), so that GPS has a *pretrained* model to adapt.
//!
//! Every step draws a fresh batch of scenes (an endless stream; no epochs) and trains three
//! things at once, as SAM's own training does in spirit:
//! - prompt-free decoding (dense prompt = `no_mask_embed`) against the foreground union;
//! - a prompted decoding per image: one positive point (multimask, loss on the best of the
//!   three masks as in SAM), or a box (single mask), or both;
//! - the IoU head, regressing each predicted mask's actual IoU.
//!
//! Prompted losses are computed at the decoder's low resolution (targets area-downsampled).
//! It runs on the one training loop ([`PretrainTask`]): AdamW with warm-up + cosine per step,
//! an epoch every `eval_every` steps (evaluation, checkpoint), resumable.

use crate::data::loader::{Loader, LoaderConfig, Source};
use crate::data::synth_scenes::{scene, Scene};
use crate::error::{Error, Result};
use crate::nn::{ParamStore, RolePolicy};
use crate::progress::{Event, Observer};
use crate::sam::{Sam, SamConfig};
use crate::train::config::{Method, TrainCore};
use crate::train::fit::schedule::Schedule;
use crate::train::loss::seg_loss;
use crate::train::task::{Curves, Fitted, Loaders, ScheduleUnit, Task};
use crate::util::tensors::{self, TensorMap};
use crate::util::Rng;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Pretraining settings (written beside the result).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainConfig {
    pub sam: SamConfig,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub seed: u64,
    /// Evaluate and checkpoint every this many steps.
    pub eval_every: usize,
    /// Validation scenes (a stream disjoint from training: another seed).
    pub val_scenes: usize,
    /// Version of the scene generator (bump when it changes).
    pub generator_version: u32,
}

impl PretrainConfig {
    pub fn new(sam: SamConfig) -> Self {
        PretrainConfig {
            sam,
            steps: 2000,
            batch_size: 8,
            lr: 4e-4,
            min_lr: 1e-5,
            weight_decay: 0.01,
            warmup: 100,
            seed: 0,
            eval_every: 100,
            val_scenes: 64,
            generator_version: 1,
        }
    }
}

/// Upstream validation metrics (mean IoU over scenes at 0.5).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UpstreamReport {
    /// Prompt-free foreground IoU.
    pub prompt_free_miou: f64,
    /// One positive point, mask with the highest predicted IoU.
    pub point_miou: f64,
    /// Box prompt, single mask.
    pub box_miou: f64,
    pub scenes: usize,
}

/// What a finished pretraining reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainSummary {
    pub config: PretrainConfig,
    pub steps: usize,
    pub final_report: UpstreamReport,
    pub history: Vec<(usize, f64, UpstreamReport)>,
    pub seconds: f64,
    pub weights: PathBuf,
}

const VAL_SEED_OFFSET: u64 = 0x7a11_da7e;

struct PromptBatch {
    images: Tensor,
    fg: Tensor,
    coords: Tensor,
    labels: Tensor,
    boxes: Tensor,
    /// Target of the prompted object at low resolution `[B, 1, l, l]` (soft, area-averaged).
    obj_low: Tensor,
}

fn downsample_area(mask: &[u8], s: usize, l: usize) -> Vec<f32> {
    let f = s / l;
    let mut out = vec![0f32; l * l];
    for y in 0..l {
        for x in 0..l {
            let mut acc = 0u32;
            for dy in 0..f {
                for dx in 0..f {
                    acc += mask[(y * f + dy) * s + x * f + dx] as u32;
                }
            }
            out[y * l + x] = acc as f32 / (f * f) as f32;
        }
    }
    out
}

fn make_batch(scenes: &[Scene], rng: &mut Rng, low: usize, device: &Device) -> Result<PromptBatch> {
    let b = scenes.len();
    let s = scenes[0].size;
    let mut images = Vec::with_capacity(b * 3 * s * s);
    let mut fg = Vec::with_capacity(b * s * s);
    let mut coords = Vec::with_capacity(b * 2);
    let mut boxes = Vec::with_capacity(b * 4);
    let mut obj = Vec::with_capacity(b * low * low);
    for sc in scenes {
        images.extend_from_slice(&sc.image);
        fg.extend(sc.foreground.iter().map(|&v| v as f32));
        let i = rng.below(sc.objects.len().max(1));
        let (px, py) = sc
            .point_in(i, rng)
            .unwrap_or((s as f32 / 2.0, s as f32 / 2.0));
        coords.extend_from_slice(&[px, py]);
        let bb = sc.bbox(i).unwrap_or([0.0, 0.0, s as f32, s as f32]);
        boxes.extend_from_slice(&bb);
        match sc.objects.get(i) {
            Some(m) => obj.extend(downsample_area(m, s, low)),
            None => obj.extend(std::iter::repeat_n(0f32, low * low)),
        }
    }
    Ok(PromptBatch {
        images: Tensor::from_vec(images, (b, 3, s, s), device)?,
        fg: Tensor::from_vec(fg, (b, 1, s, s), device)?,
        coords: Tensor::from_vec(coords, (b, 1, 2), device)?,
        labels: Tensor::ones((b, 1), DType::F32, device)?,
        boxes: Tensor::from_vec(boxes, (b, 4), device)?,
        obj_low: Tensor::from_vec(obj, (b, 1, low, low), device)?,
    })
}

/// Per-(image, mask) BCE + soft IoU of `logits [B, M, l, l]` against `target [B, 1, l, l]`
/// → `[B, M]`; also the hard IoU of each mask (no gradient) for the IoU head.
fn per_mask_losses(logits: &Tensor, target: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = target.broadcast_as(logits.shape())?;
    let bce = (logits.relu()? - (logits * &t)?)?
        .broadcast_add(&((logits.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    let bce = bce.flatten_from(2)?.mean(D::Minus1)?;
    let p = candle_nn::ops::sigmoid(logits)?;
    let inter = (&p * &t)?.flatten_from(2)?.sum(D::Minus1)?;
    let union = ((&p + &t)? - (&p * &t)?)?.flatten_from(2)?.sum(D::Minus1)?;
    let iou_loss = (1.0 - (inter / (union + 1e-6)?)?)?;
    let hard = p.detach().ge(0.5)?.to_dtype(DType::F32)?;
    let tb = t.ge(0.5)?.to_dtype(DType::F32)?;
    let hi = (&hard * &tb)?.flatten_from(2)?.sum(D::Minus1)?;
    let hu = ((&hard + &tb)? - (&hard * &tb)?)?
        .flatten_from(2)?
        .sum(D::Minus1)?;
    let hard_iou = (hi / (hu + 1e-6)?)?;
    Ok(((bce + iou_loss)?, hard_iou))
}

fn scenes_for(seed: u64, start: u64, n: usize, size: usize) -> Vec<Scene> {
    (0..n as u64)
        .into_par_iter()
        .map(|i| scene(seed, start + i, size))
        .collect()
}

/// One training step's loss.
fn step_loss(sam: &Sam, batch: &PromptBatch, mode: usize) -> Result<Tensor> {
    let x = sam.normalize(&batch.images)?;
    let emb = sam.image_embeddings(&x)?;
    let s = sam.config.image_size;
    let low_pf = sam.decode_prompt_free(&emb)?;
    let up = crate::nn::layers::resize_bilinear(&low_pf, s, s)?;
    let loss_pf = seg_loss(&up, &batch.fg)?;
    let (points, boxes, multimask) = match mode {
        0 => (Some((&batch.coords, &batch.labels)), None, true),
        1 => (None, Some(&batch.boxes), false),
        _ => (
            Some((&batch.coords, &batch.labels)),
            Some(&batch.boxes),
            false,
        ),
    };
    let (masks, iou_pred) = sam.forward_prompted(&emb, points, boxes, multimask)?;
    let (per, hard_iou) = per_mask_losses(&masks, &batch.obj_low)?;
    let best = per.min(D::Minus1)?.mean_all()?;
    let iou_mse = (iou_pred - hard_iou.detach())?.sqr()?.mean_all()?;
    Ok(((loss_pf + best)? + iou_mse)?)
}

/// Evaluate on the validation stream.
pub fn evaluate_upstream(
    sam: &Sam,
    seed: u64,
    n: usize,
    batch: usize,
    device: &Device,
) -> Result<UpstreamReport> {
    let s = sam.config.image_size;
    let low = 4 * sam.config.grid_size();
    let mut rng = Rng::derive(seed ^ VAL_SEED_OFFSET, "val-prompts");
    let (mut pf, mut pt, mut bx) = (0.0, 0.0, 0.0);
    let mut count = 0usize;
    let mut start = 0u64;
    while count < n {
        let m = batch.min(n - count);
        let scenes = scenes_for(seed ^ VAL_SEED_OFFSET, start, m, s);
        start += m as u64;
        let pb = make_batch(&scenes, &mut rng, low, device)?;
        let x = sam.normalize(&pb.images)?;
        let emb = sam.image_embeddings(&x)?;
        let up = crate::nn::layers::resize_bilinear(&sam.decode_prompt_free(&emb)?, s, s)?;
        let (_, iou_pf) = per_mask_losses(&up, &pb.fg)?;
        pf += iou_pf.sum_all()?.to_scalar::<f32>()? as f64;
        let (masks, pred) =
            sam.forward_prompted(&emb, Some((&pb.coords, &pb.labels)), None, true)?;
        let (_, hard) = per_mask_losses(&masks, &pb.obj_low)?;
        let pick = pred.argmax_keepdim(D::Minus1)?;
        pt += hard
            .gather(&pick, D::Minus1)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        let (masks, _) = sam.forward_prompted(&emb, None, Some(&pb.boxes), false)?;
        let (_, hard) = per_mask_losses(&masks, &pb.obj_low)?;
        bx += hard.sum_all()?.to_scalar::<f32>()? as f64;
        count += m;
    }
    Ok(UpstreamReport {
        prompt_free_miou: pf / count as f64,
        point_miou: pt / count as f64,
        box_miou: bx / count as f64,
        scenes: count,
    })
}

/// Scenes as a streaming source of the one loop: item `i` of epoch `e` is scene number
/// `e · len + i` of the training stream (`len` = a chunk's scenes), never repeated; a batch's
/// prompts come from `Rng::derive(seed ^ step, "prompts")` as before the loop took over, and
/// its mode (point / box / both) from the step.
#[derive(Debug, Clone)]
pub struct SceneSource {
    seed: u64,
    size: usize,
    low: usize,
    batch_size: usize,
    /// Scenes per epoch (= steps per chunk × batch size).
    len: usize,
}

/// A training batch and the step it is.
pub struct SceneBatch {
    batch: PromptBatch,
    mode: usize,
    len: usize,
}

impl Source for SceneSource {
    type Item = (u64, Scene);
    type Ready = (u64, Scene);
    type Batch = SceneBatch;
    fn len(&self) -> usize {
        self.len
    }
    fn streaming(&self) -> bool {
        true
    }
    fn load(&self, index: usize) -> Result<(u64, Scene)> {
        self.load_at(0, index)
    }
    fn load_at(&self, epoch: u64, index: usize) -> Result<(u64, Scene)> {
        let n = epoch
            .checked_mul(self.len as u64)
            .and_then(|x| x.checked_add(index as u64))
            .ok_or_else(|| Error::msg("scene index over 2^64"))?;
        Ok((n, scene(self.seed, n, self.size)))
    }
    fn prepare(&self, item: (u64, Scene), _rng: &mut Rng, _augment: bool) -> (u64, Scene) {
        item
    }
    fn collate(&self, items: Vec<(u64, Scene)>, device: &Device) -> Result<SceneBatch> {
        let first = items.first().map_or(0, |i| i.0);
        let step = first / self.batch_size.max(1) as u64;
        let scenes: Vec<Scene> = items.into_iter().map(|(_, s)| s).collect();
        let mut rng = Rng::derive(self.seed ^ step, "prompts");
        let len = scenes.len();
        Ok(SceneBatch {
            batch: make_batch(&scenes, &mut rng, self.low, device)?,
            mode: (step % 3) as usize,
            len,
        })
    }
}

/// SAM pretraining as a task of the one loop ([`crate::train::fit`]): `full` from a seeded
/// random init, AdamW with warm-up + cosine per step, epochs of `eval_every` steps on a
/// stream of scenes (the last one shorter when `steps` is not a multiple), evaluation on the
/// validation stream after each, no validation split (nothing is chosen: the last weights
/// ship).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainTask {
    #[serde(flatten)]
    pub core: TrainCore,
    pub sam: SamConfig,
    pub warmup: usize,
    pub eval_every: usize,
    pub val_scenes: usize,
    pub generator_version: u32,
}

impl PretrainTask {
    /// The loop's settings for `cfg`.
    pub fn new(cfg: &PretrainConfig) -> PretrainTask {
        PretrainTask {
            core: TrainCore {
                data_dir: PathBuf::new(),
                base: None,
                method: Method::Full,
                topk: 1,
                level: crate::gps::select::Level::Neuron,
                epochs: cfg.steps.div_ceil(cfg.eval_every.max(1)),
                lr: cfg.lr,
                min_lr: cfg.min_lr,
                weight_decay: cfg.weight_decay,
                batch_size: cfg.batch_size,
                eval_batch_size: 16,
                seed: cfg.seed,
                split_seed: None,
                select_batches: None,
                test_fraction: 0.5,
                val_fraction: crate::train::config::default_val_fraction(),
                train_limit: None,
                test_limit: None,
                max_steps_per_epoch: Some(cfg.eval_every),
                total_steps: Some(cfg.steps),
                keep_last: 1,
            },
            sam: cfg.sam.clone(),
            warmup: cfg.warmup,
            eval_every: cfg.eval_every,
            val_scenes: cfg.val_scenes,
            generator_version: cfg.generator_version,
        }
    }
}

/// The validation stream (evaluation ignores the loader's items and draws its own scenes).
#[derive(Debug, Clone)]
pub struct ValScenes(usize);

impl Source for ValScenes {
    type Item = ();
    type Ready = ();
    type Batch = ();
    fn len(&self) -> usize {
        self.0
    }
    fn load(&self, _index: usize) -> Result<()> {
        Ok(())
    }
    fn prepare(&self, _item: (), _rng: &mut Rng, _augment: bool) {}
    fn collate(&self, _items: Vec<()>, _device: &Device) -> Result<()> {
        Ok(())
    }
}

/// The pretraining stream: training scenes, or the validation scenes.
pub enum Scenes {
    Train(SceneSource),
    Val(ValScenes),
}

/// A batch of [`Scenes`].
pub enum ScenesBatch {
    Train(SceneBatch),
    Val,
}

impl Source for Scenes {
    type Item = Option<(u64, Scene)>;
    type Ready = Option<(u64, Scene)>;
    type Batch = ScenesBatch;
    fn len(&self) -> usize {
        match self {
            Scenes::Train(s) => s.len(),
            Scenes::Val(v) => v.len(),
        }
    }
    fn streaming(&self) -> bool {
        matches!(self, Scenes::Train(_))
    }
    fn load(&self, index: usize) -> Result<Self::Item> {
        self.load_at(0, index)
    }
    fn load_at(&self, epoch: u64, index: usize) -> Result<Self::Item> {
        match self {
            Scenes::Train(s) => s.load_at(epoch, index).map(Some),
            Scenes::Val(_) => Ok(None),
        }
    }
    fn prepare(&self, item: Self::Item, _rng: &mut Rng, _augment: bool) -> Self::Item {
        item
    }
    fn collate(&self, items: Vec<Self::Item>, device: &Device) -> Result<ScenesBatch> {
        match self {
            Scenes::Train(s) => Ok(ScenesBatch::Train(
                s.collate(items.into_iter().flatten().collect(), device)?,
            )),
            Scenes::Val(_) => Ok(ScenesBatch::Val),
        }
    }
}

/// The task's part of the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainExtra {
    pub final_report: UpstreamReport,
    pub merged: Option<PathBuf>,
}

impl Task for PretrainTask {
    type Source = Scenes;
    type Model = Sam;
    type Data = ();
    type Eval = UpstreamReport;
    type Kept = ();
    type Extra = PretrainExtra;

    const METHODS: &'static [Method] = &[Method::Full];
    const NAME: &'static str = "SAM pretraining";
    const CURVES: Curves = Curves {
        loss: "prompt-free + prompted + IoU head",
        score: "prompt-free IoU",
        file: "metrics.png",
    };

    fn core(&self) -> &TrainCore {
        &self.core
    }

    fn validate(&self, _device: &Device) -> Result<()> {
        self.sam.validate()?;
        for (field, v) in [
            ("steps", self.core.total_steps.unwrap_or(0)),
            ("batch_size", self.core.batch_size),
            ("eval_every", self.eval_every),
            ("val_scenes", self.val_scenes),
        ] {
            if v == 0 {
                return Err(Error::Config {
                    field: field.into(),
                    msg: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }

    /// Nothing is read: the scenes are generated.
    fn inputs(&self) -> Vec<(&'static str, PathBuf)> {
        Vec::new()
    }

    /// The seeded random init (the same values the store of the loop then holds).
    fn open(
        &self,
        _run_dir: &Path,
        device: &Device,
        _obs: &mut dyn Observer,
    ) -> Result<((), TensorMap)> {
        let store = ParamStore::new(None, RolePolicy::AllTrainable, device, self.core.seed);
        Sam::new(&self.sam, &store)?;
        Ok(((), store.current_tensors()?))
    }

    fn build(&self, _data: &(), store: &ParamStore) -> Result<Sam> {
        Sam::new(&self.sam, store)
    }

    fn loaders(&self, _data: &()) -> Result<Loaders<Scenes>> {
        let bs = self.core.batch_size;
        let train = Scenes::Train(SceneSource {
            seed: self.core.seed,
            size: self.sam.image_size,
            low: 4 * self.sam.grid_size(),
            batch_size: bs,
            len: self.eval_every.saturating_mul(bs),
        });
        let lc = LoaderConfig {
            shuffle: false,
            augment: false,
            cache: false,
            drop_last: false,
            ..LoaderConfig::train(bs, self.core.seed)
        };
        Ok(Loaders {
            train: Loader::all(train, lc)?,
            val: None,
            test: Loader::all(
                Scenes::Val(ValScenes(self.val_scenes)),
                LoaderConfig::eval(16),
            )?,
        })
    }

    fn schedule(&self, _steps_per_epoch: usize) -> (Schedule, ScheduleUnit) {
        let s = Schedule::WarmupCosine {
            lr: self.core.lr,
            min_lr: self.core.min_lr,
            warmup: self.warmup,
            total: self.core.total_steps.unwrap_or(1),
        };
        (s, ScheduleUnit::Step)
    }

    fn train_step(&self, sam: &Sam, batch: &ScenesBatch) -> Result<(Tensor, GradStore)> {
        let ScenesBatch::Train(b) = batch else {
            return Err(Error::msg("a validation batch in training"));
        };
        let loss = step_loss(sam, &b.batch, b.mode)?;
        let grads = loss.backward()?;
        Ok((loss, grads))
    }

    fn batch_len(batch: &ScenesBatch) -> Result<usize> {
        Ok(match batch {
            ScenesBatch::Train(b) => b.len,
            ScenesBatch::Val => 0,
        })
    }

    fn evaluate(
        &self,
        sam: &Sam,
        _loader: &mut Loader<Scenes>,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(UpstreamReport, ())> {
        let report = evaluate_upstream(sam, self.core.seed, self.val_scenes, 16, device)?;
        obs.event(Event::Info(format!(
            "val IoU: prompt-free {:.3}  point {:.3}  box {:.3}",
            report.prompt_free_miou, report.point_miou, report.box_miou
        )));
        Ok((report, ()))
    }

    fn score(eval: &UpstreamReport) -> f64 {
        eval.prompt_free_miou
    }

    fn split_sizes(&self, _data: &()) -> [usize; 3] {
        let steps = self.core.total_steps.unwrap_or(0);
        [
            steps.saturating_mul(self.core.batch_size),
            0,
            self.val_scenes,
        ]
    }

    fn summary(&self, _data: &(), f: &Fitted<UpstreamReport>) -> PretrainExtra {
        PretrainExtra {
            final_report: f.last.clone(),
            merged: f.merged.clone(),
        }
    }
}

/// Pretrain (or resume) into `out`: the loop runs in `<out>.run/` (config, checkpoints,
/// metrics, curves, summary); the last weights are written to `<out>.safetensors` with the
/// SAM config in `<out>.json`.
pub fn pretrain(
    cfg: &PretrainConfig,
    out: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<PretrainSummary> {
    cfg.sam.validate()?;
    if cfg.eval_every == 0 {
        return Err(Error::Config {
            field: "eval_every".into(),
            msg: "must be at least 1".into(),
        });
    }
    let task = PretrainTask::new(cfg);
    let run_dir = out.with_extension("run");
    let s = crate::train::fit::fit(&task, &run_dir, device, resume, obs)?;
    let merged = s
        .merged
        .clone()
        .ok_or_else(|| Error::msg("pretraining shipped no weights"))?;
    let weights = out.with_extension("safetensors");
    let w = tensors::load(&merged, device)?;
    tensors::save_safetensors(&weights, &w, None)?;
    crate::util::fs::write_json_atomic(&out.with_extension("json"), &cfg.sam)?;
    let records: Vec<crate::train::task::EpochRecord<UpstreamReport>> =
        std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .map_err(|e| Error::io(run_dir.join("metrics.jsonl"), e))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Checkpoint {
                path: run_dir.join("metrics.jsonl"),
                msg: format!("invalid record: {e}"),
            })?;
    let mut step = 0usize;
    let history = records
        .into_iter()
        .map(|r| {
            step += r.steps;
            (step, r.train_loss, r.test)
        })
        .collect();
    Ok(PretrainSummary {
        config: cfg.clone(),
        steps: step,
        final_report: s.task.final_report.clone(),
        history,
        seconds: s.seconds,
        weights,
    })
}
