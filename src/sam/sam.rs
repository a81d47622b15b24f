//! The `Sam` model (Meta's `segment_anything/modeling/sam.py`): image encoder, prompt encoder
//! and mask decoder built from one [`ParamStore`] under the official checkpoint keys, plus
//! the two paths this project uses — prompt-free (GPS's recipe) and prompted.

use super::config::SamConfig;
use super::image_encoder::{rel_pos_len, ImageEncoderViT};
use super::mask_decoder::MaskDecoder;
use super::prompt_encoder::{PromptEncoder, PE_BUFFER};
use crate::error::{Error, Result};
use crate::nn::layers::resize_bilinear;
use crate::nn::{ParamStore, Precision, RolePolicy};
use crate::util::tensors::TensorMap;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// One named tensor of the model: name, shape, and whether it is a buffer (not a parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamShape {
    pub name: String,
    pub shape: Vec<usize>,
    pub is_buffer: bool,
}

impl ParamShape {
    /// Number of entries (saturating: a shape from an unvalidated config cannot overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |p, &d| p.saturating_mul(d))
    }
}

/// Parameter counts per component, as Meta's `parameters()` counts them (buffers excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SamCounts {
    pub image_encoder: usize,
    pub prompt_encoder: usize,
    pub mask_decoder: usize,
    /// Entries in buffers (the positional-encoding matrix), not included in `total`.
    pub buffers: usize,
}

impl SamCounts {
    pub fn total(&self) -> usize {
        self.image_encoder + self.prompt_encoder + self.mask_decoder
    }

    /// Count named shapes by their top-level component.
    pub fn from_shapes<'a>(shapes: impl IntoIterator<Item = (&'a str, usize, bool)>) -> Self {
        let mut c = SamCounts::default();
        for (name, n, is_buffer) in shapes {
            if is_buffer {
                c.buffers += n;
            } else if name.starts_with("image_encoder.") {
                c.image_encoder += n;
            } else if name.starts_with("prompt_encoder.") {
                c.prompt_encoder += n;
            } else if name.starts_with("mask_decoder.") {
                c.mask_decoder += n;
            }
        }
        c
    }
}

/// Segment Anything.
#[derive(Debug, Clone)]
pub struct Sam {
    pub image_encoder: ImageEncoderViT,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    pub config: SamConfig,
}

impl Sam {
    /// Build from `vs` (root store). Without a checkpoint, params get explicit seeded init
    /// (PyTorch defaults for linear/conv, N(0,1) embeddings, trunc-normal 0.02 positions).
    /// The config is validated and, on the CPU, the memory of the model and a one-image
    /// forward ([`SamConfig::estimate_bytes`]) is checked against the available memory
    /// before anything is allocated.
    pub fn new(cfg: &SamConfig, vs: &ParamStore) -> Result<Sam> {
        cfg.validate()?;
        if vs.device().is_cpu() {
            cfg.check_memory(1, false)?;
        }
        Ok(Sam {
            image_encoder: ImageEncoderViT::new(cfg, &vs.pp("image_encoder"))?,
            prompt_encoder: PromptEncoder::new(cfg, vs)?,
            mask_decoder: MaskDecoder::new(cfg, &vs.pp("mask_decoder"))?,
            config: cfg.clone(),
        })
    }

    /// Run the image encoder in `p` (bf16/f16 autocast, or f32; see
    /// [`ImageEncoderViT::precision`]). The prompt encoder and mask decoder stay f32, and the
    /// image embeddings they receive are f32 in every precision.
    pub fn set_precision(&mut self, p: Precision) {
        self.image_encoder.precision = p;
    }

    /// [`Self::set_precision`], by value.
    pub fn with_precision(mut self, p: Precision) -> Self {
        self.set_precision(p);
        self
    }

    /// The image encoder's compute precision.
    pub fn precision(&self) -> Precision {
        self.image_encoder.precision
    }

    /// Every tensor of the model by official name, with shape and buffer flag, computed from
    /// the config alone (no allocation). `Sam::new` requests exactly these (tested).
    pub fn param_shapes(cfg: &SamConfig) -> Vec<ParamShape> {
        let mut out = Vec::new();
        let mut add = |name: String, shape: &[usize]| {
            out.push(ParamShape {
                is_buffer: name == PE_BUFFER,
                name,
                shape: shape.to_vec(),
            })
        };
        let lin = |add: &mut dyn FnMut(String, &[usize]), p: &str, i: usize, o: usize| {
            add(format!("{p}.weight"), &[o, i]);
            add(format!("{p}.bias"), &[o]);
        };
        let norm = |add: &mut dyn FnMut(String, &[usize]), p: &str, c: usize| {
            add(format!("{p}.weight"), &[c]);
            add(format!("{p}.bias"), &[c]);
        };
        // Image encoder.
        let d = cfg.encoder_embed_dim;
        let g = cfg.grid_size();
        let p = cfg.patch_size;
        let hd = d / cfg.encoder_num_heads.max(1);
        let mlp = cfg.mlp_dim();
        add(
            "image_encoder.patch_embed.proj.weight".into(),
            &[d, 3, p, p],
        );
        add("image_encoder.patch_embed.proj.bias".into(), &[d]);
        add("image_encoder.pos_embed".into(), &[1, g, g, d]);
        for i in 0..cfg.encoder_depth {
            let b = format!("image_encoder.blocks.{i}");
            let s = if cfg.encoder_global_attn_indexes.contains(&i) {
                g
            } else {
                cfg.window_size
            };
            norm(&mut add, &format!("{b}.norm1"), d);
            lin(&mut add, &format!("{b}.attn.qkv"), d, d.saturating_mul(3));
            lin(&mut add, &format!("{b}.attn.proj"), d, d);
            add(format!("{b}.attn.rel_pos_h"), &[rel_pos_len(s), hd]);
            add(format!("{b}.attn.rel_pos_w"), &[rel_pos_len(s), hd]);
            norm(&mut add, &format!("{b}.norm2"), d);
            lin(&mut add, &format!("{b}.mlp.lin1"), d, mlp);
            lin(&mut add, &format!("{b}.mlp.lin2"), mlp, d);
        }
        let c = cfg.prompt_embed_dim;
        add("image_encoder.neck.0.weight".into(), &[c, d, 1, 1]);
        norm(&mut add, "image_encoder.neck.1", c);
        add("image_encoder.neck.2.weight".into(), &[c, c, 3, 3]);
        norm(&mut add, "image_encoder.neck.3", c);
        // Prompt encoder.
        add(PE_BUFFER.into(), &[2, c / 2]);
        for i in 0..4 {
            add(
                format!("prompt_encoder.point_embeddings.{i}.weight"),
                &[1, c],
            );
        }
        add("prompt_encoder.not_a_point_embed.weight".into(), &[1, c]);
        let mi = cfg.mask_in_chans;
        let m = "prompt_encoder.mask_downscaling";
        add(format!("{m}.0.weight"), &[mi / 4, 1, 2, 2]);
        add(format!("{m}.0.bias"), &[mi / 4]);
        norm(&mut add, &format!("{m}.1"), mi / 4);
        add(format!("{m}.3.weight"), &[mi, mi / 4, 2, 2]);
        add(format!("{m}.3.bias"), &[mi]);
        norm(&mut add, &format!("{m}.4"), mi);
        add(format!("{m}.6.weight"), &[c, mi, 1, 1]);
        add(format!("{m}.6.bias"), &[c]);
        add("prompt_encoder.no_mask_embed.weight".into(), &[1, c]);
        // Mask decoder.
        let t = "mask_decoder.transformer";
        let attn = |add: &mut dyn FnMut(String, &[usize]), p: &str, down: usize| {
            for n in ["q_proj", "k_proj", "v_proj"] {
                lin(add, &format!("{p}.{n}"), c, c / down);
            }
            lin(add, &format!("{p}.out_proj"), c / down, c);
        };
        for i in 0..cfg.decoder_depth {
            let l = format!("{t}.layers.{i}");
            attn(&mut add, &format!("{l}.self_attn"), 1);
            norm(&mut add, &format!("{l}.norm1"), c);
            attn(&mut add, &format!("{l}.cross_attn_token_to_image"), 2);
            norm(&mut add, &format!("{l}.norm2"), c);
            lin(&mut add, &format!("{l}.mlp.lin1"), c, cfg.decoder_mlp_dim);
            lin(&mut add, &format!("{l}.mlp.lin2"), cfg.decoder_mlp_dim, c);
            norm(&mut add, &format!("{l}.norm3"), c);
            norm(&mut add, &format!("{l}.norm4"), c);
            attn(&mut add, &format!("{l}.cross_attn_image_to_token"), 2);
        }
        attn(&mut add, &format!("{t}.final_attn_token_to_image"), 2);
        norm(&mut add, &format!("{t}.norm_final_attn"), c);
        let nm = cfg.num_multimask_outputs + 1;
        add("mask_decoder.iou_token.weight".into(), &[1, c]);
        add("mask_decoder.mask_tokens.weight".into(), &[nm, c]);
        add(
            "mask_decoder.output_upscaling.0.weight".into(),
            &[c, c / 4, 2, 2],
        );
        add("mask_decoder.output_upscaling.0.bias".into(), &[c / 4]);
        norm(&mut add, "mask_decoder.output_upscaling.1", c / 4);
        add(
            "mask_decoder.output_upscaling.3.weight".into(),
            &[c / 4, c / 8, 2, 2],
        );
        add("mask_decoder.output_upscaling.3.bias".into(), &[c / 8]);
        let mlp_shapes = |add: &mut dyn FnMut(String, &[usize]),
                          p: &str,
                          i: usize,
                          h: usize,
                          o: usize,
                          n: usize| {
            for k in 0..n {
                let a = if k == 0 { i } else { h };
                let b = if k + 1 == n { o } else { h };
                lin(add, &format!("{p}.layers.{k}"), a, b);
            }
        };
        for k in 0..nm {
            mlp_shapes(
                &mut add,
                &format!("mask_decoder.output_hypernetworks_mlps.{k}"),
                c,
                c,
                c / 8,
                3,
            );
        }
        mlp_shapes(
            &mut add,
            "mask_decoder.iou_prediction_head",
            c,
            cfg.iou_head_hidden_dim,
            nm,
            cfg.iou_head_depth,
        );
        out
    }

    /// Parameter counts per component from the config (no allocation).
    pub fn counts(cfg: &SamConfig) -> SamCounts {
        let shapes = Self::param_shapes(cfg);
        SamCounts::from_shapes(
            shapes
                .iter()
                .map(|s| (s.name.as_str(), s.numel(), s.is_buffer)),
        )
    }

    /// Names that receive no gradient from a loss on the prompt-free single-mask logits: the
    /// prompt inputs that path never uses (point/box embeddings, `not_a_point_embed`, mask
    /// downscaling), the hypernetworks of the multimask tokens, and the IoU head. The
    /// positional-encoding buffer is frozen and not listed.
    pub fn prompt_free_unused(cfg: &SamConfig) -> Vec<String> {
        Self::param_shapes(cfg)
            .into_iter()
            .filter(|s| !s.is_buffer)
            .map(|s| s.name)
            .filter(|n| {
                n.starts_with("prompt_encoder.point_embeddings.")
                    || n.starts_with("prompt_encoder.not_a_point_embed.")
                    || n.starts_with("prompt_encoder.mask_downscaling.")
                    || n.starts_with("mask_decoder.iou_prediction_head.")
                    || (n.starts_with("mask_decoder.output_hypernetworks_mlps.")
                        && !n.starts_with("mask_decoder.output_hypernetworks_mlps.0."))
            })
            .collect()
    }

    /// `[B, 3, S, S]` RGB in `[0, 1]` → SAM-normalised `(x·255 − pixel_mean) / pixel_std`.
    pub fn normalize(&self, images01: &Tensor) -> Result<Tensor> {
        let dev = images01.device();
        let mean = Tensor::new(&self.config.pixel_mean, dev)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&self.config.pixel_std, dev)?.reshape((1, 3, 1, 1))?;
        Ok((images01.to_dtype(DType::F32)? * 255.0)?
            .broadcast_sub(&mean)?
            .broadcast_div(&std)?)
    }

    /// Normalised `[B, 3, S, S]` → image embeddings `[B, C, g, g]`.
    pub fn image_embeddings(&self, x: &Tensor) -> Result<Tensor> {
        self.image_encoder.forward(x)
    }

    /// Prompt-free decoding (no sparse prompts, dense = `no_mask_embed`, single-mask output):
    /// embeddings `[B, C, g, g]` → low-res logits `[B, 1, 4g, 4g]`.
    pub fn decode_prompt_free(&self, emb: &Tensor) -> Result<Tensor> {
        let dense = self.prompt_encoder.no_mask_embed.weight.tensor()?;
        let c = dense.dim(1)?;
        let dense = dense.reshape((1, c, 1, 1))?;
        let pe = self.prompt_encoder.get_dense_pe()?;
        self.mask_decoder
            .forward_single_mask(emb, &pe, None, &dense)
    }

    /// [`forward_prompt_free`](Self::forward_prompt_free) for inference: the same logits,
    /// detached, with the encoder's blocks detached one by one
    /// ([`ImageEncoderViT::forward_detached`]) so a model with trainable vars or GPS deltas
    /// does not hold the whole encoder graph while it evaluates.
    pub fn predict_prompt_free(&self, images01: &Tensor) -> Result<Tensor> {
        let x = self.normalize(images01)?;
        let emb = self.image_encoder.forward_detached(&x)?;
        let low = self.decode_prompt_free(&emb)?;
        let s = self.config.image_size;
        Ok(resize_bilinear(&low, s, s)?.detach())
    }

    /// `[B, 3, S, S]` in `[0, 1]` → logits `[B, 1, S, S]` (low-res logits resized bilinearly).
    pub fn forward_prompt_free(&self, images01: &Tensor) -> Result<Tensor> {
        let x = self.normalize(images01)?;
        let emb = self.image_embeddings(&x)?;
        let low = self.decode_prompt_free(&emb)?;
        let s = self.config.image_size;
        resize_bilinear(&low, s, s)
    }

    /// One training step's forward + backward of the prompt-free path with the image encoder
    /// checkpointed per block (see [`ImageEncoderViT::forward_checkpointed`]): `images01`
    /// `[B, 3, S, S]` in `[0, 1]`, `loss` maps logits `[B, 1, S, S]` to a scalar. Returns the
    /// loss (detached) and the gradients of every trainable var, equal to
    /// `loss(forward_prompt_free(images01)).backward()` with far less peak memory.
    pub fn prompt_free_backward_checkpointed(
        &self,
        images01: &Tensor,
        loss: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let x = self.normalize(images01)?;
        let (emb, ckpt) = self.image_encoder.forward_checkpointed(&x)?;
        let ev = Var::from_tensor(&emb)?;
        let low = self.decode_prompt_free(ev.as_tensor())?;
        let s = self.config.image_size;
        let l = loss(&resize_bilinear(&low, s, s)?)?;
        let mut grads = crate::nn::backward_vars(&l)?;
        let upstream = grads.remove(ev.as_tensor()).ok_or_else(|| {
            Error::msg("checkpointed step: the loss does not depend on the image embeddings")
        })?;
        grads.extend(
            self.image_encoder
                .backward_checkpointed(&x, &ckpt, &upstream)?,
        )?;
        Ok((l.detach(), grads))
    }

    /// Prompted decoding, one prompt set per image: `points` = (coords `[B, N, 2]` in input
    /// pixels, labels `[B, N]` with 1 positive / 0 negative / −1 ignore), `boxes` `[B, 4]` xyxy
    /// → (low-res masks `[B, M, 4g, 4g]`, IoU predictions `[B, M]`), `M` = 3 with `multimask`,
    /// else 1. Without a box, Meta's padding point is appended to the points.
    pub fn forward_prompted(
        &self,
        emb: &Tensor,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        multimask: bool,
    ) -> Result<(Tensor, Tensor)> {
        let b = emb.dim(0)?;
        if let Some((coords, labels)) = points {
            check_batch("point coords", coords.dim(0)?, b)?;
            check_batch("point labels", labels.dim(0)?, b)?;
        }
        if let Some(bx) = boxes {
            check_batch("boxes", bx.dim(0)?, b)?;
            if bx.dims() != [b, 4] {
                return Err(Error::msg(format!(
                    "boxes: expected [B, 4] xyxy, got {:?}",
                    bx.dims()
                )));
            }
        }
        let (sparse, dense) = self.prompt_encoder.forward(b, points, boxes, None)?;
        let pe = self.prompt_encoder.get_dense_pe()?;
        self.mask_decoder
            .forward(emb, &pe, sparse.as_ref(), &dense, multimask)
    }
}

/// Build a SAM from `weights` (or fresh seeded init when `None`) with `policy`, and check that
/// the checkpoint had no unused tensors. Returns the model and its param store.
pub fn build(
    cfg: &SamConfig,
    weights: Option<TensorMap>,
    policy: RolePolicy,
    device: &Device,
    seed: u64,
) -> Result<(Sam, ParamStore)> {
    let vs = ParamStore::new(weights, policy, device, seed);
    let sam = Sam::new(cfg, &vs)?;
    vs.check_all_used()?;
    Ok((sam, vs))
}

fn check_batch(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::msg(format!(
            "{what}: batch {got} does not match the image batch {want}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_meta_parameters() {
        let b = Sam::counts(&SamConfig::vit_b());
        assert_eq!(b.image_encoder, 89_670_912);
        assert_eq!(b.prompt_encoder, 6_220);
        assert_eq!(b.mask_decoder, 4_058_340);
        assert_eq!(b.total(), 93_735_472);
        assert_eq!(b.buffers, 256);
        assert_eq!(Sam::counts(&SamConfig::tiny()).total(), 3_813_760);
    }

    #[test]
    fn param_shapes_is_what_new_builds() {
        // The tiny preset, and a variant with a global block first and no multimask head
        // change, to exercise the listing's branches.
        let mut other = SamConfig::tiny();
        other.encoder_depth = 3;
        other.encoder_global_attn_indexes = vec![0];
        other.iou_head_depth = 2;
        other.decoder_depth = 1;
        for cfg in [SamConfig::tiny(), other] {
            let vs = ParamStore::init(&Device::Cpu, 0);
            Sam::new(&cfg, &vs).unwrap();
            let built: Vec<(String, Vec<usize>, bool)> = vs
                .params()
                .into_iter()
                .map(|(n, p)| (n.clone(), p.dims().to_vec(), vs.is_buffer(&n)))
                .collect();
            let mut listed: Vec<(String, Vec<usize>, bool)> = Sam::param_shapes(&cfg)
                .into_iter()
                .map(|s| (s.name, s.shape, s.is_buffer))
                .collect();
            listed.sort();
            assert_eq!(built, listed);
            let (_, total) = vs.counts();
            assert_eq!(total, Sam::counts(&cfg).total());
        }
    }

    #[test]
    fn buffer_stays_frozen_under_all_trainable() {
        let (_, vs) = build(
            &SamConfig::tiny(),
            None,
            RolePolicy::AllTrainable,
            &Device::Cpu,
            1,
        )
        .unwrap();
        assert!(vs.trainable_vars().iter().all(|(n, _)| n != PE_BUFFER));
        assert!(vs.current_tensors().unwrap().contains_key(PE_BUFFER));
        let (trainable, total) = vs.counts();
        assert_eq!(trainable, total);
    }
}
