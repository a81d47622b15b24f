//! `gps-seg runtime fetch|where`: provision and locate the ONNX Runtime library.

use clap::Subcommand;
use gps_seg::infer::runtime;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Download onnxruntime 1.31.1 from PyPI with pip, verify its SHA-256 and extract
    /// libonnxruntime.so into the project cache.
    Fetch,
    /// Print the library search order and what was found.
    Where {
        /// An explicit libonnxruntime.so to check first.
        #[arg(long)]
        ort_lib: Option<PathBuf>,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Fetch => {
            let p = runtime::fetch(&mut |line| println!("{line}"))?;
            println!(
                "ONNX Runtime {} ready: {}",
                runtime::ORT_VERSION,
                p.display()
            );
            Ok(())
        }
        Action::Where { ort_lib } => {
            println!("search order (first existing wins):");
            for (i, c) in runtime::search_order(ort_lib.as_deref()).iter().enumerate() {
                let mark = if c.exists { "found" } else { "-" };
                println!("  {}. [{mark}] {} ({})", i + 1, c.path.display(), c.source);
            }
            let p = runtime::locate(ort_lib.as_deref())?;
            println!("using {}", p.display());
            Ok(())
        }
    }
}
