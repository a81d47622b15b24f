//! One task's ONNX Runtime sessions: a bounded pool (each session its own engine, so no
//! lock is shared between sessions), an async semaphore handing sessions out, and admission
//! control: at most `sessions + queue` requests of the task are admitted at once (reading
//! their body, waiting for a session or running); the next one is answered 503 at once.
//! Admitting before the body is read bounds the memory the task's bodies can hold to
//! `(sessions + queue) × --max-body-bytes`.

use crate::error::{Error, Result};
use crate::infer::engine::{Engine, OrtEngine};
use crate::infer::prompted::PromptedOrtEngine;
use crate::infer::runtime::OrtModel;
use crate::progress::Observer;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One session of a task: a prompt-free graph, or an image encoder + prompted decoder pair.
#[derive(Debug)]
pub enum TaskEngine {
    PromptFree(OrtEngine),
    Prompted(PromptedOrtEngine),
}

impl TaskEngine {
    /// Load `model`: an image encoder (output `image_embeddings`) whose `<stem>_decoder.onnx`
    /// lies beside it is a prompted pair; anything else must be a prompt-free graph.
    pub fn load(
        model: &Path,
        threads: usize,
        ort_lib: Option<&Path>,
        obs: &mut dyn Observer,
    ) -> Result<TaskEngine> {
        let lib = crate::infer::runtime::ensure_with(ort_lib, true, &mut |l| {
            obs.event(crate::progress::Event::Info(l.to_string()))
        })?;
        let m = OrtModel::load_with(model, threads, Some(&lib))?;
        if m.outputs.iter().any(|o| o.name == "image_embeddings") {
            let dpath = PromptedOrtEngine::decoder_path(model);
            if !dpath.is_file() {
                return Err(Error::io(
                    &dpath,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("the prompted decoder of {} is missing", model.display()),
                    ),
                ));
            }
            let d = OrtModel::load_with(&dpath, threads, Some(&lib))?;
            return Ok(TaskEngine::Prompted(PromptedOrtEngine::from_models(
                m, d, threads,
            )?));
        }
        Ok(TaskEngine::PromptFree(OrtEngine::from_model(m, threads)?))
    }

    pub fn input_size(&self) -> usize {
        match self {
            TaskEngine::PromptFree(e) => e.input_size(),
            TaskEngine::Prompted(e) => e.input_size(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TaskEngine::PromptFree(e) => e.describe(),
            TaskEngine::Prompted(e) => e.describe(),
        }
    }

    pub fn is_prompted(&self) -> bool {
        matches!(self, TaskEngine::Prompted(_))
    }
}

/// A task's pool of sessions.
pub struct TaskPool {
    pub name: String,
    pub model: PathBuf,
    engines: Vec<TaskEngine>,
    free: Mutex<Vec<usize>>,
    sessions: Arc<Semaphore>,
    admitted: AtomicUsize,
    running: AtomicUsize,
    queue: usize,
    threads: usize,
}

impl std::fmt::Debug for TaskPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskPool")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("sessions", &self.engines.len())
            .field("queue", &self.queue)
            .finish()
    }
}

/// A request's place in its task (see the module docs); released on drop.
#[derive(Debug)]
pub struct Admission {
    pool: Arc<TaskPool>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.pool.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One session, held until dropped.
pub struct SessionGuard {
    pool: Arc<TaskPool>,
    index: usize,
    _permit: OwnedSemaphorePermit,
}

impl SessionGuard {
    pub fn engine(&self) -> &TaskEngine {
        // `index` came from the pool's own free list, so it is in range.
        &self.pool.engines[self.index]
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut f) = self.pool.free.lock() {
            f.push(self.index);
        }
        self.pool.running.fetch_sub(1, Ordering::AcqRel);
        // the permit is released after this, when `_permit` drops
    }
}

impl TaskPool {
    /// Load `sessions` sessions of `model` with `threads` intra-op threads each; all must have
    /// the same input size (they do: one file).
    pub fn load(
        name: &str,
        model: &Path,
        sessions: usize,
        queue: usize,
        threads: usize,
        ort_lib: Option<&Path>,
        obs: &mut dyn Observer,
    ) -> Result<TaskPool> {
        if sessions == 0 {
            return Err(Error::Config {
                field: "sessions".into(),
                msg: "must be at least 1".into(),
            });
        }
        let mut engines = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let e = TaskEngine::load(model, threads, ort_lib, obs)
                .map_err(|e| Error::msg(format!("task `{name}`: {e}")))?;
            engines.push(e);
        }
        Ok(TaskPool {
            name: name.to_string(),
            model: model.to_path_buf(),
            free: Mutex::new((0..sessions).rev().collect()),
            sessions: Arc::new(Semaphore::new(sessions)),
            engines,
            admitted: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            queue,
            threads,
        })
    }

    /// Admit one more request, or `None` when `sessions + queue` are already admitted.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let cap = self.engines.len().saturating_add(self.queue);
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission { pool: self.clone() })
    }

    /// Wait for a free session.
    pub async fn session(self: &Arc<Self>) -> Result<SessionGuard> {
        let permit = self
            .sessions
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::msg(format!("task `{}`: session pool closed", self.name)))?;
        let index = self
            .free
            .lock()
            .map_err(|_| Error::msg("session pool lock poisoned"))?
            .pop()
            .ok_or_else(|| Error::msg(format!("task `{}`: no free session", self.name)))?;
        self.running.fetch_add(1, Ordering::AcqRel);
        Ok(SessionGuard {
            pool: self.clone(),
            index,
            _permit: permit,
        })
    }

    pub fn sessions(&self) -> usize {
        self.engines.len()
    }

    pub fn queue(&self) -> usize {
        self.queue
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The model's square input size.
    pub fn input_size(&self) -> usize {
        self.engines.first().map_or(0, |e| e.input_size())
    }

    /// True for an image encoder + prompted decoder pair.
    pub fn is_prompted(&self) -> bool {
        self.engines.first().is_some_and(|e| e.is_prompted())
    }

    /// One line describing the model (first session).
    pub fn describe(&self) -> String {
        self.engines
            .first()
            .map_or_else(String::new, |e| e.describe())
    }

    /// Requests running on a session now.
    pub fn in_flight(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Admitted requests not running yet (reading their body or waiting for a session).
    pub fn queued(&self) -> usize {
        self.admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.in_flight())
    }
}
