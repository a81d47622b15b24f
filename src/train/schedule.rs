//! Learning-rate schedules. Pure functions of the position, so resuming needs only the step.

use serde::{Deserialize, Serialize};

/// A schedule over `total` units (epochs or steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// Constant learning rate.
    Constant { lr: f64 },
    /// Cosine from `lr` to `min_lr` over `total` units (the GPS SAM recipe steps it per epoch).
    Cosine { lr: f64, min_lr: f64, total: usize },
    /// Linear warm-up over `warmup` units, then cosine to `min_lr` at `total`.
    WarmupCosine {
        lr: f64,
        min_lr: f64,
        warmup: usize,
        total: usize,
    },
}

impl Schedule {
    /// Learning rate at position `t` (0-based).
    pub fn lr(&self, t: usize) -> f64 {
        fn cos(lr: f64, min_lr: f64, t: usize, total: usize) -> f64 {
            if total <= 1 {
                return lr;
            }
            let p = (t.min(total - 1)) as f64 / (total - 1) as f64;
            min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
        }
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::Cosine { lr, min_lr, total } => cos(lr, min_lr, t, total),
            Schedule::WarmupCosine {
                lr,
                min_lr,
                warmup,
                total,
            } => {
                if t < warmup {
                    lr * (t + 1) as f64 / warmup as f64
                } else {
                    cos(lr, min_lr, t - warmup, total.saturating_sub(warmup))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_lr_and_ends_at_min() {
        let s = Schedule::Cosine {
            lr: 2e-4,
            min_lr: 1e-7,
            total: 20,
        };
        assert!((s.lr(0) - 2e-4).abs() < 1e-15);
        assert!((s.lr(19) - 1e-7).abs() < 1e-15);
        assert!(s.lr(5) < s.lr(4));
        let w = Schedule::WarmupCosine {
            lr: 1.0,
            min_lr: 0.0,
            warmup: 4,
            total: 10,
        };
        assert!((w.lr(0) - 0.25).abs() < 1e-12);
        assert!((w.lr(3) - 1.0).abs() < 1e-12);
        assert!(w.lr(9).abs() < 1e-12);
    }
}
