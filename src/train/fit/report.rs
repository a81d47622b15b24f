//! `report.html` of a training run folder. It opens with a headline (method, trainable share,
//! the epoch chosen on validation, the test table: one row per test set for a PraNet run, else
//! val and test at the chosen epoch), then for GPS runs the selection map (selected entries per
//! encoder block × layer kind, a heat map: where the budget went), the best epoch's overlays
//! with their colour legend, the training loss per step, the evaluation metrics and the
//! learning rate per epoch (inline SVG with real text: whole-number epoch ticks, learning
//! rates in scientific notation), the epoch table, and every summary field folded away at the
//! end. Task-agnostic: it reads the records and the summary as JSON, so every task's metrics
//! show.

use crate::error::{Error, Result};
use crate::metrics::SetRow;
use crate::util::fs::write_atomic;
use crate::util::html::{esc, lines_svg_with, AxisFormat, Cell, Page, Table};
use serde::Serialize;
use serde_json::Value;
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
    let summary = summary.map(serde_json::to_value).transpose().map_err(bad)?;
    match &summary {
        Some(s) => headline(&mut p, s),
        None => p.note(&format!(
            "Training in progress: {} epoch(s) recorded; the headline and the test table appear \
             when the run finishes.",
            recs.len()
        )),
    }
    if let Some(map) = selection_map(run_dir)? {
        p.h2("Selection map: where the budget went");
        p.raw(&map);
    }
    overlays(&mut p, run_dir);
    let epochs = AxisFormat {
        x_integer: true,
        y_scientific: false,
    };
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
        let steps = AxisFormat {
            x_integer: true,
            ..epochs
        };
        p.raw(&lines_svg_with(
            &[("train loss", loss)],
            "step",
            "loss",
            steps,
        ));
    }
    epoch_sections(&mut p, &recs, epochs);
    if let Some(s) = &summary {
        let mut kv = Vec::new();
        display_fields("", s, &mut kv);
        p.raw("<details><summary>Every summary field (summary.json)</summary>");
        p.key_values(&kv);
        p.raw("</details>");
    }
    write_atomic(&run_dir.join("report.html"), p.finish().as_bytes())
}

/// Metrics per epoch (a chart of every metric, val and test), the learning rate per epoch and
/// the epoch table.
fn epoch_sections(p: &mut Page, recs: &[Value], epochs: AxisFormat) {
    // Metrics per epoch.
    let mut names: Vec<String> = Vec::new();
    let mut rows: Vec<(f64, Vec<(String, f64)>)> = Vec::new();
    for r in recs {
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
        p.raw(&lines_svg_with(&series, "epoch", "metric", epochs));
        let lr: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|(e, kv)| kv.iter().find(|(k, _)| k == "lr").map(|(_, v)| (*e, *v)))
            .collect();
        if !lr.is_empty() {
            p.h2("Learning rate");
            let lr_axis = AxisFormat {
                y_scientific: true,
                ..epochs
            };
            p.raw(&lines_svg_with(
                &[("learning rate", lr)],
                "epoch",
                "lr",
                lr_axis,
            ));
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
                            // Counts as whole numbers; the learning rate as it is set.
                            Some((_, v)) if n == "lr" => Cell::Text(format!("{v:.2e}")),
                            Some((_, v)) if v.fract() == 0.0 && v.abs() < 1e15 => Cell::Num(*v, 0),
                            Some((_, v)) => Cell::Num(*v, 4),
                            None => Cell::Text(String::new()),
                        })
                        .collect()
                })
                .collect(),
        };
        p.raw(&table.html());
    }
}

/// A number of a JSON object, if present.
fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

/// The run's headline: method, trainable share, the epoch chosen and on what, and the test
/// table (per test set when the run has them; else val and test at the chosen epoch).
fn headline(p: &mut Page, s: &Value) {
    let method = s.get("method").and_then(Value::as_str).unwrap_or("?");
    let epoch = match s.get("best_epoch").and_then(Value::as_u64) {
        Some(0) => "the base model (epoch 0)".to_string(),
        Some(e) => format!("epoch {e}"),
        None => "no epoch".to_string(),
    };
    let on = match s.get("selected_on").and_then(Value::as_str) {
        Some("last") => "the last epoch (no validation split: nothing chosen)".to_string(),
        Some(x) => format!("chosen on {x}"),
        None => String::new(),
    };
    let share = match (
        num(s, "trainable"),
        num(s, "total"),
        num(s, "trainable_pct"),
    ) {
        (Some(t), Some(n), Some(pct)) => {
            format!("{t:.0} of {n:.0} parameters trained ({pct:.3}%)")
        }
        _ => String::new(),
    };
    p.raw(&format!(
        "<p class=\"headline\" style=\"font-size:1.25em\"><b>{}</b> · {} · {} {}</p>",
        esc(method),
        esc(&share),
        esc(&epoch),
        esc(&on)
    ));
    let sets: Vec<SetRow> = s
        .get("test_sets")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    if !sets.is_empty() {
        p.h2("Test sets at the chosen epoch");
        p.raw(&SetRow::table(&sets, "test-sets").html());
        p.note(
            "One row per test set, scored on the 8-bit probability maps at each image's \
             resolution (PraNet's toolbox's metrics); the test sets chose nothing.",
        );
        return;
    }
    // Val and test rows of the task's own metrics at the chosen epoch.
    let rows: Vec<(&str, &Value)> = [("val", "val"), ("test", "best")]
        .into_iter()
        .filter_map(|(name, k)| s.get(k).filter(|v| v.is_object()).map(|v| (name, v)))
        .collect();
    let mut names: Vec<String> = Vec::new();
    for (_, v) in &rows {
        if let Some(m) = v.as_object() {
            for (k, x) in m {
                if x.is_f64() && !k.starts_with("ref_") && !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
    }
    let mut table_rows: Vec<Vec<Cell>> = rows
        .iter()
        .map(|(name, v)| {
            let mut r = vec![Cell::Text(name.to_string())];
            r.extend(names.iter().map(|n| match num(v, n) {
                Some(x) => Cell::Num(x, 4),
                None => Cell::Text(String::new()),
            }));
            r
        })
        .collect();
    if table_rows.is_empty() {
        // Classification: top-1 on val and test.
        let acc: Vec<(&str, f64)> = [("val", "val_acc"), ("test", "best_acc")]
            .into_iter()
            .filter_map(|(n, k)| num(s, k).map(|x| (n, x)))
            .collect();
        names = vec!["top-1".into()];
        table_rows = acc
            .into_iter()
            .map(|(n, x)| vec![Cell::Text(n.into()), Cell::Num(x, 4)])
            .collect();
    }
    if !table_rows.is_empty() {
        p.h2("At the chosen epoch");
        let mut headers = vec!["split".to_string()];
        headers.extend(names);
        p.raw(
            &Table {
                id: "headline".into(),
                headers,
                rows: table_rows,
            }
            .html(),
        );
    }
}

/// The layer kinds of the selection map's columns: (column, name suffixes it collects).
const KINDS: [(&str, &[&str]); 5] = [
    ("qkv", &["attn.qkv.weight"]),
    ("proj", &["attn.proj.weight"]),
    ("mlp.lin1", &["mlp.lin1.weight", "mlp.fc1.weight"]),
    ("mlp.lin2", &["mlp.lin2.weight", "mlp.fc2.weight"]),
    ("neck", &[]),
];

/// The block number of a tensor name (`…blocks.<i>.…`).
fn block_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("blocks.")? + "blocks.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// For a GPS run (`<run>/gps/selection.safetensors`): selected entries per encoder block ×
/// layer kind as a heat-map table (rows: blocks, then the neck; darker: more entries), and
/// what was selected elsewhere. `None` for runs without a selection.
fn selection_map(run_dir: &Path) -> Result<Option<String>> {
    let path = run_dir.join("gps").join("selection.safetensors");
    if !path.is_file() {
        return Ok(None);
    }
    let sel = crate::util::tensors::load(&path, &candle_core::Device::Cpu)?;
    let blocks = sel
        .keys()
        .filter_map(|n| block_of(n))
        .max()
        .map_or(0, |b| b + 1);
    // Bounded: block numbers come from tensor names of a file this run wrote.
    let mut grid = vec![[0usize; 5]; blocks.min(4096) + 1];
    let (mut other, mut other_tensors) = (0usize, 0usize);
    let neck = grid.len() - 1;
    for (name, t) in &sel {
        let n = t.elem_count();
        let kind = KINDS
            .iter()
            .position(|(_, sfx)| sfx.iter().any(|x| name.ends_with(x)));
        match (block_of(name), kind) {
            (Some(b), Some(k)) if b < neck => grid[b][k] += n,
            _ if name.contains("neck") => grid[neck][4] += n,
            _ => {
                other += n;
                other_tensors += 1;
            }
        }
    }
    let top = grid.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let mut h = String::from("<table class=\"selmap\"><thead><tr><th>block</th>");
    for (k, _) in KINDS {
        h.push_str(&format!("<th>{k}</th>"));
    }
    h.push_str("</tr></thead><tbody>");
    let last = grid.len() - 1;
    for (b, row) in grid.iter().enumerate() {
        if b == last && row.iter().all(|&v| v == 0) {
            continue;
        }
        let label = if b == last {
            "neck".to_string()
        } else {
            b.to_string()
        };
        h.push_str(&format!("<tr><td>{label}</td>"));
        for &v in row {
            let a = v as f64 / top;
            let ink = if a > 0.55 { "#fff" } else { "#000" };
            h.push_str(&format!(
                "<td style=\"background:rgba(76,139,245,{a:.3});color:{ink};text-align:right\" \
                 title=\"{v} entries\">{v}</td>"
            ));
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    h.push_str(&format!(
        "<p class=\"note\">Selected entries per image-encoder block and layer kind (darker: \
         more; the darkest cell holds {top:.0}). Elsewhere: {other} entries in {other_tensors} \
         tensor(s) (e.g. the mask decoder).</p>"
    ));
    Ok(Some(h))
}

/// The best epoch's overlays (`<run>/overlays/`, a PraNet run's one folder per test set) as
/// thumbnails, with what each colour means.
fn overlays(p: &mut Page, run_dir: &Path) {
    let dir = run_dir.join("overlays");
    let mut files: Vec<String> = Vec::new();
    let mut walk = |d: &Path, prefix: &str| {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".png") {
                    files.push(format!("{prefix}{name}"));
                }
            }
        }
    };
    walk(&dir, "overlays/");
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let subs: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for s in subs {
            walk(&dir.join(&s), &format!("overlays/{s}/"));
        }
    }
    if files.is_empty() {
        return;
    }
    files.sort();
    p.h2("Overlays at the chosen epoch");
    p.raw(crate::util::draw::OVERLAY_LEGEND_HTML);
    let mut h = String::from("<div>");
    for f in files.iter().take(12) {
        h.push_str(&format!(
            "<figure style=\"display:inline-block;margin:4px\"><img src=\"{0}\" \
             style=\"max-height:160px\" alt=\"{0}\"><figcaption>{0}</figcaption></figure>",
            esc(f)
        ));
    }
    h.push_str("</div>");
    p.raw(&h);
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
        let body = body.split("</table>").next().unwrap();
        assert_eq!(
            body.matches("<tr>").count(),
            4,
            "header + one row per epoch"
        );
        assert!(h.contains("run &lt;x&gt;"));
        // The headline first, the dotted fields folded away last; epochs tick as whole
        // numbers, the learning rate in scientific notation.
        let head = h.find("class=\"headline\"").unwrap();
        assert!(head < h.find("Training loss").unwrap());
        assert!(h.find("<details>").unwrap() > h.find("id=\"epochs\"").unwrap());
        assert!(
            h.contains(">1.0e-3</text>") && h.contains(">2</text>"),
            "{h}"
        );
        assert!(!h.contains(">1.50</text>"), "{h}");
    }
}
