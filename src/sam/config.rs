//! `SamConfig` and its named presets (Meta's `build_sam.py` registry, plus `tiny` for CPU work).
//! Serialised as JSON beside every checkpoint and run.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Every number that differs between SAM sizes. Names follow Meta's `build_sam.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    /// Preset name this config came from (informational).
    pub name: String,
    /// Input side length in pixels (images are `image_size × image_size`).
    pub image_size: usize,
    /// ViT patch size.
    pub patch_size: usize,
    /// Image encoder width.
    pub encoder_embed_dim: usize,
    /// Number of encoder blocks.
    pub encoder_depth: usize,
    /// Attention heads per encoder block.
    pub encoder_num_heads: usize,
    /// Blocks that use global (not windowed) attention.
    pub encoder_global_attn_indexes: Vec<usize>,
    /// Window size of windowed attention blocks.
    pub window_size: usize,
    /// MLP hidden = `mlp_ratio × encoder_embed_dim`.
    pub mlp_ratio: f64,
    /// Neck output channels = prompt embedding dim = decoder transformer dim.
    pub prompt_embed_dim: usize,
    /// Hidden channels of the prompt encoder's mask downscaling.
    pub mask_in_chans: usize,
    /// Two-way transformer depth.
    pub decoder_depth: usize,
    /// Two-way transformer MLP hidden size.
    pub decoder_mlp_dim: usize,
    /// Two-way transformer heads.
    pub decoder_num_heads: usize,
    /// Masks predicted in multimask mode (plus one single-mask output).
    pub num_multimask_outputs: usize,
    /// IoU prediction head depth.
    pub iou_head_depth: usize,
    /// IoU prediction head hidden size.
    pub iou_head_hidden_dim: usize,
    /// Pixel normalisation mean (0–255 scale), RGB.
    pub pixel_mean: [f32; 3],
    /// Pixel normalisation std (0–255 scale), RGB.
    pub pixel_std: [f32; 3],
}

const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

impl SamConfig {
    fn official(name: &str, dim: usize, depth: usize, heads: usize, global: [usize; 4]) -> Self {
        SamConfig {
            name: name.into(),
            image_size: 1024,
            patch_size: 16,
            encoder_embed_dim: dim,
            encoder_depth: depth,
            encoder_num_heads: heads,
            encoder_global_attn_indexes: global.to_vec(),
            window_size: 14,
            mlp_ratio: 4.0,
            prompt_embed_dim: 256,
            mask_in_chans: 16,
            decoder_depth: 2,
            decoder_mlp_dim: 2048,
            decoder_num_heads: 8,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            pixel_mean: PIXEL_MEAN,
            pixel_std: PIXEL_STD,
        }
    }

    /// SAM ViT-B (`sam_vit_b_01ec64.pth`).
    pub fn vit_b() -> Self {
        Self::official("vit_b", 768, 12, 12, [2, 5, 8, 11])
    }

    /// SAM ViT-L (`sam_vit_l_0b3195.pth`).
    pub fn vit_l() -> Self {
        Self::official("vit_l", 1024, 24, 16, [5, 11, 17, 23])
    }

    /// SAM ViT-H (`sam_vit_h_4b8939.pth`).
    pub fn vit_h() -> Self {
        Self::official("vit_h", 1280, 32, 16, [7, 15, 23, 31])
    }

    /// A small SAM for CPU work: 256 px input, 6 blocks of width 192.
    pub fn tiny() -> Self {
        SamConfig {
            name: "tiny".into(),
            image_size: 256,
            patch_size: 16,
            encoder_embed_dim: 192,
            encoder_depth: 6,
            encoder_num_heads: 3,
            encoder_global_attn_indexes: vec![2, 5],
            window_size: 8,
            mlp_ratio: 4.0,
            prompt_embed_dim: 128,
            mask_in_chans: 16,
            decoder_depth: 2,
            decoder_mlp_dim: 512,
            decoder_num_heads: 4,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 128,
            pixel_mean: PIXEL_MEAN,
            pixel_std: PIXEL_STD,
        }
    }

    /// Names accepted by [`SamConfig::preset`].
    pub const PRESETS: [&'static str; 4] = ["tiny", "vit_b", "vit_l", "vit_h"];

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "vit_b" => Ok(Self::vit_b()),
            "vit_l" => Ok(Self::vit_l()),
            "vit_h" => Ok(Self::vit_h()),
            other => Err(Error::Config {
                field: "model".into(),
                msg: format!(
                    "unknown SAM preset `{other}` (expected one of {})",
                    Self::PRESETS.join(", ")
                ),
            }),
        }
    }

    /// The same config at another input size (pos_embed and rel_pos tables follow at load).
    pub fn with_image_size(mut self, image_size: usize) -> Self {
        self.image_size = image_size;
        self
    }

    /// Side of the image-embedding grid (`image_size / patch_size`).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Values of one image-encoder activation per image (`grid² × encoder_embed_dim`), the
    /// size that decides [`crate::util::threads::elementwise_pool_for`].
    pub fn encoder_values_per_image(&self) -> usize {
        let g = self.grid_size();
        g.saturating_mul(g).saturating_mul(self.encoder_embed_dim)
    }

    /// Check internal consistency and bounds; errors name the field.
    ///
    /// Bounds are what a real SAM reaches, with room above (ViT-H: width 1280, 32 blocks,
    /// 16 heads, window 14, 1024 px): see the `MAX_*` constants. Everything that sizes a
    /// tensor is bounded, so no product of these numbers can overflow or ask for terabytes.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                field: field.into(),
                msg,
            })
        };
        use crate::error::check::range;
        range("patch_size", self.patch_size, 1, MAX_PATCH_SIZE)?;
        range(
            "image_size",
            self.image_size,
            self.patch_size,
            MAX_IMAGE_SIZE,
        )?;
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(
                "image_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
            );
        }
        range("encoder_embed_dim", self.encoder_embed_dim, 1, MAX_WIDTH)?;
        range("encoder_depth", self.encoder_depth, 1, MAX_DEPTH)?;
        range("encoder_num_heads", self.encoder_num_heads, 1, MAX_HEADS)?;
        if !self
            .encoder_embed_dim
            .is_multiple_of(self.encoder_num_heads)
        {
            return bad(
                "encoder_num_heads",
                format!(
                    "{} does not divide encoder_embed_dim {}",
                    self.encoder_num_heads, self.encoder_embed_dim
                ),
            );
        }
        if let Some(&i) = self
            .encoder_global_attn_indexes
            .iter()
            .find(|&&i| i >= self.encoder_depth)
        {
            return bad(
                "encoder_global_attn_indexes",
                format!("block {i} >= encoder_depth {}", self.encoder_depth),
            );
        }
        range("window_size", self.window_size, 1, MAX_WINDOW)?;
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= MAX_MLP_RATIO)
        {
            return bad(
                "mlp_ratio",
                format!(
                    "{} is not a finite number in (0, {MAX_MLP_RATIO}]",
                    self.mlp_ratio
                ),
            );
        }
        if self.mlp_dim() == 0 {
            return bad(
                "mlp_ratio",
                format!(
                    "{} × encoder_embed_dim {} gives an empty MLP",
                    self.mlp_ratio, self.encoder_embed_dim
                ),
            );
        }
        range("prompt_embed_dim", self.prompt_embed_dim, 8, MAX_WIDTH)?;
        if !self.prompt_embed_dim.is_multiple_of(8) {
            return bad(
                "prompt_embed_dim",
                format!("{} is not a multiple of 8", self.prompt_embed_dim),
            );
        }
        range("mask_in_chans", self.mask_in_chans, 4, MAX_WIDTH)?;
        if !self.mask_in_chans.is_multiple_of(4) {
            return bad(
                "mask_in_chans",
                format!("{} is not a multiple of 4", self.mask_in_chans),
            );
        }
        range("decoder_depth", self.decoder_depth, 1, MAX_DECODER_DEPTH)?;
        range("decoder_mlp_dim", self.decoder_mlp_dim, 1, MAX_MLP_DIM)?;
        range("decoder_num_heads", self.decoder_num_heads, 1, MAX_HEADS)?;
        if !(self.prompt_embed_dim / 2).is_multiple_of(self.decoder_num_heads) {
            return bad(
                "decoder_num_heads",
                format!(
                    "{} does not divide prompt_embed_dim / 2 = {} (cross-attention width)",
                    self.decoder_num_heads,
                    self.prompt_embed_dim / 2
                ),
            );
        }
        range(
            "num_multimask_outputs",
            self.num_multimask_outputs,
            1,
            MAX_MASKS,
        )?;
        range("iou_head_depth", self.iou_head_depth, 1, MAX_DECODER_DEPTH)?;
        range(
            "iou_head_hidden_dim",
            self.iou_head_hidden_dim,
            1,
            MAX_MLP_DIM,
        )?;
        if self.pixel_mean.iter().any(|m| !m.is_finite()) {
            return bad(
                "pixel_mean",
                format!("{:?} has a non-finite entry", self.pixel_mean),
            );
        }
        if self.pixel_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(
                "pixel_std",
                format!(
                    "{:?} has an entry that is not a finite positive number",
                    self.pixel_std
                ),
            );
        }
        Ok(())
    }

    /// Hidden width of the encoder MLPs (`encoder_embed_dim × mlp_ratio`, truncated as
    /// Meta's `int(dim * mlp_ratio)`); 0 for a non-finite or non-positive ratio.
    pub fn mlp_dim(&self) -> usize {
        let v = self.encoder_embed_dim as f64 * self.mlp_ratio;
        if v.is_finite() && v >= 1.0 {
            v as usize
        } else {
            0
        }
    }
}

/// Largest accepted `image_size` (SAM's 1024 × 4).
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Largest accepted `patch_size` (SAM: 16).
pub const MAX_PATCH_SIZE: usize = 64;
/// Largest accepted encoder / prompt width and `mask_in_chans` (ViT-H: 1280).
pub const MAX_WIDTH: usize = 4096;
/// Largest accepted `encoder_depth` (ViT-H: 32).
pub const MAX_DEPTH: usize = 64;
/// Largest accepted head count, encoder or decoder (ViT-H: 16; decoder 8).
pub const MAX_HEADS: usize = 64;
/// Largest accepted `window_size` (SAM: 14).
pub const MAX_WINDOW: usize = 64;
/// Largest accepted `mlp_ratio` (SAM: 4).
pub const MAX_MLP_RATIO: f64 = 16.0;
/// Largest accepted decoder MLP / IoU head width (SAM: 2048 / 256).
pub const MAX_MLP_DIM: usize = 16384;
/// Largest accepted two-way transformer and IoU head depth (SAM: 2 / 3).
pub const MAX_DECODER_DEPTH: usize = 16;
/// Largest accepted `num_multimask_outputs` (SAM: 3).
pub const MAX_MASKS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_json() {
        for p in SamConfig::PRESETS {
            let c = SamConfig::preset(p).unwrap();
            c.validate().unwrap();
            let back: SamConfig =
                serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        assert!(SamConfig::preset("vit_x")
            .unwrap_err()
            .to_string()
            .contains("vit_x"));
        let mut c = SamConfig::tiny();
        c.image_size = 250;
        assert!(c.validate().unwrap_err().to_string().contains("image_size"));
    }
}
