//! `report.html` of a training run folder: the summary, the training loss per step, the
//! evaluation metrics and the learning rate per epoch (inline SVG with real text), and the
//! epoch table. Task-agnostic: it reads the records as JSON, so every task's metrics show.

use crate::error::{Error, Result};
use crate::util::fs::write_atomic;
use crate::util::html::{lines_svg, Cell, Page, Table};
use serde::Serialize;
use std::path::Path;

/// Fields of an epoch record that are bookkeeping, not metrics.
const NOT_METRICS: [&str; 6] = [
    "epoch",
    "steps",
    "train_loss",
    "lr",
    "seconds",
    "images_per_s",
];

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f64)>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((prefix.to_string(), x));
            }
        }
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        _ => {}
    }
}

/// Every scalar field (numbers, strings, booleans), nested names joined with `.`, for display.
fn display_fields(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| display_fields(&key(k), x, out)),
        Value::Number(n) => out.push((
            prefix.into(),
            match n.as_f64() {
                Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
                Some(x) => format!("{x:.4}"),
                None => n.to_string(),
            },
        )),
        Value::String(s) => out.push((prefix.into(), s.clone())),
        Value::Bool(b) => out.push((prefix.into(), b.to_string())),
        Value::Null | Value::Array(_) => {}
    }
}

/// Write `<run_dir>/report.html` from the run's epoch records, step losses and (when the run
/// has finished) its summary.
pub fn write_run_html<R: Serialize, S: Serialize>(
    run_dir: &Path,
    title: &str,
    records: &[R],
    step_losses: &[f32],
    summary: Option<&S>,
) -> Result<()> {
    let bad = |e: serde_json::Error| Error::msg(format!("{}: report: {e}", run_dir.display()));
    let recs: Vec<serde_json::Value> = records
        .iter()
        .map(serde_json::to_value)
        .collect::<std::result::Result<_, _>>()
        .map_err(bad)?;
    let mut p = Page::new(title);
    if let Some(s) = summary {
        let mut kv = Vec::new();
        display_fields("", &serde_json::to_value(s).map_err(bad)?, &mut kv);
        p.h2("Summary");
        p.key_values(&kv);
    }
    // Training loss per step (mean over windows of 1/50 of the run).
    let w = (step_losses.len() / 50).max(1);
    let loss: Vec<(f64, f64)> = step_losses
        .chunks(w)
        .enumerate()
        .map(|(i, c)| {
            (
                ((i * w) + c.len()) as f64,
                c.iter().map(|&x| x as f64).sum::<f64>() / c.len() as f64,
            )
        })
        .collect();
    if !loss.is_empty() {
        p.h2("Training loss");
        p.raw(&lines_svg(&[("train loss", loss)], "step", "loss"));
    }
    // Metrics per epoch.
    let mut names: Vec<String> = Vec::new();
    let mut rows: Vec<(f64, Vec<(String, f64)>)> = Vec::new();
    for r in &recs {
        let mut kv = Vec::new();
        flatten("", r, &mut kv);
        let epoch = kv
            .iter()
            .find(|(k, _)| k == "epoch")
            .map_or(rows.len() as f64 + 1.0, |(_, v)| *v);
        for (k, _) in &kv {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        rows.push((epoch, kv));
    }
    let metric_names: Vec<&String> = names
        .iter()
        .filter(|n| {
            !NOT_METRICS.contains(&n.as_str()) && !n.ends_with("images") && !n.contains("ref_")
        })
        .collect();
    let series: Vec<(&str, Vec<(f64, f64)>)> = metric_names
        .iter()
        .map(|n| {
            let pts = rows
                .iter()
                .filter_map(|(e, kv)| kv.iter().find(|(k, _)| k == *n).map(|(_, v)| (*e, *v)))
                .collect();
            (n.as_str(), pts)
        })
        .collect();
    if !series.is_empty() && !rows.is_empty() {
        p.h2("Evaluation per epoch");
        p.raw(&lines_svg(&series, "epoch", "metric"));
        let lr: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|(e, kv)| kv.iter().find(|(k, _)| k == "lr").map(|(_, v)| (*e, *v)))
            .collect();
        if !lr.is_empty() {
            p.h2("Learning rate");
            p.raw(&lines_svg(&[("lr", lr)], "epoch", "learning rate"));
        }
        p.h2("Epochs");
        let table = Table {
            id: "epochs".into(),
            headers: names.clone(),
            rows: rows
                .iter()
                .map(|(_, kv)| {
                    names
                        .iter()
                        .map(|n| match kv.iter().find(|(k, _)| k == n) {
                            Some((_, v)) => Cell::Num(*v, 4),
                            None => Cell::Text(String::new()),
                        })
                        .collect()
                })
                .collect(),
        };
        p.raw(&table.html());
    }
    write_atomic(&run_dir.join("report.html"), p.finish().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_page_shows_summary_curves_and_one_row_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<serde_json::Value> = (1..=3)
            .map(|e| {
                serde_json::json!({"epoch": e, "steps": 4, "train_loss": 1.0 / e as f64,
                "lr": 1e-3, "val": {"mdice": 0.5 + 0.1 * e as f64}, "seconds": 1.0})
            })
            .collect();
        let losses: Vec<f32> = (0..12).map(|i| 1.0 / (i + 1) as f32).collect();
        let summary = serde_json::json!({"method": "gps", "trainable": 10, "best_epoch": 3});
        write_run_html(dir.path(), "run <x>", &recs, &losses, Some(&summary)).unwrap();
        let h = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
        assert!(
            h.contains(">val.mdice</text>") && h.contains(">train loss</text>"),
            "{h}"
        );
        assert!(h.contains("<td>best_epoch</td><td>3</td>"), "{h}");
        let body = h.split("id=\"epochs\"").nth(1).unwrap();
        assert_eq!(
            body.matches("<tr>").count(),
            4,
            "header + one row per epoch"
        );
        assert!(h.contains("run &lt;x&gt;"));
    }
}
