//! The Segment Anything Model in Candle (owned by this project, trainable). Mirrors Meta's
//! `segment_anything/modeling`, one file per component; tensor names are the official
//! checkpoint keys, so `sam_vit_{b,l,h}_*.pth` load unchanged.
//!
//! - [`image_encoder`]: ViT with windowed/global attention and decomposed relative positions;
//! - [`prompt_encoder`]: points, boxes, masks → sparse and dense prompt embeddings;
//! - [`transformer`]: the two-way transformer; [`mask_decoder`]: tokens → masks + IoU;
//! - [`sam`]: the assembled model, its parameter listing and the prompt-free / prompted paths;
//! - [`load`]: checkpoint loading with position-table resizing (speed: `crate::bench::sam`);
//! - [`config`]: the presets and their checks; [`memory`]: what a config needs in memory.
//!
//! Within the folder the parts import `config` and `common` directly (not this file's
//! re-exports), so no two files import each other.

pub mod common;
pub mod config;
pub mod files;
pub mod image_encoder;
pub mod info;
pub mod load;
pub mod mask_decoder;
pub mod memory;
pub mod prompt_encoder;
#[allow(clippy::module_inception)]
pub mod sam;
pub mod transformer;

pub use config::SamConfig;
pub use image_encoder::{EncoderCheckpoints, ImageEncoderViT};
pub use load::load_weights;
pub use mask_decoder::MaskDecoder;
pub use prompt_encoder::PromptEncoder;
pub use sam::{build, ParamShape, Sam, SamCounts};
pub use transformer::TwoWayTransformer;
