//! Reports of inference jobs: merging the reports of sharded jobs (`gps-seg report merge`)
//! into the report an unsharded job over the same inputs would have written.
//!
//! Each shard's `report.json` holds its per-image scores at full precision with their position
//! in the whole job's input order, and the pooled pixel counts. Merging checks that the shards
//! come from one job (engine, model, size, resize, threshold, shard count) and together cover
//! every input exactly once, puts the scores back in the job's order and recomputes the
//! metrics, so mDice/mIoU are bit-identical to an unsharded run's.

use super::job::{IndexedScore, InferReport};
use crate::error::{Error, Result};
use crate::metrics::{Metric, PooledCounts, SegMetrics};
use crate::util::fs::{read_json, write_atomic, write_json_atomic};
use std::path::{Path, PathBuf};

/// Read `<dir>/report.json` of each shard, check they form one whole job, and merge.
pub fn merge_reports(dirs: &[PathBuf], out: &Path) -> Result<InferReport> {
    if dirs.is_empty() {
        return Err(Error::msg("report merge: give the shard folders to merge"));
    }
    let mut reports = Vec::with_capacity(dirs.len());
    for d in dirs {
        let p = d.join("report.json");
        let r: InferReport = read_json(&p)?;
        reports.push((p, r));
    }
    let (p0, first) = &reports[0];
    let count = first.shard.map_or(1, |s| s.count);
    let mut seen = vec![false; count];
    for (p, r) in &reports {
        let differs = |field: &str| Error::Checkpoint {
            path: p.clone(),
            msg: format!(
                "field `{field}` differs from {}: these shards are not from one job",
                p0.display()
            ),
        };
        if r.engine != first.engine || r.model != first.model {
            return Err(differs("model"));
        }
        if r.input_size != first.input_size {
            return Err(differs("input_size"));
        }
        if r.resize != first.resize {
            return Err(differs("resize"));
        }
        if r.threshold.to_bits() != first.threshold.to_bits() {
            return Err(differs("threshold"));
        }
        if r.total_inputs != first.total_inputs {
            return Err(differs("total_inputs"));
        }
        let s = r.shard.ok_or_else(|| Error::Checkpoint {
            path: p.clone(),
            msg: "not a shard (no `shard` field): nothing to merge".into(),
        })?;
        if s.count != count {
            return Err(differs("shard.count"));
        }
        let slot = seen
            .get_mut(s.index)
            .ok_or_else(|| differs("shard.index"))?;
        if *slot {
            return Err(Error::Checkpoint {
                path: p.clone(),
                msg: format!("shard {}/{count} is given twice", s.index),
            });
        }
        *slot = true;
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| !**s)
        .map(|(i, _)| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::msg(format!(
            "report merge: shard(s) {} missing; merge needs all {count}",
            missing.join(", ")
        )));
    }
    let scoring = reports.iter().all(|(_, r)| r.pooled.is_some());
    let mut scores: Vec<IndexedScore> = Vec::new();
    let mut pooled = PooledCounts::default();
    let mut skipped = Vec::new();
    let (mut images, mut seconds, mut model_seconds, mut peak) = (0usize, 0.0, 0.0, 0f64);
    for (_, r) in &reports {
        scores.extend(r.scores.iter().cloned());
        if let Some(c) = r.pooled {
            pooled.tp += c.tp;
            pooled.fn_ += c.fn_;
        }
        skipped.extend(r.skipped.iter().cloned());
        images += r.images;
        seconds += r.seconds;
        model_seconds += r.model_seconds;
        peak = peak.max(r.peak_rss_mb);
    }
    scores.sort_by_key(|s| s.index);
    for s in &mut scores {
        s.score = s.score.recomputed();
    }
    if scores.windows(2).any(|w| w[0].index == w[1].index) {
        return Err(Error::msg(
            "report merge: two shards scored the same input; they are not one job's shards",
        ));
    }
    // Skipped inputs appear in every shard's list (they are found before sharding): once each.
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    skipped.dedup();
    let metrics = scoring.then(|| {
        SegMetrics::from_parts(
            first.threshold,
            scores.iter().map(|s| s.score.clone()).collect(),
            pooled,
        )
        .compute()
    });
    let merged = InferReport {
        engine: first.engine.clone(),
        model: first.model.clone(),
        input_size: first.input_size,
        resize: first.resize,
        threshold: first.threshold,
        batch_size: first.batch_size,
        images,
        skipped,
        seconds,
        images_per_s: images as f64 / seconds.max(1e-9),
        model_seconds,
        model_images_per_s: images as f64 / model_seconds.max(1e-9),
        peak_rss_mb: peak,
        metrics,
        out: out.to_path_buf(),
        shard: None,
        total_inputs: first.total_inputs,
        scores,
        pooled: scoring.then_some(pooled),
    };
    if scoring {
        let mut csv = String::from("id,dice,iou\n");
        for s in &merged.scores {
            csv.push_str(&format!(
                "{},{:.6},{:.6}\n",
                s.score.id, s.score.dice, s.score.iou
            ));
        }
        write_atomic(&out.join("scores.csv"), csv.as_bytes())?;
    }
    write_json_atomic(&out.join("report.json"), &merged)?;
    // The overlays stay in the shard folders: the merged page shows the scores only.
    write_html(&merged, out, false)?;
    Ok(merged)
}

/// Write `<out>/report.html` for a job's report: the summary, a Dice histogram and the
/// per-image table (worst Dice first; click a header to sort) with overlay thumbnails when
/// `thumbnails` (overlays live in `<out>/overlays/`).
pub fn write_html(r: &InferReport, out: &Path, thumbnails: bool) -> Result<()> {
    use crate::util::html::{histogram_svg, Cell, Page, Table};
    let mut p = Page::new(&format!("gps-seg inference report: {}", out.display()));
    let mut kv = vec![
        ("engine".to_string(), r.engine.clone()),
        ("model".to_string(), r.model.clone()),
        (
            "input".to_string(),
            format!(
                "{0}×{0}, {1:?}, threshold {2}",
                r.input_size, r.resize, r.threshold
            ),
        ),
        (
            "images".to_string(),
            format!("{} segmented, {} skipped", r.images, r.skipped.len()),
        ),
    ];
    if let Some(s) = r.shard {
        kv.push((
            "shard".into(),
            format!("{}/{} of {} inputs", s.index, s.count, r.total_inputs),
        ));
    }
    if let Some(m) = &r.metrics {
        kv.push(("mDice".into(), format!("{:.4}", m.mdice)));
        kv.push(("mIoU".into(), format!("{:.4}", m.miou)));
        kv.push((
            "GPS reference convention (pooled, background ignored)".into(),
            format!(
                "Dice {:.4}, IoU {:.4} (for comparison with published GPS numbers only)",
                m.ref_dice_ignore_bg, m.ref_iou_ignore_bg
            ),
        ));
    }
    kv.push((
        "throughput".into(),
        format!(
            "{:.2} images/s end to end, {:.2} in the model; peak memory {:.0} MB",
            r.images_per_s, r.model_images_per_s, r.peak_rss_mb
        ),
    ));
    p.h2("Summary");
    p.key_values(&kv);
    if r.metrics.is_some() {
        p.h2("Dice per image");
        let d: Vec<f64> = r.scores.iter().map(|s| s.score.dice).collect();
        p.raw(&histogram_svg(&d, 0.0, 1.0, 20, "Dice"));
        p.note("Dice and IoU per image at the ground truth's resolution, false positives counted.");
    }
    let mut scores: Vec<&IndexedScore> = r.scores.iter().collect();
    scores.sort_by(|a, b| a.score.dice.total_cmp(&b.score.dice));
    let mut headers = vec!["id".to_string(), "Dice".into(), "IoU".into()];
    if thumbnails {
        headers.push("overlay".into());
    }
    let rows = scores
        .iter()
        .map(|s| {
            let mut row = vec![
                Cell::Text(s.score.id.clone()),
                Cell::Num(s.score.dice, 4),
                Cell::Num(s.score.iou, 4),
            ];
            if thumbnails {
                row.push(Cell::Img(format!("overlays/{}.png", s.score.id)));
            }
            row
        })
        .collect();
    if !r.scores.is_empty() {
        p.h2("Images (worst Dice first)");
        p.raw(
            &Table {
                id: "images".into(),
                headers,
                rows,
            }
            .html(),
        );
    }
    if !r.skipped.is_empty() {
        p.h2("Skipped inputs");
        let rows = r
            .skipped
            .iter()
            .map(|b| {
                vec![
                    Cell::Text(b.path.display().to_string()),
                    Cell::Text(b.reason.clone()),
                ]
            })
            .collect();
        p.raw(
            &Table {
                id: "skipped".into(),
                headers: vec!["file".into(), "reason".into()],
                rows,
            }
            .html(),
        );
    }
    write_atomic(&out.join("report.html"), p.finish().as_bytes())
}
