//! Data-parallel step benchmark (`gps-seg bench dp`, #30): per model and method (GPS K = 1,
//! full), the bytes one step all-reduces and the step time on the process's world
//! ([`crate::dist::world`]: one process, or the ranks of `mpirun … --distributed mpi`).
//!
//! A step is the training loop's data-parallel step: forward + backward of this rank's part
//! of the global batch (random images and masks, BCE), the trainable gradients packed and
//! all-reduced ([`reduce_step`]), the optimiser update (Adam for GPS, AdamW for full) —
//! the setups of [`super::train`] (random weights, random-score selection: selection cost is
//! not part of a step). The bytes are those of [`reduce_step`]'s buffer: 4 per trainable
//! entry, plus one flag per var and two counters.

use super::train::{full_setup, gps_setup, random_batch, StepKind};
use crate::data::loader::shard_range;
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::nn::ParamStore;
use crate::sam::{Sam, SamConfig};
use crate::train::fit::optim::Optimizer;
use crate::train::fit::parallel::reduce_step;
use crate::train::loss::bce_with_logits;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// One row's setting.
#[derive(Debug, Clone)]
pub struct DpSpec {
    /// SAM preset (`tiny`, `vit_b`, …).
    pub model: String,
    pub image_size: usize,
    /// The global batch (split over the ranks).
    pub batch: usize,
    /// Timed steps, after one warm-up step.
    pub iters: usize,
    pub kind: StepKind,
    pub seed: u64,
}

/// One measured row (the same on every rank but the times, which are this rank's).
#[derive(Debug, Clone)]
pub struct DpRow {
    pub spec: DpSpec,
    pub ranks: usize,
    pub trainable: usize,
    pub total: usize,
    /// Bytes of the buffer a data-parallel step all-reduces (with one rank it is not sent).
    pub bytes_per_step: usize,
    /// Median milliseconds of a whole step, and of its all-reduce alone.
    pub step_ms: f64,
    pub reduce_ms: f64,
}

/// Bytes [`reduce_step`] all-reduces for `vars`: the values, one flag per var, 2 counters.
pub fn reduce_bytes(store: &ParamStore) -> usize {
    let vars = store.trainable_vars();
    let values: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    4 * (values + vars.len() + 2)
}

/// Measure `spec` on the ranks of `comm` (every rank calls it).
pub fn bench_dp(spec: &DpSpec, comm: &dyn Collective, dev: &Device) -> Result<DpRow> {
    let cfg = SamConfig::preset(&spec.model)?.with_image_size(spec.image_size);
    cfg.validate()?;
    let (sam, store, mut opt): (Sam, ParamStore, Box<dyn Optimizer>) = match spec.kind {
        StepKind::Full => {
            let (s, st, o) = full_setup(&cfg, dev, spec.seed)?;
            (s, st, Box::new(o))
        }
        StepKind::Gps => {
            let (s, st, _, o) = gps_setup(&cfg, dev, spec.seed, 1, 1e-4)?;
            (s, st, Box::new(o))
        }
    };
    let (x, t) = random_batch(spec.batch, spec.image_size, spec.seed, dev)?;
    let mine = shard_range(0..spec.batch, comm.rank(), comm.size());
    let (x, t) = (
        x.narrow(0, mine.start, mine.len())?,
        t.narrow(0, mine.start, mine.len())?,
    );
    let vars = store.trainable_vars();
    let step = |opt: &mut dyn Optimizer| -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let local = match mine.is_empty() {
            true => None,
            false => Some(local_step(&sam, &x, &t)?),
        };
        let t1 = Instant::now();
        let grads = match comm.size() {
            1 => local
                .map(|l| l.1)
                .ok_or_else(|| Error::msg("an empty batch"))?,
            _ => reduce_step(comm, &vars, local)?.grads,
        };
        let reduce = t1.elapsed().as_secs_f64() * 1e3;
        crate::util::threads::on_worker(|| opt.step(&grads))?;
        Ok((t0.elapsed().as_secs_f64() * 1e3, reduce))
    };
    step(opt.as_mut())?;
    let (mut steps, mut reduces) = (Vec::new(), Vec::new());
    for _ in 0..spec.iters.max(1) {
        let (s, r) = step(opt.as_mut())?;
        steps.push(s);
        reduces.push(r);
    }
    let (trainable, total) = store.counts();
    Ok(DpRow {
        spec: spec.clone(),
        ranks: comm.size(),
        trainable,
        total,
        bytes_per_step: reduce_bytes(&store),
        step_ms: crate::stats::median(&steps),
        reduce_ms: crate::stats::median(&reduces),
    })
}

/// Forward + backward of this rank's images (BCE, one image chunk per thread as the loop's
/// step): the loss, the gradients and the images.
fn local_step(
    sam: &Sam,
    x: &Tensor,
    t: &Tensor,
) -> Result<(f32, candle_core::backprop::GradStore, usize)> {
    let n = x.dim(0)?;
    let (loss, grads) = crate::util::threads::on_worker(|| {
        crate::nn::split_backward(n, x.device().is_cpu(), |r| {
            let xs = x.narrow(0, r.start, r.len())?;
            let ts = t.narrow(0, r.start, r.len())?;
            let y = sam.forward_prompt_free(&xs)?;
            Ok((bce_with_logits(&y, &ts)? * (r.len() as f64 / n as f64))?)
        })
    })?;
    Ok((loss.to_scalar::<f32>()?, grads, n))
}

/// The table of `rows` (rank 0 prints it).
pub fn format_table(rows: &[DpRow]) -> String {
    let mut s = format!(
        "{:<6} {:>5} {:<5} {:>5} {:>6} {:>12} {:>8} {:>14} {:>9} {:>10}\n",
        "model",
        "px",
        "kind",
        "ranks",
        "batch",
        "trainable",
        "%",
        "MB reduced/step",
        "step ms",
        "reduce ms"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<6} {:>5} {:<5} {:>5} {:>6} {:>12} {:>7.3}% {:>14.2} {:>9.0} {:>10.1}\n",
            r.spec.model,
            r.spec.image_size,
            r.spec.kind.as_str(),
            r.ranks,
            r.spec.batch,
            r.trainable,
            100.0 * r.trainable as f64 / r.total.max(1) as f64,
            r.bytes_per_step as f64 / 1e6,
            r.step_ms,
            r.reduce_ms
        ));
    }
    s
}
