//! File helpers.
//!
//! - Atomic writes: a uniquely named temp file in the target's folder (`tempfile`), fsync, rename,
//!   then fsync of the folder, so an interrupted run never leaves half a checkpoint, report or
//!   mask behind, and two writers of one path never share a temp file.
//! - [`IoPaths`]: the rule that an output path may never equal, contain or sit inside an input
//!   path of the same command (both canonicalised), checked before anything is written.
//! - [`atomic_dir`]: a folder built under a temp name and renamed into place when complete.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a folder so that a rename inside it survives a crash (best effort where the platform
/// cannot open folders).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        f.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Write `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Write to `path` atomically with a writer callback. The temp file has a unique name in the
/// same folder (removed on any failure); the folder is created when missing.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let parent = parent_of(path);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    write(tmp.as_file_mut())
        .and_then(|()| set_usual_mode(tmp.as_file(), path, 0o644))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(parent)
}

/// Temp files are created private (0600); the file that replaces `dest` gets `dest`'s mode, or
/// `new_mode` (what a plain `File::create` gives under the usual umask) when it is new.
pub fn set_usual_mode(f: &std::fs::File, dest: &Path, new_mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(new_mode);
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (f, dest, new_mode);
    Ok(())
}

/// Build a folder atomically: `fill` writes into a fresh temp folder beside `dest`, which is
/// renamed to `dest` only when `fill` succeeded (the temp folder is removed otherwise). `dest`
/// must not exist: replacing a folder is the caller's explicit decision, never done here.
pub fn atomic_dir<T>(dest: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if dest.exists() {
        return Err(Error::io(
            dest,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
        ));
    }
    let parent = parent_of(dest);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    let out = fill(tmp.path())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp_path);
        Error::io(dest, e)
    })?;
    sync_dir(parent)?;
    Ok(out)
}

/// `path` made absolute and free of `.`/`..` and symbolic links as far as it exists; the part
/// that does not exist yet is appended lexically. Two spellings of one file compare equal.
pub fn canonical_lenient(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    // Find the longest existing prefix, canonicalise it, then add the rest lexically.
    let comps: Vec<Component> = abs.components().collect();
    for cut in (0..=comps.len()).rev() {
        let head: PathBuf = comps[..cut].iter().collect();
        if let Ok(c) = head.canonicalize() {
            let mut out = c;
            for comp in &comps[cut..] {
                match comp {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
    }
    abs
}

/// The inputs and outputs of one command, each with the flag (or role) that named it, so that an
/// output can be checked against every input before anything is written.
#[derive(Debug, Default, Clone)]
pub struct IoPaths {
    inputs: Vec<(String, PathBuf)>,
    outputs: Vec<(String, PathBuf)>,
}

impl IoPaths {
    pub fn new() -> Self {
        Self::default()
    }

    /// A file or folder the command reads (`what` names it in errors, e.g. `--base`).
    pub fn input(mut self, what: &str, path: impl AsRef<Path>) -> Self {
        self.inputs.push((what.into(), path.as_ref().to_path_buf()));
        self
    }

    /// An input that may be absent (nothing to protect when `None`).
    pub fn input_opt(self, what: &str, path: Option<impl AsRef<Path>>) -> Self {
        match path {
            Some(p) => self.input(what, p),
            None => self,
        }
    }

    /// A file or folder the command writes.
    pub fn output(mut self, what: &str, path: impl AsRef<Path>) -> Self {
        self.outputs
            .push((what.into(), path.as_ref().to_path_buf()));
        self
    }

    /// Refuse when any output equals, contains or lies inside any input (canonicalised); the
    /// error names both flags and both paths.
    pub fn check(&self) -> Result<()> {
        for (ow, op) in &self.outputs {
            let oc = canonical_lenient(op);
            for (iw, ip) in &self.inputs {
                let ic = canonical_lenient(ip);
                let how = if oc == ic {
                    "is the same path as"
                } else if ic.starts_with(&oc) {
                    "contains"
                } else if oc.starts_with(&ic) {
                    "lies inside"
                } else {
                    continue;
                };
                return Err(Error::Msg(format!(
                    "refusing to write: output {ow} {} {how} input {iw} {} \
                     (an output may never equal, contain or sit inside an input; choose another {ow})",
                    op.display(),
                    ip.display()
                )));
            }
        }
        Ok(())
    }
}

/// Serialise `value` as pretty JSON and write it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value)
        .map_err(|e| Error::msg(format!("{}: cannot serialise JSON: {e}", path.display())))?;
    write_atomic(path, s.as_bytes())
}

/// Read and parse a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })
}

/// `path` must be an existing folder; else an error naming it and `what` it should be.
pub fn require_dir(path: &Path, what: &str) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    Err(Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{what} not found")),
    ))
}

/// `path` must be an existing file; else an error naming it and `what` it should be.
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{what} not found")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1);
    }

    #[test]
    fn concurrent_atomic_writes_of_one_path_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("same.bin");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = p.clone();
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(&p, &[t; 4096]).unwrap();
                    }
                });
            }
        });
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 4096);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode, 0o644,
                "a new file is readable like a File::create one"
            );
        }
        assert!(b.iter().all(|&x| x == b[0]), "a write was interleaved");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn outputs_may_not_touch_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data/images")).unwrap();
        std::fs::write(d.join("base.safetensors"), b"x").unwrap();
        let io = |out: PathBuf| {
            IoPaths::new()
                .input("--images", d.join("data/images"))
                .input("--base", d.join("base.safetensors"))
                .output("--out", out)
                .check()
        };
        // equal (through another spelling), containing, inside
        let e = io(d.join("data/./images/../images"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("same path") && e.contains("--images") && e.contains("--out"),
            "{e}"
        );
        assert!(io(d.join("data"))
            .unwrap_err()
            .to_string()
            .contains("contains"));
        let e = io(d.join("data/images/preds")).unwrap_err().to_string();
        assert!(e.contains("lies inside"), "{e}");
        assert!(io(d.join("base.safetensors")).is_err());
        // siblings and fresh folders are fine
        io(d.join("data/preds")).unwrap();
        io(d.join("merged.safetensors")).unwrap();
        io(d.join("data/images-preds")).unwrap();
    }

    #[test]
    fn atomic_dir_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("set");
        let r: Result<()> = atomic_dir(&dest, |t| {
            std::fs::write(t.join("a"), b"1").unwrap();
            Err(Error::msg("interrupted"))
        });
        assert!(r.is_err());
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp folder left"
        );
        atomic_dir(&dest, |t| {
            std::fs::write(t.join("a"), b"1").map_err(|e| Error::io(t, e))
        })
        .unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"1");
        assert!(
            atomic_dir(&dest, |_| Ok(())).is_err(),
            "an existing folder is never replaced"
        );
    }
}
