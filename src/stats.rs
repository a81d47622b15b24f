//! Uncertainty for the evidence tables: mean ± sample standard deviation over seeds, and a
//! paired bootstrap confidence interval of a difference measured on the same test images.
//!
//! The paired bootstrap resamples *images* (with replacement) and recomputes the mean of the
//! per-image differences `a_i − b_i`; the 2.5th and 97.5th percentiles of those means are the
//! 95% interval. A difference whose interval excludes 0 is reported as significant. When several
//! seeds were run, each image's score is first averaged over the seeds, so the interval covers
//! the image sampling of the test set for the seed-averaged methods.

use crate::error::{Error, Result};
use crate::util::rng::Rng;
use serde::{Deserialize, Serialize};

/// Mean and sample standard deviation (n − 1; 0 for a single value). `None` when empty.
pub fn mean_std(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    if xs.len() == 1 {
        return Some((m, 0.0));
    }
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    Some((m, v.sqrt()))
}

/// Median (the mean of the two middle values for an even count); NaN when empty. Every bench
/// table's "median of rounds / steps" is this one.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// A paired difference `a − b` with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    /// Mean over images of `a_i − b_i`.
    pub mean: f64,
    /// 95% interval (2.5th, 97.5th percentile of the resampled means).
    pub lo: f64,
    pub hi: f64,
    /// Images paired.
    pub n: usize,
    /// Bootstrap resamples drawn.
    pub resamples: usize,
}

impl PairedDiff {
    /// True when the 95% interval excludes 0.
    pub fn significant(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// Paired bootstrap of `a − b` over images (`a[i]` and `b[i]` are the same image), seeded.
pub fn paired_bootstrap(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> Result<PairedDiff> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::msg(format!(
            "paired bootstrap needs two equally long, non-empty score lists (got {} and {})",
            a.len(),
            b.len()
        )));
    }
    if resamples < 100 {
        return Err(Error::Config {
            field: "resamples".into(),
            msg: "at least 100 bootstrap resamples are needed for a 95% interval".into(),
        });
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len();
    let mean = d.iter().sum::<f64>() / n as f64;
    let mut rng = Rng::derive(seed, "paired-bootstrap");
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Ok(PairedDiff {
        mean,
        lo: at(0.025),
        hi: at(0.975),
        n,
        resamples,
    })
}

/// Per-image scores averaged over seeds: `runs[s][i]` is seed `s`, image `i`.
pub fn average_over_seeds(runs: &[Vec<f64>]) -> Result<Vec<f64>> {
    let Some(first) = runs.first() else {
        return Err(Error::msg("no runs to average"));
    };
    if runs.iter().any(|r| r.len() != first.len()) {
        return Err(Error::msg(
            "runs of different seeds scored different numbers of images",
        ));
    }
    Ok((0..first.len())
        .map(|i| runs.iter().map(|r| r[i]).sum::<f64>() / runs.len() as f64)
        .collect())
}

/// One variant's test results at one training-set size, over seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantRuns {
    pub name: String,
    /// Training images used (`"all"` or a count), the low-data axis.
    pub train_size: String,
    pub trainable: usize,
    /// `per_image[seed][i]`: the test score of image `i` (Dice, or 1/0 for a correct class) in
    /// one fixed image order shared by every variant at this size.
    pub per_image: Vec<Vec<f64>>,
}

/// Group runs by (variant, training size): `items` yields (name, train size, trainable count,
/// per-image scores) once per seed, in any order.
pub fn group_runs<'a>(
    items: impl IntoIterator<Item = (&'a str, &'a str, usize, &'a [f64])>,
) -> Vec<VariantRuns> {
    let mut runs: Vec<VariantRuns> = Vec::new();
    for (name, size, trainable, scores) in items {
        match runs
            .iter_mut()
            .find(|v| v.name == name && v.train_size == size)
        {
            Some(v) => v.per_image.push(scores.to_vec()),
            None => runs.push(VariantRuns {
                name: name.into(),
                train_size: size.into(),
                trainable,
                per_image: vec![scores.to_vec()],
            }),
        }
    }
    runs
}

/// A row of an evidence table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvidenceRow {
    pub name: String,
    pub train_size: String,
    pub trainable: usize,
    pub seeds: usize,
    /// Mean and standard deviation over seeds of the per-seed test metric (the mean of the
    /// per-image scores).
    pub mean: f64,
    pub std: f64,
    /// This variant minus the reference variant at the same size (paired over test images,
    /// each image averaged over seeds); `None` for the reference itself.
    pub vs_reference: Option<PairedDiff>,
}

/// Evidence rows with `reference` (e.g. `gps-k1`) as the baseline of every paired difference.
pub fn evidence_rows(
    runs: &[VariantRuns],
    reference: &str,
    resamples: usize,
    seed: u64,
) -> Result<Vec<EvidenceRow>> {
    let mut rows = Vec::with_capacity(runs.len());
    for r in runs {
        let per_seed: Vec<f64> = r
            .per_image
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| v.iter().sum::<f64>() / v.len() as f64)
            .collect();
        let Some((mean, std)) = mean_std(&per_seed) else {
            return Err(Error::msg(format!(
                "variant `{}` ({} images) has no scored run",
                r.name, r.train_size
            )));
        };
        let vs_reference = if r.name == reference {
            None
        } else {
            match runs
                .iter()
                .find(|b| b.name == reference && b.train_size == r.train_size)
            {
                Some(b) => Some(paired_bootstrap(
                    &average_over_seeds(&r.per_image)?,
                    &average_over_seeds(&b.per_image)?,
                    resamples,
                    seed,
                )?),
                None => None,
            }
        };
        rows.push(EvidenceRow {
            name: r.name.clone(),
            train_size: r.train_size.clone(),
            trainable: r.trainable,
            seeds: per_seed.len(),
            mean,
            std,
            vs_reference,
        });
    }
    Ok(rows)
}

/// A Markdown table of `rows`: metric mean ± std over seeds, and the paired difference to
/// `reference` with its 95% interval, marked `*` where the interval excludes 0.
pub fn evidence_markdown(rows: &[EvidenceRow], metric: &str, reference: &str) -> String {
    let mut s = format!(
        "| train images | variant | trainable | seeds | test {metric} (mean ± std) | Δ vs {reference} [95% CI] |\n\
         |---|---|---:|---:|---:|---|\n"
    );
    for r in rows {
        let d = match &r.vs_reference {
            Some(d) => format!(
                "{:+.4} [{:+.4}, {:+.4}]{}",
                d.mean,
                d.lo,
                d.hi,
                if d.significant() { " *" } else { "" }
            ),
            None if r.name == reference => "(reference)".into(),
            None => "—".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} ± {:.4} | {d} |\n",
            r.train_size, r.name, r.trainable, r.seeds, r.mean, r.std
        ));
    }
    s.push_str(&format!(
        "\nΔ: paired bootstrap over the test images (each averaged over the seeds), 95% \
         interval; `*` = the interval excludes 0 (a significant difference from {reference}).\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_rows_pair_each_variant_with_the_reference_at_its_size() {
        let mk = |name: &str, size: &str, shift: f64| VariantRuns {
            name: name.into(),
            train_size: size.into(),
            trainable: 10,
            per_image: (0..3)
                .map(|s| {
                    (0..50)
                        .map(|i| (i % 7) as f64 / 10.0 + shift + s as f64 * 1e-3)
                        .collect()
                })
                .collect(),
        };
        let runs = vec![
            mk("gps-k1", "all", 0.0),
            mk("full", "all", 0.1),
            mk("random-k1", "all", 0.0),
            mk("gps-k1", "16", -0.2),
            mk("full", "16", -0.2),
        ];
        let rows = evidence_rows(&runs, "gps-k1", 1000, 1).unwrap();
        assert!(rows[0].vs_reference.is_none());
        let full = rows[1].vs_reference.unwrap();
        assert!(
            (full.mean - 0.1).abs() < 1e-9 && full.significant(),
            "{full:?}"
        );
        assert!(!rows[2].vs_reference.unwrap().significant());
        // At 16 images, full is paired with gps-k1 at 16 (same values): no difference.
        assert!(rows[4].vs_reference.unwrap().mean.abs() < 1e-12);
        assert_eq!(rows[1].seeds, 3);
        assert!((rows[0].std - 1e-3).abs() < 1e-9, "{}", rows[0].std);
        let md = evidence_markdown(&rows, "mDice", "gps-k1");
        assert!(md.contains("(reference)") && md.contains(" *"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| ")).count(), 6);
    }

    #[test]
    fn mean_std_matches_the_textbook_formula() {
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert!((m - 5.0).abs() < 1e-12);
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[3.0]), Some((3.0, 0.0)));
        assert_eq!(mean_std(&[]), None);
    }

    #[test]
    fn bootstrap_finds_a_real_shift_and_not_a_null_one() {
        let mut rng = Rng::new(1);
        let b: Vec<f64> = (0..200).map(|_| rng.f64()).collect();
        // a = b + 0.05 + noise: significant, interval around 0.05.
        let a: Vec<f64> = b
            .iter()
            .map(|x| x + 0.05 + 0.02 * (rng.f64() - 0.5))
            .collect();
        let d = paired_bootstrap(&a, &b, 2000, 7).unwrap();
        assert!(d.significant() && d.lo < 0.05 && d.hi > 0.05, "{d:?}");
        assert!((d.mean - 0.05).abs() < 0.005, "{d:?}");
        // Pure noise around the same values: the interval covers 0.
        let c: Vec<f64> = b.iter().map(|x| x + 0.1 * (rng.f64() - 0.5)).collect();
        let d = paired_bootstrap(&c, &b, 2000, 7).unwrap();
        assert!(!d.significant(), "{d:?}");
        // Seeded: the same inputs give the same interval.
        assert_eq!(d, paired_bootstrap(&c, &b, 2000, 7).unwrap());
        assert!(paired_bootstrap(&a, &b[1..], 2000, 7).is_err());
        assert!(paired_bootstrap(&a, &b, 10, 7).is_err());
    }

    #[test]
    fn seed_average_is_per_image() {
        let avg = average_over_seeds(&[vec![1.0, 0.0], vec![0.0, 0.5]]).unwrap();
        assert_eq!(avg, vec![0.5, 0.25]);
        assert!(average_over_seeds(&[vec![1.0], vec![1.0, 2.0]]).is_err());
    }
}
