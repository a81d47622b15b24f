//! Peak resident memory of this process (`VmHWM` in `/proc/self/status`), for run summaries,
//! inference reports and benchmarks; and the allocator setting training steps want.

/// Keep freed memory in the process for reuse (glibc): a training step frees and re-allocates
/// the same few hundred MB of activations every step, and by default glibc serves blocks above
/// a moving threshold with fresh `mmap`s and returns freed heap tops to the kernel — so every
/// step page-faults its buffers in again and zeroes them. Measured on a `bench train`
/// vit_b@512 GPS process (setup + 3 steps): 20 % of its CPU samples were in the kernel, and
/// the same settings given as glibc tunables cut its system time from 5.5 to 2.8 s; with them,
/// each further step costs about 200 page faults (docs/PERF.md).
/// Sets `M_MMAP_THRESHOLD` to its 32 MiB maximum and turns heap trimming off. The peak
/// resident size is unchanged (freed blocks are reused, not added). Call once at start-up;
/// a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

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
