//! `gps-seg bench tasks`: one base, many tasks (see `gps_seg::bench::tasks`).

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SAM preset (tiny, vit_b, vit_l, vit_h).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Input size (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Number of synthetic GPS tasks.
    #[arg(long, default_value_t = 3)]
    pub tasks: usize,
    /// ONNX Runtime intra-op threads (0 = ORT's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Folder for the exported files (default: a temp folder, removed afterwards). Must be new
    /// or empty.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = gps_seg::sam::SamConfig::preset(&a.model)?;
    if let Some(s) = a.image_size {
        cfg = cfg.with_image_size(s);
    }
    cfg.validate()?;
    if !(1..=16).contains(&a.tasks) {
        anyhow::bail!("--tasks must be 1..=16, got {}", a.tasks);
    }
    let tmp;
    let dir = match &a.out {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                anyhow::bail!(
                    "--out {}: not empty; give a new or empty folder",
                    d.display()
                );
            }
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    gps_seg::infer::runtime::ensure(None, true)?;
    let r = gps_seg::bench::tasks::run(&cfg, a.tasks, a.threads, &dir)?;
    let threads = if a.threads > 0 {
        a.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    println!("{}", gps_seg::util::cpu::describe(threads));
    println!(
        "gps-seg bench tasks --model {} --image-size {} --tasks {} --threads {}",
        a.model, cfg.image_size, a.tasks, a.threads
    );
    println!("{}", gps_seg::bench::tasks::markdown(&r));
    Ok(())
}
