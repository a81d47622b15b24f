//! Integration tests for the classifiers (`gps_seg::models`) and training losses
//! (`gps_seg::train::loss`): shapes, gradient coverage, parameter counts of the full presets
//! (checked against timm's published counts by independent arithmetic), the Hugging Face ↔
//! timm renaming round trip, and a short training run that must raise accuracy.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::images;
use gps_seg::models::names::timm_vit_to_hf;
use gps_seg::models::{Classifier, ClassifierConfig, ConvNextConfig, VitConfig};
use gps_seg::nn::ParamStore;
use gps_seg::train::loss::{cross_entropy, supcon_two_views};
use gps_seg::util::Rng;

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tiny_presets() -> Vec<ClassifierConfig> {
    vec![
        ClassifierConfig::preset("vit_tiny_cpu", 10).unwrap(),
        ClassifierConfig::preset("convnext_tiny_cpu", 10).unwrap(),
    ]
}

#[test]
fn tiny_presets_forward_shapes() {
    for cfg in tiny_presets() {
        let vs = ParamStore::init(&Device::Cpu, 0);
        let m = Classifier::new(&cfg, &vs).unwrap();
        for b in [1, 3] {
            let x = images(b, cfg.image_size(), b as u64);
            let f = m.features(&x).unwrap();
            assert_eq!(f.dims(), &[b, cfg.feature_dim()], "{}", cfg.name());
            let y = m.forward(&x).unwrap();
            assert_eq!(y.dims(), &[b, 10], "{}", cfg.name());
            assert!(max_abs(&y).is_finite());
        }
        let (_, total) = vs.counts();
        assert_eq!(total, cfg.param_count(), "{}", cfg.name());
    }
}

#[test]
fn gradient_reaches_every_parameter_through_the_head() {
    for cfg in tiny_presets() {
        let vs = ParamStore::init(&Device::Cpu, 1);
        let m = Classifier::new(&cfg, &vs).unwrap();
        let labels = Tensor::new(&[3u32, 7], &Device::Cpu).unwrap();
        let loss = cross_entropy(
            &m.forward(&images(2, cfg.image_size(), 5)).unwrap(),
            &labels,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = vs.trainable_vars();
        assert_eq!(vars.len(), cfg.param_shapes().len());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", cfg.name()));
            let a = max_abs(g);
            assert!(
                a > 0.0 && a.is_finite(),
                "{}: gradient of {name} is {a}",
                cfg.name()
            );
        }
    }
}

#[test]
fn supcon_on_features_reaches_the_backbone_but_not_the_head() {
    for cfg in tiny_presets() {
        let vs = ParamStore::init(&Device::Cpu, 2);
        let m = Classifier::new(&cfg, &vs).unwrap();
        let s = cfg.image_size();
        let x = images(3, s, 6);
        // Second view: horizontal flip.
        let idx: Vec<u32> = (0..s as u32).rev().collect();
        let flip = x
            .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 3)
            .unwrap();
        let labels = Tensor::new(&[0u32, 1, 0], &Device::Cpu).unwrap();
        let loss = supcon_two_views(
            &m.features(&x).unwrap(),
            &m.features(&flip).unwrap(),
            &labels,
            0.07,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vs.trainable_vars() {
            let g = grads.get(var.as_tensor()).map(max_abs).unwrap_or(0.0);
            if name.starts_with("head.fc")
                || name.starts_with("head.weight")
                || name.starts_with("head.bias")
            {
                assert_eq!(g, 0.0, "{}: head {name} got a gradient", cfg.name());
            } else {
                assert!(g > 0.0, "{}: no SupCon gradient for {name}", cfg.name());
            }
        }
    }
}

#[test]
fn full_preset_parameter_counts_match_timm() {
    // ViT-B/16, 1000 classes, by hand: patch embed 768·3·16·16 + 768; cls 768; pos 197·768;
    // per block 2·(2·768) norms + (768·2304 + 2304) qkv + (768² + 768) proj
    //   + (768·3072 + 3072) fc1 + (3072·768 + 768) fc2; final norm 2·768; head 768·1000 + 1000.
    let d = 768usize;
    let block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d);
    let vit = (d * 3 * 256 + d) + d + 197 * d + 12 * block + 2 * d + (d * 1000 + 1000);
    assert_eq!(vit, 86_567_656); // timm vit_base_patch16_224 (1000 classes)
    let cfg = ClassifierConfig::Vit(VitConfig::vit_b16());
    assert_eq!(cfg.param_count(), vit);
    // 21k-class head of the ImageNet-21k checkpoint: 768·21843 + 21843 more head entries.
    let in21k = ClassifierConfig::Vit(VitConfig::vit_b16().with_num_classes(21843));
    assert_eq!(in21k.param_count(), vit - 769_000 + (d * 21843 + 21843));

    // ConvNeXt-B, 1000 classes: stem 3·128·16 + 128 + LN 2·128; block(C) = dw 49C + C, LN 2C,
    // fc1 4C² + 4C, fc2 4C² + C, gamma C; downsample(P→C) = LN 2P + conv 4PC + C;
    // head LN 2·1024 + fc 1024·1000 + 1000.
    let blk = |c: usize| 50 * c + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c) + c;
    let ds = |p: usize, c: usize| 2 * p + 4 * p * c + c;
    let cnx = (3 * 128 * 16 + 128 + 256)
        + 3 * blk(128)
        + ds(128, 256)
        + 3 * blk(256)
        + ds(256, 512)
        + 27 * blk(512)
        + ds(512, 1024)
        + 3 * blk(1024)
        + (2 * 1024 + 1024 * 1000 + 1000);
    assert_eq!(cnx, 88_591_464); // timm convnext_base (1000 classes)
    let cfg = ClassifierConfig::ConvNext(ConvNextConfig::convnext_b());
    assert_eq!(cfg.param_count(), cnx);

    // The CPU presets (10 classes), same formulas.
    let cnx_tiny = (3 * 32 * 16 + 32 + 64)
        + blk(32)
        + ds(32, 64)
        + blk(64)
        + ds(64, 128)
        + 2 * blk(128)
        + ds(128, 256)
        + blk(256)
        + (2 * 256 + 256 * 10 + 10);
    let tiny = ClassifierConfig::preset("convnext_tiny_cpu", 10).unwrap();
    assert_eq!(tiny.param_count(), cnx_tiny);
    let d = 192usize;
    let block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d);
    let vit_tiny = (d * 3 * 64 + d) + d + 65 * d + 6 * block + 2 * d + (d * 10 + 10);
    let tiny = ClassifierConfig::preset("vit_tiny_cpu", 10).unwrap();
    assert_eq!(tiny.param_count(), vit_tiny);
}

#[test]
fn huggingface_names_round_trip_to_the_same_outputs() {
    let cfg = VitConfig::tiny().with_num_classes(4);
    let vs = ParamStore::init(&Device::Cpu, 3);
    let ccfg = ClassifierConfig::Vit(cfg.clone());
    let a = Classifier::new(&ccfg, &vs).unwrap();
    let x = images(2, cfg.image_size, 9);
    let ya = a.forward(&x).unwrap();

    let timm = vs.current_tensors().unwrap();
    let mut hf = timm_vit_to_hf(timm.clone()).unwrap();
    assert!(hf.contains_key("vit.encoder.layer.5.attention.attention.value.weight"));
    assert!(hf.contains_key("classifier.weight"));
    assert!(!hf
        .keys()
        .any(|k| k.contains("qkv") || k.starts_with("blocks.")));
    // HF's pooler is not part of timm's model: dropped and reported.
    hf.insert(
        "vit.pooler.dense.weight".into(),
        Tensor::zeros((192, 192), DType::F32, &Device::Cpu).unwrap(),
    );
    let (back, report) = ccfg.adapt_checkpoint(hf, 0).unwrap();
    assert!(report.converted_from.is_some());
    assert_eq!(report.dropped.len(), 1);
    assert!(report.reinitialised.is_empty() && report.resized.is_empty());
    assert_eq!(back.len(), timm.len());
    for (k, t) in &timm {
        let d = max_abs(&(t - &back[k]).unwrap());
        assert_eq!(d, 0.0, "{k} changed in the round trip");
    }
    let store = ParamStore::frozen(back, &Device::Cpu);
    let b = Classifier::new(&ccfg, &store).unwrap();
    store.check_all_used().unwrap();
    let yb = b.forward(&x).unwrap();
    // The same frozen code path on the original tensors: bit-identical outputs.
    let orig = ParamStore::frozen(timm.clone(), &Device::Cpu);
    let yo = Classifier::new(&ccfg, &orig).unwrap().forward(&x).unwrap();
    assert_eq!(max_abs(&(&yo - &yb).unwrap()), 0.0);
    // The trainable model takes the plain matmul + bias add, the frozen one the gemm with the
    // bias folded in (another rounding order): equal to float precision.
    let d = max_abs(&(ya - yb).unwrap());
    assert!(d < 1e-5, "trainable vs frozen outputs differ by {d}");
}

/// Three classes told apart by which colour channel dominates, with noise.
fn colour_problem(n: usize, s: usize, seed: u64) -> (Tensor, Tensor, Vec<u32>) {
    let mut r = Rng::new(seed);
    let mut px = Vec::with_capacity(n * 3 * s * s);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i % 3) as u32;
        labels.push(c);
        for ch in 0..3u32 {
            let base = if ch == c { 0.65 } else { 0.35 };
            for _ in 0..s * s {
                px.push((base + 0.25 * r.normal()).clamp(0.0, 1.0));
            }
        }
    }
    let x = Tensor::from_vec(px, (n, 3, s, s), &Device::Cpu).unwrap();
    let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    (x, y, labels)
}

fn accuracy(logits: &Tensor, labels: &[u32]) -> f64 {
    let pred = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    pred.iter().zip(labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64
}

/// Plain Adam (no weight decay) over `vars`, written out so the test depends on nothing else.
struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    lr: f64,
}

impl Adam {
    fn new(vars: Vec<Var>, lr: f64) -> Self {
        let m = vars.iter().map(|v| v.zeros_like().unwrap()).collect();
        let v2 = vars.iter().map(|v| v.zeros_like().unwrap()).collect();
        Adam {
            vars,
            m,
            v: v2,
            t: 0,
            lr,
        }
    }

    fn step(&mut self, loss: &Tensor) {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        let grads = loss.backward().unwrap();
        self.t += 1;
        for i in 0..self.vars.len() {
            let Some(g) = grads.get(self.vars[i].as_tensor()) else {
                continue;
            };
            self.m[i] = ((&self.m[i] * b1).unwrap() + (g * (1.0 - b1)).unwrap()).unwrap();
            self.v[i] =
                ((&self.v[i] * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let mh = (&self.m[i] / (1.0 - b1.powi(self.t))).unwrap();
            let vh = (&self.v[i] / (1.0 - b2.powi(self.t))).unwrap();
            let upd = (mh / (vh.sqrt().unwrap() + eps).unwrap()).unwrap();
            let new = (self.vars[i].as_tensor() - (upd * self.lr).unwrap()).unwrap();
            self.vars[i].set(&new).unwrap();
        }
    }
}

#[test]
fn a_few_adam_steps_raise_training_accuracy() {
    let micro_vit = ClassifierConfig::Vit(VitConfig {
        name: "micro".into(),
        image_size: 16,
        patch_size: 4,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_dim: 64,
        num_classes: 3,
        ..VitConfig::vit_b16()
    });
    let micro_cnx = ClassifierConfig::ConvNext(ConvNextConfig {
        name: "micro".into(),
        image_size: 16,
        depths: vec![1, 1],
        dims: vec![16, 32],
        num_classes: 3,
        ..ConvNextConfig::convnext_b()
    });
    let (x, y, labels) = colour_problem(24, 16, 11);
    for cfg in [micro_vit, micro_cnx] {
        let vs = ParamStore::init(&Device::Cpu, 4);
        let m = Classifier::new(&cfg, &vs).unwrap();
        let before = accuracy(&m.forward(&x).unwrap(), &labels);
        let loss0 = cross_entropy(&m.forward(&x).unwrap(), &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let mut opt = Adam::new(
            vs.trainable_vars().into_iter().map(|(_, v)| v).collect(),
            3e-3,
        );
        for _ in 0..30 {
            let loss = cross_entropy(&m.forward(&x).unwrap(), &y).unwrap();
            opt.step(&loss);
        }
        let logits = m.forward(&x).unwrap();
        let after = accuracy(&logits, &labels);
        let loss1 = cross_entropy(&logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(loss1 < loss0, "{}: loss {loss0} → {loss1}", cfg.name());
        assert!(
            after >= 0.9 && after > before,
            "{}: training accuracy {before} → {after}",
            cfg.name()
        );
    }
}

#[test]
fn sparse_gps_roles_get_gradients_through_both_models() {
    use gps_seg::nn::Role;
    use std::collections::HashMap;
    for cfg in tiny_presets() {
        // Pretrained stand-in: a fresh model's weights.
        let init = ParamStore::init(&Device::Cpu, 7);
        Classifier::new(&cfg, &init).unwrap();
        let weights = init.current_tensors().unwrap();
        // GPS-like roles: every weight with ≥ 2 dims gets one selected entry per output row
        // (the middle one: the centre tap of a 7×7 kernel, which still sees a 2×2 map),
        // biases/gamma/head train fully, norms/pos_embed/cls_token stay frozen.
        let mut roles = HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            let frozen = name.contains("norm") || name == "pos_embed" || name == "cls_token";
            let role = if name.starts_with("head.") && !name.contains("norm") {
                Role::Trainable
            } else if shape.len() >= 2 && !frozen {
                let row: usize = shape[1..].iter().product();
                Role::Sparse((0..shape[0]).map(|r| (r * row + row / 2) as u32).collect())
            } else if frozen {
                Role::Frozen
            } else {
                Role::Trainable
            };
            roles.insert(name, role);
        }
        let vs = ParamStore::with_roles(weights, roles, &Device::Cpu);
        let m = Classifier::new(&cfg, &vs).unwrap();
        vs.check_all_used().unwrap();
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let loss = cross_entropy(
            &m.forward(&images(2, cfg.image_size(), 8)).unwrap(),
            &labels,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        let (trainable, total) = vs.counts();
        assert!(
            trainable > 0 && trainable < total / 10,
            "{trainable} of {total}"
        );
        for (name, var) in vs.trainable_vars() {
            let g = grads.get(var.as_tensor()).map(max_abs).unwrap_or(0.0);
            assert!(g > 0.0, "{}: no gradient for {name}", cfg.name());
        }
    }
}

/// Out-of-range classifier config fields are refused by `validate` (and by construction,
/// before anything is allocated), naming the field; every preset validates.
#[test]
fn bad_classifier_configs_name_the_field() {
    type VitEdit = fn(&mut VitConfig);
    let vit: [(&str, VitEdit); 10] = [
        ("image_size", |c| c.image_size = 0),
        ("image_size", |c| c.image_size = 1 << 40),
        ("image_size", |c| {
            c.image_size = 4096;
            c.patch_size = 1
        }),
        ("patch_size", |c| c.patch_size = 0),
        ("embed_dim", |c| c.embed_dim = 0),
        ("num_heads", |c| c.num_heads = 5),
        ("depth", |c| c.depth = 100_000),
        ("mlp_dim", |c| c.mlp_dim = 0),
        ("num_classes", |c| c.num_classes = usize::MAX),
        ("layer_norm_eps", |c| c.layer_norm_eps = f64::NAN),
    ];
    for (field, edit) in vit {
        let mut c = VitConfig::tiny();
        edit(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        let vs = ParamStore::init(&Device::Cpu, 0);
        assert!(Classifier::new(&ClassifierConfig::Vit(c), &vs).is_err());
    }
    type CnEdit = fn(&mut ConvNextConfig);
    let convnext: [(&str, CnEdit); 8] = [
        ("dims", |c| c.dims = vec![]),
        ("dims", |c| c.dims[1] = 0),
        ("dims", |c| {
            c.dims = vec![8; 64];
            c.depths = vec![1; 64]
        }),
        ("depths", |c| c.depths[0] = 1_000_000),
        ("kernel_size", |c| c.kernel_size = 4),
        ("mlp_ratio", |c| c.mlp_ratio = 0),
        ("image_size", |c| c.image_size = 1 << 40),
        ("std", |c| c.std = [0.2, f32::INFINITY, 0.2]),
    ];
    for (field, edit) in convnext {
        let mut c = ConvNextConfig::tiny();
        edit(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        let vs = ParamStore::init(&Device::Cpu, 0);
        assert!(Classifier::new(&ClassifierConfig::ConvNext(c), &vs).is_err());
    }
    for p in ClassifierConfig::PRESETS {
        ClassifierConfig::preset(p, 1000)
            .unwrap()
            .validate()
            .unwrap();
    }
    // Within every bound but far beyond memory: refused before allocating, saying how much.
    let mut huge = VitConfig::tiny();
    huge.embed_dim = 4096;
    huge.num_heads = 64;
    huge.depth = 64;
    huge.mlp_dim = 16384;
    huge.validate().unwrap();
    assert!(huge.estimate_bytes(1) > 40 << 30);
    let avail = gps_seg::util::mem::available_bytes().unwrap_or(u64::MAX);
    if huge.estimate_bytes(1) > avail {
        let vs = ParamStore::init(&Device::Cpu, 0);
        let e = Classifier::new(&ClassifierConfig::Vit(huge), &vs)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("would need about"), "{e}");
    }
    // A checkpoint with an empty or non-square position table is refused by name.
    let cfg = ClassifierConfig::Vit(VitConfig::tiny());
    let vs = ParamStore::init(&Device::Cpu, 1);
    Classifier::new(&cfg, &vs).unwrap();
    for shape in [[1usize, 0, 192], [1, 7, 192]] {
        let mut map = vs.current_tensors().unwrap();
        map.insert(
            "pos_embed".into(),
            Tensor::zeros(&shape[..], DType::F32, &Device::Cpu).unwrap(),
        );
        let e = cfg.adapt_checkpoint(map, 0).unwrap_err().to_string();
        assert!(e.contains("pos_embed"), "{shape:?}: {e}");
    }
    let tiny = VitConfig::tiny().estimate_bytes(1);
    assert!(tiny > 4 * 2_000_000 && tiny < 100 << 20, "{tiny}");
    assert!(ConvNextConfig::tiny().estimate_bytes(1) < 100 << 20);
}
