//! `gps-seg merge --base CKPT --delta DIR --out merged.safetensors`: fold a trained GPS
//! artifact into its base checkpoint, producing a full checkpoint with the base's names and
//! shapes (written atomically), and print what changed.

use anyhow::Context;
use gps_seg::gps::counts::thousands;
use gps_seg::gps::{merge_with_report, Artifact};
use gps_seg::util::tensors;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base checkpoint the artifact was made for (.safetensors or .pth).
    #[arg(long)]
    pub base: PathBuf,
    /// Trained GPS artifact folder (gps_config.json, selection.safetensors, delta.safetensors).
    #[arg(long)]
    pub delta: PathBuf,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out; without it merge never replaces a file it did not write.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut io = gps_seg::util::fs::IoPaths::new()
        .input("--base", &a.base)
        .input("--delta", &a.delta)
        .output("--out", &a.out);
    // The base's config beside it (`<stem>.json`) belongs to the base.
    if let Some(stem) = a.base.file_stem() {
        let c = a
            .base
            .with_file_name(format!("{}.json", stem.to_string_lossy()));
        if c.exists() {
            io = io.input("--base (config beside it)", c);
        }
    }
    io.enforce(a.overwrite)?;
    let dev = candle_core::Device::Cpu;
    let base = tensors::load(&a.base, &dev)?;
    let art = Artifact::load(&a.delta, &dev)?;
    let (merged, rep) = merge_with_report(&base, &art)
        .with_context(|| format!("merging {} into {}", a.delta.display(), a.base.display()))?;
    tensors::save_safetensors(&a.out, &merged, None)?;
    println!(
        "patched {} selected tensors ({} entries), replaced {} trainable tensors ({} entries); \
         {} entries differ from the base; {} tensors unchanged",
        rep.sparse_tensors,
        thousands(rep.sparse_entries),
        rep.full_tensors,
        thousands(rep.full_entries),
        thousands(rep.changed_entries),
        rep.untouched_tensors
    );
    println!("wrote {}", a.out.display());
    Ok(())
}
