//! `gps-seg experiment classify`: GPS against its baselines on a downstream synthetic set,
//! from the shipped pretrained `sam/vit-tiny` → a markdown table and a bar chart.

use super::common::{DeviceArgs, DtypeArgs};
use super::progress::Progress;
use gps_seg::registry::resolve_classifier as resolve_model;
use gps_seg::studies::classify::{run_classify, ClsExperimentConfig};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// linear / bias / full / GPS K=1, K=2 / random / magnitude / CE-selection on one
    /// downstream set → <out>/table.md, results.json, accuracy.png and a run folder each.
    Classify(ClassifyArgs),
    /// zero-shot / decoder / full / GPS K=1,2,4 / random / magnitude on a Kvasir-shaped set
    /// (synthetic unless --data-dir) → <out>/table.md, results.json, mdice.png.
    Kvasir(KvasirArgs),
}

#[derive(Debug, clap::Args)]
pub struct KvasirArgs {
    /// Base SAM: a preset with shipped weights (tiny) or a checkpoint path.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Kvasir-shaped folder (default: the demo's synthetic set, generated when missing).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "runs/experiment-kvasir")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Learning rate of the sparse and decoder variants (full uses lr/5).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// The first seed (seeds are seed, seed+1, …; the data split is always made with this one).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Seeds per variant (mean ± std and paired bootstrap intervals over them).
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Training-set sizes, comma-separated counts or `all` (the low-data axis), e.g. 16,64,all.
    #[arg(long, default_value = "all")]
    pub train_sizes: String,
    /// Only these variants (comma-separated labels, e.g. gps-k1,full).
    #[arg(long)]
    pub only: Option<String>,
    /// Replace variant folders in --out that hold another setting (otherwise they are
    /// refused, never deleted; an unfinished run with the same settings resumes).
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
}

fn run_kvasir(a: KvasirArgs) -> anyhow::Result<()> {
    use gps_seg::studies::kvasir::{default_variants, run_kvasir};
    use gps_seg::train::seg::SegTrainConfig;
    let device = a.device.resolve()?;
    let dtype = a.dtype.resolve(&device)?;
    let mut p = Progress::new(a.quiet);
    let data_dir = match a.data_dir.clone() {
        Some(d) => d,
        None => {
            let demo = gps_seg::pipeline::DemoConfig::standard();
            gps_seg::pipeline::ensure_data(&demo, &mut p)?;
            demo.data_dir
        }
    };
    let (base, sam) = super::common::resolve_sam(&a.model, None)?;
    let mut t = SegTrainConfig::recipe(data_dir, base, sam);
    t.epochs = a.epochs;
    t.batch_size = a.batch_size;
    t.seed = a.seed;
    t.select_batches = None;
    t.dtype = dtype;
    let mut variants = default_variants(a.lr);
    if let Some(only) = &a.only {
        gps_seg::studies::grid::keep_only(&mut variants, only, |v| &v.label)?;
    }
    let sizes = gps_seg::studies::kvasir::parse_sizes(&a.train_sizes)?;
    // The pool as the grid's first runs want it (the template's batching).
    gps_seg::train::fit::set_elementwise_pool(&t, false);
    let (_, table) = run_kvasir(
        &t,
        &variants,
        a.seeds,
        &sizes,
        &a.out,
        a.overwrite,
        &device,
        &mut p,
    )?;
    println!();
    println!("{table}");
    println!(
        "written: {}, {}, {}",
        a.out.join("table.md").display(),
        a.out.join("results.json").display(),
        a.out.join("mdice.png").display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// Pretrained backbone: vit_tiny (the shipped sam/vit-tiny) or a checkpoint path.
    #[arg(long, default_value = "vit_tiny")]
    pub model: String,
    /// Experiment folder.
    #[arg(long, default_value = "runs/experiment-classify")]
    pub out: PathBuf,
    /// Downstream set folder (generated when missing).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub classes: usize,
    /// Train+val images per class.
    #[arg(long, default_value_t = 32)]
    pub per_class: usize,
    #[arg(long, default_value_t = 16)]
    pub test_per_class: usize,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The first seed (seeds are seed, seed+1, …; the test set is the same for all).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Seeds per variant (mean ± std and paired bootstrap intervals over them).
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Training-set sizes, comma-separated counts or `all` (the low-data axis), e.g. 32,all.
    #[arg(long, default_value = "all")]
    pub train_sizes: String,
    /// Only these variants (comma-separated labels, e.g. gps-k1,full).
    #[arg(long)]
    pub only: Option<String>,
    /// Replace variant folders in --out that hold another setting (otherwise they are
    /// refused, never deleted; an unfinished run with the same settings resumes).
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Kvasir(a) => run_kvasir(a),
        What::Classify(a) => {
            let (base, model) = resolve_model(&a.model, None, false)?;
            let base = base
                .ok_or_else(|| anyhow::anyhow!("the experiment needs a pretrained checkpoint"))?;
            let data_dir = a.data_dir.clone().unwrap_or_else(|| {
                PathBuf::from(format!(
                    "data/synth-cls-downstream-c{}-n{}-s{}",
                    a.classes, a.per_class, a.seed
                ))
            });
            let mut cfg = ClsExperimentConfig::new(base, model, data_dir);
            cfg.classes = a.classes;
            cfg.per_class = a.per_class;
            cfg.test_per_class = a.test_per_class;
            cfg.epochs = a.epochs;
            cfg.batch_size = a.batch_size;
            cfg.seed = a.seed;
            cfg.seeds = a.seeds;
            cfg.train_sizes = gps_seg::studies::kvasir::parse_sizes(&a.train_sizes)?;
            if let Some(only) = &a.only {
                gps_seg::studies::grid::keep_only(&mut cfg.variants, only, |v| &v.label)?;
            }
            let device = a.device.resolve()?;
            let mut p = Progress::new(a.quiet);
            let (_, table) = run_classify(&cfg, &a.out, a.overwrite, &device, &mut p)?;
            println!();
            println!("{table}");
            println!(
                "written: {}, {}, {}",
                a.out.join("table.md").display(),
                a.out.join("results.json").display(),
                a.out.join("accuracy.png").display()
            );
            Ok(())
        }
    }
}
