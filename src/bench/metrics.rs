//! `gps-seg bench metrics`: time to score one image with the field's metrics
//! ([`crate::metrics::score_8bit`] / [`crate::metrics::score_probs`]) at a given size, with and
//! without HD95, on seeded synthetic pairs (an elliptical object and a noisy, shifted,
//! probability map of it). One thread: the metrics of one image run sequentially.

use crate::error::{Error, Result};
use crate::metrics::{probs_to_8bit, score_8bit, score_probs, FieldOptions, MapScale};
use crate::util::Rng;
use std::time::Instant;

/// Largest side accepted (the pairs are `side²` f32 + bytes, scored in f64).
pub const MAX_SIDE: usize = 8192;
/// Most images per row.
pub const MAX_IMAGES: usize = 10_000;

#[derive(Debug, Clone)]
pub struct MetricsBenchConfig {
    pub side: usize,
    pub images: usize,
    pub seed: u64,
}

/// One configuration's timings.
#[derive(Debug, Clone)]
pub struct MetricsBenchRow {
    pub name: &'static str,
    pub images: usize,
    /// Median and slowest milliseconds per image.
    pub median_ms: f64,
    pub max_ms: f64,
}

/// A seeded pair: ground truth (0/1) and a probability map, `side × side`.
pub fn synthetic_pair(rng: &mut Rng, side: usize) -> (Vec<u8>, Vec<f32>) {
    let s = side as f32;
    let (cy, cx) = (rng.uniform(0.3, 0.7) * s, rng.uniform(0.3, 0.7) * s);
    let (ry, rx) = (rng.uniform(0.1, 0.3) * s, rng.uniform(0.1, 0.3) * s);
    let (oy, ox) = (rng.uniform(-0.05, 0.05) * s, rng.uniform(-0.05, 0.05) * s);
    let mut gt = vec![0u8; side * side];
    let mut prob = vec![0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            let (fy, fx) = (y as f32 + 0.5, x as f32 + 0.5);
            let r = ((fy - cy) / ry).powi(2) + ((fx - cx) / rx).powi(2);
            gt[y * side + x] = u8::from(r <= 1.0);
            let rp = ((fy - cy - oy) / ry).powi(2) + ((fx - cx - ox) / rx).powi(2);
            let base = 1.0 / (1.0 + (6.0 * (rp - 1.0)).exp());
            prob[y * side + x] = (base + (rng.f32() - 0.5) * 0.2).clamp(0.0, 1.0);
        }
    }
    (gt, prob)
}

/// Score `cfg.images` pairs in each configuration.
pub fn run(cfg: &MetricsBenchConfig) -> Result<Vec<MetricsBenchRow>> {
    if !(2..=MAX_SIDE).contains(&cfg.side) || !(1..=MAX_IMAGES).contains(&cfg.images) {
        return Err(Error::Config {
            field: "side / images".into(),
            msg: format!(
                "--size must be in 2..={MAX_SIDE} and --images in 1..={MAX_IMAGES} (got {} and {})",
                cfg.side, cfg.images
            ),
        });
    }
    let n = cfg.side * cfg.side;
    crate::util::mem::check_fits(
        &format!("bench metrics at {0}×{0}", cfg.side),
        (n as u64).saturating_mul(110),
    )?;
    let hw = (cfg.side, cfg.side);
    let mut rng = Rng::derive(cfg.seed, "bench-metrics");
    let mut times: [Vec<f64>; 3] = Default::default();
    let plain = FieldOptions {
        scale: MapScale::AsSaved,
        hd95: false,
    };
    let with_hd = FieldOptions {
        hd95: true,
        ..plain
    };
    for i in 0..=cfg.images {
        let (gt, prob) = synthetic_pair(&mut rng, cfg.side);
        let map = probs_to_8bit(&prob);
        let mut timed = |k: usize, f: &dyn Fn() -> Result<()>| -> Result<()> {
            let t = Instant::now();
            f()?;
            // Image 0 warms up (page faults of the first allocations).
            if i > 0 {
                times[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(())
        };
        timed(0, &|| score_8bit(&map, &gt, hw, &plain).map(drop))?;
        timed(1, &|| score_8bit(&map, &gt, hw, &with_hd).map(drop))?;
        timed(2, &|| score_probs(&prob, &gt, hw, &plain).map(drop))?;
    }
    let names = [
        "8-bit map (all metrics but HD95)",
        "8-bit map, with HD95",
        "f32 probabilities (all metrics but HD95)",
    ];
    Ok(names
        .iter()
        .zip(times.iter_mut())
        .map(|(&name, t)| {
            t.sort_by(f64::total_cmp);
            MetricsBenchRow {
                name,
                images: t.len(),
                median_ms: t[t.len() / 2],
                max_ms: t[t.len() - 1],
            }
        })
        .collect())
}
