//! `gps-seg report merge DIR... --out DIR`: join the reports of sharded `infer --shard I/N`
//! jobs into the report one unsharded job would have written.

use anyhow::Context;
use gps_seg::infer::report::merge_reports;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Merge shard outputs (each a folder with report.json) into one report.
    Merge {
        /// The shard folders (all N of one job).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Folder for the merged report.json and scores.csv.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Merge { dirs, out } => {
            // `merge_reports` refuses an --out on (or inside) a shard folder first.
            let r = merge_reports(&dirs, &out).context("report merge failed")?;
            println!(
                "merged {} shard report(s): {} images of {} inputs ({} skipped)",
                dirs.len(),
                r.images,
                r.total_inputs,
                r.skipped.len()
            );
            if let Some(m) = &r.metrics {
                println!(
                    "mDice {:.4}  mIoU {:.4}  (per image at the original resolution, FP counted)",
                    m.mdice, m.miou
                );
                println!(
                    "  GPS reference convention (pooled, background ignored): Dice {:.4}  IoU {:.4}",
                    m.ref_dice_ignore_bg, m.ref_iou_ignore_bg
                );
            }
            println!("wrote {}/report.json", out.display());
            Ok(())
        }
    }
}
