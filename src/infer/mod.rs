//! Batch inference: ONNX Runtime provisioning ([`runtime`]) and sessions ([`model`]), the images of a job
//! checked up front ([`input`]), engines (ONNX Runtime on an exported graph, or the Candle SAM,
//! [`engine`]), the identity of a sharded job ([`identity`]), one image's pre- and post-processing shared with the server ([`mask`]), the batched pre-process → run → post-process job with its reports ([`job`]),
//! merged shard reports ([`report`]), training-run folders ([`run`]), what a job's flags decide
//! ([`plan`]: files read and written, a run's settings) and many task files served on
//! one base held once in memory ([`shared`]); the engine benchmark is
//! `crate::bench::infer`.
//!
//! Metrics are those of [`crate::metrics`] (shared with training's evaluation, so
//! `gps-seg infer --run` reproduces training's mDice, and a PraNet run's per-set table from the
//! saved 8-bit maps); inference never imports training.

pub mod engine;
pub mod identity;
pub mod input;
pub mod job;
pub mod mask;
pub mod model;
pub mod plan;
pub mod prompted;
pub mod records;
pub mod report;
pub mod run;
pub mod runtime;
pub mod shared;

pub use engine::{CandleEngine, Engine, Logits, OrtEngine};
pub use input::{BadInput, InputItem, Inputs};
pub use job::{infer, InferOptions, InferReport, JobPrompts};
pub use model::OrtModel;
pub use plan::InferPlan;
pub use prompted::PromptedOrtEngine;
pub use run::RunFolder;
