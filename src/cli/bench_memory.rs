//! `gps-seg bench run-memory`: peak resident memory of whole runs (`train` GPS with and
//! without `--checkpoint-blocks`, `select` with data) on a seeded random checkpoint in the
//! official layout, each run a child process of this binary ([`gps_seg::bench::run_memory`]).

use gps_seg::bench::run_memory::{self, RunMemoryConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SAM preset of the random checkpoint (written with the preset's native position tables).
    #[arg(long, default_value = "vit_b")]
    pub model: String,
    /// `--image-size` of every run (the tables are resized at load).
    #[arg(long, default_value_t = 512)]
    pub image_size: usize,
    /// Synthetic Kvasir-shaped images generated (the runs split them into train / val / test).
    #[arg(long, default_value_t = 12)]
    pub images: usize,
    /// Largest side of the generated images.
    #[arg(long, default_value_t = 512)]
    pub max_side: usize,
    #[arg(long, default_value_t = 2)]
    pub select_batches: usize,
    #[arg(long, default_value_t = 2)]
    pub max_steps: usize,
    #[arg(long, default_value_t = 2)]
    pub test_limit: usize,
    /// `--threads` of every run.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Only these rows (comma-separated: train, "train --checkpoint-blocks", select); default
    /// all.
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Write the checkpoint, data and runs into this new (or empty) folder and keep them
    /// (default: a temporary folder, removed afterwards).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = RunMemoryConfig {
        model: a.model,
        image_size: a.image_size,
        images: a.images,
        max_side: a.max_side,
        select_batches: a.select_batches,
        max_steps: a.max_steps,
        test_limit: a.test_limit,
        threads: a.threads,
        only: a.rows,
        seed: 0,
        keep: a.keep,
    };
    let exe = std::env::current_exe()?;
    let (prep, rows) = run_memory::run(&cfg, &exe, |r| eprintln!("run-memory: {r}"))?;
    println!(
        "whole-run peak memory: SAM `{}` random checkpoint ({:.0} MB safetensors, native \
         position tables) at --image-size {}, {} selection batches, {} steps, {} test images",
        cfg.model,
        prep.checkpoint_bytes as f64 / 1e6,
        cfg.image_size,
        cfg.select_batches,
        cfg.max_steps,
        cfg.test_limit
    );
    println!("{}", gps_seg::util::cpu::bench_header(cfg.threads));
    println!("| run | peak RSS | wall s |");
    println!("|---|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} MB | {:.1} |",
            r.name,
            r.peak_rss_bytes as f64 / (1024.0 * 1024.0),
            r.seconds
        );
    }
    println!(
        "(peak RSS = ru_maxrss of each run's own process, from wait4; it cannot read below the \
         spawning process's own peak, {:.0} MB here)",
        gps_seg::util::mem::peak_rss_mb()
    );
    Ok(())
}
