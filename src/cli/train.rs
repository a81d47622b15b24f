//! `gps-seg train`: fine-tune SAM on a Kvasir-shaped folder (or a classifier, `--task classify`).

use super::common::DeviceArgs;
use super::progress::Progress;
use anyhow::Context;
use gps_seg::gps::select::Level;
use gps_seg::train::seg::{self, Method, SegTrainConfig};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Task: seg (SAM on Kvasir-shaped data) or classify.
    #[arg(long, default_value = "seg")]
    pub task: String,
    /// Dataset kind: kvasir (seg); vtab, imagefolder, cifar100, fgvc (classify).
    #[arg(long, default_value = "kvasir")]
    pub data: String,
    /// Dataset folder. For kvasir without it: data/Kvasir-SEG if present, else a synthetic set
    /// generated once under data/synth-kvasir.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Model: a preset (tiny = the shipped pretrained sam-tiny) or a checkpoint path
    /// (.safetensors or an official .pth).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size override (pos_embed and rel_pos tables are resized at load).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// gps | full | decoder | random | magnitude | zero-shot.
    #[arg(long, default_value = "gps")]
    pub method: String,
    /// Entries selected per neuron (GPS K).
    #[arg(long, default_value_t = 1)]
    pub topk: usize,
    /// Selection level: neuron (GPS), layer or net (same budget).
    #[arg(long, default_value = "neuron")]
    pub level: String,
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Peak learning rate (cosine to --min-lr over the epochs).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-7)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Batches whose gradients rank the entries.
    #[arg(long, default_value_t = 32)]
    pub select_batches: usize,
    /// squash (reference) or pad (SAM's longest side + pad).
    #[arg(long, default_value = "squash")]
    pub resize: String,
    /// Use at most N training images (quick runs).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use at most N test images (quick runs).
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Cap optimiser steps per epoch (quick runs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Run folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Only plain progress lines.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.task != "seg" {
        anyhow::bail!(
            "--task {}: classification training is not available yet in this build",
            args.task
        );
    }
    if args.data != "kvasir" {
        anyhow::bail!("--data {}: segmentation supports `kvasir`", args.data);
    }
    let method: Method = args.method.parse()?;
    let level: Level = args.level.parse()?;
    let resize = super::common::parse_resize(&args.resize)?;
    let device = args.device.resolve()?;
    let mut progress = Progress::new(args.quiet);
    let data_dir = super::common::kvasir_dir(args.data_dir.clone(), args.seed, &mut progress)?;
    let (base, sam) = super::common::resolve_sam(&args.model, args.image_size)?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("{}-{}-k{}", sam.name, method.name(), args.topk))
    });
    let mut cfg = SegTrainConfig::recipe(data_dir, base, sam);
    cfg.method = method;
    cfg.topk = args.topk;
    cfg.level = level;
    cfg.epochs = args.epochs;
    cfg.lr = args.lr;
    cfg.min_lr = args.min_lr;
    cfg.batch_size = args.batch_size;
    cfg.seed = args.seed;
    cfg.select_batches = args.select_batches;
    cfg.resize = resize;
    cfg.train_limit = args.train_limit;
    cfg.test_limit = args.test_limit;
    cfg.max_steps_per_epoch = args.max_steps;
    let s = seg::train(&cfg, &out, &device, args.resume, &mut progress)
        .with_context(|| format!("training run {}", out.display()))?;
    print_summary(&s);
    Ok(())
}

/// The end-of-run table.
pub fn print_summary(s: &seg::RunSummary) {
    println!();
    println!("| method | trainable | % | best epoch | mDice | mIoU | ref. Dice (bg ignored) | time | s/step | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.3}% | {} | {:.4} | {:.4} | {:.4} | {:.0}s | {:.3} | {:.0} MB |",
        s.method,
        s.trainable,
        s.trainable_pct,
        s.best_epoch.map_or("-".into(), |e| e.to_string()),
        s.best.mdice,
        s.best.miou,
        s.best.ref_dice_ignore_bg,
        s.seconds,
        s.seconds_per_step,
        s.peak_rss_mb
    );
    println!();
    println!("run folder: {}", s.run_dir.display());
    if let Some(m) = &s.merged {
        println!("merged weights: {}", m.display());
    }
}
