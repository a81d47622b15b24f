//! Peak resident memory of this process (`VmHWM` in `/proc/self/status`), for run summaries,
//! inference reports and benchmarks; and the allocator setting training steps want.

/// Keep freed memory in the process for reuse (glibc): a training step frees and re-allocates
/// the same few hundred MB of activations every step, and by default glibc serves blocks above
/// a moving threshold with fresh `mmap`s and returns freed heap tops to the kernel — so every
/// step page-faults its buffers in again and zeroes them. Measured on a `bench train`
/// vit_b@512 GPS process (setup + 3 steps): 20 % of its CPU samples were in the kernel, and
/// the same settings given as glibc tunables cut its system time from 5.5 to 2.8 s; with them,
/// each further step costs about 200 page faults (docs/PERF.md).
/// Sets `M_MMAP_THRESHOLD` to its 32 MiB maximum and turns heap trimming off, and keeps every
/// thread on one malloc arena (`M_ARENA_MAX` = 1). Freed blocks are reused, not added — but
/// glibc reuses a block only within the arena it came from, and by default each thread gets
/// its own: a run whose selection pass ran on the main thread and whose steps ran on rayon
/// workers kept one activation-sized heap per thread. Measured on a whole `train` run of
/// vit_b@512 (2 selection batches, 2 steps): peak RSS 6.4 GB with per-thread arenas, 3.4 GB
/// with one (docs/PERF.md). A `MALLOC_ARENA_MAX` set in the environment is left to glibc
/// (that is how the benchmark compares the two). Call once at start-up; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes; `None` where it cannot
/// be read.
pub fn status_bytes(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    let line = s
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The allocator settings of a long-running server that loads and unloads tasks: large
/// buffers (a task's tensors, a batch's images) always come from `mmap` (`M_MMAP_THRESHOLD`
/// fixed at 1 MiB, which also stops glibc from raising it after each free), so memory freed by
/// an unloaded task or a finished batch goes back to the kernel; heap trimming stays on; two
/// malloc arenas for the server's many threads. Measured with `gps-seg bench serve-tasks`
/// (README): with [`keep_freed_memory`]'s settings, loading the first ten ViT-B tasks left
/// ~140 MB of freed load buffers resident. Call once at start-up; a no-op off glibc.
pub fn serve_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Peak resident memory so far, in bytes; `None` where `/proc/self/status` does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes(None, "VmHWM")
}

/// Resident memory now, in MB; `None` where it cannot be read.
pub fn current_rss_mb() -> Option<f64> {
    status_bytes(None, "VmRSS").map(|b| b as f64 / (1024.0 * 1024.0))
}

/// Peak resident memory so far, in MB (0 where it cannot be read).
pub fn peak_rss_mb() -> f64 {
    peak_rss_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}

/// Memory the system can still give this process without swapping, in bytes:
/// `MemAvailable` of `/proc/meminfo`; `None` where it cannot be read (not Linux).
pub fn available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_available(&s)
}

fn parse_meminfo_available(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `bytes` in the largest binary unit that keeps it ≥ 1 (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Refuse an allocation of about `need` bytes for `what` when it exceeds
/// [`available_bytes`]; the error says how much it would need and how much there is. Where
/// the available memory cannot be read, nothing is refused.
pub fn check_fits(what: &str, need: u64) -> crate::error::Result<()> {
    check_fits_in(what, need, available_bytes())
}

/// [`check_fits`] against an explicit amount of available memory (`None`: unknown).
pub fn check_fits_in(what: &str, need: u64, available: Option<u64>) -> crate::error::Result<()> {
    match available {
        Some(avail) if need > avail => Err(crate::error::Error::Msg(format!(
            "{what} would need about {} of memory, but only {} is available \
             (MemAvailable in /proc/meminfo); use a smaller size or batch",
            human_bytes(need),
            human_bytes(avail)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed_and_oversized_requests_are_refused() {
        let s = "MemTotal:  32000000 kB\nMemFree: 100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_meminfo_available(s), Some(2048 * 1024));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        let e = check_fits_in("a test model", 5 << 40, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a test model") && e.contains("5.0 TiB") && e.contains("1.0 GiB"),
            "{e}"
        );
        check_fits_in("small", 1 << 20, Some(1 << 30)).unwrap();
        check_fits_in("unknown", u64::MAX, None).unwrap();
        assert!(available_bytes().is_some_and(|b| b > 0) || !cfg!(target_os = "linux"));
    }
}
