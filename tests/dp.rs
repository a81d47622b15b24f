//! Data-parallel training (#30) without MPI: the ranks are threads of this process joined by
//! an in-process [`Collective`] (rank-ordered sums, the same result on every rank). The loop
//! is the one `train --distributed mpi` runs; `tests/dp_mpi.rs` (feature `mpi`) repeats the
//! comparison with `mpirun` processes.
//!
//! Against one process with the same global batch, seed and data: the GPS selection is the
//! same (≥ 99.9% of the indices; a differing index only where the scores nearly tie), the
//! weights after training from one given selection are within 1e-5 relative, the test mDice
//! within 1e-3; the same for `full`. Only rank 0 writes the run folder.

mod common;

use candle_core::Device;
use common::TinySeg;
use gps_seg::dist::{Collective, Single};
use gps_seg::train::fit;
use gps_seg::train::observer::Silent;
use gps_seg::train::seg::{Method, RunSummary, SegTrainConfig};
use gps_seg::util::tensors::{self, TensorMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};

/// The ranks of one in-process world.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

/// Rank `rank` of a world of threads.
struct Threads {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl Threads {
    fn world(size: usize) -> Vec<Threads> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| Threads {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> gps_seg::Result<()> {
        self.shared.slots.lock().unwrap()[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().unwrap();
            assert!(
                slots.iter().all(|s| s.len() == buf.len()),
                "ragged all-reduce"
            );
            for (i, v) in buf.iter_mut().enumerate() {
                *v = slots.iter().map(|s| s[i]).sum();
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> gps_seg::Result<()> {
        if self.rank == root {
            self.shared.slots.lock().unwrap()[root] = buf.to_vec();
        }
        self.shared.barrier.wait();
        buf.copy_from_slice(&self.shared.slots.lock().unwrap()[root]);
        self.shared.barrier.wait();
        Ok(())
    }
    fn barrier(&self) -> gps_seg::Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn name(&self) -> &'static str {
        "threads"
    }
}

/// SAM tiny at 96 px; 10 training images in global batches of 4 (4, 4, 2: with 3 ranks the
/// last batch leaves one rank without an image), 2 epochs, the whole split for selection.
fn cfg(data: &Path, method: Method) -> SegTrainConfig {
    let mut c = common::tiny_seg_cfg(
        data,
        TinySeg {
            image_size: 96,
            epochs: 2,
            batch_size: 4,
            eval_batch_size: 3,
            select_batches: 1,
        },
    );
    c.method = method;
    c.train_limit = Some(10);
    c.test_limit = Some(5);
    c.max_steps_per_epoch = None;
    c.select_batches = None;
    c.hflip = 0.5;
    c
}

/// `f(comm)` on every rank of a world of `size` threads; the ranks' results in rank order.
fn on_ranks<R: Send>(size: usize, f: impl Fn(&dyn Collective) -> R + Sync) -> Vec<R> {
    let world = Threads::world(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = world
            .iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Weights within 1e-5 relative (all trainable entries together) and no tensor off by more
/// than 1e-3 of its largest entry (a wrong gradient would be off by order 1).
fn assert_close(a: &TensorMap, b: &TensorMap, what: &str) {
    let (l2, worst) = common::rel_diffs(a, b);
    eprintln!("{what}: weights differ by {l2:e} (relative, all entries), {worst:e} (worst tensor, max-abs relative)");
    assert!(l2 <= 1e-5, "{what}: weights differ by {l2:e} (relative)");
    assert!(
        worst <= 1e-3,
        "{what}: a tensor differs by {worst:e} of its largest entry"
    );
}

fn params(run: &Path) -> TensorMap {
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    let dir = run.join("checkpoints").join(latest.trim());
    tensors::load(&dir.join("params.safetensors"), &Device::Cpu).unwrap()
}

/// Train `cfg` into `run` on `size` thread ranks (1: one process, [`Single`]), after copying
/// a given selection (`gps/`) into the run when there is one. Rank 0's summary.
fn train(cfg: &SegTrainConfig, run: &Path, size: usize, given: Option<&Path>) -> RunSummary {
    if let Some(g) = given {
        std::fs::create_dir_all(run.join("gps")).unwrap();
        for f in ["gps_config.json", "selection.safetensors"] {
            std::fs::copy(g.join(f), run.join("gps").join(f)).unwrap();
        }
    }
    if size == 1 {
        return fit::fit_on(cfg, run, &Device::Cpu, false, &Single, &mut Silent).unwrap();
    }
    let mut all = on_ranks(size, |c| {
        fit::fit_on(cfg, run, &Device::Cpu, false, c, &mut Silent).unwrap()
    });
    let root = all.remove(0);
    for other in &all {
        assert_eq!(other.best_epoch, root.best_epoch, "every rank chose alike");
        assert_eq!(other.best.mdice, root.best.mdice, "every rank scored alike");
        assert!(other.merged.is_none(), "only rank 0 merges");
    }
    root
}

fn dataset(tmp: &Path) -> PathBuf {
    let data = tmp.join("kvasir");
    common::synth_kvasir(&data, 24, 11, 200);
    data
}

#[test]
fn gps_selection_and_training_over_ranks_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let c = cfg(&data, Method::Gps);

    // Selection alone: one process vs 2 and 3 ranks (3 selection batches: 2 + 1, 1 + 1 + 1).
    let one = tmp.path().join("sel-1");
    fit::select_on(&c, &one, &Device::Cpu, &Single, &mut Silent).unwrap();
    for size in [2, 3] {
        let dir = tmp.path().join(format!("sel-{size}"));
        on_ranks(size, |comm| {
            fit::select_on(&c, &dir, &Device::Cpu, comm, &mut Silent).unwrap()
        });
        let (same, all) = common::agreement(
            &one.join("selection.safetensors"),
            &dir.join("selection.safetensors"),
        );
        eprintln!("{size} ranks: {same} of {all} selection entries agree");
        assert!(all > 0);
        assert!(
            same as f64 >= 0.999 * all as f64,
            "{size} ranks: {same} of {all} selection entries agree"
        );
        let info = |d: &Path| {
            let j: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("gps_config.json")).unwrap())
                    .unwrap();
            (j["batches"].clone(), j["selection_images"].clone())
        };
        assert_eq!(
            info(&one),
            info(&dir),
            "batches and images counted over the ranks"
        );
    }

    // Training from one given selection: the same weights and metrics.
    let r1 = tmp.path().join("run-1");
    let s1 = train(&c, &r1, 1, Some(&one));
    for size in [2, 3] {
        let rn = tmp.path().join(format!("run-{size}"));
        let sn = train(&c, &rn, size, Some(&one));
        assert_close(&params(&rn), &params(&r1), &format!("{size} ranks"));
        assert!(
            (sn.best.mdice - s1.best.mdice).abs() <= 1e-3,
            "{size} ranks: test mDice {} vs {}",
            sn.best.mdice,
            s1.best.mdice
        );
        assert_eq!(sn.train_images, s1.train_images);
        assert_eq!(sn.best_epoch, s1.best_epoch);
        let lines = |r: &Path| {
            std::fs::read_to_string(r.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(lines(&rn), lines(&r1), "rank 0 wrote every epoch once");
        assert!(rn.join("merged.safetensors").is_file());
    }
}

#[test]
fn full_fine_tuning_over_ranks_matches_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let c = cfg(&data, Method::Full);
    let r1 = tmp.path().join("full-1");
    let s1 = train(&c, &r1, 1, None);
    let r2 = tmp.path().join("full-2");
    let s2 = train(&c, &r2, 2, None);
    assert_close(&params(&r2), &params(&r1), "2 ranks");
    assert!((s2.best.mdice - s1.best.mdice).abs() <= 1e-3);
    assert!((s2.last.mdice - s1.last.mdice).abs() <= 1e-3);
}

#[test]
fn a_task_whose_loss_is_not_a_batch_mean_is_refused_over_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mut c = cfg(&data, Method::Gps);
    c.prompt = gps_seg::data::prompts::PromptSpec {
        kind: gps_seg::data::prompts::PromptKind::Box,
        ..c.prompt
    };
    let errs = on_ranks(2, |comm| {
        fit::fit_on(
            &c,
            &tmp.path().join("r"),
            &Device::Cpu,
            false,
            comm,
            &mut Silent,
        )
        .unwrap_err()
        .to_string()
    });
    for e in errs {
        assert!(e.contains("distributed") && e.contains("per-image"), "{e}");
    }
    assert!(!tmp.path().join("r").exists(), "nothing written");
}

/// The packed all-reduce of one step ([`gps_seg::train::fit::parallel::reduce_step`]): the
/// ranks' gradients of their shards (uneven, one rank without an image) combine into one
/// process's gradient and loss of the whole batch; a var no rank reached stays absent.
#[test]
fn one_reduced_step_is_the_whole_batch_gradient() {
    use candle_core::{Tensor, Var};
    use gps_seg::data::loader::shard_range;
    use gps_seg::train::fit::parallel::reduce_step;
    let dev = Device::Cpu;
    let mut rng = gps_seg::util::Rng::new(5);
    let mut draw = |n: usize| (0..n).map(|_| rng.f32() - 0.5).collect::<Vec<f32>>();
    let w = Var::from_vec(draw(15), (3, 5), &dev).unwrap();
    let b = Var::from_vec(draw(3), 3, &dev).unwrap();
    let unused = Var::from_vec(draw(2), 2, &dev).unwrap();
    let vars = vec![
        ("b".to_string(), b.clone()),
        ("u".to_string(), unused.clone()),
        ("w".to_string(), w.clone()),
    ];
    let n = 5;
    let x = Tensor::from_vec(draw(n * 5), (n, 5), &dev).unwrap();
    let y = Tensor::from_vec(draw(n * 3), (n, 3), &dev).unwrap();
    // A batch mean of per-sample squared errors.
    let loss_of = |r: std::ops::Range<usize>| {
        let xs = x.narrow(0, r.start, r.len()).unwrap();
        let ys = y.narrow(0, r.start, r.len()).unwrap();
        let p = xs.matmul(&w.as_tensor().t().unwrap()).unwrap();
        let e = (p.broadcast_add(b.as_tensor()).unwrap() - ys).unwrap();
        e.sqr().unwrap().sum(1).unwrap().mean(0).unwrap()
    };
    let whole = loss_of(0..n);
    let grads = whole.backward().unwrap();
    let want = |v: &Var| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
    let (gw, gb) = (want(&w), want(&b));
    let lw = whole.to_scalar::<f32>().unwrap();
    for size in [3, 6] {
        let reduced = on_ranks(size, |comm| {
            let mine = shard_range(0..n, comm.rank(), comm.size());
            let local = (!mine.is_empty()).then(|| {
                let l = loss_of(mine.clone());
                (
                    l.to_scalar::<f32>().unwrap(),
                    l.backward().unwrap(),
                    mine.len(),
                )
            });
            let r = reduce_step(comm, &vars, local).unwrap();
            let get = |v: &Var| r.grads.get(v.as_tensor()).map(|g| g.flatten_all().unwrap());
            (r.loss, r.images, get(&w), get(&b), get(&unused).is_none())
        });
        for (rank, (loss, images, rw, rb, no_unused)) in reduced.into_iter().enumerate() {
            let close = |a: &Tensor, b: &Tensor| {
                let d = (a - b).unwrap().abs().unwrap().max(0).unwrap();
                let m = b.abs().unwrap().max(0).unwrap();
                d.to_scalar::<f32>().unwrap() <= 1e-6 * m.to_scalar::<f32>().unwrap().max(1.0)
            };
            assert_eq!(images, n, "{size} ranks, rank {rank}");
            assert!(
                (loss - lw).abs() <= 1e-6 * lw.abs().max(1.0),
                "{loss} vs {lw}"
            );
            assert!(close(&rw.unwrap(), &gw), "{size} ranks, rank {rank}: w");
            assert!(close(&rb.unwrap(), &gb), "{size} ranks, rank {rank}: b");
            assert!(no_unused, "a var without a gradient stays without one");
        }
    }
}
