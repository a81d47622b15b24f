//! `gps-seg bench serve`: a bounded closed-loop load generator against `gps_seg::serve` on
//! localhost, beside plain ONNX Runtime on the same engine and images (batch 1, no HTTP).
//!
//! The models: task 0 is the given SAM weights exported prompt-free, tasks 1… are the same
//! architecture with seeded random weights (same cost per image), written to a temp folder.
//! The images: synthetic Kvasir-shaped PNGs held in memory. Plain rows run one image at a time
//! through (a) the engine only and (b) what `infer` does per image (decode, resize, model,
//! back to the original resolution, PNG). Serve rows start a server in this process on an
//! ephemeral port with `tasks` tasks (requests round-robin over the tasks and images), then
//! `clients` threads each send requests back to back on one keep-alive connection until
//! `requests` have been sent; every latency is measured by the client (connection reuse,
//! request write, server, response read). The server and the clients share the CPU. With one
//! client, each request is paired with a plain pipeline run on the same image (and the same
//! task's model, in a session of its own) just before it,
//! and the serving overhead is the median of (serve latency − plain pipeline time) over the
//! median plain model time: a machine busy with other work slows both halves of a pair alike.

use crate::data::imgio;
use crate::data::synth_kvasir::render;
use crate::error::{Error, Result};
use crate::infer::engine::{Engine, OrtEngine};
use crate::infer::mask;
use crate::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use crate::progress::{Event, Observer};
use crate::sam::SamConfig;
use crate::serve::client::Client;
use crate::serve::metrics::quantile;
use crate::serve::{ServeConfig, Server, TaskSpec};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ServeBenchConfig {
    pub sam: SamConfig,
    /// Weights of task 0 (`None`: seeded random weights).
    pub checkpoint: Option<PathBuf>,
    /// Task counts to serve, one set of rows each (e.g. 1 and 3).
    pub task_counts: Vec<usize>,
    /// Concurrent clients, one set of rows each (e.g. 1 and 4).
    pub clients: Vec<usize>,
    /// Requests per row (after one warm-up request per task).
    pub requests: usize,
    /// Sessions per task.
    pub sessions: usize,
    /// ONNX Runtime intra-op threads per session (and for the plain rows).
    pub threads: usize,
    /// Distinct images cycled through.
    pub images: usize,
    /// Largest image side.
    pub max_side: usize,
    pub ort_lib: Option<PathBuf>,
}

/// Largest `requests` per row.
pub const MAX_REQUESTS: usize = 1_000_000;

/// One measured row.
#[derive(Debug, Clone)]
pub struct ServeBenchRow {
    /// `plain ORT: model only`, `plain ORT: infer pipeline`, or `serve`.
    pub mode: String,
    pub tasks: usize,
    pub clients: usize,
    pub requests: usize,
    /// Answers that were not 200 (or failed to arrive).
    pub errors: usize,
    pub seconds: f64,
    pub per_s: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Mean time in the ONNX Runtime session per request (serve: from `X-Inference-Ms`).
    pub model_ms: f64,
    /// Resident memory after the row (VmRSS), MB.
    pub rss_mb: f64,
    /// Peak resident memory of the process so far (VmHWM, monotonic), MB.
    pub peak_rss_mb: f64,
    /// Serve rows: what starting the server and one request per task added to the resident
    /// memory (its sessions, runtime and buffers), MB.
    pub server_mb: Option<f64>,
}

/// The rows and the overhead figure.
#[derive(Debug, Clone)]
pub struct ServeBenchReport {
    pub rows: Vec<ServeBenchRow>,
    /// (tasks, overhead) for each task count measured with 1 client ([`Overhead`]): the median of
    /// (serve latency − plain pipeline time) over requests each paired with a plain run on the
    /// same image, over the median plain model time.
    pub overhead_pct: Vec<(usize, Overhead)>,
    /// Bytes of one task's model file.
    pub model_bytes: u64,
    pub image_sizes: Vec<(u32, u32)>,
}

fn rss_mb() -> f64 {
    let kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        });
    kb.map_or(0.0, |k| k / 1024.0)
}

fn stats(mode: &str, tasks: usize, clients: usize, lat_s: &mut [f64], wall: f64) -> ServeBenchRow {
    lat_s.sort_by(f64::total_cmp);
    let n = lat_s.len();
    let mean = lat_s.iter().sum::<f64>() / n.max(1) as f64;
    ServeBenchRow {
        mode: mode.into(),
        tasks,
        clients,
        requests: n,
        errors: 0,
        seconds: wall,
        per_s: n as f64 / wall.max(1e-12),
        mean_ms: mean * 1e3,
        p50_ms: quantile(lat_s, 0.5) * 1e3,
        p95_ms: quantile(lat_s, 0.95) * 1e3,
        p99_ms: quantile(lat_s, 0.99) * 1e3,
        model_ms: 0.0,
        rss_mb: rss_mb(),
        peak_rss_mb: crate::util::mem::peak_rss_mb(),
        server_mb: None,
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Export the models, run the plain rows, then one serve row per (task count, clients).
pub fn run(cfg: &ServeBenchConfig, obs: &mut dyn Observer) -> Result<ServeBenchReport> {
    let bad = |field: &str, msg: &str| Error::Config {
        field: field.into(),
        msg: msg.into(),
    };
    if cfg.task_counts.is_empty() || cfg.task_counts.iter().any(|&t| t == 0 || t > 16) {
        return Err(bad("tasks", "task counts must be 1 to 16"));
    }
    if cfg.clients.is_empty() || cfg.clients.iter().any(|&c| c == 0 || c > 256) {
        return Err(bad("clients", "client counts must be 1 to 256"));
    }
    if cfg.requests == 0 || cfg.requests > MAX_REQUESTS {
        return Err(bad("requests", "must be 1 to 1000000"));
    }
    if cfg.images == 0 || cfg.images > 256 {
        return Err(bad("images", "must be 1 to 256"));
    }
    if !(16..=2048).contains(&cfg.max_side) {
        return Err(bad("max_side", "must be 16 to 2048"));
    }
    let dir =
        TempDir(std::env::temp_dir().join(format!("gps-seg-bench-serve-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| Error::io(&dir.0, e))?;
    let max_tasks = cfg.task_counts.iter().copied().max().unwrap_or(1);
    let mut models = Vec::new();
    for t in 0..max_tasks {
        let w = match (&cfg.checkpoint, t) {
            (Some(p), 0) => crate::sam::load_weights(p, &cfg.sam, &candle_core::Device::Cpu)?,
            _ => random_sam_weights(&cfg.sam, t as u64 + 1)?,
        };
        let (m, _) = export_prompt_free(&cfg.sam, &w, SamExportOptions::default())?;
        let p = dir.0.join(format!("task{t}.onnx"));
        crate::onnx::write_model(&p, m)?;
        models.push(p);
    }
    let model_bytes = std::fs::metadata(&models[0])
        .map_err(|e| Error::io(&models[0], e))?
        .len();
    let mut images = Vec::new();
    let mut image_sizes = Vec::new();
    for i in 0..cfg.images {
        let im = render(17, i, cfg.max_side).image;
        image_sizes.push(im.dimensions());
        images.push(imgio::encode_png(&im)?);
    }
    obs.event(Event::Info(format!(
        "{} task model(s) of {:.1} MB; {} images",
        models.len(),
        model_bytes as f64 / 1e6,
        images.len()
    )));

    // Plain ONNX Runtime, one image at a time.
    let engine = OrtEngine::load(&models[0], cfg.threads, cfg.ort_lib.as_deref(), obs)?;
    let s = engine.input_size();
    let n = cfg.requests;
    let resize = crate::data::resize::Resize::Squash;
    let decoded: Vec<_> = images
        .iter()
        .map(|b| imgio::decode_rgb_bytes("bench image", b))
        .collect::<Result<_>>()?;
    let inputs: Vec<Vec<f32>> = decoded
        .iter()
        .map(|rgb| mask::preprocess(rgb, s, resize))
        .collect();
    engine.logits(&inputs[0], 1)?; // warm-up
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        engine.logits(&inputs[i % inputs.len()], 1)?;
        lat.push(t.elapsed().as_secs_f64());
    }
    let mut model_row = stats(
        "plain ORT: model only",
        1,
        1,
        &mut lat,
        t0.elapsed().as_secs_f64(),
    );
    model_row.model_ms = model_row.mean_ms;
    let mut lat = Vec::with_capacity(n);
    let mut model_s = 0.0;
    let t0 = Instant::now();
    for i in 0..n {
        let (t, m) = plain_pipeline(&engine, &images[i % images.len()])?;
        model_s += m;
        lat.push(t);
    }
    let mut pipe_row = stats(
        "plain ORT: infer pipeline",
        1,
        1,
        &mut lat,
        t0.elapsed().as_secs_f64(),
    );
    pipe_row.model_ms = model_s * 1e3 / n as f64;
    let mut rows = vec![model_row, pipe_row];
    let mut plain = vec![engine];
    let mut overhead_pct = Vec::new();

    for &tasks in &cfg.task_counts {
        let specs = (0..tasks)
            .map(|t| TaskSpec {
                name: format!("task{t}"),
                model: models[t].clone(),
            })
            .collect();
        let mut sc = ServeConfig::new(specs);
        sc.port = 0;
        sc.sessions = cfg.sessions;
        sc.threads = cfg.threads;
        sc.queue = cfg.clients.iter().copied().max().unwrap_or(1);
        sc.timeout = Duration::from_secs(120);
        sc.ort_lib = cfg.ort_lib.clone();
        // Plain engines for the paired 1-client rows: one per task, as the server has.
        while plain.len() < tasks {
            let t = plain.len();
            plain.push(OrtEngine::load(
                &models[t],
                cfg.threads,
                cfg.ort_lib.as_deref(),
                obs,
            )?);
        }
        let rss_before = rss_mb();
        let server = Server::bind(&sc, obs)?;
        let addr = server.addr();
        for t in 0..tasks {
            let mut c = Client::connect(addr, Duration::from_secs(60))?;
            let r = c.send(
                "POST",
                &format!("/v1/segment?task=task{t}"),
                &[],
                &images[0],
            )?;
            if r.status != 200 {
                return Err(Error::msg(format!(
                    "bench serve: warm-up request to task{t} answered {}: {}",
                    r.status,
                    r.text()
                )));
            }
        }
        let server_mb = rss_mb() - rss_before;
        for &clients in &cfg.clients {
            obs.event(Event::Info(format!(
                "serve: {tasks} task(s), {clients} client(s), {n} requests"
            )));
            if clients == 1 {
                let (mut row, pct) = paired_row(&plain[..tasks], addr, &images, n)?;
                row.server_mb = Some(server_mb);
                overhead_pct.push((tasks, pct));
                rows.push(row);
                continue;
            }
            let next = AtomicUsize::new(0);
            let results: Mutex<Vec<(f64, f64, bool)>> = Mutex::new(Vec::with_capacity(n));
            let t0 = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..clients {
                    scope.spawn(|| {
                        let mut local = Vec::new();
                        let mut conn = Client::connect(addr, Duration::from_secs(120)).ok();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            let path = format!("/v1/segment?task=task{}", i % tasks);
                            let body = &images[i % images.len()];
                            let t = Instant::now();
                            let r = match conn.as_mut() {
                                Some(c) => c.send("POST", &path, &[], body),
                                None => Err(Error::msg("not connected")),
                            };
                            let dt = t.elapsed().as_secs_f64();
                            match r {
                                Ok(r) if r.status == 200 => {
                                    let m = r
                                        .header("x-inference-ms")
                                        .and_then(|v| v.parse::<f64>().ok())
                                        .unwrap_or(0.0);
                                    local.push((dt, m, true));
                                }
                                _ => {
                                    local.push((dt, 0.0, false));
                                    conn = Client::connect(addr, Duration::from_secs(120)).ok();
                                }
                            }
                        }
                        if let Ok(mut g) = results.lock() {
                            g.extend(local);
                        }
                    });
                }
            });
            let wall = t0.elapsed().as_secs_f64();
            let results = results.into_inner().unwrap_or_default();
            let errors = results.iter().filter(|r| !r.2).count();
            let ok: Vec<&(f64, f64, bool)> = results.iter().filter(|r| r.2).collect();
            let mut lat: Vec<f64> = results.iter().map(|r| r.0).collect();
            let mut row = stats("serve", tasks, clients, &mut lat, wall);
            row.errors = errors;
            row.model_ms = ok.iter().map(|r| r.1).sum::<f64>() / ok.len().max(1) as f64;
            row.server_mb = Some(server_mb);
            rows.push(row);
        }
        server.shutdown()?;
    }
    Ok(ServeBenchReport {
        rows,
        overhead_pct,
        model_bytes,
        image_sizes,
    })
}

/// What `infer` does to one image, on `engine`: decode, resize, model, back to the original
/// resolution, PNG. Returns (seconds in all, seconds in the model).
fn plain_pipeline(engine: &OrtEngine, bytes: &[u8]) -> Result<(f64, f64)> {
    let resize = crate::data::resize::Resize::Squash;
    let t = Instant::now();
    let rgb = imgio::decode_rgb_bytes("bench image", bytes)?;
    let x = mask::preprocess(&rgb, engine.input_size(), resize);
    let tm = Instant::now();
    let l = engine.logits(&x, 1)?;
    let model = tm.elapsed().as_secs_f64();
    let size = (rgb.height() as usize, rgb.width() as usize);
    let m = mask::postprocess(l.image(0), l.size, resize, size, 0.5)?
        .map_err(|nf| Error::NonFinite(nf.to_string()))?;
    m.png()?;
    Ok((t.elapsed().as_secs_f64(), model))
}

/// The 1-client serve row, each request paired with a plain pipeline run on the same image
/// and the same task's model (`engines[i % tasks]`, a session of its own) just before it (so
/// a busy machine slows both alike). Returns the row (req/s = 1 / mean
/// latency) and the overhead: median(serve − plain) / median(plain model time), in %.
fn paired_row(
    engines: &[OrtEngine],
    addr: std::net::SocketAddr,
    images: &[Vec<u8>],
    n: usize,
) -> Result<(ServeBenchRow, Overhead)> {
    let mut conn = Client::connect(addr, Duration::from_secs(120))?;
    let (mut lat, mut diff, mut plain_model, mut served_model) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut errors = 0;
    let tasks = engines.len().max(1);
    let (mut cpu_plain, mut cpu_serve, mut model_sum) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let body = &images[i % images.len()];
        let c0 = cpu_seconds();
        let (pt, pm) = plain_pipeline(&engines[i % tasks], body)?;
        let c1 = cpu_seconds();
        let t = Instant::now();
        let r = conn.send(
            "POST",
            &format!("/v1/segment?task=task{}", i % tasks),
            &[],
            body,
        )?;
        let dt = t.elapsed().as_secs_f64();
        let c2 = cpu_seconds();
        cpu_plain += c1 - c0;
        cpu_serve += c2 - c1;
        model_sum += pm;
        lat.push(dt);
        if r.status == 200 {
            diff.push(dt - pt);
            plain_model.push(pm);
            served_model.push(
                r.header("x-inference-ms")
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0),
            );
        } else {
            errors += 1;
        }
    }
    let wall: f64 = lat.iter().sum();
    let mut row = stats("serve", tasks, 1, &mut lat, wall);
    row.errors = errors;
    row.model_ms = served_model.iter().sum::<f64>() / served_model.len().max(1) as f64;
    diff.sort_by(f64::total_cmp);
    plain_model.sort_by(f64::total_cmp);
    let pct = quantile(&diff, 0.5) / quantile(&plain_model, 0.5).max(1e-12) * 100.0;
    let cpu_pct = (cpu_serve - cpu_plain) / model_sum.max(1e-12) * 100.0;
    Ok((
        row,
        Overhead {
            wall_pct: pct,
            cpu_pct,
        },
    ))
}

/// The serving overhead of one task count at 1 client, in % of the plain model time.
#[derive(Debug, Clone, Copy)]
pub struct Overhead {
    /// Median over paired requests of (serve latency − plain pipeline time), over the median
    /// plain model time.
    pub wall_pct: f64,
    /// (process CPU time of all serve requests − of all plain pipeline runs) over the summed
    /// plain model time: the extra work of serving (client included), whatever the waits
    /// for a core on a shared machine.
    pub cpu_pct: f64,
}

/// CPU time of the whole process (every thread: server, sessions, client), seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The current UTC time as `YYYY-MM-DD HH:MM` (for the table header).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_now_is_a_plausible_date() {
        let s = super::utc_now();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20"), "{s}");
        assert_eq!(&s[4..5], "-");
    }
}
