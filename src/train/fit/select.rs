//! The GPS selection phase, written once for every task: gradients of the task's selection
//! loss with the pretrained weights (or magnitude / random scores), then top-K per row at the
//! configured level, saved as the run's artifact.

use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::gps::artifact::{Artifact, BaseModel, SelectionInfo};
use crate::gps::grads::{accumulate_with, grad_store};
use crate::gps::select::{select as select_entries, Criterion, SelectSpec};
use crate::progress::{Event, Observer};
use crate::train::task::{SelectionSetup, Task};
use crate::util::tensors::TensorMap;
use crate::util::threads::on_worker;
use candle_core::Device;
use std::path::Path;
use std::time::Instant;

/// Selection for the sparse methods into `art_dir` (with `reuse`, read back when it is already
/// there, as on resume): gradients of the task's selection loss with the pretrained weights (GPS), or
/// magnitude / random scores, then top-K per row at the configured level. Data parallel
/// (`comm` of several ranks): the gradient pass is split by batches over the ranks and summed
/// ([`super::parallel::reduce_scores`]); every rank selects the same entries, rank 0 saves.
#[allow(clippy::too_many_arguments)]
pub fn selection<T: Task>(
    task: &T,
    data: &T::Data,
    base: &mut TensorMap,
    art_dir: &Path,
    reuse: bool,
    device: &Device,
    comm: &dyn Collective,
    obs: &mut dyn Observer,
) -> Result<Artifact> {
    let core = task.core();
    let criterion = core
        .method
        .criterion()
        .ok_or_else(|| Error::msg("selection asked for a method without one"))?;
    let setup = task.selection().ok_or_else(|| {
        Error::msg(format!(
            "`{}` selects entries; the {} task has no selection",
            core.method.name(),
            T::NAME
        ))
    })?;
    if reuse && art_dir.join("gps_config.json").exists() {
        obs.event(Event::Info(format!(
            "selection: reusing {}",
            art_dir.display()
        )));
        let art = Artifact::load(art_dir, device)?;
        let want = SelectionInfo {
            k: core.topk,
            level: core.level,
            criterion,
            selection_loss: setup.loss_name.clone(),
            batches: 0,
            selection_images: 0,
            seed: core.seed,
        };
        art.check_reusable(art_dir, &want, &BaseModel::of(base, &core.base_file())?)?;
        return Ok(art);
    }
    let t0 = Instant::now();
    let (grads, batches, images) = if criterion == Criterion::Gradient {
        let (g, n, i) = gradients(task, data, base, &setup, device, comm, obs)?;
        (Some(g), n, i)
    } else {
        (None, 0, 0)
    };
    let spec = SelectSpec {
        policy: &setup.policy,
        k: core.topk,
        level: core.level,
        criterion,
        seed: core.seed,
    };
    let selection = select_entries(base, grads.as_ref(), &spec)?;
    let info = SelectionInfo {
        k: core.topk,
        level: core.level,
        criterion,
        selection_loss: setup.loss_name,
        batches,
        selection_images: images,
        seed: core.seed,
    };
    let art = Artifact::new(
        setup.policy,
        info,
        BaseModel::of(base, &core.base_file())?,
        selection,
    )?;
    if comm.is_root() {
        art.save(art_dir)?;
    }
    if criterion == Criterion::Gradient {
        obs.event(Event::PhaseEnd {
            summary: format!(
                "gradients over {batches} batches ({images} images), selection in {:.1}s",
                t0.elapsed().as_secs_f64()
            ),
        });
    }
    Ok(art)
}

/// Selection gradients: a store over `base` whose only vars are the policy's selected tensors
/// (sharing `base`'s storage, [`grad_store`]), the selection loss's gradients
/// ([`Task::selection_backward`]) summed over one pass of the task's selection loader (the whole
/// training split, or its first `select_batches` batches when capped), batches streamed one at
/// a time, each gradient added to its score buffer and dropped. Returns the gradients, the
/// batches and the images seen. Data parallel: rank `r` of `N` takes batches `r, r + N, …`
/// (skipping the others undecoded) and the sums are added over the ranks.
fn gradients<T: Task>(
    task: &T,
    data: &T::Data,
    base: &mut TensorMap,
    setup: &SelectionSetup,
    device: &Device,
    comm: &dyn Collective,
    obs: &mut dyn Observer,
) -> Result<(TensorMap, usize, usize)> {
    let store = grad_store(base, &setup.policy, device)?;
    let model = task.build(data, &store)?;
    let vars = store.trainable_vars();
    let mut loader = task.selection_loader(data)?;
    let all = loader.batches_per_epoch().max(1);
    let n = task.core().select_batches.map_or(all, |c| c.min(all));
    let (rank, ranks) = (comm.rank(), comm.size());
    let mine = (0..n).filter(|k| k % ranks == rank).count();
    obs.event(Event::PhaseStart {
        name: setup.phase.clone(),
        total: mine,
    });
    let mut k = 0;
    let batches = std::iter::from_fn(|| {
        while k < n {
            k += 1;
            if (k - 1) % ranks == rank {
                return loader.next_batch(device).transpose();
            }
            if !loader.skip_batch() {
                return None;
            }
        }
        None
    });
    let (mut done, mut images) = (0usize, 0usize);
    if ranks > 1 && mine == 0 {
        // More ranks than selection batches: this one adds nothing.
        return super::parallel::reduce_scores(comm, &vars, None, (0, 0));
    }
    let (grads, seen) = accumulate_with(&vars, batches, |b| {
        let b = b?;
        images += T::batch_len(&b)?;
        let (loss, grads) = on_worker(|| task.selection_backward(&model, &b))?;
        done += 1;
        obs.event(Event::Step {
            done,
            loss: loss.to_scalar::<f32>().ok().map(f64::from),
            lr: None,
            images_per_s: None,
        });
        Ok((loss, grads))
    })?;
    if ranks > 1 {
        return super::parallel::reduce_scores(comm, &vars, Some(grads), (seen, images));
    }
    Ok((grads, seen, images))
}
