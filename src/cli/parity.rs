//! `gps-seg parity`: check a device against the CPU — same weights and batch, forward +
//! backward of the prompt-free SAM — and fail when any error exceeds the tolerance.

use super::common::DeviceArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A preset (`tiny` uses its shipped weights) or a checkpoint path.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size (default: the model's).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest accepted error (relative to each tensor's scale) of logits, loss and gradients.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = a.device.resolve()?;
    let (path, cfg) = gps_seg::registry::resolve_sam(&a.model, a.image_size)?;
    let weights = gps_seg::sam::load_weights(&path, &cfg, &candle_core::Device::Cpu)?;
    let r = gps_seg::bench::parity::device_parity(&cfg, Some(weights), a.batch, &device, a.seed)?;
    println!(
        "parity: {} ({} px, batch {}) on {} vs the CPU reference path (f32)",
        path.display(),
        r.image_size,
        r.batch,
        r.device
    );
    println!("| tensor | max error (relative to its scale) |");
    println!("|---|---:|");
    println!("| low-res mask logits | {:.3e} |", r.logits_err);
    println!("| loss | {:.3e} |", r.loss_err);
    println!(
        "| worst of {} gradients: `{}` | {:.3e} |",
        r.grads_compared, r.worst_grad.0, r.worst_grad.1
    );
    if !r.missing.is_empty() {
        anyhow::bail!(
            "{} parameters got no gradient on {}: {}",
            r.missing.len(),
            r.device,
            r.missing.join(", ")
        );
    }
    if r.worst() > a.tolerance {
        anyhow::bail!(
            "parity failed: error {:.3e} exceeds the tolerance {:.1e}",
            r.worst(),
            a.tolerance
        );
    }
    println!("parity ok (tolerance {:.1e})", a.tolerance);
    Ok(())
}
