//! Datasets: Kvasir-SEG, PraNet's polyp benchmark (train + five test sets) and classification
//! layouts, synthetic generators of the same on-disk shape, augmentation and batching.
//!
//! The canonical tensors handed to models are RGB f32 in [0, 1], `[B, 3, S, S]`, and masks f32
//! {0, 1}, `[B, 1, S, S]`; each model family normalises itself (see [`classification::Normalize`]
//! for the classifier presets, carried as data). Formats follow `shared/notes/gps-method.md`
//! (Kvasir-SEG, Jha et al. 2020; PraNet's `TrainDataset` / `TestDataset`, Fan et al. 2020; VTAB-1k; VPT's FGVC json splits; CIFAR-100 binary; ImageFolder).
//!
//! Bad input is reported as one [`crate::Error::Data`] listing every problem found, one per line,
//! each naming its file; nothing is loaded partially.
//!
//! This module imports no model.

pub mod augment;
pub mod classification;
pub mod imgio;
pub mod kvasir;
pub mod loader;
pub mod pranet;
pub mod prompts;
pub mod resize;
pub mod synth_cls;
pub mod synth_kvasir;
pub mod synth_pranet;
pub mod synth_scenes;

pub use classification::{ClsDataset, ClsLayout, ClsSample, ClsSplit, Normalize};
pub use kvasir::{KvasirDataset, SegBatch, SegSample, Split};
pub use loader::{ClsBatch, ClsSource, Loader, LoaderConfig, LoaderState, SegSource, Source};
pub use pranet::{PairSet, PranetDataset};
pub use resize::{to_original, Resize};
