//! `gps-seg bench <what>`: speed and memory tables. Numbers are measured, never asserted in tests.

use crate::cli::common::DeviceArgs;
use clap::Subcommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// GPS: selection time and optimizer-state size (GPS vs baselines).
    Gps(super::bench_gps::Args),
    /// SAM prompt-free forward and forward+backward time, with achieved GFLOP/s.
    Sam(SamArgs),
    /// Training step: Candle full vs GPS step (vs PyTorch with --compare --python).
    Train(super::bench_train::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Sam(a) => run_sam(a),
        What::Gps(a) => super::bench_gps::run(a),
        What::Train(a) => super::bench_train::run(a),
    }
}

#[derive(Debug, clap::Args)]
pub struct SamArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// SAM preset.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn run_sam(a: SamArgs) -> anyhow::Result<()> {
    let mut cfg = gps_seg::sam::SamConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        cfg = cfg.with_image_size(s);
    }
    let dev = a.device.resolve()?;
    let r = gps_seg::sam::bench::bench_prompt_free(&cfg, a.batch, a.iters, &dev)?;
    println!(
        "SAM `{}` {}px, batch {}, {} iters, {}",
        r.config, r.image_size, r.batch, r.iters, r.device
    );
    println!(
        "{:<18} {:>10} {:>10} {:>10}",
        "pass", "ms/batch", "GFLOP", "GFLOP/s"
    );
    println!(
        "{:<18} {:>10.1} {:>10.2} {:>10.1}",
        "forward",
        r.forward_s * 1e3,
        r.forward_gflop,
        r.forward_gflops()
    );
    println!(
        "{:<18} {:>10.1} {:>10.2} {:>10.1}",
        "forward+backward",
        r.forward_backward_s * 1e3,
        3.0 * r.forward_gflop,
        r.forward_backward_gflops()
    );
    println!(
        "{:<18} {:>10.1} {:>10.2} {:>10.1}",
        "fwd+bwd ckpt",
        r.checkpointed_s * 1e3,
        3.0 * r.forward_gflop,
        r.checkpointed_gflops()
    );
    println!("(FLOPs counted analytically: matmuls and convs, 2 per MAC; backward = 2x forward)");
    Ok(())
}
