//! Prompts sampled from a ground-truth mask, for prompted fine-tuning and its evaluation
//! (MedSAM / SAM-Med2D style). Model-free: everything here works on an `S × S` {0, 1} mask in
//! the model's input frame.
//!
//! - **Objects** are the 8-connected components of the mask (raster order of their first
//!   pixel). Components smaller than [`PromptSpec::min_area`] pixels are skipped, except that
//!   an image whose every component is below the floor keeps its largest one.
//! - **Box**: the component's bounding box (pixel indices, xyxy) with each side pushed
//!   *outwards* by a seeded uniform jitter in `[0, j]`, `j = jitter_1024 · S / 1024` (MedSAM
//!   shifts each side by up to 20 px at 1024), clamped to the image: the box always contains
//!   its object.
//! - **Points**: [`PromptSpec::points`] positives drawn uniformly (with replacement) from the
//!   object's pixels, then [`PromptSpec::neg_points`] negatives drawn uniformly from the band
//!   outside it (pixels within Chebyshev distance [`PromptSpec::band_px`] of the object that
//!   lie in no object). When the band is empty the negatives are padding (`(0, 0)`, label −1,
//!   which SAM embeds as "not a point"). Labels: 1 positive, 0 negative, −1 padding.
//!
//! Seeding: training draws from the loader's per-(seed, epoch, position) generator (after the
//! augmentation's draws), so a resumed run draws the same prompts; evaluation uses
//! [`fixed_rng`] — a generator of (seed, image id) alone — so every epoch and every method
//! sees the same prompts for an image.

use crate::error::{Error, Result};
use crate::util::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Which prompts a run trains and evaluates with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PromptKind {
    /// Prompt-free (GPS's own recipe): no prompts are sampled.
    #[default]
    None,
    /// One jittered box per object.
    Box,
    /// Positive and negative points per object.
    Points,
    /// A box and points per object.
    #[value(name = "box+points")]
    #[serde(rename = "box+points")]
    BoxPoints,
}

impl PromptKind {
    pub fn name(self) -> &'static str {
        match self {
            PromptKind::None => "none",
            PromptKind::Box => "box",
            PromptKind::Points => "points",
            PromptKind::BoxPoints => "box+points",
        }
    }
    pub fn has_box(self) -> bool {
        matches!(self, PromptKind::Box | PromptKind::BoxPoints)
    }
    pub fn has_points(self) -> bool {
        matches!(self, PromptKind::Points | PromptKind::BoxPoints)
    }
}

/// How prompts are sampled (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PromptSpec {
    pub kind: PromptKind,
    /// Positive points per object (`--points`).
    pub points: usize,
    /// Negative points per object (`--neg-points`).
    pub neg_points: usize,
    /// Largest outward shift of each box side, in pixels at a 1024-px input (MedSAM: 20).
    pub jitter_1024: f32,
    /// Components with fewer pixels (at the input size) are skipped; 0 = `S² / 4096` (16 px
    /// at 256, 256 px at 1024), at least 1.
    pub min_area: usize,
    /// Width of the negative band in pixels at the input size; 0 = `S / 32`, at least 1.
    pub band: usize,
}

/// Most points per object a spec may ask for (bounds the prompt tensors).
pub const MAX_POINTS: usize = 64;
/// Most objects per image that get a prompt set (largest first beyond it).
pub const MAX_OBJECTS: usize = 64;

impl Default for PromptSpec {
    fn default() -> Self {
        PromptSpec {
            kind: PromptKind::None,
            points: 1,
            neg_points: 1,
            jitter_1024: 20.0,
            min_area: 0,
            band: 0,
        }
    }
}

impl PromptSpec {
    /// A spec of `kind` with the defaults.
    pub fn of(kind: PromptKind) -> Self {
        PromptSpec {
            kind,
            ..Default::default()
        }
    }

    pub fn is_prompted(&self) -> bool {
        self.kind != PromptKind::None
    }

    /// The default prompt-free spec (what a config without a `prompt` field means).
    pub fn is_prompt_free(&self) -> bool {
        *self == PromptSpec::default()
    }

    /// Refuse out-of-range settings, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                field: field.into(),
                msg,
            })
        };
        if self.kind.has_points() {
            if self.points == 0 {
                return bad("points", "point prompts need at least one positive".into());
            }
            if self.points.saturating_add(self.neg_points) > MAX_POINTS {
                return bad(
                    "points",
                    format!("at most {MAX_POINTS} points per object (positives + negatives)"),
                );
            }
        }
        if !(self.jitter_1024.is_finite() && (0.0..=256.0).contains(&self.jitter_1024)) {
            return bad(
                "prompt_jitter",
                format!("{} is not in [0, 256] px", self.jitter_1024),
            );
        }
        Ok(())
    }

    /// Points per object in the prompt tensors (0 without point prompts).
    pub fn points_per_object(&self) -> usize {
        if self.kind.has_points() {
            self.points.saturating_add(self.neg_points)
        } else {
            0
        }
    }

    /// Whether the prompt is ambiguous (a single point, no box): SAM's multimask output is
    /// used then, trained with the min-over-masks loss.
    pub fn multimask(&self) -> bool {
        self.kind == PromptKind::Points && self.points_per_object() == 1
    }

    /// The box jitter bound at input size `s`.
    pub fn jitter_px(&self, s: usize) -> f32 {
        self.jitter_1024 * s as f32 / 1024.0
    }

    /// The component pixel floor at input size `s`.
    pub fn min_area_px(&self, s: usize) -> usize {
        if self.min_area > 0 {
            self.min_area
        } else {
            (s.saturating_mul(s) / 4096).max(1)
        }
    }

    /// The negative band width at input size `s`.
    pub fn band_px(&self, s: usize) -> usize {
        if self.band > 0 {
            self.band
        } else {
            (s / 32).max(1)
        }
    }
}

/// The prompt set of one object, in input-frame pixels (`S × S`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectPrompt {
    /// `[x0, y0, x1, y1]` (pixel indices; SAM adds 0.5 to reach pixel centres).
    #[serde(default, rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<[f32; 4]>,
    /// `(x, y)` per point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<[f32; 2]>,
    /// 1 positive, 0 negative, −1 padding; one per point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<f32>,
    /// Row-major indices of the object's pixels in the `S × S` mask (the training target);
    /// empty for prompts read from a file.
    #[serde(skip)]
    pub pixels: Vec<u32>,
}

/// One connected component of a mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Row-major pixel indices.
    pub pixels: Vec<u32>,
    /// `[x0, y0, x1, y1]` inclusive.
    pub bbox: [usize; 4],
}

/// The 8-connected components of an `s × s` mask (`mask[i] != 0` is foreground), in raster
/// order of their first pixel.
pub fn components(mask: &[u8], s: usize) -> Result<Vec<Component>> {
    let n = s
        .checked_mul(s)
        .filter(|&n| n == mask.len() && n <= u32::MAX as usize)
        .ok_or_else(|| {
            Error::msg(format!(
                "prompt sampling: mask of {} values is not {s}×{s}",
                mask.len()
            ))
        })?;
    let mut seen = vec![false; n];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..n {
        if mask[start] == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut pixels = Vec::new();
        let mut bb = [usize::MAX, usize::MAX, 0, 0];
        while let Some(p) = stack.pop() {
            let (y, x) = (p / s, p % s);
            pixels.push(p as u32);
            bb = [bb[0].min(x), bb[1].min(y), bb[2].max(x), bb[3].max(y)];
            for dy in [-1isize, 0, 1] {
                for dx in [-1isize, 0, 1] {
                    let (ny, nx) = (y as isize + dy, x as isize + dx);
                    if ny < 0 || nx < 0 || ny >= s as isize || nx >= s as isize {
                        continue;
                    }
                    let q = ny as usize * s + nx as usize;
                    if mask[q] != 0 && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        pixels.sort_unstable();
        out.push(Component { pixels, bbox: bb });
    }
    Ok(out)
}

/// The generator of an image's fixed evaluation prompts: (seed, image id) alone.
pub fn fixed_rng(seed: u64, id: &str) -> Rng {
    Rng::derive(seed, &format!("prompts/{id}"))
}

/// Sample one prompt set per object of `mask` (`s × s`, nonzero = foreground) with `rng`.
/// An empty mask gives no prompt sets; `spec.kind == None` gives none either.
pub fn sample(
    mask: &[u8],
    s: usize,
    spec: &PromptSpec,
    rng: &mut Rng,
) -> Result<Vec<ObjectPrompt>> {
    if !spec.is_prompted() {
        return Ok(Vec::new());
    }
    let mut comps = components(mask, s)?;
    let floor = spec.min_area_px(s);
    if comps.iter().all(|c| c.pixels.len() < floor) {
        // Keep the largest (first on ties) when every component is under the floor.
        let best = comps
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.pixels.len().cmp(&b.1.pixels.len()).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i);
        comps = best.map(|i| vec![comps.swap_remove(i)]).unwrap_or_default();
    } else {
        comps.retain(|c| c.pixels.len() >= floor);
    }
    if comps.len() > MAX_OBJECTS {
        // The largest objects, kept in raster order.
        let mut order: Vec<usize> = (0..comps.len()).collect();
        order.sort_by(|&a, &b| {
            comps[b]
                .pixels
                .len()
                .cmp(&comps[a].pixels.len())
                .then(a.cmp(&b))
        });
        let mut keep = order[..MAX_OBJECTS].to_vec();
        keep.sort_unstable();
        comps = keep.into_iter().map(|i| comps[i].clone()).collect();
    }
    let band = spec.band_px(s);
    let jit = spec.jitter_px(s);
    let last = (s.max(1) - 1) as f32;
    let mut out = Vec::with_capacity(comps.len());
    for c in comps {
        let bbox = if spec.kind.has_box() {
            let [x0, y0, x1, y1] = c.bbox.map(|v| v as f32);
            Some([
                (x0 - rng.uniform(0.0, jit)).max(0.0),
                (y0 - rng.uniform(0.0, jit)).max(0.0),
                (x1 + rng.uniform(0.0, jit)).min(last),
                (y1 + rng.uniform(0.0, jit)).min(last),
            ])
        } else {
            None
        };
        let (mut points, mut labels) = (Vec::new(), Vec::new());
        if spec.kind.has_points() {
            let xy = |p: u32| [(p as usize % s) as f32, (p as usize / s) as f32];
            for _ in 0..spec.points {
                points.push(xy(c.pixels[rng.below(c.pixels.len())]));
                labels.push(1.0);
            }
            if spec.neg_points > 0 {
                let ring = negative_band(mask, s, &c, band);
                for _ in 0..spec.neg_points {
                    if ring.is_empty() {
                        points.push([0.0, 0.0]);
                        labels.push(-1.0);
                    } else {
                        points.push(xy(ring[rng.below(ring.len())]));
                        labels.push(0.0);
                    }
                }
            }
        }
        out.push(ObjectPrompt {
            bbox,
            points,
            labels,
            pixels: c.pixels,
        });
    }
    Ok(out)
}

/// Pixels within Chebyshev distance `band` of component `c` that are in no object of `mask`,
/// row-major (separable max filter over the component's bbox grown by `band`).
fn negative_band(mask: &[u8], s: usize, c: &Component, band: usize) -> Vec<u32> {
    let [x0, y0, x1, y1] = c.bbox;
    let (gx0, gy0) = (x0.saturating_sub(band), y0.saturating_sub(band));
    let (gx1, gy1) = (
        x1.saturating_add(band).min(s - 1),
        y1.saturating_add(band).min(s - 1),
    );
    let (w, h) = (gx1 - gx0 + 1, gy1 - gy0 + 1);
    let mut obj = vec![false; w * h];
    for &p in &c.pixels {
        let (y, x) = (p as usize / s, p as usize % s);
        obj[(y - gy0) * w + (x - gx0)] = true;
    }
    // Dilate along rows, then along columns.
    let mut rows = vec![false; w * h];
    for y in 0..h {
        let mut last: Option<usize> = None; // last object column seen so far
        for x in 0..w {
            if obj[y * w + x] {
                last = Some(x);
            }
            if last.is_some_and(|l| x - l <= band) {
                rows[y * w + x] = true;
            }
        }
        let mut next: Option<usize> = None;
        for x in (0..w).rev() {
            if obj[y * w + x] {
                next = Some(x);
            }
            if next.is_some_and(|n| n - x <= band) {
                rows[y * w + x] = true;
            }
        }
    }
    let mut dil = vec![false; w * h];
    for x in 0..w {
        let mut last: Option<usize> = None;
        for y in 0..h {
            if rows[y * w + x] {
                last = Some(y);
            }
            if last.is_some_and(|l| y - l <= band) {
                dil[y * w + x] = true;
            }
        }
        let mut next: Option<usize> = None;
        for y in (0..h).rev() {
            if rows[y * w + x] {
                next = Some(y);
            }
            if next.is_some_and(|n| n - y <= band) {
                dil[y * w + x] = true;
            }
        }
    }
    let mut out = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let p = (gy0 + y) * s + gx0 + x;
            if dil[y * w + x] && mask[p] == 0 {
                out.push(p as u32);
            }
        }
    }
    out
}

/// Prompts per image id read from a file, in each image's *original* pixel coordinates.
pub type PromptFile = BTreeMap<String, Vec<ObjectPrompt>>;

/// Largest prompt file read (bytes).
pub const MAX_PROMPT_FILE: u64 = 64 << 20;

/// Read prompts per image from JSON (`{"<id>": [{"box": [x0,y0,x1,y1], "points": [[x,y],…],
/// "labels": [1,0,…]}, …]}`) or CSV (`id,kind,x0,y0,x1,y1` rows, `kind` = `box` with four
/// coordinates, or `pos` / `neg` with `x,y`; one object per `box` row, points attach to the
/// object of the image's latest box, or start one object when the image has none; fields may
/// be double-quoted, a header row starting `id` is skipped). A UTF-8 byte-order mark is
/// skipped; an image id given twice in JSON is refused. Every problem names the file and the
/// entry.
pub fn read_prompt_file(path: &Path) -> Result<PromptFile> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_PROMPT_FILE {
        return Err(Error::Data {
            msg: format!(
                "{}: prompt file is {} bytes, more than the {MAX_PROMPT_FILE} accepted",
                path.display(),
                meta.len()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // Spreadsheet programs start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let bad = |msg: String| Error::Data {
        msg: format!("{}: {msg}", path.display()),
    };
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let file: PromptFile = if is_csv {
        parse_csv(text).map_err(bad)?
    } else {
        serde_json::from_str::<UniqueIds>(text)
            .map_err(|e| bad(format!("not a prompt JSON: {e}")))?
            .0
    };
    for (id, objs) in &file {
        if objs.len() > MAX_OBJECTS {
            return Err(bad(format!(
                "image `{id}`: {} objects, at most {MAX_OBJECTS}",
                objs.len()
            )));
        }
        for (k, o) in objs.iter().enumerate() {
            let at = format!("image `{id}`, object {k}");
            if o.points.len() != o.labels.len() {
                return Err(bad(format!(
                    "{at}: {} points but {} labels",
                    o.points.len(),
                    o.labels.len()
                )));
            }
            if o.points.len() > MAX_POINTS {
                return Err(bad(format!("{at}: more than {MAX_POINTS} points")));
            }
            if o.bbox.is_none() && o.points.is_empty() {
                return Err(bad(format!("{at}: neither a box nor points")));
            }
            if let Some(l) = o.labels.iter().find(|&&l| l != 0.0 && l != 1.0) {
                return Err(bad(format!("{at}: label {l} (1 positive, 0 negative)")));
            }
            let coords = o.bbox.iter().flatten().chain(o.points.iter().flatten());
            if let Some(v) = coords.into_iter().find(|v| !v.is_finite() || **v < 0.0) {
                return Err(bad(format!(
                    "{at}: coordinate {v} is not a finite value ≥ 0"
                )));
            }
            if let Some(b) = o.bbox {
                if b[2] < b[0] || b[3] < b[1] {
                    return Err(bad(format!("{at}: box {b:?} has x1 < x0 or y1 < y0")));
                }
            }
        }
    }
    Ok(file)
}

/// A prompt JSON's top level, refusing an image id given twice (serde_json keeps the last
/// value of a repeated key without a word).
struct UniqueIds(PromptFile);

impl<'de> Deserialize<'de> for UniqueIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Ids;
        impl<'de> serde::de::Visitor<'de> for Ids {
            type Value = UniqueIds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping image ids to lists of prompt sets")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<UniqueIds, A::Error> {
                let mut out = PromptFile::new();
                while let Some(id) = m.next_key::<String>()? {
                    if out.contains_key(&id) {
                        return Err(serde::de::Error::custom(format!(
                            "image `{id}` is given twice"
                        )));
                    }
                    let objs: Vec<ObjectPrompt> = m.next_value()?;
                    out.insert(id, objs);
                }
                Ok(UniqueIds(out))
            }
        }
        d.deserialize_map(Ids)
    }
}

/// The fields of one CSV line: separated by commas, each trimmed; a field in double quotes
/// may hold commas and `""` for a quote (RFC 4180).
fn csv_fields(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field is not closed".into()),
                }
            }
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(',') => out.push(field),
                Some(c) => return Err(format!("`{c}` after a quoted field")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field.trim().to_string());
                        return Ok(out);
                    }
                    Some(',') => break,
                    Some(c) => field.push(c),
                }
            }
            out.push(field.trim().to_string());
        }
    }
}

fn parse_csv(text: &str) -> std::result::Result<PromptFile, String> {
    let mut file = PromptFile::new();
    let mut first = true;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let n = i + 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f = csv_fields(line).map_err(|e| format!("line {n}: {e}"))?;
        let header = first && f.first().is_some_and(|h| h.eq_ignore_ascii_case("id"));
        first = false;
        if header {
            continue;
        }
        let num = |k: usize| -> std::result::Result<f32, String> {
            let s = f
                .get(k)
                .ok_or(format!("line {n}: missing column {}", k + 1))?;
            s.parse::<f32>()
                .map_err(|_| format!("line {n}: `{s}` is not a number"))
        };
        let (id, kind) = match (f.first(), f.get(1)) {
            (Some(id), Some(kind)) if !id.is_empty() => (id.clone(), kind.as_str()),
            _ => return Err(format!("line {n}: expected `id,kind,…`")),
        };
        let objs = file.entry(id).or_default();
        match kind {
            "box" => {
                if f.len() != 6 {
                    return Err(format!(
                        "line {n}: a box row has 6 columns (id,box,x0,y0,x1,y1)"
                    ));
                }
                objs.push(ObjectPrompt {
                    bbox: Some([num(2)?, num(3)?, num(4)?, num(5)?]),
                    points: Vec::new(),
                    labels: Vec::new(),
                    pixels: Vec::new(),
                });
            }
            "pos" | "neg" => {
                if f.len() != 4 {
                    return Err(format!(
                        "line {n}: a point row has 4 columns (id,pos|neg,x,y)"
                    ));
                }
                if objs.is_empty() {
                    objs.push(ObjectPrompt {
                        bbox: None,
                        points: Vec::new(),
                        labels: Vec::new(),
                        pixels: Vec::new(),
                    });
                }
                let o = objs.last_mut().ok_or(format!("line {n}: no object"))?;
                o.points.push([num(2)?, num(3)?]);
                o.labels.push(if kind == "pos" { 1.0 } else { 0.0 });
            }
            k => return Err(format!("line {n}: kind `{k}` is not box, pos or neg")),
        }
    }
    Ok(file)
}

/// Check a prompt file against the images of a job before anything runs: every id must name
/// one of the job's images (`sizes`: id → `(h, w)` from the image headers) or one of its
/// unusable inputs (`unusable`, skipped with `--skip-bad`), and every box corner and point must
/// lie inside its image, `0 ≤ x ≤ w` and `0 ≤ y ≤ h` in original pixels — the rule
/// `gps-seg serve` answers 400 for. Nothing is clamped. The error names the ids (at most 10)
/// or the image, object and coordinates.
pub fn check_against_images(
    file: &PromptFile,
    sizes: &std::collections::HashMap<&str, (usize, usize)>,
    unusable: &std::collections::HashSet<String>,
) -> Result<()> {
    let unknown: Vec<&str> = file
        .keys()
        .map(String::as_str)
        .filter(|id| !sizes.contains_key(id) && !unusable.contains(*id))
        .collect();
    if !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .take(10)
            .map(|id| format!("`{id}`"))
            .collect();
        return Err(Error::Data {
            msg: format!(
                "prompts: {} id(s) match no input image: {}{}",
                unknown.len(),
                list.join(", "),
                if unknown.len() > 10 { ", …" } else { "" }
            ),
        });
    }
    for (id, objs) in file {
        let Some(&(h, w)) = sizes.get(id.as_str()) else {
            continue;
        };
        let inside = |x: f32, y: f32| x >= 0.0 && y >= 0.0 && x <= w as f32 && y <= h as f32;
        for (k, o) in objs.iter().enumerate() {
            let outside = |what: String| Error::Data {
                msg: format!(
                    "prompts: image `{id}`, object {k}: {what} is outside the {w}×{h} image"
                ),
            };
            if let Some([x0, y0, x1, y1]) = o.bbox {
                if !inside(x0, y0) || !inside(x1, y1) {
                    return Err(outside(format!("box ({x0}, {y0}, {x1}, {y1})")));
                }
            }
            if let Some([x, y]) = o.points.iter().copied().find(|&[x, y]| !inside(x, y)) {
                return Err(outside(format!("point ({x}, {y})")));
            }
        }
    }
    Ok(())
}

/// Map prompts from original pixel coordinates to the `S × S` input frame (`scale` =
/// `(sy, sx)` of [`crate::data::Resize::scale`]) as `gps-seg serve` does: multiplied, not
/// clamped ([`check_against_images`] refuses a prompt outside its image first).
pub fn to_input_frame(objs: &[ObjectPrompt], scale: (f32, f32)) -> Vec<ObjectPrompt> {
    let (sy, sx) = scale;
    let fx = |x: f32| x * sx;
    let fy = |y: f32| y * sy;
    objs.iter()
        .map(|o| ObjectPrompt {
            bbox: o.bbox.map(|b| [fx(b[0]), fy(b[1]), fx(b[2]), fy(b[3])]),
            points: o.points.iter().map(|p| [fx(p[0]), fy(p[1])]).collect(),
            labels: o.labels.clone(),
            pixels: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32×32 mask with a 6×5 rectangle, a diagonal 3-pixel blob (one component under
    /// 8-connectivity) and a single stray pixel.
    fn mask() -> (Vec<u8>, usize) {
        let s = 32;
        let mut m = vec![0u8; s * s];
        for y in 4..9 {
            for x in 3..9 {
                m[y * s + x] = 1;
            }
        }
        for k in 0..3 {
            m[(20 + k) * s + 20 + k] = 1;
        }
        m[30 * s + 2] = 1;
        (m, s)
    }

    #[test]
    fn components_are_eight_connected() {
        let (m, s) = mask();
        let c = components(&m, s).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].pixels.len(), 30);
        assert_eq!(c[0].bbox, [3, 4, 8, 8]);
        assert_eq!(c[1].pixels.len(), 3, "the diagonal is one component");
        assert_eq!(c[1].bbox, [20, 20, 22, 22]);
        assert!(components(&m[1..], s).is_err());
    }

    #[test]
    fn floor_skips_tiny_components_but_keeps_the_largest_of_tiny_ones() {
        let (m, s) = mask();
        let mut spec = PromptSpec::of(PromptKind::Box);
        spec.min_area = 3;
        let p = sample(&m, s, &spec, &mut Rng::new(1)).unwrap();
        assert_eq!(p.len(), 2, "the stray pixel is skipped");
        spec.min_area = 100;
        let p = sample(&m, s, &spec, &mut Rng::new(1)).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].pixels.len(), 30);
        assert!(sample(&vec![0; s * s], s, &spec, &mut Rng::new(1))
            .unwrap()
            .is_empty());
    }
}
