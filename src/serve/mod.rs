//! `gps-seg serve`: an HTTP/1.1 server (axum on tokio) over ONNX Runtime sessions, one pool
//! of sessions per task, several tasks in one process (and one ONNX Runtime environment).
//!
//! Routes:
//! - `POST /v1/segment?task=NAME` with a PNG/JPEG body (raw, or `multipart/form-data` field
//!   `file`) → `image/png`: the mask at the image's original resolution, byte-identical to the
//!   `masks/<id>.png` `gps-seg infer` writes with the same model, resize and threshold
//!   (both use [`crate::infer::mask`]); the summary in `X-Mask-Area`, `X-Mean-Probability`,
//!   `X-Inference-Ms`, `X-Total-Ms` and one `X-Result` JSON header. With `?format=json` (or
//!   `Accept: application/json`) a JSON body holding the summary and `mask_png_base64`.
//! - Prompted tasks: a task file that is an image encoder (output `image_embeddings`) with its
//!   `<stem>_decoder.onnx` beside it (`gps-seg export --prompted`) takes `points=x,y,label;…`
//!   and/or `box=x0,y0,x1,y1` (the image's pixels) and answers the single-mask output.
//! - `GET /v1/tasks` (names, model files, input size, sessions, prompted), `GET /healthz`,
//!   `GET /metrics` (Prometheus text: [`metrics`]), `GET /v1/sample.png` (a synthetic
//!   Kvasir-shaped image), `GET /` (a page to try it: pick a task, drop an image, see the
//!   overlay, click to add points on a prompted task; `/?sample=1&task=NAME` segments the
//!   sample on load).
//!
//! Limits: a request is admitted to its task only while fewer than `sessions + queue` are
//! ([`pool`]), and to the server only while its bytes fit the one budget of requests in
//! flight (`max_inflight_bytes`, [`budget`]: its body before reading it, then what decoding
//! and running its image needs, estimated from the image header), else 503 with
//! `Retry-After`; bodies over `max_body_bytes` are refused (413, from `Content-Length` before
//! reading or as soon as the body grows past it); images go through the inference checks
//! ([`crate::data::imgio::decode_rgb_bytes`]: pixel cap from the header before decoding,
//! truncated and zeroed JPEGs, ancillary data bounded); every request has `timeout` (504) from
//! its arrival to its answer. Connections ([`conn`]): headers within `header_timeout`,
//! keep-alive connections closed after `idle_timeout`, an answer sent before the body was read
//! closes the connection cleanly (`Connection: close`, the rest drained), a half-closed request
//! is answered. Decoding and the model run on tokio's blocking pool; a session is held only
//! while the model runs. Bad input gets a 4xx with a one-line message; a panic in a request's
//! work becomes a 500 for that request alone. On SIGTERM/SIGINT (or [`Server::shutdown`]) the
//! listener closes, idle connections close at once and in-flight requests finish.

pub mod api;
pub mod budget;
pub mod client;
pub mod conn;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod spec;
pub mod wire;

pub use api::{SegmentResult, TaskInfo};
pub use spec::TaskSpec;

use crate::data::resize::Resize;
use crate::error::{Error, Result};
use crate::progress::{Event, Observer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub tasks: Vec<TaskSpec>,
    pub host: String,
    /// 0: an ephemeral port (see [`Server::addr`]).
    pub port: u16,
    /// Sessions per task.
    pub sessions: usize,
    /// ONNX Runtime intra-op threads per session (0: its default).
    pub threads: usize,
    /// Requests per task that may wait beyond its sessions before 503.
    pub queue: usize,
    pub max_body_bytes: usize,
    /// From a request's arrival to its answer (else 504).
    pub timeout: Duration,
    pub resize: Resize,
    pub threshold: f32,
    /// `Retry-After` of a 503, seconds.
    pub retry_after_s: u64,
    /// Tokio worker threads for the HTTP side (the model runs on the blocking pool).
    pub io_threads: usize,
    pub ort_lib: Option<PathBuf>,
    /// Every task file in this folder is a task (loaded on first use); `PUT` stores new task
    /// files here.
    pub tasks_dir: Option<PathBuf>,
    /// Most tasks loaded at once (least recently used unloaded beyond).
    pub max_loaded: usize,
    /// Most images run as one batch of a task.
    pub max_batch: usize,
    /// Task files run on their base held once per process (else each on its own sessions).
    pub shared_base: bool,
    /// Largest task file a `PUT` may upload.
    pub max_task_bytes: usize,
    /// One budget for the bytes all requests in flight hold (bodies, decoded images, model
    /// input and output), every task together ([`budget`]).
    pub max_inflight_bytes: u64,
    /// A request's headers must be complete within this (from the accept, or the request's
    /// first byte on a keep-alive connection), else the connection is closed ([`conn`]).
    pub header_timeout: Duration,
    /// A keep-alive connection without a request for this long is closed.
    pub idle_timeout: Duration,
}

/// Largest `--max-body-bytes`.
pub const MAX_BODY_LIMIT: usize = 512 << 20;

/// Largest `--max-inflight-bytes` (1 TiB).
pub const MAX_INFLIGHT_LIMIT: u64 = 1 << 40;

impl ServeConfig {
    /// Defaults: 127.0.0.1:8080, one session per task, queue 8, 32 MiB bodies, 1 GiB of
    /// requests in flight, 30 s request timeout, 10 s header-read and 30 s idle timeouts,
    /// squash resize, threshold 0.5 (those of `gps-seg infer`).
    pub fn new(tasks: Vec<TaskSpec>) -> ServeConfig {
        ServeConfig {
            tasks,
            host: "127.0.0.1".into(),
            port: 8080,
            sessions: 1,
            threads: 0,
            queue: 8,
            max_body_bytes: 32 << 20,
            timeout: Duration::from_secs(30),
            resize: Resize::Squash,
            threshold: 0.5,
            retry_after_s: 1,
            io_threads: 2,
            ort_lib: None,
            tasks_dir: None,
            max_loaded: 64,
            max_batch: 8,
            shared_base: true,
            max_task_bytes: 512 << 20,
            max_inflight_bytes: budget::DEFAULT_MAX_INFLIGHT_BYTES,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                field: field.into(),
                msg,
            })
        };
        if self.tasks.is_empty() && self.tasks_dir.is_none() {
            return bad(
                "task",
                "give at least one --task NAME=FILE.onnx, or --tasks-dir DIR".into(),
            );
        }
        if !(1..=registry::MAX_TASKS).contains(&self.max_loaded) {
            return bad(
                "max_loaded",
                format!("{}: must be 1 to {}", self.max_loaded, registry::MAX_TASKS),
            );
        }
        if !(1..=256).contains(&self.max_batch) {
            return bad("max_batch", format!("{}: must be 1 to 256", self.max_batch));
        }
        if self.max_task_bytes == 0 || self.max_task_bytes > (4usize << 30) {
            return bad(
                "max_task_bytes",
                format!("{}: must be 1 to 4 GiB", self.max_task_bytes),
            );
        }
        if self.tasks.len() > 64 {
            return bad("task", format!("{} tasks; at most 64", self.tasks.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tasks {
            if !seen.insert(&t.name) {
                return bad("task", format!("task name `{}` given twice", t.name));
            }
        }
        if !(1..=64).contains(&self.sessions) {
            return bad("sessions", format!("{}: must be 1 to 64", self.sessions));
        }
        if self.threads > 256 {
            return bad("threads", format!("{}: at most 256", self.threads));
        }
        if self.queue > 10_000 {
            return bad("queue", format!("{}: at most 10000", self.queue));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_LIMIT {
            return bad(
                "max_body_bytes",
                format!("{}: must be 1 to {MAX_BODY_LIMIT}", self.max_body_bytes),
            );
        }
        if self.max_inflight_bytes < self.max_body_bytes as u64
            || self.max_inflight_bytes > MAX_INFLIGHT_LIMIT
        {
            return bad(
                "max_inflight_bytes",
                format!(
                    "{}: must be at least --max-body-bytes ({}) and at most {MAX_INFLIGHT_LIMIT}",
                    self.max_inflight_bytes, self.max_body_bytes
                ),
            );
        }
        for (field, d) in [
            ("timeout_s", self.timeout),
            ("header_timeout_s", self.header_timeout),
            ("idle_timeout_s", self.idle_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(3600) {
                return bad(field, format!("{d:?}: must be above 0 and at most 3600 s"));
            }
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return bad("threshold", "must be a probability in (0, 1)".into());
        }
        if !(1..=64).contains(&self.io_threads) {
            return bad(
                "io_threads",
                format!("{}: must be 1 to 64", self.io_threads),
            );
        }
        Ok(())
    }
}

/// Bytes of a model file and its external data (`<file>.data`), for the memory estimate.
fn model_bytes(p: &Path) -> u64 {
    let f = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut data = p.as_os_str().to_owned();
    data.push(".data");
    f + std::fs::metadata(PathBuf::from(data))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// A running server: its runtime, address and shutdown handle.
pub struct Server {
    addr: SocketAddr,
    state: Arc<api::AppState>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    grace: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Load every task's sessions, bind `host:port` and start serving on a background runtime.
    /// Returns once the listener is bound ([`Server::addr`] is the real address, also for
    /// port 0). Call from outside any async runtime.
    pub fn bind(cfg: &ServeConfig, obs: &mut dyn Observer) -> Result<Server> {
        cfg.validate()?;
        for t in &cfg.tasks {
            if !t.model.is_file() {
                return Err(Error::io(
                    &t.model,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("task `{}`: no such model file", t.name),
                    ),
                ));
            }
        }
        // Each session holds its weights (ONNX Runtime's copy plus working memory); a task
        // file on a shared base holds the base once (counted with the first task) and its own
        // tensors.
        let mut need = 0u64;
        let mut bases = std::collections::BTreeSet::new();
        for t in &cfg.tasks {
            let base = (cfg.shared_base && pool::is_task_file(&t.model))
                .then(|| crate::onnx::integrity::read_metadata(&t.model).ok())
                .flatten()
                .and_then(|m| m.get(crate::onnx::delta::META_BASE_FILE).cloned())
                .map(|b| crate::util::fs::parent_of(&t.model).join(b));
            need = need.saturating_add(match base {
                Some(b) => {
                    let first = bases.insert(crate::util::fs::canonical_lenient(&b));
                    model_bytes(&t.model) + if first { model_bytes(&b) } else { 0 }
                }
                None => model_bytes(&t.model)
                    .saturating_mul(2)
                    .saturating_mul(cfg.sessions as u64),
            });
        }
        crate::util::mem::check_fits(
            "the serving sessions plus --max-inflight-bytes (requests in flight)",
            need.saturating_add(cfg.max_inflight_bytes),
        )?;
        let registry = Arc::new(registry::Registry::new(
            registry::PoolOptions {
                sessions: cfg.sessions,
                queue: cfg.queue,
                threads: cfg.threads,
                max_batch: cfg.max_batch,
                ort_lib: cfg.ort_lib.clone(),
                shared: cfg.shared_base,
            },
            cfg.max_loaded,
            cfg.tasks_dir.clone(),
        ));
        if let Some(dir) = &cfg.tasks_dir {
            let (found, skipped) = registry::scan_dir(dir)?;
            for s in skipped {
                obs.event(Event::Info(format!("--tasks-dir: skipping {s}")));
            }
            obs.event(Event::Info(format!(
                "--tasks-dir {}: {} task file(s), loaded on first use (at most {} at once)",
                dir.display(),
                found.len(),
                cfg.max_loaded
            )));
            for (name, file) in found {
                registry.add(&name, &file, registry::Source::Dir, false)?;
            }
        }
        for t in &cfg.tasks {
            obs.event(Event::Info(format!(
                "task `{}`: loading {}",
                t.name,
                t.model.display()
            )));
            let e = registry.add(&t.name, &t.model, registry::Source::Flag, false)?;
            registry.load_now(&e, obs)?;
        }
        let sample = crate::data::synth_kvasir::render(0, 0, 320);
        let state = Arc::new(api::AppState {
            registry,
            max_task_bytes: cfg.max_task_bytes,
            metrics: metrics::Metrics::default(),
            budget: budget::Budget::new(cfg.max_inflight_bytes),
            max_body_bytes: cfg.max_body_bytes,
            timeout: cfg.timeout,
            resize: cfg.resize,
            threshold: cfg.threshold,
            retry_after_s: cfg.retry_after_s,
            sample_png: crate::data::imgio::encode_png(&sample.image)?,
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.io_threads)
            .thread_name("gps-seg-serve")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::msg(format!("cannot start the async runtime: {e}")))?;
        let host_port = format!("{}:{}", cfg.host, cfg.port);
        let std_listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .map_err(|e| Error::msg(format!("cannot listen on {host_port}: {e}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::msg(format!("{host_port}: {e}")))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| Error::msg(format!("{host_port}: {e}")))?;
        let listener = {
            let _g = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .map_err(|e| Error::msg(format!("{host_port}: {e}")))?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = api::router(state.clone());
        let limits = conn::ConnLimits {
            header_timeout: cfg.header_timeout,
            idle_timeout: cfg.idle_timeout,
        };
        let done = runtime.spawn(conn::serve(
            listener,
            app,
            limits,
            state.metrics.conns.clone(),
            stopped,
        ));
        Ok(Server {
            addr,
            state,
            runtime: Some(runtime),
            stop: Some(stop),
            done: Some(done),
            grace: cfg.timeout + Duration::from_secs(5),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The tasks as `GET /v1/tasks` lists them.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        api::task_infos(&self.state)
    }

    /// Block until SIGTERM or SIGINT, then shut down gracefully ([`Server::shutdown`]).
    pub fn run_until_signal(self, obs: &mut dyn Observer) -> Result<()> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::msg("server already stopped"))?;
        let which = rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| Error::msg(format!("cannot watch SIGTERM: {e}")))?;
            tokio::select! {
                _ = term.recv() => Ok::<_, Error>("SIGTERM"),
                r = tokio::signal::ctrl_c() => {
                    r.map_err(|e| Error::msg(format!("cannot watch SIGINT: {e}")))?;
                    Ok("SIGINT")
                }
            }
        })?;
        obs.event(Event::Info(format!(
            "{which}: finishing in-flight requests, then stopping"
        )));
        self.shutdown()
    }

    /// Stop accepting connections, let in-flight requests finish (at most the request timeout
    /// plus 5 s), then stop the runtime. Call from outside any async runtime (dropping a
    /// `Server` does the same).
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let (Some(rt), Some(done)) = (self.runtime.take(), self.done.take()) else {
            return Ok(());
        };
        let grace = self.grace;
        let r = rt.block_on(async move { tokio::time::timeout(grace, done).await });
        rt.shutdown_timeout(Duration::from_secs(1));
        match r {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(Error::msg(format!("server error: {e}"))),
            Ok(Err(e)) => Err(Error::msg(format!("server task failed: {e}"))),
            Err(_) => Err(Error::msg(format!(
                "in-flight requests did not finish within {} s; stopped anyway",
                grace.as_secs()
            ))),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
