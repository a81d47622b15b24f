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
}
