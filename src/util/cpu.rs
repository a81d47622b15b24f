//! What CPU a figure was measured on: the model name (`/proc/cpuinfo`) and the vector ISA in
//! use (AVX-512 with BF16 / AMX, AVX-512, AVX2 + FMA, or baseline), for every benchmark header.

/// The CPU model and ISA in one line, e.g. `Intel(R) Xeon(R) Processor, AVX-512 (2 threads)`.
pub fn describe(threads: usize) -> String {
    format!("{}, {} ({threads} threads)", model_name(), isa())
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
    }
}
