//! ONNX export written from Rust: protobuf types ([`proto`]), a graph builder ([`builder`]) and
//! one exporter per model family ([`sam`], [`classifier`]). Opset 17, IR 8.

pub mod builder;
pub mod classifier;
pub mod delta;
pub mod integrity;
pub mod proto;
pub mod quantize;
pub mod sam;
pub mod serving;
pub mod weights;

pub use builder::{
    read_model, write_model, write_model_external, write_model_with, Dim, ExternalData,
    GraphBuilder, Value, WriteReport, IR_VERSION, OPSET,
};
pub use proto::ModelProto;
