//! What `gps-seg info` reports about a SAM: its config and parameter counts per component,
//! for a preset (computed from shapes, nothing allocated) or a checkpoint file (counted from
//! its tensors; the config is the one stored beside it, as every command reads it
//! ([`super::registry::config_beside`]), else read back from tensor shapes).

use super::config::SamConfig;
use super::prompt_encoder::PE_BUFFER;
use super::sam::{Sam, SamCounts};
use crate::error::{Error, Result};
use crate::util::tensors::{self, TensorMap};
use candle_core::Device;
use std::path::Path;

/// Config and counts of one model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Preset name or checkpoint path.
    pub source: String,
    pub config: SamConfig,
    pub counts: SamCounts,
    /// Remarks, e.g. config fields a checkpoint cannot tell.
    pub notes: Vec<String>,
}

/// Info for a preset name (`tiny`, `vit_b`, `vit_l`, `vit_h`) or a checkpoint path.
pub fn model_info(spec: &str) -> Result<ModelInfo> {
    if SamConfig::PRESETS.contains(&spec) {
        let config = SamConfig::preset(spec)?;
        return Ok(ModelInfo {
            source: format!("preset `{spec}`"),
            counts: Sam::counts(&config),
            config,
            notes: vec![],
        });
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(Error::Config {
            field: "model".into(),
            msg: format!(
                "`{spec}` is neither a preset ({}) nor an existing checkpoint file",
                SamConfig::PRESETS.join(", ")
            ),
        });
    }
    // The config stored beside the checkpoint, as every other command reads it (validated
    // before the weights are read); else what the tensor shapes tell.
    let stored = super::files::config_file_beside(path)?;
    let map = tensors::load(path, &Device::Cpu)?;
    let (inferred, notes) = infer_config(&map).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("not a SAM checkpoint: {e}"),
    })?;
    let (config, notes) = match stored {
        Some((file, c)) => (c, vec![format!("config read from {}", file.display())]),
        None => (inferred, notes),
    };
    let counts = SamCounts::from_shapes(
        map.iter()
            .map(|(n, t)| (n.as_str(), t.elem_count(), n == PE_BUFFER)),
    );
    Ok(ModelInfo {
        source: path.display().to_string(),
        config,
        counts,
        notes,
    })
}

/// Read a [`SamConfig`] back from checkpoint tensor shapes. Heads of the decoder are not
/// visible in shapes: they are taken from the preset with the same widths (else 8, Meta's).
/// Every shape is checked (rank, non-zero sizes, agreement with the others) before it is
/// used; an error names the tensor (callers add the file).
pub fn infer_config(map: &TensorMap) -> Result<(SamConfig, Vec<String>)> {
    let shape = |name: &str, rank: usize| -> Result<Vec<usize>> {
        let t = map.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            expected: vec![],
        })?;
        let d = t.dims().to_vec();
        if d.len() != rank {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!("expected {rank} dims, found shape {d:?}"),
            });
        }
        if d.contains(&0) {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!("shape {d:?} has a zero-length dim"),
            });
        }
        Ok(d)
    };
    let wrong = |name: &str, found: &[usize], want: String| Error::Tensor {
        name: name.into(),
        msg: format!("shape {found:?} does not fit the model: {want}"),
    };
    let count = |prefix: &str, suffix: &str| {
        (0..map.len())
            .take_while(|i| map.contains_key(&format!("{prefix}.{i}.{suffix}")))
            .count()
    };
    let pe_name = "image_encoder.patch_embed.proj.weight";
    let pe = shape(pe_name, 4)?;
    let &[d, c_in, p, p2] = pe.as_slice() else {
        return Err(wrong(
            pe_name,
            &pe,
            "expected [dim, 3, patch, patch]".into(),
        ));
    };
    if c_in != 3 || p != p2 {
        return Err(wrong(
            pe_name,
            &pe,
            "expected [dim, 3, patch, patch]".into(),
        ));
    }
    let pos_name = "image_encoder.pos_embed";
    let pos = shape(pos_name, 4)?;
    let &[one, g, g2, d2] = pos.as_slice() else {
        return Err(wrong(
            pos_name,
            &pos,
            format!("expected [1, grid, grid, {d}]"),
        ));
    };
    if one != 1 || g != g2 || d2 != d {
        return Err(wrong(
            pos_name,
            &pos,
            format!("expected [1, grid, grid, {d}]"),
        ));
    }
    let image_size = g
        .checked_mul(p)
        .ok_or_else(|| wrong(pos_name, &pos, format!("grid × patch size {p} overflows")))?;
    let depth = count("image_encoder.blocks", "norm1.weight");
    let mut global = vec![];
    let mut window: Option<usize> = None;
    let mut head_dim: Option<usize> = None;
    let global_len = super::image_encoder::rel_pos_len(g);
    for i in 0..depth {
        let name = format!("image_encoder.blocks.{i}.attn.rel_pos_h");
        let r = shape(&name, 2)?;
        let &[l, hd] = r.as_slice() else {
            return Err(wrong(&name, &r, "expected [2·side − 1, head_dim]".into()));
        };
        if l % 2 == 0 || !d.is_multiple_of(hd) || head_dim.is_some_and(|h| h != hd) {
            return Err(wrong(
                &name,
                &r,
                format!(
                    "expected [2·side − 1, head_dim] with head_dim dividing {d}{}",
                    head_dim.map_or(String::new(), |h| format!(" and equal to block 0's {h}"))
                ),
            ));
        }
        head_dim = Some(hd);
        if l == global_len {
            global.push(i);
        } else {
            let w = l.div_ceil(2);
            if window.is_some_and(|w0| w0 != w) {
                return Err(wrong(
                    &name,
                    &r,
                    format!(
                        "window blocks disagree: an earlier one has window {}",
                        window.unwrap_or(0)
                    ),
                ));
            }
            window = Some(w);
        }
    }
    let head_dim = head_dim.unwrap_or(d);
    let window = window.unwrap_or(14);
    let mlp_name = "image_encoder.blocks.0.mlp.lin1.weight";
    let mlp_shape = shape(mlp_name, 2)?;
    let &[mlp, mlp_in] = mlp_shape.as_slice() else {
        return Err(wrong(
            mlp_name,
            &mlp_shape,
            format!("expected [hidden, {d}]"),
        ));
    };
    if mlp_in != d {
        return Err(wrong(
            mlp_name,
            &mlp_shape,
            format!("expected [hidden, {d}]"),
        ));
    }
    let neck_name = "image_encoder.neck.0.weight";
    let neck = shape(neck_name, 4)?;
    let &[c, neck_in, ..] = neck.as_slice() else {
        return Err(wrong(neck_name, &neck, format!("expected [C, {d}, 1, 1]")));
    };
    if neck_in != d || neck[2..] != [1, 1] {
        return Err(wrong(neck_name, &neck, format!("expected [C, {d}, 1, 1]")));
    }
    let mask_name = "prompt_encoder.mask_downscaling.3.weight";
    let mask_in = shape(mask_name, 4)?[0];
    let t = "mask_decoder.transformer.layers";
    let dec_depth = count(t, "norm1.weight");
    let dec_name = format!("{t}.0.mlp.lin1.weight");
    let dec = shape(&dec_name, 2)?;
    if dec[1] != c {
        return Err(wrong(&dec_name, &dec, format!("expected [hidden, {c}]")));
    }
    let dec_mlp = dec[0];
    let tok_name = "mask_decoder.mask_tokens.weight";
    let tok = shape(tok_name, 2)?;
    if tok[1] != c {
        return Err(wrong(tok_name, &tok, format!("expected [masks, {c}]")));
    }
    let n_masks = tok[0];
    let iou_depth = count("mask_decoder.iou_prediction_head.layers", "weight");
    let iou_name = "mask_decoder.iou_prediction_head.layers.0.weight";
    let iou = shape(iou_name, 2)?;
    if iou[1] != c {
        return Err(wrong(iou_name, &iou, format!("expected [hidden, {c}]")));
    }
    let iou_hidden = iou[0];
    let base = SamConfig::PRESETS
        .iter()
        .filter_map(|n| SamConfig::preset(n).ok())
        .find(|b| b.encoder_embed_dim == d && b.prompt_embed_dim == c);
    let mut notes = vec![];
    let decoder_num_heads = match &base {
        Some(b) => {
            notes.push(format!(
                "decoder_num_heads is not stored in checkpoints: taken from preset `{}`",
                b.name
            ));
            b.decoder_num_heads
        }
        None => {
            notes.push("decoder_num_heads is not stored in checkpoints: assumed 8".into());
            8
        }
    };
    let cfg = SamConfig {
        name: "checkpoint".into(),
        image_size,
        patch_size: p,
        encoder_embed_dim: d,
        encoder_depth: depth,
        encoder_num_heads: d / head_dim,
        encoder_global_attn_indexes: global,
        window_size: window,
        mlp_ratio: mlp as f64 / d as f64,
        prompt_embed_dim: c,
        mask_in_chans: mask_in,
        decoder_depth: dec_depth,
        decoder_mlp_dim: dec_mlp,
        decoder_num_heads,
        num_multimask_outputs: n_masks.saturating_sub(1),
        iou_head_depth: iou_depth,
        iou_head_hidden_dim: iou_hidden,
        pixel_mean: SamConfig::tiny().pixel_mean,
        pixel_std: SamConfig::tiny().pixel_std,
    };
    cfg.validate()?;
    Ok((cfg, notes))
}

/// Infer the config from a checkpoint's tensor shapes ([`infer_config`]).
pub fn infer_config_file(path: &Path) -> Result<SamConfig> {
    let map = tensors::load(path, &Device::Cpu)?;
    infer_config(&map)
        .map(|(c, _)| c)
        .map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a SAM checkpoint: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{ParamStore, RolePolicy};

    #[test]
    fn config_is_read_back_from_a_checkpoint() {
        let cfg = SamConfig::tiny();
        let vs = ParamStore::new(None, RolePolicy::AllFrozen, &Device::Cpu, 0);
        Sam::new(&cfg, &vs).unwrap();
        let map = vs.current_tensors().unwrap();
        let (back, notes) = infer_config(&map).unwrap();
        assert_eq!(
            SamConfig {
                name: "tiny".into(),
                ..back
            },
            cfg
        );
        assert_eq!(notes.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        crate::util::tensors::save_safetensors(&p, &map, None).unwrap();
        let info = model_info(p.to_str().unwrap()).unwrap();
        assert_eq!(info.counts, Sam::counts(&cfg));
        assert!(model_info("vit_q")
            .unwrap_err()
            .to_string()
            .contains("vit_q"));
        assert_eq!(model_info("vit_b").unwrap().counts.total(), 93_735_472);
    }
}
