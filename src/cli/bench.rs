//! `gps-seg bench <what>`: speed and memory tables. Numbers are measured, never asserted in tests.

use clap::Subcommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// GPS: selection time and optimizer-state size (GPS vs baselines).
    Gps(super::bench_gps::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Gps(a) => super::bench_gps::run(a),
    }
}
