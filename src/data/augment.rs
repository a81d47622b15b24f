//! Seeded augmentation on CHW f32 buffers in [0, 1] (every random choice comes from a
//! [`Rng`], so a run is reproducible and resumable).
//!
//! Classification: horizontal flip, random resized crop (torchvision `RandomResizedCrop`:
//! area scale and log-uniform aspect ratio, 10 tries then a centre crop), colour jitter
//! (brightness, contrast, saturation) and the two-view pair used by GPS's SupCon selection
//! loss (Khosla et al. 2020; GPS reference, temperature 0.07). Segmentation: horizontal flip of
//! image, mask, original mask and boxes together (GPS reference recipe, p = 0.5).

use super::kvasir::SegSample;
use crate::util::Rng;
use serde::{Deserialize, Serialize};

/// Flip a `[C, H, W]` buffer left↔right in place.
pub fn hflip_chw(x: &mut [f32], c: usize, h: usize, w: usize) {
    debug_assert_eq!(x.len(), c * h * w);
    for row in x.chunks_exact_mut(w).take(c * h) {
        row.reverse();
    }
}

/// Flip any row-major `[H, W]` buffer left↔right in place.
pub fn hflip_plane<T>(x: &mut [T], w: usize) {
    if w == 0 {
        return;
    }
    for row in x.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// Segmentation augmentation (flip only, as in the reference recipe).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SegAugment {
    /// Probability of a horizontal flip.
    pub hflip: f64,
}

impl Default for SegAugment {
    fn default() -> Self {
        SegAugment { hflip: 0.5 }
    }
}

impl SegAugment {
    /// Apply to a sample: image, mask, original mask and boxes flip together.
    pub fn apply(&self, s: &mut SegSample, rng: &mut Rng) {
        if rng.bernoulli(self.hflip) {
            flip_seg_sample(s);
        }
    }
}

/// Flip a [`SegSample`] left↔right (image, mask, orig_mask, boxes).
pub fn flip_seg_sample(s: &mut SegSample) {
    let ss = s.mask.len();
    let side = (ss as f64).sqrt().round() as usize;
    hflip_chw(&mut s.image, 3, side, side);
    hflip_plane(&mut s.mask, side);
    hflip_plane(&mut s.orig_mask, s.orig_size.1);
    // Boxes live in the S×S frame: x → S − x.
    for b in &mut s.boxes {
        let (x0, x1) = (side as f32 - b[2], side as f32 - b[0]);
        b[0] = x0;
        b[2] = x1;
    }
}

/// Random-resized-crop a `[3, H, W]` image to `[3, out, out]` with bilinear sampling.
/// `scale`: range of the crop's area fraction; `ratio`: range of its aspect ratio w/h.
pub fn random_resized_crop(
    x: &[f32],
    h: usize,
    w: usize,
    out: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut Rng,
) -> Vec<f32> {
    let area = (h * w) as f32;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    let mut crop = None;
    for _ in 0..10 {
        let a = area * rng.uniform(scale.0, scale.1);
        let r = rng.uniform(lr0, lr1).exp();
        let cw = (a * r).sqrt().round() as usize;
        let ch = (a / r).sqrt().round() as usize;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            let y0 = rng.below(h - ch + 1);
            let x0 = rng.below(w - cw + 1);
            crop = Some((y0, x0, ch, cw));
            break;
        }
    }
    let (y0, x0, ch, cw) = crop.unwrap_or_else(|| {
        let s = h.min(w);
        ((h - s) / 2, (w - s) / 2, s, s)
    });
    crop_resize(x, h, w, (y0, x0, ch, cw), out)
}

/// Crop `(y0, x0, ch, cw)` out of a `[3, H, W]` image and bilinearly resize it to `out × out`.
pub fn crop_resize(
    x: &[f32],
    h: usize,
    w: usize,
    (y0, x0, ch, cw): (usize, usize, usize, usize),
    out: usize,
) -> Vec<f32> {
    let mut res = Vec::with_capacity(3 * out * out);
    let mut plane = vec![0f32; ch * cw];
    for c in 0..3 {
        for y in 0..ch {
            let src = &x[c * h * w + (y0 + y) * w + x0..c * h * w + (y0 + y) * w + x0 + cw];
            plane[y * cw..(y + 1) * cw].copy_from_slice(src);
        }
        res.extend(super::resize::bilinear(&plane, ch, cw, out, out));
    }
    res
}

/// Colour jitter strengths (torchvision `ColorJitter` semantics: factor uniform in
/// `[1 − s, 1 + s]`), applied in a random order, result clamped to [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
}

impl Default for ColorJitter {
    fn default() -> Self {
        ColorJitter {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
        }
    }
}

fn gray(x: &[f32], n: usize, i: usize) -> f32 {
    0.299 * x[i] + 0.587 * x[n + i] + 0.114 * x[2 * n + i]
}

impl ColorJitter {
    /// Jitter a `[3, H, W]` image in place.
    pub fn apply(&self, x: &mut [f32], rng: &mut Rng) {
        let n = x.len() / 3;
        let mut ops = [0usize, 1, 2];
        rng.shuffle(&mut ops);
        for op in ops {
            match op {
                0 if self.brightness > 0.0 => {
                    let f = rng.uniform(1.0 - self.brightness, 1.0 + self.brightness);
                    x.iter_mut().for_each(|v| *v *= f);
                }
                1 if self.contrast > 0.0 => {
                    let f = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast);
                    let mean = (0..n).map(|i| gray(x, n, i)).sum::<f32>() / n.max(1) as f32;
                    x.iter_mut().for_each(|v| *v = mean + f * (*v - mean));
                }
                2 if self.saturation > 0.0 => {
                    let f = rng.uniform(1.0 - self.saturation, 1.0 + self.saturation);
                    for i in 0..n {
                        let g = gray(x, n, i);
                        for c in 0..3 {
                            x[c * n + i] = g + f * (x[c * n + i] - g);
                        }
                    }
                }
                _ => {}
            }
            x.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        }
    }
}

/// Classification augmentation: flip, optional random resized crop, optional colour jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClsAugment {
    pub hflip: f64,
    /// Area-scale range of the random resized crop; `None` disables it.
    pub crop_scale: Option<(f32, f32)>,
    pub jitter: Option<ColorJitter>,
}

impl Default for ClsAugment {
    /// Flip p = 0.5, crop scale (0.5, 1), no jitter: a mild fine-tuning recipe.
    fn default() -> Self {
        ClsAugment {
            hflip: 0.5,
            crop_scale: Some((0.5, 1.0)),
            jitter: None,
        }
    }
}

impl ClsAugment {
    /// The stronger recipe for SupCon's two views (SimCLR-style: crop 0.2–1, jitter 0.4).
    pub fn contrastive() -> Self {
        ClsAugment {
            hflip: 0.5,
            crop_scale: Some((0.2, 1.0)),
            jitter: Some(ColorJitter::default()),
        }
    }

    /// Augment a `[3, S, S]` image, returning a new `[3, S, S]` image.
    pub fn apply(&self, x: &[f32], s: usize, rng: &mut Rng) -> Vec<f32> {
        let mut y = match self.crop_scale {
            Some(sc) => random_resized_crop(x, s, s, s, sc, (3.0 / 4.0, 4.0 / 3.0), rng),
            None => x.to_vec(),
        };
        if rng.bernoulli(self.hflip) {
            hflip_chw(&mut y, 3, s, s);
        }
        if let Some(j) = &self.jitter {
            j.apply(&mut y, rng);
        }
        y
    }
}

/// Two independently augmented views of one `[3, S, S]` image (SupCon's positive pair).
pub fn contrastive_pair(
    x: &[f32],
    s: usize,
    aug: &ClsAugment,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<f32>) {
    let a = aug.apply(x, s, rng);
    let b = aug.apply(x, s, rng);
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_twice_is_identity_and_flip_moves_pixels() {
        let x: Vec<f32> = (0..3 * 4 * 5).map(|v| v as f32).collect();
        let mut y = x.clone();
        hflip_chw(&mut y, 3, 4, 5);
        assert_eq!(y[0], x[4]);
        hflip_chw(&mut y, 3, 4, 5);
        assert_eq!(x, y);
    }

    #[test]
    fn seg_flip_keeps_image_and_mask_aligned() {
        let s = 4;
        let mut img = vec![0f32; 3 * s * s];
        let mut mask = vec![0f32; s * s];
        // Mark pixel (1, 0) in image channel 0 and in the mask.
        img[s] = 1.0;
        mask[s] = 1.0;
        let mut smp = SegSample {
            id: "a".into(),
            image: img,
            mask,
            orig_size: (2, 3),
            orig_mask: vec![1, 0, 0, 0, 0, 1],
            boxes: vec![[0.0, 0.0, 1.0, 1.0]],
            prompts: Vec::new(),
        };
        flip_seg_sample(&mut smp);
        assert_eq!(smp.mask[s + 3], 1.0);
        assert_eq!(smp.image[s + 3], 1.0);
        assert_eq!(smp.orig_mask, vec![0, 0, 1, 1, 0, 0]);
        assert_eq!(smp.boxes[0], [3.0, 0.0, 4.0, 1.0]);
    }

    #[test]
    fn augment_is_seeded_and_stays_in_range() {
        let s = 8;
        let x: Vec<f32> = (0..3 * s * s).map(|v| (v % 17) as f32 / 16.0).collect();
        let aug = ClsAugment::contrastive();
        let (a1, b1) = contrastive_pair(&x, s, &aug, &mut Rng::new(5));
        let (a2, b2) = contrastive_pair(&x, s, &aug, &mut Rng::new(5));
        assert_eq!(a1, a2);
        assert_eq!(b1, b2);
        assert_ne!(a1, b1);
        assert!(a1.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(a1.len(), 3 * s * s);
    }
}
