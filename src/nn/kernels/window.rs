//! SAM's window partition and its inverse as one CPU op each (`window_partition` /
//! `window_unpartition` of Meta's `image_encoder.py`).
//!
//! Composed from Candle ops, a partition is pad → reshape → permute → copy → reshape and the
//! inverse reshape → permute → copy → reshape → narrow → copy: five to seven graph nodes per
//! windowed block and direction, each of which backward sums into Candle's gradient store with
//! a fresh zero tensor and an add (a full pass over the activation per node). Here each
//! direction is one op whose forward is one copy pass (zeros for the padding) and whose
//! backward is the other direction's forward. Values are moved, never combined, so the
//! result equals the composed ops exactly; tests check both and the gradients.

use super::base::{data, Fl};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The geometry of one partition: image `[b, h, w, c]`, windows of `ws × ws`, padded to
/// `(hp, wp)` (multiples of `ws`).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
    hp: usize,
    wp: usize,
}

impl Geometry {
    fn windows_per_image(&self) -> usize {
        (self.hp / self.ws) * (self.wp / self.ws)
    }

    /// Copy between the image (`[b, h, w, c]`) and the windows (`[b·nw, ws, ws, c]`): to the
    /// windows (padding zero) when `to_windows`, else back (padding dropped).
    fn copy<T: Fl>(&self, src: &[T], to_windows: bool) -> Vec<T> {
        let Geometry {
            b, h, w, c, ws, wp, ..
        } = *self;
        let nw_w = wp / ws;
        let per_window = ws * ws * c;
        if to_windows {
            let mut dst = vec![T::ZERO; b * self.windows_per_image() * per_window];
            dst.par_chunks_mut(per_window.max(1))
                .enumerate()
                .for_each(|(wi, out)| {
                    let (img, win) = (wi / self.windows_per_image(), wi % self.windows_per_image());
                    let (y0, x0) = ((win / nw_w) * ws, (win % nw_w) * ws);
                    for dy in 0..ws.min(h.saturating_sub(y0)) {
                        let cols = ws.min(w.saturating_sub(x0));
                        let s = ((img * h + y0 + dy) * w + x0) * c;
                        let d = dy * ws * c;
                        out[d..d + cols * c].copy_from_slice(&src[s..s + cols * c]);
                    }
                });
            dst
        } else {
            let mut dst = vec![T::ZERO; b * h * w * c];
            // One output image row per task.
            dst.par_chunks_mut((w * c).max(1))
                .enumerate()
                .for_each(|(row, out)| {
                    let (img, y) = (row / h, row % h);
                    let (wy, dy) = (y / ws, y % ws);
                    for wx in 0..nw_w {
                        let x0 = wx * ws;
                        let cols = ws.min(w.saturating_sub(x0));
                        let win = img * self.windows_per_image() + wy * nw_w + wx;
                        let s = win * per_window + dy * ws * c;
                        out[x0 * c..(x0 + cols) * c].copy_from_slice(&src[s..s + cols * c]);
                    }
                });
            dst
        }
    }
}

/// The op: partition (`to_windows`) or its inverse.
struct WindowOp {
    g: Geometry,
    to_windows: bool,
}

impl WindowOp {
    fn out_shape(&self) -> Shape {
        let g = self.g;
        if self.to_windows {
            Shape::from((g.b * g.windows_per_image(), g.ws, g.ws, g.c))
        } else {
            Shape::from((g.b, g.h, g.w, g.c))
        }
    }

    fn in_shape(&self) -> Shape {
        WindowOp {
            g: self.g,
            to_windows: !self.to_windows,
        }
        .out_shape()
    }
}

impl CustomOp1 for WindowOp {
    fn name(&self) -> &'static str {
        if self.to_windows {
            "window-partition"
        } else {
            "window-unpartition"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l.shape() != &self.in_shape() {
            candle_core::bail!(
                "{}: input {:?}, expected {:?}",
                self.name(),
                l.shape(),
                self.in_shape()
            );
        }
        let st = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.g.copy(data::<f32>(s, l)?, self.to_windows)),
            CpuStorage::F64(_) => CpuStorage::F64(self.g.copy(data::<f64>(s, l)?, self.to_windows)),
            _ => candle_core::bail!("{}: only f32 and f64 are supported", self.name()),
        };
        Ok((st, self.out_shape()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = WindowOp {
            g: self.g,
            to_windows: !self.to_windows,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// `[B, H, W, C]` → (`[B·nw, ws, ws, C]`, padded `(Hp, Wp)`), zero padding at the
/// bottom/right: one op (CPU, f32/f64; the caller checks [`super::base::use_fused`]).
pub fn partition(x: &Tensor, ws: usize) -> candle_core::Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    if ws == 0 {
        candle_core::bail!("window-partition: window size 0");
    }
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let op = WindowOp {
        g: Geometry {
            b,
            h,
            w,
            c,
            ws,
            hp,
            wp,
        },
        to_windows: true,
    };
    Ok((x.contiguous()?.apply_op1(op)?, (hp, wp)))
}

/// Inverse of [`partition`]: `[B·nw, ws, ws, C]` → `[B, H, W, C]`, the padding cropped.
pub fn unpartition(
    windows: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (n, ws1, ws2, c) = windows.dims4()?;
    let per_image = hp
        .checked_div(ws)
        .zip(wp.checked_div(ws))
        .map_or(0, |(a, b)| a.saturating_mul(b));
    if ws == 0
        || ws1 != ws
        || ws2 != ws
        || hp % ws != 0
        || wp % ws != 0
        || h > hp
        || w > wp
        || per_image == 0
        || n % per_image != 0
    {
        candle_core::bail!(
            "window-unpartition: windows {:?} do not tile a padded {hp}×{wp} image of {h}×{w} \
             with windows of {ws}",
            windows.dims()
        );
    }
    let op = WindowOp {
        g: Geometry {
            b: n / per_image,
            h,
            w,
            c,
            ws,
            hp,
            wp,
        },
        to_windows: false,
    };
    windows.contiguous()?.apply_op1(op)
}
