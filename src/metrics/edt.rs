//! Exact Euclidean feature transform of a 2-D binary image in linear time: for every pixel, the
//! nearest feature pixel and its squared distance.
//!
//! Algorithm: Maurer, Qi & Raghavan, "A linear time algorithm for computing exact Euclidean
//! distance transforms of binary images in arbitrary dimensions", IEEE TPAMI 25(2), 2003 —
//! the algorithm behind `scipy.ndimage.distance_transform_edt(..., return_indices=True)`.
//! Pass 1 runs down every column (nearest feature in the column), pass 2 along every row over
//! the column results, keeping a stack of candidate features whose Voronoi cells cross the row.
//! Which of two equidistant features a pixel gets follows scipy's implementation
//! (`ni_morphology.c`: a candidate is removed from the stack only when the removal test is
//! strictly positive, and a query moves to the next candidate only when it is strictly closer),
//! so the weighted F-measure, which copies the error of the nearest foreground pixel, agrees with
//! PySODMetrics where features tie. The removal test is evaluated in f64 in scipy's order.

/// Nearest feature pixel (row-major index) of every pixel, and the squared distance to it;
/// `None` when `feature` has no `true` pixel. `feature.len()` must be `h * w`.
pub(crate) fn feature_transform(
    feature: &[bool],
    h: usize,
    w: usize,
) -> Option<(Vec<usize>, Vec<u64>)> {
    debug_assert_eq!(feature.len(), h * w);
    if !feature.iter().any(|&f| f) {
        return None;
    }
    // Pass 1: per column, the row of the nearest feature in that column (−1: none).
    let mut col_ft = vec![-1i64; h * w];
    let mut stack: Vec<usize> = Vec::with_capacity(h.max(w));
    for x in 0..w {
        stack.clear();
        for y in 0..h {
            if feature[y * w + x] {
                // On one line with no other coordinate, no candidate is ever removed.
                stack.push(y);
            }
        }
        if stack.is_empty() {
            continue;
        }
        let mut l = 0usize;
        for y in 0..h {
            let mut d1 = sq(stack[l] as f64 - y as f64);
            while l + 1 < stack.len() {
                let d2 = sq(stack[l + 1] as f64 - y as f64);
                if d1 <= d2 {
                    break;
                }
                d1 = d2;
                l += 1;
            }
            col_ft[y * w + x] = stack[l] as i64;
        }
    }
    // Pass 2: per row, over the column features (fy, x).
    let mut idx = vec![0usize; h * w];
    let mut dist2 = vec![0u64; h * w];
    let mut g: Vec<usize> = Vec::with_capacity(w);
    for y in 0..h {
        let row = &col_ft[y * w..(y + 1) * w];
        let yf = y as f64;
        g.clear();
        for (ii, &fy) in row.iter().enumerate() {
            if fy < 0 {
                continue;
            }
            let fd = ii as f64;
            let w_r = sq(fy as f64 - yf);
            while g.len() >= 2 {
                let idx1 = g[g.len() - 1];
                let idx2 = g[g.len() - 2];
                let f1 = idx1 as f64;
                let a = f1 - idx2 as f64;
                let b = fd - f1;
                let c = a + b;
                let u_r = sq(row[idx2] as f64 - yf);
                let v_r = sq(row[idx1] as f64 - yf);
                if c * v_r - b * u_r - a * w_r - a * b * c <= 0.0 {
                    break;
                }
                g.pop();
            }
            g.push(ii);
        }
        if g.is_empty() {
            // No column has a feature: impossible when the image has one (checked above).
            continue;
        }
        let dist = |cand: usize, x: usize| sq(row[cand] as f64 - yf) + sq(cand as f64 - x as f64);
        let mut l = 0usize;
        for x in 0..w {
            let mut d1 = dist(g[l], x);
            while l + 1 < g.len() {
                let d2 = dist(g[l + 1], x);
                if d1 <= d2 {
                    break;
                }
                d1 = d2;
                l += 1;
            }
            let (fy, fx) = (row[g[l]] as usize, g[l]);
            idx[y * w + x] = fy * w + fx;
            let (dy, dx) = (fy.abs_diff(y) as u64, fx.abs_diff(x) as u64);
            dist2[y * w + x] = dy * dy + dx * dx;
        }
    }
    Some((idx, dist2))
}

#[inline]
fn sq(v: f64) -> f64 {
    v * v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    /// Every pixel's nearest feature by brute force (the squared distance only: ties may pick
    /// either feature, the distance is unique).
    fn brute(feature: &[bool], h: usize, w: usize) -> Vec<u64> {
        let feats: Vec<(usize, usize)> = (0..h * w)
            .filter(|&i| feature[i])
            .map(|i| (i / w, i % w))
            .collect();
        (0..h * w)
            .map(|i| {
                let (y, x) = (i / w, i % w);
                feats
                    .iter()
                    .map(|&(fy, fx)| {
                        let (dy, dx) = (fy.abs_diff(y) as u64, fx.abs_diff(x) as u64);
                        dy * dy + dx * dx
                    })
                    .min()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn distances_are_exact_and_indices_point_at_a_nearest_feature() {
        let mut rng = Rng::new(7);
        for case in 0..60 {
            let (h, w) = (1 + rng.below(23), 1 + rng.below(31));
            let p = [0.02, 0.1, 0.5, 0.9][case % 4];
            let feature: Vec<bool> = (0..h * w).map(|_| rng.bernoulli(p)).collect();
            let Some((idx, d2)) = feature_transform(&feature, h, w) else {
                assert!(!feature.contains(&true));
                continue;
            };
            assert_eq!(d2, brute(&feature, h, w), "case {case} ({h}×{w})");
            for i in 0..h * w {
                let j = idx[i];
                assert!(feature[j], "case {case}: pixel {i} points at a non-feature");
                let (dy, dx) = (
                    (j / w).abs_diff(i / w) as u64,
                    (j % w).abs_diff(i % w) as u64,
                );
                assert_eq!(dy * dy + dx * dx, d2[i]);
                if feature[i] {
                    assert_eq!(j, i);
                }
            }
        }
        assert!(feature_transform(&[false; 6], 2, 3).is_none());
    }

    #[test]
    fn ties_go_to_the_feature_scipy_picks() {
        // Column tie: pixel (1, 0) is 1 from (0, 0) and (2, 0); scipy picks the upper one.
        let f = [true, false, true];
        let (idx, _) = feature_transform(&f, 3, 1).unwrap();
        assert_eq!(idx, vec![0, 0, 2]);
        // Row tie: pixel (0, 1) is 1 from (0, 0) and (0, 2); scipy picks the left one.
        let (idx, _) = feature_transform(&f, 1, 3).unwrap();
        assert_eq!(idx, vec![0, 0, 2]);
        // Diagonal tie: (1, 1) is √2 from (0, 0), (0, 2), (2, 0), (2, 2).
        // scipy.ndimage.distance_transform_edt(~f, return_indices=True) gives index (0, 0).
        let mut f = [false; 9];
        for i in [0, 2, 6, 8] {
            f[i] = true;
        }
        let (idx, d2) = feature_transform(&f, 3, 3).unwrap();
        assert_eq!(idx[4], 0);
        assert_eq!(d2[4], 2);
    }
}
