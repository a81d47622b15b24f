//! Collectives for data-parallel training: the few operations the one training loop
//! ([`crate::train::fit`]) needs from a group of processes — world size, rank, all-reduce
//! (sum / mean) of one flat `f32` buffer, broadcast, barrier — behind one trait,
//! [`Collective`].
//!
//! Implementations: [`Single`] (one process: every operation is the identity; today's
//! behaviour, no dependency) and, behind the cargo feature `mpi`, the system MPI over
//! `MPI_COMM_WORLD` (the `mpi` crate; ranks from `mpirun` / `srun`). NCCL is not implemented:
//! `--distributed nccl` is refused by name.
//!
//! A process has one world: [`init`] (called once by the command line) chooses it from
//! `--distributed` and the launcher's environment, and [`world`] returns it (a [`Single`]
//! when nothing was initialised). A process that a launcher started as one of several
//! (`OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`, `SLURM_STEP_NUM_TASKS`, `WORLD_SIZE` above 1) without
//! `--distributed` is refused: it would train the whole run N times into one run folder.

pub mod collective;
#[cfg(feature = "mpi")]
mod mpi_comm;

pub use collective::{check_root, Collective, Single};

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// Run `f` on rank 0 first, then (after a barrier) on the other ranks: rank 0 makes what
/// the others then only read (a run folder, a generated data set). One process: `f`.
pub fn root_first<R, E: From<Error>>(
    comm: &dyn Collective,
    f: impl FnOnce() -> std::result::Result<R, E>,
) -> std::result::Result<R, E> {
    if comm.size() == 1 {
        return f();
    }
    if !comm.is_root() {
        comm.barrier()?;
    }
    let r = f()?;
    if comm.is_root() {
        comm.barrier()?;
    }
    Ok(r)
}

/// `--distributed`: how the processes of one run talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// One process (the default).
    #[default]
    None,
    /// MPI (`mpirun -np N gps-seg train --distributed mpi …`, or `srun`); needs a build with
    /// the `mpi` feature.
    Mpi,
    /// NCCL between CUDA devices: not implemented (refused by name).
    Nccl,
}

/// The environment variables by which launchers tell a process the size of its world, and who
/// sets them. `SLURM_NTASKS` is not among them: it is also set inside an `sbatch` script,
/// where one process runs; `srun` sets `SLURM_STEP_NUM_TASKS` for the processes it starts.
pub const LAUNCHER_VARS: [(&str, &str); 4] = [
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    (
        "PMI_SIZE",
        "a PMI launcher (MPICH / Intel MPI mpiexec, srun --mpi=pmi2)",
    ),
    ("SLURM_STEP_NUM_TASKS", "srun"),
    ("WORLD_SIZE", "torchrun"),
];

/// The world size a launcher announced: the first of [`LAUNCHER_VARS`] that is set, as
/// (variable, launcher, size); `None` when none is set. A value that is not a positive integer
/// is an error naming the variable.
pub fn launcher_size(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<(&'static str, &'static str, usize)>> {
    for (var, who) in LAUNCHER_VARS {
        let Some(v) = get(var) else { continue };
        let n = v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| Error::Config {
                field: var.into(),
                msg: format!("`{v}` is not a world size (a positive integer); set by {who}?"),
            })?;
        return Ok(Some((var, who, n)));
    }
    Ok(None)
}

/// The process's world, once [`init`] ran.
static WORLD: OnceLock<Box<dyn Collective + Send>> = OnceLock::new();

/// The process's collective: the one [`init`] chose, or [`Single`].
pub fn world() -> &'static dyn Collective {
    match WORLD.get() {
        Some(w) => w.as_ref(),
        None => &Single,
    }
}

/// What [`init`] returns: keep it alive while the run lasts. Dropping it ends the backend
/// (MPI: `MPI_Finalize`, which waits for every rank); after a failure on one rank call
/// [`World::exit_on_error`] instead, which aborts every rank (no rank waits forever for a
/// peer that left).
pub struct World {
    #[cfg(feature = "mpi")]
    universe: Option<mpi::environment::Universe>,
}

impl World {
    /// `r` unchanged when it is `Ok` or the world has one process. An error on one of several
    /// ranks is printed (with the rank) and every rank is aborted with exit status 1.
    pub fn exit_on_error<T, E: std::fmt::Display>(
        self,
        r: std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        match r {
            Err(e) if world().size() > 1 => {
                eprintln!(
                    "error (rank {} of {}): {e:#}",
                    world().rank(),
                    world().size()
                );
                self.abort(1)
            }
            r => r,
        }
    }

    /// End every rank now with `code` (MPI: `MPI_Abort` on the world).
    pub fn abort(self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if self.universe.is_some() {
            mpi_comm::abort(code)
        }
        std::process::exit(code)
    }
}

/// Choose the process's world from `--distributed` and the launcher's environment (see the
/// module docs). Call once, before any work; keep the returned [`World`] until the end.
pub fn init(backend: Backend) -> Result<World> {
    let launched = launcher_size(|v| std::env::var(v).ok())?;
    match backend {
        Backend::None => {
            if let Some((var, who, n)) = launched.filter(|l| l.2 > 1) {
                return Err(Error::Config {
                    field: "distributed".into(),
                    msg: format!(
                        "this process was started by {who} as one of {n} ({var}={n}) but \
                         without --distributed: each would train the whole run into the same \
                         run folder; pass --distributed mpi, or start one process"
                    ),
                });
            }
            Ok(World {
                #[cfg(feature = "mpi")]
                universe: None,
            })
        }
        Backend::Mpi => init_mpi(launched),
        Backend::Nccl => Err(Error::Config {
            field: "distributed".into(),
            msg: "`nccl` is not implemented in this gps-seg (no NCCL backend is built, with or \
                  without the `cuda` feature); use --distributed mpi (CPU)"
                .into(),
        }),
    }
}

#[cfg(feature = "mpi")]
fn init_mpi(launched: Option<(&'static str, &'static str, usize)>) -> Result<World> {
    let (universe, comm) = mpi_comm::init()?;
    if let Some((var, who, n)) = launched {
        if n != comm.size() {
            return Err(Error::Config {
                field: "distributed".into(),
                msg: format!(
                    "{who} announced {n} processes ({var}={n}) but MPI sees {}: was gps-seg \
                     started by the launcher of another MPI than the one it was built with?",
                    comm.size()
                ),
            });
        }
    }
    WORLD
        .set(Box::new(comm))
        .map_err(|_| Error::msg("the distributed world was already initialised"))?;
    Ok(World {
        universe: Some(universe),
    })
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(_launched: Option<(&'static str, &'static str, usize)>) -> Result<World> {
    Err(Error::Config {
        field: "distributed".into(),
        msg: "this gps-seg was built without the `mpi` feature; rebuild with \
              `cargo build --release --features mpi` (needs an MPI and libclang: Debian \
              libopenmpi-dev openmpi-bin libclang-dev)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launcher_sizes_are_read_in_order_and_checked() {
        assert_eq!(launcher_size(env(&[])).unwrap(), None);
        let l = launcher_size(env(&[("WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_SIZE", "2")]));
        assert_eq!(
            l.unwrap().map(|l| (l.0, l.2)),
            Some(("OMPI_COMM_WORLD_SIZE", 2))
        );
        let l = launcher_size(env(&[("SLURM_STEP_NUM_TASKS", "8")])).unwrap();
        assert_eq!(l.map(|l| l.2), Some(8));
        for bad in ["0", "-1", "two", ""] {
            let e = launcher_size(env(&[("PMI_SIZE", bad)])).unwrap_err();
            assert!(e.to_string().contains("PMI_SIZE"), "{e}");
        }
    }

    #[test]
    fn single_is_the_identity_and_nccl_is_refused_by_name() {
        let mut b = vec![1.0f32, -2.5];
        Single.all_reduce_sum(&mut b).unwrap();
        Single.all_reduce_mean(&mut b).unwrap();
        Single.broadcast(&mut b, 0).unwrap();
        assert_eq!(b, vec![1.0, -2.5]);
        assert!(Single.broadcast(&mut b, 1).is_err());
        assert_eq!(
            (Single.rank(), Single.size(), Single.is_root()),
            (0, 1, true)
        );
        let e = init(Backend::Nccl).err().unwrap().to_string();
        assert!(e.contains("nccl") && e.contains("not implemented"), "{e}");
    }
}
