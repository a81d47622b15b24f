//! Integration tests of the SAM port: shapes, gradient flow, parity with Meta's implementation
//! (fixture made by `scripts/make_sam_fixture.py` with PyPI `segment-anything` + `torch`), and
//! checkpoint errors.

use candle_core::{DType, Device, Tensor};
use gps_seg::nn::RolePolicy;
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

fn images(b: usize, s: usize, seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f32> = (0..b * 3 * s * s).map(|_| r.f32()).collect();
    Tensor::from_vec(v, (b, 3, s, s), &Device::Cpu).unwrap()
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
                let scale = f
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .max(1e-6);
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
