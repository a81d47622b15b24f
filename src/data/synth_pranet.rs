//! A synthetic set in PraNet's layout ([`super::pranet`]): `TrainDataset/{image,mask}` and the
//! five `TestDataset/<Set>/{images,masks}` folders, PNG images and 0/255 PNG masks, rendered by
//! [`super::synth_kvasir::render_styled`]. Each set has its own generator seed and look, so the
//! sets differ measurably, roughly as the real ones do:
//!
//! | set | size (h × w at `max_side` = w) | polyps | look |
//! |---|---|---|---|
//! | Kvasir | drawn like Kvasir-SEG | as Kvasir | as Kvasir |
//! | CVC-ClinicDB | 3:4 (288 × 384) | as Kvasir | slightly less contrast |
//! | CVC-ColonDB | 500 × 574 | as Kvasir | low contrast, defocused |
//! | ETIS-LaribPolypDB | 966 × 1225 | small (½ radius) | low contrast |
//! | CVC-300 | 500 × 574 | larger (1.2 × radius) | as Kvasir |
//!
//! `TrainDataset` mixes the Kvasir and CVC-ClinicDB looks 5:3 (PraNet's 900 + 550). The set is
//! built in a temporary folder beside `out` and renamed into place only when complete.
//! Deterministic: set `s`, image `i` renders from `Rng::derive(seed, "synth-pranet/<s>")`.

use super::imgio;
use super::pranet::{TEST_DIR, TEST_SETS, TRAIN_DIR};
use super::synth_kvasir::{
    prepare_dest, render_styled, synth_id, Style, MAX_COUNT, MAX_SIDE_LIMIT, MIN_SIDE,
};
use crate::error::{Error, Result};
use crate::util::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Generator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthPranetConfig {
    /// Images in `TrainDataset` (at least 2, so validation can be carved from it).
    pub train: usize,
    /// Images in each test set.
    pub test: usize,
    pub seed: u64,
    /// Image width (the longest side of the fixed-size sets; Kvasir's sizes are drawn up to it).
    pub max_side: usize,
}

impl Default for SynthPranetConfig {
    fn default() -> Self {
        SynthPranetConfig {
            train: 80,
            test: 16,
            seed: 0,
            max_side: 352,
        }
    }
}

/// The look of test set `name` (one of [`TEST_SETS`]).
pub fn style_of(name: &str) -> Style {
    let base = Style::default();
    match name {
        "CVC-ClinicDB" => Style {
            aspect: Some(288.0 / 384.0),
            contrast: 0.85,
            ..base
        },
        "CVC-ColonDB" => Style {
            aspect: Some(500.0 / 574.0),
            contrast: 0.6,
            extra_blur: 2,
            ..base
        },
        "ETIS-LaribPolypDB" => Style {
            aspect: Some(966.0 / 1225.0),
            polyp_scale: 0.5,
            contrast: 0.7,
            ..base
        },
        "CVC-300" => Style {
            aspect: Some(500.0 / 574.0),
            polyp_scale: 1.2,
            ..base
        },
        _ => base,
    }
}

/// What one folder of the generated set holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetSummary {
    pub name: String,
    pub count: usize,
    /// Smallest and largest `(h, w)`.
    pub min_size: (usize, usize),
    pub max_size: (usize, usize),
    /// Mean over images of the polyp share of the pixels.
    pub mean_polyp_fraction: f64,
}

/// Bytes of working memory per pixel while one image renders (as synth_kvasir's estimate).
const RENDER_BYTES_PER_PIXEL: u64 = 48;

impl SynthPranetConfig {
    /// Check the settings; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_COUNT).contains(&self.train) {
            return Err(Error::Config {
                field: "train".into(),
                msg: format!(
                    "{} is outside 2..={MAX_COUNT} (validation is carved from it)",
                    self.train
                ),
            });
        }
        if !(1..=MAX_COUNT).contains(&self.test) {
            return Err(Error::Config {
                field: "test".into(),
                msg: format!("{} is outside 1..={MAX_COUNT}", self.test),
            });
        }
        if !(MIN_SIDE..=MAX_SIDE_LIMIT).contains(&self.max_side) {
            return Err(Error::Config {
                field: "max_side".into(),
                msg: format!("{} is outside {MIN_SIDE}..={MAX_SIDE_LIMIT}", self.max_side),
            });
        }
        Ok(())
    }
}

/// The render seed of set `name`.
fn set_seed(seed: u64, name: &str) -> u64 {
    Rng::derive(seed, &format!("synth-pranet/{name}")).next_u64()
}

/// Render `looks.len()` images (image `i` with `looks[i]`) into `dir/<images>` and
/// `dir/<masks>` as PNG.
fn write_set(
    name: &str,
    dir: &Path,
    (img_sub, mask_sub): (&str, &str),
    seed: u64,
    max_side: usize,
    looks: &[Style],
) -> Result<SetSummary> {
    let (img_dir, mask_dir) = (dir.join(img_sub), dir.join(mask_sub));
    for d in [&img_dir, &mask_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let stats: Vec<((usize, usize), f64)> = looks
        .par_iter()
        .enumerate()
        .map(|(i, style)| {
            let s = render_styled(seed, i, max_side, style);
            let file = format!("{}.png", synth_id(i));
            imgio::write_png(&img_dir.join(&file), &s.image)?;
            imgio::write_png(&mask_dir.join(&file), &s.mask)?;
            let frac = s.mask.as_raw().iter().filter(|&&v| v > 0).count() as f64
                / s.mask.as_raw().len() as f64;
            Ok(((s.image.height() as usize, s.image.width() as usize), frac))
        })
        .collect::<Result<Vec<_>>>()?;
    let n = stats.len();
    Ok(SetSummary {
        name: name.to_string(),
        count: n,
        min_size: stats.iter().fold((usize::MAX, usize::MAX), |a, (s, _)| {
            (a.0.min(s.0), a.1.min(s.1))
        }),
        max_size: stats
            .iter()
            .fold((0, 0), |a, (s, _)| (a.0.max(s.0), a.1.max(s.1))),
        mean_polyp_fraction: stats.iter().map(|(_, f)| f).sum::<f64>() / n.max(1) as f64,
    })
}

/// Write the set into `out` (which must not exist or be empty): `TrainDataset` first, then
/// the test sets in [`TEST_SETS`] order. Appears whole or not at all.
pub fn generate(out: &Path, cfg: &SynthPranetConfig) -> Result<Vec<SetSummary>> {
    cfg.validate()?;
    let side = cfg.max_side as u64;
    let workers = rayon::current_num_threads().max(1) as u64;
    crate::util::mem::check_fits(
        &format!(
            "synthetic PraNet rendering at max_side {} ({workers} threads)",
            cfg.max_side
        ),
        side.saturating_mul(side)
            .saturating_mul(RENDER_BYTES_PER_PIXEL)
            .saturating_mul(workers),
    )?;
    prepare_dest(out)?;
    crate::util::fs::atomic_dir(out, |tmp| {
        let mut sums = Vec::with_capacity(1 + TEST_SETS.len());
        let (kvasir, clinic) = (style_of("Kvasir"), style_of("CVC-ClinicDB"));
        let train_looks: Vec<Style> = (0..cfg.train)
            .map(|i| if i % 8 < 5 { kvasir } else { clinic })
            .collect();
        sums.push(write_set(
            TRAIN_DIR,
            &tmp.join(TRAIN_DIR),
            ("image", "mask"),
            set_seed(cfg.seed, TRAIN_DIR),
            cfg.max_side,
            &train_looks,
        )?);
        for name in TEST_SETS {
            let looks = vec![style_of(name); cfg.test];
            sums.push(write_set(
                name,
                &tmp.join(TEST_DIR).join(name),
                ("images", "masks"),
                set_seed(cfg.seed, name),
                cfg.max_side,
                &looks,
            )?);
        }
        Ok(sums)
    })
}
