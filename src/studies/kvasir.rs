//! `gps-seg experiment kvasir`: GPS against its baselines on a Kvasir-shaped set, same data,
//! split and epochs for every variant: zero-shot (no tuning), decoder only, decoder+bias (what
//! GPS trains fully, without the selected entries), full fine-tuning, GPS at K = 1, 2, 4, GPS
//! in the encoder only, random / magnitude selection at the GPS K = 1 budget, and box-prompted
//! zero-shot / GPS K = 1 / full (one jittered box per ground-truth object, sampled by
//! [`crate::data::prompts`], fixed per test image and the same for every method); over several
//! seeds (the split stays fixed, so every seed scores the same test images) and training-set
//! sizes (the low-data axis). Every epoch is chosen on validation data; the test split is only
//! scored. The table gives mean ± std over seeds and a paired bootstrap 95% interval of each
//! variant minus GPS K=1 on the same test images ([`crate::stats`]).
//! Writes `table.md`, `results.json`, `mdice.png` and one run folder per (size, seed,
//! variant); a finished run whose settings did not change is reused.

use super::grid::{self, Cell, Grid, Study};
use crate::data::prompts::{PromptKind, PromptSpec};
use crate::error::{Error, Result};
use crate::progress::Observer;
use crate::train::config::Method;
use crate::train::seg::{RunSummary, SegTrainConfig};
use crate::util::fs::{write_atomic, write_json_atomic, IoPaths};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One variant of the table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegVariant {
    pub label: String,
    pub method: Method,
    pub topk: usize,
    /// Learning rate (full fine-tuning takes a smaller one, as is usual).
    pub lr: f64,
    /// Prompts sampled from the ground truth (`none`: prompt-free, GPS's recipe; not written
    /// then, so earlier `results.json` files read unchanged).
    #[serde(default, skip_serializing_if = "is_prompt_free")]
    pub prompt: PromptKind,
}

fn is_prompt_free(k: &PromptKind) -> bool {
    *k == PromptKind::None
}

impl SegVariant {
    fn new(label: &str, method: Method, topk: usize, lr: f64) -> Self {
        SegVariant {
            label: label.into(),
            method,
            topk,
            lr,
            prompt: PromptKind::None,
        }
    }

    fn prompted(mut self, kind: PromptKind) -> Self {
        self.prompt = kind;
        self
    }
}

/// The default variants at learning rate `lr` (full: `lr / 5`).
pub fn default_variants(lr: f64) -> Vec<SegVariant> {
    vec![
        SegVariant::new("zero-shot", Method::ZeroShot, 1, lr),
        SegVariant::new("decoder", Method::Decoder, 1, lr),
        SegVariant::new("decoder+bias", Method::DecoderBias, 1, lr),
        SegVariant::new("full", Method::Full, 1, lr / 5.0),
        SegVariant::new("gps-k1", Method::Gps, 1, lr),
        SegVariant::new("gps-encoder-k1", Method::GpsEncoder, 1, lr),
        SegVariant::new("gps-k2", Method::Gps, 2, lr),
        SegVariant::new("gps-k4", Method::Gps, 4, lr),
        SegVariant::new("random-k1", Method::Random, 1, lr),
        SegVariant::new("magnitude-k1", Method::Magnitude, 1, lr),
        // Box-prompted (one jittered box per ground-truth object, fixed per test image and the
        // same for every method), beside the prompt-free rows.
        SegVariant::new("zero-shot-box", Method::ZeroShot, 1, lr).prompted(PromptKind::Box),
        SegVariant::new("gps-k1-box", Method::Gps, 1, lr).prompted(PromptKind::Box),
        SegVariant::new("full-box", Method::Full, 1, lr / 5.0).prompted(PromptKind::Box),
    ]
}

/// A result row: one variant at one training-set size and seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegExperimentRow {
    pub variant: SegVariant,
    /// Training images (`all` or the limit).
    pub train_size: String,
    pub seed: u64,
    pub summary: RunSummary,
    /// Per-image test Dice at the val-chosen epoch (`scores.csv`), in the test split's order.
    pub test_dice: Vec<f64>,
}

/// The training-set sizes of the low-data axis: `None` = all training images.
pub fn parse_sizes(s: &str) -> Result<Vec<Option<usize>>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t {
            "all" => Ok(None),
            n => match n.parse::<usize>() {
                Ok(v) if v > 0 => Ok(Some(v)),
                _ => Err(Error::Config {
                    field: "train_sizes".into(),
                    msg: format!("`{n}` is neither `all` nor a positive count"),
                }),
            },
        })
        .collect()
}

fn read_test_dice(path: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| Error::Checkpoint {
                    path: path.to_path_buf(),
                    msg: format!("bad line `{l}` (expected id,dice,iou)"),
                })
        })
        .collect()
}

/// The Kvasir grid's side: a variant's run config from the template, its row.
struct KvasirStudy<'a> {
    template: &'a SegTrainConfig,
}

impl Study for KvasirStudy<'_> {
    type Task = SegTrainConfig;
    type Variant = SegVariant;
    type Row = SegExperimentRow;

    fn label(v: &SegVariant) -> &str {
        &v.label
    }

    fn run_config(&self, v: &SegVariant, seed: u64, size: Option<usize>) -> SegTrainConfig {
        let mut cfg = self.template.clone();
        cfg.method = v.method;
        cfg.topk = v.topk;
        cfg.lr = v.lr;
        cfg.min_lr = cfg.min_lr.min(cfg.lr);
        cfg.keep_last = 1;
        cfg.seed = seed;
        cfg.split_seed = Some(self.template.seed);
        cfg.train_limit = size;
        if v.prompt != PromptKind::None {
            cfg.prompt = PromptSpec::of(v.prompt);
        }
        cfg
    }

    fn row(
        &self,
        v: &SegVariant,
        cell: &Cell,
        summary: RunSummary,
        dir: &Path,
    ) -> Result<SegExperimentRow> {
        Ok(SegExperimentRow {
            variant: v.clone(),
            train_size: cell.train_size.clone(),
            seed: cell.seed,
            test_dice: read_test_dice(&dir.join("scores.csv"))?,
            summary,
        })
    }
}

/// Run every variant of `template` (data, model, epochs, seed) on the one grid
/// ([`super::grid`]) into `out/train-<size>/seed-<seed>/<label>`; writes `table.md`,
/// `results.json` and `mdice.png`.
#[allow(clippy::too_many_arguments)]
pub fn run_kvasir(
    template: &SegTrainConfig,
    variants: &[SegVariant],
    seeds: usize,
    sizes: &[Option<usize>],
    out: &Path,
    overwrite: bool,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(Vec<SegExperimentRow>, String)> {
    let grid = Grid {
        seeds,
        first_seed: template.seed,
        sizes: sizes.to_vec(),
        out: out.to_path_buf(),
        overwrite,
    };
    grid.check(variants.len())?;
    IoPaths::new()
        .input("--data-dir", &template.data_dir)
        .input_opt("--model", template.base.as_ref())
        .output("--out", out)
        .check()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let rows = grid::run(&KvasirStudy { template }, variants, &grid, device, obs)?;
    let table = table(template, &rows)?;
    write_atomic(&out.join("table.md"), table.as_bytes())?;
    write_json_atomic(&out.join("results.json"), &rows)?;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.train_size == rows[0].train_size && r.seed == rows[0].seed)
        .map(|r| (r.variant.label.to_uppercase(), r.summary.best.mdice))
        .collect();
    crate::util::draw::save_png(
        &out.join("mdice.png"),
        &crate::util::draw::bar_chart("TEST MDICE BY METHOD (FIRST SEED)", &bars, 640),
    )?;
    Ok((rows, table))
}

/// The markdown table: the evidence rows (mean ± std over seeds, paired bootstrap vs GPS
/// K=1 at each size), then the per-run details.
pub fn table(t: &SegTrainConfig, rows: &[SegExperimentRow]) -> Result<String> {
    let mut s = format!(
        "Data `{}`; base `{}` ({} px); {} epoch(s), batch {}, seeds from {} (the split is fixed \
         by seed {}), Adam (full: AdamW), cosine to {:.0e}. The epoch of every run is chosen on \
         validation data carved from train; the test split is only scored. mDice: per image at \
         the ground truth's resolution, threshold 0.5, false positives counted, mean over the \
         test images.\n\n",
        t.data_dir.display(),
        t.base
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "fresh init".into()),
        t.sam.image_size,
        t.epochs,
        t.batch_size,
        t.seed,
        t.seed,
        t.min_lr
    );
    let runs = crate::stats::group_runs(rows.iter().map(|r| {
        (
            r.variant.label.as_str(),
            r.train_size.as_str(),
            r.summary.trainable,
            r.test_dice.as_slice(),
        )
    }));
    let ev = crate::stats::evidence_rows(&runs, "gps-k1", 2000, t.seed)?;
    s.push_str(&crate::stats::evidence_markdown(&ev, "mDice", "gps-k1"));
    // The prompted rows also against the prompted GPS (same prompts per test image).
    const PROMPTED_REF: &str = "gps-k1-box";
    if rows.iter().any(|r| r.variant.label == PROMPTED_REF) {
        let prompted = crate::stats::group_runs(
            rows.iter()
                .filter(|r| r.variant.prompt != PromptKind::None)
                .map(|r| {
                    (
                        r.variant.label.as_str(),
                        r.train_size.as_str(),
                        r.summary.trainable,
                        r.test_dice.as_slice(),
                    )
                }),
        );
        let ev = crate::stats::evidence_rows(&prompted, PROMPTED_REF, 2000, t.seed)?;
        s.push_str(&format!(
            "\nBox-prompted variants against {PROMPTED_REF} (one jittered box per ground-truth \
             object, the same boxes per test image for every method of a seed):\n\n"
        ));
        s.push_str(&crate::stats::evidence_markdown(&ev, "mDice", PROMPTED_REF));
    }
    s.push_str("\nPer run:\n\n| train images | seed | variant | lr | trainable % | epoch (val) | val mDice | test mDice | test mIoU | s/step | time |\n");
    s.push_str("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let m = &r.summary;
        s.push_str(&format!(
            "| {} | {} | {} | {:.0e} | {:.3}% | {} | {:.4} | {:.4} | {:.4} | {:.3} | {:.0}s |\n",
            r.train_size,
            r.seed,
            r.variant.label,
            r.variant.lr,
            m.trainable_pct,
            m.best_epoch.map_or("-".into(), |e| e.to_string()),
            m.val.mdice,
            m.best.mdice,
            m.best.miou,
            m.seconds_per_step,
            m.seconds
        ));
    }
    Ok(s)
}
