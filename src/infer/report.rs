//! Reports of inference jobs: merging the reports of sharded jobs (`gps-seg report merge`)
//! into the report an unsharded job over the same inputs would have written.
//!
//! Each shard's `report.json` holds its job identity ([`super::identity`]: the model's files
//! by content, the inputs' list digest and the options that change numbers), its per-image
//! scores at full precision with their position in the whole job's input order, the positions
//! it skipped, and the pooled pixel counts. Merging refuses, naming the shard file and the
//! field:
//!
//! - shards of different jobs (the first field of `job` that differs, with both folders);
//! - incomplete or overlapping coverage: every shard index `0..N` exactly once, and each
//!   shard's scored and skipped positions exactly the positions `i` with `i mod N = I`;
//! - inconsistent counts: per image `tp ≤ pred`, `tp ≤ gt`, Dice and IoU equal to those its
//!   counts give (to 1e-12: JSON), one score per image segmented, and the shard's `pooled`
//!   (exactly) and `metrics` equal to what its per-image counts give (missing ones refused).
//!
//! It then puts the scores back in the job's order and recomputes the metrics, so mDice/mIoU
//! are bit-identical to an unsharded run's. Shards that scored the field's metrics
//! (`--save-probs`, a PraNet run's test sets) carry every image's field score: one per scored
//! image, at the same position with the same id (else refused), merged in the job's order into
//! the same per-set table (`sets`) an unsharded job writes.

use super::identity::JobIdentity;
use super::records::{IndexedScore, InferReport, Shard, MAX_SHARDS};
use crate::error::{Error, Result};
use crate::metrics::{Metric, PooledCounts, SegMetrics, SetTable};
use crate::util::fs::{read_json, write_atomic, write_json_atomic};
use std::path::{Path, PathBuf};

/// Largest per-image pixel count a shard may claim (2^48: far above any image, and sums over
/// any number of images stay far from overflowing).
const MAX_COUNT: u64 = 1 << 48;

/// A value read back from JSON equals the one recomputed from exact counts: to within 1e-12
/// (serde_json's float parsing may be off by an ulp; the merge uses the recomputed values).
fn same(recomputed: f64, read: f64) -> bool {
    (recomputed - read).abs() <= 1e-12
}

/// `pooled` plus `(tp, fn)`, refusing an overflow (naming the shard file).
fn add_pooled(path: &Path, pooled: PooledCounts, tp: u64, fn_: u64) -> Result<PooledCounts> {
    match (pooled.tp.checked_add(tp), pooled.fn_.checked_add(fn_)) {
        (Some(tp), Some(fn_)) => Ok(PooledCounts { tp, fn_ }),
        _ => Err(bad_field(path, "pooled", "pixel counts overflow")),
    }
}

/// One shard's report with where it came from.
struct ShardReport {
    dir: PathBuf,
    path: PathBuf,
    report: InferReport,
    shard: Shard,
    job: JobIdentity,
}

fn bad_field(path: &Path, field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("field `{field}`: {msg}"),
    }
}

impl ShardReport {
    fn read(dir: &Path) -> Result<ShardReport> {
        let path = dir.join("report.json");
        let report: InferReport = read_json(&path)?;
        let shard = report.shard.ok_or_else(|| {
            bad_field(
                &path,
                "shard",
                "missing: not the report of a shard (`infer --shard I/N`); nothing to merge",
            )
        })?;
        let job = report.job.clone().ok_or_else(|| {
            bad_field(
                &path,
                "job",
                "missing: the shard carries no job identity (written by an older gps-seg?); \
                 run the shard again",
            )
        })?;
        Ok(ShardReport {
            dir: dir.to_path_buf(),
            path,
            report,
            shard,
            job,
        })
    }

    /// Check this shard on its own (see the module docs); returns its pooled counts as its
    /// per-image counts give them.
    fn check(&self) -> Result<PooledCounts> {
        let (p, r, job) = (&self.path, &self.report, &self.job);
        let n = job.shard_count;
        if n == 0 || n > MAX_SHARDS {
            return Err(bad_field(
                p,
                "job.shard_count",
                format!("{n} is not a shard count (1..={MAX_SHARDS})"),
            ));
        }
        if self.shard.count != n {
            return Err(bad_field(
                p,
                "shard.count",
                format!("{} but the job's shard count is {n}", self.shard.count),
            ));
        }
        let index = self.shard.index;
        if index >= n {
            return Err(bad_field(
                p,
                "shard.index",
                format!("{index} is not below the shard count {n}"),
            ));
        }
        // The top-level copies of the options must agree with the identity.
        let top: [(&str, bool); 5] = [
            ("engine", r.engine == job.engine),
            ("input_size", r.input_size == job.input_size),
            ("resize", r.resize == job.resize),
            (
                "threshold",
                r.threshold.to_bits() == job.threshold.to_bits(),
            ),
            ("total_inputs", r.total_inputs == job.inputs),
        ];
        if let Some((f, _)) = top.iter().find(|(_, same)| !same) {
            return Err(bad_field(p, f, "differs from the shard's own `job`"));
        }
        let total = job.inputs;
        let expected = if index < total {
            (total - index).div_ceil(n)
        } else {
            0
        };
        // Every position this shard accounts for: in range, its own, once.
        let mut seen = std::collections::HashSet::new();
        let mut account = |field: String, pos: usize| -> Result<()> {
            if pos >= total {
                return Err(bad_field(
                    p,
                    &field,
                    format!("position {pos} is not below the job's {total} inputs"),
                ));
            }
            if pos % n != index {
                return Err(bad_field(
                    p,
                    &field,
                    format!(
                        "position {pos} belongs to shard {}/{n}, not {index}/{n}",
                        pos % n
                    ),
                ));
            }
            if !seen.insert(pos) {
                return Err(bad_field(
                    p,
                    &field,
                    format!("position {pos} appears twice"),
                ));
            }
            Ok(())
        };
        for (k, &pos) in r.skipped_positions.iter().enumerate() {
            account(format!("skipped_positions[{k}]"), pos)?;
        }
        let mut pooled = PooledCounts::default();
        if job.scored {
            if r.scores.len() != r.images {
                return Err(bad_field(
                    p,
                    "scores",
                    format!(
                        "{} score(s) for {} image(s) segmented",
                        r.scores.len(),
                        r.images
                    ),
                ));
            }
            for (k, s) in r.scores.iter().enumerate() {
                account(format!("scores[{k}].index"), s.index)?;
                let c = s.score.counts;
                let at = |f: &str| format!("scores[{k}].{f}");
                if c.pred > MAX_COUNT || c.gt > MAX_COUNT {
                    return Err(bad_field(
                        p,
                        &at("counts"),
                        "more pixels than any image has",
                    ));
                }
                if c.tp > c.pred || c.tp > c.gt {
                    return Err(bad_field(
                        p,
                        &at("counts"),
                        format!("tp {} exceeds pred {} or gt {}", c.tp, c.pred, c.gt),
                    ));
                }
                let again = s.score.recomputed();
                if !same(again.dice, s.score.dice) {
                    return Err(bad_field(p, &at("dice"), "not the Dice of its counts"));
                }
                if !same(again.iou, s.score.iou) {
                    return Err(bad_field(p, &at("iou"), "not the IoU of its counts"));
                }
                pooled = add_pooled(p, pooled, c.tp, c.gt - c.tp)?;
            }
            match r.pooled {
                None => return Err(bad_field(p, "pooled", "missing in a scored shard")),
                Some(have) if have != pooled => {
                    return Err(bad_field(
                        p,
                        "pooled",
                        format!(
                            "tp {} fn {}, but the per-image counts sum to tp {} fn {}",
                            have.tp, have.fn_, pooled.tp, pooled.fn_
                        ),
                    ))
                }
                Some(_) => {}
            }
            let want = SegMetrics::from_parts(
                job.threshold,
                r.scores.iter().map(|s| s.score.clone()).collect(),
                pooled,
            )
            .compute();
            match &r.metrics {
                None => return Err(bad_field(p, "metrics", "missing in a scored shard")),
                Some(m)
                    if m.images != want.images
                        || !same(m.mdice, want.mdice)
                        || !same(m.miou, want.miou)
                        || !same(m.ref_dice_ignore_bg, want.ref_dice_ignore_bg)
                        || !same(m.ref_iou_ignore_bg, want.ref_iou_ignore_bg) =>
                {
                    return Err(bad_field(
                        p,
                        "metrics",
                        "not what the per-image scores give",
                    ))
                }
                Some(_) => {}
            }
        } else {
            if !r.scores.is_empty() || r.pooled.is_some() || r.metrics.is_some() {
                return Err(bad_field(
                    p,
                    "scores",
                    "scores in a shard of a job without ground truth",
                ));
            }
            // Nothing per image to check against: the count must add up.
            if r.images.checked_add(r.skipped_positions.len()) != Some(expected) {
                return Err(bad_field(
                    p,
                    "images",
                    format!(
                        "{} segmented + {} skipped, but shard {index}/{n} of {total} inputs has \
                         {expected}",
                        r.images,
                        r.skipped_positions.len()
                    ),
                ));
            }
        }
        if job.scored && seen.len() != expected {
            let missing: Vec<String> = (index..total)
                .step_by(n)
                .filter(|i| !seen.contains(i))
                .take(10)
                .map(|i| i.to_string())
                .collect();
            return Err(bad_field(
                p,
                "scores",
                format!(
                    "input position(s) {} of shard {index}/{n} are neither scored nor listed in \
                     `skipped_positions`",
                    missing.join(", ")
                ),
            ));
        }
        self.check_fields()?;
        Ok(pooled)
    }

    /// A shard that scored the field's metrics has one field score per scored image, at the
    /// same position with the same id; any other has none.
    fn check_fields(&self) -> Result<()> {
        let (p, r) = (&self.path, &self.report);
        if !self.job.field_metrics {
            if !r.field_scores.is_empty() || !r.sets.is_empty() {
                return Err(bad_field(
                    p,
                    "field_scores",
                    "field scores in a shard of a job without them (`job.field_metrics`)",
                ));
            }
            return Ok(());
        }
        let mut a: Vec<(usize, &str)> = r
            .scores
            .iter()
            .map(|s| (s.index, s.score.id.as_str()))
            .collect();
        let mut b: Vec<(usize, &str)> = r
            .field_scores
            .iter()
            .map(|f| (f.index, f.id.as_str()))
            .collect();
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            return Err(bad_field(
                p,
                "field_scores",
                format!(
                    "{} field score(s) that are not the {} scored image(s) (positions and ids)",
                    b.len(),
                    a.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Read `<dir>/report.json` of each shard, check they form one whole job (see the module
/// docs), and merge into `out`, which may not equal, contain or sit inside a shard folder.
pub fn merge_reports(dirs: &[PathBuf], out: &Path) -> Result<InferReport> {
    if dirs.is_empty() {
        return Err(Error::msg("report merge: give the shard folders to merge"));
    }
    let mut io = crate::util::fs::IoPaths::new().output("--out", out);
    for d in dirs {
        io = io.input("DIR (a shard folder)", d);
    }
    io.check()?;
    let shards = dirs
        .iter()
        .map(|d| ShardReport::read(d))
        .collect::<Result<Vec<_>>>()?;
    let first = &shards[0];
    for sh in &shards[1..] {
        if let Some(f) = first.job.first_difference(&sh.job) {
            return Err(Error::msg(format!(
                "report merge: {} and {} are shards of different jobs: field `job.{f}` differs",
                first.dir.display(),
                sh.dir.display()
            )));
        }
    }
    for sh in &shards {
        sh.check()?;
    }
    // Bounded by `check` (at most MAX_SHARDS).
    let count = first.job.shard_count;
    let mut owner: Vec<Option<&Path>> = vec![None; count];
    for sh in &shards {
        let slot = owner
            .get_mut(sh.shard.index)
            .ok_or_else(|| bad_field(&sh.path, "shard.index", "out of range"))?;
        if let Some(other) = slot {
            return Err(Error::msg(format!(
                "report merge: shard {}/{count} is given twice ({} and {})",
                sh.shard.index,
                other.display(),
                sh.dir.display()
            )));
        }
        *slot = Some(&sh.dir);
    }
    let missing: Vec<String> = owner
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::msg(format!(
            "report merge: shard(s) {} missing; merge needs all {count}",
            missing.join(", ")
        )));
    }
    let scoring = first.job.scored;
    let mut fields = Vec::new();
    let mut scores: Vec<IndexedScore> = Vec::new();
    let mut pooled = PooledCounts::default();
    let mut skipped = Vec::new();
    let mut skipped_positions = Vec::new();
    let (mut images, mut seconds, mut model_seconds, mut peak) = (0usize, 0.0, 0.0, 0f64);
    for sh in &shards {
        let r = &sh.report;
        scores.extend(r.scores.iter().cloned());
        fields.extend(r.field_scores.iter().cloned());
        if let Some(c) = r.pooled {
            pooled = add_pooled(&sh.path, pooled, c.tp, c.fn_)?;
        }
        skipped.extend(r.skipped.iter().cloned());
        skipped_positions.extend(r.skipped_positions.iter().copied());
        // Bounded by `check`: each shard's images are at most its share of the inputs.
        images = images.saturating_add(r.images);
        seconds += r.seconds;
        model_seconds += r.model_seconds;
        peak = peak.max(r.peak_rss_mb);
    }
    scores.sort_by_key(|s| s.index);
    // The exact scores (JSON's floats may be an ulp off): what an unsharded run computed.
    for s in &mut scores {
        s.score = s.score.recomputed();
    }
    skipped_positions.sort_unstable();
    fields.sort_by_key(|f| f.index);
    let mut table = SetTable::new(Default::default(), &first.report.set_name);
    for f in &fields {
        table.add(&f.id, f.score.clone());
    }
    let sets = table.finish()?;
    // Skipped inputs appear in every shard's list (they are found before sharding): once each.
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    skipped.dedup();
    let first = &first.report;
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
        job: first.job.clone(),
        skipped_positions,
        sets,
        set_name: first.set_name.clone(),
        field_scores: fields,
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
    if !r.sets.is_empty() {
        p.h2("Per set (the polyp tables' metrics)");
        p.raw(&crate::metrics::SetRow::table(&r.sets, "sets").html());
        p.note(
            "Computed from exactly the saved probs/<id>.png (8-bit, each image's resolution): \
             mDice/mIoU at 0.5 with false positives counted, Fβʷ (β² = 1), Sα (α = 0.5), Eφ mean \
             and max over 256 thresholds of the set's mean curve, adaptive Eφ, MAE; per-image \
             values averaged over the set, as PraNet's evaluation toolbox.",
        );
    }
    if r.metrics.is_some() {
        p.h2("Dice per image");
        let d: Vec<f64> = r.scores.iter().map(|s| s.score.dice).collect();
        p.raw(&histogram_svg(&d, 0.0, 1.0, 20, "Dice"));
        p.note("Dice and IoU per image at the ground truth's resolution, false positives counted.");
    }
    if thumbnails {
        p.raw(crate::util::draw::OVERLAY_LEGEND_HTML);
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
