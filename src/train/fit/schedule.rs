//! Learning-rate schedules. Pure functions of the position, so resuming needs only the step.

use serde::{Deserialize, Serialize};

/// A schedule over `total` units (epochs or steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// Constant learning rate.
    Constant { lr: f64 },
    /// Cosine from `lr` towards `min_lr` over `total` units, as PyTorch's `CosineAnnealingLR`
    /// with `T_max = total` (the GPS SAM recipe steps it per epoch).
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
        // PyTorch's `CosineAnnealingLR(T_max = total)` stepped once per unit: unit t (0-based)
        // runs at `min + (lr − min)(1 + cos(π t / total)) / 2`, so the first unit runs at `lr`
        // and no unit runs at `min_lr` (the last at `t = total − 1`); positions past the end
        // stay at the last unit's value.
        fn cos(lr: f64, min_lr: f64, t: usize, total: usize) -> f64 {
            if total == 0 {
                return lr;
            }
            let p = (t.min(total - 1)) as f64 / total as f64;
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

    /// PyTorch: `sched = CosineAnnealingLR(opt, T_max=E, eta_min=m)`, `sched.step()` after
    /// every epoch; epoch e (0-based) trains at `m + (lr − m)(1 + cos(π e / E)) / 2` (the closed
    /// form PyTorch documents and its recursive update equals).
    #[test]
    fn cosine_equals_pytorch_cosine_annealing_at_every_epoch() {
        for (lr, m, e_max) in [
            (2e-4, 1e-7, 20usize),
            (1e-3, 1e-7, 6),
            (1e-3, 0.0, 2),
            (0.5, 0.1, 1),
        ] {
            let s = Schedule::Cosine {
                lr,
                min_lr: m,
                total: e_max,
            };
            for e in 0..e_max {
                let torch = m
                    + (lr - m) * (1.0 + (std::f64::consts::PI * e as f64 / e_max as f64).cos())
                        / 2.0;
                assert!(
                    (s.lr(e) - torch).abs() <= 1e-15 * lr,
                    "E={e_max} epoch {e}: {} vs {torch}",
                    s.lr(e)
                );
            }
            // No epoch runs at the minimum (a 2-epoch run changes weights in both epochs).
            assert!(s.lr(e_max - 1) > m || e_max == 1);
        }
        let s = Schedule::Cosine {
            lr: 1e-3,
            min_lr: 1e-7,
            total: 2,
        };
        assert!((s.lr(1) - (1e-7 + (1e-3 - 1e-7) * 0.5)).abs() < 1e-15);
        let w = Schedule::WarmupCosine {
            lr: 1.0,
            min_lr: 0.0,
            warmup: 4,
            total: 10,
        };
        assert!((w.lr(0) - 0.25).abs() < 1e-12);
        assert!((w.lr(3) - 1.0).abs() < 1e-12);
        assert!((w.lr(4) - 1.0).abs() < 1e-12);
        let last = 0.5 * (1.0 + (std::f64::consts::PI * 5.0 / 6.0).cos());
        assert!((w.lr(9) - last).abs() < 1e-12);
    }
}
