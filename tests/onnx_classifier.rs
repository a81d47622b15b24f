//! Classifier ONNX export (ViT, ConvNeXt) against the Candle forward, run by ONNX Runtime, and
//! the `gps-seg export` CLI for classifiers (one test binary; one ORT environment).
//!
//! The runtime library is located with `runtime::ensure(None, true)` (fetched with pip if it
//! is not in the search order yet, as CI does).

use candle_core::{Device, Tensor};
use gps_seg::data::synth_cls::{self, SynthKind};
use gps_seg::infer::model::{tensor_to_array, OrtModel};
use gps_seg::models::{Classifier, ClassifierConfig};
use gps_seg::nn::ParamStore;
use gps_seg::onnx::classifier::{self, ClassifierExportOptions};
use gps_seg::onnx::write_model;
use gps_seg::util::rng::Rng;
use gps_seg::util::tensors::TensorMap;
use ndarray::ArrayD;
use std::path::Path;

mod common;
use common::{images, max_abs_diff, onnx_checker, ort_ready};

fn max_abs(a: &ArrayD<f32>) -> f32 {
    a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Row-wise argmax of `[N, C]`.
fn argmax(a: &ArrayD<f32>) -> Vec<usize> {
    a.outer_iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect()
}

/// Seeded init (`ParamStore::init`), with the tensors whose init is ~0 (ConvNeXt's layer
/// scale `gamma` = 1e-6, ViT's `cls_token` ~ N(0, 1e-6)) redrawn ~ N(0, 0.5²) so every block
/// visibly changes the output and a wrong block would fail the comparison.
fn random_weights(cfg: &ClassifierConfig, seed: u64) -> TensorMap {
    let vs = ParamStore::init(&Device::Cpu, seed);
    Classifier::new(cfg, &vs).unwrap();
    let mut map = vs.current_tensors().unwrap();
    let mut rng = Rng::derive(seed, "onnx-classifier-test");
    for (name, t) in map.iter_mut() {
        if name.ends_with(".gamma") || name == "cls_token" {
            let v: Vec<f32> = (0..t.elem_count()).map(|_| 0.5 * rng.normal()).collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    map
}

/// Export `cfg` with `w`, check it, and compare ORT with Candle at batch 1 and 3.
fn parity(cfg: &ClassifierConfig, w: &TensorMap, dir: &Path) {
    let (model, s) = classifier::export(cfg, w, ClassifierExportOptions::default()).unwrap();
    assert_eq!(s.param_count, cfg.param_count(), "no extra parameters");
    let path = dir.join(format!("{}.onnx", cfg.name()));
    write_model(&path, model).unwrap();
    onnx_checker(&[&path]);
    let m = OrtModel::load(&path, 2).unwrap();
    m.expect_signature(&[("image", 4, Some(3))]).unwrap();
    let store = ParamStore::frozen(w.clone(), &Device::Cpu);
    let net = Classifier::new(cfg, &store).unwrap();
    store.check_all_used().unwrap();
    let size = cfg.image_size();
    for n in [1usize, 3] {
        let x = images(n, size, 100 + n as u64);
        let out = m.run(&[("image", &tensor_to_array(&x).unwrap())]).unwrap();
        assert_eq!(out[0].0, "logits");
        assert_eq!(out[1].0, "features");
        let logits = tensor_to_array(&net.forward(&x).unwrap()).unwrap();
        let feats = tensor_to_array(&net.features(&x).unwrap()).unwrap();
        assert_eq!(out[0].1.shape(), &[n, cfg.num_classes()]);
        let dl = max_abs_diff(&out[0].1, &logits);
        let df = max_abs_diff(&out[1].1, &feats);
        eprintln!(
            "{} batch {n}: {} nodes, {} params; max|logit| {:.3}, logits max abs diff {dl:.2e}, \
             features max abs diff {df:.2e}",
            cfg.name(),
            s.node_count,
            s.param_count,
            max_abs(&logits)
        );
        assert!(dl < 1e-4, "{} batch {n}: logits differ by {dl}", cfg.name());
        assert!(
            df < 1e-4,
            "{} batch {n}: features differ by {df}",
            cfg.name()
        );
        assert_eq!(argmax(&out[0].1), argmax(&logits), "top-1 differs");
    }
}

#[test]
fn vit_tiny_matches_candle() {
    ort_ready();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClassifierConfig::preset("vit_tiny_cpu", 10).unwrap();
    parity(&cfg, &random_weights(&cfg, 1), dir.path());
}

#[test]
fn convnext_tiny_matches_candle() {
    ort_ready();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClassifierConfig::preset("convnext_tiny_cpu", 10).unwrap();
    parity(&cfg, &random_weights(&cfg, 2), dir.path());
}

/// The shipped pretrained `sam/vit-tiny` on rendered upstream images (its own 56 classes):
/// ORT's predictions and accuracy equal Candle's.
#[test]
fn shipped_vit_tiny_accuracy_equals_candle() {
    ort_ready();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg: ClassifierConfig =
        gps_seg::util::fs::read_json(&root.join("sam/vit-tiny.json")).unwrap();
    let w =
        gps_seg::util::tensors::load(&root.join("sam/vit-tiny.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (model, s) = classifier::export(&cfg, &w, ClassifierExportOptions::default()).unwrap();
    let total: usize = w.values().map(|t| t.elem_count()).sum();
    assert_eq!(s.param_count, total);
    let path = dir.path().join("vit-tiny.onnx");
    write_model(&path, model).unwrap();
    let m = OrtModel::load(&path, 2).unwrap();
    let store = ParamStore::frozen(w, &Device::Cpu);
    let net = Classifier::new(&cfg, &store).unwrap();

    let (nc, size) = (cfg.num_classes(), cfg.image_size());
    let n = 2 * nc;
    let mut rng = Rng::new(7);
    let mut px = Vec::with_capacity(n * 3 * size * size);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % nc;
        let img = synth_cls::render(SynthKind::Upstream, c, nc, size, &mut rng);
        for ch in 0..3 {
            for y in 0..size as u32 {
                for x in 0..size as u32 {
                    px.push(img.get_pixel(x, y)[ch] as f32 / 255.0);
                }
            }
        }
        labels.push(c);
    }
    let x = Tensor::from_vec(px, (n, 3, size, size), &Device::Cpu).unwrap();
    let ort = m.run(&[("image", &tensor_to_array(&x).unwrap())]).unwrap();
    let cand = tensor_to_array(&net.forward(&x).unwrap()).unwrap();
    let d = max_abs_diff(&ort[0].1, &cand);
    let (po, pc) = (argmax(&ort[0].1), argmax(&cand));
    let acc = |p: &[usize]| p.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64 / n as f64;
    eprintln!(
        "shipped vit-tiny on {n} rendered upstream images: ORT acc {:.4}, Candle acc {:.4}, \
         logits max abs diff {d:.2e}",
        acc(&po),
        acc(&pc)
    );
    assert!(d < 1e-4, "logits differ by {d}");
    assert_eq!(po, pc);
    assert_eq!(acc(&po), acc(&pc));
}

/// `gps-seg export` on the shipped checkpoint (config from the JSON beside it) and on a
/// classification run folder (`model.json` + `merged.safetensors`).
#[test]
fn cli_exports_classifiers() {
    ort_ready();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = env!("CARGO_BIN_EXE_gps-seg");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe)
            .arg("export")
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), text, err)
    };
    let vit = dir.path().join("vit.onnx");
    let ck = root.join("sam/vit-tiny.safetensors");
    let (ok, text, err) = run(&[
        "--model",
        ck.to_str().unwrap(),
        "--out",
        vit.to_str().unwrap(),
    ]);
    assert!(ok, "{text}\n{err}");
    eprintln!("{text}");
    assert!(
        text.contains("logits") && text.contains("features"),
        "{text}"
    );
    assert!(text.contains("2720888"), "{text}");
    let m = OrtModel::load(&vit, 1).unwrap();
    m.expect_signature(&[("image", 4, Some(3))]).unwrap();

    // A classification run folder: model.json + merged.safetensors (a ConvNeXt here).
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let cfg = ClassifierConfig::preset("convnext_tiny_cpu", 4).unwrap();
    gps_seg::util::fs::write_json_atomic(&run_dir.join("model.json"), &cfg).unwrap();
    gps_seg::util::tensors::save_safetensors(
        &run_dir.join("merged.safetensors"),
        &random_weights(&cfg, 3),
        None,
    )
    .unwrap();
    let cx = dir.path().join("cx.onnx");
    let (ok, text, err) = run(&[
        "--model",
        run_dir.to_str().unwrap(),
        "--out",
        cx.to_str().unwrap(),
    ]);
    assert!(ok, "{text}\n{err}");
    assert!(text.contains(&cfg.param_count().to_string()), "{text}");
    let m = OrtModel::load(&cx, 1).unwrap();
    let out = m
        .run(&[("image", &tensor_to_array(&images(2, 64, 5)).unwrap())])
        .unwrap();
    assert_eq!(out[0].1.shape(), &[2, 4]);

    // A run folder whose weights do not fit its model.json fails, naming the tensor, and
    // writes nothing.
    let bad_cfg = ClassifierConfig::preset("convnext_tiny_cpu", 5).unwrap();
    gps_seg::util::fs::write_json_atomic(&run_dir.join("model.json"), &bad_cfg).unwrap();
    let bad = dir.path().join("bad.onnx");
    let (ok, _, err) = run(&[
        "--model",
        run_dir.to_str().unwrap(),
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("head.fc"), "{err}");
    assert!(!bad.exists());
}
