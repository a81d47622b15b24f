//! Classifiers: a ViT and a ConvNeXt.
