//! `gps-seg infer`: batch segmentation of an image folder (or a training run's held-out split)
//! with ONNX Runtime or the Candle SAM; masks + overlays at each image's original resolution,
//! and mDice/mIoU when ground-truth masks are given; with `--save-probs` (implied for a PraNet
//! run) the 8-bit probability maps and the polyp tables' metrics per set, scored from them.
//! What the flags decide is [`gps_seg::infer::InferPlan`]'s.

use super::common::{parse_resize, DeviceArgs};
use super::progress::Progress;
use anyhow::{bail, Context};
use gps_seg::data::pranet::SegLayout;
use gps_seg::data::prompts::PromptKind;
use gps_seg::infer::{
    self, input, CandleEngine, Engine, InferOptions, InferPlan, InferReport, JobPrompts, OrtEngine,
    PromptedOrtEngine, RunFolder,
};
use gps_seg::progress::{Event, Observer};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// ONNX Runtime on an exported prompt-free graph.
    Ort,
    /// The Candle SAM (for comparison).
    Candle,
}

impl EngineKind {
    /// The engine's name as in `<run>/infer-<name>` (= [`Engine::name`]).
    fn dir_name(self) -> &'static str {
        match self {
            EngineKind::Ort => "onnxruntime",
            EngineKind::Candle => "candle",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Exported ONNX model (`image[N,3,S,S]` → `mask_logits[N,1,S,S]`). With --run: default
    /// `<run>/model.onnx`, exported from the run's merged weights when missing.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Folder of images (jpg/jpeg/png, any size).
    #[arg(long, required_unless_present = "run", conflicts_with = "run")]
    pub images: Option<PathBuf>,
    /// Ground-truth masks with the same file stems (Kvasir layout; thresholded at 128):
    /// adds per-image Dice/IoU (`scores.csv`) and mDice/mIoU.
    #[arg(long, requires = "images")]
    pub masks: Option<PathBuf>,
    /// Evaluate a training run folder's held-out split with its own model and settings.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Dataset layout of --run (default: the run's; kvasir or pranet — a PraNet run scores
    /// every test set present, per set).
    #[arg(long, value_enum, requires = "run")]
    pub data: Option<SegLayout>,
    /// Use this data folder instead of the one in the run's config.json.
    #[arg(long, requires = "run")]
    pub data_dir: Option<PathBuf>,
    /// Output folder (masks/, overlays/, scores.csv, report.json). With --run: default
    /// `<run>/infer-<engine>`.
    #[arg(long, required_unless_present = "run")]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Probability threshold for the masks (default 0.5, or the run's).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// squash (GPS reference) or pad (SAM's longest side + padding). Default squash, or the run's.
    #[arg(long)]
    pub resize: Option<String>,
    /// libonnxruntime.so to use (otherwise searched, and fetched once when missing).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Skip (and list) unreadable images instead of stopping before writing anything.
    #[arg(long)]
    pub skip_bad: bool,
    /// Largest image accepted, in pixels (width × height), checked from the header before
    /// decoding.
    #[arg(long, default_value_t = gps_seg::data::imgio::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Run only shard I of N (0 ≤ I < N): input i goes to shard i mod N, so N jobs cover every
    /// input once; `gps-seg report merge` joins their reports. Default: from
    /// SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (minus SLURM_ARRAY_TASK_MIN) when set.
    #[arg(long)]
    pub shard: Option<String>,
    /// Don't write overlays/.
    #[arg(long)]
    pub no_overlays: bool,
    /// Also write probs/<id>.png (the probability map, 8-bit grey at each image's resolution)
    /// and, with ground truth, score the polyp tables' metrics (mDice, mIoU, Fβʷ, Sα, Eφ mean /
    /// max / adaptive, MAE) from exactly those saved values, per set. Implied for a PraNet run.
    #[arg(long)]
    pub save_probs: bool,
    #[arg(long, value_enum, default_value = "ort")]
    pub engine: EngineKind,
    /// --engine candle: weights (.safetensors/.pth). With --run: the run's merged weights.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// --engine candle: SAM preset name or config.json. With --run: the run's.
    #[arg(long)]
    pub config: Option<String>,
    /// The prompted decoder graph (`gps-seg export --prompted` writes it as
    /// `<stem>_decoder.onnx`); --model is then the image encoder. A prompted --run uses its own
    /// pair (`<run>/model_prompted*.onnx`, exported on first use).
    #[arg(long)]
    pub decoder: Option<PathBuf>,
    /// Prompts per image: JSON `{"<id>": [{"box": [x0,y0,x1,y1], "points": [[x,y]],
    /// "labels": [1]}]}` or CSV rows `id,box,x0,y0,x1,y1` / `id,pos|neg,x,y`, in original
    /// pixel coordinates. Every id must name an image and every prompt lie inside its image
    /// (0 ≤ x ≤ width, 0 ≤ y ≤ height), as `serve` requires; nothing is clamped.
    #[arg(long, conflicts_with = "prompt_from_masks")]
    pub prompts: Option<PathBuf>,
    /// Sample the prompts from the ground-truth masks (evaluation), with the fixed per-image
    /// generator of --prompt-seed: a prompted --run's own settings reproduce its evaluation.
    #[arg(long)]
    pub prompt_from_masks: bool,
    /// Seed of --prompt-from-masks (default: the run's seed, else 42).
    #[arg(long)]
    pub prompt_seed: Option<u64>,
    #[command(flatten)]
    pub prompt: super::common::PromptArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Replace files of an earlier job in --out (masks, overlays, reports); without it a job
    /// never replaces a file it did not write itself.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The prompts of a prompted job: the file, or sampled from the masks (the flags' spec, else
/// a prompted run's; the seed from --prompt-seed, else the run's, else 42). A prompted run
/// without either flag is evaluated with its own prompts from the masks.
fn job_prompts(args: &Args, run: Option<&RunFolder>) -> anyhow::Result<JobPrompts> {
    if let Some(p) = &args.prompts {
        if args.prompt.prompt != PromptKind::None {
            bail!("--prompt: sampling settings do not apply to --prompts FILE");
        }
        return Ok(JobPrompts::File(gps_seg::data::prompts::read_prompt_file(
            p,
        )?));
    }
    let run_spec = run.map(|r| r.view.prompt).filter(|p| p.is_prompted());
    if !args.prompt_from_masks && run_spec.is_none() {
        bail!("the prompted graphs need prompts: give --prompts FILE or --prompt-from-masks");
    }
    let spec = if args.prompt.prompt != PromptKind::None {
        args.prompt.spec()?
    } else {
        run_spec.context(
            "--prompt-from-masks needs --prompt box|points|box+points (or a prompted --run)",
        )?
    };
    let seed = args.prompt_seed.or(run.map(|r| r.view.seed)).unwrap_or(42);
    Ok(JobPrompts::FromMasks { spec, seed })
}

/// The paths and options of the flags, for the library's decisions ([`InferPlan`]).
fn plan_of(args: &Args) -> anyhow::Result<InferPlan> {
    Ok(InferPlan {
        model: args.model.clone(),
        decoder: args.decoder.clone(),
        prompts: args.prompts.clone(),
        checkpoint: args.checkpoint.clone(),
        config: args.config.clone(),
        images: args.images.clone(),
        masks: args.masks.clone(),
        out: args.out.clone(),
        resize: args.resize.as_deref().map(parse_resize).transpose()?,
        threshold: args.threshold,
        data: args.data,
        save_probs: args.save_probs,
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    gps_seg::data::imgio::set_max_pixels(args.max_pixels)?;
    let mut progress = Progress::new(args.quiet);
    let plan = plan_of(&args)?;
    let run = args.run.as_deref().map(RunFolder::open).transpose()?;
    plan.check_layout(run.as_ref())?;

    // Inputs first: a bad input stops the job before a model is loaded or anything written.
    let inputs = match (&run, &args.images) {
        (Some(r), _) => r.test_inputs(args.data_dir.as_deref())?,
        (None, Some(dir)) => {
            let (c, bad) = input::from_folders(dir, args.masks.as_deref())?;
            input::check(c, bad)
        }
        (None, None) => bail!("give --images DIR or --run RUN"),
    };
    inputs.require_clean(args.skip_bad)?;

    let run_prompted = run.as_ref().is_some_and(|r| r.view.prompt.is_prompted());
    let prompted = args.decoder.is_some()
        || args.prompts.is_some()
        || args.prompt_from_masks
        || args.prompt.prompt != PromptKind::None
        || run_prompted;
    if prompted && args.engine != EngineKind::Ort {
        bail!("prompted inference runs the exported prompted graphs: use --engine ort");
    }
    let job_prompts = if prompted {
        Some(job_prompts(&args, run.as_ref())?)
    } else {
        None
    };
    let out = plan.out(run.as_ref(), args.engine.dir_name(), prompted)?;
    // The output folder may not equal, contain or sit inside anything this job reads; per file
    // from here on, no write follows a link into an input, and none replaces a file of an
    // earlier job unless --overwrite.
    plan.io_paths(run.as_ref(), &inputs, &out)
        .enforce(args.overwrite)?;

    let engine = load_engine(&args, run.as_ref(), prompted, &mut progress)?;
    progress.event(Event::Info(engine.describe()));

    let shard = match &args.shard {
        Some(s) => Some(infer::job::Shard::parse(s)?),
        None => infer::job::Shard::from_slurm_env()?,
    };
    if let Some(s) = shard {
        progress.event(Event::Info(format!(
            "shard {}/{}: every {}th input from number {}",
            s.index, s.count, s.count, s.index
        )));
    }
    let opts = InferOptions {
        shard,
        out,
        batch_size: args.batch_size,
        threshold: plan.threshold(run.as_ref()),
        resize: plan.resize(run.as_ref()),
        skip_bad: args.skip_bad,
        overlays: !args.no_overlays,
        prompts: job_prompts,
        save_probs: plan.save_probs(run.as_ref()),
        set_name: plan.set_name(),
    };
    let (r, _) =
        infer::infer(engine.as_ref(), &inputs, &opts, &mut progress).context("inference failed")?;
    print_report(&r, &opts, args.run.as_deref())
}

/// The engine the flags ask for: ONNX Runtime on a prompt-free graph or on the prompted pair,
/// or the Candle SAM; a `--run` supplies (and exports, when stale) what is not given.
fn load_engine(
    args: &Args,
    run: Option<&RunFolder>,
    prompted: bool,
    progress: &mut Progress,
) -> anyhow::Result<Box<dyn Engine>> {
    let threads = args.device.threads.unwrap_or(0);
    let ort_lib = args.ort_lib.as_deref();
    Ok(match args.engine {
        EngineKind::Ort if prompted => {
            let (enc, dec) = match (&args.model, &args.decoder, run) {
                (Some(m), Some(d), _) => (m.clone(), d.clone()),
                (None, None, Some(r)) => r.ensure_prompted_onnx(progress)?,
                _ => bail!(
                    "prompted inference needs --model ENCODER.onnx and --decoder DECODER.onnx \
                     (`gps-seg export --prompted`), or a --run RUN"
                ),
            };
            Box::new(PromptedOrtEngine::load(
                &enc, &dec, threads, ort_lib, progress,
            )?)
        }
        EngineKind::Ort => {
            let model = match (&args.model, run) {
                (Some(m), _) => m.clone(),
                (None, Some(r)) => r.ensure_onnx(progress)?,
                (None, None) => bail!("--engine ort needs --model model.onnx (or --run RUN)"),
            };
            Box::new(OrtEngine::load(&model, threads, ort_lib, progress)?)
        }
        EngineKind::Candle => {
            let weights = match (&args.checkpoint, run) {
                (Some(c), _) => c.clone(),
                (None, Some(r)) => r.weights()?,
                (None, None) => bail!("--engine candle needs --checkpoint (or --run RUN)"),
            };
            let cfg = match (&args.config, run) {
                (Some(c), _) if std::path::Path::new(c).is_file() => {
                    gps_seg::sam::files::read_config(std::path::Path::new(c))?
                }
                (Some(c), _) => gps_seg::sam::SamConfig::preset(c)?,
                (None, Some(r)) => r.view.sam.clone(),
                (None, None) => bail!("--engine candle needs --config (a preset or config.json)"),
            };
            let device = args.device.resolve()?;
            // Batches of two or more run one chunk per thread (`nn::split_forward`).
            gps_seg::util::threads::elementwise_pool_for(
                args.batch_size >= 2,
                cfg.encoder_values_per_image(),
            );
            Box::new(CandleEngine::load(&weights, &cfg, &device)?)
        }
    })
}

/// What the job did, on stdout.
fn print_report(
    r: &InferReport,
    opts: &InferOptions,
    run_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    println!(
        "{} images ({} skipped) with {} at {}×{} ({}, batch {}), threshold {}",
        r.images,
        r.skipped.len(),
        r.engine,
        r.input_size,
        r.input_size,
        r.resize,
        r.batch_size,
        r.threshold
    );
    for s in &r.skipped {
        println!("  skipped {}: {}", s.path.display(), s.reason);
    }
    if let Some(m) = &r.metrics {
        println!(
            "mDice {:.4}  mIoU {:.4}  (per image at the original resolution, FP counted)",
            m.mdice, m.miou
        );
        println!(
            "  GPS reference convention (pooled, background ignored): Dice {:.4}  IoU {:.4}",
            m.ref_dice_ignore_bg, m.ref_iou_ignore_bg
        );
        if let Some(rd) = run_dir {
            if let Some((d, i)) = infer::run::training_best(rd)? {
                println!(
                    "  training's evaluation (summary.json best): mDice {d:.4}  mIoU {i:.4}  (Δ mDice {:+.2e})",
                    m.mdice - d
                );
            }
        }
    }
    if !r.sets.is_empty() {
        println!();
        println!("{}", super::train::sets_table(&r.sets));
    }
    println!(
        "throughput {:.2} images/s end to end ({:.2} images/s in the model); peak memory {:.0} MB (VmHWM)",
        r.images_per_s, r.model_images_per_s, r.peak_rss_mb
    );
    println!(
        "wrote {}/masks/, {}{}report.json{}",
        r.out.display(),
        if opts.overlays { "overlays/, " } else { "" },
        if opts.save_probs { "probs/, " } else { "" },
        if r.metrics.is_some() {
            ", scores.csv"
        } else {
            ""
        }
    );
    Ok(())
}
