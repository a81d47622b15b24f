//! Helpers shared by the integration tests (each test file declares `mod common;` and uses
//! what it needs): the binary under test and its runners ([`cli`]), seeded inputs, synthetic
//! data and tiny configs ([`inputs`]), folder snapshots ([`files`]), ONNX Runtime and the
//! onnx checker ([`onnx`]).
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod files;
pub mod inputs;
pub mod onnx;

pub use cli::{bin, cli, gps_seg, gps_seg_ok, run};
pub use files::{crc32, snapshot};
pub use inputs::{images, images_array, synth_kvasir, tiny_seg_cfg, TinySeg};
pub use onnx::{infer_mask, max_abs_diff, onnx_checker, ort_ready};
