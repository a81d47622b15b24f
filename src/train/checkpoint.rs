//! Run folders and checkpoints. *How* a checkpoint is written (every file atomically, the
//! `state.json` last, then the `LATEST` pointer swapped atomically) is separate from *which*
//! checkpoints are kept ([`KeepPolicy`]). A run killed at any moment leaves the previous
//! checkpoint intact and `LATEST` pointing at a complete one.
//!
//! Layout: `<run>/checkpoints/epoch-0003/{state.json, *.safetensors}`, `<run>/checkpoints/LATEST`,
//! `<run>/best/` (a copy of the best epoch's files).

use crate::error::{Error, Result};
use crate::util::fs::{read_json, write_atomic, write_json_atomic};
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
        let d = self.epoch_dir(epoch);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        for (name, map) in tensors {
            save_safetensors(&d.join(format!("{name}.safetensors")), map, None)?;
        }
        write_json_atomic(&d.join("state.json"), state)?;
        write_atomic(
            &self.dir.join("LATEST"),
            format!("epoch-{epoch:04}\n").as_bytes(),
        )?;
        self.prune(epoch)?;
        Ok(d)
    }

    fn prune(&self, newest: usize) -> Result<()> {
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
                if n + keep <= newest {
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

    /// Copy a checkpoint's files to `<run>/best/` (each file atomically).
    pub fn mark_best(&self, epoch: usize) -> Result<PathBuf> {
        let src = self.epoch_dir(epoch);
        let dst = self
            .dir
            .parent()
            .map(|p| p.join("best"))
            .unwrap_or_else(|| PathBuf::from("best"));
        std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
        let rd = std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))?;
        for entry in rd.flatten() {
            let p = entry.path();
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            write_atomic(&dst.join(entry.file_name()), &bytes)?;
        }
        Ok(dst)
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
}
