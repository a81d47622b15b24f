//! Inference through ONNX Runtime (`ort`): runtime location, batched sessions, reports.

pub mod runtime;
