//! A SAM checkpoint's config: the JSON stored beside it (`<stem>.json`, `sam_config.json`, a
//! `config.json` that is a SAM config), read and validated naming the file and field, or
//! inferred from the tensor shapes. Which checkpoint a `--model` name means is
//! [`crate::registry`]'s question.

use super::config::SamConfig;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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
