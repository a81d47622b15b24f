//! Fused, query-chunked multi-head attention with SAM's decomposed relative-position bias, for
//! the CPU, with its own backward (issue #11, "lean attention").
//!
//! Meta's `image_encoder.Attention` computes, per image and head,
//! `softmax(scale·q·kᵀ + rel_h[.., i] + rel_w[.., j])·v` over keys `(i, j)` of a `kh × kw` grid,
//! where `rel_h[n, i] = q[n]·Rh[row(n), i]` and `rel_w[n, j] = q[n]·Rw[col(n), j]` come from the
//! relative-position tables (`get_rel_pos` in `sam::image_encoder`). Built from Candle ops
//! this materialises the `[B·heads, N, N]` scores, the bias broadcasts and the probabilities,
//! keeps the probabilities for backward, and walks them several times in each direction —
//! memory and time that grow with tokens² per block (at 1024 px a global block holds
//! 12 × 4096² floats = 805 MB per tensor).
//!
//! [`decomposed_attention`] is one Candle custom op instead, in the style of FlashAttention
//! (Dao et al., 2022), for the CPU:
//! - it reads `q`, `k`, `v` straight out of the `qkv` linear's output `[B, H, W, 3·dim]` and
//!   writes `[B, H, W, dim]` in the layout the `proj` linear reads (no permute copies);
//! - queries are processed in chunks of rows: for each chunk the scores (one gemm), the bias, a
//!   numerically stable softmax and `P·v` (one gemm) live in a per-task scratch of
//!   `chunk × keys` floats; only the output and one log-sum-exp per query row are kept;
//! - backward recomputes each chunk's probabilities from the saved log-sum-exp and produces
//!   `d(qkv)` (including the bias terms' contribution to `dq`) and the gradients of the two
//!   relative-position tables, with four gemms per chunk;
//! - tasks are (image, head) pairs run in parallel with rayon; each gemm runs single-threaded
//!   inside its task; the element-wise loops are compiled for AVX2+FMA when the CPU has them
//!   (runtime check), with a vectorisable polynomial `exp` for f32.
//!
//! Memory per block therefore grows with tokens (output + log-sum-exp), not tokens². The op
//! runs for f32 and f64 CPU tensors; CUDA and the [reference path](super::base::with_reference_path)
//! use the composed ops in `sam::image_encoder`, which chooses between the two; its tests compare
//! this op against them (outputs and all gradients) and against finite differences.

use super::base::{data, has_avx2_fma, Fl};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Mutex;

/// Scores held per chunk (`chunk × keys` floats): 128 Ki floats = 512 KiB in f32, so a chunk's
/// scores stay in L2 while they are biased, exponentiated and multiplied by `v`.
const CHUNK_ELEMS: usize = 128 * 1024;

/// Query rows per chunk for `keys` keys and `n` queries: [`CHUNK_ELEMS`] / keys, at least 16.
pub fn default_chunk(n: usize, keys: usize) -> usize {
    (CHUNK_ELEMS / keys.max(1))
        .clamp(16, n.max(16))
        .min(n.max(1))
}

/// `softmax(scale·q·kᵀ + bias)·v` per head with SAM's decomposed relative-position bias, as one
/// fused CPU op (see the module docs).
///
/// - `qkv`: `[B, H, W, 3·dim]`, the `qkv` linear's output (channels `(3, heads, head_dim)`);
/// - `rh`: `[H, H, head_dim]` = `get_rel_pos(H, H, rel_pos_h)`;
/// - `rw`: `[W, W, head_dim]` = `get_rel_pos(W, W, rel_pos_w)`;
///
/// returns `[B, H, W, dim]` (channels `(heads, head_dim)`). `chunk`: query rows per chunk
/// (`None`: [`default_chunk`]). Differentiable w.r.t. all three inputs. CPU, f32/f64 only.
/// (The one entry for SAM is `sam::image_encoder::rel_pos_attention`, which chooses between
/// this op and the composed ops of Meta's definition.)
pub fn decomposed_attention(
    qkv: &Tensor,
    rh: &Tensor,
    rw: &Tensor,
    num_heads: usize,
    scale: f64,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let (_, h, w, _) = qkv.dims4()?;
    let op = RelPosAttention {
        num_heads,
        scale,
        chunk: chunk.unwrap_or_else(|| default_chunk(h * w, h * w)).max(1),
        lse: Mutex::new(None),
    };
    Ok(qkv
        .contiguous()?
        .apply_op3(&rh.contiguous()?, &rw.contiguous()?, op)?)
}

struct RelPosAttention {
    num_heads: usize,
    scale: f64,
    chunk: usize,
    /// Log-sum-exp of every query row's scores, `[B·heads·N]`, saved by the forward pass.
    lse: Mutex<Option<Tensor>>,
}

/// Sizes of one call. Keys = queries (self-attention on one grid).
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    /// grid rows and columns
    gh: usize,
    gw: usize,
    /// tokens = gh·gw
    n: usize,
    heads: usize,
    hd: usize,
    /// dim = heads·hd
    d: usize,
    chunk: usize,
}

impl Geo {
    fn new(
        op: &RelPosAttention,
        qkv: &[usize],
        rh: &[usize],
        rw: &[usize],
    ) -> candle_core::Result<Geo> {
        let [b, gh, gw, d3] = qkv else {
            candle_core::bail!("rel-pos attention: qkv must be [B, H, W, 3·dim], got {qkv:?}");
        };
        let heads = op.num_heads;
        if heads == 0 || d3 % 3 != 0 || (d3 / 3) % heads != 0 {
            candle_core::bail!(
                "rel-pos attention: qkv channels {d3} are not 3 × heads ({heads}) × head_dim"
            );
        }
        let d = d3 / 3;
        let hd = d / heads;
        if rh != [*gh, *gh, hd] || rw != [*gw, *gw, hd] {
            candle_core::bail!(
                "rel-pos attention: tables {rh:?} / {rw:?} do not match the grid {gh}×{gw} with head_dim {hd}"
            );
        }
        Ok(Geo {
            b: *b,
            gh: *gh,
            gw: *gw,
            n: gh * gw,
            heads,
            hd,
            d,
            chunk: op.chunk.min(gh * gw).max(1),
        })
    }

    /// Offset of token 0's `q` channels of image `b`, head `h` in `qkv`; `k` is `+d`, `v` `+2d`.
    fn q_base(&self, b: usize, h: usize) -> usize {
        b * self.n * 3 * self.d + h * self.hd
    }

    /// Offset of token 0 of image `b`, head `h` in an `[B, N, dim]` tensor.
    fn o_base(&self, b: usize, h: usize) -> usize {
        b * self.n * self.d + h * self.hd
    }
}

/// Scalar of the kernel: f32 (fast polynomial `exp`) or f64.
trait AFl: Fl {
    /// `exp(x)` for `x ≤ 0` (scores minus their row maximum).
    fn exp_neg(self) -> Self;
    fn ln(self) -> Self;
}

impl AFl for f32 {
    #[inline(always)]
    fn exp_neg(self) -> f32 {
        super::base::exp_neg_f32(self)
    }

    fn ln(self) -> f32 {
        f32::ln(self)
    }
}

impl AFl for f64 {
    #[inline(always)]
    fn exp_neg(self) -> f64 {
        f64::exp(self)
    }

    fn ln(self) -> f64 {
        f64::ln(self)
    }
}

/// A raw pointer that tasks writing disjoint regions share.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every task writes only the (image, head) region it owns; see the callers.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// `Σ a[i]·b[i]` with eight partial sums (vectorises).
#[inline(always)]
fn dot<T: Fl>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = T::ZERO;
    for (&x, &y) in ar.iter().zip(br) {
        s += x * y;
    }
    for v in acc {
        s += v;
    }
    s
}

/// `y += a·x`.
#[inline(always)]
fn axpy<T: Fl>(y: &mut [T], a: T, x: &[T]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `C[m×n] = beta·A·B (+ C when accumulate)` with explicit (row, column) strides, one thread.
///
/// # Safety
/// The pointers must address `m×k`, `k×n` and `m×n` matrices under the given strides.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemm_nt<T: Fl>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { T::ONE } else { T::ZERO },
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Per-chunk scratch of one task.
struct Scratch<T> {
    /// scores / probabilities, `chunk × n`
    s: Vec<T>,
    /// `dP` then `dS`, `chunk × n` (backward only)
    dp: Vec<T>,
    /// bias terms `chunk × gh`, `chunk × gw`
    relh: Vec<T>,
    relw: Vec<T>,
}

impl<T: Fl> Scratch<T> {
    fn new(g: &Geo, backward: bool) -> Self {
        Scratch {
            s: vec![T::ZERO; g.chunk * g.n],
            dp: if backward {
                vec![T::ZERO; g.chunk * g.n]
            } else {
                Vec::new()
            },
            relh: vec![T::ZERO; g.chunk * g.gh],
            relw: vec![T::ZERO; g.chunk * g.gw],
        }
    }
}

/// Scores of query rows `n0..n0+c` of (image `b`, head `h`) into `sc.s`:
/// `scale·q·kᵀ + rel_h[.., i] + rel_w[.., j]` (the bias terms also left in `sc.relh/relw`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scores<T: AFl>(
    g: &Geo,
    x: &[T],
    rh: &[T],
    rw: &[T],
    (b, h): (usize, usize),
    (n0, c): (usize, usize),
    scale: T,
    sc: &mut Scratch<T>,
) {
    let (n, hd, d3) = (g.n, g.hd, 3 * g.d);
    let qb = g.q_base(b, h);
    // SAFETY: q rows n0..n0+c and all k rows of this (b, h) lie inside `x` (shape checked).
    unsafe {
        gemm_nt(
            (c, n, hd),
            sc.s.as_mut_ptr(),
            (n, 1),
            false,
            x.as_ptr().add(qb + n0 * d3),
            (d3, 1),
            x.as_ptr().add(qb + g.d),
            (1, d3),
            scale,
        );
    }
    for r in 0..c {
        let t = n0 + r;
        let (ti, tj) = (t / g.gw, t % g.gw);
        let q = &x[qb + t * d3..qb + t * d3 + hd];
        for i in 0..g.gh {
            sc.relh[r * g.gh + i] = dot(q, &rh[(ti * g.gh + i) * hd..(ti * g.gh + i + 1) * hd]);
        }
        for j in 0..g.gw {
            sc.relw[r * g.gw + j] = dot(q, &rw[(tj * g.gw + j) * hd..(tj * g.gw + j + 1) * hd]);
        }
        let row = &mut sc.s[r * n..(r + 1) * n];
        let wb = &sc.relw[r * g.gw..(r + 1) * g.gw];
        for (i, seg) in row.chunks_exact_mut(g.gw).enumerate() {
            let hb = sc.relh[r * g.gh + i];
            for (o, &wv) in seg.iter_mut().zip(wb) {
                *o += hb + wv;
            }
        }
    }
}

/// Row maximum with eight partial maxima (vectorises).
#[inline(always)]
fn row_max<T: Fl>(row: &[T]) -> T {
    let mut acc = [T::neg_inf(); 8];
    let (rc, rr) = row.split_at(row.len() / 8 * 8);
    for ch in rc.chunks_exact(8) {
        for l in 0..8 {
            if ch[l] > acc[l] {
                acc[l] = ch[l];
            }
        }
    }
    let mut m = T::neg_inf();
    for &v in acc.iter().chain(rr) {
        if v > m {
            m = v;
        }
    }
    m
}

/// `row ← exp(row − sub)`; returns the sum of the new values (eight partial sums).
#[inline(always)]
fn exp_sub_sum<T: AFl>(row: &mut [T], sub: T) -> T {
    let mut acc = [T::ZERO; 8];
    let len8 = row.len() / 8 * 8;
    let (rc, rr) = row.split_at_mut(len8);
    for ch in rc.chunks_exact_mut(8) {
        for l in 0..8 {
            let e = (ch[l] - sub).exp_neg();
            ch[l] = e;
            acc[l] += e;
        }
    }
    let mut s = T::ZERO;
    for v in rr.iter_mut() {
        let e = (*v - sub).exp_neg();
        *v = e;
        s += e;
    }
    for v in acc {
        s += v;
    }
    s
}

/// Forward of (image `b`, head `h`): output rows into `out`, log-sum-exp into `lse` (`[N]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_head<T: AFl>(
    g: &Geo,
    x: &[T],
    rh: &[T],
    rw: &[T],
    (b, h): (usize, usize),
    scale: T,
    out: SharedMut<T>,
    lse: &mut [T],
) {
    let mut sc = Scratch::new(g, false);
    let (n, d3) = (g.n, 3 * g.d);
    let vb = g.q_base(b, h) + 2 * g.d;
    let ob = g.o_base(b, h);
    for n0 in (0..n).step_by(g.chunk) {
        let c = g.chunk.min(n - n0);
        scores(g, x, rh, rw, (b, h), (n0, c), scale, &mut sc);
        for r in 0..c {
            let row = &mut sc.s[r * n..(r + 1) * n];
            let m = row_max(row);
            let sum = exp_sub_sum(row, m);
            lse[n0 + r] = m + sum.ln();
            let inv = T::ONE / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
        // SAFETY: rows n0..n0+c, columns h·hd..(h+1)·hd of image b belong to this task only.
        unsafe {
            gemm_nt(
                (c, g.hd, n),
                out.0.add(ob + n0 * g.d),
                (g.d, 1),
                false,
                sc.s.as_ptr(),
                (n, 1),
                x.as_ptr().add(vb),
                (d3, 1),
                T::ONE,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn fwd_head_avx2<T: AFl>(
    g: &Geo,
    x: &[T],
    rh: &[T],
    rw: &[T],
    bh: (usize, usize),
    scale: T,
    out: SharedMut<T>,
    lse: &mut [T],
) {
    fwd_head(g, x, rh, rw, bh, scale, out, lse)
}

/// Inputs of the backward pass of one call.
struct BwdIn<'a, T> {
    x: &'a [T],
    rh: &'a [T],
    rw: &'a [T],
    o: &'a [T],
    go: &'a [T],
    lse: &'a [T],
}

/// Backward of (image `b`, head `h`): `dq`, `dk`, `dv` into `dx` (same layout as `qkv`, this
/// head's columns only), the tables' gradients accumulated into `drh`, `drw`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_head<T: AFl>(
    g: &Geo,
    inp: &BwdIn<'_, T>,
    (b, h): (usize, usize),
    scale: T,
    dx: SharedMut<T>,
    drh: &mut [T],
    drw: &mut [T],
) {
    let mut sc = Scratch::new(g, true);
    let (n, hd, d, d3) = (g.n, g.hd, g.d, 3 * g.d);
    let qb = g.q_base(b, h);
    let (kb, vb) = (qb + d, qb + 2 * d);
    let ob = g.o_base(b, h);
    let lse = &inp.lse[(b * g.heads + h) * n..(b * g.heads + h + 1) * n];
    // D[t] = dO[t]·O[t]
    let dvec: Vec<T> = (0..n)
        .map(|t| {
            let o = ob + t * d;
            dot(&inp.go[o..o + hd], &inp.o[o..o + hd])
        })
        .collect();
    let mut dqrow = vec![T::ZERO; hd];
    for n0 in (0..n).step_by(g.chunk) {
        let c = g.chunk.min(n - n0);
        scores(g, inp.x, inp.rh, inp.rw, (b, h), (n0, c), scale, &mut sc);
        for r in 0..c {
            let row = &mut sc.s[r * n..(r + 1) * n];
            exp_sub_sum(row, lse[n0 + r]);
        }
        // SAFETY (all gemms below): the dx regions written are this (b, h)'s q/k/v columns,
        // owned by this task; reads stay inside the checked shapes.
        unsafe {
            // dV += Pᵀ·dO
            gemm_nt(
                (n, hd, c),
                dx.0.add(vb),
                (d3, 1),
                true,
                sc.s.as_ptr(),
                (1, n),
                inp.go.as_ptr().add(ob + n0 * d),
                (d, 1),
                T::ONE,
            );
            // dP = dO·Vᵀ
            gemm_nt(
                (c, n, hd),
                sc.dp.as_mut_ptr(),
                (n, 1),
                false,
                inp.go.as_ptr().add(ob + n0 * d),
                (d, 1),
                inp.x.as_ptr().add(vb),
                (1, d3),
                T::ONE,
            );
        }
        // dS = P ⊙ (dP − D); bias gradients: row sums over key columns / key rows.
        for r in 0..c {
            let dt = dvec[n0 + r];
            let p = &sc.s[r * n..(r + 1) * n];
            let ds = &mut sc.dp[r * n..(r + 1) * n];
            for (o, &pv) in ds.iter_mut().zip(p) {
                *o = pv * (*o - dt);
            }
            let dwh = &mut sc.relh[r * g.gh..(r + 1) * g.gh];
            let dww = &mut sc.relw[r * g.gw..(r + 1) * g.gw];
            dww.fill(T::ZERO);
            for (i, seg) in ds.chunks_exact(g.gw).enumerate() {
                let mut s = T::ZERO;
                for (o, &v) in dww.iter_mut().zip(seg) {
                    *o += v;
                    s += v;
                }
                dwh[i] = s;
            }
        }
        unsafe {
            // dQ = scale·dS·K
            gemm_nt(
                (c, hd, n),
                dx.0.add(qb + n0 * d3),
                (d3, 1),
                false,
                sc.dp.as_ptr(),
                (n, 1),
                inp.x.as_ptr().add(kb),
                (d3, 1),
                scale,
            );
            // dK += scale·dSᵀ·Q
            gemm_nt(
                (n, hd, c),
                dx.0.add(kb),
                (d3, 1),
                true,
                sc.dp.as_ptr(),
                (1, n),
                inp.x.as_ptr().add(qb + n0 * d3),
                (d3, 1),
                scale,
            );
        }
        // The bias terms: dq += Σ_i drel_h·Rh[row, i] + Σ_j drel_w·Rw[col, j];
        // dRh[row, i] += drel_h·q, dRw[col, j] += drel_w·q.
        for r in 0..c {
            let t = n0 + r;
            let (ti, tj) = (t / g.gw, t % g.gw);
            let q = &inp.x[qb + t * d3..qb + t * d3 + hd];
            dqrow.fill(T::ZERO);
            for i in 0..g.gh {
                let a = sc.relh[r * g.gh + i];
                let k = (ti * g.gh + i) * hd;
                axpy(&mut dqrow, a, &inp.rh[k..k + hd]);
                axpy(&mut drh[k..k + hd], a, q);
            }
            for j in 0..g.gw {
                let a = sc.relw[r * g.gw + j];
                let k = (tj * g.gw + j) * hd;
                axpy(&mut dqrow, a, &inp.rw[k..k + hd]);
                axpy(&mut drw[k..k + hd], a, q);
            }
            // SAFETY: row t of this head's q columns is owned by this task.
            let dq = unsafe { std::slice::from_raw_parts_mut(dx.0.add(qb + t * d3), hd) };
            for (o, &v) in dq.iter_mut().zip(&dqrow) {
                *o += v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn bwd_head_avx2<T: AFl>(
    g: &Geo,
    inp: &BwdIn<'_, T>,
    bh: (usize, usize),
    scale: T,
    dx: SharedMut<T>,
    drh: &mut [T],
    drw: &mut [T],
) {
    bwd_head(g, inp, bh, scale, dx, drh, drw)
}

fn forward<T: AFl>(g: &Geo, x: &[T], rh: &[T], rw: &[T], scale: f64) -> (Vec<T>, Vec<T>) {
    let mut out = vec![T::ZERO; g.b * g.n * g.d];
    let mut lse = vec![T::ZERO; g.b * g.heads * g.n];
    let ptr = SharedMut(out.as_mut_ptr());
    let avx = has_avx2_fma();
    let scale = T::c(scale);
    lse.par_chunks_mut(g.n).enumerate().for_each(|(bh, l)| {
        let bh = (bh / g.heads, bh % g.heads);
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            unsafe { fwd_head_avx2(g, x, rh, rw, bh, scale, ptr, l) };
            return;
        }
        let _ = avx;
        fwd_head(g, x, rh, rw, bh, scale, ptr, l);
    });
    (out, lse)
}

fn backward<T: AFl>(g: &Geo, inp: &BwdIn<'_, T>, scale: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dx = vec![T::ZERO; g.b * g.n * 3 * g.d];
    let ptr = SharedMut(dx.as_mut_ptr());
    let avx = has_avx2_fma();
    let scale = T::c(scale);
    let (lh, lw) = (g.gh * g.gh * g.hd, g.gw * g.gw * g.hd);
    let (drh, drw) = (0..g.b * g.heads)
        .into_par_iter()
        .fold(
            || (vec![T::ZERO; lh], vec![T::ZERO; lw]),
            |(mut drh, mut drw), bh| {
                let bh = (bh / g.heads, bh % g.heads);
                #[cfg(target_arch = "x86_64")]
                if avx {
                    // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                    unsafe { bwd_head_avx2(g, inp, bh, scale, ptr, &mut drh, &mut drw) };
                    return (drh, drw);
                }
                let _ = avx;
                bwd_head(g, inp, bh, scale, ptr, &mut drh, &mut drw);
                (drh, drw)
            },
        )
        .reduce(
            || (vec![T::ZERO; lh], vec![T::ZERO; lw]),
            |(mut a, mut b), (c, d)| {
                a.iter_mut().zip(&c).for_each(|(x, y)| *x += *y);
                b.iter_mut().zip(&d).for_each(|(x, y)| *x += *y);
                (a, b)
            },
        );
    (dx, drh, drw)
}

impl CustomOp3 for RelPosAttention {
    fn name(&self) -> &'static str {
        "fused-rel-pos-attention"
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
        let g = Geo::new(self, l1.dims(), l2.dims(), l3.dims())?;
        let (out, lse) = match s1 {
            CpuStorage::F32(_) => {
                let (o, l) =
                    forward::<f32>(&g, data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, self.scale);
                (
                    f32::to_cpu_storage_owned(o),
                    Tensor::from_vec(l, g.b * g.heads * g.n, &candle_core::Device::Cpu)?,
                )
            }
            CpuStorage::F64(_) => {
                let (o, l) =
                    forward::<f64>(&g, data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, self.scale);
                (
                    f64::to_cpu_storage_owned(o),
                    Tensor::from_vec(l, g.b * g.heads * g.n, &candle_core::Device::Cpu)?,
                )
            }
            _ => candle_core::bail!("rel-pos attention: only f32 and f64 are supported"),
        };
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        Ok((out, Shape::from((g.b, g.gh, g.gw, g.d))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        rh: &Tensor,
        rw: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.lock() {
            Ok(slot) => slot.clone(),
            Err(_) => None,
        };
        let Some(lse) = lse else {
            candle_core::bail!("rel-pos attention: backward without a forward pass");
        };
        let g = Geo::new(self, qkv.dims(), rh.dims(), rw.dims())?;
        let grad = grad.contiguous()?;
        let tensors = [qkv, rh, rw, out, &grad, &lse];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut cpu = Vec::with_capacity(guards.len());
        for (st, l) in &guards {
            match &**st {
                Storage::Cpu(s) => cpu.push((s, *l)),
                _ => candle_core::bail!("rel-pos attention: backward needs CPU tensors"),
            }
        }
        fn run<T: AFl>(
            g: &Geo,
            cpu: &[(&CpuStorage, &Layout)],
            scale: f64,
        ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
            let inp = BwdIn {
                x: data(cpu[0].0, cpu[0].1)?,
                rh: data(cpu[1].0, cpu[1].1)?,
                rw: data(cpu[2].0, cpu[2].1)?,
                o: data(cpu[3].0, cpu[3].1)?,
                go: data(cpu[4].0, cpu[4].1)?,
                lse: data(cpu[5].0, cpu[5].1)?,
            };
            Ok(backward(g, &inp, scale))
        }
        let dev = qkv.device();
        let (dx, drh, drw) = match cpu[0].0 {
            CpuStorage::F32(_) => {
                let (a, b, c) = run::<f32>(&g, &cpu, self.scale)?;
                (
                    Tensor::from_vec(a, qkv.shape(), dev)?,
                    Tensor::from_vec(b, rh.shape(), dev)?,
                    Tensor::from_vec(c, rw.shape(), dev)?,
                )
            }
            CpuStorage::F64(_) => {
                let (a, b, c) = run::<f64>(&g, &cpu, self.scale)?;
                (
                    Tensor::from_vec(a, qkv.shape(), dev)?,
                    Tensor::from_vec(b, rh.shape(), dev)?,
                    Tensor::from_vec(c, rw.shape(), dev)?,
                )
            }
            _ => candle_core::bail!("rel-pos attention: only f32 and f64 are supported"),
        };
        Ok((Some(dx), Some(drh), Some(drw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` stays within relative 3e-7 of `f32::exp` over the normal range
    /// `[-80, 0]` (below that results turn subnormal and lose relative precision; softmax
    /// weights there are < 2e-35), and flushes very negative inputs to (almost) zero.
    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        for k in 0..=80_000 {
            let x = -(k as f32) * 1e-3;
            let (a, e) = (x.exp_neg(), x.exp());
            worst = worst.max(((a - e) / e).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(0f32.exp_neg(), 1.0);
        assert!((-1e4f32).exp_neg() < 1e-37 && f32::NEG_INFINITY.exp_neg() < 1e-37);
    }
}
