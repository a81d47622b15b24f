//! Where a wheel-installed `gps-seg` finds what the wheel brought (`pip install gps-seg`,
//! `uv tool install gps-seg`; `pyproject.toml`). pip and uv put the binary in `<prefix>/bin/`
//! and the wheel's data files under `<prefix>/` — a venv, conda, `sys.prefix`,
//! `pip install --user` (`~/.local`) and `uv tool` (its own venv, linked from `~/.local/bin`)
//! alike — so both are found relative to the executable: the shipped models in
//! [`shipped_model_dirs`], the `onnxruntime` wheel's library by
//! [`crate::infer::runtime::wheel_candidates`]. A cargo build (`target/release/gps-seg`) has
//! none of these folders, and keeps its own search unchanged.

use std::path::{Path, PathBuf};

/// Folder of the shipped models inside an environment prefix (the wheel's
/// `gps_seg-<version>.data/data/share/gps-seg/sam/`).
pub const SHIPPED_MODELS: &str = "share/gps-seg/sam";

/// The prefixes of the Python environment `exe` may have been installed into: the folder above
/// its `bin/`, for the path as given and for the path with symbolic links resolved (`uv tool` and
/// pipx link `~/.local/bin/gps-seg` to their own venv's `bin/`). Deduplicated, in that order.
pub fn env_prefixes(exe: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let resolved = std::fs::canonicalize(exe).ok();
    for e in std::iter::once(exe).chain(resolved.as_deref()) {
        if let Some(prefix) = e.parent().and_then(Path::parent) {
            if !out.iter().any(|p| p == prefix) {
                out.push(prefix.to_path_buf());
            }
        }
    }
    out
}

/// The existing [`SHIPPED_MODELS`] folders of `exe`'s environment prefixes.
pub fn shipped_model_dirs(exe: &Path) -> Vec<PathBuf> {
    env_prefixes(exe)
        .into_iter()
        .map(|p| p.join(SHIPPED_MODELS))
        .filter(|d| d.is_dir())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_shipped_models_follow_the_executable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let venv = root.join("tools/gps-seg");
        let exe = venv.join("bin/gps-seg");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"").unwrap();
        assert_eq!(env_prefixes(&exe), vec![venv.clone()]);
        assert!(shipped_model_dirs(&exe).is_empty());
        let models = venv.join(SHIPPED_MODELS);
        std::fs::create_dir_all(&models).unwrap();
        assert_eq!(shipped_model_dirs(&exe), vec![models.clone()]);
        // A link in ~/.local/bin (uv tool, pipx): both prefixes, the link's first.
        let bin = root.join("home/.local/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let link = bin.join("gps-seg");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        assert_eq!(
            env_prefixes(&link),
            vec![root.join("home/.local"), venv.clone()]
        );
        assert_eq!(shipped_model_dirs(&link), vec![models]);
    }
}
