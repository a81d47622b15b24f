//! Training: fit/evaluate loops, losses, metrics, schedules, checkpoints and resume.
//! Models know nothing of training; everything about steps, losses and optimisers lives here.

pub mod checkpoint;
pub mod cls;
pub mod experiment;
pub mod loss;
pub mod metrics;
pub mod observer;
pub mod optim;
pub mod pretrain;
pub mod pretrain_cls;
pub mod run;
pub mod schedule;
pub mod seg;
