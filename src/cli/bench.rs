//! `gps-seg bench <what>`: speed and memory tables. Numbers are measured, never asserted in tests.

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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Data {
            images,
            max_side,
            size,
            batch_size,
            resize,
        } => {
            let cfg = gps_seg::data::bench::DataBenchConfig {
                images,
                max_side,
                size,
                batch_size,
                resize: resize.parse()?,
            };
            let rows = gps_seg::data::bench::run(&cfg)?;
            println!(
                "data pipeline: {images} JPEGs (max side {max_side}) → {size}×{size} ({resize}), batch {batch_size}, flip augment, CPU tensors"
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
        }
    }
    Ok(())
}
