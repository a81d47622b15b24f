//! Training: fit/evaluate loops, losses, metrics, schedules, checkpoints and resume.

pub mod checkpoint;
pub mod metrics;
pub mod observer;
pub mod pretrain;
pub mod schedule;
pub mod seg;

pub mod optim;
