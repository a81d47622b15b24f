//! `gps-seg bench <what>`: speed and memory tables. Numbers are measured, never asserted in tests.

use crate::cli::common::{DeviceArgs, DtypeArgs};
use clap::Subcommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Data pipeline: images/s for decode + resize + augment of Kvasir-sized JPEGs.
    Data {
        /// Number of synthetic JPEGs to generate (in a temp dir, removed afterwards).
        #[arg(long, default_value_t = 48)]
        images: usize,
        /// Largest side of the JPEGs (Kvasir: 332×487 … 1920×1072).
        #[arg(long, default_value_t = 1280)]
        max_side: usize,
        /// Model input size S.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// squash or longest-side-pad.
        #[arg(long, default_value = "squash")]
        resize: String,
    },
    /// The field's segmentation metrics: milliseconds to score one image (mDice … Eφ, MAE,
    /// optionally HD95) at a given size, one thread.
    Metrics {
        /// Image side (square images).
        #[arg(long, default_value_t = 500)]
        size: usize,
        #[arg(long, default_value_t = 30)]
        images: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// GPS: selection time and optimizer-state size (GPS vs baselines).
    Gps(super::bench_gps::Args),
    /// SAM prompt-free forward and forward+backward time, with achieved GFLOP/s.
    Sam(SamArgs),
    /// Inference: images/s of ONNX Runtime vs Candle on the prompt-free SAM, with GFLOP/s.
    Infer(InferArgs),
    /// Export precisions side by side in ONNX Runtime: f32 vs int8 vs fp16 file size, ms per
    /// batch, ratio to f32, max |Δ logit| and (with --data) mDice.
    Export(ExportArgs),
    /// Training step: Candle full vs GPS step (vs PyTorch with --compare --python).
    Train(super::bench_train::Args),
    /// Data parallel: bytes all-reduced per step and step time, GPS vs full, on one process
    /// or the ranks of `mpirun … --distributed mpi`.
    Dp(super::bench_dp::Args),
    /// One base, many tasks: delta ONNX files vs merged models (size, session creation,
    /// parity, what ONNX Runtime runs) and Candle task switching (time, memory).
    Tasks(super::bench_tasks::Args),
    /// `gps-seg serve` under closed-loop load (N clients, fixed request count) for 1 vs 3
    /// tasks: throughput, p50/p95/p99 latency, errors, memory, and the serving overhead
    /// against plain ONNX Runtime on the same engine and images (batch 1, no HTTP).
    Serve(ServeArgs),
    /// Many GPS task files served on one base (`serve --tasks-dir`) against one merged model
    /// in one session: server RSS with 1, 10, 100… tasks loaded, the memory each task adds,
    /// and p50/p99 request latency of both, side by side.
    ServeTasks(ServeTasksArgs),
    /// Peak memory of whole runs (`train` with and without --checkpoint-blocks, `select`) on a
    /// random official-layout checkpoint, each in a child process.
    RunMemory(super::bench_memory::Args),
    /// f32 matrix products of the linear layers' shapes: one thread vs gemm's own threading
    /// (Candle's matmul) vs one block of rows per thread (the linear layers), GFLOP/s.
    Gemm(GemmArgs),
}

#[derive(Debug, clap::Args)]
pub struct GemmArgs {
    /// Shapes `m:k:n` (`[m × k] · [k × n]`), comma-separated. Default: SAM tiny@256 batch 1
    /// and ViT-B@512 linear layers.
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<gps_seg::bench::gemm::Shape>,
    /// Threads for the two threaded columns.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Timed rounds per cell (the median is shown).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

fn run_gemm(a: GemmArgs) -> anyhow::Result<()> {
    if a.threads == 0 || a.threads > 1024 || a.rounds == 0 || a.rounds > 1000 {
        anyhow::bail!("--threads must be in 1..=1024 and --rounds in 1..=1000");
    }
    let shapes = if a.shapes.is_empty() {
        gps_seg::bench::gemm::default_shapes()
    } else {
        a.shapes
    };
    let rows = gps_seg::bench::gemm::run(&shapes, a.threads, a.rounds)?;
    println!("{}", gps_seg::util::cpu::bench_header(a.threads));
    println!(
        "| m × k · k × n | 1 thread GFLOP/s | gemm Rayon({t}) (Candle's matmul) | rows split over {t} threads (linear layers) | split / Rayon |",
        t = a.threads
    );
    println!("|---|---:|---:|---:|---:|");
    for r in rows {
        let s = r.shape;
        println!(
            "| {} × {} · {} × {} | {:.1} | {:.1} | {:.1} | {:.2} |",
            s.m,
            s.k,
            s.k,
            s.n,
            r.one_thread,
            r.gemm_rayon,
            r.row_split,
            r.row_split / r.gemm_rayon.max(1e-9)
        );
    }
    println!(
        "(median of {} rounds of ≈ 0.2 s each, after a warm-up)",
        a.rounds
    );
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Sam(a) => run_sam(a),
        What::Gemm(a) => run_gemm(a),
        What::Infer(a) => run_infer(a),
        What::Export(a) => run_export(a),
        What::Gps(a) => super::bench_gps::run(a),
        What::Metrics { size, images, seed } => {
            let cfg = gps_seg::bench::metrics::MetricsBenchConfig {
                side: size,
                images,
                seed,
            };
            let rows = gps_seg::bench::metrics::run(&cfg)?;
            println!("field metrics: {size}×{size} images, one thread per image");
            println!("{}", gps_seg::util::cpu::bench_header(1));
            println!("| configuration | images | median ms / image | slowest ms |");
            println!("|---|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {} | {:.2} | {:.2} |",
                    r.name, r.images, r.median_ms, r.max_ms
                );
            }
            Ok(())
        }
        What::Data {
            images,
            max_side,
            size,
            batch_size,
            resize,
        } => {
            let cfg = gps_seg::bench::data::DataBenchConfig {
                images,
                max_side,
                size,
                batch_size,
                resize: resize.parse()?,
            };
            let rows = gps_seg::bench::data::run(&cfg)?;
            println!(
                "data pipeline: {images} JPEGs (max side {max_side}) → {size}×{size} ({resize}), batch {batch_size}, flip augment, CPU tensors"
            );
            println!(
                "{}",
                gps_seg::util::cpu::bench_header(rayon::current_num_threads())
            );
            println!("| configuration | threads | images | seconds | images/s |");
            println!("|---|---:|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {} | {} | {:.2} | {:.1} |",
                    r.name,
                    r.threads,
                    r.images,
                    r.seconds,
                    r.images_per_s()
                );
            }
            Ok(())
        }
        What::Train(a) => super::bench_train::run(a),
        What::Dp(a) => super::bench_dp::run(a),
        What::Tasks(a) => super::bench_tasks::run(a),
        What::Serve(a) => run_serve(a),
        What::ServeTasks(a) => run_serve_tasks(a),
        What::RunMemory(a) => super::bench_memory::run(a),
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeTasksArgs {
    /// SAM preset of the random-init base (tiny, vit_b, vit_l, vit_h).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Task counts, comma-separated, ascending (the largest is how many task files are made).
    #[arg(long, default_value = "1,10,100")]
    pub tasks: String,
    /// Requests per server and task count for the latency columns.
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
    /// ONNX Runtime intra-op threads of both servers (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Keep the task files and merged model in this new folder (default: a temp folder).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

fn run_serve_tasks(a: ServeTasksArgs) -> anyhow::Result<()> {
    let mut sam = gps_seg::sam::SamConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        sam = sam.with_image_size(s);
    }
    sam.validate()?;
    let counts = a
        .tasks
        .split(',')
        .map(|t| t.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--tasks `{}`: {e}", a.tasks))?;
    if counts.is_empty()
        || counts.iter().any(|&n| !(1..=1000).contains(&n))
        || counts.windows(2).any(|w| w[0] >= w[1])
    {
        anyhow::bail!("--tasks `{}`: ascending counts from 1 to 1000", a.tasks);
    }
    if !(1..=10_000).contains(&a.requests) {
        anyhow::bail!("--requests {}: 1 to 10000", a.requests);
    }
    gps_seg::infer::runtime::ensure(None, true)?;
    let (_guard, dir) = gps_seg::bench::work_dir(a.keep.as_deref(), "gps-seg-serve-tasks")?;
    let cfg = gps_seg::bench::serve_tasks::ServeTasksConfig {
        sam,
        counts,
        requests: a.requests,
        threads: a.threads,
        exe: std::env::current_exe()?,
    };
    let mut progress = super::progress::Progress::new(false);
    let r = gps_seg::bench::serve_tasks::run(&cfg, &dir, &mut progress)?;
    let threads = if a.threads > 0 {
        a.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    println!("{}", gps_seg::util::cpu::describe(threads));
    println!(
        "gps-seg bench serve-tasks --model {} --image-size {} --tasks {} --requests {} --threads {} \
         (ONNX Runtime {}, batch 1, one client, 127.0.0.1)",
        a.model,
        cfg.sam.image_size,
        a.tasks,
        a.requests,
        a.threads,
        gps_seg::infer::runtime::ORT_VERSION
    );
    println!("{}", gps_seg::bench::serve_tasks::markdown(&r));
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// SAM preset or checkpoint for task 0 (as `--model` elsewhere; `tiny` = the shipped
    /// sam-tiny); the other tasks get seeded random weights of the same architecture.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size (default: the model's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Task counts, comma-separated (one set of rows each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 3])]
    pub tasks: Vec<usize>,
    /// Concurrent clients, comma-separated (one row each per task count).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 4])]
    pub clients: Vec<usize>,
    /// Requests per row.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Sessions per task.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// ONNX Runtime intra-op threads per session (and for plain ONNX Runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Distinct synthetic images cycled through.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Largest image side.
    #[arg(long, default_value_t = 320)]
    pub max_side: usize,
    #[arg(long)]
    pub ort_lib: Option<std::path::PathBuf>,
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let (checkpoint, sam) = super::common::resolve_sam(&a.model, a.image_size)?;
    let cfg = gps_seg::bench::serve::ServeBenchConfig {
        sam: sam.clone(),
        checkpoint: checkpoint.clone(),
        task_counts: a.tasks,
        clients: a.clients,
        requests: a.requests,
        sessions: a.sessions,
        threads: a.threads,
        images: a.images,
        max_side: a.max_side,
        ort_lib: a.ort_lib,
    };
    let mut progress = super::progress::Progress::new(true);
    let r = gps_seg::bench::serve::run(&cfg, &mut progress)?;
    let command: Vec<String> = std::env::args().collect();
    println!("{}", gps_seg::util::cpu::describe(cfg.threads));
    println!(
        "{} UTC; `{}`",
        gps_seg::bench::serve::utc_now(),
        command.join(" ")
    );
    println!(
        "prompt-free SAM `{}` {}px ({}, {:.1} MB per task file); {} synthetic PNGs up to {} px; \
         {} session(s) per task, {} intra-op thread(s) each; clients in the same process",
        sam.name,
        sam.image_size,
        checkpoint
            .as_ref()
            .map_or("random weights".to_string(), |p| p.display().to_string()),
        r.model_bytes as f64 / 1e6,
        r.image_sizes.len(),
        cfg.max_side,
        cfg.sessions,
        cfg.threads
    );
    println!("| mode | tasks | clients | requests | errors | req/s | mean ms | p50 ms | p95 ms | p99 ms | model ms | server MB | RSS MB | peak RSS MB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in &r.rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} |",
            w.mode, w.tasks, w.clients, w.requests, w.errors, w.per_s, w.mean_ms, w.p50_ms,
            w.p95_ms, w.p99_ms, w.model_ms,
            w.server_mb.map_or("—".to_string(), |m| format!("{m:.0}")),
            w.rss_mb, w.peak_rss_mb
        );
    }
    for (t, o) in &r.overhead_pct {
        println!(
            "serving overhead, {t} task(s), 1 client, batch 1: wall {:+.1} % of model time \
             (median over paired requests of serve latency − plain infer pipeline, / median \
             plain model time); CPU {:+.1} % (process CPU time of the serve requests − of the \
             plain runs, / plain model time)",
            o.wall_pct, o.cpu_pct
        );
    }
    println!(
        "(server MB: resident memory added by starting the server and one request per task; \
         RSS includes the plain rows' sessions, one per task; peak RSS is the process's VmHWM \
         so far, so it only grows down the table)"
    );
    Ok(())
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
    #[command(flatten)]
    pub dtype: DtypeArgs,
}

fn run_sam(a: SamArgs) -> anyhow::Result<()> {
    let mut cfg = gps_seg::sam::SamConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        cfg = cfg.with_image_size(s);
    }
    let dev = a.device.resolve()?;
    let dtype = a.dtype.resolve(&dev)?;
    // The batch runs whole here (no chunks per thread).
    gps_seg::util::threads::elementwise_pool_for(false, cfg.encoder_values_per_image());
    let r = gps_seg::bench::sam::bench_prompt_free(&cfg, a.batch, a.iters, &dev, dtype)?;
    println!(
        "SAM `{}` {}px, batch {}, {} iters, {}, image encoder in {}",
        r.config, r.image_size, r.batch, r.iters, r.device, r.precision
    );
    println!(
        "{}",
        gps_seg::util::cpu::bench_header(rayon::current_num_threads())
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

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// SAM preset (random weights).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 8])]
    pub batch: Vec<usize>,
    /// Timed iterations per engine and batch (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// ONNX Runtime intra-op threads (0 = its default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub ort_lib: Option<std::path::PathBuf>,
    /// Timed rounds per engine and batch, interleaved (the table shows each round).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Also time Meta's modules eagerly in PyTorch and ONNX Runtime on torch's own export of
    /// the same model (same weights, same images), and compare the two graphs after ONNX
    /// Runtime's optimizer. Needs `--python` (or `GPS_SEG_TORCH_PYTHON`).
    #[arg(long)]
    pub compare: bool,
    /// Python with torch + segment-anything + safetensors.
    #[arg(long)]
    pub python: Option<std::path::PathBuf>,
    /// The PyTorch side of the comparison.
    #[arg(long, default_value = "scripts/bench_torch_infer.py")]
    pub torch_script: std::path::PathBuf,
    /// Keep the graphs (as written and as ONNX Runtime optimized them: `*.optimized.onnx`),
    /// weights and images in this new (or empty) folder.
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

fn run_infer(a: InferArgs) -> anyhow::Result<()> {
    let mut sam = gps_seg::sam::SamConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        sam = sam.with_image_size(s);
    }
    let cfg = gps_seg::bench::infer::InferBenchConfig {
        sam: sam.clone(),
        batches: a.batch.clone(),
        iters: a.iters,
        threads: a.threads,
        ort_lib: a.ort_lib.clone(),
        seed: 0,
        rounds: a.rounds,
        torch: None,
        keep: a.keep.clone(),
    };
    // The Candle engine runs batches of two or more as one chunk per thread.
    gps_seg::util::threads::elementwise_pool_for(
        cfg.batches.iter().all(|&b| b >= 2),
        sam.encoder_values_per_image(),
    );
    let mut cfg = cfg;
    cfg.torch = torch_reference(&a)?;
    let mut progress = super::progress::Progress::new(true);
    let report = gps_seg::bench::infer::run(&cfg, &mut progress)?;
    print_infer_rows(&sam, &cfg, &report);
    if let Some(ops) = &report.ops {
        print_infer_ops(ops);
    }
    Ok(())
}

/// `--compare`: the PyTorch reference's Python and script, checked.
fn torch_reference(a: &InferArgs) -> anyhow::Result<Option<gps_seg::bench::infer::TorchReference>> {
    if !a.compare {
        return Ok(None);
    }
    let python = a
        .python
        .clone()
        .or_else(|| std::env::var_os("GPS_SEG_TORCH_PYTHON").map(std::path::PathBuf::from))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--compare needs --python (a Python with torch, segment-anything and \
                 safetensors) or GPS_SEG_TORCH_PYTHON"
            )
        })?;
    if !a.torch_script.is_file() {
        anyhow::bail!("--torch-script {}: no such file", a.torch_script.display());
    }
    Ok(Some(gps_seg::bench::infer::TorchReference {
        python,
        script: a.torch_script.clone(),
    }))
}

fn print_infer_rows(
    sam: &gps_seg::sam::SamConfig,
    cfg: &gps_seg::bench::infer::InferBenchConfig,
    report: &gps_seg::bench::infer::InferBenchReport,
) {
    let rows = &report.rows;
    println!(
        "prompt-free SAM `{}` {}px, random weights, CPU, {} timed iters after 1 warm-up; ORT threads {}",
        sam.name,
        sam.image_size,
        cfg.iters.max(1),
        if cfg.threads == 0 { "default".to_string() } else { cfg.threads.to_string() }
    );
    println!(
        "{} (Candle rows; ONNX Runtime's kernels pick their own ISA)",
        gps_seg::util::cpu::bench_header(rayon::current_num_threads())
    );
    if let Some(t) = &report.torch_info {
        println!("PyTorch rows: {t}");
    }
    println!(
        "| engine | batch | ms/batch (median) | ms per round | images/s | GFLOP/s | max abs logit diff vs candle |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|");
    for r in rows {
        let per_round: Vec<String> = r.rounds.iter().map(|t| format!("{:.1}", t * 1e3)).collect();
        println!(
            "| {} | {} | {:.1} | {} | {:.2} | {:.1} | {:.2e} |",
            r.engine,
            r.batch,
            r.seconds_per_batch * 1e3,
            per_round.join(" / "),
            r.images_per_s,
            r.gflops,
            r.max_abs_diff
        );
    }
    println!(
        "(rounds interleaved across the Rust-side engines; the PyTorch eager rounds run in their \
         own process right before them. GFLOP counted analytically by \
         bench::sam::prompt_free_flops: matmuls and convs, 2 per MAC)"
    );
    for b in rows
        .iter()
        .map(|r| r.batch)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let t = |prefix: &str| {
            rows.iter()
                .find(|r| r.batch == b && r.engine.starts_with(prefix))
                .map(|r| r.seconds_per_batch)
        };
        if let (Some(ours), Some(theirs)) = (t("onnxruntime (gps-seg"), t("onnxruntime (torch")) {
            println!(
                "batch {b}: ORT on our graph / ORT on torch's graph = {:.2}",
                ours / theirs
            );
        }
        if let (Some(c), Some(e)) = (t("candle"), t("torch")) {
            println!("batch {b}: Candle / torch eager = {:.2}", c / e);
        }
    }
}

fn print_infer_ops(ops: &gps_seg::bench::infer::OpComparison) {
    println!(
        "\nONNX Runtime's optimized graphs at batch {} (nodes as written: gps-seg {}, torch \
         {} via the {} exporter):",
        ops.batch, ops.written_nodes.0, ops.written_nodes.1, ops.exporter
    );
    println!("| op after optimization | gps-seg graph | torch graph |");
    println!("|---|---:|---:|");
    let names: std::collections::BTreeSet<&String> =
        ops.ours.keys().chain(ops.torch.keys()).collect();
    for n in names {
        let a = ops.ours.get(n).copied().unwrap_or(0);
        let b = ops.torch.get(n).copied().unwrap_or(0);
        let mark = if a != b { " ≠" } else { "" };
        println!("| {n}{mark} | {a} | {b} |");
    }
    println!(
        "| **total** | {} | {} |",
        ops.ours.values().sum::<usize>(),
        ops.torch.values().sum::<usize>()
    );
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// SAM preset, or a checkpoint (with its config beside it, as `--model` elsewhere).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Seeded random weights instead of the preset's / checkpoint's.
    #[arg(long)]
    pub random_init: bool,
    /// Input size (default: the model's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Kvasir-shaped folder (images/, masks/) to score each precision on.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// A training run: its merged weights and config, scored on its test split (overrides
    /// --model and --data).
    #[arg(long)]
    pub run: Option<std::path::PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 8])]
    pub batch: Vec<usize>,
    /// Interleaved timing rounds (after one warm-up each).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// ONNX Runtime intra-op threads (0 = its default).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long)]
    pub ort_lib: Option<std::path::PathBuf>,
}

fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    let mut inputs = None;
    let (checkpoint, sam) = if let Some(r) = &a.run {
        let run = gps_seg::infer::RunFolder::open(r)?;
        inputs = Some(run.test_inputs(None)?);
        (Some(run.weights()?), run.view.sam.clone())
    } else if a.random_init {
        let mut s = gps_seg::sam::SamConfig::preset(&a.model)?;
        if let Some(n) = a.image_size {
            s = s.with_image_size(n);
        }
        (None, s)
    } else {
        super::common::resolve_sam(&a.model, a.image_size)?
    };
    let cfg = gps_seg::bench::precision::PrecisionBenchConfig {
        sam: sam.clone(),
        checkpoint: checkpoint.clone(),
        data: a.data.clone(),
        inputs,
        batches: a.batch,
        rounds: a.rounds,
        threads: a.threads,
        ort_lib: a.ort_lib,
        seed: 0,
    };
    let mut progress = super::progress::Progress::new(true);
    let rows = gps_seg::bench::precision::run(&cfg, &mut progress)?;
    println!(
        "prompt-free SAM `{}` {}px, {}; ONNX Runtime on {}; median of {} interleaved rounds",
        sam.name,
        sam.image_size,
        match &checkpoint {
            Some(p) => format!("weights {}", p.display()),
            None => "random weights (seed 0)".into(),
        },
        gps_seg::util::cpu::describe(a.threads),
        cfg.rounds
    );
    println!(
        "{} (ONNX Runtime's kernels pick their own ISA)",
        gps_seg::util::cpu::bench_header(a.threads)
    );
    println!("| precision | file MB | batch | ms/batch (min–max) | × f32 time | max abs Δ logit | mDice |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} | {} | {:.1} ({:.1}–{:.1}) | {:.2} | {:.3} | {} |",
            r.precision,
            r.file_bytes as f64 / 1e6,
            r.batch,
            r.ms,
            r.ms_min,
            r.ms_max,
            r.ratio_vs_f32,
            r.max_abs_dlogit,
            r.mdice.map_or("—".to_string(), |m| format!("{m:.4}"))
        );
    }
    match (&a.run, &a.data) {
        (Some(r), _) => println!("mDice: the test split of run {}", r.display()),
        (None, Some(d)) => println!("mDice: every image of {}", d.display()),
        (None, None) => {}
    }
    Ok(())
}
