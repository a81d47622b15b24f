//! Datasets: Kvasir-SEG and classification layouts, synthetic generators, augmentation, batching.
pub mod synth_scenes;
