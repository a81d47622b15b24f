//! Subcommands. Each file holds one subcommand's flags (`Args`) and a `run` that calls the
//! library and reports; no logic lives here.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_dp;
pub mod bench_gps;
pub mod bench_memory;
pub mod bench_tasks;
pub mod bench_train;
pub mod common;
pub mod data;
pub mod demo;
pub mod eval;
pub mod experiment;
pub mod export;
pub mod infer;
pub mod info;
pub mod merge;
pub mod parity;
pub mod pretrain;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod select;
pub mod serve;
pub mod train;

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
    /// The embedded default end to end: synthetic Kvasir → GPS on sam-tiny → merge → ONNX →
    /// ONNX Runtime inference with mDice/mIoU.
    Demo(demo::Args),
    /// Evaluate a SAM checkpoint on the synthetic upstream validation scenes.
    Eval(eval::Args),
    /// Print a model's config and parameter counts per component.
    Info(info::Args),
    /// Datasets: synthetic generators and checks.
    Data(data::Args),
    /// Benchmarks: speed and memory tables.
    Bench(bench::Args),
    /// Export SAM (prompt-free graph, or image encoder + prompted decoder) or a classifier to ONNX.
    Export(export::Args),
    /// Locate or fetch the ONNX Runtime library.
    Runtime(runtime::Args),
    /// GPS parameter selection on a base checkpoint → artifact folder + counts.
    Select(select::Args),
    /// Pretrain the project's small models on synthetic upstream data.
    Pretrain(pretrain::Args),
    /// Fine-tune SAM (GPS or a baseline) on Kvasir-shaped data; evaluate every epoch.
    Train(Box<train::Args>),
    /// Merge a trained GPS artifact into its base → a full checkpoint.
    Merge(merge::Args),
    /// Batch segmentation with ONNX Runtime (or Candle): masks, overlays, mDice/mIoU, images/s.
    Infer(Box<infer::Args>),
    /// Inference reports: `report merge` joins sharded `infer --shard I/N` outputs.
    Report(report::Args),
    /// Evidence tables: GPS against its baselines (`experiment classify`).
    Experiment(experiment::Args),
    /// HTTP server over ONNX Runtime sessions: `--task NAME=FILE.onnx` (repeatable);
    /// `POST /v1/segment?task=NAME` answers the mask PNG.
    Serve(serve::Args),
    /// Check a device against the CPU: forward + backward of the prompt-free SAM, max relative
    /// error of the logits, the loss and every gradient (non-zero exit above the tolerance).
    Parity(parity::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Info(a) => info::run(a),
        Command::Data(a) => data::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Export(a) => export::run(a),
        Command::Runtime(a) => runtime::run(a),
        Command::Select(a) => select::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Train(a) => train::run(*a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Report(a) => report::run(a),
        Command::Infer(a) => infer::run(*a),
        Command::Experiment(a) => experiment::run(a),
        Command::Parity(a) => parity::run(a),
        Command::Serve(a) => serve::run(a),
    }
}
