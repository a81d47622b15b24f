//! Depthwise 2-D convolution (stride 1, zero padding, one `k×k` filter per channel) for
//! ConvNeXt's `conv_dw`, as PyTorch's `nn.Conv2d(C, C, k, padding=p, groups=C)`.
//!
//! Why not Candle's `conv2d(groups = C)`: it splits the input into C one-channel convs and
//! concatenates them. Its gradient is correct (gradchecked in `models::convnext`), but the
//! backward of the split pads every channel's gradient back to the full tensor, so a backward
//! pass costs O(C²·H·W) — for ConvNeXt-B's stage 1 at batch 8, 15 s against 0.6 s forward
//! (measured on this 2-core machine, see the report in the commit history).
//!
//! Two implementations, same numbers:
//! - on CPU, a Candle custom op with explicit forward and backward kernels (rayon over
//!   channel planes; the input gradient is the same correlation with the flipped kernel,
//!   the weight gradient a per-channel sum of shifted products);
//! - elsewhere (CUDA), [`depthwise_conv2d_shift`]: the sum of k² shifted slices of the padded
//!   input, each scaled per channel — only `pad`, `narrow`, `broadcast_mul`, `add`, whose
//!   backward Candle implements (linear cost, more memory traffic).
//!
//! Both are gradchecked against finite differences and compared with Candle's grouped conv.

use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `x: [N, C, H, W]`, `w: [C, 1, k, k]`, `b: [C]` →
/// `[N, C, H + 2·pad − k + 1, W + 2·pad − k + 1]`; equals `conv2d(x, w, padding = pad,
/// groups = C) + b`. Differentiable w.r.t. `x`, `w` and `b`.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, pad: usize) -> Result<Tensor> {
    let (c, _) = check(x, w, pad)?;
    let float = matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype();
    if !(matches!(x.device(), Device::Cpu) && float) {
        return depthwise_conv2d_shift(x, w, b, pad);
    }
    let y = x
        .contiguous()?
        .apply_op2(&w.contiguous()?, DwOp::Corr { pad, flip: false })?;
    match b {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?),
        None => Ok(y),
    }
}

/// [`depthwise_conv2d`] as a sum of shifted, per-channel-scaled slices of the zero-padded
/// input (device-agnostic; used off the CPU). Same shapes and result.
pub fn depthwise_conv2d_shift(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    pad: usize,
) -> Result<Tensor> {
    let (c, k) = check(x, w, pad)?;
    let (_, _, h, wd) = x.dims4()?;
    let (oh, ow) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
    let xp = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let taps = w.reshape((c, k * k))?;
    let mut acc: Option<Tensor> = None;
    for i in 0..k {
        let rows = xp.narrow(2, i, oh)?;
        for j in 0..k {
            let tap = taps.narrow(1, i * k + j, 1)?.reshape((1, c, 1, 1))?;
            let term = rows.narrow(3, j, ow)?.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    let y = acc.ok_or_else(|| Error::msg("depthwise conv with an empty kernel"))?;
    match b {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?),
        None => Ok(y),
    }
}

/// Validate shapes; returns `(C, k)`.
fn check(x: &Tensor, w: &Tensor, pad: usize) -> Result<(usize, usize)> {
    let (_, c, h, wd) = x.dims4()?;
    let (wc, one, k, k2) = w.dims4()?;
    if wc != c || one != 1 || k != k2 || k == 0 || pad >= k || h + 2 * pad < k || wd + 2 * pad < k {
        return Err(Error::msg(format!(
            "depthwise conv: input {:?} does not fit kernel {:?} with padding {pad}",
            x.dims(),
            w.dims()
        )));
    }
    Ok((c, k))
}

/// The CPU kernels. `Corr`: `y[n,c,i,j] = Σ_{a,b} w[c,a,b]·x[n,c,i+a−pad, j+b−pad]` (with the
/// kernel flipped when `flip`); `GradW`: `(x, gy) → gw[c,0,a,b] = Σ_{n,i,j} gy[n,c,i,j]·
/// x[n,c,i+a−pad, j+b−pad]` for a `k×k` kernel.
#[derive(Debug, Clone, Copy)]
enum DwOp {
    Corr { pad: usize, flip: bool },
    GradW { pad: usize, k: usize },
}

fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("depthwise conv: {what} is not contiguous"))
    })?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Output range `[lo, hi)` of positions `o` for which `o + a − pad` lies in `0..len`.
fn valid(len: usize, out: usize, a: usize, pad: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(a);
    let hi = (len + pad).saturating_sub(a).min(out);
    (lo.min(hi), hi)
}

#[allow(clippy::too_many_arguments)]
fn corr<T: WithDType>(
    x: &[T],
    w: &[T],
    (n, c, h, wd): (usize, usize, usize, usize),
    k: usize,
    pad: usize,
    flip: bool,
) -> Vec<T> {
    let (oh, ow) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
    let mut y = vec![T::zero(); n * c * oh * ow];
    y.par_chunks_mut(oh * ow).enumerate().for_each(|(p, out)| {
        let ch = p % c;
        let xin = &x[p * h * wd..(p + 1) * h * wd];
        let ker = &w[ch * k * k..(ch + 1) * k * k];
        for a in 0..k {
            let (i0, i1) = valid(h, oh, a, pad);
            for b in 0..k {
                let (j0, j1) = valid(wd, ow, b, pad);
                if i0 >= i1 || j0 >= j1 {
                    continue;
                }
                let wv = if flip {
                    ker[(k - 1 - a) * k + (k - 1 - b)]
                } else {
                    ker[a * k + b]
                };
                for i in i0..i1 {
                    let src = (i + a - pad) * wd + (j0 + b - pad);
                    let row = &xin[src..src + (j1 - j0)];
                    let dst = &mut out[i * ow + j0..i * ow + j1];
                    for (d, &s) in dst.iter_mut().zip(row) {
                        *d += wv * s;
                    }
                }
            }
        }
    });
    y
}

fn grad_w<T: WithDType>(
    x: &[T],
    gy: &[T],
    (n, c, h, wd): (usize, usize, usize, usize),
    k: usize,
    pad: usize,
) -> Vec<T> {
    let (oh, ow) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
    let mut gw = vec![T::zero(); c * k * k];
    gw.par_chunks_mut(k * k).enumerate().for_each(|(ch, g)| {
        for img in 0..n {
            let p = img * c + ch;
            let xin = &x[p * h * wd..(p + 1) * h * wd];
            let go = &gy[p * oh * ow..(p + 1) * oh * ow];
            for a in 0..k {
                let (i0, i1) = valid(h, oh, a, pad);
                for b in 0..k {
                    let (j0, j1) = valid(wd, ow, b, pad);
                    if i0 >= i1 || j0 >= j1 {
                        continue;
                    }
                    let mut s = T::zero();
                    for i in i0..i1 {
                        let src = (i + a - pad) * wd + (j0 + b - pad);
                        let row = &xin[src..src + (j1 - j0)];
                        let gr = &go[i * ow + j0..i * ow + j1];
                        for (&u, &v) in row.iter().zip(gr) {
                            s += u * v;
                        }
                    }
                    g[a * k + b] += s;
                }
            }
        }
    });
    gw
}

impl DwOp {
    fn run<T: WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice::<T>(s1, l1, "input")?;
        let b = slice::<T>(s2, l2, "second operand")?;
        let (n, c, h, wd) = l1.shape().dims4()?;
        match *self {
            DwOp::Corr { pad, flip } => {
                let k = l2.shape().dims4()?.2;
                let y = corr(a, b, (n, c, h, wd), k, pad, flip);
                let (oh, ow) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
                Ok((T::to_cpu_storage_owned(y), Shape::from((n, c, oh, ow))))
            }
            DwOp::GradW { pad, k } => {
                let g = grad_w(a, b, (n, c, h, wd), k, pad);
                Ok((T::to_cpu_storage_owned(g), Shape::from((c, 1, k, k))))
            }
        }
    }
}

impl CustomOp2 for DwOp {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>(s1, l1, s2, l2),
            CpuStorage::F64(_) => self.run::<f64>(s1, l1, s2, l2),
            _ => Err(candle_core::Error::Msg(
                "depthwise conv: only f32/f64 on CPU".into(),
            )),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let DwOp::Corr { pad, flip: false } = *self else {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        };
        let k = w.dim(2)?;
        let gy = gy.contiguous()?;
        let gx = gy.apply_op2_no_bwd(
            w,
            &DwOp::Corr {
                pad: k - 1 - pad,
                flip: true,
            },
        )?;
        let gw = x.apply_op2_no_bwd(&gy, &DwOp::GradW { pad, k })?;
        Ok((Some(gx), Some(gw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::randn(shape, seed, candle_core::DType::F64).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::nn::gradcheck::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn both_implementations_match_candle_grouped_conv_and_gradcheck() {
        for (shape, k, pad) in [
            ([2, 3, 6, 5], 3, 1),
            ([1, 4, 3, 4], 7, 3),
            ([2, 2, 2, 2], 7, 3),
            ([1, 2, 1, 3], 7, 3),
            ([2, 2, 5, 5], 3, 0),
        ] {
            let c = shape[1];
            let x = rand(&shape, 1);
            let w = rand(&[c, 1, k, k], 2);
            let b = rand(&[c], 3);
            let want = x
                .conv2d(&w, pad, 1, 1, c)
                .unwrap()
                .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
                .unwrap();
            let ours = depthwise_conv2d(&x, &w, Some(&b), pad).unwrap();
            let shift = depthwise_conv2d_shift(&x, &w, Some(&b), pad).unwrap();
            assert!(max_diff(&ours, &want) < 1e-12, "{shape:?} k{k}");
            assert!(max_diff(&shift, &want) < 1e-12, "{shape:?} k{k}");
            type F = fn(&Tensor, &Tensor, Option<&Tensor>, usize) -> Result<Tensor>;
            for (name, f) in [
                ("custom op", depthwise_conv2d as F),
                ("shift", depthwise_conv2d_shift as F),
            ] {
                let e = gradcheck::check(&x, 20, 0, |x| f(x, &w, Some(&b), pad)).unwrap();
                assert!(e < 1e-6, "{name} wrt x {e}");
                let e = gradcheck::check(&w, 20, 1, |w| f(&x, w, None, pad)).unwrap();
                assert!(e < 1e-6, "{name} wrt w {e}");
            }
            // Candle's grouped conv: correct gradient (slow backward, see module docs).
            let e = gradcheck::check(&x, 10, 0, |x| Ok(x.conv2d(&w, pad, 1, 1, c)?)).unwrap();
            assert!(e < 1e-6, "candle grouped wrt x {e}");
            let e = gradcheck::check(&w, 10, 0, |w| Ok(x.conv2d(w, pad, 1, 1, c)?)).unwrap();
            assert!(e < 1e-6, "candle grouped wrt w {e}");
        }
    }

    #[test]
    fn f32_and_bad_shapes() {
        let x = rand(&[1, 2, 4, 4], 4).to_dtype(DType::F32).unwrap();
        let w = rand(&[2, 1, 3, 3], 5).to_dtype(DType::F32).unwrap();
        let a = depthwise_conv2d(&x, &w, None, 1).unwrap();
        let b = x.conv2d(&w, 1, 1, 1, 2).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        // Non-contiguous input is made contiguous, not rejected.
        let xt = x.transpose(2, 3).unwrap();
        let a = depthwise_conv2d(&xt, &w, None, 1).unwrap();
        let b = xt.contiguous().unwrap().conv2d(&w, 1, 1, 1, 2).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(depthwise_conv2d(&x, &rand(&[3, 1, 3, 3], 1), None, 1).is_err());
    }
}
