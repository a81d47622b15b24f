//! Classifiers: a ViT ([`vit`], timm's `VisionTransformer`) and a ConvNeXt ([`convnext`], timm's
//! `ConvNeXt`), with tensor names equal to timm's checkpoint keys so timm checkpoints load
//! unchanged; Hugging Face `transformers` ViT checkpoints are renamed in one place
//! ([`names`]). [`classifier`] holds either model behind one type for training code.
//!
//! Every model takes the project's canonical image tensor (RGB f32 in `[0, 1]`,
//! `[B, 3, H, W]`) and normalises it itself with its preset's mean/std.

pub mod classifier;
pub mod common;
pub mod convnext;
pub mod names;
pub mod vit;

pub use classifier::{Classifier, ClassifierConfig};
pub use common::{normalize_with, LoadReport, HALF, IMAGENET_MEAN, IMAGENET_STD};
pub use convnext::{ConvNext, ConvNextConfig};
pub use vit::{Vit, VitConfig};
