//! Fused CPU element-wise ops with hand-written single-pass backward passes (issue: make a GPS
//! step cheaper than a full step).
//!
//! Candle builds softmax, layer norm and erf-GELU from several element-wise ops, and their
//! backward passes walk the full tensor many times (measured on 4×1024×768: softmax backward
//! ≈ 5× its forward, GELU backward ≈ 5×). Here each op is one Candle `CustomOp` whose CPU
//! forward is a single loop over rows (parallel with rayon), and whose backward is a second
//! custom op that computes the input gradient in ONE pass from the saved output / input:
//! - [`softmax_last`]: `dx = y ⊙ (g − Σ g⊙y)`;
//! - [`layer_norm`]: affine layer norm over the last dim; backward gives `dx`, `dw`, `db`;
//! - [`gelu`]: `x·Φ(x)`, backward `g·(Φ(x) + x·φ(x))`.
//!
//! Every op is used only where the tensor lives on the CPU, is f32/f64 and the thread is not
//! in [reference mode](with_reference_path); otherwise the differentiable compositions of
//! [`super::layers`] run (CUDA keeps working). Gradients are checked against finite
//! differences ([`super::gradcheck`]) and against the composed ops in the tests below.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
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
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The contiguous data of a storage under its layout.
pub(crate) fn data<'a, T: Fl>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// Dispatch a kernel over the storage dtype (f32 / f64).
macro_rules! by_dtype {
    ($s:expr, $f:ident ( $($a:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($a),*),
            CpuStorage::F64(_) => $f::<f64>($($a),*),
            _ => candle_core::bail!("fused op: only f32 and f64 are supported"),
        }
    };
}

/// Rows handed to one rayon task: big enough to amortise scheduling.
fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dim.

struct Softmax;
struct SoftmaxBwd;

fn softmax_rows<T: Fl>(x: &[T], n: usize) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let rpt = rows_per_task(n);
    y.par_chunks_mut(n * rpt)
        .zip(x.par_chunks(n * rpt))
        .for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_mut(n).zip(xb.chunks(n)) {
                softmax_row(xr, yr);
            }
        });
    y
}

fn softmax_row<T: Fl>(xr: &[T], yr: &mut [T]) {
    let mut m = T::neg_inf();
    for &v in xr {
        if v > m {
            m = v;
        }
    }
    let mut s = T::ZERO;
    for (o, &v) in yr.iter_mut().zip(xr) {
        let e = (v - m).exp();
        *o = e;
        s += e;
    }
    let inv = T::ONE / s;
    for o in yr.iter_mut() {
        *o *= inv;
    }
}

/// `dx = y ⊙ (g − Σ g⊙y)` per row.
fn softmax_bwd_rows<T: Fl>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    let rpt = rows_per_task(n);
    dx.par_chunks_mut(n * rpt)
        .zip(y.par_chunks(n * rpt).zip(g.par_chunks(n * rpt)))
        .for_each(|(db, (yb, gb))| {
            for ((dr, yr), gr) in db.chunks_mut(n).zip(yb.chunks(n)).zip(gb.chunks(n)) {
                let mut dot = T::ZERO;
                for (&a, &b) in yr.iter().zip(gr) {
                    dot += a * b;
                }
                for ((d, &a), &b) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = a * (b - dot);
                }
            }
        });
    dx
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn k<T: Fl>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(softmax_rows(
                data::<T>(s, l)?,
                last_dim(l),
            )))
        }
        Ok((by_dtype!(s, k(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn k<T: Fl>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(softmax_bwd_rows(
                data::<T>(s1, l1)?,
                data::<T>(s2, l2)?,
                last_dim(l1),
            )))
        }
        Ok((by_dtype!(s1, k(s1, l1, s2, l2))?, l1.shape().clone()))
    }
}

/// Softmax over the last dim, differentiable: the fused CPU kernel where [`use_fused`],
/// else Candle's composed `softmax`. Any shape. A bf16/f16 `x` is upcast to f32 for the
/// softmax and the result cast back (autocast, [`super::precision`]).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if super::precision::is_low(x.dtype()) {
        return super::precision::upcast(x, softmax_last);
    }
    if use_fused(x) {
        Ok(x.contiguous()?.apply_op1(Softmax)?)
    } else {
        Ok(candle_nn::ops::softmax(x, candle_core::D::Minus1)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Layer norm over the last dim.

struct LayerNormOp {
    eps: f64,
}

/// Backward of [`LayerNormOp`]: `(x, w, g)` → packed `[R + 2, C]` = `dx` rows, then `dw`, `db`.
struct LayerNormBwd {
    eps: f64,
}

fn row_stats<T: Fl>(xr: &[T], eps: f64) -> (T, T) {
    let c = xr.len();
    let mut s = T::ZERO;
    for &v in xr {
        s += v;
    }
    let mean = s / T::c(c as f64);
    let mut q = T::ZERO;
    for &v in xr {
        let d = v - mean;
        q += d * d;
    }
    let var = q / T::c(c as f64);
    (mean, T::ONE / (var + T::c(eps)).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn k<T: Fl>(
            eps: f64,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> candle_core::Result<CpuStorage> {
            let x = data::<T>(s1, l1)?;
            let w = data::<T>(s2, l2)?;
            let b = data::<T>(s3, l3)?;
            let c = w.len();
            let mut y = vec![T::ZERO; x.len()];
            let rpt = rows_per_task(c);
            y.par_chunks_mut(c * rpt)
                .zip(x.par_chunks(c * rpt))
                .for_each(|(yb, xb)| {
                    for (yr, xr) in yb.chunks_mut(c).zip(xb.chunks(c)) {
                        let (mean, rstd) = row_stats(xr, eps);
                        for (((o, &v), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                            *o = (v - mean) * rstd * wi + bi;
                        }
                    }
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        let st = by_dtype!(s1, k(self.eps, (s1, l1), (s2, l2), (s3, l3)))?;
        Ok((st, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let rows = x.dim(0)?;
        let dx = packed.narrow(0, 0, rows)?;
        let dw = packed.get(rows)?;
        let db = packed.get(rows + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn k<T: Fl>(
            eps: f64,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> candle_core::Result<CpuStorage> {
            let x = data::<T>(s1, l1)?;
            let w = data::<T>(s2, l2)?;
            let g = data::<T>(s3, l3)?;
            let c = w.len();
            let rows = x.len() / c;
            let mut out = vec![T::ZERO; (rows + 2) * c];
            let (dx, _) = out.split_at_mut(rows * c);
            let rpt = rows_per_task(c).max(rows.div_ceil(64).max(1));
            let partial: Vec<Vec<T>> = dx
                .par_chunks_mut(c * rpt)
                .zip(x.par_chunks(c * rpt).zip(g.par_chunks(c * rpt)))
                .map(|(db, (xb, gb))| {
                    let mut acc = vec![T::ZERO; 2 * c];
                    let mut xhat = vec![T::ZERO; c];
                    for ((dr, xr), gr) in db.chunks_mut(c).zip(xb.chunks(c)).zip(gb.chunks(c)) {
                        let (mean, rstd) = row_stats(xr, eps);
                        let mut s1 = T::ZERO; // Σ g·w
                        let mut s2 = T::ZERO; // Σ g·w·x̂
                        for i in 0..c {
                            let xh = (xr[i] - mean) * rstd;
                            xhat[i] = xh;
                            let gw = gr[i] * w[i];
                            s1 += gw;
                            s2 += gw * xh;
                            acc[i] += gr[i] * xh;
                            acc[c + i] += gr[i];
                        }
                        let inv_c = T::ONE / T::c(c as f64);
                        let (m1, m2) = (s1 * inv_c, s2 * inv_c);
                        for i in 0..c {
                            dr[i] = rstd * (gr[i] * w[i] - m1 - xhat[i] * m2);
                        }
                    }
                    acc
                })
                .collect();
            let tail = &mut out[rows * c..];
            for p in partial {
                for (o, v) in tail.iter_mut().zip(p) {
                    *o += v;
                }
            }
            Ok(T::to_cpu_storage_owned(out))
        }
        let st = by_dtype!(s1, k(self.eps, (s1, l1), (s2, l2), (s3, l3)))?;
        let (rows, c) = l1.shape().dims2()?;
        Ok((st, Shape::from((rows + 2, c))))
    }
}

/// Layer norm over the last dim with affine `w`, `b` (`[C]`), differentiable in all three:
/// the fused CPU kernel where [`use_fused`], else the composition of [`super::layers`].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() {
        let c = w.elem_count();
        let rows = x.elem_count() / c.max(1);
        let y = x.reshape((rows, c))?.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNormOp { eps },
        )?;
        Ok(y.reshape(x.shape())?)
    } else {
        super::layers::layer_norm_composed(x, w, b, eps)
    }
}

// ---------------------------------------------------------------------------------------------
// erf GELU.

struct Gelu;
struct GeluBwd;

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `Φ(x)` (standard normal CDF) in f32 with small *relative* error on both tails:
/// `Φ(x) = ½·erfc(−x/√2)`, with `erfc(a) = t·exp(−a² − 1.26551223 + t·P(t))`,
/// `t = 1/(1 + a/2)` for `a = |x|/√2` (Numerical Recipes' `erfcc`, fractional error
/// < 1.2e-7), and `erfc(−a) = 2 − erfc(a)`. Also returns `exp(−x²/2)` for the density.
/// (`a·b + c` formed by `M`.)
#[inline(always)]
fn phi_f32<M: MulAdd>(x: f32) -> (f32, f32) {
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / M::madd(0.5, a, 1.0);
    let mut p = 0.170_872_77_f32;
    p = M::madd(p, t, -0.822_152_23);
    p = M::madd(p, t, 1.488_515_9);
    p = M::madd(p, t, -1.135_204);
    p = M::madd(p, t, 0.278_868_07);
    p = M::madd(p, t, -0.186_288_06);
    p = M::madd(p, t, 0.096_784_18);
    p = M::madd(p, t, 0.374_091_96);
    p = M::madd(p, t, 1.000_023_7);
    let a2 = a * a;
    let erfc = t * exp_neg_f32_with::<M>(M::madd(t, p, -a2 - 1.265_512_2));
    let half = 0.5 * erfc;
    let cdf = if x > 0.0 { 1.0 - half } else { half };
    (cdf, exp_neg_f32_with::<M>(-a2))
}

#[inline(always)]
fn gelu_f32_rows<M: MulAdd>(y: &mut [f32], x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v * phi_f32::<M>(v).0;
    }
}

#[inline(always)]
fn gelu_bwd_f32_rows<M: MulAdd>(dx: &mut [f32], x: &[f32], g: &[f32]) {
    let p = INV_SQRT_2PI as f32;
    for ((o, &v), &gi) in dx.iter_mut().zip(x).zip(g) {
        let (cdf, e) = phi_f32::<M>(v);
        *o = gi * M::madd(v * p, e, cdf);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_f32_rows_avx2(y: &mut [f32], x: &[f32]) {
    gelu_f32_rows::<Fused>(y, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_bwd_f32_rows_avx2(dx: &mut [f32], x: &[f32], g: &[f32]) {
    gelu_bwd_f32_rows::<Fused>(dx, x, g)
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_f32_rows_avx512(y: &mut [f32], x: &[f32]) {
    gelu_f32_rows::<Fused>(y, x)
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_bwd_f32_rows_avx512(dx: &mut [f32], x: &[f32], g: &[f32]) {
    gelu_bwd_f32_rows::<Fused>(dx, x, g)
}

/// Which copy of the GELU loops runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GeluIsa {
    /// AVX-512F (16 lanes) with FMA: only in builds with the `avx512` feature.
    #[cfg_attr(not(feature = "avx512"), allow(dead_code))]
    Avx512,
    /// AVX2 (8 lanes) with FMA.
    Avx2,
    /// Whatever the build's baseline gives, no FMA.
    Portable,
}

/// The GELU loops' ISA on this CPU and build.
pub(crate) fn gelu_isa() -> GeluIsa {
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    if std::arch::is_x86_feature_detected!("avx512f") && has_avx2_fma() {
        return GeluIsa::Avx512;
    }
    if has_avx2_fma() {
        GeluIsa::Avx2
    } else {
        GeluIsa::Portable
    }
}

/// `f(y, x)` rows of GELU forward on the widest copy of this CPU.
#[inline(always)]
fn gelu_rows_dispatch(isa: GeluIsa, yb: &mut [f32], xb: &[f32]) {
    match isa {
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked at run time by `gelu_isa`).
        GeluIsa::Avx512 => unsafe { gelu_f32_rows_avx512(yb, xb) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked at run time by `gelu_isa`).
        GeluIsa::Avx2 => unsafe { gelu_f32_rows_avx2(yb, xb) },
        _ => gelu_f32_rows::<Plain>(yb, xb),
    }
}

/// GELU backward rows on the widest copy of this CPU.
#[inline(always)]
fn gelu_bwd_rows_dispatch(isa: GeluIsa, db: &mut [f32], xb: &[f32], gb: &[f32]) {
    match isa {
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked at run time by `gelu_isa`).
        GeluIsa::Avx512 => unsafe { gelu_bwd_f32_rows_avx512(db, xb, gb) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked at run time by `gelu_isa`).
        GeluIsa::Avx2 => unsafe { gelu_bwd_f32_rows_avx2(db, xb, gb) },
        _ => gelu_bwd_f32_rows::<Plain>(db, xb, gb),
    }
}

/// f32 GELU forward: the vectorisable `Φ` above, AVX-512 or AVX2 (with FMA) where the CPU
/// has it.
fn gelu_f32(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let isa = gelu_isa();
    y.par_chunks_mut(16384)
        .zip(x.par_chunks(16384))
        .for_each(|(yb, xb)| gelu_rows_dispatch(isa, yb, xb));
    y
}

/// f32 GELU backward `g·(Φ(x) + x·φ(x))`, AVX-512 or AVX2 (with FMA) where the CPU has it.
fn gelu_bwd_f32(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    let isa = gelu_isa();
    dx.par_chunks_mut(16384)
        .zip(x.par_chunks(16384).zip(g.par_chunks(16384)))
        .for_each(|(db, (xb, gb))| gelu_bwd_rows_dispatch(isa, db, xb, gb));
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn k<T: Fl>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
            let x = data::<T>(s, l)?;
            let mut y = vec![T::ZERO; x.len()];
            let (h, r) = (T::c(0.5), T::c(FRAC_1_SQRT_2));
            y.par_chunks_mut(16384)
                .zip(x.par_chunks(16384))
                .for_each(|(yb, xb)| {
                    for (o, &v) in yb.iter_mut().zip(xb) {
                        *o = h * v * (T::ONE + (v * r).erf());
                    }
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        if let CpuStorage::F32(_) = s {
            return Ok((
                CpuStorage::F32(gelu_f32(data::<f32>(s, l)?)),
                l.shape().clone(),
            ));
        }
        Ok((by_dtype!(s, k(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn k<T: Fl>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<CpuStorage> {
            let x = data::<T>(s1, l1)?;
            let g = data::<T>(s2, l2)?;
            let mut dx = vec![T::ZERO; x.len()];
            let (h, r, p) = (T::c(0.5), T::c(FRAC_1_SQRT_2), T::c(INV_SQRT_2PI));
            dx.par_chunks_mut(16384)
                .zip(x.par_chunks(16384).zip(g.par_chunks(16384)))
                .for_each(|(db, (xb, gb))| {
                    for ((o, &v), &gi) in db.iter_mut().zip(xb).zip(gb) {
                        let cdf = h * (T::ONE + (v * r).erf());
                        let pdf = p * (T::c(-0.5) * v * v).exp();
                        *o = gi * (cdf + v * pdf);
                    }
                });
            Ok(T::to_cpu_storage_owned(dx))
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) {
            let dx = gelu_bwd_f32(data::<f32>(s1, l1)?, data::<f32>(s2, l2)?);
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        Ok((by_dtype!(s1, k(s1, l1, s2, l2))?, l1.shape().clone()))
    }
}

/// Exact (erf) GELU, differentiable: the fused CPU kernel where [`use_fused`], else Candle's
/// `gelu_erf`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if use_fused(x) {
        Ok(x.contiguous()?.apply_op1(Gelu)?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        (gradcheck::randn(shape, seed, candle_core::DType::F64).unwrap() * scale).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        crate::nn::gradcheck::max_abs_diff(a, b).unwrap()
    }

    /// Value and gradients (w.r.t. every input, through a random projection) of `f` on the
    /// fused path and on the reference path.
    fn both_paths(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> [(Tensor, Vec<Tensor>); 2] {
        let run = || {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let proj = rand(y.dims(), 99, 1.0);
            let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
                .collect();
            (y, gs)
        };
        let fast = run();
        let slow = with_reference_path(run);
        [fast, slow]
    }

    fn assert_paths_agree(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let [(y1, g1), (y2, g2)] = both_paths(inputs, f);
        assert!(max_abs(&y1, &y2) < 1e-12, "values differ");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert!(
                max_abs(a, b) < 1e-10,
                "gradient {i} differs: {}",
                max_abs(a, b)
            );
        }
    }

    #[test]
    fn reference_mode_is_scoped_and_restored() {
        assert!(!reference_path());
        let inner = with_reference_path(|| {
            assert!(reference_path());
            with_reference_path(reference_path)
        });
        assert!(inner);
        assert!(!reference_path());
        let x = rand(&[2, 3], 0, 1.0).to_dtype(DType::F32).unwrap();
        assert!(use_fused(&x));
        assert!(!with_reference_path(|| use_fused(&x)));
        assert!(!use_fused(&x.to_dtype(DType::BF16).unwrap()));
    }

    #[test]
    fn softmax_matches_composed_and_finite_differences() {
        let x = rand(&[3, 4, 7], 1, 2.0);
        assert_paths_agree(std::slice::from_ref(&x), |t| softmax_last(&t[0]));
        let e = gradcheck::check(&x, 30, 0, softmax_last).unwrap();
        assert!(e < 1e-6, "{e}");
        // non-contiguous input
        let xt = x.transpose(1, 2).unwrap();
        let e = gradcheck::check(&xt, 20, 1, softmax_last).unwrap();
        assert!(e < 1e-6, "{e}");
        // f32 rows sum to one
        let y = softmax_last(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let s = y
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }

    #[test]
    fn layer_norm_matches_composed_and_finite_differences() {
        let x = (rand(&[2, 3, 8], 5, 2.0) + 0.7).unwrap();
        let w = (rand(&[8], 6, 0.3) + 1.0).unwrap();
        let b = rand(&[8], 7, 0.5);
        let eps = 1e-6;
        assert_paths_agree(&[x.clone(), w.clone(), b.clone()], |t| {
            layer_norm(&t[0], &t[1], &t[2], eps)
        });
        let e = gradcheck::check(&x, 30, 0, |x| layer_norm(x, &w, &b, eps)).unwrap();
        assert!(e < 1e-6, "wrt x: {e}");
        let e = gradcheck::check(&w, 8, 1, |w| layer_norm(&x, w, &b, eps)).unwrap();
        assert!(e < 1e-6, "wrt w: {e}");
        let e = gradcheck::check(&b, 8, 2, |b| layer_norm(&x, &w, b, eps)).unwrap();
        assert!(e < 1e-6, "wrt b: {e}");
    }

    #[test]
    fn layer_norm_weight_gradient_sums_over_many_row_blocks() {
        // More rows than one rayon task takes, so the partial sums of dw/db are combined.
        let x = rand(&[300, 70], 8, 1.0);
        let w = (rand(&[70], 9, 0.3) + 1.0).unwrap();
        let b = rand(&[70], 10, 0.5);
        assert_paths_agree(&[x, w, b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
    }

    /// The f32 kernels (polynomial `Φ`, AVX2) against exact values over [-12, 12] computed in
    /// f64 from `erfc` (`Φ(x) = ½·erfc(−x/√2)`, accurate on both tails): forward within
    /// 1e-6·(1 + x²/4) relative — GELU's tiny negative-side values keep their precision — and
    /// backward within 3e-7 absolute (`Φ + x·φ` crosses zero near x = −0.75, so its relative
    /// error is unbounded in any f32 arithmetic).
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

    #[test]
    fn gelu_f32_kernels_match_exact_values() {
        use candle_core::cpu::erf::erfc_f64;
        let xs: Vec<f32> = (0..=24_000).map(|i| -12.0 + i as f32 * 1e-3).collect();
        let n = xs.len();
        let x32 = Tensor::from_vec(xs.clone(), n, &candle_core::Device::Cpu).unwrap();
        let g = Tensor::ones(n, DType::F32, &candle_core::Device::Cpu).unwrap();
        let y32 = gelu(&x32).unwrap().to_vec1::<f32>().unwrap();
        let d32 = x32
            .apply_op2_no_bwd(&g, &GeluBwd)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Relative to the error f32 arithmetic itself allows: computing a = |x|/√2 and a² in
        // f32 perturbs exp(−a²) by ≈ 2a²·2⁻²⁴ relatively (≈ 1e-5 at x = −12, where GELU is
        // 1e-32; `1 + erf` would give exactly 0 there).
        let (mut fwd, mut bwd) = (0f64, 0f64);
        for i in 0..n {
            let x = xs[i] as f64;
            let cdf = 0.5 * erfc_f64(-x * FRAC_1_SQRT_2);
            let y = x * cdf;
            let d = cdf + x * INV_SQRT_2PI * (-0.5 * x * x).exp();
            let allowed = 1e-6 * (1.0 + x * x / 4.0);
            if y != 0.0 {
                fwd = fwd.max((y32[i] as f64 - y).abs() / y.abs() / allowed);
            }
            bwd = bwd.max((d32[i] as f64 - d).abs());
        }
        assert!(fwd < 1.0, "forward error {fwd} × allowed");
        assert!(bwd < 3e-7, "backward absolute error {bwd}");
    }

    #[test]
    fn gelu_matches_composed_and_finite_differences() {
        let x = rand(&[4, 9], 11, 2.0);
        let [(y1, g1), (y2, g2)] = both_paths(std::slice::from_ref(&x), |t| gelu(&t[0]));
        // Same erf for the values; Candle's backward uses 1/√(2π) ≈ 0.398942 (6 digits).
        assert!(max_abs(&y1, &y2) < 1e-9);
        let d = max_abs(&g1[0], &g2[0]);
        assert!(d < 1e-5, "{d}");
        let e = gradcheck::check(&x, 30, 0, gelu).unwrap();
        assert!(e < 1e-6, "{e}");
    }
}
