//! ONNX: protobuf types, a graph builder, exporters per model family.
