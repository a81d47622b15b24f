//! The one training loop and its parts: [`run`] (the loop: [`fit`], [`evaluate`] without
//! training, [`select`] alone; epochs, NaN guard, best epoch on validation, final merge),
//! [`select`](mod@select) (the GPS selection phase, once for every task), [`folder`] (the run
//! folder: open or resume, state, restore, snapshots, jsonl, roles), [`checkpoint`] (how a
//! checkpoint is written vs which are kept; atomic `best/`), [`optim`] (Adam / AdamW over named
//! vars), [`parallel`] (data parallel: what the ranks of a [`crate::dist::Collective`] exchange,
//! who writes the run folder), [`schedule`] (learning-rate schedules), [`report`] (the run's `report.html`), [`summary`] (`summary.json` and the curves, for
//! every task).

pub mod checkpoint;
pub mod folder;
pub mod optim;
pub mod parallel;
pub mod report;
pub mod run;
pub mod schedule;
pub mod select;
pub mod summary;

pub use run::{
    best_epoch, evaluate, fit, fit_on, select, select_on, set_elementwise_pool, StateOf, SummaryOf,
};
pub use summary::RunSummary;
