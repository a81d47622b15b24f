//! What a SAM config needs in memory: the estimate every command checks against the available
//! memory before it builds a model or a batch ([`SamConfig::check_memory`]). Beside the model
//! (it counts [`Sam::param_shapes`]), not in `config`, which the model's parts import.

use super::config::SamConfig;
use super::sam::Sam;
use crate::error::{Error, Result};

impl SamConfig {
    /// Bytes a forward pass of `batch` images needs, roughly: the f32 parameters and buffers
    /// plus the dominant activations of inference — input and normalised images, the
    /// block that is running (residual stream, qkv, attention output, MLP hidden, over
    /// window-padded tokens), one query chunk of attention scores, and the decoder's
    /// upscaled embedding, masks and full-size logits. An under- rather than an
    /// over-estimate (allocator slack and Candle temporaries come on top): it is there to
    /// refuse a size that cannot fit, not to promise that one does. Validates first;
    /// an overflow is an error naming the batch.
    pub fn estimate_bytes(&self, batch: usize) -> Result<u64> {
        self.estimate(batch, false)
    }

    /// As [`estimate_bytes`](Self::estimate_bytes) for one training step: parameters with
    /// their gradient and two Adam moments, and every block's activations kept for backward.
    pub fn estimate_training_bytes(&self, batch: usize) -> Result<u64> {
        self.estimate(batch, true)
    }

    fn estimate(&self, batch: usize, training: bool) -> Result<u64> {
        self.validate()?;
        let over = || Error::Config {
            field: "batch".into(),
            msg: format!(
                "a batch of {batch} at image_size {} overflows a memory estimate",
                self.image_size
            ),
        };
        let mul = |a: u64, b: u64| a.checked_mul(b).ok_or_else(over);
        let add = |a: u64, b: u64| a.checked_add(b).ok_or_else(over);
        let u = |v: usize| v as u64;
        let params = Sam::param_shapes(self).iter().try_fold(0u64, |acc, s| {
            let n = s.shape.iter().try_fold(1u64, |p, &d| mul(p, u(d)))?;
            add(acc, n)
        })?;
        let s = u(self.image_size);
        let g = u(self.grid_size());
        let d = u(self.encoder_embed_dim);
        let ws = u(self.window_size);
        // Tokens of one image after window padding (windowed blocks pad the grid up).
        let padded = mul(g.div_ceil(ws), ws)?;
        let tokens = mul(padded, padded)?.max(mul(g, g)?);
        // Residual stream, norm, qkv (3), attention output, projection + MLP hidden.
        let per_token = add(mul(d, 7)?, u(self.mlp_dim()))?;
        let block = mul(tokens, per_token)?;
        let chunk = tokens.min(1024);
        let scores = mul(mul(u(self.encoder_num_heads), chunk)?, tokens)?;
        let c = u(self.prompt_embed_dim);
        let low = mul(g, 4)?;
        let decoder = add(
            mul(
                mul(low, low)?,
                add(c / 8, u(self.num_multimask_outputs) + 1)?,
            )?,
            mul(mul(g, g)?, mul(c, 4)?)?,
        )?;
        let image = add(mul(mul(s, s)?, 6)?, mul(s, s)?)?;
        let kept_blocks = if training { u(self.encoder_depth) } else { 1 };
        let per_image = add(add(add(image, mul(block, kept_blocks)?)?, scores)?, decoder)?;
        let weights = mul(params, if training { 4 } else { 1 })?;
        let floats = add(weights, mul(per_image, u(batch.max(1)))?)?;
        mul(floats, 4)
    }

    /// Refuse `batch` images of this config when [`estimate_bytes`](Self::estimate_bytes)
    /// (or, `training`, the training estimate) exceeds the memory the system has available
    /// ([`crate::util::mem::check_fits`]).
    pub fn check_memory(&self, batch: usize, training: bool) -> Result<()> {
        let need = self.estimate(batch, training)?;
        crate::util::mem::check_fits(
            &format!(
                "SAM `{}` at {} px, batch {batch}{}",
                self.name,
                self.image_size,
                if training { ", training" } else { "" }
            ),
            need,
        )
    }
}
