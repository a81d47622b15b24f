//! What every kernel of [`super`] shares: the reference-path switch (this thread runs the plain
//! composed ops instead of the kernels: the route the kernels are tested and benchmarked
//! against), [`use_fused`] (whether a kernel applies to a tensor), the float trait [`Fl`] the
//! kernels are generic over, a tensor storage's contiguous data ([`data`]), the CPU check for
//! the `#[target_feature]` copies ([`has_avx2_fma`]) and a vectorisable `exp` for `x ≤ 0`
//! ([`exp_neg_f32`]). It imports nothing of the crate but the CPU description in
//! `crate::util::cpu`.

use crate::util::cpu::{kernel_isa, KernelIsa};
use candle_core::{CpuStorage, DType, Layout, Tensor};
use std::cell::Cell;

thread_local! {
    static REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread runs the plain (reference) paths: dense linear weight gradients and
/// Candle's composed element-wise ops instead of the fused ones.
pub fn reference_path() -> bool {
    REFERENCE.with(|r| r.get())
}

/// Run `f` with the reference paths on this thread (restored afterwards, also on error):
/// the route that fast paths are tested and benchmarked against.
pub fn with_reference_path<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REFERENCE.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(REFERENCE.with(|r| r.replace(true)));
    f()
}

/// True when the fused CPU kernels apply to `x`: CPU, f32 or f64, not in reference mode.
pub fn use_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && !reference_path()
}

/// Floating-point scalar of the kernels (f32 and f64).
pub(crate) trait Fl:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + candle_core::WithDType
{
    const ZERO: Self;
    const ONE: Self;
    fn c(v: f64) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn neg_inf() -> Self;
}

impl Fl for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn c(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
    fn neg_inf() -> Self {
        f32::NEG_INFINITY
    }
}

impl Fl for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn c(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    fn neg_inf() -> Self {
        f64::NEG_INFINITY
    }
}

/// How the polynomial kernels below form `a·b + c`: [`Plain`] (a multiply and an add, the
/// result every CPU gives) or [`Fused`] (one rounding, `f32::mul_add`) — only inside functions
/// compiled with FMA (`#[target_feature]` copies), where it is one instruction; elsewhere
/// `mul_add` would be a libm call.
pub(crate) trait MulAdd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// `a·b + c` with two roundings.
pub(crate) struct Plain;
/// `a·b + c` with one rounding (FMA).
pub(crate) struct Fused;

impl MulAdd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

impl MulAdd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `exp(x)` for `x ≤ 0` in f32: Cephes-style range reduction to `r ∈ [−ln2/2, ln2/2]`, a
/// degree-6 polynomial and `2ⁿ` from the exponent bits; ≈ 1 ulp over the normal range,
/// branch-free so loops over it vectorise (no checked arithmetic: see the end). Inputs below
/// −87 give ≈ 1.6e-38.
#[inline(always)]
pub(crate) fn exp_neg_f32(x: f32) -> f32 {
    exp_neg_f32_with::<Plain>(x)
}

/// [`exp_neg_f32`] with the polynomial's `a·b + c` formed by `M`.
#[inline(always)]
pub(crate) fn exp_neg_f32_with<M: MulAdd>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
    let n = M::madd(x, std::f32::consts::LOG2_E, 0.5).floor();
    let r = M::madd(n, 2.121_944_4e-4, M::madd(n, -0.693_359_4, x));
    let mut p = 1.987_569_1e-4_f32;
    p = M::madd(p, r, 1.398_199_9e-3);
    p = M::madd(p, r, 8.333_452e-3);
    p = M::madd(p, r, 4.166_579_6e-2);
    p = M::madd(p, r, 1.666_666_5e-1);
    p = M::madd(p, r, 0.5);
    let y = M::madd(p * r, r, r) + 1.0;
    // `n ∈ [−125, 0]` after the clamp, so the biased exponent `n + 127` is in [2, 127]. It is
    // read off the bits of `n + 127 + 2²³` (exact for integers below 2²³) instead of an
    // `as i32` cast, and with wrapping integer ops: Rust's saturating float→int cast and the
    // crate's overflow checks both put scalar code / a panic branch in the loop, which kept
    // LLVM from vectorising every caller (GELU, softmax): they ran one lane at a time.
    let biased = (n + (127.0 + 8_388_608.0))
        .to_bits()
        .wrapping_sub(0x4B00_0000);
    y * f32::from_bits(biased.wrapping_shl(23))
}

/// Whether the CPU has AVX2 and FMA (for the `#[target_feature]` copies of hot loops).
pub(crate) fn has_avx2_fma() -> bool {
    kernel_isa() != KernelIsa::Portable
}

/// The contiguous data of a storage under its layout.
pub(crate) fn data<'a, T: Fl>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_mode_is_scoped_and_restored() {
        assert!(!reference_path());
        let inner = with_reference_path(|| {
            assert!(reference_path());
            with_reference_path(reference_path)
        });
        assert!(inner);
        assert!(!reference_path());
        let x = Tensor::ones((2, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(use_fused(&x));
        assert!(!with_reference_path(|| use_fused(&x)));
        assert!(!use_fused(&x.to_dtype(DType::BF16).unwrap()));
    }

    #[test]
    fn exp_neg_f32_is_accurate_over_its_whole_range() {
        // The branch-free exponent trick (bits of n + 127 + 2²³) must give 2ⁿ for every n the
        // clamp admits: relative error against f64 within a few ulp from −87 to 0.
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let e = super::exp_neg_f32(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max((e - r).abs() / r);
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(super::exp_neg_f32(0.0), 1.0);
        assert!(super::exp_neg_f32(-1e4) > 0.0 && super::exp_neg_f32(-1e4) < 1e-37);
    }
}
