//! Nothing a user feeds gps-seg may destroy its inputs: every command that writes checks its
//! outputs against its inputs before reading a weight, and refuses (exit 1, both paths named).
//! Also: non-finite weights are never exported, a trained artifact is never replaced by an
//! untrained selection, and an external-data ONNX pair is replaced whole.

mod common;

use common::{run, snapshot};
use gps_seg::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use gps_seg::sam::SamConfig;

fn refused(code: i32, text: &str, a: &str, b: &str) {
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("refusing to write"), "{text}");
    assert!(
        text.contains(a) && text.contains(b),
        "must name both paths: {text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn outputs_that_would_land_on_inputs_are_refused_and_nothing_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("D/images")).unwrap();
    std::fs::create_dir_all(d.join("D/masks")).unwrap();
    std::fs::create_dir_all(d.join("delta")).unwrap();
    for (p, b) in [
        ("D/images/a.png", &b"img"[..]),
        ("D/masks/a.png", b"gt"),
        ("base.safetensors", b"base"),
        ("delta/delta.safetensors", b"trained"),
        ("model.safetensors", b"weights"),
        ("model.onnx", b"onnx"),
    ] {
        std::fs::write(d.join(p), b).unwrap();
    }
    let before = snapshot(d);

    // infer --out D over the ground truth it scores against.
    let (c, t) = run(
        &[
            "infer",
            "--model",
            "model.onnx",
            "--images",
            "D/images",
            "--masks",
            "D/masks",
        ]
        .into_iter()
        .chain(["--out", "D"])
        .collect::<Vec<_>>(),
        d,
    );
    // The header check of the fake images fails first or the path rule does: never a write.
    assert_eq!(c, 1, "{t}");
    // With real images the path rule is what refuses: make them real.
    let img = image::RgbImage::new(8, 8);
    img.save(d.join("D/images/a.png")).unwrap();
    image::GrayImage::new(8, 8)
        .save(d.join("D/masks/a.png"))
        .unwrap();
    let before = {
        let mut b = before;
        b.retain(|(p, _)| !p.contains("/D/"));
        b.extend(snapshot(&d.join("D")));
        b.sort();
        b
    };
    for out in ["D", "D/masks", "D/images/preds"] {
        let (c, t) = run(
            &[
                "infer",
                "--model",
                "model.onnx",
                "--images",
                "D/images",
                "--masks",
                "D/masks",
                "--out",
                out,
            ],
            d,
        );
        refused(c, &t, out, "D/");
    }

    // merge --out equal to --base, or inside --delta.
    for out in [
        "base.safetensors",
        "./base.safetensors",
        "delta/merged.safetensors",
    ] {
        let (c, t) = run(
            &[
                "merge",
                "--base",
                "base.safetensors",
                "--delta",
                "delta",
                "--out",
                out,
            ],
            d,
        );
        refused(
            c,
            &t,
            out,
            if out.contains("delta") {
                "delta"
            } else {
                "base"
            },
        );
    }

    // export --out equal to --model.
    let (c, t) = run(
        &[
            "export",
            "--model",
            "model.safetensors",
            "--config",
            "tiny",
            "--out",
            "model.safetensors",
        ],
        d,
    );
    refused(c, &t, "--out", "model.safetensors");

    assert_eq!(snapshot(d), before, "an input changed");
}

#[test]
fn export_refuses_non_finite_weights_naming_the_tensor() {
    let cfg = SamConfig::preset("tiny").unwrap().with_image_size(64);
    let mut w = random_sam_weights(&cfg, 3).unwrap();
    let name = "image_encoder.blocks.1.mlp.lin1.weight";
    let t = w.get(name).unwrap();
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[17] = f32::NAN;
    v[99] = f32::INFINITY;
    let bad = candle_core::Tensor::from_vec(v, t.dims(), t.device()).unwrap();
    w.insert(name.into(), bad);
    let e = match export_prompt_free(&cfg, &w, SamExportOptions { normalize: true }) {
        Ok(_) => panic!("exported NaN weights"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(name) && e.contains("2 non-finite"), "{e}");
}

#[test]
fn an_external_data_model_pair_is_replaced_whole() {
    use gps_seg::onnx::{write_model_with, ExternalData};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.onnx");
    let cfg = SamConfig::preset("tiny").unwrap().with_image_size(64);
    for seed in [1, 2] {
        let w = random_sam_weights(&cfg, seed).unwrap();
        let (m, _) = export_prompt_free(&cfg, &w, SamExportOptions { normalize: true }).unwrap();
        let r = write_model_with(
            &path,
            m,
            ExternalData::Always {
                threshold_bytes: 1024,
            },
        )
        .unwrap();
        assert!(r.data_path.is_some());
    }
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["m.onnx", "m.onnx.data"], "temp files left behind");
}
