//! `gps-seg export`: SAM → ONNX (prompt-free graph, or image encoder + prompted decoder), or a
//! classifier (ViT / ConvNeXt) → ONNX (`image → logits, features`).
//!
//! A classifier is recognised by its config: a run folder's `model.json`, a `<stem>.json`
//! beside the weights, or `--config` (a classifier preset or a `ClassifierConfig` JSON);
//! everything else is SAM, as before.

use anyhow::{bail, Context};
use gps_seg::models::ClassifierConfig;
use gps_seg::onnx::classifier::{self, ClassifierExportOptions};
use gps_seg::onnx::sam::{self, ExportSummary, SamExportOptions};
use gps_seg::onnx::{write_model_with, ExternalData, ModelProto, WriteReport};
use gps_seg::sam::SamConfig;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Weights: a .safetensors/.pth file, or a run folder holding merged.safetensors or
    /// model.safetensors (and config.json, or a classification run's model.json).
    #[arg(long, required_unless_present = "random_init")]
    pub model: Option<PathBuf>,
    /// Seeded random weights instead of --model (benchmarks and tests).
    #[arg(long, conflicts_with = "model")]
    pub random_init: Option<u64>,
    /// SAM preset (tiny, vit_b, vit_l, vit_h), classifier preset (vit_b16, vit_tiny_cpu,
    /// convnext_b, convnext_tiny_cpu) or a config JSON (SamConfig or ClassifierConfig); default:
    /// the config stored beside the weights (`<stem>.json`, a run's `sam_config.json` /
    /// `model.json`).
    #[arg(long)]
    pub config: Option<String>,
    /// Classes of the head when --config is a classifier preset.
    #[arg(long, default_value_t = 10)]
    pub num_classes: usize,
    /// Output .onnx. With --prompted this is the image encoder, and the decoder goes to
    /// `<stem>_decoder.onnx` beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Export image encoder + prompted decoder instead of the prompt-free graph.
    #[arg(long)]
    pub prompted: bool,
    /// Put initializers ≥ 1 KiB in `<out>.data` (automatic above 2 GiB).
    #[arg(long)]
    pub external_data: bool,
    /// Expect model-normalised input instead of RGB in [0,1].
    #[arg(long)]
    pub no_normalize: bool,
    /// Classifiers: export only `logits` (no second `features` output).
    #[arg(long)]
    pub no_features: bool,
    /// Dynamic int8 quantization of the MatMul and Conv weights (per output channel,
    /// symmetric; activations quantized at run time).
    #[arg(long, value_enum)]
    pub quantize: Option<Quantize>,
    /// Weight and compute precision: f32, or fp16 (f32 inputs/outputs; for GPU execution
    /// providers).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// One base, many tasks: with `--model RUN` (a GPS training run), write `--out` as a small
    /// task file on this shared base (written here first if missing, with every weight in
    /// `<base>.data`): unchanged weights reference the base's data, GPS-changed ones are
    /// folded ScatterND patches, the fully trained decoder is stored in the task file.
    /// `--out` must sit in the base's folder.
    #[arg(long, conflicts_with_all = ["random_init", "quantize", "external_data"])]
    pub base_onnx: Option<PathBuf>,
    /// Replace an existing --out (and its data); without it an export never replaces a file
    /// it did not write. A shared base (`--base-onnx`) is never replaced.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    Int8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    Fp16,
}

/// The weights file of `--model` (a run folder's merged.safetensors / model.safetensors).
fn weights_path(m: &Path) -> anyhow::Result<PathBuf> {
    if !m.is_dir() {
        return Ok(m.to_path_buf());
    }
    ["merged.safetensors", "model.safetensors"]
        .iter()
        .map(|n| m.join(n))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{}: no merged.safetensors or model.safetensors",
                m.display()
            )
        })
}

/// A classifier config read from `path` when it is one (a JSON object with a `family` key),
/// validated; `None` for any other JSON (a SAM config).
fn read_classifier_config(path: &Path) -> anyhow::Result<Option<ClassifierConfig>> {
    let v: serde_json::Value = gps_seg::util::fs::read_json(path)?;
    if v.get("family").is_none() {
        return Ok(None);
    }
    let cfg: ClassifierConfig = gps_seg::util::fs::read_json(path)?;
    cfg.validate()
        .with_context(|| format!("{}: not a usable classifier config", path.display()))?;
    Ok(Some(cfg))
}

/// A classifier config for these arguments, if they name a classifier (see the module docs).
fn classifier_config(args: &Args) -> anyhow::Result<Option<ClassifierConfig>> {
    if let Some(c) = &args.config {
        let p = Path::new(c);
        if p.is_file() {
            return read_classifier_config(p);
        }
        if ClassifierConfig::PRESETS.contains(&c.as_str()) {
            return Ok(Some(ClassifierConfig::preset(c, args.num_classes)?));
        }
        return Ok(None);
    }
    let Some(m) = &args.model else {
        return Ok(None);
    };
    let candidate = if m.is_dir() {
        Some(m.join("model.json"))
    } else {
        m.file_stem()
            .map(|s| m.with_file_name(format!("{}.json", s.to_string_lossy())))
    };
    match candidate {
        Some(c) if c.is_file() => read_classifier_config(&c),
        _ => Ok(None),
    }
}

fn run_classifier(args: &Args, cfg: ClassifierConfig) -> anyhow::Result<()> {
    if args.prompted {
        bail!("--prompted is for SAM; `{}` is a classifier", cfg.name());
    }
    // Before any weight is read or made.
    cfg.validate()?;
    let map = match (&args.model, args.random_init) {
        (Some(m), _) => {
            let w = weights_path(m)?;
            check_paths(args, Some(&w))?;
            gps_seg::util::tensors::load(&w, &candle_core::Device::Cpu)?
        }
        (None, Some(seed)) => {
            check_paths(args, None)?;
            let vs = gps_seg::nn::ParamStore::init(&candle_core::Device::Cpu, seed);
            gps_seg::models::Classifier::new(&cfg, &vs)?;
            vs.current_tensors()?
        }
        (None, None) => bail!("give --model or --random-init"),
    };
    let opts = ClassifierExportOptions {
        normalize: !args.no_normalize,
        features: !args.no_features,
    };
    let (mut m, s) = classifier::export(&cfg, &map, opts)
        .with_context(|| format!("exporting classifier `{}`", cfg.name()))?;
    convert(&mut m, args)?;
    println!(
        "classifier {} ({} classes, {}x{} input)",
        cfg.name(),
        cfg.num_classes(),
        cfg.image_size(),
        cfg.image_size()
    );
    write(&args.out, m, args, &s).map(|_| ())
}

fn resolve(args: &Args) -> anyhow::Result<(SamConfig, Option<PathBuf>)> {
    let mut weights = args.model.clone();
    let mut cfg_path = None;
    if let Some(m) = &args.model {
        if m.is_dir() {
            weights = Some(weights_path(m)?);
            let c = m.join("config.json");
            if c.is_file() {
                cfg_path = Some(c);
            }
        }
    }
    // A SAM config stored beside the weights (`<stem>.json`, a run's `sam_config.json`, or a
    // `config.json` that is a SamConfig) wins over guessing.
    if args.config.is_none() {
        if let Some(w) = &weights {
            if let Some(c) = gps_seg::sam::files::config_beside(w)? {
                return Ok((c, weights));
            }
        }
    }
    let cfg: SamConfig = match (&args.config, cfg_path) {
        // Read and validated, every field named (before any weight is read or made).
        (Some(c), _) if Path::new(c).is_file() => gps_seg::sam::files::read_config(Path::new(c))?,
        (Some(c), _) => SamConfig::preset(c)?,
        (None, Some(p)) => gps_seg::util::fs::read_json(&p)?,
        (None, None) => bail!("--config is required (a preset name or a config.json)"),
    };
    cfg.validate()?;
    Ok((cfg, weights))
}

/// Every file a checkpoint brings along (its `<stem>.json` config beside it), and for a run
/// folder as `--model` every entry of the run except the ONNX models gps-seg exports there
/// (`RUN/model.onnx` stays a fine output; `RUN/gps/delta.safetensors` or `RUN/summary.json`
/// are inputs).
fn implicit_inputs(
    mut io: gps_seg::util::fs::IoPaths,
    model: Option<&Path>,
    weights: Option<&Path>,
) -> gps_seg::util::fs::IoPaths {
    if let Some(w) = weights {
        if let Some(stem) = w.file_stem() {
            let c = w.with_file_name(format!("{}.json", stem.to_string_lossy()));
            if c.exists() {
                io = io.input("--model (config beside the weights)", c);
            }
        }
    }
    if let Some(run) = model.filter(|m| m.is_dir()) {
        if let Ok(rd) = std::fs::read_dir(run) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !(name.ends_with(".onnx") || name.ends_with(".onnx.data")) {
                    io = io.input("--model (run folder)", e.path());
                }
            }
        }
    }
    io
}

/// Refuse before any work when an output (`--out`, its `.data`, the prompted decoder and its
/// `.data`) would equal, contain or sit inside a file the export reads (the weights, the config
/// files, see [`implicit_inputs`]); then the same rule per file written, and no existing file
/// replaced without --overwrite.
fn check_paths(args: &Args, weights: Option<&Path>) -> anyhow::Result<()> {
    let with_data = |p: &Path| {
        let mut d = p.as_os_str().to_owned();
        d.push(".data");
        PathBuf::from(d)
    };
    let mut io = gps_seg::util::fs::IoPaths::new()
        .input_opt("--model", weights)
        .output("--out", &args.out)
        .output("--out (external data)", with_data(&args.out));
    if let Some(c) = args
        .config
        .as_deref()
        .map(Path::new)
        .filter(|p| p.is_file())
    {
        io = io.input("--config", c);
    }
    if let Some(m) = args.model.as_deref().filter(|m| m.is_dir()) {
        for c in ["config.json", "sam_config.json", "model.json"] {
            io = io.input("--model", m.join(c));
        }
    }
    if args.prompted {
        let dec = decoder_path(&args.out);
        io = io
            .output("--out (prompted decoder)", &dec)
            .output("--out (prompted decoder data)", with_data(&dec));
    }
    implicit_inputs(io, args.model.as_deref(), weights).enforce(args.overwrite)?;
    Ok(())
}

/// `<stem>_decoder.onnx` beside the prompted image encoder's `--out`.
fn decoder_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sam".into());
    out.with_file_name(format!("{stem}_decoder.onnx"))
}

/// The precision pass of `--quantize` / `--precision` (printing what it changed).
fn convert(model: &mut ModelProto, args: &Args) -> anyhow::Result<()> {
    use gps_seg::onnx::quantize::{quantize_int8, to_fp16};
    let pass = match (args.quantize, args.precision) {
        (Some(_), Precision::Fp16) => {
            bail!("--quantize int8 and --precision fp16 exclude each other")
        }
        (Some(Quantize::Int8), Precision::F32) => Some(("int8", quantize_int8(model)?)),
        (None, Precision::Fp16) => Some(("fp16", to_fp16(model)?)),
        (None, Precision::F32) => None,
    };
    if let Some((what, r)) = &pass {
        println!(
            "{what}: {} MatMul and {} Conv weights; initializers {} → {} bytes",
            r.matmuls, r.convs, r.bytes_before, r.bytes_after
        );
    }
    Ok(())
}

/// Write a converted model (with external data per --external-data) and print its summary.
fn write(
    path: &Path,
    model: ModelProto,
    args: &Args,
    s: &ExportSummary,
) -> anyhow::Result<WriteReport> {
    let ext = if args.external_data {
        ExternalData::Always {
            threshold_bytes: 1024,
        }
    } else {
        ExternalData::Auto
    };
    let r = write_model_with(path, model, ext)?;
    println!("wrote {} ({} bytes)", r.model_path.display(), r.model_bytes);
    if let Some(d) = &r.data_path {
        println!(
            "  external data {} ({} bytes, {} tensors)",
            d.display(),
            r.data_bytes,
            r.external_tensors
        );
    }
    println!("  graph {}: {} nodes", s.graph, s.node_count);
    println!("  inputs:  {}", s.inputs.join(", "));
    println!("  outputs: {}", s.outputs.join(", "));
    println!(
        "  parameters: {} in {} checkpoint tensors (+{} in {} tensors this graph does not use)",
        s.param_count,
        s.param_tensors,
        s.unused_count,
        s.unused.len()
    );
    Ok(r)
}

/// One graph of `--base-onnx`: its kind, its base file, its task file.
type TaskGraph = (gps_seg::onnx::delta::SamGraph, PathBuf, PathBuf);

/// `--base-onnx`: the task file(s) of a GPS run on a shared base (see the flag's help).
fn run_delta(args: &Args, base_onnx: &Path) -> anyhow::Result<()> {
    use gps_seg::onnx::delta::export_sam_task;
    let (run, cfg, graphs) = delta_plan(args, base_onnx)?;
    let dev = candle_core::Device::Cpu;
    let gps_dir = run.join("gps");
    let artifact = gps_seg::gps::Artifact::load(&gps_dir, &dev)
        .with_context(|| format!("{}: not a GPS run (no artifact)", gps_dir.display()))?;
    let base = gps_seg::train::seg::base_weights(&cfg, &dev)?;
    let opts = SamExportOptions {
        normalize: !args.no_normalize,
    };
    for (graph, base_path, out) in &graphs {
        let e = export_sam_task(*graph, &cfg.sam, &base, &artifact, opts, base_path, out)
            .with_context(|| format!("exporting the {} task file", graph.name()))?;
        print_task_export(&e);
    }
    Ok(())
}

/// The checks of `--base-onnx` before anything is read: the run, its config, the graphs to
/// write and every path's role (inputs never overwritten).
fn delta_plan(
    args: &Args,
    base_onnx: &Path,
) -> anyhow::Result<(PathBuf, gps_seg::train::seg::SegTrainConfig, Vec<TaskGraph>)> {
    use gps_seg::onnx::delta::{data_file_name, SamGraph};
    let run = args.model.as_deref().filter(|m| m.is_dir()).context(
        "--base-onnx needs --model RUN: a GPS training run folder (with gps/ and config.json)",
    )?;
    if args.precision != Precision::F32 {
        bail!("--base-onnx writes f32 task files; --precision fp16 is not supported with it");
    }
    if args.config.is_some() {
        bail!("--base-onnx takes the SAM config from the run's config.json; drop --config");
    }
    let cfg_path = run.join("config.json");
    let gps_dir = run.join("gps");
    let with_data =
        |p: &Path| -> anyhow::Result<PathBuf> { Ok(p.with_file_name(data_file_name(p)?)) };
    let mut graphs: Vec<TaskGraph> = vec![(
        SamGraph::PromptFree,
        base_onnx.to_path_buf(),
        args.out.clone(),
    )];
    if args.prompted {
        graphs = vec![
            (
                SamGraph::ImageEncoder,
                base_onnx.to_path_buf(),
                args.out.clone(),
            ),
            (
                SamGraph::PromptedDecoder,
                decoder_path(base_onnx),
                decoder_path(&args.out),
            ),
        ];
    }
    let mut io = gps_seg::util::fs::IoPaths::new()
        .input("--model", &cfg_path)
        .input("--model (GPS artifact)", &gps_dir);
    for (_, base, out) in &graphs {
        io = io
            .output("--out", out)
            .output("--out (external data)", with_data(out)?);
        if base.exists() {
            io = io
                .input("--base-onnx", base)
                .input("--base-onnx (external data)", with_data(base)?);
        }
    }
    let cfg: gps_seg::train::seg::SegTrainConfig = gps_seg::util::fs::read_json(&cfg_path)
        .with_context(|| {
            format!(
                "{}: --base-onnx supports SAM segmentation runs",
                cfg_path.display()
            )
        })?;
    if let Some(b) = &cfg.base {
        if !b.exists() {
            bail!(
                "{}: the run's base checkpoint `{}` (field `base`) is not found from here{}",
                cfg_path.display(),
                b.display(),
                if b.is_relative() {
                    "; it is relative to the folder training ran in: run export from there"
                } else {
                    ""
                }
            );
        }
        io = io.input("--model (base checkpoint)", b);
        io = implicit_inputs(io, None, Some(b));
    }
    implicit_inputs(io, Some(run), None).enforce(args.overwrite)?;
    Ok((run.to_path_buf(), cfg, graphs))
}

fn print_task_export(e: &gps_seg::onnx::delta::TaskExport) {
    let r = &e.report;
    println!(
        "{} base {} ({} bytes with its data)",
        if e.base_written { "wrote" } else { "reusing" },
        e.base_path.display(),
        e.base_bytes
    );
    println!(
        "wrote task {} ({} bytes = {:.2}% of a merged model): {} GPS tensors ({} entries) \
         as folded ScatterND, {} fully trained tensors ({} entries) inline, {} weights \
         shared with the base",
        e.task.model_path.display(),
        e.task.model_bytes,
        100.0 * e.task.model_bytes as f64 / e.base_bytes.max(1) as f64,
        r.sparse_tensors,
        r.sparse_entries,
        r.full_tensors,
        r.full_entries,
        r.shared_tensors
    );
    if !r.not_in_graph.is_empty() {
        println!(
            "  {} tuned tensors are not used by this graph (e.g. {})",
            r.not_in_graph.len(),
            r.not_in_graph
                .first()
                .map(String::as_str)
                .unwrap_or_default()
        );
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(b) = args.base_onnx.clone() {
        return run_delta(&args, &b);
    }
    if let Some(cfg) = classifier_config(&args)? {
        return run_classifier(&args, cfg);
    }
    let (cfg, weights) = resolve(&args)?;
    check_paths(&args, weights.as_deref())?;
    let map = match (weights, args.random_init) {
        (Some(w), _) => gps_seg::util::tensors::load(&w, &candle_core::Device::Cpu)?,
        (None, Some(seed)) => sam::random_sam_weights(&cfg, seed)?,
        (None, None) => bail!("give --model or --random-init"),
    };
    let opts = SamExportOptions {
        normalize: !args.no_normalize,
    };
    if args.prompted {
        // Both graphs are built and converted before either is written, and a decoder that
        // cannot be written takes the encoder written just before with it: never half a pair.
        let (mut enc, se) = sam::export_image_encoder(&cfg, &map, opts)?;
        let (mut dec, sd) = sam::export_prompted_decoder(&cfg, &map)?;
        drop(map);
        convert(&mut enc, &args)?;
        convert(&mut dec, &args)?;
        let written = write(&args.out, enc, &args, &se)?;
        if let Err(e) = write(&decoder_path(&args.out), dec, &args, &sd) {
            for p in std::iter::once(&written.model_path).chain(written.data_path.as_ref()) {
                let _ = std::fs::remove_file(p);
            }
            return Err(e.context(format!(
                "writing the prompted decoder failed; removed the image encoder {} written \
                 before it",
                written.model_path.display()
            )));
        }
    } else {
        let (mut m, s) = sam::export_prompt_free(&cfg, &map, opts)?;
        drop(map);
        convert(&mut m, &args)?;
        write(&args.out, m, &args, &s)?;
    }
    Ok(())
}
