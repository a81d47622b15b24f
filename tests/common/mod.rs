//! Helpers shared by the integration tests: ONNX Runtime and the onnx checker, and a
//! model-free stand-in engine for the inference job's own behaviour.

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

/// Mask logits from the images' brightness, `8 · (mean RGB − 0.5)` (a white square on black is
/// found): a stand-in engine, so the job, its reports and `report merge` are tested without a
/// model.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub struct Brightness(pub usize);

impl gps_seg::infer::Engine for Brightness {
    fn name(&self) -> &'static str {
        "brightness"
    }
    fn input_size(&self) -> usize {
        self.0
    }
    fn describe(&self) -> String {
        "test engine".into()
    }
    fn logits(&self, images: &[f32], n: usize) -> gps_seg::Result<gps_seg::infer::Logits> {
        let a = self.0 * self.0;
        let data = (0..n * a)
            .map(|k| {
                let (b, p) = (k / a, k % a);
                let m: f32 = (0..3).map(|c| images[(b * 3 + c) * a + p]).sum::<f32>() / 3.0;
                8.0 * (m - 0.5)
            })
            .collect();
        Ok(gps_seg::infer::Logits {
            n,
            size: self.0,
            data,
        })
    }
}
