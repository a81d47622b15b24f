//! GPS core end to end on tiny tensors: selection against brute force, budgets across levels,
//! seeded criteria, SAM ViT-B counts from shapes, masked training with Adam on a toy MLP,
//! and the artifact round trip select → train → delta → save → load → merge → rebuild.

use candle_core::{Device, Tensor, D};
use gps_seg::gps::artifact::{Artifact, BaseModel, SelectionInfo, DELTA_FILE, SELECTION_FILE};
use gps_seg::gps::{
    accumulate, delta_from_store, grad_roles, merge, merge_with_report, select_by_gradient,
    select_from_grads, Counts, Criterion, Level, Policy, Rule, Treatment,
};
use gps_seg::nn::{Linear, ParamStore};
use gps_seg::sam::config::SamConfig;
use gps_seg::train::fit::optim::{Adam, Optimizer};
use gps_seg::util::tensors::{save_safetensors, TensorMap};
use gps_seg::util::Rng;

// ---------------------------------------------------------------- SAM shapes (reference names)

fn push(v: &mut Vec<(String, Vec<usize>)>, name: String, shape: &[usize]) {
    v.push((name, shape.to_vec()));
}

fn linear(v: &mut Vec<(String, Vec<usize>)>, p: &str, i: usize, o: usize) {
    push(v, format!("{p}.weight"), &[o, i]);
    push(v, format!("{p}.bias"), &[o]);
}

fn norm(v: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize) {
    push(v, format!("{p}.weight"), &[c]);
    push(v, format!("{p}.bias"), &[c]);
}

/// Every tensor of Meta's SAM state dict for `cfg`, by name (incl. the prompt encoder's
/// positional-encoding buffer). To be replaced by `sam::Sam::param_shapes` once the port lands.
fn sam_param_shapes(cfg: &SamConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    let d = cfg.encoder_embed_dim;
    let g = cfg.grid_size();
    let hd = d / cfg.encoder_num_heads;
    let mlp = (d as f64 * cfg.mlp_ratio) as usize;
    let c = cfg.prompt_embed_dim;
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
        linear(&mut v, &format!("{b}.attn.qkv"), d, 3 * d);
        linear(&mut v, &format!("{b}.attn.proj"), d, d);
        push(&mut v, format!("{b}.attn.rel_pos_h"), &[2 * s - 1, hd]);
        push(&mut v, format!("{b}.attn.rel_pos_w"), &[2 * s - 1, hd]);
        norm(&mut v, &format!("{b}.norm2"), d);
        linear(&mut v, &format!("{b}.mlp.lin1"), d, mlp);
        linear(&mut v, &format!("{b}.mlp.lin2"), mlp, d);
    }
    push(&mut v, format!("{e}.neck.0.weight"), &[c, d, 1, 1]);
    norm(&mut v, &format!("{e}.neck.1"), c);
    push(&mut v, format!("{e}.neck.2.weight"), &[c, c, 3, 3]);
    norm(&mut v, &format!("{e}.neck.3"), c);

    let p = "prompt_encoder";
    let m = cfg.mask_in_chans;
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
    let attn = |v: &mut Vec<(String, Vec<usize>)>, a: &str, internal: usize| {
        linear(v, &format!("{a}.q_proj"), c, internal);
        linear(v, &format!("{a}.k_proj"), c, internal);
        linear(v, &format!("{a}.v_proj"), c, internal);
        linear(v, &format!("{a}.out_proj"), internal, c);
    };
    for i in 0..cfg.decoder_depth {
        let l = format!("{md}.transformer.layers.{i}");
        attn(&mut v, &format!("{l}.self_attn"), c);
        norm(&mut v, &format!("{l}.norm1"), c);
        attn(&mut v, &format!("{l}.cross_attn_token_to_image"), c / 2);
        norm(&mut v, &format!("{l}.norm2"), c);
        linear(&mut v, &format!("{l}.mlp.lin1"), c, cfg.decoder_mlp_dim);
        linear(&mut v, &format!("{l}.mlp.lin2"), cfg.decoder_mlp_dim, c);
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
        linear(&mut v, &format!("{h}.0"), c, c);
        linear(&mut v, &format!("{h}.1"), c, c);
        linear(&mut v, &format!("{h}.2"), c, c / 8);
    }
    let h = cfg.iou_head_hidden_dim;
    let iou = format!("{md}.iou_prediction_head.layers");
    linear(&mut v, &format!("{iou}.0"), c, h);
    for j in 1..cfg.iou_head_depth - 1 {
        linear(&mut v, &format!("{iou}.{j}"), h, h);
    }
    linear(&mut v, &format!("{iou}.{}", cfg.iou_head_depth - 1), h, nm);
    v
}

#[test]
fn sam_vit_b_counts_at_k1_match_the_reference_numbers() {
    let shapes = sam_param_shapes(&SamConfig::vit_b());
    let c = Counts::from_shapes(&shapes, &Policy::sam(), 1);
    let enc = c.totals_with_prefix("image_encoder.");
    assert_eq!(enc.selected, 84_224);
    // Every encoder bias trains, the neck LayerNorm2d biases (2 × 256) included, as in the
    // reference: 168,448 encoder entries at K = 1 (gps-method.md).
    assert_eq!(enc.trainable, 84_224);
    assert_eq!(enc.tuned(), 168_448);
    let pe = c.totals_with_prefix("prompt_encoder.");
    let md = c.totals_with_prefix("mask_decoder.");
    assert_eq!(pe.trainable, 6_220);
    assert_eq!(md.trainable, 4_058_340);
    assert_eq!(pe.selected + md.selected, 0);
    // The 2×128 positional-encoding buffer is frozen, not a parameter that trains.
    assert_eq!(pe.frozen, 256);
    assert_eq!(c.totals().tuned(), 168_448 + 4_064_560);
    // Larger K only grows the per-neuron part.
    let c2 = Counts::from_shapes(&shapes, &Policy::sam(), 2).totals_with_prefix("image_encoder.");
    assert_eq!(c2.selected, 2 * 84_224);
    // The decoder baseline trains the mask decoder only.
    let d = Counts::from_shapes(&shapes, &Policy::decoder(), 1).totals();
    assert_eq!(d.tuned(), 4_058_340);
    // Tiny config enumerates and counts too.
    let t = Counts::from_shapes(&sam_param_shapes(&SamConfig::tiny()), &Policy::sam(), 1);
    assert!(t.totals().tuned() > 0 && t.totals().tuned() < t.totals().total);
}

// ---------------------------------------------------------------- selection vs brute force

fn randn(shape: &[usize], rng: &mut Rng, quantise: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let x = rng.normal();
            if quantise {
                (x * 2.0).round() / 2.0
            } else {
                x
            }
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn all_selected() -> Policy {
    Policy {
        name: "all".into(),
        rules: vec![Rule::new("*", Treatment::Selected)],
        default: Treatment::Frozen,
    }
}

/// A conv kernel, two matrices and a bias; quantised grads so rows have ties.
fn toy_set(seed: u64) -> (TensorMap, TensorMap) {
    let mut rng = Rng::new(seed);
    let shapes: [(&str, &[usize]); 4] = [
        ("conv.weight", &[6, 3, 3, 3]),
        ("a.weight", &[10, 7]),
        ("b.weight", &[4, 50]),
        ("b.bias", &[6]),
    ];
    let mut w = TensorMap::new();
    let mut g = TensorMap::new();
    for (n, s) in shapes {
        w.insert(n.into(), randn(s, &mut rng, false));
        g.insert(n.into(), randn(s, &mut rng, true));
    }
    (w, g)
}

fn brute_row_topk(scores: &[f32], cols: usize, k: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for (r, row) in scores.chunks(cols).enumerate() {
        let mut c: Vec<usize> = (0..cols).collect();
        c.sort_by(|&a, &b| {
            row[b]
                .abs()
                .partial_cmp(&row[a].abs())
                .unwrap()
                .then(a.cmp(&b))
        });
        let mut t: Vec<u32> = c[..k.min(cols)]
            .iter()
            .map(|&j| (r * cols + j) as u32)
            .collect();
        t.sort();
        out.extend(t);
    }
    out
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn neuron_topk_matches_brute_force_including_conv_kernels_and_ties() {
    let (w, g) = toy_set(1);
    for k in [1, 2, 5, 27, 100] {
        let sel = select_from_grads(
            &w,
            Some(&g),
            &all_selected(),
            k,
            Level::Neuron,
            Criterion::Gradient,
            0,
        )
        .unwrap();
        for name in ["conv.weight", "a.weight", "b.weight"] {
            let t = &g[name];
            let cols = t.elem_count() / t.dims()[0];
            assert_eq!(
                sel.indices[name],
                brute_row_topk(&flat(t), cols, k),
                "{name} k={k}"
            );
        }
        // 1-D tensors are never selected: whole tensor trains.
        assert_eq!(sel.trainable, vec!["b.bias".to_string()]);
        assert!(!sel.indices.contains_key("b.bias"));
    }
}

#[test]
fn budgets_are_equal_across_levels_and_net_level_is_the_global_top() {
    let (w, g) = toy_set(2);
    for k in [1, 3, 60] {
        let expected: usize = [(6usize, 27usize), (10, 7), (4, 50)]
            .iter()
            .map(|&(r, c)| r * k.min(c))
            .sum();
        let mut per_level = Vec::new();
        for level in [Level::Neuron, Level::Layer, Level::Net] {
            let sel = select_from_grads(
                &w,
                Some(&g),
                &all_selected(),
                k,
                level,
                Criterion::Gradient,
                0,
            )
            .unwrap();
            sel.validate().unwrap();
            assert_eq!(sel.sizes().0, expected, "{level:?} k={k}");
            per_level.push(sel);
        }
        // Layer level: the same fraction of every tensor (to one entry), and within each tensor
        // the top entries by |score|.
        let numel_all: usize = [162usize, 70, 200].iter().sum();
        for (n, idx) in &per_level[1].indices {
            let numel = g[n].elem_count();
            let want = expected as f64 * numel as f64 / numel_all as f64;
            assert!(
                (idx.len() as f64 - want).abs() < 1.0,
                "{n}: {} vs {want}",
                idx.len()
            );
            let s: Vec<f32> = flat(&g[n]).iter().map(|x| x.abs()).collect();
            let min_in = idx
                .iter()
                .map(|&i| s[i as usize])
                .fold(f32::INFINITY, f32::min);
            let max_out = (0..s.len() as u32)
                .filter(|i| idx.binary_search(i).is_err())
                .map(|i| s[i as usize])
                .fold(0f32, f32::max);
            assert!(
                idx.is_empty() || idx.len() == s.len() || min_in >= max_out,
                "{n}"
            );
        }
        // Net level equals a brute-force global ranking (ties: tensor name order, then index).
        let mut pool: Vec<(f32, usize, u32)> = Vec::new();
        for (ti, (n, t)) in g.iter().filter(|(n, _)| *n != "b.bias").enumerate() {
            let _ = n;
            for (i, x) in flat(t).into_iter().enumerate() {
                pool.push((x.abs(), ti, i as u32));
            }
        }
        pool.sort_by(|a, b| {
            b.0.partial_cmp(&a.0)
                .unwrap()
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        let names: Vec<&String> = g.keys().filter(|n| *n != "b.bias").collect();
        let mut want: Vec<Vec<u32>> = vec![Vec::new(); names.len()];
        for &(_, ti, i) in &pool[..expected] {
            want[ti].push(i);
        }
        for (ti, n) in names.iter().enumerate() {
            want[ti].sort();
            assert_eq!(per_level[2].indices[*n], want[ti], "net {n} k={k}");
        }
    }
}

#[test]
fn random_and_magnitude_criteria_are_seeded_and_stable() {
    let (w, _) = toy_set(3);
    let p = all_selected();
    let r =
        |seed| select_from_grads(&w, None, &p, 2, Level::Neuron, Criterion::Random, seed).unwrap();
    assert_eq!(r(7), r(7));
    assert_ne!(r(7).indices, r(8).indices);
    let m1 = select_from_grads(&w, None, &p, 2, Level::Neuron, Criterion::Magnitude, 1).unwrap();
    let m2 = select_from_grads(&w, None, &p, 2, Level::Neuron, Criterion::Magnitude, 99).unwrap();
    assert_eq!(m1, m2);
    // Magnitude = gradient criterion with the weights as "gradients".
    let g = select_from_grads(&w, Some(&w), &p, 2, Level::Neuron, Criterion::Gradient, 0).unwrap();
    assert_eq!(m1, g);
    let rn =
        |seed| select_from_grads(&w, None, &p, 2, Level::Net, Criterion::Random, seed).unwrap();
    assert_eq!(rn(5), rn(5));
}

// ---------------------------------------------------------------- toy MLP: train, artifact, merge

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    head: Linear,
}

impl Mlp {
    fn new(vs: &ParamStore) -> Mlp {
        Mlp {
            fc1: Linear::new(&vs.pp("fc1"), 6, 12, true).unwrap(),
            fc2: Linear::new(&vs.pp("fc2"), 12, 12, true).unwrap(),
            head: Linear::new(&vs.pp("head"), 12, 3, true).unwrap(),
        }
    }

    /// `x: [B, 6] → [B, 3]`.
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x).unwrap().tanh().unwrap();
        let h = self.fc2.forward(&h).unwrap().tanh().unwrap();
        self.head.forward(&h).unwrap()
    }
}

fn batch(rng: &mut Rng) -> (Tensor, Tensor) {
    (randn(&[8, 6], rng, false), randn(&[8, 3], rng, false))
}

fn mse(y: &Tensor, t: &Tensor) -> gps_seg::Result<Tensor> {
    Ok((y - t)?.sqr()?.mean_all()?)
}

#[test]
fn toy_mlp_select_train_save_load_merge_round_trip() {
    let dev = Device::Cpu;
    let base = {
        let vs = ParamStore::init(&dev, 11);
        let _ = Mlp::new(&vs);
        vs.current_tensors().unwrap()
    };
    let policy = Policy::classifier();

    // 1. Selection: gradients of the selected tensors only, pretrained weights unchanged.
    let gstore = ParamStore::with_roles(base.clone(), grad_roles(&base, &policy), &dev);
    let gmodel = Mlp::new(&gstore);
    let vars = gstore.trainable_vars();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["fc1.weight", "fc2.weight"]);
    let mut rng = Rng::new(4);
    let data: Vec<(Tensor, Tensor)> = (0..3).map(|_| batch(&mut rng)).collect();
    let (grads, nb) = accumulate(&vars, data.iter(), |(x, t)| mse(&gmodel.forward(x), t)).unwrap();
    assert_eq!(nb, 3);
    assert_eq!(
        gstore.current_tensors().unwrap()["fc1.weight"]
            .to_vec2::<f32>()
            .unwrap(),
        base["fc1.weight"].to_vec2::<f32>().unwrap()
    );
    let k = 2;
    let sel = select_from_grads(
        &base,
        Some(&grads),
        &policy,
        k,
        Level::Neuron,
        Criterion::Gradient,
        0,
    )
    .unwrap();
    assert_eq!(sel.indices["fc1.weight"].len(), 12 * k);
    // The one-call helper gives the same selection.
    let (sel2, nb2) = select_by_gradient(
        &base,
        &policy,
        &dev,
        |vs| Ok(Mlp::new(vs)),
        data.iter(),
        |m: &Mlp, (x, t)| mse(&m.forward(x), t),
        k,
        Level::Neuron,
    )
    .unwrap();
    assert_eq!((sel2, nb2), (sel.clone(), nb));
    assert_eq!(
        sel.trainable,
        vec!["fc1.bias", "fc2.bias", "head.bias", "head.weight"]
    );

    // 2. Masked training with Adam.
    let store = ParamStore::with_roles(base.clone(), sel.roles(), &dev);
    let model = Mlp::new(&store);
    let mut opt = Adam::new(store.trainable_vars(), 1e-2).unwrap();
    let (sel_n, tr_n) = sel.sizes();
    assert_eq!(opt.sizes().1, sel_n + tr_n);
    assert_eq!(opt.state_bytes(), 8 * (sel_n + tr_n));
    let mut losses = Vec::new();
    for step in 0..20 {
        let (x, t) = &data[step % data.len()];
        let loss = mse(&model.forward(x), t).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    assert!(losses[19] < losses[0], "{losses:?}");
    let st = opt.state().unwrap();
    assert_eq!(st["m.fc1.weight"].dims(), &[12 * k]);
    assert_eq!(st.len(), 3 * store.trainable_vars().len());

    let tuned = store.current_tensors().unwrap();
    for name in ["fc1.weight", "fc2.weight"] {
        let (b, t) = (flat(&base[name]), flat(&tuned[name]));
        let idx = &sel.indices[name];
        for i in 0..b.len() {
            if idx.binary_search(&(i as u32)).is_ok() {
                assert_ne!(b[i], t[i], "{name}[{i}] selected but unchanged");
            } else {
                assert_eq!(
                    b[i].to_bits(),
                    t[i].to_bits(),
                    "{name}[{i}] not selected but changed"
                );
            }
        }
    }

    // 3. Artifact: save, load, merge, rebuild a frozen model.
    let info = SelectionInfo {
        k,
        level: Level::Neuron,
        criterion: Criterion::Gradient,
        selection_loss: "mse".into(),
        batches: nb,
        selection_images: 0,
        seed: 0,
    };
    let mut art = Artifact::new(
        policy.clone(),
        info,
        BaseModel::of(&base, "toy.safetensors").unwrap(),
        sel.clone(),
    )
    .unwrap();
    art.set_delta(delta_from_store(&store).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adir = dir.path().join("art");
    art.save(&adir).unwrap();
    // An untrained selection never replaces (or deletes) a trained artifact's delta.
    let delta_before = std::fs::read(adir.join(DELTA_FILE)).unwrap();
    let mut untrained = art.clone();
    untrained.delta = None;
    let e = untrained.save(&adir).unwrap_err().to_string();
    assert!(e.contains(DELTA_FILE) && e.contains("trained"), "{e}");
    assert_eq!(std::fs::read(adir.join(DELTA_FILE)).unwrap(), delta_before);
    let loaded = Artifact::load(&adir, &dev).unwrap();
    assert_eq!(loaded.selection, sel);
    assert_eq!(loaded.config, art.config);
    let (merged, rep) = merge_with_report(&base, &loaded).unwrap();
    assert_eq!(rep.sparse_tensors, 2);
    assert_eq!(rep.sparse_entries, sel_n);
    assert_eq!(rep.full_entries, tr_n);
    assert_eq!(
        merged.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    for (n, t) in &merged {
        assert_eq!(t.dims(), base[n].dims(), "{n}");
        assert_eq!(flat(t), flat(&tuned[n]), "{n}");
    }
    let frozen = ParamStore::frozen(merged.clone(), &dev);
    let fmodel = Mlp::new(&frozen);
    frozen.check_all_used().unwrap();
    assert_eq!(frozen.counts().0, 0);
    let x = randn(&[5, 6], &mut rng, false);
    let diff = (fmodel.forward(&x) - model.forward(&x))
        .unwrap()
        .abs()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .max(0)
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() <= 1e-6);
    // The artifact holds only tuned values.
    let delta_bytes = std::fs::metadata(adir.join(DELTA_FILE)).unwrap().len() as usize;
    assert!(delta_bytes < 4 * (sel_n + tr_n) + 4096);
    assert!(sel_n + tr_n < base.values().map(|t| t.elem_count()).sum::<usize>());

    // 4. Merge refuses a foreign base: another init (hash), a reshaped or missing tensor.
    let other = {
        let vs = ParamStore::init(&dev, 12);
        let _ = Mlp::new(&vs);
        vs.current_tensors().unwrap()
    };
    let e = merge(&other, &loaded).unwrap_err().to_string();
    assert!(e.contains("hash") && e.contains("toy.safetensors"), "{e}");
    let mut reshaped = base.clone();
    reshaped.insert(
        "fc2.weight".into(),
        base["fc2.weight"].reshape((6, 24)).unwrap(),
    );
    let e = merge(&reshaped, &loaded).unwrap_err().to_string();
    assert!(e.contains("fc2.weight") && e.contains("[6, 24]"), "{e}");
    let mut missing = base.clone();
    missing.remove("head.bias");
    let e = merge(&missing, &loaded).unwrap_err().to_string();
    assert!(e.contains("head.bias"), "{e}");

    // 5. Merge and set_delta refuse non-finite values, naming the tensor.
    let mut nan = loaded.clone();
    let mut d = nan.delta.clone().unwrap();
    let mut v = flat(&d["fc2.weight"]);
    v[0] = f32::NAN;
    d.insert("fc2.weight".into(), Tensor::new(v, &dev).unwrap());
    nan.delta = Some(d.clone());
    let e = merge(&base, &nan).unwrap_err().to_string();
    assert!(e.contains("fc2.weight") && e.contains("NaN"), "{e}");
    assert!(art
        .clone()
        .set_delta(d)
        .unwrap_err()
        .to_string()
        .contains("fc2.weight"));

    // 6. Loading validates: wrong delta length, out-of-range indices.
    let mut bad = delta_from_store(&store).unwrap();
    bad.insert(
        "fc1.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
    );
    save_safetensors(&adir.join(DELTA_FILE), &bad, None).unwrap();
    let e = Artifact::load(&adir, &dev).unwrap_err().to_string();
    assert!(e.contains("fc1.weight") && e.contains(DELTA_FILE), "{e}");
    art.save(&adir).unwrap();
    let mut idx = TensorMap::new();
    for (n, i) in &sel.indices {
        let mut i = i.clone();
        if n == "fc2.weight" {
            *i.last_mut().unwrap() = 10_000;
        }
        idx.insert(n.clone(), Tensor::new(i, &dev).unwrap());
    }
    save_safetensors(&adir.join(SELECTION_FILE), &idx, None).unwrap();
    let e = Artifact::load(&adir, &dev).unwrap_err().to_string();
    assert!(e.contains("fc2.weight") && e.contains("10000"), "{e}");
}

// ------------------------------------- lean selection pass = the dense reference, on tiny SAM

/// The selection pass as it was before it was made memory-lean: a store that copies the
/// selected tensors into vars, the whole prompt-free graph kept for one `backward`, and the
/// gradients summed as tensors (`acc + g`).
fn dense_reference_grads(
    cfg: &SamConfig,
    base: &TensorMap,
    policy: &Policy,
    batches: &[(Tensor, Tensor)],
) -> TensorMap {
    let dev = Device::Cpu;
    let store = ParamStore::with_roles(base.clone(), grad_roles(base, policy), &dev);
    let sam = gps_seg::sam::Sam::new(cfg, &store).unwrap();
    let vars = store.trainable_vars();
    let mut sums = TensorMap::new();
    for (x, m) in batches {
        let loss = gps_seg::train::loss::seg_loss(&sam.forward_prompt_free(x).unwrap(), m).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let next = match sums.remove(name) {
                Some(acc) => (acc + g).unwrap(),
                None => g.clone(),
            };
            sums.insert(name.clone(), next);
        }
    }
    sums
}

#[test]
fn lean_selection_pass_selects_exactly_what_the_dense_reference_does() {
    let dev = Device::Cpu;
    let cfg = SamConfig::tiny().with_image_size(128);
    let base = gps_seg::onnx::sam::random_sam_weights(&cfg, 3).unwrap();
    let policy = Policy::sam();
    let mut rng = Rng::new(9);
    let batches: Vec<(Tensor, Tensor)> = (0..2)
        .map(|_| {
            let x: Vec<f32> = (0..2 * 3 * 128 * 128).map(|_| rng.f32()).collect();
            let m: Vec<f32> = (0..2 * 128 * 128)
                .map(|_| if rng.bernoulli(0.3) { 1.0 } else { 0.0 })
                .collect();
            (
                Tensor::from_vec(x, (2, 3, 128, 128), &dev).unwrap(),
                Tensor::from_vec(m, (2, 1, 128, 128), &dev).unwrap(),
            )
        })
        .collect();
    let reference = dense_reference_grads(&cfg, &base, &policy, &batches);

    // The lean pass: vars sharing the base's storage, encoder blocks recomputed, each gradient
    // summed in place into its score buffer and dropped.
    let hash_before = gps_seg::util::tensors::content_hash(&base).unwrap();
    let mut lean_base = base.clone();
    let store = gps_seg::gps::grad_store(&mut lean_base, &policy, &dev).unwrap();
    let sam = gps_seg::sam::Sam::new(&cfg, &store).unwrap();
    let vars = store.trainable_vars();
    let (lean, n) = gps_seg::gps::accumulate_with(&vars, batches.iter(), |(x, m)| {
        sam.prompt_free_backward_checkpointed(x, |l| gps_seg::train::loss::seg_loss(l, m))
    })
    .unwrap();
    assert_eq!(n, 2);
    drop((sam, store, vars));
    // The base is untouched (same values), and the caller's map was never written.
    assert_eq!(
        gps_seg::util::tensors::content_hash(&lean_base).unwrap(),
        hash_before
    );
    assert_eq!(
        gps_seg::util::tensors::content_hash(&base).unwrap(),
        hash_before
    );

    assert_eq!(
        lean.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    assert!(lean.len() > 10, "{} gradients", lean.len());
    for (name, r) in &reference {
        let (a, b) = (flat(&lean[name]), flat(r));
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-5 * scale, "{name}: max |Δ| {worst} of {scale}");
    }
    for level in [Level::Neuron, Level::Net] {
        let pick = |g: &TensorMap| {
            select_from_grads(&base, Some(g), &policy, 1, level, Criterion::Gradient, 0).unwrap()
        };
        let (a, b) = (pick(&lean), pick(&reference));
        assert_eq!(a.indices, b.indices, "{level:?}");
        assert_eq!(a.trainable, b.trainable, "{level:?}");
    }
}
