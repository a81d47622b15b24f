//! `gps-seg export`: SAM → ONNX (prompt-free graph, or image encoder + prompted decoder).

use anyhow::{bail, Context};
use gps_seg::onnx::sam::{self, ExportSummary, SamExportOptions};
use gps_seg::onnx::{write_model_with, ExternalData, ModelProto};
use gps_seg::sam::SamConfig;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Weights: a .safetensors/.pth file, or a run folder holding merged.safetensors or
    /// model.safetensors (and config.json).
    #[arg(long, required_unless_present = "random_init")]
    pub model: Option<PathBuf>,
    /// Seeded random weights instead of --model (benchmarks and tests).
    #[arg(long, conflicts_with = "model")]
    pub random_init: Option<u64>,
    /// SAM preset (tiny, vit_b, vit_l, vit_h) or a config.json; default: the config stored beside
    /// the weights (`<stem>.json`, a run's `sam_config.json`).
    #[arg(long)]
    pub config: Option<String>,
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
    /// Expect SAM-normalised input instead of RGB in [0,1].
    #[arg(long)]
    pub no_normalize: bool,
}

fn resolve(args: &Args) -> anyhow::Result<(SamConfig, Option<PathBuf>)> {
    let mut weights = args.model.clone();
    let mut cfg_path = None;
    if let Some(m) = &args.model {
        if m.is_dir() {
            let w = ["merged.safetensors", "model.safetensors"]
                .iter()
                .map(|n| m.join(n))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{}: no merged.safetensors or model.safetensors",
                        m.display()
                    )
                })?;
            weights = Some(w);
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
            if let Some(c) = gps_seg::sam::registry::config_beside(w)? {
                return Ok((c, weights));
            }
        }
    }
    let cfg = match (&args.config, cfg_path) {
        (Some(c), _) if Path::new(c).is_file() => gps_seg::util::fs::read_json(Path::new(c))?,
        (Some(c), _) => SamConfig::preset(c)?,
        (None, Some(p)) => gps_seg::util::fs::read_json(&p)?,
        (None, None) => bail!("--config is required (a preset name or a config.json)"),
    };
    Ok((cfg, weights))
}

fn write(path: &Path, model: ModelProto, external: bool, s: &ExportSummary) -> anyhow::Result<()> {
    let ext = if external {
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
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (cfg, weights) = resolve(&args)?;
    let map = match (weights, args.random_init) {
        (Some(w), _) => gps_seg::util::tensors::load(&w, &candle_core::Device::Cpu)?,
        (None, Some(seed)) => sam::random_sam_weights(&cfg, seed)?,
        (None, None) => bail!("give --model or --random-init"),
    };
    let opts = SamExportOptions {
        normalize: !args.no_normalize,
    };
    if args.prompted {
        let (m, s) = sam::export_image_encoder(&cfg, &map, opts)?;
        write(&args.out, m, args.external_data, &s)?;
        let stem = args
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sam".into());
        let dec = args.out.with_file_name(format!("{stem}_decoder.onnx"));
        let (m, s) = sam::export_prompted_decoder(&cfg, &map)?;
        write(&dec, m, args.external_data, &s)?;
    } else {
        let (m, s) = sam::export_prompt_free(&cfg, &map, opts)?;
        write(&args.out, m, args.external_data, &s)?;
    }
    Ok(())
}
