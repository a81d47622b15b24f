//! Checks and measurements that are not model code: speed tables and device parity. These may
//! import everything (models, data, training, inference); nothing in the library imports them
//! except the CLI (`gps-seg bench …`, `gps-seg parity`) and tests.
//!
//! - [`sam`]: prompt-free SAM forward / forward + backward speed and the analytic FLOP count;
//! - [`train`]: a full fine-tuning step against a GPS step (Candle, and PyTorch via a script);
//! - [`data`]: data-pipeline throughput; [`infer`]: ONNX Runtime against the Candle SAM;
//! - [`serve`]: the HTTP server under closed-loop load against plain ONNX Runtime;
//! - [`parity`]: forward + backward of a device against the CPU reference path.

pub mod data;
pub mod infer;
pub mod parity;
pub mod precision;
pub mod run_memory;
pub mod sam;
pub mod serve;
pub mod tasks;
pub mod train;
