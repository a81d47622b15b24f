//! Peak memory of whole runs, not of one step: `gps-seg train` (GPS, with and without
//! `--checkpoint-blocks`) and `gps-seg select` on a seeded random checkpoint in the official
//! layout (position tables for the preset's native input size, resized at load to the run's
//! `--image-size`), a few synthetic Kvasir-shaped images, a couple of selection batches and
//! optimiser steps. Each run is a child process of the calling binary; its peak resident size
//! is the kernel's `ru_maxrss` of that child (`wait4`), so every row's peak is its own.
//! The library measures; the CLI (`gps-seg bench run-memory`) prints.

use crate::data::synth_kvasir::{self, SynthKvasirConfig};
use crate::error::{Error, Result};
use crate::onnx::sam::random_sam_weights;
use crate::sam::SamConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunMemoryConfig {
    /// SAM preset of the random checkpoint (written at the preset's native input size).
    pub model: String,
    /// `--image-size` of the runs.
    pub image_size: usize,
    /// Synthetic images generated (train + test).
    pub images: usize,
    /// Largest side of the generated images.
    pub max_side: usize,
    pub select_batches: usize,
    pub max_steps: usize,
    pub test_limit: usize,
    /// `--threads` of every run.
    pub threads: usize,
    /// Which rows (names of [`ROWS`]); empty: all.
    pub only: Vec<String>,
    pub seed: u64,
    /// Write the inputs and runs here and keep them (a new or empty folder), instead of a
    /// temporary folder removed afterwards.
    pub keep: Option<PathBuf>,
}

/// The rows, in order: name and the extra flags of its run.
pub const ROWS: [(&str, &str); 3] = [
    ("train gps", "train"),
    ("train gps --checkpoint-blocks", "train --checkpoint-blocks"),
    ("select (gradient)", "select"),
];

/// One measured run.
#[derive(Debug, Clone)]
pub struct RunMemoryRow {
    pub name: String,
    /// The command line after the binary.
    pub args: Vec<String>,
    /// Peak resident size of the child (`ru_maxrss`), bytes.
    pub peak_rss_bytes: u64,
    pub seconds: f64,
}

/// Inputs shared by every row, written once in a scratch folder.
#[derive(Debug)]
pub struct Prepared {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    pub checkpoint_bytes: u64,
}

/// Write the random checkpoint (`base.safetensors`) and the synthetic data set into `dir`.
pub fn prepare(cfg: &RunMemoryConfig, dir: &Path) -> Result<Prepared> {
    let sam = SamConfig::preset(&cfg.model)?;
    let checkpoint = dir.join("base.safetensors");
    {
        let w = random_sam_weights(&sam, cfg.seed)?;
        crate::util::tensors::save_safetensors(&checkpoint, &w, None)?;
    }
    let data = dir.join("data");
    synth_kvasir::generate(
        &data,
        &SynthKvasirConfig {
            count: cfg.images,
            seed: cfg.seed,
            max_side: cfg.max_side,
            ..Default::default()
        },
    )?;
    let checkpoint_bytes = std::fs::metadata(&checkpoint)
        .map_err(|e| Error::io(&checkpoint, e))?
        .len();
    Ok(Prepared {
        checkpoint,
        data,
        checkpoint_bytes,
    })
}

/// The command line of row `kind` (`train` with optional `--checkpoint-blocks`, `select`).
pub fn row_args(cfg: &RunMemoryConfig, p: &Prepared, kind: &str, out: &Path) -> Vec<String> {
    let mut words = kind.split_whitespace();
    let sub = words.next().unwrap_or("train");
    let s = |x: &str| x.to_string();
    let path = |x: &Path| x.display().to_string();
    let mut a = vec![s(sub)];
    match sub {
        "select" => a.extend([
            s("--base"),
            path(&p.checkpoint),
            s("--criterion"),
            s("gradient"),
        ]),
        _ => a.extend([
            s("--model"),
            path(&p.checkpoint),
            s("--method"),
            s("gps"),
            s("--epochs"),
            s("1"),
            s("--max-steps"),
            cfg.max_steps.to_string(),
            s("--test-limit"),
            cfg.test_limit.to_string(),
            s("--quiet"),
        ]),
    }
    a.extend([
        s("--data-dir"),
        path(&p.data),
        s("--image-size"),
        cfg.image_size.to_string(),
        s("--select-batches"),
        cfg.select_batches.to_string(),
        s("--threads"),
        cfg.threads.to_string(),
        s("--out"),
        path(out),
    ]);
    a.extend(words.map(s));
    a
}

/// Run `exe args` to completion (stdout and stderr captured, shown on failure) and return its
/// peak resident size in bytes and its wall time.
pub fn measure_child(exe: &Path, args: &[String]) -> Result<(u64, f64)> {
    let t0 = Instant::now();
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(exe, e))?;
    let (status, maxrss_kb, out) = wait_with_rusage(child)?;
    let seconds = t0.elapsed().as_secs_f64();
    if !status {
        return Err(Error::msg(format!(
            "`{} {}` failed:\n{}",
            exe.display(),
            args.join(" "),
            out
        )));
    }
    Ok((maxrss_kb.saturating_mul(1024), seconds))
}

/// Drain the child's pipes, reap it with `wait4` and return (success, `ru_maxrss` in KiB,
/// the tail of its stderr + stdout).
fn wait_with_rusage(mut child: std::process::Child) -> Result<(bool, u64, String)> {
    use std::io::Read;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let mut err = Vec::new();
    if let Some(e) = stderr.as_mut() {
        let _ = e.read_to_end(&mut err);
    }
    let out = t_out.join().unwrap_or_default();
    let pid = i32::try_from(child.id()).map_err(|_| Error::msg("child pid out of range"))?;
    let (ok, maxrss) = wait4(pid)?;
    let mut text = String::from_utf8_lossy(&err).into_owned();
    text.push_str(&String::from_utf8_lossy(&out));
    let tail: String = text
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Ok((ok, maxrss, tail))
}

#[cfg(target_os = "linux")]
fn wait4(pid: i32) -> Result<(bool, u64)> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (std's `Child` was never waited on);
    // both pointers are valid for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        return Err(Error::msg(format!(
            "wait4 on child {pid} failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, u64::try_from(ru.ru_maxrss).unwrap_or(0)))
}

#[cfg(not(target_os = "linux"))]
fn wait4(_pid: i32) -> Result<(bool, u64)> {
    Err(Error::msg(
        "bench run-memory reads a child's peak memory with wait4 (Linux only)",
    ))
}

/// Prepare the inputs in a scratch folder (removed afterwards) and run every row with `exe`
/// (the `gps-seg` binary). `progress` hears each row before it starts.
pub fn run(
    cfg: &RunMemoryConfig,
    exe: &Path,
    mut progress: impl FnMut(&str),
) -> Result<(Prepared, Vec<RunMemoryRow>)> {
    for o in &cfg.only {
        if !ROWS.iter().any(|(n, k)| n == o || k == o) {
            return Err(Error::Config {
                field: "rows".into(),
                msg: format!(
                    "unknown row `{o}` (one of: {})",
                    ROWS.iter().map(|(_, k)| *k).collect::<Vec<_>>().join(", ")
                ),
            });
        }
    }
    // The runs' config, checked before anything is written (each run would refuse it later).
    SamConfig::preset(&cfg.model)?
        .with_image_size(cfg.image_size)
        .validate()?;
    let (_tmp, dir) = super::work_dir(cfg.keep.as_deref(), "gps-seg-bench-run-memory-")?;
    let dir: &Path = &dir;
    progress("writing the random checkpoint and the synthetic images");
    let p = prepare(cfg, dir)?;
    let mut rows = Vec::new();
    for (i, (name, kind)) in ROWS.iter().enumerate() {
        if !cfg.only.is_empty() && !cfg.only.iter().any(|o| o == name || o == kind) {
            continue;
        }
        progress(name);
        let out = dir.join(format!("run-{i}"));
        let args = row_args(cfg, &p, kind, &out);
        let (peak, seconds) = measure_child(exe, &args)?;
        rows.push(RunMemoryRow {
            name: name.to_string(),
            args,
            peak_rss_bytes: peak,
            seconds,
        });
    }
    Ok((p, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_child_peak_is_read_and_a_failing_child_is_reported() {
        // A child that touches 64 MiB reads at least that; the peak is the child's own.
        let sh = Path::new("/bin/sh");
        let args = |s: &str| vec!["-c".to_string(), s.to_string()];
        let (small, _) = measure_child(sh, &args("exit 0")).unwrap();
        let (big, _) = measure_child(
            sh,
            &args("head -c 67108864 /dev/zero | { v=$(cat | tr '\\0' a); echo ${#v}; }"),
        )
        .unwrap();
        assert!(small > 0, "{small}");
        assert!(big >= 64 << 20, "{big}");
        let e = measure_child(sh, &args("echo boom >&2; exit 3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("boom") && e.contains("exit 3"), "{e}");
    }

    #[test]
    fn rows_are_train_and_select_command_lines() {
        let cfg = RunMemoryConfig {
            model: "vit_b".into(),
            image_size: 512,
            images: 12,
            max_side: 512,
            select_batches: 2,
            max_steps: 2,
            test_limit: 2,
            threads: 2,
            only: vec![],
            seed: 0,
            keep: None,
        };
        let p = Prepared {
            checkpoint: "ck.safetensors".into(),
            data: "d".into(),
            checkpoint_bytes: 0,
        };
        let t = row_args(&cfg, &p, ROWS[1].1, Path::new("o")).join(" ");
        assert!(
            t.starts_with("train --model ck.safetensors --method gps"),
            "{t}"
        );
        for part in [
            "--image-size 512",
            "--select-batches 2",
            "--max-steps 2",
            "--out o",
        ] {
            assert!(t.contains(part), "{t} lacks {part}");
        }
        assert!(t.ends_with("--checkpoint-blocks"), "{t}");
        let s = row_args(&cfg, &p, ROWS[2].1, Path::new("o")).join(" ");
        assert!(
            s.starts_with("select --base ck.safetensors --criterion gradient"),
            "{s}"
        );
        assert!(!s.contains("--max-steps"), "{s}");
    }
}
