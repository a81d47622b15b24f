//! Image decoding and encoding helpers whose errors name the file, and the problem collector
//! used by every loader ("collect all problems, load nothing partial").

use crate::error::{Error, Result};
use image::{GrayImage, RgbImage};
use std::path::Path;

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

fn reader(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))
}

fn bad_image(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data {
        msg: format!("{}: unreadable or corrupt image: {e}", path.display()),
    }
}

/// Image size `(height, width)` read from the header only.
pub fn dimensions(path: &Path) -> Result<(usize, usize)> {
    let (w, h) = reader(path)?
        .into_dimensions()
        .map_err(|e| bad_image(path, e))?;
    Ok((h as usize, w as usize))
}

/// Decode any supported image as 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    Ok(reader(path)?
        .decode()
        .map_err(|e| bad_image(path, e))?
        .to_rgb8())
}

/// Decode any supported image as 8-bit grey (RGB masks are converted by luma).
pub fn decode_luma(path: &Path) -> Result<GrayImage> {
    Ok(reader(path)?
        .decode()
        .map_err(|e| bad_image(path, e))?
        .to_luma8())
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
