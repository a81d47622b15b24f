//! Resolving a `--model` argument to a SAM config and a base checkpoint.
//!
//! - A preset name whose pretrained weights ship with the project (`tiny` → `sam/sam-tiny.*`)
//!   resolves to that checkpoint and its config.
//! - A checkpoint path (`.safetensors`, or an official `.pth`) resolves to itself; its config
//!   comes from a JSON beside it (`<stem>.json`, `config.json` or `sam_config.json` in its
//!   folder), else is inferred from the tensor shapes.
//! - Other presets (`vit_b`, …) without a checkpoint are refused with a message saying how to
//!   pass one: official weights cannot be downloaded here.

use super::config::SamConfig;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Folders searched for the project's shipped models, in order: `./sam`, then the source
/// checkout this binary was built from.
pub fn model_dirs() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("sam")];
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("sam");
    if !v.contains(&built) {
        v.push(built);
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

/// Config stored beside a checkpoint, if any.
pub fn config_beside(path: &Path) -> Result<Option<SamConfig>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut candidates = Vec::new();
    if let Some(stem) = path.file_stem() {
        candidates.push(dir.join(format!("{}.json", stem.to_string_lossy())));
    }
    candidates.push(dir.join("sam_config.json"));
    candidates.push(dir.join("config.json"));
    for c in candidates {
        if c.is_file() {
            if let Ok(cfg) = crate::util::fs::read_json::<SamConfig>(&c) {
                return Ok(Some(cfg));
            }
        }
    }
    Ok(None)
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
            Some((w, c)) => (w, crate::util::fs::read_json::<SamConfig>(&c)?),
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
