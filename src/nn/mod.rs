//! Differentiable building blocks shared by every model: named params ([`param`]), layers
//! whose backward is verified ([`layers`]), the CPU kernels under them with their own backward
//! ([`kernels`]: fused softmax / layer norm / GELU, the linear carrier, window partition,
//! query-chunked attention, depthwise conv), autocast to bf16/f16 ([`precision`]) and
//! finite-difference checks ([`gradcheck`]).
//!
//! Layering, bottom up: `kernels` (imports nothing above it) → `param`, `precision` → `layers`
//! (chooses kernel or composed ops) → this file (batch splitting over threads).

pub mod gradcheck;
pub mod kernels;
pub mod layers;
pub mod param;
pub mod precision;

pub use layers::{Conv2d, ConvTranspose2d, Embedding, LayerNorm, LayerNorm2d, Linear};
pub use param::{Init, Param, ParamStore, Role, RolePolicy};
pub use precision::Precision;

/// `loss.backward()` keeping only the gradients of vars. Candle's backward also stores a
/// gradient for every untracked leaf an op reads (frozen weights, constants, the upstream
/// gradient of a recomputed block) and never frees them while the store lives; a backward
/// pass per encoder block merged into one store thus kept each block's leaf gradients to the
/// end (measured: ≈ 210 MB per ViT-B block at 512 px, docs/PERF.md). The kept gradients are
/// the very tensors `backward` computed: identical values.
pub fn backward_vars(
    loss: &candle_core::Tensor,
) -> candle_core::Result<candle_core::backprop::GradStore> {
    let vars: Vec<candle_core::Tensor> = loss
        .sorted_nodes()
        .into_iter()
        .filter(|n| n.is_variable())
        .cloned()
        .collect();
    let mut all = loss.backward()?;
    let mut kept = candle_core::backprop::GradStore::default();
    for v in &vars {
        if let Some(g) = all.remove(v) {
            kept.insert(v, g);
        }
    }
    Ok(kept)
}

/// A batched inference forward `f: [n, …] → [n, …]` run by [`crate::util::threads::split_items`] on CPU tensors:
/// the batch is cut along dim 0 into one contiguous chunk per thread, each chunk's forward
/// runs on its own thread, and the outputs are concatenated in order. Each output row is
/// computed from its own input row alone, so the result equals `f(x)` up to float rounding.
/// Measured on a 2-core Intel Xeon, AVX-512 (prompt-free tiny SAM @256, docs/PERF.md): batch 4
/// 63.5 → 49.3 ms, batch 8 113 → 90 ms. Other devices, a batch of one, or one thread: `f(x)` on a worker.
pub fn split_forward(
    x: &candle_core::Tensor,
    f: impl Fn(&candle_core::Tensor) -> crate::error::Result<candle_core::Tensor> + Sync,
) -> crate::error::Result<candle_core::Tensor> {
    let n = x.dim(0)?;
    if !x.device().is_cpu()
        || n < 2
        || kernels::reference_path()
        || crate::util::threads::single_thread_pools().len() < 2
    {
        return crate::util::threads::on_worker(|| f(x));
    }
    let parts = crate::util::threads::split_items(n, |r| f(&x.narrow(0, r.start, r.len())?))
        .into_iter()
        .collect::<crate::error::Result<Vec<_>>>()?;
    Ok(candle_core::Tensor::cat(&parts, 0)?)
}

/// The loss and var gradients of a batch of `n` items whose loss is a weighted sum of
/// per-chunk losses (every mean-per-image loss is): `chunk_loss(range)` returns the loss of
/// the items in `range` already weighted (`range.len() / n` for a batch mean). On the CPU each
/// contiguous chunk (one per thread, `util::threads::split_items`) runs its forward and
/// backward on its own thread; the chunk losses and var gradients are summed (in chunk order).
/// Elsewhere, or for `n < 2`, it is one forward and backward of `chunk_loss(0..n)`. The sum
/// equals the whole batch's gradients up to float rounding
/// (`split_backward_equals_the_whole_batch`).
pub fn split_backward(
    n: usize,
    on_cpu: bool,
    chunk_loss: impl Fn(std::ops::Range<usize>) -> crate::error::Result<candle_core::Tensor> + Sync,
) -> crate::error::Result<(candle_core::Tensor, candle_core::backprop::GradStore)> {
    let whole = || -> crate::error::Result<_> {
        let loss = chunk_loss(0..n)?;
        let grads = backward_vars(&loss)?;
        Ok((loss, grads))
    };
    if !on_cpu || n < 2 || kernels::reference_path() {
        return crate::util::threads::on_worker(whole);
    }
    let parts = crate::util::threads::split_items(n, |r| -> crate::error::Result<_> {
        let loss = chunk_loss(r)?;
        let grads = backward_vars(&loss)?;
        Ok((loss.detach(), grads))
    });
    let mut parts = parts.into_iter();
    let (mut loss, mut grads) = match parts.next() {
        Some(p) => p?,
        None => return crate::util::threads::on_worker(whole),
    };
    for p in parts {
        let (l, g) = p?;
        loss = (loss + l)?;
        for id in g.get_ids().copied().collect::<Vec<_>>() {
            if let Some(t) = g.get_id(id) {
                let sum = match grads.get_id(id) {
                    Some(acc) => (acc + t)?,
                    None => t.clone(),
                };
                grads.insert_id(id, sum);
            }
        }
    }
    Ok((loss, grads))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn split_forward_keeps_the_order_and_the_values_and_uses_every_thread() {
        use candle_core::{Device, Tensor};
        let x = Tensor::arange(0f32, 35., &Device::Cpu)
            .unwrap()
            .reshape((7, 5))
            .unwrap();
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        let f = |t: &Tensor| -> crate::error::Result<Tensor> {
            threads.lock().unwrap().insert(std::thread::current().id());
            Ok(((t * 0.1)?.exp()? + 1.0)?)
        };
        let whole = f(&x).unwrap();
        threads.lock().unwrap().clear();
        let split = super::split_forward(&x, f).unwrap();
        assert_eq!(split.dims(), &[7, 5]);
        assert_eq!(super::gradcheck::max_abs_diff(&split, &whole).unwrap(), 0.0);
        let used = threads.lock().unwrap().len();
        assert_eq!(
            used,
            crate::util::threads::single_thread_pools().len().min(7)
        );
        // A batch of one runs in place.
        let one = super::split_forward(&x.narrow(0, 0, 1).unwrap(), f).unwrap();
        assert_eq!(one.dims(), &[1, 5]);
        // Errors of a chunk come back as errors.
        let e = super::split_forward(&x, |_| Err(crate::error::Error::msg("chunk failed")));
        assert!(e.unwrap_err().to_string().contains("chunk failed"));
    }

    #[test]
    fn backward_vars_keeps_exactly_the_var_gradients_of_backward() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, -2., 3.], &dev).unwrap();
        let frozen = Tensor::new(&[0.5f32, 4., -1.], &dev).unwrap();
        let loss = (w.as_tensor() * &frozen)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let all = loss.backward().unwrap();
        // Candle's own store also holds a gradient for the untracked leaf.
        assert!(all.get(&frozen).is_some());
        let kept = super::backward_vars(&loss).unwrap();
        assert!(kept.get(&frozen).is_none());
        assert_eq!(kept.get_ids().count(), 1);
        assert_eq!(
            kept.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            all.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
