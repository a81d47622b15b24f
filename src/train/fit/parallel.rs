//! Data parallel in the one loop ([`super::run`]): what the ranks of a [`Collective`] exchange.
//!
//! - A training step: every rank runs the task's step on its part of the global batch
//!   ([`crate::data::loader::Loader::run_shard_batches`]); [`reduce_step`] packs the
//!   trainable gradients (exactly the optimiser's vars, in name order) into one flat buffer,
//!   each weighted by the rank's images, all-reduces it and divides by the batch's images: the
//!   gradient of the batch-mean loss over the whole global batch (the task's loss is a mean of
//!   per-sample terms, [`Task::batch_mean_loss`](crate::train::task::Task::batch_mean_loss)),
//!   the same on every rank, so every rank takes the same optimiser step.
//! - The GPS selection pass: rank `r` takes batches `r, r + N, …` of the selection loader and
//!   [`reduce_scores`] sums the ranks' accumulated gradients: the sum over the whole split.
//! - The run folder: rank 0 writes it; the others read what rank 0 wrote ([`open_ordered`]).

use super::checkpoint::{Checkpoints, KeepPolicy};
use super::folder::open_run;
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::progress::Observer;
use crate::train::task::Task;
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// The largest count carried exactly in an `f32` slot of the reduced buffer.
const MAX_EXACT: usize = 1 << 24;

/// What every rank of a step agrees on after [`reduce_step`].
pub struct Reduced {
    /// The loss of the whole global batch (the images-weighted mean of the ranks' losses).
    pub loss: f32,
    /// Images in the global batch.
    pub images: usize,
    /// The gradients of the vars over the global batch (vars no rank reached: none).
    pub grads: GradStore,
}

/// A gradient store without entries of `vars` (for a rank with no images in a step).
fn empty_grads() -> Result<GradStore> {
    // Candle's `GradStore::new` is private: the backward of a constant gives a store whose
    // only entry is that constant (no var of the model).
    Ok(Tensor::new(0f32, &Device::Cpu)?.backward()?)
}

/// Values of `t` as a flat f32 host vector.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// One flat all-reduce buffer over `vars`: each var's values in order, then one presence flag
/// per var (a var no rank has a gradient for stays absent), then two scalars.
struct Packed {
    buf: Vec<f32>,
    /// Each var's part of `buf`.
    ranges: Vec<std::ops::Range<usize>>,
    /// Where the flags start (the number of values).
    values: usize,
    /// Where the two scalars start.
    tail: usize,
}

impl Packed {
    fn new(vars: &[(String, Var)]) -> Packed {
        let mut ranges = Vec::with_capacity(vars.len());
        let mut values = 0;
        for (_, v) in vars {
            ranges.push(values..values + v.elem_count());
            values += v.elem_count();
        }
        let tail = values + vars.len();
        Packed {
            buf: vec![0f32; tail + 2],
            ranges,
            values,
            tail,
        }
    }

    /// Var `k` (named `name`) gets the values of `g` times `w`, and is marked present.
    fn put(&mut self, k: usize, name: &str, g: &Tensor, w: f32) -> Result<()> {
        let g = host(g)?;
        let r = self.ranges[k].clone();
        let expected = r.len();
        let dst = self
            .buf
            .get_mut(r)
            .filter(|d| d.len() == g.len())
            .ok_or_else(|| Error::ShapeMismatch {
                name: name.to_string(),
                found: vec![g.len()],
                expected: vec![expected],
            })?;
        dst.iter_mut().zip(&g).for_each(|(d, &x)| *d = x * w);
        self.buf[self.values + k] = 1.0;
        Ok(())
    }

    /// Var `k`'s summed values, `None` when no rank had it.
    fn get(&self, k: usize) -> Option<&[f32]> {
        (self.buf[self.values + k] > 0.0).then(|| &self.buf[self.ranges[k].clone()])
    }
}

/// Pack rank-local gradients of `vars` (`local`: the step's loss, gradients and images;
/// `None` when this rank's part of the batch is empty), all-reduce, unpack the global mean.
pub fn reduce_step(
    comm: &dyn Collective,
    vars: &[(String, Var)],
    local: Option<(f32, GradStore, usize)>,
) -> Result<Reduced> {
    let (loss, mut grads, n) = match local {
        Some(l) => l,
        None => (0.0, empty_grads()?, 0),
    };
    if n > MAX_EXACT {
        return Err(Error::msg(format!("a batch of {n} images per rank")));
    }
    let mut p = Packed::new(vars);
    let w = n as f32;
    for (k, (name, var)) in vars.iter().enumerate() {
        if let Some(g) = grads.get(var.as_tensor()) {
            p.put(k, name, g, w)?;
        }
    }
    let tail = p.tail;
    p.buf[tail] = loss * w;
    p.buf[tail + 1] = w;
    comm.all_reduce_sum(&mut p.buf)?;
    let total = p.buf[tail + 1];
    if total < 0.5 {
        return Err(Error::Data {
            msg: "a data-parallel step with no image on any rank".into(),
        });
    }
    for (k, (_, var)) in vars.iter().enumerate() {
        match p.get(k) {
            Some(part) => {
                let mean: Vec<f32> = part.iter().map(|&v| v / total).collect();
                let t = Tensor::from_vec(mean, var.dims(), var.device())?.to_dtype(var.dtype())?;
                grads.insert(var.as_tensor(), t);
            }
            None => {
                grads.remove(var.as_tensor());
            }
        }
    }
    let buf = p.buf;
    Ok(Reduced {
        loss: buf[tail] / total,
        images: total.round() as usize,
        grads,
    })
}

/// The selection pass's accumulated gradients of `vars` summed over the ranks, with the
/// batches and images seen (`local`: this rank's sums, `None` when it had no batch). A var no
/// rank reached is absent, as in one process.
pub fn reduce_scores(
    comm: &dyn Collective,
    vars: &[(String, Var)],
    local: Option<TensorMap>,
    (batches, images): (usize, usize),
) -> Result<(TensorMap, usize, usize)> {
    if batches.max(images) > MAX_EXACT {
        return Err(Error::msg(format!(
            "{images} images in {batches} selection batches on one rank: more than a \
             data-parallel selection counts exactly ({MAX_EXACT})"
        )));
    }
    let local = local.unwrap_or_default();
    let mut p = Packed::new(vars);
    for (k, (name, _)) in vars.iter().enumerate() {
        if let Some(g) = local.get(name) {
            p.put(k, name, g, 1.0)?;
        }
    }
    let tail = p.tail;
    p.buf[tail] = batches as f32;
    p.buf[tail + 1] = images as f32;
    comm.all_reduce_sum(&mut p.buf)?;
    let mut out = TensorMap::new();
    for (k, (name, var)) in vars.iter().enumerate() {
        if let Some(part) = p.get(k) {
            out.insert(
                name.clone(),
                Tensor::from_slice(part, var.dims(), var.device())?,
            );
        }
    }
    let buf = p.buf;
    let (batches, images) = (buf[tail].round() as usize, buf[tail + 1].round() as usize);
    if batches == 0 {
        return Err(Error::msg(
            "gradient accumulation saw no batches (empty selection data)",
        ));
    }
    Ok((out, batches, images))
}

/// The newest checkpoint of `run_dir` without writing anything (a rank other than 0, after
/// rank 0 opened the run): `None` on a fresh start.
fn follow_run<S: DeserializeOwned>(
    run_dir: &Path,
    keep_last: usize,
    resume: bool,
) -> Result<(Checkpoints, Option<(PathBuf, S)>)> {
    let ckpts = Checkpoints::new(
        run_dir,
        KeepPolicy {
            keep_last: keep_last.max(1),
        },
    );
    let latest = if resume { ckpts.latest()? } else { None };
    Ok((ckpts, latest))
}

/// What opening a run gives every rank: the checkpoints, the newest one (on resume), the
/// task's data and base weights.
pub type Opened<T, S> = (
    Checkpoints,
    Option<(PathBuf, S)>,
    <T as Task>::Data,
    TensorMap,
);

/// Open the run on rank 0 first ([`open_run`]: folder, config, fresh-or-resume; the task's
/// data and split files), then on the other ranks, which read what rank 0 wrote (the split,
/// the newest checkpoint). The task's `open` rewrites its small config files (the same bytes,
/// atomically) on every rank. With one process: [`open_run`] then the task's `open`.
pub fn open_ordered<T: Task, S: DeserializeOwned>(
    task: &T,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    comm: &dyn Collective,
    obs: &mut dyn Observer,
) -> Result<Opened<T, S>> {
    let keep = task.core().keep_last;
    let several = comm.size() > 1;
    if comm.is_root() {
        let (ckpts, latest) = open_run::<T, S>(run_dir, task, keep, resume)?;
        let (data, base) = task.open(run_dir, device, obs)?;
        if several {
            comm.barrier()?;
        }
        Ok((ckpts, latest, data, base))
    } else {
        comm.barrier()?;
        let (ckpts, latest) = follow_run::<S>(run_dir, keep, resume)?;
        let (data, base) = task.open(run_dir, device, obs)?;
        Ok((ckpts, latest, data, base))
    }
}
