//! One task's ONNX Runtime sessions: a bounded pool (each session its own engine, so no
//! lock is shared between sessions), an async semaphore handing sessions out, and admission
//! control: at most `sessions + queue` requests of the task are admitted at once (reading
//! their body, waiting for a session or running); the next one is answered 503 at once.
//! Admitting before the body is read bounds the memory the task's bodies can hold to
//! `(sessions + queue) × --max-body-bytes`.
//!
//! Requests are batched per task ([`TaskPool::segment`]): a request queues its image; whoever
//! finds a session free runs everything queued for the task (up to `max_batch` images) as one
//! batch and hands each request its own logits, then looks at the queue again after giving the
//! session back, so no request is left waiting. A task file served on a shared base
//! ([`crate::infer::shared`]) is a pool like any other: its sessions are views of the base's
//! one session with this task's weights.

use crate::data::prompts::ObjectPrompt;
use crate::error::{Error, Result};
use crate::infer::engine::{Engine, Logits, OrtEngine};
use crate::infer::model::OrtModel;
use crate::infer::prompted::PromptedOrtEngine;
use crate::progress::Observer;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
        shared: bool,
        obs: &mut dyn Observer,
    ) -> Result<TaskEngine> {
        let lib = crate::infer::runtime::ensure_with(ort_lib, true, &mut |l| {
            obs.event(crate::progress::Event::Info(l.to_string()))
        })?;
        // A task file on a shared base runs on the base held once per process.
        let open = |p: &Path| {
            if shared && is_task_file(p) {
                OrtModel::load_shared(p, threads, Some(&lib))
            } else {
                OrtModel::load_with(p, threads, Some(&lib))
            }
        };
        let m = open(model)?;
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
            let d = open(&dpath)?;
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

    /// The shared base this task runs on (content hash, base file), if it does.
    pub fn shared_base(&self) -> Option<(String, PathBuf, usize)> {
        let m = match self {
            TaskEngine::PromptFree(e) => e.model(),
            TaskEngine::Prompted(e) => e.encoder(),
        };
        m.shared().map(|(b, t)| {
            let dec = match self {
                TaskEngine::Prompted(e) => e.decoder().shared().map_or(0, |(_, t)| t.bytes),
                TaskEngine::PromptFree(_) => 0,
            };
            (b.content_hash().to_string(), b.path.clone(), t.bytes + dec)
        })
    }

    /// `n` images `[n, 3, S, S]` (with one prompt set each for a prompted task) → logits.
    fn logits(&self, x: &[f32], n: usize, prompts: &[ObjectPrompt]) -> Result<Logits> {
        match self {
            TaskEngine::PromptFree(e) => e.logits(x, n),
            TaskEngine::Prompted(e) => {
                let sets: Vec<&[ObjectPrompt]> = prompts.iter().map(std::slice::from_ref).collect();
                e.logits_prompted(x, n, &sets)
            }
        }
    }
}

/// Whether `p` is a task file of `export --base-onnx` (by its metadata).
pub fn is_task_file(p: &Path) -> bool {
    crate::onnx::integrity::read_metadata(p)
        .ok()
        .and_then(|m| m.get(crate::onnx::delta::META_ROLE).cloned())
        .as_deref()
        == Some("task")
}

/// One request's image waiting for a batch.
struct Job {
    id: u64,
    chw: Vec<f32>,
    prompt: ObjectPrompt,
    /// Set when the request gave up (timeout): the image is not run.
    cancelled: Arc<AtomicBool>,
    done: std::sync::mpsc::Sender<Msg>,
}

/// What a waiting request hears.
enum Msg {
    Done(Result<Ran>),
    /// The runner left with jobs queued: try to become the runner.
    TakeOver,
}

static NEXT_JOB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One request's share of a batch run.
#[derive(Debug)]
pub struct Ran {
    /// The image's `[size · size]` logits.
    pub logits: Vec<f32>,
    pub size: usize,
    /// The whole batch's time in the model, ms.
    pub inference_ms: f64,
    /// Images in the batch.
    pub batch: usize,
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
    max_batch: usize,
    pending: Mutex<std::collections::VecDeque<Job>>,
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
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        name: &str,
        model: &Path,
        sessions: usize,
        queue: usize,
        threads: usize,
        max_batch: usize,
        ort_lib: Option<&Path>,
        shared: bool,
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
            let e = TaskEngine::load(model, threads, ort_lib, shared, obs)
                .map_err(|e| Error::msg(format!("task `{name}`: {e}")))?;
            // A task on a shared base runs one batch at a time on the base's session.
            let one = e.shared_base().is_some();
            engines.push(e);
            if one {
                break;
            }
        }
        let sessions = engines.len();
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
            max_batch: max_batch.max(1),
            pending: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Segment one preprocessed image `[3, S, S]` (with its prompt set on a prompted task):
    /// batched with the task's other queued requests. Blocking: call from a blocking thread.
    /// Whoever finds a session free runs the queue in batches (FIFO, up to `max_batch`) until
    /// its own image is done, gives the session back, and if images are still queued wakes the
    /// owner of the first to take over, so no request waits on a runner that left.
    pub fn segment(
        self: &Arc<Self>,
        chw: Vec<f32>,
        prompt: ObjectPrompt,
        cancelled: Arc<AtomicBool>,
    ) -> Result<Ran> {
        let (tx, rx) = std::sync::mpsc::channel();
        let id = NEXT_JOB.fetch_add(1, Ordering::Relaxed);
        self.pending
            .lock()
            .map_err(|_| Error::msg("task queue lock poisoned"))?
            .push_back(Job {
                id,
                chw,
                prompt,
                cancelled,
                done: tx,
            });
        loop {
            if let Ok(permit) = self.sessions.clone().try_acquire_owned() {
                self.run_pending(permit, id)?;
            }
            match rx.recv() {
                Ok(Msg::Done(r)) => return r,
                Ok(Msg::TakeOver) => continue,
                Err(_) => {
                    return Err(Error::msg(format!(
                        "task `{}`: the batch runner went away",
                        self.name
                    )))
                }
            }
        }
    }

    /// Run queued jobs in batches on one session until job `me` is done or the queue is empty;
    /// then hand over (see [`TaskPool::segment`]).
    fn run_pending(self: &Arc<Self>, permit: OwnedSemaphorePermit, me: u64) -> Result<()> {
        let index = self
            .free
            .lock()
            .map_err(|_| Error::msg("session pool lock poisoned"))?
            .pop()
            .ok_or_else(|| Error::msg(format!("task `{}`: no free session", self.name)))?;
        let guard = SessionGuard {
            pool: self.clone(),
            index,
            _permit: permit,
        };
        self.running.fetch_add(1, Ordering::AcqRel);
        let mut mine_done = false;
        while !mine_done {
            let batch: Vec<Job> = {
                let mut q = self
                    .pending
                    .lock()
                    .map_err(|_| Error::msg("task queue lock poisoned"))?;
                let mut b = Vec::new();
                while b.len() < self.max_batch {
                    match q.pop_front() {
                        Some(j) if j.cancelled.load(Ordering::Acquire) => {
                            mine_done |= j.id == me;
                            let _ = j.done.send(Msg::Done(Err(Error::msg("cancelled"))));
                        }
                        Some(j) => b.push(j),
                        None => break,
                    }
                }
                b
            };
            if batch.is_empty() {
                break;
            }
            mine_done |= batch.iter().any(|j| j.id == me);
            let n = batch.len();
            let mut x = Vec::with_capacity(batch.iter().map(|j| j.chw.len()).sum());
            let mut prompts = Vec::with_capacity(n);
            for j in &batch {
                x.extend_from_slice(&j.chw);
                prompts.push(j.prompt.clone());
            }
            let t = std::time::Instant::now();
            let r = guard.engine().logits(&x, n, &prompts);
            let inference_ms = t.elapsed().as_secs_f64() * 1e3;
            drop(x);
            for (i, j) in batch.into_iter().enumerate() {
                let out = match &r {
                    Ok(l) if l.n == n => Ok(Ran {
                        logits: l.image(i).to_vec(),
                        size: l.size,
                        inference_ms,
                        batch: n,
                    }),
                    Ok(l) => Err(Error::msg(format!(
                        "task `{}`: a batch of {n} gave {} outputs",
                        self.name, l.n
                    ))),
                    Err(e) => Err(Error::msg(e.to_string())),
                };
                let _ = j.done.send(Msg::Done(out));
            }
        }
        drop(guard);
        // After giving the session back: a job queued meanwhile needs a runner.
        if let Ok(q) = self.pending.lock() {
            if let Some(j) = q.front() {
                let _ = j.done.send(Msg::TakeOver);
            }
        }
        Ok(())
    }

    /// The shared base this task runs on: (content hash, base file, bytes of the task's own
    /// tensors), if it does.
    pub fn shared_base(&self) -> Option<(String, PathBuf, usize)> {
        self.engines.first().and_then(|e| e.shared_base())
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
