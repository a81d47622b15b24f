//! Pictures a person looks at: line charts of training curves, bar charts of experiment
//! tables, and prediction-vs-truth overlays. Drawn directly into RGB buffers with a built-in
//! 5×7 bitmap font, so no font files or plotting crates are needed. PNGs are written atomically.

use crate::error::{Error, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const GLYPHS: &[(char, [u8; 7])] = &[
    ('0', [14, 17, 19, 21, 25, 17, 14]),
    ('1', [4, 12, 4, 4, 4, 4, 14]),
    ('2', [14, 17, 1, 2, 4, 8, 31]),
    ('3', [31, 2, 4, 2, 1, 17, 14]),
    ('4', [2, 6, 10, 18, 31, 2, 2]),
    ('5', [31, 16, 30, 1, 1, 17, 14]),
    ('6', [6, 8, 16, 30, 17, 17, 14]),
    ('7', [31, 1, 2, 4, 8, 8, 8]),
    ('8', [14, 17, 17, 14, 17, 17, 14]),
    ('9', [14, 17, 17, 15, 1, 2, 12]),
    ('.', [0, 0, 0, 0, 0, 12, 12]),
    (',', [0, 0, 0, 0, 12, 4, 8]),
    ('-', [0, 0, 0, 31, 0, 0, 0]),
    ('+', [0, 4, 4, 31, 4, 4, 0]),
    (':', [0, 12, 12, 0, 12, 12, 0]),
    ('%', [24, 25, 2, 4, 8, 19, 3]),
    ('/', [0, 1, 2, 4, 8, 16, 0]),
    ('(', [2, 4, 8, 8, 8, 4, 2]),
    (')', [8, 4, 2, 2, 2, 4, 8]),
    ('=', [0, 0, 31, 0, 31, 0, 0]),
    ('_', [0, 0, 0, 0, 0, 0, 31]),
    ('A', [14, 17, 17, 31, 17, 17, 17]),
    ('B', [30, 17, 17, 30, 17, 17, 30]),
    ('C', [14, 17, 16, 16, 16, 17, 14]),
    ('D', [28, 18, 17, 17, 17, 18, 28]),
    ('E', [31, 16, 16, 30, 16, 16, 31]),
    ('F', [31, 16, 16, 30, 16, 16, 16]),
    ('G', [14, 17, 16, 23, 17, 17, 15]),
    ('H', [17, 17, 17, 31, 17, 17, 17]),
    ('I', [14, 4, 4, 4, 4, 4, 14]),
    ('J', [7, 2, 2, 2, 2, 18, 12]),
    ('K', [17, 18, 20, 24, 20, 18, 17]),
    ('L', [16, 16, 16, 16, 16, 16, 31]),
    ('M', [17, 27, 21, 21, 17, 17, 17]),
    ('N', [17, 17, 25, 21, 19, 17, 17]),
    ('O', [14, 17, 17, 17, 17, 17, 14]),
    ('P', [30, 17, 17, 30, 16, 16, 16]),
    ('Q', [14, 17, 17, 17, 21, 18, 13]),
    ('R', [30, 17, 17, 30, 20, 18, 17]),
    ('S', [15, 16, 16, 14, 1, 1, 30]),
    ('T', [31, 4, 4, 4, 4, 4, 4]),
    ('U', [17, 17, 17, 17, 17, 17, 14]),
    ('V', [17, 17, 17, 17, 17, 10, 4]),
    ('W', [17, 17, 17, 21, 21, 21, 10]),
    ('X', [17, 17, 10, 4, 10, 17, 17]),
    ('Y', [17, 17, 10, 4, 4, 4, 4]),
    ('Z', [31, 1, 2, 4, 8, 16, 31]),
];

/// Colours for series, in order.
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

fn glyph(c: char) -> Option<[u8; 7]> {
    let c = c.to_ascii_uppercase();
    GLYPHS.iter().find(|(g, _)| *g == c).map(|(_, b)| *b)
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// Draw `text` with its top-left at (x, y), each font pixel `scale`×`scale`.
pub fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        let ox = x + i as i64 * 6 * scale;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (16 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, ox + col * scale + dx, y + r as i64 * scale + dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `s` drawn at `scale`.
pub fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale
}

/// A line from (x0, y0) to (x1, y1), `thick` pixels wide.
pub fn line(img: &mut RgbImage, p0: (f64, f64), p1: (f64, f64), thick: i64, c: [u8; 3]) {
    let n = ((p1.0 - p0.0).abs().max((p1.1 - p0.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let x = (p0.0 + t * (p1.0 - p0.0)).round() as i64;
        let y = (p0.1 + t * (p1.1 - p0.1)).round() as i64;
        for dy in 0..thick {
            for dx in 0..thick {
                put(img, x + dx - thick / 2, y + dy - thick / 2, c);
            }
        }
    }
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.1E}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A named series of (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Draw a line chart with axes, 5 ticks per axis, a title and a legend.
pub fn line_chart(title: &str, x_label: &str, series: &[Series<'_>], w: u32, h: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (90.0, 20.0, 40.0, 50.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    text(&mut img, left as i64, 12, title, 2, [0, 0, 0]);
    if pts.is_empty() {
        text(
            &mut img,
            left as i64,
            h as i64 / 2,
            "NO DATA",
            2,
            [120, 120, 120],
        );
        return img;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
        y0 -= 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let pw = w as f64 - left - right;
    let ph = h as f64 - top - bottom;
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let axis = [60, 60, 60];
    let grid = [225, 225, 225];
    for i in 0..=4 {
        let t = i as f64 / 4.0;
        let yv = y0 + t * (y1 - y0);
        let yp = sy(yv);
        line(&mut img, (left, yp), (left + pw, yp), 1, grid);
        let l = fmt_tick(yv);
        text(
            &mut img,
            left as i64 - 8 - text_width(&l, 1),
            yp as i64 - 3,
            &l,
            1,
            axis,
        );
        let xv = x0 + t * (x1 - x0);
        let xp = sx(xv);
        line(&mut img, (xp, top), (xp, top + ph), 1, grid);
        let l = fmt_tick(xv);
        text(
            &mut img,
            xp as i64 - text_width(&l, 1) / 2,
            (top + ph) as i64 + 8,
            &l,
            1,
            axis,
        );
    }
    line(&mut img, (left, top), (left, top + ph), 1, axis);
    line(&mut img, (left, top + ph), (left + pw, top + ph), 1, axis);
    text(
        &mut img,
        (left + pw / 2.0) as i64 - text_width(x_label, 1) / 2,
        (top + ph) as i64 + 26,
        x_label,
        1,
        axis,
    );
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let p = (sx(x), sy(y));
            if let Some(q) = prev {
                line(&mut img, q, p, 2, c);
            }
            if s.points.len() < 60 {
                line(&mut img, (p.0 - 1.0, p.1), (p.0 + 1.0, p.1), 3, c);
            }
            prev = Some(p);
        }
        let ly = top as i64 + 6 + i as i64 * 14;
        let lx = (left + pw) as i64 - 10 - text_width(s.name, 1) - 20;
        line(
            &mut img,
            (lx as f64, ly as f64 + 3.0),
            (lx as f64 + 14.0, ly as f64 + 3.0),
            3,
            c,
        );
        text(&mut img, lx + 20, ly, s.name, 1, [0, 0, 0]);
    }
    img
}

/// Horizontal bar chart of labelled values (e.g. mDice per method).
pub fn bar_chart(title: &str, bars: &[(String, f64)], w: u32) -> RgbImage {
    let row = 26u32;
    let h = 50 + row * bars.len() as u32 + 10;
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    text(&mut img, 10, 12, title, 2, [0, 0, 0]);
    let label_w = bars
        .iter()
        .map(|(l, _)| text_width(l, 1))
        .max()
        .unwrap_or(0)
        + 20;
    let max = bars
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let bar_space = w as i64 - label_w - 90;
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 50 + i as i64 * row as i64;
        text(&mut img, 10, y + 6, label, 1, [0, 0, 0]);
        let len = if v.is_finite() {
            ((v / max) * bar_space as f64).max(0.0) as i64
        } else {
            0
        };
        let c = PALETTE[i % PALETTE.len()];
        for yy in y..y + row as i64 - 8 {
            for xx in label_w..label_w + len {
                put(&mut img, xx, yy, c);
            }
        }
        text(
            &mut img,
            label_w + len + 6,
            y + 6,
            &fmt_tick(*v),
            1,
            [0, 0, 0],
        );
    }
    img
}

/// What the colours of an overlay mean ([`overlay`]), for the pages that show overlays.
pub const OVERLAY_LEGEND_HTML: &str = "<p class=\"legend\">\
<span style=\"background:#00dc00;padding:0 .8em;margin-right:.3em\"></span>predicted and true (TP) \
<span style=\"background:#e60000;padding:0 .8em;margin:0 .3em 0 1em\"></span>predicted, not true (FP) \
<span style=\"background:#0050ff;padding:0 .8em;margin:0 .3em 0 1em\"></span>missed (FN); \
blended at 45% over the image</p>";

/// Overlay a prediction and a ground truth on an RGB image (`[h*w*3]` u8): true positives green,
/// false positives red, false negatives blue, blended at 45%.
pub fn overlay(rgb: &[u8], w: u32, h: u32, pred: &[u8], gt: Option<&[u8]>) -> Result<RgbImage> {
    let n = (w * h) as usize;
    if rgb.len() != n * 3 || pred.len() != n || gt.is_some_and(|g| g.len() != n) {
        return Err(Error::msg(format!(
            "overlay: buffers do not match a {w}×{h} image"
        )));
    }
    let mut img = RgbImage::new(w, h);
    for i in 0..n {
        let p = pred[i] != 0;
        let t = gt.map(|g| g[i] != 0);
        let tint: Option<[u8; 3]> = match (p, t) {
            (true, Some(true)) | (true, None) => Some([0, 220, 0]),
            (true, Some(false)) => Some([230, 0, 0]),
            (false, Some(true)) => Some([0, 80, 255]),
            _ => None,
        };
        let mut px = [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]];
        if let Some(c) = tint {
            for k in 0..3 {
                px[k] = (0.55 * px[k] as f32 + 0.45 * c[k] as f32) as u8;
            }
        }
        img.put_pixel((i as u32) % w, (i as u32) / w, Rgb(px));
    }
    Ok(img)
}

/// Save an image as PNG atomically.
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("{}: PNG encoding failed: {e}", path.display())))?;
    crate::util::fs::write_atomic(path, buf.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_series_pixels_and_overlay_colours_errors() {
        let s = [Series {
            name: "loss",
            points: (0..10).map(|i| (i as f64, (10 - i) as f64)).collect(),
        }];
        let img = line_chart("LOSS", "STEP", &s, 400, 300);
        let c = PALETTE[0];
        let coloured = img.pixels().filter(|p| p.0 == c).count();
        assert!(coloured > 100, "{coloured}");
        let rgb = vec![100u8; 2 * 2 * 3];
        let o = overlay(&rgb, 2, 2, &[1, 1, 0, 0], Some(&[1, 0, 1, 0])).unwrap();
        assert!(o.get_pixel(0, 0).0[1] > o.get_pixel(0, 0).0[0]); // TP green
        assert!(o.get_pixel(1, 0).0[0] > o.get_pixel(1, 0).0[1]); // FP red
        assert!(o.get_pixel(0, 1).0[2] > o.get_pixel(0, 1).0[0]); // FN blue
        assert_eq!(o.get_pixel(1, 1).0, [100, 100, 100]);
        assert!(overlay(&rgb, 3, 2, &[0; 6], None).is_err());
    }
}
