//! Row-split matrix products on the CPU for the linear carrier ([`super::sparse_grad`]).
//!
//! Candle hands `gemm` a `Parallelism::Rayon(n)` for each matmul, and `gemm` splits that work
//! itself. At the sizes of a small ViT it gains little from the second thread: measured with
//! `gps-seg bench gemm` on a 2-core Intel Xeon, AVX-512 kernels (docs/PERF.md),
//! `[256 × 192] · [192 × 576]` runs at 178 GFLOP/s on one thread, 224 GFLOP/s with
//! `Rayon(2)` and 281–303 GFLOP/s when the 256 rows are cut into one block per thread, each
//! block a single-threaded gemm; at ViT-B@512 sizes the two are within 3–10% of each other
//! either way. [`matmul_into`] does the latter: one contiguous block of output rows per thread
//! of the current rayon pool, so inside a single-thread pool (one chunk of
//! [`crate::nn::split_backward`]) it is one plain single-threaded gemm. (In isolation the
//! `[256 × 192] · [192 × 192]` product is slower split, 163 vs 198 GFLOP/s; routing it to
//! `gemm`'s threading made the tiny@256 batch-1 forward slower, 20.3–20.8 → 21.6–21.7 ms, so
//! every product with enough rows is split.)
//!
//! Each output element is a dot product over the same `k` values either way; the blocking
//! `gemm` picks depends on the block's size, so results can differ from one whole gemm in
//! the last bits (not from run to run).

use super::base::Fl;
use rayon::prelude::*;

/// Rows of output a thread gets at least before the rows are split between threads.
const MIN_ROWS_PER_THREAD: usize = 32;

/// A strided read-only matrix operand: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a contiguous row-major matrix with `cols` columns (read in place).
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether an `rows × cols` matrix under these strides lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        (rows - 1)
            .checked_mul(self.rs)
            .zip((cols - 1).checked_mul(self.cs))
            .and_then(|(a, b)| a.checked_add(b))
            .is_some_and(|last| last < self.data.len())
    }
}

/// `dst = a·b` (or `dst += a·b` with `accumulate`) for `a: m×k`, `b: k×n` and a contiguous
/// row-major `dst: m×n`, with the rows of `dst` split into one block per thread of the
/// current rayon pool (see the module docs). Errors when an operand does not hold its shape.
pub(crate) fn matmul_into<T: Fl>(
    dst: &mut [T],
    (m, k, n): (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
) -> candle_core::Result<()> {
    if m.checked_mul(n) != Some(dst.len()) || !a.fits(m, k) || !b.fits(k, n) {
        candle_core::bail!(
            "row-split matmul: operands do not hold [{m} × {k}] · [{k} × {n}] \
             (lhs {} values, rhs {}, output {})",
            a.data.len(),
            b.data.len(),
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::ZERO);
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    if threads < 2 || m < MIN_ROWS_PER_THREAD * threads {
        let par = if threads < 2 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        // SAFETY: the shapes were checked against the slices above; dst is m×n contiguous.
        unsafe { gemm_block(dst, (m, k, n), a, b, accumulate, par) };
        return Ok(());
    }
    let block = m.div_ceil(threads);
    dst.par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(bi, d)| {
            let rows = d.len() / n;
            // bi·block < m, so the offset lies inside `a` (checked by `fits`).
            let a_block = Mat {
                data: &a.data[bi * block * a.rs..],
                ..a
            };
            // SAFETY: rows ≤ m − bi·block rows of `a` remain from the offset; `b` and the
            // block `d` (rows × n, contiguous) were checked above.
            unsafe {
                gemm_block(
                    d,
                    (rows, k, n),
                    a_block,
                    b,
                    accumulate,
                    gemm::Parallelism::None,
                )
            };
        });
    Ok(())
}

/// `a·b` (`a: m×k`, `b: k×n`) into a new contiguous row-major `m×n` buffer, by
/// [`matmul_into`].
pub(crate) fn matmul<T: Fl>(
    dims: (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
) -> candle_core::Result<Vec<T>> {
    let (m, _, n) = dims;
    let mut y = vec![T::ZERO; m.saturating_mul(n)];
    matmul_into(&mut y, dims, a, b, false)?;
    Ok(y)
}

/// One `gemm` call: `dst (m×n, contiguous) = [dst +] a·b`.
///
/// # Safety
/// `a` must hold `m×k` and `b` `k×n` under their strides, and `dst` `m·n` values.
unsafe fn gemm_block<T: Fl>(
    dst: &mut [T],
    (m, k, n): (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive `a·b` in f64.
    fn naive(a: Mat<'_, f32>, b: Mat<'_, f32>, (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn row_split_matmul_equals_the_product_for_every_layout_and_pool_size() {
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 37 + seed * 11) % 23) as f32 - 11.0) / 7.0)
                .collect()
        };
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // Sizes below and above the split threshold, with a ragged last block.
            for (m, k, n) in [(5, 7, 3), (200, 33, 17), (97, 64, 40), (64, 1, 9)] {
                let a_rm = vals(m * k, 1);
                let b_rm = vals(k * n, 2);
                let a_t = vals(k * m, 3);
                let b_t = vals(n * k, 4);
                let cases = [
                    (Mat::row_major(&a_rm, k), Mat::row_major(&b_rm, n)),
                    (Mat::transposed(&a_t, m), Mat::transposed(&b_t, k)),
                ];
                for (a, b) in cases {
                    let want = naive(a, b, (m, k, n));
                    for accumulate in [false, true] {
                        let mut got = vec![if accumulate { 0.5f32 } else { 9.0 }; m * n];
                        pool.install(|| matmul_into(&mut got, (m, k, n), a, b, accumulate))
                            .unwrap();
                        for (g, w) in got.iter().zip(&want) {
                            let w = if accumulate { w + 0.5 } else { *w };
                            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_split_matmul_refuses_operands_that_do_not_hold_their_shape() {
        let a = vec![1f32; 6];
        let b = vec![1f32; 6];
        let mut y = vec![0f32; 4];
        // a is 2×3 but claimed 2×4.
        let err = matmul_into(
            &mut y,
            (2, 4, 2),
            Mat::row_major(&a, 4),
            Mat::row_major(&b, 2),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("[2 × 4] · [4 × 2]"), "{err}");
        let mut y3 = vec![0f32; 3];
        assert!(matmul_into(
            &mut y3,
            (2, 3, 2),
            Mat::row_major(&a, 3),
            Mat::row_major(&b, 2),
            false
        )
        .is_err());
        let mut ok = vec![0f32; 4];
        matmul_into(
            &mut ok,
            (2, 3, 2),
            Mat::row_major(&a, 3),
            Mat::row_major(&b, 2),
            false,
        )
        .unwrap();
        assert_eq!(ok, vec![3.0; 4]);
    }
}
