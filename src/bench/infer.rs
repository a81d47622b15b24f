//! `gps-seg bench infer`: prompt-free SAM throughput of ONNX Runtime vs the Candle SAM on the
//! same seeded random weights and images, per batch size, with achieved GFLOP/s from
//! [`crate::bench::sam::prompt_free_flops`] and the largest logit difference between the two
//! engines (a parity sanity check). The library measures; the CLI prints.

use crate::error::{Error, Result};
use crate::infer::engine::{CandleEngine, Engine, OrtEngine};
use crate::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use crate::progress::Observer;
use crate::sam::SamConfig;
use crate::util::Rng;
use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct InferBenchConfig {
    pub sam: SamConfig,
    pub batches: Vec<usize>,
    /// Timed iterations per engine and batch size (after one warm-up).
    pub iters: usize,
    /// ONNX Runtime intra-op threads (0 = its default).
    pub threads: usize,
    pub ort_lib: Option<PathBuf>,
    pub seed: u64,
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct InferBenchRow {
    pub engine: String,
    pub batch: usize,
    /// Mean seconds per batch.
    pub seconds_per_batch: f64,
    pub images_per_s: f64,
    pub gflops: f64,
    /// Max |logit(ORT) − logit(Candle)| on this batch (same on both rows).
    pub max_abs_diff: f32,
}

fn time_engine(engine: &dyn Engine, x: &[f32], n: usize, iters: usize) -> Result<(f64, Vec<f32>)> {
    let first = engine.logits(x, n)?.data; // warm-up
    let t0 = Instant::now();
    for _ in 0..iters {
        engine.logits(x, n)?;
    }
    Ok((t0.elapsed().as_secs_f64() / iters as f64, first))
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Export random weights, load both engines, time each batch size.
pub fn run(cfg: &InferBenchConfig, obs: &mut dyn Observer) -> Result<Vec<InferBenchRow>> {
    if cfg.batches.is_empty() || cfg.batches.contains(&0) {
        return Err(Error::Config {
            field: "batch".into(),
            msg: "batch sizes must be at least 1".into(),
        });
    }
    let iters = cfg.iters.max(1);
    let weights = random_sam_weights(&cfg.sam, cfg.seed)?;
    let (model, _) = export_prompt_free(&cfg.sam, &weights, SamExportOptions::default())?;
    let tmp = TempFile(
        std::env::temp_dir().join(format!("gps-seg-bench-infer-{}.onnx", std::process::id())),
    );
    crate::onnx::write_model(&tmp.0, model)?;
    let ort = OrtEngine::load(&tmp.0, cfg.threads, cfg.ort_lib.as_deref(), obs)?;
    let candle = CandleEngine::from_weights(
        weights,
        &cfg.sam,
        &Device::Cpu,
        format!("random weights (seed {})", cfg.seed),
    )?;
    let s = cfg.sam.image_size;
    let mut rng = Rng::new(cfg.seed ^ 0xbe4c);
    let mut rows = Vec::new();
    for &b in &cfg.batches {
        let x: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.f32()).collect();
        let flop = crate::bench::sam::prompt_free_flops(&cfg.sam, b);
        let (t_ort, y_ort) = time_engine(&ort, &x, b, iters)?;
        let (t_candle, y_candle) = time_engine(&candle, &x, b, iters)?;
        let diff = y_ort
            .iter()
            .zip(&y_candle)
            .map(|(a, c)| (a - c).abs())
            .fold(0.0f32, f32::max);
        for (name, t) in [("onnxruntime", t_ort), ("candle", t_candle)] {
            rows.push(InferBenchRow {
                engine: name.into(),
                batch: b,
                seconds_per_batch: t,
                images_per_s: b as f64 / t.max(1e-12),
                gflops: flop / 1e9 / t.max(1e-12),
                max_abs_diff: diff,
            });
        }
    }
    Ok(rows)
}
