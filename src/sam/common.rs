//! Small blocks shared by SAM's components (Meta's `segment_anything/modeling/common.py`):
//! the two-layer `MLPBlock`, and the `MLP` of the mask decoder (`mask_decoder.py`).

use crate::error::Result;
use crate::nn::layers::{gelu, Linear};
use crate::nn::ParamStore;
use candle_core::Tensor;

/// Epsilon of Meta's `LayerNorm2d` (its default), used wherever SAM has one.
pub const LAYER_NORM_2D_EPS: f64 = 1e-6;

/// Activation of an [`MlpBlock`]: GELU (erf) in the image encoder, ReLU in the two-way transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Relu,
}

impl Activation {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => gelu(x),
            Activation::Relu => Ok(x.relu()?),
        }
    }
}

/// `MLPBlock`: `lin2(act(lin1(x)))`, params `lin1.*`, `lin2.*`.
#[derive(Debug, Clone)]
pub struct MlpBlock {
    pub lin1: Linear,
    pub lin2: Linear,
    pub act: Activation,
}

impl MlpBlock {
    pub fn new(vs: &ParamStore, dim: usize, mlp_dim: usize, act: Activation) -> Result<Self> {
        Ok(MlpBlock {
            lin1: Linear::new(&vs.pp("lin1"), dim, mlp_dim, true)?,
            lin2: Linear::new(&vs.pp("lin2"), mlp_dim, dim, true)?,
            act,
        })
    }

    /// `x: [..., dim] → [..., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lin2
            .forward(&self.act.forward(&self.lin1.forward(x)?)?)
    }
}

/// The mask decoder's `MLP`: `num_layers` linears under `layers.{i}`, ReLU between them.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(
        vs: &ParamStore,
        input_dim: usize,
        hidden_dim: usize,
        output_dim: usize,
        num_layers: usize,
    ) -> Result<Self> {
        let vs = vs.pp("layers");
        let layers = (0..num_layers)
            .map(|i| {
                let n = if i == 0 { input_dim } else { hidden_dim };
                let k = if i + 1 == num_layers {
                    output_dim
                } else {
                    hidden_dim
                };
                Linear::new(&vs.pp(i), n, k, true)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp { layers })
    }

    /// `x: [..., input_dim] → [..., output_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if i + 1 < n {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}
