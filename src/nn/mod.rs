//! Differentiable building blocks shared by every model: named params ([`param`]), layers
//! whose backward is verified ([`layers`]), fused CPU kernels with their own backward
//! ([`fused`], and the query-chunked attention of [`attention`]), autocast to bf16/f16
//! ([`precision`]) and finite-difference checks ([`gradcheck`]).

pub mod attention;
pub mod fused;
pub mod gradcheck;
pub mod layers;
pub mod param;
pub mod precision;
pub mod sparse_grad;

pub use layers::{Conv2d, ConvTranspose2d, Embedding, LayerNorm, LayerNorm2d, Linear};
pub use param::{Init, Param, ParamStore, Role, RolePolicy};
pub use precision::Precision;
