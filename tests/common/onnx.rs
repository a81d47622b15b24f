//! ONNX Runtime for the tests, output comparison, the independent `onnx.checker`, and the mask
//! `infer` writes for one image.

use gps_seg::infer::{self, input, runtime, InferOptions, OrtEngine};
use gps_seg::progress::Silent;
use ndarray::ArrayD;
use std::path::Path;

pub fn ort_ready() {
    runtime::ensure(None, true).expect("ONNX Runtime library (fetch failed)");
}

pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Run `scripts/check_onnx.py` on `files` if Python's `onnx` is importable.
pub fn onnx_checker(files: &[&Path]) {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import onnx"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("NOTICE: python3 `onnx` not importable; skipping onnx.checker (CI installs it)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_onnx.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(files)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "onnx.checker failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mask `infer` writes for `image` with `model` (batch 1, no overlays; `out` is scratch).
pub fn infer_mask(model: &Path, image: &Path, out: &Path) -> Vec<u8> {
    let dir = out.join("in");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(image, dir.join(image.file_name().unwrap())).unwrap();
    let (c, bad) = input::from_folders(&dir, None).unwrap();
    let engine = OrtEngine::load(model, 1, None, &mut Silent).unwrap();
    let mut opts = InferOptions::new(out.join("out"));
    opts.batch_size = 1;
    opts.overlays = false;
    infer::infer(&engine, &input::check(c, bad), &opts, &mut Silent).unwrap();
    let stem = image.file_stem().unwrap().to_str().unwrap();
    std::fs::read(out.join("out/masks").join(format!("{stem}.png"))).unwrap()
}
