//! Counters behind `GET /metrics`, in Prometheus' text exposition format (version 0.0.4):
//! segmentation requests by task and status code, requests aborted by their client by task, a
//! latency summary per task (p50/p95/p99 over a bounded window of the most recent requests,
//! plus the running sum and count), the per-task gauges (requests queued, requests running)
//! that the pools keep, the memory budget for requests in flight ([`super::budget`]) and the
//! connections ([`ConnCounters`]: open, closed by the header-read or idle timeout, closed after
//! an answer sent before the body was read).
//!
//! Memory is bounded: the task label is one of the configured task names or `(unknown)`, the
//! status codes are those the server answers, and each window keeps [`WINDOW`] latencies.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Latencies kept per task for the quantiles.
pub const WINDOW: usize = 2048;

/// The label of requests naming no configured task.
pub const UNKNOWN_TASK: &str = "(unknown)";

#[derive(Debug, Default)]
struct Latencies {
    recent: VecDeque<f64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// (task label, status) → requests.
    requests: BTreeMap<(String, u16), u64>,
    /// task label → latencies of its answered requests (all status codes), seconds.
    latency: BTreeMap<String, Latencies>,
    /// task label → requests whose client stopped sending the body or went away unanswered.
    aborted: BTreeMap<String, u64>,
}

/// The server's request metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// The connection layer's counters.
    pub conns: std::sync::Arc<ConnCounters>,
}

/// What the connection layer counts (`super::conn`).
#[derive(Debug, Default)]
pub struct ConnCounters {
    /// Connections accepted so far.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Closed because a request's headers did not arrive within `--header-timeout-s`.
    pub header_timeouts: AtomicU64,
    /// Closed after `--idle-timeout-s` without a request.
    pub idle_timeouts: AtomicU64,
    /// Closed after an answer sent before the request's body was read (`Connection: close`,
    /// the rest of the body drained so the client reads the answer).
    pub closed_unread: AtomicU64,
}

/// Server-wide gauges read when rendering.
#[derive(Debug, Clone, Default)]
pub struct ServerGauges {
    /// Bytes reserved by requests in flight, their limit and the most reserved at once.
    pub inflight_bytes: u64,
    pub inflight_limit: u64,
    pub inflight_peak: u64,
    /// Requests refused because the budget could not hold them.
    pub budget_refused: u64,
}

/// Per-task gauges read when rendering.
#[derive(Debug, Clone)]
pub struct TaskGauges {
    pub task: String,
    pub sessions: usize,
    pub queued: usize,
    pub in_flight: usize,
    pub queue_capacity: usize,
}

/// The `q`-quantile (0 ≤ q ≤ 1) of `sorted` by the nearest-rank method; 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0.0)
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Record one answered segmentation request.
    pub fn record(&self, task: &str, status: u16, seconds: f64) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        *g.requests.entry((task.to_string(), status)).or_insert(0) += 1;
        let l = g.latency.entry(task.to_string()).or_default();
        if l.recent.len() == WINDOW {
            l.recent.pop_front();
        }
        l.recent.push_back(seconds);
        l.sum += seconds;
        l.count += 1;
    }

    /// Record a request whose client stopped sending its body (closed or half-closed the
    /// connection mid-body) or went away before it was answered.
    pub fn aborted(&self, task: &str) {
        if let Ok(mut g) = self.inner.lock() {
            *g.aborted.entry(task.to_string()).or_insert(0) += 1;
        }
    }

    /// Requests of `task` aborted so far.
    pub fn aborted_count(&self, task: &str) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.aborted.get(task).copied())
            .unwrap_or(0)
    }

    /// Requests answered so far for `task` with `status`.
    pub fn count(&self, task: &str, status: u16) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.requests.get(&(task.to_string(), status)).copied())
            .unwrap_or(0)
    }

    /// The Prometheus text page.
    pub fn render(&self, gauges: &[TaskGauges], server: &ServerGauges) -> String {
        let mut out = String::new();
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        out.push_str(
            "# HELP gps_seg_requests_total Segmentation requests answered, by task and HTTP status.\n\
             # TYPE gps_seg_requests_total counter\n",
        );
        for ((task, code), n) in &g.requests {
            let _ = writeln!(
                out,
                "gps_seg_requests_total{{task=\"{}\",code=\"{code}\"}} {n}",
                escape(task)
            );
        }
        out.push_str(
            "# HELP gps_seg_requests_aborted_total Segmentation requests whose client stopped \
             sending the body (closed or half-closed the connection mid-body) or went away \
             before the answer, by task.\n\
             # TYPE gps_seg_requests_aborted_total counter\n",
        );
        for (task, n) in &g.aborted {
            let _ = writeln!(
                out,
                "gps_seg_requests_aborted_total{{task=\"{}\"}} {n}",
                escape(task)
            );
        }
        out.push_str(&format!(
            "# HELP gps_seg_request_duration_seconds Segmentation request latency (server side, \
             body read to answer); quantiles over the last {WINDOW} requests per task.\n\
             # TYPE gps_seg_request_duration_seconds summary\n"
        ));
        for (task, l) in &g.latency {
            let mut sorted: Vec<f64> = l.recent.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let t = escape(task);
            for q in [0.5, 0.95, 0.99] {
                let _ = writeln!(
                    out,
                    "gps_seg_request_duration_seconds{{task=\"{t}\",quantile=\"{q}\"}} {:.6}",
                    quantile(&sorted, q)
                );
            }
            let _ = writeln!(
                out,
                "gps_seg_request_duration_seconds_sum{{task=\"{t}\"}} {:.6}",
                l.sum
            );
            let _ = writeln!(
                out,
                "gps_seg_request_duration_seconds_count{{task=\"{t}\"}} {}",
                l.count
            );
        }
        drop(g);
        let gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&TaskGauges) -> usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for t in gauges {
                let _ = writeln!(out, "{name}{{task=\"{}\"}} {}", escape(&t.task), f(t));
            }
        };
        gauge(
            &mut out,
            "gps_seg_queue_depth",
            "Admitted requests not yet running (reading their body or waiting for a session).",
            &|t| t.queued,
        );
        gauge(
            &mut out,
            "gps_seg_in_flight",
            "Requests running on a session now.",
            &|t| t.in_flight,
        );
        gauge(
            &mut out,
            "gps_seg_sessions",
            "ONNX Runtime sessions in the task's pool.",
            &|t| t.sessions,
        );
        gauge(
            &mut out,
            "gps_seg_queue_capacity",
            "Requests that may wait beyond the sessions before 503.",
            &|t| t.queue_capacity,
        );
        let one = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let c = &self.conns;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, kind, help, v) in [
            (
                "gps_seg_inflight_bytes",
                "gauge",
                "Bytes reserved by requests in flight (bodies, decoded images, model input and \
                 output), all tasks.",
                server.inflight_bytes,
            ),
            (
                "gps_seg_inflight_bytes_limit",
                "gauge",
                "The budget of requests in flight (--max-inflight-bytes).",
                server.inflight_limit,
            ),
            (
                "gps_seg_inflight_bytes_peak",
                "gauge",
                "Most bytes reserved at once since the start.",
                server.inflight_peak,
            ),
            (
                "gps_seg_budget_refused_total",
                "counter",
                "Requests refused (503 or 413) because the budget could not hold them.",
                server.budget_refused,
            ),
            (
                "gps_seg_connections_accepted_total",
                "counter",
                "Connections accepted.",
                ld(&c.accepted),
            ),
            (
                "gps_seg_connections_open",
                "gauge",
                "Connections open now.",
                ld(&c.open),
            ),
            (
                "gps_seg_connections_header_timeout_total",
                "counter",
                "Connections closed because a request's headers did not arrive within \
                 --header-timeout-s.",
                ld(&c.header_timeouts),
            ),
            (
                "gps_seg_connections_idle_timeout_total",
                "counter",
                "Keep-alive connections closed after --idle-timeout-s without a request.",
                ld(&c.idle_timeouts),
            ),
            (
                "gps_seg_connections_closed_unread_total",
                "counter",
                "Connections closed after an answer sent before the request body was read.",
                ld(&c.closed_unread),
            ),
        ] {
            one(&mut out, name, kind, help, v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_bounded_window() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.5), 50.0);
        assert_eq!(quantile(&s, 0.95), 95.0);
        assert_eq!(quantile(&s, 0.99), 99.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        let m = Metrics::default();
        for i in 0..WINDOW + 10 {
            m.record("a", 200, i as f64);
        }
        m.record("a", 503, 0.0);
        m.aborted("a");
        assert_eq!(m.count("a", 200), (WINDOW + 10) as u64);
        assert_eq!(m.aborted_count("a"), 1);
        let page = m.render(
            &[],
            &ServerGauges {
                inflight_limit: 77,
                ..Default::default()
            },
        );
        assert!(page.contains("gps_seg_requests_aborted_total{task=\"a\"} 1"));
        assert!(page.contains("gps_seg_inflight_bytes_limit 77"));
        assert!(page.contains("gps_seg_connections_open 0"));
        assert!(page.contains("gps_seg_requests_total{task=\"a\",code=\"503\"} 1"));
        assert!(page.contains(&format!(
            "gps_seg_request_duration_seconds_count{{task=\"a\"}} {}",
            WINDOW + 11
        )));
        assert_eq!(m.inner.lock().unwrap().latency["a"].recent.len(), WINDOW);
    }
}
