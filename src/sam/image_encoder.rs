//! SAM's image encoder: a ViT with windowed and global attention, decomposed relative position
//! bias and a convolutional neck (Meta's `segment_anything/modeling/image_encoder.py`).
//!
//! Batched over images; every op has a verified backward (see `shared/notes/candle.md`): the
//! relative position bias is built from `index_select` + batched matmuls, softmax and layer norm
//! are the differentiable versions from [`crate::nn::layers`]. On CPU the whole attention core
//! (scores, bias, softmax, `·v`) is one fused, query-chunked op with its own backward
//! ([`crate::nn::kernels::attention`]; memory linear in tokens), and linears / the
//! patch embedding skip dense weight gradients of frozen and GPS-sparse weights.
//!
//! Precision ([`ImageEncoderViT::precision`], `--dtype`): in bf16/f16 the patch embedding and
//! the blocks compute in that dtype (activations cast once at the input, weights cast where
//! they are used, layer norms and the attention softmax in f32; see [`crate::nn::precision`]);
//! the last block's output is cast back to f32 before the neck, so the neck, the prompt
//! encoder and the mask decoder always run in f32 (the neck is under 1% of ViT-B's encoder
//! FLOPs at 1024 px, and Candle's conv2d has no bf16 CPU kernel).

use super::common::{Activation, MlpBlock, LAYER_NORM_2D_EPS};
use super::config::SamConfig;
use crate::error::{Error, Result};
use crate::nn::kernels::{self, use_fused};
use crate::nn::layers::{
    interp_matrix, matmul_weight_t, softmax_last, Conv2d, LayerNorm, LayerNorm2d, Linear,
};
use crate::nn::precision::{autocast, Precision};
use crate::nn::{Init, Param, ParamStore};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Layer-norm epsilon of the encoder blocks (`partial(nn.LayerNorm, eps=1e-6)` in `build_sam.py`).
pub const ENCODER_LN_EPS: f64 = 1e-6;

/// Length of a relative-position table for a `side`-token axis: `2·side − 1` (0 for 0).
pub fn rel_pos_len(side: usize) -> usize {
    side.saturating_mul(2).saturating_sub(1)
}

/// `get_rel_pos`: relative positional embeddings for every (query, key) pair along one axis.
///
/// `rel_pos: [L, C]` → `[q_size, k_size, C]`. When `L != 2·max(q_size, k_size) − 1` the table
/// is linearly interpolated first, as Meta's `F.interpolate(mode="linear")` does.
pub fn get_rel_pos(q_size: usize, k_size: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let max_rel_dist = rel_pos_len(q_size.max(k_size));
    let (l, c) = rel_pos.dims2()?;
    if l == 0 || c == 0 || q_size == 0 || k_size == 0 {
        return Err(Error::msg(format!(
            "relative-position table of shape {:?} for {q_size} query × {k_size} key \
             positions: every size must be positive",
            rel_pos.dims()
        )));
    }
    let table = if l != max_rel_dist {
        let m = Tensor::from_vec(
            interp_matrix(l, max_rel_dist),
            (max_rel_dist, l),
            rel_pos.device(),
        )?
        .to_dtype(rel_pos.dtype())?;
        m.matmul(rel_pos)?
    } else {
        rel_pos.clone()
    };
    let qs = (k_size as f64 / q_size as f64).max(1.0);
    let ks = (q_size as f64 / k_size as f64).max(1.0);
    let mut idx = Vec::with_capacity(q_size * k_size);
    for i in 0..q_size {
        for j in 0..k_size {
            let r = i as f64 * qs - j as f64 * ks + (k_size as f64 - 1.0) * ks;
            idx.push(r as u32); // `.long()` truncates; r >= 0
        }
    }
    let idx = Tensor::from_vec(idx, q_size * k_size, rel_pos.device())?;
    Ok(table.index_select(&idx, 0)?.reshape((q_size, k_size, c))?)
}

/// The two bias terms of `add_decomposed_rel_pos` from unscaled `q [B, qh·qw, C]` and the
/// tables `rel_pos_h [Lh, C]`, `rel_pos_w [Lw, C]`: (`rel_h [B, qh, qw, kh]`,
/// `rel_w [B, qh, qw, kw]`); the bias of key `(i, j)` is `rel_h[.., i] + rel_w[.., j]`.
/// The einsums `bhwc,hkc->bhwk` / `bhwc,wkc->bhwk` are batched matmuls over the h / w axis.
pub fn rel_pos_terms(
    q: &Tensor,
    rel_pos_h: &Tensor,
    rel_pos_w: &Tensor,
    q_size: (usize, usize),
    k_size: (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let (qh, qw) = q_size;
    let (kh, kw) = k_size;
    let rh = get_rel_pos(qh, kh, rel_pos_h)?; // [qh, kh, C]
    let rw = get_rel_pos(qw, kw, rel_pos_w)?; // [qw, kw, C]
    let (b, _, c) = q.dims3()?;
    let r_q = q.reshape((b, qh, qw, c))?;
    // rel_h[b,h,w,k] = Σ_c r_q[b,h,w,c]·rh[h,k,c]
    let qh_major = r_q
        .permute((1, 0, 2, 3))?
        .contiguous()?
        .reshape((qh, b * qw, c))?;
    let rel_h = qh_major
        .matmul(&rh.transpose(1, 2)?.contiguous()?)? // [qh, b·qw, kh]
        .reshape((qh, b, qw, kh))?
        .permute((1, 0, 2, 3))?; // [b, qh, qw, kh]
                                 // rel_w[b,h,w,k] = Σ_c r_q[b,h,w,c]·rw[w,k,c]
    let qw_major = r_q
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((qw, b * qh, c))?;
    let rel_w = qw_major
        .matmul(&rw.transpose(1, 2)?.contiguous()?)? // [qw, b·qh, kw]
        .reshape((qw, b, qh, kw))?
        .permute((1, 2, 0, 3))?; // [b, qh, qw, kw]
    Ok((rel_h, rel_w))
}

/// `add_decomposed_rel_pos`: `attn [B, qh·qw, kh·kw]` plus the bias from unscaled
/// `q [B, qh·qw, C]` and the tables `rel_pos_h [Lh, C]`, `rel_pos_w [Lw, C]`
/// (see [`rel_pos_terms`]).
pub fn add_decomposed_rel_pos(
    attn: &Tensor,
    q: &Tensor,
    rel_pos_h: &Tensor,
    rel_pos_w: &Tensor,
    q_size: (usize, usize),
    k_size: (usize, usize),
) -> Result<Tensor> {
    let (qh, qw) = q_size;
    let (kh, kw) = k_size;
    let (rel_h, rel_w) = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)?;
    let b = q.dim(0)?;
    let a = attn
        .reshape((b, qh, qw, kh, kw))?
        .broadcast_add(&rel_h.unsqueeze(4)?)?
        .broadcast_add(&rel_w.unsqueeze(3)?)?;
    Ok(a.reshape((b, qh * qw, kh * kw))?)
}

/// `window_partition`: `[B, H, W, C]` → (`[B·nw, ws, ws, C]`, padded `(Hp, Wp)`); zero padding
/// at the bottom/right when `H` or `W` is not a multiple of `ws`.
/// On CPU (outside reference mode) one fused op ([`kernels::window`]).
pub fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    if use_fused(x) {
        return Ok(kernels::window::partition(x, ws)?);
    }
    let (b, h, w, c) = x.dims4()?;
    let pad_h = (ws - h % ws) % ws;
    let pad_w = (ws - w % ws) % ws;
    let mut x = x.clone();
    if pad_h > 0 {
        x = x.pad_with_zeros(1, 0, pad_h)?;
    }
    if pad_w > 0 {
        x = x.pad_with_zeros(2, 0, pad_w)?;
    }
    let (hp, wp) = (h + pad_h, w + pad_w);
    let x = x
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((x, (hp, wp)))
}

/// `window_unpartition`: inverse of [`window_partition`], cropping the padding:
/// `[B·nw, ws, ws, C]` → `[B, H, W, C]`. On CPU (outside reference mode) one fused op.
pub fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    pad_hw: (usize, usize),
    hw: (usize, usize),
) -> Result<Tensor> {
    if use_fused(windows) {
        return Ok(kernels::window::unpartition(windows, ws, pad_hw, hw)?);
    }
    let (hp, wp) = pad_hw;
    let (h, w) = hw;
    let (n, _, _, c) = windows.dims4()?;
    let b = n / (hp * wp / ws / ws);
    let mut x = windows
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, hp, wp, c))?;
    if hp > h {
        x = x.narrow(1, 0, h)?;
    }
    if wp > w {
        x = x.narrow(2, 0, w)?;
    }
    Ok(x.contiguous()?)
}

/// Multi-head attention with decomposed relative position bias (`image_encoder.Attention`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub rel_pos_h: Param,
    pub rel_pos_w: Param,
    pub num_heads: usize,
    pub scale: f64,
}

impl Attention {
    /// `input_size`: the token grid this attention sees (window, or whole grid for global).
    pub fn new(
        vs: &ParamStore,
        dim: usize,
        num_heads: usize,
        input_size: (usize, usize),
    ) -> Result<Self> {
        if num_heads == 0 || dim == 0 || input_size.0 == 0 || input_size.1 == 0 {
            return Err(Error::msg(format!(
                "attention: width {dim}, {num_heads} heads and token grid {input_size:?} \
                 must all be positive"
            )));
        }
        let head_dim = dim / num_heads;
        Ok(Attention {
            qkv: Linear::new(&vs.pp("qkv"), dim, dim * 3, true)?,
            proj: Linear::new(&vs.pp("proj"), dim, dim, true)?,
            rel_pos_h: vs.get(
                &[rel_pos_len(input_size.0), head_dim],
                "rel_pos_h",
                Init::TruncNormal(0.02),
            )?,
            rel_pos_w: vs.get(
                &[rel_pos_len(input_size.1), head_dim],
                "rel_pos_w",
                Init::TruncNormal(0.02),
            )?,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x: [B, H, W, dim] → [B, H, W, dim]` (the rel-pos tables follow `x`'s dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = rel_pos_attention(
            &self.qkv.forward(x)?,
            &autocast(self.rel_pos_h.tensor()?, x.dtype())?,
            &autocast(self.rel_pos_w.tensor()?, x.dtype())?,
            self.num_heads,
            self.scale,
        )?;
        self.proj.forward(&out)
    }
}

/// The attention core of [`Attention`] between the `qkv` and `proj` linears:
/// `qkv: [B, H, W, 3·dim]` → `[B, H, W, dim]` (softmax(q·kᵀ·scale + rel-pos bias)·v per head).
/// Where [`use_fused`] (CPU, f32/f64, not the reference path) the fused, query-chunked kernel
/// ([`kernels::attention::decomposed_attention`]), else Meta's composed ops
/// ([`add_decomposed_rel_pos`], softmax, matmuls), which the tests compare it against.
pub fn rel_pos_attention(
    qkv: &Tensor,
    rel_pos_h: &Tensor,
    rel_pos_w: &Tensor,
    num_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, w, d3) = qkv.dims4()?;
    if use_fused(qkv) {
        // One fused, query-chunked op: no [B·heads, N, N] tensor is kept.
        let rh = get_rel_pos(h, h, rel_pos_h)?;
        let rw = get_rel_pos(w, w, rel_pos_w)?;
        return kernels::attention::decomposed_attention(qkv, &rh, &rw, num_heads, scale, None);
    }
    let dim = d3 / 3;
    let nh = num_heads;
    let hd = dim / nh;
    let qkv = qkv
        .reshape((b, h * w, 3, nh, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?
        .reshape((3, b * nh, h * w, hd))?;
    let q = qkv.get(0)?;
    let k = qkv.get(1)?;
    let v = qkv.get(2)?;
    let attn = (&q * scale)?.matmul(&k.t()?)?;
    let attn = add_decomposed_rel_pos(&attn, &q, rel_pos_h, rel_pos_w, (h, w), (h, w))?;
    let attn = softmax_last(&attn)?;
    Ok(attn
        .matmul(&v)?
        .reshape((b, nh, h, w, hd))?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((b, h, w, dim))?)
}

/// Transformer block with windowed (`window_size > 0`) or global attention (`image_encoder.Block`).
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub window_size: usize,
}

impl Block {
    pub fn new(
        vs: &ParamStore,
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        window_size: usize,
        input_size: (usize, usize),
    ) -> Result<Self> {
        let attn_size = if window_size == 0 {
            input_size
        } else {
            (window_size, window_size)
        };
        Ok(Block {
            norm1: LayerNorm::new(&vs.pp("norm1"), dim, ENCODER_LN_EPS)?,
            attn: Attention::new(&vs.pp("attn"), dim, num_heads, attn_size)?,
            norm2: LayerNorm::new(&vs.pp("norm2"), dim, ENCODER_LN_EPS)?,
            mlp: MlpBlock::new(&vs.pp("mlp"), dim, mlp_dim, Activation::Gelu)?,
            window_size,
        })
    }

    /// `x: [B, H, W, dim] → [B, H, W, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = x;
        let mut y = self.norm1.forward(x)?;
        let (_, h, w, _) = y.dims4()?;
        if self.window_size > 0 {
            let (win, pad_hw) = window_partition(&y, self.window_size)?;
            let a = self.attn.forward(&win)?;
            y = window_unpartition(&a, self.window_size, pad_hw, (h, w))?;
        } else {
            y = self.attn.forward(&y)?;
        }
        let x = (shortcut + y)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((x + m)?)
    }
}

/// The neck: conv1×1 (no bias) → LayerNorm2d → conv3×3 (no bias) → LayerNorm2d
/// (`neck.0`, `neck.1`, `neck.2`, `neck.3`).
#[derive(Debug, Clone)]
pub struct Neck {
    pub conv1: Conv2d,
    pub ln1: LayerNorm2d,
    pub conv2: Conv2d,
    pub ln2: LayerNorm2d,
}

impl Neck {
    /// `[B, dim, g, g] → [B, C, g, g]`, as Meta's `nn.Sequential` (the reference path).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln1.forward(&self.conv1.forward(x)?)?;
        self.ln2.forward(&self.conv2.forward(&x)?)
    }

    /// The same on the blocks' channels-last output: `[B, g, g, dim] → [B, C, g, g]`. The
    /// 1×1 conv is a matmul, each `LayerNorm2d` a last-dim layer norm, and the only layout
    /// change is the final one to NCHW (the NCHW form permuted in and out of every conv and
    /// reduced over a strided channel axis: ≈ a fifth of a tiny@256 forward).
    pub fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .ln1
            .forward_channels_last(&self.conv1.forward_channels_last(x)?)?;
        let x = self
            .ln2
            .forward_channels_last(&self.conv2.forward_channels_last(&x)?)?;
        Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// `ImageEncoderViT` with the settings of `build_sam.py` (qkv bias, rel-pos, abs pos).
#[derive(Debug, Clone)]
pub struct ImageEncoderViT {
    /// `patch_embed.proj`: conv, kernel = stride = patch size.
    pub patch_embed: Conv2d,
    /// `pos_embed`: `[1, g, g, dim]`.
    pub pos_embed: Param,
    pub blocks: Vec<Block>,
    pub neck: Neck,
    pub img_size: usize,
    /// The config built from, for the memory check of a batch ([`SamConfig::check_memory`]).
    pub config: SamConfig,
    /// Compute dtype of the patch embedding and the blocks (master weights stay f32).
    pub precision: Precision,
}

impl ImageEncoderViT {
    pub fn new(cfg: &SamConfig, vs: &ParamStore) -> Result<Self> {
        let d = cfg.encoder_embed_dim;
        let g = cfg.grid_size();
        let p = cfg.patch_size;
        let patch_embed = Conv2d::new(&vs.pp("patch_embed").pp("proj"), 3, d, p, p, 0, 1, true)?;
        let pos_embed = vs.get(&[1, g, g, d], "pos_embed", Init::TruncNormal(0.02))?;
        let mlp_dim = cfg.mlp_dim();
        let blocks = (0..cfg.encoder_depth)
            .map(|i| {
                let ws = if cfg.encoder_global_attn_indexes.contains(&i) {
                    0
                } else {
                    cfg.window_size
                };
                Block::new(
                    &vs.pp("blocks").pp(i),
                    d,
                    cfg.encoder_num_heads,
                    mlp_dim,
                    ws,
                    (g, g),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let c = cfg.prompt_embed_dim;
        let n = vs.pp("neck");
        let neck = Neck {
            conv1: Conv2d::new(&n.pp(0), d, c, 1, 1, 0, 1, false)?,
            ln1: LayerNorm2d::new(&n.pp(1), c, LAYER_NORM_2D_EPS)?,
            conv2: Conv2d::new(&n.pp(2), c, c, 3, 1, 1, 1, false)?,
            ln2: LayerNorm2d::new(&n.pp(3), c, LAYER_NORM_2D_EPS)?,
        };
        Ok(ImageEncoderViT {
            patch_embed,
            pos_embed,
            blocks,
            neck,
            img_size: cfg.image_size,
            config: cfg.clone(),
            precision: Precision::F32,
        })
    }

    /// Patch embedding plus absolute positions: `[B, 3, S, S] → [B, g, g, dim]`.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h != self.img_size || w != self.img_size {
            return Err(Error::msg(format!(
                "image encoder expects [B, 3, {s}, {s}] input, got {:?}",
                x.dims(),
                s = self.img_size
            )));
        }
        // kernel = stride, no padding: the conv is a matmul over non-overlapping patches,
        // which is much faster than Candle's conv2d in backward (its weight gradient is a
        // dilated convolution). It goes through the linear layers' weight-gradient routing:
        // a frozen or GPS-sparse kernel skips its dense gradient.
        let (d, _, p, _) = match self.patch_embed.weight.dims() {
            &[d, c, p, q] => (d, c, p, q),
            other => {
                return Err(Error::msg(format!(
                    "patch_embed.proj.weight: expected 4 dims, got {other:?}"
                )))
            }
        };
        let b = x.dim(0)?;
        if p == 0 || h % p != 0 {
            return Err(Error::msg(format!(
                "patch_embed.proj.weight: patch size {p} does not divide the input side {h}"
            )));
        }
        if b > 1 && x.device().is_cpu() {
            self.config.check_memory(b, false)?;
        }
        let g = h / p;
        // Autocast: the activations enter the compute dtype here.
        let x = if self.precision.is_low() {
            x.to_dtype(self.precision.dtype())?
        } else {
            x.clone()
        };
        let patches = x
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, 3 * p * p))?;
        let y = matmul_weight_t(
            &patches,
            &self.patch_embed.weight,
            self.patch_embed.bias.as_ref(),
        )?;
        let x = y.reshape((b, g, g, d))?;
        Ok(x.broadcast_add(&autocast(self.pos_embed.tensor()?, x.dtype())?)?)
    }

    /// Neck on block output: `[B, g, g, dim] → [B, C, g, g]`, always f32 (a bf16/f16 block
    /// output is cast back first).
    pub fn neck_forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if crate::nn::precision::is_low(x.dtype()) {
            x.to_dtype(candle_core::DType::F32)?
        } else {
            x.clone()
        };
        if kernels::reference_path() || !x.device().is_cpu() {
            return self.neck.forward(&x.permute((0, 3, 1, 2))?.contiguous()?);
        }
        self.neck.forward_channels_last(&x)
    }

    /// Normalised images `[B, 3, S, S]` → image embeddings `[B, C, g, g]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(x)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        self.neck_forward(&x)
    }

    /// Inference forward: like [`forward`](Self::forward) (the same ops, the same values) but
    /// each block's output is detached, so no block's activations outlive it even when the
    /// weights are vars or GPS deltas (evaluation during training).
    pub fn forward_detached(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.embed(x)?.detach();
        for blk in &self.blocks {
            h = blk.forward(&h)?.detach();
        }
        Ok(self.neck_forward(&h)?.detach())
    }

    /// Forward without keeping the autograd graph (activation checkpointing by hand): only
    /// the input of every block and of the neck is kept. Returns the embeddings `[B, C, g, g]`
    /// (detached) and those block-boundary activations for
    /// [`backward_checkpointed`](Self::backward_checkpointed).
    pub fn forward_checkpointed(&self, x: &Tensor) -> Result<(Tensor, EncoderCheckpoints)> {
        let mut h = self.embed(x)?.detach();
        let mut acts = Vec::with_capacity(self.blocks.len() + 1);
        for blk in &self.blocks {
            acts.push(h.clone());
            h = blk.forward(&h)?.detach();
        }
        acts.push(h.clone());
        let emb = self.neck_forward(&h)?.detach();
        Ok((emb, EncoderCheckpoints { acts }))
    }

    /// Backward through the encoder by recomputing one block at a time from the kept
    /// activations: `x` the same input as the forward, `upstream` = dL/d(embeddings)
    /// `[B, C, g, g]`. Returns the gradients of the encoder's trainable vars (as
    /// `loss.backward()` would), to be merged with the decoder's by `GradStore::extend`.
    /// Peak memory is one block's graph instead of the whole encoder's.
    pub fn backward_checkpointed(
        &self,
        x: &Tensor,
        ckpt: &EncoderCheckpoints,
        upstream: &Tensor,
    ) -> Result<GradStore> {
        let n = self.blocks.len();
        if ckpt.acts.len() != n + 1 {
            return Err(Error::msg(format!(
                "checkpointed backward: {} activations for {n} blocks",
                ckpt.acts.len()
            )));
        }
        let seg = |input: &Tensor,
                   f: &dyn Fn(&Tensor) -> Result<Tensor>,
                   g: &Tensor|
         -> Result<(GradStore, Tensor)> {
            let v = Var::from_tensor(input)?;
            let y = f(v.as_tensor())?;
            let mut grads = crate::nn::backward_vars(&(y * g)?.sum_all()?)?;
            let gin = grads.remove(v.as_tensor()).ok_or_else(|| {
                Error::msg("checkpointed backward: no gradient reached a block input")
            })?;
            Ok((grads, gin))
        };
        let (mut grads, mut g) = seg(&ckpt.acts[n], &|h| self.neck_forward(h), upstream)?;
        for i in (0..n).rev() {
            let (gi, gin) = seg(&ckpt.acts[i], &|h| self.blocks[i].forward(h), &g)?;
            grads.extend(gi)?;
            g = gin;
        }
        let y = self.embed(x)?;
        grads.extend(crate::nn::backward_vars(&(y * g)?.sum_all()?)?)?;
        Ok(grads)
    }
}

/// Block-boundary activations kept by [`ImageEncoderViT::forward_checkpointed`]: the input of
/// each block and of the neck, `[B, g, g, dim]` each, detached.
#[derive(Debug, Clone)]
pub struct EncoderCheckpoints {
    pub acts: Vec<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck;
    use candle_core::{Device, IndexOp};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::randn(shape, seed, candle_core::DType::F64).unwrap()
    }

    #[test]
    fn window_partition_round_trips_with_padding_and_matches_naive() {
        let x = rand(&[2, 5, 7, 3], 1);
        let (win, pad) = window_partition(&x, 4).unwrap();
        assert_eq!(pad, (8, 8));
        assert_eq!(win.dims(), &[2 * 2 * 2, 4, 4, 3]);
        // Window (b=1, wy=1, wx=0) entry (r, c) is x[1, 4 + r, c] (or zero padding).
        let w = win.i(4 + 2).unwrap();
        for r in 0..4 {
            for c in 0..4 {
                let got = w.i((r, c)).unwrap().to_vec1::<f64>().unwrap();
                let want = if 4 + r < 5 {
                    x.i((1, 4 + r, c)).unwrap().to_vec1::<f64>().unwrap()
                } else {
                    vec![0.0; 3]
                };
                assert_eq!(got, want);
            }
        }
        let back = window_unpartition(&win, 4, pad, (5, 7)).unwrap();
        let d = (back - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
    }

    /// The fused ops (`nn::kernels::window`) equal Candle's composed ops bit for bit, values and
    /// gradients, with and without padding; a geometry that does not tile is refused.
    #[test]
    fn fused_window_ops_equal_the_composed_ones() {
        use crate::nn::kernels::with_reference_path;
        for (h, w, ws) in [(5, 7, 4), (8, 8, 4), (3, 3, 4)] {
            let x = candle_core::Var::from_tensor(&rand(&[2, h, w, 3], 3)).unwrap();
            let proj = rand(&[2, h, w, 3], 4);
            let run = || {
                let (win, pad) = window_partition(x.as_tensor(), ws).unwrap();
                let y = window_unpartition(&(win.sqr().unwrap() * 0.5).unwrap(), ws, pad, (h, w))
                    .unwrap();
                let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
                (win, y, g.get(x.as_tensor()).unwrap().clone())
            };
            let (wf, yf, gf) = run();
            let (wr, yr, gr) = with_reference_path(run);
            for (a, b) in [(&wf, &wr), (&yf, &yr), (&gf, &gr)] {
                assert_eq!(a.dims(), b.dims());
                let d = gradcheck::max_abs_diff(a, b).unwrap();
                assert_eq!(d, 0.0, "{h}x{w} ws {ws}");
            }
        }
        let win = rand(&[3, 4, 4, 2], 5);
        let err = window_unpartition(&win, 4, (8, 8), (5, 7)).unwrap_err();
        assert!(err.to_string().contains("do not tile"), "{err}");
    }

    #[test]
    fn window_partition_gradients_match_finite_differences() {
        let x = rand(&[2, 5, 7, 3], 2);
        let e = gradcheck::check(&x, 30, 0, |x| {
            let (w, pad) = window_partition(x, 4)?;
            // A non-linear use of the windows so that every position matters differently.
            let w = (w.sqr()? * 0.5)?;
            window_unpartition(&w, 4, pad, (5, 7))
        })
        .unwrap();
        assert!(e < 1e-6, "{e}");
    }

    /// Direct loops over Meta's definition of get_rel_pos + add_decomposed_rel_pos.
    fn naive_rel_pos(
        attn: &[f64],
        q: &[f64],
        rh: &[f64],
        rw: &[f64],
        b: usize,
        s: usize,
        c: usize,
    ) -> Vec<f64> {
        let l = 2 * s - 1;
        assert_eq!(rh.len(), l * c);
        let mut out = attn.to_vec();
        for bi in 0..b {
            for h in 0..s {
                for w in 0..s {
                    for kh in 0..s {
                        for kw in 0..s {
                            let qi = bi * s * s * c + (h * s + w) * c;
                            let ih = (h + s - 1 - kh) * c;
                            let iw = (w + s - 1 - kw) * c;
                            let mut acc = 0.0;
                            for ci in 0..c {
                                acc += q[qi + ci] * (rh[ih + ci] + rw[iw + ci]);
                            }
                            out[bi * s * s * s * s + (h * s + w) * s * s + kh * s + kw] += acc;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rel_pos_bias_matches_naive_loops() {
        let (b, s, c) = (3, 4, 5);
        let attn = rand(&[b, s * s, s * s], 3);
        let q = rand(&[b, s * s, c], 4);
        let rh = rand(&[2 * s - 1, c], 5);
        let rw = rand(&[2 * s - 1, c], 6);
        let got = add_decomposed_rel_pos(&attn, &q, &rh, &rw, (s, s), (s, s))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want = naive_rel_pos(&f(&attn), &f(&q), &f(&rh), &f(&rw), b, s, c);
        for (a, w) in got.iter().zip(&want) {
            assert!((a - w).abs() < 1e-10, "{a} vs {w}");
        }
    }

    #[test]
    fn get_rel_pos_interpolates_like_torch_linear() {
        // Table of length 3 for a size-4 axis (needs 7): resized with F.interpolate(size=7,
        // mode="linear", align_corners=False) of [0, 1, 2] = [0, 1/7, 4/7, 1, 10/7, 13/7, 2]

        let t = Tensor::new(&[[0f32], [1.], [2.]], &Device::Cpu).unwrap();
        let r = get_rel_pos(4, 4, &t).unwrap(); // [4, 4, 1]
        let want_table = [0.0, 1.0 / 7.0, 4.0 / 7.0, 1.0, 10.0 / 7.0, 13.0 / 7.0, 2.0];
        let r = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..4 {
            for j in 0..4 {
                let w = want_table[i + 3 - j];
                assert!(
                    (r[i * 4 + j] - w).abs() < 1e-6,
                    "({i},{j}) {} vs {w}",
                    r[i * 4 + j]
                );
            }
        }
    }

    #[test]
    fn rel_pos_bias_gradients_match_finite_differences() {
        let (b, s, c) = (2, 3, 4);
        let attn = rand(&[b, s * s, s * s], 7);
        let q = rand(&[b, s * s, c], 8);
        let rh = rand(&[2 * s - 1, c], 9);
        let rw = rand(&[2 * s - 1, c], 10);
        let e = gradcheck::check(&q, 30, 0, |q| {
            add_decomposed_rel_pos(&attn, q, &rh, &rw, (s, s), (s, s))
        })
        .unwrap();
        assert!(e < 1e-6, "wrt q: {e}");
        let e = gradcheck::check(&rh, 30, 1, |rh| {
            add_decomposed_rel_pos(&attn, &q, rh, &rw, (s, s), (s, s))
        })
        .unwrap();
        assert!(e < 1e-6, "wrt rel_pos_h: {e}");
        let e = gradcheck::check(&rw, 30, 2, |rw| {
            add_decomposed_rel_pos(&attn, &q, &rh, rw, (s, s), (s, s))
        })
        .unwrap();
        assert!(e < 1e-6, "wrt rel_pos_w: {e}");
        // Through the interpolation path (table shorter than 2s-1).
        let short = rand(&[3, c], 11);
        let e = gradcheck::check(&short, 20, 3, |t| {
            add_decomposed_rel_pos(&attn, &q, t, &rw, (s, s), (s, s))
        })
        .unwrap();
        assert!(e < 1e-6, "wrt resized table: {e}");
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        let (b, h, w, dim, nh) = (2, 3, 3, 8, 2);
        let qkv = rand(&[b, h, w, 3 * dim], 12);
        let rh = (rand(&[2 * h - 1, dim / nh], 13) * 0.5).unwrap();
        let rw = (rand(&[2 * w - 1, dim / nh], 14) * 0.5).unwrap();
        let scale = 0.5;
        let e =
            gradcheck::check(&qkv, 40, 0, |x| rel_pos_attention(x, &rh, &rw, nh, scale)).unwrap();
        assert!(e < 1e-6, "wrt qkv: {e}");
        let e =
            gradcheck::check(&rh, 20, 1, |t| rel_pos_attention(&qkv, t, &rw, nh, scale)).unwrap();
        assert!(e < 1e-6, "wrt rel_pos_h: {e}");
    }
}

/// The fused attention kernel ([`kernels::attention::decomposed_attention`]) on SAM's tables
/// against the composed path of [`rel_pos_attention`] and finite differences.
#[cfg(test)]
mod fused_attention {
    use super::{get_rel_pos, rel_pos_attention as composed};
    use crate::nn::gradcheck::{self, max_abs_diff, randn, rel_err_floor};
    use crate::nn::kernels::attention::decomposed_attention;
    use crate::nn::kernels::with_reference_path;
    use candle_core::{DType, Tensor, Var};

    /// (qkv, rel_pos_h, rel_pos_w) for a `gh × gw` grid.
    fn inputs(b: usize, gh: usize, gw: usize, heads: usize, hd: usize, dt: DType) -> [Tensor; 3] {
        [
            randn(&[b, gh, gw, 3 * heads * hd], 1, dt).unwrap(),
            (randn(&[2 * gh - 1, hd], 2, dt).unwrap() * 0.5).unwrap(),
            (randn(&[2 * gw - 1, hd], 3, dt).unwrap() * 0.5).unwrap(),
        ]
    }

    fn fused(x: &[Tensor; 3], heads: usize, chunk: Option<usize>) -> Tensor {
        let (_, gh, gw, d3) = x[0].dims4().unwrap();
        let hd = d3 / 3 / heads;
        let scale = (hd as f64).powf(-0.5);
        let rh = get_rel_pos(gh, gh, &x[1]).unwrap();
        let rw = get_rel_pos(gw, gw, &x[2]).unwrap();
        decomposed_attention(&x[0], &rh, &rw, heads, scale, chunk).unwrap()
    }

    /// Outputs and gradients (w.r.t. qkv and both tables) of the fused op equal the composed
    /// reference path (`add_decomposed_rel_pos` + softmax + matmuls) — across chunk sizes that
    /// do and do not divide the token count, a non-square grid and a batch of 2.
    #[test]
    fn matches_the_composed_path_in_outputs_and_gradients() {
        let (b, gh, gw, heads, hd) = (2, 5, 7, 3, 8);
        let x = inputs(b, gh, gw, heads, hd, DType::F32);
        let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let vx = [
            vars[0].as_tensor().clone(),
            vars[1].as_tensor().clone(),
            vars[2].as_tensor().clone(),
        ];
        let w = randn(&[b, gh, gw, heads * hd], 9, DType::F32).unwrap();
        let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
        let scale = (hd as f64).powf(-0.5);
        let reference =
            with_reference_path(|| composed(&vx[0], &vx[1], &vx[2], heads, scale).unwrap());
        let gr = loss(&reference).backward().unwrap();
        for chunk in [Some(1), Some(4), Some(35), None] {
            let y = fused(&vx, heads, chunk);
            assert_eq!(y.dims(), reference.dims());
            let e = max_abs_diff(&y, &reference).unwrap();
            assert!(e < 1e-5, "chunk {chunk:?}: output differs by {e}");
            let gf = loss(&y).backward().unwrap();
            for (i, v) in vars.iter().enumerate() {
                let a = gf.get(v.as_tensor()).unwrap();
                let r = gr.get(v.as_tensor()).unwrap();
                // |a − r| < 1e-5 · max(max|r|, 1)
                let e = rel_err_floor(a, r, 1.0).unwrap();
                assert!(
                    e < 1e-5,
                    "chunk {chunk:?}: gradient of input {i} differs by {e} (relative)"
                );
            }
        }
    }

    /// Finite differences in f64 through the whole op, with three chunks per head.
    #[test]
    fn gradients_match_finite_differences() {
        let (gh, gw, heads, hd) = (3, 4, 2, 4);
        let x = inputs(1, gh, gw, heads, hd, DType::F64);
        for i in 0..3 {
            let err = gradcheck::check(&x[i], 12, 7 + i as u64, |t| {
                let mut inp = x.clone();
                inp[i] = t.clone();
                Ok(fused(&inp, heads, Some(5)))
            })
            .unwrap();
            assert!(err < 1e-6, "input {i}: relative error {err}");
        }
    }
}
