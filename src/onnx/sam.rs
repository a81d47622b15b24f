//! SAM → ONNX, mirroring Meta's `segment_anything/modeling` op for op
//! (`image_encoder.py`, `prompt_encoder.py`, `mask_decoder.py`, `transformer.py`,
//! `utils/onnx.py` for the prompted decoder's label convention). Weights are read from a
//! [`TensorMap`] by the official checkpoint names and become initializers under those names;
//! no parameter is added (constants such as index tables, the pixel grid and the normalisation
//! statistics are not parameters).
//!
//! Graphs (opset 17, dynamic batch `N`):
//! - **prompt-free** ([`export_prompt_free`]): `image [N,3,S,S] → mask_logits [N,1,S,S]` —
//!   image encoder, the prompt encoder with no prompts (no sparse tokens, `no_mask_embed` as the
//!   dense embedding), the mask decoder's single-mask output (token 0, `multimask_output=False`)
//!   and bilinear upsampling ×4 (Resize linear/half_pixel = `F.interpolate(align_corners=False)`),
//!   i.e. `Sam.postprocess_masks` for an `S×S` input.
//! - **image encoder** ([`export_image_encoder`]): `image [N,3,S,S] → image_embeddings [N,C,g,g]`.
//! - **prompted decoder** ([`export_prompted_decoder`]): `image_embeddings [N,C,g,g]`,
//!   `point_coords [N,P,2]` (x, y in input pixels of the `S×S` image), `point_labels [N,P]` (f32)
//!   → `masks [N,M,4g,4g]` low-res logits for all `M = num_multimask_outputs+1` mask tokens
//!   (index 0 = single-mask output, 1.. = multimask outputs) and `iou_predictions [N,M]`.
//!   Labels follow Meta's ONNX export (`utils/onnx.py`): 1 foreground, 0 background, 2 box
//!   top-left, 3 box bottom-right, -1 padding. As in `SamPredictor`, callers without a box
//!   append a padding point `(0,0)` with label -1. No mask input: the dense embedding is
//!   always `no_mask_embed` (so `prompt_encoder.mask_downscaling.*` is not exported).
//!
//! With `normalize` (the default) the image input is RGB in [0,1] (gps-seg's canonical tensor)
//! and the graph applies `(x·255 − pixel_mean)/pixel_std`; without it the input is already
//! normalised. The choice is written in the model's doc string and `metadata_props`.

use super::builder::{Dim, GraphBuilder, Value};
use super::proto::{data_type, ModelProto};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::sam::SamConfig;
use crate::util::tensors::TensorMap;
use std::collections::BTreeMap;

/// Export options.
#[derive(Debug, Clone, Copy)]
pub struct SamExportOptions {
    /// Apply SAM's pixel normalisation in-graph (input RGB in [0,1]). Default true.
    pub normalize: bool,
}

impl Default for SamExportOptions {
    fn default() -> Self {
        SamExportOptions { normalize: true }
    }
}

/// What an export produced (for reports and tests).
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub graph: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub node_count: usize,
    /// Elements of the checkpoint-named initializers in the graph.
    pub param_count: usize,
    /// Number of checkpoint tensors exported.
    pub param_tensors: usize,
    /// Checkpoint tensors this graph does not use (by design; see the module docs).
    pub unused: Vec<String>,
    /// Elements of the unused checkpoint tensors.
    pub unused_count: usize,
}

/// Every tensor of a SAM checkpoint for `cfg`, with its shape (Meta's state-dict names,
/// buffers included) — from the port's own listing, [`crate::sam::Sam::param_shapes`].
pub fn sam_param_shapes(cfg: &SamConfig) -> BTreeMap<String, Vec<usize>> {
    crate::sam::Sam::param_shapes(cfg)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect()
}

/// Seeded random weights with the shapes of [`sam_param_shapes`] (tests and benchmarks):
/// norm scales ≈ 1, everything else ~ N(0, 1/fan_in).
pub fn random_sam_weights(cfg: &SamConfig, seed: u64) -> Result<TensorMap> {
    // Validated and sized before a single weight is made (a config is user input).
    cfg.check_memory(1, false)?;
    let mut rng = crate::util::rng::Rng::derive(seed, "sam-random-weights");
    let mut out = TensorMap::new();
    for (name, shape) in sam_param_shapes(cfg) {
        let n: usize = shape.iter().product();
        let is_norm_scale = shape.len() == 1
            && name.ends_with(".weight")
            && (name.contains("norm")
                || name.contains("neck.1")
                || name.contains("neck.3")
                || name.contains("output_upscaling.1")
                || name.contains("mask_downscaling.1")
                || name.contains("mask_downscaling.4"));
        let fan_in = if shape.len() >= 2 {
            shape[1..].iter().product::<usize>().max(1)
        } else {
            shape[0].max(1)
        };
        let std = if name.ends_with(".bias") {
            0.02
        } else {
            (1.0 / fan_in as f32).sqrt()
        };
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if is_norm_scale {
                    1.0 + 0.1 * rng.normal()
                } else {
                    std * rng.normal()
                }
            })
            .collect();
        let t = candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Exporter state: the builder plus the weight map and the names used.
struct Ex<'a> {
    b: GraphBuilder,
    cfg: &'a SamConfig,
    wt: Weights<'a>,
}

const LN_EPS_SAM: f32 = 1e-6;
const LN_EPS_TORCH: f32 = 1e-5;

impl<'a> Ex<'a> {
    fn new(name: &str, cfg: &'a SamConfig, w: &'a TensorMap) -> Result<Self> {
        cfg.validate()?;
        Ok(Ex {
            b: GraphBuilder::new(name),
            cfg,
            wt: Weights::new(w, sam_param_shapes(cfg)),
        })
    }

    /// The checkpoint tensor `name` as an initializer (shape checked against the config).
    fn p(&mut self, name: &str) -> Result<Value> {
        self.wt.param(&mut self.b, name)
    }

    fn linear(&mut self, x: &Value, pre: &str) -> Result<Value> {
        self.wt.linear(&mut self.b, x, pre)
    }

    fn ln(&mut self, x: &Value, pre: &str, eps: f32) -> Result<Value> {
        self.wt.layer_norm(&mut self.b, x, pre, eps)
    }

    fn ln2d(&mut self, x: &Value, pre: &str) -> Result<Value> {
        let w = self.p(&format!("{pre}.weight"))?;
        let b = self.p(&format!("{pre}.bias"))?;
        self.b.layer_norm_2d(x, &w, &b, LN_EPS_SAM)
    }

    // ---- image encoder (image_encoder.py) --------------------------------------------------------

    /// `x: [N,3,S,S]` normalised → `[N,C,g,g]`.
    fn image_encoder(&mut self, x: &Value) -> Result<Value> {
        let cfg = self.cfg;
        let p = cfg.patch_size as i64;
        self.b.set_scope("image_encoder.patch_embed");
        let w = self.p("image_encoder.patch_embed.proj.weight")?;
        let bias = self.p("image_encoder.patch_embed.proj.bias")?;
        let y = self.b.conv(x, &w, Some(&bias), p, 0, 1)?;
        let y = self.b.transpose(&y, &[0, 2, 3, 1])?; // [N,g,g,D]
        let pos = self.p("image_encoder.pos_embed")?;
        let mut y = self.b.add(&y, &pos)?;
        for i in 0..cfg.encoder_depth {
            y = self.block(i, &y)?;
        }
        self.b.set_scope("image_encoder.neck");
        let y = self.b.transpose(&y, &[0, 3, 1, 2])?;
        let w0 = self.p("image_encoder.neck.0.weight")?;
        let y = self.b.conv(&y, &w0, None, 1, 0, 1)?;
        let y = self.ln2d(&y, "image_encoder.neck.1")?;
        let w2 = self.p("image_encoder.neck.2.weight")?;
        let y = self.b.conv(&y, &w2, None, 1, 1, 1)?;
        self.ln2d(&y, "image_encoder.neck.3")
    }

    /// `Block.forward`: `x: [N,g,g,D] → [N,g,g,D]`.
    fn block(&mut self, i: usize, x: &Value) -> Result<Value> {
        let cfg = self.cfg;
        let pre = format!("image_encoder.blocks.{i}");
        self.b.set_scope(&pre);
        let g = cfg.grid_size() as i64;
        let ws = if cfg.encoder_global_attn_indexes.contains(&i) {
            0
        } else {
            cfg.window_size as i64
        };
        let h = self.ln(x, &format!("{pre}.norm1"), LN_EPS_SAM)?;
        let h = if ws > 0 {
            let (h, hp) = self.window_partition(&h, ws, g)?;
            let h = self.attention(&h, &format!("{pre}.attn"), ws)?;
            self.window_unpartition(&h, ws, hp, g)?
        } else {
            self.attention(&h, &format!("{pre}.attn"), g)?
        };
        let x = self.b.add(x, &h)?;
        let m = self.ln(&x, &format!("{pre}.norm2"), LN_EPS_SAM)?;
        let m = self.linear(&m, &format!("{pre}.mlp.lin1"))?;
        let m = self.b.gelu_erf(&m)?;
        let m = self.linear(&m, &format!("{pre}.mlp.lin2"))?;
        self.b.add(&x, &m)
    }

    /// `[N,g,g,D] → [N·nw², ws, ws, D]` with zero padding to a multiple of `ws`.
    fn window_partition(&mut self, x: &Value, ws: i64, g: i64) -> Result<(Value, i64)> {
        let d = self.cfg.encoder_embed_dim as i64;
        let pad = (ws - g % ws) % ws;
        let x = if pad > 0 {
            self.b.pad(x, &[0, 0, 0, 0, 0, pad, pad, 0])?
        } else {
            x.clone()
        };
        let hp = g + pad;
        let n = hp / ws;
        let x = self.b.reshape(&x, &[-1, n, ws, n, ws, d])?;
        let x = self.b.transpose(&x, &[0, 1, 3, 2, 4, 5])?;
        Ok((self.b.reshape(&x, &[-1, ws, ws, d])?, hp))
    }

    /// Inverse of [`Ex::window_partition`], cropping the padding.
    fn window_unpartition(&mut self, x: &Value, ws: i64, hp: i64, g: i64) -> Result<Value> {
        let d = self.cfg.encoder_embed_dim as i64;
        let n = hp / ws;
        let x = self.b.reshape(x, &[-1, n, n, ws, ws, d])?;
        let x = self.b.transpose(&x, &[0, 1, 3, 2, 4, 5])?;
        let x = self.b.reshape(&x, &[-1, hp, hp, d])?;
        if hp > g {
            self.b.slice(&x, &[0, 0], &[g, g], &[1, 2])
        } else {
            Ok(x)
        }
    }

    /// Encoder `Attention` with decomposed relative positions: `x: [B,s,s,D] → [B,s,s,D]`.
    fn attention(&mut self, x: &Value, pre: &str, s: i64) -> Result<Value> {
        let d = self.cfg.encoder_embed_dim as i64;
        let nh = self.cfg.encoder_num_heads as i64;
        let hd = d / nh;
        let ss = s * s;
        let qkv = self.linear(x, &format!("{pre}.qkv"))?;
        let qkv = self.b.reshape(&qkv, &[-1, ss, 3, nh, hd])?;
        let qkv = self.b.transpose(&qkv, &[2, 0, 3, 1, 4])?;
        let qkv = self.b.reshape(&qkv, &[3, -1, ss, hd])?;
        let q = self.b.select(&qkv, 0, 0)?; // [B·nh, ss, hd]
        let k = self.b.select(&qkv, 0, 1)?;
        let v = self.b.select(&qkv, 0, 2)?;
        let qs = self.b.mul_scalar(&q, (hd as f32).powf(-0.5))?;
        let kt = self.b.transpose(&k, &[0, 2, 1])?;
        let attn = self.b.matmul(&qs, &kt)?; // [B·nh, ss, ss]
                                             // add_decomposed_rel_pos: R[i, j] = rel_pos[i - j + s - 1] (q_size == k_size).
        let idx: Vec<i64> = (0..s)
            .flat_map(|i| (0..s).map(move |j| i - j + s - 1))
            .collect();
        let idx = self.b.const_i64(&[s, s], &idx)?;
        let rph = self.p(&format!("{pre}.rel_pos_h"))?;
        let rpw = self.p(&format!("{pre}.rel_pos_w"))?;
        let rh = self.b.gather(&rph, &idx, 0)?; // [s, s, hd]
        let rh_t = self.b.transpose(&rh, &[0, 2, 1])?; // [s, hd, s]
        let rw = self.b.gather(&rpw, &idx, 0)?;
        let rw_t = self.b.transpose(&rw, &[0, 2, 1])?;
        let rq = self.b.reshape(&q, &[-1, s, s, hd])?; // [B', h, w, hd]
        let rel_h = self.b.matmul(&rq, &rh_t)?; // [B', h, w, kh]
        let rq_t = self.b.transpose(&rq, &[0, 2, 1, 3])?; // [B', w, h, hd]
        let rel_w = self.b.matmul(&rq_t, &rw_t)?; // [B', w, h, kw]
        let rel_w = self.b.transpose(&rel_w, &[0, 2, 1, 3])?; // [B', h, w, kw]
        let a5 = self.b.reshape(&attn, &[-1, s, s, s, s])?;
        let rel_h = self.b.unsqueeze(&rel_h, &[4])?;
        let rel_w = self.b.unsqueeze(&rel_w, &[3])?;
        let a5 = self.b.add(&a5, &rel_h)?;
        let a5 = self.b.add(&a5, &rel_w)?;
        let attn = self.b.reshape(&a5, &[-1, ss, ss])?;
        let attn = self.b.softmax(&attn, -1)?;
        let o = self.b.matmul(&attn, &v)?; // [B·nh, ss, hd]
        let o = self.b.reshape(&o, &[-1, nh, s, s, hd])?;
        let o = self.b.transpose(&o, &[0, 2, 3, 1, 4])?;
        let o = self.b.reshape(&o, &[-1, s, s, d])?;
        self.linear(&o, &format!("{pre}.proj"))
    }

    // ---- prompt encoder (prompt_encoder.py) ------------------------------------------------------

    /// `PositionEmbeddingRandom._pe_encoding`: coords in [0,1], `[..., 2] → [..., C]`.
    fn pe_encoding(&mut self, coords01: &Value) -> Result<Value> {
        let c = self.b.mul_scalar(coords01, 2.0)?;
        let one = self.b.scalar_f32(1.0)?;
        let c = self.b.sub(&c, &one)?;
        let g = self.p("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")?;
        let c = self.b.matmul(&c, &g)?;
        let c = self.b.mul_scalar(&c, 2.0 * std::f32::consts::PI)?;
        let s = self.b.sin(&c)?;
        let co = self.b.cos(&c)?;
        self.b.concat(&[&s, &co], -1)
    }

    /// `get_dense_pe()`, flattened as the transformer uses it: `[1, g·g, C]`.
    fn dense_pe(&mut self) -> Result<Value> {
        self.b.set_scope("prompt_encoder.pe_layer");
        let g = self.cfg.grid_size();
        let mut grid = Vec::with_capacity(g * g * 2);
        for y in 0..g {
            for x in 0..g {
                grid.push((x as f32 + 0.5) / g as f32);
                grid.push((y as f32 + 0.5) / g as f32);
            }
        }
        let grid = self.b.const_f32(&[1, (g * g) as i64, 2], &grid)?;
        self.pe_encoding(&grid)
    }

    /// Meta's ONNX `_embed_points`: `coords [N,P,2]` (pixels), `labels [N,P]` → `[N,P,C]`.
    fn embed_points(&mut self, coords: &Value, labels: &Value) -> Result<Value> {
        self.b.set_scope("prompt_encoder");
        let c = self.b.add_scalar(coords, 0.5)?;
        let c = self.b.mul_scalar(&c, 1.0 / self.cfg.image_size as f32)?;
        let pe = self.pe_encoding(&c)?;
        self.b.set_scope("prompt_encoder");
        let lab = self.b.unsqueeze(labels, &[2])?; // [N,P,1]
        let is = |ex: &mut Ex, v: f32| -> Result<Value> {
            let k = ex.b.scalar_f32(v)?;
            let e = ex.b.equal(&lab, &k)?;
            ex.b.cast(&e, data_type::FLOAT)
        };
        let pad = is(self, -1.0)?;
        let one = self.b.scalar_f32(1.0)?;
        let keep = self.b.sub(&one, &pad)?;
        let mut pe = self.b.mul(&pe, &keep)?;
        let nap = self.p("prompt_encoder.not_a_point_embed.weight")?;
        let t = self.b.mul(&nap, &pad)?;
        pe = self.b.add(&pe, &t)?;
        for i in 0..4 {
            let m = is(self, i as f32)?;
            let w = self.p(&format!("prompt_encoder.point_embeddings.{i}.weight"))?;
            let t = self.b.mul(&w, &m)?;
            pe = self.b.add(&pe, &t)?;
        }
        Ok(pe)
    }

    // ---- mask decoder (mask_decoder.py, transformer.py) ------------------------------------------

    /// Two-way `Attention`: `q [N,nq,C]`, `k,v [N,nk,C]` → `[N,nq,C]`.
    fn dec_attention(
        &mut self,
        pre: &str,
        q: &Value,
        k: &Value,
        v: &Value,
        ds: usize,
    ) -> Result<Value> {
        let c = self.cfg.prompt_embed_dim;
        let nh = self.cfg.decoder_num_heads as i64;
        let internal = (c / ds) as i64;
        let hd = internal / nh;
        let q = self.linear(q, &format!("{pre}.q_proj"))?;
        let k = self.linear(k, &format!("{pre}.k_proj"))?;
        let v = self.linear(v, &format!("{pre}.v_proj"))?;
        let mut heads = |x: &Value| -> Result<Value> {
            let x = self.b.reshape(x, &[0, 0, nh, hd])?;
            self.b.transpose(&x, &[0, 2, 1, 3])
        };
        let q = heads(&q)?;
        let k = heads(&k)?;
        let v = heads(&v)?;
        let kt = self.b.transpose(&k, &[0, 1, 3, 2])?;
        let a = self.b.matmul(&q, &kt)?;
        let sc = self.b.scalar_f32((hd as f32).sqrt())?;
        let a = self.b.div(&a, &sc)?;
        let a = self.b.softmax(&a, -1)?;
        let o = self.b.matmul(&a, &v)?;
        let o = self.b.transpose(&o, &[0, 2, 1, 3])?;
        let o = self.b.reshape(&o, &[0, 0, internal])?;
        self.linear(&o, &format!("{pre}.out_proj"))
    }

    /// `MLP` of mask_decoder.py (ReLU between layers, none after the last).
    fn mlp(&mut self, x: &Value, pre: &str, n: usize) -> Result<Value> {
        let mut x = x.clone();
        for l in 0..n {
            x = self.linear(&x, &format!("{pre}.layers.{l}"))?;
            if l + 1 < n {
                x = self.b.relu(&x)?;
            }
        }
        Ok(x)
    }

    /// `TwoWayTransformer.forward`: `src [N,C,g,g]`, `pe [1,gg,C]`, `tokens [N,T,C]` →
    /// (`queries [N,T,C]`, `keys [N,gg,C]`).
    fn two_way(&mut self, src: &Value, pe: &Value, tokens: &Value) -> Result<(Value, Value)> {
        let c = self.cfg.prompt_embed_dim as i64;
        let g = self.cfg.grid_size() as i64;
        let t = "mask_decoder.transformer";
        self.b.set_scope(t);
        let keys = self.b.reshape(src, &[-1, c, g * g])?;
        let mut keys = self.b.transpose(&keys, &[0, 2, 1])?;
        let mut queries = tokens.clone();
        for l in 0..self.cfg.decoder_depth {
            let pre = format!("{t}.layers.{l}");
            self.b.set_scope(&pre);
            // self attention (skip_first_layer_pe on layer 0)
            if l == 0 {
                queries = self.dec_attention(
                    &format!("{pre}.self_attn"),
                    &queries,
                    &queries,
                    &queries,
                    1,
                )?;
            } else {
                let q = self.b.add(&queries, tokens)?;
                let a = self.dec_attention(&format!("{pre}.self_attn"), &q, &q, &queries, 1)?;
                queries = self.b.add(&queries, &a)?;
            }
            queries = self.ln(&queries, &format!("{pre}.norm1"), LN_EPS_TORCH)?;
            // cross attention, tokens → image
            let q = self.b.add(&queries, tokens)?;
            let k = self.b.add(&keys, pe)?;
            let a = self.dec_attention(
                &format!("{pre}.cross_attn_token_to_image"),
                &q,
                &k,
                &keys,
                2,
            )?;
            queries = self.b.add(&queries, &a)?;
            queries = self.ln(&queries, &format!("{pre}.norm2"), LN_EPS_TORCH)?;
            // MLP (ReLU)
            let m = self.linear(&queries, &format!("{pre}.mlp.lin1"))?;
            let m = self.b.relu(&m)?;
            let m = self.linear(&m, &format!("{pre}.mlp.lin2"))?;
            queries = self.b.add(&queries, &m)?;
            queries = self.ln(&queries, &format!("{pre}.norm3"), LN_EPS_TORCH)?;
            // cross attention, image → tokens
            let q = self.b.add(&queries, tokens)?;
            let k = self.b.add(&keys, pe)?;
            let a = self.dec_attention(
                &format!("{pre}.cross_attn_image_to_token"),
                &k,
                &q,
                &queries,
                2,
            )?;
            keys = self.b.add(&keys, &a)?;
            keys = self.ln(&keys, &format!("{pre}.norm4"), LN_EPS_TORCH)?;
        }
        self.b.set_scope(t);
        let q = self.b.add(&queries, tokens)?;
        let k = self.b.add(&keys, pe)?;
        let a = self.dec_attention(&format!("{t}.final_attn_token_to_image"), &q, &k, &keys, 2)?;
        let queries = self.b.add(&queries, &a)?;
        let queries = self.ln(&queries, &format!("{t}.norm_final_attn"), LN_EPS_TORCH)?;
        Ok((queries, keys))
    }

    /// `[iou_token; mask_tokens]` expanded to the batch of `like` (axis 0): `[N, 1+M, C]`.
    fn output_tokens(&mut self, like: &Value) -> Result<Value> {
        self.b.set_scope("mask_decoder");
        let c = self.cfg.prompt_embed_dim as i64;
        let iou = self.p("mask_decoder.iou_token.weight")?;
        let mt = self.p("mask_decoder.mask_tokens.weight")?;
        let t = self.b.concat(&[&iou, &mt], 0)?;
        let t = self.b.unsqueeze(&t, &[0])?;
        let sh = self.b.shape(like)?;
        let n = self.b.slice(&sh, &[0], &[1], &[0])?;
        let rest = self
            .b
            .ints(&[(self.cfg.num_multimask_outputs + 2) as i64, c])?;
        let full = self.b.concat(&[&n, &rest], 0)?;
        self.b.expand(&t, &full)
    }

    /// `MaskDecoder.predict_masks` for the first `n_masks` mask tokens:
    /// `emb [N,C,g,g]`, `tokens [N,T,C]` → (`masks [N,n_masks,4g,4g]`, `iou [N,M]` when asked).
    fn predict_masks(
        &mut self,
        emb: &Value,
        tokens: &Value,
        n_masks: usize,
        want_iou: bool,
    ) -> Result<(Value, Option<Value>)> {
        let c = self.cfg.prompt_embed_dim as i64;
        let g = self.cfg.grid_size() as i64;
        let pe = self.dense_pe()?;
        self.b.set_scope("prompt_encoder");
        let nme = self.p("prompt_encoder.no_mask_embed.weight")?;
        let dense = self.b.reshape(&nme, &[1, c, 1, 1])?;
        let src = self.b.add(emb, &dense)?;
        let (hs, keys) = self.two_way(&src, &pe, tokens)?;
        let d = "mask_decoder";
        self.b.set_scope(&format!("{d}.output_upscaling"));
        let s = self.b.transpose(&keys, &[0, 2, 1])?;
        let s = self.b.reshape(&s, &[-1, c, g, g])?;
        let w0 = self.p(&format!("{d}.output_upscaling.0.weight"))?;
        let b0 = self.p(&format!("{d}.output_upscaling.0.bias"))?;
        let u = self.b.conv_transpose(&s, &w0, Some(&b0), 2)?;
        let u = self.ln2d(&u, &format!("{d}.output_upscaling.1"))?;
        let u = self.b.gelu_erf(&u)?;
        let w3 = self.p(&format!("{d}.output_upscaling.3.weight"))?;
        let b3 = self.p(&format!("{d}.output_upscaling.3.bias"))?;
        let u = self.b.conv_transpose(&u, &w3, Some(&b3), 2)?;
        let u = self.b.gelu_erf(&u)?; // [N, C/8, 4g, 4g]
        let mut hyper = Vec::new();
        for i in 0..n_masks {
            let pre = format!("{d}.output_hypernetworks_mlps.{i}");
            self.b.set_scope(&pre);
            let t = self.b.select(&hs, 1, 1 + i as i64)?;
            let h = self.mlp(&t, &pre, 3)?;
            hyper.push(self.b.unsqueeze(&h, &[1])?);
        }
        self.b.set_scope(d);
        let refs: Vec<&Value> = hyper.iter().collect();
        let hyper = if refs.len() == 1 {
            refs[0].clone()
        } else {
            self.b.concat(&refs, 1)?
        };
        let uf = self.b.reshape(&u, &[0, c / 8, 16 * g * g])?;
        let m = self.b.matmul(&hyper, &uf)?;
        let masks = self.b.reshape(&m, &[0, n_masks as i64, 4 * g, 4 * g])?;
        let iou = if want_iou {
            let pre = format!("{d}.iou_prediction_head");
            self.b.set_scope(&pre);
            let t = self.b.select(&hs, 1, 0)?;
            Some(self.mlp(&t, &pre, self.cfg.iou_head_depth)?)
        } else {
            None
        };
        Ok((masks, iou))
    }

    fn image_input(&mut self, opts: SamExportOptions) -> Result<(Value, Value)> {
        let s = self.cfg.image_size;
        let dims = [Dim::sym("batch"), 3.into(), s.into(), s.into()];
        let x = self.b.input("image", data_type::FLOAT, &dims)?;
        if !opts.normalize {
            return Ok((x.clone(), x));
        }
        self.b.set_scope("preprocess");
        let x255 = self.b.mul_scalar(&x, 255.0)?;
        let mean = self.b.const_f32(&[1, 3, 1, 1], &self.cfg.pixel_mean)?;
        let std = self.b.const_f32(&[1, 3, 1, 1], &self.cfg.pixel_std)?;
        let y = self.b.sub(&x255, &mean)?;
        let y = self.b.div(&y, &std)?;
        Ok((x, y))
    }

    fn finish(
        mut self,
        graph: &str,
        doc: String,
        opts: Option<SamExportOptions>,
    ) -> Result<(ModelProto, ExportSummary)> {
        let cfg_json = serde_json::to_string(self.cfg).map_err(|e| Error::msg(e.to_string()))?;
        self.b.set_doc(&doc);
        self.b.add_metadata("gps_seg.graph", graph);
        self.b.add_metadata("gps_seg.sam_config", &cfg_json);
        if let Some(o) = opts {
            self.b.add_metadata("gps_seg.input", input_metadata(o));
        }
        let unused: Vec<String> = self
            .wt
            .w
            .keys()
            .filter(|k| !self.wt.used.contains(*k))
            .cloned()
            .collect();
        let unused_count = unused
            .iter()
            .filter_map(|k| self.wt.w.get(k))
            .map(|t| t.elem_count())
            .sum();
        let node_count = self.b.node_count();
        let param_count = self.b.param_count();
        let param_tensors = self.b.params().len();
        let model = self.b.finish(super::OPSET, super::IR_VERSION)?;
        let g = model.graph.as_ref();
        let names = |v: Option<&Vec<super::proto::ValueInfoProto>>| -> Vec<String> {
            v.map(|v| v.iter().map(|i| i.name.clone()).collect())
                .unwrap_or_default()
        };
        let summary = ExportSummary {
            graph: graph.into(),
            inputs: names(g.map(|g| &g.input)),
            outputs: names(g.map(|g| &g.output)),
            node_count,
            param_count,
            param_tensors,
            unused,
            unused_count,
        };
        Ok((model, summary))
    }
}

/// The `gps_seg.input` metadata value an export with `opts` writes.
pub fn input_metadata(opts: SamExportOptions) -> &'static str {
    if opts.normalize {
        "RGB f32 in [0,1]; SAM pixel normalisation is applied in-graph"
    } else {
        "SAM-normalised: (rgb255 - pixel_mean) / pixel_std"
    }
}

fn input_doc(opts: SamExportOptions) -> &'static str {
    if opts.normalize {
        "input `image` is RGB f32 in [0,1] (normalisation in-graph)"
    } else {
        "input `image` is already SAM-normalised ((rgb255 - mean)/std)"
    }
}

/// Image encoder + prompt-free mask decoder + ×4 bilinear upsampling as one graph:
/// `image [N,3,S,S] → mask_logits [N,1,S,S]`.
pub fn export_prompt_free(
    cfg: &SamConfig,
    weights: &TensorMap,
    opts: SamExportOptions,
) -> Result<(ModelProto, ExportSummary)> {
    let mut e = Ex::new("sam_prompt_free", cfg, weights)?;
    let (_, x) = e.image_input(opts)?;
    let emb = e.image_encoder(&x)?;
    let tokens = e.output_tokens(&emb)?;
    let (masks, _) = e.predict_masks(&emb, &tokens, 1, false)?;
    e.b.set_scope("postprocess");
    let up = e.b.resize_linear(&masks, &[1.0, 1.0, 4.0, 4.0])?;
    let s = cfg.image_size;
    e.b.output(
        &up,
        "mask_logits",
        data_type::FLOAT,
        &[Dim::sym("batch"), 1.into(), s.into(), s.into()],
    )?;
    let doc = format!(
        "SAM ({}) prompt-free segmentation exported by gps-seg: image[N,3,{s},{s}] -> mask_logits[N,1,{s},{s}]; {}.",
        cfg.name,
        input_doc(opts)
    );
    e.finish("sam_prompt_free", doc, Some(opts))
}

/// The image encoder alone: `image [N,3,S,S] → image_embeddings [N,C,g,g]`.
pub fn export_image_encoder(
    cfg: &SamConfig,
    weights: &TensorMap,
    opts: SamExportOptions,
) -> Result<(ModelProto, ExportSummary)> {
    let mut e = Ex::new("sam_image_encoder", cfg, weights)?;
    let (_, x) = e.image_input(opts)?;
    let emb = e.image_encoder(&x)?;
    let g = cfg.grid_size();
    e.b.output(
        &emb,
        "image_embeddings",
        data_type::FLOAT,
        &[
            Dim::sym("batch"),
            cfg.prompt_embed_dim.into(),
            g.into(),
            g.into(),
        ],
    )?;
    let doc = format!(
        "SAM ({}) image encoder exported by gps-seg; {}.",
        cfg.name,
        input_doc(opts)
    );
    e.finish("sam_image_encoder", doc, Some(opts))
}

/// The prompted decoder (see the module docs for inputs, outputs and the label convention).
pub fn export_prompted_decoder(
    cfg: &SamConfig,
    weights: &TensorMap,
) -> Result<(ModelProto, ExportSummary)> {
    let mut e = Ex::new("sam_prompted_decoder", cfg, weights)?;
    let g = cfg.grid_size();
    let c = cfg.prompt_embed_dim;
    let nm = cfg.num_multimask_outputs + 1;
    let emb = e.b.input(
        "image_embeddings",
        data_type::FLOAT,
        &[Dim::sym("batch"), c.into(), g.into(), g.into()],
    )?;
    let coords = e.b.input(
        "point_coords",
        data_type::FLOAT,
        &[Dim::sym("batch"), Dim::sym("num_points"), 2.into()],
    )?;
    let labels = e.b.input(
        "point_labels",
        data_type::FLOAT,
        &[Dim::sym("batch"), Dim::sym("num_points")],
    )?;
    let sparse = e.embed_points(&coords, &labels)?;
    let out = e.output_tokens(&emb)?;
    let tokens = e.b.concat(&[&out, &sparse], 1)?;
    let (masks, iou) = e.predict_masks(&emb, &tokens, nm, true)?;
    let iou = iou.ok_or_else(|| Error::Onnx("iou head missing".into()))?;
    e.b.output(
        &masks,
        "masks",
        data_type::FLOAT,
        &[Dim::sym("batch"), nm.into(), (4 * g).into(), (4 * g).into()],
    )?;
    e.b.output(
        &iou,
        "iou_predictions",
        data_type::FLOAT,
        &[Dim::sym("batch"), nm.into()],
    )?;
    let doc = format!(
        "SAM ({}) prompted mask decoder exported by gps-seg: image_embeddings[N,{c},{g},{g}], \
         point_coords[N,P,2] (x,y pixels of the {s}x{s} input), point_labels[N,P] \
         (1 fg, 0 bg, 2/3 box corners, -1 padding; append a (0,0)/-1 padding point when no box) \
         -> masks[N,{nm},{m},{m}] low-res logits (0 = single-mask output, 1.. multimask), \
         iou_predictions[N,{nm}]. No mask input (dense prompt = no_mask_embed).",
        cfg.name,
        s = cfg.image_size,
        m = 4 * g
    );
    e.finish("sam_prompted_decoder", doc, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Meta's SAM ViT-B has 93,735,472 parameters (`sum(p.numel() for p in sam.parameters())`)
    /// plus the 2×128 `positional_encoding_gaussian_matrix` buffer that checkpoints carry.
    #[test]
    fn vit_b_shape_table_matches_meta_count() {
        let n: usize = sam_param_shapes(&SamConfig::vit_b())
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        assert_eq!(n, 93_735_472 + 256);
    }

    #[test]
    fn missing_or_misshaped_weights_are_named() {
        let cfg = SamConfig::tiny();
        let mut w = random_sam_weights(&cfg, 0).unwrap();
        let key = "mask_decoder.iou_token.weight";
        let t = w.remove(key).unwrap();
        let e = export_prompted_decoder(&cfg, &w).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
        w.insert(key.into(), t.reshape((cfg.prompt_embed_dim, 1)).unwrap());
        let e = export_prompted_decoder(&cfg, &w).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("expects"), "{e}");
    }
}
