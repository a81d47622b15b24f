//! `gps-seg bench export`: the same prompt-free SAM exported in f32, int8 (`--quantize int8`)
//! and fp16 (`--precision fp16`), measured side by side in one run with ONNX Runtime: file
//! size, milliseconds per batch (median over interleaved rounds, so drift hits every precision
//! alike), the ratio to f32, the largest logit change against f32, and, given a Kvasir-shaped
//! folder, the mDice of each on it.

use crate::error::{Error, Result};
use crate::infer::engine::{Engine, OrtEngine};
use crate::infer::{input, InferOptions};
use crate::onnx::quantize::{quantize_int8, to_fp16};
use crate::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use crate::progress::{Observer, Silent};
use crate::sam::SamConfig;
use crate::util::Rng;
use std::path::PathBuf;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct PrecisionBenchConfig {
    pub sam: SamConfig,
    /// Trained weights (`None`: seeded random weights).
    pub checkpoint: Option<PathBuf>,
    /// A Kvasir-shaped folder (`images/`, `masks/`) to score each precision on.
    pub data: Option<PathBuf>,
    /// Or checked inputs to score on (e.g. a training run's test split); wins over `data`.
    pub inputs: Option<input::Inputs>,
    pub batches: Vec<usize>,
    /// Interleaved timing rounds (each times every precision once per batch size).
    pub rounds: usize,
    pub threads: usize,
    pub ort_lib: Option<PathBuf>,
    pub seed: u64,
}

/// One precision at one batch size.
#[derive(Debug, Clone)]
pub struct PrecisionRow {
    pub precision: &'static str,
    pub file_bytes: u64,
    pub batch: usize,
    /// Median milliseconds per batch over the rounds, and min / max.
    pub ms: f64,
    pub ms_min: f64,
    pub ms_max: f64,
    /// Median of (this precision's time / f32's time) over the rounds, pair by pair.
    pub ratio_vs_f32: f64,
    /// Max |logit − f32 logit| on the timed batch.
    pub max_abs_dlogit: f32,
    /// mDice on `data` (when given).
    pub mdice: Option<f64>,
}

/// Export the three graphs, then time and score them.
pub fn run(cfg: &PrecisionBenchConfig, obs: &mut dyn Observer) -> Result<Vec<PrecisionRow>> {
    if cfg.batches.is_empty() || cfg.batches.contains(&0) || cfg.rounds == 0 {
        return Err(Error::Config {
            field: "batch".into(),
            msg: "batch sizes and --rounds must be at least 1".into(),
        });
    }
    let weights = match &cfg.checkpoint {
        Some(p) => crate::sam::load_weights(p, &cfg.sam, &candle_core::Device::Cpu)?,
        None => random_sam_weights(&cfg.sam, cfg.seed)?,
    };
    let (f32_model, _) = export_prompt_free(&cfg.sam, &weights, SamExportOptions::default())?;
    drop(weights);
    let mut q = f32_model.clone();
    quantize_int8(&mut q)?;
    let mut h = f32_model.clone();
    to_fp16(&mut h)?;
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut engines: Vec<(&'static str, u64, OrtEngine)> = Vec::new();
    for (name, m) in [("f32", f32_model), ("int8", q), ("fp16", h)] {
        let p = dir.path().join(format!("{name}.onnx"));
        let r = crate::onnx::write_model(&p, m)?;
        let bytes = r.model_bytes + r.data_bytes;
        engines.push((
            name,
            bytes,
            OrtEngine::load(&p, cfg.threads, cfg.ort_lib.as_deref(), obs)?,
        ));
    }
    let s = cfg.sam.image_size;
    let mut rng = Rng::new(cfg.seed ^ 0x9e37);
    let mut rows = Vec::new();
    for &b in &cfg.batches {
        let x: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.f32()).collect();
        let mut outs = Vec::new();
        for (_, _, e) in &engines {
            outs.push(e.logits(&x, b)?.data); // warm-up, and the outputs compared
        }
        let mut times = vec![Vec::with_capacity(cfg.rounds); engines.len()];
        for _ in 0..cfg.rounds {
            for (k, (_, _, e)) in engines.iter().enumerate() {
                let t0 = Instant::now();
                e.logits(&x, b)?;
                times[k].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        for (k, (name, bytes, _)) in engines.iter().enumerate() {
            let ratios: Vec<f64> = times[k]
                .iter()
                .zip(&times[0])
                .map(|(t, f)| t / f.max(1e-12))
                .collect();
            let t = &times[k];
            let (lo, hi) = t
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, c), &v| (a.min(v), c.max(v)));
            let diff = outs[k]
                .iter()
                .zip(&outs[0])
                .map(|(a, c)| (a - c).abs())
                .fold(0.0f32, f32::max);
            rows.push(PrecisionRow {
                precision: name,
                file_bytes: *bytes,
                batch: b,
                ms: crate::stats::median(t),
                ms_min: lo,
                ms_max: hi,
                ratio_vs_f32: crate::stats::median(&ratios),
                max_abs_dlogit: diff,
                mdice: None,
            });
        }
    }
    let inputs = match (&cfg.inputs, &cfg.data) {
        (Some(i), _) => Some(i.clone()),
        (None, Some(data)) => {
            let (c, bad) = input::from_folders(&data.join("images"), Some(&data.join("masks")))?;
            Some(input::check(c, bad))
        }
        (None, None) => None,
    };
    if let Some(inputs) = inputs {
        for (k, (name, _, e)) in engines.iter().enumerate() {
            let mut opts = InferOptions::new(dir.path().join(format!("out-{k}")));
            opts.overlays = false;
            let (r, _) = crate::infer::infer(e as &dyn Engine, &inputs, &opts, &mut Silent)?;
            let m = r.metrics.map(|m| m.mdice);
            for row in rows.iter_mut().filter(|row| row.precision == *name) {
                row.mdice = m;
            }
        }
    }
    Ok(rows)
}
