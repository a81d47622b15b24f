//! One type over both classifiers, so training and selection code can hold either model:
//! [`ClassifierConfig`] (serde, tagged by family) and [`Classifier`] with `features`,
//! `forward`, `normalize`.

use super::common::LoadReport;
use super::convnext::{self, ConvNext, ConvNextConfig};
use super::vit::{self, Vit, VitConfig};
use crate::error::{Error, Result};
use crate::nn::ParamStore;
use crate::util::tensors::{self, TensorMap};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A classifier config of either family; serialised as `{"family": "vit", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum ClassifierConfig {
    Vit(VitConfig),
    ConvNext(ConvNextConfig),
}

impl ClassifierConfig {
    /// Every preset name accepted by [`ClassifierConfig::preset`].
    pub const PRESETS: [&'static str; 4] =
        ["vit_b16", "vit_tiny_cpu", "convnext_b", "convnext_tiny_cpu"];

    /// A preset by name with `num_classes` outputs.
    pub fn preset(name: &str, num_classes: usize) -> Result<Self> {
        if VitConfig::PRESETS.contains(&name) {
            Ok(Self::Vit(
                VitConfig::preset(name)?.with_num_classes(num_classes),
            ))
        } else if ConvNextConfig::PRESETS.contains(&name) {
            Ok(Self::ConvNext(
                ConvNextConfig::preset(name)?.with_num_classes(num_classes),
            ))
        } else {
            Err(Error::Config {
                field: "model".into(),
                msg: format!(
                    "unknown classifier `{name}` (expected one of {})",
                    Self::PRESETS.join(", ")
                ),
            })
        }
    }

    /// The preset name.
    pub fn name(&self) -> &str {
        match self {
            Self::Vit(c) => &c.name,
            Self::ConvNext(c) => &c.name,
        }
    }

    /// Input side length the model expects (ViT) or defaults to (ConvNeXt).
    pub fn image_size(&self) -> usize {
        match self {
            Self::Vit(c) => c.image_size,
            Self::ConvNext(c) => c.image_size,
        }
    }

    /// Width of `features`.
    pub fn feature_dim(&self) -> usize {
        match self {
            Self::Vit(c) => c.embed_dim,
            Self::ConvNext(c) => c.feature_dim(),
        }
    }

    /// Output classes.
    pub fn num_classes(&self) -> usize {
        match self {
            Self::Vit(c) => c.num_classes,
            Self::ConvNext(c) => c.num_classes,
        }
    }

    /// Check internal consistency; errors name the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Vit(c) => c.validate(),
            Self::ConvNext(c) => c.validate(),
        }
    }

    /// Every parameter's timm name and shape, without allocating (for counting).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::Vit(c) => c.param_shapes(),
            Self::ConvNext(c) => c.param_shapes(),
        }
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Adapt a checkpoint to this config (renaming, pos-embed resize, head re-init).
    pub fn adapt_checkpoint(&self, map: TensorMap, seed: u64) -> Result<(TensorMap, LoadReport)> {
        match self {
            Self::Vit(c) => vit::adapt_checkpoint(c, map, seed),
            Self::ConvNext(c) => convnext::adapt_checkpoint(c, map, seed),
        }
    }

    /// Read a checkpoint file (safetensors or PyTorch, see [`crate::util::tensors::load`])
    /// and adapt it with [`adapt_checkpoint`](Self::adapt_checkpoint); errors name the file
    /// and, where one is at fault, the tensor. Build the model from the returned map (e.g.
    /// `ParamStore::frozen`) and call `check_all_used` to catch unexpected tensors.
    pub fn load_checkpoint(
        &self,
        path: &Path,
        device: &Device,
        seed: u64,
    ) -> Result<(TensorMap, LoadReport)> {
        let map = tensors::load(path, device)?;
        self.adapt_checkpoint(map, seed).map_err(|e| match e {
            e @ (Error::Io { .. } | Error::Checkpoint { .. }) => e,
            other => Error::Checkpoint {
                path: path.to_path_buf(),
                msg: other.to_string(),
            },
        })
    }
}

/// Either classifier, built from a [`ParamStore`].
#[derive(Debug, Clone)]
pub enum Classifier {
    Vit(Vit),
    ConvNext(ConvNext),
}

impl Classifier {
    /// Build the model of `cfg`'s family from `vs`.
    pub fn new(cfg: &ClassifierConfig, vs: &ParamStore) -> Result<Self> {
        Ok(match cfg {
            ClassifierConfig::Vit(c) => Self::Vit(Vit::new(c, vs)?),
            ClassifierConfig::ConvNext(c) => Self::ConvNext(ConvNext::new(c, vs)?),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> ClassifierConfig {
        match self {
            Self::Vit(m) => ClassifierConfig::Vit(m.cfg.clone()),
            Self::ConvNext(m) => ClassifierConfig::ConvNext(m.cfg.clone()),
        }
    }

    /// The preset name.
    pub fn name(&self) -> &str {
        match self {
            Self::Vit(m) => &m.cfg.name,
            Self::ConvNext(m) => &m.cfg.name,
        }
    }

    /// Width of [`features`](Self::features).
    pub fn feature_dim(&self) -> usize {
        match self {
            Self::Vit(m) => m.cfg.embed_dim,
            Self::ConvNext(m) => m.cfg.feature_dim(),
        }
    }

    /// Output classes of [`forward`](Self::forward).
    pub fn num_classes(&self) -> usize {
        match self {
            Self::Vit(m) => m.cfg.num_classes,
            Self::ConvNext(m) => m.cfg.num_classes,
        }
    }

    /// The model's normalisation. `images01: [B, 3, H, W]` in `[0, 1]` → same shape.
    pub fn normalize(&self, images01: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.normalize(images01),
            Self::ConvNext(m) => m.normalize(images01),
        }
    }

    /// Head-free features. `images01: [B, 3, H, W]` in `[0, 1]` → `[B, feature_dim]`.
    pub fn features(&self, images01: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.features(images01),
            Self::ConvNext(m) => m.features(images01),
        }
    }

    /// Class logits. `images01: [B, 3, H, W]` in `[0, 1]` → `[B, num_classes]`.
    pub fn forward(&self, images01: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.forward(images01),
            Self::ConvNext(m) => m.forward(images01),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_json() {
        for name in ClassifierConfig::PRESETS {
            let cfg = ClassifierConfig::preset(name, 10).unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.name(), name);
            let s = serde_json::to_string(&cfg).unwrap();
            let back: ClassifierConfig = serde_json::from_str(&s).unwrap();
            assert_eq!(back, cfg);
        }
        let e = ClassifierConfig::preset("vit_b16", 3)
            .unwrap()
            .load_checkpoint(Path::new("/nonexistent/vit.safetensors"), &Device::Cpu, 0)
            .unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/vit.safetensors"),
            "{e}"
        );
        assert!(ClassifierConfig::preset("resnet50", 10)
            .unwrap_err()
            .to_string()
            .contains("resnet50"));
    }
}
