//! `gps-seg bench serve-tasks`: memory and latency of many GPS tasks served on one base, side by
//! side with one merged model in one session.
//!
//! Setup: a seeded random-init SAM base and N synthetic GPS task files on it
//! ([`super::tasks::synthetic_task`], `export --base-onnx` layout), and task 0's merged model.
//! Two `gps-seg serve` child processes run at once: one with `--tasks-dir` over the task files
//! (`--max-loaded` = the largest count), one with the merged model as its only task. Every
//! request is an HTTP POST of the same image from this process (127.0.0.1, one request at a
//! time, batch 1, the same intra-op threads in both servers).
//!
//! For each task count n (ascending): one request to each of the first n tasks loads them,
//! then the tasks server's RSS (`VmRSS` of `/proc/PID/status`) is read: RSS(n loaded). The
//! marginal memory of a task is `(RSS(n) − RSS(1)) / (n − 1)`. Latency: `requests` requests
//! alternating between the two servers (paired, so drift hits both), the task requests
//! round-robin over the n loaded tasks (every request switches task: the worst case for
//! patching); p50 / p99 of the client-side time, and the ratio of the medians.

use crate::error::{Error, Result};
use crate::onnx::delta::{export_sam_task, SamGraph};
use crate::onnx::sam::{export_prompt_free, random_sam_weights, SamExportOptions};
use crate::progress::{Event, Observer};
use crate::sam::SamConfig;
use crate::serve::client::Client;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ServeTasksConfig {
    pub sam: SamConfig,
    /// Task counts, ascending (the largest is how many task files are made).
    pub counts: Vec<usize>,
    /// Requests per server and count for the latency columns.
    pub requests: usize,
    /// Intra-op threads of both servers (0: ONNX Runtime's default).
    pub threads: usize,
    /// The `gps-seg` binary to start the servers with.
    pub exe: PathBuf,
}

/// One row: a task count.
#[derive(Debug, Clone)]
pub struct ServeTasksRow {
    pub tasks: usize,
    /// RSS of the tasks server after one request to each of `tasks` tasks, bytes.
    pub rss_loaded: u64,
    /// RSS of the tasks server after the row's latency requests too (the session's run
    /// buffers grown as far as these requests grow them), bytes: the marginal memory of a task
    /// is read from this column, so both rows hold the same warm-up.
    pub rss_after: u64,
    /// Loaded tasks the server reports (≤ tasks).
    pub loaded: usize,
    pub task_p50_ms: f64,
    pub task_p99_ms: f64,
    pub merged_p50_ms: f64,
    pub merged_p99_ms: f64,
}

/// The whole measurement.
#[derive(Debug, Clone)]
pub struct ServeTasksReport {
    pub task_file_bytes: u64,
    pub base_bytes: u64,
    pub merged_bytes: u64,
    /// RSS of the tasks server before any request (base not loaded yet), and of the merged
    /// server after its first request.
    pub rss_idle: u64,
    pub rss_merged: u64,
    pub make_s: f64,
    pub rows: Vec<ServeTasksRow>,
}

/// A child `gps-seg serve`, killed on drop.
struct ServeChild {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeChild {
    fn start(exe: &Path, args: &[String]) -> Result<ServeChild> {
        let mut child = Command::new(exe)
            .arg("serve")
            .args(args)
            .args(["--port", "0", "--timeout-s", "600"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::msg(format!("cannot start {} serve: {e}", exe.display())))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| Error::msg("serve child has no stdout"))?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| Error::msg(format!("reading the serve child's address: {e}")))?;
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                let _ = child.kill();
                Error::msg(format!(
                    "serve child did not start (first line: `{}`)",
                    line.trim()
                ))
            })?;
        Ok(ServeChild { child, addr })
    }

    fn rss(&self) -> u64 {
        crate::util::mem::status_bytes(Some(self.child.id()), "VmRSS").unwrap_or(0)
    }
}

fn segment(c: &mut Client, task: &str, png: &[u8]) -> Result<f64> {
    let t = Instant::now();
    let r = c.send(
        "POST",
        &format!("/v1/segment?task={task}"),
        &[("Content-Type", "image/png")],
        png,
    )?;
    if r.status != 200 {
        return Err(Error::msg(format!(
            "task `{task}`: HTTP {}: {}",
            r.status,
            r.text().trim()
        )));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn loaded_tasks(c: &mut Client) -> Result<usize> {
    let r = c.send("GET", "/v1/tasks", &[], &[])?;
    let v: serde_json::Value =
        serde_json::from_str(&r.text()).map_err(|e| Error::msg(format!("GET /v1/tasks: {e}")))?;
    Ok(v["tasks"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|t| t["loaded"] == true).count()))
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    crate::serve::metrics::quantile(&v, q)
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Make the files in `dir` and measure (see the module docs).
pub fn run(cfg: &ServeTasksConfig, dir: &Path, obs: &mut dyn Observer) -> Result<ServeTasksReport> {
    let max = cfg.counts.iter().copied().max().unwrap_or(1);
    let t0 = Instant::now();
    let base = random_sam_weights(&cfg.sam, 2024)?;
    let opts = SamExportOptions::default();
    let tasks_dir = dir.join("tasks");
    std::fs::create_dir_all(&tasks_dir).map_err(|e| Error::io(&tasks_dir, e))?;
    let base_path = tasks_dir.join("base.onnx");
    obs.event(Event::PhaseStart {
        name: "task files".into(),
        total: max,
    });
    let mut first_art = None;
    for i in 0..max {
        let art = super::tasks::synthetic_task(&base, 7000 + i as u64)?;
        export_sam_task(
            SamGraph::PromptFree,
            &cfg.sam,
            &base,
            &art,
            opts,
            &base_path,
            &tasks_dir.join(format!("t{i:03}.onnx")),
        )?;
        if i == 0 {
            first_art = Some(art);
        }
        obs.event(Event::Step {
            done: i + 1,
            loss: None,
            lr: None,
            images_per_s: None,
        });
    }
    obs.event(Event::PhaseEnd {
        summary: format!("{max} task files"),
    });
    let art = first_art.ok_or_else(|| Error::msg("no task made"))?;
    let merged = crate::gps::merge(&base, &art)?;
    drop(base);
    let merged_path = dir.join("t000-merged.onnx");
    crate::onnx::write_model(&merged_path, export_prompt_free(&cfg.sam, &merged, opts)?.0)?;
    drop(merged);
    let make_s = t0.elapsed().as_secs_f64();
    let threads = cfg.threads.to_string();
    let s = |x: &str| x.to_string();
    let tasks_srv = ServeChild::start(
        &cfg.exe,
        &[
            s("--tasks-dir"),
            tasks_dir.display().to_string(),
            s("--max-loaded"),
            max.to_string(),
            s("--threads"),
            threads.clone(),
        ],
    )?;
    let merged_srv = ServeChild::start(
        &cfg.exe,
        &[
            s("--task"),
            format!("merged={}", merged_path.display()),
            s("--threads"),
            threads,
        ],
    )?;
    let png = crate::data::imgio::encode_png(&crate::data::synth_kvasir::render(1, 0, 320).image)?;
    let timeout = Duration::from_secs(600);
    let mut tc = Client::connect(tasks_srv.addr, timeout)?;
    let mut mc = Client::connect(merged_srv.addr, timeout)?;
    let rss_idle = tasks_srv.rss();
    segment(&mut mc, "merged", &png)?;
    let rss_merged = merged_srv.rss();
    let name = |i: usize| format!("t{i:03}");
    let mut rows = Vec::new();
    let mut warm = 0usize;
    for &n in &cfg.counts {
        obs.event(Event::Info(format!("{n} task(s) loaded: measuring")));
        while warm < n {
            segment(&mut tc, &name(warm), &png)?;
            warm += 1;
        }
        // Fresh connections for the measured requests: the merged server's connection sat
        // idle while the tasks loaded, longer than a server keeps an idle connection.
        tc = Client::connect(tasks_srv.addr, timeout)?;
        mc = Client::connect(merged_srv.addr, timeout)?;
        let rss_loaded = tasks_srv.rss();
        let loaded = loaded_tasks(&mut tc)?;
        let (mut lt, mut lm) = (Vec::new(), Vec::new());
        for r in 0..cfg.requests {
            lt.push(segment(&mut tc, &name(r % n), &png)?);
            lm.push(segment(&mut mc, "merged", &png)?);
        }
        rows.push(ServeTasksRow {
            tasks: n,
            rss_loaded,
            rss_after: tasks_srv.rss(),
            loaded,
            task_p50_ms: pct(lt.clone(), 0.5),
            task_p99_ms: pct(lt, 0.99),
            merged_p50_ms: pct(lm.clone(), 0.5),
            merged_p99_ms: pct(lm, 0.99),
        });
    }
    Ok(ServeTasksReport {
        task_file_bytes: len(&tasks_dir.join("t000.onnx")),
        base_bytes: len(&base_path) + len(&tasks_dir.join("base.onnx.data")),
        merged_bytes: len(&merged_path),
        rss_idle,
        rss_merged,
        make_s,
        rows,
    })
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// The report as markdown tables.
pub fn markdown(r: &ServeTasksReport) -> String {
    let mut s = format!(
        "task file {} MB, base {} MB (with its data), merged model {} MB; files made in {:.0} s\n\
         RSS of the tasks server before any request: {} MB; of the merged server after one \
         request: {} MB\n\n\
         | tasks loaded | RSS after loading | RSS after the requests | per task beyond the first \
         | × task file | task p50 | task p99 | merged p50 | merged p99 | p50 task / merged |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        mb(r.task_file_bytes),
        mb(r.base_bytes),
        mb(r.merged_bytes),
        r.make_s,
        mb(r.rss_idle),
        mb(r.rss_merged),
    );
    // Marginal memory between rows at the same warm-up: after each row's requests.
    let first = r.rows.first().map(|x| (x.tasks, x.rss_after));
    for x in &r.rows {
        let marginal = match first {
            Some((n1, r1)) if x.tasks > n1 => {
                let per = (x.rss_after as f64 - r1 as f64) / (x.tasks - n1) as f64;
                (
                    format!("{:.1} MB", per / 1e6),
                    format!("{:.2}", per / r.task_file_bytes.max(1) as f64),
                )
            }
            _ => ("—".into(), "—".into()),
        };
        s.push_str(&format!(
            "| {} ({} reported) | {} MB | {} MB | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.3} |\n",
            x.tasks,
            x.loaded,
            mb(x.rss_loaded),
            mb(x.rss_after),
            marginal.0,
            marginal.1,
            x.task_p50_ms,
            x.task_p99_ms,
            x.merged_p50_ms,
            x.merged_p99_ms,
            x.task_p50_ms / x.merged_p50_ms.max(1e-9)
        ));
    }
    s
}
