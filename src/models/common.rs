//! What both classifiers share: the ImageNet normalisation constants and [`normalize_with`],
//! the [`LoadReport`] of adapting a checkpoint, and [`adapt_head`] (a fresh head for another
//! number of classes).

use crate::error::{Error, Result};
use crate::util::tensors::TensorMap;
use crate::util::Rng;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// ImageNet mean on `[0, 1]` input (RGB), timm's `IMAGENET_DEFAULT_MEAN`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std on `[0, 1]` input (RGB), timm's `IMAGENET_DEFAULT_STD`.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Mean = std = 0.5 (timm's `IMAGENET_INCEPTION_*`), used by the ImageNet-21k ViTs.
pub const HALF: [f32; 3] = [0.5, 0.5, 0.5];

/// What adapting a checkpoint to a config changed; print every line to the user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The naming scheme the checkpoint was converted from (e.g. `huggingface-vit`), if any.
    pub converted_from: Option<String>,
    /// Checkpoint tensors dropped on purpose (not part of the model), with the reason.
    pub dropped: Vec<String>,
    /// Tensors resized to the config (e.g. `pos_embed` grid 14×14 → 4×4).
    pub resized: Vec<String>,
    /// Tensors freshly initialised (e.g. a head with a different number of classes).
    pub reinitialised: Vec<String>,
}

impl LoadReport {
    /// Human-readable lines, one per change; empty when the checkpoint matched exactly.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(from) = &self.converted_from {
            out.push(format!(
                "renamed checkpoint tensors from {from} to timm names"
            ));
        }
        out.extend(self.dropped.iter().map(|s| format!("dropped {s}")));
        out.extend(self.resized.iter().map(|s| format!("resized {s}")));
        out.extend(
            self.reinitialised
                .iter()
                .map(|s| format!("re-initialised {s}")),
        );
        out
    }
}

/// `(x − mean) / std` per channel. `images01: [B, 3, H, W]` in `[0, 1]` → same shape.
pub fn normalize_with(images01: &Tensor, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    if images01.rank() != 4 || images01.dim(1)? != 3 {
        return Err(Error::msg(format!(
            "expected images of shape [B, 3, H, W], got {:?}",
            images01.dims()
        )));
    }
    let dev = images01.device();
    let dt = images01.dtype();
    let m = Tensor::new(&mean, dev)?
        .to_dtype(dt)?
        .reshape((1, 3, 1, 1))?;
    let s = Tensor::new(&std, dev)?
        .to_dtype(dt)?
        .reshape((1, 3, 1, 1))?;
    Ok(images01.broadcast_sub(&m)?.broadcast_div(&s)?)
}

/// Replace `{prefix}.weight` `[classes, dim]` / `{prefix}.bias` by a fresh seeded head when
/// the checkpoint has none or one with another number of classes (timm init: weight
/// trunc-normal std 0.02, bias 0). Records what it did in `report`. A head whose input width
/// differs from `dim` is an error (the backbone does not match), naming the tensor.
pub(crate) fn adapt_head(
    map: &mut TensorMap,
    prefix: &str,
    dim: usize,
    classes: usize,
    seed: u64,
    report: &mut LoadReport,
) -> Result<()> {
    let wname = format!("{prefix}.weight");
    let bname = format!("{prefix}.bias");
    let existing = map.get(&wname).map(|t| t.dims().to_vec());
    let device = map
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    match existing {
        Some(d) if d == [classes, dim] => return Ok(()),
        Some(d) if d.len() == 2 && d[1] == dim => {
            report.reinitialised.push(format!(
                "`{prefix}` for {classes} classes (checkpoint head has {} classes)",
                d[0]
            ));
        }
        Some(d) => {
            return Err(Error::ShapeMismatch {
                name: wname,
                found: d,
                expected: vec![classes, dim],
            })
        }
        None => report.reinitialised.push(format!(
            "`{prefix}` for {classes} classes (checkpoint has no head)"
        )),
    }
    let mut rng = Rng::derive(seed, "classifier-head");
    let w: Vec<f32> = (0..classes * dim)
        .map(|_| loop {
            let z = rng.normal();
            if z.abs() <= 2.0 {
                break z * 0.02;
            }
        })
        .collect();
    map.insert(wname, Tensor::from_vec(w, (classes, dim), &device)?);
    map.insert(
        bname,
        Tensor::zeros(classes, candle_core::DType::F32, &device)?,
    );
    Ok(())
}
