//! gps-seg: GPS (Gradient-based Parameter Selection, Zhang et al., CVPR 2024) fine-tuning of
//! the Segment Anything Model and vision classifiers in Candle, with ONNX export written from
//! Rust and batch inference through ONNX Runtime.
//!
//! Folders follow the data flow (see `docs/ARCHITECTURE.md`):
//! [`data`] → [`sam`]/[`models`] (built on [`nn`]) → [`gps`] → [`train`] → [`onnx`] → [`infer`].
//! Models know nothing of training; [`gps`] never imports a model; inference never imports
//! training; [`serve`] is the HTTP server over inference. Benchmarks and device checks live apart in [`bench`], which may import everything.

pub mod bench;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod gps;
pub mod infer;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod onnx;
pub mod pipeline;
pub mod progress;
pub mod registry;
pub mod sam;
pub mod serve;
pub mod stats;
pub mod studies;
pub mod train;
pub mod util;

pub use error::{Error, Result};
