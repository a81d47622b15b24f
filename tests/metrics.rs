//! The field's metrics (`gps_seg::metrics::score_*`, `SetMetrics`) against an independent
//! implementation: PySODMetrics (PyPI `pysodmetrics`, the Python port of PraNet's toolbox) and
//! medpy's `hd95`, run by `scripts/check_metrics.py` on random and edge-case pairs. Skipped with
//! a notice when the Python packages are missing (`.ci/run` installs them, pinned).

use gps_seg::metrics::{
    dice_iou, probs_to_8bit, score_8bit, score_probs, FieldOptions, FieldScore, MapScale,
    SetMetrics, EM_THRESHOLDS,
};
use gps_seg::util::Rng;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Agreement required with the independent implementation.
const TOL: f64 = 1e-6;

#[derive(Clone)]
enum Map {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

struct Case {
    id: String,
    h: usize,
    w: usize,
    map: Map,
    gt: Vec<u8>,
    scale: MapScale,
    set: &'static str,
}

/// Ellipses (a few, random) as a 0/1 mask.
fn blobs(rng: &mut Rng, h: usize, w: usize, count: usize, max_r: f32) -> Vec<u8> {
    let mut m = vec![0u8; h * w];
    for _ in 0..count {
        let (cy, cx) = (rng.uniform(0.0, h as f32), rng.uniform(0.0, w as f32));
        let (ry, rx) = (
            rng.uniform(0.5, max_r.max(0.6)),
            rng.uniform(0.5, max_r.max(0.6)),
        );
        for y in 0..h {
            for x in 0..w {
                let (dy, dx) = ((y as f32 - cy) / ry, (x as f32 - cx) / rx);
                if dy * dy + dx * dx <= 1.0 {
                    m[y * w + x] = 1;
                }
            }
        }
    }
    m
}

/// A ground truth of kind `k`.
fn make_gt(rng: &mut Rng, k: usize, h: usize, w: usize) -> (Vec<u8>, &'static str) {
    let n = h * w;
    let side = h.min(w) as f32;
    match k {
        0 => (blobs(rng, h, w, 1, side * 0.4), "one blob"),
        1 => {
            let count = 1 + rng.below(3);
            (blobs(rng, h, w, count, side * 0.25), "blobs")
        }
        2 => (vec![0; n], "empty"),
        3 => (vec![1; n], "full"),
        4 => {
            let mut m = vec![0; n];
            m[rng.below(n)] = 1;
            (m, "one pixel")
        }
        5 => {
            // A tiny object: 2–3 pixels in a row.
            let mut m = vec![0; n];
            let (y, x) = (rng.below(h), rng.below(w));
            for dx in 0..2 + rng.below(2) {
                if x + dx < w {
                    m[y * w + x + dx] = 1;
                }
            }
            (m, "tiny")
        }
        6 => {
            // Noise: many equidistant features (ties in the distance transform).
            let p = rng.uniform(0.05, 0.5) as f64;
            (
                (0..n).map(|_| u8::from(rng.bernoulli(p))).collect(),
                "noise",
            )
        }
        7 => {
            // Two blobs in opposite corners: two quadrants hold no object.
            let mut m = vec![0; n];
            for y in 0..h {
                for x in 0..w {
                    let a = y < h / 3 && x < w / 3;
                    let b = y >= h - h / 3 && x >= w - w / 3;
                    m[y * w + x] = u8::from(a || b);
                }
            }
            if !m.contains(&1) {
                m[0] = 1;
            }
            (m, "opposite corners")
        }
        8 => {
            // The last column only: the centroid lies on it (PySODMetrics' S-measure is NaN).
            let mut m = vec![0; n];
            for y in 0..h {
                m[y * w + w - 1] = 1;
            }
            (m, "last column")
        }
        _ => {
            // A stripe with ragged edges.
            let mut m = vec![0; n];
            let x0 = rng.below(w);
            for y in 0..h {
                let lo = x0.saturating_sub(rng.below(3));
                let hi = (x0 + 1 + rng.below(4)).min(w);
                for x in lo..hi {
                    m[y * w + x] = 1;
                }
            }
            (m, "stripe")
        }
    }
}

/// A prediction of kind `k` for `gt`, as probabilities in [0, 1].
fn make_pred(rng: &mut Rng, k: usize, gt: &[u8], h: usize, w: usize) -> (Vec<f32>, &'static str) {
    let n = h * w;
    match k {
        0 => ((0..n).map(|_| rng.f32()).collect(), "uniform random"),
        1 => {
            // A plausible prediction: the ground truth blurred, shifted, with noise.
            let (sy, sx) = (rng.below(3) as isize - 1, rng.below(3) as isize - 1);
            let conf = rng.uniform(0.6, 1.0);
            let p = (0..n)
                .map(|i| {
                    let (y, x) = ((i / w) as isize + sy, (i % w) as isize + sx);
                    let on = y >= 0
                        && x >= 0
                        && (y as usize) < h
                        && (x as usize) < w
                        && gt[y as usize * w + x as usize] == 1;
                    let base = if on { conf } else { 1.0 - conf };
                    (base + rng.uniform(-0.3, 0.3)).clamp(0.0, 1.0)
                })
                .collect();
            (p, "noisy gt")
        }
        2 => (vec![0.0; n], "empty prediction"),
        3 => (vec![1.0; n], "full prediction"),
        4 => {
            let c = [0.1f32, 0.5, 77.0 / 255.0, 0.3, 0.9][rng.below(5)];
            (vec![c; n], "constant")
        }
        5 => (
            gt.iter().map(|&t| f32::from(t)).collect(),
            "the ground truth itself",
        ),
        6 => (
            // Around the 0.5 threshold, exact 0.5 included.
            (0..n)
                .map(|_| [0.5f32, 127.0 / 255.0, 128.0 / 255.0, 0.49, 0.51][rng.below(5)])
                .collect(),
            "near 0.5",
        ),
        _ => {
            let count = 1 + rng.below(2);
            let b = blobs(rng, h, w, count, h.min(w) as f32 * 0.3);
            (
                b.iter()
                    .map(|&v| {
                        if v == 1 {
                            rng.uniform(0.5, 1.0)
                        } else {
                            rng.uniform(0.0, 0.2)
                        }
                    })
                    .collect(),
                "other blobs",
            )
        }
    }
}

/// Three ways of reading a map (`k % 3`), each its own "set": the saved 8-bit map, the same
/// stretched as the toolbox does, the probabilities themselves.
fn reading(k: usize, p: Vec<f32>) -> (Map, MapScale, &'static str) {
    match k % 3 {
        0 => (Map::U8(probs_to_8bit(&p)), MapScale::AsSaved, "u8"),
        1 => (Map::U8(probs_to_8bit(&p)), MapScale::MinMax, "u8-minmax"),
        _ => (Map::F32(p), MapScale::AsSaved, "f32"),
    }
}

fn cases() -> Vec<Case> {
    let mut rng = Rng::new(2024);
    let mut out = Vec::new();
    let sizes = [
        (1usize, 2usize),
        (2, 1),
        (1, 40),
        (37, 1),
        (2, 2),
        (7, 9),
        (31, 17),
        (64, 64),
        (45, 120),
        (128, 33),
        (200, 150),
    ];
    for i in 0..260 {
        let (h, w) = if i < 40 {
            sizes[i % sizes.len()]
        } else {
            (2 + rng.below(150), 2 + rng.below(150))
        };
        let gk = i % 10;
        let pk = (i / 10 + i) % 8;
        let (gt, gname) = make_gt(&mut rng, gk, h, w);
        let (p, pname) = make_pred(&mut rng, pk, &gt, h, w);
        let (map, scale, set) = reading(i, p);
        out.push(Case {
            id: format!("case{i:03} {h}x{w} gt={gname} pred={pname}"),
            h,
            w,
            map,
            gt,
            scale,
            set,
        });
    }
    // Constant maps on objects in two opposite corners, at sizes whose quadrants exceed NumPy's
    // 8192-value buffer: Sα's `sigma_x == 0` test on the empty quadrants depends on the exact
    // summation order of their means.
    let sizes = [(180usize, 170usize), (240, 97), (97, 300), (256, 256)];
    for (j, &(h, w)) in sizes.iter().enumerate() {
        for (k, c) in [0.1f32, 0.3, 77.0 / 255.0].into_iter().enumerate() {
            let (gt, _) = make_gt(&mut rng, 7, h, w);
            let p = vec![c; h * w];
            let (map, scale, set) = reading(j + k, p);
            out.push(Case {
                id: format!("large{j}{k} {h}x{w} gt=opposite corners pred=constant {c}"),
                h,
                w,
                map,
                gt,
                scale,
                set,
            });
        }
    }
    out
}

fn score(c: &Case, hd95: bool) -> FieldScore {
    let opts = FieldOptions {
        scale: c.scale,
        hd95,
    };
    match &c.map {
        Map::U8(m) => score_8bit(m, &c.gt, (c.h, c.w), &opts).unwrap(),
        Map::F32(p) => score_probs(p, &c.gt, (c.h, c.w), &opts).unwrap(),
    }
}

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Record |a − b| for `metric` and fail (with the case) when it exceeds [`TOL`].
fn check(max: &mut BTreeMap<&'static str, f64>, metric: &'static str, id: &str, a: f64, b: f64) {
    let d = (a - b).abs();
    assert!(
        d <= TOL,
        "{id}: {metric} = {a} here, {b} in PySODMetrics/medpy (|Δ| = {d:e})"
    );
    let m = max.entry(metric).or_insert(0.0);
    *m = m.max(d);
}

#[test]
fn field_metrics_match_pysodmetrics_and_medpy() {
    if !python_has("py_sod_metrics") {
        eprintln!(
            "NOTICE: python3 `pysodmetrics` not importable; skipping the independent check of \
             the field's metrics (CI installs it)"
        );
        return;
    }
    let cases = cases();
    assert!(cases.len() >= 200);
    let dir = tempfile::tempdir().unwrap();
    let mut blob = Vec::new();
    let mut manifest = Vec::new();
    for c in &cases {
        let map_at = blob.len();
        match &c.map {
            Map::U8(m) => blob.extend_from_slice(m),
            Map::F32(p) => p
                .iter()
                .for_each(|v| blob.extend_from_slice(&v.to_le_bytes())),
        }
        let gt_at = blob.len();
        blob.extend_from_slice(&c.gt);
        manifest.push(json!({
            "id": c.id, "h": c.h, "w": c.w,
            "kind": if matches!(c.map, Map::U8(_)) { "u8" } else { "f32" },
            "scale": if c.scale == MapScale::MinMax { "min_max" } else { "as_saved" },
            "map": map_at, "gt": gt_at, "set": c.set,
        }));
    }
    let (jp, bp, op) = (
        dir.path().join("cases.json"),
        dir.path().join("cases.bin"),
        dir.path().join("out.json"),
    );
    std::fs::write(&jp, serde_json::to_vec(&manifest).unwrap()).unwrap();
    std::fs::write(&bp, &blob).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_metrics.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([&jp, &bp, &op])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_metrics.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Value = serde_json::from_slice(&std::fs::read(&op).unwrap()).unwrap();
    let medpy = reference["medpy"].as_bool().unwrap_or(false);
    if !medpy {
        eprintln!("NOTICE: python3 `medpy` not importable; HD95 is not checked (CI installs it)");
    }
    let refs = reference["cases"].as_array().unwrap();
    assert_eq!(refs.len(), cases.len());

    let mut max: BTreeMap<&'static str, f64> = BTreeMap::new();
    let (mut nan_sm, mut dice_checked, mut hd95_checked) = (0, 0, 0);
    let mut excluded = BTreeSet::new();
    let mut sets: BTreeMap<&str, SetMetrics> = BTreeMap::new();
    for (c, r) in cases.iter().zip(refs) {
        assert_eq!(r["id"].as_str().unwrap(), c.id);
        let s = score(c, true);
        let id = c.id.as_str();
        check(&mut max, "wfm", id, s.wfm, f(r, "wfm"));
        check(&mut max, "em_adp", id, s.em_adp, f(r, "em_adp"));
        check(&mut max, "mae", id, s.mae, f(r, "mae"));
        let curve = r["em_curve"].as_array().unwrap();
        assert_eq!(curve.len(), EM_THRESHOLDS);
        assert_eq!(s.em_curve.len(), EM_THRESHOLDS);
        for (k, v) in curve.iter().enumerate() {
            check(&mut max, "em_curve", id, s.em_curve[k], v.as_f64().unwrap());
        }
        let sm_ref = f(r, "sm");
        if sm_ref.is_finite() {
            check(&mut max, "sm", id, s.sm, sm_ref);
        } else {
            // PySODMetrics' S-measure is NaN when the centroid is on the last row or column
            // (an empty quadrant); ours gives that quadrant weight 0 and stays in [0, 1].
            assert!((0.0..=1.0).contains(&s.sm), "{id}: sm = {}", s.sm);
            nan_sm += 1;
            excluded.insert(id);
        }
        // Dice / IoU: PySODMetrics' binary mode uses `> 0.5` and 0 for two empty masks; ours
        // `≥ 0.5` and 1. Compared where the conventions coincide, checked apart otherwise.
        let both_empty = s.counts.pred == 0 && s.counts.gt == 0;
        if both_empty {
            assert_eq!((s.dice, s.iou), (1.0, 1.0), "{id}");
        } else if !r["has_half"].as_bool().unwrap() {
            check(&mut max, "dice", id, s.dice, f(r, "dice"));
            check(&mut max, "iou", id, s.iou, f(r, "iou"));
            dice_checked += 1;
        }
        let hd = s.hd95.unwrap();
        if !r["hd95"].is_null() {
            check(&mut max, "hd95", id, hd, f(r, "hd95"));
            hd95_checked += 1;
        } else if s.counts.pred == 0 && s.counts.gt == 0 {
            assert_eq!(hd, 0.0, "{id}");
        } else if s.counts.pred == 0 || s.counts.gt == 0 {
            let diag = (((c.h - 1).pow(2) + (c.w - 1).pow(2)) as f64).sqrt();
            assert_eq!(hd, diag, "{id}");
        }
        if !excluded.contains(id) {
            sets.entry(c.set)
                .or_insert_with(|| SetMetrics::new(FieldOptions::default()))
                .add(id, s);
        }
    }
    // Set aggregation: per-image means, Eφ mean / max over the set's mean curve.
    let rsets = reference["sets"].as_object().unwrap();
    assert_eq!(rsets.len(), sets.len());
    for (name, m) in &sets {
        let r = &rsets[*name];
        assert_eq!(r["images"].as_u64().unwrap() as usize, m.len());
        let rep = m.finish().unwrap();
        let id = format!("set {name}");
        for (k, a) in [
            ("set wfm", rep.wfm),
            ("set sm", rep.sm),
            ("set em_mean", rep.em_mean),
            ("set em_max", rep.em_max),
            ("set em_adp", rep.em_adp),
            ("set mae", rep.mae),
        ] {
            check(&mut max, k, &id, a, f(r, &k[4..]));
        }
    }
    eprintln!(
        "{} cases ({} with PySODMetrics' S-measure NaN, compared apart; Dice/IoU compared on \
         {dice_checked}, HD95 on {hd95_checked}); max |Δ| per metric:",
        cases.len(),
        nan_sm
    );
    for (k, v) in &max {
        eprintln!("  {k:12} {v:.3e}");
    }
    assert!(nan_sm > 0 && nan_sm < cases.len() / 5, "{nan_sm}");
    assert!(dice_checked >= 150, "{dice_checked}");
    if medpy {
        assert!(hd95_checked >= 100, "{hd95_checked}");
    }
}

/// Dice and IoU of the new scores are the existing functions' values, for probabilities and
/// for their 8-bit maps.
#[test]
fn dice_and_iou_are_the_existing_ones_on_probabilities_and_8bit_maps() {
    for c in cases().iter().filter(|c| matches!(c.map, Map::F32(_))) {
        let Map::F32(p) = &c.map else { unreachable!() };
        let s = score(c, false);
        assert_eq!((s.dice, s.iou), dice_iou(p, &c.gt, 0.5), "{}", c.id);
        let m = probs_to_8bit(p);
        let s8 = score_8bit(&m, &c.gt, (c.h, c.w), &FieldOptions::default()).unwrap();
        assert_eq!((s8.dice, s8.iou), (s.dice, s.iou), "{}", c.id);
        assert!(s.hd95.is_none());
    }
}
