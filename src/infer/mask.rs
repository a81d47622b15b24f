//! One image through a segmentation engine, as the library functions every front end shares:
//! [`preprocess`] (decoded RGB → `[3, S, S]` in [0, 1], the training loader's u8 resize then
//! / 255), [`postprocess`] (an `[S, S]` logit map → probabilities at the image's original
//! resolution, thresholded, refused when a logit is NaN/Inf) and [`mask_png`] (the 0/255 grey
//! PNG). The batch job ([`super::job`]) and the HTTP server (`crate::serve`) both call these,
//! so a served mask is byte-identical to the `masks/<id>.png` that `gps-seg infer` writes.

use crate::data::imgio;
use crate::data::resize::{self, to_original, Resize};
use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};

/// `[3, S, S]` RGB in [0, 1] for the model: the training loader's path (u8 resize, then / 255).
pub fn preprocess(rgb: &RgbImage, s: usize, resize: Resize) -> Vec<f32> {
    resize::resize_rgb_chw_u8(rgb, s, resize)
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One image's prediction at its original resolution.
#[derive(Debug, Clone)]
pub struct Mask {
    /// `(h, w)` of the original image.
    pub size: (usize, usize),
    /// Probability per pixel, `[h·w]` row-major.
    pub prob: Vec<f32>,
    /// `prob ≥ threshold` as {0, 1}, `[h·w]`.
    pub pred: Vec<u8>,
}

impl Mask {
    /// Pixels in the mask.
    pub fn area(&self) -> usize {
        self.pred.iter().filter(|&&v| v != 0).count()
    }

    /// Mean probability over the whole image (original resolution).
    pub fn mean_probability(&self) -> f64 {
        let sum: f64 = self.prob.iter().map(|&p| f64::from(p)).sum();
        sum / self.prob.len().max(1) as f64
    }

    /// The mask as a 0/255 grey PNG ([`mask_png`]).
    pub fn png(&self) -> Result<Vec<u8>> {
        mask_png(&self.pred, self.size)
    }
}

/// Why [`postprocess`] refused an output: the logits hold NaN/Inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    /// Non-finite logits.
    pub bad: usize,
    /// All logits of the image.
    pub of: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the model gave {} non-finite logit(s) of {} for this image (NaN/Inf weights or input)",
            self.bad, self.of
        )
    }
}

/// `logits` (`[size·size]`) → sigmoid → back to `orig` `(h, w)` (crop for `LongestSidePad`,
/// bilinear) → `≥ threshold`. `Ok(Err(_))` when a logit is not finite (nothing to score).
pub fn postprocess(
    logits: &[f32],
    size: usize,
    resize: Resize,
    orig: (usize, usize),
    threshold: f32,
) -> Result<std::result::Result<Mask, NonFinite>> {
    let bad = logits.iter().filter(|l| !l.is_finite()).count();
    if bad > 0 {
        return Ok(Err(NonFinite {
            bad,
            of: logits.len(),
        }));
    }
    let probs: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    let prob = to_original(&probs, size, resize, orig)?;
    let pred = prob.iter().map(|&v| u8::from(v >= threshold)).collect();
    Ok(Ok(Mask {
        size: orig,
        prob,
        pred,
    }))
}

/// A {0, 1} mask `[h·w]` as the grey PNG (0/255) `gps-seg infer` writes to `masks/<id>.png`.
pub fn mask_png(pred: &[u8], (h, w): (usize, usize)) -> Result<Vec<u8>> {
    imgio::encode_png(&mask_image(pred, (h, w))?)
}

/// A {0, 1} mask `[h·w]` as a 0/255 grey image.
pub fn mask_image(pred: &[u8], (h, w): (usize, usize)) -> Result<GrayImage> {
    let (wu, hu) = (
        u32::try_from(w).map_err(|_| Error::msg(format!("mask width {w} too large")))?,
        u32::try_from(h).map_err(|_| Error::msg(format!("mask height {h} too large")))?,
    );
    GrayImage::from_raw(wu, hu, pred.iter().map(|&v| v * 255).collect()).ok_or_else(|| {
        Error::msg(format!(
            "mask buffer of {} does not match {w}×{h}",
            pred.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postprocess_maps_back_and_refuses_non_finite() {
        let s = 4;
        let logits: Vec<f32> = (0..s * s)
            .map(|i| if i % s < 2 { 5.0 } else { -5.0 })
            .collect();
        let m = postprocess(&logits, s, Resize::Squash, (3, 8), 0.5)
            .unwrap()
            .unwrap();
        assert_eq!(m.size, (3, 8));
        assert_eq!(m.area(), 12, "left half of 3×8");
        assert!(m.mean_probability() > 0.4 && m.mean_probability() < 0.6);
        let png = m.png().unwrap();
        let back = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!((back.width(), back.height()), (8, 3));
        assert_eq!(back.get_pixel(0, 0).0, [255]);
        assert_eq!(back.get_pixel(7, 2).0, [0]);
        let mut nan = logits.clone();
        nan[3] = f32::NAN;
        let e = postprocess(&nan, s, Resize::Squash, (3, 8), 0.5)
            .unwrap()
            .unwrap_err();
        assert_eq!((e.bad, e.of), (1, 16));
        assert!(mask_png(&[1, 0], (2, 2)).is_err());
    }
}
