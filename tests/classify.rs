//! Classification with GPS on tiny synthetic sets (fresh random init, a 2-block ViT at 16 px):
//! every method writes its run folder; GPS steps lower the training loss on a fixed batch;
//! SupCon selection never reaches the head; selection counts for ViT-B/16 at K = 1.

use candle_core::{Device, Tensor};
use gps_seg::data::augment::ClsAugment;
use gps_seg::data::classification::ClsLayout;
use gps_seg::data::loader::{ClsSource, Loader, LoaderConfig};
use gps_seg::data::synth_cls::{generate, SynthClsConfig, SynthKind, SynthLayout};
use gps_seg::data::ClsDataset;
use gps_seg::gps::{Counts, Policy};
use gps_seg::models::{Classifier, ClassifierConfig, VitConfig};
use gps_seg::nn::ParamStore;
use gps_seg::train::cls::{self, ClsTrainConfig, Method, SelectLoss};
use gps_seg::train::observer::Silent;
use gps_seg::util::tensors;
use std::path::Path;

fn tiny_vit() -> ClassifierConfig {
    ClassifierConfig::Vit(VitConfig {
        name: "vit_test".into(),
        image_size: 16,
        patch_size: 4,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_dim: 64,
        ..VitConfig::tiny()
    })
}

fn dataset(dir: &Path, layout: SynthLayout) {
    let cfg = SynthClsConfig {
        classes: 4,
        per_class: 10,
        test_per_class: 4,
        layout,
        kind: SynthKind::Downstream,
        size: 16,
        seed: 5,
    };
    generate(dir, &cfg).unwrap();
}

fn tiny_cfg(data: &Path, layout: ClsLayout) -> ClsTrainConfig {
    let mut c = ClsTrainConfig::recipe(data.to_path_buf(), layout, None, tiny_vit());
    c.epochs = 2;
    c.warmup_epochs = 0;
    c.batch_size = 8;
    c.eval_batch_size = 16;
    c.select_batches = Some(2);
    c.max_steps_per_epoch = Some(2);
    c.lr = 3e-3;
    c.min_lr = 1e-4;
    c
}

#[test]
fn every_method_runs_and_writes_its_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vtab");
    dataset(&data, SynthLayout::Vtab);
    let runs: [(Method, SelectLoss); 7] = [
        (Method::Gps, SelectLoss::SupCon),
        (Method::Gps, SelectLoss::Ce),
        (Method::Full, SelectLoss::SupCon),
        (Method::Linear, SelectLoss::SupCon),
        (Method::Bias, SelectLoss::SupCon),
        (Method::Random, SelectLoss::SupCon),
        (Method::Magnitude, SelectLoss::SupCon),
    ];
    let mut pcts = Vec::new();
    for (method, sl) in runs {
        let mut cfg = tiny_cfg(&data, ClsLayout::Vtab);
        cfg.method = method;
        cfg.select_loss = sl;
        let run = tmp.path().join(format!("run-{}", cfg.label()));
        let s = cls::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
        for f in [
            "config.json",
            "model.json",
            "metrics.jsonl",
            "report.html",
            "summary.json",
            "merged.safetensors",
            "loss.png",
            "accuracy.png",
            "best/params.safetensors",
            "checkpoints/LATEST",
        ] {
            assert!(run.join(f).exists(), "{}: missing {f}", cfg.label());
        }
        let sparse = method.criterion().is_some();
        assert_eq!(
            run.join("gps/delta.safetensors").exists(),
            sparse,
            "{}",
            cfg.label()
        );
        assert_eq!(s.test_images, 16, "VTAB test.txt: 4 classes × 4");
        // VTAB's model-selection stage: train on train800, choose on val200, score test.
        assert_eq!(s.train_images, 32, "VTAB train800: 4 classes × 8");
        assert_eq!(s.val_images, 8, "VTAB val200: 4 classes × 2");
        assert_eq!(s.selected_on, "val");
        assert!((0.0..=1.0).contains(&s.best_acc) && (0.0..=1.0).contains(&s.val_acc));
        let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2, "one record per epoch");
        // The merged checkpoint loads into the architecture of model.json.
        let mc: ClassifierConfig = gps_seg::util::fs::read_json(&run.join("model.json")).unwrap();
        assert_eq!(mc.num_classes(), 4);
        let merged = tensors::load(&s.merged, &Device::Cpu).unwrap();
        let store = ParamStore::frozen(merged.clone(), &Device::Cpu);
        Classifier::new(&mc, &store).unwrap();
        store.check_all_used().unwrap();
        if sparse {
            // Outside the selection, the merged weights equal the base bit for bit.
            let base = cls::base_weights(&mc, None, cfg.seed, &Device::Cpu, &mut Silent).unwrap();
            let art = gps_seg::gps::Artifact::load(&run.join("gps"), &Device::Cpu).unwrap();
            let name = "blocks.1.mlp.fc1.weight";
            let idx = &art.selection.indices[name];
            assert_eq!(idx.len(), 64, "K = 1 per row of a [64, 32] matrix");
            let b = base[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = merged[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (x, y)) in b.iter().zip(&m).enumerate() {
                if idx.binary_search(&(i as u32)).is_err() {
                    assert_eq!(
                        x.to_bits(),
                        y.to_bits(),
                        "{name}[{i}] moved but was not selected"
                    );
                }
            }
            assert!(b != m, "{}: selected entries never changed", cfg.label());
            for (n, t) in &base {
                let treat = Policy::classifier().treatment(n, t.dims());
                if treat == gps_seg::gps::Treatment::Frozen {
                    assert_eq!(
                        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        merged[n].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "frozen `{n}` changed"
                    );
                }
            }
        }
        pcts.push((cfg.label(), s.trainable_pct));
    }
    let pct = |l: &str| pcts.iter().find(|(n, _)| n == l).unwrap().1;
    assert!(pct("linear") < pct("bias") && pct("bias") < pct("gps") && pct("gps") < pct("full"));
    assert_eq!(pct("gps"), pct("random"));
    assert_eq!(pct("gps"), pct("magnitude"));
    assert!((pct("full") - 100.0).abs() < 1e-9);

    // A second start in the same folder is refused without --resume.
    let cfg = tiny_cfg(&data, ClsLayout::Vtab);
    let e = cls::train(
        &cfg,
        &tmp.path().join("run-gps"),
        &Device::Cpu,
        false,
        &mut Silent,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
}

#[test]
fn imagefolder_without_splits_gets_a_seeded_split_and_resume_finishes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("if");
    dataset(&data, SynthLayout::ImageFolder);
    // `<root>/train` holds one folder per class and no split folders.
    let flat = data.join("train");
    let mut cfg = tiny_cfg(&flat, ClsLayout::ImageFolder);
    cfg.method = Method::Bias;
    cfg.epochs = 2;
    let run = tmp.path().join("run");
    let full = cls::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
    let split: cls::SeededSplit = gps_seg::util::fs::read_json(&run.join("split.json")).unwrap();
    assert_eq!(split.train.len() + split.test.len(), 32);
    assert!(
        split.test.iter().all(|t| !split.train.contains(t)),
        "disjoint"
    );
    assert_eq!(full.test_images, split.test.len());

    // Simulate a kill after epoch 1: drop epoch 2's checkpoint, point LATEST at epoch 1.
    let ck = run.join("checkpoints");
    std::fs::remove_dir_all(ck.join("epoch-0002")).unwrap();
    std::fs::write(ck.join("LATEST"), "epoch-0001\n").unwrap();
    let resumed = cls::train(&cfg, &run, &Device::Cpu, true, &mut Silent).unwrap();
    assert_eq!(resumed.last_acc, full.last_acc, "resume reproduces the run");
    let mut other = cfg.clone();
    other.lr = 1e-2;
    let e = cls::train(&other, &run, &Device::Cpu, true, &mut Silent).unwrap_err();
    assert!(e.to_string().contains("different settings"), "{e}");
}

#[test]
fn gps_steps_lower_the_training_loss_on_a_fixed_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vtab");
    dataset(&data, SynthLayout::Vtab);
    let mut cfg = tiny_cfg(&data, ClsLayout::Vtab);
    cfg.method = Method::Gps;
    // One batch of 8 fixed images, no augmentation: every step sees the same data.
    cfg.train_limit = Some(8);
    cfg.augment = ClsAugment {
        hflip: 0.0,
        crop_scale: None,
        jitter: None,
    };
    cfg.epochs = 12;
    cfg.max_steps_per_epoch = None;
    cfg.lr = 1e-2;
    cfg.min_lr = 1e-2;
    let run = tmp.path().join("run");
    cls::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
    let state: serde_json::Value =
        gps_seg::util::fs::read_json(&run.join("checkpoints/epoch-0012/state.json")).unwrap();
    let losses: Vec<f64> = state["step_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 12);
    let first = losses[0];
    let last3 = losses[9..].iter().sum::<f64>() / 3.0;
    assert!(
        last3 < 0.7 * first,
        "GPS masked fine-tuning did not fit a fixed batch: {losses:?}"
    );
}

#[test]
fn supcon_selection_reaches_only_the_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vtab");
    dataset(&data, SynthLayout::Vtab);
    let ds =
        ClsDataset::open(&data, ClsLayout::Vtab, gps_seg::data::ClsSplit::Train, None).unwrap();
    let mcfg = tiny_vit();
    let mut loader = Loader::all(
        ClsSource {
            dataset: ds,
            size: 16,
            augment: ClsAugment::contrastive(),
            views: 2,
        },
        LoaderConfig::train(6, 1),
    )
    .unwrap();
    let batch = loader.next_batch(&Device::Cpu).unwrap().unwrap();
    assert_eq!(batch.images.dims(), &[12, 3, 16, 16]);
    // Every tensor trainable, so any tensor the loss reaches gets a gradient.
    let store = ParamStore::init(&Device::Cpu, 3);
    let model = Classifier::new(&mcfg, &store).unwrap();
    let vars = store.trainable_vars();
    let g = cls::selection_loss(&model, &batch, SelectLoss::SupCon, 0.07)
        .unwrap()
        .backward()
        .unwrap();
    let reached: Vec<&str> = vars
        .iter()
        .filter(|(_, v)| {
            g.get(v.as_tensor()).is_some_and(|t| {
                t.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
        })
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        !reached.iter().any(|n| n.starts_with("head.")),
        "{reached:?}"
    );
    for n in [
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
    ] {
        assert!(reached.contains(&n), "SupCon gradient missed {n}");
    }
    // The CE ablation goes through the fresh head (so this check can fail).
    let n = batch.labels.dim(0).unwrap() / 2;
    let one_view = gps_seg::data::loader::ClsBatch {
        images: batch.images.narrow(0, 0, n).unwrap(),
        labels: batch.labels.narrow(0, 0, n).unwrap(),
    };
    let g = cls::selection_loss(&model, &one_view, SelectLoss::Ce, 0.07)
        .unwrap()
        .backward()
        .unwrap();
    let head = vars.iter().find(|(n, _)| n == "head.weight").unwrap();
    assert!(g.get(head.1.as_tensor()).is_some());
    // An odd batch cannot be two views.
    let odd = gps_seg::data::loader::ClsBatch {
        images: batch.images.narrow(0, 0, 3).unwrap(),
        labels: Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap(),
    };
    assert!(cls::selection_loss(&model, &odd, SelectLoss::SupCon, 0.07).is_err());
}

#[test]
fn vit_b16_selection_counts_at_k1() {
    let classes = 100;
    let shapes = ClassifierConfig::preset("vit_b16", classes)
        .unwrap()
        .param_shapes();
    let c = Counts::from_shapes(&shapes, &Policy::classifier(), 1).totals();
    // Independently: K = 1 entry per output row of every weight matrix
    // (patch embedding 768 rows; per block qkv 2304, proj 768, fc1 3072, fc2 768 rows),
    // every bias of those layers, and the whole head; norms, cls_token, pos_embed frozen.
    let (d, mlp, depth) = (768usize, 3072usize, 12usize);
    let rows_per_block = 3 * d + d + mlp + d;
    let selected = d + depth * rows_per_block;
    let biases = d + depth * rows_per_block; // one bias entry per output row, same layers
    let head = classes * d + classes;
    assert_eq!(c.selected, selected);
    assert_eq!(c.selected, 83_712);
    assert_eq!(c.trainable, biases + head);
    let total: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(c.total, total);
    assert_eq!(c.frozen, total - selected - biases - head);
    // And an actual (random-criterion) selection on a built model agrees with the shapes.
    let small = tiny_vit();
    let store = ParamStore::init(&Device::Cpu, 0);
    Classifier::new(&small, &store).unwrap();
    let base = store.current_tensors().unwrap();
    let sel = gps_seg::gps::select_from_grads(
        &base,
        None,
        &Policy::classifier(),
        1,
        gps_seg::gps::Level::Neuron,
        gps_seg::gps::Criterion::Random,
        7,
    )
    .unwrap();
    let expect = Counts::from_shapes(&small.param_shapes(), &Policy::classifier(), 1).totals();
    assert_eq!(sel.sizes(), (expect.selected, expect.trainable));
    assert!(!sel.indices.keys().any(|n| n.starts_with("head.")));
}

#[test]
fn experiment_writes_its_table_and_chart() {
    use gps_seg::studies::classify::{run_classify, ClsExperimentConfig};
    let tmp = tempfile::tempdir().unwrap();
    // A "pretrained" checkpoint: fresh weights of the tiny ViT, saved with its config.
    let mc = tiny_vit();
    let store = ParamStore::init(&Device::Cpu, 11);
    Classifier::new(&mc, &store).unwrap();
    let ckpt = tmp.path().join("vit.safetensors");
    tensors::save_safetensors(&ckpt, &store.current_tensors().unwrap(), None).unwrap();
    let mut cfg = ClsExperimentConfig::new(ckpt, mc, tmp.path().join("down"));
    cfg.classes = 3;
    cfg.per_class = 5;
    cfg.test_per_class = 2;
    cfg.epochs = 1;
    cfg.batch_size = 4;
    cfg.select_batches = Some(1);
    cfg.seeds = 2;
    cfg.variants
        .retain(|v| v.label == "linear" || v.label == "gps-k1");
    let out = tmp.path().join("exp");
    let (rows, table) = run_classify(&cfg, &out, false, &Device::Cpu, &mut Silent).unwrap();
    assert_eq!(rows.len(), 4, "2 variants × 2 seeds");
    // The evidence rows: mean ± std over the seeds, linear paired with gps-k1.
    assert!(
        table.contains("(reference)") && table.contains("[95% CI]"),
        "{table}"
    );
    assert_eq!(rows[0].test_correct.len(), 6, "one 0/1 per test image");
    assert!(
        table.contains("| linear |") && table.contains("| gps-k1 |"),
        "{table}"
    );
    for f in [
        "table.md",
        "results.json",
        "accuracy.png",
        "train-all/seed-42/linear/summary.json",
        "train-all/seed-43/gps-k1/gps/delta.safetensors",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    assert_eq!(rows[0].summary.test_images, 6);
    // A second call re-uses the finished runs (same settings) and gives the same table.
    let (_, again) = run_classify(&cfg, &out, false, &Device::Cpu, &mut Silent).unwrap();
    assert_eq!(again, table);
}

/// VTAB-1k's two stages: settings are chosen on train800 → val200 (the default run), and the
/// final stage (`final_stage`) trains on train800val200 and ships the *last* epoch, scored on
/// test, without a validation split to choose on. Elsewhere the final stage is refused.
#[test]
fn vtab_final_stage_trains_on_train800val200_and_ships_the_last_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vtab");
    dataset(&data, SynthLayout::Vtab);
    let mut cfg = tiny_cfg(&data, ClsLayout::Vtab);
    cfg.method = Method::Linear;
    cfg.epochs = 3;
    cfg.final_stage = true;
    let s = cls::train(
        &cfg,
        &tmp.path().join("final"),
        &Device::Cpu,
        false,
        &mut Silent,
    )
    .unwrap();
    assert_eq!(s.train_images, 40, "train800val200: 4 classes × 10");
    assert_eq!(s.val_images, 0);
    assert_eq!(s.selected_on, "last");
    assert_eq!(s.best_epoch, Some(3), "the last epoch ships");
    assert_eq!(s.best_acc, s.last_acc);
    // An ImageFolder has no such stage: refused, naming the field.
    let folder = tmp.path().join("folder");
    dataset(&folder, SynthLayout::ImageFolder);
    let mut f = tiny_cfg(&folder, ClsLayout::ImageFolder);
    f.final_stage = true;
    let e = cls::train(&f, &tmp.path().join("f"), &Device::Cpu, false, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("final_stage"), "{e}");
}

/// Copy the files of folder `from` into `to` (created), recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Split overlap is found by content, not by path (#27 case 8): `cp -r train test`, one
/// validation image copied into test under another name, and val copied into test are each
/// refused before training, naming both files and both splits.
#[test]
fn split_overlap_is_found_by_content_naming_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let open = |data: &Path| {
        let cfg = tiny_cfg(data, ClsLayout::ImageFolder);
        gps_seg::train::cls::ClsData::open(&cfg, &tmp.path().join("run")).map(|_| ())
    };
    let fresh = |name: &str| {
        let d = tmp.path().join(name);
        dataset(&d, SynthLayout::ImageFolder);
        open(&d).unwrap();
        d
    };
    let first_file = |dir: &Path| {
        let class = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap();
        std::fs::read_dir(&class)
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap()
    };
    // cp -r train test
    let a = fresh("a");
    std::fs::remove_dir_all(a.join("test")).unwrap();
    copy_dir(&a.join("train"), &a.join("test"));
    let e = open(&a).unwrap_err().to_string();
    assert!(
        e.contains("/a/train/") && e.contains("/a/test/") && e.contains("identical bytes"),
        "{e}"
    );
    assert!(
        e.contains("the train split") && e.contains("the test split"),
        "{e}"
    );
    assert!(e.contains("overlap(s) in all"), "{e}");
    // One validation image in test, renamed.
    let b = fresh("b");
    let v = first_file(&b.join("val"));
    let class = v.parent().unwrap().file_name().unwrap();
    let renamed = b.join("test").join(class).join("zz-renamed.png");
    std::fs::copy(&v, &renamed).unwrap();
    let e = open(&b).unwrap_err().to_string();
    assert!(
        e.contains(&v.display().to_string()) && e.contains(&renamed.display().to_string()),
        "{e}"
    );
    assert!(
        e.contains("the val split") && e.contains("the test split"),
        "{e}"
    );
    // val copied into test (same names, same classes).
    let c = fresh("c");
    copy_dir(&c.join("val"), &c.join("test"));
    let e = open(&c).unwrap_err().to_string();
    assert!(
        e.contains("the val split") && e.contains("the test split"),
        "{e}"
    );
}

/// Class folders whose names are not UTF-8 (#27 case 14): two such classes whose names read
/// alike are not an overlap of a split with itself; a real overlap between them names the
/// actual splits and both files (lossily).
#[cfg(unix)]
#[test]
fn non_utf8_class_names_are_not_mistaken_for_an_overlap() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let classes = [OsStr::from_bytes(b"c\xff"), OsStr::from_bytes(b"c\xfe")];
    let mut value = 0u8;
    for split in ["train", "val", "test"] {
        for c in classes {
            let dir = data.join(split).join(c);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..4 {
                value += 3;
                image::RgbImage::from_pixel(16, 16, image::Rgb([value, i, 7]))
                    .save(dir.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let cfg = tiny_cfg(&data, ClsLayout::ImageFolder);
    let run = tmp.path().join("run");
    gps_seg::train::cls::ClsData::open(&cfg, &run).unwrap();
    // A training image of one class copied into the other class of the test split.
    std::fs::copy(
        data.join("train").join(classes[0]).join("1.png"),
        data.join("test").join(classes[1]).join("9.png"),
    )
    .unwrap();
    let e = match gps_seg::train::cls::ClsData::open(&cfg, &run) {
        Ok(_) => panic!("a training image in the test split was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("the train split") && e.contains("the test split"),
        "{e}"
    );
    assert!(e.contains("c\u{fffd}") && e.contains("9.png"), "{e}");
    assert!(!e.contains("the val and the val"), "{e}");
}
