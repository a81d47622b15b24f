//! ONNX Runtime provisioning and sessions.
//!
//! `libonnxruntime.so` (1.31.x, from PyPI's `onnxruntime` wheel) is located in a fixed,
//! reported order — see [`search_order`]; a wheel-installed `gps-seg` finds the `onnxruntime`
//! wheel installed beside it in the same Python environment ([`wheel_candidates`]) — and loaded with `ort::init_from` on an explicit,
//! existing path, so `ort` never falls back to its own (panicking) search. One ONNX Runtime
//! environment exists per process ([`environment`], a `static OnceLock`). [`fetch`] downloads
//! the pinned wheel with pip, checks its SHA-256 and extracts the library into the cache.

use crate::error::{Error, Result};
use ort::session::Session;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// ONNX Runtime version gps-seg is built against (ort's `api-31`).
pub const ORT_VERSION: &str = "1.31.1";
/// The wheel `fetch` downloads and its pinned SHA-256 (checked once on 2026-11-29).
pub const WHEEL_NAME: &str = "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl";
pub const WHEEL_SHA256: &str = "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f";
/// The library's path inside the wheel.
pub const WHEEL_MEMBER: &str = "onnxruntime/capi/libonnxruntime.so.1.31.1";
/// File names tried in each folder.
const LIB_NAMES: [&str; 2] = ["libonnxruntime.so", "libonnxruntime.so.1.31.1"];

/// One place searched for the library.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Where this candidate comes from (`--ort-lib`, `ORT_DYLIB_PATH`, ...).
    pub source: String,
    pub path: PathBuf,
    pub exists: bool,
}

/// The project cache folder: `$GPS_SEG_CACHE`, else `$XDG_CACHE_HOME/gps-seg`, else
/// `~/.cache/gps-seg`.
pub fn cache_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = nonempty("GPS_SEG_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = nonempty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("gps-seg"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".cache").join("gps-seg"))
}

/// Folder inside the cache holding the library.
pub fn cache_lib_dir() -> Option<PathBuf> {
    cache_dir().map(|c| c.join(format!("onnxruntime-{ORT_VERSION}")))
}

/// Source name of the [`wheel_candidates`] in [`search_order`].
pub const SOURCE_WHEEL: &str = "installed onnxruntime wheel";

/// Where the pinned `onnxruntime` wheel puts the library in the environment of a wheel-installed
/// `exe`: `<prefix>/{lib,lib64}/python3.*/{site,dist}-packages/` + [`WHEEL_MEMBER`]
/// (`onnxruntime/capi/libonnxruntime.so.1.31.1`), for each of
/// [`crate::util::install::env_prefixes`]. Only the exact versioned name
/// counts (another onnxruntime version is never taken). Returns the existing files (each file
/// once, prefixes and Python versions in order), or —
/// when there is none — the venv pattern itself (not a file), so the search order shows it.
pub fn wheel_candidates(exe: &Path) -> Vec<PathBuf> {
    let member = Path::new(WHEEL_MEMBER);
    let mut found = Vec::new();
    // The same file reached twice (a venv's `lib64` is a link to `lib`) is listed once.
    let mut seen = Vec::new();
    let prefixes = crate::util::install::env_prefixes(exe);
    for prefix in &prefixes {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else {
                continue;
            };
            let mut pythons: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3."))
                .map(|e| e.path())
                .collect();
            pythons.sort();
            for py in pythons {
                for packages in ["site-packages", "dist-packages"] {
                    let p = py.join(packages).join(member);
                    let Ok(real) = std::fs::canonicalize(&p) else {
                        continue;
                    };
                    if p.is_file() && !seen.contains(&real) {
                        seen.push(real);
                        found.push(p);
                    }
                }
            }
        }
    }
    if found.is_empty() {
        if let Some(prefix) = prefixes.first() {
            found.push(prefix.join("lib/python3.*/site-packages").join(member));
        }
    }
    found
}

/// The search order, first match wins: explicit path (`--ort-lib`), `ORT_DYLIB_PATH`, the
/// `onnxruntime` wheel installed in the executable's Python environment ([`wheel_candidates`]),
/// beside the executable, the project cache, the repository's `.ort/` folder.
pub fn search_order(explicit: Option<&Path>) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |source: &str, path: PathBuf| {
        let exists = path.is_file();
        out.push(Candidate {
            source: source.into(),
            path,
            exists,
        });
    };
    let in_dir = |dir: &Path| LIB_NAMES.iter().map(|n| dir.join(n)).collect::<Vec<_>>();
    if let Some(p) = explicit {
        push("--ort-lib", p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        push("ORT_DYLIB_PATH", PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok();
    for p in exe.iter().flat_map(|e| wheel_candidates(e)) {
        push(SOURCE_WHEEL, p);
    }
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        for p in in_dir(dir) {
            push("beside the executable", p);
        }
    }
    if let Some(dir) = cache_lib_dir() {
        for p in in_dir(&dir) {
            push("project cache", p);
        }
    }
    for p in in_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".ort")) {
        push("repository .ort/", p);
    }
    out
}

/// The first existing candidate, or an error listing every place searched and how to get it.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    let order = search_order(explicit);
    // An explicit path that does not exist is an error by itself (never silently skipped).
    if let Some(c) = order.first() {
        if c.source == "--ort-lib" && !c.exists {
            return Err(Error::Onnx(format!(
                "--ort-lib {}: no such file",
                c.path.display()
            )));
        }
    }
    if let Some(c) = order.iter().find(|c| c.exists) {
        return Ok(c.path.clone());
    }
    Err(not_found(&order))
}

fn not_found(order: &[Candidate]) -> Error {
    let mut msg =
        format!("ONNX Runtime {ORT_VERSION} library (libonnxruntime.so) not found. Looked in:\n");
    for c in order {
        msg.push_str(&format!("  - {} ({})\n", c.path.display(), c.source));
    }
    msg.push_str(
        "Get it with `gps-seg runtime fetch` (downloads PyPI's onnxruntime wheel with pip into the cache), \
         or pass --ort-lib / set ORT_DYLIB_PATH to an existing libonnxruntime.so 1.31.x.",
    );
    Error::Onnx(msg)
}

/// Download the pinned `onnxruntime` wheel with pip, verify its SHA-256 and extract the
/// library into [`cache_lib_dir`] (temp file + rename). `report` receives one line per step.
/// Returns the library path.
pub fn fetch(report: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = cache_lib_dir().ok_or_else(|| {
        Error::Onnx("no cache folder: set GPS_SEG_CACHE, XDG_CACHE_HOME or HOME".into())
    })?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = dir.join(format!(".download.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fetch_into(&dir, &tmp, report);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn fetch_into(dir: &Path, tmp: &Path, report: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    report(&format!(
        "downloading onnxruntime=={ORT_VERSION} (manylinux_2_28_x86_64, cp311) with pip into {}",
        tmp.display()
    ));
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.11",
            "-d",
        ])
        .arg(tmp)
        .arg(format!("onnxruntime=={ORT_VERSION}"))
        .output()
        .map_err(|e| {
            Error::Onnx(format!(
                "cannot run `python3 -m pip` ({e}); install Python 3 with pip"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Onnx(format!(
            "pip download failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let wheel = tmp.join(WHEEL_NAME);
    let bytes = std::fs::read(&wheel).map_err(|e| Error::io(&wheel, e))?;
    report(&format!(
        "downloaded {} ({} bytes)",
        WHEEL_NAME,
        bytes.len()
    ));
    let sha = format!("{:x}", Sha256::digest(&bytes));
    if sha != WHEEL_SHA256 {
        return Err(Error::Onnx(format!(
            "{}: SHA-256 {sha} does not match the pinned {WHEEL_SHA256}; refusing to use it",
            wheel.display()
        )));
    }
    report(&format!("sha256 verified: {sha}"));
    let lib = extract_member(&bytes, &wheel, WHEEL_MEMBER)?;
    let dest = dir.join("libonnxruntime.so");
    crate::util::fs::write_atomic(&dest, &lib)?;
    report(&format!(
        "extracted {WHEEL_MEMBER} ({} bytes) to {}",
        lib.len(),
        dest.display()
    ));
    Ok(dest)
}

fn extract_member(zip_bytes: &[u8], wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let bad = |m: String| Error::Checkpoint {
        path: wheel.to_path_buf(),
        msg: m,
    };
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes))
        .map_err(|e| bad(format!("not a zip file: {e}")))?;
    let mut f = z
        .by_name(member)
        .map_err(|e| bad(format!("no member `{member}`: {e}")))?;
    let mut out = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut out)
        .map_err(|e| bad(format!("cannot read `{member}`: {e}")))?;
    Ok(out)
}

/// Locate the library, fetching it first when missing and `auto_fetch` is set.
pub fn ensure(explicit: Option<&Path>, auto_fetch: bool) -> Result<PathBuf> {
    ensure_with(explicit, auto_fetch, &mut |line| tracing::info!("{line}"))
}

/// As [`ensure`], sending the fetch notice and [`fetch`]'s progress lines to `report`.
/// An explicit path is never replaced by a fetched one.
pub fn ensure_with(
    explicit: Option<&Path>,
    auto_fetch: bool,
    report: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    match locate(explicit) {
        Ok(p) => Ok(p),
        Err(e) if auto_fetch && explicit.is_none() => {
            let dest = cache_lib_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "the project cache".into());
            report(&format!(
                "ONNX Runtime {ORT_VERSION} not found; fetching it from PyPI into {dest} (once)"
            ));
            fetch(report).map_err(|f| Error::Onnx(format!("{e}\nautomatic fetch failed: {f}")))
        }
        Err(e) => Err(e),
    }
}

static ENV: OnceLock<(ort::environment::Environment, PathBuf)> = OnceLock::new();
static ENV_INIT: Mutex<()> = Mutex::new(());

/// The process's ONNX Runtime environment, created on first success from
/// [`locate`]`(explicit)`; a failure is not remembered (fetch, then try again). Later calls
/// return the same environment and library path whatever `explicit` says (ONNX Runtime
/// allows one environment per process). A library that makes `ort` panic (e.g. a version
/// older than 1.31) is reported as an error.
pub fn environment(
    explicit: Option<&Path>,
) -> Result<(&'static ort::environment::Environment, &'static Path)> {
    if let Some((env, lib)) = ENV.get() {
        return Ok((env, lib.as_path()));
    }
    let _guard = ENV_INIT
        .lock()
        .map_err(|_| Error::Onnx("ONNX Runtime initialisation lock poisoned".into()))?;
    if let Some((env, lib)) = ENV.get() {
        return Ok((env, lib.as_path()));
    }
    let lib = locate(explicit)?;
    let created = std::panic::catch_unwind(|| -> std::result::Result<_, String> {
        let builder =
            ort::init_from(&lib).map_err(|e| format!("cannot load {}: {e}", lib.display()))?;
        builder.with_name("gps-seg").build().map_err(|e| {
            format!(
                "cannot create the ONNX Runtime environment from {}: {e}",
                lib.display()
            )
        })
    });
    let env = match created {
        Ok(Ok(env)) => env,
        Ok(Err(m)) => return Err(Error::Onnx(m)),
        Err(_) => {
            return Err(Error::Onnx(format!(
                "{}: ONNX Runtime refused this library (gps-seg needs {ORT_VERSION}.x; \
                 `gps-seg runtime fetch` gets it)",
                lib.display()
            )))
        }
    };
    let _ = ENV.set((env, lib));
    ENV.get()
        .map(|(e, l)| (e, l.as_path()))
        .ok_or_else(|| Error::Onnx("ONNX Runtime environment not stored".into()))
}

/// Create a session on `model` with every graph optimisation ONNX Runtime applies by default
/// and write the optimized model it runs to `out` (for inspecting what ORT folded and fused).
/// Returns the session creation time in seconds.
pub fn write_optimized(model: &Path, out: &Path) -> Result<f64> {
    let (env, _) = environment(None)?;
    let err = |e: String| Error::Onnx(format!("{}: {e}", model.display()));
    let t = std::time::Instant::now();
    let b = Session::builder(env)
        .map_err(|e| err(e.to_string()))?
        .with_intra_threads(1)
        .map_err(|e| err(e.to_string()))?
        .with_optimized_model_path(out)
        .map_err(|e| err(e.to_string()))?;
    let session = {
        let mut b = b;
        b.commit_from_file(model)
    }
    .map_err(|e| err(e.to_string()))?;
    let secs = t.elapsed().as_secs_f64();
    drop(session);
    Ok(secs)
}

/// Op types (with counts) of the graph ONNX Runtime actually runs for `model_path`: its
/// optimized model, written to a temp folder by [`write_optimized`] and read back. The check
/// that a task file's ScatterND nodes were folded into plain weights.
pub fn optimized_ops(model_path: &Path) -> Result<std::collections::BTreeMap<String, usize>> {
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    optimized_ops_at(model_path, &dir.path().join("optimized.onnx"))
}

/// [`optimized_ops`], keeping the optimized model at `out` ([`write_optimized`]).
pub fn optimized_ops_at(
    model_path: &Path,
    out: &Path,
) -> Result<std::collections::BTreeMap<String, usize>> {
    write_optimized(model_path, out)?;
    let m = crate::onnx::read_model(out)?;
    let mut ops = std::collections::BTreeMap::new();
    for n in m.graph.iter().flat_map(|g| g.node.iter()) {
        *ops.entry(n.op_type.clone()).or_insert(0usize) += 1;
    }
    Ok(ops)
}

/// A graph input or output: name, element type and shape (`-1` = dynamic, e.g. batch).
#[derive(Debug, Clone, PartialEq)]
pub struct IoInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

impl std::fmt::Display for IoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|&d| if d < 0 { "?".into() } else { d.to_string() })
            .collect();
        write!(f, "{} {}[{}]", self.name, self.dtype, dims.join(", "))
    }
}

pub(crate) fn io_infos(outlets: &[ort::value::Outlet]) -> Vec<IoInfo> {
    outlets
        .iter()
        .map(|o| IoInfo {
            name: o.name().to_string(),
            dtype: o
                .dtype()
                .tensor_type()
                .map(|t| format!("{t:?}").to_lowercase())
                .unwrap_or_else(|| "non-tensor".into()),
            shape: o
                .dtype()
                .tensor_shape()
                .map(|s| s.to_vec())
                .unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_is_fixed_and_missing_explicit_path_is_an_error() {
        let order = search_order(Some(Path::new("/nonexistent/libonnxruntime.so")));
        let sources: Vec<&str> = order.iter().map(|c| c.source.as_str()).collect();
        assert_eq!(sources[0], "--ort-lib");
        let pos = |s: &str| sources.iter().position(|x| *x == s);
        assert!(pos(SOURCE_WHEEL).is_some());
        assert!(pos(SOURCE_WHEEL) < pos("beside the executable"));
        assert!(pos("beside the executable") < pos("project cache"));
        assert!(pos("project cache") < pos("repository .ort/"));
        let e = locate(Some(Path::new("/nonexistent/libonnxruntime.so")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/libonnxruntime.so"), "{e}");
        let msg = not_found(&order).to_string();
        assert!(msg.contains("gps-seg runtime fetch") && msg.contains("repository .ort/"));
    }

    /// Write an empty file at `p`, creating its folders.
    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn wheel_candidates_find_the_library_in_the_executables_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let member = Path::new(WHEEL_MEMBER);
        // A venv (also `sys.prefix`, conda, `pip install --user` into ~/.local).
        let venv = root.join("venv");
        let exe = venv.join("bin/gps-seg");
        touch(&exe);
        let pattern = venv.join("lib/python3.*/site-packages").join(member);
        assert_eq!(wheel_candidates(&exe), vec![pattern.clone()]);
        assert!(!pattern.is_file());
        // Another onnxruntime version in the same environment is never taken.
        touch(&venv.join("lib/python3.12/site-packages/onnxruntime/capi/libonnxruntime.so.1.22.0"));
        assert_eq!(wheel_candidates(&exe), vec![pattern]);
        let lib = venv.join("lib/python3.12/site-packages").join(member);
        touch(&lib);
        assert_eq!(wheel_candidates(&exe), vec![lib.clone()]);
        // Debian's system pip (dist-packages) and lib64 platlib layouts.
        let sys = root.join("usr-local");
        let deb = sys.join("lib/python3.11/dist-packages").join(member);
        let l64 = sys.join("lib64/python3.13t/site-packages").join(member);
        touch(&deb);
        touch(&l64);
        assert_eq!(wheel_candidates(&sys.join("bin/gps-seg")), vec![deb, l64]);
        // A venv's `lib64` links to `lib`: the library is listed once.
        std::os::unix::fs::symlink("lib", venv.join("lib64")).unwrap();
        assert_eq!(wheel_candidates(&exe), vec![lib.clone()]);
        // `uv tool` / pipx: ~/.local/bin/gps-seg links into the tool's own venv.
        let home_bin = root.join("home/.local/bin");
        std::fs::create_dir_all(&home_bin).unwrap();
        let link = home_bin.join("gps-seg");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        assert_eq!(wheel_candidates(&link), vec![lib]);
    }

    #[test]
    fn extract_member_reports_missing_member() {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            z.start_file("a/b.txt", zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut z, b"hello").unwrap();
            z.finish().unwrap();
        }
        let bytes = buf.into_inner();
        assert_eq!(
            extract_member(&bytes, Path::new("w.whl"), "a/b.txt").unwrap(),
            b"hello"
        );
        let e = extract_member(&bytes, Path::new("w.whl"), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("w.whl") && e.contains("`x`"), "{e}");
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    /// A bad explicit path is an error naming it (never an `ort` panic), and is not cached.
    #[test]
    fn environment_with_missing_library_is_an_error() {
        let p = Path::new("/nonexistent/dir/libonnxruntime.so");
        for _ in 0..2 {
            let e = environment(Some(p)).unwrap_err().to_string();
            assert!(e.contains("/nonexistent/dir/libonnxruntime.so"), "{e}");
        }
    }
}
