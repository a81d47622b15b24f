//! Pretraining the project's small models on synthetic upstream data, so GPS has a pretrained
//! model to adapt: [`sam`] (the small SAM on synthetic "segment anything" scenes), [`vit`] (the
//! small ViT on the synthetic upstream classes, through the classification task).

pub mod sam;
pub mod vit;
