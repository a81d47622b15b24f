//! A batch inference job: checked inputs → decode + resize to S (rayon) → engine → sigmoid →
//! back to each image's original resolution → mask PNG (0/255) + overlay PNG, and, with ground
//! truth, per-image Dice/IoU with the same definitions as training's evaluation
//! ([`crate::metrics`]: threshold on the probability at the ground truth's resolution, false
//! positives counted, means over images).
//!
//! With `save_probs` (`--save-probs`) each image's probability map is also saved as
//! `probs/<id>.png`, 8-bit grey at the image's resolution ([`crate::metrics::probs_to_8bit`]),
//! and, with ground truth, the field's metrics (Fβʷ, Sα, Eφ, MAE, and Dice/IoU at 0.5) are
//! computed from exactly those saved values, per set ([`SetTable`]: a PraNet run's test sets
//! by their set-qualified ids `<Set>/<id>`, else one row named `set_name`).
//!
//! Output folder: `masks/<id>.png`, `overlays/<id>.png`, `scores.csv` (with masks),
//! `report.json` and `report.html` (summary, Dice histogram, per-image table with overlay
//! thumbnails); every file is written atomically. Bad inputs stop the job before anything is
//! written unless `skip_bad` is set (then they are listed in the report).

use super::engine::Engine;
use super::identity::{FileDigest, JobIdentity};
use super::input::{bad_from, BadInput, InputItem, Inputs};
pub use super::records::{IndexedField, IndexedScore, InferReport, Shard, MAX_SHARDS};
use crate::data::imgio;
use crate::data::prompts::{self, ObjectPrompt, PromptFile, PromptSpec};
use crate::data::resize::{self, Resize};
use crate::error::{Error, Result};
use crate::metrics::{
    probs_to_8bit, score_8bit, FieldOptions, FieldScore, ImageScore, Metric, SegInput, SegMetrics,
    SetTable,
};
use crate::progress::{Event, Observer};
use crate::util::fs::{write_atomic, write_json_atomic};
use crate::util::hash::{hex, sha256_file};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to run a job.
#[derive(Debug, Clone)]
pub struct InferOptions {
    /// Output folder.
    pub out: PathBuf,
    pub batch_size: usize,
    /// Probability threshold for the binary mask (and the metrics).
    pub threshold: f32,
    pub resize: Resize,
    /// Skip (and list) unreadable inputs instead of stopping.
    pub skip_bad: bool,
    /// Write `overlays/<id>.png`.
    pub overlays: bool,
    /// Run only this shard of the inputs (see [`Shard`]).
    pub shard: Option<Shard>,
    /// Prompts for a prompted engine ([`Engine::takes_prompts`]); `None`: prompt-free.
    pub prompts: Option<JobPrompts>,
    /// Write `probs/<id>.png` (8-bit grey, original resolution) and, with ground truth, score
    /// the field's metrics on exactly those values.
    pub save_probs: bool,
    /// The per-set table's row name for images whose id names no set (a plain folder).
    pub set_name: String,
}

/// Where a prompted job's prompts come from.
#[derive(Debug, Clone)]
pub enum JobPrompts {
    /// Read from a file, per image id, in original pixel coordinates
    /// ([`prompts::read_prompt_file`]); an image missing from the file is a bad input.
    File(PromptFile),
    /// Sampled from each image's ground-truth mask resized to the input frame, with the fixed
    /// per-image generator [`prompts::fixed_rng`]`(seed, id)` — exactly the prompts training's
    /// evaluation used when `seed` is the run's (`--prompt-from-masks`, for evaluation).
    FromMasks { spec: PromptSpec, seed: u64 },
}

impl InferOptions {
    pub fn new(out: PathBuf) -> Self {
        InferOptions {
            out,
            batch_size: 8,
            threshold: 0.5,
            resize: Resize::Squash,
            skip_bad: false,
            overlays: true,
            shard: None,
            prompts: None,
            save_probs: false,
            set_name: "images".into(),
        }
    }

    /// The job scores the field's metrics: probability maps saved and ground truth given.
    pub fn field_metrics(&self, inputs: &Inputs) -> bool {
        self.save_probs && inputs.has_masks()
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| {
            Err(Error::Config {
                field: field.into(),
                msg: msg.into(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return bad("threshold", "must be a probability in (0, 1)");
        }
        Ok(())
    }
}

/// The identity of the job `engine` runs over `inputs` (all of them, before sharding) with
/// `opts` and `shard_count` shards.
pub fn job_identity(
    engine: &dyn Engine,
    inputs: &Inputs,
    opts: &InferOptions,
    shard_count: usize,
) -> Result<JobIdentity> {
    let model = engine
        .model_files()
        .iter()
        .map(|p| sha256_file(p).map(FileDigest::from))
        .collect::<Result<Vec<_>>>()?;
    let settings = engine.model_settings();
    let model_settings = if settings.is_empty() {
        String::new()
    } else {
        hex(&Sha256::digest(settings.as_bytes()))
    };
    let prompts = match &opts.prompts {
        None => "none".to_string(),
        Some(JobPrompts::File(f)) => {
            let json = serde_json::to_string(f)
                .map_err(|e| Error::msg(format!("cannot serialise the prompts: {e}")))?;
            format!("file sha256:{}", hex(&Sha256::digest(json.as_bytes())))
        }
        Some(JobPrompts::FromMasks { spec, seed }) => {
            let json = serde_json::to_string(spec)
                .map_err(|e| Error::msg(format!("cannot serialise the prompt spec: {e}")))?;
            format!("masks {json} seed {seed}")
        }
    };
    Ok(JobIdentity {
        model,
        model_settings,
        engine: engine.name().to_string(),
        input_size: engine.input_size(),
        inputs: inputs.items.len(),
        inputs_sha256: super::identity::inputs_digest(inputs)?,
        scored: inputs.has_masks(),
        resize: opts.resize,
        threshold: opts.threshold,
        prompts,
        shard_count,
        field_metrics: opts.field_metrics(inputs),
    })
}

/// Largest model input + output of one batch, in bytes (8 GiB).
const MAX_BATCH_BYTES: u128 = 8 << 30;

use crate::util::mem::peak_rss_mb;

/// Images up to this many pixels keep their decoded RGB between decoding and writing the
/// overlay; larger ones are decoded again for the overlay, so a batch of large images never
/// holds more than the decoded images the workers are processing (Kvasir's largest, 2.06 MP,
/// stays in memory).
const KEEP_DECODED_PIXELS: usize = 4_000_000;

/// One decoded, resized input.
struct Prepared {
    item: InputItem,
    /// The decoded image, kept for the overlay when small (see [`KEEP_DECODED_PIXELS`]).
    rgb: Option<image::RgbImage>,
    /// `[3, S, S]` in [0, 1].
    chw: Vec<f32>,
    /// Ground truth at the original resolution, {0, 1}.
    gt: Option<Vec<u8>>,
    /// The image's prompt sets in the input frame (prompted jobs).
    prompts: Vec<ObjectPrompt>,
}

fn prepare(
    item: &InputItem,
    s: usize,
    resize: Resize,
    job_prompts: Option<&JobPrompts>,
) -> std::result::Result<Prepared, BadInput> {
    let rgb = imgio::decode_rgb(&item.image).map_err(|e| bad_from(&item.image, &e))?;
    let (h, w) = (rgb.height() as usize, rgb.width() as usize);
    if h == 0 || w == 0 {
        return Err(BadInput {
            path: item.image.clone(),
            reason: "image has zero size".into(),
        });
    }
    let gt = match &item.mask {
        Some(mp) => {
            let m = imgio::decode_luma(mp).map_err(|e| bad_from(mp, &e))?;
            if (m.height() as usize, m.width() as usize) != (h, w) {
                return Err(BadInput {
                    path: mp.clone(),
                    reason: format!(
                        "mask is {}×{} (w×h) but its image is {w}×{h}",
                        m.width(),
                        m.height()
                    ),
                });
            }
            Some(
                m.as_raw()
                    .iter()
                    .map(|&v| u8::from(v >= 128))
                    .collect::<Vec<u8>>(),
            )
        }
        None => None,
    };
    // Same path as the training loader: u8 resize, then / 255.
    let chw = super::mask::preprocess(&rgb, s, resize);
    let prompts = match job_prompts {
        None => Vec::new(),
        Some(JobPrompts::File(file)) => match file.get(&item.id) {
            Some(objs) => prompts::to_input_frame(objs, resize.scale((h, w), s)),
            None => {
                return Err(BadInput {
                    path: item.image.clone(),
                    reason: format!("no prompts for image `{}` in the prompt file", item.id),
                })
            }
        },
        Some(JobPrompts::FromMasks { spec, seed }) => {
            let g = gt.as_ref().ok_or_else(|| BadInput {
                path: item.image.clone(),
                reason: "no ground-truth mask to sample prompts from (--prompt-from-masks)".into(),
            })?;
            // The training loader's path: nearest resize of the {0, 1} mask to S × S.
            let m = resize::resize_mask_nearest_u8(g, (h, w), s, resize);
            let mut rng = prompts::fixed_rng(*seed, &item.id);
            prompts::sample(&m, s, spec, &mut rng).map_err(|e| bad_from(&item.image, &e))?
        }
    };
    let mut item = item.clone();
    item.size = (h, w);
    let rgb = (h.saturating_mul(w) <= KEEP_DECODED_PIXELS).then_some(rgb);
    Ok(Prepared {
        item,
        rgb,
        chw,
        gt,
        prompts,
    })
}

/// What post-processing one image gave: a result, or a model output that cannot be scored.
enum Outcome {
    Done(Done),
    /// The model's logits for this image hold NaN/Inf (nothing was written for it).
    NonFinite(BadInput),
}

/// Per-image result after post-processing.
struct Done {
    id: String,
    /// Probability at the original resolution (kept only when scoring).
    prob: Option<Vec<f32>>,
    gt: Option<Vec<u8>>,
    /// The field's metrics of the saved 8-bit map (`save_probs` with ground truth).
    field: Option<FieldScore>,
}

fn postprocess(
    p: Prepared,
    logits: &[f32],
    size: usize,
    opts: &InferOptions,
    masks_dir: &Path,
    overlays_dir: &Path,
    probs_dir: &Path,
) -> Result<Outcome> {
    let m = match super::mask::postprocess(logits, size, opts.resize, p.item.size, opts.threshold)?
    {
        Ok(m) => m,
        Err(nf) => {
            return Ok(Outcome::NonFinite(BadInput {
                path: p.item.image.clone(),
                reason: format!("{nf}; not scored"),
            }))
        }
    };
    let (h, w) = p.item.size;
    let (orig, pred) = (m.prob, m.pred);
    let png = super::mask::mask_image(&pred, (h, w))
        .map_err(|e| Error::msg(format!("{}: {e}", p.item.id)))?;
    imgio::write_png(&masks_dir.join(format!("{}.png", p.item.id)), &png)?;
    let field = if opts.save_probs {
        // The saved map is what is scored: written, then scored from the same bytes' values.
        let map = probs_to_8bit(&orig);
        let (wu, hu) = (png.width(), png.height());
        let img = image::GrayImage::from_raw(wu, hu, map)
            .ok_or_else(|| Error::msg(format!("{}: probability map size", p.item.id)))?;
        imgio::write_png(&probs_dir.join(format!("{}.png", p.item.id)), &img)?;
        match &p.gt {
            Some(gt) => Some(
                score_8bit(img.as_raw(), gt, (h, w), &FieldOptions::default())
                    .map_err(|e| Error::msg(format!("image `{}`: {e}", p.item.id)))?,
            ),
            None => None,
        }
    } else {
        None
    };
    if opts.overlays {
        let rgb = match p.rgb {
            Some(rgb) => rgb,
            None => imgio::decode_rgb(&p.item.image)?,
        };
        let o =
            crate::util::draw::overlay(rgb.as_raw(), w as u32, h as u32, &pred, p.gt.as_deref())?;
        crate::util::draw::save_png(&overlays_dir.join(format!("{}.png", p.item.id)), &o)?;
    }
    let scoring = p.gt.is_some();
    Ok(Outcome::Done(Done {
        id: p.item.id,
        prob: scoring.then_some(orig),
        gt: p.gt,
        field,
    }))
}

/// Run `engine` over `inputs`, writing into `opts.out`. Returns the report (also written to
/// `report.json`) and the per-image scores (also in `scores.csv`) when every input has a mask.
///
/// Everything that can be checked without running the model is checked before anything is
/// written: the options, the inputs, the prompts (every id names an image, every prompt lies
/// inside its image) and, for a shard, the job's identity. A job that fails later removes the
/// output folders it created (`masks/`, `overlays/`, or `--out` itself).
pub fn infer(
    engine: &dyn Engine,
    inputs: &Inputs,
    opts: &InferOptions,
    obs: &mut dyn Observer,
) -> Result<(InferReport, Vec<ImageScore>)> {
    opts.validate()?;
    inputs.require_clean(opts.skip_bad)?;
    match (&opts.prompts, engine.takes_prompts()) {
        (Some(_), false) => {
            return Err(Error::Config {
                field: "prompts".into(),
                msg: format!(
                    "the {} engine runs a prompt-free model; prompts need the prompted graphs \
                     (`gps-seg export --prompted`, then --model ENCODER --decoder DECODER)",
                    engine.name()
                ),
            })
        }
        (None, true) => {
            return Err(Error::Config {
                field: "prompts".into(),
                msg: "the prompted graphs need prompts: give --prompts FILE or \
                      --prompt-from-masks"
                    .into(),
            })
        }
        _ => {}
    }
    if let Some(JobPrompts::File(file)) = &opts.prompts {
        let sizes: std::collections::HashMap<&str, (usize, usize)> = inputs
            .items
            .iter()
            .map(|it| (it.id.as_str(), it.size))
            .collect();
        let unusable = inputs
            .bad
            .iter()
            .filter_map(|b| b.path.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        prompts::check_against_images(file, &sizes, &unusable)?;
    }
    let total_inputs = inputs.items.len();
    // What a shard's report must carry for `report merge` (every shard hashes the whole job).
    let job = match opts.shard {
        Some(sh) if total_inputs > 0 => Some(job_identity(engine, inputs, opts, sh.count)?),
        _ => None,
    };
    // (position in the whole job, item) of this shard, in the job's order.
    let positions: Vec<usize> = (0..total_inputs)
        .filter(|&i| opts.shard.is_none_or(|s| s.contains(i)))
        .collect();
    let owned;
    let inputs = match opts.shard {
        None => inputs,
        Some(_) => {
            owned = Inputs {
                items: positions.iter().map(|&i| inputs.items[i].clone()).collect(),
                bad: inputs.bad.clone(),
            };
            &owned
        }
    };
    if inputs.items.is_empty() {
        return Err(Error::Data {
            msg: format!(
                "no usable images ({} bad input(s) skipped); nothing to do",
                inputs.bad.len()
            ),
        });
    }
    let scoring = inputs.has_masks();
    let s = engine.input_size();
    // The model's input and output of one batch (f32), bounded before anything is allocated.
    let n_max = opts.batch_size.min(inputs.items.len());
    let batch_bytes = (n_max as u128) * 4 * 4 * (s as u128) * (s as u128);
    if batch_bytes > MAX_BATCH_BYTES {
        return Err(Error::Config {
            field: "batch_size".into(),
            msg: format!(
                "a batch of {n_max} images at {s}×{s} needs {:.1} GiB of model input and output; \
                 the limit is {} GiB: lower --batch-size",
                batch_bytes as f64 / (1u64 << 30) as f64,
                MAX_BATCH_BYTES >> 30
            ),
        });
    }
    let masks_dir = opts.out.join("masks");
    let overlays_dir = opts.out.join("overlays");
    let probs_dir = opts.out.join("probs");
    // Removed again if the job does not finish (any error or panic from here on).
    let mut created = CreatedDirs::default();
    for (d, on) in [
        (&masks_dir, true),
        (&overlays_dir, opts.overlays),
        (&probs_dir, opts.save_probs),
    ] {
        if on {
            created.create(d)?;
        }
    }
    let mut skipped = inputs.bad.clone();
    // Positions of this shard's inputs skipped while running (decoding, non-finite logits).
    let mut skipped_positions = Vec::new();
    for b in &skipped {
        obs.event(Event::Info(format!(
            "skipping {}: {}",
            b.path.display(),
            b.reason
        )));
    }
    let mut metrics = SegMetrics::new(opts.threshold);
    let mut table = SetTable::new(FieldOptions::default(), &opts.set_name);
    let mut field_scores: Vec<IndexedField> = Vec::new();
    let batches: Vec<&[InputItem]> = inputs.items.chunks(opts.batch_size).collect();
    obs.event(Event::PhaseStart {
        name: "infer".into(),
        total: batches.len(),
    });
    let t0 = Instant::now();
    let mut model_secs = 0.0;
    let mut images = 0usize;
    // Decoding of batch k+1 (rayon) overlaps the engine's run of batch k.
    let resize = opts.resize;
    let job_prompts = opts.prompts.as_ref();
    let prep = move |chunk: &[InputItem]| -> Vec<std::result::Result<Prepared, BadInput>> {
        chunk
            .par_iter()
            .map(|it| prepare(it, s, resize, job_prompts))
            .collect()
    };
    std::thread::scope(|scope| -> Result<()> {
        let mut pending = batches.first().map(|&c| scope.spawn(move || prep(c)));
        for bi in 0..batches.len() {
            let prepared = match pending.take() {
                Some(h) => h
                    .join()
                    .map_err(|_| Error::msg("image decoding thread panicked"))?,
                None => Vec::new(),
            };
            pending = batches.get(bi + 1).map(|&c| scope.spawn(move || prep(c)));
            let first = bi * opts.batch_size;
            let mut batch = Vec::with_capacity(prepared.len());
            let mut batch_pos = Vec::with_capacity(prepared.len());
            for (j, p) in prepared.into_iter().enumerate() {
                let pos = positions.get(first + j).copied().unwrap_or(usize::MAX);
                match p {
                    Ok(p) => {
                        batch.push(p);
                        batch_pos.push(pos);
                    }
                    Err(b) if opts.skip_bad => {
                        skip(obs, (&mut skipped, &mut skipped_positions), b, pos)
                    }
                    Err(b) => {
                        let hint = "its header was readable; pass --skip-bad to skip such files";
                        return Err(Error::Data {
                            msg: format!("{}: {} ({hint})", b.path.display(), b.reason),
                        });
                    }
                }
            }
            if !batch.is_empty() {
                let n = batch.len();
                let mut x = Vec::with_capacity(n * 3 * s * s);
                for p in &batch {
                    x.extend_from_slice(&p.chw);
                }
                let tm = Instant::now();
                let logits = if opts.prompts.is_some() {
                    let ps: Vec<&[ObjectPrompt]> =
                        batch.iter().map(|p| p.prompts.as_slice()).collect();
                    engine.logits_prompted(&x, n, &ps)?
                } else {
                    engine.logits(&x, n)?
                };
                model_secs += tm.elapsed().as_secs_f64();
                drop(x);
                let size = logits.size;
                let done: Vec<Result<Outcome>> = batch
                    .into_par_iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let dirs = (&masks_dir, &overlays_dir, &probs_dir);
                        postprocess(p, logits.image(i), size, opts, dirs.0, dirs.1, dirs.2)
                    })
                    .collect();
                for (d, pos) in done.into_iter().zip(batch_pos) {
                    let d = match d? {
                        Outcome::Done(d) => d,
                        Outcome::NonFinite(b) if opts.skip_bad => {
                            skip(obs, (&mut skipped, &mut skipped_positions), b, pos);
                            continue;
                        }
                        Outcome::NonFinite(b) => {
                            return Err(Error::NonFinite(format!(
                                "{}: {} (pass --skip-bad to skip and list such images)",
                                b.path.display(),
                                b.reason
                            )))
                        }
                    };
                    if scoring {
                        if let (Some(prob), Some(gt)) = (&d.prob, &d.gt) {
                            metrics.update(SegInput {
                                id: &d.id,
                                prob,
                                gt,
                            });
                        }
                    }
                    if let Some(f) = d.field {
                        table.add(&d.id, f.clone());
                        field_scores.push(IndexedField {
                            index: pos,
                            id: d.id.clone(),
                            score: f,
                        });
                    }
                    images += 1;
                }
            }
            obs.event(Event::Step {
                done: bi + 1,
                loss: None,
                lr: None,
                images_per_s: Some(images as f64 / t0.elapsed().as_secs_f64().max(1e-9)),
            });
        }
        Ok(())
    })?;
    if images == 0 {
        return Err(Error::Data {
            msg: format!(
                "no image could be segmented ({} skipped; see the lines above)",
                skipped.len()
            ),
        });
    }
    let seconds = t0.elapsed().as_secs_f64();
    let seg = scoring.then(|| metrics.compute());
    let sets = table.finish()?;
    obs.event(Event::PhaseEnd {
        summary: match &seg {
            Some(r) => format!(
                "{images} images  mDice {:.4}  mIoU {:.4}  {:.1} img/s",
                r.mdice,
                r.miou,
                images as f64 / seconds.max(1e-9)
            ),
            None => format!(
                "{images} images  {:.1} img/s",
                images as f64 / seconds.max(1e-9)
            ),
        },
    });
    if scoring {
        let mut csv = String::from("id,dice,iou\n");
        for r in &metrics.scores {
            csv.push_str(&format!("{},{:.6},{:.6}\n", r.id, r.dice, r.iou));
        }
        write_atomic(&opts.out.join("scores.csv"), csv.as_bytes())?;
    }
    let report = InferReport {
        engine: engine.name().into(),
        model: engine.describe(),
        input_size: s,
        resize: opts.resize,
        threshold: opts.threshold,
        batch_size: opts.batch_size,
        images,
        skipped,
        seconds,
        images_per_s: images as f64 / seconds.max(1e-9),
        model_seconds: model_secs,
        model_images_per_s: images as f64 / model_secs.max(1e-9),
        peak_rss_mb: peak_rss_mb(),
        metrics: seg,
        out: opts.out.clone(),
        shard: opts.shard,
        total_inputs,
        scores: {
            let pos: std::collections::HashMap<&str, usize> = inputs
                .items
                .iter()
                .zip(&positions)
                .map(|(it, &p)| (it.id.as_str(), p))
                .collect();
            metrics
                .scores
                .iter()
                .map(|sc| IndexedScore {
                    index: pos.get(sc.id.as_str()).copied().unwrap_or(usize::MAX),
                    score: sc.clone(),
                })
                .collect()
        },
        pooled: scoring.then(|| metrics.pooled()),
        job,
        skipped_positions,
        sets,
        set_name: opts.set_name.clone(),
        field_scores,
    };
    write_json_atomic(&opts.out.join("report.json"), &report)?;
    super::report::write_html(&report, &opts.out, opts.overlays)?;
    created.keep();
    Ok((report, metrics.scores))
}

/// List `b`, the input at position `pos` of the whole job, as skipped while running, and say
/// so.
fn skip(
    obs: &mut dyn Observer,
    (skipped, positions): (&mut Vec<BadInput>, &mut Vec<usize>),
    b: BadInput,
    pos: usize,
) {
    obs.event(Event::Info(format!(
        "skipping {}: {}",
        b.path.display(),
        b.reason
    )));
    skipped.push(b);
    positions.push(pos);
}

/// Output folders a job created, removed when it is dropped before [`CreatedDirs::keep`]: a
/// job that fails part-way leaves none of its partial `masks/` or `overlays/` (nor an `--out`
/// it created), and nothing that was there before it.
#[derive(Default)]
struct CreatedDirs {
    /// The highest folder each `create` made (a folder inside another is not listed).
    dirs: Vec<PathBuf>,
}

impl CreatedDirs {
    /// `create_dir_all(dir)`, noting the highest folder it made.
    fn create(&mut self, dir: &Path) -> Result<()> {
        if !dir.exists() {
            let mut top = dir.to_path_buf();
            while let Some(p) = top.parent() {
                if p.as_os_str().is_empty() || p.exists() {
                    break;
                }
                top = p.to_path_buf();
            }
            if !self.dirs.iter().any(|d| top.starts_with(d)) {
                self.dirs.push(top);
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
    }

    /// The job finished: keep its folders.
    fn keep(mut self) {
        self.dirs.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Best effort: the job's own error is what is reported.
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::engine::Logits;
    use crate::infer::input::{check, from_folders};
    use crate::progress::Silent;
    use image::{GrayImage, RgbImage};

    /// Predicts "bright": logit = 8·(mean RGB − 0.5), so a white square on black is found.
    struct Bright(usize);

    impl Engine for Bright {
        fn name(&self) -> &'static str {
            "bright"
        }
        fn input_size(&self) -> usize {
            self.0
        }
        fn describe(&self) -> String {
            "test engine".into()
        }
        fn logits(&self, images: &[f32], n: usize) -> Result<Logits> {
            let a = self.0 * self.0;
            let mut data = vec![0.0; n * a];
            for b in 0..n {
                for p in 0..a {
                    let m: f32 = (0..3).map(|c| images[(b * 3 + c) * a + p]).sum::<f32>() / 3.0;
                    data[b * a + p] = 8.0 * (m - 0.5);
                }
            }
            Ok(Logits {
                n,
                size: self.0,
                data,
            })
        }
    }

    /// [`Bright`], but the second image of every batch gets one NaN logit.
    struct NanSecond(usize);

    impl Engine for NanSecond {
        fn name(&self) -> &'static str {
            "nan-second"
        }
        fn input_size(&self) -> usize {
            self.0
        }
        fn describe(&self) -> String {
            "test engine".into()
        }
        fn logits(&self, images: &[f32], n: usize) -> Result<Logits> {
            let mut l = Bright(self.0).logits(images, n)?;
            if n > 1 {
                l.data[self.0 * self.0 + 5] = f32::NAN;
            }
            Ok(l)
        }
    }

    #[test]
    fn non_finite_logits_fail_the_job_or_are_skipped_and_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let (img, msk) = (tmp.path().join("images"), tmp.path().join("masks"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&msk).unwrap();
        for id in ["a", "b", "c"] {
            imgio::write_png(&img.join(format!("{id}.png")), &RgbImage::new(20, 10)).unwrap();
            imgio::write_png(&msk.join(format!("{id}.png")), &GrayImage::new(20, 10)).unwrap();
        }
        let (c, bad) = from_folders(&img, Some(&msk)).unwrap();
        let inputs = check(c, bad);
        let mut opts = InferOptions::new(tmp.path().join("out"));
        opts.batch_size = 2;
        let e = infer(&NanSecond(16), &inputs, &opts, &mut Silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.png") && e.contains("non-finite"), "{e}");
        assert!(!tmp.path().join("out/masks/b.png").exists());
        opts.skip_bad = true;
        let (r, scores) = infer(&NanSecond(16), &inputs, &opts, &mut Silent).unwrap();
        assert_eq!(r.images, 2);
        assert_eq!(
            scores.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].path.ends_with("b.png"));
        assert!(r.metrics.unwrap().mdice.is_finite());
    }

    #[test]
    fn saved_probability_maps_are_what_the_per_set_table_scores() {
        let tmp = tempfile::tempdir().unwrap();
        let (img, msk) = (tmp.path().join("images"), tmp.path().join("masks"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&msk).unwrap();
        for (k, (w, h)) in [(30u32, 20u32), (17, 23), (40, 9)].into_iter().enumerate() {
            let mut im = RgbImage::new(w, h);
            let mut m = GrayImage::new(w, h);
            for y in 0..h {
                for x in 0..w {
                    // A brightness ramp (graded probabilities), a mask over part of it.
                    let v = (255 * (x + y) / (w + h)) as u8;
                    im.put_pixel(x, y, image::Rgb([v, v, v]));
                    if x + k as u32 >= w / 2 {
                        m.put_pixel(x, y, image::Luma([255]));
                    }
                }
            }
            imgio::write_png(&img.join(format!("p{k}.png")), &im).unwrap();
            imgio::write_png(&msk.join(format!("p{k}.png")), &m).unwrap();
        }
        let (c, bad) = from_folders(&img, Some(&msk)).unwrap();
        let inputs = check(c, bad);
        let mut opts = InferOptions::new(tmp.path().join("out"));
        opts.save_probs = true;
        opts.set_name = "ramps".into();
        opts.batch_size = 2;
        let (r, scores) = infer(&Bright(16), &inputs, &opts, &mut Silent).unwrap();
        assert_eq!(r.sets.len(), 1);
        assert_eq!((r.sets[0].set.as_str(), r.sets[0].images), ("ramps", 3));
        // Scoring the saved PNGs again gives the table; at 0.5 their Dice is the job's.
        let mut again = crate::metrics::SetMetrics::new(FieldOptions::default());
        for (it, sc) in inputs.items.iter().zip(&scores) {
            let map =
                imgio::decode_luma(&opts.out.join("probs").join(format!("{}.png", it.id))).unwrap();
            let gt = imgio::decode_luma(it.mask.as_ref().unwrap()).unwrap();
            assert_eq!(map.dimensions(), gt.dimensions());
            assert!(
                map.as_raw().iter().any(|&v| v != 0 && v != 255),
                "graded, not a mask"
            );
            let g: Vec<u8> = gt.as_raw().iter().map(|&v| u8::from(v >= 128)).collect();
            let hw = (map.height() as usize, map.width() as usize);
            let f = again.add_8bit(&it.id, map.as_raw(), &g, hw).unwrap();
            assert_eq!(f.dice, sc.dice, "{}", it.id);
        }
        assert_eq!(again.finish().unwrap(), r.sets[0].metrics);
        assert_eq!(r.field_scores.len(), 3);
        // Without --save-probs: no maps, no table.
        opts.save_probs = false;
        opts.out = tmp.path().join("plain");
        let (r, _) = infer(&Bright(16), &inputs, &opts, &mut Silent).unwrap();
        assert!(r.sets.is_empty() && !opts.out.join("probs").exists());
    }

    #[test]
    fn three_shards_merged_equal_the_unsharded_job_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let (img, msk) = (tmp.path().join("images"), tmp.path().join("masks"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&msk).unwrap();
        // 8 images with squares of different sizes and masks that overlap them partly.
        for k in 0..8u32 {
            let (w, h) = (20 + 3 * k, 17 + 2 * k);
            let mut im = RgbImage::new(w, h);
            let mut m = GrayImage::new(w, h);
            for y in 0..h {
                for x in 0..w {
                    if x < w / 2 + k && y < h / 2 {
                        im.put_pixel(x, y, image::Rgb([250, 240, 255]));
                    }
                    if x + k >= w / 3 && y < h / 2 + k / 2 {
                        m.put_pixel(x, y, image::Luma([255]));
                    }
                }
            }
            imgio::write_png(&img.join(format!("i{k}.png")), &im).unwrap();
            imgio::write_png(&msk.join(format!("i{k}.png")), &m).unwrap();
        }
        let (c, bad) = from_folders(&img, Some(&msk)).unwrap();
        let inputs = check(c, bad);
        let mut opts = InferOptions::new(tmp.path().join("all"));
        opts.batch_size = 3;
        opts.overlays = false;
        let (whole, _) = infer(&Bright(24), &inputs, &opts, &mut Silent).unwrap();
        let mut dirs = Vec::new();
        let mut covered = Vec::new();
        for i in 0..3 {
            let d = tmp.path().join(format!("shard{i}"));
            let mut o = opts.clone();
            o.out = d.clone();
            o.shard = Some(Shard::new(i, 3).unwrap());
            let (r, _) = infer(&Bright(24), &inputs, &o, &mut Silent).unwrap();
            covered.extend(r.scores.iter().map(|s| s.index));
            dirs.push(d);
        }
        covered.sort();
        assert_eq!(covered, (0..8).collect::<Vec<_>>(), "disjoint and covering");
        let merged =
            crate::infer::report::merge_reports(&dirs, &tmp.path().join("merged")).unwrap();
        let (a, b) = (whole.metrics.unwrap(), merged.metrics.unwrap());
        assert_eq!(a.mdice.to_bits(), b.mdice.to_bits(), "{a:?} vs {b:?}");
        assert_eq!(a.miou.to_bits(), b.miou.to_bits());
        assert_eq!(
            a.ref_dice_ignore_bg.to_bits(),
            b.ref_dice_ignore_bg.to_bits()
        );
        assert_eq!(whole.scores, merged.scores);
        assert_eq!(merged.images, 8);
        // A missing or doubled shard is refused.
        let e = crate::infer::report::merge_reports(&dirs[..2], &tmp.path().join("m2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2/3") && e.contains("missing"), "{e}");
        let twice = vec![dirs[0].clone(), dirs[0].clone(), dirs[1].clone()];
        assert!(crate::infer::report::merge_reports(&twice, &tmp.path().join("m3")).is_err());
        // Shard specs.
        assert_eq!(Shard::parse("2/3").unwrap(), Shard::new(2, 3).unwrap());
        for bad in ["3/3", "0/0", "a/3", "1-3", "-1/3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_writes_masks_at_original_size_and_scores_against_ground_truth() {
        let tmp = std::env::temp_dir().join(format!("gps-seg-job-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (img, msk, out) = (tmp.join("images"), tmp.join("masks"), tmp.join("out"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&msk).unwrap();
        // a: white square exactly where the mask is (Dice ≈ 1); b: mask elsewhere (Dice 0).
        for (id, (w, h)) in [("a", (60u32, 40u32)), ("b", (33, 71))] {
            let mut im = RgbImage::new(w, h);
            let mut m = GrayImage::new(w, h);
            for y in h / 4..h / 2 {
                for x in w / 4..w / 2 {
                    im.put_pixel(x, y, image::Rgb([255, 255, 255]));
                    let (mx, my) = if id == "a" {
                        (x, y)
                    } else {
                        (x + w / 3, y + h / 3)
                    };
                    m.put_pixel(mx, my, image::Luma([255]));
                }
            }
            imgio::write_png(&img.join(format!("{id}.png")), &im).unwrap();
            imgio::write_png(&msk.join(format!("{id}.png")), &m).unwrap();
        }
        let (c, bad) = from_folders(&img, Some(&msk)).unwrap();
        let inputs = check(c, bad);
        let mut opts = InferOptions::new(out.clone());
        opts.batch_size = 3;
        let (r, scores) = infer(&Bright(32), &inputs, &opts, &mut Silent).unwrap();
        assert_eq!(r.images, 2);
        assert_eq!(scores.len(), 2);
        assert!(scores[0].dice > 0.9, "{scores:?}");
        assert!(scores[1].dice < 0.05, "{scores:?}");
        let m = r.metrics.unwrap();
        assert!((m.mdice - (scores[0].dice + scores[1].dice) / 2.0).abs() < 1e-12);
        let a = image::open(out.join("masks/a.png")).unwrap();
        assert_eq!((a.width(), a.height()), (60, 40));
        let b = image::open(out.join("overlays/b.png")).unwrap();
        assert_eq!((b.width(), b.height()), (33, 71));
        let csv = std::fs::read_to_string(out.join("scores.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3);
        let rep: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(rep["images"], 2);
        // Bad options are refused before writing.
        opts.batch_size = 0;
        assert!(infer(&Bright(32), &inputs, &opts, &mut Silent).is_err());

        // A PNG whose header reads but whose pixel data is corrupt (CRC) passes the up-front
        // check and fails at decode: an error naming it, or skipped with `skip_bad`.
        let mut png = std::fs::read(img.join("a.png")).unwrap();
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        png[idat + 8] ^= 0xFF;
        std::fs::write(img.join("c.png"), &png).unwrap();
        std::fs::copy(msk.join("a.png"), msk.join("c.png")).unwrap();
        let (c, bad) = from_folders(&img, Some(&msk)).unwrap();
        let inputs = check(c, bad);
        assert_eq!(inputs.items.len(), 3, "{:?}", inputs.bad);
        opts.batch_size = 2;
        let e = infer(&Bright(32), &inputs, &opts, &mut Silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.png") && e.contains("--skip-bad"), "{e}");
        opts.skip_bad = true;
        let (r, scores) = infer(&Bright(32), &inputs, &opts, &mut Silent).unwrap();
        assert_eq!((r.images, scores.len(), r.skipped.len()), (2, 2, 1));
        assert!(r.skipped[0].path.ends_with("c.png"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
