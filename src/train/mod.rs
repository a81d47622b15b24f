//! Training: one loop ([`fit`]) over tasks ([`task::Task`]: segmentation [`seg`], classification
//! [`cls`]), the shared config core and method vocabulary ([`config`]), losses, metrics,
//! schedules, checkpoints and resume. Models know nothing of training; everything about steps,
//! losses and optimisers lives here.

pub mod checkpoint;
pub mod cls;
pub mod cls_data;
pub mod config;
pub mod experiment;
pub mod experiment_seg;
pub mod fit;
pub mod loss;
pub mod optim;
pub mod pretrain;
pub mod pretrain_cls;
pub mod report;
pub mod run;
pub mod schedule;
pub mod seg;
pub mod seg_data;
pub mod seg_prompted;
pub mod task;

/// Metrics live in [`crate::metrics`] (shared with inference); re-exported for existing users.
pub use crate::metrics;
/// Progress events live in [`crate::progress`] (shared with inference); re-exported as
/// `train::observer` for existing users.
pub use crate::progress as observer;
