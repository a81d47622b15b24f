//! Integration tests for `gps_seg::data`: every format built on the fly in a temp dir,
//! including broken folders (each problem must be named, all at once).

use candle_core::Device;
use gps_seg::data::augment::{ClsAugment, SegAugment};
use gps_seg::data::kvasir::{OpenOptions, BBOX_FILE};
use gps_seg::data::loader::{ClsSource, SegSource};
use gps_seg::data::{
    synth_cls, synth_kvasir, to_original, ClsDataset, ClsLayout, ClsSplit, KvasirDataset, Loader,
    LoaderConfig, Resize, Split,
};
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

fn save_rgb(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn save_gray(path: &Path, img: &GrayImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// An image whose red value is `40·marker` and a mask whose first `marker+1` columns are on.
fn write_pair(root: &Path, stem: &str, iext: &str, mext: &str, hw: (u32, u32), marker: u8) {
    let (h, w) = hw;
    let img = RgbImage::from_pixel(w, h, Rgb([40 * marker, 100, 100]));
    save_rgb(&root.join("images").join(format!("{stem}.{iext}")), &img);
    let mask = GrayImage::from_fn(w, h, |x, _| {
        Luma([if x <= marker as u32 { 255 } else { 0 }])
    });
    save_gray(&root.join("masks").join(format!("{stem}.{mext}")), &mask);
}

fn data_err(r: gps_seg::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(gps_seg::Error::Data { msg }) => msg,
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

#[test]
fn kvasir_pairs_by_name_not_by_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Sorted by full file name, images are [a.jpg, a.k.jpg] but masks are [a.k.png, a.png]:
    // pairing by position would swap them.
    write_pair(root, "a", "jpg", "png", (12, 16), 1);
    write_pair(root, "a.k", "jpg", "png", (12, 16), 4);
    write_pair(root, "z", "png", "jpeg", (10, 14), 2);
    let ds = KvasirDataset::open(root).unwrap();
    assert_eq!(ds.ids(), vec!["a", "a.k", "z"]);
    for (i, marker) in [(0usize, 1u8), (1, 4), (2, 2)] {
        let s = ds.load(i, 8, Resize::Squash).unwrap();
        let (h, _) = s.orig_size;
        let on: usize = s.orig_mask.iter().map(|&v| v as usize).sum();
        assert_eq!(
            on,
            h * (marker as usize + 1),
            "{}: mask of another image",
            s.id
        );
        let red = s.image[0];
        let expected = (40.0 * marker as f32) / 255.0;
        assert!(
            (red - expected).abs() < 0.05,
            "{}: red {red} vs {expected}",
            s.id
        );
        assert_eq!(s.image.len(), 3 * 64);
        assert_eq!(s.mask.len(), 64);
    }
}

#[test]
fn kvasir_mask_threshold_is_128() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    save_rgb(&root.join("images/t.png"), &RgbImage::new(4, 1));
    let vals = [0u8, 127, 128, 255];
    let m = GrayImage::from_fn(4, 1, |x, _| Luma([vals[x as usize]]));
    save_gray(&root.join("masks/t.png"), &m);
    let ds = KvasirDataset::open(root).unwrap();
    let s = ds.load(0, 4, Resize::Squash).unwrap();
    assert_eq!(s.orig_mask, vec![0, 0, 1, 1]);
}

#[test]
fn kvasir_collects_every_problem_and_names_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_pair(root, "good", "jpg", "jpg", (8, 8), 1);
    // Image without mask.
    save_rgb(&root.join("images/lonely_image.jpg"), &RgbImage::new(8, 8));
    // Mask without image.
    save_gray(&root.join("masks/lonely_mask.jpg"), &GrayImage::new(8, 8));
    // Mask of a different size.
    save_rgb(&root.join("images/sized.jpg"), &RgbImage::new(8, 8));
    save_gray(&root.join("masks/sized.jpg"), &GrayImage::new(9, 8));
    // Corrupt JPEG.
    std::fs::write(root.join("images/broken.jpg"), b"this is not a jpeg").unwrap();
    save_gray(&root.join("masks/broken.jpg"), &GrayImage::new(8, 8));
    let msg = data_err(KvasirDataset::open(root));
    for needle in [
        "lonely_image.jpg",
        "lonely_mask.jpg",
        "masks/sized.jpg",
        "images/broken.jpg",
    ] {
        assert!(msg.contains(needle), "`{needle}` not named in:\n{msg}");
    }
    assert!(msg.contains("4 problem(s)"), "{msg}");
    assert_eq!(
        msg.lines().count(),
        5,
        "one header line + one per problem:\n{msg}"
    );
}

#[test]
fn kvasir_skip_bad_keeps_the_clean_pairs_and_lists_the_rest() {
    use gps_seg::data::kvasir::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (i, s) in ["p1", "p2", "p3"].iter().enumerate() {
        write_pair(root, s, "jpg", "jpg", (8, 8), i as u8);
    }
    save_rgb(&root.join("images/lonely.jpg"), &RgbImage::new(8, 8));
    std::fs::write(root.join("images/broken.jpg"), b"this is not a jpeg").unwrap();
    save_gray(&root.join("masks/broken.jpg"), &GrayImage::new(8, 8));
    std::fs::create_dir(root.join("images/folder.png")).unwrap();
    // A split that names a bad pair: the pair is dropped from it, the rest is kept.
    std::fs::write(root.join("train.txt"), "p1\np2\nbroken\n").unwrap();
    std::fs::write(root.join("val.txt"), "p3\n").unwrap();
    // Refused as a whole without the flag, naming every problem.
    let msg = data_err(KvasirDataset::open(root));
    assert!(
        msg.contains("4 problem(s)") && msg.contains("split names id `broken`"),
        "{msg}"
    );
    let opts = OpenOptions {
        skip_bad: true,
        ..Default::default()
    };
    let ds = KvasirDataset::open_with(root, &opts).unwrap();
    assert_eq!(ds.ids(), vec!["p1", "p2", "p3"]);
    assert_eq!(ds.skipped.len(), 3, "{:?}", ds.skipped);
    for needle in ["lonely.jpg", "broken.jpg", "folder.png"] {
        assert!(
            ds.skipped.iter().any(|l| l.contains(needle)),
            "{needle}: {:?}",
            ds.skipped
        );
    }
    let sp = ds.root_split.clone().unwrap();
    assert_eq!(
        (sp.train, sp.test),
        (vec!["p1".to_string(), "p2".into()], vec!["p3".into()])
    );
    // Nothing clean left is still an error.
    let empty = tempfile::tempdir().unwrap();
    save_rgb(&empty.path().join("images/a.jpg"), &RgbImage::new(8, 8));
    save_gray(&empty.path().join("masks/a.jpg"), &GrayImage::new(9, 8));
    assert!(KvasirDataset::open_with(empty.path(), &opts).is_err());
}

#[test]
fn kvasir_run_split_has_train_val_test_and_a_stale_one_is_refused() {
    use gps_seg::data::kvasir::{Split, SplitSpec};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let ids: Vec<String> = (0..40).map(|i| format!("p{i:02}")).collect();
    for (i, s) in ids.iter().enumerate() {
        write_pair(&root, s, "jpg", "jpg", (8, 8), (i % 5) as u8);
    }
    let ds = KvasirDataset::open(&root).unwrap();
    let spec = SplitSpec {
        seed: 3,
        test_fraction: 0.2,
        val_fraction: 0.25,
    };
    let run = dir.path().join("run");
    let sp = ds.split3_for_run(&run, spec).unwrap();
    assert_eq!((sp.train.len(), sp.val.len(), sp.test.len()), (24, 8, 8));
    let all: std::collections::BTreeSet<&String> =
        sp.train.iter().chain(&sp.val).chain(&sp.test).collect();
    assert_eq!(all.len(), 40, "lists overlap or lose ids");
    // The test list is the plain seeded split's: carving validation never touches it.
    assert_eq!(sp.test, Split::seeded(&ids, 3, 0.2).test);
    // split.json has the three lists and is read back unchanged.
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    for k in ["train", "val", "test"] {
        assert!(j[k].is_array(), "split.json lacks `{k}`");
    }
    assert_eq!(ds.split3_for_run(&run, spec).unwrap(), sp);
    // Another seed or fraction is a stale split.json: refused, naming the field.
    for (field, other) in [
        ("seed", SplitSpec { seed: 4, ..spec }),
        (
            "val_fraction",
            SplitSpec {
                val_fraction: 0.1,
                ..spec
            },
        ),
        (
            "test_fraction",
            SplitSpec {
                test_fraction: 0.3,
                ..spec
            },
        ),
    ] {
        let e = ds.split3_for_run(&run, other).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("split.json"),
            "{field}: {e}"
        );
    }
    // Overlapping lists in a split.json are refused.
    let mut bad = sp.clone();
    bad.val.push(sp.test[0].clone());
    bad.write_json(&run.join("split.json")).unwrap();
    let e = ds.split3_for_run(&run, spec).unwrap_err().to_string();
    assert!(e.contains("both the val and the test list"), "{e}");
    // Data with train.txt + val.txt + test.txt keeps all three as given.
    std::fs::write(root.join("train.txt"), ids[..30].join("\n")).unwrap();
    std::fs::write(root.join("val.txt"), ids[30..34].join("\n")).unwrap();
    std::fs::write(root.join("test.txt"), ids[34..].join("\n")).unwrap();
    let ds = KvasirDataset::open(&root).unwrap();
    let sp = ds.split3_for_run(&dir.path().join("run2"), spec).unwrap();
    assert_eq!((sp.train.len(), sp.val.len(), sp.test.len()), (30, 4, 6));
    assert_eq!(sp.val, ids[30..34].to_vec());
}

#[test]
fn kvasir_empty_and_missing_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let msg = data_err(KvasirDataset::open(dir.path()));
    assert!(msg.contains("images") && msg.contains("masks"), "{msg}");
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::fs::create_dir_all(dir.path().join("masks")).unwrap();
    let msg = data_err(KvasirDataset::open(dir.path()));
    assert!(msg.contains("no images"), "{msg}");
}

#[test]
fn kvasir_truncated_jpeg_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_pair(root, "ok", "jpg", "jpg", (64, 64), 3);
    let img = RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 7]));
    save_rgb(&root.join("images/cut.jpg"), &img);
    save_gray(&root.join("masks/cut.jpg"), &GrayImage::new(64, 64));
    let bytes = std::fs::read(root.join("images/cut.jpg")).unwrap();
    // Keep the headers, drop most of the entropy-coded data.
    std::fs::write(root.join("images/cut.jpg"), &bytes[..bytes.len() / 3]).unwrap();
    // The header check at open already sees the missing end-of-image marker.
    let msg = data_err(KvasirDataset::open(root));
    assert!(
        msg.contains("images/cut.jpg") && msg.contains("truncated"),
        "{msg}"
    );
    assert!(!msg.contains("ok.jpg"), "{msg}");
    // Full decoding reports it as well.
    let msg = data_err(KvasirDataset::open_with(
        root,
        &OpenOptions {
            verify_decode: true,
            ..Default::default()
        },
    ));
    assert!(msg.contains("images/cut.jpg"), "{msg}");
}

#[test]
fn split_is_disjoint_stable_and_round_trips() {
    let ids: Vec<String> = (0..1000).map(|i| format!("id{i:04}")).collect();
    let a = Split::seeded(&ids, 7, 0.12);
    let b = Split::seeded(&ids, 7, 0.12);
    let c = Split::seeded(&ids, 8, 0.12);
    assert_eq!(a, b);
    assert_ne!(a.test, c.test);
    assert_eq!((a.train.len(), a.test.len()), (880, 120));
    let train: std::collections::BTreeSet<_> = a.train.iter().collect();
    assert!(a.test.iter().all(|t| !train.contains(t)));
    // Order of the input does not matter.
    let mut rev = ids.clone();
    rev.reverse();
    assert_eq!(Split::seeded(&rev, 7, 0.12).test, a.test);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("split.json");
    a.write_json(&p).unwrap();
    assert_eq!(Split::read_json(&p).unwrap(), a);
    a.write_txt(dir.path()).unwrap();
    let t = Split::read_txt(dir.path()).unwrap();
    assert_eq!((t.train, t.test), (a.train.clone(), a.test.clone()));

    // An overlapping split file is refused.
    std::fs::write(dir.path().join("test.txt"), format!("{}\n", a.train[0])).unwrap();
    let msg = data_err(Split::read_txt(dir.path()));
    assert!(msg.contains(&a.train[0]), "{msg}");
}

#[test]
fn kvasir_root_split_files_are_used_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (i, s) in ["p1", "p2", "p3"].iter().enumerate() {
        write_pair(root, s, "jpg", "jpg", (8, 8), i as u8);
    }
    std::fs::write(root.join("train.txt"), "p1\np2.jpg\n").unwrap();
    std::fs::write(root.join("val.txt"), "p3\n").unwrap();
    let ds = KvasirDataset::open(root).unwrap();
    let sp = ds.split(0, 0.5);
    assert_eq!(sp.train, vec!["p1", "p2"]);
    assert_eq!(sp.test, vec!["p3"]);
    assert_eq!(ds.indices_of(&sp.test, "val.txt").unwrap(), vec![2]);
    // A split naming a missing id is an error naming the file and the id.
    std::fs::write(root.join("val.txt"), "p3\nghost\n").unwrap();
    let msg = data_err(KvasirDataset::open(root));
    assert!(msg.contains("ghost") && msg.contains("val.txt"), "{msg}");
    std::fs::write(root.join("val.txt"), "p3\n").unwrap();
    let ds_ids = vec!["nope".to_string()];
    std::fs::remove_file(root.join("train.txt")).unwrap();
    let ds = KvasirDataset::open(root).unwrap();
    assert!(ds.root_split.is_none());
    // A run's seeded split is written once and read back unchanged, whatever the seed later.
    let run = dir.path().join("run");
    let first = ds.split_for_run(&run, 1, 0.34).unwrap();
    assert_eq!((first.train.len(), first.test.len()), (2, 1));
    assert!(run.join("split.json").is_file());
    let again = ds.split_for_run(&run, 99, 0.67).unwrap();
    assert_eq!(again, first);
    // A run split naming an id the dataset lacks is refused, naming the file.
    let mut bad = first.clone();
    bad.test.push("ghost2".into());
    bad.write_json(&run.join("split.json")).unwrap();
    let msg = data_err(ds.split_for_run(&run, 1, 0.34));
    assert!(
        msg.contains("ghost2") && msg.contains("split.json"),
        "{msg}"
    );
    assert!(data_err(ds.indices_of(&ds_ids, "split.json")).contains("nope"));
}

#[test]
fn synth_kvasir_is_readable_and_masks_are_the_polyp_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = synth_kvasir::SynthKvasirConfig {
        count: 5,
        seed: 11,
        max_side: 120,
        jpeg_quality: 90,
    };
    let summary = synth_kvasir::generate(root, &cfg).unwrap();
    assert_eq!(summary.count, 5);
    assert!(root.join(BBOX_FILE).is_file());
    let ds = KvasirDataset::open_with(
        root,
        &OpenOptions {
            verify_decode: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.len(), 5);
    for i in 0..5 {
        let truth = synth_kvasir::render(11, i, 120);
        let s = ds.load(i, 32, Resize::LongestSidePad).unwrap();
        assert_eq!(s.id, truth.id);
        assert_eq!(
            s.orig_size,
            (truth.image.height() as usize, truth.image.width() as usize)
        );
        let expect: Vec<u8> = truth
            .mask
            .as_raw()
            .iter()
            .map(|&v| u8::from(v > 0))
            .collect();
        assert_eq!(
            s.orig_mask, expect,
            "{}: decoded mask differs from polyp pixels",
            s.id
        );
        assert!(s.orig_mask.contains(&1), "{}: no polyp", s.id);
        // Boxes from the json: every mask pixel inside some box, every box edge touches the mask.
        let e = &ds.entries[i];
        assert!(!e.boxes.is_empty());
        let (h, w) = s.orig_size;
        let on = |x: usize, y: usize| s.orig_mask[y * w + x] == 1;
        for y in 0..h {
            for x in 0..w {
                if on(x, y) {
                    let (xf, yf) = (x as f32, y as f32);
                    assert!(e
                        .boxes
                        .iter()
                        .any(|b| xf >= b.xmin && xf <= b.xmax && yf >= b.ymin && yf <= b.ymax));
                }
            }
        }
        for b in &e.boxes {
            let (x0, y0, x1, y1) = (
                b.xmin as usize,
                b.ymin as usize,
                b.xmax as usize,
                b.ymax as usize,
            );
            assert!((y0..=y1).any(|y| on(x0, y)) && (y0..=y1).any(|y| on(x1, y)));
            assert!((x0..=x1).any(|x| on(x, y0)) && (x0..=x1).any(|x| on(x, y1)));
        }
        // Mapping the resized mask back recovers the original (up to edge pixels).
        let back = to_original(&s.mask, 32, Resize::LongestSidePad, s.orig_size).unwrap();
        let agree = back
            .iter()
            .zip(&s.orig_mask)
            .filter(|(p, &t)| (**p >= 0.5) == (t == 1))
            .count();
        assert!(
            agree as f64 / (h * w) as f64 > 0.9,
            "{}: {agree}/{}",
            s.id,
            h * w
        );
        assert_eq!(s.boxes.len(), e.boxes.len());
    }
}

#[test]
fn seg_loader_batches_resume_and_cache_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth_kvasir::SynthKvasirConfig {
        count: 7,
        seed: 2,
        max_side: 64,
        jpeg_quality: 90,
    };
    synth_kvasir::generate(dir.path(), &cfg).unwrap();
    let ds = KvasirDataset::open(dir.path()).unwrap();
    let src = SegSource {
        dataset: ds,
        size: 16,
        resize: Resize::Squash,
        augment: SegAugment::default(),
        prompts: None,
    };
    let dev = Device::Cpu;
    let mk = |cache: bool| {
        let mut c = LoaderConfig::train(3, 5);
        c.cache = cache;
        Loader::new(src.clone(), vec![0, 1, 2, 3, 4, 5], c).unwrap()
    };
    let mut a = mk(true);
    let mut b = mk(false);
    assert_eq!(a.batches_per_epoch(), 2);
    let mut seen = Vec::new();
    while let Some(batch) = a.next_batch(&dev).unwrap() {
        let other = b.next_batch(&dev).unwrap().unwrap();
        assert_eq!(batch.images.dims(), &[3, 3, 16, 16]);
        assert_eq!(batch.masks.dims(), &[3, 1, 16, 16]);
        assert_eq!(batch.ids, other.ids);
        let d = (batch.images - other.images).unwrap().abs().unwrap();
        assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        seen.extend(batch.ids);
    }
    assert!(b.next_batch(&dev).unwrap().is_none());
    seen.sort();
    assert_eq!(seen.len(), 6);
    seen.dedup();
    assert_eq!(seen.len(), 6, "an epoch visits each index once");
    // Resume: save the state mid-epoch, continue in a fresh loader, compare.
    a.next_batch(&dev).unwrap().unwrap();
    let st = a.state();
    let json = serde_json::to_string(&st).unwrap();
    let x = a.next_batch(&dev).unwrap().unwrap();
    let mut r = mk(false);
    r.restore(serde_json::from_str(&json).unwrap()).unwrap();
    let y = r.next_batch(&dev).unwrap().unwrap();
    assert_eq!(x.ids, y.ids);
    let d = (x.images - y.images).unwrap().abs().unwrap();
    assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Epoch 2 is shuffled differently from epoch 1 (6 items: equal orders are unlikely but
    // possible, so compare the two epochs' full orders over several epochs).
    let mut orders = Vec::new();
    let mut l = mk(false);
    for _ in 0..3 {
        let mut o = Vec::new();
        while let Some(bt) = l.next_batch(&dev).unwrap() {
            o.extend(bt.ids);
        }
        orders.push(o);
    }
    assert!(orders[0] != orders[1] || orders[1] != orders[2]);
    // A state for another subset is refused.
    let mut other = Loader::new(src.clone(), vec![0, 1], LoaderConfig::train(1, 5)).unwrap();
    assert!(other.restore(st).is_err());
}

fn write_vtab(root: &Path, lines: &[(&str, i64)], file: &str) {
    let mut s = String::new();
    for (rel, l) in lines {
        s.push_str(&format!("{rel} {l}\n"));
    }
    std::fs::write(root.join(file), s).unwrap();
}

#[test]
fn classification_layouts_map_labels() {
    let dir = tempfile::tempdir().unwrap();
    // ImageFolder: classes sorted by folder name.
    let f = dir.path().join("folder");
    for (cls, n) in [("zebra", 2), ("ant", 1), ("moth", 3)] {
        for i in 0..n {
            save_rgb(
                &f.join(format!("train/{cls}/{i}.png")),
                &RgbImage::new(5, 5),
            );
        }
    }
    let ds = ClsDataset::open(&f, ClsLayout::ImageFolder, ClsSplit::Train, None).unwrap();
    assert_eq!(ds.class_names, vec!["ant", "moth", "zebra"]);
    assert_eq!(ds.class_counts(), vec![1, 3, 2]);
    assert!(ds
        .samples
        .iter()
        .all(|s| s.id.contains(&ds.class_names[s.label as usize])));

    // VTAB-1k.
    let v = dir.path().join("vtab");
    for i in 0..4 {
        save_rgb(&v.join(format!("images/{i}.jpg")), &RgbImage::new(6, 6));
    }
    write_vtab(
        &v,
        &[("images/0.jpg", 2), ("images/1.jpg", 0)],
        "train800val200.txt",
    );
    write_vtab(&v, &[("images/2.jpg", 4), ("3.jpg", 1)], "test.txt");
    assert_eq!(ClsLayout::detect(&v).unwrap(), ClsLayout::Vtab);
    let tr = ClsDataset::open(&v, ClsLayout::Vtab, ClsSplit::TrainVal, None).unwrap();
    assert_eq!(tr.num_classes, 5, "inferred over every split file");
    assert_eq!(
        tr.samples.iter().map(|s| s.label).collect::<Vec<_>>(),
        vec![2, 0]
    );
    let te = ClsDataset::open(&v, ClsLayout::Vtab, ClsSplit::Test, None).unwrap();
    assert_eq!(te.len(), 2, "paths resolve under images/ too");

    // FGVC json.
    let g = dir.path().join("fgvc");
    save_rgb(&g.join("images/a/x.jpg"), &RgbImage::new(6, 6));
    save_rgb(&g.join("images/b/y.jpg"), &RgbImage::new(6, 6));
    std::fs::write(g.join("train.json"), r#"{"a/x.jpg": 3, "b/y.jpg": 1}"#).unwrap();
    std::fs::write(g.join("test.json"), r#"{"b/y.jpg": 1}"#).unwrap();
    let fg = ClsDataset::open(&g, ClsLayout::Fgvc, ClsSplit::Train, None).unwrap();
    assert_eq!(fg.num_classes, 4);
    let labels: Vec<(String, u32)> = fg.samples.iter().map(|s| (s.id.clone(), s.label)).collect();
    assert_eq!(labels, vec![("a/x.jpg".into(), 3), ("b/y.jpg".into(), 1)]);

    // CIFAR-100 binary: coarse byte, fine byte, R plane, G plane, B plane.
    let c = dir.path().join("cifar");
    std::fs::create_dir_all(&c).unwrap();
    let mut bytes = Vec::new();
    for (fine, r) in [(7u8, 200u8), (99, 10)] {
        bytes.push(0);
        bytes.push(fine);
        bytes.extend(std::iter::repeat_n(r, 1024));
        bytes.extend(std::iter::repeat_n(50u8, 1024));
        bytes.extend(std::iter::repeat_n(90u8, 1024));
    }
    std::fs::write(c.join("test.bin"), &bytes).unwrap();
    let cf = ClsDataset::open(&c, ClsLayout::Cifar100, ClsSplit::Test, None).unwrap();
    assert_eq!(
        cf.samples.iter().map(|s| s.label).collect::<Vec<_>>(),
        vec![7, 99]
    );
    let img = cf.load_rgb(0).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    assert_eq!(img.get_pixel(31, 31).0, [200, 50, 90]);
}

#[test]
fn classification_overlap_is_refused_and_validation_is_carved_per_class() {
    use gps_seg::data::classification::check_disjoint;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // ImageFolder with train/ only: "test" falls back to the root, i.e. the same images
    // (each image distinct: overlap is by content).
    for (k, c) in ["cat", "dog"].into_iter().enumerate() {
        for i in 0..10u8 {
            save_rgb(
                &root.join(format!("train/{c}/{i}.png")),
                &RgbImage::from_pixel(4, 4, Rgb([i, k as u8, 9])),
            );
        }
    }
    let tr = ClsDataset::open(root, ClsLayout::ImageFolder, ClsSplit::Train, None).unwrap();
    let te = ClsDataset::open(
        &root.join("train"),
        ClsLayout::ImageFolder,
        ClsSplit::Test,
        None,
    )
    .unwrap();
    let e = check_disjoint(&[("train", &tr), ("test", &te)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("both the train and the test split"), "{e}");
    assert!(e.contains("20 overlap(s)"), "{e}");
    // A carved validation part: disjoint, seeded, every class present.
    let (a, v) = tr.clone().carve_val(5, 0.2).unwrap();
    assert_eq!((a.samples.len(), v.samples.len()), (16, 4));
    for label in 0..2 {
        assert_eq!(v.samples.iter().filter(|s| s.label == label).count(), 2);
    }
    check_disjoint(&[("train", &a), ("val", &v)]).unwrap();
    let (_, v2) = tr.clone().carve_val(5, 0.2).unwrap();
    let ids = |d: &ClsDataset| d.samples.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&v), ids(&v2));
    assert!(tr.carve_val(5, 1.0).is_err());
}

#[test]
fn classification_errors_are_collected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path();
    save_rgb(&v.join("images/0.jpg"), &RgbImage::new(6, 6));
    write_vtab(
        v,
        &[
            ("images/0.jpg", 7),
            ("images/missing.jpg", 0),
            ("images/0.jpg", -1),
        ],
        "train800.txt",
    );
    let msg = data_err(ClsDataset::open(
        v,
        ClsLayout::Vtab,
        ClsSplit::Train,
        Some(3),
    ));
    assert!(
        msg.contains("label 7") && msg.contains("missing.jpg") && msg.contains("label -1"),
        "{msg}"
    );
    assert!(msg.contains("3 problem(s)"), "{msg}");
    // Empty ImageFolder and an empty class folder.
    let e = dir.path().join("empty");
    std::fs::create_dir_all(&e).unwrap();
    assert!(data_err(ClsDataset::image_folder(&e)).contains("no class sub-folders"));
    std::fs::create_dir_all(e.join("cat")).unwrap();
    assert!(data_err(ClsDataset::image_folder(&e)).contains("cat"));
    // CIFAR: truncated file and a fine label out of range.
    let c = dir.path().join("cifar");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("train.bin"), vec![0u8; 3074 + 10]).unwrap();
    assert!(data_err(ClsDataset::cifar100(&c, ClsSplit::Train)).contains("train.bin"));
    let mut rec = vec![0u8; 3074];
    rec[1] = 150;
    std::fs::write(c.join("train.bin"), rec).unwrap();
    assert!(data_err(ClsDataset::cifar100(&c, ClsSplit::Train)).contains("150"));
}

#[test]
fn synth_cls_sets_load_and_batch_with_two_views() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    let cfg = synth_cls::SynthClsConfig {
        classes: 4,
        per_class: 5,
        test_per_class: 2,
        layout: synth_cls::SynthLayout::Vtab,
        kind: synth_cls::SynthKind::Upstream,
        size: 16,
        seed: 3,
    };
    assert_eq!(synth_cls::generate(&up, &cfg).unwrap(), 4 * 7);
    let tr = ClsDataset::open(
        &up,
        ClsLayout::detect(&up).unwrap(),
        ClsSplit::TrainVal,
        None,
    )
    .unwrap();
    assert_eq!(tr.class_counts(), vec![5; 4]);
    assert_eq!(tr.class_names[0], "red_circle");
    // 4 classes form a 2 × 2 grid: both shape and colour are needed.
    assert_eq!(
        synth_cls::class_names(synth_cls::SynthKind::Upstream, 4),
        vec!["red_circle", "red_square", "green_circle", "green_square"]
    );
    let te = ClsDataset::open(&up, ClsLayout::Vtab, ClsSplit::Test, None).unwrap();
    assert_eq!(te.len(), 8);

    let down = dir.path().join("down");
    let cfg = synth_cls::SynthClsConfig {
        layout: synth_cls::SynthLayout::ImageFolder,
        kind: synth_cls::SynthKind::Downstream,
        ..cfg
    };
    synth_cls::generate(&down, &cfg).unwrap();
    let ds = ClsDataset::open(&down, ClsLayout::ImageFolder, ClsSplit::Train, Some(4)).unwrap();
    assert_eq!(ds.num_classes, 4);
    assert_eq!(ds.len(), 4 * 4);
    let src = ClsSource {
        dataset: ds,
        size: 16,
        augment: ClsAugment::contrastive(),
        views: 2,
    };
    let mut l = Loader::all(src, LoaderConfig::train(3, 1)).unwrap();
    let b = l.next_batch(&Device::Cpu).unwrap().unwrap();
    assert_eq!(b.images.dims(), &[6, 3, 16, 16]);
    let labels = b.labels.to_vec1::<u32>().unwrap();
    assert_eq!(labels[..3], labels[3..]);
    // Same seed, same images.
    let again = synth_cls::render(
        synth_cls::SynthKind::Downstream,
        2,
        4,
        16,
        &mut gps_seg::util::Rng::new(1),
    );
    let again2 = synth_cls::render(
        synth_cls::SynthKind::Downstream,
        2,
        4,
        16,
        &mut gps_seg::util::Rng::new(1),
    );
    assert_eq!(again, again2);
    // The generated file is exactly that render (vtab lists images in generation order).
    let first_test = std::fs::read_to_string(up.join("test.txt")).unwrap();
    let (rel, label) = first_test.lines().next().unwrap().split_once(' ').unwrap();
    assert_eq!(label, "0");
    let disk = image::open(up.join(rel)).unwrap().to_rgb8();
    assert_eq!((disk.width(), disk.height()), (16, 16));
}

// ------------------------------------------------------------------------- PraNet layout

/// A mask `h×w` with `marker + 1` columns at 255 and the next one at `grey`.
fn stripe_mask(hw: (u32, u32), marker: u8, grey: u8) -> GrayImage {
    GrayImage::from_fn(hw.1, hw.0, |x, _| {
        Luma([match x {
            x if x <= marker as u32 => 255,
            x if x == marker as u32 + 1 => grey,
            _ => 0,
        }])
    })
}

/// A PNG pair in `dir/{subs.0,subs.1}/stem.png`: image `h×w`, [`stripe_mask`].
fn write_png_pair(
    dir: &Path,
    subs: (&str, &str),
    stem: &str,
    hw: (u32, u32),
    marker: u8,
    grey: u8,
) {
    let img = RgbImage::from_pixel(hw.1, hw.0, Rgb([40 * marker, 90, 90]));
    save_rgb(&dir.join(subs.0).join(format!("{stem}.png")), &img);
    let mask = stripe_mask(hw, marker, grey);
    save_gray(&dir.join(subs.1).join(format!("{stem}.png")), &mask);
}

/// CVC-ClinicDB as released: `Original/<stem>.tif` (RGB) + `Ground Truth/<stem>.tif` (grey).
fn write_tiff_pair(dir: &Path, stem: &str, hw: (u32, u32), marker: u8, grey: u8) {
    let img = RgbImage::from_pixel(hw.1, hw.0, Rgb([30, 40 * marker, 90]));
    save_rgb(&dir.join("Original").join(format!("{stem}.tif")), &img);
    let mask = stripe_mask(hw, marker, grey);
    save_gray(&dir.join("Ground Truth").join(format!("{stem}.tif")), &mask);
}

fn mask_columns_on(e: &gps_seg::data::kvasir::KvasirEntry) -> usize {
    let s = gps_seg::data::kvasir::load_entry(e, 8, Resize::Squash).unwrap();
    let (h, _) = s.orig_size;
    s.orig_mask.iter().map(|&v| v as usize).sum::<usize>() / h
}

#[test]
fn pranet_layout_reads_train_and_the_test_sets_present_in_table_order() {
    use gps_seg::data::pranet::{PairLayout, TEST_SETS};
    use gps_seg::data::PranetDataset;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let train = root.join("TrainDataset");
    for (i, stem) in [
        "cju0qkwl35piu0993l0dewei2",
        "cju0roawvklrq0799vmjorwfv",
        "1",
    ]
    .iter()
    .enumerate()
    {
        write_png_pair(&train, ("image", "mask"), stem, (10, 12), i as u8, 200);
    }
    // Listed out of table order on disk: the result follows TEST_SETS.
    write_png_pair(
        &root.join("TestDataset/CVC-300"),
        ("images", "masks"),
        "150",
        (9, 11),
        2,
        127,
    );
    let kv = root.join("TestDataset/Kvasir");
    write_png_pair(&kv, ("images", "masks"), "a", (8, 10), 1, 128);
    write_png_pair(&kv, ("images", "masks"), "b", (8, 10), 3, 0);
    // CVC-ClinicDB in its original TIFF layout, a non-binary ground truth.
    let clinic = root.join("TestDataset/CVC-ClinicDB");
    write_tiff_pair(&clinic, "1", (7, 9), 2, 128);
    write_tiff_pair(&clinic, "2", (7, 9), 0, 127);
    // Files beside the folders are ignored.
    std::fs::write(root.join("TestDataset/readme.txt"), b"x").unwrap();

    let ds = PranetDataset::open_with(
        root,
        &OpenOptions {
            verify_decode: true,
            ..Default::default()
        },
    )
    .unwrap();
    let names: Vec<&str> = ds.test.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["Kvasir", "CVC-ClinicDB", "CVC-300"]);
    assert!(names.iter().all(|n| TEST_SETS.contains(n)));
    let t = ds.train().unwrap();
    assert_eq!(t.layout, PairLayout::ImageMask);
    assert_eq!(t.entries.len(), 3);
    assert_eq!(
        ds.test_set("CVC-ClinicDB").unwrap().layout,
        PairLayout::ClinicDbOriginal
    );
    assert_eq!(
        ds.test_set("Kvasir").unwrap().layout,
        PairLayout::ImagesMasks
    );
    assert!(ds.test_set("CVC-ColonDB").is_none());
    let ids = ds.test_ids();
    assert_eq!(ids["Kvasir"], vec!["a", "b"]);
    assert_eq!(ids["CVC-ClinicDB"], vec!["1", "2"]);
    // The same stem in two sets is two images: ids are per set.
    assert!(ds.train_ids().unwrap().contains(&"1".to_string()));
    // Masks thresholded at 128 (v ≥ 128), PNG and TIFF alike; sizes from the headers.
    let kvs = ds.test_set("Kvasir").unwrap();
    assert_eq!(mask_columns_on(&kvs.entries[0]), 1 + 1 + 1); // marker 1 + the 128 column
    assert_eq!(mask_columns_on(&kvs.entries[1]), 3 + 1);
    let cl = ds.test_set("CVC-ClinicDB").unwrap();
    assert_eq!(cl.entries[0].size, (7, 9));
    assert_eq!(mask_columns_on(&cl.entries[0]), 2 + 1 + 1);
    assert_eq!(mask_columns_on(&cl.entries[1]), 1);
    assert_eq!(
        mask_columns_on(&ds.test_set("CVC-300").unwrap().entries[0]),
        3
    );
    // Validation carved from TrainDataset, seeded, disjoint, at least one id.
    let (tr, va) = ds.train_val(5, 0.2).unwrap();
    assert_eq!((tr.len(), va.len()), (2, 1));
    assert_eq!(ds.train_val(5, 0.2).unwrap(), (tr.clone(), va.clone()));
    assert!(va.iter().all(|v| !tr.contains(v)));
    assert!(ds.train_val(5, 1.0).is_err());
    assert_eq!(ds.report().len(), 4);
    // A set folder opened alone (CVC-ClinicDB as released).
    let (alone, skipped) =
        gps_seg::data::pranet::open_pair_set(&clinic, &OpenOptions::default()).unwrap();
    assert_eq!(
        (alone.name.as_str(), alone.entries.len()),
        ("CVC-ClinicDB", 2)
    );
    assert!(skipped.is_empty());
}

#[test]
fn pranet_layout_collects_every_problem_and_skip_bad_keeps_clean_pairs() {
    use gps_seg::data::PranetDataset;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let test = root.join("TestDataset");
    // A misspelt set, a set with no layout, an unpaired mask and a size mismatch.
    write_png_pair(
        &test.join("Kvasir-SEG"),
        ("images", "masks"),
        "a",
        (8, 8),
        1,
        0,
    );
    std::fs::create_dir_all(test.join("CVC-ColonDB/pictures")).unwrap();
    let etis = test.join("ETIS-LaribPolypDB");
    write_png_pair(&etis, ("images", "masks"), "1", (8, 8), 1, 0);
    write_png_pair(&etis, ("images", "masks"), "2", (8, 8), 1, 0);
    save_gray(&etis.join("masks/3.png"), &GrayImage::new(8, 8));
    save_gray(&etis.join("masks/2.png"), &GrayImage::new(9, 8));
    let msg = data_err(PranetDataset::open(root));
    for want in [
        "Kvasir-SEG: not one of the test sets (Kvasir, CVC-ClinicDB",
        "CVC-ColonDB: no image/mask folders",
        "3.png: mask has no image (expected",
        "images/3.png)",
        "2.png: mask is 9×8 (w×h) but its image",
    ] {
        assert!(msg.contains(want), "missing `{want}` in:\n{msg}");
    }
    // Without the misspelt and empty folders, --skip-bad keeps the clean pair and lists the rest.
    std::fs::remove_dir_all(test.join("Kvasir-SEG")).unwrap();
    std::fs::remove_dir_all(test.join("CVC-ColonDB")).unwrap();
    assert!(data_err(PranetDataset::open(root)).contains("3.png"));
    let ds = PranetDataset::open_with(
        root,
        &OpenOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.test_ids()["ETIS-LaribPolypDB"], vec!["1"]);
    assert_eq!(ds.skipped.len(), 2, "{:?}", ds.skipped);
    // No TrainDataset: evaluation works, training is refused naming the folder.
    assert!(ds.train.is_none());
    assert!(ds
        .train_ids()
        .unwrap_err()
        .to_string()
        .contains("TrainDataset"));
    // No TestDataset at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(data_err(PranetDataset::open(empty.path())).contains("TestDataset"));
}

#[test]
fn synth_pranet_writes_five_distinct_test_sets_whole_and_reproducibly() {
    use gps_seg::data::pranet::TEST_SETS;
    use gps_seg::data::synth_pranet::{generate, SynthPranetConfig};
    use gps_seg::data::PranetDataset;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pranet");
    let cfg = SynthPranetConfig {
        train: 8,
        test: 4,
        seed: 3,
        max_side: 96,
    };
    let sums = generate(&out, &cfg).unwrap();
    assert_eq!(sums.len(), 6);
    let ds = PranetDataset::open_with(
        &out,
        &OpenOptions {
            verify_decode: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.train().unwrap().entries.len(), 8);
    assert_eq!(ds.test.len(), 5);
    for (s, name) in ds.test.iter().zip(TEST_SETS) {
        assert_eq!((s.name.as_str(), s.entries.len()), (name, 4));
    }
    // The sets differ: fixed sizes per set, smaller polyps in ETIS than in CVC-300, no image
    // shared between two sets.
    let by = |n: &str| sums.iter().find(|s| s.name == n).unwrap();
    assert_eq!(by("CVC-ClinicDB").max_size, (72, 96));
    assert_eq!(by("CVC-ClinicDB").min_size, (72, 96));
    assert_eq!(by("CVC-ColonDB").max_size, (84, 96));
    assert_eq!(by("ETIS-LaribPolypDB").max_size, (76, 96));
    assert!(
        by("ETIS-LaribPolypDB").mean_polyp_fraction < 0.5 * by("CVC-300").mean_polyp_fraction,
        "{sums:?}"
    );
    let first_pixels: Vec<Vec<u8>> = ds
        .test
        .iter()
        .map(|s| {
            image::open(&s.entries[0].image_path)
                .unwrap()
                .to_rgb8()
                .into_raw()
        })
        .collect();
    for i in 0..first_pixels.len() {
        for j in i + 1..first_pixels.len() {
            assert_ne!(
                first_pixels[i], first_pixels[j],
                "sets {i} and {j} share an image"
            );
        }
    }
    // Masks are binary and non-empty.
    for s in ds.test.iter().chain(ds.train.iter()) {
        for e in &s.entries {
            let m = image::open(&e.mask_path).unwrap().to_luma8();
            assert!(
                m.as_raw().iter().all(|&v| v == 0 || v == 255),
                "{}",
                e.mask_path.display()
            );
            assert!(m.as_raw().contains(&255), "{}", e.mask_path.display());
        }
    }
    // Same seed, same bytes; an existing set is never overwritten.
    let again = dir.path().join("again");
    generate(&again, &cfg).unwrap();
    let a = std::fs::read(out.join("TestDataset/CVC-300/images/synth00002.png")).unwrap();
    let b = std::fs::read(again.join("TestDataset/CVC-300/images/synth00002.png")).unwrap();
    assert_eq!(a, b);
    let e = generate(&out, &cfg).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(ds.test_ids()["Kvasir"].len(), 4);
    // Bad settings are refused before anything is written.
    let bad = dir.path().join("bad");
    let e = generate(
        &bad,
        &SynthPranetConfig {
            train: 1,
            ..cfg.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("train"), "{e}");
    assert!(!bad.exists());
    // Nothing but the set itself in the parent folder (no temporary folder left behind).
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["again", "pranet"]);
}

#[test]
fn cli_synth_pranet_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let run = |args: &[&str]| {
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_gps-seg"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        (r.status.success(), text)
    };
    let o = out.to_str().unwrap();
    let (ok, t) = run(&[
        "data",
        "synth-pranet",
        "--out",
        o,
        "--train",
        "3",
        "--test",
        "2",
        "--max-side",
        "48",
    ]);
    assert!(ok, "{t}");
    assert!(
        t.contains("ETIS-LaribPolypDB") && t.contains("TrainDataset"),
        "{t}"
    );
    let (ok, t) = run(&["data", "check", "--layout", "pranet", o]);
    assert!(ok, "{t}");
    assert!(t.contains("CVC-300: 2 pairs (images/ + masks/)"), "{t}");
    assert!(t.contains("TrainDataset: 3 pairs (image/ + mask/)"), "{t}");
    // An existing set is refused, with a non-zero exit, and left as it was.
    let (ok, t) = run(&["data", "synth-pranet", "--out", o, "--train", "3"]);
    assert!(!ok && t.contains("not empty"), "{t}");
    assert_eq!(
        std::fs::read_dir(out.join("TestDataset/Kvasir/images"))
            .unwrap()
            .count(),
        2
    );
}
