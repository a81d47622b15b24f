//! Training: fit/evaluate loops, losses, metrics, checkpoints and resume.

pub mod optim;
pub mod loss;
