//! `gps-seg bench infer`: prompt-free SAM throughput of ONNX Runtime vs the Candle SAM on the
//! same seeded random weights and images, per batch size, with achieved GFLOP/s from
//! [`crate::bench::sam::prompt_free_flops`] and the largest logit difference between the two
//! engines (a parity sanity check). The library measures; the CLI prints.
//!
//! With a [`TorchReference`] (`bench infer --compare --python VENV/bin/python`) it also times
//! Meta's own modules eagerly (`scripts/bench_torch_infer.py`, same weights, same images) and
//! runs ONNX Runtime on torch's own export of that model beside ours, rounds interleaved, and
//! lists the operators ONNX Runtime's optimizer leaves in each graph ([`OpComparison`]): which
//! fusions it applies to one graph and not the other.

use crate::error::{Error, Result};
use crate::infer::engine::{CandleEngine, Engine, OrtEngine};
use crate::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use crate::progress::Observer;
use crate::sam::SamConfig;
use crate::util::Rng;
use candle_core::Device;
use std::path::{Path, PathBuf};
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
    /// Timed rounds per engine and batch, interleaved (each round = `iters` iterations).
    pub rounds: usize,
    /// Also measure PyTorch eager and ONNX Runtime on torch's export.
    pub torch: Option<TorchReference>,
    /// Keep the graphs (as written and as ONNX Runtime optimized them), the weights and the
    /// images in this new (or empty) folder instead of a temporary one.
    pub keep: Option<PathBuf>,
}

/// The Python side of a comparison: an interpreter with torch + segment-anything + safetensors
/// and `scripts/bench_torch_infer.py`.
#[derive(Debug, Clone)]
pub struct TorchReference {
    pub python: PathBuf,
    pub script: PathBuf,
}

/// ONNX Runtime's optimized graph of each export, as operator counts (`optimized_ops`), for the
/// largest batch measured.
#[derive(Debug, Clone, Default)]
pub struct OpComparison {
    pub batch: usize,
    /// Nodes in each file as written, before optimization.
    pub written_nodes: (usize, usize),
    pub ours: std::collections::BTreeMap<String, usize>,
    pub torch: std::collections::BTreeMap<String, usize>,
    /// Which exporter torch used (`torchscript` or `dynamo`).
    pub exporter: String,
}

/// Everything one `bench infer` measured.
#[derive(Debug, Clone, Default)]
pub struct InferBenchReport {
    pub rows: Vec<InferBenchRow>,
    pub ops: Option<OpComparison>,
    /// e.g. `torch 2.15.0 (ATen AVX2, 2 threads)`.
    pub torch_info: Option<String>,
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct InferBenchRow {
    pub engine: String,
    pub batch: usize,
    /// Mean seconds per batch of each round.
    pub rounds: Vec<f64>,
    /// Mean seconds per batch (median of the rounds).
    pub seconds_per_batch: f64,
    pub images_per_s: f64,
    pub gflops: f64,
    /// Max |logit − logit(Candle)| on this batch (0 on the Candle row).
    pub max_abs_diff: f32,
}

/// Mean seconds per call over `iters` calls.
fn time_engine(engine: &dyn Engine, x: &[f32], n: usize, iters: usize) -> Result<f64> {
    let t0 = Instant::now();
    for _ in 0..iters {
        engine.logits(x, n)?;
    }
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// What `scripts/bench_torch_infer.py` prints (one JSON object on its last line).
#[derive(Debug, serde::Deserialize)]
struct TorchInferOut {
    torch_version: String,
    cpu_capability: String,
    threads: usize,
    seconds_per_batch: Vec<f64>,
    exporter: Option<String>,
}

/// Run the Python side for one batch: eager timings, eager logits, torch's ONNX export.
#[allow(clippy::too_many_arguments)]
fn torch_side(
    r: &TorchReference,
    cfg: &InferBenchConfig,
    iters: usize,
    batch: usize,
    weights: &Path,
    images: &Path,
    logits: &Path,
    onnx_out: &Path,
) -> Result<TorchInferOut> {
    let threads = if cfg.threads == 0 {
        rayon::current_num_threads()
    } else {
        cfg.threads
    };
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for (k, v) in [
        ("--model", cfg.sam.name.clone()),
        ("--image-size", cfg.sam.image_size.to_string()),
        ("--batch", batch.to_string()),
        ("--iters", iters.to_string()),
        ("--rounds", cfg.rounds.max(1).to_string()),
        ("--threads", threads.to_string()),
    ] {
        args.extend([k.into(), v.into()]);
    }
    for (k, v) in [
        ("--weights", weights),
        ("--images", images),
        ("--logits-out", logits),
        ("--onnx-out", onnx_out),
    ] {
        args.extend([k.into(), v.as_os_str().to_owned()]);
    }
    let line = super::python_json_line(&r.python, &r.script, &args)?;
    serde_json::from_str(&line)
        .map_err(|e| Error::msg(format!("{}: bad JSON result: {e}", r.script.display())))
}

/// Read `n` little-endian f32 values the Python side wrote (its size checked first).
fn read_f32s(path: &Path, n: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if Some(bytes.len()) != n.checked_mul(4) {
        return Err(Error::msg(format!(
            "{}: {} bytes, expected {n} f32 values",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn write_f32s(path: &Path, v: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Export random weights, load the engines, time each batch size (rounds interleaved).
pub fn run(cfg: &InferBenchConfig, obs: &mut dyn Observer) -> Result<InferBenchReport> {
    if cfg.batches.is_empty() || cfg.batches.contains(&0) {
        return Err(Error::Config {
            field: "batch".into(),
            msg: "batch sizes must be at least 1".into(),
        });
    }
    let iters = cfg.iters.max(1);
    let rounds = cfg.rounds.max(1);
    let weights = random_sam_weights(&cfg.sam, cfg.seed)?;
    let (model, _) = export_prompt_free(&cfg.sam, &weights, SamExportOptions::default())?;
    let (_tmp, dir) = super::work_dir(cfg.keep.as_deref(), "gps-seg-bench-infer-")?;
    let dir: &Path = &dir;
    // ONNX Runtime's optimized graph as operator counts (kept beside the graph with --keep).
    let optimized = |model: &Path| match cfg.keep {
        None => crate::infer::runtime::optimized_ops(model),
        Some(_) => {
            crate::infer::runtime::optimized_ops_at(model, &model.with_extension("optimized.onnx"))
        }
    };
    let ours_path = dir.join("gps-seg.onnx");
    let written_ours = model.graph.as_ref().map_or(0, |g| g.node.len());
    crate::onnx::write_model(&ours_path, model)?;
    let weights_path = dir.join("weights.safetensors");
    if cfg.torch.is_some() {
        crate::util::tensors::save_safetensors(&weights_path, &weights, None)?;
    }
    let ort = OrtEngine::load(&ours_path, cfg.threads, cfg.ort_lib.as_deref(), obs)?;
    let candle = CandleEngine::from_weights(
        weights,
        &cfg.sam,
        &Device::Cpu,
        format!("random weights (seed {})", cfg.seed),
    )?;
    let s = cfg.sam.image_size;
    let mut rng = Rng::new(cfg.seed ^ 0xbe4c);
    let mut report = InferBenchReport::default();
    for &b in &cfg.batches {
        let x: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.f32()).collect();
        let flop = crate::bench::sam::prompt_free_flops(&cfg.sam, b);
        let y_candle = candle.logits(&x, b)?.data; // also the warm-up
        let y_ort = ort.logits(&x, b)?.data;
        let mut engines: Vec<(String, &dyn Engine, f32)> = vec![
            (
                "onnxruntime (gps-seg graph)".into(),
                &ort,
                max_abs_diff(&y_ort, &y_candle),
            ),
            ("candle".into(), &candle, 0.0),
        ];
        let mut torch_rows = None;
        let torch_ort;
        if let Some(r) = &cfg.torch {
            let images = dir.join(format!("images-b{b}.f32"));
            let logits = dir.join(format!("torch-logits-b{b}.f32"));
            let onnx = dir.join(format!("torch-b{b}.onnx"));
            write_f32s(&images, &x)?;
            let t = torch_side(r, cfg, iters, b, &weights_path, &images, &logits, &onnx)?;
            let y_torch = read_f32s(&logits, b * s * s)?;
            torch_ort = OrtEngine::load(&onnx, cfg.threads, cfg.ort_lib.as_deref(), obs)?;
            let y_torch_ort = torch_ort.logits(&x, b)?.data;
            engines.push((
                format!("onnxruntime (torch {} export)", t.torch_version),
                &torch_ort,
                max_abs_diff(&y_torch_ort, &y_candle),
            ));
            report.torch_info = Some(format!(
                "torch {} (ATen {}, {} threads)",
                t.torch_version, t.cpu_capability, t.threads
            ));
            if b == *cfg.batches.iter().max().unwrap_or(&b) {
                let written_torch = crate::onnx::read_model(&onnx)?
                    .graph
                    .map_or(0, |g| g.node.len());
                report.ops = Some(OpComparison {
                    batch: b,
                    written_nodes: (written_ours, written_torch),
                    ours: optimized(&ours_path)?,
                    torch: optimized(&onnx)?,
                    exporter: t.exporter.clone().unwrap_or_default(),
                });
            }
            torch_rows = Some((t, max_abs_diff(&y_torch, &y_candle)));
        }
        let mut times = vec![Vec::new(); engines.len()];
        for _ in 0..rounds {
            for (i, (_, e, _)) in engines.iter().enumerate() {
                // Let the previous engine's spinning worker threads (ONNX Runtime's intra-op
                // pool, Candle's rayon pool) go idle first: on 2 cores they would otherwise
                // steal the start of this engine's round (measured on a 2-core Intel Xeon,
                // AVX-512: ≈ 10% of a 12 ms tiny@256 batch, docs/PERF.md).
                std::thread::sleep(std::time::Duration::from_millis(200));
                e.logits(&x, b)?;
                times[i].push(time_engine(*e, &x, b, iters)?);
            }
        }
        let row = |engine: String, rounds: Vec<f64>, diff: f32| {
            let t = crate::stats::median(&rounds);
            InferBenchRow {
                engine,
                batch: b,
                rounds,
                seconds_per_batch: t,
                images_per_s: b as f64 / t.max(1e-12),
                gflops: flop / 1e9 / t.max(1e-12),
                max_abs_diff: diff,
            }
        };
        for ((name, _, diff), t) in engines.iter().zip(times) {
            report.rows.push(row(name.clone(), t, *diff));
        }
        if let Some((t, diff)) = torch_rows {
            report.rows.push(row(
                format!("torch {} eager", t.torch_version),
                t.seconds_per_batch,
                diff,
            ));
        }
    }
    Ok(report)
}
