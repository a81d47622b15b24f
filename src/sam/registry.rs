//! Resolving a `--model` argument to a SAM config and a base checkpoint.
//!
//! - A preset name whose pretrained weights ship with the project (`tiny` → `sam/sam-tiny.*`,
//!   found in [`model_dirs`]: also where `pip install gps-seg` put them) resolves to that
//!   checkpoint and its config.
//! - A checkpoint path (`.safetensors`, or an official `.pth`) resolves to itself; its config
//!   comes from a JSON beside it (`<stem>.json`, `config.json` or `sam_config.json` in its
//!   folder), else is inferred from the tensor shapes.
//! - Other presets (`vit_b`, …) without a checkpoint are refused with a message saying how to
//!   pass one: official weights cannot be downloaded here.

use super::config::SamConfig;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Folders searched for the project's shipped models, in order: `./sam`, the models a wheel
/// installed beside this executable (`<prefix>/share/gps-seg/sam`,
/// [`crate::util::install::shipped_model_dirs`]; none for a cargo build), then the source
/// checkout this binary was built from.
pub fn model_dirs() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("sam")];
    let installed = std::env::current_exe()
        .map(|e| crate::util::install::shipped_model_dirs(&e))
        .unwrap_or_default();
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("sam");
    for d in installed.into_iter().chain([built]) {
        if !v.contains(&d) {
            v.push(d);
        }
    }
    v
}

/// The shipped checkpoint for a preset (`tiny` → `sam-tiny.safetensors`), if present.
pub fn shipped(preset: &str) -> Option<(PathBuf, PathBuf)> {
    let stem = format!("sam-{}", preset.replace('_', "-"));
    model_dirs().into_iter().find_map(|d| {
        let w = d.join(format!("{stem}.safetensors"));
        let c = d.join(format!("{stem}.json"));
        (w.is_file() && c.is_file()).then_some((w, c))
    })
}

/// Config stored beside a checkpoint, if any: `<stem>.json`, then `sam_config.json`, then
/// `config.json` in its folder. The first two must be SAM configs: one that does not parse
/// or validate is an error naming the file and the field. A `config.json` is only taken for
/// a SAM config when it has SAM's keys (`encoder_embed_dim`): in a run folder it is the
/// training config, which is not one.
pub fn config_beside(path: &Path) -> Result<Option<SamConfig>> {
    Ok(config_file_beside(path)?.map(|(_, c)| c))
}

/// [`config_beside`] with the file it was read from.
pub fn config_file_beside(path: &Path) -> Result<Option<(PathBuf, SamConfig)>> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut candidates = Vec::new();
    if let Some(stem) = path.file_stem() {
        candidates.push((dir.join(format!("{}.json", stem.to_string_lossy())), true));
    }
    candidates.push((dir.join("sam_config.json"), true));
    candidates.push((dir.join("config.json"), false));
    for (c, must) in candidates {
        if !c.is_file() {
            continue;
        }
        if !must {
            let v = read_json_value(&c)?;
            if v.get("encoder_embed_dim").is_none() {
                continue;
            }
        }
        return read_config(&c).map(|cfg| Some((c, cfg)));
    }
    Ok(None)
}

fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })
}

/// Read and validate a [`SamConfig`] JSON file. Every error names the file; a bad, missing
/// or unknown field (or one that fails [`SamConfig::validate`]) is named as well.
pub fn read_config(path: &Path) -> Result<SamConfig> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let v = read_json_value(path)?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("a SAM config must be a JSON object".into()))?;
    let reference = serde_json::to_value(SamConfig::tiny())
        .map_err(|e| bad(format!("cannot serialise the reference config: {e}")))?;
    let known = reference
        .as_object()
        .ok_or_else(|| bad("reference config is not an object".into()))?;
    if let Some(k) = obj.keys().find(|k| !known.contains_key(*k)) {
        return Err(bad(format!(
            "config field `{k}`: not a SAM config field (expected {})",
            known.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    // serde_json names the field only for missing ones: find a value at fault by putting
    // each field, alone, into a known-good config.
    for (k, val) in obj {
        let mut probe = reference.clone();
        if let Some(slot) = probe.get_mut(k) {
            *slot = val.clone();
        }
        if let Err(e) = serde_json::from_value::<SamConfig>(probe) {
            return Err(bad(format!("config field `{k}`: {e}")));
        }
    }
    if let Some(k) = known.keys().find(|k| !obj.contains_key(*k)) {
        return Err(bad(format!("config field `{k}`: missing")));
    }
    let cfg = serde_json::from_value::<SamConfig>(v.clone())
        .map_err(|e| bad(format!("not a SAM config: {e}")))?;
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// Infer the config from a checkpoint's tensor shapes ([`super::info::infer_config`]).
pub fn infer_config(path: &Path) -> Result<SamConfig> {
    let map = crate::util::tensors::load(path, &candle_core::Device::Cpu)?;
    super::info::infer_config(&map)
        .map(|(c, _)| c)
        .map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a SAM checkpoint: {e}"),
        })
}

/// Resolve `--model` (and an optional input-size override) to (checkpoint, config).
pub fn resolve(model: &str, image_size: Option<usize>) -> Result<(PathBuf, SamConfig)> {
    let p = Path::new(model);
    let (path, cfg) = if SamConfig::PRESETS.contains(&model) && !p.exists() {
        match shipped(model) {
            Some((w, c)) => (w, read_config(&c)?),
            None => {
                return Err(Error::Config {
                    field: "model".into(),
                    msg: format!(
                        "no pretrained weights for preset `{model}` in {}; pass a checkpoint \
                         path (e.g. --model sam_vit_b_01ec64.pth){}",
                        model_dirs()
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(" or "),
                        if model == "tiny" {
                            ", or make one with `gps-seg pretrain sam`"
                        } else {
                            ""
                        }
                    ),
                })
            }
        }
    } else {
        if !p.is_file() {
            return Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint not found"),
            ));
        }
        let cfg = match config_beside(p)? {
            Some(c) => c,
            None => infer_config(p)?,
        };
        (p.to_path_buf(), cfg)
    };
    let cfg = match image_size {
        Some(s) => cfg.with_image_size(s),
        None => cfg,
    };
    cfg.validate()?;
    Ok((path, cfg))
}
