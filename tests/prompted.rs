//! Prompted fine-tuning: prompts sampled from the ground truth are deterministic per seed and
//! resumable with the loader; boxes contain their object; positives fall inside it, negatives
//! outside every object; a prompted GPS run trains on the one loop; the prompt-free config is
//! unchanged; the exported prompted graphs reproduce a prompted run's evaluation in ONNX
//! Runtime, and take prompts from a JSON or CSV file.
//!
//! The ONNX Runtime library is found in the runtime's search order and fetched once when
//! missing (as `gps-seg infer` does).

mod common;

use candle_core::Device;
use common::cli;
use gps_seg::data::augment::SegAugment;
use gps_seg::data::kvasir::KvasirDataset;
use gps_seg::data::loader::{Loader, LoaderConfig, PromptSampling, SegSource};
use gps_seg::data::prompts::{
    components, fixed_rng, read_prompt_file, sample, PromptKind, PromptSpec,
};
use gps_seg::data::resize::Resize;
use gps_seg::infer::{
    self, Engine, InferOptions, JobPrompts, OrtEngine, PromptedOrtEngine, RunFolder,
};
use gps_seg::progress::Recorder;
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

/// `count` synthetic pairs, seed 3, sides up to 200 px.
fn dataset(dir: &Path, count: usize) {
    common::synth_kvasir(dir, count, 3, 200);
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

/// This file's tiny run: SAM tiny at 64 px, 3 epochs, batches of 2 (3 in evaluation), two
/// selection batches.
fn tiny_cfg(data: &Path) -> SegTrainConfig {
    common::tiny_seg_cfg(
        data,
        common::TinySeg {
            image_size: 64,
            epochs: 3,
            batch_size: 2,
            eval_batch_size: 3,
            select_batches: 2,
        },
    )
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
    // GPS ranks a prompted task's entries with its prompted loss: the box-prompted selection is
    // not the prompt-free one (on the same data, seed and K).
    let free = seg::select(
        &tiny_cfg(&data),
        &tmp.path().join("sel-free"),
        &Device::Cpu,
        &mut Silent,
    )
    .unwrap();
    let mut boxed = tiny_cfg(&data);
    boxed.prompt = PromptSpec::of(PromptKind::Box);
    let prompted = seg::select(
        &boxed,
        &tmp.path().join("sel-box"),
        &Device::Cpu,
        &mut Silent,
    )
    .unwrap();
    assert_ne!(
        free.selection.indices, prompted.selection.indices,
        "the prompted selection used the prompt-free loss"
    );
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

/// A prompted GPS run (box, and the ambiguous single click) trains a few steps; its exported
/// prompted pair, given the prompts sampled from the masks with the run's seed, reproduces the
/// run's test mDice in ONNX Runtime within 1e-3 (per image within 5e-3 Dice). The same pair
/// takes prompts from a JSON and a CSV file; a prompt-free engine refuses prompts.
#[test]
fn exported_prompted_graphs_reproduce_the_run_in_onnx_runtime() {
    common::ort_ready();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data, 24);
    let click = PromptSpec {
        points: 1,
        neg_points: 0,
        ..PromptSpec::of(PromptKind::Points)
    };
    for (name, spec) in [("box", PromptSpec::of(PromptKind::Box)), ("click", click)] {
        // The shipped pretrained sam-tiny (prompted pretraining), so prompts mean something.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let base: SamConfig =
            gps_seg::util::fs::read_json(&root.join("sam/sam-tiny.json")).unwrap();
        let mut cfg = tiny_cfg(&data);
        cfg.sam = base.with_image_size(96);
        cfg.base = Some(root.join("sam/sam-tiny.safetensors"));
        cfg.epochs = 1;
        cfg.lr = 1e-4;
        cfg.test_limit = Some(5);
        cfg.test_fraction = 0.3;
        cfg.prompt = spec;
        let run = tmp.path().join(name);
        let summary = seg::train(&cfg, &run, &Device::Cpu, false, &mut Silent).unwrap();
        let folder = RunFolder::open(&run).unwrap();
        assert_eq!(folder.view.prompt, spec);
        let inputs = folder.test_inputs(None).unwrap();
        let mut rec = Recorder::default();
        let (enc, dec) = folder.ensure_prompted_onnx(&mut rec).unwrap();
        common::onnx_checker(&[&enc, &dec]);
        let engine = PromptedOrtEngine::load(&enc, &dec, 2, None, &mut rec).unwrap();
        assert_eq!(engine.input_size(), 96);
        let mut opts = InferOptions::new(tmp.path().join(format!("out-{name}")));
        opts.batch_size = 2; // batching differs from training's on purpose
        opts.resize = folder.view.resize;
        opts.threshold = folder.view.threshold;
        opts.prompts = Some(JobPrompts::FromMasks {
            spec,
            seed: folder.view.seed,
        });
        let (report, scores) = infer::infer(&engine, &inputs, &opts, &mut rec).unwrap();
        let m = report.metrics.clone().unwrap();
        eprintln!(
            "{name}: ORT mDice {:.6} mIoU {:.6}; training mDice {:.6} mIoU {:.6}",
            m.mdice, m.miou, summary.best.mdice, summary.best.miou
        );
        assert_eq!(m.images, summary.best.images);
        assert!(
            summary.best.mdice > 0.02 && summary.best.mdice < 0.98,
            "{name}: degenerate training mDice {}",
            summary.best.mdice
        );
        assert!(
            (m.mdice - summary.best.mdice).abs() < 1e-3,
            "{name}: ORT mDice {} vs training {}",
            m.mdice,
            summary.best.mdice
        );
        assert!((m.miou - summary.best.miou).abs() < 1e-3);
        let train_csv = std::fs::read_to_string(run.join("scores.csv")).unwrap();
        for (line, s) in train_csv.lines().skip(1).zip(&scores) {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f[0], s.id);
            let dice: f64 = f[1].parse().unwrap();
            assert!((dice - s.dice).abs() < 5e-3, "{name}: {line} vs {s:?}");
        }

        if name != "box" {
            continue;
        }
        // Prompts from a file: the components' boxes in original pixels, as JSON and CSV.
        let ds = KvasirDataset::open(&data).unwrap();
        let (mut json, mut csv) = (
            serde_json::Map::new(),
            String::from("id,kind,x0,y0,x1,y1\n"),
        );
        for it in &inputs.items {
            let e = ds.entries.iter().find(|e| e.id == it.id).unwrap();
            let m = image::open(&e.mask_path).unwrap().to_luma8();
            let (w, h) = (m.width() as usize, m.height() as usize);
            let bin: Vec<u8> = m.as_raw().iter().map(|&v| u8::from(v >= 128)).collect();
            // Components need a square frame: pad to the larger side.
            let side = w.max(h);
            let mut sq = vec![0u8; side * side];
            for y in 0..h {
                sq[y * side..y * side + w].copy_from_slice(&bin[y * w..(y + 1) * w]);
            }
            let boxes: Vec<serde_json::Value> = components(&sq, side)
                .unwrap()
                .iter()
                .filter(|c| c.pixels.len() >= 50)
                .map(|c| {
                    let [x0, y0, x1, y1] = c.bbox;
                    csv.push_str(&format!("{},box,{x0},{y0},{x1},{y1}\n", it.id));
                    serde_json::json!({ "box": [x0, y0, x1, y1] })
                })
                .collect();
            json.insert(it.id.clone(), serde_json::Value::Array(boxes));
        }
        let jp = tmp.path().join("prompts.json");
        std::fs::write(&jp, serde_json::to_string(&json).unwrap()).unwrap();
        let cp = tmp.path().join("prompts.csv");
        std::fs::write(&cp, &csv).unwrap();
        let from_json = read_prompt_file(&jp).unwrap();
        assert_eq!(
            from_json,
            read_prompt_file(&cp).unwrap(),
            "JSON and CSV agree"
        );
        let mut o = InferOptions::new(tmp.path().join("out-file"));
        o.resize = folder.view.resize;
        o.prompts = Some(JobPrompts::File(from_json));
        let (r, _) = infer::infer(&engine, &inputs, &o, &mut rec).unwrap();
        let fm = r.metrics.unwrap();
        eprintln!("box prompts from a file: mDice {:.4}", fm.mdice);
        assert!(fm.mdice > 0.02, "file prompts segment: {}", fm.mdice);

        // A prompt-free model refuses prompts; the prompted pair refuses a job without them.
        let pf = folder.ensure_onnx(&mut rec).unwrap();
        let pf = OrtEngine::load(&pf, 1, None, &mut rec).unwrap();
        let e = infer::infer(&pf, &inputs, &o, &mut rec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prompted graphs"), "{e}");
        let mut none = InferOptions::new(tmp.path().join("out-none"));
        none.resize = folder.view.resize;
        let e = infer::infer(&engine, &inputs, &none, &mut rec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--prompt-from-masks"), "{e}");
    }
}

#[test]
fn bad_prompt_files_are_refused_naming_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text, want) in [
        ("a.json", r#"{"img1": [{"box": [5, 5, 2, 9]}]}"#, "img1"),
        (
            "b.json",
            r#"{"img2": [{"points": [[1, 2]], "labels": [1, 0]}]}"#,
            "2 labels",
        ),
        (
            "c.json",
            r#"{"img3": [{"points": [[1, 2]], "labels": [7]}]}"#,
            "label 7",
        ),
        ("d.json", r#"{"img4": [{}]}"#, "neither"),
        ("e.json", "[1, 2]", "not a prompt JSON"),
        ("f.csv", "id,kind,x0,y0,x1,y1\nimg5,box,1,2,3\n", "line 2"),
        ("g.csv", "img6,circle,1,2\n", "circle"),
        ("h.csv", "img7,pos,1,abc\n", "abc"),
        ("i.json", r#"{"img8": [{"box": [-1, 0, 3, 3]}]}"#, "-1"),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let e = read_prompt_file(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
}

/// Prompt flags are checked before any work: point settings without point prompts, a jitter
/// without boxes, prompts for the classification task, block checkpointing with prompts, and
/// prompts for the Candle engine are each refused in one line naming the flag.
#[test]
fn cli_refuses_prompt_flags_that_do_not_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data, 6);
    let d = data.to_str().unwrap();
    let o = tmp.path().join("out");
    let o = o.to_str().unwrap();
    let base = [
        "train",
        "--data-dir",
        d,
        "--out",
        o,
        "--device",
        "cpu",
        "--quiet",
    ];
    for (extra, want) in [
        (&["--points", "2"][..], "--points"),
        (
            &["--prompt", "box", "--neg-points", "2"][..],
            "--neg-points",
        ),
        (
            &["--prompt", "points", "--prompt-jitter", "5"][..],
            "--prompt-jitter",
        ),
        (&["--prompt", "points", "--points", "0"][..], "points"),
        (
            &["--prompt", "box", "--checkpoint-blocks"][..],
            "checkpoint_blocks",
        ),
        (&["--task", "classify", "--prompt", "box"][..], "--prompt"),
    ] {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let (code, err) = cli(&a);
        assert_eq!(code, Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    assert!(
        !Path::new(o).join("config.json").exists(),
        "nothing was trained"
    );
    let (code, err) = cli(&[
        "infer",
        "--images",
        &format!("{d}/images"),
        "--masks",
        &format!("{d}/masks"),
        "--out",
        o,
        "--engine",
        "candle",
        "--prompt-from-masks",
        "--prompt",
        "box",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--engine ort"), "{err}");
}

struct KillAt(String);

impl gps_seg::train::observer::Observer for KillAt {
    fn event(&mut self, e: gps_seg::train::observer::Event) {
        if let gps_seg::train::observer::Event::PhaseStart { name, .. } = &e {
            if *name == self.0 {
                panic!("simulated kill at {name}");
            }
        }
    }
}

/// A prompted (box+points, flips on) run killed before its last epoch resumes to the same
/// metrics and bit-identical merged weights: the training prompts are redrawn exactly.
#[test]
fn a_killed_prompted_run_resumes_to_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("kvasir");
    dataset(&data, 24);
    let mut cfg = tiny_cfg(&data);
    cfg.hflip = 0.5;
    cfg.prompt = box_points_spec();
    let a = tmp.path().join("a");
    seg::train(&cfg, &a, &Device::Cpu, false, &mut Silent).unwrap();
    let b = tmp.path().join("b");
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = seg::train(
            &cfg,
            &b,
            &Device::Cpu,
            false,
            &mut KillAt("epoch 3/3".into()),
        );
    }));
    assert!(killed.is_err(), "the run should have been killed");
    seg::train(&cfg, &b, &Device::Cpu, true, &mut Silent).unwrap();
    let strip = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("seconds");
                o.remove("images_per_s");
                v
            })
            .collect()
    };
    assert_eq!(strip(&a), strip(&b));
    let wa = std::fs::read(a.join("merged.safetensors")).unwrap();
    let wb = std::fs::read(b.join("merged.safetensors")).unwrap();
    assert!(wa == wb, "merged weights differ after resume");
}

/// A prompted stand-in engine: logits 1 where a prompt's box covers the pixel, −1 elsewhere
/// (the job's checks and writing, without a model).
struct BoxEngine(usize);

impl Engine for BoxEngine {
    fn name(&self) -> &'static str {
        "box-engine"
    }
    fn input_size(&self) -> usize {
        self.0
    }
    fn describe(&self) -> String {
        "test engine".into()
    }
    fn takes_prompts(&self) -> bool {
        true
    }
    fn logits(&self, _: &[f32], _: usize) -> gps_seg::Result<infer::Logits> {
        Err(gps_seg::Error::msg("prompted only"))
    }
    fn logits_prompted(
        &self,
        _: &[f32],
        n: usize,
        prompts: &[&[gps_seg::data::prompts::ObjectPrompt]],
    ) -> gps_seg::Result<infer::Logits> {
        let s = self.0;
        let mut data = vec![-1.0f32; n * s * s];
        for (i, objs) in prompts.iter().enumerate() {
            for o in objs.iter() {
                let [x0, y0, x1, y1] = o.bbox.unwrap_or([0.0; 4]);
                for y in 0..s {
                    for x in 0..s {
                        let (fx, fy) = (x as f32, y as f32);
                        if fx >= x0 && fx <= x1 && fy >= y0 && fy <= y1 {
                            data[i * s * s + y * s + x] = 1.0;
                        }
                    }
                }
            }
        }
        Ok(infer::Logits { n, size: s, data })
    }
}

/// `infer` with a prompt file (#27 case 9): a box or point outside its image is refused as
/// `serve` answers 400 for it (no clamping; the image's edge itself is inside), an id that
/// matches no image is refused naming it, a JSON file with an image id twice is refused, and
/// a CSV with a byte-order mark and quoted fields reads as the plain one. Nothing is written
/// for a refused job.
#[test]
fn prompt_files_are_checked_against_the_images_as_serve_checks_them() {
    use gps_seg::data::imgio;
    let tmp = tempfile::tempdir().unwrap();
    let (img, msk) = (tmp.path().join("images"), tmp.path().join("masks"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&msk).unwrap();
    // Two 40×20 (w×h) images.
    for id in ["a", "b"] {
        imgio::write_png(
            &img.join(format!("{id}.png")),
            &image::RgbImage::new(40, 20),
        )
        .unwrap();
        imgio::write_png(
            &msk.join(format!("{id}.png")),
            &image::GrayImage::new(40, 20),
        )
        .unwrap();
    }
    let (c, bad) = gps_seg::infer::input::from_folders(&img, Some(&msk)).unwrap();
    let inputs = gps_seg::infer::input::check(c, bad);
    let run = |name: &str, text: &str| -> Result<(), String> {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let file = read_prompt_file(&p).map_err(|e| e.to_string())?;
        let out = tmp.path().join(format!("out-{name}"));
        let mut o = InferOptions::new(out.clone());
        o.prompts = Some(JobPrompts::File(file));
        let r = infer::infer(&BoxEngine(16), &inputs, &o, &mut Silent)
            .map(|_| ())
            .map_err(|e| e.to_string());
        if r.is_err() {
            assert!(!out.exists(), "{name}: wrote outputs for a refused job");
        }
        r
    };
    // The image's edge is inside (as serve's rule: 0 ≤ x ≤ w, 0 ≤ y ≤ h).
    run(
        "edge.json",
        r#"{"a": [{"box": [0, 0, 40, 20]}], "b": [{"points": [[40, 20]], "labels": [1]}]}"#,
    )
    .unwrap();
    for (name, text, want) in [
        (
            "box-out.json",
            r#"{"a": [{"box": [0, 0, 41, 20]}], "b": [{"box": [1, 1, 2, 2]}]}"#,
            "box (0, 0, 41, 20) is outside the 40×20 image",
        ),
        (
            "point-out.json",
            r#"{"a": [{"box": [1, 1, 2, 2]}], "b": [{"points": [[3, 20.5]], "labels": [0]}]}"#,
            "point (3, 20.5) is outside the 40×20 image",
        ),
        (
            "unknown.json",
            r#"{"a": [{"box": [1, 1, 2, 2]}], "b": [{"box": [1, 1, 2, 2]}], "nope": [{"box": [1, 1, 2, 2]}]}"#,
            "`nope`",
        ),
        (
            "twice.json",
            r#"{"a": [{"box": [1, 1, 2, 2]}], "b": [{"box": [1, 1, 2, 2]}], "a": [{"box": [5, 5, 9, 9]}]}"#,
            "image `a` is given twice",
        ),
        (
            "out.csv",
            "id,kind,x0,y0,x1,y1\na,box,1,1,2,2\nb,pos,40.5,3\n",
            "point (40.5, 3) is outside",
        ),
    ] {
        let e = run(name, text).unwrap_err();
        assert!(e.contains(want), "{name}: {e}");
    }
    // A spreadsheet's CSV: byte-order mark, quoted header and ids (one with a comma).
    let plain = "id,kind,x0,y0,x1,y1\na,box,1,2,30,15\nb,pos,4,5\nb,neg,6,7\n";
    let quoted = "\u{feff}\"id\",\"kind\",\"x0\",\"y0\",\"x1\",\"y1\"\r\n\"a\",\"box\",1,2,30,15\r\n\"b\", pos ,\"4\",5\r\n\"b\",\"neg\",6,7\r\n\"c,d\",\"box\",1,1,2,2\r\n";
    let (pp, qp) = (tmp.path().join("plain.csv"), tmp.path().join("quoted.csv"));
    std::fs::write(&pp, plain).unwrap();
    std::fs::write(&qp, quoted).unwrap();
    let (p, mut q) = (
        read_prompt_file(&pp).unwrap(),
        read_prompt_file(&qp).unwrap(),
    );
    assert!(q.remove("c,d").is_some(), "{q:?}");
    assert_eq!(p, q);
    // A JSON file with a byte-order mark reads too.
    let jp = tmp.path().join("bom.json");
    std::fs::write(&jp, "\u{feff}{\"a\": [{\"box\": [1, 2, 30, 15]}]}").unwrap();
    assert_eq!(read_prompt_file(&jp).unwrap()["a"], p["a"]);
    // The accepted file's masks were written.
    assert!(tmp.path().join("out-edge.json/masks/a.png").is_file());
}
