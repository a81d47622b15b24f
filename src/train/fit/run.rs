//! The one training loop. [`fit`] runs any [`Task`]: run folder (fresh or resumed, config
//! compared), roles (GPS selection, or the task's baseline roles) → [`ParamStore`], optimiser
//! (Adam; AdamW for `full`) and schedule, epochs over the prefetching loader
//! ([`Loader::run_batches`]), the NaN guard, validation and test evaluation every epoch,
//! checkpoints (keep last N and the best; "best" written atomically), the best epoch (highest
//! [`Task::score`] on the *validation* split; the test split is scored, never used to choose),
//! curves, `metrics.jsonl`, the final delta + merge and `summary.json`.
//!
//! [`evaluate`] scores the base model without training (the `zero-shot` row); [`select`] runs
//! the GPS selection phase alone. The selection phase is written once, here, for every task.

use super::checkpoint::Checkpoints;
use super::folder::{delta_from_params, restore, snapshot, write_jsonl, Opt};
use super::optim::{Adam, AdamW};
use super::parallel::{open_ordered, reduce_step, Reduced};
use super::schedule::Schedule;
use super::select::selection;
use super::summary::RunSummary;
use crate::data::loader::Loader;
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::gps::artifact::Artifact;
use crate::nn::{ParamStore, RolePolicy};
use crate::progress::{Event, Observer};
use crate::train::config::Method;
use crate::train::task::{EpochRecord, Fitted, Loaders, ScheduleUnit, Task};
use crate::util::fs::{write_json_atomic, IoPaths};
use crate::util::mem::peak_rss_mb;
use crate::util::tensors::{self, TensorMap};
use crate::util::threads::on_worker;
use candle_core::{Device, Var};
use std::path::Path;
use std::time::Instant;

/// An observer that names an evaluation phase after the split it scores (`val`, `test`).
struct SplitLabel<'o> {
    inner: &'o mut dyn Observer,
    split: &'static str,
}

impl Observer for SplitLabel<'_> {
    fn event(&mut self, e: Event) {
        match e {
            Event::PhaseStart { name, total } if name == "eval" => {
                self.inner.event(Event::PhaseStart {
                    name: self.split.into(),
                    total,
                })
            }
            e => self.inner.event(e),
        }
    }
}

/// Trainable vars by name (GPS: the deltas).
type Vars = Vec<(String, Var)>;

/// What a checkpoint's `state.json` holds for task `T`.
pub type StateOf<T> = super::folder::TrainState<EpochRecord<<T as Task>::Eval>>;

/// Validation shared by every entry point, before anything is written: the core, the method
/// against the task's list, the task's own fields, `out` against the inputs, and a
/// data-parallel world against the task's loss.
fn check<T: Task>(task: &T, device: &Device, out: &Path, comm: &dyn Collective) -> Result<()> {
    let core = task.core();
    core.validate()?;
    if comm.size() > 1 && !task.batch_mean_loss() {
        return Err(Error::Config {
            field: "distributed".into(),
            msg: format!(
                "the {} task's training loss ({}) is not a mean of per-image terms: \
                 data-parallel shards would not add up to one process's step; train it in \
                 one process",
                T::NAME,
                task.label()
            ),
        });
    }
    core.method.check_in(T::METHODS, T::NAME)?;
    task.validate(device)?;
    if core.method.criterion().is_some() && task.selection().is_none() {
        return Err(Error::Config {
            field: "method".into(),
            msg: format!(
                "`{}` selects entries; the {} task has no selection",
                core.method.name(),
                T::NAME
            ),
        });
    }
    let mut io = IoPaths::new();
    for (what, p) in task.inputs() {
        io = io.input(what, p);
    }
    io.output("--out", out).check()
}

/// Set Candle's process-wide element-wise pool for `task` ([`Task::elementwise_pool`];
/// `whole`: the selection pass alone, which never splits its batches). The one place every
/// command that trains, evaluates or selects (`train`, `select`, `demo`, `experiment`) applies
/// it: at start-up, before any tensor work or other thread exists, since it sets an
/// environment variable Candle reads once.
pub fn set_elementwise_pool<T: Task>(task: &T, whole: bool) {
    if let Some((split, values)) = task.elementwise_pool() {
        crate::util::threads::elementwise_pool_for(split && !whole, values);
    }
}

/// The run's `summary.json`: the loop's numbers and the task's part.
pub type SummaryOf<T> = RunSummary<<T as Task>::Extra>;

/// The summary of `fitted` (written to `summary.json` by the caller).
fn summarise<T: Task>(task: &T, data: &T::Data, f: Fitted<T::Eval>) -> SummaryOf<T> {
    let [train_images, val_images, test_images] = task.split_sizes(data);
    RunSummary {
        task: task.summary(data, &f),
        method: f.label.clone(),
        trainable: f.trainable,
        total: f.total,
        trainable_pct: f.trainable_pct(),
        selected_on: f.selected_on,
        best_epoch: f.best_epoch,
        train_images,
        val_images,
        test_images,
        selection_seconds: f.selection_seconds,
        seconds: f.seconds,
        seconds_per_step: f.seconds_per_step,
        peak_rss_mb: f.peak_rss_mb,
        run_dir: f.run_dir,
    }
}

/// The task's model over a store of `base` with `roles`; checks that every tensor is used and
/// reports the trainable count. Returns the model, its trainable vars and (trainable, total).
fn model_over<T: Task>(
    task: &T,
    data: &T::Data,
    base: &TensorMap,
    roles: RolePolicy,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(T::Model, Vars, (usize, usize))> {
    let store = ParamStore::new(Some(base.clone()), roles, device, task.core().seed);
    let model = task.build(data, &store)?;
    store.check_all_used()?;
    let (trainable, total) = store.counts();
    obs.event(Event::Info(format!(
        "method {}: {trainable} of {total} parameters train ({:.3}%)",
        task.label(),
        100.0 * trainable as f64 / total.max(1) as f64
    )));
    Ok((model, store.trainable_vars(), (trainable, total)))
}

/// Train (or resume) one run of `task` in `run_dir`, data parallel over the process's world
/// ([`crate::dist::world`]; one process unless `--distributed` set it up).
pub fn fit<T: Task>(
    task: &T,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<SummaryOf<T>> {
    fit_on(task, run_dir, device, resume, crate::dist::world(), obs)
}

/// [`fit`] over the ranks of `comm` (this process is `comm.rank()`): each rank trains on its
/// part of every global batch, gradients are averaged over the ranks ([`super::parallel`]),
/// rank 0 writes the run folder. Every rank returns the same summary (rank 0's names the
/// merged weights; the others' none).
pub fn fit_on<T: Task>(
    task: &T,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    comm: &dyn Collective,
    obs: &mut dyn Observer,
) -> Result<SummaryOf<T>> {
    check(task, device, run_dir, comm)?;
    if task.core().method == Method::ZeroShot {
        return Err(Error::Config {
            field: "method".into(),
            msg: "`zero-shot` trains nothing; evaluate the base model with `fit::evaluate`".into(),
        });
    }
    let mut run = Run::prepare(task, run_dir, device, resume, comm, obs)?;
    while run.state.epochs_done < task.core().epochs {
        run.epoch(obs)?;
    }
    run.finish()
}

/// Evaluate the base model on the held-out split without training (the `zero-shot` row):
/// `config.json`, the split, the best-epoch files of the task and `summary.json` (best epoch
/// 0, merged = the base checkpoint).
pub fn evaluate<T: Task>(
    task: &T,
    run_dir: &Path,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<SummaryOf<T>> {
    let comm = crate::dist::world();
    check(task, device, run_dir, comm)?;
    let t_start = Instant::now();
    let core = task.core();
    let (_, _, data, base) =
        open_ordered::<T, serde_json::Value>(task, run_dir, device, false, comm, obs)?;
    let (model, _, (trainable, total)) =
        model_over(task, &data, &base, RolePolicy::AllFrozen, device, obs)?;
    let Loaders {
        mut val, mut test, ..
    } = task.loaders(&data)?;
    let val_eval = match val.as_mut() {
        Some(v) => {
            let mut on_val = SplitLabel {
                inner: obs,
                split: "val",
            };
            task.evaluate(&model, v, device, &mut on_val)?.0
        }
        None => Default::default(),
    };
    let mut on_test = SplitLabel {
        inner: obs,
        split: "test",
    };
    let (eval, kept) = task.evaluate(&model, &mut test, device, &mut on_test)?;
    if comm.is_root() {
        task.write_best(run_dir, &data, &kept)?;
    }
    let fitted = Fitted {
        label: task.label(),
        trainable,
        total,
        best_epoch: Some(0),
        selected_on: "val".into(),
        best_val: val_eval,
        best: eval.clone(),
        last: eval,
        selection_seconds: 0.0,
        seconds: t_start.elapsed().as_secs_f64(),
        seconds_per_step: 0.0,
        peak_rss_mb: peak_rss_mb(),
        run_dir: run_dir.to_path_buf(),
        merged: core.base.clone(),
    };
    let summary = summarise(task, &data, fitted);
    if comm.is_root() {
        write_json_atomic(&run_dir.join("summary.json"), &summary)?;
    }
    Ok(summary)
}

/// The GPS selection phase alone: the artifact (`gps_config.json` + `selection.safetensors`)
/// of the task's sparse method in `out`, with the split beside it.
pub fn select<T: Task>(
    task: &T,
    out: &Path,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<Artifact> {
    select_on(task, out, device, crate::dist::world(), obs)
}

/// [`select`] over the ranks of `comm`: the gradient pass split by batches over the ranks and
/// summed; every rank returns the same artifact, rank 0 writes it.
pub fn select_on<T: Task>(
    task: &T,
    out: &Path,
    device: &Device,
    comm: &dyn Collective,
    obs: &mut dyn Observer,
) -> Result<Artifact> {
    check(task, device, out, comm)?;
    if task.core().method.criterion().is_none() {
        return Err(Error::Config {
            field: "method".into(),
            msg: format!("`{}` selects nothing", task.core().method.name()),
        });
    }
    // Rank 0 makes the folder and the task's files first; the others then read them.
    let (data, mut base) = crate::dist::root_first(comm, || {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        task.open(out, device, obs)
    })?;
    selection(task, &data, &mut base, out, false, device, comm, obs)
}

/// One run in progress: everything the epochs share.
struct Run<'a, T: Task> {
    task: &'a T,
    comm: &'a dyn Collective,
    run_dir: &'a Path,
    device: &'a Device,
    data: T::Data,
    base: TensorMap,
    artifact: Option<Artifact>,
    model: T::Model,
    vars: Vars,
    opt: Opt,
    ckpts: Checkpoints,
    state: StateOf<T>,
    train: Loader<T::Source>,
    val: Option<Loader<T::Source>>,
    test: Loader<T::Source>,
    schedule: Schedule,
    unit: ScheduleUnit,
    steps: usize,
    counts: (usize, usize),
    started: Instant,
    selection_seconds: f64,
    step_secs: f64,
    step_count: usize,
}

impl<'a, T: Task> Run<'a, T> {
    /// Open (or resume) the run folder, select (sparse methods), build the model, the
    /// optimiser, the loaders and the schedule; restore the latest checkpoint when resuming.
    fn prepare(
        task: &'a T,
        run_dir: &'a Path,
        device: &'a Device,
        resume: bool,
        comm: &'a dyn Collective,
        obs: &mut dyn Observer,
    ) -> Result<Self> {
        let started = Instant::now();
        let core = task.core();
        let (ckpts, latest, data, mut base) =
            open_ordered::<T, StateOf<T>>(task, run_dir, device, resume, comm, obs)?;
        let t_sel = Instant::now();
        let artifact = match core.method.criterion() {
            Some(_) => Some(selection(
                task,
                &data,
                &mut base,
                &run_dir.join("gps"),
                true,
                device,
                comm,
                obs,
            )?),
            None => None,
        };
        let selection_seconds = match artifact {
            Some(_) => t_sel.elapsed().as_secs_f64(),
            None => 0.0,
        };
        let roles = match &artifact {
            Some(a) => RolePolicy::Map(a.selection.roles()),
            None => task.baseline_roles(&base)?,
        };
        let (model, vars, counts) = model_over(task, &data, &base, roles, device, obs)?;
        let opt = match core.method {
            Method::Full => Opt::AdamW(AdamW::new(vars.clone(), core.lr, core.weight_decay)?),
            _ => Opt::Adam(Adam::new(vars.clone(), core.lr)?),
        };
        let Loaders { train, val, test } = task.loaders(&data)?;
        let steps = steps_per_epoch(task, &train)?;
        let (schedule, unit) = task.schedule(steps);
        let state = StateOf::<T> {
            epochs_done: 0,
            global_step: 0,
            loader: train.state(),
            history: Vec::new(),
            best_epoch: None,
            step_losses: Vec::new(),
        };
        #[rustfmt::skip]
        let mut run = Run {
            task, comm, run_dir, device, data, base, artifact, model, vars, opt, ckpts, state, train,
            val, test, schedule, unit, steps, counts, started, selection_seconds,
            step_secs: 0.0, step_count: 0,
        };
        if let Some((dir, st)) = latest {
            run.resume(&dir, st, obs)?;
        }
        Ok(run)
    }

    /// Restore vars, optimiser and loader from checkpoint `dir`, and repair `best/` from the
    /// best epoch's checkpoint when it is missing or damaged.
    fn resume(&mut self, dir: &Path, st: StateOf<T>, obs: &mut dyn Observer) -> Result<()> {
        restore(dir, &self.vars, self.opt.get(), self.device)?;
        self.train.restore(st.loader.clone())?;
        obs.event(Event::Info(format!(
            "resuming {} after epoch {}",
            self.run_dir.display(),
            st.epochs_done
        )));
        if let Some(b) = st.best_epoch.filter(|_| self.comm.is_root()) {
            if self.ckpts.ensure_best(b)? {
                obs.event(Event::Info(format!(
                    "best/: rebuilt from the checkpoint of epoch {b}"
                )));
            }
        }
        self.state = st;
        Ok(())
    }

    /// One epoch: train, evaluate, record, checkpoint (best atomically), curves.
    fn epoch(&mut self, obs: &mut dyn Observer) -> Result<()> {
        let epoch = self.state.epochs_done;
        let t0 = Instant::now();
        let (loss_sum, images, done, lr) = self.train_epoch(epoch, t0, obs)?;
        if done == 0 {
            return Err(Error::Data {
                msg: format!(
                    "epoch {} ran no optimiser step ({} training images, batch size {})",
                    epoch + 1,
                    self.train.len(),
                    self.task.core().batch_size
                ),
            });
        }
        self.train.next_epoch();
        let train_secs = t0.elapsed().as_secs_f64();
        let train_loss = loss_sum / done as f64;
        let images_per_s = images as f64 / train_secs.max(1e-9);
        obs.event(Event::PhaseEnd {
            summary: format!("loss {train_loss:.4}  {images_per_s:.1} img/s"),
        });
        // The best epoch is chosen on validation data only; the test split is scored every
        // epoch (logged, labelled) and never consulted for a choice.
        let val = match self.val.as_mut() {
            Some(v) => {
                let mut on_val = SplitLabel {
                    inner: obs,
                    split: "val",
                };
                self.task
                    .evaluate(&self.model, v, self.device, &mut on_val)?
                    .0
            }
            None => T::Eval::default(),
        };
        let mut on_test = SplitLabel {
            inner: obs,
            split: "test (not used to choose)",
        };
        let (test, kept) =
            self.task
                .evaluate(&self.model, &mut self.test, self.device, &mut on_test)?;
        let state = &mut self.state;
        state.history.push(EpochRecord {
            epoch: epoch + 1,
            steps: done,
            train_loss,
            lr,
            val,
            test,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s,
        });
        state.epochs_done = epoch + 1;
        state.loader = self.train.state();
        // Without a validation split (a protocol's final stage) nothing is chosen: the last
        // epoch ships.
        let chosen = match self.val {
            Some(_) => best_epoch(&state.history, T::score),
            None => Some(epoch + 1),
        };
        let is_best = chosen == Some(epoch + 1) && state.best_epoch != chosen;
        state.best_epoch = chosen;
        if self.comm.is_root() {
            self.write_epoch(epoch, is_best, &kept)?;
        }
        // The other ranks go on (and may read `best/`) once rank 0 has written the epoch.
        if self.comm.size() > 1 {
            self.comm.barrier()?;
        }
        Ok(())
    }

    /// Rank 0's files of a finished epoch: the checkpoint, `best/` (atomically), the
    /// metrics, curves and report.
    fn write_epoch(&mut self, epoch: usize, is_best: bool, kept: &T::Kept) -> Result<()> {
        let state = &self.state;
        let params = snapshot(&self.vars);
        let ost = self.opt.get().state()?;
        let tensors = [("params", &params), ("optimizer", &ost)];
        let best = state.best_epoch;
        self.ckpts.save_epoch(epoch + 1, &tensors, state, best)?;
        if is_best {
            self.task.write_best(self.run_dir, &self.data, kept)?;
        }
        write_jsonl(&self.run_dir.join("metrics.jsonl"), &state.history)?;
        super::summary::draw(
            self.run_dir,
            T::CURVES,
            &state.history,
            &state.step_losses,
            T::score,
        )?;
        super::report::write_run_html::<_, ()>(
            self.run_dir,
            &format!(
                "gps-seg run {} ({})",
                self.run_dir.display(),
                self.task.label()
            ),
            &state.history,
            &state.step_losses,
            None,
        )
    }

    /// The optimiser steps of one epoch. Returns (loss sum, images, steps, last lr).
    fn train_epoch(
        &mut self,
        epoch: usize,
        t0: Instant,
        obs: &mut dyn Observer,
    ) -> Result<(f64, usize, usize, f64)> {
        let Run {
            task,
            comm,
            run_dir,
            device,
            model,
            vars,
            opt,
            state,
            train,
            schedule,
            unit,
            steps,
            step_secs,
            step_count,
            ..
        } = self;
        let (task, unit, comm) = (*task, *unit, *comm);
        // A run with a total step budget stops there, inside its last epoch.
        let steps = match task.core().total_steps {
            Some(t) => (*steps).min(t.saturating_sub(state.global_step)),
            None => *steps,
        };
        let mut lr = schedule.lr(match unit {
            ScheduleUnit::Epoch => epoch,
            ScheduleUnit::Step => state.global_step,
        });
        opt.get().set_lr(lr);
        obs.event(Event::PhaseStart {
            name: format!("epoch {}/{}", epoch + 1, task.core().epochs),
            total: steps,
        });
        let (mut loss_sum, mut images, mut done) = (0.0f64, 0usize, 0usize);
        // Batch k+1 is decoded and augmented on a background thread while step k runs.
        let shard = (comm.rank(), comm.size());
        train.run_shard_batches(steps, device, shard, |step, batch| {
            if unit == ScheduleUnit::Step {
                lr = schedule.lr(state.global_step);
                opt.get().set_lr(lr);
            }
            let ts = Instant::now();
            let Reduced {
                loss: lv,
                images: batch_images,
                grads,
            } = step_grads(task, model, vars, comm, batch)?;
            if !lv.is_finite() {
                return Err(Error::NonFinite(format!(
                    "training loss is {lv} at epoch {} step {} (global step {}); \
                     the last good checkpoint is kept in {}",
                    epoch + 1,
                    step + 1,
                    state.global_step + 1,
                    run_dir.join("checkpoints").display()
                )));
            }
            let o = opt.get();
            on_worker(|| o.step(&grads))?;
            *step_secs += ts.elapsed().as_secs_f64();
            *step_count += 1;
            state.global_step += 1;
            state.step_losses.push(lv);
            loss_sum += lv as f64;
            images += batch_images;
            done += 1;
            obs.event(Event::Step {
                done,
                loss: Some(loss_sum / done as f64),
                lr: Some(lr),
                images_per_s: Some(images as f64 / t0.elapsed().as_secs_f64().max(1e-9)),
            });
            Ok(())
        })?;
        Ok((loss_sum, images, done, lr))
    }

    /// The best epoch's delta (sparse methods: into `<run>/gps/`) merged into the base →
    /// `merged.safetensors`; the summary.
    fn finish(self) -> Result<SummaryOf<T>> {
        let merged = match self.comm.is_root() {
            true => Some(self.merge_best()?),
            false => None,
        };
        let history = &self.state.history;
        let test_of = |e: Option<&EpochRecord<T::Eval>>| e.map(|r| r.test.clone());
        let best = self
            .state
            .best_epoch
            .and_then(|b| history.iter().find(|r| r.epoch == b));
        let fitted = Fitted {
            label: self.task.label(),
            trainable: self.counts.0,
            total: self.counts.1,
            best_epoch: self.state.best_epoch,
            selected_on: if self.val.is_some() { "val" } else { "last" }.into(),
            best_val: best.map(|r| r.val.clone()).unwrap_or_default(),
            best: test_of(best).unwrap_or_default(),
            last: test_of(history.last()).unwrap_or_default(),
            selection_seconds: self.selection_seconds,
            seconds: self.started.elapsed().as_secs_f64(),
            seconds_per_step: match self.step_count {
                0 => 0.0,
                n => self.step_secs / n as f64,
            },
            peak_rss_mb: peak_rss_mb(),
            run_dir: self.run_dir.to_path_buf(),
            merged,
        };
        let summary = summarise(self.task, &self.data, fitted);
        if !self.comm.is_root() {
            return Ok(summary);
        }
        write_json_atomic(&self.run_dir.join("summary.json"), &summary)?;
        super::report::write_run_html(
            self.run_dir,
            &format!(
                "gps-seg run {} ({})",
                self.run_dir.display(),
                self.task.label()
            ),
            &self.state.history,
            &self.state.step_losses,
            Some(&summary),
        )?;
        Ok(summary)
    }

    /// The best epoch's delta (sparse methods: saved into `<run>/gps/`) merged into the base,
    /// written to `merged.safetensors` (rank 0).
    fn merge_best(&self) -> Result<std::path::PathBuf> {
        let best_params = tensors::load(
            &self.run_dir.join("best").join("params.safetensors"),
            self.device,
        )?;
        let merged = match &self.artifact {
            Some(art) => {
                let mut art = art.clone();
                art.set_delta(delta_from_params(&art, &best_params)?)?;
                art.save(&self.run_dir.join("gps"))?;
                crate::gps::merge::merge(&self.base, &art)?
            }
            None => {
                let mut m = self.base.clone();
                m.extend(best_params);
                m
            }
        };
        let merged_path = self.run_dir.join("merged.safetensors");
        tensors::save_safetensors(&merged_path, &merged, None)?;
        Ok(merged_path)
    }
}

/// One training step's loss, images and gradients over the whole global batch. One process:
/// the task's step on the batch (forward, backward on a rayon worker, `on_worker`). Data
/// parallel: the step on this rank's part (`None`: empty), then the gradients averaged over
/// the ranks ([`reduce_step`]).
fn step_grads<T: Task>(
    task: &T,
    model: &T::Model,
    vars: &Vars,
    comm: &dyn Collective,
    batch: Option<crate::train::task::BatchOf<T>>,
) -> Result<Reduced> {
    let local = match batch {
        Some(b) => {
            let (loss, grads) = on_worker(|| task.train_step(model, &b))?;
            Some((loss.to_scalar::<f32>()?, grads, T::batch_len(&b)?))
        }
        None => None,
    };
    if comm.size() == 1 {
        let (loss, grads, images) =
            local.ok_or_else(|| Error::msg("an empty training batch in one process"))?;
        return Ok(Reduced {
            loss,
            images,
            grads,
        });
    }
    reduce_step(comm, vars, local)
}

/// The epoch with the highest *validation* score (the earliest on ties). The test metrics of a
/// record are never read here: the test split cannot choose anything.
pub fn best_epoch<E>(history: &[EpochRecord<E>], score: impl Fn(&E) -> f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for r in history {
        let s = score(&r.val);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((r.epoch, s));
        }
    }
    best.map(|(e, _)| e)
}

/// Optimiser steps per epoch: the loader's batches, capped by `max_steps_per_epoch`; zero is
/// refused (an epoch without a step would ship the base weights as "trained").
fn steps_per_epoch<T: Task>(task: &T, train: &Loader<T::Source>) -> Result<usize> {
    let per_epoch = train.batches_per_epoch();
    let core = task.core();
    let steps = core
        .max_steps_per_epoch
        .map_or(per_epoch, |m| m.min(per_epoch));
    if steps == 0 {
        return Err(Error::Data {
            msg: format!(
                "{}: the training split ({} images, batch size {}) gives no optimiser step per epoch",
                core.data_dir.display(),
                train.len(),
                core.batch_size
            ),
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: usize, val: f64, test: f64) -> EpochRecord<f64> {
        EpochRecord {
            epoch,
            steps: 1,
            train_loss: 0.0,
            lr: 0.0,
            val,
            test,
            seconds: 0.0,
            images_per_s: 0.0,
        }
    }

    #[test]
    fn the_best_epoch_is_chosen_on_validation_never_on_test() {
        // Validation peaks at epoch 2, test at epoch 4: epoch 2 ships.
        let h = vec![
            rec(1, 0.5, 0.5),
            rec(2, 0.8, 0.6),
            rec(3, 0.7, 0.7),
            rec(4, 0.6, 0.9),
        ];
        assert_eq!(best_epoch(&h, |e| *e), Some(2));
        // Ties keep the earliest; an empty history chooses nothing.
        let t = vec![rec(1, 0.5, 0.1), rec(2, 0.5, 0.9)];
        assert_eq!(best_epoch(&t, |e| *e), Some(1));
        assert_eq!(best_epoch::<f64>(&[], |e| *e), None);
    }
}
