//! Resizing to a model's square input size S, and mapping predictions back.
//!
//! Two policies: [`Resize::Squash`] (the GPS reference: both sides to S, aspect ratio lost) and
//! [`Resize::LongestSidePad`] (SAM's own `ResizeLongestSide`: longest side to S, the content in
//! the top-left corner, zeros to the bottom/right). Images use a triangle (bilinear, antialiased)
//! filter; masks use nearest neighbour (PyTorch `nearest`: `src = floor(dst · in / out)`).
//! [`to_original`] maps an `[S, S]` map back with bilinear interpolation (PyTorch
//! `align_corners=False`), cropping the padding first for `LongestSidePad`.

use crate::error::{Error, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// How an image of any size becomes `S × S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Resize {
    /// Both sides scaled to S independently (GPS reference).
    #[default]
    Squash,
    /// Longest side scaled to S, aspect kept, zero padding bottom/right (SAM).
    #[value(alias = "pad")]
    LongestSidePad,
}

impl std::str::FromStr for Resize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "squash" => Ok(Resize::Squash),
            "longest-side-pad" | "pad" => Ok(Resize::LongestSidePad),
            _ => Err(Error::Config {
                field: "resize".into(),
                msg: format!("unknown resize `{s}` (expected squash or longest-side-pad)"),
            }),
        }
    }
}

impl std::fmt::Display for Resize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resize::Squash => "squash",
            Resize::LongestSidePad => "longest-side-pad",
        })
    }
}

impl Resize {
    /// `(h, w)` of the resized content inside the `S × S` frame for an original `(h, w)`.
    /// For `LongestSidePad` this is SAM's `get_preprocess_shape` (round half up).
    pub fn content_size(self, orig: (usize, usize), s: usize) -> (usize, usize) {
        match self {
            Resize::Squash => (s, s),
            Resize::LongestSidePad => {
                let (h, w) = orig;
                let scale = s as f64 / h.max(w).max(1) as f64;
                let nh = ((h as f64 * scale) + 0.5).floor() as usize;
                let nw = ((w as f64 * scale) + 0.5).floor() as usize;
                (nh.clamp(1, s), nw.clamp(1, s))
            }
        }
    }

    /// Scale factors `(sy, sx)` from original pixel coordinates to input-frame coordinates.
    pub fn scale(self, orig: (usize, usize), s: usize) -> (f32, f32) {
        let (ch, cw) = self.content_size(orig, s);
        (
            ch as f32 / orig.0.max(1) as f32,
            cw as f32 / orig.1.max(1) as f32,
        )
    }
}

/// Resize an RGB image into an `[3, S, S]` CHW f32 buffer in [0, 1].
pub fn resize_rgb_chw(img: &RgbImage, s: usize, resize: Resize) -> Vec<f32> {
    resize_rgb_chw_u8(img, s, resize)
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect()
}

/// Resize an RGB image into an `[3, S, S]` CHW u8 buffer (4× smaller than f32; lossless with
/// respect to [`resize_rgb_chw`], which is this divided by 255).
pub fn resize_rgb_chw_u8(img: &RgbImage, s: usize, resize: Resize) -> Vec<u8> {
    let orig = (img.height() as usize, img.width() as usize);
    let (ch, cw) = resize.content_size(orig, s);
    let resized;
    let src = if (ch, cw) == orig {
        img
    } else {
        resized = image::imageops::resize(
            img,
            cw as u32,
            ch as u32,
            image::imageops::FilterType::Triangle,
        );
        &resized
    };
    let mut out = vec![0u8; 3 * s * s];
    let raw = src.as_raw();
    for y in 0..ch {
        for x in 0..cw {
            let p = (y * cw + x) * 3;
            for c in 0..3 {
                out[c * s * s + y * s + x] = raw[p + c];
            }
        }
    }
    out
}

/// Convert an RGB image to `[3, H, W]` CHW f32 in [0, 1] without resizing.
pub fn rgb_to_chw(img: &RgbImage) -> Vec<f32> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let mut out = vec![0f32; 3 * h * w];
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = p[c] as f32 / 255.0;
        }
    }
    out
}

/// Nearest-neighbour resize of a binary `[h·w]` mask into an `[S, S]` {0,1} f32 map.
pub fn resize_mask_nearest(
    mask: &[u8],
    orig: (usize, usize),
    s: usize,
    resize: Resize,
) -> Vec<f32> {
    resize_mask_nearest_u8(mask, orig, s, resize)
        .into_iter()
        .map(f32::from)
        .collect()
}

/// Nearest-neighbour resize of a binary `[h·w]` mask into an `[S, S]` {0,1} u8 map.
pub fn resize_mask_nearest_u8(
    mask: &[u8],
    orig: (usize, usize),
    s: usize,
    resize: Resize,
) -> Vec<u8> {
    let (h, w) = orig;
    let (ch, cw) = resize.content_size(orig, s);
    let mut out = vec![0u8; s * s];
    for y in 0..ch {
        let sy = ((y * h) / ch).min(h - 1);
        for x in 0..cw {
            let sx = ((x * w) / cw).min(w - 1);
            out[y * s + x] = u8::from(mask[sy * w + sx] != 0);
        }
    }
    out
}

fn axis_weights(in_len: usize, out_len: usize) -> Vec<(usize, usize, f32)> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_len - 1);
            let i1 = (i0 + 1).min(in_len - 1);
            let t = (src - i0 as f64) as f32;
            (i0, i1, t)
        })
        .collect()
}

/// Bilinear resize of a single-channel `[sh, sw]` map to `[dh, dw]` (PyTorch
/// `F.interpolate(mode="bilinear", align_corners=False)`, no antialias).
pub fn bilinear(src: &[f32], sh: usize, sw: usize, dh: usize, dw: usize) -> Vec<f32> {
    let wy = axis_weights(sh, dh);
    let wx = axis_weights(sw, dw);
    let mut out = vec![0f32; dh * dw];
    for (oy, &(y0, y1, ty)) in wy.iter().enumerate() {
        let r0 = &src[y0 * sw..(y0 + 1) * sw];
        let r1 = &src[y1 * sw..(y1 + 1) * sw];
        let row = &mut out[oy * dw..(oy + 1) * dw];
        for (o, &(x0, x1, tx)) in row.iter_mut().zip(wx.iter()) {
            let a = r0[x0] + (r0[x1] - r0[x0]) * tx;
            let b = r1[x0] + (r1[x1] - r1[x0]) * tx;
            *o = a + (b - a) * ty;
        }
    }
    out
}

/// Map a model's `[S, S]` probability or logit map back to the original `(h, w)` resolution:
/// crop the content region (for `LongestSidePad`), then bilinear-resize. Returns `[h·w]`.
/// Errors when `pred` is not `S·S` long or a size is zero.
pub fn to_original(
    pred: &[f32],
    s: usize,
    resize: Resize,
    orig_size: (usize, usize),
) -> Result<Vec<f32>> {
    if pred.len() != s * s || s == 0 || orig_size.0 == 0 || orig_size.1 == 0 {
        return Err(Error::Data {
            msg: format!(
                "to_original: prediction has {} values, expected S·S = {} (S = {s}), original size {:?}",
                pred.len(),
                s * s,
                orig_size
            ),
        });
    }
    let (ch, cw) = resize.content_size(orig_size, s);
    let cropped: Vec<f32> = if (ch, cw) == (s, s) {
        pred.to_vec()
    } else {
        let mut c = Vec::with_capacity(ch * cw);
        for y in 0..ch {
            c.extend_from_slice(&pred[y * s..y * s + cw]);
        }
        c
    };
    Ok(bilinear(&cropped, ch, cw, orig_size.0, orig_size.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_side_pad_matches_sam_preprocess_shape() {
        // SAM: 1024 for (1072, 1920) → scale 0.5333 → (572, 1024).
        assert_eq!(
            Resize::LongestSidePad.content_size((1072, 1920), 1024),
            (572, 1024)
        );
        assert_eq!(
            Resize::LongestSidePad.content_size((487, 332), 64),
            (64, 44)
        );
        assert_eq!(Resize::Squash.content_size((487, 332), 64), (64, 64));
    }

    #[test]
    fn bilinear_identity_and_constant() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(bilinear(&src, 3, 4, 3, 4), src);
        let c = vec![2.5f32; 6];
        assert!(bilinear(&c, 2, 3, 7, 5)
            .iter()
            .all(|&v| (v - 2.5).abs() < 1e-6));
    }

    #[test]
    fn bilinear_upsample_matches_pytorch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0.,1.],[2.,3.]]]]), size=(4,4),
        // mode="bilinear", align_corners=False)[0,0,0] = [0, .25, .75, 1]
        let out = bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        let row0 = &out[0..4];
        for (a, b) in row0.iter().zip([0.0, 0.25, 0.75, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{row0:?}");
        }
        assert!((out[15] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn to_original_round_trips_a_mask_for_both_policies() {
        let (h, w) = (30, 50);
        let mut m = vec![0u8; h * w];
        for y in 5..20 {
            for x in 10..40 {
                m[y * w + x] = 1;
            }
        }
        for resize in [Resize::Squash, Resize::LongestSidePad] {
            let s = 100;
            let small = resize_mask_nearest(&m, (h, w), s, resize);
            let back = to_original(&small, s, resize, (h, w)).unwrap();
            let wrong = back
                .iter()
                .zip(&m)
                .filter(|(p, &t)| (**p >= 0.5) != (t == 1))
                .count();
            assert!(wrong <= 2 * (h + w), "{resize}: {wrong} wrong pixels");
        }
        assert!(to_original(&[0.0; 10], 4, Resize::Squash, (3, 3)).is_err());
    }
}
