//! Loading SAM checkpoints (`.safetensors` or Meta's official `.pth`) for a [`SamConfig`],
//! adapting position tables when the checkpoint was made for another input size: `pos_embed`
//! is resized bilinearly and the global blocks' `rel_pos_h/w` tables linearly (as Meta's
//! `get_rel_pos` interpolates at run time). Errors name the file or the tensor and its shapes.

use super::config::SamConfig;
use super::sam::Sam;
use crate::error::{Error, Result};
use crate::nn::layers::{interp_matrix, resize_bilinear};
use crate::util::tensors::{self, TensorMap};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Load a checkpoint file for `cfg` onto `device` (f32), resizing position tables to `cfg`.
/// The config is validated (and on the CPU its model sized against the available memory)
/// before the file is read. Errors name the file (and the tensor or config field at fault).
pub fn load_weights(path: &Path, cfg: &SamConfig, device: &Device) -> Result<TensorMap> {
    if device.is_cpu() {
        cfg.check_memory(1, false)?;
    } else {
        cfg.validate()?;
    }
    let map = tensors::load(path, device)?;
    adapt_to_config(map, cfg).map_err(|e| match e {
        e @ (Error::Io { .. } | Error::Checkpoint { .. }) => e,
        other => Error::Checkpoint {
            path: path.to_path_buf(),
            msg: other.to_string(),
        },
    })
}

/// Resize `pos_embed` and `rel_pos_*` tables in `map` to the sizes `cfg` expects; any other
/// shape mismatch is left for model construction to report.
pub fn adapt_to_config(mut map: TensorMap, cfg: &SamConfig) -> Result<TensorMap> {
    cfg.validate()?;
    let expected = Sam::param_shapes(cfg);
    for s in &expected {
        let Some(t) = map.get(&s.name) else { continue };
        if t.dims() == s.shape.as_slice() {
            continue;
        }
        let mismatch = || Error::ShapeMismatch {
            name: s.name.clone(),
            found: t.dims().to_vec(),
            expected: s.shape.clone(),
        };
        let resized = if s.name == "image_encoder.pos_embed" {
            // [1, g0, g0', D] → [1, g, g, D], bilinear (align_corners=False).
            let &[one, h0, w0, d0] = t.dims() else {
                return Err(mismatch());
            };
            if one != 1 || h0 == 0 || w0 == 0 || Some(&d0) != s.shape.get(3) {
                return Err(mismatch());
            }
            let x = t.permute((0, 3, 1, 2))?.contiguous()?; // [1, D, h0, w0]
            let (Some(&h), Some(&w)) = (s.shape.get(1), s.shape.get(2)) else {
                return Err(mismatch());
            };
            resize_bilinear(&x, h, w)?
                .permute((0, 2, 3, 1))?
                .contiguous()?
        } else if s.name.ends_with(".attn.rel_pos_h") || s.name.ends_with(".attn.rel_pos_w") {
            let &[l0, c0] = t.dims() else {
                return Err(mismatch());
            };
            let (Some(&l), Some(&c)) = (s.shape.first(), s.shape.get(1)) else {
                return Err(mismatch());
            };
            if l0 == 0 || c0 != c {
                return Err(mismatch());
            }
            let m = Tensor::from_vec(interp_matrix(l0, l), (l, l0), t.device())?;
            m.matmul(t)?
        } else {
            return Err(mismatch());
        };
        map.insert(s.name.clone(), resized);
    }
    Ok(map)
}
