//! `gps-seg bench gemm`: f32 matrix products of the linear layers' shapes, three ways on the
//! same data — one thread, `gemm`'s own `Parallelism::Rayon(n)` (what Candle's matmul uses),
//! and the row-split product of [`crate::nn::kernels::cpu_gemm`] (one block of output rows per thread,
//! each a single-threaded gemm; what the linear carrier uses).

use crate::error::{Error, Result};
use crate::nn::kernels::cpu_gemm::{matmul_into, Mat};
use std::time::Instant;

/// One product shape `[m × k] · [k × n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl std::str::FromStr for Shape {
    type Err = Error;
    /// `m:k:n`, each 1 ..= 16384.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || Error::Config {
            field: "shapes".into(),
            msg: format!("`{s}`: expected m:k:n with each in 1..=16384"),
        };
        if parts.len() != 3 {
            return Err(bad());
        }
        let mut v = [0usize; 3];
        for (o, p) in v.iter_mut().zip(&parts) {
            *o = p.trim().parse().map_err(|_| bad())?;
            if !(1..=16384).contains(o) {
                return Err(bad());
            }
        }
        let sh = Shape {
            m: v[0],
            k: v[1],
            n: v[2],
        };
        // Each operand and the output are allocated: at most 2²⁶ values (256 MiB) each.
        for (what, len) in [
            ("m·k", sh.m * sh.k),
            ("k·n", sh.k * sh.n),
            ("m·n", sh.m * sh.n),
        ] {
            if len > MAX_OPERAND_VALUES {
                return Err(Error::Config {
                    field: "shapes".into(),
                    msg: format!("`{s}`: {what} = {len} values, more than {MAX_OPERAND_VALUES}"),
                });
            }
        }
        Ok(sh)
    }
}

/// Values one operand of `bench gemm` may hold (2²⁶ f32 = 256 MiB).
pub const MAX_OPERAND_VALUES: usize = 1 << 26;

/// The shapes of the default table: SAM tiny@256 at batch 1 (256 tokens, width 192: qkv,
/// proj, MLP in and out) and ViT-B@512 (1024 tokens, width 768: qkv, MLP in and out).
pub fn default_shapes() -> Vec<Shape> {
    [
        (256, 192, 576),
        (256, 192, 192),
        (256, 192, 768),
        (256, 768, 192),
        (1024, 768, 2304),
        (1024, 768, 3072),
        (1024, 3072, 768),
    ]
    .into_iter()
    .map(|(m, k, n)| Shape { m, k, n })
    .collect()
}

/// GFLOP/s of one shape, three ways.
#[derive(Debug, Clone)]
pub struct Row {
    pub shape: Shape,
    pub one_thread: f64,
    pub gemm_rayon: f64,
    pub row_split: f64,
}

/// Time each shape with `threads` threads (a pool of its own), median of `rounds` rounds of
/// enough calls for ≈ 0.2 s each, after a warm-up.
pub fn run(shapes: &[Shape], threads: usize, rounds: usize) -> Result<Vec<Row>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::msg(format!("bench gemm: thread pool: {e}")))?;
    let mut rows = Vec::new();
    for &sh in shapes {
        let Shape { m, k, n } = sh;
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
        let mut y = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let calls = ((0.2e9 * 100.0 / flops) as usize).clamp(3, 10_000);
        let mut rate = |mode: u8| -> Result<f64> {
            let one = |y: &mut [f32]| -> Result<()> {
                match mode {
                    0 | 1 => {
                        let par = if mode == 0 {
                            gemm::Parallelism::None
                        } else {
                            gemm::Parallelism::Rayon(threads.max(1))
                        };
                        // SAFETY: x is m×k, w is n×k (read as its transpose k×n), y is m×n,
                        // all contiguous row-major.
                        unsafe {
                            gemm::gemm(
                                m,
                                n,
                                k,
                                y.as_mut_ptr(),
                                1,
                                n as isize,
                                false,
                                x.as_ptr(),
                                1,
                                k as isize,
                                w.as_ptr(),
                                k as isize,
                                1,
                                0.0f32,
                                1.0f32,
                                false,
                                false,
                                false,
                                par,
                            )
                        };
                        Ok(())
                    }
                    _ => Ok(matmul_into(
                        y,
                        (m, k, n),
                        Mat::row_major(&x, k),
                        Mat::transposed(&w, k),
                        false,
                    )?),
                }
            };
            pool.install(|| {
                one(&mut y)?;
                let mut per_round = Vec::with_capacity(rounds);
                for _ in 0..rounds.max(1) {
                    let t = Instant::now();
                    for _ in 0..calls {
                        one(&mut y)?;
                    }
                    per_round.push(flops * calls as f64 / t.elapsed().as_secs_f64() / 1e9);
                }
                Ok(crate::stats::median(&per_round))
            })
        };
        let one_thread = rate(0)?;
        let gemm_rayon = rate(1)?;
        let row_split = rate(2)?;
        rows.push(Row {
            shape: sh,
            one_thread,
            gemm_rayon,
            row_split,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_name_the_field() {
        let s: Shape = "256:192:576".parse().unwrap();
        assert_eq!(
            s,
            Shape {
                m: 256,
                k: 192,
                n: 576
            }
        );
        for bad in [
            "256:192",
            "0:1:1",
            "1:1:99999",
            "a:b:c",
            "1:2:3:4",
            "16384:16384:1",
        ] {
            let e = bad.parse::<Shape>().unwrap_err().to_string();
            assert!(e.contains("shapes") && e.contains(bad), "{bad}: {e}");
        }
        let rows = run(&[Shape { m: 40, k: 8, n: 16 }], 2, 1).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].one_thread > 0.0 && rows[0].row_split > 0.0);
    }
}
