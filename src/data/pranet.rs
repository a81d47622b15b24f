//! PraNet's polyp benchmark layout (Fan et al., "PraNet: Parallel Reverse Attention Network for
//! Polyp Segmentation", MICCAI 2020), the protocol of the polyp-segmentation tables: train on
//! `TrainDataset` (900 Kvasir-SEG + 550 CVC-ClinicDB images), test on up to five sets.
//!
//! ```text
//! <root>/TrainDataset/image/*.png  + mask/*.png          (as distributed; images/ + masks/ too)
//! <root>/TestDataset/<Set>/images/*.png + masks/*.png    for the sets of TEST_SETS present:
//!     Kvasir (100), CVC-ClinicDB (62), CVC-ColonDB (380), ETIS-LaribPolypDB (196), CVC-300 (60)
//! ```
//!
//! A folder of pairs may also be in CVC-ClinicDB's original layout, `Original/*.tif` +
//! `Ground Truth/*.tif` (Bernal et al., CMIG 2015), as a test set inside `TestDataset/` or on its
//! own ([`open_pair_set`]). Images and masks pair by file stem with Kvasir-SEG's rules and
//! problem reporting ([`super::kvasir`]: every problem names its file, all at once, or the bad
//! pairs left out and listed with `skip_bad`); entries are [`KvasirEntry`]s, so
//! [`super::kvasir::load_entry_packed`] loads them, and masks that are not binary (JPEG
//! artefacts, anti-aliased or resized PNGs) are thresholded at 128 (`v ≥ 128`, as Kvasir-SEG's
//! JPEG masks; the MATLAB toolbox and PySODMetrics use `v > 128`, which differs only for pixels
//! of value exactly 128).
//!
//! Validation is not part of the layout: the training loop carves it from `TrainDataset`
//! ([`PranetDataset::train_val`], seeded, the same rule as Kvasir-SEG's); the test sets are
//! only ever scored.

use super::imgio::{self, Problems};
use super::kvasir::{open_pairs, KvasirEntry, OpenOptions, OpenedPairs, PairDirs, Split};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The five test sets, in the order of the polyp tables, named as distributed.
pub const TEST_SETS: [&str; 5] = [
    "Kvasir",
    "CVC-ClinicDB",
    "CVC-ColonDB",
    "ETIS-LaribPolypDB",
    "CVC-300",
];
/// Training folder under the root.
pub const TRAIN_DIR: &str = "TrainDataset";
/// Folder of the test sets under the root.
pub const TEST_DIR: &str = "TestDataset";

/// The layouts a segmentation run reads.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum SegLayout {
    /// Kvasir-SEG: `images/` + `masks/`, a split file or a seeded train/val/test split.
    #[default]
    Kvasir,
    /// PraNet: `TrainDataset/` (train, validation carved from it) + `TestDataset/<Set>/`.
    Pranet,
}

impl SegLayout {
    pub fn is_kvasir(&self) -> bool {
        *self == SegLayout::Kvasir
    }

    pub fn name(self) -> &'static str {
        match self {
            SegLayout::Kvasir => "kvasir",
            SegLayout::Pranet => "pranet",
        }
    }
}

/// How one folder holds its image/mask pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairLayout {
    /// `images/` + `masks/` (PraNet's test sets, Kvasir-SEG).
    ImagesMasks,
    /// `image/` + `mask/` (PraNet's `TrainDataset`).
    ImageMask,
    /// `Original/` + `Ground Truth/`, TIFF (CVC-ClinicDB as released).
    ClinicDbOriginal,
}

impl PairLayout {
    const ALL: [PairLayout; 3] = [
        PairLayout::ImagesMasks,
        PairLayout::ImageMask,
        PairLayout::ClinicDbOriginal,
    ];

    /// Sub-folders of images and masks.
    pub fn dirs(self) -> (&'static str, &'static str) {
        match self {
            PairLayout::ImagesMasks => ("images", "masks"),
            PairLayout::ImageMask => ("image", "mask"),
            PairLayout::ClinicDbOriginal => ("Original", "Ground Truth"),
        }
    }

    fn exts(self) -> &'static [&'static str] {
        match self {
            PairLayout::ClinicDbOriginal => &imgio::TIFF_EXTENSIONS,
            _ => &imgio::IMAGE_EXTENSIONS,
        }
    }

    fn hint_ext(self) -> &'static str {
        match self {
            PairLayout::ClinicDbOriginal => "tif",
            _ => "png",
        }
    }

    /// The layout of `dir`: the first whose two sub-folders both exist.
    pub fn detect(dir: &Path) -> Option<PairLayout> {
        Self::ALL.into_iter().find(|l| {
            let (i, m) = l.dirs();
            dir.join(i).is_dir() && dir.join(m).is_dir()
        })
    }
}

/// One folder of pairs: the training set or one test set.
#[derive(Debug, Clone)]
pub struct PairSet {
    /// `TrainDataset`, a name of [`TEST_SETS`], or the folder name of a set opened alone.
    pub name: String,
    pub dir: PathBuf,
    pub layout: PairLayout,
    /// Pairs sorted by id (file stem); ids are unique within a set, not across sets.
    pub entries: Vec<KvasirEntry>,
}

impl PairSet {
    pub fn ids(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.id.clone()).collect()
    }
}

/// Open one folder of pairs in any [`PairLayout`]; folder-level problems (no recognised
/// layout) go to `problems`, pair problems as [`open_pairs`] reports them. `None` when the
/// folder has no layout.
fn open_set_into(
    name: &str,
    dir: &Path,
    opts: &OpenOptions,
    problems: &mut Problems,
    skipped: &mut Vec<String>,
) -> Option<PairSet> {
    let Some(layout) = PairLayout::detect(dir) else {
        problems.push(format!(
            "{}: no image/mask folders (expected images/ + masks/, image/ + mask/, or \
             CVC-ClinicDB's Original/ + Ground Truth/)",
            dir.display()
        ));
        return None;
    };
    let (i, m) = layout.dirs();
    let dirs = PairDirs {
        images: dir.join(i),
        masks: dir.join(m),
        exts: layout.exts(),
        hint_ext: layout.hint_ext(),
    };
    let OpenedPairs {
        entries,
        skipped: lines,
        ..
    } = open_pairs(&dirs, opts, problems);
    skipped.extend(lines);
    Some(PairSet {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        layout,
        entries,
    })
}

/// Open one folder of pairs on its own (any [`PairLayout`]; e.g. CVC-ClinicDB as released),
/// named by its folder. All problems in one [`Error::Data`].
pub fn open_pair_set(dir: &Path, opts: &OpenOptions) -> Result<(PairSet, Vec<String>)> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let mut problems = Problems::new();
    let mut skipped = Vec::new();
    let set = open_set_into(&name, dir, opts, &mut problems, &mut skipped);
    problems.into_result(&format!("pairs at {}", dir.display()))?;
    let set = set.ok_or_else(|| Error::Data {
        msg: format!("{}: no image/mask folders", dir.display()),
    })?;
    Ok((set, skipped))
}

/// A PraNet-layout root.
#[derive(Debug, Clone)]
pub struct PranetDataset {
    pub root: PathBuf,
    /// `TrainDataset` when present (evaluation alone needs only test sets).
    pub train: Option<PairSet>,
    /// The test sets present, in [`TEST_SETS`] order.
    pub test: Vec<PairSet>,
    /// With [`OpenOptions::skip_bad`]: one line per pair left out, naming its file.
    pub skipped: Vec<String>,
}

impl PranetDataset {
    /// Open with header checks only; see [`PranetDataset::open_with`].
    pub fn open(root: &Path) -> Result<PranetDataset> {
        Self::open_with(root, &OpenOptions::default())
    }

    /// Open `root`: `TestDataset/` with at least one of [`TEST_SETS`] (a folder there that is
    /// not one of them is a problem, so a misspelt set is never silently left out), and
    /// `TrainDataset/` when present. Every problem found, in any set, in one [`Error::Data`].
    pub fn open_with(root: &Path, opts: &OpenOptions) -> Result<PranetDataset> {
        let mut problems = Problems::new();
        let mut skipped = Vec::new();
        let train_dir = root.join(TRAIN_DIR);
        let train = if train_dir.is_dir() {
            open_set_into(TRAIN_DIR, &train_dir, opts, &mut problems, &mut skipped)
        } else {
            None
        };
        let test_dir = root.join(TEST_DIR);
        let mut test = Vec::new();
        match std::fs::read_dir(&test_dir) {
            Err(e) => problems.push(format!("{}: cannot read folder: {e}", test_dir.display())),
            Ok(rd) => {
                let mut found: BTreeMap<usize, PathBuf> = BTreeMap::new();
                let mut names: Vec<(String, PathBuf)> = rd
                    .filter_map(|e| e.ok())
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .filter(|(n, p)| !n.starts_with('.') && p.is_dir())
                    .collect();
                names.sort();
                for (n, p) in names {
                    match TEST_SETS.iter().position(|s| *s == n) {
                        Some(k) => {
                            found.insert(k, p);
                        }
                        None => problems.push(format!(
                            "{}: not one of the test sets ({})",
                            p.display(),
                            TEST_SETS.join(", ")
                        )),
                    }
                }
                if found.is_empty() {
                    problems.push(format!(
                        "{}: none of the test sets ({}) found",
                        test_dir.display(),
                        TEST_SETS.join(", ")
                    ));
                }
                for (k, p) in found {
                    if let Some(s) =
                        open_set_into(TEST_SETS[k], &p, opts, &mut problems, &mut skipped)
                    {
                        test.push(s);
                    }
                }
            }
        }
        problems.into_result(&format!("PraNet layout at {}", root.display()))?;
        Ok(PranetDataset {
            root: root.to_path_buf(),
            train,
            test,
            skipped,
        })
    }

    /// The training set, or an error naming the missing folder.
    pub fn train(&self) -> Result<&PairSet> {
        self.train.as_ref().ok_or_else(|| Error::Data {
            msg: format!(
                "{}: no {TRAIN_DIR}/ folder (image/ + mask/) to train on",
                self.root.display()
            ),
        })
    }

    /// Training ids, sorted.
    pub fn train_ids(&self) -> Result<Vec<String>> {
        Ok(self.train()?.ids())
    }

    /// The test set called `name` (one of [`TEST_SETS`]), if present.
    pub fn test_set(&self, name: &str) -> Option<&PairSet> {
        self.test.iter().find(|s| s.name == name)
    }

    /// Test set name → its ids (sorted), for the sets present.
    pub fn test_ids(&self) -> BTreeMap<String, Vec<String>> {
        self.test
            .iter()
            .map(|s| (s.name.clone(), s.ids()))
            .collect()
    }

    /// The test pairs of every set present, in [`TEST_SETS`] order, each set capped at its
    /// first `limit` pairs (by id), with set-qualified ids `<Set>/<id>`
    /// ([`crate::metrics::set_of_id`] reads the set back), so ids are unique across sets and a
    /// per-set table can be made from any list of them. Training and `infer --run` both take
    /// a PraNet run's test images from here.
    pub fn test_pairs(&self, limit: Option<usize>) -> Vec<KvasirEntry> {
        let mut out = Vec::new();
        for set in &self.test {
            let n = limit.unwrap_or(usize::MAX).min(set.entries.len());
            out.extend(set.entries[..n].iter().map(|e| KvasirEntry {
                id: format!("{}/{}", set.name, e.id),
                ..e.clone()
            }));
        }
        out
    }

    /// Train and validation ids carved from `TrainDataset` with Kvasir-SEG's seeded rule
    /// ([`Split::with_val_carved`]: at least one validation id when there are two or more).
    pub fn train_val(&self, seed: u64, val_fraction: f64) -> Result<(Vec<String>, Vec<String>)> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(Error::Config {
                field: "val_fraction".into(),
                msg: format!("{val_fraction} must be in (0, 1)"),
            });
        }
        let split = Split {
            train: self.train_ids()?,
            val: Vec::new(),
            test: Vec::new(),
            source: format!("{}/{TRAIN_DIR}", self.root.display()),
            spec: None,
        }
        .with_val_carved(seed, val_fraction);
        Ok((split.train, split.val))
    }

    /// One line per set: name, layout and pair count (for `data check`).
    pub fn report(&self) -> Vec<String> {
        self.train
            .iter()
            .chain(&self.test)
            .map(|s| {
                let (i, m) = s.layout.dirs();
                format!("{}: {} pairs ({i}/ + {m}/)", s.name, s.entries.len())
            })
            .collect()
    }
}
