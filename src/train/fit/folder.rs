//! The edges of the training loop ([`super::fit`]): opening a run folder for a fresh start or a
//! resume, restoring trainable vars and optimiser state from a checkpoint, the Adam/AdamW
//! choice, `metrics.jsonl`, the smoothed loss curve, whole-tensor roles from a policy, and the
//! delta of a GPS artifact from saved params.

use super::checkpoint::{Checkpoints, KeepPolicy};
use super::optim::{Adam, AdamW, Optimizer};
use crate::error::{Error, Result};
use crate::gps::artifact::Artifact;
use crate::gps::policy::{Policy, Treatment};
use crate::nn::{Role, RolePolicy};
use crate::util::fs::{read_json, write_atomic, write_json_atomic};
use crate::util::tensors::{self, TensorMap};
use candle_core::{Device, Var};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Create `run_dir` and decide between a fresh start and a resume.
///
/// Fresh start: refuses a folder that already holds a checkpoint. Resume: refuses a run whose
/// `config.json` differs from `cfg`, and returns the newest checkpoint (if any). Either way
/// `cfg` is then written to `<run>/config.json`.
#[allow(clippy::type_complexity)]
pub fn open_run<C, S>(
    run_dir: &Path,
    cfg: &C,
    keep_last: usize,
    resume: bool,
) -> Result<(Checkpoints, Option<(PathBuf, S)>)>
where
    C: Serialize + DeserializeOwned + PartialEq,
    S: DeserializeOwned,
{
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let config_path = run_dir.join("config.json");
    let ckpts = Checkpoints::new(
        run_dir,
        KeepPolicy {
            keep_last: keep_last.max(1),
        },
    );
    let latest = if resume {
        if config_path.exists() {
            let saved: C = read_json(&config_path)?;
            if saved != *cfg {
                return Err(Error::Config {
                    field: "resume".into(),
                    msg: format!(
                        "{} was made with different settings; resume with the same flags \
                         (or start a new --out)",
                        config_path.display()
                    ),
                });
            }
        }
        ckpts.latest()?
    } else {
        if ckpts.latest::<serde_json::Value>()?.is_some() {
            return Err(Error::Config {
                field: "out".into(),
                msg: format!(
                    "{} already holds a run; pass --resume to continue it or choose another --out",
                    run_dir.display()
                ),
            });
        }
        None
    };
    write_json_atomic(&config_path, cfg)?;
    Ok((ckpts, latest))
}

/// Make `dir` ready for a new run without deleting anything unasked: an absent or empty
/// folder is fine; one holding files (an earlier run) is refused unless `overwrite`, in which
/// case it is removed. `flag` names the option that chose the folder (e.g. `--out`).
pub fn clear_for_run(dir: &Path, overwrite: bool, flag: &str) -> Result<()> {
    let holds_files = std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_some());
    if !holds_files {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::Config {
            field: flag.trim_start_matches('-').replace('-', "_"),
            msg: format!(
                "{} already holds an earlier run; pass --overwrite to replace it or choose \
                 another {flag}",
                dir.display()
            ),
        });
    }
    std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Set `vars` from `<dir>/params.safetensors` and the optimiser from
/// `<dir>/optimizer.safetensors`; a missing tensor is an error naming the file and tensor.
pub fn restore(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &mut dyn Optimizer,
    device: &Device,
) -> Result<()> {
    let path = dir.join("params.safetensors");
    let params = tensors::load(&path, device)?;
    for (name, var) in vars {
        let t = params.get(name).ok_or_else(|| Error::Checkpoint {
            path: path.clone(),
            msg: format!("no tensor `{name}`"),
        })?;
        var.set(t)?;
    }
    let ost = tensors::load(&dir.join("optimizer.safetensors"), device)?;
    opt.load_state(&ost)
}

/// Current values of the trainable vars (GPS: the deltas), detached.
pub fn snapshot(vars: &[(String, Var)]) -> TensorMap {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

/// Plain Adam (GPS and the partial baselines) or AdamW (full fine-tuning).
pub enum Opt {
    Adam(Adam),
    AdamW(AdamW),
}

impl Opt {
    pub fn get(&mut self) -> &mut dyn Optimizer {
        match self {
            Opt::Adam(o) => o,
            Opt::AdamW(o) => o,
        }
    }
}

/// One JSON line per record, written atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut s = String::new();
    for r in records {
        let line =
            serde_json::to_string(r).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        s.push_str(&line);
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

/// Per-step losses as (step, running mean over ~2% of the steps) points for a line chart.
pub fn smoothed_loss(losses: &[f32]) -> Vec<(f64, f64)> {
    let n = losses.len();
    let win = (n / 50).max(1);
    let mut pts = Vec::with_capacity(n);
    let mut acc = 0.0f64;
    for (i, &l) in losses.iter().enumerate() {
        acc += l as f64;
        if i >= win {
            acc -= losses[i - win] as f64;
        }
        pts.push(((i + 1) as f64, acc / (i + 1).min(win) as f64));
    }
    pts
}

/// Roles of a whole-tensor method: the tensors `policy` marks `Trainable` train, the rest is
/// frozen (`Selected` is not used by these policies).
pub fn roles_from_policy(base: &TensorMap, policy: &Policy) -> RolePolicy {
    RolePolicy::Map(
        base.iter()
            .filter(|(n, t)| policy.treatment(n, t.dims()) == Treatment::Trainable)
            .map(|(n, _)| (n.clone(), Role::Trainable))
            .collect(),
    )
}

/// The artifact's delta (selected values + trainable tensors) from saved trainable params.
pub fn delta_from_params(art: &Artifact, params: &TensorMap) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for name in art
        .selection
        .indices
        .keys()
        .chain(art.selection.trainable.iter())
    {
        let t = params.get(name).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            msg: "missing from the best checkpoint".into(),
        })?;
        out.insert(name.clone(), t.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_keeps_length_and_means() {
        let l = [1.0f32, 3.0, 5.0];
        let p = smoothed_loss(&l);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], (1.0, 1.0));
        assert_eq!(p[2].1, 5.0); // window 1 for 3 points
    }

    #[test]
    fn open_run_refuses_overwrite_and_changed_resume() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r");
        let (c, latest): (_, Option<(PathBuf, serde_json::Value)>) =
            open_run(&run, &1u32, 1, false).unwrap();
        assert!(latest.is_none());
        c.save(1, &[], &serde_json::json!({"e": 1})).unwrap();
        let e = open_run::<u32, serde_json::Value>(&run, &1, 1, false).unwrap_err();
        assert!(e.to_string().contains("--resume"), "{e}");
        let e = open_run::<u32, serde_json::Value>(&run, &2, 1, true).unwrap_err();
        assert!(e.to_string().contains("different settings"), "{e}");
        let (_, l) = open_run::<u32, serde_json::Value>(&run, &1, 1, true).unwrap();
        assert_eq!(l.unwrap().1["e"], 1);
    }
}

/// What a checkpoint's `state.json` holds besides tensors, for a trainer whose epoch record
/// (one line of `metrics.jsonl`) is `R`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainState<R> {
    /// Epochs completed.
    pub epochs_done: usize,
    pub global_step: usize,
    /// Training loader position (restored on resume).
    pub loader: crate::data::loader::LoaderState,
    pub history: Vec<R>,
    pub best_epoch: Option<usize>,
    /// Per-step training losses (for the loss curve).
    pub step_losses: Vec<f32>,
}
