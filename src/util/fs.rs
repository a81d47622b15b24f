//! File helpers.
//!
//! - Atomic writes: a uniquely named temp file in the target's folder (`tempfile`), fsync, rename,
//!   then fsync of the folder, so an interrupted run never leaves half a checkpoint, report or
//!   mask behind, and two writers of one path never share a temp file.
//! - [`IoPaths`]: the rule that an output path may never equal, contain or sit inside an input
//!   path of the same command (both canonicalised), checked before anything is written.
//! - [`atomic_dir`]: a folder built under a temp name and renamed into place when complete.
//! - [`IoPaths::enforce`]: the same rule per file written, for the rest of the command: every
//!   write through this module first resolves the file's path (symbolic links included) and
//!   refuses one that lands on, in or around an input, and refuses to replace a file this
//!   command did not create unless the command was given `--overwrite`.
//! - [`FolderLock`]: an advisory `flock` on a folder, so that two gps-seg processes writing
//!   into one folder (two exports of one base or one `--out`) take turns.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// The folder `path` lies in (`.` for a bare file name).
pub fn parent_of(path: &Path) -> &Path {
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
    let _lock = locked(parent)?;
    guard_write(path)?;
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
    guard_created(path);
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
    guard_write(dest)?;
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
    guard_created(dest);
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
    /// Files the command may replace without `--overwrite` (its own derived files, e.g. a
    /// run's `model.onnx` re-exported when older than the run's weights).
    replaceable: Vec<PathBuf>,
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

    /// A file the command may replace without `--overwrite` (see [`IoPaths::enforce`]).
    pub fn replaceable(mut self, path: impl AsRef<Path>) -> Self {
        self.replaceable.push(path.as_ref().to_path_buf());
        self
    }

    /// [`IoPaths::check`], then the same rule per file for the rest of this process (one
    /// command): every later write through this module ([`write_atomic_with`], [`atomic_dir`],
    /// an ONNX model and its data) resolves its own path, symbolic links included, and is
    /// refused when it equals, contains or lies inside an input; a file that exists and was
    /// not created by this command is replaced only when `overwrite` (the command's
    /// `--overwrite`) or when named by [`IoPaths::replaceable`].
    pub fn enforce(&self, overwrite: bool) -> Result<()> {
        self.check()?;
        let guard = OutputGuard {
            inputs: self
                .inputs
                .iter()
                .map(|(w, p)| (w.clone(), canonical_lenient(p)))
                .collect(),
            overwrite,
            replaceable: self
                .replaceable
                .iter()
                .map(|p| canonical_lenient(p))
                .collect(),
            created: Mutex::new(HashSet::new()),
        };
        if let Ok(mut g) = GUARD.write() {
            *g = Some(Arc::new(guard));
        }
        Ok(())
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

/// The per-file output rule of the running command (see [`IoPaths::enforce`]).
#[derive(Debug)]
struct OutputGuard {
    /// Canonical inputs with the flag that named them.
    inputs: Vec<(String, PathBuf)>,
    overwrite: bool,
    replaceable: Vec<PathBuf>,
    /// Canonical paths this command created (it may replace them again).
    created: Mutex<HashSet<PathBuf>>,
}

static GUARD: RwLock<Option<Arc<OutputGuard>>> = RwLock::new(None);

fn current_guard() -> Option<Arc<OutputGuard>> {
    GUARD.read().ok().and_then(|g| g.clone())
}

/// Check one file (or folder) about to be written against the command's output rule (no-op
/// when no command installed one with [`IoPaths::enforce`]). Called by every writer here.
pub fn guard_write(path: &Path) -> Result<()> {
    let Some(g) = current_guard() else {
        return Ok(());
    };
    let c = canonical_lenient(path);
    for (what, ic) in &g.inputs {
        let how = if &c == ic {
            "is"
        } else if c.starts_with(ic) {
            "lies inside"
        } else if ic.starts_with(&c) {
            "contains"
        } else {
            continue;
        };
        return Err(Error::Msg(format!(
            "refusing to write {}: it resolves to {}, which {how} input {what} {} (a symbolic \
             link on the way?); an output may never equal, contain or sit inside an input",
            path.display(),
            c.display(),
            ic.display()
        )));
    }
    if std::fs::symlink_metadata(path).is_ok() && !g.overwrite && !g.replaceable.contains(&c) {
        let mine = g.created.lock().map(|s| s.contains(&c)).unwrap_or(false);
        if !mine {
            return Err(Error::Msg(format!(
                "refusing to replace {}: it exists and was not written by this command; pass \
                 --overwrite to replace it, or choose another output",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The folder lock a command's writes take (see [`FolderLock`]); none for a library caller
/// that installed no output rule (training rewrites its own run files many times a second).
pub fn locked(dir: &Path) -> Result<Option<FolderLock>> {
    if current_guard().is_none() {
        return Ok(None);
    }
    FolderLock::acquire(dir, &mut |m| tracing::info!("{m}")).map(Some)
}

/// Note that this command created `path` (it may write it again without `--overwrite`).
pub fn guard_created(path: &Path) {
    if let Some(g) = current_guard() {
        if let Ok(mut s) = g.created.lock() {
            s.insert(canonical_lenient(path));
        }
    }
}

/// An exclusive advisory lock (`flock`) on a folder, held until dropped: gps-seg processes
/// that write shared files into one folder (a base and its task files, one `--out`) take
/// turns. The lock is between processes: a second acquisition of a folder this process
/// already holds is granted at once (writers nest: an export that holds its base's folder
/// writes files through [`write_atomic_with`], which locks the same folder).
#[derive(Debug)]
pub struct FolderLock {
    key: PathBuf,
}

/// Folders this process holds: the open descriptor that holds the `flock`, and a count.
static HELD: Mutex<Vec<(PathBuf, std::fs::File, usize)>> = Mutex::new(Vec::new());

impl FolderLock {
    /// Lock `dir` (created when missing), waiting for another process if one holds it
    /// (reported once through `waiting`).
    pub fn acquire(dir: &Path, waiting: &mut dyn FnMut(&str)) -> Result<FolderLock> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let key = canonical_lenient(dir);
        let poisoned = || Error::msg("folder lock table poisoned");
        {
            let mut held = HELD.lock().map_err(|_| poisoned())?;
            if let Some(e) = held.iter_mut().find(|e| e.0 == key) {
                e.2 += 1;
                return Ok(FolderLock { key });
            }
        }
        let file = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            let fd = file.as_raw_fd();
            // SAFETY: `fd` is an open descriptor owned by `file`, which outlives the call.
            let r = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                waiting(&format!(
                    "waiting for another gps-seg process writing into {}",
                    dir.display()
                ));
                // SAFETY: as above.
                let r = unsafe { libc::flock(fd, libc::LOCK_EX) };
                if r != 0 {
                    return Err(Error::io(dir, std::io::Error::last_os_error()));
                }
            }
        }
        #[cfg(not(unix))]
        let _ = waiting;
        let mut held = HELD.lock().map_err(|_| poisoned())?;
        match held.iter_mut().find(|e| e.0 == key) {
            // Another thread of this process took it meanwhile: share its hold.
            Some(e) => e.2 += 1,
            None => held.push((key.clone(), file, 1)),
        }
        Ok(FolderLock { key })
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        if let Ok(mut held) = HELD.lock() {
            if let Some(i) = held.iter().position(|e| e.0 == self.key) {
                if let Some(e) = held.get_mut(i) {
                    e.2 = e.2.saturating_sub(1);
                    if e.2 == 0 {
                        // Closing the descriptor releases the flock.
                        held.swap_remove(i);
                    }
                }
            }
        }
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
