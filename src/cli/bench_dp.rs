//! `gps-seg bench dp`: bytes all-reduced per data-parallel step and step time, GPS vs full,
//! on one process or the ranks of `mpirun -np N gps-seg bench dp --distributed mpi`.

use crate::cli::common::DeviceArgs;
use gps_seg::bench::dp::{bench_dp, format_table, DpRow, DpSpec};
use gps_seg::bench::train::StepKind;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SAM presets (random weights), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "tiny,vit_b")]
    pub models: Vec<String>,
    /// Input size of every row.
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// The global batch (split over the ranks).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Timed steps per row (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `mpi`: measure on the ranks `mpirun` started (a build with `--features mpi`).
    #[arg(long, value_enum, default_value = "none")]
    pub distributed: gps_seg::dist::Backend,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let world = gps_seg::dist::init(a.distributed)?;
    let r = rows(&a);
    let rows = world.exit_on_error(r)?;
    let comm = gps_seg::dist::world();
    if comm.is_root() {
        println!(
            "{}",
            gps_seg::util::cpu::bench_header(candle_core::utils::get_num_threads())
        );
        println!(
            "{} rank(s) ({}), global batch {}, threads per rank as above",
            comm.size(),
            comm.name(),
            a.batch
        );
        print!("{}", format_table(&rows));
        for m in &a.models {
            let bytes = |k: StepKind| {
                rows.iter()
                    .find(|r| &r.spec.model == m && r.spec.kind == k)
                    .map(|r| r.bytes_per_step as f64)
            };
            if let (Some(g), Some(f)) = (bytes(StepKind::Gps), bytes(StepKind::Full)) {
                println!(
                    "{m}: GPS all-reduces {:.2}% of full's bytes per step",
                    100.0 * g / f
                );
            }
        }
    }
    Ok(())
}

fn rows(a: &Args) -> anyhow::Result<Vec<DpRow>> {
    let dev = a.device.resolve()?;
    let comm = gps_seg::dist::world();
    let mut out = Vec::new();
    for model in &a.models {
        for kind in [StepKind::Gps, StepKind::Full] {
            let spec = DpSpec {
                model: model.clone(),
                image_size: a.image_size,
                batch: a.batch,
                iters: a.iters,
                kind,
                seed: a.seed,
            };
            out.push(bench_dp(&spec, comm, &dev)?);
        }
    }
    Ok(out)
}
