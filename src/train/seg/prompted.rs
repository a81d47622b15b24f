//! Prompted segmentation: the loss and the predictions of SAM fine-tuned *with* prompts sampled
//! from the ground truth (MedSAM / SAM-Med2D style), used by the segmentation task
//! ([`super::seg`]) when its `prompt` is not `none` — the same task on the one loop, with the
//! prompted forward in place of the prompt-free one.
//!
//! - One prompt set per object (a connected component of the mask, [`crate::data::prompts`]);
//!   the image embedding is computed once and shared by its objects' decodings.
//! - **Loss** per object: BCE + soft IoU of its upsampled `S × S` logits against *that
//!   object's* mask, averaged over the batch's objects. A single point (no box) is ambiguous:
//!   SAM's three multimask outputs are decoded and the loss is the minimum over them (SAM's
//!   training recipe), plus the MSE between the IoU head and each mask's hard IoU so the head
//!   keeps choosing well; otherwise the single-mask output is trained.
//! - **Prediction** of an image: per object the sigmoid of its mask (multimask: the one with
//!   the highest predicted IoU), united by the pixelwise **maximum of probabilities**; an
//!   image without objects predicts background everywhere.
//! - GPS selection ranks entries by the gradients of this same loss.

use crate::data::kvasir::SegBatch;
use crate::data::prompts::{ObjectPrompt, PromptSpec};
use crate::error::{Error, Result};
use crate::nn::layers::resize_bilinear;
use crate::sam::Sam;
use crate::train::loss::SOFT_IOU_EPS;
use crate::util::threads::on_worker;
use candle_core::{DType, Device, Tensor, D};

/// The prompt tensors of `objs` (all of one spec) on `device`: points `(coords [K, P, 2],
/// labels [K, P])` when the prompts have points, boxes `[K, 4]` when they have boxes.
pub struct PromptTensors {
    pub points: Option<(Tensor, Tensor)>,
    pub boxes: Option<Tensor>,
}

impl PromptTensors {
    /// Stack `objs`; every object must carry the same number of points and all or none a box.
    pub fn new(objs: &[&ObjectPrompt], device: &Device) -> Result<PromptTensors> {
        let k = objs.len();
        let first = objs
            .first()
            .ok_or_else(|| Error::msg("prompted decoding: no prompt sets"))?;
        let p = first.points.len();
        let with_box = first.bbox.is_some();
        let (mut coords, mut labels, mut boxes) =
            (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new());
        for (i, o) in objs.iter().enumerate() {
            if o.points.len() != p || o.labels.len() != p || o.bbox.is_some() != with_box {
                return Err(Error::msg(format!(
                    "prompted decoding: prompt set {i} has {} points / {} labels / box {}, \
                     the first has {p} points / box {with_box}",
                    o.points.len(),
                    o.labels.len(),
                    o.bbox.is_some()
                )));
            }
            coords.extend(o.points.iter().flatten());
            labels.extend(&o.labels);
            if let Some(b) = o.bbox {
                boxes.extend(b);
            }
        }
        if p == 0 && !with_box {
            return Err(Error::msg(
                "prompted decoding: a prompt set has neither points nor a box",
            ));
        }
        Ok(PromptTensors {
            points: if p > 0 {
                Some((
                    Tensor::from_vec(coords, (k, p, 2), device)?,
                    Tensor::from_vec(labels, (k, p), device)?,
                ))
            } else {
                None
            },
            boxes: if with_box {
                Some(Tensor::from_vec(boxes, (k, 4), device)?)
            } else {
                None
            },
        })
    }
}

/// The objects of a batch, flattened: (image index of each, the prompt sets).
fn objects(batch: &SegBatch) -> (Vec<u32>, Vec<&ObjectPrompt>) {
    let mut owner = Vec::new();
    let mut objs = Vec::new();
    for (i, ps) in batch.prompts.iter().enumerate() {
        for o in ps {
            owner.push(i as u32);
            objs.push(o);
        }
    }
    (owner, objs)
}

/// Decode every object of `batch` from the batch's image embeddings `emb [B, C, g, g]` →
/// (upsampled logits `[K, M, S, S]`, IoU predictions `[K, M]`), `M` = 3 with
/// [`PromptSpec::multimask`], else 1; `None` when the batch has no objects.
pub fn decode_objects(
    sam: &Sam,
    emb: &Tensor,
    batch: &SegBatch,
    spec: &PromptSpec,
) -> Result<Option<(Tensor, Tensor)>> {
    let (owner, objs) = objects(batch);
    if objs.is_empty() {
        return Ok(None);
    }
    let dev = emb.device();
    let idx = Tensor::from_vec(owner.clone(), owner.len(), dev)?;
    let emb_k = emb.index_select(&idx, 0)?;
    let pt = PromptTensors::new(&objs, dev)?;
    let points = pt.points.as_ref().map(|(c, l)| (c, l));
    let (low, iou) = sam.forward_prompted(&emb_k, points, pt.boxes.as_ref(), spec.multimask())?;
    let s = sam.config.image_size;
    Ok(Some((resize_bilinear(&low, s, s)?, iou)))
}

/// `[K, 1, S, S]` f32 targets: object `k`'s own pixels.
fn object_targets(objs: &[&ObjectPrompt], s: usize, device: &Device) -> Result<Tensor> {
    let ss = s * s;
    let mut t = vec![0f32; objs.len() * ss];
    for (k, o) in objs.iter().enumerate() {
        for &p in &o.pixels {
            let p = p as usize;
            if p >= ss {
                return Err(Error::msg(format!(
                    "prompted loss: object pixel {p} outside the {s}×{s} mask"
                )));
            }
            t[k * ss + p] = 1.0;
        }
    }
    Ok(Tensor::from_vec(t, (objs.len(), 1, s, s), device)?)
}

/// Per-(object, mask) BCE + soft IoU of `logits [K, M, S, S]` against `target [K, 1, S, S]`
/// → (`[K, M]`, hard IoU at 0.5 `[K, M]`, no gradient).
fn per_mask_losses(logits: &Tensor, target: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = target.broadcast_as(logits.shape())?;
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let bce = ((logits.relu()? - (logits * &t)?)? + softplus)?;
    let bce = bce.flatten_from(2)?.mean(D::Minus1)?;
    let p = candle_nn::ops::sigmoid(logits)?;
    let pt = (&p * &t)?;
    let inter = pt.flatten_from(2)?.sum(D::Minus1)?;
    let union = ((&p + &t)? - &pt)?.flatten_from(2)?.sum(D::Minus1)?;
    let iou_loss = (1.0 - (inter / (union + SOFT_IOU_EPS)?)?)?;
    let hard = p.detach().ge(0.5)?.to_dtype(DType::F32)?;
    let hi = (&hard * &t)?.flatten_from(2)?.sum(D::Minus1)?;
    let hu = ((&hard + &t)? - (&hard * &t)?)?
        .flatten_from(2)?
        .sum(D::Minus1)?;
    let hard_iou = (hi / (hu + SOFT_IOU_EPS)?)?;
    Ok(((bce + iou_loss)?, hard_iou))
}

/// The prompted training (and selection) loss of a batch, a scalar: the mean over the batch's
/// objects of BCE + soft IoU against the object's mask (multimask: the minimum over the three
/// masks, plus the IoU head's MSE). A batch without any object is refused (there is nothing
/// to prompt); Kvasir-shaped data has a polyp in every image.
pub fn prompted_loss(sam: &Sam, batch: &SegBatch, spec: &PromptSpec) -> Result<Tensor> {
    let x = sam.normalize(&batch.images)?;
    let emb = sam.image_embeddings(&x)?;
    let Some((logits, iou_pred)) = decode_objects(sam, &emb, batch, spec)? else {
        return Err(Error::Data {
            msg: format!(
                "prompted training: no object in the masks of batch [{}]; every batch needs \
                 at least one foreground component to prompt",
                batch.ids.join(", ")
            ),
        });
    };
    let (_, objs) = objects(batch);
    let target = object_targets(&objs, sam.config.image_size, emb.device())?;
    let (per, hard_iou) = per_mask_losses(&logits, &target)?;
    if spec.multimask() {
        let best = per.min(D::Minus1)?.mean_all()?;
        let mse = (iou_pred - hard_iou.detach())?.sqr()?.mean_all()?;
        Ok((best + mse)?)
    } else {
        Ok(per.mean_all()?)
    }
}

/// Per image of `batch`, the `[S·S]` united probability map of its objects (see the module
/// docs), on the CPU.
pub fn predict_probs(sam: &Sam, batch: &SegBatch, spec: &PromptSpec) -> Result<Vec<Vec<f32>>> {
    let b = batch.ids.len();
    let s = sam.config.image_size;
    let decoded = on_worker(|| {
        let x = sam.normalize(&batch.images)?;
        let emb = sam.image_embeddings(&x)?;
        decode_objects(sam, &emb, batch, spec)
    })?;
    let mut out = vec![vec![0f32; s * s]; b];
    let Some((logits, iou)) = decoded else {
        return Ok(out);
    };
    let probs = candle_nn::ops::sigmoid(&logits.detach())?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let iou = iou.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (owner, _) = objects(batch);
    let picked = pick_masks(&probs, &iou)?;
    for (k, p) in picked.iter().enumerate() {
        let img = owner[k] as usize;
        unite(&mut out[img], p);
    }
    Ok(out)
}

/// Per object, the `[S·S]` probabilities of its chosen mask: the only one, or (multimask) the
/// one with the highest predicted IoU (first on ties). `probs [K, M, S, S]`, `iou [K, M]`.
pub fn pick_masks(probs: &Tensor, iou: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (k, m, h, w) = probs.dims4()?;
    let iou = iou.to_vec2::<f32>()?;
    let flat = probs.reshape((k, m, h * w))?;
    let mut out = Vec::with_capacity(k);
    for (i, row) in iou.iter().enumerate() {
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        out.push(flat.get(i)?.get(best)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Pixelwise maximum: `acc = max(acc, p)`.
pub fn unite(acc: &mut [f32], p: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(p) {
        *a = a.max(v);
    }
}
