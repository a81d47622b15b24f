//! What CPU a figure was measured on: the model name (`/proc/cpuinfo`) and the vector ISA in
//! use (AVX-512 with BF16 / AMX, AVX-512, AVX2 + FMA, or baseline), for every benchmark header,
//! and which copy of the crate's own kernels runs ([`kernel_isa`], the one check nn's kernels
//! dispatch on). Below nn: imports nothing of the crate.

/// The CPU model and ISA in one line, e.g. `Intel(R) Xeon(R) Processor, AVX-512 (2 threads)`.
pub fn describe(threads: usize) -> String {
    format!("{}, {} ({threads} threads)", model_name(), isa())
}

/// The microkernels `gemm` (Candle's CPU matmul and our fused attention / linear carrier)
/// dispatches to on this CPU. With the default feature `avx512` the crate builds gemm with its
/// `x86-v4` feature, so gemm picks its AVX-512 kernels where `avx512f` exists, else the AVX2/FMA
/// (`x86-v3`) ones, else scalar (gemm-common's `init_gemm_fn`, checked at run time the same way
/// here). Built with `--no-default-features`, gemm has no AVX-512 kernels at all.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512 (gemm x86-v4 kernels)";
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return "AVX2/FMA (gemm x86-v3 kernels; AVX-512 left out of this build)";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "AVX2/FMA (gemm x86-v3 kernels)";
        }
        "scalar (gemm)"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON (gemm)"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar (gemm)"
    }
}

/// The widest copy of the crate's own `#[target_feature]` kernels (nn's fused element-wise
/// ops and attention) that this CPU and build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelIsa {
    /// AVX-512F (16 lanes) with AVX2 and FMA: only in builds with the `avx512` feature.
    Avx512,
    /// AVX2 (8 lanes) with FMA.
    Avx2,
    /// Whatever the build's baseline gives, no FMA.
    Portable,
}

/// [`KernelIsa`] on this CPU and build (checked at run time; the checks are cached).
pub fn kernel_isa() -> KernelIsa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2_fma = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(feature = "avx512")]
        if avx2_fma && std::arch::is_x86_feature_detected!("avx512f") {
            return KernelIsa::Avx512;
        }
        if avx2_fma {
            return KernelIsa::Avx2;
        }
    }
    KernelIsa::Portable
}

/// The paths of our own fused element-wise / attention kernels on this CPU: their
/// `#[target_feature(enable = "avx2,fma")]` copies where AVX2 + FMA exist, else portable
/// code; GELU also has an AVX-512F copy, used on AVX-512 CPUs in builds with the `avx512`
/// feature (the default). nn's kernels dispatch on [`kernel_isa`]; this names what they run.
pub fn fused_isa() -> &'static str {
    match kernel_isa() {
        KernelIsa::Avx512 => "AVX2/FMA, GELU AVX-512F",
        KernelIsa::Avx2 => "AVX2/FMA",
        KernelIsa::Portable => "portable",
    }
}

/// The line every `bench` table starts with: CPU model, widest ISA, the kernels in use and
/// the thread count, e.g. `CPU: Intel(R) Xeon(R) … · ISA: AVX-512 + AVX512-BF16 + AMX ·
/// matmul: AVX-512 (gemm x86-v4 kernels) · fused kernels: AVX2/FMA, GELU AVX-512F · 2 threads`.
pub fn bench_header(threads: usize) -> String {
    format!(
        "CPU: {} · ISA: {} · matmul: {} · fused kernels: {} · {threads} threads",
        model_name(),
        isa(),
        gemm_isa(),
        fused_isa()
    )
}

/// The first `model name` of `/proc/cpuinfo` (or `unknown CPU`).
pub fn model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The widest vector ISA this process can use.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let flags = cpuinfo
                .lines()
                .find(|l| l.starts_with("flags"))
                .unwrap_or_default();
            let has = |f: &str| flags.split_whitespace().any(|x| x == f);
            return match (has("amx_tile"), has("avx512_bf16")) {
                (true, _) => "AVX-512 + AVX512-BF16 + AMX",
                (false, true) => "AVX-512 + AVX512-BF16",
                _ => "AVX-512",
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "AVX2/FMA";
        }
        "x86-64 baseline (no AVX2)"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "AArch64 NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "unknown ISA"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn describes_model_and_isa() {
        let d = super::describe(2);
        assert!(
            d.contains(super::isa()) && d.ends_with("(2 threads)"),
            "{d}"
        );
        assert!(!super::model_name().is_empty());
        let h = super::bench_header(3);
        for part in [
            super::isa(),
            super::gemm_isa(),
            super::fused_isa(),
            "3 threads",
        ] {
            assert!(h.contains(part), "{h} lacks {part}");
        }
    }
}
