//! Helpers shared by the ONNX integration tests (`tests/onnx.rs`, `tests/onnx_classifier.rs`).

use gps_seg::infer::runtime;
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
