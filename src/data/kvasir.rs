//! Kvasir-SEG (Jha et al., MMM 2020): `images/*.jpg` and `masks/*.jpg` paired by file stem,
//! masks thresholded at 128 (they are JPEG, so values are only near 0/255), optional
//! `kavsir_bboxes.json` (`{id: {height, width, bbox: [{label, xmin, ymin, xmax, ymax}]}}`),
//! and a train/test split: Medico-2020 style `train.txt` + `val.txt`/`test.txt` id lists in the
//! root when present, otherwise a seeded split ([`Split::seeded`], 880/120 proportion) that is
//! written beside the run so evaluation never sees training images.

use super::imgio::{self, Problems};
use super::prompts::ObjectPrompt;
use super::resize::{self, Resize};
use crate::error::{Error, Result};
use crate::util::Rng;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Test fraction of the Medico 2020 split (120 of 1000).
pub const KVASIR_TEST_FRACTION: f64 = 0.12;

/// Name of the optional bounding-box file in a Kvasir-SEG root (spelling as distributed).
pub const BBOX_FILE: &str = "kavsir_bboxes.json";

/// One labelled box in original pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    #[serde(default)]
    pub label: String,
    pub xmin: f32,
    pub ymin: f32,
    pub xmax: f32,
    pub ymax: f32,
}

/// One entry of `kavsir_bboxes.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BBoxEntry {
    pub height: usize,
    pub width: usize,
    pub bbox: Vec<BBox>,
}

/// One image/mask pair on disk.
#[derive(Debug, Clone)]
pub struct KvasirEntry {
    pub id: String,
    pub image_path: PathBuf,
    pub mask_path: PathBuf,
    /// `(h, w)` from the image header.
    pub size: (usize, usize),
    /// Boxes from `kavsir_bboxes.json` (original pixel coordinates); empty when absent.
    pub boxes: Vec<BBox>,
}

/// One sample resized to the model input `S × S`.
#[derive(Debug, Clone)]
pub struct SegSample {
    pub id: String,
    /// `[3, S, S]` RGB in [0, 1], CHW.
    pub image: Vec<f32>,
    /// `[S, S]` in {0, 1}.
    pub mask: Vec<f32>,
    /// Original `(h, w)`.
    pub orig_size: (usize, usize),
    /// `[h·w]` in {0, 1}, original resolution, for scoring.
    pub orig_mask: Vec<u8>,
    /// Boxes `[x0, y0, x1, y1]` in input-frame (`S × S`) pixel coordinates.
    pub boxes: Vec<[f32; 4]>,
    /// Prompt sets sampled from `mask` (one per object; empty unless the source samples
    /// prompts, see [`crate::data::prompts`]).
    pub prompts: Vec<ObjectPrompt>,
}

/// A batch of [`SegSample`]s as tensors.
#[derive(Debug, Clone)]
pub struct SegBatch {
    pub ids: Vec<String>,
    /// `[B, 3, S, S]` f32 RGB in [0, 1].
    pub images: Tensor,
    /// `[B, 1, S, S]` f32 {0, 1}.
    pub masks: Tensor,
    pub orig_sizes: Vec<(usize, usize)>,
    pub orig_masks: Vec<Vec<u8>>,
    /// Per image, its prompt sets (empty without prompt sampling).
    pub prompts: Vec<Vec<ObjectPrompt>>,
}

impl SegBatch {
    /// Stack samples (all of one size S) into tensors on `device`.
    pub fn collate(samples: &[SegSample], device: &Device) -> Result<SegBatch> {
        let b = samples.len();
        let first = samples.first().ok_or_else(|| Error::Data {
            msg: "cannot build a batch from zero samples".into(),
        })?;
        let ss = first.mask.len();
        let s = (ss as f64).sqrt().round() as usize;
        let mut images = Vec::with_capacity(b * 3 * ss);
        let mut masks = Vec::with_capacity(b * ss);
        for smp in samples {
            if smp.image.len() != 3 * s * s || smp.mask.len() != s * s {
                return Err(Error::Data {
                    msg: format!(
                        "sample `{}` has image {} / mask {} values, batch expects S = {s}",
                        smp.id,
                        smp.image.len(),
                        smp.mask.len()
                    ),
                });
            }
            images.extend_from_slice(&smp.image);
            masks.extend_from_slice(&smp.mask);
        }
        Ok(SegBatch {
            ids: samples.iter().map(|x| x.id.clone()).collect(),
            images: Tensor::from_vec(images, (b, 3, s, s), device)?,
            masks: Tensor::from_vec(masks, (b, 1, s, s), device)?,
            orig_sizes: samples.iter().map(|x| x.orig_size).collect(),
            orig_masks: samples.iter().map(|x| x.orig_mask.clone()).collect(),
            prompts: samples.iter().map(|x| x.prompts.clone()).collect(),
        })
    }
}

/// Options for [`KvasirDataset::open_with`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Fully decode every image and mask while opening (slow; finds corrupt bodies that a
    /// header check misses). Without it, only headers are read and a corrupt body is reported
    /// by name when the sample is loaded.
    pub verify_decode: bool,
    /// Leave out the pairs with a problem (unpaired files, unreadable or mis-sized images,
    /// files that cannot be keyed) instead of refusing the folder; each is listed in
    /// [`KvasirDataset::skipped`]. Folder-level problems (no `images/`, an unreadable split or
    /// box file) still refuse it.
    pub skip_bad: bool,
}

/// A Kvasir-SEG folder.
#[derive(Debug, Clone)]
pub struct KvasirDataset {
    pub root: PathBuf,
    /// Entries sorted by id.
    pub entries: Vec<KvasirEntry>,
    /// The split found in the root (`train.txt` + `val.txt`/`test.txt`), if any (without the
    /// skipped ids when opened with `skip_bad`).
    pub root_split: Option<Split>,
    /// With [`OpenOptions::skip_bad`]: one line per problem whose pair was left out (naming
    /// the file), and the ids left out.
    pub skipped: Vec<String>,
    pub skipped_ids: BTreeSet<String>,
}

/// Files of `dir` with one of `exts` by stem; problems for duplicates, bad names and an
/// unreadable dir.
fn list_by_stem(dir: &Path, exts: &[&str], problems: &mut Problems) -> BTreeMap<String, PathBuf> {
    match imgio::files_by_stem(dir, exts) {
        Ok((found, rejected)) => {
            for (p, why) in rejected {
                problems.push(format!("{}: {why}", p.display()));
            }
            found
        }
        Err(e) => {
            problems.push(format!("{}: cannot read folder: {e}", dir.display()));
            BTreeMap::new()
        }
    }
}

/// An image folder and a mask folder whose files pair by stem, and what the files are called.
#[derive(Debug, Clone)]
pub(crate) struct PairDirs<'a> {
    pub images: PathBuf,
    pub masks: PathBuf,
    /// Extensions listed (others are ignored).
    pub exts: &'a [&'a str],
    /// Extension named in the "expected <dir>/<id>.<ext>" hint of an unpaired file.
    pub hint_ext: &'a str,
}

/// What [`open_pairs`] found.
#[derive(Debug, Default)]
pub(crate) struct OpenedPairs {
    /// Pairs sorted by id, sizes from the headers (boxes empty).
    pub entries: Vec<KvasirEntry>,
    /// With [`OpenOptions::skip_bad`]: one line per pair left out.
    pub skipped: Vec<String>,
    pub skipped_ids: BTreeSet<String>,
}

/// Pair `dirs.images` and `dirs.masks` by stem and check each pair's sizes (headers, or full
/// decoding with [`OpenOptions::verify_decode`]), Kvasir-SEG's rules: an empty folder, an
/// unpaired file, a file that cannot be keyed or read, or a mask whose size differs from its
/// image is a problem naming the file. Bad pairs are pushed to `problems` (fatal), or left out
/// and listed with [`OpenOptions::skip_bad`] (then only "nothing left" is fatal).
pub(crate) fn open_pairs(
    dirs: &PairDirs,
    opts: &OpenOptions,
    problems: &mut Problems,
) -> OpenedPairs {
    let (img_dir, mask_dir) = (&dirs.images, &dirs.masks);
    // Problems of single pairs: fatal, or (skip_bad) the pair is left out and listed.
    let mut pair_problems = Problems::new();
    let mut skipped_ids = BTreeSet::new();
    let images = list_by_stem(img_dir, dirs.exts, &mut pair_problems);
    let masks = list_by_stem(mask_dir, dirs.exts, &mut pair_problems);
    let kinds = format!(".{}", dirs.exts.join("/."));
    if images.is_empty() {
        problems.push(format!("{}: no images ({kinds}) found", img_dir.display()));
    }
    if masks.is_empty() {
        problems.push(format!("{}: no masks ({kinds}) found", mask_dir.display()));
    }
    let ext = dirs.hint_ext;
    for (id, p) in &images {
        if !masks.contains_key(id) {
            skipped_ids.insert(id.clone());
            pair_problems.push(format!(
                "{}: image has no mask (expected {}/{id}.{ext})",
                p.display(),
                mask_dir.display()
            ));
        }
    }
    for (id, p) in &masks {
        if !images.contains_key(id) {
            skipped_ids.insert(id.clone());
            pair_problems.push(format!(
                "{}: mask has no image (expected {}/{id}.{ext})",
                p.display(),
                img_dir.display()
            ));
        }
    }
    let pairs: Vec<(String, PathBuf, PathBuf)> = images
        .iter()
        .filter_map(|(id, ip)| masks.get(id).map(|mp| (id.clone(), ip.clone(), mp.clone())))
        .collect();
    let checked: Vec<std::result::Result<(usize, usize), Vec<String>>> = pairs
        .par_iter()
        .map(|(_, ip, mp)| check_pair(ip, mp, opts.verify_decode))
        .collect();
    let mut entries = Vec::with_capacity(pairs.len());
    for ((id, ip, mp), c) in pairs.into_iter().zip(checked) {
        match c {
            Ok(size) => entries.push(KvasirEntry {
                id,
                image_path: ip,
                mask_path: mp,
                size,
                boxes: Vec::new(),
            }),
            Err(lines) => {
                skipped_ids.insert(id);
                lines.into_iter().for_each(|l| pair_problems.push(l));
            }
        }
    }
    let skipped = if opts.skip_bad {
        let lines = pair_problems.lines().to_vec();
        if entries.is_empty() && !lines.is_empty() {
            problems.push(format!(
                "{} + {}: every pair has a problem ({} line(s)); nothing left to use",
                img_dir.display(),
                mask_dir.display(),
                lines.len()
            ));
        }
        lines
    } else {
        pair_problems
            .lines()
            .iter()
            .for_each(|l| problems.push(l.clone()));
        Vec::new()
    };
    OpenedPairs {
        entries,
        skipped,
        skipped_ids,
    }
}

impl KvasirDataset {
    /// Open a Kvasir-SEG root with header checks only. See [`KvasirDataset::open_with`].
    pub fn open(root: &Path) -> Result<KvasirDataset> {
        Self::open_with(root, &OpenOptions::default())
    }

    /// Open a Kvasir-SEG root: pair `images/` and `masks/` by stem, check every pair's sizes
    /// (headers), read `kavsir_bboxes.json` and a root split if present. All problems are
    /// collected into one [`Error::Data`].
    pub fn open_with(root: &Path, opts: &OpenOptions) -> Result<KvasirDataset> {
        let mut problems = Problems::new();
        let img_dir = root.join("images");
        let mask_dir = root.join("masks");
        for d in [&img_dir, &mask_dir] {
            if !d.is_dir() {
                problems.push(format!("{}: folder not found", d.display()));
            }
        }
        problems.into_result(&format!("Kvasir-SEG at {}", root.display()))?;
        let mut problems = Problems::new();
        let dirs = PairDirs {
            images: img_dir,
            masks: mask_dir,
            exts: &imgio::IMAGE_EXTENSIONS,
            hint_ext: "jpg",
        };
        let OpenedPairs {
            mut entries,
            skipped,
            mut skipped_ids,
        } = open_pairs(&dirs, opts, &mut problems);
        let bbox_path = root.join(BBOX_FILE);
        let bboxes: HashMap<String, BBoxEntry> = if bbox_path.is_file() {
            match crate::util::fs::read_json(&bbox_path) {
                Ok(m) => m,
                Err(e) => {
                    problems.push_err(&e);
                    HashMap::new()
                }
            }
        } else {
            HashMap::new()
        };
        for e in &mut entries {
            e.boxes = bboxes
                .get(&e.id)
                .map(|b| b.bbox.clone())
                .unwrap_or_default();
        }
        let mut root_split = match Split::from_root(root) {
            Ok(s) => s,
            Err(e) => {
                problems.push_err(&e);
                None
            }
        };
        if opts.skip_bad {
            if let Some(sp) = root_split.as_mut() {
                sp.train.retain(|id| !skipped_ids.contains(id));
                sp.val.retain(|id| !skipped_ids.contains(id));
                sp.test.retain(|id| !skipped_ids.contains(id));
            }
        }
        if let Some(split) = &root_split {
            let known: BTreeSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            split.check_against(&known, &split.source, &mut problems);
        }
        problems.into_result(&format!("Kvasir-SEG at {}", root.display()))?;
        if !opts.skip_bad {
            skipped_ids.clear();
        }
        Ok(KvasirDataset {
            root: root.to_path_buf(),
            entries,
            root_split,
            skipped,
            skipped_ids,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.id.clone()).collect()
    }

    /// The split to use: the root's lists when present, otherwise [`Split::seeded`].
    pub fn split(&self, seed: u64, test_fraction: f64) -> Split {
        match &self.root_split {
            Some(s) => s.clone(),
            None => Split::seeded(&self.ids(), seed, test_fraction),
        }
    }

    /// The split of a training run in `run_dir`: `run_dir/split.json` when it exists (every id
    /// must exist in this dataset), otherwise [`KvasirDataset::split`] written to
    /// `run_dir/split.json` so that evaluation and resumed runs use the same lists.
    pub fn split_for_run(&self, run_dir: &Path, seed: u64, test_fraction: f64) -> Result<Split> {
        let path = run_dir.join("split.json");
        if path.is_file() {
            let split = Split::read_json(&path)?;
            let known: BTreeSet<&str> = self.entries.iter().map(|e| e.id.as_str()).collect();
            let mut problems = Problems::new();
            split.check_against(&known, &path.display().to_string(), &mut problems);
            problems.into_result(&format!("split for {}", self.root.display()))?;
            return Ok(split);
        }
        let split = self.split(seed, test_fraction);
        split.write_json(&path)?;
        Ok(split)
    }

    /// The train/val/test split of a training run in `run_dir`. A `run_dir/split.json` is read
    /// back (every id must exist, the lists must be disjoint, and it must have been made with
    /// the same `spec`: a stale one is an error naming the differing field). Otherwise the
    /// data's split files or a seeded split, with validation carved from train when the data
    /// has none, is written to `run_dir/split.json`.
    pub fn split3_for_run(&self, run_dir: &Path, spec: SplitSpec) -> Result<Split> {
        spec.validate()?;
        let path = run_dir.join("split.json");
        if path.is_file() {
            let split = Split::read_json(&path)?;
            let stale = |field: &str, was: String, now: String| Error::Config {
                field: field.into(),
                msg: format!(
                    "{} was made with {field} {was}, this run asks for {now}; use a new --out \
                     (or delete that split.json to make a new split)",
                    path.display()
                ),
            };
            match split.spec {
                None => {
                    return Err(stale(
                        "val_fraction",
                        "no validation split".into(),
                        spec.val_fraction.to_string(),
                    ))
                }
                Some(old) => {
                    if old.seed != spec.seed {
                        return Err(stale("seed", old.seed.to_string(), spec.seed.to_string()));
                    }
                    if old.test_fraction != spec.test_fraction {
                        return Err(stale(
                            "test_fraction",
                            old.test_fraction.to_string(),
                            spec.test_fraction.to_string(),
                        ));
                    }
                    if old.val_fraction != spec.val_fraction {
                        return Err(stale(
                            "val_fraction",
                            old.val_fraction.to_string(),
                            spec.val_fraction.to_string(),
                        ));
                    }
                }
            }
            let known: BTreeSet<&str> = self.entries.iter().map(|e| e.id.as_str()).collect();
            let mut problems = Problems::new();
            split.check_against(&known, &path.display().to_string(), &mut problems);
            if split.val.is_empty() || split.test.is_empty() || split.train.is_empty() {
                problems.push(format!(
                    "{}: train, val and test must each hold at least one id",
                    path.display()
                ));
            }
            problems.into_result(&format!("split for {}", self.root.display()))?;
            return Ok(split);
        }
        let mut split = self
            .split(spec.seed, spec.test_fraction)
            .with_val_carved(spec.seed, spec.val_fraction);
        if split.val.is_empty() || split.test.is_empty() || split.train.is_empty() {
            return Err(Error::Data {
                msg: format!(
                    "{}: {} train / {} val / {} test ids; each split needs at least one image",
                    self.root.display(),
                    split.train.len(),
                    split.val.len(),
                    split.test.len()
                ),
            });
        }
        split.spec = Some(spec);
        split.write_json(&path)?;
        Ok(split)
    }

    /// Entry indices of `ids`; every unknown id is reported (naming `source`).
    pub fn indices_of(&self, ids: &[String], source: &str) -> Result<Vec<usize>> {
        let pos: HashMap<&str, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect();
        let mut problems = Problems::new();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match pos.get(id.as_str()) {
                Some(&i) => out.push(i),
                None => problems.push(format!(
                    "{source}: id `{id}` has no image/mask pair in {}",
                    self.root.display()
                )),
            }
        }
        problems.into_result("split")?;
        Ok(out)
    }

    /// Decode entry `index`, threshold its mask at 128 and resize both to `S × S`.
    pub fn load(&self, index: usize, s: usize, resize: Resize) -> Result<SegSample> {
        self.load_packed(index, s, resize).map(|p| p.unpack())
    }

    /// As [`KvasirDataset::load`], in the compact u8 form.
    pub fn load_packed(&self, index: usize, s: usize, resize: Resize) -> Result<PackedSegSample> {
        let e = self.entries.get(index).ok_or_else(|| Error::Data {
            msg: format!("sample index {index} out of range ({} samples)", self.len()),
        })?;
        load_entry_packed(e, s, resize)
    }
}

fn check_pair(
    ip: &Path,
    mp: &Path,
    full: bool,
) -> std::result::Result<(usize, usize), Vec<String>> {
    let mut lines = Vec::new();
    let read = |p: &Path, lines: &mut Vec<String>| -> Option<(usize, usize)> {
        let r = if full {
            imgio::decode_rgb(p).map(|i| (i.height() as usize, i.width() as usize))
        } else {
            imgio::dimensions(p)
        };
        match r {
            Ok(d) => Some(d),
            Err(e) => {
                lines.push(e.to_string());
                None
            }
        }
    };
    let isz = read(ip, &mut lines);
    let msz = read(mp, &mut lines);
    if let (Some(a), Some(b)) = (isz, msz) {
        if a != b {
            lines.push(format!(
                "{}: mask is {}×{} (w×h) but its image {} is {}×{}",
                mp.display(),
                b.1,
                b.0,
                ip.display(),
                a.1,
                a.0
            ));
        } else {
            return Ok(a);
        }
    }
    Err(lines)
}

/// A resized sample stored compactly (u8), as the loader's cache holds it: about
/// `4·S² + h·w` bytes (≈ 4.5 MB at S = 1024 for a 720×576 image) instead of 16·S².
#[derive(Debug, Clone)]
pub struct PackedSegSample {
    pub id: String,
    /// `[3, S, S]` RGB bytes, CHW.
    pub image: Vec<u8>,
    /// `[S, S]` in {0, 1}.
    pub mask: Vec<u8>,
    pub orig_size: (usize, usize),
    pub orig_mask: Vec<u8>,
    pub boxes: Vec<[f32; 4]>,
}

impl PackedSegSample {
    /// Expand to the f32 [`SegSample`] (image / 255).
    pub fn unpack(&self) -> SegSample {
        SegSample {
            id: self.id.clone(),
            image: self.image.iter().map(|&v| v as f32 / 255.0).collect(),
            mask: self.mask.iter().map(|&v| f32::from(v)).collect(),
            orig_size: self.orig_size,
            orig_mask: self.orig_mask.clone(),
            boxes: self.boxes.clone(),
            prompts: Vec::new(),
        }
    }
}

/// Decode and resize one entry (see [`KvasirDataset::load`]).
pub fn load_entry(e: &KvasirEntry, s: usize, resize: Resize) -> Result<SegSample> {
    load_entry_packed(e, s, resize).map(|p| p.unpack())
}

/// Decode and resize one entry into the compact form.
pub fn load_entry_packed(e: &KvasirEntry, s: usize, resize: Resize) -> Result<PackedSegSample> {
    if s == 0 {
        return Err(Error::Config {
            field: "size".into(),
            msg: "input size must be at least 1".into(),
        });
    }
    let img = imgio::decode_rgb(&e.image_path)?;
    let m = imgio::decode_luma(&e.mask_path)?;
    let (h, w) = (img.height() as usize, img.width() as usize);
    if h == 0 || w == 0 {
        return Err(Error::Data {
            msg: format!("{}: image has zero size", e.image_path.display()),
        });
    }
    if (m.height() as usize, m.width() as usize) != (h, w) {
        return Err(Error::Data {
            msg: format!(
                "{}: mask is {}×{} (w×h) but its image {} is {w}×{h}",
                e.mask_path.display(),
                m.width(),
                m.height(),
                e.image_path.display()
            ),
        });
    }
    let orig_mask: Vec<u8> = m.as_raw().iter().map(|&v| u8::from(v >= 128)).collect();
    let image = resize::resize_rgb_chw_u8(&img, s, resize);
    let mask = resize::resize_mask_nearest_u8(&orig_mask, (h, w), s, resize);
    let (sy, sx) = resize.scale((h, w), s);
    let boxes = e
        .boxes
        .iter()
        .map(|b| [b.xmin * sx, b.ymin * sy, b.xmax * sx, b.ymax * sy])
        .collect();
    Ok(PackedSegSample {
        id: e.id.clone(),
        image,
        mask,
        orig_size: (h, w),
        orig_mask,
        boxes,
    })
}

/// A train/val/test split by sample id. `source` says where it came from (files or a seed).
///
/// Training uses `train`; the epoch, checkpoint and every other choice are made on `val`
/// (carved from the training data when the data brings none); `test` is only ever scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<String>,
    /// Validation ids (empty in splits written before validation existed).
    #[serde(default)]
    pub val: Vec<String>,
    pub test: Vec<String>,
    #[serde(default)]
    pub source: String,
    /// How a run's split was made (seed and fractions), to refuse a stale `split.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<SplitSpec>,
}

/// The settings a run's split depends on; a `split.json` made with others is stale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub seed: u64,
    /// Test fraction of a seeded split (unused when the data brings its own test list).
    pub test_fraction: f64,
    /// Validation fraction carved from the training ids (unused when the data brings `val.txt`
    /// beside `test.txt`).
    pub val_fraction: f64,
}

impl SplitSpec {
    /// Refuse fractions outside (0, 1) and a val + test share that leaves no training data.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("test_fraction", self.test_fraction),
            ("val_fraction", self.val_fraction),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return Err(Error::Config {
                    field: field.into(),
                    msg: format!("{v} must be in (0, 1)"),
                });
            }
        }
        if self.test_fraction + self.val_fraction * (1.0 - self.test_fraction) >= 0.95 {
            return Err(Error::Config {
                field: "val_fraction".into(),
                msg: "test and validation together leave almost no training data".into(),
            });
        }
        Ok(())
    }
}

fn read_id_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            // Accept file names as well as ids.
            let p = Path::new(l);
            if imgio::is_image_file(p) {
                p.file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or(l)
                    .to_string()
            } else {
                l.to_string()
            }
        })
        .collect())
}

impl Split {
    /// A reproducible split: ids sorted, shuffled with `Rng::derive(seed, "kvasir-split")`,
    /// the first `round(n · test_fraction)` become the test set. Both lists are returned sorted.
    pub fn seeded(ids: &[String], seed: u64, test_fraction: f64) -> Split {
        let mut v: Vec<String> = ids.to_vec();
        v.sort();
        v.dedup();
        let mut rng = Rng::derive(seed, "kvasir-split");
        rng.shuffle(&mut v);
        let n_test = ((v.len() as f64) * test_fraction.clamp(0.0, 1.0)).round() as usize;
        let mut test = v[..n_test].to_vec();
        let mut train = v[n_test..].to_vec();
        test.sort();
        train.sort();
        Split {
            train,
            val: Vec::new(),
            test,
            source: format!("seeded(seed={seed}, test_fraction={test_fraction})"),
            spec: None,
        }
    }

    /// This split with a validation list carved from its training ids (seeded, at least one id
    /// when there are two or more training ids); an existing validation list is kept as it is.
    pub fn with_val_carved(mut self, seed: u64, val_fraction: f64) -> Split {
        if !self.val.is_empty() {
            return self;
        }
        let mut v = self.train.clone();
        let mut rng = Rng::derive(seed, "kvasir-val-split");
        rng.shuffle(&mut v);
        let n = v.len();
        let n_val = (((n as f64) * val_fraction.clamp(0.0, 1.0)).round() as usize)
            .max(usize::from(n >= 2))
            .min(n.saturating_sub(1));
        let mut val = v[..n_val].to_vec();
        let mut train = v[n_val..].to_vec();
        val.sort();
        train.sort();
        self.train = train;
        self.val = val;
        self.source = format!(
            "{}; val carved from train (seed={seed}, val_fraction={val_fraction})",
            self.source
        );
        self
    }

    /// `train.txt` + `val.txt` (or `test.txt`) in `dir`, if `train.txt` exists.
    pub fn from_root(dir: &Path) -> Result<Option<Split>> {
        let train_p = dir.join("train.txt");
        if !train_p.is_file() {
            return Ok(None);
        }
        Self::read_txt(dir).map(Some)
    }

    /// Read the split files of `dir` (one id or file name per line): `train.txt` with
    /// `test.txt` (and optionally `val.txt`), or `train.txt` with `val.txt` alone, the layout
    /// where `val.txt` is the held-out set (Medico 2020's naming): then it is the test list and
    /// validation is carved from train later.
    pub fn read_txt(dir: &Path) -> Result<Split> {
        let train_p = dir.join("train.txt");
        let (val_p, test_p) = (dir.join("val.txt"), dir.join("test.txt"));
        let (val_p, test_p) = match (val_p.is_file(), test_p.is_file()) {
            (true, true) => (Some(val_p), test_p),
            (false, true) => (None, test_p),
            (true, false) => (None, val_p),
            (false, false) => {
                return Err(Error::Data {
                    msg: format!(
                        "{}: found train.txt but neither val.txt nor test.txt",
                        dir.display()
                    ),
                })
            }
        };
        let split = Split {
            train: read_id_list(&train_p)?,
            val: match &val_p {
                Some(p) => read_id_list(p)?,
                None => Vec::new(),
            },
            test: read_id_list(&test_p)?,
            source: match &val_p {
                Some(v) => format!(
                    "{} + {} + {}",
                    train_p.display(),
                    v.display(),
                    test_p.display()
                ),
                None => format!("{} + {}", train_p.display(), test_p.display()),
            },
            spec: None,
        };
        let mut problems = Problems::new();
        split.check_disjoint(&mut problems);
        problems.into_result(&split.source)?;
        Ok(split)
    }

    /// Write `train.txt` and `test.txt` into `dir` (atomically).
    pub fn write_txt(&self, dir: &Path) -> Result<()> {
        let join = |v: &[String]| {
            let mut s = v.join("\n");
            s.push('\n');
            s
        };
        crate::util::fs::write_atomic(&dir.join("train.txt"), join(&self.train).as_bytes())?;
        crate::util::fs::write_atomic(&dir.join("test.txt"), join(&self.test).as_bytes())
    }

    /// Write as JSON (`split.json` beside a run).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        crate::util::fs::write_json_atomic(path, self)
    }

    /// Read a split written by [`Split::write_json`]; overlapping lists are an error.
    pub fn read_json(path: &Path) -> Result<Split> {
        let split: Split = crate::util::fs::read_json(path)?;
        let mut problems = Problems::new();
        split.check_disjoint(&mut problems);
        problems.into_result(&path.display().to_string())?;
        Ok(split)
    }

    fn check_disjoint(&self, problems: &mut Problems) {
        let lists = [
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ];
        let mut owner: std::collections::BTreeMap<&str, &str> = Default::default();
        for (name, list) in lists {
            for id in list.iter() {
                match owner.insert(id.as_str(), name) {
                    Some(prev) if prev == name => {
                        problems.push(format!("id `{id}` is listed twice in the {name} list"))
                    }
                    Some(prev) => problems.push(format!(
                        "id `{id}` is in both the {prev} and the {name} list"
                    )),
                    None => {}
                }
            }
        }
    }

    /// Report every id of this split that is not in `known`.
    pub fn check_against(&self, known: &BTreeSet<&str>, source: &str, problems: &mut Problems) {
        for id in self.train.iter().chain(&self.val).chain(&self.test) {
            if !known.contains(id.as_str()) {
                problems.push(format!(
                    "{source}: split names id `{id}`, which has no image/mask pair"
                ));
            }
        }
    }
}
