//! The tasks a server knows, loaded or not: `--task NAME=FILE` (loaded at start), every task
//! file in `--tasks-dir` (loaded on first use), tasks added or removed at run time
//! (`PUT` / `DELETE /v1/tasks/NAME`). Loading a task makes its [`TaskPool`]; beyond
//! `--max-loaded` loaded tasks the least recently used one is unloaded (its memory goes when
//! its last in-flight request ends). A task's first requests while it loads wait for the one
//! load (bounded by the request timeout); a request is never run with another task's weights:
//! each entry owns its pool, and a task file on a shared base carries its own tensors.

use super::pool::TaskPool;
use crate::error::{Error, Result};
use crate::progress::Observer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Where a task came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `--task NAME=FILE`.
    Flag,
    /// A task file found in `--tasks-dir`.
    Dir,
    /// `PUT /v1/tasks/NAME`.
    Put,
}

/// How a task's pool is built.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub sessions: usize,
    pub queue: usize,
    pub threads: usize,
    pub max_batch: usize,
    pub ort_lib: Option<PathBuf>,
    /// Task files run on their base held once per process ([`crate::infer::shared`]).
    pub shared: bool,
}

/// One known task.
pub struct Entry {
    pub name: String,
    pub file: PathBuf,
    pub source: Source,
    /// Bytes of the task file (and its `_decoder.onnx` for a prompted pair).
    pub file_bytes: u64,
    /// This server wrote the file (a `PUT` with a body): `DELETE` removes it too.
    pub wrote_file: bool,
    loaded: RwLock<Option<Arc<TaskPool>>>,
    loading: tokio::sync::Mutex<()>,
    last_used: AtomicU64,
    hits: AtomicU64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("source", &self.source)
            .finish()
    }
}

impl Entry {
    /// The task's pool when loaded.
    pub fn pool(&self) -> Option<Arc<TaskPool>> {
        self.loaded.read().ok().and_then(|g| g.clone())
    }

    /// Requests answered (or tried) for this task.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// The server's tasks.
#[derive(Debug)]
pub struct Registry {
    entries: RwLock<BTreeMap<String, Arc<Entry>>>,
    pub opts: PoolOptions,
    /// Most tasks loaded at once.
    pub max_loaded: usize,
    /// Where run-time tasks are stored and found (`--tasks-dir`).
    pub tasks_dir: Option<PathBuf>,
    clock: AtomicU64,
}

/// Most tasks a registry holds (loaded or not).
pub const MAX_TASKS: usize = 4096;

/// Bytes of a model file and its prompted decoder beside it.
fn task_bytes(p: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    len(p) + len(&crate::infer::PromptedOrtEngine::decoder_path(p))
}

impl Registry {
    pub fn new(opts: PoolOptions, max_loaded: usize, tasks_dir: Option<PathBuf>) -> Registry {
        Registry {
            entries: RwLock::new(BTreeMap::new()),
            opts,
            max_loaded: max_loaded.max(1),
            tasks_dir,
            clock: AtomicU64::new(0),
        }
    }

    fn poisoned() -> Error {
        Error::msg("task registry lock poisoned")
    }

    /// Add (or replace) a task; a replaced task is unloaded. Refused beyond [`MAX_TASKS`].
    pub fn add(
        &self,
        name: &str,
        file: &Path,
        source: Source,
        wrote_file: bool,
    ) -> Result<Arc<Entry>> {
        let e = Arc::new(Entry {
            name: name.to_string(),
            file: file.to_path_buf(),
            source,
            file_bytes: task_bytes(file),
            wrote_file,
            loaded: RwLock::new(None),
            loading: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        });
        let mut m = self.entries.write().map_err(|_| Self::poisoned())?;
        if !m.contains_key(name) && m.len() >= MAX_TASKS {
            return Err(Error::Config {
                field: "tasks".into(),
                msg: format!("{MAX_TASKS} tasks already; remove one first"),
            });
        }
        if let Some(old) = m.insert(name.to_string(), e.clone()) {
            if let Ok(mut l) = old.loaded.write() {
                *l = None;
            }
        }
        Ok(e)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries.read().ok().and_then(|m| m.get(name).cloned())
    }

    /// Forget a task (and unload it).
    pub fn remove(&self, name: &str) -> Result<Option<Arc<Entry>>> {
        let old = self
            .entries
            .write()
            .map_err(|_| Self::poisoned())?
            .remove(name);
        if let Some(e) = &old {
            if let Ok(mut l) = e.loaded.write() {
                *l = None;
            }
        }
        Ok(old)
    }

    /// Every task, by name.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// `names` as a short list for messages.
    pub fn names(&self) -> String {
        let all = self.entries();
        let mut s: Vec<String> = all
            .iter()
            .take(20)
            .map(|e| format!("`{}`", e.name))
            .collect();
        if all.len() > 20 {
            s.push(format!("… {} more", all.len() - 20));
        }
        s.join(", ")
    }

    /// The pools of the loaded tasks.
    pub fn loaded(&self) -> Vec<Arc<TaskPool>> {
        self.entries().iter().filter_map(|e| e.pool()).collect()
    }

    fn build(&self, e: &Entry, obs: &mut dyn Observer) -> Result<TaskPool> {
        let o = &self.opts;
        TaskPool::load(
            &e.name,
            &e.file,
            o.sessions,
            o.queue,
            o.threads,
            o.max_batch,
            o.ort_lib.as_deref(),
            o.shared,
            obs,
        )
    }

    fn touch(&self, e: &Entry) {
        e.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed) + 1,
            Ordering::Relaxed,
        );
    }

    /// Unload least recently used tasks beyond `max_loaded`, never `keep`.
    fn evict(&self, keep: &str) {
        loop {
            let loaded: Vec<Arc<Entry>> = self
                .entries()
                .into_iter()
                .filter(|e| e.pool().is_some())
                .collect();
            if loaded.len() <= self.max_loaded {
                return;
            }
            let victim = loaded
                .iter()
                .filter(|e| e.name != keep)
                .min_by_key(|e| e.last_used.load(Ordering::Relaxed))
                .cloned();
            let Some(victim) = victim else {
                return;
            };
            let unloaded = match victim.loaded.write() {
                Ok(mut l) => l.take().is_some(),
                Err(_) => false,
            };
            if !unloaded {
                return;
            }
        }
    }

    /// Load `e` now (blocking; at start for `--task`).
    pub fn load_now(&self, e: &Arc<Entry>, obs: &mut dyn Observer) -> Result<Arc<TaskPool>> {
        if let Some(p) = e.pool() {
            return Ok(p);
        }
        let p = Arc::new(self.build(e, obs)?);
        if let Ok(mut l) = e.loaded.write() {
            *l = Some(p.clone());
        }
        self.touch(e);
        self.evict(&e.name);
        Ok(p)
    }

    /// `e`'s pool, loading it on first use (one load; other requests wait for it).
    pub async fn pool(self: &Arc<Self>, e: &Arc<Entry>) -> Result<Arc<TaskPool>> {
        e.hits.fetch_add(1, Ordering::Relaxed);
        self.touch(e);
        if let Some(p) = e.pool() {
            return Ok(p);
        }
        let _one = e.loading.lock().await;
        if let Some(p) = e.pool() {
            return Ok(p);
        }
        let (reg, entry) = (self.clone(), e.clone());
        tokio::task::spawn_blocking(move || reg.load_now(&entry, &mut crate::progress::Silent))
            .await
            .map_err(|e| Error::msg(format!("loading a task failed: {e}")))?
    }
}

/// [`scan_dir`]'s answer: (name, file) of each task file, and the files skipped with why.
pub type DirScan = (Vec<(String, PathBuf)>, Vec<String>);

/// The task files of `dir`: every `*.onnx` whose metadata says `task` (a prompted pair's
/// `<stem>_decoder.onnx` belongs to `<stem>.onnx`), named by file stem; other files are left
/// alone. Names that are not valid task names are skipped and listed.
pub fn scan_dir(dir: &Path) -> Result<DirScan> {
    crate::util::fs::require_dir(dir, "--tasks-dir")?;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx") && p.is_file())
        .collect();
    paths.sort();
    for p in &paths {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(enc) = stem.strip_suffix("_decoder") {
            if dir.join(format!("{enc}.onnx")).is_file() {
                continue;
            }
        }
        if !super::pool::is_task_file(p) {
            continue;
        }
        match super::spec::TaskSpec::parse(&format!("{stem}={}", p.display())) {
            Ok(t) => found.push((t.name, t.model)),
            Err(e) => skipped.push(format!("{}: {e}", p.display())),
        }
        if found.len() >= MAX_TASKS {
            skipped.push(format!(
                "more than {MAX_TASKS} task files; the rest skipped"
            ));
            break;
        }
    }
    Ok((found, skipped))
}
