//! `gps-seg experiment kvasir`: GPS against its baselines on a Kvasir-shaped set, same data,
//! seed and epochs for every variant: zero-shot (no tuning), decoder only, full fine-tuning,
//! GPS at K = 1, 2, 4, and random / magnitude selection at the GPS K = 1 budget.
//! Writes `table.md`, `results.json`, `mdice.png` and one run folder per variant; a finished
//! variant whose settings did not change is reused.

use crate::error::{Error, Result};
use crate::progress::{Event, Observer};
use crate::train::config::Method;
use crate::train::run::clear_for_run;
use crate::train::seg::{self, RunSummary, SegTrainConfig};
use crate::util::fs::{read_json, write_atomic, write_json_atomic, IoPaths};
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
}

impl SegVariant {
    fn new(label: &str, method: Method, topk: usize, lr: f64) -> Self {
        SegVariant {
            label: label.into(),
            method,
            topk,
            lr,
        }
    }
}

/// The default variants at learning rate `lr` (full: `lr / 5`).
pub fn default_variants(lr: f64) -> Vec<SegVariant> {
    vec![
        SegVariant::new("zero-shot", Method::ZeroShot, 1, lr),
        SegVariant::new("decoder", Method::Decoder, 1, lr),
        SegVariant::new("full", Method::Full, 1, lr / 5.0),
        SegVariant::new("gps-k1", Method::Gps, 1, lr),
        SegVariant::new("gps-k2", Method::Gps, 2, lr),
        SegVariant::new("gps-k4", Method::Gps, 4, lr),
        SegVariant::new("random-k1", Method::Random, 1, lr),
        SegVariant::new("magnitude-k1", Method::Magnitude, 1, lr),
    ]
}

/// A result row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegExperimentRow {
    pub variant: SegVariant,
    pub summary: RunSummary,
}

/// Run every variant of `template` (data, model, epochs, seed) into `out/<label>`. A finished
/// variant with the same settings is reused; a variant folder holding anything else (another
/// setting, an unfinished run) is refused unless `overwrite`, then replaced.
pub fn run_kvasir(
    template: &SegTrainConfig,
    variants: &[SegVariant],
    out: &Path,
    overwrite: bool,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(Vec<SegExperimentRow>, String)> {
    if variants.is_empty() {
        return Err(Error::Config {
            field: "only".into(),
            msg: "no variants to run".into(),
        });
    }
    IoPaths::new()
        .input("--data-dir", &template.data_dir)
        .input_opt("--model", template.base.as_ref())
        .output("--out", out)
        .check()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut rows = Vec::new();
    for v in variants {
        let mut cfg = template.clone();
        cfg.method = v.method;
        cfg.topk = v.topk;
        cfg.lr = v.lr;
        cfg.min_lr = cfg.min_lr.min(cfg.lr);
        cfg.keep_last = 1;
        let dir = out.join(&v.label);
        let summary_path = dir.join("summary.json");
        let reusable = summary_path.is_file()
            && read_json::<SegTrainConfig>(&dir.join("config.json")).ok() == Some(cfg.clone());
        let summary = if reusable {
            obs.event(Event::Info(format!(
                "{}: reusing {}",
                v.label,
                dir.display()
            )));
            read_json::<RunSummary>(&summary_path)?
        } else {
            clear_for_run(&dir, overwrite, "--out")?;
            obs.event(Event::Info(format!("── {} ──", v.label)));
            seg::train(&cfg, &dir, device, false, obs)?
        };
        rows.push(SegExperimentRow {
            variant: v.clone(),
            summary,
        });
    }
    let table = table(template, &rows);
    write_atomic(&out.join("table.md"), table.as_bytes())?;
    write_json_atomic(&out.join("results.json"), &rows)?;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .map(|r| (r.variant.label.to_uppercase(), r.summary.best.mdice))
        .collect();
    crate::util::draw::save_png(
        &out.join("mdice.png"),
        &crate::util::draw::bar_chart("HELD-OUT MDICE BY METHOD", &bars, 640),
    )?;
    Ok((rows, table))
}

/// The markdown table.
pub fn table(t: &SegTrainConfig, rows: &[SegExperimentRow]) -> String {
    let mut s = format!(
        "Data `{}`; base `{}` ({} px); {} epoch(s), batch {}, seed {}, Adam (full: AdamW), \
         cosine to {:.0e}. mDice/mIoU: per image at the ground truth's resolution, threshold 0.5, \
         false positives counted, mean over the held-out images; \"ref.\" = the GPS reference \
         repository's pooled background-ignored Dice (for comparison with published GPS numbers \
         only).\n\n",
        t.data_dir.display(),
        t.base
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "fresh init".into()),
        t.sam.image_size,
        t.epochs,
        t.batch_size,
        t.seed,
        t.min_lr
    );
    s.push_str("| variant | lr | trainable | trainable % | mDice | mIoU | ref. Dice | best epoch | s/step | time |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let m = &r.summary;
        s.push_str(&format!(
            "| {} | {:.0e} | {} | {:.3}% | {:.4} | {:.4} | {:.4} | {} | {:.3} | {:.0}s |\n",
            r.variant.label,
            r.variant.lr,
            m.trainable,
            m.trainable_pct,
            m.best.mdice,
            m.best.miou,
            m.best.ref_dice_ignore_bg,
            m.best_epoch.map_or("-".into(), |e| e.to_string()),
            m.seconds_per_step,
            m.seconds
        ));
    }
    s
}
