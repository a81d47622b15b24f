//! Speed of the prompt-free SAM path (forward, and forward + backward of a BCE loss w.r.t.
//! every parameter), with achieved GFLOP/s from an analytic FLOP count of the config's
//! matmuls and convolutions. The library measures and returns numbers; the CLI prints them.

use crate::error::Result;
use crate::nn::{Precision, RolePolicy};
use crate::sam::SamConfig;
use crate::sam::{build, Sam};
use crate::util::Rng;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// FLOPs (2 per multiply-add) of one prompt-free forward at `batch`: every matmul and conv of
/// the image encoder (incl. attention and the rel-pos einsums), the mask decoder (5 output
/// tokens, single-mask hypernetwork) and the final bilinear resize. Element-wise ops excluded.
pub fn prompt_free_flops(cfg: &SamConfig, batch: usize) -> f64 {
    let f = |x: usize| x as f64;
    let d = f(cfg.encoder_embed_dim);
    let g = cfg.grid_size();
    let t = f(g * g);
    let p = f(cfg.patch_size);
    let mlp = d * cfg.mlp_ratio;
    let mut enc = 2.0 * t * d * 3.0 * p * p; // patch embed
    for i in 0..cfg.encoder_depth {
        enc += 2.0 * t * d * 3.0 * d + 2.0 * t * d * d + 4.0 * t * d * mlp; // qkv, proj, mlp
        if cfg.encoder_global_attn_indexes.contains(&i) {
            enc += 4.0 * t * t * d; // QKᵀ and AV
            enc += 2.0 * t * f(2 * g) * d; // rel-pos einsums (k_h + k_w keys per query)
        } else {
            let w = cfg.window_size;
            let gp = g.div_ceil(w) * w; // padded grid
            let tokens = f(gp * gp);
            enc += 4.0 * tokens * f(w * w) * d;
            enc += 2.0 * tokens * f(2 * w) * d;
        }
    }
    let c = f(cfg.prompt_embed_dim);
    enc += 2.0 * t * d * c + 2.0 * t * c * c * 9.0; // neck
    let n = f(cfg.num_multimask_outputs + 2); // iou token + mask tokens
    let ci = c / 2.0; // cross-attention internal dim
    let cross =
        |nq: f64, nk: f64| 2.0 * nq * c * ci * 2.0 + 2.0 * nk * c * ci * 2.0 + 4.0 * nq * nk * ci;
    let mut dec = 0.0;
    for _ in 0..cfg.decoder_depth {
        dec += 8.0 * n * c * c + 4.0 * n * n * c; // self attention
        dec += cross(n, t); // token → image
        dec += 4.0 * n * c * f(cfg.decoder_mlp_dim); // mlp
        dec += cross(t, n); // image → token
    }
    dec += cross(n, t); // final token → image
    dec += 2.0 * t * c * (c / 4.0) * 4.0; // convT 1
    dec += 2.0 * (4.0 * t) * (c / 4.0) * (c / 8.0) * 4.0; // convT 2
    dec += 2.0 * (2.0 * c * c + c * c / 8.0); // hypernetwork 0
    let lo = f(4 * g);
    dec += 2.0 * lo * lo * c / 8.0; // masks
    let s = f(cfg.image_size);
    let resize = 2.0 * lo * lo * s + 2.0 * s * lo * s;
    f(batch) * (enc + dec + resize)
}

/// Measured speed of the prompt-free path.
#[derive(Debug, Clone)]
pub struct SamBench {
    pub config: String,
    pub image_size: usize,
    pub batch: usize,
    pub iters: usize,
    pub device: String,
    /// Compute precision of the image encoder.
    pub precision: Precision,
    /// Mean seconds per forward (frozen params, no graph kept).
    pub forward_s: f64,
    /// Mean seconds per forward + backward (all params trainable).
    pub forward_backward_s: f64,
    /// The same with the image encoder checkpointed per block (recomputed in backward).
    pub checkpointed_s: f64,
    /// Analytic GFLOP of one forward; forward + backward is counted as 3× forward.
    pub forward_gflop: f64,
}

impl SamBench {
    pub fn forward_gflops(&self) -> f64 {
        self.forward_gflop / self.forward_s
    }
    pub fn forward_backward_gflops(&self) -> f64 {
        3.0 * self.forward_gflop / self.forward_backward_s
    }
    /// Counted as 3× forward like the plain pass (the recomputed forward is not credited).
    pub fn checkpointed_gflops(&self) -> f64 {
        3.0 * self.forward_gflop / self.checkpointed_s
    }
}

/// Time `iters` forwards and `iters` forward+backward passes at `batch` (after one warm-up
/// of each) on random images and a random target.
pub fn bench_prompt_free(
    cfg: &SamConfig,
    batch: usize,
    iters: usize,
    device: &Device,
    precision: Precision,
) -> Result<SamBench> {
    // Validated and sized before the random batch is made (sizes come from flags).
    cfg.check_memory(batch, false)?;
    let iters = iters.max(1);
    let s = cfg.image_size;
    let mut rng = Rng::new(0);
    let n = batch * 3 * s * s;
    let x = Tensor::from_vec(
        (0..n).map(|_| rng.f32()).collect::<Vec<f32>>(),
        (batch, 3, s, s),
        device,
    )?;
    let m = batch * s * s;
    let target = Tensor::from_vec(
        (0..m)
            .map(|_| if rng.bernoulli(0.3) { 1f32 } else { 0.0 })
            .collect::<Vec<f32>>(),
        (batch, 1, s, s),
        device,
    )?;
    let (frozen, _) = build(cfg, None, RolePolicy::AllFrozen, device, 1)?;
    let frozen = frozen.with_precision(precision);
    let (trainable, _) = build(cfg, None, RolePolicy::AllTrainable, device, 1)?;
    let trainable = trainable.with_precision(precision);
    let fwd = |model: &Sam| -> Result<f64> {
        let t0 = Instant::now();
        let y = model.forward_prompt_free(&x)?;
        y.sum_all()?.to_scalar::<f32>()?; // force completion on async devices
        Ok(t0.elapsed().as_secs_f64())
    };
    let fwd_bwd = |model: &Sam| -> Result<f64> {
        let t0 = Instant::now();
        let y = model.forward_prompt_free(&x)?;
        let sp = (y.exp()? + 1.0)?.log()?;
        let loss = (sp - (&y * &target)?)?.mean_all()?;
        let grads = loss.backward()?;
        std::hint::black_box(grads);
        Ok(t0.elapsed().as_secs_f64())
    };
    let bce = |y: &Tensor| -> Result<Tensor> {
        let sp = (y.exp()? + 1.0)?.log()?;
        Ok((sp - (y * &target)?)?.mean_all()?)
    };
    let ckpt = |model: &Sam| -> Result<f64> {
        let t0 = Instant::now();
        let (_, grads) = model.prompt_free_backward_checkpointed(&x, bce)?;
        std::hint::black_box(grads);
        Ok(t0.elapsed().as_secs_f64())
    };
    fwd(&frozen)?;
    let forward_s = (0..iters).map(|_| fwd(&frozen)).sum::<Result<f64>>()? / iters as f64;
    fwd_bwd(&trainable)?;
    let forward_backward_s = (0..iters)
        .map(|_| fwd_bwd(&trainable))
        .sum::<Result<f64>>()?
        / iters as f64;
    ckpt(&trainable)?;
    let checkpointed_s = (0..iters).map(|_| ckpt(&trainable)).sum::<Result<f64>>()? / iters as f64;
    Ok(SamBench {
        config: cfg.name.clone(),
        image_size: s,
        batch,
        iters,
        device: format!("{device:?}"),
        precision,
        forward_s,
        forward_backward_s,
        checkpointed_s,
        forward_gflop: prompt_free_flops(cfg, batch) / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_scale_with_batch_and_are_dominated_by_the_encoder() {
        let cfg = SamConfig::tiny();
        let one = prompt_free_flops(&cfg, 1);
        assert!((prompt_free_flops(&cfg, 4) / one - 4.0).abs() < 1e-9);
        // ViT-B at 1024 px by hand: linears 12·2·4096·768·(12·768) = 695.8 G, global attention
        // 4·(4·4096²·768) = 206.2 G, windowed 8·(4·4900·196·768) = 23.6 G, patch embed + neck
        // + rel-pos + decoder ≈ 15 G: ≈ 0.94 TFLOP (fvcore's ≈ 487 G "flops" are MACs).
        let b = prompt_free_flops(&SamConfig::vit_b(), 1);
        assert!(b > 0.93e12 && b < 0.96e12, "{b:e}");
    }
}
