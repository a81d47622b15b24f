//! `gps-seg demo`: the embedded default, end to end (see `gps_seg::pipeline`).

use super::common::DeviceArgs;
use super::progress::Progress;
use gps_seg::pipeline::{demo, DemoConfig};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A shortened run (CI): 60 images, one short epoch.
    #[arg(long)]
    pub quick: bool,
    /// Model: a preset with shipped weights (tiny) or a checkpoint path.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Output folder (default runs/demo, or runs/demo-quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    /// Replace the `zero-shot/` and `gps/` runs of an earlier demo in --out (otherwise an
    /// earlier run there is refused, never deleted).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = if args.quick {
        DemoConfig::quick()
    } else {
        DemoConfig::standard()
    };
    if let Some(m) = args.model {
        cfg.model = m;
    }
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(o) = args.out {
        cfg.out = o;
    }
    cfg.overwrite = args.overwrite;
    let device = args.device.resolve()?;
    let mut p = Progress::new(args.quiet);
    gps_seg::train::fit::set_elementwise_pool(&cfg.train_config()?, false);
    let r = demo(&cfg, &device, &mut p)?;
    let g = &r.gps;
    println!();
    println!(
        "| stage | trainable | val mDice | test mDice | test mIoU | test ref. Dice (bg ignored) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| zero-shot (pretrained sam-tiny) | 0 | — | {:.4} | {:.4} | {:.4} |",
        r.zero_shot.mdice, r.zero_shot.miou, r.zero_shot.ref_dice_ignore_bg
    );
    println!(
        "| GPS K={} (Candle eval, epoch {} chosen on val) | {} ({:.3}%) | {:.4} | {:.4} | {:.4} | {:.4} |",
        cfg.topk,
        g.best_epoch.map_or("-".into(), |e| e.to_string()),
        g.trainable,
        g.trainable_pct,
        g.val.mdice,
        g.best.mdice,
        g.best.miou,
        g.best.ref_dice_ignore_bg
    );
    println!(
        "| GPS merged → ONNX → ONNX Runtime | — | — | {:.4} | {:.4} | {:.4} |",
        r.ort.mdice, r.ort.miou, r.ort.ref_dice_ignore_bg
    );
    println!();
    println!(
        "{} train / {} val / {} test images; the epoch is chosen on val, test is only scored; \
         per-image Dice/IoU at the original resolution, FP counted.",
        g.train_images, g.val_images, r.ort.images
    );
    println!(
        "ONNX model: {} ({:.1} images/s in ONNX Runtime end to end)",
        r.onnx.display(),
        r.ort_images_per_s
    );
    println!(
        "run folder: {}  (total {:.0}s, {:.3} s/step)",
        cfg.out.display(),
        r.seconds,
        g.seconds_per_step
    );
    Ok(())
}
