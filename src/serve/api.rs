//! The routes (see the module docs of [`super`]) and the segmentation handler: query → task →
//! admission (503 + `Retry-After` when the task is full) → the body's bytes in the server's
//! budget ([`super::budget`], 503 when it is taken) → body (size-capped) → image header → the
//! image's bytes in the budget → decode with the inference checks → session → `infer::mask`
//! pre/post-processing → PNG or JSON. Every error is a status code with a one-line plain-text
//! message naming what was wrong.

use super::budget::{self, Budget, Refusal, Reservation};
use super::metrics::{Metrics, ServerGauges, TaskGauges, UNKNOWN_TASK};
use super::pool::TaskPool;
use super::registry::{Registry, Source};
use super::wire;
use crate::data::imgio;
use crate::data::prompts::ObjectPrompt;
use crate::data::resize::Resize;
use crate::infer::mask;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the handlers share.
pub struct AppState {
    pub registry: Arc<Registry>,
    /// Largest task file a `PUT /v1/tasks/NAME` may upload.
    pub max_task_bytes: usize,
    pub metrics: Metrics,
    /// The one budget of bytes held by requests in flight (`--max-inflight-bytes`).
    pub budget: Arc<Budget>,
    pub max_body_bytes: usize,
    pub timeout: Duration,
    pub resize: Resize,
    pub threshold: f32,
    /// `Retry-After` seconds of a 503.
    pub retry_after_s: u64,
    /// `GET /v1/sample.png`.
    pub sample_png: Vec<u8>,
}

impl AppState {
    pub fn gauges(&self) -> Vec<TaskGauges> {
        self.registry
            .loaded()
            .iter()
            .map(|p| TaskGauges {
                task: p.name.clone(),
                sessions: p.sessions(),
                queued: p.queued(),
                in_flight: p.in_flight(),
                queue_capacity: p.queue(),
            })
            .collect()
    }

    fn task_names(&self) -> String {
        self.registry.names()
    }

    pub fn server_gauges(&self) -> ServerGauges {
        ServerGauges {
            inflight_bytes: self.budget.used(),
            inflight_limit: self.budget.limit(),
            inflight_peak: self.budget.peak(),
            budget_refused: self.budget.refused(),
        }
    }

    /// The answer to a reservation the budget refused: 413 when it can never fit, else 503
    /// with `Retry-After`.
    fn refused(&self, what: &str, r: Refusal) -> ApiError {
        match r {
            Refusal::TooLarge { .. } => err(StatusCode::PAYLOAD_TOO_LARGE, format!("{what}: {r}")),
            Refusal::Busy { .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                msg: format!("{what}: {r}; retry after {} s", self.retry_after_s),
                retry_after_s: Some(self.retry_after_s),
                aborted: false,
            },
        }
    }
}

/// An error answer: status + one-line message (text/plain).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub msg: String,
    pub retry_after_s: Option<u64>,
    /// The client stopped sending the request's body (counted in `/metrics` as aborted).
    pub aborted: bool,
}

fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError {
        status,
        msg: msg.into(),
        retry_after_s: None,
        aborted: false,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}\n", self.msg),
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/tasks", get(tasks))
        .route("/v1/tasks/{name}", put(put_task).delete(delete_task))
        .route("/v1/sample.png", get(sample))
        .route("/v1/segment", post(segment))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&st.gauges(), &st.server_gauges()),
    )
        .into_response()
}

async fn sample(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], st.sample_png.clone()).into_response()
}

/// One entry of `GET /v1/tasks`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TaskInfo {
    pub name: String,
    pub model: String,
    /// Where the task came from: `flag` (--task), `dir` (--tasks-dir), `put`.
    pub source: Source,
    /// Loaded now (else on its next request).
    pub loaded: bool,
    /// Bytes of the task file (with a prompted pair's decoder).
    pub file_bytes: u64,
    /// Requests for this task since it was added.
    pub hits: u64,
    /// On a shared base: its content hash, its file and the bytes of the task's own tensors
    /// in memory.
    #[serde(default)]
    pub base_content_hash: Option<String>,
    #[serde(default)]
    pub base_file: Option<String>,
    #[serde(default)]
    pub task_bytes: Option<usize>,
    /// 0 while not loaded.
    pub input_size: usize,
    pub sessions: usize,
    /// Intra-op threads per session (0: ONNX Runtime's default).
    pub threads: usize,
    pub queue: usize,
    pub resize: Resize,
    pub threshold: f32,
    /// An image encoder + prompted decoder pair (requests give `points` / `box`).
    pub prompted: bool,
    pub engine: String,
}

/// The tasks as `GET /v1/tasks` lists them.
pub fn task_infos(st: &AppState) -> Vec<TaskInfo> {
    st.registry
        .entries()
        .iter()
        .map(|e| {
            let p = e.pool();
            let shared = p.as_ref().and_then(|p| p.shared_base());
            TaskInfo {
                name: e.name.clone(),
                model: e.file.display().to_string(),
                source: e.source,
                loaded: p.is_some(),
                file_bytes: e.file_bytes,
                hits: e.hits(),
                base_content_hash: shared.as_ref().map(|s| s.0.clone()),
                base_file: shared.as_ref().map(|s| s.1.display().to_string()),
                task_bytes: shared.as_ref().map(|s| s.2),
                input_size: p.as_ref().map_or(0, |p| p.input_size()),
                sessions: p.as_ref().map_or(0, |p| p.sessions()),
                threads: st.registry.opts.threads,
                queue: st.registry.opts.queue,
                resize: st.resize,
                threshold: st.threshold,
                prompted: p.as_ref().is_some_and(|p| p.is_prompted()),
                engine: p.as_ref().map_or_else(String::new, |p| p.describe()),
            }
        })
        .collect()
}

async fn tasks(State(st): State<Arc<AppState>>) -> Response {
    json_response(&serde_json::json!({ "tasks": task_infos(&st) }))
}

/// `PUT /v1/tasks/NAME`: a task file as the body (stored as `<tasks-dir>/NAME.onnx`), or
/// `{"path": "FILE.onnx"}` (Content-Type `application/json`) naming a task file already in
/// `--tasks-dir`. The task's base must be the base file beside it in `--tasks-dir`: a task
/// exported for another base is answered 409 naming both content hashes. The task is loaded
/// on its first request.
async fn put_task(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    req: Request,
) -> Response {
    match put_task_inner(&st, name, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn put_task_inner(
    st: &Arc<AppState>,
    name: String,
    req: Request,
) -> Result<Response, ApiError> {
    super::spec::TaskSpec::parse(&format!("{name}=task.onnx"))
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    let dir = st.registry.tasks_dir.clone().ok_or_else(|| {
        err(
            StatusCode::CONFLICT,
            "this server has no --tasks-dir to hold tasks added at run time",
        )
    })?;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if n > st.max_task_bytes as u64 {
            return Err(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "task file of {n} bytes is over the limit of {} bytes (--max-task-bytes)",
                    st.max_task_bytes
                ),
            ));
        }
    }
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    let mut held = st
        .budget
        .reserve(declared.unwrap_or(0))
        .map_err(|r| st.refused("task file upload", r))?;
    // Bounded in time like a segmentation request's body (the connection layer's timeouts
    // stop while a request is in the router).
    let bytes = tokio::time::timeout(
        st.timeout,
        read_body(
            body,
            st.max_task_bytes,
            declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0),
            &mut held,
            st,
        ),
    )
    .await
    .map_err(|_| {
        err(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the task file did not arrive within {} s (--timeout-s)",
                st.timeout.as_secs_f64()
            ),
        )
    })??;
    let reg = st.registry.clone();
    let (file, replaced) =
        tokio::task::spawn_blocking(move || put_blocking(&reg, &dir, &name, bytes, json))
            .await
            .map_err(internal)??;
    let mut r = json_response(&serde_json::json!({
        "name": file.0,
        "file": file.1.display().to_string(),
        "replaced": replaced,
    }));
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutPath {
    path: String,
}

/// The file work of a PUT (blocking): place the task file, check it against its base, register.
fn put_blocking(
    reg: &Arc<Registry>,
    dir: &std::path::Path,
    name: &str,
    bytes: Vec<u8>,
    json: bool,
) -> Result<((String, std::path::PathBuf), bool), ApiError> {
    use crate::onnx::delta::{META_BASE_HASH, META_ROLE};
    use crate::onnx::integrity;
    let bad = |m: String| err(StatusCode::BAD_REQUEST, m);
    let canon_dir = crate::util::fs::canonical_lenient(dir);
    let mut upload = None;
    let file = if json {
        let p: PutPath = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("body: expected {{\"path\": \"FILE.onnx\"}}: {e}")))?;
        let c = crate::util::fs::canonical_lenient(&dir.join(&p.path));
        if c.parent() != Some(canon_dir.as_path()) {
            return Err(bad(format!(
                "`{}` is not a file directly in --tasks-dir {} (a task sits beside its base)",
                p.path,
                dir.display()
            )));
        }
        if !c.is_file() {
            return Err(err(
                StatusCode::NOT_FOUND,
                format!("`{}`: no such file in --tasks-dir", p.path),
            ));
        }
        c
    } else {
        if bytes.is_empty() {
            return Err(bad(
                "empty body: send a task file (`export --base-onnx`), or JSON {\"path\": …}".into(),
            ));
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".upload.")
            .suffix(".onnx")
            .tempfile_in(dir)
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")))?;
        use std::io::Write;
        tmp.as_file_mut()
            .write_all(&bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")))?;
        let p = tmp.path().to_path_buf();
        upload = Some(tmp);
        p
    };
    drop(bytes);
    let meta =
        integrity::read_metadata(&file).map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    if meta.get(META_ROLE).map(String::as_str) != Some("task") {
        return Err(bad(format!(
            "task `{name}`: not a task file (`export --base-onnx` writes them)"
        )));
    }
    let conflict = |m: String| err(StatusCode::CONFLICT, format!("task `{name}`: {m}"));
    let base =
        integrity::verify_task_base_path(&file, &meta).map_err(|e| conflict(e.to_string()))?;
    let bmeta = integrity::read_metadata(&base).map_err(|e| conflict(e.to_string()))?;
    let (want, have) = (
        meta.get(META_BASE_HASH).cloned().unwrap_or_default(),
        bmeta.get(META_BASE_HASH).cloned().unwrap_or_default(),
    );
    if want != have {
        return Err(conflict(format!(
            "exported for the base with content hash {want}, but the base in --tasks-dir ({}) \
             has content hash {have}",
            base.display()
        )));
    }
    integrity::check_pair(&file, &meta, &base, &bmeta).map_err(|e| conflict(e.to_string()))?;
    if reg.opts.shared {
        let b = crate::infer::shared::SharedBase::get_or_load(
            &base,
            reg.opts.threads,
            reg.opts.ort_lib.as_deref(),
        )
        .map_err(|e| conflict(e.to_string()))?;
        b.load_task(&file)
            .map_err(|e| err(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    }
    let (file, wrote) = match upload {
        None => (file, false),
        Some(tmp) => {
            let dest = dir.join(format!("{name}.onnx"));
            if dest.exists() && !super::pool::is_task_file(&dest) {
                return Err(conflict(format!(
                    "{} exists and is not a task file; it is never replaced",
                    dest.display()
                )));
            }
            tmp.persist(&dest)
                .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.error.to_string()))?;
            let _ = crate::util::fs::sync_dir(dir);
            (dest, true)
        }
    };
    let replaced = reg.get(name).is_some();
    reg.add(name, &file, Source::Put, wrote)
        .map_err(|e| conflict(e.to_string()))?;
    Ok(((name.to_string(), file), replaced))
}

/// `DELETE /v1/tasks/NAME`: forget the task and unload it (in-flight requests finish). The
/// task file is deleted only when this server wrote it (a PUT with a body).
async fn delete_task(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let r = match st.registry.remove(&name) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let Some(e) = r else {
        return err(
            StatusCode::NOT_FOUND,
            format!(
                "unknown task `{}` (tasks: {})",
                name.chars().take(64).collect::<String>(),
                st.task_names()
            ),
        )
        .into_response();
    };
    let deleted = e.wrote_file && std::fs::remove_file(&e.file).is_ok();
    json_response(&serde_json::json!({
        "removed": e.name,
        "file": e.file.display().to_string(),
        "file_deleted": deleted,
    }))
}

fn json_response(v: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

const ROUTES: &str = "GET /, GET /healthz, GET /metrics, GET /v1/tasks, GET /v1/sample.png, \
                      POST /v1/segment?task=NAME, PUT /v1/tasks/NAME, DELETE /v1/tasks/NAME";

async fn not_found(method: Method, uri: Uri) -> ApiError {
    err(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}; routes: {ROUTES}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let allowed = if uri.path() == "/v1/segment" {
        "POST"
    } else if uri.path().starts_with("/v1/tasks/") {
        "PUT or DELETE"
    } else {
        "GET"
    };
    let mut e = err(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} is not allowed on {} (use {allowed})",
            uri.path()
        ),
    );
    e.retry_after_s = None;
    e
}

/// The summary of one segmentation (the `X-Result` header and the JSON body).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SegmentResult {
    pub task: String,
    pub width: usize,
    pub height: usize,
    /// Pixels in the mask (probability ≥ threshold), at the original resolution.
    pub mask_area: usize,
    /// `mask_area / (width · height)`.
    pub mask_fraction: f64,
    /// Mean probability over the image at the original resolution.
    pub mean_probability: f64,
    pub threshold: f32,
    /// Time in the ONNX Runtime session.
    pub inference_ms: f64,
    /// Time waiting for a free session.
    pub queue_ms: f64,
    /// Server time from the request's arrival to the answer (body read included).
    pub total_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Json,
}

/// Counts a request as aborted when its future is dropped before it answered (the connection
/// closed under it): such a request is never lost from `/metrics`.
struct Unanswered<'a> {
    st: &'a AppState,
    label: String,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.st.metrics.aborted(&self.label);
        }
    }
}

async fn segment(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let mut guard = Unanswered {
        st: &st,
        label: UNKNOWN_TASK.to_string(),
        answered: false,
    };
    let r = segment_inner(&st, req, t0, &mut guard.label).await;
    guard.answered = true;
    let label = std::mem::take(&mut guard.label);
    let resp = match r {
        Ok(r) => r,
        Err(e) => {
            if e.aborted {
                st.metrics.aborted(&label);
            }
            e.into_response()
        }
    };
    st.metrics
        .record(&label, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn segment_inner(
    st: &Arc<AppState>,
    req: Request,
    t0: Instant,
    label: &mut String,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let query = wire::parse_query(parts.uri.query())
        .map_err(|m| err(StatusCode::BAD_REQUEST, format!("query string: {m}")))?;
    let mut task = None;
    let mut format = None;
    let mut prompts = RawPrompts::default();
    for (k, v) in &query {
        match k.as_str() {
            "task" => task = Some(v.as_str()),
            "points" => {
                prompts.points = parse_points(v).map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
            }
            "box" => {
                prompts.boxes = Some(parse_box(v).map_err(|m| err(StatusCode::BAD_REQUEST, m))?);
            }
            "format" => {
                format = Some(match v.as_str() {
                    "png" => Format::Png,
                    "json" => Format::Json,
                    _ => {
                        return Err(err(
                            StatusCode::BAD_REQUEST,
                            format!("format `{v}`: expected png or json"),
                        ))
                    }
                })
            }
            _ => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter `{k}` (expected task, format, points, box)"),
                ))
            }
        }
    }
    let Some(task) = task else {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("missing ?task=NAME (tasks: {})", st.task_names()),
        ));
    };
    let entry = st.registry.get(task).ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            format!(
                "unknown task `{}` (tasks: {})",
                task.chars().take(64).collect::<String>(),
                st.task_names()
            ),
        )
    })?;
    *label = entry.name.clone();
    // Loaded on first use; its first requests wait for the one load, within the timeout.
    let pool = match tokio::time::timeout(st.timeout, st.registry.pool(&entry)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Err(err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("task `{}` could not be loaded: {e}", entry.name),
            ))
        }
        Err(_) => {
            return Err(err(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "task `{}` was still loading after {} s (--timeout-s)",
                    entry.name,
                    st.timeout.as_secs_f64()
                ),
            ))
        }
    };
    let has_prompts = !prompts.points.is_empty() || prompts.boxes.is_some();
    if pool.is_prompted() && !has_prompts {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "task `{}` is prompted: give points=x,y,label;… (label 1 foreground, 0 \
                 background) and/or box=x0,y0,x1,y1, in the image's pixels",
                pool.name
            ),
        ));
    }
    if !pool.is_prompted() && has_prompts {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "task `{}` is prompt-free: points and box need a prompted task (an image \
                 encoder exported with `gps-seg export --prompted`, its decoder beside it)",
                pool.name
            ),
        ));
    }
    let format = format.unwrap_or_else(|| {
        let wants_json = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json"));
        if wants_json {
            Format::Json
        } else {
            Format::Png
        }
    });
    let content_type = content_type(&parts.headers)?;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if n > st.max_body_bytes as u64 {
            return Err(too_large(n, st.max_body_bytes));
        }
    }
    let Some(admission) = pool.admit() else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            msg: format!(
                "task `{}` is full: {} session(s) busy and {} request(s) queued (--queue); \
                 retry after {} s",
                pool.name,
                pool.sessions(),
                pool.queue(),
                st.retry_after_s
            ),
            retry_after_s: Some(st.retry_after_s),
            aborted: false,
        });
    };
    // The body's bytes before it is read; the image's once its header is read.
    let mut held = st
        .budget
        .reserve(declared.unwrap_or(0))
        .map_err(|r| st.refused(&format!("task `{}`", pool.name), r))?;
    let work = async {
        let bytes = read_body(
            body,
            st.max_body_bytes,
            declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0),
            &mut held,
            st,
        )
        .await?;
        let work = Work {
            admission,
            held,
            bytes,
            kind: content_type,
            prompts,
        };
        run_segment(st, &pool, work, t0).await
    };
    let result = tokio::time::timeout(st.timeout, work).await.map_err(|_| {
        err(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "task `{}`: no answer within {} s (--timeout-s)",
                pool.name,
                st.timeout.as_secs_f64()
            ),
        )
    })??;
    Ok(match format {
        Format::Png => png_response(result),
        Format::Json => {
            let (summary, png) = result;
            let mut v = serde_json::to_value(&summary).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "mask_png_base64".into(),
                    serde_json::Value::String(wire::base64(&png)),
                );
            }
            json_response(&v)
        }
    })
}

fn too_large(n: u64, max: usize) -> ApiError {
    err(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body of {n} bytes is over the limit of {max} bytes (--max-body-bytes)"),
    )
}

/// The whole body, refused with 413 as soon as it grows past `max` bytes, its buffer held in
/// the budget as it grows (503 when the budget cannot hold more). A body the client stops
/// sending (closed or half-closed mid-body) is a 400 marked aborted.
async fn read_body(
    mut body: Body,
    max: usize,
    hint: usize,
    held: &mut Reservation,
    st: &AppState,
) -> Result<Vec<u8>, ApiError> {
    use axum::body::HttpBody;
    let mut buf = Vec::with_capacity(hint.min(max));
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| ApiError {
            aborted: true,
            ..err(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body (the client stopped sending it?): {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > max {
                return Err(err(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is over the limit of {max} bytes (--max-body-bytes)"),
                ));
            }
            let need = buf.len().saturating_add(data.len());
            if need > buf.capacity() {
                // Doubling, at most to `max`; held in the budget before it is allocated.
                let target = need.max(buf.capacity().saturating_mul(2)).min(max);
                held.grow_to(target as u64)
                    .map_err(|r| st.refused("request body", r))?;
                buf.reserve_exact(target - buf.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// How the body carries the image.
#[derive(Debug, Clone)]
enum BodyKind {
    Raw,
    Multipart(String),
}

fn content_type(h: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(v) = h.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Raw);
    };
    let s = v
        .to_str()
        .map_err(|_| err(StatusCode::BAD_REQUEST, "Content-Type is not ASCII"))?;
    let mime = s
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "multipart/form-data" {
        return Ok(BodyKind::Multipart(s.to_string()));
    }
    // `application/x-www-form-urlencoded` is what `curl --data-binary` sends by default.
    if mime.starts_with("image/")
        || mime == "application/octet-stream"
        || mime == "application/x-www-form-urlencoded"
        || mime.is_empty()
    {
        return Ok(BodyKind::Raw);
    }
    Err(err(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "Content-Type `{}`: send the image as the raw body (image/png, image/jpeg) or as \
             multipart/form-data with a field `file`",
            mime.chars().take(80).collect::<String>()
        ),
    ))
}

/// Sets its flag when dropped: the request's future is gone (answered, or timed out).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A request whose body was read: what [`run_segment`] works on and holds.
struct Work {
    /// Its place in the task.
    admission: super::pool::Admission,
    /// Its bytes in the budget.
    held: Reservation,
    bytes: Vec<u8>,
    kind: BodyKind,
    prompts: RawPrompts,
}

/// One job on tokio's blocking pool (one thread hand-off each way, which matters on a busy
/// machine): image header → the request's bytes in the budget ([`budget::segment_bytes`]) →
/// decode + preprocess → the task's batch (`TaskPool::segment`) → mask + PNG. A request that
/// timed out while waiting is not run. The admission and the reservation move into the job,
/// so they are held until its memory is freed, even when the request timed out before.
async fn run_segment(
    st: &Arc<AppState>,
    pool: &Arc<TaskPool>,
    work: Work,
    t0: Instant,
) -> Result<(SegmentResult, Vec<u8>), ApiError> {
    let Work {
        admission,
        mut held,
        bytes,
        kind,
        prompts,
    } = work;
    if bytes.is_empty() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "empty request body: send a PNG or JPEG image (raw body, or multipart field `file`)",
        ));
    }
    let s = pool.input_size();
    let (resize, threshold) = (st.resize, st.threshold);
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(cancelled.clone());
    let job_pool = pool.clone();
    let job_st = st.clone();
    let job = move || -> Result<_, ApiError> {
        let img = match &kind {
            BodyKind::Raw => &bytes[..],
            BodyKind::Multipart(ct) => {
                wire::multipart_image(ct, &bytes).map_err(|m| err(StatusCode::BAD_REQUEST, m))?
            }
        };
        if img.is_empty() {
            return Err(err(StatusCode::BAD_REQUEST, "the image field is empty"));
        }
        let bad = |e: crate::error::Error| err(StatusCode::BAD_REQUEST, e.to_string());
        let header = imgio::header_of_bytes("request body", img).map_err(bad)?;
        let need = budget::segment_bytes(
            bytes.len() as u64,
            header.width,
            header.height,
            header.decoded_bytes,
            s,
        );
        held.grow_to(need).map_err(|r| {
            job_st.refused(
                &format!(
                    "task `{}`, a {}×{} image",
                    job_pool.name, header.width, header.height
                ),
                r,
            )
        })?;
        let rgb = imgio::decode_rgb_bytes("request body", img).map_err(bad)?;
        drop(bytes);
        let size = (rgb.height() as usize, rgb.width() as usize);
        let frame = prompts
            .to_frame(size, s, resize)
            .map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
        let chw = mask::preprocess(&rgb, s, resize);
        drop(rgb);
        if cancelled.load(Ordering::Acquire) {
            return Err(err(StatusCode::GATEWAY_TIMEOUT, "cancelled"));
        }
        // Batched with the task's other queued requests (`TaskPool::segment`).
        let tq = Instant::now();
        let ran = job_pool.segment(chw, frame, cancelled.clone());
        let waited_ms = tq.elapsed().as_secs_f64() * 1e3;
        drop(admission);
        let ran = ran.map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let inference_ms = ran.inference_ms;
        let queue_ms = (waited_ms - inference_ms).max(0.0);
        let m = mask::postprocess(&ran.logits, ran.size, resize, size, threshold)
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|nf| {
                err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("task `{}`: {nf}", job_pool.name),
                )
            })?;
        let png = m
            .png()
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let (h, w) = size;
        let area = m.area();
        Ok((
            SegmentResult {
                task: job_pool.name.clone(),
                width: w,
                height: h,
                mask_area: area,
                mask_fraction: area as f64 / (w.saturating_mul(h)).max(1) as f64,
                mean_probability: m.mean_probability(),
                threshold,
                inference_ms,
                queue_ms,
                total_ms: 0.0,
            },
            png,
        ))
    };
    let (mut summary, png) = tokio::task::spawn_blocking(job).await.map_err(internal)??;
    summary.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok((summary, png))
}

fn internal(e: tokio::task::JoinError) -> ApiError {
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error while segmenting ({e}); the server keeps serving"),
    )
}

fn png_response((summary, png): (SegmentResult, Vec<u8>)) -> Response {
    let mut r = ([(header::CONTENT_TYPE, "image/png")], Body::from(png)).into_response();
    let h = r.headers_mut();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put("x-mask-area", summary.mask_area.to_string());
    put(
        "x-mean-probability",
        format!("{:.6}", summary.mean_probability),
    );
    put("x-inference-ms", format!("{:.3}", summary.inference_ms));
    put("x-total-ms", format!("{:.3}", summary.total_ms));
    put(
        "x-result",
        serde_json::to_string(&summary).unwrap_or_default(),
    );
    r
}

/// Most prompt points per request.
pub const MAX_POINTS: usize = 16;

/// Prompts as the query gives them, in the original image's pixels.
#[derive(Debug, Clone, Default)]
pub struct RawPrompts {
    pub points: Vec<(f32, f32, f32)>,
    pub boxes: Option<(f32, f32, f32, f32)>,
}

fn numbers(s: &str, what: &str) -> Result<Vec<f32>, String> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{what} `{s}`: `{v}` is not a finite number"))
        })
        .collect()
}

/// `x,y,label;x,y,label…` (label 1 foreground, 0 background).
pub fn parse_points(s: &str) -> Result<Vec<(f32, f32, f32)>, String> {
    let mut out = Vec::new();
    for p in s.split(';').filter(|p| !p.trim().is_empty()) {
        if out.len() == MAX_POINTS {
            return Err(format!("points: at most {MAX_POINTS}"));
        }
        match *numbers(p, "point")?.as_slice() {
            [x, y, l] if l == 0.0 || l == 1.0 => out.push((x, y, l)),
            [_, _, l] => {
                return Err(format!(
                    "point `{p}`: label {l} (expected 1 foreground or 0 background)"
                ))
            }
            _ => return Err(format!("point `{p}`: expected x,y,label")),
        }
    }
    if out.is_empty() {
        return Err("points: none given (expected x,y,label;…)".into());
    }
    Ok(out)
}

/// `x0,y0,x1,y1` with x0 < x1, y0 < y1.
pub fn parse_box(s: &str) -> Result<(f32, f32, f32, f32), String> {
    match *numbers(s, "box")?.as_slice() {
        [x0, y0, x1, y1] if x0 < x1 && y0 < y1 => Ok((x0, y0, x1, y1)),
        [_, _, _, _] => Err(format!("box `{s}`: need x0 < x1 and y0 < y1")),
        _ => Err(format!("box `{s}`: expected x0,y0,x1,y1")),
    }
}

impl RawPrompts {
    /// Checked against the image `(h, w)` and scaled into the `S × S` input frame (as SAM's
    /// `ResizeLongestSide.apply_coords`, or both axes for squash).
    pub fn to_frame(
        &self,
        (h, w): (usize, usize),
        s: usize,
        resize: Resize,
    ) -> Result<ObjectPrompt, String> {
        let (sy, sx) = resize.scale((h, w), s);
        let inside = |x: f32, y: f32| x >= 0.0 && y >= 0.0 && x <= w as f32 && y <= h as f32;
        let mut points = Vec::with_capacity(self.points.len());
        for &(x, y, l) in &self.points {
            if !inside(x, y) {
                return Err(format!("point ({x}, {y}) is outside the {w}×{h} image"));
            }
            points.push((x * sx, y * sy, l));
        }
        let boxes = match self.boxes {
            Some((x0, y0, x1, y1)) => {
                if !inside(x0, y0) || !inside(x1, y1) {
                    return Err(format!(
                        "box ({x0}, {y0}, {x1}, {y1}) is outside the {w}×{h} image"
                    ));
                }
                Some((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
            }
            None => None,
        };
        Ok(ObjectPrompt {
            bbox: boxes.map(|(x0, y0, x1, y1)| [x0, y0, x1, y1]),
            labels: points.iter().map(|p| p.2).collect(),
            points: points.iter().map(|p| [p.0, p.1]).collect(),
            pixels: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_parse_and_scale_into_the_input_frame() {
        let p = RawPrompts {
            points: parse_points("100,50,1; 0,0,0").unwrap(),
            boxes: Some(parse_box("10,20,190,80").unwrap()),
        };
        // 200×100 (w×h) image, S = 64: squash scales x by 64/200 and y by 64/100.
        let f = p.to_frame((100, 200), 64, Resize::Squash).unwrap();
        assert_eq!((f.points[0], f.labels[0]), ([32.0, 32.0], 1.0));
        let b = f.bbox.unwrap();
        for (got, want) in [(b[0], 3.2), (b[1], 12.8), (b[2], 60.8), (b[3], 51.2)] {
            assert!((got - want).abs() < 1e-4, "{b:?}");
        }
        // Longest side to 64: both axes by 64/200 (SAM's ResizeLongestSide.apply_coords).
        let f = p.to_frame((100, 200), 64, Resize::LongestSidePad).unwrap();
        assert_eq!((f.points[0], f.labels[0]), ([32.0, 16.0], 1.0));
        assert!(
            p.to_frame((40, 200), 64, Resize::Squash).is_err(),
            "y 50 > h 40"
        );
        assert!(parse_points("").is_err());
        assert!(parse_points(&"1,1,1;".repeat(MAX_POINTS + 1)).is_err());
        assert!(parse_box("1,2,3").is_err());
        assert!(parse_points("1,inf,1").is_err());
    }
}
