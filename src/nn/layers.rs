//! Differentiable layers built on [`Param`]s, restricted to Candle ops whose backward is
//! verified (see `shared/notes/candle.md`): no Candle `layer_norm` / `softmax_last_dim`, no
//! `upsample_bilinear2d`. Each layer fetches its params from a [`ParamStore`] under the
//! reference (PyTorch) names, so official checkpoints map by name.
//!
//! This is where a layer chooses between a CPU kernel of [`super::kernels`] (where
//! [`use_fused`]: CPU, f32/f64, not in [reference mode](super::kernels::with_reference_path))
//! and the composed Candle ops the kernels are tested against (CUDA, bf16/f16, the reference
//! path): softmax, layer norm and GELU ([`super::kernels::fused`]) and every linear
//! ([`super::kernels::sparse_grad`]).

use super::kernels::sparse_grad::LinearCarrier;
use super::kernels::{fused, reference_path, use_fused};
use super::param::{Init, Param, ParamStore};
use super::precision::{autocast, is_low, upcast};
use crate::error::Result;
use candle_core::{Device, Tensor, D};

/// `nn.Linear`: `y = x·Wᵀ + b`, `W: [out, in]`, any leading dims.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
}

impl Linear {
    /// Fetch `weight` `[out, in]` (and `bias` `[out]`) under `vs`, PyTorch default init.
    pub fn new(vs: &ParamStore, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let weight = vs.get(&[out_dim, in_dim], "weight", Init::Uniform(bound))?;
        let bias = if bias {
            Some(vs.get(&[out_dim], "bias", Init::Uniform(bound))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x: [..., in] → [..., out]`. On CPU, a frozen or GPS-sparse weight skips its dense
    /// weight gradient in backward (see [`super::kernels::sparse_grad`]); in
    /// [reference mode](super::kernels::with_reference_path) this is [`Self::forward_dense`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if reference_path() {
            return self.forward_dense(x);
        }
        matmul_weight_t(x, &self.weight, self.bias.as_ref())
    }
}

/// `x · Wᵀ (+ b)` for `x: [..., in]`, a weight param viewed as `[out, in]` (trailing dims
/// flattened, e.g. a conv kernel `[out, c, kh, kw]` as `[out, c·kh·kw]`) and an optional bias
/// `[out]` → `[..., out]`. On CPU (outside reference mode) this is one carrier op
/// ([`super::kernels::sparse_grad`]) on `x` as it is (no reshape nodes): a frozen weight gets no
/// weight gradient, a GPS-sparse one only its selected entries', a trainable one the dense
/// `dW`, and the bias is folded into the same op; elsewhere a plain matmul and broadcast add
/// on `x` viewed as `[rows, in]`.
/// A bf16/f16 `x` gets the weight and bias cast to its dtype ([`autocast`]) and a plain
/// matmul, whose gradient reaches the f32 weight (or sparse delta) through the cast.
pub fn matmul_weight_t(x: &Tensor, weight: &Param, bias: Option<&Param>) -> Result<Tensor> {
    let w = weight.tensor()?;
    let out_dim = w.dim(0)?;
    let w = w.reshape((out_dim, w.elem_count() / out_dim.max(1)))?;
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().unwrap_or(&0);
    let mut out_dims = dims.clone();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    // The plain path: `[rows, in] · Wᵀ (+ b)`, reshaped back to `[..., out]`.
    let plain = |w: Tensor| -> Result<Tensor> {
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = if dims.len() == 2 {
            x.clone()
        } else {
            x.reshape((rows, in_dim))?
        };
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&autocast(b.tensor()?, y.dtype())?)?;
        }
        Ok(if dims.len() == 2 {
            y
        } else {
            y.reshape(out_dims.as_slice())?
        })
    };
    if w.dtype() != x.dtype() {
        return plain(autocast(w, x.dtype())?);
    }
    if !use_fused(x) || dims.is_empty() {
        return plain(w);
    }
    // Every weight goes through the carrier op, with the bias folded in (a frozen bias held
    // by the op, a trainable one as an input with its own gradient): one graph node, the
    // dense weight gradient only for a trainable weight, GPS-sparse ones at their entries.
    let (sparse, dense) = match weight {
        Param::Sparse(s) => (Some(s), None),
        Param::Trainable(_) => (None, Some(&w)),
        // A frozen weight without a bias on an untracked input (inference) is a plain matmul.
        Param::Frozen(_) if !x.track_op() && bias.is_none() => return plain(w),
        Param::Frozen(_) => (None, None),
    };
    let x = x.contiguous()?;
    let (frozen_bias, trainable_bias) = match bias {
        Some(Param::Frozen(b)) => (Some(b.contiguous()?), None),
        Some(b) => (None, Some(b.tensor()?.contiguous()?)),
        None => (None, None),
    };
    let second = match (sparse, dense) {
        (Some(s), _) => Some(s.delta.as_tensor().clone()),
        (None, Some(w)) => Some(w.contiguous()?),
        (None, None) => None,
    };
    let op = LinearCarrier {
        w: w.detach().contiguous()?,
        frozen_bias,
        sparse: sparse.map(|s| (s.rows.clone(), s.cols.clone())),
        dense_weight: dense.is_some(),
        trainable_bias: trainable_bias.is_some(),
    };
    Ok(match (second, trainable_bias) {
        (None, None) => x.apply_op1(op)?,
        (Some(s), None) => x.apply_op2(&s, op)?,
        (None, Some(b)) => x.apply_op2(&b, op)?,
        (Some(s), Some(b)) => x.apply_op3(&s, &b, op)?,
    })
}

impl Linear {
    /// Plain `x·Wᵀ + b` through Candle's matmul (dense weight gradient always computed): the
    /// reference the fast path is tested and benchmarked against.
    pub fn forward_dense(&self, x: &Tensor) -> Result<Tensor> {
        let w = autocast(self.weight.tensor()?, x.dtype())?;
        let y = x.broadcast_matmul(&w.t()?)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&autocast(b.tensor()?, y.dtype())?)?),
            None => Ok(y),
        }
    }
}

/// `nn.Conv2d` (NCHW), weight `[out, in/groups, kh, kw]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vs: &ParamStore,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = in_ch / groups * kernel * kernel;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weight = vs.get(
            &[out_ch, in_ch / groups, kernel, kernel],
            "weight",
            Init::Uniform(bound),
        )?;
        let bias = if bias {
            Some(vs.get(&[out_ch], "bias", Init::Uniform(bound))?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
            groups,
        })
    }

    /// `x: [N, in, H, W] → [N, out, H', W']`. On CPU (outside reference mode) an ungrouped
    /// conv whose kernel equals its stride (patchify) or whose stride is 1 runs as
    /// im2col + [`matmul_weight_t`], so frozen / GPS-sparse kernels skip the dense weight
    /// gradient (and Candle's slow conv weight-gradient kernel is avoided).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dims().get(2).copied().unwrap_or(1);
        let im2col = x.device().is_cpu()
            && !reference_path()
            && self.groups == 1
            && ((k == self.stride && self.padding == 0) || self.stride == 1);
        if im2col {
            return self.forward_im2col(x, k);
        }
        self.forward_conv(x)
    }

    /// Candle's `conv2d` (the reference path).
    pub fn forward_conv(&self, x: &Tensor) -> Result<Tensor> {
        let w = autocast(self.weight.tensor()?, x.dtype())?;
        let y = x.conv2d(&w, self.padding, self.stride, 1, self.groups)?;
        match &self.bias {
            Some(b) => {
                let b = autocast(b.tensor()?, y.dtype())?;
                let c = b.dim(0)?;
                Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
            }
            None => Ok(y),
        }
    }
}

impl Conv2d {
    /// im2col: patches `[N·H'·W', in·k·k]` (column order `(c, ky, kx)` as the kernel's) times
    /// the kernel viewed as `[out, in·k·k]`.
    fn forward_im2col(&self, x: &Tensor, k: usize) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let out_ch = self.weight.dims()[0];
        let (cols, oh, ow) = if k == self.stride && self.padding == 0 {
            let (oh, ow) = (h / k, w / k);
            let x = x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)?;
            let cols = x
                .reshape((n, c, oh, k, ow, k))?
                .permute((0, 2, 4, 1, 3, 5))?
                .contiguous()?
                .reshape((n * oh * ow, c * k * k))?;
            (cols, oh, ow)
        } else {
            // stride 1
            let p = self.padding;
            let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
            let (oh, ow) = (
                (h + 2 * p + 1).saturating_sub(k),
                (w + 2 * p + 1).saturating_sub(k),
            );
            let mut taps = Vec::with_capacity(k * k);
            for ky in 0..k {
                for kx in 0..k {
                    taps.push(xp.narrow(2, ky, oh)?.narrow(3, kx, ow)?);
                }
            }
            let cols = Tensor::stack(&taps, 2)? // [n, c, k·k, oh, ow]
                .permute((0, 3, 4, 1, 2))?
                .contiguous()?
                .reshape((n * oh * ow, c * k * k))?;
            (cols, oh, ow)
        };
        let y = matmul_weight_t(&cols, &self.weight, self.bias.as_ref())?; // [n·oh·ow, out]
        Ok(y.reshape((n, oh, ow, out_ch))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

impl Conv2d {
    /// The same convolution on channels-last input: `x: [N, H, W, C] → [N, H', W', out]`
    /// (stride 1, `groups` 1). im2col without a layout change: a 1×1 kernel is the matmul
    /// itself; a k×k kernel stacks its k² taps on a new last axis, so each row of the patches
    /// `[N·H'·W', C·k·k]` is in the kernel's `(c, ky, kx)` order already. Weight and bias go
    /// through [`matmul_weight_t`] (frozen, GPS-sparse or trainable, as in [`Conv2d::forward`]).
    pub fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let k = self.weight.dims().get(2).copied().unwrap_or(1);
        let out_ch = self.weight.dims()[0];
        if self.stride != 1 || self.groups != 1 {
            return Err(crate::error::Error::msg(format!(
                "channels-last conv: stride {} groups {} (only stride 1, groups 1)",
                self.stride, self.groups
            )));
        }
        let p = self.padding;
        let (oh, ow) = (
            (h + 2 * p + 1).saturating_sub(k),
            (w + 2 * p + 1).saturating_sub(k),
        );
        let cols = if k == 1 && p == 0 {
            x.reshape((n * h * w, c))?
        } else {
            let xp = x.pad_with_zeros(1, p, p)?.pad_with_zeros(2, p, p)?;
            let mut taps = Vec::with_capacity(k * k);
            for ky in 0..k {
                for kx in 0..k {
                    taps.push(xp.narrow(1, ky, oh)?.narrow(2, kx, ow)?);
                }
            }
            Tensor::stack(&taps, 4)? // [n, oh, ow, c, k·k]
                .reshape((n * oh * ow, c * k * k))?
        };
        let y = matmul_weight_t(&cols, &self.weight, self.bias.as_ref())?;
        Ok(y.reshape((n, oh, ow, out_ch))?)
    }
}

/// `nn.ConvTranspose2d` (NCHW), weight `[in, out, kh, kw]`, no padding.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub stride: usize,
}

impl ConvTranspose2d {
    pub fn new(
        vs: &ParamStore,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        // PyTorch computes fan_in from weight.size(1) * k * k for transposed convs.
        let bound = 1.0 / ((out_ch * kernel * kernel) as f32).sqrt();
        let weight = vs.get(
            &[in_ch, out_ch, kernel, kernel],
            "weight",
            Init::Uniform(bound),
        )?;
        let bias = if bias {
            Some(vs.get(&[out_ch], "bias", Init::Uniform(bound))?)
        } else {
            None
        };
        Ok(ConvTranspose2d {
            weight,
            bias,
            stride,
        })
    }

    /// `x: [N, in, H, W] → [N, out, H·s, W·s]` (kernel = stride).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor()?;
        let y = x.conv_transpose2d(&w, 0, 0, self.stride, 1)?;
        match &self.bias {
            Some(b) => {
                let b = b.tensor()?;
                let c = b.dim(0)?;
                Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
            }
            None => Ok(y),
        }
    }
}

/// `nn.LayerNorm` over the last dim (differentiable; avoids Candle's fused op).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vs: &ParamStore, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vs.get(&[dim], "weight", Init::Ones)?,
            bias: vs.get(&[dim], "bias", Init::Zeros)?,
            eps,
        })
    }

    /// `x: [..., C] → [..., C]`. A bf16/f16 `x` is normalised in f32 with the f32 affine
    /// params and cast back ([`upcast`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (self.weight.tensor()?, self.bias.tensor()?);
        upcast(x, |x| layer_norm(x, &w, &b, self.eps))
    }
}

/// Layer norm over the last dim with affine `w`, `b` (`[C]`), differentiable in all three:
/// the fused CPU kernel ([`fused::layer_norm`]) where [`use_fused`] and the three dtypes
/// agree, else [`layer_norm_composed`].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() {
        fused::layer_norm(x, w, b, eps)
    } else {
        layer_norm_composed(x, w, b, eps)
    }
}

/// Layer norm over the last dim with affine `w`, `b` (`[C]`), built from differentiable ops.
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// SAM's `LayerNorm2d`: normalises over the channel dim of NCHW, affine per channel.
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm2d {
    /// The same normalisation on channels-last input `[N, H, W, C]`: a layer norm over the
    /// last dim (the fused kernel on CPU) with this module's weight and bias.
    pub fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        upcast(x, |x| {
            layer_norm(x, &self.weight.tensor()?, &self.bias.tensor()?, self.eps)
        })
    }

    pub fn new(vs: &ParamStore, channels: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm2d {
            weight: vs.get(&[channels], "weight", Init::Ones)?,
            bias: vs.get(&[channels], "bias", Init::Zeros)?,
            eps,
        })
    }

    /// `x: [N, C, H, W] → [N, C, H, W]`; a bf16/f16 `x` is normalised in f32 ([`upcast`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        upcast(x, |x| self.forward_same_dtype(x))
    }

    fn forward_same_dtype(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        let u = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&u)?;
        let s = xc.sqr()?.mean_keepdim(1)?;
        let xn = xc.broadcast_div(&(s + self.eps)?.sqrt()?)?;
        let w = self.weight.tensor()?.reshape((1, c, 1, 1))?;
        let b = self.bias.tensor()?.reshape((1, c, 1, 1))?;
        Ok(xn.broadcast_mul(&w)?.broadcast_add(&b)?)
    }
}

/// `nn.Embedding`: weight `[n, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Param,
}

impl Embedding {
    pub fn new(vs: &ParamStore, n: usize, dim: usize) -> Result<Self> {
        Ok(Embedding {
            weight: vs.get(&[n, dim], "weight", Init::Normal(1.0))?,
        })
    }

    /// Row `i` as `[dim]`.
    pub fn row(&self, i: usize) -> Result<Tensor> {
        Ok(self.weight.tensor()?.get(i)?)
    }
}

/// Softmax over the last dim, differentiable (not Candle's backward-less `softmax_last_dim`),
/// any shape: the fused CPU kernel ([`fused::softmax_last`]) where [`use_fused`], else
/// Candle's composed `softmax`. A bf16/f16 `x` is upcast to f32 for the softmax and the
/// result cast back (autocast, [`super::precision`]).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if is_low(x.dtype()) {
        return upcast(x, softmax_last);
    }
    if use_fused(x) {
        fused::softmax_last(x)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

/// Exact (erf) GELU, as `nn.GELU()` in PyTorch: the fused CPU kernel ([`fused::gelu`]) where
/// [`use_fused`], else Candle's `gelu_erf`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if use_fused(x) {
        fused::gelu(x)
    } else {
        Ok(x.gelu_erf()?)
    }
}

/// 1-D linear interpolation matrix `[out, in]` with PyTorch's `align_corners=False`
/// convention (source index `(i + 0.5)·in/out − 0.5`, clamped at 0). An empty source or
/// target gives the empty matrix (callers with sizes from a file check them first, see
/// [`resize_bilinear`]).
pub fn interp_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
    if in_len == 0 || out_len == 0 {
        return Vec::new();
    }
    let mut m = vec![0f32; out_len * in_len];
    let scale = in_len as f64 / out_len as f64;
    for i in 0..out_len {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_len - 1);
        let i1 = (i0 + 1).min(in_len - 1);
        let w1 = (src - i0 as f64) as f32;
        m[i * in_len + i0] += 1.0 - w1;
        m[i * in_len + i1] += w1;
    }
    m
}

/// Bilinear resize of `x: [..., H, W]` to `[..., oh, ow]` as `A_h · x · A_wᵀ`
/// (`F.interpolate(mode="bilinear", align_corners=False)`), differentiable w.r.t. `x`.
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims.len();
    let (h, w) = match dims.as_slice() {
        [.., h, w] => (*h, *w),
        _ => {
            return Err(crate::error::Error::msg(format!(
                "bilinear resize needs at least 2 dims, got shape {dims:?}"
            )))
        }
    };
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(crate::error::Error::msg(format!(
            "bilinear resize of shape {dims:?} to {oh}×{ow}: every size must be positive"
        )));
    }
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let dev: &Device = x.device();
    let ah = Tensor::from_vec(interp_matrix(h, oh), (oh, h), dev)?;
    let awt = Tensor::from_vec(interp_matrix(w, ow), (ow, w), dev)?.t()?;
    let lead: usize = dims[..n - 2].iter().product();
    let x3 = x.reshape((lead, h, w))?;
    let y = x3.broadcast_matmul(&awt.contiguous()?)?; // [lead, h, ow]
    let y = ah.broadcast_matmul(&y)?; // [lead, oh, ow]
    let mut out = dims[..n - 2].to_vec();
    out.push(oh);
    out.push(ow);
    Ok(y.reshape(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::with_reference_path;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::randn(shape, seed, candle_core::DType::F32).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        crate::nn::gradcheck::max_abs_diff(a, b).unwrap() as f32
    }

    /// The im2col route of `Conv2d` equals Candle's conv2d in value and in the gradients of
    /// input, kernel and bias (patchify, 1×1, 3×3 padded; a strided 3×3 takes conv2d itself).
    #[test]
    fn conv_im2col_matches_candle_conv() {
        for (i, &(cin, cout, k, stride, pad, h)) in [
            (3, 5, 2, 2, 0, 6),
            (4, 3, 1, 1, 0, 5),
            (3, 4, 3, 1, 1, 5),
            (2, 3, 3, 2, 1, 7),
        ]
        .iter()
        .enumerate()
        {
            let vs = ParamStore::init(&Device::Cpu, i as u64);
            let conv = Conv2d::new(&vs, cin, cout, k, stride, pad, 1, true).unwrap();
            let x = Var::from_tensor(&rand(&[2, cin, h, h], 10 + i as u64)).unwrap();
            let run = || {
                let y = conv.forward(x.as_tensor()).unwrap();
                let proj = rand(y.dims(), 20);
                let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
                let mut gs = vec![g.get(x.as_tensor()).unwrap().clone()];
                for (_, v) in vs.trainable_vars() {
                    gs.push(g.get(v.as_tensor()).unwrap().clone());
                }
                (y, gs)
            };
            let (y1, g1) = run();
            let (y2, g2) = with_reference_path(run);
            assert_eq!(y1.dims(), y2.dims(), "case {i}");
            assert!(max_abs(&y1, &y2) < 1e-5, "case {i}");
            assert_eq!(g1.len(), 3);
            for (a, b) in g1.iter().zip(&g2) {
                assert!(max_abs(a, b) < 1e-4, "case {i}: {}", max_abs(a, b));
            }
        }
    }

    /// The channels-last conv (SAM's neck: 1×1 and 3×3 padded) and `LayerNorm2d` on NHWC
    /// equal Candle's conv2d and the NCHW norm on the permuted input, in value and in the
    /// gradients of input, kernel, bias and norm affine.
    #[test]
    fn channels_last_conv_and_norm_match_nchw() {
        for (i, &(cin, cout, k, pad, h)) in [(4, 3, 1, 0, 5), (3, 4, 3, 1, 5), (2, 3, 3, 1, 1)]
            .iter()
            .enumerate()
        {
            let vs = ParamStore::init(&Device::Cpu, 30 + i as u64);
            let conv = Conv2d::new(&vs.pp("c"), cin, cout, k, 1, pad, 1, true).unwrap();
            let ln = LayerNorm2d::new(&vs.pp("n"), cout, 1e-6).unwrap();
            let x = Var::from_tensor(&rand(&[2, h, h + 1, cin], 40 + i as u64)).unwrap();
            let grads = |y: &Tensor| {
                let proj = rand(y.dims(), 50);
                let g = (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
                let mut gs = vec![g.get(x.as_tensor()).unwrap().clone()];
                for (_, v) in vs.trainable_vars() {
                    gs.push(g.get(v.as_tensor()).unwrap().clone());
                }
                gs
            };
            let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap();
            let y1 = ln
                .forward_channels_last(&conv.forward_channels_last(x.as_tensor()).unwrap())
                .unwrap();
            let g1 = grads(&y1);
            let (y2, g2) = with_reference_path(|| {
                let xc = x.as_tensor().permute((0, 3, 1, 2)).unwrap();
                let y = nhwc(&ln.forward(&conv.forward_conv(&xc).unwrap()).unwrap());
                let g = grads(&y);
                (y, g)
            });
            assert_eq!(y1.dims(), y2.dims(), "case {i}");
            assert!(max_abs(&y1, &y2.contiguous().unwrap()) < 1e-5, "case {i}");
            assert_eq!(g1.len(), 5);
            for (a, b) in g1.iter().zip(&g2) {
                assert!(max_abs(a, b) < 1e-4, "case {i}: {}", max_abs(a, b));
            }
        }
    }
}

/// The fused CPU kernels against the composed ops ([reference path](with_reference_path)):
/// values and gradients, besides finite differences.
#[cfg(test)]
mod fused_vs_composed {
    use super::*;
    use crate::nn::gradcheck;
    use crate::nn::kernels::with_reference_path;
    use candle_core::{DType, Var};

    fn rand(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        (gradcheck::randn(shape, seed, candle_core::DType::F64).unwrap() * scale).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        crate::nn::gradcheck::max_abs_diff(a, b).unwrap()
    }

    /// Value and gradients (w.r.t. every input, through a random projection) of `f` on the
    /// fused path and on the reference path.
    fn both_paths(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> [(Tensor, Vec<Tensor>); 2] {
        let run = || {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let proj = rand(y.dims(), 99, 1.0);
            let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
                .collect();
            (y, gs)
        };
        let fast = run();
        let slow = with_reference_path(run);
        [fast, slow]
    }

    fn assert_paths_agree(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let [(y1, g1), (y2, g2)] = both_paths(inputs, f);
        assert!(max_abs(&y1, &y2) < 1e-12, "values differ");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert!(
                max_abs(a, b) < 1e-10,
                "gradient {i} differs: {}",
                max_abs(a, b)
            );
        }
    }

    #[test]
    fn softmax_matches_composed_and_finite_differences() {
        let x = rand(&[3, 4, 7], 1, 2.0);
        assert_paths_agree(std::slice::from_ref(&x), |t| softmax_last(&t[0]));
        let e = gradcheck::check(&x, 30, 0, softmax_last).unwrap();
        assert!(e < 1e-6, "{e}");
        // non-contiguous input
        let xt = x.transpose(1, 2).unwrap();
        let e = gradcheck::check(&xt, 20, 1, softmax_last).unwrap();
        assert!(e < 1e-6, "{e}");
        // f32 rows sum to one
        let y = softmax_last(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let s = y
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }

    #[test]
    fn layer_norm_matches_composed_and_finite_differences() {
        let x = (rand(&[2, 3, 8], 5, 2.0) + 0.7).unwrap();
        let w = (rand(&[8], 6, 0.3) + 1.0).unwrap();
        let b = rand(&[8], 7, 0.5);
        let eps = 1e-6;
        assert_paths_agree(&[x.clone(), w.clone(), b.clone()], |t| {
            layer_norm(&t[0], &t[1], &t[2], eps)
        });
        let e = gradcheck::check(&x, 30, 0, |x| layer_norm(x, &w, &b, eps)).unwrap();
        assert!(e < 1e-6, "wrt x: {e}");
        let e = gradcheck::check(&w, 8, 1, |w| layer_norm(&x, w, &b, eps)).unwrap();
        assert!(e < 1e-6, "wrt w: {e}");
        let e = gradcheck::check(&b, 8, 2, |b| layer_norm(&x, &w, b, eps)).unwrap();
        assert!(e < 1e-6, "wrt b: {e}");
    }

    #[test]
    fn layer_norm_weight_gradient_sums_over_many_row_blocks() {
        // More rows than one rayon task takes, so the partial sums of dw/db are combined.
        let x = rand(&[300, 70], 8, 1.0);
        let w = (rand(&[70], 9, 0.3) + 1.0).unwrap();
        let b = rand(&[70], 10, 0.5);
        assert_paths_agree(&[x, w, b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
    }

    #[test]
    fn gelu_matches_composed_and_finite_differences() {
        let x = rand(&[4, 9], 11, 2.0);
        let [(y1, g1), (y2, g2)] = both_paths(std::slice::from_ref(&x), |t| gelu(&t[0]));
        // Same erf for the values; Candle's backward uses 1/√(2π) ≈ 0.398942 (6 digits).
        assert!(max_abs(&y1, &y2) < 1e-9);
        let d = max_abs(&g1[0], &g2[0]);
        assert!(d < 1e-5, "{d}");
        let e = gradcheck::check(&x, 30, 0, gelu).unwrap();
        assert!(e < 1e-6, "{e}");
    }
}
