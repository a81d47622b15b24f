//! Training: one loop ([`fit`]) over tasks ([`task::Task`]: segmentation [`seg`],
//! classification [`cls`], SAM pretraining [`pretrain`]), the shared config core and method
//! vocabulary ([`config`]), losses ([`loss`]). Models know nothing of training; everything
//! about steps, losses and optimisers lives here. Studies over many runs (seeds, training-set
//! sizes, paired intervals) are [`crate::studies`].

pub mod cls;
pub mod config;
pub mod fit;
pub mod loss;
pub mod pretrain;
pub mod seg;
pub mod task;

/// Metrics live in [`crate::metrics`] (shared with inference); re-exported for existing users.
pub use crate::metrics;
/// Progress events live in [`crate::progress`] (shared with inference); re-exported as
/// `train::observer` for existing users.
pub use crate::progress as observer;
