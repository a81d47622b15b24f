//! `gps-seg bench train`: ms per training step, Candle full vs GPS step (and PyTorch's, with
//! `--python`). Each row runs in a fresh child process (this binary with the hidden `--one`
//! flag) so that its peak memory is its own.

use crate::cli::common::{DeviceArgs, DtypeArgs};
use gps_seg::bench::train::{bench_step, format_table, torch_step, StepKind, StepResult, StepSpec};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configs as `model:image_size:batch`, comma-separated.
    #[arg(long, default_value = "tiny:256:4,vit_b:512:1")]
    pub configs: String,
    /// Also run the full step (Candle) and, with a Python, PyTorch's full and GPS steps.
    #[arg(long)]
    pub compare: bool,
    /// Also run Candle's GPS step on the dense reference path (no fused ops / sparse grads).
    #[arg(long)]
    pub reference: bool,
    /// Timed steps per row (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Run the whole set this many times (interleaved) to show the spread.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Python with torch + segment-anything for the PyTorch rows (or `GPS_SEG_TORCH_PYTHON`).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// The PyTorch benchmark script.
    #[arg(long, default_value = "scripts/bench_torch.py")]
    pub torch_script: PathBuf,
    /// Internal: run one row (JSON `StepSpec`) in this process and print its JSON result.
    #[arg(long, hide = true)]
    pub one: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Image-encoder dtype of the Candle rows (the PyTorch rows run f32 and are skipped
    /// otherwise).
    #[command(flatten)]
    pub dtype: DtypeArgs,
}

/// Threads of every row (`--threads`, default 2; `torch.set_num_threads` for PyTorch).
const DEFAULT_THREADS: usize = 2;

pub fn run(a: Args) -> anyhow::Result<()> {
    let threads = a.device.threads.unwrap_or(DEFAULT_THREADS);
    gps_seg::util::threads::set(threads)?;
    if let Some(spec) = &a.one {
        let spec: StepSpec = serde_json::from_str(spec)?;
        // The row's step splits its batch into chunks per thread when it has two or more
        // images (and runs the fused path), as `train` does.
        gps_seg::util::threads::elementwise_pool_for(
            spec.batch >= 2 && !spec.reference,
            spec.config()?.encoder_values_per_image(),
        );
        let dev = a.device.resolve()?;
        spec.dtype.check_device(&dev)?;
        let r = bench_step(&spec, &dev)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let dtype = a.dtype.parse_for(&a.device)?;
    let python = a
        .python
        .clone()
        .or_else(|| std::env::var_os("GPS_SEG_TORCH_PYTHON").map(PathBuf::from));
    let specs = step_specs(&a, dtype)?;
    let exe = std::env::current_exe()?;
    let mut results: Vec<StepResult> = Vec::new();
    for round in 0..a.repeat.max(1) {
        for spec in &specs {
            eprintln!(
                "round {round}: candle{} {} {}px bs{} {}",
                if spec.reference { "-reference" } else { "" },
                spec.model,
                spec.image_size,
                spec.batch,
                spec.kind.as_str()
            );
            let out = std::process::Command::new(&exe)
                .args(["bench", "train", "--threads", &threads.to_string()])
                .args(["--device", &a.device.device])
                .args(["--one", &serde_json::to_string(spec)?])
                .output()?;
            if !out.status.success() {
                anyhow::bail!(
                    "benchmark row failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout.lines().last().unwrap_or_default();
            results.push(serde_json::from_str(line)?);
            if let (true, Some(py), false, false) =
                (a.compare, &python, spec.reference, spec.dtype.is_low())
            {
                eprintln!("round {round}: torch {} {}", spec.model, spec.kind.as_str());
                results.push(torch_step(py, &a.torch_script, spec, threads)?);
            }
        }
    }
    println!(
        "SAM prompt-free training step, {} threads, {} timed steps per row, {} round(s)",
        threads,
        a.iters,
        a.repeat.max(1)
    );
    println!(
        "{} (the PyTorch rows use its own kernels)",
        gps_seg::util::cpu::bench_header(threads)
    );
    print!("{}", format_table(&results));
    println!(
        "(GFLOP/s: 3x the analytic forward FLOPs per step for every row; peak = VmHWM of the row's process)"
    );
    Ok(())
}

/// The rows of `--configs` (`model:image_size:batch`, comma-separated): GPS, and with
/// `--compare` the full step, with `--reference` the reference path.
fn step_specs(a: &Args, dtype: gps_seg::nn::Precision) -> anyhow::Result<Vec<StepSpec>> {
    let mut specs = Vec::new();
    for c in a.configs.split(',').filter(|c| !c.is_empty()) {
        let parts: Vec<&str> = c.split(':').collect();
        let [model, size, batch] = parts[..] else {
            anyhow::bail!("--configs: `{c}` is not model:image_size:batch");
        };
        let spec = |kind, reference| StepSpec {
            model: model.to_string(),
            image_size: size.parse().unwrap_or(0),
            batch: batch.parse().unwrap_or(0),
            iters: a.iters,
            kind,
            reference,
            seed: 0,
            dtype,
        };
        let s = spec(StepKind::Gps, false);
        if s.image_size == 0 || s.batch == 0 {
            anyhow::bail!("--configs: `{c}`: image size and batch must be positive integers");
        }
        s.config()?;
        if a.compare {
            specs.push(spec(StepKind::Full, false));
        }
        specs.push(s);
        if a.reference {
            specs.push(spec(StepKind::Gps, true));
        }
    }
    Ok(specs)
}
