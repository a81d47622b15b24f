//! Helpers shared by the integration tests (each test file declares `mod common;` and uses
//! what it needs): the binary under test and its runners ([`cli`]), seeded inputs, synthetic
//! data and tiny configs ([`inputs`]), folder snapshots ([`files`]), ONNX Runtime and the
//! onnx checker ([`onnx`]), weight differences ([`weights`]).
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod files;
pub mod inputs;
pub mod onnx;
pub mod weights;

pub use cli::{bin, cli, gps_seg, gps_seg_ok, run};
pub use files::{crc32, snapshot};
pub use inputs::{images, images_array, synth_kvasir, tiny_seg_cfg, TinySeg};
pub use onnx::{infer_mask, max_abs_diff, onnx_checker, ort_ready};
pub use weights::{agreement, rel_diffs};

/// Mask logits from the images' brightness, `8 · (mean RGB − 0.5)` (a white square on black is
/// found): a stand-in engine, so the job, its reports and `report merge` are tested without a
/// model.
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
