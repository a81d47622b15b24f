//! Device parity of the prompt-free SAM path (issue #10's GPU check): the same weights and
//! batch, forward + backward of a BCE loss w.r.t. every parameter, on `device` (its default
//! path: on the CPU the fused kernels and the fused attention, on CUDA Candle's kernels) against
//! the CPU reference path (Candle's composed ops, dense gradients:
//! [`crate::nn::kernels::with_reference_path`]). The error of a tensor is
//! `max|a − b| / max|b|` (relative to the reference tensor's scale); for gradients the scale is
//! at least 1e-3 of the largest reference gradient, so that gradients which are analytically
//! zero (a key projection's bias under softmax) compare their rounding noise to the model's
//! gradient scale rather than to itself.

use crate::error::{Error, Result};
use crate::nn::gradcheck::{max_abs, rel_err_floor};
use crate::nn::kernels::with_reference_path;
use crate::nn::ParamStore;
use crate::sam::Sam;
use crate::sam::SamConfig;
use crate::train::loss::bce_with_logits;
use crate::util::tensors::TensorMap;
use candle_core::{Device, Tensor};

/// What [`device_parity`] measured.
#[derive(Debug, Clone)]
pub struct ParityReport {
    pub config: String,
    pub image_size: usize,
    pub batch: usize,
    /// The checked device, in words.
    pub device: String,
    /// Error of the low-resolution mask logits.
    pub logits_err: f64,
    /// Error of the loss value.
    pub loss_err: f64,
    /// Gradients compared (parameters that get one on the reference path).
    pub grads_compared: usize,
    /// The parameter whose gradient differs most, and its error.
    pub worst_grad: (String, f64),
    /// Parameters with a reference gradient but none on the checked device (must be empty).
    pub missing: Vec<String>,
}

impl ParityReport {
    /// The largest error over logits, loss and gradients.
    pub fn worst(&self) -> f64 {
        self.logits_err.max(self.loss_err).max(self.worst_grad.1)
    }
}

/// `max|a − b| / max|b|` ([`rel_err_floor`] without a floor).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    rel_err_floor(a, b, 0.0)
}

/// Loss, logits and every parameter's gradient of one prompt-free forward + backward.
fn run(
    cfg: &SamConfig,
    weights: &TensorMap,
    x: &Tensor,
    t: &Tensor,
    device: &Device,
) -> Result<(Tensor, Tensor, TensorMap)> {
    let on_dev: TensorMap = weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(device)?)))
        .collect::<Result<_>>()?;
    let store = ParamStore::trainable(on_dev, device);
    let sam = Sam::new(cfg, &store)?;
    store.check_all_used()?;
    let (x, t) = (x.to_device(device)?, t.to_device(device)?);
    let logits = sam.forward_prompt_free(&x)?;
    let loss = bce_with_logits(&logits, &t)?;
    let grads = loss.backward()?;
    let mut out = TensorMap::new();
    for (name, var) in store.trainable_vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            out.insert(name, g.to_device(&Device::Cpu)?);
        }
    }
    Ok((
        loss.to_device(&Device::Cpu)?,
        logits.to_device(&Device::Cpu)?,
        out,
    ))
}

/// Compare `device`'s default path with the CPU reference path on `weights` (or a seeded random
/// initialisation of `cfg`) and a seeded random batch of `batch` images and masks.
pub fn device_parity(
    cfg: &SamConfig,
    weights: Option<TensorMap>,
    batch: usize,
    device: &Device,
    seed: u64,
) -> Result<ParityReport> {
    if batch == 0 {
        return Err(Error::Config {
            field: "batch".into(),
            msg: "must be at least 1".into(),
        });
    }
    let cpu = Device::Cpu;
    let weights = match weights {
        Some(w) => w
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&cpu)?)))
            .collect::<Result<TensorMap>>()?,
        None => {
            let init = ParamStore::init(&cpu, seed);
            Sam::new(cfg, &init)?;
            init.current_tensors()?
        }
    };
    let (x, t) = crate::bench::train::random_batch(batch, cfg.image_size, seed, &cpu)?;
    let (loss_r, logits_r, grads_r) = with_reference_path(|| run(cfg, &weights, &x, &t, &cpu))?;
    let (loss_d, logits_d, grads_d) = run(cfg, &weights, &x, &t, device)?;
    let mut largest = 0f64;
    for g in grads_r.values() {
        largest = largest.max(max_abs(g)?);
    }
    let floor = 1e-3 * largest;
    let mut worst = (String::new(), 0.0f64);
    let mut missing = Vec::new();
    for (name, gr) in &grads_r {
        match grads_d.get(name) {
            Some(gd) => {
                let e = rel_err_floor(gd, gr, floor)?;
                if e > worst.1 || worst.0.is_empty() {
                    worst = (name.clone(), e);
                }
            }
            None => missing.push(name.clone()),
        }
    }
    Ok(ParityReport {
        config: cfg.name.clone(),
        image_size: cfg.image_size,
        batch,
        device: format!("{device:?}"),
        logits_err: rel_err(&logits_d, &logits_r)?,
        loss_err: rel_err(&loss_d, &loss_r)?,
        grads_compared: grads_r.len() - missing.len(),
        worst_grad: worst,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the check compares the fast path (fused kernels, fused attention, linear
    /// carriers on trainable weights) with the composed reference: every parameter's
    /// gradient arrives and agrees within 1e-4 of its scale.
    #[test]
    fn cpu_fast_path_matches_the_reference_path() {
        let mut cfg = SamConfig::tiny().with_image_size(64);
        cfg.encoder_depth = 2;
        cfg.encoder_global_attn_indexes = vec![1];
        let r = device_parity(&cfg, None, 2, &Device::Cpu, 3).unwrap();
        assert!(r.missing.is_empty(), "{:?}", r.missing);
        assert!(r.grads_compared > 60, "{}", r.grads_compared);
        assert!(r.worst() < 1e-4, "{r:?}");
        assert!(
            r.logits_err > 0.0 || r.worst_grad.1 > 0.0,
            "two paths, some rounding"
        );
    }

    #[test]
    fn rel_err_is_relative_to_the_reference_scale() {
        let b = Tensor::new(&[2f32, -4.0], &Device::Cpu).unwrap();
        let a = Tensor::new(&[2f32, -3.0], &Device::Cpu).unwrap();
        assert!((rel_err(&a, &b).unwrap() - 0.25).abs() < 1e-12);
        assert!((rel_err_floor(&a, &b, 10.0).unwrap() - 0.1).abs() < 1e-12);
        assert!(rel_err(&a, &a.reshape((2, 1)).unwrap()).is_err());
    }
}
