//! The [`Collective`] trait and its one-process implementation, [`Single`].

use crate::error::{Error, Result};

/// The operations of a group of processes that train one model together. Every rank calls
/// every operation in the same order (they are collective); buffers have the same length on
/// every rank.
pub trait Collective: Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// `buf` of rank `root` copied into `buf` of every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Wait until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// The backend's name in messages (`single`, `mpi`).
    fn name(&self) -> &'static str;

    /// Element-wise mean of `buf` over all ranks, in place on every rank.
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let n = self.size() as f32;
        if self.size() > 1 {
            buf.iter_mut().for_each(|v| *v /= n);
        }
        Ok(())
    }

    /// Whether this rank writes the run folder (rank 0).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: rank 0 of 1; every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "single"
    }
}

/// `root` must be a rank of a world of `size`.
pub fn check_root(root: usize, size: usize) -> Result<()> {
    if root >= size {
        return Err(Error::msg(format!(
            "broadcast from rank {root} in a world of {size} process(es)"
        )));
    }
    Ok(())
}
