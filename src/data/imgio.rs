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

/// Largest total of an image's ancillary data: a PNG's ancillary chunks (every chunk but
/// IHDR, PLTE, IDAT, IEND and APNG frame data: ICC profile, text, EXIF, …) as stored, and its
/// compressed ones (`iCCP`, `zTXt`, `iTXt`) decompressed; a JPEG's APPn and COM segments.
/// Checked before the decoder reads them; real ICC profiles and EXIF blocks are kilobytes.
pub const MAX_ANCILLARY_BYTES: u64 = 8 << 20;

/// What the PNG decoder may allocate besides its row buffers: the ancillary chunks as read
/// (their buffers grow by doubling: up to 2 × [`MAX_ANCILLARY_BYTES`]) plus a compressed one
/// decompressed (up to [`MAX_ANCILLARY_BYTES`]).
pub const ANCILLARY_DECODER_BYTES: u64 = 3 * MAX_ANCILLARY_BYTES;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// A chunk type or marker as text for a message (`iCCP`, or its bytes in hex).
fn chunk_name(kind: &[u8]) -> String {
    if kind.iter().all(u8::is_ascii_alphabetic) {
        String::from_utf8_lossy(kind).into_owned()
    } else {
        kind.iter().map(|b| format!("{b:02X}")).collect()
    }
}

fn ancillary_over(path: &Path, what: String) -> Error {
    bad_image(
        path,
        format!(
            "{what}: over the limit of {MAX_ANCILLARY_BYTES} bytes of ancillary data (ICC \
             profile, text, EXIF, …; refused before decoding)"
        ),
    )
}

/// The zlib stream of a compressed ancillary PNG chunk's data (`None`: not compressed, or not
/// well formed, which the decoder judges).
fn png_zlib_stream<'a>(kind: &[u8], data: &'a [u8]) -> Option<&'a [u8]> {
    let keyword_end = data.iter().position(|&b| b == 0)?;
    let rest = data.get(keyword_end + 1..)?;
    match kind {
        // compression method, stream
        b"iCCP" | b"zTXt" => rest.get(1..),
        // compression flag, method, language tag \0, translated keyword \0, text
        b"iTXt" => {
            if rest.first() != Some(&1) {
                return None;
            }
            let rest = rest.get(2..)?;
            let lang_end = rest.iter().position(|&b| b == 0)?;
            let rest = rest.get(lang_end + 1..)?;
            let tk_end = rest.iter().position(|&b| b == 0)?;
            rest.get(tk_end + 1..)
        }
        _ => None,
    }
}

/// Walk a PNG's chunk headers: refuse ancillary chunks over [`MAX_ANCILLARY_BYTES`] in total,
/// as stored or decompressed, naming the chunk that crosses it; return the IHDR's
/// `(width, height)`. A file that is not a PNG, or whose chunks stop making sense, is left to
/// the decoder.
fn scan_png(path: &Path, bytes: &[u8]) -> Result<Option<Option<(u32, u32)>>> {
    if !bytes.starts_with(&PNG_SIGNATURE) {
        return Ok(None);
    }
    let mut ihdr = None;
    let mut at = PNG_SIGNATURE.len();
    let mut total = 0u64;
    let mut inflated = 0u64;
    while let Some(head) = bytes.get(at..at.saturating_add(8)) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let kind = &head[4..8];
        match kind {
            b"IEND" => break,
            b"IHDR" => {
                if let Some(d) = bytes.get(at.saturating_add(8)..at.saturating_add(16)) {
                    ihdr = Some((
                        u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                        u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                    ));
                }
            }
            // Critical chunks (upper-case first letter) and APNG frame data are image data.
            _ if kind[0].is_ascii_uppercase() || kind == b"fdAT" => {}
            _ => {
                total = total.saturating_add(u64::from(len));
                if total > MAX_ANCILLARY_BYTES {
                    let what = format!(
                        "PNG chunk {} of {len} bytes at byte {at} brings the ancillary data to \
                         {total} bytes",
                        chunk_name(kind)
                    );
                    return Err(ancillary_over(path, what));
                }
                let data = bytes
                    .get(at.saturating_add(8)..at.saturating_add(8).saturating_add(len as usize));
                if let Some(z) = data.and_then(|d| png_zlib_stream(kind, d)) {
                    // Decompressed into at most what is left of the limit (a corrupt stream
                    // is the decoder's to judge).
                    let left = MAX_ANCILLARY_BYTES.saturating_sub(inflated);
                    let left = usize::try_from(left).unwrap_or(usize::MAX);
                    match fdeflate::decompress_to_vec_bounded(z, left) {
                        Ok(v) => inflated = inflated.saturating_add(v.len() as u64),
                        Err(fdeflate::BoundedDecompressionError::OutputTooLarge { .. }) => {
                            let what = format!(
                                "PNG chunk {} of {len} bytes at byte {at} decompresses to more \
                                 than {left} bytes",
                                chunk_name(kind)
                            );
                            return Err(ancillary_over(path, what));
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        // length (4) + type (4) + data + CRC (4)
        at = at.saturating_add(12).saturating_add(len as usize);
    }
    Ok(Some(ihdr))
}

/// Walk a JPEG's marker segments up to the first start-of-scan: refuse APPn and COM segments
/// over [`MAX_ANCILLARY_BYTES`] in total, naming the segment that crosses it.
fn scan_jpeg(path: &Path, bytes: &[u8]) -> Result<()> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(());
    }
    let mut at = 2usize;
    let mut total = 0u64;
    loop {
        // Markers may be preceded by fill bytes 0xFF.
        while let Some([0xFF, 0xFF]) = bytes.get(at..at.saturating_add(2)) {
            at += 1;
        }
        let Some(&[0xFF, marker]) = bytes.get(at..at.saturating_add(2)) else {
            return Ok(());
        };
        match marker {
            0xDA | 0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => {
                at += 2;
                continue;
            }
            _ => {}
        }
        let Some(&[hi, lo]) = bytes.get(at.saturating_add(2)..at.saturating_add(4)) else {
            return Ok(());
        };
        let len = usize::from(hi) << 8 | usize::from(lo);
        if matches!(marker, 0xE0..=0xEF | 0xFE) {
            total = total.saturating_add(len as u64);
            if total > MAX_ANCILLARY_BYTES {
                let name = if marker == 0xFE {
                    "COM".to_string()
                } else {
                    format!("APP{}", marker - 0xE0)
                };
                let what = format!(
                    "JPEG {name} segment of {len} bytes at byte {at} brings the ancillary data \
                     to {total} bytes"
                );
                return Err(ancillary_over(path, what));
            }
        }
        at = at.saturating_add(2).saturating_add(len);
    }
}

/// What an image's header says, read and checked before anything is decoded: the pixel cap
/// ([`max_pixels`]), the JPEG structure checks, ancillary data within
/// [`MAX_ANCILLARY_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub width: u32,
    pub height: u32,
    /// Bytes of the decoder's output buffer: width × height × channels × bytes per sample in
    /// the colour type it decodes to (a 16-bit RGB PNG stays 16-bit: 6 bytes per pixel).
    pub decoded_bytes: u64,
}

fn check_pixels(path: &Path, w: u32, h: u32) -> Result<()> {
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
    Ok(())
}

/// A decoder error; a memory-limit error names the limit.
fn decoder_error(path: &Path, e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(_) => bad_image(
            path,
            format!(
                "the decoder's memory limit of {ANCILLARY_DECODER_BYTES} bytes for ancillary \
                 data (besides the pixels) was exceeded"
            ),
        ),
        e => bad_image(path, e),
    }
}

/// The checked header and a decoder ready to decode the pixels (PNG, JPEG, TIFF). The PNG
/// decoder's own allocations are bounded by its row buffers plus [`ANCILLARY_DECODER_BYTES`]:
/// the pixel cap is checked from the IHDR chunk before the decoder reads any ancillary chunk.
fn open_checked<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(ImageHeader, impl image::ImageDecoder + 'a)> {
    use image::ImageDecoder;
    if bytes.is_empty() {
        return Err(bad_image(path, "empty (0 bytes)"));
    }
    check_jpeg_complete(path, bytes, &bytes[bytes.len().saturating_sub(TAIL)..])?;
    check_jpeg_body(path, bytes)?;
    scan_jpeg(path, bytes)?;
    let mut limits = image::Limits::default();
    if let Some(Some((w, h))) = scan_png(path, bytes)? {
        check_pixels(path, w, h)?;
        // Two rows of the widest pixel (16-bit RGBA) for the decoder's row buffers.
        let rows = (u64::from(w) * 8 + 1) * 2;
        limits.max_alloc = Some(ANCILLARY_DECODER_BYTES + rows + (1 << 20));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| decoder_error(path, e))?;
    let (w, h) = decoder.dimensions();
    check_pixels(path, w, h)?;
    // What the decoder may allocate for the pixels: the header's size, 16-bit RGBA at most
    // (bounds a TIFF decoder's buffers; the PNG decoder keeps its limit from above).
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (1 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| decoder_error(path, e))?;
    let header = ImageHeader {
        width: w,
        height: h,
        decoded_bytes: decoder.total_bytes(),
    };
    Ok((header, decoder))
}

/// Header `(width, height)` with the pixel cap checked, plus the structural JPEG checks.
fn checked_header(path: &Path, bytes: &[u8]) -> Result<(u32, u32)> {
    let (h, _) = open_checked(path, bytes)?;
    Ok((h.width, h.height))
}

/// The checked header of an image held in memory (an HTTP request body), nothing decoded:
/// what [`decode_rgb_bytes`] checks first, and the size of its decoder's output.
pub fn header_of_bytes(label: &str, bytes: &[u8]) -> Result<ImageHeader> {
    let name = Path::new(label);
    check_size(name, bytes)?;
    Ok(open_checked(name, bytes)?.0)
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

/// The checks of a file read ([`MAX_FILE_BYTES`], pixel cap from the header, JPEG structure,
/// ancillary data), then decoding.
fn decode_checked(path: &Path, bytes: &[u8]) -> Result<image::DynamicImage> {
    let (_, decoder) = open_checked(path, bytes)?;
    image::DynamicImage::from_decoder(decoder).map_err(|e| decoder_error(path, e))
}

/// Decode any supported image as 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    Ok(decode(path)?.into_rgb8())
}

/// Decode an image held in memory (an HTTP request body) as 8-bit RGB, with the same checks
/// as a file ([`MAX_FILE_BYTES`], the pixel cap read from the header before decoding, JPEG
/// truncation and zeroed bodies, ancillary data bounded); errors name `label` where a file's
/// would name its path.
pub fn decode_rgb_bytes(label: &str, bytes: &[u8]) -> Result<RgbImage> {
    let name = Path::new(label);
    check_size(name, bytes)?;
    Ok(decode_checked(name, bytes)?.into_rgb8())
}

/// An in-memory image over [`MAX_FILE_BYTES`] is refused as a file would be.
fn check_size(name: &Path, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(bad_image(
            name,
            format!(
                "{} bytes, over the {MAX_FILE_BYTES}-byte limit for an image",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Decode any supported image as 8-bit grey (RGB masks are converted by luma).
pub fn decode_luma(path: &Path) -> Result<GrayImage> {
    Ok(decode(path)?.into_luma8())
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

    /// An 8×8 grey PNG whose compressed iCCP chunk holds `profile` zero bytes.
    fn png_with_icc(profile: usize) -> Vec<u8> {
        use image::ImageEncoder;
        let img = GrayImage::from_pixel(8, 8, image::Luma([7]));
        let mut buf = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut buf);
        enc.set_icc_profile(vec![0u8; profile]).unwrap();
        enc.write_image(img.as_raw(), 8, 8, image::ExtendedColorType::L8)
            .unwrap();
        buf
    }

    /// `png` with a chunk of `kind` holding `len` bytes inserted after IHDR.
    fn png_with_chunk(png: &[u8], kind: &[u8; 4], len: usize) -> Vec<u8> {
        let mut c = Vec::with_capacity(len + 12);
        c.extend_from_slice(&(len as u32).to_be_bytes());
        c.extend_from_slice(kind);
        c.extend(std::iter::repeat_n(b'a', len));
        let crc = crc32(&c[4..]);
        c.extend_from_slice(&crc.to_be_bytes());
        let at = 8 + 25; // signature + IHDR chunk
        [&png[..at], &c[..], &png[at..]].concat()
    }

    #[test]
    fn ancillary_data_is_bounded_naming_the_file_and_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        // A 40 MiB ICC profile compresses to a few tens of KB: refused from the header read
        // (which `data check` and `infer`'s input check use) as well as when decoding.
        let bomb = png_with_icc(40 << 20);
        assert!(bomb.len() < 200_000, "{}", bomb.len());
        let p = dir.path().join("icc-bomb.png");
        std::fs::write(&p, &bomb).unwrap();
        for e in [
            dimensions(&p).unwrap_err().to_string(),
            decode_rgb(&p).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains("icc-bomb.png")
                    && e.contains("PNG chunk iCCP of")
                    && e.contains("decompresses to more than 8388608 bytes")
                    && e.contains(&format!("limit of {MAX_ANCILLARY_BYTES} bytes")),
                "{e}"
            );
        }
        let e = header_of_bytes("request body", &bomb)
            .unwrap_err()
            .to_string();
        assert!(e.contains("request body") && e.contains("iCCP"), "{e}");
        // A 9 MiB text chunk in the file: refused from the chunk walk, naming it.
        let small = png_declaring(8, 8);
        let text = png_with_chunk(&small, b"tEXt", 9 << 20);
        let e = decode_rgb_bytes("request body", &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("request body")
                && e.contains("PNG chunk tEXt of 9437184 bytes at byte 33")
                && e.contains(&format!("over the limit of {MAX_ANCILLARY_BYTES} bytes")),
            "{e}"
        );
        // A JPEG whose APP1 segments add up past the limit.
        let jpeg = noisy_jpeg(16, 16);
        let mut seg = vec![0xFF, 0xE1, 0xFF, 0xFF];
        seg.extend(std::iter::repeat_n(0u8, 0xFFFF - 2));
        let n = (MAX_ANCILLARY_BYTES as usize / 0xFFFF) + 1;
        let big = [&jpeg[..2], &seg.repeat(n), &jpeg[2..]].concat();
        let p = dir.path().join("app1.jpg");
        std::fs::write(&p, &big).unwrap();
        let e = dimensions(&p).unwrap_err().to_string();
        assert!(
            e.contains("app1.jpg") && e.contains("JPEG APP1 segment of 65535 bytes"),
            "{e}"
        );
        assert!(t.elapsed().as_secs_f64() < 10.0);
        // Within the limits: a real-sized profile, a few segments, a wide 16-bit image.
        assert_eq!(
            decode_rgb_bytes("x", &png_with_icc(4096))
                .unwrap()
                .dimensions(),
            (8, 8)
        );
        let few = [&jpeg[..2], &seg.repeat(3), &jpeg[2..]].concat();
        assert_eq!(decode_rgb_bytes("x", &few).unwrap().dimensions(), (16, 16));
        let wide = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            30_000,
            2,
            image::Rgba([1u16, 2, 3, 4]),
        );
        let mut buf = Vec::new();
        image::DynamicImage::ImageRgba16(wide)
            .write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        let h = header_of_bytes("wide", &buf).unwrap();
        assert_eq!(
            (h.width, h.height, h.decoded_bytes),
            (30_000, 2, 30_000 * 2 * 8)
        );
        assert_eq!(
            decode_rgb_bytes("wide", &buf).unwrap().dimensions(),
            (30_000, 2)
        );
    }

    #[test]
    fn the_pixel_cap_can_be_set_but_not_to_zero() {
        assert!(set_max_pixels(0).is_err());
        assert_eq!(max_pixels(), DEFAULT_MAX_PIXELS);
    }
}
