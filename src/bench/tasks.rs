//! One base, many tasks (`gps-seg bench tasks`): per-task delta ONNX files against merged
//! models (file size, ONNX Runtime session creation, outputs, what ORT runs), and Candle task
//! switching against one merged copy per task (switch time, memory).
//!
//! The tasks are synthetic GPS artifacts on a seeded random-init SAM — the SAM recipe's shape
//! (top-1 per neuron by a random criterion in the `sam` policy's tensors, the mask decoder fully
//! trained) with seeded deltas — so the measurement needs no training and no downloads.

use crate::error::{Error, Result};
use crate::gps::{
    select::{select, SelectSpec},
    Artifact, BaseModel, Criterion, Level, Policy, SelectionInfo, TaskSet,
};
use crate::onnx::delta::{export_sam_task, SamGraph};
use crate::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use crate::sam::SamConfig;
use crate::util::tensors::TensorMap;
use candle_core::{DType, Tensor};
use std::path::Path;
use std::time::Instant;

/// A trained-looking GPS artifact on `base`: the `sam` policy's selection at K = 1 per neuron
/// chosen at random (seeded), deltas ~ N(0, 0.02²), fully trainable tensors = base + N(0, 0.02²).
pub fn synthetic_task(base: &TensorMap, seed: u64) -> Result<Artifact> {
    let policy = Policy::sam();
    let spec = SelectSpec {
        policy: &policy,
        k: 1,
        level: Level::Neuron,
        criterion: Criterion::Random,
        seed,
    };
    let sel = select(base, None, &spec)?;
    let info = SelectionInfo {
        k: 1,
        level: Level::Neuron,
        criterion: Criterion::Random,
        selection_loss: "synthetic".into(),
        batches: 0,
        selection_images: 0,
        seed,
    };
    let mut art = Artifact::new(policy, info, BaseModel::of(base, "random-init")?, sel)?;
    let mut rng = crate::util::rng::Rng::derive(seed, "synthetic-task-delta");
    let dev = candle_core::Device::Cpu;
    let mut delta = TensorMap::new();
    for (name, idx) in &art.selection.indices {
        let v: Vec<f32> = (0..idx.len()).map(|_| 0.02 * rng.normal()).collect();
        delta.insert(name.clone(), Tensor::from_vec(v, idx.len(), &dev)?);
    }
    for name in &art.selection.trainable {
        let b = base.get(name).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            msg: "not in the base".into(),
        })?;
        let n = b.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| 0.02 * rng.normal()).collect();
        let noise = Tensor::from_vec(noise, b.dims(), &dev)?;
        delta.insert(name.clone(), (b.to_dtype(DType::F32)? + noise)?);
    }
    art.set_delta(delta)?;
    Ok(art)
}

/// One row of the delta-file table.
#[derive(Debug, Clone)]
pub struct DeltaRow {
    pub task: String,
    pub task_bytes: u64,
    pub merged_bytes: u64,
    pub session_task_s: f64,
    pub session_merged_s: f64,
    /// max |Δ| between the task file's and the merged model's outputs, batch 1 and 3.
    pub max_diff_b1: f32,
    pub max_diff_b3: f32,
    /// ScatterND nodes left in ORT's optimized graph of the task file (0 = folded).
    pub scatter_left: usize,
    /// Nodes ORT runs for the task file and for the merged model.
    pub nodes_task: usize,
    pub nodes_merged: usize,
}

/// The Candle switching figures.
#[derive(Debug, Clone)]
pub struct SwitchRow {
    pub tasks: usize,
    /// Per switch, seconds (min, median, max) over a round-robin sequence.
    pub switch_s: (f64, f64, f64),
    pub switches: usize,
    pub base_bytes: usize,
    pub deltas_bytes: usize,
    pub saved_bytes: usize,
    pub merged_copies_bytes: usize,
    /// Whether every switch left the live weights bit-equal to the merged checkpoint and the
    /// base bit-equal after returning to it.
    pub exact: bool,
}

/// Everything `bench tasks` measured.
#[derive(Debug, Clone)]
pub struct TasksReport {
    pub config: String,
    pub image_size: usize,
    pub base_bytes: u64,
    pub delta: Vec<DeltaRow>,
    pub switch: SwitchRow,
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn onnx_bytes(p: &Path) -> u64 {
    let mut d = p.as_os_str().to_owned();
    d.push(".data");
    file_size(p) + file_size(Path::new(&d))
}

fn max_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    if a.shape() != b.shape() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Equal bit for bit (names, shapes, values).
pub fn maps_equal(a: &TensorMap, b: &TensorMap) -> Result<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (n, x) in a {
        let Some(y) = b.get(n) else {
            return Ok(false);
        };
        if x.dims() != y.dims() {
            return Ok(false);
        }
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let yv = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if xv.iter().zip(&yv).any(|(p, q)| p.to_bits() != q.to_bits()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Run the measurement in `dir` (files are written there): `tasks` synthetic tasks on a
/// seeded random-init `cfg`, each exported as a delta on one base and as a merged model.
pub fn run(cfg: &SamConfig, tasks: usize, threads: usize, dir: &Path) -> Result<TasksReport> {
    let tasks = tasks.max(1);
    let base = random_sam_weights(cfg, 0)?;
    let arts: Vec<Artifact> = (0..tasks)
        .map(|i| synthetic_task(&base, 100 + i as u64))
        .collect::<Result<_>>()?;
    let opts = SamExportOptions::default();
    let base_path = dir.join("base.onnx");
    let s = cfg.image_size;
    let input = |n: usize| -> ndarray::ArrayD<f32> {
        let mut rng = crate::util::rng::Rng::derive(7, "bench-tasks-input");
        let v: Vec<f32> = (0..n * 3 * s * s).map(|_| rng.f32()).collect();
        ndarray::ArrayD::from_shape_vec(vec![n, 3, s, s], v).unwrap_or_default()
    };
    let (x1, x3) = (input(1), input(3));
    let mut rows = Vec::new();
    for (i, art) in arts.iter().enumerate() {
        let name = format!("task{}", i + 1);
        let task_path = dir.join(format!("{name}.onnx"));
        let e = export_sam_task(
            SamGraph::PromptFree,
            cfg,
            &base,
            art,
            opts,
            &base_path,
            &task_path,
        )?;
        let merged = crate::gps::merge(&base, art)?;
        let merged_path = dir.join(format!("{name}-merged.onnx"));
        let (m, _) = export_prompt_free(cfg, &merged, opts)?;
        crate::onnx::write_model(&merged_path, m)?;
        drop(merged);
        // Session creation, twice each, interleaved; the faster of the two is reported.
        let load = |p: &Path| -> Result<(crate::infer::model::OrtModel, f64)> {
            let t = Instant::now();
            let m = crate::infer::model::OrtModel::load(p, threads)?;
            Ok((m, t.elapsed().as_secs_f64()))
        };
        let (_, a1) = load(&task_path)?;
        let (_, b1) = load(&merged_path)?;
        let (task_model, a2) = load(&task_path)?;
        let (merged_model, b2) = load(&merged_path)?;
        let (session_task_s, session_merged_s) = (a1.min(a2), b1.min(b2));
        let d1 = max_diff(&task_model.run_f32(&x1)?, &merged_model.run_f32(&x1)?);
        let d3 = max_diff(&task_model.run_f32(&x3)?, &merged_model.run_f32(&x3)?);
        drop((task_model, merged_model));
        let ops_task = crate::infer::runtime::optimized_ops(&task_path)?;
        let ops_merged = crate::infer::runtime::optimized_ops(&merged_path)?;
        rows.push(DeltaRow {
            task: name,
            task_bytes: e.task.model_bytes,
            merged_bytes: onnx_bytes(&merged_path),
            session_task_s,
            session_merged_s,
            max_diff_b1: d1,
            max_diff_b3: d3,
            scatter_left: ops_task.get("ScatterND").copied().unwrap_or(0),
            nodes_task: ops_task.values().sum(),
            nodes_merged: ops_merged.values().sum(),
        });
    }
    let base_bytes = onnx_bytes(&base_path);

    // Candle: one live base, every task switched in and out.
    let mut set = TaskSet::new(base.clone())?;
    for (i, a) in arts.iter().enumerate() {
        set.add(&format!("task{}", i + 1), a)?;
    }
    let base_copy: TensorMap = base
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.copy()?)))
        .collect::<Result<_>>()?;
    let mut times = Vec::new();
    let mut exact = true;
    let names = set.names();
    let mut seq: Vec<Option<String>> = Vec::new();
    for _ in 0..3 {
        for n in &names {
            seq.push(Some(n.clone()));
        }
        seq.push(None);
    }
    for step in &seq {
        let t = Instant::now();
        set.activate(step.as_deref())?;
        times.push(t.elapsed().as_secs_f64());
        let want = match step {
            Some(n) => {
                let i = names.iter().position(|m| m == n).unwrap_or(0);
                match arts.get(i) {
                    Some(a) => crate::gps::merge(&base_copy, a)?,
                    None => base_copy.clone(),
                }
            }
            None => base_copy.clone(),
        };
        exact &= maps_equal(set.live(), &want)?;
    }
    // Memory with a task active (its saved entries held).
    set.activate(names.first().map(String::as_str))?;
    let mem = set.memory();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let switch = SwitchRow {
        tasks,
        switch_s: (
            sorted.first().copied().unwrap_or(0.0),
            med,
            sorted.last().copied().unwrap_or(0.0),
        ),
        switches: times.len(),
        base_bytes: mem.base_bytes,
        deltas_bytes: mem.delta_bytes.iter().map(|(_, b)| b).sum(),
        saved_bytes: mem.saved_bytes,
        merged_copies_bytes: mem.merged_copies_bytes,
        exact,
    };
    Ok(TasksReport {
        config: cfg.name.clone(),
        image_size: cfg.image_size,
        base_bytes,
        delta: rows,
        switch,
    })
}

fn mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

/// The report as markdown tables.
pub fn markdown(r: &TasksReport) -> String {
    let mut s = format!(
        "SAM `{}` @{} px, random-init base ({} with its data), {} synthetic GPS tasks\n\n",
        r.config,
        r.image_size,
        mb(r.base_bytes),
        r.delta.len()
    );
    s.push_str(
        "| task | task file | merged model | task / merged | session: task | session: merged | max \\|Δ\\| b1 | max \\|Δ\\| b3 | ScatterND left | nodes run: task / merged |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for d in &r.delta {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2}% | {:.3} s | {:.3} s | {:.1e} | {:.1e} | {} | {} / {} |\n",
            d.task,
            mb(d.task_bytes),
            mb(d.merged_bytes),
            100.0 * d.task_bytes as f64 / d.merged_bytes.max(1) as f64,
            d.session_task_s,
            d.session_merged_s,
            d.max_diff_b1,
            d.max_diff_b3,
            d.scatter_left,
            d.nodes_task,
            d.nodes_merged
        ));
    }
    let w = &r.switch;
    s.push_str(&format!(
        "\nCandle task switching ({} tasks, {} switches round-robin with returns to the base): \
         {:.2} / {:.2} / {:.2} ms per switch (min / median / max); exact (live = merged \
         checkpoint, base restored bit for bit): {}\n\n| memory | bytes |\n|---|---:|\n\
         | base | {} |\n| Σ task deltas | {} |\n| active task's saved entries | {} |\n\
         | **base + Σ deltas + saved** | **{}** |\n| {} merged copies | {} |\n",
        w.tasks,
        w.switches,
        1e3 * w.switch_s.0,
        1e3 * w.switch_s.1,
        1e3 * w.switch_s.2,
        if w.exact { "yes" } else { "NO" },
        mb(w.base_bytes as u64),
        mb(w.deltas_bytes as u64),
        mb(w.saved_bytes as u64),
        mb((w.base_bytes + w.deltas_bytes + w.saved_bytes) as u64),
        w.tasks,
        mb(w.merged_copies_bytes as u64),
    ));
    s
}
