//! Synthetic classification sets for pretraining and transfer experiments, written as
//! VTAB-1k or ImageFolder layouts (PNG images, 32–64 px).
//!
//! - `upstream` (for pretraining): class = shape × colour (a solid-coloured shape on a noisy
//!   background).
//! - `downstream` (for fine-tuning): class = texture × shape; the colours are random nuisances.
//!   The classes differ from upstream's, but shape features learned upstream help, so transfer
//!   is real and measurable.
//!
//! Deterministic: image `i` of split `sp` uses `Rng::derive(seed, "synth-cls/kind/sp/i")`.

use super::imgio;
use crate::error::{Error, Result};
use crate::util::Rng;
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Shapes shared by both kinds.
pub const SHAPES: [&str; 7] = [
    "circle", "square", "triangle", "cross", "ring", "diamond", "bar",
];
/// Upstream colours (name, RGB).
pub const COLOURS: [(&str, [f32; 3]); 8] = [
    ("red", [0.9, 0.15, 0.1]),
    ("green", [0.15, 0.8, 0.2]),
    ("blue", [0.15, 0.3, 0.95]),
    ("yellow", [0.95, 0.9, 0.15]),
    ("cyan", [0.1, 0.85, 0.9]),
    ("magenta", [0.9, 0.15, 0.85]),
    ("white", [0.95, 0.95, 0.95]),
    ("orange", [0.95, 0.55, 0.1]),
];
/// Downstream textures.
pub const TEXTURES: [&str; 6] = [
    "hstripes", "vstripes", "checker", "dots", "diagonal", "speckle",
];

/// Which family of classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthKind {
    Upstream,
    Downstream,
}

impl std::str::FromStr for SynthKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "upstream" => Ok(SynthKind::Upstream),
            "downstream" => Ok(SynthKind::Downstream),
            _ => Err(Error::Config {
                field: "kind".into(),
                msg: format!("unknown kind `{s}` (upstream or downstream)"),
            }),
        }
    }
}

/// Output layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthLayout {
    /// `images/*.png` + `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`.
    Vtab,
    /// `{train,val,test}/<class>/*.png`.
    ImageFolder,
}

impl std::str::FromStr for SynthLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "vtab" => Ok(SynthLayout::Vtab),
            "imagefolder" => Ok(SynthLayout::ImageFolder),
            _ => Err(Error::Config {
                field: "layout".into(),
                msg: format!("unknown layout `{s}` (vtab or imagefolder)"),
            }),
        }
    }
}

/// Generator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthClsConfig {
    pub classes: usize,
    /// Train+val images per class (split 80/20).
    pub per_class: usize,
    pub test_per_class: usize,
    pub layout: SynthLayout,
    pub kind: SynthKind,
    /// Image side in pixels.
    pub size: usize,
    pub seed: u64,
}

/// Largest class count of a kind.
pub fn max_classes(kind: SynthKind) -> usize {
    match kind {
        SynthKind::Upstream => SHAPES.len() * COLOURS.len(),
        SynthKind::Downstream => SHAPES.len() * TEXTURES.len(),
    }
}

/// `(shape, colour-or-texture)` indices of class `c` of `n`: the classes form a near-square
/// grid (`a` shapes × `b` colours/textures, `a·b ≥ n`), so even a few classes need both
/// factors to be told apart.
pub fn class_parts(kind: SynthKind, c: usize, n: usize) -> (usize, usize) {
    let second = match kind {
        SynthKind::Upstream => COLOURS.len(),
        SynthKind::Downstream => TEXTURES.len(),
    };
    let mut a = ((n as f64).sqrt().ceil() as usize).clamp(1, SHAPES.len());
    while n.div_ceil(a) > second && a < SHAPES.len() {
        a += 1;
    }
    (c % a, (c / a) % second)
}

/// Names of the first `n` classes of a kind, e.g. `red_circle` or `checker_circle`.
pub fn class_names(kind: SynthKind, n: usize) -> Vec<String> {
    (0..n)
        .map(|c| {
            let (s, k) = class_parts(kind, c, n);
            match kind {
                SynthKind::Upstream => format!("{}_{}", COLOURS[k % COLOURS.len()].0, SHAPES[s]),
                SynthKind::Downstream => {
                    format!("{}_{}", TEXTURES[k % TEXTURES.len()], SHAPES[s])
                }
            }
        })
        .collect()
}

fn inside(shape: usize, u: f32, v: f32) -> bool {
    match shape {
        0 => u * u + v * v < 1.0,
        1 => u.abs().max(v.abs()) < 0.8,
        2 => v < 0.7 && u.abs() < (v + 0.9) * 0.6,
        3 => (u.abs() < 0.3 && v.abs() < 0.9) || (v.abs() < 0.3 && u.abs() < 0.9),
        4 => {
            let r = u * u + v * v;
            (0.36..1.0).contains(&r)
        }
        5 => u.abs() + v.abs() < 1.0,
        _ => u.abs() < 0.95 && v.abs() < 0.35,
    }
}

fn texture(t: usize, x: f32, y: f32, period: f32, rng: &mut Rng) -> bool {
    let p = period;
    match t {
        0 => (y / p).floor() as i64 % 2 == 0,
        1 => (x / p).floor() as i64 % 2 == 0,
        2 => ((x / p).floor() as i64 + (y / p).floor() as i64) % 2 == 0,
        3 => {
            let (fx, fy) = (x.rem_euclid(p) - p / 2.0, y.rem_euclid(p) - p / 2.0);
            fx * fx + fy * fy < (p * 0.35) * (p * 0.35)
        }
        4 => ((x + y) / p).floor() as i64 % 2 == 0,
        _ => rng.bernoulli(0.5),
    }
}

fn rand_colour(rng: &mut Rng) -> [f32; 3] {
    [rng.f32(), rng.f32(), rng.f32()]
}

/// Render one `size × size` image of class `class` (of `n_classes`).
pub fn render(
    kind: SynthKind,
    class: usize,
    n_classes: usize,
    size: usize,
    rng: &mut Rng,
) -> RgbImage {
    let (shape, k) = class_parts(kind, class, n_classes);
    let s = size as f32;
    let bg = rand_colour(rng).map(|v| 0.1 + 0.35 * v);
    let scale = rng.uniform(0.28, 0.42) * s;
    let (cx, cy) = (rng.uniform(0.4, 0.6) * s, rng.uniform(0.4, 0.6) * s);
    let ang = rng.uniform(-0.5, 0.5);
    let (ca, sa) = (ang.cos(), ang.sin());
    let (fg_a, fg_b) = match kind {
        SynthKind::Upstream => {
            let c = COLOURS[k % COLOURS.len()].1;
            let b = rng.uniform(0.8, 1.1);
            (c.map(|v| (v * b).min(1.0)), c.map(|v| (v * b).min(1.0)))
        }
        SynthKind::Downstream => {
            let a = rand_colour(rng).map(|v| 0.55 + 0.45 * v);
            let b = rand_colour(rng).map(|v| 0.3 * v);
            (a, b)
        }
    };
    let period = rng.uniform(0.08, 0.13) * s;
    let (px, py) = (rng.uniform(0.0, period), rng.uniform(0.0, period));
    let mut img = RgbImage::new(size as u32, size as u32);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let (dx, dy) = ((fx - cx) / scale, (fy - cy) / scale);
            let (u, v) = (dx * ca + dy * sa, -dx * sa + dy * ca);
            let noise = (rng.f32() - 0.5) * 0.12;
            let c = if inside(shape, u, v) {
                match kind {
                    SynthKind::Upstream => fg_a,
                    SynthKind::Downstream => {
                        if texture(k % TEXTURES.len(), fx + px, fy + py, period, rng) {
                            fg_a
                        } else {
                            fg_b
                        }
                    }
                }
            } else {
                bg
            };
            let p = c.map(|v| ((v + noise).clamp(0.0, 1.0) * 255.0).round() as u8);
            img.put_pixel(x as u32, y as u32, image::Rgb(p));
        }
    }
    img
}

/// Write the set (with its settings in [`SETTINGS_FILE`]); returns the number of images
/// written. The set is generated in a temporary folder beside `out` and renamed to `out`
/// only when complete, so an interrupted run leaves no partial set; `out` must not exist or
/// be empty.
pub fn generate(out: &Path, cfg: &SynthClsConfig) -> Result<usize> {
    let max = max_classes(cfg.kind);
    if cfg.classes == 0 || cfg.classes > max {
        return Err(Error::Config {
            field: "classes".into(),
            msg: format!(
                "{} classes requested; {:?} supports 1..={max}",
                cfg.classes, cfg.kind
            ),
        });
    }
    if cfg.per_class < 2 || cfg.test_per_class == 0 || !(8..=512).contains(&cfg.size) {
        return Err(Error::Config {
            field: "per_class/size".into(),
            msg: "need per_class ≥ 2, test_per_class ≥ 1 and 8 ≤ size ≤ 512".into(),
        });
    }
    if cfg.per_class > MAX_PER_CLASS || cfg.test_per_class > MAX_PER_CLASS {
        return Err(Error::Config {
            field: "per_class".into(),
            msg: format!(
                "{} train+val and {} test images per class; at most {MAX_PER_CLASS} each",
                cfg.per_class, cfg.test_per_class
            ),
        });
    }
    super::synth_kvasir::prepare_dest(out)?;
    crate::util::fs::atomic_dir(out, |tmp| fill(tmp, cfg))
}

/// Largest accepted `per_class` / `test_per_class`.
pub const MAX_PER_CLASS: usize = 100_000;

/// Name of the settings file written into every set (the trainers' re-use marker).
pub use super::synth::SETTINGS_FILE;

/// The set at `dir` made with `cfg`: reused when its settings match, refused when they differ,
/// else generated ([`super::synth::ensure`]).
pub fn ensure(
    dir: &Path,
    cfg: &SynthClsConfig,
    what: &str,
    obs: &mut dyn crate::progress::Observer,
) -> Result<super::synth::Made> {
    super::synth::ensure(dir, cfg, what, false, |_| false, |d| generate(d, cfg), obs)
}

fn fill(out: &Path, cfg: &SynthClsConfig) -> Result<usize> {
    let names = class_names(cfg.kind, cfg.classes);
    let n_val = (cfg.per_class / 5).max(1);
    // (split, class, index within split)
    let mut jobs = Vec::new();
    for c in 0..cfg.classes {
        for j in 0..cfg.per_class {
            jobs.push((
                if j < cfg.per_class - n_val {
                    "train"
                } else {
                    "val"
                },
                c,
            ));
        }
        for _ in 0..cfg.test_per_class {
            jobs.push(("test", c));
        }
    }
    let kind_s = match cfg.kind {
        SynthKind::Upstream => "upstream",
        SynthKind::Downstream => "downstream",
    };
    let rels: Vec<(String, &str, usize)> = jobs
        .par_iter()
        .enumerate()
        .map(|(i, &(sp, c))| {
            let mut rng = Rng::derive(cfg.seed, &format!("synth-cls/{kind_s}/{sp}/{i}"));
            let img = render(cfg.kind, c, cfg.classes, cfg.size, &mut rng);
            let rel = match cfg.layout {
                SynthLayout::Vtab => format!("images/{sp}/{i:06}.png"),
                SynthLayout::ImageFolder => format!("{sp}/{}/{i:06}.png", names[c]),
            };
            imgio::write_png(&out.join(&rel), &img)?;
            Ok((rel, sp, c))
        })
        .collect::<Result<Vec<_>>>()?;
    let write_list = |name: &str, splits: &[&str]| -> Result<()> {
        let mut s = String::new();
        for (rel, sp, c) in &rels {
            if splits.contains(sp) {
                s.push_str(&format!("{rel} {c}\n"));
            }
        }
        crate::util::fs::write_atomic(&out.join(name), s.as_bytes())
    };
    match cfg.layout {
        SynthLayout::Vtab => {
            write_list("train800.txt", &["train"])?;
            write_list("val200.txt", &["val"])?;
            write_list("train800val200.txt", &["train", "val"])?;
            write_list("test.txt", &["test"])?;
            let mut s = names.join("\n");
            s.push('\n');
            crate::util::fs::write_atomic(&out.join("class_names.txt"), s.as_bytes())?;
        }
        SynthLayout::ImageFolder => {}
    }
    crate::util::fs::write_json_atomic(&out.join(SETTINGS_FILE), cfg)?;
    Ok(rels.len())
}
