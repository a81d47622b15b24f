//! One base, many tasks: delta ONNX task files on a shared base equal the merged models in
//! ONNX Runtime (and ORT folds the patches away), bad bases are refused naming the problem, and
//! Candle task switching is exact in both directions.

mod common;

use common::{gps_seg_ok, images_array, max_abs_diff, onnx_checker, ort_ready};
use gps_seg::bench::tasks::{maps_equal, synthetic_task};
use gps_seg::gps::TaskSet;
use gps_seg::infer::model::OrtModel;
use gps_seg::infer::runtime::optimized_ops;
use gps_seg::onnx::delta::{export_sam_task, SamGraph};
use gps_seg::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use gps_seg::sam::SamConfig;
use std::path::Path;

/// Export two tasks as deltas on one base and as merged models; outputs must agree within 1e-6
/// at batch 1 and 3, ORT's optimized task graph must hold no ScatterND and as many nodes as the
/// merged one, and the task file must be a small fraction of the merged one.
fn delta_equals_merged(cfg: &SamConfig, dir: &Path) {
    ort_ready();
    let base = random_sam_weights(cfg, 11).unwrap();
    let opts = SamExportOptions::default();
    let base_path = dir.join("base.onnx");
    let s = cfg.image_size;
    let (x1, x3) = (images_array(1, s, 1), images_array(3, s, 2));
    let mut outs = Vec::new();
    for seed in [5u64, 6] {
        let art = synthetic_task(&base, seed).unwrap();
        let task = dir.join(format!("task{seed}.onnx"));
        let e = export_sam_task(
            SamGraph::PromptFree,
            cfg,
            &base,
            &art,
            opts,
            &base_path,
            &task,
        )
        .unwrap();
        assert_eq!(e.base_written, seed == 5, "the base is written once");
        assert!(e.report.sparse_tensors > 0 && e.report.full_tensors > 0);
        let merged = gps_seg::gps::merge(&base, &art).unwrap();
        let mpath = dir.join(format!("merged{seed}.onnx"));
        gps_seg::onnx::write_model(&mpath, export_prompt_free(cfg, &merged, opts).unwrap().0)
            .unwrap();
        let merged_bytes = std::fs::metadata(&mpath).unwrap().len();
        assert!(
            e.task.model_bytes * 4 < merged_bytes,
            "task file {} B vs merged {merged_bytes} B",
            e.task.model_bytes
        );
        let t = OrtModel::load(&task, 2).unwrap();
        let m = OrtModel::load(&mpath, 2).unwrap();
        for x in [&x1, &x3] {
            let (a, b) = (t.run_f32(x).unwrap(), m.run_f32(x).unwrap());
            let d = max_abs_diff(&a, &b);
            assert!(
                d <= 1e-6,
                "{} batch {}: max |Δ| {d}",
                cfg.name,
                x.shape()[0]
            );
        }
        outs.push(t.run_f32(&x1).unwrap());
        if seed == 5 {
            onnx_checker(&[&base_path, &task]);
        }
        let ops_t = optimized_ops(&task).unwrap();
        let ops_m = optimized_ops(&mpath).unwrap();
        assert!(
            !ops_t.contains_key("ScatterND"),
            "ORT did not fold: {ops_t:?}"
        );
        assert_eq!(ops_t, ops_m, "ORT runs a different graph for the task file");
    }
    // Two tasks give their own outputs.
    assert!(max_abs_diff(&outs[0], &outs[1]) > 1e-4);
}

#[test]
fn delta_onnx_equals_merged_tiny() {
    let dir = tempfile::tempdir().unwrap();
    delta_equals_merged(&SamConfig::tiny(), dir.path());
}

/// ViT-B's architecture (12 blocks, 768 wide, 93.7 M parameters) at a small input so the test
/// stays cheap; the 1024-px figures are `gps-seg bench tasks --model vit_b`.
#[test]
fn delta_onnx_equals_merged_vit_b() {
    let dir = tempfile::tempdir().unwrap();
    delta_equals_merged(&SamConfig::vit_b().with_image_size(128), dir.path());
}

#[test]
fn bad_bases_and_places_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SamConfig::tiny();
    let base = random_sam_weights(&cfg, 11).unwrap();
    let art = synthetic_task(&base, 5).unwrap();
    let opts = SamExportOptions::default();
    let base_path = dir.path().join("base.onnx");
    let task = dir.path().join("t.onnx");
    export_sam_task(
        SamGraph::PromptFree,
        &cfg,
        &base,
        &art,
        opts,
        &base_path,
        &task,
    )
    .unwrap();

    // Each case: (graph, weights, artifact, normalise, base file, task file) → the error text.
    let refused = |graph, w, a, normalize, base: &Path, out: &Path| -> String {
        export_sam_task(graph, &cfg, w, a, SamExportOptions { normalize }, base, out)
            .unwrap_err()
            .to_string()
    };
    let free = SamGraph::PromptFree;
    let at = |n: &str| dir.path().join(n);

    // An artifact of another base: the base file's hash is named.
    let other = random_sam_weights(&cfg, 12).unwrap();
    let foreign = synthetic_task(&other, 5).unwrap();
    let e = refused(free, &other, &foreign, true, &base_path, &at("t2.onnx"));
    assert!(e.contains("content hash") && e.contains("base.onnx"), "{e}");

    // A task file outside the base's folder.
    std::fs::create_dir(at("sub")).unwrap();
    let e = refused(free, &base, &art, true, &base_path, &at("sub/t.onnx"));
    assert!(e.contains("base's folder"), "{e}");

    // A task file (or any non-base model) given as the base.
    let e = refused(free, &base, &art, true, &task, &at("t3.onnx"));
    assert!(e.contains("not `base`"), "{e}");
    let plain = at("plain.onnx");
    gps_seg::onnx::write_model(&plain, export_prompt_free(&cfg, &base, opts).unwrap().0).unwrap();
    let e = refused(free, &base, &art, true, &plain, &at("t4.onnx"));
    assert!(e.contains("not a gps-seg base file"), "{e}");

    // A prompt-free base for the prompted image encoder; another input normalisation.
    let e = refused(
        SamGraph::ImageEncoder,
        &base,
        &art,
        true,
        &base_path,
        &at("t5.onnx"),
    );
    assert!(e.contains("sam_prompt_free"), "{e}");
    let e = refused(free, &base, &art, false, &base_path, &at("t6.onnx"));
    assert!(e.contains("gps_seg.input"), "{e}");
}

/// Switching in place: after every switch the live weights equal the merged checkpoint bit for
/// bit, the base comes back bit-identical, a model built on the live tensors computes the
/// merged model's output, and foreign or untrained artifacts are refused.
#[test]
fn candle_task_switching_is_exact() {
    let cfg = SamConfig::tiny().with_image_size(64);
    let base = random_sam_weights(&cfg, 3).unwrap();
    let base_copy: gps_seg::util::tensors::TensorMap = base
        .iter()
        .map(|(n, t)| (n.clone(), t.copy().unwrap()))
        .collect();
    let arts: Vec<_> = (0..3)
        .map(|i| synthetic_task(&base, 40 + i).unwrap())
        .collect();
    let merged: Vec<_> = arts
        .iter()
        .map(|a| gps_seg::gps::merge(&base_copy, a).unwrap())
        .collect();
    let dev = candle_core::Device::Cpu;
    let engine =
        gps_seg::infer::engine::CandleEngine::from_weights(base.clone(), &cfg, &dev, "live".into())
            .unwrap();
    let mut set = TaskSet::new(base).unwrap();
    for (i, a) in arts.iter().enumerate() {
        set.add(&format!("t{i}"), a).unwrap();
    }
    use gps_seg::infer::engine::Engine;
    let x = images_array(1, 64, 9);
    let x = x.as_slice().unwrap();
    let seq = [
        Some(0usize),
        Some(1),
        None,
        Some(2),
        Some(0),
        Some(0),
        Some(1),
        Some(2),
        None,
    ];
    for step in seq {
        let name = step.map(|i| format!("t{i}"));
        set.activate(name.as_deref()).unwrap();
        let want = match step {
            Some(i) => &merged[i],
            None => &base_copy,
        };
        assert!(maps_equal(set.live(), want).unwrap(), "after {name:?}");
        if let Some(i) = step {
            let reference = gps_seg::infer::engine::CandleEngine::from_weights(
                merged[i].clone(),
                &cfg,
                &dev,
                "merged".into(),
            )
            .unwrap();
            let a = engine.logits(x, 1).unwrap();
            let b = reference.logits(x, 1).unwrap();
            assert_eq!(
                a.data, b.data,
                "the model on the live weights ≠ merged, task {i}"
            );
        }
    }
    assert_eq!(set.active(), None);
    let e = set.activate(Some("nope")).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("t0"), "{e}");
    let other = random_sam_weights(&cfg, 4).unwrap();
    let foreign = synthetic_task(&other, 1).unwrap();
    let e = set.add("x", &foreign).unwrap_err().to_string();
    assert!(e.contains("content hash"), "{e}");
    let mut untrained = arts[0].clone();
    untrained.delta = None;
    let e = set.add("u", &untrained).unwrap_err().to_string();
    assert!(e.contains("never trained"), "{e}");
    let m = set.memory();
    assert_eq!(m.merged_copies_bytes, 3 * m.base_bytes);
}

/// The user's path: two GPS runs → `export --base-onnx` (base written once, then reused) →
/// `infer` with each task file writes the same masks as `infer` with that run's merged export.
#[test]
fn cli_base_and_two_task_files_infer_like_merged_models() {
    ort_ready();
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    let (ok, t) = gps_seg_ok(&[
        "data",
        "synth-kvasir",
        "--out",
        &p("data"),
        "--count",
        "10",
        "--seed",
        "4",
        "--max-side",
        "96",
    ]);
    assert!(ok, "{t}");
    std::fs::create_dir(p("models")).unwrap();
    for run in ["a", "b"] {
        let seed = if run == "a" { "1" } else { "2" };
        let (ok, t) = gps_seg_ok(&[
            "train",
            "--model",
            "tiny",
            "--image-size",
            "64",
            "--data-dir",
            &p("data"),
            "--out",
            &p(run),
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--select-batches",
            "1",
            "--seed",
            seed,
            "--quiet",
        ]);
        assert!(ok, "{t}");
        let (ok, t) = gps_seg_ok(&[
            "export",
            "--model",
            &p(run),
            "--base-onnx",
            &p("models/base.onnx"),
            "--out",
            &p(&format!("models/{run}.onnx")),
        ]);
        assert!(ok, "{t}");
        let verb = if run == "a" {
            "wrote base"
        } else {
            "reusing base"
        };
        assert!(t.contains(verb), "{t}");
        let (ok, t) = gps_seg_ok(&[
            "export",
            "--model",
            &p(run),
            "--out",
            &p(&format!("{run}-merged.onnx")),
        ]);
        assert!(ok, "{t}");
        for (model, out) in [
            (
                p(&format!("models/{run}.onnx")),
                p(&format!("out-{run}-task")),
            ),
            (
                p(&format!("{run}-merged.onnx")),
                p(&format!("out-{run}-merged")),
            ),
        ] {
            let (ok, t) = gps_seg_ok(&[
                "infer",
                "--model",
                &model,
                "--images",
                &p("data/images"),
                "--out",
                &out,
                "--no-overlays",
                "--quiet",
            ]);
            assert!(ok, "{t}");
        }
        let masks = |d: String| -> Vec<(String, Vec<u8>)> {
            let mut v: Vec<_> = std::fs::read_dir(Path::new(&d).join("masks"))
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        let (a, b) = (
            masks(p(&format!("out-{run}-task"))),
            masks(p(&format!("out-{run}-merged"))),
        );
        assert_eq!(a.len(), 10);
        assert!(
            a == b,
            "run {run}: task-file masks differ from the merged model's"
        );
    }
    // The base is an input now: it may not be overwritten, and a task may not replace it.
    let (ok, t) = gps_seg_ok(&[
        "export",
        "--model",
        &p("a"),
        "--base-onnx",
        &p("models/base.onnx"),
        "--out",
        &p("models/base.onnx"),
    ]);
    assert!(!ok && t.contains("--base-onnx"), "{t}");
}

/// The serving form: several task files on one base held once (`OrtModel::load_shared`), run
/// interleaved on the base's one session, equal their merged models: max |Δ| ≤ 1e-5 relative
/// to the logits' scale, and the masks (logit > 0) identical, at batch 1 and 3.
fn shared_equals_merged(cfg: &SamConfig, dir: &Path) {
    ort_ready();
    let base = random_sam_weights(cfg, 21).unwrap();
    let opts = SamExportOptions::default();
    let base_path = dir.join("base.onnx");
    let s = cfg.image_size;
    let (x1, x3) = (images_array(1, s, 3), images_array(3, s, 4));
    let mut pairs = Vec::new();
    for seed in [7u64, 8, 9] {
        let art = synthetic_task(&base, seed).unwrap();
        let task = dir.join(format!("task{seed}.onnx"));
        export_sam_task(
            SamGraph::PromptFree,
            cfg,
            &base,
            &art,
            opts,
            &base_path,
            &task,
        )
        .unwrap();
        let merged = gps_seg::gps::merge(&base, &art).unwrap();
        let mpath = dir.join(format!("merged{seed}.onnx"));
        gps_seg::onnx::write_model(&mpath, export_prompt_free(cfg, &merged, opts).unwrap().0)
            .unwrap();
        let t = OrtModel::load_shared(&task, 2, None).unwrap();
        let m = OrtModel::load(&mpath, 2).unwrap();
        pairs.push((t, m));
    }
    let (b0, _) = pairs[0].0.shared().unwrap();
    for (t, _) in &pairs {
        assert!(
            std::sync::Arc::ptr_eq(b0, t.shared().unwrap().0),
            "one base in memory"
        );
    }
    // Interleaved, twice round: every switch restores the base exactly.
    for round in 0..2 {
        for (i, (t, m)) in pairs.iter().enumerate() {
            for x in [&x1, &x3] {
                let (a, b) = (t.run_f32(x).unwrap(), m.run_f32(x).unwrap());
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let d = max_abs_diff(&a, &b);
                assert!(
                    d <= 1e-5 * scale,
                    "{} task {i} round {round} batch {}: max |Δ| {d} (scale {scale})",
                    cfg.name,
                    x.shape()[0]
                );
                let flips = a
                    .iter()
                    .zip(b.iter())
                    .filter(|(p, q)| (**p > 0.0) != (**q > 0.0))
                    .count();
                assert_eq!(flips, 0, "task {i}: masks differ");
            }
        }
    }
}

#[test]
fn shared_base_tasks_equal_merged_tiny() {
    let dir = tempfile::tempdir().unwrap();
    shared_equals_merged(&SamConfig::tiny(), dir.path());
}

#[test]
fn shared_base_tasks_equal_merged_vit_b() {
    let dir = tempfile::tempdir().unwrap();
    shared_equals_merged(&SamConfig::vit_b().with_image_size(128), dir.path());
}
