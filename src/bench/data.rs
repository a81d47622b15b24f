//! Data-pipeline throughput (decode + resize + augment + collate) on Kvasir-sized synthetic
//! JPEGs: one thread vs the rayon pool, with and without the in-memory cache. Used by
//! `gps-seg bench data`; numbers are measured, never asserted.

use crate::data::augment::SegAugment;
use crate::data::kvasir::KvasirDataset;
use crate::data::loader::{Loader, LoaderConfig, SegSource};
use crate::data::resize::Resize;
use crate::data::synth_kvasir::{self, SynthKvasirConfig};
use crate::error::{Error, Result};
use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;

/// Settings of the benchmark.
#[derive(Debug, Clone)]
pub struct DataBenchConfig {
    pub images: usize,
    /// Largest side of the generated JPEGs (Kvasir: up to 1920).
    pub max_side: usize,
    /// Model input size S.
    pub size: usize,
    pub batch_size: usize,
    pub resize: Resize,
}

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct DataBenchRow {
    pub name: String,
    pub threads: usize,
    pub images: usize,
    pub seconds: f64,
}

impl DataBenchRow {
    pub fn images_per_s(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn epoch(l: &mut Loader<SegSource>, dev: &Device) -> Result<usize> {
    let mut n = 0;
    while let Some(b) = l.next_batch(dev)? {
        n += b.ids.len();
    }
    Ok(n)
}

/// Generate the images in a temporary folder (removed afterwards) and time one epoch per row.
pub fn run(cfg: &DataBenchConfig) -> Result<Vec<DataBenchRow>> {
    let dir =
        TempDir(std::env::temp_dir().join(format!("gps-seg-bench-data-{}", std::process::id())));
    synth_kvasir::generate(
        &dir.0,
        &SynthKvasirConfig {
            count: cfg.images,
            seed: 0,
            max_side: cfg.max_side,
            jpeg_quality: 90,
        },
    )?;
    let ds = KvasirDataset::open(&dir.0)?;
    let src = SegSource {
        dataset: ds,
        size: cfg.size,
        resize: cfg.resize,
        augment: SegAugment::default(),
        prompts: None,
    };
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    let pool_threads = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::msg(format!("cannot build a 1-thread pool: {e}")))?;
    let mut lc = LoaderConfig::train(cfg.batch_size, 0);
    lc.cache = false;
    let mut l = Loader::all(src.clone(), lc.clone())?;
    let t = Instant::now();
    let n = one.install(|| epoch(&mut l, &dev))?;
    rows.push(DataBenchRow {
        name: "no cache".into(),
        threads: 1,
        images: n,
        seconds: t.elapsed().as_secs_f64(),
    });
    let mut l = Loader::all(src.clone(), lc.clone())?;
    let t = Instant::now();
    let n = epoch(&mut l, &dev)?;
    rows.push(DataBenchRow {
        name: "no cache".into(),
        threads: pool_threads,
        images: n,
        seconds: t.elapsed().as_secs_f64(),
    });
    lc.cache = true;
    let mut l = Loader::all(src, lc)?;
    for name in ["cache, epoch 1 (fills)", "cache, epoch 2 (hits)"] {
        let t = Instant::now();
        let n = epoch(&mut l, &dev)?;
        rows.push(DataBenchRow {
            name: name.into(),
            threads: pool_threads,
            images: n,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(rows)
}
