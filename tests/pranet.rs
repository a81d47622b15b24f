//! The PraNet protocol end to end on a small synthetic PraNet-layout folder: `train --data
//! pranet` (train on `TrainDataset`, validation carved from it, every test set scored at the
//! epoch chosen on validation) writes one table (set × metric) to `summary.json` and the run's
//! page; `infer --run` saves `probs/<id>.png` and scores exactly the saved maps: with the Candle
//! SAM (training's arithmetic) every number of the table again, to the last bits; with ONNX
//! Runtime within 5e-6 (measured: Sα 1.4e-6, Fβʷ 1.0e-6, Eφ mean 9e-7, MAE 5e-7; mDice, mIoU,
//! Eφ max and adaptive exactly), where a probability within float error of an 8-bit rounding
//! edge moves a pixel one level; `report merge` of its shards keeps the per-set table.

mod common;

use candle_core::Device;
use gps_seg::data::pranet::{SegLayout, TEST_SETS};
use gps_seg::data::synth_pranet::{generate, SynthPranetConfig};
use gps_seg::metrics::{score_8bit, set_of_id, FieldOptions, SetRow, SetTable};
use gps_seg::progress::Silent;
use gps_seg::sam::SamConfig;
use gps_seg::train::seg::{self, SegTrainConfig};
use std::path::Path;

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<SetRow> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Every column of `a` and `b`, set by set, within `tol`.
fn assert_tables_close(a: &[SetRow], b: &[SetRow], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sets");
    let worst = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.columns().into_iter().zip(y.columns()))
        .map(|((_, u), (_, v))| (u - v).abs())
        .fold(0f64, f64::max);
    let names: Vec<&str> = a[0].columns().iter().map(|(n, _)| *n).collect();
    let per: Vec<String> = (0..names.len())
        .map(|k| {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x.columns()[k].1 - y.columns()[k].1).abs())
                .fold(0f64, f64::max);
            format!("{} {d:.1e}", names[k])
        })
        .collect();
    eprintln!(
        "{what}: largest difference {worst:.3e} ({})",
        per.join(", ")
    );
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.set, x.images), (&y.set, y.images), "{what}");
        for ((n, u), (_, v)) in x.columns().iter().zip(y.columns()) {
            assert!(
                (u - v).abs() <= tol,
                "{what}: {} {n}: {u} vs {v} (Δ {:.2e})",
                x.set,
                (u - v).abs()
            );
        }
    }
}

#[test]
fn pranet_run_scores_five_test_sets_and_infer_run_reproduces_the_table_from_saved_maps() {
    common::onnx::ort_ready();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pranet");
    let synth = SynthPranetConfig {
        train: 10,
        test: 3,
        seed: 11,
        max_side: 80,
    };
    generate(&data, &synth).unwrap();

    // The shipped pretrained sam-tiny at 64 px, so the masks mean something.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sam: SamConfig = gps_seg::util::fs::read_json(&root.join("sam/sam-tiny.json")).unwrap();
    let base = Some(root.join("sam/sam-tiny.safetensors"));
    let mut cfg = SegTrainConfig::recipe(data.clone(), base, sam.with_image_size(64));
    cfg.data = SegLayout::Pranet;
    cfg.epochs = 2;
    cfg.batch_size = 2;
    cfg.eval_batch_size = 4;
    cfg.select_batches = Some(1);
    cfg.max_steps_per_epoch = Some(2);
    cfg.val_fraction = 0.3;
    cfg.lr = 1e-4;
    cfg.hflip = 0.0;
    let run = tmp.path().join("run");
    let summary = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();

    // Validation came from TrainDataset (10 pairs), the test sets are the five, 3 images each.
    assert_eq!((summary.train_images + summary.val_images), 10);
    assert!(summary.val_images >= 1);
    assert_eq!(summary.test_images, 15);
    assert_eq!(summary.selected_on, "val");
    let table = &summary.test_sets;
    let names: Vec<&str> = table.iter().map(|r| r.set.as_str()).collect();
    assert_eq!(names, TEST_SETS);
    assert!(table.iter().all(|r| r.images == 3));
    // Every metric present, finite and in range, and not one model-independent constant.
    for r in table {
        for (n, v) in r.columns() {
            assert!(
                v.is_finite() && (0.0..=1.0).contains(&v),
                "{} {n} = {v}",
                r.set
            );
        }
    }
    // Not a degenerate model: partial masks.
    let mdice: f64 = table.iter().map(|r| r.metrics.mdice).sum::<f64>() / 5.0;
    assert!(mdice > 0.05 && mdice < 0.95, "mean mDice {mdice}");
    // The sets differ (their own generator seeds and looks), so their rows do.
    let wfm: Vec<u64> = table.iter().map(|r| r.metrics.wfm.to_bits()).collect();
    assert!(wfm.iter().skip(1).any(|&w| w != wfm[0]), "{table:?}");
    let s_json = read_json(&run.join("summary.json"));
    let keys: Vec<String> = s_json["test_sets"][0]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for k in [
        "set", "images", "mdice", "miou", "wfm", "sm", "em_mean", "em_max", "em_adp", "mae",
    ] {
        assert!(
            keys.iter().any(|x| x == k),
            "summary.json test_sets lacks {k}: {keys:?}"
        );
    }
    // The table is the test evaluation of the epoch chosen on val (logged in metrics.jsonl).
    let best = summary.best_epoch.unwrap();
    let jsonl = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = jsonl
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["epoch"] == best)
        .unwrap();
    assert_tables_close(&rows(&rec["test"]["sets"]), table, 1e-12, "metrics.jsonl"); // JSON: an ulp
    assert!(
        rec["val"].get("sets").is_none(),
        "validation has no per-set table"
    );
    // The run's page opens with the headline and the per-set table.
    let page = std::fs::read_to_string(run.join("report.html")).unwrap();
    let head = page.find("class=\"headline\"").unwrap();
    assert!(head < page.find("Training loss").unwrap());
    assert!(page.contains("id=\"test-sets\"") && page.contains("<td>CVC-ClinicDB</td>"));
    assert!(page.contains("Selection map") && page.contains(">qkv</th>"));
    assert!(page.contains("Eφ max") && page.contains("predicted, not true (FP)"));

    // Resuming a finished run keeps its split and numbers; other split settings are refused.
    let again = seg::train(&cfg, &run, &Device::Cpu, true, &mut Silent).unwrap();
    assert_tables_close(&again.test_sets, table, 1e-12, "resumed"); // read back from JSON
    let mut stale = cfg.clone();
    stale.val_fraction = 0.5;
    let e = seg::train(&stale, &run, &Device::Cpu, true, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    // A split.json that is not the one these settings make is refused by name.
    let split_path = run.join("split.json");
    let kept = std::fs::read_to_string(&split_path).unwrap();
    let mut split = read_json(&split_path);
    let moved = split["val"].as_array_mut().unwrap().pop().unwrap();
    split["train"].as_array_mut().unwrap().push(moved);
    std::fs::write(&split_path, split.to_string()).unwrap();
    let e = seg::train(&cfg, &run, &Device::Cpu, true, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("split.json") && e.contains("differs"), "{e}");
    std::fs::write(&split_path, kept).unwrap();
    // The base model alone (zero-shot) reports the same per-set table shape.
    let mut zs = cfg.clone();
    zs.method = seg::Method::ZeroShot;
    let z = seg::train(
        &zs,
        &tmp.path().join("zero-shot"),
        &Device::Cpu,
        false,
        &mut Silent,
    )
    .unwrap();
    assert_eq!(z.test_sets.len(), 5);

    // ONNX Runtime through the CLI: a PraNet run's job saves the maps and scores every set.
    let run_s = run.to_str().unwrap();
    let out = tmp.path().join("infer");
    let (code, text) = common::cli::gps_seg(
        &[
            "infer",
            "--run",
            run_s,
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "3",
            "--no-overlays",
            "--quiet",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("| CVC-300 | 3 |"), "{text}");
    let (code, text) = common::cli::gps_seg(
        &[
            "infer", "--run", run_s, "--data", "kvasir", "--out", "x", "--quiet",
        ],
        tmp.path(),
    );
    assert!(code != 0 && text.contains("pranet layout"), "{text}");
    let rep = read_json(&out.join("report.json"));
    let ort = rows(&rep["sets"]);
    // Engines differ in float rounding: where a probability sits that close to an 8-bit
    // rounding edge, the saved map's pixel moves one level, and a number with it.
    assert_tables_close(&ort, table, 5e-6, "ORT infer --run vs training");
    // The Candle SAM on the merged weights is training's own arithmetic: the table again, to
    // the last bits (JSON).
    let cand = tmp.path().join("infer-candle");
    let (code, text) = common::cli::gps_seg(
        &[
            "infer",
            "--run",
            run_s,
            "--engine",
            "candle",
            "--out",
            cand.to_str().unwrap(),
            "--batch-size",
            "3",
            "--no-overlays",
            "--quiet",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{text}");
    let candle = rows(&read_json(&cand.join("report.json"))["sets"]);
    assert_tables_close(&candle, table, 1e-12, "Candle infer --run vs training");

    // Every number is computed from exactly the saved maps: read them back and score again.
    let mut again = SetTable::new(FieldOptions::default(), "images");
    let inputs = gps_seg::infer::RunFolder::open(&run)
        .unwrap()
        .test_inputs(None)
        .unwrap();
    assert_eq!(inputs.items.len(), 15);
    for it in &inputs.items {
        assert!(set_of_id(&it.id).is_some(), "{}", it.id);
        let map = image::open(out.join("probs").join(format!("{}.png", it.id)))
            .unwrap()
            .to_luma8();
        let gt = image::open(it.mask.as_ref().unwrap()).unwrap().to_luma8();
        assert_eq!(map.dimensions(), gt.dimensions(), "{}", it.id);
        let gt: Vec<u8> = gt.as_raw().iter().map(|&v| u8::from(v >= 128)).collect();
        let hw = (map.height() as usize, map.width() as usize);
        let s = score_8bit(map.as_raw(), &gt, hw, &FieldOptions::default()).unwrap();
        again.add(&it.id, s);
    }
    // (JSON's floats may be an ulp off.)
    assert_tables_close(
        &again.finish().unwrap(),
        &ort,
        1e-12,
        "the saved maps' table",
    );

    // Two shards merged keep the per-set table exactly.
    let mut shard_dirs = Vec::new();
    for i in 0..2 {
        let d = tmp.path().join(format!("shard{i}"));
        let shard = format!("{i}/2");
        let (code, text) = common::cli::gps_seg(
            &[
                "infer",
                "--run",
                run_s,
                "--out",
                d.to_str().unwrap(),
                "--shard",
                &shard,
                "--no-overlays",
                "--quiet",
            ],
            tmp.path(),
        );
        assert_eq!(code, 0, "{text}");
        shard_dirs.push(d);
    }
    let merged =
        gps_seg::infer::report::merge_reports(&shard_dirs, &tmp.path().join("merged")).unwrap();
    assert_tables_close(&merged.sets, &ort, 1e-12, "merged shards");
    let html = std::fs::read_to_string(tmp.path().join("merged/report.html")).unwrap();
    assert!(html.contains("id=\"sets\"") && html.contains("<td>ETIS-LaribPolypDB</td>"));
}
