//! Classification datasets in the layouts users have (see `shared/notes/gps-method.md`):
//! ImageFolder (one sub-folder per class), VTAB-1k (`train800.txt`, `val200.txt`,
//! `train800val200.txt`, `test.txt`; lines `relpath label`), FGVC with VPT's json splits
//! (`train.json`/`val.json`/`test.json`: relpath → class id) and CIFAR-100 binary
//! (`train.bin`/`test.bin`: records of coarse byte, fine byte, 3072 bytes of R, G, B planes).
//!
//! Images stay on disk until loaded ([`ClsDataset::load_rgb`]); CIFAR records are kept in memory.
//! Normalisation presets ([`Normalize`]) are data: the tensor handed to models is [0, 1] RGB.

use super::imgio::{self, Problems};
use crate::error::{Error, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Per-channel mean/std normalisation `(x − mean) / std` for `[0, 1]` RGB input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// ViT-B/16 ImageNet-21k (the GPS/VPT backbone): mean = std = 0.5.
    pub fn vit_in21k() -> Self {
        Normalize {
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// torchvision ImageNet statistics.
    pub fn imagenet() -> Self {
        Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Apply in place to a `[3, H, W]` (or `[B, 3, H, W]`) CHW buffer of `hw` pixels per plane.
    pub fn apply_chw(&self, x: &mut [f32], hw: usize) {
        for (p, plane) in x.chunks_exact_mut(hw).enumerate() {
            let c = p % 3;
            plane
                .iter_mut()
                .for_each(|v| *v = (*v - self.mean[c]) / self.std[c]);
        }
    }
}

/// Where a sample's pixels come from.
#[derive(Debug, Clone)]
pub enum ImageRef {
    /// An image file.
    File(PathBuf),
    /// A CIFAR record: `data[offset..offset + 3072]`, R, G, B planes of 32×32.
    Cifar { data: Arc<Vec<u8>>, offset: usize },
}

/// One labelled image.
#[derive(Debug, Clone)]
pub struct ClsSample {
    /// Relative path, or `file#record` for CIFAR.
    pub id: String,
    pub image: ImageRef,
    pub label: u32,
}

/// Which split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClsSplit {
    Train,
    Val,
    /// Train + val (VTAB's `train800val200`).
    TrainVal,
    Test,
}

impl std::str::FromStr for ClsSplit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(ClsSplit::Train),
            "val" => Ok(ClsSplit::Val),
            "trainval" | "train-val" => Ok(ClsSplit::TrainVal),
            "test" => Ok(ClsSplit::Test),
            _ => Err(Error::Config {
                field: "split".into(),
                msg: format!("unknown split `{s}` (train, val, trainval, test)"),
            }),
        }
    }
}

/// On-disk layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClsLayout {
    /// `<root>/<split>/<class>/*.jpg` (split folder `train`, `val`, `test`), or
    /// `<root>/<class>/*.jpg` when the split folder is absent.
    ImageFolder,
    Vtab,
    Fgvc,
    Cifar100,
}

impl std::str::FromStr for ClsLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "imagefolder" => Ok(ClsLayout::ImageFolder),
            "vtab" => Ok(ClsLayout::Vtab),
            "fgvc" => Ok(ClsLayout::Fgvc),
            "cifar100" | "cifar-100" => Ok(ClsLayout::Cifar100),
            _ => Err(Error::Config {
                field: "layout".into(),
                msg: format!("unknown layout `{s}` (imagefolder, vtab, fgvc, cifar100)"),
            }),
        }
    }
}

impl ClsLayout {
    /// Guess the layout from the files in `root`.
    pub fn detect(root: &Path) -> Result<ClsLayout> {
        if root.join("train800val200.txt").is_file() || root.join("train800.txt").is_file() {
            Ok(ClsLayout::Vtab)
        } else if root.join("train.json").is_file() || root.join("test.json").is_file() {
            Ok(ClsLayout::Fgvc)
        } else if root.join("train.bin").is_file() || root.join("test.bin").is_file() {
            Ok(ClsLayout::Cifar100)
        } else if root.is_dir() {
            Ok(ClsLayout::ImageFolder)
        } else {
            Err(Error::Data {
                msg: format!("{}: dataset folder not found", root.display()),
            })
        }
    }
}

/// A labelled image set.
#[derive(Debug, Clone)]
pub struct ClsDataset {
    pub samples: Vec<ClsSample>,
    pub class_names: Vec<String>,
    pub num_classes: usize,
}

/// Resolve a relative path as given, or under `images/`.
fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    [root.join(rel), root.join("images").join(rel)]
        .into_iter()
        .find(|p| p.is_file())
}

fn default_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class_{i}")).collect()
}

/// Read `class_names.txt` (one per line) when present.
fn read_names(root: &Path) -> Option<Vec<String>> {
    for f in ["class_names.txt", "fine_label_names.txt", "classes.txt"] {
        if let Ok(t) = std::fs::read_to_string(root.join(f)) {
            let v: Vec<String> = t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if !v.is_empty() {
                return Some(v);
            }
        }
    }
    None
}

impl ClsDataset {
    /// Open `root` in `layout`, reading `split`. `num_classes`: the class count when known
    /// (labels ≥ it are errors); `None` infers it (ImageFolder: folders; VTAB/FGVC: 1 + the
    /// largest label over every split file in the root; CIFAR-100: 100).
    pub fn open(
        root: &Path,
        layout: ClsLayout,
        split: ClsSplit,
        num_classes: Option<usize>,
    ) -> Result<ClsDataset> {
        match layout {
            ClsLayout::ImageFolder => {
                let name = match split {
                    ClsSplit::Train => "train",
                    ClsSplit::Val => "val",
                    ClsSplit::Test => "test",
                    ClsSplit::TrainVal => "train",
                };
                if split == ClsSplit::TrainVal {
                    let mut a = Self::image_folder(&root.join("train"))?;
                    let b = Self::image_folder(&root.join("val"))?;
                    if a.class_names != b.class_names {
                        return Err(Error::Data {
                            msg: format!(
                                "{}: train/ and val/ have different class folders",
                                root.display()
                            ),
                        });
                    }
                    a.samples.extend(b.samples);
                    return Ok(a);
                }
                let sub = root.join(name);
                let ds = Self::image_folder(if sub.is_dir() { &sub } else { root })?;
                check_class_count(&ds, num_classes, root)?;
                Ok(ds)
            }
            ClsLayout::Vtab => Self::vtab(root, split, num_classes),
            ClsLayout::Fgvc => Self::fgvc(root, split, num_classes),
            ClsLayout::Cifar100 => Self::cifar100(root, split),
        }
    }

    /// A seeded, stratified validation part carved from this set: about `fraction` of each
    /// class (at least one image of every class with two or more) goes to the second set.
    /// Used when the data brings no validation split of its own.
    pub fn carve_val(self, seed: u64, fraction: f64) -> Result<(ClsDataset, ClsDataset)> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::Config {
                field: "val_fraction".into(),
                msg: format!("{fraction} must be in (0, 1)"),
            });
        }
        let mut rng = crate::util::rng::Rng::derive(seed, "cls-val-split");
        let mut by_class: std::collections::BTreeMap<u32, Vec<ClsSample>> = Default::default();
        for smp in self.samples {
            by_class.entry(smp.label).or_default().push(smp);
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (_, mut v) in by_class {
            v.sort_by(|a, b| a.id.cmp(&b.id));
            rng.shuffle(&mut v);
            let n = v.len();
            let k = (((n as f64) * fraction).round() as usize)
                .max(usize::from(n >= 2))
                .min(n.saturating_sub(1));
            let rest = v.split_off(k);
            val.extend(v);
            train.extend(rest);
        }
        train.sort_by(|a, b| a.id.cmp(&b.id));
        val.sort_by(|a, b| a.id.cmp(&b.id));
        let part = |samples| ClsDataset {
            samples,
            class_names: self.class_names.clone(),
            num_classes: self.num_classes,
        };
        Ok((part(train), part(val)))
    }

    /// ImageFolder: every sub-folder of `root` is a class (sorted by name → label).
    pub fn image_folder(root: &Path) -> Result<ClsDataset> {
        let mut problems = Problems::new();
        let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
        let mut classes: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        classes.sort();
        if classes.is_empty() {
            problems.push(format!("{}: no class sub-folders found", root.display()));
        }
        let mut samples = Vec::new();
        let mut class_names = Vec::new();
        for (label, dir) in classes.iter().enumerate() {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && imgio::is_image_file(p))
                    .collect(),
                Err(e) => {
                    problems.push(format!("{}: cannot read folder: {e}", dir.display()));
                    continue;
                }
            };
            files.sort();
            if files.is_empty() {
                problems.push(format!("{}: class folder has no images", dir.display()));
            }
            for f in files {
                let rel = f
                    .strip_prefix(root)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .into_owned();
                samples.push(ClsSample {
                    id: rel,
                    image: ImageRef::File(f),
                    label: label as u32,
                });
            }
            class_names.push(name);
        }
        problems.into_result(&format!("ImageFolder at {}", root.display()))?;
        let num_classes = class_names.len();
        Ok(ClsDataset {
            samples,
            class_names,
            num_classes,
        })
    }

    /// VTAB-1k: `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`.
    pub fn vtab(root: &Path, split: ClsSplit, num_classes: Option<usize>) -> Result<ClsDataset> {
        let file = match split {
            ClsSplit::Train => "train800.txt",
            ClsSplit::Val => "val200.txt",
            ClsSplit::TrainVal => "train800val200.txt",
            ClsSplit::Test => "test.txt",
        };
        let parse = |path: &Path, problems: &mut Problems| -> Vec<(String, i64)> {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{}: {e}", path.display()));
                    return Vec::new();
                }
            };
            let mut out = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let mut it = line.rsplitn(2, char::is_whitespace);
                let (lab, rel) = (it.next(), it.next());
                match (rel, lab.and_then(|l| l.parse::<i64>().ok())) {
                    (Some(rel), Some(l)) => out.push((rel.trim().to_string(), l)),
                    _ => problems.push(format!(
                        "{}:{}: expected `relpath label`, found `{line}`",
                        path.display(),
                        n + 1
                    )),
                }
            }
            out
        };
        let mut problems = Problems::new();
        let path = root.join(file);
        let entries = parse(&path, &mut problems);
        let n_classes = match num_classes {
            Some(n) => n,
            None => {
                // Infer from every split file present, so train and test agree.
                let mut scratch = Problems::new();
                let mut max = -1i64;
                for f in [
                    "train800.txt",
                    "val200.txt",
                    "train800val200.txt",
                    "test.txt",
                ] {
                    let p = root.join(f);
                    if p.is_file() {
                        for (_, l) in parse(&p, &mut scratch) {
                            max = max.max(l);
                        }
                    }
                }
                (max + 1).max(0) as usize
            }
        };
        let samples = build_samples(root, &path, entries, n_classes, &mut problems);
        problems.into_result(&format!("VTAB-1k at {}", root.display()))?;
        Ok(ClsDataset {
            samples,
            class_names: read_names(root)
                .filter(|v| v.len() == n_classes)
                .unwrap_or_else(|| default_names(n_classes)),
            num_classes: n_classes,
        })
    }

    /// FGVC with VPT's json splits (`relpath → class id`).
    pub fn fgvc(root: &Path, split: ClsSplit, num_classes: Option<usize>) -> Result<ClsDataset> {
        let read = |f: &str| -> Result<Vec<(String, i64)>> {
            let p = root.join(f);
            let m: BTreeMap<String, i64> = crate::util::fs::read_json(&p)?;
            Ok(m.into_iter().collect())
        };
        let mut problems = Problems::new();
        let files: &[&str] = match split {
            ClsSplit::Train => &["train.json"],
            ClsSplit::Val => &["val.json"],
            ClsSplit::TrainVal => &["train.json", "val.json"],
            ClsSplit::Test => &["test.json"],
        };
        let mut entries = Vec::new();
        for f in files {
            match read(f) {
                Ok(v) => entries.extend(v),
                Err(e) => problems.push_err(&e),
            }
        }
        let n_classes = match num_classes {
            Some(n) => n,
            None => {
                let mut max = -1i64;
                for f in ["train.json", "val.json", "test.json"] {
                    if root.join(f).is_file() {
                        if let Ok(v) = read(f) {
                            max = v.iter().map(|x| x.1).fold(max, i64::max);
                        }
                    }
                }
                (max + 1).max(0) as usize
            }
        };
        let label_file = root.join(files.join("+"));
        let samples = build_samples(root, &label_file, entries, n_classes, &mut problems);
        problems.into_result(&format!("FGVC at {}", root.display()))?;
        Ok(ClsDataset {
            samples,
            class_names: read_names(root)
                .filter(|v| v.len() == n_classes)
                .unwrap_or_else(|| default_names(n_classes)),
            num_classes: n_classes,
        })
    }

    /// CIFAR-100 binary (`train.bin`, `test.bin`), fine labels. `Val` and `TrainVal` read
    /// `train.bin` (CIFAR has no separate validation set).
    pub fn cifar100(root: &Path, split: ClsSplit) -> Result<ClsDataset> {
        const REC: usize = 2 + 3072;
        let file = match split {
            ClsSplit::Test => "test.bin",
            _ => "train.bin",
        };
        let path = root.join(file);
        let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let mut problems = Problems::new();
        if data.is_empty() || data.len() % REC != 0 {
            problems.push(format!(
                "{}: {} bytes is not a whole number of {REC}-byte CIFAR-100 records",
                path.display(),
                data.len()
            ));
        }
        let data = Arc::new(data);
        let n = data.len() / REC;
        let mut samples = Vec::with_capacity(n);
        for r in 0..n {
            let fine = data[r * REC + 1];
            if fine >= 100 {
                problems.push(format!(
                    "{}: record {r} has fine label {fine}, outside 0..100",
                    path.display()
                ));
                continue;
            }
            samples.push(ClsSample {
                id: format!("{file}#{r}"),
                image: ImageRef::Cifar {
                    data: data.clone(),
                    offset: r * REC + 2,
                },
                label: fine as u32,
            });
        }
        problems.into_result(&format!("CIFAR-100 at {}", root.display()))?;
        Ok(ClsDataset {
            samples,
            class_names: read_names(root)
                .filter(|v| v.len() == 100)
                .unwrap_or_else(|| default_names(100)),
            num_classes: 100,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of samples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0usize; self.num_classes];
        for s in &self.samples {
            if let Some(x) = c.get_mut(s.label as usize) {
                *x += 1;
            }
        }
        c
    }

    /// A short human-readable report: sample and class counts, min/max per class.
    pub fn report(&self) -> String {
        let c = self.class_counts();
        let min = c.iter().copied().min().unwrap_or(0);
        let max = c.iter().copied().max().unwrap_or(0);
        let mut s = format!(
            "{} samples, {} classes, {min}–{max} per class",
            self.len(),
            self.num_classes
        );
        for (i, n) in c.iter().enumerate().take(10) {
            let name = self.class_names.get(i).map(String::as_str).unwrap_or("?");
            s.push_str(&format!("\n  {i:>4} {name}: {n}"));
        }
        if c.len() > 10 {
            s.push_str(&format!("\n  … {} more classes", c.len() - 10));
        }
        s
    }

    /// Decode sample `index` as 8-bit RGB (errors name the file).
    pub fn load_rgb(&self, index: usize) -> Result<RgbImage> {
        let s = self.samples.get(index).ok_or_else(|| Error::Data {
            msg: format!("sample index {index} out of range ({} samples)", self.len()),
        })?;
        load_image_ref(&s.image)
    }
}

/// What makes two samples the same image: a file's content (size and SHA-256 of its bytes,
/// so a copy or a renamed file is the same image as its original), or the CIFAR record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SameImage {
    Content(crate::util::hash::FileHash),
    Cifar(String),
}

/// Refuse any image that appears in two of the named parts (e.g. train / val / test): the
/// same file, a copy of it or a renamed copy (found by content: every file is hashed once,
/// streamed, in parallel), or the same CIFAR record. The error names both files (lossily for
/// names that are not UTF-8) and the parts they are in, for the first 10 overlaps, and counts
/// them all. Repeats within one part are not overlaps. Every run checks its parts.
pub fn check_disjoint(parts: &[(&str, &ClsDataset)]) -> Result<()> {
    use rayon::prelude::*;
    // Each distinct file once (a file listed by two parts, or twice, is read once).
    let mut files: Vec<&Path> = parts
        .iter()
        .flat_map(|(_, ds)| ds.samples.iter())
        .filter_map(|smp| match &smp.image {
            ImageRef::File(p) => Some(p.as_path()),
            ImageRef::Cifar { .. } => None,
        })
        .collect();
    files.sort();
    files.dedup();
    let hashes: std::collections::HashMap<&Path, crate::util::hash::FileHash> = files
        .par_iter()
        .map(|p| crate::util::hash::sha256_file(p).map(|h| (*p, h)))
        .collect::<Result<_>>()?;
    // Content → (part index, the first sample of that part with it).
    let mut owner: std::collections::HashMap<SameImage, (usize, &ClsSample)> = Default::default();
    let mut problems = Problems::new();
    let mut total = 0usize;
    for (k, (name, ds)) in parts.iter().enumerate() {
        for smp in &ds.samples {
            let key = match &smp.image {
                ImageRef::File(p) => match hashes.get(p.as_path()) {
                    Some(h) => SameImage::Content(*h),
                    None => continue,
                },
                ImageRef::Cifar { .. } => SameImage::Cifar(smp.id.clone()),
            };
            match owner.get(&key) {
                None => {
                    owner.insert(key, (k, smp));
                }
                Some(&(pk, _)) if pk == k => {}
                Some(&(pk, prev)) => {
                    total += 1;
                    if problems.len() < 10 {
                        let prev_name = parts.get(pk).map_or("?", |p| p.0);
                        problems.push(overlap_line(prev, prev_name, smp, name));
                    }
                }
            }
        }
    }
    if total > problems.len() {
        problems.push(format!("… {} overlap(s) in all", total));
    }
    problems.into_result("classification splits overlap")
}

/// One overlap, naming both samples' files and their parts.
fn overlap_line(a: &ClsSample, a_part: &str, b: &ClsSample, b_part: &str) -> String {
    let show = |s: &ClsSample| match &s.image {
        ImageRef::File(p) => p.display().to_string(),
        ImageRef::Cifar { .. } => s.id.clone(),
    };
    let same_file = match (&a.image, &b.image) {
        (ImageRef::File(p), ImageRef::File(q)) => p == q,
        _ => a.id == b.id,
    };
    let (x, y) = (show(a), show(b));
    if same_file {
        format!("`{x}` is in both the {a_part} and the {b_part} split")
    } else {
        format!(
            "`{x}` (in the {a_part} split) and `{y}` (in the {b_part} split) are the same \
             image: identical bytes"
        )
    }
}

/// Decode an [`ImageRef`] as 8-bit RGB.
pub fn load_image_ref(r: &ImageRef) -> Result<RgbImage> {
    match r {
        ImageRef::File(p) => imgio::decode_rgb(p),
        ImageRef::Cifar { data, offset } => {
            let px = &data[*offset..*offset + 3072];
            let mut buf = Vec::with_capacity(3072);
            for i in 0..1024 {
                buf.extend_from_slice(&[px[i], px[1024 + i], px[2048 + i]]);
            }
            RgbImage::from_raw(32, 32, buf).ok_or_else(|| Error::msg("CIFAR record size"))
        }
    }
}

fn check_class_count(ds: &ClsDataset, n: Option<usize>, root: &Path) -> Result<()> {
    match n {
        Some(n) if n != ds.num_classes => Err(Error::Data {
            msg: format!(
                "{}: found {} class folders but {n} classes were expected",
                root.display(),
                ds.num_classes
            ),
        }),
        _ => Ok(()),
    }
}

fn build_samples(
    root: &Path,
    label_file: &Path,
    entries: Vec<(String, i64)>,
    n_classes: usize,
    problems: &mut Problems,
) -> Vec<ClsSample> {
    if entries.is_empty() && problems.is_empty() {
        problems.push(format!("{}: lists no samples", label_file.display()));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (rel, label) in entries {
        if label < 0 || label as usize >= n_classes {
            problems.push(format!(
                "{}: `{rel}` has label {label}, outside 0..{n_classes}",
                label_file.display()
            ));
            continue;
        }
        match resolve(root, &rel) {
            Some(p) => out.push(ClsSample {
                id: rel,
                image: ImageRef::File(p),
                label: label as u32,
            }),
            None => problems.push(format!(
                "{}: names `{rel}`, but neither {} nor {} exists",
                label_file.display(),
                root.join(&rel).display(),
                root.join("images").join(&rel).display()
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_presets_and_parsing() {
        let mut x = vec![0.0f32, 1.0, 0.5, 0.5, 1.0, 0.0];
        Normalize::vit_in21k().apply_chw(&mut x, 2);
        assert_eq!(x, vec![-1.0, 1.0, 0.0, 0.0, 1.0, -1.0]);
        let mut y = vec![0.485f32, 0.456, 0.406];
        Normalize::imagenet().apply_chw(&mut y, 1);
        assert!(y.iter().all(|v| v.abs() < 1e-6));
        assert_eq!("trainval".parse::<ClsSplit>().unwrap(), ClsSplit::TrainVal);
        assert!("bogus".parse::<ClsLayout>().is_err());
    }
}
