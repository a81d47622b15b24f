//! Synthetic Kvasir-SEG: endoscopy-like images with polyps, written in the real layout
//! (`images/*.jpg`, `masks/*.jpg`, `kavsir_bboxes.json`) so every loader and command runs
//! unchanged on it. It stands in for the real dataset (Jha et al., MMM 2020), which cannot be
//! redistributed.
//!
//! Each image: reddish-pink mucosa shaded with low-frequency noise, mucosal folds and a dark
//! lumen, branching vessels, vignetting (sometimes black cut corners, as in Kvasir), specular
//! highlights, a slight blur and sensor noise; 1–3 polyps with irregular smooth outlines (radial
//! Fourier perturbations of a circle), dome shading, a contact shadow, a paler/bumpier texture of
//! the same hue family, some cut by the image border. The mask is exactly the visible polyp
//! pixels (pixel centre inside an outline and not in a black corner); masks are written as
//! JPEG at quality 100, so thresholding at 128 recovers them exactly.
//!
//! Deterministic: image `i` uses `Rng::derive(seed, "synth-kvasir/i")`, whatever the thread
//! count.

use super::imgio;
use super::kvasir::{BBox, BBoxEntry, BBOX_FILE};
use crate::error::{Error, Result};
use crate::util::Rng;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Generator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthKvasirConfig {
    pub count: usize,
    pub seed: u64,
    /// Largest image side. Kvasir spans 332×487 … 1920×1072; sizes are drawn between 487 (or
    /// `max_side` if smaller) and `max_side`, biased towards the small end.
    pub max_side: usize,
    /// JPEG quality of the images (masks are always written at 100).
    pub jpeg_quality: u8,
}

impl Default for SynthKvasirConfig {
    fn default() -> Self {
        SynthKvasirConfig {
            count: 1000,
            seed: 0,
            max_side: 720,
            jpeg_quality: 90,
        }
    }
}

/// One generated image with its exact mask (0/255) and per-polyp boxes (inclusive pixel
/// coordinates).
#[derive(Debug, Clone)]
pub struct SynthImage {
    pub id: String,
    pub image: RgbImage,
    pub mask: GrayImage,
    pub boxes: Vec<BBox>,
}

/// Id of image `index` (sorted order = index order).
pub fn synth_id(index: usize) -> String {
    format!("synth{index:05}")
}

/// Smooth value noise on a random lattice (bilinear with smoothstep weights), periodic.
struct Noise {
    g: Vec<f32>,
    n: usize,
}

impl Noise {
    fn new(rng: &mut Rng, n: usize) -> Self {
        Noise {
            g: (0..n * n).map(|_| rng.f32() * 2.0 - 1.0).collect(),
            n,
        }
    }
    #[inline]
    fn at(&self, x: f32, y: f32) -> f32 {
        let n = self.n;
        let (fx, fy) = (x.floor(), y.floor());
        let (tx, ty) = (x - fx, y - fy);
        let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
        let xi = (fx as i64).rem_euclid(n as i64) as usize;
        let yi = (fy as i64).rem_euclid(n as i64) as usize;
        let (x1, y1) = ((xi + 1) % n, (yi + 1) % n);
        let a = self.g[yi * n + xi];
        let b = self.g[yi * n + x1];
        let c = self.g[y1 * n + xi];
        let d = self.g[y1 * n + x1];
        let top = a + (b - a) * sx;
        let bot = c + (d - c) * sx;
        top + (bot - top) * sy
    }
    /// Fractal sum of `oct` octaves at base frequency `f` (cycles per unit), in about [-1, 1].
    fn fbm(&self, x: f32, y: f32, f: f32, oct: usize) -> f32 {
        let (mut amp, mut freq, mut sum, mut norm) = (1.0, f, 0.0, 0.0);
        for o in 0..oct {
            // Offset octaves so they do not share lattice points.
            let off = o as f32 * 17.31;
            sum += amp * self.at(x * freq + off, y * freq - off);
            norm += amp;
            amp *= 0.5;
            freq *= 2.0;
        }
        sum / norm
    }
}

#[inline]
fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

struct Polyp {
    cx: f32,
    cy: f32,
    r: f32,
    /// (k, amplitude·cos φ, amplitude·sin φ)
    harmonics: Vec<(usize, f32, f32)>,
    tint: [f32; 3],
    tint_mix: f32,
    bump: f32,
    light: (f32, f32),
}

impl Polyp {
    /// Outline radius in direction (c, s) = (cos θ, sin θ).
    #[inline]
    fn radius(&self, c: f32, s: f32) -> f32 {
        let mut f = 1.0;
        // cos(kθ + φ) via repeated complex multiplication.
        let (mut ck, mut sk) = (1.0f32, 0.0f32);
        let mut k = 0;
        for &(hk, ac, as_) in &self.harmonics {
            while k < hk {
                let t = ck * c - sk * s;
                sk = ck * s + sk * c;
                ck = t;
                k += 1;
            }
            f += ck * ac - sk * as_;
        }
        self.r * f.max(0.45)
    }
    fn max_radius(&self) -> f32 {
        self.r * (1.0 + self.harmonics.iter().map(|h| h.1.hypot(h.2)).sum::<f32>())
    }
}

fn draw_size(rng: &mut Rng, max_side: usize) -> (usize, usize) {
    let max_side = max_side.max(16);
    let lo = 487.min(max_side);
    let u = rng.f32();
    let long = lo + ((max_side - lo) as f32 * u * u).round() as usize;
    // Kvasir aspect ratios range from about 0.56 (1920×1072) to 0.8 (720×576) and 0.68 portrait.
    let aspect = rng.uniform(0.56, 0.9);
    let short = ((long as f32 * aspect).round() as usize)
        .max(332.min(long))
        .min(long);
    if rng.bernoulli(0.12) {
        (long, short) // portrait: (h, w)
    } else {
        (short, long)
    }
}

/// Appearance knobs of [`render_styled`], so that synthetic test sets can differ the way
/// PraNet's five sets do (size, polyp size, visibility, focus). [`Style::default`] is the
/// Kvasir-like look [`render`] draws, bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Style {
    /// Every image `round(max_side · aspect) × max_side` (h × w); `None`: sizes drawn like
    /// Kvasir-SEG's.
    pub aspect: Option<f32>,
    /// Multiplies every polyp radius.
    pub polyp_scale: f32,
    /// Multiplies how far a polyp's colour departs from the mucosa (lower: harder to see).
    pub contrast: f32,
    /// Box-blur passes added to the two every image gets (defocus, motion).
    pub extra_blur: usize,
}

impl Default for Style {
    fn default() -> Self {
        Style {
            aspect: None,
            polyp_scale: 1.0,
            contrast: 1.0,
            extra_blur: 0,
        }
    }
}

/// Render image `index` of the set with `seed`.
pub fn render(seed: u64, index: usize, max_side: usize) -> SynthImage {
    render_styled(seed, index, max_side, &Style::default())
}

/// [`render`] with the look set by `style`.
pub fn render_styled(seed: u64, index: usize, max_side: usize, style: &Style) -> SynthImage {
    let mut rng = Rng::derive(seed, &format!("synth-kvasir/{index}"));
    let (h, w) = match style.aspect {
        None => draw_size(&mut rng, max_side),
        Some(a) => {
            let w = max_side.max(MIN_SIDE);
            (
                ((w as f32 * a).round() as usize).clamp(MIN_SIDE, MAX_SIDE_LIMIT),
                w,
            )
        }
    };
    let m = h.min(w) as f32;
    let tex = Noise::new(&mut rng, 64);
    let folds = Noise::new(&mut rng, 64);
    let fine = Noise::new(&mut rng, 64);

    // Palette: mucosa base colour (orange-pink to red), varied per image.
    let base = [
        rng.uniform(0.82, 0.95),
        rng.uniform(0.38, 0.52),
        rng.uniform(0.30, 0.42),
    ];
    let lumen = (
        rng.uniform(-0.2, 1.2) * w as f32,
        rng.uniform(-0.2, 1.2) * h as f32,
        rng.uniform(0.15, 0.45) * m,
        rng.uniform(0.4, 0.8),
    );
    let fold_freq = rng.uniform(1.5, 3.5);
    let fold_depth = rng.uniform(0.05, 0.15);
    let vignette = rng.uniform(0.35, 0.7);
    let corner_cut = if rng.bernoulli(0.5) {
        Some(rng.uniform(0.08, 0.16) * (h + w) as f32)
    } else {
        None
    };
    let in_corner = |x: f32, y: f32| -> bool {
        match corner_cut {
            Some(c) => {
                let dx = x.min(w as f32 - x);
                let dy = y.min(h as f32 - y);
                dx + dy < c
            }
            None => false,
        }
    };

    // 1. Shading field (brightness) of the mucosa. It is smooth, so it is evaluated on a grid
    //    of STEP pixels and bilinearly upsampled (16× fewer noise evaluations).
    const STEP: usize = 4;
    let (gh, gw) = (h / STEP + 2, w / STEP + 2);
    let mut coarse = vec![0f32; gh * gw];
    let (cxi, cyi) = (w as f32 / 2.0, h as f32 / 2.0);
    let rmax = (cxi * cxi + cyi * cyi).sqrt();
    for gy in 0..gh {
        for gx in 0..gw {
            let (x, y) = ((gx * STEP) as f32, (gy * STEP) as f32);
            let (u, v) = (x / m, y / m);
            let t = tex.fbm(u, v, 2.0, 3);
            // Folds: relief shading of a smooth height field (emboss), plus soft creases.
            let hgt = folds.fbm(u, v, fold_freq, 3);
            let e = 0.01;
            let slope = (folds.fbm(u + e, v + e, fold_freq, 3) - hgt) / e;
            let f = hgt * 2.5;
            let band = (f - f.round()).abs(); // 0 on iso-lines of the height field
            let crease = 1.0 - fold_depth * (1.0 - smoothstep(0.0, 0.3, band));
            let fold = crease * (1.0 + 0.04 * slope.clamp(-4.0, 4.0));
            let (dx, dy) = (x - lumen.0, y - lumen.1);
            let lum = 1.0 - lumen.3 * (-(dx * dx + dy * dy) / (lumen.2 * lumen.2)).exp();
            let (vx, vy) = (x - cxi, y - cyi);
            let rr2 = (vx * vx + vy * vy) / (rmax * rmax);
            let vig = 1.0 - vignette * rr2 * rr2.sqrt().sqrt();
            coarse[gy * gw + gx] = (0.9 + 0.18 * t) * fold * lum * vig;
        }
    }
    let mut shade = vec![0f32; h * w];
    let inv = 1.0 / STEP as f32;
    for y in 0..h {
        let (gy, ty) = (y / STEP, (y % STEP) as f32 * inv);
        for x in 0..w {
            let (gx, tx) = (x / STEP, (x % STEP) as f32 * inv);
            let a = coarse[gy * gw + gx];
            let b = coarse[gy * gw + gx + 1];
            let c = coarse[(gy + 1) * gw + gx];
            let d = coarse[(gy + 1) * gw + gx + 1];
            let top = a + (b - a) * tx;
            let bot = c + (d - c) * tx;
            shade[y * w + x] = top + (bot - top) * ty;
        }
    }

    // 2. Vessels: branching random walks stamped into a strength field.
    let mut vessel = vec![0f32; h * w];
    let n_trees = 3 + rng.below(6);
    for _ in 0..n_trees {
        let mut stack = vec![(
            rng.uniform(0.0, w as f32),
            rng.uniform(0.0, h as f32),
            rng.uniform(0.0, std::f32::consts::TAU),
            rng.uniform(0.8, 2.2) * (m / 500.0).max(0.5),
            0usize,
        )];
        while let Some((mut x, mut y, mut a, width, depth)) = stack.pop() {
            let steps = 20 + rng.below(40);
            let strength = rng.uniform(0.15, 0.5);
            for _ in 0..steps {
                a += rng.uniform(-0.35, 0.35);
                let step = rng.uniform(3.0, 7.0) * (m / 500.0).max(0.5);
                let (nx, ny) = (x + a.cos() * step, y + a.sin() * step);
                stamp_segment(&mut vessel, h, w, (x, y), (nx, ny), width, strength);
                x = nx;
                y = ny;
                if depth < 3 && rng.bernoulli(0.06) {
                    stack.push((x, y, a + rng.uniform(-1.2, 1.2), width * 0.7, depth + 1));
                }
                if x < -20.0 || y < -20.0 || x > w as f32 + 20.0 || y > h as f32 + 20.0 {
                    break;
                }
            }
        }
    }

    // 3. Mucosa colour: darker areas get more saturated (deep red), as in endoscopy.
    let mut rgb = vec![0f32; h * w * 3];
    for i in 0..h * w {
        let s = shade[i].max(0.0);
        let vsl = vessel[i];
        let q = s.sqrt().sqrt();
        let c = [
            // s^0.75, s^1.25, s^1.5 with square roots only.
            base[0] * s.sqrt() * q * (1.0 - 0.25 * vsl),
            base[1] * s * q * (1.0 - 0.55 * vsl),
            base[2] * s * s.sqrt() * (1.0 - 0.45 * vsl),
        ];
        rgb[i * 3..i * 3 + 3].copy_from_slice(&c);
    }

    // 4. Polyps.
    let n_polyps = 1 + usize::from(rng.bernoulli(0.35)) + usize::from(rng.bernoulli(0.15));
    let mut polyps = Vec::new();
    for _ in 0..n_polyps {
        let r = if rng.bernoulli(0.15) {
            rng.uniform(0.25, 0.4)
        } else {
            rng.uniform(0.05, 0.25)
        } * m
            * style.polyp_scale;
        let mut placed = None;
        for _ in 0..20 {
            let (cx, cy) = (
                rng.uniform(0.03, 0.97) * w as f32,
                rng.uniform(0.03, 0.97) * h as f32,
            );
            let clash = polyps.iter().any(|p: &Polyp| {
                let d = ((p.cx - cx).powi(2) + (p.cy - cy).powi(2)).sqrt();
                d < 0.8 * (p.r + r)
            });
            if !in_corner(cx, cy) && !clash {
                placed = Some((cx, cy));
                break;
            }
        }
        let Some((cx, cy)) = placed else { continue };
        let mut harmonics = Vec::new();
        for k in 2..=6 {
            let a = if k == 2 {
                rng.uniform(0.0, 0.22)
            } else {
                rng.uniform(0.0, 0.16) / (k as f32 - 1.5)
            };
            let ph = rng.uniform(0.0, std::f32::consts::TAU);
            harmonics.push((k, a * ph.cos(), a * ph.sin()));
        }
        let la = rng.uniform(0.0, std::f32::consts::TAU);
        polyps.push(Polyp {
            cx,
            cy,
            r,
            harmonics,
            // Same hue family: either paler pink or a more saturated red than the mucosa.
            tint: if rng.bernoulli(0.6) {
                [1.0, rng.uniform(0.58, 0.68), rng.uniform(0.52, 0.62)]
            } else {
                [1.0, rng.uniform(0.36, 0.45), rng.uniform(0.3, 0.38)]
            },
            tint_mix: rng.uniform(0.25, 0.55) * style.contrast,
            bump: rng.uniform(0.06, 0.16),
            light: (la.cos(), la.sin()),
        });
    }
    let mut mask = vec![0u8; h * w];
    let mut boxes = Vec::new();
    for (pi, p) in polyps.iter().enumerate() {
        let rm = p.max_radius() * 1.2 + 2.0;
        let x0 = ((p.cx - rm).floor().max(0.0)) as usize;
        let x1 = ((p.cx + rm).ceil().min(w as f32 - 1.0)).max(0.0) as usize;
        let y0 = ((p.cy - rm).floor().max(0.0)) as usize;
        let y1 = ((p.cy + rm).ceil().min(h as f32 - 1.0)).max(0.0) as usize;
        let mut bb = (usize::MAX, usize::MAX, 0usize, 0usize);
        let spec = (
            p.cx - p.light.0 * 0.35 * p.r,
            p.cy - p.light.1 * 0.35 * p.r,
            (0.06 + 0.05 * (pi as f32 % 2.0)) * p.r,
        );
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let (dx, dy) = (px - p.cx, py - p.cy);
                let d = (dx * dx + dy * dy).sqrt().max(1e-6);
                let rad = p.radius(dx / d, dy / d);
                let t = d / rad;
                let i = y * w + x;
                if t >= 1.0 {
                    // Contact shadow just outside the outline.
                    let side = 0.5 + 0.5 * (dx * p.light.0 + dy * p.light.1) / d;
                    let sh = 1.0 - 0.25 * side * (1.0 - smoothstep(1.0, 1.12, t));
                    if t < 1.15 {
                        rgb[i * 3..i * 3 + 3].iter_mut().for_each(|c| *c *= sh);
                    }
                    // Soften the outline over about one pixel.
                    let edge = 1.0 - smoothstep(0.0, 1.0, d - rad);
                    if edge <= 0.0 {
                        continue;
                    }
                    let pc = polyp_colour(
                        p,
                        &rgb[i * 3..i * 3 + 3],
                        0.0,
                        dx,
                        dy,
                        &fine,
                        px / m,
                        py / m,
                    );
                    for c in 0..3 {
                        rgb[i * 3 + c] += (pc[c] - rgb[i * 3 + c]) * 0.5 * edge;
                    }
                    continue;
                }
                let hgt = (1.0 - t * t).max(0.0).sqrt();
                let mut pc = polyp_colour(
                    p,
                    &rgb[i * 3..i * 3 + 3],
                    hgt,
                    dx,
                    dy,
                    &fine,
                    px / m,
                    py / m,
                );
                let (sx, sy) = (px - spec.0, py - spec.1);
                let sp = (-(sx * sx + sy * sy) / (spec.2 * spec.2)).exp();
                pc.iter_mut().for_each(|c| *c += 0.8 * sp);
                rgb[i * 3..i * 3 + 3].copy_from_slice(&pc);
                if !in_corner(px, py) {
                    mask[i] = 255;
                    bb = (bb.0.min(x), bb.1.min(y), bb.2.max(x), bb.3.max(y));
                }
            }
        }
        if bb.0 != usize::MAX {
            boxes.push(BBox {
                label: "polyp".into(),
                xmin: bb.0 as f32,
                ymin: bb.1 as f32,
                xmax: bb.2 as f32,
                ymax: bb.3 as f32,
            });
        }
    }

    // 5. Specular highlights on the mucosa (small, some elongated).
    let n_spec = 4 + rng.below(20);
    for _ in 0..n_spec {
        let (sx, sy) = (rng.uniform(0.0, w as f32), rng.uniform(0.0, h as f32));
        let (ra, rb) = (
            rng.uniform(1.0, 5.0) * (m / 500.0).max(0.6),
            rng.uniform(0.6, 2.0),
        );
        let ang = rng.uniform(0.0, std::f32::consts::PI);
        let (ca, sa) = (ang.cos(), ang.sin());
        let ext = (ra * rb * 3.0).ceil() as i64;
        for y in (sy as i64 - ext).max(0)..(sy as i64 + ext).min(h as i64) {
            for x in (sx as i64 - ext).max(0)..(sx as i64 + ext).min(w as i64) {
                let (dx, dy) = (x as f32 - sx, y as f32 - sy);
                let (u, v) = ((dx * ca + dy * sa) / (ra * rb), (-dx * sa + dy * ca) / ra);
                let k = (-(u * u + v * v)).exp();
                let i = (y as usize * w + x as usize) * 3;
                rgb[i..i + 3].iter_mut().for_each(|c| *c += 0.9 * k);
            }
        }
    }

    // 6. Blur (two box passes ≈ Gaussian), noise, black corners, quantise.
    let radius = 1 + usize::from(rng.bernoulli(0.4));
    for _ in 0..2 + style.extra_blur {
        box_blur_rgb(&mut rgb, h, w, radius);
    }
    let mut img = RgbImage::new(w as u32, h as u32);
    for (i, px) in img.as_mut().chunks_exact_mut(3).enumerate() {
        let (x, y) = ((i % w) as f32 + 0.5, (i / w) as f32 + 0.5);
        let black = in_corner(x, y);
        for c in 0..3 {
            let v = rgb[i * 3 + c] + (rng.f32() - 0.5) * 0.03;
            px[c] = if black {
                (rng.f32() * 3.0) as u8
            } else {
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            };
        }
    }
    let mask = GrayImage::from_raw(w as u32, h as u32, mask)
        .unwrap_or_else(|| GrayImage::new(w as u32, h as u32));
    SynthImage {
        id: synth_id(index),
        image: img,
        mask,
        boxes,
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn polyp_colour(
    p: &Polyp,
    under: &[f32],
    hgt: f32,
    dx: f32,
    dy: f32,
    fine: &Noise,
    u: f32,
    v: f32,
) -> [f32; 3] {
    // Dome shading: brighter towards the top, lit from `light`, bumpy texture.
    let tilt = -(dx * p.light.0 + dy * p.light.1) / p.r;
    let bump = fine.fbm(u, v, 24.0, 2);
    let s = (0.8 + 0.4 * hgt + 0.15 * tilt * hgt + p.bump * bump).max(0.0);
    let mut c = [0f32; 3];
    for k in 0..3 {
        let mixed = under[k] + (p.tint[k] * under[0].max(0.25) - under[k]) * p.tint_mix;
        c[k] = mixed * s;
    }
    c
}

fn stamp_segment(
    field: &mut [f32],
    h: usize,
    w: usize,
    a: (f32, f32),
    b: (f32, f32),
    width: f32,
    strength: f32,
) {
    let ext = width + 1.5;
    let x0 = (a.0.min(b.0) - ext).floor().max(0.0) as usize;
    let y0 = (a.1.min(b.1) - ext).floor().max(0.0) as usize;
    let x1 = ((a.0.max(b.0) + ext).ceil() as i64).min(w as i64 - 1);
    let y1 = ((a.1.max(b.1) + ext).ceil() as i64).min(h as i64 - 1);
    if x1 < 0 || y1 < 0 {
        return;
    }
    let (ex, ey) = (b.0 - a.0, b.1 - a.1);
    let len2 = (ex * ex + ey * ey).max(1e-6);
    for y in y0..=y1 as usize {
        for x in x0..=x1 as usize {
            let (px, py) = (x as f32 + 0.5 - a.0, y as f32 + 0.5 - a.1);
            let t = ((px * ex + py * ey) / len2).clamp(0.0, 1.0);
            let (qx, qy) = (px - t * ex, py - t * ey);
            let d = (qx * qx + qy * qy).sqrt();
            let v = strength * (1.0 - smoothstep(width * 0.5, width * 0.5 + 1.0, d));
            let f = &mut field[y * w + x];
            *f = f.max(v);
        }
    }
}

fn box_blur_rgb(x: &mut [f32], h: usize, w: usize, r: usize) {
    let mut tmp = vec![0f32; x.len()];
    let norm = 1.0 / (2 * r + 1) as f32;
    // Horizontal (clamped edges).
    for y in 0..h {
        for c in 0..3 {
            let at = |xx: i64| x[(y * w + xx.clamp(0, w as i64 - 1) as usize) * 3 + c];
            let mut acc: f32 = (-(r as i64)..=r as i64).map(at).sum();
            for xx in 0..w {
                tmp[(y * w + xx) * 3 + c] = acc * norm;
                acc += at(xx as i64 + r as i64 + 1) - at(xx as i64 - r as i64);
            }
        }
    }
    // Vertical.
    for xx in 0..w {
        for c in 0..3 {
            let at = |y: i64| tmp[(y.clamp(0, h as i64 - 1) as usize * w + xx) * 3 + c];
            let mut acc: f32 = (-(r as i64)..=r as i64).map(at).sum();
            for y in 0..h {
                x[(y * w + xx) * 3 + c] = acc * norm;
                acc += at(y as i64 + r as i64 + 1) - at(y as i64 - r as i64);
            }
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthSummary {
    pub count: usize,
    pub polyps: usize,
    pub min_size: (usize, usize),
    pub max_size: (usize, usize),
    pub mean_polyp_fraction: f64,
}

/// Largest accepted `max_side` (Kvasir's largest side is 1920).
pub const MAX_SIDE_LIMIT: usize = 8192;
/// Smallest accepted `max_side`.
pub const MIN_SIDE: usize = 16;
/// Largest accepted `count` (Kvasir-SEG has 1000 images).
pub const MAX_COUNT: usize = 1_000_000;
/// Bytes of working memory per pixel while one image renders (f32 RGB planes, blur buffer,
/// noise, mask and the encoded output), measured loosely from `render`.
const RENDER_BYTES_PER_PIXEL: u64 = 48;

impl SynthKvasirConfig {
    /// Check the settings; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_COUNT).contains(&self.count) {
            return Err(Error::Config {
                field: "count".into(),
                msg: format!("{} is outside 1..={MAX_COUNT}", self.count),
            });
        }
        if !(MIN_SIDE..=MAX_SIDE_LIMIT).contains(&self.max_side) {
            return Err(Error::Config {
                field: "max_side".into(),
                msg: format!(
                    "{} is outside {MIN_SIDE}..={MAX_SIDE_LIMIT} (Kvasir's largest side is 1920)",
                    self.max_side
                ),
            });
        }
        Ok(())
    }

    /// Memory the parallel renderers need at most: one `max_side²` image per worker thread.
    pub fn estimate_bytes(&self) -> u64 {
        let side = self.max_side as u64;
        let workers = rayon::current_num_threads().max(1) as u64;
        side.saturating_mul(side)
            .saturating_mul(RENDER_BYTES_PER_PIXEL)
            .saturating_mul(workers)
    }
}

/// Make ready to build a data set at `out` with [`crate::util::fs::atomic_dir`]: a missing
/// folder is fine, an empty one is removed (it is re-created complete), one that holds
/// anything is refused — an existing set is never overwritten or completed in place.
pub(crate) fn prepare_dest(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_some() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists and is not empty; a data set is never overwritten: remove it \
                 or choose another folder",
            ),
        ));
    }
    std::fs::remove_dir(out).map_err(|e| Error::io(out, e))
}

/// Write `cfg.count` images into `out/images`, `out/masks` and `out/kavsir_bboxes.json`.
/// The set is generated in a temporary folder beside `out` and renamed to `out` only when
/// complete, so an interrupted run leaves no partial set; `out` must not exist or be empty.
pub fn generate(out: &Path, cfg: &SynthKvasirConfig) -> Result<SynthSummary> {
    cfg.validate()?;
    crate::util::mem::check_fits(
        &format!(
            "synthetic Kvasir rendering at max_side {} ({} threads)",
            cfg.max_side,
            rayon::current_num_threads()
        ),
        cfg.estimate_bytes(),
    )?;
    prepare_dest(out)?;
    crate::util::fs::atomic_dir(out, |tmp| fill(tmp, cfg))
}

fn fill(out: &Path, cfg: &SynthKvasirConfig) -> Result<SynthSummary> {
    let (img_dir, mask_dir) = (out.join("images"), out.join("masks"));
    for d in [&img_dir, &mask_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let q = cfg.jpeg_quality.clamp(1, 100);
    let stats: Vec<(String, BBoxEntry, f64)> = (0..cfg.count)
        .into_par_iter()
        .map(|i| {
            let s = render(cfg.seed, i, cfg.max_side);
            imgio::write_jpeg_rgb(&img_dir.join(format!("{}.jpg", s.id)), &s.image, q)?;
            imgio::write_jpeg_luma(&mask_dir.join(format!("{}.jpg", s.id)), &s.mask, 100)?;
            let frac = s.mask.as_raw().iter().filter(|&&v| v > 0).count() as f64
                / s.mask.as_raw().len() as f64;
            let entry = BBoxEntry {
                height: s.image.height() as usize,
                width: s.image.width() as usize,
                bbox: s.boxes,
            };
            Ok((s.id, entry, frac))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut json = BTreeMap::new();
    let mut summary = SynthSummary {
        count: stats.len(),
        polyps: 0,
        min_size: (usize::MAX, usize::MAX),
        max_size: (0, 0),
        mean_polyp_fraction: 0.0,
    };
    for (id, e, frac) in stats {
        summary.polyps += e.bbox.len();
        summary.min_size = (
            summary.min_size.0.min(e.height),
            summary.min_size.1.min(e.width),
        );
        summary.max_size = (
            summary.max_size.0.max(e.height),
            summary.max_size.1.max(e.width),
        );
        summary.mean_polyp_fraction += frac / cfg.count as f64;
        json.insert(id, e);
    }
    crate::util::fs::write_json_atomic(&out.join(BBOX_FILE), &json)?;
    Ok(summary)
}

/// A contact sheet of `n` images: each row shows the image, the image with the mask outlined
/// in green, and the mask; rows are `row_h` pixels high.
pub fn contact_sheet(seed: u64, n: usize, max_side: usize, row_h: u32) -> RgbImage {
    let samples: Vec<SynthImage> = (0..n)
        .into_par_iter()
        .map(|i| render(seed, i, max_side))
        .collect();
    let tiles: Vec<[RgbImage; 3]> = samples
        .iter()
        .map(|s| {
            let tw = ((s.image.width() as f32 / s.image.height() as f32) * row_h as f32) as u32;
            let ft = image::imageops::FilterType::Triangle;
            let img = image::imageops::resize(&s.image, tw, row_h, ft);
            let m =
                image::imageops::resize(&s.mask, tw, row_h, image::imageops::FilterType::Nearest);
            let mut over = img.clone();
            for y in 0..row_h {
                for x in 0..tw {
                    let inside = m.get_pixel(x, y)[0] > 127;
                    let edge = inside
                        && [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)]
                            .iter()
                            .any(|(dx, dy)| {
                                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                                nx < 0
                                    || ny < 0
                                    || nx >= tw as i64
                                    || ny >= row_h as i64
                                    || m.get_pixel(nx as u32, ny as u32)[0] <= 127
                            });
                    if edge {
                        over.put_pixel(x, y, image::Rgb([0, 255, 0]));
                    }
                }
            }
            let mrgb = image::DynamicImage::ImageLuma8(m).to_rgb8();
            [img, over, mrgb]
        })
        .collect();
    let width = tiles
        .iter()
        .map(|t| t.iter().map(|x| x.width() + 4).sum::<u32>())
        .max()
        .unwrap_or(1);
    let mut sheet = RgbImage::from_pixel(
        width,
        (row_h + 4) * n.max(1) as u32,
        image::Rgb([40, 40, 40]),
    );
    for (r, t) in tiles.iter().enumerate() {
        let mut x = 0;
        for tile in t {
            image::imageops::replace(&mut sheet, tile, x as i64, (r as u32 * (row_h + 4)) as i64);
            x += tile.width() + 4;
        }
    }
    sheet
}

/// Write [`contact_sheet`] as a PNG.
pub fn write_preview(path: &Path, seed: u64, n: usize, max_side: usize) -> Result<()> {
    SynthKvasirConfig {
        count: n.max(1),
        seed,
        max_side,
        ..Default::default()
    }
    .validate()?;
    imgio::write_png(path, &contact_sheet(seed, n, max_side, 180))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_deterministic_and_has_polyps_matching_boxes() {
        for i in 0..4 {
            let a = render(3, i, 200);
            let b = render(3, i, 200);
            assert_eq!(a.image, b.image);
            assert_eq!(a.mask, b.mask);
            assert!(!a.boxes.is_empty(), "image {i} has no polyp");
            let w = a.mask.width();
            for (j, &v) in a.mask.as_raw().iter().enumerate() {
                if v > 0 {
                    let (x, y) = ((j as u32 % w) as f32, (j as u32 / w) as f32);
                    assert!(a
                        .boxes
                        .iter()
                        .any(|bb| x >= bb.xmin && x <= bb.xmax && y >= bb.ymin && y <= bb.ymax));
                }
            }
        }
        assert_ne!(render(3, 0, 200).image, render(4, 0, 200).image);
    }
}
