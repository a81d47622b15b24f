//! The images of an inference job, checked before anything runs or is written.
//!
//! Images come from a folder (optionally with a Kvasir-style `masks/` folder paired by file
//! stem) or from a dataset split. [`check`] reads every header (and the end-of-image marker of
//! JPEGs, which catches truncated files) in parallel and sorts the inputs into usable items and
//! bad ones; the job then refuses to start on any bad input unless told to skip them.

use crate::data::imgio::{self, Problems};
use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image to segment, with its ground truth when known.
#[derive(Debug, Clone, PartialEq)]
pub struct InputItem {
    /// File stem (the output names are `<id>.png`).
    pub id: String,
    pub image: PathBuf,
    /// Ground-truth mask (grey or RGB, thresholded at 128), same size as the image.
    pub mask: Option<PathBuf>,
    /// `(h, w)` from the image header.
    pub size: (usize, usize),
}

/// An input that cannot be used, and why (one line naming the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadInput {
    pub path: PathBuf,
    pub reason: String,
}

/// Checked inputs: usable items (in order) and bad ones.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub items: Vec<InputItem>,
    pub bad: Vec<BadInput>,
}

/// An unchecked candidate: id, image path, optional mask path.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub image: PathBuf,
    pub mask: Option<PathBuf>,
}

impl Inputs {
    /// True when every item has a ground-truth mask (and there is at least one item).
    pub fn has_masks(&self) -> bool {
        !self.items.is_empty() && self.items.iter().all(|i| i.mask.is_some())
    }

    /// `Ok` when nothing is bad or `skip_bad` is set; otherwise one [`Error::Data`] listing
    /// every bad input. Called before any output is written.
    pub fn require_clean(&self, skip_bad: bool) -> Result<()> {
        if skip_bad || self.bad.is_empty() {
            return Ok(());
        }
        let mut p = Problems::new();
        for b in &self.bad {
            p.push(format!("{}: {}", b.path.display(), b.reason));
        }
        p.push("nothing was written; fix or remove these files, or pass --skip-bad to skip them");
        p.into_result("inference inputs")
    }
}

/// Image files of `dir` by stem (hidden files and non-images ignored); files that cannot be
/// keyed (a second file with one stem, a non-UTF-8 name) are reported bad.
fn list_by_stem(dir: &Path, bad: &mut Vec<BadInput>) -> Result<BTreeMap<String, PathBuf>> {
    let (found, rejected) = imgio::images_by_stem(dir).map_err(|e| Error::io(dir, e))?;
    bad.extend(
        rejected
            .into_iter()
            .map(|(path, reason)| BadInput { path, reason }),
    );
    Ok(found)
}

/// Candidates from an image folder and an optional mask folder (paired by file stem; an image
/// without a mask is bad when masks are given). Errors only for an unreadable folder or one
/// without images.
pub fn from_folders(
    images: &Path,
    masks: Option<&Path>,
) -> Result<(Vec<Candidate>, Vec<BadInput>)> {
    let mut bad = Vec::new();
    let imgs = list_by_stem(images, &mut bad)?;
    if imgs.is_empty() {
        return Err(Error::Data {
            msg: format!(
                "{}: no images ({}) found",
                images.display(),
                imgio::IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    let mask_map = match masks {
        Some(m) => Some(list_by_stem(m, &mut bad)?),
        None => None,
    };
    let mut out = Vec::with_capacity(imgs.len());
    for (id, image) in imgs {
        let mask = match (&mask_map, masks) {
            (Some(mm), Some(mdir)) => match mm.get(&id) {
                Some(p) => Some(p.clone()),
                None => {
                    bad.push(BadInput {
                        path: image,
                        reason: format!("no mask `{id}.*` in {}", mdir.display()),
                    });
                    continue;
                }
            },
            _ => None,
        };
        out.push(Candidate { id, image, mask });
    }
    Ok((out, bad))
}

/// Check every candidate's header (and its mask's: readable, same size) in parallel.
/// `bad` carries problems found earlier (listing); order of items is kept.
pub fn check(candidates: Vec<Candidate>, mut bad: Vec<BadInput>) -> Inputs {
    let checked: Vec<std::result::Result<InputItem, Vec<BadInput>>> = candidates
        .into_par_iter()
        .map(|c| {
            let mut problems = Vec::new();
            let isz = imgio::dimensions(&c.image)
                .map_err(|e| problems.push(bad_from(&c.image, &e)))
                .ok();
            let msz = c.mask.as_ref().and_then(|m| {
                imgio::dimensions(m)
                    .map_err(|e| problems.push(bad_from(m, &e)))
                    .ok()
            });
            if let (Some(i), Some(m), Some(mp)) = (isz, msz, c.mask.as_ref()) {
                if i != m {
                    problems.push(BadInput {
                        path: mp.clone(),
                        reason: format!(
                            "mask is {}×{} (w×h) but its image {} is {}×{}",
                            m.1,
                            m.0,
                            c.image.display(),
                            i.1,
                            i.0
                        ),
                    });
                }
            }
            match isz {
                Some(size) if problems.is_empty() => Ok(InputItem {
                    id: c.id,
                    image: c.image,
                    mask: c.mask,
                    size,
                }),
                _ => Err(problems),
            }
        })
        .collect();
    let mut items = Vec::new();
    for r in checked {
        match r {
            Ok(i) => items.push(i),
            Err(b) => bad.extend(b),
        }
    }
    Inputs { items, bad }
}

/// A [`BadInput`] from an image error (the error text already names the file; keep the reason).
pub(crate) fn bad_from(path: &Path, e: &Error) -> BadInput {
    let msg = e.to_string();
    let prefix = format!("{}: ", path.display());
    BadInput {
        path: path.to_path_buf(),
        reason: msg.strip_prefix(&prefix).unwrap_or(&msg).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, RgbImage};

    #[test]
    fn folders_pair_by_stem_and_check_flags_every_problem() {
        let tmp = std::env::temp_dir().join(format!("gps-seg-input-{}", std::process::id()));
        let (img, msk) = (tmp.join("images"), tmp.join("masks"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&msk).unwrap();
        imgio::write_jpeg_rgb(&img.join("a.jpg"), &RgbImage::new(20, 10), 90).unwrap();
        imgio::write_jpeg_luma(&msk.join("a.jpg"), &GrayImage::new(20, 10), 90).unwrap();
        // b: mask of the wrong size; c: no mask; d: truncated JPEG.
        imgio::write_jpeg_rgb(&img.join("b.jpg"), &RgbImage::new(20, 10), 90).unwrap();
        imgio::write_png(&msk.join("b.png"), &GrayImage::new(10, 10)).unwrap();
        imgio::write_jpeg_rgb(&img.join("c.jpg"), &RgbImage::new(8, 8), 90).unwrap();
        let full = std::fs::read(img.join("a.jpg")).unwrap();
        std::fs::write(img.join("d.jpg"), &full[..full.len() / 2]).unwrap();
        imgio::write_jpeg_luma(&msk.join("d.jpg"), &GrayImage::new(20, 10), 90).unwrap();
        std::fs::write(img.join("notes.txt"), "x").unwrap();

        let (c, bad) = from_folders(&img, Some(&msk)).unwrap();
        let inputs = check(c, bad);
        assert_eq!(inputs.items.len(), 1);
        assert_eq!(inputs.items[0].id, "a");
        assert_eq!(inputs.items[0].size, (10, 20));
        assert!(inputs.has_masks());
        let bad: Vec<String> = inputs
            .bad
            .iter()
            .map(|b| format!("{}: {}", b.path.display(), b.reason))
            .collect();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad
            .iter()
            .any(|l| l.contains("b.png") && l.contains("10×10")));
        assert!(bad
            .iter()
            .any(|l| l.contains("c.jpg") && l.contains("no mask")));
        assert!(bad
            .iter()
            .any(|l| l.contains("d.jpg") && l.contains("truncated")));
        let e = inputs.require_clean(false).unwrap_err().to_string();
        assert!(e.contains("d.jpg") && e.contains("--skip-bad"), "{e}");
        assert!(inputs.require_clean(true).is_ok());

        // Without masks every readable image is an item.
        let (c, bad) = from_folders(&img, None).unwrap();
        let inputs = check(c, bad);
        assert_eq!(inputs.items.len(), 3);
        assert!(!inputs.has_masks());
        assert!(from_folders(&tmp.join("nope"), None).is_err());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
