//! End-to-end training on a tiny synthetic Kvasir set: every method writes its run folder and
//! its loss falls; a killed run resumes to the same final metrics; bad settings are refused.

mod common;

use candle_core::Device;
use common::{cli, TinySeg};
use gps_seg::nn::Precision;
use gps_seg::train::observer::{Event, Observer, Silent};
use gps_seg::train::seg::{self, Method, SegTrainConfig};
use std::path::Path;

/// This file's tiny run: SAM tiny at 128 px, 2 epochs, batches of 4, one selection batch.
fn tiny_cfg(data: &Path) -> SegTrainConfig {
    common::tiny_seg_cfg(
        data,
        TinySeg {
            image_size: 128,
            epochs: 2,
            batch_size: 4,
            eval_batch_size: 4,
            select_batches: 1,
        },
    )
}

/// 40 synthetic pairs, seed 3, sides up to 360 px.
fn dataset(dir: &Path) {
    common::synth_kvasir(dir, 40, 3, 360);
}

#[test]
fn every_method_trains_writes_its_run_folder_and_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    for method in [
        Method::Gps,
        Method::Full,
        Method::Decoder,
        Method::Random,
        Method::Magnitude,
    ] {
        let mut cfg = tiny_cfg(&data);
        cfg.method = method;
        cfg.epochs = 3;
        let run = tmp.path().join(format!("run-{}", method.name()));
        let s = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
        for f in [
            "config.json",
            "split.json",
            "metrics.jsonl",
            "report.html",
            "summary.json",
            "merged.safetensors",
            "loss.png",
            "metrics.png",
            "scores.csv",
            "best/params.safetensors",
            "checkpoints/LATEST",
            "overlays",
        ] {
            assert!(run.join(f).exists(), "{method:?}: missing {f}");
        }
        let sparse = matches!(method, Method::Gps | Method::Random | Method::Magnitude);
        assert_eq!(
            run.join("gps/delta.safetensors").exists(),
            sparse,
            "{method:?}"
        );
        // Same 4 images every step (no flip): the loss must fall.
        let state: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        // Validation chooses, test is scored: both are recorded every epoch.
        assert!(state["val"]["eval"]["images"].as_u64().is_some(), "{state}");
        assert!(
            state["test"]["eval"]["images"].as_u64() == Some(4),
            "{state}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        assert!(summary["trainable"].as_u64().unwrap() > 0);
        let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                run.join("checkpoints")
                    .join(latest.trim())
                    .join("state.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let losses: Vec<f64> = st["step_losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 3);
        assert!(
            losses[2] < losses[0],
            "{method:?}: loss did not fall: {losses:?}"
        );
        assert!(s.trainable_pct > 0.0 && s.trainable_pct <= 100.0);
    }
}

struct KillAt(String);

impl Observer for KillAt {
    fn event(&mut self, e: Event) {
        if let Event::PhaseStart { name, .. } = &e {
            if *name == self.0 {
                panic!("simulated kill at {name}");
            }
        }
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let mut cfg = tiny_cfg(&data);
    cfg.hflip = 0.5;
    cfg.train_limit = Some(8);
    cfg.epochs = 3;
    let a = tmp.path().join("a");
    seg::train(&cfg, &a, &Device::Cpu, false, &mut Silent).unwrap();
    let b = tmp.path().join("b");
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = seg::train(
            &cfg,
            &b,
            &Device::Cpu,
            false,
            &mut KillAt("epoch 3/3".into()),
        );
    }));
    assert!(killed.is_err(), "the run should have been killed");
    assert!(!b.join("summary.json").exists());
    // Starting again without --resume is refused; with it, the run completes.
    assert!(seg::train(&cfg, &b, &Device::Cpu, false, &mut Silent).is_err());
    seg::train(&cfg, &b, &Device::Cpu, true, &mut Silent).unwrap();
    let ma = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let strip = |s: &str| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("seconds");
                o.remove("images_per_s");
                v
            })
            .collect()
    };
    assert_eq!(strip(&ma), strip(&mb));
    let wa = std::fs::read(a.join("merged.safetensors")).unwrap();
    let wb = std::fs::read(b.join("merged.safetensors")).unwrap();
    assert!(wa == wb, "merged weights differ after resume");
}

#[test]
fn bad_settings_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    std::fs::create_dir_all(&data).unwrap();
    let run = tmp.path().join("run");
    type Edit = Box<dyn Fn(&mut SegTrainConfig)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("topk", Box::new(|c| c.topk = 0)),
        ("lr", Box::new(|c| c.lr = 0.0)),
        ("batch_size", Box::new(|c| c.batch_size = 0)),
        ("epochs", Box::new(|c| c.epochs = 0)),
    ];
    for (field, set) in cases {
        let mut cfg = tiny_cfg(&data);
        set(&mut cfg);
        let e = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
        assert!(!run.exists(), "{field}: work started");
    }
    let cfg = tiny_cfg(&tmp.path().join("nowhere"));
    let e = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nowhere"), "{e}");
    let mut cfg = tiny_cfg(&data);
    cfg.dtype = Precision::Bf16;
    let e = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--dtype bf16 runs on CUDA only; the CPU path computes in f32"
    );
    assert!(!run.exists(), "dtype: work started");
}

/// A run config written before `dtype` existed loads as f32; a bf16 one round-trips.
#[test]
fn run_config_dtype_defaults_to_f32() {
    let mut cfg = tiny_cfg(Path::new("data"));
    cfg.dtype = Precision::Bf16;
    let mut j = serde_json::to_value(&cfg).unwrap();
    assert_eq!(j["dtype"], "bf16");
    let back: SegTrainConfig = serde_json::from_value(j.clone()).unwrap();
    assert_eq!(back.dtype, Precision::Bf16);
    j.as_object_mut().unwrap().remove("dtype");
    let old: SegTrainConfig = serde_json::from_value(j).unwrap();
    assert_eq!(old.dtype, Precision::F32);
}

/// `--dtype bf16|f16` with a CPU device is a one-line error on every command that has the
/// flag, before any work; an unknown dtype names the choices.
#[test]
fn cli_refuses_low_precision_on_cpu() {
    let exe = env!("CARGO_BIN_EXE_gps-seg");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let commands: [&[&str]; 6] = [
        &["train", "--task", "seg", "--out", o],
        &["bench", "sam"],
        &["bench", "train"],
        &["eval"],
        &["experiment", "kvasir", "--out", o],
        &["train", "--task", "classify", "--data-dir", o, "--out", o],
    ];
    for cmd in commands {
        for dtype in ["bf16", "f16"] {
            let r = std::process::Command::new(exe)
                .args(cmd)
                .args(["--device", "cpu", "--dtype", dtype])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(!r.status.success(), "{cmd:?} --dtype {dtype} succeeded");
            assert_eq!(r.status.code(), Some(1), "{cmd:?}: {err}");
            assert!(!err.contains("panicked"), "{cmd:?}: {err}");
            let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("device:")).collect();
            let want = if cmd.contains(&"classify") {
                format!("error: --dtype {dtype}: only `--task seg` (SAM's image encoder) has a bf16/f16 path")
            } else {
                format!("error: --dtype {dtype} runs on CUDA only; the CPU path computes in f32")
            };
            assert_eq!(lines, [want.as_str()], "{cmd:?}");
            assert!(!out.exists(), "{cmd:?}: work started");
        }
    }
    let r = std::process::Command::new(exe)
        .args(["bench", "sam", "--device", "cpu", "--dtype", "f8"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("f32, bf16, f16"), "{err}");
}

#[test]
fn checkpointed_blocks_train_like_the_plain_path() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let mut cfg = tiny_cfg(&data);
    cfg.epochs = 1;
    let plain = tmp.path().join("plain");
    seg::train(&cfg, &plain, &Device::Cpu, false, &mut Silent).unwrap();
    cfg.checkpoint_blocks = true;
    let ck = tmp.path().join("ck");
    seg::train(&cfg, &ck, &Device::Cpu, false, &mut Silent).unwrap();
    let a =
        gps_seg::util::tensors::load(&plain.join("gps/delta.safetensors"), &Device::Cpu).unwrap();
    let b = gps_seg::util::tensors::load(&ck.join("gps/delta.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let d = gps_seg::nn::gradcheck::max_abs_diff(ta, &b[name]).unwrap();
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// "Best" survives a kill: after a run killed mid-way, a deleted, truncated or stale `best/`
/// is rebuilt on resume from the best epoch's checkpoint (kept from pruning), and the run
/// finishes with the uninterrupted run's summary and merged weights.
#[test]
fn resume_repairs_a_missing_damaged_or_stale_best_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let mut cfg = tiny_cfg(&data);
    cfg.epochs = 3;
    cfg.keep_last = 1;
    let a = tmp.path().join("a");
    let sa = seg::train(&cfg, &a, &Device::Cpu, false, &mut Silent).unwrap();
    for damage in ["delete", "truncate", "stale"] {
        let b = tmp.path().join(format!("b-{damage}"));
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = seg::train(
                &cfg,
                &b,
                &Device::Cpu,
                false,
                &mut KillAt("epoch 3/3".into()),
            );
        }));
        assert!(killed.is_err(), "the run should have been killed");
        let best = b.join("best");
        assert!(best.join("params.safetensors").is_file(), "{damage}");
        match damage {
            "delete" => std::fs::remove_dir_all(&best).unwrap(),
            "truncate" => {
                let p = best.join("params.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
            }
            _ => {
                // A complete but stale best/: other values, naming another epoch (a kill
                // between the state that names the new best and the copy).
                let p = best.join("params.safetensors");
                let m = gps_seg::util::tensors::load(&p, &Device::Cpu).unwrap();
                let zeroed: gps_seg::util::tensors::TensorMap = m
                    .iter()
                    .map(|(n, t)| (n.clone(), t.zeros_like().unwrap()))
                    .collect();
                gps_seg::util::tensors::save_safetensors(&p, &zeroed, None).unwrap();
                std::fs::write(best.join("EPOCH"), "epoch-0009\n").unwrap();
            }
        }
        let sb = seg::train(&cfg, &b, &Device::Cpu, true, &mut Silent).unwrap();
        assert_eq!(sb.best_epoch, sa.best_epoch, "{damage}");
        assert_eq!(sb.best, sa.best, "{damage}");
        assert_eq!(sb.last, sa.last, "{damage}");
        let wa = std::fs::read(a.join("merged.safetensors")).unwrap();
        let wb = std::fs::read(b.join("merged.safetensors")).unwrap();
        assert!(wa == wb, "{damage}: merged weights differ after the repair");
    }
}

/// `--max-steps 0` is a config error; `--lr` below the default floor without `--min-lr`
/// trains (the default floor follows `--lr`), while an explicit `--min-lr` above `--lr` is
/// refused naming both flags; flags of the other task are refused, not ignored.
#[test]
fn cli_settings_are_checked_once_and_foreign_flags_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let d = data.to_str().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let quick = [
        "--epochs",
        "1",
        "--train-limit",
        "2",
        "--test-limit",
        "2",
        "--select-batches",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ];
    let run = |extra: &[&str]| {
        let mut a = vec!["train", "--data-dir", d, "--out", o];
        a.extend_from_slice(&quick);
        a.extend_from_slice(extra);
        cli(&a)
    };
    let (code, err) = run(&["--max-steps", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("max_steps_per_epoch") && err.contains("--max-steps"),
        "{err}"
    );
    assert!(!out.exists(), "--max-steps 0: work started");
    let (code, err) = run(&["--lr", "1e-9", "--min-lr", "1e-3"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--min-lr") && err.contains("--lr"), "{err}");
    assert!(!out.exists(), "--min-lr > --lr: work started");
    for (flag, value) in [
        ("--select-loss", Some("ce")),
        ("--warmup-epochs", Some("1")),
        ("--arch", Some("vit_tiny_cpu")),
        ("--random-init", None),
    ] {
        let mut extra = vec![flag];
        extra.extend(value);
        let (code, err) = run(&extra);
        assert_eq!(code, Some(1), "{flag}: {err}");
        assert!(
            err.contains(flag) && err.contains("--task classify"),
            "{flag}: {err}"
        );
    }
    for (flag, value) in [("--checkpoint-blocks", None), ("--resize", Some("pad"))] {
        let mut a = vec![
            "train",
            "--task",
            "classify",
            "--data-dir",
            d,
            "--out",
            o,
            flag,
        ];
        a.extend(value);
        let (code, err) = cli(&a);
        assert_eq!(code, Some(1), "{flag}: {err}");
        assert!(
            err.contains(flag) && err.contains("--task seg"),
            "{flag}: {err}"
        );
    }
    assert!(!out.exists(), "a refused flag started work");
    let (code, err) = run(&["--lr", "1e-9", "--max-steps", "1"]);
    assert_eq!(code, Some(0), "--lr 1e-9 without --min-lr: {err}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(saved["min_lr"].as_f64().unwrap() <= 1e-9, "{saved}");
}

/// Outputs never overwrite inputs, and nothing a command did not create is deleted unasked:
/// `train --out` inside the data folder, `select --out` onto a trained artifact, and `demo`
/// onto an earlier run are refused naming the paths (select and demo accept `--overwrite`).
#[test]
fn outputs_never_replace_inputs_or_earlier_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let images = data.join("images");
    let before = std::fs::read_dir(&images).unwrap().count();
    let (code, err) = cli(&[
        "train",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        images.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(images.to_str().unwrap()), "{err}");
    assert!(
        err.contains(&format!("input --data-dir {}", data.display())),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), before);

    // select --out onto a folder holding a trained delta.
    let art = tmp.path().join("art");
    std::fs::create_dir_all(&art).unwrap();
    std::fs::write(art.join("delta.safetensors"), b"trained").unwrap();
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/sam/sam-tiny.safetensors");
    let sel = |extra: &[&str]| {
        let mut a = vec![
            "select",
            "--base",
            base,
            "--criterion",
            "magnitude",
            "--out",
            art.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        cli(&a)
    };
    let (code, err) = sel(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--overwrite") && err.contains("delta.safetensors"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(art.join("delta.safetensors")).unwrap(),
        b"trained"
    );
    let (code, err) = sel(&["--overwrite"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(art.join("gps_config.json").is_file());

    // demo --out onto an earlier run keeps it.
    let demo = tmp.path().join("demo");
    std::fs::create_dir_all(demo.join("gps")).unwrap();
    std::fs::write(demo.join("gps/keep.txt"), b"mine").unwrap();
    let (code, err) = cli(&[
        "demo",
        "--quick",
        "--out",
        demo.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--overwrite") && err.contains("gps"), "{err}");
    assert_eq!(std::fs::read(demo.join("gps/keep.txt")).unwrap(), b"mine");
}

/// `experiment kvasir` reuses a finished variant, refuses a variant folder holding anything
/// else unless told to overwrite, and then replaces it.
#[test]
fn experiment_variant_folders_are_replaced_only_when_asked() {
    use gps_seg::studies::kvasir::{default_variants, run_kvasir};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let cfg = tiny_cfg(&data);
    let mut variants = default_variants(1e-3);
    variants.retain(|v| v.label == "zero-shot");
    let out = tmp.path().join("exp");
    let vdir = out.join(format!("train-all/seed-{}/zero-shot", cfg.seed));
    let junk = vdir.join("notes.txt");
    std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
    std::fs::write(&junk, b"mine").unwrap();
    let run = |overwrite| {
        run_kvasir(
            &cfg,
            &variants,
            1,
            &[None],
            &out,
            overwrite,
            &Device::Cpu,
            &mut Silent,
        )
    };
    let e = run(false).unwrap_err().to_string();
    assert!(e.contains("--overwrite") && e.contains("zero-shot"), "{e}");
    assert!(junk.is_file(), "refused, yet deleted");
    let (rows, _) = run(true).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!junk.exists() && vdir.join("summary.json").is_file());
    // Finished with the same settings: reused without --overwrite.
    let (again, _) = run(false).unwrap();
    assert_eq!(again[0].summary.best, rows[0].summary.best);
}

/// The shipped epoch is the validation-best one, and the summary reports the *test* metrics at
/// that epoch (`selected_on: val`); the split holds disjoint train / val / test lists.
#[test]
fn the_summary_ships_the_val_best_epoch_and_reports_test_there() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let mut cfg = tiny_cfg(&data);
    cfg.epochs = 4;
    let run = tmp.path().join("run");
    let s = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 4);
    let val = |r: &serde_json::Value| r["val"]["eval"]["mdice"].as_f64().unwrap();
    let mut best = 0;
    for (i, r) in recs.iter().enumerate() {
        if val(r) > val(&recs[best]) {
            best = i;
        }
    }
    assert_eq!(
        s.best_epoch,
        Some(best + 1),
        "not the validation-best epoch"
    );
    assert_eq!(s.selected_on, "val");
    assert_eq!(
        s.best.mdice,
        recs[best]["test"]["eval"]["mdice"].as_f64().unwrap()
    );
    assert_eq!(s.val.mdice, val(&recs[best]));
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    let ids = |k: &str| -> std::collections::BTreeSet<String> {
        split[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (tr, va, te) = (ids("train"), ids("val"), ids("test"));
    assert!(!va.is_empty() && !te.is_empty());
    assert!(tr.is_disjoint(&va) && tr.is_disjoint(&te) && va.is_disjoint(&te));
    // gps_config.json records how many images the selection gradients came from.
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("gps/gps_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        g["selection_images"].as_u64(),
        Some(4),
        "select_batches 1 × batch 4"
    );
}

/// A fresh run never reuses a selection made with other settings (here K = 1 for a K = 2 run):
/// an error naming the field; and by default selection covers every training image.
#[test]
fn a_stale_selection_is_refused_and_selection_covers_the_training_split() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data);
    let mut cfg = tiny_cfg(&data);
    cfg.select_batches = None;
    cfg.train_limit = None;
    cfg.epochs = 1;
    let run = tmp.path().join("run");
    seg::select(&cfg, &run.join("gps"), &Device::Cpu, &mut Silent).unwrap();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("gps/gps_config.json")).unwrap())
            .unwrap();
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("gps/split.json")).unwrap())
            .unwrap();
    assert_eq!(
        g["selection_images"].as_u64(),
        Some(split["train"].as_array().unwrap().len() as u64),
        "the default selection pass sees every training image"
    );
    cfg.topk = 2;
    let e = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stale selection") && e.contains("`k`"), "{e}");
}

/// The training step's split backward (one image chunk per thread on the CPU, each chunk's
/// loss weighted by its share) gives the whole batch's loss and the gradient of every trainable
/// var — full fine-tuning and a GPS selection with sparse deltas — up to float rounding.
#[test]
fn split_backward_equals_the_whole_batch() {
    use gps_seg::bench::train::{gps_setup, random_batch};
    use gps_seg::nn::gradcheck::max_abs_diff;
    use gps_seg::train::loss::seg_loss;
    let cfg = gps_seg::sam::SamConfig::tiny().with_image_size(64);
    let dev = Device::Cpu;
    let (x, t) = random_batch(5, 64, 3, &dev).unwrap();
    let (full, full_store) =
        gps_seg::sam::build(&cfg, None, gps_seg::nn::RolePolicy::AllTrainable, &dev, 4).unwrap();
    let (gps, gps_store, _, _) = gps_setup(&cfg, &dev, 4, 1, 1e-4).unwrap();
    for (sam, store) in [(&full, &full_store), (&gps, &gps_store)] {
        let whole = seg_loss(&sam.forward_prompt_free(&x).unwrap(), &t).unwrap();
        let wg = whole.backward().unwrap();
        let n = 5;
        let (loss, sg) = gps_seg::nn::split_backward(n, true, |r| {
            let l = seg_loss(
                &sam.forward_prompt_free(&x.narrow(0, r.start, r.len())?)?,
                &t.narrow(0, r.start, r.len())?,
            )?;
            Ok((l * (r.len() as f64 / n as f64))?)
        })
        .unwrap();
        let scalar = |t: &candle_core::Tensor| t.to_scalar::<f32>().unwrap();
        assert!((scalar(&loss) - scalar(&whole)).abs() < 1e-5);
        let vars = store.trainable_vars();
        let mut compared = 0;
        for (name, v) in &vars {
            // Vars the prompt-free path never reads (point embeddings) have no gradient in
            // either store.
            let (a, b) = match (wg.get(v.as_tensor()), sg.get(v.as_tensor())) {
                (None, None) => continue,
                (Some(a), Some(b)) => (a, b),
                (a, b) => panic!("{name}: gradient in one store only ({a:?} / {b:?})"),
            };
            compared += 1;
            let scale = max_abs_diff(a, &a.zeros_like().unwrap()).unwrap();
            let d = max_abs_diff(a, b).unwrap();
            assert!(d <= 1e-4 * scale.max(1e-3), "{name}: |Δ| {d} of {scale}");
        }
        assert!(
            compared > vars.len() / 2,
            "{compared} of {} vars compared",
            vars.len()
        );
    }
}
