//! Run folders and checkpoints. *How* a checkpoint is written (every file atomically, the
//! `state.json` last, then the `LATEST` pointer swapped atomically) is separate from *which*
//! checkpoints are kept ([`KeepPolicy`]). A run killed at any moment leaves the previous
//! checkpoint intact and `LATEST` pointing at a complete one.
//!
//! Layout: `<run>/checkpoints/epoch-0003/{state.json, *.safetensors}`, `<run>/checkpoints/LATEST`,
//! `<run>/best/` (a copy of the best epoch's files and an `EPOCH` marker).
//!
//! "Best" is one atomic step: [`Checkpoints::save_epoch`] writes the epoch's files, then builds
//! `best/` in a temp folder swapped in by rename, then moves `LATEST` (the state that names the
//! best epoch becomes current only after `best/` holds it). The best epoch's checkpoint is never
//! pruned, so [`Checkpoints::ensure_best`] can repair a missing or damaged `best/` on resume.

use crate::error::{Error, Result};
use crate::util::fs::{atomic_dir, read_json, sync_dir, write_atomic, write_json_atomic};
use crate::util::tensors::{save_safetensors, TensorMap};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

/// Which checkpoints survive.
#[derive(Debug, Clone, Copy)]
pub struct KeepPolicy {
    /// Keep this many most recent epoch checkpoints (≥ 1).
    pub keep_last: usize,
}

impl Default for KeepPolicy {
    fn default() -> Self {
        KeepPolicy { keep_last: 2 }
    }
}

/// The checkpoints folder of one run.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
    policy: KeepPolicy,
}

impl Checkpoints {
    pub fn new(run_dir: &Path, policy: KeepPolicy) -> Self {
        Checkpoints {
            dir: run_dir.join("checkpoints"),
            policy,
        }
    }

    fn epoch_dir(&self, epoch: usize) -> PathBuf {
        self.dir.join(format!("epoch-{epoch:04}"))
    }

    /// Write one checkpoint: tensor files, then `state.json`, then `LATEST`; prune old ones.
    pub fn save<S: Serialize>(
        &self,
        epoch: usize,
        tensors: &[(&str, &TensorMap)],
        state: &S,
    ) -> Result<PathBuf> {
        self.save_epoch(epoch, tensors, state, None)
    }

    /// Write one checkpoint of a run whose best epoch is `best`: tensor files and `state.json`
    /// of the epoch, then (when `best` is this epoch) `best/` atomically, then `LATEST`; prune
    /// old checkpoints except `best`'s.
    pub fn save_epoch<S: Serialize>(
        &self,
        epoch: usize,
        tensors: &[(&str, &TensorMap)],
        state: &S,
        best: Option<usize>,
    ) -> Result<PathBuf> {
        let d = self.epoch_dir(epoch);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        for (name, map) in tensors {
            save_safetensors(&d.join(format!("{name}.safetensors")), map, None)?;
        }
        write_json_atomic(&d.join("state.json"), state)?;
        if best == Some(epoch) {
            self.mark_best(epoch)?;
        }
        write_atomic(
            &self.dir.join("LATEST"),
            format!("epoch-{epoch:04}\n").as_bytes(),
        )?;
        self.prune(epoch, best)?;
        Ok(d)
    }

    fn prune(&self, newest: usize, protect: Option<usize>) -> Result<()> {
        let keep = self.policy.keep_last.max(1);
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("epoch-")
                .and_then(|s| s.parse::<usize>().ok())
            {
                if n.saturating_add(keep) <= newest && Some(n) != protect {
                    let p = entry.path();
                    std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint: its folder and parsed state, if any.
    pub fn latest<S: DeserializeOwned>(&self) -> Result<Option<(PathBuf, S)>> {
        let ptr = self.dir.join("LATEST");
        let Ok(name) = std::fs::read_to_string(&ptr) else {
            return Ok(None);
        };
        let d = self.dir.join(name.trim());
        let state_path = d.join("state.json");
        if !state_path.exists() {
            return Err(Error::Checkpoint {
                path: ptr,
                msg: format!("points at `{}`, which has no state.json", d.display()),
            });
        }
        Ok(Some((d, read_json(&state_path)?)))
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.dir
            .parent()
            .map(|p| p.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Copy a checkpoint's files to `<run>/best/` as one step: they are written into a temp
    /// folder (with an `EPOCH` marker), which replaces `best/` by rename.
    pub fn mark_best(&self, epoch: usize) -> Result<PathBuf> {
        let src = self.epoch_dir(epoch);
        let dst = self.run_path("best");
        let next = self.run_path("best.next");
        let old = self.run_path("best.old");
        for stale in [&next, &old] {
            if stale.exists() {
                std::fs::remove_dir_all(stale).map_err(|e| Error::io(stale, e))?;
            }
        }
        atomic_dir(&next, |tmp| {
            let rd = std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))?;
            for entry in rd.flatten() {
                let p = entry.path();
                let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
                write_atomic(&tmp.join(entry.file_name()), &bytes)?;
            }
            write_atomic(&tmp.join("EPOCH"), format!("epoch-{epoch:04}\n").as_bytes())
        })?;
        if dst.exists() {
            std::fs::rename(&dst, &old).map_err(|e| Error::io(&dst, e))?;
        }
        std::fs::rename(&next, &dst).map_err(|e| Error::io(&dst, e))?;
        if let Some(parent) = dst.parent() {
            sync_dir(parent)?;
        }
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(dst)
    }

    /// Make `<run>/best/` hold exactly epoch `epoch`'s checkpoint: when it is missing, names
    /// another epoch, or any file differs from the checkpoint's (a half-copied or damaged
    /// folder), it is rebuilt from `checkpoints/epoch-NNNN`. Returns whether it was repaired.
    pub fn ensure_best(&self, epoch: usize) -> Result<bool> {
        let src = self.epoch_dir(epoch);
        let dst = self.run_path("best");
        if !src.join("state.json").is_file() {
            let marker = std::fs::read_to_string(dst.join("EPOCH")).unwrap_or_default();
            if marker.trim() == format!("epoch-{epoch:04}") {
                return Ok(false);
            }
            return Err(Error::Checkpoint {
                path: dst,
                msg: format!(
                    "does not hold the best epoch {epoch}, and its checkpoint {} is gone",
                    src.display()
                ),
            });
        }
        let rd = std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))?;
        let mut intact = std::fs::read_to_string(dst.join("EPOCH"))
            .is_ok_and(|m| m.trim() == format!("epoch-{epoch:04}"));
        for entry in rd.flatten() {
            if !intact {
                break;
            }
            let p = entry.path();
            let a = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            intact = std::fs::read(dst.join(entry.file_name())).is_ok_and(|b| b == a);
        }
        if !intact {
            self.mark_best(epoch)?;
        }
        Ok(!intact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn save_prune_latest_and_best() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(dir.path(), KeepPolicy { keep_last: 2 });
        assert!(c.latest::<serde_json::Value>().unwrap().is_none());
        let mut m = TensorMap::new();
        m.insert("w".into(), Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap());
        for e in 0..4 {
            c.save(e, &[("weights", &m)], &serde_json::json!({ "epoch": e }))
                .unwrap();
        }
        let (d, s): (PathBuf, serde_json::Value) = c.latest().unwrap().unwrap();
        assert_eq!(s["epoch"], 3);
        assert!(d.ends_with("epoch-0003"));
        assert!(!dir.path().join("checkpoints/epoch-0001").exists());
        assert!(dir.path().join("checkpoints/epoch-0002").exists());
        let b = c.mark_best(3).unwrap();
        assert!(b.join("weights.safetensors").exists() && b.join("state.json").exists());
    }

    #[test]
    fn the_best_checkpoint_survives_pruning_and_repairs_best() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(dir.path(), KeepPolicy { keep_last: 1 });
        let mut m = TensorMap::new();
        for e in 1..=4 {
            m.insert("w".into(), Tensor::new(&[e as f32], &Device::Cpu).unwrap());
            c.save_epoch(
                e,
                &[("params", &m)],
                &serde_json::json!({ "e": e }),
                Some(2),
            )
            .unwrap();
        }
        let ck = dir.path().join("checkpoints");
        assert!(ck.join("epoch-0002").exists() && ck.join("epoch-0004").exists());
        assert!(!ck.join("epoch-0001").exists() && !ck.join("epoch-0003").exists());
        let best = dir.path().join("best");
        assert_eq!(
            std::fs::read_to_string(best.join("EPOCH")).unwrap(),
            "epoch-0002\n"
        );
        assert!(!c.ensure_best(2).unwrap(), "an intact best/ is left alone");
        // Damaged (truncated) and missing best/ are both rebuilt from epoch 2.
        let want = std::fs::read(ck.join("epoch-0002/params.safetensors")).unwrap();
        std::fs::write(best.join("params.safetensors"), &want[..want.len() / 2]).unwrap();
        assert!(c.ensure_best(2).unwrap());
        assert_eq!(
            std::fs::read(best.join("params.safetensors")).unwrap(),
            want
        );
        std::fs::remove_dir_all(&best).unwrap();
        assert!(c.ensure_best(2).unwrap());
        assert_eq!(
            std::fs::read(best.join("params.safetensors")).unwrap(),
            want
        );
        // A best epoch whose checkpoint is gone and that best/ does not hold is an error.
        let e = c.ensure_best(3).unwrap_err().to_string();
        assert!(e.contains("epoch-0003"), "{e}");
    }
}
