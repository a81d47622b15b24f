//! Checkpoint renaming, in one place: Hugging Face `transformers` ViT names
//! (`modeling_vit.py`: `ViTModel` / `ViTForImageClassification`) ↔ timm's
//! `VisionTransformer` names, which are the names this crate's [`super::vit`] uses; and the
//! original facebookresearch/ConvNeXt names → timm's `ConvNeXt` names
//! ([`fb_convnext_to_timm`], the rules of timm's `convnext.checkpoint_filter_fn`).
//!
//! One table ([`VIT_TABLE`]) drives both directions; the only non-rename is attention, where
//! HF keeps separate `query`/`key`/`value` projections and timm one fused `qkv` (rows q, then
//! k, then v — the order timm's `reshape(B, N, 3, H, hd)` reads them in). HF's `pooler` (a
//! tanh dense layer over the class token, unused by timm's model) is dropped and reported.
//! Unknown tensors are passed through under their own name so that the model's
//! `check_all_used` names them.

use crate::error::{Error, Result};
use crate::util::tensors::TensorMap;
use candle_core::Tensor;

/// `(HF suffix, timm suffix)` pairs. Entries ending in `.` are prefixes of per-block names
/// (`vit.encoder.layer.{i}.` ↔ `blocks.{i}.`); the rest are whole names (without `vit.`).
pub const VIT_TABLE: &[(&str, &str)] = &[
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    (
        "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.weight",
    ),
    (
        "embeddings.patch_embeddings.projection.bias",
        "patch_embed.proj.bias",
    ),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
];

/// Per-block `(HF suffix after encoder.layer.{i}., timm suffix after blocks.{i}.)`.
pub const VIT_BLOCK_TABLE: &[(&str, &str)] = &[
    ("layernorm_before", "norm1"),
    ("attention.output.dense", "attn.proj"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
];

/// HF's classifier ↔ timm's head (no `vit.` prefix on either).
const HF_HEAD: &str = "classifier";
const TIMM_HEAD: &str = "head";
const HF_QKV: [&str; 3] = ["query", "key", "value"];

/// Whether `map` uses Hugging Face ViT names (with or without the `vit.` prefix).
pub fn is_hf_vit(map: &TensorMap) -> bool {
    map.keys()
        .any(|k| k.contains("embeddings.patch_embeddings.projection"))
}

/// Rename a Hugging Face ViT state dict to timm names, fusing q/k/v into `qkv`. Returns the
/// renamed map and the list of tensors dropped on purpose (the pooler). A block with some but
/// not all of query/key/value is an error naming the missing tensor.
pub fn hf_vit_to_timm(map: TensorMap) -> Result<(TensorMap, Vec<String>)> {
    let mut out = TensorMap::new();
    let mut dropped = Vec::new();
    // Pending q/k/v pieces: timm name of the fused tensor → [q, k, v] (original names kept).
    let mut qkv: std::collections::BTreeMap<String, [Option<(String, Tensor)>; 3]> =
        Default::default();
    for (name, t) in map {
        let bare = name.strip_prefix("vit.").unwrap_or(&name);
        if bare.starts_with("pooler.") {
            dropped.push(format!("`{name}` (HF pooler; not part of timm's ViT)"));
            continue;
        }
        if let Some(rest) = bare.strip_prefix(&format!("{HF_HEAD}.")) {
            out.insert(format!("{TIMM_HEAD}.{rest}"), t);
            continue;
        }
        if let Some((_, timm)) = VIT_TABLE.iter().find(|(hf, _)| *hf == bare) {
            out.insert((*timm).to_string(), t);
            continue;
        }
        if let Some((i, rest)) = split_layer(bare) {
            if let Some((which, param)) = HF_QKV.iter().enumerate().find_map(|(j, q)| {
                rest.strip_prefix(&format!("attention.attention.{q}."))
                    .map(|p| (j, p))
            }) {
                let key = format!("blocks.{i}.attn.qkv.{param}");
                qkv.entry(key).or_default()[which] = Some((name.clone(), t));
                continue;
            }
            if let Some((hf, timm)) = VIT_BLOCK_TABLE
                .iter()
                .find(|(hf, _)| rest.starts_with(&format!("{hf}.")))
            {
                let param = &rest[hf.len() + 1..];
                out.insert(format!("blocks.{i}.{timm}.{param}"), t);
                continue;
            }
        }
        // Unknown: keep its name so the model reports it as unexpected.
        out.insert(name, t);
    }
    for (fused, parts) in qkv {
        let mut ts = Vec::with_capacity(3);
        for (j, p) in parts.iter().enumerate() {
            match p {
                Some((_, t)) => ts.push(t.clone()),
                None => {
                    let seen = parts.iter().flatten().map(|(n, _)| n.as_str()).next();
                    let missing = seen
                        .map(|s| {
                            let from = HF_QKV.iter().find(|q| s.contains(&format!(".{q}.")));
                            match from {
                                Some(q) => {
                                    s.replacen(&format!(".{q}."), &format!(".{}.", HF_QKV[j]), 1)
                                }
                                None => format!("{fused} ({})", HF_QKV[j]),
                            }
                        })
                        .unwrap_or_else(|| fused.clone());
                    return Err(Error::Tensor {
                        name: missing,
                        msg: format!("missing; needed to build fused `{fused}`"),
                    });
                }
            }
        }
        out.insert(fused, Tensor::cat(&ts, 0)?);
    }
    Ok((out, dropped))
}

/// Rename a timm ViT state dict to Hugging Face `ViTForImageClassification` names (prefix
/// `vit.`, `head` → `classifier`), splitting `qkv` into query/key/value. The inverse of
/// [`hf_vit_to_timm`]; used to test it and to hand weights to HF tooling.
pub fn timm_vit_to_hf(map: TensorMap) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for (name, t) in map {
        if let Some(rest) = name.strip_prefix(&format!("{TIMM_HEAD}.")) {
            out.insert(format!("{HF_HEAD}.{rest}"), t);
            continue;
        }
        if let Some((hf, _)) = VIT_TABLE.iter().find(|(_, timm)| *timm == name) {
            out.insert(format!("vit.{hf}"), t);
            continue;
        }
        if let Some((i, rest)) = split_block(&name) {
            if let Some(param) = rest.strip_prefix("attn.qkv.") {
                let n = t.dim(0)?;
                if !n.is_multiple_of(3) {
                    return Err(Error::Tensor {
                        name,
                        msg: format!("first dim {n} is not divisible by 3"),
                    });
                }
                for (j, q) in HF_QKV.iter().enumerate() {
                    out.insert(
                        format!("vit.encoder.layer.{i}.attention.attention.{q}.{param}"),
                        t.narrow(0, j * n / 3, n / 3)?.contiguous()?,
                    );
                }
                continue;
            }
            if let Some((hf, timm)) = VIT_BLOCK_TABLE
                .iter()
                .find(|(_, timm)| rest.starts_with(&format!("{timm}.")))
            {
                let param = &rest[timm.len() + 1..];
                out.insert(format!("vit.encoder.layer.{i}.{hf}.{param}"), t);
                continue;
            }
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// Whether `map` uses the original facebookresearch/ConvNeXt names
/// (`downsample_layers.*`, `stages.{i}.{j}.dwconv`, …).
pub fn is_fb_convnext(map: &TensorMap) -> bool {
    map.keys().any(|k| k.starts_with("downsample_layers."))
}

/// Rename one original ConvNeXt key to timm's: `downsample_layers.0.` → `stem.`,
/// `downsample_layers.{i}.{j}` → `stages.{i}.downsample.{j}`, `stages.{i}.{j}` →
/// `stages.{i}.blocks.{j}`, `dwconv` → `conv_dw`, `pwconv{n}` → `mlp.fc{n}`, `head.` →
/// `head.fc.`, final `norm.` → `head.norm.`.
pub fn fb_convnext_key_to_timm(name: &str) -> String {
    let mut k = if let Some(rest) = name.strip_prefix("downsample_layers.0.") {
        format!("stem.{rest}")
    } else if let Some((i, rest)) = split_indexed(name, "downsample_layers.") {
        format!("stages.{i}.downsample.{rest}")
    } else if let Some((i, rest)) = split_indexed(name, "stages.") {
        match split_indexed(rest, "") {
            Some((j, tail)) => format!("stages.{i}.blocks.{j}.{tail}"),
            None => name.to_string(),
        }
    } else if let Some(rest) = name.strip_prefix("head.") {
        format!("head.fc.{rest}")
    } else if let Some(rest) = name.strip_prefix("norm.") {
        format!("head.norm.{rest}")
    } else {
        name.to_string()
    };
    k = k.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc");
    k
}

/// Rename an original facebookresearch/ConvNeXt state dict to timm names.
pub fn fb_convnext_to_timm(map: TensorMap) -> TensorMap {
    map.into_iter()
        .map(|(k, v)| (fb_convnext_key_to_timm(&k), v))
        .collect()
}

/// `encoder.layer.{i}.{rest}` → `(i, rest)`.
fn split_layer(name: &str) -> Option<(usize, &str)> {
    split_indexed(name, "encoder.layer.")
}

/// `blocks.{i}.{rest}` → `(i, rest)`.
fn split_block(name: &str) -> Option<(usize, &str)> {
    split_indexed(name, "blocks.")
}

fn split_indexed<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn renames_hf_names_and_drops_pooler() {
        let mut m = TensorMap::new();
        m.insert(
            "embeddings.patch_embeddings.projection.weight".into(),
            t(&[4, 3, 2, 2]),
        );
        m.insert("encoder.layer.3.layernorm_before.weight".into(), t(&[4]));
        m.insert("encoder.layer.3.output.dense.bias".into(), t(&[4]));
        m.insert(
            "encoder.layer.3.attention.output.dense.bias".into(),
            t(&[4]),
        );
        for q in HF_QKV {
            m.insert(
                format!("encoder.layer.3.attention.attention.{q}.weight"),
                t(&[4, 4]),
            );
        }
        m.insert("pooler.dense.weight".into(), t(&[4, 4]));
        assert!(is_hf_vit(&m));
        let (out, dropped) = hf_vit_to_timm(m).unwrap();
        let keys: Vec<&str> = out.keys().map(|s| s.as_str()).collect();
        assert_eq!(
            keys,
            [
                "blocks.3.attn.proj.bias",
                "blocks.3.attn.qkv.weight",
                "blocks.3.mlp.fc2.bias",
                "blocks.3.norm1.weight",
                "patch_embed.proj.weight"
            ]
        );
        assert_eq!(out["blocks.3.attn.qkv.weight"].dims(), &[12, 4]);
        assert_eq!(dropped.len(), 1);
    }

    #[test]
    fn renames_original_convnext_keys() {
        let cases = [
            ("downsample_layers.0.0.weight", "stem.0.weight"),
            ("downsample_layers.0.1.bias", "stem.1.bias"),
            (
                "downsample_layers.2.0.weight",
                "stages.2.downsample.0.weight",
            ),
            ("downsample_layers.3.1.bias", "stages.3.downsample.1.bias"),
            (
                "stages.2.26.dwconv.weight",
                "stages.2.blocks.26.conv_dw.weight",
            ),
            (
                "stages.0.1.pwconv1.weight",
                "stages.0.blocks.1.mlp.fc1.weight",
            ),
            ("stages.0.1.pwconv2.bias", "stages.0.blocks.1.mlp.fc2.bias"),
            ("stages.1.0.norm.weight", "stages.1.blocks.0.norm.weight"),
            ("stages.1.0.gamma", "stages.1.blocks.0.gamma"),
            ("norm.weight", "head.norm.weight"),
            ("head.bias", "head.fc.bias"),
        ];
        for (fb, timm) in cases {
            assert_eq!(fb_convnext_key_to_timm(fb), timm, "{fb}");
        }
    }

    #[test]
    fn missing_key_projection_is_named() {
        let mut m = TensorMap::new();
        m.insert(
            "vit.embeddings.patch_embeddings.projection.weight".into(),
            t(&[4, 3, 2, 2]),
        );
        m.insert(
            "vit.encoder.layer.0.attention.attention.query.bias".into(),
            t(&[4]),
        );
        m.insert(
            "vit.encoder.layer.0.attention.attention.value.bias".into(),
            t(&[4]),
        );
        let e = hf_vit_to_timm(m).unwrap_err().to_string();
        assert!(
            e.contains("vit.encoder.layer.0.attention.attention.key.bias"),
            "{e}"
        );
    }
}
