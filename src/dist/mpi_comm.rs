//! [`Collective`] over the system MPI's `MPI_COMM_WORLD` (feature `mpi`, the `mpi` crate).
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the training loop calls the collectives
//! from one thread at a time (the loop's own thread; the kernels' rayon workers never call
//! MPI). Errors inside MPI use the world's default handler, `MPI_ERRORS_ARE_FATAL`: the job
//! is aborted. A rank that dies is noticed by the launcher (`mpirun`, `srun`), which ends the
//! others.

use super::collective::{check_root, Collective};
use crate::error::{Error, Result};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};

/// The world communicator's rank and size (the communicator itself is made per call: a
/// handle to `MPI_COMM_WORLD`, nothing to keep).
#[derive(Debug, Clone, Copy)]
pub struct Mpi {
    rank: usize,
    size: usize,
}

/// Initialise MPI (the returned universe finalises it when dropped).
pub fn init() -> Result<(Universe, Mpi)> {
    let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
        .ok_or_else(|| Error::msg("MPI was already initialised in this process"))?;
    if provided < Threading::Serialized {
        return Err(Error::msg(format!(
            "the MPI library provides thread level {provided:?}; gps-seg needs Serialized \
             (its kernels run on worker threads while the loop's thread calls MPI)"
        )));
    }
    let w = universe.world();
    let (rank, size) = (w.rank(), w.size());
    let conv = |v: i32, what: &str| {
        usize::try_from(v).map_err(|_| Error::msg(format!("MPI reported a {what} of {v}")))
    };
    Ok((
        universe,
        Mpi {
            rank: conv(rank, "rank")?,
            size: conv(size, "world size")?,
        },
    ))
}

/// `MPI_Abort` on the world: every rank ends with `code`.
pub fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.size == 1 || buf.is_empty() {
            return Ok(());
        }
        check_count(buf.len())?;
        let send = buf.to_vec();
        SimpleCommunicator::world().all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        if self.size == 1 || buf.is_empty() {
            return Ok(());
        }
        check_count(buf.len())?;
        let r = i32::try_from(root).map_err(|_| Error::msg(format!("rank {root}")))?;
        SimpleCommunicator::world()
            .process_at_rank(r)
            .broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        SimpleCommunicator::world().barrier();
        Ok(())
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
}

/// MPI counts are C ints: a longer buffer would have to be split.
fn check_count(len: usize) -> Result<()> {
    if i32::try_from(len).is_err() {
        return Err(Error::msg(format!(
            "a collective of {len} values is beyond MPI's count limit ({})",
            i32::MAX
        )));
    }
    Ok(())
}
