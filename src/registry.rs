//! The project's models by name — one registry for SAM and the classifiers. `--model` is a
//! preset whose pretrained weights ship with the project (found in [`model_dirs`]: `./sam`,
//! where `pip install gps-seg` put them, the source checkout), or a checkpoint path whose
//! config lies beside it.
//!
//! - SAM ([`resolve_sam`]): `tiny` → `sam/sam-tiny.*`; a `.safetensors` / official `.pth` path
//!   with its config beside it ([`crate::sam::files::config_beside`]) or inferred from the tensor
//!   shapes; other presets (`vit_b`, …) without a checkpoint are refused with a message saying
//!   how to pass one (official weights cannot be downloaded here).
//! - Classifiers ([`resolve_classifier`]): `vit_tiny` / `convnext_tiny` (`vit_b16`,
//!   `convnext_b`) → `sam/<name>.*`, or their preset with fresh weights; a checkpoint path with
//!   `<stem>.json` beside it, else `--arch`.

use crate::error::{Error, Result};
use crate::models::ClassifierConfig;
use crate::sam::files::{config_beside, read_config};
use crate::sam::info::infer_config_file;
use crate::sam::SamConfig;
use crate::util::fs::read_json;
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

/// Resolve a SAM `--model` (and an optional input-size override) to (checkpoint, config).
pub fn resolve_sam(model: &str, image_size: Option<usize>) -> Result<(PathBuf, SamConfig)> {
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
            None => infer_config_file(p)?,
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

/// Resolve a classifier `--model` argument to (base checkpoint, architecture).
///
/// - `vit_tiny` / `convnext_tiny` (or their preset names `vit_tiny_cpu`, `convnext_tiny_cpu`,
///   and `vit_b16`, `convnext_b`): the project's shipped checkpoint `sam/<name>.safetensors`
///   with its `sam/<name>.json` (e.g. `sam/vit-tiny.*`, written by `gps-seg pretrain vit`);
///   with `random_init`, the preset with fresh weights instead (no checkpoint).
/// - a checkpoint path: its architecture from `<stem>.json` beside it, else from `arch`.
pub fn resolve_classifier(
    model: &str,
    arch: Option<&str>,
    random_init: bool,
) -> Result<(Option<PathBuf>, ClassifierConfig)> {
    let preset = match model {
        "vit_tiny" | "vit-tiny" | "vit_tiny_cpu" => Some(("vit_tiny_cpu", "vit-tiny")),
        "convnext_tiny" | "convnext-tiny" | "convnext_tiny_cpu" => {
            Some(("convnext_tiny_cpu", "convnext-tiny"))
        }
        "vit_b16" | "vit-b16" => Some(("vit_b16", "vit-b16")),
        "convnext_b" | "convnext-b" => Some(("convnext_b", "convnext-b")),
        _ => None,
    };
    if let Some((name, stem)) = preset {
        if random_init {
            return Ok((None, ClassifierConfig::preset(name, 2)?));
        }
        for d in model_dirs() {
            let w = d.join(format!("{stem}.safetensors"));
            let c = d.join(format!("{stem}.json"));
            if w.is_file() && c.is_file() {
                let cfg: ClassifierConfig = read_json(&c)?;
                cfg.validate()?;
                return Ok((Some(w), cfg));
            }
        }
        return Err(Error::Config {
            field: "model".into(),
            msg: format!(
                "no shipped checkpoint sam/{stem}.safetensors (+ .json) found; create it \
                 (`gps-seg pretrain vit` for vit_tiny), pass a checkpoint path, or train from \
                 scratch with --random-init"
            ),
        });
    }
    let path = PathBuf::from(model);
    if !path.is_file() {
        return Err(Error::Config {
            field: "model".into(),
            msg: format!(
                "`{model}` is neither a preset (vit_tiny, convnext_tiny, vit_b16, convnext_b) \
                 nor an existing checkpoint file"
            ),
        });
    }
    let beside = path.with_extension("json");
    let cfg = if beside.is_file() {
        read_json::<ClassifierConfig>(&beside)?
    } else {
        let a = arch.ok_or_else(|| Error::Config {
            field: "arch".into(),
            msg: format!(
                "{} has no {} beside it; name its architecture with --arch ({})",
                path.display(),
                beside.display(),
                ClassifierConfig::PRESETS.join(", ")
            ),
        })?;
        ClassifierConfig::preset(a, 2)?
    };
    cfg.validate()?;
    Ok((Some(path), cfg))
}
