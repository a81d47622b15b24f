//! The classification evidence table: GPS against its baselines on one DOWNSTREAM synthetic
//! set ([`crate::data::synth_cls`], class = texture × shape; upstream pretraining saw shape ×
//! colour), all from the same pretrained backbone, seed, data and epochs.
//!
//! Variants (Zhang et al., CVPR 2024, Tables 1–2 and the selection-loss ablation): linear
//! probing, BitFit (bias), full fine-tuning, GPS at K = 1 and K = 2 (SupCon selection), GPS
//! with cross-entropy selection through the fresh head, and random / magnitude selection at
//! GPS's K = 1 budget. Each run is an ordinary [`super::cls::train`] run folder under the
//! experiment folder; the experiment writes `table.md`, `results.json` and a bar chart
//! `accuracy.png` (test top-1 at the val-chosen epoch per variant).

use super::grid::{self, Cell, Grid, Study};
use crate::data::classification::ClsLayout;
use crate::data::synth_cls::{self, SynthClsConfig, SynthKind, SynthLayout};
use crate::error::{Error, Result};
use crate::models::ClassifierConfig;
use crate::train::cls::{ClsRunSummary, ClsTrainConfig, Method, SelectLoss};
use crate::train::observer::Observer;
use crate::util::fs::{write_atomic, write_json_atomic, IoPaths};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One row of the experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Row label (also the run folder name).
    pub label: String,
    pub method: Method,
    pub select_loss: SelectLoss,
    pub topk: usize,
    /// Peak learning rate of this variant.
    pub lr: f64,
}

impl Variant {
    fn new(label: &str, method: Method, select_loss: SelectLoss, topk: usize, lr: f64) -> Self {
        Variant {
            label: label.into(),
            method,
            select_loss,
            topk,
            lr,
        }
    }
}

/// Settings shared by every variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClsExperimentConfig {
    /// Pretrained backbone checkpoint (e.g. `sam/vit-tiny.safetensors`).
    pub base: PathBuf,
    /// Its architecture (`sam/vit-tiny.json`); the head is resized to the downstream classes.
    pub model: ClassifierConfig,
    /// Downstream set folder (generated when missing; re-used when its `synth.json` matches).
    pub data_dir: PathBuf,
    pub classes: usize,
    /// Train+val images per class (VTAB-style `train800val200` = 80% + 20%).
    pub per_class: usize,
    pub test_per_class: usize,
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub batch_size: usize,
    pub select_batches: Option<usize>,
    /// The first seed; seeds are `seed`, `seed + 1`, … (the test set is the data's own, the
    /// same for every seed).
    pub seed: u64,
    /// Seeds per variant (mean ± std and paired bootstrap intervals over them).
    #[serde(default = "one")]
    pub seeds: usize,
    /// Training-set sizes (`None` = all): the low-data axis.
    #[serde(default = "all_sizes")]
    pub train_sizes: Vec<Option<usize>>,
    pub variants: Vec<Variant>,
}

fn one() -> usize {
    1
}

fn all_sizes() -> Vec<Option<usize>> {
    vec![None]
}

impl ClsExperimentConfig {
    /// The default table (sized for ≈ 10 minutes on a shared 2-core CPU): 8 downstream
    /// classes × 16 train+val images (+ 8 test), 3 epochs of batch 16, selection over 4 batches, lr 2e-3 for the Adam methods and 2e-4 for full fine-tuning (AdamW), a
    /// common per-method choice (full fine-tuning diverges at the sparse methods' rate).
    pub fn new(base: PathBuf, model: ClassifierConfig, data_dir: PathBuf) -> Self {
        use Method::*;
        use SelectLoss::*;
        let lr = 5e-3;
        ClsExperimentConfig {
            base,
            model,
            data_dir,
            classes: 8,
            per_class: 32,
            test_per_class: 16,
            epochs: 6,
            seeds: 3,
            train_sizes: vec![None],
            warmup_epochs: 0,
            batch_size: 16,
            select_batches: None,
            seed: 42,
            variants: vec![
                Variant::new("linear", Linear, SupCon, 1, lr),
                Variant::new("bias", Bias, SupCon, 1, lr),
                Variant::new("full", Full, SupCon, 1, lr / 10.0),
                Variant::new("gps-k1", Gps, SupCon, 1, lr),
                Variant::new("gps-k2", Gps, SupCon, 2, lr),
                Variant::new("random-k1", Random, SupCon, 1, lr),
                Variant::new("magnitude-k1", Magnitude, SupCon, 1, lr),
                Variant::new("gps-ce-k1", Gps, Ce, 1, lr),
            ],
        }
    }

    fn synth(&self) -> SynthClsConfig {
        SynthClsConfig {
            classes: self.classes,
            per_class: self.per_class,
            test_per_class: self.test_per_class,
            layout: SynthLayout::Vtab,
            kind: SynthKind::Downstream,
            size: self.model.image_size(),
            seed: self.seed,
        }
    }
}

/// One result row: a variant at one training-set size and seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExperimentRow {
    pub variant: Variant,
    pub train_size: String,
    pub seed: u64,
    pub summary: ClsRunSummary,
    /// 1 / 0 per test image at the val-chosen epoch (`scores.csv`), in the test set's order.
    pub test_correct: Vec<f64>,
}

fn read_correct(path: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(1)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .ok_or_else(|| Error::Checkpoint {
                    path: path.to_path_buf(),
                    msg: format!("bad line `{l}` (expected index,correct)"),
                })
        })
        .collect()
}

/// The downstream set (made once; reused when its settings match).
fn downstream_data(cfg: &ClsExperimentConfig, obs: &mut dyn Observer) -> Result<()> {
    synth_cls::ensure(
        &cfg.data_dir,
        &cfg.synth(),
        "downstream classification",
        obs,
    )?;
    Ok(())
}

/// The markdown table of `rows`: evidence (mean ± std over seeds, paired bootstrap vs GPS
/// K=1 at each size), then one line per run.
pub fn table(cfg: &ClsExperimentConfig, rows: &[ExperimentRow]) -> Result<String> {
    let mut s = format!(
        "Downstream synthetic set: {} classes (texture × shape), {} train / {} val / {} test \
         images; backbone `{}` ({}); {} epochs, batch {}, seed {}. The epoch is chosen on val; \
         test is only scored (at that epoch and at the last).\n\n",
        cfg.classes,
        rows.first().map_or(0, |r| r.summary.train_images),
        rows.first().map_or(0, |r| r.summary.val_images),
        rows.first().map_or(0, |r| r.summary.test_images),
        cfg.base.display(),
        cfg.model.name(),
        cfg.epochs,
        cfg.batch_size,
        cfg.seed
    );
    let runs = crate::stats::group_runs(rows.iter().map(|r| {
        (
            r.variant.label.as_str(),
            r.train_size.as_str(),
            r.summary.trainable,
            r.test_correct.as_slice(),
        )
    }));
    let ev = crate::stats::evidence_rows(&runs, "gps-k1", 2000, cfg.seed)?;
    s.push_str(&crate::stats::evidence_markdown(&ev, "top-1", "gps-k1"));
    s.push_str("\nPer run:\n\n");
    s.push_str("| train images | seed | variant | selection | lr | trainable | trainable % | epoch (val) | val top-1 | test top-1 at that epoch | test top-1, last epoch | s/step | selection s |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let sel = match (r.variant.method.criterion(), r.variant.select_loss) {
            (Some(crate::gps::Criterion::Gradient), SelectLoss::SupCon) => {
                format!("SupCon grad, K={}", r.variant.topk)
            }
            (Some(crate::gps::Criterion::Gradient), SelectLoss::Ce) => {
                format!("CE grad, K={}", r.variant.topk)
            }
            (Some(c), _) => format!("{}, K={}", format!("{c:?}").to_lowercase(), r.variant.topk),
            (None, _) => "-".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0e} | {} | {:.3}% | {} | {:.2}% | {:.2}% | {:.2}% | {:.3} | {:.1} |\n",
            r.train_size,
            r.seed,
            r.variant.label,
            sel,
            r.variant.lr,
            r.summary.trainable,
            r.summary.trainable_pct,
            r.summary.best_epoch.map_or("-".into(), |e| e.to_string()),
            100.0 * r.summary.val_acc,
            100.0 * r.summary.best_acc,
            100.0 * r.summary.last_acc,
            r.summary.seconds_per_step,
            r.summary.selection_seconds
        ));
    }
    Ok(s)
}

/// The classification grid's side: a variant's run config, its row.
impl Study for ClsExperimentConfig {
    type Task = ClsTrainConfig;
    type Variant = Variant;
    type Row = ExperimentRow;

    fn label(v: &Variant) -> &str {
        &v.label
    }

    /// The trainer config of one variant at `seed` on `size` training images.
    fn run_config(&self, v: &Variant, seed: u64, size: Option<usize>) -> ClsTrainConfig {
        let mut c = ClsTrainConfig::recipe(
            self.data_dir.clone(),
            ClsLayout::Vtab,
            Some(self.base.clone()),
            self.model.clone(),
        );
        c.method = v.method;
        c.select_loss = v.select_loss;
        c.topk = v.topk;
        c.lr = v.lr;
        c.min_lr = v.lr * 1e-2;
        c.epochs = self.epochs;
        c.warmup_epochs = self.warmup_epochs;
        c.batch_size = self.batch_size;
        c.eval_batch_size = 64;
        c.select_batches = self.select_batches;
        c.keep_last = 1;
        c.seed = seed;
        c.train_limit = size;
        c
    }

    fn row(
        &self,
        v: &Variant,
        cell: &Cell,
        summary: ClsRunSummary,
        dir: &Path,
    ) -> Result<ExperimentRow> {
        Ok(ExperimentRow {
            variant: v.clone(),
            train_size: cell.train_size.clone(),
            seed: cell.seed,
            test_correct: read_correct(&dir.join("scores.csv"))?,
            summary,
        })
    }
}

/// Run every variant on the one grid ([`super::grid`]) into
/// `out/train-<size>/seed-<seed>/<label>/` (a finished run with the same settings is reused,
/// an unfinished one resumed; a folder holding another run is replaced only with `overwrite`)
/// and write `out/table.md`, `out/results.json` and `out/accuracy.png`.
pub fn run_classify(
    cfg: &ClsExperimentConfig,
    out: &Path,
    overwrite: bool,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(Vec<ExperimentRow>, String)> {
    let grid = Grid {
        seeds: cfg.seeds,
        first_seed: cfg.seed,
        sizes: cfg.train_sizes.clone(),
        out: out.to_path_buf(),
        overwrite,
    };
    grid.check(cfg.variants.len())?;
    IoPaths::new()
        .input("--data-dir", &cfg.data_dir)
        .input("--model", &cfg.base)
        .output("--out", out)
        .check()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_json_atomic(&out.join("experiment.json"), cfg)?;
    downstream_data(cfg, obs)?;
    let rows = grid::run(cfg, &cfg.variants, &grid, device, obs)?;
    let t = table(cfg, &rows)?;
    write_atomic(&out.join("table.md"), t.as_bytes())?;
    write_json_atomic(&out.join("results.json"), &rows)?;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.train_size == rows[0].train_size && r.seed == rows[0].seed)
        .map(|r| (r.variant.label.clone(), 100.0 * r.summary.best_acc))
        .collect();
    let img = crate::util::draw::bar_chart("TEST TOP-1 (%), FIRST SEED", &bars, 720);
    crate::util::draw::save_png(&out.join("accuracy.png"), &img)?;
    Ok((rows, t))
}
