//! Evaluation metrics, as a small `update / compute / clear` trait (burn's shape).
//!
//! Segmentation, primary (PraNet and successors): per image, at the ground truth's resolution,
//! prediction binarised at a threshold, false positives counted:
//! Dice = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G| (both 1 when P and G are empty),
//! then averaged over images → mDice, mIoU.
//!
//! Also the GPS reference repository's convention, for comparison with published GPS numbers
//! only: pixels are pooled over the dataset and background pixels of the ground truth are
//! ignored (`ignore_index = 0`), so false positives cost nothing: IoU = TP/(TP+FN) (= recall)
//! and Dice = 2TP/(2TP+FN). Always labelled as such.
//!
//! # The field's metrics (polyp-segmentation tables)
//!
//! [`score_probs`] / [`score_8bit`] score one probability map against its ground truth and
//! [`SetMetrics`] aggregates a test set into the columns of the polyp tables ([`SetReport`],
//! JSON keys `mdice miou wfm sm em_mean em_max em_adp mae` and `hd95` when asked). The
//! definitions are those of the original papers as implemented in PraNet's evaluation toolbox
//! (MATLAB, `Eval/main.m` of DengPingFan/PraNet) and its Python port PySODMetrics
//! (`py_sod_metrics/sod_metrics.py`, PyPI `pysodmetrics`); where the two differ, we follow
//! PySODMetrics 1.6.2, which `tests/metrics.rs` checks against to ≤ 1e-6 (see each metric):
//!
//! - **mDice, mIoU**: [`dice_iou`] at 0.5 (prediction ≥ 0.5, false positives counted, both 1
//!   when prediction and ground truth are empty), per image, averaged over images. (The
//!   toolbox's "meanDic" is a mean over 256 thresholds instead; PySODMetrics' binary Dice uses
//!   `> 0.5` and gives 0 when both are empty — on an 8-bit map `v/255 > 0.5 ⇔ v/255 ≥ 0.5`.)
//! - **Fβʷ, weighted F-measure** (Margolin, Zelnik-Manor & Tal, "How to evaluate foreground
//!   maps?", CVPR 2014; `original_WFb.m`; `WeightedFmeasure`), β² = 1: the error `E = |p − g|`
//!   of a background pixel is replaced by that of its nearest foreground pixel (exact Euclidean
//!   feature transform, `metrics::edt`, with scipy's tie-breaking), smoothed by the 7×7
//!   Gaussian of σ = 5 (`fspecial('gaussian', 7, 5)`, zero outside the image), the smaller of
//!   `E` and the smoothed error kept inside the object, background errors weighted by
//!   `2 − exp(ln(0.5)/5 · d)` (d: distance to the object); `R = 1 − mean(Ew[G])`,
//!   `P = TPw / (TPw + FPw + eps)`, `Fβʷ = 2RP / (R + P + eps)`. Empty ground truth: 0 (as the
//!   toolbox).
//! - **Sα, S-measure** (Fan, Cheng, Liu, Li & Borji, "Structure-measure: A new way to evaluate
//!   foreground maps", ICCV 2017; `StructureMeasure.m`; `Smeasure`), α = 0.5:
//!   `α·S_object + (1 − α)·S_region`, clipped at 0. Empty ground truth: `1 − mean(p)`; all
//!   foreground: `mean(p)`. The region term splits at the foreground centroid rounded half to
//!   even (NumPy's `round`; MATLAB rounds half away from zero, which moves the split by one
//!   pixel when a centroid lies exactly on .5). A quadrant with no pixels (the centroid on the
//!   last row or column) has weight 0 and contributes 0; PySODMetrics returns NaN there.
//! - **Eφ, E-measure** (Fan, Gong, Cao, Ren, Cheng & Borji, "Enhanced-alignment measure for
//!   binary foreground map evaluation", IJCAI 2018; `Enhancedmeasure.m`; `Emeasure`): the
//!   enhanced alignment of a binarised map, `Σ φ / (N − 1 + eps)`; empty ground truth: the
//!   number of pixels predicted background, all foreground: the number predicted foreground,
//!   each over `N − 1 + eps`. The curve is taken at the 256 thresholds of the 8-bit map
//!   (`floor(255·p) ≥ k`, k = 0…255, as PySODMetrics' cumulative histogram; the MATLAB toolbox
//!   uses `p > k/255`, which shifts the set of thresholds by one); `em_mean` / `em_max` are the
//!   mean / max of the set's mean curve; adaptive Eφ binarises at `p ≥ min(2·mean(p), 1)`.
//! - **MAE** (Perazzi et al., "Saliency filters", CVPR 2012): `mean(|p − g|)`.
//! - **HD95** (optional; medpy's `metric.binary.hd95`): the 95th percentile (NumPy's linear
//!   interpolation) of the distances in pixels from every boundary pixel of either mask
//!   (foreground pixels with a 4-neighbour in the background or on the image border) to the
//!   nearest boundary pixel of the other, both directions pooled, both masks binarised as for
//!   Dice. (Some toolkits take the larger of the two directed percentiles instead.) Both masks
//!   empty: 0. Exactly one empty (undefined in medpy, which raises): the largest distance
//!   between two pixels of the image, `√((h−1)² + (w−1)²)`, so a missed or invented object
//!   scores at least as badly as any detected one.
//!
//! Exact agreement with the field's code: everything is computed in f64, as PySODMetrics does;
//! an 8-bit map is read as `v / 255` (`im2double`; PySODMetrics' `pred / 255`), a probability
//! map as its f32 values widened, the E-measure's levels as `(p · 255)` truncated (NumPy's
//! `astype(np.uint8)`). Sums whose value decides a comparison follow NumPy's pairwise order
//! (`metrics::npsum`); elsewhere the order differs from NumPy's by rounding only. The toolbox
//! also stretches every map to [0, 1] first (`mapminmax`; PySODMetrics' `normalize=True`):
//! that is [`MapScale::MinMax`]. The default, [`MapScale::AsSaved`], scores the values as
//! saved — for our maps the model's probabilities, so an empty prediction is not stretched
//! into a full-range one. (PraNet's own test script min-max normalises each map before writing
//! its PNG, so on such PNGs the two readings agree.)
//!
//! Sizes: every step is linear in the pixel count (the feature transform is Maurer's linear
//! algorithm, the Gaussian is applied as two 7-tap passes).

mod edt;
mod npsum;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Something that accumulates over a dataset and reports a value.
pub trait Metric {
    type Input<'a>;
    type Output;
    fn update(&mut self, input: Self::Input<'_>);
    fn compute(&self) -> Self::Output;
    fn clear(&mut self);
}

/// One image's pixel counts: predicted ∩ ground truth, predicted, ground truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelCounts {
    pub tp: u64,
    pub pred: u64,
    pub gt: u64,
}

impl PixelCounts {
    /// Count a probability map against a binary mask (same length) at `threshold`.
    pub fn of(prob: &[f32], gt: &[u8], threshold: f32) -> Self {
        let mut c = PixelCounts::default();
        for (&x, &t) in prob.iter().zip(gt) {
            let pi = x >= threshold;
            let ti = t != 0;
            c.tp += (pi && ti) as u64;
            c.pred += pi as u64;
            c.gt += ti as u64;
        }
        c
    }

    /// Dice and IoU (both 1 when prediction and ground truth are empty).
    pub fn dice_iou(&self) -> (f64, f64) {
        let union = (self.pred + self.gt).saturating_sub(self.tp);
        if union == 0 {
            return (1.0, 1.0);
        }
        (
            2.0 * self.tp as f64 / (self.pred + self.gt) as f64,
            self.tp as f64 / union as f64,
        )
    }
}

/// Per-image Dice and IoU of a probability map against a binary mask (same length).
pub fn dice_iou(prob: &[f32], gt: &[u8], threshold: f32) -> (f64, f64) {
    PixelCounts::of(prob, gt, threshold).dice_iou()
}

/// One image's scores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageScore {
    pub id: String,
    pub dice: f64,
    pub iou: f64,
    /// The counts the scores come from (exact, so scores can be recomputed bit for bit after
    /// a round trip through JSON).
    #[serde(default)]
    pub counts: PixelCounts,
}

impl ImageScore {
    /// The score recomputed from its counts (equal to the original to the last bit).
    pub fn recomputed(&self) -> ImageScore {
        let (dice, iou) = self.counts.dice_iou();
        ImageScore {
            id: self.id.clone(),
            dice,
            iou,
            counts: self.counts,
        }
    }
}

/// Summary of a segmentation evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SegReport {
    /// Mean over images of per-image Dice (primary metric).
    pub mdice: f64,
    /// Mean over images of per-image IoU (primary metric).
    pub miou: f64,
    /// GPS reference convention (pooled, background ignored): Dice.
    pub ref_dice_ignore_bg: f64,
    /// GPS reference convention (pooled, background ignored): IoU (= recall).
    pub ref_iou_ignore_bg: f64,
    /// Number of images scored.
    pub images: usize,
}

/// Accumulates per-image scores and pooled reference counts.
#[derive(Debug, Clone, Default)]
pub struct SegMetrics {
    pub threshold: f32,
    pub scores: Vec<ImageScore>,
    tp: u64,
    fn_: u64,
}

impl SegMetrics {
    pub fn new(threshold: f32) -> Self {
        SegMetrics {
            threshold,
            ..Default::default()
        }
    }

    /// The pooled reference counts (ground-truth pixels predicted / missed).
    pub fn pooled(&self) -> PooledCounts {
        PooledCounts {
            tp: self.tp,
            fn_: self.fn_,
        }
    }

    /// Rebuild from per-image scores (in order) and pooled counts, e.g. to merge shards: the
    /// result computes exactly what one run over the same images in the same order computes.
    pub fn from_parts(threshold: f32, scores: Vec<ImageScore>, pooled: PooledCounts) -> Self {
        SegMetrics {
            threshold,
            scores,
            tp: pooled.tp,
            fn_: pooled.fn_,
        }
    }
}

/// Pixel counts behind the GPS reference's pooled numbers (sums over images, so shards add).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PooledCounts {
    pub tp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

/// Input of [`SegMetrics::update`]: image id, probability map and ground truth at the same
/// (original) resolution.
pub struct SegInput<'a> {
    pub id: &'a str,
    pub prob: &'a [f32],
    pub gt: &'a [u8],
}

impl Metric for SegMetrics {
    type Input<'a> = SegInput<'a>;
    type Output = SegReport;

    fn update(&mut self, input: SegInput<'_>) {
        let counts = PixelCounts::of(input.prob, input.gt, self.threshold);
        let (dice, iou) = counts.dice_iou();
        for (&x, &t) in input.prob.iter().zip(input.gt) {
            if t != 0 {
                if x >= self.threshold {
                    self.tp += 1;
                } else {
                    self.fn_ += 1;
                }
            }
        }
        self.scores.push(ImageScore {
            id: input.id.to_string(),
            dice,
            iou,
            counts,
        });
    }

    fn compute(&self) -> SegReport {
        let n = self.scores.len();
        let mean = |f: fn(&ImageScore) -> f64| {
            if n == 0 {
                0.0
            } else {
                self.scores.iter().map(f).sum::<f64>() / n as f64
            }
        };
        let (tp, fn_) = (self.tp as f64, self.fn_ as f64);
        SegReport {
            mdice: mean(|s| s.dice),
            miou: mean(|s| s.iou),
            ref_dice_ignore_bg: if tp + fn_ > 0.0 {
                2.0 * tp / (2.0 * tp + fn_)
            } else {
                0.0
            },
            ref_iou_ignore_bg: if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 },
            images: n,
        }
    }

    fn clear(&mut self) {
        self.scores.clear();
        self.tp = 0;
        self.fn_ = 0;
    }
}

/// Top-1 accuracy.
#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    correct: u64,
    total: u64,
}

impl Metric for Accuracy {
    /// (predicted class, true class) pairs.
    type Input<'a> = &'a [(u32, u32)];
    type Output = f64;

    fn update(&mut self, input: &[(u32, u32)]) {
        for &(p, t) in input {
            self.correct += (p == t) as u64;
            self.total += 1;
        }
    }

    fn compute(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    fn clear(&mut self) {
        *self = Accuracy::default();
    }
}

// ------------------------------------------------------------------ the field's metrics

/// The toolbox's `eps` (MATLAB `eps`, NumPy `np.spacing(1)`).
const EPS: f64 = f64::EPSILON;

/// Thresholds of the E-measure curve (the 256 levels of an 8-bit map).
pub const EM_THRESHOLDS: usize = 256;

/// Images above this many pixels get a memory check before scoring (about 100 bytes a pixel).
const CHECK_MEMORY_ABOVE: usize = 4 << 20;

/// How a prediction map's values are read before scoring (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapScale {
    /// The values as saved: probabilities in [0, 1] (an 8-bit map as `v / 255`).
    #[default]
    AsSaved,
    /// Stretched to [0, 1] per image, `(p − min) / (max − min)` when `max > min`, as PraNet's
    /// toolbox (`mapminmax`) and PySODMetrics' `normalize=True` do. Dice and IoU at 0.5 are
    /// then taken on the stretched map too.
    MinMax,
}

/// What to compute for every image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldOptions {
    pub scale: MapScale,
    /// Also compute HD95 (two more distance transforms per image).
    pub hd95: bool,
}

/// One image's field metrics (see the module docs for the definitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldScore {
    /// Pixel counts at 0.5 (Dice and IoU are [`PixelCounts::dice_iou`] of these).
    pub counts: PixelCounts,
    pub dice: f64,
    pub iou: f64,
    /// Weighted F-measure Fβʷ (β² = 1).
    pub wfm: f64,
    /// S-measure Sα (α = 0.5).
    pub sm: f64,
    /// Adaptive E-measure (threshold `min(2·mean, 1)`).
    pub em_adp: f64,
    pub mae: f64,
    /// E-measure at thresholds k = 0…255 (binary map: `floor(255·p) ≥ k`).
    pub em_curve: Vec<f64>,
    /// HD95 in pixels, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hd95: Option<f64>,
}

/// The 8-bit map to save for a probability map (`round(255·p)`, computed in f64, values
/// clamped to [0, 1], NaN as 0). `v ≥ 128 ⇔ p ≥ 0.5`, so Dice and IoU of the saved map equal
/// those of the probabilities.
pub fn probs_to_8bit(prob: &[f32]) -> Vec<u8> {
    prob.iter()
        .map(|&p| {
            let p = if p.is_nan() {
                0.0
            } else {
                f64::from(p).clamp(0.0, 1.0)
            };
            (p * 255.0).round() as u8
        })
        .collect()
}

fn check_sizes(what: &str, map_len: usize, gt_len: usize, hw: (usize, usize)) -> Result<usize> {
    let n = hw.0.checked_mul(hw.1).ok_or_else(|| Error::Data {
        msg: format!("{what}: size {}×{} (h×w) overflows", hw.0, hw.1),
    })?;
    if map_len != n || gt_len != n {
        return Err(Error::Data {
            msg: format!(
                "{what}: the prediction has {map_len} values and the ground truth {gt_len}, \
                 but the size is {}×{} (h×w) = {n}",
                hw.0, hw.1
            ),
        });
    }
    if n < 2 {
        return Err(Error::Data {
            msg: format!(
                "{what}: {}×{} (h×w) image; the E-measure needs at least 2 pixels",
                hw.0, hw.1
            ),
        });
    }
    if n > CHECK_MEMORY_ABOVE {
        crate::util::mem::check_fits(
            &format!("scoring a {}×{} image", hw.0, hw.1),
            (n as u64).saturating_mul(100),
        )?;
    }
    Ok(n)
}

/// Score a probability map (values in [0, 1], row-major `h × w`) against its ground truth
/// (`h × w`, nonzero = foreground), at the ground truth's resolution.
pub fn score_probs(
    prob: &[f32],
    gt: &[u8],
    hw: (usize, usize),
    opts: &FieldOptions,
) -> Result<FieldScore> {
    check_sizes("probability map", prob.len(), gt.len(), hw)?;
    if let Some((i, &v)) = prob
        .iter()
        .enumerate()
        .find(|(_, v)| !(0.0..=1.0).contains(*v))
    {
        return Err(Error::Data {
            msg: format!(
                "probability map: value {v} at pixel {i} (row {}, column {}) is outside [0, 1]",
                i / hw.1,
                i % hw.1
            ),
        });
    }
    let p: Vec<f64> = prob.iter().map(|&v| f64::from(v)).collect();
    let counts = match opts.scale {
        // The existing per-image counts, bit for bit.
        MapScale::AsSaved => Some(PixelCounts::of(prob, gt, 0.5)),
        MapScale::MinMax => None,
    };
    Ok(score_f64(p, gt, hw, opts, counts))
}

/// Score an 8-bit map (the saved PNG's values, `v / 255`) against its ground truth.
pub fn score_8bit(
    map: &[u8],
    gt: &[u8],
    hw: (usize, usize),
    opts: &FieldOptions,
) -> Result<FieldScore> {
    check_sizes("8-bit map", map.len(), gt.len(), hw)?;
    let p: Vec<f64> = map.iter().map(|&v| f64::from(v) / 255.0).collect();
    Ok(score_f64(p, gt, hw, opts, None))
}

/// Everything on the f64 map `p` (values in [0, 1], length checked).
fn score_f64(
    mut p: Vec<f64>,
    gt: &[u8],
    (h, w): (usize, usize),
    opts: &FieldOptions,
    counts: Option<PixelCounts>,
) -> FieldScore {
    if opts.scale == MapScale::MinMax {
        let (mn, mx) = p
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if mx != mn {
            p.iter_mut().for_each(|v| *v = (*v - mn) / (mx - mn));
        }
    }
    let g: Vec<bool> = gt.iter().map(|&t| t != 0).collect();
    let counts = counts.unwrap_or_else(|| {
        let mut c = PixelCounts::default();
        for (&x, &t) in p.iter().zip(&g) {
            let pi = x >= 0.5;
            c.tp += u64::from(pi && t);
            c.pred += u64::from(pi);
            c.gt += u64::from(t);
        }
        c
    });
    let (dice, iou) = counts.dice_iou();
    let fg = g.iter().filter(|&&t| t).count();
    let n = h * w;
    let mae = {
        let e: Vec<f64> = p
            .iter()
            .zip(&g)
            .map(|(&x, &t)| (x - f64::from(u8::from(t))).abs())
            .collect();
        npsum::mean(&e)
    };
    let hd95 = opts.hd95.then(|| hd95(&p, &g, h, w));
    FieldScore {
        counts,
        dice,
        iou,
        wfm: weighted_fmeasure(&p, &g, h, w, fg),
        sm: s_measure(&p, &g, h, w, fg),
        em_adp: e_measure_adaptive(&p, &g, n, fg),
        mae,
        em_curve: e_measure_curve(&p, &g, n, fg),
        hd95,
    }
}

/// Fβʷ with β² = 1 (`WeightedFmeasure.cal_wfm`; 0 for an empty ground truth).
fn weighted_fmeasure(p: &[f64], g: &[bool], h: usize, w: usize, fg: usize) -> f64 {
    let Some((nearest, dist2)) = edt::feature_transform(g, h, w) else {
        return 0.0;
    };
    debug_assert!(fg > 0);
    // Pixel dependency: the error, with a background pixel's replaced by its nearest object
    // pixel's, smoothed by the Gaussian; inside the object the smaller of the two.
    let e: Vec<f64> = p
        .iter()
        .zip(g)
        .map(|(&x, &t)| (x - f64::from(u8::from(t))).abs())
        .collect();
    let et: Vec<f64> = (0..h * w)
        .map(|i| if g[i] { e[i] } else { e[nearest[i]] })
        .collect();
    let ea = gaussian_7x7_sigma5(&et, h, w);
    // Pixel importance: background errors weighted by their distance to the object.
    let k = 0.5f64.ln() / 5.0;
    let mut ew_fg = Vec::with_capacity(fg);
    let mut ew_bg = Vec::with_capacity(h * w - fg);
    for i in 0..h * w {
        if g[i] {
            let m = if ea[i] < e[i] { ea[i] } else { e[i] };
            ew_fg.push(m);
        } else {
            let b = 2.0 - (k * (dist2[i] as f64).sqrt()).exp();
            ew_bg.push(e[i] * b);
        }
    }
    let tpw = fg as f64 - npsum::sum(&ew_fg);
    let fpw = npsum::sum(&ew_bg);
    let r = 1.0 - npsum::mean(&ew_fg);
    let pr = tpw / (tpw + fpw + EPS);
    2.0 * r * pr / (r + pr + EPS)
}

/// `scipy.ndimage.convolve(x, fspecial('gaussian', 7, 5), mode='constant', cval=0)`, as two
/// 7-tap passes (the kernel is separable; agrees to rounding).
fn gaussian_7x7_sigma5(x: &[f64], h: usize, w: usize) -> Vec<f64> {
    let mut k = [0f64; 7];
    for (i, v) in k.iter_mut().enumerate() {
        let d = i as f64 - 3.0;
        *v = (-(d * d) / 50.0).exp();
    }
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let mut tmp = vec![0f64; h * w];
    for y in 0..h {
        let row = &x[y * w..(y + 1) * w];
        for xx in 0..w {
            let mut acc = 0.0;
            for (t, &kv) in k.iter().enumerate() {
                let j = xx as isize + t as isize - 3;
                if j >= 0 && (j as usize) < w {
                    acc += kv * row[j as usize];
                }
            }
            tmp[y * w + xx] = acc;
        }
    }
    let mut out = vec![0f64; h * w];
    for y in 0..h {
        for (t, &kv) in k.iter().enumerate() {
            let j = y as isize + t as isize - 3;
            if j < 0 || j as usize >= h {
                continue;
            }
            let src = &tmp[j as usize * w..(j as usize + 1) * w];
            for (o, &v) in out[y * w..(y + 1) * w].iter_mut().zip(src) {
                *o += kv * v;
            }
        }
    }
    out
}

/// Sα with α = 0.5 (`Smeasure.cal_sm`).
fn s_measure(p: &[f64], g: &[bool], h: usize, w: usize, fg: usize) -> f64 {
    const ALPHA: f64 = 0.5;
    let n = h * w;
    if fg == 0 {
        return 1.0 - npsum::mean(p);
    }
    if fg == n {
        return npsum::mean(p);
    }
    let y = fg as f64 / n as f64;
    // Object term.
    let fg_vals: Vec<f64> = p
        .iter()
        .zip(g)
        .filter(|(_, &t)| t)
        .map(|(&x, _)| x)
        .collect();
    let bg_vals: Vec<f64> = p
        .iter()
        .zip(g)
        .filter(|(_, &t)| !t)
        .map(|(&x, _)| 1.0 - x)
        .collect();
    let object = s_object(&fg_vals) * y + s_object(&bg_vals) * (1.0 - y);
    // Region term: four quadrants split at the centroid (rounded half to even, +1).
    let (mut sy, mut sx) = (0u64, 0u64);
    for (i, _) in g.iter().enumerate().filter(|(_, &t)| t) {
        sy += (i / w) as u64;
        sx += (i % w) as u64;
    }
    let cy = (sy as f64 / fg as f64).round_ties_even() as usize + 1;
    let cx = (sx as f64 / fg as f64).round_ties_even() as usize + 1;
    let area = n as f64;
    let w_lt = (cx * cy) as f64 / area;
    let w_rt = (cy * (w - cx)) as f64 / area;
    let w_lb = ((h - cy) * cx) as f64 / area;
    let w_rb = 1.0 - w_lt - w_rt - w_lb;
    let view = |r0, r1, c0, c1| npsum::View {
        r0,
        r1,
        c0,
        c1,
        width: w,
    };
    let region = ssim(p, g, view(0, cy, 0, cx)) * w_lt
        + ssim(p, g, view(0, cy, cx, w)) * w_rt
        + ssim(p, g, view(cy, h, 0, cx)) * w_lb
        + ssim(p, g, view(cy, h, cx, w)) * w_rb;
    (object * ALPHA + region * (1.0 - ALPHA)).max(0.0)
}

/// `Smeasure.s_object`: `2·mean / (mean² + 1 + std + eps)` (std with ddof = 1).
fn s_object(x: &[f64]) -> f64 {
    let mean = npsum::mean(x);
    let std = if x.len() > 1 {
        let d: Vec<f64> = x.iter().map(|&v| (v - mean) * (v - mean)).collect();
        (npsum::sum(&d) / (x.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    2.0 * mean / (mean * mean + 1.0 + std + EPS)
}

/// `Smeasure.ssim` of one quadrant (0 for a quadrant with no pixels, whose weight is 0).
fn ssim(p: &[f64], g: &[bool], v: npsum::View) -> f64 {
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let x = v.np_sum(p) / n as f64;
    let gq = v.gather(g);
    let y = gq.iter().filter(|&&t| t).count() as f64 / n as f64;
    let pq = v.gather(p);
    let denom = (n - 1) as f64 + EPS;
    let dx: Vec<f64> = pq.iter().map(|&a| (a - x) * (a - x)).collect();
    let dy: Vec<f64> = gq
        .iter()
        .map(|&t| {
            let d = f64::from(u8::from(t)) - y;
            d * d
        })
        .collect();
    let dxy: Vec<f64> = pq
        .iter()
        .zip(&gq)
        .map(|(&a, &t)| (a - x) * (f64::from(u8::from(t)) - y))
        .collect();
    let sigma_x = npsum::sum(&dx) / denom;
    let sigma_y = npsum::sum(&dy) / denom;
    let sigma_xy = npsum::sum(&dxy) / denom;
    let alpha = 4.0 * x * y * sigma_xy;
    let beta = (x * x + y * y) * (sigma_x + sigma_y);
    if alpha != 0.0 {
        alpha / (beta + EPS)
    } else if beta == 0.0 {
        1.0
    } else {
        0.0
    }
}

/// Eφ of a binarised map from its counts (`Emeasure.cal_em_with_threshold`): `tp` predicted
/// foreground pixels inside the object, `pred` predicted foreground in all.
fn e_measure_from_counts(tp: u64, pred: u64, n: usize, fg: usize) -> f64 {
    let (n_u, fg_u) = (n as u64, fg as u64);
    let fp = pred - tp;
    let sum = if fg == 0 {
        (n_u - pred) as f64
    } else if fg == n {
        pred as f64
    } else {
        let fn_ = fg_u - tp;
        let tn = (n_u - pred) - fn_;
        let mean_pred = pred as f64 / n as f64;
        let mean_gt = fg as f64 / n as f64;
        let (pf, pb) = (1.0 - mean_pred, 0.0 - mean_pred);
        let (gf, gb) = (1.0 - mean_gt, 0.0 - mean_gt);
        let part = |a: f64, b: f64, count: u64| {
            let align = 2.0 * (a * b) / (a * a + b * b + EPS);
            let enhanced = (align + 1.0) * (align + 1.0) / 4.0;
            enhanced * count as f64
        };
        part(pf, gf, tp) + part(pf, gb, fp) + part(pb, gf, fn_) + part(pb, gb, tn)
    };
    sum / ((n - 1) as f64 + EPS)
}

/// Eφ at k = 0…255 over the 8-bit levels `floor(255·p)` (PySODMetrics' cumulative histogram).
fn e_measure_curve(p: &[f64], g: &[bool], n: usize, fg: usize) -> Vec<f64> {
    let mut hist_fg = [0u64; EM_THRESHOLDS];
    let mut hist_bg = [0u64; EM_THRESHOLDS];
    for (&x, &t) in p.iter().zip(g) {
        // `(pred * 255).astype(np.uint8)`: truncation; p ∈ [0, 1] so the level is 0…255.
        let level = ((x * 255.0) as usize).min(EM_THRESHOLDS - 1);
        if t {
            hist_fg[level] += 1;
        } else {
            hist_bg[level] += 1;
        }
    }
    let mut curve = vec![0f64; EM_THRESHOLDS];
    let (mut tp, mut fp) = (0u64, 0u64);
    for k in (0..EM_THRESHOLDS).rev() {
        tp += hist_fg[k];
        fp += hist_bg[k];
        curve[k] = e_measure_from_counts(tp, tp + fp, n, fg);
    }
    curve
}

/// Adaptive Eφ: binarised at `p ≥ min(2·mean(p), 1)`.
fn e_measure_adaptive(p: &[f64], g: &[bool], n: usize, fg: usize) -> f64 {
    let t = (2.0 * npsum::mean(p)).min(1.0);
    let (mut tp, mut pred) = (0u64, 0u64);
    for (&x, &gt) in p.iter().zip(g) {
        if x >= t {
            pred += 1;
            tp += u64::from(gt);
        }
    }
    e_measure_from_counts(tp, pred, n, fg)
}

/// Boundary pixels of a mask: foreground with a 4-neighbour in the background or on the image
/// border (`mask ^ binary_erosion(mask)`, scipy's border value 0).
fn boundary(m: &[bool], h: usize, w: usize) -> Vec<bool> {
    (0..h * w)
        .map(|i| {
            if !m[i] {
                return false;
            }
            let (y, x) = (i / w, i % w);
            y == 0
                || x == 0
                || y + 1 == h
                || x + 1 == w
                || !m[i - w]
                || !m[i + w]
                || !m[i - 1]
                || !m[i + 1]
        })
        .collect()
}

/// NumPy's `percentile(a, q)` with the default linear method (`a` sorted ascending, non-empty).
fn percentile_linear(a: &[f64], q: f64) -> f64 {
    let n = a.len();
    let virt = (n - 1) as f64 * (q / 100.0);
    let lo = (virt.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    let t = virt - lo as f64;
    let (x, y) = (a[lo], a[hi]);
    let d = y - x;
    if t >= 0.5 {
        y - d * (1.0 - t)
    } else {
        x + d * t
    }
}

/// HD95 in pixels (medpy's `hd95` with 4-connected boundaries; see the module docs for the
/// empty cases).
fn hd95(p: &[f64], g: &[bool], h: usize, w: usize) -> f64 {
    let pred: Vec<bool> = p.iter().map(|&x| x >= 0.5).collect();
    let (bp, bg) = (boundary(&pred, h, w), boundary(g, h, w));
    let (Some((_, to_g)), Some((_, to_p))) = (
        edt::feature_transform(&bg, h, w),
        edt::feature_transform(&bp, h, w),
    ) else {
        let (ep, eg) = (!pred.contains(&true), !g.contains(&true));
        return if ep && eg {
            0.0
        } else {
            (((h - 1) * (h - 1) + (w - 1) * (w - 1)) as f64).sqrt()
        };
    };
    // medpy: the 95th percentile of both directions' distances pooled (`np.hstack`).
    let mut d: Vec<f64> = [(&bp, &to_g), (&bg, &to_p)]
        .into_iter()
        .flat_map(|(from, to)| {
            from.iter()
                .zip(to.iter())
                .filter(|(&b, _)| b)
                .map(|(_, &d2)| (d2 as f64).sqrt())
        })
        .collect();
    d.sort_by(f64::total_cmp);
    percentile_linear(&d, 95.0)
}

/// A test set's table row (JSON keys as in the polyp papers' columns).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SetReport {
    pub mdice: f64,
    pub miou: f64,
    pub wfm: f64,
    pub sm: f64,
    pub em_mean: f64,
    pub em_max: f64,
    pub em_adp: f64,
    pub mae: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hd95: Option<f64>,
}

/// Aggregates one test set as PraNet's toolbox does: per-image values averaged over the set's
/// images; Eφ mean and max over the 256 thresholds of the set's mean curve. Keeps every
/// image's score in order, so shards concatenated in order finish to the same numbers.
#[derive(Debug, Clone, Default)]
pub struct SetMetrics {
    pub opts: FieldOptions,
    scores: Vec<(String, FieldScore)>,
}

impl SetMetrics {
    pub fn new(opts: FieldOptions) -> Self {
        SetMetrics {
            opts,
            scores: Vec::new(),
        }
    }

    /// Add one scored image.
    pub fn add(&mut self, id: &str, score: FieldScore) {
        self.scores.push((id.to_string(), score));
    }

    /// Score a probability map with this set's options and add it.
    pub fn add_probs(
        &mut self,
        id: &str,
        prob: &[f32],
        gt: &[u8],
        hw: (usize, usize),
    ) -> Result<&FieldScore> {
        let s = score_probs(prob, gt, hw, &self.opts);
        self.add_scored(id, s)
    }

    /// Score an 8-bit map with this set's options and add it.
    pub fn add_8bit(
        &mut self,
        id: &str,
        map: &[u8],
        gt: &[u8],
        hw: (usize, usize),
    ) -> Result<&FieldScore> {
        let s = score_8bit(map, gt, hw, &self.opts);
        self.add_scored(id, s)
    }

    fn add_scored(&mut self, id: &str, s: Result<FieldScore>) -> Result<&FieldScore> {
        let s = s.map_err(|e| match e {
            Error::Data { msg } => Error::Data {
                msg: format!("image `{id}`: {msg}"),
            },
            other => other,
        })?;
        self.add(id, s);
        Ok(&self.scores[self.scores.len() - 1].1)
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// Every image's id and score, in the order added.
    pub fn scores(&self) -> &[(String, FieldScore)] {
        &self.scores
    }

    /// The set's mean E-measure curve (k = 0…255); errors as [`SetMetrics::finish`].
    pub fn mean_em_curve(&self) -> Result<Vec<f64>> {
        if self.scores.is_empty() {
            return Err(Error::Data {
                msg: "no images were scored in this set".into(),
            });
        }
        let mut curve = vec![0f64; EM_THRESHOLDS];
        for (id, s) in &self.scores {
            if s.em_curve.len() != EM_THRESHOLDS {
                return Err(Error::Data {
                    msg: format!(
                        "image `{id}`: E-measure curve has {} values, expected {EM_THRESHOLDS}",
                        s.em_curve.len()
                    ),
                });
            }
            curve
                .iter_mut()
                .zip(&s.em_curve)
                .for_each(|(c, &v)| *c += v);
        }
        let n = self.scores.len() as f64;
        curve.iter_mut().for_each(|c| *c /= n);
        Ok(curve)
    }

    /// The set's row. Errors: no images; HD95 asked for and an image scored without it.
    pub fn finish(&self) -> Result<SetReport> {
        let curve = self.mean_em_curve()?;
        let n = self.scores.len();
        // Dice and IoU summed in order, as `SegMetrics` does (equal to its mDice / mIoU); the
        // field metrics with NumPy's `np.mean` of the per-image list.
        let seq = |f: fn(&FieldScore) -> f64| {
            self.scores.iter().map(|(_, s)| f(s)).sum::<f64>() / n as f64
        };
        let np = |f: fn(&FieldScore) -> f64| {
            let v: Vec<f64> = self.scores.iter().map(|(_, s)| f(s)).collect();
            npsum::mean(&v)
        };
        let hd95 = if self.opts.hd95 {
            let mut v = Vec::with_capacity(n);
            for (id, s) in &self.scores {
                v.push(s.hd95.ok_or_else(|| Error::Data {
                    msg: format!("image `{id}` was scored without HD95, which this set reports"),
                })?);
            }
            Some(npsum::mean(&v))
        } else {
            None
        };
        Ok(SetReport {
            mdice: seq(|s| s.dice),
            miou: seq(|s| s.iou),
            wfm: np(|s| s.wfm),
            sm: np(|s| s.sm),
            em_mean: npsum::mean(&curve),
            em_max: curve.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            em_adp: np(|s| s.em_adp),
            mae: np(|s| s.mae),
            hd95,
        })
    }
}

/// One row of a per-set table (`report.json`, `summary.json`): the set's name, its image
/// count and its [`SetReport`] columns (flattened: `{"set": "Kvasir", "images": 100, "mdice":
/// …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetRow {
    pub set: String,
    pub images: usize,
    #[serde(flatten)]
    pub metrics: SetReport,
}

impl SetRow {
    /// The table's columns in the polyp papers' order, with their display names.
    pub fn columns(&self) -> Vec<(&'static str, f64)> {
        let m = &self.metrics;
        let mut c = vec![
            ("mDice", m.mdice),
            ("mIoU", m.miou),
            ("Fβʷ", m.wfm),
            ("Sα", m.sm),
            ("Eφ mean", m.em_mean),
            ("Eφ max", m.em_max),
            ("Eφ adp", m.em_adp),
            ("MAE", m.mae),
        ];
        if let Some(h) = m.hd95 {
            c.push(("HD95 (px)", h));
        }
        c
    }

    /// The rows as one sortable page table (set, images, then [`SetRow::columns`]).
    pub fn table(rows: &[SetRow], id: &str) -> crate::util::html::Table {
        use crate::util::html::{Cell, Table};
        let mut headers = vec!["set".to_string(), "images".into()];
        if let Some(r) = rows.first() {
            headers.extend(r.columns().iter().map(|(n, _)| n.to_string()));
        }
        Table {
            id: id.into(),
            headers,
            rows: rows
                .iter()
                .map(|r| {
                    let mut row = vec![Cell::Text(r.set.clone()), Cell::Num(r.images as f64, 0)];
                    row.extend(r.columns().iter().map(|(_, v)| Cell::Num(*v, 4)));
                    row
                })
                .collect(),
        }
    }
}

/// The set an image id belongs to: the part before the first `/` of a set-qualified id
/// (`Kvasir/cju0qkwl35piu0993l0dewei2`, as PraNet-layout test images are named in a run and
/// in an inference job), `None` for a plain id.
pub fn set_of_id(id: &str) -> Option<&str> {
    id.split_once('/').map(|(s, _)| s).filter(|s| !s.is_empty())
}

/// Per-set aggregation of field scores ([`SetMetrics`] per set), the sets in the order their
/// first image was added; each image goes to the set [`set_of_id`] names, or to `default` (the
/// name of a job's only set) when its id has none.
#[derive(Debug, Clone, Default)]
pub struct SetTable {
    pub opts: FieldOptions,
    pub default: String,
    sets: Vec<(String, SetMetrics)>,
}

impl SetTable {
    pub fn new(opts: FieldOptions, default: &str) -> Self {
        SetTable {
            opts,
            default: default.to_string(),
            sets: Vec::new(),
        }
    }

    /// Add one scored image to its set.
    pub fn add(&mut self, id: &str, score: FieldScore) {
        let set = set_of_id(id).unwrap_or(&self.default);
        let k = match self.sets.iter().position(|(n, _)| n == set) {
            Some(k) => k,
            None => {
                self.sets
                    .push((set.to_string(), SetMetrics::new(self.opts)));
                self.sets.len() - 1
            }
        };
        self.sets[k].1.add(id, score);
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Every set's metrics, in order.
    pub fn sets(&self) -> &[(String, SetMetrics)] {
        &self.sets
    }

    /// One row per set, in order (errors as [`SetMetrics::finish`], naming the set).
    pub fn finish(&self) -> Result<Vec<SetRow>> {
        self.sets
            .iter()
            .map(|(name, m)| {
                let metrics = m.finish().map_err(|e| Error::Data {
                    msg: format!("test set `{name}`: {e}"),
                })?;
                Ok(SetRow {
                    set: name.clone(),
                    images: m.len(),
                    metrics,
                })
            })
            .collect()
    }
}

/// Input of [`SetMetrics`]'s [`Metric::update`]: an image id and its score.
pub struct FieldInput<'a> {
    pub id: &'a str,
    pub score: FieldScore,
}

impl Metric for SetMetrics {
    type Input<'a> = FieldInput<'a>;
    type Output = Result<SetReport>;

    fn update(&mut self, input: FieldInput<'_>) {
        self.add(input.id, input.score);
    }

    fn compute(&self) -> Result<SetReport> {
        self.finish()
    }

    fn clear(&mut self) {
        self.scores.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_iou_count_false_positives() {
        // gt: 4 positive pixels; pred: the 4 plus 4 false positives.
        let gt = [1u8, 1, 1, 1, 0, 0, 0, 0, 0, 0];
        let prob = [0.9f32, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.1, 0.2];
        let (d, i) = dice_iou(&prob, &gt, 0.5);
        assert!((d - 8.0 / 12.0).abs() < 1e-12);
        assert!((i - 0.5).abs() < 1e-12);
        // The reference convention ignores background: perfect recall looks perfect.
        let mut m = SegMetrics::new(0.5);
        m.update(SegInput {
            id: "a",
            prob: &prob,
            gt: &gt,
        });
        let r = m.compute();
        assert!((r.ref_iou_ignore_bg - 1.0).abs() < 1e-12);
        assert!((r.miou - 0.5).abs() < 1e-12);
        assert_eq!(dice_iou(&[0.1, 0.2], &[0, 0], 0.5), (1.0, 1.0));
        assert_eq!(dice_iou(&[0.9, 0.2], &[0, 0], 0.5), (0.0, 0.0));
    }

    #[test]
    fn means_are_over_images_not_pixels() {
        let mut m = SegMetrics::new(0.5);
        // A big perfect image and a small wrong one: per-image mean is 0.5.
        let big_gt = vec![1u8; 1000];
        let big_p = vec![1.0f32; 1000];
        m.update(SegInput {
            id: "big",
            prob: &big_p,
            gt: &big_gt,
        });
        m.update(SegInput {
            id: "small",
            prob: &[0.0],
            gt: &[1],
        });
        let r = m.compute();
        assert!((r.mdice - 0.5).abs() < 1e-12 && (r.miou - 0.5).abs() < 1e-12);
        assert_eq!(r.images, 2);
        m.clear();
        assert_eq!(m.compute().images, 0);
    }

    #[test]
    fn accuracy_counts() {
        let mut a = Accuracy::default();
        a.update(&[(1, 1), (2, 1), (3, 3), (0, 0)]);
        assert!((a.compute() - 0.75).abs() < 1e-12);
    }

    // ------------------------------------------------------------ the field's metrics

    fn opts(hd95: bool) -> FieldOptions {
        FieldOptions {
            scale: MapScale::AsSaved,
            hd95,
        }
    }

    /// A 20×24 ground truth with a centred 8×10 object (all four quadrants hold part of it).
    fn centred_blob() -> (Vec<u8>, (usize, usize)) {
        let (h, w) = (20, 24);
        let gt = (0..h * w)
            .map(|i| u8::from((6..14).contains(&(i / w)) && (7..17).contains(&(i % w))))
            .collect();
        (gt, (h, w))
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn empty_ground_truth_cases_are_defined() {
        let (h, w) = (6, 7);
        let n = (h * w) as f64;
        let gt = vec![0u8; h * w];
        // Empty prediction on an empty ground truth.
        let s = score_probs(&vec![0.0; h * w], &gt, (h, w), &opts(true)).unwrap();
        assert_eq!(
            (s.dice, s.iou, s.wfm, s.sm, s.mae),
            (1.0, 1.0, 0.0, 1.0, 0.0)
        );
        assert_eq!(s.hd95, Some(0.0));
        // k = 0 binarises every pixel to foreground; every k ≥ 1 predicts nothing.
        assert_eq!(s.em_curve[0], 0.0);
        assert!(s.em_curve[1..].iter().all(|&e| e == n / (n - 1.0 + EPS)));
        // The adaptive threshold of an all-zero map is 0: everything is foreground.
        assert_eq!(s.em_adp, 0.0);
        // Everything predicted on an empty ground truth.
        let s = score_probs(&vec![1.0; h * w], &gt, (h, w), &opts(true)).unwrap();
        assert_eq!(
            (s.dice, s.iou, s.wfm, s.sm, s.mae),
            (0.0, 0.0, 0.0, 0.0, 1.0)
        );
        assert!(s.em_curve.iter().all(|&e| e == 0.0) && s.em_adp == 0.0);
        assert_eq!(s.hd95, Some(((5 * 5 + 6 * 6) as f64).sqrt()));
        // A constant map on an empty ground truth: Sα = 1 − c, nothing above 2c.
        let s = score_probs(&vec![0.3; h * w], &gt, (h, w), &opts(false)).unwrap();
        assert!(close(s.sm, 1.0 - f64::from(0.3f32)) && close(s.mae, f64::from(0.3f32)));
        assert_eq!(s.em_adp, n / (n - 1.0 + EPS));
        assert_eq!(s.hd95, None);
    }

    #[test]
    fn all_foreground_ground_truth_cases_are_defined() {
        let (h, w) = (5, 4);
        let n = (h * w) as f64;
        let gt = vec![1u8; h * w];
        let s = score_probs(&vec![1.0; h * w], &gt, (h, w), &opts(true)).unwrap();
        assert_eq!((s.dice, s.iou, s.sm, s.mae), (1.0, 1.0, 1.0, 0.0));
        assert!(close(s.wfm, 1.0));
        assert!(s.em_curve.iter().all(|&e| e == n / (n - 1.0 + EPS)));
        assert_eq!(s.hd95, Some(0.0));
        let s = score_probs(&vec![0.25; h * w], &gt, (h, w), &opts(true)).unwrap();
        assert!(close(s.sm, 0.25) && close(s.mae, 0.75));
        assert_eq!((s.dice, s.iou), (0.0, 0.0));
        // Predicted nothing at 0.5: HD95 is the largest pixel distance (4 down, 3 across).
        assert_eq!(s.hd95, Some(5.0));
    }

    #[test]
    fn an_empty_prediction_of_an_object_scores_as_the_field_defines() {
        let (gt, (h, w)) = centred_blob();
        let (n, fg) = ((h * w) as f64, 80.0);
        let s = score_probs(&vec![0.0; h * w], &gt, (h, w), &opts(true)).unwrap();
        assert_eq!((s.dice, s.iou), (0.0, 0.0));
        assert!(close(s.mae, fg / n));
        // Object term: 0 inside, 1 outside (weighted by the background share); region term 0
        // (no quadrant is all background, and a constant 0 has no structure).
        assert!(close(s.sm, 0.5 * (1.0 - fg / n)), "{}", s.sm);
        // Every threshold sees one constant map: each pixel's alignment term is 1/4.
        for e in s.em_curve.iter().chain([&s.em_adp]) {
            assert!(close(*e, n / 4.0 / (n - 1.0)), "{e}");
        }
        assert!(s.wfm < 1e-12, "{}", s.wfm);
        assert_eq!(s.hd95, Some(((19 * 19 + 23 * 23) as f64).sqrt()));
        // The ground truth itself is a perfect score.
        let p: Vec<f32> = gt.iter().map(|&t| f32::from(t)).collect();
        let s = score_probs(&p, &gt, (h, w), &opts(true)).unwrap();
        assert_eq!((s.dice, s.iou, s.mae, s.hd95), (1.0, 1.0, 0.0, Some(0.0)));
        assert!(close(s.sm, 1.0) && close(s.wfm, 1.0), "{} {}", s.sm, s.wfm);
        assert!(s.em_curve[1..].iter().all(|&e| close(e, n / (n - 1.0))));
    }

    #[test]
    fn min_max_stretches_the_map_and_leaves_constant_or_full_range_maps_alone() {
        let (gt, (h, w)) = centred_blob();
        // 10 outside, 20 inside: nothing reaches 0.5 as saved, the stretched map is the mask.
        let map: Vec<u8> = gt.iter().map(|&t| if t == 1 { 20 } else { 10 }).collect();
        let saved = score_8bit(&map, &gt, (h, w), &FieldOptions::default()).unwrap();
        let mm = FieldOptions {
            scale: MapScale::MinMax,
            hd95: false,
        };
        let stretched = score_8bit(&map, &gt, (h, w), &mm).unwrap();
        assert_eq!((saved.dice, stretched.dice), (0.0, 1.0));
        assert_eq!(stretched.mae, 0.0);
        // A map already spanning 0…255, and a constant map, are unchanged.
        let mut full = map.clone();
        full[0] = 0;
        full[1] = 255;
        assert_eq!(
            score_8bit(&full, &gt, (h, w), &mm).unwrap(),
            score_8bit(&full, &gt, (h, w), &FieldOptions::default()).unwrap()
        );
        let c = vec![77u8; h * w];
        assert_eq!(
            score_8bit(&c, &gt, (h, w), &mm).unwrap(),
            score_8bit(&c, &gt, (h, w), &FieldOptions::default()).unwrap()
        );
    }

    #[test]
    fn bad_sizes_and_values_are_refused_naming_what() {
        let o = opts(false);
        let e = score_probs(&[0.5; 5], &[0; 6], (2, 3), &o)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 values") && e.contains("2×3"), "{e}");
        let e = score_8bit(&[0], &[0], (1, 1), &o).unwrap_err().to_string();
        assert!(e.contains("at least 2 pixels"), "{e}");
        for bad in [f32::NAN, 1.5, -0.1, f32::INFINITY] {
            let e = score_probs(&[0.5, bad, 0.5, 0.5], &[0; 4], (2, 2), &o)
                .unwrap_err()
                .to_string();
            assert!(e.contains("pixel 1 (row 0, column 1)"), "{e}");
        }
        assert!(score_probs(&[0.5; 4], &[0; 4], (usize::MAX, 2), &o).is_err());
        let mut set = SetMetrics::new(o);
        let e = set
            .add_probs("img7", &[0.5; 3], &[0; 4], (2, 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("image `img7`"), "{e}");
        assert!(set.is_empty());
        assert!(set.finish().unwrap_err().to_string().contains("no images"));
    }

    #[test]
    fn probabilities_map_to_8bit_by_rounding_so_the_0_5_decision_is_kept() {
        assert_eq!(
            probs_to_8bit(&[0.0, 0.5, 0.499_999_97, 1.0, 1.2, -3.0, f32::NAN, 0.2]),
            vec![0, 128, 127, 255, 255, 0, 0, 51]
        );
    }

    #[test]
    fn a_set_takes_e_measure_mean_and_max_over_its_mean_curve() {
        let (gt, (h, w)) = centred_blob();
        // Two maps whose E-measure curves peak at different thresholds.
        let a: Vec<u8> = gt.iter().map(|&t| if t == 1 { 60 } else { 30 }).collect();
        let b: Vec<u8> = gt.iter().map(|&t| if t == 1 { 220 } else { 190 }).collect();
        let mut set = SetMetrics::new(opts(true));
        let sa = set.add_8bit("a", &a, &gt, (h, w)).unwrap().clone();
        let sb = set.add_8bit("b", &b, &gt, (h, w)).unwrap().clone();
        let r = set.finish().unwrap();
        let max_of = |c: &[f64]| c.iter().copied().fold(f64::MIN, f64::max);
        let mean_curve: Vec<f64> = (0..EM_THRESHOLDS)
            .map(|k| (sa.em_curve[k] + sb.em_curve[k]) / 2.0)
            .collect();
        assert_eq!(set.mean_em_curve().unwrap(), mean_curve);
        assert_eq!(r.em_max, max_of(&mean_curve));
        assert!(r.em_max < (max_of(&sa.em_curve) + max_of(&sb.em_curve)) / 2.0 - 0.1);
        assert!(close(r.em_mean, mean_curve.iter().sum::<f64>() / 256.0));
        assert!(close(r.sm, (sa.sm + sb.sm) / 2.0) && close(r.mae, (sa.mae + sb.mae) / 2.0));
        assert_eq!(r.mdice, (sa.dice + sb.dice) / 2.0);
        // JSON keys, exactly; `hd95` only when asked for.
        let keys = |r: &SetReport| {
            let v = serde_json::to_value(r).unwrap();
            v.as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(keys(&r), "em_adp em_max em_mean hd95 mae mdice miou sm wfm");
        let mut plain = SetMetrics::new(opts(false));
        plain.add("a", sa.clone());
        assert_eq!(
            keys(&plain.finish().unwrap()),
            "em_adp em_max em_mean mae mdice miou sm wfm"
        );
        // HD95 asked for, an image scored without it: refused, naming the image.
        let mut mixed = SetMetrics::new(opts(true));
        let mut no_hd = sa.clone();
        no_hd.hd95 = None;
        mixed.add("nohd", no_hd);
        assert!(mixed.finish().unwrap_err().to_string().contains("`nohd`"));
        // Scores survive JSON, and shards added in order finish to the same numbers.
        let back: FieldScore = serde_json::from_str(&serde_json::to_string(&sb).unwrap()).unwrap();
        assert_eq!(back, sb);
        let mut joined = SetMetrics::new(opts(true));
        joined.add("a", sa);
        joined.add("b", back);
        assert_eq!(joined.finish().unwrap(), r);
    }

    #[test]
    fn a_set_table_groups_images_by_the_set_in_their_id_in_order_of_arrival() {
        let (gt, (h, w)) = centred_blob();
        let mut rng = crate::util::Rng::new(9);
        let mut table = SetTable::new(opts(false), "images");
        let mut alone: Vec<(String, SetMetrics)> = Vec::new();
        for (i, id) in ["CVC-300/a", "Kvasir/a", "CVC-300/b", "plain", "Kvasir/b"]
            .iter()
            .enumerate()
        {
            let p: Vec<f32> = (0..h * w).map(|_| rng.f32()).collect();
            let s = score_probs(&p, &gt, (h, w), &opts(false)).unwrap();
            let set = set_of_id(id).unwrap_or("images").to_string();
            match alone.iter_mut().find(|(n, _)| *n == set) {
                Some((_, m)) => m.add(id, s.clone()),
                None => {
                    let mut m = SetMetrics::new(opts(false));
                    m.add(id, s.clone());
                    alone.push((set, m));
                }
            }
            table.add(id, s);
            assert_eq!(table.sets().len(), [1, 2, 2, 3, 3][i]);
        }
        let rows = table.finish().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.set.as_str()).collect();
        assert_eq!(names, ["CVC-300", "Kvasir", "images"]);
        assert_eq!(rows.iter().map(|r| r.images).collect::<Vec<_>>(), [2, 2, 1]);
        for (r, (_, m)) in rows.iter().zip(&alone) {
            assert_eq!(r.metrics, m.finish().unwrap());
        }
        let v = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(v["set"], "CVC-300");
        assert_eq!(v["images"], 2);
        assert!(v["em_max"].is_f64());
        let back: SetRow = serde_json::from_value(v).unwrap();
        assert_eq!(back.set, rows[0].set);
        assert_eq!(set_of_id("/x"), None);
    }

    #[test]
    fn mdice_of_a_set_equals_seg_metrics() {
        let (gt, (h, w)) = centred_blob();
        let mut rng = crate::util::Rng::new(3);
        let mut set = SetMetrics::new(opts(false));
        let mut seg = SegMetrics::new(0.5);
        for i in 0..7 {
            let p: Vec<f32> = (0..h * w).map(|_| rng.f32()).collect();
            let id = format!("{i}");
            set.add_probs(&id, &p, &gt, (h, w)).unwrap();
            seg.update(SegInput {
                id: &id,
                prob: &p,
                gt: &gt,
            });
        }
        let (a, b) = (set.finish().unwrap(), seg.compute());
        assert_eq!((a.mdice, a.miou), (b.mdice, b.miou));
    }
}
