//! ONNX export + ONNX Runtime integration tests (one test binary; one ORT environment).
//!
//! The runtime library is located with `runtime::ensure(None, true)`: if it is not in the
//! search order yet, it is fetched from PyPI with pip (as CI does).

use candle_core::{DType, Device, Tensor};
use gps_seg::infer::model::{tensor_to_array, OrtModel};
use gps_seg::onnx::proto::data_type::FLOAT;
use gps_seg::onnx::sam::{self, SamExportOptions};
use gps_seg::onnx::{
    write_model, write_model_with, Dim, ExternalData, GraphBuilder, IR_VERSION, OPSET,
};
use gps_seg::sam::SamConfig;
use gps_seg::util::rng::Rng;
use ndarray::ArrayD;
use std::path::{Path, PathBuf};

mod common;
use common::{max_abs_diff, onnx_checker, ort_ready};

fn rand_tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| scale * rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn rand_array(shape: &[usize], seed: u64, lo: f32, hi: f32) -> ArrayD<f32> {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        shape.to_vec(),
        (0..n).map(|_| rng.uniform(lo, hi)).collect(),
    )
    .unwrap()
}

/// Conv → NHWC → Linear → LayerNorm → GELU → Softmax, and a ×2 bilinear Resize branch,
/// compared with the same chain in Candle (gps_seg::nn::layers) at batch 1 and 3.
#[test]
fn small_chain_matches_candle() {
    ort_ready();
    let cw = rand_tensor(&[8, 4, 3, 3], 1, 0.3);
    let cb = rand_tensor(&[8], 2, 0.1);
    let lw = rand_tensor(&[16, 8], 3, 0.3);
    let lb = rand_tensor(&[16], 4, 0.1);
    let nw = (rand_tensor(&[16], 5, 0.1) + 1.0).unwrap();
    let nb = rand_tensor(&[16], 6, 0.1);

    let mut b = GraphBuilder::new("chain");
    let x = b
        .input(
            "x",
            FLOAT,
            &[Dim::sym("batch"), 4.into(), 6.into(), 6.into()],
        )
        .unwrap();
    let w = b.param("conv.weight", &cw).unwrap();
    let bias = b.param("conv.bias", &cb).unwrap();
    let y = b.conv(&x, &w, Some(&bias), 1, 1, 1).unwrap();
    let y = b.transpose(&y, &[0, 2, 3, 1]).unwrap();
    let y = b.reshape(&y, &[0, 36, 8]).unwrap();
    let lw_v = b.param("lin.weight", &lw).unwrap();
    let lb_v = b.param("lin.bias", &lb).unwrap();
    let y = b.linear(&y, &lw_v, Some(&lb_v)).unwrap();
    let nw_v = b.param("norm.weight", &nw).unwrap();
    let nb_v = b.param("norm.bias", &nb).unwrap();
    let y = b.layer_norm(&y, &nw_v, &nb_v, 1e-6).unwrap();
    let y = b.gelu_erf(&y).unwrap();
    let y = b.softmax(&y, -1).unwrap();
    b.output(&y, "y", FLOAT, &[Dim::sym("batch"), 36.into(), 16.into()])
        .unwrap();
    let r = b.resize_linear(&x, &[1.0, 1.0, 2.0, 2.0]).unwrap();
    b.output(
        &r,
        "up",
        FLOAT,
        &[Dim::sym("batch"), 4.into(), 12.into(), 12.into()],
    )
    .unwrap();
    assert_eq!(b.param_count(), 8 * 4 * 9 + 8 + 16 * 8 + 16 + 16 + 16);
    let model = b.finish(OPSET, IR_VERSION).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.onnx");
    write_model(&path, model).unwrap();
    onnx_checker(&[&path]);

    let m = OrtModel::load(&path, 1).unwrap();
    assert_eq!(m.inputs[0].name, "x");
    assert_eq!(m.inputs[0].shape, vec![-1, 4, 6, 6]);
    m.expect_signature(&[("x", 4, Some(4))]).unwrap();
    let e = m
        .expect_signature(&[("image", 4, Some(3))])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("image rank 4 with 3 channels") && e.contains("x float32[?, 4, 6, 6]"),
        "{e}"
    );
    for n in [1usize, 3] {
        let xt = rand_tensor(&[n, 4, 6, 6], 10 + n as u64, 1.0);
        let out = m.run(&[("x", &tensor_to_array(&xt).unwrap())]).unwrap();
        // Candle reference.
        let c = xt
            .conv2d(&cw, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&cb.reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let c = c
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((n, 36, 8))
            .unwrap();
        let c = c
            .broadcast_matmul(&lw.t().unwrap())
            .unwrap()
            .broadcast_add(&lb)
            .unwrap();
        let c = gps_seg::nn::layers::layer_norm(&c, &nw, &nb, 1e-6).unwrap();
        let c = gps_seg::nn::layers::gelu(&c).unwrap();
        let c = gps_seg::nn::layers::softmax_last(&c).unwrap();
        let d = max_abs_diff(&out[0].1, &tensor_to_array(&c).unwrap());
        assert!(d < 1e-5, "batch {n}: chain max abs diff {d}");
        let up = gps_seg::nn::layers::resize_bilinear(&xt, 12, 12).unwrap();
        let d = max_abs_diff(&out[1].1, &tensor_to_array(&up).unwrap());
        assert!(d < 1e-5, "batch {n}: resize max abs diff {d}");
    }
    // A wrong input name is an error naming the inputs, not a panic.
    let e = m
        .run(&[("nope", &rand_array(&[1, 4, 6, 6], 0, 0.0, 1.0))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("x"), "{e}");
}

fn export_all(cfg: &SamConfig, seed: u64, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let w = sam::random_sam_weights(cfg, seed).unwrap();
    let total: usize = w.values().map(|t| t.elem_count()).sum();
    let opts = SamExportOptions::default();
    let (pf, s) = sam::export_prompt_free(cfg, &w, opts).unwrap();
    // No extra parameters: exported + deliberately unused = the whole checkpoint.
    assert_eq!(s.param_count + s.unused_count, total);
    for u in &s.unused {
        assert!(
            u.starts_with("prompt_encoder.point_embeddings")
                || u.starts_with("prompt_encoder.not_a_point_embed")
                || u.starts_with("prompt_encoder.mask_downscaling")
                || u.starts_with("mask_decoder.iou_prediction_head")
                || (u.starts_with("mask_decoder.output_hypernetworks_mlps.")
                    && !u.starts_with("mask_decoder.output_hypernetworks_mlps.0.")),
            "prompt-free graph unexpectedly skips {u}"
        );
    }
    eprintln!(
        "{}: prompt-free params {} (+{} unused of {} total), {} nodes",
        cfg.name, s.param_count, s.unused_count, total, s.node_count
    );
    let (enc, se) = sam::export_image_encoder(cfg, &w, opts).unwrap();
    let (dec, sd) = sam::export_prompted_decoder(cfg, &w).unwrap();
    for u in &sd.unused {
        assert!(
            u.starts_with("image_encoder.") || u.starts_with("prompt_encoder.mask_downscaling"),
            "prompted decoder unexpectedly skips {u}"
        );
    }
    let md: usize = w
        .iter()
        .filter(|(k, _)| k.starts_with("prompt_encoder.mask_downscaling"))
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(
        se.param_count + sd.param_count + md,
        total,
        "encoder + decoder + mask_downscaling"
    );
    eprintln!(
        "{}: encoder params {}, prompted decoder params {}, mask_downscaling (not exported) {}",
        cfg.name, se.param_count, sd.param_count, md
    );
    let p = (
        dir.join("pf.onnx"),
        dir.join("enc.onnx"),
        dir.join("dec.onnx"),
    );
    write_model(&p.0, pf).unwrap();
    write_model(&p.1, enc).unwrap();
    write_model(&p.2, dec).unwrap();
    p
}

/// The tiny SAM exports: checker passes, ORT loads and runs all three graphs at batch 1 and 3
/// with finite outputs of the documented shapes, and each batch element is independent of the
/// others (batch-3 row 0 equals the batch-1 run on the same image).
#[test]
fn sam_tiny_exports_run_in_ort() {
    ort_ready();
    let cfg = SamConfig::tiny();
    let dir = tempfile::tempdir().unwrap();
    let (pf, enc, dec) = export_all(&cfg, 7, dir.path());
    onnx_checker(&[&pf, &enc, &dec]);
    let s = cfg.image_size;
    let g = cfg.grid_size();
    let c = cfg.prompt_embed_dim;
    let pf = OrtModel::load(&pf, 2).unwrap();
    pf.expect_signature(&[("image", 4, Some(3))]).unwrap();
    let enc = OrtModel::load(&enc, 2).unwrap();
    let dec = OrtModel::load(&dec, 2).unwrap();
    let x3 = rand_array(&[3, 3, s, s], 11, 0.0, 1.0);
    let x1 = x3
        .slice(ndarray::s![0..1, .., .., ..])
        .to_owned()
        .into_dyn();
    let m3 = pf.run_f32(&x3).unwrap();
    let m1 = pf.run_f32(&x1).unwrap();
    assert_eq!(m3.shape(), &[3, 1, s, s]);
    assert!(m3.iter().all(|v| v.is_finite()));
    let row0 = m3
        .slice(ndarray::s![0..1, .., .., ..])
        .to_owned()
        .into_dyn();
    assert!(max_abs_diff(&row0, &m1) < 1e-4);
    let row1 = m3
        .slice(ndarray::s![1..2, .., .., ..])
        .to_owned()
        .into_dyn();
    assert!(
        max_abs_diff(&row0, &row1) > 1e-3,
        "different images gave the same mask"
    );

    let e3 = enc.run_f32(&x3).unwrap();
    assert_eq!(e3.shape(), &[3, c, g, g]);
    let coords = rand_array(&[3, 2, 2], 12, 0.0, s as f32);
    let labels = ArrayD::from_shape_vec(vec![3, 2], vec![1.0, -1.0, 0.0, 1.0, 2.0, 3.0]).unwrap();
    let out = dec
        .run(&[
            ("image_embeddings", &e3),
            ("point_coords", &coords),
            ("point_labels", &labels),
        ])
        .unwrap();
    let nm = cfg.num_multimask_outputs + 1;
    assert_eq!(out[0].0, "masks");
    assert_eq!(out[0].1.shape(), &[3, nm, 4 * g, 4 * g]);
    assert_eq!(out[1].1.shape(), &[3, nm]);
    assert!(out.iter().all(|(_, a)| a.iter().all(|v| v.is_finite())));
    let e1 = e3
        .slice(ndarray::s![0..1, .., .., ..])
        .to_owned()
        .into_dyn();
    let c1 = coords
        .slice(ndarray::s![0..1, .., ..])
        .to_owned()
        .into_dyn();
    let l1 = labels.slice(ndarray::s![0..1, ..]).to_owned().into_dyn();
    let o1 = dec
        .run(&[
            ("image_embeddings", &e1),
            ("point_coords", &c1),
            ("point_labels", &l1),
        ])
        .unwrap();
    let r0 = out[0]
        .1
        .slice(ndarray::s![0..1, .., .., ..])
        .to_owned()
        .into_dyn();
    assert!(max_abs_diff(&r0, &o1[0].1) < 1e-4);
}

/// External data: the same tiny graph written with every initializer ≥ 1 KiB in
/// `<model>.onnx.data` loads in ORT and gives the same output as the single-file model.
#[test]
fn external_data_gives_identical_outputs() {
    ort_ready();
    let cfg = SamConfig::tiny();
    let w = sam::random_sam_weights(&cfg, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = sam::export_prompt_free(&cfg, &w, SamExportOptions::default()).unwrap();
    let a = dir.path().join("single.onnx");
    let sub = dir.path().join("ext");
    let b = sub.join("split.onnx");
    write_model_with(&a, m.clone(), ExternalData::Never).unwrap();
    let r = write_model_with(
        &b,
        m,
        ExternalData::Always {
            threshold_bytes: 1024,
        },
    )
    .unwrap();
    assert!(r.external_tensors > 10);
    assert!(
        r.model_bytes < 200_000,
        "model file still holds the weights: {}",
        r.model_bytes
    );
    assert!(sub.join("split.onnx.data").is_file());
    onnx_checker(&[&b]);
    let x = rand_array(&[2, 3, cfg.image_size, cfg.image_size], 5, 0.0, 1.0);
    let ya = OrtModel::load(&a, 2).unwrap().run_f32(&x).unwrap();
    let yb = OrtModel::load(&b, 2).unwrap().run_f32(&x).unwrap();
    assert_eq!(max_abs_diff(&ya, &yb), 0.0);
}

/// ViT-B-shaped SAM (random weights) exported and run once. Slow: `cargo test --test onnx --
/// --ignored`. Image size from `GPS_SEG_VITB_SIZE` (default 1024).
#[test]
#[ignore]
fn sam_vit_b_export_runs() {
    ort_ready();
    let size: usize = std::env::var("GPS_SEG_VITB_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let cfg = SamConfig::vit_b().with_image_size(size);
    let w = sam::random_sam_weights(&cfg, 1).unwrap();
    let (m, s) = sam::export_prompt_free(&cfg, &w, SamExportOptions::default()).unwrap();
    let total: usize = w.values().map(|t| t.elem_count()).sum();
    eprintln!(
        "vit_b@{size}: total params {total}, exported {}, unused {}, nodes {}",
        s.param_count, s.unused_count, s.node_count
    );
    assert_eq!(s.param_count + s.unused_count, total);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vit_b.onnx");
    write_model(&p, m).unwrap();
    onnx_checker(&[&p]);
    let model = OrtModel::load(&p, 0).unwrap();
    let x = rand_array(&[1, 3, size, size], 2, 0.0, 1.0);
    let t = std::time::Instant::now();
    let y = model.run_f32(&x).unwrap();
    eprintln!("vit_b@{size}: one image in {:.2?}", t.elapsed());
    assert_eq!(y.shape(), &[1, 1, size, size]);
    assert!(y.iter().all(|v| v.is_finite()));
    let _ = DType::F32;
}

/// Meta's own tiny-SAM outputs (`tests/fixtures/sam_tiny/`, made by
/// `scripts/make_sam_fixture.py` with segment_anything's modules; or `GPS_SEG_SAM_FIXTURE`).
fn fixture_dir() -> Option<PathBuf> {
    let d = std::env::var_os("GPS_SEG_SAM_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam_tiny"));
    d.join("weights.safetensors").is_file().then_some(d)
}

fn slice_rows(a: &ArrayD<f32>, axis1: std::ops::Range<usize>) -> ArrayD<f32> {
    a.slice_axis(ndarray::Axis(1), ndarray::Slice::from(axis1))
        .to_owned()
}

/// ONNX Runtime on the exported tiny graphs vs Meta's segment_anything outputs (PyTorch,
/// f32 compute on f16-exact weights): prompt-free upsampled logits, image embeddings and the
/// prompted decoder (2 points + 1 box as label-2/3 corners, multimask = mask tokens 1..).
#[test]
fn sam_tiny_matches_meta_fixture() {
    let dir =
        fixture_dir().expect("tests/fixtures/sam_tiny is committed; is the checkout complete?");
    ort_ready();
    let cfg = SamConfig::tiny();
    let w = gps_seg::util::tensors::load(&dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let io = gps_seg::util::tensors::load(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let get = |k: &str| tensor_to_array(&io[k]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = SamExportOptions::default();
    let (pf, s) = sam::export_prompt_free(&cfg, &w, opts).unwrap();
    let total: usize = w.values().map(|t| t.elem_count()).sum();
    assert_eq!(s.param_count + s.unused_count, total);
    let (enc, _) = sam::export_image_encoder(&cfg, &w, opts).unwrap();
    let (dec, _) = sam::export_prompted_decoder(&cfg, &w).unwrap();
    let paths = [
        tmp.path().join("pf.onnx"),
        tmp.path().join("enc.onnx"),
        tmp.path().join("dec.onnx"),
    ];
    for (p, m) in paths.iter().zip([pf, enc, dec]) {
        write_model(p, m).unwrap();
    }
    let images = get("images");
    let pf = OrtModel::load(&paths[0], 2).unwrap();
    let up = pf.run_f32(&images).unwrap();
    let d_up = max_abs_diff(&up, &get("upsampled"));
    let enc = OrtModel::load(&paths[1], 2).unwrap();
    let emb = enc.run_f32(&images).unwrap();
    let d_emb = max_abs_diff(&emb, &get("embeddings"));
    // Points then the box's two corners (labels 2, 3), as Meta's ONNX export expects.
    let coords = get("point_coords");
    let labels = get("point_labels");
    let boxes = get("boxes");
    let n = coords.shape()[0];
    let p = coords.shape()[1];
    let mut c = ArrayD::<f32>::zeros(vec![n, p + 2, 2]);
    let mut l = ArrayD::<f32>::zeros(vec![n, p + 2]);
    for i in 0..n {
        for j in 0..p {
            c[[i, j, 0]] = coords[[i, j, 0]];
            c[[i, j, 1]] = coords[[i, j, 1]];
            l[[i, j]] = labels[[i, j]];
        }
        for k in 0..2 {
            c[[i, p + k, 0]] = boxes[[i, 2 * k]];
            c[[i, p + k, 1]] = boxes[[i, 2 * k + 1]];
            l[[i, p + k]] = 2.0 + k as f32;
        }
    }
    let dec = OrtModel::load(&paths[2], 2).unwrap();
    let out = dec
        .run(&[
            ("image_embeddings", &get("embeddings")),
            ("point_coords", &c),
            ("point_labels", &l),
        ])
        .unwrap();
    let m = cfg.num_multimask_outputs + 1;
    let d_masks = max_abs_diff(&slice_rows(&out[0].1, 1..m), &get("prompted_masks"));
    let d_iou = max_abs_diff(&slice_rows(&out[1].1, 1..m), &get("prompted_iou"));
    eprintln!("vs Meta: upsampled {d_up:.2e}, embeddings {d_emb:.2e}, prompted masks {d_masks:.2e}, iou {d_iou:.2e}");
    assert!(d_emb < 1e-4, "embeddings differ from Meta's by {d_emb}");
    assert!(
        d_up < 1e-4,
        "prompt-free logits differ from Meta's by {d_up}"
    );
    assert!(
        d_masks < 1e-4,
        "prompted masks differ from Meta's by {d_masks}"
    );
    assert!(
        d_iou < 1e-4,
        "iou predictions differ from Meta's by {d_iou}"
    );
}

/// Tiny SAM variants for the Candle parity test: the preset (no window padding) and one whose
/// grid (16) is not a multiple of the window (6), so windows are padded and cropped.
fn parity_configs() -> Vec<SamConfig> {
    let mut padded = SamConfig::tiny();
    padded.name = "tiny_padded_windows".into();
    padded.window_size = 6;
    vec![SamConfig::tiny(), padded]
}

/// ONNX Runtime vs the Candle port (`gps_seg::sam::Sam`) on the same random weights, batch 1
/// and 3, all three graphs, within 1e-4 max abs: prompt-free logits, image embeddings, prompted
/// decoder with points + box (multimask) and with points only (single mask, padding point).
#[test]
fn sam_onnx_matches_candle() {
    ort_ready();
    let dev = Device::Cpu;
    for cfg in parity_configs() {
        let w = sam::random_sam_weights(&cfg, 21).unwrap();
        let vs = gps_seg::nn::param::ParamStore::frozen(w.clone(), &dev);
        let model = gps_seg::sam::Sam::new(&cfg, &vs).unwrap();
        vs.check_all_used().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let opts = SamExportOptions::default();
        let paths = [
            tmp.path().join("pf.onnx"),
            tmp.path().join("enc.onnx"),
            tmp.path().join("dec.onnx"),
        ];
        write_model(
            &paths[0],
            sam::export_prompt_free(&cfg, &w, opts).unwrap().0,
        )
        .unwrap();
        write_model(
            &paths[1],
            sam::export_image_encoder(&cfg, &w, opts).unwrap().0,
        )
        .unwrap();
        write_model(&paths[2], sam::export_prompted_decoder(&cfg, &w).unwrap().0).unwrap();
        let pf = OrtModel::load(&paths[0], 2).unwrap();
        let enc = OrtModel::load(&paths[1], 2).unwrap();
        let dec = OrtModel::load(&paths[2], 2).unwrap();
        let s = cfg.image_size;
        let m = cfg.num_multimask_outputs + 1;
        for n in [1usize, 3] {
            let x = rand_array(&[n, 3, s, s], 30 + n as u64, 0.0, 1.0);
            let xt = Tensor::from_vec(x.iter().copied().collect::<Vec<_>>(), (n, 3, s, s), &dev)
                .unwrap();
            let c_pf = tensor_to_array(&model.forward_prompt_free(&xt).unwrap()).unwrap();
            let d_pf = max_abs_diff(&pf.run_f32(&x).unwrap(), &c_pf);
            let c_emb = model
                .image_embeddings(&model.normalize(&xt).unwrap())
                .unwrap();
            let emb = enc.run_f32(&x).unwrap();
            let d_emb = max_abs_diff(&emb, &tensor_to_array(&c_emb).unwrap());
            // Prompts: 2 points (+ a box for the multimask case).
            let coords = rand_array(&[n, 2, 2], 40 + n as u64, 0.0, s as f32);
            let mut rng = Rng::new(50 + n as u64);
            let labels = ArrayD::from_shape_vec(
                vec![n, 2],
                (0..2 * n).map(|_| rng.below(2) as f32).collect(),
            )
            .unwrap();
            let mut boxes = rand_array(&[n, 4], 60 + n as u64, 0.0, s as f32 / 2.0);
            for i in 0..n {
                boxes[[i, 2]] += s as f32 / 2.0;
                boxes[[i, 3]] += s as f32 / 2.0;
            }
            let t = |a: &ArrayD<f32>| {
                Tensor::from_vec(a.iter().copied().collect::<Vec<_>>(), a.shape(), &dev).unwrap()
            };
            let (cm, ci) = model
                .forward_prompted(
                    &c_emb,
                    Some((&t(&coords), &t(&labels))),
                    Some(&t(&boxes)),
                    true,
                )
                .unwrap();
            let mut c4 = ArrayD::<f32>::zeros(vec![n, 4, 2]);
            let mut l4 = ArrayD::<f32>::zeros(vec![n, 4]);
            let mut c3 = ArrayD::<f32>::zeros(vec![n, 3, 2]);
            let mut l3 = ArrayD::<f32>::from_elem(vec![n, 3], -1.0);
            for i in 0..n {
                for j in 0..2 {
                    for k in 0..2 {
                        c4[[i, j, k]] = coords[[i, j, k]];
                        c3[[i, j, k]] = coords[[i, j, k]];
                        c4[[i, 2 + j, k]] = boxes[[i, 2 * j + k]];
                    }
                    l4[[i, j]] = labels[[i, j]];
                    l3[[i, j]] = labels[[i, j]];
                    l4[[i, 2 + j]] = 2.0 + j as f32;
                }
            }
            let o = dec
                .run(&[
                    ("image_embeddings", &emb),
                    ("point_coords", &c4),
                    ("point_labels", &l4),
                ])
                .unwrap();
            let d_mm = max_abs_diff(&slice_rows(&o[0].1, 1..m), &tensor_to_array(&cm).unwrap());
            let d_mi = max_abs_diff(&slice_rows(&o[1].1, 1..m), &tensor_to_array(&ci).unwrap());
            let (sm, si) = model
                .forward_prompted(&c_emb, Some((&t(&coords), &t(&labels))), None, false)
                .unwrap();
            let o = dec
                .run(&[
                    ("image_embeddings", &emb),
                    ("point_coords", &c3),
                    ("point_labels", &l3),
                ])
                .unwrap();
            let d_sm = max_abs_diff(&slice_rows(&o[0].1, 0..1), &tensor_to_array(&sm).unwrap());
            let d_si = max_abs_diff(&slice_rows(&o[1].1, 0..1), &tensor_to_array(&si).unwrap());
            eprintln!(
                "{} batch {n}: prompt-free {d_pf:.2e}, embeddings {d_emb:.2e}, multimask {d_mm:.2e}/{d_mi:.2e}, single {d_sm:.2e}/{d_si:.2e}",
                cfg.name
            );
            for (what, d) in [
                ("prompt-free", d_pf),
                ("embeddings", d_emb),
                ("multimask masks", d_mm),
                ("multimask iou", d_mi),
                ("single masks", d_sm),
                ("single iou", d_si),
            ] {
                assert!(
                    d < 1e-4,
                    "{} batch {n}: {what} ORT vs Candle max abs diff {d}",
                    cfg.name
                );
            }
        }
    }
}

/// `export --quantize int8` / `--precision fp16` on the shipped, pretrained sam-tiny: both pass
/// the ONNX checker and run in ONNX Runtime. int8: the masks (logit > 0) agree with f32 on
/// ≥ 99 % of the pixels of real-looking images, and each logit moves by at most a few
/// quantisation steps' worth (bounded by 5 % of the logits' range). fp16: within 1e-2 relative
/// (L2) of f32.
#[test]
fn int8_and_fp16_exports_match_f32() {
    use gps_seg::data::synth_kvasir::{generate, SynthKvasirConfig};
    use gps_seg::onnx::quantize::{quantize_int8, to_fp16};
    ort_ready();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg: SamConfig = gps_seg::util::fs::read_json(&root.join("sam/sam-tiny.json")).unwrap();
    let w =
        gps_seg::util::tensors::load(&root.join("sam/sam-tiny.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = sam::export_prompt_free(&cfg, &w, SamExportOptions { normalize: true }).unwrap();
    let mut q = m.clone();
    let rq = quantize_int8(&mut q).unwrap();
    assert!(
        rq.matmuls >= 4 * cfg.encoder_depth && rq.convs >= 3,
        "{rq:?}"
    );
    assert!(rq.bytes_after * 3 < rq.bytes_before, "{rq:?}");
    let mut h = m.clone();
    to_fp16(&mut h).unwrap();
    let (pf, pq, ph) = (
        dir.path().join("f32.onnx"),
        dir.path().join("int8.onnx"),
        dir.path().join("fp16.onnx"),
    );
    write_model(&pf, m).unwrap();
    write_model(&pq, q).unwrap();
    write_model(&ph, h).unwrap();
    onnx_checker(&[&pf, &pq, &ph]);
    // Real-looking inputs: synthetic polyp images resized to the model's input.
    let data = dir.path().join("data");
    generate(
        &data,
        &SynthKvasirConfig {
            count: 6,
            seed: 5,
            max_side: 200,
            ..Default::default()
        },
    )
    .unwrap();
    let s = cfg.image_size;
    let mut x = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let img = gps_seg::data::imgio::decode_rgb(f).unwrap();
        let chw = gps_seg::data::resize::resize_rgb_chw_u8(&img, s, Default::default());
        x.extend(chw.into_iter().map(|v| v as f32 / 255.0));
    }
    let x = ArrayD::from_shape_vec(vec![files.len(), 3, s, s], x).unwrap();
    let yf = OrtModel::load(&pf, 2).unwrap().run_f32(&x).unwrap();
    let yq = OrtModel::load(&pq, 2).unwrap().run_f32(&x).unwrap();
    let yh = OrtModel::load(&ph, 2).unwrap().run_f32(&x).unwrap();
    let agree = yf
        .iter()
        .zip(yq.iter())
        .filter(|(a, b)| (**a > 0.0) == (**b > 0.0))
        .count() as f64
        / yf.len() as f64;
    let range = yf.iter().fold(0f32, |m, v| m.max(v.abs()));
    let dq = max_abs_diff(&yf, &yq);
    eprintln!(
        "int8: masks agree on {:.4} of pixels, max |Δ logit| {dq} (range {range})",
        agree
    );
    assert!(agree >= 0.99, "int8 masks agree on only {agree}");
    assert!(
        dq <= 0.05 * 2.0 * range,
        "int8 max |Δ| {dq} vs logit range {range}"
    );
    let num: f64 = yf
        .iter()
        .zip(yh.iter())
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = yf.iter().map(|a| (*a as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    eprintln!("fp16: relative L2 {rel:.2e}");
    assert!(rel <= 1e-2, "fp16 relative error {rel}");
}

/// `export --precision fp16` (#27 case 9): a weight f16 cannot hold (1e6 > 65504, which would
/// become Inf) is refused naming the tensor and the value, by the pass and by the command,
/// which writes nothing; the largest f16 value itself converts.
#[test]
fn fp16_export_refuses_weights_beyond_f16_naming_the_tensor() {
    use gps_seg::onnx::quantize::to_fp16;
    let cfg = SamConfig::tiny().with_image_size(64);
    let name = "image_encoder.blocks.0.mlp.lin1.weight";
    let with_value = |x: f32| {
        let mut w = sam::random_sam_weights(&cfg, 3).unwrap();
        let t = w.get(name).unwrap();
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[5] = x;
        w.insert(
            name.into(),
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap(),
        );
        w
    };
    for x in [1e6f32, -70000.0] {
        let (mut m, _) =
            sam::export_prompt_free(&cfg, &with_value(x), SamExportOptions::default()).unwrap();
        let e = to_fp16(&mut m).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(&x.to_string()), "{e}");
    }
    let (mut m, _) =
        sam::export_prompt_free(&cfg, &with_value(65504.0), SamExportOptions::default()).unwrap();
    to_fp16(&mut m).unwrap();

    // The command: exit 1 naming the tensor, no file.
    let tmp = tempfile::tempdir().unwrap();
    let wp = tmp.path().join("w.safetensors");
    gps_seg::util::tensors::save_safetensors(&wp, &with_value(1e6), None).unwrap();
    let cp = tmp.path().join("cfg.json");
    std::fs::write(&cp, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = tmp.path().join("m.onnx");
    let r = std::process::Command::new(common::bin())
        .args(["export", "--model"])
        .arg(&wp)
        .arg("--config")
        .arg(&cp)
        .args(["--precision", "fp16", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains(name) && err.contains("1000000"), "{err}");
    assert!(!out.exists());
}

/// `export --prompted` (#27 case 14): a checkpoint whose prompted decoder cannot be exported
/// (its mask decoder is missing) leaves no image encoder behind; nor does a decoder that
/// cannot be written (its path is taken by a folder).
#[test]
fn a_prompted_export_that_fails_on_the_decoder_leaves_no_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SamConfig::tiny().with_image_size(64);
    let cp = tmp.path().join("cfg.json");
    std::fs::write(&cp, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut w = sam::random_sam_weights(&cfg, 4).unwrap();
    let full = tmp.path().join("full.safetensors");
    gps_seg::util::tensors::save_safetensors(&full, &w, None).unwrap();
    w.retain(|k, _| !k.starts_with("mask_decoder."));
    let partial = tmp.path().join("no-decoder.safetensors");
    gps_seg::util::tensors::save_safetensors(&partial, &w, None).unwrap();
    let export = |model: &Path, out: &Path| {
        let r = std::process::Command::new(common::bin())
            .arg("export")
            .arg("--model")
            .arg(model)
            .arg("--config")
            .arg(&cp)
            .arg("--prompted")
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        (
            r.status.code(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let out = tmp.path().join("a/enc.onnx");
    let (code, err) = export(&partial, &out);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("mask_decoder"), "{err}");
    assert!(!out.exists(), "the encoder of a failed pair was left");
    // The decoder's path is a folder: the encoder written first is removed again.
    let out = tmp.path().join("b/enc.onnx");
    std::fs::create_dir_all(tmp.path().join("b/enc_decoder.onnx")).unwrap();
    let (code, err) = export(&full, &out);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        !out.exists(),
        "the encoder of a failed pair was left: {err}"
    );
    // And the whole pair when nothing is in the way.
    let out = tmp.path().join("c/enc.onnx");
    let (code, err) = export(&full, &out);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.exists() && tmp.path().join("c/enc_decoder.onnx").exists());
}
