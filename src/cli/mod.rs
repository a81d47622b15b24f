//! Subcommands. Each file holds one subcommand's flags (`Args`) and a `run` that calls the
//! library and reports; no logic lives here.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_gps;
pub mod bench_train;
pub mod common;
pub mod info;
pub mod merge;
pub mod select;

/// Fine-tune big pretrained vision models by changing a tiny, gradient-chosen subset of their
/// own weights (GPS), then export to ONNX and run batch inference.
#[derive(Debug, Parser)]
#[command(name = "gps-seg", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a model's config and parameter counts per component.
    Info(info::Args),
    /// Benchmarks: speed and memory tables.
    Bench(bench::Args),
    /// GPS parameter selection on a base checkpoint → artifact folder + counts.
    Select(select::Args),
    /// Merge a trained GPS artifact into its base → a full checkpoint.
    Merge(merge::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Select(a) => select::run(a),
        Command::Merge(a) => merge::run(a),
    }
}
