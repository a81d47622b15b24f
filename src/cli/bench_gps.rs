//! `gps-seg bench gps`: (1) trainable entries and Adam-state bytes of GPS vs the baselines for
//! SAM shapes (tiny, vit_b), from shapes only; (2) selection time (top-K per row, and the
//! layer/net levels with the same budget) over a tensor set the size of a SAM image encoder's
//! selected weights, with random gradients.

use gps_seg::gps::counts::thousands;
use gps_seg::gps::{select_from_grads, Counts, Criterion, Level, Policy, Treatment};
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
            let sel = select_from_grads(
                &grads,
                Some(&grads),
                &policy,
                k,
                level,
                Criterion::Gradient,
                0,
            )?;
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

/// Meta's SAM state-dict names and shapes for `cfg`.
/// TODO(lead): replace with `sam::Sam::param_shapes` once the port lands (a copy lives in
/// `tests/gps.rs`).
fn sam_param_shapes(cfg: &SamConfig) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    fn push(v: &mut Vec<(String, Vec<usize>)>, n: String, s: &[usize]) {
        v.push((n, s.to_vec()));
    }
    fn lin(v: &mut Vec<(String, Vec<usize>)>, p: &str, i: usize, o: usize) {
        v.push((format!("{p}.weight"), vec![o, i]));
        v.push((format!("{p}.bias"), vec![o]));
    }
    fn norm(v: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize) {
        v.push((format!("{p}.weight"), vec![c]));
        v.push((format!("{p}.bias"), vec![c]));
    }
    let (d, g, c, m) = (
        cfg.encoder_embed_dim,
        cfg.grid_size(),
        cfg.prompt_embed_dim,
        cfg.mask_in_chans,
    );
    let hd = d / cfg.encoder_num_heads.max(1);
    let mlp = (d as f64 * cfg.mlp_ratio) as usize;
    let e = "image_encoder";
    push(
        &mut v,
        format!("{e}.patch_embed.proj.weight"),
        &[d, 3, cfg.patch_size, cfg.patch_size],
    );
    push(&mut v, format!("{e}.patch_embed.proj.bias"), &[d]);
    push(&mut v, format!("{e}.pos_embed"), &[1, g, g, d]);
    for i in 0..cfg.encoder_depth {
        let b = format!("{e}.blocks.{i}");
        let s = if cfg.encoder_global_attn_indexes.contains(&i) {
            g
        } else {
            cfg.window_size
        };
        norm(&mut v, &format!("{b}.norm1"), d);
        lin(&mut v, &format!("{b}.attn.qkv"), d, 3 * d);
        lin(&mut v, &format!("{b}.attn.proj"), d, d);
        push(&mut v, format!("{b}.attn.rel_pos_h"), &[2 * s - 1, hd]);
        push(&mut v, format!("{b}.attn.rel_pos_w"), &[2 * s - 1, hd]);
        norm(&mut v, &format!("{b}.norm2"), d);
        lin(&mut v, &format!("{b}.mlp.lin1"), d, mlp);
        lin(&mut v, &format!("{b}.mlp.lin2"), mlp, d);
    }
    push(&mut v, format!("{e}.neck.0.weight"), &[c, d, 1, 1]);
    norm(&mut v, &format!("{e}.neck.1"), c);
    push(&mut v, format!("{e}.neck.2.weight"), &[c, c, 3, 3]);
    norm(&mut v, &format!("{e}.neck.3"), c);
    let p = "prompt_encoder";
    push(
        &mut v,
        format!("{p}.pe_layer.positional_encoding_gaussian_matrix"),
        &[2, c / 2],
    );
    for i in 0..4 {
        push(&mut v, format!("{p}.point_embeddings.{i}.weight"), &[1, c]);
    }
    push(&mut v, format!("{p}.not_a_point_embed.weight"), &[1, c]);
    push(
        &mut v,
        format!("{p}.mask_downscaling.0.weight"),
        &[m / 4, 1, 2, 2],
    );
    push(&mut v, format!("{p}.mask_downscaling.0.bias"), &[m / 4]);
    norm(&mut v, &format!("{p}.mask_downscaling.1"), m / 4);
    push(
        &mut v,
        format!("{p}.mask_downscaling.3.weight"),
        &[m, m / 4, 2, 2],
    );
    push(&mut v, format!("{p}.mask_downscaling.3.bias"), &[m]);
    norm(&mut v, &format!("{p}.mask_downscaling.4"), m);
    push(
        &mut v,
        format!("{p}.mask_downscaling.6.weight"),
        &[c, m, 1, 1],
    );
    push(&mut v, format!("{p}.mask_downscaling.6.bias"), &[c]);
    push(&mut v, format!("{p}.no_mask_embed.weight"), &[1, c]);
    let md = "mask_decoder";
    let attn = |v: &mut Vec<(String, Vec<usize>)>, a: &str, inner: usize| {
        for q in ["q_proj", "k_proj", "v_proj"] {
            lin(v, &format!("{a}.{q}"), c, inner);
        }
        lin(v, &format!("{a}.out_proj"), inner, c);
    };
    for i in 0..cfg.decoder_depth {
        let l = format!("{md}.transformer.layers.{i}");
        attn(&mut v, &format!("{l}.self_attn"), c);
        norm(&mut v, &format!("{l}.norm1"), c);
        attn(&mut v, &format!("{l}.cross_attn_token_to_image"), c / 2);
        norm(&mut v, &format!("{l}.norm2"), c);
        lin(&mut v, &format!("{l}.mlp.lin1"), c, cfg.decoder_mlp_dim);
        lin(&mut v, &format!("{l}.mlp.lin2"), cfg.decoder_mlp_dim, c);
        norm(&mut v, &format!("{l}.norm3"), c);
        norm(&mut v, &format!("{l}.norm4"), c);
        attn(&mut v, &format!("{l}.cross_attn_image_to_token"), c / 2);
    }
    attn(
        &mut v,
        &format!("{md}.transformer.final_attn_token_to_image"),
        c / 2,
    );
    norm(&mut v, &format!("{md}.transformer.norm_final_attn"), c);
    let nm = cfg.num_multimask_outputs + 1;
    push(&mut v, format!("{md}.iou_token.weight"), &[1, c]);
    push(&mut v, format!("{md}.mask_tokens.weight"), &[nm, c]);
    push(
        &mut v,
        format!("{md}.output_upscaling.0.weight"),
        &[c, c / 4, 2, 2],
    );
    push(&mut v, format!("{md}.output_upscaling.0.bias"), &[c / 4]);
    norm(&mut v, &format!("{md}.output_upscaling.1"), c / 4);
    push(
        &mut v,
        format!("{md}.output_upscaling.3.weight"),
        &[c / 4, c / 8, 2, 2],
    );
    push(&mut v, format!("{md}.output_upscaling.3.bias"), &[c / 8]);
    for i in 0..nm {
        let h = format!("{md}.output_hypernetworks_mlps.{i}.layers");
        lin(&mut v, &format!("{h}.0"), c, c);
        lin(&mut v, &format!("{h}.1"), c, c);
        lin(&mut v, &format!("{h}.2"), c, c / 8);
    }
    let h = cfg.iou_head_hidden_dim;
    let iou = format!("{md}.iou_prediction_head.layers");
    let depth = cfg.iou_head_depth.max(2);
    lin(&mut v, &format!("{iou}.0"), c, h);
    for j in 1..depth - 1 {
        lin(&mut v, &format!("{iou}.{j}"), h, h);
    }
    lin(&mut v, &format!("{iou}.{}", depth - 1), h, nm);
    v
}
