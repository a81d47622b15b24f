//! ConvNeXt classifier, a port of timm's `ConvNeXt` (`timm/models/convnext.py`; Liu et al., "A
//! ConvNet for the 2020s", CVPR 2022) in its standard form: patchify stem (4×4 conv, stride 4,
//! LayerNorm2d), four stages (stages 1–3 open with LayerNorm2d + 2×2 stride-2 conv), blocks of
//! depthwise 7×7 conv → channels-last LayerNorm → MLP (×4, GELU) → layer scale `gamma` →
//! residual, then global average pooling, LayerNorm and a linear head (timm's
//! `NormMlpClassifierHead`, `head.norm` / `head.fc`).
//!
//! Tensor names are timm's checkpoint keys (`stem.0`, `stem.1`, `stages.{i}.downsample.{0,1}`,
//! `stages.{i}.blocks.{j}.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`, `head.norm`, `head.fc`).
//!
//! The depthwise 7×7 conv is [`crate::nn::kernels::depthwise::depthwise_conv2d`] (a CPU
//! custom op with its own backward, or shifted slices elsewhere) rather than Candle's grouped
//! `conv2d`, whose backward is correct but quadratic in the channel count; see that module.
//! The weight keeps PyTorch's shape `[C, 1, k, k]`.

use super::common::{adapt_head, normalize_with, LoadReport, IMAGENET_MEAN, IMAGENET_STD};
use super::names;
use super::vit::Mlp;
use crate::error::{Error, Result};
use crate::nn::kernels::depthwise::depthwise_conv2d;
use crate::nn::{Conv2d, Init, LayerNorm, LayerNorm2d, Param, ParamStore};
use crate::util::tensors::TensorMap;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Largest accepted number of stages (timm: 4).
pub const MAX_STAGES: usize = 8;
/// Largest accepted depthwise kernel (timm: 7).
pub const MAX_KERNEL: usize = 31;
/// Largest accepted MLP ratio (timm: 4).
pub const MAX_MLP_RATIO: usize = 16;

/// Every number that differs between ConvNeXt sizes; names follow timm's arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvNextConfig {
    /// Preset name this config came from (informational).
    pub name: String,
    /// Default input side length (any multiple of 32 runs; data pipelines resize to this).
    pub image_size: usize,
    /// Blocks per stage (4 stages).
    pub depths: Vec<usize>,
    /// Channels per stage.
    pub dims: Vec<usize>,
    /// Depthwise kernel size (7).
    pub kernel_size: usize,
    /// MLP hidden = `mlp_ratio × dim` (4).
    pub mlp_ratio: usize,
    /// Initial layer-scale value for fresh models (timm: 1e-6).
    pub layer_scale_init: f32,
    /// LayerNorm epsilon (1e-6).
    pub layer_norm_eps: f64,
    /// Output classes of the head.
    pub num_classes: usize,
    /// Per-channel mean on `[0, 1]` input (RGB).
    pub mean: [f32; 3],
    /// Per-channel std on `[0, 1]` input (RGB).
    pub std: [f32; 3],
}

impl ConvNextConfig {
    /// ConvNeXt-B (timm `convnext_base`): depths 3, 3, 27, 3; dims 128, 256, 512, 1024;
    /// 224 px, ImageNet mean/std. `num_classes` defaults to 1000.
    pub fn convnext_b() -> Self {
        ConvNextConfig {
            name: "convnext_b".into(),
            image_size: 224,
            depths: vec![3, 3, 27, 3],
            dims: vec![128, 256, 512, 1024],
            kernel_size: 7,
            mlp_ratio: 4,
            layer_scale_init: 1e-6,
            layer_norm_eps: 1e-6,
            num_classes: 1000,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// A small ConvNeXt for CPU work (not timm's `convnext_tiny`): depths 1, 1, 2, 1; dims 32,
    /// 64, 128, 256; 64 px input (feature maps 16, 8, 4, 2) — 1.04 M parameters with 10 classes.
    pub fn tiny() -> Self {
        ConvNextConfig {
            name: "convnext_tiny_cpu".into(),
            image_size: 64,
            depths: vec![1, 1, 2, 1],
            dims: vec![32, 64, 128, 256],
            ..Self::convnext_b()
        }
    }

    /// Names accepted by [`ConvNextConfig::preset`].
    pub const PRESETS: [&'static str; 2] = ["convnext_b", "convnext_tiny_cpu"];

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "convnext_b" => Ok(Self::convnext_b()),
            "convnext_tiny_cpu" => Ok(Self::tiny()),
            other => Err(Error::Config {
                field: "model".into(),
                msg: format!(
                    "unknown ConvNeXt preset `{other}` (expected one of {})",
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

    /// Width of the pooled features (last stage's channels).
    pub fn feature_dim(&self) -> usize {
        self.dims.last().copied().unwrap_or(0)
    }

    /// Total downsampling factor (stem 4 × 2 per later stage).
    pub fn stride(&self) -> usize {
        4usize
            .checked_shl(self.dims.len().saturating_sub(1) as u32)
            .unwrap_or(usize::MAX)
    }

    /// Check internal consistency and bounds; errors name the field. Bounds are what real
    /// ConvNeXts reach with room above (XXLarge: widths up to 3072, a 27- or 30-block
    /// stage; 4 stages, kernel 7, MLP ratio 4).
    pub fn validate(&self) -> Result<()> {
        use super::vit::{MAX_CLASSES, MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH};
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                field: field.into(),
                msg,
            })
        };
        if self.dims.is_empty() || self.dims.len() > MAX_STAGES {
            return bad(
                "dims",
                format!("{} stages; expected 1..={MAX_STAGES}", self.dims.len()),
            );
        }
        if self.dims.len() != self.depths.len() {
            return bad(
                "dims",
                format!(
                    "{} stage widths for {} stage depths",
                    self.dims.len(),
                    self.depths.len()
                ),
            );
        }
        if let Some(d) = self.dims.iter().find(|&&d| d == 0 || d > MAX_WIDTH) {
            return bad("dims", format!("width {d} is outside 1..={MAX_WIDTH}"));
        }
        if let Some(d) = self.depths.iter().find(|&&d| d > MAX_DEPTH) {
            return bad("depths", format!("{d} blocks is more than {MAX_DEPTH}"));
        }
        if self.num_classes == 0 || self.num_classes > MAX_CLASSES {
            return bad(
                "num_classes",
                format!("{} is outside 1..={MAX_CLASSES}", self.num_classes),
            );
        }
        if self.mlp_ratio == 0 || self.mlp_ratio > MAX_MLP_RATIO {
            return bad(
                "mlp_ratio",
                format!("{} is outside 1..={MAX_MLP_RATIO}", self.mlp_ratio),
            );
        }
        if self.kernel_size.is_multiple_of(2) || self.kernel_size > MAX_KERNEL {
            return bad(
                "kernel_size",
                format!("{} is not odd and at most {MAX_KERNEL}", self.kernel_size),
            );
        }
        if self.image_size == 0
            || self.image_size > MAX_IMAGE_SIZE
            || !self.image_size.is_multiple_of(self.stride())
        {
            return bad(
                "image_size",
                format!(
                    "{} is not a multiple of {} in 1..={MAX_IMAGE_SIZE}",
                    self.image_size,
                    self.stride()
                ),
            );
        }
        if !self.layer_scale_init.is_finite() {
            return bad(
                "layer_scale_init",
                format!("{} is not finite", self.layer_scale_init),
            );
        }
        crate::error::check::positive_finite("layer_norm_eps", self.layer_norm_eps)?;
        crate::error::check::norm_stats(&self.mean, &self.std)
    }

    /// Bytes a forward pass of `batch` images needs, roughly (saturating): the f32
    /// parameters plus, per image, the largest stage's feature map times its MLP expansion
    /// (+ 4 for the block's other tensors). Checked before a model is built on the CPU.
    pub fn estimate_bytes(&self, batch: usize) -> u64 {
        let u = |v: usize| v as u64;
        let params = self
            .param_shapes()
            .iter()
            .map(|(_, s)| s.iter().fold(1u64, |p, &d| p.saturating_mul(u(d))))
            .fold(0u64, u64::saturating_add);
        let mut per_image = u(self.image_size)
            .saturating_mul(u(self.image_size))
            .saturating_mul(6);
        let mut side = u(self.image_size / 4);
        let mut largest = 0u64;
        for &c in &self.dims {
            let map = side
                .saturating_mul(side)
                .saturating_mul(u(c))
                .saturating_mul(u(self.mlp_ratio).saturating_add(4));
            largest = largest.max(map);
            side /= 2;
        }
        per_image = per_image.saturating_add(largest);
        params
            .saturating_add(per_image.saturating_mul(u(batch.max(1))))
            .saturating_mul(4)
    }

    /// Every parameter's timm name and shape, in construction order, without allocating.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let d0 = self.dims.first().copied().unwrap_or(0);
        let k = self.kernel_size;
        v.push(("stem.0.weight".into(), vec![d0, 3, 4, 4]));
        v.push(("stem.0.bias".into(), vec![d0]));
        v.push(("stem.1.weight".into(), vec![d0]));
        v.push(("stem.1.bias".into(), vec![d0]));
        for (i, (&c, &depth)) in self.dims.iter().zip(&self.depths).enumerate() {
            let s = format!("stages.{i}");
            if i > 0 {
                let p = self.dims[i - 1];
                v.push((format!("{s}.downsample.0.weight"), vec![p]));
                v.push((format!("{s}.downsample.0.bias"), vec![p]));
                v.push((format!("{s}.downsample.1.weight"), vec![c, p, 2, 2]));
                v.push((format!("{s}.downsample.1.bias"), vec![c]));
            }
            for j in 0..depth {
                let b = format!("{s}.blocks.{j}");
                let h = self.mlp_ratio * c;
                v.push((format!("{b}.conv_dw.weight"), vec![c, 1, k, k]));
                v.push((format!("{b}.conv_dw.bias"), vec![c]));
                v.push((format!("{b}.norm.weight"), vec![c]));
                v.push((format!("{b}.norm.bias"), vec![c]));
                v.push((format!("{b}.mlp.fc1.weight"), vec![h, c]));
                v.push((format!("{b}.mlp.fc1.bias"), vec![h]));
                v.push((format!("{b}.mlp.fc2.weight"), vec![c, h]));
                v.push((format!("{b}.mlp.fc2.bias"), vec![c]));
                v.push((format!("{b}.gamma"), vec![c]));
            }
        }
        let f = self.feature_dim();
        v.push(("head.norm.weight".into(), vec![f]));
        v.push(("head.norm.bias".into(), vec![f]));
        v.push(("head.fc.weight".into(), vec![self.num_classes, f]));
        v.push(("head.fc.bias".into(), vec![self.num_classes]));
        v
    }
}

/// timm's `ConvNeXtBlock` (`conv_mlp=False`).
#[derive(Debug, Clone)]
pub struct ConvNextBlock {
    /// Depthwise conv weight `[C, 1, k, k]` and bias `[C]`.
    pub conv_dw_weight: Param,
    pub conv_dw_bias: Param,
    pub norm: LayerNorm,
    pub mlp: Mlp,
    /// Layer scale `[C]`.
    pub gamma: Param,
    pub kernel_size: usize,
}

impl ConvNextBlock {
    fn new(vs: &ParamStore, c: usize, cfg: &ConvNextConfig) -> Result<Self> {
        let k = cfg.kernel_size;
        let bound = 1.0 / ((k * k) as f32).sqrt();
        let dw = vs.pp("conv_dw");
        Ok(ConvNextBlock {
            conv_dw_weight: dw.get(&[c, 1, k, k], "weight", Init::Uniform(bound))?,
            conv_dw_bias: dw.get(&[c], "bias", Init::Uniform(bound))?,
            norm: LayerNorm::new(&vs.pp("norm"), c, cfg.layer_norm_eps)?,
            mlp: Mlp::new(&vs.pp("mlp"), c, cfg.mlp_ratio * c)?,
            gamma: vs.get(&[c], "gamma", Init::Const(cfg.layer_scale_init))?,
            kernel_size: k,
        })
    }

    /// `x: [N, C, H, W] → [N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = depthwise_conv2d(
            x,
            &self.conv_dw_weight.tensor()?,
            Some(&self.conv_dw_bias.tensor()?),
            self.kernel_size / 2,
        )?;
        let y = y.permute((0, 2, 3, 1))?; // [N, H, W, C]
        let y = self.mlp.forward(&self.norm.forward(&y)?)?;
        let y = y.broadcast_mul(&self.gamma.tensor()?)?;
        Ok((x + y.permute((0, 3, 1, 2))?)?)
    }
}

/// One stage: optional downsample (LayerNorm2d + 2×2 stride-2 conv), then blocks.
#[derive(Debug, Clone)]
pub struct Stage {
    pub downsample: Option<(LayerNorm2d, Conv2d)>,
    pub blocks: Vec<ConvNextBlock>,
}

/// The ConvNeXt classifier.
#[derive(Debug, Clone)]
pub struct ConvNext {
    pub cfg: ConvNextConfig,
    pub stem: (Conv2d, LayerNorm2d),
    pub stages: Vec<Stage>,
    pub head_norm: LayerNorm,
    pub head_fc: crate::nn::Linear,
}

impl ConvNext {
    /// Build from `vs` (timm names at the store's root); missing or mis-shaped tensors are
    /// errors naming the tensor.
    pub fn new(cfg: &ConvNextConfig, vs: &ParamStore) -> Result<Self> {
        cfg.validate()?;
        if vs.device().is_cpu() {
            crate::util::mem::check_fits(
                &format!("ConvNeXt `{}` at {} px, batch 1", cfg.name, cfg.image_size),
                cfg.estimate_bytes(1),
            )?;
        }
        let eps = cfg.layer_norm_eps;
        let d0 = cfg.dims[0];
        let stem = (
            Conv2d::new(&vs.pp("stem.0"), 3, d0, 4, 4, 0, 1, true)?,
            LayerNorm2d::new(&vs.pp("stem.1"), d0, eps)?,
        );
        let mut stages = Vec::with_capacity(cfg.dims.len());
        for (i, (&c, &depth)) in cfg.dims.iter().zip(&cfg.depths).enumerate() {
            let s = vs.pp("stages").pp(i);
            let downsample = if i > 0 {
                let p = cfg.dims[i - 1];
                let ds = s.pp("downsample");
                Some((
                    LayerNorm2d::new(&ds.pp(0), p, eps)?,
                    Conv2d::new(&ds.pp(1), p, c, 2, 2, 0, 1, true)?,
                ))
            } else {
                None
            };
            let blocks = (0..depth)
                .map(|j| ConvNextBlock::new(&s.pp("blocks").pp(j), c, cfg))
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage { downsample, blocks });
        }
        let f = cfg.feature_dim();
        Ok(ConvNext {
            cfg: cfg.clone(),
            stem,
            stages,
            head_norm: LayerNorm::new(&vs.pp("head").pp("norm"), f, eps)?,
            head_fc: crate::nn::Linear::new(&vs.pp("head").pp("fc"), f, cfg.num_classes, true)?,
        })
    }

    /// The preset's normalisation. `images01: [B, 3, H, W]` in `[0, 1]` → same shape.
    pub fn normalize(&self, images01: &Tensor) -> Result<Tensor> {
        normalize_with(images01, self.cfg.mean, self.cfg.std)
    }

    /// Last-stage feature map. `images01: [B, 3, H, W]` (H, W multiples of 32 for four
    /// stages) → `[B, C_last, H/32, W/32]`.
    pub fn forward_map(&self, images01: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images01.dims4()?;
        let s = self.cfg.stride();
        if h == 0 || w == 0 || !h.is_multiple_of(s) || !w.is_multiple_of(s) {
            return Err(Error::msg(format!(
                "ConvNeXt `{}` needs image sides that are multiples of {s}, got {h}×{w}",
                self.cfg.name
            )));
        }
        let mut x = self
            .stem
            .1
            .forward(&self.stem.0.forward(&self.normalize(images01)?)?)?;
        for st in &self.stages {
            if let Some((n, c)) = &st.downsample {
                x = c.forward(&n.forward(&x)?)?;
            }
            for b in &st.blocks {
                x = b.forward(&x)?;
            }
        }
        Ok(x)
    }

    /// Pooled, normalised features, no head: global average pool → `head.norm`.
    /// `images01: [B, 3, H, W]` in `[0, 1]` → `[B, C_last]`.
    pub fn features(&self, images01: &Tensor) -> Result<Tensor> {
        let x = self.forward_map(images01)?;
        let pooled = x.mean(3)?.mean(2)?; // [B, C]
        self.head_norm.forward(&pooled)
    }

    /// Class logits. `images01: [B, 3, H, W]` in `[0, 1]` → `[B, num_classes]`.
    pub fn forward(&self, images01: &Tensor) -> Result<Tensor> {
        self.head_fc.forward(&self.features(images01)?)
    }
}

/// Bring a ConvNeXt checkpoint to `cfg`: rename original facebookresearch/ConvNeXt keys to
/// timm's ([`names::fb_convnext_to_timm`]) and re-initialise `head.fc` (seeded by `seed`)
/// when its number of classes differs. Everything else is checked by [`ConvNext::new`].
pub fn adapt_checkpoint(
    cfg: &ConvNextConfig,
    mut map: TensorMap,
    seed: u64,
) -> Result<(TensorMap, LoadReport)> {
    cfg.validate()?;
    let mut report = LoadReport::default();
    if names::is_fb_convnext(&map) {
        map = names::fb_convnext_to_timm(map);
        report.converted_from = Some("facebookresearch/ConvNeXt".into());
    }
    adapt_head(
        &mut map,
        "head.fc",
        cfg.feature_dim(),
        cfg.num_classes,
        seed,
        &mut report,
    )?;
    Ok((map, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck;
    use crate::util::Rng;
    use candle_core::{DType, Device};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::randn(shape, seed, candle_core::DType::F64).unwrap()
    }

    fn micro() -> ConvNextConfig {
        ConvNextConfig {
            name: "micro".into(),
            image_size: 32,
            depths: vec![1, 2],
            dims: vec![8, 16],
            num_classes: 3,
            ..ConvNextConfig::convnext_b()
        }
    }

    #[test]
    fn block_gradient_matches_finite_differences() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 3);
        let net = ConvNext::new(&cfg, &vs).unwrap();
        let b = &net.stages[1].blocks[0];
        let f64p = |p: &Param| Param::Frozen(p.tensor().unwrap().to_dtype(DType::F64).unwrap());
        let lin = |l: &crate::nn::Linear| crate::nn::Linear {
            weight: f64p(&l.weight),
            bias: l.bias.as_ref().map(f64p),
        };
        let blk = ConvNextBlock {
            conv_dw_weight: f64p(&b.conv_dw_weight),
            conv_dw_bias: f64p(&b.conv_dw_bias),
            norm: LayerNorm {
                weight: f64p(&b.norm.weight),
                bias: f64p(&b.norm.bias),
                eps: b.norm.eps,
            },
            mlp: Mlp {
                fc1: lin(&b.mlp.fc1),
                fc2: lin(&b.mlp.fc2),
            },
            // A visible layer scale so the branch matters in the check.
            gamma: Param::Frozen(rand(&[16], 7)),
            kernel_size: 7,
        };
        let x = rand(&[1, 16, 3, 4], 8);
        let e = gradcheck::check(&x, 24, 0, |x| blk.forward(x)).unwrap();
        assert!(e < 1e-5, "block rel error {e}");
    }

    #[test]
    fn param_shapes_match_construction() {
        for cfg in [micro(), ConvNextConfig::tiny()] {
            let vs = ParamStore::init(&Device::Cpu, 0);
            ConvNext::new(&cfg, &vs).unwrap();
            let built: Vec<(String, Vec<usize>)> = vs
                .params()
                .into_iter()
                .map(|(n, p)| (n, p.dims().to_vec()))
                .collect();
            let mut want = cfg.param_shapes();
            want.sort();
            assert_eq!(built, want);
        }
    }

    #[test]
    fn shapes_gradients_and_head_reinit() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 1);
        let net = ConvNext::new(&cfg, &vs).unwrap();
        let mut r = Rng::new(2);
        let x: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| r.f32()).collect();
        let x = Tensor::from_vec(x, (2, 3, 32, 32), &Device::Cpu).unwrap();
        assert_eq!(net.features(&x).unwrap().dims(), &[2, 16]);
        let y = net.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in vs.trainable_vars() {
            let g = grads.get(var.as_tensor());
            let m = g.map(|g| {
                g.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            assert!(m.is_some_and(|m| m > 0.0), "no gradient for {name}");
        }
        let bad = Tensor::zeros((1, 3, 20, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(net.forward(&bad).is_err());
        let map = vs.current_tensors().unwrap();
        let (m, rep) = adapt_checkpoint(&cfg.clone().with_num_classes(9), map, 0).unwrap();
        assert_eq!(rep.reinitialised.len(), 1, "{rep:?}");
        let store = ParamStore::frozen(m, &Device::Cpu);
        let net = ConvNext::new(&cfg.with_num_classes(9), &store).unwrap();
        store.check_all_used().unwrap();
        assert_eq!(net.forward(&x).unwrap().dims(), &[2, 9]);
    }

    /// timm → original facebookresearch names, written independently of `names.rs`.
    fn to_fb(k: &str) -> String {
        let k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv");
        if let Some(r) = k.strip_prefix("stem.") {
            return format!("downsample_layers.0.{r}");
        }
        if let Some(r) = k.strip_prefix("head.norm.") {
            return format!("norm.{r}");
        }
        if let Some(r) = k.strip_prefix("head.fc.") {
            return format!("head.{r}");
        }
        k.replacen(".downsample.", ".", 1)
            .replacen(".blocks.", ".", 1)
            .replacen(
                "stages.",
                if k.contains(".downsample.") {
                    "downsample_layers."
                } else {
                    "stages."
                },
                1,
            )
    }

    #[test]
    fn original_convnext_checkpoint_loads_to_the_same_outputs() {
        let cfg = micro();
        let vs = ParamStore::init(&Device::Cpu, 5);
        let a = ConvNext::new(&cfg, &vs).unwrap();
        let timm = vs.current_tensors().unwrap();
        let fb: TensorMap = timm.iter().map(|(k, v)| (to_fb(k), v.clone())).collect();
        assert!(fb.contains_key("downsample_layers.1.1.weight"));
        assert!(fb.contains_key("stages.1.1.pwconv2.weight"));
        let (back, rep) = adapt_checkpoint(&cfg, fb, 0).unwrap();
        assert!(rep.converted_from.is_some() && rep.reinitialised.is_empty());
        let store = ParamStore::frozen(back, &Device::Cpu);
        let b = ConvNext::new(&cfg, &store).unwrap();
        store.check_all_used().unwrap();
        let x = Tensor::ones((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        let d = (a.forward(&x).unwrap() - b.forward(&x).unwrap()).unwrap();
        let d = d.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}
