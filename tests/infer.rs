//! Inference end to end on a tiny synthetic Kvasir set: train → export → ONNX Runtime reproduces
//! training's held-out mDice; outputs at each image's original resolution; bad images stop the
//! job before anything is written (or are skipped with `skip_bad`); a model with the wrong
//! inputs is refused with both signatures.
//!
//! The ONNX Runtime library is found in the runtime's search order and fetched once when
//! missing (as `gps-seg infer` does).

mod common;

use candle_core::Device;
use common::Brightness;
use gps_seg::infer::{self, input, CandleEngine, Engine, InferOptions, OrtEngine, RunFolder};
use gps_seg::onnx::proto::data_type::FLOAT;
use gps_seg::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use gps_seg::onnx::{write_model, Dim, GraphBuilder};
use gps_seg::progress::{Recorder, Silent};
use gps_seg::sam::SamConfig;
use gps_seg::train::seg::{self, SegTrainConfig};
use std::path::{Path, PathBuf};

/// `count` synthetic pairs, seed 5, sides up to 240 px.
fn dataset(dir: &Path, count: usize) {
    common::synth_kvasir(dir, count, 5, 240);
}

/// A random-weight tiny SAM at 64 px, exported prompt-free.
fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = SamConfig::tiny().with_image_size(64);
    let w = random_sam_weights(&cfg, 7).unwrap();
    let (m, _) = export_prompt_free(&cfg, &w, SamExportOptions::default()).unwrap();
    let p = dir.join("tiny64.onnx");
    write_model(&p, m).unwrap();
    p
}

#[test]
fn train_export_infer_reproduces_training_mdice_at_original_resolution() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data, 16);
    let sam = SamConfig::tiny().with_image_size(128);
    let mut cfg = SegTrainConfig::recipe(data.clone(), None, sam);
    cfg.epochs = 1;
    cfg.batch_size = 4;
    cfg.eval_batch_size = 3;
    cfg.train_limit = Some(4);
    cfg.test_limit = Some(5);
    cfg.test_fraction = 0.4;
    cfg.select_batches = Some(1);
    cfg.max_steps_per_epoch = Some(3);
    cfg.lr = 1e-4;
    cfg.hflip = 0.0;
    let run = tmp.path().join("run");
    let summary = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();

    let folder = RunFolder::open(&run).unwrap();
    let inputs = folder.test_inputs(None).unwrap();
    assert_eq!(inputs.items.len(), 5);
    assert!(inputs.bad.is_empty() && inputs.has_masks());
    let mut rec = Recorder::default();
    let model = folder.ensure_onnx(&mut rec).unwrap();
    assert_eq!(model, run.join("model.onnx"));
    assert!(model.is_file());
    let engine = OrtEngine::load(&model, 2, None, &mut rec).unwrap();
    assert_eq!(engine.input_size(), 128);
    let mut opts = InferOptions::new(tmp.path().join("out-ort"));
    opts.batch_size = 2; // batching differs from training's on purpose
    opts.resize = folder.view.resize;
    opts.threshold = folder.view.threshold;
    let (report, scores) = infer::infer(&engine, &inputs, &opts, &mut rec).unwrap();
    let m = report.metrics.clone().unwrap();
    eprintln!(
        "ORT mDice {:.6} mIoU {:.6}; training mDice {:.6} mIoU {:.6}",
        m.mdice, m.miou, summary.best.mdice, summary.best.miou
    );
    assert_eq!(m.images, 5);
    // Non-degenerate: a model that predicts nothing (or everything) would match trivially.
    // (lr 1e-4 keeps this tiny fresh-init SAM's masks partial after 3 steps.)
    assert!(
        summary.best.mdice > 0.02 && summary.best.mdice < 0.98,
        "degenerate training mDice {}",
        summary.best.mdice
    );
    assert!(
        (m.mdice - summary.best.mdice).abs() < 1e-3,
        "ORT mDice {} vs training {}",
        m.mdice,
        summary.best.mdice
    );
    assert!((m.miou - summary.best.miou).abs() < 1e-3);
    let (d, i) = infer::run::training_best(&run).unwrap().unwrap();
    assert_eq!((d, i), (summary.best.mdice, summary.best.miou));
    // The per-image scores are training's too (its scores.csv holds the best epoch's).
    let train_csv = std::fs::read_to_string(run.join("scores.csv")).unwrap();
    for (line, s) in train_csv.lines().skip(1).zip(&scores) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], s.id);
        let dice: f64 = f[1].parse().unwrap();
        assert!((dice - s.dice).abs() < 5e-3, "{line} vs {s:?}");
    }

    // Masks and overlays at each image's original resolution, binary 0/255.
    for it in &inputs.items {
        let orig = image::open(&it.image).unwrap();
        for sub in ["masks", "overlays"] {
            let o = image::open(opts.out.join(sub).join(format!("{}.png", it.id))).unwrap();
            assert_eq!(
                (o.width(), o.height()),
                (orig.width(), orig.height()),
                "{sub}/{}",
                it.id
            );
        }
        let mask = image::open(opts.out.join("masks").join(format!("{}.png", it.id)))
            .unwrap()
            .to_luma8();
        assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    }
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(opts.out.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(rep["images"], 5);
    assert!(rep["images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        std::fs::read_to_string(opts.out.join("scores.csv"))
            .unwrap()
            .lines()
            .count(),
        6
    );

    // The Candle SAM on the same merged weights agrees too.
    let candle =
        CandleEngine::load(&folder.weights().unwrap(), &folder.view.sam, &Device::Cpu).unwrap();
    opts.out = tmp.path().join("out-candle");
    opts.overlays = false;
    let (rc, _) = infer::infer(&candle, &inputs, &opts, &mut Silent).unwrap();
    let mc = rc.metrics.unwrap();
    assert!(
        (mc.mdice - m.mdice).abs() < 1e-3,
        "{} vs {}",
        mc.mdice,
        m.mdice
    );
    assert!(!opts.out.join("overlays").exists());
}

#[test]
fn bad_images_stop_the_job_before_writing_unless_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data, 3);
    let images = data.join("images");
    let masks = data.join("masks");
    let first = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&first, &bytes[..bytes.len() / 3]).unwrap(); // truncated JPEG
    let model = tiny_model(tmp.path());
    let engine = OrtEngine::load(&model, 1, None, &mut Silent).unwrap();

    let (c, bad) = input::from_folders(&images, Some(&masks)).unwrap();
    let inputs = input::check(c, bad);
    assert_eq!(inputs.items.len(), 2);
    let out = tmp.path().join("out");
    let opts = InferOptions::new(out.clone());
    let e = infer::infer(&engine, &inputs, &opts, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&first.display().to_string()) && e.contains("--skip-bad"),
        "{e}"
    );
    assert!(!out.exists(), "something was written before refusing");

    let mut opts = opts;
    opts.skip_bad = true;
    let (r, scores) = infer::infer(&engine, &inputs, &opts, &mut Silent).unwrap();
    assert_eq!(r.images, 2);
    assert_eq!(scores.len(), 2);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].path, first);
    assert!(r.skipped[0].reason.contains("truncated"), "{:?}", r.skipped);
    let written = std::fs::read_dir(out.join("masks")).unwrap().count();
    assert_eq!(written, 2);
    let stem = first.file_stem().unwrap().to_string_lossy().into_owned();
    assert!(!out.join("masks").join(format!("{stem}.png")).exists());
}

#[test]
fn a_model_with_other_inputs_is_refused_with_both_signatures() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, channels) in [("x", 3usize), ("image", 1)] {
        let mut b = GraphBuilder::new("other");
        let x = b
            .input(
                name,
                FLOAT,
                &[Dim::sym("batch"), channels.into(), 16.into(), 16.into()],
            )
            .unwrap();
        let y = b.relu(&x).unwrap();
        b.output(
            &y,
            "y",
            FLOAT,
            &[Dim::sym("batch"), channels.into(), 16.into(), 16.into()],
        )
        .unwrap();
        let m = b
            .finish(gps_seg::onnx::OPSET, gps_seg::onnx::IR_VERSION)
            .unwrap();
        let p = tmp.path().join(format!("{name}{channels}.onnx"));
        write_model(&p, m).unwrap();
        let e = OrtEngine::load(&p, 1, None, &mut Silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected [image rank 4 with 3 channels]"), "{e}");
        assert!(
            e.contains(&format!("found [{name} float32[?, {channels}, 16, 16]]")),
            "{e}"
        );
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
}

/// `bench infer --compare` end to end with a stand-in for the PyTorch side (a small Python
/// script with the same interface: it writes zero logits and, as "torch's export", a copy of
/// our own graph): every engine row is there, the differences are measured against Candle
/// (the copy of our graph matches, the zero logits do not), both optimized graphs are counted
/// (equal, as they are the same graph), `--keep` keeps the files and refuses a folder in use,
/// and a stand-in that writes the wrong number of logits is refused naming the file.
#[test]
fn bench_infer_compare_plumbing_with_a_stand_in_torch() {
    use gps_seg::bench::infer::{run, InferBenchConfig, TorchReference};
    let tmp = tempfile::tempdir().unwrap();
    let stub = |name: &str, extra: usize| {
        let p = tmp.path().join(name);
        std::fs::write(
            &p,
            format!(
                r#"import argparse, json, os, shutil
ap = argparse.ArgumentParser()
for a in ["--model", "--weights", "--images", "--logits-out", "--onnx-out"]:
    ap.add_argument(a)
for a in ["--image-size", "--batch", "--iters", "--rounds", "--threads"]:
    ap.add_argument(a, type=int)
a = ap.parse_args()
assert os.path.getsize(a.weights) > 0
assert os.path.getsize(a.images) == a.batch * 3 * a.image_size ** 2 * 4
open(a.logits_out, "wb").write(bytes(4 * (a.batch * a.image_size ** 2 + {extra})))
shutil.copy(os.path.join(os.path.dirname(a.images), "gps-seg.onnx"), a.onnx_out)
print(json.dumps({{"torch_version": "stand-in", "cpu_capability": "none", "threads": a.threads,
                  "seconds_per_batch": [0.5] * a.rounds, "exporter": "copy"}}))
"#
            ),
        )
        .unwrap();
        p
    };
    let keep = tmp.path().join("keep");
    let mut cfg = InferBenchConfig {
        sam: SamConfig::tiny().with_image_size(64),
        batches: vec![1, 2],
        iters: 1,
        threads: 1,
        ort_lib: None,
        seed: 3,
        rounds: 2,
        torch: Some(TorchReference {
            python: "python3".into(),
            script: stub("stand_in.py", 0),
        }),
        keep: Some(keep.clone()),
    };
    let report = run(&cfg, &mut Silent).unwrap();
    let engines: Vec<(&str, usize)> = report
        .rows
        .iter()
        .map(|r| (r.engine.as_str(), r.batch))
        .collect();
    assert_eq!(
        engines,
        [
            ("onnxruntime (gps-seg graph)", 1),
            ("candle", 1),
            ("onnxruntime (torch stand-in export)", 1),
            ("torch stand-in eager", 1),
            ("onnxruntime (gps-seg graph)", 2),
            ("candle", 2),
            ("onnxruntime (torch stand-in export)", 2),
            ("torch stand-in eager", 2),
        ]
    );
    for r in &report.rows {
        assert_eq!(r.rounds.len(), 2, "{}", r.engine);
        assert!(r.seconds_per_batch > 0.0);
        if r.engine.starts_with("onnxruntime") {
            assert!(r.max_abs_diff < 1e-4, "{}: {}", r.engine, r.max_abs_diff);
        }
        if r.engine == "candle" {
            assert_eq!(r.max_abs_diff, 0.0);
        }
        if r.engine.ends_with("eager") {
            assert!(
                r.max_abs_diff > 1e-3,
                "zero logits must differ from Candle's"
            );
            assert_eq!(r.seconds_per_batch, 0.5);
        }
    }
    let ops = report.ops.expect("op comparison");
    assert_eq!(ops.batch, 2);
    assert_eq!(ops.ours, ops.torch);
    assert!(ops.ours.values().sum::<usize>() > 0);
    assert_eq!(ops.written_nodes.0, ops.written_nodes.1);
    for f in [
        "gps-seg.onnx",
        "gps-seg.optimized.onnx",
        "torch-b2.onnx",
        "weights.safetensors",
    ] {
        assert!(keep.join(f).is_file(), "{f} not kept");
    }
    // A folder in use is refused, and left as it was.
    let before = std::fs::read_dir(&keep).unwrap().count();
    let e = run(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("keep") && e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_dir(&keep).unwrap().count(), before);
    // Wrong-size logits from the Python side: refused, naming the file.
    cfg.keep = None;
    cfg.batches = vec![1];
    cfg.torch = Some(TorchReference {
        python: "python3".into(),
        script: stub("short.py", 7),
    });
    let e = run(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(
        e.contains("torch-logits-b1.f32") && e.contains("expected 4096"),
        "{e}"
    );
}

/// A random-weight tiny SAM at 64 px, exported prompt-free to `path`.
fn tiny_model_at(path: &Path, seed: u64) {
    let cfg = SamConfig::tiny().with_image_size(64);
    let w = random_sam_weights(&cfg, seed).unwrap();
    let (m, _) = export_prompt_free(&cfg, &w, SamExportOptions::default()).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_model(path, m).unwrap();
}

/// The binary in `cwd`: (exit code, stdout + stderr).
fn cli_in(cwd: &Path, args: &[&str]) -> (i32, String) {
    let r = std::process::Command::new(common::bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    (r.status.code().unwrap_or(-1), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `report merge` (#27 case 7): shards carry their job's identity by content — the same model
/// by a relative and an absolute path is one job, another model with the same relative name
/// or other images is not (both shard folders and the field named) — and each shard is
/// checked for coverage (every input exactly once) and per-image consistency (tp ≤ pred,
/// scores present, pooled counts recomputed); the merge of two shards equals the unsharded
/// run to the last bit; `--out` inside a shard folder is refused (#27 case 14).
#[test]
fn report_merge_joins_only_shards_of_one_job_and_checks_every_count() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("kvasir");
    dataset(&data, 7);
    let (img, msk) = (data.join("images"), data.join("masks"));
    // Two different models with the same relative name, each in its own folder.
    tiny_model_at(&t.join("a/model.onnx"), 7);
    tiny_model_at(&t.join("b/model.onnx"), 8);
    let abs_model = t.join("a/model.onnx");
    let infer_args = |model: &str, images: &Path, masks: &Path, out: &Path, shard: &str| {
        let mut v: Vec<String> = [
            "infer",
            "--model",
            model,
            "--images",
            s(images),
            "--masks",
            s(masks),
            "--out",
            s(out),
            "--no-overlays",
            "--quiet",
            "--batch-size",
            "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if !shard.is_empty() {
            v.extend(["--shard".to_string(), shard.to_string()]);
        }
        v
    };
    let run = |cwd: &Path, a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (c, text) = cli_in(cwd, &a);
        assert_eq!(c, 0, "{a:?}: {text}");
    };
    let whole = t.join("whole");
    run(
        &t.join("a"),
        infer_args("model.onnx", &img, &msk, &whole, ""),
    );
    let s0 = t.join("s0");
    let s1 = t.join("s1");
    run(
        &t.join("a"),
        infer_args("model.onnx", &img, &msk, &s0, "0/2"),
    );
    run(t, infer_args(s(&abs_model), &img, &msk, &s1, "1/2"));

    // Relative and absolute paths of one model: one job, merged exactly.
    let merged = t.join("merged");
    let (c, text) = cli_in(t, &["report", "merge", s(&s0), s(&s1), "--out", s(&merged)]);
    assert_eq!(c, 0, "{text}");
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("report.json")).unwrap()).unwrap()
    };
    let (w, m) = (json(&whole), json(&merged));
    for k in ["mdice", "miou", "ref_dice_ignore_bg", "ref_iou_ignore_bg"] {
        let (a, b) = (
            w["metrics"][k].as_f64().unwrap(),
            m["metrics"][k].as_f64().unwrap(),
        );
        assert_eq!(a.to_bits(), b.to_bits(), "{k}: {a} vs {b}");
    }
    assert_eq!(w["scores"], m["scores"]);

    // Another model with the same relative name: refused, naming both folders and the field.
    let s1b = t.join("s1-other-model");
    run(
        &t.join("b"),
        infer_args("model.onnx", &img, &msk, &s1b, "1/2"),
    );
    // Other images under the same folder names: one mask changed.
    let data2 = t.join("kvasir2");
    dataset(&data2, 7);
    let some_mask = std::fs::read_dir(data2.join("masks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let mut gt = image::open(&some_mask).unwrap().to_luma8();
    gt.put_pixel(0, 0, image::Luma([255]));
    gt.save(some_mask.with_extension("png")).unwrap();
    if some_mask.extension().is_some_and(|e| e != "png") {
        std::fs::remove_file(&some_mask).unwrap();
    }
    let s1c = t.join("s1-other-images");
    run(
        &t.join("a"),
        infer_args(
            "model.onnx",
            &data2.join("images"),
            &data2.join("masks"),
            &s1c,
            "1/2",
        ),
    );
    for (other, field) in [(&s1b, "job.model"), (&s1c, "job.inputs_sha256")] {
        let (c, text) = cli_in(
            t,
            &[
                "report",
                "merge",
                s(&s0),
                s(other),
                "--out",
                s(&t.join("x")),
            ],
        );
        assert_eq!(c, 1, "{text}");
        assert!(
            text.contains(s(&s0)) && text.contains(s(other)) && text.contains(field),
            "{field}: {text}"
        );
        assert!(!t.join("x").exists());
    }

    // --out on or inside a shard folder.
    for out in [s0.join("merged"), s1.clone()] {
        let (c, text) = cli_in(t, &["report", "merge", s(&s0), s(&s1), "--out", s(&out)]);
        assert_eq!(c, 1, "{text}");
        assert!(text.contains("refusing to write"), "{text}");
    }
    assert!(!s0.join("merged").exists());

    // Tampered shard reports: each refused, naming the shard file and the field.
    let base = json(&s0);
    let n_scores = base["scores"].as_array().unwrap().len();
    assert!(n_scores >= 3, "{base}");
    type Edit = fn(&mut serde_json::Value);
    let edits: Vec<(&str, Edit, &str)> = vec![
        (
            "a score deleted",
            |v| {
                v["scores"].as_array_mut().unwrap().pop();
            },
            "scores",
        ),
        (
            "no scores",
            |v| {
                v.as_object_mut().unwrap().remove("scores");
            },
            "scores",
        ),
        (
            "an index 999",
            |v| v["scores"][0]["index"] = 999.into(),
            "index",
        ),
        (
            "an index of the other shard",
            |v| v["scores"][0]["index"] = 1.into(),
            "index",
        ),
        (
            "tp > pred",
            |v| {
                let pred = v["scores"][0]["counts"]["pred"].as_u64().unwrap();
                v["scores"][0]["counts"]["tp"] = (pred + 1).into();
            },
            "counts",
        ),
        (
            "a tampered Dice",
            |v| v["scores"][1]["dice"] = 0.999.into(),
            "dice",
        ),
        (
            "tampered pooled",
            |v| {
                let tp = v["pooled"]["tp"].as_u64().unwrap();
                v["pooled"]["tp"] = (tp + 1).into();
            },
            "pooled",
        ),
        (
            "missing pooled",
            |v| {
                v.as_object_mut().unwrap().remove("pooled");
            },
            "pooled",
        ),
        (
            "tampered metrics",
            |v| v["metrics"]["mdice"] = 0.9.into(),
            "metrics",
        ),
        (
            "a negative count",
            |v| v["scores"][0]["counts"]["gt"] = (-1).into(),
            "report.json",
        ),
        (
            "shard index 999",
            |v| v["shard"]["index"] = 999.into(),
            "shard.index",
        ),
        (
            "no job identity",
            |v| {
                v.as_object_mut().unwrap().remove("job");
            },
            "job",
        ),
    ];
    for (what, edit, field) in edits {
        let d = t.join("tampered");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let mut v = base.clone();
        edit(&mut v);
        std::fs::write(d.join("report.json"), v.to_string()).unwrap();
        let e = match gps_seg::infer::report::merge_reports(&[d.clone(), s1.clone()], &t.join("y"))
        {
            Ok(_) => panic!("{what}: merged"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(s(&d.join("report.json"))) && e.contains(field),
            "{what}: {e}"
        );
        assert!(!t.join("y").exists(), "{what}: wrote a merge");
    }
}

/// A job that fails part-way (an image whose header reads but whose pixels do not, in the
/// second batch) removes the `masks/` and `overlays/` it created, or the whole `--out` when it
/// created that, and keeps an `--out` that was there before (#27 case 14).
#[test]
fn a_failed_job_leaves_no_partial_outputs_it_created() {
    use gps_seg::data::imgio;
    let tmp = tempfile::tempdir().unwrap();
    let (img, msk) = (tmp.path().join("images"), tmp.path().join("masks"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&msk).unwrap();
    for id in ["a", "b", "c"] {
        imgio::write_png(
            &img.join(format!("{id}.png")),
            &image::RgbImage::new(20, 10),
        )
        .unwrap();
        imgio::write_png(
            &msk.join(format!("{id}.png")),
            &image::GrayImage::new(20, 10),
        )
        .unwrap();
    }
    // c.png: a corrupt IDAT (the header check passes, decoding fails in batch 2).
    let mut png = std::fs::read(img.join("c.png")).unwrap();
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    png[idat + 8] ^= 0xFF;
    std::fs::write(img.join("c.png"), &png).unwrap();
    let (c, bad) = input::from_folders(&img, Some(&msk)).unwrap();
    let inputs = input::check(c, bad);
    assert_eq!(inputs.items.len(), 3, "{:?}", inputs.bad);
    let mut opts = InferOptions::new(tmp.path().join("new/out"));
    opts.batch_size = 2;
    let e = infer::infer(&Brightness(16), &inputs, &opts, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.png"), "{e}");
    assert!(!tmp.path().join("new").exists(), "left a partial output");
    // An --out that existed (with a file of its own) stays; what the job created goes.
    let out = tmp.path().join("existing");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    opts.out = out.clone();
    assert!(infer::infer(&Brightness(16), &inputs, &opts, &mut Silent).is_err());
    assert!(!out.join("masks").exists() && !out.join("overlays").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}
