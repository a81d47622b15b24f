//! `gps-seg pretrain sam|vit`: pretrain the project's small SAM on synthetic upstream scenes,
//! or its small ViT classifier on the synthetic upstream classification set.

use super::common::DeviceArgs;
use super::progress::Progress;
use gps_seg::sam::SamConfig;
use gps_seg::train::pretrain::sam::{pretrain, PretrainConfig};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Pretrain a SAM (default: the `tiny` preset) → <out>.safetensors + <out>.json.
    Sam(SamArgs),
    /// Pretrain the vit_tiny classifier on the synthetic upstream set → <out>.safetensors +
    /// <out>.json (ClassifierConfig); checkpoints in <out>.run/.
    Vit(VitArgs),
}

#[derive(Debug, clap::Args)]
pub struct VitArgs {
    /// Output stem.
    #[arg(long, default_value = "sam/vit-tiny")]
    pub out: PathBuf,
    /// Input size (the synthetic images are generated at this size).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    /// Upstream training images per class (56 classes).
    #[arg(long, default_value_t = 30)]
    pub per_class: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the upstream set is generated (default data/synth-cls-upstream-s<seed>).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Continue from <out>.run/'s last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, clap::Args)]
pub struct SamArgs {
    /// SAM preset to pretrain.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Input size (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Validation scenes per evaluation.
    #[arg(long, default_value_t = 64)]
    pub val_scenes: usize,
    /// Output stem: writes <out>.safetensors, <out>.json and checkpoints in <out>.run/.
    #[arg(long, default_value = "sam/sam-tiny")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 4e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate and checkpoint every N steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Continue from <out>.run/'s last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Vit(a) => {
            use gps_seg::models::{ClassifierConfig, VitConfig};
            use gps_seg::train::pretrain::vit::{pretrain_vit, PretrainVitConfig};
            let device = a.device.resolve()?;
            let data_dir = a
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("data/synth-cls-upstream-s{}", a.seed)));
            let mut cfg = PretrainVitConfig::new(data_dir);
            cfg.model = ClassifierConfig::Vit(VitConfig::tiny().with_image_size(a.image_size));
            cfg.epochs = a.epochs;
            cfg.warmup_epochs = (a.epochs / 8).max(1).min(a.epochs.saturating_sub(1));
            cfg.per_class = a.per_class;
            cfg.batch_size = a.batch_size;
            cfg.lr = a.lr;
            cfg.seed = a.seed;
            let mut p = Progress::new(a.quiet);
            let s = pretrain_vit(&cfg, &a.out, &device, a.resume, &mut p)?;
            println!();
            println!("{}", super::train::cls_table_header());
            println!("{}", super::train::cls_table_row(&s.run));
            println!(
                "pretrained {} epochs on {} upstream images ({} classes) in {:.0}s \
                 (+{:.0}s data); upstream held-out top-1: best {:.2}%, last {:.2}% ({} images)",
                cfg.epochs,
                s.run.train_images,
                cfg.classes,
                s.run.seconds,
                s.data_seconds,
                100.0 * s.run.best_acc,
                100.0 * s.run.last_acc,
                s.run.test_images
            );
            println!("→ {} + {}", s.weights.display(), s.config_file.display());
            Ok(())
        }
        What::Sam(a) => {
            let device = a.device.resolve()?;
            let mut sam = SamConfig::preset(&a.config)?;
            if let Some(s) = a.image_size {
                sam = sam.with_image_size(s);
            }
            let mut cfg = PretrainConfig::new(sam);
            cfg.val_scenes = a.val_scenes;
            cfg.steps = a.steps;
            cfg.batch_size = a.batch_size;
            cfg.lr = a.lr;
            cfg.seed = a.seed;
            cfg.eval_every = a.eval_every;
            cfg.warmup = (a.steps / 20).max(1);
            let mut p = Progress::new(a.quiet);
            let s = pretrain(&cfg, &a.out, &device, a.resume, &mut p)?;
            println!("| step | mean loss | prompt-free IoU | point IoU | box IoU |");
            println!("|---|---|---|---|---|");
            for (step, loss, r) in &s.history {
                println!(
                    "| {step} | {loss:.4} | {:.4} | {:.4} | {:.4} |",
                    r.prompt_free_miou, r.point_miou, r.box_miou
                );
            }
            println!(
                "pretrained {} steps in {:.0}s → {}",
                s.steps,
                s.seconds,
                s.weights.display()
            );
            Ok(())
        }
    }
}
