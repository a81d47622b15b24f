//! `gps-seg eval`: evaluate a SAM checkpoint on the synthetic upstream validation scenes (the
//! numbers in a shipped model's PROVENANCE). For Kvasir-shaped data use
//! `gps-seg train --method zero-shot` (evaluation only) or `gps-seg infer`.

use super::common::{DeviceArgs, DtypeArgs};
use anyhow::Context;
use gps_seg::nn::RolePolicy;
use gps_seg::train::pretrain::sam::evaluate_upstream;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A preset with shipped weights (tiny) or a checkpoint path.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Seed of the pretraining run (the validation stream is derived from it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validation scenes.
    #[arg(long, default_value_t = 48)]
    pub scenes: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.scenes == 0 {
        anyhow::bail!("--scenes 0: evaluate at least one scene (a mean over none is undefined)");
    }
    let device = a.device.resolve()?;
    let dtype = a.dtype.resolve(&device)?;
    let (path, cfg) = gps_seg::sam::registry::resolve(&a.model, None)?;
    let weights = gps_seg::sam::load_weights(&path, &cfg, &device)?;
    let (sam, _) = gps_seg::sam::build(&cfg, Some(weights), RolePolicy::AllFrozen, &device, 0)
        .with_context(|| format!("{}: not a SAM for this config", path.display()))?;
    let sam = sam.with_precision(dtype);
    let r = evaluate_upstream(&sam, a.seed, a.scenes, 16, &device)?;
    println!(
        "{} ({} px, encoder in {dtype}) on {} upstream validation scenes (seed {}):",
        path.display(),
        cfg.image_size,
        r.scenes,
        a.seed
    );
    println!("| prompt-free IoU | point IoU (best-scored of 3) | box IoU |");
    println!("|---|---|---|");
    println!(
        "| {:.4} | {:.4} | {:.4} |",
        r.prompt_free_miou, r.point_miou, r.box_miou
    );
    Ok(())
}
