//! Seeded inputs: random images, a synthetic Kvasir-shaped set, a tiny segmentation run.

use candle_core::{Device, Tensor};
use gps_seg::data::synth_kvasir::{generate, SynthKvasirConfig};
use gps_seg::sam::SamConfig;
use gps_seg::train::seg::SegTrainConfig;
use gps_seg::util::Rng;
use ndarray::ArrayD;
use std::path::Path;

/// `n·3·s·s` values uniform in `[0, 1)` from `Rng::new(seed)`, in order.
fn pixels(n: usize, s: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * 3 * s * s).map(|_| rng.f32()).collect()
}

/// `n` seeded RGB images in `[0, 1)`, `[n, 3, s, s]` on the CPU.
pub fn images(n: usize, s: usize, seed: u64) -> Tensor {
    Tensor::from_vec(pixels(n, s, seed), (n, 3, s, s), &Device::Cpu).unwrap()
}

/// [`images`] as an ndarray (ONNX Runtime's input).
pub fn images_array(n: usize, s: usize, seed: u64) -> ArrayD<f32> {
    ArrayD::from_shape_vec(vec![n, 3, s, s], pixels(n, s, seed)).unwrap()
}

/// A synthetic Kvasir-shaped set of `count` pairs in `dir` (JPEG quality 90).
pub fn synth_kvasir(dir: &Path, count: usize, seed: u64, max_side: usize) {
    let cfg = SynthKvasirConfig {
        count,
        seed,
        max_side,
        jpeg_quality: 90,
    };
    generate(dir, &cfg).unwrap();
}

/// The sizes that differ between the test files' tiny segmentation runs.
#[derive(Debug, Clone, Copy)]
pub struct TinySeg {
    pub image_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub select_batches: usize,
}

/// A tiny segmentation run on `data`: SAM tiny at `t.image_size`, 4 training and 4 test
/// images, at most 2 steps per epoch, no flips, lr 1e-3.
pub fn tiny_seg_cfg(data: &Path, t: TinySeg) -> SegTrainConfig {
    let sam = SamConfig::tiny().with_image_size(t.image_size);
    let mut c = SegTrainConfig::recipe(data.to_path_buf(), None, sam);
    c.epochs = t.epochs;
    c.batch_size = t.batch_size;
    c.eval_batch_size = t.eval_batch_size;
    c.train_limit = Some(4);
    c.test_limit = Some(4);
    c.select_batches = Some(t.select_batches);
    c.hflip = 0.0;
    c.lr = 1e-3;
    c.max_steps_per_epoch = Some(2);
    c
}
