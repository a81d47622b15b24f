//! Integrity where files meet (issue #27, cases 1–6): no write follows a symbolic link into an
//! input or replaces a file the command did not create (unless --overwrite), the files a command
//! reads implicitly are inputs too, a shared base is never replaced, a task file beside the
//! wrong or damaged base is refused when loaded, and concurrent exporters of one base or one
//! `--out` never leave a wrong base or a mixed model/data pair.

mod common;

use common::{bin, gps_seg, ort_ready, snapshot};
use gps_seg::onnx::sam::random_sam_weights;
use gps_seg::sam::SamConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

fn ok(args: &[&str], cwd: &Path) -> String {
    let (c, t) = gps_seg(args, cwd);
    assert_eq!(c, 0, "{args:?}: {t}");
    t
}

fn refused(args: &[&str], cwd: &Path, needle: &str) -> String {
    let (c, t) = gps_seg(args, cwd);
    assert_eq!(c, 1, "{args:?} should fail: {t}");
    assert!(t.contains(needle), "{args:?}: expected `{needle}` in: {t}");
    t
}

/// A small synthetic Kvasir-shaped set at `dir/data`.
fn data(dir: &Path) {
    ok(
        &[
            "data",
            "synth-kvasir",
            "--out",
            "data",
            "--count",
            "8",
            "--seed",
            "4",
            "--max-side",
            "80",
        ],
        dir,
    );
}

/// A GPS run (tiny SAM at 64 px, 2 steps) on `base` (a preset or a checkpoint path).
fn train(dir: &Path, base: &str, out: &str, seed: &str) {
    ok(
        &[
            "train",
            "--model",
            base,
            "--image-size",
            "64",
            "--data-dir",
            "data",
            "--out",
            out,
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--select-batches",
            "1",
            "--seed",
            seed,
            "--quiet",
        ],
        dir,
    );
}

/// A second tiny SAM checkpoint (other weights, so another content hash) with its config.
fn other_checkpoint(dir: &Path) -> PathBuf {
    let cfg = SamConfig::tiny();
    let w = random_sam_weights(&cfg, 77).unwrap();
    let p = dir.join("other.safetensors");
    gps_seg::util::tensors::save_safetensors(&p, &w, None).unwrap();
    std::fs::write(dir.join("other.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    p
}

fn mdice(text: &str) -> f64 {
    let i = text.find("mDice ").expect("no mDice in output");
    text[i + 6..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Cases 1–4: links into inputs, files of earlier jobs, a run's own files, the config beside a
/// checkpoint, a shared base.
#[test]
fn writes_never_land_on_inputs_or_replace_what_they_did_not_write() {
    ort_ready();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d);
    train(d, "tiny", "run", "1");
    ok(&["export", "--model", "run", "--out", "m.onnx"], d);
    let gt = snapshot(&d.join("data/masks"));

    // 1. `O/masks` is a link to the ground truth: refused, the ground truth unchanged.
    std::fs::create_dir(d.join("O")).unwrap();
    std::os::unix::fs::symlink(d.join("data/masks"), d.join("O/masks")).unwrap();
    let infer = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "infer",
            "--model",
            "m.onnx",
            "--images",
            "data/images",
            "--masks",
            "data/masks",
            "--out",
            out,
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let args = infer("O", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = refused(&args, d, "refusing to write");
    assert!(t.contains("symbolic"), "{t}");
    // --overwrite does not make a link into an input writable.
    let args = infer("O", &["--overwrite"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, d, "refusing to write");
    assert_eq!(
        snapshot(&d.join("data/masks")),
        gt,
        "the ground truth changed"
    );
    // One linked file inside a real folder: the same.
    std::fs::create_dir_all(d.join("O2/masks")).unwrap();
    let first = std::fs::read_dir(d.join("data/masks"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    // The mask infer writes for that image is `<id>.png`.
    let id = Path::new(&first)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::os::unix::fs::symlink(
        d.join("data/masks").join(&first),
        d.join("O2/masks").join(format!("{id}.png")),
    )
    .unwrap();
    let args = infer("O2", &["--overwrite"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, d, "refusing to write");
    assert_eq!(
        snapshot(&d.join("data/masks")),
        gt,
        "the ground truth changed"
    );

    // A file of an earlier job is replaced only with --overwrite.
    let args = infer("P", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first_run = mdice(&ok(&args, d));
    let t = refused(&args, d, "refusing to replace");
    assert!(t.contains("--overwrite"), "{t}");
    let args = infer("P", &["--overwrite"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(mdice(&ok(&args, d)), first_run);

    // 2. A run folder's own files are inputs of an export from it, --overwrite or not.
    let run_files = snapshot(&d.join("run"));
    for target in [
        "run/gps/delta.safetensors",
        "run/best/params.safetensors",
        "run/summary.json",
    ] {
        refused(
            &["export", "--model", "run", "--out", target, "--overwrite"],
            d,
            "refusing to write",
        );
    }
    assert_eq!(snapshot(&d.join("run")), run_files, "a run file changed");
    // ... while the run's own export target stays a fine output.
    ok(&["export", "--model", "run", "--out", "run/model.onnx"], d);

    // 3. The config beside a checkpoint is an input (export, --prompted, merge).
    std::fs::copy(d.join("run/merged.safetensors"), d.join("b.safetensors")).unwrap();
    std::fs::copy(d.join("run/sam_config.json"), d.join("b.json"))
        .or_else(|_| {
            std::fs::write(
                d.join("b.json"),
                serde_json::to_string(&SamConfig::tiny().with_image_size(64)).unwrap(),
            )
            .map(|_| 0)
        })
        .unwrap();
    let cfg_before = std::fs::read(d.join("b.json")).unwrap();
    for extra in [&[][..], &["--prompted"][..]] {
        let mut a = vec![
            "export",
            "--model",
            "b.safetensors",
            "--out",
            "b.json",
            "--overwrite",
        ];
        a.extend_from_slice(extra);
        refused(&a, d, "refusing to write");
    }
    refused(
        &[
            "merge",
            "--base",
            "b.safetensors",
            "--delta",
            "run/gps",
            "--out",
            "b.json",
            "--overwrite",
        ],
        d,
        "refusing to write",
    );
    assert_eq!(std::fs::read(d.join("b.json")).unwrap(), cfg_before);

    // 4. A shared base is never replaced by a plain export; its tasks keep working.
    std::fs::create_dir(d.join("models")).unwrap();
    ok(
        &[
            "export",
            "--model",
            "run",
            "--base-onnx",
            "models/base.onnx",
            "--out",
            "models/a.onnx",
        ],
        d,
    );
    let base_files = snapshot(&d.join("models"));
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut a = vec![
            "export",
            "--model",
            "run",
            "--external-data",
            "--out",
            "models/base.onnx",
        ];
        a.extend_from_slice(extra);
        refused(&a, d, "models/base.onnx");
    }
    // Another task's file is replaced only with --overwrite.
    refused(
        &[
            "export",
            "--model",
            "run",
            "--base-onnx",
            "models/base.onnx",
            "--out",
            "models/a.onnx",
        ],
        d,
        "refusing to replace",
    );
    assert_eq!(snapshot(&d.join("models")), base_files);
    let t = ok(
        &[
            "infer",
            "--model",
            "models/a.onnx",
            "--images",
            "data/images",
            "--masks",
            "data/masks",
            "--out",
            "Q",
            "--quiet",
        ],
        d,
    );
    assert_eq!(
        mdice(&t),
        first_run,
        "the task on its base ≠ the merged model"
    );
}

/// Case 5: a task file is checked against the base beside it when loaded: another
/// checkpoint's base, a zeroed block of the base's data, a truncated or missing data file are
/// refused naming the file (infer, and export --base-onnx reusing the base).
#[test]
fn a_task_on_the_wrong_or_damaged_base_is_refused() {
    ort_ready();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d);
    let other = other_checkpoint(d);
    train(d, "tiny", "run", "1");
    train(d, other.to_str().unwrap(), "run2", "1");
    for (dir, run) in [("m1", "run"), ("m2", "run2")] {
        std::fs::create_dir(d.join(dir)).unwrap();
        ok(
            &[
                "export",
                "--model",
                run,
                "--base-onnx",
                &format!("{dir}/base.onnx"),
                "--out",
                &format!("{dir}/t.onnx"),
            ],
            d,
        );
    }
    let infer = |model: &str, out: &str| {
        gps_seg(
            &[
                "infer",
                "--model",
                model,
                "--images",
                "data/images",
                "--masks",
                "data/masks",
                "--out",
                out,
                "--quiet",
            ],
            d,
        )
    };
    let (c, t) = infer("m1/t.onnx", "o1");
    assert_eq!(c, 0, "{t}");
    // The task of run 1 beside run 2's base.
    std::fs::copy(d.join("m1/t.onnx"), d.join("m2/foreign.onnx")).unwrap();
    let (c, t) = infer("m2/foreign.onnx", "o2");
    assert_eq!(c, 1, "{t}");
    assert!(
        t.contains("content hash") && t.contains("m2/base.onnx"),
        "{t}"
    );
    assert!(!d.join("o2/masks").exists() || snapshot(&d.join("o2")).is_empty());

    // A zeroed 400 KB block inside the base's data.
    let data_file = d.join("m1/base.onnx.data");
    let pristine = std::fs::read(&data_file).unwrap();
    let mut bytes = pristine.clone();
    let mid = bytes.len() / 2;
    let end = (mid + 400_000).min(bytes.len());
    bytes[mid..end].iter_mut().for_each(|b| *b = 0);
    std::fs::remove_file(&data_file).unwrap();
    std::fs::write(&data_file, &bytes).unwrap();
    let (c, t) = infer("m1/t.onnx", "o3");
    assert_eq!(c, 1, "{t}");
    assert!(t.contains("SHA-256") && t.contains("base.onnx.data"), "{t}");
    // export --base-onnx does not "reuse" a damaged, truncated or missing base.
    let export = |out: &str| {
        gps_seg(
            &[
                "export",
                "--model",
                "run",
                "--base-onnx",
                "m1/base.onnx",
                "--out",
                out,
            ],
            d,
        )
    };
    let (c, t) = export("m1/t2.onnx");
    assert_eq!(c, 1, "{t}");
    assert!(t.contains("SHA-256"), "{t}");
    std::fs::remove_file(&data_file).unwrap();
    std::fs::write(&data_file, &pristine[..pristine.len() / 3]).unwrap();
    let (c, t) = export("m1/t3.onnx");
    assert_eq!(c, 1, "{t}");
    assert!(t.contains("truncated"), "{t}");
    std::fs::remove_file(&data_file).unwrap();
    let (c, t) = export("m1/t4.onnx");
    assert_eq!(c, 1, "{t}");
    assert!(t.contains("missing"), "{t}");
    for f in ["m1/t2.onnx", "m1/t3.onnx", "m1/t4.onnx"] {
        assert!(!d.join(f).exists(), "{f} was written on a bad base");
    }
    // Restored: the task runs again.
    std::fs::write(&data_file, &pristine).unwrap();
    let (c, t) = infer("m1/t.onnx", "o4");
    assert_eq!(c, 0, "{t}");
}

/// Case 6: two exporters racing for one new base from different checkpoints never leave a
/// wrong base (the loser fails naming the content hash); two for one base from one checkpoint
/// both succeed; two for one `--out` (with --overwrite) never leave a mixed pair.
#[test]
fn concurrent_exporters_are_serialised() {
    ort_ready();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d);
    let other = other_checkpoint(d);
    train(d, "tiny", "run", "1");
    train(d, "tiny", "run1b", "2");
    train(d, other.to_str().unwrap(), "run2", "1");
    let bin = bin();
    let spawn = |args: Vec<String>| {
        Command::new(&bin)
            .args(&args)
            .current_dir(d)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let text = |o: std::process::Output| -> (bool, String) {
        let t = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!t.contains("panicked"), "{t}");
        (o.status.success(), t)
    };
    let task = |run: &str, dir: &str, out: &str| -> Vec<String> {
        [
            "export",
            "--model",
            run,
            "--base-onnx",
            &format!("{dir}/base.onnx"),
            "--out",
            &format!("{dir}/{out}.onnx"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let rounds = 50;
    for i in 0..rounds {
        // Different checkpoints, one new base.
        let dir = format!("x{i}");
        std::fs::create_dir(d.join(&dir)).unwrap();
        let (a, b) = (
            spawn(task("run", &dir, "a")),
            spawn(task("run2", &dir, "b")),
        );
        let (ra, rb) = (
            text(a.wait_with_output().unwrap()),
            text(b.wait_with_output().unwrap()),
        );
        assert!(ra.0 ^ rb.0, "exactly one may win: {ra:?} {rb:?}");
        let (winner, loser) = if ra.0 { ("a", &rb.1) } else { ("b", &ra.1) };
        assert!(loser.contains("content hash"), "round {i}: {loser}");
        let meta = gps_seg::onnx::integrity::verify_model_file(
            &d.join(&dir).join(format!("{winner}.onnx")),
        );
        assert!(
            meta.is_ok(),
            "round {i}: the winner's task does not verify: {meta:?}"
        );
        assert!(!d
            .join(&dir)
            .join(format!("{}.onnx", if winner == "a" { "b" } else { "a" }))
            .exists());
        std::fs::remove_dir_all(d.join(&dir)).unwrap();

        // One checkpoint, one new base: both succeed.
        let dir = format!("y{i}");
        std::fs::create_dir(d.join(&dir)).unwrap();
        let (a, b) = (
            spawn(task("run", &dir, "a")),
            spawn(task("run1b", &dir, "b")),
        );
        let (ra, rb) = (
            text(a.wait_with_output().unwrap()),
            text(b.wait_with_output().unwrap()),
        );
        assert!(ra.0 && rb.0, "round {i}: {ra:?} {rb:?}");
        for t in ["a", "b"] {
            gps_seg::onnx::integrity::verify_model_file(&d.join(&dir).join(format!("{t}.onnx")))
                .unwrap();
        }
        std::fs::remove_dir_all(d.join(&dir)).unwrap();

        // One --out, replaced by both in turn: the pair on disk is always one export's.
        let out = "z/m.onnx".to_string();
        let plain = |run: &str| -> Vec<String> {
            [
                "export",
                "--model",
                run,
                "--external-data",
                "--overwrite",
                "--out",
                &out,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let (a, b) = (spawn(plain("run")), spawn(plain("run2")));
        let (ra, rb) = (
            text(a.wait_with_output().unwrap()),
            text(b.wait_with_output().unwrap()),
        );
        assert!(ra.0 && rb.0, "round {i}: {ra:?} {rb:?}");
        gps_seg::onnx::integrity::verify_model_file(&d.join(&out))
            .unwrap_or_else(|e| panic!("round {i}: mixed pair: {e}"));
    }
}
