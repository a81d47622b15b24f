//! Training: fit/evaluate loops, losses, metrics, checkpoints and resume.

pub mod bench;
pub mod optim;
