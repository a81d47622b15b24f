//! SAM's two-way transformer (Meta's `segment_anything/modeling/transformer.py`): prompt tokens
//! and image tokens attend to each other in both directions. Batched over images.

use super::common::{Activation, MlpBlock};
use crate::error::Result;
use crate::nn::layers::{softmax_last, LayerNorm, Linear};
use crate::nn::ParamStore;
use candle_core::Tensor;

/// Layer-norm epsilon of the transformer (`nn.LayerNorm` default).
pub const TRANSFORMER_LN_EPS: f64 = 1e-5;

/// Scaled dot-product attention over heads: `q [B, Nq, D]`, `k, v [B, Nk, D]` → `[B, Nq, D]`.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    num_heads: usize,
) -> Result<Tensor> {
    let sep = |x: &Tensor| -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        Ok(x.reshape((b, n, num_heads, c / num_heads))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (b, nq, c) = q.dims3()?;
    let (q, k, v) = (sep(q)?, sep(k)?, sep(v)?);
    let c_per_head = c / num_heads;
    let attn = (q.matmul(&k.t()?)? / (c_per_head as f64).sqrt())?;
    let attn = softmax_last(&attn)?;
    let out = attn.matmul(&v)?; // [B, h, Nq, c/h]
    Ok(out.transpose(1, 2)?.contiguous()?.reshape((b, nq, c))?)
}

/// `Attention` with an optional downscaled internal dim (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
}

impl Attention {
    pub fn new(
        vs: &ParamStore,
        dim: usize,
        num_heads: usize,
        downsample_rate: usize,
    ) -> Result<Self> {
        let internal = dim / downsample_rate;
        Ok(Attention {
            q_proj: Linear::new(&vs.pp("q_proj"), dim, internal, true)?,
            k_proj: Linear::new(&vs.pp("k_proj"), dim, internal, true)?,
            v_proj: Linear::new(&vs.pp("v_proj"), dim, internal, true)?,
            out_proj: Linear::new(&vs.pp("out_proj"), internal, dim, true)?,
            num_heads,
        })
    }

    /// `q [B, Nq, D]`, `k, v [B, Nk, D]` → `[B, Nq, D]`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let out = multi_head_attention(
            &self.q_proj.forward(q)?,
            &self.k_proj.forward(k)?,
            &self.v_proj.forward(v)?,
            self.num_heads,
        )?;
        self.out_proj.forward(&out)
    }
}

/// `TwoWayAttentionBlock`.
#[derive(Debug, Clone)]
pub struct TwoWayAttentionBlock {
    pub self_attn: Attention,
    pub norm1: LayerNorm,
    pub cross_attn_token_to_image: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub norm3: LayerNorm,
    pub norm4: LayerNorm,
    pub cross_attn_image_to_token: Attention,
    pub skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    pub fn new(
        vs: &ParamStore,
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        downsample: usize,
        skip_first_layer_pe: bool,
    ) -> Result<Self> {
        let ln = |n: &str| LayerNorm::new(&vs.pp(n), dim, TRANSFORMER_LN_EPS);
        Ok(TwoWayAttentionBlock {
            self_attn: Attention::new(&vs.pp("self_attn"), dim, num_heads, 1)?,
            norm1: ln("norm1")?,
            cross_attn_token_to_image: Attention::new(
                &vs.pp("cross_attn_token_to_image"),
                dim,
                num_heads,
                downsample,
            )?,
            norm2: ln("norm2")?,
            mlp: MlpBlock::new(&vs.pp("mlp"), dim, mlp_dim, Activation::Relu)?,
            norm3: ln("norm3")?,
            norm4: ln("norm4")?,
            cross_attn_image_to_token: Attention::new(
                &vs.pp("cross_attn_image_to_token"),
                dim,
                num_heads,
                downsample,
            )?,
            skip_first_layer_pe,
        })
    }

    /// `queries [B, Nq, D]`, `keys [B, Nk, D]` (+ their positional encodings) → updated pair.
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries)?;
        let q = (&queries + query_pe)?;
        let k = keys.broadcast_add(key_pe)?;
        let queries = (&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)?)?;
        let queries = self.norm2.forward(&queries)?;
        let queries = (&queries + self.mlp.forward(&queries)?)?;
        let queries = self.norm3.forward(&queries)?;
        let q = (&queries + query_pe)?;
        let keys = (keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)?)?;
        let keys = self.norm4.forward(&keys)?;
        Ok((queries, keys))
    }
}

/// `TwoWayTransformer`.
#[derive(Debug, Clone)]
pub struct TwoWayTransformer {
    pub layers: Vec<TwoWayAttentionBlock>,
    pub final_attn_token_to_image: Attention,
    pub norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(
        vs: &ParamStore,
        depth: usize,
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
    ) -> Result<Self> {
        let downsample = 2;
        let layers = (0..depth)
            .map(|i| {
                TwoWayAttentionBlock::new(
                    &vs.pp("layers").pp(i),
                    dim,
                    num_heads,
                    mlp_dim,
                    downsample,
                    i == 0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TwoWayTransformer {
            layers,
            final_attn_token_to_image: Attention::new(
                &vs.pp("final_attn_token_to_image"),
                dim,
                num_heads,
                downsample,
            )?,
            norm_final_attn: LayerNorm::new(&vs.pp("norm_final_attn"), dim, TRANSFORMER_LN_EPS)?,
        })
    }

    /// `image_embedding [B, C, h, w]`, `image_pe [1 or B, C, h, w]`, `point_embedding [B, N, C]`
    /// → (tokens `[B, N, C]`, image tokens `[B, h·w, C]`).
    pub fn forward(
        &self,
        image_embedding: &Tensor,
        image_pe: &Tensor,
        point_embedding: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let keys = image_embedding
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let key_pe = image_pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let mut queries = point_embedding.clone();
        let mut keys = keys;
        for layer in &self.layers {
            let (q, k) = layer.forward(&queries, &keys, point_embedding, &key_pe)?;
            queries = q;
            keys = k;
        }
        let q = (&queries + point_embedding)?;
        let k = keys.broadcast_add(&key_pe)?;
        let attn_out = self.final_attn_token_to_image.forward(&q, &k, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + attn_out)?)?;
        Ok((queries, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::randn(shape, seed, candle_core::DType::F64).unwrap()
    }

    #[test]
    fn multi_head_attention_gradients_match_finite_differences() {
        let q = rand(&[2, 3, 8], 1);
        let k = rand(&[2, 5, 8], 2);
        let v = rand(&[2, 5, 8], 3);
        for (which, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let e = gradcheck::check(x, 30, 0, |x| match which {
                "q" => multi_head_attention(x, &k, &v, 2),
                "k" => multi_head_attention(&q, x, &v, 2),
                _ => multi_head_attention(&q, &k, x, 2),
            })
            .unwrap();
            assert!(e < 1e-6, "wrt {which}: {e}");
        }
    }

    #[test]
    fn multi_head_attention_matches_per_head_loops() {
        let (b, nq, nk, c, h) = (2, 3, 4, 6, 3);
        let q = rand(&[b, nq, c], 4);
        let k = rand(&[b, nk, c], 5);
        let v = rand(&[b, nk, c], 6);
        let got = multi_head_attention(&q, &k, &v, h).unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (qv, kv, vv, gv) = (f(&q), f(&k), f(&v), f(&got));
        let d = c / h;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..nq {
                    let mut s: Vec<f64> = (0..nk)
                        .map(|j| {
                            (0..d)
                                .map(|e| {
                                    qv[(bi * nq + i) * c + hi * d + e]
                                        * kv[(bi * nk + j) * c + hi * d + e]
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = s.iter().sum();
                    for e in 0..d {
                        let want: f64 = (0..nk)
                            .map(|j| s[j] / z * vv[(bi * nk + j) * c + hi * d + e])
                            .sum();
                        let g = gv[(bi * nq + i) * c + hi * d + e];
                        assert!((g - want).abs() < 1e-10);
                    }
                }
            }
        }
    }
}
