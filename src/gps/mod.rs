//! GPS — Gradient-based Parameter Selection (Zhang et al., CVPR 2024; reference code
//! `FightingFighting/GPS`): accumulate task-loss gradients on the pretrained model
//! ([`grads`]), keep the top-K |gradient| entries of every output row of each weight matrix
//! ([`select`]) under a name-based [`policy`], fine-tune only those as a sparse delta
//! (`nn::Role::Sparse`), ship a small [`artifact`], and [`merge`] it back into the base.
//!
//! This module never imports a specific model: it works on named tensors ([`TensorMap`]),
//! gradients keyed by name and policies on names.
//!
//! [`TensorMap`]: crate::util::tensors::TensorMap

pub mod artifact;
pub mod counts;
pub mod grads;
pub mod merge;
pub mod policy;
pub mod select;
pub mod switch;

pub use artifact::{delta_from_store, Artifact, BaseModel, GpsConfig, SelectionInfo};
pub use counts::{CountTotals, Counts, TensorCount};
pub use grads::{accumulate, accumulate_with, grad_roles, grad_store, GradAccumulator};
pub use merge::{merge, merge_with_report, MergeReport};
pub use policy::{Policy, Rule, Treatment};
pub use select::{select_by_gradient, select_from_grads, Criterion, Level, Selection};
pub use switch::{TaskSet, TaskSetMemory};
