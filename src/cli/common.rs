//! Flags shared by several subcommands.

use gps_seg::data::prompts::{PromptKind, PromptSpec};
use gps_seg::device::{self, DeviceKind};
use gps_seg::nn::Precision;

/// `--device cpu|cuda|auto` and `--threads N`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Compute device: cpu, cuda or auto (CUDA when built with it and a GPU is visible).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads for every parallel kernel (rayon pool, Candle's matmul; ONNX Runtime's
    /// intra-op threads in `infer`). Default: all cores (benchmarks: 2).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl DeviceArgs {
    /// Apply `--threads`, resolve the device and print the one-line choice.
    pub fn resolve(&self) -> anyhow::Result<candle_core::Device> {
        if let Some(n) = self.threads {
            gps_seg::util::threads::set(n)?;
        }
        let kind: DeviceKind = self.device.parse()?;
        let (dev, line) = device::resolve(kind)?;
        eprintln!("{line}");
        Ok(dev)
    }
}

/// `--dtype f32|bf16|f16`: compute dtype of SAM's image encoder (beside `--device`).
#[derive(Debug, Clone, clap::Args)]
pub struct DtypeArgs {
    /// Compute dtype of SAM's image encoder: f32, or bf16/f16 autocast (CUDA only; master
    /// weights, optimiser state and the rest of SAM stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DtypeArgs {
    /// Parse the flag and refuse bf16/f16 on a CPU `device` (one line, no panic).
    pub fn resolve(&self, device: &candle_core::Device) -> anyhow::Result<Precision> {
        let p = self.parse()?;
        p.check_device(device)?;
        Ok(p)
    }

    /// Parse only (for a process that resolves its device later, e.g. `bench train` rows);
    /// still refuses bf16/f16 when `device` can only mean the CPU.
    pub fn parse_for(&self, device: &DeviceArgs) -> anyhow::Result<Precision> {
        let p = self.parse()?;
        let kind: DeviceKind = device.device.parse()?;
        if kind == DeviceKind::Cpu || (kind == DeviceKind::Auto && !device::cuda_compiled()) {
            p.check_device(&candle_core::Device::Cpu)?;
        }
        Ok(p)
    }

    pub fn parse(&self) -> anyhow::Result<Precision> {
        Ok(self.dtype.parse::<Precision>()?)
    }
}

/// `--prompt none|box|points|box+points`, `--points N`, `--neg-points M`, `--prompt-jitter`:
/// prompts sampled from the ground-truth masks (`gps_seg::data::prompts`).
#[derive(Debug, Clone, clap::Args)]
pub struct PromptArgs {
    /// Prompts sampled per object from the ground truth: none (prompt-free, GPS's recipe),
    /// box (jittered bounding box), points (positives inside, negatives in a band outside),
    /// box+points.
    #[arg(long, value_enum, default_value = "none")]
    pub prompt: PromptKind,
    /// Positive points per object (points, box+points; default 1).
    #[arg(long)]
    pub points: Option<usize>,
    /// Negative points per object (points, box+points; default 1). `--points 1
    /// --neg-points 0` is the ambiguous single click: multimask output, min-over-masks loss.
    #[arg(long)]
    pub neg_points: Option<usize>,
    /// Largest outward shift of each box side, in pixels at a 1024-px input (scaled to the
    /// input size; MedSAM: 20).
    #[arg(long)]
    pub prompt_jitter: Option<f32>,
}

impl PromptArgs {
    /// The spec, refusing point flags without point prompts and a jitter without boxes.
    pub fn spec(&self) -> anyhow::Result<PromptSpec> {
        let k = self.prompt;
        if !k.has_points() {
            if let Some(f) = [
                (self.points.is_some(), "--points"),
                (self.neg_points.is_some(), "--neg-points"),
            ]
            .into_iter()
            .find_map(|(g, f)| g.then_some(f))
            {
                anyhow::bail!(
                    "{f}: needs --prompt points or box+points (got {})",
                    k.name()
                );
            }
        }
        if !k.has_box() && self.prompt_jitter.is_some() {
            anyhow::bail!(
                "--prompt-jitter: needs --prompt box or box+points (got {})",
                k.name()
            );
        }
        let d = PromptSpec::of(k);
        let spec = PromptSpec {
            points: self.points.unwrap_or(d.points),
            neg_points: self.neg_points.unwrap_or(d.neg_points),
            jitter_1024: self.prompt_jitter.unwrap_or(d.jitter_1024),
            ..d
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// `--resize squash|pad`.
pub fn parse_resize(s: &str) -> anyhow::Result<gps_seg::data::resize::Resize> {
    use gps_seg::data::resize::Resize;
    match s {
        "squash" => Ok(Resize::Squash),
        "pad" | "longest-side-pad" => Ok(Resize::LongestSidePad),
        other => anyhow::bail!("--resize {other}: expected `squash` or `pad`"),
    }
}

/// Resolve `--model` to (base checkpoint, SAM config).
pub fn resolve_sam(
    model: &str,
    image_size: Option<usize>,
) -> anyhow::Result<(Option<std::path::PathBuf>, gps_seg::sam::SamConfig)> {
    let (p, cfg) = gps_seg::registry::resolve_sam(model, image_size)?;
    Ok((Some(p), cfg))
}

/// The Kvasir folder to use: `--data-dir`, else `data/Kvasir-SEG` when present, else the
/// synthetic set under `data/synth-kvasir` (generated once). Says which in one line.
pub fn kvasir_dir(
    explicit: Option<std::path::PathBuf>,
    seed: u64,
    obs: &mut dyn gps_seg::train::observer::Observer,
) -> anyhow::Result<std::path::PathBuf> {
    use gps_seg::train::observer::Event;
    if let Some(d) = explicit {
        obs.event(Event::Info(format!("data: {}", d.display())));
        return Ok(d);
    }
    let real = std::path::PathBuf::from("data/Kvasir-SEG");
    if real.join("images").is_dir() {
        obs.event(Event::Info(format!(
            "data: using the real Kvasir-SEG at {}",
            real.display()
        )));
        return Ok(real);
    }
    let synth = std::path::PathBuf::from("data/synth-kvasir");
    obs.event(Event::Info(
        "data: no data/Kvasir-SEG found; using the synthetic Kvasir-shaped set".into(),
    ));
    let cfg = gps_seg::data::synth_kvasir::SynthKvasirConfig {
        seed,
        ..Default::default()
    };
    gps_seg::data::synth_kvasir::ensure(&synth, &cfg, obs)?;
    Ok(synth)
}
