//! `gps-seg serve --task NAME=FILE.onnx [--task NAME2=…]`: the HTTP server of `gps_seg::serve`
//! until SIGTERM/SIGINT.

use super::progress::Progress;
use gps_seg::progress::{Event, Observer};
use gps_seg::serve::{ServeConfig, Server, TaskSpec};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A task: NAME=FILE.onnx (an export, or a task file of `export --base-onnx`); repeat for
    /// more tasks. Loaded at start.
    #[arg(
        long = "task",
        value_name = "NAME=FILE",
        required_unless_present = "tasks_dir"
    )]
    pub tasks: Vec<String>,
    /// Serve every task file in DIR (named by file stem, loaded on first use), and store tasks
    /// added with `PUT /v1/tasks/NAME` here.
    #[arg(long)]
    pub tasks_dir: Option<PathBuf>,
    /// Most tasks loaded at once; beyond, the least recently used is unloaded.
    #[arg(long, default_value_t = 64)]
    pub max_loaded: usize,
    /// Most images of one task run as one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Run each task file on sessions of its own instead of on its base held once per process.
    #[arg(long)]
    pub no_shared_base: bool,
    /// Largest task file `PUT /v1/tasks/NAME` accepts (bytes).
    #[arg(long, default_value_t = 512 << 20)]
    pub max_task_bytes: usize,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// ONNX Runtime sessions per task (requests of one task run in parallel up to this).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Intra-op threads per session (0: ONNX Runtime's default, all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Requests per task that may wait beyond its busy sessions; the next gets 503 +
    /// Retry-After.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Largest request body (bytes).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Largest image (width × height), checked from the header before decoding.
    #[arg(long, default_value_t = gps_seg::data::imgio::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// One memory budget for all requests in flight, every task together (bytes): bodies,
    /// decoded images (estimated from the header before decoding), model input and output.
    /// A request that does not fit gets 503 + Retry-After (413 if it never could).
    #[arg(long, default_value_t = gps_seg::serve::budget::DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: u64,
    /// Seconds from a request's arrival to its answer (else 504).
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Seconds a request's headers may take (from the connection's accept, or the request's
    /// first byte on a keep-alive connection); slower connections are closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout_s: f64,
    /// Seconds a keep-alive connection may wait for its next request before it is closed.
    #[arg(long, default_value_t = 30.0)]
    pub idle_timeout_s: f64,
    /// Probability threshold of the masks.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    /// squash (GPS reference) or pad (SAM's longest side + padding), as `infer --resize`.
    #[arg(long, default_value = "squash")]
    pub resize: String,
    /// libonnxruntime.so to use (otherwise searched, and fetched once when missing).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // A client that goes away mid-answer must not stop the server (main restores SIGPIPE's
    // default for command-line pipes).
    #[cfg(unix)]
    // SAFETY: changes only the SIGPIPE disposition, before the server's threads start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    gps_seg::data::imgio::set_max_pixels(args.max_pixels)?;
    let tasks = args
        .tasks
        .iter()
        .map(|t| TaskSpec::parse(t))
        .collect::<gps_seg::Result<Vec<_>>>()?;
    let secs = |flag: &str, v: f64| -> anyhow::Result<Duration> {
        if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
            anyhow::bail!("--{flag} {v}: must be above 0 and at most 3600");
        }
        Ok(Duration::from_secs_f64(v))
    };
    let mut cfg = ServeConfig::new(tasks);
    cfg.host = args.host;
    cfg.port = args.port;
    cfg.sessions = args.sessions;
    cfg.threads = args.threads;
    cfg.queue = args.queue;
    cfg.max_body_bytes = args.max_body_bytes;
    cfg.timeout = secs("timeout-s", args.timeout_s)?;
    cfg.header_timeout = secs("header-timeout-s", args.header_timeout_s)?;
    cfg.idle_timeout = secs("idle-timeout-s", args.idle_timeout_s)?;
    cfg.max_inflight_bytes = args.max_inflight_bytes;
    cfg.threshold = args.threshold;
    cfg.resize = super::common::parse_resize(&args.resize)?;
    cfg.ort_lib = args.ort_lib;
    cfg.tasks_dir = args.tasks_dir;
    cfg.max_loaded = args.max_loaded;
    cfg.max_batch = args.max_batch;
    cfg.shared_base = !args.no_shared_base;
    cfg.max_task_bytes = args.max_task_bytes;
    let mut progress = Progress::new(true);
    let server = Server::bind(&cfg, &mut progress)?;
    for t in server.tasks().iter().filter(|t| t.loaded) {
        progress.event(Event::Info(format!(
            "task `{}`: {} ({}×{}, {} session(s){})",
            t.name,
            t.model,
            t.input_size,
            t.input_size,
            t.sessions,
            match &t.base_file {
                Some(b) => format!(", on the shared base {b}"),
                None => String::new(),
            }
        )));
    }
    // One line on stdout with the address (scripts read it; port 0 picks a free one).
    println!("listening on http://{}", server.addr());
    server.run_until_signal(&mut progress)?;
    eprintln!("stopped");
    Ok(())
}
