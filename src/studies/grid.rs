//! The one grid of every study: each variant × training-set size × seed trained (or
//! evaluated, for `zero-shot`) by the one loop into `out/train-<size>/seed-<seed>/<label>`.
//! A cell is reused when it finished with the same settings, resumed from its last checkpoint
//! when it stopped with the same settings, and otherwise started afresh in a folder that
//! [`clear_for_run`] allows (`--overwrite` to replace another run).

use crate::error::{Error, Result};
use crate::progress::{Event, Observer};
use crate::train::config::Method;
use crate::train::fit::folder::clear_for_run;
use crate::train::fit::{self, SummaryOf};
use crate::train::task::Task;
use crate::util::fs::read_json;
use candle_core::Device;
use std::path::{Path, PathBuf};

/// What a study adds to the grid: its variants' run configs and its result rows.
pub trait Study {
    /// The run config (a [`Task`]).
    type Task: Task;
    type Variant;
    type Row;
    fn label(v: &Self::Variant) -> &str;
    /// The run config of `v` at `seed`, on `size` training images (`None`: all).
    fn run_config(&self, v: &Self::Variant, seed: u64, size: Option<usize>) -> Self::Task;
    /// The result row of a finished cell (`dir` holds its run folder).
    fn row(
        &self,
        v: &Self::Variant,
        cell: &Cell,
        summary: SummaryOf<Self::Task>,
        dir: &Path,
    ) -> Result<Self::Row>;
}

/// The axes of a grid and where it writes.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Seeds `first_seed`, `first_seed + 1`, ….
    pub seeds: usize,
    pub first_seed: u64,
    /// Training-set sizes (`None`: all training images).
    pub sizes: Vec<Option<usize>>,
    pub out: PathBuf,
    /// Replace a cell folder that holds another run.
    pub overwrite: bool,
}

impl Grid {
    /// Refuse a grid with nothing to run (before anything is written).
    pub fn check(&self, variants: usize) -> Result<()> {
        if variants == 0 || self.seeds == 0 || self.sizes.is_empty() {
            return Err(Error::Config {
                field: "variants".into(),
                msg: "no variants, seeds or training sizes to run".into(),
            });
        }
        Ok(())
    }
}

/// One cell's coordinates besides its variant.
#[derive(Debug, Clone)]
pub struct Cell {
    /// `all` or the training-image count.
    pub train_size: String,
    pub seed: u64,
}

/// Run every cell of `grid` for `variants`, in order size → seed → variant; the rows in that
/// order.
pub fn run<S: Study>(
    study: &S,
    variants: &[S::Variant],
    grid: &Grid,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<Vec<S::Row>> {
    grid.check(variants.len())?;
    let mut rows = Vec::new();
    for size in &grid.sizes {
        let train_size = size.map_or("all".to_string(), |n| n.to_string());
        for k in 0..grid.seeds {
            let seed = grid
                .first_seed
                .checked_add(k as u64)
                .ok_or_else(|| Error::Config {
                    field: "seed".into(),
                    msg: "seed + seeds overflows".into(),
                })?;
            let cell = Cell {
                train_size: train_size.clone(),
                seed,
            };
            for v in variants {
                let label = S::label(v);
                let dir = grid
                    .out
                    .join(format!("train-{train_size}"))
                    .join(format!("seed-{seed}"))
                    .join(label);
                let cfg = study.run_config(v, seed, *size);
                let summary = run_cell(&cfg, &dir, label, &cell, grid.overwrite, device, obs)?;
                rows.push(study.row(v, &cell, summary, &dir)?);
            }
        }
    }
    Ok(rows)
}

/// One cell: reuse, resume or train (evaluate for `zero-shot`).
fn run_cell<T: Task>(
    cfg: &T,
    dir: &Path,
    label: &str,
    cell: &Cell,
    overwrite: bool,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<SummaryOf<T>> {
    let same = read_json::<T>(&dir.join("config.json")).ok().as_ref() == Some(cfg);
    let summary = dir.join("summary.json");
    if same && summary.is_file() {
        obs.event(Event::Info(format!("{label}: reusing {}", dir.display())));
        return read_json(&summary);
    }
    let resume = same && dir.join("checkpoints").join("LATEST").is_file();
    if !resume {
        clear_for_run(dir, overwrite, "--out")?;
    }
    obs.event(Event::Info(format!(
        "── {label} · {} train images · seed {} ──",
        cell.train_size, cell.seed
    )));
    if cfg.core().method == Method::ZeroShot {
        fit::evaluate(cfg, dir, device, obs)
    } else {
        fit::fit(cfg, dir, device, resume, obs)
    }
}

/// `--only a,b`: keep just the variants with those labels, in their table order; an unknown
/// label is an error listing the known ones.
pub fn keep_only<V>(variants: &mut Vec<V>, only: &str, label: impl Fn(&V) -> &str) -> Result<()> {
    let want: Vec<&str> = only
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    if let Some(bad) = want
        .iter()
        .find(|w| !variants.iter().any(|v| label(v) == **w))
    {
        let all: Vec<&str> = variants.iter().map(&label).collect();
        return Err(Error::Config {
            field: "only".into(),
            msg: format!("unknown variant `{bad}` (one of {})", all.join(", ")),
        });
    }
    variants.retain(|v| want.contains(&label(v)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_only_keeps_the_named_variants_in_table_order_and_names_an_unknown_one() {
        let mut v = vec!["zero-shot", "full", "gps-k1", "gps-k2"];
        keep_only(&mut v, "gps-k1, zero-shot", |s| s).unwrap();
        assert_eq!(v, ["zero-shot", "gps-k1"]);
        let e = keep_only(&mut v, "gps-k9", |s| s).unwrap_err().to_string();
        assert!(
            e.contains("gps-k9") && e.contains("zero-shot, gps-k1"),
            "{e}"
        );
        assert_eq!(v, ["zero-shot", "gps-k1"], "unchanged after a refusal");
    }

    #[test]
    fn an_empty_grid_is_refused_before_anything_runs() {
        let g = Grid {
            seeds: 1,
            first_seed: 7,
            sizes: vec![None],
            out: PathBuf::from("unused"),
            overwrite: false,
        };
        assert!(g.check(1).is_ok());
        assert!(g.check(0).is_err());
        assert!(Grid {
            seeds: 0,
            ..g.clone()
        }
        .check(1)
        .is_err());
        assert!(Grid { sizes: vec![], ..g }.check(1).is_err());
    }
}
