//! Checks and measurements that are not model code: speed tables and device parity. These may
//! import everything (models, data, training, inference); nothing in the library imports them
//! except the CLI (`gps-seg bench …`, `gps-seg parity`) and tests.
//!
//! - [`sam`]: prompt-free SAM forward / forward + backward speed and the analytic FLOP count;
//! - [`train`]: a full fine-tuning step against a GPS step (Candle, and PyTorch via a script);
//! - [`data`]: data-pipeline throughput; [`metrics`]: scoring one image with the field's
//!   metrics; [`infer`]: ONNX Runtime against the Candle SAM (and,
//!   with a Python, PyTorch eager and ONNX Runtime on torch's export);
//! - [`serve`]: the HTTP server under closed-loop load against plain ONNX Runtime;
//! - [`serve_tasks`]: many task files on one base in one server against one merged model;
//! - [`parity`]: forward + backward of a device against the CPU reference path.

pub mod data;
pub mod dp;
pub mod gemm;
pub mod infer;
pub mod metrics;
pub mod parity;
pub mod precision;
pub mod run_memory;
pub mod sam;
pub mod serve;
pub mod serve_tasks;
pub mod tasks;
pub mod train;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The folder a bench writes its inputs and outputs to: `keep` (created; refused if it exists
/// and is not empty, so nothing in it is overwritten), else a temporary folder removed with
/// the returned guard.
pub fn work_dir(keep: Option<&Path>, prefix: &str) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    match keep {
        Some(d) => {
            if std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()) {
                return Err(Error::Config {
                    field: "keep".into(),
                    msg: format!("{} exists and is not empty", d.display()),
                });
            }
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            Ok((None, d.to_path_buf()))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            let p = t.path().to_path_buf();
            Ok((Some(t), p))
        }
    }
}

/// Run `python script args…` (a PyTorch side of a comparison) and return the last line of its
/// stdout that starts with `{` (its JSON result). A failed run is an error with the exit status
/// and the last lines of its stderr.
pub(crate) fn python_json_line(
    python: &Path,
    script: &Path,
    args: &[std::ffi::OsString],
) -> Result<String> {
    let out = std::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| Error::io(python, e))?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "{} {} failed ({}): {}",
            python.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .map(str::to_string)
        .ok_or_else(|| Error::msg(format!("{}: no JSON result line", script.display())))
}
