//! `gps-seg bench gps`: (1) trainable entries and Adam-state bytes of GPS vs the baselines for
//! SAM shapes (tiny, vit_b), from shapes only; (2) selection time (top-K per row, and the
//! layer/net levels with the same budget) over a tensor set the size of a SAM image encoder's
//! selected weights, with random gradients.

use gps_seg::gps::counts::thousands;
use gps_seg::gps::select::{select, SelectSpec};
use gps_seg::gps::{Counts, Criterion, Level, Policy, Treatment};
use gps_seg::sam::config::SamConfig;
use gps_seg::util::tensors::TensorMap;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SAM preset whose encoder sizes the selection-timing tensor set (tiny, vit_b, vit_l, vit_h).
    #[arg(long, default_value = "vit_b")]
    pub model: String,
    /// K values to time.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub k: Vec<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    println!(
        "{}",
        gps_seg::util::cpu::bench_header(rayon::current_num_threads())
    );
    println!("## Trainable entries and Adam state (m + v, f32) by policy, K = 1");
    println!(
        "{:<7} {:<9} {:>14} {:>14} {:>9} {:>12}",
        "model", "policy", "tuned", "total", "tuned %", "Adam state"
    );
    for preset in ["tiny", "vit_b"] {
        let shapes = sam_param_shapes(&SamConfig::preset(preset)?);
        for p in ["sam", "decoder", "full"] {
            let policy = Policy::preset(p).ok_or_else(|| anyhow::anyhow!("no preset {p}"))?;
            let t = Counts::from_shapes(&shapes, &policy, 1).totals();
            println!(
                "{:<7} {:<9} {:>14} {:>14} {:>8.3}% {:>9.2} MB",
                preset,
                if p == "sam" { "gps(sam)" } else { p },
                thousands(t.tuned()),
                thousands(t.total),
                t.tuned_pct(),
                (8 * t.tuned()) as f64 / 1e6
            );
        }
    }

    let cfg = SamConfig::preset(&a.model)?;
    let policy = Policy::sam();
    let dev = candle_core::Device::Cpu;
    let mut grads = TensorMap::new();
    for (n, s) in sam_param_shapes(&cfg) {
        if policy.treatment(&n, &s) == Treatment::Selected {
            grads.insert(n, candle_core::Tensor::randn(0f32, 1f32, s, &dev)?);
        }
    }
    let entries: usize = grads.values().map(|t| t.elem_count()).sum();
    println!(
        "\n## Selection time: {} selected tensors of SAM {} ({} entries), random gradients, {} rayon threads",
        grads.len(),
        a.model,
        thousands(entries),
        rayon::current_num_threads()
    );
    println!(
        "{:<8} {:>4} {:>12} {:>10}",
        "level", "K", "selected", "seconds"
    );
    for &k in &a.k {
        for level in [Level::Neuron, Level::Layer, Level::Net] {
            let t0 = Instant::now();
            let spec = SelectSpec {
                policy: &policy,
                k,
                level,
                criterion: Criterion::Gradient,
                seed: 0,
            };
            let sel = select(&grads, Some(&grads), &spec)?;
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "{:<8} {:>4} {:>12} {:>10.3}",
                format!("{level:?}").to_lowercase(),
                k,
                thousands(sel.sizes().0),
                dt
            );
        }
    }
    Ok(())
}

/// Meta's SAM state-dict names and shapes for `cfg` (the port's listing; buffers included,
/// as a checkpoint holds them — the policy keeps them frozen).
fn sam_param_shapes(cfg: &SamConfig) -> Vec<(String, Vec<usize>)> {
    gps_seg::sam::Sam::param_shapes(cfg)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect()
}
