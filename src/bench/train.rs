//! Training-step benchmark: a full fine-tuning step against a GPS step of the prompt-free SAM
//! path, in Candle and (through `scripts/bench_torch.py`) in PyTorch with Meta's modules.
//!
//! - Full step: every parameter trainable, forward, BCE-with-logits loss, backward, AdamW
//!   (decay 0.01, PyTorch's default) over all vars.
//! - GPS step: selection with K = 1 per row under [`Policy::sam`] (random scores: selection
//!   cost is not part of a step, only the budget matters), roles from
//!   [`Selection::roles`], plain Adam over the sparse deltas and the fully-trainable tensors.
//!   Candle's step skips dense weight gradients (see [`crate::nn::kernels::sparse_grad`]); PyTorch's
//!   reference step computes them and zeroes the unselected entries (as the GPS reference
//!   implementation does).
//!
//! Each configuration is best measured in a fresh process so the peak resident memory
//! (`VmHWM`) belongs to it; the CLI re-executes itself per row. The library measures and
//! returns numbers; the CLI prints. Random weights (`ParamStore::init`), random images.

use crate::bench::sam::prompt_free_flops;
use crate::error::{Error, Result};
use crate::gps::select::{select, SelectSpec};
use crate::gps::{Criterion, Level, Policy, Selection};
use crate::nn::kernels::with_reference_path;
use crate::nn::{ParamStore, Precision};
use crate::sam::{Sam, SamConfig};
use crate::train::fit::optim::{Adam, AdamW, Optimizer};
use crate::util::Rng;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Which training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// All parameters, AdamW.
    Full,
    /// GPS K = 1 selection, Adam.
    Gps,
}

impl StepKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            StepKind::Full => "full",
            StepKind::Gps => "gps",
        }
    }
}

/// One benchmark row's setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// SAM preset (`tiny`, `vit_b`, ...).
    pub model: String,
    pub image_size: usize,
    pub batch: usize,
    /// Timed steps (after one warm-up step).
    pub iters: usize,
    pub kind: StepKind,
    /// Candle only: run the reference paths (dense weight gradients, composed element-wise
    /// ops) instead of the fast ones.
    #[serde(default)]
    pub reference: bool,
    #[serde(default)]
    pub seed: u64,
    /// Compute dtype of the image encoder (f32, or bf16/f16 autocast).
    #[serde(default)]
    pub dtype: Precision,
}

impl StepSpec {
    /// The SAM config of this spec.
    pub fn config(&self) -> Result<SamConfig> {
        let cfg = SamConfig::preset(&self.model)?.with_image_size(self.image_size);
        cfg.validate()?;
        Ok(cfg)
    }

    /// FLOPs of a full training step: 3× the analytic forward count.
    pub fn full_step_flops(&self) -> Result<f64> {
        Ok(3.0 * prompt_free_flops(&self.config()?, self.batch))
    }
}

/// Measured steps of one row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    /// `candle`, `candle-reference` or `torch <version>`.
    pub implementation: String,
    pub spec: StepSpec,
    /// CPU threads the row ran with.
    pub threads: usize,
    /// Milliseconds of each timed step.
    pub step_ms: Vec<f64>,
    /// Peak resident memory of the process (`VmHWM`), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Trainable entries and all parameter entries.
    pub trainable: usize,
    pub total: usize,
    /// Loss after the last step.
    pub last_loss: f64,
}

impl StepResult {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.step_ms.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Median step time (ms).
    pub fn median_ms(&self) -> f64 {
        crate::stats::median(&self.step_ms)
    }

    /// Fastest and slowest step (ms).
    pub fn range_ms(&self) -> (f64, f64) {
        let v = self.sorted();
        (
            v.first().copied().unwrap_or(f64::NAN),
            v.last().copied().unwrap_or(f64::NAN),
        )
    }

    /// Full-step-equivalent GFLOP/s at the median: 3× the forward's analytic FLOPs per step,
    /// for every row (a GPS step that skips weight gradients does less work, so this is the
    /// rate of doing a full step's job).
    pub fn gflops(&self) -> f64 {
        self.spec.full_step_flops().unwrap_or(f64::NAN) / 1e9 / (self.median_ms() / 1e3)
    }
}

use crate::util::mem::peak_rss_bytes;

use crate::train::loss::bce_with_logits;

/// Random images `[B, 3, S, S]` in `[0, 1]` and masks `[B, 1, S, S]` (30 % ones).
pub fn random_batch(
    batch: usize,
    size: usize,
    seed: u64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut rng = Rng::derive(seed, "bench-batch");
    let n = batch * 3 * size * size;
    let x = Tensor::from_vec(
        (0..n).map(|_| rng.f32()).collect::<Vec<f32>>(),
        (batch, 3, size, size),
        dev,
    )?;
    let m = batch * size * size;
    let t = Tensor::from_vec(
        (0..m)
            .map(|_| if rng.bernoulli(0.3) { 1f32 } else { 0.0 })
            .collect::<Vec<f32>>(),
        (batch, 1, size, size),
        dev,
    )?;
    Ok((x, t))
}

/// A SAM ready for full fine-tuning: random weights, every param a var, AdamW over all.
pub fn full_setup(cfg: &SamConfig, dev: &Device, seed: u64) -> Result<(Sam, ParamStore, AdamW)> {
    let store = ParamStore::init(dev, seed);
    let sam = Sam::new(cfg, &store)?;
    let opt = AdamW::new(store.trainable_vars(), 1e-4, 0.01)?;
    Ok((sam, store, opt))
}

/// A SAM ready for GPS fine-tuning: random base weights, selection with `k` per row under
/// [`Policy::sam`] (random scores), store with [`Selection::roles`], Adam over its vars.
pub fn gps_setup(
    cfg: &SamConfig,
    dev: &Device,
    seed: u64,
    k: usize,
    lr: f64,
) -> Result<(Sam, ParamStore, Selection, Adam)> {
    let init = ParamStore::init(dev, seed);
    Sam::new(cfg, &init)?;
    let base = init.current_tensors()?;
    drop(init);
    let spec = SelectSpec {
        policy: &Policy::sam(),
        k,
        level: Level::Neuron,
        criterion: Criterion::Random,
        seed,
    };
    let sel = select(&base, None, &spec)?;
    let store = ParamStore::with_roles(base, sel.roles(), dev);
    let sam = Sam::new(cfg, &store)?;
    let opt = Adam::new(store.trainable_vars(), lr)?;
    Ok((sam, store, sel, opt))
}

/// One training step (forward, BCE loss, backward, optimiser update); returns the loss.
pub fn train_step(
    sam: &Sam,
    opt: &mut dyn Optimizer,
    images01: &Tensor,
    target: &Tensor,
) -> Result<f64> {
    // As the training loop's step (`train::seg`): one image chunk per thread on the CPU.
    let n = images01.dim(0)?;
    let (loss, grads) = crate::nn::split_backward(n, images01.device().is_cpu(), |r| {
        let x = images01.narrow(0, r.start, r.len())?;
        let t = target.narrow(0, r.start, r.len())?;
        let y = sam.forward_prompt_free(&x)?;
        Ok((bce_with_logits(&y, &t)? * (r.len() as f64 / n as f64))?)
    })?;
    opt.step(&grads)?;
    Ok(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Run `spec` in this process: setup, one warm-up step, `iters` timed steps. The peak RSS is
/// this process's so far (run each row in a fresh process for an honest peak).
pub fn bench_step(spec: &StepSpec, dev: &Device) -> Result<StepResult> {
    let cfg = spec.config()?;
    let (x, t) = random_batch(spec.batch, spec.image_size, spec.seed, dev)?;
    let (sam, store, mut opt): (Sam, ParamStore, Box<dyn Optimizer>) = match spec.kind {
        StepKind::Full => {
            let (s, st, o) = full_setup(&cfg, dev, spec.seed)?;
            (s.with_precision(spec.dtype), st, Box::new(o))
        }
        StepKind::Gps => {
            let (s, st, _, o) = gps_setup(&cfg, dev, spec.seed, 1, 1e-4)?;
            (s.with_precision(spec.dtype), st, Box::new(o))
        }
    };
    let step = |opt: &mut dyn Optimizer| -> Result<(f64, f64)> {
        let t0 = Instant::now();
        // On a rayon worker, as the training loops do (`util::threads::on_worker`).
        let l = crate::util::threads::on_worker(|| {
            if spec.reference {
                with_reference_path(|| train_step(&sam, opt, &x, &t))
            } else {
                train_step(&sam, opt, &x, &t)
            }
        })?;
        Ok((t0.elapsed().as_secs_f64() * 1e3, l))
    };
    let (_, mut last_loss) = step(opt.as_mut())?;
    let mut step_ms = Vec::with_capacity(spec.iters);
    for _ in 0..spec.iters.max(1) {
        let (ms, l) = step(opt.as_mut())?;
        step_ms.push(ms);
        last_loss = l;
    }
    if !last_loss.is_finite() {
        return Err(Error::NonFinite(format!("bench loss {last_loss}")));
    }
    let (trainable, total) = store.counts();
    Ok(StepResult {
        implementation: match (spec.reference, spec.dtype) {
            (true, Precision::F32) => "candle-reference".into(),
            (false, Precision::F32) => "candle".into(),
            (true, p) => format!("candle-reference {p}"),
            (false, p) => format!("candle {p}"),
        },
        spec: spec.clone(),
        threads: candle_core::utils::get_num_threads(),
        step_ms,
        peak_rss_bytes: peak_rss_bytes(),
        trainable,
        total,
        last_loss,
    })
}

/// What `scripts/bench_torch.py` prints (one JSON object on its last line).
#[derive(Debug, Deserialize)]
struct TorchOut {
    torch_version: String,
    threads: usize,
    step_ms: Vec<f64>,
    peak_rss_bytes: Option<u64>,
    trainable: usize,
    total: usize,
    last_loss: f64,
}

/// Run `script` (`scripts/bench_torch.py`) with `python` for `spec` (full or GPS reference
/// step with Meta's modules) on `threads` threads and parse its result.
pub fn torch_step(
    python: &Path,
    script: &Path,
    spec: &StepSpec,
    threads: usize,
) -> Result<StepResult> {
    let args: Vec<std::ffi::OsString> = [
        ("--model", spec.model.clone()),
        ("--image-size", spec.image_size.to_string()),
        ("--batch", spec.batch.to_string()),
        ("--iters", spec.iters.to_string()),
        ("--mode", spec.kind.as_str().to_string()),
        ("--threads", threads.to_string()),
        ("--seed", spec.seed.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.into(), v.into()])
    .collect();
    let line = super::python_json_line(python, script, &args)?;
    let parsed: TorchOut = serde_json::from_str(&line)
        .map_err(|e| Error::msg(format!("{}: bad JSON result: {e}", script.display())))?;
    Ok(StepResult {
        implementation: format!("torch {}", parsed.torch_version),
        spec: StepSpec {
            reference: false,
            dtype: Precision::F32,
            ..spec.clone()
        },
        threads: parsed.threads,
        step_ms: parsed.step_ms,
        peak_rss_bytes: parsed.peak_rss_bytes,
        trainable: parsed.trainable,
        total: parsed.total,
        last_loss: parsed.last_loss,
    })
}

/// A plain-text table of results, one row each.
pub fn format_table(results: &[StepResult]) -> String {
    let mut s = format!(
        "{:<18} {:<6} {:>5} {:>3} {:>5} {:>9} {:>19} {:>8} {:>9} {:>11}\n",
        "implementation",
        "model",
        "px",
        "bs",
        "step",
        "ms/step",
        "min–max ms",
        "GFLOP/s",
        "peak MB",
        "trainable"
    );
    for r in results {
        let (lo, hi) = r.range_ms();
        s.push_str(&format!(
            "{:<18} {:<6} {:>5} {:>3} {:>5} {:>9.0} {:>19} {:>8.1} {:>9} {:>11}\n",
            r.implementation,
            r.spec.model,
            r.spec.image_size,
            r.spec.batch,
            r.spec.kind.as_str(),
            r.median_ms(),
            format!("{lo:.0}–{hi:.0} (n={})", r.step_ms.len()),
            r.gflops(),
            r.peak_rss_bytes
                .map(|b| format!("{:.0}", b as f64 / 1e6))
                .unwrap_or_else(|| "-".into()),
            r.trainable
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gps::delta_from_store;

    /// GPS training on the fast path (sparse weight gradients, fused kernels, im2col convs)
    /// gives the same deltas as the dense reference path after a few Adam steps.
    #[test]
    fn gps_fast_path_trains_like_the_dense_reference() {
        let dev = Device::Cpu;
        let mut cfg = SamConfig::tiny().with_image_size(128);
        cfg.encoder_depth = 2;
        cfg.encoder_global_attn_indexes = vec![1];
        let (x, t) = random_batch(2, 128, 3, &dev).unwrap();
        let run = |reference: bool| {
            // Adam with eps 1e-8 is sign-like on early steps (measured: 1.2e-5 relative on a
            // qkv bias, from entries with tiny gradients); a large eps keeps the update
            // proportional to the gradient so that rounding cannot flip tiny-gradient entries.
            let (sam, store, sel, _) = gps_setup(&cfg, &dev, 5, 1, 1e-3).unwrap();
            let mut opt = Adam::with_config(
                store.trainable_vars(),
                crate::train::fit::optim::AdamConfig {
                    eps: 1e-3,
                    ..crate::train::fit::optim::AdamConfig::new(1e-2)
                },
            )
            .unwrap();
            for _ in 0..3 {
                if reference {
                    with_reference_path(|| train_step(&sam, &mut opt, &x, &t)).unwrap();
                } else {
                    train_step(&sam, &mut opt, &x, &t).unwrap();
                }
            }
            (delta_from_store(&store).unwrap(), sel)
        };
        let (fast, sel) = run(false);
        let (dense, _) = run(true);
        assert!(sel
            .indices
            .contains_key("image_encoder.patch_embed.proj.weight"));
        assert!(sel.indices.contains_key("image_encoder.neck.2.weight"));
        assert_eq!(fast.len(), dense.len());
        let mut sparse_checked = 0;
        for (name, a) in &fast {
            let b = &dense[name];
            let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
            let den = b.sqr().unwrap().sum_all().unwrap();
            let (num, den) = (
                num.to_scalar::<f32>().unwrap().sqrt(),
                den.to_scalar::<f32>().unwrap().sqrt(),
            );
            if den == 0.0 {
                // Unused by the prompt-free path (e.g. the mask-prompt convs).
                assert_eq!(num, 0.0, "{name}");
                assert!(!name.starts_with("image_encoder."), "{name}: no update");
                continue;
            }
            assert!(
                num <= 1e-5 * den,
                "{name}: relative difference {}",
                num / den
            );
            if sel.indices.contains_key(name) {
                sparse_checked += 1;
            }
        }
        assert_eq!(sparse_checked, sel.indices.len());
    }

    #[test]
    fn results_summarise_and_tabulate() {
        let r = StepResult {
            implementation: "candle".into(),
            spec: StepSpec {
                model: "tiny".into(),
                image_size: 256,
                batch: 4,
                iters: 3,
                kind: StepKind::Gps,
                reference: false,
                seed: 0,
                dtype: Precision::F32,
            },
            threads: 2,
            step_ms: vec![300.0, 100.0, 200.0],
            peak_rss_bytes: Some(2_000_000),
            trainable: 10,
            total: 20,
            last_loss: 0.7,
        };
        assert_eq!(r.median_ms(), 200.0);
        assert_eq!(r.range_ms(), (100.0, 300.0));
        let want = r.spec.full_step_flops().unwrap() / 1e9 / 0.2;
        assert!((r.gflops() - want).abs() < 1e-9);
        let json = serde_json::to_string(&r).unwrap();
        let back: StepResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.spec, r.spec);
        let table = format_table(&[r]);
        assert!(table.contains("gps") && table.contains("100–300"));
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap_or(0) > 0);
        }
    }
}
