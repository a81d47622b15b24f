//! Integration tests of the SAM port: shapes, gradient flow, parity with Meta's implementation
//! (fixture made by `scripts/make_sam_fixture.py` with PyPI `segment-anything` + `torch`), and
//! checkpoint errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bin, images, snapshot};
use gps_seg::nn::{Precision, RolePolicy};
use gps_seg::sam::{self, Sam, SamConfig};
use gps_seg::util::tensors::{self, TensorMap};
use gps_seg::util::Rng;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sam_tiny")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    gps_seg::nn::gradcheck::max_abs_diff(a, b).unwrap() as f32
}

#[test]
fn tiny_shapes_at_batch_1_and_3_both_paths() {
    let cfg = SamConfig::tiny();
    let (model, vs) = sam::build(&cfg, None, RolePolicy::AllFrozen, &Device::Cpu, 7).unwrap();
    assert_eq!(vs.counts().1, 3_813_760);
    let g = cfg.grid_size();
    let s = cfg.image_size;
    for b in [1, 3] {
        let x = images(b, s, b as u64);
        let out = model.forward_prompt_free(&x).unwrap();
        assert_eq!(out.dims(), &[b, 1, s, s]);
        let emb = model
            .image_embeddings(&model.normalize(&x).unwrap())
            .unwrap();
        assert_eq!(emb.dims(), &[b, cfg.prompt_embed_dim, g, g]);
        assert_eq!(
            model.decode_prompt_free(&emb).unwrap().dims(),
            &[b, 1, 4 * g, 4 * g]
        );
        let coords = Tensor::ones((b, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::ones((b, 2), DType::F32, &Device::Cpu).unwrap();
        let boxes = Tensor::new(&[10f32, 20., 100., 200.], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((b, 1))
            .unwrap();
        for (pts, bx, mm, m) in [
            (true, false, true, 3),
            (true, true, false, 1),
            (false, true, true, 3),
            (false, false, false, 1),
        ] {
            let (masks, iou) = model
                .forward_prompted(
                    &emb,
                    pts.then_some((&coords, &labels)),
                    bx.then_some(&boxes),
                    mm,
                )
                .unwrap();
            assert_eq!(masks.dims(), &[b, m, 4 * g, 4 * g]);
            assert_eq!(iou.dims(), &[b, m]);
        }
    }
    // Batch mismatch between prompts and images is an error, not a panic.
    let emb = Tensor::zeros((2, cfg.prompt_embed_dim, g, g), DType::F32, &Device::Cpu).unwrap();
    let bx = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .forward_prompted(&emb, None, Some(&bx), false)
        .is_err());
    // Wrong image size is an error naming the expected shape.
    let e = model
        .forward_prompt_free(&images(1, 128, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("256"), "{e}");
}

#[test]
fn gradient_reaches_every_param_the_prompt_free_path_uses() {
    let cfg = SamConfig::tiny();
    let (model, vs) = sam::build(&cfg, None, RolePolicy::AllTrainable, &Device::Cpu, 3).unwrap();
    let x = images(2, cfg.image_size, 11);
    let logits = model.forward_prompt_free(&x).unwrap();
    // BCE with logits against a fixed random mask.
    let mut r = Rng::new(5);
    let t: Vec<f32> = (0..logits.elem_count())
        .map(|_| if r.bernoulli(0.3) { 1.0 } else { 0.0 })
        .collect();
    let target = Tensor::from_vec(t, logits.shape(), &Device::Cpu).unwrap();
    let sp = (logits.exp().unwrap() + 1.0).unwrap().log().unwrap(); // softplus
    let loss = (sp - (&logits * &target).unwrap())
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut no_grad = BTreeSet::new();
    let vars = vs.trainable_vars();
    assert_eq!(
        vars.len(),
        Sam::param_shapes(&cfg).len() - 1,
        "all but the buffer"
    );
    for (name, var) in &vars {
        let nonzero = grads.get(var.as_tensor()).is_some_and(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
        if !nonzero {
            no_grad.insert(name.clone());
        }
    }
    let expected: BTreeSet<String> = Sam::prompt_free_unused(&cfg).into_iter().collect();
    // point_embeddings.{0..3}, not_a_point_embed, mask_downscaling.{0,1,3,4,6} (w+b),
    // hypernetworks 1..3 (3 layers × w+b each), iou head (3 layers × w+b).
    assert_eq!(expected.len(), 4 + 1 + 10 + 18 + 6);
    assert_eq!(no_grad, expected);
}

#[test]
fn single_mask_shortcut_equals_decoder_forward() {
    let cfg = SamConfig::tiny();
    let (model, _) = sam::build(&cfg, None, RolePolicy::AllFrozen, &Device::Cpu, 9).unwrap();
    let g = cfg.grid_size();
    let mut r = Rng::new(2);
    let n = 2 * cfg.prompt_embed_dim * g * g;
    let emb = Tensor::from_vec(
        (0..n).map(|_| r.normal()).collect::<Vec<f32>>(),
        (2, cfg.prompt_embed_dim, g, g),
        &Device::Cpu,
    )
    .unwrap();
    let fast = model.decode_prompt_free(&emb).unwrap();
    let (full, iou) = model.forward_prompted(&emb, None, None, false).unwrap();
    assert_eq!(iou.dims(), &[2, 1]);
    assert!(max_abs_diff(&fast, &full) < 1e-5);
}

#[test]
fn parity_with_meta_segment_anything() {
    let dev = Device::Cpu;
    let cfg = SamConfig::tiny();
    let weights = sam::load_weights(&fixture("weights.safetensors"), &cfg, &dev).unwrap();
    let io = tensors::load(&fixture("io.safetensors"), &dev).unwrap();
    let (model, _) = sam::build(&cfg, Some(weights), RolePolicy::AllFrozen, &dev, 0).unwrap();
    let tol = 1e-4;
    let x = &io["images"];
    let emb = model
        .image_embeddings(&model.normalize(x).unwrap())
        .unwrap();
    let d = max_abs_diff(&emb, &io["embeddings"]);
    eprintln!("embeddings: max abs diff {d:e}");
    assert!(d < tol, "embeddings differ by {d}");
    let low = model.decode_prompt_free(&emb).unwrap();
    let d = max_abs_diff(&low, &io["low_res"]);
    eprintln!("prompt-free low-res logits: max abs diff {d:e}");
    assert!(d < tol, "prompt-free low-res logits differ by {d}");
    let up = model.forward_prompt_free(x).unwrap();
    let d = max_abs_diff(&up, &io["upsampled"]);
    eprintln!("prompt-free upsampled logits: max abs diff {d:e}");
    assert!(d < tol, "prompt-free upsampled logits differ by {d}");
    let (masks, iou) = model
        .forward_prompted(
            &emb,
            Some((&io["point_coords"], &io["point_labels"])),
            Some(&io["boxes"]),
            true,
        )
        .unwrap();
    let d = max_abs_diff(&masks, &io["prompted_masks"]);
    eprintln!("prompted masks: max abs diff {d:e}");
    assert!(d < tol, "prompted masks differ by {d}");
    let d = max_abs_diff(&iou, &io["prompted_iou"]);
    eprintln!("prompted iou: max abs diff {d:e}");
    assert!(d < tol, "prompted iou differs by {d}");
}

#[test]
fn checkpoint_made_for_another_size_is_resized() {
    let dev = Device::Cpu;
    let cfg = SamConfig::tiny().with_image_size(128);
    let w = sam::load_weights(&fixture("weights.safetensors"), &cfg, &dev).unwrap();
    assert_eq!(w["image_encoder.pos_embed"].dims(), &[1, 8, 8, 192]);
    assert_eq!(w["image_encoder.blocks.2.attn.rel_pos_h"].dims(), &[15, 64]);
    assert_eq!(w["image_encoder.blocks.0.attn.rel_pos_h"].dims(), &[15, 64]); // window 8
    let (model, _) = sam::build(&cfg, Some(w), RolePolicy::AllFrozen, &dev, 0).unwrap();
    let out = model.forward_prompt_free(&images(1, 128, 1)).unwrap();
    assert_eq!(out.dims(), &[1, 1, 128, 128]);
}

#[test]
fn bad_checkpoints_give_errors_that_name_the_tensor_or_file() {
    let dev = Device::Cpu;
    let cfg = SamConfig::tiny();
    let good = tensors::load(&fixture("weights.safetensors"), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let try_load = |m: &TensorMap, file: &str| -> String {
        let p = dir.path().join(file);
        tensors::save_safetensors(&p, m, None).unwrap();
        let w = match sam::load_weights(&p, &cfg, &dev) {
            Ok(w) => w,
            Err(e) => return e.to_string(),
        };
        match sam::build(&cfg, Some(w), RolePolicy::AllFrozen, &dev, 0) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let name = "mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.weight";
    let mut m = good.clone();
    m.remove(name);
    let e = try_load(&m, "missing.safetensors");
    assert!(e.contains(name), "{e}");

    let mut m = good.clone();
    m.insert(
        name.into(),
        Tensor::zeros((64, 64), DType::F32, &dev).unwrap(),
    );
    let e = try_load(&m, "shape.safetensors");
    assert!(
        e.contains(name) && e.contains("[64, 64]") && e.contains("[64, 128]"),
        "{e}"
    );

    let mut m = good.clone();
    m.insert(
        "image_encoder.pos_embed".into(),
        Tensor::zeros((1, 16, 16, 100), DType::F32, &dev).unwrap(),
    );
    let e = try_load(&m, "pos.safetensors");
    assert!(
        e.contains("image_encoder.pos_embed") && e.contains("[1, 16, 16, 100]"),
        "{e}"
    );

    let mut m = good.clone();
    m.insert(
        "image_encoder.blocks.9.extra".into(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    let e = try_load(&m, "extra.safetensors");
    assert!(e.contains("image_encoder.blocks.9.extra"), "{e}");

    let junk = dir.path().join("sam_garbage.pth");
    std::fs::write(&junk, b"PK\x03\x04 definitely not a torch zip").unwrap();
    let e = sam::load_weights(&junk, &cfg, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sam_garbage.pth"), "{e}");
}

#[test]
fn checkpointed_encoder_backward_matches_full_backward() {
    let cfg = SamConfig::tiny();
    let (model, vs) = sam::build(&cfg, None, RolePolicy::AllTrainable, &Device::Cpu, 21).unwrap();
    let x = images(2, cfg.image_size, 4);
    let mut r = Rng::new(8);
    let s = cfg.image_size;
    let w = Tensor::from_vec(
        (0..2 * s * s).map(|_| r.normal()).collect::<Vec<f32>>(),
        (2, 1, s, s),
        &Device::Cpu,
    )
    .unwrap();
    let loss_fn = |y: &Tensor| -> gps_seg::Result<Tensor> { Ok((y.tanh()? * &w)?.sum_all()?) };
    let full_loss = loss_fn(&model.forward_prompt_free(&x).unwrap()).unwrap();
    let full = full_loss.backward().unwrap();
    let (ck_loss, ck) = model
        .prompt_free_backward_checkpointed(&x, loss_fn)
        .unwrap();
    let (a, b) = (
        full_loss.to_scalar::<f32>().unwrap(),
        ck_loss.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    let mut compared = 0;
    for (name, var) in vs.trainable_vars() {
        match (full.get(var.as_tensor()), ck.get(var.as_tensor())) {
            (None, None) => {}
            (Some(f), Some(c)) => {
                let scale = (gps_seg::nn::gradcheck::max_abs(f).unwrap() as f32).max(1e-6);
                let d = max_abs_diff(f, c);
                assert!(d <= 1e-4 * scale, "{name}: differs by {d} (scale {scale})");
                compared += 1;
            }
            (f, c) => panic!(
                "{name}: full has grad {}, checkpointed {}",
                f.is_some(),
                c.is_some()
            ),
        }
    }
    assert!(compared > 100, "{compared}");
}

#[test]
fn prompted_path_trains_the_prompt_embeddings_and_multimask_heads() {
    let cfg = SamConfig::tiny();
    let dev = Device::Cpu;
    let (model, vs) = sam::build(&cfg, None, RolePolicy::AllTrainable, &dev, 5).unwrap();
    let g = cfg.grid_size();
    let mut r = Rng::new(3);
    let n = 2 * cfg.prompt_embed_dim * g * g;
    let emb = Tensor::from_vec(
        (0..n).map(|_| r.normal()).collect::<Vec<f32>>(),
        (2, cfg.prompt_embed_dim, g, g),
        &dev,
    )
    .unwrap();
    let coords = Tensor::new(&[[[10f32, 20.], [100., 50.], [0., 0.]]; 2], &dev).unwrap();
    let labels = Tensor::new(&[[1f32, 0., -1.]; 2], &dev).unwrap();
    let boxes = Tensor::new(&[[5f32, 5., 200., 180.]; 2], &dev).unwrap();
    let (masks, iou) = model
        .forward_prompted(&emb, Some((&coords, &labels)), Some(&boxes), true)
        .unwrap();
    let loss = (masks.tanh().unwrap().sum_all().unwrap() + iou.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars: std::collections::HashMap<String, _> = vs.trainable_vars().into_iter().collect();
    let has_grad = |name: &str| {
        grads.get(vars[name].as_tensor()).is_some_and(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
    };
    for i in 0..4 {
        assert!(
            has_grad(&format!("prompt_encoder.point_embeddings.{i}.weight")),
            "{i}"
        );
    }
    assert!(has_grad("prompt_encoder.not_a_point_embed.weight"));
    assert!(has_grad("prompt_encoder.no_mask_embed.weight"));
    for i in 1..4 {
        let n = format!("mask_decoder.output_hypernetworks_mlps.{i}.layers.2.weight");
        assert!(has_grad(&n), "{n}");
    }
    assert!(!has_grad(
        "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"
    ));
    assert!(has_grad("mask_decoder.iou_prediction_head.layers.0.weight"));
    assert!(!has_grad("prompt_encoder.mask_downscaling.0.weight"));
}

/// The fixture's tensors with `name` replaced by `t`, saved as `file` in `dir`.
fn with_tensor(dir: &Path, file: &str, name: &str, t: Tensor) -> PathBuf {
    let mut m = tensors::load(&fixture("weights.safetensors"), &Device::Cpu).unwrap();
    m.insert(name.into(), t);
    let p = dir.join(file);
    tensors::save_safetensors(&p, &m, None).unwrap();
    p
}

/// Malformed shapes read from a file are refused before use, naming the tensor and the file:
/// `info` on a 1-D patch embedding, a scalar / zero-grid `pos_embed`, a zero-length rel-pos
/// table (info, and loading for another size, where it used to panic in the interpolation).
#[test]
fn malformed_shapes_are_errors_naming_the_tensor_and_file() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let cases: [(&str, &str, Tensor); 5] = [
        (
            "pe1d.safetensors",
            "image_encoder.patch_embed.proj.weight",
            z(&[192]),
        ),
        (
            "pescalar.safetensors",
            "image_encoder.pos_embed",
            Tensor::new(1f32, &dev).unwrap(),
        ),
        (
            "pe0.safetensors",
            "image_encoder.pos_embed",
            z(&[1, 0, 0, 192]),
        ),
        (
            "rel0.safetensors",
            "image_encoder.blocks.0.attn.rel_pos_h",
            z(&[0, 64]),
        ),
        (
            "relodd.safetensors",
            "image_encoder.blocks.1.attn.rel_pos_w",
            z(&[15, 0]),
        ),
    ];
    for (file, name, t) in cases {
        let bad = with_tensor(dir.path(), file, name, t);
        let spec = bad.to_str().unwrap();
        let shown_name = if name.ends_with("rel_pos_w") {
            // info reads rel_pos_h only; the zero-width rel_pos_w is found at build time.
            None
        } else {
            Some(name)
        };
        match sam::info::model_info(spec) {
            Ok(i) => assert!(
                shown_name.is_none(),
                "{file}: info accepted it: {:?}",
                i.config
            ),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(file), "{file}: {e}");
                assert!(e.contains(shown_name.unwrap_or(name)), "{file}: {e}");
            }
        }
        // Loading for the tiny config and for another input size (tables resized).
        for cfg in [SamConfig::tiny(), SamConfig::tiny().with_image_size(128)] {
            let e = match sam::load_weights(&bad, &cfg, &dev) {
                Err(e) => e.to_string(),
                Ok(w) => sam::build(&cfg, Some(w), RolePolicy::AllFrozen, &dev, 0)
                    .map(|_| ())
                    .unwrap_err()
                    .to_string(),
            };
            assert!(e.contains(name), "{file} at {}: {e}", cfg.image_size);
        }
    }
}

/// Out-of-range config fields are refused by `validate`, naming the field.
#[test]
fn bad_config_values_name_the_field() {
    type Edit = fn(&mut SamConfig);
    let cases: [(&str, Edit); 14] = [
        ("image_size", |c| c.image_size = 0),
        ("image_size", |c| c.image_size = 1 << 40),
        ("image_size", |c| c.image_size = 1_048_576),
        ("image_size", |c| c.image_size = 250),
        ("patch_size", |c| c.patch_size = 0),
        ("encoder_embed_dim", |c| c.encoder_embed_dim = 0),
        ("encoder_num_heads", |c| c.encoder_num_heads = 5),
        ("mlp_ratio", |c| c.mlp_ratio = 0.0),
        ("mlp_ratio", |c| c.mlp_ratio = -1.0),
        ("mlp_ratio", |c| c.mlp_ratio = f64::NAN),
        ("mlp_ratio", |c| c.mlp_ratio = 1e9),
        ("encoder_depth", |c| c.encoder_depth = 1000),
        ("encoder_global_attn_indexes", |c| {
            c.encoder_global_attn_indexes = vec![6]
        }),
        ("pixel_std", |c| c.pixel_std = [1.0, 0.0, 1.0]),
    ];
    for (field, edit) in cases {
        let mut c = SamConfig::tiny();
        edit(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        // Building refuses it too, before allocating anything.
        let vs = gps_seg::nn::ParamStore::init(&Device::Cpu, 0);
        assert!(Sam::new(&c, &vs).is_err(), "{field}");
    }
    for p in SamConfig::PRESETS {
        SamConfig::preset(p).unwrap().validate().unwrap();
    }
    // The largest accepted size of the largest preset still validates.
    SamConfig::vit_h().with_image_size(4096).validate().unwrap();
}

/// Oversized requests are refused with how much memory they would need: an image size the
/// bounds allow but a batch no machine holds, and the `--image-size` override of `resolve`.
#[test]
fn oversized_sizes_are_refused() {
    let c = SamConfig::vit_h().with_image_size(4096);
    let one = c.estimate_bytes(1).unwrap();
    let many = c.estimate_bytes(100_000).unwrap();
    assert!(many > 1000 * one, "{one} vs {many}");
    assert!(c.estimate_training_bytes(1).unwrap() > one);
    let e = c.check_memory(100, true).unwrap_err().to_string();
    assert!(
        e.contains("vit_h") && e.contains("would need about") && e.contains("TiB"),
        "{e}"
    );
    assert!(c.estimate_bytes(usize::MAX).is_err());
    // The tiny model's estimate is small and fits.
    let t = SamConfig::tiny();
    assert!(t.estimate_bytes(1).unwrap() < 1 << 30);
    t.check_memory(1, false).unwrap();
    let w = fixture("weights.safetensors");
    let w = w.to_str().unwrap();
    for s in [0usize, 8, 1_048_576, 1 << 40] {
        let e = gps_seg::registry::resolve_sam(w, Some(s))
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_size"), "{s}: {e}");
    }
    assert_eq!(
        gps_seg::registry::resolve_sam(w, Some(128))
            .unwrap()
            .1
            .image_size,
        128
    );
}

/// A config JSON beside a checkpoint that does not parse or validate is an error naming the
/// file (and the field); a run folder's `config.json` (a training config) is not taken for one.
#[test]
fn bad_config_json_beside_a_checkpoint_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("model.safetensors");
    std::fs::copy(fixture("weights.safetensors"), &w).unwrap();
    let ws = w.to_str().unwrap();
    let mut good = serde_json::to_value(SamConfig::tiny()).unwrap();
    // No config: inferred from shapes.
    assert_eq!(
        gps_seg::registry::resolve_sam(ws, None)
            .unwrap()
            .1
            .image_size,
        256
    );
    // A training config.json is ignored.
    let cj = dir.path().join("config.json");
    std::fs::write(&cj, r#"{"method": "gps", "sam": {"image_size": 64}}"#).unwrap();
    assert_eq!(
        gps_seg::registry::resolve_sam(ws, None)
            .unwrap()
            .1
            .image_size,
        256
    );
    // ... but one with SAM's keys must parse.
    std::fs::write(&cj, r#"{"encoder_embed_dim": "wide"}"#).unwrap();
    let e = gps_seg::registry::resolve_sam(ws, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("encoder_embed_dim"),
        "{e}"
    );
    std::fs::remove_file(&cj).unwrap();

    let stem = dir.path().join("model.json");
    let cases: Vec<(String, &str)> = vec![
        ("{ not json".into(), "model.json"),
        (
            {
                good["image_size"] = serde_json::json!("big");
                good.to_string()
            },
            "`image_size`",
        ),
        (
            {
                good["image_size"] = serde_json::json!(0);
                good.to_string()
            },
            "`image_size`",
        ),
        (
            {
                good["image_size"] = serde_json::json!(1u64 << 40);
                good.to_string()
            },
            "`image_size`",
        ),
        (
            {
                good["image_size"] = serde_json::json!(256);
                good["mlp_ratio"] = serde_json::json!(-4.0);
                good.to_string()
            },
            "`mlp_ratio`",
        ),
        (
            {
                good["mlp_ratio"] = serde_json::json!(4.0);
                good["image_sise"] = serde_json::json!(512);
                good.to_string()
            },
            "`image_sise`",
        ),
        (
            {
                let mut g = good.clone();
                g.as_object_mut().unwrap().remove("image_sise");
                g.as_object_mut().unwrap().remove("window_size");
                g.to_string()
            },
            "`window_size`",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&stem, &text).unwrap();
        let e = gps_seg::registry::resolve_sam(ws, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.json") && e.contains(want), "{text}: {e}");
    }
    good.as_object_mut().unwrap().remove("image_sise");
    good["image_size"] = serde_json::json!(128);
    std::fs::write(&stem, good.to_string()).unwrap();
    assert_eq!(
        gps_seg::registry::resolve_sam(ws, None)
            .unwrap()
            .1
            .image_size,
        128
    );
}

/// The binary exits with 1 and a one-line reason (no panic, no abort) on malformed models and
/// sizes.
#[test]
fn cli_refuses_malformed_models_and_sizes_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let pe = with_tensor(
        dir.path(),
        "pe1d.safetensors",
        "image_encoder.patch_embed.proj.weight",
        z(&[192]),
    );
    let zero = with_tensor(
        dir.path(),
        "pe0.safetensors",
        "image_encoder.pos_embed",
        z(&[1, 0, 0, 192]),
    );
    let fx = fixture("weights.safetensors");
    let nodata = dir.path().join("no-data");
    let runs: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["info".into(), "--model".into(), pe.display().to_string()],
            "patch_embed.proj.weight",
        ),
        (
            vec!["info".into(), "--model".into(), zero.display().to_string()],
            "pos_embed",
        ),
        (
            vec![
                "train".into(),
                "--model".into(),
                fx.display().to_string(),
                "--image-size".into(),
                "0".into(),
                "--data-dir".into(),
                nodata.display().to_string(),
                "--device".into(),
                "cpu".into(),
            ],
            "image_size",
        ),
        (
            vec![
                "train".into(),
                "--model".into(),
                fx.display().to_string(),
                "--image-size".into(),
                "1048576".into(),
                "--data-dir".into(),
                nodata.display().to_string(),
                "--device".into(),
                "cpu".into(),
            ],
            "image_size",
        ),
        (
            vec![
                "data".into(),
                "synth-kvasir".into(),
                "--out".into(),
                dir.path().join("k").display().to_string(),
                "--max-side".into(),
                "100000".into(),
            ],
            "max_side",
        ),
        (
            vec![
                "eval".into(),
                "--model".into(),
                fx.display().to_string(),
                "--scenes".into(),
                "0".into(),
                "--device".into(),
                "cpu".into(),
            ],
            "--scenes",
        ),
    ];
    for (args, want) in runs {
        let out = std::process::Command::new(bin())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("k").exists());
}

/// (Beside the other command-line checks.) A synthetic-data generation killed half-way
/// leaves no set at `--out` (a later run does not take a partial set for a complete one);
/// a complete set is never overwritten by a second generation.
#[test]
fn interrupted_synthetic_generation_leaves_no_partial_set() {
    use gps_seg::data::{synth_cls, synth_kvasir};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kvasir");
    let mut child = std::process::Command::new(bin())
        .args([
            "data",
            "synth-kvasir",
            "--count",
            "5000",
            "--max-side",
            "720",
            "--out",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it has written images (in its temp folder), then kill it.
    let started = std::time::Instant::now();
    let partial = loop {
        let found = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.join("images")
                    .read_dir()
                    .is_ok_and(|mut r| r.next().is_some())
            });
        if let Some(p) = found {
            break p;
        }
        assert!(
            started.elapsed().as_secs() < 60,
            "generation wrote nothing in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_ne!(partial, out, "images were written into --out directly");
    assert!(!out.exists(), "a killed generation left {}", out.display());

    let cfg = synth_kvasir::SynthKvasirConfig {
        count: 3,
        seed: 1,
        max_side: 64,
        jpeg_quality: 90,
    };
    synth_kvasir::generate(&out, &cfg).unwrap();
    let before = snapshot(&out);
    assert_eq!(before.len(), 3 + 3 + 1);
    let again = synth_kvasir::SynthKvasirConfig { seed: 2, ..cfg };
    let e = synth_kvasir::generate(&out, &again)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(snapshot(&out), before, "an existing set was changed");

    let cls = dir.path().join("cls");
    let c = synth_cls::SynthClsConfig {
        classes: 2,
        per_class: 2,
        test_per_class: 1,
        layout: synth_cls::SynthLayout::Vtab,
        kind: synth_cls::SynthKind::Upstream,
        size: 8,
        seed: 0,
    };
    assert_eq!(synth_cls::generate(&cls, &c).unwrap(), 6);
    let before = snapshot(&cls);
    assert!(cls.join(synth_cls::SETTINGS_FILE).is_file());
    assert!(synth_cls::generate(&cls, &c).is_err());
    assert_eq!(snapshot(&cls), before);
    // Nothing else was left beside the sets but the killed run's hidden temp folder.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// Run the binary with `args`, killing it after `limit` (a config that allocates before it is
/// validated would abort, or grow for minutes): (exit code, stderr, whether it was killed).
fn bin_bounded(args: &[String], limit: std::time::Duration) -> (Option<i32>, String, bool) {
    let mut child = std::process::Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let killed = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            break true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        killed,
    )
}

/// Every path that builds a SAM from a config validates it before allocating (#27 case 10):
/// `export --random-init` with a config file, `infer --engine candle --config`, and the
/// benchmarks' `--image-size` refuse image_size 2^40, encoder_embed_dim 1e9 and encoder_depth
/// 1e6 with exit 1 naming the field — no abort, no growth until killed.
#[test]
fn every_path_that_builds_a_model_validates_its_config_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    std::fs::create_dir_all(&images).unwrap();
    image::RgbImage::new(8, 8)
        .save(images.join("a.png"))
        .unwrap();
    let good = serde_json::to_value(SamConfig::tiny().with_image_size(64)).unwrap();
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR")).join("sam/sam-tiny.safetensors");
    let p = |x: &Path| x.display().to_string();
    let mut runs: Vec<(Vec<String>, &str)> = Vec::new();
    for (field, value) in [
        ("image_size", serde_json::json!(1u64 << 40)),
        ("encoder_embed_dim", serde_json::json!(1_000_000_000u64)),
        ("encoder_depth", serde_json::json!(1_000_000u64)),
    ] {
        let mut c = good.clone();
        c[field] = value;
        let cp = d.join(format!("{field}.json"));
        std::fs::write(&cp, c.to_string()).unwrap();
        runs.push((
            vec![
                "export".into(),
                "--random-init".into(),
                "1".into(),
                "--config".into(),
                p(&cp),
                "--out".into(),
                p(&d.join(format!("{field}.onnx"))),
            ],
            field,
        ));
        runs.push((
            vec![
                "infer".into(),
                "--engine".into(),
                "candle".into(),
                "--checkpoint".into(),
                p(&ckpt),
                "--config".into(),
                p(&cp),
                "--images".into(),
                p(&images),
                "--out".into(),
                p(&d.join(format!("infer-{field}"))),
                "--quiet".into(),
            ],
            field,
        ));
    }
    let huge = (1u64 << 40).to_string();
    for bench in [
        &["bench", "sam"][..],
        &["bench", "infer"],
        &["bench", "export", "--random-init"],
    ] {
        let mut a: Vec<String> = bench.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--model".into(),
            "tiny".into(),
            "--image-size".into(),
            huge.clone(),
        ]);
        runs.push((a, "image_size"));
    }
    for (args, field) in runs {
        let (code, err, killed) = bin_bounded(&args, std::time::Duration::from_secs(60));
        assert!(!killed, "{args:?}: still running after 60 s");
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!d.join("image_size.onnx").exists());
}

/// `info` reads the config stored beside a checkpoint (`<stem>.json`) as every other command
/// does (#27 case 14): sam-tiny's own window size and global blocks, not a guess from shapes.
#[test]
fn info_reads_the_config_beside_a_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sam");
    let stored = sam::files::read_config(&dir.join("sam-tiny.json")).unwrap();
    let info = sam::info::model_info(dir.join("sam-tiny.safetensors").to_str().unwrap()).unwrap();
    assert_eq!(info.config, stored);
    assert_eq!(info.config.window_size, 8);
    assert_eq!(info.config.encoder_global_attn_indexes, vec![2, 5]);
    assert!(
        info.notes.iter().any(|n| n.contains("sam-tiny.json")),
        "{:?}",
        info.notes
    );
    let out = std::process::Command::new(bin())
        .args(["info", "--model"])
        .arg(dir.join("sam-tiny.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("\"window_size\": 8"), "{text}");
}

/// A 2-block tiny SAM at 64 px (grid 4, one window block and one global block) and a
/// seeded batch of images in [0, 1] and {0, 1} targets.
fn autocast_setup() -> (SamConfig, Tensor, Tensor) {
    let mut cfg = SamConfig::tiny().with_image_size(64);
    cfg.encoder_depth = 2;
    cfg.encoder_global_attn_indexes = vec![1];
    cfg.window_size = 3; // grid 4: padded windows
    let mut rng = Rng::new(11);
    let n = 2 * 3 * 64 * 64;
    let x = Tensor::from_vec(
        (0..n).map(|_| rng.f32()).collect::<Vec<f32>>(),
        (2, 3, 64, 64),
        &Device::Cpu,
    )
    .unwrap();
    let t = Tensor::from_vec(
        (0..2 * 64 * 64)
            .map(|_| if rng.bernoulli(0.3) { 1f32 } else { 0.0 })
            .collect::<Vec<f32>>(),
        (2, 1, 64, 64),
        &Device::Cpu,
    )
    .unwrap();
    (cfg, x, t)
}

/// ‖a − b‖ / ‖b‖ over all entries (f32 tensors).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    let num = num.to_scalar::<f32>().unwrap() as f64;
    let den = den.to_scalar::<f32>().unwrap() as f64;
    (num / den).sqrt()
}

fn bce(y: &Tensor, t: &Tensor) -> gps_seg::Result<Tensor> {
    let sp = (y.exp()? + 1.0)?.log()?;
    Ok((sp - (y * t)?)?.mean_all()?)
}

/// Autocast forward (run on the CPU: the machinery is device-agnostic): the prompt-free
/// logits in bf16 / f16 stay within 1.5e-2 / 2e-3 relative (L2) of f32, come back as f32,
/// and really differ from f32 (the encoder did compute in the low dtype). The tolerances
/// are ~4 units of roundoff of each type (2⁻⁸ ≈ 3.9e-3, 2⁻¹¹ ≈ 4.9e-4).
/// Evaluation's detached forward computes the very logits of the graph-building one, on a
/// model whose every tensor is a var (the case that holds a graph).
#[test]
fn predict_prompt_free_equals_forward_prompt_free() {
    let (cfg, x, _) = autocast_setup();
    let (sam, _) = sam::build(&cfg, None, RolePolicy::AllTrainable, &Device::Cpu, 3).unwrap();
    let y = sam.forward_prompt_free(&x).unwrap();
    let p = sam.predict_prompt_free(&x).unwrap();
    assert!(!p.track_op());
    let (a, b) = (
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()));
}

#[test]
fn low_precision_forward_is_close_to_f32() {
    let (cfg, x, _) = autocast_setup();
    let (sam, _) = sam::build(&cfg, None, RolePolicy::AllFrozen, &Device::Cpu, 3).unwrap();
    assert_eq!(sam.precision(), Precision::F32);
    let y32 = sam.forward_prompt_free(&x).unwrap();
    for (p, tol) in [(Precision::Bf16, 1.5e-2), (Precision::F16, 2e-3)] {
        let low = sam.clone().with_precision(p);
        let emb = low.image_embeddings(&low.normalize(&x).unwrap()).unwrap();
        assert_eq!(
            emb.dtype(),
            DType::F32,
            "{p}: embeddings reach the decoder in f32"
        );
        let y = low.forward_prompt_free(&x).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(y.dims(), y32.dims());
        let e = rel_err(&y, &y32);
        eprintln!("{p}: logits relative L2 error vs f32 = {e:.3e}");
        assert!(e < tol, "{p}: relative error {e} ≥ {tol}");
        assert!(
            e > 0.0,
            "{p}: identical to f32, so no low-precision compute happened"
        );
    }
    // Back to f32: bit-identical to the untouched model.
    let back = sam
        .clone()
        .with_precision(Precision::Bf16)
        .with_precision(Precision::F32);
    let y = back.forward_prompt_free(&x).unwrap();
    assert_eq!(gps_seg::nn::gradcheck::max_abs_diff(&y, &y32).unwrap(), 0.0);
}

/// Autocast backward: with GPS roles (random K=2 selection: sparse deltas on the encoder's
/// weight matrices, the rest trainable), a bf16 step gives an f32, finite gradient to
/// every var that gets one in f32 — sparse deltas included — pointing the same way
/// (cosine > 0.99 per encoder var with a non-negligible gradient); the checkpointed bf16
/// backward gives the same gradients as the plain bf16 one.
#[test]
fn bf16_backward_gives_f32_gradients_to_vars_and_sparse_deltas() {
    let (cfg, x, t) = autocast_setup();
    let (sam, vs, sel, _) =
        gps_seg::bench::train::gps_setup(&cfg, &Device::Cpu, 4, 2, 1e-3).unwrap();
    let vars = vs.trainable_vars();
    let sparse: Vec<&String> = sel.indices.keys().collect();
    assert!(sparse
        .iter()
        .any(|n| n.as_str() == "image_encoder.blocks.0.attn.qkv.weight"));
    let grads_of = |m: &Sam| {
        let y = m.forward_prompt_free(&x).unwrap();
        bce(&y, &t).unwrap().backward().unwrap()
    };
    let g32 = grads_of(&sam);
    let low = sam.clone().with_precision(Precision::Bf16);
    let g16 = grads_of(&low);
    let (_, gck) = low
        .prompt_free_backward_checkpointed(&x, |y| bce(y, &t))
        .unwrap();
    let (mut checked, mut sparse_checked, mut min_cos) = (0, 0, 1f32);
    for (name, v) in &vars {
        let Some(a) = g32.get(v.as_tensor()) else {
            continue;
        };
        let b = g16
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: gradient in f32 but none in bf16"));
        assert_eq!(b.dtype(), DType::F32, "{name}");
        assert_eq!(b.dims(), a.dims(), "{name}");
        let finite = b
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|g| g.is_finite());
        assert!(finite, "{name}: non-finite bf16 gradient");
        let norm = |g: &Tensor| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let (na, nb) = (norm(a), norm(b));
        if name.starts_with("image_encoder.") && na > 1e-6 {
            let dot = (a * b)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let cos = dot / (na * nb);
            min_cos = min_cos.min(cos);
            assert!(
                cos > 0.99,
                "{name}: cosine {cos} between bf16 and f32 gradients"
            );
        }
        let c = gck
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no checkpointed bf16 gradient"));
        let e = gps_seg::nn::gradcheck::max_abs_diff(c, b).unwrap();
        assert!(
            e <= 1e-6 * (nb as f64).max(1.0),
            "{name}: checkpointed differs by {e}"
        );
        checked += 1;
        if sparse.contains(&name) {
            sparse_checked += 1;
        }
    }
    eprintln!("{checked} vars ({sparse_checked} sparse deltas); min encoder cosine {min_cos}");
    assert!(checked > 20, "only {checked} vars checked");
    assert!(
        sparse_checked > 5,
        "only {sparse_checked} sparse deltas checked"
    );
}
