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
    has_extension(path, &IMAGE_EXTENSIONS)
}

/// TIFF extensions (CVC-ClinicDB's original `Original/` and `Ground Truth/` folders), read
/// only where a layout asks for them.
pub const TIFF_EXTENSIONS: [&str; 2] = ["tif", "tiff"];

/// True when `path`'s extension is one of `exts` (compared case-insensitively).
pub fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Image files keyed by stem, and the files that could not be keyed with the reason.
pub type ByStem = (BTreeMap<String, PathBuf>, Vec<(PathBuf, String)>);

/// Image files of `dir` (hidden files and non-images ignored) keyed by file stem, in sorted
/// order, plus the entries that could not be keyed, with the reason (a name that is not UTF-8, a
/// second file with an existing stem, a folder or a special file with an image's name, a
/// symbolic link that cannot be followed). Kvasir pairing and inference inputs both use it.
pub fn images_by_stem(dir: &Path) -> std::io::Result<ByStem> {
    files_by_stem(dir, &IMAGE_EXTENSIONS)
}

/// [`images_by_stem`] for the files with one of `exts` (e.g. [`TIFF_EXTENSIONS`]).
pub fn files_by_stem(dir: &Path, exts: &[&str]) -> std::io::Result<ByStem> {
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
        if hidden || !has_extension(&p, exts) {
            continue;
        }
        // `metadata` follows links: a loop or a dangling link fails here.
        match std::fs::metadata(&p) {
            Err(e) => {
                rejected.push((
                    p,
                    format!("cannot be opened (broken or looping link?): {e}"),
                ));
                continue;
            }
            Ok(m) if m.is_dir() => {
                rejected.push((p, "is a folder, not an image file".to_string()));
                continue;
            }
            Ok(m) if !m.is_file() => {
                rejected.push((p, "is not a regular file (a pipe or device?)".to_string()));
                continue;
            }
            Ok(_) => {}
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

/// Largest image (width × height) decoded by default: 40 MP, about 20× Kvasir-SEG's largest
/// (1920×1072). `--max-pixels` raises or lowers it for the whole process.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;
/// Largest image file read at all (bytes).
pub const MAX_FILE_BYTES: u64 = 512 << 20;

static MAX_PIXELS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MAX_PIXELS);

/// Set the pixel cap checked from every image header before decoding (`--max-pixels`).
pub fn set_max_pixels(n: u64) -> Result<()> {
    if n == 0 {
        return Err(Error::Config {
            field: "max_pixels".into(),
            msg: "must be at least 1".into(),
        });
    }
    MAX_PIXELS.store(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The pixel cap in force.
pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A JPEG must end with an end-of-image marker (FF D9), allowing a little trailing padding;
/// the decoder silently pads truncated files, so this is how a cut-off download is caught.
fn check_jpeg_complete(path: &Path, head: &[u8], tail: &[u8]) -> Result<()> {
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) && !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(bad_image(path, "truncated JPEG (no end-of-image marker)"));
    }
    Ok(())
}

/// A JPEG whose entropy-coded data (after the first start-of-scan segment) is almost all zero
/// bytes was zeroed or overwritten: the decoder would turn it into a silent garbage image.
/// (Real scan data of a photograph or a JPEG mask never looks like that.)
fn check_jpeg_body(path: &Path, bytes: &[u8]) -> Result<()> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(());
    }
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return Err(bad_image(path, "JPEG without a start-of-scan marker"));
    };
    let seg_len = match (bytes.get(sos + 2), bytes.get(sos + 3)) {
        (Some(&a), Some(&b)) => usize::from(a) << 8 | usize::from(b),
        _ => return Err(bad_image(path, "JPEG start-of-scan segment is cut off")),
    };
    let start = sos.saturating_add(2).saturating_add(seg_len);
    let end = bytes.len().saturating_sub(2);
    let Some(scan) = bytes.get(start..end) else {
        return Err(bad_image(
            path,
            "JPEG start-of-scan segment runs past the file",
        ));
    };
    if scan.len() >= 1024 {
        let zeros = scan.iter().filter(|&&b| b == 0).count();
        if zeros * 100 >= scan.len() * 99 {
            return Err(bad_image(
                path,
                format!(
                    "JPEG scan data is {zeros} of {} zero bytes (zeroed or overwritten file)",
                    scan.len()
                ),
            ));
        }
    }
    Ok(())
}

const TAIL: usize = 256;

/// The whole file, refused (naming it) when larger than [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(bad_image(
            path,
            format!("file is {len} bytes, over the {MAX_FILE_BYTES}-byte limit for an image"),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Header size `(width, height)` with the pixel cap checked, plus the structural JPEG checks.
fn checked_header(path: &Path, bytes: &[u8]) -> Result<(u32, u32)> {
    check_jpeg_complete(path, bytes, &bytes[bytes.len().saturating_sub(TAIL)..])?;
    check_jpeg_body(path, bytes)?;
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| bad_image(path, e))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(bad_image(
            path,
            format!("image is {w}×{h} (w×h): no pixels"),
        ));
    }
    let cap = max_pixels();
    if pixels > cap {
        return Err(bad_image(
            path,
            format!(
                "image is {w}×{h} (w×h) = {pixels} pixels, over the limit of {cap} \
                 (refused before decoding; pass --max-pixels to raise it)"
            ),
        ));
    }
    Ok((w, h))
}

/// Image size `(height, width)` from the header (pixel cap checked); JPEGs are also checked
/// for truncation and for a zeroed body.
pub fn dimensions(path: &Path) -> Result<(usize, usize)> {
    let bytes = read_bounded(path)?;
    let (w, h) = checked_header(path, &bytes)?;
    Ok((h as usize, w as usize))
}

fn decode(path: &Path) -> Result<image::DynamicImage> {
    let bytes = read_bounded(path)?;
    decode_checked(path, &bytes)
}

/// The checks of a file read ([`MAX_FILE_BYTES`], pixel cap from the header, JPEG structure),
/// then decoding with the decoder's allocations bounded by the header's size.
fn decode_checked(path: &Path, bytes: &[u8]) -> Result<image::DynamicImage> {
    if bytes.is_empty() {
        return Err(bad_image(path, "empty (0 bytes)"));
    }
    let (w, h) = checked_header(path, bytes)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    // The decoder may allocate what the (checked) header declares, in 16-bit RGBA at most.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (1 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| bad_image(path, e))
}

/// Decode any supported image as 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    Ok(decode(path)?.to_rgb8())
}

/// Decode an image held in memory (an HTTP request body) as 8-bit RGB, with the same checks
/// as a file ([`MAX_FILE_BYTES`], the pixel cap read from the header before decoding, JPEG
/// truncation and zeroed bodies); errors name `label` where a file's would name its path.
pub fn decode_rgb_bytes(label: &str, bytes: &[u8]) -> Result<RgbImage> {
    let name = Path::new(label);
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(bad_image(
            name,
            format!(
                "{} bytes, over the {MAX_FILE_BYTES}-byte limit for an image",
                bytes.len()
            ),
        ));
    }
    Ok(decode_checked(name, bytes)?.to_rgb8())
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
    let buf = encode_png(img).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    crate::util::fs::write_atomic(path, &buf)
}

/// The PNG bytes [`write_png`] writes (one encoder, so a served mask equals a written one).
pub fn encode_png<P>(img: &image::ImageBuffer<P, Vec<u8>>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(img.as_raw(), img.width(), img.height(), P::COLOR_TYPE)
        .map_err(|e| Error::msg(format!("PNG encoding failed: {e}")))?;
    Ok(buf)
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

    /// The recorded lines.
    pub fn lines(&self) -> &[String] {
        &self.lines
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

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// A small real PNG whose IHDR is rewritten to declare `w`×`h` (CRC fixed): a
    /// decompression bomb as a header reader sees it.
    fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let img = GrayImage::from_pixel(8, 8, image::Luma([7]));
        let mut buf = Vec::new();
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(img.as_raw(), 8, 8, image::ExtendedColorType::L8)
            .unwrap();
        // signature (8) + length (4) + "IHDR" (4) + data (13) + crc (4)
        buf[16..20].copy_from_slice(&w.to_be_bytes());
        buf[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&buf[12..29]);
        buf[29..33].copy_from_slice(&crc.to_be_bytes());
        buf
    }

    #[test]
    fn bomb_png_is_refused_from_its_header_with_the_pixel_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bomb.png");
        std::fs::write(&p, png_declaring(20000, 20000)).unwrap();
        let t = std::time::Instant::now();
        let e = decode_luma(&p).unwrap_err().to_string();
        assert!(
            e.contains("400000000 pixels") && e.contains("bomb.png"),
            "{e}"
        );
        assert!(e.contains("--max-pixels"), "{e}");
        let e = dimensions(&p).unwrap_err().to_string();
        assert!(e.contains("400000000 pixels"), "{e}");
        // Refused before decoding: no 400 MB buffer, no 30 s.
        assert!(t.elapsed().as_secs_f64() < 2.0);
        // A small declared size within the cap is read from the header as usual.
        std::fs::write(&p, png_declaring(8, 8)).unwrap();
        assert_eq!(dimensions(&p).unwrap(), (8, 8));
    }

    fn noisy_jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut s = 12345u32;
        let img = RgbImage::from_fn(w, h, |_, _| {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let v = (s >> 16) as u8;
            image::Rgb([v, v.wrapping_mul(3), v ^ 0x5a])
        });
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
            .encode_image(&img)
            .unwrap();
        buf
    }

    #[test]
    fn zeroed_jpeg_body_is_refused_and_real_jpegs_pass() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.jpg");
        let bytes = noisy_jpeg(96, 64);
        std::fs::write(&good, &bytes).unwrap();
        assert_eq!(decode_rgb(&good).unwrap().dimensions(), (96, 64));
        // A flat black image (the most zero-like real scan data) still passes.
        let black = dir.path().join("black.jpg");
        write_jpeg_luma(&black, &GrayImage::new(256, 256), 95).unwrap();
        decode_luma(&black).unwrap();
        // Zero the entropy-coded body, keep the headers and the end marker.
        let sos = bytes.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let mut z = bytes.clone();
        let n = z.len();
        for b in &mut z[sos + 20..n - 2] {
            *b = 0;
        }
        let bad = dir.path().join("zeroed.jpg");
        std::fs::write(&bad, &z).unwrap();
        let e = decode_rgb(&bad).unwrap_err().to_string();
        assert!(e.contains("zeroed.jpg") && e.contains("zero bytes"), "{e}");
        assert!(dimensions(&bad).is_err());
    }

    #[test]
    fn folders_links_and_specials_with_image_names_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.png"), png_declaring(8, 8)).unwrap();
        std::fs::create_dir(d.join("folder.png")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.join("missing.png"), d.join("dangling.png")).unwrap();
            std::os::unix::fs::symlink(d.join("loop2.png"), d.join("loop1.png")).unwrap();
            std::os::unix::fs::symlink(d.join("loop1.png"), d.join("loop2.png")).unwrap();
        }
        let (found, rejected) = images_by_stem(d).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), vec!["a"]);
        let names: Vec<String> = rejected
            .iter()
            .map(|(p, why)| format!("{} {why}", p.file_name().unwrap().to_string_lossy()))
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("folder.png is a folder")),
            "{names:?}"
        );
        #[cfg(unix)]
        for n in ["dangling.png", "loop1.png", "loop2.png"] {
            assert!(
                names
                    .iter()
                    .any(|l| l.starts_with(n) && l.contains("cannot be opened")),
                "{n}: {names:?}"
            );
        }
    }

    #[test]
    fn the_pixel_cap_can_be_set_but_not_to_zero() {
        assert!(set_max_pixels(0).is_err());
        assert_eq!(max_pixels(), DEFAULT_MAX_PIXELS);
    }
}
