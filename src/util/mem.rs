//! Peak resident memory of this process (`VmHWM` in `/proc/self/status`), for run summaries,
//! inference reports and benchmarks.

/// Peak resident memory so far, in bytes; `None` where `/proc/self/status` does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory so far, in MB (0 where it cannot be read).
pub fn peak_rss_mb() -> f64 {
    peak_rss_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}
