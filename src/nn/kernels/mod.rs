//! The CPU kernels at the bottom of nn: Candle custom ops with hand-written forward and
//! backward passes for f32/f64 CPU tensors, and what they share.
//!
//! - [`base`]: the reference-path switch ([`with_reference_path`]), [`use_fused`], the float
//!   trait the kernels are generic over, storage data access, the AVX2/FMA check;
//! - [`cpu_gemm`]: row-split matrix products;
//! - [`fused`]: softmax, layer norm and GELU, one pass each way;
//! - [`sparse_grad`]: the linear carrier (`x·Wᵀ (+ b)`, only the gradients that train);
//! - [`window`]: SAM's window partition and its inverse;
//! - [`attention`]: SAM's decomposed rel-pos attention, query-chunked;
//! - [`depthwise`]: ConvNeXt's depthwise convolution, with its device-agnostic composition
//!   (it chooses between the two by device and dtype itself).
//!
//! Layering: these files import only [`base`] (and [`cpu_gemm`] for the carrier),
//! `crate::error` and `crate::util`; never the layers above. The choice between a kernel and
//! Candle's composed ops is made by its caller: `nn::layers` (softmax, layer norm, GELU,
//! linears), `sam::image_encoder` (window, attention).

pub mod attention;
pub mod base;
pub(crate) mod cpu_gemm;
pub mod depthwise;
pub mod fused;
pub mod sparse_grad;
pub mod window;

pub use base::{reference_path, use_fused, with_reference_path};
