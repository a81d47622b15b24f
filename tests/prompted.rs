//! Prompted fine-tuning: prompts sampled from the ground truth are deterministic per seed and
//! resumable with the loader; boxes contain their object; positives fall inside it, negatives
//! outside every object; a prompted GPS run trains on the one loop; the prompt-free config is
//! unchanged.

use candle_core::Device;
use gps_seg::data::augment::SegAugment;
use gps_seg::data::kvasir::KvasirDataset;
use gps_seg::data::loader::{Loader, LoaderConfig, PromptSampling, SegSource};
use gps_seg::data::prompts::{components, fixed_rng, sample, PromptKind, PromptSpec};
use gps_seg::data::resize::Resize;
use gps_seg::data::synth_kvasir::{generate, SynthKvasirConfig};
use gps_seg::sam::SamConfig;
use gps_seg::train::observer::Silent;
use gps_seg::train::seg::{self, SegTrainConfig};
use gps_seg::util::Rng;
use std::path::Path;

/// A seeded `s × s` mask with a few random ellipses (some touching, some apart).
fn random_mask(seed: u64, s: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut m = vec![0u8; s * s];
    for _ in 0..1 + r.below(4) {
        let (cx, cy) = (r.uniform(0.0, s as f32), r.uniform(0.0, s as f32));
        let (ax, ay) = (
            r.uniform(1.0, s as f32 / 5.0),
            r.uniform(1.0, s as f32 / 5.0),
        );
        for y in 0..s {
            for x in 0..s {
                let (dx, dy) = ((x as f32 - cx) / ax, (y as f32 - cy) / ay);
                if dx * dx + dy * dy <= 1.0 {
                    m[y * s + x] = 1;
                }
            }
        }
    }
    m
}

fn box_points_spec() -> PromptSpec {
    PromptSpec {
        points: 3,
        neg_points: 2,
        ..PromptSpec::of(PromptKind::BoxPoints)
    }
}

#[test]
fn sampled_prompts_are_deterministic_and_sit_where_they_should() {
    let s = 96;
    let spec = box_points_spec();
    let (mut objects, mut negatives) = (0, 0);
    for seed in 0..40u64 {
        let m = random_mask(seed, s);
        let a = sample(&m, s, &spec, &mut fixed_rng(7, &format!("img{seed}"))).unwrap();
        let b = sample(&m, s, &spec, &mut fixed_rng(7, &format!("img{seed}"))).unwrap();
        assert_eq!(a, b, "same seed and id, same prompts");
        let c = sample(&m, s, &spec, &mut fixed_rng(8, &format!("img{seed}"))).unwrap();
        if !a.is_empty() {
            assert_ne!(a, c, "another seed draws other prompts (mask {seed})");
        }
        let comps = components(&m, s).unwrap();
        let floor = spec.min_area_px(s);
        let kept = comps.iter().filter(|c| c.pixels.len() >= floor).count();
        assert_eq!(a.len(), kept.max(usize::from(!comps.is_empty())));
        for o in &a {
            objects += 1;
            // The box contains its object, and the jitter stays within the scaled bound.
            let bb = o.bbox.unwrap();
            let c = comps.iter().find(|c| c.pixels == o.pixels).unwrap();
            let [x0, y0, x1, y1] = c.bbox.map(|v| v as f32);
            assert!(
                bb[0] <= x0 && bb[1] <= y0 && bb[2] >= x1 && bb[3] >= y1,
                "{bb:?}"
            );
            let j = spec.jitter_px(s);
            assert!(x0 - bb[0] <= j && bb[2] - x1 <= j && y0 - bb[1] <= j && bb[3] - y1 <= j);
            assert!(bb.iter().all(|&v| (0.0..=(s - 1) as f32).contains(&v)));
            assert_eq!(o.points.len(), 5);
            for (p, &l) in o.points.iter().zip(&o.labels) {
                let i = p[1] as usize * s + p[0] as usize;
                if l == 1.0 {
                    assert!(o.pixels.contains(&(i as u32)), "positive {p:?} inside");
                } else if l == 0.0 {
                    negatives += 1;
                    assert_eq!(m[i], 0, "negative {p:?} outside every object");
                    let (px, py) = (p[0], p[1]);
                    let band = spec.band_px(s) as f32;
                    assert!(
                        px >= x0 - band && px <= x1 + band && py >= y0 - band && py <= y1 + band,
                        "negative {p:?} in the band around {:?}",
                        c.bbox
                    );
                } else {
                    assert_eq!(l, -1.0);
                }
            }
        }
    }
    assert!(
        objects > 40 && negatives > 40,
        "{objects} objects, {negatives} negatives"
    );
}

#[test]
fn box_jitter_scales_with_the_input_size() {
    let spec = PromptSpec::of(PromptKind::Box);
    assert_eq!(spec.jitter_px(1024), 20.0);
    assert_eq!(spec.jitter_px(256), 5.0);
    // A single-point prompt is the ambiguous one (multimask); anything more is not.
    let one = PromptSpec {
        points: 1,
        neg_points: 0,
        ..PromptSpec::of(PromptKind::Points)
    };
    assert!(one.multimask());
    assert!(!PromptSpec::of(PromptKind::Points).multimask());
    assert!(!spec.multimask());
}

fn dataset(dir: &Path, count: usize) {
    let cfg = SynthKvasirConfig {
        count,
        seed: 3,
        max_side: 200,
        jpeg_quality: 90,
    };
    generate(dir, &cfg).unwrap();
}

/// Training prompts change per epoch and resume with the loader's state; evaluation
/// prompts (a fixed seed) are the same every epoch.
#[test]
fn loader_prompts_resume_and_evaluation_prompts_stay_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), 8);
    let ds = KvasirDataset::open(tmp.path()).unwrap();
    let src = |fixed: Option<u64>| SegSource {
        dataset: ds.clone(),
        size: 64,
        resize: Resize::Squash,
        augment: SegAugment { hflip: 0.5 },
        prompts: Some(PromptSampling {
            spec: box_points_spec(),
            fixed_seed: fixed,
        }),
    };
    let dev = Device::Cpu;
    let prompts = |l: &mut Loader<SegSource>| {
        let mut v = Vec::new();
        while let Some(b) = l.next_batch(&dev).unwrap() {
            v.push((b.ids.clone(), b.prompts.clone()));
            if l.state().position == 0 || v.len() == 4 {
                break;
            }
        }
        v
    };
    let mut l = Loader::all(src(None), LoaderConfig::train(2, 11)).unwrap();
    let first = prompts(&mut l);
    let st = l.state();
    let e1 = prompts(&mut l);
    let mut r = Loader::all(src(None), LoaderConfig::train(2, 11)).unwrap();
    r.restore(st).unwrap();
    assert_eq!(prompts(&mut r), e1, "resumed loader draws the same prompts");
    assert_ne!(first, e1, "training prompts are redrawn every epoch");
    assert!(first.iter().all(|(_, p)| p.iter().all(|ps| !ps.is_empty())));

    let mut ev = Loader::all(src(Some(5)), LoaderConfig::eval(3)).unwrap();
    let a = prompts(&mut ev);
    ev.next_epoch();
    let b = prompts(&mut ev);
    assert_eq!(a, b, "evaluation prompts are fixed per image");
}

fn tiny_cfg(data: &Path) -> SegTrainConfig {
    let sam = SamConfig::tiny().with_image_size(64);
    let mut c = SegTrainConfig::recipe(data.to_path_buf(), None, sam);
    c.epochs = 3;
    c.batch_size = 2;
    c.eval_batch_size = 3;
    c.train_limit = Some(4);
    c.test_limit = Some(4);
    c.select_batches = Some(2);
    c.hflip = 0.0;
    c.lr = 1e-3;
    c.max_steps_per_epoch = Some(2);
    c
}

fn step_losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["train_loss"].as_f64().unwrap()
        })
        .collect()
}

/// A prompted GPS run (box, points, and the ambiguous single click) trains on the one loop:
/// its selection loss is recorded as prompted, its loss falls, it writes the usual folder and
/// its config carries the prompt; the prompt-free config has no `prompt` field at all.
#[test]
fn prompted_gps_runs_train_on_the_one_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data, 24);
    let single = PromptSpec {
        points: 1,
        neg_points: 0,
        ..PromptSpec::of(PromptKind::Points)
    };
    for (name, spec) in [
        ("box", PromptSpec::of(PromptKind::Box)),
        ("points", PromptSpec::of(PromptKind::Points)),
        ("click", single),
    ] {
        let mut cfg = tiny_cfg(&data);
        cfg.prompt = spec;
        let run = tmp.path().join(name);
        let s = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
        assert!(s.best.mdice.is_finite() && s.best.images > 0, "{name}");
        let losses = step_losses(&run);
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        assert!(
            losses.last() < losses.first(),
            "{name}: loss does not fall: {losses:?}"
        );
        let gps: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("gps/gps_config.json")).unwrap(),
        )
        .unwrap();
        assert!(gps.to_string().contains("prompted"), "{name}: {gps}");
        let back: SegTrainConfig = gps_seg::util::fs::read_json(&run.join("config.json")).unwrap();
        assert_eq!(back.prompt, spec);
    }
    let cfg = tiny_cfg(&data);
    let text = serde_json::to_string(&cfg).unwrap();
    assert!(
        !text.contains("\"prompt\":"),
        "prompt-free config unchanged: {text}"
    );
    let mut bad = tiny_cfg(&data);
    bad.prompt = PromptSpec::of(PromptKind::Box);
    bad.checkpoint_blocks = true;
    let e = seg::train(
        &bad,
        &tmp.path().join("bad"),
        &Device::Cpu,
        false,
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("checkpoint_blocks"), "{e}");
}
