//! Differentiable layers built on [`Param`]s, restricted to Candle ops whose backward is
//! verified (see `shared/notes/candle.md`): no fused `layer_norm`, no `softmax_last_dim`, no
//! `upsample_bilinear2d`. Each layer fetches its params from a [`ParamStore`] under the
//! reference (PyTorch) names, so official checkpoints map by name.

use super::param::{Init, Param, ParamStore};
use super::sparse_grad::{InputGradOnly, SparseWeightGrad};
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
    /// weight gradient in backward (see [`super::sparse_grad`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor()?;
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let out_dim = w.dim(0)?;
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = if x.device().is_cpu() {
            match &self.weight {
                Param::Frozen(_) if x2.track_op() => {
                    let y = x2.detach().matmul(&w.t()?)?;
                    (y + x2.apply_op1(InputGradOnly { w: w.clone() })?)?
                }
                Param::Sparse(s) => {
                    let w = w.detach();
                    let y = x2.detach().matmul(&w.t()?)?;
                    let carrier = x2.apply_op2(
                        s.delta.as_tensor(),
                        SparseWeightGrad {
                            w,
                            rows: s.rows.clone(),
                            cols: s.cols.clone(),
                        },
                    )?;
                    (y + carrier)?
                }
                _ => x2.matmul(&w.t()?)?,
            }
        } else {
            x2.matmul(&w.t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.tensor()?)?;
        }
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = out_dim;
        }
        Ok(y.reshape(out_dims)?)
    }
}

impl Linear {
    /// Plain `x·Wᵀ + b` through Candle's matmul (dense weight gradient always computed): the
    /// reference the fast path is tested and benchmarked against.
    pub fn forward_dense(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor()?;
        let y = x.broadcast_matmul(&w.t()?)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.tensor()?)?),
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

    /// `x: [N, in, H, W] → [N, out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor()?;
        let y = x.conv2d(&w, self.padding, self.stride, 1, self.groups)?;
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

    /// `x: [..., C] → [..., C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight.tensor()?, &self.bias.tensor()?, self.eps)
    }
}

/// Layer norm over the last dim with affine `w`, `b` (`[C]`), built from differentiable ops.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
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
    pub fn new(vs: &ParamStore, channels: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm2d {
            weight: vs.get(&[channels], "weight", Init::Ones)?,
            bias: vs.get(&[channels], "bias", Init::Zeros)?,
            eps,
        })
    }

    /// `x: [N, C, H, W] → [N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

/// Softmax over the last dim, differentiable (not the fused `softmax_last_dim`).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// Exact (erf) GELU, as `nn.GELU()` in PyTorch.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// 1-D linear interpolation matrix `[out, in]` with PyTorch's `align_corners=False`
/// convention (source index `(i + 0.5)·in/out − 0.5`, clamped at 0).
pub fn interp_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
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
    let (h, w) = (dims[n - 2], dims[n - 1]);
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
