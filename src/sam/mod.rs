//! The Segment Anything Model in Candle (owned by this project, trainable). Mirrors Meta's
//! `segment_anything/modeling`, one file per component.

pub mod config;

pub use config::SamConfig;
pub mod registry;
