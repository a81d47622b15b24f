//! CPU thread count for every parallel kernel of the process.
//!
//! Two places decide how many threads run on the CPU: rayon's global pool (our fused kernels,
//! rayon `par_*` loops) and Candle's CPU matmul, which hands `gemm` a
//! `Parallelism::Rayon(n)` with `n = candle_core::utils::get_num_threads()` — and that
//! function reads the `RAYON_NUM_THREADS` environment variable on every call (falling back to
//! the number of physical cores), not the pool size. [`set`] therefore sets both.

use crate::error::{Error, Result};

/// Use `n` CPU threads: builds rayon's global pool with `n` threads and sets
/// `RAYON_NUM_THREADS=n` for Candle's matmul. Call once at start-up, before any tensor work
/// or other threads exist. Errors on `n = 0`, or when the global pool already exists with
/// another size.
pub fn set(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Config {
            field: "threads".into(),
            msg: "must be at least 1".into(),
        });
    }
    // Process start-up, single-threaded: the environment is not read concurrently.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_err()
        && rayon::current_num_threads() != n
    {
        return Err(Error::Config {
            field: "threads".into(),
            msg: format!(
                "the thread pool already runs {} threads; set the count before any work",
                rayon::current_num_threads()
            ),
        });
    }
    Ok(())
}

/// Spin iterations after which Candle's element-wise worker threads park (Candle's default
/// is 25 000). Idle workers spinning that long steal the core from the gemm and rayon
/// threads on small machines: on 2 cores a vit_b@512 GPS step took 8.4 / 9.4 s with the
/// default and 6.8 / 6.6 s with 200, alternating runs on a loaded machine (docs/PERF.md).
pub const BARRIER_SPIN_LIMIT: u32 = 200;

/// Set `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`BARRIER_SPIN_LIMIT`] unless the user set it.
/// Call at process start-up, before any tensor work or other threads exist.
pub fn default_spin_limit() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Process start-up, single-threaded: the environment is not read concurrently.
        std::env::set_var(
            "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            BARRIER_SPIN_LIMIT.to_string(),
        );
    }
}

/// Values per image in one layer's activation (tokens × width) from which Candle's own
/// element-wise thread pool pays, see [`default_elementwise_pool`].
pub const ELEMENTWISE_POOL_MIN_VALUES: usize = 1 << 19;

/// Whether the user set `CANDLE_NUM_THREADS` (recorded by [`default_elementwise_pool`]).
static USER_ELEMENTWISE_POOL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Turn Candle's element-wise thread pool off unless the user set `CANDLE_NUM_THREADS`.
/// Call at process start-up, before any tensor work or other threads exist.
///
/// Candle runs every element-wise op of ≥ 64 Ki values on a pool of its own (one process-wide
/// pool, sized once from `CANDLE_NUM_THREADS`, with a lock that lets one caller in at a time).
/// When a batch runs as one chunk per thread ([`crate::nn::split_backward`],
/// [`crate::nn::split_forward`]) the cores are busy already, so both chunk threads queue for
/// that lock and spin-wait for its worker; at batch 1 on small tensors waking the worker costs
/// more than it saves. Measured side by side on a 2-core Intel Xeon, AVX-512 (docs/PERF.md):
/// tiny@256 batch 4 full step 235–240 → 179–182 ms and GPS step 186–192 → 145–148 ms, Candle
/// inference tiny batch 1 21.3 → 18.4 ms — but vit_b@512 batch 1 (one image, 786 Ki values
/// per layer) full step 3.69 → 4.04 s. So the pool is off by default and a command whose steps
/// run whole batches of large activations turns it back on ([`elementwise_pool_for`]).
pub fn default_elementwise_pool() {
    // A child process (e.g. a `bench` row) inherits the value its parent chose, marked as ours.
    let ours = std::env::var_os(POOL_SET_BY_US).is_some();
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() && !ours {
        USER_ELEMENTWISE_POOL.store(true, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    // Process start-up, single-threaded: the environment is not read concurrently.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    std::env::set_var(POOL_SET_BY_US, "1");
}

/// Marks a `CANDLE_NUM_THREADS` that gps-seg set itself (not the user).
const POOL_SET_BY_US: &str = "GPS_SEG_CANDLE_NUM_THREADS_DEFAULT";

/// Whether Candle's element-wise pool pays for steps that run a batch whole (not split into
/// chunks per thread) with `values_per_image` values per layer (see
/// [`default_elementwise_pool`]).
pub fn elementwise_pool_pays(split: bool, values_per_image: usize) -> bool {
    !split && values_per_image >= ELEMENTWISE_POOL_MIN_VALUES
}

/// Turn Candle's element-wise pool on (one thread per rayon thread) when
/// [`elementwise_pool_pays`], unless the user set `CANDLE_NUM_THREADS`. Call after [`set`]
/// and before any tensor work: Candle sizes its pool once, at its first large element-wise op.
pub fn elementwise_pool_for(split: bool, values_per_image: usize) {
    if USER_ELEMENTWISE_POOL.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let on = elementwise_pool_pays(split, values_per_image) && rayon::current_num_threads() > 1;
    // Before any tensor work (see above): nothing reads the environment concurrently.
    std::env::set_var(
        "CANDLE_NUM_THREADS",
        if on {
            rayon::current_num_threads().to_string()
        } else {
            "1".to_string()
        },
    );
}

/// Run `f` on one of rayon's worker threads and wait for it (directly when already on one).
///
/// Candle's matmul and our fused kernels split their work with rayon. Called from a thread
/// outside the pool, every such op hands its job to the pool and puts the caller to sleep until
/// it is done, which costs two context switches per op. Called from a worker, the work
/// is split in place. A training step is thousands of ops, so the hot loops run here: the
/// training steps of `train::{seg, cls, bench}`, their evaluation forwards and the Candle
/// inference engine. Measured side by side on 2 cores: tiny@128
/// GPS step 59 → 39 ms, vit_b@512 GPS 2.2 → 1.8–2.0 s (docs/PERF.md).
///
/// Thread-locals set on the calling thread (e.g. `nn::kernels::with_reference_path`) do not
/// apply inside `f`; set them within it.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}

/// Single-thread rayon pools, one per thread of the global pool, made on first use.
pub(crate) fn single_thread_pools() -> &'static [rayon::ThreadPool] {
    static POOLS: std::sync::OnceLock<Vec<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOLS.get_or_init(|| {
        (0..rayon::current_num_threads().max(1))
            .filter_map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok())
            .collect()
    })
}

/// Run `f` over `n` items split into contiguous chunks, one chunk per thread, each chunk on
/// its own single-thread rayon pool (so every op inside runs on that one thread: no op is
/// split across threads, no thread waits on another until the end). For batches of small
/// forwards, where splitting each small op over the cores costs more than it gains. Returns
/// the chunks' results in order; with one thread (or `n < 2`) it is `f(0..n)` in place.
pub fn split_items<R: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> R + Sync) -> Vec<R> {
    let pools = single_thread_pools();
    let t = pools.len().min(n);
    if t < 2 {
        return vec![f(0..n)];
    }
    let per = n.div_ceil(t);
    std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = pools
            .iter()
            .enumerate()
            .map(|(i, pool)| (i * per, ((i + 1) * per).min(n), pool))
            .filter(|(a, b, _)| a < b)
            .map(|(a, b, pool)| sc.spawn(move || pool.install(|| f(a..b))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Threads in use: (rayon's pool, Candle's matmul).
pub fn current() -> (usize, usize) {
    (
        rayon::current_num_threads(),
        candle_core::utils::get_num_threads(),
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn elementwise_pool_pays_only_for_whole_batches_of_large_activations() {
        use super::{elementwise_pool_pays, ELEMENTWISE_POOL_MIN_VALUES as MIN};
        // vit_b@512: 32² tokens × 768 = 786 Ki values per layer, batch 1 runs whole.
        assert!(elementwise_pool_pays(false, 32 * 32 * 768));
        assert!(elementwise_pool_pays(false, MIN));
        assert!(!elementwise_pool_pays(false, MIN - 1));
        // tiny@256: 16² × 192; split batches never pay, however large.
        assert!(!elementwise_pool_pays(false, 16 * 16 * 192));
        assert!(!elementwise_pool_pays(true, 32 * 32 * 768));
    }

    use super::*;

    #[test]
    fn on_worker_runs_on_a_pool_thread_and_returns_the_value() {
        assert!(rayon::current_thread_index().is_none());
        let (idx, v) = on_worker(|| (rayon::current_thread_index(), 41 + 1));
        assert!(idx.is_some());
        assert_eq!(v, 42);
        // nested: runs in place
        let inner = on_worker(|| on_worker(rayon::current_thread_index));
        assert!(inner.is_some());
    }

    #[test]
    fn zero_threads_is_a_config_error() {
        assert!(matches!(set(0), Err(Error::Config { .. })));
    }
}
