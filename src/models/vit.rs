//! Vision Transformer classifier, a port of timm's `VisionTransformer`
//! (`timm/models/vision_transformer.py`; Dosovitskiy et al., "An Image is Worth 16x16 Words",
//! ICLR 2021) restricted to what the ImageNet-21k ViT-B/16 uses: conv patch embedding, a class
//! token, learned absolute position embeddings, pre-norm blocks (`x + attn(norm1(x))`,
//! `x + mlp(norm2(x))`), a final LayerNorm, class-token pooling and a linear head.
//!
//! Tensor names are timm's checkpoint keys (`patch_embed.proj.weight`, `cls_token`,
//! `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`).
//! Hugging Face `transformers` checkpoints are renamed by [`super::names`] inside
//! [`adapt_checkpoint`], which also resizes `pos_embed` and re-initialises a head of another
//! size. All ops used have a verified backward (no fused layer norm or softmax).

use super::common::{adapt_head, normalize_with, LoadReport, HALF};
use super::names;
use crate::error::{Error, Result};
use crate::nn::layers::{gelu, resize_bilinear, softmax_last};
use crate::nn::{Conv2d, Init, LayerNorm, Linear, Param, ParamStore};
use crate::util::tensors::TensorMap;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Largest accepted `image_size` (ViT and ConvNeXt).
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Largest accepted `patch_size`.
pub const MAX_PATCH: usize = 64;
/// Largest accepted patch count (ViT-B/16 at 2048 px).
pub const MAX_TOKENS: usize = 16384;
/// Largest accepted token / stage width.
pub const MAX_WIDTH: usize = 4096;
/// Largest accepted head count.
pub const MAX_HEADS: usize = 64;
/// Largest accepted block count.
pub const MAX_DEPTH: usize = 64;
/// Largest accepted MLP hidden width.
pub const MAX_MLP_DIM: usize = 16384;
/// Largest accepted number of classes (ImageNet-21k has 21 843).
pub const MAX_CLASSES: usize = 100_000;

/// Every number that differs between ViT sizes; names follow timm's constructor arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Preset name this config came from (informational).
    pub name: String,
    /// Input side length in pixels (`image_size × image_size`).
    pub image_size: usize,
    /// Patch side length (the patch-embedding conv's kernel and stride).
    pub patch_size: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Hidden width of each block's MLP.
    pub mlp_dim: usize,
    /// Whether the fused qkv projection has a bias (timm default: true).
    pub qkv_bias: bool,
    /// LayerNorm epsilon (timm ViT: 1e-6).
    pub layer_norm_eps: f64,
    /// Output classes of the head.
    pub num_classes: usize,
    /// Per-channel mean on `[0, 1]` input (RGB).
    pub mean: [f32; 3],
    /// Per-channel std on `[0, 1]` input (RGB).
    pub std: [f32; 3],
}

impl VitConfig {
    /// ViT-B/16 in the ImageNet-21k layout (timm `vit_base_patch16_224.augreg_in21k`, HF
    /// `google/vit-base-patch16-224-in21k`): 224 px, patch 16, width 768, 12 blocks of 12
    /// heads, MLP 3072, mean = std = 0.5. `num_classes` defaults to 1000; set it with
    /// [`with_num_classes`](Self::with_num_classes).
    pub fn vit_b16() -> Self {
        VitConfig {
            name: "vit_b16".into(),
            image_size: 224,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_dim: 3072,
            qkv_bias: true,
            layer_norm_eps: 1e-6,
            num_classes: 1000,
            mean: HALF,
            std: HALF,
        }
    }

    /// A small ViT for CPU work (not timm's `vit_tiny`): 64 px input, patch 8 (8×8 = 64
    /// tokens + class token), width 192, 6 blocks of 3 heads, MLP 768 — 2.72 M
    /// parameters with 10 classes, roughly 0.35 GFLOP per image forward. Same normalisation as ViT-B/16.
    pub fn tiny() -> Self {
        VitConfig {
            name: "vit_tiny_cpu".into(),
            image_size: 64,
            patch_size: 8,
            embed_dim: 192,
            depth: 6,
            num_heads: 3,
            mlp_dim: 768,
            ..Self::vit_b16()
        }
    }

    /// Names accepted by [`VitConfig::preset`].
    pub const PRESETS: [&'static str; 2] = ["vit_b16", "vit_tiny_cpu"];

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "vit_b16" => Ok(Self::vit_b16()),
            "vit_tiny_cpu" | "tiny" => Ok(Self::tiny()),
            other => Err(Error::Config {
                field: "model".into(),
                msg: format!(
                    "unknown ViT preset `{other}` (expected one of {})",
                    Self::PRESETS.join(", ")
                ),
            }),
        }
    }

    /// The same config with another number of classes.
    pub fn with_num_classes(mut self, n: usize) -> Self {
        self.num_classes = n;
        self
    }

    /// The same config at another input size (`pos_embed` is resized at load).
    pub fn with_image_size(mut self, image_size: usize) -> Self {
        self.image_size = image_size;
        self
    }

    /// Side of the patch grid (`image_size / patch_size`).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Tokens per image including the class token.
    pub fn num_tokens(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }

    /// Check internal consistency and bounds; errors name the field. Bounds are what real
    /// ViTs reach with room above (ViT-H/14: width 1280, 32 blocks, 16 heads, MLP 5120;
    /// ImageNet-21k: 21 843 classes), and at most [`MAX_TOKENS`] patches (global attention
    /// is quadratic in them).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                field: field.into(),
                msg,
            })
        };
        use crate::error::check::range;
        range("patch_size", self.patch_size, 1, MAX_PATCH)?;
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
                    "{} is not a positive multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
            );
        }
        let g = self.grid_size();
        if g.saturating_mul(g) > MAX_TOKENS {
            return bad(
                "image_size",
                format!(
                    "{} px in patches of {} is a {g}×{g} grid; at most {MAX_TOKENS} patches",
                    self.image_size, self.patch_size
                ),
            );
        }
        range("embed_dim", self.embed_dim, 1, MAX_WIDTH)?;
        range("num_heads", self.num_heads, 1, MAX_HEADS)?;
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(
                "num_heads",
                format!(
                    "{} does not divide embed_dim {}",
                    self.num_heads, self.embed_dim
                ),
            );
        }
        range("depth", self.depth, 1, MAX_DEPTH)?;
        range("mlp_dim", self.mlp_dim, 1, MAX_MLP_DIM)?;
        range("num_classes", self.num_classes, 1, MAX_CLASSES)?;
        crate::error::check::positive_finite("layer_norm_eps", self.layer_norm_eps)?;
        crate::error::check::norm_stats(&self.mean, &self.std)
    }

    /// Bytes a forward pass of `batch` images needs, roughly (saturating): the f32
    /// parameters plus one block's activations per image (tokens × (7 × width + MLP)) and
    /// one head's attention scores. Checked before a model is built on the CPU.
    pub fn estimate_bytes(&self, batch: usize) -> u64 {
        let u = |v: usize| v as u64;
        let params = self
            .param_shapes()
            .iter()
            .map(|(_, s)| s.iter().fold(1u64, |p, &d| p.saturating_mul(u(d))))
            .fold(0u64, u64::saturating_add);
        let t = u(self.num_tokens());
        let block = t.saturating_mul(
            u(self.embed_dim)
                .saturating_mul(7)
                .saturating_add(u(self.mlp_dim)),
        );
        let scores = t.saturating_mul(t).saturating_mul(u(self.num_heads));
        let image = u(self.image_size)
            .saturating_mul(u(self.image_size))
            .saturating_mul(6);
        let per_image = block.saturating_add(scores).saturating_add(image);
        params
            .saturating_add(per_image.saturating_mul(u(batch.max(1))))
            .saturating_mul(4)
    }

    /// Every parameter's timm name and shape, in construction order, without allocating.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.embed_dim;
        let p = self.patch_size;
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("patch_embed.proj.weight".into(), vec![d, 3, p, p]),
            ("patch_embed.proj.bias".into(), vec![d]),
            ("cls_token".into(), vec![1, 1, d]),
            ("pos_embed".into(), vec![1, self.num_tokens(), d]),
        ];
        for i in 0..self.depth {
            let b = format!("blocks.{i}");
            v.push((format!("{b}.norm1.weight"), vec![d]));
            v.push((format!("{b}.norm1.bias"), vec![d]));
            v.push((format!("{b}.attn.qkv.weight"), vec![3 * d, d]));
            if self.qkv_bias {
                v.push((format!("{b}.attn.qkv.bias"), vec![3 * d]));
            }
            v.push((format!("{b}.attn.proj.weight"), vec![d, d]));
            v.push((format!("{b}.attn.proj.bias"), vec![d]));
            v.push((format!("{b}.norm2.weight"), vec![d]));
            v.push((format!("{b}.norm2.bias"), vec![d]));
            v.push((format!("{b}.mlp.fc1.weight"), vec![self.mlp_dim, d]));
            v.push((format!("{b}.mlp.fc1.bias"), vec![self.mlp_dim]));
            v.push((format!("{b}.mlp.fc2.weight"), vec![d, self.mlp_dim]));
            v.push((format!("{b}.mlp.fc2.bias"), vec![d]));
        }
        v.push(("norm.weight".into(), vec![d]));
        v.push(("norm.bias".into(), vec![d]));
        v.push(("head.weight".into(), vec![self.num_classes, d]));
        v.push(("head.bias".into(), vec![self.num_classes]));
        v
    }
}

/// timm's `Attention`: fused qkv projection, scaled dot-product softmax attention, output
/// projection.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: usize,
}

impl Attention {
    fn new(vs: &ParamStore, dim: usize, heads: usize, qkv_bias: bool) -> Result<Self> {
        Ok(Attention {
            qkv: Linear::new(&vs.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::new(&vs.pp("proj"), dim, dim, true)?,
            num_heads: heads,
        })
    }

    /// `x: [B, N, D] → [B, N, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let h = self.num_heads;
        let hd = d / h;
        // [B, N, 3, H, hd] → [3, B, H, N, hd]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = softmax_last(&q.matmul(&k.t()?.contiguous()?)?)?; // [B, H, N, N]
        let y = attn.matmul(&v)?; // [B, H, N, hd]
        let y = y.transpose(1, 2)?.reshape((b, n, d))?;
        self.proj.forward(&y)
    }
}

/// timm's `Mlp`: `fc2(gelu(fc1(x)))` with exact (erf) GELU.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub(crate) fn new(vs: &ParamStore, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new(&vs.pp("fc1"), dim, hidden, true)?,
            fc2: Linear::new(&vs.pp("fc2"), hidden, dim, true)?,
        })
    }

    /// `x: [..., D] → [..., D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&gelu(&self.fc1.forward(x)?)?)
    }
}

/// A pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn new(vs: &ParamStore, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Block {
            norm1: LayerNorm::new(&vs.pp("norm1"), d, cfg.layer_norm_eps)?,
            attn: Attention::new(&vs.pp("attn"), d, cfg.num_heads, cfg.qkv_bias)?,
            norm2: LayerNorm::new(&vs.pp("norm2"), d, cfg.layer_norm_eps)?,
            mlp: Mlp::new(&vs.pp("mlp"), d, cfg.mlp_dim)?,
        })
    }

    /// `x: [B, N, D] → [B, N, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        Ok((&x + self.mlp.forward(&self.norm2.forward(&x)?)?)?)
    }
}

/// The ViT classifier.
#[derive(Debug, Clone)]
pub struct Vit {
    pub cfg: VitConfig,
    pub patch_embed: Conv2d,
    pub cls_token: Param,
    pub pos_embed: Param,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl Vit {
    /// Build from `vs` (timm names at the store's root). With a checkpoint store, adapt the
    /// checkpoint first with [`adapt_checkpoint`]; missing or mis-shaped tensors are errors
    /// naming the tensor.
    pub fn new(cfg: &VitConfig, vs: &ParamStore) -> Result<Self> {
        cfg.validate()?;
        if vs.device().is_cpu() {
            crate::util::mem::check_fits(
                &format!("ViT `{}` at {} px, batch 1", cfg.name, cfg.image_size),
                cfg.estimate_bytes(1),
            )?;
        }
        let d = cfg.embed_dim;
        let p = cfg.patch_size;
        let patch_embed = Conv2d::new(&vs.pp("patch_embed").pp("proj"), 3, d, p, p, 0, 1, true)?;
        let cls_token = vs.get(&[1, 1, d], "cls_token", Init::Normal(1e-6))?;
        let pos_embed = vs.get(
            &[1, cfg.num_tokens(), d],
            "pos_embed",
            Init::TruncNormal(0.02),
        )?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&vs.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&vs.pp("norm"), d, cfg.layer_norm_eps)?;
        let head = Linear::new(&vs.pp("head"), d, cfg.num_classes, true)?;
        Ok(Vit {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            head,
        })
    }

    /// The preset's normalisation. `images01: [B, 3, H, W]` in `[0, 1]` → same shape.
    pub fn normalize(&self, images01: &Tensor) -> Result<Tensor> {
        normalize_with(images01, self.cfg.mean, self.cfg.std)
    }

    /// All tokens after the final norm. `images01: [B, 3, S, S]` (S = `image_size`, in
    /// `[0, 1]`) → `[B, 1 + (S/patch)², D]`, class token first.
    pub fn forward_tokens(&self, images01: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = images01.dims4()?;
        let s = self.cfg.image_size;
        if (h, w) != (s, s) {
            return Err(Error::msg(format!(
                "ViT `{}` expects {s}×{s} images, got {h}×{w}",
                self.cfg.name
            )));
        }
        let x = self.patch_embed.forward(&self.normalize(images01)?)?; // [B, D, g, g]
        let d = self.cfg.embed_dim;
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [B, g², D]
        let cls = self.cls_token.tensor()?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let mut x = x.broadcast_add(&self.pos_embed.tensor()?)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        self.norm.forward(&x)
    }

    /// Class-token features after the final norm, no head (what SupCon uses).
    /// `images01: [B, 3, S, S]` in `[0, 1]` → `[B, D]`.
    pub fn features(&self, images01: &Tensor) -> Result<Tensor> {
        Ok(self.forward_tokens(images01)?.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// Class logits. `images01: [B, 3, S, S]` in `[0, 1]` → `[B, num_classes]`.
    pub fn forward(&self, images01: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.features(images01)?)
    }
}

/// Bring a checkpoint to `cfg`'s timm names and shapes: rename Hugging Face ViT tensors (see
/// [`names::hf_vit_to_timm`]), resize `pos_embed` bilinearly over its patch grid (class-token
/// position kept) when the checkpoint was trained at another input size, and re-initialise
/// the head (seeded by `seed`) when its number of classes differs. Everything else is left
/// for [`Vit::new`] to check by name and shape. Returns the map and what changed.
pub fn adapt_checkpoint(
    cfg: &VitConfig,
    map: TensorMap,
    seed: u64,
) -> Result<(TensorMap, LoadReport)> {
    cfg.validate()?;
    let mut report = LoadReport::default();
    let mut map = if names::is_hf_vit(&map) {
        let (m, dropped) = names::hf_vit_to_timm(map)?;
        report.converted_from = Some("Hugging Face transformers ViT".into());
        report.dropped = dropped;
        m
    } else {
        map
    };
    if let Some(pe) = map.get("pos_embed") {
        let want = cfg.num_tokens();
        let (one, n, d) = pe.dims3().map_err(|_| Error::ShapeMismatch {
            name: "pos_embed".into(),
            found: pe.dims().to_vec(),
            expected: vec![1, want, cfg.embed_dim],
        })?;
        if one == 1 && d == cfg.embed_dim && n != want {
            let resized = resize_pos_embed(pe, cfg.grid_size())?;
            let g0 = (n.saturating_sub(1) as f64).sqrt().round() as usize;
            report.resized.push(format!(
                "`pos_embed` grid {g0}×{g0} → {g}×{g} (bilinear, class token kept)",
                g = cfg.grid_size()
            ));
            map.insert("pos_embed".into(), resized);
        }
    }
    adapt_head(
        &mut map,
        "head",
        cfg.embed_dim,
        cfg.num_classes,
        seed,
        &mut report,
    )?;
    Ok((map, report))
}

/// Resize `pos_embed: [1, 1 + g0², D]` to `[1, 1 + g², D]`: the class-token row is kept, the
/// grid rows are bilinearly interpolated (PyTorch `align_corners=False`). timm's
/// `resample_abs_pos_embed` defaults to bicubic, so a resized table differs slightly from
/// timm's; at the checkpoint's own size nothing is resampled.
pub fn resize_pos_embed(pos_embed: &Tensor, g: usize) -> Result<Tensor> {
    let (_, n, d) = pos_embed.dims3()?;
    let g0 = ((n.saturating_sub(1)) as f64).sqrt().round() as usize;
    if g0 == 0 || g == 0 || g0 * g0 + 1 != n {
        return Err(Error::Tensor {
            name: "pos_embed".into(),
            msg: format!("{n} positions is not 1 class token + a square grid"),
        });
    }
    let cls = pos_embed.narrow(1, 0, 1)?;
    let grid = pos_embed
        .narrow(1, 1, g0 * g0)?
        .reshape((g0, g0, d))?
        .permute((2, 0, 1))?
        .contiguous()?; // [D, g0, g0]
    let grid = resize_bilinear(&grid, g, g)?
        .permute((1, 2, 0))?
        .reshape((1, g * g, d))?;
    Ok(Tensor::cat(&[&cls, &grid], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;
    use candle_core::{DType, Device};

    /// Sum of squares: a scalar that depends on every output entry.
    fn sum_sq(x: &Tensor) -> Result<Tensor> {
        Ok(x.sqr()?.sum_all()?)
    }

    fn micro() -> VitConfig {
        VitConfig {
            name: "micro".into(),
            image_size: 16,
            patch_size: 4,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            mlp_dim: 32,
            num_classes: 5,
            ..VitConfig::vit_b16()
        }
    }

    fn images(b: usize, s: usize, seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        let v: Vec<f32> = (0..b * 3 * s * s).map(|_| r.f32()).collect();
        Tensor::from_vec(v, (b, 3, s, s), &Device::Cpu).unwrap()
    }

    #[test]
    fn param_shapes_match_construction() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 0);
        Vit::new(&cfg, &vs).unwrap();
        let built: Vec<(String, Vec<usize>)> = vs
            .params()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        let mut want = cfg.param_shapes();
        want.sort();
        assert_eq!(built, want);
    }

    #[test]
    fn shapes_and_gradient_reaches_every_param() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 1);
        let vit = Vit::new(&cfg, &vs).unwrap();
        for b in [1, 3] {
            let x = images(b, 16, 2);
            assert_eq!(vit.features(&x).unwrap().dims(), &[b, 16]);
            assert_eq!(vit.forward(&x).unwrap().dims(), &[b, 5]);
        }
        let loss = sum_sq(&vit.forward(&images(2, 16, 3)).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vs.trainable_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let m = crate::nn::gradcheck::max_abs(g).unwrap() as f32;
            assert!(m > 0.0 && m.is_finite(), "zero gradient for {name}");
        }
        let e = vit.forward(&images(1, 8, 0)).unwrap_err().to_string();
        assert!(e.contains("16×16"), "{e}");
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        // A frozen-weight block in f64: check d(block(x))/dx.
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 4);
        let vit = Vit::new(&cfg, &vs).unwrap();
        let blk = vit.blocks[0].clone();
        let to64 = |p: &Param| -> Param {
            Param::Frozen(p.tensor().unwrap().to_dtype(DType::F64).unwrap())
        };
        let lin = |l: &Linear| Linear {
            weight: to64(&l.weight),
            bias: l.bias.as_ref().map(to64),
        };
        let ln = |l: &LayerNorm| LayerNorm {
            weight: to64(&l.weight),
            bias: to64(&l.bias),
            eps: l.eps,
        };
        let blk = Block {
            norm1: ln(&blk.norm1),
            attn: Attention {
                qkv: lin(&blk.attn.qkv),
                proj: lin(&blk.attn.proj),
                num_heads: 2,
            },
            norm2: ln(&blk.norm2),
            mlp: Mlp {
                fc1: lin(&blk.mlp.fc1),
                fc2: lin(&blk.mlp.fc2),
            },
        };
        let x = images(2, 4, 5).reshape((2, 6, 8)).unwrap();
        let x = Tensor::cat(&[&x, &x], 2)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let e = crate::nn::gradcheck::check(&x, 24, 0, |x| blk.forward(x)).unwrap();
        assert!(e < 1e-5, "block gradient rel error {e}");
    }

    #[test]
    fn pos_embed_resize_keeps_cls_and_is_identity_at_same_size() {
        let mut r = Rng::new(9);
        let v: Vec<f32> = (0..17 * 3).map(|_| r.normal()).collect();
        let pe = Tensor::from_vec(v, (1, 17, 3), &Device::Cpu).unwrap();
        let same = resize_pos_embed(&pe, 4).unwrap();
        let diff = (same - &pe).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let big = resize_pos_embed(&pe, 8).unwrap();
        assert_eq!(big.dims(), &[1, 65, 3]);
        let cls0 = pe.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        let cls1 = big
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(cls0, cls1);
        // A constant grid stays constant under bilinear resizing.
        let c = Tensor::ones((1, 10, 2), DType::F32, &Device::Cpu).unwrap();
        let r = resize_pos_embed(&c, 5).unwrap().flatten_all().unwrap();
        for v in r.to_vec1::<f32>().unwrap() {
            assert!((v - 1.0).abs() < 1e-6);
        }
        for n in [0, 1, 11] {
            let t = Tensor::ones((1, n, 2), DType::F32, &Device::Cpu).unwrap();
            assert!(resize_pos_embed(&t, 2).is_err(), "{n} positions");
        }
    }

    #[test]
    fn adapt_checkpoint_resizes_and_reinitialises_head() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 1);
        Vit::new(&cfg, &vs).unwrap();
        let map = vs.current_tensors().unwrap();
        // Same config: nothing changes.
        let (m, rep) = adapt_checkpoint(&cfg, map.clone(), 0).unwrap();
        assert!(rep.lines().is_empty(), "{rep:?}");
        assert_eq!(m.len(), map.len());
        // Larger input, other head: pos_embed resized, head re-initialised, model builds.
        let cfg2 = micro().with_image_size(24).with_num_classes(7);
        let (m, rep) = adapt_checkpoint(&cfg2, map, 0).unwrap();
        assert_eq!(rep.resized.len(), 1);
        assert_eq!(rep.reinitialised.len(), 1);
        let store = ParamStore::frozen(m, &Device::Cpu);
        let vit = Vit::new(&cfg2, &store).unwrap();
        store.check_all_used().unwrap();
        assert_eq!(vit.forward(&images(1, 24, 1)).unwrap().dims(), &[1, 7]);
    }

    #[test]
    fn missing_and_misshaped_tensors_are_named() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 1);
        Vit::new(&cfg, &vs).unwrap();
        let mut map = vs.current_tensors().unwrap();
        map.remove("blocks.1.mlp.fc2.weight");
        let e = Vit::new(&cfg, &ParamStore::frozen(map.clone(), &Device::Cpu)).unwrap_err();
        assert!(e.to_string().contains("blocks.1.mlp.fc2.weight"), "{e}");
        map.insert(
            "blocks.1.mlp.fc2.weight".into(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Vit::new(&cfg, &ParamStore::frozen(map, &Device::Cpu)).unwrap_err();
        assert!(e.to_string().contains("blocks.1.mlp.fc2.weight"), "{e}");
    }
}
