//! Comparing weights: how far one set of tensors is from another, how many entries of two
//! selection files agree.

use candle_core::Device;
use gps_seg::util::tensors::{self, TensorMap};
use std::path::Path;

/// How far weights `a` are from `b`: (‖a − b‖ / ‖b‖ over all trainable entries together,
/// the largest max|a − b| / max|b| of one tensor). The second is dominated by tensors whose
/// exact gradient is zero (attention key biases: a constant added to every key leaves the
/// softmax unchanged), whose computed gradient is rounding noise that Adam normalises to
/// steps of the learning rate's size; one process summing in another order moves them as much.
pub fn rel_diffs(a: &TensorMap, b: &TensorMap) -> (f64, f64) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same tensors"
    );
    let (mut d2, mut n2, mut worst) = (0f64, 0f64, 0f64);
    for (name, ta) in a {
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        d2 += va
            .iter()
            .zip(&vb)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>();
        n2 += vb.iter().map(|y| (*y as f64).powi(2)).sum::<f64>();
        let scale = vb.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
        let diff = va
            .iter()
            .zip(&vb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
        worst = worst.max(diff / scale);
    }
    ((d2 / n2.max(1e-30)).sqrt(), worst)
}

/// (entries equal, entries) over every tensor of two selection files.
pub fn agreement(a: &Path, b: &Path) -> (usize, usize) {
    let (ta, tb) = (
        tensors::load(a, &Device::Cpu).unwrap(),
        tensors::load(b, &Device::Cpu).unwrap(),
    );
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let (mut same, mut all) = (0, 0);
    for (name, x) in &ta {
        let f = |t: &candle_core::Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (x, y) = (f(x), f(&tb[name]));
        same += x.iter().zip(&y).filter(|(p, q)| p == q).count();
        all += x.len();
    }
    (same, all)
}
