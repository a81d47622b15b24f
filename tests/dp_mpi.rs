//! `train --distributed mpi` under Open MPI's `mpirun` (feature `mpi`; `scripts/check-mpi.sh`
//! builds and runs this file): 2 ranks against one process with the same global batch, seed
//! and data, for GPS and `full`; a rank killed mid-run ends the others with a non-zero exit
//! within 60 s and `--resume` finishes with the metrics of an uninterrupted run; a process
//! started by `mpirun` without `--distributed` refuses to start; `select --data-dir` over 2
//! ranks selects what one process does.
#![cfg(feature = "mpi")]

mod common;

use candle_core::Device;
use gps_seg::util::tensors::{self, TensorMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gps-seg");

/// `mpirun -np <n>` (allowed as root, more ranks than cores; one kernel thread per rank),
/// tagging the ranks' environment with `tag` so that a test can find them in /proc.
fn mpirun(n: usize, tag: &str) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &n.to_string(),
    ])
    .args([
        "-x",
        "RAYON_NUM_THREADS=1",
        "-x",
        &format!("GPS_SEG_TEST_TAG={tag}"),
    ])
    .arg(BIN);
    c
}

/// The training flags of every run here: SAM tiny (the shipped weights) at 96 px, 10
/// training images in global batches of 4, 5 test images, seed 7.
fn train_args(data: &Path, out: &Path, method: &str, epochs: usize) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--model",
        "tiny",
        "--image-size",
        "96",
        "--batch-size",
        "4",
        "--train-limit",
        "10",
        "--test-limit",
        "5",
        "--lr",
        "1e-3",
        "--seed",
        "7",
        "--threads",
        "1",
        "--quiet",
        "--method",
        method,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["--epochs".into(), epochs.to_string()]);
    a.extend(["--data-dir".into(), data.display().to_string()]);
    a.extend(["--out".into(), out.display().to_string()]);
    a
}

fn ok(o: Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

fn one_process(args: &[String]) {
    ok(
        Command::new(BIN).args(args).output().unwrap(),
        "one process",
    );
}

fn two_ranks(args: &[String], extra: &[&str]) {
    let o = mpirun(2, "run")
        .args(args)
        .args(["--distributed", "mpi"])
        .args(extra)
        .output()
        .unwrap();
    ok(o, "mpirun -np 2");
}

fn latest_params(run: &Path) -> TensorMap {
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    let dir = run.join("checkpoints").join(latest.trim());
    tensors::load(&dir.join("params.safetensors"), &Device::Cpu).unwrap()
}

/// Weights within `tol` relative (all entries together). One process run twice gives
/// bit-identical weights; two ranks sum each gradient in another order, and Adam turns the
/// rounding of entries whose gradient is (nearly) zero — attention key biases, whose exact
/// gradient is zero — into steps of the learning rate's size (see `tests/dp.rs`).
fn assert_close(a: &TensorMap, b: &TensorMap, what: &str, tol: f64) {
    let (l2, worst) = common::rel_diffs(a, b);
    eprintln!(
        "{what}: weights differ by {l2:e} (relative, all entries), {worst:e} (worst tensor, \
         max-abs relative)"
    );
    assert!(l2 <= tol, "{what}: weights differ by {l2:e} (relative)");
}

fn merged(run: &Path) -> TensorMap {
    tensors::load(&run.join("merged.safetensors"), &Device::Cpu).unwrap()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

fn mdice(run: &Path, which: &str) -> f64 {
    summary(run)[which]["mdice"].as_f64().unwrap()
}

fn dataset(tmp: &Path) -> PathBuf {
    let data = tmp.join("kvasir");
    common::synth_kvasir(&data, 24, 11, 200);
    data
}

#[test]
fn two_mpi_ranks_train_gps_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let one = tmp.path().join("one");
    one_process(&train_args(&data, &one, "gps", 2));
    // Its own selection, over 2 ranks.
    let own = tmp.path().join("own");
    two_ranks(&train_args(&data, &own, "gps", 2), &[]);
    let (same, all) = common::agreement(
        &one.join("gps/selection.safetensors"),
        &own.join("gps/selection.safetensors"),
    );
    eprintln!("2 ranks: {same} of {all} selection entries agree");
    assert!(
        all > 0 && same as f64 >= 0.999 * all as f64,
        "{same} of {all} agree"
    );
    // Training from the one process's selection: the same weights and test mDice.
    let given = tmp.path().join("given");
    std::fs::create_dir_all(given.join("gps")).unwrap();
    for f in ["gps_config.json", "selection.safetensors"] {
        std::fs::copy(one.join("gps").join(f), given.join("gps").join(f)).unwrap();
    }
    two_ranks(&train_args(&data, &given, "gps", 2), &[]);
    assert_close(
        &latest_params(&given),
        &latest_params(&one),
        "2 ranks, trained entries",
        1e-3,
    );
    assert_close(
        &merged(&given),
        &merged(&one),
        "2 ranks, merged model",
        1e-4,
    );
    assert!((mdice(&given, "best") - mdice(&one, "best")).abs() <= 1e-3);
    assert!(given.join("merged.safetensors").is_file());
}

#[test]
fn two_mpi_ranks_train_full_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let one = tmp.path().join("one");
    one_process(&train_args(&data, &one, "full", 2));
    let two = tmp.path().join("two");
    two_ranks(&train_args(&data, &two, "full", 2), &[]);
    assert_close(&latest_params(&two), &latest_params(&one), "2 ranks", 1e-4);
    assert!((mdice(&two, "best") - mdice(&one, "best")).abs() <= 1e-3);
    assert!((mdice(&two, "last") - mdice(&one, "last")).abs() <= 1e-3);
}

#[test]
fn mpirun_without_distributed_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let out = tmp.path().join("r");
    let o = mpirun(2, "refuse")
        .args(train_args(&data, &out, "gps", 1))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--distributed") && err.contains("OMPI_COMM_WORLD_SIZE"),
        "{err}"
    );
    assert!(!out.join("config.json").exists(), "nothing was written");
}

/// The processes whose environment holds `GPS_SEG_TEST_TAG=<tag>` and
/// `OMPI_COMM_WORLD_RANK=<rank>`.
fn ranks_tagged(tag: &str, rank: usize) -> Vec<i32> {
    let want = [
        format!("GPS_SEG_TEST_TAG={tag}"),
        format!("OMPI_COMM_WORLD_RANK={rank}"),
    ];
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = env
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if want.iter().all(|w| vars.contains(w)) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_killed_rank_ends_the_run_and_resume_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let epochs = 4;
    let whole = tmp.path().join("whole");
    two_ranks(&train_args(&data, &whole, "gps", epochs), &[]);

    let run = tmp.path().join("killed");
    let tag = format!("kill-{}", std::process::id());
    let mut child = mpirun(2, &tag)
        .args(train_args(&data, &run, "gps", epochs))
        .args(["--distributed", "mpi"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then kill rank 1 in its second epoch.
    let t0 = Instant::now();
    while !run.join("checkpoints/LATEST").exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = ranks_tagged(&tag, 1);
    assert_eq!(pids.len(), 1, "rank 1's process: {pids:?}");
    let killed = Instant::now();
    // SAFETY: sending a signal to a process id this test found, no memory involved.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "mpirun still running 60 s after a rank died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = killed.elapsed().as_secs_f64();
    eprintln!("mpirun ended {after:.1} s after rank 1 was killed: {status}");
    assert!(
        !status.success(),
        "mpirun exited {status} after a rank was killed"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(ranks_tagged(&tag, 0).is_empty(), "rank 0 outlived the run");
    let summary_before = run.join("summary.json").exists();
    assert!(!summary_before, "the killed run did not finish");

    two_ranks(&train_args(&data, &run, "gps", epochs), &["--resume"]);
    for which in ["best", "last"] {
        let (a, b) = (mdice(&run, which), mdice(&whole, which));
        assert!(
            (a - b).abs() <= 1e-6,
            "{which} mDice {a} after resume vs {b}"
        );
    }
    assert_eq!(summary(&run)["best_epoch"], summary(&whole)["best_epoch"]);
}

#[test]
fn select_over_two_mpi_ranks_matches_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["select", "--base", "tiny", "--image-size", "96"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--batch-size", "2", "--threads", "1"].map(String::from));
        a.extend(["--data-dir".into(), data.display().to_string()]);
        a.extend(["--out".into(), out.display().to_string()]);
        a
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    one_process(&args(&one));
    two_ranks(&args(&two), &[]);
    let (same, all) = common::agreement(
        &one.join("selection.safetensors"),
        &two.join("selection.safetensors"),
    );
    eprintln!("select, 2 ranks: {same} of {all} selection entries agree");
    assert!(all > 0 && same as f64 >= 0.999 * all as f64);
    let info = |d: &Path| -> serde_json::Value {
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("gps_config.json")).unwrap())
                .unwrap();
        serde_json::json!([j["batches"], j["selection_images"]])
    };
    assert_eq!(info(&one), info(&two), "batches and images over the ranks");
}
