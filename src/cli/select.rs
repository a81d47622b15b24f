//! `gps-seg select`: GPS parameter selection on a base checkpoint, written as a GPS artifact
//! folder (`gps_config.json` + `selection.safetensors`), with the parameter counts printed.
//!
//! Scores come from `--criterion`: `magnitude` and `random` need only the base; `gradient`
//! accumulates the task loss's gradients (BCE + soft IoU) of the pretrained SAM over
//! `--select-batches` batches of a Kvasir-shaped `--data-dir`, or reads accumulated gradients
//! from `--grads` (a safetensors file keyed by tensor name).

use anyhow::Context;
use gps_seg::gps::artifact::{Artifact, BaseModel, SelectionInfo};
use gps_seg::gps::select::{select, SelectSpec};
use gps_seg::gps::{Counts, Criterion, Level, Policy};
use gps_seg::util::fs::IoPaths;
use gps_seg::util::tensors;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base checkpoint (.safetensors or .pth), or a SAM preset with shipped weights (tiny).
    #[arg(long, alias = "model")]
    pub base: String,
    /// Kvasir-shaped data whose training split supplies the selection gradients (SAM).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// At most this many batches of gradients (with --data-dir); default: the whole training
    /// split, one pass.
    #[arg(long)]
    pub select_batches: Option<usize>,
    /// Batch size for gradient accumulation (with --data-dir).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Policy preset (sam, classifier, decoder, full) or a JSON policy file.
    #[arg(long, default_value = "sam")]
    pub policy: String,
    /// Entries kept per output row.
    #[arg(long, default_value_t = 1)]
    pub k: usize,
    /// neuron (GPS), layer or net.
    #[arg(long, value_enum, default_value = "neuron")]
    pub level: Level,
    /// gradient, magnitude or random.
    #[arg(long, value_enum, default_value = "gradient")]
    pub criterion: Criterion,
    /// Accumulated gradients (safetensors keyed by tensor name); needed for `gradient`.
    #[arg(long)]
    pub grads: Option<PathBuf>,
    /// Name of the loss the gradients came from (recorded in the artifact).
    #[arg(long, default_value = "unknown")]
    pub selection_loss: String,
    /// Number of batches the gradients were accumulated over (recorded in the artifact).
    #[arg(long, default_value_t = 0)]
    pub batches: usize,
    /// Seed for the `random` criterion.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output artifact folder. Without it, only the counts are printed.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print per-tensor counts too.
    #[arg(long)]
    pub verbose: bool,
    /// Input size of the gradient pass (with --data-dir): the checkpoint's position tables
    /// are resized at load, as `train --image-size` does.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// CPU threads for every parallel kernel (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Allow --out to replace a folder that already holds a trained artifact
    /// (`delta.safetensors`, which a new selection would delete).
    #[arg(long)]
    pub overwrite: bool,
    /// The --data-dir gradient pass over several processes: `mpi` (start with `mpirun -np N`;
    /// a build with `--features mpi`). Rank r takes batches r, r + N, …; the sums are added;
    /// rank 0 writes --out. A process started by a launcher as one of several refuses to run
    /// without it.
    #[arg(long, value_enum, default_value = "none")]
    pub distributed: gps_seg::dist::Backend,
}

/// Refuse an --out that equals, contains or sits inside an input, or that holds a trained
/// artifact (unless --overwrite): nothing is written before this passes.
fn check_out(a: &Args, out: &Path) -> anyhow::Result<()> {
    let base = Path::new(&a.base);
    IoPaths::new()
        .input_opt("--base", base.exists().then_some(base))
        .input_opt("--data-dir", a.data_dir.as_ref())
        .input_opt("--grads", a.grads.as_ref())
        .output("--out", out)
        .check()?;
    let delta = out.join("delta.safetensors");
    if delta.exists() && !a.overwrite {
        anyhow::bail!(
            "--out {} holds a trained artifact ({}); a new selection would delete it — \
             pass --overwrite to replace it or choose another --out",
            out.display(),
            delta.display()
        );
    }
    if delta.exists() {
        // --overwrite: the user asked to replace the trained artifact; its delta would index a
        // selection that no longer exists, so it goes (the library never deletes it by itself).
        std::fs::remove_file(&delta).with_context(|| format!("removing {}", delta.display()))?;
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let world = gps_seg::dist::init(a.distributed)?;
    let gradient_pass = a.data_dir.is_some() && a.grads.is_none();
    if gps_seg::dist::world().size() > 1 && !gradient_pass {
        anyhow::bail!(
            "--distributed: only the gradient pass of --data-dir runs on several processes"
        );
    }
    let r = run_one(a);
    world.exit_on_error(r)
}

/// `select` in this process (one rank of several with --distributed and --data-dir).
fn run_one(a: Args) -> anyhow::Result<()> {
    if let Some(n) = a.threads {
        gps_seg::util::threads::set(n)?;
    }
    if (a.data_dir.is_none() || a.grads.is_some()) && a.image_size.is_some() {
        anyhow::bail!(
            "--image-size applies to the gradient pass of --data-dir only (not with --grads)"
        );
    }
    if let Some(out) = &a.out {
        // Rank 0 checks (and with --overwrite clears) --out before the others look at it.
        gps_seg::dist::root_first(gps_seg::dist::world(), || check_out(&a, out))?;
    }
    let policy = Policy::from_name_or_file(&a.policy)?;
    let (level, criterion) = (a.level, a.criterion);
    let dev = candle_core::Device::Cpu;
    if let (Some(data), None) = (&a.data_dir, &a.grads) {
        return select_with_data(&a, data, level, criterion);
    }
    let base_path = PathBuf::from(&a.base);
    let base = tensors::load(&base_path, &dev)?;
    let grads = match (&a.grads, criterion) {
        (Some(p), _) => Some(tensors::load(p, &dev)?),
        (None, Criterion::Gradient) => anyhow::bail!(
            "--criterion gradient needs --grads FILE (accumulated gradients keyed by tensor name)"
        ),
        (None, _) => None,
    };
    let spec = SelectSpec {
        policy: &policy,
        k: a.k,
        level,
        criterion,
        seed: a.seed,
    };
    let sel =
        select(&base, grads.as_ref(), &spec).with_context(|| format!("selecting in {}", a.base))?;
    let shapes: Vec<(String, Vec<usize>)> = base
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    let counts = Counts::from_selection(&shapes, &sel);
    if a.verbose {
        print!("{}", counts.tensor_table());
    }
    println!(
        "policy {} · K = {} · level {:?} · criterion {:?}",
        policy.name, a.k, level, criterion
    );
    print!("{counts}");
    if let Some(out) = &a.out {
        let file = base_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = SelectionInfo {
            k: a.k,
            level,
            criterion,
            selection_loss: a.selection_loss.clone(),
            batches: a.batches,
            selection_images: 0,
            seed: a.seed,
        };
        let art = Artifact::new(policy, info, BaseModel::of(&base, &file)?, sel)?;
        art.save(out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// SAM selection from data: gradients of the task loss over the training split.
fn select_with_data(
    a: &Args,
    data: &std::path::Path,
    level: Level,
    criterion: Criterion,
) -> anyhow::Result<()> {
    use gps_seg::train::config::Method;
    use gps_seg::train::seg::{self, SegTrainConfig};
    if a.policy != "sam" {
        anyhow::bail!(
            "--data-dir selection runs SAM with the `sam` policy (got --policy {})",
            a.policy
        );
    }
    let out = a
        .out
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--data-dir selection needs --out DIR"))?;
    let (base, sam) = super::common::resolve_sam(&a.base, a.image_size)?;
    let mut cfg = SegTrainConfig::recipe(data.to_path_buf(), base, sam);
    cfg.method = match criterion {
        Criterion::Gradient => Method::Gps,
        Criterion::Magnitude => Method::Magnitude,
        Criterion::Random => Method::Random,
    };
    cfg.topk = a.k;
    cfg.level = level;
    cfg.seed = a.seed;
    cfg.select_batches = a.select_batches;
    cfg.batch_size = a.batch_size;
    // The selection pass runs each batch whole (its encoder blocks are recomputed).
    gps_seg::train::fit::set_elementwise_pool(&cfg, true);
    let root = gps_seg::dist::world().is_root();
    let mut p: Box<dyn gps_seg::progress::Observer> = match root {
        true => Box::new(super::progress::Progress::new(false)),
        false => Box::new(gps_seg::progress::Silent),
    };
    let art = seg::select(&cfg, &out, &candle_core::Device::Cpu, &mut *p)?;
    if !root {
        return Ok(());
    }
    let shapes: Vec<(String, Vec<usize>)> = gps_seg::sam::Sam::param_shapes(&cfg.sam)
        .into_iter()
        .filter(|s| !s.is_buffer)
        .map(|s| (s.name, s.shape))
        .collect();
    let counts = Counts::from_selection(&shapes, &art.selection);
    if a.verbose {
        print!("{}", counts.tensor_table());
    }
    println!(
        "policy {} · K = {} · level {:?} · criterion {:?} · {} batches",
        art.config.policy.name, a.k, level, criterion, art.config.info.batches
    );
    print!("{counts}");
    println!("wrote {}", out.display());
    Ok(())
}
