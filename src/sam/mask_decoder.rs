//! SAM's mask decoder (Meta's `segment_anything/modeling/mask_decoder.py`): output tokens run
//! through the two-way transformer with the prompt tokens; each mask token's hypernetwork MLP
//! weights the upscaled image features into one mask; the IoU token predicts mask quality.
//! Batched: one prompt set per image.

use super::common::{Mlp, LAYER_NORM_2D_EPS};
use super::config::SamConfig;
use super::transformer::TwoWayTransformer;
use crate::error::Result;
use crate::nn::layers::{gelu, ConvTranspose2d, Embedding, LayerNorm2d};
use crate::nn::ParamStore;
use candle_core::Tensor;

/// `MaskDecoder`.
#[derive(Debug, Clone)]
pub struct MaskDecoder {
    pub transformer_dim: usize,
    pub transformer: TwoWayTransformer,
    pub iou_token: Embedding,
    pub num_mask_tokens: usize,
    pub mask_tokens: Embedding,
    /// `output_upscaling.{0,1,3}`: convT k2s2 → LN2d → GELU → convT k2s2 → GELU.
    pub output_upscaling: (ConvTranspose2d, LayerNorm2d, ConvTranspose2d),
    pub output_hypernetworks_mlps: Vec<Mlp>,
    pub iou_prediction_head: Mlp,
}

impl MaskDecoder {
    pub fn new(cfg: &SamConfig, vs: &ParamStore) -> Result<Self> {
        let c = cfg.prompt_embed_dim;
        let n = cfg.num_multimask_outputs + 1;
        let u = vs.pp("output_upscaling");
        Ok(MaskDecoder {
            transformer_dim: c,
            transformer: TwoWayTransformer::new(
                &vs.pp("transformer"),
                cfg.decoder_depth,
                c,
                cfg.decoder_num_heads,
                cfg.decoder_mlp_dim,
            )?,
            iou_token: Embedding::new(&vs.pp("iou_token"), 1, c)?,
            num_mask_tokens: n,
            mask_tokens: Embedding::new(&vs.pp("mask_tokens"), n, c)?,
            output_upscaling: (
                ConvTranspose2d::new(&u.pp(0), c, c / 4, 2, 2, true)?,
                LayerNorm2d::new(&u.pp(1), c / 4, LAYER_NORM_2D_EPS)?,
                ConvTranspose2d::new(&u.pp(3), c / 4, c / 8, 2, 2, true)?,
            ),
            output_hypernetworks_mlps: (0..n)
                .map(|i| Mlp::new(&vs.pp("output_hypernetworks_mlps").pp(i), c, c, c / 8, 3))
                .collect::<Result<Vec<_>>>()?,
            iou_prediction_head: Mlp::new(
                &vs.pp("iou_prediction_head"),
                c,
                cfg.iou_head_hidden_dim,
                n,
                cfg.iou_head_depth,
            )?,
        })
    }

    /// Run the transformer and upscaling. Returns (tokens out `[B, N, C]`, upscaled features
    /// `[B, C/8, 4h, 4w]`).
    fn run(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: Option<&Tensor>,
        dense: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = image_embeddings.dims4()?;
        let output_tokens = Tensor::cat(
            &[
                self.iou_token.weight.tensor()?,
                self.mask_tokens.weight.tensor()?,
            ],
            0,
        )?; // [1 + M, C]
        let n_out = output_tokens.dim(0)?;
        let output_tokens = output_tokens.unsqueeze(0)?.broadcast_as((b, n_out, c))?;
        let tokens = match sparse {
            Some(s) => Tensor::cat(&[&output_tokens.contiguous()?, s], 1)?,
            None => output_tokens.contiguous()?,
        };
        let src = image_embeddings.broadcast_add(dense)?;
        let (hs, src) = self.transformer.forward(&src, image_pe, &tokens)?;
        let src = src.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        let (u0, l, u1) = &self.output_upscaling;
        let up = gelu(&l.forward(&u0.forward(&src)?)?)?;
        let up = gelu(&u1.forward(&up)?)?;
        Ok((hs, up))
    }

    /// `hyper_in [B, M, C/8]` · upscaled `[B, C/8, H, W]` → masks `[B, M, H, W]`.
    fn masks_from(hyper_in: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (b, cu, h, w) = up.dims4()?;
        let m = hyper_in.dim(1)?;
        Ok(hyper_in
            .matmul(&up.reshape((b, cu, h * w))?)?
            .reshape((b, m, h, w))?)
    }

    /// `forward`: `image_embeddings [B, C, h, w]`, `image_pe [1, C, h, w]`, sparse prompts
    /// `[B, N, C]` (or none), dense prompts `[B, C, h, w]` → (masks `[B, M, 4h, 4w]`,
    /// iou `[B, M]`), `M = num_multimask_outputs` with `multimask_output`, else 1.
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: Option<&Tensor>,
        dense: &Tensor,
        multimask_output: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (hs, up) = self.run(image_embeddings, image_pe, sparse, dense)?;
        let iou_token_out = hs.narrow(1, 0, 1)?.squeeze(1)?;
        let hyper_in = (0..self.num_mask_tokens)
            .map(|i| {
                self.output_hypernetworks_mlps[i].forward(&hs.narrow(1, 1 + i, 1)?.squeeze(1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::stack(&hyper_in, 1)?;
        let masks = Self::masks_from(&hyper_in, &up)?;
        let iou = self.iou_prediction_head.forward(&iou_token_out)?;
        let (start, len) = if multimask_output {
            (1, self.num_mask_tokens - 1)
        } else {
            (0, 1)
        };
        Ok((masks.narrow(1, start, len)?, iou.narrow(1, start, len)?))
    }

    /// Single-mask logits only (mask token 0), skipping the unused hypernetworks and the IoU
    /// head; equal to `forward(.., multimask_output=false).0`. → `[B, 1, 4h, 4w]`.
    pub fn forward_single_mask(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: Option<&Tensor>,
        dense: &Tensor,
    ) -> Result<Tensor> {
        let (hs, up) = self.run(image_embeddings, image_pe, sparse, dense)?;
        let hyper0 = self.output_hypernetworks_mlps[0].forward(&hs.narrow(1, 1, 1)?)?; // [B,1,C/8]
        Self::masks_from(&hyper0, &up)
    }
}
