//! Training: fit/evaluate loops, losses, metrics, schedules, checkpoints and resume.
//! Models know nothing of training; everything about steps, losses and optimisers lives here.

pub mod bench;
pub mod checkpoint;
pub mod cls;
pub mod experiment;
pub mod experiment_seg;
pub mod loss;
pub mod optim;
pub mod pretrain;
pub mod pretrain_cls;
pub mod report;
pub mod run;
pub mod schedule;
pub mod seg;

/// Metrics live in [`crate::metrics`] (shared with inference); re-exported for existing users.
pub use crate::metrics;
/// Progress events live in [`crate::progress`] (shared with inference); re-exported as
/// `train::observer` for existing users.
pub use crate::progress as observer;
