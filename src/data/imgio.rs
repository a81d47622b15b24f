//! Image decoding and encoding helpers whose errors name the file, and the problem collector
//! used by every loader ("collect all problems, load nothing partial").

use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File extensions accepted as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// True when `path` has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| {
            let e = e.to_ascii_lowercase();
            IMAGE_EXTENSIONS.contains(&e.as_str())
        })
        .unwrap_or(false)
}

/// Image files keyed by stem, and the files that could not be keyed with the reason.
pub type ByStem = (BTreeMap<String, PathBuf>, Vec<(PathBuf, String)>);

/// Image files of `dir` (hidden files and non-images ignored) keyed by file stem, in sorted
/// order, plus the files that could not be keyed, with the reason (a name that is not UTF-8, a
/// second file with an existing stem). Kvasir pairing and inference inputs both use it.
pub fn images_by_stem(dir: &Path) -> std::io::Result<ByStem> {
    let rd = std::fs::read_dir(dir)?;
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut rejected = Vec::new();
    for p in paths {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden || !p.is_file() || !is_image_file(&p) {
            continue;
        }
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()).map(str::to_string) else {
            rejected.push((p, "file name is not valid UTF-8".to_string()));
            continue;
        };
        if let Some(prev) = out.get(&stem) {
            let reason = format!("same id `{stem}` as {}", prev.display());
            rejected.push((p, reason));
            continue;
        }
        out.insert(stem, p);
    }
    Ok((out, rejected))
}

fn bad_image(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data {
        msg: format!("{}: unreadable or corrupt image: {e}", path.display()),
    }
}

/// A JPEG must end with an end-of-image marker (FF D9), allowing a little trailing padding;
/// the decoder silently pads truncated files, so this is how a cut-off download is caught.
fn check_jpeg_complete(path: &Path, head: &[u8], tail: &[u8]) -> Result<()> {
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) && !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(bad_image(path, "truncated JPEG (no end-of-image marker)"));
    }
    Ok(())
}

const TAIL: usize = 256;

/// Image size `(height, width)` read from the header only (JPEGs are also checked for
/// truncation by looking at their last bytes).
pub fn dimensions(path: &Path) -> Result<(usize, usize)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 3];
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    let start = len.saturating_sub(TAIL as u64);
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    let mut tail = Vec::with_capacity(TAIL);
    f.read_to_end(&mut tail).map_err(|e| Error::io(path, e))?;
    check_jpeg_complete(path, &head[..n], &tail)?;
    let (w, h) = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| bad_image(path, e))?;
    Ok((h as usize, w as usize))
}

fn decode(path: &Path) -> Result<image::DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_jpeg_complete(path, &bytes, &bytes[bytes.len().saturating_sub(TAIL)..])?;
    image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| bad_image(path, e))
}

/// Decode any supported image as 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    Ok(decode(path)?.to_rgb8())
}

/// Decode any supported image as 8-bit grey (RGB masks are converted by luma).
pub fn decode_luma(path: &Path) -> Result<GrayImage> {
    Ok(decode(path)?.to_luma8())
}

/// Encode an RGB image as JPEG (quality 1–100) and write it atomically.
pub fn write_jpeg_rgb(path: &Path, img: &RgbImage, quality: u8) -> Result<()> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .map_err(|e| Error::msg(format!("{}: JPEG encoding failed: {e}", path.display())))?;
    crate::util::fs::write_atomic(path, &buf)
}

/// Encode a grey image as JPEG (quality 1–100) and write it atomically.
pub fn write_jpeg_luma(path: &Path, img: &GrayImage, quality: u8) -> Result<()> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .map_err(|e| Error::msg(format!("{}: JPEG encoding failed: {e}", path.display())))?;
    crate::util::fs::write_atomic(path, &buf)
}

/// Encode any 8-bit image buffer as PNG and write it atomically.
pub fn write_png<P>(path: &Path, img: &image::ImageBuffer<P, Vec<u8>>) -> Result<()>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(img.as_raw(), img.width(), img.height(), P::COLOR_TYPE)
        .map_err(|e| Error::msg(format!("{}: PNG encoding failed: {e}", path.display())))?;
    crate::util::fs::write_atomic(path, &buf)
}

/// Collects every problem found while opening a dataset, one line each, and turns them into a
/// single [`Error::Data`] so the user sees all of them at once.
#[derive(Debug, Default)]
pub struct Problems {
    lines: Vec<String>,
}

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record one problem (one line; should name the file).
    pub fn push(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// Record the message of an error.
    pub fn push_err(&mut self, e: &Error) {
        self.lines.push(e.to_string());
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// `Ok(())` when nothing was recorded, else one [`Error::Data`] whose first line says what was
    /// being loaded and how many problems, followed by one line per problem.
    pub fn into_result(self, what: &str) -> Result<()> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let mut msg = format!("{what}: {} problem(s), nothing loaded:", self.lines.len());
        for l in &self.lines {
            msg.push_str("\n  ");
            msg.push_str(l);
        }
        Err(Error::Data { msg })
    }
}
