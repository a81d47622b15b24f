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
//! AdamW with warm-up + cosine; checkpoints every `eval_every` steps; resumable.

use crate::data::synth_scenes::{scene, Scene};
use crate::error::{Error, Result};
use crate::nn::{ParamStore, RolePolicy};
use crate::sam::{Sam, SamConfig};
use crate::train::fit::checkpoint::{Checkpoints, KeepPolicy};
use crate::train::fit::optim::{AdamW, Optimizer};
use crate::train::fit::schedule::Schedule;
use crate::train::loss::seg_loss;
use crate::train::observer::{Event, Observer};
use crate::util::tensors::{self, TensorMap};
use crate::util::Rng;
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PretrainState {
    step: usize,
    history: Vec<(usize, f64, UpstreamReport)>,
    seconds: f64,
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

/// Pretrain (or resume) into `out` (`<out>.safetensors`, `<out>.json`, checkpoints in
/// `<out>.run/`).
pub fn pretrain(
    cfg: &PretrainConfig,
    out: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<PretrainSummary> {
    cfg.sam.validate()?;
    for (field, v) in [
        ("steps", cfg.steps),
        ("batch_size", cfg.batch_size),
        ("eval_every", cfg.eval_every),
        ("val_scenes", cfg.val_scenes),
    ] {
        if v == 0 {
            return Err(Error::Config {
                field: field.into(),
                msg: "must be at least 1".into(),
            });
        }
    }
    let run_dir = out.with_extension("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    let ckpts = Checkpoints::new(&run_dir, KeepPolicy { keep_last: 1 });
    let latest: Option<(PathBuf, PretrainState)> = if resume { ckpts.latest()? } else { None };
    let store = ParamStore::new(None, RolePolicy::AllTrainable, device, cfg.seed);
    let sam = Sam::new(&cfg.sam, &store)?;
    let vars = store.trainable_vars();
    let mut opt = AdamW::new(vars.clone(), cfg.lr, cfg.weight_decay)?;
    let mut state = PretrainState {
        step: 0,
        history: Vec::new(),
        seconds: 0.0,
    };
    if let Some((dir, st)) = latest {
        let w = tensors::load(&dir.join("params.safetensors"), device)?;
        for (n, v) in &vars {
            let t = w.get(n).ok_or_else(|| Error::Checkpoint {
                path: dir.join("params.safetensors"),
                msg: format!("no tensor `{n}`"),
            })?;
            v.set(t)?;
        }
        opt.load_state(&tensors::load(&dir.join("optimizer.safetensors"), device)?)?;
        obs.event(Event::Info(format!(
            "resuming pretraining at step {}",
            st.step
        )));
        state = st;
    }
    crate::util::fs::write_json_atomic(&run_dir.join("pretrain_config.json"), cfg)?;
    let schedule = Schedule::WarmupCosine {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup: cfg.warmup,
        total: cfg.steps,
    };
    let low = 4 * cfg.sam.grid_size();
    let s = cfg.sam.image_size;
    let t_prev = state.seconds;
    let t0 = Instant::now();
    while state.step < cfg.steps {
        let chunk_end = ((state.step / cfg.eval_every) + 1) * cfg.eval_every;
        let chunk_end = chunk_end.min(cfg.steps);
        obs.event(Event::PhaseStart {
            name: format!("steps ≤{chunk_end}"),
            total: chunk_end - state.step,
        });
        let chunk_start = state.step;
        let tc = Instant::now();
        let mut loss_sum = 0.0;
        while state.step < chunk_end {
            let step = state.step;
            opt.set_lr(schedule.lr(step));
            let scenes = scenes_for(cfg.seed, (step * cfg.batch_size) as u64, cfg.batch_size, s);
            let mut rng = Rng::derive(cfg.seed ^ step as u64, "prompts");
            let pb = make_batch(&scenes, &mut rng, low, device)?;
            let loss = step_loss(&sam, &pb, step % 3)?;
            let lv = loss.to_scalar::<f32>()?;
            if !lv.is_finite() {
                return Err(Error::NonFinite(format!(
                    "pretraining loss is {lv} at step {}; the last checkpoint in {} is intact",
                    step + 1,
                    run_dir.display()
                )));
            }
            opt.step(&loss.backward()?)?;
            loss_sum += lv as f64;
            state.step += 1;
            let done = state.step - chunk_start;
            obs.event(Event::Step {
                done,
                loss: Some(loss_sum / done as f64),
                lr: Some(schedule.lr(step)),
                images_per_s: Some(
                    (done * cfg.batch_size) as f64 / tc.elapsed().as_secs_f64().max(1e-9),
                ),
            });
        }
        let mean_loss = loss_sum / (state.step - chunk_start).max(1) as f64;
        let report = evaluate_upstream(&sam, cfg.seed, cfg.val_scenes, 16, device)?;
        obs.event(Event::PhaseEnd {
            summary: format!(
                "loss {mean_loss:.4}  val IoU: prompt-free {:.3}  point {:.3}  box {:.3}",
                report.prompt_free_miou, report.point_miou, report.box_miou
            ),
        });
        state.history.push((state.step, mean_loss, report));
        state.seconds = t_prev + t0.elapsed().as_secs_f64();
        let params: TensorMap = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        let ost = opt.state()?;
        ckpts.save(
            state.step,
            &[("params", &params), ("optimizer", &ost)],
            &state,
        )?;
    }
    let weights = out.with_extension("safetensors");
    tensors::save_safetensors(&weights, &store.current_tensors()?, None)?;
    crate::util::fs::write_json_atomic(&out.with_extension("json"), &cfg.sam)?;
    let final_report = state
        .history
        .last()
        .map(|h| h.2.clone())
        .unwrap_or_default();
    let summary = PretrainSummary {
        config: cfg.clone(),
        steps: state.step,
        final_report,
        history: state.history.clone(),
        seconds: state.seconds,
        weights: weights.clone(),
    };
    crate::util::fs::write_json_atomic(&run_dir.join("summary.json"), &summary)?;
    Ok(summary)
}
