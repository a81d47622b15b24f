//! Differentiable building blocks shared by every model: named params ([`param`]), layers
//! whose backward is verified ([`layers`]), fused CPU kernels with their own backward
//! ([`fused`], and the query-chunked attention of [`attention`]), autocast to bf16/f16
//! ([`precision`]) and finite-difference checks ([`gradcheck`]).

pub mod attention;
pub mod fused;
pub mod gradcheck;
pub mod layers;
pub mod param;
pub mod precision;
pub mod sparse_grad;

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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

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
