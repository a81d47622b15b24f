//! `gps-seg train`: fine-tune SAM on a Kvasir-shaped folder, or a classifier (`--task classify`).

use super::common::{DeviceArgs, DtypeArgs};
use super::progress::Progress;
use anyhow::Context;
use gps_seg::data::classification::ClsLayout;
use gps_seg::data::pranet::SegLayout;
use gps_seg::data::prompts::PromptKind;
use gps_seg::data::resize::Resize;
use gps_seg::gps::select::Level;
use gps_seg::train::cls::{self, ClsTrainConfig, SelectLoss};
use gps_seg::train::config::{Method, TrainCore};
use gps_seg::train::seg::{self, SegTrainConfig};
use gps_seg::util::fs::IoPaths;
use std::path::PathBuf;

/// `--task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskKind {
    /// SAM on Kvasir-shaped data.
    Seg,
    /// A ViT / ConvNeXt classifier.
    #[value(alias = "cls")]
    Classify,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Task: seg (SAM on Kvasir-shaped data) or classify.
    #[arg(long, value_enum, default_value = "seg")]
    pub task: TaskKind,
    /// Dataset kind: kvasir or pranet (seg; pranet: train on TrainDataset/, validation carved
    /// from it, every TestDataset/<Set> present scored per set); vtab, imagefolder, cifar100,
    /// fgvc (classify).
    #[arg(long, default_value = "kvasir")]
    pub data: String,
    /// Dataset folder. For kvasir without it: data/Kvasir-SEG if present, else a synthetic set
    /// generated once under data/synth-kvasir.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Model. seg: a preset (tiny = the shipped pretrained sam-tiny) or a checkpoint path
    /// (.safetensors or an official .pth). classify: vit_tiny (the shipped sam/vit-tiny),
    /// convnext_tiny, vit_b16, convnext_b, or a checkpoint path. Default: tiny / vit_tiny.
    #[arg(long)]
    pub model: Option<String>,
    /// classify: architecture of a checkpoint path without a `<stem>.json` beside it.
    #[arg(long)]
    pub arch: Option<String>,
    /// classify: start the preset from fresh random weights (no checkpoint).
    #[arg(long)]
    pub random_init: bool,
    /// classify, VTAB-1k: the protocol's final stage — train on train800val200 and ship the
    /// last epoch, scored on test (choose settings first without it: train800 → val200).
    #[arg(long = "final")]
    pub final_stage: bool,
    /// Input size override (pos_embed and rel_pos tables are resized at load).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// seg: gps | full | decoder | random | magnitude | zero-shot.
    /// classify: gps | full | linear | bias | random | magnitude.
    #[arg(long, value_enum, default_value = "gps")]
    pub method: Method,
    /// classify, GPS: the selection loss, supcon (head-free, the recipe; default) or ce
    /// (through the fresh head, the paper's ablation).
    #[arg(long, value_enum)]
    pub select_loss: Option<SelectLoss>,
    /// Entries selected per neuron (GPS K).
    #[arg(long, default_value_t = 1)]
    pub topk: usize,
    /// Selection level: neuron (GPS), layer or net (same budget).
    #[arg(long, value_enum, default_value = "neuron")]
    pub level: Level,
    /// Epochs (seg default 20; classify 100).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// classify: linear warm-up epochs (default 10, at most epochs − 1).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Peak learning rate, cosine to --min-lr (seg default 2e-4 per epoch; classify 1e-3 per
    /// step after warm-up).
    #[arg(long)]
    pub lr: Option<f64>,
    /// seg default 1e-7; classify 1e-8 (a default above --lr is lowered to --lr).
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// seg default 1; classify 32.
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// At most this many training batches for the selection gradients; default: the whole
    /// training split, one pass (as the paper accumulates over the training data).
    #[arg(long)]
    pub select_batches: Option<usize>,
    /// seg: squash (reference; default) or pad (SAM's longest side + pad).
    #[arg(long, value_enum)]
    pub resize: Option<Resize>,
    /// Use at most N training images (quick runs).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use at most N test images (quick runs).
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Cap optimiser steps per epoch (quick runs; at least 1).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Run folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Data parallel over several processes: `mpi` (start with `mpirun -np N` or `srun`;
    /// needs a build with `--features mpi`). --batch-size stays the global batch; rank 0
    /// writes the run folder. `nccl` is not implemented. A process started by a launcher as
    /// one of several refuses to run without this flag.
    #[arg(long, value_enum, default_value = "none")]
    pub distributed: gps_seg::dist::Backend,
    /// Only plain progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// seg: recompute SAM encoder blocks in the training steps' backward (less memory, same
    /// gradients; large inputs). The selection pass always recomputes them.
    #[arg(long)]
    pub checkpoint_blocks: bool,
    /// seg: leave out the image/mask pairs with a problem (listed in <out>/skipped.txt)
    /// instead of refusing the data folder.
    #[arg(long)]
    pub skip_bad: bool,
    /// Validation share carved (seeded) from the training data when the data has no
    /// validation split; the best epoch is chosen on it, never on the test split.
    #[arg(long, default_value_t = gps_seg::train::config::default_val_fraction())]
    pub val_fraction: f64,
    /// Largest image accepted, in pixels (width × height), checked from the header.
    #[arg(long, default_value_t = gps_seg::data::imgio::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// seg: prompted fine-tuning (prompts sampled from the ground truth).
    #[command(flatten)]
    pub prompt: super::common::PromptArgs,
}

/// Refuse the flags that do not apply to the chosen task (instead of ignoring them).
fn refuse_foreign_flags(args: &Args) -> anyhow::Result<()> {
    let foreign: Vec<&str> = match args.task {
        TaskKind::Seg => [
            (args.select_loss.is_some(), "--select-loss"),
            (args.warmup_epochs.is_some(), "--warmup-epochs"),
            (args.arch.is_some(), "--arch"),
            (args.random_init, "--random-init"),
            (args.final_stage, "--final"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect(),
        TaskKind::Classify => [
            (args.checkpoint_blocks, "--checkpoint-blocks"),
            (args.resize.is_some(), "--resize"),
            (args.prompt.prompt != PromptKind::None, "--prompt"),
            (args.prompt.points.is_some(), "--points"),
            (args.prompt.neg_points.is_some(), "--neg-points"),
            (args.prompt.prompt_jitter.is_some(), "--prompt-jitter"),
            (args.skip_bad, "--skip-bad"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect(),
    };
    if let Some(first) = foreign.first() {
        let (task, other) = match args.task {
            TaskKind::Seg => ("seg", "classify"),
            TaskKind::Classify => ("classify", "seg"),
        };
        anyhow::bail!(
            "{first}: applies to `--task {other}` only, not to `--task {task}`{}",
            if foreign.len() > 1 {
                format!(" (also {})", foreign[1..].join(", "))
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    refuse_foreign_flags(&args)?;
    gps_seg::data::imgio::set_max_pixels(args.max_pixels)?;
    // Before any work: the process's world (one process, or the ranks of `mpirun`).
    let world = gps_seg::dist::init(args.distributed)?;
    let r = match args.task {
        TaskKind::Classify => run_classify(args),
        TaskKind::Seg => run_seg(args),
    };
    world.exit_on_error(r)
}

/// The run's progress: rank 0 reports, the other ranks of a data-parallel run stay silent.
fn observer(quiet: bool) -> Box<dyn gps_seg::progress::Observer> {
    match gps_seg::dist::world().is_root() {
        true => Box::new(Progress::new(quiet)),
        false => Box::new(gps_seg::progress::Silent),
    }
}

/// `--task seg`: flags → [`SegTrainConfig`] → [`seg::train`] → the summary table.
fn run_seg(args: Args) -> anyhow::Result<()> {
    let layout = match args.data.as_str() {
        "kvasir" => SegLayout::Kvasir,
        "pranet" => SegLayout::Pranet,
        d => anyhow::bail!("--data {d}: segmentation supports `kvasir` and `pranet`"),
    };
    if layout == SegLayout::Pranet && args.data_dir.is_none() {
        anyhow::bail!(
            "--data pranet needs --data-dir (a PraNet-layout root; `gps-seg data synth-pranet` \
             makes a synthetic one)"
        );
    }
    let device = args.device.resolve()?;
    let dtype = args.dtype.resolve(&device)?;
    let mut progress = observer(args.quiet);
    let (base, sam) =
        super::common::resolve_sam(args.model.as_deref().unwrap_or("tiny"), args.image_size)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let prompt = match args.prompt.prompt {
            PromptKind::None => String::new(),
            k => format!("-{}", k.name().replace('+', "-")),
        };
        PathBuf::from("runs").join(format!(
            "{}-{}-k{}{prompt}",
            sam.name,
            args.method.name(),
            args.topk
        ))
    });
    if let Some(d) = &args.data_dir {
        IoPaths::new()
            .input("--data-dir", d)
            .input_opt("--model", base.as_ref())
            .output("--out", &out)
            .check()?;
    }
    // A synthetic set is generated by rank 0 alone; the other ranks then find it.
    let data_dir = gps_seg::dist::root_first(gps_seg::dist::world(), || {
        super::common::kvasir_dir(args.data_dir.clone(), args.seed, &mut *progress)
    })?;
    let mut cfg = SegTrainConfig::recipe(data_dir, base, sam);
    cfg.data = layout;
    set_core(&mut cfg.core, &args);
    cfg.resize = args.resize.unwrap_or(cfg.resize);
    cfg.checkpoint_blocks = args.checkpoint_blocks;
    cfg.skip_bad = args.skip_bad;
    cfg.dtype = dtype;
    cfg.prompt = args.prompt.spec()?;
    gps_seg::train::fit::set_elementwise_pool(&cfg, false);
    let s = seg::train(&cfg, &out, &device, args.resume, &mut *progress)
        .with_context(|| format!("training run {}", out.display()))?;
    if gps_seg::dist::world().is_root() {
        print_summary(&s);
    }
    Ok(())
}

/// The flags every task shares, onto the recipe's core (the default `min_lr` is lowered to
/// `--lr` when that is smaller; an explicit `--min-lr` above `--lr` is refused by validation).
fn set_core(core: &mut TrainCore, args: &Args) {
    core.method = args.method;
    core.topk = args.topk;
    core.level = args.level;
    core.epochs = args.epochs.unwrap_or(core.epochs);
    core.lr = args.lr.unwrap_or(core.lr);
    core.min_lr = core.min_lr_or_default(args.min_lr);
    core.batch_size = args.batch_size.unwrap_or(core.batch_size);
    core.seed = args.seed;
    core.select_batches = args.select_batches;
    core.val_fraction = args.val_fraction;
    core.train_limit = args.train_limit;
    core.test_limit = args.test_limit;
    core.max_steps_per_epoch = args.max_steps;
}

/// `--task classify`: flags → [`ClsTrainConfig`] → [`cls::train`] → the summary table.
fn run_classify(args: Args) -> anyhow::Result<()> {
    if args.dtype.parse()?.is_low() {
        anyhow::bail!(
            "--dtype {}: only `--task seg` (SAM's image encoder) has a bf16/f16 path",
            args.dtype.dtype
        );
    }
    let data_dir = args
        .data_dir
        .clone()
        .context("--task classify needs --data-dir (a VTAB, FGVC, CIFAR-100 or ImageFolder root; `gps-seg data synth-cls` makes one)")?;
    let layout = match args.data.as_str() {
        "kvasir" => ClsLayout::detect(&data_dir)?,
        other => other.parse::<ClsLayout>()?,
    };
    let (base, model) = gps_seg::registry::resolve_classifier(
        args.model.as_deref().unwrap_or("vit_tiny"),
        args.arch.as_deref(),
        args.random_init,
    )?;
    let model = match (model, args.image_size) {
        (gps_seg::models::ClassifierConfig::Vit(c), Some(s)) => {
            gps_seg::models::ClassifierConfig::Vit(c.with_image_size(s))
        }
        (m, Some(_)) => anyhow::bail!(
            "--image-size is only supported for ViT models ({})",
            m.name()
        ),
        (m, None) => m,
    };
    let mut cfg = ClsTrainConfig::recipe(data_dir, layout, base, model);
    set_core(&mut cfg.core, &args);
    cfg.select_loss = args.select_loss.unwrap_or(cfg.select_loss);
    cfg.final_stage = args.final_stage;
    cfg.warmup_epochs = args
        .warmup_epochs
        .unwrap_or(cfg.warmup_epochs)
        .min(cfg.epochs.saturating_sub(1));
    let device = args.device.resolve()?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-{}-k{}",
            cfg.model.name(),
            cfg.label(),
            cfg.topk
        ))
    });
    let mut progress = observer(args.quiet);
    gps_seg::train::fit::set_elementwise_pool(&cfg, false);
    let s = cls::train(&cfg, &out, &device, args.resume, &mut *progress)
        .with_context(|| format!("training run {}", out.display()))?;
    if !gps_seg::dist::world().is_root() {
        return Ok(());
    }
    println!();
    println!("{}", cls_table_header());
    println!("{}", cls_table_row(&s));
    println!();
    println!("run folder: {}", s.run_dir.display());
    println!(
        "merged weights: {} (config: model.json)",
        s.merged.display()
    );
    Ok(())
}

/// Header of the classification summary table.
pub fn cls_table_header() -> String {
    "| method | K | trainable | % | epoch (chosen on val) | val top-1 | test top-1 at that epoch | test top-1, last epoch | time | s/step | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|".into()
}

/// One row of the classification summary table.
pub fn cls_table_row(s: &cls::ClsRunSummary) -> String {
    format!(
        "| {} | {} | {} | {:.3}% | {} | {:.2}% | {:.2}% | {:.2}% | {:.0}s | {:.3} | {:.0} MB |",
        s.method,
        s.topk,
        s.trainable,
        s.trainable_pct,
        s.best_epoch.map_or("-".into(), |e| e.to_string()),
        100.0 * s.val_acc,
        100.0 * s.best_acc,
        100.0 * s.last_acc,
        s.seconds,
        s.seconds_per_step,
        s.peak_rss_mb
    )
}

/// The end-of-run table.
pub fn print_summary(s: &seg::RunSummary) {
    println!();
    println!("| method | trainable | % | epoch (chosen on val) | val mDice | test mDice | test mIoU | test ref. Dice (bg ignored) | time | s/step | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.3}% | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.0}s | {:.3} | {:.0} MB |",
        s.method,
        s.trainable,
        s.trainable_pct,
        s.best_epoch.map_or("-".into(), |e| e.to_string()),
        s.val.mdice,
        s.best.mdice,
        s.best.miou,
        s.best.ref_dice_ignore_bg,
        s.seconds,
        s.seconds_per_step,
        s.peak_rss_mb
    );
    if !s.test_sets.is_empty() {
        println!();
        println!(
            "test sets at epoch {} (chosen on val; the test sets chose nothing):",
            s.best_epoch.map_or("-".into(), |e| e.to_string())
        );
        println!("{}", sets_table(&s.test_sets));
    }
    println!();
    println!("run folder: {}", s.run_dir.display());
    if let Some(m) = &s.merged {
        println!("merged weights: {}", m.display());
    }
}

/// A per-set table (the polyp papers' columns) in Markdown.
pub fn sets_table(rows: &[gps_seg::metrics::SetRow]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let names: Vec<&str> = first.columns().iter().map(|(n, _)| *n).collect();
    let mut t = format!("| set | images | {} |\n", names.join(" | "));
    t.push_str(&format!("|---|---|{}\n", "---|".repeat(names.len())));
    for r in rows {
        let v: Vec<String> = r.columns().iter().map(|(_, v)| format!("{v:.4}")).collect();
        t.push_str(&format!(
            "| {} | {} | {} |\n",
            r.set,
            r.images,
            v.join(" | ")
        ));
    }
    t.pop();
    t
}
