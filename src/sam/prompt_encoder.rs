//! SAM's prompt encoder (Meta's `segment_anything/modeling/prompt_encoder.py`): random Fourier
//! positional encoding, learned point/box-corner embeddings, and the dense prompt (a downscaled
//! mask, or the learned `no_mask_embed` when there is none).

use super::common::LAYER_NORM_2D_EPS;
use super::config::SamConfig;
use crate::error::{Error, Result};
use crate::nn::layers::{gelu, Conv2d, Embedding, LayerNorm2d};
use crate::nn::ParamStore;
use candle_core::{DType, Tensor, D};

/// Name of the positional-encoding buffer (a buffer in Meta's module, not a parameter).
pub const PE_BUFFER: &str = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix";

/// `PositionEmbeddingRandom`: `sin/cos(2π·(2x − 1)·G)` with the fixed buffer `G: [2, C/2]`.
#[derive(Debug, Clone)]
pub struct PositionEmbeddingRandom {
    /// `positional_encoding_gaussian_matrix` `[2, C/2]`, always frozen.
    pub gaussian_matrix: Tensor,
}

impl PositionEmbeddingRandom {
    /// `coords: [..., 2]` normalised to `[0, 1]` → `[..., C]`.
    pub fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let c = ((coords * 2.0)? - 1.0)?;
        let c = c.broadcast_matmul(&self.gaussian_matrix)?;
        let c = (c * (2.0 * std::f64::consts::PI))?;
        Ok(Tensor::cat(&[c.sin()?, c.cos()?], D::Minus1)?)
    }

    /// Encoding of pixel centres of an `h × w` grid: `[C, h, w]`.
    pub fn forward(&self, h: usize, w: usize) -> Result<Tensor> {
        let mut xy = Vec::with_capacity(h * w * 2);
        for i in 0..h {
            for j in 0..w {
                xy.push((j as f32 + 0.5) / w as f32);
                xy.push((i as f32 + 0.5) / h as f32);
            }
        }
        let dev = self.gaussian_matrix.device();
        let grid = Tensor::from_vec(xy, (h, w, 2), dev)?;
        Ok(self.pe_encoding(&grid)?.permute((2, 0, 1))?.contiguous()?)
    }

    /// `coords: [B, N, 2]` in pixels of an `image_size` (h, w) input → `[B, N, C]`.
    pub fn forward_with_coords(
        &self,
        coords: &Tensor,
        image_size: (usize, usize),
    ) -> Result<Tensor> {
        let dev = coords.device();
        let scale = Tensor::new(&[1.0 / image_size.1 as f32, 1.0 / image_size.0 as f32], dev)?;
        self.pe_encoding(&coords.to_dtype(DType::F32)?.broadcast_mul(&scale)?)
    }
}

/// `PromptEncoder`.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    pub embed_dim: usize,
    /// `(g, g)`.
    pub image_embedding_size: (usize, usize),
    /// `(S, S)`.
    pub input_image_size: (usize, usize),
    pub pe_layer: PositionEmbeddingRandom,
    /// `point_embeddings.{0..3}`: negative point, positive point, box top-left, box bottom-right.
    pub point_embeddings: Vec<Embedding>,
    pub not_a_point_embed: Embedding,
    /// `mask_downscaling.{0,1,3,4,6}`: conv k2s2 → LN2d → GELU → conv k2s2 → LN2d → GELU → conv 1×1.
    pub mask_downscaling: (Conv2d, LayerNorm2d, Conv2d, LayerNorm2d, Conv2d),
    pub no_mask_embed: Embedding,
}

impl PromptEncoder {
    /// `vs` is the store *at the root* (the buffer is fetched by its full name).
    pub fn new(cfg: &SamConfig, vs: &ParamStore) -> Result<Self> {
        let c = cfg.prompt_embed_dim;
        let g = cfg.grid_size();
        let p = vs.pp("prompt_encoder");
        let gaussian_matrix = vs.buffer(&[2, c / 2], PE_BUFFER, crate::nn::Init::Normal(1.0))?;
        let point_embeddings = (0..4)
            .map(|i| Embedding::new(&p.pp("point_embeddings").pp(i), 1, c))
            .collect::<Result<Vec<_>>>()?;
        let m = p.pp("mask_downscaling");
        let mi = cfg.mask_in_chans;
        let mask_downscaling = (
            Conv2d::new(&m.pp(0), 1, mi / 4, 2, 2, 0, 1, true)?,
            LayerNorm2d::new(&m.pp(1), mi / 4, LAYER_NORM_2D_EPS)?,
            Conv2d::new(&m.pp(3), mi / 4, mi, 2, 2, 0, 1, true)?,
            LayerNorm2d::new(&m.pp(4), mi, LAYER_NORM_2D_EPS)?,
            Conv2d::new(&m.pp(6), mi, c, 1, 1, 0, 1, true)?,
        );
        Ok(PromptEncoder {
            embed_dim: c,
            image_embedding_size: (g, g),
            input_image_size: (cfg.image_size, cfg.image_size),
            pe_layer: PositionEmbeddingRandom { gaussian_matrix },
            point_embeddings,
            not_a_point_embed: Embedding::new(&p.pp("not_a_point_embed"), 1, c)?,
            mask_downscaling,
            no_mask_embed: Embedding::new(&p.pp("no_mask_embed"), 1, c)?,
        })
    }

    /// `get_dense_pe`: positional encoding of the embedding grid, `[1, C, g, g]`.
    pub fn get_dense_pe(&self) -> Result<Tensor> {
        let (h, w) = self.image_embedding_size;
        Ok(self.pe_layer.forward(h, w)?.unsqueeze(0)?)
    }

    /// `_embed_points`: `points [B, N, 2]` (input pixels), `labels [B, N]` (1 positive,
    /// 0 negative, −1 not a point) → `[B, N(+1), C]`; `pad` appends Meta's padding point.
    pub fn embed_points(&self, points: &Tensor, labels: &Tensor, pad: bool) -> Result<Tensor> {
        let dev = points.device();
        let points = (points.to_dtype(DType::F32)? + 0.5)?;
        let labels = labels.to_dtype(DType::F32)?;
        let (b, n, two) = points.dims3()?;
        if two != 2 || labels.dims() != [b, n] {
            return Err(Error::msg(format!(
                "point prompts: expected coords [B, N, 2] and labels [B, N], got {:?} and {:?}",
                points.dims(),
                labels.dims()
            )));
        }
        let (points, labels) = if pad {
            (
                Tensor::cat(&[&points, &Tensor::zeros((b, 1, 2), DType::F32, dev)?], 1)?,
                Tensor::cat(&[&labels, &Tensor::full(-1f32, (b, 1), dev)?], 1)?,
            )
        } else {
            (points, labels)
        };
        let pe = self
            .pe_layer
            .forward_with_coords(&points, self.input_image_size)?;
        let is =
            |v: f64| -> Result<Tensor> { Ok(labels.eq(v)?.to_dtype(DType::F32)?.unsqueeze(2)?) };
        let not_pt = is(-1.0)?;
        let keep = (1.0 - &not_pt)?;
        let w = |e: &Embedding| -> Result<Tensor> { e.weight.tensor() }; // [1, C]
        let out = pe
            .broadcast_mul(&keep)?
            .broadcast_add(&not_pt.broadcast_mul(&w(&self.not_a_point_embed)?)?)?
            .broadcast_add(&is(0.0)?.broadcast_mul(&w(&self.point_embeddings[0])?)?)?
            .broadcast_add(&is(1.0)?.broadcast_mul(&w(&self.point_embeddings[1])?)?)?;
        Ok(out)
    }

    /// `_embed_boxes`: `boxes [B, 4]` xyxy in input pixels → corner embeddings `[B, 2, C]`.
    pub fn embed_boxes(&self, boxes: &Tensor) -> Result<Tensor> {
        let boxes = (boxes.to_dtype(DType::F32)? + 0.5)?;
        let b = boxes.dim(0)?;
        let coords = boxes.reshape((b, 2, 2))?;
        let pe = self
            .pe_layer
            .forward_with_coords(&coords, self.input_image_size)?;
        let corners = Tensor::cat(
            &[
                self.point_embeddings[2].weight.tensor()?,
                self.point_embeddings[3].weight.tensor()?,
            ],
            0,
        )?; // [2, C]
        Ok(pe.broadcast_add(&corners)?)
    }

    /// `_embed_masks`: `masks [B, 1, 4g, 4g]` → `[B, C, g, g]`.
    pub fn embed_masks(&self, masks: &Tensor) -> Result<Tensor> {
        let (c0, l0, c1, l1, c2) = &self.mask_downscaling;
        let x = gelu(&l0.forward(&c0.forward(masks)?)?)?;
        let x = gelu(&l1.forward(&c1.forward(&x)?)?)?;
        c2.forward(&x)
    }

    /// The dense prompt without a mask: `no_mask_embed` over the grid, `[B, C, g, g]`.
    pub fn no_mask_dense(&self, b: usize) -> Result<Tensor> {
        let (h, w) = self.image_embedding_size;
        Ok(self
            .no_mask_embed
            .weight
            .tensor()?
            .reshape((1, self.embed_dim, 1, 1))?
            .broadcast_as((b, self.embed_dim, h, w))?)
    }

    /// `forward`: (sparse `[B, N, C]` — `None` when there are no point or box prompts,
    /// dense `[B, C, g, g]`).
    pub fn forward(
        &self,
        b: usize,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let mut sparse = Vec::new();
        if let Some((coords, labels)) = points {
            sparse.push(self.embed_points(coords, labels, boxes.is_none())?);
        }
        if let Some(bx) = boxes {
            sparse.push(self.embed_boxes(bx)?);
        }
        let sparse = match sparse.len() {
            0 => None,
            1 => sparse.pop(),
            _ => Some(Tensor::cat(&sparse, 1)?),
        };
        let dense = match masks {
            Some(m) => self.embed_masks(m)?,
            None => self.no_mask_dense(b)?,
        };
        Ok((sparse, dense))
    }
}
