//! Classifiers → ONNX: the ViT ([`crate::models::vit`], timm's `VisionTransformer`) and the
//! ConvNeXt ([`crate::models::convnext`], timm's `ConvNeXt`), re-stated op for op from their
//! Candle forwards. Weights are read from a [`TensorMap`] by timm's checkpoint names
//! ([`ClassifierConfig::param_shapes`]) and become initializers under those names; every
//! parameter of the model is exported and nothing else (the normalisation statistics and
//! index/shape tensors are constants, not parameters). A map holding tensors the model does
//! not have is an error naming them.
//!
//! Graph (opset 17, dynamic batch `N`, square input of the config's `image_size` `S`):
//! `image [N,3,S,S]` → `logits [N,num_classes]` and, unless
//! [`ClassifierExportOptions::features`] is off, a second output `features [N,D]` — the
//! head-free features of [`crate::models::Classifier::features`] (ViT: the class token after
//! the final norm; ConvNeXt: global average pool → `head.norm`), `D` = `feature_dim`.
//!
//! With `normalize` (the default) `image` is RGB f32 in [0,1] (gps-seg's canonical tensor) and
//! the graph applies the preset's `(x − mean)/std`; without it the input is already
//! normalised. The choice is written in the doc string and `metadata_props`
//! (`gps_seg.input`, plus `gps_seg.classifier_config` with the full config as JSON).
//!
//! Op forms are the ones ONNX Runtime's CPU optimizer fuses: erf-GELU through `Div` by √2,
//! `LayerNormalization` (ConvNeXt's LayerNorm2d as Transpose → LayerNormalization →
//! Transpose), `Linear` as MatMul with the transposed checkpoint weight + Add.
//!
//! - ViT: patch `Conv` (kernel = stride = patch) → `[N,g²,D]` → class token `Expand`ed to the
//!   batch and `Concat`ed in front → `+ pos_embed` → pre-norm blocks (qkv MatMul+Add, heads by
//!   Reshape/Transpose, `q·hd^-½`, `Softmax`, proj; MLP fc1 → GELU → fc2) → `norm` → class
//!   token (`Gather` index 0) → `head`.
//! - ConvNeXt: stem `Conv` 4×4/4 → LayerNorm2d; per stage an optional downsample (LayerNorm2d
//!   → `Conv` 2×2/2), blocks of depthwise `Conv` k×k (`group` = C, padding k/2) → NHWC →
//!   LayerNormalization → fc1 → GELU → fc2 → `· gamma` → NCHW → residual; `ReduceMean` over
//!   H, W → `head.norm` → `head.fc`.

use super::builder::{Dim, GraphBuilder, Value};
use super::proto::{data_type, ModelProto, ValueInfoProto};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::models::{ClassifierConfig, ConvNextConfig, VitConfig};
use crate::util::tensors::TensorMap;
use std::collections::BTreeMap;

pub use super::sam::ExportSummary;

/// Export options.
#[derive(Debug, Clone, Copy)]
pub struct ClassifierExportOptions {
    /// Apply the preset's normalisation in-graph (input RGB in [0,1]). Default true.
    pub normalize: bool,
    /// Add the second output `features [N,D]`. Default true.
    pub features: bool,
}

impl Default for ClassifierExportOptions {
    fn default() -> Self {
        ClassifierExportOptions {
            normalize: true,
            features: true,
        }
    }
}

/// Exporter state: builder, weights, expected shapes and the names used.
struct Ex<'a> {
    b: GraphBuilder,
    wt: Weights<'a>,
}

impl<'a> Ex<'a> {
    /// The checkpoint tensor `name` as an initializer (shape checked against the config).
    fn p(&mut self, name: &str) -> Result<Value> {
        self.wt.param(&mut self.b, name)
    }

    fn linear(&mut self, x: &Value, pre: &str) -> Result<Value> {
        self.wt.linear(&mut self.b, x, pre)
    }

    fn ln(&mut self, x: &Value, pre: &str, eps: f64) -> Result<Value> {
        self.wt.layer_norm(&mut self.b, x, pre, eps as f32)
    }

    fn ln2d(&mut self, x: &Value, pre: &str, eps: f64) -> Result<Value> {
        let w = self.p(&format!("{pre}.weight"))?;
        let b = self.p(&format!("{pre}.bias"))?;
        self.b.layer_norm_2d(x, &w, &b, eps as f32)
    }

    /// timm `Mlp`: fc1 → erf-GELU → fc2 on the last axis.
    fn mlp(&mut self, x: &Value, pre: &str) -> Result<Value> {
        let h = self.linear(x, &format!("{pre}.fc1"))?;
        let h = self.b.gelu_erf(&h)?;
        self.linear(&h, &format!("{pre}.fc2"))
    }

    /// `image [N,3,S,S]`, normalised in-graph when asked: returns the model's input.
    fn image_input(
        &mut self,
        s: usize,
        mean: [f32; 3],
        std: [f32; 3],
        normalize: bool,
    ) -> Result<Value> {
        let dims = [Dim::sym("batch"), 3.into(), s.into(), s.into()];
        let x = self.b.input("image", data_type::FLOAT, &dims)?;
        if !normalize {
            return Ok(x);
        }
        self.b.set_scope("preprocess");
        let m = self.b.const_f32(&[1, 3, 1, 1], &mean)?;
        let sd = self.b.const_f32(&[1, 3, 1, 1], &std)?;
        let y = self.b.sub(&x, &m)?;
        self.b.div(&y, &sd)
    }

    // ---- ViT (models/vit.rs) ---------------------------------------------------------------------

    /// `Vit::features` on a normalised `x [N,3,S,S]` → `[N,D]`.
    fn vit_features(&mut self, cfg: &VitConfig, x: &Value) -> Result<Value> {
        let d = cfg.embed_dim as i64;
        let p = cfg.patch_size as i64;
        let t = cfg.num_tokens() as i64;
        self.b.set_scope("patch_embed");
        let w = self.p("patch_embed.proj.weight")?;
        let bias = self.p("patch_embed.proj.bias")?;
        let y = self.b.conv(x, &w, Some(&bias), p, 0, 1)?; // [N,D,g,g]
        let y = self.b.reshape(&y, &[0, d, -1])?;
        let y = self.b.transpose(&y, &[0, 2, 1])?; // [N,g²,D]
        self.b.set_scope("cls_token");
        let cls = self.p("cls_token")?;
        let sh = self.b.shape(&y)?;
        let n = self.b.slice(&sh, &[0], &[1], &[0])?;
        let rest = self.b.ints(&[1, d])?;
        let full = self.b.concat(&[&n, &rest], 0)?;
        let cls = self.b.expand(&cls, &full)?; // [N,1,D]
        let y = self.b.concat(&[&cls, &y], 1)?;
        let pos = self.p("pos_embed")?;
        let mut y = self.b.add(&y, &pos)?;
        for i in 0..cfg.depth {
            y = self.vit_block(cfg, i, t, &y)?;
        }
        self.b.set_scope("norm");
        let y = self.ln(&y, "norm", cfg.layer_norm_eps)?;
        self.b.select(&y, 1, 0)
    }

    /// Pre-norm block: `x [N,T,D] → [N,T,D]`.
    fn vit_block(&mut self, cfg: &VitConfig, i: usize, t: i64, x: &Value) -> Result<Value> {
        let pre = format!("blocks.{i}");
        self.b.set_scope(&pre);
        let eps = cfg.layer_norm_eps;
        let h = self.ln(x, &format!("{pre}.norm1"), eps)?;
        let h = self.vit_attention(cfg, &format!("{pre}.attn"), t, &h)?;
        let x = self.b.add(x, &h)?;
        let m = self.ln(&x, &format!("{pre}.norm2"), eps)?;
        let m = self.mlp(&m, &format!("{pre}.mlp"))?;
        self.b.add(&x, &m)
    }

    /// timm `Attention`: `x [N,T,D] → [N,T,D]`.
    fn vit_attention(&mut self, cfg: &VitConfig, pre: &str, t: i64, x: &Value) -> Result<Value> {
        let d = cfg.embed_dim as i64;
        let nh = cfg.num_heads as i64;
        let hd = d / nh;
        let qkv = self.linear(x, &format!("{pre}.qkv"))?;
        let qkv = self.b.reshape(&qkv, &[-1, t, 3, nh, hd])?;
        let qkv = self.b.transpose(&qkv, &[2, 0, 3, 1, 4])?; // [3,N,H,T,hd]
        let q = self.b.select(&qkv, 0, 0)?;
        let k = self.b.select(&qkv, 0, 1)?;
        let v = self.b.select(&qkv, 0, 2)?;
        let q = self.b.mul_scalar(&q, (hd as f64).powf(-0.5) as f32)?;
        let kt = self.b.transpose(&k, &[0, 1, 3, 2])?;
        let a = self.b.matmul(&q, &kt)?; // [N,H,T,T]
        let a = self.b.softmax(&a, -1)?;
        let o = self.b.matmul(&a, &v)?; // [N,H,T,hd]
        let o = self.b.transpose(&o, &[0, 2, 1, 3])?;
        let o = self.b.reshape(&o, &[-1, t, d])?;
        self.linear(&o, &format!("{pre}.proj"))
    }

    // ---- ConvNeXt (models/convnext.rs) -----------------------------------------------------------

    /// `ConvNext::features` on a normalised `x [N,3,H,W]` → `[N,C_last]`.
    fn convnext_features(&mut self, cfg: &ConvNextConfig, x: &Value) -> Result<Value> {
        let eps = cfg.layer_norm_eps;
        self.b.set_scope("stem");
        let w = self.p("stem.0.weight")?;
        let bias = self.p("stem.0.bias")?;
        let y = self.b.conv(x, &w, Some(&bias), 4, 0, 1)?;
        let mut y = self.ln2d(&y, "stem.1", eps)?;
        for (i, &depth) in cfg.depths.iter().enumerate() {
            let s = format!("stages.{i}");
            if i > 0 {
                self.b.set_scope(&format!("{s}.downsample"));
                y = self.ln2d(&y, &format!("{s}.downsample.0"), eps)?;
                let w = self.p(&format!("{s}.downsample.1.weight"))?;
                let bias = self.p(&format!("{s}.downsample.1.bias"))?;
                y = self.b.conv(&y, &w, Some(&bias), 2, 0, 1)?;
            }
            for j in 0..depth {
                y = self.convnext_block(cfg, &format!("{s}.blocks.{j}"), cfg.dims[i], &y)?;
            }
        }
        self.b.set_scope("head");
        let pooled = self.b.reduce_mean(&y, &[2, 3], false)?; // [N,C]
        self.ln(&pooled, "head.norm", eps)
    }

    /// `ConvNextBlock`: `x [N,C,H,W] → [N,C,H,W]`.
    fn convnext_block(
        &mut self,
        cfg: &ConvNextConfig,
        pre: &str,
        c: usize,
        x: &Value,
    ) -> Result<Value> {
        self.b.set_scope(pre);
        let k = cfg.kernel_size as i64;
        let w = self.p(&format!("{pre}.conv_dw.weight"))?;
        let bias = self.p(&format!("{pre}.conv_dw.bias"))?;
        let y = self.b.conv(x, &w, Some(&bias), 1, k / 2, c as i64)?;
        let y = self.b.transpose(&y, &[0, 2, 3, 1])?; // [N,H,W,C]
        let y = self.ln(&y, &format!("{pre}.norm"), cfg.layer_norm_eps)?;
        let y = self.mlp(&y, &format!("{pre}.mlp"))?;
        let g = self.p(&format!("{pre}.gamma"))?;
        let y = self.b.mul(&y, &g)?;
        let y = self.b.transpose(&y, &[0, 3, 1, 2])?;
        self.b.add(x, &y)
    }
}

/// Export a classifier (see the module docs for the graph):
/// `image [N,3,S,S] → logits [N,num_classes]` (+ `features [N,D]`). `weights` must hold
/// exactly the model's tensors (timm names, the config's shapes); a missing, mis-shaped or
/// unexpected tensor is an error naming it.
pub fn export(
    cfg: &ClassifierConfig,
    weights: &TensorMap,
    opts: ClassifierExportOptions,
) -> Result<(ModelProto, ExportSummary)> {
    cfg.validate()?;
    let shapes: BTreeMap<String, Vec<usize>> = cfg.param_shapes().into_iter().collect();
    let extra: Vec<&String> = weights
        .keys()
        .filter(|k| !shapes.contains_key(*k))
        .collect();
    if !extra.is_empty() {
        return Err(Error::UnexpectedTensors {
            count: extra.len(),
            names: extra
                .iter()
                .take(10)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let (graph, family) = match cfg {
        ClassifierConfig::Vit(_) => ("vit_classifier", "ViT"),
        ClassifierConfig::ConvNext(_) => ("convnext_classifier", "ConvNeXt"),
    };
    let mut e = Ex {
        b: GraphBuilder::new(graph),
        wt: Weights::new(weights, shapes),
    };
    let s = cfg.image_size();
    let features = match cfg {
        ClassifierConfig::Vit(c) => {
            let x = e.image_input(s, c.mean, c.std, opts.normalize)?;
            e.vit_features(c, &x)?
        }
        ClassifierConfig::ConvNext(c) => {
            let x = e.image_input(s, c.mean, c.std, opts.normalize)?;
            e.convnext_features(c, &x)?
        }
    };
    let logits = match cfg {
        ClassifierConfig::Vit(_) => e.linear(&features, "head")?,
        ClassifierConfig::ConvNext(_) => e.linear(&features, "head.fc")?,
    };
    let nc = cfg.num_classes();
    let fd = cfg.feature_dim();
    e.b.output(
        &logits,
        "logits",
        data_type::FLOAT,
        &[Dim::sym("batch"), nc.into()],
    )?;
    if opts.features {
        e.b.output(
            &features,
            "features",
            data_type::FLOAT,
            &[Dim::sym("batch"), fd.into()],
        )?;
    }
    // Every parameter of the model is exported (nothing more: the builder only records
    // checkpoint-named initializers through `p`).
    let missing: Vec<&String> =
        e.wt.shapes
            .keys()
            .filter(|k| !e.wt.used.contains(*k))
            .collect();
    if !missing.is_empty() {
        return Err(Error::Onnx(format!(
            "{graph}: exporter did not use {} model tensors (first: {})",
            missing.len(),
            missing[0]
        )));
    }
    let input = if opts.normalize {
        "RGB f32 in [0,1]; the preset's (x - mean)/std is applied in-graph".to_string()
    } else {
        "already normalised with the preset's (x - mean)/std".to_string()
    };
    let doc = format!(
        "{family} classifier `{}` exported by gps-seg: image[N,3,{s},{s}] -> logits[N,{nc}]{}; \
         input `image` is {input}.",
        cfg.name(),
        if opts.features {
            format!(", features[N,{fd}] (head-free features)")
        } else {
            String::new()
        }
    );
    let cfg_json = serde_json::to_string(cfg).map_err(|e| Error::msg(e.to_string()))?;
    e.b.set_doc(&doc);
    e.b.add_metadata("gps_seg.graph", graph);
    e.b.add_metadata("gps_seg.classifier_config", &cfg_json);
    e.b.add_metadata("gps_seg.input", &input);
    let node_count = e.b.node_count();
    let param_count = e.b.param_count();
    let param_tensors = e.b.params().len();
    let model = e.b.finish(super::OPSET, super::IR_VERSION)?;
    let names = |v: Option<&Vec<ValueInfoProto>>| -> Vec<String> {
        v.map(|v| v.iter().map(|i| i.name.clone()).collect())
            .unwrap_or_default()
    };
    let g = model.graph.as_ref();
    let summary = ExportSummary {
        graph: graph.into(),
        inputs: names(g.map(|g| &g.input)),
        outputs: names(g.map(|g| &g.output)),
        node_count,
        param_count,
        param_tensors,
        unused: Vec::new(),
        unused_count: 0,
    };
    Ok((model, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamStore;
    use candle_core::{DType, Device, Tensor};

    fn weights(cfg: &ClassifierConfig) -> TensorMap {
        let vs = ParamStore::init(&Device::Cpu, 0);
        crate::models::Classifier::new(cfg, &vs).unwrap();
        vs.current_tensors().unwrap()
    }

    #[test]
    fn exports_every_parameter_and_nothing_else() {
        for name in ["vit_tiny_cpu", "convnext_tiny_cpu"] {
            let cfg = ClassifierConfig::preset(name, 7).unwrap();
            let w = weights(&cfg);
            let (m, s) = export(&cfg, &w, ClassifierExportOptions::default()).unwrap();
            assert_eq!(s.param_count, cfg.param_count(), "{name}");
            assert_eq!(s.param_tensors, cfg.param_shapes().len(), "{name}");
            assert_eq!(s.inputs, vec!["image"]);
            assert_eq!(s.outputs, vec!["logits", "features"]);
            assert!(m.doc_string.contains("[0,1]"), "{}", m.doc_string);
            let opts = ClassifierExportOptions {
                normalize: false,
                features: false,
            };
            let (_, s2) = export(&cfg, &w, opts).unwrap();
            assert_eq!(s2.outputs, vec!["logits"]);
            assert_eq!(s2.param_count, s.param_count);
        }
    }

    #[test]
    fn missing_misshaped_and_unexpected_tensors_are_named() {
        let cfg = ClassifierConfig::preset("convnext_tiny_cpu", 3).unwrap();
        let mut w = weights(&cfg);
        let key = "stages.2.blocks.1.gamma";
        let t = w.remove(key).unwrap();
        let o = ClassifierExportOptions::default();
        let e = export(&cfg, &w, o).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
        w.insert(key.into(), t.reshape((1, 128)).unwrap());
        let e = export(&cfg, &w, o).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
        w.insert(key.into(), t);
        w.insert(
            "extra.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = export(&cfg, &w, o).unwrap_err().to_string();
        assert!(e.contains("extra.weight"), "{e}");
    }
}
