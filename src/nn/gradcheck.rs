//! Finite-difference gradient checks. Candle silently drops gradients for some fused ops, so
//! every op this project writes itself is tested against central differences in f64.

use crate::error::Result;
use crate::util::Rng;
use candle_core::{DType, Device, Tensor, Var};

/// Compare the autograd gradient of `f(x)` (reduced with a fixed random projection to a
/// scalar) with central finite differences at `probes` random entries of `x` (f64).
/// Returns the largest relative error `|a − n| / max(1e-6, |a| + |n|)` seen.
pub fn check<F>(x: &Tensor, probes: usize, seed: u64, f: F) -> Result<f64>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let x = x.to_dtype(DType::F64)?;
    let var = Var::from_tensor(&x)?;
    let y0 = f(var.as_tensor())?;
    let mut rng = Rng::new(seed);
    let proj: Vec<f64> = (0..y0.elem_count()).map(|_| rng.normal() as f64).collect();
    let proj = Tensor::from_vec(proj, y0.shape(), &Device::Cpu)?.to_device(x.device())?;
    let scalar = |y: &Tensor| -> Result<f64> { Ok((y * &proj)?.sum_all()?.to_scalar::<f64>()?) };
    let loss = (y0 * &proj)?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| crate::error::Error::msg("no gradient reached the input"))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    for _ in 0..probes {
        let i = rng.below(base.len());
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let tp = Tensor::from_vec(plus, x.shape(), x.device())?;
        let tm = Tensor::from_vec(minus, x.shape(), x.device())?;
        let num = (scalar(&f(&tp)?)? - scalar(&f(&tm)?)?) / (2.0 * eps);
        let err = (g[i] - num).abs() / (g[i].abs() + num.abs()).max(1e-6);
        worst = worst.max(err);
    }
    Ok(worst)
}

/// A seeded standard-normal tensor of `shape` in `dtype` on the CPU (tests and benchmarks).
pub fn randn(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.normal() as f64).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// The largest `|a − b|` over all entries (shapes must match), as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(crate::error::Error::msg(format!(
            "max_abs_diff: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// The largest `|t|` over all entries, as f64.
pub fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// `max|a − b| / max(max|b|, floor)`: the largest difference relative to the reference `b`'s
/// scale (at least `floor`); with `floor = 0` and `b = 0` the difference is absolute. Both
/// tensors are compared on the CPU in f64; shapes must match.
pub fn rel_err_floor(a: &Tensor, b: &Tensor, floor: f64) -> Result<f64> {
    let (a, b) = (a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?);
    let diff = max_abs_diff(&a, &b)?;
    let scale = max_abs(&b)?.max(floor);
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layers::{interp_matrix, layer_norm, resize_bilinear, softmax_last};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        randn(shape, seed, DType::F64).unwrap()
    }

    #[test]
    fn layer_norm_softmax_gelu_bilinear_gradients_match_finite_differences() {
        let x = rand(&[2, 3, 5], 1);
        let w = rand(&[5], 2);
        let b = rand(&[5], 3);
        let e = check(&x, 20, 0, |x| layer_norm(x, &w, &b, 1e-6)).unwrap();
        assert!(e < 1e-5, "layer_norm {e}");
        let e = check(&x, 20, 0, softmax_last).unwrap();
        assert!(e < 1e-5, "softmax {e}");
        let e = check(&x, 20, 0, |x| Ok(x.gelu_erf()?)).unwrap();
        assert!(e < 1e-5, "gelu {e}");
        let x = rand(&[1, 2, 4, 6], 4);
        let e = check(&x, 20, 0, |x| {
            resize_bilinear(&x.to_dtype(DType::F32)?, 7, 5)?
                .to_dtype(DType::F64)
                .map_err(Into::into)
        });
        // f32 interpolation: only check that a gradient exists and is roughly right.
        assert!(e.unwrap() < 1e-2);
    }

    #[test]
    fn interp_matrix_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.arange(4.).view(1,1,4), size=8, mode='linear')
        // = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]
        let m = interp_matrix(4, 8);
        let src = [0f32, 1., 2., 3.];
        let out: Vec<f32> = (0..8)
            .map(|i| (0..4).map(|j| m[i * 4 + j] * src[j]).sum())
            .collect();
        let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }
}
