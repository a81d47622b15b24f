//! NumPy's floating-point summation order, reproduced so that the field's metrics agree with
//! PySODMetrics (and so with PraNet's toolbox) where a sum decides a comparison: the adaptive
//! E-measure threshold (`pred >= 2·mean`) and the S-measure's `sigma_x == 0` test on a
//! quadrant of a constant map (a mean that is off by one ulp turns an exact 1 into a 0 there).
//!
//! What NumPy 2.x does (`numpy/_core/src/umath/loops_utils.h.src`, `pairwise_sum_DOUBLE`;
//! checked bit for bit against numpy 2.3.4, the version `.ci/run` pins):
//! - `np.sum` / `np.mean` of a C-contiguous float64 array, all axes: `0.0 + pairwise(all)`,
//!   `mean = sum / n`.
//! - of a 2-D slice that is not contiguous (`a[r0:r1, c0:c1]` with `c1 - c0 < width` and more
//!   than one row): the reduction is buffered, `max(1, 8192 / cols)` whole rows at a time
//!   (8192 = `np.getbufsize()`), each buffer summed pairwise, the buffers added in order.
//!
//! `pairwise`: fewer than 8 values are added in order (starting from −0.0); up to 128 values
//! use 8 interleaved accumulators combined as `((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))`, then the
//! remainder in order; longer runs split at `n/2` rounded down to a multiple of 8.

/// NumPy's default buffer size in elements (`np.getbufsize()`).
const NP_BUFSIZE: usize = 8192;
/// NumPy's pairwise block size (`PW_BLOCKSIZE`).
const PW_BLOCKSIZE: usize = 128;

/// NumPy's `pairwise_sum` of a contiguous run.
pub(crate) fn pairwise(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= PW_BLOCKSIZE {
        let mut r = [0f64; 8];
        r.copy_from_slice(&a[..8]);
        let end = n - n % 8;
        let mut i = 8;
        while i < end {
            for (k, acc) in r.iter_mut().enumerate() {
                *acc += a[i + k];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[end..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise(&a[..n2]) + pairwise(&a[n2..])
    }
}

/// `np.sum` of a contiguous array.
pub(crate) fn sum(a: &[f64]) -> f64 {
    0.0 + pairwise(a)
}

/// `np.mean` of a contiguous, non-empty array.
pub(crate) fn mean(a: &[f64]) -> f64 {
    sum(a) / a.len() as f64
}

/// A rectangle `rows × cols` of a row-major image `width` wide: `a[r0:r1, c0:c1]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub r0: usize,
    pub r1: usize,
    pub c0: usize,
    pub c1: usize,
    pub width: usize,
}

impl View {
    pub fn rows(&self) -> usize {
        self.r1 - self.r0
    }
    pub fn cols(&self) -> usize {
        self.c1 - self.c0
    }
    pub fn len(&self) -> usize {
        self.rows() * self.cols()
    }
    /// The view's values in row-major order (what `a[r0:r1, c0:c1].copy()` holds).
    pub fn gather<T: Copy>(&self, a: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len());
        for r in self.r0..self.r1 {
            out.extend_from_slice(&a[r * self.width + self.c0..r * self.width + self.c1]);
        }
        out
    }
    /// `np.sum(a[r0:r1, c0:c1])` for a float64 image `a`, in NumPy's order.
    pub fn np_sum(&self, a: &[f64]) -> f64 {
        let (rows, cols) = (self.rows(), self.cols());
        if rows == 0 || cols == 0 {
            return 0.0;
        }
        if rows == 1 || cols == self.width {
            // Contiguous: one pairwise run.
            let start = self.r0 * self.width + self.c0;
            let end = (self.r1 - 1) * self.width + self.c1;
            return sum(&a[start..end]);
        }
        let per = (NP_BUFSIZE / cols).max(1);
        let mut buf = Vec::with_capacity(per * cols);
        let mut total = 0.0;
        let mut r = self.r0;
        while r < self.r1 {
            let r_end = (r + per).min(self.r1);
            buf.clear();
            for rr in r..r_end {
                buf.extend_from_slice(&a[rr * self.width + self.c0..rr * self.width + self.c1]);
            }
            total += pairwise(&buf);
            r = r_end;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_differs_from_a_running_sum_as_numpy_does() {
        // 0.1 added 10 times: a running sum gives 0.9999999999999999, pairwise with eight
        // accumulators gives exactly 1.0 (numpy: np.sum(np.full(10, 0.1)) == 1.0).
        let a = vec![0.1f64; 10];
        let running: f64 = a.iter().fold(0.0, |s, &x| s + x);
        assert_eq!(running, 0.9999999999999999);
        assert_eq!(sum(&a), 1.0);
        // Fewer than 8 values: in order (np.sum(np.full(3, 0.1)) == 0.30000000000000004).
        assert_eq!(sum(&[0.1, 0.1, 0.1]), 0.30000000000000004);
        assert_eq!(sum(&[]), 0.0);
    }

    #[test]
    fn a_contiguous_view_is_one_run_and_others_are_buffered_by_rows() {
        let w = 5;
        let a: Vec<f64> = (0..25).map(|i| i as f64 * 0.1).collect();
        let full = View {
            r0: 1,
            r1: 4,
            c0: 0,
            c1: w,
            width: w,
        };
        assert_eq!(full.np_sum(&a), sum(&a[5..20]));
        let part = View {
            r0: 1,
            r1: 4,
            c0: 1,
            c1: 3,
            width: w,
        };
        // Small views fit one buffer: the gathered values summed pairwise.
        assert_eq!(part.np_sum(&a), sum(&part.gather(&a)));
        assert_eq!(part.len(), 6);
    }
}
