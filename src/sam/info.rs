//! What `gps-seg info` reports about a SAM: its config and parameter counts per component,
//! for a preset (computed from shapes, nothing allocated) or a checkpoint file (counted from
//! its tensors; the config is read back from tensor shapes).

use super::prompt_encoder::PE_BUFFER;
use super::sam::{Sam, SamCounts};
use crate::error::{Error, Result};
use crate::sam::SamConfig;
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
    let map = tensors::load(path, &Device::Cpu)?;
    let (config, notes) = infer_config(&map).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("not a SAM checkpoint: {e}"),
    })?;
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
pub fn infer_config(map: &TensorMap) -> Result<(SamConfig, Vec<String>)> {
    let dims = |name: &str| -> Result<Vec<usize>> {
        map.get(name)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                expected: vec![],
            })
    };
    let count = |prefix: &str, suffix: &str| {
        (0..)
            .take_while(|i| map.contains_key(&format!("{prefix}.{i}.{suffix}")))
            .count()
    };
    let pe = dims("image_encoder.patch_embed.proj.weight")?;
    let (d, p) = (pe[0], pe[2]);
    let g = dims("image_encoder.pos_embed")?[1];
    let depth = count("image_encoder.blocks", "norm1.weight");
    let mut global = vec![];
    let mut window = 14;
    let mut head_dim = d;
    for i in 0..depth {
        let r = dims(&format!("image_encoder.blocks.{i}.attn.rel_pos_h"))?;
        head_dim = r[1];
        if r[0] == 2 * g - 1 {
            global.push(i);
        } else {
            window = r[0].div_ceil(2);
        }
    }
    let mlp = dims("image_encoder.blocks.0.mlp.lin1.weight")?[0];
    let c = dims("image_encoder.neck.0.weight")?[0];
    let mask_in = dims("prompt_encoder.mask_downscaling.3.weight")?[0];
    let t = "mask_decoder.transformer.layers";
    let dec_depth = count(t, "norm1.weight");
    let dec_mlp = dims(&format!("{t}.0.mlp.lin1.weight"))?[0];
    let n_masks = dims("mask_decoder.mask_tokens.weight")?[0];
    let iou_depth = count("mask_decoder.iou_prediction_head.layers", "weight");
    let iou_hidden = dims("mask_decoder.iou_prediction_head.layers.0.weight")?[0];
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
        image_size: g * p,
        patch_size: p,
        encoder_embed_dim: d,
        encoder_depth: depth,
        encoder_num_heads: d / head_dim.max(1),
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
